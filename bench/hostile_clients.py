"""Hostile clients against `phi3flow serve`: idle and slow-header connections, slow uploads without the key, and a
huge chunked upload.

The real stack (azmlinfsrv + deploy/score.py, embedded model), once with gunicorn's own threaded worker
(`gthread`, what azmlinfsrv gets from `--threads`) and once with phi3flow's (what `phi3flow serve` runs). Prints:
- the latency of a normal request (greedy, 8 new tokens) alone, then while 200 idle connections and 40
  connections sending one header byte every 2 s are held open, and the difference (goal: < 1 s); in alternating
  rounds, so drift in this shared machine's speed hits both alike;
- the same, alone and while --uploads clients (50) announce 1 MiB bodies with a wrong key, send 70 KB of it and then
  one byte a second, reconnecting whenever the server cuts them off, and the ratio (goal: < 4x);
- the answer to a 512 MiB chunked upload with a valid key and the server's memory growth meanwhile
  (goal: 413, < 20 MB).
Run: .venv/bin/python bench/hostile_clients.py [--idle N] [--slow N] [--uploads N] [--rounds N] [--chunked-mib N]
     [--patience S]
"""

from __future__ import annotations

import argparse
import math
import os
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import requests

from phi3flow.embedded import embedded_model_dir
from phi3flow.serve import HOST, LocalEndpoint

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from conftest import Trickle  # noqa: E402 - the tests' slow-upload clients

QUESTION = {
    "input_data": {
        "input_string": [{"role": "user", "content": "What is the capital of France?"}],
        "parameters": {"temperature": 0, "max_new_tokens": 8},
    }
}


WORKERS = {"gthread": "-k gthread", "phi3flow": ""}  # extra GUNICORN_CMD_ARGS; command-line flags outrank the config file


def normal_latencies(endpoint: LocalEndpoint, count: int, patience: float) -> list[float]:
    """Seconds per request, one after another, each on a new connection; inf (and no more tries) past `patience` s."""
    latencies = []
    for _ in range(count):
        start = time.perf_counter()
        try:
            response = requests.post(
                endpoint.url, json=QUESTION, headers={"Authorization": f"Bearer {endpoint.key}"}, timeout=patience
            )
        except requests.Timeout:
            return [*latencies, math.inf]
        latencies.append(time.perf_counter() - start)
        assert response.status_code == 200, response.text
    return latencies


class Attack:
    """`idle` connections that send nothing and `slow` ones that send a request head one byte every `interval` s."""

    def __init__(self, port: int, idle: int, slow: int, interval: float = 2.0):
        self.sockets = [socket.create_connection((HOST, port)) for _ in range(idle)]
        self.slow = [socket.create_connection((HOST, port)) for _ in range(slow)]
        self.interval, self.stopped = interval, threading.Event()
        self.thread = threading.Thread(target=self._drip, daemon=True)
        self.thread.start()

    def _drip(self) -> None:
        head = b"POST /score HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 10_000
        for position in range(len(head)):
            for sock in list(self.slow):
                try:
                    sock.sendall(head[position : position + 1])
                except OSError:  # the server gave up on it: that is the point
                    self.slow.remove(sock)
            if self.stopped.wait(self.interval):
                return

    def close(self) -> None:
        self.stopped.set()
        self.thread.join()
        for sock in self.sockets + self.slow:
            sock.close()


def wrong_key_uploads(port: int, count: int) -> Trickle:
    """`count` clients announcing a 1 MiB body with a wrong key, trickling it (the tests' Trickle)."""
    head = (
        f"POST /score HTTP/1.1\r\nHost: {HOST}\r\nAuthorization: Bearer wrong-key\r\n"
        f"Content-Type: application/json\r\nContent-Length: {1 << 20}\r\n\r\n"
    ).encode()
    return Trickle(port, count, head)


def server_rss(endpoint: LocalEndpoint) -> int:
    """Resident bytes of the server and its workers."""
    root = psutil.Process(endpoint.process.pid)
    return sum(p.memory_info().rss for p in [root, *root.children(recursive=True)])


