"""Zero sizes behave as torch.nn: an empty batch, a packed batch of empty steps, cells with
input_size or hidden_size 0, forward and backward, on every backend. Where torch.nn raises for
a zero size (no steps; input_size or hidden_size 0 in LSTM/GRU/RNN) fastrnn raises the same
(tests/test_errors.py)."""
import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence

import fastrnn
from fastrnn.spec import CELLS

from parity import flatten, run_both, twin_of

# The triton backend runs under its interpreter here (tests/conftest.py); the shapes are tiny.
BACKENDS = fastrnn.available_backends("cpu")


def dtype_for(backend):
    return torch.float32 if backend == "triton" else torch.float64


def _leaf(*shape, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen, dtype=dtype).requires_grad_()


MODULES = {
    "lstm": lambda **kw: nn.LSTM(3, 4, **kw),
    "gru": lambda **kw: nn.GRU(3, 4, **kw),
    "rnn_tanh": lambda **kw: nn.RNN(3, 4, **kw),
    "rnn_relu": lambda **kw: nn.RNN(3, 4, nonlinearity="relu", **kw),
}
LAYOUTS = {
    "plain": {},
    "stacked_bidirectional": dict(num_layers=2, bidirectional=True),
    "batch_first": dict(batch_first=True),
    "no_bias": dict(bias=False),
    "projected": dict(num_layers=2, bidirectional=True, proj_size=2),   # LSTM only
}


def _state(module, batch, dtype, seed=1):
    layers = module.num_layers * (2 if module.bidirectional else 1)
    width = module.proj_size or module.hidden_size
    h = _leaf(layers, batch, width, dtype=dtype, seed=seed)
    if isinstance(module, nn.LSTM):
        return (h, _leaf(layers, batch, module.hidden_size, dtype=dtype, seed=seed + 1))
    return h


