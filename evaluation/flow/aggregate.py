"""Aggregation node: mean of each metric over the lines that were scored, and corpus BLEU over their answers,
logged so `pf run show-metrics` shows them."""

from __future__ import annotations

from promptflow.core import log_metric, tool

from phi3flow.evaluation.metrics import METRICS, corpus_bleu, first_turn


@tool
def aggregate(metrics: list, answers: list, messages: list) -> dict:
    """Means per metric, corpus BLEU (sacrebleu) and `lines`, the number of lines scored (lines whose chat run failed
    are not among them)."""
    results = {name: sum(line[name] for line in metrics) / len(metrics) if metrics else 0.0 for name in METRICS}
    results["corpus_bleu"] = corpus_bleu(answers, [first_turn(m, "assistant") for m in messages]) if answers else 0.0
    results["lines"] = len(metrics)
    for name, value in results.items():
        log_metric(name, value)
    return results
