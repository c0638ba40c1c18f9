"""Backend registry: which kernels serve a call, and the default choice.

Backends live in ``fastrnn.backends.<name>`` modules that expose ``BACKEND`` (see
:mod:`fastrnn.backends.base`); they are imported on first use, so a backend whose
dependencies are missing simply reports itself unavailable.
"""
from __future__ import annotations

import importlib
import os
import warnings
from typing import List, Optional

import torch

from . import routing
from .base import Backend

BACKEND_NAMES = ("reference", "native", "triton")
# What "auto" runs (torch.nn's path or fastrnn's kernels, and which kernels first) is decided
# in one table: fastrnn.backends.routing.

_loaded = {}
_default = None  # set by set_backend(); None means FASTRNN_BACKEND or "auto"
_warned = set()


def get(name: str) -> Backend:
    """The backend object named ``name`` (imported on first use)."""
    if name not in _loaded:
        if name not in BACKEND_NAMES:
            raise ValueError(_unknown(f"unknown fastrnn backend {name!r}"))
        try:
            _loaded[name] = importlib.import_module(f"{__name__}.{name}").BACKEND
        except Exception as exc:  # not shipped, a dependency missing, or broken: say which
            _loaded[name] = _Missing(name, f"cannot load fastrnn.backends.{name}: "
                                           f"{type(exc).__name__}: {exc}")
    return _loaded[name]


class _Missing(Backend):
    def __init__(self, name, reason):
        self.name, self.reason = name, reason

    def unavailable_reason(self, device):
        return self.reason


def unavailable_reason(name: str, device) -> Optional[str]:
    return get(name).unavailable_reason(torch.device(device))


def available_backends(device="cpu") -> List[str]:
    """Names of the backends usable on ``device`` (a torch.device or string)."""
    device = torch.device(device)
    return [n for n in BACKEND_NAMES if get(n).unavailable_reason(device) is None]


def set_backend(name: Optional[str]) -> None:
    """Set the default backend used where a module says ``backend="auto"``.

    ``None`` or ``"auto"`` restores automatic choice (or the FASTRNN_BACKEND variable).
    """
    global _default
    if name is not None and name != "auto":
        get(name)  # raises ValueError for unknown names
    _default = None if name == "auto" else name


def get_backend() -> str:
    """The default backend name: what set_backend() chose, else FASTRNN_BACKEND, else auto."""
    if _default is not None:
        return _default
    name = _environment_backend() or "auto"
    if name != "auto" and name not in BACKEND_NAMES:
        raise ValueError(_unknown(f"FASTRNN_BACKEND={name!r} is not a fastrnn backend"))
    return name


def _unknown(what: str) -> str:
    return f"{what}; known backends are {', '.join(BACKEND_NAMES)} and 'auto'"


# os.environ's own store where CPython keeps it (a dict of encoded strings that every change
# made through os.environ updates): a missing key there is one dict read, where
# os.environ.get raises and catches KeyError, ~5 us in a streaming call that left the caches
# cold (every module call asks).
_ENVIRON = getattr(os.environ, "_data", None)
_ENVIRON_KEY = (os.environ.encodekey("FASTRNN_BACKEND")
                if isinstance(_ENVIRON, dict) and hasattr(os.environ, "encodekey") else None)


def _environment_backend() -> Optional[str]:
    """FASTRNN_BACKEND, read at each call."""
    if _ENVIRON_KEY is None:
        return os.environ.get("FASTRNN_BACKEND")
    value = _ENVIRON.get(_ENVIRON_KEY)
    return None if value is None else os.environ.decodevalue(value)


def check_name(name: str) -> str:
    """Validate a ``backend=`` argument at construction time."""
    if not isinstance(name, str) or (name != "auto" and name not in BACKEND_NAMES):
        raise ValueError(_unknown(f"unknown fastrnn backend {name!r}"))
    return name


