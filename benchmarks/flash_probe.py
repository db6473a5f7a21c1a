"""Issue-3 measurements on one GPU (bf16): packed documents and sliding windows through
flash_torch vs the raw varlen kernel vs padded SDPA vs flex, and the unpad/pad share of one
attention layer on a padded ESM-sized batch.

    PYTHONPATH=src python3 benchmarks/flash_probe.py --out benchmarks/results/flash_probe_h200.json

FLOPs: 4 * H * D * visible pairs (forward), backward 2.5x forward; do_bench medians.
"""

from __future__ import annotations

import argparse
import itertools
import json
import random

import torch
import torch.nn.functional as F

import anyattn as aa


def bench(fn):
    import triton.testing

    return triton.testing.do_bench(fn, warmup=10, rep=60, return_mode="median")


def fwd_bwd(fn, inputs):
    def step():
        out = fn()
        torch.autograd.grad(out, inputs, torch.ones_like(out))

    return step


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out")
    args = ap.parse_args()
    dev, dt = "cuda", torch.bfloat16
    H, D, S = 16, 128, 16384
    rng = random.Random(0)
    lens = [rng.randint(128, 2048) for _ in range(16)]
    lens = [max(1, x * S // sum(lens)) for x in lens]
    lens[-1] += S - sum(lens)
    pairs_docs = sum(x * (x + 1) // 2 for x in lens)  # causal within each document
    res = {"meta": {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "document_lengths": lens}}

    def mk(*shape):
        return torch.randn(*shape, device=dev, dtype=dt, requires_grad=True)

    q, k, v = (mk(1, S, H, D).transpose(1, 2) for _ in range(3))
    leaves = [t._base if t._base is not None else t for t in (q, k, v)]
    from torch.nn.attention.varlen import varlen_attn

    cu = torch.tensor([0] + list(itertools.accumulate(lens)), device=dev, dtype=torch.int32)
    qt, kt, vt = (x.transpose(1, 2).reshape(S, H, D) for x in (q, k, v))
    # padded SDPA on the same documents: one row per document, keys-only padding mask + causal
    Lmax = max(lens)
    qp, kp, vp = (mk(len(lens), H, Lmax, D) for _ in range(3))
    keep = torch.arange(Lmax, device=dev)[None, :] < torch.tensor(lens, device=dev)[:, None]
    pmask = keep[:, None, None, :] & torch.ones(Lmax, Lmax, dtype=torch.bool, device=dev).tril()
    docs = aa.documents(lens) & aa.causal()
    cases = {
        "anyattn flash_torch": lambda: aa.attention(q, k, v, mask=docs, backend="flash_torch"),
        "anyattn flex": lambda: aa.attention(q, k, v, mask=docs, backend="flex"),
        "anyattn auto": lambda: aa.attention(q, k, v, mask=docs),
        "raw varlen_attn": lambda: varlen_attn(qt, kt, vt, cu, cu, max(lens), max(lens), window_size=(-1, 0)),
        "padded SDPA (B=16, dense causal+padding mask)": lambda: F.scaled_dot_product_attention(qp, kp, vp, attn_mask=pmask),
    }
    flops = 4 * H * D * pairs_docs
    docs_rows = {}
    for name, fn in cases.items():
        fn()
        ms = bench(fn)
        ins = [qp, kp, vp] if name.startswith("padded") else ([qt, kt, vt] if name.startswith("raw") else leaves)
        step = fwd_bwd(fn, ins)
        step()
        ms_fb = bench(step)
        docs_rows[name] = {"fwd_ms": ms, "fwd_tflops": flops / ms / 1e9, "fwdbwd_ms": ms_fb, "fwdbwd_tflops": 3.5 * flops / ms_fb / 1e9}
    docs_rows["auto_choice"] = aa.explain(q, k, v, mask=docs).chosen
    res["packed_documents_16k"] = docs_rows

    # causal sliding window 1024 at 16k
    W = 1024
    pairs_w = sum(min(i, W) + 1 for i in range(S))
    win = aa.sliding_window(W)
    flops_w = 4 * H * D * pairs_w
    cu1 = torch.tensor([0, S], device=dev, dtype=torch.int32)
    wcases = {
        "anyattn flash_torch": lambda: aa.attention(q, k, v, mask=win, backend="flash_torch"),
        "anyattn flex": lambda: aa.attention(q, k, v, mask=win, backend="flex"),
        "anyattn auto": lambda: aa.attention(q, k, v, mask=win),
        "raw varlen_attn window": lambda: varlen_attn(qt, kt, vt, cu1, cu1, S, S, window_size=(W, 0)),
    }
    wrows = {}
    for name, fn in wcases.items():
        fn()
        ms = bench(fn)
        wrows[name] = {"fwd_ms": ms, "fwd_tflops": flops_w / ms / 1e9}
    wrows["auto_choice"] = aa.explain(q, k, v, mask=win).chosen
    res["sliding_window_1024_16k"] = wrows

    # unpad/pad share on an ESM-sized padded batch: hidden 1280 = 20 heads x 64, 25% padding
    B, Sp, He, De = 32, 1024, 20, 64
    g = torch.Generator().manual_seed(0)
    lengths = (torch.rand(B, generator=g) * 0.5 + 0.5) * Sp  # mean 0.75 * Sp
    lengths = lengths.long().clamp(1, Sp)
    keep = torch.arange(Sp)[None, :] < lengths[:, None]
    info = aa.SeqInfo.from_padding_mask(keep.to(dev))
    xs = [torch.randn(B, Sp, He, De, device=dev, dtype=dt) for _ in range(3)]
    padm = aa.padding(info)
    qe, ke, ve = (x.transpose(1, 2) for x in xs)
    layer = lambda: aa.attention(qe, ke, ve, mask=padm, backend="flash_torch")  # noqa: E731
    layer()
    t_layer = bench(layer)
    t_unpad = bench(lambda: [aa.unpad(x, info) for x in xs])
    out_T = aa.unpad(xs[0], info)
    t_pad = bench(lambda: aa.pad(out_T, info))
    res["unpad_pad_esm"] = {
        "B": B, "S": Sp, "heads": He, "head_dim": De, "padding_fraction": 1 - info.total / (B * Sp),
        "attention_layer_ms (flash_torch incl. unpad/pad)": t_layer, "unpad_qkv_ms": t_unpad, "pad_out_ms": t_pad,
        "share_of_layer": (t_unpad + t_pad) / t_layer,
    }  # fmt: skip
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)
    print("\npacked documents, 16k tokens, 16 docs (TFLOP/s fwd | fwd+bwd):")
    for n, r in docs_rows.items():
        if isinstance(r, dict):
            print(f"  {n:<48} {r['fwd_tflops']:7.1f} | {r['fwdbwd_tflops']:7.1f}")
    print("  auto picks:", docs_rows["auto_choice"])
    print("causal sliding window 1024, 16k (TFLOP/s fwd):")
    for n, r in wrows.items():
        if isinstance(r, dict):
            print(f"  {n:<48} {r['fwd_tflops']:7.1f}")
    print("  auto picks:", wrows["auto_choice"])
    print("unpad/pad on ESM-sized batch:", {k: (round(v, 4) if isinstance(v, float) else v) for k, v in res["unpad_pad_esm"].items()})


if __name__ == "__main__":
    main()
