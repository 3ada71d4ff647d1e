"""The scoring code: the endpoint contract (and OpenAI's Chat Completions) over a chat model, with an optional LoRA adapter.

Runs unchanged in a managed online deployment and locally under `azmlinfsrv` (see `phi3flow serve`), whose entry
script, deploy/score.py, hands `init` and `run` to the server. This module is the thin layer (init, run, auth,
streaming); the contract, model loading and the generation engines are the `phi3serve` modules beside it.
"""

from __future__ import annotations

import json
import logging
import math
import os
import select
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from queue import Empty, Queue
from typing import Any

from azureml_inference_server_http.api.aml_request import rawhttp
from azureml_inference_server_http.api.aml_response import AMLResponse
from flask import Response
from gunicorn.http.errors import ParseException
from werkzeug.exceptions import ClientDisconnected

from phi3serve import openai
from phi3serve.contract import (
    BATCH_INVARIANT_HEADER,
    BATCH_SIZE_HEADER,
    DELTA_EVENT,
    DONE_EVENT,
    ERROR_EVENT,
    MAX_BODY_BYTES,
    PARAMS,
    STREAM_MEDIA_TYPE,
    TRUNCATED_HEADER,
    BadRequest,
    ChatRequest,
    ServingError,
    ShuttingDown,
    Unavailable,
    authorized,
    parse_request,
)
from phi3serve.engine import Answer, Engine, Job, engine_for, start
from phi3serve.model import ChatModel
from phi3serve.settings import ENV, Settings

log = logging.getLogger("azmlinfsrv.score")  # a child of the server's logger, so it reaches its log handler

# Seconds a request may take before the server stops its generation: match request_timeout_ms of the deployment,
# since AzureML's gateway answers 408 at that point while the container would otherwise keep generating.
TIMEOUT_ENV = ENV["request_timeout_s"]
MAX_NEW_TOKENS_ENV = ENV["max_new_tokens"]  # the most new tokens one request may ask for
WATCHDOG_S = 2.0

_model: ChatModel | None = None
_engine: Engine | None = None
_key: bytes | None = None
_model_name = "phi3flow"  # the id OpenAI clients see (GET /v1/models)
_timeout_s: float = 90.0
_max_new_tokens: int = int(PARAMS["max_new_tokens"].high)
_drain_s: float = Settings.drain_s  # $PHI3FLOW_DRAIN_S, read by init()
_drain_deadline = math.inf  # once the server is stopping (SIGTERM): when answers still generating get a 503


def init() -> None:
    """Called once per worker by the inference server: read the settings (once), load the model from
    AZUREML_MODEL_DIR, start the engine."""
    global _model, _key, _engine, _timeout_s, _max_new_tokens, _model_name, _drain_s
    settings = Settings.from_env()
    if not settings.model_dir:
        raise RuntimeError("AZUREML_MODEL_DIR is not set: point it at a model folder (phi3flow serve --model-dir DIR)")
    _key, _drain_s = settings.key_bytes, settings.drain_s
    _timeout_s, _max_new_tokens = float(settings.request_timeout_s), settings.max_new_tokens
    _model = ChatModel.load(settings.model_dir, settings)
    _model_name = openai.served_name(settings.model_dir)
    _engine = engine_for(
        _model, max_batch=settings.max_batch, max_queue=settings.max_queue, wait_s=settings.batch_wait_s, choice=settings.engine
    )
    threading.Thread(target=watchdog, args=(_engine,), name="phi3flow-watchdog", daemon=True).start()
    drain_on_sigterm()
    log.info("Model ready (%s, %s on %s, context %d tokens)", type(_engine).__name__, _model.dtype, _model.device, _model.context)
    if add_openai_routes():
        log.info("OpenAI routes: %s, %s (model id %r)", openai.CHAT_PATH, openai.MODELS_PATH, _model_name)


def watchdog(engine: Engine, period_s: float = WATCHDOG_S) -> None:
    """When the engine can no longer serve, end this worker: the server starts a fresh one (and Azure's liveness
    probe sees the restart), instead of a worker that says Healthy while every request fails."""
    while engine.healthy():
        time.sleep(period_s)
    log.critical("The generation engine stopped; restarting this worker")
    os.kill(os.getpid(), signal.SIGTERM)


