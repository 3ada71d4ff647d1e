"""The ONNX engine: an ONNX Runtime GenAI folder (`phi3flow export onnx`) served through onnxruntime-genai's Generator.

Same contract as the transformers engines: the prompt is encoded by the same ChatModel code (the folder
carries the tokenizer and chat template), the same stop tokens end a turn, and each request keeps its own
temperature, top-p, repetition penalty, greedy choice and max_new_tokens (sampled per row by `phi3serve.sampling.pick`). Not the library's Engine: on a CPU its static batching runs at most 4 requests at a time
whatever max_batch_size says (StaticBatchScheduler, 0.18.0), and its per-token overhead cost a fifth of the
single-request speed; a batched Generator decodes 16 rows per step. One worker thread owns the model.
"""

from __future__ import annotations

import atexit
import importlib
import json
import logging
import mmap
import os
import re
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from phi3serve.contract import Expired, GenerationFailed
from phi3serve.engine import Answer, Bounded, Job
from phi3serve.model import METADATA_FILE, ONNX_CONFIG, ChatModel, capped, read_json, stop_ids
from phi3serve.sampling import pick, row_settings
from phi3serve.settings import Settings

log = logging.getLogger("azmlinfsrv.score")
KEEP_ROOM = 256  # spare tokens in a single row's cache, for a next request that shares its prefix
INSTALL_HINT = "pip install onnxruntime-genai (or 'phi3flow[onnx]'); onnxruntime-genai-cuda for a model built for CUDA"
# The builder's LongRoPE graph (0.18): `If attention_mask width > /model/constants/INT64/<original>` picks the long cos/sin caches
ROPE_SWITCH = re.compile(rb"/model/constants/INT64/(\d+)\x12./model/rope_caches_subgraph/Greater/output_0", re.DOTALL)


def rope_switch(graph: Path) -> int | None:
    """The length past which a LongRoPE graph rotates with long factors (original_max_position_embeddings); None
    for a model with one set of factors. Read from the graph's own If, the rule the library runs by."""
    with graph.open("rb") as file, mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as data:
        found = ROPE_SWITCH.search(data)
        if found is None and data.find(b"cos_cache_large") >= 0:
            raise RuntimeError(
                f"{graph} switches LongRoPE factors by a rule this engine cannot read: re-export it "
                "with phi3flow export onnx (onnxruntime-genai 0.18's builder)"
            )
        return int(found[1]) if found else None


class OnnxChatModel(ChatModel):
    """The tokenizer, chat template, context and stop tokens of an ONNX Runtime GenAI folder; the engine runs it."""

    onnx = True

    def __init__(self, folder: Path, tokenizer: Any, config: dict, metadata: dict, max_context: int | None = None):
        self.folder, self.model, self.tokenizer = folder, None, tokenizer  # the ONNX model is loaded by OnnxEngine
        self.context = capped(int(config["model"].get("context_length") or 4096), max_context)
        self.stop_ids = stop_ids(tokenizer, metadata.get("end_of_turn_token"), config["model"].get("eos_token_id"))
        self.pad_id = config["model"]["pad_token_id"]  # what the library masks when it trails a row of a batch
        providers = json.dumps(config["model"]["decoder"].get("session_options", {}).get("provider_options", []))
        self.device = torch.device("cuda" if "cuda" in providers else "cpu")
        self.dtype = "onnx-" + metadata.get("onnx", {}).get("precision", "unknown")  # what `phi3flow export` built
        self.rope_switch = rope_switch(folder / config["model"]["decoder"]["filename"])

    def long_factors(self, length: int) -> bool:
        """Whether a sequence of `length` tokens rotates with LongRoPE's long factors (generate()'s rule and the graph's)."""
        return self.rope_switch is not None and length > self.rope_switch

    @classmethod
    def load(cls, model_dir: str | os.PathLike, settings: Settings | None = None) -> OnnxChatModel:
        from transformers import AutoTokenizer

        folder = Path(model_dir)
        try:
            import onnxruntime_genai  # noqa: F401 - fail at load, not on the first request
        except ImportError:
            raise RuntimeError(f"{folder} is an ONNX Runtime GenAI model; serving it needs {INSTALL_HINT}") from None
        config = json.loads((folder / ONNX_CONFIG).read_text(encoding="utf-8"))
        max_context = (settings or Settings.from_env()).max_context
        return cls(folder, AutoTokenizer.from_pretrained(folder), config, read_json(folder / METADATA_FILE) or {}, max_context)


