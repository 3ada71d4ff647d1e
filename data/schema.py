"""The data schema every stage shares: ultrachat_200k's rows (prompt, prompt_id, messages) plus a flat ground_truth.

Reading validates row by row and reports every bad row with its line number; writing adds `ground_truth` (column
mappings such as `${data.ground_truth}` in Prompt Flow and Foundry evaluations cannot reach into `messages`);
splits are seeded. Training reads with `read_jsonl`; `phi3flow data` (prepare.py) writes with `write_jsonl`.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from phi3flow.errors import Phi3flowError

Row = dict[str, Any]

ROLES = ("system", "user", "assistant")
TRAIN_FILE = "train_data.jsonl"
TEST_FILE = "test_data.jsonl"


class DataError(Phi3flowError, ValueError):
    """Input rows that cannot be used for chat fine-tuning."""


def prompt_id(prompt: str) -> str:
    """ultrachat_200k's prompt_id is the SHA-256 hex digest of the prompt; keep that for our rows too."""
    return hashlib.sha256(prompt.encode("utf-8")).hexdigest()


def make_row(messages: list[dict[str, str]]) -> Row:
    """A row in the ultrachat schema from a conversation; the prompt is its first user turn."""
    prompt = next(m["content"] for m in messages if m["role"] == "user")
    return {"prompt": prompt, "prompt_id": prompt_id(prompt), "messages": messages}


def row_problem(row: Any) -> str | None:
    """Why `row` is unusable for chat fine-tuning, or None when it is fine."""
    if not isinstance(row, dict):
        return f"expected a JSON object, got {type(row).__name__}"
    messages = row.get("messages")
    if not isinstance(messages, list) or not messages:
        return "'messages' must be a non-empty list of {role, content} turns"
    for i, turn in enumerate(messages):
        if not isinstance(turn, dict):
            return f"messages[{i}] is not an object"
        if turn.get("role") not in ROLES:
            return f"messages[{i}].role is {turn.get('role')!r}; expected one of {', '.join(ROLES)}"
        content = turn.get("content")
        if not isinstance(content, str) or not content.strip():
            return f"messages[{i}].content must be a non-empty string"
    if not any(turn["role"] == "user" for turn in messages):
        return "the conversation has no user turn"
    if messages[-1]["role"] != "assistant":
        return f"the conversation must end with an assistant turn, not {messages[-1]['role']!r}"
    for key in ("prompt", "prompt_id"):
        if key in row and not isinstance(row[key], str):
            return f"'{key}' must be a string"
    return None


def normalise(row: Row) -> Row:
    """Fill prompt/prompt_id when a user's row lacks them, so every output row has the full schema."""
    filled = make_row(row["messages"])
    return {**filled, **{key: row[key] for key in ("prompt", "prompt_id") if key in row}}


def read_jsonl(path: str | Path, max_reported: int = 20) -> list[Row]:
    """Read and validate a JSONL file; every bad row is reported with its line number, none dropped."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    rows: list[Row] = []
    problems: list[str] = []
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8-sig" if number == 1 else "utf-8")  # a byte-order mark may open the file
            except UnicodeDecodeError as exc:
                raise DataError(
                    f"{path}: line {number} is not UTF-8 text (byte 0x{raw[exc.start]:02x} at column "
                    f"{exc.start + 1}); save the file as UTF-8"
                ) from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                problems.append(f"line {number}: invalid JSON ({exc.msg})")
                continue
            problem = row_problem(row)
            if problem:
                problems.append(f"line {number}: {problem}")
            else:
                rows.append(normalise(row))
    if problems:
        shown = problems[:max_reported]
        more = f"\n  ... and {len(problems) - len(shown)} more" if len(problems) > len(shown) else ""
        raise DataError(f"{path}: {len(problems)} bad row(s):\n  " + "\n  ".join(shown) + more)
    if not rows:
        raise DataError(f"{path}: no rows")
    return rows


def write_jsonl(rows: Iterable[Row], path: Path) -> int:
    """Write rows one JSON object per line (UTF-8, not ASCII-escaped), each with its `ground_truth`; returns the row count."""
    from phi3flow.evaluation.metrics import first_turn  # the evaluation's reference answer: one rule for both

    path.parent.mkdir(parents=True, exist_ok=True)
    count = 0
    with path.open("w", encoding="utf-8") as handle:
        for row in rows:
            row = {**row, "ground_truth": first_turn(row["messages"], "assistant")}
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
            count += 1
    return count


def split_rows(rows: list[Row], test_size: float, seed: int) -> tuple[list[Row], list[Row]]:
    """A seeded shuffle split like `Dataset.train_test_split(test_size, seed)`: same inputs, same files."""
    if not 0 < test_size < 1:
        raise DataError(f"test size must be between 0 and 1, got {test_size}")
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    n_test = max(1, round(len(rows) * test_size))
    if n_test >= len(rows):
        raise DataError(f"{len(rows)} row(s) are too few to hold out {test_size:.0%} and still train")
    return [rows[i] for i in order[n_test:]], [rows[i] for i in order[:n_test]]