def drain_on_sigterm() -> None:
    """When the server stops (SIGTERM to this worker), new requests get a 503 at once and those in flight have
    $PHI3FLOW_DRAIN_S to finish, then get a 503 too: the server (gunicorn's handler, which runs as before) exits within
    a bounded time and no client is left without an answer. Signal handlers can only be set from the main thread."""
    if threading.current_thread() is not threading.main_thread():
        log.warning("init() runs outside the main thread: requests in flight at shutdown are not drained")
        return
    previous = signal.getsignal(signal.SIGTERM)

    def stopping(signum: int, frame: Any) -> None:
        global _drain_deadline
        if _drain_deadline == math.inf:
            _drain_deadline = time.monotonic() + _drain_s
            log.info("Stopping: requests in flight have %g s to finish", _drain_s)
        if callable(previous):
            previous(signum, frame)
        elif previous != signal.SIG_IGN:  # the default action: end the process, as it would have
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)

    signal.signal(signal.SIGTERM, stopping)


def _drained(job: Job) -> None:
    """Past the drain time of a stopping server: stop the job, and answer 503."""
    if time.monotonic() > _drain_deadline:
        job.cancel()
        raise ShuttingDown("the server is shutting down and stopped this generation; ask again")


def _serving() -> tuple[Engine, ChatModel]:
    """The engine and model init() started; Unavailable when there are none or the engine stopped."""
    if _engine is None or _model is None or not _engine.healthy():
        raise Unavailable("the generation engine is not running; the server is restarting")
    return _engine, _model


def _stream_of(job: Job) -> Queue:
    """A streamed job's token queue (submit(stream=True) made it)."""
    if job.stream is None:
        raise TypeError("this job was not submitted for streaming")
    return job.stream


def submit(body: bytes | ChatRequest, stream: bool = False) -> tuple[Job, int]:
    """Validate (a raw contract body), encode and queue a request: (job, turns dropped). Raises ServingError."""
    engine, model = _serving()
    if _drain_deadline < math.inf:
        raise ShuttingDown()
    request = parse_request(body) if isinstance(body, bytes) else body
    if request.params.max_new_tokens > _max_new_tokens:
        raise BadRequest(
            f"parameters.max_new_tokens may be at most {_max_new_tokens} on this server "
            f"({MAX_NEW_TOKENS_ENV}), got {request.params.max_new_tokens}"
        )
    return start(engine, model, request, _timeout_s, stream)


def _headers(dropped: int, answer: Answer | None = None) -> dict[str, str]:
    headers = {BATCH_INVARIANT_HEADER: "true" if _engine is not None and _engine.batch_invariant else "false"}
    if answer is not None:
        headers[BATCH_SIZE_HEADER] = str(answer.batch_size)
    if dropped:
        headers[TRUNCATED_HEADER] = str(dropped)
    return headers


def score(body: bytes, client_gone: Callable[[], bool] = lambda: False) -> tuple[dict, int, dict[str, str]]:
    """The contract without HTTP: (payload, status, headers). Used by run() and by tests.

    While it waits, a client that has hung up (`client_gone`) or a request past its deadline is dropped from
    the batch: nobody would read the answer, and its slot serves others.
    """
    try:
        job, dropped = submit(body)
        answer = _wait(job, client_gone)
    except ServingError as exc:
        return {"message": str(exc)}, exc.status, dict(exc.headers)
    return {"output": answer.text}, 200, _headers(dropped, answer)


def _wait(job: Job, client_gone: Callable[[], bool]) -> Answer:
    """The job's answer; ServingError 499 when the client hung up, 504 past the deadline (the job is then cancelled)."""
    give_up = time.monotonic() + _timeout_s + 30  # in case the engine never resolves the job
    while True:
        try:
            return job.future.result(timeout=0.25)
        except TimeoutError:
            _drained(job)
            if client_gone():
                job.cancel()
                raise ServingError("the client closed the connection; generation was stopped", status=499) from None
            if time.monotonic() > give_up:  # past the deadline the engine resolves it with Expired at its next step
                job.cancel()
                raise ServingError(
                    f"generation took longer than {TIMEOUT_ENV}={_timeout_s:g} s and was stopped", status=504
                ) from None


def chat_completion(
    body: bytes | openai.CompletionRequest, client_gone: Callable[[], bool] = lambda: False
) -> tuple[dict, int, dict[str, str]]:
    """OpenAI's Chat Completions without HTTP, on the same path as score(): (payload, status, headers)."""
    try:
        request = openai.parse(body) if isinstance(body, bytes) else body
        job, dropped = submit(request.chat)
        answer = _wait(job, client_gone)
    except ServingError as exc:
        return openai.error(exc), exc.status, dict(exc.headers)
    return openai.completion(request, _model_name, answer.text, len(job.ids), answer.tokens), 200, _headers(dropped, answer)


def _hung_up(request: Any) -> Callable[[], bool]:
    """Whether the client closed its connection: a zero-byte peek at the socket gunicorn hands the app."""
    sock = request.environ.get("gunicorn.socket")

    def gone() -> bool:
        if sock is None:
            return False
        try:
            if not select.select([sock], [], [], 0)[0]:
                return False  # nothing to read: the client is still waiting
            return socket.socket.recv(sock, 1, socket.MSG_PEEK) == b""  # readable and empty: it hung up
        except (ConnectionResetError, BrokenPipeError):
            return True
        except OSError:  # anything else is no proof the client left
            return False

    return gone


