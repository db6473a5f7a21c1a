#!/usr/bin/env bash
# Round 10 (one H100 or H200, <= 9 min): what changed after round 9 and has not run on a GPU yet.
#  (1) the CUDA tests touched since: auto's ranking with and without fa4, explain() leaving the
#      first sight alone, the ESM2 no-dense-mask test at 8192 tokens, SeqInfo built on the device
#      without a sync, and the churn / layout tests around them;
#  (2) the SeqInfo probe and the new-packing table again (the SeqInfo form: round 8 read 47.9 ms
#      for auto, round 9's probe 2.22 ms; SeqInfo now builds its maps on the device);
#  (3) the padded prefill of `bench serving` with auto (padding with head_dim <= 64 now ranks SDPA
#      first) next to sdpa and flash_torch;
#  (4) the families rows not measured yet: ANKH base / large compiled and next to the port.
#   OUT=/path bash benchmarks/device_round10.sh      # from the repository root
. benchmarks/device_common.sh
cuda_tests "${TEST_LIMIT:-120}" \
  tests/test_cuda_churn.py tests/test_cuda_core.py::test_cuda_auto_prefers_fast_backends \
  tests/test_cuda_models.py::test_packed_forward_on_auto_materializes_no_dense_masks tests/test_cuda_train.py
timeout 100 python3 benchmarks/seqinfo_probe.py > "$OUT/seqinfo_probe.log" 2>&1
echo "seqinfo probe rc=$? at $(el)s" | tee -a "$OUT/summary.txt"
timeout -s TERM -k 5 75 python3 -m anyattn bench kernels --mode new-packing --cases packing --steps 30 --budget-s 60 --out "$OUT/np" > "$OUT/new_packing.log" 2>&1
echo "new-packing rc=$? at $(el)s" | tee -a "$OUT/summary.txt"
timeout -s TERM -k 10 90 python3 -m anyattn bench serving --preset h100 --mode prefill --steps 6 --backends auto,sdpa,flash_torch \
  --out "$OUT/prefill" > "$OUT/prefill.log" 2>&1; echo "prefill rc=$? at $(el)s" | tee -a "$OUT/summary.txt"
T=$(( ${DEADLINE:-530} - $(el) - 10 ))
[ "$T" -gt 60 ] && STAGES="${STAGES:-ankh_base ankh_large}" TOTAL=$T OUT=$OUT/fam bash benchmarks/device_round5_families.sh > "$OUT/families.log" 2>&1
( cd "$OUT" && tar -czf logs.tar.gz np prefill fam *.log 2>/dev/null )
echo "total $(el)s" | tee -a "$OUT/summary.txt"
grep -E "ms/step|ran:" "$OUT/seqinfo_probe.log" | head -30
grep -E "ms/step|FAIL" "$OUT/new_packing.log" | head -24
grep -E "^prefill" "$OUT/prefill.log"
tail -20 "$OUT/fam/summary.txt" 2>/dev/null
