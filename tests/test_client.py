"""The endpoint client and the Prompt Flow tool against a scripted local HTTP server."""

from __future__ import annotations

import logging
import socket
import threading
import time
import warnings

import pytest
from promptflow.connections import CustomConnection

from conftest import SECRET, Reply
from phi3flow.client import BatchDependentAnswers, EndpointClient, EndpointError, to_messages
from phi3flow.tools.chat_endpoint import chat

USER = [{"role": "user", "content": "Who founded Microsoft?"}]


def client(endpoint, **options) -> EndpointClient:
    options = {"backoff_factor": 0.01, "max_backoff": 2.0, **options}
    return EndpointClient(endpoint.url, SECRET, **options)


def test_success_speaks_the_contract(endpoint):
    endpoint.script = [Reply(body={"output": "Bill Gates and Paul Allen."})]
    answer = client(endpoint).chat(USER, temperature=0.7, max_new_tokens=128)
    assert answer == "Bill Gates and Paul Allen."
    sent = endpoint.requests[0]
    assert sent["headers"]["Authorization"] == f"Bearer {SECRET}"
    assert sent["headers"]["Content-Type"] == "application/json"
    assert sent["body"] == {"input_data": {"input_string": USER, "parameters": {"temperature": 0.7, "max_new_tokens": 128}}}


def test_429_with_retry_after_is_honoured(endpoint):
    endpoint.script = [Reply(429, {"message": "slow down"}, {"Retry-After": "1"}), Reply(body={"output": "after wait"})]
    assert client(endpoint).chat(USER) == "after wait"
    assert len(endpoint.requests) == 2
    assert endpoint.times[1] - endpoint.times[0] >= 0.9


def test_retry_after_is_capped_so_total_time_stays_bounded(endpoint):
    endpoint.script = [Reply(429, {}, {"Retry-After": "3600"}), Reply(body={"output": "ok"})]
    started = time.monotonic()
    assert client(endpoint, max_backoff=0.5).chat(USER) == "ok"
    assert time.monotonic() - started < 5


def test_503s_then_success(endpoint):
    endpoint.script = [Reply(503), Reply(502), Reply(504), Reply(body={"output": "recovered"})]
    assert client(endpoint).chat(USER) == "recovered"
    assert len(endpoint.requests) == 4


def test_retries_are_bounded_and_explained(endpoint):
    endpoint.script = [Reply(503, {"message": "no healthy upstream"})]
    with pytest.raises(EndpointError, match="HTTP 503.*after retrying.*no healthy upstream") as info:
        client(endpoint, retries=2).chat(USER)
    assert info.value.status == 503
    assert len(endpoint.requests) == 3


@pytest.mark.parametrize(
    ("status", "headers", "expected"),
    [
        (401, {}, "refused the key.*check the connection's key"),
        (403, {}, "refused the key"),
        (404, {}, "check the URL; AzureML endpoints end in /score"),
        (408, {}, "request_timeout_ms"),
        (424, {"ms-azureml-model-error-reason": "model_error"}, "container failed.*model_error"),
        (400, {}, "rejected the request.*input_string"),
    ],
)
def test_client_errors_are_actionable_and_not_retried(endpoint, status, headers, expected):
    endpoint.script = [Reply(status, {"message": "input_string must be a list"}, headers)]
    with pytest.raises(EndpointError, match=expected) as info:
        client(endpoint).chat(USER)
    assert info.value.status == status
    assert len(endpoint.requests) == 1


def test_read_timeout_fires_within_its_bound(endpoint):
    endpoint.script = [Reply(delay=3.0)]
    started = time.monotonic()
    with pytest.raises(EndpointError, match="no answer within 0.5 s"):
        client(endpoint, read_timeout=0.5).chat(USER)
    assert time.monotonic() - started < 2.5
    assert len(endpoint.requests) == 1  # no retry on a busy model


def test_unreachable_host_names_host_and_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, never listening: connections are refused
        unreachable = EndpointClient(f"http://127.0.0.1:{port}/score", SECRET, retries=1, backoff_factor=0.01)
        with pytest.raises(EndpointError, match=f"cannot reach 127.0.0.1:{port} \\(connection refused\\)"):
            unreachable.chat(USER)


def test_a_server_that_took_the_request_and_closed_is_not_called_unreachable():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()

        def read_then_close() -> None:
            for _ in range(2):  # the request, and its one retry
                conn, _ = server.accept()
                conn.recv(65536)
                conn.close()

        threading.Thread(target=read_then_close, daemon=True).start()
        port = server.getsockname()[1]
        closing = EndpointClient(f"http://127.0.0.1:{port}/score", SECRET, retries=1, backoff_factor=0.01)
        with pytest.raises(
            EndpointError,
            match=f"127.0.0.1:{port} took the request but closed the connection without an "
            "answer: the server may be restarting or shutting down",
        ) as info:
            closing.chat(USER)
        assert "cannot reach" not in str(info.value)


