"""OpenAI's Chat Completions API over the endpoint contract: requests become the contract's ChatRequest, answers
OpenAI's `chat.completion` / `chat.completion.chunk` shapes, errors `{"error": {"message", "type", "param", "code"}}`.

Modelled on vLLM's entrypoints/openai/protocol.py (the API as typed models), as dataclasses: no pydantic and no
phi3flow import, so it runs in the Azure deployment too. Validation and limits are the contract's (phi3serve.contract):
the same turns rules, parameter ranges and defaults as `/score`, with errors that name the OpenAI field. Fields the
engine cannot honour are refused with a 400, never silently dropped.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from phi3serve.contract import GREEDY_BELOW, BadRequest, ChatRequest, ServingError, check_parameters, check_turns, load_json

CHAT_PATH, MODELS_PATH = "/v1/chat/completions", "/v1/models"
DONE_LINE = "data: [DONE]\n\n"
MAX_STOP = 4  # stop sequences per request, as OpenAI allows
# OpenAI field -> contract parameter. `repetition_penalty` is an extension (vLLM takes it too); `do_sample` is not:
# temperature 0 asks for greedy decoding.
PARAMETERS = {
    "temperature": "temperature",
    "top_p": "top_p",
    "max_tokens": "max_new_tokens",
    "max_completion_tokens": "max_new_tokens",
    "repetition_penalty": "repetition_penalty",
}
# Fields accepted only with the value that asks for nothing beyond one plain text answer.
NEUTRAL: dict[str, tuple[Any, ...]] = {
    "n": (1,),
    "presence_penalty": (0,),
    "frequency_penalty": (0,),
    "logprobs": (False,),
    "tools": ([],),
    "tool_choice": ("none",),
    "response_format": ({"type": "text"},),
    "store": (False,),
    "parallel_tool_calls": (True, False),
}
ACCEPTED = {"messages", "model", "stream", "stream_options", "stop", "seed", "user", *PARAMETERS, *NEUTRAL}
WHY_NOT = {
    "n": "the endpoint generates one choice per request; send n requests",
    "tools": "the model cannot call tools",
    "tool_choice": "the model cannot call tools",
    "logprobs": "the endpoint does not return log probabilities",
    "response_format": "the endpoint answers in plain text only (no JSON mode)",
    "presence_penalty": "use repetition_penalty (a multiplier, 1 = none) instead",
    "frequency_penalty": "use repetition_penalty (a multiplier, 1 = none) instead",
}
ROLE_ALIASES = {"developer": "system"}  # OpenAI's newer name for system instructions


class FieldError(BadRequest):
    """A 400 about one request field, named in the error's `param`."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class CompletionRequest:
    """A validated Chat Completions request: the contract's ChatRequest plus what only this API has."""

    chat: ChatRequest
    model: str | None
    stop: tuple[str, ...] = ()
    stream: bool = False
    include_usage: bool = False


@dataclass
class ErrorInfo:
    message: str
    type: str
    param: str | None = None
    code: str | None = None


@dataclass
class Usage:
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


@dataclass
class ChatMessage:
    role: str
    content: str


@dataclass
class Choice:
    index: int
    message: ChatMessage
    finish_reason: str
    logprobs: None = None


@dataclass
class ChatCompletion:
    id: str
    model: str
    choices: list[Choice]
    usage: Usage
    created: int = field(default_factory=lambda: int(time.time()))
    object: str = "chat.completion"


@dataclass
class Delta:
    role: str | None = None
    content: str | None = None


@dataclass
class StreamChoice:
    index: int
    delta: Delta
    finish_reason: str | None = None
    logprobs: None = None


@dataclass
class ChatCompletionChunk:
    id: str
    model: str
    created: int
    choices: list[StreamChoice]
    usage: Usage | None = None
    object: str = "chat.completion.chunk"


@dataclass
class ModelCard:
    id: str
    created: int = field(default_factory=lambda: int(time.time()))
    owned_by: str = "phi3flow"
    object: str = "model"


def served_name(model_dir: str) -> str:
    """The model's id for OpenAI clients: its folder's name (AzureML mounts a registered model at <name>/<version>)."""
    path = Path(model_dir).resolve()
    while path.name.isdigit() and path.parent != path:
        path = path.parent
    return path.name or "phi3flow"


