"""Gate math shared by every Triton kernel of the backend, as @triton.jit helpers.

The step kernels and the persistent kernels call these same functions, so one piece of math
serves both kernel shapes. Everything runs in float32. No libdevice: ``tanh`` and
``sigmoid`` are built from ``exp`` of a non-positive argument, so they never overflow for
large |x| (and work under TRITON_INTERPRET=1).

Conventions (match fastrnn.backends.reference):
- a* are pre-activations, d* gradients; the workspace holds activated gates.
- backward helpers take the gradient w.r.t. the cell's own h (before any projection);
  with CLIP they clamp the pre-activation gradients to +-clip (grad_clip).
"""
import triton
import triton.language as tl

from ... import spec
from ...spec import CELLS

# Cell ids: the CELL constexpr of every kernel, in spec order. Kernels may read only
# constexpr globals.
CELL_IDS = {name: index for index, name in enumerate(CELLS)}
LSTM = tl.constexpr(CELL_IDS["lstm"])
GRU = tl.constexpr(CELL_IDS["gru"])
RNN_RELU = tl.constexpr(CELL_IDS["rnn_relu"])
NUM_GATES = {name: cell.num_gates for name, cell in CELLS.items()}
_GATES_OF_ID = tl.constexpr(tuple(NUM_GATES.values()))
LAYER_NORM_EPS = tl.constexpr(spec.LAYER_NORM_EPS)
# Where lstm's own workspace columns c and h_pre start, in units of H (spec.workspace_layout:
# the cell's columns are whole multiples of H).
_LSTM_COLUMNS = spec.workspace_layout("lstm", 1, 1)
C_COL = tl.constexpr(_LSTM_COLUMNS["c"].start)
H_PRE_COL = tl.constexpr(_LSTM_COLUMNS["h_pre"].start)


@triton.constexpr_function
def num_gates(cell_id):
    """G of a CELL id, a compile-time constant in a kernel."""
    return _GATES_OF_ID.value[cell_id]


# What a kernel does around a cell's math (spec.Cell), per cell id.
_HAS_CELL_STATE = tl.constexpr(tuple(cell.has_cell_state for cell in CELLS.values()))
_DIRECT_H = tl.constexpr(tuple(cell.direct_h for cell in CELLS.values()))


@triton.constexpr_function
def has_cell_state(cell_id):
    """Whether cell CELL carries a cell state c (c0, c_n), a compile-time constant."""
    return _HAS_CELL_STATE.value[cell_id]


@triton.constexpr_function
def direct_h(cell_id):
    """Whether h_prev reaches h besides through w_hh (gru: z * h_prev), a compile-time
    constant: its forward reads h_prev, its backward has a direct part of dL/dh_prev."""
    return _DIRECT_H.value[cell_id]


# The options as the step kernels see them, all from the spec: OPTIONS, a constexpr bit mask
# of the options that are on (``option_bits``; ``on`` tests one); ``opt``, a tuple of every
# tensor option argument (``arg`` names its place; a dummy where absent); ``grads``, a tuple of
# the per-row gradients [rows, size] of the learnable ones (``learned``), whose column sums
# are their gradients. An option's kernel code is then its gate math here, nothing else.
_OPTION_BIT = tl.constexpr({option.name: k for k, option in enumerate(spec.OPTIONS)})
_ARG_INDEX = tl.constexpr({name: k for k, name in enumerate(spec.TENSOR_FIELDS)})
_LEARNED_INDEX = tl.constexpr({name: k for k, name in enumerate(spec.LEARNABLE)})


def option_bits(option_names) -> int:
    """The OPTIONS constexpr of the options named."""
    return sum(1 << k for name, k in _OPTION_BIT.value.items() if name in option_names)


@triton.constexpr_function
def on(OPTIONS, name):
    """Whether option ``name`` is on in the OPTIONS bit mask, a compile-time constant."""
    return (OPTIONS >> _OPTION_BIT.value[name]) & 1 == 1


