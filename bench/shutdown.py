"""SIGTERM to `phi3flow serve` while requests are in flight: what their clients get, and how fast the port closes.

The real stack (`phi3flow serve` on the embedded model, greedy). A long request (up to 1,000 new tokens) is
generating and a short one (4 tokens) has just been sent when `serve` gets SIGTERM. Prints the seconds from the
signal until new connections are refused, until each client has its answer (status and message) and until `serve`
has exited, then whether the port is free. Goal: every client gets a complete HTTP answer (200, or a 503 JSON at the
drain time), the port refuses new connections at once, and `serve` exits within the drain time + 5 s.
Run: .venv/bin/python bench/shutdown.py [--drain S] [--rounds N]
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import threading
import time

import requests

from phi3flow.serve import HOST, check_port_free, free_port
from phi3serve.contract import KEY_ENV
from phi3serve.settings import ENV

DRAIN_ENV = ENV["drain_s"]

KEY = "bench-shutdown-key"


def ask(url: str, content: str, tokens: int, stopped: list[float], out: dict, name: str) -> None:
    body = {
        "input_data": {
            "input_string": [{"role": "user", "content": content}],
            "parameters": {"temperature": 0, "max_new_tokens": tokens},
        }
    }
    try:
        response = requests.post(url, json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=120)
        message = (
            response.json().get("message", "answer")
            if response.headers.get("Content-Type") == "application/json"
            else response.text[:60]
        )
        out[name] = (time.monotonic() - stopped[0], f"{response.status_code} {message}")
    except requests.RequestException as exc:
        out[name] = (time.monotonic() - stopped[0], f"no HTTP answer ({type(exc).__name__})")


def refused_after(port: int, since: float, limit: float = 30.0) -> float:
    """Seconds from `since` until a connection to the port is refused."""
    while time.monotonic() - since < limit:
        try:
            socket.create_connection((HOST, port), timeout=1).close()
        except OSError:
            return time.monotonic() - since
        time.sleep(0.05)
    return float("inf")


def one_round(drain: float | None) -> dict:
    port = free_port()
    env = {**os.environ, KEY_ENV: KEY, **({DRAIN_ENV: str(drain)} if drain is not None else {})}
    server = subprocess.Popen(
        [sys.executable, "-m", "phi3flow.cli", "serve", "--port", str(port)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        for line in server.stdout:
            if line.startswith("Scoring URL"):
                break
        url, stopped, out = f"http://{HOST}:{port}/score", [0.0], {}
        long = threading.Thread(
            target=ask, args=(url, "Write a long story about a dragon and a knight.", 1000, stopped, out, "long")
        )
        long.start()
        time.sleep(2.0)
        short = threading.Thread(target=ask, args=(url, "What is the capital of France?", 4, stopped, out, "short"))
        short.start()
        time.sleep(0.3)
        stopped[0] = time.monotonic()
        server.send_signal(15)
        out["refused"] = refused_after(port, stopped[0])
        server.wait(timeout=120)
        out["exited"] = time.monotonic() - stopped[0]
        long.join()
        short.join()
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
    try:
        check_port_free(port)
        out["port"] = "free"
    except RuntimeError as exc:
        out["port"] = str(exc)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--drain", type=float, default=None, help=f"${DRAIN_ENV} for the server (default: its own)")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    rounds = [one_round(args.drain) for _ in range(args.rounds)]
    for i, out in enumerate(rounds, 1):
        print(
            f"round {i}: refused new connections after {out['refused']:.2f} s; short request: {out['short'][1]} "
            f"at {out['short'][0]:.2f} s; long request: {out['long'][1]} at {out['long'][0]:.2f} s; serve exited after "
            f"{out['exited']:.2f} s; port {out['port']}"
        )
    print(
        f"median: refused after {statistics.median(o['refused'] for o in rounds):.2f} s, exited after "
        f"{statistics.median(o['exited'] for o in rounds):.2f} s"
    )


if __name__ == "__main__":
    main()
