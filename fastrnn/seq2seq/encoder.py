"""Encoder (embedding + fastrnn.LSTM/GRU over packed input) and the bridge from its final
states to the decoder's initial states."""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from ._modules import make_rnn
from .attention import lengths_to_mask


class EncoderOutput(NamedTuple):
    memory: torch.Tensor        # [B, S, directions * H]: top layer output at every position
    mask: torch.Tensor          # [B, S] bool: True at real (not padding) positions
    h: torch.Tensor             # [layers, directions, B, H]: final hidden state per layer/direction
    c: torch.Tensor | None      # same for the LSTM cell state; None for GRU


class Encoder(nn.Module):
    """Embeds source tokens [B, S] and runs a (bi)directional multi-layer fastrnn LSTM/GRU.

    With ``lengths`` the batch is packed, so padding costs no work and the final states are
    each sentence's state after its own last token (in both directions).
    """

    def __init__(self, vocab_size: int, embed_size: int, hidden_size: int, num_layers: int = 1, *,
                 bidirectional: bool = False, cell: str = "lstm", dropout: float = 0.0,
                 padding_idx: int | None = None, backend: str = "auto"):
        super().__init__()
        self.cell = cell
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.num_directions = 2 if bidirectional else 1
        self.embedding = nn.Embedding(vocab_size, embed_size, padding_idx=padding_idx)
        self.dropout = nn.Dropout(dropout)
        self.rnn = make_rnn(cell, embed_size, hidden_size, num_layers, batch_first=True,
                            bidirectional=bidirectional, dropout=dropout if num_layers > 1 else 0.0,
                            backend=backend)

    @property
    def output_size(self) -> int:
        return self.num_directions * self.hidden_size

    def forward(self, src: torch.Tensor, lengths: torch.Tensor | None = None) -> EncoderOutput:
        B, S = src.shape
        x = self.dropout(self.embedding(src))
        if lengths is None:
            memory, final = self.rnn(x)
            mask = torch.ones(B, S, dtype=torch.bool, device=src.device)
        else:
            packed = pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
            memory, final = self.rnn(packed)
            memory, _ = pad_packed_sequence(memory, batch_first=True, total_length=S)
            mask = lengths_to_mask(lengths, S).to(src.device)
        h, c = final if isinstance(final, tuple) else (final, None)
        split = (self.num_layers, self.num_directions, B, self.hidden_size)
        return EncoderOutput(memory, mask, h.view(split), None if c is None else c.view(split))


BRIDGES = ("zeros", "copy", "linear")


class Bridge(nn.Module):
    """Encoder final states -> one initial state per decoder layer.

    - ``zeros``: start the decoder from zeros.
    - ``copy``: decoder layer l starts from encoder layer l with its directions concatenated
      (needs decoder hidden == directions * encoder hidden).
    - ``linear``: the same concatenation through a learned Linear (tanh for h; none for c,
      which is not bounded), shared by the layers.

    ``copy``/``linear`` need as many decoder layers as encoder layers. An LSTM decoder after a
    GRU encoder starts its cell state from zeros.
    """

    def __init__(self, kind: str, encoder_hidden: int, num_directions: int, encoder_layers: int,
                 decoder_hidden: int, decoder_layers: int, decoder_cell: str):
        super().__init__()
        if kind not in BRIDGES:
            raise ValueError(f"bridge must be one of {BRIDGES}, got {kind!r}")
        source = num_directions * encoder_hidden
        if kind != "zeros" and encoder_layers != decoder_layers:
            raise ValueError(f"bridge={kind!r} maps encoder layer l to decoder layer l, but the encoder "
                             f"has {encoder_layers} layers and the decoder {decoder_layers}; "
                             f"use bridge='zeros' or equal layer counts")
        if kind == "copy" and source != decoder_hidden:
            raise ValueError(f"bridge='copy' needs decoder hidden_size == directions * encoder hidden_size "
                             f"= {source}, got {decoder_hidden}; use bridge='linear'")
        self.kind = kind
        self.decoder_hidden = decoder_hidden
        self.decoder_layers = decoder_layers
        self.lstm = decoder_cell == "lstm"
        if kind == "linear":
            self.h_proj = nn.Linear(source, decoder_hidden)
            self.c_proj = nn.Linear(source, decoder_hidden) if self.lstm else None

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}"

    def forward(self, enc: EncoderOutput) -> tuple:
        """-> per decoder layer: (h, c) for an LSTM decoder, h for a GRU one; each [B, H_dec]."""
        B = enc.memory.size(0)

        def directions_concat(s):  # [L, D, B, H] -> [L, B, D*H]
            return s.permute(0, 2, 1, 3).reshape(s.size(0), B, -1)

        zeros = enc.memory.new_zeros(self.decoder_layers, B, self.decoder_hidden)
        if self.kind == "zeros":
            h = c = zeros
        else:
            h = directions_concat(enc.h)
            c = directions_concat(enc.c) if enc.c is not None and self.lstm else None
            if self.kind == "linear":
                h = torch.tanh(self.h_proj(h))
                c = self.c_proj(c) if c is not None else None
            c = zeros if c is None else c
        if self.lstm:
            return tuple((h[l], c[l]) for l in range(self.decoder_layers))
        return tuple(h[l] for l in range(self.decoder_layers))
