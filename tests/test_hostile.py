"""Hostile and unlucky use of `phi3flow serve` and `connect`, against real servers and processes: keys never on a
command line or in the log, idle and slow clients cannot take the server over, the server dies with `serve`,
and a port another server holds is refused."""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import psutil
import pytest
import requests

from conftest import SECRET, Trickle
from phi3flow import connect, serve
from phi3flow.serve import HOST, LocalEndpoint, free_port
from phi3serve.gunicorn_config import GRACE_S
from phi3serve.gunicorn_worker import HEAD_TIMEOUT_S

QUESTION = {
    "input_data": {
        "input_string": [{"role": "user", "content": "What is the capital of France?"}],
        "parameters": {"temperature": 0, "max_new_tokens": 8},
    }
}
AUTH = {"Authorization": f"Bearer {SECRET}"}


# --- keys: never on a command line, never with stray whitespace ------------------------------------------


@pytest.mark.parametrize("command", [serve.main, connect.main])
@pytest.mark.parametrize("key", [" padded", "padded ", "tab\t", "\n"])
def test_a_key_with_surrounding_whitespace_is_refused_at_start(command, key, monkeypatch, capsys):
    monkeypatch.setenv(connect.KEY_ENV, key)
    with pytest.raises(SystemExit) as exit_:
        command(["--endpoint", "http://127.0.0.1:1/score"] if command is connect.main else [])
    assert exit_.value.code == 2
    message = capsys.readouterr().err
    assert "whitespace" in message or "empty" in message
    assert f"${connect.KEY_ENV}" in message


def test_key_file_and_standard_input_give_the_key_without_its_line_break(tmp_path, monkeypatch):
    monkeypatch.delenv(connect.KEY_ENV, raising=False)
    monkeypatch.setattr("phi3flow.connect.create_connection", lambda endpoint, key, name: stored.update({name: key}))
    stored: dict[str, str] = {}
    key_file = tmp_path / "key"
    key_file.write_text(SECRET + "\r\n")
    assert connect.main(["--endpoint", "http://127.0.0.1:1/score", "--key-file", str(key_file), "--name", "from_file"]) == 0
    monkeypatch.setattr("sys.stdin", io.StringIO(SECRET + "\n"))
    assert connect.main(["--endpoint", "http://127.0.0.1:1/score", "--key-file", "-", "--name", "from_stdin"]) == 0
    assert stored == {"from_file": SECRET, "from_stdin": SECRET}


def test_key_on_the_command_line_still_works_but_warns(monkeypatch, capsys):
    monkeypatch.setattr("phi3flow.connect.create_connection", lambda endpoint, key, name: None)
    assert connect.main(["--endpoint", "http://127.0.0.1:1/score", "--key", SECRET]) == 0
    assert "ps" in capsys.readouterr().err


def test_no_key_anywhere_says_where_to_put_one(monkeypatch, capsys):
    monkeypatch.delenv(connect.KEY_ENV, raising=False)
    monkeypatch.setattr("sys.stdin", io.StringIO(""))  # not a terminal: nobody to ask
    with pytest.raises(SystemExit):
        connect.main(["--endpoint", "http://127.0.0.1:1/score"])
    assert connect.KEY_ENV in capsys.readouterr().err


# --- idle and slow clients, query-string keys (one real server) ------------------------------------------


@pytest.fixture(scope="module")
def served(embedded_dir, tmp_path_factory):
    log = tmp_path_factory.mktemp("server") / "server.log"
    with LocalEndpoint(embedded_dir, key=SECRET, log_file=log) as endpoint:
        yield endpoint, log


BODY_HEAD = f"POST /score HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {SECRET}\r\nContent-Length: 50000\r\n\r\n".encode()


class Drip:
    """`count` connections that send `at_once`, then `dripped` one byte every `interval` s, until closed."""

    def __init__(self, port: int, count: int, at_once: bytes, dripped: bytes, interval: float = 2.0):
        self.sockets = [socket.create_connection((HOST, port)) for _ in range(count)]
        for sock in self.sockets:
            sock.sendall(at_once)
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._drip, args=(dripped, interval), daemon=True)
        self.thread.start()

    def _drip(self, request: bytes, interval: float) -> None:
        for position in range(len(request)):
            for sock in self.sockets:
                try:
                    sock.sendall(request[position : position + 1])
                except OSError:
                    pass
            if self.stopped.wait(interval):
                return

    def close(self) -> None:
        self.stopped.set()
        self.thread.join()
        for sock in self.sockets:
            sock.close()


