"""The native CPU ops' buffer pool (csrc/scratch.h): buffers kept between calls never change a
result and are never in two live tensors: calls of growing and shrinking sizes, a backward
after another forward of another size, two threads at once, results kept while later calls
run, and release_scratch().

The cases are large enough (buffers of 64 KiB and more) that their buffers come from the pool.
Skips when the extension cannot be built here, unless FASTRNN_REQUIRE_NATIVE=1 (CI).
"""
import os
import subprocess
import sys
import threading

import pytest
import torch

import fastrnn  # noqa: F401  (defines the public ops)
from fastrnn import backends
from fastrnn.backends.native import release_scratch, scratch_stats

import test_native_variants as variants
from backend_cases import make_case, native_available_mark, run_backward, run_forward, upstream

native = backends.get("native")
pytestmark = native_available_mark()

POOL_ON = os.environ.get("FASTRNN_NATIVE_POOL", "1")[:1] != "0"

# name: (cell, make_case arguments, option names), in sizes that grow, shrink and grow again.
CASES = {
    "lstm_h64": ("lstm", dict(hidden=64, batch=32, steps=12), ()),
    "lstm_h96": ("lstm", dict(hidden=96, batch=24, steps=20), ()),
    "gru_h48": ("gru", dict(hidden=48, batch=40, steps=10), ()),
    "lstm_proj": ("lstm", dict(hidden=80, proj=48, batch=32, steps=9), ()),
    "lstm_packed": ("lstm", dict(hidden=64, lengths=[30] * 4 + [25] * 8 + [17] * 4 + [9] * 8 +
                                 [4] * 4 + [1] * 4), ()),
    "ln_lstm": ("lstm", dict(hidden=72, batch=32, steps=8), ("layer_norm", "layer_norm_cell")),
    "lstm_options": ("lstm", dict(hidden=64, proj=40, batch=20, steps=7),
                     ("layer_norm", "peephole", "zoneout_h", "zoneout_c", "recurrent_mask",
                      "proj_clip")),
    "ln_gru": ("gru", dict(hidden=56, batch=32, steps=6), ("layer_norm", "zoneout_h")),
    "lstm_h64_f64": ("lstm", dict(hidden=64, batch=32, steps=12, dtype=torch.float64), ()),
}


def make(name, seed=0):
    cell, kwargs, option_names = CASES[name]
    case = make_case(cell, seed=seed, **{"dtype": torch.float32, **kwargs})
    options = variants.make_options(cell, case, option_names) if option_names else None
    return cell, case, options


def forward(name, seed=0):
    cell, case, options = make(name, seed)
    return run_forward(native, cell, case, False, options)


def backward(name, fwd, seed=0):
    cell, case, options = make(name, seed)
    return run_backward(native, cell, case, False, fwd, upstream(fwd), options)


def results(name, seed=0):
    """Forward (output, h_n, c_n) and every gradient of one call, as new tensors."""
    fwd = forward(name, seed)
    return tuple(None if t is None else t.clone() for t in fwd[:3] + backward(name, fwd, seed))


def assert_identical(actual, expected, what):
    assert len(actual) == len(expected), what
    for k, (a, e) in enumerate(zip(actual, expected)):
        assert (a is None) == (e is None), f"{what}: result {k}"
        if a is not None:
            assert a.dtype == e.dtype and torch.equal(a, e), f"{what}: result {k} differs"


FRESH_SCRIPT = """
import sys
sys.path[:0] = sys.argv[2].split("%s")
import torch
import test_native_scratch as t
torch.save({name: t.results(name) for name in t.CASES}, sys.argv[1])
""" % os.pathsep


@pytest.fixture(scope="module")
def fresh(tmp_path_factory):
    """Every case's results from a process with the pool off (FASTRNN_NATIVE_POOL=0: every
    buffer fresh from at::empty, as before the pool)."""
    path = tmp_path_factory.mktemp("fresh") / "results.pt"
    here = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, FASTRNN_NATIVE_POOL="0")
    result = subprocess.run([sys.executable, "-c", FRESH_SCRIPT, str(path),
                             os.pathsep.join([here] + sys.path)],
                            env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    return torch.load(path)


def test_results_do_not_depend_on_the_pool(fresh):
    """Growing, shrinking and growing sizes, every case twice, after a release too: the same
    bits as with every buffer fresh."""
    for name in list(CASES) + list(reversed(CASES)):
        assert_identical(results(name), fresh[name], name)
    release_scratch()
    for name in CASES:
        assert_identical(results(name), fresh[name], f"{name} after release_scratch")


def test_backward_after_other_forwards(fresh):
    """Forwards of every case first (their outputs and workspaces live together), then the
    backwards in another order."""
    names = list(CASES)
    fwds = {name: forward(name) for name in names}
    order = names[1::2] + names[0::2]
    for name in order:
        fwd = fwds[name]
        got = tuple(None if t is None else t.clone() for t in fwd[:3]) + backward(name, fwd)
        assert_identical(got, fresh[name], f"{name}, backward after other forwards")


def test_results_are_not_reused_while_alive():
    """A call's results (and the workspace kept for backward) stay as they were while later
    calls of the same and other sizes run: no two live tensors share a block."""
    fwd = forward("lstm_h64")
    kept = [t.clone() for t in fwd if t is not None]
    grads = backward("lstm_h64", fwd)
    kept_grads = [None if g is None else g.clone() for g in grads]
    later = [forward(name, seed=3) for name in CASES for _ in range(2)]
    later_grads = [backward("lstm_h64", forward("lstm_h64", seed=4), seed=4)]
    for t, k in zip([t for t in fwd if t is not None], kept):
        assert torch.equal(t, k)
    for g, k in zip(grads, kept_grads):
        assert g is None or torch.equal(g, k)
    live = [t for f in later for t in f if t is not None and t.numel() > 0]
    live += [g for g in later_grads[0] if g is not None and g.numel() > 0]
    mine = [t for t in list(fwd) + list(grads) if t is not None and t.numel() > 0]
    starts = {t.untyped_storage().data_ptr() for t in mine}
    assert not starts & {t.untyped_storage().data_ptr() for t in live}


def test_two_threads_at_once(fresh):
    """Two Python threads calling the ops at the same time each get their own buffers."""
    names = [["lstm_h64", "ln_lstm", "lstm_packed"], ["lstm_h96", "gru_h48", "lstm_options"]]
    errors = []
    start = threading.Barrier(2)

    def work(mine):
        try:
            start.wait()
            for _ in range(3):
                for name in mine:
                    assert_identical(results(name), fresh[name], f"{name} on a thread")
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(n,)) for n in names]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]


@pytest.mark.skipif(not POOL_ON, reason="FASTRNN_NATIVE_POOL=0: the pool is off")
def test_release_scratch_frees_the_cached_blocks():
    fwd = forward("lstm_h96")
    kept = fwd[0].clone()
    backward("lstm_h96", fwd)
    results("lstm_h64")
    before = scratch_stats()
    assert before["cached"] > 0 and before["in_use"] > 0   # fwd's tensors are alive
    assert before["peak"] >= before["cached"]
    release_scratch()
    after = scratch_stats()
    assert after["cached"] == 0 and after["in_use"] == before["in_use"]
    assert torch.equal(fwd[0], kept)   # live tensors keep their blocks
    del fwd
    assert scratch_stats()["in_use"] < after["in_use"]
