"""Hand-written RNN loops: what people write when torch.nn is not flexible enough.

The input projection of all steps is one GEMM before the loop (hoisted, as in PyTorch's
``benchmarks/fastrnns``); the loop does the recurrent GEMM and the gate math per step.
Two engines run the same math:

- ``script``: the whole layer loop under TorchScript (``torch.jit.script``);
- ``compile``: the step function under ``torch.compile``, the loop in Python (compiling the
  loop itself would unroll all T steps into one graph: minutes of compile time at T=1000).

:class:`LoopRNN` stacks layers and directions like torch.nn and has torch.nn's parameter
names, so ``load_state_dict`` from an ``nn.LSTM`` / ``nn.GRU`` copies the weights.
"""
from __future__ import annotations

import math
import warnings
from typing import List, Optional, Tuple

import torch
from torch import Tensor, nn
from torch.nn import functional as F


def lstm_step(gx: Tensor, h: Tensor, c: Tensor, w_hh: Tensor) -> Tuple[Tensor, Tensor]:
    gates = torch.addmm(gx, h, w_hh.t())   # gx holds both biases
    i, f, g, o = gates.chunk(4, 1)
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    h = torch.sigmoid(o) * torch.tanh(c)
    return h, c


def gru_step(gx: Tensor, h: Tensor, w_hh: Tensor, b_hh: Tensor) -> Tensor:
    gh = torch.addmm(b_hh, h, w_hh.t())
    xr, xz, xn = gx.chunk(3, 1)
    hr, hz, hn = gh.chunk(3, 1)
    r = torch.sigmoid(xr + hr)
    z = torch.sigmoid(xz + hz)
    n = torch.tanh(xn + r * hn)
    return n + z * (h - n)   # (1 - z) * n + z * h


def _script_lstm_layer(x: Tensor, h: Tensor, c: Tensor, w_ih: Tensor, w_hh: Tensor,
                       b_ih: Tensor, b_hh: Tensor, reverse: bool) -> Tuple[Tensor, Tensor, Tensor]:
    # unbind, not gx[t]: each gx[t]'s backward is a zero tensor of gx's full size
    gx = (torch.matmul(x, w_ih.t()) + (b_ih + b_hh)).unbind(0)
    steps = x.size(0)
    outs: List[Tensor] = []
    for s in range(steps):
        t = steps - 1 - s if reverse else s
        h, c = lstm_step(gx[t], h, c, w_hh)
        outs.append(h)
    if reverse:
        outs.reverse()
    return torch.stack(outs), h, c


def _script_gru_layer(x: Tensor, h: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Tensor,
                      b_hh: Tensor, reverse: bool) -> Tuple[Tensor, Tensor]:
    gx = (torch.matmul(x, w_ih.t()) + b_ih).unbind(0)
    steps = x.size(0)
    outs: List[Tensor] = []
    for s in range(steps):
        t = steps - 1 - s if reverse else s
        h = gru_step(gx[t], h, w_hh, b_hh)
        outs.append(h)
    if reverse:
        outs.reverse()
    return torch.stack(outs), h


_engines = {}


def _engine(name: str):
    """(lstm_layer, gru_layer) for an engine, built once per process."""
    if name not in _engines:
        if name == "script":
            with warnings.catch_warnings():   # TorchScript is deprecated but still what people run
                warnings.simplefilter("ignore")
                _engines[name] = (torch.jit.script(_script_lstm_layer),
                                  torch.jit.script(_script_gru_layer))
        elif name == "compile":
            _engines[name] = (_compiled_lstm_layer(torch.compile(lstm_step)),
                              _compiled_gru_layer(torch.compile(gru_step)))
        else:
            raise ValueError(f"unknown loop engine {name!r}; use 'script' or 'compile'")
    return _engines[name]


def _time_order(steps: int, reverse: bool):
    return range(steps - 1, -1, -1) if reverse else range(steps)


def _compiled_lstm_layer(step):
    """The scripted LSTM layer's loop in Python around a compiled step."""
    def layer(x, h, c, w_ih, w_hh, b_ih, b_hh, reverse):
        gx = (torch.matmul(x, w_ih.t()) + (b_ih + b_hh)).unbind(0)
        outs = [None] * x.size(0)
        for t in _time_order(x.size(0), reverse):
            h, c = step(gx[t], h, c, w_hh)
            outs[t] = h
        return torch.stack(outs), h, c
    return layer


