"""Double backward (create_graph=True, then a second grad): gradgradcheck in float64 on every
CPU backend, cell, layout and variant option, and the second derivatives of torch.nn itself.

The backward ops are not differentiable; under create_graph=True the op's autograd runs the
reference backend's explicit backward in plain torch ops instead (fastrnn/ops.py), so these
tests cover that path, the gradient it sends back into the forward's workspace, and that the
plain first-order backward is untouched.
"""
import pytest
import torch
from torch import nn
from torch.autograd import gradgradcheck
from torch.nn.utils.rnn import pack_sequence

import fastrnn
from fastrnn import testing
from fastrnn import ops
from fastrnn.spec import CELLS
from fastrnn.spec import StepOptions

from backend_cases import make_case

BACKENDS = [b for b in ("reference", "native") if b in fastrnn.available_backends("cpu")]
CELL_NAMES = ("lstm", "gru", "rnn_tanh", "rnn_relu")
DTYPE = torch.float64
# (lengths or None, reverse): plain, reversed, packed with ragged lengths both ways
LAYOUTS = {"plain": (None, False), "reverse": (None, True), "packed": ([3, 2, 1], False),
           "packed_rev": ([3, 2, 1], True)}


def op_function(cell, backend, reverse, batch_sizes, make_options=None, with_c0=True):
    """f(xproj, h0, [c0], w_hh, b_hh, [w_hr], *learnable options) -> the op's results."""
    kind = CELLS[cell]

    def f(xproj, h0, *rest):
        rest = list(rest)
        c0 = rest.pop(0) if kind.has_cell_state and with_c0 else None
        w_hh, b_hh = rest.pop(0), rest.pop(0)
        w_hr = rest.pop(0) if kind.has_projection and rest and rest[0].dim() == 2 else None
        options = make_options(*rest) if make_options else None
        if kind.has_cell_state and c0 is None:
            c0 = torch.zeros(h0.shape[0], w_hh.shape[0] // 4, dtype=h0.dtype)
        output, h_n, c_n = ops.recurrence(cell, xproj, h0, c0, w_hh, b_hh, w_hr, batch_sizes,
                                          reverse, backend, options)
        return (output, h_n) + ((c_n,) if c_n is not None else ())
    return f


def _skip_unless_runs(backend, cell, option_names):
    """Skip where the backend itself says it does not run these options."""
    reason = fastrnn.backends.get(backend).unsupported_reason(
        cell, DTYPE, torch.device("cpu"), 3, 2, option_names)
    if reason is not None:
        pytest.skip(f"backend {backend} does not run {option_names}: {reason}")


def case_inputs(cell, hidden=2, proj=0, lengths=None, seed=0):
    case = make_case(cell, hidden=hidden, proj=proj, batch=2, steps=3, lengths=lengths,
                     seed=seed)
    names = ["xproj", "h0", "c0", "w_hh", "b_hh", "w_hr"]
    inputs = [case[n].requires_grad_() for n in names if case[n] is not None]
    return case, inputs


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["plain", "packed_rev"])
@pytest.mark.parametrize("cell", CELL_NAMES)
def test_op_gradgradcheck(cell, layout, backend):
    lengths, reverse = LAYOUTS[layout]
    case, inputs = case_inputs(cell, lengths=lengths)
    f = op_function(cell, backend, reverse, case["batch_sizes"])
    assert gradgradcheck(f, inputs)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["plain", "packed_rev"])
def test_op_gradgradcheck_projection(backend, layout):
    lengths, reverse = LAYOUTS[layout]
    case, inputs = case_inputs("lstm", hidden=3, proj=2, lengths=lengths)
    f = op_function("lstm", backend, reverse, case["batch_sizes"])
    assert gradgradcheck(f, inputs)


# ------------------------------------------------------------------ variant options

def _rand(gen, *shape, low=0.0, high=1.0):
    return torch.rand(*shape, generator=gen, dtype=DTYPE) * (high - low) + low


