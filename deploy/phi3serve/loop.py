"""The hand-written continuous-batching decode loop (the CPU engine; measured faster than the library's there).

One worker thread takes the oldest waiting job plus those arriving right behind it (arrivals less than
`gap_s` apart, for at most `wait_s`) and decodes them together over a KV cache; a sequence leaves the
batch as soon as it ends its turn or reaches its own max_new_tokens, and waiting jobs with the same
decoding settings join between steps, after their own prefill. Jobs nobody waits for any more
(deadline passed, future cancelled) are dropped at the next step.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable, Generator, Iterator

import torch

from phi3serve.contract import Busy, GenerationFailed, Parameters, ServingError
from phi3serve.engine import Answer, Bounded, Job
from phi3serve.model import ChatModel

log = logging.getLogger("azmlinfsrv.score")


class DecodeState:
    """The sequences being generated together: KV cache, tokens so far, attention mask, positions, limits."""

    def __init__(self, cache: Any, sequences: Any, mask: Any, positions: Any, tokens: Any, limits: Any,
                 answers: list[list[int]], jobs: list[Job]):
        self.cache, self.sequences, self.mask, self.positions = cache, sequences, mask, positions
        self.tokens, self.limits, self.answers, self.jobs = tokens, limits, answers, jobs

    @property
    def size(self) -> int:
        return len(self.jobs)

    def extend(self, step_input: Any) -> None:
        """Append the last picked tokens before feeding them to the model."""
        self.sequences = torch.cat([self.sequences, step_input], dim=1)
        self.mask = torch.cat([self.mask, torch.ones_like(step_input)], dim=1)
        self.positions = self.positions + 1

    def select(self, keep: Any) -> "DecodeState | None":
        """Only the rows in `keep` (None when no row is left)."""
        if keep.numel() == 0:
            return None
        if keep.numel() < self.size:
            self.cache.batch_select_indices(keep)
            rows = keep.tolist()
            self.sequences, self.mask, self.positions = self.sequences[keep], self.mask[keep], self.positions[keep]
            self.tokens, self.limits = self.tokens[keep], self.limits[keep]
            self.answers, self.jobs = [self.answers[i] for i in rows], [self.jobs[i] for i in rows]
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
    def merge(running: "DecodeState | None", joining: "DecodeState | None", pad_id: int) -> "DecodeState | None":
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
        return DecodeState(
            running.cache, torch.cat([running.sequences, joining.sequences]), torch.cat([running.mask, joining.mask]),
            torch.cat([running.positions, joining.positions]), torch.cat([running.tokens, joining.tokens]),
            torch.cat([running.limits, joining.limits]), running.answers + joining.answers, running.jobs + joining.jobs,
        )


class Decoder:
    """Continuous batching over the KV cache of one model, for jobs sharing decoding settings."""

    def __init__(self, model: ChatModel):
        self.chat = model
        self.model = model.model
        self.stop = torch.tensor(model.stop_ids, device=model.device)

    def decode(self, first: list[Job], admit: Callable[[int], list[Job]] = lambda free: [],
               max_rows: int = 16) -> Iterator[tuple[Job, list[int]]]:
        """Yields (job, generated tokens) as each sequence ends; between steps `admit(free_slots)` hands in joiners."""
        params = first[0].params
        processors = self._processors(params)
        with torch.inference_mode():
            state: DecodeState | None = self._prefill(first, processors, params)
            while True:
                state = yield from self._advance(state)
                joining = admit(max_rows - (state.size if state else 0))
                if joining:  # their prefill picks their first token, which may already end them
                    state = DecodeState.merge(state, (yield from self._advance(self._prefill(joining, processors, params))),
                                              self.chat.pad_id)
                if state is None:
                    return
                for job in state.jobs:
                    job.batch_size = max(job.batch_size, state.size)
                step_input = state.tokens[:, None]
                state.extend(step_input)
                logits = self.model(input_ids=step_input, attention_mask=state.mask, position_ids=state.positions,
                                    cache=state.cache, use_cache=True, logits_to_keep=1).logits
                state.tokens = self._pick(processors(state.sequences, logits[:, -1, :].float()), params)

    def _advance(self, state: DecodeState) -> Generator[tuple[Job, list[int]], None, "DecodeState | None"]:
        """Record the tokens just picked; yield the sequences that ended; return the rest (None if none)."""
        ended = torch.isin(state.tokens, self.stop)
        for i, (token, end) in enumerate(zip(state.tokens.tolist(), ended.tolist())):
            if not end:
                state.answers[i].append(token)
        now = time.monotonic()
        abandoned = torch.tensor([job.expired(now) for job in state.jobs], device=ended.device)
        done = ended | abandoned | (torch.tensor([len(a) for a in state.answers], device=ended.device) >= state.limits)
        for i in done.nonzero().squeeze(1).tolist():
            yield state.jobs[i], state.answers[i]
        return state.select((~done).nonzero().squeeze(1))

    def _processors(self, params: Parameters) -> Any:
        from transformers import LogitsProcessorList, RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper, TopPLogitsWarper

        processors = LogitsProcessorList()
        if params.repetition_penalty != 1.0:
            processors.append(RepetitionPenaltyLogitsProcessor(params.repetition_penalty))
        if not params.greedy:
            processors.append(TemperatureLogitsWarper(params.temperature))
            if params.top_p < 1.0:
                processors.append(TopPLogitsWarper(params.top_p))
        return processors

    @staticmethod
    def _pick(scores: Any, params: Parameters) -> Any:
        return scores.argmax(-1) if params.greedy else torch.multinomial(scores.softmax(-1), 1).squeeze(1)

    def _prefill(self, jobs: list[Job], processors: Any, params: Parameters) -> DecodeState:
        """Run the prompts (left-padded) through the model once; the state holds their first tokens."""
        from transformers.cache_utils import DynamicCache

        device, pad_id = self.chat.device, self.chat.pad_id
        width = max(len(job.ids) for job in jobs)
        sequences = torch.tensor([[pad_id] * (width - len(job.ids)) + job.ids for job in jobs], device=device)
        mask = torch.tensor([[0] * (width - len(job.ids)) + [1] * len(job.ids) for job in jobs], device=device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache()
        logits = self.model(input_ids=sequences, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True,
                            logits_to_keep=1).logits  # only the last position: the prompt's own logits are never used
        tokens = self._pick(processors(sequences, logits[:, -1, :].float()), params)
        limits = torch.tensor([job.params.max_new_tokens for job in jobs], device=device)
        return DecodeState(cache, sequences, mask, positions[:, -1:], tokens, limits, [[] for _ in jobs], list(jobs))


class LoopEngine(Bounded):
    """Dynamic batching of jobs from concurrent server threads onto one Decoder (one worker thread)."""

    def __init__(self, model: ChatModel, max_batch: int = 16, max_queue: int = 64, wait_s: float = 0.05, gap_s: float = 0.005):
        super().__init__(max_queue)
        self.model, self.decoder = model, Decoder(model)
        self.max_batch, self.wait_s, self.gap_s = max_batch, wait_s, gap_s
        self.join_min, self.join_every, self.steps_since_join = 4, 4, 0
        self.waiting: list[Job] = []
        # Batch-invariant greedy answers need fp32 arithmetic (the padding of a batch changes bf16 rounding).
        self.batch_invariant = model.dtype == torch.float32 and model.device.type == "cpu"
        self.start_worker(self._work, "phi3flow-loop")

    def submit(self, job: Job) -> None:
        with self.lock:
            if len(self.waiting) >= self.max_queue:
                raise Busy()
            self.waiting.append(job)
            self.lock.notify()

    def _take(self, key: tuple, limit: int) -> list[Job]:
        """Up to `limit` live waiting jobs whose decoding settings match `key`, oldest first (lock held)."""
        self.waiting = [job for job in self.waiting if not job.expired()]
        taken = [job for job in self.waiting if job.params.decoding == key][:limit]
        self.waiting = [job for job in self.waiting if all(job is not t for t in taken)]
        return taken

    def _collect(self) -> list[Job]:
        with self.lock:
            while True:
                while not self.waiting:
                    self.lock.wait()
                deadline, seen = time.monotonic() + self.wait_s, len(self.waiting)
                while len(self.waiting) < self.max_batch and time.monotonic() < deadline:
                    self.lock.wait(timeout=max(0.0, min(self.gap_s, deadline - time.monotonic())))
                    if len(self.waiting) == seen:
                        break  # nothing arrived within gap_s: go
                    seen = len(self.waiting)
                batch = self._take(self.waiting[0].params.decoding, self.max_batch)
                if batch:
                    return batch

    def _admit(self, key: tuple, free: int) -> list[Job]:
        """Called between decode steps. A prefill stalls the running batch, so joiners come in groups: at
        once when the batch is empty or `join_min` are waiting, else after at most `join_every` steps."""
        self.steps_since_join += 1
        with self.lock:
            ready = sum(1 for job in self.waiting if job.params.decoding == key)
            if free <= 0 or not ready:
                return []
            if free < self.max_batch and ready < min(free, self.join_min) and self.steps_since_join < self.join_every:
                return []
            self.steps_since_join = 0
            return self._take(key, free)

    def _work(self) -> None:
        while True:
            self.run_batch(self._collect())

    def run_batch(self, batch: list[Job]) -> None:
        """Decode `batch` (and the joiners it admits) to the end; a failure fails exactly those jobs."""
        key = batch[0].params.decoding
        log.info("Generating a batch of %d", len(batch))

        def admit(free: int) -> list[Job]:
            joining = self._admit(key, free)
            batch.extend(joining)  # so a failure below reaches the joiners too
            return joining

        try:
            for job, tokens in self.decoder.decode(list(batch), admit, self.max_batch):
                job.resolve(Answer(self.model.text(tokens), len(tokens), job.batch_size))
        except Exception as exc:  # noqa: BLE001 - handed to every job of this batch; the worker keeps serving
            log.exception("Generation failed")
            error = exc if isinstance(exc, ServingError) else GenerationFailed(f"generation failed: {type(exc).__name__}: {str(exc)[:200]}")
            for job in batch:
                job.resolve(error)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()  # after an out-of-memory error, give the next batch its memory back
