#!/usr/bin/env bash
# Round 20, one call (<= ~9.5 min). On an H200: benchmarks/device_round19.sh (issue 15's
# one-process tables, then the CUDA tests). On any other card:
#   1. the CUDA tests of the flex / layout code (churn, core, layout; <= TESTS_S s, ~185 s on a
#      fresh machine), what branch flex-document-tile-ranges needs to land;
#   2. padding_probe.py part B for a new packing at 1 x 16384 (launches and ms per step of flex,
#      flash_torch, auto, raw varlen; <= 90 s);
#   3. benchmarks/softcap_probe.py (softcap's cost on flex: torch.tanh, tanh.approx.f32, a clamp
#      control, cuDNN causal; <= SOFTCAP_S s).
# Everything comes back as $OUT/all.tar.gz plus $OUT/summary.txt.
#   OUT=/path bash benchmarks/device_round20.sh      # from the repository root
if nvidia-smi --query-gpu=name --format=csv,noheader | grep -q H200; then
  exec bash benchmarks/device_round19.sh
fi
FINAL=${OUT:-/tmp/out}
OUT=$(mktemp -d /tmp/r20.XXXXXX)
. benchmarks/device_common.sh
cuda_tests "${TESTS_S:-240}" tests/test_cuda_churn.py tests/test_cuda_core.py tests/test_layout.py
timeout -s TERM -k 5 90 python3 benchmarks/padding_probe.py --parts b --case packing --shape 1x16384 > "$OUT/probe_packing.log" 2>&1
echo "probe packing rc=$? at $(el)s" | tee -a "$OUT/summary.txt"
timeout -s TERM -k 5 "${SOFTCAP_S:-170}" python3 benchmarks/softcap_probe.py --out "$OUT" > "$OUT/softcap.log" 2>&1
echo "softcap probe rc=$? at $(el)s" | tee -a "$OUT/summary.txt"
mkdir -p "$FINAL"
tar -czf "$FINAL/all.tar.gz" -C "$OUT" .
cp "$OUT/summary.txt" "$FINAL/summary.txt"
grep -h "  flex\|  flash_torch\|  auto\|  raw" "$OUT/probe_packing.log" | cut -c1-120 | tail -16
tail -22 "$OUT/softcap.log"
