"""The native backend's float32 inference layer loop at a small batch
(fastrnn.backends.native.fused_layer: csrc/quantized.cpp's loop on the module's own float32
weights; a call of up to 16 frames is one op, a longer one projects its input with F.linear
first): which calls take it, that chunks of a stream give the bits of one call over the same
frames, parity with torch.nn by the tolerance rule, and that a weight changed between calls
is always read (the ops read the parameters as stored, nothing is cached).
"""
import copy

import pytest
import torch
from torch import nn

import fastrnn
from fastrnn.backends import native
from fastrnn.testing import assert_all_close, to_float64

from backend_cases import native_available_mark

pytestmark = native_available_mark()

MODES = {"lstm": ("LSTM", {}), "gru": ("GRU", {}), "rnn_tanh": ("RNN", {}),
         "rnn_relu": ("RNN", {"nonlinearity": "relu"})}


@pytest.fixture
def fused_calls(monkeypatch):
    """The cells of the layers the fused loop ran (native.run_layer: from fused_layer, or at
    once from a module's repeated stream call)."""
    ran = []
    real = native.run_layer

    def spy(*args, **kwargs):
        ran.append(args[0])
        return real(*args, **kwargs)
    monkeypatch.setattr(native, "run_layer", spy)
    return ran


def module_pair(cell, input_size=19, hidden=37, seed=0, **kwargs):
    """A fastrnn module on the native backend and its torch.nn twin, the same weights.
    Sizes off the 16-lane vectors exercise the products' tails."""
    name, extra = MODES[cell]
    torch.manual_seed(seed)
    reference = getattr(nn, name)(input_size, hidden, **extra, **kwargs)
    module = getattr(fastrnn, name)(input_size, hidden, **extra, **kwargs, backend="native")
    module.load_state_dict(reference.state_dict())
    return module, reference


def flat(result):
    output, state = result
    return [output, *(state if isinstance(state, tuple) else (state,))]


def stream(module, x, chunk, state=None):
    """``module`` over x [T, B, I] in calls of ``chunk`` frames, the state carried."""
    outputs = []
    with torch.no_grad():
        for start in range(0, x.shape[0], chunk):
            output, state = module(x[start:start + chunk], state)
            outputs.append(output)
    return torch.cat(outputs), state


def truth(reference, *args):
    """torch.nn in float64 on the same weights and inputs."""
    with torch.no_grad():
        return copy.deepcopy(reference).double()(*to_float64(args))


def check_against_torch_nn(module, reference, x, chunk):
    """``module`` streamed in chunks against torch.nn on the whole sequence, with torch.nn
    in float64 as the truth."""
    actual = stream(module, x, chunk)
    with torch.no_grad():
        baseline = reference(x)
    assert_all_close(flat(actual), flat(baseline), flat(truth(reference, x)),
                     f"{type(module).__name__} chunk {chunk}")


@pytest.mark.parametrize("batch", [1, 4, 8])
@pytest.mark.parametrize("cell", MODES)
def test_chunks_give_the_bits_of_one_call(cell, batch, fused_calls):
    """Every chunk of 1 to 16 frames runs the fused op, whose sums are ordered by the sizes
    alone: the frames give the same bits however they are split into calls."""
    module, _ = module_pair(cell, num_layers=2)
    x = torch.randn(16, batch, 19)
    whole = flat(stream(module, x, 16))
    for chunk in (1, 4, 5):
        streamed = flat(stream(module, x, chunk))
        for a, b in zip(streamed, whole):
            assert torch.equal(a, b), f"{cell} batch {batch} chunk {chunk}"
    assert fused_calls and set(fused_calls) == {cell}


@pytest.mark.parametrize("config", [dict(), dict(num_layers=2, bidirectional=True),
                                    dict(bias=False), dict(batch_first=True)],
                         ids=["plain", "2layers_bidirectional", "no_bias", "batch_first"])
