"""Regularisers for recurrent language models, as in AWD-LSTM (Merity et al. 2017,
"Regularizing and Optimizing LSTM Language Models").

- :class:`LockedDropout` (variational dropout, Gal & Ghahramani 2016): one dropout mask
  per sequence, reused at every time step, on the inputs/outputs of RNN layers.
- :func:`embedding_dropout` / :class:`EmbeddingDropout`: drop whole rows of the embedding
  matrix (every occurrence of a dropped word is zero in that batch).
- :func:`activation_regularization` (AR) and :func:`temporal_activation_regularization`
  (TAR): L2 penalties on the RNN output and on its change between steps.

All scale kept values by ``1 / (1 - p)`` during training (inverted dropout) and are the
identity in eval mode, so nothing changes at test time.
"""
from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import PackedSequence

from ..nn.options import dropout_mask

Tensor = torch.Tensor


def _check_p(p: float, who: str) -> float:
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"{who}: dropout probability must be between 0 and 1, but got {p}")
    return float(p)


class LockedDropout(nn.Module):
    """Dropout with one mask per sequence and feature, shared by all time steps.

    Input ``[T, B, F]`` (``[B, T, F]`` with ``batch_first``) or a ``PackedSequence``; the
    mask has shape ``[1, B, F]`` (``[B, 1, F]``) and is drawn anew at every forward.
    AWD-LSTM applies it to the embedding output (``dropouti``), between LSTM layers
    (``dropouth``) and to the last layer's output (``dropout``).
    """

    def __init__(self, p: float = 0.5, batch_first: bool = False):
        super().__init__()
        self.p = _check_p(p, "LockedDropout")
        self.batch_first = batch_first

    def extra_repr(self) -> str:
        return f"p={self.p}, batch_first={self.batch_first}"

    def forward(self, x: Union[Tensor, PackedSequence]) -> Union[Tensor, PackedSequence]:
        if not self.training or self.p == 0.0:
            return x
        if isinstance(x, PackedSequence):
            # Rows of step t belong to (sorted) sequences 0 .. batch_sizes[t]-1.
            batch_sizes = x.batch_sizes
            mask = dropout_mask(x.data.new_empty(int(batch_sizes[0]), x.data.size(-1)), self.p)
            seq_of_row = torch.cat([torch.arange(int(n)) for n in batch_sizes]).to(x.data.device)
            return x._replace(data=x.data * mask[seq_of_row])
        if x.dim() != 3:
            raise ValueError(f"LockedDropout: expected a 3-D input [T, B, F] or [B, T, F], "
                             f"got shape {list(x.shape)}")
        shape = (x.size(0), 1, x.size(2)) if self.batch_first else (1, x.size(1), x.size(2))
        return x * dropout_mask(x.new_empty(shape), self.p)


def embedding_dropout(embedding: nn.Embedding, tokens: Tensor, p: float,
                      training: bool = True) -> Tensor:
    """Look ``tokens`` up in ``embedding`` with whole rows (words) dropped.

    Each row of the ``[V, E]`` weight is kept with probability ``1 - p`` and scaled by
    ``1 / (1 - p)``; so a dropped word is zero wherever it occurs in the batch. The
    embedding's ``padding_idx``, ``max_norm``, ``norm_type``, ``scale_grad_by_freq`` and
    ``sparse`` settings are honoured. AWD-LSTM uses p = 0.1 (``dropoute``).
    """
    p = _check_p(p, "embedding_dropout")
    weight = embedding.weight
    if training and p > 0.0:
        weight = weight * dropout_mask(weight.new_empty(weight.size(0), 1), p)
    return F.embedding(tokens, weight, embedding.padding_idx, embedding.max_norm,
                       embedding.norm_type, embedding.scale_grad_by_freq, embedding.sparse)


class EmbeddingDropout(nn.Module):
    """An ``nn.Embedding`` whose rows are dropped in training (see :func:`embedding_dropout`).

    The wrapped embedding is ``self.embedding``: tie it to a decoder with
    ``tie_weights(m.embedding, decoder)``.
    """

    def __init__(self, embedding: nn.Embedding, p: float = 0.1):
        super().__init__()
        self.embedding = embedding
        self.p = _check_p(p, "EmbeddingDropout")

    def extra_repr(self) -> str:
        return f"p={self.p}"

    def forward(self, tokens: Tensor) -> Tensor:
        return embedding_dropout(self.embedding, tokens, self.p, self.training)


def activation_regularization(output: Tensor, alpha: float = 2.0,
                              mask: Optional[Tensor] = None) -> Tensor:
    """AR: ``alpha * mean(output ** 2)``.

    AWD-LSTM applies it to the last RNN layer's output *after* its locked dropout
    (alpha = 2), which keeps activations small. ``mask`` (bool, broadcastable to ``output``
    without the feature dim, e.g. ``[T, B]``) restricts the mean to real (non-padding) steps.
    """
    sq = output.pow(2)
    if mask is None:
        return alpha * sq.mean()
    mask = mask.unsqueeze(-1).to(sq.dtype).expand_as(sq)
    return alpha * (sq * mask).sum() / mask.sum().clamp_min(1)


def temporal_activation_regularization(output: Tensor, beta: float = 1.0,
                                       batch_first: bool = False,
                                       mask: Optional[Tensor] = None) -> Tensor:
    """TAR: ``beta * mean((h_t - h_{t-1}) ** 2)`` over consecutive steps.

    AWD-LSTM applies it to the last RNN layer's output *before* dropout (beta = 1), which
    penalises fast-changing hidden states. ``output`` is ``[T, B, F]`` (``[B, T, F]`` with
    ``batch_first``); a single step gives 0. ``mask`` (bool ``[T, B]`` / ``[B, T]``) marks
    real steps: a difference counts only when both of its steps are real.
    """
    tdim = 1 if batch_first else 0
    steps = output.size(tdim)
    if steps < 2:
        return output.new_zeros(())
    diff = output.narrow(tdim, 1, steps - 1) - output.narrow(tdim, 0, steps - 1)
    if mask is None:
        return beta * diff.pow(2).mean()
    both = mask.narrow(tdim, 1, steps - 1) & mask.narrow(tdim, 0, steps - 1)
    both = both.unsqueeze(-1).to(diff.dtype).expand_as(diff)
    return beta * (diff.pow(2) * both).sum() / both.sum().clamp_min(1)
