"""The op boundary: one generic recurrence op per cell kind, registered with torch.library.

Ops (namespace ``fastrnn``), for cell in lstm, gru, rnn_tanh, rnn_relu::

    lstm_forward(Tensor xproj, Tensor h0, Tensor c0, Tensor w_hh, Tensor? b_hh, Tensor? w_hr,
                 Tensor? batch_sizes, bool reverse, str backend)
        -> (Tensor output, Tensor h_n, Tensor c_n, Tensor workspace)
    lstm_backward(Tensor grad_output, Tensor grad_h_n, Tensor grad_c_n, Tensor h0, Tensor c0,
                  Tensor w_hh, Tensor? b_hh, Tensor? w_hr, Tensor? batch_sizes, bool reverse,
                  Tensor output, Tensor workspace, str backend)
        -> (Tensor grad_xproj, Tensor grad_h0, Tensor grad_c0, Tensor grad_w_hh,
            Tensor grad_b_hh, Tensor grad_w_hr)
    {gru,rnn_tanh,rnn_relu}_forward(Tensor xproj, Tensor h0, Tensor w_hh, Tensor? b_hh,
                 Tensor? batch_sizes, bool reverse, str backend)
        -> (Tensor output, Tensor h_n, Tensor workspace)
    {gru,rnn_tanh,rnn_relu}_backward(Tensor grad_output, Tensor grad_h_n, Tensor h0, Tensor w_hh,
                  Tensor? b_hh, Tensor? batch_sizes, bool reverse, Tensor output,
                  Tensor workspace, str backend)
        -> (Tensor grad_xproj, Tensor grad_h0, Tensor grad_w_hh, Tensor grad_b_hh)

Shapes (G gates: lstm 4, gru 3, rnn 1; H hidden; P = proj_size if w_hr is given else H):

- ``xproj`` [N, G*H]: the input projection ``x @ w_ih.T + b_ih`` of every step, rows in
  packed time-major order: step t occupies rows ``offset[t] : offset[t] + batch_sizes[t]``
  with ``offset[t] = sum(batch_sizes[:t])``. Without ``batch_sizes`` every step has B rows
  (N = T*B, a plain [T, B, G*H] tensor viewed as [T*B, G*H]). Gate order as torch.nn:
  lstm (i, f, g, o), gru (r, z, n).
- ``h0`` [B, P], ``c0`` [B, H]: initial state, always given (zeros when the user gave none).
- ``w_hh`` [G*H, P], ``b_hh`` [G*H] or None, ``w_hr`` [P, H] or None (lstm only).
- ``batch_sizes``: None or a CPU int64 tensor [T] as in ``PackedSequence``: non-increasing,
  ``batch_sizes[0] == B``, sum N. Row b of a step is sequence b of the (sorted) batch, so at
  step t only the first ``batch_sizes[t]`` sequences are live: no work on padding.
- ``reverse``: process steps T-1 .. 0. A sequence of length L then starts at step L-1 from
  h0 and ends at step 0; without reverse it ends at step L-1. ``h_n``/``c_n`` hold every
  sequence's state after its own last step.
- ``output`` [N, P]: the hidden state (after projection) of every row.
- ``workspace`` [N, W]: what backward needs, in a layout every backend shares, so any
  backend's backward can consume any backend's forward. Its dtype is float32 for
  float16/bfloat16 inputs, else the input dtype. Columns:
    lstm: [i | f | g | o | c] activated gates and the new cell state, 5H, plus [h] the
          hidden state before the projection (H more) when w_hr is given;
    gru:  [r | z | n | hn] activated gates and hn = h_prev @ W_hn.T + b_hn, 4H;
    rnn:  nothing (W = 0): the derivative is read off ``output``.
- ``need_workspace`` (the forward's last argument, after the variant options; default
  True): False says no backward will follow (``recurrence`` passes it when no input needs
  a gradient), and the workspace comes back empty [0, W]; the native kernels then keep one
  step of it as scratch instead of all N rows. Backward of such a forward raises.
- Backward returns the gradient of every tensor input, in input dtype; ``grad_b_hh`` [G*H]
  is returned even when b_hh is None (callers ignore it), ``grad_w_hr`` is an empty [0]
  tensor when w_hr is None.

Variant options (issue #8; lstm and gru only, see fastrnn.variants). Trailing schema
arguments after ``backend``, all defaulting to None (= off, the recurrence above bit for bit)::

    lstm: Tensor? ln_weight, Tensor? ln_bias, Tensor? ln_c_weight, Tensor? ln_c_bias,
          Tensor? recurrent_mask, Tensor? zoneout_h, Tensor? zoneout_c,
          float? cell_clip, float? proj_clip, float? grad_clip
    gru:  Tensor? ln_weight, Tensor? ln_bias, Tensor? recurrent_mask, Tensor? zoneout_h,
          float? grad_clip

Backward takes the same and returns after the usual gradients grad_ln_weight, grad_ln_bias
(and for lstm grad_ln_c_weight, grad_ln_c_bias), empty [0] where absent. Shapes: ln_weight,
ln_bias [G*H]; ln_c_weight, ln_c_bias [H] (each pair both or neither); recurrent_mask [B, P];
zoneout_h [N, P]; zoneout_c [N, H]; input dtype. Clips are positive; proj_clip needs w_hr;
grad_clip only acts in backward (forward carries it for autograd). One step, on its live rows::

    h_rec = h_prev * recurrent_mask          (the GEMM's input only)
    a     = h_rec @ w_hh.T
    hh    = LN(a) * ln_weight + ln_bias  (+ b_hh)   LN: row mean / biased variance over G*H,
                                                     eps 1e-5: a_hat = (a - mean) * rstd
    lstm: gates as before from xp + hh; c_new = clamp(f * c_prev + i * g, +-cell_clip)
          h_new = o * tanh(LN(c_new) * ln_c_weight + ln_c_bias)       (LN over H)
          with w_hr: h_pre = h_new; h_new = clamp(h_pre @ w_hr.T, +-proj_clip)
    gru:  gates as before from xp + hh, h_new = (1 - z) * n + z * h_prev   (h_prev unmasked)
    zoneout: h_t = (1 - z_h) * h_new + z_h * h_prev; c_t = (1 - z_c) * c_new + z_c * c_prev
          (z = this row of zoneout_h / zoneout_c; exactly this form so 1 keeps prev bit for bit)
    output = h_t; the carried state (and h_n, c_n) is (h_t, c_t).

Workspace columns appended, each only when its option is on, in this order:
lstm [i|f|g|o|c] (c = c_t, the carried cell state) [h_pre] [a_hat (G*H) | rstd (1)]
[c_hat (H) | rstd_c (1)] [p (P): projection before proj_clip]; gru [r|z|n|hn] [a_hat | rstd].
(fastrnn.spec.workspace_layout gives the column ranges.)

Backward of a step (zoneout first): dh_new = (1 - z_h) * dh_t, dh_prev gets z_h * dh_t (same
for c); the proj_clip mask |p| <= proj_clip and the cell_clip mask |f*c_prev + i*g| <=
cell_clip (recomputed) zero the gradient where the forward clamped; the LN backward is
rstd * (g - mean(g) - x_hat * mean(g * x_hat)); with grad_clip every gate pre-activation
gradient is clamped to +-grad_clip where it is formed (gru: d_n, then d_r from the clamped
d_n, d_z), before it reaches xproj, the LN, w_hh and h_prev; grad_w_hh = sum d_a^T h_rec and
dh_prev = (d_a @ w_hh) * recurrent_mask + the direct terms. The reference backend
(fastrnn/backends/reference.py) is this text in code.

``backend`` names the backend whose kernels run (``reference``, ``native``, ``triton``); it
is resolved by the caller (``fastrnn.backends.resolve``), never ``auto`` here.

Double backward. The backward ops are not differentiable (their kernels write into
preallocated outputs). The forward op's autograd therefore has three paths: a plain backward
(create_graph=False) calls the backward op of ``backend``, as always; a backward with
create_graph=True runs the reference backend's explicit backward in plain torch ops on the
saved tensors, which autograd records; and the gradient that graph then sends into the
forward's ``output`` and ``workspace`` comes back to the forward op's autograd, which handles a
workspace gradient by autograd through the reference forward recomputed with the workspace's
gate values (``known_gates``: the forward keeps no xproj, and every value that depends on it
passes through a gate activation). Derivatives of third order and any double backward with
``grad_clip`` (which changes the first derivative by design) raise.
"""
from __future__ import annotations

