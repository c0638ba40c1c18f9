#!/usr/bin/env bash
# One session on a lent GPU machine (see DESIGN.md "On the lent GPU machine"), the same way
# every time so results stay comparable. Run from the repository root:
#   OUT=/path/to/out bash bench/gpu_session.sh [tests|bench|all] [extra bench args]
# "tests" (about 5 min): build the CUDA extension, run every GPU test (native CUDA kernels
# against the reference with poisoned outputs, fp16/bf16 by the 2x rule, triton compiled on
# CUDA, autocast/ecosystem), dump triton register use. "bench": the benchmark suite on CUDA.
# A device call is limited to 10 minutes: run "tests" and "bench" as two calls.
# Uses the machine's own python3 with the repository on PYTHONPATH (no install, no network).
set -u
OUT=${OUT:?set OUT to the directory that comes back}
STAGE=${1:-all}
[ $# -gt 0 ] && shift
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$PWD/build/torch_extensions}
mkdir -p "$OUT"
{
  date -u; git rev-parse HEAD 2>/dev/null; nvidia-smi || true
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
} > "$OUT/env.log" 2>&1

if [ "$STAGE" = tests ] || [ "$STAGE" = all ]; then
  { time timeout 360 python3 -m fastrnn.build --cuda -v; } > "$OUT/build.log" 2>&1
  echo "build exit $?" >> "$OUT/build.log"
  python3 -c "import fastrnn; print(fastrnn.available_backends('cuda'))" >> "$OUT/env.log" 2>&1
  timeout 240 python3 -m pytest -q -m gpu tests/ > "$OUT/gpu-tests.log" 2>&1
  echo "gpu tests exit $?" >> "$OUT/gpu-tests.log"
  TRITON_INTERPRET=0 FASTRNN_TEST_TRITON_DEVICE=cuda timeout 240 \
    python3 -m pytest -q tests/test_triton*.py > "$OUT/triton-cuda-tests.log" 2>&1
  echo "triton cuda tests exit $?" >> "$OUT/triton-cuda-tests.log"
  timeout 120 python3 -m fastrnn.backends.triton.compile_check --all -v > "$OUT/triton-ptxas.log" 2>&1
  tail -n 3 "$OUT/build.log" "$OUT/gpu-tests.log" "$OUT/triton-cuda-tests.log"
fi
if [ "$STAGE" = bench ] || [ "$STAGE" = all ]; then
  timeout 560 python3 -m bench --device cuda --no-progress --out "$OUT/results" "$@" \
    > "$OUT/bench.log" 2>&1
  echo "bench exit $?" >> "$OUT/bench.log"
  tail -n 40 "$OUT/bench.log"
fi
