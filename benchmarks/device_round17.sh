#!/usr/bin/env bash
# Round 17, the first call of a session (<= 9.5 min), adapted to the card that came:
#  on an H200: benchmarks/device_round14_all.sh (issue 15's one-process tables, then issue 17's
#   decode table in the time left; DEADLINE, default 570). Follow with device_round15_b.sh
#   (`carry: [".fa4"]`: decode table, FA4 tests and table) and the family stages, as
#   docs/benchmarks.md lists;
#  on an H100 (round 16 measured the families, the decode table and issue 15's tables there):
#   (1) test_cuda_core.py::test_cuda_auto_prefers_fast_backends (auto's first choices, among them
#       the FIRST_SIGHT "padding+grad+runs" row added after round 16) -> $OUT/tests.log;
#   (2) `anyattn bench kernels --mode new-packing`: times that row (new padding given as lengths,
#       fwd+bwd: auto should now run flash_torch) -> $OUT/new_packing;
#   (3) the E1 and DPLM stages of benchmarks/device_round5_families.sh, whose FastPLMs-style
#       ports were written after round 16 (<= FAM_S s, default 200) -> $OUT/fam;
#   (4) with `carry: [".fa4"]` (benchmarks/fa4_pack.sh builds it): benchmarks/device_round6_fa4.sh,
#       the FA4 tests and the FA4 / flex-FLASH / cuDNN table with the current tree (last run in
#       round 9) in the time left -> $OUT/fa4.
#   OUT=/path bash benchmarks/device_round17.sh      # from the repository root
. benchmarks/device_common.sh
echo "tree: $(git rev-parse --short HEAD 2>/dev/null || echo none) $(git status --porcelain 2>/dev/null | wc -l | tr -d ' ') changed files" | tee -a "$OUT/summary.txt"
if nvidia-smi --query-gpu=name --format=csv,noheader | grep -q H200; then
  DEADLINE=${DEADLINE:-570} bash benchmarks/device_round14_all.sh
  exit $?
fi
cuda_tests "${TEST_LIMIT:-90}" tests/test_cuda_core.py::test_cuda_auto_prefers_fast_backends
timeout -s TERM -k 5 150 python3 -m anyattn bench kernels --mode new-packing --steps 50 --budget-s 110 --out "$OUT/new_packing" \
  > "$OUT/new_packing.log" 2>&1
echo "new_packing rc=$? at $(el)s" | tee -a "$OUT/summary.txt"
STAGES="e1 dplm" TOTAL=${FAM_S:-200} OUT=$OUT/fam bash benchmarks/device_round5_families.sh > "$OUT/fam.log" 2>&1
echo "families rc=$? at $(el)s" | tee -a "$OUT/summary.txt"
T=$(( ${DEADLINE:-560} - $(el) ))
if [ -f .fa4/fa4site.tar.xz ] && [ "$T" -gt 150 ]; then
  TEST_LIMIT=$(( T / 4 )) FWD_BUDGET=$(( T / 5 )) BWD_BUDGET=$(( T / 4 )) OUT=$OUT/fa4 \
    timeout -s TERM -k 5 "$T" bash benchmarks/device_round6_fa4.sh > "$OUT/fa4.log" 2>&1
  echo "fa4 rc=$? at $(el)s" | tee -a "$OUT/summary.txt"
fi
echo "total $(el)s" | tee -a "$OUT/summary.txt"
grep -E "^new padding|^  (raw:sdpa|auto|flash_torch \[lengths\]|sdpa \[lengths\])|^target" "$OUT/new_packing.log" | head -30
grep -E "^\[|anyattn plain|hf\[|fastplms|compiled|reference" "$OUT/fam/summary.txt" 2>/dev/null | cut -c1-160
tail -25 "$OUT/fa4.log" 2>/dev/null