def chunked_upload(endpoint: LocalEndpoint, mib: int) -> tuple[str, int, float]:
    """(status line, peak memory growth in bytes, MiB sent) for a chunked body of `mib` MiB with a valid key."""
    before, peak = server_rss(endpoint), 0
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, server_rss(endpoint))
            time.sleep(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    sock = socket.create_connection((HOST, endpoint.port))
    sock.sendall(
        f"POST /score HTTP/1.1\r\nHost: {HOST}\r\nAuthorization: Bearer {endpoint.key}\r\n"
        "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n".encode()
    )
    chunk = b"100000\r\n" + b"[" * (1 << 20) + b"\r\n"
    sent = 0
    try:
        for sent in range(1, mib + 1):  # noqa: B007 - read after the loop: how much was sent before the server closed
            sock.sendall(chunk)
        sock.sendall(b"0\r\n\r\n")
    except OSError:
        sent -= 1  # the server stopped reading and closed: the rest was never sent
    sock.settimeout(60)
    try:
        status = sock.recv(4096).split(b"\r\n", 1)[0].decode() or "connection closed without an answer"
    except OSError as exc:
        status = f"no answer ({type(exc).__name__})"
    sock.close()
    time.sleep(0.5)
    done.set()
    sampler.join()
    return status, peak - before, sent


def alternate(endpoint: LocalEndpoint, args: argparse.Namespace, attack) -> tuple[list[float], list[float]]:
    """(latencies alone, latencies while `attack()` runs), in alternating rounds; stops at the first unanswered one."""
    alone, attacked = [], []
    for _ in range(args.rounds):
        alone += normal_latencies(endpoint, args.requests, args.patience)
        running = attack()
        time.sleep(1.0)
        try:
            attacked += normal_latencies(endpoint, args.requests, args.patience)
        finally:
            running.close()
        if math.inf in attacked:
            break
    return alone, attacked


def measure(worker: str, args: argparse.Namespace) -> dict[str, tuple[list[float], list[float]]]:
    """{attack: (latencies alone, latencies under it)} with one worker class."""
    os.environ["GUNICORN_CMD_ARGS"] = WORKERS[worker]
    with (
        tempfile.TemporaryDirectory() as folder,
        LocalEndpoint(embedded_model_dir(), log_file=Path(folder) / "server.log") as endpoint,
    ):
        normal_latencies(endpoint, 2, args.patience)  # warm up
        results = {
            "idle+slow": alternate(endpoint, args, lambda: Attack(endpoint.port, args.idle, args.slow)),
            "uploads": alternate(endpoint, args, lambda: wrong_key_uploads(endpoint.port, args.uploads)),
        }
        if worker == "phi3flow":
            status, growth, sent = chunked_upload(endpoint, args.chunked_mib)
            print(
                f"{args.chunked_mib} MiB chunked upload: {status!r} after {sent} MiB sent; server memory growth "
                f"{growth / 1e6:.1f} MB (goal: 413, < 20 MB)"
            )
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--idle", type=int, default=200)
    parser.add_argument("--slow", type=int, default=40)
    parser.add_argument("--uploads", type=int, default=50, help="wrong-key clients trickling 1 MiB bodies (default 50)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds alone / under attack (default 3)")
    parser.add_argument("--requests", type=int, default=3, help="normal requests per round, alone and under attack (default 3)")
    parser.add_argument(
        "--patience", type=float, default=60.0, help="seconds a normal request may take before it counts as not answered"
    )
    parser.add_argument("--chunked-mib", type=int, default=512)
    args = parser.parse_args()
    print(
        f"normal request (greedy, 8 new tokens): median s alone / under attack; idle+slow: {args.idle} idle + {args.slow} "
        f"slow-header connections (goal: delay < 1 s); uploads: {args.uploads} wrong-key clients trickling 1 MiB bodies "
        f"(goal: < 4x alone); > {args.patience:.0f} s counts as not answered"
    )
    for worker in WORKERS:
        for attack, (alone, attacked) in measure(worker, args).items():
            before, during = statistics.median(alone), statistics.median(attacked)
            shown = "not answered" if math.isinf(during) else f"delay {during - before:+.2f} s, {during / before:.2f}x alone"
            print(f"{worker:>9} worker, {attack:>9}: {before:.2f} / {during:.2f} s ({shown})")


if __name__ == "__main__":
    main()
