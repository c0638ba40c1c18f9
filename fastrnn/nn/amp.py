"""torch.autocast for fastrnn modules: torch.nn's precision and result dtypes, fastrnn's kernels.

What torch.nn's RNNs do under autocast (torch 2.14; fp32 weights, autocast dtype ``low``):

- every matmul (input and recurrent projections, LSTM's projection) runs in ``low``;
- fused paths cast the input, the states and the weights to ``low`` and return only ``low``:
  cuDNN on CUDA (all modules), and oneDNN on CPU (LSTM without packing or projection, on a
  float32 input, when mkldnn is enabled);
- elsewhere (the CPU default path, and the cells) the pointwise cell math mixes the ``low``
  gate values with the state it is handed, so type promotion decides: RNN results are ``low``;
  GRU's h and LSTM's c are ``promote(low, state dtype)`` (float32 for the default zero
  state of a float32 input); LSTM's h is ``low`` with a projection, else c's dtype.

fastrnn mirrors this: the input projection is the same ``F.linear`` (autocast makes it
``low``), the recurrence op runs with autocast off on tensors cast to one compute dtype, and
its results are cast to the dtypes torch.nn would return. The compute dtype is ``low`` on
CUDA, as cuDNN does (fastrnn's gate math accumulates in float32, see docs/op-contract.md),
and float32 on CPU, where fastrnn's native kernels take float32/float64 (the recurrent matmul
is then more precise than torch.nn's bfloat16 one).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .. import ops

# Dtypes autocast casts (torch's "eligible" tensors): floating point, not double.
_ELIGIBLE = (torch.float32, torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class Plan:
    device_type: str
    compute: torch.dtype           # dtype of every tensor the recurrence op gets
    hidden: torch.dtype            # dtype of output and h_n
    cell: Optional[torch.dtype]    # dtype of c_n (LSTM)

    def recurrence(self, cell, xproj, h0, c0, w_hh, b_hh, w_hr, batch_sizes, reverse, backend,
                   options=None):
        """ops.recurrence in the compute dtype, results in torch.nn's dtypes."""
        return self.results(*self.compute_recurrence(cell, xproj, h0, c0, w_hh, b_hh, w_hr,
                                                     batch_sizes, reverse, backend, options))

    def compute_recurrence(self, cell, xproj, h0, c0, w_hh, b_hh, w_hr, batch_sizes, reverse,
                           backend, options=None):
        """ops.recurrence in the compute dtype, results in it too (a layer run in segments
        carries its state between them in the dtype the op keeps it in)."""
        if options is not None:
            options = type(options)(*map(self.cast, options))
        cast = self.cast
        # Autocast off: the kernels must not have their own matmuls recast behind their back.
        with torch.autocast(self.device_type, enabled=False):
            return ops.recurrence(cell, cast(xproj), cast(h0), cast(c0), cast(w_hh), cast(b_hh),
                                  cast(w_hr), batch_sizes, reverse, backend, options)

    def cast(self, t):
        return t.to(self.compute) if isinstance(t, torch.Tensor) else t

    def results(self, output, h_n, c_n):
        """The recurrence's results in torch.nn's dtypes."""
        return (output.to(self.hidden), h_n.to(self.hidden),
                None if c_n is None else c_n.to(self.cell))


def _low(device: torch.device, *dtypes) -> Optional[torch.dtype]:
    """The autocast dtype when autocast applies to a call on these dtypes, else None."""
    if not torch.is_autocast_enabled(device.type) or any(d not in _ELIGIBLE for d in dtypes):
        return None
    return torch.get_autocast_dtype(device.type)


def _plan(device, low, mode, h_dtype, c_dtype, projected, fused) -> Plan:
    compute = low if device.type == "cuda" else torch.float32
    if fused:
        return Plan(device.type, compute, low, low if mode == "LSTM" else None)
    if mode == "LSTM":
        cell = torch.promote_types(low, c_dtype)
        return Plan(device.type, compute, low if projected else cell, cell)
    if mode == "GRU":
        return Plan(device.type, compute, torch.promote_types(low, h_dtype), None)
    return Plan(device.type, compute, low, None)


@torch.compiler.assume_constant_result  # torch.compile cannot trace these queries
def _library_enabled(name: str) -> bool:
    """Whether torch.nn would take the cuDNN / oneDNN (mkldnn) path: built in and enabled."""
    library = getattr(torch.backends, name)
    return bool(library.is_available() and library.enabled)


def layers_plan(module, input: torch.Tensor, hx: tuple, packed: bool) -> Optional[Plan]:
    """The plan for fastrnn.LSTM/GRU/RNN on ``input`` (time-major rows), or None when
    autocast does not apply."""
    low = _low(input.device, input.dtype, module.weight_ih_l0.dtype)
    if low is None:
        return None
    if input.device.type == "cuda":
        fused = _library_enabled("cudnn")
    else:
        fused = (module.mode == "LSTM" and not packed and not module.proj_size
                 and input.dtype == torch.float32 and _library_enabled("mkldnn"))
    return _plan(input.device, low, module.mode, hx[0].dtype,
                 hx[1].dtype if len(hx) > 1 else None, module.proj_size > 0, fused)


def cell_plan(module, mode: str, input: torch.Tensor, states: tuple) -> Optional[Plan]:
    """The plan for fastrnn.LSTMCell/GRUCell/RNNCell, or None when autocast does not apply."""
    low = _low(input.device, input.dtype, module.weight_ih.dtype)
    if low is None:
        return None
    return _plan(input.device, low, mode, states[0].dtype,
                 states[1].dtype if len(states) > 1 else None, False, False)
