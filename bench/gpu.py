"""GPU benchmark: QLoRA fine-tuning and serving on a random-weight Phi-3-mini (or Phi-4-mini) shape.

Speed and memory depend on the shapes, not on the weight values, so nothing comes from a hub: the model
is `Phi3Config`'s architecture with random weights, saved locally, with the embedded model's tokenizer.
Runs on one H100/H200 in about 6 minutes per shape; every phase runs in its own process under its own
time limit (a phase that runs out is reported as such, the others still run) and prints ratios from
this one run.

    python bench/gpu.py --shape phi3-mini --output-dir /tmp/gpu-bench [--tokenizer DIR] [--tiny]

1. train: `phi3flow finetune --config phi3-mini-qlora` (only the model, data and run length changed)
   with packing, padding and group-by-length on ultrachat-like lengths (200 to 2,000 tokens):
   peak GPU memory and train tokens/s after warm-up steps.
2. serve: the adapter from the packing run, merged at load as the scoring script does, at 1/16/64/128
   concurrent requests of 64 new tokens (every request runs to full length) for each engine (the
   decode loop, transformers' continuous batching) and, for one stream, `model.generate` with a
   dynamic and a static (compiled) cache; the bandwidth floor (weight bytes / measured copy bandwidth)
   for one stream beside them.
`--tiny` shrinks the model and the run to check the script on a CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

NEW_TOKENS = 64
CONCURRENCY = (1, 16, 64, 128)
MODES = ("packing", "padding", "group_by_length")
# Published shapes (transformers' Phi3Config defaults = Phi-3-mini-4k; Phi-4-mini-instruct's config.json).
SHAPES = {
    "phi3-mini": {"vocab_size": 32064},
    "phi4-mini": {
        "num_attention_heads": 24,
        "num_key_value_heads": 8,
        "vocab_size": 200064,
        "tie_word_embeddings": True,
        "partial_rotary_factor": 0.75,
        "max_position_embeddings": 131072,
        "original_max_position_embeddings": 4096,
        "rope_scaling": {"type": "longrope", "short_factor": [1.0] * 48, "long_factor": [1.0] * 48},
    },
}
TINY = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4}
WORDS = (
    "river mountain answer question model token cloud endpoint deploy evaluate history language "
    "science music garden kitchen travel ocean forest city planet energy market story"
).split()


def build(shape: str, tokenizer_dir: Path, out: Path, tiny: bool) -> dict:
    """Random weights in the shape's architecture, saved with the tokenizer (vocabulary at least the tokenizer's)."""
    import torch
    from transformers import AutoTokenizer, Phi3Config, Phi3ForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    values = dict(SHAPES[shape])
    values["vocab_size"] = max(values["vocab_size"], len(tokenizer))
    if tiny:
        values.update(TINY)
        if "rope_scaling" in values:
            half = int(TINY["hidden_size"] // TINY["num_attention_heads"] * values["partial_rotary_factor"]) // 2
            values["rope_scaling"] = {**values["rope_scaling"], "short_factor": [1.0] * half, "long_factor": [1.0] * half}
            values["num_key_value_heads"] = 2
    config = Phi3Config(
        **values, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    with torch.device(device):
        model = Phi3ForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return {
        "parameters_b": sum(p.numel() for p in model.parameters()) / 1e9,
        "weight_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
    }


def write_data(tokenizer_dir: Path, folder: Path, rows: int, tiny: bool) -> None:
    """Ultrachat-like conversations: a question and an answer whose lengths spread from ~200 to ~2,000 tokens."""
    rng = random.Random(0)
    folder.mkdir(parents=True, exist_ok=True)
    for name, count in (("train_data.jsonl", rows), ("test_data.jsonl", max(8, rows // 10))):
        with open(folder / name, "w", encoding="utf-8") as handle:
            for i in range(count):
                words = rng.randint(20, 60) if tiny else int(min(1400, max(140, rng.lognormvariate(6.4, 0.6))))
                question = " ".join(rng.choices(WORDS, k=max(8, words // 5)))
                answer = " ".join(rng.choices(WORDS, k=words))
                messages = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
                handle.write(json.dumps({"prompt": question, "prompt_id": f"{name}-{i}", "messages": messages}) + "\n")


def train(model_dir: Path, data_dir: Path, out: Path, mode: str, steps: int, warmup: int) -> dict:
    """A few steps of the shipped QLoRA config; peak memory and tokens/s after the warm-up steps."""
    import torch
    from transformers import TrainerCallback

    from phi3flow.finetune import train as finetune
    from phi3flow.finetune.config import load_config

    class StepClock(TrainerCallback):
        def __init__(self) -> None:
            self.marks: list[tuple[float, int]] = []

        def on_step_end(self, args, state, control, **kwargs) -> None:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.marks.append((time.perf_counter(), state.num_input_tokens_seen))

    cfg = load_config(
        "phi3-mini-qlora",
        {
            "model": str(model_dir),
            "train_file": str(data_dir / "train_data.jsonl"),
            "test_file": str(data_dir / "test_data.jsonl"),
            "output_dir": str(out),
            "max_steps": steps,
            "eval_strategy": "no",
            "save_steps": 10**6,
            "logging_steps": steps,
            "gradient_accumulation_steps": 1,
            "packing": mode == "packing",
            "train_sampling_strategy": "group_by_length" if mode == "group_by_length" else "random",
        },
    )
    prepared = finetune.prepare(cfg)
    clock = StepClock()
    prepared.trainer.add_callback(clock)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    metrics = finetune.train(prepared)
    (t0, n0), (t1, n1) = clock.marks[warmup - 1], clock.marks[-1]
    result = {
        "tokens_per_s": (n1 - n0) / (t1 - t0),
        "s_per_step": (t1 - t0) / (steps - warmup),
        "quantized_4bit": prepared.quantized,
        "bf16": prepared.trainer.args.bf16,
        "train_loss": metrics.get("train_loss"),
    }
    if torch.cuda.is_available():
        result["peak_allocated_gib"] = torch.cuda.max_memory_allocated() / 2**30
        result["peak_reserved_gib"] = torch.cuda.max_memory_reserved() / 2**30
    prepared.trainer.model.save_pretrained(out)  # every mode's adapter can be served (--serve-from)
    prepared.tokenizer.save_pretrained(out)
    (out / finetune.METADATA_FILE).write_text(
        json.dumps(
            {
                "base_model_name_or_path": str(model_dir),
                "end_of_turn_token": prepared.tokenizer.convert_ids_to_tokens(prepared.end_of_turn),
            }
        )
    )
    return result


def copy_bandwidth() -> float:
    """Device-to-device copy, bytes read plus written per second (the memory-bandwidth ceiling we can reach)."""
    import torch

    if not torch.cuda.is_available():
        return float("nan")
    src = torch.empty(2 * 2**30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        dst.copy_(src)
    end.record()
    torch.cuda.synchronize()
    return 10 * 2 * src.numel() / (start.elapsed_time(end) / 1000)


def serve(adapter_dir: Path, concurrency: tuple[int, ...], engines: tuple[str, ...], generate: tuple[str, ...]) -> dict:
    """tok/s per engine and concurrency (every request generates exactly NEW_TOKENS), plus model.generate for one stream."""
    import torch

    from phi3serve.contract import ChatRequest, Parameters
    from phi3serve.engine import engine_for, start
    from phi3serve.model import ChatModel

    started = time.perf_counter()
    model = ChatModel.load(adapter_dir)
    results: dict = {"load_s": time.perf_counter() - started, "dtype": str(model.dtype), "device": str(model.device)}
    model.stop_ids = [-1]  # no stop token: every request runs to max_new_tokens, so token counts are exact
    messages = [{"role": "user", "content": "Summarise the history of rivers and mountains in a few sentences."}]
    request = ChatRequest(messages, Parameters(do_sample=False, max_new_tokens=NEW_TOKENS))
    ids, _ = model.encode(messages, NEW_TOKENS)
    results["prompt_tokens"] = len(ids)
    bandwidth = copy_bandwidth()
    results["copy_bandwidth_gbs"] = bandwidth / 1e9
    weight_bytes = sum(p.numel() * p.element_size() for p in model.model.parameters())
    results["floor_tok_s"] = bandwidth / weight_bytes

    def timed(engine, clients: int) -> float:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(clients) as pool:
            begin = time.perf_counter()
            answers = list(pool.map(lambda _: start(engine, model, request, 3600.0)[0].future.result(), range(clients)))
            elapsed = time.perf_counter() - begin
        assert all(a.tokens == NEW_TOKENS for a in answers), [a.tokens for a in answers]
        return clients * NEW_TOKENS / elapsed

    with torch.inference_mode():
        for name in generate:
            cache = {"cache_implementation": "static"} if name.endswith("static") else {}
            prompt = torch.tensor([ids], device=model.device)
            kwargs = dict(
                max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=model.pad_id, **cache
            )
            begin = time.perf_counter()
            model.model.generate(prompt, **kwargs)  # the static cache compiles its decode step here
            results[f"{name}_first_call_s"] = time.perf_counter() - begin
            begin = time.perf_counter()
            model.model.generate(prompt, **kwargs)
            results[f"{name}_tok_s"] = NEW_TOKENS / (time.perf_counter() - begin)
            torch._dynamo.reset()
    for name in engines:  # the library engine last: its paged cache takes most of the free memory
        engine_name, *settings = name.split("+")  # e.g. continuous+PHI3FLOW_CB_ASYNC=1
        os.environ["PHI3FLOW_ENGINE"] = engine_name
        os.environ.update(setting.split("=", 1) for setting in settings)
        begin = time.perf_counter()
        engine = engine_for(model, max_batch=max(concurrency), max_queue=max(concurrency), wait_s=0.005)
        results[f"{name}_startup_s"] = time.perf_counter() - begin
        timed(engine, 1)  # warm-up
        for clients in concurrency:
            results[f"{name}_{clients}_tok_s"] = timed(engine, clients)
        print(json.dumps(results), flush=True)
        if hasattr(engine, "manager"):  # give the paged cache back before the next variant
            engine.manager.stop(block=True, timeout=30)
            del engine
            import gc

            gc.collect()
            torch.cuda.empty_cache()
        for setting in settings:
            os.environ.pop(setting.split("=", 1)[0])
    return results


def phase(args: argparse.Namespace, name: str, extra: list[str], limit: int, out: Path) -> dict | None:
    """Run one phase in its own process under a time limit; its JSON result, or None (and why) if it failed."""
    command = [sys.executable, __file__, "--phase", name, *extra, "--shape", args.shape, "--output-dir", str(args.output_dir)]
    if args.tiny:
        command.append("--tiny")
    log = out / f"{name}{'-' + extra[1] if name != 'build' and len(extra) > 1 else ''}.log"
    begin = time.perf_counter()
    try:
        with open(log, "w") as handle:
            done = subprocess.run(command, stdout=subprocess.PIPE, stderr=handle, text=True, timeout=limit)
    except subprocess.TimeoutExpired as stopped:
        print(f"  {name} {' '.join(extra)}: stopped at its {limit} s limit (see {log})", flush=True)
        partial = [line for line in (stopped.stdout or b"").decode().splitlines() if line.startswith("{")]
        return json.loads(partial[-1]) if partial else None
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode or not lines:
        print(f"  {name} {' '.join(extra)}: failed (exit {done.returncode}); last log lines:", flush=True)
        print("    " + "\n    ".join(log.read_text().splitlines()[-8:]), flush=True)
        return json.loads(lines[-1]) if lines else None
    print(f"  {name} {' '.join(extra)}: done in {time.perf_counter() - begin:.0f} s", flush=True)
    return json.loads(lines[-1])


def report(shape: str, built: dict, trained: dict, served: dict | None, gpu: str, engines: list[str]) -> str:
    lines = [f"## {shape} shape ({built['parameters_b']:.2f} B parameters, random weights) on {gpu}", ""]
    lines += ["| QLoRA (phi3-mini-qlora config) | train tokens/s | peak allocated GiB | peak reserved GiB |", "|---|---|---|---|"]
    for mode, r in trained.items():
        if r is None:
            lines.append(f"| {mode} | did not finish | | |")
            continue
        lines.append(
            f"| {mode} | {r['tokens_per_s']:,.0f} | {r.get('peak_allocated_gib', float('nan')):.2f} | "
            f"{r.get('peak_reserved_gib', float('nan')):.2f} |"
        )
    done = {m: r for m, r in trained.items() if r}
    if "packing" in done:
        for mode in ("padding", "group_by_length"):
            if mode in done:
                lines.append(
                    f"\npacking / {mode}: tokens/s x{done['packing']['tokens_per_s'] / done[mode]['tokens_per_s']:.2f}, "
                    f"peak allocated x{done['packing'].get('peak_allocated_gib', 1) / done[mode].get('peak_allocated_gib', 1):.2f}"
                )
    if served:
        lines += [
            "",
            f"Serving ({NEW_TOKENS} new tokens per request, greedy, {served['dtype']}; one-stream bandwidth floor "
            f"{served['floor_tok_s']:.0f} tok/s at a measured {served['copy_bandwidth_gbs']:.0f} GB/s copy):",
            "",
            "| concurrent requests | " + " | ".join(f"{e} tok/s" for e in engines) + " | last / first |",
            "|---" * (len(engines) + 2) + "|",
        ]
        levels = sorted(
            {int(key.rsplit("_", 3)[-3]) for key in served if key.endswith("_tok_s") and key.rsplit("_", 3)[-3].isdigit()}
        )
        for clients in levels:
            values = [served.get(f"{e}_{clients}_tok_s") for e in engines]
            ratio = f"{values[-1] / values[0]:.2f}x" if values[0] and values[-1] else ""
            lines.append(f"| {clients} | " + " | ".join(f"{v:,.1f}" if v else "-" for v in values) + f" | {ratio} |")
        for name in ("generate-dynamic", "generate-static"):
            if f"{name}_tok_s" in served:
                lines.append(
                    f"\n`model.generate` one stream, {name.split('-')[1]} cache: {served[f'{name}_tok_s']:.1f} tok/s "
                    f"(first call {served[f'{name}_first_call_s']:.0f} s)"
                )
        floor = served["floor_tok_s"]
        for key, label in [(f"{e}_1_tok_s", e) for e in engines] + [("generate-static_tok_s", "generate, static cache")]:
            if key in served and floor == floor:
                lines.append(f"\none stream, {label}: {100 * served[key] / floor:.0f}% of the bandwidth floor")
        for name in engines:
            if f"{name}_startup_s" in served:
                lines.append(f"\n{name} engine start-up (graph capture included): {served[f'{name}_startup_s']:.0f} s")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="phi3-mini")
    parser.add_argument("--output-dir", type=Path, default=Path(tempfile.gettempdir()) / "phi3flow-gpu-bench")
    parser.add_argument("--tokenizer", type=Path, help="tokenizer folder (default: the embedded model's)")
    parser.add_argument("--tiny", action="store_true", help="a tiny model and run, to check the script on a CPU")
    parser.add_argument("--train-steps", type=int, default=8)
    parser.add_argument("--train-warmup", type=int, default=3)
    parser.add_argument("--train-limit", type=int, default=100, help="seconds per training mode")
    parser.add_argument("--serve-limit", type=int, default=240, help="seconds for the serving phase")
    parser.add_argument("--modes", nargs="*", choices=MODES, default=list(MODES))
    parser.add_argument(
        "--engines",
        nargs="+",
        default=["loop", "continuous"],
        help="engines to serve with, each optionally with settings: continuous+PHI3FLOW_CB_ASYNC=1",
    )
    parser.add_argument(
        "--generate",
        nargs="*",
        default=["generate-dynamic", "generate-static"],
        choices=["generate-dynamic", "generate-static"],
        help="model.generate baselines for one stream",
    )
    parser.add_argument(
        "--serve-from", choices=["base", *MODES], default="packing", help="serve the base model or the adapter of a training mode"
    )
    parser.add_argument("--phase", choices=["build", "train", "serve"], help=argparse.SUPPRESS)
    parser.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    root = args.output_dir / args.shape
    model_dir, data_dir = root / "model", root / "data"
    concurrency = (1, 4) if args.tiny else CONCURRENCY

    if args.phase == "build":
        tokenizer = args.tokenizer
        if tokenizer is None:
            from phi3flow.embedded import embedded_model_dir

            tokenizer = embedded_model_dir()
        write_data(tokenizer, data_dir, 64 if args.tiny else 400, args.tiny)
        print(json.dumps(build(args.shape, tokenizer, model_dir, args.tiny)))
        return 0
    if args.phase == "train":
        print(
            json.dumps(train(model_dir, data_dir, root / f"adapter-{args.mode}", args.mode, args.train_steps, args.train_warmup))
        )
        return 0
    if args.phase == "serve":
        served_dir = model_dir if args.serve_from == "base" else root / f"adapter-{args.serve_from}"
        print(json.dumps(serve(served_dir, concurrency, tuple(args.engines), tuple(args.generate))))
        return 0

    import torch

    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    root.mkdir(parents=True, exist_ok=True)
    tokenizer_args = ["--tokenizer", str(args.tokenizer)] if args.tokenizer else []
    built = phase(args, "build", tokenizer_args, 180, root)
    if built is None:
        return 1
    trained = {
        mode: phase(
            args,
            "train",
            ["--mode", mode, "--train-steps", str(args.train_steps), "--train-warmup", str(args.train_warmup)],
            args.train_limit,
            root,
        )
        for mode in args.modes
    }
    serve_args = ["--serve-from", args.serve_from, "--engines", *args.engines, "--generate", *args.generate]
    served = (
        phase(args, "serve", serve_args, args.serve_limit, root)
        if args.serve_from == "base" or trained.get(args.serve_from)
        else None
    )
    text = report(args.shape, built, trained, served, gpu, args.engines)
    (root / "report.md").write_text(text + "\n")
    (root / "results.json").write_text(json.dumps({"gpu": gpu, "built": built, "trained": trained, "served": served}, indent=2))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
