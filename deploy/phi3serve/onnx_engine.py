"""The ONNX engine: an ONNX Runtime GenAI folder (`phi3flow export onnx`) served through onnxruntime-genai's Engine.

Same contract as the transformers engines: the prompt is encoded by the same ChatModel code (the folder
carries the tokenizer and chat template), the same stop tokens end a turn, and each request keeps its own
temperature, top-p, repetition penalty, greedy choice and max_new_tokens (the library's per-turn options).
onnxruntime-genai's Engine batches the requests it holds; the library requires every Engine call from the
thread that created it, so one worker thread owns it, admits jobs up to `max_batch`, cancels the ones nobody
waits for any more, and routes each generated token to its job (and its stream).
"""

from __future__ import annotations

import atexit
import json
import logging
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from phi3serve.contract import GenerationFailed
from phi3serve.engine import Answer, Bounded, Job
from phi3serve.model import METADATA_FILE, ONNX_CONFIG, ChatModel, _capped

log = logging.getLogger("azmlinfsrv.score")
INSTALL_HINT = "pip install onnxruntime-genai (or 'phi3flow[onnx]'); onnxruntime-genai-cuda for a model built for CUDA"


class OnnxChatModel(ChatModel):
    """The tokenizer, chat template, context and stop tokens of an ONNX Runtime GenAI folder; the engine runs it."""

    onnx = True

    def __init__(self, folder: Path, tokenizer: Any, config: dict, metadata: dict):
        self.folder, self.model, self.tokenizer = folder, None, tokenizer  # the ONNX model is loaded by OnnxEngine
        self.context = _capped(int(config["model"].get("context_length") or 4096))
        eos = config["model"].get("eos_token_id")
        built = eos if isinstance(eos, list) else [eos]
        self.stop_ids = list(dict.fromkeys([*self._stop_ids(metadata.get("end_of_turn_token")), *(i for i in built if i is not None)]))
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.stop_ids[0]
        providers = json.dumps(config["model"]["decoder"].get("session_options", {}).get("provider_options", []))
        self.device = torch.device("cuda" if "cuda" in providers else "cpu")
        self.dtype = "onnx-" + metadata.get("onnx", {}).get("precision", "unknown")  # what `phi3flow export` built

    @classmethod
    def load(cls, folder: Path) -> "OnnxChatModel":
        from transformers import AutoTokenizer

        try:
            import onnxruntime_genai  # noqa: F401 - fail at load, not on the first request
        except ImportError:
            raise RuntimeError(f"{folder} is an ONNX Runtime GenAI model; serving it needs {INSTALL_HINT}") from None
        config = json.loads((folder / ONNX_CONFIG).read_text(encoding="utf-8"))
        metadata_path = folder / METADATA_FILE
        metadata = json.loads(metadata_path.read_text(encoding="utf-8")) if metadata_path.is_file() else {}
        return cls(folder, AutoTokenizer.from_pretrained(folder), config, metadata)


class Running:
    """One job inside the library: its Request, turn and the tokens generated so far."""

    def __init__(self, job: Job, request: Any, turn: int):
        self.job, self.request, self.turn, self.tokens = job, request, turn, []
        self.cancelled = False


