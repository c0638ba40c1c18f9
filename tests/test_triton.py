"""The triton backend against the reference backend, on CPU under the Triton interpreter.

TRITON_INTERPRET=1 must be set before triton is first imported: tests/conftest.py does it for
the whole run. This module sets it too (enough when it runs first), rebuilds the backend's
kernels if they were built without it, and skips if triton itself was imported without it.

Both kernel shapes (step and persistent) are forced in turn. Every kernel output is allocated
NaN-filled (``poison``), so an element a kernel forgets to write fails the comparison.

On a GPU machine the same tests run the compiled kernels on CUDA:
    TRITON_INTERPRET=0 FASTRNN_TEST_TRITON_DEVICE=cuda pytest tests/test_triton.py
"""
import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

DEVICE = os.environ.get("FASTRNN_TEST_TRITON_DEVICE", "cpu")
if DEVICE == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"
elif not torch.cuda.is_available():
    pytest.skip(f"FASTRNN_TEST_TRITON_DEVICE={DEVICE} but no CUDA device", allow_module_level=True)
pytest.importorskip("triton")

from fastrnn.backends import get as get_backend  # noqa: E402
from fastrnn.testing import assert_all_close, assert_close  # noqa: E402


def _interpreted_package():
    import fastrnn.backends.triton as package
    from fastrnn.backends.triton import autotune, step
    if DEVICE != "cpu":
        if autotune.interpreted(step._step_forward_kernel):
            pytest.skip("unset TRITON_INTERPRET to test the compiled kernels on CUDA",
                        allow_module_level=True)
        return package
    if not autotune.interpreter_ready():
        pytest.skip("triton was imported before TRITON_INTERPRET=1 was set (see conftest.py)",
                    allow_module_level=True)
    if not autotune.interpreted(step._step_forward_kernel):
        # the backend was imported without the interpreter: rebuild its kernels for it
        from fastrnn.backends.triton import _gates, backend, persistent
        for module in (_gates, autotune, step, persistent, backend, package):
            importlib.reload(module)
    return package


triton_pkg = _interpreted_package()
TritonBackend = triton_pkg.backend.TritonBackend
persistent = triton_pkg.persistent
REFERENCE = get_backend("reference")
KERNELS = ("step", "persistent")
CELLS = ("lstm", "gru", "rnn_tanh", "rnn_relu")
GATES = {"lstm": 4, "gru": 3, "rnn_tanh": 1, "rnn_relu": 1}
HALF = (torch.float16, torch.bfloat16)

# (batch, steps, hidden, lengths or None, reverse): plain, packed both ways with a length-1
# sequence, and the degenerate T=1 / batch 1 / H=1 shape.
CASES = {
    "plain": (3, 4, 5, None, False),
    "packed_reverse": (3, 4, 5, [4, 3, 1], True),
    "packed": (3, 4, 5, [4, 2, 2], False),
    "tiny": (1, 1, 1, None, True),
}


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    """Allocate NaN-filled floating tensors, so unwritten outputs show up."""
    empty, empty_like = torch.empty, torch.empty_like

    def fill(t):
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", lambda *a, **k: fill(empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: fill(empty_like(*a, **k)))


# ---------------------------------------------------------------- problem setup

def make_problem(cell, batch, steps, hidden, lengths, proj=0, bias=True, seed=0):
    """float64 op inputs and upstream gradients, in the packed layout of docs/op-contract.md."""
    gen = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, generator=gen, dtype=torch.float64)  # noqa: E731
    if lengths is None:
        batch_sizes, rows = None, steps * batch
    else:
        batch_sizes = torch.tensor([sum(1 for n in lengths if n > t) for t in range(max(lengths))])
        rows = int(batch_sizes.sum())
    G, P = GATES[cell], proj or hidden
    lstm = cell == "lstm"
    inputs = dict(
        xproj=rand(rows, G * hidden), h0=rand(batch, P) * 0.5,
        c0=rand(batch, hidden) * 0.5 if lstm else None,
        w_hh=rand(G * hidden, P) / P ** 0.5, b_hh=rand(G * hidden) * 0.5 if bias else None,
        w_hr=rand(proj, hidden) / hidden ** 0.5 if proj else None, batch_sizes=batch_sizes)
    grads = dict(grad_output=rand(rows, P), grad_h_n=rand(batch, P),
                 grad_c_n=rand(batch, hidden) if lstm else None)
    return inputs, grads


