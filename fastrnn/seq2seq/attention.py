"""Attention over an encoder memory: Luong (dot, general, concat) and Bahdanau (additive).

Shapes: ``query`` [B, Q] (one decoder step) or [B, T, Q] (T steps at once), ``keys``
[B, S, K] (the encoder memory, also used as the values), ``mask`` [B, S] bool with True
at real source positions and False at padding. Returns ``context`` [B, K] (or [B, T, K])
and ``weights`` [B, S] (or [B, T, S]), the softmax over source positions; padding gets
weight exactly 0.

Scores (q a query, k a key):

- ``dot``      q . k                              (Luong; needs Q == K)
- ``general``  q . (W k)                          (Luong; W [Q, K], no bias)
- ``concat``   v . tanh(W [q; k])                 (Luong; W [A, Q+K], no bias)
- ``additive`` v . tanh(W_q q + W_k k + b)        (Bahdanau; b is W_k's bias)

``concat`` and ``additive`` differ only by the bias: both split W into a query part and a
key part, so the key part is applied once per source sentence, not once per step.
``project_keys(keys)`` returns that key-side work; pass it back as ``projected_keys`` to
reuse it across decoder steps (the decoders here do).
"""
from __future__ import annotations

import torch
from torch import nn

KINDS = ("dot", "general", "concat", "additive")


class Attention(nn.Module):
    def __init__(self, query_size: int, key_size: int, kind: str = "general",
                 hidden_size: int | None = None):
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"Attention kind must be one of {KINDS}, got {kind!r}")
        if kind == "dot" and query_size != key_size:
            raise ValueError(f"dot attention needs query_size == key_size, got "
                             f"query_size={query_size} and key_size={key_size}; "
                             f"use kind='general' to learn a projection")
        self.kind = kind
        self.query_size = query_size
        self.key_size = key_size
        self.hidden_size = hidden_size or query_size
        if kind == "general":
            self.key_proj = nn.Linear(key_size, query_size, bias=False)
        elif kind in ("concat", "additive"):
            # W [q; k] = W_q q + W_k k: keep the two halves as two Linears.
            self.query_proj = nn.Linear(query_size, self.hidden_size, bias=False)
            self.key_proj = nn.Linear(key_size, self.hidden_size, bias=(kind == "additive"))
            self.v = nn.Linear(self.hidden_size, 1, bias=False)

    def extra_repr(self) -> str:
        s = f"query_size={self.query_size}, key_size={self.key_size}, kind={self.kind!r}"
        if self.kind in ("concat", "additive"):
            s += f", hidden_size={self.hidden_size}"
        return s

    def project_keys(self, keys: torch.Tensor) -> torch.Tensor:
        """The per-source part of the scores: keys [B, S, K] -> [B, S, Q or A]."""
        return keys if self.kind == "dot" else self.key_proj(keys)

    def score(self, query: torch.Tensor, projected_keys: torch.Tensor) -> torch.Tensor:
        """Unnormalised scores: query [B, T, Q], projected_keys [B, S, *] -> [B, T, S]."""
        if self.kind in ("dot", "general"):
            return torch.bmm(query, projected_keys.transpose(1, 2))
        # [B, T, 1, A] + [B, 1, S, A] -> tanh -> v -> [B, T, S]
        hidden = torch.tanh(self.query_proj(query).unsqueeze(2) + projected_keys.unsqueeze(1))
        return self.v(hidden).squeeze(-1)

    def forward(self, query: torch.Tensor, keys: torch.Tensor, mask: torch.Tensor | None = None,
                projected_keys: torch.Tensor | None = None):
        if keys.dim() != 3:
            raise ValueError(f"keys must be [batch, source_len, key_size], got shape {tuple(keys.shape)}")
        one_step = query.dim() == 2
        if one_step:
            query = query.unsqueeze(1)
        if query.dim() != 3 or query.size(-1) != self.query_size:
            raise ValueError(f"query must be [batch, {self.query_size}] or [batch, steps, "
                             f"{self.query_size}], got shape {tuple(query.shape)}")
        if projected_keys is None:
            projected_keys = self.project_keys(keys)
        scores = self.score(query, projected_keys)
        if mask is not None:
            if mask.shape != keys.shape[:2]:
                raise ValueError(f"mask must be [batch, source_len] = {tuple(keys.shape[:2])}, "
                                 f"got {tuple(mask.shape)}")
            mask = mask.unsqueeze(1)
            # The dtype's lowest finite value, not -inf: a row with no valid position then
            # softmaxes to finite (uniform) weights that the mask below zeroes, instead of NaN.
            scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
        weights = torch.softmax(scores, dim=-1)
        if mask is not None:
            weights = weights * mask
        context = torch.bmm(weights, keys)
        if one_step:
            return context.squeeze(1), weights.squeeze(1)
        return context, weights


def lengths_to_mask(lengths: torch.Tensor, max_len: int | None = None) -> torch.Tensor:
    """[B] lengths -> [B, max_len] bool mask, True at positions < length."""
    max_len = int(lengths.max()) if max_len is None else max_len
    positions = torch.arange(max_len, device=lengths.device)
    return positions.unsqueeze(0) < lengths.to(positions.device).unsqueeze(1)
