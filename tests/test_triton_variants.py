"""The options on the triton backend's step path, against the reference backend.

Runs under the Triton interpreter on CPU like tests/test_triton.py (whose setup, problem
builder, NaN poisoning and tolerance helpers it shares). Tiny shapes: the interpreter is slow.
Every option alone, every pair of lstm options and all together, for lstm, lstm with
projection and gru, dense and packed (ragged, with a length-1 sequence), both directions;
float32, float16 and bfloat16 by fastrnn.testing's rule (against a float64 run of the same
rounded inputs, within twice PyTorch's own same-dtype error); the workspace crossing
backends both ways.
"""
import itertools

import pytest
import torch

from test_triton import (DEVICE, GATES, REFERENCE, TritonBackend, assert_float32_close,
                         cast, make_problem, to)
from test_triton import poison  # noqa: F401  (the autouse NaN-filling fixture)
from fastrnn.testing import assert_close
from fastrnn.spec import CELLS, LEARNABLE, StepOptions, workspace_width

GRAD_NAMES = ("grad_xproj", "grad_h0", "grad_c0", "grad_w_hh", "grad_b_hh",
              "grad_w_hr") + tuple("grad_" + name for name in LEARNABLE)
# every option of the spec that the cell takes (with a projection: also those needing one)
LSTM_OPTIONS = tuple(o.name for o in CELLS["lstm"].options if not o.needs_projection)
PROJ_OPTIONS = tuple(o.name for o in CELLS["lstm"].options)
GRU_OPTIONS = tuple(o.name for o in CELLS["gru"].options)
ALL = {"lstm": LSTM_OPTIONS, "lstm_proj": PROJ_OPTIONS, "gru": GRU_OPTIONS}
# (batch, steps, hidden, lengths or None, reverse)
CASES = {
    "plain": (3, 4, 5, None, False),
    "packed_reverse": (3, 4, 5, [4, 3, 1], True),
    "packed": (3, 4, 5, [4, 2, 1], False),
    "tiny": (1, 1, 1, None, True),
}
PROJ = 3


def make_options(cell, option_names, inputs, seed=2):
    """float64 StepOptions for ``option_names``. Clip limits sit inside the values' range, so
    every clip is active somewhere; zoneout weights mix 0, 1 (keep the state) and 0.3 (the
    eval-mode expectation); the recurrent mask is a dropout mask (0 or 1/0.7); peephole
    weights of either sign, up to 1."""
    gen = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.rand(*shape, generator=gen, dtype=torch.float64)  # noqa: E731
    G, (B, P) = GATES[cell], inputs["h0"].shape
    H, N = inputs["w_hh"].shape[0] // G, inputs["xproj"].shape[0]
    zone = lambda w: torch.tensor([0.0, 1.0, 0.3], dtype=torch.float64)[  # noqa: E731
        torch.randint(0, 3, (N, w), generator=gen)]
    values = {}
    if "layer_norm" in option_names:
        values.update(ln_weight=0.5 + rand(G * H), ln_bias=rand(G * H) - 0.5)
    if "layer_norm_cell" in option_names:
        values.update(ln_c_weight=0.5 + rand(H), ln_c_bias=rand(H) - 0.5)
    if "recurrent_mask" in option_names:
        values["recurrent_mask"] = (rand(B, P) < 0.7).double() / 0.7
    if "zoneout_h" in option_names:
        values["zoneout_h"] = zone(P)
    if "zoneout_c" in option_names:
        values["zoneout_c"] = zone(H)
    if "peephole" in option_names:
        values["peephole"] = 2 * rand(3 * H) - 1
    values.update({name: limit for name, limit in (("cell_clip", 0.4), ("proj_clip", 0.3),
                                                   ("grad_clip", 0.05)) if name in option_names})
    return StepOptions(**values)


def cast_options(options, dtype):
    return StepOptions(*[v.to(dtype) if isinstance(v, torch.Tensor) else v for v in options])


