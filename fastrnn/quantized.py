"""Reduced-precision weights for CPU inference: int8 with a float32 scale per row, or bfloat16.

    qmodel = fastrnn.quantize_weights(model)                       # int8 weights
    qmodel = fastrnn.quantize_weights(model, dtype=torch.bfloat16)  # bfloat16 weights
    qmodel = fastrnn.quantize_weights(model, activation_bits=16)    # finer int8 products

replaces every LSTM / GRU / RNN layer of ``model`` (fastrnn's or torch.nn's) with an
inference-only twin holding its weights in the smaller dtype; the model itself is left as it
was (like ``torch.ao.quantization.quantize_dynamic``). Streaming inference at a small batch is
bound by reading the weights every frame: int8 reads a quarter of the float32 bytes,
bfloat16 half.

- int8: symmetric, one scale per output row (per gate unit), ``w ~= scale[n] * q[n, :]``
  with ``scale[n] = max|w[n, :]| / 127``;
- int8 products on a CPU with AVX-512 VNNI (recent Intel Xeons, AMD Zen 4) run on integer
  dot products: each row of activations (one frame of one stream) is quantized with its own
  scale to ``activation_bits`` (8, the default, as torch's dynamic quantization; or 16, twice
  the integer products for an activation error 256x smaller), the integer sums are exact and
  scaled back to float32 (:func:`quantize_activations` is the kernel's rounding). Elsewhere,
  and for bfloat16 weights, the weights are widened to float32 and the activations stay
  float32;
- gate math, states and biases stay float32;
- the input projection of the chunk and the recurrent product of every step both read the
  reduced weights (csrc/quantized.h), so a chunk gives the same bits as its frames run one
  call at a time.

The quantized modules take float32 CPU tensors (padded, not PackedSequence), in eval mode and
without gradient; they have no parameters, their weights and scales are buffers, so
``state_dict`` / ``load_state_dict`` round-trip. LSTM projections (``proj_size``) and
fastrnn's options (layer norm, zoneout, ...) are refused.
"""
from __future__ import annotations

import copy
from typing import Optional

import torch
from torch import nn

from .nn import options as module_options
from .nn.rnn import RNNBase as FastRNNBase

Tensor = torch.Tensor

WEIGHT_DTYPES = (torch.int8, torch.bfloat16)
# torch.nn's mode names -> the quantized op's cell names.
CELLS = {"LSTM": "lstm", "GRU": "gru", "RNN_TANH": "rnn_tanh", "RNN_RELU": "rnn_relu"}


def quantize_rows(weight: Tensor):
    """Symmetric int8 with a float32 scale per row: (q, scale), ``weight ~= scale[:, None] * q``.
    An all-zero row gets scale 0 (and q 0)."""
    weight = weight.detach().float()
    if weight.shape[1] == 0:
        return weight.to(torch.int8), weight.new_zeros(weight.shape[0])
    scale = weight.abs().amax(dim=1) / 127
    divisor = torch.where(scale > 0, scale, torch.ones_like(scale))[:, None]
    q = (weight / divisor).round().clamp(-127, 127).to(torch.int8)
    return q, scale


def quantize_activations(a: Tensor, bits: int = 8):
    """The int8 kernels' quantization of activations on a CPU with VNNI (:func:`int8_vnni`):
    (q, scale) for each row of a float32 ``a`` (last dimension), ``a ~= scale[..., None] * q``
    with ``scale = max|a| / 127`` (8 bits) or ``/ 32511`` (16 bits) in float32 and ``q`` the
    quotient rounded to nearest even (an all-zero row: scale 0, q 0). q is returned in
    float32 (exact)."""
    limit = {8: 127, 16: 32511}[bits]
    scale = a.abs().amax(dim=-1, keepdim=True) / limit
    q = (a / torch.where(scale > 0, scale, torch.ones_like(scale))).clamp(-limit, limit).round()
    return q, scale.squeeze(-1)


def int8_vnni() -> bool:
    """Whether this CPU runs int8 products on integer dot products (AVX-512 VNNI), the
    activations quantized as :func:`quantize_activations`; False on other CPUs and with
    ``FASTRNN_QUANTIZED_VNNI=0`` in the environment, which forces the float32 kernel."""
    from .backends.native import BACKEND
    BACKEND._require()
    return torch.ops.fastrnn.quantized_int8_vnni()


