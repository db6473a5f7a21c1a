"""Mask terms: which (query i, key j) pairs are visible. Composition with ``&``, ``|``, ``~``.

This module holds the base class, the combinators and the window terms (``causal``,
``sliding_window``); ``sequences`` the batch-structure terms (``documents``, ``padding``) and
``patterns`` the others (prefix-LM, block-causal, segments, chunks, functions, dense tensors).

Every term's visibility rule is written once, as a *predicate* on index tensors
``pred(b, h, q, kv) -> bool``: on broadcast index grids it materializes the mask (eager and SDPA
backends); on FlexAttention's scalar indices it *is* the ``mask_mod``. So the dense mask and the
flex mask cannot drift apart. Alignment (bottom-right when Sq != Sk) is defined in
``anyattn.spec``'s docstring.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass


from ..errors import bad_type, bad_value
from .base import BoundMask, Geometry, Term

class MaskTerm(Term):
    """Base of all mask terms. Combine with ``&`` (both visible), ``|`` (either), ``~`` (not)."""

    def __and__(self, other: MaskTerm) -> MaskTerm:
        _check_mask_operand(other, "&")
        return And((self, other))

    def __or__(self, other: MaskTerm) -> MaskTerm:
        _check_mask_operand(other, "|")
        return Or((self, other))

    def __invert__(self) -> MaskTerm:
        return Not(self)

    # Bound to a geometry; `dev` moves the term's tensors to the call's device (cached by caller).
    def bind(self, geo: Geometry) -> BoundMask:  # pragma: no cover - abstract
        raise NotImplementedError

    def check(self, geo: Geometry) -> None:
        """Validate against a concrete call (shapes, lengths); raise ArgumentError."""


def _check_mask_operand(other, op: str) -> None:
    if not isinstance(other, MaskTerm):
        raise bad_type(f"mask operand of '{op}'", "a mask term such as causal()", type(other).__name__)



@dataclass(frozen=True, eq=False, repr=False)
class Window(MaskTerm):
    """Key j visible from query i iff ``i' - left <= j <= i' + right`` (None = unbounded).

    ``causal()`` is ``Window(None, 0)``. ``left``/``right`` count keys beside the query itself:
    ``sliding_window(3)`` lets a query see itself and the 3 keys before it (4 keys in all).
    ``Window(None, None)`` (everything) exists only inside ``~``: canonical forms drop it.
    """

    valueless = True

    left: int | None
    right: int | None

    def __repr__(self) -> str:
        if self.left is None and self.right == 0:
            return "causal()"
        if self.right == 0:
            return f"sliding_window({self.left})"
        return f"sliding_window({self.left}, {self.right})"

    @property
    def is_causal(self) -> bool:
        return self.left is None and self.right == 0

    def bind(self, geo: Geometry) -> BoundMask:
        off, left, right = geo.offset, self.left, self.right

        def pred(b, h, q, kv):
            d = (q + off) - kv  # how far the key lies behind the query's position
            if left is None and right is None:
                return d == d  # every pair (a bool tensor of the grid's shape)
            if left is None:
                return d >= -right  # type: ignore[operator]
            if right is None:
                return d <= left
            return (d <= left) & (d >= -right)

        return BoundMask(pred, False, False)


class _Combine(MaskTerm):
    """``&`` / ``|`` of several mask terms (flattened by canonical_mask)."""

    _sym = ""
    _is_and = True

    def __post_init__(self):
        super().__post_init__()
        # the canonical form, computed once here rather than on every call that passes this
        # object (set at construction: a compiled graph never sees the attribute appear later)
        from .canonical import canonical_combination

        object.__setattr__(self, "_canonical", (canonical_combination(self),))

    def __repr__(self) -> str:
        return f" {self._sym} ".join(_paren(t) for t in self.terms)  # type: ignore[attr-defined]

    def check(self, geo: Geometry) -> None:
        for t in self.terms:  # type: ignore[attr-defined]
            t.check(geo)

    def bind(self, geo: Geometry) -> BoundMask:
        bs = [t.bind(geo) for t in self.terms]  # type: ignore[attr-defined]
        preds, is_and = [x.pred for x in bs], self._is_and

        def pred(b, h, q, kv):  # plain & / | (dynamo traces these inside compiled mask_mods)
            out = preds[0](b, h, q, kv)
            for p in preds[1:]:
                out = (out & p(b, h, q, kv)) if is_and else (out | p(b, h, q, kv))
            return out

        return BoundMask(pred, any(x.uses_b for x in bs), any(x.uses_h for x in bs))


@dataclass(frozen=True, eq=False, repr=False)
class And(_Combine):
    terms: tuple
    _sym = "&"
    _is_and = True


@dataclass(frozen=True, eq=False, repr=False)
class Or(_Combine):
    terms: tuple
    _sym = "|"
    _is_and = False


@dataclass(frozen=True, eq=False, repr=False)
class Not(MaskTerm):
    term: MaskTerm

    def __repr__(self) -> str:
        return f"~{_paren(self.term)}"

    def check(self, geo: Geometry) -> None:
        self.term.check(geo)

    def bind(self, geo: Geometry) -> BoundMask:
        inner = self.term.bind(geo)
        p = inner.pred

        def pred(b, h, q, kv):
            return ~p(b, h, q, kv)

        return BoundMask(pred, inner.uses_b, inner.uses_h)


_CAUSAL = Window(None, 0)


def _paren(t: MaskTerm) -> str:
    return f"({t!r})" if isinstance(t, (And, Or)) else repr(t)


# --------------------------------------------------------------------------------------------
# Mask factories (the public names)


def causal() -> MaskTerm:
    """Key j visible iff ``j <= i'`` (bottom-right aligned when Sq != Sk)."""
    return _CAUSAL


def _check_window_side(name: str, v) -> int | None:
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int):
        raise bad_type(name, "a non-negative int or None", type(v).__name__)
    if v < 0:
        raise bad_value(name, "a non-negative int or None (None = unbounded)", v)
    return v


@functools.lru_cache(maxsize=256)
def _window(left, right) -> Window:
    # Terms are immutable, so equal windows can be one object: building a frozen dataclass and
    # its key costs microseconds, and these factories run on every attention call.
    return Window(left, right)


def sliding_window(left: int | None, right: int | None = 0) -> MaskTerm:
    """Key j visible iff ``i' - left <= j <= i' + right``; None = unbounded on that side.

    ``left`` and ``right`` count keys beside the query itself (FlashAttention's ``window_size``
    convention): ``sliding_window(1024)`` sees the query's own position and 1024 keys before it.
    HF's ``sliding_window=W`` (W keys including self) is ``sliding_window(W - 1)``.
    """
    if type(left) is int and type(right) is int and left >= 0 and right >= 0:
        return _window(left, right)
    return _window(_check_window_side("sliding_window(left)", left), _check_window_side("sliding_window(right)", right))
