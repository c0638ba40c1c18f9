"""One optimisation step: forward + loss, backward, clip, (maybe skip), optimizer step."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable, List, Optional, Union

import torch

Tensor = torch.Tensor


def total_grad_norm(parameters: Iterable[Tensor], norm_type: float = 2.0) -> Tensor:
    """The norm of all gradients together (the norm of the per-tensor norms), exactly as
    :func:`torch.nn.utils.clip_grad_norm_` computes it, without changing the gradients.
    0 when no parameter has a gradient."""
    parameters = list(parameters)
    if hasattr(torch.nn.utils, "get_total_norm"):  # torch >= 2.6: clip_grad_norm_'s own code
        return torch.nn.utils.get_total_norm([p.grad for p in parameters if p.grad is not None],
                                             norm_type)
    grads = [p.grad.detach() for p in parameters if p.grad is not None]
    if not grads:
        return torch.tensor(0.0)
    device = grads[0].device
    norms = [torch.linalg.vector_norm(g, float(norm_type)).to(device) for g in grads]
    return torch.linalg.vector_norm(torch.stack(norms), float(norm_type))


def _clip_to_norm(parameters: List[Tensor], max_norm: float, total_norm: Tensor, norm_type: float) -> None:
    """Scale gradients so that their total norm is at most ``max_norm``, as clip_grad_norm_."""
    if hasattr(torch.nn.utils, "clip_grads_with_norm_"):  # torch >= 2.6
        torch.nn.utils.clip_grads_with_norm_(parameters, max_norm, total_norm)
    else:
        torch.nn.utils.clip_grad_norm_(parameters, max_norm, norm_type)


@dataclass
class StepResult:
    """What :class:`TrainStep` did.

    Attributes:
        loss: the loss value (a detached tensor).
        grad_norm: total gradient norm before clipping (a detached tensor).
        skipped: True when the step was skipped for a non-finite loss or gradient.
        extra: whatever the loss function returned next to the loss (or None).
    """

    loss: Tensor
    grad_norm: Tensor
    skipped: bool
    extra: Any = None


class TrainStep:
    """Runs training steps with gradient clipping and optional non-finite skipping.

    Args:
        optimizer: the optimizer to step.
        parameters: the parameters to clip and measure; default every parameter in the
            optimizer's param groups.
        clip_norm: clip the total gradient norm to this value
            (:func:`torch.nn.utils.clip_grad_norm_`), or None.
        clip_value: clamp every gradient element to ``[-clip_value, clip_value]``
            (:func:`torch.nn.utils.clip_grad_value_`), or None. May be combined with
            ``clip_norm`` (value clipping is applied first, then norm clipping; the
            reported norm is the one before any clipping).
        norm_type: the p of the p-norm (``inf`` for max-norm).
        skip_nonfinite: when the loss or the gradient norm is NaN/inf, do not step:
            the gradients are zeroed, the optimizer is not called, ``skipped`` is counted.
            Off by default: the update then goes ahead as PyTorch would (and poisons the
            weights), so a bad step is visible rather than silently dropped.
        set_to_none: passed to ``optimizer.zero_grad``.

    Call it with a function that does the forward and returns the loss, or a tuple
    ``(loss, extra)``; ``extra`` comes back in :class:`StepResult` (e.g. the new RNN state).
    Counters: ``steps`` (calls), ``skipped`` (steps skipped).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, parameters: Optional[Iterable[Tensor]] = None,
                 *, clip_norm: Optional[float] = None, clip_value: Optional[float] = None,
                 norm_type: Union[float, int, str] = 2.0, skip_nonfinite: bool = False,
                 set_to_none: bool = True):
        if clip_norm is not None and not clip_norm > 0:
            raise ValueError(f"TrainStep: clip_norm must be > 0 or None, got {clip_norm!r}")
        if clip_value is not None and not clip_value > 0:
            raise ValueError(f"TrainStep: clip_value must be > 0 or None, got {clip_value!r}")
        norm_type = float(norm_type)
        if not (norm_type > 0 or math.isinf(norm_type)):
            raise ValueError(f"TrainStep: norm_type must be > 0 or inf, got {norm_type!r}")
        self.optimizer = optimizer
        if parameters is None:
            parameters = [p for group in optimizer.param_groups for p in group["params"]]
        self.parameters = list(parameters)
        self.clip_norm, self.clip_value, self.norm_type = clip_norm, clip_value, norm_type
        self.skip_nonfinite = skip_nonfinite
        self.set_to_none = set_to_none
        self.steps = 0
        self.skipped = 0

    def __call__(self, loss_fn: Callable[[], Any]) -> StepResult:
        self.optimizer.zero_grad(set_to_none=self.set_to_none)
        returned = loss_fn()
        loss, extra = (returned if isinstance(returned, tuple) else (returned, None))
        if not isinstance(loss, Tensor) or loss.numel() != 1:
            raise ValueError("TrainStep: the loss function must return a scalar tensor "
                             "(or a tuple (loss, extra))")
        loss.backward()
        self.steps += 1

        grad_norm = total_grad_norm(self.parameters, self.norm_type)
        if self.skip_nonfinite and not (torch.isfinite(loss).item() and torch.isfinite(grad_norm).item()):
            self.optimizer.zero_grad(set_to_none=self.set_to_none)
            self.skipped += 1
            return StepResult(loss.detach(), grad_norm, True, extra)

        if self.clip_value is not None:
            torch.nn.utils.clip_grad_value_(self.parameters, self.clip_value)
        if self.clip_norm is not None:
            norm = grad_norm if self.clip_value is None else total_grad_norm(self.parameters, self.norm_type)
            _clip_to_norm(self.parameters, self.clip_norm, norm, self.norm_type)
        self.optimizer.step()
        return StepResult(loss.detach(), grad_norm, False, extra)
