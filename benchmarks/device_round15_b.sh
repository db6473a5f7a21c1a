#!/usr/bin/env bash
# Round 15, the second call on a still-warm machine (<= 9.5 min), after device_round14_all.sh ran
# its tests and issue 15's tables with DEADLINE short enough to leave the serving table out:
#  (1) `anyattn bench serving --preset h200` decode at 4k / 32k, B=1/8/64, every impl, auto and
#      flex, one process (<= SERVE_LIMIT s, default 230) -> $OUT/serving;
#  (2) on an H200: benchmarks/device_round6_fa4.sh (issue 19: fa4 tests and the FA4 / flex-FLASH /
#      cuDNN table; needs `carry: [".fa4"]`) -> $OUT/fa4;
#      on an H100 (FA4 measured there already): the ANKH large stage of the family benchmark
#      (issue 18) -> $OUT/fam.
#   OUT=/path bash benchmarks/device_round15_b.sh      # from the repository root
. benchmarks/device_common.sh
echo "tree: $(git rev-parse --short HEAD 2>/dev/null || echo none)" | tee -a "$OUT/summary.txt"
timeout -s TERM -k 5 "${SERVE_LIMIT:-230}" python3 -m anyattn bench serving --preset h200 --contexts 4096,32768 --batches 1,8,64 \
  --steps 8 --backends auto,flex --out "$OUT/serving" > "$OUT/serving.log" 2>&1
echo "serving rc=$? at $(el)s" | tee -a "$OUT/summary.txt"
T=$(( ${DEADLINE:-560} - $(el) ))
if nvidia-smi --query-gpu=name --format=csv,noheader | grep -q H200; then
  [ "$T" -gt 120 ] && TEST_LIMIT=$(( T / 4 )) FWD_BUDGET=$(( T / 5 )) BWD_BUDGET=$(( T / 4 )) OUT=$OUT/fa4 \
    timeout -s TERM -k 5 "$T" bash benchmarks/device_round6_fa4.sh > "$OUT/fa4.log" 2>&1
  echo "fa4 rc=$? at $(el)s" | tee -a "$OUT/summary.txt"
else
  [ "$T" -gt 120 ] && STAGES="ankh_large" TOTAL=$(( T - 10 )) OUT=$OUT/fam bash benchmarks/device_round5_families.sh > "$OUT/fam.log" 2>&1
  echo "families rc=$? at $(el)s" | tee -a "$OUT/summary.txt"
fi
echo "total $(el)s" | tee -a "$OUT/summary.txt"
grep -E "^decode|^prefill" "$OUT/serving.log" | cut -c1-150 | head -40
tail -25 "$OUT/fa4.log" "$OUT/fam.log" 2>/dev/null
