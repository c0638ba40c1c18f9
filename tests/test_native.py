"""The native backend (csrc/): parity with the reference backend and torch.nn, forward and
backward, on every cell, both directions, packed and odd sizes; the op registration
(opcheck, gradcheck, coexistence with the Python-defined ops); poisoned buffers; fallbacks.

Skips when the extension cannot be built here (the reason is shown), unless
FASTRNN_REQUIRE_NATIVE=1 (CI), where that is a failure.
"""
import copy
import os
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pack_sequence

import fastrnn  # noqa: F401  (defines the public ops)
from fastrnn import backends, build, ops
from fastrnn.backends.native import NativeBackend
from fastrnn.spec import CELLS

from backend_cases import (check_backend, compare_all, make_case, native_available_mark,
                           run_backward, run_forward, upstream)
from fastrnn.testing import assert_all_close, to_float64

native = backends.get("native")
reference = backends.get("reference")
pytestmark = native_available_mark()

CELL_NAMES = ["lstm", "gru", "rnn_tanh", "rnn_relu"]
# (cell, proj): lstm with and without projection, the others without.
CELL_CASES = [("lstm", False), ("lstm", True), ("gru", False), ("rnn_tanh", False),
              ("rnn_relu", False)]
CELL_IDS = ["lstm", "lstm_proj", "gru", "rnn_tanh", "rnn_relu"]


def check_against_reference(cell, case, reverse, dtype):
    assert case["xproj"].dtype == dtype
    return check_backend(native, cell, case, reverse)


# ------------------------------------------------------------------ parity with reference

@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("layout", ["dense", "packed"])
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
@pytest.mark.parametrize("cell,proj", CELL_CASES, ids=CELL_IDS)
def test_matches_reference(cell, proj, reverse, layout, bias, dtype):
    lengths = [6, 4, 4, 1, 1] if layout == "packed" else None  # length-1 sequences included
    case = make_case(cell, hidden=5, proj=3 if proj else 0, batch=5, lengths=lengths,
                     bias=bias, dtype=dtype)
    check_against_reference(cell, case, reverse, dtype)


ODD = {"T1": dict(steps=1, batch=3, hidden=4), "H1": dict(steps=4, batch=3, hidden=1),
       "B1": dict(steps=5, batch=1, hidden=4), "H500": dict(steps=2, batch=2, hidden=500),
       "T63": dict(steps=63, batch=2, hidden=3)}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("size", list(ODD))
@pytest.mark.parametrize("cell,proj", CELL_CASES, ids=CELL_IDS)
def test_odd_sizes(cell, proj, size, dtype):
    args = ODD[size]
    case = make_case(cell, proj=2 if proj else 0, dtype=dtype, **args)
    check_against_reference(cell, case, True, dtype)


@pytest.mark.parametrize("cell,proj", CELL_CASES, ids=CELL_IDS)
def test_backward_consumes_the_other_backends_forward(cell, proj):
    """The workspace layout is shared: each backend's backward runs on the other's forward."""
    case = make_case(cell, proj=3 if proj else 0, lengths=[6, 3, 1], batch=3)
    fwd_n = run_forward(native, cell, case, True)
    fwd_r = run_forward(reference, cell, case, True)
    grads = upstream(fwd_r)
    expected = run_backward(reference, cell, case, True, fwd_r, grads)
    compare_all(run_backward(reference, cell, case, True, fwd_n, grads), expected,
                "reference backward of native forward")
    compare_all(run_backward(native, cell, case, True, fwd_r, grads), expected,
                "native backward of reference forward")


# ------------------------------------------------------------------ parity with torch.nn

NN_MODULES = {"lstm": (nn.LSTM, {}), "gru": (nn.GRU, {}),
              "rnn_tanh": (nn.RNN, {"nonlinearity": "tanh"}),
              "rnn_relu": (nn.RNN, {"nonlinearity": "relu"})}


