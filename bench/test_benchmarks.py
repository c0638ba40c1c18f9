"""The benchmark cases through pytest-benchmark: ``pytest bench/ --benchmark-only``.

Same cases and correctness check as ``python -m bench``; choose them with environment
variables BENCH_SIZE (tiny / quick / full, default quick), BENCH_DEVICE (default cuda if
available) and with ``-k`` (test ids are ``<case>/<provider>``, e.g. ``-k "lstm and fastrnns"``).
A provider whose result is wrong fails its test before it is timed.
"""
import os

import pytest
import torch

from bench.check import judge
from bench.core import Options, Skip, collect, provider_names

OPTIONS = Options(size=os.environ.get("BENCH_SIZE", "quick"),
                  device=torch.device(os.environ.get("BENCH_DEVICE")
                                      or ("cuda" if torch.cuda.is_available() else "cpu")))
CASES = collect(OPTIONS)
PARAMS = [pytest.param(case, name, id=f"{case.name}/{name}")
          for case in CASES for name in provider_names(case, OPTIONS)]

_baseline = {}   # the current case's baseline result (one case at a time, to bound memory)


def _baseline_result(case):
    if case.name not in _baseline:
        for old in list(_baseline):
            old_case = _baseline.pop(old)[0]
            if old_case.cleanup:
                old_case.cleanup()
        _baseline[case.name] = (case, case.providers[case.baseline]()())
    return _baseline[case.name][1]


def _sync():
    if OPTIONS.device.type == "cuda":
        torch.cuda.synchronize(OPTIONS.device)


@pytest.mark.parametrize("case,provider", PARAMS)
def test_benchmark(benchmark, case, provider):
    baseline = _baseline_result(case)
    try:
        workload = case.providers[provider]()
    except Skip as exc:
        pytest.skip(str(exc))
    verdict = judge(workload(), baseline, case.dtype, case.gold)
    assert verdict.ok, f"{provider} is wrong on {case.name}: {verdict.message}"
    tokens = case.tokens() if callable(case.tokens) else case.tokens
    flops = case.flops() if callable(case.flops) else case.flops
    benchmark.extra_info.update({k: str(v) for k, v in case.params.items()})
    benchmark.extra_info.update(provider=provider, tokens=tokens, flops=flops)

    def call():
        workload()
        _sync()
    benchmark(call)
