"""Per-row token choice: every row of a batch samples with its own parameters, so requests with different settings
share one batch. Every engine picks through here (the decode loop, and the ONNX engine over the library's logits)."""

from __future__ import annotations

from typing import Any

import torch

from phi3serve.engine import Job


def row_settings(jobs: list[Job], device: Any) -> Any:
    """Each row's sampling settings as one [rows, 4] tensor: temperature, top-p, repetition penalty, greedy."""
    return torch.tensor(
        [[job.params.temperature, job.params.top_p, job.params.repetition_penalty, float(job.params.greedy)] for job in jobs],
        device=device,
    )


def pick(scores: Any, sequences: Any, settings: Any) -> Any:
    """The next token of every row, each with its own settings, so requests with different parameters share a batch.

    Same arithmetic as transformers' RepetitionPenalty, Temperature and TopP processors, applied per row;
    greedy rows take the argmax (after the penalty), sampling rows draw from their nucleus.
    """
    temperature, top_p, penalty, greedy = settings.unbind(1)
    if (penalty != 1.0).any():
        seen = torch.gather(scores, 1, sequences)
        factor = penalty[:, None]
        scores = scores.scatter(1, sequences, torch.where(seen < 0, seen * factor, seen / factor))
    choice = scores.argmax(-1)
    rows = (greedy == 0).nonzero().squeeze(1)
    if rows.numel():
        probs = (scores[rows] / temperature[rows, None]).softmax(-1)
        ordered, order = probs.sort(-1, descending=True)
        outside = ordered.cumsum(-1) - ordered > top_p[rows, None]  # past the smallest set reaching top_p
        probs = torch.zeros_like(probs).scatter(1, order, ordered.masked_fill(outside, 0.0))
        choice[rows] = torch.multinomial(probs, 1).squeeze(1)
    return choice
