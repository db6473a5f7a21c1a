"""The README's headline plot and table from a committed kernel matrix.

    python3 benchmarks/plot_headline.py benchmarks/results/h200/kernels.json benchmarks/results/h200_docs_padding/kernels.json

Later files override earlier ones row by row (same variant, mode, implementation). Writes
benchmarks/results/headline.png and prints a Markdown table (anyattn rows, TFLOP/s).
"""

import json
import math
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

IMPLS = ["auto", "cudnn", "sdpa", "flex", "flash_torch"]
rows = {}
for path in sys.argv[1:]:
    for r in json.load(open(path))["results"]:
        if r["impl"] != "anyattn":
            continue
        impl = "auto" if r["backend"].startswith("auto") else r["backend"]
        rows[(r["variant"], r["mode"], impl)] = r
variants = []
for (v, m, _) in rows:
    if (v, m) not in variants:
        variants.append((v, m))


def tf(v, m, impl):
    r = rows.get((v, m, impl))
    x = r["tflops"] if r and r["status"] == "ok" else float("nan")
    return x if isinstance(x, float) else float("nan")


print("| variant | mode | " + " | ".join(IMPLS) + " | auto picks |")
print("|---|---|" + "---|" * (len(IMPLS) + 1))
for v, m in variants:
    cells = [f"{tf(v, m, i):.0f}" if not math.isnan(tf(v, m, i)) else "-" for i in IMPLS]
    pick = rows.get((v, m, "auto"), {}).get("chosen", "") or rows.get((v, m, "auto"), {}).get("backend", "")
    print(f"| {v} | {m} | " + " | ".join(cells) + f" | {pick} |")

fig, axes = plt.subplots(1, 2, figsize=(14, 5), sharey=True)
for ax, mode in zip(axes, ("fwd", "fwd+bwd")):
    vs = [v for v, m in variants if m == mode]
    w = 0.8 / len(IMPLS)
    for j, impl in enumerate(IMPLS):
        ys = [tf(v, mode, impl) for v in vs]
        ax.bar([i + j * w for i in range(len(vs))], [0 if math.isnan(y) else y for y in ys], w, label=impl)
    ax.set_xticks([i + 0.4 - w / 2 for i in range(len(vs))])
    ax.set_xticklabels(vs, rotation=30, ha="right")
    ax.set_title(f"H200, bf16, 16k tokens/call, {mode}")
    ax.grid(axis="y", alpha=0.3)
axes[0].set_ylabel("useful TFLOP/s (anyattn, per backend)")
axes[1].legend(loc="upper right")
fig.tight_layout()
fig.savefig("benchmarks/results/headline.png", dpi=110)
