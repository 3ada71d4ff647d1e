"""AzureML scoring script: the endpoint contract over a chat model, with an optional LoRA adapter.

Runs unchanged in a managed online deployment and locally under `azmlinfsrv` (see `phi3flow serve`).
This file is the thin entry (init, run, auth); the contract, model loading and the generation engines
are the `phi3serve` modules beside it (azmlinfsrv puts this folder on `sys.path`).
"""

from __future__ import annotations

import hmac
import logging
import os
from typing import Any

from azureml_inference_server_http.api.aml_request import rawhttp
from azureml_inference_server_http.api.aml_response import AMLResponse

from phi3serve.contract import (BATCH_INVARIANT_HEADER, BATCH_SIZE_HEADER, KEY_ENV, MAX_BODY_BYTES, TRUNCATED_HEADER,
                                ServingError, Unavailable, parse_request)
from phi3serve.engine import Engine, ask, engine_for
from phi3serve.model import ChatModel

log = logging.getLogger("azmlinfsrv.score")  # a child of the server's logger, so it reaches its log handler

# Batching (see phi3serve.loop / phi3serve.continuous); PHI3FLOW_MAX_BATCH=1 gives the naive one-at-a-time path.
MAX_BATCH_ENV, MAX_QUEUE_ENV, BATCH_WAIT_ENV = "PHI3FLOW_MAX_BATCH", "PHI3FLOW_MAX_QUEUE", "PHI3FLOW_BATCH_WAIT_MS"
# Seconds a request may take before the server stops its generation: match request_timeout_ms of the deployment,
# since AzureML's gateway answers 408 at that point while the container would otherwise keep generating.
TIMEOUT_ENV = "PHI3FLOW_REQUEST_TIMEOUT_S"

_model: ChatModel | None = None
_engine: Engine | None = None
_key: bytes | None = None
_timeout_s: float = 90.0


def init() -> None:
    """Called once per worker by the inference server: load the model from AZUREML_MODEL_DIR, start the engine."""
    global _model, _key, _engine, _timeout_s
    key = os.environ.get(KEY_ENV)
    if key is not None and (not key.strip() or key != key.strip()):
        raise RuntimeError(f"{KEY_ENV} is empty or has surrounding whitespace: give the key exactly, or unset it")
    _key = key.encode() if key else None
    model_dir = os.environ.get("AZUREML_MODEL_DIR")
    if not model_dir:
        raise RuntimeError("AZUREML_MODEL_DIR is not set: point it at a model folder (phi3flow serve --model-dir DIR)")
    _timeout_s = float(_env_int(TIMEOUT_ENV, 90))
    _model = ChatModel.load(model_dir)
    _engine = engine_for(_model, max_batch=_env_int(MAX_BATCH_ENV, 16), max_queue=_env_int(MAX_QUEUE_ENV, 64),
                         wait_s=_env_int(BATCH_WAIT_ENV, 50) / 1000)
    log.info("Model ready (%s engine, %s on %s, context %d tokens)", type(_engine).__name__, _model.dtype,
             _model.device, _model.context)


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, str(default))
    if not value.isdigit() or int(value) < 1:
        raise RuntimeError(f"{name} must be a whole number >= 1, got {value!r}")
    return int(value)


def _authorized(header: str | None) -> bool:
    """Constant-time check of `Authorization: Bearer <key>` when a key is configured."""
    if _key is None:
        return True
    scheme, _, token = (header or "").partition(" ")
    # compare_digest runs in time independent of where the tokens differ
    return hmac.compare_digest(token.strip().encode(), _key) and scheme.lower() == "bearer"


def score(body: bytes) -> tuple[dict, int, dict[str, str]]:
    """The contract without HTTP: (payload, status, headers). Used by run() and by tests."""
    try:
        if _engine is None or not _engine.healthy():
            raise Unavailable("the generation engine is not running; the server is restarting")
        answer, dropped = ask(_engine, _model, parse_request(body), _timeout_s)
    except ServingError as exc:
        return {"message": str(exc)}, exc.status, dict(exc.headers)
    except TimeoutError:
        return {"message": f"generation took longer than {TIMEOUT_ENV}={_timeout_s:g} s and was stopped"}, 504, {}
    headers = {BATCH_SIZE_HEADER: str(answer.batch_size),
               BATCH_INVARIANT_HEADER: "true" if _engine.batch_invariant else "false"}
    if dropped:
        headers[TRUNCATED_HEADER] = str(dropped)
    return {"output": answer.text}, 200, headers


def _json(payload: dict, status: int, headers: dict[str, str] | None = None) -> AMLResponse:
    return AMLResponse(payload, status, headers or {}, json_str=True)


@rawhttp
def run(request: Any) -> AMLResponse:
    """Entry point for each request (raw HTTP so errors keep their 4xx status)."""
    if not _authorized(request.headers.get("Authorization")):
        return _json({"message": "missing or wrong key: send 'Authorization: Bearer <key>'"}, 401, {"WWW-Authenticate": "Bearer"})
    if request.method != "POST":
        return _json({"message": "POST a JSON body to /score"}, 405, {"Allow": "POST"})
    if (request.content_length or 0) > MAX_BODY_BYTES:
        return _json({"message": f"request body is over the {MAX_BODY_BYTES}-byte limit"}, 413)
    # Read at most one byte past the limit, whatever the framing (a chunked body has no Content-Length).
    body = request.stream.read(MAX_BODY_BYTES + 1)
    payload, status, headers = score(body)
    return _json(payload, status, headers)