from typing import Optional

import torch

from . import backends, spec
from .spec import CELLS, Cell, accumulate_dtype

Tensor = torch.Tensor

_lib = torch.library.Library("fastrnn", "FRAGMENT")


def _schemas(kind: Cell):
    c_in = "Tensor c0, " if kind.has_cell_state else ""
    proj = "Tensor? w_hr, " if kind.has_projection else ""
    c_n = "Tensor c_n, " if kind.has_cell_state else ""
    forward = (f"{kind.name}_forward(Tensor xproj, Tensor h0, {c_in}Tensor w_hh, Tensor? b_hh, "
               f"{proj}Tensor? batch_sizes, bool reverse, str backend) "
               f"-> (Tensor output, Tensor h_n, {c_n}Tensor workspace)")
    grad_c_n = "Tensor grad_c_n, " if kind.has_cell_state else ""
    grad_c0 = "Tensor grad_c0, " if kind.has_cell_state else ""
    grad_w_hr = ", Tensor grad_w_hr" if kind.has_projection else ""
    options = "".join(f", {'Tensor' if name in spec.TENSOR_FIELDS else 'float'}? {name}=None"
                      for name in spec.OPTION_FIELDS[kind.name])
    grad_options = "".join(f", Tensor grad_{name}" for name in spec.GRAD_FIELDS[kind.name])
    forward = forward.replace("str backend)",
                              f"str backend{options}, bool need_workspace=True)")
    backward = (f"{kind.name}_backward(Tensor grad_output, Tensor grad_h_n, {grad_c_n}Tensor h0, "
                f"{c_in}Tensor w_hh, Tensor? b_hh, {proj}Tensor? batch_sizes, bool reverse, "
                f"Tensor output, Tensor workspace, str backend{options}) -> (Tensor grad_xproj, "
                f"Tensor grad_h0, {grad_c0}Tensor grad_w_hh, Tensor grad_b_hh{grad_w_hr}"
                f"{grad_options})")
    return forward, backward


