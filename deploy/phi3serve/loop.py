"""The hand-written continuous-batching decode loop (the CPU engine; measured faster than the library's there).

One worker thread takes the oldest waiting job plus those arriving right behind it (arrivals less than
`gap_s` apart, for at most `wait_s`) and decodes them together over a KV cache; a sequence leaves the
batch as soon as it ends its turn or reaches its own max_new_tokens, and waiting jobs join between
steps, after their own prefill. Every row samples with its own parameters, so no request waits for a
batch of other settings to finish (a long answer cannot hold short ones back). Jobs nobody waits for any more
(deadline passed, future cancelled) are dropped at the next step.
"""

from __future__ import annotations

import atexit
import ctypes
import logging
import time
from collections import deque
from collections.abc import Callable, Generator, Iterator
from contextlib import nullcontext
from typing import Any

import torch

from phi3serve.contract import Expired, GenerationFailed, ServingError
from phi3serve.engine import Answer, Bounded, Job
from phi3serve.model import ChatModel
from phi3serve.rope import row_rotary
from phi3serve.sampling import pick, row_settings

log = logging.getLogger("azmlinfsrv.score")
PREFILL_CHUNK = 128  # prompt tokens per forward pass beyond which a prompt is prefilled in chunks between decode steps


class DecodeState:
    """The sequences being generated together: KV cache, tokens so far, attention mask, positions, limits, and
    which rows' cache holds keys rotated with LongRoPE's long factors."""

    def __init__(
        self,
        cache: Any,
        sequences: Any,
        mask: Any,
        positions: Any,
        tokens: Any,
        limits: Any,
        settings: Any,
        answers: list[list[int]],
        jobs: list[Job],
        long: Any,
    ):
        self.cache, self.sequences, self.mask, self.positions = cache, sequences, mask, positions
        self.tokens, self.limits, self.settings, self.answers, self.jobs = tokens, limits, settings, answers, jobs
        self.long = long

    @property
    def size(self) -> int:
        return len(self.jobs)

    def extend(self, step_input: Any) -> None:
        """Append the last picked tokens before feeding them to the model."""
        self.sequences = torch.cat([self.sequences, step_input], dim=1)
        self.mask = torch.cat([self.mask, torch.ones_like(step_input)], dim=1)
        self.positions = self.positions + 1

    def select(self, keep: Any) -> DecodeState | None:
        """Only the rows in `keep` (None when no row is left)."""
        if keep.numel() == 0:
            return None
        if keep.numel() < self.size:
            self.cache.batch_select_indices(keep)
            rows = keep.tolist()
            self.sequences, self.mask, self.positions = self.sequences[keep], self.mask[keep], self.positions[keep]
            self.tokens, self.limits, self.settings = self.tokens[keep], self.limits[keep], self.settings[keep]
            self.long = self.long[keep]
            self.answers, self.jobs = [self.answers[i] for i in rows], [self.jobs[i] for i in rows]
            self._trim()
        return self

    def _trim(self) -> None:
        """Drop leading columns that no remaining row attends to, so a batch that keeps taking joiners doesn't grow forever
        (copied, so the wide cache a long history left behind is freed now)."""
        start = int(self.mask.any(0).nonzero()[0])
        if start:
            self.sequences, self.mask = self.sequences[:, start:], self.mask[:, start:]
            for layer in self.cache.layers:
                layer.keys, layer.values = layer.keys[:, :, start:].clone(), layer.values[:, :, start:].clone()

    @staticmethod
    def merge(running: DecodeState | None, joining: DecodeState | None, pad_id: int) -> DecodeState | None:
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
            running.cache,
            torch.cat([running.sequences, joining.sequences]),
            torch.cat([running.mask, joining.mask]),
            torch.cat([running.positions, joining.positions]),
            torch.cat([running.tokens, joining.tokens]),
            torch.cat([running.limits, joining.limits]),
            torch.cat([running.settings, joining.settings]),
            running.answers + joining.answers,
            running.jobs + joining.jobs,
            torch.cat([running.long, joining.long]),
        )


