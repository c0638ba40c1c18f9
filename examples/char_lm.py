"""Character-level language model on "Alice's Adventures in Wonderland" (shipped in
examples/data/alice.txt, public domain): fastrnn.LSTM, truncated BPTT, gradient clipping,
tied input/output embeddings, locked dropout and AR/TAR (AWD-LSTM style).

    python examples/char_lm.py                    # fastrnn.LSTM (backend auto): 1 epoch,
                                                  # 131 updates, seconds on 2 idle cores
    python examples/char_lm.py --rnn torch        # the same run with torch.nn.LSTM
    python examples/char_lm.py --dtype float64    # both then agree to 1e-10 (tests/test_train.py)
    python examples/char_lm.py --layer-norm --recurrent-dropout 0.25 --zoneout 0.05 0.1
                                                  # what torch.nn.LSTM cannot run: fastrnn's
                                                  # options, inside the fused recurrence

The model is built with torch.nn.LSTM under the seed and, for --rnn fastrnn, converted with
fastrnn.convert(), which keeps the very same parameters: both runs start from the same
weights, draw the same dropout masks and window lengths, and print the same losses (to
float32 rounding).
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import fastrnn  # noqa: E402
from fastrnn.train import (TBPTT, LockedDropout, TrainStep, activation_regularization,  # noqa: E402
                           batchify, temporal_activation_regularization, tie_weights)

CORPUS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "alice.txt")


class CharLM(nn.Module):
    """Embedding -> locked dropout -> LSTM -> locked dropout -> Linear, decoder tied to the
    embedding (so embedding size = hidden size)."""

    def __init__(self, vocab: int, hidden: int, layers: int, dropout: float):
        super().__init__()
        self.embedding = nn.Embedding(vocab, hidden)
        self.rnn = nn.LSTM(hidden, hidden, num_layers=layers)
        self.drop = LockedDropout(dropout)
        self.decoder = nn.Linear(hidden, vocab)
        tie_weights(self.embedding, self.decoder)
        # Small uniform init as AWD-LSTM: nn.Embedding's N(0, 1) rows, used as the decoder
        # matrix too, would start the softmax far from uniform (loss ~7 instead of ln V).
        nn.init.uniform_(self.embedding.weight, -0.1, 0.1)
        nn.init.zeros_(self.decoder.bias)

    def forward(self, tokens, state):
        """tokens [T, B] -> ((logits, raw LSTM output, dropped output), state)."""
        raw, state = self.rnn(self.drop(self.embedding(tokens)), state)
        dropped = self.drop(raw)
        return (self.decoder(dropped), raw, dropped), state


def progress(total, enabled):
    """A tqdm bar, or a minimal stand-in when tqdm is missing or output is not wanted."""
    try:
        if enabled:
            from tqdm import tqdm
            return tqdm(total=total, unit="step", dynamic_ncols=True)
    except ImportError:
        pass

    class Quiet:
        def update(self, n=1): pass
        def set_postfix_str(self, s): pass
        def close(self): pass
        def write(self, s): print(s, flush=True)
    return Quiet()


@torch.no_grad()
def evaluate(model, stream, bptt):
    model.eval()
    total, count, state = 0.0, 0, None
    for chunk in TBPTT(bptt).lm_chunks(stream):
        (logits, _, _), state = chunk.run(model, state)
        total += F.cross_entropy(logits.flatten(0, 1), chunk.loss_target.flatten(), reduction="sum").item()
        count += chunk.loss_target.numel()
    model.train()
    return total / count


@torch.no_grad()
def sample(model, chars, prompt, length, temperature, generator):
    """Feed the prompt, then draw one character at a time from softmax(logits / T)."""
    model.eval()
    index = {c: i for i, c in enumerate(chars)}
    tokens = torch.tensor([[index[c]] for c in prompt if c in index])  # [T, 1]
    (logits, _, _), state = model(tokens, None)
    out = []
    for _ in range(length):
        probs = torch.softmax(logits[-1, 0].double() / temperature, dim=-1)
        nxt = torch.multinomial(probs, 1, generator=generator)
        out.append(chars[nxt.item()])
        (logits, _, _), state = model(nxt.view(1, 1), state)
    model.train()
    return prompt + "".join(out)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--rnn", choices=["fastrnn", "torch"], default="fastrnn")
    ap.add_argument("--backend", default="auto", help="fastrnn backend (with --rnn fastrnn)")
    ap.add_argument("--corpus", default=CORPUS, help="a UTF-8 text file")
    ap.add_argument("--hidden", type=int, default=256, help="hidden = embedding size (tied)")
    ap.add_argument("--layers", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--bptt", type=int, default=32, help="TBPTT window k1")
    ap.add_argument("--k2", type=int, default=None, help="backprop k2 >= k1 steps (default k1)")
    ap.add_argument("--variable-length", action="store_true", help="AWD-LSTM random window lengths")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--max-steps", type=int, default=None, help="stop after this many updates")
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--clip", type=float, default=1.0, help="gradient norm clip")
    ap.add_argument("--dropout", type=float, default=0.1, help="locked dropout")
    ap.add_argument("--alpha", type=float, default=1.0, help="AR weight")
    ap.add_argument("--beta", type=float, default=1.0, help="TAR weight")
    ap.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    variant = ap.add_argument_group("fastrnn-only LSTM options (README: Beyond cuDNN)")
    variant.add_argument("--layer-norm", action="store_true", help="LayerNorm LSTM cells")
    variant.add_argument("--recurrent-dropout", type=float, default=0.0, metavar="P",
                         help="variational dropout of the hidden state fed back")
    variant.add_argument("--weight-drop", type=float, default=0.0, metavar="P",
                         help="DropConnect on the recurrent weights (AWD-LSTM)")
    variant.add_argument("--zoneout", type=float, nargs=2, default=(0.0, 0.0),
                         metavar=("P_H", "P_C"), help="zoneout of h and c")
    variant.add_argument("--cell-clip", type=float, default=None, help="clamp the cell state")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--sample-length", type=int, default=400)
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--prompt", default="Alice ")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--log-every", type=int, default=10, help="print the loss every N updates")
    args = ap.parse_args(argv)
    options = {name: value for name, value in (
        ("layer_norm", args.layer_norm), ("recurrent_dropout", args.recurrent_dropout),
        ("weight_drop", args.weight_drop), ("zoneout", tuple(args.zoneout)),
        ("cell_clip", args.cell_clip)) if value not in (False, 0.0, (0.0, 0.0), None)}
    if options and args.rnn == "torch":
        ap.error(f"torch.nn.LSTM has no {', '.join(options)}: use --rnn fastrnn")

    with open(args.corpus, encoding="utf-8") as f:
        text = f.read()
    chars = sorted(set(text))
    index = {c: i for i, c in enumerate(chars)}
    data = torch.tensor([index[c] for c in text], dtype=torch.long)
    split = int(0.9 * len(data))
    train = batchify(data[:split], args.batch_size)
    valid = batchify(data[split:], 8)

    torch.manual_seed(args.seed)
    dtype = getattr(torch, args.dtype)
    model = CharLM(len(chars), args.hidden, args.layers, args.dropout).to(dtype)
    if args.rnn == "fastrnn":
        model = fastrnn.convert(model, backend=args.backend)  # same Parameters, fastrnn kernels
    if options:   # the same starting weights; the layer norm gains and biases start at 1 / 0
        with torch.random.fork_rng():   # its own init must not shift the dropout masks
            rnn = fastrnn.LSTM(args.hidden, args.hidden, num_layers=args.layers,
                               backend=args.backend, **options).to(dtype)
        loaded = rnn.load_state_dict(model.rnn.state_dict(), strict=False)
        assert not loaded.unexpected_keys and all(k.startswith("ln_") for k in loaded.missing_keys)
        model.rnn = rnn
    print(f"corpus {os.path.basename(args.corpus)}: {len(text)} chars, {len(chars)} symbols; "
          f"model {type(model.rnn).__module__}.{type(model.rnn).__name__}"
          f"{' (backend ' + args.backend + ')' if args.rnn == 'fastrnn' else ''}"
          f"{''.join(f', {k}={v}' for k, v in options.items())}, "
          f"{sum(p.numel() for p in model.parameters())} parameters (tied), {args.dtype}")

    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    step = TrainStep(optimizer, clip_norm=args.clip, skip_nonfinite=True)
    tbptt = TBPTT(args.bptt, args.k2, variable_length=args.variable_length,
                  generator=torch.Generator().manual_seed(args.seed))
    per_epoch = math.ceil((train.size(0) - 1) / args.bptt)
    total_steps = args.epochs * per_epoch if args.max_steps is None else args.max_steps
    bar = progress(total_steps, not args.no_progress)
    losses, updates, start = [], 0, time.perf_counter()

    for epoch in range(args.epochs):
        state = None
        for chunk in tbptt.lm_chunks(train):
            if updates == total_steps:
                break

            def loss_fn():
                (logits, raw, dropped), new_state = chunk.run(model, state)
                ce = F.cross_entropy(logits.flatten(0, 1), chunk.loss_target.flatten())
                reg = activation_regularization(dropped, args.alpha) + \
                    temporal_activation_regularization(raw, args.beta)
                return ce + reg, (ce.detach(), new_state)

            result = step(loss_fn)
            ce, state = result.extra
            losses.append(ce.item())
            updates += 1
            bar.update()
            bar.set_postfix_str(f"loss {ce.item():.4f} |g| {result.grad_norm.item():.2f}")
            if args.log_every and (updates == 1 or updates % args.log_every == 0):
                bar.write(f"step {updates:4d}  loss {ce.item():.6f}")
        val = evaluate(model, valid, args.bptt)
        bar.write(f"epoch {epoch + 1}: valid loss {val:.4f} ({val / math.log(2):.3f} bits/char)")
        if updates == total_steps:
            break
    bar.close()
    elapsed = time.perf_counter() - start
    print(f"{updates} updates in {elapsed:.1f} s; loss first {losses[0]:.4f}, last {losses[-1]:.4f}; "
          f"skipped non-finite steps: {step.skipped}")
    print("\n--- sample (temperature %.2f) ---" % args.temperature)
    print(sample(model, chars, args.prompt, args.sample_length, args.temperature,
                 torch.Generator().manual_seed(args.seed)))
    return losses


if __name__ == "__main__":
    main()
