"""Run cases: build each provider, check its result against the baseline, then time it.

A provider whose result is wrong is recorded as ``wrong`` (with its error) and never timed;
one that cannot run is ``skipped`` (with the reason it gave); one that raises is ``error``.
"""
from __future__ import annotations

import dataclasses
import gc
import time
import traceback
from typing import Callable, Dict, List, Optional

import torch

from .check import check_provider
from .core import FOCUS, Case, Options, Skip, provider_names
from .timing import (Budget, paired_ratio, peak_memory, ratio_interval, ratio_precision, summary,
                     time_interleaved)

BUDGETS = {  # (device type, size) -> timing budget
    ("cpu", "tiny"): Budget(warmup=0, min_repeats=2, max_repeats=3, seconds=0.0),
    # CPU: a case's ratio is the median of its per-round ratios, so rounds are what counts: at
    # least 7 for calls up to ~0.8 s per provider. With 3 (the first right after the memory
    # calls) a module running torch.nn's very kernel read 0.88-1.08x torch.nn on a shared
    # machine, a TorchScript loop 0.7x where it is level
    # (bench/results/level-auto-cpu-2c-2026-12-02.md).
    # Then the focus providers (auto, the control) run on beside the baseline alone until
    # their ratios are known to +-2% (pin_ratios): at 2 threads one round's ratio scatters by
    # 5-15% on the 2-core dev machine, and the 7-30 rounds of all providers left +-4-6%.
    ("cpu", "quick"): Budget(warmup=0, settle=2, min_repeats=7, max_repeats=30, seconds=0.5,
                             cap_seconds=6.0, precision=0.02, placements=4,
                             focus_cap_seconds=4.0),
    ("cpu", "full"): Budget(warmup=2, settle=2, min_repeats=9, max_repeats=50, seconds=3.0,
                            precision=0.01, placements=8, focus_cap_seconds=20.0),
    ("cuda", "tiny"): Budget(warmup=1, min_repeats=3, max_repeats=5, seconds=0.0),
    ("cuda", "quick"): Budget(warmup=5, min_repeats=10, max_repeats=200, seconds=0.5),
    ("cuda", "full"): Budget(warmup=10, min_repeats=20, max_repeats=1000, seconds=2.0),
}


def _value(x):
    return x() if callable(x) else x


def _record_error(record: dict, exc: BaseException) -> None:
    record.update(status="error", reason=f"{type(exc).__name__}: {exc}".strip(),
                  traceback="".join(traceback.format_exception(exc, limit=6)))


def pin_ratios(case: Case, names: List[str], times: List[List[float]], device: torch.device,
               budget: Budget) -> None:
    """More rounds of the baseline (``names[0]``) and the focus providers alone, appended to
    their ``times``, until each focus ratio to the baseline is known to ``budget.precision``.
    Where a module's tensors lie in memory moves its time by a few percent for as long as
    they lie there (six identical torch.nn GRU modules in one process, batch 1, 2 threads:
    0.975-1.037x the first, each to +-1%), so the rounds are spread over
    ``budget.placements`` fresh builds of each, made while the previous ones still hold
    their memory (new pages, not the freed ones again). A provider that raises here keeps
    the times it has."""
    if not budget.precision or len(names) < 2:
        return
    # every build at least as many rounds as the case's own (within the cap), so that no
    # one placement outweighs the others in the median
    block = dataclasses.replace(budget, settle=1, seconds=float("inf"), max_repeats=10 ** 6,
                                min_repeats=len(times[0]),
                                cap_seconds=budget.focus_cap_seconds / budget.placements)

    def enough(new: List[List[float]]) -> bool:
        return all(ratio_precision(times[0] + new[0], times[i] + new[i]) <= budget.precision
                   for i in range(1, len(names)))

    for _ in range(budget.placements):
        try:   # built before the previous build's workloads are let go: other pages
            workloads = [case.providers[name]() for name in names]
        except Exception:  # noqa: BLE001 - the case's own rounds stand
            return
        new, failed = time_interleaved(workloads, device, block, enough)
        if failed:
            return
        for old, more in zip(times, new):
            old += more


