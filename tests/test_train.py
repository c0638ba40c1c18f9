"""fastrnn.train: truncation, state carrying, resets, clipping, tying, regularisers, and a
char-LM run that gives the same losses with fastrnn.LSTM and torch.nn.LSTM."""
import collections
import copy
import importlib.util
import math
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

import fastrnn
from fastrnn.testing import assert_all_close
from fastrnn.train import (TBPTT, EmbeddingDropout, LockedDropout, TrainStep,
                           activation_regularization, batchify, detach_state, embedding_dropout,
                           reset_state, temporal_activation_regularization, tie_weights)

from backend_cases import native_available_mark

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
F64 = dict(rtol=0, atol=1e-10)
RNNS = {"torch": nn.LSTM, "fastrnn": lambda *a, **k: fastrnn.LSTM(*a, backend="reference", **k)}


def lstm(kind, input_size=3, hidden=4, layers=1, seed=0):
    """An LSTM of either kind with the weights of a seeded torch.nn.LSTM, in float64."""
    torch.manual_seed(seed)
    ref = nn.LSTM(input_size, hidden, num_layers=layers).double()
    if kind == "torch":
        return ref
    m = RNNS[kind](input_size, hidden, num_layers=layers).double()
    m.load_state_dict(ref.state_dict())
    return m


def grads(loss, params):
    return torch.autograd.grad(loss, params)


# ----------------------------------------------------------------------------- state

def test_detach_state_keeps_structure_and_values():
    Pair = collections.namedtuple("Pair", "h c")
    x = torch.randn(2, 3, requires_grad=True)
    y = x * 2
    state = {"a": (y, y + 1), "b": [Pair(y, y * 3), None], "n": 5}
    out = detach_state(state)
    assert type(out["b"][0]) is Pair and out["b"][1] is None and out["n"] == 5
    for a, b in [(out["a"][0], y), (out["a"][1], y + 1), (out["b"][0].c, y * 3)]:
        assert not a.requires_grad and torch.equal(a, b)
    assert detach_state(None) is None


def test_reset_state_zeroes_only_masked_streams_and_keeps_their_gradients():
    h = torch.randn(2, 3, 4, requires_grad=True)   # [layers, B, H]
    c = torch.randn(2, 3, 4, requires_grad=True)
    mask = torch.tensor([False, True, False])
    h2, c2 = reset_state((h, c), mask)
    assert torch.equal(h2[:, 1], torch.zeros(2, 4)) and torch.equal(h2[:, [0, 2]], h[:, [0, 2]])
    assert torch.equal(c2[:, 1], torch.zeros(2, 4))
    (h2.sum() + c2.sum()).backward()
    assert torch.equal(h.grad[:, 1], torch.zeros(2, 4)) and torch.equal(h.grad[:, 0], torch.ones(2, 4))
    cell = reset_state(torch.ones(3, 4), mask, batch_dim=0)       # cell states [B, H]
    assert torch.equal(cell.sum(1), torch.tensor([4.0, 0.0, 4.0]))
    with pytest.raises(ValueError, match="bool"):
        reset_state(h, torch.tensor([0, 1, 0]))
    with pytest.raises(ValueError, match="batch_dim=1"):
        reset_state(h, torch.tensor([True, False]))


# ----------------------------------------------------------------------------- windows

def test_batchify_lays_out_contiguous_streams():
    data = torch.arange(23)
    s = batchify(data, 4)
    assert s.shape == (5, 4) and torch.equal(s[:, 1], torch.arange(5, 10))
    assert torch.equal(batchify(data, 4, batch_first=True), s.t())
    with pytest.raises(ValueError, match="batch_size"):
        batchify(data, 0)


