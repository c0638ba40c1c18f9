"""The op boundary: one generic recurrence op per cell kind, registered with torch.library.

``torch.ops.fastrnn.<cell>_forward`` / ``<cell>_backward`` for every cell of fastrnn.spec,
with one schema generated from the spec (``_schemas``). The contract (arguments, shapes, the
packed layout, the workspace, the math of every option, double backward) is
docs/op-contract.md; the reference backend (fastrnn/backends/reference.py) is it in code.
``recurrence`` is the differentiable entry point the modules call.
"""
from __future__ import annotations

import hashlib
from typing import Optional

import torch

from . import backends, spec
from .backends.base import fake_backward, fake_forward
from .spec import CELLS, Cell

Tensor = torch.Tensor

_lib = torch.library.Library("fastrnn", "FRAGMENT")


# Every cell's ops take the same arguments (absent ones None) and return the same results
# (absent ones empty [0]); the option arguments follow ``backend``, in spec order.
_FORWARD = ("xproj", "h0", "c0", "w_hh", "b_hh", "w_hr", "batch_sizes", "reverse", "backend")
_BACKWARD = ("grad_output", "grad_h_n", "grad_c_n", "h0", "c0", "w_hh", "b_hh", "w_hr",
             "batch_sizes", "reverse", "output", "workspace", "backend")
_TYPES = {"c0": "Tensor?", "b_hh": "Tensor?", "w_hr": "Tensor?", "batch_sizes": "Tensor?",
          "grad_c_n": "Tensor?", "reverse": "bool", "backend": "str"}
_GRADS = ("xproj", "h0", "c0", "w_hh", "b_hh", "w_hr") + spec.LEARNABLE


def _schemas(cell: str):
    params = lambda names: ", ".join(f"{_TYPES.get(n, 'Tensor')} {n}" for n in names)  # noqa
    options = "".join(f", {arg.type}? {arg.name}=None" for arg in spec.ARGS)
    grads = ", ".join(f"Tensor grad_{name}" for name in _GRADS)
    return (f"{cell}_forward({params(_FORWARD)}{options}, bool need_workspace=True) "
            "-> (Tensor output, Tensor h_n, Tensor c_n, Tensor workspace)",
            f"{cell}_backward({params(_BACKWARD)}{options}) -> ({grads})")


def _forward_args(cell, args, kwargs=None):
    """-> (tensor arguments as keywords, backend, options, need_workspace)."""
    v = spec.bind(_FORWARD, args, kwargs or {}, ("need_workspace",))
    return ({n: v[n] for n in _FORWARD[:-1]}, v["backend"], spec.make(cell, v),
            bool(v.get("need_workspace", True)))


def _backward_args(cell, args, kwargs=None):
    v = spec.bind(_BACKWARD, args, kwargs or {})
    return {n: v[n] for n in _BACKWARD[:-1]}, v["backend"], spec.make(cell, v)


def _check(kind: Cell, kw: dict, options, read_batch_sizes=True):
    """Checks of a forward's arguments ``kw`` for direct callers of the ops (the modules have
    checked already). The fake impl cannot read batch_sizes' values: shapes only."""
    xproj, h0, c0, w_hh, b_hh, w_hr, batch_sizes = (kw[name] for name in _FORWARD[:7])
    if (c0 is not None) != kind.has_cell_state:
        raise ValueError(f"fastrnn.{kind.name}: c0 must be "
                         f"{'given' if kind.has_cell_state else 'None'} for this cell")
    if w_hr is not None and not kind.has_projection:
        raise ValueError(f"fastrnn.{kind.name}: w_hr must be None, this cell has no "
                         "projection")
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
    for name, tensor, shape in (("c0", c0, [batch, hidden]), ("b_hh", b_hh, [gates])):
        if tensor is not None and list(tensor.shape) != shape:
            raise ValueError(f"fastrnn.{kind.name}: {name} must be {shape}, "
                             f"got {list(tensor.shape)}")
    for name, tensor in (("h0", h0), ("c0", c0), ("w_hh", w_hh), ("b_hh", b_hh), ("w_hr", w_hr)):
        if tensor is not None and tensor.dtype != xproj.dtype:
            raise ValueError(f"fastrnn.{kind.name}: {name} dtype {tensor.dtype} does not match "
                             f"xproj dtype {xproj.dtype}")
    rows = xproj.shape[0]
    spec.check(kind.name, options, rows, batch, hidden, width, w_hr is not None, xproj.dtype)
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
    # A named backend is checked when options are on: one that lacks an option must say so,
    # not run without it (the plain checks are the kernels' own).
    if name == "auto" or options is not None:
        return backends.resolve(name, kind.name, xproj.device, xproj.dtype, hidden, proj,
                                spec.option_names(options))
    return name