def run_case(case: Case, options: Options, ceilings: Dict[str, float],
             on_provider: Optional[Callable[[str], None]] = None) -> List[dict]:
    """Records (one dict per provider) for ``case``; the baseline's comes first. Each provider
    is built, checked against the baseline and its peak memory taken; then all that passed are
    timed together, interleaved (bench.timing)."""
    budget = BUDGETS[(options.device.type, options.size)]
    names = sorted(provider_names(case, options), key=lambda n: n != case.baseline)
    records, checked, baseline_result = [], [], None
    tokens = flops = None
    for name in names:
        record = {"suite": case.suite, "case": case.name, "provider": name,
                  "baseline": case.baseline, **case.params, "status": "ok", "reason": ""}
        records.append(record)
        if on_provider:
            on_provider(f"{case.name} {name}")
        started = time.perf_counter()
        if name != case.baseline and baseline_result is None:
            record.update(status="error", reason="the baseline did not run, nothing to check against")
            continue
        try:
            workload = case.providers[name]()
            result = workload()   # the check run; it is also the first warm-up call
            if name == case.baseline:
                baseline_result = result
                tokens, flops = _value(case.tokens), _value(case.flops)
                record["check"] = {"against": "is the baseline"}
            else:
                record["check"], wrong = check_provider(case, name, result, baseline_result)
                if wrong:
                    record.update(status="wrong", reason=wrong)
                    continue
            del result
            record["peak_mem_bytes"] = peak_memory(workload, options.device, budget.warmup)
            checked.append((record, workload))
        except Skip as exc:
            record.update(status="skipped", reason=str(exc))
        except Exception as exc:  # reported in the results; the run goes on
            _record_error(record, exc)
        finally:
            record["wall_s"] = round(time.perf_counter() - started, 2)  # set-up and check
            workload = None
    baseline_result = None
    if on_provider and checked:
        on_provider(f"{case.name} timing {len(checked)} providers")
    times, failed = time_interleaved([w for _, w in checked], options.device, budget)
    baseline_times = times[0] if checked and checked[0][0]["provider"] == case.baseline \
        and 0 not in failed else None
    # The rounds every provider ran: a provider's time is summed up over these alone, so that
    # the times of a case compare (the rounds of the focus providers alone find the caches in
    # another state); its ratio to the baseline takes every round the two shared.
    common = min((len(t) for i, t in enumerate(times) if i not in failed), default=0)
    if baseline_times is not None:
        focus = [i for i, (record, _) in enumerate(checked)
                 if record["provider"] in FOCUS and i not in failed]
        pin_ratios(case, [checked[i][0]["provider"] for i in [0] + focus],
                   [times[i] for i in [0] + focus], options.device, budget)
    for i, (record, _) in enumerate(checked):
        if i in failed:
            _record_error(record, failed[i])
            continue
        timing = summary(times[i][:common], record["peak_mem_bytes"])
        seconds = timing.median_ms / 1e3
        record.update(median_ms=timing.median_ms, q1_ms=timing.q1_ms, q3_ms=timing.q3_ms,
                      min_ms=timing.min_ms, max_ms=timing.max_ms, repeats=timing.repeats,
                      times_ms=times[i], tokens=tokens,
                      tokens_per_s=tokens / seconds if tokens else None)
        if flops:
            gflops = flops / seconds / 1e9
            ceiling = ceilings.get(record.get("dtype", ""))
            record.update(flops=flops, gflops=gflops,
                          gemm_fraction=gflops / ceiling if ceiling else None)
        if baseline_times is not None:
            record["speedup"] = paired_ratio(baseline_times, times[i])
            record["ratio_rounds"] = min(len(baseline_times), len(times[i]))
            interval = ratio_interval(baseline_times, times[i])
            if interval:
                record["speedup_ci"] = list(interval)
    checked = None
    if case.cleanup:
        case.cleanup()
    if options.size != "tiny":   # a full collection costs ~0.3 s with torch._dynamo loaded
        gc.collect()
    if options.device.type == "cuda":
        torch.cuda.empty_cache()
    return records
