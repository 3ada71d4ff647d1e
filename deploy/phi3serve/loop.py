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
import logging
import time
from typing import Any, Callable, Generator, Iterator

import torch

from phi3serve.contract import Expired, GenerationFailed, ServingError
from phi3serve.engine import Answer, Bounded, Job
from phi3serve.model import ChatModel

log = logging.getLogger("azmlinfsrv.score")


class DecodeState:
    """The sequences being generated together: KV cache, tokens so far, attention mask, positions, limits."""

    def __init__(self, cache: Any, sequences: Any, mask: Any, positions: Any, tokens: Any, limits: Any, settings: Any,
                 answers: list[list[int]], jobs: list[Job]):
        self.cache, self.sequences, self.mask, self.positions = cache, sequences, mask, positions
        self.tokens, self.limits, self.settings, self.answers, self.jobs = tokens, limits, settings, answers, jobs

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
            self.tokens, self.limits, self.settings = self.tokens[keep], self.limits[keep], self.settings[keep]
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
            torch.cat([running.limits, joining.limits]), torch.cat([running.settings, joining.settings]),
            running.answers + joining.answers, running.jobs + joining.jobs,
        )


def row_settings(jobs: list[Job], device: Any) -> Any:
    """Each row's sampling settings as one [rows, 4] tensor: temperature, top-p, repetition penalty, greedy."""
    return torch.tensor([[job.params.temperature, job.params.top_p, job.params.repetition_penalty, float(job.params.greedy)]
                         for job in jobs], device=device)


def pick(scores: Any, sequences: Any, settings: Any) -> Any:
    """The next token of every row, each with its own settings, so requests with different parameters share a batch.

    Same arithmetic as transformers' RepetitionPenalty, Temperature and TopP processors, applied per row;
    greedy rows take the argmax (after the penalty), sampling rows draw from their nucleus.
    """
    temperature, top_p, penalty, greedy = settings.unbind(1)
    if (penalty != 1.0).any():
        seen = torch.gather(scores, 1, sequences)
        factor = penalty[:, None]
        scores = scores.scatter(1, sequences, torch.where(seen < 0, seen * factor, seen / factor))
    choice = scores.argmax(-1)
    rows = (greedy == 0).nonzero().squeeze(1)
    if rows.numel():
        probs = (scores[rows] / temperature[rows, None]).softmax(-1)
        ordered, order = probs.sort(-1, descending=True)
        outside = ordered.cumsum(-1) - ordered > top_p[rows, None]  # past the smallest set reaching top_p
        probs = torch.zeros_like(probs).scatter(1, order, ordered.masked_fill(outside, 0.0))
        choice[rows] = torch.multinomial(probs, 1).squeeze(1)
    return choice


class Decoder:
    """Continuous batching over the KV cache of one model; every row keeps its own parameters."""

    def __init__(self, model: ChatModel):
        self.chat = model
        self.model = model.model
        self.stop = torch.tensor(model.stop_ids, device=model.device)

    def decode(self, first: list[Job], admit: Callable[[int], list[Job]] = lambda free: [],
               max_rows: int = 16) -> Iterator[tuple[Job, list[int]]]:
        """Yields (job, generated tokens) as each sequence ends; between steps `admit(free_slots)` hands in joiners."""
        with torch.inference_mode():
            state: DecodeState | None = self._prefill(first)
            while True:
                state = yield from self._advance(state)
                joining = admit(max_rows - (state.size if state else 0))
                if joining:  # their prefill picks their first token, which may already end them
                    state = DecodeState.merge(state, (yield from self._advance(self._prefill(joining))), self.chat.pad_id)
                if state is None:
                    return
                for job in state.jobs:
                    job.batch_size = max(job.batch_size, state.size)
                step_input = state.tokens[:, None]
                state.extend(step_input)
                logits = self.model(input_ids=step_input, attention_mask=state.mask, position_ids=state.positions,
                                    cache=state.cache, use_cache=True, logits_to_keep=1).logits
                state.tokens = pick(logits[:, -1, :].float(), state.sequences, state.settings)

    def _advance(self, state: DecodeState) -> Generator[tuple[Job, list[int]], None, "DecodeState | None"]:
        """Record the tokens just picked (and stream them); yield the sequences that ended; return the rest."""
        ended = torch.isin(state.tokens, self.stop)
        for i, (token, end) in enumerate(zip(state.tokens.tolist(), ended.tolist())):
            if not end:
                state.answers[i].append(token)
                if state.jobs[i].stream is not None:
                    state.jobs[i].stream.put(token)
        now = time.monotonic()
        abandoned = torch.tensor([job.expired(now) for job in state.jobs], device=ended.device)
        done = ended | abandoned | (torch.tensor([len(a) for a in state.answers], device=ended.device) >= state.limits)
        for i in done.nonzero().squeeze(1).tolist():
            yield state.jobs[i], state.answers[i]
        return state.select((~done).nonzero().squeeze(1))

    def _prefill(self, jobs: list[Job]) -> DecodeState:
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
        settings = row_settings(jobs, device)
        tokens = pick(logits[:, -1, :].float(), sequences, settings)
        limits = torch.tensor([job.params.max_new_tokens for job in jobs], device=device)
        return DecodeState(cache, sequences, mask, positions[:, -1:], tokens, limits, settings, [[] for _ in jobs], list(jobs))


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

    def _admit(self, free: int) -> list[Job]:
        """Called between decode steps. A prefill stalls the running batch, so joiners come in groups: at
        once when the batch is empty or `join_min` are waiting, else after at most `join_every` steps."""
        self.steps_since_join += 1
        with self.lock:
            ready = len(self.waiting)
            if free <= 0 or not ready:
                return []
            if free < self.max_batch and ready < min(free, self.join_min) and self.steps_since_join < self.join_every:
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

        def admit(free: int) -> list[Job]:
            joining = self._admit(free)
            batch.extend(joining)  # so a failure below reaches the joiners too
            return joining

        try:
            for job, tokens in self.decoder.decode(list(batch), admit, self.max_batch):
                job.resolve(Expired(f"generation stopped after {len(tokens)} tokens: past the server's deadline "
                                    f"(PHI3FLOW_REQUEST_TIMEOUT_S) or the client left")
                            if job.expired() else Answer(self.model.text(tokens), len(tokens), job.batch_size))
        except Exception as exc:  # noqa: BLE001 - handed to every job of this batch; the worker keeps serving
            log.exception("Generation failed")
            error = exc if isinstance(exc, ServingError) else GenerationFailed(f"generation failed: {type(exc).__name__}: {str(exc)[:200]}")
            for job in batch:
                job.resolve(error)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()  # after an out-of-memory error, give the next batch its memory back
        finally:
            self.running = []
