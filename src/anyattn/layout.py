"""Packed <-> padded: one description of a batch's sequence structure.

Shape legend:
    B batch rows     S row length (padded)     T real tokens in the whole batch
    N documents per row (zero-length documents pad ragged rows)     D documents in the batch

A *row* of length S holds one or more *documents* back to back (packing), followed by padding;
or, for a padded batch, one sequence whose real tokens a keep-mask marks (left or right padding).
:class:`SeqInfo` holds both views at once::

    row 0:  [a a a b b . .]        keep     [1 1 1 1 1 0 0]   doc_ids   [0 0 0 1 1 -1 -1]
    row 1:  [c c c c c c d]        keep     [1 1 1 1 1 1 1]   doc_ids   [2 2 2 2 2 2  3]
    varlen: cu_seqlens = [0, 3, 5, 11, 12] (int32, device)   max_seqlen = 6 (Python int)
            indices    = flat positions of the T=12 real tokens in the (B*S) stream

Every backend derives its own form from it: flex a BlockMask from ``doc_ids``, varlen kernels
``cu_seqlens``/``max_seqlen``, SDPA a dense mask. Build it once per batch; every layer reuses it.

Host <-> device synchronization: constructors that receive *host* data (Python lists) never
sync (they build on the CPU and copy through pinned memory). Constructors that receive *device*
tensors (``from_padding_mask``, ``from_position_ids``, ``from_cu_seqlens`` without
``max_seqlen``, tensor lengths) read the values they must know on the host (max length, total
tokens) once, at construction. Nothing in ``pad``/``unpad`` syncs.

The one packing policy every model and integration uses: :meth:`SeqInfo.packed` describes the
real tokens of a (B, S) batch as one packed row, :meth:`SeqInfo.pack` / :meth:`SeqInfo.unpack`
move tensors between the two layouts (``anyattn.packing`` decides when a model packs).

This is the bottom layer: it imports nothing of anyattn's but ``errors`` (``spec`` imports it to
turn a SeqInfo into ``documents(...)`` / ``padding(...)`` terms, never the reverse).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

from .errors import bad_type, bad_value

__all__ = ["SeqInfo", "pad", "unpad"]


# Whether host_to_device stages CPU tensors in pinned memory (True, the default). False copies
# from pageable memory, which CUDA documents as synchronizing with the stream: a switch for
# measuring what pinning saves (benchmarks/padding_probe.py), not for use. For the few bytes of
# lengths a new padding carries, round 18 (H100) measured no difference between the two.
PINNED_COPIES = True


def host_to_device(t: torch.Tensor, device) -> torch.Tensor:
    """A CPU tensor on ``device`` without a host sync: a CUDA copy from pageable memory waits for
    the stream (CUDA's documented behaviour for pageable host-to-device copies, ``non_blocking``
    or not), one from pinned memory does not (the caching host allocator keeps the pinned buffer
    alive until the copy has run). A tensor already on a GPU moves stream-ordered; a copy to the
    CPU is a plain (waiting) copy, so its values can be read at once."""
    device = torch.device(device)
    if t.device == device:
        return t
    if device.type != "cuda" or torch.compiler.is_compiling():  # a traced graph moves it itself
        return t.to(device)
    if t.device.type != "cpu" or not PINNED_COPIES or t.is_pinned():
        return t.to(device, non_blocking=True)
    return t.pin_memory().to(device, non_blocking=True)


class _Deferred:
    """The per-token maps of a SeqInfo built from host lengths, not derived yet: the one device
    buffer of per-document numbers they are derived from (see ``SeqInfo._build``), and the sizes
    (documents nD, rows B, documents per row N, row length S, real tokens T). Each map is derived
    on its own first read, sharing the token -> document step: a caller that reads only
    ``indices`` (flash_torch's unpad / pad of a padded batch) launches 6 ops, not 13."""

    __slots__ = ("buf", "sizes", "_tok")

    def __init__(self, buf: torch.Tensor, sizes: tuple):
        self.buf, self.sizes, self._tok = buf, sizes, None

    def to(self, device) -> _Deferred:
        return _Deferred(host_to_device(self.buf, device), self.sizes)

    def _parts(self):
        nD, B, N, S, total = self.sizes
        return torch.split(self.buf, (nD, nD + 1, nD, B, B, B * N))

    def _tokens(self):
        """(doc_T, ar_T, idx_T): per real token (row-major) its document, its rank, its flat
        position row * S + column; no host sync."""
        if self._tok is None:
            nD, B, N, S, total = self.sizes
            lengths_D, _, row_D, row_start_d, _, _ = self._parts()
            dev = self.buf.device
            doc_T = torch.repeat_interleave(torch.arange(nD, device=dev), lengths_D, output_size=total)  # no sync
            row_T = row_D[doc_T]
            ar_T = torch.arange(total, device=dev)
            self._tok = (doc_T, ar_T, row_T * S + (ar_T - row_start_d[row_T]))
        return self._tok

    def derive(self, name: str) -> torch.Tensor:
        """One of the four maps, by a few vectorized ops on the buffer's device (no host sync)."""
        nD, B, N, S, total = self.sizes
        dev = self.buf.device
        if name == "keep":
            row_tot_d = self._parts()[4]
            return torch.arange(S, device=dev)[None, :] < row_tot_d[:, None]
        doc_T, ar_T, idx_T = self._tokens()
        if name == "indices":
            return idx_T
        if name == "doc_ids":
            doc_ids = torch.full((B * S,), -1, dtype=torch.int32, device=dev)
            doc_ids.index_copy_(0, idx_T, doc_T.to(torch.int32))  # index_copy_: no sync (as pad())
            return doc_ids.view(B, S)
        positions = torch.zeros(B * S, dtype=torch.int64, device=dev)
        positions.index_copy_(0, idx_T, ar_T - self._parts()[1][doc_T])
        return positions.view(B, S)


_DEFERRED_MAPS = ("indices", "keep", "doc_ids", "positions")


class _TokenMap:
    """A per-token map of a SeqInfo (``indices``, ``keep``, ``doc_ids``, ``positions``: B*S
    entries each). A SeqInfo built from host lengths derives each on its first read (sharing the
    token -> document step), so a caller that needs only the per-document numbers (a varlen kernel:
    ``cu_seqlens``/``max_seqlen``) never pays for them: on a GPU host the dozen ops cost ~0.3 ms
    per call (benchmarks/results/round10/README.md), about what a 16k-token forward takes.
    First read inside a ``torch.compile`` region, the derivation is traced into the graph (it
    works, fullgraph included); its sizes depend on the real-token count, so a graph compiled
    with ``dynamic=False`` would recompile per count: read a map once before the region (or use
    ``nn.PackedBatch``, which does) to keep it out."""

    def __init__(self, name: str):
        self.name, self.slot = name, "_" + name

    def __get__(self, obj, owner=None):
        if obj is None:
            return self
        v = obj.__dict__[self.slot]
        if isinstance(v, _Deferred):
            v = v.derive(self.name)
            obj.__dict__[self.slot] = v
        return v

    def __set__(self, obj, value):  # the dataclass __init__ only: the class is frozen
        obj.__dict__[self.slot] = value


@dataclass(frozen=True, eq=False)
class SeqInfo:
    """A batch's sequence structure. Build with one of the ``from_*`` constructors."""

    B: int
    S: int
    lengths: torch.Tensor  # (B, N) int64 document lengths per row, zero-padded; on device
    host_lengths: tuple  # the same as Python ints: tuple of B tuples
    cu_seqlens: torch.Tensor  # (D+1,) int32 on device, over the real tokens of all rows
    max_seqlen: int  # longest document (Python int: no sync when a kernel needs it)
    total: int  # T, real tokens in the batch
    indices: torch.Tensor  # (T,) int64 flat positions of the real tokens in the (B*S) stream
    keep: torch.Tensor  # (B, S) bool, True = real token
    doc_ids: torch.Tensor  # (B, S) int32 global document index, -1 for padding
    positions: torch.Tensor  # (B, S) int64 position inside its document (0 for padding)
    kind: str  # "documents" (packed rows, right padding) or "padding" (keep-mask rows)
    # every row's real tokens form one run (no holes): always for packed documents; for a padding
    # mask, read with the row counts at construction. Windows and ALiBi measure distances, which
    # packing the real tokens preserves only then.
    contiguous: bool = True

    def __repr__(self) -> str:
        return (
            f"SeqInfo(kind={self.kind!r}, B={self.B}, S={self.S}, documents={self.cu_seqlens.numel() - 1}, "
            f"tokens={self.total}, max_seqlen={self.max_seqlen})"
        )

    @property
    def num_docs(self) -> int:
        return self.cu_seqlens.numel() - 1

    # ---------------------------------------------------------------- constructors
    @classmethod
    def from_lengths(cls, lengths, *, total_length: int | None = None, device=None) -> SeqInfo:
        """Packed rows from document lengths: a list (one row), a list of lists (one per row) or
        an integer tensor (N,) / (B, N). ``total_length`` is the row length S (default: the
        longest row's sum)."""
        if isinstance(lengths, torch.Tensor):
            if lengths.dtype.is_floating_point or lengths.dtype == torch.bool:
                raise bad_type("lengths", "integer document lengths", f"dtype {lengths.dtype}")
            if lengths.dim() not in (1, 2):
                raise bad_value("lengths", "a (N,) or (B, N) tensor", f"shape {tuple(lengths.shape)}")
            device = lengths.device if device is None else torch.device(device)
            rows = lengths.reshape(-1, lengths.shape[-1]).tolist()  # one sync, at construction
        elif isinstance(lengths, (list, tuple)):
            if all(isinstance(x, int) and not isinstance(x, bool) for x in lengths):
                rows = [list(lengths)]
            elif all(isinstance(r, (list, tuple)) for r in lengths):
                rows = [list(r) for r in lengths]
            else:
                raise bad_type("lengths", "a list of ints or a list of lists of ints", repr(lengths)[:80])
        else:
            raise bad_type("lengths", "a list of ints, a list of lists or an integer tensor", type(lengths).__name__)
        device = torch.device("cpu") if device is None else torch.device(device)
        for r in rows:
            for x in r:
                if not isinstance(x, int) or x < 0:
                    raise bad_value("lengths", "non-negative integer document lengths", x)
        if not rows or not any(rows):
            raise bad_value("lengths", "at least one row with at least one document", repr(rows)[:80])
        S = max(sum(r) for r in rows)
        if total_length is not None:
            if isinstance(total_length, bool) or not isinstance(total_length, int):
                raise bad_type("total_length", "an int (the row length S) or None", repr(total_length))
            if total_length < S:
                raise bad_value("total_length", f"at least the longest row's total {S}", total_length)
            S = total_length
        return cls._build(rows, S, device, kind="documents")

    @classmethod
    def from_padding_mask(cls, mask: torch.Tensor) -> SeqInfo:
        """Padded batch from a (B, S) keep-mask (HF ``attention_mask``: 1 = real token). Left,
        right or mixed padding; each row is one sequence. Reads the row lengths to the host once.
        The SeqInfo holds its own copy of the mask: an edit of ``mask`` afterwards changes nothing
        (its lengths were read when it was built)."""
        if not isinstance(mask, torch.Tensor):
            raise bad_type("mask", "a (B, S) bool or 0/1 integer tensor", type(mask).__name__)
        if mask.dim() != 2:
            raise bad_value("mask", "a (B, S) keep-mask", f"shape {tuple(mask.shape)}")
        if mask.dtype.is_floating_point:
            raise bad_type("mask", "a bool or 0/1 integer keep-mask", f"dtype {mask.dtype}")
        keep = mask.clone() if mask.dtype == torch.bool else mask != 0
        B, S = keep.shape
        counts_t = keep.sum(-1)
        pos = torch.arange(S, device=keep.device)
        first = torch.where(keep, pos, S).amin(-1) if S else counts_t
        last = torch.where(keep, pos, -1).amax(-1) if S else counts_t
        run = (last - first + 1 == counts_t) | (counts_t == 0)
        counts, runs = torch.stack((counts_t, run.to(counts_t.dtype))).tolist() if B else ([], [])  # one sync
        contiguous = all(runs)
        indices = torch.nonzero(keep.reshape(-1), as_tuple=False).flatten()
        cu = torch.zeros(B + 1, dtype=torch.int32, device=keep.device)
        cu[1:] = torch.cumsum(counts_t, 0).to(torch.int32)
        # document index = row index for real tokens
        rows = torch.arange(B, device=keep.device, dtype=torch.int32)[:, None].expand(B, S)
        doc_ids = torch.where(keep, rows, -1).to(torch.int32)
        positions = torch.where(keep, torch.cumsum(keep.to(torch.int64), -1) - 1, 0)
        lengths = counts_t.to(torch.int64)[:, None]
        return cls(
            B=B, S=S, lengths=lengths, host_lengths=tuple((c,) for c in counts), cu_seqlens=cu,
            max_seqlen=max(counts) if counts else 0, total=int(sum(counts)), indices=indices, keep=keep,
            doc_ids=doc_ids, positions=positions, kind="padding", contiguous=contiguous,
        )  # fmt: skip

    @classmethod
    def from_position_ids(cls, position_ids: torch.Tensor) -> SeqInfo:
        """Packed rows from ``position_ids`` that restart at 0 for every document (HF's
        DataCollatorWithFlattening convention): (S,) or (B, S). Each row must start at 0 and
        each next id be the previous + 1 (same document) or 0 (a new one); anything else is an
        error, not a guess. Reads the ids to the host once."""
        if not isinstance(position_ids, torch.Tensor):
            raise bad_type("position_ids", "an integer tensor (S,) or (B, S)", type(position_ids).__name__)
        if position_ids.dtype.is_floating_point or position_ids.dtype == torch.bool:
            raise bad_type("position_ids", "integer position ids", f"dtype {position_ids.dtype}")
        if position_ids.dim() not in (1, 2):
            raise bad_value(
                "position_ids", "a (S,) or (B, S) tensor restarting at 0 per document", f"shape {tuple(position_ids.shape)}"
            )
        if position_ids.shape[-1] == 0:  # reshape(-1, 0) would raise torch's own error
            raise bad_value("position_ids", "non-empty rows", "a row of length 0")
        p = position_ids.reshape(-1, position_ids.shape[-1])
        host = p.tolist()  # one sync, at construction
        rows = []
        for b, r in enumerate(host):
            if not r:
                raise bad_value("position_ids", "non-empty rows", "a row of length 0")
            if r[0] != 0:
                raise bad_value("position_ids", "each row to start at 0", f"row {b} starts at {r[0]}")
            docs, cur = [], 0
            for s in range(1, len(r)):
                if r[s] == r[s - 1] + 1:
                    continue
                if r[s] == 0:
                    docs.append(s - cur)
                    cur = s
                    continue
                raise bad_value(
                    "position_ids", "each id to be the previous + 1 or 0 (a new document)", f"{r[s - 1]} then {r[s]} at row {b}, position {s}"
                )
            docs.append(len(r) - cur)
            rows.append(docs)
        return cls._build(rows, p.shape[-1], p.device, kind="documents")

    @classmethod
    def from_cu_seqlens(cls, cu_seqlens: torch.Tensor, *, max_seqlen: int | None = None, total_length: int | None = None) -> SeqInfo:
        """One packed row from varlen metadata ``cu_seqlens`` (D+1,) int32: starts at 0,
        non-decreasing. ``max_seqlen`` is checked against the values when given."""
        if not isinstance(cu_seqlens, torch.Tensor):
            raise bad_type("cu_seqlens", "a 1-D int32 tensor", type(cu_seqlens).__name__)
        if cu_seqlens.dtype != torch.int32:
            raise bad_type("cu_seqlens", "dtype torch.int32", f"dtype {cu_seqlens.dtype}")
        if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
            raise bad_value("cu_seqlens", "a 1-D tensor of at least 2 values (0, ..., total)", f"shape {tuple(cu_seqlens.shape)}")
        cu = cu_seqlens.tolist()  # one sync, at construction
        if cu[0] != 0:
            raise bad_value("cu_seqlens", "a first value of 0", cu[0])
        lens = [b - a for a, b in zip(cu[:-1], cu[1:])]
        if any(x < 0 for x in lens):
            i = next(i for i, x in enumerate(lens) if x < 0)
            raise bad_value("cu_seqlens", "non-decreasing values", f"{cu[i]} then {cu[i + 1]} at index {i}")
        if max_seqlen is not None and max_seqlen != max(lens):
            raise bad_value("max_seqlen", f"the longest document in cu_seqlens ({max(lens)})", max_seqlen)
        if total_length is not None and (isinstance(total_length, bool) or not isinstance(total_length, int)):
            raise bad_type("total_length", "an int (the row length S) or None", repr(total_length))
        S = cu[-1] if total_length is None else total_length
        if S < cu[-1]:
            raise bad_value("total_length", f"at least cu_seqlens[-1] = {cu[-1]}", total_length)
        return cls._build([lens], S, cu_seqlens.device, kind="documents")

    @classmethod
    def _build(cls, rows: list[list[int]], S: int, device: torch.device, kind: str) -> SeqInfo:
        """Every tensor from host lengths without a host sync. The per-document numbers (a few
        hundred at most) travel to ``device`` in ONE pinned, non-blocking copy; the per-token
        maps (B*S entries: ~10^4-10^5 for a packed row) are derived there by a dozen vectorized
        ops on their first read, so the host never allocates or fills them (on a GPU host, filling
        them on the CPU cost ~0.6 ms per 16k-token row: benchmarks/results/round9/seqinfo_probe.log)
        and a varlen kernel, which reads only ``cu_seqlens``, never launches them. Building the
        next batch's structure overlaps the device's work on the current one."""
        B = len(rows)
        N = max(len(r) for r in rows)
        flat_docs = [x for r in rows for x in r]
        nD, total = len(flat_docs), sum(flat_docs)
        row_tot = [sum(r) for r in rows]
        cu = [0, *itertools.accumulate(flat_docs)]
        row_start = [0, *itertools.accumulate(row_tot)][:B]
        row_of_doc = [b for b, r in enumerate(rows) for _ in r]
        padded = [x for r in rows for x in (*r, *([0] * (N - len(r))))]
        # one host buffer, one copy: [doc lengths | cu | row of each doc | row starts | row totals | (B, N) lengths]
        host = torch.tensor(flat_docs + cu + row_of_doc + row_start + row_tot + padded, dtype=torch.int64)
        buf = host_to_device(host, device)
        _, cu_d, _, _, _, padded_d = torch.split(buf, (nD, nD + 1, nD, B, B, B * N))
        deferred = _Deferred(buf, (nD, B, N, S, total))  # derived on the first read of a per-token map (_TokenMap)
        return cls(
            B=B, S=S,
            lengths=padded_d.view(B, N), host_lengths=tuple(tuple(r) + (0,) * (N - len(r)) for r in rows),
            cu_seqlens=cu_d.to(torch.int32), max_seqlen=max(flat_docs) if flat_docs else 0, total=total,
            indices=deferred, keep=deferred, doc_ids=deferred, positions=deferred, kind=kind,
        )  # fmt: skip

    # ---------------------------------------------------------------- views
    def to(self, device) -> SeqInfo:
        device = torch.device(device)
        if self.cu_seqlens.device == device:
            return self
        mv = lambda t: host_to_device(t, device)  # noqa: E731
        maps, moved = {}, None
        for k in _DEFERRED_MAPS:
            v = self.__dict__["_" + k]
            if isinstance(v, _Deferred):  # not derived yet: move the per-document buffer, derive there
                moved = moved or v.to(device)
                maps[k] = moved
            else:
                maps[k] = mv(v)
        return SeqInfo(
            B=self.B, S=self.S, lengths=mv(self.lengths), host_lengths=self.host_lengths, cu_seqlens=mv(self.cu_seqlens),
            max_seqlen=self.max_seqlen, total=self.total, kind=self.kind, contiguous=self.contiguous, **maps,
        )  # fmt: skip

    def varlen(self) -> tuple[torch.Tensor, int]:
        """``(cu_seqlens, max_seqlen)`` for a varlen kernel: int32 on this SeqInfo's device over the
        non-empty documents (zero-length ones carry no tokens and are left out of the kernel's
        batch): ``cu_seqlens`` itself when no document is empty, else built from the host lengths
        through pinned memory (no sync). Memoized."""
        hit = self.__dict__.get("_varlen")
        if hit is None:
            cu = [0]
            for r in self.host_lengths:
                for x in r:
                    if x > 0:
                        cu.append(cu[-1] + x)
            if len(cu) == self.cu_seqlens.numel():  # every document of cu_seqlens is non-empty
                hit = (self.cu_seqlens, self.max_seqlen)
            else:
                hit = (host_to_device(torch.tensor(cu, dtype=torch.int32), self.cu_seqlens.device), self.max_seqlen)
            object.__setattr__(self, "_varlen", hit)
        return hit

    # ---------------------------------------------------------------- the packing policy
    def packed(self, total_length: int | None = None) -> SeqInfo:
        """The real tokens of this batch as ONE packed row (1, S') of the same documents (a padded
        row is one document), ``S' = total_length`` (default: T); positions past T are padding.
        What :meth:`pack` / :meth:`unpack` move tensors between. No host sync."""
        T, dev = self.total, self.keep.device
        S = T if total_length is None else total_length
        if S < T:
            raise bad_value("total_length", f"at least the {T} real tokens", S)
        if self.kind == "documents" and self.B > 1:  # rows are zero-padded to N docs: re-derive
            return SeqInfo.from_lengths([x for r in self.host_lengths for x in r], total_length=S, device=dev)
        flat = tuple(x for r in self.host_lengths for x in r)  # padding: one per row; documents, B == 1: exact
        tail = S - T
        doc_ids = self.doc_ids.reshape(-1).index_select(0, self.indices)
        positions = self.positions.reshape(-1).index_select(0, self.indices)
        keep = torch.ones(S, dtype=torch.bool, device=dev)
        if tail:
            doc_ids = torch.nn.functional.pad(doc_ids, (0, tail), value=-1)
            positions = torch.nn.functional.pad(positions, (0, tail), value=0)
            keep[T:] = False
        return SeqInfo(
            B=1, S=S, lengths=(self.cu_seqlens[1:] - self.cu_seqlens[:-1]).to(torch.int64)[None], host_lengths=(flat,),
            cu_seqlens=self.cu_seqlens, max_seqlen=self.max_seqlen, total=T, indices=torch.arange(T, device=dev),
            keep=keep[None], doc_ids=doc_ids[None], positions=positions[None], kind="documents",
        )  # fmt: skip

    def pack(self, x: torch.Tensor, total_length: int | None = None, value=0) -> torch.Tensor:
        """(B, S, ...) -> (1, S', ...): the real tokens in row order, then ``value`` up to
        ``total_length`` (default T). The layout of :meth:`packed`. Differentiable."""
        flat = unpad(x, self)
        tail = (self.total if total_length is None else total_length) - self.total
        if tail:
            flat = torch.cat((flat, flat.new_full((tail, *flat.shape[1:]), value)))
        return flat.unsqueeze(0)

    def unpack(self, x: torch.Tensor) -> torch.Tensor:
        """(1, S', ...) in the layout of :meth:`packed` -> (B, S, ...), zeros at padding."""
        return pad(x[0, : self.total], self)


# installed after @dataclass has read the fields (a descriptor present then would be taken for a default)
for _name in _DEFERRED_MAPS:
    setattr(SeqInfo, _name, _TokenMap(_name))
del _name


def unpad(x: torch.Tensor, info: SeqInfo) -> torch.Tensor:
    """(B, S, ...) -> (T, ...): the real tokens, in row order. Differentiable."""
    if x.shape[:2] != (info.B, info.S):
        raise bad_value("x", f"leading dims (B, S) = ({info.B}, {info.S})", f"shape {tuple(x.shape)}")
    return x.reshape(info.B * info.S, *x.shape[2:]).index_select(0, info.indices)


def pad(x: torch.Tensor, info: SeqInfo) -> torch.Tensor:
    """(T, ...) -> (B, S, ...) with zeros at padding positions. Differentiable."""
    if x.shape[0] != info.total:
        raise bad_value("x", f"leading dim T = {info.total} real tokens", f"shape {tuple(x.shape)}")
    out = x.new_zeros(info.B * info.S, *x.shape[1:])
    out.index_copy_(0, info.indices, x)  # in place on the fresh buffer: one write of x, not two
    return out.view(info.B, info.S, *x.shape[1:])
