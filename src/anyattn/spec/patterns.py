"""Pattern mask terms: prefix-LM, block-causal, segments, fixed-size chunks, user functions and
dense tensors."""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..errors import bad_type, bad_value
from .base import BoundMask, Geometry, aligner, check_broadcast, check_positional, fmt_arg, int_tensor, to_device
from .masks import MaskTerm

@dataclass(frozen=True, eq=False, repr=False)
class PrefixLM(MaskTerm):
    """Key j visible iff ``j < prefix_b`` or ``j <= i'``: bidirectional prefix, causal rest."""

    prefix: int | torch.Tensor

    def __repr__(self) -> str:
        return f"prefix_lm({fmt_arg(self.prefix)})"

    def _structure(self) -> tuple:  # the prefix length is a value: a new one is not a new decision
        p = self.prefix
        return ("PrefixLM", "int" if isinstance(p, int) else (tuple(p.shape), p.dtype, p.device))

    def check(self, geo: Geometry) -> None:
        if isinstance(self.prefix, torch.Tensor) and self.prefix.shape[0] not in (1, geo.B):
            raise bad_value("prefix_lm(prefix_lengths)", f"an int or shape ({geo.B},)", f"shape {tuple(self.prefix.shape)}")

    def bind(self, geo: Geometry) -> BoundMask:
        pos, ub = aligner(geo)
        if isinstance(self.prefix, int):
            p = self.prefix

            def pred_i(b, h, q, kv):
                return (kv < p) | (kv <= pos(b, q))

            return BoundMask(pred_i, ub, False)
        prefix = to_device(self.prefix, geo.device)
        if prefix.shape[0] == 1:
            p1 = prefix[0]

            def pred1(b, h, q, kv):
                return (kv < p1) | (kv <= pos(b, q))

            return BoundMask(pred1, ub, False)

        def pred(b, h, q, kv):
            return (kv < prefix[b]) | (kv <= pos(b, q))

        return BoundMask(pred, True, False)


@dataclass(frozen=True, eq=False, repr=False)
class _IdsTerm(MaskTerm):
    ids: torch.Tensor  # (Sk,) or (B, Sk) integer
    _name = ""

    def __repr__(self) -> str:
        return f"{self._name}(tensor{tuple(self.ids.shape)})"

    def check(self, geo: Geometry) -> None:
        check_positional(self._name, geo)
        arg = f"{self._name}(ids)"
        if self.ids.shape[-1] != geo.Sk:
            raise bad_value(arg, f"ids over the key length Sk={geo.Sk}", f"length {self.ids.shape[-1]}")
        if self.ids.dim() == 2 and self.ids.shape[0] not in (1, geo.B):
            raise bad_value(arg, f"shape (Sk,) or (B={geo.B}, Sk)", f"shape {tuple(self.ids.shape)}")

    def _bind_ids(self, geo: Geometry, rule) -> BoundMask:
        ids = to_device(self.ids, geo.device)
        if ids.dim() == 2 and ids.shape[0] == 1:
            ids = ids[0]
        if geo.align is not None:  # packed layouts: i' may fall outside the keys (no id there: nothing visible)
            pos, ub = aligner(geo)
            last = geo.Sk - 1

            def at(b, q):
                p = pos(b, q)
                return p.clamp(0, last), (p >= 0) & (p <= last)

            if ids.dim() == 1:

                def pred_a(b, h, q, kv):
                    p, ok = at(b, q)
                    return rule(ids[p], ids[kv]) & ok

                return BoundMask(pred_a, ub, False)

            def pred_ab(b, h, q, kv):
                p, ok = at(b, q)
                return rule(ids[b, p], ids[b, kv]) & ok

            return BoundMask(pred_ab, True, False)
        off = geo.offset
        if ids.dim() == 1:

            def pred(b, h, q, kv):
                return rule(ids[q + off], ids[kv])

            return BoundMask(pred, False, False)

        def pred_b(b, h, q, kv):
            return rule(ids[b, q + off], ids[b, kv])

        return BoundMask(pred_b, True, False)


@dataclass(frozen=True, eq=False, repr=False)
class BlockCausal(_IdsTerm):
    """Visible iff ``block_ids[j] <= block_ids[i']``: bidirectional within a block, causal across."""

    _name = "block_causal"

    def bind(self, geo: Geometry) -> BoundMask:
        return self._bind_ids(geo, lambda iq, ik: ik <= iq)


@dataclass(frozen=True, eq=False, repr=False)
class SameSegment(_IdsTerm):
    """Visible iff ``seg[i'] == seg[j]`` and ``seg[i'] >= 0`` (negative ids belong to no segment)."""

    _name = "same_segment"

    def bind(self, geo: Geometry) -> BoundMask:
        return self._bind_ids(geo, lambda iq, ik: (iq == ik) & (iq >= 0))


@dataclass(frozen=True, eq=False, repr=False)
class Chunked(MaskTerm):
    """Visible iff ``i' // size == j // size`` (fixed-size chunks, bidirectional within one)."""

    valueless = True

    size: int

    def __repr__(self) -> str:
        return f"chunked({self.size})"

    def bind(self, geo: Geometry) -> BoundMask:
        pos, ub = aligner(geo)
        size = self.size

        def pred(b, h, q, kv):
            return torch.div(pos(b, q), size, rounding_mode="floor") == torch.div(kv, size, rounding_mode="floor")

        return BoundMask(pred, ub, False)


