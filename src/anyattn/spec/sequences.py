"""Batch-structure mask terms: packed ``documents`` and ``padding``, from host lengths, tensors
or a :class:`anyattn.SeqInfo` (keys: see ``spec.base``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .._cache import obj_key, tensor_key
from ..errors import bad_type, bad_value
from ..layout import SeqInfo, host_to_device
from .base import BoundMask, Geometry, check_positional, int_tensor, to_device
from .masks import MaskTerm

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