def nn_layer(cell, proj, bias, dtype, device="cpu"):
    cls, extra = NN_MODULES[cell]
    if proj:
        extra = dict(extra, proj_size=2)
    torch.manual_seed(0)
    return cls(3, 5, bias=bias, bidirectional=True, dtype=dtype, device=device, **extra)


def layer_inputs(module, cell, layout, dtype, device="cpu"):
    """Packed input data, batch_sizes, h0, c0 and upstream gradients (seeded)."""
    gen = torch.Generator().manual_seed(0)
    lengths = [6, 4, 1, 1] if layout == "packed" else [6] * 4
    rand = lambda *shape: torch.randn(*shape, generator=gen, dtype=torch.float64)  # noqa: E731
    packed = pack_sequence([rand(n, 3) for n in lengths])
    width = module.proj_size or module.hidden_size
    h0, c0 = rand(2, len(lengths), width), rand(2, len(lengths), 5)
    grads = [rand(packed.data.shape[0], 2 * width), rand(2, len(lengths), width),
             rand(2, len(lengths), 5)]
    to = lambda t: t.to(device=device, dtype=dtype)  # noqa: E731
    return dict(x=to(packed.data), batch_sizes=packed.batch_sizes, dense=layout == "dense",
                h0=to(h0), c0=to(c0), grads=[to(g) for g in grads])


def run_layer(module, cell, inputs, use_native):
    """Outputs (output, h_n[, c_n]) and the gradients of x, h0, c0 and every parameter of a
    bidirectional layer: torch.nn itself, or the native op per direction (public op and its
    autograd, input projection composed outside as fastrnn.nn does)."""
    x, h0, c0 = (inputs[k].clone().requires_grad_() for k in ("x", "h0", "c0"))
    leaves = [x, h0] + ([c0] if cell == "lstm" else []) + list(module.parameters())
    if not use_native:
        packed = torch.nn.utils.rnn.PackedSequence(x, inputs["batch_sizes"])
        out, state_n = module(packed, (h0, c0) if cell == "lstm" else h0)
        outs = [out.data] + (list(state_n) if cell == "lstm" else [state_n])
    else:
        batch_sizes = None if inputs["dense"] else inputs["batch_sizes"]
        per_dir = []
        for d, suffix in enumerate(["_l0", "_l0_reverse"]):
            param = lambda name: getattr(module, name + suffix, None)  # noqa: E731
            xproj = F.linear(x, param("weight_ih"), param("bias_ih"))
            per_dir.append(ops.recurrence(
                cell, xproj, h0[d], c0[d] if cell == "lstm" else None, param("weight_hh"),
                param("bias_hh"), param("weight_hr"), batch_sizes, d == 1, "native"))
        outs = [torch.cat([r[0] for r in per_dir], 1), torch.stack([r[1] for r in per_dir])]
        if cell == "lstm":
            outs.append(torch.stack([r[2] for r in per_dir]))
    grads = torch.autograd.grad(outs, leaves, inputs["grads"][:len(outs)])
    return [t.detach() for t in outs] + list(grads)


def layer_truth(module, cell, inputs):
    """run_layer of torch.nn in float64 on the same rounded parameters and inputs (None for
    a float64 module: it is its own truth)."""
    if next(module.parameters()).dtype == torch.float64:
        return None
    return run_layer(copy.deepcopy(module).double(), cell, to_float64(inputs), use_native=False)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("layout", ["dense", "packed"])
@pytest.mark.parametrize("cell,proj", CELL_CASES, ids=CELL_IDS)
def test_matches_torch_nn(cell, proj, layout, bias, dtype):
    """A bidirectional torch.nn layer against the native op per direction: outputs, final
    states, gradients of x, h0, c0 and every weight."""
    module = nn_layer(cell, proj, bias, dtype)
    inputs = layer_inputs(module, cell, layout, dtype)
    expected = run_layer(module, cell, inputs, use_native=False)
    actual = run_layer(module, cell, inputs, use_native=True)
    assert_all_close(actual, expected, layer_truth(module, cell, inputs), "result")


