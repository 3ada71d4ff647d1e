"""`phi3flow data`: schema, reproducible splits, bad rows reported with line numbers, offline behaviour."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
import types
from pathlib import Path

import pytest

from phi3flow import cli
from phi3flow.data import prepare as data
from phi3flow.data import sample, schema
from phi3flow.evaluation.metrics import first_turn, reference_fact


def read_lines(path: Path) -> list[dict]:
    """The rows of a written file, less the flat `ground_truth` every line must carry: the answer to its prompt, the
    reference `phi3flow eval` scores against (checked here, so every test that reads a written file checks it)."""
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    for row in rows:
        assert row.pop("ground_truth") == first_turn(row["messages"], "assistant")
    return rows


def test_ground_truth_of_a_multi_turn_row_answers_its_prompt(tmp_path: Path) -> None:
    turns = [("Capital of France?", "Paris."), ("And of Italy?", "Rome.")]
    rows = [
        schema.make_row([{"role": role, "content": text} for q, a in turns for role, text in (("user", q), ("assistant", a))])
    ]
    schema.write_jsonl(rows, tmp_path / "rows.jsonl")
    line = json.loads((tmp_path / "rows.jsonl").read_text(encoding="utf-8"))
    assert (line["prompt"], line["ground_truth"]) == ("Capital of France?", "Paris.")


def assert_schema(row: dict) -> None:
    assert set(row) == {"prompt", "prompt_id", "messages"}
    assert schema.row_problem(row) is None
    assert row["prompt_id"] == hashlib.sha256(row["prompt"].encode()).hexdigest()
    assert row["prompt"] == next(m["content"] for m in row["messages"] if m["role"] == "user")


def test_sample_is_deterministic_distinct_and_in_schema() -> None:
    rows = sample.sample_rows(200, seed=1)
    assert rows == sample.sample_rows(200, seed=1)
    assert rows != sample.sample_rows(200, seed=2)
    assert len({row["prompt"] for row in rows}) == len(rows)
    for row in rows:
        assert_schema(row)


def test_sample_has_multi_turn_rows() -> None:
    rows = sample.sample_rows()
    assert any(sum(m["role"] == "assistant" for m in row["messages"]) > 1 for row in rows)


@pytest.mark.parametrize("size", [0, 100_000])
def test_sample_size_out_of_range(size: int) -> None:
    with pytest.raises(schema.DataError, match="sample size"):
        sample.sample_rows(size)


def numbers(text: str) -> set[str]:
    return set(re.findall(r"\d+", text))


@pytest.mark.parametrize("seed", [42, 7])
def test_sample_test_split_holds_out_facts(seed: int) -> None:
    """Split by fact: no test answer, fact (capital, antonym, month, number) or country occurs anywhere in train."""
    train, test = sample.sample_split(seed=seed)
    train_text = " ".join(m["content"] for row in train for m in row["messages"])
    train_answers = {m["content"] for row in train for m in row["messages"] if m["role"] == "assistant"}
    train_numbers = numbers(train_text)
    for row in test:
        question, answer = first_turn(row["messages"], "user"), first_turn(row["messages"], "assistant")
        fact = " ".join(reference_fact(question, answer))
        assert answer not in train_answers
        assert re.search(rf"\b{re.escape(fact)}\b", train_text.lower()) is None, (fact, question)
        assert not numbers(question + answer) & train_numbers, question
        assert not any(country in question for country in sample.CAPITALS if country in train_text)
    families = {"capital": 0, "opposite": 0, "month": 0, "plus": 0, "minus": 0}
    for row in test:
        families[next(f for f in families if f in row["prompt"])] += 1
    assert all(families.values()), families  # every family is asked about in the test split


def test_every_sample_answer_is_checkable() -> None:
    """The only words an answer adds to its question are the fact it states (what `contains_fact` looks for)."""
    facts = {*sample.CAPITALS.values(), *sample.OPPOSITES, *sample.OPPOSITES.values(), *sample.DAYS, *sample.MONTHS}
    for row in sample.sample_rows():
        fact = reference_fact(first_turn(row["messages"], "user"), first_turn(row["messages"], "assistant"))
        assert fact, row["prompt"]
        assert " ".join(fact) in {f.lower() for f in facts} or (len(fact) == 1 and fact[0].isdigit()), (row["prompt"], fact)


def test_cli_sample_writes_reproducible_split(tmp_path: Path) -> None:
    first, second = tmp_path / "a", tmp_path / "b"
    assert cli.main(["data", "--sample", "--output-dir", str(first)]) == 0
    assert data.main(["--sample", "--output-dir", str(second)]) == 0
    train, test = read_lines(first / schema.TRAIN_FILE), read_lines(first / schema.TEST_FILE)
    assert (len(train), len(test)) == (320, 80)
    assert (train, test) == sample.sample_split(400, 0.2, 42)
    assert not {r["prompt_id"] for r in train} & {r["prompt_id"] for r in test}
    for name in (schema.TRAIN_FILE, schema.TEST_FILE):
        assert (first / name).read_bytes() == (second / name).read_bytes()
    for row in train + test:
        assert_schema(row)


def test_split_sizes_and_seed() -> None:
    rows = [{"i": i} for i in range(10)]
    train, test = schema.split_rows(rows, 0.2, seed=3)
    assert (len(train), len(test)) == (8, 2)
    assert sorted(r["i"] for r in train + test) == list(range(10))
    assert (train, test) == schema.split_rows(rows, 0.2, seed=3)
    assert (train, test) != schema.split_rows(rows, 0.2, seed=4)


@pytest.mark.parametrize("size", [0.0, 1.0, 0.99])
def test_split_rejects_unusable_test_size(size: float) -> None:
    with pytest.raises(schema.DataError):
        schema.split_rows([{"i": i} for i in range(5)], size, seed=0)


GOOD = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]}


def write_file(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_bad_rows_reported_with_line_numbers(tmp_path: Path) -> None:
    lines = [
        json.dumps(GOOD),
        "{not json",
        json.dumps({"messages": []}),
        "",  # blank lines are not rows
        json.dumps({"messages": [{"role": "user", "content": "Only a question"}]}),
        json.dumps({"messages": [{"role": "bot", "content": "x"}, {"role": "assistant", "content": "y"}]}),
        json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": " "}]}),
        json.dumps([1, 2]),
        json.dumps({"messages": [{"role": "assistant", "content": "no user"}]}),
    ]
    with pytest.raises(schema.DataError) as info:
        schema.read_jsonl(write_file(tmp_path / "bad.jsonl", lines))
    message = str(info.value)
    assert "7 bad row(s)" in message
    for number in (2, 3, 5, 6, 7, 8, 9):
        assert f"line {number}:" in message
    assert "line 1:" not in message and "line 4:" not in message
    assert "end with an assistant turn" in message and "invalid JSON" in message


def test_cli_reports_bad_rows_and_writes_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = write_file(tmp_path / "mine.jsonl", [json.dumps(GOOD), json.dumps({"prompt": "x"})])
    assert data.main(["--from-jsonl", str(source), "--output-dir", str(tmp_path / "out")]) == 1
    assert "line 2: 'messages' must be a non-empty list" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_from_jsonl_fills_schema_and_keeps_every_row(tmp_path: Path) -> None:
    rows = [
        {"messages": [{"role": "user", "content": f"Question {i}?"}, {"role": "assistant", "content": "Yes."}]} for i in range(10)
    ]
    source = write_file(tmp_path / "mine.jsonl", [json.dumps(r) for r in rows])
    assert data.main(["--from-jsonl", str(source), "--output-dir", str(tmp_path), "--test-size", "0.3"]) == 0
    train, test = read_lines(tmp_path / schema.TRAIN_FILE), read_lines(tmp_path / schema.TEST_FILE)
    assert (len(train), len(test)) == (7, 3)
    for row in train + test:
        assert_schema(row)


def test_a_file_not_in_utf8_is_one_clear_line_and_a_bom_is_fine(tmp_path: Path) -> None:
    source = tmp_path / "latin1.jsonl"
    latin1 = json.dumps(GOOD).replace("Hi", "Caf\u00e9").encode("latin-1")
    source.write_bytes(json.dumps(GOOD).encode() + b"\n" + latin1)
    done = subprocess.run(
        [sys.executable, "-m", "phi3flow.cli", "data", "--from-jsonl", str(source), "--output-dir", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines() == [
        f"phi3flow data: {source}: line 2 is not UTF-8 text (byte 0xe9 at column "
        f"{latin1.index(0xE9) + 1}); save the file as UTF-8"
    ]
    with_bom = write_file(tmp_path / "bom.jsonl", [json.dumps(GOOD)])
    with_bom.write_bytes(b"\xef\xbb\xbf" + with_bom.read_bytes())
    assert len(schema.read_jsonl(with_bom)) == 1


def test_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(schema.DataError, match="no such file"):
        schema.read_jsonl(tmp_path / "absent.jsonl")


def test_offline_hub_says_so_in_one_line(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(data, "hub_reachable", lambda timeout=3.0: False)
    assert data.main(["--output-dir", str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "phi3flow data --sample" in err and "--from-jsonl" in err


def test_hub_offline_env_skips_the_network(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert data.hub_reachable() is False


def test_ultrachat_rows_are_split_and_written(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The hub path with `datasets` stubbed: the requested dataset/config/split and the row schema."""
    calls = []
    rows = [schema.make_row([{"role": "user", "content": f"Q{i}"}, {"role": "assistant", "content": "A"}]) for i in range(20)]

    def load_dataset(name: str, config: str, split: str) -> list[dict]:
        calls.append((name, config, split))
        return rows

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    monkeypatch.setattr(data, "hub_reachable", lambda timeout=3.0: True)
    assert data.main(["--output-dir", str(tmp_path)]) == 0
    assert calls == [("HuggingFaceH4/ultrachat_200k", "default", "train_sft[:1%]")]
    train, test = read_lines(tmp_path / schema.TRAIN_FILE), read_lines(tmp_path / schema.TEST_FILE)
    assert (len(train), len(test)) == (16, 4)
    assert sorted(train + test, key=lambda r: r["prompt"]) == sorted(rows, key=lambda r: r["prompt"])
