"""The one client for the AzureML chat endpoint contract, shared by the Prompt Flow tool, evaluation and agents.

One pooled `requests.Session` per endpoint; retries come from urllib3's `Retry` (exponential backoff
with jitter on 429/502/503/504 and connection errors, honouring `Retry-After`, no retry on other 4xx).
The total time of a call is bounded: at most `retries + 1` attempts, each within the connect/read
timeouts, with waits between them capped at `max_backoff` seconds (a long `Retry-After` included).
Errors say what to do next, and never contain the key.

`chat_stream` asks for server-sent events (wire format: `phi3serve.contract`) and yields text pieces as they
come; retries apply only until the stream starts, and any later failure raises `EndpointError` (never a silent cut).

Two dialects, one client: the AzureML contract (`{"input_data": ...}` -> `{"output": ...}`), and OpenAI's Chat
Completions for any OpenAI-compatible endpoint (Foundry Models, Foundry Local, vLLM, `phi3flow serve`'s /v1). With
`api_format="auto"` an endpoint whose URL path ends in /v1 speaks OpenAI's; the same retries, errors and key handling.
"""

from __future__ import annotations

import codecs
import contextlib
import hashlib
import json
import logging
import re
import threading
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import requests
import urllib3
from requests.adapters import HTTPAdapter
from urllib3.exceptions import NewConnectionError, ReadTimeoutError
from urllib3.util.retry import Retry

from phi3flow.errors import Phi3flowError
from phi3serve.contract import (
    BATCH_INVARIANT_HEADER,
    DEFAULTS,
    DELTA_EVENT,
    DONE_EVENT,
    ERROR_EVENT,
    GREEDY_BELOW,
    STREAM_MEDIA_TYPE,
)

log = logging.getLogger(__name__)

RETRY_STATUSES = frozenset({429, 502, 503, 504})
API_FORMATS = ("auto", "azureml", "openai")
CHAT_COMPLETIONS = "/chat/completions"
# Contract parameter -> OpenAI field. `repetition_penalty` passes as it is (vLLM and phi3flow serve take it).
OPENAI_FIELDS = {
    "temperature": "temperature",
    "top_p": "top_p",
    "max_new_tokens": "max_tokens",
    "repetition_penalty": "repetition_penalty",
}
MODEL_ERROR_HEADER = "ms-azureml-model-error-reason"


class EndpointError(Phi3flowError, RuntimeError):
    """The endpoint call failed; the message says why and what to check. `status` is the HTTP status if any."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


class _CappedRetry(Retry):
    """urllib3 Retry whose server-requested waits (Retry-After) are capped like its own backoff."""

    def parse_retry_after(self, retry_after: str) -> float:
        return min(super().parse_retry_after(retry_after), self.backoff_max)


class BatchDependentAnswers(UserWarning):
    """The endpoint's greedy answers can change with the requests decoded beside them (bf16 batches, for one)."""


