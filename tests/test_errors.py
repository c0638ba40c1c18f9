"""Bad input gets the exception type and message torch.nn gives; fastrnn's own option
(backend=) says what was wrong and what is allowed."""
import copy
import warnings

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pack_sequence

import fastrnn

from parity import assert_close

PAIRS = [(nn.LSTM, fastrnn.LSTM), (nn.GRU, fastrnn.GRU), (nn.RNN, fastrnn.RNN)]
CELL_PAIRS = [(nn.LSTMCell, fastrnn.LSTMCell), (nn.GRUCell, fastrnn.GRUCell),
              (nn.RNNCell, fastrnn.RNNCell)]


def raised(fn):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            fn()
        except Exception as exc:  # the exception itself is what is compared
            return type(exc), str(exc)
    return None


def assert_same_error(torch_fn, fast_fn):
    expected = raised(torch_fn)
    assert expected is not None, "torch.nn accepted this input; the case is wrong"
    assert raised(fast_fn) == expected


BAD_CTOR_ARGS = [
    dict(input_size=3, hidden_size=4, dropout=1.5),
    dict(input_size=3, hidden_size=4, dropout=-0.1),
    dict(input_size=3, hidden_size=4, dropout=True),
    dict(input_size=3, hidden_size=4, dropout="0.1"),
    dict(input_size=3, hidden_size=0),
    dict(input_size=3, hidden_size=-2),
    dict(input_size=0, hidden_size=4),
    dict(input_size=3, hidden_size=4, num_layers=0),
    dict(input_size=3.0, hidden_size=4),
    dict(input_size=3, hidden_size=4.0),
    dict(input_size=3, hidden_size=4, num_layers=1.5),
    dict(input_size=3, hidden_size=4, bias=1),
    dict(input_size=3, hidden_size=4, batch_first="yes"),
    dict(input_size=3, hidden_size=4, proj_size=4),
    dict(input_size=3, hidden_size=4, proj_size=6),
    dict(input_size=3, hidden_size=4, proj_size=-1),
]


@pytest.mark.parametrize("pair", PAIRS, ids=lambda p: p[0].__name__)
@pytest.mark.parametrize("kwargs", BAD_CTOR_ARGS, ids=str)
def test_constructor_errors(pair, kwargs):
    torch_cls, fast_cls = pair
    assert_same_error(lambda: torch_cls(**kwargs), lambda: fast_cls(**kwargs))


def test_proj_size_only_for_lstm_and_unknown_nonlinearity():
    for torch_cls, fast_cls in PAIRS[1:]:
        assert_same_error(lambda: torch_cls(3, 4, proj_size=2), lambda: fast_cls(3, 4, proj_size=2))
    assert_same_error(lambda: nn.RNN(3, 4, nonlinearity="gelu"),
                      lambda: fastrnn.RNN(3, 4, nonlinearity="gelu"))
    assert_same_error(lambda: nn.RNN(3, 4, 1, "sigmoid"), lambda: fastrnn.RNN(3, 4, 1, "sigmoid"))


def test_dropout_with_one_layer_warns_like_torch():
    with pytest.warns(UserWarning, match="non-zero dropout expects num_layers greater than 1"):
        fastrnn.LSTM(3, 4, dropout=0.2)


def _state(cls, layers, batch, hidden, dims=3, dtype=torch.float32, cell_hidden=None):
    shape = (layers, batch, hidden)[3 - dims:]
    h = torch.zeros(shape, dtype=dtype)
    if cls is nn.LSTM or cls is fastrnn.LSTM:
        c_shape = (layers, batch, cell_hidden or hidden)[3 - dims:]
        return (h, torch.zeros(c_shape, dtype=dtype))
    return h


