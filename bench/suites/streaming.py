"""Streaming inference: a model fed a chunk of frames per call at batch 1 (or a few streams),
carrying its state from call to call, without gradient, as speech recognition, keyword
spotting, text-to-speech and online time series run it. What counts is the time per frame.

A case is (cell, hidden, batch, chunk): one timed call processes ``chunk`` frames (input
size = hidden) from the state the previous call left. Providers:

- ``torch.nn``: ``nn.LSTM`` / ``nn.GRU`` (oneDNN/ATen on CPU), the baseline;
- ``torch.nn#2``: a second ``nn.LSTM`` / ``nn.GRU`` with the same weights, the control
  (bench/README.md);
- ``torch.nn cell loop``: ``nn.LSTMCell`` / ``nn.GRUCell`` called once per frame;
- ``onnxruntime``: the torch.nn module exported to ONNX (its LSTM/GRU operator) run by
  ONNX Runtime with as many intra-op threads as torch has, state fed in and out;
- ``fastrnn:native``, ``fastrnn:auto``: fastrnn's module with that backend;
- ``fastrnn int8``, ``fastrnn bf16``: ``fastrnn.quantize_weights`` of the torch.nn module
  (int8 weights with per-row scales, or bfloat16 weights; float32 activations);
- ``torch dynamic int8``: ``torch.ao.quantization.quantize_dynamic`` of the torch.nn module
  (int8 weights with one scale per tensor, activations quantized per call);
- ``memory floor``: not a model. It reads the weight bytes one call needs from memory
  (``w_ih`` once per call, ``w_hh`` once per frame) as one sum over a buffer of each size:
  the time below which no implementation that reads the weights per frame can go. It hands
  back torch.nn's result computed once beforehand, so the check has something to compare.

Every provider's first call (from a zero state) is checked against torch.nn's; the
reduced-precision ones differ from it by design, so their largest error against it is
recorded instead (the Markdown's error table). The table of
``python -m bench --suite streaming`` gives the time per call; its Markdown adds the time per
frame (per call / chunk) by chunk size, and a plot of it.
"""
from __future__ import annotations

import copy
import io
import warnings

import torch
from torch import nn

import fastrnn

from ..core import CONTROL, Case, Options, Skip, suite

CELLS = {"lstm": (nn.LSTM, nn.LSTMCell, "LSTM", 4), "gru": (nn.GRU, nn.GRUCell, "GRU", 3)}
CHUNKS = (1, 4, 16, 100)
APPROXIMATE = ("fastrnn int8", "fastrnn bf16", "torch dynamic int8")
SIZES = {"tiny": dict(hidden=(16,), batch=(1, 3), chunks=(1, 4)),
         "quick": dict(hidden=(512,), batch=(1,), chunks=CHUNKS),
         "full": dict(hidden=(256, 512, 1024), batch=(1, 4), chunks=CHUNKS)}


