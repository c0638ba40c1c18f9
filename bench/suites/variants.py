"""LayerNorm LSTM: fastrnn.LSTM(layer_norm=True) vs TorchScript loops vs nn.LSTM.

cuDNN and oneDNN have no LayerNorm LSTM, so what people run instead is a hand-written loop,
the one in PyTorch's ``benchmarks/fastrnns`` (custom_lstms' LayerNormLSTM) under
TorchScript. Targets (``TARGETS``): on CPU at least 5x the TorchScript loop; on GPU at least 10x
the loop and within 1.3x of plain cuDNN ``nn.LSTM`` (no layer norm: the speed of light).

Three kinds of case per config (``variant`` in the results), each checked before timing:

- ``ln-lstm/<config>/<mode>/<dtype>``: baseline ``ts-ln-loop`` (:class:`bench.loops.
  LayerNormLoopLSTM`, input GEMM + its norm hoisted out of the loop: the stronger loop);
  ``ts-ln-loop-naive`` (the same loop doing the input side per step, as custom_lstms does);
  ``fastrnn:<backend>`` = ``fastrnn.LSTM(layer_norm=True, backend=...)`` for every available
  backend that supports the layer norm options (the others are reported skipped, with why);
- ``plain-lstm/<config>/<mode>/<dtype>``: baseline ``torch.nn`` (``nn.LSTM``, no layer norm)
  and ``fastrnn:<backend>`` without options (what layer norm costs fastrnn);
- ``ln-lstm-reg/<config>/training/<dtype>``: layer norm plus recurrent dropout and zoneout
  (training mode, masks drawn from the same seed by both): ``ts-ln-loop`` with the same
  regularisers vs ``fastrnn:<backend>`` (what the stochastic options cost).

The providers of a case share the same weights (an ``nn.LSTM`` state_dict plus random layer
norm gains and biases, so a swapped or dropped norm parameter fails the check) and inputs.
The ``vs baseline`` column of the generic table is the time ratio against the case's
baseline; ``python -m bench.suites.variants RESULT.json`` prints the summary against these
targets (fastrnn vs both loops and vs nn.LSTM across cases).

Configs (bench.suites.rnn.CONFIGS): fastrnns (T=100, B=64, I=H=512), batch1, batch8,
hidden256 (``--quick``: fastrnns and batch1). The records carry no ``cell`` parameter, so
the rnn suite's speed-up plots (which are against torch.nn) leave them out; select this
suite with ``--suite variants``.
"""
from __future__ import annotations

import dataclasses
import inspect
import sys
from typing import Callable, Dict, List, Optional, Tuple

import torch

from ..core import Case, Options, Skip, suite
from ..loops import LayerNormLoopLSTM
from . import rnn

CONFIG_NAMES = ("fastrnns", "batch1", "batch8", "hidden256")
# --quick (the default of `python -m bench`, the README's main job) keeps the standard config
# and the small batch where the loop's per-step overhead shows; --full runs all four.
QUICK_CONFIG_NAMES = ("fastrnns", "batch1")
LN_FEATURES = ("layer_norm", "layer_norm_cell")
# The regularised case: p of recurrent dropout, (p_h, p_c) of zoneout (Krueger et al. use
# 0.05 / 0.5 for LSTM h / c on language modelling; the cost does not depend on the values).
REGULARISERS = dict(recurrent_dropout=0.25, zoneout=(0.05, 0.5))
REG_FEATURES = LN_FEATURES + ("recurrent_mask", "zoneout_h", "zoneout_c")
VARIANTS = {"ln-lstm": LN_FEATURES, "plain-lstm": (), "ln-lstm-reg": REG_FEATURES}
LN_NAMES = ("ln_weight_ih", "ln_bias_ih", "ln_weight_hh", "ln_bias_hh", "ln_weight_c", "ln_bias_c")