@pytest.mark.parametrize("chunk", [1, 4, 16])
@pytest.mark.parametrize("cell", MODES)
def test_matches_torch_nn(cell, chunk, config, fused_calls):
    module, reference = module_pair(cell, **config)
    x = torch.randn(16, 3, 19)
    if config.get("batch_first"):
        module.batch_first = reference.batch_first = True
        x = x.transpose(0, 1).contiguous()
        # chunks along the time dimension: time-major here, batch-first for the modules
        actual = []
        state = None
        with torch.no_grad():
            for start in range(0, 16, chunk):
                output, state = module(x[:, start:start + chunk], state)
                actual.append(output)
            baseline = reference(x)
        assert_all_close([torch.cat(actual, 1), *flat((None, state))[1:]], flat(baseline),
                         flat(truth(reference, x)), f"{cell} batch_first chunk {chunk}")
    elif config.get("bidirectional"):   # a reverse direction needs the whole sequence
        with torch.no_grad():
            actual = module(x[:chunk])
            baseline = reference(x[:chunk])
        assert_all_close(flat(actual), flat(baseline), flat(truth(reference, x[:chunk])),
                         f"{cell} bidirectional")
    else:
        check_against_torch_nn(module, reference, x, chunk)
    assert fused_calls


def test_unbatched_input_and_given_state(fused_calls):
    module, reference = module_pair("lstm")
    x = torch.randn(3, 19)
    state = (torch.randn(1, 37), torch.randn(1, 37))
    with torch.no_grad():
        assert_all_close(flat(module(x, state)), flat(reference(x, state)),
                         flat(truth(reference, x, state)))
    assert fused_calls == ["lstm"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("batch", [1, 4])
@pytest.mark.parametrize("chunk", [1, 4, 16, 100])
@pytest.mark.parametrize("cell", MODES)
def test_streams_match_torch_nn_at_every_chunk(cell, chunk, batch, dtype, fused_calls):
    """200 frames in calls of 1 to 100 frames, float32 (the layer loop; calls above 16
    frames take F.linear's projection) and float64 (the recurrence op), against torch.nn
    on the whole sequence."""
    module, reference = module_pair(cell)
    module, reference = module.to(dtype), reference.to(dtype)
    x = torch.randn(200, batch, 19, dtype=dtype)
    check_against_torch_nn(module, reference, x, chunk)
    assert (set(fused_calls) == {cell}) == (dtype == torch.float32)


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_long_calls_give_the_bits_of_their_recurrence(cell, batch, fused_calls):
    """A call above 16 frames is F.linear's projection then quantized_recurrence (the
    loop the one-op calls run): the module's results are that op's bits, and calls of 17 and
    100 frames over the same stream give the same bits as one call."""
    module, _ = module_pair(cell, num_layers=1)
    x = torch.randn(100, batch, 19)
    with torch.no_grad():
        output, state = module(x)
        xproj = torch.nn.functional.linear(x.view(-1, 19), module.weight_ih_l0,
                                           module.bias_ih_l0)
        zeros = torch.zeros(batch, 37)
        expected = torch.ops.fastrnn.quantized_recurrence(
            cell, xproj, zeros, zeros if cell == "lstm" else None, module.weight_hh_l0, None,
            module.bias_hh_l0, False)
    assert torch.equal(output.view(-1, 37), expected[0])
    assert torch.equal((state[0] if cell == "lstm" else state)[0], expected[1])
    assert set(fused_calls) == {cell}


@pytest.mark.parametrize("case", ["float64", "grad", "batch9", "proj", "options", "packed",
                                  "reference"])
def test_other_calls_keep_the_recurrence_op(case, fused_calls):
    """Only plain float32 CPU inference calls at up to 8 streams run the layer loop; the
    others run the input projection and the recurrence op, as before."""
    kwargs = {"proj": dict(proj_size=5), "options": dict(layer_norm=True)}.get(case, {})
    name = "LSTM" if case == "proj" else "GRU"
    module = getattr(fastrnn, name)(19, 37, **kwargs,
                                    backend="reference" if case == "reference" else "native")
    x = torch.randn(4, 9 if case == "batch9" else 2, 19)
    if case == "float64":
        module, x = module.double(), x.double()
    if case == "packed":
        x = nn.utils.rnn.pack_padded_sequence(x, [4, 3])
    with torch.set_grad_enabled(case == "grad"):
        module(x)
    assert fused_calls == []


def test_gradients_still_flow(fused_calls):
    """A call that wants gradients takes the differentiable path (fused_layer declines)."""
    module, reference = module_pair("lstm")
    double = copy.deepcopy(reference).double()
    x = torch.randn(4, 2, 19)
    for m, inp in ((module, x), (reference, x), (double, x.double())):
        m(inp)[0].sum().backward()
    for (name, p), q, t in zip(module.named_parameters(), reference.parameters(),
                               double.parameters()):
        assert_all_close([p.grad], [q.grad], [t.grad], what=name)
    assert fused_calls == []


@pytest.mark.parametrize("chunk", [1, 20])
@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_weights_changed_between_calls_are_read(cell, chunk, fused_calls):
    """In-place updates (under no_grad, and an optimizer step in training), a new Parameter,
    load_state_dict, training mode and a round trip through float64: the next streaming call
    (one-op calls of one frame, and 20-frame calls) computes with the weights the module
    holds then, as torch.nn does with the same weights."""
    module, reference = module_pair(cell)
    x = torch.randn(20, 1, 19)

    def same():
        check_against_torch_nn(module, reference, x, chunk)

    same()
    with torch.no_grad():   # in place, the same tensor (its _version moves)
        module.weight_hh_l0.mul_(0.5)
        reference.weight_hh_l0.mul_(0.5)
    same()
    for m in (module, reference):   # an optimizer step in training mode
        m.train()
        optimizer = torch.optim.SGD(m.parameters(), lr=0.5)
        m(x[:4])[0].square().sum().backward()
        optimizer.step()
    same()   # still training mode: a call without gradient runs the fused op
    module.eval()
    reference.eval()
    new = torch.randn_like(reference.weight_ih_l0)
    module.weight_ih_l0 = nn.Parameter(new.clone())
    reference.weight_ih_l0 = nn.Parameter(new.clone())
    same()
    # new values of the initial scale: N(0, 1) weights make the 20-frame recurrence chaotic,
    # where float32 rounding differences grow from frame to frame
    state = {k: torch.randn_like(v) / 37 ** 0.5 for k, v in reference.state_dict().items()}
    module.load_state_dict(state)
    reference.load_state_dict(state)
    same()
    for m in (module, reference):   # .data replaced twice, new values in between
        m.double()
        with torch.no_grad():
            m.weight_hh_l0.copy_(state["weight_hh_l0"].double().flip(0))
        m.float()
    same()
    assert len(fused_calls) == 6 * 20 // chunk


def test_thread_count_does_not_change_bits():
    module, _ = module_pair("lstm", input_size=64, hidden=256)
    x = torch.randn(4, 2, 64)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = flat(stream(module, x, 4))
        torch.set_num_threads(2)
        two = flat(stream(module, x, 4))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(one, two))


