"""The endpoint contract: roles, generation parameters with their ranges and defaults, request parsing.

One home for these facts: the scoring script validates with them, and the client, tool, agents,
evaluation and benchmarks take their defaults from them. No torch or phi3flow import, so it runs
both in the Azure deployment and in the light Prompt Flow tool.

Request:  {"input_data": {"input_string": [{"role", "content"}...], "parameters": {...}}}
Response: {"output": "<assistant text>"}; errors {"message": "..."} with a 4xx/5xx status.
"""

from __future__ import annotations

import hmac
import json
import math
from dataclasses import asdict, dataclass
from typing import Any

KEY_ENV = "PHI3FLOW_ENDPOINT_KEY"  # the endpoint key, for the local server and for clients
KEY_HEADERS = "'Authorization: Bearer <key>' or 'api-key: <key>'"  # how clients may send the key (OpenAI's SDKs use either)
# Caps the context the server accepts (prompt + max_new_tokens) below the model's own: a 128k-token model would
# otherwise let every request grow a KV cache the GPU cannot hold for many requests (`phi3flow azure deploy` sets it
# per model in the deployment; phi3serve.model applies it).
MAX_CONTEXT_ENV = "PHI3FLOW_MAX_CONTEXT"
MAX_BODY_BYTES = 1 << 20
ROLES = ("system", "user", "assistant")
GREEDY_BELOW = 1e-3  # temperatures under this decode greedily (dividing logits by ~0 overflows)
TRUNCATED_HEADER = "x-phi3flow-truncated-turns"  # oldest turns dropped to fit the context
BATCH_SIZE_HEADER = "x-phi3flow-batch-size"  # most sequences decoded together while this answer was generated
BATCH_INVARIANT_HEADER = "x-phi3flow-batch-invariant"  # "true": greedy answers never depend on the batch
# Streaming: a request with `Accept: text/event-stream` gets server-sent events instead of one JSON answer:
#   event: delta  data: {"text": "<next piece>"}                      (zero or more)
#   event: done   data: {"output": "<whole answer>", "truncated_turns": n, "batch_size": n, "tokens": n}
#   event: error  data: {"message": "...", "status": 500}              (a failure after the first event)
# Errors before the stream starts keep their JSON body and status code.
STREAM_MEDIA_TYPE = "text/event-stream"
DELTA_EVENT, DONE_EVENT, ERROR_EVENT = "delta", "done", "error"


class ServingError(Exception):
    """An answer other than 200: the message names what is wrong; `status` is the HTTP status."""

    status = 500
    headers: dict[str, str] = {}

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        if status is not None:
            self.status = status


class BadRequest(ServingError):
    """A client error: the message names the field and what is expected."""

    status = 400


class Busy(ServingError):
    """The request queue is full: the client should come back after Retry-After seconds."""

    status = 503

    def __init__(self, retry_after: int = 1):
        super().__init__(f"the server is busy (queue full); retry after {retry_after} s")
        self.headers = {"Retry-After": str(retry_after)}


class GenerationFailed(ServingError):
    """Generation failed for this request (e.g. out of GPU memory); the server keeps serving others."""

    status = 500


class Expired(ServingError):
    """Nobody waits for this answer any more (past the server's deadline, or the client hung up): generation stopped."""

    status = 504


class Unavailable(ServingError):
    """The generation engine cannot serve (it stopped); liveness fails so the container is restarted."""

    status = 503


class ShuttingDown(ServingError):
    """The server is stopping: requests it can no longer finish in its drain time are answered with this."""

    status = 503

    def __init__(self, message: str = "the server is shutting down; ask again"):
        super().__init__(message)
        self.headers = {"Retry-After": "1"}


@dataclass(frozen=True)
class Param:
    """One generation parameter's type and allowed range."""

    kind: type
    low: float
    high: float
    low_open: bool = False

    def check(self, name: str, value: Any, where: str = "parameters.") -> Any:
        """The value, validated; BadRequest names the field as the client spelled it (`where` + `name`)."""
        name = f"{where}{name}"
        if self.kind is bool:
            if not isinstance(value, bool):
                raise BadRequest(f"{name} must be true or false, got {_show(value)}")
            return value
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise BadRequest(f"{name} must be a number, got {_show(value)}")
        if isinstance(value, int) and abs(value) > 10**9:  # huge integers overflow float()
            raise BadRequest(f"{name} must be in {self.range()}, got a {len(str(abs(value)))}-digit number")
        if not math.isfinite(value):
            raise BadRequest(f"{name} must be a finite number, got {value}")
        if self.kind is int and value != int(value):
            raise BadRequest(f"{name} must be a whole number, got {value}")
        low_ok = value > self.low if self.low_open else value >= self.low
        if not low_ok or value > self.high:
            raise BadRequest(f"{name} must be in {self.range()}, got {value}")
        return self.kind(value)

    def range(self) -> str:
        return f"{'(' if self.low_open else '['}{self.low:g}, {self.high:g}]"


PARAMS: dict[str, Param] = {
    "temperature": Param(float, 0.0, 2.0),
    "top_p": Param(float, 0.0, 1.0, low_open=True),
    "max_new_tokens": Param(int, 1, 4096),
    "do_sample": Param(bool, 0, 1),
    "repetition_penalty": Param(float, 0.01, 10.0),  # dividing logits by less overflows when sampling
}


