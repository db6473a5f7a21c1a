#!/usr/bin/env bash
# Round 6, first call (one H100 or H200, ~8.5 min): (1) the small-call sweep that sets
# ranking.SMALL_WORK (benchmarks/small_calls.py); (2) the CUDA tests of serving (issue 17: KV caches,
# packed Sq != Sk, sinks, HF generation) and of the protein families' embedding (issue 18);
# (3) decode and mixed-batch prefill of the 1B Llama shape (`anyattn bench serving`).
#   OUT=/path bash benchmarks/device_round6_a.sh      # from the repository root
set -uo pipefail
export PYTHONPATH=src PYTHONUNBUFFERED=1 CUBLAS_WORKSPACE_CONFIG=:4096:8
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/env.txt"
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/env.txt"
timeout -k 5 120 python3 benchmarks/small_calls.py --out "$OUT/small_calls.json" > "$OUT/small_calls.log" 2>&1; echo "small_calls rc=$?"
timeout -k 5 60 python3 benchmarks/flex_newpack_probe.py --out "$OUT/flex_probe.txt" > "$OUT/flex_probe.log" 2>&1; echo "flex probe rc=$?"; head -12 "$OUT/flex_probe.log"
timeout -k 5 190 python3 -m pytest -q -m "cuda and not multigpu" -n 8 -p no:cacheprovider -rf --durations=10 \
  tests/test_cuda_serving.py tests/test_cuda_embed.py tests/test_cuda_esmc_ankh.py \
  "tests/test_cuda_hf.py::test_generation_matches_hf" "tests/test_cuda_hf.py::test_generation_fp32_auto_equals_sdpa" \
  "tests/test_cuda_hf.py::test_gpt_oss_sinks_within_rule" > "$OUT/tests.log" 2>&1; echo "tests rc=$?"
timeout -s TERM -k 10 100 python3 -m anyattn bench serving --preset h100 --contexts 4096 --steps 12 --out "$OUT/serving_4k" > "$OUT/serving_4k.log" 2>&1; echo "serving 4k rc=$?"
timeout -s TERM -k 10 45 python3 -m anyattn bench serving --preset h100 --mode prefill --out "$OUT/serving_prefill" > "$OUT/serving_prefill.log" 2>&1; echo "serving prefill rc=$?"
grep -E "^(FAILED|ERROR)|passed|failed" "$OUT/tests.log" | tail -25
tail -25 "$OUT/serving_4k.log"; tail -12 "$OUT/serving_prefill.log"
tail -22 "$OUT/small_calls.log"
