"""Drop-in modules: LSTM, GRU, RNN and their cells, and convert()."""
from .cell import GRUCell, LSTMCell, RNNCell, RNNCellBase
from .convert import convert
from .rnn import GRU, LSTM, RNN, RNNBase

__all__ = ["LSTM", "GRU", "RNN", "RNNBase", "LSTMCell", "GRUCell", "RNNCell", "RNNCellBase",
           "convert"]
