"""Batch-structure mask terms: packed ``documents`` and ``padding``, from host lengths, tensors
or a :class:`anyattn.SeqInfo` (keys: see ``spec.base``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .._cache import obj_key, tensor_key
from ..errors import bad_type, bad_value
from ..layout import SeqInfo
from .base import BoundMask, Geometry, check_positional, int_tensor, to_device
from .masks import MaskTerm

def _lengths_repr(h, t) -> str:
    if h is not None and len(h) == 1 and len(h[0]) <= 8:
        return repr(list(h[0]))
    if h is not None:
        return f"<{len(h)} x {max(len(r) for r in h)} lengths>"
    return f"tensor{tuple(t.shape)}"


def _memo(term, slot: str, S: int, device, src, build):
    """``build(S, device)``, memoized in ``term``'s ``slot`` (one entry) under (S, device, the
    version of ``src``, the term's source tensor: an in-place edit is seen; None for host values,
    which are immutable, and for inference-mode tensors, which have no version); not while
    tracing."""
    if torch.compiler.is_compiling():
        return build(S, device)
    key = (S, torch.device(device), None if src is None or src.is_inference() else src._version)
    memo = term.__dict__.get(slot)
    if memo is not None and memo[0] == key:
        return memo[1]
    t = build(S, device)
    object.__setattr__(term, slot, (key, t))
    return t


@dataclass(frozen=True, eq=False, repr=False)
class Documents(MaskTerm):
    """Packed documents: visible iff same document. Tokens past sum(lengths) see nothing.

    ``host_lengths``: the lengths as Python ints, one tuple per row (Bd = 1 shares one packing
    across the batch), when known on the host: then nothing is read from a device and the
    content key is the lengths themselves. ``lengths``: a (Bd, N) integer tensor (None when the
    host lengths are all there is). ``info``: the SeqInfo this term came from (models reuse it).

    ``kv``: the *key* layout, when keys are packed differently from queries (chunked prefill,
    prefill + decode in one batch, packed cross-attention): another ``Documents`` over the Sk
    keys with the same number of documents per row. Document n's queries see document n's keys,
    and each query sits bottom-right within its document: the last query of a document at its
    last key (``i' = i + kv_end[n] - q_end[n]``), which is where windows and causal() measure
    from. Without ``kv`` both layouts are the key layout (queries read it at ``i + Sk - Sq``).
    """

    lengths: torch.Tensor | None
    host_lengths: tuple | None = None
    info: Any = None
    kv: Documents | None = None

    is_sequence_structure = True

    def __repr__(self) -> str:
        own = _lengths_repr(self.host_lengths, self.lengths)
        if self.kv is None:
            return f"documents({own})"
        return f"documents({own}, kv={_lengths_repr(self.kv.host_lengths, self.kv.lengths)})"

    @property
    def rows(self) -> int:
        """Bd: 1 (one packing for every batch row) or B."""
        return len(self.host_lengths) if self.host_lengths is not None else self.lengths.shape[0]

    @property
    def num_docs(self) -> int:
        """N: documents per row (ragged rows are padded with zero-length documents)."""
        return len(self.host_lengths[0]) if self.host_lengths is not None else self.lengths.shape[1]

    @property
    def packed_layout(self) -> bool:
        return self.kv is not None

    def content_key(self, tokens: list | None = None) -> tuple:
        kv = None if self.kv is None else self.kv.content_key(tokens)
        if self.host_lengths is not None:  # host values: the content itself, no identity
            return ("Documents", self.host_lengths, kv)
        return ("Documents", tensor_key(self.lengths, tokens), kv)

    def _structure(self) -> tuple:
        dev = None if self.lengths is None else self.lengths.device
        kv = None if self.kv is None else self.kv.structure
        return ("Documents", self.rows, self.host_lengths is not None, dev, kv)

    def tensors(self) -> tuple:
        own = (self.lengths,) if self.lengths is not None else ()
        return own + (self.kv.tensors() if self.kv is not None else ())

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

    def _check_side(self, name: str, B: int, S: int, what: str) -> None:
        Bd = self.rows
        if Bd not in (1, B):
            raise bad_value(name, f"1 or B={B} rows", f"{Bd} rows")
        if self.host_lengths is not None:
            total = max(sum(r) for r in self.host_lengths)
        else:
            if self.lengths.numel() and int(self.lengths.min()) < 0:  # one sync, once per content
                raise bad_value(name, "non-negative lengths", f"minimum {int(self.lengths.min())}")
            total = int(self.lengths.sum(-1).max()) if self.lengths.numel() else 0
        if total > S:
            raise bad_value(name, f"lengths summing to at most the {what} {S}", f"a row summing to {total}")

    def check(self, geo: Geometry) -> None:
        if self.kv is None:
            check_positional("documents", geo)
            self._check_side("documents(lengths)", geo.B, geo.Sk, "sequence length")
            return
        self._check_side("documents(lengths)", geo.B, geo.Sq, "query length Sq")
        self.kv._check_side("documents(kv)", geo.B, geo.Sk, "key length Sk")
        if self.num_docs != self.kv.num_docs:
            raise bad_value(
                "documents(kv)", f"as many documents per row as the queries' layout ({self.num_docs})", f"{self.kv.num_docs}"
            )

    def ids_over(self, S: int, device) -> torch.Tensor:
        """(Bd, S) int32 document index (within its row) per position, -1 past the last document.
        Memoized on this term like ``Padding``'s keep-mask (flex reads it three times per call:
        the query and key tiles and the predicate), keyed by the lengths tensor's version (host
        lengths are immutable); not while tracing."""
        src = self.lengths if self.host_lengths is None else None
        return _memo(self, "_ids_memo", S, device, src, self._build_ids)

    def _build_ids(self, S: int, device) -> torch.Tensor:
        info = self.info
        if info is not None and info.S == S and info.B == self.rows and info.B == 1:
            return to_device(info.doc_ids, device)  # one row: the global index is the row's index
        # a (Bd, N) host tensor through pinned memory (to_device), the (Bd, S) ids on the device:
        # no sync, and no per-position work on the host (repeat_interleave of 16k positions on
        # the CPU cost milliseconds per new packing)
        lengths = to_device(self.lengths_tensor(), device).to(torch.int64)
        cu = torch.cumsum(lengths, dim=-1)
        pos = torch.arange(S, device=device).expand(lengths.shape[0], S).contiguous()
        ids = torch.searchsorted(cu, pos, right=True)
        ids = torch.where(ids >= lengths.shape[1], -1, ids)
        return ids.to(torch.int32)

    def doc_ids(self, geo: Geometry) -> torch.Tensor:
        """(Bd, Sk) int32 document index per key position, -1 for padding past the last document."""
        if self.kv is not None:
            return self.kv.ids_over(geo.Sk, geo.device)
        info = self.info
        if info is not None and info.S == geo.Sk and info.B == self.rows:
            return to_device(info.doc_ids, geo.device)
        return self.ids_over(geo.Sk, geo.device)

    def q_doc_ids(self, geo: Geometry) -> torch.Tensor:
        """(Bd, Sq) int32 document index per query, -1 for queries in no document."""
        if self.kv is not None:
            return self.ids_over(geo.Sq, geo.device)
        return self.doc_ids(geo)[:, geo.offset :]

    def alignment(self, geo: Geometry):
        if self.kv is None:
            return None
        qids = self.ids_over(geo.Sq, geo.device).to(torch.int64)  # (Bq, Sq)
        qend = torch.cumsum(to_device(self.lengths_tensor(), geo.device).to(torch.int64), -1)  # (Bq, N)
        kend = torch.cumsum(to_device(self.kv.lengths_tensor(), geo.device).to(torch.int64), -1)  # (Bk, N)
        shift = kend - qend  # (Bd, N): where each document's last query sits among the keys
        Bd = max(qids.shape[0], shift.shape[0])
        qids, shift = qids.expand(Bd, -1), shift.expand(Bd, -1)
        ar = torch.arange(geo.Sq, device=geo.device)
        per_doc = ar + torch.gather(shift, 1, qids.clamp(min=0))
        return torch.where(qids >= 0, per_doc, ar + geo.offset)

    def bind(self, geo: Geometry) -> BoundMask:
        if self.kv is not None:
            qids, kids = self.ids_over(geo.Sq, geo.device), self.kv.ids_over(geo.Sk, geo.device)
            if qids.shape[0] == kids.shape[0] == 1:
                q1, k1 = qids[0], kids[0]

                def pred_kv(b, h, q, kv):
                    dq = q1[q]
                    return (dq == k1[kv]) & (dq >= 0)

                return BoundMask(pred_kv, False, False)
            Bd = max(qids.shape[0], kids.shape[0])
            qb, kb = qids.expand(Bd, -1), kids.expand(Bd, -1)

            def pred_kv_b(b, h, q, kv):
                dq = qb[b, q]
                return (dq == kb[b, kv]) & (dq >= 0)

            return BoundMask(pred_kv_b, True, False)
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

    At most one of ``keep`` ((B, S) bool keep-mask, left or right padding) and ``lengths``
    ((B,) int64, right padding) is set; ``info`` is the SeqInfo this term came from, if any
    (keyed by its identity; it knows on the host whether each row's real tokens are one run).

    ``kv``: the *key* layout, when keys are padded differently from queries (a KV cache, a
    decode batch next to prefills, cross-attention): another ``Padding`` over the Sk keys. This
    term then describes the Sq queries (neither ``keep`` nor ``lengths``: every query is real),
    and each row's real queries sit bottom-right among its real keys: the t-th of n real queries
    at the position of the (m - n + t)-th of m real keys. Without ``kv`` one layout over the keys
    serves both, queries reading it at ``i + Sk - Sq``.
    """

    keep: torch.Tensor | None = None
    lengths: torch.Tensor | None = None
    info: Any = None
    kv: Padding | None = None

    is_sequence_structure = True

    def _side_repr(self) -> str:
        if self.lengths is not None:
            return f"lengths=tensor{tuple(self.lengths.shape)}"
        if self.keep is not None:
            return f"mask=tensor{tuple(self.keep.shape)}"
        return ""

    def __repr__(self) -> str:
        if self.kv is None:
            return f"padding({self._side_repr()})"
        own = self._side_repr()
        kv = self.kv._side_repr().replace("lengths=", "kv=").replace("mask=", "kv_mask=")
        return f"padding({own + ', ' if own else ''}{kv})"

    @property
    def packed_layout(self) -> bool:
        return self.kv is not None

    def content_key(self, tokens: list | None = None) -> tuple:
        kv = None if self.kv is None else self.kv.content_key(tokens)
        if self.info is not None:
            return ("Padding", obj_key(self.info, tokens), kv)
        if self.keep is not None:
            return ("Padding", "keep", tensor_key(self.keep, tokens), kv)
        if self.lengths is not None:
            return ("Padding", "lengths", tensor_key(self.lengths, tokens), kv)
        return ("Padding", "all", kv)

    def _own_contiguous(self) -> bool | None:
        if self.info is not None:
            return self.info.contiguous
        return None if self.keep is not None else True

    def _structure(self) -> tuple:
        t = self.keep if self.keep is not None else self.lengths
        kind = "keep" if self.keep is not None else ("lengths" if self.lengths is not None else "all")
        shape = None if t is None else (tuple(t.shape), t.device)
        kv = None if self.kv is None else self.kv.structure
        return ("Padding", kind, shape, self._own_contiguous(), kv)

    @property
    def contiguous(self) -> bool | None:
        """Whether every row's real tokens form one run (queries and keys): True for lengths,
        the SeqInfo's answer for a SeqInfo, None (unknown without reading the mask) for a bare
        keep-mask."""
        st = self.structure  # read from the structure: a decision's structure-only copy holds no SeqInfo
        own, kv_st = st[3], st[4]
        if kv_st is None:
            return own
        kv = kv_st[3]
        if own is False or kv is False:
            return False
        return None if own is None or kv is None else True

    def _check_side(self, ln: str, mn: str, B: int, S: int, what: str) -> None:
        if self.lengths is not None:
            if self.lengths.shape[0] != B:
                raise bad_value(ln, f"shape (B,) = ({B},)", f"shape {tuple(self.lengths.shape)}")
            if self.lengths.numel():
                lo, hi = (int(x) for x in torch.stack((self.lengths.min(), self.lengths.max())).tolist())  # one sync
                if lo < 0:
                    raise bad_value(ln, "non-negative lengths", f"minimum {lo}")
                if hi > S:
                    raise bad_value(ln, f"lengths <= the {what} {S}", f"a length of {hi}")
            return
        if self.keep is None:
            return
        if self.keep.shape[0] != B:
            raise bad_value(mn, f"one row per batch element (B={B})", f"{self.keep.shape[0]} rows")
        if self.keep.shape[1] != S:
            raise bad_value(mn, f"rows of the {what} {'Sk' if what == 'key length' else 'Sq'}={S}", f"rows of length {self.keep.shape[1]}")

    def check(self, geo: Geometry) -> None:
        if self.kv is None:
            check_positional("padding", geo)
            self._check_side("padding(lengths)", "padding(mask)", geo.B, geo.Sk, "key length")
            return
        self._check_side("padding(lengths)", "padding(mask)", geo.B, geo.Sq, "query length")
        self.kv._check_side("padding(kv)", "padding(kv_mask)", geo.B, geo.Sk, "key length")

    def _keep_over(self, B: int, S: int, device) -> torch.Tensor:
        """(B, S) bool on ``device``. Memoized on this term (a backend reads it two to four times
        per call: mask, query rows, block structure, predicate), keyed by the source tensor's
        version so that an in-place edit is seen (not for inference-mode tensors, which have no
        version: docs/reliability.md); not while tracing."""
        src = self.keep if self.keep is not None else self.lengths
        if src is None:
            return torch.ones(B, S, dtype=torch.bool, device=device)
        return _memo(self, "_keep_memo", S, device, src, self._build_keep)

    def _build_keep(self, S: int, device) -> torch.Tensor:
        if self.keep is not None:
            return to_device(self.keep, device)
        lengths = to_device(self.lengths, device)
        return torch.arange(S, device=device)[None, :] < lengths[:, None]

    def keep_mask(self, geo: Geometry) -> torch.Tensor:
        """(B, Sk) bool on the call's device: the real keys."""
        if self.kv is not None:
            return self.kv._keep_over(geo.B, geo.Sk, geo.device)
        return self._keep_over(geo.B, geo.Sk, geo.device)

    def q_keep(self, geo: Geometry) -> torch.Tensor:
        """(B, Sq) bool: the real queries."""
        if self.kv is not None:
            return self._keep_over(geo.B, geo.Sq, geo.device)
        return self.keep_mask(geo)[:, geo.offset :]

    def alignment(self, geo: Geometry):
        if self.kv is None:
            return None
        qk, kk = self.q_keep(geo), self.keep_mask(geo)
        ar = torch.arange(geo.Sq, device=geo.device)
        if self.lengths is not None and self.kv.lengths is not None:  # right padding both sides
            shift = to_device(self.kv.lengths, geo.device).to(torch.int64) - to_device(self.lengths, geo.device).to(torch.int64)
            return torch.where(qk, ar + shift[:, None], ar + geo.offset)
        rank = torch.cumsum(qk.to(torch.int64), -1) - 1  # (B, Sq): t of the t-th real query
        target = kk.sum(-1, keepdim=True) - qk.sum(-1, keepdim=True) + rank  # its rank among the real keys
        kcum = torch.cumsum(kk.to(torch.int64), -1).contiguous()  # real keys up to and including j
        at = torch.searchsorted(kcum, (target + 1).clamp(min=1).contiguous())  # the target-th real key
        first = torch.searchsorted(kcum, torch.ones_like(target[:, :1]))
        pos = torch.where(target >= 0, at, first + target)  # before the first real key: counted back from it
        return torch.where(qk, pos, ar + geo.offset)

    def bind(self, geo: Geometry) -> BoundMask:
        keep = self.keep_mask(geo)
        if self.kv is not None:
            qk = self.q_keep(geo)

            def pred_kv(b, h, q, kv):
                return qk[b, q] & keep[b, kv]

            return BoundMask(pred_kv, True, False)
        off = geo.offset

        def pred(b, h, q, kv):
            return keep[b, q + off] & keep[b, kv]

        return BoundMask(pred, True, False)


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


