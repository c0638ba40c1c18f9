"""The options of fastrnn.LSTM / GRU and their cells, module side (declared in fastrnn.spec).

What cuDNN cannot run: layer normalisation (Ba et al. 2016, as Haste's LayerNormLSTM),
variational recurrent dropout (Gal & Ghahramani), DropConnect on the recurrent weights
(AWD-LSTM), zoneout (Krueger et al. 2016), cell / projection clipping (TensorFlow's LSTMCell),
a Graves-style clip of the gradient inside the recurrence, and a forget-gate bias. The
recurrence math is specified in docs/op-contract.md; here: checking the constructor values,
the extra parameters, drawing the masks, and turning it all into the op's arguments.

Random draws (training mode only), per layer then per direction, with torch's global RNG:
weight_drop mask, recurrent dropout mask, zoneout masks of h then c. In eval mode there is no
dropout and zoneout uses its expectation (the probability as the weight of the old state).
"""
from __future__ import annotations

import math
import operator
import warnings
from typing import Optional

import torch
import torch.nn.functional as F
from torch.nn.utils.rnn import PackedSequence

from .. import backends
from .. import spec
from ..spec import LAYER_NORM_EPS, StepOptions

Tensor = torch.Tensor

# Constructor keyword -> its "off" value.
DEFAULTS = {keyword.name: keyword.default for keyword in spec.KEYWORDS}


def check(owner: str, mode: str, values: dict, *, bias: bool, proj_size: int = 0) -> dict:
    """Validate the options given to ``owner`` (a class name) of ``mode``; returns them (a
    zoneout list as a tuple). Raises ValueError naming the bad value and what is allowed."""
    on = {name: value for name, value in values.items() if value != DEFAULTS[name]}
    cell = spec.cell_of_mode(mode).name
    takes = [k for k in spec.KEYWORDS if cell in k.cells]
    if not takes and on:
        raise ValueError(f"{owner} has no option {', '.join(on)}: the options exist on "
                         "LSTM, GRU, LSTMCell and GRUCell")
    given = {"bias": bias, "proj_size": proj_size > 0}
    for keyword in spec.KEYWORDS:
        value = values[keyword.name]
        if keyword.name in on and keyword not in takes:
            modes = " / ".join(spec.CELLS[c].mode for c in keyword.cells)
            raise ValueError(f"{owner}: {keyword.name} is an {modes} option, "
                             f"got {keyword.name}={value!r}")
        allowed = keyword.problem(value, mode)
        if allowed is not None:
            raise ValueError(f"{owner}: {keyword.name} must be {allowed}, got {value!r}")
        if keyword.needs and keyword.name in on and not given[keyword.needs[0]]:
            raise ValueError(f"{owner}: {keyword.needs[1]}")
    zoneout = values["zoneout"]
    return dict(values, zoneout=tuple(zoneout) if isinstance(zoneout, list) else zoneout)


def zoneout_pair(module) -> tuple:
    """(p_h, p_c) of a module's ``zoneout`` (a probability, or a pair for LSTM)."""
    zoneout = module.zoneout
    if isinstance(zoneout, (tuple, list)):
        return tuple(zoneout)
    return (zoneout, zoneout if module.mode == "LSTM" else 0.0)


def _on(module) -> list:
    return [name for name, off in DEFAULTS.items()
            if (any(zoneout_pair(module)) if name == "zoneout"
                else getattr(module, name, off) != off)]


def active(module) -> list:
    """Names of the options that change the forward (forget_bias only initialises)."""
    return [name for name in _on(module) if name != "forget_bias"]


def describe(module) -> str:
    """The options that are on, for extra_repr."""
    return ", ".join(f"{name}={getattr(module, name)!r}" for name in _on(module))


# The op arguments a module draws per call, and whether a forward of the module draws them.
_DRAWN = {"recurrent_mask": lambda module: bool(module.recurrent_dropout) and module.training,
          "zoneout_h": lambda module: bool(zoneout_pair(module)[0]),
          "zoneout_c": lambda module: bool(zoneout_pair(module)[1])}


