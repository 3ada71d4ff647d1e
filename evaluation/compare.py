"""`phi3flow eval`: answer the test set with one or two endpoints, score the answers and say which endpoint is better.

Each endpoint is a Prompt Flow connection (the same ones the chat flow uses). Answers are written line by line
to DIR/<name>.predictions.jsonl as they arrive, so an interrupted or partly failed run is finished with
`--resume` without asking again for the lines already answered. Decoding is greedy (temperature 0); two runs
give the same answers only where the server's decoding is batch-invariant (`x-phi3flow-batch-invariant: true`,
e.g. `phi3flow serve` in float32 on a CPU), so the report records the decoding settings and that guarantee.
Every report has a no-model floor beside the endpoints: the answer of the most similar training question.
This module scores and compares; asking the endpoints is predict.py's job, writing the report report.py's.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from phi3flow.evaluation.judge import JUDGED, Judge, JudgeError
from phi3flow.evaluation.metrics import (
    CORPUS_METRICS,
    METRICS,
    SIGNIFICANCE,
    bleu_statistics,
    corpus_bleu_statistic,
    holm,
    line_metrics,
    nearest_answers,
    paired_comparison,
    summarize,
)
from phi3flow.evaluation.predict import GREEDY, LATENCY, Example, ServerHeaders, System, load_examples, predict, resolve_target
from phi3flow.evaluation.report import FLOOR, plot, render_report
from phi3serve.contract import DEFAULTS, KEY_ENV

DIFFERING_LINES = 5


def score(records: list[dict]) -> dict[int, dict[str, float]]:
    """Metrics of every answered line, by line index; failed lines are left out."""
    return {
        r["index"]: {**line_metrics(r["prediction"], r["reference"], r["question"]), **r.get("judged", {}), LATENCY: r[LATENCY]}
        for r in records
        if r["error"] is None
    }


def floor_answers(examples: list[Example], train: Path | None) -> tuple[str, dict[int, str]]:
    """The no-model floor: each line answered with the answer of the most similar training question (or, with no
    training file, of the most similar other test question). Returns (how it was made, answers by line index)."""
    questions = [ex.question for ex in examples]
    if train is not None:
        pool = [(ex.question, ex.reference) for ex in load_examples(train)]
        method, answers = (
            f"no model: the answer of the most similar question in {train} (SQuAD token F1)",
            nearest_answers(questions, pool),
        )
    else:
        pool = [(ex.question, ex.reference) for ex in examples]
        method = "no model: the answer of the most similar other test question (SQuAD token F1; no training file given)"
        answers = nearest_answers(questions, pool, exclude_same=True)
    return method, {ex.index: answer for ex, answer in zip(examples, answers)}


def _comparable(metric: str, value: float) -> float:
    """The value the paired test compares: the distance from 1 for the length ratio, the value itself otherwise."""
    return abs(value - 1.0) if metric == "length_ratio" else value


def _metric_summaries(
    lines: dict[int, dict[str, float]], answers: dict[int, str], references: dict[int, str], names: list[str]
) -> dict:
    """Per-line metrics as means with CIs, then the corpus metrics over the same lines."""
    summaries = {m: summarize([line[m] for line in lines.values()]) for m in names}
    indices = sorted(lines)
    stats = bleu_statistics([answers[i] for i in indices], [references[i] for i in indices])
    return {**summaries, "corpus_bleu": summarize(stats, statistic=corpus_bleu_statistic)}


def build_results(
    systems: list[System],
    records: dict[str, list[dict]],
    data: Path,
    judged: bool = False,
    *,
    floor: tuple[str, dict[int, str]],
    decoding: dict,
    servers: dict[str, dict],
) -> dict:
    """Everything the report and the plot show, as written to metrics.json."""
    scores = {s.role: score(records[s.role]) for s in systems}
    metric_names = [*METRICS, *(JUDGED if judged else []), LATENCY]
    first = records[systems[0].role]
    references = {r["index"]: r["reference"] for r in first}
    answers = {role: {r["index"]: r["prediction"] for r in records[role]} for role in scores}
    results: dict = {"data": str(data), "lines": len(first), "decoding": decoding, "systems": {}}
    for system in systems:
        lines = scores[system.role]
        failed = [r for r in records[system.role] if r["error"] is not None]
        results["systems"][system.role] = {
            "connection": system.name,
            "endpoint": system.endpoint,
            "succeeded": len(lines),
            "failed": len(failed),
            "server": servers.get(system.role, {}),
            "failures": [{"index": r["index"], "error": r["error"]} for r in failed],
            "metrics": _metric_summaries(lines, answers[system.role], references, metric_names),
        }
    method, floor_by_index = floor
    floor_lines = {r["index"]: line_metrics(floor_by_index[r["index"]], r["reference"], r["question"]) for r in first}
    results[FLOOR] = {"method": method, "metrics": _metric_summaries(floor_lines, floor_by_index, references, list(METRICS))}
    results["lines_detail"] = [
        {
            "index": r["index"],
            "question": r["question"],
            "reference": r["reference"],
            **{
                role: {
                    "answer": answers[role][r["index"]],
                    **{m: scores[role][r["index"]][m] for m in ("exact_match", "contains_fact")},
                }
                for role in scores
                if r["index"] in scores[role]
            },
            FLOOR: {
                "answer": floor_by_index[r["index"]],
                **{m: floor_lines[r["index"]][m] for m in ("exact_match", "contains_fact")},
            },
        }
        for r in first
    ]
    if len(systems) == 2:
        candidate, baseline = scores["candidate"], scores["baseline"]
        both = sorted(candidate.keys() & baseline.keys())
        comparison = {
            m: {
                "compared": "length_ratio distance from 1" if m == "length_ratio" else m,
                **paired_comparison(
                    [_comparable(m, candidate[i][m]) for i in both],
                    [_comparable(m, baseline[i][m]) for i in both],
                    higher_is_better=METRICS.get(m, m in JUDGED),
                ),
            }
            for m in metric_names
        }
        comparison["corpus_bleu"] = {
            "compared": "corpus_bleu",
            **paired_comparison(
                *(
                    bleu_statistics([answers[role][i] for i in both], [references[i] for i in both])
                    for role in ("candidate", "baseline")
                ),
                higher_is_better=CORPUS_METRICS["corpus_bleu"],
                statistic=corpus_bleu_statistic,
            ),
        }
        adjusted = holm({m: v["p_value"] for m, v in comparison.items()})
        for m, verdict in comparison.items():  # significance after Holm's adjustment across every metric compared
            verdict.update(
                p_holm=adjusted[m], significant=bool(adjusted[m] < SIGNIFICANCE and verdict["winner"] not in ("tie", "none"))
            )
        results["comparison"] = comparison
        by_index = {role: {r["index"]: r for r in records[role]} for role in ("candidate", "baseline")}
        largest = sorted(
            both,
            key=lambda i: (
                abs(candidate[i]["contains_fact"] - baseline[i]["contains_fact"]),
                abs(candidate[i]["rouge_l"] - baseline[i]["rouge_l"]),
            ),
            reverse=True,
        )[:DIFFERING_LINES]
        results["largest_differences"] = [
            {
                "index": i,
                "question": by_index["candidate"][i]["question"],
                "reference": by_index["candidate"][i]["reference"],
                "candidate": by_index["candidate"][i]["prediction"],
                "baseline": by_index["baseline"][i]["prediction"],
                "contains_fact_difference": candidate[i]["contains_fact"] - baseline[i]["contains_fact"],
                "rouge_l_difference": candidate[i]["rouge_l"] - baseline[i]["rouge_l"],
            }
            for i in largest
        ]
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="phi3flow eval", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--candidate", required=True, metavar="CONN", help="Prompt Flow connection (or scoring URL) of the endpoint under test"
    )
    parser.add_argument(
        "--baseline", metavar="CONN", help="connection (or scoring URL) of the endpoint to compare with (e.g. the base model)"
    )
    parser.add_argument("--key-env", default=KEY_ENV, help="variable holding the key when CONN is a URL (default %(default)s)")
    parser.add_argument(
        "--via",
        choices=["client", "agent"],
        default="client",
        help="call endpoints directly (as the Prompt Flow tool does) or through the Agent Framework chat client",
    )
    parser.add_argument(
        "--data", type=Path, default=Path("data/test_data.jsonl"), help="JSONL with a 'messages' column (default %(default)s)"
    )
    parser.add_argument(
        "--train",
        type=Path,
        metavar="FILE",
        help="training JSONL for the no-model floor (default: train_data.jsonl beside --data, when there)",
    )
    parser.add_argument(
        "--output-dir",
        type=Path,
        required=True,
        metavar="DIR",
        help="folder for report.md, metrics.json, comparison.png, predictions",
    )
    parser.add_argument("--concurrency", type=int, default=4, help="requests in flight per endpoint (default %(default)s)")
    parser.add_argument(
        "--max-new-tokens", type=int, default=DEFAULTS.max_new_tokens, help="answer length limit (default %(default)s)"
    )
    parser.add_argument("--limit", type=int, help="only the first N lines")
    parser.add_argument(
        "--resume", action="store_true", help="keep the answers already in DIR; ask only for missing or failed lines"
    )
    parser.add_argument(
        "--judge", metavar="CONN", help="Azure OpenAI connection for AI-judged coherence, fluency and relevance (optional)"
    )
    parser.add_argument("--judge-deployment", default="gpt-4o", help="chat deployment of the judge (default %(default)s)")
    args = parser.parse_args(argv)
    if args.concurrency < 1 or args.max_new_tokens < 1 or (args.limit is not None and args.limit < 1):
        parser.error("--concurrency, --max-new-tokens and --limit must be positive")
    if args.baseline == args.candidate:
        parser.error("--baseline must name a different connection than --candidate")
    if args.train is not None and not args.train.is_file():
        parser.error(f"--train {args.train}: no such file")
    from phi3flow.offline import use_offline_defaults

    use_offline_defaults()
    examples = load_examples(args.data, args.limit)
    roles = [("candidate", args.candidate)] + ([("baseline", args.baseline)] if args.baseline else [])
    systems = [resolve_target(spec, role, args.key_env) for role, spec in roles]
    judge = None
    if args.judge:
        try:
            judge = Judge.from_connection(args.judge, args.judge_deployment)
        except JudgeError as exc:
            parser.error(str(exc))
    else:
        print(
            "AI-judged metrics (coherence, fluency, relevance) skipped: no Azure OpenAI connection given (--judge CONN)",
            file=sys.stderr,
        )
    args.output_dir.mkdir(parents=True, exist_ok=True)
    servers = {s.role: ServerHeaders(s) for s in systems}
    try:
        records = {
            s.role: predict(
                s,
                examples,
                args.output_dir,
                concurrency=args.concurrency,
                max_new_tokens=args.max_new_tokens,
                resume=args.resume,
                via=args.via,
                judge=judge,
            )
            for s in systems
        }
    except KeyboardInterrupt:  # the answers received so far are on disk; requests still in flight are dropped
        print(
            f"\nInterrupted: the answers received so far are kept in {args.output_dir}; finish with the same command plus --resume",
            file=sys.stderr,
        )
        return 130
    train = args.train or (args.data.parent / "train_data.jsonl")
    decoding = {**GREEDY, "max_new_tokens": args.max_new_tokens, "concurrency": args.concurrency, "via": args.via}
    results = build_results(
        systems,
        records,
        args.data,
        judged=judge is not None,
        decoding=decoding,
        floor=floor_answers(examples, train if train.is_file() else None),
        servers={role: watch.detach() for role, watch in servers.items()},
    )
    (args.output_dir / "metrics.json").write_text(json.dumps(results, indent=2, ensure_ascii=False), encoding="utf-8")
    plot(results, args.output_dir / "comparison.png")
    (args.output_dir / "report.md").write_text(render_report(results), encoding="utf-8")
    failed = sum(s["failed"] for s in results["systems"].values())
    print(f"Report: {args.output_dir / 'report.md'}" + (f" ({failed} failed lines: re-run them with --resume)" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
