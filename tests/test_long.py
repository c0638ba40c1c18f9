"""checkpoint_every (fastrnn.segments): full BPTT computed segment by segment in time gives
the full-memory path's outputs and gradients, on every backend and layout."""
import copy
import json
import os

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence

import fastrnn
from fastrnn.testing import assert_all_close, to_float64

from backend_cases import native_available_mark

LENGTHS = [11, 9, 4, 1]    # packed layout: every segment boundary meets a change of batch


def make(mode, checkpoint_every, dtype=torch.float64, seed=0, **kwargs):
    torch.manual_seed(seed)
    kwargs = {"num_layers": 2, **kwargs}
    full = getattr(fastrnn, mode)(5, 6, dtype=dtype, **kwargs)
    segmented = getattr(fastrnn, mode)(5, 6, dtype=dtype, checkpoint_every=checkpoint_every,
                                       **kwargs)
    segmented.load_state_dict(full.state_dict())
    return full, segmented


def run(module, x, layout, hx=None, seed=None):
    """Forward + backward of a loss using every output; returns outputs then gradients of the
    input, the initial state and every parameter."""
    x = x.detach().clone().requires_grad_()
    hx = None if hx is None else tuple(h.detach().clone().requires_grad_() for h in hx)
    given = None if hx is None else (hx if module.mode == "LSTM" else hx[0])
    inp = pack_padded_sequence(x, LENGTHS) if layout == "packed" else x
    if seed is not None:   # the same masks for both paths
        torch.manual_seed(seed)
    out, h = module(inp, given)
    rows = out.data if layout == "packed" else out
    states = h if isinstance(h, tuple) else (h,)
    gen = torch.Generator().manual_seed(1)
    loss = sum((t * torch.randn(t.shape, generator=gen, dtype=t.dtype)).sum()
               for t in (rows, *states))
    loss.backward()
    grads = [x.grad] + ([] if hx is None else [h.grad for h in hx])
    grads += [p.grad for p in module.parameters()]
    return [rows.detach(), *[s.detach() for s in states]], grads


def inputs(mode, layout, dtype=torch.float64, steps=11, batch=4, num_states=None,
           bidirectional=False, layers=2, hidden=6):
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(steps, batch, 5, generator=gen, dtype=dtype)
    states = num_states or (2 if mode == "LSTM" else 1)
    hx = tuple(torch.randn(layers * (2 if bidirectional else 1), batch, hidden, generator=gen,
                           dtype=dtype) for _ in range(states))
    return x, hx


LAYOUTS = [("plain", False), ("plain", True), ("packed", False), ("packed", True)]
BACKENDS = ["reference", pytest.param("native", marks=native_available_mark())]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout,bidirectional", LAYOUTS)
@pytest.mark.parametrize("mode", ["LSTM", "GRU", "RNN"])
def test_float64_matches_full_path(mode, layout, bidirectional, backend):
    full, segmented = make(mode, 3, backend=backend, bidirectional=bidirectional)
    x, hx = inputs(mode, layout, bidirectional=bidirectional)
    outs_full, grads_full = run(full, x, layout, hx)
    outs_seg, grads_seg = run(segmented, x, layout, hx)
    # several segments: a segment's projection is a GEMM over fewer rows (BLAS may round a
    # row differently) and the weight gradients are sums over segments
    assert_all_close(outs_seg + grads_seg, outs_full + grads_full)
    # one segment (k >= T) is the full path's arithmetic, recomputed: the same bits
    segmented.checkpoint_every = x.shape[0]
    segmented.zero_grad(set_to_none=True)
    outs_one, grads_one = run(segmented, x, layout, hx)
    for a, b in zip(outs_one + grads_one, outs_full + grads_full):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout,bidirectional", [("plain", True), ("packed", True)])
@pytest.mark.parametrize("mode", ["LSTM", "GRU"])
def test_float32_within_the_rule(mode, layout, bidirectional, backend):
    """Against a float64 truth: the segmented error at most twice the full path's (+ floor)."""
    full, segmented = make(mode, 4, dtype=torch.float32, backend=backend,
                           bidirectional=bidirectional)
    truth = copy.deepcopy(full).double()
    truth.backend = "reference"
    x, hx = inputs(mode, layout, dtype=torch.float32, bidirectional=bidirectional)
    outs_full, grads_full = run(full, x, layout, hx)
    outs_seg, grads_seg = run(segmented, x, layout, hx)
    outs_64, grads_64 = run(truth, to_float64(x), layout, tuple(map(to_float64, hx)))
    assert_all_close(outs_seg + grads_seg, outs_full + grads_full, outs_64 + grads_64)


