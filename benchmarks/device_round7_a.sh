#!/usr/bin/env bash
# Round 7, first call (one H100 or H200, <= 9.8 min), after the sdpa no-sync / small-call changes:
#  (1) the CUDA tests these changes touch: core, flash, churn, serving, hf (-n 14);
#  (2) issue 15's tables on the same card: a new packing every step (bench kernels --mode new-packing)
#      and host overhead (--mode host);
#  (3) the 1B model's prefill (mixed packed vs padded) with every anyattn backend beside HF sdpa,
#      and the small calls with a new packing and a fresh dense() mask every call.
#   OUT=/path bash benchmarks/device_round7_a.sh      # from the repository root
. benchmarks/device_common.sh
cuda_tests "${TEST_LIMIT:-290}" \
  tests/test_cuda_core.py tests/test_cuda_flash.py tests/test_cuda_churn.py tests/test_cuda_serving.py tests/test_cuda_hf.py
timeout -s TERM -k 5 75 python3 -m anyattn bench kernels --mode new-packing --steps 30 --budget-s 60 --out "$OUT/np" > "$OUT/new_packing.log" 2>&1
echo "new-packing rc=$? at $(el)s" | tee -a "$OUT/summary.txt"
timeout -s TERM -k 5 70 python3 -m anyattn bench kernels --mode host --host-rounds 3 --backends auto,sdpa,cudnn --out "$OUT/host" > "$OUT/host.log" 2>&1
echo "host rc=$? at $(el)s" | tee -a "$OUT/summary.txt"
timeout -s TERM -k 10 80 python3 -m anyattn bench serving --preset h100 --mode prefill --steps 6 --backends auto,sdpa,flash_torch,flex \
  --out "$OUT/prefill" > "$OUT/prefill.log" 2>&1; echo "prefill rc=$? at $(el)s" | tee -a "$OUT/summary.txt"
timeout -k 5 40 python3 benchmarks/small_calls.py --fresh --sizes 64,2048,4096 --backends sdpa,flash_torch,flex,auto --dense --calls 40 --rounds 3 \
  --out "$OUT/small_calls_fresh.json" > "$OUT/small_calls_fresh.log" 2>&1; echo "small calls rc=$? at $(el)s" | tee -a "$OUT/summary.txt"
( cd "$OUT" && tar -czf logs.tar.gz np host prefill *.log 2>/dev/null )
echo "total $(el)s" | tee -a "$OUT/summary.txt"
grep -E "^prefill" "$OUT/prefill.log"
tail -14 "$OUT/small_calls_fresh.log"
grep -E "target|ms/step|raw|auto|flex|flash_torch" "$OUT/new_packing.log" | head -24
grep -E "us|target" "$OUT/host.log" | tail -24
