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
from .base import BoundMask, Geometry, Term, aligner

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

    # Packed query and key layouts (documents(q, kv=k), padding(..., kv=...)) define where each
    # query sits among the keys; every other term of the mask (windows, chunks, ALiBi) measures
    # from there. Terms without such a layout answer None.
    @property
    def packed_layout(self) -> bool:
        """Whether this term (or one inside it) has separate query and key layouts (structure)."""
        return False

    def alignment(self, geo: Geometry):
        """(Bd, Sq) int64 key position of every query, when this mask has packed query and key
        layouts; else None (bottom-right alignment of the whole row)."""
        return None


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
        pos, uses_b = aligner(geo)
        left, right = self.left, self.right

        def pred(b, h, q, kv):
            d = pos(b, q) - kv  # how far the key lies behind the query's position
            if left is None and right is None:
                return d == d  # every pair (a bool tensor of the grid's shape)
            if left is None:
                return d >= -right  # type: ignore[operator]
            if right is None:
                return d <= left
            return (d <= left) & (d >= -right)

        return BoundMask(pred, uses_b, False)


class _Combine(MaskTerm):
    """``&`` / ``|`` of several mask terms (flattened by canonical_mask)."""

    _sym = ""
    _is_and = True

    def __post_init__(self):
        super().__post_init__()
        # the canonical form, computed once here rather than on every call that passes this
        # object (set at construction: a compiled graph never sees the attribute appear later)
        object.__setattr__(self, "_canonical", (canonical_combination(self),))

    def __repr__(self) -> str:
        return f" {self._sym} ".join(_paren(t) for t in self.terms)  # type: ignore[attr-defined]

    # The generic Term plumbing, written out for the one field (a tuple of terms): a combination
    # is built on every call that writes its mask inline (documents(list) & causal()).
    def _structure(self) -> tuple:
        return (type(self).__name__, tuple([t.structure for t in self.terms]))  # type: ignore[attr-defined]

    def tensors(self) -> tuple:
        ts = self.__dict__.get("_tensors")
        if ts is None:
            ts = ()
            for t in self.terms:  # type: ignore[attr-defined]
                ts = ts + t.tensors()
            object.__setattr__(self, "_tensors", ts)
        return ts

    def content_key(self, tokens: list | None = None) -> tuple:
        hit = self.__dict__.get("_key")
        if hit is not None:
            if tokens is not None:
                tokens.extend(hit[1])
            return hit[0]
        mine: list = []
        k = (type(self).__name__, tuple([t.content_key(mine) for t in self.terms]))  # type: ignore[attr-defined]
        if not self.tensors():
            object.__setattr__(self, "_key", (k, tuple(mine)))
        if tokens is not None:
            tokens.extend(mine)
        return k

    def check(self, geo: Geometry) -> None:
        for t in self.terms:  # type: ignore[attr-defined]
            t.check(geo)
        check_layouts(self)

    @property
    def packed_layout(self) -> bool:
        return any(t.packed_layout for t in self.terms)  # type: ignore[attr-defined]

    def alignment(self, geo: Geometry):
        for t in self.terms:  # type: ignore[attr-defined]
            a = t.alignment(geo)
            if a is not None:
                return a
        return None

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

    @property
    def packed_layout(self) -> bool:
        return self.term.packed_layout

    def alignment(self, geo: Geometry):
        return self.term.alignment(geo)

    def bind(self, geo: Geometry) -> BoundMask:
        inner = self.term.bind(geo)
        p = inner.pred

        def pred(b, h, q, kv):
            return ~p(b, h, q, kv)

        return BoundMask(pred, inner.uses_b, inner.uses_h)


_CAUSAL = Window(None, 0)


def _leaves(term) -> list:
    if isinstance(term, (And, Or)):
        return [x for t in term.terms for x in _leaves(t)]
    if isinstance(term, Not):
        return _leaves(term.term)
    return [term]


