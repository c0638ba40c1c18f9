"""The op boundary: explicit backward against autograd, gradcheck, opcheck, torch.compile,
and the ops' own argument checks."""
import copy

import pytest
import torch

import fastrnn
from fastrnn import backends, ops
from fastrnn.spec import CELLS

from fastrnn.testing import assert_all_close, assert_close
from parity import cpu_backends


def torch_nn_results(model, x):
    """(baseline, truth) of a fastrnn model: its torch.nn twin (fastrnn.to_torch) in x's dtype,
    and in float64 on the same rounded weights and input: output, then the gradients of its
    sum with respect to x and every parameter."""
    results = []
    for dtype in (x.dtype, torch.float64):
        twin = fastrnn.to_torch(copy.deepcopy(model)).to(dtype)
        leaf = x.detach().to(dtype).requires_grad_()
        out = twin(leaf)
        results.append([out.detach()] + list(torch.autograd.grad(out.sum(),
                                                                 [leaf, *twin.parameters()])))
    return results

# (cell, proj) pairs: lstm also with a projection.
CASES = [("lstm", 0), ("lstm", 2), ("gru", 0), ("rnn_tanh", 0), ("rnn_relu", 0)]
LAYOUTS = {"dense": None, "packed": torch.tensor([3, 3, 2, 1, 1])}


def make_op_inputs(cell, proj, batch_sizes, dtype=torch.float64, batch=3, hidden=4, steps=5,
                   bias=True, seed=0):
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=gen, dtype=dtype).requires_grad_()

    kind = CELLS[cell]
    gates = kind.num_gates * hidden
    width = proj or hidden
    rows = steps * batch if batch_sizes is None else int(batch_sizes.sum())
    return dict(xproj=rand(rows, gates), h0=rand(batch, width),
                c0=rand(batch, hidden) if kind.has_cell_state else None,
                w_hh=rand(gates, width) * 0.5, b_hh=rand(gates) if bias else None,
                w_hr=rand(proj, hidden) if proj else None)


def call(cell, inputs, batch_sizes, reverse, backend):
    return ops.recurrence(cell, inputs["xproj"], inputs["h0"], inputs["c0"], inputs["w_hh"],
                          inputs["b_hh"], inputs["w_hr"], batch_sizes, reverse, backend)


def tensor_args(cell, inputs):
    """The tensor arguments of the forward op, in schema order (None where absent)."""
    return [inputs[name] for name in ["xproj", "h0", "c0", "w_hh", "b_hh", "w_hr"]]


def leaves(inputs):
    return [t for t in inputs.values() if t is not None]


@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("cell,proj", CASES)
def test_reference_backward_matches_autograd(cell, proj, layout, reverse):
    """The explicit backward equals autograd differentiating the reference forward."""
    reference = backends.get("reference")
    batch_sizes = LAYOUTS[layout]
    inputs = make_op_inputs(cell, proj, batch_sizes)
    output, h_n, c_n, workspace = reference.forward(cell, **inputs, batch_sizes=batch_sizes,
                                                    reverse=reverse)
    gen = torch.Generator().manual_seed(1)
    grad_output = torch.randn(output.shape, generator=gen, dtype=output.dtype)
    grad_h_n = torch.randn(h_n.shape, generator=gen, dtype=h_n.dtype)
    grad_c_n = None if c_n is None else torch.randn(c_n.shape, generator=gen, dtype=c_n.dtype)
    outs = [output, h_n] + ([c_n] if c_n is not None else [])
    upstream = [grad_output, grad_h_n] + ([grad_c_n] if c_n is not None else [])
    expected = torch.autograd.grad(outs, leaves(inputs), upstream)
    detached = {k: None if v is None else v.detach() for k, v in inputs.items()}
    del detached["xproj"]
    explicit = reference.backward(cell, grad_output, grad_h_n, grad_c_n, **detached,
                                  batch_sizes=batch_sizes, reverse=reverse,
                                  output=output.detach(), workspace=workspace.detach())
    explicit = [g for g in explicit if g is not None]
    assert len(explicit) == len(expected)
    for got, want in zip(explicit, expected):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("cell,proj", CASES)
