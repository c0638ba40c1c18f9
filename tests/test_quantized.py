"""fastrnn.quantize_weights: int8 (per-row scales) and bfloat16 weights for CPU inference.

The quantized kernels' only difference from a float64 evaluation with the same (dequantized)
weights is float32 rounding and summation order, so they are held to the tolerance rule
against that truth, with torch.nn float32 on the dequantized weights as the baseline. On a
CPU with AVX-512 VNNI the int8 products quantize the activations too: there the truth is a
float64 step loop on the activations as the kernel quantizes them (quantize_activations),
and FASTRNN_QUANTIZED_VNNI=0 runs the float32 kernel of other CPUs (the int8_path fixture
runs a test on both)."""
import pytest
import torch
from torch import nn

import fastrnn
from fastrnn.quantized import dequantize_rows, int8_vnni, quantize_activations, quantize_rows
from fastrnn.testing import assert_all_close

pytestmark = pytest.mark.usefixtures("native_cpu")

WEIGHT_DTYPES = (torch.int8, torch.bfloat16)
MODULES = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn": nn.RNN}


@pytest.fixture
def native_cpu():
    reason = fastrnn.backends.get("native").unavailable_reason("cpu")
    if reason:
        pytest.skip(reason)


@pytest.fixture(params=["vnni", "float"])
def int8_path(request, monkeypatch):
    """The int8 kernel a test runs: integer dot products (skipped on a CPU without VNNI) or
    the float32 kernel (forced)."""
    if request.param == "float":
        monkeypatch.setenv("FASTRNN_QUANTIZED_VNNI", "0")
    elif not int8_vnni():
        pytest.skip("this CPU has no AVX-512 VNNI")
    assert int8_vnni() == (request.param == "vnni")
    return request.param


def _model(cell, input_size=24, hidden=20, seed=0, **kwargs):
    torch.manual_seed(seed)
    return MODULES[cell](input_size, hidden, **kwargs)


def _dequantized(quantized, dtype=torch.float32):
    """A torch.nn module holding the quantized module's weights, dequantized."""
    cls = {"LSTM": nn.LSTM, "GRU": nn.GRU}.get(quantized.mode, nn.RNN)
    extra = {"nonlinearity": quantized.nonlinearity} if cls is nn.RNN else {}
    module = cls(quantized.input_size, quantized.hidden_size, quantized.num_layers,
                 bias=quantized.bias, bidirectional=quantized.bidirectional, **extra)
    for layer in range(quantized.num_layers):
        for reverse in (False, True)[:1 + quantized.bidirectional]:
            suffix = f"_l{layer}" + ("_reverse" if reverse else "")
            w_ih, s_ih, w_hh, s_hh, b_ih, b_hh = quantized.weights(layer, reverse)
            getattr(module, f"weight_ih{suffix}").data = dequantize_rows(w_ih, s_ih)
            getattr(module, f"weight_hh{suffix}").data = dequantize_rows(w_hh, s_hh)
            if quantized.bias:
                getattr(module, f"bias_ih{suffix}").data = b_ih.clone()
                getattr(module, f"bias_hh{suffix}").data = b_hh.clone()
    return module.to(dtype)


def _truth_and_baseline(quantized, x, hx):
    """(float64 truth, float32 torch.nn baseline) on the dequantized weights. The float64
    weights are the exact products scale * q (the kernel multiplies its sums by the scale)."""
    module64 = _dequantized(quantized, torch.float64)
    for layer in range(quantized.num_layers):
        for reverse in (False, True)[:1 + quantized.bidirectional]:
            suffix = f"_l{layer}" + ("_reverse" if reverse else "")
            w_ih, s_ih, w_hh, s_hh, _, _ = quantized.weights(layer, reverse)
            for kind, w, s in (("ih", w_ih, s_ih), ("hh", w_hh, s_hh)):
                exact = w.double() if s is None else w.double() * s.double()[:, None]
                getattr(module64, f"weight_{kind}{suffix}").data = exact
    with torch.no_grad():
        truth = module64(x.double(), _map(hx, torch.Tensor.double))
        baseline = _dequantized(quantized)(x, hx)
    return _flat(truth), _flat(baseline)


def _map(hx, f):
    if hx is None:
        return None
    return tuple(map(f, hx)) if isinstance(hx, tuple) else f(hx)


def _flat(result):
    output, state = result
    return [output, *(state if isinstance(state, tuple) else (state,))]


