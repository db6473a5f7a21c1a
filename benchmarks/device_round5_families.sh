#!/usr/bin/env bash
# Issue 18, deliverable 3, on ONE H100 or H200: per protein family, anyattn's model (plain call,
# and compiled: every family has compile_layers) vs HF transformers and a FastPLMs-style SDPA
# port, side by side in one process per family on the same random weights and sequences; then the
# embed job end to end.
#
#   OUT=/path/to/out bash benchmarks/device_round5_families.sh      # from the repository root
#
# torch 2.11 + triton 3.6 + transformers 5.17 as on the lent machine; no package registry needed.
# The whole script stays under 8 minutes: the stages share TOTAL seconds (default 455), each gets
# min(its planned limit, what is left) under `timeout` (SIGTERM: the benchmark writes what it
# measured and exits; SIGKILL 10 s later if it does not), and rows not started by two thirds of
# that limit are recorded as skipped (--budget-s). A stage with less than its minimum left is
# skipped and says so. In order (what the issue asks for first; the stages usually end well before
# their limits, so the later ones normally run):
#   esm2        bench model --family esm2 (ESM2-650M shape): anyattn plain, hf[sdpa], compiled, port
#   esmc_300m   bench model --family esmc --preset esmc_300m: anyattn plain, hf[sdpa] (transformers'
#               native EsmcModel if this transformers has it; else a skipped row saying so), port,
#               compiled (model.compile_layers(): inductor compiles inside the stage's time)
#   esmc_600m   the same at the 600M shape
#   ankh_base   bench model --family ankh --preset ankh_base: anyattn plain (flex with the relative
#               bias), hf[sdpa] (T5EncoderModel; its eager path where this transformers refuses sdpa
#               for T5), port (SDPA with a materialized bias), compiled
#   embed       python -m anyattn.bench.embed_e2e (ESM2-650M shape): `anyattn embed` in a new process
#               (first job, end to end), then embed() warm in-process; seq/s, tok/s, the job's phases
#   e1          bench model --family e1 (E1-300m): anyattn plain, port (SdpaE1: also the float32
#               reference; transformers has no E1), compiled
#   dplm        bench model --family dplm (DPLM-150M): anyattn plain, hf[sdpa] (EsmForMaskedLM), port, compiled
#   ankh_large  as ankh_base at the large shape on 512 sequences (ANKH_LARGE_SEQS), if time is left
# Every family: 1024 lognormal sequences (median 320; the ESM2 bench's lengths and residues, half
# of its 2048 for time), 32k-token padded batches, bf16, median of 3 warm passes and the first
# pass; every row checked against a float32 reference on a small batch (a failing row is NaN, the
# run goes on).
#
# What comes back ($OUT, 5 files): families.json (every stage's model.json, each with its command),
# embed.json, logs.txt (every stage's output, command and exit status), reports.tar.gz (the plots),
# summary.txt (the table this script prints last).
#
# STAGES="ankh_base e1 ..." runs only the named stages (default: all, in the order above).
# DRY=1 runs the same stages at CPU smoke sizes (--quick): a check of the script, its files and its
# summary on a machine without a GPU; its numbers mean nothing.
set -uo pipefail
export PYTHONPATH=src PYTHONUNBUFFERED=1
if [ "${DRY:-0}" = 1 ]; then
  MX=(--quick --num-seqs 12 --repeats 2); EX=(--quick)
else
  MX=(--num-seqs 1024 --max-tokens 32768 --repeats 3 --max-warmup-passes 4); EX=(--num-seqs 1024 --max-tokens 32768)
fi
TOTAL=${TOTAL:-455}
RESERVE=8  # bundling and the summary
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
WORK=$(mktemp -d /tmp/families.XXXXXX)
# a fresh inductor cache: first passes are those of a machine that never compiled these kernels
# (the lent machine is fresh too); shared by the stages, as a user's later jobs would share it
export TORCHINDUCTOR_CACHE_DIR="$WORK/inductor"
T0=$(date +%s)
: > "$OUT/stages.txt"
: > "$WORK/logs.txt"

