#!/usr/bin/env bash
# Round 5 (issue 15) on ONE H200 or H100: the dynamic path, the static headline subset, ESM2.
#
#   OUT=/path/to/out bash benchmarks/device_round5.sh        # from the repository root
#
# torch 2.11 + triton 3.6 + transformers 5.17 as on the lent machine; no package registry needed.
# Whole script <= 9 minutes wall; every stage is bounded by `timeout` (SIGTERM: the benchmark
# writes what it measured and exits; SIGKILL 10 s later if it does not), so one hang costs at
# most its stage. In order:
#   (i)   bench kernels --mode new-packing (one 16k-token doc-causal row with NEW document lengths
#         every step, fwd+bwd and fwd; new padding every step at 8 x 2048) and --mode host (tiny
#         calls, cached and fresh masks vs raw SDPA)
#   (ii)  bench kernels --preset h200, the README headline's main cases only (dense, causal,
#         documents, padding; auto, cudnn, flex, flash_torch; no raw calls), time-budgeted
#   (iii) bench model: ESM2-650M shape, 2048 lognormal sequences, 32k-token padded batches:
#         anyattn plain call, HF sdpa, compile_layers(), the FastPLMs-style SDPA port, uncompiled
#         (in that order: the goal's rows first); first pass (compilation included) and the
#         warm median of 3 passes; HF eager left out for time
#
# What comes back ($OUT, 7 files): new_packing.json host.json kernels.json model.json (the
# results, each with the command that made it in meta.command / command), logs.txt (every
# stage's stdout+stderr, with its command and exit status), reports.tar.gz (the .md tables,
# kernels.csv, the plots), summary.txt (the table this script prints last).
#
# SKIP_KERNELS=1 leaves stage (ii) out (a call that also runs tests has no time for it).
# DRY=1 runs the same stages at CPU smoke sizes (--quick, --device cpu): a check of the script,
# its files and its summary on a machine without a GPU; its numbers mean nothing.
set -uo pipefail
export PYTHONPATH=src PYTHONUNBUFFERED=1
if [ "${DRY:-0}" = 1 ]; then
  NPX=(--quick --device cpu); HX=(--quick --device cpu); KX=(--quick --device cpu); MX=(--quick --num-seqs 12)
else
  NPX=(--steps 50 --budget-s 115); HX=(--host-rounds 5); KX=(--preset h200 --budget-s 70); MX=(--max-tokens 32768)
fi
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
WORK=$(mktemp -d /tmp/round5.XXXXXX)
# a fresh inductor cache: first passes and first calls are those of a machine that never
# compiled these kernels (the lent machine is fresh too); shared by the stages
export TORCHINDUCTOR_CACHE_DIR="$WORK/inductor"
T0=$(date +%s)
: > "$OUT/stages.txt"
: > "$WORK/logs.txt"

stage() {  # stage NAME SECONDS COMMAND...
  local name=$1 limit=$2 start rc
  shift 2
  start=$(date +%s)
  echo "=== $name: $* (timeout ${limit}s)" | tee -a "$WORK/logs.txt"
  timeout -s TERM -k 10 "$limit" "$@" > "$WORK/$name.log" 2>&1
  rc=$?
  cat "$WORK/$name.log" >> "$WORK/logs.txt"
  tail -3 "$WORK/$name.log"
  printf '%-12s rc=%-3s %4ss  (limit %ss; 124 = timed out)\n' "$name" "$rc" "$(( $(date +%s) - start ))" "$limit" | tee -a "$OUT/stages.txt"
}

{
  echo "round 5 device script, $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
  echo "tree: $(git rev-parse --short HEAD 2>/dev/null || echo 'no git metadata') $(git status --porcelain 2>/dev/null | wc -l | tr -d ' ') changed files"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
  python3 -c "
import importlib.metadata as md
for d in ('torch', 'triton', 'transformers', 'matplotlib'):
    try:
        print(d, md.version(d))
    except md.PackageNotFoundError:
        print(d, 'not installed')" 2>&1
} | tee -a "$WORK/logs.txt"

# (i) the dynamic path: packing (the headline case) first; rows past --budget-s are
#     recorded as skipped, a SIGTERM keeps every finished row
stage new_packing 150 python3 -m anyattn bench kernels --mode new-packing "${NPX[@]}" --out "$WORK/new_packing"
stage host 60 python3 -m anyattn bench kernels --mode host "${HX[@]}" --backends auto,sdpa,cudnn --out "$WORK/host"

# (ii) the static headline subset (the full preset takes ~7 minutes: see docs/benchmarks.md)
[ "${SKIP_KERNELS:-0}" = 1 ] || stage kernels 95 python3 -m anyattn bench kernels "${KX[@]}" --variants dense,causal,documents,padding \
  --backends auto,cudnn,flex,flash_torch --no-host-overhead --no-progress --out "$WORK/kernels"

# (iii) ESM2-650M: 2048 sequences, median of 3 whole-set passes (HF eager left out for time)
stage model 200 python3 -m anyattn bench model "${MX[@]}" --hf sdpa --repeats 3 --out "$WORK/model"

# bundle: at most 8 files, two folder levels
for f in new_packing/new_packing.json host/host.json kernels/kernels.json model/model.json; do
  [ -f "$WORK/$f" ] && cp "$WORK/$f" "$OUT/"
done
tar -czf "$OUT/reports.tar.gz" -C "$WORK" --ignore-failed-read \
  new_packing/new_packing.md host/host.md kernels/kernels.md kernels/kernels.csv kernels/kernels.png model/model.png 2>/dev/null
echo "total $(( $(date +%s) - T0 ))s" >> "$OUT/stages.txt"
cat "$OUT/stages.txt" >> "$WORK/logs.txt"
cp "$WORK/logs.txt" "$OUT/logs.txt"
python3 benchmarks/round5_summary.py "$OUT" > "$OUT/summary.txt" 2>&1
rm -f "$OUT/stages.txt"  # folded into logs.txt and summary.txt (7 files come back)
cat "$OUT/summary.txt"