def _compiled_gru_layer(step):
    def layer(x, h, w_ih, w_hh, b_ih, b_hh, reverse):
        gx = (torch.matmul(x, w_ih.t()) + b_ih).unbind(0)
        outs = [None] * x.size(0)
        for t in _time_order(x.size(0), reverse):
            h = step(gx[t], h, w_hh, b_hh)
            outs[t] = h
        return torch.stack(outs), h
    return layer


class LoopRNN(nn.Module):
    """An ``nn.LSTM`` / ``nn.GRU`` twin (bias, time-major, no dropout) run by a hand-written loop."""

    def __init__(self, mode: str, input_size: int, hidden_size: int, num_layers: int = 1,
                 bidirectional: bool = False, engine: str = "script", device=None, dtype=None):
        super().__init__()
        if mode not in ("LSTM", "GRU"):
            raise ValueError(f"LoopRNN mode must be 'LSTM' or 'GRU', got {mode!r}")
        self.mode, self.hidden_size, self.num_layers = mode, hidden_size, num_layers
        self.num_directions = 2 if bidirectional else 1
        self.engine = engine
        gates = 4 if mode == "LSTM" else 3
        bound = 1.0 / math.sqrt(hidden_size)
        kw = dict(device=device, dtype=dtype)
        for layer in range(num_layers):
            width = input_size if layer == 0 else hidden_size * self.num_directions
            for suffix in ("", "_reverse")[: self.num_directions]:
                for name, shape in ((f"weight_ih_l{layer}", (gates * hidden_size, width)),
                                    (f"weight_hh_l{layer}", (gates * hidden_size, hidden_size)),
                                    (f"bias_ih_l{layer}", (gates * hidden_size,)),
                                    (f"bias_hh_l{layer}", (gates * hidden_size,))):
                    param = nn.Parameter(torch.empty(shape, **kw).uniform_(-bound, bound))
                    self.register_parameter(name + suffix, param)

    def forward(self, x: Tensor, hx=None):
        if isinstance(x, nn.utils.rnn.PackedSequence) or x.dim() != 3:
            raise TypeError("LoopRNN takes a padded time-major [T, B, I] tensor only")
        lstm_layer, gru_layer = _engine(self.engine)
        states = self.num_layers * self.num_directions
        zeros = x.new_zeros(states, x.size(1), self.hidden_size)
        if self.mode == "LSTM":
            h0, c0 = hx if hx is not None else (zeros, zeros)
        else:
            h0, c0 = (hx if hx is not None else zeros), None
        h_n: List[Tensor] = []
        c_n: List[Tensor] = []
        for layer in range(self.num_layers):
            outs = []
            for direction, suffix in enumerate(("", "_reverse")[: self.num_directions]):
                k = layer * self.num_directions + direction
                weights = [getattr(self, f"{n}_l{layer}{suffix}")
                           for n in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]
                if self.mode == "LSTM":
                    out, h, c = lstm_layer(x, h0[k], c0[k], *weights, direction == 1)
                    c_n.append(c)
                else:
                    out, h = gru_layer(x, h0[k], *weights, direction == 1)
                h_n.append(h)
                outs.append(out)
            x = outs[0] if len(outs) == 1 else torch.cat(outs, 2)
        if self.mode == "LSTM":
            return x, (torch.stack(h_n), torch.stack(c_n))
        return x, torch.stack(h_n)


# ---- LayerNorm LSTM (fastrnn.LSTM(layer_norm=True)'s math, docs/op-contract.md) -----------
#
# The well-known baseline is PyTorch's benchmarks/fastrnns custom_lstms LayerNormLSTM: every
# step layer-norms x_t @ w_ih.T and h @ w_hh.T and the new cell state. This loop computes the
# fastrnn contract instead, so its results can be checked against fastrnn's: biases after
# the norms, and the carried cell state is the one before its norm. ``hoist`` computes the
# input side (GEMM + LN) for all steps at once before the loop, the stronger baseline;
# without it the loop does it per step, as custom_lstms does. The optional recurrent dropout
# mask and zoneout weights are applied exactly as in the contract. The norms' eps is the
# contract's 1e-5, written out: TorchScript cannot read a module-level float.