def documents(lengths, kv=None) -> MaskTerm:
    """Packed documents: key j visible from query i iff both belong to the same document.

    ``lengths`` gives the document lengths of a packed row: a list of ints or a 1-D tensor (one
    packing shared by the batch), or one list / a (B, N) tensor per row (ragged lists are padded
    with zero-length documents). Positions past ``sum(lengths)`` are padding and see nothing.
    A :class:`anyattn.SeqInfo` of packed documents is accepted too.

    ``kv``: the keys' document lengths (same forms), when queries and keys are packed
    differently (chunked prefill, prefill and decode in one batch, packed cross-attention):
    ``lengths`` then describes the Sq queries, ``kv`` the Sk keys, with as many documents per row;
    each document's queries sit bottom-right among its keys (see :class:`Documents`).

    Python lists and CPU tensors are read on the host when the term is built (a CPU tensor
    edited in place later does not change the term: build a new one), so a new packing every
    step needs no device sync; a CUDA tensor is read once per new tensor (to validate it), and
    its in-place edits are seen (keyed by its version).
    """
    q = _documents(lengths, "documents(lengths)")
    if kv is None:
        return q
    k = _documents(kv, "documents(kv)")
    return Documents(q.lengths, q.host_lengths, q.info, k)


def _documents(lengths, name: str) -> Documents:
    if isinstance(lengths, SeqInfo):
        if lengths.kind != "documents":
            raise bad_value(
                name, "a SeqInfo of packed documents (from_lengths/position_ids/cu_seqlens); use padding(info)",
                f"a SeqInfo of kind {lengths.kind!r}",
            )  # fmt: skip
        return Documents(lengths.lengths, lengths.host_lengths, lengths)
    if isinstance(lengths, (list, tuple)):
        if not lengths or all(isinstance(r, (list, tuple)) and not r for r in lengths):
            raise bad_value(name, "at least one document length", repr(lengths))
        host = _host_rows(lengths)
        if host is None:
            raise bad_type(name, "a list of ints, a list of lists of ints or an integer tensor", repr(lengths)[:80])
        for r in host:
            for x in r:
                if x < 0:
                    raise bad_value(name, "non-negative lengths", x)
        return Documents(None, host)
    t = int_tensor(name, lengths, dims=(1, 2))
    if t.dim() == 1:
        t = t.unsqueeze(0)  # a view: keyed by its base tensor
    if t.shape[1] == 0:
        raise bad_value(name, "at least one document length", f"shape {tuple(t.shape)}")
    if t.device.type == "cpu" and not t.requires_grad:
        # host values, read now (no device involved) and kept as a copy: the term is those values,
        # whatever happens to the caller's tensor later (key, checks and lowering all agree)
        return Documents(t.clone(), tuple(tuple(r) for r in t.tolist()))
    return Documents(t)


