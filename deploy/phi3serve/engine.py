"""The one interface every generation engine offers the scoring script, and the job it hands them.

An engine takes encoded prompts with their parameters and answers each job's future; it owns its
batching, its queue bound (Busy) and its failure handling (a failed generation fails only its jobs).
`engine_for` picks the engine: transformers' continuous batching on CUDA, the hand-written decode
loop on a CPU (measured faster there), or what $PHI3FLOW_ENGINE names; an ONNX folder gets onnxruntime-genai's.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field
from queue import Queue
from typing import Protocol

from phi3serve.contract import Busy, ChatRequest, Parameters
from phi3serve.model import ChatModel
from phi3serve.settings import ENV, Settings

ENGINE_ENV = ENV["engine"]


@dataclass
class Answer:
    text: str
    tokens: int  # generated tokens, the stop token excluded
    batch_size: int  # most sequences decoded together while this one was


@dataclass(eq=False)
class Job:
    """One request inside an engine: its prompt ids, parameters, deadline and the future its answer goes to."""

    ids: list[int]
    params: Parameters
    deadline: float = float("inf")  # time.monotonic() after which nobody waits for the answer
    future: Future = field(default_factory=Future)
    batch_size: int = 1
    stream: Queue | None = None  # generated token ids as they come, for streamed answers

    def cancel(self) -> None:
        """The client is gone: the engine drops the job at its next step."""
        self.deadline = 0.0

    def resolve(self, outcome: Answer | Exception) -> None:
        """Hand the answer (or error) to whoever waits; a no-op if they gave up (cancelled) or it is already set."""
        try:
            if isinstance(outcome, Exception):
                self.future.set_exception(outcome)
            else:
                self.future.set_result(outcome)
        except InvalidStateError:
            pass

    def expired(self, now: float | None = None) -> bool:
        return (now if now is not None else time.monotonic()) > self.deadline


class Engine(Protocol):
    batch_invariant: bool  # greedy answers never depend on which requests share the batch

    def submit(self, job: Job) -> None:
        """Queue a job (raises Busy when the queue is full); its future gets an Answer or a ServingError."""
        ...

    def healthy(self) -> bool:
        """False once the engine can no longer serve (its worker died): liveness fails and Azure restarts."""
        ...

    def close(self) -> None:
        """Drop every job and stop generating (also run at interpreter exit)."""


class Bounded:
    """The queue bound, batch collection and worker-liveness bookkeeping the engines share."""

    def __init__(self, max_queue: int):
        self.max_queue = max_queue
        self.lock = threading.Condition()
        self.worker: threading.Thread | None = None
        self.waiting: list[Job] = []  # jobs not yet taken into a batch, oldest first
        self.stopping = False  # set (under the lock) by an engine's close(): collect() then returns []

    def submit(self, job: Job) -> None:
        """Queue a job for the worker; Busy (503 + Retry-After) when `max_queue` already wait."""
        with self.lock:
            if len(self.waiting) >= self.max_queue:
                raise Busy()
            self.waiting.append(job)
            self.lock.notify()

    def take(self, limit: int) -> list[Job]:
        """Up to `limit` live waiting jobs, oldest first (lock held); expired ones are dropped."""
        self.waiting = [job for job in self.waiting if not job.expired()]
        taken, self.waiting = self.waiting[:limit], self.waiting[limit:]
        return taken

    def collect(self, limit: int, wait_s: float, gap_s: float) -> list[Job]:
        """The oldest waiting job and those arriving right behind it (less than `gap_s` apart, for at most
        `wait_s`), up to `limit`; blocks while nothing waits ([] once stopping)."""
        with self.lock:
            while True:
                while not self.stopping and not self.waiting:
                    self.lock.wait()
                if self.stopping:
                    return []
                deadline, seen = time.monotonic() + wait_s, len(self.waiting)
                while len(self.waiting) < limit and not self.stopping and time.monotonic() < deadline:
                    self.lock.wait(timeout=max(0.0, min(gap_s, deadline - time.monotonic())))
                    if len(self.waiting) == seen:
                        break  # nothing arrived within gap_s: go
                    seen = len(self.waiting)
                taken = self.take(limit)
                if taken:
                    return taken

    def start_worker(self, target, name: str) -> None:
        self.worker = threading.Thread(target=target, name=name, daemon=True)
        self.worker.start()

    def healthy(self) -> bool:
        return self.worker is not None and self.worker.is_alive()


def start(engine: Engine, model: ChatModel, request: ChatRequest, timeout_s: float, stream: bool = False) -> tuple[Job, int]:
    """Encode and queue a request: (its job, turns dropped). Past `timeout_s` the engine stops generating it."""
    ids, dropped = model.encode(request.messages, request.params.max_new_tokens)
    job = Job(ids, request.params, deadline=time.monotonic() + timeout_s, stream=Queue() if stream else None)
    engine.submit(job)
    return job, dropped


def engine_for(model: ChatModel, max_batch: int, max_queue: int, wait_s: float, choice: str | None = None) -> Engine:
    """The engine `choice` ($PHI3FLOW_ENGINE; read from the environment when not given) names, else continuous batching
    on CUDA and the decode loop on CPU."""
    choice = choice or Settings.from_env().engine
    if model.onnx:  # an ONNX Runtime GenAI folder has one engine: onnxruntime-genai's
        if choice != "auto":
            raise RuntimeError(f"{ENGINE_ENV}={choice} needs a Hugging Face model folder; this one is ONNX (unset it)")
        from phi3serve.onnx_engine import OnnxChatModel, OnnxEngine

        assert isinstance(model, OnnxChatModel)  # what ChatModel.load gives for an ONNX folder
        return OnnxEngine(model, max_batch=max_batch, max_queue=max_queue, wait_s=wait_s)
    if choice == "auto":
        choice = "continuous" if model.device.type == "cuda" else "loop"
    from phi3serve.loop import LoopEngine

    loop = LoopEngine(model, max_batch=max_batch, max_queue=max_queue, wait_s=wait_s)
    if choice == "loop":
        return loop
    from phi3serve.continuous import ContinuousEngine

    return ContinuousEngine(model, max_batch=max_batch, max_queue=max_queue, fallback=loop)