# The schemas differ per cell kind only in c0/c_n (lstm) and w_hr (lstm) and in the variant
# options; these adapters map the positional op arguments onto the uniform keyword form the
# backends take, and the trailing options onto a StepOptions (None when all are off).
_FORWARD_ARITY = {True: 9, False: 7}     # arguments up to ``backend``, by has_cell_state
_BACKWARD_ARITY = {True: 13, False: 10}


def _options(kind, args, arity, kwargs):
    names = spec.OPTION_FIELDS[kind.name]
    values = dict(zip(names, args[arity:]))
    values.update({k: v for k, v in kwargs.items() if k in names})
    return spec.make(kind.name, values)


def _forward_args(kind, args, kwargs=None):
    """-> (tensor arguments as keywords, backend, options, need_workspace)."""
    kwargs = kwargs or {}
    arity = _FORWARD_ARITY[kind.has_cell_state]
    if kind.has_cell_state:
        xproj, h0, c0, w_hh, b_hh, w_hr, batch_sizes, reverse, backend = args[:arity]
    else:
        (xproj, h0, w_hh, b_hh, batch_sizes, reverse, backend), c0, w_hr = args[:arity], None, None
    last = arity + len(spec.OPTION_FIELDS[kind.name])   # need_workspace, after the options
    need_workspace = args[last] if len(args) > last else kwargs.get("need_workspace", True)
    return (dict(xproj=xproj, h0=h0, c0=c0, w_hh=w_hh, b_hh=b_hh, w_hr=w_hr,
                 batch_sizes=batch_sizes, reverse=reverse), backend,
            _options(kind, args, arity, kwargs), bool(need_workspace))


def _backward_args(kind, args, kwargs=None):
    arity = _BACKWARD_ARITY[kind.has_cell_state]
    if kind.has_cell_state:
        (grad_output, grad_h_n, grad_c_n, h0, c0, w_hh, b_hh, w_hr, batch_sizes, reverse,
         output, workspace, backend) = args[:arity]
    else:
        (grad_output, grad_h_n, h0, w_hh, b_hh, batch_sizes, reverse, output, workspace,
         backend) = args[:arity]
        grad_c_n = c0 = w_hr = None
    return (dict(grad_output=grad_output, grad_h_n=grad_h_n, grad_c_n=grad_c_n, h0=h0, c0=c0,
                 w_hh=w_hh, b_hh=b_hh, w_hr=w_hr, batch_sizes=batch_sizes, reverse=reverse,
                 output=output, workspace=workspace), backend,
            _options(kind, args, arity, kwargs or {}))


