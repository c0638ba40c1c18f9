"""Full BPTT in bounded memory: one layer-direction run segment by segment in time.

``layer`` runs the input projection and the recurrence op for k steps at a time, keeping only
the state each segment starts from; backward recomputes one segment at a time (projection and
op forward with workspace), runs autograd over it and carries the state gradient into the
previous segment. See docs/long-sequences.md for the memory it saves.
"""
from __future__ import annotations

import math
import numbers
from typing import Callable, NamedTuple, Optional

import torch

from .backends.base import step_layout
from .spec import ARGS, CELLS, OPTION_FIELDS, StepOptions, make

Tensor = torch.Tensor

# Option tensors with one row per input row (sliced per segment) or per batch entry.
_ROW_OPTIONS = tuple(arg.name for arg in ARGS if arg.shape[:1] == ("N",))
_BATCH_OPTIONS = tuple(arg.name for arg in ARGS if arg.shape[:1] == ("B",))


def check_every(owner: str, value):
    """Validate ``checkpoint_every``: None (off), a positive int, or "auto"."""
    if value is None or value == "auto" and isinstance(value, str):
        return value
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
        raise ValueError(f"{owner}: checkpoint_every must be a positive int (steps per "
                         f"segment), 'auto' (sqrt of the length) or None, got {value!r}")
    return int(value)


def segment_length(every, steps: int) -> int:
    return max(1, math.ceil(math.sqrt(steps))) if every == "auto" else every


class _Spec(NamedTuple):
    cell: str
    recurrence: Callable      # ops.recurrence, or an autocast plan's
    project: Callable         # project(x_rows, *proj_params) -> xproj rows
    n_proj: int
    batch_sizes: Optional[Tensor]
    reverse: bool
    backend: str
    option_values: tuple      # (name, value) of every op option; tensors come as arguments
    every: object


# Its backward runs autograd itself, which torch.compile cannot trace: compiled code calls the
# layer eagerly (a graph break; fullgraph=True therefore refuses it).
@torch.compiler.disable
def layer(recurrence, project, x: Tensor, proj_params, cell: str, h0: Tensor,
          c0: Optional[Tensor], w_hh: Tensor, b_hh: Optional[Tensor], w_hr: Optional[Tensor],
          batch_sizes: Optional[Tensor], reverse: bool, backend: str,
          options: Optional[StepOptions], every):
    """One layer-direction: ``recurrence(cell, project(x, *proj_params), h0, ...)`` computed in
    segments of ``every`` steps. Returns (output, h_n, c_n or None)."""
    names = OPTION_FIELDS[cell]
    values = tuple((name, None if options is None else getattr(options, name))
                   for name in names)
    if not x.shape[0] or not h0.shape[0]:   # nothing to split
        return recurrence(cell, project(x, *proj_params), h0, c0, w_hh, b_hh, w_hr,
                          batch_sizes, reverse, backend, options)
    spec = _Spec(cell, recurrence, project, len(proj_params), batch_sizes, reverse, backend,
                 tuple((n, None if isinstance(v, Tensor) else v) for n, v in values), every)
    tensors = [v if isinstance(v, Tensor) else None for _, v in values]
    result = _Segmented.apply(spec, x, *proj_params, h0, c0, w_hh, b_hh, w_hr, *tensors)
    return result if CELLS[cell].has_cell_state else (result[0], result[1], None)


def _segments(spec: _Spec, rows: int, batch: int):
    """[(row_start, row_end, batch_sizes slice or None, batch at the first step)] in time order."""
    sizes, offsets = step_layout(rows, batch, spec.batch_sizes)
    k = segment_length(spec.every, len(sizes))
    return [(offsets[t], offsets[min(t + k, len(sizes))],
             None if spec.batch_sizes is None else spec.batch_sizes[t:t + k], sizes[t])
            for t in range(0, len(sizes), k)]


def _options(spec: _Spec, tensors, start: int, end: int, live: int):
    """The op's options for rows start:end whose first step has ``live`` rows."""
    values = {}
    for (name, value), tensor in zip(spec.option_values, tensors):
        if tensor is not None:
            value = (tensor[start:end] if name in _ROW_OPTIONS
                     else tensor[:live] if name in _BATCH_OPTIONS else tensor)
        values[name] = value
    return make(spec.cell, values)


def _run_segment(spec, x, proj_params, h, c, w_hh, b_hh, w_hr, tensors, segment):
    """The segment's rows ``x`` (already sliced) through projection and recurrence."""
    start, end, sizes, live = segment
    xproj = spec.project(x, *proj_params)
    return spec.recurrence(spec.cell, xproj, h, c, w_hh, b_hh, w_hr, sizes, spec.reverse,
                           spec.backend, _options(spec, tensors, start, end, live))


def _order(spec, segments):
    """Indices of the segments in the order the recurrence visits them."""
    indices = range(len(segments))
    return list(reversed(indices)) if spec.reverse else list(indices)


