"""Long sequences: one training step with ``checkpoint_every`` (segments recomputed in backward)
against the same module keeping the whole history, and torch.nn.

Timed here (checked first: outputs and every gradient against the full-memory baseline, by
fastrnn.testing's rule with a float64 gold). Peak memory needs a fresh process per
measurement, so it has its own runner: ``python -m bench.long`` (bench/long.py), whose
results are in bench/results/long-*.

Providers: ``fastrnn:full`` (baseline: backend native, the whole history kept),
``fastrnn:segmented`` (checkpoint_every="auto", k = ceil(sqrt(T))), ``torch.nn``.
"""
from __future__ import annotations

import copy
import dataclasses

import torch

import fastrnn

from ..core import Case, Options, Skip, suite


@dataclasses.dataclass(frozen=True)
class Config:
    steps: int
    batch: int = 8
    hidden: int = 256
    layers: int = 1


CONFIGS = {"t1000": Config(1000), "t10000": Config(10000),
           "t10000-l2": Config(10000, layers=2)}
QUICK_CONFIGS = ("t1000",)
TINY = Config(steps=23, batch=3, hidden=8, layers=2)


class Problem:
    def __init__(self, cell: str, config: Config, device, seed: int):
        self.cell, self.config, self.device, self.seed = cell, config, device, seed
        self.data = None

    def make(self):
        if self.data is None:
            c, gen = self.config, torch.Generator().manual_seed(self.seed)
            torch.manual_seed(self.seed)
            full = getattr(fastrnn, self.cell.upper())(c.hidden, c.hidden, c.layers,
                                                       backend="native").to(self.device)
            x = torch.randn(c.steps, c.batch, c.hidden, generator=gen).to(self.device)
            grad = torch.randn(c.steps, c.batch, c.hidden, generator=gen).to(self.device)
            self.data = full, x, grad
        return self.data

    def clear(self):
        self.data = None

    def provider(self, kind: str):
        def factory():
            full, x, grad = self.make()
            if kind == "torch.nn":
                module = getattr(torch.nn, self.cell.upper())(*full_args(full)).to(self.device)
            else:
                module = copy.deepcopy(full)
                if kind == "segmented":
                    module.checkpoint_every = "auto"
                elif kind == "gold":
                    module, x_, grad_ = module.double(), x.double(), grad.double()
                    module.backend = "reference"
                    return _step(module, x_, grad_)
            module.load_state_dict(full.state_dict())
            if fastrnn.backends.get("native").unavailable_reason(x.device) and kind != "torch.nn":
                raise Skip("native backend unavailable")
            return _step(module, x, grad)
        return factory


def full_args(module):
    return module.input_size, module.hidden_size, module.num_layers


def _step(module, x, grad):
    def call():
        module.zero_grad(set_to_none=True)
        inp = x.detach().requires_grad_()
        out, _ = module(inp)
        out.backward(grad)
        result = {"output": out.detach(), "grad_input": inp.grad}
        result.update({f"grad_{n}": p.grad for n, p in module.named_parameters()})
        return result
    return call


@suite("long")
def long_cases(options: Options):
    names = QUICK_CONFIGS if options.size == "quick" else tuple(CONFIGS)
    for cell in ("lstm", "gru"):
        for name in names[:1] if options.size == "tiny" else names:
            config = TINY if options.size == "tiny" else CONFIGS[name]
            problem = Problem(cell, config, options.device, options.seed)
            params = dict(cell=cell, config=name, mode="training", dtype="float32",
                          **dataclasses.asdict(config))
            yield Case(suite="long", name=f"long/{cell}/{name}/float32", params=params,
                       providers={"fastrnn:full": problem.provider("full"),
                                  "fastrnn:segmented": problem.provider("segmented"),
                                  "torch.nn": problem.provider("torch.nn")},
                       baseline="fastrnn:full", tokens=config.steps * config.batch,
                       gold=problem.provider("gold"), dtype=torch.float32,
                       cleanup=problem.clear)
