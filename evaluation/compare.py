"""`phi3flow eval`: answer the test set with one or two endpoints, score the answers and say which endpoint is better.

Each endpoint is a Prompt Flow connection (the same ones the chat flow uses). Answers are written line by line
to DIR/<name>.predictions.jsonl as they arrive, so an interrupted or partly failed run is finished with
`--resume` without asking again for the lines already answered. Decoding is greedy (temperature 0) so two
runs of the same model give the same answers and differences come from the models.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from phi3flow.client import EndpointError, get_client
from phi3flow.connect import read_connection
from phi3flow.evaluation.judge import JUDGED, Judge, JudgeError
from phi3flow.evaluation.metrics import METRICS, first_turn, line_metrics, paired_comparison, summarize

LATENCY = "latency_s"  # per-line seconds, lower is better; compared like the quality metrics
DIFFERING_LINES = 5


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
                raise SystemExit(f"phi3flow eval: {path} line {index + 1}: {exc}; each line needs a user and an assistant turn") from None
    if not examples:
        raise SystemExit(f"phi3flow eval: no lines in {path}")
    return examples


def resolve_target(spec: str, role: str, key_env: str) -> System:
    """A Prompt Flow connection name, or a scoring URL whose key is in $key_env (where promptflow is not installed)."""
    if spec.startswith(("http://", "https://")):
        key = os.environ.get(key_env)
        if not key:
            raise SystemExit(f"phi3flow eval: {spec} needs its key in ${key_env} (or name another variable with --key-env)")
        return System(role, role, spec, key)
    try:
        return System(role, spec, *read_connection(spec))
    except ValueError as exc:
        raise SystemExit(f"phi3flow eval: {exc}") from None


def asker(system: System, via: str, max_new_tokens: int) -> Callable[[str], str]:
    """question -> answer, greedy, through the endpoint client directly or through the Agent Framework chat client."""
    if via == "agent":
        from phi3flow.agents import EndpointChatClient

        agent_client = EndpointChatClient(system.endpoint, system.key)
        return lambda question: agent_client.answer(question, temperature=0.0, top_p=1.0, max_tokens=max_new_tokens)
    client = get_client(system.endpoint, system.key)
    return lambda question: client.chat([{"role": "user", "content": question}], temperature=0.0, top_p=1.0, max_new_tokens=max_new_tokens)


def _read_predictions(path: Path) -> dict[int, dict]:
    """Last record per line index (a re-run line appends a newer record)."""
    records: dict[int, dict] = {}
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                record = json.loads(line)
                records[record["index"]] = record
    return records


def predict(system: System, examples: list[Example], out: Path, *, concurrency: int, max_new_tokens: int, resume: bool,
            via: str = "client", judge: Judge | None = None) -> list[dict]:
    """Answer every example (only the missing or failed ones with `resume`); return one record per example, in order.

    With a judge, each answer is also rated; a line the judge cannot rate counts as failed (resume re-runs it)."""
    path = out / f"{system.name}.predictions.jsonl"
    done = {index: record for index, record in _read_predictions(path).items()
            if record.get("error") is None and (judge is None or "judged" in record)} if resume else {}
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
        return {"index": example.index, "question": example.question, "reference": example.reference,
                "prediction": prediction, "error": error, LATENCY: latency, **judged}

    from tqdm import tqdm

    with open(path, "a" if resume else "w", encoding="utf-8") as sink, ThreadPoolExecutor(max_workers=concurrency) as pool, \
            tqdm(total=len(todo), desc=f"{system.role} ({system.name})", unit="line", file=sys.stderr) as bar:
        for future in as_completed([pool.submit(answer, ex) for ex in todo]):
            record = future.result()
            done[record["index"]] = record
            sink.write(json.dumps(record, ensure_ascii=False) + "\n")  # as they come: an interrupted run keeps them
            sink.flush()
            bar.update()
    records = [done[ex.index] for ex in examples]
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")  # compact: one line each
    return records


def score(records: list[dict]) -> dict[int, dict[str, float]]:
    """Metrics of every answered line, by line index; failed lines are left out."""
    return {r["index"]: {**line_metrics(r["prediction"], r["reference"]), **r.get("judged", {}), LATENCY: r[LATENCY]}
            for r in records if r["error"] is None}


def _comparable(metric: str, value: float) -> float:
    """The value the paired test compares: the distance from 1 for the length ratio, the value itself otherwise."""
    return abs(value - 1.0) if metric == "length_ratio" else value


def build_results(systems: list[System], records: dict[str, list[dict]], data: Path, judged: bool = False) -> dict:
    """Everything the report and the plot show, as written to metrics.json."""
    scores = {s.role: score(records[s.role]) for s in systems}
    metric_names = [*METRICS, *(JUDGED if judged else []), LATENCY]
    results: dict = {"data": str(data), "lines": len(records[systems[0].role]), "systems": {}}
    for system in systems:
        lines = scores[system.role]
        failed = [r for r in records[system.role] if r["error"] is not None]
        results["systems"][system.role] = {
            "connection": system.name, "endpoint": system.endpoint, "succeeded": len(lines), "failed": len(failed),
            "failures": [{"index": r["index"], "error": r["error"]} for r in failed],
            "metrics": {m: summarize([line[m] for line in lines.values()]) for m in metric_names},
        }
    if len(systems) == 2:
        candidate, baseline = scores["candidate"], scores["baseline"]
        both = sorted(candidate.keys() & baseline.keys())
        results["comparison"] = {
            m: {"compared": "length_ratio distance from 1" if m == "length_ratio" else m,
                **paired_comparison([_comparable(m, candidate[i][m]) for i in both], [_comparable(m, baseline[i][m]) for i in both],
                                    higher_is_better=METRICS.get(m, m in JUDGED))}
            for m in metric_names
        }
        by_index = {role: {r["index"]: r for r in records[role]} for role in ("candidate", "baseline")}
        largest = sorted(both, key=lambda i: abs(candidate[i]["rouge_l"] - baseline[i]["rouge_l"]), reverse=True)[:DIFFERING_LINES]
        results["largest_differences"] = [
            {"index": i, "question": by_index["candidate"][i]["question"], "reference": by_index["candidate"][i]["reference"],
             "candidate": by_index["candidate"][i]["prediction"], "baseline": by_index["baseline"][i]["prediction"],
             "rouge_l_difference": candidate[i]["rouge_l"] - baseline[i]["rouge_l"]}
            for i in largest
        ]
    return results


def plot(results: dict, path: Path) -> None:
    """One panel per metric: each system's mean with its bootstrap 95% CI; the plotted numbers are kept in the PNG's metadata."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    roles = list(results["systems"])
    metric_names = list(results["systems"][roles[0]]["metrics"])
    figure, axes = plt.subplots(1, len(metric_names), figsize=(3.2 * len(metric_names), 3.6))
    plotted: dict[str, dict[str, float]] = {}
    for axis, metric in zip(axes, metric_names):
        stats = [results["systems"][role]["metrics"][metric] for role in roles]
        means = [s["mean"] for s in stats]
        errors = [[max(s["mean"] - s["ci_low"], 0) for s in stats], [max(s["ci_high"] - s["mean"], 0) for s in stats]]
        axis.bar(roles, means, yerr=errors, capsize=6, color=["tab:blue", "tab:gray"][: len(roles)])
        verdict = results.get("comparison", {}).get(metric)
        suffix = f"\n{verdict['winner']} (p={verdict['p_value']:.3f})" if verdict else ""
        axis.set_title(f"{metric}{suffix}", fontsize=10)
        plotted[metric] = dict(zip(roles, means))
    figure.suptitle("Mean per line with bootstrap 95% CI")
    figure.tight_layout()
    figure.savefig(path, dpi=100, metadata={"Description": json.dumps(plotted)})
    plt.close(figure)


