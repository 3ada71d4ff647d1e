"""The CUDA engine: transformers' continuous batching manager (paged KV cache, CUDA graphs captured at start-up).

One persistent manager serves every request; a dispatcher thread routes its results to the waiting
jobs and cancels the ones nobody waits for any more. Per-request temperature, top-p and top-k are
the manager's per-request logits processors; greedy decoding is top-k 1 (the argmax, exactly).
The manager cannot apply a repetition penalty per request, so those requests go to the decode loop. Nor can it
give each request its own LongRoPE factors (it packs requests into one forward pass, and the factors follow the
pack's largest position): on a LongRoPE model, requests whose prompt + max_new_tokens may pass the original
context go to the decode loop too (phi3serve.rope), so every sequence here stays on short factors, as alone.
"""

from __future__ import annotations

import atexit
import functools
import itertools
import logging
import threading
import time
from typing import Any

from phi3serve.contract import DEFAULTS, Busy, Expired, GenerationFailed, Unavailable
from phi3serve.engine import Answer, Bounded, Job
from phi3serve.loop import LoopEngine
from phi3serve.model import ChatModel
from phi3serve.rope import longrope_original

log = logging.getLogger("azmlinfsrv.score")


def take_turns(model: Any) -> None:
    """Let one thread at a time run the model's forward pass. The library's generation thread and the fallback decode
    loop share the model; passes of the two interleaved gave the loop's requests wrong answers (measured on a LongRoPE
    Phi-3 beside a continuous-batching request, tests/test_longrope.py)."""
    if getattr(model.forward, "takes_turns", False):
        return
    lock, forward = threading.Lock(), model.forward

    @functools.wraps(forward)
    def serialized(*args: Any, **kwargs: Any) -> Any:
        with lock:
            return forward(*args, **kwargs)

    serialized.__dict__["takes_turns"] = True  # a mark on the function object, read above
    model.forward = serialized


