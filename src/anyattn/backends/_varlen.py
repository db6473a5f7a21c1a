"""Varlen (FlashAttention-style) lowering shared unchanged by ``flash_torch`` and ``flash``:
splitting a canonical mask into window + sequence structure, the window mapping, the packing
of a call's sequences (cu_seqlens and how tokens move), and the lse layout conversion.

A *packing* is what the varlen kernels need for one call: ``cu_seqlens`` on the device,
``max_seqlen`` as a Python int, and how the (B, S) rows become packed tokens:

    route      when                                         tokens
    reshape    documents filling every row (T == B * S)     a view, no copy
    slice      one row of documents, padding at the tail    q[0, :T], no copy
    gather     padding, or several rows with padding        unpad (index_select) / pad

It is built from host lengths (documents(list), CPU tensors, a SeqInfo) without any host sync;
only a term that holds nothing but device data is read to the host, once per content (the
packing is cached by the backend).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ..layout import SeqInfo, host_to_device
from ..spec import And, Documents, Padding, Window
from .base import Refusal


def map_window(w: Window | None) -> tuple[int, int]:
    """Our Window -> FlashAttention ``window_size=(left, right)``.

    Both count keys beside the query itself, so the numbers carry over unchanged; None
    (unbounded) is -1. No mask is (-1, -1); causal() is (-1, 0).
    """
    if w is None:
        return (-1, -1)
    return (-1 if w.left is None else w.left, -1 if w.right is None else w.right)


class Parts(NamedTuple):
    """A canonical mask split into what FlashAttention can take: at most one window and at most
    one sequence-structure term (documents or padding)."""

    window: Window | None
    seq: Documents | Padding | None


def split_mask(mask) -> Parts | str:
    """The FlashAttention reading of a canonical mask, or why there is none (structure only)."""
    if mask is None:
        return Parts(None, None)
    terms = mask.terms if isinstance(mask, And) else (mask,)
    window, seq = None, None
    for t in terms:
        if isinstance(t, Window) and window is None and not (t.left is None and t.right is None):
            window = t
        elif isinstance(t, (Documents, Padding)) and seq is None:
            seq = t
        elif isinstance(t, (Documents, Padding)):
            return f"{mask!r}: FlashAttention takes one sequence structure (documents or padding), not two"
        else:
            return (
                f"mask {t!r} is not expressible in FlashAttention (it takes causal, sliding_window, "
                "documents, padding and documents/padding & window); use flex, cudnn or sdpa"
            )
    return Parts(window, seq)


def positional_refusal(seq, positional: bool) -> str | None:
    """Why packing cannot serve a padding term that a window (or ALiBi) measures distances on,
    when its SeqInfo says a row has holes; None when fine or not known from the structure."""
    if positional and isinstance(seq, Padding) and seq.contiguous is False:
        return (
            "padding with holes inside a row, combined with a window or alibi: packing would shorten the "
            "distances they measure; use flex, or left/right padding"
        )
    return None


class Packing(NamedTuple):
    """Varlen metadata for one call: built once per content, then cached by the backend."""

    route: str  # "reshape" | "slice" | "gather" | "empty" (no real token)
    cu: torch.Tensor | None  # (D+1,) int32 on device, zero-length sequences dropped
    max_seqlen: int  # Python int: no sync at run time
    total: int  # T real tokens
    info: SeqInfo | None  # the "gather" route's indices (unpad/pad)
    indices: torch.Tensor | None = None  # the "gather" route's flat token positions, when no SeqInfo holds them

    @property
    def gather_indices(self) -> torch.Tensor:
        return self.indices if self.indices is not None else self.info.indices


class PairPacking(NamedTuple):
    """Varlen metadata of a call whose queries and keys are packed differently (``documents(q,
    kv=k)``, ``padding(..., kv=...)``): one sequence per document (row) that has both queries
    and keys, with ``cu_seqlens_q`` in ``q.cu`` and ``cu_seqlens_k`` in ``k.cu``. The kernel's
    bottom-right alignment per sequence is the terms' (see ``spec.sequences``)."""

    q: Packing
    k: Packing
    route: str = "pair"  # "empty" when no sequence has both queries and keys


