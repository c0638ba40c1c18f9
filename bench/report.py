"""What a run leaves behind: a table on stdout, JSON, a Markdown summary and PNG plots."""
from __future__ import annotations

import datetime
import json
import os
import platform
import re
import subprocess
from typing import Dict, List, Optional

import torch

from .core import CONTROL

COLUMNS = ("case", "provider", "status", "median ms", "IQR ms", "tokens/s", "vs baseline",
           "GFLOP/s", "% GEMM", "peak MB")


# ---- run metadata ---------------------------------------------------------------------

def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def device_slug(device: torch.device) -> str:
    """Short file-name-safe name: 'cpu-2c' style on CPU, 'cuda-nvidia-h100-80gb-hbm3' on GPU."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"cpu-{os.cpu_count()}c"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def metadata(device: torch.device, size: str, ceilings: Dict[str, float]) -> dict:
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    try:
        import fastrnn
        fastrnn_version = getattr(fastrnn, "__version__", None)
    except Exception:
        fastrnn_version = None
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                                text=True, timeout=10).stdout.strip() or None
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                                    cwd=root, capture_output=True, text=True,
                                    timeout=10).stdout.strip())
    except (OSError, subprocess.SubprocessError):
        commit, dirty = None, None
    meta = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "size": size,
        "device": str(device),
        "device_name": device_name(device),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton_version,
        "fastrnn": fastrnn_version,
        "git_commit": commit,
        "git_dirty": dirty,
        "gemm_ceiling_gflops": ceilings,
    }
    if device.type == "cuda":
        meta["cudnn"] = torch.backends.cudnn.version()
        meta["cuda"] = torch.version.cuda
        meta["cudnn_allow_tf32"] = torch.backends.cudnn.allow_tf32
        meta["matmul_allow_tf32"] = torch.backends.cuda.matmul.allow_tf32
    else:
        meta["mkldnn"] = torch.backends.mkldnn.is_available()
    return meta


# ---- table ----------------------------------------------------------------------------

def _fmt(value, spec: str, scale: float = 1.0) -> str:
    return "" if value is None else format(value * scale, spec)


def rows(records: List[dict]) -> List[List[str]]:
    table = []
    for r in records:
        status = r["status"]
        if status == "wrong":
            status = f"WRONG: {r['reason']}"
        elif status in ("skipped", "error"):
            status = f"{status}: {r['reason']}"
        iqr = (f"{r['q1_ms']:.3g}-{r['q3_ms']:.3g}" if "q1_ms" in r else "")
        mem = r.get("peak_mem_bytes")
        table.append([r["case"], r["provider"], status, _fmt(r.get("median_ms"), ".4g"), iqr,
                      _fmt(r.get("tokens_per_s"), ".3g"), _fmt(r.get("speedup"), ".2f"),
                      _fmt(r.get("gflops"), ".1f"), _fmt(r.get("gemm_fraction"), ".0f", 100),
                      "n/a" if "median_ms" in r and mem is None else _fmt(mem, ".1f", 2 ** -20)])
    return table


def text_table(records: List[dict], width: int = 60) -> str:
    """Fixed-width table; long status messages are cut to ``width`` characters."""
    body = [[c if len(c) <= width else c[: width - 3] + "..." for c in row]
            for row in rows(records)]
    widths = [max(len(h), *(len(row[i]) for row in body)) if body else len(h)
              for i, h in enumerate(COLUMNS)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()
    return "\n".join([line(COLUMNS), line(["-" * w for w in widths])] + [line(r) for r in body])


def markdown(records: List[dict], meta: dict, plots: List[str]) -> str:
    ceil = ", ".join(f"{k} {v:.0f} GFLOP/s" for k, v in meta["gemm_ceiling_gflops"].items())
    lines = [
        f"# fastrnn benchmark: {meta['device_name']} ({meta['device']})", "",
        f"- date {meta['date']}, `--{meta['size']}`, git {meta['git_commit'] or 'unknown'}"
        + (" (uncommitted changes)" if meta.get("git_dirty") else ""),
        f"- torch {meta['torch']}, triton {meta['triton']}, python {meta['python']}, "
        f"{meta['torch_threads']} torch threads",
        f"- GEMM ceiling (best square torch.mm, measured at the start and end of this run): {ceil}",
        "- `vs baseline`: the case's baseline time (torch.nn; in the variants suite the "
        "TorchScript LayerNorm loop) / provider time, the median over rounds in which every "
        "provider of the case ran once, interleaved (> 1 is faster; for fastrnn:auto and "
        "torch.nn#2 also over rounds of their own with the baseline, bench/README.md); "
        "times over the rounds every provider ran; "
        "`% GEMM`: achieved GFLOP/s (matmul FLOPs only) over the ceiling; "
        "`peak MB`: " + ("CUDA max_memory_allocated growth during one call"
                          if meta["device"].startswith("cuda") else
                          "growth of the process's peak RSS during one call"),
        "- providers are checked against the baseline before timing; WRONG ones are not timed",
        *([f"- load average (1, 5, 15 min) at the end of the run: "
           f"{', '.join(f'{x:.1f}' for x in meta['load_average'])}"]
          if meta.get("load_average") else []),
        "",
        "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for row in rows(records):
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in row) + " |")
    lines.append("")
    lines += per_frame_table(records)
    lines += auto_summary(records)
    for path in plots:
        lines += [f"![{os.path.basename(path)}]({os.path.basename(path)})", ""]
    return "\n".join(lines)


def auto_summary(records: List[dict]) -> List[str]:
    """Markdown lines: what a user of backend "auto" gets, case by case, against torch.nn
    (the promise: never below 1 beyond noise), each ratio with its 95% interval where the
    run has one. Empty when the run has no fastrnn:auto."""
    auto = [r for r in records if r["provider"] == "fastrnn:auto" and "speedup" in r]
    if not auto:
        return []
    # beside it, the control's ratio in the same case: identical compute to the baseline
    control = {r["case"]: r for r in records if r["provider"] == CONTROL and "speedup" in r}
    lines = ["## `fastrnn:auto` vs torch.nn", "",
             f"lowest {min(r['speedup'] for r in auto):.2f}x over {len(auto)} cases", ""]
    if control:
        lines += [f"`{CONTROL}` is a second torch.nn module with the same weights: its ratio "
                  f"is what noise and memory placement alone read in that case (lowest "
                  f"{min(r['speedup'] for r in control.values()):.2f}x). In brackets: the 95% "
                  "interval of the median per-round ratio, and the rounds.", "",
                  f"| case | fastrnn:auto / torch.nn | {CONTROL} / torch.nn |", "|---|---|---|"]
        lines += [f"| {r['case']} | {_ratio(r)} | {_ratio(control.get(r['case']))} |"
                  for r in auto]
    else:
        lines += ["| case | fastrnn:auto / torch.nn |", "|---|---|"]
        lines += [f"| {r['case']} | {_ratio(r)} |" for r in auto]
    return lines + [""]


def _ratio(record: Optional[dict]) -> str:
    """'1.01 (0.99-1.03, 120)': the ratio to the baseline, its 95% interval and rounds."""
    if record is None:
        return "-"
    if not record.get("speedup_ci"):
        return f"{record['speedup']:.2f}"
    low, high = record["speedup_ci"]
    rounds = record.get("ratio_rounds", record.get("repeats"))
    return f"{record['speedup']:.2f} ({low:.2f}-{high:.2f}, {rounds})"


def _per_frame_us(records: List[dict], key: str = "median_ms"
                  ) -> Dict[tuple, Dict[str, Dict[int, float]]]:
    """Streaming records (those with a ``chunk``): {(cell, hidden, batch): {provider:
    {chunk: microseconds per frame}}} from the calls' ``key`` (median_ms or min_ms)."""
    table: Dict[tuple, Dict[str, Dict[int, float]]] = {}
    for r in records:
        if r.get("chunk") and r.get(key) is not None:
            case = (r["cell"], r["hidden"], r["batch"])
            table.setdefault(case, {}).setdefault(r["provider"], {})[r["chunk"]] = \
                r[key] * 1e3 / r["chunk"]
    return table


