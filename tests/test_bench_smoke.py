"""The benchmark suite itself works: it runs at toy sizes, writes its table, JSON, Markdown
and plots, and reports a provider with wrong results as wrong instead of timing it."""
import fcntl
import glob
import json
import os
import pty
import runpy
import struct
import subprocess
import sys
import termios

import pytest
import torch
from torch import nn

# bench/ is not an installed package: it runs from the repository root.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench import cli  # noqa: E402
from bench.check import judge  # noqa: E402
from bench.core import Skip  # noqa: E402
from bench.suites import rnn  # noqa: E402


class Perturbed(nn.Module):
    """torch.nn's LSTM/GRU with its output off by 0.1% (a subtly broken kernel)."""

    def __init__(self, spec):
        super().__init__()
        self.inner = rnn.torch_nn_module(spec)

    def forward(self, x, hx=None):
        out, state = self.inner(x, hx)
        return out * 1.001, state

    def state_dict(self, *args, **kwargs):
        return self.inner.state_dict(*args, **kwargs)

    def load_state_dict(self, state, strict=True):
        return self.inner.load_state_dict(state, strict)

    def named_parameters(self, *args, **kwargs):
        return self.inner.named_parameters(*args, **kwargs)


def cannot_run(spec):
    raise Skip("needs a flux capacitor")


@pytest.fixture
def injected():
    rnn.register_provider("wrong-by-0.1%", Perturbed)
    rnn.register_provider("unrunnable", cannot_run)
    yield
    rnn.unregister_provider("wrong-by-0.1%")
    rnn.unregister_provider("unrunnable")