def _option_case(cell, option, lengths):
    """(op inputs, learnable option tensors, make_options) for one option on, hidden 3
    (proj 2 for proj_clip)."""
    proj = 2 if option == "proj_clip" else 0
    case, inputs = case_inputs(cell, hidden=3, proj=proj, lengths=lengths, seed=3)
    gen = torch.Generator().manual_seed(5)
    rows, batch = case["xproj"].shape[0], case["h0"].shape[0]
    width, gates = case["h0"].shape[1], case["w_hh"].shape[0]
    learnable, fixed = [], {}
    if option == "layer_norm":
        learnable = [_rand(gen, gates, low=0.5, high=1.5), _rand(gen, gates, low=-0.5, high=0.5)]
        if cell == "lstm":
            learnable += [_rand(gen, 3, low=0.5, high=1.5), _rand(gen, 3, low=-0.5, high=0.5)]
    elif option == "recurrent_mask":
        fixed["recurrent_mask"] = (_rand(gen, batch, width) > 0.3).to(DTYPE) / 0.7
    elif option == "zoneout_train":
        fixed["zoneout_h"] = (_rand(gen, rows, width) < 0.4).to(DTYPE)
        if cell == "lstm":
            fixed["zoneout_c"] = (_rand(gen, rows, 3) < 0.4).to(DTYPE)
    elif option == "zoneout_eval":
        fixed["zoneout_h"] = torch.full((rows, width), 0.3, dtype=DTYPE)
        if cell == "lstm":
            fixed["zoneout_c"] = torch.full((rows, 3), 0.2, dtype=DTYPE)
    elif option == "cell_clip":
        fixed["cell_clip"] = 0.4
    elif option == "proj_clip":
        fixed["proj_clip"] = 0.3
    elif option == "peephole":
        learnable = [_rand(gen, 9, low=-0.8, high=0.8)]
    learnable = [t.requires_grad_() for t in learnable]
    names = ("peephole",) if option == "peephole" else \
        ("ln_weight", "ln_bias", "ln_c_weight", "ln_c_bias")

    def make_options(*tensors):
        return StepOptions(**dict(zip(names, tensors)), **fixed)
    return case, inputs + learnable, make_options


OPTIONS = {"lstm": ("layer_norm", "recurrent_mask", "zoneout_train", "zoneout_eval",
                    "cell_clip", "proj_clip", "peephole"),
           "gru": ("layer_norm", "recurrent_mask", "zoneout_train", "zoneout_eval")}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cell,option", [(c, o) for c in OPTIONS for o in OPTIONS[c]])
def test_op_gradgradcheck_options(cell, option, backend):
    lengths, reverse = LAYOUTS["packed_rev" if option in ("layer_norm", "zoneout_train")
                               else "plain"]
    case, inputs, make_options = _option_case(cell, option, lengths)
    if option == "peephole":
        _skip_unless_runs(backend, cell, ("peephole",))
    f = op_function(cell, backend, reverse, case["batch_sizes"], make_options)
    if option in ("cell_clip", "proj_clip"):   # the clip acts on this case
        with torch.no_grad():
            output, h_n, c_n = f(*inputs)
        clipped = c_n if option == "cell_clip" else output
        assert (clipped.abs() == (0.4 if option == "cell_clip" else 0.3)).any()
    assert gradgradcheck(f, inputs)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_all_options_together(cell, backend):
    case, inputs, _ = _option_case(cell, "layer_norm", [3, 2, 1])
    gen = torch.Generator().manual_seed(7)
    rows, batch = case["xproj"].shape[0], case["h0"].shape[0]
    fixed = dict(recurrent_mask=(_rand(gen, batch, 3) > 0.3).to(DTYPE) / 0.7,
                 zoneout_h=(_rand(gen, rows, 3) < 0.4).to(DTYPE))
    if cell == "lstm":
        fixed.update(zoneout_c=(_rand(gen, rows, 3) < 0.4).to(DTYPE), cell_clip=0.8)
    names = ("ln_weight", "ln_bias", "ln_c_weight", "ln_c_bias")
    f = op_function(cell, backend, True, case["batch_sizes"],
                    lambda *t: StepOptions(**dict(zip(names, t)), **fixed))
    assert gradgradcheck(f, inputs, fast_mode=True)   # each option alone is checked in full