def test_triton_interpreter_matches_full_path():
    pytest.importorskip("triton")
    from fastrnn import backends
    if backends.get("triton").unavailable_reason(torch.device("cpu")) is not None:
        pytest.skip("triton backend unavailable on CPU")
    for mode in ("LSTM", "GRU"):
        full, segmented = make(mode, 2, dtype=torch.float32, backend="triton", num_layers=1,
                               bidirectional=True)
        truth = copy.deepcopy(full).double()
        truth.backend = "reference"
        x, hx = inputs(mode, "packed", dtype=torch.float32, bidirectional=True, layers=1)
        outs_full, grads_full = run(full, x, "packed", hx)
        outs_seg, grads_seg = run(segmented, x, "packed", hx)
        outs_64, grads_64 = run(truth, to_float64(x), "packed", tuple(map(to_float64, hx)))
        assert_all_close(outs_seg + grads_seg, outs_full + grads_full, outs_64 + grads_64)


@pytest.mark.parametrize("every", [1, 2, 4, 10, 11, 50, "auto"])
@pytest.mark.parametrize("layout", ["plain", "packed"])
def test_segment_sizes(every, layout):
    """k dividing T or not, k = T - 1, k = T, k > T, and sqrt(T)."""
    full, segmented = make("LSTM", every, bidirectional=True)
    x, hx = inputs("LSTM", layout, bidirectional=True)
    outs_full, grads_full = run(full, x, layout, hx)
    outs_seg, grads_seg = run(segmented, x, layout, hx)
    assert_all_close(outs_seg + grads_seg, outs_full + grads_full)


@pytest.mark.parametrize("mode", ["LSTM", "GRU", "RNN"])
def test_one_step_and_default_state(mode):
    full, segmented = make(mode, 3, bidirectional=True, batch_first=True)
    x = torch.randn(4, 1, 5, dtype=torch.float64)   # batch_first, T = 1
    outs_full, grads_full = run(full, x, "plain")
    outs_seg, grads_seg = run(segmented, x, "plain")
    assert_all_close(outs_seg + grads_seg, outs_full + grads_full)


@pytest.mark.parametrize("mode", ["LSTM", "GRU"])
def test_variant_options_use_the_same_masks(mode):
    """Recurrent dropout, zoneout and weight drop masks are drawn once and sliced per
    segment; layer norm, clips and the in-recurrence gradient clip act as in the full path."""
    extra = dict(cell_clip=0.5) if mode == "LSTM" else {}
    kwargs = dict(bidirectional=True, layer_norm=True, recurrent_dropout=0.3, zoneout=0.2,
                  weight_drop=0.25, recurrent_grad_clip=0.7, dropout=0.1, **extra)
    full, segmented = make(mode, 3, **kwargs)
    for layout in ("plain", "packed"):
        x, hx = inputs(mode, layout, bidirectional=True)
        outs_full, grads_full = run(full, x, layout, hx, seed=5)
        outs_seg, grads_seg = run(segmented, x, layout, hx, seed=5)
        assert_all_close(outs_seg + grads_seg, outs_full + grads_full)
        full.zero_grad()
        segmented.zero_grad()