def cast(tensors, dtype):
    return {k: v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v
            for k, v in tensors.items()}


def to(tensors, device):
    return {k: v.to(device) if isinstance(v, torch.Tensor) and k != "batch_sizes" else v
            for k, v in tensors.items()}


def run(backend, cell, inputs, grads, reverse, ws_backend=None):
    """Forward with ``backend``, backward with ``ws_backend`` (default the same) on its
    workspace, on DEVICE when triton runs (else on the CPU). -> dict of every forward output
    and gradient, on the CPU."""
    device = "cpu" if backend is REFERENCE and ws_backend in (None, REFERENCE) else DEVICE
    inputs, grads = to(inputs, device), to(grads, device)
    out, h_n, c_n, ws = backend.forward(cell, reverse=reverse, **inputs)
    op_in = {k: inputs[k] for k in ("h0", "c0", "w_hh", "b_hh", "w_hr", "batch_sizes")}
    back = (ws_backend or backend).backward(cell, reverse=reverse, output=out, workspace=ws,
                                            **op_in, **grads)
    names = ("grad_xproj", "grad_h0", "grad_c0", "grad_w_hh", "grad_b_hh", "grad_w_hr")
    result = dict(output=out, h_n=h_n, c_n=c_n, **dict(zip(names, back)))
    return {k: v.cpu() for k, v in result.items() if v is not None}


def errors(actual, expected):
    """max |a - e| per tensor, in float64."""
    assert actual.keys() == expected.keys()
    out = {}
    for name, e in expected.items():
        a = actual[name]
        assert a.shape == e.shape, f"{name}: shape {tuple(a.shape)} != {tuple(e.shape)}"
        out[name] = (a.double() - e.double()).abs().max().item() if e.numel() else 0.0
    return out


def assert_float32_close(actual, baseline, truth):
    """fastrnn.testing's rule on every named result: float32, within twice the baseline's own
    error against the float64 truth (plus a few ulps)."""
    for name in truth:
        assert actual[name].dtype == torch.float32, name
    assert_all_close(actual, baseline, truth)


def float32_expected(cell, inputs, grads, reverse):
    """(baseline, truth) for a float32 run on these inputs: the reference backend in float32,
    and in float64 on the same float32-rounded values."""
    inputs, grads = cast(inputs, torch.float32), cast(grads, torch.float32)
    return (run(REFERENCE, cell, inputs, grads, reverse),
            run(REFERENCE, cell, cast(inputs, torch.float64), cast(grads, torch.float64), reverse))


def float32_case(cell, kernel, case, proj=0, bias=True):
    batch, steps, hidden, lengths, reverse = CASES[case]
    inputs, grads = make_problem(cell, batch, steps, hidden, lengths, proj, bias)
    return inputs, grads, reverse, float32_expected(cell, inputs, grads, reverse)


# ---------------------------------------------------------------- float32 parity

@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("kernel", KERNELS)
def test_float32_matches_reference(kernel, cell, case):
    inputs, grads, reverse, expected = float32_case(cell, kernel, case)
    actual = run(TritonBackend(kernel), cell, cast(inputs, torch.float32),
                 cast(grads, torch.float32), reverse)
    assert_float32_close(actual, *expected)


