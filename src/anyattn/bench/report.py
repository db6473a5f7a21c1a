"""Writing ``bench kernels`` results: the stdout table, kernels.json/.csv/.md, and a plot.

Columns (docs/benchmarks.md explains each): variant | mode | dtype | backend | ms | TFLOP/s |
vs raw | check. ``ms`` is the median per call; ``TFLOP/s`` counts useful work only; ``vs raw``
is anyattn's time over the raw torch call it dispatches to, in percent (+ = slower).
"""

from __future__ import annotations

import csv
import dataclasses
import importlib.util
import json
import math
import os

__all__ = ["case_line", "compact_table", "flat_table", "print_final", "write_json", "write_outputs", "write_text"]


def _f(x, fmt: str) -> str:
    return "nan" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)


def _tf(x) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "nan"
    return f"{x:.1f}" if x >= 10 else f"{x:.3g}"


def _ovh(x) -> str:
    return "" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:+.0f}%"


def _name(r, lowering: bool = True) -> str:
    """The row's name: ``auto>chosen`` for auto; with ``lowering``, flex rows carry the lowering
    that ran (``flex[FLASH]``, ``flex[Triton]``)."""
    b, c = _get(r, "backend"), _get(r, "chosen")
    name = f"auto>{c}" if b == "auto" and c else b
    low = (r.get("lowering") if isinstance(r, dict) else getattr(r, "lowering", "")) or ""
    return f"{name}[{low.split(' ', 1)[0]}]" if low and lowering else name


def _get(r, k):
    return r[k] if isinstance(r, dict) else getattr(r, k)


def case_line(i: int, n: int, cfg, rows) -> str:
    ok = [r for r in rows if r.status == "ok"]
    failed = [r for r in rows if r.status == "failed"]
    best = max(ok, key=lambda r: r.tflops, default=None)
    s = f"[{i}/{n}] {cfg.variant} {cfg.mode} {cfg.dtype} {cfg.shape}: {len(ok)} ok, {len(failed)} failed, {len(rows) - len(ok) - len(failed)} skipped"
    if best is not None:
        s += f"; best {_name(best)} {_tf(best.tflops)} TFLOP/s ({best.ms:.3f} ms)"
    if failed:
        s += "; FAILED: " + ", ".join(f"{_name(r)} ({r.reason[:80]})" for r in failed)
    return s


def compact_table(results) -> str:
    """Grouped per case (variant | mode | dtype | shape), one short line per measured row."""
    lines = [f"  {'backend':<19} {'ms':>8} {'TFLOP/s':>7} {'vs raw':>6}  check"]
    key = None
    skipped = 0
    for r in results:
        if _get(r, "status") == "skipped":
            skipped += 1
            continue
        k = (_get(r, "variant"), _get(r, "mode"), _get(r, "dtype"), _get(r, "B"), _get(r, "S"))
        if k != key:
            key = k
            ver = _get(r, "verify")
            short = ver.replace(" query rows of the full shape", " rows") if ver.startswith("last") else ""
            lines.append(
                f"{k[0]} | {k[1]} | {k[2]} | B={k[3]} S={k[4]}" + (f" (checked on the {short})" if short else "")
            )
        ms, tf, ovh = _f(_get(r, "ms"), ".3f"), _tf(_get(r, "tflops")), _ovh(_get(r, "overhead_pct"))
        lines.append(f"  {_name(r):<19} {ms:>8} {tf:>7} {ovh:>6}  {_get(r, 'check')}")
    if skipped:
        lines.append(
            f"({skipped} skipped rows not shown: refused or not applicable; reasons in kernels.json/kernels.md)"
        )
    return "\n".join(lines)


def flat_table(results) -> str:
    """Markdown: every row, skipped ones with their reason."""
    head = "| variant | mode | dtype | B | S | backend | status | ms | first call ms | TFLOP/s | vs raw | raw | check | note |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in results:
        note = _get(r, "reason") or ("" if _get(r, "verify") in ("", "full shape") else f"checked {_get(r, 'verify')}")
        note = note.replace("|", "/").replace("\n", " ")[:160]
        lines.append(
            f"| {_get(r, 'variant')} | {_get(r, 'mode')} | {_get(r, 'dtype')} | {_get(r, 'B')} | {_get(r, 'S')} | {_name(r)} | "
            f"{_get(r, 'status')} | {_f(_get(r, 'ms'), '.3f')} | {_f(_get(r, 'first_ms'), '.1f')} | {_tf(_get(r, 'tflops'))} | "
            f"{_ovh(_get(r, 'overhead_pct'))} | {_get(r, 'raw')} | {_get(r, 'check')} | {note} |"
        )
    return "\n".join(lines)


def host_table(rows) -> str:
    if not rows:
        return ""
    lines = [f"host overhead per call (tiny causal case {rows[0]['shape']}, {rows[0]['n_calls']} calls, one sync):",
             f"  {'backend':<16} {'anyattn us':>11} {'raw us':>9} {'overhead us':>12}  raw"]  # fmt: skip
    for h in rows:
        name = f"auto>{h['chosen']}" if h["backend"] == "auto" and h["chosen"] else h["backend"]
        if h["reason"]:
            lines.append(f"  {name:<16} {'-':>11} {'-':>9} {'-':>12}  ({h['reason'][:70]})")
        else:
            lines.append(
                f"  {name:<16} {h['anyattn_us']:>11.1f} {h['raw_us']:>9.1f} {h['overhead_us']:>+12.1f}  {h['raw']}"
            )
    return "\n".join(lines)


