"""The native backend: the C++ CPU and CUDA recurrence kernels of csrc/.

The extension is built on first use (:mod:`fastrnn.build`, cached across processes) and
defines ``torch.ops.fastrnn.native_forward`` / ``native_backward``, one generic op per
direction taking the cell name. Their fake (meta) impls live here, so they trace under
``torch.compile`` and pass ``torch.library.opcheck``.

Options (fastrnn.spec) are the ops' trailing arguments; backward then also returns the
learnable options' gradients. The CPU kernels run every option
(tests/test_native_variants.py); on CUDA :meth:`NativeBackend.unsupported_reason` refuses
them until they are verified on a GPU (fastrnn.backends.routing.GPU_VERIFIED).

When the extension cannot be built, :meth:`NativeBackend.unavailable_reason` says why (with
the build log's path), so ``backend="auto"`` falls back to the reference backend with one
warning and ``backend="native"`` raises that reason.
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import build
from ..spec import CELLS, LEARNABLE, OPTION_FIELDS, OPTIONS, StepOptions, bind
from .routing import GPU_VERIFIED, STREAM_STEPS
from .base import Backend, fake_backward, fake_forward, no_rows_backward, no_rows_forward

# bfloat16 on CPU: the C++ recurrence (recurrence.h) runs float32 and float64. An inference
# call of a plain layer (no workspace kept for backward, no options, projection or packed
# input) runs the streaming kernel of csrc/quantized.h instead: w_hh read as bfloat16, state,
# sums and gate math in float32. Every other bfloat16 call runs the reference backend's
# float32 computation, and so does its backward.
CPU_DTYPES = (torch.float32, torch.float64, torch.bfloat16)
CUDA_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
# Options each device's kernels run and are tested for (CUDA: once verified on a GPU).
SUPPORTED_OPTIONS = {
    "cpu": tuple(o.name for o in OPTIONS),
    "cuda": tuple(o.name for o in OPTIONS) if "options" in GPU_VERIFIED["native"] else (),
}


def _option_args(options: Optional[StepOptions]):
    """The native ops' option arguments, in spec order (None where off)."""
    return tuple(options) if options is not None else (None,) * len(StepOptions._fields)


# The native ops' arguments before the options (csrc/registration.cpp).
_FORWARD_ARGS = ("cell", "xproj", "h0", "c0", "w_hh", "b_hh", "w_hr", "batch_sizes", "reverse")
_BACKWARD_ARGS = ("cell", "grad_output", "grad_h_n", "grad_c_n", "h0", "c0", "w_hh", "b_hh",
                  "w_hr", "batch_sizes", "reverse", "output", "workspace")


def _register_fakes() -> None:
    """Shapes of the native ops' results (fastrnn/ops.py), for tracing."""

    @torch.library.register_fake("fastrnn::native_forward")
    def _forward_fake(*args, **kwargs):
        v = bind(_FORWARD_ARGS, args, kwargs, ("need_workspace",))
        options = StepOptions(**{name: v[name] for name in StepOptions._fields})
        return fake_forward(v["cell"], v["xproj"], v["h0"], v["c0"], v["w_hh"], v["w_hr"],
                            options, v.get("need_workspace", True))

    @torch.library.register_fake("fastrnn::native_backward")
    def _backward_fake(*args, **kwargs):
        v = bind(_BACKWARD_ARGS, args, kwargs)
        return fake_backward(v["output"], v["h0"], v["c0"], v["w_hh"], v["w_hr"],
                             StepOptions(**{name: v[name] for name in StepOptions._fields}))