def _module_pair(mode, layout, backend):
    """(dtype, a torch.nn module of the layout, its fastrnn twin on ``backend``)."""
    if layout == "projected" and mode != "lstm":
        pytest.skip("proj_size is LSTM's")
    dtype = dtype_for(backend)
    torch.manual_seed(0)
    reference = MODULES[mode](**LAYOUTS[layout]).to(dtype)
    return dtype, reference, twin_of(reference, backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("with_state", [False, True], ids=["no_hx", "hx"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("mode", list(MODULES))
def test_module_empty_batch(mode, layout, with_state, backend):
    dtype, reference, fast = _module_pair(mode, layout, backend)
    shape = (0, 5, 3) if reference.batch_first else (5, 0, 3)

    def make_args(as_dtype=None):
        dtype_ = as_dtype or dtype
        x = _leaf(*shape, dtype=dtype_)
        if not with_state:
            return (x,), [x]
        hx = _state(reference, 0, dtype_)
        return (x, hx), [x, *(hx if isinstance(hx, tuple) else (hx,))]

    run_both(reference, fast, make_args, dtype)
    output, _ = fast(*make_args()[0])
    assert output.shape == (shape[0], shape[1], (2 if reference.bidirectional else 1)
                            * (reference.proj_size or reference.hidden_size))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["plain", "stacked_bidirectional", "projected"])
@pytest.mark.parametrize("mode", list(MODULES))
def test_module_packed_empty_steps(mode, layout, backend):
    # A PackedSequence of steps with no live sequence: torch.nn returns empty results.
    dtype, reference, fast = _module_pair(mode, layout, backend)

    def make_args(as_dtype=None):
        dtype_ = as_dtype or dtype
        data = _leaf(0, 3, dtype=dtype_)
        return (PackedSequence(data, torch.tensor([0, 0])),), [data]

    run_both(reference, fast, make_args, dtype)


CELL_SHAPES = {   # (input_size, hidden_size, batch); batch None = unbatched input
    "input0": (0, 4, 3), "hidden0": (3, 0, 3), "input0_hidden0": (0, 0, 3),
    "batch0": (3, 4, 0), "batch0_input0": (0, 4, 0), "batch0_hidden0": (3, 0, 0),
    "unbatched_input0": (0, 4, None), "unbatched_hidden0": (3, 0, None),
}
CELL_MODULES = {
    "lstm": nn.LSTMCell, "gru": nn.GRUCell,
    "rnn_tanh": nn.RNNCell, "rnn_relu": lambda i, h: nn.RNNCell(i, h, nonlinearity="relu"),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("with_state", [False, True], ids=["no_hx", "hx"])
@pytest.mark.parametrize("shape", list(CELL_SHAPES))
@pytest.mark.parametrize("cell", list(CELL_MODULES))
def test_cell_zero_sizes(cell, shape, with_state, backend):
    input_size, hidden_size, batch = CELL_SHAPES[shape]
    dtype = dtype_for(backend)
    torch.manual_seed(0)
    reference = CELL_MODULES[cell](input_size, hidden_size).to(dtype)
    fast = twin_of(reference, backend)
    rows = () if batch is None else (batch,)

    def make_args(as_dtype=None):
        dtype_ = as_dtype or dtype
        x = _leaf(*rows, input_size, dtype=dtype_)
        if not with_state:
            return (x,), [x]
        states = [_leaf(*rows, hidden_size, dtype=dtype_, seed=s)
                  for s in range(1, 3 if cell == "lstm" else 2)]
        return (x, tuple(states) if cell == "lstm" else states[0]), [x, *states]

    run_both(reference, fast, make_args, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("packed", [False, True], ids=["plain", "packed"])
@pytest.mark.parametrize("cell", list(CELLS))
def test_op_hidden_size_zero(cell, packed, backend):
    """The op itself with hidden size 0 over several steps: empty results, zero gradients."""
    kind, dtype = CELLS[cell], dtype_for(backend)
    batch_sizes = torch.tensor([2, 2, 1]) if packed else None
    rows = 5 if packed else 6
    leaves = [_leaf(rows, 0, dtype=dtype), _leaf(2, 0, dtype=dtype)]
    if kind.has_cell_state:
        leaves.append(_leaf(2, 0, dtype=dtype))
    w_hh, b_hh = _leaf(0, 0, dtype=dtype), _leaf(0, dtype=dtype)
    c0 = leaves[2] if kind.has_cell_state else None
    output, h_n, c_n = fastrnn.ops.recurrence(cell, leaves[0], leaves[1], c0, w_hh, b_hh,
                                              None, batch_sizes, False, backend)
    assert output.shape == (rows, 0) and h_n.shape == (2, 0)
    assert c_n is None if c0 is None else c_n.shape == (2, 0)
    outs = [t for t in (output, h_n, c_n) if t is not None]
    grads = torch.autograd.grad(outs, leaves + [w_hh, b_hh], [torch.ones_like(t) for t in outs])
    for grad, leaf in zip(grads, leaves + [w_hh, b_hh]):
        assert grad.shape == leaf.shape and grad.dtype == dtype


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cell", list(CELLS))
def test_op_no_rows_passes_states_through(cell, backend):
    """No live rows (batch 0 packed over two steps, and a batch of states with no steps):
    the states come back unchanged and their gradients pass through; the weights get zeros."""
    kind, dtype = CELLS[cell], dtype_for(backend)
    hidden = 3
    for batch, batch_sizes in ((0, torch.tensor([0, 0])), (2, torch.tensor([], dtype=torch.long))):
        xproj = _leaf(0, kind.num_gates * hidden, dtype=dtype)
        h0 = _leaf(batch, hidden, dtype=dtype, seed=1)
        c0 = _leaf(batch, hidden, dtype=dtype, seed=2) if kind.has_cell_state else None
        w_hh = _leaf(kind.num_gates * hidden, hidden, dtype=dtype, seed=3)
        b_hh = _leaf(kind.num_gates * hidden, dtype=dtype, seed=4)
        output, h_n, c_n = fastrnn.ops.recurrence(cell, xproj, h0, c0, w_hh, b_hh, None,
                                                  batch_sizes, False, backend)
        assert output.shape == (0, hidden)
        assert torch.equal(h_n, h0) and (c0 is None or torch.equal(c_n, c0))
        outs = [t for t in (h_n, c_n) if t is not None]
        upstream = [torch.full_like(t, 2.0) for t in outs]
        inputs = [h0] + ([c0] if c0 is not None else []) + [w_hh, b_hh]
        grads = torch.autograd.grad(outs, inputs, upstream)
        for grad, want in zip(grads, upstream):
            assert torch.equal(grad, want)
        assert not any(g.any() for g in grads[len(outs):])


def test_layer_norm_cell_hidden_size_zero():
    # fastrnn's own options on an empty state: empty results and gradients, no NaN.
    cell = fastrnn.LSTMCell(3, 0, layer_norm=True, backend="reference").double()
    x = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    h, c = cell(x)
    assert h.shape == c.shape == (2, 0)
    grads = torch.autograd.grad(h.sum() + c.sum(), [x, *cell.parameters()])
    assert all(not g.isnan().any() for g in grads) and not grads[0].any()


OPTION_MODULES = {   # fastrnn's own options (torch.nn has none): empty in, empty out
    "lstm": lambda b: fastrnn.LSTM(3, 4, 2, backend=b, layer_norm=True, zoneout=0.3,
                                   recurrent_dropout=0.2, cell_clip=1.0),
    "gru": lambda b: fastrnn.GRU(3, 4, backend=b, layer_norm=True, zoneout=0.3,
                                 recurrent_dropout=0.2),
    "lstm_cell": lambda b: fastrnn.LSTMCell(3, 4, backend=b, layer_norm=True, zoneout=0.3,
                                            recurrent_dropout=0.2),
    "gru_cell": lambda b: fastrnn.GRUCell(3, 4, backend=b, layer_norm=True, zoneout=0.3),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(OPTION_MODULES))
def test_options_on_an_empty_batch(name, backend):
    module = OPTION_MODULES[name](backend).train()
    x = torch.randn((2, 0, 3) if "cell" not in name else (0, 3), requires_grad=True)
    outputs = flatten(module(x))
    assert all(t.numel() == 0 for t in outputs)
    params = list(module.parameters())
    grads = torch.autograd.grad(sum(t.sum() for t in outputs), [x, *params])
    assert [g.shape for g in grads] == [x.shape, *(p.shape for p in params)]
    assert not any(g.any() for g in grads)
