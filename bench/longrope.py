"""What exact LongRoPE costs the decode loop: per-row rotary factors and the re-prefill of a row at the switch.

On the test suite's LongRoPE Phi-3 (the embedded model's weights, factors switching at position 64; built once into
a temporary folder), fp32, the same greedy requests decoded by phi3serve.loop.Decoder twice: with per-row factors
(the served path) and with the model's own rotary rule (`rotary = None`: what the loop did before, wrong past the
switch, the cost baseline). Prints ratios from one run: time per decode step, the re-prefill at the crossing
against a decode step, and end to end.
Run: .venv/bin/python bench/longrope.py [--rows 4] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "deploy")]

from conftest import build_longrope_phi3  # noqa: E402
from phi3serve.contract import parse_request  # noqa: E402
from phi3serve.engine import Job  # noqa: E402
from phi3serve.loop import Decoder  # noqa: E402
from phi3serve.model import ChatModel  # noqa: E402
from phi3serve.settings import ENV  # noqa: E402

PROMPT = "Write a short story about a lonely fox lost in the Arctic snow."  # 44 tokens; 48 new ones cross 64


class TimedDecoder(Decoder):
    """A Decoder that records each forward pass: (rows, columns fed, seconds)."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.passes: list[tuple[int, int, float]] = []

    def forward(self, long: Any, **inputs: Any) -> Any:
        began = time.perf_counter()
        scores = super().forward(long, **inputs)
        self.passes.append((*inputs["input_ids"].shape, time.perf_counter() - began))
        return scores


def run(chat: ChatModel, rows: int, per_row: bool) -> tuple[float, list[tuple[int, int, float]], list[list[int]]]:
    """(seconds, forward passes, answers' tokens) of `rows` copies of the crossing request decoded together."""
    decoder = TimedDecoder(chat)
    if not per_row:
        decoder.rotary = None
    request = parse_request(
        json.dumps(
            {
                "input_data": {
                    "input_string": [{"role": "user", "content": PROMPT}],
                    "parameters": {"temperature": 0, "max_new_tokens": 48},
                }
            }
        ).encode()
    )
    jobs = [Job(chat.encode(request.messages, 48)[0], request.params) for _ in range(rows)]
    began = time.perf_counter()
    answers = [tokens for _, tokens in decoder.decode(jobs)]
    return time.perf_counter() - began, decoder.passes, answers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    os.environ[ENV["dtype"]] = "float32"
    with tempfile.TemporaryDirectory() as folder:
        chat = ChatModel.load(build_longrope_phi3(Path(folder)))
    run(chat, args.rows, True)  # warm-up
    results = {per_row: [run(chat, args.rows, per_row) for _ in range(args.rounds)] for per_row in (False, True)}

    def step_s(per_row: bool) -> float:
        return statistics.median(s for _, passes, _ in results[per_row] for _, cols, s in passes[1:] if cols == 1)

    # per generated token: the two paths' answers differ, and so may their lengths
    total = {
        per_row: statistics.median(seconds / sum(map(len, answers)) for seconds, _, answers in runs)
        for per_row, runs in results.items()
    }
    reprefill = statistics.median(s for _, passes, _ in results[True] for _, cols, s in passes[1:] if cols > 1)
    print(f"{args.rows} rows x (44-token prompt + 48 greedy tokens, crossing position 64), fp32, median of {args.rounds}:")
    print(
        f"  decode step: per-row factors {step_s(True) * 1000:.1f} ms vs the model's own rule {step_s(False) * 1000:.1f} ms "
        f"(x{step_s(True) / step_s(False):.2f})"
    )
    print(
        f"  re-prefill at the switch (the {args.rows} rows' 65 tokens, once): {reprefill * 1000:.1f} ms = "
        f"{reprefill / step_s(True):.1f} decode steps"
    )
    print(
        f"  end to end per generated token: {total[True] * 1000:.1f} ms vs {total[False] * 1000:.1f} ms "
        f"(x{total[True] / total[False]:.2f}); answers differ from the old path's: {results[True][0][2] != results[False][0][2]}"
    )


if __name__ == "__main__":
    main()