def run(backend, cell, inputs, grads, reverse, options, ws_backend=None):
    """Forward with ``backend``, backward with ``ws_backend`` (default the same) on its
    workspace. -> dict of every output, the workspace and all the gradients, on the CPU."""
    device = "cpu" if backend is REFERENCE and ws_backend in (None, REFERENCE) else DEVICE
    inputs, grads = to(inputs, device), to(grads, device)
    options = StepOptions(*[v.to(device) if isinstance(v, torch.Tensor) else v
                            for v in options])
    out, h_n, c_n, ws = backend.forward(cell, reverse=reverse, options=options, **inputs)
    op_in = {k: inputs[k] for k in ("h0", "c0", "w_hh", "b_hh", "w_hr", "batch_sizes")}
    back = (ws_backend or backend).backward(cell, reverse=reverse, output=out, workspace=ws,
                                            options=options, **op_in, **grads)
    assert len(back) == len(GRAD_NAMES)
    result = dict(output=out, h_n=h_n, c_n=c_n, workspace=ws, **dict(zip(GRAD_NAMES, back)))
    return {k: v.cpu() for k, v in result.items() if v is not None}


def problem(cell, case, option_names, seed=0):
    """-> (cell name, float64 inputs, grads, reverse, options)."""
    proj = PROJ if cell == "lstm_proj" else 0
    cell = "lstm" if proj else cell
    batch, steps, hidden, lengths, reverse = CASES[case]
    inputs, grads = make_problem(cell, batch, steps, hidden, lengths, proj, seed=seed)
    if cell == "gru" and "grad_clip" in option_names:
        # d_r = clamp(d_n * hn * r(1-r)) with |d_n| <= grad_clip exceeds the clip only where
        # |hn| > 4: make hn that large somewhere
        inputs["b_hh"][2 * hidden:] *= 12
    return cell, inputs, grads, reverse, make_options(cell, option_names, inputs)


def float32_expected(cell, inputs, grads, reverse, options):
    """(baseline, truth) for float32 inputs: the reference backend in float32, and in float64
    on the same values."""
    to64 = lambda t: cast(t, torch.float64)  # noqa: E731
    return (run(REFERENCE, cell, inputs, grads, reverse, options),
            run(REFERENCE, cell, to64(inputs), to64(grads), reverse,
                cast_options(options, torch.float64)))


def check_float32(cell, case, option_names, pairs=("triton>triton",)):
    """``pairs``: forward backend > backward backend, run in turn."""
    cell, inputs, grads, reverse, options = problem(cell, case, option_names)
    inputs, grads = cast(inputs, torch.float32), cast(grads, torch.float32)
    options = cast_options(options, torch.float32)
    expected = float32_expected(cell, inputs, grads, reverse, options)
    H = inputs["w_hh"].shape[0] // GATES[cell]
    proj = 0 if inputs["w_hr"] is None else inputs["w_hr"].shape[0]
    assert expected[1]["workspace"].shape[1] == workspace_width(cell, H, proj,
                                                                options.option_names())
    backends = {"triton": TritonBackend(), "reference": REFERENCE}
    for pair in pairs:
        first, second = (backends[name] for name in pair.split(">"))
        actual = run(first, cell, inputs, grads, reverse, options, second)
        assert_float32_close(actual, *expected)


# ---------------------------------------------------------------- float32 parity

@pytest.mark.parametrize("feature", LSTM_OPTIONS)
def test_lstm_option_alone(feature):
    check_float32("lstm", "packed_reverse", (feature,))


@pytest.mark.parametrize("pair", list(itertools.combinations(PROJ_OPTIONS, 2)), ids="+".join)
def test_lstm_option_pairs(pair):
    """Each option with each other one: where two act on the same values (the peepholes and
    the cell clip, layer norm or zoneout of c, say), their order shows."""
    needs_projection = any(o.needs_projection for o in CELLS["lstm"].options if o.name in pair)
    check_float32("lstm_proj" if needs_projection else "lstm", "packed_reverse", pair)


@pytest.mark.parametrize("feature", ("proj_clip", "zoneout_h", "recurrent_mask"))
def test_lstm_projection_option_alone(feature):
    check_float32("lstm_proj", "packed", (feature,))


