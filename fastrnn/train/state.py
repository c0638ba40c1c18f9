"""Recurrent state helpers: cut gradients between chunks, zero finished sequences.

A *state* is whatever a recurrent module returns next to its output and accepts back: a
tensor (GRU/RNN ``h``), a tuple ``(h, c)`` (LSTM), a list of per-layer states, a dict, a
namedtuple, or ``None`` (start from zeros). Both helpers walk such nests and keep their
structure, so they work with torch.nn and fastrnn modules and with hand-written stacks.
"""
from __future__ import annotations

from typing import Any, Callable

import torch

Tensor = torch.Tensor


def map_state(fn: Callable[[Tensor], Tensor], state: Any) -> Any:
    """Apply ``fn`` to every tensor in a nested state, keeping its structure.

    Tuples (namedtuples included), lists and dicts are rebuilt with the same type; ``None``
    and non-tensor leaves (ints, strings) are returned unchanged.
    """
    if isinstance(state, Tensor):
        return fn(state)
    if state is None:
        return None
    if isinstance(state, tuple):
        items = [map_state(fn, s) for s in state]
        if hasattr(state, "_fields"):  # namedtuple: positional constructor
            return type(state)(*items)
        return type(state)(items)
    if isinstance(state, list):
        return type(state)(map_state(fn, s) for s in state)
    if isinstance(state, dict):
        return type(state)((k, map_state(fn, v)) for k, v in state.items())
    return state


def detach_state(state: Any) -> Any:
    """Return ``state`` with every tensor detached from the autograd graph.

    This is the truncation in truncated BPTT: the values carry over to the next chunk,
    the gradient path back into the previous chunk is cut. Works on a tensor, an LSTM
    ``(h, c)``, lists/dicts/namedtuples of those, and ``None``.
    """
    return map_state(torch.Tensor.detach, state)


def reset_state(state: Any, mask: Tensor, batch_dim: int = 1) -> Any:
    """Zero the state of the sequences flagged in ``mask``, leaving the others as they are.

    Use it where a new sequence starts in some of the B streams of a batch (a document
    boundary in a stream-batched corpus): the recurrence for those streams restarts from
    zeros, as it would for a fresh sequence.

    Args:
        state: nested state (see module docstring); ``None`` stays ``None``.
        mask: bool tensor [B], True for the streams to reset.
        batch_dim: the batch dimension of every state tensor: 1 for the
            ``[num_layers * num_directions, B, H]`` states of torch.nn.LSTM/GRU/RNN
            (the default), 0 for the ``[B, H]`` states of the *Cell modules.

    The result is out-of-place (``torch.where``), so gradients still flow into the rows
    that are kept.
    """
    if mask.dtype != torch.bool or mask.dim() != 1:
        raise ValueError(
            f"reset_state: mask must be a 1-D bool tensor [batch], got dtype {mask.dtype} "
            f"and shape {list(mask.shape)}")

    def zero_rows(t: Tensor) -> Tensor:
        if t.size(batch_dim) != mask.numel():
            raise ValueError(
                f"reset_state: state tensor of shape {list(t.shape)} has size "
                f"{t.size(batch_dim)} at batch_dim={batch_dim}, but mask has "
                f"{mask.numel()} entries")
        shape = [1] * t.dim()
        shape[batch_dim] = mask.numel()
        keep = ~mask.to(t.device).view(shape)
        return torch.where(keep, t, torch.zeros((), dtype=t.dtype, device=t.device))

    return map_state(zero_rows, state)
