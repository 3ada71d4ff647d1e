"""A gunicorn threaded worker that idle and slow clients cannot take over.

gunicorn's `gthread` worker gives a connection a thread as soon as it is accepted: the thread waits up to 5 s for
the first byte, then reads the request head with no deadline at all. 200 idle connections, or 40 that send a
header byte every 2 s, leave no thread for real requests. This worker reads requests in its event loop, without
threads, and hands a connection to a thread only once its request has arrived: the head, and the body too when
head and body fit in MAX_PREREAD_BYTES (chat requests do); larger bodies are read by the thread. The head must
arrive within HEAD_TIMEOUT_S of the connection opening (or becoming readable again when kept alive), the whole
request within READ_TIMEOUT_S, else the client gets a 408; each write of the answer waits for the client at most
WRITE_TIMEOUT_S. Plain HTTP/1.1 only (as azmlinfsrv serves it; TLS ends before it in Azure).
"""

from __future__ import annotations

import errno
import math
import re
import selectors
import socket
import time
from functools import partial

from gunicorn.workers.gthread import ThreadWorker, TConn

HEAD_TIMEOUT_S = 10.0
READ_TIMEOUT_S = 30.0
WRITE_TIMEOUT_S = 30.0
# Requests up to this size arrive whole before a thread sees them (it bounds what waiting connections hold); a head
# that does not end within it goes to a thread as it is, for gunicorn's own header limits to answer.
MAX_PREREAD_BYTES = 64 * 1024
TIMED_OUT = b"HTTP/1.1 408 Request Timeout\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
CONTENT_LENGTH = re.compile(rb"\r\ncontent-length:[ \t]*(\d+)[ \t]*\r\n", re.IGNORECASE)


class ClientSocket(socket.socket):
    """A client connection whose blocking reads stop at `read_deadline` and whose writes wait at most WRITE_TIMEOUT_S.

    gunicorn switches connections between non-blocking (its event loop) and blocking (its threads) with
    setblocking(); these deadlines apply in blocking mode only."""

    read_deadline = math.inf

    @classmethod
    def adopt(cls, sock: socket.socket) -> "ClientSocket":
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


class HeadFirstWorker(ThreadWorker):
    """gthread, except that a connection gets a thread only once its request has arrived (see the module's doc)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.arriving: set[TConn] = set()  # connections whose request is on its way

    def accept(self, listener) -> None:
        try:
            sock, client = listener.accept()
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.ECONNABORTED, errno.EWOULDBLOCK):
                raise
            return
        self.nr_conns += 1
        self._await_request(TConn(self.cfg, ClientSocket.adopt(sock), client, listener.getsockname()))

    def on_client_socket_readable(self, conn: TConn, client) -> None:
        """A kept-alive connection starts its next request: it arrives under the same rules."""
        self.poller.unregister(client)
        self.keepalived_conns.remove(conn)
        self._await_request(conn)

    def _await_request(self, conn: TConn) -> None:
        conn.received, conn.needed = bytearray(), None  # bytes so far; how many make the request, once the head says
        conn.started = time.monotonic()
        conn.timeout = conn.started + HEAD_TIMEOUT_S
        conn.sock.setblocking(False)
        self.arriving.add(conn)
        self.poller.register(conn.sock, selectors.EVENT_READ, partial(self._read_request, conn))

    def _read_request(self, conn: TConn, _client) -> None:
        try:
            data = conn.sock.recv(MAX_PREREAD_BYTES)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:  # the client left before its request was whole
            self._drop(conn)
            return
        seen = len(conn.received)
        conn.received += data
        if conn.needed is None:
            conn.needed = self._request_size(conn.received, seen)
            if conn.needed is None:
                return
            conn.timeout = conn.started + READ_TIMEOUT_S
        if len(conn.received) < conn.needed:
            return
        self.poller.unregister(conn.sock)
        self.arriving.discard(conn)
        conn.init()  # the HTTP/1 parser over this socket (no I/O for plain HTTP); a kept-alive connection has one
        conn.parser.unreader.unread(bytes(conn.received))
        conn.received = None
        self.enqueue_req(conn)

    @staticmethod
    def _request_size(received: bytearray, seen: int) -> int | None:
        """Bytes to wait for before a thread takes the request, once its head is whole (None before): the head,
        plus a body announced by Content-Length when both fit in MAX_PREREAD_BYTES."""
        first = len(received) - len(received.lstrip(b"\r\n"))  # blank lines before the request line are no head
        end = received.find(b"\r\n\r\n", max(seen - 3, first))
        if end < 0:
            return None if len(received) < MAX_PREREAD_BYTES else len(received)
        length = CONTENT_LENGTH.search(received, 0, end + 2)
        whole = end + 4 + (int(length.group(1)) if length else 0)
        return whole if whole <= MAX_PREREAD_BYTES else end + 4

    def _drop(self, conn: TConn, answer: bytes = b"") -> None:
        self.poller.unregister(conn.sock)
        self.arriving.discard(conn)
        if answer:
            try:
                conn.sock.send(answer)
            except OSError:
                pass
        self.nr_conns -= 1
        conn.close()

    def murder_pending(self) -> None:
        """Also close connections whose request did not arrive in time (with a 408 where the client still listens)."""
        super().murder_pending()
        now = time.monotonic()
        for conn in [conn for conn in self.arriving if conn.timeout <= now]:
            self._drop(conn, TIMED_OUT)

    def handle(self, conn: TConn):
        conn.sock.read_deadline = time.monotonic() + READ_TIMEOUT_S
        return super().handle(conn)