def test_op_refuses_float32_weights_with_scales():
    native.BACKEND._require()
    w = torch.zeros(9, 3)
    with pytest.raises(RuntimeError, match="must be int8 \\(with scales\\), bfloat16 or "
                                           "float32 \\(without\\)"):
        torch.ops.fastrnn.quantized_layer("gru", torch.zeros(1, 1, 3), torch.zeros(1, 3), None,
                                          w, torch.ones(9), w.clone(), None, None,
                                          None, False)


@pytest.mark.parametrize("steps", [1, 5])
@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_op_takes_a_one_layer_state_as_given(cell, steps):
    """The layer ops take the state as [batch, hidden] or [1, batch, hidden] (a one-layer
    module's, passed without a select) and give h_n, c_n back in that shape, the same bits."""
    native.BACKEND._require()
    module, _ = module_pair(cell)
    w = (module.weight_ih_l0.detach(), module.weight_hh_l0.detach(),
         module.bias_ih_l0.detach(), module.bias_hh_l0.detach())
    x = torch.randn(steps, 3, 19)
    h0, c0 = torch.randn(3, 37), torch.randn(3, 37)
    lstm = cell == "lstm"
    results = []
    for shape in ((3, 37), (1, 3, 37)):
        h, c = h0.view(shape), (c0.view(shape) if lstm else None)
        results.append(torch.ops.fastrnn.quantized_layer(cell, x, h, c, w[0], None, w[1], None,
                                                         w[2], w[3], False))
        xproj = torch.nn.functional.linear(x.view(-1, 19), w[0], w[2])
        results.append(torch.ops.fastrnn.quantized_recurrence(cell, xproj, h, c, w[1], None,
                                                              w[3], False))
    for flat2, flat3 in zip(results[:2], results[2:]):
        assert torch.equal(flat2[0].view(-1), flat3[0].view(-1))
        assert flat3[1].shape == (1, 3, 37) and torch.equal(flat2[1], flat3[1][0])
        if lstm:
            assert flat3[2].shape == (1, 3, 37) and torch.equal(flat2[2], flat3[2][0])