MODULE_OPTIONS = {
    "lstm": (fastrnn.LSTM, dict(proj_size=2, layer_norm=True, recurrent_dropout=0.3,
                                weight_drop=0.3, zoneout=(0.3, 0.2), cell_clip=0.7,
                                proj_clip=0.4, peephole=True)),
    "gru": (fastrnn.GRU, dict(layer_norm=True, recurrent_dropout=0.3, weight_drop=0.3,
                              zoneout=0.3)),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("cell", MODULE_OPTIONS)
def test_module_options_gradgradcheck(cell, training, backend):
    """Every option of a module at once, through the module (masks drawn as in training:
    the same seed for every call, so each evaluation uses the same masks)."""
    cls, kwargs = MODULE_OPTIONS[cell]
    torch.manual_seed(0)
    module = cls(2, 3, **kwargs, backend=backend).double().train(training)
    _skip_unless_runs(backend, cell, fastrnn.nn.options.option_names(module))
    names = [n for n, _ in module.named_parameters()]
    params = [p.detach().requires_grad_() for p in module.parameters()]
    x = torch.randn(3, 2, 2, dtype=DTYPE, requires_grad=True)

    def f(x, *params):
        torch.manual_seed(1)
        return torch.func.functional_call(module, dict(zip(names, params)), (x,))[0]
    assert gradgradcheck(f, [x, *params], fast_mode=True)   # O(1) evaluations, not O(params)


# ------------------------------------------------------------------ against torch.nn

def _twins(torch_cls, fast_cls, backend, *args, **kwargs):
    torch.manual_seed(0)
    reference = torch_cls(*args, **kwargs).double()
    fast = fast_cls(*args, **kwargs, backend=backend).double()
    fast.load_state_dict(reference.state_dict())
    return reference, fast


def _input_penalty_hessian(module, x):
    """Second derivatives of a gradient penalty on the input: d/d(x, params) of
    sum(d(sum out^2)/dx ^ 2)."""
    out = module(x)[0]
    out = out.data if isinstance(out, nn.utils.rnn.PackedSequence) else out
    (grad_x,) = torch.autograd.grad(out.pow(2).sum(), x, create_graph=True)
    return torch.autograd.grad(grad_x.pow(2).sum(), [x, *module.parameters()])


@pytest.mark.parametrize("backend", BACKENDS)
def test_gru_input_penalty_matches_torch(backend):
    """GRU(4, 4), T=3, B=1: the reference backend gave sum |d2/dx| 4.95, torch.nn 3.80."""
    reference, fast = _twins(nn.GRU, fastrnn.GRU, backend, 4, 4)
    x = torch.randn(3, 1, 4, dtype=DTYPE, requires_grad=True)
    expected, actual = _input_penalty_hessian(reference, x), _input_penalty_hessian(fast, x)
    for e, a in zip(expected, actual):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_lstm_weight_hessian_matches_torch(backend):
    """LSTM(4, 5), T=6, B=3: native gave d2/dW_hh exactly 0 (torch.nn: max 0.104)."""
    reference, fast = _twins(nn.LSTM, fastrnn.LSTM, backend, 4, 5)
    x = torch.randn(6, 3, 4, dtype=DTYPE, requires_grad=True)
    expected, actual = _input_penalty_hessian(reference, x), _input_penalty_hessian(fast, x)
    assert expected[2].abs().max() > 0.01   # weight_hh_l0: nonzero, where native gave 0
    for e, a in zip(expected, actual):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-12)


