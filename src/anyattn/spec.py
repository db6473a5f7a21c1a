"""Attention variants as data: mask terms, score terms, composition and canonical form.

A *mask term* says which (query i, key j) pairs are visible; a *score term* changes the logit
``s = scale * <q_i, k_j>`` before the mask applies. Terms are small frozen objects with a readable
repr; masks compose with ``&``, ``|`` and ``~``.

Shape legend used in this file:
    B  batch            H  query heads          Sq query length       Sk key length
    Bd batch of a term (1 = shared by every row, or B)

Alignment (defined once, used by every term). When Sq != Sk the query i sits at key position
``i' = i + (Sk - Sq)`` (bottom-right, as in FlashAttention and KV-cache decoding)::

    causal(), Sq=2, Sk=5          key j:  0 1 2 3 4
        query 0 (i'=3)                    x x x x .
        query 1 (i'=4)                    x x x x x

    causal(), Sq=5, Sk=2          query 0..2 (i' = -3..-1) see no key -> output 0, lse -inf
        query 3 (i'=0)                    x .
        query 4 (i'=1)                    x x

Every term's visibility rule is written once, as a *predicate* on index tensors
``pred(b, h, q, kv) -> bool``. The same predicate serves two purposes:

* on broadcast index grids ``b (B,1,1,1), h (1,H,1,1), q (1,1,Sq,1), kv (1,1,1,Sk)`` it
  materializes the mask (eager and SDPA backends);
* on FlexAttention's scalar indices it *is* the ``mask_mod`` (flex backend).

So the dense mask and the flex mask cannot drift apart. Score terms are written the same way, as
``mod(score, b, h, q, kv) -> score``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

from .errors import bad_type, bad_value

__all__ = [
    "MaskTerm",
    "ScoreTerm",
    "causal",
    "sliding_window",
    "documents",
    "padding",
    "prefix_lm",
    "block_causal",
    "same_segment",
    "chunked",
    "mask_fn",
    "dense",
    "softcap",
    "alibi",
    "bias",
    "relative_bias",
    "score_fn",
    "canonical_mask",
    "canonical_scores",
]


# --------------------------------------------------------------------------------------------
# Call geometry handed to terms when they are bound to a concrete call.


class Geometry(NamedTuple):
    """The shape of one call as terms see it."""

    B: int
    H: int
    Sq: int
    Sk: int
    device: torch.device

    @property
    def offset(self) -> int:
        """Sk - Sq: add it to a query index to get its key position (bottom-right alignment)."""
        return self.Sk - self.Sq


class BoundMask(NamedTuple):
    """A mask term bound to a geometry: a predicate over index tensors plus what it reads."""

    pred: Callable[..., torch.Tensor]
    uses_b: bool
    uses_h: bool


class BoundScore(NamedTuple):
    """A score term bound to a geometry."""

    mod: Callable[..., torch.Tensor]
    additive: bool  # s -> s + f(b, h, q, kv): expressible as an additive attention bias
    uses_b: bool
    uses_h: bool
    dense: Callable[[], torch.Tensor] | None  # additive terms: the bias as a broadcast tensor


# Small host tensors are keyed by content: a fresh ``torch.tensor([16, 40])`` built every call
# maps to the same cached lowering. Other tensors are keyed by identity (of the base tensor for
# views, since factories may reshape) plus the version counter, which in-place edits bump. A term
# keeps its tensors alive, so an id cannot be reused while a cache entry holding the term exists.
_CONTENT_KEY_MAX = 256


def _tensor_key(t: torch.Tensor) -> tuple:
    if torch.compiler.is_compiling():
        # Traced: reading values would be data-dependent, and an id() would make the graph guard
        # on this very tensor object (a recompile for every new mask tensor). No cache is read or
        # written while tracing (see _lru.py), so the key needs no identity.
        return ("traced tensor", tuple(t.shape), t.dtype, t.device)
    if t.device.type == "cpu" and t.numel() <= _CONTENT_KEY_MAX and not t.requires_grad:
        return ("value", t.dtype, tuple(t.shape), tuple(t.reshape(-1).tolist()))
    base = t._base if t._base is not None else t
    if t.is_inference():
        # Tensors made under torch.inference_mode have no version counter: keyed by identity
        # alone. An in-place change to such a tensor inside inference_mode is not seen; pass a
        # new tensor instead (docs/reliability.md). Cached lowered forms keep the term, and so
        # the tensor, alive, so its id is not reused while an entry exists.
        return ("inference", id(base), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype, t.device)
    return ("tensor", id(base), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype, t.device, t._version)


def _value_key(v: Any) -> Any:
    if isinstance(v, _Term):
        return v.key
    if isinstance(v, torch.Tensor):
        return _tensor_key(v)
    if callable(v):
        return ("fn", id(v))
    if hasattr(v, "cu_seqlens"):  # a SeqInfo: its content is in the term's other fields
        return ("seqinfo", id(v))
    if isinstance(v, (list, tuple)):
        return tuple(_value_key(x) for x in v)
    return v


class _Term:
    """Shared plumbing: the content key and the term's tensors."""

    def __post_init__(self):
        if not self.tensors():  # tensorless terms compute their key once, at construction
            self.key

    def _fields(self) -> tuple:
        return tuple(getattr(self, f) for f in self.__dataclass_fields__)  # type: ignore[attr-defined]

    @property
    def key(self) -> tuple:
        """Hashable identity of the term's content (see _tensor_key). Cached for terms without
        tensors; recomputed on every access otherwise, so that in-place edits are seen."""
        k = self.__dict__.get("_key")
        if k is None:
            k = (type(self).__name__,) + tuple(_value_key(v) for v in self._fields())
            if not self.tensors():
                object.__setattr__(self, "_key", k)
        return k

    def tensors(self) -> tuple[torch.Tensor, ...]:
        ts = self.__dict__.get("_tensors")
        if ts is None:
            ts = []
            for v in self._fields():
                if isinstance(v, torch.Tensor):
                    ts.append(v)
                elif isinstance(v, _Term):
                    ts.extend(v.tensors())
                elif isinstance(v, tuple):
                    for x in v:
                        if isinstance(x, _Term):
                            ts.extend(x.tensors())
            ts = tuple(ts)
            object.__setattr__(self, "_tensors", ts)
        return ts


