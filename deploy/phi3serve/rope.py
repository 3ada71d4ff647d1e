"""LongRoPE per row: each sequence of a batch gets the rotary factors generate() would give it alone.

LongRoPE models (Phi-3.5-mini, Phi-4-mini) rotate with short factors while a sequence fits
`original_max_position_embeddings` and with long factors once it doesn't. transformers picks one set for the
whole forward pass from its largest position, so in a batch one long request switched every row's factors.
`RowRotary` replaces the model's rotary embedding with one that takes a per-row choice from the thread that
drives the forward pass (the decode loop); any other caller (generate(), the library's continuous batching)
gets the model's own rule unchanged. Models with other rotary types are never wrapped.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch


def longrope_original(config: Any) -> int | None:
    """Where a LongRoPE model switches factors (its original_max_position_embeddings); None for other rotary types."""
    rope = getattr(config, "rope_parameters", None) or {}
    if rope.get("rope_type") != "longrope":
        return None
    return int(rope.get("original_max_position_embeddings") or config.original_max_position_embeddings)


class RowRotary(torch.nn.Module):
    """The model's LongRoPE rotary embedding, with short or long factors chosen per row by `rows(long)`."""

    inv_freq: torch.Tensor  # [2, dim / 2]: the short set, then the long one (a buffer)

    def __init__(self, inner: Any):
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        super().__init__()
        self.inner = inner
        original = longrope_original(inner.config)
        if original is None:
            raise ValueError("RowRotary wraps a LongRoPE rotary embedding only")
        self.original = original
        device = inner.original_inv_freq.device
        # The sets transformers switches between: the initial (short) one, and the one for seq_len past the original
        long, _ = ROPE_INIT_FUNCTIONS["longrope"](inner.config, device, seq_len=self.original + 1)
        self.register_buffer("inv_freq", torch.stack([inner.original_inv_freq.clone(), long]), persistent=False)
        self.local = threading.local()

    @contextmanager
    def rows(self, long: Any) -> Iterator[None]:
        """Forward passes run by this thread inside use long factors for the rows where `long` ([rows] bool) is set."""
        self.local.long = long
        try:
            yield
        finally:
            self.local.long = None

    def forward(self, x: Any, position_ids: Any) -> tuple[Any, Any]:
        long = getattr(self.local, "long", None)
        if long is None:
            return self.inner(x, position_ids)
        # Phi3RotaryEmbedding.forward's arithmetic, with one inverse-frequency row per sequence
        freqs = position_ids[..., None].float() * self.inv_freq[long.long()][:, None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        scaling = self.inner.attention_scaling
        return (emb.cos() * scaling).to(dtype=x.dtype), (emb.sin() * scaling).to(dtype=x.dtype)


def row_rotary(model: Any) -> RowRotary | None:
    """The model's rotary embedding made per-row (installed once, shared by every decoder), None unless LongRoPE."""
    base = model.base_model
    rotary = getattr(base, "rotary_emb", None)
    if isinstance(rotary, RowRotary):
        return rotary
    if rotary is None or longrope_original(model.config) is None:
        return None
    base.rotary_emb = RowRotary(rotary)
    return base.rotary_emb
