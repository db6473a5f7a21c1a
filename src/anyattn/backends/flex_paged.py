"""flex's BlockMask for calls on a paged KV cache (split out of flex.py for size).

The kernel runs over the layer's whole pool as one key row (a fixed shape: one compiled kernel
per batch shape while contexts grow); the BlockMask lists, per query block, the physical pages
of the logical key blocks it needs, and the mask_mod / score_mod see pool positions. For the
cache layout and at most one window (what decoding runs) the mask works in pool coordinates
from the step's page maps; other masks map a pool position back to its logical key.
"""

from __future__ import annotations

import torch

from ..spec import And, Window
from .flex_blocks import BLOCK, structured_blocks


def paged_block_mask(fa, call, stats: dict):
    """(BlockMask over the whole pool, score_mod, whether the mask is in pool coordinates) of a
    paged-KV call (``fa``: torch's flex_attention module; ``stats``: the backend's counters): the logical block
    structure (key blocks of one page) with each logical block replaced by its physical page,
    and mask_mod / score_mod that map a pool position back to its logical key (positions of
    pages that are not the row's are invisible: the unfused path evaluates every pair)."""
    view = call.kv
    step, ps, n_phys = view.step, view.page_size, view.cache.pages + 1
    geo = call.geo  # logical
    mods = [bs.mod for bs in call.bound_scores()]
    fast, bounds = _pool_mask_mod(call)
    # the logical coordinates of a pool position (for score_mods and masks of other terms)
    p2l = step.physical_to_logical() if mods or fast is None else None  # (R, P + 1)
    R = step.rows

    def logical(b, kv_idx):
        lb = p2l[b, kv_idx // ps] if R > 1 else p2l[0, kv_idx // ps]
        return (lb * ps + kv_idx % ps).clamp(min=0), lb >= 0

    if fast is not None:
        mask_mod = fast
    else:
        pred = call.bound_mask().pred

        def mask_mod(b, h, q_idx, kv_idx):
            kvl, ok = logical(b, kv_idx)
            return ok & pred(b, h, q_idx, kvl)

    mask_mod.__name__ = f"anyattn_paged_mask:{call.mask!r}"
    score_mod = None
    if mods:

        def score_mod(score, b, h, q_idx, kv_idx):
            kvl, _ = logical(b, kv_idx)
            for m in mods:
                score = m(score, b, h, q_idx, kvl)
            return score

    if fast is not None and step.layout == "rows" and geo.Sq <= BLOCK:
        # decoding: one query block per row, whose key blocks are the row's live pages: those
        # every query sees whole are full blocks, the mask_mod decides the others per key.
        # The index comes straight from the page tables, without the per-block device work
        # below (~3 ms of small device ops per step on an H100, benchmarks/results/round11)
        stats["block_mask_builds"] += 1
        stats["page_table_block_masks"] += 1
        kv_num, kv_idx, full_num, full_idx = step.row_pages(n_phys, *bounds)
        args = (kv_num, kv_idx, full_num, full_idx, (BLOCK, ps), mask_mod, (geo.Sq, n_phys * ps))
        try:
            bm = fa.BlockMask.from_kv_blocks(*args, compute_q_blocks=False)
        except TypeError:  # a torch without compute_q_blocks
            bm = fa.BlockMask.from_kv_blocks(*args)
        return bm, score_mod, True
    blocks = structured_blocks(call, BLOCK, ps)
    if blocks is None:  # another term: evaluate the logical predicate per page-sized tile
        bound = call.bound_mask()
        logical_pred = bound.pred

        def logical_mod(b, h, q_idx, kv_idx):
            return logical_pred(b, h, q_idx, kv_idx)

        lm = fa.create_block_mask(logical_mod, geo.B if bound.uses_b else None, geo.H if bound.uses_h else None,
                                  geo.Sq, geo.Sk, device=geo.device, BLOCK_SIZE=(BLOCK, ps))  # fmt: skip
        blocks = (lm.kv_num_blocks, lm.kv_indices, lm.full_kv_num_blocks, lm.full_kv_indices)
    else:
        stats["structured_block_masks"] += 1
    stats["block_mask_builds"] += 1
    lp = step.logical_pages()  # (R, nk): the physical page of each logical block
    cols = max(n_phys, lp.shape[1])

    def physical(num, idx):
        if num is None:
            return None, None
        Rb, Hb, nq, nk = idx.shape
        if Rb != R:
            num, idx = num.expand(R, *num.shape[1:]), idx.expand(R, Hb, nq, nk)
        phys = torch.gather(lp[:, None, None, :].expand(R, Hb, nq, nk), -1, idx.long()).to(torch.int32)
        return num.contiguous(), torch.nn.functional.pad(phys, (0, cols - nk))

    kv_num, kv_idx = physical(blocks[0], blocks[1])
    full_num, full_idx = physical(blocks[2], blocks[3])
    args = (kv_num, kv_idx, full_num, full_idx, (BLOCK, ps), mask_mod, (geo.Sq, n_phys * ps))
    try:  # no backward through a cache: the q-major index is not needed
        bm = fa.BlockMask.from_kv_blocks(*args, compute_q_blocks=False)
    except TypeError:  # a torch without compute_q_blocks (the index columns cover the pool: valid)
        bm = fa.BlockMask.from_kv_blocks(*args)
    return bm, score_mod, fast is not None


def _pool_mask_mod(call):
    """For a paged-KV call whose mask is the cache's layout and at most one window (what decoding
    runs): the mask_mod in pool coordinates, from the step's page maps (``KVStep.page_maps``:
    tensors whose shapes depend on the pool and the query layout only, so one compiled kernel
    serves every step of a growing context), and the window's (left, right) ((None, None): no
    window). (None, None) for other masks."""
    view = call.kv
    layout = view.term()
    parts = call.mask.terms if isinstance(call.mask, And) else (call.mask,)
    rest = [t for t in parts if t is not layout]
    if len(rest) == len(parts) or len(rest) > 1 or (rest and not isinstance(rest[0], Window)):
        return None, None
    left, right = (rest[0].left, rest[0].right) if rest else (None, None)
    owner, start, valid, q_owner, q_pos = view.step.page_maps()
    ps, shared = view.page_size, q_owner.shape[0] == 1
    qo1, qp1 = q_owner[0], q_pos[0]

    def pool_mask(b, h, q_idx, kv_idx):
        page, off = kv_idx // ps, kv_idx % ps
        qo = qo1[q_idx] if shared else q_owner[b, q_idx]
        d = (qp1[q_idx] if shared else q_pos[b, q_idx]) - (start[page] + off)  # keys behind the query
        ok = (owner[page] == qo) & (qo >= 0) & (off < valid[page])
        if left is not None:
            ok = ok & (d <= left)
        if right is not None:
            ok = ok & (d >= -right)
        return ok

    return pool_mask, (left, right)
