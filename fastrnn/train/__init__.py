"""Training toolkit for recurrent models: truncated BPTT, state detaching, clipping,
weight tying and AWD-LSTM regularisers. Backend-neutral: works the same with fastrnn
and torch.nn modules."""
from .regularizers import (EmbeddingDropout, LockedDropout, activation_regularization,
                           embedding_dropout, temporal_activation_regularization)
from .state import detach_state, map_state, reset_state
from .step import StepResult, TrainStep, total_grad_norm
from .tbptt import TBPTT, Chunk, batchify
from .tying import tie_weights

__all__ = [
    "TBPTT", "Chunk", "batchify",
    "detach_state", "reset_state", "map_state",
    "TrainStep", "StepResult", "total_grad_norm",
    "tie_weights",
    "LockedDropout", "EmbeddingDropout", "embedding_dropout",
    "activation_regularization", "temporal_activation_regularization",
]
