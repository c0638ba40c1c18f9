"""The reference backend: the recurrence in plain PyTorch ops, forward and explicit backward.

This is the spec every kernel must match. It runs on any device and any float dtype
(float16/bfloat16 inputs compute in float32). One generic time loop serves every cell kind;
a cell only supplies its pointwise gate math, forward and backward. Everything is written
without in-place updates so autograd can also differentiate ``forward`` directly, which is
how the tests check the explicit backward, and how fastrnn.ops takes second derivatives
(through ``backward``, and through ``forward`` with ``known_gates``).
"""
from __future__ import annotations

import torch

from ..spec import CELLS, LEARNABLE, accumulate_dtype
from ..spec import LAYER_NORM_EPS, StepOptions, option_names, workspace_layout
from .base import Backend, step_layout


# ---------------------------------------------------------------- cell gate math
# forward(xp, hh, h_prev, c_prev, opts, known) -> (h, c or None, gate columns, cell LN columns)
#   xp = input projection of the step, hh = the recurrent pre-activation (after the layer
#   norm and b_hh), both [rows, G*H]; opts: StepOptions (all None when off); known: None, or
#   the step's gate columns of a forward already run (see _activate).
# backward(dh, dc, cols, h_prev, c_prev, h, opts, sums) -> (d_xp, d_hh, d_h_prev direct part
#   or None, d_c_prev); dh/dc: gradient w.r.t. this step's new h (before projection and
#   zoneout) and new c; cols: its workspace columns by name; sums: running parameter grads.
# Without options every expression is the one of the plain recurrence, so its numbers do not
# change.

def _clip_grad(grad, limit):
    return grad if limit is None else grad.clamp(-limit, limit)


class _KnownActivation(torch.autograd.Function):
    """``fn(pre)`` whose value is already known: returns the known value, and in backward
    fn's derivative at it. fastrnn.ops differentiates the workspace of a forward this way
    without that forward's input projection, which is not kept: every value that depends on
    the input projection goes through a gate activation, so the known gates stand in for it."""

    @staticmethod
    def forward(ctx, pre, value, fn):
        ctx.save_for_backward(value)
        ctx.fn = fn
        return value.clone()

    @staticmethod
    def backward(ctx, grad):
        value, = ctx.saved_tensors
        slope = value * (1 - value) if ctx.fn == "sigmoid" else 1 - value * value
        return grad * slope, None, None


def _activate(pre, fn, known=None):
    """``pre.sigmoid()`` or ``pre.tanh()`` (fn names it); with ``known``, see _KnownActivation."""
    if known is None:
        return getattr(pre, fn)()
    return _KnownActivation.apply(pre, known.detach(), fn)


class LSTMMath:
    @staticmethod
    def forward(xp, hh, h_prev, c_prev, opts, known=None):
        known = [None] * 4 if known is None else known.chunk(4, 1)
        a_i, a_f, a_g, a_o = (xp + hh).chunk(4, 1)
        if opts.peephole is not None:   # the gates see the cell state: c_prev into i and f
            p_i, p_f, p_o = opts.peephole.chunk(3)
            a_i, a_f = a_i + p_i * c_prev, a_f + p_f * c_prev
        i = _activate(a_i, "sigmoid", known[0])
        f = _activate(a_f, "sigmoid", known[1])
        g = _activate(a_g, "tanh", known[2])
        c = f * c_prev + i * g
        if opts.cell_clip is not None:
            c = c.clamp(-opts.cell_clip, opts.cell_clip)
        if opts.peephole is not None:   # ... and the new (clipped) c into o
            a_o = a_o + p_o * c
        o = _activate(a_o, "sigmoid", known[3])
        y, ln_cols = c, []
        if opts.ln_c_weight is not None:
            c_hat, rstd_c = _layer_norm(c)
            y, ln_cols = c_hat * opts.ln_c_weight + opts.ln_c_bias, [c_hat, rstd_c]
        h = o * y.tanh()
        return h, c, [i, f, g, o], ln_cols

    @staticmethod
    def backward(dh, dc, cols, h_prev, c_prev, h, opts, sums):
        i, f, g, o = cols["gates"].chunk(4, 1)
        if opts.cell_clip is None and opts.zoneout_c is None:
            c = cols["c"]           # the stored state is the new cell state itself
        else:
            c_raw = f * c_prev + i * g
            c = c_raw if opts.cell_clip is None else c_raw.clamp(-opts.cell_clip, opts.cell_clip)
        if opts.ln_c_weight is not None:
            c_hat = cols["c_hat"]
            tanh_c = (c_hat * opts.ln_c_weight + opts.ln_c_bias).tanh()
            d_y = dh * o * (1 - tanh_c * tanh_c)
            sums["ln_c_weight"] = sums["ln_c_weight"] + (d_y * c_hat).sum(0)
            sums["ln_c_bias"] = sums["ln_c_bias"] + d_y.sum(0)
            dc = dc + _layer_norm_backward(d_y * opts.ln_c_weight, c_hat, cols["rstd_c"])
        else:
            tanh_c = c.tanh()
            dc = dc + dh * o * (1 - tanh_c * tanh_c)
        limit = opts.grad_clip
        d_o = _clip_grad(dh * tanh_c * o * (1 - o), limit)
        if opts.peephole is not None:
            p_i, p_f, p_o = opts.peephole.chunk(3)
            dc = dc + d_o * p_o
        if opts.cell_clip is not None:
            dc = dc * (c_raw.abs() <= opts.cell_clip).to(dc.dtype)
        d_i = _clip_grad(dc * g * i * (1 - i), limit)
        d_f = _clip_grad(dc * c_prev * f * (1 - f), limit)
        d_gates = torch.cat([d_i, d_f, _clip_grad(dc * i * (1 - g * g), limit), d_o], 1)
        dc_prev = dc * f
        if opts.peephole is not None:
            sums["peephole"] = sums["peephole"] + torch.cat(
                [(d_i * c_prev).sum(0), (d_f * c_prev).sum(0), (d_o * c).sum(0)])
            dc_prev = dc_prev + d_i * p_i + d_f * p_f
        return d_gates, d_gates, None, dc_prev


