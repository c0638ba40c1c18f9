"""The triton backend: picks the persistent kernel where the weights fit on chip, else the
step path, and keeps the op contract (docs/op-contract.md: shapes, packed layout, workspace)."""
from __future__ import annotations

import os
from typing import Optional

import torch

from ...spec import CELLS, LEARNABLE, workspace_layout
from ..base import Backend, no_rows_backward, step_layout
from . import persistent, step
from ._gates import CELL_IDS, NUM_GATES
from ._layout import batch_index, previous_rows
from .autotune import interpreted, interpreter_ready

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
KERNELS = ("auto", "step", "persistent")
HALF = (torch.float16, torch.bfloat16)
# Options (fastrnn.spec) run on the step path only.
OPTION_CELLS = tuple(name for name, cell in CELLS.items() if cell.options)


def _c(t):
    return None if t is None else t.contiguous()


class TritonBackend(Backend):
    """``kernel``: "auto" (persistent where it fits, else step), "step" or "persistent";
    None reads FASTRNN_TRITON_KERNEL (default auto) at every call."""

    name = "triton"

    def __init__(self, kernel: Optional[str] = None):
        if kernel is not None and kernel not in KERNELS:
            raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
        self.kernel = kernel

    # ------------------------------------------------------------ what can run

    def _kernel_choice(self) -> str:
        choice = self.kernel or os.environ.get("FASTRNN_TRITON_KERNEL", "auto") or "auto"
        if choice not in KERNELS:
            raise ValueError(f"FASTRNN_TRITON_KERNEL={choice!r}; allowed: {', '.join(KERNELS)}")
        return choice

    @staticmethod
    def _cannot_persist(cell, hidden, proj, option_names):
        """Why the persistent kernel cannot run a call, or None where it can."""
        if option_names:  # the step path runs the options; the persistent kernel has none
            return (f"the persistent Triton kernel does not run the options "
                    f"{', '.join(option_names)}; use FASTRNN_TRITON_KERNEL=auto or step (the step "
                    "kernels run them)")
        if not persistent.fits(NUM_GATES[cell], hidden, proj):
            return (f"the persistent kernel cannot hold the weights of hidden_size={hidden}, "
                    f"proj_size={proj} on chip; use FASTRNN_TRITON_KERNEL=auto or step")
        return None

    def _persistent(self, cell, hidden, proj, option_names=()) -> bool:
        choice = self._kernel_choice()
        reason = self._cannot_persist(cell, hidden, proj, option_names)
        if choice == "persistent" and reason is not None:
            raise ValueError(reason)
        return choice == "persistent" or (choice == "auto" and reason is None)

    def unavailable_reason(self, device):
        device = torch.device(device)
        if interpreted(step._step_forward_kernel):
            if not interpreter_ready():
                return ("TRITON_INTERPRET=1 was set after triton was imported; set it before "
                        "anything imports triton")
            return None if device.type in ("cpu", "cuda") else \
                f"the Triton interpreter runs on cpu tensors, not {device.type}"
        if device.type == "cuda":
            return None if torch.cuda.is_available() else "no CUDA device is present"
        if device.type == "cpu":
            return ("Triton kernels run on CPU only under the interpreter (TRITON_INTERPRET=1 set "
                    "before fastrnn.backends.triton is imported), which is meant for tests")
        return f"Triton kernels do not run on {device.type} tensors"

    def unsupported_reason(self, cell, dtype, device, hidden_size, proj_size, option_names=()):
        if dtype not in SUPPORTED_DTYPES:
            return f"dtype {dtype} is not supported (float32, float16 and bfloat16 are)"
        if cell not in CELL_IDS:
            return f"unknown cell {cell!r}"
        if option_names and cell not in OPTION_CELLS:
            return f"the {cell} op has no options ({', '.join(option_names)} given)"
        if self._kernel_choice() == "persistent":
            return self._cannot_persist(cell, hidden_size, proj_size, option_names)
        return None

    # ------------------------------------------------------------ forward

    def forward(self, cell, xproj, h0, c0, w_hh, b_hh, w_hr, batch_sizes, reverse, options=None,
                need_workspace=True):
        # need_workspace is not used yet: the kernels write every step's rows (ops.py drops
        # them when it is false).
        cell_id, G = CELL_IDS[cell], NUM_GATES[cell]
        xproj, h0, c0, w_hh, b_hh, w_hr = map(_c, (xproj, h0, c0, w_hh, b_hh, w_hr))
        options, option_names, layout = _options(cell, options, w_hh, w_hr)
        dtype, dev = xproj.dtype, xproj.device
        acc = torch.float32 if dtype in HALF else dtype
        N, (B, P), H = xproj.shape[0], h0.shape, w_hh.shape[0] // G
        width = layout["width"].stop
        output = torch.empty(N, P, dtype=dtype, device=dev)
        ws = torch.empty(N, width, dtype=acc, device=dev)
        sizes, offsets = step_layout(N, B, batch_sizes)
        if N == 0:
            return output, h0.clone(), None if c0 is None else c0.clone(), ws

        if self._persistent(cell, H, P if w_hr is not None else 0, option_names):
            bs, offs = self._steps_on(dev, sizes, offsets)
            h_n = torch.empty_like(h0)
            c_n = None if c0 is None else torch.empty_like(c0)
            persistent.forward(cell_id, xproj, h0, c0, w_hh, b_hh, w_hr, bs, offs, reverse,
                               output, ws, h_n, c_n)
            return output, h_n, c_n, ws

        h_n, c_n = step.forward(cell_id, xproj, h0, c0, w_hh, b_hh, w_hr, sizes, offsets,
                                reverse, output, ws, options, layout)
        return output, h_n.to(dtype), None if c_n is None else c_n.to(dtype), ws

    # ------------------------------------------------------------ backward

    def backward(self, cell, grad_output, grad_h_n, grad_c_n, h0, c0, w_hh, b_hh, w_hr,
                 batch_sizes, reverse, output, workspace, options=None):
        """The 6 gradients of the op contract; with ``options`` (not None) also those of the
        learnable option arguments, in spec.LEARNABLE order (None where absent)."""
        cell_id, G = CELL_IDS[cell], NUM_GATES[cell]
        (grad_output, grad_h_n, grad_c_n, h0, c0, w_hh, w_hr, output, workspace) = map(
            _c, (grad_output, grad_h_n, grad_c_n, h0, c0, w_hh, w_hr, output, workspace))
        given, (options, option_names, layout) = options, _options(cell, options, w_hh, w_hr)
        dtype, dev = output.dtype, output.device
        N, (B, P), H = output.shape[0], h0.shape, w_hh.shape[0] // G
        sizes, offsets = step_layout(N, B, batch_sizes)
        if N == 0:
            return no_rows_backward(grad_h_n, grad_c_n, w_hh, w_hr, given)
        learned = {}  # gradients of the learnable option arguments, by name

        if self._persistent(cell, H, P if w_hr is not None else 0, option_names):
            bs, offs = self._steps_on(dev, sizes, offsets)
            gx, gh0, gc0, gw, gb, gwr = persistent.backward(
                cell_id, grad_output, grad_h_n, grad_c_n, h0, c0, w_hh, w_hr, bs, offs,
                reverse, output, workspace)
        else:
            # every row's state before its step, for the weight gradient and the gate math
            prev = previous_rows(sizes, offsets, B, reverse, dev)
            h_prev_all = torch.cat([h0, output])[prev]
            c_prev_all = None if c0 is None else torch.cat(
                [c0.to(workspace.dtype), workspace[:, layout["c"]]])[prev]
            gx, gh0, gc0, d_hh, d_a, d_out_all, rows = step.backward(
                cell_id, grad_output, grad_h_n, grad_c_n, h_prev_all, c_prev_all, w_hh, w_hr,
                sizes, offsets, reverse, output, workspace, options, layout)
            h_rec_all = h_prev_all.to(d_hh.dtype)  # what the forward GEMM saw
            keep = getattr(options, "recurrent_mask", None)
            if keep is not None:
                h_rec_all = h_rec_all * keep.to(d_hh.dtype)[batch_index(sizes, offsets, dev)]
            gw = d_a.t() @ h_rec_all  # one GEMM over all steps
            gb = d_hh.sum(0)
            gwr = None if w_hr is None else d_out_all.t() @ workspace[:, layout["h_pre"]]
            learned = {name: r.sum(0) for name, r in rows.items()}
        cast = lambda t: None if t is None else t.to(dtype)  # noqa: E731
        grads = cast(gx), cast(gh0), cast(gc0), cast(gw), cast(gb), cast(gwr)
        return grads if given is None else grads + tuple(cast(learned.get(name))
                                                         for name in LEARNABLE)

    @staticmethod
    def _steps_on(device, sizes, offsets):
        steps = torch.tensor([sizes, offsets[:-1]], dtype=torch.int32).to(device)
        return steps[0], steps[1]


def _options(cell, options, w_hh, w_hr):
    """-> (options with contiguous tensors or None when no option is on, the names of the
    options that are on, the workspace layout)."""
    option_names = () if options is None else options.option_names()
    if option_names:
        options = type(options)(*[_c(v) if isinstance(v, torch.Tensor) else v
                                  for v in options])
    hidden = w_hh.shape[0] // NUM_GATES[cell]
    proj = 0 if w_hr is None else w_hr.shape[0]
    return (options if option_names else None), option_names, workspace_layout(cell, hidden, proj,
                                                                        option_names)