@pytest.mark.e2e
@pytest.mark.model
def test_idle_slow_header_and_slow_body_connections_leave_the_server_answering(served):
    endpoint, _ = served
    idle = [socket.create_connection((HOST, endpoint.port)) for _ in range(200)]
    slow_heads = Drip(endpoint.port, 40, b"", b"POST /score HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 100_000)
    slow_bodies = Drip(endpoint.port, 40, BODY_HEAD, b" " * 50_000)
    try:
        time.sleep(1.0)
        # gunicorn's own threaded worker never answers this while they keep dripping (every thread waits on one)
        response = requests.post(endpoint.url, json=QUESTION, headers=AUTH, timeout=60)
        assert response.status_code == 200 and "Paris" in response.json()["output"]
        time.sleep(HEAD_TIMEOUT_S + 2)  # then the server gives up on heads that do not arrive
        for sock in [idle[0], slow_heads.sockets[0]]:
            sock.settimeout(5)
            assert sock.recv(200).startswith(b"HTTP/1.1 408")
    finally:
        slow_heads.close()
        slow_bodies.close()
        for sock in idle:
            sock.close()


@pytest.mark.e2e
@pytest.mark.model
def test_a_key_sent_in_the_query_string_is_not_logged(served):
    endpoint, log = served
    leaked = "query-string-key-0123456789"
    response = requests.post(
        f"{endpoint.url}?key={leaked}&subscription-key={leaked}",
        json=QUESTION,
        headers={**AUTH, "Referer": f"https://example.com/?key={leaked}"},
        timeout=60,
    )
    assert response.status_code == 200
    time.sleep(0.5)  # the log lines follow the answer
    text = log.read_text()
    assert "POST /score 200" in text and '"POST /score HTTP/1.1" 200' in text  # both request lines are there...
    assert leaked not in text and SECRET not in text  # ...without the query string


@pytest.mark.e2e
@pytest.mark.model
def test_a_chunked_body_over_the_limit_is_refused_without_reading_it_all(served):
    endpoint, _ = served
    sock = socket.create_connection((HOST, endpoint.port))
    sock.sendall(
        f"POST /score HTTP/1.1\r\nHost: {HOST}\r\nAuthorization: Bearer {SECRET}\r\n"
        "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n".encode()
    )
    chunk = b"100000\r\n" + b"[" * (1 << 20) + b"\r\n"
    sent = 0
    try:
        for sent in range(1, 65):  # noqa: B007 - read after the loop: how much was sent before the server closed
            sock.sendall(chunk)
    except OSError:
        pass  # the server answered and closed the connection: it read no further
    sock.settimeout(30)
    status = sock.recv(200).split(b"\r\n", 1)[0]
    sock.close()
    assert status.startswith(b"HTTP/1.1 413")
    assert sent < 64


def _exchange(port: int, request: bytes, pause: float = 0.0, rest: bytes = b"") -> tuple[bytes, float]:
    """(the raw answer, seconds until its first byte) for `request`, then `rest` after `pause` s if still connected."""
    with socket.create_connection((HOST, port)) as sock:
        sock.settimeout(30)
        started = time.monotonic()
        sock.sendall(request)
        if rest:
            time.sleep(pause)
            try:
                sock.sendall(rest)
            except OSError:
                pass
        first = sock.recv(65536)
        took = time.monotonic() - started
        answer = first
        while chunk := sock.recv(65536):
            answer += chunk
    return answer, took


def _head(method: str = "POST", path: str = "/score", **headers: str) -> bytes:
    lines = [
        f"{method} {path} HTTP/1.1",
        f"Host: {HOST}",
        *(f"{name.replace('_', '-')}: {value}" for name, value in headers.items()),
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


@pytest.mark.e2e
@pytest.mark.model
def test_a_body_without_the_key_is_refused_before_it_is_read(served):
    """A 1 MiB body announced without the key: 401 at once, with no byte of the body sent; health probes pass."""
    endpoint, _ = served
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"api_key": "wrong"}, {"Authorization": f"Basic {SECRET}"}):
        answer, took = _exchange(endpoint.port, _head(Content_Length=str(1 << 20), **headers))
        assert answer.startswith(b"HTTP/1.1 401") and took < 2, answer[:200]
        assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["message"].startswith("missing or wrong key")
    answer, _ = _exchange(endpoint.port, _head(Transfer_Encoding="chunked", Authorization="Bearer wrong"))
    assert answer.startswith(b"HTTP/1.1 401")
    assert requests.get(f"http://{HOST}:{endpoint.port}/", timeout=30).status_code == 200  # health needs no key
    pipelined, _ = _exchange(endpoint.port, _head("GET", "/") + _head(Content_Length=str(1 << 20), api_key="wrong"))
    refused = pipelined[pipelined.index(b"HTTP/1.1 401") :]  # behind a request, the same rule: the worker answers
    assert pipelined.startswith(b"HTTP/1.1 200") and b"Server: gunicorn" not in refused
    body = json.dumps(QUESTION).encode()
    for key_header in (AUTH, {"api-key": SECRET}):  # both spellings of the key reach the model
        response = requests.post(endpoint.url, data=body, headers={**key_header, "Content-Type": "application/json"}, timeout=60)
        assert response.status_code == 200 and "Paris" in response.json()["output"]