class GRUMath:
    @staticmethod
    def forward(xp, hh, h_prev, c_prev, opts, known=None):
        x_r, x_z, x_n = xp.chunk(3, 1)
        h_r, h_z, h_n = hh.chunk(3, 1)
        known_r, known_z, known_n, _ = [None] * 4 if known is None else known.chunk(4, 1)
        r = _activate(x_r + h_r, "sigmoid", known_r)
        z = _activate(x_z + h_z, "sigmoid", known_z)
        n = _activate(x_n + r * h_n, "tanh", known_n)
        h = (1 - z) * n + z * h_prev
        return h, None, [r, z, n, h_n], []

    @staticmethod
    def backward(dh, dc, cols, h_prev, c_prev, h, opts, sums):
        r, z, n, h_n = cols["gates"].chunk(4, 1)
        limit = opts.grad_clip
        d_n = _clip_grad(dh * (1 - z) * (1 - n * n), limit)
        d_r = _clip_grad(d_n * h_n * r * (1 - r), limit)
        d_z = _clip_grad(dh * (h_prev - n) * z * (1 - z), limit)
        return torch.cat([d_r, d_z, d_n], 1), torch.cat([d_r, d_z, d_n * r], 1), dh * z, None


class ElmanMath:
    """The Elman cells: h = fn(xp + hh); ``slope(h)`` is fn's derivative from its value."""

    def __init__(self, fn, slope):
        self.fn, self.slope = fn, slope

    def forward(self, xp, hh, h_prev, c_prev, opts, known=None):
        return self.fn(xp + hh), None, [], []

    def backward(self, dh, dc, cols, h_prev, c_prev, h, opts, sums):
        d = dh * self.slope(h)
        return d, d, None, None


def _layer_norm(x):
    """Row layer norm without affine: (x_hat, rstd [rows, 1])."""
    mean = x.mean(1, keepdim=True)
    centred = x - mean
    rstd = ((centred * centred).mean(1, keepdim=True) + LAYER_NORM_EPS).rsqrt()
    return centred * rstd, rstd


def _layer_norm_backward(grad_x_hat, x_hat, rstd):
    """Gradient w.r.t. the input of _layer_norm, given the gradient w.r.t. x_hat."""
    return rstd * (grad_x_hat - grad_x_hat.mean(1, keepdim=True)
                   - x_hat * (grad_x_hat * x_hat).mean(1, keepdim=True))


def _blend(new, prev, weight):
    """Zoneout: ``(1 - z) * new + z * prev``; a weight of 1 keeps prev bit for bit."""
    return new if weight is None else (1 - weight) * new + weight * prev


CELL_MATH = {"lstm": LSTMMath, "gru": GRUMath,
             "rnn_tanh": ElmanMath(torch.tanh, lambda h: 1 - h * h),
             "rnn_relu": ElmanMath(torch.relu, lambda h: (h > 0).to(h.dtype))}


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