# -- a module's repeated stream calls (RNNBase._stream_run) ---------------------------------

@pytest.fixture
def decided(monkeypatch):
    """The module calls that went the full way (options.call: route and plan decided)."""
    from fastrnn.nn import options
    seen = []
    real = options.call
    monkeypatch.setattr(options, "call", lambda *a, **k: seen.append(1) or real(*a, **k))
    return seen


def equal_calls(module, reference, x, state=None, calls=3):
    """``calls`` stream calls of both modules from ``state``: the same bits every call (the
    module's calls after its first are the recorded path's, the first the full path's)."""
    first = None
    with torch.no_grad():
        for _ in range(calls):
            got = flat(module(x, state))
            if first is None:
                first = got
            assert all(torch.equal(a, b) for a, b in zip(got, first))
        expected = flat(reference(x, state))
    assert_all_close(first, expected, flat(truth(reference, x, state)))


@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn_tanh"])
def test_repeated_stream_calls_decide_once(cell, batch_first, decided, fused_calls):
    """The first calls decide (the first of a kind of call makes its plan on the general
    path, the second runs _plain_run and records); the next ones, alike, run the layer op at
    once (with the given state, or zeros) and give the same bits as the full path."""
    module, reference = module_pair(cell, batch_first=batch_first)
    x = torch.randn(2, 1, 19) if batch_first else torch.randn(1, 2, 19)   # one frame, 2 streams
    lstm = cell == "lstm"
    state = (torch.randn(1, 2, 37), torch.randn(1, 2, 37)) if lstm else torch.randn(1, 2, 37)
    equal_calls(module, reference, x, calls=3)
    equal_calls(module, reference, x, state, calls=3)
    assert len(decided) == 2 and fused_calls == [cell] * 6
    carried, outputs, time = state, [], 1 if batch_first else 0
    frames = torch.randn(6, *x.shape)
    with torch.no_grad():   # the state carried from call to call: one call's bits
        for frame in frames:
            output, carried = module(frame, carried)
            outputs.append(output)
        assert len(decided) == 2 and len(fused_calls) == 12
        whole = flat(module(torch.cat(list(frames), time), state))
    assert all(torch.equal(a, b) for a, b in zip(flat((torch.cat(outputs, time), carried)),
                                                 whole))


