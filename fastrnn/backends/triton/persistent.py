"""Persistent path: the whole time loop in ONE launch, recurrent weights held on chip.

Each program owns BLOCK_B batch rows for all T steps: it loads w_hh (and w_hr) once into
registers, keeps h and c in registers, and per step does the recurrent matmul with tl.dot
(float32, IEEE: half inputs are rounded only where they come in and go out), the gate math
and the stores. Batch rows are independent, so
programs never synchronise. Sequences of a packed batch are prefix-live rows: at step t only
rows < batch_sizes[t] update their state.

Backward runs the reverse time loop the same way and also accumulates the weight gradients
(d w_hh = sum_t d_hh_t.T @ h_prev_t, d b_hh, d w_hr) in registers; each program writes its
partial sums and the launcher adds them up (deterministic, no atomics).

It serves hidden sizes whose weight tiles fit (``fits``); the step path serves the rest.
"""
import torch
import triton
import triton.language as tl

from ._gates import (C_COL, H_PRE_COL, backward_cell, forward_cell, has_cell_state,
                     load_tiles, matmul, num_gates, store_tiles)
from .autotune import autotune


# ---------------------------------------------------------------- heuristics

# Weight elements (padded tiles of w_hh, plus w_hr) one program keeps in registers: LSTM/GRU
# up to H=64, RNN up to H=128. Compiled for sm_90 (ptxas -v): the LSTM H=64 forward fits in
# 84 registers/thread at 16 warps; its backward, which also holds the float32 weight-gradient
# tiles, spills ~1.7 KB at 8 warps. Larger weights go to the step path.
MAX_HELD_WEIGHTS = 16384
BLOCK_B = 16  # batch rows per program (tl.dot needs >= 16)


def _tile(size: int) -> int:
    return max(16, triton.next_power_of_2(size))


def fits(num_gates: int, hidden: int, proj: int) -> bool:
    """Whether the persistent kernels can hold the weights of this shape on chip."""
    held = num_gates * _tile(hidden) * _tile(proj or hidden)
    if proj:
        held += _tile(hidden) * _tile(proj)
    return held <= MAX_HELD_WEIGHTS


# The first config is the one the interpreter keeps.
_CONFIGS = [triton.Config({}, num_warps=8), triton.Config({}, num_warps=4),
            triton.Config({}, num_warps=16)]


# ---------------------------------------------------------------- forward kernel

