"""Where a new padding every call spends its time (GPU; ``--device cpu`` is a smoke run).

Two parts, one process:

A. host: a tiny call (B=1, H=1, S=64, D=64) with a fresh mask tensor per call, raw SDPA next to
   anyattn's sdpa backend (keep-mask, dense mask, documents list). Per row: microseconds per call
   (1000 calls, one sync), device syncs per call (``torch.cuda.set_sync_debug_mode``), and per call
   the host API calls the profiler sees (kernel launches, copies, synchronizations).
B. device: new padding every step at B x S (default 8 x 2048, H=16, D=128, bf16), forward and
   forward+backward, the rows of ``anyattn bench kernels --mode new-packing --cases padding``
   (built by the same code), every step a padding not seen before. Per row: wall ms/step (30
   steps, one sync), host ms/step (the time to enqueue one step after a sync), whether a step
   waits for the GPU (``waits``: its enqueue time behind a ~5 ms GPU sleep, in ms; a step that
   only enqueues returns at once, one that syncs, e.g. through a copy from pageable memory,
   returns after the sleep), the GPU kernel time per step and kernel count (profiler), and the
   longest kernels. anyattn rows run twice: as shipped (CPU lengths copied through pinned
   memory) and with ``anyattn.layout.PINNED_COPIES = False`` (pageable copies: ``/pageable``).

    PYTHONPATH=src python3 benchmarks/padding_probe.py [--shape 8x2048] [--out DIR]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
import warnings

import torch
import torch.nn.functional as F

import anyattn.layout
from anyattn import attention, clear_caches, dense, documents, padding
from anyattn.bench import churn_steps
from anyattn.bench.churn import Options
from anyattn.bench.timing import host_us_per_call
from anyattn.bench.timing import sync as _sync


def _profile(fn, n, dev):
    """(per-call counts of host API calls by kind, kernel us per call, kernel count per call, top kernels)."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    fn()
    _sync(dev)
    with profile(activities=acts) as p:
        for _ in range(n):
            fn()
        _sync(dev)
    api = {"launch": 0, "memcpy": 0, "sync": 0, "aten": 0}
    kern_us, kern_n, per = 0.0, 0, {}
    for e in p.events():
        name = e.name
        if e.device_type == torch.autograd.DeviceType.CUDA:
            kern_us += e.device_time if hasattr(e, "device_time") else e.cuda_time
            kern_n += 1
            per[name] = per.get(name, 0.0) + (e.device_time if hasattr(e, "device_time") else e.cuda_time)
            continue
        if "LaunchKernel" in name or name.startswith("cuLaunch"):
            api["launch"] += 1
        elif "Memcpy" in name:
            api["memcpy"] += 1
        elif "Synchronize" in name:
            api["sync"] += 1
        elif name.startswith("aten::") and e.cpu_parent is None:
            api["aten"] += 1
    top = sorted(per.items(), key=lambda x: -x[1])[:3]
    return ({k: round(v / n, 1) for k, v in api.items()}, kern_us / n, kern_n / n,
            [(k[:70], round(v / n, 1)) for k, v in top])  # fmt: skip


def _syncs(fn, dev, n=5):
    if dev.type != "cuda":
        return float("nan")
    fn()
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode(1)
        try:
            for _ in range(n):
                fn()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    return sum("synchroniz" in str(x.message) for x in w) / n


def part_a(dev, dtype, calls=1000):
    B, H, S, D = 1, 1, 64, 64
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, H, S, D, generator=g).to(dev, dtype) for _ in range(3))
    keeps = [(torch.arange(S)[None, :] < torch.randint(S // 2, S + 1, (B, 1), generator=g)).to(dev) for _ in range(4)]
    denses = [((torch.rand(B, 1, S, S, generator=g) < 0.5) | torch.eye(S, dtype=torch.bool)).to(dev) for _ in range(4)]
    i = [0]

    def nxt(pool):
        i[0] = (i[0] + 1) % len(pool)
        return pool[i[0]].clone()

    rows = {
        "raw sdpa is_causal": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True),
        "raw sdpa keep [fresh]": lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=nxt(keeps)[:, None, None, :]),
        "sdpa padding(mask=) [fresh]": lambda: attention(q, k, v, mask=padding(mask=nxt(keeps)), backend="sdpa"),
        "raw sdpa dense [fresh]": lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=nxt(denses)),
        "sdpa dense() [fresh]": lambda: attention(q, k, v, mask=dense(nxt(denses)), backend="sdpa"),
        "sdpa documents(list) [fresh]": lambda: attention(q, k, v, mask=documents([30, 34]), backend="sdpa"),
    }
    if dev.type == "cuda":
        rows["cudnn documents(list) [fresh]"] = lambda: attention(q, k, v, mask=documents([30, 34]), backend="cudnn")
        rows["auto padding(mask=) [fresh]"] = lambda: attention(q, k, v, mask=padding(mask=nxt(keeps)), backend="auto")
    res = []
    for name, fn in rows.items():
        for _ in range(50):
            fn()
        best = min(host_us_per_call(fn, dev, calls) for _ in range(3))
        api, kus, kn, top = _profile(fn, 100, dev)
        res.append({"row": name, "us": best, "syncs": _syncs(fn, dev), "api": api, "kernel_us": kus, "kernels": kn, "top": top})
    return res


