"""Mask terms: which (query i, key j) pairs are visible. Composition with ``&``, ``|``, ``~``.

Every term's visibility rule is written once, as a *predicate* on index tensors
``pred(b, h, q, kv) -> bool``: on broadcast index grids it materializes the mask (eager and SDPA
backends); on FlexAttention's scalar indices it *is* the ``mask_mod``. So the dense mask and the
flex mask cannot drift apart. Alignment (bottom-right when Sq != Sk) is defined in
``anyattn.spec``'s docstring.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from .._cache import obj_key, tensor_key
from ..errors import bad_type, bad_value
from ..layout import SeqInfo, host_to_device
from .base import (
    BoundMask,
    Geometry,
    Term,
    check_broadcast,
    check_positional,
    fmt_arg,
    int_tensor,
    to_device,
)

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


def _doc_ids_from_host(rows, Sk: int, device) -> torch.Tensor:
    """(Bd, Sk) int32 document index per position from host lengths, -1 past the last document;
    built on the CPU and copied through pinned memory (no host sync)."""
    out = []
    for row in rows:
        ids = torch.repeat_interleave(torch.arange(len(row), dtype=torch.int32), torch.tensor(row, dtype=torch.int64))[:Sk]
        out.append(torch.cat((ids, torch.full((Sk - ids.numel(),), -1, dtype=torch.int32))))
    return host_to_device(torch.stack(out), device)


@dataclass(frozen=True, eq=False, repr=False)
class Documents(MaskTerm):
    """Packed documents: visible iff same document. Tokens past sum(lengths) see nothing.

    ``host_lengths``: the lengths as Python ints, one tuple per row (Bd = 1 shares one packing
    across the batch), when known on the host: then nothing is read from a device and the
    content key is the lengths themselves. ``lengths``: a (Bd, N) integer tensor (None when the
    host lengths are all there is). ``info``: the SeqInfo this term came from (models reuse it).
    """

    lengths: torch.Tensor | None
    host_lengths: tuple | None = None
    info: Any = None

    def __repr__(self) -> str:
        h = self.host_lengths
        if h is not None and len(h) == 1 and len(h[0]) <= 8:
            return f"documents({list(h[0])})"
        if h is not None:
            return f"documents(<{len(h)} x {max(len(r) for r in h)} lengths>)"
        return f"documents(tensor{tuple(self.lengths.shape)})"

    @property
    def rows(self) -> int:
        """Bd: 1 (one packing for every batch row) or B."""
        return len(self.host_lengths) if self.host_lengths is not None else self.lengths.shape[0]

    def content_key(self, tokens: list | None = None) -> tuple:
        if self.host_lengths is not None:  # host values: the content itself, no identity
            return ("Documents", self.host_lengths)
        return ("Documents", tensor_key(self.lengths, tokens))

    def _structure(self) -> tuple:
        dev = None if self.lengths is None else self.lengths.device
        return ("Documents", self.rows, self.host_lengths is not None, dev)

    def lengths_tensor(self) -> torch.Tensor:
        """(Bd, N) int64 (built on the CPU from the host lengths when no tensor was given)."""
        if self.lengths is not None:
            return self.lengths
        t = self.__dict__.get("_lengths_t")
        if t is None:
            t = torch.tensor(self.host_lengths, dtype=torch.int64)
            object.__setattr__(self, "_lengths_t", t)
        return t

    def host_rows(self) -> tuple:
        """The lengths as Python ints per row; reads a device tensor to the host when that is all
        there is (one sync; callers cache what they build from it)."""
        if self.host_lengths is not None:
            return self.host_lengths
        return tuple(tuple(r) for r in self.lengths.tolist())

    def check(self, geo: Geometry) -> None:
        check_positional("documents", geo)
        Bd = self.rows
        if Bd not in (1, geo.B):
            raise bad_value("documents(lengths)", f"1 or B={geo.B} rows", f"{Bd} rows")
        if self.host_lengths is not None:
            total = max(sum(r) for r in self.host_lengths)
        else:
            if self.lengths.numel() and int(self.lengths.min()) < 0:  # one sync, once per content
                raise bad_value("documents(lengths)", "non-negative lengths", f"minimum {int(self.lengths.min())}")
            total = int(self.lengths.sum(-1).max()) if self.lengths.numel() else 0
        if total > geo.Sk:
            raise bad_value(
                "documents(lengths)", f"lengths summing to at most the sequence length {geo.Sk}", f"a row summing to {total}"
            )

    def doc_ids(self, geo: Geometry) -> torch.Tensor:
        """(Bd, Sk) int32 document index per key position, -1 for padding past the last document."""
        info = self.info
        if info is not None and info.S == geo.Sk and info.B == self.rows:
            return to_device(info.doc_ids, geo.device)
        if self.host_lengths is not None and not torch.compiler.is_compiling():
            return _doc_ids_from_host(self.host_lengths, geo.Sk, geo.device)
        lengths = to_device(self.lengths_tensor(), geo.device).to(torch.int64)
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
    ((B,) int64, right padding) is set; ``info`` is the SeqInfo this term came from, if any
    (keyed by its identity; it knows on the host whether each row's real tokens are one run).
    """

    keep: torch.Tensor | None = None
    lengths: torch.Tensor | None = None
    info: Any = None

    def __repr__(self) -> str:
        if self.lengths is not None:
            return f"padding(lengths=tensor{tuple(self.lengths.shape)})"
        return f"padding(mask=tensor{tuple(self.keep.shape)})"

    def content_key(self, tokens: list | None = None) -> tuple:
        if self.info is not None:
            return ("Padding", obj_key(self.info, tokens))
        if self.keep is not None:
            return ("Padding", "keep", tensor_key(self.keep, tokens))
        return ("Padding", "lengths", tensor_key(self.lengths, tokens))

    def _structure(self) -> tuple:
        t = self.keep if self.keep is not None else self.lengths
        # contiguous: True/False when known on the host (a SeqInfo), None otherwise
        contiguous = self.info.contiguous if self.info is not None else (True if self.lengths is not None else None)
        return ("Padding", "keep" if self.keep is not None else "lengths", tuple(t.shape), t.device, contiguous)

    @property
    def contiguous(self) -> bool | None:
        """Whether every row's real tokens form one run: True for lengths, the SeqInfo's answer
        for a SeqInfo, None (unknown without reading the mask) for a bare keep-mask."""
        return self.structure[-1]

    def check(self, geo: Geometry) -> None:
        check_positional("padding", geo)
        if self.lengths is not None:
            if self.lengths.shape[0] != geo.B:
                raise bad_value("padding(lengths)", f"shape (B,) = ({geo.B},)", f"shape {tuple(self.lengths.shape)}")
            if self.lengths.numel():
                lo, hi = (int(x) for x in torch.stack((self.lengths.min(), self.lengths.max())).tolist())  # one sync
                if lo < 0:
                    raise bad_value("padding(lengths)", "non-negative lengths", f"minimum {lo}")
                if hi > geo.Sk:
                    raise bad_value("padding(lengths)", f"lengths <= the key length {geo.Sk}", f"a length of {hi}")
            return
        if self.keep.shape[0] != geo.B:
            raise bad_value("padding(mask)", f"one row per batch element (B={geo.B})", f"{self.keep.shape[0]} rows")
        if self.keep.shape[1] != geo.Sk:
            raise bad_value("padding(mask)", f"rows of the key length Sk={geo.Sk}", f"rows of length {self.keep.shape[1]}")

    def keep_mask(self, geo: Geometry) -> torch.Tensor:
        """(B, Sk) bool on the call's device."""
        if self.keep is not None:
            return to_device(self.keep, geo.device)
        lengths = to_device(self.lengths, geo.device)
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
        return f"prefix_lm({fmt_arg(self.prefix)})"

    def _structure(self) -> tuple:  # the prefix length is a value: a new one is not a new decision
        p = self.prefix
        return ("PrefixLM", "int" if isinstance(p, int) else (tuple(p.shape), p.dtype, p.device))

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
        prefix = to_device(self.prefix, geo.device)
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
        check_positional(self._name, geo)
        arg = f"{self._name}(ids)"
        if self.ids.shape[-1] != geo.Sk:
            raise bad_value(arg, f"ids over the key length Sk={geo.Sk}", f"length {self.ids.shape[-1]}")
        if self.ids.dim() == 2 and self.ids.shape[0] not in (1, geo.B):
            raise bad_value(arg, f"shape (Sk,) or (B={geo.B}, Sk)", f"shape {tuple(self.ids.shape)}")

    def _bind_ids(self, geo: Geometry, rule) -> BoundMask:
        ids, off = to_device(self.ids, geo.device), geo.offset
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

        return BoundMask(pred, uses_b, uses_h)



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



