#!/usr/bin/env bash
# Round 23, call 2 (<= ~9.5 min), with `carry: [".fa4"]` (benchmarks/fa4_pack.sh builds it), on a
# Hopper or Blackwell card:
#   1. the CUDA tests of flex's lowering choice: tests/test_cuda_fa4.py (every FA4 / FLASH test,
#      the softcap-forward-on-Triton test, the gradient matrix) and test_cuda_core's flex, softcap,
#      tanh and kernel-guarantee tests (-k TESTS_K), flash-attn-4 importable (<= TESTS_S s);
#      meanwhile benchmarks/flex_gqa_oor_probe.py (which forms of a bias + GQA call compile);
#   2. benchmarks/flash_grad_probe.py: the same gradient matrix with FLASH forced past flex's
#      refusals (where the FLASH backward itself is exact), in what is left of TOTAL s.
# Everything comes back as $OUT/all.tar.gz plus $OUT/summary.txt, $OUT/probe.txt and $OUT/oor.txt.
# TESTS_SEL replaces the whole -k expression of step 1. SKIP_PROBE=1 leaves step 2 out; BENCH=1 then runs `bench kernels --preset h200` on causal, softcap
# and ALiBi (bf16; BENCH_VARIANTS) with cuDNN and flex's FLASH and Triton lowerings forced
# (BENCH_BACKENDS), in what is left of TOTAL.
#   OUT=/path bash benchmarks/device_round23_b.sh      # from the repository root
FINAL=${OUT:-/tmp/out}
OUT=$(mktemp -d /tmp/r23b.XXXXXX)
. benchmarks/device_common.sh
TOTAL=${TOTAL:-560}
K=${TESTS_K:-flex or softcap or guarantees or tanh}
use_fa4_site
timeout -k 5 200 python3 benchmarks/flex_gqa_oor_probe.py > "$OUT/oor.txt" 2>&1 &  # compiles only: no timing
OOR=$!
cuda_tests "${TESTS_S:-300}" tests/test_cuda_fa4.py tests/test_cuda_core.py -k "${TESTS_SEL:-$K or test_cuda_fa4}"
left=$(( TOTAL - $(el) )); [ "$left" -lt 40 ] && left=40
[ "${SKIP_PROBE:-0}" = 1 ] && left=1  # SKIP_PROBE=1: tests (and the OOR probe) only
timeout -k 5 "$left" python3 -m pytest -q -rA -p no:cacheprovider -n 14 benchmarks/flash_grad_probe.py > "$OUT/probe.log" 2>&1
echo "probe rc=$? at $(el)s: $(tail -1 "$OUT/probe.log")" | tee -a "$OUT/summary.txt"
grep -E '^(PASSED|FAILED|SKIPPED|ERROR)' "$OUT/probe.log" | sed 's/benchmarks\/flash_grad_probe.py::test_forced_flash_gradients//' | cut -c1-230 | sort > "$OUT/probe.txt"
wait $OOR; echo "oor probe rc=$?" >> "$OUT/summary.txt"
if [ "${BENCH:-0}" = 1 ]; then  # BENCH=1: flex's two lowerings side by side on causal, softcap, ALiBi
  left=$(( TOTAL - $(el) )); [ "$left" -lt 40 ] && left=40
  timeout -s TERM -k 5 "$left" python3 -m anyattn bench kernels --preset h200 --variants "${BENCH_VARIANTS:-causal,softcap,alibi}" --dtypes bf16 \
    --backends "${BENCH_BACKENDS:-cudnn,flex:flash,flex:triton}" --budget-s $(( left - 15 )) --no-progress --no-host-overhead --out "$OUT/kernels" \
    > "$OUT/kernels.log" 2>&1
  echo "kernels rc=$? at $(el)s" | tee -a "$OUT/summary.txt"
  tail -30 "$OUT/kernels.log"
fi
mkdir -p "$FINAL"
tar -czf "$FINAL/all.tar.gz" -C "$OUT" .
cp "$OUT/summary.txt" "$OUT/probe.txt" "$OUT/oor.txt" "$FINAL/"
cat "$OUT/oor.txt"
cat "$OUT/probe.txt" | cut -c1-160
