"""AzureML scoring script: the endpoint contract over a chat model, with an optional LoRA adapter.

Runs unchanged in a managed online deployment and locally under `azmlinfsrv` (see `phi3flow serve`).
Contract: POST {"input_data": {"input_string": [{"role", "content"}...], "parameters": {...}}}
-> {"output": "<assistant text>"}. Bad input gets a 4xx naming the field; never a 500 or a traceback.

Conversations longer than the model's context are left-truncated: the oldest turns after the system
prompt are dropped (the response header `x-phi3flow-truncated-turns` says how many) until the prompt
plus `max_new_tokens` fits; if the last user turn alone does not fit, the request is refused (400).
"""

from __future__ import annotations

import hmac
import json
import logging
import math
import os
import threading
import time
from concurrent.futures import Future
from pathlib import Path
from typing import Any, Callable, Generator, Iterator, NamedTuple

import torch
from azureml_inference_server_http.api.aml_request import rawhttp
from azureml_inference_server_http.api.aml_response import AMLResponse

log = logging.getLogger("azmlinfsrv.score")  # a child of the server's logger, so it reaches its log handler

KEY_ENV = "PHI3FLOW_ENDPOINT_KEY"  # set by `phi3flow serve`; in Azure the endpoint itself checks keys
BASE_MODEL_ENV = "PHI3FLOW_BASE_MODEL"  # overrides an adapter's base_model_name_or_path
DTYPE_ENV = "PHI3FLOW_DTYPE"  # auto (default), float32, bfloat16 or float16
# Dynamic batching (see Batcher); PHI3FLOW_MAX_BATCH=1 gives the naive one-request-at-a-time path.
MAX_BATCH_ENV, MAX_QUEUE_ENV, BATCH_WAIT_ENV = "PHI3FLOW_MAX_BATCH", "PHI3FLOW_MAX_QUEUE", "PHI3FLOW_BATCH_WAIT_MS"
MAX_BODY_BYTES = 1 << 20
ROLES = ("system", "user", "assistant")
# Tokens that end a turn in common chat templates; only those present in the tokenizer are used.
END_OF_TURN_TOKENS = ("<|end|>", "<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|endoftext|>")