class NativeBackend(Backend):
    name = "native"

    def __init__(self):
        self._error: Optional[str] = None
        self._loaded = False

    def _load(self) -> Optional[str]:
        """Build/load the extension once per process; None on success, else the reason."""
        if not self._loaded and self._error is None:
            try:
                build.load()
                _register_fakes()
                self._loaded = True
            except build.BuildError as exc:
                self._error = str(exc)
        return self._error

    def unavailable_reason(self, device: torch.device) -> Optional[str]:
        device = torch.device(device)
        if device.type not in ("cpu", "cuda"):
            return f"the native kernels run on CPU and CUDA, not {device.type}"
        if device.type == "cuda" and not torch.cuda.is_available():
            return "no CUDA device is available"
        return self._load()

    def unsupported_reason(self, cell, dtype, device, hidden_size, proj_size, option_names=()):
        device = torch.device(device)
        allowed = CUDA_DTYPES if device.type == "cuda" else CPU_DTYPES
        if dtype not in allowed:
            names = ", ".join(str(d).replace("torch.", "") for d in allowed)
            return (f"the native {device.type} kernels support {names}, "
                    f"not {str(dtype).replace('torch.', '')}")
        if cell not in CELLS:
            return f"unknown cell {cell!r}"
        if option_names and not OPTION_FIELDS.get(cell):
            return f"{cell} takes no options (got {', '.join(option_names)})"
        missing = [f for f in option_names if f not in SUPPORTED_OPTIONS.get(device.type, ())]
        if missing:
            why = (" (the CUDA option kernels are not verified on a GPU: "
                   "fastrnn.backends.routing.GPU_VERIFIED)"
                   if device.type == "cuda" else "")
            return (f"the native {device.type} kernels do not run the options "
                    f"{', '.join(missing)}{why}")
        return None

    def forward(self, cell, xproj, h0, c0, w_hh, b_hh, w_hr, batch_sizes, reverse,
                options=None, need_workspace=True):
        self._require()
        if _cpu_bfloat16(xproj):
            if need_workspace or options is not None or w_hr is not None or \
                    batch_sizes is not None or xproj.shape[0] == 0:
                return _reference().forward(cell, xproj, h0, c0, w_hh, b_hh, w_hr, batch_sizes,
                                            reverse, options=options,
                                            need_workspace=need_workspace)
            return _bfloat16_inference(cell, xproj, h0, c0, w_hh, b_hh, reverse)
        if xproj.shape[0] == 0:   # the kernels' layout checks want live rows in every step
            return no_rows_forward(cell, xproj, h0, c0, w_hh, w_hr, options)
        output, h_n, c_n, workspace = torch.ops.fastrnn.native_forward(
            cell, xproj, h0, c0, w_hh, b_hh, w_hr, batch_sizes, reverse,
            *_option_args(options), need_workspace)
        return output, h_n, (c_n if CELLS[cell].has_cell_state else None), workspace

    def backward(self, cell, grad_output, grad_h_n, grad_c_n, h0, c0, w_hh, b_hh, w_hr,
                 batch_sizes, reverse, output, workspace, options=None):
        self._require()
        if _cpu_bfloat16(output):   # its forward ran on the reference backend (CPU_DTYPES)
            return _reference().backward(cell, grad_output, grad_h_n, grad_c_n, h0, c0, w_hh,
                                         b_hh, w_hr, batch_sizes, reverse, output, workspace,
                                         options=options)
        if output.shape[0] == 0:
            return no_rows_backward(grad_h_n, grad_c_n if CELLS[cell].has_cell_state else None,
                                    w_hh, w_hr, options)
        grads = torch.ops.fastrnn.native_backward(
            cell, grad_output, grad_h_n, grad_c_n, h0, c0, w_hh, b_hh, w_hr, batch_sizes,
            reverse, output, workspace, *_option_args(options))
        grad_xproj, grad_h0, grad_c0, grad_w_hh, grad_b_hh, grad_w_hr = grads[:6]
        result = (grad_xproj, grad_h0, grad_c0 if CELLS[cell].has_cell_state else None,
                  grad_w_hh, grad_b_hh, grad_w_hr if w_hr is not None else None)
        if options is None:
            return result
        option_grads = dict(zip(LEARNABLE, grads[6:]))
        return result + tuple(None if getattr(options, name) is None else option_grads[name]
                              for name in LEARNABLE)

    def _require(self):
        reason = self._load()
        if reason is not None:
            raise RuntimeError(f"fastrnn native backend unavailable: {reason}")