@pytest.mark.parametrize("dtype,proj", [(torch.float64, 0), (torch.float64, 4),
                                        (torch.float32, 4)], ids=["f64", "f64_proj", "f32_proj"])
def test_module_training_in_blocks_of_rows_on_threads(dtype, proj):
    """Training through the module with 2 threads and 64 states: each thread's block of rows
    makes its own products (float64's GEMM, the projection) on a worker thread, which must
    run them with the caller's autograd state (they refused out= arguments before)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        torch.manual_seed(0)
        expected_module = nn.LSTM(3, 8, proj_size=proj, dtype=dtype)
        module = fastrnn.LSTM(3, 8, proj_size=proj, dtype=dtype, backend="native")
        module.load_state_dict(expected_module.state_dict())
        x = torch.randn(5, 64, 3, dtype=dtype)

        def train_step(m, x):
            x = x.clone().requires_grad_()
            out, (h, c) = m(x)
            (out.pow(2).sum() + h.sum() + c.sum()).backward()
            return [out.detach(), h.detach(), c.detach(), x.grad] + [p.grad for p in m.parameters()]

        truth = None if dtype == torch.float64 else \
            train_step(copy.deepcopy(expected_module).double(), x.double())
        assert_all_close(train_step(module, x), train_step(expected_module, x), truth, "result")
    finally:
        torch.set_num_threads(threads)


# ------------------------------------------------------------------ CUDA (skipped without a GPU)

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("layout", ["dense", "packed"])
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
@pytest.mark.parametrize("cell,proj", CELL_CASES, ids=CELL_IDS)
def test_cuda_matches_reference(cell, proj, reverse, layout, dtype, monkeypatch):
    monkeypatch.setenv("FASTRNN_NATIVE_POISON", "1")
    lengths = [6, 4, 4, 1, 1] if layout == "packed" else None
    case = make_case(cell, hidden=37, proj=11 if proj else 0, batch=5, lengths=lengths,
                     dtype=dtype)
    case = {k: v if v is None or k == "batch_sizes" else v.cuda() for k, v in case.items()}
    check_against_reference(cell, case, reverse, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", ["dense", "packed"])
@pytest.mark.parametrize("cell,proj", CELL_CASES, ids=CELL_IDS)
def test_cuda_half_types_within_twice_torch_error(cell, proj, layout, dtype):
    """fp16/bf16, by the same rule as float32 (fastrnn.testing)."""
    module = nn_layer(cell, proj, True, dtype, device="cuda")
    inputs = layer_inputs(module, cell, layout, dtype, device="cuda")
    torch_half = run_layer(module, cell, inputs, use_native=False)
    native_half = run_layer(module, cell, inputs, use_native=True)
    assert_all_close(native_half, torch_half, layer_truth(module, cell, inputs), "result")


# ------------------------------------------------------------------ robustness

@pytest.mark.parametrize("cell,proj", CELL_CASES, ids=CELL_IDS)
def test_every_output_element_is_written(cell, proj, monkeypatch):
    """FASTRNN_NATIVE_POISON=1 NaN-fills every output and scratch buffer before the kernels
    run: any element left unwritten (or read before written) shows up as NaN."""
    monkeypatch.setenv("FASTRNN_NATIVE_POISON", "1")
    for reverse in (False, True):
        case = make_case(cell, proj=3 if proj else 0, lengths=[5, 5, 3, 1], batch=4)
        fwd, bwd = check_against_reference(cell, case, reverse, torch.float64)
        for t in list(fwd) + list(bwd):
            assert t is None or not t.isnan().any()


def noncontiguous(t):
    """The same values in a transposed (non-contiguous) layout."""
    if t is None or t.dim() != 2:
        return t
    return t.t().contiguous().t()


@pytest.mark.parametrize("cell,proj", CELL_CASES, ids=CELL_IDS)
def test_noncontiguous_inputs(cell, proj):
    case = make_case(cell, proj=3 if proj else 0, lengths=[4, 2, 1], batch=3)
    fwd_r = run_forward(reference, cell, case, False)
    grads = upstream(fwd_r)
    expected = run_backward(reference, cell, case, False, fwd_r, grads)
    strided = {k: noncontiguous(v) for k, v in case.items()}
    assert not strided["xproj"].is_contiguous() and not strided["w_hh"].is_contiguous()
    fwd_n = run_forward(native, cell, strided, False)
    compare_all(fwd_n, fwd_r, "forward")
    fwd_n = [noncontiguous(t) for t in fwd_n]
    compare_all(run_backward(native, cell, strided, False, fwd_n,
                             [noncontiguous(g) for g in grads]),
                expected, "backward")


@pytest.mark.parametrize("cell,proj", CELL_CASES, ids=CELL_IDS)
@pytest.mark.parametrize("batch,steps", [(0, 3), (3, 0)], ids=["B0", "T0"])
def test_empty(cell, proj, batch, steps):
    """No rows: the states pass through, gradients are zeros, shapes follow the contract."""
    case = make_case(cell, proj=2 if proj else 0, batch=batch, steps=steps)
    output, h_n, c_n, workspace = run_forward(native, cell, case, False)
    width = CELLS[cell].workspace_width(5, proj)
    assert output.shape == (0, case["h0"].shape[1]) and workspace.shape == (0, width)
    assert torch.equal(h_n, case["h0"]) and (c_n is None or torch.equal(c_n, case["c0"]))
    grads = [torch.zeros_like(output), torch.ones_like(h_n),
             None if c_n is None else torch.full_like(c_n, 2.0)]
    gx, gh0, gc0, gw, gb, gwr = run_backward(native, cell, case, False,
                                             (output, h_n, c_n, workspace), grads)
    assert gx.shape == case["xproj"].shape and torch.equal(gh0, grads[1])
    assert gc0 is None or torch.equal(gc0, grads[2])
    assert not gw.any() and not gb.any() and (gwr is None or not gwr.any())


def test_rejects_bad_layouts_and_dtypes():
    case = make_case("gru", lengths=[3, 2], batch=2)
    with pytest.raises(RuntimeError, match="sum\\(batch_sizes\\)"):
        native.forward("gru", case["xproj"][:-1], case["h0"], None, case["w_hh"], case["b_hh"],
                       None, case["batch_sizes"], False)
    with pytest.raises(RuntimeError, match="non-increasing"):
        native.forward("gru", case["xproj"], case["h0"], None, case["w_hh"], case["b_hh"],
                       None, torch.tensor([1, 2, 2]), False)
    half = {k: None if v is None or k == "batch_sizes" else v.half() for k, v in case.items()}
    with pytest.raises(RuntimeError, match="float32 and float64"):
        native.forward("gru", half["xproj"], half["h0"], None, half["w_hh"], half["b_hh"],
                       None, None, False)
    assert "float16" in native.unsupported_reason("gru", torch.float16, torch.device("cpu"), 5, 0)
    assert native.unsupported_reason("gru", torch.float32, torch.device("cpu"), 5, 0) is None


# ------------------------------------------------------------------ registration

@pytest.mark.parametrize("cell,proj", CELL_CASES, ids=CELL_IDS)
def test_opcheck_native_ops(cell, proj):
    case = make_case(cell, hidden=3, proj=2 if proj else 0, lengths=[3, 2, 1], batch=3)
    args = (cell, case["xproj"], case["h0"], case["c0"], case["w_hh"], case["b_hh"],
            case["w_hr"], case["batch_sizes"], True)
    torch.library.opcheck(torch.ops.fastrnn.native_forward.default, args)
    output, h_n, c_n, workspace = torch.ops.fastrnn.native_forward(*args)
    grads = upstream((output, h_n, c_n if cell == "lstm" else None))
    torch.library.opcheck(torch.ops.fastrnn.native_backward.default,
                          (cell, grads[0], grads[1], grads[2], case["h0"], case["c0"],
                           case["w_hh"], case["b_hh"], case["w_hr"], case["batch_sizes"], True,
                           output, workspace))


@pytest.mark.parametrize("cell,proj", CELL_CASES, ids=CELL_IDS)
def test_gradcheck_public_op(cell, proj):
    case = make_case(cell, hidden=3, proj=2 if proj else 0, lengths=[3, 2, 1], batch=3)
    names = [n for n in ("xproj", "h0", "c0", "w_hh", "b_hh", "w_hr") if case[n] is not None]
    leaves = [case[n].clone().requires_grad_() for n in names]

    def fn(*tensors):
        given = dict(zip(names, tensors))
        out = ops.recurrence(cell, given["xproj"], given["h0"], given.get("c0"), given["w_hh"],
                             given["b_hh"], given.get("w_hr"), case["batch_sizes"], True,
                             "native")
        return tuple(t for t in out if t is not None)

    assert torch.autograd.gradcheck(fn, leaves)


LOAD_THEN_IMPORT = """
import sys, torch
torch.ops.load_library(sys.argv[1])
import fastrnn.ops
assert hasattr(torch.ops.fastrnn, "lstm_forward") and hasattr(torch.ops.fastrnn, "native_forward")
x = torch.randn(6, 4, dtype=torch.float64)
print(torch.ops.fastrnn.rnn_tanh_forward(x, torch.zeros(2, 4, dtype=x.dtype), None,
      torch.eye(4, dtype=x.dtype), None, None, None, False, "native")[0].shape)