def _arguments(module, get) -> dict:
    """The op arguments the module's keywords turn into (spec.KEYWORDS), but the drawn ones:
    argument -> value, a parameter through ``get(stem)`` (None: True stands for it)."""
    cell = spec.cell_of_mode(module.mode).name
    values = {}
    for keyword in spec.KEYWORDS:
        value = getattr(module, keyword.name, keyword.default)
        if keyword.value_arg is not None and value is not None:
            values[keyword.value_arg] = float(value)
        if value:
            values.update((p.arg, True if get is None else get(p.stem))
                          for p in keyword.parameters if p.arg and cell in p.cells)
    return values


def option_names(module) -> tuple:
    """The op options a forward of ``module`` turns on now (fastrnn.spec), for choosing a
    backend that runs them."""
    cell = spec.cell_of_mode(module.mode).name
    on = _arguments(module, None)
    on.update((arg, True) for arg, drawn in _DRAWN.items() if drawn(module))
    return tuple(option.name for option in spec.OPTIONS
                 if cell in option.cells and option.args[0].name in on)


def runs_torch_path(module, input, cell: bool = False) -> bool:
    """Whether this call runs torch.nn's own forward on the module's very parameters: under
    ONNX export (ONNX has standard LSTM/GRU/RNN operators and the exporters emit them for
    that path; options are refused), else as the backend registry decides
    (backends.torch_path). ``cell``: the module is a cell (one step)."""
    return call(module, input, cell).torch_path


class Call:
    """What a module does for calls alike (the key in call()): ``torch_path``
    (runs_torch_path); ``device_type``: the input's, for a remembered eager call (None while
    recording), where the module may run the call by a shorter way of its own; and what the
    module's own forward fills in on its first such call (``plan``)."""
    __slots__ = ("torch_path", "device_type", "plan")

    def __init__(self, torch_path: bool, device_type=None):
        self.torch_path, self.device_type, self.plan = torch_path, device_type, None


# Distinct kinds of call (shapes, modes) a module remembers.
_MAX_CALLS = 64

# Read on every module call, bound once: each module attribute lookup is a cache miss when a
# streaming call's weights have just flushed the caches. Dynamo knows is_compiling by identity.
_is_compiling = torch.compiler.is_compiling
_is_tracing = torch._C._is_tracing
_grad_enabled = torch.is_grad_enabled


def call(module, input, cell: bool = False) -> Call:
    """The Call for ``input``: remembered by the module per key, so a call like an earlier one
    decides its route by one dictionary lookup.

    The key is everything an eager call's route and plan depend on besides the module's
    structure: grad mode and whether a parameter wants a gradient, the backend setting
    (set_backend, FASTRNN_BACKEND), the device, dtype and shape of the input (a module's
    calls, not a cell's or a packed batch's: their shape class does not read it), the routing
    table, and the module's attributes that can change (training, backend, the options).
    """
    # Both ONNX exporters record the call, by tracing (TorchScript) or compiling (dynamo); a
    # recording is made once, so nothing is remembered there. (Compiling, is_compiling() is a
    # constant and the tracing check after it is not traced.)
    if _is_compiling() or _is_tracing():
        return _recorded_call(module, input, cell)
    if isinstance(input, Tensor):
        data, packed = input, False
    elif isinstance(input, PackedSequence) and isinstance(input.data, Tensor):
        data, packed = input.data, True
    else:   # torch.nn's own checks will say what is wrong
        return Call(False)
    grad = _grad_enabled()
    names = _CELL_STATE if cell else _MODULE_STATE
    try:
        state = _GETTERS[names](module)   # one C call for the lot
    except AttributeError:   # e.g. a module pickled before an option existed
        state = tuple(getattr(module, name, None) for name in names)
    # The backend setting as set (the decision validates it and raises on a bad one).
    setting = backends._default
    key = (grad, grad and _wants_grad(module),
           backends._environment_backend() if setting is None else setting,
           data.device, data.dtype, None if packed or cell else data.shape,
           id(backends.routing.ROUTES), state)
    calls = module.__dict__.get("_fastrnn_calls")
    if calls is None:
        calls = module.__dict__["_fastrnn_calls"] = {}
    try:
        known = calls.get(key)
    except TypeError:   # an attribute that is not hashable (e.g. zoneout set to a list)
        return Call(_decide_torch_path(module, data, packed, cell))
    if known is None:
        known = Call(_decide_torch_path(module, data, packed, cell), data.device.type)
        if len(calls) >= _MAX_CALLS:   # a stream of shapes: start afresh
            calls.clear()
        calls[key] = known
    return known