def dequantize_rows(q: Tensor, scale: Optional[Tensor]) -> Tensor:
    """The float32 weight the kernels compute with: ``scale[:, None] * q``, or the bfloat16
    weight widened (``scale`` None)."""
    return q.float() if scale is None else q.float() * scale[:, None]


class QuantizedRNNBase(nn.Module):
    """An inference-only LSTM / GRU / RNN with int8 (per-row scales) or bfloat16 weights.
    Made by :func:`quantize_weights` (or ``from_float``); constructed directly, it holds zero
    weights to ``load_state_dict`` into. ``activation_bits`` (8 or 16): the activations'
    precision in int8 products on a CPU with VNNI (module docstring)."""

    def __init__(self, mode: str, input_size: int, hidden_size: int, num_layers: int = 1,
                 bias: bool = True, batch_first: bool = False, bidirectional: bool = False,
                 weight_dtype: torch.dtype = torch.int8, activation_bits: int = 8):
        super().__init__()
        if mode not in CELLS:
            raise ValueError(f"Unknown mode {mode!r}; expected one of {', '.join(CELLS)}")
        if weight_dtype not in WEIGHT_DTYPES:
            raise ValueError(f"weight_dtype must be torch.int8 or torch.bfloat16, "
                             f"got {weight_dtype}")
        if activation_bits not in (8, 16):
            raise ValueError(f"activation_bits must be 8 or 16, got {activation_bits!r}")
        if num_layers < 1 or hidden_size < 0 or input_size < 0:
            raise ValueError(f"num_layers must be >= 1 and the sizes >= 0, got num_layers="
                             f"{num_layers}, input_size={input_size}, hidden_size={hidden_size}")
        self.mode, self.input_size, self.hidden_size = mode, input_size, hidden_size
        self.num_layers, self.bias, self.batch_first = num_layers, bias, batch_first
        self.bidirectional, self.weight_dtype = bidirectional, weight_dtype
        self.activation_bits = activation_bits
        gates = {"LSTM": 4, "GRU": 3}.get(mode, 1) * hidden_size
        for layer in range(num_layers):
            for suffix in self._suffixes():
                width = input_size if layer == 0 else hidden_size * len(self._suffixes())
                for kind, columns in (("ih", width), ("hh", hidden_size)):
                    name = f"weight_{kind}_l{layer}{suffix}"
                    self.register_buffer(name, torch.zeros(gates, columns, dtype=weight_dtype))
                    if weight_dtype == torch.int8:
                        self.register_buffer(f"weight_{kind}_scale_l{layer}{suffix}",
                                             torch.zeros(gates))
                    if bias:
                        self.register_buffer(f"bias_{kind}_l{layer}{suffix}", torch.zeros(gates))
        self.eval()

    def _suffixes(self):
        return ("", "_reverse") if self.bidirectional else ("",)

    @classmethod
    def from_float(cls, module: nn.Module, weight_dtype: torch.dtype = torch.int8,
                   activation_bits: int = 8):
        """The quantized twin of a float ``module`` (a torch.nn or fastrnn LSTM/GRU/RNN)."""
        name = type(module).__name__
        if getattr(module, "proj_size", 0):
            raise ValueError(f"fastrnn.quantize_weights: {name} with proj_size="
                             f"{module.proj_size} is not supported (projections are not "
                             "quantized); quantize a model without proj_size")
        if isinstance(module, FastRNNBase) and module_options.active(module):
            raise ValueError(f"fastrnn.quantize_weights: {name} with options "
                             f"({module_options.describe(module)}) is not supported; only "
                             "plain LSTM/GRU/RNN layers are quantized")
        if module.weight_ih_l0.device.type != "cpu":
            raise ValueError(f"fastrnn.quantize_weights: the quantized kernels run on CPU; "
                             f"{name}'s weights are on {module.weight_ih_l0.device}")
        kwargs = dict(num_layers=module.num_layers, bias=module.bias,
                      batch_first=module.batch_first, bidirectional=module.bidirectional,
                      weight_dtype=weight_dtype, activation_bits=activation_bits)
        if cls is QuantizedRNN:
            kwargs["nonlinearity"] = module.nonlinearity
        quantized = cls(module.input_size, module.hidden_size, **kwargs)
        for buffer_name, buffer in quantized.named_buffers():
            if "_scale_" in buffer_name:
                continue
            source = getattr(module, buffer_name).detach()
            if buffer_name.startswith("bias"):
                buffer.copy_(source)
            elif weight_dtype == torch.int8:
                q, scale = quantize_rows(source)
                buffer.copy_(q)
                getattr(quantized, buffer_name.replace("_l", "_scale_l", 1)).copy_(scale)
            else:
                buffer.copy_(source.to(torch.bfloat16))
        return quantized

    def weights(self, layer: int, reverse: bool = False):
        """(w_ih, scale_ih, w_hh, scale_hh, b_ih, b_hh) of a layer and direction; the scales
        are None for bfloat16 weights, the biases None without bias."""
        suffix = f"_l{layer}" + ("_reverse" if reverse else "")
        get = lambda name: getattr(self, name, None)  # noqa: E731
        return (get(f"weight_ih{suffix}"), get(f"weight_ih_scale{suffix}"),
                get(f"weight_hh{suffix}"), get(f"weight_hh_scale{suffix}"),
                get(f"bias_ih{suffix}"), get(f"bias_hh{suffix}"))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # copy_ would silently cast int8 weights into bfloat16 buffers (or back).
        for name, buffer in self.named_buffers(recurse=False):
            given = state_dict.get(prefix + name)
            if name.startswith("weight") and given is not None and given.dtype != buffer.dtype:
                raise RuntimeError(f"{type(self).__name__}: {prefix + name} is {given.dtype} in "
                                   f"the state dict but this module holds {buffer.dtype} "
                                   "weights (weight_dtype=)")
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        text = f"{self.input_size}, {self.hidden_size}"
        for name, default in (("num_layers", 1), ("bias", True), ("batch_first", False),
                              ("bidirectional", False)):
            if getattr(self, name) != default:
                text += f", {name}={getattr(self, name)}"
        text += f", weight_dtype={self.weight_dtype}"
        return text + (f", activation_bits={self.activation_bits}"
                       if self.activation_bits != 8 else "")

    def forward(self, input: Tensor, hx=None):
        name = type(self).__name__
        if isinstance(input, nn.utils.rnn.PackedSequence):
            raise TypeError(f"{name} takes a padded tensor, not a PackedSequence")
        if self.training:
            raise RuntimeError(f"{name} is inference-only (its weights are quantized, it cannot "
                               "be trained): call .eval() on it")
        states = () if hx is None else (hx if isinstance(hx, tuple) else (hx,))
        if torch.is_grad_enabled() and any(t.requires_grad for t in (input, *states)):
            raise RuntimeError(f"{name} is inference-only: no gradient flows through it; run "
                               "it under torch.no_grad() or pass tensors that do not require "
                               "grad")
        if input.dim() not in (2, 3):
            raise ValueError(f"{name}: Expected input to be 2D or 3D, got {input.dim()}D "
                             "instead")
        if input.dtype != torch.float32 or input.device.type != "cpu":
            raise RuntimeError(f"{name}: the input must be a float32 CPU tensor (the weights "
                               f"are {self.weight_dtype}, activations float32), got "
                               f"{input.dtype} on {input.device}")
        if input.shape[-1] != self.input_size:
            raise RuntimeError(f"input.size(-1) must be equal to input_size. Expected "
                               f"{self.input_size}, got {input.shape[-1]}")
        batched = input.dim() == 3
        x = input if batched else input.unsqueeze(1)
        if batched and self.batch_first:
            x = x.transpose(0, 1)
        if x.shape[0] == 0:   # as torch.nn
            raise RuntimeError("Expected sequence length to be larger than 0 in RNN")
        lstm = self.mode == "LSTM"
        directions = len(self._suffixes())
        batch = x.shape[1]
        expected = (self.num_layers * directions,) + ((batch,) if batched else ()) + \
            (self.hidden_size,)
        if hx is None:
            states = tuple(x.new_zeros(expected) for _ in range(2 if lstm else 1))
        elif len(states) != (2 if lstm else 1):
            raise ValueError(f"{name}: hx must be {'a tuple (h_0, c_0)' if lstm else 'h_0'}")
        for i, state in enumerate(states):
            if tuple(state.shape) != expected:
                which = f"hidden[{i}]" if lstm else "hidden"
                raise RuntimeError(f"Expected {which} size {expected}, got {list(state.shape)}")
            if state.dtype != torch.float32:
                raise RuntimeError(f"{name}: the states must be float32, got {state.dtype}")
        if not batched:
            states = tuple(s.unsqueeze(1) for s in states)
        from .backends.native import BACKEND
        BACKEND._require()   # builds / loads the extension that defines the op
        op = torch.ops.fastrnn.quantized_layer
        cell = CELLS[self.mode]
        final = [[] for _ in states]
        for layer in range(self.num_layers):
            outputs = []
            for direction in range(directions):
                index = layer * directions + direction
                w_ih, s_ih, w_hh, s_hh, b_ih, b_hh = self.weights(layer, direction == 1)
                out, h_n, c_n = op(cell, x, states[0][index], states[1][index] if lstm else None,
                                   w_ih, s_ih, w_hh, s_hh, b_ih, b_hh, direction == 1,
                                   self.activation_bits)
                outputs.append(out)
                final[0].append(h_n)
                if lstm:
                    final[1].append(c_n)
            x = outputs[0] if directions == 1 else torch.cat(outputs, 2)
        output = x
        result = tuple(torch.stack(f) for f in final)
        if not batched:
            output, result = output.squeeze(1), tuple(r.squeeze(1) for r in result)
        elif self.batch_first:
            output = output.transpose(0, 1)
        return output, (result if lstm else result[0])