"""
IMPORT_THEN_LOAD = """
import sys, torch
import fastrnn.ops
torch.ops.load_library(sys.argv[1])
assert hasattr(torch.ops.fastrnn, "lstm_forward") and hasattr(torch.ops.fastrnn, "native_forward")
print(torch.ops.fastrnn.native_forward("rnn_tanh", torch.randn(6, 4), torch.zeros(2, 4), None,
      torch.eye(4), None, None, None, False)[0].shape)
"""


@pytest.mark.parametrize("script", [LOAD_THEN_IMPORT, IMPORT_THEN_LOAD],
                         ids=["library_first", "python_first"])
def test_cpp_library_coexists_with_python_fragments(script):
    """TORCH_LIBRARY(fastrnn) in C++ and torch.library fragments in Python share the
    namespace in either import order."""
    library = build.load()  # already loaded in this process: just its path
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    result = subprocess.run([sys.executable, "-c", script, library], env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "torch.Size([6, 4])" in result.stdout


# ------------------------------------------------------------------ unavailable native

def test_failed_build_gives_a_reason_and_auto_falls_back(monkeypatch):
    def failing_load(*args, **kwargs):
        raise build.BuildError("building the native cpu extension failed: error: boom "
                               "(full log: /tmp/x.log)")

    broken = NativeBackend()
    monkeypatch.setattr(build, "load", failing_load)
    monkeypatch.setitem(backends._loaded, "native", broken)
    monkeypatch.setattr(backends, "_warned", set())
    reason = broken.unavailable_reason(torch.device("cpu"))
    assert "boom" in reason and "/tmp/x.log" in reason
    assert "native" not in backends.available_backends("cpu")
    with pytest.raises(ValueError, match="boom"):
        backends.resolve("native", "lstm", torch.device("cpu"), torch.float32, 5)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert backends.resolve("auto", "lstm", torch.device("cpu"), torch.float32, 5) == "reference"
    assert any("boom" in str(w.message) for w in caught)


def test_missing_compiler_is_named(monkeypatch):
    monkeypatch.setenv("CXX", "/nonexistent/c++")
    reason = build._missing_tool_reason(cuda=False)
    assert reason is not None and "/nonexistent/c++" in reason


# ------------------------------------------------------------------ GEMM paths, determinism

PLAIN_GEMM_SCRIPT = """
import sys, torch
import fastrnn
from fastrnn import backends
native = backends.get("native")
assert native.unavailable_reason(torch.device("cpu")) is None
case, grads, reverse = torch.load(sys.argv[1])
fwd = native.forward("lstm", case["xproj"], case["h0"], case["c0"], case["w_hh"], case["b_hh"],
                     None, case["batch_sizes"], reverse)