class Prefill:
    """Histories (prompt + answer so far, left-padded) going through the model over a fresh cache, some columns per
    forward pass; the last pass picks each row's next token. A long prompt goes a chunk at a time between the running
    batch's decode steps (so it stalls nobody), always alone and cut at the same columns: its answer never depends
    on what else is running."""

    def __init__(self, decoder: Decoder, jobs: list[Job], answers: list[list[int]]):
        from transformers.cache_utils import DynamicCache

        device, pad_id = decoder.chat.device, decoder.chat.pad_id
        histories = [job.ids + answer for job, answer in zip(jobs, answers)]
        self.width = max(len(history) for history in histories)
        self.sequences = torch.tensor([[pad_id] * (self.width - len(h)) + h for h in histories], device=device)
        self.mask = torch.tensor([[0] * (self.width - len(h)) + [1] * len(h) for h in histories], device=device)
        self.positions = (self.mask.cumsum(-1) - 1).clamp(min=0)
        self.long = decoder.long_rows([len(history) for history in histories])
        self.cache, self.done, self.jobs, self.answers = DynamicCache(), 0, jobs, answers

    @property
    def size(self) -> int:
        return len(self.jobs)

    def advance(self, decoder: Decoder, columns: int) -> DecodeState | None:
        """Run the next `columns` columns; the decode state once the histories are all in (else None)."""
        end = min(self.done + columns, self.width)
        logits = decoder.forward(
            self.long,
            input_ids=self.sequences[:, self.done : end],
            attention_mask=self.mask[:, :end],
            position_ids=self.positions[:, self.done : end],
            cache=self.cache,
        )
        self.done = end
        if end < self.width:
            return None
        device = self.sequences.device
        settings = row_settings(self.jobs, device)
        tokens = pick(logits, self.sequences, settings)
        limits = torch.tensor([job.params.max_new_tokens for job in self.jobs], device=device)
        return DecodeState(
            self.cache,
            self.sequences,
            self.mask,
            self.positions[:, -1:],
            tokens,
            limits,
            settings,
            self.answers,
            self.jobs,
            self.long,
        )