def _event(name: str, data: dict) -> str:
    return f"event: {name}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n"


def stream_events(job: Job, dropped: int, first: list[int]) -> Iterator[str]:
    """Server-sent events of one answer: text deltas as tokens arrive, then `done` (or `error`).

    Deltas are the growing decoded text with surrounding whitespace held back, so they add up to exactly
    the `output` of the final event (the same text the JSON answer has). A client that goes away ends the
    generator (GeneratorExit), which cancels the job: its batch slot is freed at the next step.
    """
    try:
        for piece in _deltas(job, list(first)):
            yield _event(DELTA_EVENT, {"text": piece})
        answer = job.future.result()
        yield _event(
            DONE_EVENT,
            {"output": answer.text, "truncated_turns": dropped, "batch_size": answer.batch_size, "tokens": answer.tokens},
        )
    except ServingError as exc:
        yield _event(ERROR_EVENT, {"message": str(exc), "status": exc.status})
    finally:
        job.cancel()


def _deltas(job: Job, tokens: list[int]) -> Iterator[str]:
    """The answer's text in pieces as its tokens arrive (appended to `tokens`, which starts with the first ones); the
    pieces add up to the answer's text. Raises the job's ServingError."""
    sent, stream, model = "", _stream_of(job), _serving()[1]
    while True:
        text = model.text(tokens)
        if text.startswith(sent) and len(text) > len(sent):  # whole characters only (ChatModel.text)
            yield text[len(sent) :]
            sent = text
        if job.future.done() and stream.empty():
            break
        _drained(job)
        try:
            tokens.append(stream.get(timeout=0.05))
            while not stream.empty():
                tokens.append(stream.get_nowait())
        except Empty:
            continue
    answer = job.future.result()
    if answer.text.startswith(sent) and len(answer.text) > len(sent):
        yield answer.text[len(sent) :]


def completion_chunks(request: openai.CompletionRequest, job: Job, first: list[int]) -> Iterator[str]:
    """OpenAI's stream of one answer: `chat.completion.chunk` events (the role, text pieces up to the first stop
    sequence, the finish reason, usage when asked for), then `data: [DONE]`; a failure mid-stream is an error event.
    A client that goes away ends the generator, which cancels the job (as stream_events does)."""
    cid, model, created = openai.completion_id(), request.model or _model_name, int(time.time())
    scanner, tokens = openai.StopScanner(request.stop), list(first)
    try:
        yield openai.chunk(cid, model, created, openai.Delta(role="assistant", content=""))
        for piece in _deltas(job, tokens):
            if text := scanner.feed(piece):
                yield openai.chunk(cid, model, created, openai.Delta(content=text))
            if scanner.hit:
                job.cancel()  # the rest of the answer is not wanted
                break
        if text := scanner.flush():
            yield openai.chunk(cid, model, created, openai.Delta(content=text))
        count = len(tokens) if scanner.hit else job.future.result().tokens
        yield openai.chunk(
            cid, model, created, finish=openai.finish_reason(count, request.chat.params.max_new_tokens, scanner.hit)
        )
        if request.include_usage:
            yield openai.chunk(cid, model, created, usage=openai.Usage(len(job.ids), count, len(job.ids) + count))
        yield openai.DONE_LINE
    except ServingError as exc:
        yield f"data: {json.dumps(openai.error(exc), ensure_ascii=False)}\n\n"
        yield openai.DONE_LINE
    finally:
        job.cancel()


def _first_tokens(job: Job) -> list[int]:
    """Wait for the first token (or the end): errors before the stream starts keep their status code."""
    deadline, stream = time.monotonic() + _timeout_s, _stream_of(job)
    while time.monotonic() < deadline:
        try:
            return [stream.get(timeout=0.05)]
        except Empty:
            if job.future.done():
                job.future.result()  # raises the ServingError of a failed generation
                return []
            _drained(job)
    job.cancel()
    raise ServingError(f"no token within {TIMEOUT_ENV}={_timeout_s:g} s; generation was stopped", status=504)


def _json(payload: dict, status: int, headers: dict[str, str] | None = None) -> AMLResponse:
    return AMLResponse(payload, status, headers or {}, json_str=True)


