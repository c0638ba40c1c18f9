"""The spec: every cell kind and every option, declared once.

The op schemas (fastrnn.ops), the options tuple the backends receive, its checks, the
workspace layout, the module keywords (fastrnn.nn.options) and the native and Triton tables
are all read from here; docs/extending.md says how to add a cell kind or an option.
"""
from __future__ import annotations

import math
import numbers
from collections import namedtuple
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

LAYER_NORM_EPS = 1e-5


@dataclass(frozen=True)
class Columns:
    """A group of workspace columns: ``h`` * H + ``gh`` * G*H + ``p`` * P + ``one`` wide (H
    hidden, G gates, P proj_size or 0); ``projected``: only when the call has a w_hr."""
    name: str
    h: int = 0
    gh: int = 0
    p: int = 0
    one: int = 0
    projected: bool = False

    def width(self, gates: int, hidden: int, proj: int) -> int:
        width = self.h * hidden + self.gh * gates * hidden + self.p * proj + self.one
        return 0 if self.projected and not proj else width


@dataclass(frozen=True)
class Cell:
    name: str                  # op prefix: fastrnn::<name>_forward / _backward
    mode: str                  # torch.nn mode string
    gates: Tuple[str, ...]     # gate rows of w_ih / w_hh, in torch.nn's order
    state: Tuple[str, ...]     # carried state tensors
    has_projection: bool       # h may be projected to proj_size by w_hr
    workspace: Tuple[Columns, ...]   # columns every forward writes for backward
    recurrent_grad: bool = False     # the recurrent pre-activation's gradient is not the
                                     # input projection's (gru: r scales W_hn h + b_hn)
    direct_h: bool = False           # h_prev reaches h besides through w_hh (gru: z * h_prev)

    @property
    def num_gates(self) -> int:
        return len(self.gates)

    @property
    def has_cell_state(self) -> bool:
        return "c" in self.state

    @property
    def cell_mode(self) -> str:   # the one-step module's: RNNCell is both nonlinearities
        return self.mode.split("_")[0]

    @property
    def options(self) -> Tuple["Option", ...]:
        return tuple(option for option in OPTIONS if self.name in option.cells)

    def workspace_width(self, hidden_size: int, projected: bool) -> int:
        """Columns of the workspace without options (docs/op-contract.md)."""
        return sum(c.width(self.num_gates, hidden_size, 1 if projected else 0)
                   for c in self.workspace)


@dataclass(frozen=True)
class Arg:
    """One op argument of an option. ``shape``: each dimension a product of whole numbers and
    the symbols G (gates), H, B (batch), P (h width) and N (rows); a float has none and must be
    a positive finite number."""
    name: str
    type: str                  # "Tensor" or "float"
    shape: Tuple[str, ...] = ()
    learnable: bool = False    # backward returns its gradient


@dataclass(frozen=True)
class Option:
    """An option of the ops. ``specialised``: the kernels are compiled once with it on and
    once off (it changes the step's code, not just its data: native's OptionsOn; every
    option is a bit of the Triton kernels' OPTIONS constexpr); ``whole_rows``: a step needs
    sums over each row (the layer norms), so a kernel holds whole rows."""
    name: str                  # the name it goes by in backend support lists
    args: Tuple[Arg, ...]      # given all together or not at all; the first one switches it on
    cells: Tuple[str, ...]
    workspace: Tuple[Columns, ...] = ()
    needs_projection: bool = False
    specialised: bool = False
    whole_rows: bool = False
    on_projection: bool = False  # with w_hr it acts on the projected h (a pass of its own)


