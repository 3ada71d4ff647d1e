"""`phi3flow data`: write train/test JSONL in the ultrachat_200k schema (prompt, prompt_id, messages) plus ground_truth.

Three sources, one output format, so training and evaluation never care where rows came from:
- the tutorial's dataset, `HuggingFaceH4/ultrachat_200k` (needs the Hugging Face Hub);
- `--sample`: an offline sample generated here (licence: CC0-1.0, written by this project): short templated
  questions whose answers state one checkable fact, split by fact so the test split asks only about facts
  training never shows (it measures whether a skill transfers, not recall of the training answers);
- `--from-jsonl FILE`: the user's own conversations, validated row by row.
Splits are seeded (a row shuffle; the sample's held-out facts), so the same inputs always give the same files.
Every line also carries a flat `ground_truth`, the reference answer to its `prompt` (the evaluation's reference): column
mappings (`${data.ground_truth}` in Prompt Flow and Foundry evaluations) cannot reach into the `messages` list.
"""

from __future__ import annotations

from phi3flow.errors import Phi3flowError

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
                raise DataError(f"{path}: line {number} is not UTF-8 text (byte 0x{raw[exc.start]:02x} at column "
                                f"{exc.start + 1}); save the file as UTF-8") from None
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


# --- The offline sample ------------------------------------------------------------------------------
# Split by fact, not by row: a held-out country, antonym pair, month or number never occurs in train, so the
# test split asks for facts the model was not shown and measures whether fine-tuning transferred a skill.
# Every answer is one sentence whose only words absent from its question are the fact, so it can be checked.

CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Portugal": "Lisbon",
    "Japan": "Tokyo", "Canada": "Ottawa", "Australia": "Canberra", "Egypt": "Cairo", "Kenya": "Nairobi",
    "Brazil": "Brasilia", "Argentina": "Buenos Aires", "Peru": "Lima", "Chile": "Santiago", "Mexico": "Mexico City",
    "Norway": "Oslo", "Sweden": "Stockholm", "Finland": "Helsinki", "Denmark": "Copenhagen", "Poland": "Warsaw",
    "Greece": "Athens", "Turkey": "Ankara", "India": "New Delhi", "China": "Beijing", "Thailand": "Bangkok",
    "Vietnam": "Hanoi", "Ireland": "Dublin", "Austria": "Vienna", "Hungary": "Budapest", "Netherlands": "Amsterdam",
    "Belgium": "Brussels", "Switzerland": "Bern", "Russia": "Moscow", "Ukraine": "Kyiv", "Nigeria": "Abuja",
    "Morocco": "Rabat", "Cuba": "Havana", "Colombia": "Bogota", "Iceland": "Reykjavik", "New Zealand": "Wellington",
    "Czechia": "Prague", "Romania": "Bucharest", "Bulgaria": "Sofia", "Serbia": "Belgrade", "Croatia": "Zagreb",
    "Slovakia": "Bratislava", "Estonia": "Tallinn", "Latvia": "Riga", "Lithuania": "Vilnius", "South Korea": "Seoul",
    "Indonesia": "Jakarta", "Philippines": "Manila", "Malaysia": "Kuala Lumpur", "Pakistan": "Islamabad",
    "Bangladesh": "Dhaka", "Nepal": "Kathmandu", "Iran": "Tehran", "Iraq": "Baghdad", "Saudi Arabia": "Riyadh",
    "Jordan": "Amman", "Lebanon": "Beirut", "Ethiopia": "Addis Ababa", "Ghana": "Accra", "Senegal": "Dakar",
    "Uganda": "Kampala", "Venezuela": "Caracas", "Ecuador": "Quito", "Uruguay": "Montevideo", "Jamaica": "Kingston",
    "Afghanistan": "Kabul", "Qatar": "Doha", "Mongolia": "Ulaanbaatar",
}
# Pairs share no word, so holding out a pair holds out both of its words.
OPPOSITES = {
    "hot": "cold", "big": "small", "fast": "slow", "happy": "sad", "light": "dark", "early": "late",
    "strong": "weak", "open": "closed", "full": "empty", "high": "low", "young": "old", "rich": "poor",
    "hard": "soft", "wet": "dry", "loud": "quiet", "thick": "thin", "near": "far", "clean": "dirty",
    "long": "short", "up": "down", "inside": "outside", "true": "false", "win": "lose", "buy": "sell",
    "push": "pull", "begin": "end", "cheap": "expensive", "love": "hate", "north": "south", "east": "west",
    "sweet": "sour", "wide": "narrow", "deep": "shallow", "arrive": "depart", "remember": "forget",
    "increase": "decrease", "smooth": "rough", "ancient": "modern", "guilty": "innocent", "friend": "enemy",
}
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]
# Operands and results: train numbers are at most 30, held-out ones at least 31.
TRAIN_OPERANDS = range(2, 16)
TEST_ADDENDS = range(31, 61)
TEST_MINUENDS, TEST_SUBTRAHENDS = range(75, 100), range(31, 41)
HELD_OUT = ("countries", "antonym pairs")  # the families whose held-out facts the seed picks

Conversation = list[dict[str, str]]


def _turn(question: str, answer: str) -> Conversation:
    return [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]


