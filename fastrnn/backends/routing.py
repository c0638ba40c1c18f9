"""Where backend "auto" sends a call: torch.nn's own path or fastrnn's kernels.

The rule: under "auto" fastrnn is never slower than the torch.nn module it replaced (within
noise), and faster where its kernels win. A call that torch.nn cannot run (variant options)
always goes to fastrnn's kernels; so does a backend named explicitly (the decision:
fastrnn.backends.torch_path). For the rest, ROUTES
answers by (device type, mode, inference or training, shape class) with either

- ``"torch"``: torch.nn's own forward on the module's parameters (cuDNN, oneDNN/ATen), or
- ``"kernels"``: fastrnn's op, on the first capable backend of KERNEL_ORDER[device type].

CPU policy: torch.nn's path except where the native kernels won on every CPU measured. The
winner differs between CPUs (oneDNN's LSTM is 0.7x native's time on AMD Zen 4, level on the
Intel Xeon), so a kernel is routed only where it won on both; no per-machine timing, so the
choice is the same on every run and machine (docs/auto.md). The exception: GRU inference at
batch 1 and on streams, measured on the Intel Xeon only (AMD's GRU batch 1 inference won
before the matrix-vector loop; its streams were not measured). The ratios below are torch.nn
time / native time (above 1: native faster), from ``python -m bench`` on an Intel Xeon
(bench/results/cpu-2c-2026-11-29-*.md; 1 thread / 2 threads) and an AMD EPYC Zen 4 (2 threads).
"""
from __future__ import annotations

from typing import Dict, Tuple

TORCH = "torch"
KERNELS = "kernels"

# The fastrnn kernels a GPU run has verified (the tests on CUDA and bench/gpu_session.sh
# passed there), per backend: "plain" (no options) and "options". The kernels compile and
# their gate math is tested on CPU; an unverified one serves CUDA calls only when named, and
# the native CUDA kernels refuse options until "options" is verified (the reference runs).
GPU_VERIFIED: Dict[str, Tuple[str, ...]] = {"native": (), "triton": ()}

# fastrnn backends "auto" tries, in order, for a call routed to the kernels. Triton runs on
# CPU only under TRITON_INTERPRET=1, for tests, so it is never chosen there.
KERNEL_ORDER: Dict[str, Tuple[str, ...]] = {
    "cuda": tuple(b for b in ("native", "triton") if "plain" in GPU_VERIFIED[b]) + ("reference",),
    "cpu": ("native", "reference")}

MODES = ("LSTM", "GRU", "RNN")
SHAPES = ("batch1", "small", "large", "packed", "cell", "stream1", "stream_small")
DENSE = ("batch1", "small", "large", "stream1", "stream_small")
SMALL_BATCH = 16   # "small": batch 2..16 (measured at 16; batch 8 lies between 1 and 16)
# Streaming: a short chunk of frames per call (the state carried between calls), at batch 1
# ("stream1") or 2..STREAM_BATCH ("stream_small", the batches the native CPU kernels run as
# matrix-vector products). Measured at chunks of 1, 4 and 16 frames; 100 is "batch1".
STREAM_STEPS = 16
STREAM_BATCH = 8


def shape_class(batch: int, packed: bool, cell: bool = False, steps=None) -> str:
    """The shape class of a call: one step of a cell, a packed batch, a short chunk of a
    stream (``steps`` frames, when given), or a dense batch by its size. route() also takes
    "dense": a dense batch of any size and length (torch.nn's path only where every dense
    class says so)."""
    if cell:
        return "cell"
    if packed:
        return "packed"
    if steps is not None and steps <= STREAM_STEPS and batch <= STREAM_BATCH:
        return "stream1" if batch <= 1 else "stream_small"
    return "batch1" if batch <= 1 else "small" if batch <= SMALL_BATCH else "large"


