"""Hand-written reference loops of the options (the contract: docs/op-contract.md).

Plain PyTorch autograd, no fastrnn code: one step of a LayerNorm / recurrent-dropout /
zoneout / clipped LSTM or GRU, a direction of a layer over one sequence, a whole stacked
(bidirectional, packed) module run sequence by sequence on each sequence's own length, a cell
step, and the masks the modules draw, in the documented order. The gradients come from
autograd; recurrent_grad_clip is the one piece autograd cannot express, so it is a custom
Function: identity forward, gradient clamped backward, on every gate pre-activation right
before its nonlinearity.
"""
import torch
import torch.nn.functional as F

LAYER_NORM_EPS = 1e-5
NUM_GATES = {"lstm": 4, "gru": 3}


class _ClipGrad(torch.autograd.Function):
    """Identity forward; the incoming gradient clamped to [-limit, limit] backward."""

    @staticmethod
    def forward(ctx, x, limit):
        ctx.limit = limit
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad.clamp(-ctx.limit, ctx.limit), None


def clip_grad(x, limit):
    return x if limit is None else _ClipGrad.apply(x, limit)


def normalize(x):
    """(x_hat, rstd) over the last dimension, biased variance, eps 1e-5 (as F.layer_norm)."""
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    rstd = 1 / torch.sqrt(var + LAYER_NORM_EPS)
    return (x - mean) * rstd, rstd


def layer_norm(x, weight, bias, record=None, names=("a_hat", "rstd")):
    """x_hat * weight + bias; record[names] = (x_hat, rstd) when a record is kept."""
    x_hat, rstd = normalize(x)
    if record is not None:
        record[names[0]], record[names[1]] = x_hat, rstd
    return x_hat * weight + bias


def zoneout(new, prev, z):
    """The spec's exact form, so z == 1 keeps prev bit for bit."""
    return new if z is None else (1 - z) * new + z * prev


def recurrent_preactivation(h_prev, w_hh, b_hh, ln_hh, rec_mask, record=None):
    """LN(h_rec @ w_hh.T) + b_hh with h_rec = h_prev * mask (the mask feeds the GEMM only)."""
    h_rec = h_prev if rec_mask is None else h_prev * rec_mask
    hh = h_rec @ w_hh.T
    if ln_hh is not None:
        hh = layer_norm(hh, *ln_hh, record)
    return hh if b_hh is None else hh + b_hh


def lstm_step(xp, h_prev, c_prev, w_hh, b_hh=None, w_hr=None, *, ln_hh=None, ln_c=None,
              rec_mask=None, z_h=None, z_c=None, cell_clip=None, proj_clip=None,
              grad_clip=None, peephole=None, record=None):
    """One LSTM step on [rows, ...]: returns the carried (h_t, c_t).
    ln_hh / ln_c: (weight, bias) pairs or None; masks broadcast against the rows.
    peephole: [3H] diagonal weights (p_i, p_f, p_o): c_prev feeds i and f, the new c feeds o
    (Gers and Schmidhuber 2000). The gradient clip sits on each gate's whole pre-activation.
    record: a dict that receives the contract's workspace columns of the step (by name)."""
    hh = recurrent_preactivation(h_prev, w_hh, b_hh, ln_hh, rec_mask, record)
    a_i, a_f, a_g, a_o = (xp + hh).chunk(4, -1)
    if peephole is not None:
        p_i, p_f, p_o = peephole.chunk(3, -1)
        a_i, a_f = a_i + p_i * c_prev, a_f + p_f * c_prev
    i, f = torch.sigmoid(clip_grad(a_i, grad_clip)), torch.sigmoid(clip_grad(a_f, grad_clip))
    g = torch.tanh(clip_grad(a_g, grad_clip))
    c_new = f * c_prev + i * g
    if cell_clip is not None:
        c_new = c_new.clamp(-cell_clip, cell_clip)
    if peephole is not None:
        a_o = a_o + p_o * c_new
    o = torch.sigmoid(clip_grad(a_o, grad_clip))
    y = c_new if ln_c is None else layer_norm(c_new, *ln_c, record, ("c_hat", "rstd_c"))
    h_new = o * torch.tanh(y)
    if record is not None:
        record["gates"] = torch.cat([i, f, g, o], -1)
    if w_hr is not None:
        if record is not None:
            record["h_pre"] = h_new
        h_new = h_new @ w_hr.T
        if record is not None and proj_clip is not None:
            record["p"] = h_new
        if proj_clip is not None:
            h_new = h_new.clamp(-proj_clip, proj_clip)
    h_t, c_t = zoneout(h_new, h_prev, z_h), zoneout(c_new, c_prev, z_c)
    if record is not None:
        record["c"] = c_t
    return h_t, c_t