class EndpointClient:
    """Calls one endpoint: `chat(messages, **parameters) -> str`."""

    def __init__(
        self,
        endpoint: str,
        key: str,
        *,
        connect_timeout: float = 10.0,
        read_timeout: float = 300.0,
        retries: int = 4,
        backoff_factor: float = 0.5,
        max_backoff: float = 20.0,
        pool_size: int = 32,
        api_format: str = "auto",
        model: str | None = None,
    ):
        parts = urlsplit(endpoint or "")
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise EndpointError(
                f"endpoint {endpoint!r} is not an http(s) URL; use the scoring URI, e.g. https://<name>.<region>.inference.ml.azure.com/score"
            )
        if not key or not key.strip():
            raise EndpointError("the endpoint key is empty: set the connection's secrets.key to the endpoint's primary key")
        if not key.isascii() or not key.isprintable():
            raise EndpointError(
                "the endpoint key contains non-ASCII or control characters: copy it again from the endpoint's Consume tab"
            )
        if api_format not in API_FORMATS:
            raise EndpointError(f"api_format must be one of {', '.join(API_FORMATS)}, got {api_format!r}")
        self.openai = api_format == "openai" or (api_format == "auto" and parts.path.rstrip("/").endswith("/v1"))
        self.model = model
        self.warned_batching = False  # said once per client that greedy answers depend on the batch
        self.endpoint = endpoint
        # OpenAI's dialect: <base>/v1 + /chat/completions; a full route (/chat/completions, or a deployment's /score) as it is
        self.url = (
            endpoint.rstrip("/") + CHAT_COMPLETIONS
            if self.openai and not parts.path.rstrip("/").endswith((CHAT_COMPLETIONS, "/score"))
            else endpoint
        )
        self.timeout = (connect_timeout, read_timeout)
        self.session = requests.Session()
        self.session.headers.update({"Authorization": f"Bearer {key.strip()}", "Content-Type": "application/json"})
        if self.openai:  # Azure OpenAI and Foundry resources read their key from api-key
            self.session.headers["api-key"] = key.strip()
        retry = _CappedRetry(
            total=retries,
            connect=retries,
            read=0,  # a read timeout means the model is busy generating: retrying would only pile on load
            status=retries,
            status_forcelist=RETRY_STATUSES,
            allowed_methods=None,  # POST is safe to retry here: scoring has no side effects
            backoff_factor=backoff_factor,
            backoff_max=max_backoff,
            backoff_jitter=backoff_factor,
            respect_retry_after_header=True,
            raise_on_status=False,  # hand the last response back so its status is explained below
        )
        adapter = HTTPAdapter(max_retries=retry, pool_connections=1, pool_maxsize=pool_size)
        self.session.mount("http://", adapter)
        self.session.mount("https://", adapter)

    def __repr__(self) -> str:
        return f"EndpointClient({self.endpoint!r})"

    def chat(self, messages: list[dict[str, str]], **parameters: Any) -> str:
        """Send a conversation (role/content turns, last one the user's) and return the assistant's answer."""
        return self._answer(self._post(messages, parameters))

    def chat_stream(self, messages: list[dict[str, str]], **parameters: Any) -> Iterator[str]:
        """Like `chat`, but yield the answer in pieces as the endpoint streams them; their concatenation is the answer.

        An endpoint that does not stream (a JSON answer) yields its whole answer once. Retries happen before the
        stream starts only; after it, a cut connection, an error event or a stream without its final event raises
        EndpointError. Closing the generator early drops the connection, which tells the server to stop generating.
        """
        response = self._post(messages, parameters, stream=True)
        try:
            if response.status_code != 200 or _media_type(response) != STREAM_MEDIA_TYPE:
                yield self._answer(response)
                return
            if self.openai:
                yield from self._openai_pieces(response)
                return
            sent = ""
            try:
                events = parse_sse(_arrivals(response))
                for event in events:
                    if event.type == DELTA_EVENT:
                        piece = self._event_field(event, "text", sent)
                        if piece:
                            sent += piece
                            yield piece
                    elif event.type == DONE_EVENT:
                        yield from self._rest_of_answer(self._event_field(event, "output", sent), sent)
                        with contextlib.suppress(requests.exceptions.RequestException, urllib3.exceptions.HTTPError):
                            for _ in events:  # the body's end, so the connection goes back to the pool
                                pass
                        return
                    elif event.type == ERROR_EVENT:
                        raise self._stream_error(event, sent)
            except (requests.exceptions.RequestException, urllib3.exceptions.HTTPError) as exc:
                raise self._stream_broke(sent, exc) from None
            raise EndpointError(
                f"the stream from {self._host()} ended after {len(sent)} characters without its final "
                f"'{DONE_EVENT}' event: the answer is incomplete; ask again"
            )
        finally:
            response.close()

    def _post(self, messages: list[dict[str, str]], parameters: dict[str, Any], stream: bool = False) -> requests.Response:
        """One POST of the contract's body, retried by the session's policy until an answer (or its head) arrives."""
        given = {k: v for k, v in parameters.items() if v is not None}
        temperature = given.get("temperature", DEFAULTS.temperature)
        greedy = given.get("do_sample") is False or (isinstance(temperature, (int, float)) and temperature < GREEDY_BELOW)
        if self.openai:
            body = self._openai_body(messages, given, stream)
        else:
            body = {"input_data": {"input_string": messages, "parameters": given}}
        headers = {"Accept": STREAM_MEDIA_TYPE} if stream else None
        try:
            response = self.session.post(self.url, json=body, headers=headers, timeout=self.timeout, stream=stream)
        except requests.exceptions.RequestException as exc:
            raise self._transport_error(exc) from None
        if greedy and not self.warned_batching and response.headers.get(BATCH_INVARIANT_HEADER, "").lower() == "false":
            self.warned_batching = True
            # a warning, not a log record: Prompt Flow shows a tool's warnings in `pf run` output and logs, not its logging
            warnings.warn(
                f"{self._host()} does not guarantee greedy answers independent of the requests decoded beside "
                f"them ({BATCH_INVARIANT_HEADER}: false): the same question can get another answer run to run "
                "(pf run's concurrency, other traffic); serve with PHI3FLOW_DTYPE=float32 on a CPU for "
                "reproducible runs",
                BatchDependentAnswers,
                stacklevel=2,
            )
        return response

    def _openai_body(self, messages: list[dict[str, str]], parameters: dict[str, Any], stream: bool) -> dict[str, Any]:
        """A Chat Completions body: the contract's parameters under OpenAI's names (do_sample=False is temperature 0)."""
        if parameters.pop("do_sample", True) is False:
            parameters["temperature"] = 0.0
        unknown = sorted(set(parameters) - set(OPENAI_FIELDS))
        if unknown:
            raise EndpointError(
                f"parameter(s) {', '.join(unknown)} have no Chat Completions equivalent; it takes {', '.join(OPENAI_FIELDS)}"
            )
        body = {"messages": messages, **{OPENAI_FIELDS[k]: v for k, v in parameters.items()}}
        if self.model:
            body["model"] = self.model
        if stream:
            body["stream"] = True
        return body

    def _openai_pieces(self, response: requests.Response) -> Iterator[str]:
        """The text pieces of a `chat.completion.chunk` stream, which must end in `data: [DONE]`."""
        sent = ""
        try:
            for event in parse_sse(_arrivals(response)):
                if event.data.strip() == "[DONE]":
                    return
                try:
                    chunk = json.loads(event.data)
                except ValueError:
                    chunk = None
                if isinstance(chunk, dict) and isinstance(chunk.get("error"), dict):
                    message = str(chunk["error"].get("message"))[:300]
                    raise EndpointError(
                        f"the endpoint failed after streaming {len(sent)} characters: {message}; the answer is incomplete"
                    )
                choices = chunk.get("choices") if isinstance(chunk, dict) else None
                if not isinstance(choices, list):
                    raise EndpointError(
                        f"{self.url} streamed an event that is not a chat.completion.chunk after {len(sent)} "
                        "characters: is this an OpenAI-compatible endpoint?"
                    )
                for choice in choices:
                    piece = (choice.get("delta") or {}).get("content") if isinstance(choice, dict) else None
                    if isinstance(piece, str) and piece:
                        sent += piece
                        yield piece
        except (requests.exceptions.RequestException, urllib3.exceptions.HTTPError) as exc:
            raise self._stream_broke(sent, exc) from None
        raise EndpointError(
            f"the stream from {self._host()} ended after {len(sent)} characters without 'data: [DONE]': "
            "the answer is incomplete; ask again"
        )

    def _event_field(self, event: ServerSentEvent, name: str, sent: str) -> str:
        """The string field `name` of an event's JSON data, or EndpointError saying the stream is malformed."""
        try:
            value = json.loads(event.data)[name]
        except (ValueError, TypeError, KeyError):
            value = None
        if not isinstance(value, str):
            raise EndpointError(
                f"{self.endpoint} streamed a '{event.type}' event without a string \"{name}\" field after "
                f"{len(sent)} characters: the deployment's score.py does not follow the streaming contract"
            )
        return value

    def _rest_of_answer(self, output: str, sent: str) -> Iterator[str]:
        """What the final event's whole answer adds to the pieces already sent (all of it when nothing was streamed)."""
        if not output.startswith(sent):
            raise EndpointError(
                f"{self.endpoint} streamed pieces that are not the start of its final answer: "
                "the deployment's score.py does not follow the streaming contract"
            )
        if len(output) > len(sent):
            yield output[len(sent) :]

    def _stream_broke(self, sent: str, exc: requests.exceptions.RequestException | urllib3.exceptions.HTTPError) -> EndpointError:
        """A stream cut after `sent` arrived: never a silently short answer."""
        return EndpointError(
            f"the stream from {self._host()} broke after {len(sent)} characters ({_reason(exc)}): "
            "the answer is incomplete; ask again"
        )

    def _stream_error(self, event: ServerSentEvent, sent: str) -> EndpointError:
        """An error event: the server's message and status, and that the answer is incomplete."""
        try:
            payload = json.loads(event.data)
        except ValueError:
            payload = None
        payload = payload if isinstance(payload, dict) else {}
        status = payload.get("status") if isinstance(payload.get("status"), int) else None
        said = payload.get("message")
        message = said if isinstance(said, str) else (event.data or "")
        code = f" (HTTP {status})" if status else ""
        return EndpointError(
            f"the endpoint failed after streaming {len(sent)} characters{code}: {message[:300]}; the answer is incomplete", status
        )

    def close(self) -> None:
        self.session.close()

    def _transport_error(self, exc: requests.exceptions.RequestException) -> EndpointError:
        """No HTTP answer: say whether we could not connect or the model did not answer in time."""
        reason = getattr(exc.args[0], "reason", None) if exc.args else None  # urllib3's cause inside MaxRetryError
        if isinstance(exc, requests.exceptions.ReadTimeout) or isinstance(reason, ReadTimeoutError):
            return EndpointError(
                f"{self._host()} gave no answer within {self.timeout[1]:g} s: the model may be overloaded; "
                "lower max_new_tokens or raise the client's read timeout"
            )
        if isinstance(exc, requests.exceptions.ConnectTimeout):
            return EndpointError(
                f"could not connect to {self._host()} within {self.timeout[0]:g} s: check the URL and your network"
            )
        cause = reason or (exc.args[0] if exc.args else None)
        if isinstance(exc, requests.exceptions.ConnectionError) and not isinstance(cause, NewConnectionError):
            # connected, so the request was sent: the server closed the connection before its answer
            return EndpointError(
                f"{self._host()} took the request but closed the connection without an answer: "
                "the server may be restarting or shutting down; ask again"
            )
        return EndpointError(f"cannot reach {self._host()} ({_reason(exc)}): is the endpoint running and the URL right?")

    def _host(self) -> str:
        parts = urlsplit(self.endpoint)
        return f"{parts.hostname}:{parts.port or (443 if parts.scheme == 'https' else 80)}"

    def _answer(self, response: requests.Response) -> str:
        status = response.status_code
        if status == 200:
            try:
                payload = response.json()
            except ValueError:
                raise EndpointError(
                    f"{self.endpoint} answered 200 with a body that is not JSON: is this the scoring URL?", status
                ) from None
            if self.openai:
                return self._completion_text(payload)
            if not isinstance(payload, dict) or not isinstance(payload.get("output"), str):
                got = sorted(payload) if isinstance(payload, dict) else type(payload).__name__
                raise EndpointError(
                    f'{self.endpoint} answered without a string "output" field (got {got}): the deployment\'s score.py '
                    'must return {"output": "<assistant text>"}',
                    status,
                )
            return payload["output"]
        detail = _detail(response)
        if status in (401, 403):
            message = (
                f"the endpoint refused the key (HTTP {status}): check the connection's key (secrets.key) for {self.endpoint}"
            )
        elif status == 404 and self.openai:
            message = (
                f"no chat completions route at {self.url} (HTTP 404): check the URL; OpenAI-compatible endpoints "
                "are given by their base URL, ending in /v1"
            )
        elif status == 404:
            message = f"no scoring route at {self.endpoint} (HTTP 404): check the URL; AzureML endpoints end in /score"
        elif status == 408:
            message = (
                "the model took longer than the deployment's request timeout (HTTP 408): raise "
                "request_settings.request_timeout_ms on the deployment or lower max_new_tokens"
            )
        elif status == 424:
            reason = response.headers.get(MODEL_ERROR_HEADER)
            message = f"the model container failed (HTTP 424{': ' + reason if reason else ''}): check the deployment's logs"
        elif status in RETRY_STATUSES:
            message = f"the endpoint was still busy or unavailable (HTTP {status}) after retrying: try again later or scale the deployment"
        elif 400 <= status < 500:
            message = f"the endpoint rejected the request (HTTP {status})"
        else:
            message = f"the endpoint failed (HTTP {status})"
        raise EndpointError(f"{message}{': ' + detail if detail else ''}", status)

    def _completion_text(self, payload: Any) -> str:
        """The answer of a `chat.completion`: its first choice's message content."""
        try:
            content = payload["choices"][0]["message"]["content"]
        except (TypeError, KeyError, IndexError):
            content = None
        if not isinstance(content, str):
            raise EndpointError(
                f"{self.url} answered without choices[0].message.content: is this an OpenAI-compatible "
                "chat completions endpoint?",
                200,
            )
        return content


