"""Bundle and summarize benchmarks/device_round5_families.sh (issue 18, deliverable 3).

    python3 benchmarks/families_summary.py bundle WORK OUT   # WORK/<stage>/model.json -> OUT/families.json
    python3 benchmarks/families_summary.py summary OUT       # the short table the script prints last

``families.json`` (``schema: anyattn.bench.families/1``): ``stages`` (stage name -> the stage's
``model.json`` document, schema ``anyattn.bench.model/1``, or ``{"_missing": reason}``) in the
script's order. The summary reads it, ``embed.json`` and ``stages.txt``; a missing or partial file
is reported as such, never an exception.
"""

from __future__ import annotations

import json
import math
import os
import sys

STAGES = ("esm2", "esmc_300m", "esmc_600m", "ankh_base", "e1", "dplm", "ankh_large")


def _load(path: str):
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        return {"_error": f"{os.path.basename(path)}: unreadable ({e})"}


def _f(x, fmt=".2f") -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)


def bundle(work: str, out: str) -> None:
    doc = {"schema": "anyattn.bench.families/1", "stages": {}}
    for s in STAGES:
        d = _load(os.path.join(work, s, "model.json"))
        doc["stages"][s] = d if d is not None else {"_missing": "not run or produced no model.json (see logs.txt)"}
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "families.json"), "w") as f:
        json.dump(doc, f, indent=1)


def _state(doc) -> str:
    if doc is None or "_missing" in doc:
        return "not produced"
    if "_error" in doc:
        return doc["_error"]
    return "complete" if doc.get("complete") else f"INCOMPLETE ({doc.get('interrupted') or 'cut short'})"


def _ok(res, name):
    return next((r["tokens_per_s"] for r in res if r["name"] == name and r["status"] == "ok"), float("nan"))


def family(name: str, doc) -> list[str]:
    lines = [f"[{name}] ({_state(doc)})"]
    if not doc or "_missing" in doc or "_error" in doc:
        return lines
    w, ref = doc.get("workload", {}), doc.get("reference", {})
    lines.append(f"  {doc.get('family', 'esm2')} {w.get('preset')} {w.get('dtype')}, {w.get('num_seqs')} seqs, "
                 f"{w.get('real_tokens')} tokens, {w.get('max_tokens')}-token padded batches, {_f(w.get('gflop_per_token'), '.2f')} GFLOP/token")  # fmt: skip
    res = doc.get("results", [])
    hf = _ok(res, "hf[sdpa]")
    if hf != hf:
        hf = next((r["tokens_per_s"] for r in res if r.get("kind") == "hf" and r["status"] == "ok"), float("nan"))
    port = _ok(res, "fastplms-sdpa")
    for r in res:
        if r["status"] == "ok":
            lines.append(
                f"  {r['name']:<20} {r['tokens_per_s'] / 1e3:7.1f}k tok/s warm | 1st pass {r['cold_pass_tokens_per_s'] / 1e3:6.1f}k | "
                f"x HF {_f(r['tokens_per_s'] / hf)} | x port {_f(r['tokens_per_s'] / port)} | check {r['check']} {_f(r['check_rel_l2'], '.2g')}"
            )  # fmt: skip
        else:
            lines.append(f"  {r['name']:<20} {r['status'].upper()}: {r['error'][:110]}")
    if ref:
        lines.append(f"  reference: {str(ref.get('reference', ''))[:90]}; bound {_f(ref.get('bound'), '.3g')}"
                     + ("" if ref.get("independent", True) else " (NOT independent)"))  # fmt: skip
    return lines


def embed(doc) -> list[str]:
    lines = [f"[embed] ({_state(doc)})"]
    if not doc or "_error" in doc:
        return lines
    w = doc.get("workload", {})
    lines.append(f"  {doc.get('family')} {doc.get('preset')} {w.get('dtype')}, {w.get('num_seqs')} seqs, {w.get('tokens')} tokens, "
                 f"--max-tokens {w.get('max_tokens')}")  # fmt: skip
    for r in doc.get("rows", []):
        if r["status"] == "ok":
            lines.append(
                f"  {r['name']:<32} wall {_f(r['wall_s'], '.1f')} s: {_f(r['seq_per_s_e2e'], ',.0f')} seq/s, "
                f"{_f(r['tok_per_s_e2e'], ',.0f')} tok/s e2e | run {_f(r['run_s'], '.2f')} s: {_f(r['seq_per_s_run'], ',.0f')} seq/s, "
                f"{_f(r['tok_per_s_run'], ',.0f')} tok/s | parse {_f(r['parse_s'], '.2f')} s, load {_f(r['load_s'], '.1f')} s | check {r['check']}"
            )  # fmt: skip
            if r.get("phases"):
                lines.append("    phases: " + ", ".join(f"{k} {v:.2f}" for k, v in r["phases"].items()))
        else:
            lines.append(f"  {r['name']:<32} {r['status'].upper()}: {r['error'][:110]}")
    return lines


def summary(out: str) -> None:
    print("== issue 18 family benchmark summary ==")
    stages = os.path.join(out, "stages.txt")
    if os.path.exists(stages):
        print(open(stages).read().rstrip())
    fams = _load(os.path.join(out, "families.json")) or {}
    for name in STAGES:
        print("\n".join(family(name, (fams.get("stages") or {}).get(name))))
    print("\n".join(embed(_load(os.path.join(out, "embed.json")))))
    print("x HF: over hf[sdpa] (else the HF row that ran); x port: over fastplms-sdpa; 1st pass: compilation included")


if __name__ == "__main__":
    if len(sys.argv) >= 2 and sys.argv[1] == "bundle" and len(sys.argv) == 4:
        bundle(sys.argv[2], sys.argv[3])
    elif len(sys.argv) >= 2 and sys.argv[1] == "summary":
        summary(sys.argv[2] if len(sys.argv) > 2 else os.environ.get("OUT", "/tmp/out"))
    else:
        sys.exit(__doc__)
