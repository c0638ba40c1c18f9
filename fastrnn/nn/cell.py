"""fastrnn.LSTMCell / GRUCell / RNNCell: one step of the recurrence, drop-ins for torch.nn.

A cell call is the recurrence op with a single step, so step-by-step decoders run the same
kernels (and gate math) as the full-sequence modules.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn import init

from .. import backends, ops
from ..spec import CELLS
from . import amp, options


def dtype_mismatch(state: Tensor, weight: Tensor) -> RuntimeError:
    """The error torch.nn's matmul gives for a state whose dtype is not the weights'."""
    def name(dtype):   # ATen's scalar type name: "torch.DoubleTensor" -> "Double"
        return torch.empty(0, dtype=dtype).type()[len("torch."):-len("Tensor")]
    return RuntimeError("mat1 and mat2 must have the same dtype, but got "
                        f"{name(state.dtype)} and {name(weight.dtype)}")


class RNNCellBase(options.Module):
    """Twin of ``torch.nn.RNNCellBase``: same parameters, order and initialisation.

    Under ONNX export (standard operators, so the exported file needs no fastrnn), and under
    backend "auto" where the backend registry routes the call to torch.nn
    (backends.torch_path), a cell runs torch.nn's own forward (``_torch_forward``) on the same parameters.
    """

    __constants__ = ["input_size", "hidden_size", "bias", "backend", *options.DEFAULTS]

    def __init__(self, input_size: int, hidden_size: int, bias: bool, cell: str,
                 device=None, dtype=None, *, backend: str = "auto", **option_values) -> None:
        factory_kwargs = {"device": device, "dtype": dtype}
        super().__init__()
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.bias = bias
        self.backend = backends.check_name(backend)
        self.mode = CELLS[cell].cell_mode
        num_chunks = CELLS[cell].num_gates
        # fastrnn's options (fastrnn.nn.options); all off = torch.nn exactly.
        options.check_keywords(type(self).__name__, option_values)
        checked = options.check(type(self).__name__, self.mode,
                                dict(options.DEFAULTS, **option_values), bias=bias)
        for name, value in checked.items():
            setattr(self, name, value)
        self._dropout_masks = None   # (batch, weight mask, recurrent mask), see _masks
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
        self._option_names = []   # after torch.nn's parameters: a seed gives torch.nn's weights
        for name, size, _ in options.parameters(self):
            setattr(self, name, nn.Parameter(torch.empty(size, **factory_kwargs)))
            self._option_names.append(name)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        stdv = 1.0 / math.sqrt(self.hidden_size) if self.hidden_size > 0 else 0
        for weight in self.parameters():   # torch.nn's parameters, in its order
            if all(weight is not getattr(self, name) for name in self._option_names):
                init.uniform_(weight, -stdv, stdv)
        options.init_parameters(self, self._option_names)
        if getattr(self, "forget_bias", None) is not None:
            options.set_forget_bias(self.bias_ih, self.bias_hh, self.hidden_size,
                                    self.forget_bias)

    def extra_repr(self) -> str:
        text = nn.RNNCellBase.extra_repr(self)
        extra = options.describe(self)
        return f"{text}, {extra}" if extra else text

    def reset_dropout_masks(self) -> None:
        """Forget the recurrent_dropout / weight_drop masks: the next training call draws new
        ones. Call it at the start of every sequence (a cell cannot see where one starts)."""
        self._dropout_masks = None

    def _masks(self, batch: int, like: Tensor):
        """(w_hh to use, recurrent mask or None): the masks are drawn on the first training
        call (weight mask first) and kept until reset_dropout_masks() or a new batch size."""
        if not self.training:
            return self.weight_hh, None
        if self._dropout_masks is None or self._dropout_masks[0] != batch:
            weight_mask = None
            if self.weight_drop:
                w_hh = self.weight_hh
                weight_mask = options.dropout_mask(w_hh.new_empty(w_hh.shape), self.weight_drop)
            mask = options.recurrent_mask(self, batch, self.hidden_size, like)
            self._dropout_masks = (batch, weight_mask, mask)
        _, weight_mask, mask = self._dropout_masks
        return (self.weight_hh if weight_mask is None else self.weight_hh * weight_mask), mask

    def _check_dims(self, input, hx):
        """torch.nn's GRUCell / RNNCell checks (a hx that is no tensor fails as there)."""
        name = type(self).__name__
        if input.dim() not in (1, 2):
            raise ValueError(f"{name}: Expected input to be 1D or 2D, got {input.dim()}D instead")
        if hx is not None and hx.dim() not in (1, 2):
            raise ValueError(f"{name}: Expected hidden to be 1D or 2D, got {hx.dim()}D instead")

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
        get = lambda name: getattr(self, name)  # noqa: E731
        xproj = options.input_projection(self, input, self.weight_ih, self.bias_ih, get)
        autocast = amp.cell_plan(self, CELLS[cell].mode, input, states)
        for state in states:
            if state.dtype != self.weight_hh.dtype and autocast is None:
                raise dtype_mismatch(state, self.weight_hh)
        recurrence = ops.recurrence if autocast is None else autocast.recurrence
        compute = input.dtype if autocast is None else autocast.compute
        variant = options.active(self)
        backend = backends.resolve(self.backend, cell, input.device, compute, self.hidden_size,
                                   0, options.option_names(self) if variant else ())
        w_hh, step_options = self.weight_hh, None
        if variant:
            like = torch.empty(0, dtype=compute, device=input.device)
            w_hh, mask = self._masks(input.size(0), like)
            zoneout_h, zoneout_c = options.zoneout_weights(
                self, input.size(0), self.hidden_size, self.hidden_size, like)
            step_options = options.step_options(self, get, mask, zoneout_h, zoneout_c)
        c0 = states[1] if len(states) > 1 else None
        _, h, c = recurrence(cell, xproj, states[0], c0, w_hh, self.bias_hh, None,
                             None, False, backend, step_options)
        return h, c

    def _zeros(self, input):
        return torch.zeros(input.size(0), self.hidden_size, dtype=input.dtype,
                           device=input.device)