@pytest.mark.parametrize("dtype", WEIGHT_DTYPES, ids=["int8", "bf16"])
@pytest.mark.parametrize("cell", ["lstm", "gru"])
@pytest.mark.parametrize("batch", [1, 4])
@pytest.mark.parametrize("steps", [1, 4, 16])
def test_matches_float64_truth(cell, dtype, batch, steps, monkeypatch):
    """Float32 activations: bfloat16 weights, and int8 ones on the float32 kernel."""
    monkeypatch.setenv("FASTRNN_QUANTIZED_VNNI", "0")
    quantized = fastrnn.quantize_weights(_model(cell), dtype)
    torch.manual_seed(1)
    x = torch.randn(steps, batch, 24)
    hx = torch.randn(1, batch, 20)
    hx = (hx, torch.randn(1, batch, 20)) if cell == "lstm" else hx
    with torch.no_grad():
        actual = _flat(quantized(x, hx))
    truth, baseline = _truth_and_baseline(quantized, x, hx)
    assert_all_close(actual, baseline, truth, f"{cell} {dtype}")


def _int8_frame(quantized, x, state, bits, dtype):
    """One frame of a one-layer int8 module on the activations quantized as the VNNI kernel
    does (from the float32 x [B, I] and state the kernel saw), in ``dtype``: the integer
    sums are exact in float64, so the truth differs from the kernel by its roundings only."""
    w_ih, s_ih, w_hh, s_hh, b_ih, b_hh = quantized.weights(0)

    def product(a, w, s, b):
        q, scale = quantize_activations(a, bits)
        out = (q.to(dtype) @ w.to(dtype).T) * (scale.to(dtype)[:, None] * s.to(dtype))
        return out if b is None else out + b.to(dtype)

    h = state[0] if isinstance(state, tuple) else state
    xp, hp = product(x, w_ih, s_ih, b_ih), product(h, w_hh, s_hh, b_hh)
    h = h.to(dtype)
    if quantized.mode == "LSTM":
        i, f, g, o = (xp + hp).chunk(4, 1)
        c = torch.sigmoid(f) * state[1].to(dtype) + torch.sigmoid(i) * torch.tanh(g)
        return torch.sigmoid(o) * torch.tanh(c), c
    if quantized.mode == "GRU":
        (xr, xz, xn), (hr, hz, hn) = xp.chunk(3, 1), hp.chunk(3, 1)
        r, z = torch.sigmoid(xr + hr), torch.sigmoid(xz + hz)
        n = torch.tanh(xn + r * hn)
        return (1 - z) * n + z * h
    return torch.tanh(xp + hp) if quantized.mode == "RNN_TANH" else torch.relu(xp + hp)


@pytest.mark.parametrize("bits", [8, 16])
@pytest.mark.parametrize("cell,sizes", [("lstm", (24, 20)), ("gru", (24, 20)),
                                        ("rnn", (70, 35)),     # K past 64, N not of 4
                                        ("lstm", (130, 3))])
