"""fastrnn.convert and the drop-in contract: parameters, initialisation, state_dict."""
import copy
import warnings

import pytest
import torch
from torch import nn

import fastrnn

from parity import FAST_TWIN, cpu_backends, ctor_args


class Nested(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = nn.LSTM(3, 6, num_layers=2, bidirectional=True, batch_first=True)
        shared = nn.GRU(12, 5)
        self.decoder = nn.ModuleDict({"first": shared, "again": shared,
                                      "deep": nn.Sequential(nn.Linear(5, 4), nn.RNN(4, 4))})
        self.cell = nn.LSTMCell(5, 3)
        self.relu_cell = nn.RNNCell(3, 2, nonlinearity="relu")
        self.proj = nn.LSTM(2, 4, proj_size=2, bias=False)

    def forward(self, x):
        y, _ = self.encoder(x)
        z, h = self.decoder["first"](y.transpose(0, 1))
        z2, _ = self.decoder["again"](y.transpose(0, 1), h)
        w, _ = self.decoder["deep"][1](self.decoder["deep"][0](z2))
        hc = self.cell(z[-1])
        r = self.relu_cell(hc[0])
        p, _ = self.proj(r.unsqueeze(0))
        return w.sum() + p.sum() + hc[1].sum()


def test_convert_nested_shared_model_gives_identical_outputs():
    torch.manual_seed(0)
    model = Nested().double()
    x = torch.randn(2, 5, 3, dtype=torch.float64)
    expected = model(x)
    params_before = {name: p for name, p in model.named_parameters()}
    converted = fastrnn.convert(model, backend="reference")
    assert converted is model
    assert isinstance(model.encoder, fastrnn.LSTM)
    assert isinstance(model.decoder["first"], fastrnn.GRU)
    assert model.decoder["again"] is model.decoder["first"], "a shared RNN stays shared"
    assert isinstance(model.decoder["deep"][1], fastrnn.RNN)
    assert isinstance(model.cell, fastrnn.LSTMCell)
    assert isinstance(model.relu_cell, fastrnn.RNNCell)
    assert model.relu_cell.nonlinearity == "relu"
    assert model.proj.proj_size == 2 and not model.proj.bias
    assert model.encoder.backend == "reference"
    # the very same Parameter objects: optimizers built before convert keep working
    params_after = dict(model.named_parameters())
    assert params_after.keys() == params_before.keys()
    assert all(params_after[n] is params_before[n] for n in params_before)
    torch.testing.assert_close(model(x), expected, rtol=1e-12, atol=1e-12)


def test_convert_root_keeps_training_mode_dtype_and_device():
    lstm = nn.LSTM(3, 4, num_layers=2, dropout=0.25).to(torch.float64).eval()
    fast = fastrnn.convert(lstm)
    assert isinstance(fast, fastrnn.LSTM)
    assert not fast.training
    assert fast.dropout == 0.25 and fast.num_layers == 2
    assert all(p.dtype == torch.float64 and p.device.type == "cpu" for p in fast.parameters())
    fast_cell = fastrnn.convert(nn.GRUCell(3, 4))
    assert isinstance(fast_cell, fastrnn.GRUCell) and fast_cell.training


def test_convert_leaves_fastrnn_modules_and_subclasses_alone():
    class MyLSTM(nn.LSTM):
        pass

    model = nn.Sequential(MyLSTM(3, 4), fastrnn.GRU(4, 4))
    mine, fast = model[0], model[1]
    fastrnn.convert(model)
    assert model[0] is mine and model[1] is fast


def test_convert_does_not_draw_random_numbers():
    model = nn.LSTM(3, 4)
    torch.manual_seed(3)
    expected = torch.rand(1)
    torch.manual_seed(3)
    fastrnn.convert(model)
    assert torch.equal(torch.rand(1), expected)


def test_same_initialisation_and_state_dict_both_ways():
    configs = [(nn.LSTM, dict(num_layers=2, bidirectional=True, proj_size=3)),
               (nn.LSTM, dict(bias=False)), (nn.GRU, dict(num_layers=3)),
               (nn.RNN, dict(nonlinearity="relu", bidirectional=True)),
               (nn.LSTMCell, {}), (nn.GRUCell, dict(bias=False)), (nn.RNNCell, {})]
    for cls, kwargs in configs:
        torch.manual_seed(11)
        reference = cls(5, 7, **kwargs)
        torch.manual_seed(11)
        fast = FAST_TWIN[cls](5, 7, **kwargs)
        ref_state, fast_state = reference.state_dict(), fast.state_dict()
        assert list(ref_state) == list(fast_state), cls
        for name in ref_state:
            assert torch.equal(ref_state[name], fast_state[name]), (cls, name)
        # load in both directions, strictly
        torch.manual_seed(12)
        other = FAST_TWIN[cls](**ctor_args(reference))
        other.load_state_dict(reference.state_dict(), strict=True)
        back = cls(**ctor_args(other))
        back.load_state_dict(other.state_dict(), strict=True)
        assert all(torch.equal(a, b) for a, b in zip(back.state_dict().values(),
                                                     ref_state.values()))


def test_module_attributes_match_torch():
    reference = nn.LSTM(3, 6, num_layers=2, proj_size=2, bidirectional=True)
    fast = fastrnn.LSTM(3, 6, num_layers=2, proj_size=2, bidirectional=True)
    assert repr(fast).replace("fastrnn.", "") == repr(reference).replace("torch.nn.", "")
    assert [[p.shape for p in layer] for layer in fast.all_weights] == \
        [[p.shape for p in layer] for layer in reference.all_weights]
    assert fast._flat_weights_names == reference._flat_weights_names
    fast.flatten_parameters()  # accepted, a no-op
    assert repr(fastrnn.RNNCell(3, 4, nonlinearity="relu", bias=False)) == \
        repr(nn.RNNCell(3, 4, nonlinearity="relu", bias=False))


class WeightDrop(nn.Module):
    """AWD-LSTM's WeightDrop (salesforce/awd-lstm-lm), as published: the wrapped RNN's
    weight_hh_l0 is deleted and re-registered as weight_hh_l0_raw, and each forward sets the
    dropped weight as a plain tensor attribute before calling the RNN."""

    def __init__(self, module, weights, dropout=0.0):
        super().__init__()
        self.module, self.weights, self.dropout = module, weights, dropout
        if issubclass(type(self.module), nn.RNNBase):
            self.module.flatten_parameters = self.widget_demagnetizer_y2k_edition
        for name_w in self.weights:
            w = getattr(self.module, name_w)
            del self.module._parameters[name_w]
            self.module.register_parameter(name_w + "_raw", nn.Parameter(w.data))

    def widget_demagnetizer_y2k_edition(*args, **kwargs):
        return

    def forward(self, *args):
        for name_w in self.weights:
            raw_w = getattr(self.module, name_w + "_raw")
            setattr(self.module, name_w, nn.functional.dropout(raw_w, p=self.dropout,
                                                               training=self.training))
        return self.module.forward(*args)


def _grads_after(model, x, seed):
    torch.manual_seed(seed)
    out = model(x)[0]
    return [out] + list(torch.autograd.grad(out.pow(2).sum(), list(model.parameters())))


def _weight_dropped(calls_before, x):
    torch.manual_seed(0)
    model = WeightDrop(nn.LSTM(4, 5, num_layers=2).double(), ["weight_hh_l0", "weight_hh_l1"],
                       dropout=0.5)
    for _ in range(calls_before):
        model(x)
    return model


def test_convert_carries_over_awd_lstm_weight_drop():
    x = torch.randn(6, 3, 4, dtype=torch.float64)
    for calls_before in (0, 1):   # converted before its first call, and after one
        reference, fast = _weight_dropped(calls_before, x), _weight_dropped(calls_before, x)
        params = dict(fast.named_parameters())
        fastrnn.convert(fast, backend=cpu_backends()[-1])
        assert isinstance(fast.module, fastrnn.LSTM)
        after = dict(fast.named_parameters())
        assert list(after) == list(params) and all(after[n] is params[n] for n in params)
        assert "module.weight_hh_l0_raw" in after and "module.weight_hh_l0" not in after
        for mode in (True, False):   # dropout drawn in training, plain weights in eval
            reference.train(mode)
            fast.train(mode)
            for i, (actual, expected) in enumerate(zip(_grads_after(fast, x, 5),
                                                       _grads_after(reference, x, 5))):
                torch.testing.assert_close(actual, expected, rtol=1e-12, atol=1e-12,
                                           msg=f"training={mode}, result {i}")
        # and back to torch.nn, still wrapped
        fastrnn.to_torch(fast)
        assert type(fast.module) is nn.LSTM
        torch.testing.assert_close(_grads_after(fast, x, 6)[0], _grads_after(reference, x, 6)[0],
                                   rtol=1e-12, atol=1e-12)


def test_convert_carries_over_hooks_and_buffers():
    """weight_norm (a forward pre-hook recomputing the weight it replaced), a forward hook and
    a buffer keep working on the converted module, and training follows torch.nn."""
    torch.manual_seed(0)
    base = nn.LSTM(4, 5).double()
    models = []
    for _ in range(2):
        model = nn.utils.weight_norm(copy.deepcopy(base), "weight_hh_l0")
        model.register_buffer("calls", torch.zeros(()))
        model.register_forward_hook(lambda mod, args, out: mod.calls.add_(1) and None)
        models.append(model)
    reference, fast = models[0], fastrnn.convert(models[1], backend=cpu_backends()[-1])
    assert isinstance(fast, fastrnn.LSTM)
    x = torch.randn(6, 3, 4, dtype=torch.float64)
    for model in (reference, fast):
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        for _ in range(3):
            opt.zero_grad()
            model(x)[0].pow(2).sum().backward()
            opt.step()
    assert fast.calls.item() == reference.calls.item() == 3
    assert [n for n, _ in fast.named_buffers()] == ["calls"]
    with torch.no_grad():
        torch.testing.assert_close(fast(x)[0], reference(x)[0], rtol=1e-12, atol=1e-12)


def test_convert_leaves_a_module_it_cannot_rebuild_with_one_warning():
    odd = nn.GRU(3, 4)
    odd.hidden_size = 0   # a state fastrnn's constructor refuses
    model = nn.Sequential(nn.LSTM(3, 3), nn.Sequential(odd), nn.RNN(3, 3))
    with pytest.warns(UserWarning) as record:
        fastrnn.convert(model)
    assert len(record) == 1
    assert "fastrnn.convert left 1.0 (GRU) as it is" in str(record[0].message)
    assert model[1][0] is odd
    assert isinstance(model[0], fastrnn.LSTM) and isinstance(model[2], fastrnn.RNN)


def test_convert_and_back_add_no_dropout_warning():
    """torch.nn warns about dropout on a one-layer module once, when it is built."""
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        gru = nn.GRU(4, 4, 1, dropout=0.2)
        assert len(record) == 1 and "dropout" in str(record[0].message)
        fast = fastrnn.convert(gru)
        assert fast.dropout == 0.2
        assert type(fastrnn.to_torch(fast)) is nn.GRU
        torch.jit.script(fast)   # scripting compiles a torch.nn twin too
    dropout = [str(w.message) for w in record if "dropout" in str(w.message)]
    assert len(dropout) == 1, dropout
