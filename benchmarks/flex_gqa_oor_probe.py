"""Which forms of a FlexAttention call with a bias score_mod compile on this GPU (torch 2.11 on an
H100 failed "No valid triton configs ... out of resource" for 8 query / 2 kv heads, D=64, S=128,
with gradients; round 23). Raw compiled ``flex_attention`` (Triton lowering, torch's defaults or
``num_stages=2``), forward and backward, one fresh compile per form; prints one line per form.

    PYTHONPATH=src python3 benchmarks/flex_gqa_oor_probe.py
"""

from __future__ import annotations

import torch
from torch.nn.attention.flex_attention import flex_attention


def form(hq, hkv, S, D, gqa, stages=None):
    torch._dynamo.reset()
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(2, hq, S, D, device="cuda", dtype=torch.bfloat16, generator=g, requires_grad=True)
    k = torch.randn(2, hkv, S, D, device="cuda", dtype=torch.bfloat16, generator=g, requires_grad=True)
    v = torch.randn(2, hkv, S, D, device="cuda", dtype=torch.bfloat16, generator=g, requires_grad=True)
    bias = torch.randn(1, hq, S, S, device="cuda", generator=g)

    def score_mod(s, b, h, qi, ki):
        return s + bias[0, h, qi, ki]

    kk, vv = (k, v) if gqa else (k.repeat_interleave(hq // hkv, 1), v.repeat_interleave(hq // hkv, 1))
    fn = torch.compile(flex_attention, fullgraph=True)
    try:
        opts = None if stages is None else {"num_stages": stages}
        out = fn(q, kk, vv, score_mod=score_mod, enable_gqa=gqa and hq != hkv, kernel_options=opts)
        out.sum().backward()
        torch.cuda.synchronize()
        return "ok"
    except Exception as e:  # noqa: BLE001 - a diagnostic: report and go on
        lines = [ln for ln in str(e).splitlines() if ln.strip()]
        return f"{type(e).__name__}: {lines[0][:160] if lines else ''}"


def main():
    print(torch.cuda.get_device_name(), torch.__version__)
    for hq, hkv, S, D, gqa, stages in [
        (8, 2, 128, 64, True, None), (8, 2, 128, 64, True, 2), (8, 2, 128, 64, False, None), (4, 4, 128, 64, True, None),
        (8, 2, 113, 64, True, None), (8, 2, 256, 64, True, None), (8, 2, 128, 128, True, None),
    ]:  # fmt: skip
        name = f"H{hq}/{hkv} S={S} D={D} {'enable_gqa' if gqa and hq != hkv else 'kv repeated' if hq != hkv else 'MHA'}"
        name += f" num_stages={stages}" if stages else ""
        print(f"{name:48s} {form(hq, hkv, S, D, gqa, stages)}", flush=True)


if __name__ == "__main__":
    main()