def is_chat_body(body: bytes) -> bool:
    """Whether a body sent to the scoring route is a Chat Completions request (`messages`, no `input_data`): the way an
    OpenAI body reaches the deployment through its scoring URI."""
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        return False
    return isinstance(data, dict) and "messages" in data and "input_data" not in data


def parse(body: bytes) -> CompletionRequest:
    """Validate a Chat Completions body into the contract's request (BadRequest names the OpenAI field)."""
    data = load_json(body, '{"messages": [{"role": "user", "content": "..."}]}')
    if not isinstance(data, dict):
        raise BadRequest('the body must be a JSON object: {"messages": [{"role": "user", "content": "..."}]}')
    data = {name: value for name, value in data.items() if value is not None}  # null means "not given" to OpenAI's SDKs
    unknown = sorted(set(data) - ACCEPTED)
    if unknown:
        name = unknown[0][:40]
        raise FieldError(f"{name} is not supported by this endpoint; it takes {', '.join(sorted(ACCEPTED))}", name)
    for name, allowed in NEUTRAL.items():
        if name in data and data[name] not in allowed:
            raise BadRequest(
                f"{name} must be {' or '.join(json.dumps(v) for v in allowed)}: {WHY_NOT.get(name, 'not supported')}"
            )
    turns = data.get("messages")
    if not isinstance(turns, list) or not turns:
        raise BadRequest('messages must be a non-empty list of {"role": ..., "content": ...} messages')
    if "max_tokens" in data and "max_completion_tokens" in data and data["max_tokens"] != data["max_completion_tokens"]:
        raise BadRequest("max_tokens and max_completion_tokens differ: send one of them")
    raw = {PARAMETERS[name]: value for name, value in data.items() if name in PARAMETERS}
    names = {PARAMETERS[name]: name for name in data if name in PARAMETERS}
    params = check_parameters(raw, where="", names=names)
    seed = data.get("seed")
    if seed is not None:
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise BadRequest("seed must be an integer")
        if params.temperature >= GREEDY_BELOW:
            raise BadRequest(
                "seed is honoured only with temperature 0 (greedy answers are repeatable); requests sampled "
                "together in one batch share one random stream, so a seed cannot fix a sampled answer"
            )
    stream = data.get("stream", False)
    if not isinstance(stream, bool):
        raise BadRequest("stream must be true or false")
    options = data.get("stream_options", {})
    if (
        not isinstance(options, dict)
        or set(options) - {"include_usage"}
        or not isinstance(options.get("include_usage", False), bool)
    ):
        raise BadRequest('stream_options must be {"include_usage": true|false}')
    model = data.get("model")
    if model is not None and not isinstance(model, str):
        raise BadRequest("model must be a string")
    return CompletionRequest(
        ChatRequest(check_turns([_turn(t, i) for i, t in enumerate(turns)], "messages"), params),
        model,
        _stops(data.get("stop")),
        stream,
        bool(options.get("include_usage")),
    )


def _turn(turn: Any, i: int) -> Any:
    """An OpenAI message as a contract turn: text parts joined, `developer` as `system`; others left for check_turns."""
    if not isinstance(turn, dict):
        return turn
    role, content = turn.get("role"), turn.get("content")
    if role in ("tool", "function") or turn.get("tool_calls") or turn.get("function_call"):
        raise BadRequest(f"messages[{i}]: tool calls and tool results are not supported (the model cannot call tools)")
    if isinstance(content, list):
        texts = [part.get("text") if isinstance(part, dict) and part.get("type") == "text" else None for part in content]
        if not all(isinstance(text, str) for text in texts):
            raise BadRequest(f'messages[{i}].content: only text parts ({{"type": "text", "text": ...}}) are supported')
        content = "".join(str(text) for text in texts)
    return {"role": ROLE_ALIASES.get(role, role) if isinstance(role, str) else role, "content": content}