def _cu(counts, device) -> tuple[torch.Tensor, int]:
    cu = [0]
    for c in counts:
        if c > 0:  # zero-length sequences carry no tokens; leave them out of the kernel's batch
            cu.append(cu[-1] + c)
    # through pinned memory: a new packing per batch must not make the host wait for the GPU
    return host_to_device(torch.tensor(cu, dtype=torch.int32), device), max(counts, default=0)


_EMPTY = Packing("empty", None, 0, 0, None)


def _packing_documents(term: Documents, B: int, S: int, device) -> Packing:
    info = term.info
    if info is not None and info.B == B and info.S == S:
        if info.total == 0:
            return _EMPTY
        cu, mx = info.to(device).varlen()
        route = "reshape" if info.total == B * S else ("slice" if B == 1 else "gather")
        return Packing(route, cu, mx, info.total, info.to(device) if route == "gather" else None)
    rows = term.host_rows()  # host values, or one read of a device tensor (cached by the caller)
    if len(rows) == 1 and B > 1:
        rows = rows * B
    counts = [x for r in rows for x in r if x > 0]
    T = sum(counts)
    if T == 0:
        return _EMPTY
    cu, mx = _cu(counts, device)
    if T == B * S:
        return Packing("reshape", cu, mx, T, None)
    if B == 1:
        return Packing("slice", cu, mx, T, None)
    info = SeqInfo.from_lengths([[x for x in r if x > 0] for r in rows], total_length=S, device=device)
    return Packing("gather", cu, mx, T, info)


def _packing_padding(term: Padding, B: int, S: int, device, positional: bool) -> Packing:
    info = term.info
    if info is None or info.B != B or info.S != S:
        if term.keep is not None:
            info = SeqInfo.from_padding_mask(term.keep.to(device))  # host sync (row counts), once per content
        else:
            lengths = term.lengths.tolist()  # host sync, once per content
            if not any(lengths):
                return _EMPTY
            info = SeqInfo.from_lengths([[x] if x > 0 else [] for x in lengths], total_length=S, device=device)
    if info.total == 0:
        return _EMPTY
    if positional and not info.contiguous:
        raise Refusal(
            "padding(mask=...) with holes inside a row, combined with a window or alibi: packing would shorten "
            "the distances they measure; use flex, or left/right padding"
        )
    info = info.to(device)
    cu, mx = info.varlen()
    return Packing("reshape" if info.total == B * S else "gather", cu, mx, info.total, info)


def packing_for(call, seq, positional: bool) -> Packing:
    """Varlen metadata of a call's sequence term (the caller caches it per content key).

    ``positional``: the call also measures distances (a window, alibi), which packing preserves
    only when each row's real tokens are one run; a keep-mask with holes raises :class:`Refusal`."""
    geo = call.geo
    if isinstance(seq, Documents):
        return _packing_documents(seq, geo.B, geo.Sk, geo.device)
    return _packing_padding(seq, geo.B, geo.Sk, geo.device, positional)


def side_packing(counts: list, starts: list, B: int, S: int, device) -> Packing:
    """One side (queries or keys) of a pair packing: the kept sequences' tokens, given per
    sequence (in kernel order) its token count and its first flat position in the (B*S) stream."""
    cu, mx = _cu(counts, device)
    T = sum(counts)
    lens = torch.tensor(counts, dtype=torch.int64)
    first = torch.tensor(starts, dtype=torch.int64)
    excl = torch.cumsum(lens, 0) - lens
    flat = torch.repeat_interleave(first - excl, lens, output_size=T) + torch.arange(T)
    if T == B * S:  # every position, in order
        return Packing("reshape", cu, mx, T, None)
    if B == 1 and (not starts or starts[0] == 0) and all(a + n == b for a, n, b in zip(starts, counts, starts[1:])):
        return Packing("slice", cu, mx, T, None)
    return Packing("gather", cu, mx, T, None, host_to_device(flat, device))


def _pair_rows(q_rows, k_rows, B: int) -> list:
    """Per batch row: [(q length, k length) per document]."""
    if len(q_rows) == 1 and B > 1:
        q_rows = q_rows * B
    if len(k_rows) == 1 and B > 1:
        k_rows = k_rows * B
    return [list(zip(qr, kr)) for qr, kr in zip(q_rows, k_rows)]