class _SingleStateCell(RNNCellBase):
    """GRUCell and RNNCell: the state is one tensor."""

    def forward(self, input: Tensor, hx: Tensor | None = None) -> Tensor:
        if options.runs_torch_path(self, input, cell=True):
            return options.torch_forward(self, input, hx)
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
        super().__init__(input_size, hidden_size, bias, cell="rnn_tanh", device=device,
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
                 dtype=None, *, backend: str = "auto", **option_values) -> None:
        """``option_values``: the GRU options of fastrnn.spec.KEYWORDS."""
        super().__init__(input_size, hidden_size, bias, cell="gru", device=device,
                         dtype=dtype, backend=backend, **option_values)

    def _cell_name(self) -> str:
        return "gru"


class LSTMCell(RNNCellBase):
    """Drop-in for :class:`torch.nn.LSTMCell`, plus ``backend=``."""

    _torch_forward = nn.LSTMCell.forward

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True, device=None,
                 dtype=None, *, backend: str = "auto", **option_values) -> None:
        """``option_values``: the LSTM options of fastrnn.spec.KEYWORDS."""
        super().__init__(input_size, hidden_size, bias, cell="lstm", device=device,
                         dtype=dtype, backend=backend, **option_values)

    def forward(self, input: Tensor, hx: tuple[Tensor, Tensor] | None = None):
        if options.runs_torch_path(self, input, cell=True):
            return options.torch_forward(self, input, hx)
        # torch.nn.LSTMCell's checks, in its order: hx is any sequence of two tensors
        if input.dim() not in (1, 2):
            raise ValueError(f"LSTMCell: Expected input to be 1D or 2D, got {input.dim()}D "
                             "instead")
        if hx is not None:
            for index, value in enumerate(hx):
                if value.dim() not in (1, 2):
                    raise ValueError(f"LSTMCell: Expected hx[{index}] to be 1D or 2D, got "
                                     f"{value.dim()}D instead")
        given = hx
        is_batched = input.dim() == 2
        if not is_batched:
            input = input.unsqueeze(0)
        if hx is None:
            zeros = self._zeros(input)
            hx = (zeros, zeros)
        elif not is_batched:
            hx = (hx[0].unsqueeze(0), hx[1].unsqueeze(0))
        if not isinstance(hx, (tuple, list)) or not all(isinstance(t, Tensor) for t in hx):
            raise TypeError("lstm_cell(): argument 'hx' (position 2) must be tuple of Tensors, "
                            f"not {type(hx).__name__}")
        if len(hx) != 2:
            raise RuntimeError("lstm_cell expects two hidden states")
        if (hx[0].dtype == self.weight_hh.dtype != hx[1].dtype
                and amp.cell_plan(self, self.mode, input, tuple(hx)) is None):
            # torch.nn promotes the cell state's dtype into both results (c float64 with
            # float32 weights gives float64 h and c): only torch.nn's own math does that.
            options.refuse_torch_path(self, f"a cell state of dtype {hx[1].dtype}")
            return options.torch_forward(self, input if is_batched else input.squeeze(0),
                                         given)
        h, c = self._step("lstm", input, tuple(hx))
        return (h, c) if is_batched else (h.squeeze(0), c.squeeze(0))
