"""What a benchmark case is, and the registry that suites add their cases to.

A *suite* is a module in ``bench/suites/`` with a function decorated ``@suite("name")``
that takes the run :class:`Options` and yields :class:`Case` objects. A case is one thing
to measure (e.g. LSTM training, fastrnns config, float32) and the *providers* that can do
it (torch.nn, each fastrnn backend, hand-written loops...). The runner checks every
provider's result against the baseline provider's before timing it.
"""
from __future__ import annotations

import dataclasses
import fnmatch
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import torch

# The control provider of the rnn and streaming suites: a second torch.nn module with the
# baseline's weights in tensors of its own. Its compute is the baseline's, so its ratio to
# the baseline is what noise and the modules' places in memory alone make of a ratio in the
# same run (bench/README.md).
CONTROL = "torch.nn#2"
# The providers whose ratio to the baseline a run pins down most tightly (bench.timing's
# Budget.precision): what a user of backend="auto" gets, and the control that reads it.
FOCUS = ("fastrnn:auto", CONTROL)

# A workload is one call of the measured thing; it returns the named tensors to check
# (outputs, final states, gradients), the same names for every provider of a case.
Workload = Callable[[], Mapping[str, torch.Tensor]]


class Skip(Exception):
    """Raised by a provider factory that cannot run a case; the message says why."""


@dataclasses.dataclass
class Options:
    """How big and how thorough a run is, and which cases it keeps."""
    size: str = "quick"                 # "tiny" (tests), "quick" (default), "full"
    device: torch.device = torch.device("cpu")
    cells: Optional[List[str]] = None   # filters: None keeps everything;
    providers: Optional[List[str]] = None  # entries are fnmatch patterns ("fastrnn:*")
    configs: Optional[List[str]] = None
    modes: Optional[List[str]] = None
    dtypes: Optional[List[str]] = None
    suites: Optional[List[str]] = None
    seed: int = 0

    def keeps(self, field: str, value: str) -> bool:
        patterns = getattr(self, field)
        return patterns is None or any(fnmatch.fnmatchcase(value, p) for p in patterns)


@dataclasses.dataclass
class Case:
    suite: str
    name: str                                   # unique in a run, e.g. "lstm/fastrnns/training/float32"
    params: Dict[str, object]                   # descriptive fields (cell, config, mode, dtype, sizes)
    providers: Dict[str, Callable[[], Workload]]  # name -> factory (may raise Skip); baseline included
    baseline: str                               # provider the others are checked and ratioed against
    # Items processed per call (for tokens/s) and floating-point operations per call (the
    # suite's model), as numbers or as functions called once the case runs (lazy set-up).
    tokens: Union[int, Callable[[], int]]
    flops: Union[None, float, Callable[[], float]] = None
    # Optional: the baseline computed in float64 on the case's rounded values: used by
    # bench.check when a result is not within a few ulps of the baseline.
    gold: Optional[Callable[[], Workload]] = None
    dtype: torch.dtype = torch.float32
    cleanup: Optional[Callable[[], object]] = None   # called after the case ran: free its data
    # Providers computing with reduced-precision weights (int8, bfloat16): their results
    # approximate the baseline's by design, so their error against it is recorded, not judged.
    approximate: Tuple[str, ...] = ()


SUITES: Dict[str, Callable[[Options], Iterable[Case]]] = {}


def suite(name: str):
    """Decorator: register ``fn(options) -> iterable of Case`` as the suite ``name``."""
    def register(fn):
        if name in SUITES and SUITES[name] is not fn:
            raise ValueError(f"benchmark suite {name!r} is registered twice")
        SUITES[name] = fn
        return fn
    return register


def collect(options: Options) -> List[Case]:
    """All cases of the registered suites that pass the options' filters."""
    from . import suites  # noqa: F401  (imports every bench/suites/*.py, which registers them)
    cases = []
    for name, make in SUITES.items():
        if not options.keeps("suites", name):
            continue
        for case in make(options):
            p = case.params
            if (options.keeps("cells", str(p.get("cell", "")))
                    and options.keeps("configs", str(p.get("config", "")))
                    and options.keeps("modes", str(p.get("mode", "")))
                    and options.keeps("dtypes", str(p.get("dtype", "")))):
                cases.append(case)
    names = [c.name for c in cases]
    dupes = {n for n in names if names.count(n) > 1}
    if dupes:
        raise ValueError(f"duplicate benchmark case names: {sorted(dupes)}")
    return cases


def provider_names(case: Case, options: Options) -> Sequence[str]:
    """Providers of ``case`` to run: the baseline always (the others are checked against it)."""
    return [n for n in case.providers if n == case.baseline or options.keeps("providers", n)]