def release_memory() -> None:
    """Hand freed heap memory back to the system: glibc keeps what a long prompt's cache and attention used, so
    without this a worker stays at its peak after one long request (no-op off glibc)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class Decoder:
    """Continuous batching over the KV cache of one model; every row keeps its own parameters (and, for LongRoPE
    models, its own rotary factors: see phi3serve.rope).

    Prompts up to `chunk` tokens are prefilled together as they join; longer ones a chunk at a time, taking at most
    half of the time while others decode (`prefill_share`). A LongRoPE row whose history first passes the model's
    original context is prefilled again with long factors, as `Phi3ForCausalLM.prepare_inputs_for_generation` does.
    """

    def __init__(self, model: ChatModel, chunk: int = PREFILL_CHUNK, prefill_share: float = 0.5):
        self.chat = model
        self.model = model.model
        self.stop = torch.tensor(model.stop_ids, device=model.device)
        self.rotary = row_rotary(model.model)
        self.chunk, self.prefill_share = chunk, prefill_share

    def long_rows(self, lengths: list[int]) -> Any:
        """Which rows of these history lengths take LongRoPE's long factors (none for other models)."""
        original = self.rotary.original if self.rotary is not None else None
        return torch.tensor([original is not None and n > original for n in lengths], device=self.chat.device)

    def forward(self, long: Any, **inputs: Any) -> Any:
        """The next-token scores (fp32) of each row's last position, rows with `long` set on long factors."""
        with self.rotary.rows(long) if self.rotary is not None else nullcontext():
            return self.model(**inputs, use_cache=True, logits_to_keep=1).logits[:, -1, :].float()

    def decode(
        self, first: list[Job], admit: Callable[[int, bool], list[Job]] = lambda free, decoding: [], max_rows: int = 16
    ) -> Iterator[tuple[Job, list[int]]]:
        """Yields (job, generated tokens) as each sequence ends; between steps `admit(free_slots, decoding)` hands in
        joiners (`decoding`: rows are being decoded, whom a joiner's prefill would stall)."""
        with torch.inference_mode():
            state: DecodeState | None = None
            pending: deque[Prefill] = deque()  # long histories being prefilled a chunk at a time, oldest first
            debt, widest, joining = 0.0, 0, first  # debt: prefill seconds not yet matched by decode time
            while True:
                short = [job for job in joining if len(job.ids) <= self.chunk]
                pending.extend(Prefill(self, [job], [[]]) for job in joining if len(job.ids) > self.chunk)
                if short:  # their prefill picks their first token, which may already end them
                    state = self._merge(state, (yield from self._advance(self._prefill(short))))
                for gone in [p for p in pending if all(job.expired() for job in p.jobs)]:
                    pending.remove(gone)  # nobody waits for them: stop before their next chunk
                    yield from zip(gone.jobs, gone.answers)
                if pending and (state is None or debt <= 0):
                    began = time.perf_counter()
                    ready = pending[0].advance(self, self.chunk)
                    owed = (time.perf_counter() - began) * (1 - self.prefill_share) / self.prefill_share
                    # paid back by the running rows' next steps; with none running, rows that join next get one
                    # chunk's worth of steps before the next chunk
                    debt = debt + owed if state is not None else owed
                    if ready is not None:
                        pending.popleft()
                        state = self._merge(state, (yield from self._advance(ready)))
                if not pending:
                    debt = 0.0
                if state is not None:
                    began = time.perf_counter()
                    state = yield from self._step(state, pending)
                    debt -= time.perf_counter() - began
                width = state.mask.shape[1] if state is not None else 0
                if widest - width > self.chunk:  # a long history has left: give its memory back
                    release_memory()
                    widest = width
                widest = max(widest, width)
                if state is None and not pending:
                    return
                joining = admit(max_rows - (state.size if state else 0) - sum(p.size for p in pending), state is not None)

    def _merge(self, running: DecodeState | None, joining: DecodeState | None) -> DecodeState | None:
        return DecodeState.merge(running, joining, self.chat.pad_id)

    def _step(self, state: DecodeState, pending: deque[Prefill]) -> Generator[tuple[Job, list[int]], None, DecodeState | None]:
        """Feed every row its last token and pick the next; yield the sequences that ended; return the rest."""
        for job in state.jobs:
            job.batch_size = max(job.batch_size, state.size)
        crossed = None
        if self.rotary is not None:
            running, crossed = self._cross(state, pending)
        else:
            running = state
        if running is not None:
            step_input = running.tokens[:, None]
            running.extend(step_input)
            logits = self.forward(
                running.long,
                input_ids=step_input,
                attention_mask=running.mask,
                position_ids=running.positions,
                cache=running.cache,
            )
            running.tokens = pick(logits, running.sequences, running.settings)
        merged = self._merge(running, crossed)
        return (yield from self._advance(merged)) if merged is not None else None

    def _cross(self, state: DecodeState, pending: deque[Prefill]) -> tuple[DecodeState | None, DecodeState | None]:
        """Rows whose next token passes the original context leave the batch and are prefilled again on long factors
        (their cached keys were rotated with short ones): (the rest, the ones prefilled now with their next token)."""
        if self.rotary is None:
            return state, None
        original = self.rotary.original
        crossing = (state.positions[:, 0] + 2 > original) & ~state.long  # history + the token to feed
        if not crossing.any():
            return state, None
        rows = crossing.nonzero().squeeze(1).tolist()
        jobs, answers = [state.jobs[i] for i in rows], [state.answers[i] for i in rows]
        rest = state.select((~crossing).nonzero().squeeze(1))
        if original + 1 <= self.chunk:
            return rest, self._prefill(jobs, answers)
        pending.appendleft(Prefill(self, jobs, answers))  # they were running already: ahead of waiting prompts
        return rest, None

    def _advance(self, state: DecodeState) -> Generator[tuple[Job, list[int]], None, DecodeState | None]:
        """Record the tokens just picked (and stream them); yield the sequences that ended; return the rest."""
        ended = torch.isin(state.tokens, self.stop)
        for i, (token, end) in enumerate(zip(state.tokens.tolist(), ended.tolist())):
            if not end:
                state.answers[i].append(token)
                stream = state.jobs[i].stream
                if stream is not None:
                    stream.put(token)
        now = time.monotonic()
        abandoned = torch.tensor([job.expired(now) for job in state.jobs], device=ended.device)
        done = ended | abandoned | (torch.tensor([len(a) for a in state.answers], device=ended.device) >= state.limits)
        for i in done.nonzero().squeeze(1).tolist():
            yield state.jobs[i], state.answers[i]
        return state.select((~done).nonzero().squeeze(1))

    def _prefill(self, jobs: list[Job], answers: list[list[int]] | None = None) -> DecodeState:
        """Prefill histories at once (prompts, or prompt + answer so far); the state holds their next tokens."""
        prefill = Prefill(self, jobs, answers or [[] for _ in jobs])
        state = prefill.advance(self, prefill.width)
        assert state is not None  # the whole width ran
        return state