@dataclass(frozen=True)
class Parameters:
    """Validated generation parameters of one request (defaults are the contract's)."""

    temperature: float = 0.7
    top_p: float = 1.0
    max_new_tokens: int = 128
    do_sample: bool = True
    repetition_penalty: float = 1.0

    @property
    def greedy(self) -> bool:
        """Greedy unless sampling is asked for with a (practically) non-zero temperature."""
        return not self.do_sample or self.temperature < GREEDY_BELOW

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


DEFAULTS = Parameters()


@dataclass(frozen=True)
class ChatRequest:
    messages: list[dict[str, str]]
    params: Parameters


def authorized(key: bytes | None, authorization: str | bytes | None, api_key: str | bytes | None) -> bool:
    """Whether a request carries `key` (always, when it is None), as `Authorization: Bearer <key>` or `api-key: <key>`
    (KEY_HEADERS). The scoring script and the gunicorn worker, which checks before reading a body, both ask here.

    Header values come as the server parsed them: bytes, or text decoded as Latin-1 (WSGI's rule). Both candidates
    are compared in constant time (compare_digest's time does not depend on where the tokens differ)."""
    if key is None:
        return True
    scheme, _, token = _raw(authorization).partition(b" ")
    bearer = hmac.compare_digest(token.strip(), key) and scheme.lower() == b"bearer"
    return hmac.compare_digest(_raw(api_key).strip(), key) or bearer


def _raw(value: str | bytes | None) -> bytes:
    if isinstance(value, str):
        return value.encode("latin-1", errors="replace")
    return value or b""


def _show(value: Any, limit: int = 60) -> str:
    """A value for an error message, cut short (hostile inputs must not be echoed whole)."""
    text = json.dumps(value, ensure_ascii=True) if not isinstance(value, (dict, list)) else type(value).__name__
    return text if len(text) <= limit else text[:limit] + "..."


def load_json(body: bytes, send: str) -> Any:
    """The JSON value of a raw request body; BadRequest when it is too large, too deep or not JSON (`send`: what to send)."""
    if len(body) > MAX_BODY_BYTES:
        raise BadRequest(f"request body is {len(body)} bytes; the limit is {MAX_BODY_BYTES}", status=413)
    try:
        return json.loads(body)
    except RecursionError:
        raise BadRequest(f"request body nests JSON too deeply; send {send}") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadRequest(f"request body is not valid JSON ({str(exc)[:120]}); send {send}") from None


def parse_request(body: bytes) -> ChatRequest:
    """Validate a raw request body against the endpoint contract (BadRequest names what is wrong)."""
    data = load_json(body, '{"input_data": {...}}')
    if not isinstance(data, dict) or "input_data" not in data:
        raise BadRequest('missing "input_data": send {"input_data": {"input_string": [{"role": "user", "content": "..."}]}}')
    input_data = data["input_data"]
    if not isinstance(input_data, dict):
        raise BadRequest("input_data must be an object with input_string (a list of turns) and optional parameters")
    turns = input_data.get("input_string")
    if not isinstance(turns, list) or not turns:
        raise BadRequest('input_data.input_string must be a non-empty list of {"role": ..., "content": ...} turns')
    messages = check_turns(turns, "input_data.input_string")
    raw = input_data.get("parameters")
    if raw is None:  # absent, or null
        raw = {}
    if not isinstance(raw, dict):
        raise BadRequest('input_data.parameters must be an object, e.g. {"temperature": 0.7, "max_new_tokens": 128}')
    unknown = sorted(set(raw) - set(PARAMS))
    if unknown:
        names = ", ".join(_show(name, 40) for name in unknown[:5])
        raise BadRequest(f"unknown parameter(s) {names} in input_data.parameters; supported: {', '.join(PARAMS)}")
    return ChatRequest(messages, check_parameters(raw))


def check_turns(turns: list, where: str) -> list[dict[str, str]]:
    """Role/content turns as the model takes them: known roles, text content, a system turn only first, a user turn
    last. `where` is the list's name in the client's request (errors name the turn and field)."""
    messages = []
    for i, turn in enumerate(turns):
        at = f"{where}[{i}]"
        if not isinstance(turn, dict):
            raise BadRequest(f'{at} must be an object {{"role": ..., "content": ...}}')
        role, content = turn.get("role"), turn.get("content")
        if role not in ROLES:
            raise BadRequest(f"{at}.role must be one of {', '.join(ROLES)}, got {_show(role)}")
        if not isinstance(content, str):
            raise BadRequest(f"{at}.content must be a string, got {_show(content)}")
        if not _encodable(content):
            raise BadRequest(f"{at}.content is not valid Unicode text (it holds a lone surrogate)")
        if role == "system" and i != 0:
            raise BadRequest(f"{at}: a system turn is only allowed first")
        messages.append({"role": role, "content": content})
    if not messages or messages[-1]["role"] != "user":
        raise BadRequest(f"{where} must end with a user turn (the one to answer)")
    return messages


def check_parameters(raw: dict[str, Any], where: str = "parameters.", names: dict[str, str] | None = None) -> Parameters:
    """Generation parameters (keys of PARAMS) validated against their ranges; `names` maps a parameter to the name the
    client used for it, so errors name the field the client sent."""
    names = names or {}
    return Parameters(**{name: PARAMS[name].check(names.get(name, name), value, where) for name, value in raw.items()})


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
