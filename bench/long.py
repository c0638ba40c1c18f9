"""Peak memory and time of one training step on a long sequence (``checkpoint_every``).

    python -m bench.long [--steps 1000,10000] [--providers nn,fastrnn,segmented,floor]
                         [--cell lstm,gru] [--hidden 256,512] [--batch 8,32] [--layers 1,2]
                         [--max-predicted-gb 6] [--cap-gb 16] [--out FILE.json]
    python -m bench.long --plot FILE.json          # FILE.png: memory beyond the floor vs T
    python -m bench.long --summary FILE.json       # memory beyond the floor per config and T

Each measurement runs in a fresh process: build the model, warm it up on a short sequence,
make the input x [T, B, H] (requires grad), reset the peak RSS (/proc/self/clear_refs), then
one step: forward, loss = sum(output ** 2) (every step's output gets a gradient), backward.
Reported: the peak RSS growth of that step and its time (the fastest of ``--repeat``
steps). Every combination of the comma-separated lists is measured. Providers:

- ``nn``: torch.nn's module; ``fastrnn``: fastrnn's (backend native), full memory;
- ``segmented``: fastrnn's with checkpoint_every="auto" (k = ceil(sqrt(T)));
- ``floor``: a Linear layer in the RNN's place: what any implementation pays when the loss
  uses every step (the returned output and the gradients of output and input). It depends on
  T, B and H only, so it is measured once for all cells and depths.

Memory beyond the floor = a provider's growth minus the floor's at the same T, B and H.

A point whose predicted peak RSS (:func:`predicted`, from the bytes per step measured
earlier) is above ``--max-predicted-gb`` is not started and is recorded as skipped. A point
that is started cannot pass ``--cap-gb``: the child limits its address space so that its RSS
cannot grow past the cap (an allocation beyond it fails), and the parent kills it if its RSS
passes the cap anyway; either way the result is recorded as out of memory, not a crash.

The timing is one step on a possibly shared machine (the load is recorded): a ratio, not a
benchmark.
"""
from __future__ import annotations

import argparse
import datetime
import itertools
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time

PROVIDERS = ("nn", "fastrnn", "segmented", "floor")
GB = 1e9

# Peak RSS growth of one step in bytes per step, in units of one float32 [B, H] row
# (B * H * 4 bytes), measured with this runner at T = 10^4 and 10^5 (input = hidden = 256,
# batch 8; bench/results/long-cpu-2026-12-01): the floor keeps 3 (output, gradients of output
# and input); each layer adds the provider's own history; each layer after the first adds
# its input (the previous layer's output) and that input's gradient.
FLOOR_ROWS = 3.0
LAYER_ROWS = {("nn", "lstm"): 13.2, ("nn", "gru"): 11.0, ("nn", "rnn"): 4.0,
              ("fastrnn", "lstm"): 9.1, ("fastrnn", "gru"): 10.0, ("fastrnn", "rnn"): 3.0,
              ("segmented", "lstm"): 0.6, ("segmented", "gru"): 0.6, ("segmented", "rnn"): 0.6}
STACK_ROWS = 2.0
START_BYTES = 0.8 * GB   # RSS before the step: torch, the native library, the model


def predicted(provider, cell, steps, batch, hidden, layers) -> dict:
    """Predicted peak RSS growth of the step and peak RSS of the process, in bytes."""
    row = batch * hidden * 4
    rows = FLOOR_ROWS
    if provider != "floor":
        rows += layers * LAYER_ROWS[provider, cell] + (layers - 1) * STACK_ROWS
    growth = steps * rows * row
    return {"growth": growth, "peak": START_BYTES + steps * row + growth}   # + the input x