@triton.constexpr_function
def arg(name):
    """The place of tensor option argument ``name`` in a kernel's ``opt`` tuple."""
    return _ARG_INDEX.value[name]


@triton.constexpr_function
def learned(name):
    """The place of learnable option argument ``name``'s per-row gradients in ``grads``."""
    return _LEARNED_INDEX.value[name]


@triton.jit
def sigmoid(x):
    # exp(-|x|) <= 1: no overflow; both branches are accurate in relative terms.
    e = tl.exp(-tl.abs(x))
    return tl.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


@triton.jit
def tanh(x):
    # The policy of the C++ kernels (csrc/activations.h): tanh(|x|) = (1 - e) / (1 + e) with
    # e = exp(-2|x|) <= 1 (no overflow), and the odd Taylor series below |x| = 0.3, where
    # 1 - e cancels. Every float32 is then within 2.1 ulp of float64 tanh (3.4 without
    # FMAs, as in the interpreter); a switch at 0.05 costs 5.5 ulp (17).
    ax = tl.abs(x)
    e = tl.exp(-2.0 * ax)
    big = (1.0 - e) / (1.0 + e)
    x2 = ax * ax
    small = ax + ax * x2 * (-1.0 / 3.0 + x2 * (2.0 / 15.0 + x2 * (
        -17.0 / 315.0 + x2 * (62.0 / 2835.0 + x2 * (-1382.0 / 155925.0)))))
    t = tl.where(ax < 0.3, small, big)
    return tl.where(x >= 0, t, -t)


@triton.jit
def clamp(x, limit):
    return tl.minimum(tl.maximum(x, -limit), limit)


@triton.jit
def matmul(a, b):
    """a @ b in float32, IEEE precision (no TF32, no half operands): the recurrence then
    carries no rounding beyond its inputs and outputs, for every input dtype."""
    return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")


# ---------------------------------------------------------------- workspace (op contract)

@triton.jit
def load_tile(ptr, cols, H):
    """A [1, BLOCK_H] tile of a per-unit vector (a gate's columns of a [G*H] one), float32."""
    return tl.load(ptr + cols, mask=cols < H, other=0.0).to(tl.float32)


@triton.jit
def load_tiles(ptr, H, mask, TILES: tl.constexpr):
    """The first TILES per-gate tiles at ptr + 0, H, 2H, 3H in float32 (the first stands in
    for the others)."""
    t0 = tl.load(ptr, mask=mask, other=0.0).to(tl.float32)
    t1, t2, t3 = t0, t0, t0
    if TILES > 1:
        t1 = tl.load(ptr + H, mask=mask, other=0.0).to(tl.float32)
        t2 = tl.load(ptr + 2 * H, mask=mask, other=0.0).to(tl.float32)
    if TILES > 3:
        t3 = tl.load(ptr + 3 * H, mask=mask, other=0.0).to(tl.float32)
    return t0, t1, t2, t3


@triton.jit
def store_tiles(ptr, H, t0, t1, t2, t3, mask, TILES: tl.constexpr):
    """The first TILES per-gate tiles at columns 0, H, 2H, 3H of ``ptr``; with TILES = 4 the
    workspace's gate columns (docs/op-contract.md): lstm i | f | g | o, gru r | z | n | hn."""
    tl.store(ptr, t0, mask=mask)
    if TILES > 1:
        tl.store(ptr + H, t1, mask=mask)
        tl.store(ptr + 2 * H, t2, mask=mask)
    if TILES > 3:
        tl.store(ptr + 3 * H, t3, mask=mask)


# ---------------------------------------------------------------- options (op contract)

@triton.jit
def zoneout(z, new, prev):
    """The zoned-out state: exactly this form, so that z = 1 keeps prev bit for bit."""
    return (1.0 - z) * new + z * prev


# Row reductions for layer norm: a row is split into up to four [BLOCK_B, BLOCK_H] tiles (one
# per gate) that together hold all of its columns; ``mask`` marks the real elements.