@dataclass(frozen=True)
class ServerSentEvent:
    type: str
    data: str


# One line and its end: CRLF, LF, or a CR that is not the last character read so far (an LF may follow it).
_LINE = re.compile(r"([^\r\n]*)(?:\r\n|\n|\r(?!\Z))")


def _lines(chunks: Iterable[bytes]) -> Iterator[str]:
    """Complete lines of a UTF-8 byte stream (optional BOM) ending in CRLF, LF or CR, however the chunks split them."""
    decoder = codecs.getincrementaldecoder("utf-8-sig")(errors="replace")
    pending = ""
    for chunk in chunks:
        pending += decoder.decode(chunk)
        end = 0
        for line in _LINE.finditer(pending):
            end = line.end()
            yield line.group(1)
        pending = pending[end:]
    pending += decoder.decode(b"", final=True)
    if pending.endswith("\r"):  # a CR at the very end ends its line too
        yield pending[:-1]


def parse_sse(chunks: Iterable[bytes]) -> Iterator[ServerSentEvent]:
    """Server-sent events from a byte stream, as the HTML standard parses them (https://html.spec.whatwg.org/#event-stream-interpretation).

    A blank line dispatches the event; `data` lines join with newlines; comment lines (':') and id/retry
    fields are skipped; an event with no data is not dispatched, nor is an unfinished one at the end.
    """
    event_type, data = "", []
    for text in _lines(chunks):
        if not text:
            if data:
                yield ServerSentEvent(event_type or "message", "\n".join(data))
            event_type, data = "", []
            continue
        name, colon, value = text.partition(":")
        if colon and value.startswith(" "):
            value = value[1:]
        if name == "event":
            event_type = value
        elif name == "data":
            data.append(value)


