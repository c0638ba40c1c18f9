"""Timing, peak memory and the GEMM ceiling of the device.

GPU: CUDA events around each call (one event pair per repeat), memory from
``torch.cuda.max_memory_allocated``. CPU: ``time.perf_counter`` around each call, peak
memory as the growth of the process's peak resident set (VmHWM, reset through
/proc/self/clear_refs) over its resident set before the call, with glibc told to give
large freed blocks back to the OS at once so that earlier runs do not hide new peaks.
That setting would also tax every timed call with fresh pages for each block of 128 KiB
or more, which a user's process does not pay (glibc raises its thresholds as large blocks
are freed), so peak memory is taken in a call of its own before the timed ones, and the
timed calls run with glibc's thresholds at the values it settles on in a long-running
process (mmap 32 MiB, trim 64 MiB: blocks above 32 MiB get fresh pages every call there
too). Both devices: warm-up calls, the memory call, untimed rounds that let every provider
settle after it (Budget.settle), then repeats until both a minimum count and a time budget
are met (or a maximum count); the median and the interquartile range are reported. The
providers of one case are timed interleaved, round by round in a shuffled order, and their
ratio to the baseline is the median of the per-round ratios: on a shared machine a slow spell then
slows both sides of a pair instead of one provider's whole sample.
"""
from __future__ import annotations

import ctypes
import dataclasses
import math
import random
import statistics
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch


@dataclasses.dataclass
class Timing:
    median_ms: float
    q1_ms: float
    q3_ms: float
    min_ms: float
    max_ms: float
    repeats: int
    peak_mem_bytes: Optional[int]   # None when it cannot be measured on this device


@dataclasses.dataclass
class Budget:
    warmup: int = 1          # calls before the memory call (the correctness check ran once)
    # Untimed interleaved rounds after every provider's memory call, before the timed ones.
    # The memory call trims glibc's heap (module doc), so each provider's next call faults its
    # working memory in again (on CPU ~4800 page faults, a few percent of a 250 ms training
    # call); a TorchScript loop optimises its graph on its first calls (1.5x slower there).
    settle: int = 0
    min_repeats: int = 3
    max_repeats: int = 50
    seconds: float = 1.0     # keep repeating until this much time was spent (and min_repeats)
    cap_seconds: float = float("inf")   # stop after this much time even below min_repeats
    # Then the baseline and the focus providers (bench.core.FOCUS) alone, rebuilt afresh
    # ``placements`` times (new tensors, so other places in memory), each time for at least
    # as many rounds as the case had and then until each one's ratio to the baseline is known to
    # +-precision (the 95% interval of the median per-round ratio, relative), or until
    # focus_cap_seconds of such calls per provider in all.
    precision: float = 0.0
    placements: int = 1
    focus_cap_seconds: float = 0.0


def _sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory(fn: Callable[[], object], device: torch.device, warmup: int) -> Optional[int]:
    """Warm-up calls, then the peak memory of one call (bytes above what was allocated before
    it; None where the device cannot tell)."""
    for _ in range(warmup):
        fn()
    _sync(device)
    memory = PeakMemory(device)
    memory.start()
    fn()
    memory.stop()
    return memory.peak