@triton.jit
def _row_sum(x0, x1, x2, x3, mask, TILES: tl.constexpr):
    """Sum over the real columns of the first TILES tiles, per row -> [BLOCK_B, 1]."""
    s = tl.sum(tl.where(mask, x0, 0.0), 1)
    if TILES > 1:
        s += tl.sum(tl.where(mask, x1, 0.0), 1)
    if TILES > 2:
        s += tl.sum(tl.where(mask, x2, 0.0), 1)
    if TILES > 3:
        s += tl.sum(tl.where(mask, x3, 0.0), 1)
    return s[:, None]


@triton.jit
def layer_norm_rows(a0, a1, a2, a3, mask, count, TILES: tl.constexpr):
    """-> (a_hat tiles, rstd [BLOCK_B, 1]): (a - mean) * rstd with the biased variance over
    the ``count`` real columns, eps spec.LAYER_NORM_EPS (two passes, all in registers)."""
    mean = _row_sum(a0, a1, a2, a3, mask, TILES) / count
    d0 = tl.where(mask, a0 - mean, 0.0)
    d1 = tl.where(mask, a1 - mean, 0.0)
    d2 = tl.where(mask, a2 - mean, 0.0)
    d3 = tl.where(mask, a3 - mean, 0.0)
    var = _row_sum(d0 * d0, d1 * d1, d2 * d2, d3 * d3, mask, TILES) / count
    rstd = 1.0 / tl.sqrt(var + LAYER_NORM_EPS)
    return d0 * rstd, d1 * rstd, d2 * rstd, d3 * rstd, rstd


@triton.jit
def layer_norm_rows_backward(g0, g1, g2, g3, x0, x1, x2, x3, rstd, mask, count,
                             TILES: tl.constexpr):
    """LNback(g, x_hat, rstd) = rstd * (g - mean(g) - x_hat * mean(g * x_hat)) per tile."""
    mean_g = _row_sum(g0, g1, g2, g3, mask, TILES) / count
    mean_gx = _row_sum(g0 * x0, g1 * x1, g2 * x2, g3 * x3, mask, TILES) / count
    return (rstd * (g0 - mean_g - x0 * mean_gx), rstd * (g1 - mean_g - x1 * mean_gx),
            rstd * (g2 - mean_g - x2 * mean_gx), rstd * (g3 - mean_g - x3 * mean_gx))


# ---------------------------------------------------------------- one step of a cell
# Each cell kind's math, forward and backward, is a branch of these two functions, which
# every kernel calls (the persistent ones with OPTIONS = 0 and None for opt, grads, state).
# A tile is [BLOCK_B, BLOCK_H]: rows ``live`` ([BLOCK_B, 1]), units ``cols``; ``ws_row``
# points at each row's workspace; a* are pre-activations, d* gradients.