def _markdown(doc, results) -> str:
    m = doc["meta"]
    out = [
        "# anyattn bench kernels",
        "",
        f"- command: `{m['command']}`",
        f"- device: {m['device_name']}",
        f"- torch {m['torch']}, CUDA {m['cuda']}, cuDNN {m['cudnn']}, triton {m['triton']}, python {m['python']}, anyattn {m['anyattn']}",
        f"- date: {m['date']}; elapsed {doc['elapsed_s']} s; complete: {doc['complete']}",
        f"- timing: {m['timing']} (median per call, after the first call and the oracle check; first call reported apart)",
        f"- FLOPs: {doc['flop_convention']}",
        "- vs raw: (anyattn ms - raw ms) / raw ms for the raw torch call the chosen backend dispatches to",
        "- check: max-abs error vs the float64 eager oracle within 2x (grads 3x) the error of eager in the same dtype",
    ]
    for n in doc["notes"]:
        out.append(f"- note: {n}")
    out += ["", flat_table(results), ""]
    if doc["host_overhead"]:
        out += ["```", host_table(doc["host_overhead"]), "```", ""]
    return "\n".join(out)


def _json_default(o):
    if dataclasses.is_dataclass(o):
        return dataclasses.asdict(o)
    return str(o)


def write_outputs(out_dir: str, doc: dict, results, *, final: bool, log=print) -> None:
    """kernels.json (NaN for unmeasured numbers), kernels.csv, kernels.md; kernels.png at the end."""
    os.makedirs(out_dir, exist_ok=True)
    _atomic(os.path.join(out_dir, "kernels.json"), json.dumps(doc, indent=1, default=_json_default))
    path = os.path.join(out_dir, "kernels.csv")
    with open(path + ".tmp", "w", newline="") as f:
        fields = [fl.name for fl in dataclasses.fields(results[0])] if results else []
        w = csv.writer(f)
        if fields:
            w.writerow(fields)
            for r in results:
                w.writerow([getattr(r, k) for k in fields])
    os.replace(path + ".tmp", path)
    _atomic(os.path.join(out_dir, "kernels.md"), _markdown(doc, results))
    if final and results:
        note = plot(os.path.join(out_dir, "kernels.png"), results, doc["meta"])
        if note:
            doc["notes"].append(note)
            log(note)


def _atomic(path: str, text: str) -> None:
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


def write_json(out_dir: str, name: str, doc: dict) -> str:
    """``out_dir/name`` written atomically (NaN stays NaN: Python's json and pandas read it)."""
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, name)
    _atomic(path, json.dumps(doc, indent=1, default=_json_default))
    return path


def write_text(out_dir: str, name: str, text: str) -> str:
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, name)
    _atomic(path, text)
    return path


def plot(path: str, results, meta) -> str | None:
    """Horizontal bars of TFLOP/s per case and backend; returns a note when it cannot plot."""
    if importlib.util.find_spec("matplotlib") is None:
        return "kernels.png not written: matplotlib is not installed (pip install matplotlib)"
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in results if r.status == "ok" and r.tflops == r.tflops]
    if not ok:
        return "kernels.png not written: no measured rows"
    cases = list(dict.fromkeys((r.variant, r.mode, r.dtype, r.B, r.S) for r in ok))
    names = list(dict.fromkeys(_name(r, False) if r.backend != "auto" else "auto" for r in ok))
    fig, ax = plt.subplots(figsize=(10, max(3.0, 0.22 * len(ok) + 0.4 * len(cases))))
    cmap = plt.get_cmap("tab20")
    y, ticks, labels = 0.0, [], []
    seen = set()
    for case in cases:
        rows = [r for r in ok if (r.variant, r.mode, r.dtype, r.B, r.S) == case]
        start = y
        for r in rows:
            nm = "auto" if r.backend == "auto" else _name(r, False)
            lab = nm if nm not in seen else None
            seen.add(nm)
            ax.barh(y, r.tflops, color=cmap(names.index(nm) % 20), label=lab, height=0.8)
            y += 1
        ticks.append((start + y - 1) / 2)
        labels.append(f"{case[0]} {case[1]} {case[2]}\nB={case[3]} S={case[4]}")
        y += 1
    ax.set_yticks(ticks)
    ax.set_yticklabels(labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("useful TFLOP/s")
    ax.set_title(f"anyattn bench kernels: {meta['device_name']}, torch {meta['torch']}", fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def print_final(doc: dict, out_dir: str | None = None) -> None:
    """The end of stdout: where things went, the host overhead, then the compact table last."""
    res = doc["results"]
    n_fail = sum(r["status"] == "failed" for r in res)
    if out_dir:
        print(
            f"\nwrote {os.path.join(out_dir, 'kernels.json')} (.csv, .md"
            + (", .png" if os.path.exists(os.path.join(out_dir, "kernels.png")) else "")
            + ")"
        )
    if not doc["complete"]:
        print("run INCOMPLETE (interrupted): the table holds what was measured")
    for n in doc["notes"]:
        print(f"note: {n}")
    if doc["host_overhead"]:
        print(host_table(doc["host_overhead"]))
    m = doc["meta"]
    print(
        f"\n{m['device_name']} | torch {m['torch']} | timing {m['timing']} | {len(res)} rows, {n_fail} failed | {doc['elapsed_s']} s"
    )
    print(compact_table(res))