def test_tiny_run_writes_everything_and_flags_wrong_provider(tmp_path, capsys, injected):
    code = cli.main(["--tiny", "--device", "cpu", "--suite", "rnn", "--cell", "lstm",
                     "--config", "fastrnns,batch1,hidden256",
                     "--provider", "ts-loop,fastrnn*,torch.nn#2,wrong-by-0.1%,unrunnable",
                     "--out", str(tmp_path), "--no-progress"])
    assert code == 0
    stdout = capsys.readouterr().out

    [json_path] = glob.glob(str(tmp_path / "*.json"))
    data = json.load(open(json_path))
    meta = data["meta"]
    assert meta["device"] == "cpu" and meta["torch"] == torch.__version__
    for key in ("device_name", "triton", "git_commit", "date", "gemm_ceiling_gflops"):
        assert key in meta
    assert meta["gemm_ceiling_gflops"]["float32"] > 0

    records = data["results"]
    by_provider = {}
    for r in records:
        by_provider.setdefault(r["provider"], []).append(r)
    # 3 configs x 2 modes, every provider reported for every case
    cases = {r["case"] for r in records}
    assert len(cases) == 6
    for name in ("torch.nn", "ts-loop", "wrong-by-0.1%", "unrunnable"):
        assert len(by_provider[name]) == 6, name

    for r in by_provider["torch.nn"] + by_provider["ts-loop"]:
        assert r["status"] == "ok", r
        assert r["median_ms"] > 0 and r["min_ms"] <= r["median_ms"] <= r["max_ms"]
        assert r["tokens_per_s"] > 0 and r["gflops"] > 0 and r["gemm_fraction"] > 0
        assert r["speedup"] > 0
    for r in by_provider["torch.nn"]:
        assert r["speedup"] == 1.0
    # what a user gets by default, in every case, with its ratio to torch.nn
    assert len(by_provider["fastrnn:auto"]) == 6
    for r in by_provider["fastrnn:auto"]:
        assert r["status"] == "ok" and r["speedup"] > 0, r
    # the control: a second torch.nn module, its ratio the run's noise for the same compute
    control = {r["case"]: r["speedup"] for r in by_provider["torch.nn#2"]}
    assert len(control) == 6 and all(v > 0 for v in control.values())
    for r in by_provider["ts-loop"]:
        assert r["check"]["error"] <= r["check"]["tolerance"] < 1e-5

    for r in by_provider["wrong-by-0.1%"]:
        assert r["status"] == "wrong", r
        assert "median_ms" not in r and "speedup" not in r   # never timed
        assert r["check"]["error"] > max(1e-4, r["check"]["tolerance"])
    for r in by_provider["unrunnable"]:
        assert r["status"] == "skipped" and "flux capacitor" in r["reason"]

    # the table on stdout: header, one line per record, wrong and skipped visible
    assert "vs baseline" in stdout and "GFLOP/s" in stdout
    assert stdout.count("WRONG") == 6
    assert "skipped: needs a flux capacitor" in stdout

    stem = os.path.splitext(json_path)[0]
    markdown = open(stem + ".md").read()
    assert "| case | provider |" in markdown and "WRONG" in markdown
    assert "## `fastrnn:auto` vs torch.nn" in markdown
    for r in by_provider["fastrnn:auto"]:
        assert f"| {r['case']} | {r['speedup']:.2f} | {control[r['case']]:.2f} |" in markdown
    for plot in ("batch", "hidden"):
        path = f"{stem}-speedup-vs-{plot}.png"
        assert open(path, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
        assert os.path.basename(path) in markdown


def test_interleaved_timing_settles_before_its_timed_rounds():
    """The settle rounds run every workload as the timed rounds do, untimed: a workload slow
    on its first calls (memory faulted in again, a graph optimised) is timed only after them.
    Every round calls each live workload once, in an order that changes between rounds."""
    import time
    from bench.timing import Budget, time_interleaved
    calls = []

    def workload(i):
        def call():
            if calls.count(i) < 2:
                time.sleep(0.05)
            calls.append(i)
            if i == 2 and len(calls) > 3:
                raise RuntimeError("broke in the second settle round")
        return call

    budget = Budget(warmup=0, settle=2, min_repeats=3, max_repeats=3, seconds=0.0)
    times, failed = time_interleaved([workload(i) for i in range(3)], torch.device("cpu"),
                                     budget)
    assert list(failed) == [2] and "second settle round" in str(failed[2])
    rounds = [calls[0:3], calls[3:6], calls[6:8], calls[8:10], calls[10:12]]
    assert len(calls) == 12
    assert [sorted(r) for r in rounds] == [[0, 1, 2]] * 2 + [[0, 1]] * 3
    assert [len(t) for t in times] == [3, 3, 0]
    assert max(times[0] + times[1]) < 25   # the slow first calls were the untimed ones

    calls.clear()   # over many rounds each workload follows every other one
    budget = Budget(warmup=0, min_repeats=30, max_repeats=30, seconds=0.0)
    time_interleaved([lambda i=i: calls.append(i) for i in range(3)], torch.device("cpu"),
                     budget)
    follows = {(a, b) for r in range(30) for a, b in zip(calls[3 * r:3 * r + 2],
                                                          calls[3 * r + 1:3 * r + 3])}
    assert follows == {(a, b) for a in range(3) for b in range(3) if a != b}


def test_focus_providers_are_rebuilt_and_run_on_until_their_ratio_is_known(monkeypatch):
    """After the rounds of every provider, the baseline and the focus providers alone are
    built afresh ``placements`` times, each build for at least a few rounds (after one
    untimed round), until the 95% interval of each focus ratio is within +-precision or until
    the focus time cap: their lists grow together (round i is still one round)."""
    import random
    from bench import runner, timing
    from bench.core import Case
    noise = random.Random(5)
    calls, builds = [], []

    def fake_time_call(fn, device):
        calls.append(fn())
        return 10.0 * (1 + noise.gauss(0, 0.05))   # ms: one round's ratio scatters by ~7%

    def factory(name):
        def build():
            builds.append(name)
            return lambda: name
        return build

    monkeypatch.setattr(timing, "time_call", fake_time_call)
    case = Case(suite="s", name="c", params={}, baseline="base", tokens=1,
                providers={n: factory(n) for n in ("base", "other", "auto")})
    budget = timing.Budget(warmup=0, min_repeats=7, max_repeats=7, seconds=0.0,
                           precision=0.02, placements=3, focus_cap_seconds=1e9)
    times = [[fake_time_call(lambda: 0, None) for _ in range(7)] for _ in range(2)]
    calls.clear()
    runner.pin_ratios(case, ["base", "auto"], times, torch.device("cpu"), budget)
    assert builds == ["base", "auto"] * 3 and set(calls) == {"base", "auto"}
    assert len(times[0]) == len(times[1]) and len(calls) == 2 * (len(times[0]) - 7) + 2 * 3
    assert timing.ratio_precision(times[0], times[1]) <= 0.02
    low, high = timing.ratio_interval(times[0], times[1])
    assert low < timing.paired_ratio(times[0], times[1]) < high
    stop_at_5 = timing.Budget(warmup=0, min_repeats=2, max_repeats=100, seconds=1e9)
    quick, _ = timing.time_interleaved([lambda: 0] * 2, torch.device("cpu"), stop_at_5,
                                       enough=lambda t: len(t[0]) >= 5)
    assert [len(t) for t in quick] == [5, 5]   # a block stops as soon as it is enough

    builds.clear()   # the cap, split over the builds: 0.1 s each -> about 10 rounds of 20 ms
    budget.focus_cap_seconds, budget.precision = 0.3, 1e-9
    times = [[10.0] * 7, [10.0] * 7]
    runner.pin_ratios(case, ["base", "auto"], times, torch.device("cpu"), budget)
    assert builds == ["base", "auto"] * 3
    assert len(times[0]) == len(times[1]) and 7 + 3 * 9 <= len(times[0]) <= 7 + 3 * 12
    assert timing.ratio_interval([1.0] * 5, [1.0] * 5) is None   # too few rounds to tell


def test_run_case_sums_up_times_over_the_rounds_every_provider_ran(monkeypatch):
    """The focus providers' extra rounds count in their ratio to the baseline (ratio_rounds)
    but not in the times of the table, which compare providers over the same rounds."""
    from bench import runner
    from bench.core import Case, Options
    from bench.timing import Budget
    out = {"out": torch.zeros(3)}
    case = Case(suite="s", name="c", params={}, baseline="torch.nn", tokens=1,
                providers={n: (lambda: lambda: out)
                           for n in ("torch.nn", "other", "fastrnn:auto", "torch.nn#2")})
    monkeypatch.setitem(runner.BUDGETS, ("cpu", "tiny"),
                        Budget(warmup=0, min_repeats=7, max_repeats=7, seconds=0.0,
                               precision=1e-9, placements=2, focus_cap_seconds=0.01))
    records = {r["provider"]: r for r in runner.run_case(case, Options(size="tiny"), {})}
    assert all(r["status"] == "ok" and r["repeats"] == 7 for r in records.values())
    assert len(records["other"]["times_ms"]) == records["other"]["ratio_rounds"] == 7
    for name in ("torch.nn", "fastrnn:auto", "torch.nn#2"):
        assert len(records[name]["times_ms"]) == records[name]["ratio_rounds"] > 7


def test_check_rules():
    """bench.check is fastrnn.testing's rule: a few ulps of the baseline without a gold result,
    else within 2x the baseline's own error against the float64 gold."""
    base = {"output": torch.tensor([1.0, -2.0, 4.0]), "grad": torch.tensor([1e-3, 2e-3])}
    same = {k: v.clone() for k, v in base.items()}
    assert judge(same, base, torch.float32, None).ok
    # errors are relative to max(1, max |expected|): 1e-5 off on small gradients is 1e-5
    off = {"output": base["output"].clone(), "grad": base["grad"] + 1e-5}
    verdict = judge(off, base, torch.float32, None)
    assert not verdict.ok and verdict.worst == "grad" and "no higher-precision" in verdict.message
    # against a gold result: within 2x the baseline's own error (plus a few ulps) is right
    gold = {"output": base["output"].double() + 1e-4, "grad": base["grad"].double()}
    assert judge(off, base, torch.float32, lambda: gold).ok is False
    close = {"output": base["output"] + 1.5e-4, "grad": base["grad"]}
    verdict = judge(close, base, torch.float32, lambda: gold)
    assert verdict.ok and verdict.against == "gold"
    far = {"output": base["output"] + 4e-4, "grad": base["grad"]}
    assert not judge(far, base, torch.float32, lambda: gold).ok
    # float64: 1e-10 of the baseline
    base64 = {k: v.double() for k, v in base.items()}
    assert judge({k: v + 1e-11 for k, v in base64.items()}, base64, torch.float64, None).ok
    assert not judge({k: v + 1e-8 for k, v in base64.items()}, base64, torch.float64, None).ok
    # missing tensors, other dtypes or non-finite values are wrong
    assert not judge({"output": base["output"]}, base, torch.float32, None).ok
    assert not judge(base64, base, torch.float32, None).ok
    nan = {"output": torch.tensor([1.0, float("nan"), 4.0]), "grad": base["grad"]}
    assert not judge(nan, base, torch.float32, lambda: gold).ok


def test_python_dash_m_bench_lists_cases(capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["bench", "--tiny", "--device", "cpu", "--list",
                                      "--suite", "rnn", "--cell", "gru", "--config", "packed"])
    with pytest.raises(SystemExit) as exit_:
        runpy.run_module("bench", run_name="__main__")
    assert exit_.value.code == 0
    lines = capsys.readouterr().out.splitlines()
    assert [l.split()[0] for l in lines] == ["gru/packed/inference/float32",
                                             "gru/packed/training/float32"]
    assert all(l.split()[1] == "torch.nn" for l in lines)


BENCH_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_RUN = ["-m", "bench", "--tiny", "--device", "cpu", "--suite", "rnn", "--cell", "gru",
            "--config", "fastrnns", "--mode", "inference", "--provider", "fastrnn:reference",
            "--no-plots"]


def test_progress_bar_only_on_a_terminal(tmp_path):
    """Output to a pipe or log file gets the table and summary lines, not tqdm's
    carriage-return updates; a terminal still gets the progress bar."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([BENCH_ROOT] + sys.path))
    command = [sys.executable] + TINY_RUN + ["--out", str(tmp_path)]
    # bytes, not text: text mode would turn the carriage returns into newlines
    piped = subprocess.run(command, cwd=BENCH_ROOT, env=env, capture_output=True, timeout=300)
    assert piped.returncode == 0, piped.stderr[-2000:]
    assert b"\r" not in piped.stdout + piped.stderr
    assert b"run/s" not in piped.stderr
    assert b"gru/fastrnns/inference/float32" in piped.stdout
    assert b"results in" in piped.stdout

    pytest.importorskip("tqdm")
    master, slave = pty.openpty()  # stderr on a terminal, stdout still a pipe
    # a width, as a real terminal has (tqdm draws nothing in 0 columns)
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    try:
        on_tty = subprocess.run(command, cwd=BENCH_ROOT, env=env, stdout=subprocess.PIPE,
                                stderr=slave, timeout=300)
    finally:
        os.close(slave)
    terminal = b""
    while True:
        try:
            chunk = os.read(master, 4096)
        except OSError:  # EIO: the terminal's other end is closed and drained
            break
        if not chunk:
            break
        terminal += chunk
    os.close(master)
    assert on_tty.returncode == 0, terminal.decode(errors="replace")[-2000:]
    assert b"run/s" in terminal and b"2/2" in terminal
    assert b"\r" not in on_tty.stdout and b"results in" in on_tty.stdout


# ---- the LayerNorm LSTM suite (bench/suites/variants.py) ------------------------------

def test_variants_suite_checks_every_provider_and_summarises(tmp_path, capsys):
    from bench.suites import variants
    code = cli.main(["--tiny", "--device", "cpu", "--suite", "variants", "--config", "batch1",
                     "--out", str(tmp_path), "--no-progress", "--no-plots"])
    assert code == 0
    capsys.readouterr()
    [json_path] = glob.glob(str(tmp_path / "*.json"))
    records = json.load(open(json_path))["results"]
    # layer norm, plain and regularised cases; inference and training (regularised: training)
    assert sorted({r["case"] for r in records}) == [
        "ln-lstm-reg/batch1/training/float32", "ln-lstm/batch1/inference/float32",
        "ln-lstm/batch1/training/float32", "plain-lstm/batch1/inference/float32",
        "plain-lstm/batch1/training/float32"]
    loops = [r for r in records if r["provider"].startswith("ts-ln-loop")]
    assert len(loops) == 5 and all(r["status"] == "ok" for r in loops), loops
    assert all(r["speedup"] == 1.0 for r in loops if r["provider"] == r["baseline"])
    for r in records:
        assert r["status"] in ("ok", "skipped"), r   # never wrong, never an error
        if r["status"] == "ok" and r["provider"] != r["baseline"]:
            assert r["check"]["error"] <= r["check"]["tolerance"], r
    # the summary puts fastrnn against both loops and plain nn.LSTM
    summary = variants.summarize(records)
    assert "| batch1 | training | float32 | ts-ln-loop-naive |" in summary
    assert "nn.LSTM (no LN)" in summary and ">= 5x" in summary


# ---- the streaming suite (bench/suites/streaming.py) ---------------------------------

def test_streaming_suite_times_per_frame_and_writes_its_files(tmp_path, capsys):
    """Every provider of every case runs and passes the check (the state carried between
    calls), the files are named after the suite, and the Markdown and plot give the time per
    frame by chunk size."""
    pytest.importorskip("onnxruntime")
    code = cli.main(["--tiny", "--device", "cpu", "--suite", "streaming", "--cell", "lstm",
                     "--out", str(tmp_path), "--no-progress"])
    assert code == 0
    capsys.readouterr()
    [json_path] = glob.glob(str(tmp_path / "streaming-*.json"))
    records = json.load(open(json_path))["results"]
    assert {(r["batch"], r["chunk"]) for r in records} == {(1, 1), (1, 4), (3, 1), (3, 4)}
    providers = {"torch.nn", "torch.nn#2", "torch.nn cell loop", "onnxruntime", "fastrnn:native",
                 "fastrnn:auto", "memory floor", "fastrnn int8", "fastrnn bf16",
                 "torch dynamic int8"}
    assert {r["provider"] for r in records} == providers
    for r in records:
        assert r["status"] == "ok", r
        assert r["tokens"] == r["batch"] * r["chunk"]
        if r["provider"] in ("fastrnn int8", "fastrnn bf16", "torch dynamic int8"):
            # an approximation of torch.nn's result, its error recorded
            assert 0 < r["check"]["max_abs_error"] < 0.1, r
    markdown = open(json_path[:-5] + ".md").read()
    assert "## Time per frame, median call" in markdown and "## Time per frame, fastest" \
        in markdown and "| lstm | 16 | 3 | memory floor |" in markdown
    assert "## Max error against the float32 baseline" in markdown and \
        "| lstm | 16 | 3 | fastrnn int8 |" in markdown
    assert glob.glob(str(tmp_path / "streaming-*-per-frame.png"))


def test_streaming_suite_catches_a_provider_that_drops_the_state():
    """A provider that forgets the state between calls is right on the first call only; the
    suite's carried state is what makes later calls differ, so the check of a second call
    must see it."""
    from bench.suites.streaming import Stream
    stream = Stream("gru", 8, 1, 2, torch.device("cpu"), seed=0)
    carried, forgetful = stream.torch_nn(), stream.module_call(lambda x, state: stream.module(x))
    first, second = carried(), carried()
    assert torch.equal(forgetful()["output"], first["output"])
    assert not torch.equal(forgetful()["output"], second["output"])


def test_layer_norm_loop_is_fastrnn_layer_norm_lstm_in_float64():
    """The TorchScript loop computes fastrnn.LSTM(layer_norm=True)'s contract (biases after
    the norms, the cell state carried before its norm), with the same recurrent dropout and
    zoneout masks from the same seed, forward and backward."""
    import fastrnn
    from bench.loops import LayerNormLoopLSTM
    torch.manual_seed(0)
    steps, batch, inputs, hidden = 6, 3, 5, 4
    for options in ({}, dict(recurrent_dropout=0.3, zoneout=(0.2, 0.4))):
        for hoist in (True, False):
            ours = fastrnn.LSTM(inputs, hidden, layer_norm=True, backend="reference",
                                dtype=torch.float64, **options)
            with torch.no_grad():   # gains and biases away from 1 and 0: a swap must show
                for name, p in ours.named_parameters():
                    p.add_(0.1 * torch.randn_like(p))
            loop = LayerNormLoopLSTM(inputs, hidden, hoist=hoist, dtype=torch.float64, **options)
            loop.load_state_dict(ours.state_dict())
            x = torch.randn(steps, batch, inputs, dtype=torch.float64, requires_grad=True)
            h0 = torch.randn(1, batch, hidden, dtype=torch.float64)
            results = []
            for module in (ours, loop):
                torch.manual_seed(1)
                out, (h_n, c_n) = module(x, (h0, 2 * h0))
                grads = torch.autograd.grad((out.sum() + h_n.pow(2).sum() + c_n.sum()),
                                            [x] + list(module.parameters()))
                named = dict(zip(["x"] + [n for n, _ in module.named_parameters()], grads))
                results.append({"out": out, "h_n": h_n, "c_n": c_n, **named})
            assert results[0].keys() == results[1].keys()
            for name, want in results[0].items():
                torch.testing.assert_close(results[1][name], want, rtol=1e-10, atol=1e-10,
                                           msg=f"{name} ({options}, hoist={hoist})")
