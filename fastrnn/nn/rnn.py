"""fastrnn.LSTM / GRU / RNN: drop-ins for their torch.nn twins, running on fastrnn's ops.

Same constructor, parameters (names, shapes, order, initialisation), forward contract and
error messages as torch.nn. A layer is one input-projection GEMM for all steps (F.linear,
left to cuBLAS / oneDNN and autograd) plus the fused recurrence op; layers, directions,
packing and dropout between layers are composed here.
"""
from __future__ import annotations

import math
import numbers
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn import init
from torch.nn.utils.rnn import PackedSequence

from .. import backends, ops, segments
from ..backends import native
from ..spec import CELL_OF_MODE
from . import amp, options
from .cell import dtype_mismatch


def _layer_names(layer: int, direction: int) -> tuple:
    suffix = f"_l{layer}" + ("_reverse" if direction == 1 else "")
    return tuple(stem + suffix for stem in ("weight_ih", "weight_hh", "bias_ih", "bias_hh",
                                            "weight_hr"))


_LAYER_NAMES = {}   # (layer, direction) -> _layer_names(layer, direction)


# Read on every stream call (RNNBase._stream_run), bound once.
_FLOAT32 = torch.float32
_grad_enabled = torch.is_grad_enabled
_is_compiling = torch.compiler.is_compiling
_is_tracing = torch._C._is_tracing
_function_mode = torch._C._is_torch_function_mode_enabled
_dispatch_modes = torch._C._len_torch_dispatch_stack
_autocast = torch.is_autocast_enabled


def _given_state(hx, h_shape, c_shape, dtype, device):
    """hx as torch.nn's kernel takes it, zeros of ``dtype`` where not given; None where hx is
    not a plain state of these shapes (``c_shape`` None: a cell without c)."""
    if hx is None:
        h = torch.zeros(h_shape, dtype=dtype, device=device)
        return h if c_shape is None else (h, torch.zeros(c_shape, dtype=dtype, device=device))
    if c_shape is None:
        return hx if type(hx) is Tensor and hx.shape == h_shape else None
    if type(hx) is tuple and len(hx) == 2 and type(hx[0]) is Tensor and \
            type(hx[1]) is Tensor and hx[0].shape == h_shape and hx[1].shape == c_shape:
        return hx
    return None