def _table() -> Dict[Tuple[str, str, bool, str], str]:
    routes = {}
    for device in ("cpu", "cuda"):
        for mode in MODES:
            for inference in (True, False):
                for shape in SHAPES:
                    routes[device, mode, inference, shape] = TORCH
    # CUDA: every entry torch.nn's path (cuDNN) while no fastrnn CUDA kernel is verified
    # (GPU_VERIFIED) and measured: the reference runs step by step.
    # CPU, where native won on both CPUs (torch.nn ms / native ms, Intel 1 thr / 2 thr, AMD):
    for mode in ("LSTM", "GRU"):
        # packed training: LSTM 2.39 / 2.39 / 2.72, GRU 1.86 / - / 2.16 (torch.nn's backward
        # of a packed batch runs per step).
        routes["cpu", mode, False, "packed"] = KERNELS
    # GRU training at batch 1: 2.51 / 2.51 / 1.49; batch 16: 1.48 / 1.81 / 1.31.
    routes["cpu", "GRU", False, "batch1"] = KERNELS
    routes["cpu", "GRU", False, "small"] = KERNELS
    # GRU inference at batch 16: 1.36 / 1.99 / 1.14 (batch 1: 0.91 on Intel, so torch).
    routes["cpu", "GRU", True, "small"] = KERNELS
    # GRU inference at batch 1: AMD 1.38 before the matrix-vector loop; with it (a call
    # above 16 frames: F.linear's projection, then quantized_recurrence) at 100 frames,
    # Intel 1 thread / 2 threads, medians of 21-31 interleaved rounds in separate processes,
    # `python -m bench.suites.streaming --full --cell gru`: hidden 256 1.82 / 2.19, 512
    # 1.62-1.58 / 1.79-2.02, 1024 1.16-1.18 / 1.25-1.28.
    routes["cpu", "GRU", True, "batch1"] = KERNELS
    # Streaming classes take the route of their batch's class (measured at 100 steps), except
    # in inference, measured per frame on chunks of 1, 4 and 16 steps (Intel, 1 thread, hidden
    # 512, a shared machine: torch.nn / native of the fastest of 31 interleaved calls,
    # bench/results/streaming-interleaved-cpu-2c-2026-12-01-full-t1.md; AMD: 1 frame, 2
    # threads, before the matrix-vector path):
    for mode in MODES:
        for inference in (True, False):
            routes["cpu", mode, inference, "stream1"] = routes["cpu", mode, inference, "batch1"]
            routes["cpu", mode, inference, "stream_small"] = routes["cpu", mode, inference,
                                                                    "small"]
    # LSTM, batch 1: 1.91 (AMD 4.1), 1.56, 1.25; batch 4: 1.62, 1.16, 1.16. torch.nn's LSTM
    # pays oneDNN's weight reorders on every call; native reads w_hh as stored. With each
    # layer one op (native.fused_layer; medians of 21 interleaved rounds, Intel only,
    # bench/results/streaming-gemv32-cpu-2c-2026-12-01-t1.md and t2): 1 thread batch 1
    # 2.32, 1.74, 1.35, batch 4 1.74, 1.46, 1.17; 2 threads (a noisy run) batch 1 -, 1.73,
    # 1.42, batch 4 1.80, 1.48, 1.35. With the one-layer call's state passed as given (Intel
    # only, bench/results/streaming-f32-cpu-2c-2026-12-02-t1.md, load average 7-10): 1 thread
    # batch 1 2.71, 2.02, 1.39 (and 1.08 at 100 frames, the batch1 class: AMD not measured).
    routes["cpu", "LSTM", True, "stream1"] = KERNELS
    routes["cpu", "LSTM", True, "stream_small"] = KERNELS
    # GRU: torch.nn's GRU has no per-call set-up, so fastrnn's Python per call (tens of
    # microseconds) decided, and it lost at one frame until a module's repeated stream call
    # ran the layer op at once (nn/rnn.py's _stream_run) and the op's own tensor ops went.
    # Since then (Intel only, AMD not measured; 1 thread / 2 threads, 1, 4 and 16 frames,
    # medians of 21-31 interleaved rounds, `python -m bench.suites.streaming --full --cell gru`
    # and `python -m bench --suite streaming`, two runs each): batch 1 hidden 256 1.32, 1.38,
    # 1.61 / 1.35, 1.46, 1.81; 512 1.16-1.18, 1.28-1.30, 1.46-1.48 / 1.09-1.18, 1.37-1.39,
    # 1.82-1.85; 1024 0.84-0.98, 1.10-1.21, 1.16-1.18 / 0.99-1.08, 1.22, 1.30-1.32 (one frame
    # level: 24 MB of weights read either way); batch 4 hidden 256 1.01-1.24, 1.06-1.24,
    # 0.95-0.97 / 1.20-1.22, 0.94-1.35, 1.20-1.23; 512 0.94-1.05, 1.42-1.44, 1.33-1.35 /
    # 1.05-1.06, 1.28-1.38, 1.26-1.49; 1024 1.64, 1.54, 1.34 / 1.45, 1.50, 1.40.
    routes["cpu", "GRU", True, "stream1"] = KERNELS
    routes["cpu", "GRU", True, "stream_small"] = KERNELS
    # GRU training on short chunks (Intel, 1 thread, per call, 1 / 4 / 16 frames): hidden 512
    # batch 1: 0.63, 0.91, 1.11; batch 4: 0.76, 1.03, 1.22; hidden 256 batch 1: 0.45, 0.76,
    # 1.16; batch 4: 0.39, 0.62, 0.87. The op's autograd set-up per call outweighs the
    # kernels' gain until about 16 frames, so torch.nn's path (as for every dense GRU
    # training call, batch 1 and 2-16 above, from 17 frames on).
    routes["cpu", "GRU", False, "stream1"] = TORCH
    routes["cpu", "GRU", False, "stream_small"] = TORCH
    # Stay torch.nn (a loss on at least one CPU): LSTM dense, any mode (Intel 0.76-0.99
    # inference, 0.83-1.07 training; AMD 0.50-0.76); LSTM packed inference (1.00 / 1.13);
    # GRU batch 64 (training 1.12 / 1.15 / 0.90); GRU packed inference (0.94 / - / 1.07);
    # RNN and single cell steps (not benchmarked: torch.nn unless measured).
    return routes


ROUTES = _table()

# Under torch.compile, which routes stand. CPU: torch.nn's CPU RNNs trace into the graph as
# their step-by-step decomposition, so the kernels (one op in the graph) serve every call.
# CUDA: the table stands (dense input traces to torch.nn's kernel under fullgraph=True). A
# PackedSequence does not trace through torch.nn's path (its batch sizes are data), so a
# packed call under compile always runs the kernels.
COMPILED_ROUTES_STAND = {"cuda": True, "cpu": False}


def route(device_type: str, mode: str, inference: bool, shape: str,
          compiling: bool = False) -> str:
    """TORCH or KERNELS for a call of a module without options under backend "auto"."""
    if mode.startswith("RNN"):   # torch.nn's RNN modes are RNN_TANH and RNN_RELU
        mode = "RNN"
    if compiling and (shape == "packed" or not COMPILED_ROUTES_STAND.get(device_type, False)):
        return KERNELS
    if shape == "dense":   # any dense batch (under compile the batch size is not read)
        routes = {ROUTES.get((device_type, mode, inference, s), KERNELS) for s in DENSE}
        return TORCH if routes == {TORCH} else KERNELS
    # a device not in the table (meta, mps...): the kernels (the reference serves any device)
    return ROUTES.get((device_type, mode, inference, shape), KERNELS)