def per_frame_table(records: List[dict]) -> List[str]:
    """Markdown lines: microseconds per frame by chunk size (streaming records only), the
    median call and the fastest (on a loaded machine the fastest is the one least disturbed)."""
    return _per_frame_lines(records, "median_ms", "median call") + \
        _per_frame_lines(records, "min_ms", "fastest call") + _approximation_lines(records)


def _approximation_lines(records: List[dict]) -> List[str]:
    """Markdown lines: the largest error against the baseline of the reduced-precision
    providers (bench.core.Case.approximate) by chunk size, on the benchmark's inputs."""
    table = {}
    for r in records:
        error = (r.get("check") or {}).get("max_abs_error")
        if r.get("chunk") and error is not None:
            case = (r["cell"], r["hidden"], r["batch"], r["provider"])
            table.setdefault(case, {})[r["chunk"]] = error
    if not table:
        return []
    chunks = sorted({c for by_chunk in table.values() for c in by_chunk})
    lines = ["## Max error against the float32 baseline (reduced-precision weights)", "",
             "| cell | hidden | batch | provider | " + " | ".join(f"chunk {c}" for c in chunks)
             + " |", "|---|---|---|---|" + "---|" * len(chunks)]
    for (cell, hidden, batch, provider), by_chunk in sorted(table.items()):
        lines.append(f"| {cell} | {hidden} | {batch} | {provider} | " + " | ".join(
            _fmt(by_chunk.get(c), ".2g") for c in chunks) + " |")
    return lines + [""]


