"""Attention decoder step: stacked fastrnn LSTM/GRU cells, Luong attention and input feeding.

One step (Luong et al. 2015, with input feeding):

    x_t   = [embed(y_{t-1}); a_{t-1}]          (a_{t-1} only with input_feeding)
    h_t   = cells(x_t, h_{t-1})                 (stacked, dropout between layers)
    c_t, w_t = attention(h_t^top, memory, mask)
    a_t   = tanh(W_c [c_t; h_t^top])            (the attentional hidden state)
    logits_t = W_out a_t

Every kind of attention (including Bahdanau's additive score) is queried with the current
top hidden state, in Luong's order.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from ._modules import make_cell
from .attention import Attention


class DecoderState(NamedTuple):
    """Everything a step needs, each tensor with the batch row on dim 0 (so beam search's
    default reorder applies)."""
    hidden: tuple                   # per layer: (h, c) for LSTM, h for GRU; [B, H] each
    feed: torch.Tensor | None       # a_{t-1} [B, H] for input feeding, else None
    memory: torch.Tensor            # [B, S, M] encoder outputs
    mask: torch.Tensor              # [B, S] True at real source positions
    keys: torch.Tensor              # attention.project_keys(memory), computed once


class AttentionDecoder(nn.Module):
    def __init__(self, vocab_size: int, embed_size: int, hidden_size: int, memory_size: int,
                 num_layers: int = 1, *, cell: str = "lstm", attention: str = "general",
                 attention_hidden: int | None = None, input_feeding: bool = True,
                 dropout: float = 0.0, padding_idx: int | None = None, backend: str = "auto"):
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        self.cell = cell
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.input_feeding = input_feeding
        self.embedding = nn.Embedding(vocab_size, embed_size, padding_idx=padding_idx)
        first_input = embed_size + (hidden_size if input_feeding else 0)
        self.cells = nn.ModuleList(
            make_cell(cell, first_input if layer == 0 else hidden_size, hidden_size, backend=backend)
            for layer in range(num_layers))
        self.attention = Attention(hidden_size, memory_size, attention, attention_hidden)
        self.combine = nn.Linear(memory_size + hidden_size, hidden_size, bias=False)
        self.out = nn.Linear(hidden_size, vocab_size)
        self.dropout = nn.Dropout(dropout)

    def init_state(self, memory: torch.Tensor, mask: torch.Tensor, hidden: tuple) -> DecoderState:
        """``hidden``: per layer initial states (e.g. from a Bridge)."""
        feed = memory.new_zeros(memory.size(0), self.hidden_size) if self.input_feeding else None
        return DecoderState(tuple(hidden), feed, memory, mask, self.attention.project_keys(memory))

    def step(self, tokens: torch.Tensor, state: DecoderState):
        """tokens [B] -> (logits [B, V], new state, attention weights [B, S])."""
        x = self.dropout(self.embedding(tokens))
        if self.input_feeding:
            x = torch.cat([x, state.feed], dim=1)
        hidden = []
        for layer, cell in enumerate(self.cells):
            s = cell(x, state.hidden[layer])
            hidden.append(s)
            x = s[0] if isinstance(s, tuple) else s
            if layer + 1 < self.num_layers:
                x = self.dropout(x)
        context, weights = self.attention(x, state.memory, state.mask, projected_keys=state.keys)
        attentional = torch.tanh(self.combine(torch.cat([context, x], dim=1)))
        logits = self.out(self.dropout(attentional))
        feed = attentional if self.input_feeding else None
        return logits, state._replace(hidden=tuple(hidden), feed=feed), weights
