"""fastrnn.convert and the drop-in contract: parameters, initialisation, state_dict."""
import torch
from torch import nn

import fastrnn

from parity import FAST_TWIN, ctor_args


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
