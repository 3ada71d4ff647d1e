"""What generate()'s LongRoPE answers cost the ONNX engine: the crossing's cache recomputation, and crossing requests
that no longer share a batch.

The model is the tests' LongRoPE Phi-3 (tests/conftest.py build_longrope_phi3: the embedded model's real weights,
rotary factors switching past 64 positions), exported with `phi3flow export onnx --precision fp32`. Requests are
greedy, a 47-token prompt with 48 new tokens, so each crosses position 64 after 18 tokens. Prints one run's figures:
- the crossing step (Generator rewound to nothing and rerun on the 65 tokens so far) against a decode step, and
  a prefill of the whole 256-token context against a decode step (the crossing of a real Phi-3.5 or Phi-4-mini
  recomputes 4,097 tokens: one prefill of that length);
- one crossing request's tokens/s through the engine against the library's own decode of it (no recomputation:
  the answer that diverged from generate()'s);
- 4 crossing requests at once: the engine (each alone now) against the 4 decoded as one batch by the library.
Run: .venv/bin/python bench/onnx_longrope.py [--rounds N]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from phi3flow.export import export_onnx
from phi3serve.contract import Parameters
from phi3serve.engine import Job
from phi3serve.model import ChatModel
from phi3serve.onnx_engine import OnnxEngine

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from conftest import build_longrope_phi3  # noqa: E402 - the tests' LongRoPE model, one home

PROMPT = [{"role": "user", "content": "Write a short story about a fox who lives in the Arctic and loves the snow."}]
PARAMS = Parameters(do_sample=False, max_new_tokens=48)


def timed(step) -> float:
    start = time.perf_counter()
    step()
    return time.perf_counter() - start


def steps(library, ids: list[int], switch: int) -> tuple[float, float, float]:
    """(median decode step, the crossing's recomputation, a prefill of the whole context) in seconds, one row."""
    import onnxruntime_genai as og

    params = og.GeneratorParams(library)
    params.set_search_options(batch_size=1, max_length=4 * switch, do_sample=False)
    generator = og.Generator(library, params)
    generator.append_tokens(np.asarray([ids], dtype=np.int32))
    decode = [timed(generator.generate_next_token) for _ in range(switch + 1 - len(ids))]
    sequence = generator.get_sequence(0).tolist()
    crossing = timed(lambda: (generator.rewind_to(0), generator.append_tokens(np.asarray([sequence], dtype=np.int32))))
    full = (sequence * 4)[: 4 * switch - 1]
    generator.rewind_to(0)
    whole = timed(lambda: generator.append_tokens(np.asarray([full], dtype=np.int32)))
    return statistics.median(decode), crossing, whole


def library_rate(library, ids: list[int], rows: int) -> float:
    """Tokens/s of the library's own greedy decode of `rows` copies of the request as one batch (prefill included)."""
    import onnxruntime_genai as og

    start = time.perf_counter()
    params = og.GeneratorParams(library)
    params.set_search_options(batch_size=rows, max_length=len(ids) + PARAMS.max_new_tokens, do_sample=False)
    generator = og.Generator(library, params)
    generator.append_tokens(np.asarray([ids] * rows, dtype=np.int32))
    while not generator.is_done():
        generator.generate_next_token()
    return rows * PARAMS.max_new_tokens / (time.perf_counter() - start)


def engine_rate(engine: OnnxEngine, ids: list[int], clients: int) -> float:
    def one(_: int) -> int:
        job = Job(ids, PARAMS, deadline=time.monotonic() + 600)
        engine.submit(job)
        return job.future.result(timeout=600).tokens

    engine.kept = None  # no prompt cache: each request is prefilled, as the library's are
    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        tokens = sum(pool.map(one, range(clients)))
    return tokens / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds, medians printed (default 3)")
    args = parser.parse_args()
    import onnxruntime_genai as og

    with tempfile.TemporaryDirectory() as scratch:
        folder = export_onnx(build_longrope_phi3(Path(scratch) / "hf"), Path(scratch) / "onnx", precision="fp32")
        model = ChatModel.load(folder)
        ids, _ = model.encode(PROMPT, PARAMS.max_new_tokens)
        switch = model.rope_switch
        library = og.Model(og.Config(str(folder)))
        engine = OnnxEngine(model, max_batch=8, max_queue=8, wait_s=0.05)
        engine_rate(engine, ids, 1)  # warm-up: first-call allocations are not throughput
        timings = [steps(library, ids, switch) for _ in range(args.rounds)]
        decode, crossing, whole = (statistics.median(t[i] for t in timings) for i in range(3))
        print(f"{len(ids)}-token prompt, {PARAMS.max_new_tokens} new tokens, LongRoPE switch at {switch}, fp32, this CPU")
        print(
            f"decode step {decode * 1e3:.1f} ms | crossing recomputation ({switch + 1} tokens) {crossing * 1e3:.1f} ms ="
            f" {crossing / decode:.1f} decode steps | prefill of {4 * switch - 1} tokens {whole * 1e3:.1f} ms ="
            f" {whole / decode:.1f} decode steps"
        )
        for clients in (1, 4):
            ours = [engine_rate(engine, ids, clients) for _ in range(args.rounds)]
            theirs = [library_rate(library, ids, clients) for _ in range(args.rounds)]
            print(
                f"{clients} crossing request(s): engine {statistics.median(ours):6.1f} tok/s (generate()'s answer"
                f"{', each alone' if clients > 1 else ''}) | library decode {statistics.median(theirs):6.1f} tok/s"
                f" (no recomputation{', one batch' if clients > 1 else ''}: another answer)"
                f" | engine/library {statistics.median(ours) / statistics.median(theirs):.2f}x"
            )
        engine.close()


if __name__ == "__main__":
    main()