def _counts_of(side: Padding, B: int, S: int, device) -> tuple:
    """(per-row real-token counts, SeqInfo or None) of one side of a padding term (host read of
    a device mask or device lengths, once per content)."""
    if side.info is not None and side.info.B == B and side.info.S == S:
        return [r[0] for r in side.info.host_lengths], side.info.to(device)
    if side.keep is not None:
        info = SeqInfo.from_padding_mask(side.keep.to(device))  # host sync (row counts), once per content
        return [r[0] for r in info.host_lengths], info
    if side.lengths is not None:
        return [int(x) for x in side.lengths.tolist()], None  # host sync for a device tensor, once per content
    return [S] * B, None  # every token real


def pair_packing_for(call, seq, positional: bool, right_window: bool) -> PairPacking | Packing:
    """Varlen metadata of a call with separate query and key layouts (the caller caches it per
    content key). Sequences with no query or no key are left out of the kernel's batch (their
    queries output 0). ``right_window``: the window looks ahead (right > 0), which the varlen
    kernel aligns differently from the terms when a sequence has more queries than keys."""
    geo = call.geo
    B, Sq, Sk, dev = geo.B, geo.Sq, geo.Sk, geo.device
    if isinstance(seq, Documents):
        rows = _pair_rows(seq.host_rows(), seq.kv.host_rows(), B)
        qc, kc, qs, ks = [], [], [], []
        for b, docs in enumerate(rows):
            qo = ko = 0
            for lq, lk in docs:
                if lq > 0 and lk > 0:
                    qc.append(lq)
                    kc.append(lk)
                    qs.append(b * Sq + qo)
                    ks.append(b * Sk + ko)
                qo, ko = qo + lq, ko + lk
    else:
        qn, qinfo = _counts_of(seq, B, Sq, dev)
        kn, kinfo = _counts_of(seq.kv, B, Sk, dev)
        if positional and not ((qinfo is None or qinfo.contiguous) and (kinfo is None or kinfo.contiguous)):
            raise Refusal(
                "padding with holes inside a row, combined with a window or alibi: packing would shorten the "
                "distances they measure; use flex, or left/right padding"
            )
        # each kept row is one run of real tokens: its first real position
        qfirst = _first_real(qinfo, B, Sq)
        kfirst = _first_real(kinfo, B, Sk)
        qc, kc, qs, ks = [], [], [], []
        for b in range(B):
            if qn[b] > 0 and kn[b] > 0:
                qc.append(qn[b])
                kc.append(kn[b])
                qs.append(b * Sq + qfirst[b])
                ks.append(b * Sk + kfirst[b])
        if (qinfo is not None and not qinfo.contiguous) or (kinfo is not None and not kinfo.contiguous):
            return _pair_from_infos(qinfo, kinfo, qn, kn, B, Sq, Sk, dev)
    if not qc:
        return PairPacking(_EMPTY, _EMPTY, "empty")
    if right_window and any(a > b for a, b in zip(qc, kc)):
        raise Refusal(
            "a window that looks ahead (right > 0) with a sequence of more queries than keys: FlashAttention's "
            "local window differs from the bottom-right definition on queries before the first key; use flex or sdpa"
        )
    return PairPacking(side_packing(qc, qs, B, Sq, dev), side_packing(kc, ks, B, Sk, dev))


def _first_real(info, B: int, S: int) -> list:
    """Per row, the first real position (0 without a SeqInfo: lengths are right padding). Reads
    one index per row to the host, once per content (the packing is cached)."""
    if info is None or not info.total:
        return [0] * B
    starts = [0]
    for r in info.host_lengths:
        starts.append(starts[-1] + r[0])
    at = torch.tensor([min(c, info.total - 1) for c in starts[:-1]])
    heads = info.indices.index_select(0, at.to(info.indices.device)).tolist()
    return [h - b * S for b, h in enumerate(heads)]