def gru_step(xp, h_prev, w_hh, b_hh=None, *, ln_hh=None, rec_mask=None, z_h=None,
             grad_clip=None, record=None):
    """One GRU step on [rows, ...]: returns h_t. The gradient clip sits on each gate's
    pre-activation: x_r + hh_r, x_z + hh_z and x_n + r * hh_n."""
    hh = recurrent_preactivation(h_prev, w_hh, b_hh, ln_hh, rec_mask, record)
    x_r, x_z, x_n = xp.chunk(3, -1)
    hh_r, hh_z, hh_n = hh.chunk(3, -1)
    r = torch.sigmoid(clip_grad(x_r + hh_r, grad_clip))
    z = torch.sigmoid(clip_grad(x_z + hh_z, grad_clip))
    n = torch.tanh(clip_grad(x_n + r * hh_n, grad_clip))
    h_new = (1 - z) * n + z * h_prev       # h_prev unmasked
    if record is not None:
        record["gates"] = torch.cat([r, z, n, hh_n], -1)
    return zoneout(h_new, h_prev, z_h)


def run_direction(cell, xproj, h0, c0, w_hh, b_hh, w_hr, reverse, *, rec_mask=None,
                  z_h=None, z_c=None, records=None, **step_options):
    """One direction over equal-length sequences: xproj [L, rows, G*H], h0 [rows, P],
    c0 [rows, H] (lstm), rec_mask [rows, P], z_h [L, rows, P], z_c [L, rows, H], the zoneout
    weights of the row written at each time step. Returns (output [L, rows, P], h_n, c_n);
    records (a list) receives each time step's workspace columns."""
    steps = range(xproj.shape[0])
    out = [None] * len(steps)
    if records is not None:
        records[:] = [None] * len(steps)
    h, c = h0, c0
    for t in (reversed(steps) if reverse else steps):
        zh = None if z_h is None else z_h[t]
        if records is not None:
            step_options["record"] = records[t] = {}
        if cell == "lstm":
            zc = None if z_c is None else z_c[t]
            h, c = lstm_step(xproj[t], h, c, w_hh, b_hh, w_hr, rec_mask=rec_mask, z_h=zh,
                             z_c=zc, **step_options)
        else:
            h = gru_step(xproj[t], h, w_hh, b_hh, rec_mask=rec_mask, z_h=zh, **step_options)
        out[t] = h
    return torch.stack(out), h, c


def input_projection(x, w_ih, b_ih, ln_ih):
    """LN(x @ w_ih.T) + b_ih: the layer norm sees the product without the bias."""
    a = x @ w_ih.T
    if ln_ih is not None:
        a = layer_norm(a, *ln_ih)
    return a if b_ih is None else a + b_ih


class Params:
    """A module's parameters by name; the layer-norm ones must exist when asked for."""

    def __init__(self, module):
        self.module = module

    def get(self, name):
        return getattr(self.module, name, None)

    def need(self, name):
        value = getattr(self.module, name, None)
        assert isinstance(value, torch.nn.Parameter), f"module has no parameter {name}"
        return value


