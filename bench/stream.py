"""Streaming: time to first piece vs the whole answer at 1 and 16 concurrent clients, and the tool's cost per streamed piece.

Part 1 runs `phi3flow serve`'s real stack (azmlinfsrv + deploy/score.py, embedded model, default batching, a wait
list long enough for every client, no request deadline) and measures, in alternating rounds so drift in this
shared machine's speed hits both alike: streamed answers (`EndpointClient.chat_stream`, time to the first piece
and to the last) and JSON answers (`chat`, the wait before anything shows today). Greedy decoding, so both modes
generate the same text.
Part 2 streams many pieces from a local server that answers instantly, one chunk per event as the real
server sends them, and compares the Prompt Flow tool with `stream=True` against a bare `requests` SSE reader:
the difference per piece is what the tool adds.
Prints ratios from this one run.
Run: .venv/bin/python bench/stream.py [--rounds N] [--max-new-tokens N] [--pieces N]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import requests

from phi3flow.client import EndpointClient
from phi3flow.embedded import embedded_model_dir
from phi3flow.offline import use_offline_defaults
from phi3flow.serve import LocalEndpoint
from phi3serve.contract import DELTA_EVENT, DONE_EVENT, STREAM_MEDIA_TYPE

TOPICS = ["France", "Japan", "the Moon", "photosynthesis", "the Nile", "volcanoes", "Mozart", "the Internet"]


def one(client: EndpointClient, i: int, stream: bool, max_new_tokens: int) -> dict[str, float]:
    """One answer: seconds to the first piece (the whole answer, without streaming) and to the end; pieces seen."""
    messages = [{"role": "user", "content": f"Tell me about {TOPICS[i % len(TOPICS)]}."}]
    start = time.perf_counter()
    if not stream:
        client.chat(messages, temperature=0, max_new_tokens=max_new_tokens)
        elapsed = time.perf_counter() - start
        return {"first": elapsed, "full": elapsed, "pieces": 1}
    first, pieces = None, 0
    for _ in client.chat_stream(messages, temperature=0, max_new_tokens=max_new_tokens):
        first = first or time.perf_counter() - start
        pieces += 1
    return {"first": first, "full": time.perf_counter() - start, "pieces": pieces}


def concurrent(client: EndpointClient, clients: int, stream: bool, max_new_tokens: int) -> list[dict[str, float]]:
    with ThreadPoolExecutor(clients) as pool:
        return list(pool.map(lambda i: one(client, i, stream, max_new_tokens), range(clients)))


def latency(args: argparse.Namespace) -> dict[int, dict[str, dict[str, float]]]:
    """Part 1: p50 of first-piece and full-answer seconds per (clients, mode)."""
    results: dict[int, dict[str, list]] = {clients: {"json": [], "stream": []} for clients in args.clients}
    log = Path(tempfile.gettempdir()) / "phi3flow-bench-stream.log"
    # A wait list as long as the largest client count and no request deadline: every answer is measured whole,
    # none turned away with 503 or cut off when this shared machine is slow.
    env = {"PHI3FLOW_MAX_QUEUE": str(max(args.clients)), "PHI3FLOW_REQUEST_TIMEOUT_S": "3600"}
    with LocalEndpoint(embedded_model_dir(), log_file=log, env=env) as endpoint:
        client = EndpointClient(endpoint.url, endpoint.key, pool_size=max(args.clients))
        concurrent(client, 1, True, args.max_new_tokens)  # warm-up
        for clients in args.clients:
            for round_ in range(args.rounds):
                for mode in ("json", "stream") if round_ % 2 == 0 else ("stream", "json"):
                    results[clients][mode] += concurrent(client, clients, mode == "stream", args.max_new_tokens)
    return {
        clients: {
            mode: {key: statistics.median(r[key] for r in runs) for key in ("first", "full", "pieces")}
            for mode, runs in modes.items()
        }
        for clients, modes in results.items()
    }


class InstantStream(BaseHTTPRequestHandler):
    """Answers every POST with `pieces` delta events and the final event, each its own HTTP chunk, at once."""

    protocol_version = "HTTP/1.1"  # keep-alive and chunked, as the real server
    disable_nagle_algorithm = True
    pieces = 0

    def do_POST(self) -> None:  # noqa: N802
        self.rfile.read(int(self.headers["Content-Length"]))
        self.send_response(200)
        self.send_header("Content-Type", STREAM_MEDIA_TYPE)
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        events = [(DELTA_EVENT, {"text": " word"})] * self.pieces + [(DONE_EVENT, {"output": " word" * self.pieces})]
        for name, data in events:
            chunk = f"event: {name}\ndata: {json.dumps(data)}\n\n".encode()
            self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        self.wfile.write(b"0\r\n\r\n")

    def log_message(self, *args) -> None:
        pass


def bare_reader(session: requests.Session, url: str, body: dict) -> int:
    """The least a client can do: read lines, decode each delta's JSON."""
    pieces = 0
    headers = {"Authorization": "Bearer bench-key", "Accept": STREAM_MEDIA_TYPE}
    with session.post(url, json=body, headers=headers, stream=True, timeout=10) as response:
        for line in response.iter_lines():
            if line.startswith(b"data:") and "text" in json.loads(line[5:]):
                pieces += 1
    return pieces


