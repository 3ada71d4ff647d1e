"""A gunicorn threaded worker that idle, slow, unauthenticated and oversized uploads cannot take over.

gunicorn's `gthread` worker gives a connection a thread as soon as it is accepted: the thread waits up to 5 s for
the first byte, then reads the request head with no deadline at all. 200 idle connections, or 40 that send a
header byte every 2 s, leave no thread for real requests. This worker reads whole requests in its event loop,
without threads, and hands a connection to a thread only once its request has arrived:

- The head must arrive within HEAD_TIMEOUT_S of the connection opening (or becoming readable again when kept
  alive), the whole request within READ_TIMEOUT_S, else the client gets a 408. A head over MAX_HEAD_BYTES is a 431.
- A request that announces a body must carry the endpoint key (phi3serve.contract.authorized, the scoring
  script's own check): without it the answer is a 401 as soon as the head is in, and the body is never read.
  Requests without a body (health probes, GET /) reach the app as they are.
- Bodies are read here, up to the contract's MAX_BODY_BYTES: a Content-Length over it is a 413 before any body
  byte is read; a chunked body is followed chunk by chunk (413 past the limit, 400 on invalid framing).
- Each write of the answer waits for the client at most WRITE_TIMEOUT_S.
- Stopping (SIGTERM): the listening sockets close at once (the port is free when the arbiter has closed its copy
  too), requests that arrive whole meanwhile get a 503, kept-alive connections close within 2 s, and the requests
  in flight finish or get the scoring script's 503 within its drain time (phi3serve.settings: PHI3FLOW_DRAIN_S).

Answers the worker gives itself close the connection after lingering up to LINGER_S (up to MAX_DRAIN_BYTES the
client still sends are read and dropped, so the answer is not lost to a reset). Plain HTTP/1.1 only (as azmlinfsrv serves it; TLS
ends before it in Azure).
"""

from __future__ import annotations

import errno
import json
import math
import re
import selectors
import socket
import time
from functools import partial

from gunicorn.http.parser import Parser
from gunicorn.http.unreader import Unreader
from gunicorn.workers.gthread import TConn, ThreadWorker

from phi3serve import openai
from phi3serve.contract import KEY_HEADERS, MAX_BODY_BYTES, authorized
from phi3serve.settings import Settings

HEAD_TIMEOUT_S = 10.0
READ_TIMEOUT_S = 30.0
WRITE_TIMEOUT_S = 30.0
LINGER_S = 2.0  # how long a connection answered by the worker itself is drained before it closes...
MAX_DRAIN_BYTES = 64 * 1024  # ...and how much of what the client still sends is read and dropped meanwhile
MAX_HEAD_BYTES = 64 * 1024  # gunicorn's own limits allow far more, but no client of this server sends such heads
MAX_CHUNK_LINE = 4096  # a chunk-size line with its extensions, or one trailer field
RECV_BYTES = 64 * 1024
EXPECT = re.compile(rb"\r\nexpect:[^\r\n]*", re.IGNORECASE)
HEX = frozenset(b"0123456789abcdefABCDEF")


