"""Parity of fastrnn.LSTM/GRU/RNN and cells with torch.nn: outputs, final states and the
gradients of inputs, initial states and every parameter, over the whole argument grid."""
import copy

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_sequence

from parity import assert_close, cpu_backends, flatten, run_both, twin_of

DTYPES = [torch.float64, torch.float32]
MODULES = {"lstm": (nn.LSTM, {}), "lstm_proj": (nn.LSTM, {"proj_size": 2}),
           "gru": (nn.GRU, {}), "rnn_tanh": (nn.RNN, {"nonlinearity": "tanh"}),
           "rnn_relu": (nn.RNN, {"nonlinearity": "relu"})}
FORMS = ["batched", "batch_first", "unbatched", "unbatched_batch_first", "packed_sorted",
         "packed_unsorted"]
LENGTHS = {"packed_sorted": [5, 3, 1], "packed_unsorted": [3, 5, 1]}  # length-1 included


def make_inputs(module, form, init_state, dtype, steps=5, batch=3):
    """A make_args() for run_both: fresh, seeded inputs in the given form."""
    num_states = module.num_layers * (2 if module.bidirectional else 1)
    width = module.proj_size if getattr(module, "proj_size", 0) else module.hidden_size

    def make_args(as_dtype=None):
        gen = torch.Generator().manual_seed(0)

        def rand(*shape):
            x = torch.randn(*shape, generator=gen, dtype=dtype)
            return x.to(as_dtype or dtype).requires_grad_()

        if form.startswith("packed"):
            leaves = [rand(n, module.input_size) for n in LENGTHS[form]]
            x = pack_sequence(leaves, enforce_sorted=form == "packed_sorted")
            batch_shape = (len(leaves),)
        elif form.startswith("unbatched"):
            x = rand(steps, module.input_size)
            leaves, batch_shape = [x], ()
        else:
            shape = (batch, steps) if module.batch_first else (steps, batch)
            x = rand(*shape, module.input_size)
            leaves, batch_shape = [x], (batch,)
        if not init_state:
            return (x,), leaves
        h = rand(num_states, *batch_shape, width)
        if isinstance(module, nn.LSTM):
            c = rand(num_states, *batch_shape, module.hidden_size)
            return (x, (h, c)), leaves + [h, c]
        return (x, h), leaves + [h]

    return make_args


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("init_state", [False, True], ids=["no_hx", "hx"])
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
@pytest.mark.parametrize("num_layers", [1, 2, 3])
@pytest.mark.parametrize("kind", list(MODULES))
def test_module_parity(kind, num_layers, bidirectional, bias, form, init_state, dtype, backend):
    cls, extra = MODULES[kind]
    torch.manual_seed(0)
    reference = cls(3, 4, num_layers=num_layers, bias=bias, bidirectional=bidirectional,
                    batch_first=form.endswith("batch_first"), dtype=dtype, **extra)
    fast = twin_of(reference, backend)
    run_both(reference, fast, make_inputs(reference, form, init_state, dtype), dtype)


ODD_SIZES = {  # (input, hidden, steps, batch)
    "T1": (3, 4, 1, 2), "H1": (2, 1, 4, 3), "B1": (3, 4, 5, 1), "H500": (7, 500, 3, 2),
    "T63": (3, 5, 63, 2)}


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("size", list(ODD_SIZES))
@pytest.mark.parametrize("kind", list(MODULES))
def test_odd_sizes(kind, size, dtype, backend):
    cls, extra = MODULES[kind]
    input_size, hidden, steps, batch = ODD_SIZES[size]
    if "proj_size" in extra and hidden == 1:
        pytest.skip("proj_size must be smaller than hidden_size")
    torch.manual_seed(0)
    reference = cls(input_size, hidden, bidirectional=True, dtype=dtype, **extra)
    fast = twin_of(reference, backend)
    run_both(reference, fast, make_inputs(reference, "batched", True, dtype, steps, batch),
             dtype)


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("kind", list(MODULES))
def test_dropout_between_layers(kind, backend):
    """Training-mode dropout draws the same masks as torch.nn (same RNG use); eval mode none."""
    cls, extra = MODULES[kind]
    torch.manual_seed(0)
    reference = cls(3, 4, num_layers=3, dropout=0.5, bidirectional=True,
                    dtype=torch.float64, **extra)
    fast = twin_of(reference, backend)
    make_args = make_inputs(reference, "batched", True, torch.float64)
    for training in (True, False):
        reference.train(training)
        fast.train(training)
        torch.manual_seed(7)
        out_ref = reference(*make_args()[0])[0]
        torch.manual_seed(7)
        out_fast = fast(*make_args()[0])[0]
        torch.testing.assert_close(out_fast, out_ref, rtol=1e-10, atol=1e-10)
    fast.train(True)
    torch.manual_seed(7)
    assert not torch.equal(fast(*make_args()[0])[0], out_fast), "dropout had no effect"


