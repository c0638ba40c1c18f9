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
contract for both directions (see fastrnn.ops). States, GEMMs and gate gradients are float32
for every input dtype (half weights are upcast once per call): rounding happens only where
tensors enter and leave, as in the reference and in oneDNN's half RNNs. (cuBLAS half GEMMs
with a float32 state would be faster on GPU; not done yet.)

The pointwise kernels update state tensors in place (each element read and written by the
same program), so they are launched with heuristic block sizes, not autotuned.
"""
import torch
import triton
import triton.language as tl

from ._gates import (GRU, LSTM, RNN_RELU, gru_backward, gru_forward, lstm_backward, lstm_forward,
                     rnn_backward, rnn_forward, store_gate_columns)


# ---------------------------------------------------------------- heuristics

def _blocks(rows: int, hidden: int):
    """Tile of BLOCK_B rows x BLOCK_H hidden units, at most 1K elements per program: the LSTM
    kernels then need ~126 registers/thread at 4 warps on sm_90 (ptxas), 2K would need 255."""
    block_h = min(triton.next_power_of_2(max(hidden, 1)), 128)
    block_b = min(triton.next_power_of_2(max(rows, 1)), max(1, 1024 // block_h))
    num_warps = max(1, min(4, block_b * block_h // 256))
    return block_b, block_h, num_warps


# ---------------------------------------------------------------- kernels

@triton.jit
def _step_forward_kernel(
    xp_ptr,    # [n, G*H] input projection rows of this step (input dtype)
    hh_ptr,    # [n, G*H] float32 h_prev @ w_hh.T, without bias
    b_ptr,     # [G*H] b_hh (read only if HAS_BIAS)
    h_ptr,     # [n, H] float32 hidden state: in h_prev (gru), out new h (no projection)
    c_ptr,     # [n, H] float32 cell state: in c_prev, out new c (lstm)
    ws_ptr,    # [n, WS_STRIDE] workspace rows of this step (float32 for half inputs)
    out_ptr,   # [n, H] output rows of this step (no projection)
    n, H, WS_STRIDE,
    CELL: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_PROJ: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)[:, None]
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)[None, :]
    mask = (rows < n) & (cols < H)
    G: tl.constexpr = 4 if CELL == LSTM else (3 if CELL == GRU else 1)
    xp = xp_ptr + rows * (G * H) + cols
    hh = hh_ptr + rows * (G * H) + cols
    ws = ws_ptr + rows * WS_STRIDE + cols
    state = rows * H + cols

    # gate g: input part x_g and recurrent part r_g (bias included), float32
    x0 = tl.load(xp, mask=mask, other=0.0).to(tl.float32)
    r0 = tl.load(hh, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        r0 += tl.load(b_ptr + cols, mask=cols < H, other=0.0).to(tl.float32)
    if G > 1:
        x1 = tl.load(xp + H, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(xp + 2 * H, mask=mask, other=0.0).to(tl.float32)
        r1 = tl.load(hh + H, mask=mask, other=0.0).to(tl.float32)
        r2 = tl.load(hh + 2 * H, mask=mask, other=0.0).to(tl.float32)
        if HAS_BIAS:
            r1 += tl.load(b_ptr + H + cols, mask=cols < H, other=0.0).to(tl.float32)
            r2 += tl.load(b_ptr + 2 * H + cols, mask=cols < H, other=0.0).to(tl.float32)

    if CELL == LSTM:
        x3 = tl.load(xp + 3 * H, mask=mask, other=0.0).to(tl.float32)
        r3 = tl.load(hh + 3 * H, mask=mask, other=0.0).to(tl.float32)
        if HAS_BIAS:
            r3 += tl.load(b_ptr + 3 * H + cols, mask=cols < H, other=0.0).to(tl.float32)
        c_prev = tl.load(c_ptr + state, mask=mask, other=0.0)
        i, f, g, o, c, h = lstm_forward(x0 + r0, x1 + r1, x2 + r2, x3 + r3, c_prev)
        store_gate_columns(ws, H, i, f, g, o, mask)
        tl.store(ws + 4 * H, c, mask=mask)
        tl.store(c_ptr + state, c, mask=mask)
        if HAS_PROJ:
            tl.store(ws + 5 * H, h, mask=mask)  # h before projection; the host projects it
    elif CELL == GRU:
        h_prev = tl.load(h_ptr + state, mask=mask, other=0.0).to(tl.float32)
        r, z, nn, h = gru_forward(x0, x1, x2, r0, r1, r2, h_prev)
        store_gate_columns(ws, H, r, z, nn, r2, mask)
    else:
        h = rnn_forward(x0 + r0, CELL == RNN_RELU)

    if not HAS_PROJ:
        tl.store(out_ptr + state, h.to(out_ptr.dtype.element_ty), mask=mask)
        tl.store(h_ptr + state, h.to(h_ptr.dtype.element_ty), mask=mask)


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
    dhh_ptr,    # [n, G*H] out (if STORE_DHH): grad w.r.t. h_prev @ w_hh.T + b_hh, float32
    ddir_ptr,   # [n, H] float32 out (gru): direct part of grad h_prev (may alias dh_ptr)
    n, H, WS_STRIDE,
    CELL: tl.constexpr, ADD_DOUT: tl.constexpr, STORE_DHH: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)[:, None]
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)[None, :]
    mask = (rows < n) & (cols < H)
    G: tl.constexpr = 4 if CELL == LSTM else (3 if CELL == GRU else 1)
    ws = ws_ptr + rows * WS_STRIDE + cols
    gx = gx_ptr + rows * (G * H) + cols
    state = rows * H + cols
    ty = gx_ptr.dtype.element_ty

    dh = tl.load(dh_ptr + state, mask=mask, other=0.0)
    if ADD_DOUT:
        dh += tl.load(dout_ptr + state, mask=mask, other=0.0).to(tl.float32)

    if CELL == LSTM:
        i = tl.load(ws, mask=mask, other=0.0)
        f = tl.load(ws + H, mask=mask, other=0.0)
        g = tl.load(ws + 2 * H, mask=mask, other=0.0)
        o = tl.load(ws + 3 * H, mask=mask, other=0.0)
        c = tl.load(ws + 4 * H, mask=mask, other=0.0)
        c_prev = tl.load(cprev_ptr + state, mask=mask, other=0.0)
        dc = tl.load(dc_ptr + state, mask=mask, other=0.0)
        dai, daf, dag, dao, dc_prev = lstm_backward(i, f, g, o, c, c_prev, dh, dc)
        tl.store(gx, dai.to(ty), mask=mask)
        tl.store(gx + H, daf.to(ty), mask=mask)
        tl.store(gx + 2 * H, dag.to(ty), mask=mask)
        tl.store(gx + 3 * H, dao.to(ty), mask=mask)
        tl.store(dc_ptr + state, dc_prev, mask=mask)
        if STORE_DHH:
            dhh = dhh_ptr + rows * (G * H) + cols
            tl.store(dhh, dai, mask=mask)
            tl.store(dhh + H, daf, mask=mask)
            tl.store(dhh + 2 * H, dag, mask=mask)
            tl.store(dhh + 3 * H, dao, mask=mask)
    elif CELL == GRU:
        r = tl.load(ws, mask=mask, other=0.0)
        z = tl.load(ws + H, mask=mask, other=0.0)
        nn = tl.load(ws + 2 * H, mask=mask, other=0.0)
        hn = tl.load(ws + 3 * H, mask=mask, other=0.0)
        h_prev = tl.load(hprev_ptr + state, mask=mask, other=0.0).to(tl.float32)
        dar, daz, dan, dhn, direct = gru_backward(r, z, nn, hn, h_prev, dh)
        tl.store(gx, dar.to(ty), mask=mask)
        tl.store(gx + H, daz.to(ty), mask=mask)
        tl.store(gx + 2 * H, dan.to(ty), mask=mask)
        dhh = dhh_ptr + rows * (G * H) + cols
        tl.store(dhh, dar, mask=mask)
        tl.store(dhh + H, daz, mask=mask)
        tl.store(dhh + 2 * H, dhn, mask=mask)
        tl.store(ddir_ptr + state, direct, mask=mask)
    else:
        h = tl.load(h_ptr + state, mask=mask, other=0.0).to(tl.float32)
        da = rnn_backward(h, dh, CELL == RNN_RELU)
        tl.store(gx, da.to(ty), mask=mask)
        if STORE_DHH:
            tl.store(dhh_ptr + rows * (G * H) + cols, da, mask=mask)


# ---------------------------------------------------------------- launchers

def _launch(kernel, n, hidden, *args, **meta):
    block_b, block_h, num_warps = _blocks(n, hidden)
    grid = (triton.cdiv(n, block_b), triton.cdiv(hidden, block_h))
    kernel[grid](*args, BLOCK_B=block_b, BLOCK_H=block_h, num_warps=num_warps, **meta)


def forward(cell_id, xproj, h0, c0, w_hh, b_hh, w_hr, sizes, offsets, reverse, output, ws):
    """Fill ``output`` [N, P] and ``ws`` [N, W]; return the final float32 (h, c) states."""
    H = w_hh.shape[0] // (4 if cell_id == LSTM else 3 if cell_id == GRU else 1)
    f32 = torch.float32
    h = h0.to(f32, copy=True)
    c = None if c0 is None else c0.to(f32, copy=True)
    w_t = w_hh.to(f32).t()
    wr_t = None if w_hr is None else w_hr.to(f32).t()
    dummy = ws
    for t in (reversed(range(len(sizes))) if reverse else range(len(sizes))):
        n, rows = sizes[t], slice(offsets[t], offsets[t + 1])
        hh = torch.mm(h[:n], w_t)
        _launch(_step_forward_kernel, n, H,
                xproj[rows], hh, dummy if b_hh is None else b_hh, h[:n],
                dummy if c is None else c[:n], ws[rows], output[rows],
                n, H, ws.shape[1],
                CELL=cell_id, HAS_BIAS=b_hh is not None, HAS_PROJ=w_hr is not None)
        if w_hr is not None:
            torch.mm(ws[rows, 5 * H:6 * H].to(f32), wr_t, out=h[:n])
            output[rows] = h[:n]
    return h, c


def backward(cell_id, grad_output, grad_h_n, grad_c_n, h_prev_all, c_prev_all, w_hh, w_hr,
             sizes, offsets, reverse, output, ws):
    """-> (grad_xproj, grad_h0 fp32, grad_c0 fp32 or None, d_hh_all, d_out_all or None).

    ``h_prev_all``/``c_prev_all`` [N, .]: every row's state before its step. The caller
    forms the weight gradients from d_hh_all (and d_out_all for the projection).
    """
    G = 4 if cell_id == LSTM else 3 if cell_id == GRU else 1
    H = w_hh.shape[0] // G
    N = output.shape[0]
    dtype = output.dtype
    grad_xproj = torch.empty(N, G * H, dtype=dtype, device=output.device)
    # gradients of the recurrent pre-activations stay float32 (half inputs lose too much
    # in the weight gradient otherwise); for float32 lstm/rnn they equal grad_xproj.
    store_dhh = cell_id == GRU or dtype != ws.dtype
    d_hh = torch.empty(N, G * H, dtype=ws.dtype, device=output.device) if store_dhh \
        else grad_xproj
    d_out_all = None if w_hr is None else torch.empty(N, w_hr.shape[0], dtype=torch.float32,
                                                      device=output.device)
    dh = grad_h_n.to(torch.float32, copy=True)
    dc = None if grad_c_n is None else grad_c_n.to(torch.float32, copy=True)
    w_hr32 = None if w_hr is None else w_hr.to(torch.float32)
    w32 = w_hh.to(torch.float32)
    dummy = ws
    for t in (range(len(sizes)) if reverse else reversed(range(len(sizes)))):
        n, rows = sizes[t], slice(offsets[t], offsets[t + 1])
        if w_hr is not None:
            d_out = torch.add(dh[:n], grad_output[rows], out=d_out_all[rows])
            dh_cell, dout = torch.mm(d_out, w_hr32), dummy
        else:
            dh_cell, dout = dh[:n], grad_output[rows]
        _launch(_step_backward_kernel, n, H,
                dh_cell, dout, ws[rows],
                dummy if cell_id != GRU else h_prev_all[rows],
                dummy if c_prev_all is None else c_prev_all[rows],
                output[rows], dummy if dc is None else dc[:n],
                grad_xproj[rows], d_hh[rows], dh[:n],
                n, H, ws.shape[1],
                CELL=cell_id, ADD_DOUT=w_hr is None, STORE_DHH=store_dhh)
        recurrent = torch.mm(d_hh[rows], w32)
        if cell_id == GRU:
            dh[:n] += recurrent  # the kernel stored the direct part z * dh
        else:
            dh[:n] = recurrent
    return grad_xproj, dh, dc, d_hh, d_out_all