def _fresh(result, inputs):
    """Outputs of a custom op may not alias its inputs (a backend may hand back h0 itself when
    there is nothing to do, e.g. zero steps)."""
    ptrs = {t.untyped_storage().data_ptr() for t in inputs
            if isinstance(t, Tensor) and t.numel()}
    return tuple(r.clone() if r.numel() and r.untyped_storage().data_ptr() in ptrs else r
                 for r in result)


_PLAIN = (Tensor, torch.nn.Parameter)
_EAGER = {}   # cell -> the op's forward and autograd as a torch.autograd.Function (_register)


def _direct_call(args) -> bool:
    """Whether recurrence() may run an op call as the op's implementation (and autograd
    formula) would, without the dispatcher: no tracing or compiling, no torch function or
    dispatch mode, plain tensors and Parameters only (no subclass such as FakeTensor). That
    saves tens of microseconds of a one-frame call."""
    if torch.jit.is_tracing() or torch.compiler.is_compiling():
        return False
    if torch._C._is_torch_function_mode_enabled() or \
            torch._C._len_torch_dispatch_stack() > 0:
        return False
    return all(type(t) in _PLAIN or not isinstance(t, Tensor) for t in args)


def _run_forward(kind: Cell, kw: dict, backend: str, options, need_workspace: bool):
    """The forward op's work on bound arguments: checks, the backend, its forward."""
    _check(kind, kw, options)
    backend = _resolve(backend, kind, kw["xproj"], kw["w_hh"], kw["w_hr"], options)
    return backends.get(backend).forward(kind.name, **kw, options=options,
                                         need_workspace=need_workspace)