def padding(lengths=None, *, mask=None, kv=None, kv_mask=None) -> MaskTerm:
    """Padded batch: visible iff both query and key are real tokens of their row.

    Give either ``lengths`` (B,) (right padding: the first ``lengths[b]`` tokens are real) or
    ``mask``, a (B, S) keep-mask like HF's ``attention_mask`` (1/True = real token; left or right
    padding). A :class:`anyattn.SeqInfo` built from a padding mask is accepted as ``lengths``.

    Separate key layout (a KV cache, decode next to prefill, cross-attention): ``kv`` (B,) key
    lengths (right padding; or a padding SeqInfo) or ``kv_mask`` (B, Sk) keep-mask describe the
    keys; ``lengths`` / ``mask`` then describe the queries (neither: every query is real). Each
    row's real queries sit bottom-right among its real keys (see :class:`Padding`).
    """
    if kv is None and kv_mask is None:
        return _padding(lengths, mask, "padding", "lengths", "mask")
    k = _padding(kv, kv_mask, "padding", "kv", "kv_mask")
    q = Padding() if lengths is None and mask is None else _padding(lengths, mask, "padding", "lengths", "mask")
    return Padding(q.keep, q.lengths, q.info, k)


def _padding(lengths, mask, name: str, ln: str, mn: str) -> Padding:
    if isinstance(lengths, SeqInfo):
        if mask is not None:
            raise bad_value(name, f"exactly one of {ln}= or {mn}=", "both")
        if lengths.kind != "padding":
            raise bad_value(
                f"{name}({ln})", "a SeqInfo built from a padding mask; use documents(info) for packed documents",
                f"a SeqInfo of kind {lengths.kind!r}",
            )  # fmt: skip
        return Padding(keep=lengths.keep, info=lengths)
    if (lengths is None) == (mask is None):
        raise bad_value(name, f"exactly one of {ln}= or {mn}=", "both" if lengths is not None else "neither")
    if mask is not None:
        if not isinstance(mask, torch.Tensor):
            raise bad_type(f"{name}({mn})", "a (B, S) bool or 0/1 integer tensor", type(mask).__name__)
        if mask.dim() != 2:
            raise bad_value(f"{name}({mn})", "a (B, S) keep-mask", f"shape {tuple(mask.shape)}")
        if mask.dtype.is_floating_point or mask.dtype.is_complex:
            raise bad_type(f"{name}({mn})", "a bool or 0/1 integer keep-mask", f"dtype {mask.dtype}")
        return Padding(keep=mask if mask.dtype == torch.bool else mask != 0)
    t = int_tensor(f"{name}({ln})", lengths, dims=(1,))
    return Padding(lengths=t)
