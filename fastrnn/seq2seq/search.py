"""Decoding: greedy search, sampling (temperature, top-k, top-p) and batched beam search.

All three drive a ``step_fn(tokens, state) -> (log_probs, state)``: ``tokens`` a LongTensor
[N] (the previous token of every row, BOS at the first step), ``log_probs`` [N, V]
log-probabilities of the next token (``log_softmax`` output: every entry <= 0; beam search's
early stop relies on scores never growing). ``state`` is anything ``step_fn`` needs: a
tensor or a nested tuple / list / dict of tensors whose dim 0 is the row. A state for
``torch.nn.LSTM`` ([layers, N, H]) has its rows on dim 1: pass a ``reorder_state`` then.

Conventions shared by the three:

- ``max_len`` counts generated tokens, EOS included; BOS is never in the output.
- ``min_len`` is the least number of tokens before EOS: EOS gets probability 0 at the first
  ``min_len`` steps.
- A hypothesis ends at its first EOS (kept in ``tokens`` and counted in ``lengths``) or when
  it reaches ``max_len`` tokens without one. ``tokens`` holds ``pad`` after the end.
- A score is the sum of the log-probabilities of the generated tokens, EOS included, divided
  by the length penalty when one is given.

Everything runs batched on the tensors' device: no Python loop over sentences or
hypotheses. The only device-to-host read is one small one per step, to stop once every
sentence is done (and, in beam search, to drop finished sentences from the batch).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch

StepFn = Callable[[torch.Tensor, Any], "tuple[torch.Tensor, Any]"]

LENGTH_PENALTIES = ("gnmt", "avg")


@dataclass
class SearchResult:
    """Decoded hypotheses.

    Greedy / sample: ``tokens`` [batch, max_len], ``lengths`` and ``scores`` [batch].
    Beam search: ``tokens`` [batch, n_best, max_len], ``lengths`` and ``scores``
    [batch, n_best], best first; ``log_probs`` holds the raw sums of token log-probabilities
    (equal to ``scores`` without a length penalty). A slot with no hypothesis (n_best larger
    than the number of hypotheses that exist) has score -inf and length 0.
    """
    tokens: torch.Tensor
    lengths: torch.Tensor
    scores: torch.Tensor
    log_probs: torch.Tensor | None = None


def reorder_nested(state: Any, index: torch.Tensor) -> Any:
    """``index_select(0, index)`` on every tensor of a nested tuple / list / dict / namedtuple."""
    if isinstance(state, torch.Tensor):
        return state.index_select(0, index)
    if isinstance(state, tuple) and hasattr(state, "_fields"):  # namedtuple
        return type(state)(*(reorder_nested(s, index) for s in state))
    if isinstance(state, (tuple, list)):
        return type(state)(reorder_nested(s, index) for s in state)
    if isinstance(state, dict):
        return {k: reorder_nested(v, index) for k, v in state.items()}
    return state  # None, ints, ...: not per-row


def _first_tensor(state: Any) -> torch.Tensor | None:
    if isinstance(state, torch.Tensor):
        return state
    items = state.values() if isinstance(state, dict) else state if isinstance(state, (tuple, list)) else ()
    for s in items:
        t = _first_tensor(s)
        if t is not None:
            return t
    return None


def _device_of(state: Any, device) -> torch.device:
    if device is not None:
        return torch.device(device)
    t = _first_tensor(state)
    return t.device if t is not None else torch.device("cpu")


def _check_common(batch_size, bos, eos, max_len, min_len):
    for name, value in (("batch_size", batch_size), ("max_len", max_len)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if not isinstance(min_len, int) or not 0 <= min_len <= max_len:
        raise ValueError(f"min_len must be an int in [0, max_len={max_len}], got {min_len!r}")
    for name, value in (("bos", bos), ("eos", eos)):
        if not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be a token id (int >= 0), got {value!r}")


def _check_log_probs(log_probs: torch.Tensor, rows: int) -> None:
    if log_probs.dim() != 2 or log_probs.size(0) != rows:
        raise ValueError(f"step_fn must return log_probs of shape [{rows}, vocab_size], "
                         f"got {tuple(log_probs.shape)}")


def _forbid_eos(log_probs: torch.Tensor, eos: int) -> torch.Tensor:
    return log_probs.index_fill(-1, torch.tensor([eos], device=log_probs.device), -math.inf)


def _score_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# --------------------------------------------------------------------------- greedy / sample

def _decode_one_path(step_fn: StepFn, state: Any, choose: Callable[[torch.Tensor], torch.Tensor], *,
                     batch_size: int, bos: int, eos: int, max_len: int, min_len: int, pad: int,
                     device) -> SearchResult:
    """One hypothesis per sentence; ``choose(log_probs [B, V]) -> tokens [B]`` picks the next token."""
    _check_common(batch_size, bos, eos, max_len, min_len)
    device = _device_of(state, device)
    B = batch_size
    tokens_in = torch.full((B,), bos, dtype=torch.long, device=device)
    tokens = torch.full((B, max_len), pad, dtype=torch.long, device=device)
    lengths = torch.full((B,), max_len, dtype=torch.long, device=device)
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    scores = None
    for t in range(max_len):
        log_probs, state = step_fn(tokens_in, state)
        _check_log_probs(log_probs, B)
        log_probs = log_probs.to(_score_dtype(log_probs.dtype))
        if t < min_len:
            log_probs = _forbid_eos(log_probs, eos)
        chosen = choose(log_probs)
        chosen_lp = log_probs.gather(1, chosen.unsqueeze(1)).squeeze(1).masked_fill(finished, 0.0)
        scores = chosen_lp if scores is None else scores + chosen_lp
        tokens[:, t] = chosen.masked_fill(finished, pad)
        newly = (chosen == eos) & ~finished
        lengths = torch.where(newly, torch.full_like(lengths, t + 1), lengths)
        finished = finished | newly
        if t + 1 < max_len and bool(finished.all()):  # the one host read per step
            break
        # Finished rows keep running (cheaper than compacting one-path decoding); feed them EOS.
        tokens_in = chosen.masked_fill(finished, eos)
    return SearchResult(tokens=tokens, lengths=lengths, scores=scores)


def greedy_search(step_fn: StepFn, state: Any, *, batch_size: int, bos: int, eos: int,
                  max_len: int, min_len: int = 0, pad: int = 0, device=None) -> SearchResult:
    """Pick the most likely token at every step. Returns tokens [B, max_len], lengths, scores [B]."""
    return _decode_one_path(step_fn, state, lambda lp: lp.argmax(dim=-1), batch_size=batch_size,
                            bos=bos, eos=eos, max_len=max_len, min_len=min_len, pad=pad, device=device)


def filter_logits(logits: torch.Tensor, top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """Set to -inf every logit outside the top-k and outside the smallest set whose
    probability reaches top_p (nucleus); the most likely token always survives."""
    if top_k is not None:
        if not isinstance(top_k, int) or top_k < 1:
            raise ValueError(f"top_k must be a positive int or None, got {top_k!r}")
        if top_k < logits.size(-1):
            kth = logits.topk(top_k, dim=-1).values[..., -1:]
            logits = logits.masked_fill(logits < kth, -math.inf)
    if top_p is not None:
        if not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs
        drop_sorted = mass_before >= top_p  # the set already reached top_p without this token
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, -math.inf)
    return logits


def sample(step_fn: StepFn, state: Any, *, batch_size: int, bos: int, eos: int, max_len: int,
           min_len: int = 0, temperature: float = 1.0, top_k: int | None = None,
           top_p: float | None = None, generator: torch.Generator | None = None, pad: int = 0,
           device=None) -> SearchResult:
    """Draw each token from softmax(log_probs / temperature), restricted to the top-k tokens
    and to the top-p nucleus when given. ``scores`` are the model's own log-probabilities of
    the drawn tokens (before temperature and filtering)."""
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0 (use greedy_search for argmax), got {temperature!r}")

    def choose(log_probs):
        logits = filter_logits(log_probs / temperature, top_k, top_p)
        return torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator).squeeze(1)

    return _decode_one_path(step_fn, state, choose, batch_size=batch_size, bos=bos, eos=eos,
                            max_len=max_len, min_len=min_len, pad=pad, device=device)


# --------------------------------------------------------------------------- beam search

def length_penalty_fn(length_penalty) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """``None``; ``("gnmt", alpha)``: ((5 + len) / 6) ** alpha (Wu et al. 2016);
    ``("avg", alpha)``: len ** alpha (alpha = 1: the mean token log-prob); or a callable
    mapping a float tensor of lengths to positive penalties elementwise, non-decreasing or
    non-increasing in the length (the early stop bounds a live hypothesis with it)."""
    if length_penalty is None:
        return None
    if callable(length_penalty):
        return length_penalty
    if (isinstance(length_penalty, (tuple, list)) and len(length_penalty) == 2
            and length_penalty[0] in LENGTH_PENALTIES and isinstance(length_penalty[1], (int, float))):
        kind, alpha = length_penalty[0], float(length_penalty[1])
        if kind == "gnmt":
            return lambda length: ((5.0 + length) / 6.0) ** alpha
        return lambda length: length ** alpha
    raise ValueError(f"length_penalty must be None, (kind, alpha) with kind in {LENGTH_PENALTIES} "
                     f"and a number alpha, or a callable; got {length_penalty!r}")


def beam_search(step_fn: StepFn, state: Any, *, batch_size: int, beam_size: int, bos: int, eos: int,
                max_len: int, min_len: int = 0, n_best: int = 1, length_penalty=None,
                reorder_state: Callable[[Any, torch.Tensor], Any] | None = None, pad: int = 0,
                device=None) -> SearchResult:
    """Batched beam search.

    ``state`` is given for ``batch_size`` rows; the search expands it to
    N = batch_size * beam_size rows ordered batch-major (row b * beam_size + k is beam k of
    sentence b) with ``reorder_state(state, index)`` (default: :func:`reorder_nested`), and
    reorders it the same way after every step. ``index`` is a LongTensor of row numbers into
    the previous state; its length shrinks when sentences finish (they are dropped, so
    ``step_fn`` must accept any N that is a multiple of beam_size).

    Each step ranks the 2 * beam_size best extensions of the live beams by score. EOS
    extensions among the best beam_size are finished hypotheses; the live beam is refilled
    with the best beam_size extensions that do not end, so finished hypotheses never starve
    it. A sentence is done when it has ``n_best`` finished hypotheses and no live one can
    still beat the worst of them (exact under the length penalty too, since log-probs are
    <= 0 and the penalty is monotone), or at ``max_len``, where every hypothesis ends.

    ``length_penalty``: see :func:`length_penalty_fn`, e.g. ``("gnmt", 0.6)``. It ranks
    finished hypotheses; live ones are ranked by their raw log-prob sum.

    Returns a :class:`SearchResult` with tokens [batch, n_best, max_len], lengths, scores
    and log_probs [batch, n_best], best first.
    """
    _check_common(batch_size, bos, eos, max_len, min_len)
    if not isinstance(beam_size, int) or beam_size < 1:
        raise ValueError(f"beam_size must be a positive int, got {beam_size!r}")
    if not isinstance(n_best, int) or not 1 <= n_best <= beam_size:
        raise ValueError(f"n_best must be an int in [1, beam_size={beam_size}], got {n_best!r}")
    penalty = length_penalty_fn(length_penalty)
    reorder = reorder_state or reorder_nested
    device = _device_of(state, device)
    B, K = batch_size, beam_size
    arange_b = torch.arange(B, device=device)

    state = reorder(state, arange_b.repeat_interleave(K))
    tokens_in = torch.full((B * K,), bos, dtype=torch.long, device=device)
    # Per active sentence (rows of these shrink as sentences finish):
    sentence = arange_b                                           # original sentence index
    live_tokens = torch.full((B, K, max_len), pad, dtype=torch.long, device=device)
    live_scores = None                                            # [Ba, K] raw log-prob sums
    fin_tokens = torch.full((B, n_best, max_len), pad, dtype=torch.long, device=device)
    fin_lengths = torch.zeros((B, n_best), dtype=torch.long, device=device)
    fin_scores = fin_raw = None                                   # [Ba, n_best] penalised / raw
    # Results of sentences already done, by original index:
    out_tokens, out_lengths = fin_tokens.clone(), fin_lengths.clone()
    out_scores = out_raw = None

    for t in range(max_len):
        log_probs, state = step_fn(tokens_in, state)
        Ba = sentence.numel()
        _check_log_probs(log_probs, Ba * K)
        V = log_probs.size(1)
        dtype = _score_dtype(log_probs.dtype)
        if live_scores is None:  # first step: all K beams are the same BOS; keep one
            live_scores = torch.full((B, K), -math.inf, dtype=dtype, device=device)
            live_scores[:, 0] = 0.0
            fin_scores = torch.full((B, n_best), -math.inf, dtype=dtype, device=device)
            fin_raw = fin_scores.clone()
            out_scores, out_raw = fin_scores.clone(), fin_scores.clone()
            if penalty is not None:  # penalty_at[n - 1]: the penalty of a hypothesis of n tokens
                penalty_at = penalty(torch.arange(1, max_len + 1, dtype=dtype, device=device))
        log_probs = log_probs.to(dtype)
        if t < min_len:
            log_probs = _forbid_eos(log_probs, eos)
        length = t + 1

        # The 2K best extensions of the K live beams, best first.
        extended = live_scores.unsqueeze(2) + log_probs.view(Ba, K, V)
        cand_raw, cand_index = extended.view(Ba, K * V).topk(min(2 * K, K * V), dim=1)
        cand_origin = torch.div(cand_index, V, rounding_mode="floor")
        cand_token = cand_index % V
        cand_ends = cand_token == eos if t + 1 < max_len else torch.ones_like(cand_token, dtype=torch.bool)
        cand_seqs = live_tokens.gather(1, cand_origin.unsqueeze(2).expand(-1, -1, max_len))
        cand_seqs[:, :, t] = cand_token

        # Finished: ending extensions among the K best, merged into the n_best pool.
        new_raw = cand_raw[:, :K].masked_fill(~cand_ends[:, :K], -math.inf)
        new_scores = new_raw if penalty is None else new_raw / penalty_at[t]
        pool_scores = torch.cat([fin_scores, new_scores], dim=1)
        fin_scores, pick = pool_scores.topk(n_best, dim=1)
        fin_raw = torch.cat([fin_raw, new_raw], dim=1).gather(1, pick)
        fin_lengths = torch.cat([fin_lengths, torch.full_like(new_raw, length, dtype=torch.long)],
                                dim=1).gather(1, pick)
        fin_tokens = torch.cat([fin_tokens, cand_seqs[:, :K]], dim=1).gather(
            1, pick.unsqueeze(2).expand(-1, -1, max_len))
        fin_lengths = fin_lengths.masked_fill(fin_scores == -math.inf, 0)

        if t + 1 == max_len:
            break
        # Live: the K best extensions that do not end (there are >= K: at most K end).
        live_scores, pick = cand_raw.masked_fill(cand_ends, -math.inf).topk(K, dim=1)
        live_origin = cand_origin.gather(1, pick)
        next_tokens = cand_token.gather(1, pick)
        live_tokens = cand_seqs.gather(1, pick.unsqueeze(2).expand(-1, -1, max_len))

        # Done: no live hypothesis can still beat the n_best-th finished one. Raw scores only
        # fall, so the best a live one can reach is its raw score divided by the penalty at
        # the most favourable length still possible (an end of the monotone penalty).
        best_live = live_scores[:, 0]
        if penalty is None:
            bound = best_live
        else:
            bound = torch.maximum(best_live / penalty_at[t + 1], best_live / penalty_at[max_len - 1])
        done = (best_live == -math.inf) | (bound <= fin_scores[:, n_best - 1])
        keep = (~done).nonzero().squeeze(1)  # the one host read per step
        if keep.numel() < Ba:  # drop finished sentences: they stop costing work
            gone = done.nonzero().squeeze(1)
            ids = sentence[gone]
            out_tokens[ids], out_lengths[ids] = fin_tokens[gone], fin_lengths[gone]
            out_scores[ids], out_raw[ids] = fin_scores[gone], fin_raw[gone]
            if keep.numel() == 0:
                sentence = sentence[:0]
                break
            sentence, live_scores, live_tokens = sentence[keep], live_scores[keep], live_tokens[keep]
            fin_tokens, fin_lengths = fin_tokens[keep], fin_lengths[keep]
            fin_scores, fin_raw = fin_scores[keep], fin_raw[keep]
            live_origin, next_tokens = live_origin[keep], next_tokens[keep]
            rows = keep
        else:
            rows = torch.arange(Ba, device=device)
        state = reorder(state, (rows.unsqueeze(1) * K + live_origin).view(-1))
        tokens_in = next_tokens.reshape(-1)

    if sentence.numel():
        out_tokens[sentence], out_lengths[sentence] = fin_tokens, fin_lengths
        out_scores[sentence], out_raw[sentence] = fin_scores, fin_raw
    out_tokens = out_tokens.masked_fill((out_scores == -math.inf).unsqueeze(2), pad)  # empty slots
    return SearchResult(tokens=out_tokens, lengths=out_lengths, scores=out_scores, log_probs=out_raw)