@triton.jit
def forward_cell(CELL: tl.constexpr, x0, x1, x2, x3, r0, r1, r2, r3, c_prev, h_prev, ws_row,
                 cols, live, H, opt, state, LNC_OFF, cell_clip, HAS_PROJ: tl.constexpr,
                 OPTIONS: tl.constexpr):
    """x_k / r_k: gate k's input / recurrent (layer norm and bias included) pre-activation,
    c_prev: the cell state (has_cell_state), h_prev: h before the step (direct_h). Stores the
    cell's workspace columns -> (c: the new cell state, h: before projection and zoneout_h)."""
    mask = live & (cols < H)
    ws = ws_row + cols
    c = c_prev
    if CELL == LSTM:  # gates i, f, g, o; c = f c_prev + i g, h = o tanh(y), y = c after options
        p_i, p_f, p_o = _peephole_tiles(opt, cols, H, c_prev, OPTIONS)
        ai = x0 + r0
        af = x1 + r1
        if on(OPTIONS, "peephole"):  # Gers and Schmidhuber 2000: i, f see c_prev; o the new c
            ai += p_i * c_prev
            af += p_f * c_prev
        i = sigmoid(ai)
        f = sigmoid(af)
        g = tanh(x2 + r2)
        c = f * c_prev + i * g
        if on(OPTIONS, "cell_clip"):
            c = clamp(c, cell_clip)
        if on(OPTIONS, "peephole"):
            o = sigmoid(x3 + r3 + p_o * c)
        else:
            o = sigmoid(x3 + r3)
        y = c
        if on(OPTIONS, "layer_norm_cell"):
            c_hat, _, _, _, rstd_c = layer_norm_rows(c, c, c, c, mask, H, 1)
            tl.store(ws + LNC_OFF, c_hat, mask=mask)
            tl.store(ws_row + LNC_OFF + H, rstd_c, mask=live)
            y = (c_hat * load_tile(opt[arg("ln_c_weight")], cols, H)
                 + load_tile(opt[arg("ln_c_bias")], cols, H))
        h = o * tanh(y)
        if on(OPTIONS, "zoneout_c"):
            z_c = tl.load(opt[arg("zoneout_c")] + state, mask=mask, other=0.0).to(tl.float32)
            c = zoneout(z_c, c, c_prev)
        store_tiles(ws, H, i, f, g, o, mask, 4)
        tl.store(ws + C_COL * H, c, mask=mask)
        if HAS_PROJ:
            tl.store(ws + H_PRE_COL * H, h, mask=mask)  # h before projection
    elif CELL == GRU:  # gates r, z, n; hn = r2 (h_prev @ w_hn.T + b_hn) is kept for backward
        r = sigmoid(x0 + r0)
        z = sigmoid(x1 + r1)
        n = tanh(x2 + r * r2)
        h = (1.0 - z) * n + z * h_prev
        store_tiles(ws, H, r, z, n, r2, mask, 4)
    elif CELL == RNN_RELU:
        h = tl.maximum(x0 + r0, 0.0)
    else:
        h = tanh(x0 + r0)
    return c, h


@triton.jit
def _clip(x, limit, OPTIONS: tl.constexpr):
    """grad_clip of a pre-activation gradient."""
    if on(OPTIONS, "grad_clip"):
        x = clamp(x, limit)
    return x


