"""convert(): swap every torch.nn RNN module in a model for its fastrnn twin; to_torch(): back."""
from __future__ import annotations

import warnings

import torch
from torch import nn

from .. import backends
from . import options
from .cell import GRUCell, LSTMCell, RNNCell
from .rnn import GRU, LSTM, RNN

TWINS = {nn.LSTM: LSTM, nn.GRU: GRU, nn.RNN: RNN,
         nn.LSTMCell: LSTMCell, nn.GRUCell: GRUCell, nn.RNNCell: RNNCell}
TORCH_TWINS = {fast: torch_cls for torch_cls, fast in TWINS.items()}
# What a module holds besides parameters, children and training mode: buffers and hooks.
_MODULE_STATE = [name for name in vars(nn.Module())
                 if name not in ("training", "_parameters", "_modules")]


def _config(module: nn.Module) -> dict:
    """Constructor arguments of a torch.nn or fastrnn RNN module or cell (same attributes)."""
    config = dict(input_size=module.input_size, hidden_size=module.hidden_size,
                  bias=module.bias)
    if hasattr(module, "num_layers"):
        config.update(num_layers=module.num_layers, batch_first=module.batch_first,
                      dropout=module.dropout, bidirectional=module.bidirectional)
        if module.mode == "LSTM":
            config["proj_size"] = module.proj_size
    if hasattr(module, "nonlinearity"):
        config["nonlinearity"] = module.nonlinearity
    return config


def _rebuild(cls, module: nn.Module, **kwargs) -> nn.Module:
    """A ``cls`` module configured like ``module`` holding the very same Parameter objects (so
    optimizers, weight tying and shared modules stay intact), buffers and hooks, in the same
    training mode."""
    with warnings.catch_warnings():
        # A one-layer module with dropout: its own constructor has already warned.
        warnings.filterwarnings("ignore", message="dropout option adds dropout")
        # Built on the meta device: no memory, no initialisation, no RNG draws.
        new = cls(**_config(module), device="meta", **kwargs)
    # The module's own parameters, in its order, even where a wrapper re-registered one:
    # AWD-LSTM's WeightDrop deletes weight_hh_l0, registers weight_hh_l0_raw and sets
    # weight_hh_l0 as a plain tensor before each call, which both twins read at call time.
    replaced = [name for name in new._parameters if name not in module._parameters]
    vars(new)["_parameters"] = dict(module._parameters)
    for name in replaced:
        if name in vars(module):
            setattr(new, name, vars(module)[name])
    # Buffers and hooks (e.g. weight_norm's, which sets the weight it replaced before a call).
    for name in _MODULE_STATE:
        if name in vars(module):
            vars(new)[name] = vars(module)[name]
    new.train(module.training)
    return new


def twin(module: nn.Module, backend: str = "auto") -> nn.Module:
    """The fastrnn module for one torch.nn RNN module, on the same Parameter objects."""
    return _rebuild(TWINS[type(module)], module, backend=backend)


def torch_twin(module: nn.Module, what: str = "fastrnn.to_torch") -> nn.Module:
    """The torch.nn module for one fastrnn RNN module, on the same Parameter objects."""
    options.refuse_torch_path(module, what)
    new = _rebuild(TORCH_TWINS[type(module)], module)
    if isinstance(new, nn.RNNBase):
        new._init_flat_weights()
        new.flatten_parameters()  # what torch.nn does when its module is built or moved (cuDNN)
    return new


def scriptable_twin(module: nn.Module) -> nn.Module:
    """What torch.jit.script compiles for a fastrnn module (its ``__prepare_scriptable__``):
    the torch.nn twin on the very same Parameter objects. TorchScript cannot compile
    fastrnn's Python forward, and torch.nn's has none of fastrnn's options."""
    on = options.active(module)
    if on:
        raise RuntimeError(
            f"torch.jit.script cannot compile {type(module).__name__} with {', '.join(on)}: "
            f"TorchScript compiles the module's torch.nn twin, which has no such option. "
            "torch.jit.trace and torch.export record fastrnn's ops and keep them")
    return torch_twin(module, "torch.jit.script")


def _swap_all(module: nn.Module, table, make) -> nn.Module:
    """Replace every module whose exact type is in ``table`` (the root too) by
    ``make(mod, path)`` (path: its name in the model, "" for the root); a module shared by
    several parents becomes one shared replacement."""
    replaced = {}

    def swap(mod, path):
        if type(mod) in table:
            if id(mod) not in replaced:
                replaced[id(mod)] = make(mod, path)
            return replaced[id(mod)]
        # _modules, not named_children(): the latter hides a child held under two names.
        for name, child in list(mod._modules.items()):
            if child is not None:
                new_child = swap(child, f"{path}.{name}" if path else name)
                if new_child is not child:
                    mod._modules[name] = new_child
        return mod

    with torch.no_grad():
        return swap(module, "")


def convert(module: nn.Module, backend: str = "auto") -> nn.Module:
    """Replace every ``torch.nn`` LSTM/GRU/RNN and cell inside ``module`` (the root too) by the
    fastrnn module with the same parameters, buffers, hooks, device, dtype and training mode.

    Children are replaced in place; the (possibly new) root is returned. A module shared by
    several parents is replaced by one shared fastrnn module. Subclasses of the torch.nn
    classes are left alone, since their forward may differ; so is a module that cannot be
    rebuilt, with a warning naming it.
    """
    backends.check_name(backend)
    left = []

    def make(mod, path):
        try:
            return twin(mod, backend)
        except Exception as exc:  # one odd module must not stop a model half converted
            left.append(f"fastrnn.convert left {path or 'the root module'} "
                        f"({type(mod).__name__}) as it is: {type(exc).__name__}: {exc}")
            return mod

    result = _swap_all(module, TWINS, make)
    for message in left:
        warnings.warn(message, stacklevel=2)
    return result


def to_torch(module: nn.Module) -> nn.Module:
    """The inverse of :func:`convert`: replace every fastrnn LSTM/GRU/RNN and cell inside
    ``module`` (the root too) by the torch.nn module with the same Parameter objects, device,
    dtype and training mode, e.g. for code that requires plain torch.nn modules.

    Children are replaced in place; the (possibly new) root is returned. A shared module stays
    shared; subclasses of the fastrnn classes are left alone.
    """
    return _swap_all(module, TORCH_TWINS, lambda mod, path: torch_twin(mod))
