#!/usr/bin/env bash
# Round 11 (one H100 or H200, <= 9 min): decode (issue 17) in one process per table.
#  (1) benchmarks/decode_probe.py at 4k (B=1,8,64) and 32k (B=1,8): where a decode step's time goes,
#      anyattn's caches per backend next to a hand-written FlexAttention decode loop, and a profile;
#  (2) `anyattn bench serving` decode at contexts 4096 and 32768, batches 1/8/64: anyattn paged and
#      contiguous, HF sdpa and HF flex_attention side by side (rows that do not fit are skipped).
#   OUT=/path bash benchmarks/device_round11.sh      # from the repository root
. benchmarks/device_common.sh
timeout -s TERM -k 5 150 python3 benchmarks/decode_probe.py --batches 1,8,64 --context 4096 --steps 20 > "$OUT/decode_probe_4k.log" 2>&1
echo "probe 4k rc=$? at $(el)s" | tee -a "$OUT/summary.txt"
timeout -s TERM -k 5 80 python3 benchmarks/decode_probe.py --batches 1,8 --context 32768 --steps 12 --backends auto,flex,sdpa --no-profile > "$OUT/decode_probe_32k.log" 2>&1
echo "probe 32k rc=$? at $(el)s" | tee -a "$OUT/summary.txt"
T=$(( ${DEADLINE:-530} - $(el) - 15 ))
timeout -s TERM -k 10 "$T" python3 -m anyattn bench serving --preset h100 --contexts 4096,32768 --batches 1,8,64 --steps 10 \
  --out "$OUT/serving" > "$OUT/serving.log" 2>&1
echo "serving rc=$? at $(el)s" | tee -a "$OUT/summary.txt"
echo "total $(el)s" | tee -a "$OUT/summary.txt"
grep -E "^\| " "$OUT/decode_probe_4k.log" | head -60
grep -E "^\| " "$OUT/decode_probe_32k.log" | head -30
grep -E "^decode" "$OUT/serving.log"
