"""A module remembers what a kind of call does (options.call: the route "auto" takes, the
backend that runs it), so a call like an earlier one decides by one dictionary lookup. Every
input of that decision changed between calls on the same module must change the path taken
(the op calls seen by the spy) and give torch.nn's numbers again."""
import copy
import pickle

import pytest
import torch
from torch import nn

import fastrnn
from fastrnn import backends
from fastrnn.backends import routing
from fastrnn.nn import options

from parity import assert_close, flatten
from test_parity import op_calls  # noqa: F401 (a fixture)

# A streaming chunk (LSTM: the kernels in inference, torch.nn's path in training) and a
# longer sequence at batch 1 (LSTM: torch.nn's path either way), time-major, input width 3.
STREAM = (4, 1, 3)
LONG = (routing.STREAM_STEPS + 1, 1, 3)


def pair(cls="LSTM", **kwargs):
    torch.manual_seed(0)
    fast = getattr(fastrnn, cls)(3, 5, **kwargs).double()
    reference = getattr(nn, cls)(3, 5).double()
    reference.load_state_dict({k: v for k, v in fast.state_dict().items()
                               if not k.startswith("ln_")})
    return fast, reference


def check(fast, reference, shape, calls, want_op):
    """One call of each; the op ran (or not) as wanted, with torch.nn's numbers."""
    x = torch.randn(*shape, dtype=torch.float64)
    before = len(calls)
    got, expected = flatten(fast(x)), flatten(reference(x))
    assert (len(calls) > before) == want_op, f"op calls {calls[before:]}"
    for a, b in zip(got, expected):
        if want_op:
            assert_close(a, b)
        else:
            assert torch.equal(a, b)


def test_repeated_calls_decide_once(monkeypatch):
    fast, _ = pair()
    decisions = []
    original = backends.torch_path
    monkeypatch.setattr(backends, "torch_path",
                        lambda *a, **k: decisions.append(1) or original(*a, **k))
    x = torch.randn(*STREAM)
    with torch.no_grad():
        for _ in range(3):
            fast(x.double())
    assert len(decisions) == 1


def test_grad_mode_and_requires_grad_flip_the_route(op_calls):  # noqa: F811
    fast, reference = pair()
    for _ in range(2):
        with torch.no_grad():
            check(fast, reference, STREAM, op_calls, want_op=True)      # inference: kernels
        check(fast, reference, STREAM, op_calls, want_op=False)          # training: torch.nn
    for p in fast.parameters():   # no parameter wants a gradient: inference, with grad on
        p.requires_grad_(False)
    check(fast, reference, STREAM, op_calls, want_op=True)
    fast.weight_hh_l0.requires_grad_(True)
    check(fast, reference, STREAM, op_calls, want_op=False)


def test_shape_class_changes_flip_the_route(op_calls):  # noqa: F811
    fast, reference = pair()
    with torch.no_grad():
        for shape, kernels in [(STREAM, True), (LONG, False), (STREAM, True),
                               ((4, routing.STREAM_BATCH + 1, 3), False), ((4, 3), True)]:
            check(fast, reference, shape, op_calls, want_op=kernels)


def test_backend_settings_flip_the_route(op_calls, monkeypatch):  # noqa: F811
    fast, reference = pair()
    check(fast, reference, STREAM, op_calls, want_op=False)
    fast.backend = "reference"
    check(fast, reference, STREAM, op_calls, want_op=True)
    fast.backend = "auto"
    check(fast, reference, STREAM, op_calls, want_op=False)
    backends.set_backend("reference")
    try:
        check(fast, reference, STREAM, op_calls, want_op=True)
    finally:
        backends.set_backend(None)
    check(fast, reference, STREAM, op_calls, want_op=False)
    monkeypatch.setenv("FASTRNN_BACKEND", "reference")
    check(fast, reference, STREAM, op_calls, want_op=True)
    monkeypatch.delenv("FASTRNN_BACKEND")
    check(fast, reference, STREAM, op_calls, want_op=False)


def test_routing_table_changes_are_seen(op_calls, monkeypatch):  # noqa: F811
    fast, reference = pair()
    with torch.no_grad():
        check(fast, reference, STREAM, op_calls, want_op=True)
        monkeypatch.setattr(routing, "ROUTES", {**routing.ROUTES,
                                                ("cpu", "LSTM", True, "stream1"): routing.TORCH})
        check(fast, reference, STREAM, op_calls, want_op=False)


def test_options_toggled_between_calls(op_calls):  # noqa: F811
    """An option switched on runs the op with it (the numbers of a module built with it);
    switched off, torch.nn's path again. Dropout options act in training only."""
    fast, reference = pair()
    fast.eval()
    check(fast, reference, STREAM, op_calls, want_op=False)
    fast.zoneout = 0.25
    x = torch.randn(*STREAM, dtype=torch.float64)
    built = fastrnn.LSTM(3, 5, zoneout=0.25).double().eval()
    built.load_state_dict(fast.state_dict())
    before = len(op_calls)
    for a, b in zip(flatten(fast(x)), flatten(built(x))):
        assert torch.equal(a, b)
    assert len(op_calls) > before
    fast.zoneout = 0.0
    check(fast, reference, STREAM, op_calls, want_op=False)
    fast.weight_drop = 0.5
    check(fast, reference, STREAM, op_calls, want_op=False)   # eval: no DropConnect
    fast.train()
    before = len(op_calls)
    fast(x)
    assert len(op_calls) > before
    fast.weight_drop = 0.0
    check(fast, reference, STREAM, op_calls, want_op=False)


