"""Teacher forcing ratio schedules: small callables mapping a training step to the
probability of feeding the ground truth (scheduled sampling, Bengio et al. 2015)."""
from __future__ import annotations

import math


class Constant:
    """The same ratio at every step."""

    def __init__(self, ratio: float = 1.0):
        _check_ratio("ratio", ratio)
        self.ratio = float(ratio)

    def __call__(self, step: int) -> float:
        return self.ratio

    def __repr__(self) -> str:
        return f"Constant(ratio={self.ratio})"


class Linear:
    """From ``start`` down to ``end`` linearly over ``steps`` training steps, then ``end``.
    Bengio et al.'s max(eps, k - c * i) is Linear(start=k, end=eps, steps=(k - eps) / c)."""

    def __init__(self, steps: int, start: float = 1.0, end: float = 0.0):
        _check_ratio("start", start)
        _check_ratio("end", end)
        if not steps > 0:
            raise ValueError(f"steps must be > 0, got {steps!r}")
        self.steps, self.start, self.end = steps, float(start), float(end)

    def __call__(self, step: int) -> float:
        fraction = min(max(step, 0) / self.steps, 1.0)
        return self.start + (self.end - self.start) * fraction

    def __repr__(self) -> str:
        return f"Linear(steps={self.steps}, start={self.start}, end={self.end})"


class Exponential:
    """k ** step with 0 < k < 1 (Bengio et al.), never below ``minimum``."""

    def __init__(self, k: float, minimum: float = 0.0):
        if not 0.0 < k < 1.0:
            raise ValueError(f"Exponential decay needs 0 < k < 1, got k={k!r}")
        _check_ratio("minimum", minimum)
        self.k, self.minimum = float(k), float(minimum)

    def __call__(self, step: int) -> float:
        return max(self.k ** max(step, 0), self.minimum)

    def __repr__(self) -> str:
        return f"Exponential(k={self.k}, minimum={self.minimum})"


class InverseSigmoid:
    """k / (k + exp(step / k)) with k >= 1 (Bengio et al.): stays near 1 for about
    k * ln(k) steps, then falls; larger k decays later."""

    def __init__(self, k: float):
        if not k >= 1.0:
            raise ValueError(f"InverseSigmoid decay needs k >= 1, got k={k!r}")
        self.k = float(k)

    def __call__(self, step: int) -> float:
        x = max(step, 0) / self.k
        return self.k / (self.k + math.exp(x)) if x < 700 else 0.0  # exp overflows past ~709

    def __repr__(self) -> str:
        return f"InverseSigmoid(k={self.k})"


def _check_ratio(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be a probability in [0, 1], got {value!r}")
