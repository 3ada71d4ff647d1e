"""Serving throughput: naive (one generate per request) vs dynamic batching, under 1/4/16 concurrent clients.

Both are `phi3flow serve`'s real stack (azmlinfsrv + deploy/score.py, embedded model); the naive one is
PHI3FLOW_MAX_BATCH=1 with one server thread, as azmlinfsrv serves by default. Both servers run at once
and are measured in alternating rounds, so drift in this shared machine's speed hits both alike.
Clients use the tool's own EndpointClient, so its connection pool is part of what is measured.
Prints ratios from this one run.
Run: .venv/bin/python bench/serve.py [--rounds N] [--requests-per-client N] [--max-new-tokens N]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path

from transformers import AutoTokenizer

from phi3flow.client import EndpointClient
from phi3flow.embedded import embedded_model_dir
from phi3flow.serve import LocalEndpoint

COUNTRIES = ["France", "Japan", "Germany", "Egypt", "Kenya", "Canada", "Italy", "Spain"]
SETUPS = {
    "naive": {"threads": 1, "env": {"PHI3FLOW_MAX_BATCH": "1"}},
    "batched": {"threads": 32, "env": {"PHI3FLOW_MAX_BATCH": "16"}},
}


def load(
    endpoint: LocalEndpoint, clients: int, per_client: int, max_new_tokens: int, tokenizer
) -> tuple[float, list[float], int]:
    """(elapsed seconds, latencies, generated tokens) for `clients` closed-loop clients."""
    client = EndpointClient(endpoint.url, endpoint.key, pool_size=clients)

    def one(i: int) -> tuple[float, int]:
        question = f"What is the capital of {COUNTRIES[i % len(COUNTRIES)]}?"
        start = time.perf_counter()
        answer = client.chat([{"role": "user", "content": question}], temperature=0, max_new_tokens=max_new_tokens)
        return time.perf_counter() - start, len(tokenizer(answer)["input_ids"])

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(one, range(clients * per_client)))
    return time.perf_counter() - start, [r[0] for r in results], sum(r[1] for r in results)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=4, help="alternating rounds per client count (default 4)")
    parser.add_argument("--requests-per-client", type=int, default=2)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    args = parser.parse_args()
    model_dir = embedded_model_dir()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    with ExitStack() as stack:
        endpoints = {
            name: stack.enter_context(
                LocalEndpoint(
                    model_dir,
                    threads=setup["threads"],
                    env=setup["env"],
                    log_file=Path(tempfile.gettempdir()) / f"phi3flow-bench-{name}.log",
                )
            )
            for name, setup in SETUPS.items()
        }
        for endpoint in endpoints.values():
            load(endpoint, 1, 1, args.max_new_tokens, tokenizer)  # warm-up
        totals = {(name, clients): [0.0, [], 0] for name in SETUPS for clients in args.clients}
        for clients in args.clients:
            for round_ in range(args.rounds):
                order = list(endpoints.items()) if round_ % 2 == 0 else list(endpoints.items())[::-1]  # cancel drift
                for name, endpoint in order:
                    elapsed, latencies, tokens = load(endpoint, clients, args.requests_per_client, args.max_new_tokens, tokenizer)
                    total = totals[name, clients]
                    total[0] += elapsed
                    total[1] += latencies
                    total[2] += tokens
    print(f"{'clients':>7} {'setup':>8} {'req/s':>7} {'tok/s':>7} {'p50 s':>7} {'p95 s':>7}")
    rows = {}
    for (name, clients), (elapsed, latencies, tokens) in totals.items():
        latencies = sorted(latencies)
        rows[name, clients] = {"rps": len(latencies) / elapsed, "p50": statistics.median(latencies)}
        p95 = latencies[min(len(latencies) - 1, int(0.95 * len(latencies)))]
        print(
            f"{clients:>7} {name:>8} {len(latencies) / elapsed:7.2f} {tokens / elapsed:7.1f} {rows[name, clients]['p50']:7.2f} {p95:7.2f}"
        )
    print()
    for clients in args.clients:
        naive, batched = rows["naive", clients], rows["batched", clients]
        print(
            f"{clients:>2} clients: throughput x{batched['rps'] / naive['rps']:.2f}, p50 latency x{batched['p50'] / naive['p50']:.2f} (batched / naive)"
        )


if __name__ == "__main__":
    main()