@pytest.mark.parametrize("case", ["plain", "packed_reverse", "tiny"])
@pytest.mark.parametrize("kernel", KERNELS)
def test_lstm_projection_float32(kernel, case):
    inputs, grads, reverse, expected = float32_case("lstm", kernel, case, proj=3)
    actual = run(TritonBackend(kernel), "lstm", cast(inputs, torch.float32),
                 cast(grads, torch.float32), reverse)
    assert_float32_close(actual, *expected)


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("kernel", KERNELS)
def test_without_bias(kernel, cell):
    inputs, grads, reverse, expected = float32_case(cell, kernel, "packed", bias=False)
    actual = run(TritonBackend(kernel), cell, cast(inputs, torch.float32),
                 cast(grads, torch.float32), reverse)
    assert_float32_close(actual, *expected)


def test_two_batch_tiles_and_odd_hidden():
    """Batch 17 = two programs of the persistent kernel, H=33 padded to a 64 tile, T=21 with
    lengths 21..10 (each step of the interpreter costs ~0.1 s, so no T=63 here)."""
    lengths = [21] * 5 + list(range(21, 9, -1))
    inputs, grads = make_problem("lstm", 17, 21, 33, lengths)
    expected = float32_expected("lstm", inputs, grads, True)
    actual = run(TritonBackend("persistent"), "lstm", cast(inputs, torch.float32),
                 cast(grads, torch.float32), True)
    assert_float32_close(actual, *expected)


# ---------------------------------------------------------------- shared workspace layout

@pytest.mark.parametrize("cell", CELLS + ("lstm_proj",))
@pytest.mark.parametrize("kernel", KERNELS)
def test_workspace_is_shared_with_reference(kernel, cell):
    """Triton forward -> reference backward, and reference forward -> triton backward."""
    proj = 3 if cell == "lstm_proj" else 0
    cell = "lstm" if proj else cell
    inputs, grads, reverse, expected = float32_case(cell, kernel, "packed_reverse", proj=proj)
    inputs, grads = cast(inputs, torch.float32), cast(grads, torch.float32)
    triton_backend = TritonBackend(kernel)
    assert_float32_close(run(triton_backend, cell, inputs, grads, reverse, REFERENCE), *expected)
    assert_float32_close(run(REFERENCE, cell, inputs, grads, reverse, triton_backend), *expected)


# ---------------------------------------------------------------- float16 / bfloat16

def _pack_reversal(batch_sizes, batch, steps):
    """Row permutation (an involution) that reverses every sequence of a packed batch in time,
    so reverse(op)(x) == op(x[perm])[perm]."""
    sizes = [batch] * steps if batch_sizes is None else batch_sizes.tolist()
    offsets = [sum(sizes[:t]) for t in range(len(sizes))]
    lengths = [sum(1 for s in sizes if s > b) for b in range(batch)]
    perm = [0] * sum(sizes)
    for t, size in enumerate(sizes):
        for b in range(size):
            perm[offsets[t] + b] = offsets[lengths[b] - 1 - t] + b
    return torch.tensor(perm)


