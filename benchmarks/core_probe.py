"""Issue-2 acceptance probe on one GPU: every backend through anyattn vs the raw torch call it
dispatches to, for the six core variants at 16k tokens, plus anyattn's host overhead per call.

    PYTHONPATH=src python3 benchmarks/core_probe.py --out benchmarks/results/core_probe_h200.json

Bf16, B=1, S=16384, H=16, D=128 (16k tokens per call). Useful FLOPs = 4 * B * H * D * visible
pairs (forward); backward counts 2.5x forward. Times are do_bench medians.
"""

from __future__ import annotations

import argparse
import json
import random
import time

import torch
import torch.nn.functional as F

import anyattn as aa


def bench(fn, warmup=10, rep=50):
    import triton.testing

    return triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median")


def visible_pairs(mask_term, B, H, S, device):
    if mask_term is None:
        return B * S * S
    call = aa.api._make_call(
        torch.empty(B, H, S, 8, device=device), torch.empty(B, H, S, 8, device=device), torch.empty(B, H, S, 8, device=device),
        mask_term, None, None, 0.0, False, False, validate=False,
    )  # fmt: skip
    from anyattn.spec import materialize_mask

    m = materialize_mask(call.bound_mask(), call.geo)
    return int(m.expand(B, 1, S, S).sum()) if m.shape[1] == 1 else int(m.expand(B, H, S, S).sum()) // H


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--seqlen", type=int, default=16384)
    ap.add_argument("--bwd", action="store_true", help="also time forward+backward")
    args = ap.parse_args()
    dev = "cuda"
    B, H, S, D = 1, 16, args.seqlen, 128
    dt = torch.bfloat16
    torch.manual_seed(0)
    q = torch.randn(B, S, H, D, device=dev, dtype=dt).transpose(1, 2)
    k = torch.randn(B, S, H, D, device=dev, dtype=dt).transpose(1, 2)
    v = torch.randn(B, S, H, D, device=dev, dtype=dt).transpose(1, 2)
    rng = random.Random(0)
    lens = [rng.randint(128, 2048) for _ in range(16)]
    tot = sum(lens)
    lens = [max(1, int(x * S / tot)) for x in lens]
    lens[-1] += S - sum(lens)
    prefix = torch.tensor([S // 4], device=dev)
    cases = {
        "dense": dict(mask=None),
        "causal": dict(mask=aa.causal()),
        "sliding_window_1024": dict(mask=aa.sliding_window(1024)),
        "documents_16": dict(mask=aa.documents(lens) & aa.causal()),
        "prefix_lm": dict(mask=aa.prefix_lm(prefix)),
        "softcap": dict(mask=aa.causal(), score=aa.softcap(50.0)),
    }
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    flex_c = torch.compile(flex_attention, dynamic=False)
    rows = []
    for name, kw in cases.items():
        pairs = visible_pairs(kw.get("mask"), B, H, S, dev)
        flops = 4 * B * H * D * pairs
        res = {"case": name, "visible_pairs": pairs}
        d = aa.explain(q, k, v, **kw)
        res["auto"] = d.chosen
        for be in ["auto", "sdpa", "cudnn", "flex", "flash_torch"]:
            try:
                if be != "auto" and aa.explain(q, k, v, backend=be, **kw).chosen is None:
                    res[be] = None
                    continue
                t0 = time.perf_counter()
                aa.attention(q, k, v, backend=be, **kw)
                torch.cuda.synchronize()
                first = time.perf_counter() - t0
                ms = bench(lambda: aa.attention(q, k, v, backend=be, **kw))
                res[be] = {"ms": ms, "tflops": flops / ms / 1e9, "first_call_s": first}
            except Exception as e:  # record and go on
                res[be] = {"error": f"{type(e).__name__}: {e}"[:300]}
        # raw calls
        raw = {}
        m = kw.get("mask")
        if name == "dense":
            raw["sdpa_raw"] = lambda: F.scaled_dot_product_attention(q, k, v)
        if name == "causal":
            raw["sdpa_raw_is_causal"] = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)

            def cud():
                with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
                    return F.scaled_dot_product_attention(q, k, v, is_causal=True)

            raw["cudnn_raw_is_causal"] = cud
        if name == "dense":

            def cud_d():
                with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
                    return F.scaled_dot_product_attention(q, k, v)

            raw["cudnn_raw"] = cud_d
        # flex raw with a prebuilt BlockMask and the same mod functions anyattn builds
        call = aa.api._make_call(q, k, v, m, kw.get("score"), None, 0.0, False, False, validate=False)
        bm = None
        if call.mask is not None:
            bound = call.bound_mask()
            t0 = time.perf_counter()
            bm = create_block_mask(
                lambda b, h, qi, ki: bound.pred(b, h, qi, ki), B if bound.uses_b else None, H if bound.uses_h else None, S, S, device=dev
            )
            torch.cuda.synchronize()
            res["block_mask_build_ms"] = (time.perf_counter() - t0) * 1e3
        sm = None
        if call.scores:
            mods = [bs.mod for bs in call.bound_scores()]
            sm = mods[0]
        raw["flex_raw_prebuilt_blockmask"] = lambda: flex_c(q, k, v, score_mod=sm, block_mask=bm)
        if name in ("documents_16", "sliding_window_1024", "causal"):
            try:
                from torch.nn.attention.varlen import varlen_attn

                dl = lens if name == "documents_16" else [S]
                cu = torch.tensor([0] + list(__import__("itertools").accumulate(dl)), device=dev, dtype=torch.int32)
                qt, kt, vt = (x.transpose(1, 2).reshape(S, H, D) for x in (q, k, v))
                ws = (1024, 0) if name == "sliding_window_1024" else (-1, 0)
                raw["varlen_raw"] = lambda: varlen_attn(qt, kt, vt, cu, cu, max(dl), max(dl), window_size=ws)
            except ImportError:
                pass
        for rn, fn in raw.items():
            try:
                fn()
                torch.cuda.synchronize()
                ms = bench(fn)
                res[rn] = {"ms": ms, "tflops": flops / ms / 1e9}
            except Exception as e:
                res[rn] = {"error": f"{type(e).__name__}: {e}"[:300]}
        rows.append(res)
        print(json.dumps(res), flush=True)

    # host overhead: tiny shape, many calls, one sync at the end
    qs = torch.randn(1, 2, 16, 64, device=dev, dtype=dt)
    over = {}
    N = 2000
    for label, fn in (
        ("raw_sdpa_is_causal", lambda: F.scaled_dot_product_attention(qs, qs, qs, is_causal=True)),
        ("anyattn_sdpa_causal", lambda: aa.attention(qs, qs, qs, mask=aa.causal(), backend="sdpa")),
        ("anyattn_auto_causal", lambda: aa.attention(qs, qs, qs, mask=aa.causal())),
        ("raw_sdpa_nomask", lambda: F.scaled_dot_product_attention(qs, qs, qs)),
        ("anyattn_sdpa_nomask", lambda: aa.attention(qs, qs, qs, backend="sdpa")),
    ):
        for _ in range(50):
            fn()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(N):
            fn()
        torch.cuda.synchronize()
        over[label] = (time.perf_counter() - t0) / N * 1e6
    over["overhead_us_sdpa_causal"] = over["anyattn_sdpa_causal"] - over["raw_sdpa_is_causal"]
    over["overhead_us_sdpa_nomask"] = over["anyattn_sdpa_nomask"] - over["raw_sdpa_nomask"]
    print(json.dumps({"host_overhead_us": over}), flush=True)

    meta = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "cudnn": torch.backends.cudnn.version(),
        "shape": dict(B=B, H=H, S=S, D=D, dtype="bf16"),
        "document_lengths": lens,
        "command": "PYTHONPATH=src python3 benchmarks/core_probe.py",
    }
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"meta": meta, "rows": rows, "host_overhead_us": over}, f, indent=1)
    cols = ("auto", "sdpa", "cudnn", "flex", "flex_raw_prebuilt_blockmask", "flash_torch", "varlen_raw", "sdpa_raw_is_causal", "cudnn_raw_is_causal", "cudnn_raw")
    print("\ncase                 auto        " + "  ".join(f"{b[:10]:>10}" for b in cols))
    for r in rows:
        def tf(x):
            return f"{x['tflops']:10.1f}" if isinstance(x, dict) and "tflops" in x else f"{('ERR' if isinstance(x, dict) else '-'):>10}"

        print(f"{r['case']:<20} {str(r['auto']):<11} " + "  ".join(tf(r.get(b)) for b in cols))
    print("overhead us:", {k: round(v, 1) for k, v in over.items()})


if __name__ == "__main__":
    main()
