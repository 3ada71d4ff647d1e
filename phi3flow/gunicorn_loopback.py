"""Gunicorn config hook that rebinds azmlinfsrv to one host (loopback for local endpoints).

azmlinfsrv hard-codes `-b 0.0.0.0:PORT` on gunicorn's command line, which outranks every config
source; `on_starting` runs before the listening sockets are created, so it can still change them.
Loaded through `GUNICORN_CMD_ARGS="-c python:phi3flow.gunicorn_loopback"` by `phi3flow serve`.
"""

import os

HOST_ENV = "PHI3FLOW_BIND_HOST"


def on_starting(server) -> None:
    host = os.environ.get(HOST_ENV, "127.0.0.1")
    ports = [address.rsplit(":", 1)[1] for address in server.cfg.bind]
    server.cfg.set("bind", [f"{host}:{port}" for port in ports])
