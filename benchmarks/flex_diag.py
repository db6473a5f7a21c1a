"""Which FlexAttention geometries compile on this torch/GPU (fwd+bwd, bf16, causal BlockMask)."""

import itertools

import torch
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

fc = torch.compile(flex_attention, dynamic=False)
for S, D, (Hq, Hkv) in itertools.product((113, 128, 200), (64, 80, 128), ((8, 2), (8, 8))):
    try:
        q = torch.randn(2, Hq, S, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        k = torch.randn(2, Hkv, S, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        v = torch.randn(2, Hkv, S, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        bm = create_block_mask(lambda b, h, i, j: i >= j, None, None, S, S, device="cuda")
        fc(q, k, v, block_mask=bm, enable_gqa=Hq != Hkv).sum().backward()
        torch.cuda.synchronize()
        r = "ok"
    except Exception as e:
        r = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
    print(f"S={S} D={D} H={Hq}/{Hkv}: {r}", flush=True)
