"""Is a provider's result right? Compared with the baseline (torch.nn) before any timing, by
fastrnn.testing's rule (docs/tolerance.md), tensor by tensor (outputs, final states,
gradients); a result's error is that of its worst tensor relative to its allowance.

- float64: within 1e-10 of the baseline, relative to max(1, max |baseline|).
- float32, float16, bfloat16: against the *gold* result (the baseline's module in float64 on
  the same rounded weights, inputs and upstream gradients), at most twice the baseline's own
  error plus a few ulps. A result within those few ulps of the baseline itself is right
  without computing the gold (it cannot be further from the gold than the rule allows).
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Mapping, Optional

import torch

from fastrnn import testing


@dataclasses.dataclass
class Verdict:
    ok: bool
    error: float          # the provider's error (against baseline, or gold when used)
    tolerance: float
    against: str          # "baseline" or "gold"
    worst: str            # name of the tensor with the largest error relative to its allowance
    message: str = ""


def _problem(got: Mapping[str, torch.Tensor], want: Mapping[str, torch.Tensor]):
    """(name, what is wrong) when the result cannot be compared, else None."""
    if set(got) != set(want):
        return "", f"returns {sorted(got)}, expected {sorted(want)}"
    for name, b in want.items():
        a = got[name]
        if a.shape != b.shape:
            return name, f"{name} has shape {tuple(a.shape)}, expected {tuple(b.shape)}"
        if a.dtype != b.dtype:
            return name, f"{name} is {a.dtype}, expected {b.dtype}"
        if not torch.isfinite(a).all() and torch.isfinite(b).all():
            return name, f"{name} has non-finite values"
    return None


def _judge_all(result, baseline, truth, against) -> Verdict:
    worst = None
    for name in baseline:
        v = testing.check(result[name].detach(), baseline[name].detach(),
                          None if truth is None else truth[name].detach().double(), name)
        if worst is None or not v.ok or \
                v.error * worst[1].tolerance > worst[1].error * v.tolerance:
            worst = (name, v)
        if not v.ok:
            break
    if worst is None:   # nothing to compare
        return Verdict(True, 0.0, 0.0, against, "")
    name, v = worst
    return Verdict(v.ok, v.error, v.tolerance, against, name, v.message)


def judge(result: Mapping[str, torch.Tensor], baseline: Mapping[str, torch.Tensor],
          dtype: torch.dtype, gold: Optional[Callable[[], Mapping[str, torch.Tensor]]]) -> Verdict:
    """Decide whether ``result`` is right; ``gold()`` is called (and should be cached) if needed."""
    problem = _problem(result, baseline)
    if problem:
        return Verdict(False, float("inf"), 0.0, "baseline", *problem)
    if dtype == torch.float64:
        return _judge_all(result, baseline, None, "baseline")
    # Within the floor of the baseline itself: the gold is not needed.
    floor_only = {k: v.detach().double() for k, v in baseline.items()}
    verdict = _judge_all(result, baseline, floor_only, "baseline")
    if verdict.ok or gold is None:
        if not verdict.ok:
            verdict.message += " (no higher-precision result to judge it against)"
        return verdict
    return _judge_all(result, baseline, gold(), "gold")


def approximation(result: Mapping[str, torch.Tensor],
                  baseline: Mapping[str, torch.Tensor]) -> dict:
    """The check record of a reduced-precision provider (Case.approximate): its largest
    absolute error against the baseline over every tensor, or what keeps them apart."""
    problem = _problem(result, baseline)
    if problem:
        return {"error": float("inf"), "against": "baseline", "worst": problem[0],
                "message": problem[1]}
    errors = {name: (result[name].detach().double() - b.detach().double()).abs().max().item()
              if b.numel() else 0.0 for name, b in baseline.items()}
    worst = max(errors, key=errors.get)
    return {"max_abs_error": errors[worst], "against": "baseline (reduced precision: not "
            "judged)", "worst": worst}


def check_provider(case, name: str, result: Mapping[str, torch.Tensor],
                   baseline: Mapping[str, torch.Tensor]):
    """(check record, why it is wrong or None) of provider ``name`` of ``case`` against the
    baseline's result: a reduced-precision provider (Case.approximate) records its error, any
    other is judged by the tolerance rule."""
    if name in case.approximate:
        record = approximation(result, baseline)
        return record, record.get("message")
    verdict = judge(result, baseline, case.dtype, case.gold)
    record = {"error": verdict.error, "tolerance": verdict.tolerance,
              "against": verdict.against, "worst": verdict.worst}
    return record, None if verdict.ok else verdict.message