def _check(kind: Cell, xproj, h0, c0, w_hh, b_hh, w_hr, batch_sizes, read_batch_sizes=True):
    """Shape checks for direct callers of the ops (the modules have checked already).
    The fake impl cannot read batch_sizes' values, so it checks shapes only."""
    gates = w_hh.shape[0] if w_hh.dim() == 2 else -1
    if gates < 0 or gates % kind.num_gates:
        raise ValueError(f"fastrnn.{kind.name}: w_hh must be [{kind.num_gates}*hidden, "
                         f"state], got {list(w_hh.shape)}")
    hidden = gates // kind.num_gates   # 0 is allowed: torch.nn's cells take hidden_size 0
    width = w_hr.shape[0] if w_hr is not None else hidden
    if w_hr is not None and (list(w_hr.shape) != [width, hidden] or not hidden):
        raise ValueError(f"fastrnn.{kind.name}: w_hr must be [proj, {hidden}] with a hidden "
                         f"size above 0, got {list(w_hr.shape)}")
    if w_hh.shape[1] != width:
        raise ValueError(f"fastrnn.{kind.name}: w_hh must have {width} columns, "
                         f"got {list(w_hh.shape)}")
    if xproj.dim() != 2 or xproj.shape[1] != gates:
        raise ValueError(f"fastrnn.{kind.name}: xproj must be [rows, {gates}], "
                         f"got {list(xproj.shape)}")
    if h0.dim() != 2 or h0.shape[1] != width:
        raise ValueError(f"fastrnn.{kind.name}: h0 must be [batch, {width}], "
                         f"got {list(h0.shape)}")
    batch = h0.shape[0]
    if c0 is not None and list(c0.shape) != [batch, hidden]:
        raise ValueError(f"fastrnn.{kind.name}: c0 must be [{batch}, {hidden}], "
                         f"got {list(c0.shape)}")
    if b_hh is not None and list(b_hh.shape) != [gates]:
        raise ValueError(f"fastrnn.{kind.name}: b_hh must be [{gates}], got {list(b_hh.shape)}")
    for name, tensor in (("h0", h0), ("c0", c0), ("w_hh", w_hh), ("b_hh", b_hh), ("w_hr", w_hr)):
        if tensor is not None and tensor.dtype != xproj.dtype:
            raise ValueError(f"fastrnn.{kind.name}: {name} dtype {tensor.dtype} does not match "
                             f"xproj dtype {xproj.dtype}")
    rows = xproj.shape[0]
    if batch_sizes is None:
        if (batch and rows % batch) or (not batch and rows):
            raise ValueError(f"fastrnn.{kind.name}: xproj has {rows} rows, not a multiple of "
                             f"the batch size {batch}")
        return
    if not read_batch_sizes:
        return
    # A malformed PackedSequence: RuntimeError, the type torch.nn's kernels raise for it.
    if batch_sizes.device.type != "cpu" or batch_sizes.dtype != torch.int64 \
            or batch_sizes.dim() != 1:
        raise RuntimeError("fastrnn: batch_sizes must be a 1-D int64 CPU tensor, got "
                           f"{batch_sizes.dtype} {list(batch_sizes.shape)} on "
                           f"{batch_sizes.device}")
    sizes = batch_sizes.tolist()
    # all zero is an empty batch (torch.nn returns empty results for it)
    if sizes and (sizes[0] != batch or any(b > a for a, b in zip(sizes, sizes[1:]))
                  or sizes[-1] < min(batch, 1)):
        raise RuntimeError(f"fastrnn: batch_sizes must be positive and non-increasing with "
                           f"batch_sizes[0] == batch ({batch}), got {sizes}")
    if sum(sizes) != rows:
        raise RuntimeError(f"fastrnn: batch_sizes sum to {sum(sizes)} but the input has "
                           f"{rows} rows")


