#!/usr/bin/env bash
# The H200 runs of round 4, as sent to the device machine (one command each; wheels carried in .whl/).
#   bash benchmarks/device_round4.sh a   # ESM2-650M bound probe; CUDA tests of the core, flash, reliability, fuzz
#   bash benchmarks/device_round4.sh b   # the bound probe again; CUDA tests of models, HF, training, embed, compile, layout; model benchmark
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >/dev/null 2>&1
export PYTHONPATH=/tmp/site:src PYTHONUNBUFFERED=1 CUBLAS_WORKSPACE_CONFIG=:4096:8
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
case "${1:-a}" in
a)
  timeout 170 python3 benchmarks/esm2_bound.py "$OUT" 32768 2>&1 | tee "$OUT/bound.log" | tail -12
  timeout 390 python3 -m pytest -q -m "cuda and not multigpu" -n 8 -p no:cacheprovider \
    tests/test_cuda_core.py tests/test_cuda_flash.py tests/test_reliability.py tests/test_fuzz.py 2>&1 | tee "$OUT/tests_a.log" | tail -15
  ;;
b)
  timeout 140 python3 benchmarks/esm2_bound.py "$OUT" 32768 2>&1 | tee "$OUT/bound.log" | tail -9
  timeout 300 python3 -m pytest -q -m "cuda and not multigpu" -n 8 -p no:cacheprovider \
    tests/test_cuda_models.py tests/test_cuda_dplm.py tests/test_cuda_e1.py tests/test_cuda_embed.py tests/test_cuda_hf.py \
    tests/test_cuda_train.py tests/test_compile.py tests/test_layout.py 2>&1 | tee "$OUT/tests_b.log" | tail -15
  timeout 130 python3 -m anyattn bench model --compile only --backends auto,flash_torch --tune --max-tokens 32768 \
    --hf sdpa,eager --repeats 3 --out "$OUT/model32k" 2>&1 | tee "$OUT/model.log" | tail -7
  ;;
esac
