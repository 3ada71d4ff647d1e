"""Answering the test set with an endpoint: the examples, the endpoints under test, and predictions kept line by line.

Answers are written to DIR/<name>.predictions.jsonl as they arrive, so an interrupted or partly failed run is
finished with `--resume` without asking again for the lines already answered. `phi3flow eval` (compare.py) scores
them; report.py writes them up.
"""

from __future__ import annotations

import json
import os
import queue
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import requests

from phi3flow.client import EndpointError, get_client
from phi3flow.connect import read_connection
from phi3flow.errors import Phi3flowError
from phi3flow.evaluation.judge import Judge, JudgeError
from phi3flow.evaluation.metrics import first_turn
from phi3serve.contract import BATCH_INVARIANT_HEADER, BATCH_SIZE_HEADER

LATENCY = "latency_s"  # per-line seconds, lower is better; compared like the quality metrics
GREEDY = {"temperature": 0.0, "top_p": 1.0}  # the decoding every line is asked with


class EvalError(Phi3flowError):
    """Data or endpoints an evaluation cannot use."""


@dataclass(frozen=True)
class Example:
    index: int
    question: str
    reference: str


@dataclass(frozen=True)
class System:
    """An endpoint under test: `role` is candidate or baseline, `name` the connection (also the predictions file stem)."""

    role: str
    name: str
    endpoint: str
    key: str
    options: dict = field(default_factory=dict)  # endpoint-client options of its connection (api_format, model)


def load_examples(path: Path, limit: int | None = None) -> list[Example]:
    """Question = first user turn, reference = first assistant turn of each line's `messages`."""
    examples = []
    with open(path, encoding="utf-8") as lines:
        for index, line in enumerate(lines):
            if limit is not None and len(examples) >= limit:
                break
            if not line.strip():
                continue
            messages = json.loads(line).get("messages") or []
            try:
                examples.append(Example(index, first_turn(messages, "user"), first_turn(messages, "assistant")))
            except ValueError as exc:
                raise EvalError(f"{path} line {index + 1}: {exc}; each line needs a user and an assistant turn") from None
    if not examples:
        raise EvalError(f"no lines in {path}")
    return examples


def resolve_target(spec: str, role: str, key_env: str) -> System:
    """A Prompt Flow connection name, or a scoring URL whose key is in $key_env (where promptflow is not installed)."""
    if spec.startswith(("http://", "https://")):
        key = os.environ.get(key_env)
        if not key:
            raise EvalError(f"{spec} needs its key in ${key_env} (or name another variable with --key-env)")
        return System(role, role, spec, key)
    try:
        return System(role, spec, *read_connection(spec))  # endpoint, key, client options
    except ValueError as exc:
        raise EvalError(str(exc)) from None


def asker(system: System, via: str, max_new_tokens: int) -> Callable[[str], str]:
    """question -> answer, greedy, through the endpoint client directly or through the Agent Framework chat client."""
    if via == "agent":
        from phi3agents import EndpointChatClient

        agent_client = EndpointChatClient(system.endpoint, system.key, **system.options)
        return lambda question: agent_client.answer(question, **GREEDY, max_tokens=max_new_tokens)
    client = get_client(system.endpoint, system.key, **system.options)
    return lambda question: client.chat([{"role": "user", "content": question}], **GREEDY, max_new_tokens=max_new_tokens)


def _read_predictions(path: Path) -> dict[int, dict]:
    """Last record per line index (a re-run line appends a newer record). A line that is not a whole record (the
    last one, torn by a kill mid-write) is skipped with a note: its question is asked again."""
    records: dict[int, dict] = {}
    if path.is_file():
        for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                records[record["index"]] = record
            except (ValueError, KeyError, TypeError):
                print(
                    f"{path} line {number} is not a whole record (written when a run was killed?): asking its question again",
                    file=sys.stderr,
                )
    return records


