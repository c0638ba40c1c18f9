"""Numerical comparison against torch.nn, as fastrnn's tests and benchmark check use it.

One rule for every dtype (docs/tolerance.md explains why):

- float64: ``err(actual) <= 1e-10``, where ``err(x) = max|x - truth| / max(1, max|truth|)``
  and the truth is the baseline itself.
- float32, float16, bfloat16: ``err(actual) <= 2 * err(baseline) + floor``, errors taken
  against a float64 *truth* computed from the same rounded inputs (upcast the low-precision
  weights, inputs and upstream gradients with :func:`to_float64`, then run torch.nn, or the
  reference backend, or a hand-written loop, in float64). The baseline is torch.nn's own
  result in the same dtype (or the reference backend's where torch.nn cannot run the case);
  the floor is :data:`FLOOR_ULPS` units of the dtype's precision at the output's scale
  (32 for float32, i.e. 3.8e-6; 4 for float16 and bfloat16).

A fixed float32 bound does not hold across CPUs: summation order, SIMD width and BLAS path
change the rounding, so a correct kernel can be 1e-5 off on one machine and 1e-6 on another.
The rule above moves with the machine, because torch.nn's own error moves with it.

Use::

    from fastrnn.testing import assert_close, to_float64

    out = fast(x)                          # fastrnn, float32
    base = ref(x)                          # torch.nn, float32, same weights
    truth = copy.deepcopy(ref).double()(to_float64(x))
    assert_close(out, base, truth, what="output")
    # float64 cases need no truth: assert_close(out64, base64)

:func:`check` returns a :class:`Verdict` instead of raising; :func:`check_all` and
:func:`assert_all_close` take parallel sequences (or mappings) of tensors (``None`` entries
must match).
"""
from __future__ import annotations

import dataclasses
from typing import Mapping, Optional, Sequence, Union

import torch

__all__ = ["FLOAT64_TOLERANCE", "FLOOR_ULPS", "RATIO", "Verdict", "relative_error", "check",
           "assert_close", "check_all", "assert_all_close", "to_float64"]

FLOAT64_TOLERANCE = 1e-10
# err(actual) may be at most RATIO times the baseline's own error against the truth ...
RATIO = 2.0
# ... plus this many units of the dtype's precision (eps) at the output's scale: headroom for
# a tensor the baseline happens to get (nearly) exact. The test suite's cases are small (a
# few elements per tensor, up to 63 steps): one amplified rounding can decide a tensor's
# error, and the ratio of two correct results' errors is then a matter of chance. Measured
# over the suite's ~26000 such comparisons under three CPU capabilities, correct float32
# results needed up to 21 ulps beyond 2x (T=63 with every option); float16 / bfloat16 4.
FLOOR_ULPS = {torch.float32: 32, torch.float16: 4, torch.bfloat16: 4}

Tensors = Union[Sequence[Optional[torch.Tensor]], Mapping[str, Optional[torch.Tensor]]]


@dataclasses.dataclass
class Verdict:
    ok: bool
    error: float                      # err(actual) against the truth
    tolerance: float                  # what err(actual) may be
    baseline_error: Optional[float]   # err(baseline) against the truth; None for float64
    message: str = ""                 # why it failed ('' when ok)

    def __bool__(self):
        return self.ok


def relative_error(actual: torch.Tensor, truth: torch.Tensor) -> float:
    """max |actual - truth| / max(1, max |truth|), computed in float64 (NaN -> inf)."""
    if truth.numel() == 0:
        return 0.0
    a, t = actual.detach().double().cpu(), truth.detach().double().cpu()
    scale = max(1.0, t.abs().max().item())
    error = (a - t).abs().max().item() / scale
    return float("inf") if error != error else error


def _floor(dtype: torch.dtype) -> float:
    return FLOOR_ULPS.get(dtype, 4) * torch.finfo(dtype).eps


