"""Shared fixtures: an isolated, offline Prompt Flow home; a scripted local HTTP endpoint; the embedded model."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from hypothesis import settings

from phi3flow.offline import OFFLINE_ENV

if TYPE_CHECKING:
    from transformers import Phi3ForCausalLM

    from phi3flow.finetune.config import FinetuneConfig
    from phi3serve.contract import ChatRequest
    from phi3serve.engine import Answer, Engine
    from phi3serve.model import ChatModel

# CI runs the property tests with a fixed seed, so a red build is reproducible (locally they explore).
settings.register_profile("ci", derandomize=True)
if os.environ.get("CI"):
    settings.load_profile("ci")

# Before promptflow is imported anywhere: a private PF home (no clobbering the user's connections),
# telemetry off, no tracing exporter, no remote settings fetch.
_PF_HOME = Path(tempfile.mkdtemp(prefix="phi3flow-pf-home-"))
(_PF_HOME / "pf.yaml").write_text("telemetry:\n  enabled: 'false'\n")
os.environ["PF_HOME_DIRECTORY"] = str(_PF_HOME)
os.environ["PF_DISABLE_TRACING"] = "true"
os.environ["APPLICATIONINSIGHTS_CONTROLPLANE_DISABLED"] = "true"

REPO = Path(__file__).resolve().parent.parent
SECRET = "s3cr3t-key-that-must-never-leak"


@dataclass
class Reply:
    """A scripted answer; a list `body` is streamed: each piece written and flushed `gap` seconds apart, then the connection closed."""

    status: int = 200
    body: object = field(default_factory=lambda: {"output": "ok"})
    headers: dict = field(default_factory=dict)
    delay: float = 0.0
    gap: float = 0.0


class ScriptedEndpoint:
    """A local HTTP server answering each POST with the next scripted Reply (the last one repeats),
    or with `responder(body)` when given (answers by content stay right under concurrency)."""

    def __init__(self, port: int = 0, responder: Callable[[dict], Reply] | None = None) -> None:
        self.script: list[Reply] = [Reply()]
        self.requests: list[dict] = []
        self.times: list[float] = []
        self.disconnects = 0  # answers the client stopped reading before their end
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server API)
                length = int(self.headers.get("Content-Length", 0))
                body = json.loads(self.rfile.read(length) or b"null")
                outer.requests.append({"headers": dict(self.headers), "body": body})
                outer.times.append(time.monotonic())
                reply = responder(body) if responder else outer.script[min(len(outer.requests), len(outer.script)) - 1]
                time.sleep(reply.delay)
                streamed = isinstance(reply.body, list)
                payload = reply.body if isinstance(reply.body, (bytes, str, list)) else json.dumps(reply.body)
                pieces = [p.encode() if isinstance(p, str) else p for p in (payload if streamed else [payload])]
                try:
                    self.send_response(reply.status)
                    for name, value in reply.headers.items():
                        self.send_header(name, value)
                    if not streamed:
                        self.send_header("Content-Length", str(len(pieces[0])))
                    self.end_headers()
                    for i, piece in enumerate(pieces):
                        time.sleep(reply.gap if i else 0)
                        self.wfile.write(piece)
                        self.wfile.flush()
                except (BrokenPipeError, ConnectionResetError):
                    outer.disconnects += 1

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/score"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def questions(self) -> list[str]:
        """The last user turn of each request received, in order."""
        return [request["body"]["input_data"]["input_string"][-1]["content"] for request in self.requests]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def endpoint():
    server = ScriptedEndpoint()
    yield server
    server.close()


@pytest.fixture(scope="session")
def embedded_dir() -> Path:
    from phi3flow.embedded import embedded_model_dir

    return embedded_model_dir()


def pf(*args: str) -> subprocess.CompletedProcess:
    """This environment's `pf` CLI, run from the repository root."""
    from phi3flow.offline import pf_executable

    return subprocess.run([pf_executable(), *args], capture_output=True, text=True, cwd=REPO, timeout=300)


