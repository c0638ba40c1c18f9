"""Beam search throughput (sentences/s): batched vs one sentence at a time.

The model is ``fastrnn.seq2seq.Seq2Seq`` (bidirectional fastrnn LSTM encoder, LSTM-cell
attention decoder with input feeding, general attention) with seeded random weights. An
untrained model would either never end or end at once, so each sentence gets a length it
ends at: the EOS logit is pushed down before it and up from it (like a trained model that
has learned where sentences end). Lengths vary within the batch, so the batched search also
shows what dropping finished sentences saves.

Providers (the case's ``tokens`` are sentences, so tokens/s is sentences/s):

- ``one-at-a-time`` (baseline): ``beam_search`` on each sentence alone, batch_size=1;
- ``batched``: one ``beam_search`` over the whole batch (batch * beam rows per step).

Both must return the same hypotheses (tokens, lengths, scores) before they are timed.
"""
from __future__ import annotations

import dataclasses
from typing import Dict

import torch

from ..core import Case, Options, suite

BOS, EOS = 1, 2
EOS_PUSH = 12.0   # added to / taken from the EOS logit at / before a sentence's end


@dataclasses.dataclass(frozen=True)
class Config:
    batch: int           # sentences
    beam: int
    vocab: int = 1000
    embed: int = 128
    hidden: int = 256
    src_len: int = 20    # longest source; lengths uniform in [src_len / 2, src_len]
    max_len: int = 30

    def tiny(self) -> "Config":
        return Config(batch=3, beam=min(self.beam, 3), vocab=17, embed=6, hidden=8, src_len=5, max_len=7)


CONFIGS: Dict[str, Config] = {
    "batch32-beam4": Config(batch=32, beam=4),
    "batch32-beam8": Config(batch=32, beam=8),
    "batch128-beam4": Config(batch=128, beam=4),
    "batch128-beam10-h512": Config(batch=128, beam=10, hidden=512),
}
QUICK_CONFIGS = ("batch32-beam4",)   # the one-at-a-time baseline is slow on CPU: keep --quick short


class Problem:
    """Model, sources and per-sentence end positions of one case, made on first use."""

    def __init__(self, config: Config, device: torch.device, seed: int):
        self.config, self.device, self.seed = config, device, seed
        self._made = None

    def make(self):
        if self._made is None:
            from fastrnn.seq2seq import Seq2Seq
            c = self.config
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.seed)
                model = Seq2Seq.create(c.vocab, c.vocab, bos=BOS, eos=EOS, embed_size=c.embed,
                                       hidden_size=c.hidden).to(self.device).eval()
            gen = torch.Generator().manual_seed(self.seed)
            src = torch.randint(3, c.vocab, (c.batch, c.src_len), generator=gen)
            lengths = torch.randint(max(c.src_len // 2, 1), c.src_len + 1, (c.batch,), generator=gen)
            ends = (lengths + torch.randint(0, 3, (c.batch,), generator=gen)).clamp(max=c.max_len)
            self._made = model, src.to(self.device), lengths, ends.to(self.device)
        return self._made

    def clear(self):
        self._made = None

    def start(self, rows: slice):
        """Initial search state of sentences ``rows``: (decoder state, position, end position)."""
        model, src, lengths, ends = self.make()
        dec = model.start(src[rows], lengths[rows])
        position = torch.zeros(ends[rows].shape, dtype=torch.long, device=self.device)
        return dec, position, ends[rows]

    def step_fn(self, tokens, state):
        model = self.make()[0]
        dec, position, ends = state
        logits, dec, _ = model.decoder.step(tokens, dec)
        position = position + 1
        push = torch.where(position >= ends, EOS_PUSH, -EOS_PUSH).to(logits.dtype)
        logits = torch.cat([logits[:, :EOS], (logits[:, EOS] + push).unsqueeze(1), logits[:, EOS + 1:]], 1)
        return torch.log_softmax(logits, dim=-1), (dec, position, ends)

    def search(self, rows: slice, batch_size: int):
        from fastrnn.seq2seq import beam_search
        c = self.config
        return beam_search(self.step_fn, self.start(rows), batch_size=batch_size, beam_size=c.beam,
                           bos=BOS, eos=EOS, max_len=c.max_len)

    def batched(self):
        def call():
            with torch.no_grad():
                r = self.search(slice(None), self.config.batch)
            return {"tokens": r.tokens.double(), "lengths": r.lengths.double(), "scores": r.scores}
        return call

    def one_at_a_time(self):
        def call():
            results = []
            with torch.no_grad():
                for b in range(self.config.batch):
                    results.append(self.search(slice(b, b + 1), 1))
            return {"tokens": torch.cat([r.tokens for r in results]).double(),
                    "lengths": torch.cat([r.lengths for r in results]).double(),
                    "scores": torch.cat([r.scores for r in results])}
        return call


@suite("beam_search")
def beam_search_cases(options: Options):
    names = QUICK_CONFIGS if options.size == "quick" else tuple(CONFIGS)
    for name in names:
        config = CONFIGS[name].tiny() if options.size == "tiny" else CONFIGS[name]
        problem = Problem(config, options.device, options.seed)
        params = dict(cell="lstm", config=name, mode="inference", dtype="float32", unit="sentences",
                      **dataclasses.asdict(config))
        yield Case(suite="beam_search", name=f"beam_search/{name}/float32", params=params,
                   providers={"one-at-a-time": problem.one_at_a_time, "batched": problem.batched},
                   baseline="one-at-a-time", tokens=config.batch, dtype=torch.float32,
                   cleanup=problem.clear)
