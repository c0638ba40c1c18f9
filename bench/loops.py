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
from typing import List, Tuple

import torch
from torch import Tensor, nn


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
    gx = torch.matmul(x, w_ih.t()) + (b_ih + b_hh)
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
    gx = torch.matmul(x, w_ih.t()) + b_ih
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
        gx = torch.matmul(x, w_ih.t()) + (b_ih + b_hh)
        outs = [None] * x.size(0)
        for t in _time_order(x.size(0), reverse):
            h, c = step(gx[t], h, c, w_hh)
            outs[t] = h
        return torch.stack(outs), h, c
    return layer


def _compiled_gru_layer(step):
    def layer(x, h, w_ih, w_hh, b_ih, b_hh, reverse):
        gx = torch.matmul(x, w_ih.t()) + b_ih
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
