"""The native backend's options (docs/op-contract.md), every option of fastrnn.spec: layer
norm of the recurrent pre-activation and of the cell state, recurrent mask, zoneout, cell /
proj clip, recurrent gradient clip, peepholes. Parity with the reference backend (the
contract in code), forward and backward, each option alone and all together; the shared
workspace layout; gradcheck; poisoned buffers; option checks; which devices claim the
options.

Skips when the extension cannot be built here, unless FASTRNN_REQUIRE_NATIVE=1 (CI).
"""

import pytest
import torch

import fastrnn  # noqa: F401  (defines the public ops)
from fastrnn import backends, ops
from fastrnn.spec import CELLS, LEARNABLE, StepOptions

import backend_cases
from backend_cases import (check_backend, compare_all, native_available_mark, run_backward,
                           run_forward, upstream)

native = backends.get("native")
reference = backends.get("reference")
pytestmark = native_available_mark()

# (cell, proj) cases and the options each has (the spec's).
CASES = {"lstm": ("lstm", False), "lstm_proj": ("lstm", True), "gru": ("gru", False)}
FEATURES = {name: tuple(o.name for o in CELLS[cell].options if proj or not o.needs_projection)
            for name, (cell, proj) in CASES.items()}
SINGLE = [(case, feature) for case, option_names in FEATURES.items() for feature in option_names]
DTYPES = [torch.float64, torch.float32]
LENGTHS = [6, 4, 4, 1, 1]  # packed layout: ragged, with length-1 sequences


def make_case(cell, proj, batch=5, **kwargs):
    return backend_cases.make_case(cell, proj=proj, batch=batch, **kwargs)


def make_options(cell, case, option_names, seed=2):
    """Random values for the given options; clips small enough that they engage."""
    gen = torch.Generator().manual_seed(seed)
    dtype = case["xproj"].dtype
    rows, gates = case["xproj"].shape
    batch, width = case["h0"].shape
    hidden = gates // CELLS[cell].num_gates

    def rand(*shape):
        return torch.randn(*shape, generator=gen, dtype=dtype)

    def zoneout(*shape):  # kept (1), replaced (0) and the eval-mode expectation (0.25)
        choice = torch.randint(0, 3, shape, generator=gen)
        return torch.tensor([0.0, 1.0, 0.25], dtype=dtype)[choice]

    kw = {}
    if "layer_norm" in option_names:
        kw.update(ln_weight=1 + 0.3 * rand(gates), ln_bias=0.3 * rand(gates))
    if "layer_norm_cell" in option_names:
        kw.update(ln_c_weight=1 + 0.3 * rand(hidden), ln_c_bias=0.3 * rand(hidden))
    if "recurrent_mask" in option_names:
        keep = torch.rand(batch, width, generator=gen) < 0.7
        kw["recurrent_mask"] = keep.to(dtype) / 0.7
    if "zoneout_h" in option_names:
        kw["zoneout_h"] = zoneout(rows, width)
    if "zoneout_c" in option_names:
        kw["zoneout_c"] = zoneout(rows, hidden)
    if "cell_clip" in option_names:
        kw["cell_clip"] = 0.5
    if "proj_clip" in option_names:
        kw["proj_clip"] = 0.3
    if "grad_clip" in option_names:
        kw["grad_clip"] = 0.05
    if "peephole" in option_names:
        kw["peephole"] = 0.5 * rand(3 * hidden)
    options = StepOptions(**kw)
    assert set(options.option_names()) == set(option_names), "an option without test values here"
    return options


def check_against_reference(cell, case, reverse, options, dtype):
    """Native against the reference backend, below float64 both against the reference in
    float64 on the same rounded inputs (with a layer norm of a row of small variance, rstd up
    to 1/sqrt(1e-5) amplifies rounding: the reference's own float32 error sets the bound)."""
    assert case["xproj"].dtype == dtype
    return check_backend(native, cell, case, reverse, options)


def differs(a, b):
    return any(x is not None and (x - y).abs().max().item() > 1e-3 for x, y in zip(a, b))


# ------------------------------------------------------------------ parity with reference

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout,reverse", [("dense", True), ("packed", False)],
                         ids=["dense_rev", "packed_fwd"])