class Stream:
    """One case's weights and input, shared by its providers."""

    def __init__(self, cell: str, hidden: int, batch: int, chunk: int, device, seed: int):
        self.cell, self.hidden, self.batch, self.chunk = cell, hidden, batch, chunk
        self.device = device
        torch.manual_seed(seed)
        self.module = CELLS[cell][0](hidden, hidden).to(device)
        self.x = torch.randn(chunk, batch, hidden, device=device)

    def state_names(self):
        return ("h_n", "c_n") if self.cell == "lstm" else ("h_n",)

    def result(self, output, state):
        state = state if isinstance(state, tuple) else (state,)
        return {"output": output, **{n: s.reshape(self.batch, -1) for n, s in
                                     zip(self.state_names(), state)}}

    def module_call(self, module):
        """A call of a torch.nn-like module: one chunk, the state carried between calls."""
        carried = [None]

        def call():
            with torch.no_grad():
                output, carried[0] = module(self.x, carried[0])
            return self.result(output, carried[0])
        return call

    def torch_nn(self):
        """The case's torch.nn module, its weights in tensors of this build's own: the
        baseline and the control are two builds (the runner rebuilds them to time them at
        other places in memory)."""
        return self.module_call(copy.deepcopy(self.module))

    def fastrnn(self, backend: str):
        def factory():
            module = getattr(fastrnn, CELLS[self.cell][2])(self.hidden, self.hidden,
                                                          backend=backend).to(self.device)
            module.load_state_dict(self.module.state_dict())
            if backend != "auto":
                reason = fastrnn.backends.get(backend).unavailable_reason(self.device)
                if reason:
                    raise Skip(reason)
            return self.module_call(module)
        return factory

    def quantized(self, dtype: torch.dtype):
        """fastrnn.quantize_weights of the torch.nn module, weights in ``dtype``."""
        if self.device.type != "cpu":
            raise Skip("the quantized kernels run on CPU")
        reason = fastrnn.backends.get("native").unavailable_reason(self.device)
        if reason:
            raise Skip(reason)
        return self.module_call(fastrnn.quantize_weights(self.module, dtype))

    def torch_dynamic_int8(self):
        if self.device.type != "cpu":
            raise Skip("measured on CPU only")
        with warnings.catch_warnings():   # torch.ao.quantization is deprecated, still shipped
            warnings.simplefilter("ignore")
            holder = torch.ao.quantization.quantize_dynamic(
                nn.Sequential(self.module), {type(self.module)}, dtype=torch.qint8)
        return self.module_call(holder[0])

    def cell_loop(self):
        cell = CELLS[self.cell][1](self.hidden, self.hidden).to(self.device)
        # Copies, not the baseline's tensors: a provider reading the baseline's weights right
        # after it in every round keeps them warmer in the cache than anyone else's, which
        # made torch.nn ~6% faster than a second nn.GRU with the same weights at 16 frames.
        for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
            getattr(cell, name).data = getattr(self.module, f"{name}_l0").detach().clone()
        carried = [None]

        def call():
            state, outputs = carried[0], []
            with torch.no_grad():
                for frame in self.x:
                    state = cell(frame, state)
                    outputs.append(state[0] if isinstance(state, tuple) else state)
            carried[0] = state
            return self.result(torch.stack(outputs), state)
        return call

    def onnxruntime(self):
        try:
            import onnxruntime
        except ImportError:
            raise Skip("onnxruntime is not installed") from None
        if self.device.type != "cpu":
            raise Skip("measured on CPU only")
        names = self.state_names()
        zeros = tuple(torch.zeros(1, self.batch, self.hidden) for _ in names)
        state_in = zeros if self.cell == "lstm" else zeros[0]
        buffer = io.BytesIO()
        torch.onnx.export(self.module, (self.x, state_in), buffer, dynamo=False,
                          input_names=["x", *[n[0] + "0" for n in names]],
                          output_names=["output", *names])
        settings = onnxruntime.SessionOptions()
        settings.intra_op_num_threads = torch.get_num_threads()
        settings.inter_op_num_threads = 1
        # ORT's pool threads spin after each call by default and keep a core busy for the
        # provider that runs next in an interleaved round (torch's two threads then share
        # one core): measured, that halved the next provider's speed. They sleep instead.
        settings.add_session_config_entry("session.intra_op.allow_spinning", "0")
        session = onnxruntime.InferenceSession(buffer.getvalue(), settings,
                                               providers=["CPUExecutionProvider"])
        feeds = {"x": self.x.numpy(), **{n[0] + "0": z.numpy() for n, z in zip(names, zeros)}}

        def call():
            output, *state = session.run(None, feeds)
            for n, s in zip(names, state):
                feeds[n[0] + "0"] = s
            return self.result(torch.from_numpy(output), tuple(torch.from_numpy(s) for s in state))
        return call

    def memory_floor(self):
        gates, hidden = CELLS[self.cell][3], self.hidden
        w_ih = torch.randn(gates * hidden * hidden, device=self.device)
        w_hh = torch.randn(gates * hidden * hidden, device=self.device)
        with torch.no_grad():
            result = self.result(*self.module(self.x))

        def call():
            w_ih.sum()
            for _ in range(self.chunk):
                w_hh.sum()
            return result
        return call


def streaming_cases(options: Options):
    sizes = SIZES[options.size]
    for cell in CELLS:
        for hidden in sizes["hidden"]:
            for batch in sizes["batch"]:
                for chunk in sizes["chunks"]:
                    yield _case(cell, hidden, batch, chunk, options)


# `python -m bench.suites.streaming` runs this file a second time, as __main__: the package's
# import has registered the suite already.
if __name__ != "__main__":
    suite("streaming")(streaming_cases)


def _case(cell, hidden, batch, chunk, options) -> Case:
    made = {}

    def stream() -> Stream:   # built when the case runs, freed after (cleanup)
        if "stream" not in made:
            made["stream"] = Stream(cell, hidden, batch, chunk, options.device, options.seed)
        return made["stream"]

    providers = {
        "torch.nn": lambda: stream().torch_nn(),
        CONTROL: lambda: stream().torch_nn(),
        "torch.nn cell loop": lambda: stream().cell_loop(),
        "onnxruntime": lambda: stream().onnxruntime(),
        "fastrnn:native": lambda: stream().fastrnn("native")(),
        "fastrnn:auto": lambda: stream().fastrnn("auto")(),
        "memory floor": lambda: stream().memory_floor(),
        "fastrnn int8": lambda: stream().quantized(torch.int8),
        "fastrnn bf16": lambda: stream().quantized(torch.bfloat16),
        "torch dynamic int8": lambda: stream().torch_dynamic_int8(),
    }
    gates = CELLS[cell][3]
    config = f"h{hidden}-b{batch}"
    return Case(suite="streaming", name=f"streaming/{cell}/{config}/chunk{chunk}/float32",
                params=dict(cell=cell, config=config, mode="inference", dtype="float32",
                            hidden=hidden, input=hidden, batch=batch, chunk=chunk),
                providers=providers, baseline="torch.nn", tokens=chunk * batch,
                flops=2 * chunk * batch * gates * hidden * 2 * hidden,
                cleanup=made.clear, approximate=APPROXIMATE)


