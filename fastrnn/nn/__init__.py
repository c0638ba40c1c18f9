"""Drop-in modules: LSTM, GRU, RNN and their cells, convert() and to_torch()."""
from .cell import GRUCell, LSTMCell, RNNCell, RNNCellBase
from .convert import convert, to_torch
from .rnn import GRU, LSTM, RNN, RNNBase

__all__ = ["LSTM", "GRU", "RNN", "RNNBase", "LSTMCell", "GRUCell", "RNNCell", "RNNCellBase",
           "convert", "to_torch"]