@pytest.mark.parametrize("name,feature", SINGLE, ids=[f"{c}-{f}" for c, f in SINGLE])
def test_each_option_alone(name, feature, layout, reverse, dtype):
    cell, proj = CASES[name]
    case = make_case(cell, 3 if proj else 0, dtype=dtype,
                     lengths=LENGTHS if layout == "packed" else None)
    options = make_options(cell, case, (feature,))
    assert options.option_names() == (feature,)
    fwd, bwd = check_against_reference(cell, case, reverse, options, dtype)
    # The option is not a no-op on this case (a kernel ignoring it would fail above).
    plain_fwd = run_forward(native, cell, case, reverse)
    if feature == "grad_clip":
        plain_bwd = run_backward(native, cell, case, reverse, plain_fwd, upstream(plain_fwd))
        assert differs(bwd[:6], plain_bwd), "grad_clip did not clip anything"
    else:
        assert differs(fwd[:3], plain_fwd[:3]), f"{feature} changed nothing"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
@pytest.mark.parametrize("layout", ["dense", "packed"])
@pytest.mark.parametrize("name", list(CASES))
def test_all_options_together(name, layout, reverse, dtype):
    cell, proj = CASES[name]
    case = make_case(cell, 3 if proj else 0, dtype=dtype,
                     lengths=LENGTHS if layout == "packed" else None)
    check_against_reference(cell, case, reverse, make_options(cell, case, FEATURES[name]), dtype)


# Peepholes with each other lstm option: the pieces of the step they meet (the clip before o
# sees c, the cell layer norm between the two backward parts, zoneout of the c they read).
PEEPHOLE_PAIRS = [(name, feature) for name in ("lstm", "lstm_proj") for feature in FEATURES[name]
                  if feature != "peephole"]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout,reverse", [("dense", True), ("packed", False)],
                         ids=["dense_rev", "packed_fwd"])
@pytest.mark.parametrize("name,feature", PEEPHOLE_PAIRS,
                         ids=[f"{c}-{f}" for c, f in PEEPHOLE_PAIRS])