def run_module(cell, params, seqs, h0, c0, *, num_layers, bidirectional, layer_norm,
               masks, rows, batch_pos, cell_clip=None, proj_clip=None, grad_clip=None,
               peephole=False):
    """A stacked fastrnn.LSTM / GRU forward, each sequence on its own length.

    seqs: [L_j, input] per sequence in the user's batch order; h0 [layers*dirs, B, P] and
    c0 [layers*dirs, B, H] in that order too. rows[j]: the op row (packed time-major index)
    of sequence j at each of its steps; batch_pos[j]: its row in the op's (sorted) batch.
    masks: draw_module_masks() output. Returns (outputs [L_j, dirs*P] per sequence,
    h_n [layers*dirs, B, P], c_n or None)."""
    dirs = 2 if bidirectional else 1
    lstm = cell == "lstm"
    step_options = dict(grad_clip=grad_clip)
    if lstm:
        step_options.update(cell_clip=cell_clip, proj_clip=proj_clip)
    outputs, final_h, final_c = [], [[None] * len(seqs) for _ in range(num_layers * dirs)], \
        [[None] * len(seqs) for _ in range(num_layers * dirs)]
    for j, seq in enumerate(seqs):
        layer_in = seq
        for layer in range(num_layers):
            outs = []
            for d in range(dirs):
                sfx = f"_l{layer}" + ("_reverse" if d else "")
                key = (layer, d)
                ln = (lambda n: (params.need(f"ln_weight_{n}{sfx}"),
                                 params.need(f"ln_bias_{n}{sfx}"))) if layer_norm else \
                    (lambda n: None)
                xproj = input_projection(layer_in, params.need(f"weight_ih{sfx}"),
                                         params.get(f"bias_ih{sfx}"), ln("ih"))
                w_hh = params.need(f"weight_hh{sfx}")
                if masks.get(("w_hh",) + key) is not None:
                    w_hh = w_hh * masks[("w_hh",) + key]
                rec = masks.get(("rec",) + key)
                zh, zc = masks.get(("zh",) + key), masks.get(("zc",) + key)
                index = layer * dirs + d
                opts = dict(step_options, ln_hh=ln("hh"))
                if lstm:
                    opts["ln_c"] = ln("c")
                    opts["peephole"] = params.need(f"weight_peephole{sfx}") if peephole else None
                out, h, c = run_direction(
                    cell, xproj.unsqueeze(1), h0[index, j:j + 1],
                    c0[index, j:j + 1] if lstm else None, w_hh, params.get(f"bias_hh{sfx}"),
                    params.get(f"weight_hr{sfx}"), d == 1,
                    rec_mask=None if rec is None else rec[batch_pos[j]:batch_pos[j] + 1],
                    z_h=None if zh is None else zh[rows[j]].unsqueeze(1),
                    z_c=None if zc is None else zc[rows[j]].unsqueeze(1), **opts)
                outs.append(out.squeeze(1))
                final_h[index][j] = h[0]
                final_c[index][j] = c[0] if lstm else None
            layer_in = torch.cat(outs, -1)
            between = masks.get(("between", layer))
            if between is not None:
                layer_in = layer_in * between[rows[j]]
        outputs.append(layer_in)
    h_n = torch.stack([torch.stack(hs) for hs in final_h])
    c_n = torch.stack([torch.stack(cs) for cs in final_c]) if lstm else None
    return outputs, h_n, c_n


def zoneout_pair(cell, zoneout):
    """(p_h, p_c): a single probability is both for an LSTM; a GRU has no cell state."""
    if isinstance(zoneout, (tuple, list)):
        return float(zoneout[0]), float(zoneout[1])
    return float(zoneout), (float(zoneout) if cell == "lstm" else 0.0)


def _recurrent_dropout_mask(batch, width, p, dtype):
    if p == 1:
        return torch.zeros(batch, width, dtype=dtype)
    return torch.empty(batch, width, dtype=dtype).bernoulli_(1 - p).div_(1 - p)


def _zoneout_masks(cell, rows, width, hidden, p_h, p_c, training, dtype):
    """zoneout_h [rows, P] then zoneout_c [rows, H] (lstm): 1 = keep the previous state;
    in eval mode the expectation p."""
    masks = []
    for p, cols, on in ((p_h, width, True), (p_c, hidden, cell == "lstm")):
        if not on or p <= 0:
            masks.append(None)
        elif training:
            masks.append(torch.empty(rows, cols, dtype=dtype).bernoulli_(p))
        else:
            masks.append(torch.full((rows, cols), p, dtype=dtype))
    return masks


