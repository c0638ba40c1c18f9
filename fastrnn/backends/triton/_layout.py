"""Packed time-major layout helpers (the op contract: docs/op-contract.md)."""
from typing import List

import torch


def previous_rows(sizes: List[int], offsets: List[int], batch: int, reverse: bool,
                  device) -> torch.Tensor:
    """For every packed row, the row holding its state before the step, as an index into
    ``torch.cat([init, values])``: ``init`` ([batch, ...], h0 or c0) for a sequence's first
    step, else ``batch + row`` of the step processed just before (t - 1, or t + 1 in reverse).
    """
    T, N = len(sizes), offsets[-1]
    size = torch.tensor(sizes, dtype=torch.long)
    start = torch.tensor(offsets[:-1], dtype=torch.long)
    step = torch.repeat_interleave(torch.arange(T), size)
    col = torch.arange(N) - start[step]
    prev = step + 1 if reverse else step - 1
    in_range = (prev >= 0) & (prev < T)
    prev = prev.clamp(0, max(T - 1, 0))
    from_prev = in_range & (col < size[prev])
    return torch.where(from_prev, batch + start[prev] + col, col).to(device)


def batch_index(sizes: List[int], offsets: List[int], device) -> torch.Tensor:
    """For every packed row, the batch row (sequence) it belongs to: its position in its step."""
    size = torch.tensor(sizes, dtype=torch.long)
    start = torch.tensor(offsets[:-1], dtype=torch.long)
    step = torch.repeat_interleave(torch.arange(len(sizes)), size)
    return (torch.arange(offsets[-1]) - start[step]).to(device)
