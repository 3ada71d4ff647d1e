"""Evaluation: the metrics on known pairs, `phi3flow eval` against two local endpoints, and the evaluation flow under pf."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
from rouge_score import rouge_scorer
from sacrebleu import corpus_bleu, sentence_bleu

from conftest import REPO, Reply, ScriptedEndpoint
from phi3flow.connect import create_connection
from phi3flow.data.sample import sample_rows, sample_split
from phi3flow.evaluation import compare, metrics
from phi3flow.evaluation.metrics import METRICS, first_turn, line_metrics, paired_comparison, summarize
from phi3flow.offline import stop_pf_service
from phi3serve.contract import BATCH_INVARIANT_HEADER

QUESTION, REFERENCE = "What is the capital of Norway?", "The capital of Norway is Oslo."
ROWS = sample_rows(size=16)  # the offline sample, in the test data's schema (prompt, prompt_id, messages)
ANSWERS = {first_turn(r["messages"], "user"): first_turn(r["messages"], "assistant") for r in ROWS}


def answer_book(answer: Callable[[str], str], fail: set[str] = frozenset(), headers: dict | None = None) -> ScriptedEndpoint:
    """A local endpoint that answers by question (deterministic under concurrency) and fails on the questions
    in its `fail` set (a test empties it to let the endpoint recover)."""
    failing = set(fail)

    def respond(body: dict) -> Reply:
        question = body["input_data"]["input_string"][-1]["content"]
        if question in failing:
            return Reply(400, {"message": "scripted failure"})  # 400: not retried, so the failing line stays fast
        return Reply(body={"output": answer(question)}, headers=dict(headers or {}))

    book = ScriptedEndpoint(responder=respond)
    book.fail = failing
    return book


@pytest.fixture
def books():
    """Candidate answers like the references; baseline always hedges and first fails on one question."""
    candidate = answer_book(ANSWERS.get, headers={BATCH_INVARIANT_HEADER: "true"})
    baseline = answer_book(lambda question: "I do not know.", fail={ROWS[2]["prompt"]}, headers={BATCH_INVARIANT_HEADER: "false"})
    create_connection(candidate.url, "candidate-key", "eval_candidate")
    create_connection(baseline.url, "baseline-key", "eval_baseline")
    yield candidate, baseline
    candidate.close()
    baseline.close()
    stop_pf_service()


# --- metrics on known pairs ---------------------------------------------------------------------------------


def test_identical_answer_scores_perfectly():
    assert line_metrics(REFERENCE, REFERENCE, QUESTION) == pytest.approx(
        {"exact_match": 1.0, "contains_fact": 1.0, "rouge_l": 1.0, "sentence_bleu": 100.0, "token_f1": 1.0, "length_ratio": 1.0}
    )


def test_disjoint_answer_scores_zero():
    scores = line_metrics("Bananas grow on plants", REFERENCE, QUESTION)  # no shared token, not even the full stop
    assert scores == pytest.approx(
        {"exact_match": 0.0, "contains_fact": 0.0, "rouge_l": 0.0, "sentence_bleu": 0.0, "token_f1": 0.0, "length_ratio": 4 / 6}
    )


def test_partial_overlap_matches_the_libraries():
    answer = "Oslo is the capital."
    scores = line_metrics(answer, REFERENCE, QUESTION)
    assert scores["rouge_l"] == pytest.approx(
        rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True).score(REFERENCE, answer)["rougeL"].fmeasure
    )
    assert scores["sentence_bleu"] == pytest.approx(sentence_bleu(answer, [REFERENCE]).score)
    assert 0 < scores["rouge_l"] < 1 and 0 < scores["sentence_bleu"] < 100
    # SQuAD tokens: answer {oslo, is, capital}, reference {capital, of, norway, is, oslo}: P=3/3, R=3/5
    assert scores["token_f1"] == pytest.approx(2 * 1 * 0.6 / 1.6)
    assert scores["length_ratio"] == pytest.approx(4 / 6)
    assert (scores["exact_match"], scores["contains_fact"]) == (0.0, 1.0)  # not the reference's words, but its fact


@pytest.mark.parametrize(
    ("answer", "right"),
    [
        ("The capital of Norway is Oslo!", True),
        ("oslo", True),
        ("Norway's capital city is Oslo, on a fjord.", True),
        ("The capital of Norway is Bergen.", False),
        ("The capital of Norway is unknown.", False),
        ("Osloville.", False),
    ],
)
def test_contains_fact_checks_the_fact_not_the_template(answer: str, right: bool):
    """A right-shaped wrong answer scores high overlap but no fact; a verbose right one the opposite."""
    assert metrics.reference_fact(QUESTION, REFERENCE) == ["oslo"]
    assert line_metrics(answer, REFERENCE, QUESTION)["contains_fact"] == float(right)


def test_contains_fact_with_a_multi_word_fact_and_repeated_words():
    question = "What is the capital of Mexico?"
    assert metrics.reference_fact(question, "The capital of Mexico is Mexico City.") == ["mexico", "city"]
    assert metrics.contains_fact("It is Mexico City.", "The capital of Mexico is Mexico City.", question) == 1.0
    assert metrics.contains_fact("It is City of Mexico.", "The capital of Mexico is Mexico City.", question) == 0.0
    assert metrics.reference_fact("What is 12 minus 6?", "12 minus 6 is 6.") == ["6"]
    assert metrics.contains_fact("Yes.", "Yes.", "Yes.") == 1.0  # nothing added to the question: exact match decides


def test_corpus_bleu_is_sacrebleus():
    predictions = ["The cat sat on the mat.", "12 plus 30 is 42.", "Oslo is the capital."]
    references = ["The cat sat on a mat.", "12 plus 30 is 42.", REFERENCE]
    assert metrics.corpus_bleu(predictions, references) == pytest.approx(corpus_bleu(predictions, [references]).score)
    stats = metrics.bleu_statistics(predictions, references)
    summary = summarize(stats, statistic=metrics.corpus_bleu_statistic)
    assert summary["mean"] == pytest.approx(corpus_bleu(predictions, [references]).score) and summary["n"] == 3
    assert summary["ci_low"] <= summary["mean"] <= summary["ci_high"]
    # a paired corpus-level comparison: the references themselves against these predictions
    verdict = paired_comparison(
        metrics.bleu_statistics(references * 10, references * 10),
        metrics.bleu_statistics(predictions * 10, references * 10),
        statistic=metrics.corpus_bleu_statistic,
    )
    assert verdict["mean_difference"] == pytest.approx(100 - corpus_bleu(predictions, [references]).score)
    assert verdict["winner"] == "candidate" and verdict["significant"]


def test_prompt_column_is_the_first_user_turn():
    """Why the chat flow's batch run can map input_data to ${data.prompt}: pf column mapping has no list indexing."""
    assert all(r["prompt"] == first_turn(r["messages"], "user") for r in sample_rows())