@pytest.mark.parametrize(("body", "expected"), [({"result": "x"}, 'without a string "output"'), ("<html>", "not JSON")])
def test_success_without_output_is_explained(endpoint, body, expected):
    endpoint.script = [Reply(body=body)]
    with pytest.raises(EndpointError, match=expected):
        client(endpoint).chat(USER)


@pytest.mark.parametrize(
    ("url", "key", "expected"),
    [("localhost:5001", SECRET, "not an http"), ("http://h/score", " ", "key is empty"), ("http://h/score", "kéy", "non-ASCII")],
)
def test_bad_settings_are_refused_up_front(url, key, expected):
    with pytest.raises(EndpointError, match=expected):
        EndpointClient(url, key)


def test_key_never_appears_in_errors_or_logs(endpoint, caplog):
    caplog.set_level(logging.DEBUG)
    messages = []
    for reply in [Reply(401), Reply(404), Reply(424), Reply(503), Reply(body={"nope": 1}), Reply(delay=2.0)]:
        endpoint.script, endpoint.requests = [reply], []
        with pytest.raises(EndpointError) as info:
            client(endpoint, retries=1, read_timeout=0.5).chat(USER)
        messages += [str(info.value), repr(info.value)]
    assert messages
    assert all(SECRET not in text for text in messages)
    assert SECRET not in repr(client(endpoint))
    assert all(SECRET not in record.getMessage() for record in caplog.records)
    assert any("urllib3" in record.name for record in caplog.records)  # the retry machinery did log


def test_chat_history_becomes_role_content_turns():
    history = [{"inputs": {"input_data": "Who founded Microsoft?"}, "outputs": {"answer": "Bill Gates and Paul Allen."}}]
    assert to_messages("In which year?", history, "Be brief.") == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Who founded Microsoft?"},
        {"role": "assistant", "content": "Bill Gates and Paul Allen."},
        {"role": "user", "content": "In which year?"},
    ]
    with pytest.raises(ValueError, match=r"chat_history\[0\]"):
        to_messages("q", [{"question": "no inputs/outputs"}])


def test_tool_calls_endpoint_through_custom_connection(endpoint):
    endpoint.script = [Reply(body={"output": "1975."})]
    connection = CustomConnection(configs={"endpoint": endpoint.url}, secrets={"key": SECRET})
    history = [{"inputs": {"input_data": "Who founded Microsoft?"}, "outputs": {"answer": "Bill Gates."}}]
    assert chat(connection, "In which year?", history, temperature=0.0, max_new_tokens=16) == "1975."
    body = endpoint.requests[0]["body"]["input_data"]
    assert [turn["role"] for turn in body["input_string"]] == ["user", "assistant", "user"]
    assert body["parameters"] == {"temperature": 0.0, "top_p": 1.0, "max_new_tokens": 16}


def test_the_tool_warns_once_when_greedy_answers_depend_on_the_batch(endpoint):
    """`pf run` on a bf16 server gives other greedy answers run to run: the tool says so (once), as `phi3flow eval` does.
    A Python warning, which Prompt Flow shows in a run's output and logs (it drops a tool's log records)."""
    endpoint.script = [Reply(body={"output": "1975."}, headers={"x-phi3flow-batch-invariant": "false"})]
    connection = CustomConnection(configs={"endpoint": endpoint.url}, secrets={"key": SECRET})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        chat(connection, "In which year?", temperature=0.7)  # sampled: differing answers are expected
        assert not caught
        for _ in range(3):
            chat(connection, "In which year?", temperature=0.0)
        assert [w.category for w in caught] == [BatchDependentAnswers]
        assert "x-phi3flow-batch-invariant: false" in str(caught[0].message) and "PHI3FLOW_DTYPE=float32" in str(
            caught[0].message
        )
        endpoint.script = [Reply(body={"output": "1975."}, headers={"x-phi3flow-batch-invariant": "true"})]
        chat(CustomConnection(configs={"endpoint": endpoint.url}, secrets={"key": "another-key"}), "Year?", temperature=0.0)
        assert len(caught) == 1


def test_tool_names_missing_connection_fields():
    with pytest.raises(ValueError, match="configs.endpoint"):
        chat(CustomConnection(configs={}, secrets={"key": SECRET}), "hi")
    with pytest.raises(ValueError, match="secrets.key"):
        chat(CustomConnection(configs={"endpoint": "http://127.0.0.1:1/score"}, secrets={}), "hi")
