"""Step path: one recurrent GEMM (torch.mm, cuBLAS) + one fused pointwise kernel per step.

Serves any hidden size. Per step t with ``n`` live rows (the first n of the batch):

  forward   hh = h[:n] @ w_hh.T                                   (torch.mm)
            pointwise kernel: gates, c, h -> workspace, state, output
            [lstm with projection: output = h_raw @ w_hr.T          (torch.mm)]
  backward  [projection: d_out = dh[:n] + grad_output; dh_raw = d_out @ w_hr]
            pointwise kernel: gate gradients -> grad_xproj (+ d_hh for gru), dc state
            dh[:n] = d_hh @ w_hh (+ direct part for gru)          (torch.mm)
            after the loop: grad_w_hh = d_hh_all.T @ h_prev_all   (one GEMM over all steps)

State rows beyond n are left alone, which is exactly the packed-sequence semantics of the
contract for both directions (docs/op-contract.md). States, GEMMs and gate gradients are float32
for every input dtype (half weights are upcast once per call): rounding happens only where
tensors enter and leave, as in the reference and in oneDNN's half RNNs.

The options (docs/op-contract.md, fastrnn.spec) switch on constexpr branches of the same
kernels (the OPTIONS bit mask, _gates.on), so a call without options compiles none of their
code:

- layer norm of the recurrent pre-activation (over G*H columns) and of the cell state (over
  H): each program then holds whole rows (BLOCK_H >= H, one tile per gate), computes the row
  statistics in float32 in registers, and writes a_hat / rstd (c_hat / rstd_c) to the
  workspace; backward applies LNback in the same pass as the gate gradients;
- recurrent_mask: the kernel that finishes a step also writes h_t * mask, the next GEMM's
  input (``hrec``); backward multiplies the recurrent GEMM's result by the mask;
- zoneout, cell_clip, grad_clip: blends and clamps inside the pointwise kernels;
- options inside a cell's gate math: _gates.py's gate functions read their tensors from the
  kernels' ``opt`` tuple and write the per-row gradients of learnable ones to ``grads``,
  whose column sums after the loop are their gradients (the layer norms' too);
- with a projection, proj_clip and zoneout_h act on the projected h: a small epilogue kernel
  after the projection GEMM (forward) and prologue kernel before it (backward) do them.

The pointwise kernels update state tensors in place (each element read and written by the
same program), so they are launched with heuristic block sizes, not autotuned.
"""
import torch
import triton
import triton.language as tl

from ...spec import ARGS, CELLS, LEARNABLE, OPTIONS, dimension, option_names, whole_rows

from ._gates import (arg, backward_cell, clamp, direct_h, forward_cell, has_cell_state,
                     layer_norm_rows, layer_norm_rows_backward, learned, load_tiles, num_gates,
                     on, option_bits, store_tiles, zoneout)


# ---------------------------------------------------------------- heuristics