@pytest.mark.e2e
@pytest.mark.model
def test_oversized_and_malformed_bodies_get_a_4xx_and_never_a_500(served):
    endpoint, _ = served
    answer, took = _exchange(endpoint.port, _head(Content_Length=str((1 << 20) + 1), **AUTH))
    assert answer.startswith(b"HTTP/1.1 413") and took < 2
    chunked = _head(Transfer_Encoding="chunked", Content_Type="application/json", **AUTH)
    for framing in (b"zz\r\n{}\r\n0\r\n\r\n", b"2\r\n{}xx\r\n0\r\n\r\n", b"-1\r\n{}\r\n0\r\n\r\n"):
        answer, _ = _exchange(endpoint.port, chunked + framing)
        assert answer.startswith(b"HTTP/1.1 400") and b"chunk" in answer, answer[:300]
    answer, _ = _exchange(endpoint.port, _head(Content_Length="12", Transfer_Encoding="chunked", **AUTH) + b"0\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 400")
    answer, _ = _exchange(endpoint.port, _head(X_Big="a" * 70_000, **AUTH))
    assert answer.startswith(b"HTTP/1.1 431")
    body = json.dumps(QUESTION).encode()
    framed = b"".join(b"%x\r\n%s\r\n" % (len(body[i : i + 7]), body[i : i + 7]) for i in range(0, len(body), 7)) + b"0\r\n\r\n"
    answer, _ = _exchange(endpoint.port, chunked + framed)  # valid chunks still answer
    assert answer.startswith(b"HTTP/1.1 200") and b"Paris" in answer, answer[:300]
    expect = _head(Content_Length=str(len(body)), Expect="100-continue", Content_Type="application/json", **AUTH)
    answer, _ = _exchange(endpoint.port, expect, pause=0.5, rest=body)  # the worker says continue, and only once
    assert answer.startswith(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200") and b"Paris" in answer, answer[:300]


@pytest.mark.e2e
@pytest.mark.model
def test_wrong_key_uploads_trickling_hold_no_thread(served):
    """50 clients announcing 1 MiB with a wrong key, each sending 70 KB then a byte a second and reconnecting when cut
    off: a normal request still answers within 4x its time alone."""
    endpoint, _ = served
    alone = min(_timed_question(endpoint) for _ in range(2))
    attack = Trickle(endpoint.port, 50, _head(Content_Length=str(1 << 20), Authorization="Bearer wrong-key"))
    try:
        time.sleep(1.0)
        attacked = min(_timed_question(endpoint) for _ in range(2))
        deadline = time.monotonic() + 15
        while attack.refused < 50 and time.monotonic() < deadline:  # each is cut off after the 401 (and its linger)
            time.sleep(0.2)
    finally:
        attack.close()
    assert attacked < 4 * alone, (alone, attacked)
    assert attack.refused >= 50


def _timed_question(endpoint) -> float:
    started = time.monotonic()
    response = requests.post(endpoint.url, json=QUESTION, headers=AUTH, timeout=60)
    assert response.status_code == 200
    return time.monotonic() - started


# --- the server dies with `serve`, and `serve` refuses a port another server holds -----------------------


def _serve(port: int, **env: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "phi3flow.cli", "serve", "--port", str(port)],
        env={**os.environ, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.mark.e2e
@pytest.mark.model
@pytest.mark.parametrize("signum", [signal.SIGKILL, signal.SIGHUP])
def test_the_server_dies_with_serve_and_its_port_is_guarded(embedded_dir, signum):
    port = free_port()
    first = _serve(port, **{connect.KEY_ENV: SECRET})
    try:
        for line in first.stdout:
            if line.startswith("Scoring URL"):
                break
        else:
            pytest.fail(f"serve exited: {first.stderr.read()[-2000:]}")
        server = psutil.Process(first.pid).children(recursive=True)
        assert server and all(p.is_running() for p in server)
        command_lines = " ".join(" ".join(p.info["cmdline"] or []) for p in psutil.process_iter(["cmdline"]))
        assert SECRET not in command_lines  # the key is in no process's command line

        second = _serve(port, **{connect.KEY_ENV: "other-key"})
        out, err = second.communicate(timeout=120)
        assert second.returncode == 1 and f"port {port}" in err and "already in use" in err and "Scoring URL" not in out

        first.send_signal(signum)
        gone, alive = psutil.wait_procs(server, timeout=60)
        assert not alive, f"still running after serve died: {[p.cmdline() for p in alive]}"
        serve.check_port_free(port)  # and the port is free again
    finally:
        if first.poll() is None:
            first.kill()
        first.wait()


@pytest.mark.e2e
@pytest.mark.model
def test_sigterm_drains_then_frees_the_port(embedded_dir):
    """SIGTERM to `serve` mid-request: the port closes at once, a short request in flight finishes, a long one gets a
    complete 503 JSON answer at the drain time, and everything has exited by gunicorn's grace (drain + GRACE_S, after
    which it kills the worker; the worker's own exit takes a few seconds of interpreter teardown)."""
    port, drain = free_port(), 20.0  # the short request finishes well within it, even on a loaded machine
    server = _serve(port, **{connect.KEY_ENV: SECRET, "PHI3FLOW_DRAIN_S": str(drain)})
    try:
        for line in server.stdout:
            if line.startswith("Scoring URL"):
                break
        else:
            pytest.fail(f"serve exited: {server.stderr.read()[-2000:]}")
        url, answers = f"http://{HOST}:{port}/score", {}

        def ask(name: str, content: str, tokens: int) -> None:
            body = {
                "input_data": {
                    "input_string": [{"role": "user", "content": content}],
                    "parameters": {"temperature": 0, "max_new_tokens": tokens},
                }
            }
            response = requests.post(url, json=body, headers=AUTH, timeout=120)
            answers[name] = (response.status_code, response.headers.get("Content-Type"), response.json())

        story = threading.Thread(target=ask, args=("long", "Write a long story about a dragon and a knight.", 1000))
        story.start()
        time.sleep(1.5)  # it is generating
        short = threading.Thread(target=ask, args=("short", "What is the capital of France?", 4))
        short.start()
        time.sleep(0.3)
        stopped = time.monotonic()
        server.send_signal(signal.SIGTERM)
        with pytest.raises(OSError):  # no longer accepting
            deadline = time.monotonic() + 2.0
            while time.monotonic() < deadline:
                socket.create_connection((HOST, port), timeout=1).close()
                time.sleep(0.1)
        story.join(timeout=60)
        short.join(timeout=60)
        server.wait(timeout=60)
        exited = time.monotonic() - stopped
    finally:
        if server.poll() is None:
            server.kill()
        server.wait()
    assert answers["short"][0] == 200 and answers["short"][2]["output"], answers
    status, media, payload = answers["long"]
    assert (status, media) == (503, "application/json") and "shutting down" in payload["message"], answers["long"]
    assert drain < exited < drain + GRACE_S + 2, exited
    serve.check_port_free(port)