OPTIONS = (
    Option("layer_norm", (Arg("ln_weight", "Tensor", ("G*H",), True),
                          Arg("ln_bias", "Tensor", ("G*H",), True)), ("lstm", "gru"),
           (Columns("a_hat", gh=1), Columns("rstd", one=1)), specialised=True, whole_rows=True),
    Option("layer_norm_cell", (Arg("ln_c_weight", "Tensor", ("H",), True),
                               Arg("ln_c_bias", "Tensor", ("H",), True)), ("lstm",),
           (Columns("c_hat", h=1), Columns("rstd_c", one=1)), specialised=True, whole_rows=True),
    Option("recurrent_mask", (Arg("recurrent_mask", "Tensor", ("B", "P")),), ("lstm", "gru")),
    Option("zoneout_h", (Arg("zoneout_h", "Tensor", ("N", "P")),), ("lstm", "gru"),
           on_projection=True),
    Option("zoneout_c", (Arg("zoneout_c", "Tensor", ("N", "H")),), ("lstm",)),
    Option("cell_clip", (Arg("cell_clip", "float"),), ("lstm",)),
    Option("proj_clip", (Arg("proj_clip", "float"),), ("lstm",), (Columns("p", p=1),),
           needs_projection=True, on_projection=True),
    Option("grad_clip", (Arg("grad_clip", "float"),), ("lstm", "gru")),
    Option("peephole", (Arg("peephole", "Tensor", ("3*H",), True),), ("lstm",),
           specialised=True),
)
ARGS = tuple(arg for option in OPTIONS for arg in option.args)

CELLS: Dict[str, Cell] = {cell.name: cell for cell in (
    Cell("lstm", "LSTM", ("i", "f", "g", "o"), ("h", "c"), True,
         (Columns("gates", gh=1), Columns("c", h=1), Columns("h_pre", h=1, projected=True))),
    Cell("gru", "GRU", ("r", "z", "n"), ("h",), False, (Columns("gates", h=4),),  # [r|z|n|hn]
         recurrent_grad=True, direct_h=True),
    Cell("rnn_tanh", "RNN_TANH", ("a",), ("h",), False, ()),
    Cell("rnn_relu", "RNN_RELU", ("a",), ("h",), False, ()),
)}
CELL_OF_MODE = {cell.mode: cell for cell in CELLS.values()}


def cell_of_mode(mode: str) -> Cell:
    """The cell of a module's mode, the one-step modules' "RNN" included (its gates and
    options are those of either nonlinearity)."""
    return CELL_OF_MODE.get(mode) or next(c for c in CELLS.values() if c.cell_mode == mode)


# Names of each cell's option arguments in schema order; those that are tensors / learnable.
OPTION_FIELDS = {name: tuple(a.name for o in cell.options for a in o.args)
                 for name, cell in CELLS.items()}
TENSOR_FIELDS = tuple(arg.name for arg in ARGS if arg.type == "Tensor")
LEARNABLE = tuple(arg.name for arg in ARGS if arg.learnable)


class StepOptions(namedtuple("StepOptions", [arg.name for arg in ARGS],
                             defaults=(None,) * len(ARGS))):
    """The option arguments of one op call; None = off."""
    __slots__ = ()

    def option_names(self) -> Tuple[str, ...]:
        """Names of the options that are on, in spec order (hashable, for resolve)."""
        return tuple(o.name for o in OPTIONS if getattr(self, o.args[0].name) is not None)


def make(cell: str, values) -> Optional[StepOptions]:
    """StepOptions from the op's option arguments (a mapping), or None when all are off."""
    foreign = [a.name for a in ARGS
               if values.get(a.name) is not None and a.name not in OPTION_FIELDS[cell]]
    if foreign:
        raise ValueError(f"fastrnn: the {cell} op has no option {', '.join(foreign)}")
    options = StepOptions(**{name: values.get(name) for name in OPTION_FIELDS[cell]})
    return options if any(v is not None for v in options) else None


def bind(names: Tuple[str, ...], args, kwargs, tail: Tuple[str, ...] = ()) -> dict:
    """An op call's arguments by name: ``names``, then every option argument in spec order,
    then ``tail``; absent options are None."""
    values = dict.fromkeys(a.name for a in ARGS)
    values.update(zip(names + tuple(values) + tail, args))
    values.update(kwargs)
    return values


