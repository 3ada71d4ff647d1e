"""Streaming answers: the server-sent events parser, the client and the tool against a scripted SSE server
(fallback, retries, mid-stream failures, early disconnects), then against the real `phi3flow serve`."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import threading
import time
from urllib.parse import urlsplit

import pytest
import requests
from hypothesis import given
from hypothesis import strategies as st
from promptflow.connections import CustomConnection

from conftest import REPO, SECRET, Reply, pf, pf_connection, served_locally
from phi3flow.client import EndpointClient, EndpointError, ServerSentEvent, parse_sse, to_messages
from phi3flow.offline import pf_executable
from phi3flow.serve import free_port
from phi3flow.tools.chat_endpoint import chat
from phi3serve.contract import BATCH_SIZE_HEADER, STREAM_MEDIA_TYPE

USER = [{"role": "user", "content": "Who founded Microsoft?"}]
SSE = {"Content-Type": f"{STREAM_MEDIA_TYPE}; charset=utf-8"}


def event(name: str, **data) -> str:
    return f"event: {name}\ndata: {json.dumps(data)}\n\n"


def streamed(*pieces: str, done: bool = True) -> list[str]:
    """An SSE body: a delta per piece, then the final event (unless `done` is false)."""
    events = [event("delta", text=piece) for piece in pieces]
    return events + ([event("done", output="".join(pieces), truncated_turns=0, batch_size=1, tokens=len(pieces))] if done else [])


def client(endpoint, **options) -> EndpointClient:
    return EndpointClient(endpoint.url, SECRET, **{"backoff_factor": 0.01, "max_backoff": 0.5, **options})


def failure(endpoint, **options) -> tuple[list[str], EndpointError]:
    """The pieces a stream yielded before it failed, and the error."""
    pieces = []
    with pytest.raises(EndpointError) as info:
        for piece in client(endpoint, **options).chat_stream(USER):
            pieces.append(piece)
    assert SECRET not in str(info.value) + repr(info.value)
    return pieces, info.value


# --- the parser (https://html.spec.whatwg.org/#event-stream-interpretation) ---


def parse(*chunks: bytes | str) -> list[ServerSentEvent]:
    return list(parse_sse(c.encode() if isinstance(c, str) else c for c in chunks))


def test_parser_follows_the_event_stream_rules():
    text = (
        ": a comment\n"
        "event: delta\ndata: one\ndata:two\ndata\n\n"  # multi-line data, no space after the colon, a bare field name
        "id: 7\nretry: 100\nevent: lonely\n\n"  # no data: not dispatched
        'data: {"a": 1}\r\n\r\n'  # CRLF, default type
        "event: done\rdata: x\r\r"  # CR line ends
        "event: cut\ndata: never dispatched\n"
    )  # unfinished at the end of the stream
    assert parse(text) == [
        ServerSentEvent("delta", "one\ntwo\n"),
        ServerSentEvent("message", '{"a": 1}'),
        ServerSentEvent("done", "x"),
    ]


def test_parser_strips_one_bom_and_one_space():
    assert parse("\ufeffdata:  two spaces\n\n") == [ServerSentEvent("message", " two spaces")]


@given(st.lists(st.integers(min_value=1, max_value=40), max_size=30))
def test_parser_gives_the_same_events_however_the_bytes_are_split(cuts):
    """Chunks may end between CR and LF, inside a field name or inside a multi-byte character."""
    data = ('event: delta\r\ndata: {"text": "Grüße, 世界 🌍"}\r\n\r\n: keep-alive\r\revent: done\rdata: a\rdata: b\r\r').encode()
    chunks, start = [], 0
    for size in cuts:
        chunks.append(data[start : start + size])
        start += size
    chunks.append(data[start:])
    assert (
        parse(*chunks) == parse(data) == [ServerSentEvent("delta", '{"text": "Grüße, 世界 🌍"}'), ServerSentEvent("done", "a\nb")]
    )


# --- the client against a scripted server ---


def test_pieces_arrive_as_the_server_sends_them(endpoint):
    endpoint.script = [Reply(body=streamed("Bill", " Gates", " and Paul Allen."), headers=SSE, gap=0.3)]
    arrivals, pieces = [], []
    for piece in client(endpoint).chat_stream(USER, temperature=0.0, max_new_tokens=16):
        arrivals.append(time.monotonic())
        pieces.append(piece)
    assert pieces == ["Bill", " Gates", " and Paul Allen."]
    assert arrivals[-1] - arrivals[0] >= 0.5  # not buffered until the end: the server paused 0.3 s between pieces
    sent = endpoint.requests[0]
    assert sent["headers"]["Accept"] == STREAM_MEDIA_TYPE
    assert sent["headers"]["Authorization"] == f"Bearer {SECRET}"
    assert sent["body"] == {"input_data": {"input_string": USER, "parameters": {"temperature": 0.0, "max_new_tokens": 16}}}


def test_a_server_that_does_not_stream_gives_the_whole_answer_once(endpoint):
    endpoint.script = [Reply(body={"output": "Bill Gates and Paul Allen."}, headers={"Content-Type": "application/json"})]
    assert list(client(endpoint).chat_stream(USER)) == ["Bill Gates and Paul Allen."]
    assert endpoint.requests[0]["headers"]["Accept"] == STREAM_MEDIA_TYPE


def test_final_event_completes_what_the_deltas_left_out(endpoint):
    done_only = [event("done", output="Whole answer.", truncated_turns=0, batch_size=1, tokens=3)]
    endpoint.script = [
        Reply(body=done_only, headers=SSE),
        Reply(body=[event("delta", text="Whole"), event("done", output="Whole answer.")], headers=SSE),
    ]
    assert list(client(endpoint).chat_stream(USER)) == ["Whole answer."]
    assert list(client(endpoint).chat_stream(USER)) == ["Whole", " answer."]


def test_busy_server_is_retried_before_the_stream_starts(endpoint):
    endpoint.script = [
        Reply(503, {"message": "queue full"}, {"Retry-After": "0"}),
        Reply(429),
        Reply(body=streamed("ok"), headers=SSE),
    ]
    assert list(client(endpoint).chat_stream(USER)) == ["ok"]
    assert len(endpoint.requests) == 3


@pytest.mark.parametrize(("status", "expected"), [(401, "refused the key"), (400, "rejected the request.*input_string")])
def test_errors_before_the_stream_keep_their_status(endpoint, status, expected):
    endpoint.script = [Reply(status, {"message": "input_string must be a list"})]
    pieces, error = failure(endpoint)
    assert not pieces and error.status == status and len(endpoint.requests) == 1
    assert re.search(expected, str(error))


def test_error_event_mid_stream_is_raised_with_its_status(endpoint):
    body = [event("delta", text="Bill"), event("error", message="generation failed: CUDA out of memory", status=500)]
    endpoint.script = [Reply(body=body, headers=SSE)]
    pieces, error = failure(endpoint)
    assert pieces == ["Bill"]
    assert error.status == 500
    assert "failed after streaming 4 characters (HTTP 500): generation failed: CUDA out of memory" in str(error)
    assert len(endpoint.requests) == 1  # never retried once pieces were given out


@pytest.mark.parametrize("tail", ["", 'event: delta\ndata: {"text": "half'])
def test_stream_cut_before_its_final_event_is_an_error(endpoint, tail):
    endpoint.script = [Reply(body=[*streamed("Bill", " Gates", done=False), tail], headers=SSE)]
    pieces, error = failure(endpoint)
    assert pieces == ["Bill", " Gates"]
    assert "ended after 10 characters without its final 'done' event: the answer is incomplete" in str(error)
    assert len(endpoint.requests) == 1


def test_connection_broken_mid_stream_is_an_error(endpoint):
    endpoint.script = [Reply(body=streamed("Bill", done=False), headers={**SSE, "Content-Length": "100000"})]  # closes early
    pieces, error = failure(endpoint)
    assert pieces == ["Bill"]
    assert "broke after 4 characters (connection broken): the answer is incomplete" in str(error)
    assert len(endpoint.requests) == 1


def test_silent_server_mid_stream_times_out_with_an_error(endpoint):
    endpoint.script = [Reply(body=streamed("Bill", " Gates"), headers=SSE, gap=2.0)]
    pieces, error = failure(endpoint, read_timeout=0.5)
    assert pieces == ["Bill"]
    assert "broke after 4 characters (timed out): the answer is incomplete" in str(error)
    assert len(endpoint.requests) == 1


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ([event("delta", nope=1)], "'delta' event without a string \"text\" field"),
        (["event: delta\ndata: not json\n\n"], "'delta' event without a string \"text\" field"),
        ([event("delta", text="Bill"), event("done", output="Steve")], "not the start of its final answer"),
    ],
)
def test_streams_off_the_contract_are_explained(endpoint, body, expected):
    endpoint.script = [Reply(body=body, headers=SSE)]
    _, error = failure(endpoint)
    assert expected in str(error) and "streaming contract" in str(error)


def test_closing_the_stream_early_drops_the_connection(endpoint):
    endpoint.script = [Reply(body=streamed(*[f" w{i}" for i in range(40)]), headers=SSE, gap=0.05)]
    pieces = client(endpoint).chat_stream(USER)
    assert next(pieces) == " w0"
    pieces.close()
    deadline = time.monotonic() + 10
    while not endpoint.disconnects and time.monotonic() < deadline:
        time.sleep(0.05)
    assert endpoint.disconnects == 1  # the server's next writes failed: it learns the client left


# --- the Prompt Flow tool ---


def test_tool_streams_only_when_asked(endpoint):
    connection = CustomConnection(configs={"endpoint": endpoint.url}, secrets={"key": SECRET})
    endpoint.script = [Reply(body={"output": "whole"}), Reply(body=streamed("pie", "ces"), headers=SSE)]
    assert chat(connection, "Who?") == "whole"
    assert "Accept" not in endpoint.requests[0]["headers"] or endpoint.requests[0]["headers"]["Accept"] != STREAM_MEDIA_TYPE
    answer = chat(connection, "Who?", stream=True)
    assert not isinstance(answer, str)
    assert list(answer) == ["pie", "ces"]
    assert endpoint.requests[1]["headers"]["Accept"] == STREAM_MEDIA_TYPE


# --- against the real `phi3flow serve` (azmlinfsrv + deploy/score.py, embedded model) ---

QUESTIONS = ["Who founded Microsoft?", "What is the capital of France?", "Name three primary colors."]
LONG = [{"role": "user", "content": "Count from 1 to 400, separated by commas."}]  # an answer far longer than the tests wait


@pytest.fixture(scope="module")
def served(embedded_dir, tmp_path_factory):
    with served_locally(embedded_dir, tmp_path_factory) as local:
        yield local


@pytest.fixture(scope="module")
def real(served) -> EndpointClient:
    return EndpointClient(served.url, served.key)


@pytest.mark.e2e
@pytest.mark.model
@pytest.mark.parametrize("question", QUESTIONS)
def test_streamed_answer_equals_the_json_answer_when_greedy(real, question):
    messages = [{"role": "user", "content": question}]
    pieces = list(real.chat_stream(messages, temperature=0.0, max_new_tokens=48))
    assert len(pieces) > 1 and all(pieces)
    assert "".join(pieces) == real.chat(messages, temperature=0.0, max_new_tokens=48)


def batch_size(served) -> int:
    """The most sequences the server decoded together while answering one short request."""
    response = requests.post(
        served.url,
        json={"input_data": {"input_string": USER, "parameters": {"temperature": 0, "max_new_tokens": 4}}},
        headers={"Authorization": f"Bearer {served.key}"},
        timeout=120,
    )
    assert response.status_code == 200, response.text
    return int(response.headers[BATCH_SIZE_HEADER])


@pytest.mark.e2e
@pytest.mark.model
def test_a_client_that_leaves_frees_its_batch_slot(real, served):
    """A long answer still being read shares the batch with a short request; once its reader leaves, it does not."""
    reading = real.chat_stream(LONG, temperature=0.0, max_new_tokens=1000)
    assert next(reading)
    assert batch_size(served) == 2  # the long answer is being generated beside it
    reading.close()
    deadline = time.monotonic() + 60
    while (size := batch_size(served)) != 1 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert size == 1


class CuttingProxy:
    """A TCP proxy to `url` for one request: it forwards the answer's first `cut_after` bytes, then resets both connections."""

    def __init__(self, url: str, cut_after: int) -> None:
        self.upstream = urlsplit(url)
        self.cut_after = cut_after
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = url.replace(self.upstream.netloc, f"127.0.0.1:{self.listener.getsockname()[1]}")
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        client, _ = self.listener.accept()
        request = b""
        while b"\r\n\r\n" not in request:
            request += client.recv(4096)
        length = int(re.search(rb"content-length:\s*(\d+)", request, re.IGNORECASE).group(1))
        while len(request.partition(b"\r\n\r\n")[2]) < length:
            request += client.recv(4096)
        server = socket.create_connection((self.upstream.hostname, self.upstream.port))
        server.sendall(request)
        forwarded = 0
        while forwarded < self.cut_after and (data := server.recv(min(4096, self.cut_after - forwarded))):
            client.sendall(data)
            forwarded += len(data)
        time.sleep(0.5)  # the client reads what came before the reset (a reset drops unread data)
        for sock in (client, server):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close with a reset
            sock.close()

    def close(self) -> None:
        self.listener.close()