class LoopEngine(Bounded):
    """Dynamic batching of jobs from concurrent server threads onto one Decoder (one worker thread)."""

    def __init__(self, model: ChatModel, max_batch: int = 16, max_queue: int = 64, wait_s: float = 0.05, gap_s: float = 0.005):
        super().__init__(max_queue)
        self.model, self.decoder = model, Decoder(model)
        self.max_batch, self.wait_s, self.gap_s = max_batch, wait_s, gap_s
        self.join_min, self.join_every, self.steps_since_join = 4, 4, 0
        self.running: list[Job] = []  # the batch being decoded, joiners included
        # Batch-invariant greedy answers need fp32 arithmetic (the padding of a batch changes bf16 rounding).
        self.batch_invariant = model.dtype == torch.float32 and model.device.type == "cpu"
        self.start_worker(self._work, "phi3flow-loop")
        atexit.register(self.close)  # never leave the worker inside a forward pass at interpreter exit

    def close(self, timeout_s: float = 10.0) -> None:
        """Drop every job; returns once the batch in progress has stopped (at its next step)."""
        with self.lock:
            for job in self.waiting + self.running:
                job.cancel()
        deadline = time.monotonic() + timeout_s
        while self.running and time.monotonic() < deadline:
            time.sleep(0.01)

    def _admit(self, free: int, decoding: bool) -> list[Job]:
        """Called between decode steps. A prefill stalls the running batch, so joiners come in groups: at
        once when nothing is decoding or `join_min` are waiting, else after at most `join_every` steps."""
        self.steps_since_join += 1
        with self.lock:
            ready = len(self.waiting)
            if free <= 0 or not ready:
                return []
            if decoding and ready < min(free, self.join_min) and self.steps_since_join < self.join_every:
                return []
            self.steps_since_join = 0
            return self.take(free)

    def _work(self) -> None:
        while True:
            self.run_batch(self.collect(self.max_batch, self.wait_s, self.gap_s))

    def run_batch(self, batch: list[Job]) -> None:
        """Decode `batch` (and the joiners it admits) to the end; a failure fails exactly those jobs."""
        log.info("Generating a batch of %d", len(batch))
        self.running = batch

        def admit(free: int, decoding: bool) -> list[Job]:
            joining = self._admit(free, decoding)
            batch.extend(joining)  # so a failure below reaches the joiners too
            return joining

        try:
            for job, tokens in self.decoder.decode(list(batch), admit, self.max_batch):
                job.resolve(
                    Expired(
                        f"generation stopped after {len(tokens)} tokens: past the server's deadline "
                        f"(PHI3FLOW_REQUEST_TIMEOUT_S) or the client left"
                    )
                    if job.expired()
                    else Answer(self.model.text(tokens), len(tokens), job.batch_size)
                )
        except Exception as exc:  # noqa: BLE001 - handed to every job of this batch; the worker keeps serving
            log.exception("Generation failed")
            error = (
                exc
                if isinstance(exc, ServingError)
                else GenerationFailed(f"generation failed: {type(exc).__name__}: {str(exc)[:200]}")
            )
            for job in batch:
                job.resolve(error)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()  # after an out-of-memory error, give the next batch its memory back
        finally:
            self.running = []