@pytest.mark.parametrize("batch", [1, 4])
@pytest.mark.parametrize("steps", [1, 4, 16])
def test_vnni_matches_float64_truth_of_its_activations(cell, sizes, bits, batch, steps):
    """Integer dot products: every frame (fed one call at a time, which gives the bits of the
    chunk) within the rule of a float32 evaluation of the same quantized activations,
    against the float64 truth on them."""
    if not int8_vnni():
        pytest.skip("this CPU has no AVX-512 VNNI")
    quantized = fastrnn.quantize_weights(_model(cell, *sizes), activation_bits=bits)
    torch.manual_seed(7)
    x = torch.randn(steps, batch, sizes[0]) * 3
    x[0, 0] = 0   # an all-zero row: scale 0
    h = torch.randn(1, batch, sizes[1])
    state = (h, torch.randn(1, batch, sizes[1])) if cell == "lstm" else h
    actual, truth, baseline = [], [], []
    with torch.no_grad():
        whole = _flat(quantized(x, state))
        for frame in x:
            seen = _map(state, lambda t: t[0])
            output, state = quantized(frame[None], state)
            actual += _flat((output[0], _map(state, lambda t: t[0])))[1:]
            for dtype, results in ((torch.float64, truth), (torch.float32, baseline)):
                new = _int8_frame(quantized, frame, seen, bits, dtype)
                results += list(new) if isinstance(new, tuple) else [new]
    assert torch.equal(torch.stack(actual[::len(actual) // steps]), whole[0][:, :])
    assert_all_close(actual, baseline, truth, f"{cell} {bits} bits")


def test_vnni_keeps_nan_and_infinity(monkeypatch):
    """A call with a value that is not finite takes the float32 kernel: NaN and infinity
    land where they land without VNNI."""
    quantized = fastrnn.quantize_weights(_model("lstm", 8, 6))
    x = torch.randn(3, 2, 8)
    x[1, 0, 3] = float("nan")
    x[1, 1, 2] = float("inf")
    results = []
    for path in ("1", "0"):
        monkeypatch.setenv("FASTRNN_QUANTIZED_VNNI", path)
        with torch.no_grad():
            results.append(_flat(quantized(x)))
    for ours, floats in zip(*results):
        assert torch.equal(ours.isnan(), floats.isnan())
        assert torch.equal(ours.isinf(), floats.isinf())
    assert results[0][0][1:, 0].isnan().all() and results[0][0][0].isfinite().all()


@pytest.mark.parametrize("config", [
    dict(cell="lstm", num_layers=2, bidirectional=True),
    dict(cell="gru", num_layers=3, bias=False),
    dict(cell="rnn", nonlinearity="relu", num_layers=2),
    dict(cell="rnn", hidden=35, input_size=70),     # not multiples of the 16 lanes
])
def test_layers_directions_and_odd_sizes(config, monkeypatch):
    monkeypatch.setenv("FASTRNN_QUANTIZED_VNNI", "0")   # float32 activations
    config = dict(config)
    quantized = fastrnn.quantize_weights(_model(config.pop("cell"), **config))
    torch.manual_seed(2)
    x = torch.randn(5, 3, quantized.input_size)
    with torch.no_grad():
        actual = _flat(quantized(x))
    truth, baseline = _truth_and_baseline(quantized, x, None)
    assert_all_close(actual, baseline, truth)


@pytest.mark.parametrize("dtype,bits", [(torch.int8, 8), (torch.int8, 16),
                                        (torch.bfloat16, 8)], ids=["int8", "int8-a16", "bf16"])
@pytest.mark.parametrize("cell", ["lstm", "gru"])
@pytest.mark.parametrize("batch", [1, 3, 4])
def test_chunks_give_the_bits_of_one_sequence(cell, dtype, bits, batch, int8_path):
    """Streaming: the frames fed in chunks, the state carried, equal one call bit for bit."""
    quantized = fastrnn.quantize_weights(_model(cell, 40, 33), dtype, activation_bits=bits)
    torch.manual_seed(3)
    x = torch.randn(16, batch, 40)
    with torch.no_grad():
        whole, final = quantized(x)
        for sizes in ([1] * 16, [4] * 4, [3, 13], [16]):
            state, outputs = None, []
            for chunk in torch.split(x, sizes):
                output, state = quantized(chunk, state)
                outputs.append(output)
            assert torch.equal(torch.cat(outputs), whole), sizes
            for a, b in zip(_flat((whole, state))[1:], _flat((whole, final))[1:]):
                assert torch.equal(a, b), sizes


@pytest.mark.parametrize("bits", [8, 16])
def test_threads_give_the_same_bits(bits, int8_path):
    """The weight rows are split over threads (hidden 256: several tasks per product); each
    output element is computed whole by one of them, so the thread count changes no bit."""
    quantized = fastrnn.quantize_weights(_model("lstm", 64, 256), activation_bits=bits)
    x = torch.randn(16, 2, 64)
    threads = torch.get_num_threads()
    results = []
    try:
        for count in (1, 2):
            torch.set_num_threads(count)
            with torch.no_grad():
                results.append(_flat(quantized(x)))
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*results):
        assert torch.equal(a, b)


@pytest.mark.parametrize("bits", [8, 16])
def test_error_against_float32_is_below_torch_dynamic_int8(bits, int8_path):
    """Per-row scales (weights, and activations with VNNI) are finer than torch's per-tensor
    ones: a smaller error against the float32 model on the same inputs."""
    model = nn.Sequential(_model("lstm", 64, 64))
    with pytest.warns(DeprecationWarning):
        theirs = torch.ao.quantization.quantize_dynamic(model, {nn.LSTM}, dtype=torch.qint8)
    ours = fastrnn.quantize_weights(model, activation_bits=bits)
    torch.manual_seed(4)
    x = torch.randn(20, 2, 64)
    with torch.no_grad():
        exact = model(x)[0]
        error = (ours(x)[0] - exact).abs().max().item()
        their_error = (theirs(x)[0] - exact).abs().max().item()
    assert 0 < error < their_error


def test_fastrnn_modules_and_models_convert(monkeypatch):
    """fastrnn's modules are quantized like torch.nn's; a model is copied, not changed."""
    monkeypatch.setenv("FASTRNN_QUANTIZED_VNNI", "0")   # float32 activations, as expected's
    torch.manual_seed(5)
    model = nn.Sequential(fastrnn.LSTM(8, 6, batch_first=True))
    quantized = fastrnn.quantize_weights(model)
    assert isinstance(model[0], fastrnn.LSTM)
    assert isinstance(quantized[0], fastrnn.QuantizedLSTM) and quantized[0].batch_first
    assert list(quantized.parameters()) == []
    x = torch.randn(2, 5, 8)
    with torch.no_grad():
        output, (h, c) = quantized[0](x)
        expected = _dequantized(quantized[0])
        expected.batch_first = True
        expected_output, _ = expected(x)
    assert output.shape == (2, 5, 6) and h.shape == c.shape == (1, 2, 6)
    assert (output - expected_output).abs().max() < 1e-5


def test_unbatched_input():
    quantized = fastrnn.quantize_weights(_model("gru", 8, 6))
    x = torch.randn(5, 8)
    with torch.no_grad():
        output, h = quantized(x)
        batched, h1 = quantized(x.unsqueeze(1))
    assert torch.equal(output, batched.squeeze(1)) and torch.equal(h, h1.squeeze(1))


def test_quantize_rows():
    w = torch.tensor([[1.0, -0.5, 0.25], [0.0, 0.0, 0.0], [-2.0, 1.0, 0.0]])
    q, scale = quantize_rows(w)
    assert q.dtype == torch.int8 and scale.tolist() == pytest.approx([1 / 127, 0, 2 / 127])
    assert q.tolist() == [[127, -64, 32], [0, 0, 0], [-127, 64, 0]]   # -63.5 rounds to even
    assert (dequantize_rows(q, scale) - w).abs().max() <= scale.max() / 2


def test_empty_sizes():
    quantized = fastrnn.quantize_weights(_model("lstm", 8, 6, num_layers=2))
    with torch.no_grad():
        output, (h, c) = quantized(torch.randn(3, 0, 8))
        expected, (eh, ec) = _dequantized(quantized)(torch.randn(3, 0, 8))
    assert output.shape == expected.shape and h.shape == eh.shape and c.shape == ec.shape
    with pytest.raises(RuntimeError, match="Expected sequence length to be larger than 0"):
        quantized(torch.randn(0, 2, 8))   # as torch.nn


def test_state_dict_round_trip(tmp_path):
    quantized = fastrnn.quantize_weights(_model("lstm", bidirectional=True))
    fresh = fastrnn.QuantizedLSTM(24, 20, bidirectional=True)
    fresh.load_state_dict(quantized.state_dict())
    x = torch.randn(4, 2, 24)
    with torch.no_grad():
        assert torch.equal(fresh(x)[0], quantized(x)[0])
    torch.save(quantized, tmp_path / "q.pt")
    loaded = torch.load(tmp_path / "q.pt")
    with torch.no_grad():
        assert torch.equal(loaded(x)[0], quantized(x)[0])
    assert quantized.state_dict()["weight_ih_l0"].dtype == torch.int8
    with pytest.raises(RuntimeError, match="weight_ih_l0 is torch.int8 in the state dict"):
        fastrnn.QuantizedLSTM(24, 20, bidirectional=True,
                              weight_dtype=torch.bfloat16).load_state_dict(quantized.state_dict())


def test_inference_only():
    quantized = fastrnn.quantize_weights(_model("lstm"))
    x = torch.randn(3, 1, 24)
    with pytest.raises(RuntimeError, match="inference-only: no gradient"):
        quantized(x.requires_grad_())
    quantized.train()
    with pytest.raises(RuntimeError, match=r"inference-only .*call \.eval\(\)"):
        quantized(torch.randn(3, 1, 24))


def test_bad_input():
    quantized = fastrnn.quantize_weights(_model("lstm"))
    with pytest.raises(ValueError, match="Expected input to be 2D or 3D, got 4D"):
        quantized(torch.randn(1, 2, 3, 24))
    with pytest.raises(RuntimeError, match="input.size\\(-1\\) must be equal to input_size. "
                                           "Expected 24, got 5"):
        quantized(torch.randn(3, 1, 5))
    with pytest.raises(RuntimeError, match="float32 CPU tensor .* got torch.float64"):
        quantized(torch.randn(3, 1, 24, dtype=torch.float64))
    with pytest.raises(RuntimeError, match=r"Expected hidden\[0\] size \(1, 2, 20\), got "
                                           r"\[1, 3, 20\]"):
        quantized(torch.randn(3, 2, 24), (torch.zeros(1, 3, 20), torch.zeros(1, 2, 20)))
    with pytest.raises(TypeError, match="not a PackedSequence"):
        quantized(nn.utils.rnn.pack_sequence([torch.randn(3, 24)]))


def test_refused_modules():
    with pytest.raises(ValueError, match="activation_bits must be 8 or 16, got 4"):
        fastrnn.quantize_weights(nn.LSTM(8, 6), activation_bits=4)
    with pytest.raises(ValueError, match="activation_bits must be 8 or 16, got 12"):
        fastrnn.QuantizedGRU(8, 6, activation_bits=12)
    assert "activation_bits=16" in repr(fastrnn.quantize_weights(nn.GRU(8, 6),
                                                                 activation_bits=16))
    with pytest.raises(ValueError, match="proj_size=4 is not supported"):
        fastrnn.quantize_weights(nn.LSTM(8, 6, proj_size=4))
    with pytest.raises(ValueError, match="dtype must be torch.int8 or torch.bfloat16"):
        fastrnn.quantize_weights(nn.LSTM(8, 6), torch.float16)
    with pytest.raises(ValueError, match="with options .* is not supported"):
        fastrnn.quantize_weights(fastrnn.LSTM(8, 6, layer_norm=True))


# ---- bfloat16 modules on the native CPU backend -------------------------------------------

def _op_results(backend, cell, case, reverse, dtype=None):
    cast = (lambda t: t) if dtype is None else (lambda t: None if t is None else t.to(dtype))
    with torch.no_grad():
        output, h_n, c_n = fastrnn.ops.recurrence(
            cell, cast(case["xproj"]), cast(case["h0"]), cast(case["c0"]), cast(case["w_hh"]),
            cast(case["b_hh"]), None, None, reverse, backend)
    return [output, h_n] + ([c_n] if c_n is not None else [])


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn_tanh", "rnn_relu"])
@pytest.mark.parametrize("batch,steps", [(1, 1), (1, 16), (4, 4)])
def test_native_bfloat16_inference_runs_the_bfloat16_kernel(cell, batch, steps, monkeypatch):
    """A bfloat16 inference call on the native CPU backend reads w_hh as bfloat16 with float32
    state and gate math: within the rule of the reference backend's float32 computation,
    against the float64 truth on the same bfloat16 values."""
    import fastrnn.backends.native as native
    from backend_cases import make_case
    calls = []
    kernel = native._bfloat16_inference
    monkeypatch.setattr(native, "_bfloat16_inference", lambda *a: calls.append(a) or kernel(*a))
    case = make_case(cell, hidden=20, batch=batch, steps=steps, dtype=torch.bfloat16)
    for reverse in (False, True):
        actual = _op_results("native", cell, case, reverse)
        baseline = _op_results("reference", cell, case, reverse)
        truth = _op_results("reference", cell, case, reverse, torch.float64)
        assert_all_close(actual, baseline, truth, f"{cell} reverse={reverse}")
    assert len(calls) == 2


def test_native_bfloat16_training_runs_the_reference_computation():
    """With a gradient to compute, a bfloat16 CPU call on the native backend is the
    reference backend's, forward and backward."""
    results = []
    for backend in ("native", "reference"):
        torch.manual_seed(6)
        module = fastrnn.LSTM(8, 6, backend=backend).to(torch.bfloat16)
        x = torch.randn(5, 2, 8, dtype=torch.bfloat16, requires_grad=True)
        output, (h, c) = module(x)
        grads = torch.autograd.grad(output.float().sum() + c.float().sum(),
                                    [x, *module.parameters()])
        results.append([output, h, c, *grads])
    for a, b in zip(*results):
        assert torch.equal(a, b)
