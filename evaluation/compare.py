"""`phi3flow eval`: answer the test set with one or two endpoints, score the answers and say which endpoint is better.

Each endpoint is a Prompt Flow connection (the same ones the chat flow uses). Answers are written line by line
to DIR/<name>.predictions.jsonl as they arrive, so an interrupted or partly failed run is finished with
`--resume` without asking again for the lines already answered. Decoding is greedy (temperature 0); two runs
give the same answers only where the server's decoding is batch-invariant (`x-phi3flow-batch-invariant: true`,
e.g. `phi3flow serve` in float32 on a CPU), so the report records the decoding settings and that guarantee.
Every report has a no-model floor beside the endpoints: the answer of the most similar training question.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import queue
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import requests
from phi3serve.contract import BATCH_INVARIANT_HEADER, BATCH_SIZE_HEADER, DEFAULTS, KEY_ENV

from phi3flow.client import EndpointError, get_client
from phi3flow.connect import read_connection
from phi3flow.errors import Phi3flowError
from phi3flow.evaluation.judge import JUDGED, Judge, JudgeError
from phi3flow.evaluation.metrics import (CORPUS_METRICS, METRICS, SIGNIFICANCE, at_floor, bleu_statistics, corpus_bleu_statistic,
                                         first_turn, format_p, holm, line_metrics, nearest_answers, paired_comparison, summarize)

LATENCY = "latency_s"  # per-line seconds, lower is better; compared like the quality metrics
FLOOR = "floor"  # the no-model baseline's column
GREEDY = {"temperature": 0.0, "top_p": 1.0}  # the decoding every line is asked with
DIFFERING_LINES = 5


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
                print(f"{path} line {number} is not a whole record (written when a run was killed?): asking its question again",
                      file=sys.stderr)
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


def predict(system: System, examples: list[Example], out: Path, *, concurrency: int, max_new_tokens: int, resume: bool,
            via: str = "client", judge: Judge | None = None) -> list[dict]:
    """Answer every example (only the missing or failed ones with `resume`); return one record per example, in order.

    With `resume`, every stored record is kept, also those of lines outside this run (a smaller --limit).
    With a judge, each answer is also rated; a line the judge cannot rate counts as failed (resume re-runs it)."""
    path = out / f"{system.name}.predictions.jsonl"
    stored = _read_predictions(path) if resume else {}
    if resume:
        _write_predictions(path, stored)  # without torn lines, so that appending starts on a line of its own
    done = {index: record for index, record in stored.items() if record.get("error") is None and (judge is None or "judged" in record)}
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

    with open(path, "a" if resume else "w", encoding="utf-8") as sink, \
            tqdm(total=len(todo), desc=f"{system.role} ({system.name})", unit="line", file=sys.stderr) as bar:
        for record in _answer_all(answer, todo, concurrency):
            stored[record["index"]] = record
            sink.write(json.dumps(record, ensure_ascii=False) + "\n")  # as they come: an interrupted run keeps them
            sink.flush()
            bar.update()
    _write_predictions(path, stored)  # compact: one line per index
    return [stored[ex.index] for ex in examples]


def score(records: list[dict]) -> dict[int, dict[str, float]]:
    """Metrics of every answered line, by line index; failed lines are left out."""
    return {r["index"]: {**line_metrics(r["prediction"], r["reference"], r["question"]), **r.get("judged", {}), LATENCY: r[LATENCY]}
            for r in records if r["error"] is None}


def floor_answers(examples: list[Example], train: Path | None) -> tuple[str, dict[int, str]]:
    """The no-model floor: each line answered with the answer of the most similar training question (or, with no
    training file, of the most similar other test question). Returns (how it was made, answers by line index)."""
    questions = [ex.question for ex in examples]
    if train is not None:
        pool = [(ex.question, ex.reference) for ex in load_examples(train)]
        method, answers = f"no model: the answer of the most similar question in {train} (SQuAD token F1)", nearest_answers(questions, pool)
    else:
        pool = [(ex.question, ex.reference) for ex in examples]
        method = "no model: the answer of the most similar other test question (SQuAD token F1; no training file given)"
        answers = nearest_answers(questions, pool, exclude_same=True)
    return method, {ex.index: answer for ex, answer in zip(examples, answers)}


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
        return {"batch_invariant": all(self.invariant) if self.invariant else None,
                "largest_batch": max(sizes) if sizes else None, "answers_batched": sum(s > 1 for s in sizes) if sizes else None}


def _comparable(metric: str, value: float) -> float:
    """The value the paired test compares: the distance from 1 for the length ratio, the value itself otherwise."""
    return abs(value - 1.0) if metric == "length_ratio" else value


def _metric_summaries(lines: dict[int, dict[str, float]], answers: dict[int, str], references: dict[int, str], names: list[str]) -> dict:
    """Per-line metrics as means with CIs, then the corpus metrics over the same lines."""
    summaries = {m: summarize([line[m] for line in lines.values()]) for m in names}
    indices = sorted(lines)
    stats = bleu_statistics([answers[i] for i in indices], [references[i] for i in indices])
    return {**summaries, "corpus_bleu": summarize(stats, statistic=corpus_bleu_statistic)}


def build_results(systems: list[System], records: dict[str, list[dict]], data: Path, judged: bool = False, *,
                  floor: tuple[str, dict[int, str]], decoding: dict, servers: dict[str, dict]) -> dict:
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
            "connection": system.name, "endpoint": system.endpoint, "succeeded": len(lines), "failed": len(failed),
            "server": servers.get(system.role, {}), "failures": [{"index": r["index"], "error": r["error"]} for r in failed],
            "metrics": _metric_summaries(lines, answers[system.role], references, metric_names),
        }
    method, floor_by_index = floor
    floor_lines = {r["index"]: line_metrics(floor_by_index[r["index"]], r["reference"], r["question"]) for r in first}
    results[FLOOR] = {"method": method, "metrics": _metric_summaries(floor_lines, floor_by_index, references, list(METRICS))}
    results["lines_detail"] = [
        {"index": r["index"], "question": r["question"], "reference": r["reference"],
         **{role: {"answer": answers[role][r["index"]], **{m: scores[role][r["index"]][m] for m in ("exact_match", "contains_fact")}}
            for role in scores if r["index"] in scores[role]},
         FLOOR: {"answer": floor_by_index[r["index"]], **{m: floor_lines[r["index"]][m] for m in ("exact_match", "contains_fact")}}}
        for r in first]
    if len(systems) == 2:
        candidate, baseline = scores["candidate"], scores["baseline"]
        both = sorted(candidate.keys() & baseline.keys())
        comparison = {
            m: {"compared": "length_ratio distance from 1" if m == "length_ratio" else m,
                **paired_comparison([_comparable(m, candidate[i][m]) for i in both], [_comparable(m, baseline[i][m]) for i in both],
                                    higher_is_better=METRICS.get(m, m in JUDGED))}
            for m in metric_names
        }
        comparison["corpus_bleu"] = {"compared": "corpus_bleu", **paired_comparison(
            *(bleu_statistics([answers[role][i] for i in both], [references[i] for i in both]) for role in ("candidate", "baseline")),
            higher_is_better=CORPUS_METRICS["corpus_bleu"], statistic=corpus_bleu_statistic)}
        adjusted = holm({m: v["p_value"] for m, v in comparison.items()})
        for m, verdict in comparison.items():  # significance after Holm's adjustment across every metric compared
            verdict.update(p_holm=adjusted[m], significant=bool(adjusted[m] < SIGNIFICANCE and verdict["winner"] not in ("tie", "none")))
        results["comparison"] = comparison
        by_index = {role: {r["index"]: r for r in records[role]} for role in ("candidate", "baseline")}
        largest = sorted(both, key=lambda i: (abs(candidate[i]["contains_fact"] - baseline[i]["contains_fact"]),
                                              abs(candidate[i]["rouge_l"] - baseline[i]["rouge_l"])), reverse=True)[:DIFFERING_LINES]
        results["largest_differences"] = [
            {"index": i, "question": by_index["candidate"][i]["question"], "reference": by_index["candidate"][i]["reference"],
             "candidate": by_index["candidate"][i]["prediction"], "baseline": by_index["baseline"][i]["prediction"],
             "contains_fact_difference": candidate[i]["contains_fact"] - baseline[i]["contains_fact"],
             "rouge_l_difference": candidate[i]["rouge_l"] - baseline[i]["rouge_l"]}
            for i in largest
        ]
    return results


def plot(results: dict, path: Path) -> None:
    """One panel per metric: each system's mean (and the floor's) with its bootstrap 95% CI; the plotted numbers
    are kept in the PNG's metadata."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = {role: system["metrics"] for role, system in results["systems"].items()} | {FLOOR: results[FLOOR]["metrics"]}
    metric_names = list(results["systems"][next(iter(results["systems"]))]["metrics"])
    figure, axes = plt.subplots(1, len(metric_names), figsize=(3.2 * len(metric_names), 3.6))
    colours = {"candidate": "tab:blue", "baseline": "tab:gray", FLOOR: "tab:orange"}
    plotted: dict[str, dict[str, float]] = {}
    for axis, metric in zip(axes, metric_names):
        shown = {name: stats[metric] for name, stats in columns.items() if metric in stats}
        means = [s["mean"] for s in shown.values()]
        errors = [[max(s["mean"] - s["ci_low"], 0) for s in shown.values()], [max(s["ci_high"] - s["mean"], 0) for s in shown.values()]]
        axis.bar(list(shown), means, yerr=errors, capsize=6, color=[colours[name] for name in shown])
        verdict = results.get("comparison", {}).get(metric)
        suffix = f"\n{verdict['winner']} (Holm p {_holm_p(verdict)})" if verdict else ""
        axis.set_title(f"{metric}{suffix}", fontsize=10)
        plotted[metric] = dict(zip(shown, means))
    figure.suptitle("Mean per line (corpus_bleu: over all lines) with bootstrap 95% CI; floor = no model")
    figure.tight_layout()
    figure.savefig(path, dpi=100, metadata={"Description": json.dumps(plotted)})
    plt.close(figure)