def _recorded_call(module, input, cell: bool) -> Call:
    if torch.onnx.is_in_onnx_export():
        refuse_torch_path(module, "ONNX export")
        return Call(True)
    packed = isinstance(input, PackedSequence)
    data = input.data if packed else input
    if not isinstance(data, Tensor):
        return Call(False)
    return Call(_decide_torch_path(module, data, packed, cell))


def _wants_grad(module) -> bool:
    # A parameter held by a child (torch.nn.utils.parametrize) needs the full walk.
    return any(p is not None and p.requires_grad for p in (
        module.parameters() if module._modules else module._parameters.values()))


class Module(torch.nn.Module):
    """The base of fastrnn's modules and cells: what they remember of calls stays out of
    pickle and deepcopy (a copy decides afresh), and torch.jit.script compiles the torch.nn
    twin, on the very same Parameter objects (convert.scriptable_twin)."""

    def __getstate__(self):
        state = super().__getstate__()
        state.pop("_fastrnn_calls", None)
        state.pop("_fastrnn_stream", None)
        return state

    def __prepare_scriptable__(self):
        from .convert import scriptable_twin  # convert imports the modules
        return scriptable_twin(self)


# The attributes a call's route and plan read: the options, then what else can change.
_CELL_STATE = (*DEFAULTS, "training", "backend", "mode")
_MODULE_STATE = _CELL_STATE + ("batch_first", "checkpoint_every")
_GETTERS = {names: operator.attrgetter(*names) for names in (_CELL_STATE, _MODULE_STATE)}


def _decide_torch_path(module, data: Tensor, packed: bool, cell: bool) -> bool:
    # A segmented module in training: torch.nn's path would keep the whole history.
    segmented = not cell and module.checkpoint_every is not None and torch.is_grad_enabled()
    return backends.torch_path(
        module.backend, data, module.mode, packed=packed, cell=cell,
        batch_dim=0 if getattr(module, "batch_first", False) else 1,
        changes_math=bool(option_names(module) or (module.weight_drop and module.training)
                          or segmented),
        parameters=module.parameters)


def torch_forward(module, *args):
    """torch.nn's own forward on the module's parameters. cuDNN warns on every new call
    site that separate (not flattened) weights are packed per call and to call
    flatten_parameters(); for fastrnn modules that is by design and the advice does not
    apply, so the warning is silenced here (outside compiled code; on other devices there is
    no such warning, and the silencing would cost a streaming call ~15 us)."""
    data = args[0].data if isinstance(args[0], PackedSequence) else args[0]
    if torch.compiler.is_compiling() or not getattr(data, "is_cuda", False):
        return module._torch_forward(*args)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="RNN module weights are not part of single "
                                "contiguous chunk of memory")
        return module._torch_forward(*args)


def refuse_torch_path(module, what: str) -> None:
    """torch.nn's own forward cannot run the options: say so instead of dropping them."""
    on = active(module)
    if on:
        raise RuntimeError(f"{what} runs torch.nn's {module.mode} path, which has no "
                           f"{', '.join(on)}: {type(module).__name__} with these options cannot "
                           "be turned into a torch.nn module or its ONNX operator")


def parameters(module) -> list:
    """(name stem, size, initial value or None for torch.nn's uniform) of the parameters the
    module's options add to one layer and direction, in spec order (spec.Keyword.parameters)."""
    cell = spec.cell_of_mode(module.mode)
    sizes = {"G": cell.num_gates, "H": module.hidden_size}
    return [(p.stem, spec.dimension(p.size, sizes), p.init)
            for keyword in spec.KEYWORDS if getattr(module, keyword.name, keyword.default)
            for p in keyword.parameters if cell.name in p.cells]