class OnnxEngine(Bounded):
    """Static batches on onnxruntime-genai's Generator: each batch is prefilled at once, then decoded to its end.

    Jobs that arrive together (less than `gap_s` apart, for at most `wait_s`) form one batch of up to `max_batch`
    right-padded rows, the padding the library masks by itself (trailing pad tokens of a row). Every step the
    engine takes the batch's logits, picks each row's token with the decode loop's per-row sampling (`pick`) and
    hands the choice back to the library as one-hot logits, so its own greedy search only appends it. A row
    ends at a stop token, its max_new_tokens or its deadline; the batch ends when its last row does, and jobs
    arriving meanwhile wait for the next one (the library's Generator takes no new rows mid-batch). A request
    that runs alone starts from the previous lone request's cache where their prompts agree (`_prefill`).

    LongRoPE (Phi-3.5-mini, Phi-4-mini): the graph rotates a whole batch with long factors once the batch is wider
    than original_max_position_embeddings, and switches without recomputing the cache. generate() decides per
    sequence and recomputes its cache once, when the sequence first passes the original context. So rows share a
    batch only when all of them stay short to the batch's end or all are long from their prompts (`_fits`); a
    request that crosses runs alone and, at the crossing, its Generator is rewound to nothing and rerun on the
    prompt and answer so far (one prefill), as generate() does.
    """

    # Checked, and tested (tests/test_onnx.py): a greedy row's logits are bit-identical alone and in a batch of
    # prompts of other lengths, so its answer never depends on its neighbours.
    batch_invariant = True

    def __init__(
        self, model: OnnxChatModel, max_batch: int = 16, max_queue: int = 64, wait_s: float = 0.05, gap_s: float = 0.005
    ):
        super().__init__(max_queue)
        self.model, self.max_batch, self.wait_s, self.gap_s = model, max_batch, wait_s, gap_s
        self.stop = torch.tensor(model.stop_ids)
        self.running: list[Job] = []  # the jobs taken from the queue, being decoded
        # the last single-row Generator, its prompt, its length, and whether its cache holds long-factor keys (LongRoPE)
        self.kept: tuple[Any, list[int], int, bool] | None = None
        ready: dict[str, Any] = {}
        started = threading.Event()
        self.start_worker(lambda: self._work(ready, started), "phi3flow-onnx")
        started.wait()
        if "error" in ready:
            raise RuntimeError(f"cannot load the ONNX model in {model.folder}: {ready['error']}")
        atexit.register(self.close)

    def close(self, timeout_s: float = 10.0) -> None:
        """Drop every job and stop the worker (at its next step)."""
        with self.lock:
            self.stopping = True
            for job in self.waiting + self.running:
                job.cancel()
            self.lock.notify()
        if self.worker is not None and self.worker is not threading.current_thread():
            self.worker.join(timeout_s)

    def _work(self, ready: dict[str, Any], started: threading.Event) -> None:
        try:
            og: Any = importlib.import_module("onnxruntime_genai")  # a compiled module without type information

            self.og, self.og_model = og, og.Model(og.Config(str(self.model.folder)))
        except Exception as exc:  # noqa: BLE001 - reported by __init__ in the caller's thread
            ready["error"] = f"{type(exc).__name__}: {exc}"
        started.set()
        while "error" not in ready and (jobs := self.collect(self.max_batch, self.wait_s, self.gap_s)):
            self.running = jobs  # close() cancels them all, groups not started yet included
            for group in self._groups(jobs):
                try:
                    self._generate(group)
                except Exception as exc:  # noqa: BLE001 - fails this batch's jobs; the worker keeps serving
                    log.exception("ONNX generation failed")
                    error = GenerationFailed(f"generation failed: {type(exc).__name__}: {str(exc)[:200]}")
                    for job in group:
                        job.resolve(error)
            self.running = []

    def _groups(self, jobs: list[Job]) -> list[list[Job]]:
        """Batches the library can run: rows share one length budget (longest prompt + most new tokens), which
        must fit the context, a prompt ending in the pad token would lose it to padding, so it runs alone, and rows
        of a LongRoPE model share one set of rotary factors for the batch's whole run."""
        groups: list[list[Job]] = []
        for job in jobs:
            group = next((group for group in groups if self._fits(group + [job])), None)
            if group is None:
                groups.append([job])
            else:
                group.append(job)
        return groups

    def _fits(self, rows: list[Job]) -> bool:
        length = max(len(job.ids) for job in rows) + max(job.params.max_new_tokens for job in rows)
        one_factor_set = not self.model.long_factors(length) or all(self.model.long_factors(len(job.ids)) for job in rows)
        return all(job.ids[-1] != self.model.pad_id for job in rows) and length <= self.model.context and one_factor_set

    def _prefill(self, jobs: list[Job]) -> tuple[Any, int]:
        """A Generator that has run the batch's prompts (right-padded), and its length in tokens.

        A single row reuses the previous single-row Generator when its prompt starts with tokens of that one's
        prompt (a shared system prompt, the earlier turns of a conversation): it rewinds to them and runs only the
        rest, which gives the same logits as a fresh prefill bit for bit as long as the rest is 2 tokens or more.
        Tokens run one at a time (generated ones, a 1-token rest) take another kernel path with other rounding, so
        they are never reused. Nor is a cache computed with the other LongRoPE factor set than the prompt needs (a
        crossing request recomputes its whole cache with long factors). Rows of a batch cannot reuse: the library
        takes a batch's prompts in one call.
        Single rows get KEEP_ROOM spare tokens so that the next request fits too.
        """
        og, width = self.og, max(len(job.ids) for job in jobs)
        length = width + max(job.params.max_new_tokens for job in jobs)
        kept, self.kept = self.kept, None
        if len(jobs) == 1 and kept is not None:
            generator, computed, capacity, long = kept
            ids = jobs[0].ids
            shared = next((i for i, (a, b) in enumerate(zip(computed, ids[:-2])) if a != b), min(len(computed), len(ids) - 2))
            if shared and length <= capacity and long == self.model.long_factors(len(ids)):
                generator.rewind_to(shared)
                generator.append_tokens(np.asarray([ids[shared:]], dtype=np.int32))
                return generator, capacity
        capacity = max(length, min(length + KEEP_ROOM, self.model.context)) if len(jobs) == 1 else length
        params = og.GeneratorParams(self.og_model)
        params.set_search_options(
            batch_size=len(jobs), max_length=capacity, do_sample=False, repetition_penalty=1.0
        )  # the library appends what `pick` chose
        generator = og.Generator(self.og_model, params)
        generator.append_tokens(
            np.asarray([job.ids + [self.model.pad_id] * (width - len(job.ids)) for job in jobs], dtype=np.int32)
        )
        return generator, capacity

    def _generate(self, jobs: list[Job]) -> None:
        """Decode one batch to its end, resolving (and streaming) each job as its row ends."""
        rows, width = len(jobs), max(len(job.ids) for job in jobs)
        generator, capacity = self._prefill(jobs)
        # The repetition penalty looks at each row's own tokens: its padding repeats its first token, not the pad id.
        sequences = torch.tensor([job.ids + job.ids[:1] * (width - len(job.ids)) for job in jobs])
        settings = row_settings(jobs, "cpu")
        # pick() would take the same first maximum; numpy's argmax over a 49k vocabulary takes a fifteenth of the time
        plain_greedy = all(job.params.greedy and job.params.repetition_penalty == 1.0 for job in jobs)
        answers: list[list[int]] = [[] for _ in jobs]
        chosen, every_row = None, np.arange(rows)
        live, crossed = set(range(rows)), False
        while True:
            for i in live:
                jobs[i].batch_size = max(jobs[i].batch_size, len(live))
            logits = generator.get_logits().reshape(rows, -1)
            tokens = torch.from_numpy(logits.argmax(-1)) if plain_greedy else pick(torch.from_numpy(logits), sequences, settings)
            sequences = torch.cat([sequences, tokens[:, None]], dim=1)
            ended = torch.isin(tokens, self.stop).tolist()
            now = time.monotonic()
            for i, token in enumerate(tokens.tolist()):
                if i not in live:
                    continue
                job = jobs[i]
                if not ended[i]:
                    answers[i].append(token)
                    if job.stream is not None:
                        job.stream.put(token)
                if job.expired(now):
                    job.resolve(
                        Expired(f"generation stopped after {len(answers[i])} tokens: the deadline passed or the client left")
                    )
                elif ended[i] or len(answers[i]) >= job.params.max_new_tokens:
                    job.resolve(Answer(self.model.text(answers[i]), len(answers[i]), job.batch_size))
                else:
                    continue
                live.discard(i)
            if not live:
                if rows == 1:
                    self.kept = (generator, jobs[0].ids, capacity, self.model.long_factors(len(jobs[0].ids)) or crossed)
                return
            if rows == 1 and len(jobs[0].ids) + len(answers[0]) - 1 == self.model.rope_switch:
                # The token just chosen is the first past the original context: recompute the whole cache with long factors
                generator.rewind_to(0)
                generator.append_tokens(np.asarray([jobs[0].ids + answers[0]], dtype=np.int32))
                crossed = True
                continue
            chosen = np.zeros_like(logits) if chosen is None else chosen
            chosen[every_row, tokens.numpy()] = 1.0
            generator.set_logits(chosen)
            generator.generate_next_token()
            chosen[every_row, tokens.numpy()] = 0.0