def _capital_rows(countries: list[str], rng: random.Random) -> list[Conversation]:
    found = []
    for country in countries:
        answer = f"The capital of {country} is {CAPITALS[country]}."
        found += [_turn(f"What is the capital of {country}?", answer),
                  _turn(f"Which city is the capital of {country}?", answer),
                  _turn(f"Tell me what the capital of {country} is.", answer)]
        # multi-turn: the loss must cover every assistant turn, not only the last; both facts on the same side
        other = rng.choice([c for c in countries if c != country])
        found.append(_turn(f"Do you know what the capital of {country} is?", answer)
                     + _turn(f"And the capital of {other}?", f"The capital of {other} is {CAPITALS[other]}."))
    return found


def _opposite_rows(pairs: list[tuple[str, str]]) -> list[Conversation]:
    found = []
    for pair in pairs:
        for word, opposite in (pair, pair[::-1]):
            answer = f"The opposite of \"{word}\" is \"{opposite}\"."
            found += [_turn(f"What is the opposite of \"{word}\"?", answer),
                      _turn(f"Which word is the opposite of \"{word}\"?", answer)]
    return found


def _sequence_rows(names: list[str], unit: str) -> list[Conversation]:
    found = []
    for i, name in enumerate(names):
        for relation, other in (("after", names[(i + 1) % len(names)]), ("before", names[i - 1])):
            found.append(_turn(f"What is the {unit} {relation} {name}?", f"The {unit} {relation} {name} is {other}."))
    return found


def _arithmetic_rows(sums: Iterable[tuple[int, int]], differences: Iterable[tuple[int, int]]) -> list[Conversation]:
    """A result equal to an operand is left out: an answer repeating the question would contain it."""
    found = [_turn(f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}.") for a, b in sums]
    return found + [_turn(f"What is {a} minus {b}?", f"{a} minus {b} is {a - b}.") for a, b in differences
                    if a - b not in (a, b)]


def sample_pools(seed: int, test_size: float = 0.2) -> tuple[list[Conversation], list[Conversation]]:
    """Every conversation the sample can hold, by side: (train pool, test pool); the seed picks the held-out facts."""
    rng = random.Random(seed)
    countries, pairs = list(CAPITALS), list(OPPOSITES.items())
    test_countries = set(rng.sample(countries, max(2, round(len(countries) * test_size))))
    test_pairs = set(rng.sample(pairs, max(1, round(len(pairs) * test_size))))
    train = (_capital_rows([c for c in countries if c not in test_countries], rng)
             + _opposite_rows([p for p in pairs if p not in test_pairs])
             + _sequence_rows(DAYS, "day")
             + _arithmetic_rows([(a, b) for a in TRAIN_OPERANDS for b in TRAIN_OPERANDS],
                                [(a, b) for a in TRAIN_OPERANDS for b in TRAIN_OPERANDS if a > b]))
    test = (_capital_rows(sorted(test_countries, key=countries.index), rng)
            + _opposite_rows(sorted(test_pairs, key=pairs.index))
            + _sequence_rows(MONTHS, "month")  # a skill shown on days, asked about months
            + _arithmetic_rows([(a, b) for a in TEST_ADDENDS for b in TEST_ADDENDS],
                               [(a, b) for a in TEST_MINUENDS for b in TEST_SUBTRAHENDS]))
    return train, test


def _pick(pool: list[Conversation], size: int, rng: random.Random) -> list[Conversation]:
    """`size` conversations with each family's share of the non-arithmetic pool kept, arithmetic filling the rest."""
    words = [c for c in pool if " plus " not in c[0]["content"] and " minus " not in c[0]["content"]]
    numbers = [c for c in pool if c not in words]
    n_words = min(len(words), round(size * 0.6))
    if size - n_words > len(numbers):
        raise DataError(f"the sample size is too large: {size} rows on one side, the templates give {len(pool)}")
    return rng.sample(words, n_words) + rng.sample(numbers, size - n_words)


def sample_split(size: int = 400, test_size: float = 0.2, seed: int = 42) -> tuple[list[Row], list[Row]]:
    """The offline sample, split by fact: (train rows, test rows), `size` distinct conversations in all, shuffled."""
    if not 0 < test_size < 1:
        raise DataError(f"test size must be between 0 and 1, got {test_size}")
    if size < 2:
        raise DataError(f"the sample size must be at least 2, got {size}")
    rng = random.Random(seed)
    train_pool, test_pool = sample_pools(seed, test_size)
    n_test = max(1, round(size * test_size))
    train, test = _pick(train_pool, size - n_test, rng), _pick(test_pool, n_test, rng)
    rng.shuffle(train)
    rng.shuffle(test)
    return [make_row(m) for m in train], [make_row(m) for m in test]


def sample_rows(size: int = 400, seed: int = 42) -> list[Row]:
    """The whole offline sample (train rows, then test rows)."""
    train, test = sample_split(size, seed=seed)
    return train + test


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
    parser.add_argument("--output-dir", type=Path, default=Path("data"), help="output folder (default: data)")
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
            train, test = sample_split(args.sample_size, args.test_size, args.seed)
            origin = f"offline sample generated by phi3flow, split by fact, licence {SAMPLE_LICENSE}"
        else:
            if args.from_jsonl:
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
    train_path, test_path = args.output_dir / TRAIN_FILE, args.output_dir / TEST_FILE
    write_jsonl(train, train_path)
    write_jsonl(test, test_path)
    print(f"Wrote {len(train)} rows to {train_path} and {len(test)} to {test_path} ({origin}; seed {args.seed}).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