@triton.jit
def backward_cell(CELL: tl.constexpr, dh, direct, dc, c_prev, h_prev, h_ptrs, ws_row, cols,
                  live, H, opt, grads, rows, state, LNC_OFF, cell_clip, grad_clip,
                  OPTIONS: tl.constexpr):
    """Backward of forward_cell: dh = dL/dh before the projection (zoneout_h's part split off
    into ``direct``), dc = dL/dc from later steps, h_ptrs: the step's output (the Elman cells'
    derivative is read off it) -> (dx_k: gate k's input pre-activation gradient, dr_k: its
    recurrent one (gru's n differs), dc_prev, direct: dL/dh_prev not through w_hh). The
    learnable options' per-row gradients go to ``grads``."""
    mask = live & (cols < H)
    ws = ws_row + cols
    dc_prev = dc
    if CELL == LSTM:
        i, f, g, o = load_tiles(ws, H, mask, 4)
        if on(OPTIONS, "zoneout_c"):
            z_c = tl.load(opt[arg("zoneout_c")] + state, mask=mask, other=0.0).to(tl.float32)
            dc_direct = z_c * dc
            dc = (1.0 - z_c) * dc
        if on(OPTIONS, "layer_norm_cell") or on(OPTIONS, "cell_clip") or on(OPTIONS, "zoneout_c"):
            c_raw = f * c_prev + i * g  # the workspace holds c_t, after clip and zoneout
        else:
            c_raw = tl.load(ws + C_COL * H, mask=mask, other=0.0)
        c = c_raw
        if on(OPTIONS, "cell_clip"):
            c = clamp(c_raw, cell_clip)
        y = c
        if on(OPTIONS, "layer_norm_cell"):
            c_hat = tl.load(ws + LNC_OFF, mask=mask, other=0.0)
            rstd_c = tl.load(ws_row + LNC_OFF + H, mask=live, other=0.0)
            w_c = load_tile(opt[arg("ln_c_weight")], cols, H)
            y = c_hat * w_c + load_tile(opt[arg("ln_c_bias")], cols, H)
        ty = tanh(y)
        dao = _clip(dh * ty * o * (1.0 - o), grad_clip, OPTIONS)
        dy = dh * o * (1.0 - ty * ty)
        if on(OPTIONS, "layer_norm_cell"):
            tl.store(grads[learned("ln_c_weight")] + state, dy * c_hat, mask=mask)
            tl.store(grads[learned("ln_c_bias")] + state, dy, mask=mask)
            dy, _, _, _ = layer_norm_rows_backward(dy * w_c, dy, dy, dy, c_hat, c_hat, c_hat,
                                                   c_hat, rstd_c, mask, H, 1)
        dc += dy  # dL/dc of the new c from every path, o's peephole too, masked by the clip
        p_i, p_f, p_o = _peephole_tiles(opt, cols, H, c_prev, OPTIONS)
        if on(OPTIONS, "peephole"):
            dc += dao * p_o
        if on(OPTIONS, "cell_clip"):
            dc = tl.where(tl.abs(c_raw) <= cell_clip, dc, 0.0)
        dx0 = _clip(dc * g * i * (1.0 - i), grad_clip, OPTIONS)
        dx1 = _clip(dc * c_prev * f * (1.0 - f), grad_clip, OPTIONS)
        dx2 = _clip(dc * i * (1.0 - g * g), grad_clip, OPTIONS)
        dc_prev = dc * f
        if on(OPTIONS, "peephole"):
            dc_prev += dx0 * p_i + dx1 * p_f
            store_tiles(grads[learned("peephole")] + rows * (3 * H) + cols, H, dx0 * c_prev,
                        dx1 * c_prev, dao * c, dao, mask, 3)
        if on(OPTIONS, "zoneout_c"):
            dc_prev += dc_direct
        dx3 = dao
        dr0, dr1, dr2, dr3 = dx0, dx1, dx2, dx3
    elif CELL == GRU:
        r, z, n, hn = load_tiles(ws, H, mask, 4)
        dx2 = _clip(dh * (1.0 - z) * (1.0 - n * n), grad_clip, OPTIONS)
        dx0 = _clip(dx2 * hn * r * (1.0 - r), grad_clip, OPTIONS)
        dx1 = _clip(dh * (h_prev - n) * z * (1.0 - z), grad_clip, OPTIONS)
        dx3 = dx2
        dr0, dr1, dr2, dr3 = dx0, dx1, dx2 * r, dx2 * r
        if on(OPTIONS, "zoneout_h"):
            direct += dh * z
        else:
            direct = dh * z
    else:
        h = tl.load(h_ptrs, mask=mask, other=0.0).to(tl.float32)
        if CELL == RNN_RELU:
            dx0 = tl.where(h > 0, dh, 0.0)
        else:
            dx0 = dh * (1.0 - h * h)
        dx1, dx2, dx3 = dx0, dx0, dx0
        dr0, dr1, dr2, dr3 = dx0, dx0, dx0, dx0
    return dx0, dx1, dx2, dx3, dr0, dr1, dr2, dr3, dc_prev, direct


@triton.jit
def _peephole_tiles(opt, cols, H, like, OPTIONS: tl.constexpr):
    """The peephole weight tiles p_i, p_f, p_o; without peepholes, ``like`` stands for them."""
    p_i, p_f, p_o = like, like, like
    if on(OPTIONS, "peephole"):
        p = opt[arg("peephole")]
        p_i = load_tile(p, cols, H)
        p_f = load_tile(p + H, cols, H)
        p_o = load_tile(p + 2 * H, cols, H)
    return p_i, p_f, p_o
