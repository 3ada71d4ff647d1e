"""`phi3flow serve`: run the AzureML scoring script locally under azmlinfsrv, with key auth, on loopback.

The same score.py and the same inference server as a managed online deployment, so what works here
works in Azure. The key comes from $PHI3FLOW_ENDPOINT_KEY or a file (--key-file), or is generated, and travels
to the server in its environment, never on a command line. The server stops with this command, however it ends
(Ctrl+C, SIGTERM, SIGHUP, even SIGKILL on Linux).
"""

from __future__ import annotations

import argparse
import ctypes
import errno
import importlib.util
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import requests

from phi3flow.connect import KEY_ENV, add_key_options, key_from
from phi3flow.errors import Phi3flowError
from phi3serve.gunicorn_config import GRACE_S, HOST_ENV
from phi3serve.settings import Settings

HOST = "127.0.0.1"
PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


def _score_script() -> Path:
    """The AzureML entry script, deploy/score.py, from the installed package (editable or wheel): azmlinfsrv loads it
    by path, as in Azure."""
    return (Path(importlib.util.find_spec("phi3flow.deploy").origin).parent / "score.py").resolve()


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


class PortInUse(RuntimeError):
    """Another server already listens on the port: starting would leave the health check answered by it."""


def check_port_free(port: int) -> None:
    """Raise PortInUse when something listens on HOST:port (or on all addresses at that port)."""
    with socket.socket() as probe:
        probe.setsockopt(
            socket.SOL_SOCKET, socket.SO_REUSEADDR, 1
        )  # as gunicorn binds: a closed server's TIME_WAIT is no conflict
        try:
            probe.bind((HOST, port))
        except OSError as exc:
            reason = (
                "is already in use (another phi3flow serve, or another server)"
                if exc.errno == errno.EADDRINUSE
                else f"cannot be used ({exc.strerror})"
            )
            raise PortInUse(f"port {port} on {HOST} {reason}: stop that server or choose another --port") from None


def exec_tied_to_parent(parent: int, command: list[str]) -> None:
    """Become `command`, having asked Linux to SIGTERM this process when `parent` dies, however it dies.

    Runs in the freshly started child (no threads there, unlike preexec_fn in the parent). Linux sends the
    signal when the parent's thread that started the child ends: start servers from a thread that outlives them."""
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:  # the parent died before the request took effect
        sys.exit(1)
    os.execv(command[0], command)


def _tied_to_this_process(command: list[str]) -> list[str]:
    if not sys.platform.startswith("linux"):
        return command  # elsewhere the server stops with us on Ctrl+C, SIGTERM and SIGHUP only
    launcher = "import sys; from phi3flow.serve import exec_tied_to_parent; exec_tied_to_parent(int(sys.argv[1]), sys.argv[2:])"
    return [sys.executable, "-c", launcher, str(os.getpid()), *command]


def resolve_model_dir(model_dir: str | None) -> Path:
    """A local model folder: the one given, or the embedded default model (converted on first use)."""
    if model_dir:
        path = Path(model_dir).expanduser()
        if not path.is_dir():
            raise Phi3flowError(f"--model-dir {model_dir} is not a folder. Give a Hugging Face model or LoRA adapter folder.")
        return path.resolve()
    from phi3flow.embedded import embedded_model_dir

    return embedded_model_dir()