@autotune(_CONFIGS, key=["H", "P", "CELL", "HAS_PROJ"])
@triton.jit
def _persistent_forward_kernel(
    xp_ptr,    # [N, G*H] input projection, packed time-major
    h0_ptr,    # [B, P]
    c0_ptr,    # [B, H] (lstm)
    w_ptr,     # [G*H, P] w_hh
    b_ptr,     # [G*H] b_hh (if HAS_BIAS)
    wr_ptr,    # [P, H] w_hr (if HAS_PROJ)
    bs_ptr,    # [T] int32 live rows per step
    off_ptr,   # [T] int32 first row of each step
    out_ptr,   # [N, P] out
    ws_ptr,    # [N, WS_STRIDE] out: workspace
    hn_ptr,    # [B, P] out
    cn_ptr,    # [B, H] out (lstm)
    T, B, H, P, WS_STRIDE,
    CELL: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_PROJ: tl.constexpr,
    REVERSE: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_P: tl.constexpr,
):
    G: tl.constexpr = num_gates(CELL)
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)[:, None]  # [BB, 1]
    ch = tl.arange(0, BLOCK_H)[None, :]                                  # hidden columns
    cp = tl.arange(0, BLOCK_P)[None, :]                                  # output columns
    in_batch = rows < B

    h = tl.load(h0_ptr + rows * P + cp, mask=in_batch & (cp < P), other=0.0).to(tl.float32)
    c = tl.zeros([BLOCK_B, BLOCK_H], dtype=tl.float32)
    if has_cell_state(CELL):
        c = tl.load(c0_ptr + rows * H + ch, mask=in_batch & (ch < H), other=0.0).to(tl.float32)

    # w_hh gate blocks in float32, transposed to [P, H] so that gate_g = h @ wt_g; zero padded.
    k = tl.arange(0, BLOCK_P)[:, None]
    wmask = (k < P) & (ch < H)
    wt0, wt1, wt2, wt3 = load_tiles(w_ptr + ch * P + k, H * P, wmask, G)
    b0 = tl.zeros([1, BLOCK_H], dtype=tl.float32)
    b1, b2, b3 = b0, b0, b0
    if HAS_BIAS:
        b0, b1, b2, b3 = load_tiles(b_ptr + ch, H, ch < H, G)
    # w_hr transposed to [H, P]: projected h = h_raw @ wrt
    wrt = wt0
    if HAS_PROJ:
        jh = tl.arange(0, BLOCK_H)[:, None]
        wrt = tl.load(wr_ptr + cp * H + jh, mask=(jh < H) & (cp < P), other=0.0).to(tl.float32)

    for s in range(0, T):
        t = T - 1 - s if REVERSE else s
        live = rows < tl.load(bs_ptr + t)
        row = tl.load(off_ptr + t) + rows
        m = live & (ch < H)
        xp = xp_ptr + row * (G * H) + ch

        x0, x1, x2, x3 = load_tiles(xp, H, m, G)
        r0 = matmul(h, wt0) + b0
        r1, r2, r3 = r0, r0, r0
        if G > 1:
            r1 = matmul(h, wt1) + b1
            r2 = matmul(h, wt2) + b2
        if G > 3:
            r3 = matmul(h, wt3) + b3
        c_new, h_new = forward_cell(CELL, x0, x1, x2, x3, r0, r1, r2, r3, c, h,
                                    ws_ptr + row * WS_STRIDE, ch, live, H, None, None, 0, 0.0,
                                    HAS_PROJ, 0)
        if has_cell_state(CELL):
            c = tl.where(live, c_new, c)
        if HAS_PROJ:
            h_new = matmul(h_new, wrt)
        tl.store(out_ptr + row * P + cp, h_new.to(out_ptr.dtype.element_ty),
                 mask=live & (cp < P))
        h = tl.where(live, h_new, h)

    tl.store(hn_ptr + rows * P + cp, h.to(hn_ptr.dtype.element_ty), mask=in_batch & (cp < P))
    if has_cell_state(CELL):
        tl.store(cn_ptr + rows * H + ch, c.to(cn_ptr.dtype.element_ty),
                 mask=in_batch & (ch < H))


# ---------------------------------------------------------------- backward kernel