@pytest.mark.parametrize("k1,k2,variable", [(4, None, False), (3, 7, False), (6, 9, True)])
def test_windows_cover_every_loss_step_once(k1, k2, variable):
    total = 50
    tb = TBPTT(k1, k2, variable_length=variable, min_length=2, std=2.0,
               generator=torch.Generator().manual_seed(1))
    x = torch.arange(total).view(total, 1)
    covered, prev_next = [], 0
    for ch in tb.chunks(x, x):
        assert ch.start == prev_next                   # starts where the previous chunk said
        assert torch.equal(ch.input[:, 0], torch.arange(ch.start, ch.start + ch.length))
        assert ch.start == max(0, ch.start + ch.loss_from - ((k2 or k1) - k1))
        covered += ch.loss_target[:, 0].tolist()
        assert math.isclose(ch.lr_scale, ch.loss_steps / k1)
        if not variable:
            assert ch.loss_steps == k1 or ch.start + ch.length == total
            assert ch.length <= (k2 or k1)
        prev_next = ch.start + ch.carry_at
    assert covered == list(range(total))


def test_variable_length_is_reproducible_and_awd_like():
    def lengths(seed):
        tb = TBPTT(35, variable_length=True, generator=torch.Generator().manual_seed(seed))
        return [c.loss_steps for c in tb.chunks(torch.zeros(5000, 1))]
    a = lengths(0)
    assert a == lengths(0) and a != lengths(1)
    assert min(a[:-1]) >= 5 and len(set(a)) > 5
    assert 30 < sum(a[:-1]) / len(a[:-1]) < 36      # mean ~ 0.95*35 + 0.05*17.5 - 0.5


def test_bad_window_arguments_are_named():
    with pytest.raises(ValueError, match="k1"):
        TBPTT(0)
    with pytest.raises(ValueError, match="k2 must be an int >= k1 = 5"):
        TBPTT(5, 3)
    with pytest.raises(ValueError, match="targets have 4"):
        next(TBPTT(2).chunks(torch.zeros(5, 1), torch.zeros(4, 1)))


# ----------------------------------------------------------------------------- truncation

@pytest.mark.parametrize("kind", ["torch", "fastrnn"])
@pytest.mark.parametrize("layers", [1, 2])
def test_truncation_is_real_and_state_carries_values(kind, layers):
    T, B, k = 10, 2, 4
    model = lstm(kind, layers=layers)
    params = list(model.parameters())
    torch.manual_seed(1)
    x = torch.randn(T, B, 3, dtype=torch.float64)
    w = torch.randn(T, B, 4, dtype=torch.float64)   # loss = sum(w * output)

    with torch.no_grad():
        full, _ = model(x)
    state, outs = None, []
    for ch in TBPTT(k).chunks(x, w):
        out, state = ch.run(model, state)
        outs.append(out.detach())
        g = grads((ch.loss_target * out).sum(), params)
        # Explicit: chunk i starts from the detached state of a forward over steps < start.
        with torch.no_grad():
            s0 = model(x[:ch.start])[1] if ch.start else None
        ref_out, _ = model(x[ch.start:ch.start + ch.length], s0)
        g_ref = grads((ch.loss_target * ref_out).sum(), params)
        for a, b in zip(g, g_ref):
            torch.testing.assert_close(a, b, **F64)
        if ch.start:   # a state still attached to the prefix's graph is cut by run() too
            live_out, _ = ch.run(model, model(x[:ch.start])[1])
            for a, b in zip(grads((ch.loss_target * live_out).sum(), params), g_ref):
                torch.testing.assert_close(a, b, **F64)
        if ch.start:   # and it differs from full backprop: the cut removed real gradient
            full_out, _ = model(x[:ch.start + ch.length])
            g_full = grads((ch.loss_target * full_out[ch.start:]).sum(), params)
            assert max((a - b).abs().max().item() for a, b in zip(g, g_full)) > 1e-6
    torch.testing.assert_close(torch.cat(outs), full, **F64)


