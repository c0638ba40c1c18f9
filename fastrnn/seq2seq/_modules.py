"""The recurrent modules the seq2seq blocks are built from: fastrnn's drop-ins for torch.nn."""
from __future__ import annotations

from .. import nn as fnn

CELL_KINDS = ("lstm", "gru")
_RNNS = {"lstm": fnn.LSTM, "gru": fnn.GRU}
_CELLS = {"lstm": fnn.LSTMCell, "gru": fnn.GRUCell}


def _check(cell: str) -> str:
    if cell not in CELL_KINDS:
        raise ValueError(f"cell must be one of {CELL_KINDS}, got {cell!r}")
    return cell


def make_rnn(cell: str, *args, backend: str = "auto", **kwargs):
    """fastrnn.LSTM / fastrnn.GRU, with torch.nn's constructor arguments."""
    return _RNNS[_check(cell)](*args, backend=backend, **kwargs)


def make_cell(cell: str, *args, backend: str = "auto", **kwargs):
    """fastrnn.LSTMCell / fastrnn.GRUCell, with torch.nn's constructor arguments."""
    return _CELLS[_check(cell)](*args, backend=backend, **kwargs)
