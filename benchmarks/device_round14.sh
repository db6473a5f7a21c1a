#!/usr/bin/env bash
# Round 14 (one H100 or H200, <= 9.5 min): serving after flex compiles FlexDecoding per key
# bucket on a ContiguousKVCache and marks whole pages as full blocks on a PagedKVCache.
#  (1) the churn and serving CUDA tests, and auto's first choices (test_cuda_auto_prefers_fast_backends);
#  (2) benchmarks/decode_probe.py at 4k, B=1/8/64, flex and sdpa on both caches;
#  (3) `anyattn bench serving --preset h200` decode at 4k and 32k, B=1/8/64: every impl (anyattn
#      paged / contiguous on auto and flex, HF sdpa, HF flex_attention), one process;
#  (4) the prefill table: mixed batch packed on a paged cache vs padded, auto / flash_torch / sdpa, HF sdpa.
#   OUT=/path bash benchmarks/device_round14.sh      # from the repository root
. benchmarks/device_common.sh
echo "tree: $(git rev-parse --short HEAD 2>/dev/null || echo none) $(git status --porcelain 2>/dev/null | wc -l | tr -d ' ') changed files" | tee -a "$OUT/summary.txt"
cuda_tests "${TEST_LIMIT:-150}" tests/test_cuda_churn.py tests/test_cuda_serving.py tests/test_cuda_core.py::test_cuda_auto_prefers_fast_backends
timeout -s TERM -k 5 70 python3 benchmarks/decode_probe.py --batches 1,8,64 --context 4096 --steps 20 --backends flex,sdpa --no-profile \
  > "$OUT/decode_probe_4k.log" 2>&1; echo "probe 4k rc=$? at $(el)s" | tee -a "$OUT/summary.txt"
timeout -s TERM -k 10 "${SERVING_S:-230}" python3 -m anyattn bench serving --preset h200 --contexts 4096,32768 --batches 1,8,64 --steps 10 \
  --backends auto,flex --out "$OUT/serving" > "$OUT/serving.log" 2>&1
echo "serving rc=$? at $(el)s" | tee -a "$OUT/summary.txt"
T=$(( ${DEADLINE:-560} - $(el) - 5 ))
[ "$T" -gt 30 ] && timeout -s TERM -k 5 "$T" python3 -m anyattn bench serving --preset h200 --mode prefill --steps 6 \
  --backends auto,flash_torch,sdpa --out "$OUT/prefill" > "$OUT/prefill.log" 2>&1; echo "prefill rc=$? at $(el)s" | tee -a "$OUT/summary.txt"
echo "total $(el)s" | tee -a "$OUT/summary.txt"
grep -E "^\| " "$OUT/decode_probe_4k.log" | head -30
grep -E "^decode" "$OUT/serving.log" | head -60
grep -E "^prefill" "$OUT/prefill.log"
