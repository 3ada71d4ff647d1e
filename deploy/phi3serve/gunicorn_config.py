"""Gunicorn settings and hooks for the azmlinfsrv that `phi3flow serve` runs (loaded through
`GUNICORN_CMD_ARGS="-c python:phi3serve.gunicorn_config"`; command-line flags, such as azmlinfsrv's own, win).

- Loopback only: azmlinfsrv hard-codes `-b 0.0.0.0:PORT`, which outranks every config source; `on_starting` runs
  before the listening sockets are created, so it can still rebind them.
- Idle and slow clients cannot hold worker threads: a worker that reads request heads without threads
  (phi3serve.gunicorn_worker).
- Stopping (SIGTERM) is graceful and bounded: requests in flight have the scoring script's drain time
  ($PHI3FLOW_DRAIN_S, 10 s by default) to finish or get a 503; gunicorn waits GRACE_S longer for its worker.
- Keys sent in a query string never reach the log: neither gunicorn's access log nor azmlinfsrv's request lines
  keep the query string (nor the Referer, which can carry one, nor a Basic-auth user).
"""

from __future__ import annotations

import logging
import math
import re

from phi3serve.settings import ENV, Settings

HOST_ENV = ENV["bind_host"]
SETTINGS = Settings.from_env()  # the same settings the scoring code reads in each worker
GRACE_S = 5  # beyond the drain time: the 503s are written and the worker exits

worker_class = "phi3serve.gunicorn_worker.HeadFirstWorker"
# gunicorn 25+ opens a control socket at one fixed path per user ($HOME/.gunicorn/gunicorn.ctl): two local servers
# would share it, and nothing here uses it.
control_socket_disable = True
graceful_timeout = math.ceil(SETTINGS.drain_s) + GRACE_S  # then gunicorn kills the worker (SIGKILL); a whole number
# gunicorn's default is '%(h)s %(l)s %(u)s %(t)s "%(r)s" %(s)s %(b)s "%(f)s" "%(a)s"'; %(r)s holds the query string.
# The request line stays `"METHOD /path HTTP/1.1"`: azmlinfsrv's filter drops health checks by it.
access_log_format = '%(h)s %(t)s "%(m)s %(U)s %(H)s" %(s)s %(b)s "%(a)s" %(L)ss'


def on_starting(server) -> None:
    host = SETTINGS.bind_host
    ports = [address.rsplit(":", 1)[1] for address in server.cfg.bind]
    server.cfg.set("bind", [f"{host}:{port}" for port in ports])


class NoQueryStrings(logging.Filter):
    """Cuts the query string out of azmlinfsrv's request lines (`POST /score?key=... 200 12.3ms 45`)."""

    request_line = re.compile(r"^([A-Z]+ /[^\s?]*)\?\S*")

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        clean = self.request_line.sub(r"\1", message)
        if clean != message:
            record.msg, record.args = clean, None
        return True


def post_worker_init(worker) -> None:
    """After the app (and azmlinfsrv's logging config) is loaded in this worker."""
    logging.getLogger("azmlinfsrv").addFilter(NoQueryStrings())
