"""Varlen (FlashAttention-style) lowering shared unchanged by ``flash_torch`` and ``flash``:
splitting a canonical mask into window + sequence structure, the window mapping, cached packing
metadata, and the lse layout conversion."""

from __future__ import annotations

from typing import NamedTuple

import torch

from .._lru import LRU
from ..layout import SeqInfo, host_to_device
from ..spec import And, Documents, Padding, Window

_PLANS = LRU(128)  # (mask key, B, Sq, Sk, device) -> {packing, contiguous, term kept alive}


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
    """The FlashAttention reading of a canonical mask, or why there is none."""
    if mask is None:
        return Parts(None, None)
    terms = mask.terms if isinstance(mask, And) else (mask,)
    window, seq = None, None
    for t in terms:
        if isinstance(t, Window) and window is None:
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


class Packing(NamedTuple):
    """Varlen metadata for one (sequence term, B, S, device): built once, then cached."""

    info: SeqInfo | None  # for unpad/pad (indices, B, S, total); None when no token is real
    cu: torch.Tensor | None  # (D+1,) int32 on device, zero-length sequences dropped
    max_seqlen: int  # Python int: no sync at run time
    total: int  # T real tokens


def _cu_from_counts(counts: list[int], device) -> tuple[torch.Tensor, int]:
    cu = [0]
    for c in counts:
        if c > 0:  # zero-length sequences carry no tokens; leave them out of the kernel's batch
            cu.append(cu[-1] + c)
    # through pinned memory: a new packing per batch must not make the host wait for the GPU
    return host_to_device(torch.tensor(cu, dtype=torch.int32), device), max(counts, default=0)


def _document_rows(term: Documents, B: int) -> list[list[int]]:
    rows = term.host_lengths
    if rows is None:
        rows = term.lengths.tolist()  # host sync: once per mask key (the plan is cached)
    rows = [list(r) for r in rows]
    if len(rows) == 1 and B > 1:
        rows = rows * B
    return rows


def _packing_documents(term: Documents, B: int, S: int, device) -> Packing:
    info = term.info
    if info is not None and info.B == B and info.S == S:
        info = info.to(device)
        rows = [list(r) for r in info.host_lengths]
    else:
        rows = _document_rows(term, B)
        rows = [[x for x in r if x > 0] for r in rows]
        if not any(rows):
            return Packing(None, None, 0, 0)
        info = SeqInfo.from_lengths(rows, total_length=S, device=device)
    cu, mx = _cu_from_counts([x for r in rows for x in r], device)
    return Packing(info, cu, mx, info.total)


def _packing_padding(term: Padding, B: int, S: int, device) -> Packing:
    info = term.info
    if info is not None and info.B == B and info.S == S:
        info = info.to(device)
    elif term.keep is not None:
        info = SeqInfo.from_padding_mask(term.keep.to(device))  # host sync (row counts), once
    else:
        lengths = term.lengths.tolist()  # host sync, once per mask key
        if not any(lengths):
            return Packing(None, None, 0, 0)
        info = SeqInfo.from_lengths([[x] if x > 0 else [] for x in lengths], total_length=S, device=device)
    counts = [sum(r) for r in info.host_lengths]
    if info.total == 0:
        return Packing(None, None, 0, 0)
    cu, mx = _cu_from_counts(counts, device)
    return Packing(info, cu, mx, info.total)


def _contiguous(keep: torch.Tensor) -> bool:
    """Whether every row's real tokens form one run (left or right padding, no holes).

    Windows count positions; packing removes padding, so a hole inside a row would shorten the
    distances a window sees. One host sync, at planning time (cached)."""
    B, S = keep.shape
    pos = torch.arange(S, device=keep.device).expand(B, S)
    first = torch.where(keep, pos, S).amin(-1)
    last = torch.where(keep, pos, -1).amax(-1)
    n = keep.sum(-1)
    return bool(((last - first + 1 == n) | (n == 0)).all())


def packing_for(call, seq: Documents | Padding, positional: bool) -> Packing | str:
    """Varlen metadata of a call's sequence term, built once per (mask key, shapes, device).

    ``positional``: the call also measures distances (a window, alibi), which packing preserves
    only when each row's real tokens are one run; a padding keep-mask with holes is refused."""
    geo = call.geo
    key = (call.mask.key, geo.B, geo.Sq, geo.Sk, geo.device) if call.cacheable else None
    entry = _PLANS.get(key) if key is not None else None
    if entry is None:
        if isinstance(seq, Documents):
            packing = _packing_documents(seq, geo.B, geo.Sk, geo.device)
        else:
            packing = _packing_padding(seq, geo.B, geo.Sk, geo.device)
        entry = {"packing": packing, "contiguous": None, "term": call.mask}  # the term keeps tensor ids alive
        if key is not None:
            _PLANS.put(key, entry)
    if positional and isinstance(seq, Padding) and seq.keep is not None:
        if entry["contiguous"] is None:
            entry["contiguous"] = _contiguous(seq.keep.to(geo.device))
        if not entry["contiguous"]:
            return (
                "padding(mask=...) with holes inside a row, combined with a window or alibi: packing "
                "would shorten the distances they measure; use flex, or left/right padding"
            )
    return entry["packing"]


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