def torch_nn_run(cell, inputs, grads, reverse, dtype):
    """PyTorch's own result in ``dtype``: torch.nn with an identity input projection (exact),
    fed the packed rows (time-reversed per sequence for ``reverse``)."""
    xproj, h0, c0 = inputs["xproj"], inputs["h0"], inputs["c0"]
    w_hh, b_hh, w_hr, batch_sizes = (inputs[k] for k in ("w_hh", "b_hh", "w_hr", "batch_sizes"))
    G, batch = GATES[cell], h0.shape[0]
    hidden = w_hh.shape[0] // G
    if cell == "lstm":
        module = torch.nn.LSTM(G * hidden, hidden, proj_size=0 if w_hr is None else w_hr.shape[0])
    elif cell == "gru":
        module = torch.nn.GRU(G * hidden, hidden)
    else:
        module = torch.nn.RNN(G * hidden, hidden, nonlinearity=cell[4:])
    with torch.no_grad():
        module.weight_ih_l0.copy_(torch.eye(G * hidden))
        module.bias_ih_l0.zero_()
        module.weight_hh_l0.copy_(w_hh)
        module.bias_hh_l0.copy_(b_hh)
        if w_hr is not None:
            module.weight_hr_l0.copy_(w_hr)
    module.to(dtype)
    steps = xproj.shape[0] // batch
    sizes = torch.tensor([batch] * steps) if batch_sizes is None else batch_sizes
    perm = _pack_reversal(batch_sizes, batch, steps) if reverse else torch.arange(xproj.shape[0])
    x = xproj[perm].to(dtype).requires_grad_()
    state = [h0.to(dtype)[None].requires_grad_()]
    if c0 is not None:
        state.append(c0.to(dtype)[None].requires_grad_())
    packed = torch.nn.utils.rnn.PackedSequence(x, sizes)
    out, final = module(packed, tuple(state) if c0 is not None else state[0])
    final = final if c0 is not None else (final,)
    loss = (out.data.double() * grads["grad_output"][perm]).sum()
    loss = loss + (final[0][0].double() * grads["grad_h_n"]).sum()
    if c0 is not None:
        loss = loss + (final[1][0].double() * grads["grad_c_n"]).sum()
    loss.backward()
    result = dict(output=out.data[perm], h_n=final[0][0], grad_xproj=x.grad[perm],
                  grad_h0=state[0].grad[0], grad_w_hh=module.weight_hh_l0.grad,
                  grad_b_hh=module.bias_hh_l0.grad)
    if c0 is not None:
        result.update(c_n=final[1][0], grad_c0=state[1].grad[0])
    if w_hr is not None:
        result["grad_w_hr"] = module.weight_hr_l0.grad
    return {k: v.detach() for k, v in result.items()}


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("cell", CELLS + ("lstm_proj",))
@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("dtype", HALF)
def test_half_precision_error_within_twice_pytorch(dtype, kernel, cell, reverse):
    """fastrnn.testing's rule: against a float64 reference of the same (rounded) inputs,
    torch.nn's own result in the same dtype as the baseline."""
    proj = 4 if cell == "lstm_proj" else 0
    cell = "lstm" if proj else cell
    inputs, grads = make_problem(cell, 4, 6, 8, [6, 5, 3, 1], proj, seed=1)
    # what every side really sees: inputs and upstream gradients rounded to dtype
    inputs, grads = (cast(cast(t, dtype), torch.float64) for t in (inputs, grads))
    truth = run(REFERENCE, cell, inputs, grads, reverse)
    ours = run(TritonBackend(kernel), cell, cast(inputs, dtype), cast(grads, dtype), reverse)
    theirs = torch_nn_run(cell, inputs, grads, reverse, dtype)
    assert ours.keys() == truth.keys() == theirs.keys()
    for name in truth:
        assert ours[name].dtype == dtype, name
        assert_close(ours[name], theirs[name], truth[name], name)


# ---------------------------------------------------------------- choice and availability

def test_auto_picks_persistent_where_it_fits(monkeypatch):
    monkeypatch.delenv("FASTRNN_TRITON_KERNEL", raising=False)
    auto = TritonBackend()
    assert auto._persistent("lstm", 64, 0) and auto._persistent("rnn_tanh", 128, 0)
    assert not auto._persistent("lstm", 65, 0) and not auto._persistent("gru", 512, 0)
    assert auto._persistent("lstm", 32, 16) and not auto._persistent("lstm", 64, 64)
    monkeypatch.setenv("FASTRNN_TRITON_KERNEL", "step")
    assert not auto._persistent("lstm", 8, 0)
    assert TritonBackend("persistent").unsupported_reason(
        "lstm", torch.float32, torch.device("cpu"), 512, 0) is not None
    with pytest.raises(ValueError, match="hidden_size=512"):
        TritonBackend("persistent")._persistent("lstm", 512, 0)
    monkeypatch.setenv("FASTRNN_TRITON_KERNEL", "fast")
    with pytest.raises(ValueError, match="FASTRNN_TRITON_KERNEL"):
        auto._persistent("lstm", 8, 0)


