"""`phi3flow eval` interrupted (Ctrl+C) and killed (SIGKILL) mid-run against `phi3flow serve`, then resumed.

The real stack: the embedded model under azmlinfsrv, `phi3flow eval` as a separate process (greedy, 16 new
tokens, concurrency 4) over N generated questions. For each way of stopping it after `--stop-after` answers, prints:
seconds from the signal to the exit, requests the server answered in all (sent before the signal, dropped in
flight included), answers kept, then what `--resume` asked again and the lines lost or duplicated in the end.
Run: .venv/bin/python bench/interrupted_eval.py [--lines N] [--stop-after N]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from phi3flow.connect import KEY_ENV
from phi3flow.embedded import embedded_model_dir
from phi3flow.serve import LocalEndpoint


def answered(log: Path) -> int:
    """Requests the server has answered so far (azmlinfsrv's request lines)."""
    return sum(" /score 200 " in line for line in log.read_text(errors="replace").splitlines())


def settled(log: Path) -> int:
    """Answered requests, once requests still in flight have finished."""
    count = -1
    while count != (count := answered(log)):
        time.sleep(6)
    return count


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lines", type=int, default=40)
    parser.add_argument("--stop-after", type=int, default=10, help="answers written before the signal (default 10)")
    args = parser.parse_args()
    with (
        tempfile.TemporaryDirectory() as folder,
        LocalEndpoint(embedded_model_dir(), log_file=Path(folder) / "server.log") as endpoint,
    ):
        data = Path(folder) / "test_data.jsonl"
        data.write_text(
            "".join(
                json.dumps(
                    {
                        "messages": [
                            {"role": "user", "content": f"What is {i} plus {i}?"},
                            {"role": "assistant", "content": f"{i} plus {i} is {2 * i}."},
                        ]
                    }
                )
                + "\n"
                for i in range(args.lines)
            )
        )
        env = {**os.environ, KEY_ENV: endpoint.key}
        for name, signum in [("Ctrl+C (SIGINT)", signal.SIGINT), ("kill -9 (SIGKILL)", signal.SIGKILL)]:
            out = Path(folder) / name.split()[0]
            command = [
                sys.executable,
                "-m",
                "phi3flow.cli",
                "eval",
                "--candidate",
                endpoint.url,
                "--data",
                str(data),
                "--output-dir",
                str(out),
                "--concurrency",
                "4",
                "--max-new-tokens",
                "16",
            ]
            before = settled(endpoint.log_file)
            process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            predictions = out / "candidate.predictions.jsonl"
            while len(records(predictions)) < args.stop_after and process.poll() is None:
                time.sleep(0.02)
            process.send_signal(signum)
            signalled = time.monotonic()
            process.wait()
            stopped_s = time.monotonic() - signalled
            sent = settled(endpoint.log_file) - before
            kept = len(records(predictions))
            subprocess.run([*command, "--resume"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
            asked_again = settled(endpoint.log_file) - before - sent
            final = [r["index"] for r in records(predictions)]
            print(
                f"{name}: exited {stopped_s:.2f} s after the signal; the server answered {sent} requests, "
                f"{kept} answers kept, {sent - kept} dropped in flight; --resume asked {asked_again} again; "
                f"lines lost {args.lines - len(set(final))}, duplicated {len(final) - len(set(final))} of {args.lines}"
            )


if __name__ == "__main__":
    main()