def test_gradcheck(cell, proj, layout, reverse, backend):
    batch_sizes = LAYOUTS[layout]
    inputs = make_op_inputs(cell, proj, batch_sizes, steps=5, batch=3, hidden=3)
    names = [k for k, v in inputs.items() if v is not None]

    def fn(*tensors):
        given = dict(inputs, **dict(zip(names, tensors)))
        return tuple(t for t in call(cell, given, batch_sizes, reverse, backend)
                     if t is not None)

    assert torch.autograd.gradcheck(fn, tuple(inputs[k].detach().requires_grad_()
                                              for k in names))


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("cell,proj", CASES + [("lstm_nobias", 0)])
def test_opcheck(cell, proj, layout, backend):
    bias = cell != "lstm_nobias"
    cell = cell.replace("_nobias", "")
    batch_sizes = LAYOUTS[layout]
    inputs = make_op_inputs(cell, proj, batch_sizes, dtype=torch.float32, bias=bias)
    kind = CELLS[cell]
    args = tensor_args(cell, inputs)
    args += [batch_sizes, True, backend]
    forward = getattr(torch.ops.fastrnn, f"{cell}_forward").default
    torch.library.opcheck(forward, args)
    with torch.no_grad():
        output, h_n, *rest = forward(*[a.detach() if isinstance(a, torch.Tensor) else a
                                       for a in args])
    workspace = rest[-1]
    grads = [torch.randn_like(output), torch.randn_like(h_n),
             torch.randn_like(rest[0]) if kind.has_cell_state else None]
    backward_args = grads + [None if a is None else a.detach() for a in args[1:6]] + [
        batch_sizes, True, output, workspace, backend]
    torch.library.opcheck(getattr(torch.ops.fastrnn, f"{cell}_backward").default,
                          backward_args)


def test_op_rejects_bad_shapes_and_layouts():
    inputs = make_op_inputs("gru", 0, None)
    with pytest.raises(ValueError, match=r"xproj must be \[rows, 12\]"):
        call("gru", dict(inputs, xproj=torch.zeros(15, 5, dtype=torch.float64)), None, False,
             "reference")
    with pytest.raises(ValueError, match="not a multiple of the batch size 3"):
        call("gru", dict(inputs, xproj=torch.zeros(14, 12, dtype=torch.float64)), None, False,
             "reference")
    with pytest.raises(RuntimeError, match="non-increasing"):
        call("gru", inputs, torch.tensor([3, 1, 2, 3, 3]), False, "reference")
    with pytest.raises(RuntimeError, match="batch_sizes sum to 13"):
        call("gru", inputs, torch.tensor([3, 3, 3, 3, 1]), False, "reference")
    with pytest.raises(RuntimeError, match="int64 CPU tensor"):
        call("gru", inputs, torch.tensor([3, 3, 3, 3, 3], dtype=torch.int32), False,
             "reference")
    with pytest.raises(ValueError, match="h0 must be"):
        call("gru", dict(inputs, h0=torch.zeros(3, 5, dtype=torch.float64)), None, False,
             "reference")
    with pytest.raises(ValueError, match="dtype"):
        call("gru", dict(inputs, h0=inputs["h0"].float()), None, False, "reference")
    with pytest.raises(ValueError, match="unknown fastrnn backend 'nope'"):
        call("gru", inputs, None, False, "nope")


def test_torch_compile_fullgraph_matches_eager():
    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lstm = fastrnn.LSTM(4, 5, num_layers=2, bidirectional=True)
            self.gru = fastrnn.GRU(10, 3)

        def forward(self, x):
            y, (h, c) = self.lstm(x)
            z, g = self.gru(y)
            return z.sum(-1) + h.sum() + c.sum() + g.sum()

    torch.manual_seed(0)
    model = Model()
    x = torch.randn(6, 2, 4, requires_grad=True)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    baseline, truth = torch_nn_results(model, x)
    for run in (model, compiled):
        out = run(x)
        grads = torch.autograd.grad(out.sum(), [x, *model.parameters()])
        assert_all_close([out.detach(), *grads], baseline, truth,
                         "compiled" if run is compiled else "eager")