@pytest.mark.parametrize("kind", ["torch", "fastrnn"])
def test_k2_window_backprops_k2_steps(kind):
    T, B, k1, k2 = 11, 2, 3, 5
    model = lstm(kind)
    params = list(model.parameters())
    torch.manual_seed(2)
    x = torch.randn(T, B, 3, dtype=torch.float64)
    w = torch.randn(T, B, 4, dtype=torch.float64)
    with torch.no_grad():
        full, _ = model(x)
    state, outs = None, []
    for ch in TBPTT(k1, k2).chunks(x, w):
        out, state = ch.run(model, state)
        outs.append(out.detach())
        g = grads((ch.loss_target * out).sum(), params)
        s, e = ch.start + ch.loss_from, ch.start + ch.length
        begin = max(0, s - (k2 - k1))
        assert ch.start == begin
        with torch.no_grad():
            s0 = model(x[:begin])[1] if begin else None
        ref_out, _ = model(x[begin:e], s0)              # k2 steps of graph, loss on the last k1
        g_ref = grads((w[s:e] * ref_out[s - begin:]).sum(), params)
        for a, b in zip(g, g_ref):
            torch.testing.assert_close(a, b, **F64)
    torch.testing.assert_close(torch.cat(outs), full, **F64)


@pytest.mark.parametrize("kind", ["torch", "fastrnn"])
@pytest.mark.parametrize("batch_first", [False, True])
def test_resets_restart_each_stream_from_zeros(kind, batch_first):
    T, k = 9, 4
    model = lstm(kind)
    if batch_first:
        model.batch_first = True
    torch.manual_seed(3)
    x = torch.randn(T, 2, 3, dtype=torch.float64)
    resets = torch.zeros(T, 2, dtype=torch.bool)
    resets[2, 0] = resets[6, 0] = resets[4, 1] = True     # stream 0: 3 sequences, stream 1: 2
    state, outs = None, []
    tb = TBPTT(k, batch_first=batch_first)
    src, rs = (x.transpose(0, 1), resets.t()) if batch_first else (x, resets)
    with torch.no_grad():
        for ch in tb.chunks(src, resets=rs):
            out, state = ch.run(model, state)
            outs.append(out.transpose(0, 1) if batch_first else out)
        got = torch.cat(outs)
        model.batch_first = False
        for b, bounds in [(0, [0, 2, 6, T]), (1, [0, 4, T])]:
            for a, e in zip(bounds[:-1], bounds[1:]):      # each sequence on its own, from zeros
                ref, _ = model(x[a:e, b:b + 1])
                torch.testing.assert_close(got[a:e, b:b + 1], ref, **F64)


def test_fresh_start_ignores_incoming_state_and_continue_keeps_it():
    model = lstm("torch")
    x = torch.randn(6, 2, 3, dtype=torch.float64)
    junk = (torch.ones(1, 2, 4, dtype=torch.float64), torch.ones(1, 2, 4, dtype=torch.float64))
    with torch.no_grad():
        first = next(TBPTT(3).chunks(x))
        torch.testing.assert_close(first.run(model, junk)[0], model(x[:3])[0], **F64)
        cont = next(TBPTT(3).chunks(x, fresh_start=False))
        torch.testing.assert_close(cont.run(model, junk)[0], model(x[:3], junk)[0], **F64)


class Recorder(nn.Module):
    """A fastrnn LSTM that notes the checkpoint_every it runs with."""

    def __init__(self, rnn):
        super().__init__()
        self.rnn, self.seen = rnn, []

    def forward(self, x, state):
        self.seen.append(self.rnn.checkpoint_every)
        return self.rnn(x, state)