class LocalEndpoint:
    """A local managed-online-endpoint look-alike: azmlinfsrv + score.py, started and stopped by us."""

    def __init__(
        self,
        model_dir: Path,
        port: int | None = None,
        key: str | None = None,
        log_file: Path | None = None,
        workers: int = 1,
        threads: int = 48,
        env: dict[str, str] | None = None,
    ):
        self.model_dir = Path(model_dir)
        self.port = port or free_port()
        self.key = key or secrets.token_urlsafe(32)
        self.workers = workers
        self.threads = threads  # concurrent requests per worker, batched together by score.py
        self.extra_env = env or {}
        self.log_file = log_file
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}/score"

    def environment(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            AZUREML_MODEL_DIR=str(self.model_dir),
            GUNICORN_CMD_ARGS=f"-c python:phi3serve.gunicorn_config --threads {self.threads} {env.get('GUNICORN_CMD_ARGS', '')}".strip(),
            WORKER_COUNT=str(self.workers),
            AML_APP_ROOT=str(_score_script().parent),
        )
        env[HOST_ENV], env[KEY_ENV] = HOST, self.key
        env.update(self.extra_env)
        return env

    def start(self) -> LocalEndpoint:
        """Start the server (PortInUse when its port is taken); it dies with this process."""
        check_port_free(self.port)
        server = Path(sys.executable).with_name("azmlinfsrv")
        command = [str(server), "--entry_script", str(_score_script()), "--port", str(self.port)]
        output = open(self.log_file, "ab") if self.log_file else None
        # server logs go to the log file, else to stderr, keeping stdout for the URL and key lines
        self.process = subprocess.Popen(
            _tied_to_this_process(command),
            env=self.environment(),
            stdout=output or sys.stderr,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        return self

    def wait_ready(self, timeout: float = 300.0) -> LocalEndpoint:
        """Block until the health route answers and the model answers a request; fail fast if the server dies."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the local endpoint exited with code {self.process.returncode}{self._log_tail()}")
            try:
                if requests.get(f"http://{HOST}:{self.port}/", timeout=5).ok:
                    return self
            except requests.RequestException:
                pass
            time.sleep(0.5)
        self.stop()
        raise TimeoutError(f"the local endpoint did not become ready within {timeout:.0f} s{self._log_tail()}")

    def _log_tail(self) -> str:
        if not self.log_file or not Path(self.log_file).is_file():
            return ""
        tail = Path(self.log_file).read_text(errors="replace").splitlines()[-20:]
        return "; server log tail:\n" + "\n".join(tail)

    def stop(self) -> None:
        """SIGTERM: the server stops accepting and drains (see gunicorn_config); killed if it outlasts gunicorn's grace."""
        if self.process and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=Settings.from_env(self.environment()).drain_s + GRACE_S + 10)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()

    def __enter__(self) -> LocalEndpoint:
        return self.start().wait_ready()

    def __exit__(self, *exc) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="phi3flow serve", description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", help="model folder (Hugging Face, MLflow or LoRA adapter); default: the embedded model")
    parser.add_argument("--port", type=int, default=5001, help="port on 127.0.0.1 (default 5001)")
    add_key_options(parser, "a new one is generated and printed once (clients send it as 'Authorization: Bearer <key>')")
    parser.add_argument("--workers", type=int, default=1, help="inference server worker processes (each loads the model)")
    parser.add_argument(
        "--threads",
        type=int,
        default=48,
        help="concurrent requests per worker (default 48: 16 decoded together + 16 waiting, beyond that 503)",
    )
    args = parser.parse_args(argv)
    key = key_from(args, parser, ask=False)
    endpoint = LocalEndpoint(
        resolve_model_dir(args.model_dir), port=args.port, key=key, workers=args.workers, threads=args.threads
    )
    for signum in (signal.SIGTERM, signal.SIGHUP):  # stop the server on these too, not only Ctrl+C
        signal.signal(signum, lambda *_: sys.exit(0))
    try:
        endpoint.start()
        if key is None:
            print(f"Generated endpoint key (shown once): {endpoint.key}", flush=True)
        endpoint.wait_ready()
        print(
            f"Scoring URL: {endpoint.url}\nConnect Prompt Flow to it: phi3flow connect --endpoint {endpoint.url} "
            f"(the key from ${KEY_ENV}, --key-file FILE, or typed when asked)\nPress Ctrl+C to stop.",
            flush=True,
        )
        return endpoint.process.wait()
    except PortInUse as exc:
        print(f"phi3flow serve: {exc}", file=sys.stderr)
        return 1
    except (RuntimeError, TimeoutError) as exc:
        print(f"phi3flow serve: {exc} (see the server output above)", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        endpoint.stop()
