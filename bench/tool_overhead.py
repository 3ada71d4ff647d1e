"""Per-call overhead of the Prompt Flow tool over a raw `requests.post` to the same local server.

Goal: < 1 ms p50 added. The server answers instantly, so the difference is the tool's own cost
(history conversion, validation, pooled session with retries vs a raw post).
Run: .venv/bin/python bench/tool_overhead.py [--calls N]
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import requests
from promptflow.connections import CustomConnection

from phi3flow.tools.chat_endpoint import chat

ANSWER = json.dumps({"output": "Bill Gates and Paul Allen."}).encode()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as a real endpoint
    disable_nagle_algorithm = True  # headers and body go out as separate writes

    def do_POST(self) -> None:  # noqa: N802
        self.rfile.read(int(self.headers["Content-Length"]))
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(ANSWER)))
        self.end_headers()
        self.wfile.write(ANSWER)

    def log_message(self, *args) -> None:
        pass


def timed(call, n: int) -> list[float]:
    for _ in range(20):  # warm-up: connections, imports
        call()
    samples = []
    for _ in range(n):
        start = time.perf_counter()
        call()
        samples.append((time.perf_counter() - start) * 1000)
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=500)
    args = parser.parse_args()
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/score"
    body = {
        "input_data": {
            "input_string": [{"role": "user", "content": "Who founded Microsoft?"}],
            "parameters": {"temperature": 0.7, "top_p": 1.0, "max_new_tokens": 128},
        }
    }
    headers = {"Authorization": "Bearer bench-key"}
    connection = CustomConnection(configs={"endpoint": url}, secrets={"key": "bench-key"})

    raw = timed(lambda: requests.post(url, json=body, headers=headers, timeout=10).json()["output"], args.calls)
    session = requests.Session()
    pooled = timed(lambda: session.post(url, json=body, headers=headers, timeout=10).json()["output"], args.calls)
    tool = timed(lambda: chat(connection, "Who founded Microsoft?"), args.calls)
    server.shutdown()

    p50 = {
        name: statistics.median(s)
        for name, s in [("raw requests.post", raw), ("raw pooled Session.post", pooled), ("tool", tool)]
    }
    for name, value in p50.items():
        print(f"{name:<26} p50 {value:7.3f} ms")
    added = p50["tool"] - p50["raw requests.post"]
    print(f"tool / raw requests.post   {p50['tool'] / p50['raw requests.post']:.2f}x  ({added:+.3f} ms p50 added; goal < 1 ms)")
    print(
        f"tool / pooled Session.post {p50['tool'] / p50['raw pooled Session.post']:.2f}x  ({p50['tool'] - p50['raw pooled Session.post']:+.3f} ms)"
    )


if __name__ == "__main__":
    main()
