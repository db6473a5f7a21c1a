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
def pool_device(h_TC, tok_start_D, n_D, prefix: int, suffix: int, poolers, M: int):
    """Pool one layer's packed hidden states. ``h_TC`` (T, C) (the batch's tokens); per sequence
    d: its first token at ``tok_start_D[d]`` (int64 tensor on the device), then ``prefix``
    specials, ``n_D[d]`` residues (int64 tensor) and ``suffix`` specials; ``M`` the longest n.
    Returns (D, P*C) float32."""
    T = h_TC.shape[0]
    dev = h_TC.device
    res_start = tok_start_D + prefix
    out = []
    need_res = any(p not in _TOKEN_POOLERS for p in poolers)
    if need_res:
        ar = torch.arange(M, device=dev)
        idx_DM = (res_start[:, None] + ar[None]).clamp_max(T - 1)
        valid_DM1 = (ar[None] < n_D[:, None])[:, :, None]
        g = h_TC[idx_DM].float()  # (D, M, C)
        cnt = n_D.to(torch.float32)[:, None]
        zeros = g * valid_DM1
        mean = None
    for p in poolers:
        if p == "cls":
            out.append(h_TC[tok_start_D].float())
        elif p == "eos":
            out.append(h_TC[res_start + n_D + (suffix - 1)].float())
        elif p in ("mean", "var", "std"):
            if mean is None:
                mean = zeros.sum(1) / cnt
            if p == "mean":
                out.append(mean)
            else:
                var = ((g - mean[:, None]) * valid_DM1).square().sum(1) / cnt
                out.append(var if p == "var" else var.sqrt())
        elif p == "max":
            out.append(g.masked_fill(~valid_DM1, float("-inf")).amax(1))
        elif p == "min":
            out.append(g.masked_fill(~valid_DM1, float("inf")).amin(1))
        elif p == "norm":
            out.append(zeros.square().sum(1).sqrt())
        elif p == "median":
            s = g.masked_fill(~valid_DM1, float("inf")).sort(1).values  # valid values first, ascending
            C = s.shape[-1]
            lo = ((n_D - 1) // 2)[:, None, None].expand(-1, 1, C)
            hi = (n_D // 2)[:, None, None].expand(-1, 1, C)
            out.append((s.gather(1, lo) + s.gather(1, hi)).squeeze(1) / 2)
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
