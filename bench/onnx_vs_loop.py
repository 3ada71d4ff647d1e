"""Generation throughput: the ONNX int4 engine vs the decode loop (the CPU default), 1 and 16 clients.

Both engines serve the embedded model in this process through the scoring script's own engine interface
(encode, submit a Job, wait for its Answer), so the figures are generation alone, without HTTP. The ONNX
folder is exported once with `phi3flow export onnx` (int4, CPU). Requests are greedy with 64 new tokens;
generated tokens are counted from the answers (a request may end its turn earlier) over the time from
submission to answer, so each request's prompt prefill counts (decode-only rates are higher). Rounds alternate
between the engines, so drift in a shared machine's speed hits both alike. Prints medians and ratios, then
the library's decode-only rates (onnxruntime-genai's Generator and greedy search, prefill left out), the
kind of rate issue 18's 136 and 334 tok/s match (its goals were set from those).
(Not bench/onnx.py: a script there would shadow the onnx package the exporter imports.)
Run: .venv/bin/python bench/onnx_vs_loop.py [--rounds N] [--output-dir DIR] [--block-size N]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from phi3flow.embedded import embedded_model_dir
from phi3flow.export import BLOCK_SIZES, DEFAULT_BLOCK_SIZE, export_onnx
from phi3serve.contract import Parameters
from phi3serve.engine import Engine, Job, engine_for
from phi3serve.model import ChatModel

TOPICS = ["rivers", "volcanoes", "the moon", "bread", "trains", "owls", "glaciers", "chess"]
PARAMS = Parameters(do_sample=False, max_new_tokens=64)
GOALS = {1: 120.0, 16: 300.0}  # issue 18's goals for the ONNX engine, tok/s on this CPU


def prompts(model: ChatModel, clients: int) -> list[list[int]]:
    return [
        model.encode(
            [{"role": "user", "content": f"Write a long story about {TOPICS[i % len(TOPICS)]}."}], PARAMS.max_new_tokens
        )[0]
        for i in range(clients)
    ]


def rate(engine: Engine, model: ChatModel, clients: int) -> float:
    """Generated tokens per second with `clients` requests in flight at once (each client sends one request)."""

    def one(ids: list[int]) -> int:
        job = Job(ids, PARAMS, deadline=time.monotonic() + 600)
        engine.submit(job)
        return job.future.result(timeout=600).tokens

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        tokens = sum(pool.map(one, prompts(model, clients)))
    return tokens / (time.perf_counter() - start)


def decode_only(library: Any, model: ChatModel, clients: int) -> float:
    """The library's own tokens per second for the same prompts as one batch, counted after their prefill."""
    import numpy as np
    import onnxruntime_genai as og

    batch = prompts(model, clients)
    width = max(len(ids) for ids in batch)
    params = og.GeneratorParams(library)
    params.set_search_options(batch_size=clients, max_length=width + PARAMS.max_new_tokens, do_sample=False)
    generator = og.Generator(library, params)
    generator.append_tokens(np.asarray([ids + [model.pad_id] * (width - len(ids)) for ids in batch], dtype=np.int32))
    generator.generate_next_token()  # runs the prompts: the prefill, left out
    steps, start = 0, time.perf_counter()
    while steps < PARAMS.max_new_tokens - 1 and not generator.is_done():
        generator.generate_next_token()
        steps += 1
    return clients * steps / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds per client count (default 3)")
    parser.add_argument("--output-dir", help="where the ONNX export goes (default: a temporary folder)")
    parser.add_argument(
        "--block-size",
        type=int,
        choices=BLOCK_SIZES,
        default=DEFAULT_BLOCK_SIZE,
        help=f"int4 weights per scale of the export (default {DEFAULT_BLOCK_SIZE}, as phi3flow export)",
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(args.output_dir or scratch) / "embedded-int4"
        started = time.perf_counter()
        export_onnx(embedded_model_dir(), folder, block_size=args.block_size)
        print(f"export (int4, cpu, block size {args.block_size}): {time.perf_counter() - started:.1f} s")
        models = {"loop": ChatModel.load(embedded_model_dir()), "onnx-int4": ChatModel.load(folder)}
        engines = {name: engine_for(model, max_batch=16, max_queue=64, wait_s=0.05) for name, model in models.items()}
        print(f"loop engine dtype: {models['loop'].dtype}")
        for name, engine in engines.items():  # warm-up: first-call allocations are not throughput
            rate(engine, models[name], 2)
        for clients in (1, 16):
            rates: dict[str, list[float]] = {name: [] for name in engines}
            for _ in range(args.rounds):
                for name, engine in engines.items():
                    rates[name].append(rate(engine, models[name], clients))
            loop, onnx = statistics.median(rates["loop"]), statistics.median(rates["onnx-int4"])
            print(
                f"{clients:>2} client(s): loop {loop:6.1f} tok/s | onnx-int4 {onnx:6.1f} tok/s | onnx/loop {onnx / loop:4.2f}x"
                f" | goal {GOALS[clients]:.0f} tok/s: {'met' if onnx >= GOALS[clients] else 'not met'}"
                f"  (rounds: loop {', '.join(f'{r:.0f}' for r in rates['loop'])}; onnx {', '.join(f'{r:.0f}' for r in rates['onnx-int4'])})"
            )
        for engine in engines.values():
            engine.close()
        import onnxruntime_genai as og

        library = og.Model(og.Config(str(folder)))
        decode = {
            clients: statistics.median(decode_only(library, models["onnx-int4"], clients) for _ in range(args.rounds))
            for clients in (1, 16)
        }
        print(
            f"library decode-only, prefill left out (issue 18: 136 / 334): 1 row {decode[1]:.1f} tok/s,"
            f" 16 rows {decode[16]:.1f} tok/s"
        )


if __name__ == "__main__":
    main()