def _arrivals(response: requests.Response) -> Iterator[bytes]:
    """The body as the network delivers it (`iter_content` waits to fill its buffer when a body is not chunked)."""
    while data := response.raw.read1(8192, decode_content=True):
        yield data


def _media_type(response: requests.Response) -> str:
    return response.headers.get("Content-Type", "").split(";")[0].strip().lower()


def _detail(response: requests.Response) -> str:
    """The server's own error message, short."""
    try:
        payload = response.json()
    except ValueError:
        return response.text.strip()[:300]
    if isinstance(payload, dict):
        if isinstance(payload.get("error"), dict) and isinstance(payload["error"].get("message"), str):  # OpenAI's shape
            return payload["error"]["message"][:300]
        for field in ("message", "error", "detail"):
            if isinstance(payload.get(field), str):
                return payload[field][:300]
    return str(payload)[:300]


def _reason(exc: requests.exceptions.RequestException | urllib3.exceptions.HTTPError) -> str:
    text = str(exc).lower()
    if "refused" in text:
        return "connection refused"
    if "name or service not known" in text or "nodename nor servname" in text or "failed to resolve" in text:
        return "host name not found"
    if "timed out" in text:
        return "timed out"
    if "connection broken" in text or "reset by peer" in text:
        return "connection broken"
    if "max retries exceeded" in text:
        return "no connection after retrying"
    return type(exc).__name__


