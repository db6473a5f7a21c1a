"""flex's block structure: the BlockMask of a mask made of documents, padding and windows,
computed per 128x128 tile from the terms (the range of document ids and positions each tile
covers: a few small tensor ops, no host sync, the same tiles as ``create_block_mask``, which
evaluates the predicate on every pair instead), and which rows may see no key."""

from __future__ import annotations

import math

import torch

from ..spec import Alibi, And, Documents, Padding, Softcap, Window
from ..spec.base import to_device

BLOCK = 128  # FlexAttention's default sparse block size (q and kv)

# --------------------------------------------------------------------------------------------
# block structure from the terms (documents, padding, windows)


def _ranges(ids: torch.Tensor, n: int, length: int, block: int = BLOCK):
    """Per block of ``block`` positions of ``ids`` (R, length) (-1 = no document): (first id, last
    id, any real, all real) over the real positions, each (R, n). Positions past ``length`` are
    not real (a block that sticks out is never full)."""
    R = ids.shape[0]
    pad = n * block - length
    if pad:
        ids = torch.nn.functional.pad(ids, (0, pad), value=-1)
    ids = ids.view(R, n, block)
    real = ids >= 0
    big = torch.iinfo(ids.dtype).max
    lo = torch.where(real, ids, big).amin(-1)
    hi = torch.where(real, ids, -1).amax(-1)
    return lo, hi, real.any(-1), real.all(-1)


def _tile_ranges(t, device, n: int, block: int, length: int, offset: int):
    """What :func:`_ranges` gives for the document ids of ``t`` (a ``Documents`` side) over the
    ``length`` positions ``offset .. offset + length - 1`` of its layout, from the lengths alone:
    ids grow along a row, so a tile's lowest real id is its first position's and its highest
    is its last real position's, found by a search of the tile boundaries in the cumulative
    lengths (a dozen ops on (Bd, n) tensors instead of the (Bd, S) ids and their reductions)."""
    cu = torch.cumsum(to_device(t.lengths_tensor(), device).to(torch.int64), -1)  # (Bd, N): document ends
    total = cu[:, -1:]
    start = torch.arange(n, device=device) * block
    first = start + offset
    last = torch.clamp(start + block, max=length) - 1 + offset
    rows = cu.shape[0]
    lo = torch.searchsorted(cu, first.expand(rows, n).contiguous(), right=True)
    hi = torch.searchsorted(cu, torch.minimum(last[None, :], total - 1).contiguous(), right=True)
    return lo, hi, first[None, :] < total, (last[None, :] < total) & ((start + block) <= length)[None, :]


