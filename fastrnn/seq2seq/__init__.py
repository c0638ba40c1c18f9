"""Sequence-to-sequence on fastrnn: attention, encoder / attention decoder built from fastrnn
LSTM/GRU modules, teacher forcing with scheduled sampling, and greedy / sampling / batched
beam search."""
from . import schedules
from .attention import KINDS as ATTENTION_KINDS, Attention, lengths_to_mask
from .decoder import AttentionDecoder, DecoderState
from .encoder import Bridge, Encoder, EncoderOutput
from .model import Seq2Seq, Seq2SeqOutput
from .schedules import Constant, Exponential, InverseSigmoid, Linear
from .search import (SearchResult, beam_search, filter_logits, greedy_search, length_penalty_fn,
                     reorder_nested, sample)

__all__ = [
    "ATTENTION_KINDS", "Attention", "AttentionDecoder", "Bridge", "Constant", "DecoderState", "Encoder",
    "EncoderOutput", "Exponential", "InverseSigmoid", "Linear", "SearchResult", "Seq2Seq", "Seq2SeqOutput",
    "beam_search", "filter_logits", "greedy_search", "length_penalty_fn", "lengths_to_mask",
    "reorder_nested", "sample", "schedules",
]
