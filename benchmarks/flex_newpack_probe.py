"""Where flex's time goes when the packing changes every step (a probe, not a benchmark).

One 16k-token row, doc-causal, 16 heads, D=128, bf16, forward, a new list of 16 document lengths
every step. Prints: (1) per-stage host time of anyattn's flex path (the backend's block_mask_for,
entry_for, score_mod_for and the compiled call, each timed with a synchronization before and after
so the stages do not overlap); (2) dynamo's counters across the timed steps (a recompile or a guard
failure per step shows here); (3) the profiler's top operators by self CPU time and by CUDA time.

    python benchmarks/flex_newpack_probe.py --out $OUT/flex_probe.txt
"""

from __future__ import annotations

import argparse
import collections
import importlib
import time

import torch

import anyattn as aa
from anyattn.backends import REGISTRY
from anyattn.bench.cases import doc_lengths


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--out", default="flex_probe.txt")
    a = ap.parse_args()
    S, H, D = 16384, 16, 128
    q, k, v = (torch.randn(1, H, S, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    packs = [list(doc_lengths(S, 16, seed=i)) for i in range(a.steps + 40)]
    flex = REGISTRY["flex"]
    stages = collections.defaultdict(list)

    def timed(name, fn):
        def wrapper(*args, **kw):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            r = fn(*args, **kw)
            torch.cuda.synchronize()
            stages[name].append((time.perf_counter() - t0) * 1e3)
            return r

        return wrapper

    def step(i):
        return aa.attention(q, k, v, mask=aa.documents(packs[i]) & aa.causal(), backend="flex")

    for i in range(5):  # compile and warm up
        step(i)
    torch.cuda.synchronize()
    # whole-step time without instrumentation
    t0 = time.perf_counter()
    for i in range(5, 5 + a.steps):
        step(i)
    torch.cuda.synchronize()
    whole = (time.perf_counter() - t0) / a.steps * 1e3
    from torch._dynamo.utils import counters

    before = {k: dict(v) for k, v in counters.items()}
    orig = {n: getattr(flex, n) for n in ("block_mask_for", "entry_for", "score_mod_for")}
    for n, f in orig.items():
        setattr(flex, n, timed(n, f))
    fx = importlib.import_module("anyattn.backends.flex")  # the module (the package exposes the backend objects)

    orig_finish = fx._finish
    fx._finish = timed("_finish", orig_finish)
    for i in range(5, 5 + a.steps):
        timed("whole step", step)(i + 5)
    for n, f in orig.items():
        setattr(flex, n, f)
    fx._finish = orig_finish
    after = {k: dict(v) for k, v in counters.items()}
    delta = {f"{k}.{kk}": vv - before.get(k, {}).get(kk, 0) for k, v in after.items() for kk, vv in v.items() if vv != before.get(k, {}).get(kk, 0)}
    from anyattn.bench.timing import profile_tables

    def steps():
        for i in range(5, 15):
            step(i + 20)

    tables = profile_tables(steps, "10 steps", cpu_rows=25, cuda_rows=15, width=55)
    lines = [f"device {torch.cuda.get_device_name()}, torch {torch.__version__}", f"whole step (no instrumentation): {whole:.3f} ms"]
    for n, ts in stages.items():
        ts = sorted(ts)
        lines.append(f"  {n:16s} median {ts[len(ts) // 2]:.3f} ms  (n={len(ts)})")
    lines.append(f"dynamo counter changes over {a.steps} steps: {delta}")
    lines.append(f"flex stats: {flex.stats}")
    lines.append(tables)
    text = "\n".join(lines)
    with open(a.out, "w") as f:
        f.write(text)
    print("\n".join(lines[: 4 + len(stages)]))


if __name__ == "__main__":
    main()