def _register(kind: Cell):
    forward_name, backward_name = (f"fastrnn::{kind.name}_{d}" for d in ("forward", "backward"))
    for schema in _schemas(kind.name):
        _lib.define(schema)

    def forward_impl(*args, **kwargs):
        kw, backend, options, need_workspace = _forward_args(kind.name, args, kwargs)
        output, h_n, c_n, workspace = _run_forward(kind, kw, backend, options, need_workspace)
        if not need_workspace and workspace.shape[0] > 0:   # a backend that kept it anyway
            workspace = workspace.new_empty(0, workspace.shape[1])
        return _fresh((output, h_n, _empty_if_none(c_n, h_n), workspace), args)

    def backward_impl(*args, **kwargs):
        kw, backend, options = _backward_args(kind.name, args, kwargs)
        backend = _resolve(backend, kind, kw["output"], kw["w_hh"], kw["w_hr"], options)
        grads = backends.get(backend).backward(kind.name, **kw, options=options)
        return _fresh(_op_grads(grads, kw["w_hh"]), args)

    def forward_fake(*args, **kwargs):
        kw, _, options, need_workspace = _forward_args(kind.name, args, kwargs)
        _check(kind, kw, options, read_batch_sizes=False)
        return fake_forward(kind.name, kw["xproj"], kw["h0"], kw["c0"], kw["w_hh"], kw["w_hr"],
                            options, need_workspace)

    def backward_fake(*args, **kwargs):
        kw, _, options = _backward_args(kind.name, args, kwargs)
        return fake_backward(kw["output"], kw["h0"], kw["c0"], kw["w_hh"], kw["w_hr"], options)

    def setup_context(ctx, inputs, output):
        # Unused outputs get None, not zeros: a gradient of the workspace then only comes
        # from a double backward (see backward), and none is allocated otherwise.
        ctx.set_materialize_grads(False)
        kw, ctx.backend, options, ctx.need_workspace = _forward_args(kind.name, inputs)
        ctx.differentiated = False   # set when a backward ran with create_graph=True
        ctx.batch_sizes, ctx.reverse = kw["batch_sizes"], kw["reverse"]
        ctx.given = {n for n in ("c0", "b_hh", "w_hr") if kw[n] is not None}
        options = options or spec.StepOptions()
        ctx.floats = options._replace(**dict.fromkeys(spec.TENSOR_FIELDS))
        ctx.save_for_backward(kw["h0"], kw["c0"], kw["w_hh"], kw["b_hh"], kw["w_hr"],
                              output[0], output[-1],
                              *[getattr(options, name) for name in spec.TENSOR_FIELDS])

    def backward(ctx, *grads):
        if not ctx.need_workspace:
            raise RuntimeError(
                f"fastrnn: this {kind.name} forward ran with need_workspace=False, which keeps "
                "nothing for backward; call it with need_workspace=True (the default) when "
                "gradients are needed")
        h0, c0, w_hh, b_hh, w_hr, output, workspace, *tensors = ctx.saved_tensors
        options = ctx.floats._replace(**dict(zip(spec.TENSOR_FIELDS, tensors)))
        saved = (h0, c0, w_hh, b_hh, w_hr, output, workspace,
                 spec.make(kind.name, options._asdict()))
        grad_workspace = grads[-1]
        if ctx.differentiated and grad_workspace is not None and grad_workspace.numel():
            # The gradient _differentiable_backward's graph sends into the workspace (a
            # double backward). Elsewhere the workspace counts as not differentiable, as
            # tracers and direct callers of the op see it.
            return _workspace_backward(kind, ctx, grads, *saved)
        if torch.is_grad_enabled():
            # create_graph=True: the gradient must be differentiable itself. The backward ops
            # are not (their kernels write into preallocated outputs), so the reference
            # backend's backward runs instead, in plain torch ops that autograd records. It
            # reads the forward's output and workspace, whose gradients come back to this
            # function (the branch above); the normal backward below stays as it was.
            ctx.differentiated = True
            return _differentiable_backward(kind, ctx, grads, *saved)
        result = getattr(torch.ops.fastrnn, f"{kind.name}_backward")(
            *_result_grads(grads, output, h0, c0), h0, c0, w_hh, b_hh, w_hr,
            ctx.batch_sizes, ctx.reverse, output, workspace, ctx.backend, *options)
        return _input_grads(ctx, result, options)

    # torch.library's autograd wrapper re-binds the arguments on every call by walking the
    # schema's argument list, which torch rebuilds at each access: ~0.2 ms a call for these
    # ~25 arguments. An eager call on plain tensors runs the same three functions as an
    # autograd.Function instead (recurrence()).
    _EAGER[kind.name] = type(f"{kind.name}_recurrence", (torch.autograd.Function,), dict(
        forward=staticmethod(forward_impl), setup_context=staticmethod(setup_context),
        backward=staticmethod(backward)))
    _lib.impl(f"{kind.name}_forward", forward_impl, "CompositeExplicitAutograd")
    _lib.impl(f"{kind.name}_backward", backward_impl, "CompositeExplicitAutograd")
    torch.library.register_fake(forward_name, forward_fake, lib=_lib)
    torch.library.register_fake(backward_name, backward_fake, lib=_lib)
    torch.library.register_autograd(forward_name, backward, setup_context=setup_context,
                                    lib=_lib)


def _result_grads(grads, output: Tensor, h0: Tensor, c0: Optional[Tensor]) -> tuple:
    """The gradients of output, h_n and c_n (None for a cell without c) for a backward, zeros
    where autograd gave None."""
    zeros_if_none = lambda grad, like: torch.zeros_like(like) if grad is None else grad  # noqa
    return (zeros_if_none(grads[0], output), zeros_if_none(grads[1], h0),
            None if c0 is None else zeros_if_none(grads[2], c0))