# Gain of the recurrent layer norm in the benchmark weights. At gain 1 (the usual initial
# value) with torch.nn's initial weights the LN-LSTM recurrence is chaotic: LN rescales the
# small h @ w_hh.T to unit variance, so float32 rounding grows to ~4e-4 relative over 100
# steps in every implementation (the TorchScript loop, fastrnn's reference and native alike,
# measured against float64), and a check at that noise level could not tell a subtly wrong
# kernel from a right one. Around 0.5 the float32 error stays near 2e-6 and the check is
# sharp. The values do not change the work timed.
RECURRENT_LN_GAIN = 0.5


class LayerNormCaseData(rnn.CaseData):
    """rnn.CaseData (same seeded nn.LSTM weights, inputs and output gradients) plus layer norm
    parameters: gains 1 + 0.1 N(0,1) (the recurrent one times RECURRENT_LN_GAIN) and biases
    0.1 N(0,1), each drawn separately."""

    def __init__(self, spec: rnn.Spec, seed: int):
        super().__init__(spec, seed)
        self._norms = None

    def master(self):
        state, x, lengths, grads = super().master()
        if self._norms is None:
            c, gen = self.spec.config, torch.Generator().manual_seed(self.seed + 1)
            self._norms = {}
            for layer in range(c.layers):
                for suffix in ("", "_reverse")[: self.spec.directions]:
                    for name in LN_NAMES:
                        size = c.hidden if name.endswith("_c") else 4 * c.hidden
                        value = 0.1 * torch.randn(size, generator=gen)
                        if "weight" in name:
                            value = value + 1
                        if name == "ln_weight_hh":
                            value = value * RECURRENT_LN_GAIN
                        self._norms[f"{name}_l{layer}{suffix}"] = value
        return {**state, **self._norms}, x, lengths, grads

    def clear(self):
        super().clear()
        self._norms = None


def _options_reason(backend: str, spec: rnn.Spec, option_names: Tuple[str, ...]) -> Optional[str]:
    """Why ``backend`` cannot run this case with ``option_names``, or None."""
    from fastrnn import backends
    check = backends.get(backend).unsupported_reason
    if option_names and "option_names" not in inspect.signature(check).parameters:
        return "this fastrnn has no options (layer_norm, zoneout, ...)"
    extra = {"option_names": option_names} if option_names else {}
    return check(spec.cell, spec.dtype, spec.device, spec.config.hidden, 0, **extra)


def fastrnn_variant_module(spec: rnn.Spec, backend: str, variant: str):
    """``fastrnn.LSTM(layer_norm=True, backend=backend)`` (and the regularisers for
    ln-lstm-reg), or Skip naming why the backend cannot."""
    import fastrnn
    rnn.skip_slow_reference(spec, backend)
    reason = _options_reason(backend, spec, VARIANTS[variant])
    if reason:
        raise Skip(reason)
    c = spec.config
    options = dict(layer_norm=True, **(REGULARISERS if variant == "ln-lstm-reg" else {}))
    return fastrnn.LSTM(c.input, c.hidden, num_layers=c.layers, bidirectional=c.bidirectional,
                        device=spec.device, dtype=spec.dtype, backend=backend, **options)


def loop_variant_module(spec: rnn.Spec, variant: str, hoist: bool = True,
                        dtype: Optional[torch.dtype] = None):
    """The TorchScript loop; in ``dtype`` (the gold run) it keeps the case dtype's masks."""
    c = spec.config
    options = REGULARISERS if variant == "ln-lstm-reg" else {}
    return LayerNormLoopLSTM(c.input, c.hidden, c.layers, c.bidirectional, hoist=hoist,
                             mask_dtype=spec.dtype, device=spec.device,
                             dtype=dtype or spec.dtype, **options)


def _dtypes(options: Options) -> List[torch.dtype]:
    if options.device.type == "cuda" and options.size == "full":
        return [torch.float32, torch.float16, torch.bfloat16]
    return [torch.float32]


