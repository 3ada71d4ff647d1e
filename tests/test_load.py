"""The scoring path under concurrent load: every answer goes back to the request that asked it; a full queue says 503."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from conftest import SECRET
from phi3flow.client import EndpointClient
from phi3flow.serve import LocalEndpoint

pytestmark = [pytest.mark.e2e, pytest.mark.model]
CAPITALS = {"France": "Paris", "Japan": "Tokyo", "Germany": "Berlin", "Egypt": "Cairo", "Kenya": "Nairobi"}


def test_16_concurrent_clients_get_their_own_answers(embedded_dir, tmp_path):
    with LocalEndpoint(embedded_dir, key=SECRET, log_file=tmp_path / "server.log", threads=32) as endpoint:
        client = EndpointClient(endpoint.url, SECRET, pool_size=16)
        countries = [list(CAPITALS)[i % len(CAPITALS)] for i in range(32)]

        def ask(country: str) -> str:
            return client.chat(
                [{"role": "user", "content": f"What is the capital of {country}?"}], temperature=0, max_new_tokens=16
            )

        with ThreadPoolExecutor(16) as pool:
            answers = list(pool.map(ask, countries))
    for country, answer in zip(countries, answers):
        assert CAPITALS[country] in answer, (country, answer)
        assert not any(other in answer for other in CAPITALS.values() if other != CAPITALS[country])


def test_full_queue_answers_503_with_retry_after(embedded_dir, tmp_path):
    tight = {"PHI3FLOW_MAX_BATCH": "1", "PHI3FLOW_MAX_QUEUE": "1"}
    with LocalEndpoint(embedded_dir, key=SECRET, log_file=tmp_path / "server.log", threads=8, env=tight) as endpoint:
        body = {
            "input_data": {
                "input_string": [{"role": "user", "content": "Count to twenty."}],
                "parameters": {"max_new_tokens": 48},
            }
        }

        def post(_: int) -> requests.Response:
            return requests.post(endpoint.url, json=body, headers={"Authorization": f"Bearer {SECRET}"}, timeout=300)

        with ThreadPoolExecutor(8) as pool:
            responses = list(pool.map(post, range(8)))
    statuses = sorted(r.status_code for r in responses)
    assert set(statuses) == {200, 503}, statuses
    busy = [r for r in responses if r.status_code == 503]
    assert all(r.headers["Retry-After"] == "1" and "busy" in r.json()["message"] for r in busy)


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


def test_long_requests_hold_no_one_back_and_stop_when_their_clients_leave(embedded_dir, tmp_path):
    """8 clients asking for 4,096 sampled tokens: a short greedy request joins their running batch (it is
    answered while they generate), and once those clients hang up their generation stops."""
    import socket
    import time

    with LocalEndpoint(embedded_dir, key=SECRET, log_file=tmp_path / "server.log", threads=32) as endpoint:
        raw = __import__("json").dumps(LONG).encode()
        host, port = "127.0.0.1", endpoint.port
        clients = []
        for _ in range(8):
            sock = socket.create_connection((host, port))
            sock.sendall(
                f"POST /score HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {SECRET}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(raw)}\r\n\r\n".encode()
                + raw
            )
            clients.append(sock)
        time.sleep(3)
        headers = {"Authorization": f"Bearer {SECRET}"}
        short = requests.post(endpoint.url, json=SHORT, headers=headers, timeout=300)
        assert short.status_code == 200 and "Paris" in short.json()["output"]
        assert int(short.headers["x-phi3flow-batch-size"]) >= 5  # it joined the running long ones
        for sock in clients:
            sock.close()  # the clients leave; nobody will read those answers
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            alone = requests.post(endpoint.url, json=SHORT, headers=headers, timeout=300)
            if alone.headers["x-phi3flow-batch-size"] == "1":
                break
        assert alone.headers["x-phi3flow-batch-size"] == "1"  # the long ones were dropped, not run to 4,096 tokens