class RNNBase(options.Module):
    """Shared machinery of LSTM, GRU and RNN (the twin of ``torch.nn.RNNBase``).

    The parameters stay separate tensors (no flat cuDNN buffer, so nothing breaks DDP's
    bucketing); ``flatten_parameters()`` is accepted and does nothing.
    """

    __constants__ = ["mode", "input_size", "hidden_size", "num_layers", "bias",
                     "batch_first", "dropout", "bidirectional", "proj_size", "backend",
                     "checkpoint_every", *options.DEFAULTS]

    # Full BPTT in bounded memory (fastrnn.segments); the class default serves modules
    # pickled before the option existed.
    checkpoint_every = None

    # torch.nn's own input checks, so messages stay exactly those of the installed torch.
    check_input = nn.RNNBase.check_input
    get_expected_hidden_size = nn.RNNBase.get_expected_hidden_size
    check_hidden_size = nn.RNNBase.check_hidden_size
    check_forward_args = nn.RNNBase.check_forward_args
    permute_hidden = nn.RNNBase.permute_hidden
    all_weights = nn.RNNBase.all_weights

    def __init__(self, mode: str, input_size: int, hidden_size: int, num_layers: int = 1,
                 bias: bool = True, batch_first: bool = False, dropout: float = 0.0,
                 bidirectional: bool = False, proj_size: int = 0, device=None, dtype=None,
                 *, backend: str = "auto", checkpoint_every=None, **option_values) -> None:
        """``option_values``: fastrnn's options (the keywords of fastrnn.spec.KEYWORDS; all
        off = torch.nn exactly)."""
        factory_kwargs = {"device": device, "dtype": dtype}
        super().__init__()
        self.mode = mode
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.bias = bias
        self.batch_first = batch_first
        self.dropout = float(dropout)
        self.bidirectional = bidirectional
        self.proj_size = proj_size
        self.backend = backends.check_name(backend)
        num_directions = 2 if bidirectional else 1

        # The checks and messages of torch.nn.RNNBase, in its order.
        if (not isinstance(dropout, numbers.Number) or not 0 <= dropout <= 1
                or isinstance(dropout, bool)):
            raise ValueError("dropout should be a number in range [0, 1] representing the "
                             "probability of an element being zeroed")
        if dropout > 0 and num_layers == 1:
            warnings.warn("dropout option adds dropout after all but last recurrent layer, "
                          "so non-zero dropout expects num_layers greater than 1, but got "
                          f"dropout={dropout} and num_layers={num_layers}", stacklevel=2)
        if not isinstance(bias, bool):
            raise TypeError(f"bias should be of type bool, got: {type(bias).__name__}")
        if not isinstance(batch_first, bool):
            raise TypeError(f"batch_first should be of type bool, got: "
                            f"{type(batch_first).__name__}")
        if not isinstance(input_size, int):
            raise TypeError(f"input_size should be of type int, got: "
                            f"{type(input_size).__name__}")
        if input_size <= 0:
            raise ValueError("input_size must be greater than zero")
        if not isinstance(hidden_size, int):
            raise TypeError(f"hidden_size should be of type int, got: "
                            f"{type(hidden_size).__name__}")
        if hidden_size <= 0:
            raise ValueError("hidden_size must be greater than zero")
        if num_layers <= 0:
            raise ValueError("num_layers must be greater than zero")
        if proj_size < 0:
            raise ValueError("proj_size should be a positive integer or zero to disable "
                             "projections")
        if proj_size >= hidden_size:
            raise ValueError("proj_size has to be smaller than hidden_size")
        if mode not in CELL_OF_MODE:
            raise ValueError("Unrecognized RNN mode: " + mode)
        # As torch.nn computes it: RNN's is hidden_size itself, so a bool fails as there.
        gates = CELL_OF_MODE[mode].num_gates
        gate_size = hidden_size if gates == 1 else gates * hidden_size
        # fastrnn's options (fastrnn.nn.options); all off = torch.nn exactly.
        options.check_keywords("RNNBase", option_values)
        checked = options.check(type(self).__name__, mode,
                                dict(options.DEFAULTS, **option_values),
                                bias=bias, proj_size=proj_size)
        for name, value in checked.items():
            setattr(self, name, value)
        # Full BPTT in bounded memory (fastrnn.segments): keep the state every k steps.
        self.checkpoint_every = segments.check_every(type(self).__name__, checkpoint_every)

        self._flat_weights_names = []
        self._all_weights = []
        real_hidden_size = proj_size if proj_size > 0 else hidden_size
        for layer in range(num_layers):
            for direction in range(num_directions):
                layer_input_size = input_size if layer == 0 else real_hidden_size * num_directions
                suffix = "_reverse" if direction == 1 else ""
                # Created in torch.nn's order, so a fixed seed gives torch.nn's values.
                params = [(f"weight_ih_l{layer}{suffix}", (gate_size, layer_input_size)),
                          (f"weight_hh_l{layer}{suffix}", (gate_size, real_hidden_size))]
                if bias:
                    params += [(f"bias_ih_l{layer}{suffix}", (gate_size,)),
                               (f"bias_hh_l{layer}{suffix}", (gate_size,))]
                if proj_size > 0:
                    params += [(f"weight_hr_l{layer}{suffix}", (proj_size, hidden_size))]
                for name, shape in params:
                    setattr(self, name, nn.Parameter(torch.empty(shape, **factory_kwargs)))
                self._flat_weights_names.extend(name for name, _ in params)
                self._all_weights.append([name for name, _ in params])
        # The options' parameters come after torch.nn's, so a seed gives torch.nn's weights.
        self._option_names = []
        for layer in range(num_layers):
            for suffix in ("", "_reverse")[:num_directions]:
                for stem, size, _ in options.parameters(self):
                    name = f"{stem}_l{layer}{suffix}"
                    setattr(self, name, nn.Parameter(torch.empty(size, **factory_kwargs)))
                    self._option_names.append(name)
        self.reset_parameters()

    @property
    def _flat_weights(self):   # torch.nn's forward reads it twice a call
        params = self._parameters
        try:
            return [params[name] for name in self._flat_weights_names]
        except KeyError:   # a wrapper holds a weight elsewhere
            return [self._param(name) for name in self._flat_weights_names]

    def _param(self, name: str):
        """getattr(self, name, None), quicker for a registered parameter (the common case; a
        wrapper may hold the weight elsewhere, e.g. as a plain attribute)."""
        found = self._parameters.get(name)
        return found if found is not None else getattr(self, name, None)

    def flatten_parameters(self) -> None:
        """Accepted for compatibility; fastrnn keeps parameters as separate tensors."""

    def _update_flat_weights(self) -> None:
        """torch.nn's forward (run under ONNX export) calls this; _flat_weights is always
        current here."""

    def reset_parameters(self) -> None:
        stdv = 1.0 / math.sqrt(self.hidden_size) if self.hidden_size > 0 else 0
        for weight in self._flat_weights:   # torch.nn's parameters, in its order
            init.uniform_(weight, -stdv, stdv)
        options.init_parameters(self, self._option_names)
        if self.forget_bias is not None:
            for layer in range(self.num_layers):
                for direction in range(2 if self.bidirectional else 1):
                    _, _, b_ih, b_hh, _ = self._layer_params(layer, direction)
                    options.set_forget_bias(b_ih, b_hh, self.hidden_size, self.forget_bias)

    def extra_repr(self) -> str:
        text = nn.RNNBase.extra_repr(self)
        extra = options.describe(self)
        if self.checkpoint_every is not None:
            every = f"checkpoint_every={self.checkpoint_every!r}"
            extra = f"{extra}, {every}" if extra else every
        return f"{text}, {extra}" if extra else text

    def _layer_params(self, layer: int, direction: int) -> tuple:
        """(w_ih, w_hh, b_ih, b_hh, w_hr) of a layer and direction, None where absent."""
        names = _LAYER_NAMES.get((layer, direction))
        if names is None:
            names = _LAYER_NAMES[layer, direction] = _layer_names(layer, direction)
        w_ih, w_hh, b_ih, b_hh, w_hr = names
        param = self._param   # the names of absent parameters are not looked up
        return (param(w_ih), param(w_hh), param(b_ih) if self.bias else None,
                param(b_hh) if self.bias else None, param(w_hr) if self.proj_size > 0 else None)

    def _layer_getter(self, layer: int, direction: int):
        """A function finding a layer's parameter by its stem (e.g. "ln_weight_ih")."""
        suffix = _layer_names(layer, direction)[0][len("weight_ih"):]
        return lambda stem: self._param(stem + suffix)

    # -- forward -------------------------------------------------------------------------

    def _run(self, input: Tensor, hx: tuple, batch_sizes, call=None):
        """The stacked recurrence on time-major rows.

        input: [N, input_size] rows in packed time-major order ([T*B, I] when not packed);
        hx: (h0, c0) or (h0,) with [layers*directions, B, *] each; call: the options.Call of
        this call, whose plan (options, backend) is made once for calls alike.
        Returns output rows [N, directions*P] and the final states in hx's layout.
        """
        kind = CELL_OF_MODE[self.mode]
        has_cell_state = kind.has_cell_state
        num_directions = 2 if self.bidirectional else 1
        autocast = amp.layers_plan(self, input, hx, batch_sizes is not None)
        recurrence = ops.recurrence if autocast is None else autocast.recurrence
        compute = input.dtype if autocast is None else autocast.compute
        if autocast is None:   # torch.nn's recurrent matmul refuses a state of another dtype
            weight = self._param("weight_ih_l0")
            for state in hx:
                if state.dtype != weight.dtype:
                    raise dtype_mismatch(state, weight)
        plan = call.plan if call is not None and autocast is None else None
        if plan is None:   # the backend depends on the compute dtype: autocast's is not kept
            variant = options.active(self)
            option_names = options.option_names(self) if variant else ()
            plan = variant, backends.resolve(self.backend, kind.name, input.device, compute,
                                             self.hidden_size, self.proj_size, option_names)
            if call is not None and autocast is None:
                call.plan = plan
        variant, backend = plan
        segmented = self.checkpoint_every is not None
        batch, width = hx[0].shape[1], hx[0].shape[2]
        if variant:
            draw_like = torch.empty(0, dtype=compute, device=input.device)
        layer_input = input
        final_h, final_c = [], []
        for layer in range(self.num_layers):
            outputs = []
            for direction in range(num_directions):
                w_ih, w_hh, b_ih, b_hh, w_hr = self._layer_params(layer, direction)
                # the options' parameters (a plain call reads none)
                get = self._layer_getter(layer, direction) if variant or segmented else None
                index = layer * num_directions + direction
                h0, c0 = hx[0][index], hx[1][index] if has_cell_state else None
                fused = None if variant or segmented or autocast is not None or w_hr is not \
                    None or batch_sizes is not None else native.fused_layer(
                        backend, kind.name, layer_input, h0, c0, w_ih, w_hh, b_ih, b_hh,
                        direction == 1, batch)
                if fused is None and not segmented:
                    xproj = options.input_projection(self, layer_input, w_ih, b_ih, get)
                step_options = None
                if variant:   # draws in the documented order: weight, recurrent, zoneout
                    w_hh = options.weight_drop(self, w_hh)
                    mask = options.recurrent_mask(self, batch, width, draw_like)
                    zoneout_h, zoneout_c = options.zoneout_weights(
                        self, layer_input.shape[0], width, self.hidden_size, draw_like)
                    step_options = options.step_options(self, get, mask, zoneout_h, zoneout_c)
                if fused is not None:   # the whole layer ran as one op call
                    output, h_n, c_n = fused
                    output = output.view(-1, output.shape[2])
                elif segmented:   # the projection is made per segment, in there
                    run = ops.recurrence
                    if autocast is not None:   # states cross segments in the compute dtype
                        run, h0, c0 = autocast.compute_recurrence, autocast.cast(h0), \
                            autocast.cast(c0)
                    output, h_n, c_n = segments.layer(
                        run, self._projector(get), layer_input,
                        self._projection_params(w_ih, b_ih, get), kind.name, h0, c0, w_hh,
                        b_hh, w_hr, batch_sizes, direction == 1, backend, step_options,
                        self.checkpoint_every)
                    if autocast is not None:
                        output, h_n, c_n = autocast.results(output, h_n, c_n)
                else:
                    output, h_n, c_n = recurrence(kind.name, xproj, h0, c0, w_hh, b_hh, w_hr,
                                                  batch_sizes, direction == 1, backend,
                                                  step_options)
                outputs.append(output)
                final_h.append(h_n)
                final_c.append(c_n)
            layer_input = outputs[0] if num_directions == 1 else torch.cat(outputs, 1)
            if self.dropout and self.training and layer < self.num_layers - 1:
                layer_input = F.dropout(layer_input, self.dropout, True)
        if len(final_h) == 1:   # one layer, one direction: no copy
            state = (final_h[0].unsqueeze(0),)
            if has_cell_state:
                state += (final_c[0].unsqueeze(0),)
        else:
            state = (torch.stack(final_h),)
            if has_cell_state:
                state += (torch.stack(final_c),)
        return layer_input, state

    # torch.nn's kernel for a dense call (torch._VF.gru / lstm; None: torch.nn's forward runs).
    _kernel = None

    def _dense_state(self, input, hx, dtype):
        """hx as torch.nn's kernel takes it (zeros where not given) for a batched dense call of
        ``dtype`` (the weights') whose arguments torch.nn's checks pass; None for any other
        call, which the full forward runs with torch.nn's checks and messages."""
        if type(input) is not Tensor or input.dim() != 3 or input.dtype != dtype or \
                input.shape[2] != self.input_size:
            return None
        batch = input.shape[0] if self.batch_first else input.shape[1]
        layers = self.num_layers * (2 if self.bidirectional else 1)
        h_shape = (layers, batch, self.proj_size or self.hidden_size)
        c_shape = (layers, batch, self.hidden_size) if self.mode == "LSTM" else None
        return _given_state(hx, h_shape, c_shape, dtype, input.device)

    def _torch_kernel(self, input, hx):
        """torch.nn's forward of a call _dense_state takes: its kernel, called with the
        arguments torch.nn's forward gives it, without that forward's Python (~25 us of a
        one-frame call with cold caches: the weight list built three times, each check a
        function). None for any other call."""
        kernel = self._kernel
        if kernel is None:
            return None
        weights = self._flat_weights
        hx = self._dense_state(input, hx, weights[0].dtype)
        if hx is None:
            return None
        result = kernel(input, hx, weights, self.bias, self.num_layers, self.dropout,
                        self.training, self.bidirectional, self.batch_first)
        return (result[0], result[1:]) if self.mode == "LSTM" else result

    # -- repeated stream calls ----------------------------------------------------------
    # A one-frame call's arithmetic is one read of the weights; what a module call adds on
    # top is Python (the route's key, the plan, the checks of each layer: about 75 us with
    # cold caches, as after a frame's 8 MB of weights). A stream calls the module again and
    # again alike, so a call that _plain_run ran on the native layer op without gradient
    # leaves a record (_stream_record) of what it checked; a later call equal in what the
    # record does not cover runs the op at once (_stream_run). What can change the checks'
    # answers drops the record: any attribute set or deleted on the module (training,
    # backend, options, parameters), _apply (to, float, cuda, share_memory...), or a
    # parameter no longer the one recorded; what is outside the module (the backend setting,
    # FASTRNN_BACKEND, the routing table) is compared on every call.
    _fastrnn_stream = None

    def __setattr__(self, name, value):
        self.__dict__.pop("_fastrnn_stream", None)
        super().__setattr__(name, value)

    def __delattr__(self, name):
        self.__dict__.pop("_fastrnn_stream", None)
        super().__delattr__(name)

    def _apply(self, *args, **kwargs):
        self.__dict__.pop("_fastrnn_stream", None)
        return super()._apply(*args, **kwargs)

    def _stream_record(self, input, h0, c0, weights) -> None:
        """Remember a one-layer call that _plain_run has just run on native.run_layer's ops
        without gradient, for _stream_run."""
        names = _layer_names(0, 0)[:4]
        params = self._parameters
        if torch.is_grad_enabled() or any(params.get(name) is not w for name, w in
                                           zip(names, weights)):
            return   # a weight held elsewhere (e.g. parametrized) is computed per call
        self.__dict__["_fastrnn_stream"] = (
            input.shape, h0.shape, None if c0 is None else c0.shape, backends._default,
            backends._environment_backend(), backends.routing.ROUTES, names, weights,
            CELL_OF_MODE[self.mode].name)

    def _stream_run(self, record, input, hx):
        """A call like the recorded one, run at once; None where it is not alike (the full
        path then decides afresh)."""
        (shape, h_shape, c_shape, setting, environment, routes, names, weights,
         cell) = record
        if _grad_enabled() or _is_tracing() or _function_mode() or _dispatch_modes() or \
                type(input) is not Tensor or input.shape != shape or \
                input.dtype is not _FLOAT32 or not input.is_cpu or \
                _autocast("cpu") or backends._default is not setting or \
                backends.routing.ROUTES is not routes or \
                backends._environment_backend() != environment:
            return None
        params = self._parameters
        w_ih, w_hh, b_ih, b_hh = weights
        if params.get(names[0]) is not w_ih or params.get(names[1]) is not w_hh or \
                params.get(names[2]) is not b_ih or params.get(names[3]) is not b_hh:
            return None
        state = _given_state(hx, h_shape, c_shape, _FLOAT32, None)
        if state is None:
            return None
        h0, c0 = (state, None) if c_shape is None else state
        x = input.transpose(0, 1) if self.batch_first else input
        try:   # the ops check the states' and weights' dtype, device and sizes
            output, h_n, c_n = native.run_layer(cell, x, h0, c0, w_ih, w_hh, b_ih, b_hh,
                                                False)
        except RuntimeError:   # e.g. a weight's .data replaced: the full path says what
            return None
        if self.batch_first:
            output = output.transpose(0, 1)
        return output, (h_n if c0 is None else (h_n, c_n))

    def _plain_run(self, input, hx, call):
        """_forward of a call without options, segments, autocast, reversed direction or
        dropout, that _dense_state takes, with states of the weights' dtype: each layer's
        input projection and op, without the general path's Python (about a third of a
        one-frame call's cost beyond its arithmetic, with cold caches). None for any other
        call."""
        variant, backend = call.plan
        if variant or self.bidirectional or self.checkpoint_every is not None or \
                (self.dropout and self.training) or \
                torch.is_autocast_enabled(call.device_type):
            return None
        dtype = self._param("weight_ih_l0").dtype
        state = self._dense_state(input, hx, dtype)
        if state is None:
            return None
        lstm = self.mode == "LSTM"
        h0, c0 = state if lstm else (state, None)
        if h0.dtype != dtype or (lstm and c0.dtype != dtype) or not input.numel():
            return None
        time_major = input.transpose(0, 1) if self.batch_first else input
        steps, batch = time_major.shape[0], time_major.shape[1]
        kind = CELL_OF_MODE[self.mode].name
        # One layer takes its states as given ([1, batch, hidden]) and the fused op gives them
        # back so: no select before nor stack after (tensor ops, each microseconds of a
        # one-frame call with cold caches).
        single = self.num_layers == 1
        x, final_h, final_c = time_major, [], []
        for layer in range(self.num_layers):
            w_ih, w_hh, b_ih, b_hh, w_hr = self._layer_params(layer, 0)
            h_layer = h0 if single else h0[layer]
            c_layer = None if not lstm else c0 if single else c0[layer]
            fused = None if w_hr is not None else native.fused_layer(
                backend, kind, x, h_layer, c_layer, w_ih, w_hh, b_ih, b_hh, False)
            if fused is not None:   # the whole layer ran as one op call
                x, h_n, c_n = fused
                if single:
                    self._stream_record(input, h_layer, c_layer, (w_ih, w_hh, b_ih, b_hh))
            else:
                rows, h_n, c_n = ops.recurrence(
                    kind, F.linear(x.reshape(steps * batch, x.shape[2]), w_ih, b_ih), h0[layer],
                    c0[layer] if lstm else None, w_hh, b_hh, w_hr, None, False, backend)
                x = rows.view(steps, batch, rows.shape[1])
                if single:
                    h_n, c_n = h_n.unsqueeze(0), (c_n.unsqueeze(0) if lstm else None)
            final_h.append(h_n)
            final_c.append(c_n)
        output = x.transpose(0, 1) if self.batch_first else x
        if single:
            return output, ((final_h[0], final_c[0]) if lstm else final_h[0])
        return output, ((torch.stack(final_h), torch.stack(final_c)) if lstm else
                        torch.stack(final_h))

    def _projection_params(self, w_ih, b_ih, get) -> tuple:
        """The tensors the input projection reads (options.input_projection)."""
        if not self.layer_norm:
            return (w_ih, b_ih)
        return (w_ih, b_ih, get("ln_weight_ih"), get("ln_bias_ih"))

    def _projector(self, get):
        """options.input_projection as a function of x and _projection_params' tensors, so a
        segment's recomputation can take them as fresh leaves."""
        def project(x, w_ih, b_ih, ln_weight=None, ln_bias=None):
            given = {"ln_weight_ih": ln_weight, "ln_bias_ih": ln_bias}
            return options.input_projection(self, x, w_ih, b_ih, given.get)
        return project

    def _zeros(self, input: Tensor, batch: int, size: int) -> Tensor:
        num_directions = 2 if self.bidirectional else 1
        return torch.zeros(self.num_layers * num_directions, batch, size,
                           dtype=input.dtype, device=input.device)

    @staticmethod
    def _packed_batch_size(batch_sizes: Tensor, sorted_indices, hx):
        """batch_sizes[0]. Under torch.compile, reading a tensor's value breaks the graph (with
        fullgraph=True it becomes a size known only at run time), so there the batch comes from
        a shape where one has it: the given state, else the sort permutation. The op checks it
        against batch_sizes when it runs."""
        if torch.compiler.is_compiling():
            if hx is not None:
                return (hx[0] if isinstance(hx, (tuple, list)) else hx).size(1)
            if sorted_indices is not None:
                return sorted_indices.size(0)
        return int(batch_sizes[0])

    def _check_args(self, input, hx, batch_sizes, batch) -> None:
        """torch.nn's check_forward_args. Under torch.compile the state of packed input is
        checked against ``batch`` (_packed_batch_size), as torch.nn's check reads batch_sizes[0]."""
        if batch_sizes is None or not torch.compiler.is_compiling():
            return self.check_forward_args(input, hx, batch_sizes)
        self.check_input(input, batch_sizes)
        leading = (self.num_layers * (2 if self.bidirectional else 1), batch)
        if self.mode != "LSTM":
            return self.check_hidden_size(hx, leading + (self.hidden_size,))
        self.check_hidden_size(hx[0], leading + (self.proj_size or self.hidden_size,),
                               "Expected hidden[0] size {}, got {}")
        self.check_hidden_size(hx[1], leading + (self.hidden_size,),
                               "Expected hidden[1] size {}, got {}")

    def _forward(self, input, hx, state_checks):
        """Common forward: unpack/batch the input, run, and repack like torch.nn."""
        # (compiling, the record is not read: no guard on what it holds)
        record = None if _is_compiling() else self._fastrnn_stream
        if record is not None:
            result = self._stream_run(record, input, hx)
            if result is not None:
                return result
        if type(self.num_layers) is not int or type(self.bidirectional) is not bool:
            # torch.nn's kernels take exactly an int and a bool: its forward raises their
            # TypeError (the constructor accepts e.g. bidirectional=1, as torch.nn's does).
            return options.torch_forward(self, input, hx)
        call = options.call(self, input)
        if call.torch_path:
            # (on CUDA torch_forward silences cuDNN's warning on weights not flattened)
            if call.device_type is not None and call.device_type != "cuda":
                result = self._torch_kernel(input, hx)
                if result is not None:
                    return result
            return options.torch_forward(self, input, hx)
        if call.device_type is not None and call.plan is not None:
            result = self._plain_run(input, hx, call)
            if result is not None:
                return result
        kind = CELL_OF_MODE[self.mode]
        real_hidden_size = self.proj_size if self.proj_size > 0 else self.hidden_size
        orig_input = input
        if isinstance(orig_input, PackedSequence):
            input, batch_sizes, sorted_indices, unsorted_indices = input
            is_batched = True
            max_batch_size = self._packed_batch_size(batch_sizes, sorted_indices, hx)
        else:
            batch_sizes = sorted_indices = unsorted_indices = None
            if input.dim() not in (2, 3):
                raise ValueError(self._input_dim_message.format(input.dim()))
            is_batched = input.dim() == 3
            batch_dim = 0 if self.batch_first else 1
            if not is_batched:
                input = input.unsqueeze(batch_dim)
            if hx is not None:
                state_checks(hx, is_batched)
                if not is_batched:
                    hx = tuple(h.unsqueeze(1) for h in hx) if kind.has_cell_state \
                        else hx.unsqueeze(1)
            max_batch_size = input.size(0) if self.batch_first else input.size(1)
        given_hx = hx
        if hx is None:
            hx = self._zeros(input, max_batch_size, real_hidden_size)
            if kind.has_cell_state:
                hx = (hx, self._zeros(input, max_batch_size, self.hidden_size))
        else:   # as torch.nn: a packed batch's hx is put in the batch's order, then checked
            hx = self.permute_hidden(hx, sorted_indices)
        try:
            self._check_args(input, hx, batch_sizes, max_batch_size)
        except RuntimeError:
            # torch.nn.LSTM does not check a packed batch's hx: a bad one fails inside its
            # kernel, so that error (type and message) is torch.nn's to raise.
            if batch_sizes is not None and kind.has_cell_state and not options.active(self):
                return options.torch_forward(self, orig_input, given_hx)
            raise
        state = hx if kind.has_cell_state else (hx,)

        if batch_sizes is None:
            if input.size(0 if not self.batch_first else 1) == 0:
                raise RuntimeError("Expected sequence length to be larger than 0 in RNN")
            time_major = input.transpose(0, 1) if self.batch_first else input
            steps, batch = time_major.shape[:2]
            # explicit widths: with batch 0 a -1 could not be inferred
            rows, state = self._run(time_major.reshape(steps * batch, time_major.shape[2]),
                                    state, None, call)
            output = rows.view(steps, batch, rows.shape[1])
            if self.batch_first:
                output = output.transpose(0, 1)
        else:
            rows, state = self._run(input, state, batch_sizes, call)
            output = PackedSequence(rows, batch_sizes, sorted_indices, unsorted_indices)
        hidden = self.permute_hidden(state if kind.has_cell_state else state[0],
                                     unsorted_indices)
        if not is_batched:
            output = output.squeeze(0 if self.batch_first else 1)
            hidden = tuple(h.squeeze(1) for h in hidden) if kind.has_cell_state \
                else hidden.squeeze(1)
        return output, hidden