@autotune(_CONFIGS, key=["H", "P", "CELL", "HAS_PROJ"])
@triton.jit
def _persistent_backward_kernel(
    gout_ptr,  # [N, P] grad_output
    ghn_ptr,   # [B, P] grad_h_n
    gcn_ptr,   # [B, H] grad_c_n (lstm)
    h0_ptr,    # [B, P]
    c0_ptr,    # [B, H] (lstm)
    w_ptr,     # [G*H, P] w_hh
    wr_ptr,    # [P, H] w_hr (if HAS_PROJ)
    bs_ptr,    # [T] int32 live rows per step
    off_ptr,   # [T] int32 first row of each step
    out_ptr,   # [N, P] forward output
    ws_ptr,    # [N, WS_STRIDE] forward workspace
    gx_ptr,    # [N, G*H] out: grad_xproj
    gh0_ptr,   # [B, P] out: grad_h0
    gc0_ptr,   # [B, H] out: grad_c0 (lstm)
    dw_ptr,    # [programs, G*H, P] float32 out: partial grad_w_hh
    db_ptr,    # [programs, G*H] float32 out: partial grad_b_hh
    dwr_ptr,   # [programs, P, H] float32 out: partial grad_w_hr (if HAS_PROJ)
    T, B, H, P, WS_STRIDE,
    CELL: tl.constexpr, HAS_PROJ: tl.constexpr, REVERSE: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_P: tl.constexpr,
):
    G: tl.constexpr = num_gates(CELL)
    pid = tl.program_id(0)
    rows = pid * BLOCK_B + tl.arange(0, BLOCK_B)[:, None]  # [BB, 1]
    ch = tl.arange(0, BLOCK_H)[None, :]
    cp = tl.arange(0, BLOCK_P)[None, :]
    in_batch = rows < B
    gty = gx_ptr.dtype.element_ty

    dh = tl.load(ghn_ptr + rows * P + cp, mask=in_batch & (cp < P), other=0.0).to(tl.float32)
    dc = tl.zeros([BLOCK_B, BLOCK_H], dtype=tl.float32)
    if has_cell_state(CELL):
        dc = tl.load(gcn_ptr + rows * H + ch, mask=in_batch & (ch < H), other=0.0).to(tl.float32)

    # w_hh gate blocks as [H, P] (d h_prev = d_hh_g @ w_g), zero padded
    j = tl.arange(0, BLOCK_H)[:, None]
    wmask = (j < H) & (cp < P)
    w0, w1, w2, w3 = load_tiles(w_ptr + j * P + cp, H * P, wmask, G)
    # w_hr as [P, H] (d h_raw = d_out @ w_hr)
    kp = tl.arange(0, BLOCK_P)[:, None]
    wrmask = (kp < P) & (ch < H)
    wr = w0
    if HAS_PROJ:
        wr = tl.load(wr_ptr + kp * H + ch, mask=wrmask, other=0.0).to(tl.float32)

    # weight-gradient accumulators, float32
    dw0 = tl.zeros([BLOCK_H, BLOCK_P], dtype=tl.float32)
    dw1, dw2, dw3 = dw0, dw0, dw0
    db0 = tl.zeros([BLOCK_H], dtype=tl.float32)
    db1, db2, db3 = db0, db0, db0
    dwr = tl.zeros([BLOCK_P, BLOCK_H], dtype=tl.float32)
    no_direct = tl.zeros([BLOCK_B, BLOCK_P], dtype=tl.float32)  # the cell's own direct part

    for s in range(0, T):
        t = s if REVERSE else T - 1 - s
        live = rows < tl.load(bs_ptr + t)
        row = tl.load(off_ptr + t) + rows
        m = live & (ch < H)
        mp = live & (cp < P)
        # state before this step: rows the previous step (in forward order) wrote, or h0/c0
        tp = t + 1 if REVERSE else t - 1
        tp_ok = (tp >= 0) & (tp < T)
        tpc = tl.minimum(tl.maximum(tp, 0), T - 1)
        from_prev = live & tp_ok & (rows < tl.load(bs_ptr + tpc))
        from_init = live & (from_prev == 0)
        prev_row = tl.load(off_ptr + tpc) + rows
        h_prev = (tl.load(out_ptr + prev_row * P + cp, mask=from_prev & (cp < P), other=0.0)
                  .to(tl.float32)
                  + tl.load(h0_ptr + rows * P + cp, mask=from_init & (cp < P), other=0.0)
                  .to(tl.float32))

        d_out = dh + tl.load(gout_ptr + row * P + cp, mask=mp, other=0.0).to(tl.float32)
        d_out = tl.where(mp, d_out, 0.0)
        ws = ws_ptr + row * WS_STRIDE + ch
        gx = gx_ptr + row * (G * H) + ch
        if HAS_PROJ:
            d_cell = matmul(d_out, wr)
            h_raw = tl.load(ws + H_PRE_COL * H, mask=m, other=0.0)
            dwr += matmul(tl.trans(d_out), h_raw)
        else:
            d_cell = d_out

        c_prev = dc
        if has_cell_state(CELL):
            c_prev = (tl.load(ws_ptr + prev_row * WS_STRIDE + C_COL * H + ch,
                              mask=from_prev & (ch < H), other=0.0)
                      + tl.load(c0_ptr + rows * H + ch, mask=from_init & (ch < H), other=0.0)
                      .to(tl.float32))
        da0, da1, da2, da3, dr0, dr1, dr2, dr3, dc_prev, direct = backward_cell(
            CELL, d_cell, no_direct, dc, c_prev, h_prev, out_ptr + row * P + ch,
            ws_ptr + row * WS_STRIDE, ch, live, H, None, None, rows, None, 0, 0.0, 0.0, 0)
        if has_cell_state(CELL):
            dc = tl.where(live, dc_prev, dc)

        store_tiles(gx, H, da0.to(gty), da1.to(gty), da2.to(gty), da3.to(gty), m, G)
        # gradients w.r.t. the recurrent pre-activations (zero on rows that are not live)
        dr0 = tl.where(m, dr0, 0.0)
        d_prev = direct + matmul(dr0, w0)
        dw0 += matmul(tl.trans(dr0), h_prev)
        db0 += tl.sum(dr0, axis=0)
        if G > 1:
            dr1 = tl.where(m, dr1, 0.0)
            dr2 = tl.where(m, dr2, 0.0)
            d_prev += matmul(dr1, w1) + matmul(dr2, w2)
            dw1 += matmul(tl.trans(dr1), h_prev)
            dw2 += matmul(tl.trans(dr2), h_prev)
            db1 += tl.sum(dr1, axis=0)
            db2 += tl.sum(dr2, axis=0)
        if G > 3:
            dr3 = tl.where(m, dr3, 0.0)
            d_prev += matmul(dr3, w3)
            dw3 += matmul(tl.trans(dr3), h_prev)
            db3 += tl.sum(dr3, axis=0)
        dh = tl.where(live, d_prev, dh)

    tl.store(gh0_ptr + rows * P + cp, dh.to(gh0_ptr.dtype.element_ty), mask=in_batch & (cp < P))
    if has_cell_state(CELL):
        tl.store(gc0_ptr + rows * H + ch, dc.to(gc0_ptr.dtype.element_ty),
                 mask=in_batch & (ch < H))
    # this program's partial weight gradients
    dw = dw_ptr + pid * (G * H * P) + j * P + cp
    db = db_ptr + pid * (G * H) + tl.arange(0, BLOCK_H)
    dbmask = tl.arange(0, BLOCK_H) < H
    store_tiles(dw, H * P, dw0, dw1, dw2, dw3, wmask, G)
    store_tiles(db, H, db0, db1, db2, db3, dbmask, G)
    if HAS_PROJ:
        tl.store(dwr_ptr + pid * (P * H) + kp * H + ch, dwr, mask=wrmask)