@pytest.mark.parametrize("backend", ["reference", pytest.param("native", marks=native_available_mark())])
@pytest.mark.parametrize("every", [3, "auto", 12])
def test_checkpoint_every_gives_the_full_memory_windows(backend, every):
    """k2 > k1 windows, cut at a reset too: the outputs, carried states and gradients of the
    full-memory windows by the tolerance rule (not bit for bit: a segment's input projection
    is a GEMM over fewer rows, for which BLAS may round differently, and the weight gradients
    are summed per segment; with k >= k2, one segment per piece, the same bits); the layers
    run segmented inside the windows only."""
    torch.manual_seed(0)
    rnn = fastrnn.LSTM(3, 4, num_layers=2, backend=backend, dtype=torch.float64)
    x = torch.randn(23, 2, 3, dtype=torch.float64)
    w = torch.randn(23, 2, 4, dtype=torch.float64)
    resets = torch.zeros(23, 2, dtype=torch.bool)
    resets[13, 1] = True
    runs = {}
    for key in (None, every):
        model = Recorder(copy.deepcopy(rnn))
        state, outs, found = None, [], []
        for ch in TBPTT(5, 12, checkpoint_every=key).chunks(x, w, resets=resets):
            out, state = ch.run(model, state)
            outs += [out.detach(), *(state or ())]
            found += grads((ch.loss_target * out).sum(), list(model.parameters()))
        runs[key] = outs, found, model
    (outs_full, grads_full, plain), (outs_seg, grads_seg, segmented) = runs[None], runs[every]
    assert_all_close(outs_seg + grads_seg, outs_full + grads_full)
    if every == 12:
        assert all(torch.equal(a, b) for a, b in zip(outs_seg + grads_seg, outs_full + grads_full))
    assert set(plain.seen) == {None} and set(segmented.seen) == {every}
    assert segmented.rnn.checkpoint_every is None     # the layer's own setting is back


def test_checkpoint_every_needs_fastrnn_layers():
    x = torch.randn(6, 2, 3)
    chunk = next(TBPTT(3, checkpoint_every="auto").chunks(x))
    with pytest.raises(ValueError, match=r"no fastrnn LSTM/GRU/RNN layer; found torch.nn "
                                         r"layers model \(LSTM\) \(fastrnn.convert"):
        chunk.run(nn.LSTM(3, 4), None)
    with pytest.raises(TypeError, match="needs the model as an nn.Module, got function"):
        chunk.run(lambda x, s: (x, s), None)
    with pytest.raises(ValueError, match="TBPTT: checkpoint_every must be a positive int .* got 0"):
        TBPTT(3, checkpoint_every=0)
    rnn = fastrnn.LSTM(3, 4, checkpoint_every=2)     # the layer's own value stays by default
    model = Recorder(rnn)
    next(TBPTT(3).chunks(x)).run(model, None)
    assert model.seen == [2] and rnn.checkpoint_every == 2


# ----------------------------------------------------------------------------- TrainStep

def _toy(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()


@pytest.mark.parametrize("norm_type", [2.0, 1.0, math.inf])
def test_train_step_clips_as_clip_grad_norm(norm_type):
    x = torch.randn(4, 5, dtype=torch.float64) * 10
    a, b = _toy(), _toy()
    step = TrainStep(torch.optim.SGD(a.parameters(), lr=0.1), clip_norm=0.5, norm_type=norm_type)
    res = step(lambda: a(x).pow(2).sum())

    opt_b = torch.optim.SGD(b.parameters(), lr=0.1)
    b(x).pow(2).sum().backward()
    norm = torch.nn.utils.clip_grad_norm_(b.parameters(), 0.5, norm_type)
    opt_b.step()
    assert norm > 0.5, "the test must actually clip"
    torch.testing.assert_close(res.grad_norm, norm, rtol=0, atol=0)
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
    assert not res.skipped and step.steps == 1 and step.skipped == 0


def test_train_step_clips_by_value_and_returns_the_unclipped_norm():
    x = torch.randn(4, 5, dtype=torch.float64) * 10
    a, b = _toy(), _toy()
    res = TrainStep(torch.optim.SGD(a.parameters(), lr=1.0), clip_value=0.01)(lambda: a(x).sum())
    b(x).sum().backward()
    norm = torch.nn.utils.clip_grad_norm_(b.parameters(), math.inf, 2.0)
    for p in b.parameters():
        assert p.grad.abs().max() > 0.01 or p.grad.abs().max() == 0
        p.data -= p.grad.clamp(-0.01, 0.01)
    torch.testing.assert_close(res.grad_norm, norm, **F64)
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, **F64)


