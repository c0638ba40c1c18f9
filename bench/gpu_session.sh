#!/usr/bin/env bash
# One benchmark session on a lent GPU machine (see DESIGN.md "On the lent GPU machine").
# Run from the repository root:  OUT=/path/to/out bash bench/gpu_session.sh [extra bench args]
# Uses the machine's own python3 with the repository on PYTHONPATH (no install, no network);
# the first call of the native backend JIT-builds the CUDA extension (minutes), so the build,
# a short GPU test pass and the full benchmark all happen in this one call, logs under $OUT.
set -u
OUT=${OUT:?set OUT to the directory that comes back}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$PWD/build/torch_extensions}
mkdir -p "$OUT"
{
  nvidia-smi || true
  python3 -c "import torch, fastrnn; print(torch.__version__, torch.cuda.get_device_name(), fastrnn.available_backends('cuda'))"
} > "$OUT/env.log" 2>&1
python3 -m pytest -q -m gpu tests/ > "$OUT/gpu-tests.log" 2>&1
echo "gpu tests exit $?" >> "$OUT/gpu-tests.log"
python3 -m bench --full --no-progress --out "$OUT/results" "$@" > "$OUT/bench.log" 2>&1
echo "bench exit $?" >> "$OUT/bench.log"
tail -n 5 "$OUT/gpu-tests.log" "$OUT/bench.log"