def _resolve(name, kind, xproj, w_hh, w_hr, options):
    hidden = w_hh.shape[0] // kind.num_gates
    proj = 0 if w_hr is None else w_hr.shape[0]
    if name == "auto":
        return backends.resolve("auto", kind.name, xproj.device, xproj.dtype, hidden, proj,
                                spec.features(options))
    return name


def _fresh(result, inputs):
    """Outputs of a custom op may not alias its inputs (a backend may hand back h0 itself when
    there is nothing to do, e.g. zero steps)."""
    ptrs = {t.untyped_storage().data_ptr() for t in inputs
            if isinstance(t, Tensor) and t.numel()}
    return tuple(r.clone() if r.numel() and r.untyped_storage().data_ptr() in ptrs else r
                 for r in result)


def _register(kind: Cell):
    forward_schema, backward_schema = _schemas(kind)
    _lib.define(forward_schema)
    _lib.define(backward_schema)
    forward_name = f"fastrnn::{kind.name}_forward"
    backward_name = f"fastrnn::{kind.name}_backward"
    grad_fields = spec.GRAD_FIELDS[kind.name]

    def check_options(kw, options):
        hidden = kw["w_hh"].shape[0] // kind.num_gates
        spec.check(kind.name, options, kw["xproj"].shape[0], kw["h0"].shape[0], hidden,
                       kw["h0"].shape[1], kw["w_hr"] is not None, kw["xproj"].dtype)

    def forward_impl(*args, **kwargs):
        kw, backend, options, need_workspace = _forward_args(kind, args, kwargs)
        _check(kind, kw["xproj"], kw["h0"], kw["c0"], kw["w_hh"], kw["b_hh"], kw["w_hr"],
               kw["batch_sizes"])
        check_options(kw, options)
        backend = _resolve(backend, kind, kw["xproj"], kw["w_hh"], kw["w_hr"], options)
        extra = {} if options is None else {"options": options}
        output, h_n, c_n, workspace = backends.get(backend).forward(
            kind.name, **kw, **extra, need_workspace=need_workspace)
        if not need_workspace and workspace.shape[0] > 0:   # a backend that kept it anyway
            workspace = workspace.new_empty(0, workspace.shape[1])
        result = (output, h_n) + ((c_n,) if kind.has_cell_state else ()) + (workspace,)
        return _fresh(result, args)

    def backward_impl(*args, **kwargs):
        kw, backend, options = _backward_args(kind, args, kwargs)
        backend = _resolve(backend, kind, kw["output"], kw["w_hh"], kw["w_hr"], options)
        extra = {} if options is None else {"options": options}
        grads = backends.get(backend).backward(kind.name, **kw, **extra)
        grad_xproj, grad_h0, grad_c0, grad_w_hh, grad_b_hh, grad_w_hr = grads[:6]
        result = (grad_xproj, grad_h0) + ((grad_c0,) if kind.has_cell_state else ())
        result += (grad_w_hh, grad_b_hh)
        empty = kw["w_hh"].new_empty   # a fresh one for each absent gradient: no aliasing
        if kind.has_projection:
            result += (grad_w_hr if grad_w_hr is not None else empty(0),)
        option_grads = dict(zip(spec.GRAD_FIELDS["lstm"], grads[6:]))
        result += tuple(empty(0) if option_grads.get(name) is None else option_grads[name]
                        for name in grad_fields)
        return _fresh(result, args)

    def forward_fake(*args, **kwargs):
        kw, _, options, need_workspace = _forward_args(kind, args, kwargs)
        _check(kind, kw["xproj"], kw["h0"], kw["c0"], kw["w_hh"], kw["b_hh"], kw["w_hr"],
               kw["batch_sizes"], read_batch_sizes=False)
        check_options(kw, options)
        xproj, h0, w_hr = kw["xproj"], kw["h0"], kw["w_hr"]
        hidden = kw["w_hh"].shape[0] // kind.num_gates
        width = spec.workspace_width(kind.name, hidden, 0 if w_hr is None else w_hr.shape[0],
                                         spec.features(options))
        result = (xproj.new_empty(xproj.shape[0], h0.shape[1]), torch.empty_like(h0))
        if kind.has_cell_state:
            result += (torch.empty_like(kw["c0"]),)
        rows = xproj.shape[0] if need_workspace else 0
        return result + (xproj.new_empty(rows, width, dtype=accumulate_dtype(xproj.dtype)),)

    def backward_fake(*args, **kwargs):
        kw, _, options = _backward_args(kind, args, kwargs)
        output = kw["output"]
        result = (output.new_empty(output.shape[0], kw["w_hh"].shape[0]),
                  torch.empty_like(kw["h0"]))
        if kind.has_cell_state:
            result += (torch.empty_like(kw["c0"]),)
        result += (torch.empty_like(kw["w_hh"]), kw["w_hh"].new_empty(kw["w_hh"].shape[0]))
        if kind.has_projection:
            w_hr = kw["w_hr"]
            result += (torch.empty_like(w_hr) if w_hr is not None else kw["w_hh"].new_empty(0),)
        for name in grad_fields:
            value = None if options is None else getattr(options, name)
            result += (kw["w_hh"].new_empty(0) if value is None else torch.empty_like(value),)
        return result

    def setup_context(ctx, inputs, output):
        # Unused outputs get None, not zeros: a gradient of the workspace then only comes
        # from a double backward (see backward), and none is allocated otherwise.
        ctx.set_materialize_grads(False)
        kw, backend, options, ctx.need_workspace = _forward_args(kind, inputs)
        ctx.differentiated = False   # set when a backward ran with create_graph=True
        ctx.backend = backend
        ctx.batch_sizes, ctx.reverse = kw["batch_sizes"], kw["reverse"]
        ctx.has_bias, ctx.has_proj = kw["b_hh"] is not None, kw["w_hr"] is not None
        options = options or spec.StepOptions()
        ctx.option_values = [None if name in spec.TENSOR_FIELDS else getattr(options, name)
                             for name in spec.OPTION_FIELDS[kind.name]]
        ctx.save_for_backward(kw["h0"], kw["c0"], kw["w_hh"], kw["b_hh"], kw["w_hr"],
                              output[0], output[-1],
                              *[getattr(options, name) for name in spec.TENSOR_FIELDS])

    def backward(ctx, *grads):
        if not ctx.need_workspace:
            raise RuntimeError(
                f"fastrnn: this {kind.name} forward ran with need_workspace=False, which keeps "
                "nothing for backward; call it with need_workspace=True (the default) when "
                "gradients are needed")
        h0, c0, w_hh, b_hh, w_hr, output, workspace, *option_tensors = ctx.saved_tensors
        tensors = dict(zip(spec.TENSOR_FIELDS, option_tensors))
        option_args = [tensors[name] if name in tensors else value
                       for name, value in zip(spec.OPTION_FIELDS[kind.name],
                                              ctx.option_values)]
        grad_workspace = grads[-1]
        if ctx.differentiated and grad_workspace is not None and grad_workspace.numel():
            # The gradient _differentiable_backward's graph sends into the workspace (a
            # double backward). Elsewhere the workspace counts as not differentiable, as
            # tracers and direct callers of the op see it.
            return _workspace_backward(kind, ctx, grads, h0, c0, w_hh, b_hh, w_hr, output,
                                       workspace, option_args)
        if torch.is_grad_enabled():
            # create_graph=True: the gradient must be differentiable itself. The backward ops
            # are not (their kernels write into preallocated outputs), so the reference
            # backend's backward runs instead, in plain torch ops that autograd records. It
            # reads the forward's output and workspace, whose gradients come back to this
            # function (the branch above); the normal backward below stays as it was.
            ctx.differentiated = True
            return _differentiable_backward(kind, ctx, grads, h0, c0, w_hh, b_hh, w_hr,
                                            output, workspace, option_args)
        grad_output = _zeros_if_none(grads[0], output)
        grad_h_n = _zeros_if_none(grads[1], h0)
        args = (grad_output, grad_h_n)
        if kind.has_cell_state:
            args += (_zeros_if_none(grads[2], c0), h0, c0, w_hh, b_hh, w_hr)
        else:
            args += (h0, w_hh, b_hh)
        args += (ctx.batch_sizes, ctx.reverse, output, workspace, ctx.backend, *option_args)
        result = list(getattr(torch.ops.fastrnn, f"{kind.name}_backward")(*args))
        return _input_grads(kind, ctx, result, option_args)

    _lib.impl(f"{kind.name}_forward", forward_impl, "CompositeExplicitAutograd")
    _lib.impl(f"{kind.name}_backward", backward_impl, "CompositeExplicitAutograd")
    torch.library.register_fake(forward_name, forward_fake, lib=_lib)
    torch.library.register_fake(backward_name, backward_fake, lib=_lib)
    torch.library.register_autograd(forward_name, backward, setup_context=setup_context,
                                    lib=_lib)