def time_call(fn: Callable[[], object], device: torch.device) -> float:
    """Milliseconds of one call."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def time_interleaved(fns: Sequence[Callable[[], object]], device: torch.device,
                     budget: Budget, enough: Optional[Callable[[List[List[float]]], bool]] = None
                     ) -> Tuple[List[List[float]], Dict[int, BaseException]]:
    """Time several workloads round by round: each round calls every workload once, so a
    spell of load on a shared machine falls on all of them alike and each round gives a
    paired ratio (see ``paired_ratio``). The order is shuffled every round (seeded): what a
    call finds in the caches and the allocator depends on the call before it, and in a fixed
    rotation every workload would always follow the same one. ``budget.settle`` rounds run
    first, untimed. The budget counts per workload; past ``budget.min_repeats`` rounds stop as
    soon as ``enough(times)`` holds. Returns the times (ms) per workload and the exception of
    any that raised (it is left out of later rounds)."""
    live = list(range(len(fns)))
    times: List[List[float]] = [[] for _ in fns]
    failed: Dict[int, BaseException] = {}
    order = random.Random(0)
    rounds, spent = -budget.settle, 0.0
    while live and (rounds <= 0 or (rounds < budget.max_repeats
                                    and spent < budget.cap_seconds * len(fns)
                                    and (rounds < budget.min_repeats
                                         or (spent < budget.seconds * len(fns)
                                             and not (enough and enough(times)))))):
        for i in order.sample(live, len(live)):
            try:
                ms = time_call(fns[i], device)
            except Exception as exc:  # noqa: BLE001 - reported by the caller
                failed[i] = exc
                continue
            if rounds >= 0:
                times[i].append(ms)
                spent += ms / 1e3
        live = [i for i in live if i not in failed]
        rounds += 1
    return times, failed




def ratio_interval(baseline_ms: Sequence[float], provider_ms: Sequence[float]
                   ) -> Optional[Tuple[float, float]]:
    """95% confidence interval of the median per-round ratio (``paired_ratio``), from the
    order statistics of the ratios (no assumption on their distribution); None below 6
    rounds."""
    ratios = sorted(b / p for b, p in zip(baseline_ms, provider_ms))
    n = len(ratios)
    if n < 6:
        return None
    spread = 1.96 * n ** 0.5   # the interval's ranks (1-based): (n -+ spread) / 2, rounded out
    low, high = math.floor((n - spread) / 2), math.ceil(1 + (n + spread) / 2)
    return ratios[max(0, low - 1)], ratios[min(n, high) - 1]


def ratio_precision(baseline_ms: Sequence[float], provider_ms: Sequence[float]) -> float:
    """Half the width of ``ratio_interval`` over the median ratio."""
    interval = ratio_interval(baseline_ms, provider_ms)
    if interval is None:
        return float("inf")
    return (interval[1] - interval[0]) / 2 / paired_ratio(baseline_ms, provider_ms)


def summary(times: Sequence[float], peak_mem_bytes: Optional[int]) -> Timing:
    q = statistics.quantiles(times, n=4, method="inclusive") if len(times) > 1 else [times[0]] * 3
    return Timing(statistics.median(times), q[0], q[2], min(times), max(times), len(times),
                  peak_mem_bytes)


def paired_ratio(baseline_ms: Sequence[float], provider_ms: Sequence[float]) -> float:
    """Median over rounds of baseline time / provider time, each pair from the same round."""
    return statistics.median(b / p for b, p in zip(baseline_ms, provider_ms))


class PeakMemory:
    """Bytes allocated at the peak of a call above what was allocated before it."""

    def __init__(self, device: torch.device):
        self.device, self.peak, self._before = device, None, 0

    def start(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._before = torch.cuda.memory_allocated(self.device)
        elif cpu_memory_supported():
            _glibc_thresholds(128 * 1024, 128 * 1024)   # tensors >= 128 KiB: mmap, unmap on free
            ctypes.CDLL("libc.so.6").malloc_trim(0)     # and free heap pages out of the RSS
            _reset_peak_rss()
            self._before = _read_status_kib("VmRSS") * 1024

    def stop(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device) - self._before
        elif cpu_memory_supported():
            self.peak = max(0, _read_status_kib("VmHWM") * 1024 - self._before)
            _glibc_thresholds(32 << 20, 64 << 20)   # a long-running process's (module doc)


_cpu_memory: Optional[bool] = None


def _glibc_thresholds(mmap_bytes: int, trim_bytes: int) -> bool:
    libc = ctypes.CDLL("libc.so.6")
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    return bool(libc.mallopt(M_MMAP_THRESHOLD, mmap_bytes)
                and libc.mallopt(M_TRIM_THRESHOLD, trim_bytes))


def cpu_memory_supported() -> bool:
    """True on Linux when the peak RSS can be reset and glibc's thresholds set (see doc)."""
    global _cpu_memory
    if _cpu_memory is None:
        try:
            _reset_peak_rss()
            _read_status_kib("VmHWM")
            _cpu_memory = _glibc_thresholds(32 << 20, 64 << 20)
        except (OSError, ValueError, AttributeError):
            _cpu_memory = False
    return _cpu_memory


def _reset_peak_rss():
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _read_status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise ValueError(f"{key} not in /proc/self/status")


def gemm_ceiling(device: torch.device, dtype: torch.dtype, size: int) -> float:
    """Best GFLOP/s of a square torch.mm of ``size`` on the device: the ceiling we compare with."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    flops = 2.0 * size ** 3
    best = float("inf")
    for _ in range(3):   # warm-up
        torch.mm(a, b)
    _sync(device)
    for _ in range(10 if device.type == "cuda" else 5):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            torch.mm(a, b)
            end.record()
            end.synchronize()
            seconds = start.elapsed_time(end) / 1e3
        else:
            t0 = time.perf_counter()
            torch.mm(a, b)
            seconds = time.perf_counter() - t0
        best = min(best, seconds)
    return flops / best / 1e9