def test_paired_comparison_verdicts():
    clear = paired_comparison([0.9] * 10, [0.1 + 0.01 * i for i in range(10)])
    assert clear["winner"] == "candidate" and clear["significant"] and clear["p_value"] < 0.01
    assert clear["ci_low"] <= clear["mean_difference"] <= clear["ci_high"]
    same = paired_comparison([0.5, 0.7], [0.5, 0.7])
    assert same["winner"] == "tie" and same["p_value"] == 1.0 and not same["significant"]
    assert paired_comparison([2.0] * 8, [1.0] * 8, higher_is_better=False)["winner"] == "baseline"
    stats = summarize([1.0, 2.0, 3.0])
    assert stats["mean"] == 2.0 and stats["ci_low"] <= 2.0 <= stats["ci_high"] and stats["n"] == 3


def test_p_value_floor_is_printed_as_a_bound():
    """With 40 lines all better, no sign flip reaches the observed difference: p is the floor 1/(N+1), shown as such."""
    verdict = paired_comparison([1.0] * 40, [0.0] * 40, resamples=999)
    assert verdict["p_value"] == pytest.approx(1 / 1000) and metrics.at_floor(verdict["p_value"], 999)
    assert metrics.format_p(verdict["p_value"], 999) == "< 1/1000"
    assert metrics.format_p(0.0312, 999) == "0.0312" and metrics.format_p(float("nan"), 999) == "n/a"


def test_holm_adjustment():
    """Holm's step-down: sorted p times (m - rank), kept monotone, capped at 1; NaN (no pairs) left out."""
    adjusted = metrics.holm({"a": 0.01, "b": 0.04, "c": 0.03, "d": 0.5, "e": float("nan")})
    assert adjusted["a"] == pytest.approx(0.04) and adjusted["c"] == pytest.approx(0.09)
    assert adjusted["b"] == pytest.approx(0.09) and adjusted["d"] == pytest.approx(0.5)  # 2 x 0.04 < 0.09: monotone
    assert adjusted["e"] != adjusted["e"]
    assert metrics.holm({"a": 0.6, "b": 0.7}) == {"a": 1.0, "b": 1.0}