_clients: dict[tuple[str, str], EndpointClient] = {}
_clients_lock = threading.Lock()


def get_client(endpoint: str, key: str, **options: Any) -> EndpointClient:
    """The pooled client for an endpoint (one connection pool per endpoint and key, reused across calls)."""
    cache_key = (endpoint, hashlib.sha256(f"{key}|{sorted(options.items())}".encode()).hexdigest())
    with _clients_lock:
        if cache_key not in _clients:
            _clients[cache_key] = EndpointClient(endpoint, key, **options)
        return _clients[cache_key]


def to_messages(question: str, chat_history: list[dict] | None = None, system_prompt: str = "") -> list[dict[str, str]]:
    """Prompt Flow chat history ([{"inputs": {...}, "outputs": {...}}]) plus the new question -> role/content turns.

    Each history turn's chat input and chat output are taken as the single string value of its
    `inputs` and `outputs` (or the conventional `question`/`input_data` and `answer`/`output` keys).
    """
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    for i, turn in enumerate(chat_history or []):
        if not isinstance(turn, dict) or not isinstance(turn.get("inputs"), dict) or not isinstance(turn.get("outputs"), dict):
            raise ValueError(
                f'chat_history[{i}] must look like {{"inputs": {{"input_data": ...}}, "outputs": {{"answer": ...}}}}'
            )
        messages.append(
            {
                "role": "user",
                "content": _turn_text(turn["inputs"], ("input_data", "question", "chat_input"), f"chat_history[{i}].inputs"),
            }
        )
        messages.append(
            {
                "role": "assistant",
                "content": _turn_text(turn["outputs"], ("answer", "output", "chat_output"), f"chat_history[{i}].outputs"),
            }
        )
    messages.append({"role": "user", "content": question})
    return messages


def _turn_text(values: dict, names: tuple[str, ...], where: str) -> str:
    for name in names:
        if isinstance(values.get(name), str):
            return values[name]
    strings = [v for v in values.values() if isinstance(v, str)]
    if len(strings) == 1:
        return strings[0]
    raise ValueError(f"{where} has no text to use: expected one of {', '.join(names)}")
