#!/usr/bin/env bash
# Round 5: every one-GPU CUDA test file in one call (pytest-xdist carried as a wheel in .whl/).
#   OUT=/path bash benchmarks/device_round5_tests.sh      # from the repository root
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >/dev/null 2>&1
export PYTHONPATH=/tmp/site:src PYTHONUNBUFFERED=1 CUBLAS_WORKSPACE_CONFIG=:4096:8
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
timeout ${LIMIT:-540} python3 -m pytest -q -m "cuda and not multigpu" -n ${WORKERS:-12} -p no:cacheprovider -rf --durations=15 \
  ${FILES:-tests/test_cuda_core.py tests/test_cuda_flash.py tests/test_reliability.py tests/test_fuzz.py tests/test_churn.py \
  tests/test_cuda_models.py tests/test_cuda_dplm.py tests/test_cuda_e1.py tests/test_cuda_embed.py tests/test_cuda_hf.py \
  tests/test_cuda_train.py tests/test_compile.py tests/test_layout.py tests/test_cuda_esmc_ankh.py tests/test_cuda_churn.py} \
  2>&1 | tee "$OUT/tests.log" | grep -E "^(FAILED|ERROR)|passed|failed|error" | tail -60