def check(actual: torch.Tensor, baseline: torch.Tensor,
          truth: Optional[torch.Tensor] = None, what: str = "") -> Verdict:
    """The verdict of the rule (module docstring) for one tensor. ``truth`` is required
    unless the baseline is float64 (then the baseline is the truth)."""
    prefix = f"{what}: " if what else ""
    if actual.shape != baseline.shape or actual.dtype != baseline.dtype:
        return Verdict(False, float("inf"), 0.0, None,
                       f"{prefix}{actual.dtype} {tuple(actual.shape)}, expected "
                       f"{baseline.dtype} {tuple(baseline.shape)}")
    dtype = baseline.dtype
    if dtype == torch.float64:
        error = relative_error(actual, baseline if truth is None else truth)
        ok = error <= FLOAT64_TOLERANCE
        return Verdict(ok, error, FLOAT64_TOLERANCE, None, "" if ok else
                       f"{prefix}error {error:.3g} > {FLOAT64_TOLERANCE:.0e} (float64, "
                       f"relative to max(1, max|expected|) = "
                       f"{max(1.0, baseline.abs().max().item() if baseline.numel() else 1.0):.3g})")
    if truth is None:
        raise ValueError(f"{prefix}a {dtype} comparison needs a float64 truth computed from the "
                         f"same rounded inputs (see fastrnn.testing)")
    if truth.dtype != torch.float64 or truth.shape != baseline.shape:
        raise ValueError(f"{prefix}the truth must be float64 of shape {tuple(baseline.shape)}, "
                         f"got {truth.dtype} {tuple(truth.shape)}")
    error = relative_error(actual, truth)
    baseline_error = relative_error(baseline, truth)
    tolerance = RATIO * baseline_error + _floor(dtype)
    ok = error <= tolerance
    return Verdict(ok, error, tolerance, baseline_error, "" if ok else
                   f"{prefix}error {error:.3g} against the float64 truth > {tolerance:.3g} "
                   f"({RATIO:g} x the baseline's {baseline_error:.3g} + "
                   f"{FLOOR_ULPS.get(dtype, 4)} ulps of {dtype})")


def assert_close(actual: torch.Tensor, baseline: torch.Tensor,
                 truth: Optional[torch.Tensor] = None, what: str = ""):
    """Raise AssertionError unless :func:`check` passes."""
    verdict = check(actual, baseline, truth, what)
    assert verdict.ok, verdict.message


def _items(values: Tensors):
    return list(values.items()) if isinstance(values, Mapping) else list(enumerate(values))


def check_all(actual: Tensors, baseline: Tensors, truth: Optional[Tensors] = None,
              what: str = "") -> Verdict:
    """:func:`check` over parallel sequences (or mappings with the same keys) of tensors;
    ``None`` entries must be ``None`` in both. Returns the first failure, else the verdict
    of the tensor with the largest error relative to its tolerance."""
    a_items, b_items = _items(actual), _items(baseline)
    t_items = None if truth is None else dict(_items(truth))
    if [k for k, _ in a_items] != [k for k, _ in b_items]:
        return Verdict(False, float("inf"), 0.0, None,
                       f"{what}: results {[k for k, _ in a_items]}, expected "
                       f"{[k for k, _ in b_items]}")
    worst = Verdict(True, 0.0, 0.0, None)
    for (key, a), (_, b) in zip(a_items, b_items):
        name = f"{what} {key}".strip()
        if (a is None) != (b is None):
            return Verdict(False, float("inf"), 0.0, None,
                           f"{name}: {'None' if a is None else 'a tensor'}, expected "
                           f"{'None' if b is None else 'a tensor'}")
        if a is None:
            continue
        verdict = check(a, b, None if t_items is None else t_items[key], name)
        if not verdict.ok:
            return verdict
        if verdict.error / max(verdict.tolerance, 1e-300) >= \
                worst.error / max(worst.tolerance, 1e-300):
            worst = verdict
    return worst


def assert_all_close(actual: Tensors, baseline: Tensors, truth: Optional[Tensors] = None,
                     what: str = ""):
    """Raise AssertionError unless :func:`check_all` passes."""
    verdict = check_all(actual, baseline, truth, what)
    assert verdict.ok, verdict.message


def to_float64(value):
    """The same values in float64, for computing the truth: floating tensors are upcast
    (exactly) and detached, keeping ``requires_grad``; tuples, lists, dicts and
    PackedSequence are converted element-wise; anything else is returned as it is."""
    if isinstance(value, torch.nn.utils.rnn.PackedSequence):
        return value._replace(data=to_float64(value.data))
    if isinstance(value, torch.Tensor):
        if not value.is_floating_point():
            return value
        return value.detach().double().requires_grad_(value.requires_grad)
    if isinstance(value, tuple) and hasattr(value, "_fields"):   # named tuples
        return type(value)(*[to_float64(v) for v in value])
    if isinstance(value, (tuple, list)):
        return type(value)(to_float64(v) for v in value)
    if isinstance(value, dict):
        return {k: to_float64(v) for k, v in value.items()}
    return value
