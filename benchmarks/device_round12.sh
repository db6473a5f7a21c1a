#!/usr/bin/env bash
# Round 12 (one H100 or H200, <= 9.5 min): after flex's decode BlockMask comes straight from the
# page tables (KVStep.row_pages) instead of per-block device work.
#  (1) the serving CUDA tests (paged / contiguous replay against the oracle, compile-once, HF generate);
#  (2) benchmarks/decode_probe.py at 4k (B=1,8,64) and 32k (B=1,8), auto / flex / sdpa;
#  (3) `anyattn bench serving` decode at 4k and 32k, B=1/8/64: paged auto / flex / sdpa, contiguous
#      auto, HF sdpa and HF flex_attention, one process;
#  (4) the padded prefill with auto (padding & causal at head dim 64 now ranks flash_torch first);
#  (5) ANKH base with its port and compiled rows (round 10 ran out of time before them).
#   OUT=/path bash benchmarks/device_round12.sh      # from the repository root
. benchmarks/device_common.sh
cuda_tests "${TEST_LIMIT:-110}" tests/test_cuda_serving.py
timeout -s TERM -k 5 90 python3 benchmarks/decode_probe.py --batches 1,8,64 --context 4096 --steps 20 --backends auto,flex,sdpa \
  > "$OUT/decode_probe_4k.log" 2>&1; echo "probe 4k rc=$? at $(el)s" | tee -a "$OUT/summary.txt"
timeout -s TERM -k 5 60 python3 benchmarks/decode_probe.py --batches 1,8 --context 32768 --steps 12 --backends flex,sdpa --no-profile \
  > "$OUT/decode_probe_32k.log" 2>&1; echo "probe 32k rc=$? at $(el)s" | tee -a "$OUT/summary.txt"
timeout -s TERM -k 10 110 python3 -m anyattn bench serving --preset h100 --contexts 4096,32768 --batches 1,8,64 --steps 10 \
  --backends auto,flex,sdpa --out "$OUT/serving" > "$OUT/serving.log" 2>&1
echo "serving rc=$? at $(el)s" | tee -a "$OUT/summary.txt"
timeout -s TERM -k 10 60 python3 -m anyattn bench serving --preset h100 --mode prefill --steps 6 --backends auto \
  --out "$OUT/prefill" > "$OUT/prefill.log" 2>&1; echo "prefill rc=$? at $(el)s" | tee -a "$OUT/summary.txt"
T=$(( ${DEADLINE:-560} - $(el) - 10 ))
[ "$T" -gt 90 ] && STAGES=ankh_base ANKH_BASE_S=$T TOTAL=$T OUT=$OUT/fam bash benchmarks/device_round5_families.sh > "$OUT/families.log" 2>&1
echo "total $(el)s" | tee -a "$OUT/summary.txt"
grep -E "^\| " "$OUT/decode_probe_4k.log" | head -40
grep -E "^\| " "$OUT/decode_probe_32k.log" | head -20
grep -E "^decode" "$OUT/serving.log"
grep -E "^prefill" "$OUT/prefill.log"
tail -12 "$OUT/fam/summary.txt" 2>/dev/null