CELLS = {"lstm": nn.LSTMCell, "gru": nn.GRUCell, "rnn_tanh": nn.RNNCell,
         "rnn_relu": nn.RNNCell}


class Unroll(nn.Module):
    """Calls a cell over a few steps, feeding its state back, as a decoder does."""

    def __init__(self, cell, steps):
        super().__init__()
        self.cell, self.steps = cell, steps

    def forward(self, x, hx=None):
        outputs = []
        for t in range(self.steps):
            hx = self.cell(x[t], hx)
            outputs.append(hx)
        return outputs


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("init_state", [False, True], ids=["no_hx", "hx"])
@pytest.mark.parametrize("batched", [True, False], ids=["batched", "unbatched"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("steps", [1, 3])
@pytest.mark.parametrize("kind", list(CELLS))
def test_cell_parity(kind, steps, bias, batched, init_state, dtype, backend):
    extra = {"nonlinearity": kind[4:]} if kind.startswith("rnn") else {}
    torch.manual_seed(0)
    cell = CELLS[kind](3, 4, bias=bias, dtype=dtype, **extra)
    fast = twin_of(cell, backend)
    batch_shape = (2,) if batched else ()

    def make_args(as_dtype=None):
        gen = torch.Generator().manual_seed(0)

        def rand(*shape):
            x = torch.randn(*shape, generator=gen, dtype=dtype)
            return x.to(as_dtype or dtype).requires_grad_()

        x = rand(steps, *batch_shape, 3)
        if not init_state:
            return (x,), [x]
        hx = (rand(*batch_shape, 4), rand(*batch_shape, 4)) if kind == "lstm" \
            else rand(*batch_shape, 4)
        return (x, hx), [x, *(hx if isinstance(hx, tuple) else (hx,))]

    run_both(Unroll(cell, steps), Unroll(fast, steps), make_args, dtype)


# ------------------------------------------------- auto on a device without verified kernels

@pytest.fixture
def op_calls(monkeypatch):
    """The cells of the fastrnn op calls made (ops.recurrence), with "auto" as the default."""
    from fastrnn import backends, ops
    monkeypatch.setattr(backends, "_default", None)
    monkeypatch.delenv("FASTRNN_BACKEND", raising=False)
    calls = []
    original = ops.recurrence
    monkeypatch.setattr(ops, "recurrence", lambda *a, **k: calls.append(a[0]) or original(*a, **k))
    return calls


@pytest.fixture
def torch_path_on_cpu(monkeypatch, op_calls):
    """Make the CPU behave like CUDA today: no verified fastrnn kernel, so "auto" runs
    torch.nn's own forward for modules without options, eager and compiled (the CUDA routes
    given to the CPU). -> the op calls made."""
    from fastrnn.backends import routing
    routes = {key: routing.ROUTES[("cuda",) + key[1:]] if key[0] == "cpu" else route
              for key, route in routing.ROUTES.items()}
    assert set(routes.values()) == {routing.TORCH}
    monkeypatch.setattr(routing, "ROUTES", routes)
    monkeypatch.setattr(routing, "COMPILED_ROUTES_STAND",
                        dict(routing.COMPILED_ROUTES_STAND,
                             cpu=routing.COMPILED_ROUTES_STAND["cuda"]))
    return op_calls


@pytest.mark.parametrize("form", ["batched", "packed_unsorted"])
@pytest.mark.parametrize("kind", list(MODULES))
def test_auto_runs_torch_nn_where_kernels_are_unverified(kind, form, torch_path_on_cpu):
    """The same numbers as torch.nn bit for bit (its own code on the same parameters, in
    training mode with dropout between layers under the same seed), no fastrnn op."""
    cls, extra = MODULES[kind]
    torch.manual_seed(0)
    reference = cls(3, 4, num_layers=2, bidirectional=True, dropout=0.3, **extra).double()
    fast = twin_of(reference, "auto")
    make_args = make_inputs(reference, form, True, torch.float64)
    results = []
    for module in (reference, fast):
        args, leaves = make_args()
        torch.manual_seed(7)
        outs = flatten(module(*args))
        grads = torch.autograd.grad(sum(o.sum() for o in outs), leaves + list(module.parameters()))
        results.append(outs + list(grads))
    for a, b in zip(*results):
        assert torch.equal(a, b)
    assert torch_path_on_cpu == []


@pytest.mark.parametrize("cls", [nn.LSTMCell, nn.GRUCell, nn.RNNCell])
def test_auto_cells_run_torch_nn_where_kernels_are_unverified(cls, torch_path_on_cpu):
    torch.manual_seed(0)
    reference = cls(3, 4).double()
    fast = twin_of(reference, "auto")
    x = torch.randn(2, 3, dtype=torch.float64)
    for a, b in zip(flatten(reference(x)), flatten(fast(x))):
        assert torch.equal(a, b)
    assert torch_path_on_cpu == []


def test_torch_path_only_for_auto_without_options(torch_path_on_cpu):
    """A named backend, or an option torch.nn does not have, runs fastrnn's op."""
    x = torch.randn(5, 2, 3)
    import fastrnn
    fastrnn.LSTM(3, 4, backend="reference")(x)
    fastrnn.LSTM(3, 4, layer_norm=True)(x)
    fastrnn.GRUCell(3, 4, layer_norm=True)(x[0])
    fastrnn.GRU(3, 4, backend="native" if "native" in fastrnn.available_backends("cpu")
                else "reference")(x)
    assert torch_path_on_cpu == ["lstm", "lstm", "gru", "gru"]


# An input of each shape class of fastrnn.backends.routing (time-major, input width 3).
SHAPE_CALLS = {
    "batch1": lambda: torch.randn(17, 1, 3, dtype=torch.float64),
    "small": lambda: torch.randn(17, 16, 3, dtype=torch.float64),
    "large": lambda: torch.randn(5, 17, 3, dtype=torch.float64),
    "stream1": lambda: torch.randn(16, 1, 3, dtype=torch.float64),
    "stream_small": lambda: torch.randn(4, 8, 3, dtype=torch.float64),
    "packed": lambda: pack_sequence([torch.randn(n, 3, dtype=torch.float64) for n in (4, 2, 5)],
                                    enforce_sorted=False),
    "cell": lambda: torch.randn(2, 3, dtype=torch.float64),
}
CELL_OF_MODE = {"LSTM": "LSTMCell", "GRU": "GRUCell", "RNN": "RNNCell"}


@pytest.mark.parametrize("shape", list(SHAPE_CALLS))
@pytest.mark.parametrize("inference", [True, False], ids=["inference", "training"])
@pytest.mark.parametrize("mode", ["LSTM", "GRU", "RNN"])
def test_every_cpu_route_is_taken(mode, inference, shape, op_calls):
    """Each entry of the CPU routing table decides what a call of its class runs: torch.nn's
    path (no fastrnn op, torch.nn's numbers exactly) or fastrnn's kernels (one op per layer)."""
    import fastrnn
    from fastrnn.backends import routing
    route = routing.ROUTES["cpu", mode, inference, shape]
    torch.manual_seed(0)
    name = CELL_OF_MODE[mode] if shape == "cell" else mode
    fast = getattr(fastrnn, name)(3, 4).double()
    reference = getattr(nn, name)(3, 4).double()
    x = SHAPE_CALLS[shape]()
    reference.load_state_dict(fast.state_dict())
    with torch.set_grad_enabled(not inference):
        got, expected = flatten(fast(x)), flatten(reference(x))
    if route == routing.TORCH:
        assert op_calls == []
        for a, b in zip(got, expected):
            assert torch.equal(a, b)
    else:
        assert op_calls == [{"LSTM": "lstm", "GRU": "gru", "RNN": "rnn_tanh"}[mode]]
        for a, b in zip(got, expected):
            assert_close(a, b)


def test_cpu_routes_follow_the_measurements():
    """The CPU policy (docs/auto.md): torch.nn's path except where the native kernels won on
    every CPU measured: packed training, GRU training at batch <= 16 and inference at batch
    <= 16, and LSTM streaming inference (GRU inference at batch 1 and GRU streams: Intel only,
    at 1 and 2 threads). GRU training on a streaming chunk is torch.nn's (the op's per-call
    autograd cost decides there)."""
    from fastrnn.backends import routing
    kernels = {key for key, route in routing.ROUTES.items()
               if key[0] == "cpu" and route == routing.KERNELS}
    assert kernels == {("cpu", "LSTM", False, "packed"), ("cpu", "GRU", False, "packed"),
                       ("cpu", "GRU", False, "batch1"), ("cpu", "GRU", False, "small"),
                       ("cpu", "GRU", True, "small"), ("cpu", "GRU", True, "batch1"),
                       # streaming: inference
                       ("cpu", "LSTM", True, "stream1"), ("cpu", "LSTM", True, "stream_small"),
                       ("cpu", "GRU", True, "stream1"), ("cpu", "GRU", True, "stream_small")}
    assert all(route == routing.TORCH for key, route in routing.ROUTES.items()
               if key[0] == "cuda")


def test_streaming_shape_classes(monkeypatch):
    """A short chunk (up to STREAM_STEPS frames) at up to STREAM_BATCH streams is a streaming
    class, read from the input as the module sees it (batch_first, unbatched)."""
    import fastrnn
    from fastrnn.backends import routing
    from fastrnn.nn import options
    seen = []

    def choose(name, device, mode, inference, shape, compiling=False):
        seen.append(shape)
        return "torch"
    steps, batch = routing.STREAM_STEPS, routing.STREAM_BATCH
    cases = [((steps, 1, 3), False, "stream1"), ((steps + 1, 1, 3), False, "batch1"),
             ((1, batch, 3), False, "stream_small"), ((1, batch + 1, 3), False, "small"),
             ((batch, 1, 3), True, "stream_small"), ((1, steps + 1, 3), True, "batch1"),
             ((steps, 3), False, "stream1"), ((steps + 1, 3), False, "batch1")]
    monkeypatch.setattr(options.backends, "choose", choose)
    for shape, batch_first, _ in cases:
        options.runs_torch_path(fastrnn.LSTM(3, 4, batch_first=batch_first), torch.randn(*shape))
    assert seen == [want for _, _, want in cases]


def test_options_always_run_fastrnn_kernels(op_calls):
    """Wherever a route says torch.nn, a call whose math torch.nn cannot do runs the op."""
    import fastrnn
    x = torch.randn(5, 2, 3)
    with torch.no_grad():
        fastrnn.LSTM(3, 4, layer_norm=True)(x)
        fastrnn.LSTM(3, 4, cell_clip=1.0)(x)
        fastrnn.GRU(3, 4, zoneout=0.1).eval()(x)
        fastrnn.LSTMCell(3, 4, layer_norm=True)(x[0])
    assert op_calls == ["lstm", "lstm", "gru", "lstm"]


def test_compiled_auto_runs_torch_nn_where_kernels_are_unverified(torch_path_on_cpu):
    """Under torch.compile on a device whose routes say torch.nn (CUDA today), "auto" runs
    torch.nn's path inside the graph (fullgraph=True: no graph break), not the step-by-step
    reference: no fastrnn op, eager's numbers and gradients."""
    import fastrnn
    torch.manual_seed(0)
    for fast in (fastrnn.LSTM(3, 4, num_layers=2), fastrnn.GRU(3, 4, bidirectional=True)):
        fast = fast.double()
        x = torch.randn(5, 2, 3, dtype=torch.float64, requires_grad=True)
        expected = flatten(fast(x))
        expected_grads = torch.autograd.grad(sum(o.sum() for o in expected),
                                             [x] + list(fast.parameters()))
        torch._dynamo.reset()
        got = flatten(torch.compile(fast, fullgraph=True, backend="aot_eager")(x))
        grads = torch.autograd.grad(sum(o.sum() for o in got), [x] + list(fast.parameters()))
        for a, b in zip(got + list(grads), expected + list(expected_grads)):
            assert_close(a, b)
    assert torch_path_on_cpu == []


def test_compiled_packed_input_runs_fastrnn_kernels(torch_path_on_cpu):
    """A PackedSequence does not trace through torch.nn's path (its batch sizes are data):
    compiled, it runs fastrnn's op, with eager torch.nn's numbers."""
    import fastrnn
    torch.manual_seed(0)
    lstm = fastrnn.LSTM(3, 4).double()
    x = pack_sequence([torch.randn(n, 3, dtype=torch.float64) for n in (4, 2)],
                      enforce_sorted=False)
    expected = lstm(x)[0].data
    assert torch_path_on_cpu == []
    torch._dynamo.reset()
    got = torch.compile(lstm, fullgraph=True, backend="aot_eager")(x)[0].data
    assert_close(got, expected)
    assert torch_path_on_cpu   # traced through ops.recurrence


def test_cpu_compiled_runs_fastrnn_kernels(op_calls):
    """On CPU torch.nn's RNNs trace as a step-by-step decomposition, so under torch.compile
    "auto" runs fastrnn's op (one graph node) for every call."""
    import fastrnn
    torch.manual_seed(0)
    lstm = fastrnn.LSTM(3, 4, num_layers=2)
    x = torch.randn(5, 2, 3)
    expected = lstm(x)[0]
    assert op_calls == []   # eager LSTM training at batch 2: torch.nn's path
    torch._dynamo.reset()
    compiled = torch.compile(lstm, fullgraph=True, backend="aot_eager")(x)[0]
    truth = copy.deepcopy(lstm).double()(x.double())[0]
    assert_close(compiled, expected, truth)
    assert op_calls


def test_torch_path_for_dropout_options_in_eval_mode(torch_path_on_cpu):
    """recurrent_dropout and weight_drop act in training only: in eval the math is plain, so
    torch.nn's path serves it; in training fastrnn's op does."""
    import fastrnn
    torch.manual_seed(0)
    reference = nn.LSTM(3, 4).eval()
    fast = fastrnn.LSTM(3, 4, recurrent_dropout=0.3, weight_drop=0.5).eval()
    fast.load_state_dict(reference.state_dict())
    x = torch.randn(5, 2, 3)
    assert torch.equal(fast(x)[0], reference(x)[0]) and torch_path_on_cpu == []
    fast.train()(x)
    assert torch_path_on_cpu == ["lstm"]


@pytest.mark.gpu
def test_auto_on_cuda_is_torch_nn_without_warnings(op_calls):
    """auto on CUDA is cuDNN itself while no fastrnn CUDA kernel is verified on a GPU
    (docs/gpu-checks.md): torch.nn's numbers, no fastrnn op, and no flatten_parameters()
    advice from cuDNN."""
    import warnings
    torch.manual_seed(0)
    reference = nn.LSTM(3, 4, num_layers=2, bidirectional=True).cuda()
    fast = twin_of(reference, "auto").cuda()
    x = torch.randn(5, 2, 3, device="cuda")
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="RNN module weights")
        got = flatten(fast(x))
    expected = flatten(reference(x))
    truth = flatten(copy.deepcopy(reference).double()(x.double()))
    for a, b, t in zip(got, expected, truth):
        assert_close(a, b, t.cpu())
    assert op_calls == []
