#!/usr/bin/env bash
# One session on a lent GPU machine (docs/gpu-checks.md), the same way every time so
# results stay comparable. Run from the repository root:
#   OUT=/path/to/out bash bench/gpu_session.sh [tests|bench|variants|all] [extra bench args]
# "tests": build the CUDA extension, run every GPU test (native CUDA kernels incl. the
# options against the reference with poisoned outputs, fp16/bf16 by the 2x rule,
# autocast/ecosystem), the Triton tests compiled on CUDA (plain and with options), and
# dump Triton register use for a representative subset of kernels.
# "bench": the rnn and beam-search suites on CUDA. "variants": the LayerNorm LSTM suite
# (fastrnn vs TorchScript LN loops vs cuDNN nn.LSTM) and its summary against its targets
# (TARGETS in bench/suites/variants.py). "all": tests, then bench, then variants, as far as
# the deadline allows.
# A device call is limited to 10 minutes and a session to 15 minutes of device time,
# start-up included: every step gets at most what is left of DEADLINE seconds (default 540)
# from the script's start, so the call always returns with its logs. Run "tests" first
# (e.g. DEADLINE=450), then, on the still-warm machine, "bench" with what is left
# (e.g. DEADLINE=150 ... bench --config fastrnns,batch1,batch16 --cell lstm).
# Uses the machine's own python3 with the repository on PYTHONPATH (no install, no network).
set -u
OUT=${OUT:?set OUT to the directory that comes back}
STAGE=${1:-all}
[ $# -gt 0 ] && shift
DEADLINE=${DEADLINE:-540}
START=$(date +%s)
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$PWD/build/torch_extensions}
mkdir -p "$OUT"

# step CAP LOG COMMAND...: run COMMAND with at most CAP seconds (and never past the
# deadline), output to $OUT/LOG, and record its exit status and wall time there.
step() {
  local cap=$1 log=$2 left
  shift 2
  left=$(( DEADLINE - ($(date +%s) - START) ))
  [ "$left" -lt "$cap" ] && cap=$left
  if [ "$cap" -le 5 ]; then echo "skipped: deadline reached" > "$OUT/$log"; return; fi
  local t0=$(date +%s)
  timeout "$cap" "$@" > "$OUT/$log" 2>&1
  echo "exit $? after $(( $(date +%s) - t0 )) s (limit $cap s): $*" >> "$OUT/$log"
  tail -n 2 "$OUT/$log"
}

{
  date -u; git rev-parse HEAD 2>/dev/null; nvidia-smi || true
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
} > "$OUT/env.log" 2>&1

if [ "$STAGE" = tests ] || [ "$STAGE" = all ]; then
  step 300 build.log python3 -m fastrnn.build --cuda -v
  python3 -c "import fastrnn; print(fastrnn.available_backends('cuda'))" >> "$OUT/env.log" 2>&1
  step 180 gpu-tests.log python3 -m pytest -q -m gpu tests/
  # plain kernels first: they decide whether triton can join auto's CUDA order
  TRITON_INTERPRET=0 FASTRNN_TEST_TRITON_DEVICE=cuda \
    step 150 triton-cuda-tests.log python3 -m pytest -q tests/test_triton.py
  TRITON_INTERPRET=0 FASTRNN_TEST_TRITON_DEVICE=cuda \
    step 90 triton-cuda-variant-tests.log python3 -m pytest -q tests/test_triton_variants.py
  # the subset: --all compiles every tile and option variant (minutes per core)
  step 60 triton-ptxas.log python3 -m fastrnn.backends.triton.compile_check -v
fi
if [ "$STAGE" = bench ] || [ "$STAGE" = all ]; then
  [ $# -eq 0 ] && set -- --suite rnn,beam_search
  step 540 bench.log python3 -m bench --device cuda --no-progress --out "$OUT/results" "$@"
  tail -n 40 "$OUT/bench.log"
fi
if [ "$STAGE" = variants ] || [ "$STAGE" = all ]; then
  step 540 variants.log python3 -m bench --device cuda --no-progress --suite variants \
    --out "$OUT/variants"
  for result in "$OUT"/variants/*.json; do
    python3 -m bench.suites.variants "$result"
  done > "$OUT/variants-summary.log" 2>&1
  tail -n 30 "$OUT/variants-summary.log"
fi