# Dynamo calls this eagerly while tracing and keeps the answer as a constant: the lookup
# imports modules and may build the native extension, which cannot be traced, and the
# answer depends only on these constant arguments (and the process-wide default).
@torch.compiler.assume_constant_result
def resolve(name: str, cell: str, device: torch.device, dtype: torch.dtype,
            hidden_size: int, proj_size: int = 0, option_names: tuple = ()) -> str:
    """The backend that will run this call.

    A backend named explicitly (argument, set_backend or FASTRNN_BACKEND) must serve the call
    or a ValueError says why and lists what is available. Under "auto" the first capable
    backend in preference order runs; when a preferred one cannot, ONE warning per reason says
    which backend runs instead. ``option_names``: the variant options of the call
    (fastrnn.spec.StepOptions.option_names()).
    """
    if name == "auto":
        name = get_backend()
    call = (cell, dtype, device, hidden_size, proj_size, option_names)
    if name != "auto":
        why = _reason(get(name), device, call)
        if why is not None:
            raise ValueError(f"fastrnn backend {name!r} cannot run {cell} on {device} "
                             f"({dtype}): {why}. Available on {device.type}: "
                             f"{', '.join(available_backends(device))}")
        return name
    skipped = []
    for candidate in routing.KERNEL_ORDER.get(device.type, ("reference",)):
        why = _reason(get(candidate), device, call)
        if why is None:
            if skipped:
                _warn_once(skipped, candidate)
            return candidate
        # triton on CPU is for tests only; its absence there is no news.
        if not (candidate == "triton" and device.type == "cpu"):
            skipped.append((candidate, why))
    return "reference"


@torch.compiler.assume_constant_result
def choose(name: str, device: torch.device, mode: str, inference: bool, shape: str,
           compiling: bool = False) -> str:
    """For a call of a module (``mode`` LSTM / GRU / RNN) whose math torch.nn can run (no
    variant option acts): ``"torch"`` for torch.nn's own forward, else the backend to give
    fastrnn's op (``name``, or "auto" for resolve() to pick). Only "auto" is routed, by
    routing.ROUTES. ``inference``: the call needs no parameter gradient; ``shape``:
    routing.shape_class(); ``compiling``: under torch.compile."""
    if name == "auto":
        name = get_backend()
    if name != "auto":
        return name
    kind = torch.device(device).type
    if routing.route(kind, mode, inference, shape, compiling) == routing.TORCH:
        return "torch"
    return "auto"


def torch_path(name: str, data: torch.Tensor, mode: str, *, batch_dim: int, packed: bool,
               cell: bool, changes_math: bool, parameters) -> bool:
    """Whether a module call on ``data`` (a PackedSequence's data when ``packed``) runs
    torch.nn's own forward instead of fastrnn's op: never when fastrnn must run it
    (``changes_math``: an option acts, or the module trains in segments), else where
    choose() routes it. ``parameters()``: the module's parameters."""
    if changes_math:
        return False
    # No parameter gradient wanted (a gradient into the input still flows: torch.nn's path
    # has autograd, so this only picks the faster implementation). A trace is one recording
    # for every later call, and torch.jit.trace checks it by tracing again without grad: it
    # is decided as inference (a deployed trace usually is; it still has autograd).
    inference = torch.jit.is_tracing() or not torch.is_grad_enabled() or not any(
        p.requires_grad for p in parameters())
    compiling = torch.compiler.is_compiling()
    if compiling and not (cell or packed):
        shape = "dense"   # reading the batch would guard (and recompile) on its size
    else:
        batch = data.size(batch_dim) if data.dim() == 3 and not cell else 1
        steps = None if cell or packed else data.size(1 - batch_dim if data.dim() == 3 else 0)
        shape = routing.shape_class(batch, packed, cell, steps)
    return choose(name, data.device, mode, inference, shape, compiling) == "torch"


def _reason(backend, device, call) -> Optional[str]:
    """Why ``backend`` cannot run a call of resolve()'s arguments ``call``; None when it can."""
    return backend.unavailable_reason(device) or backend.unsupported_reason(*call)


def _warn_once(skipped, chosen):
    key = (tuple(skipped), chosen)
    if key in _warned:
        return
    _warned.add(key)
    why = "; ".join(f"{n}: {r}" for n, r in skipped)
    warnings.warn(f"fastrnn: using the {chosen} backend because {why}", RuntimeWarning,
                  stacklevel=4)
