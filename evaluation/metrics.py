"""Reference-based answer metrics and the statistics to compare systems, shared by the evaluation flow and `phi3flow eval`.

No LLM judge. Correctness comes first: SQuAD-normalised exact match and whether the answer states the reference's
fact. Overlap metrics show format as much as content: ROUGE-L (rouge-score), BLEU from sacrebleu both per line
(`sentence_bleu`, smoothed, not comparable to papers) and over the corpus (`corpus_bleu`, the number papers report),
SQuAD token F1 and the length ratio (rambling or truncated answers).
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Callable, Sequence
from functools import lru_cache

import numpy as np

# metric -> True when higher is better; length_ratio is best at 1.0 and is compared as |ratio - 1|.
METRICS: dict[str, bool] = {
    "exact_match": True,
    "contains_fact": True,
    "rouge_l": True,
    "sentence_bleu": True,
    "token_f1": True,
    "length_ratio": False,
}
CORPUS_METRICS: dict[str, bool] = {"corpus_bleu": True}  # computed over all lines at once, not a mean of lines
SIGNIFICANCE = 0.05
RESAMPLES = 10000  # permutation resamples: the smallest p a comparison can show is 1 / (RESAMPLES + 1)

Statistic = Callable[[np.ndarray], np.ndarray]  # (resamples, lines, ...) -> (resamples,)


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


def sentence_bleu(prediction: str, reference: str) -> float:
    """Sentence BLEU with sacrebleu's default smoothing (exp), 0..100: a per-line score, not the corpus BLEU papers report."""
    from sacrebleu import sentence_bleu as bleu

    return bleu(prediction, [reference]).score


