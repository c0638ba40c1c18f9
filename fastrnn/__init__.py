"""fastrnn: fused LSTM / GRU / RNN kernels behind drop-in replacements for torch.nn.

    import fastrnn
    lstm = fastrnn.LSTM(512, 512, num_layers=2)      # like torch.nn.LSTM, plus backend=
    model = fastrnn.convert(model)                    # swap every torch.nn RNN in a model
    model = fastrnn.to_torch(model)                   # and back to plain torch.nn modules
    qmodel = fastrnn.quantize_weights(model)          # int8 weights for CPU inference
"""
import torch

from . import ops  # registers the torch.ops.fastrnn ops
from .backends import available_backends, get_backend, set_backend
from .nn import GRU, LSTM, RNN, GRUCell, LSTMCell, RNNCell, convert, to_torch
from .quantized import QuantizedGRU, QuantizedLSTM, QuantizedRNN, quantize_weights

# Saved whole modules load with torch.load's default weights_only=True: their pickled state is
# what torch.nn's modules hold (tensors, numbers, strings, containers).
torch.serialization.add_safe_globals([LSTM, GRU, RNN, LSTMCell, GRUCell, RNNCell,
                                      QuantizedLSTM, QuantizedGRU, QuantizedRNN])

__version__ = "0.1.0"

__all__ = ["LSTM", "GRU", "RNN", "LSTMCell", "GRUCell", "RNNCell", "convert", "to_torch",
           "quantize_weights", "QuantizedLSTM", "QuantizedGRU", "QuantizedRNN",
           "available_backends", "set_backend", "get_backend", "ops", "__version__"]