def _status(field: str, pid="self") -> int:
    """A /proc/<pid>/status field in bytes (VmRSS, VmHWM, VmSize)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/{pid}/status")


def _model(provider, cell, hidden, layers):
    import torch
    import fastrnn
    if provider == "floor":
        return torch.nn.Linear(hidden, hidden)
    if provider == "nn":
        return getattr(torch.nn, cell.upper())(hidden, hidden, layers)
    every = "auto" if provider == "segmented" else None
    return getattr(fastrnn, cell.upper())(hidden, hidden, layers, backend="native",
                                          checkpoint_every=every)


def child(provider, cell, steps, batch, hidden, layers, threads, repeat, cap=None) -> dict:
    import torch
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = _model(provider, cell, hidden, layers)

    def step(x):
        out = model(x)
        out = out[0] if isinstance(out, tuple) else out
        (out * out).sum().backward()

    step(torch.randn(16, batch, hidden, requires_grad=True))   # load kernels, warm caches
    model.zero_grad(set_to_none=False)
    x = torch.randn(steps, batch, hidden, requires_grad=True)
    if cap:   # the address space may grow by what the RSS may still grow
        limit = _status("VmSize") + cap - _status("VmRSS")
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    with open("/proc/self/clear_refs", "w") as f:   # "5": reset the peak RSS to the current
        f.write("5")
    before = _status("VmRSS")
    times = []
    for _ in range(repeat):   # the peak is that of the first step (the gradients then exist)
        start = time.perf_counter()
        step(x)
        times.append(time.perf_counter() - start)
        x.grad = None
    return {"provider": provider, "cell": cell, "steps": steps, "batch": batch,
            "hidden": hidden, "layers": layers, "peak_growth_bytes": _status("VmHWM") - before,
            "peak_rss_bytes": _status("VmHWM"), "seconds": min(times),
            "threads": torch.get_num_threads()}


def _out_of_memory(stderr: str) -> bool:
    return "MemoryError" in stderr or "can't allocate memory" in stderr


def measure(provider, cell, steps, batch, hidden, layers, threads=0, repeat=1, cap=None) -> dict:
    """One point in a fresh process. ``cap``: bytes of RSS the process may reach."""
    point = {"provider": provider, "cell": cell, "steps": steps, "batch": batch,
             "hidden": hidden, "layers": layers}
    env = dict(os.environ, PYTHONPATH=os.getcwd() + os.pathsep + os.environ.get("PYTHONPATH", ""))
    args = json.dumps([provider, cell, steps, batch, hidden, layers, threads, repeat, cap])
    # files, not pipes: a child writing more than a pipe holds would block while we watch it
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen([sys.executable, "-m", "bench.long", "--child", args],
                                stdout=out, stderr=err, text=True, env=env)
        killed = None
        while proc.poll() is None:
            # the address-space limit is the first guard; this one catches what it misses
            try:
                rss = _status("VmRSS", proc.pid)
            except (OSError, RuntimeError):   # the process is ending
                rss = 0
            if cap and rss > cap:
                proc.kill()
                killed = rss
            time.sleep(0.05)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    if killed is not None:
        return dict(point, error=f"out of memory: RSS {killed / GB:.1f} GB passed the cap",
                    out_of_memory=True, cap_bytes=cap)
    if proc.returncode:
        stderr = stderr.strip()
        oom = _out_of_memory(stderr)
        # The exception's own line: the traceback above it names this machine's paths.
        result = dict(point, error=(stderr.splitlines() or [''])[-1][-500:], out_of_memory=oom)
        return dict(result, cap_bytes=cap) if cap else result
    return json.loads(stdout.strip().splitlines()[-1])


def _config(r):
    return r["cell"], r["batch"], r["hidden"], r["layers"]


def _floors(results):
    return {(r["steps"], r["batch"], r["hidden"]): r for r in results
            if r["provider"] == "floor" and "peak_growth_bytes" in r}


def _outcome(r) -> str:
    if "skipped" in r:
        return f"not run: {r['skipped']}"
    if r.get("out_of_memory"):
        cap = r.get("cap_bytes")
        return "out of memory" + (f" (cap {cap / GB:.1f} GB)" if cap else "")
    return f"failed: {r['error'][-80:]}"


def table(results) -> str:
    """Markdown: growth and time per provider and T, memory beyond the floor, time vs full."""
    floor = _floors(results)
    full = {(_config(r), r["steps"]): r for r in results
            if r["provider"] == "fastrnn" and "peak_growth_bytes" in r}
    lines = ["| cell | T | B | H | layers | provider | peak RSS growth (MB) | beyond floor (MB) "
             "| beyond floor per step (KB) | predicted growth (MB) | time (s) "
             "| time vs fastrnn full | load |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        head = f"| {r['cell']} | {r['steps']} | {r['batch']} | {r['hidden']} | {r['layers']} " \
               f"| {r['provider']} "
        guess = predicted(r["provider"], r["cell"], r["steps"], r["batch"], r["hidden"],
                          r["layers"])["growth"]
        if "peak_growth_bytes" not in r:
            lines.append(head + f"| {_outcome(r)} | | | {guess / 1e6:.0f} | | | |")
            continue
        growth = r["peak_growth_bytes"]
        beyond = per_step = ratio = ""
        base = floor.get((r["steps"], r["batch"], r["hidden"]))
        if base is not None and r["provider"] != "floor":
            extra = growth - base["peak_growth_bytes"]
            beyond, per_step = f"{extra / 1e6:.0f}", f"{extra / r['steps'] / 1024:.1f}"
        baseline = full.get((_config(r), r["steps"]))
        if baseline is not None and r["provider"] != "floor":
            ratio = f"{r['seconds'] / baseline['seconds']:.2f}"
        load = f"{r['load'][0]:.1f}" if "load" in r else ""
        lines.append(head + f"| {growth / 1e6:.0f} | {beyond} | {per_step} | {guess / 1e6:.0f} "
                     f"| {r['seconds']:.2f} | {ratio} | {load} |")
    return "\n".join(lines)


def summary(results) -> str:
    """Markdown: one row per configuration and T, memory beyond the floor (MB) per provider,
    and the segmented step's time against the full-memory one."""
    floor = _floors(results)
    cells = {}
    for r in results:
        if r["provider"] != "floor":
            cells[_config(r), r["steps"], r["provider"]] = r
    lines = ["| cell | B | H | layers | T | torch.nn | fastrnn full | fastrnn auto "
             "| auto time vs full | floor growth (MB) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for config, steps in sorted({(c, t) for c, t, _ in cells}):
        base = floor.get((steps,) + config[1:3])
        row = []
        for provider in ("nn", "fastrnn", "segmented"):
            r = cells.get((config, steps, provider))
            if r is None:
                row.append("")
            elif "peak_growth_bytes" not in r:
                row.append(_outcome(r))
            elif base is None:
                row.append("")
            else:
                row.append(f"{(r['peak_growth_bytes'] - base['peak_growth_bytes']) / 1e6:.0f}")
        full, seg = cells.get((config, steps, "fastrnn")), cells.get((config, steps, "segmented"))
        ratio = f"{seg['seconds'] / full['seconds']:.2f}x" \
            if full and seg and "seconds" in full and "seconds" in seg else ""
        growth = f"{base['peak_growth_bytes'] / 1e6:.0f}" if base else ""
        cell, batch, hidden, layers = config
        lines.append(f"| {cell} | {batch} | {hidden} | {layers} | {steps} | "
                     + " | ".join(row) + f" | {ratio} | {growth} |")
    return "\n".join(lines)


def plot(path: str, png: str) -> None:
    """One panel per configuration: memory beyond the floor against T, log-log, a line per
    provider; torch.nn's and fastrnn's full-memory points not run (predicted above the limit)
    are drawn hollow at their prediction, joined by a dashed line."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    with open(path) as f:
        results = json.load(f)["results"]
    floor = _floors(results)
    configs = sorted({_config(r) for r in results if r["provider"] != "floor"})
    cols = min(4, len(configs))
    rows = -(-len(configs) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 3.0 * rows), squeeze=False,
                             sharex=True, sharey=True)
    styles = {"nn": ("torch.nn", "tab:red"), "fastrnn": ("fastrnn full", "tab:blue"),
              "segmented": ('fastrnn checkpoint_every="auto"', "tab:green")}
    for ax, config in zip(axes.flat, configs):
        for provider, (label, color) in styles.items():
            measured, guessed = [], []
            for r in results:
                key = (r["steps"], r["batch"], r["hidden"])
                if r["provider"] != provider or _config(r) != config:
                    continue
                if "peak_growth_bytes" in r and key in floor:
                    extra = r["peak_growth_bytes"] - floor[key]["peak_growth_bytes"]
                    if extra > 0:   # at small T the difference can be the allocator's noise
                        measured.append((r["steps"], extra / 1e6))
                elif "skipped" in r and provider != "segmented":
                    # (the segmented bound, linear in T, is for skipping, not an estimate)
                    args = (r["cell"], r["steps"], r["batch"], r["hidden"], r["layers"])
                    extra = predicted(provider, *args)["growth"] - \
                        predicted("floor", *args)["growth"]
                    guessed.append((r["steps"], extra / 1e6))
            measured.sort()
            if measured:
                ax.plot(*zip(*measured), "o-", color=color, label=label)
            if guessed:
                line = sorted(measured[-1:] + guessed)
                ax.plot(*zip(*line), "--", color=color)
                ax.plot(*zip(*guessed), "o", mfc="none", color=color)
        cell, batch, hidden, layers = config
        ax.set_title(f"{cell.upper()} B={batch} H={hidden} layers={layers}", fontsize=9)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.3)
    for ax in axes.flat[len(configs):]:
        ax.set_visible(False)
    for ax in axes[-1]:
        ax.set_xlabel("T (steps)")
    for ax in axes[:, 0]:
        ax.set_ylabel("MB beyond the floor")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    top = 1 - 0.75 / fig.get_figheight()   # room for the title and the legend
    fig.suptitle("Peak RSS growth of one training step beyond a Linear floor "
                 "(hollow: predicted from bytes per step, not run)", y=0.995, fontsize=10)
    fig.legend(handles, labels, loc="upper center", ncol=3, frameon=False,
               bbox_to_anchor=(0.5, 1 - 0.3 / fig.get_figheight()))
    fig.tight_layout(rect=(0, 0, 1, top))
    fig.savefig(png, dpi=110)
    plt.close(fig)


def _ints(text):
    return [int(v) for v in text.split(",")]


def _save(path, results, notes):
    meta = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count()}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump({"meta": meta, "results": results}, f, indent=1)
    with open(os.path.splitext(path)[0] + ".md", "w") as f:
        f.write(f"# One training step on long sequences ({meta['date']}, {meta['cpus']} "
                f"CPUs)\n\nPeak RSS growth of one step (python -m bench.long). The times "
                f"were taken on a shared, loaded machine (the load column is the 1-minute "
                f"load average at the point): compare them within a row group, not as a "
                f"benchmark.\n\nMemory beyond the floor (MB; the floor is a Linear in the "
                f"RNN's place) and time of the segmented step relative to fastrnn's full-memory "
                f"step:\n\n{summary(results)}\n\nEvery point:\n\n{table(results)}\n{notes}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--steps", default="1000,10000")
    p.add_argument("--providers", default=",".join(PROVIDERS))
    p.add_argument("--cell", default="lstm", help="comma-separated: lstm,gru,rnn")
    p.add_argument("--hidden", default="256", help="comma-separated (input size = hidden)")
    p.add_argument("--batch", default="8", help="comma-separated")
    p.add_argument("--layers", default="1", help="comma-separated")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--repeat", type=int, default=1, help="steps timed (the fastest is kept)")
    p.add_argument("--max-predicted-gb", type=float, default=6.0,
                   help="skip a point whose predicted peak RSS is above this")
    p.add_argument("--cap-gb", type=float, default=None,
                   help="a started point may not use more RSS than this (out of memory)")
    p.add_argument("--out", help="JSON path; the Markdown table goes next to it (.md)")
    p.add_argument("--append", action="store_true", help="add to the results in --out")
    p.add_argument("--notes", default="", help="text after the Markdown table")
    p.add_argument("--plot", metavar="JSON", help="plot a results file (PNG next to it)")
    p.add_argument("--summary", metavar="JSON", help="print a results file's summary table")
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(*json.loads(args.child))))
        return 0
    if args.plot:
        plot(args.plot, os.path.splitext(args.plot)[0] + ".png")
        return 0
    if args.summary:
        with open(args.summary) as f:
            print(summary(json.load(f)["results"]))
        return 0
    results = []
    if args.append and args.out and os.path.exists(args.out):
        with open(args.out) as f:
            results = json.load(f)["results"]
    cap = None if args.cap_gb is None else int(args.cap_gb * GB)
    configs = list(itertools.product(args.cell.split(","), _ints(args.batch),
                                     _ints(args.hidden), _ints(args.layers)))
    for steps in _ints(args.steps):
        for (cell, batch, hidden, layers), provider in itertools.product(
                configs, args.providers.split(",")):
            point = (provider, cell, steps, batch, hidden, layers)
            if provider == "floor" and (steps, batch, hidden) in _floors(results):
                continue
            guess = predicted(*point)
            if guess["peak"] > args.max_predicted_gb * GB:
                r = dict(zip(("provider", "cell", "steps", "batch", "hidden", "layers"), point),
                         skipped=f"predicted {guess['peak'] / GB:.1f} GB")
            else:
                r = measure(*point, args.threads, args.repeat, cap)
                r["load"] = os.getloadavg()
            r["predicted_peak_bytes"] = guess["peak"]
            print(json.dumps(r), flush=True)
            results.append(r)
            if args.out:   # after every point: a long sweep stopped early keeps what it has
                _save(args.out, results, args.notes)
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
