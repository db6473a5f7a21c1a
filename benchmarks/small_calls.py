"""Where the host decides: per-call time of small attention calls, per backend, across sizes.

A call whose kernel takes a few microseconds costs what its host path costs (Python, lowering,
metadata copies, launches). This sweep finds the size below which ``auto`` should take the backend
with the cheapest host path instead of the fastest kernel (``ranking.SMALL_WORK``).

Cases (B=1, Hq=Hkv=16, D=128, bf16, T tokens per call, new document lengths every call from a
pool of 8 packings of 4 documents written as Python lists, cycled (``--fresh``: a packing never
seen before every call), doc-causal; and a fresh ``dense()``
bool mask every call):

    anyattn X        attention(q, k, v, mask=documents(list) & causal(), backend=X)
    raw varlen       torch.nn.attention.varlen.varlen_attn with cu_seqlens built from the list
    raw sdpa mask    F.scaled_dot_product_attention with the (T, T) bool mask built from the list

Each row: ``--calls`` calls back to back, one synchronization, per-call microseconds; the median
of ``--rounds`` interleaved rounds. fwd (no grad) and fwd+bwd (q, k, v require grad; backward of
out.sum()). Every anyattn row is checked once against float64 eager before timing.

    python benchmarks/small_calls.py --out $OUT/small_calls.json
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time

import torch
import torch.nn.functional as F

import anyattn as aa


def packings(T: int, n: int = 8, docs: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        cuts = sorted(torch.randint(1, T, (docs - 1,), generator=g).tolist())
        b = [0, *cuts, T]
        out.append([b[i + 1] - b[i] for i in range(docs)])
    return out


def doc_mask(lengths, dev):
    ids = torch.repeat_interleave(torch.arange(len(lengths), device=dev), torch.tensor(lengths, device=dev))
    i = torch.arange(ids.numel(), device=dev)
    return (ids[:, None] == ids[None, :]) & (i[None, :] <= i[:, None])


def raw_varlen(q, k, v, lengths):
    import inspect

    from torch.nn.attention.varlen import varlen_attn

    causal = {"window_size": (-1, 0)} if "window_size" in inspect.signature(varlen_attn).parameters else {"is_causal": True}
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(lengths).cumsum(0)
    cu = cu.to(q.device, non_blocking=True)
    m = max(lengths)
    o = varlen_attn(q[0].transpose(0, 1), k[0].transpose(0, 1), v[0].transpose(0, 1), cu, cu, m, m, **causal)
    return o.transpose(0, 1)[None]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="64,256,512,1024,2048,4096")
    ap.add_argument("--backends", default="sdpa,cudnn,flash_torch,flex,auto")
    ap.add_argument("--calls", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", default="small_calls.json")
    ap.add_argument("--fresh", action="store_true", help="a new packing every call (else a pool of 8, cycled)")
    ap.add_argument("--dense", action="store_true", help="also the fresh dense() rows")
    a = ap.parse_args()
    dev = torch.device("cuda")
    H, D, dt = 16, 128, torch.bfloat16
    rows = []
    for T in [int(x) for x in a.sizes.split(",")]:
        pool = packings(T)
        for grad in (False, True):
            q, k, v = (torch.randn(1, H, T, D, device=dev, dtype=dt, requires_grad=grad) for _ in range(3))
            it = [0]
            rng = random.Random(T)

            def nxt():
                if a.fresh and it[0] >= 0:  # a packing never seen before (4 documents)
                    cuts = sorted(rng.sample(range(1, T), 3))
                    return [cuts[0], cuts[1] - cuts[0], cuts[2] - cuts[1], T - cuts[2]]
                it[0] = (it[0] + 1) % len(pool)
                return list(pool[it[0]])  # a new list object every call

            calls = {}
            for be in a.backends.split(","):
                calls[f"anyattn {be}"] = (lambda be=be: aa.attention(q, k, v, mask=aa.documents(nxt()) & aa.causal(), backend=be))
            calls["raw varlen"] = lambda: raw_varlen(q, k, v, nxt())
            calls["raw sdpa mask"] = lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=doc_mask(nxt(), dev))
            if a.dense:
                calls["anyattn auto dense()"] = lambda: aa.attention(q, k, v, mask=aa.dense(doc_mask(nxt(), dev)))
                calls["anyattn sdpa dense()"] = lambda: aa.attention(q, k, v, mask=aa.dense(doc_mask(nxt(), dev)), backend="sdpa")
            ok = {}
            for name, fn in calls.items():  # check (anyattn rows) and warm up
                try:
                    it[0] = -1
                    out = fn()
                    it[0] = 0
                    ref = aa.attention(q.double(), k.double(), v.double(), mask=aa.documents(pool[0]) & aa.causal(), backend="eager")
                    err = ((out.double() - ref).norm() / ref.norm()).item()
                    if not err < 2e-2:  # bf16 against float64 (the rows differ by kernel rounding only)
                        raise AssertionError(f"relative error {err:.2e}")
                    for _ in range(3):
                        o = fn()
                        if grad:
                            o.sum().backward()
                    torch.cuda.synchronize()
                    ok[name] = []
                except Exception as e:  # noqa: BLE001 - recorded, the sweep goes on
                    rows.append({"T": T, "grad": grad, "row": name, "status": "failed", "reason": f"{type(e).__name__}: {e}"[:200]})
            for _ in range(a.rounds):
                for name in ok:
                    fn = calls[name]
                    torch.cuda.synchronize()
                    t0 = time.perf_counter()
                    for _ in range(a.calls):
                        o = fn()
                        if grad:
                            o.sum().backward()
                    torch.cuda.synchronize()
                    ok[name].append((time.perf_counter() - t0) / a.calls * 1e6)
            for name, ts in ok.items():
                chosen = ""
                if name == "anyattn auto":
                    chosen = aa.explain(q, k, v, mask=aa.documents(pool[0]) & aa.causal()).chosen
                elif name == "anyattn auto dense()":
                    chosen = aa.explain(q, k, v, mask=aa.dense(doc_mask(pool[0], dev))).chosen
                rows.append({"T": T, "grad": grad, "row": name, "status": "ok", "us": statistics.median(ts), "rounds_us": ts, "chosen": chosen})
            del q, k, v
    env = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    with open(a.out, "w") as f:
        json.dump({"env": env, "rows": rows, "argv": vars(a)}, f, indent=1)
    print(f"# small calls: {env['device']}, torch {env['torch']}, H=16 D=128 bf16, us per call (median of {a.rounds} rounds)")
    names = list(dict.fromkeys(r["row"] for r in rows))
    for grad in (False, True):
        print(f"\n{'fwd+bwd' if grad else 'fwd'}:  T | " + " | ".join(names))
        for T in sorted({r["T"] for r in rows}):
            cells = []
            for n in names:
                r = next((r for r in rows if r["T"] == T and r["grad"] == grad and r["row"] == n), None)
                cells.append("-" if r is None else ("FAIL" if r["status"] != "ok" else f"{r['us']:.1f}" + (f"({r['chosen']})" if r.get("chosen") else "")))
            print(f"  {T} | " + " | ".join(cells))
    for r in rows:
        if r["status"] != "ok":
            print("failed:", r["T"], r["grad"], r["row"], r["reason"])


if __name__ == "__main__":
    main()