def _param_penalty(module, x, hx=None):
    """Second derivatives of a penalty on the parameter gradients (as in MAML or a Hessian-
    vector product): d/d(x, params) of sum over params of |d loss/d param|^2."""
    out = module(x) if hx is None else module(x, hx)
    out = out[0] if isinstance(out, tuple) else out
    out = out.data if isinstance(out, nn.utils.rnn.PackedSequence) else out
    params = list(module.parameters())
    grads = torch.autograd.grad(out.tanh().sum(), params, create_graph=True)
    penalty = sum(g.pow(2).sum() for g in grads)
    return torch.autograd.grad(penalty, [x.data if isinstance(x, nn.utils.rnn.PackedSequence)
                                         else x, *params])


MODULE_CASES = {
    "lstm_bidir_2layers": (nn.LSTM, fastrnn.LSTM, (3, 4, 2), dict(bidirectional=True)),
    "lstm_proj": (nn.LSTM, fastrnn.LSTM, (3, 4), dict(proj_size=2)),
    "gru_bidir_2layers": (nn.GRU, fastrnn.GRU, (3, 4, 2), dict(bidirectional=True)),
    "rnn_relu": (nn.RNN, fastrnn.RNN, (3, 4), dict(nonlinearity="relu")),
    "rnn_tanh_batch_first": (nn.RNN, fastrnn.RNN, (3, 4), dict(batch_first=True)),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("packed", [False, True], ids=["dense", "packed"])
@pytest.mark.parametrize("name", MODULE_CASES)
def test_module_parameter_penalty_matches_torch(name, packed, backend):
    torch_cls, fast_cls, args, kwargs = MODULE_CASES[name]
    reference, fast = _twins(torch_cls, fast_cls, backend, *args, **kwargs)
    gen = torch.Generator().manual_seed(1)
    if packed:
        seqs = [torch.randn(n, 3, generator=gen, dtype=DTYPE) for n in (4, 2, 3)]
        x = pack_sequence(seqs, enforce_sorted=False)
        x.data.requires_grad_()
    else:
        x = torch.randn(2, 4, 3, generator=gen, dtype=DTYPE, requires_grad=True)
    expected, actual = _param_penalty(reference, x), _param_penalty(fast, x)
    for e, a in zip(expected, actual):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-12)


CELL_CASES = {"LSTMCell": (nn.LSTMCell, fastrnn.LSTMCell, {}),
              "GRUCell": (nn.GRUCell, fastrnn.GRUCell, {}),
              "RNNCell_tanh": (nn.RNNCell, fastrnn.RNNCell, {}),
              "RNNCell_relu": (nn.RNNCell, fastrnn.RNNCell, dict(nonlinearity="relu"))}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", CELL_CASES)
def test_cell_matches_torch(name, backend):
    torch_cls, fast_cls, kwargs = CELL_CASES[name]
    reference, fast = _twins(torch_cls, fast_cls, backend, 3, 4, **kwargs)
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2, 3, generator=gen, dtype=DTYPE, requires_grad=True)
    h = torch.randn(2, 4, generator=gen, dtype=DTYPE, requires_grad=True)
    hx = (h, torch.randn(2, 4, generator=gen, dtype=DTYPE)) if name == "LSTMCell" else h
    expected, actual = _param_penalty(reference, x, hx), _param_penalty(fast, x, hx)
    for e, a in zip(expected, actual):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-12)
    (grad_h,) = torch.autograd.grad(fast(x, hx)[0].sum() if name == "LSTMCell"
                                    else fast(x, hx).sum(), h, create_graph=True)
    assert grad_h.requires_grad


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", CELL_CASES)
def test_cell_gradgradcheck(name, backend):
    _, fast_cls, kwargs = CELL_CASES[name]
    torch.manual_seed(0)
    cell = fast_cls(2, 3, **kwargs, backend=backend).double()
    names = [n for n, _ in cell.named_parameters()]
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2, 2, generator=gen, dtype=DTYPE, requires_grad=True)
    h = torch.randn(2, 3, generator=gen, dtype=DTYPE, requires_grad=True)
    c = torch.randn(2, 3, generator=gen, dtype=DTYPE, requires_grad=True)

    def f(x, h, c, *params):
        hx = (h, c) if name == "LSTMCell" else h
        return torch.func.functional_call(cell, dict(zip(names, params)), (x, hx))
    assert gradgradcheck(f, [x, h, c, *[p.detach().requires_grad_() for p in cell.parameters()]])