class _SingleStateRNN(RNNBase):
    """GRU and RNN: the hidden state is one tensor."""

    @staticmethod
    def _check_hx_dims(hx, is_batched):
        want = 3 if is_batched else 2
        if hx.dim() != want:
            kind = "batched 3-D" if is_batched else "unbatched 2-D"
            raise RuntimeError(f"For {kind} input, hx should also be {want}-D but got "
                               f"{hx.dim()}-D tensor")

    def forward(self, input, hx=None):
        return self._forward(input, hx, self._check_hx_dims)


class RNN(_SingleStateRNN):
    """Drop-in for :class:`torch.nn.RNN` (tanh or relu), plus ``backend=``."""

    _input_dim_message = "RNN: Expected input to be 2D or 3D, got {}D tensor instead"
    _torch_forward = nn.RNN.forward

    def __init__(self, *args, **kwargs):
        if "proj_size" in kwargs:
            raise ValueError("proj_size argument is only supported for LSTM, not RNN or GRU")
        if len(args) > 3:
            self.nonlinearity = args[3]
            args = args[:3] + args[4:]
        else:
            self.nonlinearity = kwargs.pop("nonlinearity", "tanh")
        if self.nonlinearity == "tanh":
            mode = "RNN_TANH"
        elif self.nonlinearity == "relu":
            mode = "RNN_RELU"
        else:
            raise ValueError(f"Unknown nonlinearity '{self.nonlinearity}'. Select from "
                             "'tanh' or 'relu'.")
        super().__init__(mode, *args, **kwargs)


