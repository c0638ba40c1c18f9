"""fastrnn.LSTMCell / GRUCell / RNNCell: one step of the recurrence, drop-ins for torch.nn.

A cell call is the recurrence op with a single step, so step-by-step decoders run the same
kernels (and gate math) as the full-sequence modules.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn import init

from .. import backends, ops
from ..cells import CELLS
from . import amp

# Names torch's C++ checks print for dtypes ("mat1 and mat2 must have the same dtype...").
_SCALAR_NAMES = {torch.float64: "Double", torch.float32: "Float", torch.float16: "Half",
                 torch.bfloat16: "BFloat16"}


class RNNCellBase(nn.Module):
    """Twin of ``torch.nn.RNNCellBase``: same parameters, order and initialisation.

    Under ONNX export a cell runs torch.nn's own forward (``_torch_forward``) on the same
    parameters: standard operators, so the exported file needs no fastrnn.
    """

    __constants__ = ["input_size", "hidden_size", "bias", "backend"]
    extra_repr = nn.RNNCellBase.extra_repr

    def __init__(self, input_size: int, hidden_size: int, bias: bool, num_chunks: int,
                 device=None, dtype=None, *, backend: str = "auto") -> None:
        factory_kwargs = {"device": device, "dtype": dtype}
        super().__init__()
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.bias = bias
        self.backend = backends.check_name(backend)
        self.weight_ih = nn.Parameter(torch.empty((num_chunks * hidden_size, input_size),
                                                  **factory_kwargs))
        self.weight_hh = nn.Parameter(torch.empty((num_chunks * hidden_size, hidden_size),
                                                  **factory_kwargs))
        if bias:
            self.bias_ih = nn.Parameter(torch.empty(num_chunks * hidden_size, **factory_kwargs))
            self.bias_hh = nn.Parameter(torch.empty(num_chunks * hidden_size, **factory_kwargs))
        else:
            self.register_parameter("bias_ih", None)
            self.register_parameter("bias_hh", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        stdv = 1.0 / math.sqrt(self.hidden_size) if self.hidden_size > 0 else 0
        for weight in self.parameters():
            init.uniform_(weight, -stdv, stdv)

    def _check_dims(self, input, hx):
        name = type(self).__name__
        if input.dim() not in (1, 2):
            raise ValueError(f"{name}: Expected input to be 1D or 2D, got {input.dim()}D instead")
        states = hx if isinstance(hx, tuple) else (() if hx is None else (hx,))
        for index, value in enumerate(states):
            if value.dim() not in (1, 2):
                what = f"hx[{index}]" if isinstance(hx, tuple) else "hidden"
                raise ValueError(f"{name}: Expected {what} to be 1D or 2D, got {value.dim()}D "
                                 "instead")

    def _step(self, cell: str, input: Tensor, states: tuple):
        """Checks as ATen's cell ops do, then one step of the recurrence op."""
        if input.size(1) != self.input_size:
            raise RuntimeError(f"input has inconsistent input_size: got {input.size(1)} "
                               f"expected {self.input_size}")
        for index, state in enumerate(states):
            if input.size(0) != state.size(0):
                raise RuntimeError(f"Input batch size {input.size(0)} doesn't match "
                                   f"hidden{index} batch size {state.size(0)}")
            if state.size(1) != self.hidden_size:
                raise RuntimeError(f"hidden{index} has inconsistent hidden_size: got "
                                   f"{state.size(1)}, expected {self.hidden_size}")
        xproj = F.linear(input, self.weight_ih, self.bias_ih)
        autocast = amp.cell_plan(self, CELLS[cell].mode, input, states)
        for state in states:
            if state.dtype != self.weight_hh.dtype and autocast is None:
                raise RuntimeError("mat1 and mat2 must have the same dtype, but got "
                                   f"{_SCALAR_NAMES.get(state.dtype, state.dtype)} and "
                                   f"{_SCALAR_NAMES.get(self.weight_hh.dtype, self.weight_hh.dtype)}")
        recurrence = ops.recurrence if autocast is None else autocast.recurrence
        backend = backends.resolve(self.backend, cell, input.device,
                                   input.dtype if autocast is None else autocast.compute,
                                   self.hidden_size)
        c0 = states[1] if len(states) > 1 else None
        _, h, c = recurrence(cell, xproj, states[0], c0, self.weight_hh, self.bias_hh, None,
                             None, False, backend)
        return h, c

    def _zeros(self, input):
        return torch.zeros(input.size(0), self.hidden_size, dtype=input.dtype,
                           device=input.device)


class _SingleStateCell(RNNCellBase):
    """GRUCell and RNNCell: the state is one tensor."""

    def forward(self, input: Tensor, hx: Tensor | None = None) -> Tensor:
        if torch.onnx.is_in_onnx_export():
            return self._torch_forward(input, hx)
        self._check_dims(input, hx)
        is_batched = input.dim() == 2
        if not is_batched:
            input = input.unsqueeze(0)
        hx = self._zeros(input) if hx is None else (hx if is_batched else hx.unsqueeze(0))
        h, _ = self._step(self._cell_name(), input, (hx,))
        return h if is_batched else h.squeeze(0)


class RNNCell(_SingleStateCell):
    """Drop-in for :class:`torch.nn.RNNCell`, plus ``backend=``."""

    _torch_forward = nn.RNNCell.forward

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True,
                 nonlinearity: str = "tanh", device=None, dtype=None, *,
                 backend: str = "auto") -> None:
        super().__init__(input_size, hidden_size, bias, num_chunks=1, device=device,
                         dtype=dtype, backend=backend)
        self.nonlinearity = nonlinearity

    def _cell_name(self) -> str:
        if self.nonlinearity not in ("tanh", "relu"):
            raise RuntimeError(f"Unknown nonlinearity: {self.nonlinearity}")
        return f"rnn_{self.nonlinearity}"


class GRUCell(_SingleStateCell):
    """Drop-in for :class:`torch.nn.GRUCell`, plus ``backend=``."""

    _torch_forward = nn.GRUCell.forward

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True, device=None,
                 dtype=None, *, backend: str = "auto") -> None:
        super().__init__(input_size, hidden_size, bias, num_chunks=3, device=device,
                         dtype=dtype, backend=backend)

    def _cell_name(self) -> str:
        return "gru"


class LSTMCell(RNNCellBase):
    """Drop-in for :class:`torch.nn.LSTMCell`, plus ``backend=``."""

    _torch_forward = nn.LSTMCell.forward

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True, device=None,
                 dtype=None, *, backend: str = "auto") -> None:
        super().__init__(input_size, hidden_size, bias, num_chunks=4, device=device,
                         dtype=dtype, backend=backend)

    def forward(self, input: Tensor, hx: tuple[Tensor, Tensor] | None = None):
        if torch.onnx.is_in_onnx_export():
            return self._torch_forward(input, hx)
        self._check_dims(input, hx)
        is_batched = input.dim() == 2
        if not is_batched:
            input = input.unsqueeze(0)
        if hx is None:
            zeros = self._zeros(input)
            hx = (zeros, zeros)
        elif not is_batched:
            hx = (hx[0].unsqueeze(0), hx[1].unsqueeze(0))
        h, c = self._step("lstm", input, tuple(hx))
        return (h, c) if is_batched else (h.squeeze(0), c.squeeze(0))