def test_floor_answers_with_the_nearest_training_question():
    train, test = sample_split(size=100, seed=3)
    pool = [(first_turn(r["messages"], "user"), first_turn(r["messages"], "assistant")) for r in train]
    questions = [first_turn(r["messages"], "user") for r in test]
    answers = metrics.nearest_answers(questions, pool)
    assert all(answer in {a for _, a in pool} for answer in answers)
    for question, answer in zip(questions, answers):  # same family: a sum gets a training sum, a capital a capital
        family = next(word for word in ("plus", "minus", "capital", "opposite", "after", "before") if word in question)
        assert family in answer, (question, answer)
    assert metrics.nearest_answers(
        ["What is 2 plus 3?"], [("What is 2 plus 3?", "x"), ("What is 2 plus 4?", "y")], exclude_same=True
    ) == ["y"]


# --- phi3flow eval end to end ---------------------------------------------------------------------------------


def test_eval_compares_two_endpoints_and_resumes_failed_lines(books, tmp_path: Path, capsys):
    candidate, baseline = books
    data = tmp_path / "test.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    out = tmp_path / "report"
    argv = [
        "--candidate",
        "eval_candidate",
        "--baseline",
        "eval_baseline",
        "--data",
        str(data),
        "--output-dir",
        str(out),
        "--concurrency",
        "3",
        "--max-new-tokens",
        "16",
    ]

    assert compare.main(argv) == 1  # one baseline line failed: said in the exit status and the report
    results = json.loads((out / "metrics.json").read_text())
    base = results["systems"]["baseline"]
    assert (base["succeeded"], base["failed"], base["failures"][0]["index"]) == (15, 1, 2)
    failed_record = [json.loads(x) for x in (out / "eval_baseline.predictions.jsonl").read_text().splitlines()][2]
    assert failed_record["prediction"] is None and "HTTP 400" in failed_record["error"]
    # means come from the answered lines only, and agree with the metrics recomputed here
    expected = [
        line_metrics("I do not know.", first_turn(r["messages"], "assistant"), r["prompt"])["rouge_l"]
        for i, r in enumerate(ROWS)
        if i != 2
    ]
    assert base["metrics"]["rouge_l"]["mean"] == pytest.approx(sum(expected) / 15)
    assert results["systems"]["candidate"]["metrics"]["rouge_l"]["mean"] == pytest.approx(1.0)
    assert results["comparison"]["rouge_l"]["n_pairs"] == 15 and results["comparison"]["rouge_l"]["winner"] == "candidate"
    report = (out / "report.md").read_text()
    assert "1 failed" in report and "baseline line 3: " in report
    assert results["systems"]["candidate"]["server"] == {"batch_invariant": True, "largest_batch": None, "answers_batched": None}
    assert "server guarantees greedy answers" in report and "does NOT guarantee" in report

    baseline.fail.clear()
    asked = (len(candidate.questions), len(baseline.questions))
    assert compare.main([*argv, "--resume"]) == 0
    assert (len(candidate.questions), len(baseline.questions)) == (asked[0], asked[1] + 1)  # only the failed line again
    assert baseline.questions[-1] == ROWS[2]["prompt"]

    results = json.loads((out / "metrics.json").read_text())
    assert results["systems"]["baseline"]["failed"] == 0 and results["comparison"]["rouge_l"]["n_pairs"] == 16
    verdict = results["comparison"]["rouge_l"]
    assert verdict["winner"] == "candidate" and verdict["significant"]
    assert results["largest_differences"][0]["candidate"] == results["largest_differences"][0]["reference"]
    # correctness, corpus BLEU, Holm p across every metric compared, decoding settings and the servers' guarantees
    candidate_stats = results["systems"]["candidate"]["metrics"]
    assert candidate_stats["exact_match"]["mean"] == 1.0 and candidate_stats["contains_fact"]["mean"] == 1.0
    assert results["systems"]["baseline"]["metrics"]["contains_fact"]["mean"] == 0.0
    assert candidate_stats["corpus_bleu"]["mean"] == pytest.approx(100.0)
    comparison = results["comparison"]
    assert set(comparison) == {*METRICS, "corpus_bleu", compare.LATENCY}
    assert comparison["contains_fact"]["p_holm"] == pytest.approx(
        min(1.0, comparison["contains_fact"]["p_value"] * len(comparison))
    )
    assert results["decoding"] == {"temperature": 0.0, "top_p": 1.0, "max_new_tokens": 16, "concurrency": 3, "via": "client"}
    # what the servers said on the answers of this run (read off the responses; the candidate was asked nothing)
    assert results["systems"]["candidate"]["server"] == {"batch_invariant": None, "largest_batch": None, "answers_batched": None}
    assert results["systems"]["baseline"]["server"]["batch_invariant"] is False
    # the no-model floor: no training file beside the data, so the most similar other test line's answer
    floor = results["floor"]
    assert "other test question" in floor["method"] and set(floor["metrics"]) == {*METRICS, "corpus_bleu"}
    detail = {line["index"]: line for line in results["lines_detail"]}
    assert (
        len(detail) == 16
        and detail[0]["candidate"]["contains_fact"] == 1.0
        and detail[0]["floor"]["answer"] != ROWS[0]["messages"][1]["content"]
    )

    # report, metrics and plot agree
    report = (out / "report.md").read_text()
    from PIL import Image

    plotted = json.loads(Image.open(out / "comparison.png").info["Description"])
    for metric in [*METRICS, compare.LATENCY]:
        for role in ("candidate", "baseline"):
            stats = results["systems"][role]["metrics"][metric]
            assert f"{stats['mean']:.4f} [{stats['ci_low']:.4f}, {stats['ci_high']:.4f}]" in report
            assert plotted[metric][role] == pytest.approx(stats["mean"])
    for role, name in [*[(r, r) for r in ("candidate", "baseline")], ("floor", "floor")]:
        stats = results[role]["metrics"] if role == "floor" else results["systems"][role]["metrics"]
        assert plotted["contains_fact"][name] == pytest.approx(stats["contains_fact"]["mean"])
    assert f"| rouge_l | {verdict['mean_difference']:.4f} |" in report and "| candidate | yes |" in report
    assert "| < 1/10001 | <= " in report  # a p at the resampling floor, and its Holm adjustment, shown as bounds
    assert "Decoding: temperature 0.0, top_p 1.0, max_new_tokens 16, concurrency 3, via client." in report
    assert "does not say" in report and "does NOT guarantee" in report
    assert "| 1 | " + ROWS[0]["prompt"] in report and "✓✓" in report
    assert "Failed lines" not in report
    assert "Report:" in capsys.readouterr().out