class QuantizedLSTM(QuantizedRNNBase):
    def __init__(self, *args, **kwargs):
        super().__init__("LSTM", *args, **kwargs)


class QuantizedGRU(QuantizedRNNBase):
    def __init__(self, *args, **kwargs):
        super().__init__("GRU", *args, **kwargs)


class QuantizedRNN(QuantizedRNNBase):
    def __init__(self, *args, nonlinearity: str = "tanh", **kwargs):
        if nonlinearity not in ("tanh", "relu"):
            raise ValueError(f"Unknown nonlinearity '{nonlinearity}'. Select from 'tanh' or "
                             "'relu'.")
        self.nonlinearity = nonlinearity
        super().__init__(f"RNN_{nonlinearity.upper()}", *args, **kwargs)


_TWINS = {"LSTM": QuantizedLSTM, "GRU": QuantizedGRU, "RNN_TANH": QuantizedRNN,
          "RNN_RELU": QuantizedRNN}


def _quantizable(module: nn.Module) -> bool:
    return isinstance(module, (nn.RNNBase, FastRNNBase)) and module.mode in _TWINS


def quantize_weights(model: nn.Module, dtype: torch.dtype = torch.int8,
                     activation_bits: int = 8) -> nn.Module:
    """A copy of ``model`` with every LSTM / GRU / RNN layer (torch.nn's or fastrnn's)
    replaced by its inference-only quantized twin (:class:`QuantizedLSTM`, ...), weights in
    ``dtype``: ``torch.int8`` (per-row scales) or ``torch.bfloat16``; ``activation_bits``
    (8 or 16) sets the int8 products' activation precision on CPUs with VNNI (module
    docstring). ``model`` itself is
    unchanged; a layer passed alone comes back quantized. Everything else is copied as is."""
    if dtype not in WEIGHT_DTYPES:
        raise ValueError(f"fastrnn.quantize_weights: dtype must be torch.int8 or "
                         f"torch.bfloat16, got {dtype}")
    if activation_bits not in (8, 16):
        raise ValueError(f"fastrnn.quantize_weights: activation_bits must be 8 or 16, got "
                         f"{activation_bits!r}")
    if _quantizable(model):
        return _TWINS[model.mode].from_float(model, dtype, activation_bits)
    model = copy.deepcopy(model)

    def swap(parent: nn.Module):
        for name, child in parent.named_children():
            if _quantizable(child):
                setattr(parent, name, _TWINS[child.mode].from_float(child, dtype,
                                                                    activation_bits))
            else:
                swap(child)
    swap(model)
    return model