@pytest.mark.e2e
@pytest.mark.model
def test_connection_lost_mid_stream_on_the_real_server_is_an_error(served):
    proxy = CuttingProxy(served.url, cut_after=600)  # the head and the first few events
    try:
        pieces = []
        with pytest.raises(EndpointError) as info:
            for piece in EndpointClient(proxy.url, served.key, retries=0, read_timeout=60).chat_stream(
                LONG, temperature=0.0, max_new_tokens=200
            ):
                pieces.append(piece)
    finally:
        proxy.close()
    assert pieces, "the cut came before the first piece: raise cut_after"
    assert f"broke after {len(''.join(pieces))} characters (connection broken): the answer is incomplete" in str(info.value)
    assert SECRET not in str(info.value)


# --- the chat flow with stream on: `pf flow test`, and `pf flow serve` as the chat UI and Foundry call it ---


@pytest.fixture(scope="module")
def connection(served):
    with pf_connection(served.url, served.key) as name:
        yield name


def flow_answer(real: EndpointClient, question: str) -> str:
    """What the chat flow's node asks for (flows/chat/flow.dag.yaml), as one JSON answer."""
    return real.chat(to_messages(question), temperature=0.0, top_p=1.0, max_new_tokens=128)


@pytest.mark.e2e
@pytest.mark.model
def test_pf_flow_test_with_stream_on_gives_the_whole_answer(connection, real):
    result = pf("flow", "test", "--flow", "flows/chat", "--inputs", "input_data=Who founded Microsoft?", "stream=true")
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads((REPO / "flows/chat/.promptflow/flow.output.json").read_text())["answer"] == flow_answer(
        real, "Who founded Microsoft?"
    )