def _empty_if_none(value: Optional[Tensor], like: Tensor) -> Tensor:
    return like.new_empty(0) if value is None else value   # a fresh one each: no aliasing


def _op_grads(grads, like: Tensor):
    """A backend's backward results (fastrnn.backends.base) as the backward op returns them:
    every gradient of _GRADS, an empty [0] where absent."""
    grads = tuple(grads) + (None,) * (len(_GRADS) - len(grads))
    return tuple(_empty_if_none(grad, like) for grad in grads)


def _input_grads(ctx, result, options):
    """The forward op's input gradients (None where an input takes none) from the backward
    op's results ``result`` (in _GRADS order)."""
    grads = dict(zip(_GRADS, result))
    wanted = {"xproj", "h0", "w_hh"} | ctx.given
    wanted |= {name for name in spec.LEARNABLE if getattr(options, name) is not None}
    return tuple(grads[name] if name in wanted else None
                 for name in _FORWARD + spec.StepOptions._fields + ("need_workspace",))


def _double_backward_check(kind: Cell, options):
    grad_clip = options.grad_clip
    if grad_clip is not None:
        # The clip makes the first-order gradient something other than the forward's
        # derivative, so no second derivative is the true one: refuse rather than pick one.
        raise RuntimeError(
            f"fastrnn: double backward (create_graph=True) of the {kind.name} recurrence is "
            f"not defined with recurrent_grad_clip (grad_clip={grad_clip}), which clamps the "
            "gate gradients inside backward; turn recurrent_grad_clip off (e.g. clip with "
            "torch.nn.utils.clip_grad_norm_ after backward) to take second derivatives")


def _differentiable_backward(kind: Cell, ctx, grads, h0, c0, w_hh, b_hh, w_hr, output,
                             workspace, options):
    """The backward under create_graph=True: the reference backend's explicit backward (plain
    torch ops) on the saved tensors, so autograd records it."""
    _double_backward_check(kind, options or spec.StepOptions())
    result = backends.get("reference").backward(
        kind.name, *_result_grads(grads, output, h0, c0), h0, c0, w_hh, b_hh, w_hr,
        ctx.batch_sizes, ctx.reverse, output, workspace, options=options)
    return _input_grads(ctx, _op_grads(result, w_hh), options or spec.StepOptions())


def _workspace_backward(kind: Cell, ctx, grads, h0, c0, w_hh, b_hh, w_hr, output,
                        workspace, options):
    """The backward when the workspace has a gradient (a double backward, through
    _differentiable_backward): autograd through the reference forward, recomputed from the
    saved inputs with the saved gate values (the reference backend's ``known_gates``), since
    the input projection is not kept. The recompute gives first derivatives only."""
    if torch.is_grad_enabled():
        raise RuntimeError(
            f"fastrnn: the {kind.name} recurrence has first and second derivatives, not "
            "third or higher: take the second derivative with create_graph=False")
    options = options or spec.StepOptions()
    _double_backward_check(kind, options)
    leaf = lambda t: None if t is None else t.detach().requires_grad_()  # noqa: E731
    options = options._replace(**{name: leaf(getattr(options, name))
                                  for name in spec.LEARNABLE})
    gates = spec.workspace_layout(
        kind.name, w_hh.shape[0] // kind.num_gates, 0 if w_hr is None else w_hr.shape[0],
        options.option_names())["gates"]
    xproj = output.new_zeros(output.shape[0], w_hh.shape[0], requires_grad=True)  # not read
    inputs = [xproj, leaf(h0), leaf(c0), leaf(w_hh), leaf(b_hh), leaf(w_hr)]
    inputs += [getattr(options, name) for name in spec.LEARNABLE]
    with torch.enable_grad():
        recomputed = backends.get("reference").forward(
            kind.name, *inputs[:6], ctx.batch_sizes, ctx.reverse,
            options=spec.make(kind.name, options._asdict()), known_gates=workspace[:, gates])
    pairs = [(value, grad) for value, grad in zip(recomputed, grads)
             if value is not None and grad is not None and value.requires_grad]
    wanted = [t for t in inputs if t is not None]
    found = iter(torch.autograd.grad([v for v, _ in pairs], wanted, [g for _, g in pairs],
                                     allow_unused=True) if pairs else [None] * len(wanted))
    result = []
    for tensor in inputs:
        grad = None if tensor is None else next(found)
        result.append(torch.zeros_like(tensor) if tensor is not None and grad is None else grad)
    if result[4] is None:
        result[4] = w_hh.new_zeros(w_hh.shape[0])
    return _input_grads(ctx, _op_grads(result, w_hh), options)


