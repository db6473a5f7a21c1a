"""Score terms: what changes the logit ``s = scale * <q_i, k_j>`` before the mask applies,
in the order given. Each rule is written once as ``mod(score, b, h, q, kv) -> score`` (the
FlexAttention ``score_mod`` convention); additive terms also give their bias as a tensor (SDPA).
"""

from __future__ import annotations

import functools
import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..errors import bad_type, bad_value
from .base import BoundScore, Geometry, Term, aligner, check_broadcast, float_tensor, to_device

class ScoreTerm(Term):
    """Base of score terms; ``score=`` takes one or a sequence applied in order."""

    additive = False  # True: s -> s + f(b, h, i, j), expressible as an attention bias

    def bind(self, geo: Geometry) -> BoundScore:  # pragma: no cover - abstract
        raise NotImplementedError

    def check(self, geo: Geometry) -> None:
        pass


@dataclass(frozen=True, eq=False, repr=False)
class Softcap(ScoreTerm):
    valueless = True
    cap: float

    def __repr__(self) -> str:
        return f"softcap({self.cap})"

    def bind(self, geo: Geometry) -> BoundScore:
        cap = self.cap

        def mod(s, b, h, q, kv):
            return cap * torch.tanh(s / cap)

        return BoundScore(mod, False, False, False, None)


@dataclass(frozen=True, eq=False, repr=False)
class Alibi(ScoreTerm):
    additive = True
    slopes: torch.Tensor

    def __repr__(self) -> str:
        return f"alibi(tensor{tuple(self.slopes.shape)})"

    def check(self, geo: Geometry) -> None:
        if self.slopes.shape[0] != geo.H:
            raise bad_value("alibi(slopes)", f"one slope per query head, shape ({geo.H},)", f"shape {tuple(self.slopes.shape)}")

    def bind(self, geo: Geometry) -> BoundScore:
        raw = to_device(self.slopes, geo.device)
        slopes = raw.float()  # fused kernels' score_mods compute in float32
        wide = raw.to(_dense_dtype(raw))  # the dense form keeps float64 slopes (the float64 oracle)
        pos, ub = aligner(geo)

        def mod(s, b, h, q, kv):
            return s - slopes[h] * (pos(b, q) - kv).abs()

        def dense_bias():
            bb = torch.arange(geo.B if ub else 1, device=geo.device).view(-1, 1, 1, 1)
            hh = torch.arange(geo.H, device=geo.device).view(1, -1, 1, 1)
            qq = torch.arange(geo.Sq, device=geo.device).view(1, 1, -1, 1)
            kk = torch.arange(geo.Sk, device=geo.device).view(1, 1, 1, -1)
            return -(wide[hh] * (pos(bb, qq) - kk).abs())

        return BoundScore(mod, True, ub, True, dense_bias)


@dataclass(frozen=True, eq=False, repr=False)
class Bias(ScoreTerm):
    additive = True
    tensor: torch.Tensor

    def __repr__(self) -> str:
        return f"bias(tensor{tuple(self.tensor.shape)})"

    def check(self, geo: Geometry) -> None:
        check_broadcast("bias(tensor)", self.tensor, geo)

    def bind(self, geo: Geometry) -> BoundScore:
        t = to_device(self.tensor, geo.device)
        # finfo.min is how additive masks are commonly written (HF's 4-D masks): such an entry is
        # a mask, so it becomes -inf and behaves exactly like one on every backend (fused
        # kernels that scale logits by 1/ln 2 would otherwise overflow it to -inf on some rows
        # and not on others).
        t = t.masked_fill(t <= torch.finfo(t.dtype).min, float("-inf"))
        t4 = t
        while t4.dim() < 4:
            t4 = t4.unsqueeze(0)
        full = t4.expand(geo.B, geo.H, geo.Sq, geo.Sk)

        def mod(s, b, h, q, kv):
            return s + full[b, h, q, kv]

        return BoundScore(mod, True, t4.shape[0] != 1, t4.shape[1] != 1, lambda: t4.to(_dense_dtype(t4)))


