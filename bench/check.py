"""Is a provider's result right? Compared with the baseline (torch.nn) before any timing.

Error of a tensor = max |a - b| / max |b| (relative to the tensor's largest value, so a
gradient that is small everywhere is not judged by another tensor's scale); a result's error
is the worst over its named tensors (outputs, final states, gradients).

- float32 / float64: right when the error against the baseline is <= 1e-5 / 1e-10 (the
  project's parity tolerance). Otherwise (long sequences accumulate rounding differently)
  it is judged against the *gold* result (the baseline in float64): right when its error is
  at most twice the baseline's own error, or within the plain tolerance.
- float16 / bfloat16: always against the gold (the baseline in float32): right when the
  error is at most twice the baseline's own same-dtype error (the flash-attention rule).
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Mapping, Optional

import torch

PLAIN_TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5}
# Headroom for a half-precision result whose baseline happens to be nearly exact.
HALF_FLOOR = 1e-6


@dataclasses.dataclass
class Verdict:
    ok: bool
    error: float          # the provider's error (against baseline, or gold when used)
    tolerance: float
    against: str          # "baseline" or "gold"
    worst: str            # name of the tensor with the largest error
    message: str = ""


def relative_error(got: Mapping[str, torch.Tensor], want: Mapping[str, torch.Tensor]):
    """(worst error, name of the worst tensor, problem or ''), error as in the module doc."""
    if set(got) != set(want):
        return float("inf"), "", f"returns {sorted(got)}, expected {sorted(want)}"
    worst, worst_name = 0.0, ""
    for name, b in want.items():
        a = got[name]
        if a.shape != b.shape:
            return float("inf"), name, f"{name} has shape {tuple(a.shape)}, expected {tuple(b.shape)}"
        a, b = a.detach().double().cpu(), b.detach().double().cpu()
        if not torch.isfinite(a).all() and torch.isfinite(b).all():
            return float("inf"), name, f"{name} has non-finite values"
        scale = b.abs().max().item() if b.numel() else 0.0
        err = (a - b).abs().max().item() if b.numel() else 0.0
        err = err / scale if scale > 0 else err
        if err > worst or not worst_name:
            worst, worst_name = err, name
    return worst, worst_name, ""


def judge(result: Mapping[str, torch.Tensor], baseline: Mapping[str, torch.Tensor],
          dtype: torch.dtype, gold: Optional[Callable[[], Mapping[str, torch.Tensor]]]) -> Verdict:
    """Decide whether ``result`` is right; ``gold()`` is called (and should be cached) if needed."""
    err, name, problem = relative_error(result, baseline)
    if problem:
        return Verdict(False, err, 0.0, "baseline", name, problem)
    plain = PLAIN_TOLERANCE.get(dtype)
    if plain is not None and err <= plain:
        return Verdict(True, err, plain, "baseline", name)
    if gold is None:
        tol = plain if plain is not None else 0.0
        return Verdict(False, err, tol, "baseline", name,
                       f"{name} off by {err:.2e} (relative), tolerance {tol:.0e}")
    reference = gold()
    base_err, _, _ = relative_error(baseline, reference)
    err, name, problem = relative_error(result, reference)
    if problem:
        return Verdict(False, err, 0.0, "gold", name, problem)
    tol = max(2 * base_err, plain) if plain is not None else 2 * base_err + HALF_FLOOR
    ok = err <= tol
    msg = "" if ok else (f"{name} off by {err:.2e} from the higher-precision result; "
                         f"allowed {tol:.2e} (2x torch.nn's own {base_err:.2e})")
    return Verdict(ok, err, tol, "gold", name, msg)