def _number(value: float) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.4f}"


def render_report(results: dict) -> str:
    """Markdown: per-system means with CIs and failures, the paired verdict per metric, the lines that differ most."""
    roles = list(results["systems"])
    out = [f"# Endpoint evaluation: {results['data']} ({results['lines']} lines)", ""]
    for role, system in results["systems"].items():
        out.append(f"- **{role}**: connection `{system['connection']}`, {system['succeeded']} answered, "
                   f"{system['failed']} failed (excluded from the means)")
    out += ["", "## Means (bootstrap 95% CI)", "", "| metric | " + " | ".join(roles) + " |", "|---" * (len(roles) + 1) + "|"]
    for metric in results["systems"][roles[0]]["metrics"]:
        cells = [results["systems"][r]["metrics"][metric] for r in roles]
        out.append(f"| {metric} | " + " | ".join(f"{_number(c['mean'])} [{_number(c['ci_low'])}, {_number(c['ci_high'])}]" for c in cells) + " |")
    if "comparison" in results:
        out += ["", "## Paired comparison (candidate - baseline, same lines)", "",
                "| compared | mean difference | 95% CI | p (sign-flip) | better | significant |", "|---|---|---|---|---|---|"]
        for verdict in results["comparison"].values():
            out.append(f"| {verdict['compared']} | {_number(verdict['mean_difference'])} | [{_number(verdict['ci_low'])}, "
                       f"{_number(verdict['ci_high'])}] | {_number(verdict['p_value'])} | {verdict['winner']} | "
                       f"{'yes' if verdict['significant'] else 'no'} |")
        out += ["", "Lower is better for latency_s and for the length ratio's distance from 1; higher for the others.", "",
                "## Lines where the two differ most (ROUGE-L)", ""]
        for line in results["largest_differences"]:
            out += [f"### Line {line['index'] + 1} (ROUGE-L difference {line['rouge_l_difference']:+.3f})", "",
                    f"- question: {line['question']}", f"- reference: {line['reference']}",
                    f"- candidate: {line['candidate']}", f"- baseline: {line['baseline']}", ""]
    failures = [(role, f) for role, system in results["systems"].items() for f in system["failures"]]
    if failures:
        out += ["", "## Failed lines (re-run them with --resume)", ""] + [f"- {role} line {f['index'] + 1}: {f['error']}" for role, f in failures]
    out += ["", "![Means with bootstrap 95% CI](comparison.png)", ""]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="phi3flow eval", description=__doc__.splitlines()[0])
    parser.add_argument("--candidate", required=True, metavar="CONN", help="Prompt Flow connection (or scoring URL) of the endpoint under test")
    parser.add_argument("--baseline", metavar="CONN", help="connection (or scoring URL) of the endpoint to compare with (e.g. the base model)")
    parser.add_argument("--key-env", default="PHI3FLOW_ENDPOINT_KEY", help="variable holding the key when CONN is a URL (default %(default)s)")
    parser.add_argument("--via", choices=["client", "agent"], default="client",
                        help="call endpoints directly (as the Prompt Flow tool does) or through the Agent Framework chat client")
    parser.add_argument("--data", type=Path, default=Path("data/test_data.jsonl"), help="JSONL with a 'messages' column (default %(default)s)")
    parser.add_argument("--out", type=Path, required=True, metavar="DIR", help="folder for report.md, metrics.json, comparison.png, predictions")
    parser.add_argument("--concurrency", type=int, default=4, help="requests in flight per endpoint (default %(default)s)")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="answer length limit (default %(default)s)")
    parser.add_argument("--limit", type=int, help="only the first N lines")
    parser.add_argument("--resume", action="store_true", help="keep the answers already in DIR; ask only for missing or failed lines")
    parser.add_argument("--judge", metavar="CONN", help="Azure OpenAI connection for AI-judged coherence, fluency and relevance (optional)")
    parser.add_argument("--judge-deployment", default="gpt-4o", help="chat deployment of the judge (default %(default)s)")
    args = parser.parse_args(argv)
    if args.concurrency < 1 or args.max_new_tokens < 1 or (args.limit is not None and args.limit < 1):
        parser.error("--concurrency, --max-new-tokens and --limit must be positive")
    if args.baseline == args.candidate:
        parser.error("--baseline must name a different connection than --candidate")
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
        print("AI-judged metrics (coherence, fluency, relevance) skipped: no Azure OpenAI connection given (--judge CONN)", file=sys.stderr)
    args.out.mkdir(parents=True, exist_ok=True)
    records = {s.role: predict(s, examples, args.out, concurrency=args.concurrency, max_new_tokens=args.max_new_tokens,
                               resume=args.resume, via=args.via, judge=judge) for s in systems}
    results = build_results(systems, records, args.data, judged=judge is not None)
    (args.out / "metrics.json").write_text(json.dumps(results, indent=2, ensure_ascii=False), encoding="utf-8")
    plot(results, args.out / "comparison.png")
    (args.out / "report.md").write_text(render_report(results), encoding="utf-8")
    failed = sum(s["failed"] for s in results["systems"].values())
    print(f"Report: {args.out / 'report.md'}" + (f" ({failed} failed lines: re-run them with --resume)" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