def test_train_step_skips_non_finite_steps_when_asked():
    x = torch.randn(4, 5, dtype=torch.float64)
    model = _toy()
    before = copy.deepcopy(model.state_dict())
    step = TrainStep(torch.optim.SGD(model.parameters(), lr=0.1), clip_norm=1.0, skip_nonfinite=True)
    res = step(lambda: (model(x).sum() * float("nan"), "extra"))
    assert res.skipped and res.extra == "extra" and step.skipped == 1
    assert all(p.grad is None for p in model.parameters())
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    res = step(lambda: model(x).sum())
    assert not res.skipped and step.skipped == 1 and step.steps == 2

    def finite_loss_infinite_grad():
        out = model(x)
        out.register_hook(lambda g: g * float("inf"))
        return out.sum()
    res = step(finite_loss_infinite_grad)
    assert math.isfinite(res.loss.item()) and not math.isfinite(res.grad_norm.item())
    assert res.skipped and step.skipped == 2
    # Without skipping, the step goes ahead and poisons the weights, as plain PyTorch would.
    plain = TrainStep(torch.optim.SGD(model.parameters(), lr=0.1), clip_norm=1.0)
    assert not plain(lambda: model(x).sum() * float("nan")).skipped
    assert torch.isnan(model[0].weight).all()


def test_train_step_rejects_bad_options():
    opt = torch.optim.SGD(_toy().parameters(), lr=0.1)
    with pytest.raises(ValueError, match="clip_norm"):
        TrainStep(opt, clip_norm=0)
    with pytest.raises(ValueError, match="scalar"):
        TrainStep(opt)(lambda: torch.ones(2, requires_grad=True))


# ----------------------------------------------------------------------------- tying

def test_tie_weights_shares_one_parameter():
    emb, dec = nn.Embedding(10, 6), nn.Linear(6, 10)
    model = nn.ModuleDict(dict(emb=emb, dec=dec))
    assert tie_weights(emb, dec) is dec and dec.weight is emb.weight
    assert sum(p.numel() for p in model.parameters()) == 60 + 10
    tokens = torch.tensor([1, 2, 3])
    dec(emb(tokens)).sum().backward()
    both = emb.weight.grad.clone()
    emb.weight.grad = None
    F.linear(emb(tokens).detach(), emb.weight).sum().backward()   # decoder use alone
    assert not torch.equal(both, emb.weight.grad)                 # so both uses added up


def test_tie_weights_names_the_shapes_when_they_differ():
    with pytest.raises(ValueError, match=r"\[10, 6\].*\[10, 8\].*Linear\(6, 10\)"):
        tie_weights(nn.Embedding(10, 6), nn.Linear(8, 10))
    with pytest.raises(TypeError, match="weight"):
        tie_weights(nn.Embedding(10, 6), nn.Tanh())


# ----------------------------------------------------------------------------- regularisers

@pytest.mark.parametrize("batch_first", [False, True])
def test_locked_dropout_uses_one_mask_for_all_steps(batch_first):
    torch.manual_seed(0)
    drop = LockedDropout(0.5, batch_first=batch_first)
    x = torch.ones(7, 3, 40)                                  # [T, B, F]
    y = drop(x.transpose(0, 1) if batch_first else x)
    y = y.transpose(0, 1) if batch_first else y
    assert torch.equal(y, y[:1].expand_as(y))                 # same at every step
    assert set(y.unique().tolist()) == {0.0, 2.0}             # kept values scaled by 1/(1-p)
    assert not torch.equal(y[0, 0], y[0, 1])                  # different per sequence
    drop.eval()
    assert drop(x) is x
    with pytest.raises(ValueError, match="between 0 and 1"):
        LockedDropout(1.5)


