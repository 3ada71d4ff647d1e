"""Reference-based answer metrics and the statistics to compare two systems, shared by the evaluation flow and `phi3flow eval`.

No LLM judge: ROUGE-L (rouge-score) and BLEU (sacrebleu) come from the libraries papers report with, so the
numbers are comparable; token F1 is the SQuAD definition; the length ratio shows rambling or truncated answers.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Sequence
from functools import lru_cache

import numpy as np

# metric -> True when higher is better; length_ratio is best at 1.0 and is compared as |ratio - 1|.
METRICS: dict[str, bool] = {"rouge_l": True, "bleu": True, "token_f1": True, "length_ratio": False}
SIGNIFICANCE = 0.05


def first_turn(messages: Sequence[dict], role: str) -> str:
    """The content of the first turn with this role: the question (user) or the reference answer (assistant)."""
    for turn in messages:
        if isinstance(turn, dict) and turn.get("role") == role and isinstance(turn.get("content"), str):
            return turn["content"]
    raise ValueError(f"no {role} turn in messages")


@lru_cache(maxsize=1)
def _rouge_scorer():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F-measure (longest common subsequence, stemmed), 0..1."""
    return _rouge_scorer().score(reference, prediction)["rougeL"].fmeasure


def bleu(prediction: str, reference: str) -> float:
    """Sentence BLEU with sacrebleu's default smoothing (exp), on sacrebleu's 0..100 scale."""
    from sacrebleu import sentence_bleu

    return sentence_bleu(prediction, [reference]).score


def _tokens(text: str) -> list[str]:
    """SQuAD normalisation: lower case, no punctuation, no articles, split on whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in string.punctuation)
    return re.sub(r"\b(a|an|the)\b", " ", text).split()


def token_f1(prediction: str, reference: str) -> float:
    """Harmonic mean of token precision and recall (bag of words), 0..1; 1 when both are empty."""
    pred, ref = _tokens(prediction), _tokens(reference)
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def length_ratio(prediction: str, reference: str) -> float:
    """Answer words / reference words: above 1 rambles, below 1 is terse or truncated."""
    return len(prediction.split()) / max(len(reference.split()), 1)


def line_metrics(prediction: str, reference: str) -> dict[str, float]:
    """Every metric of METRICS for one answer."""
    functions = {"rouge_l": rouge_l, "bleu": bleu, "token_f1": token_f1, "length_ratio": length_ratio}
    return {name: float(functions[name](prediction, reference)) for name in METRICS}


def bootstrap_ci(values: Sequence[float], resamples: int = 2000, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap 95% confidence interval of the mean (seeded, so reports are reproducible)."""
    data = np.asarray(values, dtype=float)
    if data.size == 0:
        return (float("nan"), float("nan"))
    means = np.random.default_rng(seed).choice(data, size=(resamples, data.size), replace=True).mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return float(low), float(high)


def summarize(values: Sequence[float]) -> dict[str, float]:
    """Mean, bootstrap 95% CI and count."""
    low, high = bootstrap_ci(values)
    return {"mean": float(np.mean(values)) if len(values) else float("nan"), "ci_low": low, "ci_high": high, "n": len(values)}


def paired_comparison(candidate: Sequence[float], baseline: Sequence[float], higher_is_better: bool = True,
                      resamples: int = 10000, seed: int = 0) -> dict:
    """Paired difference (candidate - baseline) on the same lines: mean, bootstrap 95% CI, sign-flip permutation p-value, winner.

    The sign-flip test asks how often randomly swapping each line's two answers gives a mean difference at
    least as large as the observed one; it assumes nothing about the metric's distribution.
    """
    diff = np.asarray(candidate, dtype=float) - np.asarray(baseline, dtype=float)
    if diff.size == 0:
        return {"mean_difference": float("nan"), "ci_low": float("nan"), "ci_high": float("nan"), "p_value": float("nan"),
                "n_pairs": 0, "winner": "none", "significant": False}
    observed = float(diff.mean())
    signs = np.random.default_rng(seed).choice([-1.0, 1.0], size=(resamples, diff.size))
    extreme = np.abs((signs * diff).mean(axis=1)) >= abs(observed) - 1e-12
    p_value = float((extreme.sum() + 1) / (resamples + 1)) if np.any(diff) else 1.0
    low, high = bootstrap_ci(diff, seed=seed)
    better = observed if higher_is_better else -observed
    winner = "tie" if better == 0 else ("candidate" if better > 0 else "baseline")
    return {"mean_difference": observed, "ci_low": low, "ci_high": high, "p_value": p_value, "n_pairs": int(diff.size),
            "winner": winner, "significant": bool(p_value < SIGNIFICANCE and winner != "tie")}
