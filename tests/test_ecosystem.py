"""fastrnn in the PyTorch ecosystem, each checked against torch.nn doing the same:
DistributedDataParallel, autocast, torch.export, ONNX export, serialization, to_torch()."""
import copy
import io
import os
import pickle
import socket
import tempfile
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_sequence

import fastrnn

from parity import assert_close, cpu_backends

BACKEND = cpu_backends()[-1]  # native when it is available on this machine, else reference


def tensors(value):
    if isinstance(value, PackedSequence):
        return [value.data]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in tensors(v)]
    return [value]


class Stack(nn.Module):
    """Every module kind in one model: LSTM (2 layers, bidirectional, batch_first), GRU, RNN,
    LSTMCell, and a GRU used only when ``use_extra`` (for DDP's find_unused_parameters)."""

    def __init__(self, use_extra=True):
        super().__init__()
        self.use_extra = use_extra
        self.lstm = nn.LSTM(3, 5, num_layers=2, bidirectional=True, batch_first=True)
        self.gru = nn.GRU(10, 4)
        self.rnn = nn.RNN(4, 4)
        self.cell = nn.LSTMCell(4, 3)
        self.extra = nn.GRU(3, 3)
        self.head = nn.Linear(3, 2)

    def forward(self, x):
        y, _ = self.lstm(x)
        z, _ = self.gru(y.transpose(0, 1))
        z, h = self.rnn(z, None)
        hc = self.cell(z[-1])
        out = hc[0]
        if self.use_extra:
            out = out + self.extra(hc[1].unsqueeze(0))[0][0]
        return self.head(out)


# -------------------------------------------------------------------------------- DDP

def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _ddp_worker(rank, world_size, port, backend, out_dir):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world_size)
    try:
        results = {}
        for use_extra in (True, False):  # all parameters used / one GRU unused
            for kind in ("torch", "fastrnn"):
                torch.manual_seed(0)
                model = Stack(use_extra).double()
                if kind == "fastrnn":
                    fastrnn.convert(model, backend=backend)
                ddp = nn.parallel.DistributedDataParallel(
                    model, find_unused_parameters=not use_extra)
                opt = torch.optim.SGD(ddp.parameters(), lr=0.5, momentum=0.9)
                gen = torch.Generator().manual_seed(100 + rank)  # each rank its own data
                for _ in range(3):
                    x = torch.randn(2, 6, 3, generator=gen, dtype=torch.float64)
                    loss = ddp(x).pow(2).mean()
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
                results[kind, use_extra] = {n: p.detach().clone()
                                            for n, p in model.named_parameters()}
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                    reason="torch.distributed with gloo is not available")
def test_ddp_trains_like_torch_nn():
    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(_ddp_worker, args=(2, _free_port(), BACKEND, out_dir), nprocs=2, join=True)
        ranks = [torch.load(os.path.join(out_dir, f"rank{r}.pt")) for r in range(2)]
    for use_extra in (True, False):
        torch.manual_seed(0)
        start = dict(Stack(use_extra).double().named_parameters())
        for rank in ranks:
            expected, actual = rank["torch", use_extra], rank["fastrnn", use_extra]
            assert list(actual) == list(expected)
            for name in expected:
                assert_close(actual[name], expected[name], what=name)
                unchanged = torch.equal(expected[name], start[name].detach())
                if name.startswith("extra.") and not use_extra:
                    assert unchanged, f"{name} is unused, yet it changed"
                elif name.startswith(("lstm.", "gru.", "rnn.weight_ih")):
                    assert not unchanged, f"{name} did not train"
        for name, value in ranks[0]["fastrnn", use_extra].items():
            assert torch.equal(value, ranks[1]["fastrnn", use_extra][name]), name


# -------------------------------------------------------------------------------- autocast