def _aligned_ranges(align: torch.Tensor, nq: int, Sq: int, qb: int = BLOCK):
    """Per tile of ``qb`` queries: (lowest, highest) key position i' of its queries, each (R, nq, 1)."""
    pad = nq * qb - Sq
    lo = torch.nn.functional.pad(align, (0, pad), value=torch.iinfo(torch.int64).max // 4).view(-1, nq, qb)
    hi = torch.nn.functional.pad(align, (0, pad), value=torch.iinfo(torch.int64).min // 4).view(-1, nq, qb)
    return lo.amin(-1)[..., None], hi.amax(-1)[..., None]


def _term_blocks(t, geo, nq: int, nk: int, qb: int = BLOCK, kb: int = BLOCK):
    """(any, all) bool (R, nq, nk) for one term: any = some pair of the tile may be visible, all =
    every pair is. None when the term has no block-level rule here. ``geo`` is the aligned
    geometry (``Call.aligned_geo``): with packed query/key layouts, i' comes from ``geo.align``."""
    off = geo.offset
    if isinstance(t, Window):
        dev = geo.device
        klo = torch.arange(nk, device=dev) * kb
        khi = torch.clamp(klo + kb, max=geo.Sk) - 1
        if geo.align is None:
            qlo = (torch.arange(nq, device=dev) * qb + off)[:, None]
            qhi = torch.clamp(qlo - off + qb, max=geo.Sq) - 1 + off
        else:  # (R, nq, 1): per row, the range of i' over each tile's queries
            qlo, qhi = _aligned_ranges(geo.align, nq, geo.Sq, qb)
        dmin = qlo - khi[None, :]  # i' - j over the tile
        dmax = qhi - klo[None, :]
        any_ = torch.ones(dmin.shape, dtype=torch.bool, device=dev)
        all_ = any_.clone()
        if t.left is not None:
            any_ &= dmin <= t.left
            all_ &= dmax <= t.left
        if t.right is not None:
            any_ &= dmax >= -t.right
            all_ &= dmin >= -t.right
        inside = ((torch.arange(nq, device=dev) * qb + qb) <= geo.Sq)[:, None] & ((klo + kb) <= geo.Sk)[None, :]
        all_ = all_ & inside
        return (any_, all_) if any_.dim() == 3 else (any_[None], all_[None])
    if isinstance(t, Documents):
        k = t.kv if t.kv is not None else t
        kr = _tile_ranges(k, geo.device, nk, kb, geo.Sk, 0)
        if t.kv is not None:
            qr = _tile_ranges(t, geo.device, nq, qb, geo.Sq, 0)
        elif off == 0 and qb == kb:
            qr = kr  # the same positions, the same tiles
        else:
            qr = _tile_ranges(t, geo.device, nq, qb, geo.Sq, off)
        R = max(kr[0].shape[0], qr[0].shape[0])
        qlo, qhi, qany, qall = (x.expand(R, -1) for x in qr)
        klo, khi, kany, kall = (x.expand(R, -1) for x in kr)
    elif isinstance(t, Padding):  # one "document" per row, -1 at padding
        ids = torch.where(t.keep_mask(geo), 0, -1)
        qids = torch.where(t.q_keep(geo), 0, -1)
        R = max(ids.shape[0], qids.shape[0])
        ids, qids = ids.expand(R, -1), qids.expand(R, -1)
        qlo, qhi, qany, qall = _ranges(qids, nq, geo.Sq, qb)
        klo, khi, kany, kall = _ranges(ids, nk, geo.Sk, kb)
    else:
        return None
    any_ = qany[:, :, None] & kany[:, None, :] & (qlo[:, :, None] <= khi[:, None, :]) & (klo[:, None, :] <= qhi[:, :, None])
    all_ = qall[:, :, None] & kall[:, None, :] & (qlo == qhi)[:, :, None] & (klo == khi)[:, None, :] & (qlo[:, :, None] == klo[:, None, :])
    return any_, all_


_ZEROS = torch.zeros(4, dtype=torch.int32)
_ROWS: dict = {}  # (n, f, rem) -> one row's parts; (n,) -> the identity index of n tiles
_ROWS_BYTES = [0]
_ROWS_MAX_BYTES = 32 << 20


def clear_rows() -> None:
    """Drops the cached padding rows (``anyattn.clear_caches()`` through the flex backend)."""
    _ROWS.clear()
    _ROWS_BYTES[0] = 0


def _cached(key, build):
    got = _ROWS.get(key)
    if got is None:
        got = build()
        size = sum(x.numel() * 4 for x in got)
        if _ROWS_BYTES[0] + size > _ROWS_MAX_BYTES:  # many shapes: start over rather than grow
            _ROWS.clear()
            _ROWS_BYTES[0] = 0
        _ROWS[key] = got
        _ROWS_BYTES[0] += size
    return got


def _padding_row(n: int, L: int, qb: int) -> tuple:
    """(kv_num (n,), kv_idx (n*n,), full_num (n,), full_idx (n*n,)) int32 on the CPU for one row of
    ``L`` real tokens over ``n`` tiles of ``qb`` (see :func:`_padding_blocks_on_host`). A row
    depends on L only through (L // qb, L % qb > 0): the parts are cached under that (32 MiB at
    most), so a new padding is a few lookups, not ~25 tensor ops."""
    f, rem = divmod(L, qb)
    rem = int(rem > 0)
    (ident,) = _cached((n,), lambda: (torch.arange(n, dtype=torch.int32).repeat(n),))

    def build():
        t = torch.arange(n)
        qfull = t < f
        kv_num = torch.where(qfull, rem, torch.where(t == f, f + rem, 0) * rem).to(torch.int32)
        full_num = torch.where(qfull, f, 0).to(torch.int32)
        # a full q tile with a partial kv tile lists that tile (f) first, then the others in
        # order; every other q tile lists 0..n-1 (its partial tiles are a prefix): argsort's
        # stable order
        if not (rem and f):
            return kv_num, full_num
        idx = ident.view(n, n).clone()
        idx[:f] = torch.cat([torch.tensor([f]), t[:f], t[f + 1 :]]).to(torch.int32)
        return kv_num, full_num, idx.view(-1)

    got = _cached((n, f, rem), build)
    return got[0], got[2] if len(got) == 3 else ident, got[1], ident


def _padding_blocks_on_host(call, qb: int, kb: int, q_major: bool):
    """The blocks of a lone ``padding(lengths)`` with the lengths on the host (Sq = Sk, one layout),
    in closed form per row, built on the CPU and sent to the device in one copy: a new padding
    otherwise launches ~50 small kernels (the tile ranges, the tile products, two argsorts per
    orientation), which made flex's step host-bound on a slow host (round 18). None when the
    call is not that case. The result equals :func:`structured_blocks`' own, tensor for tensor
    (tests/test_flex_blocks.py), so the kernels read the same index.

    Row of length L, tiles of 128: q and kv tiles below f = L // 128 are full, tile f is partial
    when L % 128 (or when it sticks out past S), the rest empty. A full q tile sees f full kv
    tiles and the partial one; the partial q tile sees only partial tiles (0..f); the mask is
    symmetric, so the q-major index is the same."""
    m = call.mask
    if not isinstance(m, Padding) or m.kv is not None or m.lengths is None or m.info is not None:
        return None
    geo = call.geo
    if qb != kb or geo.Sq != geo.Sk or m.lengths.device.type != "cpu" or torch.compiler.is_compiling():
        return None
    S, n = geo.Sk, -(-geo.Sk // qb)
    rows = [_padding_row(n, min(max(int(x), 0), S), qb) for x in m.lengths.tolist()]
    B = len(rows)
    # one buffer: the four parts, each starting at a multiple of 16 bytes (kernels may assume
    # aligned index pointers), each part the rows one after the other
    pieces, starts, at = [], [], 0
    for i, size in enumerate((n, n * n, n, n * n)):
        starts.append(at)
        pieces.extend(r[i] for r in rows)
        at += B * size
        gap = -at % 4
        if gap:
            pieces.append(_ZEROS[:gap])
            at += gap
    buf = to_device(torch.cat(pieces), geo.device)
    shapes = ((B, 1, n), (B, 1, n, n), (B, 1, n), (B, 1, n, n))
    out = tuple(buf[a : a + B * math.prod(shp[2:])].view(shp) for a, shp in zip(starts, shapes))
    return out + out if q_major else out


def structured_blocks(call, qb: int = BLOCK, kb: int = BLOCK, q_major: bool = False):
    """(kv_num, kv_idx, full_num, full_idx) int32 (R, 1, nq, nk) of a mask of documents / padding /
    windows, from the terms; None when the mask has another term. ``q_major``: also the same four
    for the transposed tiles (what the backward reads), built from the dense tiles here rather than
    by BlockMask.from_kv_blocks, which rebuilds them from the index through vmap (~1 ms of host
    time per new mask)."""
    host = _padding_blocks_on_host(call, qb, kb, q_major)
    if host is not None:
        return host
    geo = call.aligned_geo()
    parts = call.mask.terms if isinstance(call.mask, And) else (call.mask,)
    nq, nk = -(-geo.Sq // qb), -(-geo.Sk // kb)
    any_ = all_ = None
    for t in parts:
        r = _term_blocks(t, geo, nq, nk, qb, kb)
        if r is None:
            return None
        a, f = r
        any_ = a if any_ is None else any_ & a
        all_ = f if all_ is None else all_ & f
    partial = (any_ & ~all_)[:, None]  # (R, 1, nq, nk): one row shared by every head
    full = all_[:, None]

    def ordered(dense):
        # contiguous: the transposed tiles would otherwise give an index whose last dimension is
        # strided, which the CUDA kernels read as if it were dense (wrong dk/dv, no error). The
        # bool tiles are sorted as bytes (a view) and counted straight into int32: 3 kernels, not 5
        d = dense.contiguous().view(torch.uint8)
        num = d.sum(-1, dtype=torch.int32)
        return num, torch.argsort(d, dim=-1, descending=True, stable=True).to(torch.int32)

    kv_num, kv_idx = ordered(partial)
    full_num, full_idx = ordered(full)
    if q_major:
        return kv_num, kv_idx, full_num, full_idx, *ordered(partial.transpose(-2, -1)), *ordered(full.transpose(-2, -1))
    return kv_num, kv_idx, full_num, full_idx


def structured_block_mask(call, mask_mod, need_q_blocks: bool = True):
    """A BlockMask for a mask of documents / padding / windows built from the terms, or None when
    the mask has another term (then ``create_block_mask`` evaluates the predicate). The q-major
    index (backward only) is built when ``need_q_blocks``."""
    blocks = structured_blocks(call, q_major=need_q_blocks)
    if blocks is None:
        return None
    from torch.nn.attention import flex_attention as fa

    geo = call.geo
    try:
        bm = fa.BlockMask.from_kv_blocks(*blocks[:4], BLOCK, mask_mod, (geo.Sq, geo.Sk), compute_q_blocks=False)
    except TypeError:  # a torch without compute_q_blocks: it builds the q-major index itself
        return fa.BlockMask.from_kv_blocks(*blocks[:4], BLOCK, mask_mod, (geo.Sq, geo.Sk))
    if need_q_blocks:
        bm.q_num_blocks, bm.q_indices, bm.full_q_num_blocks, bm.full_q_indices = blocks[4:]
    return bm


def may_have_empty_rows(call) -> bool:
    """Whether some query row may see no key (then its output is zeroed from the lse)."""
    geo, m = call.geo, call.mask
    if m is None:
        return False
    if call.sig.packed_layout:  # a document with more queries than keys has queries before its first key
        return True
    parts = m.terms if isinstance(m, And) else (m,)
    for t in parts:
        if isinstance(t, Window):
            continue  # every window contains the query's own position i'
        if isinstance(t, Documents) and t.host_lengths is not None and all(sum(r) == geo.Sk for r in t.host_lengths):
            continue  # no tail: every position is in a document, with itself
        return True
    return geo.Sq > geo.Sk  # queries before the first key


# Two promises FlexAttention's Triton kernel takes as options and torch never infers. Each removes
# work from the inner loop; a wrong promise gives NaN or wrong rows, with no error:
# * ROWS_GUARANTEED_SAFE drops the guard for a row whose running maximum is still -inf. The guard
#   matters whenever the first key tile a row's query tile visits (partial blocks first, in
#   index order, then full blocks) holds no key that row sees: exp2(-inf - -inf) is NaN and the
#   NaN stays. (Seeing some key somewhere in the row, as torch's docstring puts it, is not
#   enough: a document's first row in a tile whose first listed block holds only the previous
#   document's keys fails it.)
# * BLOCKS_ARE_CONTIGUOUS steps to the next key block by adding the block size instead of
#   reading the next index: every list the kernel walks (partial and full; key-major forward,
#   query-major too in the backward) must be one ascending run.
# Both hold for a plain causal mask whose diagonal starts on a block boundary (Sk - Sq a multiple
# of the block size): every row of a query tile sees the first key of the diagonal block, which
# is visited first, and a query block's partial blocks are the diagonal one(s), its full blocks
# the ones before. The query-major lists the backward walks hold the diagonal block and, when Sq
# is not a multiple of the block size, the last (incomplete, so partial) query block too: not
# one run, so a call with autograd needs Sq on a block boundary as well. Both hold for no mask
# at all (torch's one block spanning the whole row). Either way only with score terms that never
# make a logit -inf (softcap, ALiBi; a bias or a score function might), and only with Sq >= 128:
# shorter queries run FlexDecoding, which splits the keys among programs at tile granularity
# inside a block, so a split may begin past some row's diagonal. tests/test_flex_blocks.py
# walks the kernel's visiting order over the blocks flex builds. Benchmarks (H100, round 21):
# +16% causal forward, +11% / +8% softcap forward / forward+backward.
GUARANTEES = {"ROWS_GUARANTEED_SAFE": True, "BLOCKS_ARE_CONTIGUOUS": True}
_FINITE_SCORES = (Softcap, Alibi)


def kernel_guarantees(sig, block: int = BLOCK) -> bool:
    """Whether calls of ``sig`` may promise FlexAttention's Triton kernel ``GUARANTEES``: CUDA, a
    plain causal mask with ``Sk - Sq`` a non-negative multiple of ``block`` (and ``Sq`` one too
    when autograd runs: the backward's query-major lists), or no mask, only finite score terms,
    and ``Sq >= 128`` (below it torch runs FlexDecoding, whose key splits break the first
    promise). Reads the signature only."""
    if sig.device.type != "cuda" or sig.paged is not None or sig.Sq < 128:
        return False
    if any(type(s) not in _FINITE_SCORES for s in sig.logit_scores):
        return False
    m = sig.mask
    if m is None:
        return True
    if type(m) is not Window or not m.is_causal or sig.packed_layout or sig.Sk < sig.Sq or (sig.Sk - sig.Sq) % block:
        return False
    return not sig.requires_grad or sig.Sq % block == 0


def rows_seen(call) -> torch.Tensor:
    """(B or 1, H or 1, Sq, 1) bool: rows that see at least one key, without the lse (CPU
    FlexAttention returns none). For documents / padding / windows a row sees a key iff its own
    position is a real token of a document (every window contains the diagonal); other masks are
    evaluated on the index grid."""
    from ..spec import materialize_mask

    geo, m = call.geo, call.mask
    parts = m.terms if isinstance(m, And) else (m,)
    if geo.Sq <= geo.Sk and not call.sig.packed_layout and all(isinstance(t, (Window, Documents, Padding)) for t in parts):
        seen = torch.ones(1, geo.Sq, dtype=torch.bool, device=geo.device)
        for t in parts:
            if isinstance(t, Documents):
                seen = seen & (t.doc_ids(geo)[:, geo.offset :] >= 0)
            elif isinstance(t, Padding):
                seen = seen & t.keep_mask(geo)[:, geo.offset :]
        return seen[:, None, :, None]
    return materialize_mask(call.bound_mask(), call.aligned_geo()).any(-1, keepdim=True)