def check_layouts(mask) -> None:
    """A mask with a packed query/key layout has exactly one batch-structure term: the one that
    defines where queries sit among the keys (two would disagree)."""
    leaves = _leaves(mask)
    if not any(t.packed_layout for t in leaves):
        return
    seq = [t for t in leaves if getattr(t, "is_sequence_structure", False)]
    if len(seq) > 1:
        raise bad_value(
            "mask", "one documents(...) or padding(...) term when queries and keys have separate layouts (kv=...)",
            " and ".join(repr(t) for t in seq),
        )  # fmt: skip


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


# --------------------------------------------------------------------------------------------
# canonical form of & / | (here, beside the classes: computed when a combination is built)


def canonical_part(t):
    """The canonical form of a mask term (anyattn.spec.canonical.canonical_mask checks the type)."""
    if type(t) is Window:
        return None if t.left is None and t.right is None else t
    if isinstance(t, (And, Or)):
        return t.__dict__["_canonical"][0]
    if isinstance(t, Not):
        inner = canonical_part(t.term)
        if isinstance(inner, Not):
            return inner.term
        if inner is None:  # ~everything: no key (the same object again, so combinations settle)
            return t if _is_everything(t.term) else _NOTHING
        return t if inner is t.term else Not(inner)
    return t


def _is_everything(t) -> bool:
    return type(t) is Window and t.left is None and t.right is None


_EVERYTHING = Window(None, None)
_NOTHING = Not(_EVERYTHING)


def _flatten(cls, terms) -> list:
    out = []
    for t in terms:
        if isinstance(t, cls):
            out.extend(_flatten(cls, t.terms))
        else:
            out.append(t)
    return out


def _min_side(a, b):
    if a is None:
        return b
    if b is None:
        return a
    return min(a, b)


def _max_side(a, b):
    return None if a is None or b is None else max(a, b)


def canonical_combination(mask):
    """The canonical form of an ``&`` / ``|`` (computed once, when it is built)."""
    cls = type(mask)
    windows = 0
    for t in mask.terms:  # the common case: leaves and at most one window, already canonical
        tt = type(t)
        if tt is Window:
            windows += 1
            if t.left is None and t.right is None:
                break
        elif tt in (And, Or, Not):
            break
    else:
        if windows <= 1:
            return mask
    if True:
        parts = [canonical_part(t) for t in _flatten(cls, mask.terms)]
        if cls is Or and any(p is None for p in parts):  # x | everything == everything ...
            layouts = [p for p in parts if p is not None and p.packed_layout]
            if not layouts:
                return None
            # ... but a packed query/key layout still says where each query sits (ALiBi, T5
            # buckets and windows measure from there): keep it, OR-ed with everything
            if (len(mask.terms) == len(layouts) + 1 and all(a is b for a, b in zip(mask.terms, layouts))
                    and _is_everything(mask.terms[-1])):  # fmt: skip
                return mask
            return Or((*layouts, _EVERYTHING))
        out: list = []
        win_at = None
        for p in parts:
            if p is None:
                continue
            if isinstance(p, cls):
                out.extend(p.terms)
                continue
            if isinstance(p, Window):
                if win_at is None:
                    win_at = len(out)
                    out.append(p)
                else:
                    w = out[win_at]
                    if cls is And:
                        out[win_at] = Window(_min_side(w.left, p.left), _min_side(w.right, p.right))
                    else:
                        out[win_at] = Window(_max_side(w.left, p.left), _max_side(w.right, p.right))
                continue
            out.append(p)
        out = [canonical_part(t) if isinstance(t, Window) else t for t in out]
        out = [t for t in out if t is not None] if cls is And else out
        if any(t is None for t in out):  # an Or that merged into "everything"
            return None
        if not out:
            return None
        if len(out) == 1:
            return out[0]
        if len(out) == len(mask.terms) and all(a is b for a, b in zip(out, mask.terms)):
            return mask  # already canonical: no new object (and no new keys to compute)
        return cls(tuple(out))