class _Segmented(torch.autograd.Function):
    """Inputs: spec, x, *proj_params, h0, c0, w_hh, b_hh, w_hr, *option tensors."""

    @staticmethod
    def forward(ctx, spec: _Spec, x, *args):
        proj_params, (h0, c0, w_hh, b_hh, w_hr), tensors = \
            args[:spec.n_proj], args[spec.n_proj:spec.n_proj + 5], args[spec.n_proj + 5:]
        segments = _segments(spec, x.shape[0], h0.shape[0])
        # ``cur`` holds every sequence's state in the batch's order. A packed step's live
        # sequences are its first rows: a segment starts from cur's first ``live`` rows and
        # leaves the others as they are (ended already, or in reverse not started yet: h0).
        # The states are written into buffers made once: per-segment allocations kept
        # between big temporary ones would fragment the heap (glibc keeps such holes).
        n_seg = len(segments)
        cur_h = h0.clone()
        cur_c = None if c0 is None else c0.clone()
        starts_h = h0.new_empty((n_seg,) + tuple(h0.shape))
        starts_c = None if c0 is None else c0.new_empty((n_seg,) + tuple(c0.shape))
        output = None
        for i in _order(spec, segments):
            start, end, _, live = segments[i]
            starts_h[i] = cur_h
            if c0 is not None:
                starts_c[i] = cur_c
            rows, h_n, c_n = _run_segment(
                spec, x[start:end], proj_params, starts_h[i, :live],
                None if c0 is None else starts_c[i, :live], w_hh, b_hh, w_hr, tensors,
                segments[i])
            if output is None:   # one buffer, not pieces to concatenate: half the peak
                output = rows.new_empty(x.shape[0], rows.shape[1])
            output[start:end] = rows
            cur_h[:live] = h_n
            if c0 is not None:
                cur_c[:live] = c_n
        ctx.spec, ctx.segments, ctx.starts = spec, segments, (starts_h, starts_c)
        device = x.device.type
        ctx.autocast = (device, torch.is_autocast_enabled(device),
                        torch.get_autocast_dtype(device))
        ctx.save_for_backward(x, *args)
        return (output, cur_h) + ((cur_c,) if c0 is not None else ())

    @staticmethod
    def backward(ctx, grad_output, grad_h_n, grad_c_n=None):
        if torch.is_grad_enabled():
            raise RuntimeError(
                f"fastrnn: double backward (create_graph=True) is not available through a "
                f"{ctx.spec.cell} layer with checkpoint_every; set checkpoint_every=None to take "
                "second derivatives")
        spec, segments = ctx.spec, ctx.segments
        x, *args = ctx.saved_tensors
        n = spec.n_proj
        needs = ctx.needs_input_grad[1:]     # x, *proj_params, h0, c0, w_hh, b_hh, w_hr, ...
        # Leaves shared by every segment's graph; their gradients are summed over segments.
        leaves = [None if t is None else t.detach().requires_grad_(bool(need))
                  for t, need in zip(args, needs[1:])]
        proj_params, (h0, c0, w_hh, b_hh, w_hr), tensors = \
            leaves[:n], leaves[n:n + 5], leaves[n + 5:]
        shared = [(j, t) for j, t in enumerate(leaves)
                  if t is not None and t.requires_grad and not n <= j < n + 2]
        sums = [None] * len(leaves)
        grad_x = torch.zeros_like(x) if needs[0] else None
        # gradient of ``cur`` after the segment; rows past ``live`` pass through unchanged
        g_h = grad_h_n.clone()
        g_c = None if c0 is None else grad_c_n.clone()
        starts_h, starts_c = ctx.starts
        device, enabled, dtype = ctx.autocast
        for i in reversed(_order(spec, segments)):
            start, end, _, live = segments[i]
            with torch.enable_grad(), torch.autocast(device, dtype, enabled=enabled):
                xs = x[start:end].detach().requires_grad_(bool(needs[0]))
                h = starts_h[i, :live].detach().requires_grad_()
                c = None if c0 is None else starts_c[i, :live].detach().requires_grad_()
                output, h_n, c_n = _run_segment(spec, xs, proj_params, h, c, w_hh, b_hh, w_hr,
                                                tensors, segments[i])
            wanted = [t for t in (xs, h, c) if t is not None and t.requires_grad]
            wanted += [t for _, t in shared]
            outs = [output, h_n] + ([c_n] if c_n is not None else [])
            grads = [grad_output[start:end], g_h[:live]] + ([g_c[:live]] if c_n is not None
                                                            else [])
            found = list(torch.autograd.grad(outs, wanted, grads, allow_unused=True))
            if needs[0]:
                gx = found.pop(0)
                if gx is not None:
                    grad_x[start:end] = gx
            g_h[:live] = found.pop(0)
            if c is not None:
                g_c[:live] = found.pop(0)
            for (j, _), g in zip(shared, found):
                if g is not None:
                    # a copy first: a gradient autograd returned may be shared
                    sums[j] = g.clone() if sums[j] is None else sums[j].add_(g)
        sums[n] = g_h
        if c0 is not None:
            sums[n + 1] = g_c
        result = [None, grad_x]
        for j, (t, need) in enumerate(zip(args, needs[1:])):
            if not need or t is None:
                result.append(None)
            else:
                result.append(torch.zeros_like(t) if sums[j] is None else sums[j])
        return tuple(result)