def test_locked_dropout_on_packed_sequence_masks_per_sequence():
    torch.manual_seed(0)
    x = torch.ones(5, 3, 30)
    packed = pack_padded_sequence(x, torch.tensor([5, 3, 2]), enforce_sorted=False)
    out = LockedDropout(0.5)(packed)
    rows = torch.cat([torch.arange(int(n)) for n in packed.batch_sizes])
    for seq in range(3):
        mine = out.data[rows == seq]
        assert torch.equal(mine, mine[:1].expand_as(mine))
    assert torch.equal(out.batch_sizes, packed.batch_sizes)


def test_embedding_dropout_drops_whole_words():
    torch.manual_seed(0)
    emb = nn.Embedding(50, 8, padding_idx=0)
    tokens = torch.arange(50).repeat(3, 1)                    # every word three times
    y = embedding_dropout(emb, tokens, 0.5)
    dropped = (y == 0).all(-1)
    assert torch.equal(dropped, dropped[:1].expand_as(dropped))   # per word, not per position
    assert 5 < int(dropped[0].sum()) < 45
    kept = ~dropped[0]
    torch.testing.assert_close(y[0][kept], 2 * emb.weight[kept])
    assert torch.equal(embedding_dropout(emb, tokens, 0.5, training=False), emb(tokens))
    wrapped = EmbeddingDropout(emb, 0.5).eval()
    assert torch.equal(wrapped(tokens), emb(tokens))


def test_ar_and_tar_values():
    torch.manual_seed(0)
    h = torch.randn(6, 2, 3, dtype=torch.float64)
    torch.testing.assert_close(activation_regularization(h, 2.0), 2.0 * (h ** 2).mean(), **F64)
    tar = temporal_activation_regularization(h, 1.5)
    manual = sum(((h[t] - h[t - 1]) ** 2).sum() for t in range(1, 6)) / (5 * 2 * 3)
    torch.testing.assert_close(tar, 1.5 * manual, **F64)
    torch.testing.assert_close(temporal_activation_regularization(h.transpose(0, 1), 1.5,
                                                                  batch_first=True), tar, **F64)
    assert temporal_activation_regularization(h[:1]).item() == 0.0
    mask = torch.ones(6, 2, dtype=torch.bool)
    mask[4:, 1] = False                                       # sequence 1 has 4 real steps
    manual = (((h[1:, 0] - h[:-1, 0]) ** 2).sum() + ((h[1:4, 1] - h[:3, 1]) ** 2).sum()) / ((5 + 3) * 3)
    torch.testing.assert_close(temporal_activation_regularization(h, 1.0, mask=mask), manual, **F64)
    manual = ((h[:, 0] ** 2).sum() + (h[:4, 1] ** 2).sum()) / (10 * 3)
    torch.testing.assert_close(activation_regularization(h, 1.0, mask=mask), manual, **F64)


# ----------------------------------------------------------------------------- char LM

