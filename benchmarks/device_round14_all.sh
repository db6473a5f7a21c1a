#!/usr/bin/env bash
# Round 14 in one device call (one H100 or H200, <= 9.8 min), for when machines are scarce:
#  (1) the churn and serving CUDA tests and auto's first choices (<= 100 s);
#  (2) benchmarks/device_round5.sh: issue 15's tables, each in one process (new packing every
#      step, host overhead, the static headline subset, ESM2-650M plain / compiled / first pass
#      next to HF sdpa and the FastPLMs-style port) -> $OUT/r5;
#  (3) `anyattn bench serving --preset h200` decode at 4k / 32k, B=1/8/64, every impl, auto and
#      flex, one process, in the time left -> $OUT/serving.
#   OUT=/path bash benchmarks/device_round14_all.sh      # from the repository root
. benchmarks/device_common.sh
echo "tree: $(git rev-parse --short HEAD 2>/dev/null || echo none) $(git status --porcelain 2>/dev/null | wc -l | tr -d ' ') changed files" | tee -a "$OUT/summary.txt"
cuda_tests "${TEST_LIMIT:-100}" tests/test_cuda_churn.py tests/test_cuda_serving.py tests/test_cuda_core.py::test_cuda_auto_prefers_fast_backends
OUT=$OUT/r5 bash benchmarks/device_round5.sh > "$OUT/round5.log" 2>&1; echo "round5 rc=$? at $(el)s" | tee -a "$OUT/summary.txt"
T=$(( ${DEADLINE:-580} - $(el) ))
if [ "$T" -gt 60 ]; then
  timeout -s TERM -k 5 "$T" python3 -m anyattn bench serving --preset h200 --contexts 4096,32768 --batches 1,8,64 --steps 8 \
    --backends auto,flex --out "$OUT/serving" > "$OUT/serving.log" 2>&1; echo "serving rc=$? at $(el)s" | tee -a "$OUT/summary.txt"
fi
echo "total $(el)s" | tee -a "$OUT/summary.txt"
tail -30 "$OUT/r5/summary.txt" 2>/dev/null
grep -E "^decode" "$OUT/serving.log" 2>/dev/null | cut -c1-150 | head -40
