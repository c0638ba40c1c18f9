"""LSTM and GRU layers: fastrnn backends vs torch.nn (cuDNN / oneDNN) vs hand-written loops.

Configs follow PyTorch's ``benchmarks/fastrnns`` (seq 100, batch 64, input 512, hidden 512,
1 layer) and vary one thing at a time: batch 1/8/16, hidden 256/1024, sequence 1000,
2-layer bidirectional, a packed batch of variable lengths. Modes: ``inference`` (forward
under no_grad) and ``training`` (forward + backward of the outputs and final states into
the input and every parameter). Every provider builds a torch.nn-like module and gets the
same weights (a ``state_dict`` copy) and inputs.

Providers (add more with :func:`register_provider`):

- ``torch.nn``: ``nn.LSTM`` / ``nn.GRU`` (cuDNN on GPU, oneDNN/ATen on CPU): the baseline;
- ``torch.nn#2``: a second such module with the same weights, the control (bench/README.md);
- ``fastrnn:<backend>``: ``fastrnn.LSTM/GRU(..., backend=<backend>)`` for every backend in
  ``fastrnn.available_backends(device)``;
- ``fastrnn:auto``: ``backend="auto"``, what a user gets by default (torch.nn's own path or a
  fastrnn kernel, as fastrnn.backends.routing decides for the call);
- ``ts-loop``: a TorchScript loop with the input GEMM hoisted (:mod:`bench.loops`);
- ``compile-loop``: the same loop with its step under ``torch.compile``.

FLOP model: the matmuls only, 2*tokens*G*H*(input_width + H) per layer and direction
(G = 4 LSTM, 3 GRU; tokens = sum of sequence lengths), times 3 for training.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Dict, List, Optional

import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

from ..core import CONTROL, Case, Options, Skip, suite
from ..loops import LoopRNN


@dataclasses.dataclass(frozen=True)
class Config:
    seq: int
    batch: int
    input: int
    hidden: int
    layers: int = 1
    bidirectional: bool = False
    packed: bool = False   # variable lengths (uniform in [seq/10, seq], longest = seq), unsorted

    def tiny(self) -> "Config":
        """The same shape of problem, small enough for the smoke test."""
        return dataclasses.replace(
            self, seq=9 if self.seq > 100 else 5, input=8, hidden=max(self.hidden // 64, 2),
            batch={1: 1, 8: 2, 16: 3}.get(self.batch, 4))


FASTRNNS = Config(seq=100, batch=64, input=512, hidden=512)
CONFIGS: Dict[str, Config] = {
    "fastrnns": FASTRNNS,
    "batch1": dataclasses.replace(FASTRNNS, batch=1),
    "batch8": dataclasses.replace(FASTRNNS, batch=8),
    "batch16": dataclasses.replace(FASTRNNS, batch=16),
    "hidden256": dataclasses.replace(FASTRNNS, hidden=256),
    "hidden1024": dataclasses.replace(FASTRNNS, hidden=1024),
    "seq1000": dataclasses.replace(FASTRNNS, seq=1000),
    "bidir2": dataclasses.replace(FASTRNNS, layers=2, bidirectional=True),
    "packed": dataclasses.replace(FASTRNNS, packed=True),
}
# --quick: the standard config and the cheap variations (the batch and hidden sweeps' points
# below the standard config, and packed); --full and --tiny: all of CONFIGS.
QUICK_CONFIGS = ("fastrnns", "batch1", "batch16", "hidden256", "packed")
CELLS = {"lstm": (nn.LSTM, "LSTM", 4), "gru": (nn.GRU, "GRU", 3)}
MODES = ("inference", "training")
# The reference backend is plain PyTorch ops per step: in --quick on CPU it runs only where
# a call is cheap (tokens * hidden at most that of batch 16 of the standard config).
QUICK_REFERENCE_WORK = 100 * 16 * 512


@dataclasses.dataclass(frozen=True)
class Spec:
    """One case: everything a provider needs to build its module."""
    cell: str
    config_name: str
    config: Config
    mode: str
    dtype: torch.dtype
    device: torch.device
    size: str   # tiny / quick / full

    @property
    def directions(self) -> int:
        return 2 if self.config.bidirectional else 1


# ---- providers ------------------------------------------------------------------------

ModuleFactory = Callable[[Spec], nn.Module]
PROVIDERS: Dict[str, ModuleFactory] = {}


def register_provider(name: str, make_module: ModuleFactory) -> None:
    """Add a provider to every case of this suite: ``make_module(spec)`` returns a torch.nn-like
    LSTM/GRU module (time-major, bias, same parameter names) or raises ``Skip(reason)``."""
    PROVIDERS[name] = make_module


def unregister_provider(name: str) -> None:
    PROVIDERS.pop(name, None)


def torch_nn_module(spec: Spec, dtype: Optional[torch.dtype] = None) -> nn.Module:
    cls = CELLS[spec.cell][0]
    c = spec.config
    return cls(c.input, c.hidden, num_layers=c.layers, bidirectional=c.bidirectional,
               device=spec.device, dtype=dtype or spec.dtype)


def skip_slow_reference(spec: Spec, backend: str) -> None:
    """Skip the reference backend on the costly configs of --quick on CPU."""
    if (backend == "reference" and spec.size == "quick" and spec.device.type == "cpu"
            and spec.config.seq * spec.config.batch * spec.config.hidden > QUICK_REFERENCE_WORK):
        raise Skip("reference backend runs only small configs in --quick on CPU; use --full")


def fastrnn_module(spec: Spec, backend: str) -> nn.Module:
    """The one place fastrnn modules are made: ``fastrnn.LSTM/GRU(..., backend=backend)``."""
    import fastrnn
    from fastrnn import backends
    if backend != "auto":
        reason = backends.get(backend).unsupported_reason(
            spec.cell, spec.dtype, spec.device, spec.config.hidden, 0)
        if reason:
            raise Skip(reason)
    skip_slow_reference(spec, backend)
    cls = {"lstm": fastrnn.LSTM, "gru": fastrnn.GRU}[spec.cell]
    c = spec.config
    return cls(c.input, c.hidden, num_layers=c.layers, bidirectional=c.bidirectional,
               device=spec.device, dtype=spec.dtype, backend=backend)


@functools.lru_cache(maxsize=None)
def fastrnn_backends(device: torch.device):
    """(backend names usable on ``device``, or None and why fastrnn cannot be used)."""
    try:
        import fastrnn
        return tuple(fastrnn.available_backends(device)), None
    except Exception as exc:   # a broken or missing package is reported, not fatal
        return None, f"fastrnn unavailable: {type(exc).__name__}: {exc}"


def loop_module(engine: str) -> ModuleFactory:
    def make(spec: Spec) -> nn.Module:
        c = spec.config
        if c.packed:
            raise Skip("hand-written loops take padded batches only (no PackedSequence)")
        if (engine == "compile" and spec.size == "quick" and spec.device.type == "cpu"
                and spec.config_name != "fastrnns"):
            raise Skip("--quick on CPU compiles only the fastrnns config "
                       "(every new shape recompiles, 10-40 s each); use --full")
        return LoopRNN(CELLS[spec.cell][1], c.input, c.hidden, c.layers, c.bidirectional,
                       engine=engine, device=spec.device, dtype=spec.dtype)
    return make


register_provider("ts-loop", loop_module("script"))
register_provider("compile-loop", loop_module("compile"))


# ---- data and workloads ---------------------------------------------------------------

class CaseData:
    """Weights and inputs of one case, made on first use (seeded) and dropped after it."""

    def __init__(self, spec: Spec, seed: int):
        self.spec, self.seed = spec, seed
        self._master = None

    def master(self):
        """float32 CPU weights and inputs every provider and dtype is derived from."""
        if self._master is None:
            spec, c = self.spec, self.spec.config
            gen = torch.Generator().manual_seed(self.seed)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.seed)
                state = torch_nn_module(dataclasses.replace(
                    spec, device=torch.device("cpu")), torch.float32).state_dict()
            x = torch.randn(c.seq, c.batch, c.input, generator=gen)
            lengths = None
            if c.packed:
                lengths = torch.randint(max(c.seq // 10, 1), c.seq + 1, (c.batch,), generator=gen)
                lengths[torch.randint(c.batch, (1,), generator=gen)] = c.seq
            states = c.layers * spec.directions
            rows = int(lengths.sum()) if c.packed else c.seq * c.batch
            width = spec.directions * c.hidden
            grads = {"output": torch.randn(rows, width, generator=gen),
                     "h_n": torch.randn(states, c.batch, c.hidden, generator=gen),
                     "c_n": torch.randn(states, c.batch, c.hidden, generator=gen)}
            if not c.packed:
                grads["output"] = grads["output"].view(c.seq, c.batch, width)
            if spec.cell != "lstm":
                del grads["c_n"]
            self._master = state, x, lengths, grads
        return self._master

    def tokens(self) -> int:
        lengths = self.master()[2]
        c = self.spec.config
        return int(lengths.sum()) if lengths is not None else c.seq * c.batch

    def clear(self):
        self._master = None

    def workload(self, module: nn.Module, dtype: torch.dtype,
                 rounded_to: Optional[torch.dtype] = None):
        """One call: forward (and backward in training); returns named outputs and gradients.
        rounded_to: the values first rounded to that dtype (the gold of a lower-precision
        case sees the case's own rounded weights, inputs and upstream gradients)."""
        state, x, lengths, grads = self.master()
        device = self.spec.device

        def to(v):
            return v.to(device, rounded_to or dtype).to(dtype)

        module.load_state_dict({k: to(v) for k, v in state.items()})
        x = to(x)
        grads = {k: to(v) for k, v in grads.items()}
        packed = None
        if lengths is not None:
            packed = pack_padded_sequence(x, lengths, enforce_sorted=False)
            x = packed.data
        x = x.detach().requires_grad_(self.spec.mode == "training")
        params = dict(module.named_parameters())

        def inputs():
            return x if packed is None else PackedSequence(
                x, packed.batch_sizes, packed.sorted_indices, packed.unsorted_indices)

        def named(out, state):
            h_n, c_n = state if isinstance(state, tuple) else (state, None)
            result = {"output": out.data if packed is not None else out, "h_n": h_n}
            if c_n is not None:
                result["c_n"] = c_n
            return result

        if self.spec.mode == "inference":
            def call():
                with torch.no_grad():
                    return named(*module(inputs()))
            return call

        def call():
            x.grad = None
            for p in params.values():
                p.grad = None
            result = named(*module(inputs()))
            torch.autograd.backward([result[k] for k in grads], [grads[k] for k in grads])
            result = {k: v.detach() for k, v in result.items()}
            result["grad_input"] = x.grad
            result.update({f"grad_{n}": p.grad for n, p in params.items()})
            return result
        return call


def flops(spec: Spec, tokens: int) -> float:
    c, gates = spec.config, CELLS[spec.cell][2]
    total = 0.0
    for layer in range(c.layers):
        width = c.input if layer == 0 else spec.directions * c.hidden
        total += spec.directions * 2.0 * tokens * gates * c.hidden * (width + c.hidden)
    return total * (3 if spec.mode == "training" else 1)


def _dtypes(options: Options) -> List[torch.dtype]:
    if options.device.type == "cuda" and options.size != "tiny":
        return [torch.float32, torch.float16, torch.bfloat16]
    return [torch.float32]


def _provider_factories(spec: Spec, data: CaseData) -> Dict[str, Callable]:
    def build(make):
        return lambda: data.workload(make(spec), spec.dtype)

    factories = {"torch.nn": build(torch_nn_module), CONTROL: build(torch_nn_module)}
    names, reason = fastrnn_backends(spec.device)
    if names is None:
        def unavailable():
            raise Skip(reason)
        factories["fastrnn"] = unavailable
    for backend in names or ():
        factories[f"fastrnn:{backend}"] = build(lambda s, b=backend: fastrnn_module(s, b))
    if names is not None:   # what a user gets by default: torch.nn's path or a kernel
        factories["fastrnn:auto"] = build(lambda s: fastrnn_module(s, "auto"))
    for name, make in PROVIDERS.items():
        factories[name] = build(make)
    return factories


@suite("rnn")
def rnn_cases(options: Options):
    names = QUICK_CONFIGS if options.size == "quick" else tuple(CONFIGS)
    for cell in CELLS:
        for config_name in names:
            config = CONFIGS[config_name]
            if options.size == "tiny":
                config = config.tiny()
            for mode in MODES:
                for dtype in _dtypes(options):
                    dtype_name = str(dtype).replace("torch.", "")
                    spec = Spec(cell, config_name, config, mode, dtype, options.device,
                                options.size)
                    data = CaseData(spec, options.seed)
                    gold_cache = {}

                    def gold(data=data, spec=spec, cache=gold_cache):
                        if "result" not in cache:
                            cache["result"] = data.workload(
                                torch_nn_module(spec, torch.float64), torch.float64,
                                rounded_to=spec.dtype)()
                        return cache["result"]

                    params = dict(cell=cell, config=config_name, mode=mode, dtype=dtype_name,
                                  **dataclasses.asdict(config))
                    yield Case(suite="rnn", name=f"{cell}/{config_name}/{mode}/{dtype_name}",
                               params=params, providers=_provider_factories(spec, data),
                               baseline="torch.nn", tokens=data.tokens,
                               flops=lambda spec=spec, data=data: flops(spec, data.tokens()),
                               gold=gold, dtype=dtype,
                               cleanup=lambda data=data, cache=gold_cache: (data.clear(),
                                                                             cache.clear()))
