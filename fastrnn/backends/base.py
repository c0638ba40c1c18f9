"""What a backend provides: generic recurrence kernels for every cell kind, forward and backward.

A backend module ``fastrnn.backends.<name>`` exposes ``BACKEND``, an instance of a subclass of
:class:`Backend`. The ops in :mod:`fastrnn.ops` call it with the cell name ("lstm", "gru",
"rnn_tanh", "rnn_relu") and the tensors of the op schema (documented there); arguments that a
cell kind does not have (c0, w_hr, grad_c_n for gru/rnn) are None, and so are the matching
results.
"""
from __future__ import annotations

import itertools
from typing import List, Optional, Tuple

import torch

from ..spec import CELLS, LEARNABLE, accumulate_dtype, option_names, workspace_width

Tensor = torch.Tensor


def step_layout(num_rows: int, batch: int,
                batch_sizes: Optional[torch.Tensor]) -> Tuple[List[int], List[int]]:
    """Live rows of every step and the offset of its first row (len T + 1)."""
    if batch_sizes is None:
        sizes = [batch] * (num_rows // batch if batch else 0)
    else:
        sizes = [int(s) for s in batch_sizes.tolist()]
    return sizes, [0, *itertools.accumulate(sizes)]


def fake_forward(cell: str, xproj: Tensor, h0: Tensor, c0: Optional[Tensor], w_hh: Tensor,
                 w_hr: Optional[Tensor], options=None, need_workspace: bool = True):
    """Uninitialised results of a forward's shapes (the fake impls): (output, h_n, c_n or an
    empty [0] for cells without one, workspace; [0, W] without need_workspace)."""
    hidden = w_hh.shape[0] // CELLS[cell].num_gates
    width = workspace_width(cell, hidden, 0 if w_hr is None else w_hr.shape[0],
                            option_names(options))
    return (xproj.new_empty(xproj.shape[0], h0.shape[1]), h0.new_empty(h0.shape),
            xproj.new_empty(0) if c0 is None else c0.new_empty(c0.shape),
            xproj.new_empty(xproj.shape[0] if need_workspace else 0, width,
                            dtype=accumulate_dtype(xproj.dtype)))


def fake_backward(output: Tensor, h0: Tensor, c0: Optional[Tensor], w_hh: Tensor,
                  w_hr: Optional[Tensor], options=None):
    """Uninitialised results of a backward op's shapes: the gradient of every tensor input and
    learnable option, an empty [0] where that input is absent."""
    like = lambda t: output.new_empty(0) if t is None else t.new_empty(t.shape)  # noqa: E731
    return (output.new_empty(output.shape[0], w_hh.shape[0]), like(h0), like(c0), like(w_hh),
            w_hh.new_empty(w_hh.shape[0]), like(w_hr),
            *(like(getattr(options, name, None)) for name in LEARNABLE))


def no_rows_forward(cell: str, xproj: Tensor, h0: Tensor, c0: Optional[Tensor], w_hh: Tensor,
                    w_hr: Optional[Tensor], options=None):
    """Forward of a call without rows (batch 0, or a packed batch of empty steps): nothing
    runs, the states pass through, as in torch.nn."""
    output, _, _, workspace = fake_forward(cell, xproj, h0, c0, w_hh, w_hr, options)
    return output, h0.clone(), None if c0 is None else c0.clone(), workspace


def no_rows_backward(grad_h_n: Tensor, grad_c_n: Optional[Tensor], w_hh: Tensor,
                     w_hr: Optional[Tensor], options=None):
    """Backward of a call without rows: the state gradients pass through, the weights get
    zeros (torch.nn's gradients for an empty batch)."""
    grads = (w_hh.new_zeros(0, w_hh.shape[0]), grad_h_n.clone(),
             None if grad_c_n is None else grad_c_n.clone(), torch.zeros_like(w_hh),
             w_hh.new_zeros(w_hh.shape[0]), None if w_hr is None else torch.zeros_like(w_hr))
    learnable = () if options is None else [getattr(options, name) for name in LEARNABLE]
    return grads + tuple(None if t is None else torch.zeros_like(t) for t in learnable)


class Backend:
    name: str = ""

    def unavailable_reason(self, device: torch.device) -> Optional[str]:
        """None when the backend can run on ``device``, else why not (shown to the user)."""
        raise NotImplementedError

    def unsupported_reason(self, cell: str, dtype: torch.dtype, device: torch.device,
                           hidden_size: int, proj_size: int,
                           option_names: Tuple[str, ...] = ()) -> Optional[str]:
        """None when this call can be served, else why not (dtype, size, a variant option:
        ``option_names`` names the options that are on, see fastrnn.spec)."""
        if option_names:
            return f"the {self.name} backend does not run the options {', '.join(option_names)}"
        return None

    def forward(self, cell: str, xproj: Tensor, h0: Tensor, c0: Optional[Tensor],
                w_hh: Tensor, b_hh: Optional[Tensor], w_hr: Optional[Tensor],
                batch_sizes: Optional[Tensor], reverse: bool, options=None,
                need_workspace: bool = True):
        """-> (output [N, P], h_n [B, P], c_n [B, H] or None, workspace [N, W]).
        ``options``: None or a fastrnn.spec.StepOptions (only if unsupported_reason
        accepted the options that are on). ``need_workspace`` false: no backward will follow, so the
        workspace may come back empty [0, W] (a backend that returns it whole anyway is
        correct; the op then drops it)."""
        raise NotImplementedError

    def backward(self, cell: str, grad_output: Tensor, grad_h_n: Tensor,
                 grad_c_n: Optional[Tensor], h0: Tensor, c0: Optional[Tensor], w_hh: Tensor,
                 b_hh: Optional[Tensor], w_hr: Optional[Tensor],
                 batch_sizes: Optional[Tensor], reverse: bool, output: Tensor,
                 workspace: Tensor, options=None):
        """-> (grad_xproj, grad_h0, grad_c0 or None, grad_w_hh, grad_b_hh, grad_w_hr or None),
        and with ``options`` the gradient of each learnable option argument, in the order of
        ``spec.LEARNABLE`` (None where absent)."""
        raise NotImplementedError