# --------------------------------------------------------------------------------------------
# Mask terms


class MaskTerm(_Term):
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


def _check_positional(name: str, geo: Geometry) -> None:
    # Terms that look up a query's own key position i' need i' >= 0, i.e. Sq <= Sk.
    if geo.Sq > geo.Sk:
        raise bad_value(
            name, "Sq <= Sk (queries are aligned to the last Sq of the Sk keys)", f"Sq={geo.Sq} > Sk={geo.Sk}"
        )


def _dev(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    return t if t.device == device else t.to(device, non_blocking=True)


def _fmt_arg(v) -> str:
    if isinstance(v, torch.Tensor):
        return f"tensor{tuple(v.shape)}"
    return repr(v)


@dataclass(frozen=True, eq=False, repr=False)
class Window(MaskTerm):
    """Key j visible from query i iff ``i' - left <= j <= i' + right`` (None = unbounded).

    ``causal()`` is ``Window(None, 0)``. ``left``/``right`` count keys beside the query itself:
    ``sliding_window(3)`` lets a query see itself and the 3 keys before it (4 keys in all).
    """

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
            if left is None:
                return d >= -right  # type: ignore[operator]
            if right is None:
                return d <= left
            return (d <= left) & (d >= -right)

        return BoundMask(pred, False, False)


@dataclass(frozen=True, eq=False, repr=False)
class Documents(MaskTerm):
    """Packed documents: visible iff same document. Tokens past sum(lengths) see nothing.

    ``lengths``: (Bd, N) int64; Bd = 1 shares one packing across the batch. ``host_lengths``
    keeps the Python values when they are known on the host (no device sync needed to read them).
    """

    lengths: torch.Tensor
    host_lengths: tuple | None = None
    info: Any = None  # the SeqInfo this term came from, if any (varlen backends reuse it)

    def __repr__(self) -> str:
        if self.host_lengths is not None and len(self.host_lengths) == 1 and len(self.host_lengths[0]) <= 8:
            return f"documents({list(self.host_lengths[0])})"
        return f"documents(tensor{tuple(self.lengths.shape)})"

    def check(self, geo: Geometry) -> None:
        _check_positional("documents", geo)
        Bd = self.lengths.shape[0]
        if Bd not in (1, geo.B):
            raise bad_value("documents(lengths)", f"1 or B={geo.B} rows", f"{Bd} rows")
        if self.host_lengths is not None:
            total = max(sum(r) for r in self.host_lengths)
        else:
            total = int(self.lengths.sum(-1).max())  # one sync, once per call signature
        if total > geo.Sk:
            raise bad_value(
                "documents(lengths)", f"lengths summing to at most the sequence length {geo.Sk}", f"a row summing to {total}"
            )

    def doc_ids(self, geo: Geometry) -> torch.Tensor:
        """(Bd, Sk) int32 document index per key position, -1 for padding past the last document."""
        if self.info is not None and self.info.S == geo.Sk:
            return _dev(self.info.doc_ids, geo.device)
        lengths = _dev(self.lengths, geo.device).to(torch.int64)
        cu = torch.cumsum(lengths, dim=-1)
        pos = torch.arange(geo.Sk, device=geo.device).expand(lengths.shape[0], geo.Sk).contiguous()
        ids = torch.searchsorted(cu, pos, right=True)
        ids = torch.where(ids >= lengths.shape[1], -1, ids)
        return ids.to(torch.int32)

    def bind(self, geo: Geometry) -> BoundMask:
        ids, off = self.doc_ids(geo), geo.offset
        if ids.shape[0] == 1:
            ids1 = ids[0]

            def pred(b, h, q, kv):
                dq = ids1[q + off]
                return (dq == ids1[kv]) & (dq >= 0)

            return BoundMask(pred, False, False)

        def pred_b(b, h, q, kv):
            dq = ids[b, q + off]
            return (dq == ids[b, kv]) & (dq >= 0)

        return BoundMask(pred_b, True, False)


@dataclass(frozen=True, eq=False, repr=False)
class Padding(MaskTerm):
    """Visible iff both the query and the key are real tokens of their row.

    Exactly one of ``keep`` ((B, Sk) bool keep-mask, left or right padding) and ``lengths``
    ((B,) int64, right padding) is set.
    """

    keep: torch.Tensor | None = None
    lengths: torch.Tensor | None = None
    info: Any = None  # the SeqInfo this term came from, if any (varlen backends reuse it)

    def __repr__(self) -> str:
        if self.lengths is not None:
            return f"padding(lengths=tensor{tuple(self.lengths.shape)})"
        return f"padding(mask=tensor{tuple(self.keep.shape)})"

    def check(self, geo: Geometry) -> None:
        _check_positional("padding", geo)
        if self.lengths is not None:
            if self.lengths.shape[0] != geo.B:
                raise bad_value("padding(lengths)", f"shape (B,) = ({geo.B},)", f"shape {tuple(self.lengths.shape)}")
            mx = int(self.lengths.max()) if self.lengths.numel() else 0  # one sync per call signature
            if mx > geo.Sk:
                raise bad_value("padding(lengths)", f"lengths <= the key length {geo.Sk}", f"a length of {mx}")
            return
        if self.keep.shape[0] != geo.B:
            raise bad_value("padding(mask)", f"one row per batch element (B={geo.B})", f"{self.keep.shape[0]} rows")
        if self.keep.shape[1] != geo.Sk:
            raise bad_value("padding(mask)", f"rows of the key length Sk={geo.Sk}", f"rows of length {self.keep.shape[1]}")

    def keep_mask(self, geo: Geometry) -> torch.Tensor:
        """(B, Sk) bool on the call's device."""
        if self.keep is not None:
            return _dev(self.keep, geo.device)
        lengths = _dev(self.lengths, geo.device)
        return torch.arange(geo.Sk, device=geo.device)[None, :] < lengths[:, None]

    def bind(self, geo: Geometry) -> BoundMask:
        keep, off = self.keep_mask(geo), geo.offset

        def pred(b, h, q, kv):
            return keep[b, q + off] & keep[b, kv]

        return BoundMask(pred, True, False)


@dataclass(frozen=True, eq=False, repr=False)
class PrefixLM(MaskTerm):
    """Key j visible iff ``j < prefix_b`` or ``j <= i'``: bidirectional prefix, causal rest."""

    prefix: int | torch.Tensor

    def __repr__(self) -> str:
        return f"prefix_lm({_fmt_arg(self.prefix)})"

    def check(self, geo: Geometry) -> None:
        if isinstance(self.prefix, torch.Tensor) and self.prefix.shape[0] not in (1, geo.B):
            raise bad_value("prefix_lm(prefix_lengths)", f"an int or shape ({geo.B},)", f"shape {tuple(self.prefix.shape)}")

    def bind(self, geo: Geometry) -> BoundMask:
        off = geo.offset
        if isinstance(self.prefix, int):
            p = self.prefix

            def pred_i(b, h, q, kv):
                return (kv < p) | (kv <= q + off)

            return BoundMask(pred_i, False, False)
        prefix = _dev(self.prefix, geo.device)
        if prefix.shape[0] == 1:
            p1 = prefix[0]

            def pred1(b, h, q, kv):
                return (kv < p1) | (kv <= q + off)

            return BoundMask(pred1, False, False)

        def pred(b, h, q, kv):
            return (kv < prefix[b]) | (kv <= q + off)

        return BoundMask(pred, True, False)


@dataclass(frozen=True, eq=False, repr=False)
class _IdsTerm(MaskTerm):
    ids: torch.Tensor  # (Sk,) or (B, Sk) integer
    _name = ""

    def __repr__(self) -> str:
        return f"{self._name}(tensor{tuple(self.ids.shape)})"

    def check(self, geo: Geometry) -> None:
        _check_positional(self._name, geo)
        arg = f"{self._name}(ids)"
        if self.ids.shape[-1] != geo.Sk:
            raise bad_value(arg, f"ids over the key length Sk={geo.Sk}", f"length {self.ids.shape[-1]}")
        if self.ids.dim() == 2 and self.ids.shape[0] not in (1, geo.B):
            raise bad_value(arg, f"shape (Sk,) or (B={geo.B}, Sk)", f"shape {tuple(self.ids.shape)}")

    def _bind_ids(self, geo: Geometry, rule) -> BoundMask:
        ids, off = _dev(self.ids, geo.device), geo.offset
        if ids.dim() == 2 and ids.shape[0] == 1:
            ids = ids[0]
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

    size: int

    def __repr__(self) -> str:
        return f"chunked({self.size})"

    def bind(self, geo: Geometry) -> BoundMask:
        off, size = geo.offset, self.size

        def pred(b, h, q, kv):
            return torch.div(q + off, size, rounding_mode="floor") == torch.div(kv, size, rounding_mode="floor")

        return BoundMask(pred, False, False)


@dataclass(frozen=True, eq=False, repr=False)
class MaskFn(MaskTerm):
    """User predicate ``fn(b, h, q_idx, kv_idx) -> bool`` (FlexAttention's mask_mod convention).

    ``q_idx`` is the raw query index (no alignment shift); the function must be written with
    tensor operations so it works on index grids and inside compiled kernels.
    """

    fn: Callable

    def __repr__(self) -> str:
        return f"mask_fn({getattr(self.fn, '__name__', 'fn')})"

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
        _check_broadcast("dense(mask)", self.mask, geo)

    def bind(self, geo: Geometry) -> BoundMask:
        m = _dev(self.mask, geo.device)
        if m.dtype != torch.bool:
            m = m != 0
        while m.dim() < 4:
            m = m.unsqueeze(0)
        full = m.expand(geo.B, geo.H, geo.Sq, geo.Sk)
        uses_b, uses_h = m.shape[0] != 1, m.shape[1] != 1

        def pred(b, h, q, kv):
            return full[b, h, q, kv]

        return BoundMask(pred, uses_b, uses_h)


def _check_broadcast(name: str, t: torch.Tensor, geo: Geometry) -> None:
    target = (geo.B, geo.H, geo.Sq, geo.Sk)
    if t.dim() > 4 or any(s not in (1, g) for s, g in zip(t.shape[::-1], target[::-1])):
        raise bad_value(name, f"a tensor broadcastable to (B, H, Sq, Sk) = {target}", f"shape {tuple(t.shape)}")


class _Combine(MaskTerm):
    """``&`` / ``|`` of several mask terms (flattened by canonical_mask)."""

    _sym = ""
    _is_and = True

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


def _int_tensor(name: str, x, *, dims: tuple[int, ...], nonneg: bool = True) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        t = x
    else:
        try:
            t = torch.as_tensor(x)
        except (TypeError, ValueError, RuntimeError) as e:
            raise bad_type(name, "a list of ints or an integer tensor", type(x).__name__) from e
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise bad_type(name, "integer values", f"dtype {t.dtype}")
    if t.dim() not in dims:
        raise bad_value(name, f"a tensor of {' or '.join(str(d) for d in dims)} dimensions", f"shape {tuple(t.shape)}")
    if nonneg and t.numel() and t.device.type == "cpu" and int(t.min()) < 0:
        raise bad_value(name, "non-negative values", f"minimum {int(t.min())}")
    return t


def documents(lengths) -> MaskTerm:
    """Packed documents: key j visible from query i iff both belong to the same document.

    ``lengths`` gives the document lengths of a packed row: a list of ints or a 1-D tensor (one
    packing shared by the batch), or one list / a (B, N) tensor per row (ragged lists are padded
    with zero-length documents). Positions past ``sum(lengths)`` are padding and see nothing.
    A :class:`anyattn.SeqInfo` is accepted too (its per-document lengths are used).
    """
    from .layout import SeqInfo  # local: layout depends on spec, not the reverse

    if isinstance(lengths, SeqInfo):
        return lengths.as_documents()
    host = None
    if isinstance(lengths, (list, tuple)):
        if len(lengths) and all(isinstance(r, (list, tuple)) for r in lengths):
            rows = [list(r) for r in lengths]
            n = max((len(r) for r in rows), default=0)
            rows = [r + [0] * (n - len(r)) for r in rows]
            host = tuple(tuple(int(x) for x in r) for r in rows)
            lengths = rows
        elif all(isinstance(x, int) and not isinstance(x, bool) for x in lengths):
            host = (tuple(lengths),)
            lengths = [list(lengths)]
        else:
            raise bad_type("documents(lengths)", "a list of ints, a list of lists of ints or an integer tensor", repr(lengths)[:80])
    t = _int_tensor("documents(lengths)", lengths, dims=(1, 2))
    if t.dim() == 1:
        t = t.unsqueeze(0)  # a view: keyed by its base tensor
    if t.shape[1] == 0:
        raise bad_value("documents(lengths)", "at least one document", "an empty list")
    if host is not None and any(x < 0 for r in host for x in r):
        raise bad_value("documents(lengths)", "non-negative lengths", host)
    return Documents(t, host)


def padding(lengths=None, *, mask=None) -> MaskTerm:
    """Padded batch: visible iff both query and key are real tokens of their row.

    Give either ``lengths`` (B,) (right padding: the first ``lengths[b]`` tokens are real) or
    ``mask``, a (B, S) keep-mask like HF's ``attention_mask`` (1/True = real token; left or right
    padding). A :class:`anyattn.SeqInfo` built from a padding mask is accepted as ``lengths``.
    """
    from .layout import SeqInfo

    if isinstance(lengths, SeqInfo):
        return lengths.as_padding()
    if (lengths is None) == (mask is None):
        raise bad_value("padding", "exactly one of lengths= or mask=", "both" if lengths is not None else "neither")
    if mask is not None:
        if not isinstance(mask, torch.Tensor):
            raise bad_type("padding(mask)", "a (B, S) bool or 0/1 integer tensor", type(mask).__name__)
        if mask.dim() != 2:
            raise bad_value("padding(mask)", "a (B, S) keep-mask", f"shape {tuple(mask.shape)}")
        if mask.dtype.is_floating_point:
            raise bad_type("padding(mask)", "a bool or 0/1 integer keep-mask", f"dtype {mask.dtype}")
        return Padding(keep=mask if mask.dtype == torch.bool else mask != 0)
    t = _int_tensor("padding(lengths)", lengths, dims=(1,))
    return Padding(lengths=t)


def prefix_lm(prefix_lengths) -> MaskTerm:
    """Prefix-LM: key j visible iff ``j < prefix_b`` or ``j <= i'`` (int or (B,) lengths)."""
    if isinstance(prefix_lengths, int) and not isinstance(prefix_lengths, bool):
        if prefix_lengths < 0:
            raise bad_value("prefix_lm(prefix_lengths)", "a non-negative int or (B,) tensor", prefix_lengths)
        return PrefixLM(prefix_lengths)
    return PrefixLM(_int_tensor("prefix_lm(prefix_lengths)", prefix_lengths, dims=(1,)))


def block_causal(block_ids) -> MaskTerm:
    """Key j visible iff ``block_ids[j] <= block_ids[i']``; ids (Sk,) shared or (B, Sk)."""
    return BlockCausal(_int_tensor("block_causal(block_ids)", block_ids, dims=(1, 2), nonneg=False))


def same_segment(segment_ids) -> MaskTerm:
    """Key j visible iff ``seg[i'] == seg[j] >= 0``; ids (Sk,) shared or (B, Sk); -1 = none."""
    return SameSegment(_int_tensor("same_segment(segment_ids)", segment_ids, dims=(1, 2), nonneg=False))


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
# Score terms


class ScoreTerm(_Term):
    """Base of score terms; ``score=`` takes one or a sequence applied in order."""

    additive = False  # True: s -> s + f(b, h, i, j), expressible as an attention bias

    def bind(self, geo: Geometry) -> BoundScore:  # pragma: no cover - abstract
        raise NotImplementedError

    def check(self, geo: Geometry) -> None:
        pass


@dataclass(frozen=True, eq=False, repr=False)
class Softcap(ScoreTerm):
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
        slopes, off = _dev(self.slopes, geo.device).float(), geo.offset

        def mod(s, b, h, q, kv):
            return s - slopes[h] * (q + off - kv).abs()

        def dense_bias():
            hh = torch.arange(geo.H, device=geo.device).view(1, -1, 1, 1)
            qq = torch.arange(geo.Sq, device=geo.device).view(1, 1, -1, 1)
            kk = torch.arange(geo.Sk, device=geo.device).view(1, 1, 1, -1)
            return mod(torch.zeros((), device=geo.device), None, hh, qq, kk)

        return BoundScore(mod, True, False, True, dense_bias)


@dataclass(frozen=True, eq=False, repr=False)
class Bias(ScoreTerm):
    additive = True
    tensor: torch.Tensor

    def __repr__(self) -> str:
        return f"bias(tensor{tuple(self.tensor.shape)})"

    def check(self, geo: Geometry) -> None:
        _check_broadcast("bias(tensor)", self.tensor, geo)

    def bind(self, geo: Geometry) -> BoundScore:
        t = _dev(self.tensor, geo.device)
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

        return BoundScore(mod, True, t4.shape[0] != 1, t4.shape[1] != 1, lambda: t4.float())


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
        table, off = _dev(self.table, geo.device), geo.offset
        nb, md, bi = self.num_buckets, self.max_distance, self.bidirectional

        def mod(s, b, h, q, kv):
            return s + table[h, t5_bucket(kv - (q + off), nb, md, bi)]

        def dense_bias():
            qq = torch.arange(geo.Sq, device=geo.device).view(-1, 1)
            kk = torch.arange(geo.Sk, device=geo.device).view(1, -1)
            bucket = t5_bucket(kk - (qq + off), nb, md, bi)  # (Sq, Sk)
            return table.float()[:, bucket].unsqueeze(0)  # (1, H, Sq, Sk)

        return BoundScore(mod, True, False, True, dense_bias)


@dataclass(frozen=True, eq=False, repr=False)
class ScoreFn(ScoreTerm):
    fn: Callable

    def __repr__(self) -> str:
        return f"score_fn({getattr(self.fn, '__name__', 'fn')})"

    def bind(self, geo: Geometry) -> BoundScore:
        return BoundScore(self.fn, False, True, True, None)


def softcap(cap: float) -> ScoreTerm:
    """``s <- cap * tanh(s / cap)`` (Gemma-2 style logit soft-capping)."""
    if isinstance(cap, bool) or not isinstance(cap, (int, float)):
        raise bad_type("softcap(cap)", "a positive finite float", type(cap).__name__)
    if not math.isfinite(cap) or cap <= 0:
        raise bad_value("softcap(cap)", "a positive finite float", cap)
    return _softcap(float(cap))


@functools.lru_cache(maxsize=256)
def _softcap(cap: float) -> Softcap:
    return Softcap(cap)


def _float_tensor(name: str, t, dims: tuple[int, ...], what: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise bad_type(name, f"a floating-point tensor ({what})", type(t).__name__)
    if not t.dtype.is_floating_point:
        raise bad_type(name, f"a floating-point tensor ({what})", f"dtype {t.dtype}")
    if t.dim() not in dims:
        raise bad_value(name, what, f"shape {tuple(t.shape)}")
    return t


def alibi(slopes: torch.Tensor) -> ScoreTerm:
    """ALiBi: ``s <- s - slopes[h] * |i' - j|``; slopes (Hq,) floating point."""
    return Alibi(_float_tensor("alibi(slopes)", slopes, (1,), "shape (Hq,)"))


def bias(tensor: torch.Tensor) -> ScoreTerm:
    """Additive bias ``s <- s + tensor[b, h, i, j]`` (broadcast to (B, Hq, Sq, Sk)); gradients flow."""
    return Bias(_float_tensor("bias(tensor)", tensor, (0, 1, 2, 3, 4), "a tensor broadcastable to (B, Hq, Sq, Sk)"))


def relative_bias(table: torch.Tensor, num_buckets: int, max_distance: int, bidirectional: bool = True) -> ScoreTerm:
    """T5 bucketed relative-position bias: ``s <- s + table[h, bucket(j - i')]``; table (Hq, num_buckets)."""
    table = _float_tensor("relative_bias(table)", table, (2,), "shape (Hq, num_buckets)")
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


# --------------------------------------------------------------------------------------------
# Canonical form


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


def canonical_mask(mask) -> MaskTerm | None:
    """The one canonical form of a mask (pure function).

    * ``&``/``|`` trees are flattened; ``~~x`` is ``x``;
    * windows meet into one window: ``causal() & sliding_window(1024)`` is
      ``sliding_window(1024)``; windows joined by ``|`` become the wider window (all windows
      contain the diagonal, so their union is a window);
    * ``sliding_window(None, None)`` (everything visible) disappears from ``&`` and returns None
      when alone.
    """
    if mask is None:
        return None
    if type(mask) is Window:  # the common case, first
        return None if mask.left is None and mask.right is None else mask
    if not isinstance(mask, MaskTerm):
        raise bad_type("mask", "a mask term such as causal() (or None)", type(mask).__name__)
    if isinstance(mask, Not):
        inner = canonical_mask(mask.term)
        if isinstance(inner, Not):
            return inner.term
        if inner is None:
            return Not(Window(None, None))
        return mask if inner is mask.term else Not(inner)
    if isinstance(mask, (And, Or)):
        cls = type(mask)
        parts = [canonical_mask(t) for t in _flatten(cls, mask.terms)]
        out: list = []
        win_at = None
        for p in parts:
            if p is None:
                if cls is Or:
                    return None  # x | everything == everything
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
        out = [canonical_mask(t) if isinstance(t, Window) else t for t in out]
        out = [t for t in out if t is not None] if cls is And else out
        if any(t is None for t in out):  # an Or that merged into "everything"
            return None
        if not out:
            return None
        if len(out) == 1:
            return out[0]
        return cls(tuple(out))
    if isinstance(mask, Window) and mask.left is None and mask.right is None:
        return None
    return mask


def canonical_scores(score) -> tuple[ScoreTerm, ...]:
    """``score=`` as a tuple of score terms in application order."""
    if score is None:
        return ()
    if isinstance(score, ScoreTerm):
        return (score,)
    if isinstance(score, (list, tuple)):
        for i, s in enumerate(score):
            if not isinstance(s, ScoreTerm):
                raise bad_type(f"score[{i}]", "a score term such as softcap(50.0)", type(s).__name__)
        return tuple(score)
    raise bad_type("score", "a score term or a sequence of them (or None)", type(score).__name__)


def materialize_mask(bound: BoundMask, geo: Geometry) -> torch.Tensor:
    """Evaluate a bound mask on broadcast index grids: a bool tensor broadcastable to
    (B, H, Sq, Sk), with size-1 dims where the mask does not depend on them."""
    d = geo.device
    b = torch.arange(geo.B if bound.uses_b else 1, device=d).view(-1, 1, 1, 1)
    h = torch.arange(geo.H if bound.uses_h else 1, device=d).view(1, -1, 1, 1)
    q = torch.arange(geo.Sq, device=d).view(1, 1, -1, 1)
    kv = torch.arange(geo.Sk, device=d).view(1, 1, 1, -1)
    m = bound.pred(b, h, q, kv)
    if not isinstance(m, torch.Tensor) or m.dtype != torch.bool:
        raise bad_type("mask predicate result", "a bool tensor", type(m).__name__ if not isinstance(m, torch.Tensor) else m.dtype)
    while m.dim() < 4:
        m = m.unsqueeze(0)
    return m


def index_grids(geo: Geometry, uses_b: bool = True, uses_h: bool = True):
    d = geo.device
    return (
        torch.arange(geo.B if uses_b else 1, device=d).view(-1, 1, 1, 1),
        torch.arange(geo.H if uses_h else 1, device=d).view(1, -1, 1, 1),
        torch.arange(geo.Sq, device=d).view(1, 1, -1, 1),
        torch.arange(geo.Sk, device=d).view(1, 1, 1, -1),
    )
