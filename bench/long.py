"""Peak memory and time of one training step on a long sequence (``checkpoint_every``).

    python -m bench.long [--steps 1000,10000] [--providers nn,fastrnn,segmented,floor]
                         [--cell lstm] [--hidden 256] [--batch 8] [--layers 1] [--out DIR]

Each measurement runs in a fresh process: build the model, warm it up on a short sequence,
make the input x [T, B, H] (requires grad), reset the peak RSS (/proc/self/clear_refs), then
one step: forward, loss = sum(output ** 2) (every step's output gets a gradient), backward.
Reported: the peak RSS growth of that step and its time (the fastest of ``--repeat``
steps). Providers:

- ``nn``: torch.nn's module; ``fastrnn``: fastrnn's (backend native), full memory;
- ``segmented``: fastrnn's with checkpoint_every="auto" (k = ceil(sqrt(T)));
- ``floor``: a Linear layer in the RNN's place: what any implementation pays when the loss
  uses every step (the returned output and the gradients of output and input).

Memory beyond the floor = a provider's growth minus the floor's at the same T. The timing is
one step on a possibly shared machine (the load is recorded): a ratio, not a benchmark.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time

PROVIDERS = ("nn", "fastrnn", "segmented", "floor")


def _status(field: str) -> int:
    """A /proc/self/status field in bytes (VmRSS, VmHWM)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


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


def child(provider, cell, steps, batch, hidden, layers, threads, repeat) -> dict:
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
            "seconds": min(times), "threads": torch.get_num_threads()}


def measure(provider, cell, steps, batch, hidden, layers, threads=0, repeat=1) -> dict:
    env = dict(os.environ, PYTHONPATH=os.getcwd() + os.pathsep + os.environ.get("PYTHONPATH", ""))
    args = json.dumps([provider, cell, steps, batch, hidden, layers, threads, repeat])
    result = subprocess.run([sys.executable, "-m", "bench.long", "--child", args],
                            capture_output=True, text=True, env=env)
    if result.returncode:
        return {"provider": provider, "cell": cell, "steps": steps, "batch": batch,
                "hidden": hidden, "layers": layers, "error": result.stderr.strip()[-500:]}
    return json.loads(result.stdout.strip().splitlines()[-1])


def table(results) -> str:
    """Markdown: growth and time per provider and T, memory beyond the floor, time vs full."""
    floor = {(r["cell"], r["steps"], r["batch"], r["hidden"], r["layers"]): r
             for r in results if r["provider"] == "floor" and "error" not in r}
    full = {(r["cell"], r["steps"], r["batch"], r["hidden"], r["layers"]): r
            for r in results if r["provider"] == "fastrnn" and "error" not in r}
    lines = ["| cell | T | B | H | layers | provider | peak RSS growth (MB) | beyond floor (MB) "
             "| beyond floor per step (KB) | time (s) | time vs fastrnn full |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        key = (r["cell"], r["steps"], r["batch"], r["hidden"], r["layers"])
        head = f"| {r['cell']} | {r['steps']} | {r['batch']} | {r['hidden']} | {r['layers']} " \
               f"| {r['provider']} "
        if "error" in r:
            lines.append(head + f"| failed: {r['error'][-80:]} | | | | |")
            continue
        growth = r["peak_growth_bytes"]
        beyond = per_step = ratio = ""
        if key in floor and r["provider"] != "floor":
            extra = growth - floor[key]["peak_growth_bytes"]
            beyond, per_step = f"{extra / 1e6:.0f}", f"{extra / r['steps'] / 1024:.1f}"
        if key in full and r["provider"] != "floor":
            ratio = f"{r['seconds'] / full[key]['seconds']:.2f}"
        lines.append(head + f"| {growth / 1e6:.0f} | {beyond} | {per_step} "
                     f"| {r['seconds']:.2f} | {ratio} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--steps", default="1000,10000")
    p.add_argument("--providers", default=",".join(PROVIDERS))
    p.add_argument("--cell", default="lstm")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--layers", type=int, default=1)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--repeat", type=int, default=1, help="steps timed (the fastest is kept)")
    p.add_argument("--out", help="JSON path; the Markdown table goes next to it (.md)")
    p.add_argument("--append", action="store_true", help="add to the results in --out")
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(*json.loads(args.child))))
        return 0
    results = []
    if args.append and args.out and os.path.exists(args.out):
        with open(args.out) as f:
            results = json.load(f)["results"]
    for steps in map(int, args.steps.split(",")):
        for provider in args.providers.split(","):
            r = measure(provider, args.cell, steps, args.batch, args.hidden, args.layers,
                        args.threads, args.repeat)
            r["load"] = os.getloadavg()
            print(json.dumps(r), flush=True)
            results.append(r)
    text = table(results)
    print(text)
    if args.out:
        meta = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count()}
        with open(args.out, "w") as f:
            json.dump({"meta": meta, "results": results}, f, indent=1)
        with open(os.path.splitext(args.out)[0] + ".md", "w") as f:
            f.write(f"# One training step on long sequences ({meta['date']}, {meta['cpus']} "
                    f"CPUs)\n\nPeak RSS growth of one step (python -m bench.long); load "
                    f"averages per run are in the JSON.\n\n{text}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