def test_what_the_record_covers_is_rechecked(decided, fused_calls, monkeypatch):
    """Each change of what the first call checked sends the next call the full way (which
    records afresh where it runs the op again), with torch.nn's numbers."""
    from fastrnn import backends
    from fastrnn.backends import routing
    module, reference = module_pair("lstm")
    x = torch.randn(1, 1, 19)
    state = (torch.randn(1, 1, 37), torch.randn(1, 1, 37))
    equal_calls(module, reference, x, state)
    full = len(decided)

    def full_way(change=None, *args, want_op=True):
        """After ``change``, the next call goes the full way; once recorded again (the
        second call at most), the calls after it do not."""
        nonlocal full
        if change is not None:
            change()
        before = len(fused_calls)
        equal_calls(module, reference, *(args or (x, state)), calls=3)
        assert len(decided) > full, change
        assert (len(fused_calls) - before == 3) == want_op
        full = len(decided)
        equal_calls(module, reference, *(args or (x, state)), calls=1)
        assert len(decided) == full + (not want_op)
        full = len(decided)

    full_way(lambda: module.train())   # an attribute set (training mode)
    full_way(lambda: module.eval())
    full_way(lambda: setattr(module, "backend", "native"))
    full_way(None, torch.randn(2, 1, 19), state)                        # another shape
    full_way(None, x, (state[0][:, :, :1].expand(1, 1, 37), state[1]))   # a state's stride
    with torch.no_grad():   # in place: nothing to recheck, the op reads the weights
        module.weight_hh_l0.mul_(0.5)
        reference.weight_hh_l0.mul_(0.5)
    equal_calls(module, reference, x, state)
    assert len(decided) == full
    new = nn.Parameter(torch.randn(4 * 37, 37) / 37 ** 0.5)
    module._parameters["weight_hh_l0"] = new   # replaced behind the module's back
    reference.weight_hh_l0 = nn.Parameter(new.detach().clone())
    full_way()
    module.register_parameter("bias_hh_l0", nn.Parameter(reference.bias_hh_l0.detach() * 2))
    with torch.no_grad():
        reference.bias_hh_l0.mul_(2)
    full_way()
    for m in (module, reference):   # .to() keeps the Parameter objects, changes their data
        m.double()
    full_way(None, x.double(), tuple(s.double() for s in state), want_op=False)
    for m in (module, reference):
        m.float()
    full_way()
    monkeypatch.setattr(routing, "ROUTES", dict(routing.ROUTES))   # another routing table
    full_way()
    monkeypatch.setenv("FASTRNN_BACKEND", "native")
    full_way()
    backends.set_backend("reference")
    try:   # the module names native itself: the setting does not move it
        full_way()
    finally:
        backends.set_backend(None)
    full_way()
    with torch.enable_grad():   # a gradient wanted: the differentiable path, every call
        for _ in range(2):
            output = module(x, state)[0]
            assert output.requires_grad and len(decided) == full + 1
            full = len(decided)
    equal_calls(module, reference, x, state)
    assert len(decided) == full


def test_record_follows_dtype_data_and_bad_states(decided, fused_calls):
    """A weight's .data replaced (the same Parameter) is read or refused as by the full
    path; a state torch.nn refuses gets torch.nn's error."""
    module, reference = module_pair("gru")
    x = torch.randn(1, 1, 19)
    equal_calls(module, reference, x)
    with torch.no_grad():
        for m in (module, reference):
            m.weight_ih_l0.data = m.weight_ih_l0.data.flip(0).clone()
    equal_calls(module, reference, x)   # new data, same Parameter: read
    strided = torch.randn(37, 3 * 37).t() / 37 ** 0.5   # not contiguous: the op refuses it
    module.weight_hh_l0.data = strided
    reference.weight_hh_l0.data = strided.clone()
    before = len(decided)
    equal_calls(module, reference, x, calls=2)   # the full path, each call
    assert len(decided) == before + 2
    module, reference = module_pair("gru")
    equal_calls(module, reference, x)
    for bad in (torch.zeros(1, 37), torch.zeros(2, 1, 37), torch.zeros(1, 1, 36),
                torch.zeros(1, 1, 37, dtype=torch.float64)):
        with torch.no_grad(), pytest.raises(RuntimeError) as got:
            module(x, bad)
        with torch.no_grad(), pytest.raises(RuntimeError) as expected:
            reference(x, bad)
        assert str(got.value) == str(expected.value)