def ln_lstm_step(gx: Tensor, h: Tensor, c: Tensor, w_hh: Tensor, b_hh: Tensor,
                 ln_w_hh: Tensor, ln_b_hh: Tensor, ln_w_c: Tensor, ln_b_c: Tensor,
                 recurrent_mask: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
    """One step without zoneout: (h_new, c_new); gx = LN(x_t @ w_ih.T) + b_ih."""
    h_rec = h if recurrent_mask is None else h * recurrent_mask
    a = torch.mm(h_rec, w_hh.t())
    hh = F.layer_norm(a, [a.size(1)], ln_w_hh, ln_b_hh, 1e-5) + b_hh
    i, f, g, o = (gx + hh).chunk(4, 1)
    c_new = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    y = F.layer_norm(c_new, [c_new.size(1)], ln_w_c, ln_b_c, 1e-5)
    return torch.sigmoid(o) * torch.tanh(y), c_new


def _script_ln_lstm_layer(x: Tensor, h: Tensor, c: Tensor, w_ih: Tensor, w_hh: Tensor,
                          b_ih: Tensor, b_hh: Tensor, ln_w_ih: Tensor, ln_b_ih: Tensor,
                          ln_w_hh: Tensor, ln_b_hh: Tensor, ln_w_c: Tensor, ln_b_c: Tensor,
                          reverse: bool, hoist: bool, recurrent_mask: Optional[Tensor],
                          zoneout_h: Optional[Tensor], zoneout_c: Optional[Tensor]
                          ) -> Tuple[Tensor, Tensor, Tensor]:
    steps, width = x.size(0), w_ih.size(0)
    # unbind, not indexing: the backward of x[t] is a zero tensor of x's full size per step
    # (T^2 memory traffic); unbind's backward is one stack.
    if hoist:
        xs = (F.layer_norm(torch.matmul(x, w_ih.t()), [width], ln_w_ih, ln_b_ih, 1e-5)
              + b_ih).unbind(0)
    else:
        xs = x.unbind(0)
    outs: List[Tensor] = []
    for s in range(steps):
        t = steps - 1 - s if reverse else s
        if hoist:
            gx = xs[t]
        else:
            gx = F.layer_norm(torch.mm(xs[t], w_ih.t()), [width], ln_w_ih, ln_b_ih, 1e-5) + b_ih
        h_new, c_new = ln_lstm_step(gx, h, c, w_hh, b_hh, ln_w_hh, ln_b_hh, ln_w_c, ln_b_c,
                                    recurrent_mask)
        if zoneout_h is not None:   # [T, B, P] weight of the previous state (1 keeps it)
            z = zoneout_h[t]
            h_new = (1 - z) * h_new + z * h
        if zoneout_c is not None:
            z = zoneout_c[t]
            c_new = (1 - z) * c_new + z * c
        h, c = h_new, c_new
        outs.append(h)
    if reverse:
        outs.reverse()
    return torch.stack(outs), h, c


_ln_layer = []


def _scripted_ln_layer():
    if not _ln_layer:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _ln_layer.append(torch.jit.script(_script_ln_lstm_layer))
    return _ln_layer[0]


class LayerNormLoopLSTM(nn.Module):
    """A ``fastrnn.LSTM(layer_norm=True, recurrent_dropout=..., zoneout=...)`` twin (bias,
    time-major, no dropout between layers) run by a TorchScript loop, with fastrnn's
    parameter names (``load_state_dict`` from a fastrnn module copies the weights).

    Stochastic options act in training mode and draw their masks like fastrnn does (torch's
    global RNG, per layer then per direction: recurrent mask, zoneout_h, zoneout_c), so the
    same seed gives the same masks; in eval mode zoneout uses its probability (expectation).
    ``mask_dtype`` draws the masks in another dtype than the computation's (a float64 twin of
    a float32 model then gets the float32 model's masks: RNG streams may differ by dtype).
    """

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1,
                 bidirectional: bool = False, hoist: bool = True, recurrent_dropout: float = 0.0,
                 zoneout=0.0, mask_dtype=None, device=None, dtype=None):
        super().__init__()
        self.hidden_size, self.num_layers, self.hoist = hidden_size, num_layers, hoist
        self.num_directions = 2 if bidirectional else 1
        self.recurrent_dropout = float(recurrent_dropout)
        self.zoneout = tuple(zoneout) if isinstance(zoneout, (tuple, list)) else (zoneout, zoneout)
        self.mask_dtype = mask_dtype
        bound = 1.0 / math.sqrt(hidden_size)
        kw = dict(device=device, dtype=dtype)
        gates = 4 * hidden_size
        suffixes = [f"_l{k}{s}" for k in range(num_layers)
                    for s in ("", "_reverse")[: self.num_directions]]
        for k, suffix in enumerate(suffixes):   # torch.nn's parameters first, as fastrnn
            width = input_size if k < self.num_directions else hidden_size * self.num_directions
            for name, shape in (("weight_ih", (gates, width)), ("weight_hh", (gates, hidden_size)),
                                ("bias_ih", (gates,)), ("bias_hh", (gates,))):
                param = nn.Parameter(torch.empty(shape, **kw).uniform_(-bound, bound))
                self.register_parameter(name + suffix, param)
        for suffix in suffixes:
            for name, size in (("ln_weight_ih", gates), ("ln_bias_ih", gates),
                               ("ln_weight_hh", gates), ("ln_bias_hh", gates),
                               ("ln_weight_c", hidden_size), ("ln_bias_c", hidden_size)):
                fill = 1.0 if "weight" in name else 0.0
                self.register_parameter(name + suffix, nn.Parameter(torch.full((size,), fill, **kw)))

    def _masks(self, x: Tensor):
        """(recurrent_mask [B, H], zoneout_h [T, B, H], zoneout_c [T, B, H]), None where off."""
        steps, batch, h = x.size(0), x.size(1), self.hidden_size
        p, (p_h, p_c) = self.recurrent_dropout, self.zoneout
        kw = dict(dtype=self.mask_dtype or x.dtype, device=x.device)
        mask = zone_h = zone_c = None
        if self.training:
            if p > 0:
                mask = torch.empty(batch, h, **kw).bernoulli_(1 - p)
                mask = mask.div_(1 - p) if p < 1 else mask
            if p_h > 0:
                zone_h = torch.empty(steps * batch, h, **kw).bernoulli_(p_h).view(steps, batch, h)
            if p_c > 0:
                zone_c = torch.empty(steps * batch, h, **kw).bernoulli_(p_c).view(steps, batch, h)
        else:
            if p_h > 0:
                zone_h = torch.full((steps, batch, h), p_h, **kw)
            if p_c > 0:
                zone_c = torch.full((steps, batch, h), p_c, **kw)
        return tuple(None if m is None else m.to(x.dtype) for m in (mask, zone_h, zone_c))

    def forward(self, x: Tensor, hx=None):
        if isinstance(x, nn.utils.rnn.PackedSequence) or x.dim() != 3:
            raise TypeError("LayerNormLoopLSTM takes a padded time-major [T, B, I] tensor only")
        layer_fn = _scripted_ln_layer()
        states = self.num_layers * self.num_directions
        zeros = x.new_zeros(states, x.size(1), self.hidden_size)
        h0, c0 = hx if hx is not None else (zeros, zeros)
        h_n: List[Tensor] = []
        c_n: List[Tensor] = []
        for layer in range(self.num_layers):
            outs = []
            for direction, suffix in enumerate(("", "_reverse")[: self.num_directions]):
                k = layer * self.num_directions + direction
                weights = [getattr(self, f"{n}_l{layer}{suffix}") for n in (
                    "weight_ih", "weight_hh", "bias_ih", "bias_hh", "ln_weight_ih", "ln_bias_ih",
                    "ln_weight_hh", "ln_bias_hh", "ln_weight_c", "ln_bias_c")]
                out, h, c = layer_fn(x, h0[k], c0[k], *weights, direction == 1, self.hoist,
                                     *self._masks(x))
                h_n.append(h)
                c_n.append(c)
                outs.append(out)
            x = outs[0] if len(outs) == 1 else torch.cat(outs, 2)
        return x, (torch.stack(h_n), torch.stack(c_n))
