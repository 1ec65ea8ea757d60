#!/usr/bin/env bash
# Every GPU measurement of issue #9 in one go (python -m bench.perf, then the gpu-marked tests):
# DiT-B/2 and DiT-XL/2 on 32x32x4 inputs, batch 256 (halved on out-of-memory; each row records its
# batch), flow matching and shortcut, with these variants (bench/perf.yaml explains the keys):
#   fast           bf16 autocast + SDPA + TF32, eager                 (the headline rows, profiled)
#   baseline       naive attention (explicit softmax), fp32, no TF32  (what the switches buy)
#   compiled       fast + torch.compile (inductor), per DiT block
#   checkpointed   fast + gradient checkpointing (flow matching; memory for time, for XL)
#   deterministic  fast + torch.use_deterministic_algorithms, as bench.run's jobs set it
#
#   benchmarks/gpu_check.sh            # on a CUDA machine (its run time there is not yet measured)
#   SMOKE=1 benchmarks/gpu_check.sh    # anywhere, on the CPU: the same script shrunk to seconds
#   SIZES='[B]' benchmarks/gpu_check.sh   # one size only (to fit a shorter time limit)
#
# Writes benchmarks/<gpu>-<time>.json and .md, replaces the GPU section of benchmarks/RESULTS.md
# and keeps the test log in benchmarks/gpu_tests-<time>.txt; with $OUT set (the lent GPU
# machines return what is under $OUT) everything is written under $OUT/benchmarks instead,
# starting from this checkout's RESULTS.md: copy those files back into benchmarks/.
# SMOKE writes only under $OUT (or a temporary folder), never into benchmarks/.
#
# A machine with torch but without this project's other dependencies (the lent GPU image has no
# hydra-core, omegaconf, antlr4): put pure-Python wheels in .whl/ first, here, in the repo root:
#   echo /.whl/ >> .git/info/exclude
#   pip wheel --no-deps -w .whl hydra-core==1.3.* omegaconf==2.3.* antlr4-python3-runtime==4.9.3
# and carry .whl; this script installs them into /tmp/site when hydra is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1

if ! "$PY" -c 'import hydra, omegaconf' 2>/dev/null; then
  if compgen -G '.whl/*.whl' >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  else
    echo "hydra-core/omegaconf are missing and .whl/ holds no wheels (see this script's header)" >&2
    exit 2
  fi
fi

stamp=$(date -u +%Y%m%d-%H%M%S)
if [[ "${SMOKE:-0}" == 1 ]]; then
  out=${OUT:-$(mktemp -d)}/benchmarks
  sizes='[tiny]'
  run=(device=cpu 'shape=[4,8,8]' patch=2 batch=8 warmup=1 iters=1 'sample_steps=[1,4]'
    compile_backend=aot_eager 'profile=[flow_matching]')
  few=(1 1)  # warm-up and timed steps of the slow or secondary variants
else
  if ! "$PY" -c 'import sys, torch; sys.exit(not torch.cuda.is_available())'; then
    echo "no CUDA device here; SMOKE=1 $0 is the CPU dry run of this script" >&2
    exit 2
  fi
  out=${OUT:+$OUT/benchmarks}
  out=${out:-benchmarks}
  sizes=${SIZES:-'[B,XL]'}
  run=(device=cuda 'shape=[4,32,32]' batch=256 warmup=5 iters=10 'sample_steps=[1,4,128]')
  few=(2 5)
fi
mkdir -p "$out"
if [[ "$out" != benchmarks && -f benchmarks/RESULTS.md ]]; then
  cp benchmarks/RESULTS.md "$out/RESULTS.md"  # fill this checkout's GPU section, keep the rest
fi

status=0
few_steps="warmup:${few[0]},iters:${few[1]}"
"$PY" -m bench.perf "${run[@]}" "sizes=$sizes" out="$out" record=true \
  'methods=[flow_matching,shortcut]' precision=bf16 attention=sdpa tf32=true compile=false \
  "+variants.baseline.warmup=${few[0]}" "+variants.baseline.iters=${few[1]}" \
  '+variants.compiled={compile:default}' \
  "+variants.checkpointed={grad_checkpoint:true,methods:[flow_matching],sample_steps:[],$few_steps}" \
  "+variants.deterministic={deterministic:true,methods:[flow_matching],sample_steps:[],$few_steps}" \
  || status=$?

# The gpu-marked tests (they skip, saying why, without CUDA).
"$PY" -m pytest -q -m gpu tests/test_perf.py -p no:cacheprovider 2>&1 \
  | tee "$out/gpu_tests-$stamp.txt" || status=$?
echo "results in $out (bench.perf exit/pytest status: $status)"
exit "$status"
