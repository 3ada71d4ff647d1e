"""Fair serving under long requests: a short request's latency alone vs while 8 clients ask for 4,096 sampled
tokens each, and how long their generation runs on after those clients hang up.

The real stack (`phi3flow serve`: azmlinfsrv + deploy/score.py, embedded model). Prints one run's figures;
medians over --rounds short requests.
Run: .venv/bin/python bench/long_requests.py [--rounds 5]
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import tempfile
import time
from pathlib import Path

import requests

from phi3flow.embedded import embedded_model_dir
from phi3flow.deploy.serve import LocalEndpoint

LONG = {"input_data": {"input_string": [{"role": "user", "content": "Write a very long essay about every river on Earth."}],
                       "parameters": {"max_new_tokens": 4096, "temperature": 2.0}}}
SHORT = {"input_data": {"input_string": [{"role": "user", "content": "What is the capital of France?"}],
                        "parameters": {"max_new_tokens": 16, "temperature": 0}}}


def short(endpoint: LocalEndpoint) -> tuple[float, int]:
    """(seconds, batch size it was decoded in) of one short greedy request."""
    begin = time.perf_counter()
    reply = requests.post(endpoint.url, json=SHORT, headers={"Authorization": f"Bearer {endpoint.key}"}, timeout=600)
    reply.raise_for_status()
    return time.perf_counter() - begin, int(reply.headers["x-phi3flow-batch-size"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--long-clients", type=int, default=8)
    args = parser.parse_args()
    log = Path(tempfile.gettempdir()) / "phi3flow-bench-long.log"
    with LocalEndpoint(embedded_model_dir(), log_file=log) as endpoint:
        short(endpoint)  # warm-up
        alone = statistics.median(short(endpoint)[0] for _ in range(args.rounds))
        raw = json.dumps(LONG).encode()
        clients = []
        for _ in range(args.long_clients):
            sock = socket.create_connection(("127.0.0.1", endpoint.port))
            sock.sendall(f"POST /score HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {endpoint.key}\r\nContent-Type: application/json\r\n"
                         f"Content-Length: {len(raw)}\r\n\r\n".encode() + raw)
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
    print(f"short request (16 tokens, greedy), median of {args.rounds}: alone {alone:.2f} s, "
          f"beside {args.long_clients} x 4,096-token clients {under_load:.2f} s (x{under_load / alone:.2f}; "
          f"decoded in batches of {max(size for _, size in loaded)})")
    print(f"after those clients hung up, their generation stopped within {freed:.1f} s (instead of running to 4,096 tokens)")


if __name__ == "__main__":
    main()
