"""The short summary that ends benchmarks/device_round5.sh (issue 15's numbers), from its JSON files.

    python3 benchmarks/round5_summary.py OUT_DIR

Reads OUT_DIR/{new_packing,host,kernels,model}.json and OUT_DIR/stages.txt; a missing or partial
file is reported as such. Prints plain text, one block per stage, the targets last.
"""

from __future__ import annotations

import json
import math
import os
import sys


def _load(out: str, name: str):
    path = os.path.join(out, name)
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        return {"_error": f"{name}: unreadable ({e})"}


def _f(x, fmt=".2f") -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)


def _state(doc) -> str:
    if doc is None:
        return "not produced"
    if "_error" in doc:
        return doc["_error"]
    return "complete" if doc.get("complete") else f"INCOMPLETE ({doc.get('interrupted') or 'cut short'})"


def new_packing(doc) -> list[str]:
    lines = [f"[i] new packing every step ({_state(doc)})"]
    if not doc or "_error" in doc:
        return lines
    res = doc["results"]
    for case, mode in [(c, m) for c in ("packing", "padding") for m in ("fwd+bwd", "fwd")]:
        rs = [r for r in res if r["case"] == case and r["mode"] == mode]
        if not rs:
            continue
        r0 = rs[0]
        lines.append(f"  {case} {mode} B={r0['B']} S={r0['S']} H={r0['H']} D={r0['D']}: ms/step (x best)")
        cells = []
        for r in rs:
            name = r["backend"] + (f">{r['chosen']}" if r["backend"] == "auto" and r["chosen"] else "")
            name += f"[{r['form']}]" if r["form"] else ""
            if r["status"] == "ok":
                cells.append(f"{name} {r['ms']:.3f} ({_f(r['x_best'])})")
            else:
                cells.append(f"{name} {r['status'].upper()}" + (f" {r['check']}" if r["check"] not in ("-", "ok") else ""))
        for i in range(0, len(cells), 3):
            lines.append("    " + " | ".join(cells[i : i + 3]))
    for t in doc.get("targets", []):
        lines.append(f"  target {t['what']}: {_f(t['value'], '.3f')} (<= {t['target']}) {_met(t['met'])}")
    return lines


def _met(m) -> str:
    return {True: "MET", False: "NOT MET", None: "not measured"}[m]


def host(doc) -> list[str]:
    lines = [f"[i] host overhead ({_state(doc)})"]
    if not doc or "_error" in doc:
        return lines
    rows = {r["name"]: r for r in doc["results"]}
    base = rows.get("raw sdpa is_causal", {})
    lines.append(f"  raw sdpa is_causal {_f(base.get('us'), '.1f')} us/call")
    for r in doc["results"]:
        if r["impl"] != "anyattn":
            continue
        val = f"{_f(r['us'], '.1f')} us ({_f(r['over_sdpa_us'], '+.1f')})" if r["status"] == "ok" else r["status"].upper() + " " + r["check"]
        lines.append(f"  {r['name']:<34} {val}")
    for t in doc.get("targets", []):
        lines.append(f"  target {t['what']}: {_f(t['value'], '+.1f')} us (<= {t['target']:g}) {_met(t['met'])}")
    return lines


def kernels(doc) -> list[str]:
    lines = [f"[ii] static kernels, H200 preset subset ({_state(doc)})"]
    if not doc or "_error" in doc:
        return lines
    cases = {}
    for r in doc["results"]:
        if r["impl"] != "anyattn":
            continue
        cases.setdefault((r["variant"], r["mode"]), []).append(r)
    for (v, m), rs in cases.items():
        ok = [r for r in rs if r["status"] == "ok"]
        auto = next((r for r in ok if r["backend"] == "auto"), None)
        others = [r for r in ok if r["backend"] != "auto"]
        best = max(others, key=lambda r: r["tflops"], default=None)
        failed = [r["backend"] for r in rs if r["status"] == "failed"]
        a = f"auto>{auto['chosen']} {auto['tflops']:.0f}" if auto else "auto -"
        b = f"best {best['backend']} {best['tflops']:.0f}" if best else "best -"
        ratio = f"{auto['tflops'] / best['tflops']:.2f}x" if auto and best else "-"
        lines.append(f"  {v:<10} {m:<8} {a:<22} {b:<22} auto/best {ratio}" + (f"  FAILED: {failed}" if failed else ""))
    skipped = sum(r["status"] == "skipped" for r in doc["results"])
    if skipped:
        lines.append(f"  ({skipped} rows skipped: refused or past the time budget; reasons in kernels.json)")
    return lines


def model(doc) -> list[str]:
    lines = [f"[iii] ESM2 model ({_state(doc)})"]
    if not doc or "_error" in doc:
        return lines
    w = doc.get("workload", {})
    lines.append(f"  {w.get('preset')} {w.get('dtype')}, {w.get('num_seqs')} sequences, {w.get('max_tokens')}-token batches")
    base = next((r["tokens_per_s"] for r in doc["results"] if r["name"] == "hf[sdpa]" and r["status"] == "ok"), float("nan"))
    for r in doc["results"]:
        if r["status"] == "ok":
            lines.append(
                f"  {r['name']:<22} {r['tokens_per_s'] / 1e3:7.1f}k tokens/s warm, first pass {r['cold_pass_tokens_per_s'] / 1e3:6.1f}k, "
                f"{r['tokens_per_s'] / base:.2f}x HF sdpa, check {r['check']}"
            )
        else:
            lines.append(f"  {r['name']:<22} {r['status'].upper()}: {r['error'][:90]}")
    g = doc.get("goal") or {}
    if g:
        lines.append(f"  goal {g['what']}: {_f(g['value'])}x (>= {g['target']:g}x) {_met(g['met'])}")
    return lines


def main(out: str) -> None:
    stages = os.path.join(out, "stages.txt")
    print("== round 5 summary ==")
    if os.path.exists(stages):
        print(open(stages).read().rstrip())
    for fn, name in ((new_packing, "new_packing.json"), (host, "host.json"), (kernels, "kernels.json"), (model, "model.json")):
        print("\n".join(fn(_load(out, name))))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else os.environ.get("OUT", "/tmp/out"))