def _case(options: Options, variant: str, config_name: str, mode: str,
          dtype: torch.dtype) -> Case:
    config = rnn.CONFIGS[config_name]
    if options.size == "tiny":
        config = config.tiny()
    spec = rnn.Spec("lstm", config_name, config, mode, dtype, options.device, options.size)
    data = (rnn.CaseData if variant == "plain-lstm" else LayerNormCaseData)(spec, options.seed)
    seeded = variant == "ln-lstm-reg"   # masks: every call of every provider draws the same

    def build(make: Callable[[], torch.nn.Module], dtype=dtype, warm=False, rounded_to=None):
        def factory():
            call = data.workload(make(), dtype, rounded_to)
            if seeded:
                inner = call

                def call():
                    torch.manual_seed(options.seed)
                    return inner()
            if warm:   # TorchScript profiles the first call and optimises on the second
                call()
            return call
        return factory

    providers: Dict[str, Callable] = {}
    if variant == "plain-lstm":
        baseline = "torch.nn"
        providers[baseline] = build(lambda: rnn.torch_nn_module(spec))
        gold_module = lambda d: rnn.torch_nn_module(spec, d)
    else:
        baseline = "ts-ln-loop"
        providers[baseline] = build(lambda: loop_variant_module(spec, variant), warm=True)
        if variant == "ln-lstm":
            providers["ts-ln-loop-naive"] = build(
                lambda: loop_variant_module(spec, variant, hoist=False), warm=True)
        gold_module = lambda d: loop_variant_module(spec, variant, dtype=d)
    names, reason = rnn.fastrnn_backends(options.device)
    if names is None:
        def unavailable():
            raise Skip(reason)
        providers["fastrnn"] = unavailable
    for backend in names or ():
        if variant == "plain-lstm":
            make = lambda b=backend: rnn.fastrnn_module(spec, b)
        else:
            make = lambda b=backend: fastrnn_variant_module(spec, b, variant)
        providers[f"fastrnn:{backend}"] = build(make)

    cache: Dict[str, object] = {}

    def gold():   # float64 on the case's rounded values
        if "result" not in cache:
            cache["result"] = build(lambda: gold_module(torch.float64), torch.float64,
                                    rounded_to=dtype)()()
        return cache["result"]

    dtype_name = str(dtype).replace("torch.", "")
    params = dict(variant=variant, config=config_name, mode=mode, dtype=dtype_name,
                  **dataclasses.asdict(config))
    if seeded:
        params.update(recurrent_dropout=REGULARISERS["recurrent_dropout"],
                      zoneout=list(REGULARISERS["zoneout"]))
    return Case(suite="variants", name=f"{variant}/{config_name}/{mode}/{dtype_name}",
                params=params, providers=providers, baseline=baseline, tokens=data.tokens,
                flops=lambda: rnn.flops(spec, data.tokens()), gold=gold, dtype=dtype,
                cleanup=lambda: (data.clear(), cache.clear()))


def variant_cases(options: Options):
    for config_name in QUICK_CONFIG_NAMES if options.size == "quick" else CONFIG_NAMES:
        for mode in rnn.MODES:
            for dtype in _dtypes(options):
                for variant in VARIANTS:
                    if variant == "ln-lstm-reg" and mode != "training":
                        continue   # the stochastic options act in training only
                    yield _case(options, variant, config_name, mode, dtype)


if __name__ != "__main__":   # as a script (the summary below) the package has registered it
    suite("variants")(variant_cases)


# ---- summary against the targets ----------------------------------------------------

TARGETS = {"cpu": "fastrnn LN-LSTM >= 5x the TorchScript loop",
           "cuda": "fastrnn LN-LSTM >= 10x the TorchScript loop and within 1.3x of cuDNN nn.LSTM"}


def _ms(record: Optional[dict]) -> str:
    if record is None:
        return "-"
    if record.get("status") != "ok":
        return record["status"]
    return f"{record['median_ms']:.4g} ({record['q1_ms']:.3g}-{record['q3_ms']:.3g})"


