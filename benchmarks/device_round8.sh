#!/usr/bin/env bash
# Round 8 (one H100 or H200, <= 6 min), after round 7's findings:
#  (1) the CUDA tests that failed in round 7 (flex backward through a structured BlockMask, auto's
#      first-sight rows, the continuous-batching example) and the flex / auto tests around them;
#  (2) the new-packing table again (flex rows failed their float64 check in round 7);
#  (3) padding and documents at the prefill shape of the 1B Llama (B=16, S=2048, Hq=32, D=64, fwd);
#  (4) the prefill of `bench serving` with auto (documents+paged now ranks flash_torch first).
#   OUT=/path bash benchmarks/device_round8.sh      # from the repository root
. benchmarks/device_common.sh
cuda_tests "${TEST_LIMIT:-150}" \
  tests/test_cuda_core.py tests/test_cuda_churn.py tests/test_cuda_serving.py -k "flex or auto or continuous or padding"
timeout -s TERM -k 5 75 python3 -m anyattn bench kernels --mode new-packing --steps 30 --budget-s 60 --out "$OUT/np" > "$OUT/new_packing.log" 2>&1
echo "new-packing rc=$? at $(el)s" | tee -a "$OUT/summary.txt"
timeout -s TERM -k 5 70 python3 -m anyattn bench kernels --variants padding,documents --batch 16 --seqlen 2048 --heads 32 --head-dim 64 \
  --modes fwd --dtypes bf16 --backends auto,flex,sdpa,cudnn,flash_torch --no-host-overhead --budget-s 55 --out "$OUT/prefill_shape" \
  > "$OUT/prefill_shape.log" 2>&1
echo "prefill-shape kernels rc=$? at $(el)s" | tee -a "$OUT/summary.txt"
timeout -s TERM -k 10 60 python3 -m anyattn bench serving --preset h100 --mode prefill --steps 6 --backends auto \
  --out "$OUT/prefill" > "$OUT/prefill.log" 2>&1; echo "prefill rc=$? at $(el)s" | tee -a "$OUT/summary.txt"
( cd "$OUT" && tar -czf logs.tar.gz np prefill_shape prefill *.log 2>/dev/null )
echo "total $(el)s" | tee -a "$OUT/summary.txt"
grep -E "^prefill" "$OUT/prefill.log"
grep -E "ms/step|FAIL" "$OUT/new_packing.log" | head -40
tail -25 "$OUT/prefill_shape.log"