def _dense_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype of an additive term's dense form: float32, or float64 for a float64 tensor (half
    precision terms are widened; a float64 term is not narrowed: eager on float64 is the oracle)."""
    return torch.promote_types(t.dtype, torch.float32)


def t5_bucket(rel: torch.Tensor, num_buckets: int, max_distance: int, bidirectional: bool) -> torch.Tensor:
    """T5's relative-position bucket of ``rel = j - i'`` (Raffel et al. 2020, section 2.1)."""
    n_b = num_buckets
    out = torch.zeros_like(rel)
    if bidirectional:
        n_b //= 2
        out = out + (rel > 0).to(rel.dtype) * n_b
        n = rel.abs()
    else:
        n = torch.clamp(-rel, min=0)
    max_exact = n_b // 2
    is_small = n < max_exact
    # log(0) is avoided by the clamp; those positions take the exact branch anyway
    large = max_exact + (
        torch.log(n.clamp(min=1).float() / max_exact) / math.log(max_distance / max_exact) * (n_b - max_exact)
    ).to(rel.dtype)
    large = torch.clamp(large, max=n_b - 1)
    return out + torch.where(is_small, n, large)


@dataclass(frozen=True, eq=False, repr=False)
class RelativeBias(ScoreTerm):
    additive = True
    table: torch.Tensor  # (H, num_buckets)
    num_buckets: int
    max_distance: int
    bidirectional: bool

    def __repr__(self) -> str:
        return (
            f"relative_bias(tensor{tuple(self.table.shape)}, num_buckets={self.num_buckets}, "
            f"max_distance={self.max_distance}, bidirectional={self.bidirectional})"
        )

    def check(self, geo: Geometry) -> None:
        if self.table.shape[0] != geo.H:
            raise bad_value("relative_bias(table)", f"shape (H={geo.H}, num_buckets)", f"shape {tuple(self.table.shape)}")

    def bind(self, geo: Geometry) -> BoundScore:
        table = to_device(self.table, geo.device)
        pos, ub = aligner(geo)
        nb, md, bi = self.num_buckets, self.max_distance, self.bidirectional

        def mod(s, b, h, q, kv):
            return s + table[h, t5_bucket(kv - pos(b, q), nb, md, bi)]

        def dense_bias():
            bb = torch.arange(geo.B if ub else 1, device=geo.device).view(-1, 1, 1, 1)
            hh = torch.arange(geo.H, device=geo.device).view(1, -1, 1, 1)
            qq = torch.arange(geo.Sq, device=geo.device).view(1, 1, -1, 1)
            kk = torch.arange(geo.Sk, device=geo.device).view(1, 1, 1, -1)
            bucket = t5_bucket(kk - pos(bb, qq), nb, md, bi)  # (Bd, 1, Sq, Sk)
            return table.to(_dense_dtype(table))[hh, bucket]  # (Bd, H, Sq, Sk)

        return BoundScore(mod, True, ub, True, dense_bias)


@dataclass(frozen=True, eq=False, repr=False)
class ScoreFn(ScoreTerm):
    fn: Callable

    def __repr__(self) -> str:
        return f"score_fn({getattr(self.fn, '__name__', 'fn')})"

    def check(self, geo: Geometry) -> None:
        # one evaluation on 1-element tensors: a function returning a Python number (or a tensor
        # of another shape) is refused here, naming it, instead of failing inside a backend
        z = torch.zeros((), dtype=torch.int64, device=geo.device)
        s = torch.zeros((), dtype=torch.float32, device=geo.device)
        try:
            r = self.fn(s, z, z, z, z)
        except Exception as e:  # noqa: BLE001 - re-raised with the term named
            raise bad_value(f"{self!r}", "a function fn(score, b, h, q_idx, kv_idx) of tensors", f"{type(e).__name__}: {e}") from e
        if not isinstance(r, torch.Tensor) or not r.dtype.is_floating_point or r.dim() != 0:
            got = f"a tensor of shape {tuple(r.shape)}, dtype {r.dtype}" if isinstance(r, torch.Tensor) else f"a {type(r).__name__}"
            raise bad_type(
                f"{self!r} result", "a floating-point tensor shaped like score (use tensor ops, e.g. score * 0.5 or torch.clamp(score, ...))", got
            )

    def bind(self, geo: Geometry) -> BoundScore:
        return BoundScore(self.fn, False, True, True, None)


@dataclass(frozen=True, eq=False, repr=False)
class Sink(ScoreTerm):
    """Learnable attention sinks: one extra logit per query head in every row's softmax
    denominator, attached to no value (GPT-OSS, StreamingLLM's learned variant)::

        out_i = sum_j exp(s_ij) v_j / (exp(sink[h]) + sum_j exp(s_ij))
              = out_plain_i * sigmoid(lse_plain_i - sink[h])
        lse_i = log(exp(sink[h]) + sum_j exp(s_ij))          (the returned lse includes the sink)

    It changes no logit, so it is not applied with the others: backends with a softmax of their
    own put it in the denominator (eager), the rest combine their output with their lse
    (:meth:`combine`, exact; gradients reach the sink logits, and q/k through the lse where the
    backend differentiates it). A row that sees no key outputs 0 and its lse is ``sink[h]``.
    """

    logits: torch.Tensor  # (Hq,) floating point; any dtype, may require grad

    def __repr__(self) -> str:
        return f"sink(tensor{tuple(self.logits.shape)})"

    def check(self, geo: Geometry) -> None:
        if tuple(self.logits.shape) != (geo.H,):
            raise bad_value("sink(logits)", f"one logit per query head, shape ({geo.H},)", f"shape {tuple(self.logits.shape)}")

    def bind(self, geo: Geometry) -> BoundScore:  # pragma: no cover - never bound (see Call.bound_scores)
        raise RuntimeError("sink() changes the softmax denominator, not a logit; backends handle it (a bug in anyattn)")

    def column(self, device, dtype) -> torch.Tensor:
        """The sink logits as a (1, Hq, 1, 1) tensor of ``dtype`` on ``device`` (differentiable)."""
        return self.logits.to(device=device, dtype=dtype).view(1, -1, 1, 1)

    def combine(self, out: torch.Tensor, lse: torch.Tensor):
        """(out, lse) of attention without the sink -> (out, lse) with it. ``out`` (B, Hq, Sq, Dv),
        ``lse`` (B, Hq, Sq) natural log, -inf on rows that see no key. Computed in float32
        (float64 for float64 outputs); differentiable in all three inputs."""
        c = torch.promote_types(torch.promote_types(out.dtype, lse.dtype), torch.float32)
        sink = self.column(lse.device, c)[..., 0]  # (1, Hq, 1)
        lse_c = lse.to(c)
        w = torch.sigmoid(lse_c - sink)  # exp(lse) / (exp(lse) + exp(sink)); 0 on rows without keys
        out = (out.to(c) * w[..., None]).to(out.dtype)
        return out, torch.logaddexp(lse_c, sink).to(lse.dtype)


def split_sink(scores) -> tuple:
    """(the Sink of ``scores`` or None, the other score terms in order)."""
    sink = None
    rest = []
    for s in scores:
        if isinstance(s, Sink):
            sink = s
        else:
            rest.append(s)
    return sink, tuple(rest)


def sink(logits: torch.Tensor) -> ScoreTerm:
    """Learnable attention sinks: ``logits`` (Hq,) add ``exp(logits[h])`` to every row's softmax
    denominator with no value attached; gradients flow to them. See :class:`Sink`."""
    return Sink(float_tensor("sink(logits)", logits, (1,), "shape (Hq,)"))


def softcap(cap: float) -> ScoreTerm:
    """``s <- cap * tanh(s / cap)`` (Gemma-2 style logit soft-capping)."""
    if isinstance(cap, bool) or not isinstance(cap, numbers.Real):
        raise bad_type("softcap(cap)", "a positive finite float", type(cap).__name__)
    if not math.isfinite(cap) or cap <= 0:
        raise bad_value("softcap(cap)", "a positive finite float", cap)
    return _softcap(float(cap))


@functools.lru_cache(maxsize=256)
def _softcap(cap: float) -> Softcap:
    return Softcap(cap)



def alibi(slopes: torch.Tensor) -> ScoreTerm:
    """ALiBi: ``s <- s - slopes[h] * |i' - j|``; slopes (Hq,) floating point."""
    return Alibi(float_tensor("alibi(slopes)", slopes, (1,), "shape (Hq,)"))


def bias(tensor: torch.Tensor) -> ScoreTerm:
    """Additive bias ``s <- s + tensor[b, h, i, j]`` (broadcast to (B, Hq, Sq, Sk)); gradients flow."""
    return Bias(float_tensor("bias(tensor)", tensor, (0, 1, 2, 3, 4), "a tensor broadcastable to (B, Hq, Sq, Sk)"))


def relative_bias(table: torch.Tensor, num_buckets: int, max_distance: int, bidirectional: bool = True) -> ScoreTerm:
    """T5 bucketed relative-position bias: ``s <- s + table[h, bucket(j - i')]``; table (Hq, num_buckets)."""
    table = float_tensor("relative_bias(table)", table, (2,), "shape (Hq, num_buckets)")
    for name, v in (("num_buckets", num_buckets), ("max_distance", max_distance)):
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise bad_value(f"relative_bias({name})", "a positive int", v)
    if table.shape[1] != num_buckets:
        raise bad_value("relative_bias(table)", f"shape (Hq, num_buckets={num_buckets})", f"shape {tuple(table.shape)}")
    min_buckets = 4 if bidirectional else 2
    if num_buckets < min_buckets:
        raise bad_value("relative_bias(num_buckets)", f"at least {min_buckets}", num_buckets)
    max_exact = (num_buckets // 2 if bidirectional else num_buckets) // 2
    if max_distance <= max_exact:
        raise bad_value("relative_bias(max_distance)", f"more than the exact-bucket range {max_exact}", max_distance)
    return RelativeBias(table, num_buckets, max_distance, bool(bidirectional))


def score_fn(fn: Callable) -> ScoreTerm:
    """A FlexAttention-style ``fn(score, b, h, q_idx, kv_idx) -> score`` (raw q_idx)."""
    if not callable(fn):
        raise bad_type("score_fn(fn)", "a callable fn(score, b, h, q_idx, kv_idx)", type(fn).__name__)
    return ScoreFn(fn)


