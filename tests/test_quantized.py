"""fastrnn.quantize_weights: int8 (per-row scales) and bfloat16 weights for CPU inference.

The quantized kernels' only difference from a float64 evaluation with the same (dequantized)
weights is float32 rounding and summation order, so they are held to the tolerance rule
against that truth, with torch.nn float32 on the dequantized weights as the baseline."""
import pytest
import torch
from torch import nn

import fastrnn
from fastrnn.quantized import dequantize_rows, quantize_rows
from fastrnn.testing import assert_all_close

pytestmark = pytest.mark.usefixtures("native_cpu")

WEIGHT_DTYPES = (torch.int8, torch.bfloat16)
MODULES = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn": nn.RNN}


@pytest.fixture
def native_cpu():
    reason = fastrnn.backends.get("native").unavailable_reason("cpu")
    if reason:
        pytest.skip(reason)


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
def test_matches_float64_truth(cell, dtype, batch, steps):
    quantized = fastrnn.quantize_weights(_model(cell), dtype)
    torch.manual_seed(1)
    x = torch.randn(steps, batch, 24)
    hx = torch.randn(1, batch, 20)
    hx = (hx, torch.randn(1, batch, 20)) if cell == "lstm" else hx
    with torch.no_grad():
        actual = _flat(quantized(x, hx))
    truth, baseline = _truth_and_baseline(quantized, x, hx)
    assert_all_close(actual, baseline, truth, f"{cell} {dtype}")


@pytest.mark.parametrize("config", [
    dict(cell="lstm", num_layers=2, bidirectional=True),
    dict(cell="gru", num_layers=3, bias=False),
    dict(cell="rnn", nonlinearity="relu", num_layers=2),
    dict(cell="rnn", hidden=35, input_size=70),     # not multiples of the 16 lanes
])
def test_layers_directions_and_odd_sizes(config):
    config = dict(config)
    quantized = fastrnn.quantize_weights(_model(config.pop("cell"), **config))
    torch.manual_seed(2)
    x = torch.randn(5, 3, quantized.input_size)
    with torch.no_grad():
        actual = _flat(quantized(x))
    truth, baseline = _truth_and_baseline(quantized, x, None)
    assert_all_close(actual, baseline, truth)


@pytest.mark.parametrize("dtype", WEIGHT_DTYPES, ids=["int8", "bf16"])
@pytest.mark.parametrize("cell", ["lstm", "gru"])
@pytest.mark.parametrize("batch", [1, 3, 4])
def test_chunks_give_the_bits_of_one_sequence(cell, dtype, batch):
    """Streaming: the frames fed in chunks, the state carried, equal one call bit for bit."""
    quantized = fastrnn.quantize_weights(_model(cell, 40, 33), dtype)
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


def test_error_against_float32_is_below_torch_dynamic_int8():
    """Per-row scales are finer than torch's per-tensor ones: a smaller error against the
    float32 model on the same inputs."""
    model = nn.Sequential(_model("lstm", 64, 64))
    with pytest.warns(DeprecationWarning):
        theirs = torch.ao.quantization.quantize_dynamic(model, {nn.LSTM}, dtype=torch.qint8)
    ours = fastrnn.quantize_weights(model)
    torch.manual_seed(4)
    x = torch.randn(20, 2, 64)
    with torch.no_grad():
        exact = model(x)[0]
        error = (ours(x)[0] - exact).abs().max().item()
        their_error = (theirs(x)[0] - exact).abs().max().item()
    assert 0 < error < their_error


def test_fastrnn_modules_and_models_convert():
    """fastrnn's modules are quantized like torch.nn's; a model is copied, not changed."""
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
