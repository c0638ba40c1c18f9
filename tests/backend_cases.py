"""Random inputs for a backend's forward / backward (the op contract of fastrnn.ops), and the
calls, comparisons and skip rule the native tests share."""
import os

import pytest
import torch

from fastrnn import backends
from fastrnn.cells import CELLS

from parity import assert_close


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


def compare_all(actual, expected, dtype, what):
    assert len(actual) == len(expected), what
    for i, (a, e) in enumerate(zip(actual, expected)):
        assert (a is None) == (e is None), f"{what} {i}: {a} vs {e}"
        if a is not None:
            assert_close(a, e, dtype, f"{what} {i}")
