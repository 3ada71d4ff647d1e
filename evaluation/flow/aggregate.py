"""Aggregation node: mean of each metric over the lines that were scored, logged so `pf run show-metrics` shows them."""

from __future__ import annotations

from promptflow.core import log_metric, tool

from phi3flow.evaluation.metrics import METRICS


@tool
def aggregate(metrics: list) -> dict:
    """Means per metric plus `lines`, the number of lines scored (lines whose chat run failed are not among them)."""
    results = {name: sum(line[name] for line in metrics) / len(metrics) if metrics else 0.0 for name in METRICS}
    results["lines"] = len(metrics)
    for name, value in results.items():
        log_metric(name, value)
    return results