def release_scratch() -> None:
    """Free the memory the native CPU ops keep between calls.

    The ops' large CPU buffers (outputs, the workspace kept for backward, gradients, per-step
    scratch) come from a pool: a buffer freed by its last user goes back to the pool, already
    faulted in, and the next call takes it instead of new memory from the C allocator (whose
    fresh pages the kernel faults in and zeroes on every call). The pool caches at most as many
    bytes as were ever in use at once; this frees what it caches now. Buffers still in live
    tensors are kept and come back to the pool when freed. ``FASTRNN_NATIVE_POOL=0`` (set
    before the first native call) turns the pool off."""
    BACKEND._require()
    torch.ops.fastrnn.native_release_scratch()


def scratch_stats() -> dict:
    """The native CPU buffer pool's bytes: ``cached`` (free, kept for later calls),
    ``in_use`` (in live tensors) and ``peak`` (the most ever in use at once)."""
    BACKEND._require()
    cached, in_use, peak = torch.ops.fastrnn.native_scratch_stats()
    return {"cached": cached, "in_use": in_use, "peak": peak}


def _cpu_bfloat16(t: torch.Tensor) -> bool:
    return t.dtype == torch.bfloat16 and t.device.type == "cpu"


def _reference():
    from . import get
    return get("reference")


def _bfloat16_inference(cell, xproj, h0, c0, w_hh, b_hh, reverse):
    """A bfloat16 CPU forward without workspace (CPU_DTYPES): float32 in the kernel, results
    in bfloat16 as the reference backend returns them."""
    f32 = lambda t: None if t is None else t.float().contiguous()  # noqa: E731
    output, h_n, c_n = torch.ops.fastrnn.quantized_recurrence(
        cell, f32(xproj), f32(h0), f32(c0), w_hh.contiguous(), None, f32(b_hh), reverse)
    workspace = fake_forward(cell, xproj, h0, c0, w_hh, None, None, False)[3]   # [0, W]
    return (output.to(xproj.dtype), h_n.to(xproj.dtype),
            None if c0 is None else c_n.to(xproj.dtype), workspace)


# A plain float32 CPU inference call at up to FUSED_MAX_BATCH streams (batch rows, those
# csrc/quantized.h serves as matrix-vector products) runs each layer on csrc/quantized.cpp's
# loop (fused_layer): a call of at most routing.STREAM_STEPS frames as one op (the chunk's
# input projection too), a longer one with F.linear (MKL) for its input projection, which
# reads w_ih once for all frames, then the same recurrence.
FUSED_MAX_BATCH = 8
_PLAIN = (torch.Tensor, torch.nn.Parameter)