def test_record_not_kept_by_copies_nor_under_compile_or_trace(decided, fused_calls):
    module, reference = module_pair("lstm")
    x = torch.randn(1, 1, 19)
    equal_calls(module, reference, x)
    assert module.__dict__.get("_fastrnn_stream") is not None
    for copied in (copy.deepcopy(module), __import__("pickle").loads(
            __import__("pickle").dumps(module))):
        assert "_fastrnn_stream" not in copied.__dict__
        equal_calls(copied, reference, x)
    with torch.no_grad():   # the trace records the input's flow, not the record's op
        traced = torch.jit.trace(module, (x,), check_trace=False)
        other = torch.randn(1, 1, 19)
        assert_all_close(flat(traced(other)), flat(reference(other)),
                         flat(truth(reference, other)))
        compiled = torch.compile(module, backend="eager", fullgraph=True)
        for _ in range(2):
            other = torch.randn(1, 1, 19)
            assert_all_close(flat(compiled(other)), flat(reference(other)),
                             flat(truth(reference, other)))


@pytest.fixture
def entries(monkeypatch):
    """Which entry each layer call took: "direct" (the extension's pybind11 functions) or
    "op" (the registered ops through the dispatcher)."""
    native.BACKEND._require()
    native._layer_ops()
    assert native._DIRECT, "the extension module has no direct entries"
    taken = []

    def spy(kind, real):
        def call(*args):
            taken.append(kind)
            return real(*args)
        return call
    monkeypatch.setattr(native, "_OPS", tuple(spy("op", f) for f in native._OPS))
    monkeypatch.setattr(native, "_DIRECT", tuple(spy("direct", f) for f in native._DIRECT))
    return taken


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_direct_entry_gives_the_bits_of_the_op(cell, entries, monkeypatch):
    """Plain stream calls run the direct entry (a call longer than routing.STREAM_STEPS its
    recurrence); without it (the ops through the dispatcher) each split gives the same bits."""
    module, _ = module_pair(cell)
    x = torch.randn(40, 2, 19)
    results = []
    for chunk in (1, 4, 40):
        results.append(flat(stream(module, x, chunk)))
    assert entries and set(entries) == {"direct"}
    monkeypatch.setattr(native, "_DIRECT", ())
    entries.clear()
    for chunk in (1, 4, 40):
        results.append(flat(stream(module, x, chunk)))
    assert entries and set(entries) == {"op"}
    for direct, op in zip(results[:3], results[3:]):
        assert all(torch.equal(a, b) for a, b in zip(direct, op))
    assert all(torch.equal(a, b) for a, b in zip(results[0], results[1]))


def test_direct_entry_only_when_nothing_of_the_dispatcher_is_wanted(entries):
    """Under a profiler the op is recorded (so it runs through the dispatcher); under a
    torch.func transform the tensors are wrapped, and the op's fallback unwraps them."""
    module, reference = module_pair("lstm")
    x = torch.randn(1, 3, 19)
    equal_calls(module, reference, x)
    assert set(entries) == {"direct"}
    entries.clear()
    with torch.no_grad(), torch.profiler.profile(activities=[
            torch.profiler.ProfilerActivity.CPU]) as profile:
        module(x)
    assert entries == ["op"]
    assert any(e.name == "fastrnn::quantized_layer" for e in profile.events())
    entries.clear()
    frames = torch.randn(2, 1, 3, 19)   # vmap over a leading dimension of two inputs
    with torch.no_grad():
        mapped = torch.func.vmap(lambda frame: module(frame)[0])(frames)
        expected = torch.stack([reference(frame)[0] for frame in frames])
    assert entries and "direct" not in entries
    assert_all_close(mapped, expected, torch.stack([truth(reference, f)[0] for f in frames]))


def test_direct_entry_raises_the_op_errors():
    """The direct entry checks its arguments as the op does, with the same message."""
    native.BACKEND._require()
    native._layer_ops()
    w = torch.zeros(12, 3)
    args = ("rnn_tanh", torch.zeros(1, 1, 3), torch.zeros(1, 4), None, w, None,
            torch.zeros(4, 4), None, None, None, False, 8)
    messages = []
    for layer in (native._DIRECT[0], native._OPS[0]):
        with pytest.raises(RuntimeError) as got:
            layer(*args)
        messages.append(str(got.value).splitlines()[0])
    assert messages[0] == messages[1] and "w_ih must be a contiguous CPU tensor" in messages[0]