# ---------------------------------------------------------------- launchers

def forward(cell_id, xproj, h0, c0, w_hh, b_hh, w_hr, bs, offs, reverse, output, ws, h_n, c_n):
    """Fill output, ws, h_n, c_n. ``bs``/``offs``: int32 [T] live rows and first row per step."""
    B, P = h0.shape
    H = w_hh.shape[0] // num_gates(cell_id)
    grid = (triton.cdiv(B, BLOCK_B),)
    _persistent_forward_kernel[grid](
        xproj, h0, c0 if c0 is not None else h0, w_hh, b_hh if b_hh is not None else w_hh,
        w_hr if w_hr is not None else w_hh, bs, offs,
        output, ws, h_n, c_n if c_n is not None else h_n,
        bs.shape[0], B, H, P, ws.shape[1],
        CELL=cell_id, HAS_BIAS=b_hh is not None, HAS_PROJ=w_hr is not None,
        REVERSE=reverse, BLOCK_B=BLOCK_B, BLOCK_H=_tile(H), BLOCK_P=_tile(P))


def backward(cell_id, grad_output, grad_h_n, grad_c_n, h0, c0, w_hh, w_hr, bs, offs, reverse,
             output, ws):
    """-> (grad_xproj, grad_h0, grad_c0 or None, grad_w_hh f32, grad_b_hh f32, grad_w_hr f32)."""
    G = num_gates(cell_id)
    B, P = h0.shape
    H = w_hh.shape[0] // G
    N = output.shape[0]
    dev, dtype = output.device, output.dtype
    programs = triton.cdiv(B, BLOCK_B)
    grad_xproj = torch.empty(N, G * H, device=dev, dtype=dtype)
    grad_h0 = torch.empty(B, P, device=dev, dtype=dtype)
    grad_c0 = None if c0 is None else torch.empty(B, H, device=dev, dtype=dtype)
    dw = torch.empty(programs, G * H, P, device=dev, dtype=torch.float32)
    db = torch.empty(programs, G * H, device=dev, dtype=torch.float32)
    dwr = torch.empty(programs, P, H, device=dev, dtype=torch.float32) if w_hr is not None else dw
    _persistent_backward_kernel[(programs,)](
        grad_output, grad_h_n, grad_c_n if grad_c_n is not None else grad_h_n,
        h0, c0 if c0 is not None else h0, w_hh, w_hr if w_hr is not None else w_hh,
        bs, offs, output, ws, grad_xproj, grad_h0, grad_c0 if grad_c0 is not None else grad_h0,
        dw, db, dwr,
        bs.shape[0], B, H, P, ws.shape[1],
        CELL=cell_id, HAS_PROJ=w_hr is not None, REVERSE=reverse,
        BLOCK_B=BLOCK_B, BLOCK_H=_tile(H), BLOCK_P=_tile(P))
    return (grad_xproj, grad_h0, grad_c0, dw.sum(0), db.sum(0),
            dwr.sum(0) if w_hr is not None else None)