def test_eval_with_an_azure_openai_judge_adds_judged_metrics(tmp_path: Path, monkeypatch, capsys):
    """--judge rates each answer through a (local, scripted) Azure OpenAI chat deployment; without it, one note."""
    from promptflow.client import PFClient
    from promptflow.entities import AzureOpenAIConnection

    ratings = {"Coherence": "4", "Fluency": "5", "Relevance": "3"}

    def grade(body: dict) -> Reply:
        rubric = body["messages"][1]["content"].split(":")[0]
        return Reply(
            body={
                "id": "x",
                "object": "chat.completion",
                "created": 0,
                "model": body["model"],
                "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": ratings[rubric]}}],
            }
        )

    chat, judge = answer_book(ANSWERS.get), ScriptedEndpoint(responder=grade)
    PFClient().connections.create_or_update(
        AzureOpenAIConnection(
            name="eval_judge",
            api_key="judge-key",
            api_base=f"http://127.0.0.1:{judge.server.server_address[1]}",
            api_version="2024-06-01",
        )
    )
    data = tmp_path / "test.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS[:3]))
    monkeypatch.setenv("PHI3FLOW_ENDPOINT_KEY", "chat-key")
    try:
        assert compare.main(["--candidate", chat.url, "--data", str(data), "--output-dir", str(tmp_path / "plain")]) == 0
        assert "AI-judged metrics (coherence, fluency, relevance) skipped" in capsys.readouterr().err
        assert (
            compare.main(
                ["--candidate", chat.url, "--data", str(data), "--output-dir", str(tmp_path / "judged"), "--judge", "eval_judge"]
            )
            == 0
        )
    finally:
        chat.close()
        judge.close()
    assert len(judge.requests) == 3 * 3 and all(r["headers"]["api-key"] == "judge-key" for r in judge.requests)
    metrics = json.loads((tmp_path / "judged" / "metrics.json").read_text())["systems"]["candidate"]["metrics"]
    assert (metrics["coherence"]["mean"], metrics["fluency"]["mean"], metrics["relevance"]["mean"]) == (4.0, 5.0, 3.0)
    assert "coherence" not in json.loads((tmp_path / "plain" / "metrics.json").read_text())["systems"]["candidate"]["metrics"]
    assert "| relevance |" in (tmp_path / "judged" / "report.md").read_text()