@contextmanager
def served_locally(model_dir: Path, tmp_path_factory) -> Iterator:
    """`phi3flow serve` (azmlinfsrv + deploy/score.py) on a model with the test key; its log never holds the key."""
    from phi3flow.serve import LocalEndpoint

    log = tmp_path_factory.mktemp("server") / "server.log"
    with LocalEndpoint(model_dir, key=SECRET, log_file=log) as endpoint:
        yield endpoint
    assert SECRET not in log.read_text()


@contextmanager
def pf_connection(url: str, key: str) -> Iterator[str]:
    """The chat flow's connection `phi3_endpoint` for an endpoint (its key never echoed); pf's service stopped after."""
    from phi3flow.offline import stop_pf_service

    result = pf(
        "connection", "create", "-f", "connections/phi3_endpoint.yaml", "--set", f"configs.endpoint={url}", f"secrets.key={key}"
    )
    assert result.returncode == 0, result.stderr
    assert key not in result.stdout + result.stderr
    yield "phi3_endpoint"
    stop_pf_service()


class PromptFlowHome:
    """A private, offline Prompt Flow home for the `pf` of one environment (`bin_dir`): its connections, its local service.

    Servers it starts are stopped by `close()`; the endpoint key only ever travels in an environment variable."""

    def __init__(self, path: Path, bin_dir: Path) -> None:
        path.mkdir(parents=True, exist_ok=True)
        (path / "pf.yaml").write_text("telemetry:\n  enabled: 'false'\n")
        self.bin = bin_dir
        self.env = {
            **os.environ,
            **OFFLINE_ENV,
            "PF_HOME_DIRECTORY": str(path),
            "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
            "PYTHONUNBUFFERED": "1",
        }  # logs line by line: the tests read them while pf runs
        self.processes: list[subprocess.Popen] = []

    def run(self, *args: str, cwd: Path = REPO, timeout: float = 600, env: dict | None = None) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(self.bin / args[0]), *args[1:]],
            capture_output=True,
            text=True,
            cwd=cwd,
            timeout=timeout,
            env={**self.env, **(env or {})},
        )

    def connect(self, url: str, key: str = SECRET) -> None:
        """`phi3flow connect` (the key from its environment variable, never the command line)."""
        result = self.run("phi3flow", "connect", "--endpoint", url, env={"PHI3FLOW_ENDPOINT_KEY": key})
        assert result.returncode == 0, result.stderr[-3000:]

    def start_service(self) -> None:
        """The local pf service on a free port (not the shared default 23333); its daemon keeps no pipe of ours."""
        from phi3flow.serve import free_port

        subprocess.run(
            [str(self.bin / "pf"), "service", "start", "--port", str(free_port())],
            env=self.env,
            timeout=120,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            check=True,
        )

    def spawn(self, *args: str, log: Path, cwd: Path = REPO) -> subprocess.Popen:
        """A long-running `pf` command in its own process group, output to `log`."""
        with log.open("w") as out:
            process = subprocess.Popen(
                [str(self.bin / args[0]), *args[1:]],
                cwd=cwd,
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.processes.append(process)
        return process

    def close(self) -> None:
        """Ctrl-C each spawned command's process group (pf stops its serving app on it), then `pf service stop`."""
        for process in self.processes:
            for sig, grace in ((signal.SIGINT, 20), (signal.SIGKILL, 10)):
                try:
                    os.killpg(process.pid, sig)
                    process.wait(timeout=grace)
                    break
                except ProcessLookupError:
                    break
                except subprocess.TimeoutExpired:
                    continue
        subprocess.run([str(self.bin / "pf"), "service", "stop"], env=self.env, capture_output=True, timeout=120, check=False)


# --- training: a tiny random Phi-3 and the offline sample (test_finetune, test_faults, test_models) -------

PHI3_TARGETS = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]  # Phi-3's fused projections