def _zeros_if_none(grad: Optional[Tensor], like: Tensor) -> Tensor:
    return torch.zeros_like(like) if grad is None else grad


def _input_grads(kind: Cell, ctx, result, option_args):
    """The forward op's input gradients (None where an input takes none) from the backward
    op's results ``result`` (a list in that op's schema order)."""
    grad_fields = spec.GRAD_FIELDS[kind.name]
    n_state = 2 if kind.has_cell_state else 1
    grad_xproj, grad_state = result[0], result[1:1 + n_state]
    grad_w_hh, grad_b_hh = result[1 + n_state], result[2 + n_state]
    grads_in = [grad_xproj, *grad_state, grad_w_hh, grad_b_hh if ctx.has_bias else None]
    if kind.has_projection:
        grads_in.append(result[3 + n_state] if ctx.has_proj else None)
    grads_in += [None, None, None]  # batch_sizes, reverse, backend
    option_grads = dict(zip(grad_fields, result[len(result) - len(grad_fields):]))
    for name, value in zip(spec.OPTION_FIELDS[kind.name], option_args):
        given = name in spec.TENSOR_FIELDS and value is not None
        grads_in.append(option_grads[name] if given and name in option_grads else None)
    return tuple(grads_in) + (None,)  # need_workspace


def _double_backward_check(kind: Cell, option_args):
    grad_clip = dict(zip(spec.OPTION_FIELDS[kind.name], option_args)).get("grad_clip")
    if grad_clip is not None:
        # The clip makes the first-order gradient something other than the forward's
        # derivative, so no second derivative is the true one: refuse rather than pick one.
        raise RuntimeError(
            f"fastrnn: double backward (create_graph=True) of the {kind.name} recurrence is "
            f"not defined with recurrent_grad_clip (grad_clip={grad_clip}), which clamps the "
            "gate gradients inside backward; turn recurrent_grad_clip off (e.g. clip with "
            "torch.nn.utils.clip_grad_norm_ after backward) to take second derivatives")