# ---- interleaved timing (a machine shared with other jobs) -------------------------------

def interleaved(case: Case, rounds: int, calls_per_round: int) -> list:
    """Records of ``case`` (as bench.runner makes them) with every provider timed round robin:
    each round calls each provider ``calls_per_round`` times, so load changes hit them alike.
    Each provider is checked against torch.nn first, as in the suite."""
    import statistics
    import time
    from ..check import check_provider
    calls, records, expected = {}, {}, None
    for name, factory in case.providers.items():
        record = records[name] = {"suite": case.suite, "case": case.name, "provider": name,
                                  "baseline": case.baseline, **case.params, "status": "ok",
                                  "reason": ""}
        try:
            call = factory()
            result = call()
        except Skip as exc:
            record.update(status="skipped", reason=str(exc))
            continue
        if expected is None:
            expected = result
        else:
            record["check"], wrong = check_provider(case, name, result, expected)
            if wrong:
                record.update(status="wrong", reason=wrong)
                continue
        calls[name] = call
    times = {name: [] for name in calls}
    for _ in range(rounds):
        for name, call in calls.items():
            start = time.perf_counter()
            for _ in range(calls_per_round):
                call()
            times[name].append((time.perf_counter() - start) * 1e3 / calls_per_round)
    base = statistics.median(times[case.baseline]) if case.baseline in times else None
    for name, ms in times.items():
        q1, median, q3 = statistics.quantiles(ms, n=4, method="inclusive") if len(ms) > 1 \
            else ms * 3
        records[name].update(median_ms=median, q1_ms=q1, q3_ms=q3, min_ms=min(ms),
                             max_ms=max(ms), repeats=len(ms), peak_mem_bytes=None,
                             tokens=case.tokens, tokens_per_s=case.tokens / median * 1e3,
                             speedup=base / median if base else None)
    case.cleanup()
    return list(records.values())


USAGE = """usage:
  python -m bench.suites.streaming [--full | --tiny] [--threads N] [--rounds R] [--calls C]
                                   [--cell lstm,gru] [--config h512-b1,...] [--out DIR]
      the streaming suite with its providers timed round robin (R rounds of C calls each,
      default 9 x 5): steadier on a shared machine than python -m bench --suite streaming.
      Writes streaming-interleaved-<device>-<date>[-tN].json/.md/-per-frame.png under DIR
      (default bench/results)."""


def main(argv=None) -> int:
    import argparse
    import datetime
    import os
    import sys
    from .. import report
    from ..cli import DEFAULT_OUT, _list
    parser = argparse.ArgumentParser(prog="python -m bench.suites.streaming", usage=USAGE)
    parser.add_argument("--full", dest="size", action="store_const", const="full",
                        default="quick")
    parser.add_argument("--tiny", dest="size", action="store_const", const="tiny")
    parser.add_argument("--threads", type=int)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--calls", type=int, default=5)
    parser.add_argument("--cell")
    parser.add_argument("--config")
    parser.add_argument("--out", default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    options = Options(size=args.size, cells=_list(args.cell), configs=_list(args.config))
    started = datetime.datetime.now()
    records = []
    for case in streaming_cases(options):
        if options.keeps("cells", case.params["cell"]) and \
                options.keeps("configs", case.params["config"]):
            records += interleaved(case, args.rounds, args.calls)
            print(case.name, file=sys.stderr)
    meta = report.metadata(options.device, f"{args.size}, interleaved {args.rounds} rounds x "
                           f"{args.calls} calls", {})
    meta["seconds"] = round((datetime.datetime.now() - started).total_seconds(), 1)
    meta["load_average"] = os.getloadavg()
    stem = f"streaming-interleaved-{report.device_slug(options.device)}-{started.date()}"
    stem += "" if args.size == "quick" else f"-{args.size}"
    stem += f"-t{args.threads}" if args.threads else ""
    print(report.text_table(records))
    for path in report.write_all(records, meta, args.out, stem):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