@pytest.mark.parametrize("mode", ["LSTM", "GRU", "RNN"])
def test_gradcheck(mode):
    torch.manual_seed(0)
    module = getattr(fastrnn, mode)(3, 2, num_layers=2, bidirectional=True, checkpoint_every=2,
                                    dtype=torch.float64)
    names = ["weight_ih_l0", "weight_hh_l1_reverse", "bias_hh_l0"]
    params = {name: getattr(module, name).detach().clone().requires_grad_() for name in names}
    x = torch.randn(5, 3, 3, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(4, 3, 2, dtype=torch.float64, requires_grad=True)

    def f(x, h0, *values):
        hx = (h0, h0.cos()) if mode == "LSTM" else h0
        packed = pack_padded_sequence(x, [5, 3, 2])
        out, h = torch.func.functional_call(module, dict(zip(names, values)), (packed, hx))
        return (out.data, *(h if isinstance(h, tuple) else (h,)))

    assert torch.autograd.gradcheck(f, (x, h0, *params.values()))


def test_autocast_matches_full_path():
    full, segmented = make("LSTM", 3, dtype=torch.float32, bidirectional=True)
    x, hx = inputs("LSTM", "plain", dtype=torch.float32, bidirectional=True)
    results = []
    for module in (full, segmented):
        with torch.autocast("cpu", torch.bfloat16):
            results.append(run(module, x, "plain", hx))
    (outs_full, grads_full), (outs_seg, grads_seg) = results
    truth = copy.deepcopy(full).double()
    outs_64, grads_64 = run(truth, to_float64(x), "plain", tuple(map(to_float64, hx)))
    assert [t.dtype for t in outs_seg + grads_seg] == [t.dtype for t in outs_full + grads_full]
    assert_all_close(outs_seg + grads_seg, outs_full + grads_full, outs_64 + grads_64)


def test_keeps_no_history_for_backward():
    """What autograd saves for the segmented layer is its input and weights, not [T, ...]
    per-step tensors (the boundary states are kept by the layer itself)."""
    def saved_numel(module, x):
        total = []
        with torch.autograd.graph.saved_tensors_hooks(
                lambda t: total.append(t.numel()) or t, lambda t: t):
            module(x)
        return sum(total)
    full, segmented = make("LSTM", "auto", dtype=torch.float32, num_layers=1)
    x = torch.randn(400, 2, 5, requires_grad=True)
    history = 400 * 2 * 6      # one hidden-sized value per step
    assert saved_numel(full, x) > 5 * history            # the workspace alone is 5 of them
    assert saved_numel(segmented, x) < x.numel() + 1000   # the input, weights and states


def test_double_backward_raises():
    _, segmented = make("GRU", 2)
    x = torch.randn(6, 2, 5, dtype=torch.float64, requires_grad=True)
    out, _ = segmented(x)
    with pytest.raises(RuntimeError, match="double backward .*checkpoint_every"):
        torch.autograd.grad(out.sum(), x, create_graph=True)


def test_inference_and_auto_backend():
    """No gradient: the same outputs. backend "auto" runs it even where torch.nn's own path
    would otherwise be chosen."""
    full, segmented = make("LSTM", 4, backend="auto")
    x = torch.randn(9, 3, 5, dtype=torch.float64)
    with torch.no_grad():
        assert_all_close(segmented(x)[0], full(x)[0])
    out, _ = segmented(x.requires_grad_())
    layer = out.grad_fn.next_functions[0][0]    # out is a view of the layer's rows
    assert type(layer).__name__ == "_SegmentedBackward"


@pytest.mark.parametrize("value", [0, -3, 2.5, True, "sqrt", [4]])
def test_bad_values(value):
    with pytest.raises(ValueError, match=r"checkpoint_every must be a positive int .* got "
                                         + repr(value).replace("[", r"\[").replace("]", r"\]")):
        fastrnn.LSTM(4, 4, checkpoint_every=value)


def test_repr():
    assert "checkpoint_every=16" in repr(fastrnn.GRU(4, 4, checkpoint_every=16))
    assert "checkpoint_every" not in repr(fastrnn.GRU(4, 4))


def test_compiled_module_runs_the_layer_eagerly():
    _, segmented = make("GRU", 3, backend="reference", num_layers=1)
    x = torch.randn(7, 2, 5, dtype=torch.float64, requires_grad=True)
    want, _ = segmented(x)
    (want_grad,) = torch.autograd.grad(want.sum(), x)
    got, _ = torch.compile(segmented)(x)
    (got_grad,) = torch.autograd.grad(got.sum(), x)
    assert_all_close([got, got_grad], [want, want_grad])


def test_bench_suite_and_memory_runner(tmp_path):
    """The `long` suite checks segmented and torch.nn against the full path (tiny sizes), and
    bench.long measures and tabulates (a fresh process per point)."""
    from bench import cli, long
    assert cli.main(["--tiny", "--device", "cpu", "--suite", "long", "--no-plots",
                     "--no-progress", "--out", str(tmp_path)]) == 0
    saved = next(tmp_path.glob("*.json")).read_text()
    assert '"fastrnn:segmented"' in saved and '"status": "wrong"' not in saved
    out = str(tmp_path / "long.json")
    point = ["--cell", "gru", "--hidden", "8", "--batch", "2", "--threads", "1", "--out", out]
    assert long.main(point + ["--steps", "64", "--providers", "segmented,floor"]) == 0
    results = json.loads(open(out).read())["results"]
    assert all("error" not in r and r["peak_growth_bytes"] >= 0 for r in results), \
        [r.get("error", r.get("peak_growth_bytes")) for r in results]
    assert "| gru | 64 | 2 | 8 | 1 | segmented |" in long.table(results)
    assert "| gru | 2 | 8 | 1 | 64 |  |  | " in long.summary(results)
    # a point predicted above --max-predicted-gb is recorded, not started
    assert long.main(point + ["--steps", "100000000", "--append"]) == 0
    results = json.loads(open(out).read())["results"]
    assert [r["skipped"][:9] for r in results[2:]] == ["predicted"] * 4
    assert "| gru | 100000000 | 2 | 8 | 1 | nn | not run: predicted 96.8 GB |" in \
        open(out[:-4] + "md").read()
    assert long.main(["--plot", out]) == 0 and os.path.getsize(out[:-4] + "png") > 10000
    # a started point that passes --cap-gb ends as out of memory (here at once: 1 byte)
    r = long.measure("floor", "gru", 64, 2, 8, 1, 1, 1, cap=1)
    assert r["out_of_memory"] and "out of memory" in long.table([r])