def _host_rows(lengths) -> tuple | None:
    """Python lengths -> one tuple per row, or None when ``lengths`` is not a list of them."""
    if all(type(x) is int for x in lengths):  # one row (the common case first)
        return (tuple(lengths),)
    if all(isinstance(x, int) and not isinstance(x, bool) for x in lengths):
        return (tuple(int(x) for x in lengths),)
    if all(isinstance(r, (list, tuple)) for r in lengths):
        rows = [tuple(r) for r in lengths]
        if not all(isinstance(x, int) and not isinstance(x, bool) for r in rows for x in r):
            return None
        n = max(len(r) for r in rows)
        return tuple(tuple(int(x) for x in r) + (0,) * (n - len(r)) for r in rows)
    return None


def documents(lengths) -> MaskTerm:
    """Packed documents: key j visible from query i iff both belong to the same document.

    ``lengths`` gives the document lengths of a packed row: a list of ints or a 1-D tensor (one
    packing shared by the batch), or one list / a (B, N) tensor per row (ragged lists are padded
    with zero-length documents). Positions past ``sum(lengths)`` are padding and see nothing.
    A :class:`anyattn.SeqInfo` of packed documents is accepted too.

    Python lists and CPU tensors are read on the host, so a new packing every step needs no
    device sync; a CUDA tensor is read once per new tensor (to validate it).
    """
    if isinstance(lengths, SeqInfo):
        if lengths.kind != "documents":
            raise bad_value(
                "documents(lengths)", "a SeqInfo of packed documents (from_lengths/position_ids/cu_seqlens); use padding(info)",
                f"a SeqInfo of kind {lengths.kind!r}",
            )  # fmt: skip
        return Documents(lengths.lengths, lengths.host_lengths, lengths)
    if isinstance(lengths, (list, tuple)):
        if not lengths or all(isinstance(r, (list, tuple)) and not r for r in lengths):
            raise bad_value("documents(lengths)", "at least one document length", repr(lengths))
        host = _host_rows(lengths)
        if host is None:
            raise bad_type("documents(lengths)", "a list of ints, a list of lists of ints or an integer tensor", repr(lengths)[:80])
        for r in host:
            for x in r:
                if x < 0:
                    raise bad_value("documents(lengths)", "non-negative lengths", x)
        return Documents(None, host)
    t = int_tensor("documents(lengths)", lengths, dims=(1, 2))
    if t.dim() == 1:
        t = t.unsqueeze(0)  # a view: keyed by its base tensor
    if t.shape[1] == 0:
        raise bad_value("documents(lengths)", "at least one document length", f"shape {tuple(t.shape)}")
    if t.device.type == "cpu" and not t.requires_grad:  # host values: read now, no device involved
        return Documents(t, tuple(tuple(r) for r in t.tolist()))
    return Documents(t)


