"""Bad input gets the exception type and message torch.nn gives; fastrnn's own option
(backend=) says what was wrong and what is allowed."""
import warnings

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_sequence

import fastrnn

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
    if case == "packed_hidden_batch" and torch_cls is nn.LSTM:
        # torch.nn.LSTM skips its hidden-size check for packed input and fails later inside
        # ATen ("The size of tensor a (3) must match..."); fastrnn checks it up front.
        with pytest.raises(RuntimeError, match=r"Expected hidden\[0\] size \(1, 2, 4\), got"):
            BAD_FORWARDS[case](fast_cls, fast_cls(3, 4))
        return
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