@pytest.mark.parametrize("feature", GRU_OPTIONS)
def test_gru_option_alone(feature):
    check_float32("gru", "packed_reverse", (feature,))


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("cell", list(ALL))
def test_all_options_together(cell, case):
    check_float32(cell, case, ALL[cell])


@pytest.mark.parametrize("cell", list(ALL))
def test_workspace_crosses_backends(cell):
    """Triton forward -> reference backward, and reference forward -> triton backward."""
    check_float32(cell, "packed_reverse", ALL[cell],
                  pairs=("triton>reference", "reference>triton"))


def test_wide_rows_layer_norm():
    """H=130: layer-norm rows of 520 columns in 4 tiles of 256 lanes (the padding must stay out
    of the row statistics), 4 rows per program, so batch 9 takes 3 programs, then fewer as
    the ragged sequences end."""
    lengths = [4, 4, 3, 3, 2, 2, 1, 1, 1]
    inputs, grads = make_problem("lstm", 9, 4, 130, lengths, seed=3)
    options = make_options("lstm", LSTM_OPTIONS, inputs)
    inputs, grads = cast(inputs, torch.float32), cast(grads, torch.float32)
    options = cast_options(options, torch.float32)
    actual = run(TritonBackend(), "lstm", inputs, grads, False, options)
    assert_float32_close(actual, *float32_expected("lstm", inputs, grads, False, options))


# ---------------------------------------------------------------- float16 / bfloat16

def pytorch_loop(cell, inputs, grads, reverse, options, dtype):
    """PyTorch's own result in ``dtype``: the contract's step written in plain PyTorch ops
    (tests/variant_loops.py) on dense [T, B] inputs, gradients by autograd."""
    from variant_loops import run_direction
    B = inputs["h0"].shape[0]
    G, P = GATES[cell], inputs["h0"].shape[1]
    H = inputs["w_hh"].shape[0] // G
    T = inputs["xproj"].shape[0] // B
    leaves = {k: v.to(dtype).requires_grad_() for k, v in inputs.items()
              if isinstance(v, torch.Tensor) and k != "batch_sizes"}
    opts = {k: v.to(dtype).requires_grad_() if isinstance(v, torch.Tensor) else v
            for k, v in options._asdict().items() if v is not None}
    step = {k: v for k, v in opts.items()
            if k in ("cell_clip", "proj_clip", "grad_clip", "peephole")}
    if "ln_weight" in opts:
        step["ln_hh"] = (opts["ln_weight"], opts["ln_bias"])
    if "ln_c_weight" in opts:
        step["ln_c"] = (opts["ln_c_weight"], opts["ln_c_bias"])
    zh, zc = opts.get("zoneout_h"), opts.get("zoneout_c")
    out, h_n, c_n = run_direction(
        cell, leaves["xproj"].view(T, B, G * H), leaves["h0"], leaves.get("c0"),
        leaves["w_hh"], leaves.get("b_hh"), leaves.get("w_hr"), reverse,
        rec_mask=opts.get("recurrent_mask"),
        z_h=None if zh is None else zh.view(T, B, P),
        z_c=None if zc is None else zc.view(T, B, H), **step)
    loss = (out.reshape(T * B, P).double() * grads["grad_output"]).sum()
    loss = loss + (h_n.double() * grads["grad_h_n"]).sum()
    if c_n is not None:
        loss = loss + (c_n.double() * grads["grad_c_n"]).sum()
    loss.backward()
    result = dict(output=out.reshape(T * B, P), h_n=h_n, c_n=c_n)
    for name, leaf in list(leaves.items()) + [(k, v) for k, v in opts.items()
                                              if k in LEARNABLE]:
        result["grad_" + name] = leaf.grad
    return {k: v.detach() for k, v in result.items() if v is not None}


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("cell", list(ALL))
@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16))
def test_half_precision_error_within_twice_pytorch(dtype, cell, reverse):
    """As tests/test_triton.py (fastrnn.testing's rule, PyTorch's own same-dtype result as the
    baseline), here with every option on."""
    proj = PROJ if cell == "lstm_proj" else 0
    option_names, cell = ALL[cell], "lstm" if proj else cell
    inputs, grads = make_problem(cell, 4, 5, 8, None, proj, seed=1)
    options = make_options(cell, option_names, inputs, seed=4)
    rounded = lambda t: cast(cast(t, dtype), torch.float64)  # noqa: E731
    inputs, grads = rounded(inputs), rounded(grads)
    options = cast_options(cast_options(options, dtype), torch.float64)
    truth = run(REFERENCE, cell, inputs, grads, reverse, options)
    ours = run(TritonBackend(), cell, cast(inputs, dtype), cast(grads, dtype), reverse,
               cast_options(options, dtype))
    theirs = pytorch_loop(cell, inputs, grads, reverse, options, dtype)
    del truth["workspace"], ours["workspace"]
    assert theirs.keys() == truth.keys() == ours.keys()
    for name in truth:
        assert ours[name].dtype == dtype, name
        assert_close(ours[name], theirs[name], truth[name], name)


