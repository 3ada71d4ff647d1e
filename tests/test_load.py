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
            return client.chat([{"role": "user", "content": f"What is the capital of {country}?"}], temperature=0, max_new_tokens=16)

        with ThreadPoolExecutor(16) as pool:
            answers = list(pool.map(ask, countries))
    for country, answer in zip(countries, answers):
        assert CAPITALS[country] in answer, (country, answer)
        assert not any(other in answer for other in CAPITALS.values() if other != CAPITALS[country])


def test_full_queue_answers_503_with_retry_after(embedded_dir, tmp_path):
    tight = {"PHI3FLOW_MAX_BATCH": "1", "PHI3FLOW_MAX_QUEUE": "1"}
    with LocalEndpoint(embedded_dir, key=SECRET, log_file=tmp_path / "server.log", threads=8, env=tight) as endpoint:
        body = {"input_data": {"input_string": [{"role": "user", "content": "Count to twenty."}], "parameters": {"max_new_tokens": 48}}}

        def post(_: int) -> requests.Response:
            return requests.post(endpoint.url, json=body, headers={"Authorization": f"Bearer {SECRET}"}, timeout=300)

        with ThreadPoolExecutor(8) as pool:
            responses = list(pool.map(post, range(8)))
    statuses = sorted(r.status_code for r in responses)
    assert set(statuses) == {200, 503}, statuses
    busy = [r for r in responses if r.status_code == 503]
    assert all(r.headers["Retry-After"] == "1" and "busy" in r.json()["message"] for r in busy)