# ------------------------------------------------------------------ what stays as it was

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_first_order_is_the_backward_op(cell, backend):
    """Without create_graph the gradients are exactly the backward op's (no recompute)."""
    case, inputs = case_inputs(cell, hidden=3, proj=2 if cell == "lstm" else 0,
                               lengths=[3, 2, 1])
    kind = CELLS[cell]
    outputs = op_function(cell, backend, True, case["batch_sizes"])(*inputs)
    gen = torch.Generator().manual_seed(4)
    grads = [torch.randn(o.shape, generator=gen, dtype=DTYPE) for o in outputs]
    actual = torch.autograd.grad(outputs, inputs, grads)
    op = getattr(torch.ops.fastrnn, f"{cell}_forward")
    with torch.no_grad():
        fwd = op(case["xproj"], case["h0"], case["c0"], case["w_hh"], case["b_hh"],
                 case["w_hr"], case["batch_sizes"], True, backend)
        expected = getattr(torch.ops.fastrnn, f"{cell}_backward")(
            *grads, *([] if kind.has_cell_state else [None]), case["h0"], case["c0"],
            case["w_hh"], case["b_hh"], case["w_hr"], case["batch_sizes"], True, fwd[0],
            fwd[-1], backend)
    # the gradients of the inputs this cell has (the op returns all, empty where absent)
    expected = [e for e, name in zip(expected, ("xproj", "h0", "c0", "w_hh", "b_hh", "w_hr"))
                if case[name] is not None]
    for a, e in zip(actual, expected):
        assert torch.equal(a, e)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cls", [fastrnn.LSTM, fastrnn.GRU])
