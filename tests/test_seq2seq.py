"""fastrnn.seq2seq: attention kinds against hand computations, decoding rules, beam search
against exhaustive search / greedy / one sentence at a time, teacher forcing, schedules."""
import itertools
import math

import pytest
import torch

from fastrnn import seq2seq as s2s
from fastrnn.seq2seq import schedules

DT = torch.float64


# --------------------------------------------------------------------------- a toy model
# A deterministic "language model": next-token log-probs depend on the whole prefix through
# a small recurrent state, so exhaustive search over all sequences is easy to write.

class ToyLM:
    def __init__(self, vocab, hidden=6, batch=1, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.vocab = vocab
        self.emb = torch.randn(vocab, hidden, generator=g, dtype=DT)
        self.w = torch.randn(hidden, hidden, generator=g, dtype=DT)
        self.u = torch.randn(hidden, vocab, generator=g, dtype=DT) * 1.5
        self.h0 = torch.randn(batch, hidden, generator=g, dtype=DT)  # one start per sentence
        self.bias = torch.zeros(vocab, dtype=DT)
        self.calls = []  # rows per step_fn call

    def step_fn(self, tokens, state):
        self.calls.append(tokens.numel())
        h = torch.tanh(state["h"] @ self.w + self.emb[tokens])
        return torch.log_softmax(h @ self.u + self.bias, dim=-1), {"h": h, "meta": None}

    def state(self, rows=None):
        h0 = self.h0 if rows is None else self.h0[rows]
        return {"h": h0.clone(), "meta": None}

    def score(self, b, seq):
        """Sum of log-probs of ``seq`` (a tuple of tokens) for sentence b."""
        state, total, prev = self.state([b]), 0.0, None
        for tok in seq:
            inp = torch.tensor([prev if prev is not None else BOS])
            lp, state = self.step_fn(inp, state)
            total += lp[0, tok].item()
            prev = tok
        return total


BOS, EOS = 0, 1


def all_hypotheses(vocab, max_len, min_len):
    """Every finished hypothesis: ends at its first EOS (not before min_len tokens) or at max_len."""
    words = [v for v in range(vocab) if v != EOS]
    for n in range(min_len, max_len):
        for body in itertools.product(words, repeat=n):
            yield body + (EOS,)
    for body in itertools.product(words, repeat=max_len):
        yield body


def penalised(raw, length, length_penalty):
    fn = s2s.length_penalty_fn(length_penalty)
    return raw if fn is None else raw / float(fn(torch.tensor(float(length), dtype=DT)))


def exhaustive(lm, b, max_len, min_len, n_best, length_penalty=None):
    scored = []
    for seq in all_hypotheses(lm.vocab, max_len, min_len):
        raw = lm.score(b, seq)
        scored.append((penalised(raw, len(seq), length_penalty), raw, seq))
    scored.sort(key=lambda x: -x[0])
    return scored[:n_best]


def hypotheses_of(result, b):
    out = []
    for k in range(result.tokens.size(1)):
        n = int(result.lengths[b, k])
        out.append((float(result.scores[b, k]), float(result.log_probs[b, k]),
                    tuple(result.tokens[b, k, :n].tolist())))
    return out


# --------------------------------------------------------------------------- beam search

@pytest.mark.parametrize("length_penalty", [None, ("gnmt", 0.6), ("avg", 1.0), ("avg", -0.5),
                                            pytest.param(lambda n: 1.0 + 0.3 * n, id="callable")])
@pytest.mark.parametrize("min_len", [0, 2])
def test_beam_search_equals_exhaustive_search(length_penalty, min_len):
    vocab, max_len, batch = 3, 4, 3   # tokens {0, 2} besides EOS: 2 + 4 + 8 + 16 + 16 = 31 hypotheses at most
    lm = ToyLM(vocab, batch=batch, seed=1)
    n_best = 5
    r = s2s.beam_search(lm.step_fn, lm.state(), batch_size=batch, beam_size=32, bos=BOS, eos=EOS,
                        max_len=max_len, min_len=min_len, n_best=n_best, length_penalty=length_penalty)
    assert r.tokens.shape == (batch, n_best, max_len)
    for b in range(batch):
        got = hypotheses_of(r, b)
        want = exhaustive(lm, b, max_len, min_len, n_best, length_penalty)
        assert [g[2] for g in got] == [w[2] for w in want]
        for g, w in zip(got, want):
            assert g[0] == pytest.approx(w[0], abs=1e-10)
            assert g[1] == pytest.approx(w[1], abs=1e-10)
        # padding after the end
        for k, (_, _, seq) in enumerate(got):
            assert (r.tokens[b, k, len(seq):] == 0).all()


def textbook_beam_search(lm, b, beam, max_len, min_len, n_best, length_penalty):
    """One sentence, plain Python lists, no early stop: rank the 2*beam best extensions,
    finish the ending ones among the best beam, keep the best beam that do not end."""
    live, finished = [(0.0, ())], []
    for t in range(max_len):
        cands = []
        for raw, prefix in live:
            state = lm.state([b])
            for tok in (BOS,) + prefix:
                lp, state = lm.step_fn(torch.tensor([tok]), state)
            for v in range(lm.vocab):
                if not (v == EOS and t < min_len):
                    cands.append((raw + lp[0, v].item(), prefix + (v,)))
        cands.sort(key=lambda c: -c[0])
        cands = cands[:2 * beam]
        ends = [c for c in cands[:beam] if c[1][-1] == EOS or t + 1 == max_len]
        finished += [(penalised(raw, len(seq), length_penalty), raw, seq) for raw, seq in ends]
        live = [c for c in cands if c[1][-1] != EOS][:beam]
    finished.sort(key=lambda f: -f[0])
    return finished[:n_best]


@pytest.mark.parametrize("length_penalty", [None, ("gnmt", 0.8), ("avg", 1.0)])
@pytest.mark.parametrize("beam", [2, 3])
def test_beam_search_equals_textbook_beam_search(beam, length_penalty):
    # EOS is likely enough to often rank first, so finished hypotheses would starve a beam
    # that took only `beam` candidates; the early stop must not change the result either.
    vocab, batch, max_len, min_len = 5, 4, 6, 1
    lm = ToyLM(vocab, batch=batch, seed=10 + beam)
    lm.bias[EOS] = 1.5
    r = s2s.beam_search(lm.step_fn, lm.state(), batch_size=batch, beam_size=beam, bos=BOS, eos=EOS,
                        max_len=max_len, min_len=min_len, n_best=beam, length_penalty=length_penalty)
    for b in range(batch):
        want = textbook_beam_search(lm, b, beam, max_len, min_len, beam, length_penalty)
        got = hypotheses_of(r, b)
        assert [g[2] for g in got] == [w[2] for w in want]
        for g, w in zip(got, want):
            assert g[0] == pytest.approx(w[0], abs=1e-10) and g[1] == pytest.approx(w[1], abs=1e-10)


def test_beam_search_returns_empty_slots_when_fewer_hypotheses_exist():
    lm = ToyLM(2, batch=2, seed=2)  # vocab {BOS-as-token 0, EOS}: max_len 2 -> (1,), (0,1), (0,0)
    r = s2s.beam_search(lm.step_fn, lm.state(), batch_size=2, beam_size=4, bos=BOS, eos=EOS,
                        max_len=2, n_best=4)
    for b in range(2):
        want = exhaustive(lm, b, 2, 0, 3)
        got = hypotheses_of(r, b)
        assert [g[2] for g in got[:3]] == [w[2] for w in want]
        assert got[3][0] == -math.inf and got[3][2] == ()
        assert (r.tokens[b, 3] == 0).all()


def test_beam_one_equals_greedy():
    vocab, batch, max_len = 7, 5, 5
    lm = ToyLM(vocab, batch=batch, seed=3)
    lm.bias[EOS] = 1.0  # some sentences end early, some run to max_len
    beam = s2s.beam_search(lm.step_fn, lm.state(), batch_size=batch, beam_size=1, bos=BOS, eos=EOS,
                           max_len=max_len, min_len=1)
    greedy = s2s.greedy_search(lm.step_fn, lm.state(), batch_size=batch, bos=BOS, eos=EOS,
                               max_len=max_len, min_len=1)
    assert torch.equal(beam.tokens[:, 0], greedy.tokens)
    assert torch.equal(beam.lengths[:, 0], greedy.lengths)
    torch.testing.assert_close(beam.scores[:, 0], greedy.scores, rtol=0, atol=1e-12)
    assert (greedy.lengths < max_len).any() and (greedy.lengths == max_len).any()


@pytest.mark.parametrize("length_penalty", [None, ("gnmt", 1.0)])
def test_batched_beam_search_equals_one_sentence_at_a_time(length_penalty):
    vocab, batch, max_len, beam = 9, 6, 10, 4
    lm = ToyLM(vocab, batch=batch, seed=4)
    kw = dict(beam_size=beam, bos=BOS, eos=EOS, max_len=max_len, n_best=3, length_penalty=length_penalty)
    batched = s2s.beam_search(lm.step_fn, lm.state(), batch_size=batch, **kw)
    for b in range(batch):
        one = s2s.beam_search(lm.step_fn, lm.state([b]), batch_size=1, **kw)
        assert torch.equal(batched.tokens[b], one.tokens[0])
        assert torch.equal(batched.lengths[b], one.lengths[0])
        torch.testing.assert_close(batched.scores[b], one.scores[0], rtol=0, atol=1e-12)
        # every reported score is the model's own score of the reported tokens
        for score, raw, seq in hypotheses_of(batched, b):
            assert raw == pytest.approx(lm.score(b, seq), abs=1e-10)
            assert score == pytest.approx(penalised(raw, len(seq), length_penalty), abs=1e-10)


def test_finished_sentences_are_dropped_from_the_batch():
    # Sentence 0's EOS is almost certain at once; sentence 1 never may end before max_len.
    vocab, beam, max_len = 5, 3, 8

    def step_fn(tokens, state):
        lp = torch.full((tokens.numel(), vocab), -5.0, dtype=DT)
        lp[:, EOS] = torch.where(state["sentence"] == 0, -1e-3, -50.0)
        lp[:, 2] = -1.0
        calls.append(tokens.numel())
        return lp, state

    calls = []
    r = s2s.beam_search(step_fn, {"sentence": torch.tensor([0, 1])}, batch_size=2, beam_size=beam,
                        bos=BOS, eos=EOS, max_len=max_len)
    assert r.lengths.tolist() == [[1], [max_len]]
    assert calls[0] == 2 * beam and all(n == beam for n in calls[1:]) and len(calls) == max_len


def test_beam_search_stops_once_no_live_hypothesis_can_win():
    lm = ToyLM(4, batch=2, seed=5)
    lm.bias[EOS] = 5.0  # EOS dominates: every sentence ends after a step or two
    r = s2s.beam_search(lm.step_fn, lm.state(), batch_size=2, beam_size=3, bos=BOS, eos=EOS, max_len=50)
    assert len(lm.calls) < 10
    assert (r.lengths <= 3).all()


def test_min_len_max_len_and_eos_rules():
    vocab, batch, max_len = 6, 4, 7
    lm = ToyLM(vocab, batch=batch, seed=6)
    lm.bias[EOS] = 30.0  # EOS is by far the likeliest token everywhere
    for min_len in (0, 3, max_len):
        for result in (
            s2s.greedy_search(lm.step_fn, lm.state(), batch_size=batch, bos=BOS, eos=EOS,
                              max_len=max_len, min_len=min_len),
            s2s.sample(lm.step_fn, lm.state(), batch_size=batch, bos=BOS, eos=EOS, max_len=max_len,
                       min_len=min_len, generator=torch.Generator().manual_seed(0)),
        ):
            want_len = min(min_len + 1, max_len)
            assert result.lengths.tolist() == [want_len] * batch
            for b in range(batch):
                seq = result.tokens[b].tolist()
                assert EOS not in seq[:want_len - 1]
                if want_len <= min_len:        # min_len == max_len: EOS is never allowed
                    assert EOS not in seq
                else:
                    assert seq[want_len - 1] == EOS and all(t == 0 for t in seq[want_len:])
        beam = s2s.beam_search(lm.step_fn, lm.state(), batch_size=batch, beam_size=3, bos=BOS, eos=EOS,
                               max_len=max_len, min_len=min_len, n_best=3)
        for b in range(batch):
            for _, _, seq in hypotheses_of(beam, b):
                assert EOS not in seq[:-1]
                assert len(seq) == max_len or (seq[-1] == EOS and len(seq) > min_len)
                assert len(seq) <= max_len


def test_greedy_scores_and_one_path_padding():
    lm = ToyLM(5, batch=3, seed=7)
    r = s2s.greedy_search(lm.step_fn, lm.state(), batch_size=3, bos=BOS, eos=EOS, max_len=9)
    for b in range(3):
        n = int(r.lengths[b])
        seq = tuple(r.tokens[b, :n].tolist())
        assert float(r.scores[b]) == pytest.approx(lm.score(b, seq), abs=1e-10)
        assert (r.tokens[b, n:] == 0).all()


def test_sampling_filters():
    logits = torch.log(torch.tensor([[0.5, 0.2, 0.15, 0.1, 0.05]]))
    assert torch.isfinite(s2s.filter_logits(logits, top_k=2)).tolist() == [[True, True, False, False, False]]
    assert torch.isfinite(s2s.filter_logits(logits, top_p=0.5)).tolist() == [[True, False, False, False, False]]
    assert torch.isfinite(s2s.filter_logits(logits, top_p=0.8)).tolist() == [[True, True, True, False, False]]
    assert torch.isfinite(s2s.filter_logits(logits, top_k=2, top_p=0.9)).sum() == 2
    shuffled = logits[:, [3, 0, 4, 2, 1]]
    assert torch.isfinite(s2s.filter_logits(shuffled, top_p=0.8)).tolist() == [[False, True, False, True, True]]


def test_sample_follows_the_model_distribution():
    probs = torch.tensor([0.0, 0.0, 0.6, 0.3, 0.1])   # never EOS (index 1)
    def step_fn(tokens, state):
        return torch.log(probs).expand(tokens.numel(), -1), state
    g = torch.Generator().manual_seed(0)
    r = s2s.sample(step_fn, None, batch_size=4000, bos=BOS, eos=EOS, max_len=1, generator=g)
    freq = torch.bincount(r.tokens[:, 0], minlength=5).double() / 4000
    torch.testing.assert_close(freq, probs.double(), atol=0.03, rtol=0)
    r = s2s.sample(step_fn, None, batch_size=2000, bos=BOS, eos=EOS, max_len=1, top_k=1, generator=g)
    assert (r.tokens[:, 0] == 2).all()
    torch.testing.assert_close(r.scores, torch.full((2000,), math.log(0.6)))
    r = s2s.sample(step_fn, None, batch_size=4000, bos=BOS, eos=EOS, max_len=1, temperature=0.5, generator=g)
    sharp = probs ** 2 / (probs ** 2).sum()
    torch.testing.assert_close(torch.bincount(r.tokens[:, 0], minlength=5).double() / 4000, sharp.double(),
                               atol=0.03, rtol=0)


def test_search_argument_errors():
    lm = ToyLM(4)
    kw = dict(batch_size=1, bos=BOS, eos=EOS, max_len=3)
    with pytest.raises(ValueError, match="n_best"):
        s2s.beam_search(lm.step_fn, lm.state(), beam_size=2, n_best=3, **kw)
    with pytest.raises(ValueError, match="min_len"):
        s2s.greedy_search(lm.step_fn, lm.state(), min_len=4, **kw)
    with pytest.raises(ValueError, match="length_penalty"):
        s2s.beam_search(lm.step_fn, lm.state(), beam_size=2, length_penalty="gnmt", **kw)
    with pytest.raises(ValueError, match="temperature"):
        s2s.sample(lm.step_fn, lm.state(), temperature=0.0, **kw)
    with pytest.raises(ValueError, match=r"log_probs of shape \[2, vocab_size\]"):
        s2s.beam_search(lambda t, s: (torch.zeros(5, 4), s), None, beam_size=2, **kw)


def test_custom_reorder_state_for_batch_on_dim_1():
    # An nn.LSTM-style state [layers, N, H]: rows on dim 1.
    lm = ToyLM(6, batch=3, seed=8)

    def step_fn(tokens, state):
        lp, new = lm.step_fn(tokens, {"h": state[0]})
        return lp, new["h"].unsqueeze(0)

    kw = dict(batch_size=3, beam_size=3, bos=BOS, eos=EOS, max_len=6, n_best=2)
    want = s2s.beam_search(lm.step_fn, lm.state(), **kw)
    got = s2s.beam_search(step_fn, lm.h0.unsqueeze(0), reorder_state=lambda s, i: s.index_select(1, i), **kw)
    assert torch.equal(got.tokens, want.tokens) and torch.equal(got.scores, want.scores)


# --------------------------------------------------------------------------- attention

def hand_attention(kind, att, q, keys, mask):
    """Loops over sentences and positions, straight from the formulas."""
    with torch.no_grad():
        return _hand_attention(kind, att, q, keys, mask)


def _hand_attention(kind, att, q, keys, mask):
    B, S, _ = keys.shape
    ctx = torch.zeros(B, keys.size(2), dtype=DT)
    weights = torch.zeros(B, S, dtype=DT)
    for b in range(B):
        scores = []
        for s in range(S):
            k = keys[b, s]
            if kind == "dot":
                e = q[b] @ k
            elif kind == "general":
                e = q[b] @ (att.key_proj.weight @ k)
            elif kind == "concat":
                w = torch.cat([att.query_proj.weight, att.key_proj.weight], dim=1)  # W [A, Q+K]
                e = att.v.weight[0] @ torch.tanh(w @ torch.cat([q[b], k]))
            else:
                e = att.v.weight[0] @ torch.tanh(att.query_proj.weight @ q[b] + att.key_proj.weight @ k
                                                 + att.key_proj.bias)
            scores.append(e)
        valid = [s for s in range(S) if mask[b, s]]
        exps = {s: math.exp(float(scores[s]) - max(float(scores[v]) for v in valid)) for s in valid}
        total = sum(exps.values())
        for s in valid:
            weights[b, s] = exps[s] / total
            ctx[b] += weights[b, s] * keys[b, s]
    return ctx, weights


@pytest.mark.parametrize("kind", s2s.ATTENTION_KINDS)
def test_attention_kinds_match_hand_computation(kind):
    torch.manual_seed(0)
    B, S, Q = 3, 5, 4
    K = Q if kind == "dot" else 6
    att = s2s.Attention(Q, K, kind, hidden_size=7).to(DT)
    if kind == "additive":
        torch.nn.init.normal_(att.key_proj.bias)
    q = torch.randn(B, Q, dtype=DT)
    keys = torch.randn(B, S, K, dtype=DT)
    mask = s2s.lengths_to_mask(torch.tensor([5, 2, 1]), S)
    ctx, w = att(q, keys, mask)
    want_ctx, want_w = hand_attention(kind, att, q, keys, mask)
    torch.testing.assert_close(w, want_w, rtol=0, atol=1e-12)
    torch.testing.assert_close(ctx, want_ctx, rtol=0, atol=1e-12)
    assert (w[~mask] == 0).all()
    # several queries at once equal one at a time; precomputed keys give the same result
    qs = torch.randn(B, 2, Q, dtype=DT)
    ctx2, w2 = att(qs, keys, mask, projected_keys=att.project_keys(keys))
    for t in range(2):
        c1, w1 = att(qs[:, t], keys, mask)
        torch.testing.assert_close(ctx2[:, t], c1, rtol=0, atol=1e-12)
        torch.testing.assert_close(w2[:, t], w1, rtol=0, atol=1e-12)
    # without a mask: every position counts
    ctx3, w3 = att(q, keys)
    want_ctx3, want_w3 = hand_attention(kind, att, q, keys, torch.ones(B, S, dtype=torch.bool))
    torch.testing.assert_close(w3, want_w3, rtol=0, atol=1e-12)
    torch.testing.assert_close(ctx3, want_ctx3, rtol=0, atol=1e-12)


def test_attention_fully_masked_row_is_zero_with_finite_gradients():
    att = s2s.Attention(4, 4, "general").to(DT)
    q = torch.randn(2, 4, dtype=DT, requires_grad=True)
    keys = torch.randn(2, 3, 4, dtype=DT, requires_grad=True)
    mask = torch.tensor([[True, True, False], [False, False, False]])
    ctx, w = att(q, keys, mask)
    assert (w[1] == 0).all() and (ctx[1] == 0).all()
    ctx.sum().backward()
    assert torch.isfinite(q.grad).all() and torch.isfinite(keys.grad).all()


def test_attention_gradcheck():
    for kind in s2s.ATTENTION_KINDS:
        att = s2s.Attention(3, 3, kind, hidden_size=2).to(DT)
        q = torch.randn(2, 3, dtype=DT, requires_grad=True)
        keys = torch.randn(2, 4, 3, dtype=DT, requires_grad=True)
        mask = s2s.lengths_to_mask(torch.tensor([4, 2]), 4)
        assert torch.autograd.gradcheck(lambda a, b: att(a, b, mask), (q, keys))


def test_attention_argument_errors():
    with pytest.raises(ValueError, match="kind must be one of"):
        s2s.Attention(4, 4, "bilinear")
    with pytest.raises(ValueError, match="query_size == key_size"):
        s2s.Attention(4, 5, "dot")
    with pytest.raises(ValueError, match="mask must be"):
        s2s.Attention(4, 4)(torch.randn(2, 4), torch.randn(2, 3, 4), torch.ones(2, 4, dtype=torch.bool))


# --------------------------------------------------------------------------- model, teacher forcing

def tiny_model(cell="lstm", bidirectional=True, num_layers=1, attention="general", bridge="linear",
               input_feeding=True, seed=0):
    torch.manual_seed(seed)
    return s2s.Seq2Seq.create(11, 9, bos=1, eos=2, pad=0, embed_size=5, hidden_size=8, num_layers=num_layers,
                              bidirectional=bidirectional, cell=cell, attention=attention, bridge=bridge,
                              input_feeding=input_feeding, backend="reference").double()


def batch_data(seed=0):
    g = torch.Generator().manual_seed(seed)
    src = torch.randint(3, 11, (3, 6), generator=g)
    lengths = torch.tensor([6, 4, 2])
    src[1, 4:] = 0
    src[2, 2:] = 0
    tgt = torch.randint(3, 9, (3, 5), generator=g)
    return src, lengths, tgt


def manual_decode(model, src, lengths, tgt, feed_truth):
    """Step the decoder by hand: read the truth, or the previous argmax."""
    state = model.start(src, lengths)
    tokens = torch.full((src.size(0),), model.bos)
    out = []
    for t in range(tgt.size(1)):
        logits, state, _ = model.decoder.step(tokens, state)
        out.append(logits)
        tokens = tgt[:, t] if feed_truth else logits.argmax(-1)
    return torch.stack(out, 1)


@pytest.mark.parametrize("mode", ["batch", "step", "token"])
def test_teacher_forcing_ratio_one_and_zero(mode):
    model = tiny_model()
    src, lengths, tgt = batch_data()
    truth = manual_decode(model, src, lengths, tgt, feed_truth=True)
    own = manual_decode(model, src, lengths, tgt, feed_truth=False)
    assert not torch.allclose(truth, own)
    torch.testing.assert_close(model(src, lengths, tgt, teacher_forcing=1.0, mode=mode).logits, truth,
                               rtol=0, atol=1e-12)
    torch.testing.assert_close(model(src, lengths, tgt, teacher_forcing=0.0, mode=mode).logits, own,
                               rtol=0, atol=1e-12)


def test_teacher_forcing_mixes_per_token():
    # With ratio 0.5 per token, each row's inputs come from the truth or its own argmax; check
    # against a hand loop that replays the same coin flips.
    model = tiny_model(seed=1)
    src, lengths, tgt = batch_data(1)
    flips = torch.rand(3, 5, generator=torch.Generator().manual_seed(7)) < 0.5
    got = model(src, lengths, tgt, teacher_forcing=0.5, mode="token",
                generator=torch.Generator().manual_seed(7)).logits
    state = model.start(src, lengths)
    tokens = torch.full((3,), model.bos)
    for t in range(5):
        logits, state, _ = model.decoder.step(tokens, state)
        torch.testing.assert_close(got[:, t], logits, rtol=0, atol=1e-12)
        tokens = torch.where(flips[:, t], tgt[:, t], logits.argmax(-1))


def test_seq2seq_trains_and_decodes_with_every_block():
    for cell, bidirectional, layers, attention, bridge, feeding in [
        ("lstm", True, 2, "general", "linear", True),
        ("gru", False, 1, "additive", "copy", False),
        ("gru", True, 1, "concat", "zeros", True),
        ("lstm", False, 1, "dot", "copy", True),
    ]:
        model = tiny_model(cell, bidirectional, layers, attention, bridge, feeding)
        src, lengths, tgt = batch_data()
        out = model(src, lengths, tgt, teacher_forcing=0.5, mode="step")
        assert out.logits.shape == (3, 5, 9) and out.attention.shape == (3, 5, 6)
        assert (out.attention[1, :, 4:] == 0).all() and (out.attention[2, :, 2:] == 0).all()
        torch.testing.assert_close(out.attention.sum(-1), torch.ones(3, 5, dtype=DT))
        torch.nn.functional.cross_entropy(out.logits.reshape(-1, 9), tgt.reshape(-1)).backward()
        assert all(p.grad is not None for n, p in model.named_parameters() if "bridge" not in n or bridge == "linear")
        with torch.no_grad():
            beam = model.beam_search(src, lengths, beam_size=3, max_len=6, n_best=2)
            greedy = model.greedy(src, lengths, max_len=6)
            one = model.beam_search(src, lengths, beam_size=1, max_len=6)
        assert torch.equal(one.tokens[:, 0], greedy.tokens)
        assert (beam.scores[:, 0] >= beam.scores[:, 1]).all()
        assert (beam.scores[:, 0] >= greedy.scores - 1e-12).all()


def test_encoder_packs_padding_away():
    # Padding after a sentence changes neither its memory nor its final states.
    model = tiny_model(num_layers=2)
    src, lengths, _ = batch_data()
    enc = model.encoder(src, lengths)
    alone = model.encoder(src[2:, :2], lengths[2:])
    torch.testing.assert_close(enc.memory[2, :2], alone.memory[0], rtol=0, atol=1e-12)
    torch.testing.assert_close(enc.h[:, :, 2], alone.h[:, :, 0], rtol=0, atol=1e-12)
    assert (enc.memory[2, 2:] == 0).all()
    assert enc.h.shape == (2, 2, 3, 4)


def test_decoder_uses_fastrnn_cells():
    import fastrnn
    model = tiny_model()
    assert all(isinstance(c, fastrnn.LSTMCell) for c in model.decoder.cells)
    assert isinstance(model.encoder.rnn, fastrnn.LSTM)


def test_bridge_errors():
    enc = s2s.Encoder(5, 4, 6, 2, bidirectional=True, backend="reference")
    with pytest.raises(ValueError, match="bridge='copy' needs decoder hidden_size == directions"):
        s2s.Bridge("copy", enc.hidden_size, enc.num_directions, 2, 8, 2, "lstm")
    with pytest.raises(ValueError, match="encoder has 2 layers and the decoder 1"):
        s2s.Bridge("linear", enc.hidden_size, enc.num_directions, 2, 8, 1, "lstm")
    with pytest.raises(ValueError, match="bridge must be one of"):
        s2s.Bridge("mean", 6, 2, 2, 12, 2, "lstm")
    with pytest.raises(ValueError, match="cell must be one of"):
        s2s.Encoder(5, 4, 6, cell="rnn")
    # copy: decoder layer l starts from encoder layer l, forward then backward direction
    bridge = s2s.Bridge("copy", 6, 2, 2, 12, 2, "lstm")
    out = enc(torch.randint(0, 5, (3, 4)))
    states = bridge(out)
    for layer in range(2):
        torch.testing.assert_close(states[layer][0], torch.cat([out.h[layer, 0], out.h[layer, 1]], dim=1))
        torch.testing.assert_close(states[layer][1], torch.cat([out.c[layer, 0], out.c[layer, 1]], dim=1))


# --------------------------------------------------------------------------- schedules

def test_schedules():
    lin = schedules.Linear(steps=100, start=1.0, end=0.2)
    assert [lin(0), lin(50), lin(100), lin(1000)] == pytest.approx([1.0, 0.6, 0.2, 0.2])
    exp = schedules.Exponential(0.9, minimum=0.1)
    assert exp(0) == 1.0 and exp(2) == pytest.approx(0.81) and exp(10_000) == 0.1
    inv = schedules.InverseSigmoid(10.0)
    assert inv(0) == pytest.approx(10 / 11) and inv(50) == pytest.approx(10 / (10 + math.exp(5)))
    assert inv(10**7) == 0.0
    values = [inv(i) for i in range(0, 200, 10)]
    assert all(a > b for a, b in zip(values, values[1:]))
    assert schedules.Constant(0.3)(123) == 0.3
    for bad in (lambda: schedules.Exponential(1.0), lambda: schedules.InverseSigmoid(0.5),
                lambda: schedules.Linear(0), lambda: schedules.Constant(1.5)):
        with pytest.raises(ValueError):
            bad()


# --------------------------------------------------------------------------- the example

def test_example_stops_when_the_dev_target_holds_twice_and_keeps_the_best_model(tmp_path, capsys):
    """examples/seq2seq.py end to end at a toy size: training stops at the second evaluation
    in a row that meets --target (0 here: step 200), the best model on the dev set is the one
    tested, and the heat map is written."""
    import importlib.util
    import os
    import re
    pytest.importorskip("matplotlib")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    spec = importlib.util.spec_from_file_location("seq2seq_example",
                                                  os.path.join(root, "examples", "seq2seq.py"))
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    heat_map = tmp_path / "attention.png"
    threads = torch.get_num_threads()
    try:
        example.main(["--steps", "1000", "--target", "0", "--hidden", "8", "--embed", "4",
                      "--batch-size", "8", "--threads", "1", "--out", str(heat_map)])
    finally:
        torch.set_num_threads(threads)
    text = capsys.readouterr().out
    dev = [float(v) for v in re.findall(r"^step .* dev exact match (\S+)", text, re.M)]
    assert len(dev) == 2 and "trained 200 steps" in text
    assert f"kept the model with dev exact match {max(dev):.4f}" in text
    assert heat_map.stat().st_size > 0
