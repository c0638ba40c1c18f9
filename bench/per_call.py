"""Per-call cost of the modules on short calls: fastrnn.LSTM / GRU (backend "auto" and
"native") against torch.nn, batch 1, 1 / 4 / 16 frames, without and with gradient (the
state carried between calls), one thread.

    python -m bench.per_call --hidden 8,512 [--against OTHER_CHECKOUT] [--rounds 3]

Times are CPU time of the calling thread (time.thread_time_ns), so a shared machine's
preemption does not count; each figure is the median of interleaved repetitions (every
provider timed in turn). With ``--against``, each round runs this checkout and the other one
(e.g. the base commit, unpacked with ``git archive``) in turn, in fresh processes, and the
table shows both.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

MODES = ("LSTM", "GRU")
STEPS = (1, 4, 16)


def measure(hidden: int, reps: int = 7) -> dict:
    """{"mode|hidden|steps|grad|provider": microseconds per call} in this process."""
    import time

    import torch
    from torch import nn

    import fastrnn
    torch.set_num_threads(1)
    out = {}
    for mode in MODES:
        torch.manual_seed(0)
        reference = getattr(nn, mode)(hidden, hidden)
        modules = {"torch.nn": reference}
        for backend in ("auto", "native"):
            module = getattr(fastrnn, mode)(hidden, hidden, backend=backend)
            module.load_state_dict(reference.state_dict())
            modules[backend] = module
        for grad in (False, True):
            for steps in STEPS:
                x = torch.randn(steps, 1, hidden)
                inner = 40 if hidden < 256 else 8
                times = {name: [] for name in modules}
                with torch.set_grad_enabled(grad):
                    for _ in range(reps):
                        for name, module in modules.items():
                            state = module(x)[1]
                            start = time.thread_time_ns()
                            for _ in range(inner):
                                _, state = module(x, state)
                                if grad:   # carried, not back-propagated through
                                    state = tuple(s.detach() for s in state) \
                                        if isinstance(state, tuple) else state.detach()
                            times[name].append((time.thread_time_ns() - start) / inner / 1e3)
                for name, values in times.items():
                    out[f"{mode}|{hidden}|{steps}|{int(grad)}|{name}"] = statistics.median(values)
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", default="8,512")
    parser.add_argument("--against", help="another checkout to time in turn with this one")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child is not None:
        print(json.dumps(measure(args.child)))
        return
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    trees = {"this": here}
    if args.against:
        trees = {"other": os.path.abspath(args.against), "this": here}
    loads = [os.getloadavg()[0]]
    results = {name: [] for name in trees}
    for hidden in (int(h) for h in args.hidden.split(",")):
        runs = {name: [] for name in trees}
        for _ in range(args.rounds):
            for name, tree in trees.items():
                env = dict(os.environ, PYTHONPATH=tree, OMP_NUM_THREADS="1")
                # run as a script from the tree timed, so its fastrnn is the one imported
                done = subprocess.run([sys.executable, os.path.abspath(__file__), "--child",
                                       str(hidden)], env=env, cwd=tree, capture_output=True,
                                      text=True, check=True)
                runs[name].append(json.loads(done.stdout.strip().splitlines()[-1]))
                loads.append(os.getloadavg()[0])
        for name in trees:
            results[name].append({key: statistics.median(run[key] for run in runs[name])
                                  for key in runs[name][0]})
    merged = {name: {k: v for part in parts for k, v in part.items()}
              for name, parts in results.items()}
    print(f"1-minute load average during the run: {min(loads):.2f} to {max(loads):.2f}; "
          f"{os.cpu_count()} CPUs; 1 thread; {args.rounds} rounds")
    columns = [f"{p} ({n})" if len(trees) > 1 else p for n in trees
               for p in ("auto", "native")]
    print("| mode | hidden | frames | grad | torch.nn us | " + " | ".join(
        f"{c} us" for c in columns) + " | " + " | ".join(
        f"torch.nn / auto ({n})" if len(trees) > 1 else "torch.nn / auto" for n in trees)
        + " |")
    print("|" + "---|" * (5 + len(columns) + len(trees)))
    this = merged["this"]
    for key in sorted({k.rsplit("|", 1)[0] for k in this},
                      key=lambda k: (k.split("|")[0], int(k.split("|")[1]),
                                     int(k.split("|")[3]), int(k.split("|")[2]))):
        mode, hidden, steps, grad = key.split("|")
        base = statistics.median(merged[n][key + "|torch.nn"] for n in trees)
        cells = [f"{merged[n][key + '|' + p]:.1f}" for n in trees for p in ("auto", "native")]
        ratios = [f"{merged[n][key + '|torch.nn'] / merged[n][key + '|auto']:.2f}"
                  for n in trees]
        print(f"| {mode} | {hidden} | {steps} | {'yes' if grad == '1' else 'no'} | "
              f"{base:.1f} | " + " | ".join(cells) + " | " + " | ".join(ratios) + " |")


if __name__ == "__main__":
    main()