def summarize(records: List[dict], device: str = "cpu") -> str:
    """Markdown: per config, mode and dtype, each fastrnn LN provider against both loops and
    nn.LSTM (medians of the same run, different cases), with the regularised cost."""
    by = {}
    for r in records:
        if r.get("suite") == "variants":
            by[(r["variant"], r["config"], r["mode"], r["dtype"], r["provider"])] = r
    keys = sorted({k[1:4] for k in by}, key=lambda k: (k[2], k[1], CONFIG_NAMES.index(k[0])
                                                        if k[0] in CONFIG_NAMES else 99))
    fast = sorted({k[4] for k in by if k[0] == "ln-lstm" and k[4].startswith("fastrnn")})
    lines = [f"Target ({device}): {TARGETS.get(device.split(':')[0], '')}.", "",
             "Median ms (IQR) per call; ratios are median over median of the same run: "
             "`x loop` = loop time / fastrnn time (> 1 is faster), `/ nn.LSTM` = fastrnn "
             "LN-LSTM time / plain nn.LSTM time (1.3 is the GPU target), `LN cost` = fastrnn "
             "LN-LSTM / the same backend without options, `reg cost` = fastrnn with layer norm, "
             "recurrent dropout and zoneout / fastrnn with layer norm only.", "",
             "| config | mode | dtype | provider | LN-LSTM ms | x ts-ln-loop | x naive loop "
             "| / nn.LSTM | LN cost | reg cost |", "|" + "---|" * 10]

    def ok(r):
        return r is not None and r.get("status") == "ok"

    def ratio(a, b):
        return f"{a['median_ms'] / b['median_ms']:.2f}" if ok(a) and ok(b) else "-"

    for config, mode, dtype in keys:
        get = lambda variant, provider: by.get((variant, config, mode, dtype, provider))
        loop, naive = get("ln-lstm", "ts-ln-loop"), get("ln-lstm", "ts-ln-loop-naive")
        nn_lstm = get("plain-lstm", "torch.nn")
        rows = [("ts-ln-loop", loop), ("ts-ln-loop-naive", naive),
                ("nn.LSTM (no LN)", nn_lstm)] + [(p, get("ln-lstm", p)) for p in fast]
        for name, r in rows:
            is_fast = name.startswith("fastrnn")
            cells = [config, mode, dtype, name, _ms(r),
                     ratio(loop, r) if name != "nn.LSTM (no LN)" else "-",
                     ratio(naive, r) if name != "nn.LSTM (no LN)" else "-",
                     ratio(r, nn_lstm) if name != "nn.LSTM (no LN)" else "1",
                     ratio(r, get("plain-lstm", name)) if is_fast else "-",
                     ratio(get("ln-lstm-reg", name), r) if is_fast and mode == "training"
                     else "-"]
            if is_fast and not ok(r) and r is not None:
                cells[4] = f"{r['status']}: {r.get('reason', '')[:80]}"
            lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    reg_loop = [(k[1], by[k]) for k in by if k[0] == "ln-lstm-reg" and k[4] == "ts-ln-loop"]
    if reg_loop:
        lines += ["", "Regularised case (layer norm + recurrent dropout "
                  f"{REGULARISERS['recurrent_dropout']} + zoneout {REGULARISERS['zoneout']}, "
                  "training), median ms (IQR) and x loop:", "",
                  "| config | provider | ms | x ts-ln-loop (same regularisers) |", "|---|---|---|---|"]
        for config, loop in sorted(reg_loop, key=lambda x: CONFIG_NAMES.index(x[0])
                                   if x[0] in CONFIG_NAMES else 99):
            for k, r in sorted(by.items()):
                if k[0] == "ln-lstm-reg" and k[1] == config and k[3] == loop["dtype"]:
                    lines.append(f"| {config} | {k[4]} | {_ms(r)} | {ratio(loop, r)} |")
    return "\n".join(lines) + "\n"


# ---- interleaved timing (a machine shared with other jobs) -------------------------------