for _kind in CELLS.values():
    _register(_kind)


def schema_digest() -> str:
    """A digest of the public ops' schemas as registered."""
    schemas = [str(getattr(torch.ops.fastrnn, f"{name}_{d}").default._schema)
               for name in CELLS for d in ("forward", "backward")]
    return hashlib.sha256("\n".join(schemas).encode()).hexdigest()[:16]


def _tag_compile_caches() -> None:
    """torch.compile's on-disk caches key a graph by its text, which names fastrnn's ops but
    not their schemas: after an upgrade that changed one, a cached graph would call the op
    with the old argument list. The schemas' digest joins the caches' key tag (torch's
    ``torch.compiler.config.cache_key_tag``; a user's own tag is kept)."""
    config = getattr(torch.compiler, "config", None)
    if config is None or not hasattr(config, "cache_key_tag"):
        return
    tag = f"fastrnn-ops-{schema_digest()}"
    if tag not in config.cache_key_tag:
        config.cache_key_tag = f"{config.cache_key_tag}+{tag}" if config.cache_key_tag else tag


_tag_compile_caches()


def recurrence(cell: str, xproj: Tensor, h0: Tensor, c0: Optional[Tensor], w_hh: Tensor,
               b_hh: Optional[Tensor], w_hr: Optional[Tensor], batch_sizes: Optional[Tensor],
               reverse: bool, backend: str,
               options: Optional[spec.StepOptions] = None):
    """Run the ``cell`` op; returns (output, h_n, c_n or None). Differentiable.
    ``options``: a fastrnn.spec.StepOptions, None for the plain recurrence."""
    kind = CELLS[cell]
    # Without a gradient to compute, the op keeps no workspace for backward (less memory,
    # and the native kernels skip writing it). A trace keeps it: it is replayed with and
    # without grad (torch.jit.trace checks it by tracing again without grad).
    need_workspace = torch.jit.is_tracing() or (torch.is_grad_enabled() and any(
        isinstance(t, Tensor) and t.requires_grad
        for t in (xproj, h0, c0, w_hh, b_hh, w_hr, *(options or ()))))
    direct = _direct_call((xproj, h0, c0, w_hh, b_hh, w_hr, batch_sizes, *(options or ())))
    if direct and options is None and not need_workspace and xproj.shape[0]:
        # What the op's implementation does for such a call, without its argument
        # marshalling: the outputs are fresh tensors when there are rows.
        kw = dict(xproj=xproj, h0=h0, c0=c0, w_hh=w_hh, b_hh=b_hh, w_hr=w_hr,
                  batch_sizes=batch_sizes, reverse=reverse)
        output, h_n, c_n, _ = _run_forward(kind, kw, backend, None, False)
    # (An empty result may be an input handed back, which autograd.Function cannot save.)
    elif direct and need_workspace and xproj.numel() and h0.numel() and \
            not torch._C._are_functorch_transforms_active():
        output, h_n, c_n, _ = _EAGER[cell].apply(
            xproj, h0, c0, w_hh, b_hh, w_hr, batch_sizes, reverse, backend,
            *(options or spec.StepOptions()), need_workspace)
    else:
        output, h_n, c_n, _ = getattr(torch.ops.fastrnn, f"{cell}_forward")(
            xproj, h0, c0, w_hh, b_hh, w_hr, batch_sizes, reverse, backend, *(options or ()),
            need_workspace=need_workspace)
    return output, h_n, c_n if kind.has_cell_state else None
