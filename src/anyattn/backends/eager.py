"""The eager backend: the readable reference.

Plain PyTorch on any device and dtype: logits ``q @ k^T`` in the input dtype, everything after in
float32 (float64 for float64 input), score terms in order, mask, a softmax whose fully masked
rows give exactly 0 (lse = -inf) with finite gradients, then ``weights @ v``. A ``sink(...)``
term adds its logit to the softmax denominator (a column with no value). It serves every
variant, returns the attention weights on request, and with float64 inputs it is the oracle
the tests measure every backend against.

Rows that see no key are set to exactly 0 after ``weights @ v``: their weights are 0, but a NaN
or inf in a value they cannot see would otherwise reach them (0 * NaN = NaN).
"""

from __future__ import annotations

import torch

from ..spec import index_grids, materialize_mask
from .base import AttentionBackend, Facts


class EagerBackend(AttentionBackend):
    name = "eager"
    facts = Facts(dropout=True, score_fn=True)

    def supports(self, sig) -> str | None:
        return None  # every variant, every device and dtype

    def run(self, call):
        """(out, lse or None)."""
        out, lse, _ = self.run_with_weights(call)
        return out, lse

    def run_with_weights(self, call):
        """(out, lse or None, weights (B, Hq, Sq, Sk) float32 or None when not asked for)."""
        q, k, v = call.q, call.k, call.v
        geo = call.geo
        if call.gqa:  # query head h reads kv head h // (Hq // Hkv)
            g = geo.H // call.Hkv
            k = k.repeat_interleave(g, dim=1)
            v = v.repeat_interleave(g, dim=1)
        compute = torch.promote_types(q.dtype, torch.float32)
        s = torch.matmul(q, k.transpose(-2, -1)).to(compute) * call.scale  # (B, H, Sq, Sk)

        grids = None
        for bs in call.bound_scores():
            if bs.dense is not None:
                s = s + bs.dense().to(compute)
            else:
                if grids is None:
                    grids = index_grids(geo)
                s = bs.mod(s, *grids)

        bm = call.bound_mask()
        if bm is not None:
            s = s.masked_fill(~materialize_mask(bm, geo), float("-inf"))

        sink = call.sink
        m = s.amax(dim=-1, keepdim=True)
        if sink is not None:  # one more logit per head in the denominator, attached to no value
            col = sink.column(s.device, compute)
            m = torch.maximum(m, col.detach())
        m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))  # empty rows: exp(-inf - 0) = 0
        p = torch.exp(s - m)
        denom = p.sum(dim=-1, keepdim=True)
        seen = denom != 0  # rows that see at least one key (NaN stays NaN: a visible NaN propagates)
        if sink is not None:
            denom = denom + torch.exp(col - m)
        weights = p / torch.where(denom != 0, denom, torch.ones_like(denom))
        lse = (torch.log(denom) + m).squeeze(-1)  # -inf on empty rows (the sink logit with a sink)
        attn = weights
        if call.dropout_p > 0:
            attn = torch.nn.functional.dropout(weights, p=call.dropout_p, training=True)
        out = torch.matmul(attn.to(v.dtype), v)
        out = torch.where(seen, out, torch.zeros((), dtype=out.dtype, device=out.device))
        return out, (lse if call.return_lse else None), (weights if call.need_weights else None)
