"""Shared helpers of the parity tests: weight copying, running and comparing (the tolerance
rule is fastrnn.testing's)."""
import copy
import os

import torch

import fastrnn
from fastrnn import testing


def cpu_backends():
    """Backends the CPU parity grid runs on: FASTRNN_TEST_BACKENDS, else every available one
    except triton (whose interpreter is too slow for the grid; tests/test_triton.py covers it)."""
    names = os.environ.get("FASTRNN_TEST_BACKENDS")
    if names:
        return names.split(",")
    return [b for b in fastrnn.available_backends("cpu") if b != "triton"]


def assert_close(actual, baseline, truth=None, what=""):
    """fastrnn.testing.assert_close: float64 against the baseline to 1e-10; lower precision
    against a float64 truth, within 2x the baseline's own error plus a few ulps."""
    testing.assert_close(actual, baseline, truth, what)


def flatten(value):
    """Tensors of a (nested) result: PackedSequence data, tuples of states."""
    if isinstance(value, torch.nn.utils.rnn.PackedSequence):
        return [value.data]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in flatten(v)]
    return [value]


FAST_TWIN = {torch.nn.LSTM: fastrnn.LSTM, torch.nn.GRU: fastrnn.GRU, torch.nn.RNN: fastrnn.RNN,
             torch.nn.LSTMCell: fastrnn.LSTMCell, torch.nn.GRUCell: fastrnn.GRUCell,
             torch.nn.RNNCell: fastrnn.RNNCell}


def ctor_args(module):
    """Constructor arguments that rebuild a torch.nn (or fastrnn) RNN module or cell."""
    args = dict(input_size=module.input_size, hidden_size=module.hidden_size, bias=module.bias)
    if hasattr(module, "num_layers"):
        args.update(num_layers=module.num_layers, batch_first=module.batch_first,
                    dropout=module.dropout, bidirectional=module.bidirectional)
        if module.proj_size:
            args["proj_size"] = module.proj_size
    if hasattr(module, "nonlinearity"):
        args["nonlinearity"] = module.nonlinearity
    return args


def twin_of(module, backend):
    """The fastrnn twin of a torch.nn module, weights loaded with a strict state_dict."""
    fast = FAST_TWIN[type(module)](**ctor_args(module), backend=backend,
                                   dtype=next(module.parameters()).dtype)
    fast.load_state_dict(module.state_dict(), strict=True)
    fast.train(module.training)
    return fast


def run_both(reference, fast, make_args, dtype):
    """Run a torch.nn module and its twin on equal fresh inputs; compare outputs and the
    gradients of every input leaf and parameter under the same random upstream gradient.
    Below float64, torch.nn also runs in float64 on the same rounded weights, inputs and
    upstream gradients: the truth both are judged against (fastrnn.testing).

    make_args(as_dtype=None) -> (call_args, leaves): the module's arguments and the tensors
    to differentiate (the raw sequences when the input is packed), drawn in the test's dtype
    and then, when as_dtype is given, converted to it (before requires_grad)."""
    runs = [(reference, dtype), (fast, dtype)]
    if dtype != torch.float64:
        runs.append((copy.deepcopy(reference).double(), torch.float64))
    results = []
    for module, run_dtype in runs:
        args, leaves = make_args() if run_dtype == dtype else make_args(run_dtype)
        outs = flatten(module(*args))
        gen = torch.Generator().manual_seed(1234)
        grads_out = [torch.randn(o.shape, generator=gen, dtype=dtype).to(run_dtype)
                     for o in outs]
        grads = torch.autograd.grad(outs, list(leaves) + list(module.parameters()), grads_out)
        results.append(list(outs) + list(grads))
    assert len(results[0]) == len(results[1])
    truth = results[2] if len(results) == 3 else None
    num_outs = len(grads_out)
    for i, b in enumerate(results[1]):
        what = f"output {i}" if i < num_outs else f"grad {i - num_outs}"
        assert_close(b, results[0][i], None if truth is None else truth[i], what)
