"""Packed time-major layout helpers (see the op contract in fastrnn.ops)."""
from typing import List, Optional, Tuple

import torch


def step_layout(num_rows: int, batch: int,
                batch_sizes: Optional[torch.Tensor]) -> Tuple[List[int], List[int]]:
    """Live rows of every step and the offset of its first row (len T + 1)."""
    if batch_sizes is None:
        sizes = [batch] * (num_rows // batch if batch else 0)
    else:
        sizes = [int(s) for s in batch_sizes.tolist()]
    offsets = [0]
    for size in sizes:
        offsets.append(offsets[-1] + size)
    return sizes, offsets


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
