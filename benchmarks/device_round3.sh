#!/usr/bin/env bash
# The H200 runs of round 3, as sent to the device machine (one command each; wheels carried in .whl/).
#   bash benchmarks/device_round3.sh bench   # sync probe, ESM2-650M model benchmark, embed benchmark, h2d probe
#   bash benchmarks/device_round3.sh tests   # the CUDA tests of the code this round touched
#   bash benchmarks/device_round3.sh final   # the tests, then the model and embed benchmarks again
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >/dev/null 2>&1
export PYTHONPATH=/tmp/site:src PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
case "${1:-bench}" in
bench)
  timeout 100 python3 benchmarks/sync_probe.py "$OUT" 2>&1 | tee "$OUT/sync_probe.log" | tail -8
  timeout 170 python3 -m anyattn bench model --compile only --backends auto,flash_torch --tune --max-tokens 32768 \
    --hf sdpa,eager --repeats 3 --out "$OUT/model32k" 2>&1 | tee "$OUT/model.log" | tail -8
  timeout 180 python3 benchmarks/embed_bench.py --out "$OUT/embed" 2>&1 | tee "$OUT/embed.log" | tail -14
  timeout 130 python3 benchmarks/embed_h2d_probe.py "$OUT" 6000 2>&1 | tee -a "$OUT/embed.log" | tail -6
  ;;
tests)
  timeout 150 python3 benchmarks/embed_h2d_probe.py "$OUT" 5000 2>&1 | tee "$OUT/h2d.log" | tail -7
  CUBLAS_WORKSPACE_CONFIG=:4096:8 timeout 380 python3 -m pytest -q -m cuda -n 8 -p no:cacheprovider \
    tests/test_layout.py tests/test_cuda_models.py tests/test_cuda_dplm.py tests/test_cuda_e1.py tests/test_cuda_embed.py \
    tests/test_compile.py 2>&1 | tee "$OUT/tests.log" | tail -25
  ;;
final)
  CUBLAS_WORKSPACE_CONFIG=:4096:8 timeout 200 python3 -m pytest -q -m cuda -n 8 -p no:cacheprovider \
    tests/test_layout.py tests/test_cuda_models.py tests/test_cuda_dplm.py tests/test_cuda_e1.py tests/test_cuda_embed.py \
    tests/test_compile.py 2>&1 | tee "$OUT/tests.log" | tail -4
  timeout 150 python3 -m anyattn bench model --compile only --backends auto,flash_torch --tune --max-tokens 32768 \
    --hf sdpa,eager --repeats 3 --out "$OUT/model32k" 2>&1 | tee "$OUT/model.log" | tail -7
  timeout 180 python3 benchmarks/embed_bench.py --out "$OUT/embed" 2>&1 | tee "$OUT/embed.log" | tail -14
  ;;
esac
