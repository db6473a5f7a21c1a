#!/usr/bin/env bash
# Round 14, short form (one H100 or H200, <= 4.5 min): what the new flex decode paths need first.
#  (1) the serving and churn CUDA tests, auto's first choices (<= 90 s);
#  (2) benchmarks/decode_probe.py at 4k, B=1 and 64, flex and sdpa on both caches (<= 50 s);
#  (3) `anyattn bench serving` at 32k B=64 (paged and contiguous, auto and flex) (<= 80 s).
#   OUT=/path bash benchmarks/device_round14_short.sh      # from the repository root
. benchmarks/device_common.sh
echo "tree: $(git rev-parse --short HEAD 2>/dev/null || echo none)" | tee -a "$OUT/summary.txt"
cuda_tests "${TEST_LIMIT:-90}" tests/test_cuda_serving.py tests/test_cuda_churn.py tests/test_cuda_core.py::test_cuda_auto_prefers_fast_backends
timeout -s TERM -k 5 50 python3 benchmarks/decode_probe.py --batches 1,64 --context 4096 --steps 12 --backends flex,sdpa --no-profile \
  > "$OUT/decode_probe_4k.log" 2>&1; echo "probe 4k rc=$? at $(el)s" | tee -a "$OUT/summary.txt"
T=$(( ${DEADLINE:-240} - $(el) ))
[ "$T" -gt 30 ] && timeout -s TERM -k 5 "$T" python3 -m anyattn bench serving --preset h100 --contexts 32768 --batches 64 --steps 6 \
  --impls anyattn/paged,anyattn/contiguous --backends auto,flex --out "$OUT/serving" > "$OUT/serving.log" 2>&1
echo "serving rc=$? at $(el)s; total $(el)s" | tee -a "$OUT/summary.txt"
grep -E "^\| " "$OUT/decode_probe_4k.log" | head -20
grep -E "^decode" "$OUT/serving.log" | cut -c1-150