def tiny_phi3(vocab_size: int, **ids: int | None) -> Phi3ForCausalLM:
    import torch
    from transformers import Phi3Config, Phi3ForCausalLM

    torch.manual_seed(0)
    cfg = Phi3Config(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        **{"bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 0, **ids},
    )
    return Phi3ForCausalLM(cfg).eval()


def small_config(tmp: Path, files: tuple[Path, Path], **overrides) -> FinetuneConfig:
    """The CPU config, shrunk: settings of both parts (phi3flow's and the Trainer's) by their own names."""
    from phi3flow.finetune import config

    values = dict(
        train_file=str(files[0]),
        test_file=str(files[1]),
        output_dir=str(tmp / "out"),
        max_seq_length=128,
        per_device_train_batch_size=4,
        per_device_eval_batch_size=8,
        learning_rate=1e-3,
        max_steps=4,
        logging_steps=1,
        eval_strategy="no",
        save_steps=100,
        warmup_steps=0,
        lr_scheduler_type="constant",
    )
    return config.load_config(config.DEFAULT_CONFIG, {**values, **overrides})


def write_sample(folder: Path, size: int, test_size: float) -> tuple[Path, Path]:
    """`phi3flow data --sample` into `folder`: (train file, test file)."""
    from phi3flow.data import prepare

    assert prepare.main(["--sample", "--sample-size", str(size), "--test-size", str(test_size), "--output-dir", str(folder)]) == 0
    return folder / prepare.TRAIN_FILE, folder / prepare.TEST_FILE


@pytest.fixture(scope="session")
def sample_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return write_sample(tmp_path_factory.mktemp("data"), 48, 0.25)


@pytest.fixture(scope="session")
def tokenizer():
    from transformers import AutoTokenizer

    from phi3flow.embedded import embedded_model_dir

    return AutoTokenizer.from_pretrained(embedded_model_dir())


@pytest.fixture(scope="session")
def tiny_phi3_dir(tmp_path_factory: pytest.TempPathFactory, tokenizer) -> Path:
    """A randomly initialised Phi-3 saved with the embedded tokenizer: the fused-projection path, in seconds."""
    folder = tmp_path_factory.mktemp("tiny-phi3")
    model = tiny_phi3(
        len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


# --- LongRoPE: a Phi-3 with real weights whose rotary factors switch at position 64 (test_longrope, test_onnx) -----

LONGROPE_ORIGINAL = 64  # original_max_position_embeddings of the LongRoPE fixture; its context is 4x that
ROPE_SPELLINGS = ("hub", "transformers5")


def build_longrope_phi3(out_dir: Path, rope_spelling: str = "hub") -> Path:
    """The embedded model's weights in Phi-3's fused layout, with LongRoPE over 64 original positions stretched 4x.

    Its answers are words (random weights repeat one token and hide rotary bugs). Short factors are all 1.0 and long
    factors ramp from 1 to 4, so answers change once a sequence passes 64; LongRoPE's attention scaling
    (sqrt(1 + ln 4 / ln 64), both factor sets) makes even short answers differ from the embedded model's, still in words. `rope_spelling` "hub" writes config.json as the published Phi-4-mini one
    (`rope_scaling` with `type`); "transformers5" keeps what transformers 5 saves (`rope_parameters`, `rope_type` only).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, Phi3Config, Phi3ForCausalLM

    from phi3flow.embedded import embedded_model_dir

    if rope_spelling not in ROPE_SPELLINGS:
        raise ValueError(f"rope_spelling must be one of {ROPE_SPELLINGS}, got {rope_spelling!r}")
    source_dir = embedded_model_dir()
    llama = AutoModelForCausalLM.from_pretrained(source_dir, dtype=torch.float32)
    src = llama.config
    half = src.hidden_size // src.num_attention_heads // 2
    rope = {
        "rope_type": "longrope",
        "rope_theta": src.rope_parameters["rope_theta"],
        "short_factor": [1.0] * half,
        "long_factor": [1.0 + 3.0 * i / (half - 1) for i in range(half)],
    }
    config = Phi3Config(
        vocab_size=src.vocab_size,
        hidden_size=src.hidden_size,
        intermediate_size=src.intermediate_size,
        num_hidden_layers=src.num_hidden_layers,
        num_attention_heads=src.num_attention_heads,
        num_key_value_heads=src.num_key_value_heads,
        rms_norm_eps=src.rms_norm_eps,
        hidden_act=src.hidden_act,
        tie_word_embeddings=src.tie_word_embeddings,
        max_position_embeddings=4 * LONGROPE_ORIGINAL,
        original_max_position_embeddings=LONGROPE_ORIGINAL,
        rope_parameters=rope,
        bos_token_id=src.bos_token_id,
        eos_token_id=src.eos_token_id,
        pad_token_id=src.pad_token_id,
    )
    weights = {}
    for name, tensor in llama.state_dict().items():
        layer, _, leaf = name.rpartition(".self_attn.")
        if leaf in ("k_proj.weight", "v_proj.weight") or name.endswith("mlp.up_proj.weight"):
            continue  # fused below, into their q / gate sibling
        if leaf == "q_proj.weight":
            weights[f"{layer}.self_attn.qkv_proj.weight"] = torch.cat(
                [tensor] + [llama.state_dict()[f"{layer}.self_attn.{p}_proj.weight"] for p in "kv"]
            )
        elif name.endswith("mlp.gate_proj.weight"):  # Phi3MLP chunks gate_up_proj's output as (gate, up)
            weights[name.replace("gate_proj", "gate_up_proj")] = torch.cat(
                [tensor, llama.state_dict()[name.replace("gate_proj", "up_proj")]]
            )
        else:
            weights[name] = tensor
    model = Phi3ForCausalLM(config).eval()
    missing, unexpected = model.load_state_dict(weights, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)  # a tied head is the embeddings
    model.generation_config = llama.generation_config
    model.save_pretrained(out_dir)
    AutoTokenizer.from_pretrained(source_dir).save_pretrained(out_dir)
    if rope_spelling == "hub":
        written = json.loads((out_dir / "config.json").read_text())
        params = written.pop("rope_parameters")
        written.update(
            rope_theta=params["rope_theta"],
            original_max_position_embeddings=LONGROPE_ORIGINAL,
            rope_scaling={"type": "longrope", "short_factor": params["short_factor"], "long_factor": params["long_factor"]},
        )
        (out_dir / "config.json").write_text(json.dumps(written, indent=2))
    return out_dir


@pytest.fixture(scope="session")
def longrope_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A LongRoPE Phi-3 with real weights (build_longrope_phi3), config.json spelled as the hub's."""
    return build_longrope_phi3(tmp_path_factory.mktemp("longrope-phi3"))


def ask(engine: Engine, model: ChatModel, request: ChatRequest, timeout_s: float = 3600.0) -> tuple[Answer, int]:
    """Encode, queue and wait for one request on an engine, without a server: (answer, turns dropped)."""
    from phi3serve.engine import start

    job, dropped = start(engine, model, request, timeout_s)
    return job.future.result(timeout=timeout_s + 5), dropped


class Trickle:
    """`count` clients that send `head`, 70 KB of body, then a byte a second; each reconnects when the server cuts it
    off (`refused` counts those). Slow uploads for tests/test_hostile.py and bench/hostile_clients.py."""

    def __init__(self, port: int, count: int, head: bytes):
        self.port, self.head, self.refused = port, head, 0
        self.stopped = threading.Event()
        self.threads = [threading.Thread(target=self._client, daemon=True) for _ in range(count)]
        for thread in self.threads:
            thread.start()

    def _client(self) -> None:
        from phi3flow.serve import HOST

        while not self.stopped.is_set():
            try:
                with socket.create_connection((HOST, self.port), timeout=5) as sock:
                    sock.sendall(self.head + b"x" * 70_000)
                    while not self.stopped.wait(1.0):
                        sock.sendall(b"x")
            except OSError:
                self.refused += 1
                self.stopped.wait(0.2)

    def close(self) -> None:
        self.stopped.set()
        for thread in self.threads:
            thread.join()
