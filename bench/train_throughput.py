"""Training throughput of the CPU config with and without packing: real tokens/s and peak memory.

Each mode runs in its own process (so peak RSS is its own) on the same data, seed and batches;
tokens are non-padding tokens, the work both modes must do. The first steps are warm-up and not timed.

    python bench/train_throughput.py [--steps 12] [--warmup 2] [--data-dir DIR]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from transformers import TrainerCallback


class StepClock(TrainerCallback):
    """(seconds, tokens seen) at the end of every step."""

    def __init__(self) -> None:
        self.marks: list[tuple[float, int]] = []

    def on_step_end(self, args, state, control, **kwargs) -> None:
        self.marks.append((time.perf_counter(), state.num_input_tokens_seen))


def measure(packing: bool, steps: int, warmup: int, data_dir: Path, config: str) -> dict[str, float]:
    from phi3flow.finetune import train
    from phi3flow.finetune.config import load_config

    with tempfile.TemporaryDirectory() as out:
        cfg = load_config(
            config,
            {
                "packing": packing,
                "max_steps": steps,
                "eval_strategy": "no",
                "save_steps": 10**6,
                "logging_steps": steps,
                "output_dir": out,
                "train_file": str(data_dir / "train_data.jsonl"),
                "test_file": str(data_dir / "test_data.jsonl"),
            },
        )
        prepared = train.prepare(cfg)
        clock = StepClock()
        prepared.trainer.add_callback(clock)
        prepared.trainer.train()
    (t0, n0), (t1, n1) = clock.marks[warmup - 1], clock.marks[-1]
    return {
        "tokens_per_s": (n1 - n0) / (t1 - t0),
        "s_per_step": (t1 - t0) / (steps - warmup),
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--config", default="embedded-lora-cpu")
    parser.add_argument("--data-dir", type=Path, help="folder with train/test_data.jsonl (default: the offline sample)")
    parser.add_argument("--child", choices=["packing", "padding"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.steps <= args.warmup:
        parser.error("--steps must exceed --warmup")

    if args.child:
        result = measure(args.child == "packing", args.steps, args.warmup, args.data_dir, args.config)
        print(json.dumps(result))
        return 0

    with tempfile.TemporaryDirectory() as tmp:
        data_dir = args.data_dir
        if data_dir is None:
            from phi3flow.data import prepare as data

            data_dir = Path(tmp)
            data.main(["--sample", "--output-dir", tmp])
        results = {}
        for mode in ("padding", "packing"):
            command = [
                sys.executable,
                __file__,
                "--child",
                mode,
                "--steps",
                str(args.steps),
                "--warmup",
                str(args.warmup),
                "--config",
                args.config,
                "--data-dir",
                str(data_dir),
            ]
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode:
                print(done.stderr[-3000:], file=sys.stderr)
                return done.returncode
            results[mode] = json.loads(done.stdout.strip().splitlines()[-1])

    print(f"{'mode':<8} {'tokens/s':>10} {'s/step':>8} {'peak RSS MiB':>13}")
    for mode, r in results.items():
        print(f"{mode:<8} {r['tokens_per_s']:>10.1f} {r['s_per_step']:>8.2f} {r['peak_rss_mib']:>13.0f}")
    pack, pad = results["packing"], results["padding"]
    print(
        f"packing/padding: tokens/s x{pack['tokens_per_s'] / pad['tokens_per_s']:.2f}, "
        f"peak RSS x{pack['peak_rss_mib'] / pad['peak_rss_mib']:.2f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
