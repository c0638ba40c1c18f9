"""Cell kinds: the facts about each recurrence that every layer of fastrnn shares."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class CellKind:
    name: str             # op prefix: fastrnn::<name>_forward / _backward
    mode: str             # torch.nn mode string ("LSTM", "GRU", "RNN_TANH", "RNN_RELU")
    num_gates: int        # rows of w_ih / w_hh per hidden unit
    has_cell_state: bool  # LSTM carries c besides h
    has_projection: bool  # LSTM may project h to proj_size (w_hr)

    def workspace_width(self, hidden_size: int, projected: bool) -> int:
        """Columns of the workspace the forward op returns for backward (see fastrnn.ops)."""
        if self.name == "lstm":
            return 5 * hidden_size + (hidden_size if projected else 0)
        if self.name == "gru":
            return 4 * hidden_size
        return 0


CELLS = {
    "lstm": CellKind("lstm", "LSTM", 4, True, True),
    "gru": CellKind("gru", "GRU", 3, False, False),
    "rnn_tanh": CellKind("rnn_tanh", "RNN_TANH", 1, False, False),
    "rnn_relu": CellKind("rnn_relu", "RNN_RELU", 1, False, False),
}
CELL_OF_MODE = {kind.mode: kind for kind in CELLS.values()}


def accumulate_dtype(dtype):
    """Gate math and the workspace run in float32 for half types, else in the input dtype."""
    import torch
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