def option_names(options: Optional[StepOptions]) -> Tuple[str, ...]:
    return () if options is None else options.option_names()


def whole_rows(option_names: Tuple[str, ...]) -> bool:
    """Whether an option that is on needs each step's rows whole (Option.whole_rows)."""
    return any(option.whole_rows for option in OPTIONS if option.name in option_names)


def workspace_layout(cell: str, hidden: int, proj: int,
                     option_names: Tuple[str, ...] = ()) -> Dict[str, slice]:
    """Column ranges of the workspace (docs/op-contract.md): name -> slice, and "width" -> all
    of it. ``proj`` is proj_size, 0 without a projection. The cell's own columns come first,
    then those of each option that is on, in spec order."""
    kind = CELLS[cell]
    groups = list(kind.workspace)
    for option in OPTIONS:
        if option.name in option_names:
            groups += option.workspace
    layout, start = {}, 0
    for group in groups:
        width = group.width(kind.num_gates, hidden, proj)
        if width or not group.projected:
            layout[group.name] = slice(start, start + width)
        start += width
    layout["width"] = slice(0, start)
    return layout


def workspace_width(cell: str, hidden: int, proj: int,
                    option_names: Tuple[str, ...] = ()) -> int:
    return workspace_layout(cell, hidden, proj, option_names)["width"].stop


def dimension(rule: str, sizes: Dict[str, int]) -> int:
    """The size a shape rule such as "3*H" gives (the symbols' values in ``sizes``)."""
    return math.prod(int(f) if f.isdigit() else sizes[f] for f in rule.split("*"))


def check(cell: str, options: Optional[StepOptions], rows: int, batch: int, hidden: int,
          width: int, projected: bool, dtype) -> None:
    """Shape / value checks of the options for direct callers of the ops."""
    if options is None:
        return
    sizes = {"G": CELLS[cell].num_gates, "H": hidden, "B": batch, "P": width, "N": rows}
    for option in OPTIONS:
        given = [getattr(options, arg.name) is not None for arg in option.args]
        if any(given) and not all(given):
            names = " and ".join(a.name for a in option.args)
            raise ValueError(f"fastrnn.{cell}: give both {names} or neither")
        for arg in option.args:
            value = getattr(options, arg.name)
            if value is None:
                continue
            if arg.type == "float":
                if not 0 < value < math.inf:
                    raise ValueError(f"fastrnn.{cell}: {arg.name} must be a positive finite "
                                     f"number, got {value}")
                continue
            shape = [dimension(s, sizes) for s in arg.shape]
            if list(value.shape) != shape:
                raise ValueError(f"fastrnn.{cell}: {arg.name} must be {shape}, "
                                 f"got {list(value.shape)}")
            if value.dtype != dtype:
                raise ValueError(f"fastrnn.{cell}: {arg.name} dtype {value.dtype} does not "
                                 f"match xproj dtype {dtype}")
        if option.needs_projection and given[0] and not projected:
            raise ValueError(f"fastrnn.{cell}: {option.args[0].name} needs a projection (w_hr)")


def accumulate_dtype(dtype):
    """Gate math and the workspace run in float32 for half types, else in the input dtype."""
    import torch
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


# ---------------------------------------------------------------- module keywords

def _real(value) -> bool:
    return not isinstance(value, bool) and isinstance(value, numbers.Real)


def _probability(value) -> bool:
    return _real(value) and 0 <= value <= 1


def _zoneout(value, lstm: bool) -> bool:   # a probability, or (p_h, p_c) for LSTM
    if isinstance(value, (tuple, list)):
        return lstm and len(value) == 2 and all(map(_probability, value))
    return _probability(value)