def interleaved(config_name: str, mode: str, rounds: int, device="cpu", seed: int = 0) -> dict:
    """Time the ln-lstm providers and plain nn.LSTM of one config round robin (each round
    calls every provider once), so that changes in machine load hit them all alike; each
    provider is checked against the loop first, as in the suite. -> {provider: [ms, ...]}"""
    import time
    from ..check import judge
    from ..timing import _sync
    options = Options(size="quick", device=torch.device(device), seed=seed)
    ln = _case(options, "ln-lstm", config_name, mode, torch.float32)
    plain = _case(options, "plain-lstm", config_name, mode, torch.float32)
    calls = {"ts-ln-loop": ln.providers["ts-ln-loop"]()}
    expected = calls["ts-ln-loop"]()
    for name, factory in ln.providers.items():
        if name in calls:
            continue
        try:
            call = factory()
        except Skip:
            continue
        verdict = judge(call(), expected, torch.float32, ln.gold)
        if not verdict.ok:
            raise AssertionError(f"{name}: {verdict.message}")
        calls[name] = call
    calls["nn.LSTM (no LN)"] = plain.providers["torch.nn"]()
    for call in calls.values():   # one more warm-up each
        call()
    times = {name: [] for name in calls}
    for _ in range(rounds):
        for name, call in calls.items():
            _sync(options.device)
            start = time.perf_counter()
            call()
            _sync(options.device)
            times[name].append((time.perf_counter() - start) * 1e3)
    return times


def interleaved_table(runs: List[Tuple[str, str, dict]]) -> str:
    """Markdown of interleaved() results: median (IQR) and the same ratios as summarize()."""
    import statistics
    lines = ["| config | mode | provider | ms median (IQR) | x ts-ln-loop | x naive loop | / nn.LSTM |",
             "|---|---|---|---|---|---|---|"]
    for config, mode, times in runs:
        med = {k: statistics.median(v) for k, v in times.items()}
        for name, ts in times.items():
            q = statistics.quantiles(ts, n=4, method="inclusive")
            lines.append(f"| {config} | {mode} | {name} | {med[name]:.4g} ({q[0]:.3g}-{q[2]:.3g}) "
                         f"| {med['ts-ln-loop'] / med[name]:.2f} "
                         f"| {med['ts-ln-loop-naive'] / med[name]:.2f} "
                         f"| {med[name] / med['nn.LSTM (no LN)']:.2f} |")
    return "\n".join(lines) + "\n"


USAGE = """usage:
  python -m bench.suites.variants RESULT.json
      print the Markdown summary of a saved run against the targets (TARGETS)
  python -m bench.suites.variants --interleave OUT.json [--threads N] [--rounds R] [--device D]
                                  [CONFIG/MODE ...]   (default: every config and mode)
      round-robin timing of the layer norm providers and nn.LSTM; writes OUT.json, prints
      the Markdown table"""


def main(argv=None) -> int:
    import json
    argv = sys.argv[1:] if argv is None else list(argv)
    if len(argv) == 1 and not argv[0].startswith("-"):
        with open(argv[0]) as f:
            data = json.load(f)
        print(summarize(data["results"], data["meta"].get("device", "cpu")), end="")
        return 0
    if len(argv) < 2 or argv[0] != "--interleave":
        print(USAGE, file=sys.stderr)
        return 2
    out, rest = argv[1], argv[2:]
    settings = {"--threads": None, "--rounds": "7", "--device": "cpu"}
    picks = []
    while rest:
        if rest[0] in settings and len(rest) > 1:
            settings[rest[0]], rest = rest[1], rest[2:]
        else:
            picks.append(rest.pop(0))
    if settings["--threads"]:
        torch.set_num_threads(int(settings["--threads"]))
    picks = picks or [f"{c}/{m}" for c in CONFIG_NAMES for m in rnn.MODES]
    runs = []
    for pick in picks:
        config, mode = pick.split("/")
        runs.append((config, mode, interleaved(config, mode, int(settings["--rounds"]),
                                               settings["--device"])))
    from ..report import metadata
    meta = metadata(torch.device(settings["--device"]), "interleaved", {})
    with open(out, "w") as f:
        json.dump({"meta": meta, "rounds": int(settings["--rounds"]),
                   "runs": [dict(config=c, mode=m, ms=t) for c, m, t in runs]}, f, indent=1)
    print(interleaved_table(runs), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