class Refusal(Exception):
    """A request the worker answers itself, with a JSON {"message"} body as the scoring script's errors have."""

    def __init__(self, status: str, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.headers = status, headers or {}
        self.answer = self.render({"message": message})

    def render(self, payload: dict) -> bytes:
        body = json.dumps(payload).encode()
        extra = "".join(f"{name}: {value}\r\n" for name, value in self.headers.items())
        return (
            f"HTTP/1.1 {self.status}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
            f"Connection: close\r\n{extra}\r\n"
        ).encode() + body

    def answer_to(self, received: bytes) -> bytes:
        """The answer in the shape of the route asked for: OpenAI's error object on its /v1 routes."""
        path = received.lstrip(b"\r\n").split(b" ", 2)[1:2]
        if path and path[0].startswith(b"/v1/"):
            return self.render(openai.error_body(str(self), int(self.status.split()[0])))
        return self.answer


TIMED_OUT = Refusal("408 Request Timeout", f"the request did not arrive within {READ_TIMEOUT_S:.0f} s").answer


def _fields(head: bytes) -> dict[bytes, list[bytes]]:
    """Header values by lower-case name (the request line skipped); gunicorn validates the head again in full."""
    fields: dict[bytes, list[bytes]] = {}
    for line in head.split(b"\r\n")[1:]:
        name, sep, value = line.partition(b":")
        if sep:
            fields.setdefault(name.strip().lower(), []).append(value.strip())
    return fields


class ChunkedBody:
    """Where a chunked body ends, found as its bytes arrive (not decoded: gunicorn's parser does that in the thread)."""

    def __init__(self, start: int):
        self.at = start  # the next chunk-size line (or trailer field) starts here
        self.size = 0  # body bytes in the chunks so far
        self.in_trailer = False

    def end(self, buf: bytearray) -> int | None:
        """The offset just past the body once it is whole, else None; Refusal on invalid framing or past the limit."""
        while True:
            line_end = buf.find(b"\r\n", self.at, self.at + MAX_CHUNK_LINE + 2)
            if line_end < 0:
                if len(buf) - self.at > MAX_CHUNK_LINE:
                    raise Refusal("400 Bad Request", "a chunk-size line or trailer field of the chunked body is too long")
                return None
            line = bytes(buf[self.at : line_end])
            if self.in_trailer:
                self.at = line_end + 2
                if not line:
                    return self.at
                continue
            digits = line.split(b";", 1)[0].rstrip(b" \t")
            if not digits or not HEX.issuperset(digits):
                raise Refusal(
                    "400 Bad Request",
                    f"invalid chunk size {digits[:20].decode('latin-1')!r} in the chunked body: "
                    "each chunk starts with its size in hexadecimal",
                )
            size = self.size + int(digits[:16], 16)
            if len(digits) > 16 or size > MAX_BODY_BYTES:
                raise Refusal("413 Content Too Large", f"the chunked request body is over the {MAX_BODY_BYTES}-byte limit")
            if size == self.size:  # the last chunk: trailer fields follow, then a blank line
                self.in_trailer, self.at = True, line_end + 2
                continue
            data_end = line_end + 2 + size - self.size
            if len(buf) < data_end + 2:
                return None
            if buf[data_end : data_end + 2] != b"\r\n":
                raise Refusal("400 Bad Request", "a chunk of the chunked body is longer than its size says")
            self.size, self.at = size, data_end + 2


class ClientSocket(socket.socket):
    """A client connection whose blocking reads stop at `read_deadline` and whose writes wait at most WRITE_TIMEOUT_S.

    gunicorn switches connections between non-blocking (its event loop) and blocking (its threads) with
    setblocking(); these deadlines apply in blocking mode only."""

    read_deadline = math.inf

    @classmethod
    def adopt(cls, sock: socket.socket) -> ClientSocket:
        return cls(sock.family, sock.type, sock.proto, fileno=sock.detach())

    def recv(self, bufsize: int, flags: int = 0) -> bytes:
        timeout = self.gettimeout()
        if timeout != 0.0:
            remaining = self.read_deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"the request did not arrive within {READ_TIMEOUT_S:.0f} s")
            self.settimeout(remaining if timeout is None else min(timeout, remaining))
        return super().recv(bufsize, flags)

    def sendall(self, data, flags: int = 0) -> None:
        if self.gettimeout() != 0.0:
            self.settimeout(WRITE_TIMEOUT_S)
        super().sendall(data, flags)


class Conn(TConn):
    """gunicorn's connection, with the state of a request while it arrives in the worker's event loop (accept() makes them)."""

    def __init__(self, cfg, sock: ClientSocket, client, server):
        super().__init__(cfg, sock, client, server)
        self.received = bytearray()  # the request's bytes so far (emptied once the parser or a refusal has them)
        self.needed: int | None = None  # bytes that make the request, once the head says
        self.chunked: ChunkedBody | None = None  # where a chunked body ends, once the head says it is chunked
        self.started = 0.0  # when the request began to arrive (time.monotonic())
        self.drained = 0  # bytes read and dropped after the worker's own answer

    @staticmethod
    def of(conn: TConn) -> Conn:
        """gunicorn hands this worker's connections back typed as its TConn: they are all Conns."""
        if not isinstance(conn, Conn):
            raise TypeError(f"not a connection of this worker: {conn!r}")
        return conn

    def expired(self, now: float) -> bool:
        """Past the deadline the worker set when it took the connection into `arriving` or `closing`."""
        return self.timeout is not None and self.timeout <= now


