"""The comparison report: metrics.json's results as Markdown (report.md) and a plot (comparison.png)."""

from __future__ import annotations

import json
import math
from pathlib import Path

from phi3flow.evaluation.metrics import at_floor, format_p

FLOOR = "floor"  # the no-model baseline's column


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
        errors = [
            [max(s["mean"] - s["ci_low"], 0) for s in shown.values()],
            [max(s["ci_high"] - s["mean"], 0) for s in shown.values()],
        ]
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
        words = (
            "the server does NOT guarantee greedy answers independent of batch composition (answers may change with "
            "--concurrency or other traffic; serve with PHI3FLOW_DTYPE=float32 on a CPU for reproducible runs)"
        )
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
    out = [
        f"# Endpoint evaluation: {results['data']} ({results['lines']} lines)",
        "",
        f"Decoding: {', '.join(f'{k} {v}' for k, v in decoding.items())}.",
        "",
    ]
    for role, system in results["systems"].items():
        out.append(
            f"- **{role}**: connection `{system['connection']}`, {system['succeeded']} answered, "
            f"{system['failed']} failed (excluded from the means); {_server(system['server'])}"
        )
    out.append(f"- **{FLOOR}**: {results[FLOOR]['method']}")
    columns = {role: results["systems"][role]["metrics"] for role in roles} | {FLOOR: results[FLOOR]["metrics"]}
    out += [
        "",
        "## Means (bootstrap 95% CI)",
        "",
        "exact_match and contains_fact are correctness (share of lines); the others measure overlap with the reference, "
        "which a right-shaped wrong answer also earns: compare them with the floor.",
        "",
        "| metric | " + " | ".join(columns) + " |",
        "|---" * (len(columns) + 1) + "|",
    ]
    for metric in columns[roles[0]]:
        cells = [stats.get(metric) for stats in columns.values()]
        out.append(
            f"| {metric} | "
            + " | ".join(
                "—" if c is None else f"{_number(c['mean'])} [{_number(c['ci_low'])}, {_number(c['ci_high'])}]" for c in cells
            )
            + " |"
        )
    if "comparison" in results:
        resamples = next(iter(results["comparison"].values()))["resamples"]
        out += [
            "",
            "## Paired comparison (candidate - baseline, same lines)",
            "",
            f'p: sign-flip permutation test with {resamples} resamples ("< 1/{resamples + 1}": no resample reached the '
            "observed difference); Holm: adjusted across every metric below; significant: Holm p < 0.05.",
            "",
            "| compared | mean difference | 95% CI | p | p (Holm) | better | significant |",
            "|---|---|---|---|---|---|---|",
        ]
        for verdict in results["comparison"].values():
            out.append(
                f"| {verdict['compared']} | {_number(verdict['mean_difference'])} | [{_number(verdict['ci_low'])}, "
                f"{_number(verdict['ci_high'])}] | {format_p(verdict['p_value'], verdict['resamples'])} | {_holm_p(verdict)} | "
                f"{verdict['winner']} | {'yes' if verdict['significant'] else 'no'} |"
            )
        out += [
            "",
            "Lower is better for latency_s and for the length ratio's distance from 1; higher for the others.",
            "",
            "## Lines where the two differ most (correctness, then ROUGE-L)",
            "",
        ]
        for line in results["largest_differences"]:
            out += [
                f"### Line {line['index'] + 1} (contains_fact {line['contains_fact_difference']:+.0f}, "
                f"ROUGE-L {line['rouge_l_difference']:+.3f})",
                "",
                f"- question: {line['question']}",
                f"- reference: {line['reference']}",
                f"- candidate: {line['candidate']}",
                f"- baseline: {line['baseline']}",
                "",
            ]
    out += [
        "",
        "## Every line: contains the fact / exact match (✓ or ✗)",
        "",
        "| line | question | reference | " + " | ".join(columns) + " |",
        "|---" * (len(columns) + 3) + "|",
    ]
    for line in results["lines_detail"]:
        question, reference = (line[k].replace("|", "\\|").replace("\n", " ") for k in ("question", "reference"))
        out.append(
            f"| {line['index'] + 1} | {question[:80]} | {reference[:80]} | "
            + " | ".join(_tick(line, name) for name in columns)
            + " |"
        )
    failures = [(role, f) for role, system in results["systems"].items() for f in system["failures"]]
    if failures:
        out += ["", "## Failed lines (re-run them with --resume)", ""] + [
            f"- {role} line {f['index'] + 1}: {f['error']}" for role, f in failures
        ]
    out += ["", "![Means with bootstrap 95% CI](comparison.png)", ""]
    return "\n".join(out)