def _stops(stop: Any) -> tuple[str, ...]:
    stops = [stop] if isinstance(stop, str) else stop
    if stops is None:
        return ()
    if not isinstance(stops, list) or len(stops) > MAX_STOP or not all(isinstance(s, str) and s for s in stops):
        raise BadRequest(f"stop must be a non-empty string or a list of at most {MAX_STOP} non-empty strings")
    return tuple(stops)


def cut(text: str, stops: tuple[str, ...]) -> tuple[str, bool]:
    """The text up to the first stop sequence (which is left out), and whether one was found."""
    ends = [i for i in (text.find(s) for s in stops) if i >= 0]
    return (text[: min(ends)], True) if ends else (text, False)


class StopScanner:
    """Streams text pieces up to the first stop sequence: what might be the start of one is held back until it is not."""

    def __init__(self, stops: tuple[str, ...]):
        self.stops, self.text, self.sent, self.hit = stops, "", 0, False
        self.hold = max((len(s) for s in stops), default=1) - 1

    def feed(self, piece: str) -> str:
        """The part of the text so far that can be sent now ('' once a stop sequence was found)."""
        if self.hit:
            return ""
        self.text += piece
        text, self.hit = cut(self.text, self.stops)
        end = len(text) if self.hit else max(self.sent, len(text) - self.hold)
        out, self.sent = text[self.sent : end], end
        return out

    def flush(self) -> str:
        """The held-back rest, once the answer is complete."""
        out = "" if self.hit else self.text[self.sent :]
        self.sent = len(self.text)
        return out


def finish_reason(tokens: int, max_new_tokens: int, stopped: bool) -> str:
    """`length` when the answer ran into max_tokens, else `stop` (the end-of-turn token or a stop sequence)."""
    return "length" if tokens >= max_new_tokens and not stopped else "stop"


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def completion(request: CompletionRequest, model: str, text: str, prompt_tokens: int, tokens: int) -> dict:
    """A `chat.completion` for one generated answer (cut at the first stop sequence)."""
    text, stopped = cut(text, request.stop)
    choice = Choice(0, ChatMessage("assistant", text), finish_reason(tokens, request.chat.params.max_new_tokens, stopped))
    return asdict(
        ChatCompletion(completion_id(), request.model or model, [choice], Usage(prompt_tokens, tokens, prompt_tokens + tokens))
    )


def chunk(
    cid: str, model: str, created: int, delta: Delta | None = None, finish: str | None = None, usage: Usage | None = None
) -> str:
    """One `chat.completion.chunk` as a server-sent event; a usage chunk has no choices."""
    choices = [] if usage is not None else [StreamChoice(0, delta or Delta(), finish)]
    payload = asdict(ChatCompletionChunk(cid, model, created, choices, usage))
    if usage is None:
        payload.pop("usage")
    for choice in payload["choices"]:
        choice["delta"] = {name: value for name, value in choice["delta"].items() if value is not None}
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


def models(model: str) -> dict:
    return {"object": "list", "data": [asdict(ModelCard(model))]}


# Names the contract, the engine and the model use in their messages -> the OpenAI field they stand for.
_FIELDS = [("input_data.input_string", "messages"), ("parameters.max_new_tokens", "max_tokens"), ("parameters.", "")]
_PARAM = re.compile(r"^(messages(?:\[\d+\])?(?:\.\w+)?|[a-z_]+)(?=[\s:])")


def error(exc: ServingError) -> dict:
    """OpenAI's error body for a ServingError: the contract's field names replaced by OpenAI's, the field in `param`."""
    message = str(exc)
    for ours, theirs in _FIELDS:
        message = message.replace(ours, theirs)
    return error_body(message, exc.status, getattr(exc, "param", None))


def error_body(message: str, status: int, param: str | None = None) -> dict:
    match = _PARAM.match(message)
    if param is None and match and status == 400 and match.group(1).split("[")[0].split(".")[0] in ACCEPTED:
        param = match.group(1)
    kind = {401: "authentication_error", 404: "not_found_error", 429: "rate_limit_error"}.get(
        status, "invalid_request_error" if status < 500 else "server_error"
    )
    code = {401: "invalid_api_key", 413: "request_too_large", 503: "server_busy", 504: "timeout"}.get(status)
    return {"error": asdict(ErrorInfo(message, kind, param, code))}
