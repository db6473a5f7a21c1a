"""The ``output_s_max`` bound shared by the ESM C and ANKH models. Their batches are planned by ``anyattn.packing.plan_batch``, like every
model's (the one packing policy).
"""

from __future__ import annotations

import torch

from ..layout import SeqInfo


def norm_bound(q_BSHD: torch.Tensor, k_BSHD: torch.Tensor, info: SeqInfo | None, scale: float) -> torch.Tensor:
    """(H,) float32: the max over visible pairs (same sequence, real tokens; ``info`` is the
    layers' structure, None for dense rows) of ``scale * ||q_i|| * ||k_j||`` (``output_s_max``)."""
    qn, kn = q_BSHD.float().norm(dim=-1), k_BSHD.float().norm(dim=-1)  # (B, S, H)
    H = qn.shape[-1]
    if info is None:
        return (qn.amax(1) * kn.amax(1)).amax(0) * scale
    doc = info.doc_ids.reshape(-1).long()
    real = (doc >= 0)[:, None]
    idx = doc.clamp_min(0)[:, None].expand(-1, H)
    # norms are >= 0, so 0 is neutral for the max: padding tokens drop out
    qd = qn.new_zeros(info.num_docs, H).scatter_reduce_(0, idx, qn.reshape(-1, H) * real, "amax")
    kd = kn.new_zeros(info.num_docs, H).scatter_reduce_(0, idx, kn.reshape(-1, H) * real, "amax")
    return (qd * kd).amax(0) * scale