AUTOCAST_CASES = {
    "lstm": (lambda: nn.LSTM(5, 8, num_layers=2, bidirectional=True), "seq"),
    "lstm_proj": (lambda: nn.LSTM(5, 8, proj_size=3), "seq"),
    "lstm_packed": (lambda: nn.LSTM(5, 8), "packed"),
    "gru": (lambda: nn.GRU(5, 8, num_layers=2), "seq"),
    "rnn_relu": (lambda: nn.RNN(5, 8, nonlinearity="relu"), "seq"),
    "lstm_cell": (lambda: nn.LSTMCell(5, 8), "step"),
    "gru_cell": (lambda: nn.GRUCell(5, 8), "step"),
    "rnn_cell": (lambda: nn.RNNCell(5, 8), "step"),
}


def _autocast_inputs(form, dtype, device):
    gen = torch.Generator().manual_seed(7)
    rand = lambda *shape: torch.randn(*shape, generator=gen).to(device, dtype)  # noqa: E731
    if form == "packed":
        seqs = [rand(n, 5).requires_grad_() for n in (9, 6, 2)]
        return (pack_sequence(seqs),), seqs
    x = (rand(9, 4, 5) if form == "seq" else rand(4, 5)).requires_grad_()
    return (x,), [x]


def _run_autocast(module, form, device, low):
    """Forward (under autocast when ``low``), then the gradients of a fixed random loss."""
    dtype = torch.float64 if low is None else torch.float32
    args, leaves = _autocast_inputs(form, dtype, device)
    with torch.autocast(device, dtype=low or torch.bfloat16, enabled=low is not None):
        outs = tensors(module(*args))
    gen = torch.Generator().manual_seed(8)
    weights = [torch.randn(o.shape, generator=gen).to(device, torch.float64) for o in outs]
    loss = sum((o.double() * w).sum() for o, w in zip(outs, weights))
    grads = torch.autograd.grad(loss, leaves + list(module.parameters()))
    return outs, grads


def _check_autocast(name, device, low, backend=BACKEND):
    make, form = AUTOCAST_CASES[name]
    torch.manual_seed(0)
    reference = make().to(device)
    truth = copy.deepcopy(reference).double()
    fast = fastrnn.convert(copy.deepcopy(reference), backend=backend)
    true_outs, true_grads = _run_autocast(truth, form, device, None)
    torch_outs, torch_grads = _run_autocast(reference, form, device, low)
    fast_outs, fast_grads = _run_autocast(fast, form, device, low)
    # torch.nn's own result dtypes, down to every state
    assert [o.dtype for o in fast_outs] == [o.dtype for o in torch_outs]
    assert [g.dtype for g in fast_grads] == [g.dtype for g in torch_grads]
    # the low-precision rule: error vs float64 at most 2x torch.nn's own autocast error
    for what, fast_vals, torch_vals, true_vals in (("output", fast_outs, torch_outs, true_outs),
                                                   ("grad", fast_grads, torch_grads, true_grads)):
        for i, (f, t, ref) in enumerate(zip(fast_vals, torch_vals, true_vals)):
            fast_err = (f.double() - ref).abs().max().item()
            torch_err = (t.double() - ref).abs().max().item()
            assert fast_err <= 2 * torch_err, \
                f"{name} {what} {i}: error {fast_err:.3g} > 2 x torch.nn's {torch_err:.3g}"


def test_autocast_cpu_bfloat16_matches_torch_nn():
    for name in AUTOCAST_CASES:
        _check_autocast(name, "cpu", torch.bfloat16)


@pytest.mark.gpu
# Named backends: "auto" on CUDA routes to torch.nn's own path (fastrnn/backends/routing.py).
@pytest.mark.parametrize("backend", ["reference", "native"])
@pytest.mark.parametrize("low", [torch.float16, torch.bfloat16])
def test_autocast_cuda_matches_torch_nn(low, backend):
    for name in AUTOCAST_CASES:
        _check_autocast(name, "cuda", low, backend)