BAD_FORWARDS = {
    "input_1d": lambda cls, m: m(torch.zeros(4)),
    "input_4d": lambda cls, m: m(torch.zeros(2, 3, 4, 5)),
    "input_size": lambda cls, m: m(torch.zeros(5, 2, 4)),
    "input_dtype": lambda cls, m: m(torch.zeros(5, 2, 3, dtype=torch.float64)),
    "hidden_batch": lambda cls, m: m(torch.zeros(5, 2, 3), _state(cls, 1, 3, 4)),
    "hidden_size": lambda cls, m: m(torch.zeros(5, 2, 3), _state(cls, 1, 2, 5)),
    "hidden_layers": lambda cls, m: m(torch.zeros(5, 2, 3), _state(cls, 2, 2, 4)),
    "hidden_dims_batched": lambda cls, m: m(torch.zeros(5, 2, 3), _state(cls, 1, 2, 4, dims=2)),
    "hidden_dims_unbatched": lambda cls, m: m(torch.zeros(5, 3), _state(cls, 1, 2, 4)),
    "hidden_unbatched_size": lambda cls, m: m(torch.zeros(5, 3), _state(cls, 1, 1, 5, dims=2)),
    "empty_sequence": lambda cls, m: m(torch.zeros(0, 2, 3)),
    "packed_hidden_batch": lambda cls, m: m(
        pack_sequence([torch.zeros(3, 3), torch.zeros(2, 3)]), _state(cls, 1, 3, 4)),
}


@pytest.mark.parametrize("pair", PAIRS, ids=lambda p: p[0].__name__)
@pytest.mark.parametrize("case", list(BAD_FORWARDS))
def test_forward_errors(pair, case):
    torch_cls, fast_cls = pair
    torch.manual_seed(0)
    assert_same_error(lambda: BAD_FORWARDS[case](torch_cls, torch_cls(3, 4)),
                      lambda: BAD_FORWARDS[case](fast_cls, fast_cls(3, 4)))


def test_lstm_projected_hidden_size_error():
    for lstm in (nn.LSTM(3, 4, proj_size=2), fastrnn.LSTM(3, 4, proj_size=2)):
        with pytest.raises(RuntimeError, match=r"Expected hidden\[0\] size \(1, 2, 2\)"):
            lstm(torch.zeros(5, 2, 3), (torch.zeros(1, 2, 4), torch.zeros(1, 2, 4)))
    assert_same_error(
        lambda: nn.LSTM(3, 4, proj_size=2)(torch.zeros(5, 2, 3),
                                           (torch.zeros(1, 2, 2), torch.zeros(1, 2, 2))),
        lambda: fastrnn.LSTM(3, 4, proj_size=2)(torch.zeros(5, 2, 3),
                                                (torch.zeros(1, 2, 2), torch.zeros(1, 2, 2))))


def _cell_state(cls, batch, hidden, dims=2, dtype=torch.float32):
    h = torch.zeros((batch, hidden)[2 - dims:], dtype=dtype)
    return (h, h.clone()) if cls in (nn.LSTMCell, fastrnn.LSTMCell) else h


BAD_CELL_CALLS = {
    "input_3d": lambda cls, m: m(torch.zeros(2, 3, 3)),
    "input_size": lambda cls, m: m(torch.zeros(2, 5)),
    "hidden_3d": lambda cls, m: m(torch.zeros(2, 3), _cell_state(cls, 2, 4)[0][None]
                                  if isinstance(_cell_state(cls, 2, 4), tuple)
                                  else _cell_state(cls, 2, 4)[None]),
    "hidden_batch": lambda cls, m: m(torch.zeros(2, 3), _cell_state(cls, 3, 4)),
    "hidden_size": lambda cls, m: m(torch.zeros(2, 3), _cell_state(cls, 2, 6)),
    "input_dtype": lambda cls, m: m(torch.zeros(2, 3, dtype=torch.float64)),
    "hidden_dtype": lambda cls, m: m(torch.zeros(2, 3),
                                     _cell_state(cls, 2, 4, dtype=torch.float64)),
}


@pytest.mark.parametrize("pair", CELL_PAIRS, ids=lambda p: p[0].__name__)
@pytest.mark.parametrize("case", list(BAD_CELL_CALLS))
def test_cell_errors(pair, case):
    torch_cls, fast_cls = pair
    if case == "hidden_3d" and torch_cls is nn.LSTMCell:
        call = lambda cls, m: m(torch.zeros(2, 3), (torch.zeros(1, 2, 4), torch.zeros(2, 4)))  # noqa
    else:
        call = BAD_CELL_CALLS[case]
    assert_same_error(lambda: call(torch_cls, torch_cls(3, 4)),
                      lambda: call(fast_cls, fast_cls(3, 4)))


def test_rnn_cell_unknown_nonlinearity_fails_at_call_like_torch():
    assert_same_error(lambda: nn.RNNCell(3, 4, nonlinearity="gelu")(torch.zeros(2, 3)),
                      lambda: fastrnn.RNNCell(3, 4, nonlinearity="gelu")(torch.zeros(2, 3)))