stage() {  # stage NAME PLANNED_S MIN_S COMMAND... (--budget-s is appended)
  local name=$1 planned=$2 min=$3 left limit start rc
  shift 3
  case " ${STAGES:-$name} " in *" $name "*) ;; *) return ;; esac
  left=$(( TOTAL - ($(date +%s) - T0) - RESERVE ))
  limit=$(( planned < left ? planned : left ))
  if [ "$limit" -lt "$min" ]; then
    printf '%-12s skipped: %ss left of TOTAL=%ss, needs %ss\n' "$name" "$left" "$TOTAL" "$min" | tee -a "$OUT/stages.txt" "$WORK/logs.txt"
    return
  fi
  start=$(date +%s)
  echo "=== $name: $* --budget-s $(( limit * 2 / 3 )) (timeout ${limit}s)" | tee -a "$WORK/logs.txt"
  timeout -s TERM -k 10 "$limit" "$@" --budget-s $(( limit * 2 / 3 )) > "$WORK/$name.log" 2>&1
  rc=$?
  cat "$WORK/$name.log" >> "$WORK/logs.txt"
  tail -3 "$WORK/$name.log"
  printf '%-12s rc=%-3s %4ss  (limit %ss; 124 = timed out)\n' "$name" "$rc" "$(( $(date +%s) - start ))" "$limit" | tee -a "$OUT/stages.txt"
}

{
  echo "round 5 family benchmark (issue 18), $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
  echo "tree: $(git rev-parse --short HEAD 2>/dev/null || echo 'no git metadata') $(git status --porcelain 2>/dev/null | wc -l | tr -d ' ') changed files"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
  python3 -c "
import importlib.metadata as md, importlib.util
for d in ('torch', 'triton', 'transformers', 'matplotlib', 'numpy', 'safetensors'):
    try:
        print(d, md.version(d))
    except md.PackageNotFoundError:
        print(d, 'not installed')
import transformers
print('transformers has EsmcModel:', hasattr(transformers, 'EsmcModel'), '| T5EncoderModel sdpa:', getattr(transformers.T5EncoderModel, '_supports_sdpa', None))" 2>&1
} | tee -a "$WORK/logs.txt"

M=(python3 -m anyattn bench model)
stage esm2       120 50 "${M[@]}" --family esm2 "${MX[@]}" --rows plain,compiled,port --hf sdpa --out "$WORK/esm2"
stage esmc_300m   60 30 "${M[@]}" --family esmc --preset esmc_300m "${MX[@]}" --rows plain,port,compiled --hf sdpa --out "$WORK/esmc_300m"
stage esmc_600m   70 35 "${M[@]}" --family esmc --preset esmc_600m "${MX[@]}" --rows plain,port,compiled --hf sdpa --out "$WORK/esmc_600m"
stage ankh_base  "${ANKH_BASE_S:-130}" 60 "${M[@]}" --family ankh --preset ankh_base "${MX[@]}" --rows plain,port,compiled --hf "sdpa|eager" --out "$WORK/ankh_base"
stage embed       90 45 python3 -m anyattn.bench.embed_e2e --family esm2 "${EX[@]}" --work "$WORK/embed_work" --out "$WORK/embed"
rm -rf "$WORK/embed_work"  # the checkpoint (1.3 GB) and the stores
stage e1          45 25 "${M[@]}" --family e1 --preset E1-300m "${MX[@]}" --rows plain,port,compiled --hf sdpa --out "$WORK/e1"
stage dplm        60 35 "${M[@]}" --family dplm --preset dplm_150m "${MX[@]}" --rows plain,port,compiled --hf sdpa --out "$WORK/dplm"
# ANKH large: 1024 sequences left no time for the HF / port / compiled rows within 120 s (rounds 10
# and 14: the plain row's first pass alone ~45 s); ANKH_LARGE_SEQS (default 512 unless DRY) and
# ANKH_LARGE_S (default 170) size the stage so that every row runs
LX=(); [ "${DRY:-0}" != 1 ] && LX=(--num-seqs "${ANKH_LARGE_SEQS:-512}")
stage ankh_large "${ANKH_LARGE_S:-170}" 70 "${M[@]}" --family ankh --preset ankh_large "${MX[@]}" "${LX[@]}" --rows plain,port,compiled --hf "sdpa|eager" --out "$WORK/ankh_large"

# bundle: at most 8 files, two folder levels
python3 benchmarks/families_summary.py bundle "$WORK" "$OUT" >> "$WORK/logs.txt" 2>&1
[ -f "$WORK/embed/embed.json" ] && cp "$WORK/embed/embed.json" "$OUT/"
( cd "$WORK" && tar -czf "$OUT/reports.tar.gz" --ignore-failed-read */model.png 2>/dev/null )
echo "total $(( $(date +%s) - T0 ))s" >> "$OUT/stages.txt"
cat "$OUT/stages.txt" >> "$WORK/logs.txt"
cp "$WORK/logs.txt" "$OUT/logs.txt"
python3 benchmarks/families_summary.py summary "$OUT" > "$OUT/summary.txt" 2>&1
rm -f "$OUT/stages.txt"  # folded into logs.txt and summary.txt (5 files come back)
rm -rf "$WORK"
cat "$OUT/summary.txt"