def _backend_grads_to_op(kind: Cell, grads, like: Tensor):
    """A backend's backward results (fastrnn.backends.base) in the backward op's order, with
    zeros for absent gradients as that op returns."""
    grad_xproj, grad_h0, grad_c0, grad_w_hh, grad_b_hh, grad_w_hr = grads[:6]
    result = [grad_xproj, grad_h0] + ([grad_c0] if kind.has_cell_state else [])
    result += [grad_w_hh, grad_b_hh]
    if kind.has_projection:
        result.append(like.new_empty(0) if grad_w_hr is None else grad_w_hr)
    option_grads = dict(zip(spec.GRAD_FIELDS["lstm"], grads[6:]))
    result += [like.new_empty(0) if option_grads.get(name) is None else option_grads[name]
               for name in spec.GRAD_FIELDS[kind.name]]
    return result


def _differentiable_backward(kind: Cell, ctx, grads, h0, c0, w_hh, b_hh, w_hr, output,
                             workspace, option_args):
    """The backward under create_graph=True: the reference backend's explicit backward (plain
    torch ops) on the saved tensors, so autograd records it."""
    _double_backward_check(kind, option_args)
    options = spec.make(kind.name, dict(zip(spec.OPTION_FIELDS[kind.name],
                                                option_args)))
    extra = {} if options is None else {"options": options}
    result = backends.get("reference").backward(
        kind.name, _zeros_if_none(grads[0], output), _zeros_if_none(grads[1], h0),
        _zeros_if_none(grads[2], c0) if kind.has_cell_state else None, h0, c0, w_hh, b_hh,
        w_hr, ctx.batch_sizes, ctx.reverse, output, workspace, **extra)
    return _input_grads(kind, ctx, _backend_grads_to_op(kind, result, w_hh), option_args)


