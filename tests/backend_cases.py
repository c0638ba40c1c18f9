"""Random inputs for a backend's forward / backward (the op contract, docs/op-contract.md),
and the calls, comparisons and skip rule the native tests share."""
import os

import pytest
import torch

from fastrnn import backends
from fastrnn.spec import CELLS
from fastrnn.testing import assert_all_close, to_float64


def native_available_mark():
    """Skip a native test module when the extension cannot be built here (with the reason),
    unless FASTRNN_REQUIRE_NATIVE=1 (CI), where that is a failure."""
    reason = backends.get("native").unavailable_reason(torch.device("cpu"))
    if reason is not None and os.environ.get("FASTRNN_REQUIRE_NATIVE") == "1":
        raise RuntimeError(f"FASTRNN_REQUIRE_NATIVE=1 but the native backend is unavailable: "
                           f"{reason}")
    return pytest.mark.skipif(reason is not None, reason=f"native backend unavailable: {reason}")


def make_case(cell, hidden=5, proj=0, batch=4, steps=6, lengths=None, bias=True,
              dtype=torch.float64, seed=0):
    """Random op inputs; `lengths` (sorted, descending) makes a packed layout of
    len(lengths) sequences (`batch` and `steps` then unused)."""
    gen = torch.Generator().manual_seed(seed)
    kind = CELLS[cell]
    gates, width = kind.num_gates, proj or hidden

    def rand(*shape, scale=1.0):
        return torch.randn(*shape, generator=gen, dtype=dtype) * scale

    if lengths is not None:
        batch = len(lengths)
        batch_sizes = torch.tensor([sum(L > t for L in lengths) for t in range(max(lengths))],
                                   dtype=torch.long)
        rows = int(batch_sizes.sum())
    else:
        batch_sizes, rows = None, steps * batch
    scale = hidden ** -0.5
    return dict(
        xproj=rand(rows, gates * hidden), h0=rand(batch, width),
        c0=rand(batch, hidden) if kind.has_cell_state else None,
        w_hh=rand(gates * hidden, width, scale=scale),
        b_hh=rand(gates * hidden) if bias else None,
        w_hr=rand(width, hidden, scale=scale) if proj else None,
        batch_sizes=batch_sizes)


def upstream(outputs, seed=1):
    """Random gradients for (output, h_n, c_n)."""
    gen = torch.Generator().manual_seed(seed)
    return [None if t is None else
            torch.randn(t.shape, generator=gen, dtype=t.dtype).to(t.device)
            for t in outputs[:3]]


def run_forward(backend, cell, case, reverse, options=None):
    return backend.forward(cell, case["xproj"], case["h0"], case["c0"], case["w_hh"],
                           case["b_hh"], case["w_hr"], case["batch_sizes"], reverse, options)


def run_backward(backend, cell, case, reverse, fwd, grads, options=None):
    grad_output, grad_h_n, grad_c_n = grads
    return backend.backward(cell, grad_output, grad_h_n, grad_c_n, case["h0"], case["c0"],
                            case["w_hh"], case["b_hh"], case["w_hr"], case["batch_sizes"],
                            reverse, fwd[0], fwd[3], options)


def compare_all(actual, expected, what, truth=None):
    """Results of a backend against another's (None entries must match), by the rule of
    fastrnn.testing: float64 directly; below it, against the float64 `truth`."""
    assert_all_close(actual, expected, truth, what)


def check_backend(backend, cell, case, reverse, options=None):
    """`backend`'s forward and backward against the reference backend's, under the same
    upstream gradients. Below float64 both are judged against the reference run in float64
    on the same rounded inputs (the truth). Returns the backend's (forward, backward)."""
    reference = backends.get("reference")
    fwd = run_forward(backend, cell, case, reverse, options)
    fwd_r = run_forward(reference, cell, case, reverse, options)
    grads = upstream(fwd_r)
    bwd = run_backward(backend, cell, case, reverse, fwd, grads, options)
    bwd_r = run_backward(reference, cell, case, reverse, fwd_r, grads, options)
    truth_fwd = truth_bwd = None
    if case["xproj"].dtype != torch.float64:
        case64, options64 = to_float64(case), to_float64(options)
        truth_fwd = run_forward(reference, cell, case64, reverse, options64)
        truth_bwd = run_backward(reference, cell, case64, reverse, truth_fwd,
                                 to_float64(grads), options64)
    compare_all(fwd, fwd_r, f"{cell} forward", truth_fwd)
    compare_all(bwd, bwd_r, f"{cell} backward", truth_bwd)
    return fwd, bwd
