"""A gunicorn threaded worker that idle and slow clients cannot take over.

gunicorn's `gthread` worker gives a connection a thread as soon as it is accepted: the thread waits up to 5 s for
the first byte, then reads the request head with no deadline at all. 200 idle connections, or 40 that send a
header byte every 2 s, leave no thread for real requests. This worker reads request heads in its event loop,
without threads, and hands a connection to a thread only once its head has arrived whole; a head must arrive
within HEAD_TIMEOUT_S of the connection opening (or becoming readable again when kept alive). In the thread, the
rest of the request (the body) must arrive within READ_TIMEOUT_S, and each write of the answer may wait for the
client at most WRITE_TIMEOUT_S. Plain HTTP/1.1 only (as azmlinfsrv serves it; TLS ends before it in Azure).
"""

from __future__ import annotations

import errno
import math
import selectors
import socket
import time
from collections import deque
from functools import partial

from gunicorn.workers.gthread import ThreadWorker, TConn

HEAD_TIMEOUT_S = 10.0
READ_TIMEOUT_S = 30.0
WRITE_TIMEOUT_S = 30.0
MAX_HEAD_BYTES = 64 * 1024  # past this a head goes to a thread as it is: gunicorn's own header limits answer it
TIMED_OUT = b"HTTP/1.1 408 Request Timeout\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"


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
    """gthread, except that a connection gets a thread only once a whole request head has arrived."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.heads: deque[TConn] = deque()  # connections whose head is arriving, oldest deadline first

    def accept(self, listener) -> None:
        try:
            sock, client = listener.accept()
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.ECONNABORTED, errno.EWOULDBLOCK):
                raise
            return
        self.nr_conns += 1
        self._await_head(TConn(self.cfg, ClientSocket.adopt(sock), client, listener.getsockname()))

    def on_client_socket_readable(self, conn: TConn, client) -> None:
        """A kept-alive connection starts its next request: its head arrives under the same rules."""
        self.poller.unregister(client)
        self.keepalived_conns.remove(conn)
        self._await_head(conn)

    def _await_head(self, conn: TConn) -> None:
        conn.head = bytearray()
        conn.timeout = time.monotonic() + HEAD_TIMEOUT_S
        conn.sock.setblocking(False)
        self.heads.append(conn)
        self.poller.register(conn.sock, selectors.EVENT_READ, partial(self._read_head, conn))

    def _read_head(self, conn: TConn, _client) -> None:
        try:
            data = conn.sock.recv(MAX_HEAD_BYTES)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:  # the client left before sending a whole head
            self._drop_head(conn)
            return
        seen = len(conn.head)
        conn.head += data
        if conn.head.find(b"\r\n\r\n", max(seen - 3, 0)) < 0 and len(conn.head) < MAX_HEAD_BYTES:
            return
        self.poller.unregister(conn.sock)
        self.heads.remove(conn)
        conn.init()  # the HTTP/1 parser over this socket (no I/O for plain HTTP); a kept-alive connection has one
        conn.parser.unreader.unread(bytes(conn.head))
        conn.head = None
        self.enqueue_req(conn)

    def _drop_head(self, conn: TConn, answer: bytes = b"") -> None:
        self.poller.unregister(conn.sock)
        self.heads.remove(conn)
        if answer:
            try:
                conn.sock.send(answer)
            except OSError:
                pass
        self.nr_conns -= 1
        conn.close()

    def murder_pending(self) -> None:
        """Also close connections whose head did not arrive in time (with a 408 where the client still listens)."""
        super().murder_pending()
        now = time.monotonic()
        while self.heads and self.heads[0].timeout <= now:
            self._drop_head(self.heads[0], TIMED_OUT)

    def handle(self, conn: TConn):
        conn.sock.read_deadline = time.monotonic() + READ_TIMEOUT_S
        return super().handle(conn)
