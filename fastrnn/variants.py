"""Variant options of the lstm and gru ops: what cuDNN cannot run (see fastrnn.ops).

Layer norm of the recurrent pre-activation and of the cell state, a recurrent dropout mask,
zoneout, cell / projection clipping and a clip of the gradient of every gate pre-activation
inside backward. The math, the workspace columns and the backward are specified in the
docstring of :mod:`fastrnn.ops`; this module holds the pieces every layer shares: the options
tuple the backends receive, which options each cell kind has, and the workspace layout.
"""
from __future__ import annotations

from typing import Dict, NamedTuple, Optional, Tuple

import torch

Tensor = torch.Tensor

LAYER_NORM_EPS = 1e-5


class StepOptions(NamedTuple):
    """The variant arguments of one op call; None = off."""
    ln_weight: Optional[Tensor] = None       # [G*H] LN gain of the recurrent pre-activation
    ln_bias: Optional[Tensor] = None         # [G*H]
    ln_c_weight: Optional[Tensor] = None     # [H] LN gain of the cell state (lstm)
    ln_c_bias: Optional[Tensor] = None       # [H]
    recurrent_mask: Optional[Tensor] = None  # [B, P] multiplies h before the recurrent GEMM
    zoneout_h: Optional[Tensor] = None       # [N, P] weight of the previous h per row
    zoneout_c: Optional[Tensor] = None       # [N, H] weight of the previous c per row (lstm)
    cell_clip: Optional[float] = None        # clamp of the new cell state (lstm)
    proj_clip: Optional[float] = None        # clamp of the projected h (lstm with w_hr)
    grad_clip: Optional[float] = None        # clamp of gate pre-activation grads, backward

    def features(self) -> Tuple[str, ...]:
        """Names of the options that are on, in a fixed order (hashable, for resolve)."""
        on = []
        for feature, field in FEATURE_FIELDS:
            if getattr(self, field) is not None:
                on.append(feature)
        return tuple(on)


# feature name -> the field that switches it on (ln_bias / ln_c_bias go with their weights)
FEATURE_FIELDS = (("layer_norm", "ln_weight"), ("layer_norm_cell", "ln_c_weight"),
                  ("recurrent_mask", "recurrent_mask"), ("zoneout_h", "zoneout_h"),
                  ("zoneout_c", "zoneout_c"), ("cell_clip", "cell_clip"),
                  ("proj_clip", "proj_clip"), ("grad_clip", "grad_clip"))
TENSOR_FIELDS = ("ln_weight", "ln_bias", "ln_c_weight", "ln_c_bias", "recurrent_mask",
                 "zoneout_h", "zoneout_c")

# The options each op takes, in schema order (after ``backend``).
OPTION_FIELDS = {
    "lstm": StepOptions._fields,
    "gru": ("ln_weight", "ln_bias", "recurrent_mask", "zoneout_h", "grad_clip"),
    "rnn_tanh": (),
    "rnn_relu": (),
}
# Gradients the backward op adds for its learnable options.
GRAD_FIELDS = {"lstm": ("ln_weight", "ln_bias", "ln_c_weight", "ln_c_bias"),
               "gru": ("ln_weight", "ln_bias"), "rnn_tanh": (), "rnn_relu": ()}


def make(cell: str, values) -> Optional[StepOptions]:
    """StepOptions from the op's trailing arguments (a mapping), or None when all are off."""
    options = StepOptions(**{name: values.get(name) for name in OPTION_FIELDS[cell]})
    return options if any(v is not None for v in options) else None


def features(options: Optional[StepOptions]) -> Tuple[str, ...]:
    return () if options is None else options.features()


def workspace_layout(cell: str, hidden: int, proj: int,
                     features: Tuple[str, ...] = ()) -> Dict[str, slice]:
    """Column ranges of the workspace (fastrnn.ops): name -> slice. ``proj`` is proj_size,
    0 without a projection. Names: gates ([i|f|g|o] or [r|z|n|hn]), c, h_pre, a_hat, rstd,
    c_hat, rstd_c, p."""
    num_gates = {"lstm": 4, "gru": 3}.get(cell, 1)
    widths = []
    if cell == "lstm":
        widths += [("gates", 4 * hidden), ("c", hidden)]
        if proj:
            widths.append(("h_pre", hidden))
    elif cell == "gru":
        widths.append(("gates", 4 * hidden))
    if "layer_norm" in features:
        widths += [("a_hat", num_gates * hidden), ("rstd", 1)]
    if "layer_norm_cell" in features:
        widths += [("c_hat", hidden), ("rstd_c", 1)]
    if "proj_clip" in features:
        widths.append(("p", proj))
    layout, start = {}, 0
    for name, width in widths:
        layout[name] = slice(start, start + width)
        start += width
    layout["width"] = slice(0, start)
    return layout


def workspace_width(cell: str, hidden: int, proj: int, features: Tuple[str, ...] = ()) -> int:
    return workspace_layout(cell, hidden, proj, features)["width"].stop


def check(cell: str, options: Optional[StepOptions], rows: int, batch: int, hidden: int,
          width: int, projected: bool, dtype: torch.dtype) -> None:
    """Shape / value checks of the options for direct callers of the ops."""
    if options is None:
        return
    gates = {"lstm": 4, "gru": 3}[cell] * hidden
    shapes = {"ln_weight": [gates], "ln_bias": [gates], "ln_c_weight": [hidden],
              "ln_c_bias": [hidden], "recurrent_mask": [batch, width],
              "zoneout_h": [rows, width], "zoneout_c": [rows, hidden]}
    for name in TENSOR_FIELDS:
        value = getattr(options, name)
        if value is None:
            continue
        if list(value.shape) != shapes[name]:
            raise ValueError(f"fastrnn.{cell}: {name} must be {shapes[name]}, "
                             f"got {list(value.shape)}")
        if value.dtype != dtype:
            raise ValueError(f"fastrnn.{cell}: {name} dtype {value.dtype} does not match "
                             f"xproj dtype {dtype}")
    for weight, bias in (("ln_weight", "ln_bias"), ("ln_c_weight", "ln_c_bias")):
        if (getattr(options, weight) is None) != (getattr(options, bias) is None):
            raise ValueError(f"fastrnn.{cell}: give both {weight} and {bias} or neither")
    for name in ("cell_clip", "proj_clip", "grad_clip"):
        value = getattr(options, name)
        if value is not None and not (0 < value < float("inf")):
            raise ValueError(f"fastrnn.{cell}: {name} must be a positive finite number, "
                             f"got {value}")
    if options.proj_clip is not None and not projected:
        raise ValueError(f"fastrnn.{cell}: proj_clip needs a projection (w_hr)")
