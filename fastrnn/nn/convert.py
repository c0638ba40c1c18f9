"""convert(): swap every torch.nn RNN module in a model for its fastrnn twin; to_torch(): back."""
from __future__ import annotations

import torch
from torch import nn

from .. import backends
from . import options
from .cell import GRUCell, LSTMCell, RNNCell
from .rnn import GRU, LSTM, RNN

TWINS = {nn.LSTM: LSTM, nn.GRU: GRU, nn.RNN: RNN,
         nn.LSTMCell: LSTMCell, nn.GRUCell: GRUCell, nn.RNNCell: RNNCell}
TORCH_TWINS = {fast: torch_cls for torch_cls, fast in TWINS.items()}


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
    optimizers, weight tying and shared modules stay intact), in the same training mode."""
    # Built on the meta device: no memory, no initialisation, no RNG draws.
    new = cls(**_config(module), device="meta", **kwargs)
    for name, _ in list(new.named_parameters(recurse=False)):
        setattr(new, name, getattr(module, name))
    new.train(module.training)
    return new


def twin(module: nn.Module, backend: str = "auto") -> nn.Module:
    """The fastrnn module for one torch.nn RNN module, on the same Parameter objects."""
    return _rebuild(TWINS[type(module)], module, backend=backend)


def torch_twin(module: nn.Module) -> nn.Module:
    """The torch.nn module for one fastrnn RNN module, on the same Parameter objects."""
    options.refuse_torch_path(module, "fastrnn.to_torch")
    new = _rebuild(TORCH_TWINS[type(module)], module)
    if isinstance(new, nn.RNNBase):
        new._init_flat_weights()
        new.flatten_parameters()  # what torch.nn does when its module is built or moved (cuDNN)
    return new


def _swap_all(module: nn.Module, table, make) -> nn.Module:
    """Replace every module whose exact type is in ``table`` (the root too) by ``make(mod)``;
    a module shared by several parents becomes one shared replacement."""
    replaced = {}

    def swap(mod):
        if type(mod) in table:
            if id(mod) not in replaced:
                replaced[id(mod)] = make(mod)
            return replaced[id(mod)]
        # _modules, not named_children(): the latter hides a child held under two names.
        for name, child in list(mod._modules.items()):
            if child is not None:
                new_child = swap(child)
                if new_child is not child:
                    mod._modules[name] = new_child
        return mod

    with torch.no_grad():
        return swap(module)


def convert(module: nn.Module, backend: str = "auto") -> nn.Module:
    """Replace every ``torch.nn`` LSTM/GRU/RNN and cell inside ``module`` (the root too) by the
    fastrnn module with the same parameters, device, dtype and training mode.

    Children are replaced in place; the (possibly new) root is returned. A module shared by
    several parents is replaced by one shared fastrnn module. Subclasses of the torch.nn
    classes are left alone, since their forward may differ.
    """
    backends.check_name(backend)
    return _swap_all(module, TWINS, lambda mod: twin(mod, backend))


def to_torch(module: nn.Module) -> nn.Module:
    """The inverse of :func:`convert`: replace every fastrnn LSTM/GRU/RNN and cell inside
    ``module`` (the root too) by the torch.nn module with the same Parameter objects, device,
    dtype and training mode, e.g. for code that requires plain torch.nn modules.

    Children are replaced in place; the (possibly new) root is returned. A shared module stays
    shared; subclasses of the fastrnn classes are left alone.
    """
    return _swap_all(module, TORCH_TWINS, torch_twin)
