"""Per-line node: score one answer against the reference, the first assistant turn of the test line's messages."""

from __future__ import annotations

from promptflow.core import tool

from phi3flow.evaluation.metrics import first_turn
from phi3flow.evaluation.metrics import line_metrics as score


@tool
def line_metrics(answer: str, messages: list) -> dict:
    """Exact match, contains-the-fact, ROUGE-L, sentence BLEU, token F1 and length ratio of this answer (the question
    and reference are taken from the messages here, so the data file stays as it is)."""
    return score(answer, first_turn(messages, "assistant"), first_turn(messages, "user"))