def init_parameters(module, names) -> None:
    """Initial values of the option parameters ``names`` (stem + layer suffix), after
    torch.nn's own parameters drew theirs."""
    inits = {stem: init for stem, _, init in parameters(module)}
    stdv = 1.0 / math.sqrt(module.hidden_size) if module.hidden_size > 0 else 0
    for name in names:
        stem = next(s for s in inits if name == s or name.startswith(s + "_l"))
        if inits[stem] is None:
            torch.nn.init.uniform_(getattr(module, name), -stdv, stdv)
        else:
            torch.nn.init.constant_(getattr(module, name), inits[stem])


def check_keywords(owner: str, given: dict) -> None:
    """A keyword the modules do not have fails as Python's own check would."""
    unknown = set(given) - set(DEFAULTS)
    if unknown:
        raise TypeError(f"{owner}.__init__() got an unexpected keyword argument "
                        f"{sorted(unknown)[0]!r}")


def set_forget_bias(bias_ih: Tensor, bias_hh: Tensor, hidden_size: int, value: float) -> None:
    """The forget gate's total bias (bias_ih + bias_hh) starts at ``value``."""
    with torch.no_grad():
        bias_ih[hidden_size:2 * hidden_size].fill_(value)
        bias_hh[hidden_size:2 * hidden_size].zero_()


def input_projection(module, x: Tensor, w_ih: Tensor, b_ih: Optional[Tensor], get) -> Tensor:
    """x @ w_ih.T (+ its layer norm) + b_ih for every row; ``get(stem)`` finds a parameter."""
    if not module.layer_norm:
        return F.linear(x, w_ih, b_ih)
    # b_ih joins the norm's bias (a vector add) instead of a pass over all [T*B, G*H] rows.
    bias = get("ln_bias_ih")
    if b_ih is not None:
        bias = b_ih if bias is None else bias + b_ih
    return F.layer_norm(F.linear(x, w_ih), (w_ih.shape[0],), get("ln_weight_ih"), bias,
                        LAYER_NORM_EPS)


def weight_drop(module, w_hh: Tensor) -> Tensor:
    """DropConnect on the recurrent weights (a fresh mask each call, training only)."""
    if module.weight_drop and module.training:
        return F.dropout(w_hh, module.weight_drop, True)
    return w_hh


def recurrent_mask(module, batch: int, width: int, like: Tensor) -> Optional[Tensor]:
    """Variational dropout mask of the hidden state fed back (training only)."""
    p = module.recurrent_dropout
    if not p or not module.training:
        return None
    return dropout_mask(like.new_empty(batch, width), p)


def dropout_mask(mask: Tensor, p: float) -> Tensor:
    """``mask`` filled with inverted-dropout draws: 0 with probability p, else 1 / (1 - p)."""
    return mask.zero_() if p == 1 else mask.bernoulli_(1 - p).div_(1 - p)


def zoneout_weights(module, rows: int, width: int, hidden: int, like: Tensor):
    """(zoneout_h [rows, width], zoneout_c [rows, hidden] or None): 0/1 draws in training,
    the probability in eval."""
    weights = [None if not p
               else like.new_empty(rows, size).bernoulli_(p) if module.training
               else like.new_full((rows, size), p)
               for p, size in zip(zoneout_pair(module), (width, hidden))]
    return weights[0], (weights[1] if module.mode == "LSTM" else None)


def step_options(module, get, mask: Optional[Tensor], zoneout_h, zoneout_c
                 ) -> Optional[StepOptions]:
    """The op's option arguments, None when every option is off; ``get(stem)`` finds a
    parameter, the others are this call's draws."""
    values = _arguments(module, get)
    values.update(recurrent_mask=mask, zoneout_h=zoneout_h, zoneout_c=zoneout_c)
    cell = spec.cell_of_mode(module.mode).name
    options = StepOptions(**{name: values.get(name) for name in spec.OPTION_FIELDS[cell]})
    return options if any(v is not None for v in options) else None
