"""Poolers: a sequence's residue vectors (n, C) -> one vector (C,), on the device or the host.

Every pooler reads the **residues** only (the family's special tokens, e.g. ``<cls>``/``<eos>``,
are excluded) except ``cls`` and ``eos``, which read one special token. Pooling runs in float32
(host: float64 sums) and is cast to the store dtype afterwards. With n residues x_1..x_n, per
channel:

    mean    sum(x) / n
    max     max(x)                  min     min(x)
    norm    sqrt(sum(x^2))          (the L2 norm over the residues)
    median  the middle value; for even n the mean of the two middle values
    var     sum((x - mean)^2) / n   (population variance: 0 for n = 1, never NaN)
    std     sqrt(var)
    cls     the first token of the sequence (<cls>, <cls_aa>, E1's <bos>); not for ANKH (none)
    eos     the last token of the sequence (<eos>, <eos_aa>, </s>)
    none    no pooling: the (n, C) residue vectors (alone; it cannot be combined)

Several poolers are concatenated in the order given: ``["mean", "max"]`` gives (2C,), mean in
columns 0..C-1 and max in C..2C-1. With a layer axis (``layers`` a list) a row is (n_layers,
P*C); :func:`columns` says which columns of the flattened row come from which layer and pooler.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ..errors import bad_value

__all__ = ["POOLERS", "parse_pooling", "columns"]

POOLERS = ("mean", "max", "min", "norm", "median", "std", "var", "cls", "eos", "none")
_TOKEN_POOLERS = ("cls", "eos")  # one special token, no residues


def parse_pooling(pooling) -> tuple:
    """``"mean"``, ``"mean,max"`` or ``["mean", "max"]`` -> ``("mean", "max")``; ``"none"`` alone."""
    if isinstance(pooling, str):
        names = [p.strip() for p in pooling.split(",")]
    elif isinstance(pooling, (list, tuple)) and all(isinstance(p, str) for p in pooling):
        names = [p.strip() for p in pooling]
    else:
        raise bad_value("pooling", f"one of {POOLERS}, a comma-separated string or a list of them", repr(pooling))
    if not names or any(p not in POOLERS for p in names):
        bad = [p for p in names if p not in POOLERS] or names
        raise bad_value("pooling", f"one of {POOLERS}, or several of them (a list or 'mean,max')", repr(bad[0] if len(bad) == 1 else pooling))
    if len(set(names)) != len(names):
        raise bad_value("pooling", "each pooler at most once", repr(pooling))
    if "none" in names and len(names) > 1:
        raise bad_value("pooling", "'none' (per-residue output) alone: it cannot be concatenated with pooled vectors", repr(pooling))
    return tuple(names)


def columns(poolers, layers, layer_axis: bool, hidden: int) -> list:
    """Column blocks of a pooled row flattened in C order (``row.reshape(-1)``): one dict per
    (layer, pooler) with ``start``/``stop``. Layer-major when there is a layer axis."""
    out, start = [], 0
    for layer in layers if layer_axis else layers[:1]:
        for p in poolers:
            out.append({"layer": layer, "pooler": p, "start": start, "stop": start + hidden})
            start += hidden
    return out


# ------------------------------------------------------------------------------ device
class PoolPlan(NamedTuple):
    """Index tensors of one batch, on the device, shared by every layer: sequence d's residues are
    tokens ``idx_DM[d, :n_D[d]]`` of the packed row (the rest of the row repeats a valid index and
    is masked out)."""

    idx_DM: torch.Tensor | None  # (D, M) int64 token index of each residue slot (None: no residue pooler)
    valid_DM1: torch.Tensor | None  # (D, M, 1) bool, slot holds a residue
    cnt_D1: torch.Tensor | None  # (D, 1) float32 residues per sequence
    lo_D11: torch.Tensor | None  # (D, 1, 1) int64 lower middle slot (median)
    hi_D11: torch.Tensor | None  # (D, 1, 1) int64 upper middle slot (median)
    first_D: torch.Tensor  # (D,) int64 the sequence's first token (cls)
    last_D: torch.Tensor  # (D,) int64 the sequence's last token (eos)


def pool_plan(tok_start_D, n_D, prefix: int, suffix: int, poolers, M: int, T: int) -> PoolPlan:
    """``tok_start_D`` (D,) int64 first token of each sequence, ``n_D`` (D,) int64 its residues
    (after ``prefix`` specials, followed by ``suffix``), ``M`` the longest n, ``T`` the row's tokens;
    all on the device."""
    res_start = tok_start_D + prefix
    last = res_start + n_D + (suffix - 1)
    if all(p in _TOKEN_POOLERS for p in poolers):
        return PoolPlan(None, None, None, None, None, tok_start_D, last)
    ar = torch.arange(M, device=tok_start_D.device)
    idx = (res_start[:, None] + ar[None]).clamp_max(T - 1)
    valid = (ar[None] < n_D[:, None])[:, :, None]
    lo = hi = None
    if "median" in poolers:
        lo, hi = ((n_D - 1) // 2)[:, None, None], (n_D // 2)[:, None, None]
    return PoolPlan(idx, valid, n_D.to(torch.float32)[:, None], lo, hi, tok_start_D, last)


def pool_device(h_TC, plan: PoolPlan, poolers):
    """Pool one layer's packed hidden states ``h_TC`` (T, C) with ``plan``; returns (D, P*C)
    float32, the poolers concatenated in order."""
    out = []
    if plan.idx_DM is not None:
        g = h_TC[plan.idx_DM].float()  # (D, M, C)
        v = plan.valid_DM1
        zeroed = g * v
        mean = None
    for p in poolers:
        if p == "cls":
            out.append(h_TC[plan.first_D].float())
        elif p == "eos":
            out.append(h_TC[plan.last_D].float())
        elif p in ("mean", "var", "std"):
            if mean is None:
                mean = zeroed.sum(1) / plan.cnt_D1
            if p == "mean":
                out.append(mean)
            else:
                var = ((g - mean[:, None]) * v).square().sum(1) / plan.cnt_D1
                out.append(var if p == "var" else var.sqrt())
        elif p == "max":
            out.append(g.masked_fill(~v, float("-inf")).amax(1))
        elif p == "min":
            out.append(g.masked_fill(~v, float("inf")).amin(1))
        elif p == "norm":
            out.append(zeroed.square().sum(1).sqrt())
        elif p == "median":
            srt = g.masked_fill(~v, float("inf")).sort(1).values  # the residues first, ascending
            C = srt.shape[-1]
            lo = srt.gather(1, plan.lo_D11.expand(-1, 1, C))
            hi = srt.gather(1, plan.hi_D11.expand(-1, 1, C))
            out.append(((lo + hi) / 2).squeeze(1))
        else:  # pragma: no cover - parse_pooling refuses the rest
            raise AssertionError(p)
    return torch.cat(out, dim=-1)


# ------------------------------------------------------------------------------ host
def pool_host(x_LNC, poolers, cls_LC=None, eos_LC=None):
    """The same poolers on the host (numpy, float64 sums): ``x_LNC`` (L, n, C) residue vectors of
    a whole sequence (the chunks of a split sequence, concatenated). Returns (L, P*C) float64."""
    from .store import _np

    np = _np()
    x = np.asarray(x_LNC, dtype=np.float64)
    out = []
    for p in poolers:
        if p == "mean":
            out.append(x.mean(1))
        elif p == "max":
            out.append(x.max(1))
        elif p == "min":
            out.append(x.min(1))
        elif p == "norm":
            out.append(np.sqrt(np.square(x).sum(1)))
        elif p == "median":
            out.append(np.median(x, axis=1))
        elif p == "var":
            out.append(x.var(1))
        elif p == "std":
            out.append(x.std(1))
        else:  # cls / eos of a split sequence are refused by the job
            raise AssertionError(p)
    return np.concatenate(out, axis=-1)
