"""Where anyattn's host time goes on a new padding (or packing) every step: cProfile of the
enqueue of N steps (no sync inside the profiled loop, so what it shows is host work), per backend,
top functions by own time and by cumulative time (GPU; ``--device cpu`` is a smoke run).

    PYTHONPATH=src python3 benchmarks/host_profile.py --backends flex,flash_torch [--grad] [--out DIR]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats

import torch

from anyattn import attention, documents, padding


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backends", default="flex,flash_torch,sdpa")
    ap.add_argument("--shape", default="8x2048", help="BxS (padding) or 1xS (packing)")
    ap.add_argument("--case", choices=("padding", "packing"), default="padding")
    ap.add_argument("--grad", action="store_true", help="forward+backward steps")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--top", type=int, default=22)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    dev = torch.device(a.device)
    B, S = (int(x) for x in a.shape.split("x"))
    dt = torch.bfloat16 if dev.type == "cuda" else torch.float32
    q, k, v = (torch.randn(B, 16, S, 128, device=dev, dtype=dt, requires_grad=a.grad) for _ in range(3))
    g = torch.Generator().manual_seed(0)

    def mask():
        if a.case == "padding":
            return padding(torch.randint(S // 2, S + 1, (B,), generator=g))
        cuts = torch.sort(torch.randint(1, S, (15,), generator=g)).values.tolist()
        edges = [0, *cuts, S]
        return documents([e - s for s, e in zip(edges, edges[1:]) if e > s])

    def step(backend):
        out = attention(q, k, v, mask=mask(), backend=backend)
        if a.grad:
            out.sum().backward()

    report = []
    for be in a.backends.split(","):
        for _ in range(5):  # compile and warm up
            step(be)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        pr = cProfile.Profile()
        pr.enable()
        for _ in range(a.steps):
            step(be)
        pr.disable()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        for key in ("tottime", "cumulative"):
            s = io.StringIO()
            st = pstats.Stats(pr, stream=s)
            st.sort_stats(key).print_stats(a.top)
            text = s.getvalue()
            report.append(f"=== {be} {a.case} {a.shape} {'fwd+bwd' if a.grad else 'fwd'}, {a.steps} steps, by {key}\n{text}")
    out = "\n".join(report)
    if a.out:
        os.makedirs(a.out, exist_ok=True)
        with open(os.path.join(a.out, f"host_profile_{a.case}_{'grad' if a.grad else 'fwd'}.txt"), "w") as f:
            f.write(out)
    print(out)


if __name__ == "__main__":
    main()