def test_segments_toggled_between_calls(op_calls):  # noqa: F811
    fast, reference = pair()
    check(fast, reference, LONG, op_calls, want_op=False)
    fast.checkpoint_every = 4
    check(fast, reference, LONG, op_calls, want_op=True)
    fast.checkpoint_every = None
    check(fast, reference, LONG, op_calls, want_op=False)


def test_dtype_and_weight_changes_between_calls(op_calls):  # noqa: F811
    """The remembered backend is per dtype; weights are read at each call (assignment,
    load_state_dict, in-place edits)."""
    fast, reference = pair()
    with torch.no_grad():
        check(fast, reference, STREAM, op_calls, want_op=True)
        fast.float()
        reference.float()
        x = torch.randn(*STREAM)
        truth = flatten(copy.deepcopy(reference).double()(x.double()))
        for a, b, t in zip(flatten(fast(x)), flatten(reference(x)), truth):
            assert_close(a, b, t)
        fast.double()
        reference.double()
        fast.weight_hh_l0 = nn.Parameter(torch.randn(20, 5, dtype=torch.float64))
        reference.weight_hh_l0 = nn.Parameter(fast.weight_hh_l0.detach().clone())
        check(fast, reference, STREAM, op_calls, want_op=True)
        fast.bias_ih_l0.mul_(-2)
        reference.bias_ih_l0.mul_(-2)
        check(fast, reference, STREAM, op_calls, want_op=True)
        other = nn.LSTM(3, 5).double()
        fast.load_state_dict(other.state_dict())
        check(fast, other, STREAM, op_calls, want_op=True)


def test_copies_and_pickles_after_calls():
    """What a module remembers is no state: state_dict keys are torch.nn's, and a copy or
    an unpickled module decides afresh where its setting differs."""
    fast, reference = pair()
    x = torch.randn(*STREAM, dtype=torch.float64)
    with torch.no_grad():
        fast(x)
    assert list(fast.state_dict()) == list(reference.state_dict())
    assert "_fastrnn_calls" in vars(fast)
    for clone in (copy.deepcopy(fast), pickle.loads(pickle.dumps(fast))):
        assert "_fastrnn_calls" not in vars(clone)
        clone.backend = "reference"
        with torch.no_grad():
            assert_close(flatten(clone(x))[0], flatten(reference(x))[0])
        assert fast.backend == "auto"


def test_remembered_calls_are_bounded():
    fast, _ = pair()
    with torch.no_grad():
        for batch in range(1, options._MAX_CALLS + 10):
            fast(torch.randn(1, batch, 3, dtype=torch.float64))
    assert 0 < len(fast.__dict__["_fastrnn_calls"]) <= options._MAX_CALLS


def test_nothing_remembered_while_tracing():
    fast, _ = pair()
    x = torch.randn(*STREAM, dtype=torch.float64)
    traced = torch.jit.trace(fast, (x,), check_trace=False)
    assert "_fastrnn_calls" not in fast.__dict__
    with torch.no_grad():
        assert_close(flatten(traced(x))[0], flatten(fast(x))[0])


def test_unhashable_option_value_still_routes(op_calls):  # noqa: F811
    fast, reference = pair()
    fast.eval()
    fast.zoneout = [0.0, 0.0]   # a list: off, and not a key
    check(fast, reference, STREAM, op_calls, want_op=False)
    check(fast, reference, STREAM, op_calls, want_op=False)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_eager_autograd_equals_the_registered_op(cell, monkeypatch):
    """ops.recurrence runs an eager call that wants gradients through ops._EAGER (the op's
    forward, setup_context and backward as an autograd.Function); the registered op's
    autograd gives the same bits, first and second derivatives, with and without options."""
    from fastrnn import ops, spec
    used = []
    eager = ops._EAGER[cell]
    monkeypatch.setitem(ops._EAGER, cell, type("Spy", (eager,), {"apply": classmethod(
        lambda klass, *a: used.append(1) or eager.apply(*a))}))
    torch.manual_seed(0)
    hidden, gates = 4, {"lstm": 16, "gru": 12}[cell]
    leaves = [torch.randn(6, gates, dtype=torch.float64), torch.randn(2, hidden,
              dtype=torch.float64), torch.randn(2, hidden, dtype=torch.float64) if
              cell == "lstm" else None, torch.randn(gates, hidden, dtype=torch.float64),
              torch.randn(gates, dtype=torch.float64)]
    leaves = [t.requires_grad_() if t is not None else None for t in leaves]
    op = getattr(torch.ops.fastrnn, f"{cell}_forward")
    for options in (None, spec.StepOptions(cell_clip=0.5) if cell == "lstm" else None):
        results = []
        for run in ("eager", "op"):
            args = (*leaves, None, None, False, "reference")
            if run == "eager":
                output, h_n, c_n = ops.recurrence(cell, *args, options=options)
            else:
                output, h_n, c_n, _ = op(*args, *(options or ()))
            loss = output.pow(2).sum() + h_n.sum()
            wanted = [t for t in leaves if t is not None]
            grads = torch.autograd.grad(loss, wanted, create_graph=True)
            second = torch.autograd.grad(sum(g.pow(2).sum() for g in grads), wanted)
            results.append([output, h_n, *grads, *second])
        for a, b in zip(*results):
            assert torch.equal(a, b)
    assert len(used) == 2
