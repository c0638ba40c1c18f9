"""The reference backend: the recurrence in plain PyTorch ops, forward and explicit backward.

This is the spec every kernel must match. It runs on any device and any float dtype
(float16/bfloat16 inputs compute in float32). One generic time loop serves every cell kind;
a cell only supplies its pointwise gate math, forward and backward. Everything is written
without in-place updates so autograd can also differentiate ``forward`` directly, which is
how the tests check the explicit backward.
"""
from __future__ import annotations

import torch

from ..cells import CELLS, accumulate_dtype
from .base import Backend, step_layout


# ---------------------------------------------------------------- cell gate math
# forward(xp, hh, h_prev, c_prev) -> (h, c or None, workspace columns)
#   xp = input projection of the step, hh = h_prev @ w_hh.T + b_hh (both [rows, G*H]).
# backward(dh, dc, ws, h_prev, c_prev, h) -> (d_xp, d_hh, d_h_prev direct part or None, d_c_prev)
#   dh/dc: gradient w.r.t. this step's h (before projection) and c; ws: its workspace row.

class LSTMMath:
    @staticmethod
    def forward(xp, hh, h_prev, c_prev):
        i, f, g, o = (xp + hh).chunk(4, 1)
        i, f, g, o = i.sigmoid(), f.sigmoid(), g.tanh(), o.sigmoid()
        c = f * c_prev + i * g
        h = o * c.tanh()
        return h, c, [i, f, g, o, c]

    @staticmethod
    def backward(dh, dc, ws, h_prev, c_prev, h):
        i, f, g, o, c = ws[:, : 5 * dh.shape[1]].chunk(5, 1)
        tanh_c = c.tanh()
        dc = dc + dh * o * (1 - tanh_c * tanh_c)
        d_gates = torch.cat([dc * g * i * (1 - i), dc * c_prev * f * (1 - f),
                             dc * i * (1 - g * g), dh * tanh_c * o * (1 - o)], 1)
        return d_gates, d_gates, None, dc * f


class GRUMath:
    @staticmethod
    def forward(xp, hh, h_prev, c_prev):
        x_r, x_z, x_n = xp.chunk(3, 1)
        h_r, h_z, h_n = hh.chunk(3, 1)
        r = (x_r + h_r).sigmoid()
        z = (x_z + h_z).sigmoid()
        n = (x_n + r * h_n).tanh()
        h = (1 - z) * n + z * h_prev
        return h, None, [r, z, n, h_n]

    @staticmethod
    def backward(dh, dc, ws, h_prev, c_prev, h):
        r, z, n, h_n = ws.chunk(4, 1)
        d_n = dh * (1 - z) * (1 - n * n)
        d_r = d_n * h_n * r * (1 - r)
        d_z = dh * (h_prev - n) * z * (1 - z)
        return torch.cat([d_r, d_z, d_n], 1), torch.cat([d_r, d_z, d_n * r], 1), dh * z, None


class TanhMath:
    @staticmethod
    def forward(xp, hh, h_prev, c_prev):
        return (xp + hh).tanh(), None, []

    @staticmethod
    def backward(dh, dc, ws, h_prev, c_prev, h):
        d = dh * (1 - h * h)
        return d, d, None, None


class ReluMath:
    @staticmethod
    def forward(xp, hh, h_prev, c_prev):
        return (xp + hh).relu(), None, []

    @staticmethod
    def backward(dh, dc, ws, h_prev, c_prev, h):
        d = dh * (h > 0).to(dh.dtype)
        return d, d, None, None


CELL_MATH = {"lstm": LSTMMath, "gru": GRUMath, "rnn_tanh": TanhMath, "rnn_relu": ReluMath}


# ---------------------------------------------------------------- the time loop

def _rows_before(values, init, sizes, offsets, step, live):
    """State entering a step for its ``live`` rows: the rows the previous step (in processing
    order) wrote, and ``init`` for sequences that start at this step."""
    if step < 0 or step >= len(sizes):
        return init[:live]
    kept = min(live, sizes[step])
    prev = values[offsets[step]: offsets[step] + kept]
    return prev if kept == live else torch.cat([prev, init[kept:live]])


def _cast(acc, *tensors):
    return [None if t is None else t.to(acc) for t in tensors]