def padding(lengths=None, *, mask=None) -> MaskTerm:
    """Padded batch: visible iff both query and key are real tokens of their row.

    Give either ``lengths`` (B,) (right padding: the first ``lengths[b]`` tokens are real) or
    ``mask``, a (B, S) keep-mask like HF's ``attention_mask`` (1/True = real token; left or right
    padding). A :class:`anyattn.SeqInfo` built from a padding mask is accepted as ``lengths``.
    """
    if isinstance(lengths, SeqInfo):
        if mask is not None:
            raise bad_value("padding", "exactly one of lengths= or mask=", "both")
        if lengths.kind != "padding":
            raise bad_value(
                "padding(lengths)", "a SeqInfo built from a padding mask; use documents(info) for packed documents",
                f"a SeqInfo of kind {lengths.kind!r}",
            )  # fmt: skip
        return Padding(keep=lengths.keep, info=lengths)
    if (lengths is None) == (mask is None):
        raise bad_value("padding", "exactly one of lengths= or mask=", "both" if lengths is not None else "neither")
    if mask is not None:
        if not isinstance(mask, torch.Tensor):
            raise bad_type("padding(mask)", "a (B, S) bool or 0/1 integer tensor", type(mask).__name__)
        if mask.dim() != 2:
            raise bad_value("padding(mask)", "a (B, S) keep-mask", f"shape {tuple(mask.shape)}")
        if mask.dtype.is_floating_point or mask.dtype.is_complex:
            raise bad_type("padding(mask)", "a bool or 0/1 integer keep-mask", f"dtype {mask.dtype}")
        return Padding(keep=mask if mask.dtype == torch.bool else mask != 0)
    t = int_tensor("padding(lengths)", lengths, dims=(1,))
    return Padding(lengths=t)


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
