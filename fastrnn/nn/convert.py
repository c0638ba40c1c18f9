"""convert(): swap every torch.nn RNN module in a model for its fastrnn twin."""
from __future__ import annotations

import torch
from torch import nn

from .. import backends
from .cell import GRUCell, LSTMCell, RNNCell
from .rnn import GRU, LSTM, RNN

TWINS = {nn.LSTM: LSTM, nn.GRU: GRU, nn.RNN: RNN,
         nn.LSTMCell: LSTMCell, nn.GRUCell: GRUCell, nn.RNNCell: RNNCell}


def _config(module: nn.Module) -> dict:
    if isinstance(module, nn.RNNBase):
        config = dict(input_size=module.input_size, hidden_size=module.hidden_size,
                      num_layers=module.num_layers, bias=module.bias,
                      batch_first=module.batch_first, dropout=module.dropout,
                      bidirectional=module.bidirectional)
        if isinstance(module, nn.LSTM):
            config["proj_size"] = module.proj_size
    else:
        config = dict(input_size=module.input_size, hidden_size=module.hidden_size,
                      bias=module.bias)
    if isinstance(module, (nn.RNN, nn.RNNCell)):
        config["nonlinearity"] = module.nonlinearity
    return config


def twin(module: nn.Module, backend: str = "auto") -> nn.Module:
    """The fastrnn module for one torch.nn RNN module, holding the very same Parameter
    objects (so optimizers, weight tying and shared modules stay intact)."""
    cls = TWINS[type(module)]
    # Built on the meta device: no memory, no initialisation, no RNG draws.
    new = cls(**_config(module), device="meta", backend=backend)
    for name, _ in list(new.named_parameters(recurse=False)):
        setattr(new, name, getattr(module, name))
    new.train(module.training)
    return new


def convert(module: nn.Module, backend: str = "auto") -> nn.Module:
    """Replace every ``torch.nn`` LSTM/GRU/RNN and cell inside ``module`` (the root too) by the
    fastrnn module with the same parameters, device, dtype and training mode.

    Children are replaced in place; the (possibly new) root is returned. A module shared by
    several parents is replaced by one shared fastrnn module. Subclasses of the torch.nn
    classes are left alone, since their forward may differ.
    """
    backends.check_name(backend)
    replaced = {}

    def swap(mod):
        if type(mod) in TWINS:
            if id(mod) not in replaced:
                replaced[id(mod)] = twin(mod, backend)
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