def per_piece(pieces: int, calls: int) -> dict[str, float]:
    """Part 2: p50 microseconds per streamed piece, bare reader vs the tool."""
    use_offline_defaults()  # before promptflow is imported: no telemetry, no settings fetch
    from promptflow.connections import CustomConnection

    from phi3flow.tools.chat_endpoint import chat

    InstantStream.pieces = pieces
    server = ThreadingHTTPServer(("127.0.0.1", 0), InstantStream)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/score"
    body = {"input_data": {"input_string": [{"role": "user", "content": "Who founded Microsoft?"}], "parameters": {}}}
    connection = CustomConnection(configs={"endpoint": url}, secrets={"key": "bench-key"})
    session = requests.Session()
    readers = {
        "bare requests reader": lambda: bare_reader(session, url, body),
        "tool, stream=True": lambda: sum(1 for _ in chat(connection, "Who founded Microsoft?", stream=True)),
    }
    samples: dict[str, list[float]] = {name: [] for name in readers}
    for call in range(calls + 5):  # the first 5 warm up; readers alternate
        for name, read in readers.items():
            start = time.perf_counter()
            assert read() == pieces, name
            if call >= 5:
                samples[name].append((time.perf_counter() - start) / pieces * 1e6)
    server.shutdown()
    return {name: statistics.median(values) for name, values in samples.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds per client count (default 3)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--pieces", type=int, default=1000, help="pieces per stream in part 2 (default 1000)")
    parser.add_argument("--calls", type=int, default=30, help="streams per reader in part 2 (default 30)")
    args = parser.parse_args()

    rows = latency(args)
    print(f"{'clients':>7} {'mode':>6} {'p50 first piece s':>17} {'p50 full answer s':>17} {'p50 pieces':>10}")
    for clients, modes in rows.items():
        for mode, row in modes.items():
            print(f"{clients:>7} {mode:>6} {row['first']:17.2f} {row['full']:17.2f} {row['pieces']:10.0f}")
    print()
    for clients, modes in rows.items():
        json_full, streamed = modes["json"]["full"], modes["stream"]
        print(
            f"{clients:>2} clients: first piece after {streamed['first'] / json_full:.2f}x the JSON answer's wait "
            f"({json_full / streamed['first']:.1f}x sooner); streamed full answer / JSON answer {streamed['full'] / json_full:.2f}x"
        )
    print()
    cost = per_piece(args.pieces, args.calls)
    for name, micros in cost.items():
        print(f"{name:<21} p50 {micros:7.1f} us per piece")
    added = cost["tool, stream=True"] - cost["bare requests reader"]
    one_client = rows[min(rows)]["stream"]
    gap_us = (one_client["full"] - one_client["first"]) / max(one_client["pieces"] - 1, 1) * 1e6
    print(
        f"tool / bare reader {cost['tool, stream=True'] / cost['bare requests reader']:.2f}x ({added:+.1f} us per piece); "
        f"the tool's whole cost per piece is {cost['tool, stream=True'] / gap_us:.2%} of the {gap_us / 1000:.0f} ms "
        f"between pieces at {min(rows)} client"
    )


if __name__ == "__main__":
    main()