def test_auto_runs_step_path_for_large_hidden(monkeypatch):
    """A GRU with H=65 does not fit the persistent kernel: auto must use the step path."""
    monkeypatch.delenv("FASTRNN_TRITON_KERNEL", raising=False)
    monkeypatch.setattr(persistent, "forward", None)  # calling them would fail
    monkeypatch.setattr(persistent, "backward", None)
    inputs, grads = make_problem("gru", 2, 2, 65, None)
    expected = float32_expected("gru", inputs, grads, False)
    actual = run(TritonBackend(), "gru", cast(inputs, torch.float32),
                 cast(grads, torch.float32), False)
    assert_float32_close(actual, *expected)


def test_availability_and_support():
    backend = get_backend("triton")
    assert backend.unavailable_reason(torch.device(DEVICE)) is None
    if DEVICE == "cpu":  # the interpreter is on
        assert "meta" in backend.unavailable_reason(torch.device("meta"))
    else:
        assert "TRITON_INTERPRET" in backend.unavailable_reason(torch.device("cpu"))
    reason = backend.unsupported_reason("lstm", torch.float64, torch.device("cpu"), 8, 0)
    assert "float64" in reason
    assert backend.unsupported_reason("gru", torch.bfloat16, torch.device("cpu"), 8, 0) is None
    with pytest.raises(ValueError, match="kernel"):
        TritonBackend("fastest")


@pytest.mark.skipif(DEVICE != "cpu", reason="interpreter only")
def test_autotune_keeps_one_config_under_interpreter():
    assert len(persistent._persistent_forward_kernel.configs) == 1
    assert len(persistent._persistent_backward_kernel.configs) == 1


def test_through_the_op_with_autograd():
    """fastrnn.ops with backend="triton": forward and autograd backward match the reference."""
    from fastrnn.ops import recurrence
    inputs, grads = make_problem("lstm", 3, 4, 5, [4, 3, 1], proj=2)
    inputs, grads = cast(inputs, torch.float32), cast(grads, torch.float32)
    results = {}
    for backend, dtype in (("triton", torch.float32), ("reference", torch.float32),
                           ("reference", torch.float64)):
        args = {k: v.clone() if isinstance(v, torch.Tensor) and k != "batch_sizes" else v
                for k, v in to(cast(inputs, dtype), DEVICE).items()}
        leaves = {k: args[k].requires_grad_() for k in ("xproj", "h0", "c0", "w_hh", "b_hh",
                                                        "w_hr")}
        out, h_n, c_n = recurrence("lstm", **args, reverse=True, backend=backend)
        g = to(cast(grads, dtype), DEVICE)
        loss = ((out * g["grad_output"]).sum() + (h_n * g["grad_h_n"]).sum()
                + (c_n * g["grad_c_n"]).sum())
        loss.backward()
        results[backend, dtype] = {k: v.detach().cpu() for k, v in dict(
            output=out, h_n=h_n, c_n=c_n,
            **{f"grad_{k}": v.grad for k, v in leaves.items()}).items()}
    assert_float32_close(results["triton", torch.float32], results["reference", torch.float32],
                         results["reference", torch.float64])


def test_kernels_compile_for_sm90():
    """The interpreter runs kernels as Python and misses compile-only errors: compile a subset
    of the kernels to sm_90 cubin with the ptxas bundled in triton (no GPU needed)."""
    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH")]))
    proc = subprocess.run([sys.executable, "-m", "fastrnn.backends.triton.compile_check"],
                          cwd=root, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-4000:]
    assert proc.stdout.count("ok ") == 16, proc.stdout