def _blocks(rows: int, hidden: int, whole_rows: bool = False):
    """Tile of BLOCK_B rows x BLOCK_H hidden units, at most 1K elements per program: the LSTM
    kernels then need ~126 registers/thread at 4 warps on sm_90 (ptxas), 2K would need 255.
    ``whole_rows`` (layer norm): BLOCK_H covers all H units, one program column; more warps
    for wide rows."""
    if whole_rows:
        block_h = triton.next_power_of_2(max(hidden, 1))
        block_b = min(triton.next_power_of_2(max(rows, 1)), max(1, 1024 // block_h))
        return block_b, block_h, max(1, min(16, block_b * block_h // 256))
    block_h = min(triton.next_power_of_2(max(hidden, 1)), 128)
    block_b = min(triton.next_power_of_2(max(rows, 1)), max(1, 1024 // block_h))
    num_warps = max(1, min(4, block_b * block_h // 256))
    return block_b, block_h, num_warps


# ---------------------------------------------------------------- kernels

# The kernels' pointer arguments that are float32 whatever the input dtype (states,
# workspace, gradients kept in float32), for compile_check's signatures.
FLOAT32_POINTERS = {"hh_ptr", "h_ptr", "c_ptr", "ws_ptr", "dh_ptr", "cprev_ptr", "dc_ptr",
                    "dhh_ptr", "ddir_ptr", "hrec_ptr", "da_ptr", "p_ptr", "dp_ptr"}


@triton.jit
def _step_forward_kernel(
    xp_ptr,    # [n, G*H] input projection rows of this step (input dtype)
    hh_ptr,    # [n, G*H] float32 h_rec @ w_hh.T, without bias
    b_ptr,     # [G*H] b_hh (read only if HAS_BIAS)
    h_ptr,     # [n, H] float32 hidden state: in h_prev (gru, zoneout), out h_t (no projection)
    c_ptr,     # [n, H] float32 cell state: in c_prev, out c_t (lstm)
    ws_ptr,    # [n, WS_STRIDE] workspace rows of this step (float32 for half inputs)
    out_ptr,   # [n, H] output rows of this step (no projection)
    hrec_ptr,  # [n, H] float32 out: h_t * recurrent_mask, the next GEMM's input
    opt,       # the tensor option arguments (_gates.arg), this step's rows of per-row ones
    n, H, WS_STRIDE, LN_OFF, LNC_OFF, cell_clip,
    CELL: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_PROJ: tl.constexpr,
    OPTIONS: tl.constexpr,  # the options that are on (_gates.on)
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr,
):
    rows, cols, mask, state = _tile(n, H, BLOCK_B, BLOCK_H)
    G: tl.constexpr = num_gates(CELL)
    xp = xp_ptr + rows * (G * H) + cols
    hh = hh_ptr + rows * (G * H) + cols
    ws = ws_ptr + rows * WS_STRIDE + cols

    # gate g: input part x_g and recurrent part r_g (layer norm and bias included), float32
    x0, x1, x2, x3 = load_tiles(xp, H, mask, G)
    r0, r1, r2, r3 = load_tiles(hh, H, mask, G)
    if on(OPTIONS, "layer_norm"):  # the program holds whole rows: BLOCK_H >= H
        r0, r1, r2, r3, rstd = layer_norm_rows(r0, r1, r2, r3, mask, G * H, G)
        store_tiles(ws + LN_OFF, H, r0, r1, r2, r3, mask, G)
        tl.store(ws_ptr + rows * WS_STRIDE + LN_OFF + G * H, rstd, mask=rows < n)
        r0, r1, r2, r3 = _affine_tiles(r0, r1, r2, r3, opt[arg("ln_weight")],
                                       opt[arg("ln_bias")], cols, H, G)
    if HAS_BIAS:
        b0, b1, b2, b3 = load_tiles(b_ptr + cols, H, cols < H, G)
        r0 += b0
        r1 += b1
        r2 += b2
        r3 += b3

    c_prev = x0  # placeholders where the cell reads no c_prev / h_prev
    h_prev = x0
    if has_cell_state(CELL):
        c_prev = tl.load(c_ptr + state, mask=mask, other=0.0)
    if direct_h(CELL) or on(OPTIONS, "zoneout_h"):
        h_prev = tl.load(h_ptr + state, mask=mask, other=0.0).to(tl.float32)
    c, h = forward_cell(CELL, x0, x1, x2, x3, r0, r1, r2, r3, c_prev, h_prev,
                        ws_ptr + rows * WS_STRIDE, cols, rows < n, H, opt, state, LNC_OFF,
                        cell_clip, HAS_PROJ, OPTIONS)
    if has_cell_state(CELL):
        tl.store(c_ptr + state, c, mask=mask)

    if not HAS_PROJ:
        if on(OPTIONS, "zoneout_h"):
            z_h = tl.load(opt[arg("zoneout_h")] + state, mask=mask, other=0.0).to(tl.float32)
            h = zoneout(z_h, h, h_prev)
        tl.store(out_ptr + state, h.to(out_ptr.dtype.element_ty), mask=mask)
        tl.store(h_ptr + state, h.to(h_ptr.dtype.element_ty), mask=mask)
        if on(OPTIONS, "recurrent_mask"):
            keep = tl.load(opt[arg("recurrent_mask")] + state, mask=mask, other=0.0)
            tl.store(hrec_ptr + state, h * keep.to(tl.float32), mask=mask)


@triton.jit
def _step_backward_kernel(
    dh_ptr,     # [n, H] float32 grad w.r.t. this step's h (carried state, or dh_raw)
    dout_ptr,   # [n, H] grad_output rows, added to dh if ADD_DOUT
    ws_ptr,     # [n, WS_STRIDE] workspace rows of this step
    hprev_ptr,  # [n, H] h before this step (gru)
    cprev_ptr,  # [n, H] float32 c before this step (lstm)
    h_ptr,      # [n, H] output rows of this step (rnn: the derivative is read off h)
    dc_ptr,     # [n, H] float32 cell grad: in from later steps, out w.r.t. c_prev (lstm)
    gx_ptr,     # [n, G*H] out: grad_xproj rows (input dtype)
    dhh_ptr,    # [n, G*H] out (if STORE_DHH): grad w.r.t. the recurrent pre-activation, f32
    ddir_ptr,   # [n, H] float32 out (gru, zoneout_h): direct part of grad h_prev (may alias dh)
    da_ptr,     # [n, G*H] float32 out (layer_norm): LNback of d_hh, the operand of both GEMMs
    opt,        # the tensor option arguments, as in forward (zoneout_h: no projection)
    grads,      # float32 out: the learnable option arguments' per-row gradients (_gates.learned)
    n, H, WS_STRIDE, LN_OFF, LNC_OFF, cell_clip, grad_clip,
    CELL: tl.constexpr, ADD_DOUT: tl.constexpr, STORE_DHH: tl.constexpr,
    OPTIONS: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr,
):
    rows, cols, mask, state = _tile(n, H, BLOCK_B, BLOCK_H)
    G: tl.constexpr = num_gates(CELL)
    ty = gx_ptr.dtype.element_ty

    dh = tl.load(dh_ptr + state, mask=mask, other=0.0)
    if ADD_DOUT:
        dh += tl.load(dout_ptr + state, mask=mask, other=0.0).to(tl.float32)
    direct = dh  # zoneout: the part of dh that goes straight to h_prev
    if on(OPTIONS, "zoneout_h"):
        z_h = tl.load(opt[arg("zoneout_h")] + state, mask=mask, other=0.0).to(tl.float32)
        direct = z_h * dh
        dh = (1.0 - z_h) * dh

    c_prev = dh  # placeholders where the cell reads no c / h_prev
    dc = dh
    h_prev = dh
    if has_cell_state(CELL):
        c_prev = tl.load(cprev_ptr + state, mask=mask, other=0.0)
        dc = tl.load(dc_ptr + state, mask=mask, other=0.0)
    if direct_h(CELL):
        h_prev = tl.load(hprev_ptr + state, mask=mask, other=0.0).to(tl.float32)
    dx0, dx1, dx2, dx3, dr0, dr1, dr2, dr3, dc, direct = backward_cell(
        CELL, dh, direct, dc, c_prev, h_prev, h_ptr + state, ws_ptr + rows * WS_STRIDE, cols,
        rows < n, H, opt, grads, rows, state, LNC_OFF, cell_clip, grad_clip, OPTIONS)
    store_tiles(gx_ptr + rows * (G * H) + cols, H, dx0.to(ty), dx1.to(ty), dx2.to(ty),
                dx3.to(ty), mask, G)
    if has_cell_state(CELL):
        tl.store(dc_ptr + state, dc, mask=mask)
    if direct_h(CELL) or on(OPTIONS, "zoneout_h"):
        tl.store(ddir_ptr + state, direct, mask=mask)
    if STORE_DHH:
        store_tiles(dhh_ptr + rows * (G * H) + cols, H, dr0, dr1, dr2, dr3, mask, G)
    if on(OPTIONS, "layer_norm"):
        _layer_norm_backward(da_ptr, ws_ptr, opt, grads, rows, cols, mask, dr0, dr1, dr2, dr3,
                             n, H, WS_STRIDE, LN_OFF, G)


@triton.jit
def _proj_epilogue_kernel(
    p_ptr,      # [n, P] float32 h_pre @ w_hr.T
    h_ptr,      # [n, P] float32 hidden state: in h_prev, out h_t
    out_ptr,    # [n, P] output rows of this step
    ws_ptr,     # [n, WS_STRIDE] workspace rows (proj_clip: p goes to column P_OFF)
    hrec_ptr,   # [n, P] float32 out: h_t * recurrent_mask
    opt,        # the tensor option arguments, as in the step kernels
    n, H, WS_STRIDE, P_OFF, proj_clip,
    OPTIONS: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """Forward of a projected lstm step after the projection GEMM (H here is P)."""
    rows, cols, mask, state = _tile(n, H, BLOCK_B, BLOCK_H)
    h = tl.load(p_ptr + state, mask=mask, other=0.0)
    if on(OPTIONS, "proj_clip"):
        tl.store(ws_ptr + rows * WS_STRIDE + P_OFF + cols, h, mask=mask)
        h = clamp(h, proj_clip)
    if on(OPTIONS, "zoneout_h"):
        z_h = tl.load(opt[arg("zoneout_h")] + state, mask=mask, other=0.0).to(tl.float32)
        h = zoneout(z_h, h, tl.load(h_ptr + state, mask=mask, other=0.0))
    tl.store(out_ptr + state, h.to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(h_ptr + state, h, mask=mask)
    if on(OPTIONS, "recurrent_mask"):
        keep = tl.load(opt[arg("recurrent_mask")] + state, mask=mask, other=0.0)
        tl.store(hrec_ptr + state, h * keep.to(tl.float32), mask=mask)


@triton.jit
def _proj_prologue_kernel(
    dh_ptr,     # [n, P] float32 carried grad of h_t: in; out its direct part (zoneout_h)
    dout_ptr,   # [n, P] grad_output rows
    ws_ptr,     # [n, WS_STRIDE] workspace rows (proj_clip: p at column P_OFF)
    dp_ptr,     # [n, P] float32 out: grad w.r.t. p = h_pre @ w_hr.T
    opt,        # the tensor option arguments, as in the step kernels
    n, H, WS_STRIDE, P_OFF, proj_clip,
    OPTIONS: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """Backward of a projected lstm step before the projection GEMM (H here is P)."""
    rows, cols, mask, state = _tile(n, H, BLOCK_B, BLOCK_H)
    d = tl.load(dh_ptr + state, mask=mask, other=0.0)
    d += tl.load(dout_ptr + state, mask=mask, other=0.0).to(tl.float32)
    if on(OPTIONS, "zoneout_h"):
        z_h = tl.load(opt[arg("zoneout_h")] + state, mask=mask, other=0.0).to(tl.float32)
        tl.store(dh_ptr + state, z_h * d, mask=mask)
        d = (1.0 - z_h) * d
    if on(OPTIONS, "proj_clip"):
        p = tl.load(ws_ptr + rows * WS_STRIDE + P_OFF + cols, mask=mask, other=0.0)
        d = tl.where(tl.abs(p) <= proj_clip, d, 0.0)
    tl.store(dp_ptr + state, d, mask=mask)


# ---------------------------------------------------------------- helpers of the kernels

@triton.jit
def _tile(n, H, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr):
    """This program's rows [BLOCK_B, 1] and units [1, BLOCK_H] of an [n, H] state, the mask
    of the real ones and their offsets in the state."""
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)[:, None]
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)[None, :]
    return rows, cols, (rows < n) & (cols < H), rows * H + cols


@triton.jit
def _affine_tiles(t0, t1, t2, t3, w_ptr, b_ptr, cols, H, TILES: tl.constexpr):
    """t_g * w[gH + cols] + b[gH + cols] for the first TILES gates."""
    w0, w1, w2, w3 = load_tiles(w_ptr + cols, H, cols < H, TILES)
    b0, b1, b2, b3 = load_tiles(b_ptr + cols, H, cols < H, TILES)
    return t0 * w0 + b0, t1 * w1 + b1, t2 * w2 + b2, t3 * w3 + b3


@triton.jit
def _layer_norm_backward(da_ptr, ws_ptr, opt, grads, rows, cols, mask, d0, d1, d2, d3,
                         n, H, WS_STRIDE, LN_OFF, G: tl.constexpr):
    """da = LNback(d_hh * ln_weight, a_hat, rstd) over the G*H columns of whole rows; the
    per-row gradients of ln_weight (d_hh * a_hat) and ln_bias (d_hh) to ``grads``."""
    a0, a1, a2, a3 = load_tiles(ws_ptr + rows * WS_STRIDE + LN_OFF + cols, H, mask, G)
    rstd = tl.load(ws_ptr + rows * WS_STRIDE + LN_OFF + G * H, mask=rows < n, other=0.0)
    row = rows * (G * H) + cols
    store_tiles(grads[learned("ln_weight")] + row, H, d0 * a0, d1 * a1, d2 * a2, d3 * a3, mask, G)
    store_tiles(grads[learned("ln_bias")] + row, H, d0, d1, d2, d3, mask, G)
    w0, w1, w2, w3 = load_tiles(opt[arg("ln_weight")] + cols, H, cols < H, G)
    t0, t1, t2, t3 = layer_norm_rows_backward(d0 * w0, d1 * w1, d2 * w2, d3 * w3, a0, a1, a2,
                                              a3, rstd, mask, G * H, G)
    store_tiles(da_ptr + row, H, t0, t1, t2, t3, mask, G)


# ---------------------------------------------------------------- launchers

_TENSOR_ARGS = tuple(a for a in ARGS if a.type == "Tensor")
_PROJECTED = tuple(o.name for o in OPTIONS if o.on_projection)


def step_bits(names, proj):
    """The step kernels' OPTIONS: with a projection, the options on the projected h are the
    epilogue's / prologue's (spec Option.on_projection)."""
    return option_bits(tuple(name for name in names if not (proj and name in _PROJECTED)))


def _option_tensors(options, rows, n, dummy):
    """The kernels' ``opt`` tuple for one step: every tensor option argument in spec order,
    this step's rows of a per-row one ([N, ...]), the live rows of a per-state one ([B, ...]),
    ``dummy`` where absent."""
    values = []
    for a in _TENSOR_ARGS:
        value = getattr(options, a.name, None)
        values.append(dummy if value is None else value[rows] if a.shape[0] == "N"
                      else value[:n] if a.shape[0] == "B" else value)
    return tuple(values)


def _launch(kernel, n, hidden, *args, whole_rows=False, **meta):
    block_b, block_h, num_warps = _blocks(n, hidden, whole_rows)
    grid = (triton.cdiv(n, block_b), triton.cdiv(hidden, block_h))
    kernel[grid](*args, BLOCK_B=block_b, BLOCK_H=block_h, num_warps=num_warps, **meta)


def _rows(tensor, rows, dummy):
    """``tensor[rows]`` of an optional tensor (a kernel argument that is not read: dummy)."""
    return dummy if tensor is None else tensor[rows]


def _offset(layout, name):
    return 0 if layout is None or name not in layout else layout[name].start


def forward(cell_id, xproj, h0, c0, w_hh, b_hh, w_hr, sizes, offsets, reverse, output, ws,
            options=None, layout=None):
    """Fill ``output`` [N, P] and ``ws`` [N, W]; return the final float32 (h, c) states.
    ``options``: a StepOptions (fastrnn.spec) or None; ``layout``: its workspace columns
    (fastrnn.spec.workspace_layout)."""
    H = w_hh.shape[0] // num_gates(cell_id)
    f32 = torch.float32
    h = h0.to(f32, copy=True)
    c = None if c0 is None else c0.to(f32, copy=True)
    w_t = w_hh.to(f32).t()
    wr_t = None if w_hr is None else w_hr.to(f32).t()
    dummy = ws
    keep = getattr(options, "recurrent_mask", None)
    cell_clip, proj_clip = getattr(options, "cell_clip", None), getattr(options, "proj_clip", None)
    proj = w_hr is not None
    h_rec = None if keep is None else h * keep.to(f32)  # what the recurrent GEMM sees
    names = option_names(options)
    meta = dict(CELL=cell_id, HAS_BIAS=b_hh is not None, HAS_PROJ=proj,
                OPTIONS=step_bits(names, proj))
    # with a projection, the epilogue kernel does the mask and the options on the projected h
    epilogue = proj and (keep is not None or any(name in _PROJECTED for name in names))
    for t in (reversed(range(len(sizes))) if reverse else range(len(sizes))):
        n, rows = sizes[t], slice(offsets[t], offsets[t + 1])
        opt = _option_tensors(options, rows, n, dummy)
        hh = torch.mm((h if h_rec is None else h_rec)[:n], w_t)
        _launch(_step_forward_kernel, n, H,
                xproj[rows], hh, dummy if b_hh is None else b_hh, h[:n],
                dummy if c is None else c[:n], ws[rows], output[rows],
                _rows(h_rec, slice(0, n), dummy), opt,
                n, H, ws.shape[1], _offset(layout, "a_hat"), _offset(layout, "c_hat"),
                float(cell_clip or 0.0), whole_rows=whole_rows(names), **meta)
        if epilogue:
            p = torch.mm(ws[rows, layout["h_pre"]].to(f32), wr_t)
            _launch(_proj_epilogue_kernel, n, p.shape[1],
                    p, h[:n], output[rows], ws[rows], _rows(h_rec, slice(0, n), dummy), opt,
                    n, p.shape[1], ws.shape[1], _offset(layout, "p"), float(proj_clip or 0.0),
                    OPTIONS=option_bits(names))
        elif proj:
            torch.mm(ws[rows, layout["h_pre"]].to(f32), wr_t, out=h[:n])
            output[rows] = h[:n]
    return h, c


def backward(cell_id, grad_output, grad_h_n, grad_c_n, h_prev_all, c_prev_all, w_hh, w_hr,
             sizes, offsets, reverse, output, ws, options=None, layout=None):
    """-> (grad_xproj, grad_h0 fp32, grad_c0 fp32 or None, d_hh_all, d_a_all,
    d_out_all or None, rows).

    ``h_prev_all``/``c_prev_all`` [N, .]: every row's state before its step. The caller
    forms the weight gradients: d_a_all is the GEMM operand (LNback of d_hh_all with layer
    norm, else d_hh_all itself), d_out_all the gradient of the projection's output, ``rows``
    maps each learnable option argument that is on (spec.LEARNABLE) to its per-row
    gradients [N, size], whose column sums are its gradient.
    """
    G = num_gates(cell_id)
    H = w_hh.shape[0] // G
    N = output.shape[0]
    dtype, dev, f32 = output.dtype, output.device, torch.float32
    kind = list(CELLS.values())[cell_id]
    grad_xproj = torch.empty(N, G * H, dtype=dtype, device=dev)
    # gradients of the recurrent pre-activations stay float32 (half inputs lose too much
    # in the weight gradient otherwise); for float32 lstm/rnn they equal grad_xproj.
    store_dhh = kind.recurrent_grad or dtype != ws.dtype
    d_hh = torch.empty(N, G * H, dtype=ws.dtype, device=dev) if store_dhh else grad_xproj
    d_out_all = None if w_hr is None else torch.empty(N, w_hr.shape[0], dtype=f32, device=dev)
    dh = grad_h_n.to(f32, copy=True)
    dc = None if grad_c_n is None else grad_c_n.to(f32, copy=True)
    w_hr32 = None if w_hr is None else w_hr.to(f32)
    w32 = w_hh.to(f32)
    dummy = ws
    get = lambda name: getattr(options, name, None)  # noqa: E731
    keep, z_h = get("recurrent_mask"), get("zoneout_h")
    proj_clip = get("proj_clip")
    proj = w_hr is not None
    d_a = d_hh if get("ln_weight") is None else torch.empty(N, G * H, dtype=f32, device=dev)
    rows_all = {a.name: torch.empty(N, dimension(a.shape[0], {"G": G, "H": H}), dtype=f32,
                                    device=dev)
                for a in ARGS if a.learnable and get(a.name) is not None}
    keep32 = None if keep is None else keep.to(f32)
    names = option_names(options)
    meta = dict(CELL=cell_id, ADD_DOUT=not proj, STORE_DHH=store_dhh,
                OPTIONS=step_bits(names, proj))
    # with a projection, the prologue kernel does the options on the projected h
    prologue = proj and any(name in _PROJECTED for name in names)
    # dh[:n] holds a direct part of grad h_prev after the kernels: gru's z * dh, zoneout's
    has_direct = kind.direct_h or z_h is not None
    for t in (range(len(sizes)) if reverse else reversed(range(len(sizes)))):
        n, rows = sizes[t], slice(offsets[t], offsets[t + 1])
        opt = _option_tensors(options, rows, n, dummy)
        if prologue:
            _launch(_proj_prologue_kernel, n, w_hr.shape[0],
                    dh[:n], grad_output[rows], ws[rows], d_out_all[rows], opt,
                    n, w_hr.shape[0], ws.shape[1], _offset(layout, "p"),
                    float(proj_clip or 0.0), OPTIONS=option_bits(names))
            dh_cell, dout = torch.mm(d_out_all[rows], w_hr32), dummy
        elif proj:
            d_out = torch.add(dh[:n], grad_output[rows], out=d_out_all[rows])
            dh_cell, dout = torch.mm(d_out, w_hr32), dummy
        else:
            dh_cell, dout = dh[:n], grad_output[rows]
        _launch(_step_backward_kernel, n, H,
                dh_cell, dout, ws[rows],
                h_prev_all[rows],
                dummy if c_prev_all is None else c_prev_all[rows],
                output[rows], dummy if dc is None else dc[:n],
                grad_xproj[rows], d_hh[rows], dh[:n], d_a[rows], opt,
                tuple(rows_all[name][rows] if name in rows_all else dummy for name in LEARNABLE),
                n, H, ws.shape[1], _offset(layout, "a_hat"), _offset(layout, "c_hat"),
                float(get("cell_clip") or 0.0), float(get("grad_clip") or 0.0),
                whole_rows=whole_rows(names), **meta)
        recurrent = torch.mm(d_a[rows], w32)
        if keep32 is not None:  # the mask scales the GEMM's part only, not the direct one
            if has_direct:
                dh[:n].addcmul_(recurrent, keep32[:n])
            else:
                torch.mul(recurrent, keep32[:n], out=dh[:n])
        elif has_direct:
            dh[:n] += recurrent  # the kernels stored the direct part
        else:
            dh[:n] = recurrent
    return grad_xproj, dh, dc, d_hh, d_a, d_out_all, rows_all