def _pair_from_infos(qinfo, kinfo, qn, kn, B, Sq, Sk, dev) -> PairPacking:
    """Padding with holes and no window: each kept row's real tokens in order (a gather)."""
    def side(info, n, S):
        keep_rows = [b for b in range(B) if qn[b] > 0 and kn[b] > 0]
        if info is None:
            flat = torch.cat([torch.arange(n[b]) + b * S for b in keep_rows]) if keep_rows else torch.zeros(0, dtype=torch.int64)
            counts = [n[b] for b in keep_rows]
            cu, mx = _cu(counts, dev)
            return Packing("gather", cu, mx, sum(counts), None, host_to_device(flat, dev))
        cu_all = info.cu_seqlens.tolist()
        pick = torch.cat([torch.arange(cu_all[b], cu_all[b + 1]) for b in keep_rows]) if keep_rows else torch.zeros(0, dtype=torch.int64)
        counts = [n[b] for b in keep_rows]
        cu, mx = _cu(counts, dev)
        return Packing("gather", cu, mx, sum(counts), None, info.indices.index_select(0, pick.to(info.indices.device)))

    if not any(qn[b] > 0 and kn[b] > 0 for b in range(B)):
        return PairPacking(_EMPTY, _EMPTY, "empty")
    return PairPacking(side(qinfo, qn, Sq), side(kinfo, kn, Sk))


def tokens_in(pk: Packing, x_BSHD: torch.Tensor) -> torch.Tensor:
    """(B, S, H, D) -> (T, H, D) packed tokens along the packing's route."""
    B, S = x_BSHD.shape[:2]
    if pk.route == "reshape":
        return x_BSHD.reshape(B * S, *x_BSHD.shape[2:])
    if pk.route == "slice":
        return x_BSHD[0, : pk.total]
    return x_BSHD.reshape(B * S, *x_BSHD.shape[2:]).index_select(0, pk.gather_indices)


def tokens_out(pk: Packing, o_THD: torch.Tensor, B: int, S: int) -> torch.Tensor:
    """(T, H, D) -> (B, S, H, D), exactly 0 at positions that are no real token."""
    if pk.route == "reshape":
        return o_THD.view(B, S, *o_THD.shape[1:])
    if pk.route == "slice":
        return torch.nn.functional.pad(o_THD, (0, 0, 0, 0, 0, S - pk.total)).unsqueeze(0)
    out = o_THD.new_zeros(B * S, *o_THD.shape[1:])
    out.index_copy_(0, pk.gather_indices, o_THD)  # in place on the fresh buffer: one write
    return out.view(B, S, *o_THD.shape[1:])


def lse_out(pk: Packing, lse_TH: torch.Tensor, B: int, S: int, H: int) -> torch.Tensor:
    """(T, H) -> (B, H, S) float32, -inf at positions that are no real token."""
    if pk.route == "reshape":
        return lse_TH.view(B, S, H).transpose(1, 2)
    full = torch.full((B * S, H), float("-inf"), device=lse_TH.device)
    if pk.route == "slice":
        full[: pk.total] = lse_TH
    else:
        full = full.index_copy(0, pk.gather_indices, lse_TH)
    return full.view(B, S, H).transpose(1, 2)


def lse_to_TH(lse: torch.Tensor, T: int, H: int, heads_first: bool = True) -> torch.Tensor:
    """varlen's lse as (T, H) float32 with -inf for rows that saw no key.

    FlashAttention's varlen kernels return (H, T) (torch's own fake kernel says so too, while
    its docstring says (T, H)); accept both. When T == H the shape cannot tell: ``heads_first``
    decides (``_lse_heads_first`` learns it from the kernel). FlashAttention 2 marks empty rows
    with +inf; ours is -inf.
    """
    if lse.dim() == 3 and lse.shape[-1] == 1:
        lse = lse.squeeze(-1)
    if tuple(lse.shape) == (H, T) and (T != H or heads_first):
        lse = lse.transpose(0, 1)
    elif tuple(lse.shape) != (T, H):
        raise RuntimeError(f"flash_torch: varlen_attn returned an lse of shape {tuple(lse.shape)}, expected (H={H}, T={T})")
    lse = lse.float()
    return torch.where(lse == float("inf"), float("-inf"), lse)