@pytest.mark.e2e
@pytest.mark.model
def test_served_chat_flow_streams_pieces_to_the_chat_ui(connection, real, tmp_path):
    """`pf flow serve` (the app behind the chat UI and a Foundry deployment) sends the tool's pieces as events."""
    flow = tmp_path / "chat"
    shutil.copytree(REPO / "flows/chat", flow, ignore=shutil.ignore_patterns(".promptflow", "__pycache__", "*.whl"))
    port = free_port()
    with (tmp_path / "serve.log").open("w") as log:
        process = subprocess.Popen(
            [
                pf_executable(),
                "flow",
                "serve",
                "--source",
                str(flow),
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--skip-open-browser",
            ],
            cwd=REPO,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 180
        while not _healthy(f"{url}/health"):
            assert process.poll() is None and time.monotonic() < deadline, (tmp_path / "serve.log").read_text()[-3000:]
            time.sleep(0.5)
        question = "What is the capital of France?"
        with requests.post(
            f"{url}/score",
            json={"input_data": question, "stream": True},
            headers={"Accept": STREAM_MEDIA_TYPE},
            stream=True,
            timeout=300,
        ) as response:
            assert response.status_code == 200 and response.headers["Content-Type"].startswith(STREAM_MEDIA_TYPE)
            pieces = [json.loads(event.data)["answer"] for event in parse_sse(response.iter_content(chunk_size=None))]
        assert len(pieces) > 1
        assert "".join(pieces) == flow_answer(real, question)
    finally:
        os.killpg(process.pid, signal.SIGINT)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def _healthy(url: str) -> bool:
    try:
        return requests.get(url, timeout=2).ok
    except requests.ConnectionError:
        return False
