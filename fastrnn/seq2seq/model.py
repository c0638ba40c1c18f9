"""Seq2Seq: encoder + bridge + attention decoder, with teacher forcing / scheduled sampling
for training and greedy / sampling / beam search for inference."""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from . import search
from .decoder import AttentionDecoder, DecoderState
from .encoder import Bridge, Encoder

FORCING_MODES = ("batch", "step", "token")


class Seq2SeqOutput(NamedTuple):
    logits: torch.Tensor     # [B, T, V]
    attention: torch.Tensor  # [B, T, S]


class Seq2Seq(nn.Module):
    """``bos``/``eos``/``pad`` are target token ids. Targets are given without BOS and with
    EOS: the decoder reads BOS, then (teacher forcing) ``tgt[:, t-1]`` at step t."""

    def __init__(self, encoder: Encoder, decoder: AttentionDecoder, *, bos: int, eos: int,
                 pad: int = 0, bridge: str = "linear"):
        super().__init__()
        self.encoder, self.decoder = encoder, decoder
        self.bridge = Bridge(bridge, encoder.hidden_size, encoder.num_directions, encoder.num_layers,
                             decoder.hidden_size, decoder.num_layers, decoder.cell)
        self.bos, self.eos, self.pad = bos, eos, pad

    @classmethod
    def create(cls, src_vocab_size: int, tgt_vocab_size: int, *, bos: int, eos: int, pad: int = 0,
               embed_size: int = 64, hidden_size: int = 128, num_layers: int = 1,
               bidirectional: bool = True, cell: str = "lstm", attention: str = "general",
               input_feeding: bool = True, dropout: float = 0.0, bridge: str = "linear",
               backend: str = "auto") -> "Seq2Seq":
        """A standard configuration: the encoder's hidden size is halved when bidirectional,
        so its memory has ``hidden_size`` features like the decoder."""
        enc_hidden = hidden_size // 2 if bidirectional else hidden_size
        encoder = Encoder(src_vocab_size, embed_size, enc_hidden, num_layers, bidirectional=bidirectional,
                          cell=cell, dropout=dropout, padding_idx=pad, backend=backend)
        decoder = AttentionDecoder(tgt_vocab_size, embed_size, hidden_size, encoder.output_size, num_layers,
                                   cell=cell, attention=attention, input_feeding=input_feeding,
                                   dropout=dropout, padding_idx=pad, backend=backend)
        return cls(encoder, decoder, bos=bos, eos=eos, pad=pad, bridge=bridge)

    # ------------------------------------------------------------------ decoding interface

    def start(self, src: torch.Tensor, src_lengths: torch.Tensor | None = None) -> DecoderState:
        """Encode and return the decoder's initial state (one row per sentence)."""
        enc = self.encoder(src, src_lengths)
        return self.decoder.init_state(enc.memory, enc.mask, self.bridge(enc))

    def step_fn(self, tokens: torch.Tensor, state: DecoderState):
        """The ``step_fn`` of fastrnn.seq2seq.search: tokens [N] -> (log_probs [N, V], state)."""
        logits, state, _ = self.decoder.step(tokens, state)
        return torch.log_softmax(logits, dim=-1), state

    # ------------------------------------------------------------------ training

    def forward(self, src: torch.Tensor, src_lengths: torch.Tensor | None, tgt: torch.Tensor,
                teacher_forcing: float = 1.0, mode: str = "step", feed: str = "argmax",
                generator: torch.Generator | None = None) -> Seq2SeqOutput:
        """Run the decoder over ``tgt`` [B, T]; at each step after the first it reads the true
        previous token with probability ``teacher_forcing``, else its own previous prediction
        (``feed``: "argmax" or "sample" from its distribution; never back-propagated through).

        ``mode`` says what one coin flip decides: "batch" (the whole call), "step" (one step
        for every sentence) or "token" (one step of one sentence, as in Bengio et al. 2015).
        ``generator``: a CPU torch.Generator for the flips (and sampled feeds on CPU).
        """
        if mode not in FORCING_MODES:
            raise ValueError(f"mode must be one of {FORCING_MODES}, got {mode!r}")
        if feed not in ("argmax", "sample"):
            raise ValueError(f"feed must be 'argmax' or 'sample', got {feed!r}")
        if not 0.0 <= teacher_forcing <= 1.0:
            raise ValueError(f"teacher_forcing must be a probability in [0, 1], got {teacher_forcing!r}")
        B, T = tgt.shape
        flips = self._forcing_flips(teacher_forcing, mode, B, T, generator)
        if flips is not None and flips.dim() == 2:
            flips = flips.to(tgt.device)
        state = self.start(src, src_lengths)
        tokens = torch.full((B,), self.bos, dtype=torch.long, device=tgt.device)
        all_logits, all_weights = [], []
        for t in range(T):
            logits, state, weights = self.decoder.step(tokens, state)
            all_logits.append(logits)
            all_weights.append(weights)
            if t + 1 == T:
                break
            truth = tgt[:, t]
            if flips is None or (flips.dim() == 1 and bool(flips[t])):
                tokens = truth
                continue
            with torch.no_grad():
                if feed == "argmax":
                    own = logits.argmax(dim=-1)
                else:
                    own = torch.multinomial(torch.softmax(logits.float(), dim=-1), 1,
                                            generator=generator if logits.is_cpu else None).squeeze(1)
            tokens = own if flips.dim() == 1 else torch.where(flips[:, t], truth, own)
        return Seq2SeqOutput(torch.stack(all_logits, dim=1), torch.stack(all_weights, dim=1))

    @staticmethod
    def _forcing_flips(ratio, mode, B, T, generator):
        """None: always the truth. Else CPU bools [T] ("batch"/"step": decided on the host,
        so a step fed the truth computes no argmax) or [B, T] ("token"). Column t says
        whether step t + 1 reads the truth."""
        if ratio == 1.0:
            return None
        if mode == "batch":
            flip = bool(torch.rand((), generator=generator) < ratio)
            return torch.full((T,), flip, dtype=torch.bool)
        if mode == "step":
            return torch.rand(T, generator=generator) < ratio
        return torch.rand(B, T, generator=generator) < ratio

    # ------------------------------------------------------------------ inference

    @torch.no_grad()
    def greedy(self, src, src_lengths=None, *, max_len: int, min_len: int = 0) -> search.SearchResult:
        return search.greedy_search(self.step_fn, self.start(src, src_lengths), batch_size=src.size(0),
                                    bos=self.bos, eos=self.eos, max_len=max_len, min_len=min_len, pad=self.pad)

    @torch.no_grad()
    def sample(self, src, src_lengths=None, *, max_len: int, **kwargs) -> search.SearchResult:
        return search.sample(self.step_fn, self.start(src, src_lengths), batch_size=src.size(0),
                             bos=self.bos, eos=self.eos, max_len=max_len, pad=self.pad, **kwargs)

    @torch.no_grad()
    def beam_search(self, src, src_lengths=None, *, beam_size: int, max_len: int, **kwargs) -> search.SearchResult:
        return search.beam_search(self.step_fn, self.start(src, src_lengths), batch_size=src.size(0),
                                  beam_size=beam_size, bos=self.bos, eos=self.eos, max_len=max_len,
                                  pad=self.pad, **kwargs)
