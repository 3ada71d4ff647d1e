"""Hostile and unlucky use of `phi3flow serve` and `connect`, against real servers and processes: keys never on a
command line or in the log, idle and slow clients cannot take the server over, the server dies with `serve`,
and a port another server holds is refused."""

from __future__ import annotations

import io
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

from conftest import SECRET
from phi3flow import connect
from phi3flow.deploy import serve
from phi3flow.deploy.gunicorn_worker import HEAD_TIMEOUT_S
from phi3flow.deploy.serve import HOST, LocalEndpoint, free_port

QUESTION = {"input_data": {"input_string": [{"role": "user", "content": "What is the capital of France?"}],
                           "parameters": {"temperature": 0, "max_new_tokens": 8}}}
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
                    sock.sendall(request[position:position + 1])
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
    response = requests.post(f"{endpoint.url}?key={leaked}&subscription-key={leaked}", json=QUESTION,
                             headers={**AUTH, "Referer": f"https://example.com/?key={leaked}"}, timeout=60)
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
    sock.sendall(f"POST /score HTTP/1.1\r\nHost: {HOST}\r\nAuthorization: Bearer {SECRET}\r\n"
                 "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n".encode())
    chunk = b"100000\r\n" + b"[" * (1 << 20) + b"\r\n"
    sent = 0
    try:
        for sent in range(1, 65):  # 64 MiB offered
            sock.sendall(chunk)
    except OSError:
        pass  # the server answered and closed the connection: it read no further
    sock.settimeout(30)
    status = sock.recv(200).split(b"\r\n", 1)[0]
    sock.close()
    assert status.startswith(b"HTTP/1.1 413")
    assert sent < 64


# --- the server dies with `serve`, and `serve` refuses a port another server holds -----------------------

def _serve(port: int, **env: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "phi3flow.cli", "serve", "--port", str(port)], env={**os.environ, **env},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


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