class ReferenceBackend(Backend):
    name = "reference"

    def unavailable_reason(self, device):
        return None

    def unsupported_reason(self, cell, dtype, device, hidden_size, proj_size):
        if not dtype.is_floating_point:
            return f"dtype {dtype} is not a floating point type"
        return None

    def forward(self, cell, xproj, h0, c0, w_hh, b_hh, w_hr, batch_sizes, reverse):
        math = CELL_MATH[cell]
        acc = accumulate_dtype(xproj.dtype)
        xp, h_run, c_run, w_hh, b_hh, w_hr = _cast(acc, xproj, h0, c0, w_hh, b_hh, w_hr)
        sizes, offsets = step_layout(xp.shape[0], h0.shape[0], batch_sizes)
        steps = len(sizes)
        outputs, workspaces = [None] * steps, [None] * steps
        for t in (reversed(range(steps)) if reverse else range(steps)):
            live = sizes[t]
            h_prev = h_run[:live]
            c_prev = None if c_run is None else c_run[:live]
            hh = h_prev @ w_hh.t() if b_hh is None else torch.addmm(b_hh, h_prev, w_hh.t())
            h, c, ws = math.forward(xp[offsets[t]: offsets[t + 1]], hh, h_prev, c_prev)
            if w_hr is not None:
                ws.append(h)
                h = h @ w_hr.t()
            outputs[t] = h
            workspaces[t] = torch.cat(ws, 1) if ws else xp.new_empty(live, 0)
            h_run = torch.cat([h, h_run[live:]])
            if c_run is not None:
                c_run = torch.cat([c, c_run[live:]])
        if steps:
            output, workspace = torch.cat(outputs), torch.cat(workspaces)
        else:  # shapes as the fake impl promises
            hidden = w_hh.shape[0] // CELLS[cell].num_gates
            output = xp.new_empty(0, h0.shape[1])
            workspace = xp.new_empty(0, CELLS[cell].workspace_width(hidden, w_hr is not None))
        dtype = xproj.dtype
        return (output.to(dtype), h_run.to(dtype),
                None if c_run is None else c_run.to(dtype), workspace)

    def backward(self, cell, grad_output, grad_h_n, grad_c_n, h0, c0, w_hh, b_hh, w_hr,
                 batch_sizes, reverse, output, workspace):
        math = CELL_MATH[cell]
        dtype = output.dtype
        acc = accumulate_dtype(dtype)
        (grad_output, dh_run, dc_run, h0, c0, w_hh, w_hr, output, workspace) = _cast(
            acc, grad_output, grad_h_n, grad_c_n, h0, c0, w_hh, w_hr, output, workspace)
        hidden = w_hh.shape[0] // CELLS[cell].num_gates
        sizes, offsets = step_layout(output.shape[0], h0.shape[0], batch_sizes)
        steps = len(sizes)
        order = list(reversed(range(steps)) if reverse else range(steps))
        d_xp, d_hh, h_prevs, d_outs = [None] * steps, [None] * steps, [None] * steps, [None] * steps
        cells = None if c0 is None else workspace[:, 4 * hidden: 5 * hidden]
        for t in reversed(order):
            live = sizes[t]
            rows = slice(offsets[t], offsets[t + 1])
            before = t + 1 if reverse else t - 1
            h_prev = _rows_before(output, h0, sizes, offsets, before, live)
            c_prev = None if c0 is None else _rows_before(cells, c0, sizes, offsets, before, live)
            d_out = grad_output[rows] + dh_run[:live]
            if w_hr is not None:
                d_outs[t] = d_out
                d_h = d_out @ w_hr
            else:
                d_h = d_out
            dc = None if dc_run is None else dc_run[:live]
            d_xp[t], d_hh[t], d_h_direct, dc_prev = math.backward(
                d_h, dc, workspace[rows], h_prev, c_prev, output[rows])
            d_h_prev = d_hh[t] @ w_hh
            if d_h_direct is not None:
                d_h_prev = d_h_prev + d_h_direct
            h_prevs[t] = h_prev
            dh_run = torch.cat([d_h_prev, dh_run[live:]])
            if dc_run is not None:
                dc_run = torch.cat([dc_prev, dc_run[live:]])
        gates = w_hh.shape[0]
        if steps:
            all_d_hh = torch.cat(d_hh)
            grad_xproj = torch.cat(d_xp)
            grad_w_hh = all_d_hh.t() @ torch.cat(h_prevs)   # one GEMM over all steps
            grad_b_hh = all_d_hh.sum(0)
        else:
            grad_xproj = output.new_zeros(0, gates)
            grad_w_hh = torch.zeros_like(w_hh)
            grad_b_hh = w_hh.new_zeros(gates)
        grad_w_hr = None
        if w_hr is not None:
            grad_w_hr = (torch.cat(d_outs).t() @ workspace[:, 5 * hidden: 6 * hidden]
                         if steps else torch.zeros_like(w_hr))
        cast = lambda t: None if t is None else t.to(dtype)  # noqa: E731
        return (cast(grad_xproj), cast(dh_run), cast(dc_run), cast(grad_w_hh),
                cast(grad_b_hh), cast(grad_w_hr))


BACKEND = ReferenceBackend()