def fused_layer(backend: str, cell: str, x, h0, c0, w_ih, w_hh, b_ih, b_hh, reverse: bool,
                batch=None):
    """One layer and direction of a plain float32 CPU inference call on the native backend at
    a small batch: csrc/quantized.cpp's loop on the module's own float32 weights, each
    product reading its weight as stored: nothing is prepared or cached, so nothing can go
    stale. A call of at most routing.STREAM_STEPS frames is one op call (quantized_layer: the
    input projection of the chunk's frames, then each step's recurrent product and gate
    math), so a one-frame call is one op call instead of F.linear plus the recurrence op; a
    longer call projects its input with F.linear, then runs quantized_recurrence.
    ``x``: [steps, batch, input], or time-major rows [steps * batch, input] with ``batch``
    given; h0 and c0 [batch, hidden] or [1, batch, hidden]. Returns
    (output [steps, batch, hidden], h_n, c_n or None; the states shaped like h0), or None
    where it does not apply: another backend or dtype, a gradient wanted, a batch above
    FUSED_MAX_BATCH, a tensor that is not plain, a weight not contiguous, or a trace /
    compile / dispatch mode (the caller then runs the input projection and the recurrence
    op)."""
    if backend != "native" or x.dtype != torch.float32 or x.device.type != "cpu":
        return None
    # Before any size is read: under torch.compile / export a size test would guard on it.
    if torch.jit.is_tracing() or torch.compiler.is_compiling() or \
            torch._C._is_torch_function_mode_enabled() or \
            torch._C._len_torch_dispatch_stack() > 0:
        return None
    if batch is None:
        batch = x.shape[1]
    if not 0 < batch <= FUSED_MAX_BATCH:
        return None
    grad = torch.is_grad_enabled()
    for t in (x, h0, c0):   # the op makes the input and states contiguous
        if t is not None and (type(t) not in _PLAIN or t.dtype != torch.float32 or
                              (grad and t.requires_grad)):
            return None
    for t in (w_ih, w_hh, b_ih, b_hh):
        if t is not None and (type(t) not in _PLAIN or t.dtype != torch.float32 or
                              (grad and t.requires_grad) or not t.is_contiguous()):
            return None
    if x.dim() == 2:
        x = x.view(-1, batch, x.shape[1])
    return run_layer(cell, x, h0, c0, w_ih, w_hh, b_ih, b_hh, reverse)


def run_layer(cell: str, x, h0, c0, w_ih, w_hh, b_ih, b_hh, reverse: bool):
    """fused_layer's computation without its checks, on x [steps, batch, input]: for a caller
    that has made them (the module's repeated stream calls, nn/rnn.py). The ops check the
    tensors' dtype, device and shapes and raise a RuntimeError on any other."""
    layer, recurrence = _OPS if _OPS else _layer_ops()
    if _DIRECT and not _profiling() and _transform() is None:
        # nothing of the dispatcher is wanted: the extension's own functions, same kernels
        layer, recurrence = _DIRECT
    steps = x.shape[0]
    if steps > STREAM_STEPS:
        batch = x.shape[1]
        xproj = torch.nn.functional.linear(x.reshape(steps * batch, x.shape[2]), w_ih, b_ih)
        output, h_n, c_n = recurrence(cell, xproj, h0, c0, w_hh, None, b_hh, reverse, 8)
        output = output.view(steps, batch, output.shape[1])
    else:
        output, h_n, c_n = layer(cell, x, h0, c0, w_ih, None, w_hh, None, b_ih, b_hh, reverse,
                                  8)   # activation_bits: unused by float32 weights
    return output, h_n, (None if c0 is None else c_n)


# The two ops' overloads, looked up once (the extension loads on first use): the lookup
# through torch.ops costs a one-frame call microseconds, more with cold caches. Their C++
# entry (``_op``) is what the overload's __call__ forwards to; called directly it spares a
# Python frame (about 8 us of a one-frame call with cold caches).
_OPS = ()
# The same kernels as the extension module's pybind11 functions (build.python_module), for
# calls that need nothing of the dispatcher: those of run_layer's callers (no gradient, trace,
# compile or Python mode; they check) when no profiler records ops and no torch.func
# transform (vmap, grad) wraps the tensors. The boxed op call costs a one-frame call about
# 20 us more with cold caches. Empty where the library has no such functions.
_DIRECT = ()
_profiling = torch._C._autograd._profiler_enabled
_transform = torch._C._functorch.peek_interpreter_stack


def _layer_ops():
    global _OPS, _DIRECT
    _OPS = tuple(getattr(op, "_op", op) for op in (torch.ops.fastrnn.quantized_layer.default,
                                                   torch.ops.fastrnn.quantized_recurrence.default))
    module = build.python_module()
    _DIRECT = () if module is None else (module.quantized_layer, module.quantized_recurrence)
    return _OPS


BACKEND = NativeBackend()
