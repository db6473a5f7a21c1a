"""Which Triton kernel options make FlexAttention fastest on this card (GPU; issue 19).

flex's Triton lowering runs at ~70% of cuDNN on causal and ~63% on softcap (H100, round 20). The
kernel itself takes options torch does not set by default: ``USE_TMA`` (Hopper's tensor memory
accelerator for the Q/K/V tiles), ``ROWS_GUARANTEED_SAFE`` (no fully-masked row: skips the
empty-row guard), ``BLOCKS_ARE_CONTIGUOUS`` (each row's key blocks form one range, as causal,
windows and documents do), ``PRESCALE_QK`` (fold the scale into q: one extra bf16 rounding), and
the tile shapes / warps / stages. The probe times each on raw compiled ``flex_attention`` at
1 x H x S x 128 bf16, forward and forward+backward, next to cuDNN causal, in one process, and
checks every row's output (and gradients) on the first two heads against a float64 computation
with anyattn's tolerance rule (output <= 2 x eager-bf16 error + 1e-5, gradients 3 x + 1e-4).

    PYTHONPATH=src python3 benchmarks/flex_config_probe.py [--seq 16384] [--variants causal,softcap] \
        [--deadline 400] [--out DIR]

Rows past ``--deadline`` seconds are skipped (written as skipped, not dropped).
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
import torch.nn.functional as F

from anyattn.backends.flex_blocks import GUARANTEES
from anyattn.bench.cases import alibi_slopes

CAP = 30.0
SAFE = dict(GUARANTEES)  # what flex promises the Triton kernel where flex_blocks.kernel_guarantees holds
FWD_CONFIGS = {
    "default": None,
    "tma": {"USE_TMA": True},
    "safe": dict(SAFE),
    "safe+tma": {**SAFE, "USE_TMA": True},
    "prescale": {"PRESCALE_QK": True},
    "m128n128w8s2": {"BLOCK_M": 128, "BLOCK_N": 128, "num_warps": 8, "num_stages": 2},
    "m128n64w4s3": {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 4, "num_stages": 3},
    "m128n64w8s4": {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 4},
    "m128n64w8s2": {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 2},
    "m64n128w4s3": {"BLOCK_M": 64, "BLOCK_N": 128, "num_warps": 4, "num_stages": 3},
    "flash": {"BACKEND": "FLASH"},
    "safe+m128n128w8s2": {"BLOCK_M": 128, "BLOCK_N": 128, "num_warps": 8, "num_stages": 2, **SAFE},
    "m128n128w8s2+safe+tma": {"BLOCK_M": 128, "BLOCK_N": 128, "num_warps": 8, "num_stages": 2, **SAFE, "USE_TMA": True},
}
BWD_CONFIGS = {
    "default": None,
    "tma": {"USE_TMA": True},
    "flash": {"BACKEND": "FLASH"},
    "safe": dict(SAFE),
    "safe+tma": {**SAFE, "USE_TMA": True},
    "bwd64x64w4s3": {
        "bwd_BLOCK_M1": 64,
        "bwd_BLOCK_N1": 64,
        "bwd_BLOCK_M2": 64,
        "bwd_BLOCK_N2": 64,
        "bwd_num_warps": 4,
        "bwd_num_stages": 3,
    },
    "bwd32x128w4s3": {
        "bwd_BLOCK_M1": 32,
        "bwd_BLOCK_N1": 128,
        "bwd_BLOCK_M2": 128,
        "bwd_BLOCK_N2": 32,
        "bwd_num_warps": 4,
        "bwd_num_stages": 3,
    },
    "bwd64x128w8s2": {
        "bwd_BLOCK_M1": 64,
        "bwd_BLOCK_N1": 128,
        "bwd_BLOCK_M2": 128,
        "bwd_BLOCK_N2": 64,
        "bwd_num_warps": 8,
        "bwd_num_stages": 2,
    },
}


# what each variant runs by default (--configs overrides): the row / block promises only where
# they hold (causal, and softcap / ALiBi over causal); documents and windows break them
PLAN = {
    "causal": {"fwd": ["default", "safe", "tma", "safe+m128n128w8s2", "flash"], "fwd+bwd": ["default", "safe", "flash"]},
    "softcap": {"fwd": ["default", "safe", "tma", "safe+m128n128w8s2", "flash"], "fwd+bwd": ["default", "safe", "flash"]},
    "alibi": {"fwd": ["default", "safe", "flash"], "fwd+bwd": ["default", "safe", "flash"]},
    "documents": {"fwd": ["default", "tma", "flash"], "fwd+bwd": ["default", "tma", "flash"]},
    "window": {"fwd": ["default", "tma", "flash"], "fwd+bwd": ["default", "tma", "flash"]},
}
WINDOW = 1024


def _doc_lengths(S, n=16, seed=0):
    """n document lengths summing to S (log-normal, fixed seed)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.empty(n).log_normal_(0.0, 0.8, generator=g)
    lengths = (w / w.sum() * S).floor().long().clamp(min=1)
    lengths[-1] += S - int(lengths.sum())
    return lengths.tolist()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seq", type=int, default=16384)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--variants", default="causal,softcap", help="comma list of " + ",".join(PLAN))
    ap.add_argument("--modes", default="fwd,fwd+bwd")
    ap.add_argument("--deadline", type=float, default=400.0)
    ap.add_argument(
        "--autotune", action="store_true", help="also a forward row compiled with mode=max-autotune-no-cudagraphs"
    )
    ap.add_argument("--configs", default=None, help="comma-separated config names (default: all)")
    ap.add_argument("--device", default="cuda", help="cpu: a smoke test of the script itself (no timing meaning)")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    t0 = time.time()
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    if a.device == "cuda":
        from triton.testing import do_bench
    else:

        def do_bench(fn, warmup, rep):
            t = time.perf_counter()
            fn()
            return (time.perf_counter() - t) * 1e3

    import anyattn as aa
    from anyattn.backends.flex_tanh import fast_tanh
    from anyattn.bench.verify import bound, maxdiff  # the tolerance rule

    approx = fast_tanh()
    dev = torch.device(a.device)
    S, H, D = a.seq, a.heads, 128
    slopes = alibi_slopes(H).to(dev)
    lengths = _doc_lengths(S)
    doc = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths)).to(dev)

    def alibi_mod(s, b, h, q, kv):
        return s - slopes[h] * (q - kv).abs()

    # (score_mod on Triton, score_mod on FLASH, mask_mod, anyattn mask, anyattn score, visible pairs)
    var = {
        "causal": (None, None, "causal", aa.causal(), None, S * (S + 1) // 2),
        "softcap": (lambda s, b, h, q, kv: CAP * approx(s / CAP), lambda s, b, h, q, kv: CAP * torch.tanh(s / CAP),
                    "causal", aa.causal(), aa.softcap(CAP), S * (S + 1) // 2),
        "alibi": (alibi_mod, alibi_mod, "causal", aa.causal(), aa.alibi(slopes), S * (S + 1) // 2),
        "documents": (None, None, "documents", aa.documents([lengths]) & aa.causal(), None,
                      sum(n * (n + 1) // 2 for n in lengths)),
        "window": (None, None, "window", aa.sliding_window(WINDOW), None,
                   sum(min(i + 1, WINDOW + 1) for i in range(S))),
    }  # fmt: skip
    mask_mods = {
        "causal": lambda b, h, i, j: i >= j,
        "documents": lambda b, h, i, j: (i >= j) & (doc[i] == doc[j]),
        "window": lambda b, h, i, j: (i >= j) & (i - j <= WINDOW),
    }
    variants = [x for x in a.variants.split(",") if x]
    bms = {m: create_block_mask(mask_mods[m], 1, 1, S, S, device=dev) for m in {var[v][2] for v in variants}}
    torch._dynamo.config.recompile_limit = 256
    torch._dynamo.config.cache_size_limit = 256
    compiled = torch.compile(flex_attention, dynamic=False)

    g = torch.Generator(device="cpu").manual_seed(0)
    q, k, v, do = (torch.randn(1, H, S, D, generator=g) for _ in range(4))
    q = q * 2  # larger logits: softcap's tanh leaves its linear range
    grad = "fwd+bwd" in a.modes.split(",")
    qb, kb, vb = (t.to(dev, torch.bfloat16).requires_grad_(grad) for t in (q, k, v))
    dob = do.to(dev, torch.bfloat16)

    def reference(variant, dtype, backend):
        """Output and gradients of heads 0-1 (float64 oracle, or eager in bf16), computed on the GPU."""
        ins = [t[:, :2].to(dev, dtype).requires_grad_(True) for t in (q, k, v)]
        sc = var[variant][4]
        if sc is not None and variant == "alibi":
            sc = aa.alibi(slopes[:2])
        o = aa.attention(*ins, mask=var[variant][3], score=sc, backend=backend)
        gr = torch.autograd.grad(o, ins, do[:, :2].to(dev, dtype))
        res = [o.detach().double()] + [x.double() for x in gr]
        del o, gr, ins
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        return res

    results = {
        "device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "shape": [1, H, S, D],
        "rows": [],
    }
    rows = results["rows"]

    def check(variant, got, n):
        """'ok' / 'FAIL' against the oracle for the first n of (out, dq, dk, dv)."""
        orc, ref = oracles[variant]
        parts, ok = [], True
        for i, lab in enumerate(("out", "dq", "dk", "dv")[:n]):
            e, r = maxdiff(got[i][:, :2], orc[i]), maxdiff(ref[i], orc[i])  # NaN when either has one
            limit = bound(r, grad=i > 0)
            ok &= e <= limit  # NaN compares False
            parts.append(f"{lab} {e:.1e}<={limit:.1e}")
        return ("ok " if ok else "FAIL ") + " ".join(parts)

    oracles = {}
    for variant in dict.fromkeys(["causal", *variants]):
        # eager float64 on the GPU over two 16k heads: ~2 x 2 GiB of scores, freed after
        oracles[variant] = (reference(variant, torch.float64, "eager"), reference(variant, torch.bfloat16, "eager"))
    print(f"oracles at {time.time() - t0:.0f}s", flush=True)

    def cudnn():
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            return F.scaled_dot_product_attention(qb, kb, vb, is_causal=True)

    def row(variant, mode, name, fn):
        if time.time() - t0 > a.deadline:
            rows.append({"variant": variant, "mode": mode, "config": name, "skipped": "deadline"})
            return
        t1 = time.time()
        try:
            if mode == "fwd":
                with torch.no_grad():
                    out = fn()
                    status = check(variant, [out], 1)
                    ms = do_bench(fn, warmup=25, rep=150)
                tf = 4 * H * D * var[variant][5] / (ms * 1e-3) / 1e12
            else:
                out = fn()
                gr = torch.autograd.grad(out, (qb, kb, vb), dob)
                status = check(variant, [out.detach(), *gr], 4)
                del out, gr

                def step():
                    o = fn()
                    torch.autograd.grad(o, (qb, kb, vb), dob)

                ms = do_bench(step, warmup=20, rep=150)
                tf = 3.5 * 4 * H * D * var[variant][5] / (ms * 1e-3) / 1e12
            rows.append({"variant": variant, "mode": mode, "config": name, "ms": ms, "tflops": tf,
                         "check": status, "wall_s": time.time() - t1})  # fmt: skip
        except Exception as e:  # noqa: BLE001 - reported as a row
            rows.append({"variant": variant, "mode": mode, "config": name,
                         "error": f"{type(e).__name__}: {str(e)[:300]}", "wall_s": time.time() - t1})  # fmt: skip
        r = rows[-1]
        print(
            f"{variant:8s} {mode:8s} {name:24s} "
            + (f"{r['tflops']:6.1f} TFLOP/s {r['check']}" if "tflops" in r else r.get("error", "")),
            flush=True,
        )

    modes = [m for m in a.modes.split(",") if m]
    wanted = set(a.configs.split(",")) if a.configs else None
    for mode in modes:
        if dev.type == "cuda":
            row("causal", mode, "cudnn", cudnn)
    try:
        import flash_attn.cute  # noqa: F401

        has_flash = True
    except Exception as e:  # noqa: BLE001 - reported
        print(f"flash_attn.cute not importable ({type(e).__name__}): FLASH rows skipped", flush=True)
        has_flash = False
    for variant in variants:
        tri, fla, mname, *_ = var[variant]
        for mode in modes:
            configs = FWD_CONFIGS if mode == "fwd" else BWD_CONFIGS
            names = sorted(wanted, key=list(configs).index) if wanted else PLAN[variant][mode]
            for name in names:
                if name not in configs or (name == "flash" and not has_flash):
                    continue
                opts, mod = configs[name], fla if name == "flash" else tri
                row(variant, mode, name,
                    lambda opts=opts, mod=mod, bm=bms[mname]: compiled(qb, kb, vb, score_mod=mod, block_mask=bm, kernel_options=opts))  # fmt: skip
        if a.autotune and "fwd" in modes:
            tuned = torch.compile(flex_attention, dynamic=False, mode="max-autotune-no-cudagraphs")
            row(variant, "fwd", "max-autotune",
                lambda f=tuned, mod=tri, bm=bms[mname]: f(qb, kb, vb, score_mod=mod, block_mask=bm))  # fmt: skip
    if a.out:
        os.makedirs(a.out, exist_ok=True)
        with open(os.path.join(a.out, "flex_config_probe.json"), "w") as f:
            json.dump(results, f, indent=1)
    print(
        f"\n{results['device']}, torch {results['torch']}, 1 x {H} x {S} x {D} bf16 causal (softcap cap {CAP}), TFLOP/s"
    )
    ref = {r["mode"]: r.get("tflops") for r in rows if r["config"] == "cudnn"}
    for r in rows:
        if "tflops" in r:
            pct = f"{100 * r['tflops'] / ref[r['mode']]:4.0f}% of cuDNN" if ref.get(r["mode"]) else ""
            print(f"{r['variant']:8s} {r['mode']:8s} {r['config']:24s} {r['tflops']:6.1f} {pct} {r['check'][:4]}")
        else:
            print(f"{r['variant']:8s} {r['mode']:8s} {r['config']:24s} {r.get('error', r.get('skipped', ''))[:80]}")


if __name__ == "__main__":
    main()