@dataclass(frozen=True, eq=False, repr=False)
class MaskFn(MaskTerm):
    """User predicate ``fn(b, h, q_idx, kv_idx) -> bool`` (FlexAttention's mask_mod convention).

    ``q_idx`` is the raw query index (no alignment shift); the function must be written with
    tensor operations so it works on index grids and inside compiled kernels.
    """

    fn: Callable

    def __repr__(self) -> str:
        return f"mask_fn({getattr(self.fn, '__name__', 'fn')})"

    def check(self, geo: Geometry) -> None:
        # one evaluation on a 1-element grid: a function that returns a Python bool or a float
        # tensor is refused here, naming it, instead of failing inside a backend
        z = torch.zeros((), dtype=torch.int64, device=geo.device)
        try:
            r = self.fn(z, z, z, z)
        except Exception as e:  # noqa: BLE001 - re-raised with the term named
            raise bad_value(f"{self!r}", "a function fn(b, h, q_idx, kv_idx) of index tensors", f"{type(e).__name__}: {e}") from e
        if not isinstance(r, torch.Tensor) or r.dtype != torch.bool:
            got = f"dtype {r.dtype}" if isinstance(r, torch.Tensor) else f"a {type(r).__name__}"
            raise bad_type(f"{self!r} result", "a bool tensor (write it with tensor comparisons, e.g. q_idx >= kv_idx)", got)

    def bind(self, geo: Geometry) -> BoundMask:
        fn = self.fn

        def pred(b, h, q, kv):
            return fn(b, h, q, kv)

        return BoundMask(pred, True, True)


@dataclass(frozen=True, eq=False, repr=False)
class Dense(MaskTerm):
    """A boolean tensor broadcastable to (B, H, Sq, Sk): True = visible."""

    mask: torch.Tensor

    def __repr__(self) -> str:
        return f"dense(tensor{tuple(self.mask.shape)}, {str(self.mask.dtype).replace('torch.', '')})"

    def check(self, geo: Geometry) -> None:
        check_broadcast("dense(mask)", self.mask, geo)

    def bind(self, geo: Geometry) -> BoundMask:
        m = to_device(self.mask, geo.device)
        if m.dtype != torch.bool:
            m = m != 0
        while m.dim() < 4:
            m = m.unsqueeze(0)
        full = m.expand(geo.B, geo.H, geo.Sq, geo.Sk)
        uses_b, uses_h = m.shape[0] != 1, m.shape[1] != 1

        def pred(b, h, q, kv):
            return full[b, h, q, kv]

        return BoundMask(pred, uses_b, uses_h, m)



def prefix_lm(prefix_lengths) -> MaskTerm:
    """Prefix-LM: key j visible iff ``j < prefix_b`` or ``j <= i'`` (int or (B,) lengths)."""
    if isinstance(prefix_lengths, int) and not isinstance(prefix_lengths, bool):
        if prefix_lengths < 0:
            raise bad_value("prefix_lm(prefix_lengths)", "a non-negative int or (B,) tensor", prefix_lengths)
        return PrefixLM(prefix_lengths)
    return PrefixLM(int_tensor("prefix_lm(prefix_lengths)", prefix_lengths, dims=(1,)))


def block_causal(block_ids) -> MaskTerm:
    """Key j visible iff ``block_ids[j] <= block_ids[i']``; ids (Sk,) shared or (B, Sk)."""
    return BlockCausal(int_tensor("block_causal(block_ids)", block_ids, dims=(1, 2), nonneg=False))


def same_segment(segment_ids) -> MaskTerm:
    """Key j visible iff ``seg[i'] == seg[j] >= 0``; ids (Sk,) shared or (B, Sk); -1 = none."""
    return SameSegment(int_tensor("same_segment(segment_ids)", segment_ids, dims=(1, 2), nonneg=False))


def chunked(size: int) -> MaskTerm:
    """Key j visible iff ``i' // size == j // size``."""
    if isinstance(size, bool) or not isinstance(size, int):
        raise bad_type("chunked(size)", "a positive int", type(size).__name__)
    if size <= 0:
        raise bad_value("chunked(size)", "a positive int", size)
    return _chunked(size)


@functools.lru_cache(maxsize=256)
def _chunked(size: int) -> Chunked:
    return Chunked(size)


def mask_fn(fn: Callable) -> MaskTerm:
    """A FlexAttention-style predicate ``fn(b, h, q_idx, kv_idx) -> bool tensor``."""
    if not callable(fn):
        raise bad_type("mask_fn(fn)", "a callable fn(b, h, q_idx, kv_idx)", type(fn).__name__)
    return MaskFn(fn)


def dense(mask: torch.Tensor) -> MaskTerm:
    """A bool (or 0/1 uint8) tensor broadcastable to (B, H, Sq, Sk); True = visible."""
    if not isinstance(mask, torch.Tensor):
        raise bad_type("dense(mask)", "a bool tensor", type(mask).__name__)
    if mask.dtype not in (torch.bool, torch.uint8):
        raise bad_type("dense(mask)", "a bool or uint8 tensor (True/1 = visible)", f"dtype {mask.dtype}")
    if mask.dim() > 4:
        raise bad_value("dense(mask)", "at most 4 dimensions (B, H, Sq, Sk)", f"shape {tuple(mask.shape)}")
    return Dense(mask)


# --------------------------------------------------------------------------------------------