def draw_module_masks(cell, *, num_layers, bidirectional, hidden, proj, rows, batch, dtype,
                      training, weight_drop=0.0, recurrent_dropout=0.0, zoneout=0.0,
                      dropout=0.0):
    """The masks a module's forward draws with the global RNG, in the documented order: per layer,
    per direction weight_drop, recurrent_dropout, zoneout_h, zoneout_c (each only when its
    p > 0), then torch.nn's dropout between layers. Keys: ("w_hh"|"rec"|"zh"|"zc", layer,
    direction) and ("between", layer)."""
    dirs = 2 if bidirectional else 1
    width = proj or hidden
    p_h, p_c = zoneout_pair(cell, zoneout)
    masks = {}
    for layer in range(num_layers):
        for d in range(dirs):
            key = (layer, d)
            if training and weight_drop > 0:
                # F.dropout(w_hh) on CPU = w_hh * (bernoulli(1 - p) / (1 - p)) of w_hh's shape
                masks[("w_hh",) + key] = F.dropout(
                    torch.ones(NUM_GATES[cell] * hidden, width, dtype=dtype), weight_drop, True)
            if training and recurrent_dropout > 0:
                masks[("rec",) + key] = _recurrent_dropout_mask(batch, width,
                                                                 recurrent_dropout, dtype)
            masks[("zh",) + key], masks[("zc",) + key] = _zoneout_masks(
                cell, rows, width, hidden, p_h, p_c, training, dtype)
        if training and dropout > 0 and layer < num_layers - 1:
            masks[("between", layer)] = F.dropout(torch.ones(rows, dirs * width, dtype=dtype),
                                                  dropout, True)
    return masks


class CellMasks:
    """What a cell draws: weight_drop and recurrent_dropout masks on the first training call,
    kept until reset() or a call with another batch size; zoneout masks every call."""

    def __init__(self, cell, hidden, dtype, weight_drop=0.0, recurrent_dropout=0.0,
                 zoneout=0.0):
        self.cell, self.hidden, self.dtype = cell, hidden, dtype
        self.weight_drop, self.recurrent_dropout = weight_drop, recurrent_dropout
        self.p_h, self.p_c = zoneout_pair(cell, zoneout)
        self.reset()

    def reset(self):
        self.batch, self.w_hh, self.rec = None, None, None

    def step(self, batch, training):
        if not training:
            zh, zc = _zoneout_masks(self.cell, batch, self.hidden, self.hidden, self.p_h,
                                    self.p_c, False, self.dtype)
            return dict(w_hh=None, rec=None, zh=zh, zc=zc)
        if self.batch != batch:
            self.batch = batch
            self.w_hh = self.rec = None
            if self.weight_drop > 0:
                self.w_hh = F.dropout(torch.ones(NUM_GATES[self.cell] * self.hidden,
                                                 self.hidden, dtype=self.dtype),
                                      self.weight_drop, True)
            if self.recurrent_dropout > 0:
                self.rec = _recurrent_dropout_mask(batch, self.hidden, self.recurrent_dropout,
                                                   self.dtype)
        zh, zc = _zoneout_masks(self.cell, batch, self.hidden, self.hidden, self.p_h,
                                self.p_c, True, self.dtype)
        return dict(w_hh=self.w_hh, rec=self.rec, zh=zh, zc=zc)


def cell_step(cell, params, x, h, c, masks, *, layer_norm, cell_clip=None, grad_clip=None,
              peephole=False):
    """One call of fastrnn.LSTMCell / GRUCell (batched: x [B, I], h, c [B, H]) with the masks
    of CellMasks.step(). Returns h (gru) or (h, c) (lstm)."""
    ln = (lambda n: (params.need(f"ln_weight_{n}"), params.need(f"ln_bias_{n}"))) \
        if layer_norm else (lambda n: None)
    xp = input_projection(x, params.need("weight_ih"), params.get("bias_ih"), ln("ih"))
    w_hh = params.need("weight_hh")
    if masks["w_hh"] is not None:
        w_hh = w_hh * masks["w_hh"]
    if cell == "lstm":
        return lstm_step(xp, h, c, w_hh, params.get("bias_hh"), None, ln_hh=ln("hh"),
                         ln_c=ln("c"), rec_mask=masks["rec"], z_h=masks["zh"],
                         z_c=masks["zc"], cell_clip=cell_clip, grad_clip=grad_clip,
                         peephole=params.need("weight_peephole") if peephole else None)
    return gru_step(xp, h, w_hh, params.get("bias_hh"), ln_hh=ln("hh"), rec_mask=masks["rec"],
                    z_h=masks["zh"], grad_clip=grad_clip)
