"""End to end: `phi3flow serve` (real azmlinfsrv, embedded model) + `pf connection create` + `pf flow test`."""

from __future__ import annotations

import json
import subprocess
import sys

import psutil
import pytest
import requests

from conftest import REPO, SECRET, pf, pf_connection, served_locally

pytestmark = [pytest.mark.e2e, pytest.mark.model]
QUESTION = {
    "input_data": {
        "input_string": [{"role": "user", "content": "Who founded Microsoft?"}],
        "parameters": {"temperature": 0, "max_new_tokens": 24},
    }
}


@pytest.fixture(scope="module")
def served(embedded_dir, tmp_path_factory):
    with served_locally(embedded_dir, tmp_path_factory) as endpoint:
        yield endpoint


@pytest.fixture(scope="module")
def connection(served):
    with pf_connection(served.url, served.key) as name:
        yield name


def test_endpoint_answers_with_the_contract(served):
    response = requests.post(served.url, json=QUESTION, headers={"Authorization": f"Bearer {SECRET}"}, timeout=120)
    assert response.status_code == 200 and "Gates" in response.json()["output"]
    assert requests.get(f"http://127.0.0.1:{served.port}/", timeout=10).status_code == 200


@pytest.mark.parametrize("header", [None, "", f"Basic {SECRET}", "Bearer wrong", "Bearer ", f"Bearer {SECRET}x", SECRET])
def test_key_check_cannot_be_bypassed(served, header):
    headers = {} if header is None else {"Authorization": header}
    response = requests.post(served.url, json=QUESTION, headers=headers, timeout=30)
    assert response.status_code == 401 and response.headers["WWW-Authenticate"] == "Bearer"


def test_bad_input_over_http_is_4xx_never_500(served):
    auth = {"Authorization": f"Bearer {SECRET}"}
    bad = [b"{oops", b"{}", json.dumps({"input_data": {"input_string": []}}).encode(), b"x" * (2 << 20)]
    for raw in bad:
        response = requests.post(served.url, data=raw, headers=auth, timeout=30)
        assert 400 <= response.status_code < 500, (raw[:20], response.status_code)
        assert "Traceback" not in response.text
    assert requests.get(served.url, headers=auth, timeout=30).status_code == 405


def test_server_listens_on_loopback_only(served):
    addresses = {
        conn.laddr.ip
        for proc in [psutil.Process(served.process.pid), *psutil.Process(served.process.pid).children(recursive=True)]
        for conn in proc.net_connections(kind="tcp")
        if conn.status == psutil.CONN_LISTEN
    }
    assert addresses == {"127.0.0.1"}


def test_tool_is_listed_by_pf():
    result = pf("tool", "list")
    assert result.returncode == 0 and "phi3flow.tools.chat_endpoint.chat" in result.stdout


def test_pf_flow_test_single_turn(connection):
    result = pf("flow", "test", "--flow", "flows/chat")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Gates" in json.loads((REPO / "flows/chat/.promptflow/flow.output.json").read_text())["answer"]


def test_pf_flow_test_with_chat_history(connection):
    history = [
        {"inputs": {"input_data": "Let's talk about Paris."}, "outputs": {"answer": "Sure, Paris is the capital of France."}}
    ]
    result = pf(
        "flow",
        "test",
        "--flow",
        "flows/chat",
        "--inputs",
        "input_data=Which country is it the capital of?",
        f"chat_history={json.dumps(history)}",
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "France" in json.loads((REPO / "flows/chat/.promptflow/flow.output.json").read_text())["answer"]


def test_serve_cli_generates_key_and_prints_url(embedded_dir):
    process = subprocess.Popen(
        [sys.executable, "-m", "phi3flow.cli", "serve", "--model-dir", str(embedded_dir), "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        start_new_session=True,
    )
    try:
        lines = [process.stdout.readline() for _ in range(2)]
        key = lines[0].split(": ", 1)[1].strip()
        assert lines[0].startswith("Generated endpoint key (shown once): ") and len(key) >= 32
        url = lines[1].split(": ", 1)[1].strip()
        assert url.startswith("http://127.0.0.1:") and url.endswith("/score")
        ok = requests.post(url, json=QUESTION, headers={"Authorization": f"Bearer {key}"}, timeout=120)
        assert ok.status_code == 200
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_demo_runs_the_whole_chain_and_cleans_up():
    """`make demo`'s job: endpoint -> connection -> pf flow test -> answer, then nothing left running.

    Kept last in this module: it re-points the phi3_endpoint connection at its own endpoint, which it then stops."""
    result = subprocess.run([sys.executable, "-m", "phi3flow.cli", "demo"], capture_output=True, text=True, cwd=REPO, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    answer = result.stdout.split("\nA: ", 1)[1]
    assert "Gates" in answer
    port = int(result.stdout.split("ready at http://127.0.0.1:", 1)[1].split("/", 1)[0])
    with pytest.raises(requests.ConnectionError):  # the demo's endpoint is gone
        requests.get(f"http://127.0.0.1:{port}/", timeout=5)