def test_each_option_with_peephole(name, feature, layout, reverse, dtype):
    cell, proj = CASES[name]
    case = make_case(cell, 3 if proj else 0, dtype=dtype,
                     lengths=LENGTHS if layout == "packed" else None)
    check_against_reference(cell, case, reverse,
                            make_options(cell, case, (feature, "peephole")), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
@pytest.mark.parametrize("name", list(CASES))
def test_blocks_of_rows_on_threads(name, reverse, dtype):
    """A batch of at least 16 states per thread runs as blocks of states, one per thread,
    through every step (recurrence_cpu.cpp: row_blocks); 2 threads and 37 states make
    blocks of 19 and 18."""
    cell, proj = CASES[name]
    case = make_case(cell, 3 if proj else 0, dtype=dtype, batch=37, steps=5)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        check_against_reference(cell, case, reverse,
                                make_options(cell, case, FEATURES[name]), dtype)
        check_backend(native, cell, case, reverse)
    finally:
        torch.set_num_threads(threads)


ODD = {"T1": dict(steps=1, batch=3, hidden=4), "H1": dict(steps=4, batch=3, hidden=1),
       "B1": dict(steps=5, batch=1, hidden=4), "H37": dict(steps=3, batch=2, hidden=37)}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("size", list(ODD))
@pytest.mark.parametrize("name", list(CASES))
def test_odd_sizes(name, size, dtype):
    cell, proj = CASES[name]
    case = make_case(cell, 2 if proj else 0, dtype=dtype, **ODD[size])
    check_against_reference(cell, case, True, make_options(cell, case, FEATURES[name]), dtype)


@pytest.mark.parametrize("name", list(CASES))
def test_layer_norms_without_bias(name):
    cell, proj = CASES[name]
    case = dict(make_case(cell, 3 if proj else 0, lengths=LENGTHS), b_hh=None)
    option_names = ("layer_norm", "layer_norm_cell") if cell == "lstm" else ("layer_norm",)
    check_against_reference(cell, case, False, make_options(cell, case, option_names),
                            torch.float64)


@pytest.mark.parametrize("name", list(CASES))
def test_backward_consumes_the_other_backends_forward(name):
    """The workspace layout with every option is shared: each backend's backward runs on
    the other's forward."""
    cell, proj = CASES[name]
    case = make_case(cell, 3 if proj else 0, lengths=LENGTHS)
    options = make_options(cell, case, FEATURES[name])
    fwd_n = run_forward(native, cell, case, True, options)
    fwd_r = run_forward(reference, cell, case, True, options)
    assert fwd_n[3].shape == fwd_r[3].shape
    grads = upstream(fwd_r)
    expected = run_backward(reference, cell, case, True, fwd_r, grads, options)
    compare_all(run_backward(reference, cell, case, True, fwd_n, grads, options), expected,
                "reference backward of native forward")
    compare_all(run_backward(native, cell, case, True, fwd_r, grads, options), expected,
                "native backward of reference forward")


@pytest.mark.parametrize("name", list(CASES))
def test_every_output_element_is_written(name, monkeypatch):
    """FASTRNN_NATIVE_POISON=1 NaN-fills every output and scratch buffer first."""
    monkeypatch.setenv("FASTRNN_NATIVE_POISON", "1")
    cell, proj = CASES[name]
    for reverse in (False, True):
        case = make_case(cell, 3 if proj else 0, lengths=[5, 5, 3, 1])
        options = make_options(cell, case, FEATURES[name])
        fwd, bwd = check_against_reference(cell, case, reverse, options, torch.float64)
        for t in list(fwd) + list(bwd):
            assert t is None or not t.isnan().any()


@pytest.mark.parametrize("layout,reverse", [("dense", True), ("packed", False)],
                         ids=["dense_rev", "packed_fwd"])
@pytest.mark.parametrize("name", list(CASES))
def test_forward_without_workspace_is_bit_identical(name, layout, reverse):
    """need_workspace=False: one step of scratch workspace (the layer norms write and read
    their rows there) gives the same results bit for bit, and an empty workspace."""
    cell, proj = CASES[name]
    case = make_case(cell, 3 if proj else 0, dtype=torch.float32,
                     lengths=LENGTHS if layout == "packed" else None)
    options = make_options(cell, case, FEATURES[name])
    args = [cell] + [case[k] for k in ("xproj", "h0", "c0", "w_hh", "b_hh", "w_hr",
                                        "batch_sizes")] + [reverse, *options]
    kept = torch.ops.fastrnn.native_forward(*args)
    dropped = torch.ops.fastrnn.native_forward(*args, need_workspace=False)
    for a, b in zip(kept[:3], dropped[:3]):
        assert torch.equal(a, b)
    assert dropped[3].shape == (0, kept[3].shape[1])


def test_zoneout_of_one_keeps_the_state_bit_for_bit():
    case = make_case("lstm", 0, batch=3, steps=4)
    ones = torch.ones(12, 5, dtype=torch.float64)
    output, h_n, c_n, _ = run_forward(native, "lstm", case, False,
                                      StepOptions(zoneout_h=ones, zoneout_c=ones))
    assert torch.equal(h_n, case["h0"]) and torch.equal(c_n, case["c0"])
    assert torch.equal(output, case["h0"].repeat(4, 1))


@pytest.mark.parametrize("steps,batch", [(0, 3), (4, 0)], ids=["T0", "B0"])
@pytest.mark.parametrize("name", list(CASES))
def test_empty_steps(name, steps, batch):
    cell, proj = CASES[name]
    case = make_case(cell, 2 if proj else 0, batch=batch, steps=steps)
    options = make_options(cell, case, FEATURES[name])
    fwd_n = run_forward(native, cell, case, False, options)
    fwd_r = run_forward(reference, cell, case, False, options)
    compare_all(fwd_n, fwd_r, "forward")
    grads = [torch.zeros_like(fwd_n[0]), torch.ones_like(fwd_n[1]),
             None if fwd_n[2] is None else torch.ones_like(fwd_n[2])]
    compare_all(run_backward(native, cell, case, False, fwd_n, grads, options),
                run_backward(reference, cell, case, False, fwd_r, grads, options),
                "backward")


# ------------------------------------------------------------------ CUDA (skipped without a GPU)

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("hidden", [37, 600])  # 600: rows wider than one block of threads
@pytest.mark.parametrize("layout,reverse", [("dense", True), ("packed", False)],
                         ids=["dense_rev", "packed_fwd"])
@pytest.mark.parametrize("name", list(CASES))
def test_cuda_variant_kernels_match_reference(name, layout, reverse, hidden, dtype,
                                              monkeypatch):
    """The CUDA variant kernels (row per block) against the reference, every option on.
    NativeBackend runs options on CUDA only once this has passed on a GPU
    (docs/gpu-checks.md)."""
    monkeypatch.setenv("FASTRNN_NATIVE_POISON", "1")
    cell, proj = CASES[name]
    case = make_case(cell, 11 if proj else 0, hidden=hidden, dtype=dtype,
                     lengths=LENGTHS if layout == "packed" else None)
    options = make_options(cell, case, FEATURES[name])
    cuda = lambda v: v.cuda() if isinstance(v, torch.Tensor) and v.is_floating_point() else v  # noqa: E731
    case = {k: cuda(v) for k, v in case.items()}
    options = StepOptions(*[cuda(v) for v in options])
    fwd, bwd = check_against_reference(cell, case, reverse, options, dtype)
    for t in list(fwd) + list(bwd):
        assert t is None or not t.isnan().any()


# ------------------------------------------------------------------ registration, autograd

@pytest.mark.parametrize("name", list(CASES))
def test_opcheck_native_ops(name):
    cell, proj = CASES[name]
    case = make_case(cell, 2 if proj else 0, hidden=3, lengths=[3, 2, 1])
    options = make_options(cell, case, FEATURES[name])
    args = (cell, case["xproj"], case["h0"], case["c0"], case["w_hh"], case["b_hh"],
            case["w_hr"], case["batch_sizes"], True, *options)
    torch.library.opcheck(torch.ops.fastrnn.native_forward.default, args)
    output, h_n, c_n, workspace = torch.ops.fastrnn.native_forward(*args)
    grads = upstream((output, h_n, c_n if cell == "lstm" else None))
    torch.library.opcheck(torch.ops.fastrnn.native_backward.default,
                          (cell, grads[0], grads[1], grads[2], case["h0"], case["c0"],
                           case["w_hh"], case["b_hh"], case["w_hr"], case["batch_sizes"], True,
                           output, workspace, *options))


@pytest.mark.parametrize("name", list(CASES))
def test_gradcheck_public_op(name):
    """Every differentiable input, layer-norm parameters included. grad_clip is left out: it
    changes backward on purpose (the reference parity tests cover it)."""
    cell, proj = CASES[name]
    case = make_case(cell, 2 if proj else 0, hidden=3, lengths=[3, 2, 1])
    options = make_options(cell, case, [f for f in FEATURES[name] if f != "grad_clip"])
    names = [n for n in ("xproj", "h0", "c0", "w_hh", "b_hh", "w_hr") if case[n] is not None]
    option_names = [n for n in LEARNABLE if getattr(options, n) is not None]
    leaves = [case[n].clone().requires_grad_() for n in names]
    leaves += [getattr(options, n).clone().requires_grad_() for n in option_names]

    def fn(*tensors):
        given = dict(zip(names + option_names, tensors))
        opts = options._replace(**{n: given[n] for n in option_names})
        out = ops.recurrence(cell, given["xproj"], given["h0"], given.get("c0"), given["w_hh"],
                             given["b_hh"], given.get("w_hr"), case["batch_sizes"], True,
                             "native", opts)
        return tuple(t for t in out if t is not None)

    assert torch.autograd.gradcheck(fn, leaves)


# ------------------------------------------------------------------ what the backend claims

def test_unsupported_reason_names_the_features():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    every = FEATURES["lstm_proj"]
    assert native.unsupported_reason("lstm", torch.float32, cpu, 5, 3, every) is None
    assert native.unsupported_reason("gru", torch.float64, cpu, 5, 0, FEATURES["gru"]) is None
    # CUDA variant kernels compile but are unverified: refused, named, so auto falls back.
    reason = native.unsupported_reason("lstm", torch.float32, cuda, 5, 0, ("layer_norm",))
    assert reason is not None and "layer_norm" in reason
    assert native.unsupported_reason("lstm", torch.float32, cuda, 5, 0) is None
    reason = native.unsupported_reason("rnn_tanh", torch.float32, cpu, 5, 0, ("zoneout_h",))
    assert reason is not None and "zoneout_h" in reason


def test_rejects_bad_options():
    case = make_case("lstm", 0, lengths=[3, 2])
    good = make_options("lstm", case, ("layer_norm", "zoneout_h"))

    def run(options, cell="lstm", w_hr=None):
        return torch.ops.fastrnn.native_forward(
            cell, case["xproj"], case["h0"], case["c0"], case["w_hh"], case["b_hh"], w_hr,
            case["batch_sizes"], False, *options)

    with pytest.raises(RuntimeError, match="ln_weight and ln_bias"):
        run(good._replace(ln_bias=None))
    with pytest.raises(RuntimeError, match=r"zoneout_h must be \[5, 5\]"):
        run(good._replace(zoneout_h=good.zoneout_h[:-1]))
    with pytest.raises(RuntimeError, match="ln_weight must have the dtype"):
        run(good._replace(ln_weight=good.ln_weight.float()))
    with pytest.raises(RuntimeError, match="cell_clip must be a positive"):
        run(StepOptions(cell_clip=-1.0))
    with pytest.raises(RuntimeError, match="proj_clip needs a projection"):
        run(StepOptions(proj_clip=1.0))
    gru = make_case("gru", 0, lengths=[3, 2])
    with pytest.raises(RuntimeError, match="lstm options"):
        torch.ops.fastrnn.native_forward("gru", gru["xproj"], gru["h0"], None, gru["w_hh"],
                                         None, None, gru["batch_sizes"], False,
                                         *StepOptions(cell_clip=1.0))
