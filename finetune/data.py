"""`phi3flow data`: write train/test JSONL in the ultrachat_200k schema (prompt, prompt_id, messages).

Three sources, one output format, so training and evaluation never care where rows came from:
- the tutorial's dataset, `HuggingFaceH4/ultrachat_200k` (needs the Hugging Face Hub);
- `--sample`: an offline sample generated here (licence: CC0-1.0, written by this project), built from
  templated questions with one consistent, short answer style, so that a few hundred CPU steps on the
  embedded model visibly change its answers on the held-out split;
- `--from-jsonl FILE`: the user's own conversations, validated row by row.
The train/test split is a seeded shuffle, so the same inputs always give the same files.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import socket
import sys
from pathlib import Path
from typing import Any, Iterable
from urllib.parse import urlparse

Row = dict[str, Any]

ULTRACHAT = "HuggingFaceH4/ultrachat_200k"
ULTRACHAT_CONFIG = "default"
ULTRACHAT_SPLIT = "train_sft[:1%]"
ROLES = ("system", "user", "assistant")
SAMPLE_LICENSE = "CC0-1.0"
TRAIN_FILE = "train_data.jsonl"
TEST_FILE = "test_data.jsonl"


class DataError(ValueError):
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
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
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
    """Write rows one JSON object per line (UTF-8, not ASCII-escaped); returns the row count."""
    path.parent.mkdir(parents=True, exist_ok=True)
    count = 0
    with path.open("w", encoding="utf-8") as handle:
        for row in rows:
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


# --- The offline sample ------------------------------------------------------------------------------
# Facts are general knowledge; every answer is one sentence in a fixed form, which is what the model learns.

CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Portugal": "Lisbon",
    "Japan": "Tokyo", "Canada": "Ottawa", "Australia": "Canberra", "Egypt": "Cairo", "Kenya": "Nairobi",
    "Brazil": "Brasilia", "Argentina": "Buenos Aires", "Peru": "Lima", "Chile": "Santiago", "Mexico": "Mexico City",
    "Norway": "Oslo", "Sweden": "Stockholm", "Finland": "Helsinki", "Denmark": "Copenhagen", "Poland": "Warsaw",
    "Greece": "Athens", "Turkey": "Ankara", "India": "New Delhi", "China": "Beijing", "Thailand": "Bangkok",
    "Vietnam": "Hanoi", "Ireland": "Dublin", "Austria": "Vienna", "Hungary": "Budapest", "Netherlands": "Amsterdam",
    "Belgium": "Brussels", "Switzerland": "Bern", "Russia": "Moscow", "Ukraine": "Kyiv", "Nigeria": "Abuja",
    "Morocco": "Rabat", "Cuba": "Havana", "Colombia": "Bogota", "Iceland": "Reykjavik", "New Zealand": "Wellington",
}
OPPOSITES = {
    "hot": "cold", "big": "small", "fast": "slow", "happy": "sad", "light": "dark", "early": "late",
    "strong": "weak", "open": "closed", "full": "empty", "high": "low", "young": "old", "rich": "poor",
    "hard": "soft", "wet": "dry", "loud": "quiet", "thick": "thin", "heavy": "light", "near": "far",
    "clean": "dirty", "long": "short", "up": "down", "inside": "outside", "true": "false", "win": "lose",
    "buy": "sell", "push": "pull", "first": "last", "day": "night", "begin": "end", "cheap": "expensive",
}
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]


def _turn(question: str, answer: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]


def _candidates(rng: random.Random) -> list[list[dict[str, str]]]:
    """Every conversation the sample can contain, in a fixed order."""
    found: list[list[dict[str, str]]] = []
    for country, city in CAPITALS.items():
        answer = f"The capital of {country} is {city}."
        found += [_turn(f"What is the capital of {country}?", answer),
                  _turn(f"Which city is the capital of {country}?", answer),
                  _turn(f"Name the capital city of {country}.", answer)]
    for word, opposite in OPPOSITES.items():
        answer = f"The opposite of \"{word}\" is \"{opposite}\"."
        found += [_turn(f"What is the opposite of \"{word}\"?", answer),
                  _turn(f"Give me an antonym for \"{word}\".", answer)]
    for names, unit in ((DAYS, "day"), (MONTHS, "month")):
        for i, name in enumerate(names):
            after, before = names[(i + 1) % len(names)], names[i - 1]
            found += [_turn(f"Which {unit} comes after {name}?", f"The {unit} after {name} is {after}."),
                      _turn(f"Which {unit} comes before {name}?", f"The {unit} before {name} is {before}.")]
    for a in range(2, 21):
        for b in range(2, 21, 3):
            found.append(_turn(f"What is {a} plus {b}?", f"{a} plus {b} equals {a + b}."))
            if a > b:
                found.append(_turn(f"What is {a} minus {b}?", f"{a} minus {b} equals {a - b}."))
    countries = list(CAPITALS)
    for country in countries:  # multi-turn rows: the loss must cover every assistant turn, not only the last
        other = rng.choice([c for c in countries if c != country])
        found.append(_turn(f"Tell me the capital of {country}.", f"The capital of {country} is {CAPITALS[country]}.")
                     + _turn(f"And the capital of {other}?", f"The capital of {other} is {CAPITALS[other]}."))
    return found


def sample_rows(size: int = 400, seed: int = 0) -> list[Row]:
    """The offline sample: `size` distinct conversations picked deterministically from the templates."""
    rng = random.Random(seed)
    pool = _candidates(rng)
    if not 0 < size <= len(pool):
        raise DataError(f"the sample size must be between 1 and {len(pool)}, got {size}")
    return [make_row(messages) for messages in rng.sample(pool, size)]


# --- ultrachat_200k ----------------------------------------------------------------------------------


def hub_reachable(timeout: float = 3.0) -> bool:
    """A quick TCP probe, because `datasets` retries an unreachable hub for ~25 s before failing."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in {"1", "true", "yes"}:
        return False
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        with socket.create_connection((url.hostname or "huggingface.co", url.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


def ultrachat_rows(dataset: str, config: str, split: str) -> list[Row]:
    """Load the tutorial's dataset with `datasets`; raises ConnectionError when the hub is out of reach."""
    if not hub_reachable():
        raise ConnectionError("the Hugging Face Hub cannot be reached")
    try:
        from datasets import load_dataset
    except ImportError as exc:  # pragma: no cover - depends on the extras installed
        raise DataError("Loading ultrachat_200k needs `datasets`: pip install 'phi3flow[train]'") from exc
    loaded = load_dataset(dataset, config, split=split)
    return [{"prompt": r["prompt"], "prompt_id": r["prompt_id"], "messages": r["messages"]} for r in loaded]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="phi3flow data",
        description=f"Write <out-dir>/{TRAIN_FILE} and <out-dir>/{TEST_FILE} (ultrachat_200k schema: prompt, "
        f"prompt_id, messages). Default source: {ULTRACHAT} {ULTRACHAT_SPLIT} from the Hugging Face Hub.",
    )
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--sample", action="store_true",
                        help=f"offline: write the sample this project generates (licence {SAMPLE_LICENSE})")
    source.add_argument("--from-jsonl", metavar="FILE", type=Path,
                        help="your own conversations, one {messages: [{role, content}, ...]} object per line")
    parser.add_argument("--out-dir", type=Path, default=Path("data"), help="output folder (default: data)")
    parser.add_argument("--test-size", type=float, default=0.2, help="held-out fraction (default: 0.2)")
    parser.add_argument("--seed", type=int, default=42, help="split seed (default: 42)")
    parser.add_argument("--sample-size", type=int, default=400, help="rows in the offline sample (default: 400)")
    parser.add_argument("--dataset", default=ULTRACHAT, help=f"hub dataset (default: {ULTRACHAT})")
    parser.add_argument("--config", default=ULTRACHAT_CONFIG, help=f"dataset config (default: {ULTRACHAT_CONFIG})")
    split_help = f"dataset split (default: {ULTRACHAT_SPLIT})".replace("%", "%%")  # argparse %-formats help
    parser.add_argument("--split", default=ULTRACHAT_SPLIT, help=split_help)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.sample:
            rows = sample_rows(args.sample_size, args.seed)
            origin = f"offline sample generated by phi3flow, licence {SAMPLE_LICENSE}"
        elif args.from_jsonl:
            rows, origin = read_jsonl(args.from_jsonl), str(args.from_jsonl)
        else:
            try:
                rows, origin = ultrachat_rows(args.dataset, args.config, args.split), f"{args.dataset} {args.split}"
            except ConnectionError as exc:
                print(f"phi3flow data: cannot load {args.dataset} ({exc}); offline, run 'phi3flow data --sample' "
                      "or 'phi3flow data --from-jsonl FILE'.", file=sys.stderr)
                return 1
        train, test = split_rows(rows, args.test_size, args.seed)
    except DataError as exc:
        print(f"phi3flow data: {exc}", file=sys.stderr)
        return 1
    train_path, test_path = args.out_dir / TRAIN_FILE, args.out_dir / TEST_FILE
    write_jsonl(train, train_path)
    write_jsonl(test, test_path)
    print(f"Wrote {len(train)} rows to {train_path} and {len(test)} to {test_path} ({origin}; seed {args.seed}).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