def _write_predictions(path: Path, records: dict[int, dict]) -> None:
    """Every record, one line each in line order, replacing the file atomically: a kill leaves the old file or the new."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(temporary, "w", encoding="utf-8") as sink:
        sink.writelines(json.dumps(records[index], ensure_ascii=False) + "\n" for index in sorted(records))
        sink.flush()
        os.fsync(sink.fileno())
    os.replace(temporary, path)


def _answer_all(answer: Callable[[Example], dict], todo: list[Example], concurrency: int) -> Iterator[dict]:
    """answer(example) for each example, `concurrency` at a time, yielded as each finishes.

    The workers are daemon threads that take no new example once the caller stops (Ctrl+C): nothing more is sent,
    and the process can exit at once instead of waiting for the requests still in flight."""
    waiting, finished = queue.SimpleQueue(), queue.SimpleQueue()
    for example in todo:
        waiting.put(example)
    stopped = threading.Event()

    def work() -> None:
        while not stopped.is_set():
            try:
                example = waiting.get_nowait()
            except queue.Empty:
                return
            try:
                finished.put(answer(example))
            except Exception as exc:  # re-raised by the caller, as a future's result() would
                finished.put(exc)

    for _ in range(min(concurrency, len(todo))):
        threading.Thread(target=work, daemon=True).start()
    try:
        for _ in todo:
            result = finished.get()
            if isinstance(result, Exception):
                raise result
            yield result
    finally:
        stopped.set()


def predict(
    system: System,
    examples: list[Example],
    out: Path,
    *,
    concurrency: int,
    max_new_tokens: int,
    resume: bool,
    via: str = "client",
    judge: Judge | None = None,
) -> list[dict]:
    """Answer every example (only the missing or failed ones with `resume`); return one record per example, in order.

    With `resume`, every stored record is kept, also those of lines outside this run (a smaller --limit).
    With a judge, each answer is also rated; a line the judge cannot rate counts as failed (resume re-runs it)."""
    path = out / f"{system.name}.predictions.jsonl"
    stored = _read_predictions(path) if resume else {}
    if resume:
        _write_predictions(path, stored)  # without torn lines, so that appending starts on a line of its own
    done = {
        index: record for index, record in stored.items() if record.get("error") is None and (judge is None or "judged" in record)
    }
    todo = [ex for ex in examples if ex.index not in done or done[ex.index]["question"] != ex.question]
    ask = asker(system, via, max_new_tokens)

    def answer(example: Example) -> dict:
        start = time.monotonic()
        judged = {}
        try:
            prediction, error = ask(example.question), None
        except EndpointError as exc:
            prediction, error = None, str(exc)
        latency = round(time.monotonic() - start, 4)
        if judge is not None and error is None:
            try:
                judged = {"judged": judge.rate(example.question, prediction)}
            except JudgeError as exc:
                error = f"judge: {exc}"
        return {
            "index": example.index,
            "question": example.question,
            "reference": example.reference,
            "prediction": prediction,
            "error": error,
            LATENCY: latency,
            **judged,
        }

    from tqdm import tqdm

    with (
        open(path, "a" if resume else "w", encoding="utf-8") as sink,
        tqdm(total=len(todo), desc=f"{system.role} ({system.name})", unit="line", file=sys.stderr) as bar,
    ):
        for record in _answer_all(answer, todo, concurrency):
            stored[record["index"]] = record
            sink.write(json.dumps(record, ensure_ascii=False) + "\n")  # as they come: an interrupted run keeps them
            sink.flush()
            bar.update()
    _write_predictions(path, stored)  # compact: one line per index
    return [stored[ex.index] for ex in examples]


class ServerHeaders:
    """What a server said about its batching on every answer it sent (a response hook on the endpoint's pooled
    client, which the client and agent paths share): whether it guarantees that greedy answers do not depend on
    what shares their batch, and the largest batch each answer was decoded in. No extra request is made."""

    def __init__(self, system: System):
        self._hooks = get_client(system.endpoint, system.key, **system.options).session.hooks["response"]
        self._lock = threading.Lock()
        self.invariant: set[bool] = set()
        self.batch_sizes: list[int] = []
        self._hooks.append(self._record)

    def _record(self, response: requests.Response, *args, **kwargs) -> None:
        invariant, size = response.headers.get(BATCH_INVARIANT_HEADER), response.headers.get(BATCH_SIZE_HEADER, "")
        with self._lock:
            if invariant is not None:
                self.invariant.add(invariant.strip().lower() == "true")
            if size.strip().isdigit():
                self.batch_sizes.append(int(size))

    def detach(self) -> dict:
        """Stop listening; the summary for metrics.json (None where the server did not say)."""
        self._hooks.remove(self._record)
        sizes = self.batch_sizes
        return {
            "batch_invariant": all(self.invariant) if self.invariant else None,
            "largest_batch": max(sizes) if sizes else None,
            "answers_batched": sum(s > 1 for s in sizes) if sizes else None,
        }