def test_recurrent_grad_clip_refuses_double_backward(cls, backend):
    module = cls(3, 4, recurrent_grad_clip=0.5, backend=backend).double()
    x = torch.randn(5, 2, 3, dtype=DTYPE, requires_grad=True)
    out = module(x)[0].sum()
    with pytest.raises(RuntimeError, match="recurrent_grad_clip .grad_clip=0.5."):
        torch.autograd.grad(out, x, create_graph=True)
    (grad_x,) = torch.autograd.grad(module(x)[0].sum(), x)   # first order as before
    assert torch.isfinite(grad_x).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_third_derivative_is_refused(backend):
    module = fastrnn.LSTM(2, 3, backend=backend).double()
    x = torch.randn(3, 2, 2, dtype=DTYPE, requires_grad=True)
    (grad_x,) = torch.autograd.grad(module(x)[0].pow(2).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="not third or higher"):
        torch.autograd.grad(grad_x.pow(2).sum(), x, create_graph=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_workspace_forward_still_refuses_backward(backend):
    case, inputs = case_inputs("gru")
    output, _, _, _ = torch.ops.fastrnn.gru_forward(
        case["xproj"], case["h0"], None, case["w_hh"], case["b_hh"], None, None, False, backend,
        need_workspace=False)
    for create_graph in (False, True):
        with pytest.raises(RuntimeError, match="need_workspace=False"):
            torch.autograd.grad(output.sum(), case["xproj"], create_graph=create_graph)


def test_gradcheck_of_known_gates_recompute():
    """The recompute the workspace's gradient goes through (the reference forward with
    known_gates) has the forward's first derivatives."""
    from fastrnn.backends import get
    from fastrnn.spec import workspace_layout
    reference = get("reference")
    for cell in ("lstm", "gru"):
        case, inputs = case_inputs(cell, hidden=2, lengths=[3, 2, 1])
        run = lambda *t: reference.forward(  # noqa: E731
            cell, t[0], t[1], t[2] if cell == "lstm" else None, *t[-2:], None,
            case["batch_sizes"], True)
        with torch.no_grad():
            gates = run(*inputs)[3][:, workspace_layout(cell, 2, 0)["gates"]]
        known = lambda *t: reference.forward(  # noqa: E731
            cell, t[0], t[1], t[2] if cell == "lstm" else None, *t[-2:], None,
            case["batch_sizes"], True, known_gates=gates)
        for a, b in zip(run(*inputs), known(*inputs)):
            if a is not None:
                torch.testing.assert_close(a, b, rtol=0, atol=1e-14)
        plain = lambda *t: [v for v in run(*t) if v is not None]  # noqa: E731
        recomputed = lambda *t: [v for v in known(*t) if v is not None]  # noqa: E731
        outs = plain(*inputs)
        gen = torch.Generator().manual_seed(0)
        grads = [torch.randn(o.shape, generator=gen, dtype=DTYPE) for o in outs]
        assert all(torch.allclose(a, b, rtol=1e-12, atol=1e-13) for a, b in zip(
            torch.autograd.grad(outs, inputs, grads),
            torch.autograd.grad(recomputed(*inputs), inputs, grads)))


# ------------------------------------------------------------------ triton (interpreter)

@pytest.mark.skipif("triton" not in fastrnn.available_backends("cpu"),
                    reason="triton backend unavailable on CPU (needs TRITON_INTERPRET=1)")
@pytest.mark.parametrize("packed", [False, True], ids=["dense", "packed"])
@pytest.mark.parametrize("name", ["lstm", "gru", "rnn_tanh"])
def test_triton_matches_torch(name, packed):
    """The triton kernels take float32 only: their second derivatives against torch.nn's in
    float64 on the same float32 values are within 2x torch.nn's own float32 error, plus a few
    float32 ulps of the scale (fastrnn.testing's rule)."""
    cls, fast_cls = {"lstm": (nn.LSTM, fastrnn.LSTM), "gru": (nn.GRU, fastrnn.GRU),
                     "rnn_tanh": (nn.RNN, fastrnn.RNN)}[name]
    torch.manual_seed(0)
    single = cls(3, 4)
    fast = fast_cls(3, 4, backend="triton")
    fast.load_state_dict(single.state_dict())
    double = cls(3, 4).double()
    double.load_state_dict(single.state_dict())
    gen = torch.Generator().manual_seed(1)
    if packed:
        seqs = [torch.randn(n, 3, generator=gen) for n in (3, 1, 2)]
        x = pack_sequence(seqs, enforce_sorted=False)
        x64 = pack_sequence([s.double() for s in seqs], enforce_sorted=False)
        x.data.requires_grad_()
        x64.data.requires_grad_()
    else:
        x = torch.randn(3, 2, 3, generator=gen, requires_grad=True)
        x64 = x.detach().double().requires_grad_()
    truth = _param_penalty(double, x64)
    testing.assert_all_close(_param_penalty(fast, x), _param_penalty(single, x), truth,
                             "second derivative")


@pytest.mark.parametrize("backend", BACKENDS)
def test_workspace_is_not_differentiated_in_a_plain_backward(backend):
    """Outside a double backward the workspace counts as not differentiable, as before (and as
    torch.compile's tracing of the op sees it)."""
    case, inputs = case_inputs("lstm")
    output, h_n, c_n, workspace = torch.ops.fastrnn.lstm_forward(
        case["xproj"], case["h0"], case["c0"], case["w_hh"], case["b_hh"], None, None, False,
        backend)
    with_workspace = torch.autograd.grad(output.sum() + workspace.sum(), inputs,
                                         retain_graph=True)
    for a, e in zip(with_workspace, torch.autograd.grad(output.sum(), inputs)):
        assert torch.equal(a, e)
