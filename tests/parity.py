"""Shared helpers of the parity tests: tolerances, weight copying, running and comparing."""
import os

import torch

import fastrnn

# DESIGN.md: float64 to 1e-10, float32 to 1e-5, relative to the size of the reference values.
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5}


def cpu_backends():
    """Backends the CPU parity grid runs on: FASTRNN_TEST_BACKENDS, else every available one
    except triton (whose interpreter is too slow for the grid; tests/test_triton.py covers it)."""
    names = os.environ.get("FASTRNN_TEST_BACKENDS")
    if names:
        return names.split(",")
    return [b for b in fastrnn.available_backends("cpu") if b != "triton"]


def assert_close(actual, expected, dtype, what=""):
    """max |actual - expected| <= tol * max(1, max |expected|)."""
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    if expected.numel() == 0:
        return
    error = (actual - expected).abs().max().item()
    scale = max(1.0, expected.abs().max().item())
    assert error <= TOLERANCE[dtype] * scale, f"{what}: error {error:.3g} (scale {scale:.3g})"


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

    make_args() -> (call_args, leaves): the module's arguments and the tensors to
    differentiate (the raw sequences when the input is packed)."""
    results = []
    for module in (reference, fast):
        args, leaves = make_args()
        outs = flatten(module(*args))
        gen = torch.Generator().manual_seed(1234)
        grads_out = [torch.randn(o.shape, generator=gen, dtype=o.dtype) for o in outs]
        grads = torch.autograd.grad(outs, list(leaves) + list(module.parameters()), grads_out)
        results.append((outs, grads))
    (outs_a, grads_a), (outs_b, grads_b) = results
    assert len(outs_a) == len(outs_b)
    for i, (b, a) in enumerate(zip(outs_b, outs_a)):
        assert_close(b, a, dtype, f"output {i}")
    for i, (b, a) in enumerate(zip(grads_b, grads_a)):
        assert_close(b, a, dtype, f"grad {i}")