def test_eval_with_every_line_failed_still_reports(tmp_path: Path, monkeypatch):
    """No answered line: the means say n/a (corpus BLEU included), the floor is still scored, the exit status is 1."""
    book = answer_book(ANSWERS.get, fail={r["prompt"] for r in ROWS[:3]})
    data = tmp_path / "test.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS[:3]))
    monkeypatch.setenv("PHI3FLOW_ENDPOINT_KEY", "chat-key")
    try:
        assert compare.main(["--candidate", book.url, "--data", str(data), "--output-dir", str(tmp_path / "out")]) == 1
    finally:
        book.close()
    results = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert results["systems"]["candidate"]["failed"] == 3 and results["systems"]["candidate"]["metrics"]["corpus_bleu"]["n"] == 0
    assert results["floor"]["metrics"]["rouge_l"]["n"] == 3
    report = (tmp_path / "out" / "report.md").read_text()
    assert "| corpus_bleu | n/a [n/a, n/a] |" in report and "| 1 | " + ROWS[0]["prompt"] in report and "failed" in report


def test_eval_rejects_a_missing_connection(tmp_path: Path):
    data = tmp_path / "test.jsonl"
    data.write_text(json.dumps(ROWS[0]) + "\n")
    from phi3flow.errors import Phi3flowError

    with pytest.raises(Phi3flowError, match="cannot read connection 'nope'"):
        compare.main(["--candidate", "nope", "--output-dir", str(tmp_path), "--data", str(data)])


def test_evaluation_flow_nodes_on_their_sample_data():
    """The flow's node functions, called directly on its data.jsonl: fast, no pf run needed."""
    import importlib.util

    def node(name: str):
        spec = importlib.util.spec_from_file_location(name, REPO / "evaluation/flow" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return getattr(module, name)

    rows = [json.loads(line) for line in (REPO / "evaluation/flow/data.jsonl").read_text().splitlines()]
    lines = [node("line_metrics")(row["answer"], row["messages"]) for row in rows]
    assert lines[0] == line_metrics(
        rows[0]["answer"], first_turn(rows[0]["messages"], "assistant"), first_turn(rows[0]["messages"], "user")
    )
    assert [line["contains_fact"] for line in lines] == [1.0, 1.0, 0.0]  # the last answer has the template, not the fact
    means = node("aggregate")(lines, [row["answer"] for row in rows], [row["messages"] for row in rows])
    assert means["lines"] == len(rows) >= 3
    assert means["rouge_l"] == pytest.approx(sum(line["rouge_l"] for line in lines) / len(rows))
    assert means["corpus_bleu"] == pytest.approx(
        metrics.corpus_bleu([row["answer"] for row in rows], [first_turn(row["messages"], "assistant") for row in rows])
    )


# --- the evaluation flow under pf, against a chat flow batch run -----------------------------------------------


@pytest.mark.e2e
def test_evaluation_flow_scores_a_chat_batch_run(tmp_path: Path):
    from promptflow.client import PFClient

    book = answer_book(ANSWERS.get, fail={ROWS[1]["prompt"]})
    try:
        create_connection(book.url, "chat-key")  # the chat flow's own connection, phi3_endpoint
        data = tmp_path / "test.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in ROWS[:3]))
        pf = PFClient()
        chat = pf.run(flow=REPO / "flows/chat", data=data, column_mapping={"input_data": "${data.prompt}"})
        outputs = pf.get_details(chat)
        assert len(outputs) == 3 and sorted(set(book.questions)) == sorted(r["prompt"] for r in ROWS[:3])
        evaluation = pf.run(
            flow=REPO / "evaluation/flow",
            data=data,
            run=chat,
            column_mapping={"answer": "${run.outputs.answer}", "messages": "${data.messages}"},
        )
        logged = pf.get_metrics(evaluation)
        # the failed chat line has no answer to score: two lines, both answered exactly like the reference
        assert logged["lines"] == 2
        assert logged == pytest.approx(
            {
                "exact_match": 1.0,
                "contains_fact": 1.0,
                "rouge_l": 1.0,
                "sentence_bleu": 100.0,
                "token_f1": 1.0,
                "length_ratio": 1.0,
                "corpus_bleu": 100.0,
                "lines": 2,
            }
        )
    finally:
        book.close()
        stop_pf_service()