def test_backend_argument_errors():
    with pytest.raises(ValueError, match="unknown fastrnn backend 'cudnn'; known backends are "
                                         "reference, native, triton and 'auto'"):
        fastrnn.LSTM(3, 4, backend="cudnn")
    with pytest.raises(ValueError, match="unknown fastrnn backend"):
        fastrnn.GRUCell(3, 4, backend="fast")
    with pytest.raises(ValueError, match="unknown fastrnn backend"):
        fastrnn.set_backend("fast")
    with pytest.raises(ValueError, match="unknown fastrnn backend"):
        fastrnn.convert(nn.LSTM(3, 4), backend="fast")


def test_unavailable_backend_lists_available(monkeypatch):
    # triton runs on CPU only under its interpreter: without it the backend is unavailable.
    from fastrnn import backends
    unavailable = [b for b in backends.BACKEND_NAMES
                   if backends.unavailable_reason(b, "cpu") is not None]
    if not unavailable:
        monkeypatch.setattr(backends.get("triton"), "unavailable_reason",
                            lambda device: "pretend it is missing")
        unavailable = ["triton"]
    lstm = fastrnn.LSTM(3, 4, backend=unavailable[0])
    available = ", ".join(fastrnn.available_backends("cpu"))
    with pytest.raises(ValueError, match=f"Available on cpu: {available}"):
        lstm(torch.zeros(2, 1, 3))


def test_backend_default_from_env_and_set_backend(monkeypatch):
    from fastrnn import backends
    monkeypatch.setenv("FASTRNN_BACKEND", "reference")
    assert fastrnn.get_backend() == "reference"
    monkeypatch.setenv("FASTRNN_BACKEND", "bogus")
    with pytest.raises(ValueError, match="FASTRNN_BACKEND='bogus' is not a fastrnn backend"):
        fastrnn.get_backend()
    monkeypatch.delenv("FASTRNN_BACKEND")
    try:
        fastrnn.set_backend("reference")
        assert fastrnn.get_backend() == "reference"
        assert backends.resolve("auto", "lstm", torch.device("cpu"), torch.float32, 4) \
            == "reference"
    finally:
        fastrnn.set_backend("auto")
    assert fastrnn.get_backend() == "auto"


def test_available_backends_cpu_has_reference():
    assert fastrnn.available_backends("cpu")[0] == "reference"
    assert fastrnn.available_backends(torch.device("cpu")) == fastrnn.available_backends("cpu")


# -- argument types torch.nn refuses, hx dtypes and layouts, LSTMCell's hx ------------------

BACKENDS = fastrnn.available_backends("cpu")


@pytest.mark.parametrize("make", [
    lambda mod: mod.RNN(4, hidden_size=True),
    lambda mod: mod.RNN(4, 4, num_layers=2.0),
    lambda mod: mod.LSTM(3, 4, proj_size=True),
    lambda mod: mod.LSTM(3, 4, proj_size=2.0),
], ids=["rnn_hidden_true", "layers_float", "proj_true", "proj_float"])
def test_constructor_type_errors(make):
    assert_same_error(lambda: make(nn), lambda: make(fastrnn))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kwargs", [dict(bidirectional=1), dict(bidirectional=0),
                                    dict(bidirectional=None), dict(num_layers=True)], ids=str)
@pytest.mark.parametrize("pair", PAIRS, ids=lambda p: p[0].__name__)
def test_non_bool_bidirectional_and_bool_layers_fail_at_forward_like_torch(pair, kwargs,
                                                                           backend):
    # torch.nn's constructor accepts these; its kernels refuse them with a TypeError.
    torch_cls, fast_cls = pair
    assert_same_error(lambda: torch_cls(3, 4, **kwargs)(torch.zeros(2, 1, 3)),
                      lambda: fast_cls(3, 4, **kwargs, backend=backend)(torch.zeros(2, 1, 3)))


def _hx(cls, layers, batch, dtypes, dims=3):
    shape = (layers, batch, 4)[3 - dims:]
    if cls in (nn.LSTM, fastrnn.LSTM):
        return tuple(torch.zeros(shape, dtype=d) for d in dtypes)
    return torch.zeros(shape, dtype=dtypes[0])


