# Sourced by the device scripts (benchmarks/device_round*.sh), from the repository root:
#   . benchmarks/device_common.sh
# Sets the environment, OUT (default /tmp/out), T0 and el (seconds since start), writes the card
# and versions to $OUT/summary.txt, and defines cuda_tests.
set -uo pipefail
export PYTHONPATH=src PYTHONUNBUFFERED=1 CUBLAS_WORKSPACE_CONFIG=:4096:8
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
T0=$(date +%s)
el() { echo $(( $(date +%s) - T0 )); }
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"; } | tee "$OUT/summary.txt"

# cuda_tests LIMIT PYTEST_ARGS...: the one-GPU CUDA tests on 14 workers under a time limit ->
# $OUT/tests.log; failures written as they happen to $OUT/failures.txt (tests/conftest.py); the
# result line and the first failures appended to $OUT/summary.txt.
cuda_tests() {
  local limit=$1
  shift
  ANYATTN_FAILLOG=$OUT/failures.txt timeout -k 5 "$limit" python3 -m pytest -q -rf -m "cuda and not multigpu" -n 14 \
    -p no:cacheprovider "$@" > "$OUT/tests.log" 2>&1
  echo "tests rc=$? at $(el)s: $(tail -1 "$OUT/tests.log")" | tee -a "$OUT/summary.txt"
  grep -E '^FAILED|^ERROR' "$OUT/tests.log" | cut -c1-250 | head -20 | tee -a "$OUT/summary.txt"
}

# use_fa4_site: flash-attn-4 on the path from .fa4/fa4site.tar.xz (`carry: [".fa4"]`; built by
# benchmarks/fa4_pack.sh), and whether flash_attn.cute imports, appended to $OUT/summary.txt.
use_fa4_site() {
  if [ -f .fa4/fa4site.tar.xz ]; then
    mkdir -p /tmp/site && xz -d < .fa4/fa4site.tar.xz | tar x -C /tmp/site
    export PYTHONPATH=/tmp/site:/tmp/site/nvidia_cutlass_dsl/dsl_packages:src
  fi
  python3 -c "import flash_attn.cute; print('flash_attn.cute importable')" 2>&1 | tail -1 | tee -a "$OUT/summary.txt"
}