def _number(value: float) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.4f}"


def _holm_p(verdict: dict) -> str:
    """A Holm-adjusted p built from a p at the floor is an upper bound too."""
    if at_floor(verdict["p_value"], verdict["resamples"]) and not math.isnan(verdict["p_holm"]):
        return f"<= {verdict['p_holm']:.4f}"
    return format_p(verdict["p_holm"], verdict["resamples"])


def _server(said: dict) -> str:
    """What the server said about batching, in words."""
    invariant = said.get("batch_invariant")
    if invariant is None:
        words = "the server does not say whether greedy answers are reproducible under batching"
    elif invariant:
        words = "the server guarantees greedy answers do not depend on batch composition"
    else:
        words = ("the server does NOT guarantee greedy answers independent of batch composition (answers may change with "
                 "--concurrency or other traffic; serve with PHI3FLOW_DTYPE=float32 on a CPU for reproducible runs)")
    if said.get("largest_batch") is not None:
        words += f"; largest batch {said['largest_batch']}, {said['answers_batched']} answers decoded beside others"
    return words


def _tick(line: dict, name: str) -> str:
    cell = line.get(name)
    return "failed" if cell is None else f"{'✓' if cell['contains_fact'] else '✗'}{'✓' if cell['exact_match'] else '✗'}"