# Value checks of the keywords: (value, is LSTM) -> ok, and what is allowed.
_CHECKS = {
    "bool": (lambda v, lstm: isinstance(v, bool), lambda lstm: "a bool"),
    "probability": (lambda v, lstm: _probability(v), lambda lstm: "a probability in [0, 1]"),
    "zoneout": (_zoneout, lambda lstm: "a probability in [0, 1]"
                + (" or a pair (p_h, p_c) of them" if lstm else "")),
    "positive": (lambda v, lstm: v is None or (_real(v) and 0 < v < math.inf),
                 lambda lstm: "a positive finite number or None"),
    "finite": (lambda v, lstm: v is None or (_real(v) and math.isfinite(v)),
               lambda lstm: "a finite number or None"),
}


@dataclass(frozen=True)
class Param:
    """A parameter a module keyword adds when on, per layer and direction (after torch.nn's
    own, so a seed still gives torch.nn's weights): its name stem, size (a shape rule of
    Arg), initial value (None: uniform(-1/sqrt(H), 1/sqrt(H)) as torch.nn's RNN weights), the
    cells that have it and the op argument it is passed as (None: the module uses it itself,
    as the input projection's layer norm)."""
    stem: str
    size: str
    init: Optional[float]
    cells: Tuple[str, ...] = ("lstm", "gru")
    arg: Optional[str] = None


@dataclass(frozen=True)
class Keyword:
    """A keyword argument of the modules: its "off" default, the cells that take it, its
    value check (a key of _CHECKS), a module argument it needs when on (name, why), the
    parameters it adds when on, and the op arguments it turns into besides those parameters:
    ``value_arg`` takes the keyword's value itself (a float), ``drawn`` are drawn by the
    module per call (masks: fastrnn.nn.options)."""
    name: str
    default: object
    cells: Tuple[str, ...]
    check: str
    needs: Optional[Tuple[str, str]] = None
    parameters: Tuple[Param, ...] = ()
    value_arg: Optional[str] = None
    drawn: Tuple[str, ...] = ()

    def problem(self, value, mode: str) -> Optional[str]:
        """None when ``value`` is allowed for a module of ``mode``, else what is allowed."""
        ok, allowed = _CHECKS[self.check]
        return None if ok(value, mode == "LSTM") else allowed(mode == "LSTM")


KEYWORDS = (
    Keyword("layer_norm", False, ("lstm", "gru"), "bool", parameters=(
        Param("ln_weight_ih", "G*H", 1.0), Param("ln_bias_ih", "G*H", 0.0),
        Param("ln_weight_hh", "G*H", 1.0, arg="ln_weight"),
        Param("ln_bias_hh", "G*H", 0.0, arg="ln_bias"),
        Param("ln_weight_c", "H", 1.0, ("lstm",), "ln_c_weight"),
        Param("ln_bias_c", "H", 0.0, ("lstm",), "ln_c_bias"))),
    Keyword("recurrent_dropout", 0.0, ("lstm", "gru"), "probability",
            drawn=("recurrent_mask",)),
    Keyword("weight_drop", 0.0, ("lstm", "gru"), "probability"),
    Keyword("zoneout", 0.0, ("lstm", "gru"), "zoneout", drawn=("zoneout_h", "zoneout_c")),
    Keyword("cell_clip", None, ("lstm",), "positive", value_arg="cell_clip"),
    Keyword("proj_clip", None, ("lstm",), "positive",
            ("proj_size", "proj_clip clips the projection, so it needs proj_size > 0"),
            value_arg="proj_clip"),
    Keyword("recurrent_grad_clip", None, ("lstm", "gru"), "positive", value_arg="grad_clip"),
    Keyword("forget_bias", None, ("lstm",), "finite",
            ("bias", "forget_bias initialises the forget gate's bias, so it needs bias=True")),
    Keyword("peephole", False, ("lstm",), "bool",
            parameters=(Param("weight_peephole", "3*H", None, ("lstm",), "peephole"),)),
)