class OnnxEngine(Bounded):
    batch_invariant = False  # int4 kernels over a batch: not verified to give a greedy row the same answer alone

    def __init__(self, model: OnnxChatModel, max_batch: int = 16, max_queue: int = 64):
        super().__init__(max_queue)
        self.model, self.max_batch = model, max_batch
        self.stop_ids = set(model.stop_ids)
        self.running: dict[int, Running] = {}  # id(request) -> its job
        self.stopping = False
        ready: dict[str, Any] = {}
        started = threading.Event()
        self.start_worker(lambda: self._work(ready, started), "phi3flow-onnx")
        started.wait()
        if "error" in ready:
            raise RuntimeError(f"cannot load the ONNX model in {model.folder}: {ready['error']}")
        atexit.register(self.close)

    def _load(self) -> Any:
        """The library's Engine over the folder, batching up to max_batch requests (set over the exported config)."""
        import onnxruntime_genai as og

        config = og.Config(str(self.model.folder))
        config.overlay(json.dumps({"engine": {"static_batching": {"max_batch_size": self.max_batch}}}))
        self.og = og
        return og.Engine(og.Model(config))

    def close(self, timeout_s: float = 10.0) -> None:
        """Drop every job and stop the worker (at its next step)."""
        with self.lock:
            self.stopping = True
            for job in self.waiting + [r.job for r in self.running.values()]:
                job.cancel()
            self.lock.notify()
        if self.worker is not None and self.worker is not threading.current_thread():
            self.worker.join(timeout_s)

    def _work(self, ready: dict[str, Any], started: threading.Event) -> None:
        try:
            engine = self._load()
            buffer = engine.create_event_buffer(max(64, 4 * self.max_batch))
        except Exception as exc:  # noqa: BLE001 - reported by __init__ in the caller's thread
            ready["error"] = f"{type(exc).__name__}: {exc}"
            started.set()
            return
        started.set()
        while True:
            admitted = self._admit()
            if admitted is None:
                break
            for job in admitted:
                self._start(engine, job)
            self._cancel_abandoned()
            try:
                events = engine.run(buffer) if self.running else []
                self._route(events)
            except Exception as exc:  # noqa: BLE001 - fails the jobs in flight; a fresh library Engine serves the next
                log.exception("ONNX generation failed")
                error = GenerationFailed(f"generation failed: {type(exc).__name__}: {str(exc)[:200]}")
                for running in self.running.values():
                    running.job.resolve(error)
                self.running.clear()
                engine = self._load()
                buffer = engine.create_event_buffer(max(64, 4 * self.max_batch))
        for running in self.running.values():
            running.request.close()

    def _admit(self) -> list[Job] | None:
        """Waiting live jobs that fit next to the running ones; blocks while there is nothing to do (None: stop)."""
        with self.lock:
            while not self.stopping and not self.waiting and not self.running:
                self.lock.wait()
            if self.stopping:
                return None
            self.waiting = [job for job in self.waiting if not job.expired()]
            free = self.max_batch - len(self.running)
            taken, self.waiting = self.waiting[:free], self.waiting[free:]
            return taken

    def _start(self, engine: Any, job: Job) -> None:
        og, params = self.og, job.params
        options = og.RequestOptions()
        options.set_max_session_tokens(len(job.ids) + params.max_new_tokens)
        request = engine.create_request(options=options)
        turn_options = og.TurnOptions(request)
        turn_options.set_max_generated_tokens(params.max_new_tokens)
        turn_options.set_repetition_penalty(params.repetition_penalty)
        turn_options.set_do_sample(not params.greedy)
        if not params.greedy:
            turn_options.set_temperature(params.temperature)
            turn_options.set_top_p(params.top_p)
            turn_options.set_top_k(0)  # the contract has no top-k: the whole nucleus, as the transformers engines
        turn = request.begin_turn(np.asarray(job.ids, dtype=np.int32), turn_options)
        self.running[id(request)] = Running(job, request, turn)

    def _cancel_abandoned(self) -> None:
        now = time.monotonic()
        for running in self.running.values():
            if not running.cancelled and running.job.expired(now):
                running.request.cancel_turn(running.turn)
                running.cancelled = True

    def _route(self, events: list[Any]) -> None:
        """Tokens to their jobs (and streams); finished turns resolve their job and leave."""
        flags = self.og.EngineEventFlags
        batch = sum(1 for event in events if event.flags & flags.TOKEN)
        for event in events:
            running = self.running.get(id(event.request))
            if running is None:
                continue
            job = running.job
            job.batch_size = max(job.batch_size, batch)
            finished = bool(event.flags & flags.TURN_FINISHED)
            token = event.token if event.flags & flags.TOKEN else None
            stop = token in self.stop_ids  # the exported config stops on these already; an older folder may not
            if token is not None and not stop:
                running.tokens.append(token)
                if job.stream is not None:
                    job.stream.put(token)
            if stop and not finished and not running.cancelled:
                running.request.cancel_turn(running.turn)  # its TURN_FINISHED (cancelled) event follows
                running.cancelled = True
            if event.flags & flags.FAILED:
                job.resolve(GenerationFailed(f"generation failed in onnxruntime-genai ({event.error_code.name})"))
            elif finished or stop:
                job.resolve(Answer(self.model.text(running.tokens), len(running.tokens), job.batch_size))
            if finished:
                running.request.close()
                del self.running[id(event.request)]