class BadRequest(Exception):
    """A client error: the message names the field and what is expected."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


class Param(NamedTuple):
    """One generation parameter's type and allowed range (dataclasses need sys.modules, which azmlinfsrv's loader skips)."""

    kind: type
    low: float
    high: float
    low_open: bool = False

    def check(self, name: str, value: Any) -> Any:
        if self.kind is bool:
            if not isinstance(value, bool):
                raise BadRequest(f"parameters.{name} must be true or false, got {json.dumps(value)}")
            return value
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise BadRequest(f"parameters.{name} must be a number, got {json.dumps(value)}")
        if self.kind is int and value != int(value):
            raise BadRequest(f"parameters.{name} must be a whole number, got {value}")
        low_ok = value > self.low if self.low_open else value >= self.low
        if not low_ok or value > self.high:
            bracket = "(" if self.low_open else "["
            raise BadRequest(f"parameters.{name} must be in {bracket}{self.low:g}, {self.high:g}], got {value}")
        return self.kind(value)


PARAMS: dict[str, Param] = {
    "temperature": Param(float, 0.0, 2.0),
    "top_p": Param(float, 0.0, 1.0, low_open=True),
    "max_new_tokens": Param(int, 1, 4096),
    "do_sample": Param(bool, 0, 1),
    "repetition_penalty": Param(float, 0.01, 10.0),  # dividing logits by less overflows when sampling
}
GREEDY_BELOW = 1e-3  # temperatures under this decode greedily (dividing logits by ~0 overflows)
DEFAULTS = {"temperature": 0.7, "top_p": 1.0, "max_new_tokens": 128, "repetition_penalty": 1.0}


Prompt = tuple[list[int], dict[str, Any]]  # encoded prompt ids and its decoding parameters
Pending = tuple[list[int], dict[str, Any], Any]  # a Prompt plus a handle that its answer is returned with


class ChatRequest(NamedTuple):
    messages: list[dict[str, str]]
    params: dict[str, Any]


def parse_request(body: bytes) -> ChatRequest:
    """Validate a raw request body against the endpoint contract."""
    if len(body) > MAX_BODY_BYTES:
        raise BadRequest(f"request body is {len(body)} bytes; the limit is {MAX_BODY_BYTES}", status=413)
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadRequest(f"request body is not valid JSON ({exc}); send {{\"input_data\": {{...}}}}") from None
    if not isinstance(data, dict) or "input_data" not in data:
        raise BadRequest('missing "input_data": send {"input_data": {"input_string": [{"role": "user", "content": "..."}]}}')
    input_data = data["input_data"]
    if not isinstance(input_data, dict):
        raise BadRequest("input_data must be an object with input_string (a list of turns) and optional parameters")
    turns = input_data.get("input_string")
    if not isinstance(turns, list) or not turns:
        raise BadRequest('input_data.input_string must be a non-empty list of {"role": ..., "content": ...} turns')
    messages = []
    for i, turn in enumerate(turns):
        where = f"input_data.input_string[{i}]"
        if not isinstance(turn, dict):
            raise BadRequest(f'{where} must be an object {{"role": ..., "content": ...}}')
        role, content = turn.get("role"), turn.get("content")
        if role not in ROLES:
            raise BadRequest(f"{where}.role must be one of {', '.join(ROLES)}, got {json.dumps(role)}")
        if not isinstance(content, str):
            raise BadRequest(f"{where}.content must be a string, got {json.dumps(content)[:80]}")
        if role == "system" and i != 0:
            raise BadRequest(f"{where}: a system turn is only allowed first")
        messages.append({"role": role, "content": content})
    if messages[-1]["role"] != "user":
        raise BadRequest("input_data.input_string must end with a user turn (the one to answer)")
    raw_params = input_data.get("parameters", {})
    if raw_params is None:
        raw_params = {}
    if not isinstance(raw_params, dict):
        raise BadRequest("input_data.parameters must be an object, e.g. {\"temperature\": 0.7, \"max_new_tokens\": 128}")
    unknown = sorted(set(raw_params) - set(PARAMS))
    if unknown:
        raise BadRequest(f"unknown parameter(s) {', '.join(unknown)} in input_data.parameters; supported: {', '.join(PARAMS)}")
    params = {**DEFAULTS, **{name: PARAMS[name].check(name, value) for name, value in raw_params.items()}}
    return ChatRequest(messages, params)


def find_model_folder(root: Path) -> Path:
    """The folder holding the model: AZUREML_MODEL_DIR itself, a registered model's subfolder, or an MLflow one."""
    markers = ("adapter_config.json", "config.json")
    candidates = [root] + sorted(p.parent for marker in markers for p in root.rglob(marker))
    for folder in candidates:
        if any((folder / marker).is_file() for marker in markers):
            return folder
    raise FileNotFoundError(f"No model found under {root}: expected a Hugging Face folder (config.json) or a LoRA adapter (adapter_config.json)")