def tokens(text: str) -> list[str]:
    """SQuAD normalisation: lower case, no punctuation, no articles, split on whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in string.punctuation)
    return re.sub(r"\b(a|an|the)\b", " ", text).split()


def exact_match(prediction: str, reference: str) -> float:
    """1.0 when the answer equals the reference after SQuAD normalisation, else 0.0."""
    return float(tokens(prediction) == tokens(reference))


def reference_fact(question: str, reference: str) -> list[str]:
    """What the reference says that the question does not: its normalised tokens, in order, less the question's
    (as a multiset). For a closed-form answer ("The capital of Peru is Lima." to "What is the capital of Peru?")
    that is the fact itself (["lima"]); for a long free-form answer it is most of the answer."""
    left = Counter(tokens(question))
    fact = []
    for token in tokens(reference):
        if left[token]:
            left[token] -= 1
        else:
            fact.append(token)
    return fact


def contains_fact(prediction: str, reference: str, question: str) -> float:
    """1.0 when the answer contains the reference's fact as a contiguous token run (like DPR's has_answer), else 0.0.

    Meaningful for short closed-form answers; when the reference adds nothing to the question, exact match decides."""
    fact, answer = reference_fact(question, reference), tokens(prediction)
    if not fact:
        return exact_match(prediction, reference)
    return float(any(answer[i : i + len(fact)] == fact for i in range(len(answer) - len(fact) + 1)))


def token_f1(prediction: str, reference: str) -> float:
    """Harmonic mean of token precision and recall (bag of words), 0..1; 1 when both are empty."""
    pred, ref = tokens(prediction), tokens(reference)
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


def line_metrics(prediction: str, reference: str, question: str) -> dict[str, float]:
    """Every metric of METRICS for one answer to `question`."""
    return {
        "exact_match": exact_match(prediction, reference),
        "contains_fact": contains_fact(prediction, reference, question),
        "rouge_l": float(rouge_l(prediction, reference)),
        "sentence_bleu": float(sentence_bleu(prediction, reference)),
        "token_f1": token_f1(prediction, reference),
        "length_ratio": length_ratio(prediction, reference),
    }


# --- corpus BLEU from per-line sufficient statistics (what sacrebleu's own paired tests resample) --------------


@lru_cache(maxsize=1)
def _bleu():
    from sacrebleu.metrics import BLEU

    return BLEU()


def bleu_statistics(predictions: Sequence[str], references: Sequence[str]) -> np.ndarray:
    """One row of BLEU counts per line (lengths, n-gram matches and totals); summed rows give corpus BLEU."""
    if not predictions:  # every line failed: no rows, and the statistics say n/a
        return np.zeros((0, 2 + 2 * _bleu().max_ngram_order))
    return np.asarray(_bleu()._extract_corpus_statistics(list(predictions), [list(references)]), dtype=float).reshape(
        len(predictions), -1
    )


def corpus_bleu_statistic(stats: np.ndarray) -> np.ndarray:
    """Corpus BLEU (0..100, sacrebleu's definition) of each resample in (resamples, lines, counts)."""
    sums = stats.sum(axis=1).astype(int)
    return np.array([_bleu()._compute_score_from_stats(row.tolist()).score for row in sums])


def corpus_bleu(predictions: Sequence[str], references: Sequence[str]) -> float:
    """sacrebleu's corpus BLEU, the number papers report."""
    return float(corpus_bleu_statistic(bleu_statistics(predictions, references)[None])[0])


def mean_statistic(values: np.ndarray) -> np.ndarray:
    return values.mean(axis=1)


# --- statistics -------------------------------------------------------------------------------------------------


def _chunked(statistic: Statistic, data: np.ndarray, indices: np.ndarray, chunk: int = 500) -> np.ndarray:
    """statistic over data[indices] for (resamples, lines) indices, a chunk of resamples at a time (bounded memory)."""
    return np.concatenate([statistic(data[indices[i : i + chunk]]) for i in range(0, len(indices), chunk)])


def bootstrap_ci(
    values: Sequence[float] | np.ndarray, resamples: int = 2000, seed: int = 0, statistic: Statistic = mean_statistic
) -> tuple[float, float]:
    """Percentile bootstrap 95% confidence interval of the statistic (seeded, so reports are reproducible)."""
    data = np.asarray(values, dtype=float)
    if data.shape[0] == 0:
        return (float("nan"), float("nan"))
    indices = np.random.default_rng(seed).integers(0, data.shape[0], size=(resamples, data.shape[0]))
    low, high = np.percentile(_chunked(statistic, data, indices), [2.5, 97.5])
    return float(low), float(high)


def summarize(values: Sequence[float] | np.ndarray, statistic: Statistic = mean_statistic) -> dict[str, float]:
    """The statistic (the mean unless told), its bootstrap 95% CI and the line count."""
    data = np.asarray(values, dtype=float)
    low, high = bootstrap_ci(data, statistic=statistic)
    value = float(statistic(data[None])[0]) if data.shape[0] else float("nan")
    return {"mean": value, "ci_low": low, "ci_high": high, "n": int(data.shape[0])}


def paired_comparison(
    candidate: Sequence[float] | np.ndarray,
    baseline: Sequence[float] | np.ndarray,
    higher_is_better: bool = True,
    resamples: int = RESAMPLES,
    seed: int = 0,
    statistic: Statistic = mean_statistic,
) -> dict:
    """Paired difference statistic(candidate) - statistic(baseline) on the same lines: value, bootstrap 95% CI,
    sign-flip permutation p-value, winner.

    The sign-flip test (approximate randomisation) asks how often randomly swapping each line's two answers gives
    a difference at least as large as the observed one; it assumes nothing about the metric's distribution. No
    resample reaching it gives p = 1 / (resamples + 1), the floor: `format_p` prints that as "< 1/(N+1)"."""
    cand, base = np.asarray(candidate, dtype=float), np.asarray(baseline, dtype=float)
    n = cand.shape[0]
    if n == 0:
        return {
            "mean_difference": float("nan"),
            "ci_low": float("nan"),
            "ci_high": float("nan"),
            "p_value": float("nan"),
            "resamples": resamples,
            "n_pairs": 0,
            "winner": "none",
            "significant": False,
        }
    both = np.stack([cand, base])  # (2, lines, ...)
    observed = float(statistic(cand[None])[0] - statistic(base[None])[0])
    if np.array_equal(cand, base):
        p_value = 1.0
    else:
        swaps = np.random.default_rng(seed).integers(0, 2, size=(resamples, n))
        lines = np.arange(n)
        differences = np.concatenate(
            [statistic(both[s, lines]) - statistic(both[1 - s, lines]) for s in np.array_split(swaps, max(1, resamples // 500))]
        )
        p_value = float((np.sum(np.abs(differences) >= abs(observed) - 1e-9) + 1) / (resamples + 1))
    indices = np.random.default_rng(seed).integers(0, n, size=(2000, n))
    paired = np.concatenate([statistic(cand[i]) - statistic(base[i]) for i in np.array_split(indices, 4)])
    low, high = np.percentile(paired, [2.5, 97.5])
    better = observed if higher_is_better else -observed
    winner = "tie" if abs(better) < 1e-12 else ("candidate" if better > 0 else "baseline")
    return {
        "mean_difference": observed,
        "ci_low": float(low),
        "ci_high": float(high),
        "p_value": p_value,
        "resamples": resamples,
        "n_pairs": int(n),
        "winner": winner,
        "significant": bool(p_value < SIGNIFICANCE and winner != "tie"),
    }


def holm(p_values: dict[str, float]) -> dict[str, float]:
    """Holm's step-down adjustment across the metrics compared (family-wise error rate); NaN p-values are left out."""
    ordered = sorted((p, name) for name, p in p_values.items() if not np.isnan(p))
    adjusted, running = {}, 0.0
    for rank, (p, name) in enumerate(ordered):
        running = max(running, min(1.0, (len(ordered) - rank) * p))
        adjusted[name] = running
    return {name: adjusted.get(name, float("nan")) for name in p_values}


def at_floor(p: float, resamples: int) -> bool:
    """Whether no resample reached the observed difference: the true p is below what the resampling can show."""
    return p <= 1 / (resamples + 1) + 1e-15


def format_p(p: float, resamples: int) -> str:
    """The p-value for a report; one at the resampling floor as "< 1/(N+1)" rather than a number it is not."""
    if p is None or np.isnan(p):
        return "n/a"
    return f"< 1/{resamples + 1}" if at_floor(p, resamples) else f"{p:.4f}"


# --- the no-model floor -----------------------------------------------------------------------------------------


def nearest_answers(questions: Sequence[str], pool: Sequence[tuple[str, str]], exclude_same: bool = False) -> list[str]:
    """For each question, the answer whose question in `pool` is most similar (SQuAD token F1; ties: the first).

    No model: it shows how much of each metric a copied answer of the right shape earns. `exclude_same` skips a
    pool entry with the identical question (leave-one-out when the pool is the test set itself)."""
    keyed = [(Counter(tokens(q)), q, a) for q, a in pool]
    found = []
    for question in questions:
        bag, best, answer = Counter(tokens(question)), -1.0, ""
        for other, text, candidate in keyed:
            if exclude_same and text == question:
                continue
            common = sum((bag & other).values())
            score = 2 * common / (sum(bag.values()) + sum(other.values())) if common else 0.0
            if score > best:
                best, answer = score, candidate
        found.append(answer)
    return found
