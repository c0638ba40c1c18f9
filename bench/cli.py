"""``python -m bench``: run the benchmark suites and write the results (see bench/README.md)."""
from __future__ import annotations

import argparse
import datetime
import os
import sys
import time
from typing import List, Optional

import torch

from . import report
from .core import Options, collect, provider_names
from .runner import run_case
from .timing import gemm_ceiling

DEFAULT_OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def _list(text: Optional[str]) -> Optional[List[str]]:
    return None if text is None else [t.strip() for t in text.split(",") if t.strip()]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", dest="size", action="store_const", const="quick",
                      help="the default: standard config and cheap variations, a few minutes on CPU")
    size.add_argument("--full", dest="size", action="store_const", const="full",
                      help="every config, cell, mode and dtype")
    size.add_argument("--tiny", dest="size", action="store_const", const="tiny",
                      help="every config at toy sizes (smoke test of the suite itself)")
    p.set_defaults(size="quick")
    p.add_argument("--device", default=None,
                   help="cpu or cuda[:N] (default: cuda if available, else cpu)")
    p.add_argument("--cell", help="comma-separated cells, e.g. lstm,gru")
    p.add_argument("--provider", help="comma-separated provider patterns, e.g. 'fastrnn:*,ts-loop' "
                   "(torch.nn, the baseline, always runs)")
    p.add_argument("--config", help="comma-separated configs, e.g. fastrnns,packed")
    p.add_argument("--mode", help="inference, training or both (comma-separated)")
    p.add_argument("--dtype", help="comma-separated dtypes, e.g. float32,bfloat16")
    p.add_argument("--suite", help="comma-separated suites (modules of bench/suites)")
    p.add_argument("--out", default=DEFAULT_OUT, help="directory for JSON, Markdown and PNGs "
                   "(default: bench/results)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's choice); 1 gives steadier numbers on "
                   "a machine shared with other jobs (OpenMP barriers stall on busy cores)")
    p.add_argument("--tf32", action="store_true",
                   help="let cuDNN/cuBLAS use TF32 for float32 (off by default: float32 means float32)")
    p.add_argument("--list", action="store_true", help="list the selected cases and exit")
    p.add_argument("--from-json", metavar="PATH", help="run nothing: print the table and rewrite "
                   "the Markdown and plots of a saved result (next to it unless --out is given)")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bar (it is shown only when stderr is a terminal anyway)")
    return p.parse_args(argv)


def options_from(args: argparse.Namespace) -> Options:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    return Options(size=args.size, device=device, cells=_list(args.cell),
                   providers=_list(args.provider), configs=_list(args.config),
                   modes=_list(args.mode), dtypes=_list(args.dtype), suites=_list(args.suite),
                   seed=args.seed)


def ceilings_for(cases, options: Options) -> dict:
    """GEMM ceiling (GFLOP/s) for each dtype of the run, measured now on the device."""
    size = {"tiny": 256, "quick": 1024, "full": 2048}[options.size]
    if options.device.type == "cuda":
        size *= 4
    dtypes = {c.dtype for c in cases}
    return {str(d).replace("torch.", ""): gemm_ceiling(options.device, d, size)
            for d in sorted(dtypes, key=str)}


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.from_json:
        return rewrite(args)
    options = options_from(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    if options.device.type == "cuda":
        torch.backends.cudnn.allow_tf32 = args.tf32
        torch.backends.cuda.matmul.allow_tf32 = args.tf32
    cases = collect(options)
    if args.list:
        for case in cases:
            print(case.name, " ".join(provider_names(case, options)))
        return 0
    if not cases:
        print("no benchmark case matches the filters", file=sys.stderr)
        return 2
    started = time.time()
    ceilings = ceilings_for(cases, options)
    total = sum(len(provider_names(c, options)) for c in cases)
    progress = _progress(total, args.no_progress)
    records = []
    for case in cases:
        records += run_case(case, options, ceilings, on_provider=progress)
    progress(None)
    # Measured again at the end: on a shared machine one measurement can land in a busy spell.
    for dtype, gflops in ceilings_for(cases, options).items():
        ceilings[dtype] = max(ceilings[dtype], gflops)
    for r in records:
        if r.get("gflops") and ceilings.get(r.get("dtype")):
            r["gemm_fraction"] = r["gflops"] / ceilings[r["dtype"]]
    meta = report.metadata(options.device, options.size, ceilings)
    meta["seconds"] = round(time.time() - started, 1)
    print(report.text_table(records))
    stem = f"{report.device_slug(options.device)}-{datetime.date.today().isoformat()}"
    if options.suites and "rnn" not in options.suites:   # the rnn suite's files keep their names
        stem = f"{'-'.join(options.suites)}-{stem}"
    if options.size != "quick":
        stem += f"-{options.size}"
    if args.threads:
        stem += f"-t{args.threads}"
    paths = report.write_all(records, meta, args.out, stem, plots=not args.no_plots)
    wrong = [r for r in records if r["status"] == "wrong"]
    print(f"\n{len(records)} results in {meta['seconds']} s; {len(wrong)} wrong; "
          f"GEMM ceiling {', '.join(f'{k} {v:.0f} GFLOP/s' for k, v in ceilings.items())}")
    for path in paths:
        print(f"wrote {path}")
    return 0


def rewrite(args) -> int:
    """Table, Markdown and plots again from a saved JSON (e.g. one brought back from a GPU)."""
    import json
    with open(args.from_json) as f:
        data = json.load(f)
    out = args.out if args.out != DEFAULT_OUT else os.path.dirname(os.path.abspath(args.from_json))
    stem = os.path.splitext(os.path.basename(args.from_json))[0]
    print(report.text_table(data["results"]))
    for path in report.write_all(data["results"], data["meta"], out, stem,
                                 plots=not args.no_plots, write_json=False):
        print(f"wrote {path}")
    return 0


def _progress(total: int, disabled: bool):
    """A callable that advances a tqdm bar (stderr) by one provider; None closes it.

    Only on a terminal: in a log file or a pipe its carriage-return updates are noise."""
    try:
        from tqdm import tqdm
    except ImportError:
        tqdm = None
    if disabled or tqdm is None or not sys.stderr.isatty():
        return lambda label: None
    bar = tqdm(total=total, unit="run", file=sys.stderr, dynamic_ncols=True)
    seen = [0]

    def step(label):
        if seen[0]:
            bar.update(1)
        if label is None:
            bar.close()
            return
        seen[0] += 1
        bar.set_description(label[:60])
    return step