def _char_lm_module():
    spec = importlib.util.spec_from_file_location("char_lm", os.path.join(ROOT, "examples", "char_lm.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("backend", ["reference", "native"])
def test_char_lm_losses_match_between_fastrnn_and_torch_lstm(backend):
    """Same state_dict loaded into both, same dropout seeds: the same losses, step by step."""
    if backend not in fastrnn.available_backends("cpu"):
        pytest.skip(f"fastrnn backend {backend!r} is not available on this machine")
    char_lm = _char_lm_module()
    with open(char_lm.CORPUS, encoding="utf-8") as f:
        text = f.read(2000)
    chars = sorted(set(text))
    data = torch.tensor([chars.index(c) for c in text])
    stream = batchify(data, 4)

    torch.manual_seed(0)
    ref = char_lm.CharLM(len(chars), 12, 2, dropout=0.2).double()
    models = {"torch": ref}
    fast = char_lm.CharLM(len(chars), 12, 2, dropout=0.2).double()
    fast.rnn = fastrnn.LSTM(12, 12, num_layers=2, backend=backend).double()
    fast.load_state_dict(ref.state_dict())
    assert fast.decoder.weight is fast.embedding.weight
    models["fastrnn"] = fast

    losses = {}
    for kind, model in models.items():
        model = copy.deepcopy(model)
        torch.manual_seed(123)                                # same dropout masks in both runs
        step = TrainStep(torch.optim.Adam(model.parameters(), lr=1e-2), clip_norm=0.5)
        state, run = None, []
        for chunk in TBPTT(7, variable_length=True, min_length=3, std=2.0,
                           generator=torch.Generator().manual_seed(5)).lm_chunks(stream[:60]):
            def loss_fn():
                (logits, raw, dropped), new = chunk.run(model, state)
                ce = F.cross_entropy(logits.flatten(0, 1), chunk.loss_target.flatten())
                return (ce + activation_regularization(dropped, 2.0)
                        + temporal_activation_regularization(raw, 1.0)), (ce.item(), new)
            res = step(loss_fn)
            run.append((res.extra[0], res.grad_norm.item()))
            state = res.extra[1]
        losses[kind] = torch.tensor(run, dtype=torch.float64)
    assert len(losses["torch"]) >= 6
    assert losses["torch"][-1, 0] < losses["torch"][0, 0]    # it learns
    torch.testing.assert_close(losses["fastrnn"], losses["torch"], rtol=1e-10, atol=1e-10)


def _small_char_lm_args(char_lm, tmp_path):
    """Arguments of a 5-update float64 run of the example on its corpus' first 3000 chars."""
    corpus = tmp_path / "small.txt"
    with open(char_lm.CORPUS, encoding="utf-8") as f:
        corpus.write_text(f.read(3000), encoding="utf-8")
    return ["--corpus", str(corpus), "--hidden", "16", "--batch-size", "4", "--bptt", "10",
            "--epochs", "1", "--max-steps", "5", "--dtype", "float64", "--no-progress",
            "--sample-length", "20", "--log-every", "0"]


def test_char_lm_example_runs_the_same_with_both_rnns(tmp_path, capsys):
    char_lm = _char_lm_module()
    args = _small_char_lm_args(char_lm, tmp_path)
    runs = {rnn: char_lm.main(args + ["--rnn", rnn] + (["--backend", "reference"] if rnn == "fastrnn" else []))
            for rnn in ("torch", "fastrnn")}
    out = capsys.readouterr().out
    assert "fastrnn.nn" in out and "--- sample" in out
    assert len(runs["torch"]) == 5
    torch.testing.assert_close(torch.tensor(runs["fastrnn"]), torch.tensor(runs["torch"]),
                               rtol=1e-10, atol=1e-10)


def test_char_lm_example_runs_fastrnn_only_options(tmp_path, capsys):
    """The fastrnn-only options build a fastrnn LSTM with them from the same starting
    weights (a cell clip that never engages gives the plain run's losses), they change the
    run, and torch.nn refuses them."""
    char_lm = _char_lm_module()
    args = _small_char_lm_args(char_lm, tmp_path)
    plain = char_lm.main(args)
    torch.testing.assert_close(torch.tensor(char_lm.main(args + ["--cell-clip", "1e6"])),
                               torch.tensor(plain), rtol=1e-10, atol=1e-10)
    varied = char_lm.main(args + ["--layer-norm", "--recurrent-dropout", "0.25",
                                  "--zoneout", "0.05", "0.1", "--cell-clip", "5"])
    out = capsys.readouterr().out
    assert "layer_norm=True, recurrent_dropout=0.25, zoneout=(0.05, 0.1), cell_clip=5.0" in out
    assert len(varied) == 5 and all(math.isfinite(loss) for loss in varied)
    assert varied != plain
    with pytest.raises(SystemExit):
        char_lm.main(args + ["--rnn", "torch", "--layer-norm"])
    assert "torch.nn.LSTM has no layer_norm" in capsys.readouterr().err
