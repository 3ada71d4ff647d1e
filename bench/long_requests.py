"""Fair serving under long requests: a short request's latency alone vs while 8 clients ask for 4,096 sampled
tokens each, and how long their generation runs on after those clients hang up; then (fair prefill) alone vs beside
two ~8k-token prompts, with the server worker's memory before, during and after them.

The real stack (`phi3flow serve`: azmlinfsrv + deploy/score.py, embedded model). Prints one run's figures;
medians over --rounds short requests.
Run: .venv/bin/python bench/long_requests.py [--rounds 5] [--only prompts]
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import requests

from phi3flow.embedded import embedded_model_dir
from phi3flow.serve import LocalEndpoint

LONG = {
    "input_data": {
        "input_string": [{"role": "user", "content": "Write a very long essay about every river on Earth."}],
        "parameters": {"max_new_tokens": 4096, "temperature": 2.0},
    }
}
SHORT = {
    "input_data": {
        "input_string": [{"role": "user", "content": "What is the capital of France?"}],
        "parameters": {"max_new_tokens": 16, "temperature": 0},
    }
}


def short(endpoint: LocalEndpoint) -> tuple[float, int]:
    """(seconds, batch size it was decoded in) of one short greedy request."""
    begin = time.perf_counter()
    reply = requests.post(endpoint.url, json=SHORT, headers={"Authorization": f"Bearer {endpoint.key}"}, timeout=600)
    reply.raise_for_status()
    return time.perf_counter() - begin, int(reply.headers["x-phi3flow-batch-size"])


def worker_rss(endpoint: LocalEndpoint) -> int:
    """Resident memory (bytes) of the server process that holds the model: the largest in its process tree."""
    server = psutil.Process(endpoint.process.pid)
    return max(p.memory_info().rss for p in [server, *server.children(recursive=True)])


def long_prompts(endpoint: LocalEndpoint, rounds: int, prompts: int = 2) -> None:
    """A short request alone vs beside `prompts` ~8k-token prompts (prefilled in chunks between its decode steps);
    the worker's memory before them, at its peak while they run, and once they are answered."""
    words = "The river flows past the old mill and the children play on its banks. " * 520  # ~8,000 tokens
    alone = statistics.median(short(endpoint)[0] for _ in range(rounds))
    before = worker_rss(endpoint)
    bodies = [
        {
            "input_data": {
                "input_string": [{"role": "user", "content": f"Summarise text {i}: {words}"}],
                "parameters": {"max_new_tokens": 32, "temperature": 0},
            }
        }
        for i in range(prompts)
    ]
    with ThreadPoolExecutor(prompts) as pool:
        began = time.perf_counter()
        answers = [
            pool.submit(requests.post, endpoint.url, json=b, timeout=1800, headers={"Authorization": f"Bearer {endpoint.key}"})
            for b in bodies
        ]
        time.sleep(1.0)  # their prefill has begun
        beside, peak = [], before
        for _ in range(rounds):
            beside.append(short(endpoint)[0])
            peak = max(peak, worker_rss(endpoint))
        while not all(a.done() for a in answers):
            peak = max(peak, worker_rss(endpoint))
            time.sleep(0.5)
        assert all(a.result().status_code == 200 for a in answers), [a.result().text[:200] for a in answers]
        took = time.perf_counter() - began
    time.sleep(2)
    after = worker_rss(endpoint)
    under_load = statistics.median(beside)
    print(
        f"short request (16 tokens, greedy), median of {rounds}: alone {alone:.2f} s, beside {prompts} x ~8k-token prompts "
        f"{under_load:.2f} s (x{under_load / alone:.2f}; worst x{max(beside) / alone:.2f}); the long ones answered in {took:.0f} s"
    )
    print(
        f"worker memory: {before / 2**20:.0f} MiB before, {peak / 2**20:.0f} MiB at peak, {after / 2**20:.0f} MiB after "
        f"(+{(after - before) / 2**20:.0f} MiB)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--long-clients", type=int, default=8)
    parser.add_argument("--only", choices=["answers", "prompts"], help="run one part: long answers, or long prompts")
    args = parser.parse_args()
    log = Path(tempfile.gettempdir()) / "phi3flow-bench-long.log"
    # Two ~8k-token prompts take minutes on a small CPU: a deadline that lets them finish
    with LocalEndpoint(embedded_model_dir(), log_file=log, env={"PHI3FLOW_REQUEST_TIMEOUT_S": "1800"}) as endpoint:
        if args.only != "answers":
            short(endpoint)  # warm-up
            long_prompts(endpoint, args.rounds)
        if args.only == "prompts":
            return
        short(endpoint)  # warm-up
        alone = statistics.median(short(endpoint)[0] for _ in range(args.rounds))
        raw = json.dumps(LONG).encode()
        clients = []
        for _ in range(args.long_clients):
            sock = socket.create_connection(("127.0.0.1", endpoint.port))
            sock.sendall(
                f"POST /score HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {endpoint.key}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(raw)}\r\n\r\n".encode()
                + raw
            )
            clients.append(sock)
        time.sleep(3)
        loaded = [short(endpoint) for _ in range(args.rounds)]
        under_load = statistics.median(seconds for seconds, _ in loaded)
        hung_up = time.perf_counter()
        for sock in clients:
            sock.close()
        while short(endpoint)[1] != 1:
            pass
        freed = time.perf_counter() - hung_up
    print(
        f"short request (16 tokens, greedy), median of {args.rounds}: alone {alone:.2f} s, "
        f"beside {args.long_clients} x 4,096-token clients {under_load:.2f} s (x{under_load / alone:.2f}; "
        f"decoded in batches of {max(size for _, size in loaded)})"
    )
    print(f"after those clients hung up, their generation stopped within {freed:.1f} s (instead of running to 4,096 tokens)")


if __name__ == "__main__":
    main()