def test_autocast_under_torch_compile_fullgraph():
    torch.manual_seed(0)
    fast = fastrnn.LSTM(3, 4, num_layers=2, backend=BACKEND)
    x = torch.randn(5, 2, 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = fast(x)
        actual = torch.compile(fast, fullgraph=True, backend="aot_eager")(x)
    for a, e in zip(tensors(actual), tensors(expected)):
        assert a.dtype == e.dtype == torch.bfloat16 and torch.equal(a, e)


def test_autocast_does_not_change_float64_modules():
    """Autocast casts only float32 (and half) tensors: float64 modules run as without it."""
    torch.manual_seed(0)
    fast = fastrnn.GRU(3, 4, backend=BACKEND).double()
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    expected = fast(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        actual = fast(x)
    for a, e in zip(tensors(actual), tensors(expected)):
        assert a.dtype == torch.float64 and torch.equal(a, e)


# -------------------------------------------------------------------------------- torch.export

def test_torch_export_runs_fastrnn_ops_and_matches_eager():
    torch.manual_seed(0)
    model = fastrnn.convert(Stack().eval(), backend=BACKEND)
    x = torch.randn(2, 6, 3)
    batch = torch.export.Dim("batch", min=2, max=64)
    steps = torch.export.Dim("steps", min=2, max=1024)
    program = torch.export.export(model, (x,), dynamic_shapes={"x": {0: batch, 1: steps}})
    targets = {str(node.target) for node in program.graph.nodes if node.op == "call_function"}
    assert {"fastrnn.lstm_forward.default", "fastrnn.gru_forward.default",
            "fastrnn.rnn_tanh_forward.default"} <= targets, targets
    for shape in ((2, 6, 3), (5, 4, 3)):  # the traced batch, and another batch and length
        x = torch.randn(*shape)
        torch.testing.assert_close(program.module()(x), model(x), rtol=0, atol=0)
    # and it round-trips through torch.export.save/load
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    buffer.seek(0)
    loaded = torch.export.load(buffer)
    torch.testing.assert_close(loaded.module()(x), model(x), rtol=0, atol=0)


# -------------------------------------------------------------------------------- ONNX

def _onnx_check(onnx, ort, proto, model, x):
    """Standard operators only (so onnxruntime runs it without fastrnn), same result as eager."""
    ops = {(node.domain or "ai.onnx", node.op_type) for node in proto.graph.node}
    assert ("ai.onnx", "LSTM") in ops and ("ai.onnx", "GRU") in ops, ops
    assert all(domain == "ai.onnx" for domain, _ in ops), f"non-standard operators: {ops}"
    onnx.checker.check_model(proto)
    session = ort.InferenceSession(proto.SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    (actual,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        expected = model(x)
        truth = copy.deepcopy(model).double()(x.double())
    assert_close(torch.from_numpy(actual), expected, truth, "onnxruntime output")


def test_onnx_export_uses_standard_operators_and_runs_in_onnxruntime():
    ort = pytest.importorskip("onnxruntime")
    onnx = pytest.importorskip("onnx")
    torch.manual_seed(0)
    model = fastrnn.convert(Stack().eval(), backend=BACKEND)
    x = torch.randn(2, 6, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # the TorchScript-based exporter, sequence length and batch dynamic
        buffer = io.BytesIO()
        torch.onnx.export(model, (x,), buffer, dynamo=False, input_names=["x"],
                          dynamic_axes={"x": {0: "batch", 1: "steps"}})
        _onnx_check(onnx, ort, onnx.load_from_string(buffer.getvalue()), model,
                    torch.randn(4, 9, 3))
        # the default (dynamo) exporter; static shapes here: dynamic ones export too (batch
        # only: it fixes the sequence length, as it does for torch.nn) but take 3x longer
        pytest.importorskip("onnxscript")
        program = torch.onnx.export(model, (x,), dynamo=True, verbose=False)
    _onnx_check(onnx, ort, program.model_proto, model, torch.randn(2, 6, 3))
    # the module runs fastrnn's kernels again after the export
    assert not torch.onnx.is_in_onnx_export()


# -------------------------------------------------------------------------------- serialization

def _assert_same_model(actual, expected, x):
    assert [type(m) for m in actual.modules()] == [type(m) for m in expected.modules()]
    for a, e in zip(actual.modules(), expected.modules()):
        assert getattr(a, "backend", None) == getattr(e, "backend", None)
    with torch.no_grad():
        torch.testing.assert_close(actual(x), expected(x), rtol=0, atol=0)


def test_serialization_copies_and_dtype_moves_keep_backend():
    torch.manual_seed(0)
    model = fastrnn.convert(Stack(), backend="reference")
    x = torch.randn(2, 6, 3)
    # whole model
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    _assert_same_model(torch.load(buffer, weights_only=False), model, x)
    # state_dict (weights_only loading), into a fresh model with other weights
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    fresh = fastrnn.convert(Stack(), backend="reference")
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    _assert_same_model(fresh, model, x)
    # deepcopy and pickle
    _assert_same_model(copy.deepcopy(model), model, x)
    _assert_same_model(pickle.loads(pickle.dumps(model)), model, x)
    # dtype moves: results follow torch.nn moved the same way
    torch.manual_seed(0)
    reference = Stack()
    for move in (lambda m: m.double(), lambda m: m.to("cpu", torch.float64),
                 lambda m: m.to(torch.float32), lambda m: m.float()):
        moved = move(copy.deepcopy(model))
        expected = move(copy.deepcopy(reference))
        dtype = next(expected.parameters()).dtype
        assert all(p.dtype == dtype for p in moved.parameters())
        assert all(getattr(m, "backend", "reference") == "reference" for m in moved.modules())
        truth = copy.deepcopy(expected).double()(x.to(dtype).double())
        assert_close(moved(x.to(dtype)), expected(x.to(dtype)), truth, "moved")
    half = copy.deepcopy(model).half()
    assert all(p.dtype == torch.float16 for p in half.parameters())
    assert half.lstm.backend == "reference"
    with torch.no_grad():
        out = half(x.half())
        torch_half = copy.deepcopy(reference).half()
        truth = copy.deepcopy(torch_half).double()(x.half().double())
        assert_close(out, torch_half(x.half()), truth, "half")


@pytest.mark.gpu
def test_to_cuda_keeps_backend_and_matches_torch_nn():
    torch.manual_seed(0)
    reference = Stack()
    model = fastrnn.convert(copy.deepcopy(reference), backend="reference").to("cuda")
    assert model.lstm.backend == "reference" and model.lstm.weight_hh_l0.is_cuda
    x = torch.randn(2, 6, 3)
    truth = copy.deepcopy(reference).double()(x.double())
    assert_close(model(x.cuda()).cpu(), reference(x), truth, "cuda")


# -------------------------------------------------------------------------------- to_torch

def test_to_torch_is_the_inverse_of_convert():
    torch.manual_seed(0)
    original = Stack()
    original.shared = original.gru  # a module held twice stays one module
    original.rnn.train(False)
    x = torch.randn(2, 6, 3)
    expected = original(x)
    fast = fastrnn.convert(copy.deepcopy(original), backend="reference")
    params = dict(fast.named_parameters())
    back = fastrnn.to_torch(fast)
    assert back is fast
    for name, module in back.named_modules():
        assert type(module).__module__.startswith("torch.nn") or name == "", name
    assert type(back.lstm) is nn.LSTM and type(back.cell) is nn.LSTMCell
    assert back.shared is back.gru
    assert not back.rnn.training and back.lstm.training
    assert back.lstm.batch_first and back.lstm.bidirectional and back.lstm.num_layers == 2
    after = dict(back.named_parameters())
    assert after.keys() == params.keys() and all(after[n] is params[n] for n in params)
    torch.testing.assert_close(back(x), expected, rtol=0, atol=0)
    # the root itself, with projection and nonlinearity
    lstm = fastrnn.to_torch(fastrnn.LSTM(3, 6, proj_size=2, bias=False).eval())
    assert type(lstm) is nn.LSTM and lstm.proj_size == 2 and not lstm.bias and not lstm.training
    relu = fastrnn.to_torch(fastrnn.RNNCell(3, 4, nonlinearity="relu"))
    assert type(relu) is nn.RNNCell and relu.nonlinearity == "relu"
    # gradients flow into the shared Parameter objects
    back(x).sum().backward()
    assert all(p.grad is not None for p in params.values())


# -------------------------------------------------------------------------------- TorchScript

SCRIPT_CASES = [(nn.LSTM, dict(num_layers=2, bidirectional=True)), (nn.LSTM, dict(proj_size=3)),
                (nn.GRU, dict(num_layers=2, batch_first=True)),
                (nn.RNN, dict(nonlinearity="relu", bias=False))]


class Holder(nn.Module):
    """A model holding an RNN and a cell, called as a scripted model calls them."""

    def __init__(self, rnn, cell):
        super().__init__()
        self.rnn = rnn
        self.cell = cell

    def forward(self, x):
        y, _ = self.rnn(x)
        return self.cell(y[-1])


@pytest.mark.parametrize("cls,kwargs", SCRIPT_CASES,
                         ids=["lstm_bidirectional", "lstm_proj", "gru", "rnn_relu"])
def test_torch_jit_script_compiles_the_torch_nn_twin(cls, kwargs):
    torch.manual_seed(0)
    fast = fastrnn.convert(cls(4, 6, **kwargs), backend=BACKEND).double()
    params = list(fast.parameters())
    scripted = torch.jit.script(fast)
    assert scripted.original_name == cls.__name__
    # what torch.jit.script makes of torch.nn's own module (its overloaded forward included)
    assert scripted._c._method_names() == torch.jit.script(cls(4, 6, **kwargs))._c._method_names()
    assert all(a is b for a, b in zip(scripted.parameters(), params)), "same Parameters"
    # in a model (its forward picks the overload), against fastrnn's eager result
    torch.manual_seed(0)
    model = fastrnn.convert(Holder(cls(4, 6, **kwargs), nn.GRUCell(12 if "bidirectional"
                                   in kwargs else kwargs.get("proj_size", 6), 5)),
                            backend=BACKEND).double()
    x = torch.randn(3, 7, 4, dtype=torch.float64)
    expected = model(x)
    scripted = torch.jit.script(model)
    assert "fastrnn::" not in str(scripted.inlined_graph)   # torch.nn's operators only
    assert_close(scripted(x), expected, what="scripted")
    buffer = io.BytesIO()   # and it saves as TorchScript
    torch.jit.save(scripted, buffer)
    buffer.seek(0)
    assert_close(torch.jit.load(buffer)(x), expected, what="saved")


@pytest.mark.parametrize("cls", [fastrnn.LSTMCell, fastrnn.GRUCell, fastrnn.RNNCell])
def test_torch_jit_script_of_cells(cls):
    torch.manual_seed(0)
    fast = cls(4, 5, backend=BACKEND).double()
    x = torch.randn(3, 4, dtype=torch.float64)
    scripted = torch.jit.script(fast)
    assert scripted.original_name == cls.__name__
    for actual, expected in zip(tensors(scripted(x)), tensors(fast(x))):
        assert_close(actual, expected, what=cls.__name__)


@pytest.mark.parametrize("make,option", [
    (lambda: fastrnn.LSTM(4, 5, layer_norm=True), "layer_norm"),
    (lambda: fastrnn.GRU(4, 5, zoneout=0.1), "zoneout"),
    (lambda: fastrnn.LSTMCell(4, 5, cell_clip=3.0), "cell_clip")])
def test_torch_jit_script_refuses_options_by_name(make, option):
    with pytest.raises(RuntimeError, match=f"torch.jit.script cannot compile .* with {option}"):
        torch.jit.script(make())
    # forget_bias only initialises: torch.nn runs the same math
    torch.jit.script(fastrnn.LSTMCell(4, 5, forget_bias=1.0))


# -------------------------------------------------------------------------------- torch.jit.trace

TRACE_CASES = {
    "lstm": lambda b: fastrnn.LSTM(8, 8, 2, bidirectional=True, backend=b),
    "lstm_proj": lambda b: fastrnn.LSTM(8, 8, 2, bidirectional=True, proj_size=3, backend=b),
    "gru": lambda b: fastrnn.GRU(8, 8, 2, bidirectional=True, backend=b),
    "rnn": lambda b: fastrnn.RNN(8, 8, 2, bidirectional=True, backend=b),
    "lstm_layer_norm": lambda b: fastrnn.LSTM(8, 8, 2, bidirectional=True, layer_norm=True,
                                              backend=b),
}


@pytest.mark.parametrize("backend", ["auto", BACKEND])
@pytest.mark.parametrize("name", TRACE_CASES)
def test_torch_jit_trace_passes_its_check(name, backend):
    """torch.jit.trace's default check traces again under no_grad: the graph must not depend
    on the grad mode. The trace then runs other shapes and backpropagates like eager."""
    torch.manual_seed(0)
    fast = TRACE_CASES[name](backend).double()
    x = torch.randn(5, 2, 8, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TracerWarnings about Python values
        traced_eval = torch.jit.trace(fast.eval(), (x,))   # check_trace=True by default
        traced_train = torch.jit.trace(fast.train(), (x,))
    # auto records torch.nn's operators where it picks torch.nn's path for inference
    shape = fastrnn.backends.routing.shape_class(x.shape[1], False, steps=x.shape[0])
    torch_path = name != "lstm_layer_norm" and fastrnn.backends.choose(
        backend, x.device, fast.mode, True, shape) == "torch"
    for traced in (traced_eval, traced_train):
        assert ("fastrnn::" in str(traced.inlined_graph)) != torch_path, name
    y = torch.randn(7, 3, 8, dtype=torch.float64)
    fast.eval()
    for actual, expected in zip(tensors(traced_eval(y)), tensors(fast(y))):
        assert_close(actual, expected, what=f"{name} traced")
    fast.train()
    params = list(fast.parameters())
    actual = torch.autograd.grad(traced_train(y)[0].sum(), params)
    expected = torch.autograd.grad(fast(y)[0].sum(), params)
    for a, e, (pname, _) in zip(actual, expected, fast.named_parameters()):
        assert_close(a, e, what=f"{name} grad {pname}")


# -------------------------------------------------------------------------------- packed compile

def _packed(lengths, enforce_sorted, seed):
    """A PackedSequence whose data is a leaf (so gradients are taken into it)."""
    gen = torch.Generator().manual_seed(seed)
    seqs = [torch.randn(n, 3, generator=gen, dtype=torch.float64) for n in lengths]
    packed = pack_sequence(seqs, enforce_sorted=enforce_sorted)
    return packed._replace(data=packed.data.requires_grad_())


@pytest.mark.parametrize("given_state", [False, True], ids=["no_hx", "hx"])
@pytest.mark.parametrize("enforce_sorted", [True, False], ids=["sorted", "unsorted"])
@pytest.mark.parametrize("cls", [fastrnn.LSTM, fastrnn.GRU])
def test_packed_input_compiles_to_one_graph(cls, enforce_sorted, given_state):
    from torch._dynamo.testing import CompileCounterWithBackend

    torch.manual_seed(0)
    kwargs = dict(proj_size=2) if cls is fastrnn.LSTM else {}
    fast = cls(3, 4, num_layers=2, bidirectional=True, backend=BACKEND, **kwargs).double()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(fast, fullgraph=True, backend=counter)
    params = list(fast.parameters())
    torch._dynamo.reset()
    for lengths, seed in (((5, 3, 3, 2), 1), ((6, 4, 2), 2)):  # a second batch and length
        packed = _packed(lengths if enforce_sorted else lengths[::-1], enforce_sorted, seed)
        hx = None
        if given_state:
            gen = torch.Generator().manual_seed(seed)
            shape = (4, len(lengths), 2 if cls is fastrnn.LSTM else 4)
            hx = torch.randn(*shape, generator=gen, dtype=torch.float64)
            if cls is fastrnn.LSTM:
                hx = (hx, torch.randn(4, len(lengths), 4, generator=gen, dtype=torch.float64))
        results = []
        for module in (compiled, fast):
            out = tensors(module(packed, hx))
            weights = [torch.full_like(o, 0.5).cumsum(-1) for o in out]
            loss = sum((o * w).sum() for o, w in zip(out, weights))
            results.append(out + list(torch.autograd.grad(loss, [packed.data] + params)))
        for i, (actual, expected) in enumerate(zip(*results)):
            assert_close(actual, expected, what=f"result {i}")
        if seed == 1:   # (a new shape may recompile; fullgraph=True means no graph break)
            assert counter.frame_count == 1, f"{counter.frame_count} graphs"


def test_packed_input_compiles_without_graph_break_where_the_batch_is_a_shape():
    """Without fullgraph: no graph break when the batch is a shape (the pack's sort order or a
    given state). Only a sorted pack without a state must read batch_sizes[0] (one break)."""
    from torch._dynamo.testing import CompileCounter

    fast = fastrnn.LSTM(3, 4, backend=BACKEND)
    packed = _packed((4, 2, 5), False, 0)
    sorted_packed = _packed((5, 4, 2), True, 0)
    state = (torch.zeros(1, 3, 4, dtype=torch.float64),) * 2
    for args in ((packed,), (sorted_packed, state)):
        torch._dynamo.reset()
        counter = CompileCounter()
        torch.compile(fast.double(), backend=counter)(*args)
        assert counter.frame_count == 1, args


# -------------------------------------------------------------------------------- checkpoints

def test_whole_module_checkpoints_load_with_weights_only():
    """torch.load's default (weights_only=True) loads saved fastrnn modules; a model of other
    classes names them, as with torch.nn modules; to_torch() first gives a file without fastrnn."""
    torch.manual_seed(0)
    modules = [fastrnn.LSTM(3, 5, num_layers=2, bidirectional=True, backend="reference"),
               fastrnn.GRU(3, 5, zoneout=0.25, layer_norm=True).eval(),
               fastrnn.RNNCell(3, 5, nonlinearity="relu", backend=BACKEND)]
    x = torch.randn(4, 2, 3)
    for module in modules:
        buffer = io.BytesIO()
        torch.save(module, buffer)
        buffer.seek(0)
        loaded = torch.load(buffer)
        assert type(loaded) is type(module) and loaded.backend == module.backend
        assert repr(loaded) == repr(module)
        with torch.no_grad():
            for a, e in zip(tensors(loaded(x[0] if "Cell" in repr(module) else x)),
                            tensors(module(x[0] if "Cell" in repr(module) else x))):
                torch.testing.assert_close(a, e, rtol=0, atol=0)
    model = fastrnn.convert(Stack(), backend="reference")
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    with torch.serialization.safe_globals([Stack, nn.Linear]):
        _assert_same_model(torch.load(buffer), model, torch.randn(2, 6, 3))
    # for torch.nn users: to_torch (of a copy) before saving
    buffer = io.BytesIO()
    torch.save(fastrnn.to_torch(copy.deepcopy(model)), buffer)
    assert b"fastrnn" not in buffer.getvalue()
    buffer.seek(0)
    with torch.serialization.safe_globals([Stack, nn.Linear, nn.LSTM, nn.GRU, nn.RNN,
                                           nn.LSTMCell]):
        plain = torch.load(buffer)
    assert type(plain.lstm) is nn.LSTM and type(model.lstm) is fastrnn.LSTM
    x = torch.randn(2, 6, 3)
    with torch.no_grad():
        truth = copy.deepcopy(plain).double()(x.double())
        assert_close(model(x), plain(x), truth, "to_torch checkpoint")
