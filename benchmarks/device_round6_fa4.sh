#!/usr/bin/env bash
# Round 6 (issue 19): FlashAttention-4 on the GPU machine, in one call of <= 8 minutes.
#   OUT=/path bash benchmarks/device_round6_fa4.sh          # from the repository root
#
# (a) installs the carried packages into /tmp/site: the small wheels from .fa4b/*.whl
#     (flash_attn_4 4.0.0b40, nvidia_cutlass_dsl + libs_base/core 4.8.1, quack_kernels,
#     apache_tvm_ffi, torch_c_dlpack_ext, einops) and the extracted nvidia-cutlass-dsl-libs-cu13
#     wheel, carried as a tar.xz split over .fa4a/ and .fa4b/ (the wheel is above one call's 64 MiB);
# (b) runs tests/test_cuda_fa4.py (fa4 and flex's FLASH lowering vs the float64 oracle) -> $OUT/fa4_tests.log;
# (c) runs `anyattn bench kernels --preset h200` on the issue's variants for cudnn, flex:triton,
#     flex:flash and fa4 (forward, then forward+backward, each under a time budget) -> $OUT/bench_*;
#     prints one TFLOP/s table last.
# Limits (seconds) can be changed: TEST_LIMIT, FWD_BUDGET, BWD_BUDGET.
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
T0=$(date +%s)
SITE=/tmp/site
mkdir -p "$SITE"
FA4=1
if [ -f .fa4/fa4site.tar.xz ]; then
  # one archive of the extracted wheels (flash_attn_4, nvidia_cutlass_dsl + libs base/core/cu13,
  # quack_kernels, apache_tvm_ffi, torch_c_dlpack_ext), xz with a 256 MiB dictionary: 57 MiB,
  # small enough to travel in one call beside the working tree
  xz -d < .fa4/fa4site.tar.xz | tar x -C "$SITE" || { echo "fa4site: extraction FAILED"; FA4=0; }
elif ls .fa4b/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" .fa4b/*.whl 2>&1 | tail -3
  if [ -d .fa4a ] && ls .fa4a/cu13.tar.xz.part* >/dev/null 2>&1 && ls .fa4b/cu13.tar.xz.part* >/dev/null 2>&1; then
    cat .fa4a/cu13.tar.xz.part* .fa4b/cu13.tar.xz.part* | xz -d | tar x -C "$SITE" || { echo "cu13 libs: extraction FAILED"; FA4=0; }
  else
    echo "NO .fa4a/ (first half of the nvidia-cutlass-dsl-libs-cu13 archive): it must be carried by an earlier call"
    echo "on this warm machine; FA4 parts skipped (cudnn and flex:triton are still measured)"; FA4=0
  fi
else
  echo "NO .fa4/fa4site.tar.xz and no .fa4b/*.whl: flash-attn-4 was not carried; FA4 parts skipped"; FA4=0
fi
# nvidia_cutlass_dsl puts its dsl_packages/ on sys.path through a .pth file, which --target installs
# do not run: add the directory here.
export PYTHONPATH=$SITE:$SITE/nvidia_cutlass_dsl/dsl_packages:src PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 - <<'EOF'
import importlib.metadata as md, torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "capability", torch.cuda.get_device_capability())
for d in ("flash-attn-4", "nvidia-cutlass-dsl", "nvidia-cutlass-dsl-libs-base", "nvidia-cutlass-dsl-libs-cu13", "quack-kernels", "apache-tvm-ffi"):
    try:
        print(f"  {d} {md.version(d)}")
    except md.PackageNotFoundError:
        print(f"  {d}: not installed")
try:
    import flash_attn.cute as fc
    print("import flash_attn.cute: ok", fc.__file__)
except Exception as e:
    print("import flash_attn.cute FAILED:", type(e).__name__, e)
from anyattn.backends import REGISTRY
print("fa4 available:", REGISTRY["fa4"].available() or "yes")
EOF
echo "setup: $(( $(date +%s) - T0 )) s"

if [ "$FA4" = 1 ]; then
  timeout -s TERM "${TEST_LIMIT:-140}" python3 -m pytest -m cuda -v -rf -p no:cacheprovider --durations=10 tests/test_cuda_fa4.py \
    > "$OUT/fa4_tests.log" 2>&1
  echo "tests (rc $?): $(grep -E '(passed|failed|skipped|error)' "$OUT/fa4_tests.log" | tail -1)"
  grep -E "^FAILED|^ERROR" "$OUT/fa4_tests.log" | cut -c1-300 | head -20
  BACKENDS=cudnn,flex:triton,flex:flash,fa4
else
  BACKENDS=cudnn,flex:triton
fi
echo "after tests: $(( $(date +%s) - T0 )) s"

# causal first (cuDNN's causal rate is the issue's yardstick), then the variants only flex serves
VARIANTS=causal,softcap,alibi,doc_window,documents,window,dense
for MODE in ${MODES:-fwd fwd+bwd}; do
  B=$([ "$MODE" = fwd ] && echo "${FWD_BUDGET:-100}" || echo "${BWD_BUDGET:-120}")
  DIR="$OUT/bench_${MODE/+/_}"
  timeout -s TERM $((B + 30)) python3 -m anyattn bench kernels --preset h200 --variants "$VARIANTS" --modes "$MODE" \
    --backends "$BACKENDS" --budget-s "$B" --no-host-overhead --no-progress --out "$DIR" > "$DIR.log" 2>&1
  echo "bench $MODE (rc $?): $(( $(date +%s) - T0 )) s"
done

python3 - "$OUT" <<'EOF'
import json, math, os, sys
out = sys.argv[1]
rows = []
for mode in ("fwd", "fwd_bwd"):
    p = os.path.join(out, f"bench_{mode}", "kernels.json")
    if os.path.exists(p):
        rows += json.load(open(p))["results"]
names = ["cudnn", "flex:triton", "flex:flash", "fa4"]
print("\nTFLOP/s (H=16, D=128, bf16, 16k tokens per call); '-' = not measured (see bench_*.log / kernels.md)")
print(f"{'variant':<11} {'mode':<8} " + " ".join(f"{n:>11}" for n in names))
seen = {}
for r in rows:
    seen[(r["variant"], r["mode"], r["backend"])] = r
for var in ("causal", "softcap", "alibi", "doc_window", "documents", "window", "dense"):
    for mode in ("fwd", "fwd+bwd"):
        cells = []
        for n in names:
            r = seen.get((var, mode, n))
            t = r and r.get("tflops")
            cells.append(f"{t:11.0f}" if isinstance(t, (int, float)) and not math.isnan(t) else f"{'-':>11}")
        if any(c.strip() != "-" for c in cells):
            print(f"{var:<11} {mode:<8} " + " ".join(cells))
bad = [r for r in rows if r["status"] != "ok" and r["backend"] in names]
for r in bad[:20]:
    print(f"  {r['variant']} {r['mode']} {r['backend']}: {r['status']}: {r['reason'][:160]}")
EOF
echo "total: $(( $(date +%s) - T0 )) s"