class ChatModel:
    """A causal LM with its tokenizer and chat template; generation stops at the end-of-turn token."""

    def __init__(self, model: Any, tokenizer: Any):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.context = int(getattr(model.config, "max_position_embeddings", 0) or 4096)
        self.stop_ids = self._stop_ids()
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.stop_ids[0]
        self.lock = threading.Lock()  # one decode loop at a time over the model
        self.device = next(model.parameters()).device

    @classmethod
    def load(cls, model_dir: str | os.PathLike) -> "ChatModel":
        from transformers import AutoModelForCausalLM, AutoTokenizer

        folder = find_model_folder(Path(model_dir))
        cuda = torch.cuda.is_available()
        dtype = _dtype(cuda)
        adapter = folder / "adapter_config.json"
        base = folder
        if adapter.is_file():
            base = os.environ.get(BASE_MODEL_ENV) or json.loads(adapter.read_text())["base_model_name_or_path"]
        model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype)
        if adapter.is_file():
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, folder)
            log.info("Loaded LoRA adapter %s on base %s", folder, base)
        has_tokenizer = any((folder / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json"))
        tokenizer = AutoTokenizer.from_pretrained(folder if has_tokenizer else base)
        if cuda:
            model = model.to("cuda")
        return cls(model, tokenizer)

    def _stop_ids(self) -> list[int]:
        ids: list[int] = []
        eos = getattr(self.model.generation_config, "eos_token_id", None)
        ids += eos if isinstance(eos, list) else [eos]
        ids.append(self.tokenizer.eos_token_id)
        vocab = self.tokenizer.get_vocab()
        ids += [vocab[token] for token in END_OF_TURN_TOKENS if token in vocab]
        return list(dict.fromkeys(i for i in ids if i is not None))

    def encode(self, messages: list[dict[str, str]], max_new_tokens: int) -> tuple[list[int], int]:
        """Token ids of the prompt, dropping the oldest turns if needed; returns (ids, turns dropped)."""
        budget = self.context - max_new_tokens
        if budget <= 0:
            raise BadRequest(f"parameters.max_new_tokens must be below the model's context of {self.context} tokens")
        system = messages[:1] if messages[0]["role"] == "system" else []
        turns = messages[len(system):]
        for dropped in range(len(turns)):
            window = turns[dropped:]
            if window[0]["role"] != "user":
                continue
            try:
                ids = self.tokenizer.apply_chat_template(system + window, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
            except Exception as exc:  # jinja errors: the template rejects this conversation shape
                raise BadRequest(f"input_data.input_string was rejected by the model's chat template: {exc}") from None
            if len(ids) <= budget:
                return list(ids), dropped
        raise BadRequest(
            f"the last user turn needs more than {budget} tokens (context {self.context} minus max_new_tokens "
            f"{max_new_tokens}); shorten it or lower parameters.max_new_tokens"
        )

    def generate(self, request: ChatRequest) -> tuple[str, int]:
        """One request on its own (tests and direct use; the server goes through Batcher)."""
        ids, dropped = self.encode(request.messages, request.params["max_new_tokens"])
        return self.generate_batch([(ids, request.params)])[0], dropped

    def generate_batch(self, prompts: list[Prompt]) -> list[str]:
        """Answers for several encoded prompts sharing decoding settings, in order."""
        answers: dict[int, str] = {}
        for handle, text in self.decode([(ids, params, i) for i, (ids, params) in enumerate(prompts)]):
            answers[handle] = text
        return [answers[i] for i in range(len(prompts))]

    def decode(self, first: list[Pending],
               admit: Callable[[int], list[Pending]] = lambda free: [],
               max_rows: int = 16) -> Iterator[tuple[Any, str]]:
        """Continuous batching over the KV cache: yields (handle, answer) as each sequence ends.

        A hand-rolled loop instead of `model.generate`: a sequence leaves the batch as soon as it ends its
        turn or reaches its own max_new_tokens, and between steps `admit(free_slots)` hands in waiting
        requests (same decoding settings), which join the running batch after their own prefill. On a
        CPU, a finished sequence that keeps computing costs more than batching gains.
        """
        params = first[0][1]
        processors = self._processors(params)
        sample = _samples(params)
        stop = torch.tensor(self.stop_ids, device=self.device)
        with self.lock, torch.inference_mode():
            state: _DecodeState | None = self._prefill(first, processors, sample)
            while True:
                state = yield from self._advance(state, stop)
                joining = admit(max_rows - (state.size if state else 0))
                if joining:  # their prefill picks their first token, which may already end them
                    state = _DecodeState.merge(state, (yield from self._advance(self._prefill(joining, processors, sample), stop)), self.pad_id)
                if state is None:
                    return
                step_input = state.tokens[:, None]
                state.extend(step_input)
                logits = self.model(input_ids=step_input, attention_mask=state.mask, position_ids=state.positions, cache=state.cache,
                                    use_cache=True, logits_to_keep=1).logits
                state.tokens = self._pick(processors(state.sequences, logits[:, -1, :].float()), sample)

    def _advance(self, state: "_DecodeState", stop: Any) -> Generator[tuple[Any, str], None, "_DecodeState | None"]:
        """Record the tokens just picked; yield the sequences that ended; return the rest (None if none)."""
        ended = torch.isin(state.tokens, stop)
        for i, (token, end) in enumerate(zip(state.tokens.tolist(), ended.tolist())):
            if not end:
                state.answers[i].append(token)
        done = ended | (torch.tensor([len(a) for a in state.answers], device=self.device) >= state.limits)
        for i in done.nonzero().squeeze(1).tolist():
            yield state.handles[i], self.tokenizer.decode(state.answers[i], skip_special_tokens=True).strip()
        return state.select((~done).nonzero().squeeze(1))

    def _processors(self, params: dict[str, Any]) -> Any:
        from transformers import LogitsProcessorList, RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper, TopPLogitsWarper

        processors = LogitsProcessorList()
        if params["repetition_penalty"] != 1.0:
            processors.append(RepetitionPenaltyLogitsProcessor(params["repetition_penalty"]))
        if _samples(params):
            processors.append(TemperatureLogitsWarper(params["temperature"]))
            if params["top_p"] < 1.0:
                processors.append(TopPLogitsWarper(params["top_p"]))
        return processors

    def _pick(self, scores: Any, sample: bool) -> Any:
        return torch.multinomial(scores.softmax(-1), 1).squeeze(1) if sample else scores.argmax(-1)

    def _prefill(self, items: list[Pending], processors: Any, sample: bool) -> "_DecodeState":
        """Run the prompts (left-padded) through the model once; the state holds their first tokens (caller holds the lock)."""
        from transformers.cache_utils import DynamicCache

        width = max(len(ids) for ids, _, _ in items)
        sequences = torch.tensor([[self.pad_id] * (width - len(ids)) + ids for ids, _, _ in items], device=self.device)
        mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids, _, _ in items], device=self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache()
        logits = self.model(input_ids=sequences, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True,
                            logits_to_keep=1).logits  # only the last position: the prompt's own logits are never used
        tokens = self._pick(processors(sequences, logits[:, -1, :].float()), sample)
        limits = torch.tensor([params["max_new_tokens"] for _, params, _ in items], device=self.device)
        return _DecodeState(cache, sequences, mask, positions[:, -1:], tokens, limits, [[] for _ in items], [h for _, _, h in items])


def _dtype(cuda: bool) -> Any:
    """$PHI3FLOW_DTYPE, else bf16 where the hardware computes it natively (most GPUs; CPUs with AVX512-BF16 or AMX)."""
    name = os.environ.get(DTYPE_ENV, "auto")
    if name != "auto":
        if name not in ("float32", "bfloat16", "float16"):
            raise RuntimeError(f"{DTYPE_ENV} must be auto, float32, bfloat16 or float16, got {name!r}")
        return getattr(torch, name)
    if cuda:
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        flags = []
    return torch.bfloat16 if {"avx512_bf16", "amx_bf16"} & set(flags) else torch.float32


class _DecodeState:
    """The sequences being generated together: KV cache, tokens so far, attention mask, positions, limits."""

    def __init__(self, cache: Any, sequences: Any, mask: Any, positions: Any, tokens: Any, limits: Any, answers: list, handles: list):
        self.cache, self.sequences, self.mask, self.positions = cache, sequences, mask, positions
        self.tokens, self.limits, self.answers, self.handles = tokens, limits, answers, handles

    @property
    def size(self) -> int:
        return len(self.handles)

    def extend(self, step_input: Any) -> None:
        """Append the last picked tokens before feeding them to the model."""
        self.sequences = torch.cat([self.sequences, step_input], dim=1)
        self.mask = torch.cat([self.mask, torch.ones_like(step_input)], dim=1)
        self.positions = self.positions + 1

    def select(self, keep: Any) -> "_DecodeState | None":
        """Only the rows in `keep` (None when no row is left)."""
        if keep.numel() == 0:
            return None
        if keep.numel() < self.size:
            self.cache.batch_select_indices(keep)
            rows = keep.tolist()
            self.sequences, self.mask, self.positions = self.sequences[keep], self.mask[keep], self.positions[keep]
            self.tokens, self.limits = self.tokens[keep], self.limits[keep]
            self.answers, self.handles = [self.answers[i] for i in rows], [self.handles[i] for i in rows]
            self._trim()
        return self

    def _trim(self) -> None:
        """Drop leading columns that no remaining row attends to, so a batch that keeps taking joiners doesn't grow forever."""
        start = int(self.mask.any(0).nonzero()[0])
        if start:
            self.sequences, self.mask = self.sequences[:, start:], self.mask[:, start:]
            for layer in self.cache.layers:
                layer.keys, layer.values = layer.keys[:, :, start:], layer.values[:, :, start:]

    @staticmethod
    def merge(running: "_DecodeState | None", joining: "_DecodeState | None", pad_id: int) -> "_DecodeState | None":
        """One batch from two: the shorter history is left-padded (masked) so cache and mask line up."""
        if running is None or joining is None:
            return running or joining
        pad = torch.nn.functional.pad
        width = max(running.mask.shape[1], joining.mask.shape[1])
        for state in (running, joining):
            missing = width - state.mask.shape[1]
            if missing:
                state.sequences = pad(state.sequences, (missing, 0), value=pad_id)
                state.mask = pad(state.mask, (missing, 0), value=0)
                for layer in state.cache.layers:
                    layer.keys, layer.values = pad(layer.keys, (0, 0, missing, 0)), pad(layer.values, (0, 0, missing, 0))
        for target, source in zip(running.cache.layers, joining.cache.layers):
            target.keys, target.values = torch.cat([target.keys, source.keys]), torch.cat([target.values, source.values])
        return _DecodeState(
            running.cache, torch.cat([running.sequences, joining.sequences]), torch.cat([running.mask, joining.mask]),
            torch.cat([running.positions, joining.positions]), torch.cat([running.tokens, joining.tokens]),
            torch.cat([running.limits, joining.limits]), running.answers + joining.answers, running.handles + joining.handles,
        )


class Busy(BadRequest):
    """The request queue is full: the client should come back after Retry-After seconds."""

    def __init__(self, retry_after: int = 1):
        super().__init__(f"the server is busy (queue full); retry after {retry_after} s", status=503)
        self.retry_after = retry_after


def _decoding(params: dict[str, Any]) -> tuple:
    """Requests with equal keys can share a batch (same sampling settings)."""
    return (_samples(params), params["temperature"], params["top_p"], params["repetition_penalty"])


def _samples(params: dict[str, Any]) -> bool:
    """Sampling unless do_sample is false or the temperature is (practically) 0, which means greedy."""
    return params.get("do_sample", True) and params["temperature"] >= GREEDY_BELOW


class Batcher:
    """Dynamic (continuous) batching of requests from concurrent server threads.

    One worker thread takes the oldest waiting request plus those arriving right behind it (arrivals
    less than `gap_s` apart, for at most `wait_s`), and decodes them together; while it decodes, waiting
    requests with the same decoding settings join the running batch (up to `max_batch` rows) and each
    answer returns as soon as its sequence ends. The wait list is bounded: when full, callers get Busy
    (503 + Retry-After) instead of piling up.
    """

    def __init__(self, model: ChatModel, max_batch: int = 16, max_queue: int = 64, wait_s: float = 0.05, gap_s: float = 0.005):
        self.model, self.max_batch, self.max_queue, self.wait_s, self.gap_s = model, max_batch, max_queue, wait_s, gap_s
        self.join_min, self.join_every, self.steps_since_join = 4, 4, 0
        self.waiting: list[Pending] = []
        self.arrived = threading.Condition()
        threading.Thread(target=self._loop, name="phi3flow-batcher", daemon=True).start()

    def submit(self, ids: list[int], params: dict[str, Any]) -> str:
        done: Future = Future()
        with self.arrived:
            if len(self.waiting) >= self.max_queue:
                raise Busy()
            self.waiting.append((ids, params, done))
            self.arrived.notify()
        return done.result()

    def _take(self, key: tuple, limit: int) -> list[Pending]:
        """Up to `limit` waiting requests whose decoding settings match `key`, oldest first (lock held)."""
        taken = [item for item in self.waiting if _decoding(item[1]) == key][:limit]
        self.waiting = [item for item in self.waiting if all(item is not t for t in taken)]
        return taken

    def _collect(self) -> list[Pending]:
        with self.arrived:
            while not self.waiting:
                self.arrived.wait()
            deadline, seen = time.monotonic() + self.wait_s, len(self.waiting)
            while len(self.waiting) < self.max_batch and time.monotonic() < deadline:
                self.arrived.wait(timeout=max(0.0, min(self.gap_s, deadline - time.monotonic())))
                if len(self.waiting) == seen:
                    break  # nothing arrived within gap_s: go
                seen = len(self.waiting)
            return self._take(_decoding(self.waiting[0][1]), self.max_batch)

    def _admit(self, key: tuple, free: int) -> list[Pending]:
        """Called between decode steps. A prefill stalls the running batch, so joiners come in groups: at
        once when the batch is empty or `join_min` are waiting, else after at most `join_every` steps."""
        self.steps_since_join += 1
        with self.arrived:
            ready = sum(1 for item in self.waiting if _decoding(item[1]) == key)
            if free <= 0 or not ready:
                return []
            if free < self.max_batch and ready < min(free, self.join_min) and self.steps_since_join < self.join_every:
                return []
            self.steps_since_join = 0
            return self._take(key, free)

    def _loop(self) -> None:
        while True:
            batch = self._collect()
            key = _decoding(batch[0][1])
            log.info("Generating a batch of %d", len(batch))

            def admit(free: int) -> list[Pending]:
                joining = self._admit(key, free)
                batch.extend(joining)  # so a failure below reaches the joiners too
                return joining

            try:
                for done, answer in self.model.decode(list(batch), admit, self.max_batch):
                    done.set_result(answer)
            except Exception as exc:  # noqa: BLE001 - handed to every request still waiting on this batch
                log.exception("Generation failed")
                for item in batch:
                    if not item[2].done():
                        item[2].set_exception(exc)


_model: ChatModel | None = None
_batcher: Batcher | None = None
_key: bytes | None = None


def init() -> None:
    """Called once per worker by the inference server: load the model from AZUREML_MODEL_DIR."""
    global _model, _key, _batcher
    key = os.environ.get(KEY_ENV)
    if key is not None and not key.strip():
        raise RuntimeError(f"{KEY_ENV} is set but empty: give a non-empty key or unset it")
    _key = key.encode() if key else None
    model_dir = os.environ.get("AZUREML_MODEL_DIR")
    if not model_dir:
        raise RuntimeError("AZUREML_MODEL_DIR is not set: point it at a model folder (phi3flow serve --model-dir DIR)")
    _model = ChatModel.load(model_dir)
    _batcher = Batcher(_model, max_batch=_env_int(MAX_BATCH_ENV, 16), max_queue=_env_int(MAX_QUEUE_ENV, 64),
                       wait_s=_env_int(BATCH_WAIT_ENV, 50) / 1000)
    log.info("Model ready (context %d tokens)", _model.context)


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


def _json(payload: dict, status: int, headers: dict[str, str] | None = None) -> AMLResponse:
    return AMLResponse(payload, status, headers or {}, json_str=True)


def score(body: bytes) -> tuple[dict, int, dict[str, str]]:
    """The contract without HTTP: (payload, status, headers). Used by run() and by tests."""
    try:
        request = parse_request(body)
        ids, dropped = _model.encode(request.messages, request.params["max_new_tokens"])
        answer = _batcher.submit(ids, request.params)
    except BadRequest as exc:
        return {"message": str(exc)}, exc.status, {"Retry-After": str(exc.retry_after)} if isinstance(exc, Busy) else {}
    headers = {"x-phi3flow-truncated-turns": str(dropped)} if dropped else {}
    return {"output": answer}, 200, headers


@rawhttp
def run(request: Any) -> AMLResponse:
    """Entry point for each request (raw HTTP so errors keep their 4xx status)."""
    if not _authorized(request.headers.get("Authorization")):
        return _json({"message": "missing or wrong key: send 'Authorization: Bearer <key>'"}, 401, {"WWW-Authenticate": "Bearer"})
    if request.method != "POST":
        return _json({"message": "POST a JSON body to /score"}, 405, {"Allow": "POST"})
    if (request.content_length or 0) > MAX_BODY_BYTES:
        return _json({"message": f"request body is over the {MAX_BODY_BYTES}-byte limit"}, 413)
    payload, status, headers = score(request.get_data(cache=False))
    return _json(payload, status, headers)