# ---------------------------------------------------------------- contract details

def test_zoneout_one_keeps_previous_state_bit_for_bit():
    """zoneout weight 1 on every row: h_t and c_t are h0 and c0 exactly."""
    cell, inputs, grads, reverse, _ = problem("lstm", "plain", ())
    inputs = to(cast(inputs, torch.float32), DEVICE)
    N, (B, P) = inputs["xproj"].shape[0], inputs["h0"].shape
    ones = torch.ones(N, P, device=DEVICE)
    options = StepOptions(zoneout_h=ones, zoneout_c=ones.clone(),
                          ln_weight=torch.ones(4 * P, device=DEVICE),
                          ln_bias=torch.zeros(4 * P, device=DEVICE))
    out, h_n, c_n, _ = TritonBackend().forward(cell, reverse=reverse, options=options, **inputs)
    assert torch.equal(h_n, inputs["h0"]) and torch.equal(c_n, inputs["c0"])
    assert torch.equal(out, inputs["h0"].repeat(N // B, 1))


def test_no_option_set_is_the_plain_recurrence():
    """options with every field None: exactly the numbers of options=None, and the learnable
    options' gradients all None."""
    cell, inputs, grads, reverse, _ = problem("gru", "packed_reverse", ())
    inputs, grads = to(cast(inputs, torch.float32), DEVICE), to(cast(grads, torch.float32), DEVICE)
    plain = TritonBackend("step").forward(cell, reverse=reverse, **inputs)
    empty = TritonBackend("step").forward(cell, reverse=reverse, options=StepOptions(),
                                          **inputs)
    for a, b in zip(plain, empty):
        assert (a is None and b is None) or torch.equal(a, b)
    op_in = {k: inputs[k] for k in ("h0", "c0", "w_hh", "b_hh", "w_hr", "batch_sizes")}
    back = TritonBackend("step").backward(cell, reverse=reverse, output=plain[0],
                                          workspace=plain[3], options=StepOptions(),
                                          **op_in, **grads)
    assert len(back) == len(GRAD_NAMES) and back[6:] == (None,) * len(LEARNABLE)


def test_zero_steps_with_options():
    cell, inputs, grads, reverse, options = problem("lstm", "plain", LSTM_OPTIONS)
    inputs = to(cast(inputs, torch.float32), DEVICE)
    options = StepOptions(*[v.to(DEVICE) if isinstance(v, torch.Tensor) else v
                            for v in cast_options(options, torch.float32)])
    options = options._replace(zoneout_h=torch.zeros(0, 5, device=DEVICE),
                               zoneout_c=torch.zeros(0, 5, device=DEVICE))
    inputs["xproj"] = inputs["xproj"][:0]
    out, h_n, c_n, ws = TritonBackend().forward(cell, reverse=reverse, options=options,
                                                **inputs)
    assert ws.shape == (0, workspace_width("lstm", 5, 0, options.option_names()))
    back = TritonBackend().backward(
        cell, reverse=reverse, output=out, workspace=ws, options=options,
        grad_output=out, grad_h_n=h_n, grad_c_n=c_n,
        **{k: inputs[k] for k in ("h0", "c0", "w_hh", "b_hh", "w_hr", "batch_sizes")})
    assert [tuple(g.shape) for g in back[6:]] == [tuple(getattr(options, name).shape)
                                                  for name in LEARNABLE]
    assert all(not g.any() for g in back[6:])


def test_options_use_the_step_path(monkeypatch):
    """auto runs options on the step path even where the persistent kernel fits; a forced
    persistent kernel refuses them, naming them, and so does unsupported_reason."""
    from fastrnn.backends.triton import persistent
    monkeypatch.delenv("FASTRNN_TRITON_KERNEL", raising=False)
    monkeypatch.setattr(persistent, "forward", None)  # calling them would fail
    monkeypatch.setattr(persistent, "backward", None)
    check_float32("gru", "plain", ("zoneout_h",))
    cpu = torch.device("cpu")
    assert TritonBackend().unsupported_reason("lstm", torch.float32, cpu, 8, 0,
                                              ("layer_norm",)) is None
    reason = TritonBackend("persistent").unsupported_reason("lstm", torch.float32, cpu, 8, 0,
                                                            ("layer_norm", "cell_clip"))
    assert "layer_norm, cell_clip" in reason and "persistent" in reason
    reason = TritonBackend("persistent").unsupported_reason("lstm", torch.float32, cpu, 8, 0,
                                                            ("peephole",))
    assert "peephole" in reason and "persistent" in reason
    assert TritonBackend("persistent").unsupported_reason("lstm", torch.float32, cpu, 8,
                                                          0) is None
    assert "rnn_tanh" in TritonBackend().unsupported_reason("rnn_tanh", torch.float32, cpu, 8,
                                                            0, ("zoneout_h",))
    cell, inputs, grads, reverse, options = problem("lstm", "tiny", ("cell_clip",))
    with pytest.raises(ValueError, match="cell_clip"):
        TritonBackend("persistent").forward(cell, reverse=reverse, options=options,
                                            **cast(inputs, torch.float32))


@pytest.mark.parametrize("cell", ["lstm_proj", "gru"])
def test_through_the_op_with_autograd(cell):
    """fastrnn.ops with backend="triton" and every option: forward and the autograd backward
    (every input's and every learnable option's gradient) match the reference."""
    from fastrnn.ops import recurrence
    cell, inputs, grads, reverse, options = problem(cell, "packed_reverse", ALL[cell])
    inputs, grads = cast(inputs, torch.float32), cast(grads, torch.float32)
    options = cast_options(options, torch.float32)
    results = {}
    for backend, dtype in (("triton", torch.float32), ("reference", torch.float32),
                           ("reference", torch.float64)):
        args = {k: v.clone() if isinstance(v, torch.Tensor) and k != "batch_sizes" else v
                for k, v in to(cast(inputs, dtype), DEVICE).items()}
        opts = cast_options(options, dtype)
        opts = StepOptions(*[v.to(DEVICE).clone() if isinstance(v, torch.Tensor) else v
                             for v in opts])
        leaves = {k: v.requires_grad_() for k, v in args.items()
                  if isinstance(v, torch.Tensor) and k != "batch_sizes"}
        leaves.update({k: v.requires_grad_() for k, v in opts._asdict().items()
                       if k in LEARNABLE and v is not None})
        out, h_n, c_n = recurrence(cell, **args, reverse=reverse, backend=backend,
                                   options=opts)
        g = to(cast(grads, dtype), DEVICE)
        loss = (out * g["grad_output"]).sum() + (h_n * g["grad_h_n"]).sum()
        if c_n is not None:
            loss = loss + (c_n * g["grad_c_n"]).sum()
        loss.backward()
        result = dict(output=out, h_n=h_n, **({} if c_n is None else dict(c_n=c_n)),
                      **{f"grad_{k}": v.grad for k, v in leaves.items()})
        results[backend, dtype] = {k: v.detach().cpu() for k, v in result.items()}
    assert_float32_close(results["triton", torch.float32], results["reference", torch.float32],
                         results["reference", torch.float64])