class GRU(_SingleStateRNN):
    """Drop-in for :class:`torch.nn.GRU`, plus ``backend=``."""

    _input_dim_message = "GRU: Expected input to be 2D or 3D, got {}D instead"
    _torch_forward = nn.GRU.forward
    _kernel = torch._C._VariableFunctions.gru

    def __init__(self, *args, **kwargs):
        if "proj_size" in kwargs:
            raise ValueError("proj_size argument is only supported for LSTM, not RNN or GRU")
        super().__init__("GRU", *args, **kwargs)


class LSTM(RNNBase):
    """Drop-in for :class:`torch.nn.LSTM` (with ``proj_size``), plus ``backend=``."""

    _input_dim_message = "LSTM: Expected input to be 2D or 3D, got {}D instead"
    _torch_forward = nn.LSTM.forward
    _kernel = torch._C._VariableFunctions.lstm
    get_expected_cell_size = nn.LSTM.get_expected_cell_size
    check_forward_args = nn.LSTM.check_forward_args
    permute_hidden = nn.LSTM.permute_hidden

    def __init__(self, *args, **kwargs):
        super().__init__("LSTM", *args, **kwargs)

    @staticmethod
    def _check_hx_dims(hx, is_batched):
        want = 3 if is_batched else 2
        if hx[0].dim() != want or hx[1].dim() != want:
            kind = "batched 3-D" if is_batched else "unbatched 2-D"
            raise RuntimeError(f"For {kind} input, hx and cx should also be {want}-D but got "
                               f"({hx[0].dim()}-D, {hx[1].dim()}-D) tensors")

    def forward(self, input, hx=None):
        return self._forward(input, hx, self._check_hx_dims)
