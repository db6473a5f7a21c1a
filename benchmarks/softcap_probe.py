"""Where softcap's time goes on flex (GPU; issue 19: softcap + causal ran at ~55% of cuDNN causal).

Softcap adds one tanh per score. The probe separates the tanh's form from the rest of the
score_mod: the accurate libdevice tanh Triton emits for ``torch.tanh``, the hardware
``tanh.approx.f32`` (one special-function-unit instruction), and a clamp (no transcendental). One
process, useful TFLOP/s (causal pairs; backward 2.5x). Round 20 (H100) found the accurate tanh to
be most of softcap's cost; the flex backend has used ``tanh.approx.f32`` since (docs/fa4.md). Rows:

* cuDNN causal (the goal's reference), flex causal without a score_mod;
* flex softcap with ``torch.tanh`` (what the flex backend compiled before round 20);
* flex with a clamp in place of the tanh (same data flow, no transcendental: the control);
* flex softcap with ``tanh.approx.f32`` (``anyattn.backends.flex_tanh``: a custom op lowered to
  inline PTX; the round-20 run registered the same lowering inside this script);
* the same three on flex's FLASH lowering when ``flash_attn.cute`` imports.

Every softcap row is first checked against the float64 oracle at 1 x 4 x 2048 x 128 with
anyattn's tolerance rule (output <= 2 x eager-bf16 error + 1e-5, gradients 3 x + 1e-4); the
clamp row is a timing control only (a different function).

    PYTHONPATH=src python3 benchmarks/softcap_probe.py [--seq 16384] [--out DIR]
"""

from __future__ import annotations

import argparse
import functools
import json
import os

import torch
import torch.nn.functional as F

CAP = 30.0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seq", type=int, default=16384)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    from triton.testing import do_bench

    import anyattn as aa

    dev = torch.device("cuda")
    from anyattn.backends.flex_tanh import fast_tanh

    approx = fast_tanh()  # the flex backend's op: tanh eagerly, tanh.approx.f32 in CUDA kernels
    mods = {
        "none": None,
        "softcap_tanh": lambda s, b, h, q, kv: CAP * torch.tanh(s / CAP),
        "clamp_control": lambda s, b, h, q, kv: torch.clamp(s, -CAP, CAP),
        "softcap_approx": lambda s, b, h, q, kv: CAP * approx(s / CAP),
    }
    try:
        import flash_attn.cute  # noqa: F401

        lowerings = ["triton", "flash"]
    except Exception as e:  # noqa: BLE001 - reported
        print(f"flash_attn.cute not importable ({type(e).__name__}): FLASH rows skipped")
        lowerings = ["triton"]

    def causal(b, h, q, kv):
        return q >= kv

    torch._dynamo.config.recompile_limit = 64  # one compile per (score_mod, shape, grad mode)
    compiled = torch.compile(flex_attention, dynamic=False)
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "cap": CAP, "rows": []}

    # correctness first: 1 x 4 x 2048 x 128, large logits (q scaled x 4)
    g = torch.Generator(device="cpu").manual_seed(0)
    S0 = 2048
    q0, k0, v0 = (torch.randn(1, 4, S0, 128, generator=g) for _ in range(3))
    q0 = q0 * 4
    dout = torch.randn(1, 4, S0, 128, generator=g)

    def run_ref(dtype, device, backend):
        ins = [t.to(device, dtype).requires_grad_(True) for t in (q0, k0, v0)]
        o = aa.attention(*ins, mask=aa.causal(), score=aa.softcap(CAP), backend=backend)
        gr = torch.autograd.grad(o, ins, dout.to(device, dtype))
        return [o.detach().double().cpu()] + [x.double().cpu() for x in gr]

    oracle = run_ref(torch.float64, "cpu", "eager")
    ref = run_ref(torch.bfloat16, dev, "eager")
    bm0 = create_block_mask(causal, 1, 1, S0, S0, device=dev)
    checks = {}
    for low in lowerings:
        opts = {"BACKEND": "FLASH"} if low == "flash" else None
        for name in ("softcap_tanh", "softcap_approx"):
            ins = [t.to(dev, torch.bfloat16).requires_grad_(True) for t in (q0, k0, v0)]
            try:
                o = compiled(*ins, score_mod=mods[name], block_mask=bm0, kernel_options=opts)
                gr = torch.autograd.grad(o, ins, dout.to(dev, torch.bfloat16))
            except Exception as e:  # noqa: BLE001 - reported as a row
                checks[f"{low}/{name}"] = f"error {type(e).__name__}: {str(e)[:200]}"
                continue
            test = [o.detach().double().cpu()] + [x.double().cpu() for x in gr]
            parts = []
            ok = True
            for i, lab in enumerate(("out", "dq", "dk", "dv")):
                e = (test[i] - oracle[i]).abs().max().item()
                r = (ref[i] - oracle[i]).abs().max().item()
                bound = 2 * r + 1e-5 if i == 0 else 3 * r + 1e-4
                ok &= e <= bound
                parts.append(f"{lab} {e:.2e}<={bound:.2e}")
            checks[f"{low}/{name}"] = ("ok " if ok else "FAIL ") + "  ".join(parts)
    results["checks"] = checks

    # timing: 1 x H x S x 128 bf16, causal
    S, H = a.seq, a.heads
    q, k, v = (torch.randn(1, H, S, 128, device=dev, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    do = torch.randn_like(q)
    flops_fwd = 4 * H * 128 * (S * (S + 1) / 2)

    def rate(fn, mode):
        if mode == "fwd":
            with torch.no_grad():
                ms = do_bench(fn, warmup=50, rep=300)
            return ms, flops_fwd / (ms * 1e-3) / 1e12

        def step():
            o = fn()
            torch.autograd.grad(o, (q, k, v), do)

        ms = do_bench(step, warmup=30, rep=300)
        return ms, 3.5 * flops_fwd / (ms * 1e-3) / 1e12

    bm = create_block_mask(causal, 1, 1, S, S, device=dev)
    rows = [("cudnn causal", lambda: _cudnn(q, k, v, sdpa_kernel, SDPBackend, F))]
    for low in lowerings:
        opts = {"BACKEND": "FLASH"} if low == "flash" else None
        for name, mod in mods.items():
            rows.append((f"flex[{low}] {name}", functools.partial(compiled, q, k, v, score_mod=mod, block_mask=bm, kernel_options=opts)))
    for label, fn in rows:
        for mode in ("fwd", "fwd+bwd"):
            try:
                ms, tf = rate(fn, mode)
                results["rows"].append({"row": label, "mode": mode, "ms": ms, "tflops": tf})
            except Exception as e:  # noqa: BLE001 - reported as a row
                results["rows"].append({"row": label, "mode": mode, "error": f"{type(e).__name__}: {str(e)[:200]}"})
    if a.out:
        os.makedirs(a.out, exist_ok=True)
        with open(os.path.join(a.out, "softcap_probe.json"), "w") as f:
            json.dump(results, f, indent=1)
    print(f"{results['device']}, torch {results['torch']}, 1 x {H} x {S} x 128 bf16 causal, cap {CAP}")
    for kk, vv in checks.items():
        print(f"check {kk:32s} {vv}")
    for r in results["rows"]:
        if "error" in r:
            print(f"{r['row']:34s} {r['mode']:8s} {r['error']}")
        else:
            print(f"{r['row']:34s} {r['mode']:8s} {r['ms']:8.3f} ms {r['tflops']:7.1f} TFLOP/s")


def _cudnn(q, k, v, sdpa_kernel, SDPBackend, F):
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)


if __name__ == "__main__":
    main()
