#!/usr/bin/env bash
# Round 5, last call: the dynamic-path benchmarks after the flex BlockMask and first-sight changes,
# and the CUDA tests those changes touch (plus the two harness fixes of the first test call).
#   OUT=/path bash benchmarks/device_round5_final.sh     # from the repository root
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >/dev/null 2>&1
export PYTHONPATH=/tmp/site:src PYTHONUNBUFFERED=1 CUBLAS_WORKSPACE_CONFIG=:4096:8
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name --format=csv,noheader
timeout -s TERM -k 5 100 python3 -m anyattn bench kernels --mode new-packing --steps 40 --budget-s 80 --out "$OUT/np" > "$OUT/new_packing.log" 2>&1; echo "new-packing rc=$?"
timeout -s TERM -k 5 95 python3 -m anyattn bench kernels --mode host --host-rounds 3 --backends auto,sdpa,cudnn --out "$OUT/host" > "$OUT/host.log" 2>&1; echo "host rc=$?"
timeout 140 python3 -m pytest -q -m "cuda and not multigpu" -n 8 -p no:cacheprovider -rf tests/test_cuda_churn.py \
  "tests/test_cuda_core.py::test_cuda_flex_recompiles_are_bounded_when_lengths_change" \
  "tests/test_cuda_flash.py::test_varlen_attn_actually_ran_with_the_mapped_arguments" \
  tests/test_cuda_hf.py -k "churn or recompiles or varlen_attn_actually or packed_bf16" > "$OUT/tests.log" 2>&1; echo "tests rc=$?"
grep -E "^(FAILED|ERROR)|passed|failed" "$OUT/tests.log" | tail -20
grep -E "target|ms/step|raw:|auto|flex\[|flash_torch\[|sdpa\[" "$OUT/new_packing.log" | head -40
grep -E "us|target" "$OUT/host.log" | tail -45