def _workspace_backward(kind: Cell, ctx, grads, h0, c0, w_hh, b_hh, w_hr, output,
                        workspace, option_args):
    """The backward when the workspace has a gradient (a double backward, through
    _differentiable_backward): autograd through the reference forward, recomputed from the
    saved inputs with the saved gate values (the reference backend's ``known_gates``), since
    the input projection is not kept. The recompute gives first derivatives only."""
    if torch.is_grad_enabled():
        raise RuntimeError(
            f"fastrnn: the {kind.name} recurrence has first and second derivatives, not "
            "third or higher: take the second derivative with create_graph=False")
    _double_backward_check(kind, option_args)
    names = spec.OPTION_FIELDS[kind.name]
    leaf = lambda t: None if t is None else t.detach().requires_grad_()  # noqa: E731
    learnable = set(spec.GRAD_FIELDS[kind.name])
    options = spec.make(kind.name, {
        name: leaf(value) if name in learnable else value
        for name, value in zip(names, option_args)})
    gates = spec.workspace_layout(
        kind.name, w_hh.shape[0] // kind.num_gates, 0 if w_hr is None else w_hr.shape[0],
        spec.features(options))["gates"]
    xproj = output.new_zeros(output.shape[0], w_hh.shape[0], requires_grad=True)  # not read
    inputs = [xproj, leaf(h0), leaf(c0), leaf(w_hh), leaf(b_hh), leaf(w_hr)]
    inputs += [None if options is None else getattr(options, name)
               for name in spec.GRAD_FIELDS["lstm"]]
    with torch.enable_grad():
        recomputed = backends.get("reference").forward(
            kind.name, *inputs[:6], ctx.batch_sizes, ctx.reverse, options=options,
            known_gates=workspace[:, gates])
    pairs = [(value, grad) for value, grad in zip(
        [value for value in recomputed if value is not None], grads)
        if grad is not None and value.requires_grad]
    wanted = [t for t in inputs if t is not None]
    found = iter(torch.autograd.grad([v for v, _ in pairs], wanted, [g for _, g in pairs],
                                     allow_unused=True) if pairs else [None] * len(wanted))
    result = []
    for tensor in inputs:
        grad = None if tensor is None else next(found)
        result.append(torch.zeros_like(tensor) if tensor is not None and grad is None else grad)
    if result[4] is None:
        result[4] = w_hh.new_zeros(w_hh.shape[0])
    return _input_grads(kind, ctx, _backend_grads_to_op(kind, result, w_hh), option_args)


for _kind in CELLS.values():
    _register(_kind)


def recurrence(cell: str, xproj: Tensor, h0: Tensor, c0: Optional[Tensor], w_hh: Tensor,
               b_hh: Optional[Tensor], w_hr: Optional[Tensor], batch_sizes: Optional[Tensor],
               reverse: bool, backend: str,
               options: Optional[spec.StepOptions] = None):
    """Run the ``cell`` op; returns (output, h_n, c_n or None). Differentiable.
    ``options``: the variant options (lstm and gru only), None for the plain recurrence."""
    kind = CELLS[cell]
    op = getattr(torch.ops.fastrnn, f"{cell}_forward")
    # Without a gradient to compute, the op keeps no workspace for backward (less memory,
    # and the native kernels skip writing it). A trace keeps it: it is replayed with and
    # without grad (torch.jit.trace checks it by tracing again without grad).
    need_workspace = torch.jit.is_tracing() or (torch.is_grad_enabled() and any(
        isinstance(t, Tensor) and t.requires_grad
        for t in (xproj, h0, c0, w_hh, b_hh, w_hr, *(options or ()))))
    extra = ()
    if options is not None:
        foreign = [name for name, value in options._asdict().items()
                   if value is not None and name not in spec.OPTION_FIELDS[cell]]
        if foreign:
            raise ValueError(f"fastrnn: the {cell} op has no option {', '.join(foreign)}")
        extra = tuple(getattr(options, name) for name in spec.OPTION_FIELDS[cell])
    if kind.has_cell_state:
        output, h_n, c_n, _ = op(xproj, h0, c0, w_hh, b_hh, w_hr, batch_sizes, reverse, backend,
                                 *extra, need_workspace=need_workspace)
        return output, h_n, c_n
    output, h_n, _ = op(xproj, h0, w_hh, b_hh, batch_sizes, reverse, backend, *extra,
                        need_workspace=need_workspace)
    return output, h_n, None