bwd = native.backward("lstm", *grads, case["h0"], case["c0"], case["w_hh"], case["b_hh"], None,
                      case["batch_sizes"], reverse, fwd[0], fwd[3])
torch.save((fwd, bwd), sys.argv[2])
"""


@pytest.mark.parametrize("layout", ["dense", "packed"])
def test_packed_weight_gemm_matches_plain_gemm(layout, tmp_path):
    """float32 steps above the matrix-vector batches (csrc/gemv.h) use MKL's packed-weight
    GEMM where torch has it; with it switched off (FASTRNN_NATIVE_PACKED_GEMM=0, read once per
    process) every step is at::mm_out. Both paths are right (fastrnn.testing's rule against
    the reference backend)."""
    lengths = [9, 7, 7, 4, 4, 3, 3, 2, 1, 1, 1] if layout == "packed" else None
    case = make_case("lstm", hidden=33, batch=11, steps=9, lengths=lengths, dtype=torch.float32)
    fwd = run_forward(native, "lstm", case, True)
    grads = upstream(fwd)
    bwd = run_backward(native, "lstm", case, True, fwd, grads)
    torch.save((case, grads, True), tmp_path / "case.pt")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path), FASTRNN_NATIVE_PACKED_GEMM="0")
    result = subprocess.run([sys.executable, "-c", PLAIN_GEMM_SCRIPT, str(tmp_path / "case.pt"),
                             str(tmp_path / "out.pt")], env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    fwd_plain, bwd_plain = torch.load(tmp_path / "out.pt")
    # Each path against the reference backend, by the one rule: neither may be worse than
    # twice the reference's own float32 error against the float64 truth.
    case64 = to_float64(case)
    truth_fwd = run_forward(reference, "lstm", case64, True)
    truth_bwd = run_backward(reference, "lstm", case64, True, truth_fwd, to_float64(grads))
    fwd_r = run_forward(reference, "lstm", case, True)
    bwd_r = run_backward(reference, "lstm", case, True, fwd_r, grads)
    for name, (f, b) in {"packed GEMM": (fwd, bwd), "plain GEMM": (fwd_plain, bwd_plain)}.items():
        compare_all(f, fwd_r, f"lstm forward, {name}", truth_fwd)
        compare_all(b, bwd_r, f"lstm backward, {name}", truth_bwd)


@pytest.mark.parametrize("cell,proj", CELL_CASES, ids=CELL_IDS)
def test_bitwise_deterministic(cell, proj):
    """Same inputs, same thread count: the same bits, forward and backward (rows are split
    over threads, but no reduction depends on the split)."""
    case = make_case(cell, hidden=96, proj=48 if proj else 0, batch=64, steps=5,
                     dtype=torch.float32)
    runs = []
    for _ in range(3):
        fwd = run_forward(native, cell, case, False)
        bwd = run_backward(native, cell, case, False, fwd, upstream(fwd))
        runs.append([t for t in fwd + bwd if t is not None])
    for other in runs[1:]:
        for i, (a, b) in enumerate(zip(runs[0], other)):
            assert torch.equal(a, b), f"{cell}: result {i} differs between identical calls"