def render_report(results: dict) -> str:
    """Markdown: settings, means with CIs beside the no-model floor, the paired verdict per metric (raw and Holm p),
    the lines that differ most and every line's correctness."""
    roles = list(results["systems"])
    decoding = results["decoding"]
    out = [f"# Endpoint evaluation: {results['data']} ({results['lines']} lines)", "",
           f"Decoding: {', '.join(f'{k} {v}' for k, v in decoding.items())}.", ""]
    for role, system in results["systems"].items():
        out.append(f"- **{role}**: connection `{system['connection']}`, {system['succeeded']} answered, "
                   f"{system['failed']} failed (excluded from the means); {_server(system['server'])}")
    out.append(f"- **{FLOOR}**: {results[FLOOR]['method']}")
    columns = {role: results["systems"][role]["metrics"] for role in roles} | {FLOOR: results[FLOOR]["metrics"]}
    out += ["", "## Means (bootstrap 95% CI)", "",
            "exact_match and contains_fact are correctness (share of lines); the others measure overlap with the reference, "
            "which a right-shaped wrong answer also earns: compare them with the floor.", "",
            "| metric | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for metric in columns[roles[0]]:
        cells = [stats.get(metric) for stats in columns.values()]
        out.append(f"| {metric} | " + " | ".join("—" if c is None else f"{_number(c['mean'])} [{_number(c['ci_low'])}, {_number(c['ci_high'])}]"
                                                  for c in cells) + " |")
    if "comparison" in results:
        resamples = next(iter(results["comparison"].values()))["resamples"]
        out += ["", "## Paired comparison (candidate - baseline, same lines)", "",
                f"p: sign-flip permutation test with {resamples} resamples (\"< 1/{resamples + 1}\": no resample reached the "
                "observed difference); Holm: adjusted across every metric below; significant: Holm p < 0.05.", "",
                "| compared | mean difference | 95% CI | p | p (Holm) | better | significant |", "|---|---|---|---|---|---|---|"]
        for verdict in results["comparison"].values():
            out.append(f"| {verdict['compared']} | {_number(verdict['mean_difference'])} | [{_number(verdict['ci_low'])}, "
                       f"{_number(verdict['ci_high'])}] | {format_p(verdict['p_value'], verdict['resamples'])} | {_holm_p(verdict)} | "
                       f"{verdict['winner']} | {'yes' if verdict['significant'] else 'no'} |")
        out += ["", "Lower is better for latency_s and for the length ratio's distance from 1; higher for the others.", "",
                "## Lines where the two differ most (correctness, then ROUGE-L)", ""]
        for line in results["largest_differences"]:
            out += [f"### Line {line['index'] + 1} (contains_fact {line['contains_fact_difference']:+.0f}, "
                    f"ROUGE-L {line['rouge_l_difference']:+.3f})", "",
                    f"- question: {line['question']}", f"- reference: {line['reference']}",
                    f"- candidate: {line['candidate']}", f"- baseline: {line['baseline']}", ""]
    out += ["", "## Every line: contains the fact / exact match (✓ or ✗)", "",
            "| line | question | reference | " + " | ".join(columns) + " |", "|---" * (len(columns) + 3) + "|"]
    for line in results["lines_detail"]:
        question, reference = (line[k].replace("|", "\\|").replace("\n", " ") for k in ("question", "reference"))
        out.append(f"| {line['index'] + 1} | {question[:80]} | {reference[:80]} | " + " | ".join(_tick(line, name) for name in columns) + " |")
    failures = [(role, f) for role, system in results["systems"].items() for f in system["failures"]]
    if failures:
        out += ["", "## Failed lines (re-run them with --resume)", ""] + [f"- {role} line {f['index'] + 1}: {f['error']}" for role, f in failures]
    out += ["", "![Means with bootstrap 95% CI](comparison.png)", ""]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="phi3flow eval", description=__doc__.splitlines()[0])
    parser.add_argument("--candidate", required=True, metavar="CONN", help="Prompt Flow connection (or scoring URL) of the endpoint under test")
    parser.add_argument("--baseline", metavar="CONN", help="connection (or scoring URL) of the endpoint to compare with (e.g. the base model)")
    parser.add_argument("--key-env", default=KEY_ENV, help="variable holding the key when CONN is a URL (default %(default)s)")
    parser.add_argument("--via", choices=["client", "agent"], default="client",
                        help="call endpoints directly (as the Prompt Flow tool does) or through the Agent Framework chat client")
    parser.add_argument("--data", type=Path, default=Path("data/test_data.jsonl"), help="JSONL with a 'messages' column (default %(default)s)")
    parser.add_argument("--train", type=Path, metavar="FILE",
                        help="training JSONL for the no-model floor (default: train_data.jsonl beside --data, when there)")
    parser.add_argument("--output-dir", type=Path, required=True, metavar="DIR", help="folder for report.md, metrics.json, comparison.png, predictions")
    parser.add_argument("--concurrency", type=int, default=4, help="requests in flight per endpoint (default %(default)s)")
    parser.add_argument("--max-new-tokens", type=int, default=DEFAULTS.max_new_tokens, help="answer length limit (default %(default)s)")
    parser.add_argument("--limit", type=int, help="only the first N lines")
    parser.add_argument("--resume", action="store_true", help="keep the answers already in DIR; ask only for missing or failed lines")
    parser.add_argument("--judge", metavar="CONN", help="Azure OpenAI connection for AI-judged coherence, fluency and relevance (optional)")
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
        print("AI-judged metrics (coherence, fluency, relevance) skipped: no Azure OpenAI connection given (--judge CONN)", file=sys.stderr)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    servers = {s.role: ServerHeaders(s) for s in systems}
    try:
        records = {s.role: predict(s, examples, args.output_dir, concurrency=args.concurrency, max_new_tokens=args.max_new_tokens,
                                   resume=args.resume, via=args.via, judge=judge) for s in systems}
    except KeyboardInterrupt:  # the answers received so far are on disk; requests still in flight are dropped
        print(f"\nInterrupted: the answers received so far are kept in {args.output_dir}; finish with the same command plus --resume",
              file=sys.stderr)
        return 130
    train = args.train or (args.data.parent / "train_data.jsonl")
    decoding = {**GREEDY, "max_new_tokens": args.max_new_tokens, "concurrency": args.concurrency, "via": args.via}
    results = build_results(systems, records, args.data, judged=judge is not None, decoding=decoding,
                            floor=floor_answers(examples, train if train.is_file() else None),
                            servers={role: watch.detach() for role, watch in servers.items()})
    (args.output_dir / "metrics.json").write_text(json.dumps(results, indent=2, ensure_ascii=False), encoding="utf-8")
    plot(results, args.output_dir / "comparison.png")
    (args.output_dir / "report.md").write_text(render_report(results), encoding="utf-8")
    failed = sum(s["failed"] for s in results["systems"].values())
    print(f"Report: {args.output_dir / 'report.md'}" + (f" ({failed} failed lines: re-run them with --resume)" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