class ContinuousEngine(Bounded):
    batch_invariant = False  # requests share varlen forward passes; bf16 rounding depends on the mix

    def __init__(self, model: ChatModel, max_batch: int, max_queue: int, fallback: LoopEngine, warmup: bool = True):
        from transformers import ContinuousBatchingConfig, GenerationConfig

        super().__init__(max_queue)
        self.model, self.max_batch, self.fallback = model, max_batch, fallback
        self.stop_ids = set(model.stop_ids)
        self.switch = longrope_original(model.model.config)  # None unless LongRoPE
        self.vocab = int(model.model.config.vocab_size)
        # Non-neutral defaults make transformers build the temperature/top-k/top-p processors; every request
        # then passes its own values.
        generation = GenerationConfig(
            do_sample=True,
            temperature=DEFAULTS.temperature,
            top_k=self.vocab,
            top_p=0.99,
            max_new_tokens=DEFAULTS.max_new_tokens,
            eos_token_id=model.stop_ids,
            pad_token_id=model.pad_id,
        )
        cuda = model.device.type == "cuda"
        # Measured on an H200 (bench/gpu.py): async double-buffering was 2-3.5x slower with SDPA's masks, and
        # compiling the paths (default_compile_level 1) failed in torch 2.11's inductor; CUDA graphs alone win.
        # On a GPU the paged cache takes the library's share of free memory; on a CPU (tests, PHI3FLOW_ENGINE=continuous)
        # its default share of free RAM (60%) per engine would exhaust the machine: a tenth is plenty there.
        config = ContinuousBatchingConfig(
            per_request_processors=True,
            use_cuda_graph=cuda,
            use_async_batching=False,
            max_requests_per_batch=max_batch,
            max_memory_percent=None if cuda else 0.1,
        )
        take_turns(model.model)
        self.manager = model.model.init_continuous_batching(generation_config=generation, continuous_batching_config=config)
        if warmup:
            started = time.monotonic()
            self.manager.warmup()  # CUDA graphs are captured here, never on a user's request
            log.info("Continuous batching warmed up in %.1f s", time.monotonic() - started)
        self.inflight: dict[str, Job] = {}
        self.streamed: dict[str, int] = {}  # tokens already passed on, per streamed request
        self.ids = itertools.count()
        started = threading.Event()
        self.start_worker(lambda: self._dispatch(started), "phi3flow-dispatch")
        started.wait()
        atexit.register(self.close)  # stop the generation thread cleanly, not mid-kernel at interpreter exit

    def close(self) -> None:
        if self.manager.is_running():
            self.manager.stop(block=True, timeout=10)  # also gives its paged cache back
        self.fallback.close()

    def submit(self, job: Job) -> None:
        if job.params.repetition_penalty != 1.0 or (
            self.switch is not None and len(job.ids) + job.params.max_new_tokens > self.switch
        ):
            self.fallback.submit(job)
            return
        with self.lock:
            if not self.healthy():
                raise Unavailable("the generation engine stopped; the server is restarting")
            if len(self.inflight) >= self.max_batch + self.max_queue:
                raise Busy()
            request_id = f"phi3flow-{next(self.ids)}"
            self.inflight[request_id] = job
            for other in self.inflight.values():
                other.batch_size = max(other.batch_size, min(len(self.inflight), self.max_batch))
        sampling = (
            {"temperature": 1.0, "top_k": 1, "top_p": 1.0}
            if job.params.greedy
            else {"temperature": job.params.temperature, "top_k": self.vocab, "top_p": job.params.top_p}
        )
        self.manager.add_request(
            job.ids,
            request_id=request_id,
            max_new_tokens=job.params.max_new_tokens,
            eos_token_id=self.model.stop_ids,
            streaming=job.stream is not None,
            **sampling,
        )

    def healthy(self) -> bool:
        return super().healthy() and self.manager.is_running() and self.fallback.healthy()

    def _dispatch(self, started: threading.Event) -> None:
        """Route finished results to their jobs; cancel abandoned jobs; fail everything if the manager dies."""
        # Started from this daemon thread, the manager's generation thread is a daemon too (threads inherit it),
        # so a worker that exits never waits for it.
        self.manager.start()
        started.set()
        checked = time.monotonic()
        while self.manager.is_running():
            result = self.manager.get_result(timeout=0.2)
            if time.monotonic() - checked > 0.2:
                self._cancel_abandoned()
                checked = time.monotonic()
            if result is None:
                continue
            with self.lock:
                job = self.inflight.get(result.request_id)
                if job is not None and result.is_finished():
                    del self.inflight[result.request_id]
            if job is None:
                continue
            if job.stream is not None:  # cumulative tokens: pass on the new ones
                tokens = [t for t in result.generated_tokens if t not in self.stop_ids]
                for token in tokens[self.streamed.get(result.request_id, 0) :]:
                    job.stream.put(token)
                self.streamed[result.request_id] = len(tokens)
                if result.is_finished():
                    del self.streamed[result.request_id]
            if not result.is_finished():
                continue
            if result.error:
                job.resolve(GenerationFailed(f"generation failed: {result.error[:200]}"))
            else:
                tokens = list(result.generated_tokens)
                while tokens and tokens[-1] in self.stop_ids:
                    tokens.pop()
                job.resolve(Answer(self.model.text(tokens), len(tokens), job.batch_size))
        log.error("The continuous batching manager stopped; failing %d waiting request(s)", len(self.inflight))
        with self.lock:
            jobs, self.inflight = list(self.inflight.values()), {}
        for job in jobs:
            job.resolve(Unavailable("the generation engine stopped; the server is restarting"))

    def _cancel_abandoned(self) -> None:
        now = time.monotonic()
        with self.lock:
            gone = [request_id for request_id, job in self.inflight.items() if job.expired(now)]
            abandoned = [self.inflight.pop(request_id) for request_id in gone]
            for request_id in gone:
                self.streamed.pop(request_id, None)
        for request_id in gone:
            self.manager.cancel_request(request_id)
        for job in abandoned:
            job.resolve(Expired("generation stopped: past the server's deadline (PHI3FLOW_REQUEST_TIMEOUT_S) or the client left"))
        if gone:
            log.info("Cancelled %d request(s) nobody waits for", len(gone))
