"""The modules' short ways through a call: torch.nn's kernel called directly on the torch.nn
route (without torch.nn's forward), and a plain call's layers run without the general path
(_plain_run). Each gives exactly what the long way gives; any call it does not take (other
shapes, bad arguments, options, autocast...) goes the long way, with torch.nn's messages."""
import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

import fastrnn

from parity import assert_close, flatten
from test_parity import op_calls, torch_path_on_cpu  # noqa: F401 (fixtures)

# name -> (constructor keywords, input shape, given state)
CONFIGS = {
    "stream": (dict(), (4, 1, 3), False),
    "stream-state": (dict(), (4, 2, 3), True),
    "batch-first": (dict(batch_first=True), (2, 5, 3), True),
    "stacked": (dict(num_layers=2), (3, 2, 3), True),
    "bidirectional": (dict(num_layers=2, bidirectional=True), (3, 2, 3), True),
}


def pair(cls, **kwargs):
    torch.manual_seed(0)
    fast = getattr(fastrnn, cls)(3, 5, **kwargs).double()
    reference = getattr(nn, cls)(3, 5, **{k: v for k, v in kwargs.items() if k != "backend"})
    reference.double().load_state_dict(fast.state_dict())
    return fast, reference


def state_for(module, shape, batch_first):
    batch = shape[0] if batch_first else shape[1]
    layers = module.num_layers * (2 if module.bidirectional else 1)
    h = torch.randn(layers, batch, module.proj_size or module.hidden_size, dtype=torch.float64)
    if module.mode != "LSTM":
        return h
    return h, torch.randn(layers, batch, module.hidden_size, dtype=torch.float64)


def graph(outputs):
    """The autograd nodes behind ``outputs``, by name, each counted once."""
    seen, names, todo = set(), [], [t.grad_fn for t in outputs]
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.append(type(node).__name__)
        todo.extend(fn for fn, _ in node.next_functions)
    return sorted(names)


def forbid(monkeypatch, cls, name):
    """Calls of cls.<name> made from now on (each raises nothing, the list records them)."""
    made, original = [], getattr(cls, name)
    monkeypatch.setattr(cls, name, lambda *a, **k: made.append(1) or original(*a, **k))
    return made


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("cls", ["LSTM", "GRU"])
@pytest.mark.parametrize("grad", [False, True])
def test_torch_route_calls_the_kernel_itself(cls, config, grad, torch_path_on_cpu,  # noqa: F811
                                             monkeypatch):
    kwargs, shape, given = CONFIGS[config]
    fast, reference = pair(cls, **kwargs)
    forwards = forbid(monkeypatch, type(fast), "_torch_forward")
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=grad)
    hx = state_for(fast, shape, fast.batch_first) if given else None
    with torch.set_grad_enabled(grad):
        for _ in range(2):   # the first call and a remembered one
            got, expected = flatten(fast(x, hx)), flatten(reference(x, hx))
            for a, b in zip(got, expected):
                assert torch.equal(a, b)
            if grad:   # the same autograd graph as torch.nn's: no extra node, copy or cast
                assert graph(got) == graph(expected)
                wanted = [x, *fast.parameters()]
                grads = torch.autograd.grad(sum(t.sum() for t in got), wanted)
                twin = torch.autograd.grad(sum(t.sum() for t in expected),
                                           [x, *reference.parameters()])
                for a, b in zip(grads, twin):
                    assert torch.equal(a, b)
    assert forwards == [] and torch_path_on_cpu == []


def test_lstm_projection_on_the_torch_route(torch_path_on_cpu, monkeypatch):  # noqa: F811
    fast, reference = pair("LSTM", proj_size=2)
    forwards = forbid(monkeypatch, type(fast), "_torch_forward")
    x = torch.randn(4, 2, 3, dtype=torch.float64)
    hx = state_for(fast, x.shape, False)
    for args in ((x,), (x, hx)):
        for a, b in zip(flatten(fast(*args)), flatten(reference(*args))):
            assert torch.equal(a, b)
    assert forwards == []


def lengths_packed(x):
    return pack_padded_sequence(x, torch.tensor([4, 2]), enforce_sorted=True)


# Calls the direct way does not take: torch.nn's forward runs them, results or errors alike.
OTHER_CALLS = {
    "unbatched": lambda m, x: (x[:, 0],),
    "packed": lambda m, x: (lengths_packed(x[:, :2]),),
    "state as a list": lambda m, x: (x, list(state_for(m, x.shape, False)))
    if m.mode == "LSTM" else (x, state_for(m, x.shape, False).tolist()),
    "state of another batch": lambda m, x: (x, state_for(m, (4, 1, 3), False)),
    "input of another width": lambda m, x: (torch.randn(4, 2, 4, dtype=torch.float64),),
    "input of another dtype": lambda m, x: (x.float(),),
    "4-D input": lambda m, x: (x[None],),
}


@pytest.mark.parametrize("other", OTHER_CALLS)
@pytest.mark.parametrize("cls", ["LSTM", "GRU"])
def test_other_calls_run_torch_forward(cls, other, torch_path_on_cpu, monkeypatch):  # noqa: F811
    fast, reference = pair(cls)
    forwards = forbid(monkeypatch, type(fast), "_torch_forward")
    args = OTHER_CALLS[other](fast, torch.randn(4, 2, 3, dtype=torch.float64))
    try:
        expected = flatten(reference(*args))
    except Exception as exc:   # torch.nn's error, type and message
        with pytest.raises(type(exc)) as raised:
            fast(*args)
        assert str(raised.value) == str(exc)
    else:
        for a, b in zip(flatten(fast(*args)), expected):
            assert torch.equal(a, b)
    assert forwards