def _in_dtype(options, acc) -> StepOptions:
    """The options (all None when off) with their tensors in dtype ``acc``."""
    return StepOptions(*[v.to(acc) if isinstance(v, torch.Tensor) else v
                         for v in (options or StepOptions())])


class ReferenceBackend(Backend):
    name = "reference"

    def unavailable_reason(self, device):
        return None

    def unsupported_reason(self, cell, dtype, device, hidden_size, proj_size, option_names=()):
        if not dtype.is_floating_point:
            return f"dtype {dtype} is not a floating point type"
        return None

    def forward(self, cell, xproj, h0, c0, w_hh, b_hh, w_hr, batch_sizes, reverse,
                options=None, need_workspace=True, known_gates=None):
        """``known_gates``: None, or the gate columns ([N, 4H]) of the workspace of a forward
        already run on these arguments (lstm and gru): the gate activations then take those
        values instead of ones computed from xproj, whose value is not used (see
        _KnownActivation); autograd through the result is the forward's derivative."""
        # need_workspace is not used: the spec computes every column (ops.py drops them).
        math = CELL_MATH[cell]
        if known_gates is not None and cell not in ("lstm", "gru"):
            raise ValueError(f"fastrnn: known_gates is for lstm and gru, not {cell}")
        acc = accumulate_dtype(xproj.dtype)
        opts = _in_dtype(options, acc)
        xp, h_run, c_run, w_hh, b_hh, w_hr = _cast(acc, xproj, h0, c0, w_hh, b_hh, w_hr)
        sizes, offsets = step_layout(xp.shape[0], h0.shape[0], batch_sizes)
        steps = len(sizes)
        outputs, workspaces = [None] * steps, [None] * steps
        for t in (reversed(range(steps)) if reverse else range(steps)):
            live, rows = sizes[t], slice(offsets[t], offsets[t + 1])
            h_prev = h_run[:live]
            c_prev = None if c_run is None else c_run[:live]
            h_rec = h_prev if opts.recurrent_mask is None else h_prev * opts.recurrent_mask[:live]
            ln_cols = []
            if opts.ln_weight is None:
                hh = h_rec @ w_hh.t() if b_hh is None else torch.addmm(b_hh, h_rec, w_hh.t())
            else:
                a_hat, rstd = _layer_norm(h_rec @ w_hh.t())
                hh, ln_cols = a_hat * opts.ln_weight + opts.ln_bias, [a_hat, rstd]
                hh = hh if b_hh is None else hh + b_hh
            h, c, ws, cell_ln_cols = math.forward(
                xp[rows], hh, h_prev, c_prev, opts,
                None if known_gates is None else known_gates[rows].to(acc))
            c = _blend(c, c_prev, None if opts.zoneout_c is None else opts.zoneout_c[rows])
            if c is not None:
                ws.append(c)
            clip_cols = []
            if w_hr is not None:
                ws.append(h)
                h = h @ w_hr.t()
                if opts.proj_clip is not None:
                    clip_cols = [h]
                    h = h.clamp(-opts.proj_clip, opts.proj_clip)
            h = _blend(h, h_prev, None if opts.zoneout_h is None else opts.zoneout_h[rows])
            outputs[t] = h
            ws = ws + ln_cols + cell_ln_cols + clip_cols
            workspaces[t] = torch.cat(ws, 1) if ws else xp.new_empty(live, 0)
            h_run = torch.cat([h, h_run[live:]])
            if c_run is not None:
                c_run = torch.cat([c, c_run[live:]])
        if steps:
            output, workspace = torch.cat(outputs), torch.cat(workspaces)
        else:  # shapes as the fake impl promises
            hidden = w_hh.shape[0] // CELLS[cell].num_gates
            proj = 0 if w_hr is None else w_hr.shape[0]
            output = xp.new_empty(0, h0.shape[1])
            workspace = xp.new_empty(0, workspace_layout(cell, hidden, proj,
                                                         option_names(options))["width"].stop)
        dtype = xproj.dtype
        return (output.to(dtype), h_run.to(dtype),
                None if c_run is None else c_run.to(dtype), workspace)

    def backward(self, cell, grad_output, grad_h_n, grad_c_n, h0, c0, w_hh, b_hh, w_hr,
                 batch_sizes, reverse, output, workspace, options=None):
        math = CELL_MATH[cell]
        dtype = output.dtype
        acc = accumulate_dtype(dtype)
        opts = _in_dtype(options, acc)
        (grad_output, dh_run, dc_run, h0, c0, w_hh, w_hr, output, workspace) = _cast(
            acc, grad_output, grad_h_n, grad_c_n, h0, c0, w_hh, w_hr, output, workspace)
        hidden = w_hh.shape[0] // CELLS[cell].num_gates
        proj = 0 if w_hr is None else w_hr.shape[0]
        layout = workspace_layout(cell, hidden, proj, option_names(options))
        sizes, offsets = step_layout(output.shape[0], h0.shape[0], batch_sizes)
        steps = len(sizes)
        order = list(reversed(range(steps)) if reverse else range(steps))
        d_xp, d_hh, d_a = [None] * steps, [None] * steps, [None] * steps
        h_recs, d_outs = [None] * steps, [None] * steps
        cells = None if c0 is None else workspace[:, layout["c"]]
        sums = dict.fromkeys(LEARNABLE, 0)
        for t in reversed(order):
            live = sizes[t]
            rows = slice(offsets[t], offsets[t + 1])
            before = t + 1 if reverse else t - 1
            h_prev = _rows_before(output, h0, sizes, offsets, before, live)
            c_prev = None if c0 is None else _rows_before(cells, c0, sizes, offsets, before, live)
            cols = {name: workspace[rows, span] for name, span in layout.items()}
            d_out = grad_output[rows] + dh_run[:live]
            dc = None if dc_run is None else dc_run[:live]
            d_h_zoned = d_c_zoned = None
            if opts.zoneout_h is not None:
                zone = opts.zoneout_h[rows]
                d_out, d_h_zoned = (1 - zone) * d_out, zone * d_out
            if opts.zoneout_c is not None:
                zone = opts.zoneout_c[rows]
                dc, d_c_zoned = (1 - zone) * dc, zone * dc
            if w_hr is not None:
                if opts.proj_clip is not None:
                    d_out = d_out * (cols["p"].abs() <= opts.proj_clip).to(d_out.dtype)
                d_outs[t] = d_out
                d_h = d_out @ w_hr
            else:
                d_h = d_out
            d_xp[t], d_hh[t], d_h_direct, dc_prev = math.backward(
                d_h, dc, cols, h_prev, c_prev, output[rows], opts, sums)
            if opts.ln_weight is not None:
                sums["ln_weight"] = sums["ln_weight"] + (d_hh[t] * cols["a_hat"]).sum(0)
                sums["ln_bias"] = sums["ln_bias"] + d_hh[t].sum(0)
                d_a[t] = _layer_norm_backward(d_hh[t] * opts.ln_weight, cols["a_hat"],
                                              cols["rstd"])
            else:
                d_a[t] = d_hh[t]
            d_h_prev = d_a[t] @ w_hh
            if opts.recurrent_mask is not None:
                mask = opts.recurrent_mask[:live]
                d_h_prev, h_recs[t] = d_h_prev * mask, h_prev * mask
            else:
                h_recs[t] = h_prev
            for direct in (d_h_direct, d_h_zoned):
                if direct is not None:
                    d_h_prev = d_h_prev + direct
            if d_c_zoned is not None:
                dc_prev = dc_prev + d_c_zoned
            dh_run = torch.cat([d_h_prev, dh_run[live:]])
            if dc_run is not None:
                dc_run = torch.cat([dc_prev, dc_run[live:]])
        gates = w_hh.shape[0]
        if steps:
            grad_xproj = torch.cat(d_xp)
            grad_w_hh = torch.cat(d_a).t() @ torch.cat(h_recs)   # one GEMM over all steps
            grad_b_hh = torch.cat(d_hh).sum(0)
        else:
            grad_xproj = output.new_zeros(0, gates)
            grad_w_hh = torch.zeros_like(w_hh)
            grad_b_hh = w_hh.new_zeros(gates)
        grad_w_hr = None
        if w_hr is not None:
            grad_w_hr = (torch.cat(d_outs).t() @ workspace[:, layout["h_pre"]]
                         if steps else torch.zeros_like(w_hr))
        cast = lambda t: None if t is None else t.to(dtype)  # noqa: E731
        grads = (cast(grad_xproj), cast(dh_run), cast(dc_run), cast(grad_w_hh),
                 cast(grad_b_hh), cast(grad_w_hr))
        if options is None:
            return grads
        option_grads = []
        for name in LEARNABLE:
            param, value = getattr(options, name), sums[name]
            if param is not None and not isinstance(value, torch.Tensor):
                value = torch.zeros_like(param, dtype=acc)   # no steps
            option_grads.append(None if param is None else value.to(param.dtype))
        return grads + tuple(option_grads)


BACKEND = ReferenceBackend()
