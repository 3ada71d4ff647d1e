"""The serving side's settings: one object, read once from the environment at start-up and passed down.

Every variable the scoring script, its engines and the local server read is a field here, with its default and
its check (a bad value stops start-up with one line naming the variable). `docs/serving.md` documents exactly
these variables (tested). No torch or phi3flow import: the Azure deployment and `phi3flow serve` both read it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, fields

from phi3serve.contract import KEY_ENV, MAX_CONTEXT_ENV, PARAMS

ENGINES = ("auto", "loop", "continuous")
DTYPES = ("auto", "float32", "bfloat16", "float16")
DEVICES = ("auto", "cpu", "cuda")


@dataclass(frozen=True)
class Settings:
    """What the server was started with; `from_env` is the one place that reads the environment."""

    model_dir: str | None = None  # AZUREML_MODEL_DIR: set by Azure, and by `phi3flow serve --model-dir`
    key: str | None = None  # the endpoint key; None: no authentication (`phi3flow serve` always sets one)
    engine: str = "auto"  # continuous batching on CUDA, the decode loop on a CPU
    device: str = "auto"  # "cuda" makes start-up fail when CUDA is unavailable instead of serving on the CPU
    dtype: str = "auto"
    base_model: str | None = None  # overrides an adapter's base model
    max_context: int | None = None  # caps prompt + max_new_tokens below the model's own context
    max_batch: int = 16
    max_queue: int = 16
    batch_wait_ms: int = 50
    request_timeout_s: int = 90
    max_new_tokens: int = int(PARAMS["max_new_tokens"].high)
    drain_s: float = 10.0  # on SIGTERM, how long requests in flight may finish before they get a 503
    bind_host: str = "127.0.0.1"  # where `phi3flow serve` listens (azmlinfsrv alone binds 0.0.0.0)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """The settings `environ` (default: this process's environment) gives; RuntimeError names a bad value."""
        env = os.environ if environ is None else environ
        values: dict = {}
        for field in fields(cls):
            raw = env.get(ENV[field.name])
            if raw is None:
                continue
            if field.type == "int" or field.type == "int | None":
                values[field.name] = _whole(ENV[field.name], raw)
            elif field.type == "float":
                values[field.name] = _seconds(ENV[field.name], raw)
            else:
                values[field.name] = raw
        settings = cls(**values)
        settings.check()
        return settings

    def check(self) -> None:
        for name, allowed in (("engine", ENGINES), ("dtype", DTYPES), ("device", DEVICES)):
            if getattr(self, name) not in allowed:
                raise RuntimeError(f"{ENV[name]} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        if self.key is not None and (not self.key.strip() or self.key != self.key.strip()):
            raise RuntimeError(f"{KEY_ENV} is empty or has surrounding whitespace: give the key exactly, or unset it")

    @property
    def batch_wait_s(self) -> float:
        return self.batch_wait_ms / 1000

    @property
    def key_bytes(self) -> bytes | None:
        """The key as the checks compare it (phi3serve.contract.authorized)."""
        return self.key.encode() if self.key else None


# The environment variable of each field: the documented names, in one table.
ENV: dict[str, str] = {
    "model_dir": "AZUREML_MODEL_DIR",
    "key": KEY_ENV,
    "engine": "PHI3FLOW_ENGINE",
    "device": "PHI3FLOW_DEVICE",
    "dtype": "PHI3FLOW_DTYPE",
    "base_model": "PHI3FLOW_BASE_MODEL",
    "max_context": MAX_CONTEXT_ENV,
    "max_batch": "PHI3FLOW_MAX_BATCH",
    "max_queue": "PHI3FLOW_MAX_QUEUE",
    "batch_wait_ms": "PHI3FLOW_BATCH_WAIT_MS",
    "request_timeout_s": "PHI3FLOW_REQUEST_TIMEOUT_S",
    "max_new_tokens": "PHI3FLOW_MAX_NEW_TOKENS",
    "drain_s": "PHI3FLOW_DRAIN_S",
    "bind_host": "PHI3FLOW_BIND_HOST",
}


def _seconds(name: str, value: str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not 0 <= seconds <= 3600:
        raise RuntimeError(f"{name} must be a number of seconds from 0 to 3600, got {value!r}")
    return seconds


def _whole(name: str, value: str) -> int:
    if not value.isdigit() or int(value) < 1:
        raise RuntimeError(f"{name} must be a whole number >= 1, got {value!r}")
    return int(value)