def _per_frame_lines(records: List[dict], key: str, what: str) -> List[str]:
    table = _per_frame_us(records, key)
    if not table:
        return []
    chunks = sorted({c for providers in table.values() for p in providers.values() for c in p})
    lines = [f"## Time per frame, {what} (us; per call / chunk)", "",
             "| cell | hidden | batch | provider | " + " | ".join(f"chunk {c}" for c in chunks)
             + " |", "|---|---|---|---|" + "---|" * len(chunks)]
    for (cell, hidden, batch), providers in sorted(table.items()):
        for provider, by_chunk in providers.items():
            lines.append(f"| {cell} | {hidden} | {batch} | {provider} | " + " | ".join(
                _fmt(by_chunk.get(c), ".4g") for c in chunks) + " |")
    return lines + [""]


def plot_per_frame(records: List[dict], path: str) -> Optional[str]:
    """Time per frame against chunk size, a panel per (cell, hidden, batch) and a line per
    provider; None without streaming records."""
    table = _per_frame_us(records)
    if not table:
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = sorted(table)
    columns = min(3, len(keys))
    rows_ = (len(keys) + columns - 1) // columns
    fig, axes = plt.subplots(rows_, columns, figsize=(5.5 * columns, 3.8 * rows_), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        for provider, by_chunk in table[key].items():
            ax.plot(*zip(*sorted(by_chunk.items())), marker="o", label=provider,
                    linestyle="--" if provider == "memory floor" else "-")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("chunk (frames per call)")
        ax.set_ylabel("us per frame")
        ax.set_title(f"{key[0].upper()} hidden {key[1]} batch {key[2]}")
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ---- plots ----------------------------------------------------------------------------

# Params that define a point of a sweep: a plot against one of them keeps the others as in
# the standard (fastrnns) config.
SWEEP_KEYS = ("seq", "batch", "input", "hidden", "layers", "bidirectional", "packed")


def plot_speedup(records: List[dict], x: str, path: str, anchor: str = "fastrnns") -> Optional[str]:
    """Speed-up vs torch.nn against param ``x`` (one panel per cell and mode, a line per
    provider and dtype); None when the run has fewer than two points of that sweep."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    anchors = {r["cell"]: r for r in records if r.get("config") == anchor and "cell" in r}
    points = [r for r in records if r.get("speedup") and r.get("cell") in anchors
              and r["provider"] != r.get("baseline", "torch.nn")   # baseline: dashed line at 1
              and all(r.get(k) == anchors[r["cell"]].get(k) for k in SWEEP_KEYS if k != x)]
    if len({r[x] for r in points}) < 2:
        return None
    cells = sorted({r["cell"] for r in points})
    modes = sorted({r["mode"] for r in points})
    fig, axes = plt.subplots(len(cells), len(modes), figsize=(5.5 * len(modes), 3.8 * len(cells)),
                             squeeze=False)
    dtypes = sorted({r["dtype"] for r in points})
    for i, cell in enumerate(cells):
        for j, mode in enumerate(modes):
            ax = axes[i][j]
            panel = [r for r in points if r["cell"] == cell and r["mode"] == mode]
            for provider in sorted({r["provider"] for r in panel}):
                for dtype in dtypes:
                    line = sorted((r[x], r["speedup"]) for r in panel
                                  if r["provider"] == provider and r["dtype"] == dtype)
                    if line:
                        label = provider if len(dtypes) == 1 else f"{provider} {dtype}"
                        ax.plot(*zip(*line), marker="o", label=label)
            ax.axhline(1.0, color="gray", linewidth=0.8, linestyle="--", label="torch.nn")
            ax.set_xscale("log", base=2)
            ax.set_xlabel(x)
            ax.set_ylabel("speed-up vs torch.nn")
            ax.set_title(f"{cell.upper()} {mode}")
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ---- files ----------------------------------------------------------------------------

def write_all(records: List[dict], meta: dict, out_dir: str, stem: str, plots: bool = True,
              write_json: bool = True):
    """Write ``<stem>.json``, ``<stem>.md`` and plots under ``out_dir``; returns the paths."""
    os.makedirs(out_dir, exist_ok=True)
    made = []
    if plots:
        for x in ("batch", "hidden"):
            path = plot_speedup(records, x, os.path.join(out_dir, f"{stem}-speedup-vs-{x}.png"))
            if path:
                made.append(path)
        path = plot_per_frame(records, os.path.join(out_dir, f"{stem}-per-frame.png"))
        if path:
            made.append(path)
    json_path = os.path.join(out_dir, f"{stem}.json")
    if write_json:
        with open(json_path, "w") as f:
            json.dump({"meta": meta, "results": records}, f, indent=1, default=str)
    md_path = os.path.join(out_dir, f"{stem}.md")
    with open(md_path, "w") as f:
        f.write(markdown(records, meta, made))
    return ([json_path] if write_json else []) + [md_path] + made