HX_DTYPE_CASES = {
    "hx_float64": (lambda cls, m: m(torch.zeros(2, 1, 3), _hx(cls, 1, 1, (torch.float64,) * 2))),
    "h_float64": (lambda cls, m: m(torch.zeros(2, 1, 3),
                                   _hx(cls, 1, 1, (torch.float64, torch.float32)))),
    "c_float64": (lambda cls, m: m(torch.zeros(2, 1, 3),
                                   _hx(cls, 1, 1, (torch.float32, torch.float64)))),
    "hx_float16": (lambda cls, m: m(torch.zeros(2, 1, 3), _hx(cls, 1, 1, (torch.float16,) * 2))),
    "unbatched": (lambda cls, m: m(torch.zeros(2, 3),
                                   _hx(cls, 1, 1, (torch.float64,) * 2, dims=2))),
    "packed": (lambda cls, m: m(pack_sequence([torch.zeros(3, 3), torch.zeros(2, 3)]),
                                _hx(cls, 1, 2, (torch.float64,) * 2))),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(HX_DTYPE_CASES))
@pytest.mark.parametrize("pair", PAIRS, ids=lambda p: p[0].__name__)
def test_hidden_dtype_mismatch(pair, case, backend):
    torch_cls, fast_cls = pair
    if case == "c_float64" and torch_cls is not nn.LSTM:
        pytest.skip("only LSTM has a cell state")
    call = HX_DTYPE_CASES[case]
    fast = lambda: call(fast_cls, fast_cls(3, 4, backend=backend))  # noqa: E731
    # torch.nn's LSTM on its oneDNN path fails inside oneDNN ("get_mkldnn_dtype: unsupported
    # data type"); its default path gives the matmul's message, the one GRU and RNN give.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # flags() warns about TF32 on Intel GPUs
        with torch.backends.mkldnn.flags(enabled=False):
            assert_same_error(lambda: call(torch_cls, torch_cls(3, 4)), fast)
    assert raised(fast)[0] is raised(lambda: call(torch_cls, torch_cls(3, 4)))[0]


PACKED_LAYOUTS = {   # malformed PackedSequences: torch.nn fails inside its kernels
    "lengths_over_steps": lambda: pack_padded_sequence(torch.zeros(3, 2, 3), torch.tensor([5, 2])),
    "sizes_over_rows": lambda: PackedSequence(torch.zeros(5, 3), torch.tensor([3, 3])),
    "increasing_sizes": lambda: PackedSequence(torch.zeros(5, 3), torch.tensor([2, 3])),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(PACKED_LAYOUTS))
@pytest.mark.parametrize("pair", PAIRS, ids=lambda p: p[0].__name__)
def test_malformed_packed_input_raises_runtime_error_like_torch(pair, case, backend):
    # torch.nn's messages here come from whichever ATen kernel trips first (they differ
    # between its modules); fastrnn's type is torch.nn's, its message names the layout.
    torch_cls, fast_cls = pair
    expected = raised(lambda: torch_cls(3, 4)(PACKED_LAYOUTS[case]()))
    assert expected is not None and expected[0] is RuntimeError
    with pytest.raises(RuntimeError, match="batch_sizes"):
        fast_cls(3, 4, backend=backend)(PACKED_LAYOUTS[case]())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layers", [0, 1, 3])
@pytest.mark.parametrize("pair", PAIRS, ids=lambda p: p[0].__name__)
def test_packed_input_wrong_hidden_layers(pair, layers, backend):
    torch_cls, fast_cls = pair
    call = lambda cls, m: m(pack_sequence([torch.zeros(3, 3), torch.zeros(2, 3)]),  # noqa: E731
                            _hx(cls, layers, 2, (torch.float32,) * 2))
    assert_same_error(lambda: call(torch_cls, torch_cls(3, 4, 2)),
                      lambda: call(fast_cls, fast_cls(3, 4, 2, backend=backend)))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("enforce_sorted", [True, False])
@pytest.mark.parametrize("dims", [2, 4])
@pytest.mark.parametrize("pair", PAIRS, ids=lambda p: p[0].__name__)
def test_packed_input_hidden_dims(pair, dims, enforce_sorted, backend):
    # torch.nn.LSTM leaves a packed batch's hx unchecked (a 2-D one fails with an IndexError
    # inside ATen); GRU and RNN check it after putting it in the batch's order.
    torch_cls, fast_cls = pair
    shape = (2, 4) if dims == 2 else (1, 2, 4, 1)

    def call(cls, module):
        lengths = [3, 2] if enforce_sorted else [2, 3]
        x = pack_sequence([torch.zeros(n, 3) for n in lengths], enforce_sorted=enforce_sorted)
        h = torch.zeros(shape)
        return module(x, (h, h) if cls in (nn.LSTM, fastrnn.LSTM) else h)

    assert_same_error(lambda: call(torch_cls, torch_cls(3, 4)),
                      lambda: call(fast_cls, fast_cls(3, 4, backend=backend)))


