"""How close are fastrnn's results to the exact ones, next to torch.nn's? (docs/tolerance.md)

For each cell, backend and dtype: torch.nn and fastrnn (same weights) run a bidirectional
layer in that dtype, torch.nn runs it again in float64 on the same rounded weights, inputs
and upstream gradients (the truth). Printed: each side's error against the truth
(max |x - truth| / max(1, max |truth|), worst over the outputs, or over the gradients of
the input, initial state and every parameter) and the ratio fastrnn / torch.nn, which
fastrnn.testing allows up to 2 (plus a few ulps).

    python -m bench.error_ratios > bench/results/error-ratios-cpu-<date>.md
"""
import argparse
import copy
import os
import platform
import sys

# Triton runs on CPU tensors only under its interpreter, chosen before triton is imported.
os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402
from torch import nn  # noqa: E402

import fastrnn  # noqa: E402
from fastrnn.testing import relative_error, to_float64  # noqa: E402

MODULES = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn_tanh": nn.RNN}
# (T, B, H): the odd sizes of the tests (T=63, H=500) and the fastrnns benchmark's shape at
# a CPU-friendly batch; triton only at a tiny shape (it runs under the interpreter on CPU).
SHAPES = {"T63-B5-H500": (63, 5, 500), "T100-B8-H256": (100, 8, 256)}
TINY = {"T7-B3-H16": (7, 3, 16)}


def results(module, x, h0, grads):
    """Outputs (output, h_n[, c_n]) and the gradients of x, h0[, c0] and every parameter."""
    x = x.detach().requires_grad_()
    state = tuple(s.detach().requires_grad_() for s in h0)
    out, final = module(x, state if len(state) == 2 else state[0])
    outs = [out] + (list(final) if isinstance(final, tuple) else [final])
    leaves = [x, *state, *module.parameters()]
    return outs, list(torch.autograd.grad(outs, leaves, grads[:len(outs)]))


def measure(cell, backend, dtype, shape, seed=0):
    steps, batch, hidden = shape
    torch.manual_seed(seed)
    extra = {"nonlinearity": "tanh"} if cell == "rnn_tanh" else {}
    ref = MODULES[cell](hidden, hidden, bidirectional=True, **extra).to(dtype)
    fast = getattr(fastrnn, type(ref).__name__)(hidden, hidden, bidirectional=True,
                                                backend=backend, dtype=dtype, **extra)
    fast.load_state_dict(ref.state_dict())
    gen = torch.Generator().manual_seed(seed + 1)

    def rand(*s):
        return torch.randn(*s, generator=gen).to(dtype)

    x = rand(steps, batch, hidden)
    h0 = (rand(2, batch, hidden),) + ((rand(2, batch, hidden),) if cell == "lstm" else ())
    grads = [rand(steps, batch, 2 * hidden), rand(2, batch, hidden), rand(2, batch, hidden)]
    truth = results(copy.deepcopy(ref).double(), to_float64(x), to_float64(h0),
                    to_float64(grads))
    errors = {}
    for name, module in (("torch", ref), ("fastrnn", fast)):
        outs, grad = results(module, x, h0, grads)
        errors[name] = (max(relative_error(a, t) for a, t in zip(outs, truth[0])),
                        max(relative_error(a, t) for a, t in zip(grad, truth[1])))
    return errors


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backends", default="reference,native,triton")
    parser.add_argument("--cells", default=",".join(MODULES))
    args = parser.parse_args(argv)
    print("# Error ratios: fastrnn vs torch.nn against a float64 truth (CPU)\n")
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"ATen CPU capability {torch.backends.cpu.get_cpu_capability()}, "
          f"{torch.get_num_threads()} threads; `python -m bench.error_ratios`. One "
          f"bidirectional layer, input size = hidden size, seeded weights and data. error = "
          f"max |x - truth| / max(1, max |truth|), worst tensor; ratio = fastrnn / torch.nn "
          f"(fastrnn.testing allows 2, plus a few ulps).\n")
    print("| cell | backend | dtype | shape | out: torch.nn | out: fastrnn | out ratio "
          "| grad: torch.nn | grad: fastrnn | grad ratio |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    available = fastrnn.available_backends("cpu")
    for cell in args.cells.split(","):
        for backend in args.backends.split(","):
            if backend not in available:
                print(f"| {cell} | {backend} | | | unavailable here | | | | | |")
                continue
            dtypes = [torch.float32] + ([torch.bfloat16, torch.float16]
                                        if backend == "reference" else [])
            for dtype in dtypes:
                shapes = TINY if backend == "triton" else SHAPES
                for shape_name, shape in shapes.items():
                    try:
                        e = measure(cell, backend, dtype, shape)
                    except Exception as exc:  # noqa: BLE001  (reported in the table)
                        print(f"| {cell} | {backend} | {str(dtype)[6:]} | {shape_name} | "
                              f"{type(exc).__name__}: {str(exc)[:60]} | | | | | |")
                        continue
                    (to, tg), (fo, fg) = e["torch"], e["fastrnn"]
                    print(f"| {cell} | {backend} | {str(dtype)[6:]} | {shape_name} | "
                          f"{to:.2e} | {fo:.2e} | {fo / to if to else float('nan'):.2f} | "
                          f"{tg:.2e} | {fg:.2e} | {fg / tg if tg else float('nan'):.2f} |",
                          flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