def part_b(dev, shape, steps=30, case="padding"):
    B, S = shape
    o = Options(pad_B=B, pad_S=S, pack_S=S, heads=16, head_dim=128, dtype="bf16" if dev.type == "cuda" else "fp32", device=str(dev))
    if case == "packing":
        B = 1
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    H, D = o.heads, o.head_dim
    n_steps = 6 + steps + 10 + 5 + 10  # warm-up, timed, host, waits, profile: each step a new padding
    if case == "padding":
        names = ["raw:sdpa", "auto:lengths", "sdpa:keep", "sdpa:lengths", "flash_torch:lengths", "flex:lengths"]
    else:
        names = ["raw:varlen", "auto:tensor", "flash_torch:tensor", "flex:tensor"]
    names += [n + "/pageable" for n in names[1:]]
    res = []
    for grad in (False, True):
        g = torch.Generator().manual_seed(1)
        leaves = [torch.randn(B, S, H, D, generator=g).to(dev, dtype).requires_grad_(grad) for _ in range(3)]
        for name in names:
            anyattn.layout.PINNED_COPIES = not name.endswith("/pageable")
            packs = churn_steps.packings(dataclasses.replace(o, seed=len(res)), case, n_steps)
            if dev.type != "cuda" and name.startswith(("flash_torch", "raw:varlen")):
                continue
            if dev.type != "cuda" and grad and name.startswith("flex"):
                continue
            try:
                if name.startswith("raw:"):
                    fwd, _ = churn_steps.raw_forward(name, case, leaves, o, grad)
                else:
                    be, form = name.split("/")[0].split(":")
                    fwd, _ = churn_steps.anyattn_forward(be, case, form, leaves)
                step = churn_steps.stepper(fwd, leaves, grad)
                it = iter(packs)

                def one(step=step, it=it):
                    return step(next(it))

                for _ in range(3):  # first calls (compiles); host_us_per_call warms up 3 more
                    one()
                wall = host_us_per_call(one, dev, steps) / 1e3
                host = []
                for _ in range(10):
                    _sync(dev)
                    t1 = time.perf_counter()
                    one()
                    host.append(time.perf_counter() - t1)
                _sync(dev)
                host_ms = sorted(host)[len(host) // 2] * 1e3
                waits = []
                for _ in range(5):
                    _sync(dev)
                    if dev.type == "cuda":
                        torch.cuda._sleep(10_000_000)  # ~5 ms of GPU time ahead of the step
                    t1 = time.perf_counter()
                    one()
                    waits.append(time.perf_counter() - t1)
                _sync(dev)
                wait_ms = sorted(waits)[len(waits) // 2] * 1e3
                api, kus, kn, top = _profile(one, 9, dev)  # 9 + its own warm-up call
                res.append({"row": name, "mode": "fwd+bwd" if grad else "fwd", "wall_ms": wall, "host_ms": host_ms, "wait_ms": wait_ms,
                            "kernel_ms": kus / 1e3, "kernels": kn, "api": api, "top": top})  # fmt: skip
            except Exception as e:  # noqa: BLE001 - a probe row that fails prints its error and the run goes on
                res.append({"row": name, "mode": "fwd+bwd" if grad else "fwd", "error": f"{type(e).__name__}: {e}"[:200]})
        clear_caches()
    anyattn.layout.PINNED_COPIES = True
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--shape", default="8x2048", help="B x S of part B (default 8x2048)")
    ap.add_argument("--parts", default="a,b")
    ap.add_argument("--case", default="padding", choices=("padding", "packing"),
                    help="part B: new padding per step (B x S rows) or a new packing of one S-token doc-causal row")
    ap.add_argument("--out", default=None, help="write probe.json here")
    a = ap.parse_args()
    dev = torch.device(a.device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    B, S = (int(x) for x in a.shape.lower().split("x"))
    out = {"device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu", "torch": torch.__version__}
    if "a" in a.parts:
        out["host"] = part_a(dev, dtype, calls=1000 if dev.type == "cuda" else 200)
        print(f"A. host, B=1 H=1 S=64 D=64, fresh mask per call ({out['device']})")
        print(f"  {'row':32s} {'us/call':>8s} {'syncs':>6s} {'launch':>7s} {'memcpy':>7s} {'aten':>5s} {'kern us':>8s}")
        for r in out["host"]:
            ap_ = r["api"]
            print(f"  {r['row']:32s} {r['us']:8.1f} {r['syncs']:6.1f} {ap_['launch']:7.1f} {ap_['memcpy']:7.1f} {ap_['aten']:5.1f} {r['kernel_us']:8.1f}")
    if "b" in a.parts:
        out["steps"] = part_b(dev, (B, S), case=a.case)
        what = f"new padding every step, {B}x{S}" if a.case == "padding" else f"new packing every step, 1x{S} doc-causal"
        print(f"B. {what}, H=16 D=128")
        print(f"  {'row':31s} {'mode':8s} {'wall ms':>8s} {'host ms':>8s} {'waits':>6s} {'kern ms':>8s} {'kernels':>8s} {'memcpy':>7s} {'sync':>5s}  top kernel")
        for r in out["steps"]:
            if "error" in r:
                print(f"  {r['row']:31s} {r['mode']:8s} ERROR {r['error']}")
                continue
            top = r["top"][0] if r["top"] else ("", 0)
            print(f"  {r['row']:31s} {r['mode']:8s} {r['wall_ms']:8.3f} {r['host_ms']:8.3f} {r['wait_ms']:6.2f} {r['kernel_ms']:8.3f} {r['kernels']:8.1f} "
                  f"{r['api']['memcpy']:7.1f} {r['api']['sync']:5.1f}  {top[0][:30]} {top[1]:.0f}us")  # fmt: skip
    if a.out:
        os.makedirs(a.out, exist_ok=True)
        with open(os.path.join(a.out, "probe.json"), "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