def _lstm_cell_pair(backend):
    torch.manual_seed(0)
    reference = nn.LSTMCell(3, 4)
    fast = fastrnn.LSTMCell(3, 4, backend=backend)
    fast.load_state_dict(reference.state_dict())
    return reference, fast


LSTM_CELL_BAD_HX = {
    "three_states": lambda x, h: (x, (h, h, h)),
    "one_state": lambda x, h: (x, (h,)),
    "tensor": lambda x, h: (x, h),
    "none_state": lambda x, h: (x, (h, None)),
    "unbatched_one_state": lambda x, h: (x[0], (h[0],)),
    "unbatched_tensor": lambda x, h: (x[0], h[0]),
    "h_float64": lambda x, h: (x, (h.double(), h)),
    "list_of_three": lambda x, h: (x, [h, h, h]),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(LSTM_CELL_BAD_HX))
def test_lstm_cell_bad_hx(case, backend):
    reference, fast = _lstm_cell_pair(backend)
    x, h = torch.randn(2, 3), torch.randn(2, 4)
    args = LSTM_CELL_BAD_HX[case](x, h)
    assert_same_error(lambda: reference(*args), lambda: fast(*args))


LSTM_CELL_GOOD_HX = {   # what torch.nn.LSTMCell accepts
    "list": lambda x, h, c: (x, [h, c]),
    "unbatched_list": lambda x, h, c: (x[0], [h[0], c[0]]),
    "unbatched_three_states": lambda x, h, c: (x[0], (h[0], c[0], c[0])),  # extra ignored
    "c_float64": lambda x, h, c: (x, (h, c.double())),   # c's dtype wins: float64 h and c
    "c_float16": lambda x, h, c: (x, (h, c.half())),
    "unbatched_c_float64": lambda x, h, c: (x[0], (h[0], c[0].double())),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(LSTM_CELL_GOOD_HX))
def test_lstm_cell_hx_accepted_like_torch(case, backend):
    reference, fast = _lstm_cell_pair(backend)
    x, h, c = torch.randn(2, 3), torch.randn(2, 4), torch.randn(2, 4)
    results = []   # torch.nn, fastrnn, and torch.nn in float64: the truth
    for module in (reference, fast, copy.deepcopy(reference).double()):
        dtype = next(module.parameters()).dtype
        x_, h_, c_ = (t.to(dtype).requires_grad_() for t in (x, h, c))
        outputs = module(*LSTM_CELL_GOOD_HX[case](x_, h_, c_))
        grads = torch.autograd.grad(sum((o * (i + 1)).sum() for i, o in enumerate(outputs)),
                                    [x_, h_, c_, *module.parameters()])
        results.append(list(outputs) + list(grads))
    want, got, truth = results
    for a, e, t in zip(got, want, truth):
        # a float64 result (c float64 makes h and c float64) is held to torch.nn's own
        assert_close(a, e, None if e.dtype == torch.float64 else t)


@pytest.mark.parametrize("pair", CELL_PAIRS[1:], ids=lambda p: p[0].__name__)
def test_single_state_cell_given_a_tuple(pair):
    torch_cls, fast_cls = pair
    h = torch.zeros(2, 4)
    assert_same_error(lambda: torch_cls(3, 4)(torch.zeros(2, 3), (h,)),
                      lambda: fast_cls(3, 4)(torch.zeros(2, 3), (h,)))


@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("shape", [(0, 0, 3), (0, 3)], ids=["batch0", "unbatched"])
@pytest.mark.parametrize("pair", PAIRS, ids=lambda p: p[0].__name__)
def test_no_steps_raises_like_torch(pair, shape, batch_first):
    torch_cls, fast_cls = pair
    assert_same_error(lambda: torch_cls(3, 4, batch_first=batch_first)(torch.zeros(shape)),
                      lambda: fast_cls(3, 4, batch_first=batch_first)(torch.zeros(shape)))