KEY_MESSAGE = "missing or wrong key: send 'Authorization: Bearer <key>' or 'api-key: <key>'"
STREAM_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def _body(request: Any) -> bytes:
    """The request body, read at most one byte past the limit whatever the framing (a chunked body has no
    Content-Length); ServingError 413 when it is too large, 408 when it stopped arriving."""
    if (request.content_length or 0) > MAX_BODY_BYTES:
        raise ServingError(f"request body is over the {MAX_BODY_BYTES}-byte limit", status=413)
    try:
        return request.stream.read(MAX_BODY_BYTES + 1)
    except (OSError, ClientDisconnected):  # the body stopped arriving (the server's read deadline) or the client left
        raise ServingError("the request body did not arrive in time: send it whole", status=408) from None
    except ParseException as exc:  # gunicorn's chunked-body parser: invalid framing is the client's error
        raise BadRequest(
            f"the request body's chunked framing is invalid ({type(exc).__name__}): send each chunk as "
            "<size in hex>\\r\\n<data>\\r\\n and end with 0\\r\\n\\r\\n"
        ) from None


def _key_ok(request: Any) -> bool:
    return authorized(_key, request.headers.get("Authorization"), request.headers.get("api-key"))


def _event_stream(events: Iterator[str], dropped: int) -> Response:
    """A 200 of server-sent events (either dialect), with the contract's headers."""
    return Response(events, status=200, mimetype=STREAM_MEDIA_TYPE, headers={**_headers(dropped), **STREAM_HEADERS})


@rawhttp
def run(request: Any) -> Any:
    """Entry point for each request (raw HTTP so errors keep their 4xx status; SSE when the client asks for it).

    A Chat Completions body (`messages`, no `input_data`) is answered as OpenAI's API would: how an OpenAI body reaches
    the deployment through its scoring URI when a client cannot use the /v1 routes."""
    if not _key_ok(request):
        return _json({"message": KEY_MESSAGE}, 401, {"WWW-Authenticate": "Bearer"})
    if request.method != "POST":
        return _json({"message": "POST a JSON body to /score"}, 405, {"Allow": "POST"})
    try:
        body = _body(request)
    except ServingError as exc:
        return _json({"message": str(exc)}, exc.status)
    if openai.is_chat_body(body):
        return _openai_answer(request, body)
    if STREAM_MEDIA_TYPE not in (request.headers.get("Accept") or ""):
        return _json(*score(body, _hung_up(request)))
    try:
        job, dropped = submit(body, stream=True)
        first = _first_tokens(job)
    except ServingError as exc:
        return _json({"message": str(exc)}, exc.status, dict(exc.headers))
    return _event_stream(stream_events(job, dropped, first), dropped)


def _openai_answer(request: Any, body: bytes) -> Any:
    """A Chat Completions request answered whole (`chat.completion`) or streamed (`chat.completion.chunk` events)."""
    try:
        parsed = openai.parse(body)
        if not parsed.stream:
            return _json(*chat_completion(parsed, _hung_up(request)))
        job, dropped = submit(parsed.chat, stream=True)
        first = _first_tokens(job)
    except ServingError as exc:
        return _json(openai.error(exc), exc.status, dict(exc.headers))
    return _event_stream(completion_chunks(parsed, job, first), dropped)


def _openai_view(handle: Callable[[Any], Any]) -> Callable[[], Any]:
    """A Flask view for an OpenAI route: the key checked first, errors in OpenAI's shape."""

    def view() -> Any:
        from flask import request

        if not _key_ok(request):
            return _json(openai.error_body(KEY_MESSAGE, 401), 401, {"WWW-Authenticate": "Bearer"})
        return handle(request)

    view.__name__ = f"openai_{handle.__name__.strip('_')}"
    return view


def _chat_route(request: Any) -> Any:
    if request.method != "POST":
        return _json(openai.error_body(f"POST a JSON body to {openai.CHAT_PATH}", 405), 405, {"Allow": "POST"})
    try:
        body = _body(request)
    except ServingError as exc:
        return _json(openai.error(exc), exc.status)
    return _openai_answer(request, body)


def _models_route(request: Any) -> Any:
    return _json(openai.models(_model_name), 200)


def add_openai_routes() -> bool:
    """Serve /v1/chat/completions and /v1/models beside azmlinfsrv's own routes (`/`, `/score`, `/swagger.json`).

    azmlinfsrv 1.4.1 calls init() while it registers its blueprint with the Flask app, before the registration is
    done: rules added to the blueprint then are served like its own. False when not under azmlinfsrv (tests that
    call init() directly) or when that blueprint is already registered (another azmlinfsrv version)."""
    routes = sys.modules.get("azureml_inference_server_http.server.routes")
    blueprint = getattr(routes, "main_blueprint", None)
    if blueprint is None or blueprint._got_registered_once:
        return False
    blueprint.add_url_rule(openai.CHAT_PATH, view_func=_openai_view(_chat_route), methods=["GET", "POST"])
    blueprint.add_url_rule(openai.MODELS_PATH, view_func=_openai_view(_models_route), methods=["GET"])
    return True