def test_compile_caches_are_keyed_by_the_op_schemas():
    """torch.compile's disk caches would replay a graph compiled against an older schema of
    the ops (they key a graph by its text): the schemas' digest is part of their key tag, and
    a user's own tag stays."""
    import torch.compiler.config as compiler_config
    tag = f"fastrnn-ops-{ops.schema_digest()}"
    assert tag in compiler_config.cache_key_tag.split("+")
    old = compiler_config.cache_key_tag
    try:
        compiler_config.cache_key_tag = "mine"
        ops._tag_compile_caches()
        assert compiler_config.cache_key_tag == f"mine+{tag}"
        ops._tag_compile_caches()   # once only
        assert compiler_config.cache_key_tag == f"mine+{tag}"
    finally:
        compiler_config.cache_key_tag = old


def test_torch_compile_inductor_matches_eager():
    torch.manual_seed(0)
    lstm = fastrnn.LSTM(4, 5)
    x = torch.randn(6, 2, 4)
    compiled = torch.compile(lstm, fullgraph=True)
    torch_lstm = fastrnn.to_torch(copy.deepcopy(lstm))
    assert_close(compiled(x)[0], torch_lstm(x)[0], torch_lstm.double()(x.double())[0])


def test_first_call_under_torch_compile_in_a_fresh_process():
    """Backend lookup (imports, a possible native build) must not break a fullgraph trace
    when the very first call of a process is compiled."""
    import subprocess
    import sys
    script = ("import torch, fastrnn\n"
              "m = fastrnn.LSTM(4, 5, num_layers=2)\n"
              "x = torch.randn(6, 2, 4)\n"
              "y = torch.compile(m, fullgraph=True, backend='aot_eager')(x)[0]\n"
              "torch.testing.assert_close(y, m(x)[0])\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("cell,proj", CASES)
def test_opcheck_zero_steps(cell, proj, backend):
    """No steps at all: results keep the shapes the fake impl promises, h_n == h0."""
    inputs = make_op_inputs(cell, proj, None, dtype=torch.float32, steps=0)
    args = tensor_args(cell, inputs)
    forward = getattr(torch.ops.fastrnn, f"{cell}_forward").default
    torch.library.opcheck(forward, args + [None, False, backend])
    _, h_n, *_ = forward(*args, None, False, backend)
    torch.testing.assert_close(h_n, inputs["h0"].detach())


# ------------------------------------------------------------------ need_workspace=False

@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("cell,proj", CASES)
def test_forward_without_workspace(cell, proj, layout, reverse, backend):
    """need_workspace=False: the same results bit for bit, an empty [0, W] workspace, and the
    fake impl agrees (opcheck); a backward of such a forward says why it cannot run."""
    batch_sizes = LAYOUTS[layout]
    inputs = make_op_inputs(cell, proj, batch_sizes, dtype=torch.float32)
    args = tensor_args(cell, inputs) + [batch_sizes, reverse, backend]
    forward = getattr(torch.ops.fastrnn, f"{cell}_forward").default
    detached = [a.detach() if isinstance(a, torch.Tensor) else a for a in args]
    torch.library.opcheck(forward, detached, {"need_workspace": False})
    with torch.no_grad():
        kept = forward(*args)
        dropped = forward(*args, need_workspace=False)
    for a, b in zip(kept[:-1], dropped[:-1]):
        assert torch.equal(a, b)
    assert dropped[-1].shape == (0, kept[-1].shape[1])
    outputs = forward(*args, need_workspace=False)
    with pytest.raises(RuntimeError, match="need_workspace=False"):
        outputs[0].sum().backward()


@pytest.mark.parametrize("grad", ["no_grad", "eval_with_grad", "training"])
def test_modules_ask_for_a_workspace_only_when_a_gradient_can_follow(grad, monkeypatch):
    reference = backends.get("reference")
    asked = []
    original = reference.forward

    def spy(*args, **kwargs):
        asked.append(kwargs["need_workspace"])
        return original(*args, **kwargs)

    monkeypatch.setattr(reference, "forward", spy)
    lstm = fastrnn.LSTM(3, 4, num_layers=2, backend="reference")
    x = torch.randn(5, 2, 3)
    if grad == "no_grad":
        with torch.no_grad():
            lstm(x)
    else:
        lstm.train(grad == "training")
        lstm(x)[0].sum().backward()
    assert asked == [grad != "no_grad"] * 2
