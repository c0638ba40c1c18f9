"""Truncated backpropagation through time (TBPTT).

A long sequence is cut into windows; the hidden state is carried from one window to the
next with its gradient path cut (:func:`~fastrnn.train.state.detach_state`), so memory
and compute per update stay bounded while the forward values are those of one long run.

Vocabulary (Williams & Peng's BPTT(k2; k1), Sutskever 2013 §2.8.6): an update is made every
``k1`` steps and gradients flow back ``k2 >= k1`` steps. With ``k2 == k1`` (the common case,
``bptt=35`` in AWD-LSTM) windows do not overlap. With ``k2 > k1`` each window also covers
the ``k2 - k1`` steps before its ``k1`` loss steps: those *warm-up* steps are re-run from
the state saved when the previous window passed them, carry gradient, but get no loss.

Layouts: ``inputs`` is time-major ``[T, B, *]`` (default) or ``[B, T, *]`` with
``batch_first=True``; :func:`batchify` lays a 1-D token corpus out as B contiguous streams
``[T, B]``, as language-model loaders do, and :meth:`TBPTT.lm_chunks` cuts such a stream into
(input, next-token target) windows.

Typical loop (``model(x, state) -> (logits, state)``)::

    tbptt = TBPTT(k1=35, variable_length=True)
    step = TrainStep(optimizer, clip_norm=0.25)
    state = None
    for chunk in tbptt.lm_chunks(batchify(corpus, 20)):
        def loss_fn():
            logits, new_state = chunk.run(model, state)   # detaches `state` first
            loss = F.cross_entropy(logits.flatten(0, 1), chunk.loss_target.flatten())
            return loss, new_state
        state = step(loss_fn).extra

Long ``k2`` windows (thousands of steps of gradient) with fastrnn layers: ``TBPTT(k1, k2,
checkpoint_every="auto")`` runs the model's fastrnn LSTM/GRU/RNN layers with
``checkpoint_every`` while a window is computed, so the window's backward keeps about
``sqrt(k2)`` steps of history instead of ``k2`` (docs/long-sequences.md); the gradients are
those of the same window without it.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, Iterator, List, Optional, Tuple

import torch

from ..nn.rnn import RNNBase
from ..segments import check_every
from .state import detach_state, reset_state

Tensor = torch.Tensor


def batchify(data: Tensor, batch_size: int, batch_first: bool = False) -> Tensor:
    """Lay a 1-D corpus out as ``batch_size`` contiguous streams.

    The corpus is cut into ``batch_size`` equal pieces (the tail that does not divide
    evenly is dropped); piece ``b`` becomes column ``b`` of a ``[T, B]`` tensor (row ``b``
    of ``[B, T]`` with ``batch_first``). Consecutive TBPTT windows over the result then
    continue each stream where the previous window stopped, so carrying the state is right.
    """
    if data.dim() != 1:
        raise ValueError(f"batchify: data must be 1-D (a token stream), got shape {list(data.shape)}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batchify: batch_size must be a positive int, got {batch_size!r}")
    steps = data.numel() // batch_size
    if steps == 0:
        raise ValueError(f"batchify: a corpus of {data.numel()} tokens cannot fill {batch_size} streams")
    streams = data[: steps * batch_size].view(batch_size, steps)
    return streams.contiguous() if batch_first else streams.t().contiguous()


@dataclass
class Chunk:
    """One TBPTT window.

    Attributes:
        input: the window's inputs, same layout as the source (``[L, B, *]`` or ``[B, L, *]``).
        target: the matching targets, or None.
        start: absolute step of ``input``'s first step in the source.
        loss_from: number of leading warm-up steps (k2 > k1) that get no loss;
            the loss covers steps ``loss_from:`` of the window.
        carry_at: the state after this many steps starts the next window.
        resets: bool ``[L, B]`` (always time-major), True where a new sequence starts at that
            step in that stream, or None.
        fresh: the state passed to :meth:`run` is ignored and the window starts from
            zeros (first window of a batch of new sequences).
        lr_scale: loss steps / k1. AWD-LSTM multiplies the learning rate by it for
            variable-length windows so that every token has the same weight.
        batch_first: layout of ``input``/``target``.
        state_batch_dim: batch dimension of the model's state tensors (for resets).
        checkpoint_every: what :meth:`run` sets on the model's fastrnn RNN layers while it
            runs the window (None: their own setting); see :class:`TBPTT`.
    """

    input: Tensor
    target: Optional[Tensor]
    start: int
    loss_from: int
    carry_at: int
    resets: Optional[Tensor]
    fresh: bool
    lr_scale: float
    batch_first: bool = False
    state_batch_dim: int = 1
    checkpoint_every: Any = None

    @property
    def time_dim(self) -> int:
        return 1 if self.batch_first else 0

    @property
    def length(self) -> int:
        """Number of steps in the window (warm-up included)."""
        return self.input.size(self.time_dim)

    @property
    def loss_steps(self) -> int:
        return self.length - self.loss_from

    def loss_part(self, x: Tensor) -> Tensor:
        """Steps ``loss_from:`` of a window-long tensor laid out like ``input``."""
        return x.narrow(self.time_dim, self.loss_from, self.length - self.loss_from)

    @property
    def loss_target(self) -> Tensor:
        """The targets of the loss steps."""
        if self.target is None:
            raise ValueError("this chunk has no target: pass targets to TBPTT.chunks()")
        return self.loss_part(self.target)

    def run(self, model: Callable[[Tensor, Any], Tuple[Tensor, Any]], state: Any) -> Tuple[Tensor, Any]:
        """Run ``model(input, state) -> (output, state)`` over the window.

        The incoming state is detached first (the truncation). The forward is split where
        it must be: at ``carry_at`` (to save the next window's state when k2 > k1) and at
        every step where some stream starts a new sequence (its state is zeroed there);
        each piece starts from the previous piece's state, so values and gradients are
        those of one pass. With ``checkpoint_every`` set, ``model`` must be an ``nn.Module``
        holding fastrnn LSTM/GRU/RNN layers; they run with it during the call only.

        Returns:
            the output of the loss steps (``loss_part`` of the concatenated outputs; when
            the model returns a tuple of window-long tensors, a tuple of those), and the
            detached state to pass to the next chunk's ``run``.
        """
        state = None if self.fresh else detach_state(state)
        reset_steps = set()
        if self.resets is not None:
            reset_steps = set(torch.nonzero(self.resets.any(dim=1)).flatten().tolist())
        cuts = sorted({0, self.carry_at, self.length} | reset_steps)
        outputs: List[Tensor] = []
        carry = None
        with _checkpointing(model, self.checkpoint_every):
            for a, b in zip(cuts[:-1], cuts[1:]):
                if a == self.carry_at:
                    carry = detach_state(state)
                if a in reset_steps and state is not None:
                    state = reset_state(state, self.resets[a], self.state_batch_dim)
                output, state = model(self.input.narrow(self.time_dim, a, b - a), state)
                outputs.append(output)
        if self.carry_at == self.length:
            carry = detach_state(state)
        if isinstance(outputs[0], tuple):  # several window-long outputs: join each
            return tuple(self._join([o[i] for o in outputs]) for i in range(len(outputs[0]))), carry
        return self._join(outputs), carry

    def _join(self, pieces: List[Tensor]) -> Tensor:
        whole = pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=self.time_dim)
        return self.loss_part(whole)


@contextlib.contextmanager
def _checkpointing(model, every):
    """Run the fastrnn RNN layers of ``model`` with ``checkpoint_every=every`` inside."""
    if every is None:
        yield
        return
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"TBPTT(checkpoint_every={every!r}) sets it on the model's fastrnn "
                        f"LSTM/GRU/RNN layers, so Chunk.run needs the model as an nn.Module, "
                        f"got {type(model).__name__}")
    layers = [m for m in model.modules() if isinstance(m, RNNBase)]
    if not layers:
        others = [f"{name or 'model'} ({type(m).__name__})" for name, m in model.named_modules()
                  if isinstance(m, torch.nn.RNNBase)]
        found = f"; found torch.nn layers {', '.join(others)} (fastrnn.convert swaps them)" \
            if others else ""
        raise ValueError(f"TBPTT(checkpoint_every={every!r}): the model has no fastrnn "
                         f"LSTM/GRU/RNN layer{found}")
    saved = [m.checkpoint_every for m in layers]
    for m in layers:
        m.checkpoint_every = every
    try:
        yield
    finally:
        for m, value in zip(layers, saved):
            m.checkpoint_every = value


class TBPTT:
    """Cut sequences into truncated-BPTT windows.

    Args:
        k1: steps between updates (the loss steps of each window); the mean window length
            with ``variable_length``.
        k2: steps gradients flow back (``>= k1``); default ``k1``.
        batch_first: inputs/targets/resets are ``[B, T, ...]`` instead of ``[T, B, ...]``.
        variable_length: draw each window's loss length as AWD-LSTM does: the base is
            ``k1`` with probability ``1 - p_half`` and ``k1 / 2`` otherwise, the length is
            ``max(min_length, int(normal(base, std)))``. The last window takes what is left.
        std, p_half, min_length: parameters of that draw.
        generator: a ``torch.Generator`` for the draw (reproducible runs); default the
            global RNG.
        state_batch_dim: batch dimension of the model's state tensors, used when resetting
            streams (1 for torch.nn.LSTM/GRU/RNN, 0 for cells).
        checkpoint_every: for long ``k2`` windows: :meth:`Chunk.run` runs the model's
            fastrnn LSTM/GRU/RNN layers with this ``checkpoint_every`` (a positive int or
            ``"auto"``, k = sqrt of the piece's length) while it computes the window, and
            puts their own setting back afterwards. Backward then recomputes the window
            segment by segment: full BPTT over the window in memory of about ``sqrt(k2)``
            steps of history instead of ``k2``, with the gradients of the full-memory window
            (equal up to rounding). Outside the windows (evaluation, inference) the layers
            keep their own setting. None (default): leave the layers as they are (they may
            have their own ``checkpoint_every``). The model must be an ``nn.Module`` holding
            at least one fastrnn RNN layer.
    """

    def __init__(self, k1: int, k2: Optional[int] = None, *, batch_first: bool = False,
                 variable_length: bool = False, std: float = 5.0, p_half: float = 0.05,
                 min_length: int = 5, generator: Optional[torch.Generator] = None,
                 state_batch_dim: int = 1, checkpoint_every=None):
        if not isinstance(k1, int) or k1 < 1:
            raise ValueError(f"TBPTT: k1 must be a positive int, got {k1!r}")
        k2 = k1 if k2 is None else k2
        if not isinstance(k2, int) or k2 < k1:
            raise ValueError(f"TBPTT: k2 must be an int >= k1 = {k1}, got {k2!r}")
        if not 0.0 <= p_half <= 1.0:
            raise ValueError(f"TBPTT: p_half must be in [0, 1], got {p_half!r}")
        if std < 0:
            raise ValueError(f"TBPTT: std must be >= 0, got {std!r}")
        if not isinstance(min_length, int) or min_length < 1:
            raise ValueError(f"TBPTT: min_length must be a positive int, got {min_length!r}")
        self.k1, self.k2 = k1, k2
        self.batch_first = batch_first
        self.variable_length = variable_length
        self.std, self.p_half, self.min_length = std, p_half, min_length
        self.generator = generator
        self.state_batch_dim = state_batch_dim
        self.checkpoint_every = check_every("TBPTT", checkpoint_every)

    def _loss_length(self) -> int:
        if not self.variable_length:
            return self.k1
        g = self.generator
        base = self.k1 if torch.rand((), generator=g).item() >= self.p_half else self.k1 / 2
        drawn = torch.empty(()).normal_(base, self.std, generator=g).item()
        return max(self.min_length, int(drawn))

    def windows(self, total_steps: int) -> Iterator[Tuple[int, int, int, int]]:
        """Yield ``(window_start, loss_start, end, next_window_start)`` absolute steps."""
        warmup = self.k2 - self.k1
        s = 0
        while s < total_steps:
            e = min(total_steps, s + self._loss_length())
            yield max(0, s - warmup), s, e, max(0, e - warmup)
            s = e

    def chunks(self, inputs: Tensor, targets: Optional[Tensor] = None, *,
               resets: Optional[Tensor] = None, fresh_start: bool = True) -> Iterator[Chunk]:
        """Cut ``inputs`` (and aligned ``targets``/``resets``) into windows along time.

        Args:
            inputs: ``[T, B, *]`` (``[B, T, *]`` with ``batch_first``).
            targets: same time/batch layout, or None.
            resets: bool ``[T, B]`` (``[B, T]``), True where a sequence starts in a stream;
                :meth:`Chunk.run` zeroes that stream's state before the step.
            fresh_start: the first window starts from zeros, whatever state is passed
                (a new batch of sequences). Pass False to continue streams from a previous
                call (the next slice of the same streams).
        """
        tdim = 1 if self.batch_first else 0
        total = inputs.size(tdim)
        if targets is not None and targets.size(tdim) != total:
            raise ValueError(f"TBPTT.chunks: inputs have {total} steps but targets have "
                             f"{targets.size(tdim)} (time dim {tdim})")
        if resets is not None:
            if resets.dtype != torch.bool or resets.dim() != 2:
                raise ValueError(f"TBPTT.chunks: resets must be a 2-D bool tensor, got "
                                 f"dtype {resets.dtype} and shape {list(resets.shape)}")
            resets = resets.t() if self.batch_first else resets
            if resets.size(0) != total:
                raise ValueError(f"TBPTT.chunks: inputs have {total} steps but resets have "
                                 f"{resets.size(0)}")
        for w, s, e, nxt in self.windows(total):
            yield Chunk(
                input=inputs.narrow(tdim, w, e - w),
                target=None if targets is None else targets.narrow(tdim, w, e - w),
                start=w, loss_from=s - w, carry_at=nxt - w,
                resets=None if resets is None else resets[w:e],
                fresh=fresh_start and w == 0,
                lr_scale=(e - s) / self.k1,
                batch_first=self.batch_first, state_batch_dim=self.state_batch_dim,
                checkpoint_every=self.checkpoint_every)

    def lm_chunks(self, stream: Tensor, *, resets: Optional[Tensor] = None,
                  fresh_start: bool = True) -> Iterator[Chunk]:
        """Windows of a token stream ``[T, B]`` (from :func:`batchify`) for language
        modelling: the input is steps ``0..T-2``, the target the next token ``1..T-1``."""
        tdim = 1 if self.batch_first else 0
        steps = stream.size(tdim) - 1
        if steps < 1:
            raise ValueError(f"TBPTT.lm_chunks: a stream needs at least 2 steps, got {steps + 1}")
        inputs = stream.narrow(tdim, 0, steps)
        targets = stream.narrow(tdim, 1, steps)
        if resets is not None:
            resets = resets.narrow(1 if self.batch_first else 0, 0, steps)
        return self.chunks(inputs, targets, resets=resets, fresh_start=fresh_start)