def _unreader(conn: TConn) -> Unreader:
    """The read-ahead buffer of the connection's HTTP/1 parser (init() makes one: this worker serves HTTP/1 only)."""
    if not isinstance(conn.parser, Parser):
        raise TypeError(f"not an HTTP/1 parser: {conn.parser!r}")
    return conn.parser.unreader


class HeadFirstWorker(ThreadWorker):
    """gthread, except that a connection gets a thread only once its request has arrived (see the module's doc)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.key = Settings.from_env().key_bytes
        self.arriving: set[Conn] = set()  # connections whose request is on its way
        self.closing: set[Conn] = set()  # answered by the worker: drained until LINGER_S, then closed

    def accept(self, listener) -> None:
        try:
            sock, client = listener.accept()
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.ECONNABORTED, errno.EWOULDBLOCK):
                raise
            return
        self.nr_conns += 1
        self._await_request(Conn(self.cfg, ClientSocket.adopt(sock), client, listener.getsockname()))

    def on_client_socket_readable(self, conn: TConn, client) -> None:
        """A kept-alive connection starts its next request: it arrives under the same rules."""
        self.poller.unregister(client)
        self.keepalived_conns.remove(conn)
        self._await_request(conn := Conn.of(conn))
        self._read_request(conn, client)  # readable now: a stopping worker must not take it for an idle connection

    def finish_request(self, conn: TConn, fs) -> None:
        """A request pipelined behind the one just answered arrives under the same rules, not in the thread."""
        unreader = _unreader(conn) if not fs.cancelled() and fs.exception() is None and fs.result() is True else None
        if unreader is None or not unreader.buf.getvalue():
            super().finish_request(conn, fs)
            return
        # typeshed's gunicorn stubs are 26.0's: gunicorn 27 added Unreader.take_buffered
        self._await_request(conn := Conn.of(conn), unreader.take_buffered())  # pyright: ignore[reportAttributeAccessIssue]
        self._advance(conn)

    def _await_request(self, conn: Conn, received: bytes = b"") -> None:
        conn.received = bytearray(received)
        conn.needed, conn.chunked = None, None
        conn.started = time.monotonic()
        conn.timeout = conn.started + HEAD_TIMEOUT_S
        conn.sock.setblocking(False)
        self.arriving.add(conn)
        self.poller.register(conn.sock, selectors.EVENT_READ, partial(self._read_request, conn))

    def _read_request(self, conn: Conn, _client) -> None:
        try:
            data = conn.sock.recv(RECV_BYTES)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:  # the client left before its request was whole
            self._drop(conn)
            return
        conn.received += data
        self._advance(conn, len(conn.received) - len(data))

    def _advance(self, conn: Conn, seen: int = 0) -> None:
        """Hand the request to a thread once it is whole; answer it here when it must be refused."""
        try:
            if conn.needed is None and conn.chunked is None and not self._read_head(conn, seen):
                return
            if conn.chunked is not None:
                conn.needed = conn.chunked.end(conn.received)
                if conn.needed is None and len(conn.received) > MAX_HEAD_BYTES + 2 * MAX_BODY_BYTES:
                    raise Refusal("413 Content Too Large", "the chunked request body's framing is too large")
            if conn.needed is None or len(conn.received) < conn.needed:
                return
            if not self.alive:
                raise Refusal("503 Service Unavailable", "the server is shutting down; ask again", {"Retry-After": "1"})
        except Refusal as refusal:
            self._refuse(conn, refusal.answer_to(bytes(conn.received[:MAX_HEAD_BYTES])))
            return
        self.poller.unregister(conn.sock)
        self.arriving.discard(conn)
        conn.init()  # the HTTP/1 parser over this socket (no I/O for plain HTTP); a kept-alive connection has one
        _unreader(conn).unread(bytes(conn.received))
        conn.received = bytearray()
        self.enqueue_req(conn)

    def _read_head(self, conn: Conn, seen: int) -> bool:
        """Once the head is whole: check the key when a body is announced, and how the body ends (False before)."""
        received = conn.received
        first = len(received) - len(received.lstrip(b"\r\n"))  # blank lines before the request line are no head
        end = received.find(b"\r\n\r\n", max(seen - 3, first))
        if end < 0 or end + 4 > MAX_HEAD_BYTES:
            if len(received) >= MAX_HEAD_BYTES:
                raise Refusal("431 Request Header Fields Too Large", f"the request head is over {MAX_HEAD_BYTES} bytes")
            return False
        fields = _fields(bytes(received[first:end]))
        lengths, codings = fields.get(b"content-length", []), fields.get(b"transfer-encoding", [])
        if (codings or any(value != b"0" for value in lengths)) and not authorized(
            self.key, (fields.get(b"authorization") or [None])[0], (fields.get(b"api-key") or [None])[0]
        ):
            raise Refusal("401 Unauthorized", f"missing or wrong key: send {KEY_HEADERS}", {"WWW-Authenticate": "Bearer"})
        if codings and (lengths or b",".join(codings).lower() != b"chunked"):
            raise Refusal("400 Bad Request", "send the body with Content-Length or Transfer-Encoding: chunked (only)")
        if lengths and (len(set(lengths)) > 1 or not lengths[0].isdigit()):
            raise Refusal("400 Bad Request", "Content-Length must be one whole number of bytes")
        if lengths and (len(lengths[0]) > 15 or int(lengths[0]) > MAX_BODY_BYTES):
            raise Refusal("413 Content Too Large", f"the request body is over the {MAX_BODY_BYTES}-byte limit")
        if b"expect" in fields:  # answered here: the client may send its body now (gunicorn must not answer it again)
            head = EXPECT.sub(b"", bytes(received[: end + 2]))
            received[: end + 2] = head
            end = len(head) - 2
            try:
                conn.sock.send(b"HTTP/1.1 100 Continue\r\n\r\n")
            except OSError:
                pass
        if codings:
            conn.chunked = ChunkedBody(end + 4)
        else:
            conn.needed = end + 4 + (int(lengths[0]) if lengths else 0)
        conn.timeout = conn.started + READ_TIMEOUT_S
        return True

    def _refuse(self, conn: Conn, answer: bytes) -> None:
        """Answer, then drain what the client still sends for up to LINGER_S and close: no thread, no body kept."""
        self.arriving.discard(conn)
        self.poller.modify(conn.sock, selectors.EVENT_READ, partial(self._discard, conn))
        try:
            conn.sock.send(answer)
            conn.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        conn.received, conn.drained, conn.timeout = bytearray(), 0, time.monotonic() + LINGER_S
        self.closing.add(conn)

    def _discard(self, conn: Conn, _client) -> None:
        try:
            conn.drained += len(data := conn.sock.recv(RECV_BYTES))
            if data and conn.drained <= MAX_DRAIN_BYTES:
                return
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            pass
        self._drop(conn)

    def _drop(self, conn: Conn, answer: bytes = b"") -> None:
        self.poller.unregister(conn.sock)
        self.arriving.discard(conn)
        self.closing.discard(conn)
        if answer:
            try:
                conn.sock.send(answer)
            except OSError:
                pass
        self.nr_conns -= 1
        conn.close()

    def set_accept_enabled(self, enabled: bool | None) -> None:
        """Stopping, the listening sockets close at once: the port is free without waiting for requests in flight."""
        super().set_accept_enabled(enabled)
        if not enabled and not self.alive:
            for listener in self.sockets:
                listener.close()

    def murder_pending(self) -> None:
        """Also close connections whose request did not arrive in time (with a 408 where the client still listens),
        lingering ones past LINGER_S, and, stopping, the connections that have sent nothing."""
        super().murder_pending()
        now = time.monotonic()
        for conn in [conn for conn in self.arriving if conn.expired(now) or not (self.alive or conn.received)]:
            self._drop(conn, TIMED_OUT if conn.expired(now) else b"")
        for conn in [conn for conn in self.closing if conn.expired(now)]:
            self._drop(conn)

    def handle(self, conn: TConn) -> bool:
        if not isinstance(conn.sock, ClientSocket):  # accept() adopts every client socket; gunicorn types it socket
            raise TypeError(f"not a client socket of this worker: {conn.sock!r}")
        conn.sock.read_deadline = time.monotonic() + READ_TIMEOUT_S
        return super().handle(conn)