PLAIN_CONFIGS = {**{c: v for c, v in CONFIGS.items() if c != "bidirectional"},
                 "projection": (dict(proj_size=2, num_layers=2), (3, 2, 3), True)}


@pytest.mark.parametrize("config", PLAIN_CONFIGS)
@pytest.mark.parametrize("cls,backend", [("LSTM", "auto"), ("GRU", "reference"),
                                         ("LSTM", "native")])
@pytest.mark.parametrize("grad", [False, True])
def test_plain_run_equals_the_general_path(cls, backend, config, grad, monkeypatch):
    """A streaming call on the kernels' route runs its layers without _run from its second
    call on, with the general path's bits (outputs, states, gradients)."""
    if backend == "native" and fastrnn.backends.unavailable_reason("native", "cpu"):
        pytest.skip("native backend unavailable")
    if config == "projection" and cls != "LSTM":
        pytest.skip("proj_size is an LSTM argument")
    if backend == "auto" and grad:
        backend = "reference"   # auto trains an LSTM on torch.nn's route
    kwargs, shape, given = PLAIN_CONFIGS[config]
    results = []
    for short in (True, False):
        fast, reference = pair(cls, backend=backend, **kwargs)
        if not short:
            monkeypatch.setattr(type(fast), "_plain_run", lambda *a: None)
        runs = forbid(monkeypatch, type(fast), "_run")
        torch.manual_seed(1)
        x = torch.randn(*shape, dtype=torch.float64, requires_grad=grad)
        hx = state_for(fast, shape, fast.batch_first) if given else None
        with torch.set_grad_enabled(grad):
            got = [flatten(fast(x, hx)) for _ in range(3)]
            if grad:
                loss = sum(t.sum() for call in got for t in call)
                got.append(torch.autograd.grad(loss, [x, *fast.parameters()]))
        assert len(runs) == (1 if short else 3)
        results.append(got)
        with torch.no_grad():   # and torch.nn's numbers
            for a, b in zip(got[0], flatten(reference(x, hx))):
                assert_close(a, b)
        monkeypatch.undo()
    for short, long in zip(*results):
        for a, b in zip(short, long):
            assert torch.equal(a, b)


# Calls of a kernels-route module that _plain_run leaves to the general path.
def _autocast_call(module, x):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        return module(x.float())


LONG_WAY = {
    "bidirectional": (dict(bidirectional=True), lambda m, x: m(x)),
    "dropout in training": (dict(num_layers=2, dropout=0.5), lambda m, x: m(x)),
    "an option": (dict(zoneout=0.25), lambda m, x: m.eval()(x)),
    "autocast": (dict(), lambda m, x: _autocast_call(m.float(), x)),
    "unbatched": (dict(), lambda m, x: m(x[:, 0])),
    "state of another dtype": (dict(), lambda m, x: m(x, torch.zeros(1, 1, 5))),
}


@pytest.mark.parametrize("case", LONG_WAY)
def test_other_calls_take_the_general_path(case, monkeypatch):
    kwargs, run = LONG_WAY[case]
    fast = fastrnn.GRU(3, 5, backend="reference", **kwargs).double()
    runs = forbid(monkeypatch, type(fast), "_run")
    x = torch.randn(4, 1, 3, dtype=torch.float64)
    for made in range(1, 3):
        try:
            with torch.no_grad():
                run(fast, x)
        except (RuntimeError, ValueError):   # the general path's own error
            pass
        assert len(runs) == made


@pytest.mark.parametrize("cls,backend", [("LSTM", "auto"), ("GRU", "auto"),
                                         ("GRU", "reference")])
def test_weights_changed_between_short_calls(cls, backend):
    """Both short ways read the parameters at every call: in-place updates, assignments and
    load_state_dict between streaming calls give a torch.nn twin's numbers."""
    fast, reference = pair(cls, backend=backend)
    x = torch.randn(4, 1, 3, dtype=torch.float64)

    def same():
        with torch.no_grad():
            for a, b in zip(flatten(fast(x)), flatten(reference(x))):
                assert_close(a, b)
    same()
    with torch.no_grad():
        for module in (fast, reference):
            module.weight_hh_l0.mul_(-1.5)
            module.bias_ih_l0.add_(0.25)
    same()
    fast.weight_ih_l0 = nn.Parameter(torch.randn_like(fast.weight_ih_l0))
    reference.weight_ih_l0 = nn.Parameter(fast.weight_ih_l0.detach().clone())
    same()
    other = getattr(nn, cls)(3, 5).double()
    fast.load_state_dict(other.state_dict())
    reference.load_state_dict(other.state_dict())
    same()
    optimizer = torch.optim.SGD(fast.parameters(), lr=0.5)   # a training step in between
    fast(x)[0].sum().backward()
    optimizer.step()
    with torch.no_grad():
        for name, p in fast.named_parameters():
            getattr(reference, name).copy_(p)
    same()
