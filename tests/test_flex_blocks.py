"""flex's structured BlockMask (built from documents / padding / windows) against the one
``create_block_mask`` builds from the predicate: the same tiles in both orientations (the q-major
index is what the backward reads), each index tensor dense in memory (the CUDA kernels read the
index as dense: a strided q-major index gave wrong dk/dv on the GPU with no error)."""

import pytest
import torch

import anyattn as aa
from anyattn.backends.flex_blocks import structured_block_mask
from anyattn.spec import Documents
from anyattn.testing import generate_qkv, make_call

fa = pytest.importorskip("torch.nn.attention.flex_attention")

FIELDS = [
    ("kv_num_blocks", "kv_indices"),
    ("full_kv_num_blocks", "full_kv_indices"),
    ("q_num_blocks", "q_indices"),
    ("full_q_num_blocks", "full_q_indices"),
]


def _masks(B, S):
    keep = torch.ones(B, S, dtype=torch.bool)
    keep[0, S - 77 :] = False
    keep[-1, 5:] = True
    lengths = torch.tensor([S - 77, S] if B == 2 else [S - 77])
    return {
        "padding-lengths": aa.padding(lengths),
        "docs-causal": aa.documents([[100, 37, 163], [300]] if B == 2 else [[100, 37, 163]]) & aa.causal(),
        "docs-tail": aa.documents([[60, 131], [250]]) & aa.causal(),
        "padding": aa.padding(mask=keep),
        "window-docs": aa.documents([[170, 130], [44, 256]]) & aa.sliding_window(90),
        "window": aa.sliding_window(140, right=20),
    }


@pytest.mark.parametrize("name", ["docs-causal", "docs-tail", "padding", "padding-lengths", "window-docs", "window"])
def test_structured_block_mask_equals_create_block_mask(name):
    B, S = 2, 300
    q, k, v = generate_qkv(B, 2, 2, S, S, 16, requires_grad=True)
    call = make_call(q, k, v, mask=_masks(B, S)[name])
    pred = call.bound_mask().pred

    def mask_mod(b, h, qi, ki):
        return pred(b, h, qi, ki)

    ours = structured_block_mask(call, mask_mod, need_q_blocks=True)
    assert ours is not None, "documents / padding / windows have a structured BlockMask"
    ref = fa.create_block_mask(mask_mod, B, None, S, S, device="cpu")
    for num_name, idx_name in FIELDS:
        num, idx = getattr(ours, num_name), getattr(ours, idx_name)
        rnum, ridx = getattr(ref, num_name), getattr(ref, idx_name)
        assert num.is_contiguous() and idx.is_contiguous(), f"{idx_name}: strides {idx.stride()} for shape {tuple(idx.shape)}"
        assert num.dtype == idx.dtype == torch.int32
        R = num.shape[0]
        assert torch.equal(num, rnum[:R] if rnum.shape[0] >= R else rnum.expand_as(num)), num_name
        for r in range(R):
            for row in range(num.shape[-1]):
                n = int(num[r, 0, row])
                got = sorted(idx[r, 0, row, :n].tolist())
                want = sorted(ridx[min(r, ridx.shape[0] - 1), 0, row, :n].tolist())
                assert got == want, f"{idx_name}[{r}, {row}]"


@pytest.mark.parametrize("S", [1, 100, 128, 129, 300, 512])
def test_padding_lengths_blocks_built_on_the_host_equal_the_device_build(S):
    """padding(lengths) with CPU lengths takes the closed form built on the host (one copy instead
    of ~50 kernel launches per new padding): every tensor equals what the per-tile build gives for
    the same rows as a keep-mask (values, order of the indices past num too, dtype, shape,
    dense in memory), both orientations, for rows of length 0, S, multiples of 128 and others."""
    from anyattn.backends import flex_blocks as fb

    g = torch.Generator().manual_seed(S)
    picks = [0, S, min(S, 128), min(S, 256), S - 1 if S > 1 else 0]
    for trial in range(12):
        B = 1 + trial % 4
        L = torch.tensor([picks[int(torch.randint(len(picks), (1,), generator=g))] if i % 2 else
                          int(torch.randint(S + 1, (1,), generator=g)) for i in range(B)])  # fmt: skip
        q, k, v = generate_qkv(B, 1, 1, S, S, 8)
        keep = torch.arange(S)[None, :] < L[:, None]
        for q_major in (False, True):
            host = fb._padding_blocks_on_host(make_call(q, k, v, mask=aa.padding(L)), fb.BLOCK, fb.BLOCK, q_major)
            assert host is not None
            ref = fb.structured_blocks(make_call(q, k, v, mask=aa.padding(mask=keep)), q_major=q_major)
            assert len(host) == len(ref)
            for i, (a, b) in enumerate(zip(host, ref)):
                assert a.dtype == b.dtype == torch.int32 and a.shape == b.shape, (i, a.shape, b.shape)
                assert a.is_contiguous(), f"tensor {i}: strides {a.stride()}"
                assert torch.equal(a, b), f"S={S} lengths={L.tolist()} tensor {i} q_major={q_major}"


def test_padding_blocks_on_the_host_only_for_lone_host_lengths():
    """The closed form serves a lone padding(lengths) with CPU lengths; keep-masks, other terms
    next to it and separate key layouts take the per-tile build."""
    from anyattn.backends import flex_blocks as fb

    q, k, v = generate_qkv(2, 1, 1, 64, 64, 8)
    L = torch.tensor([10, 64])
    keep = torch.arange(64)[None, :] < L[:, None]
    assert fb._padding_blocks_on_host(make_call(q, k, v, mask=aa.padding(L)), 128, 128, False) is not None
    for m in (aa.padding(mask=keep), aa.padding(L) & aa.causal()):
        assert fb._padding_blocks_on_host(make_call(q, k, v, mask=m), 128, 128, False) is None
    assert fb._padding_blocks_on_host(make_call(q, k, v, mask=aa.padding(L)), 128, 64, False) is None


def test_clear_caches_drops_the_cached_padding_rows():
    from anyattn.backends import flex_blocks as fb

    q, k, v = generate_qkv(2, 1, 1, 300, 300, 8)
    fb._padding_blocks_on_host(make_call(q, k, v, mask=aa.padding(torch.tensor([200, 77]))), 128, 128, False)
    assert fb._ROWS, "the rows of a padding were not cached"
    aa.clear_caches()
    assert not fb._ROWS and fb._ROWS_BYTES[0] == 0


@pytest.mark.parametrize("S", [1, 100, 128, 129, 255, 300, 700])
def test_document_tile_ranges_from_lengths_equal_the_per_position_ranges(S):
    """The document tiles' (lowest id, highest id, any real, all real) found by searching the tile
    boundaries in the cumulative lengths equal the per-position reduction over the ids, where the
    tile has a real position (elsewhere only the two flags are read): rows with empty documents,
    tails in no document, host and tensor lengths, a window of the row (queries after an offset)."""
    from anyattn.backends import flex_blocks as fb

    g = torch.Generator().manual_seed(S)
    for trial in range(12):
        B = 1 + trial % 3
        rows = []
        for _ in range(B):
            n = int(torch.randint(1, 9, (1,), generator=g))
            cuts = sorted(torch.randint(0, S + 1, (n - 1,), generator=g).tolist())
            end = S - int(torch.randint(0, S // 3 + 1, (1,), generator=g)) if trial % 2 else S
            edges = [0, *(min(c, end) for c in cuts), end]
            rows.append([b - a for a, b in zip(edges, edges[1:])])
        N = max(len(r) for r in rows)
        padded = torch.tensor([r + [0] * (N - len(r)) for r in rows])
        # host lengths, and a lengths tensor with no host copy (as a CUDA tensor gives)
        for term in (aa.documents(rows), Documents(padded)):
            for block in (128, 64):
                for offset in (0, S // 3):
                    length = S - offset
                    if length == 0:
                        continue
                    nt = -(-length // block)
                    ids = term.ids_over(S, "cpu").to(torch.int64)[:, offset:]
                    want = fb._ranges(ids, nt, length, block)
                    got = fb._tile_ranges(term, torch.device("cpu"), nt, block, length, offset)
                    lo, hi, anyr, allr = (x.cpu() for x in got)
                    assert torch.equal(anyr, want[2]) and torch.equal(allr, want[3]), (rows, block, offset)
                    assert torch.equal(lo[anyr], want[0][anyr]) and torch.equal(hi[anyr], want[1][anyr]), (rows, block, offset)


@pytest.mark.parametrize("kind", ["docs-causal", "docs-window", "docs-offset", "docs-kv"])
def test_document_blocks_equal_create_block_mask_on_random_packings(kind):
    """End to end, on random packings: the document BlockMask built from the tile ranges equals
    the one ``create_block_mask`` evaluates from the predicate (both orientations)."""
    g = torch.Generator().manual_seed(len(kind))
    for trial in range(4):
        Sk = 200 + 111 * trial
        Sq = Sk if kind != "docs-offset" else Sk - 70
        cuts = sorted(torch.randint(0, Sk + 1, (5,), generator=g).tolist())
        edges = [0, *cuts, Sk - 13 * (trial % 2)]
        k_lengths = [max(b - a, 0) for a, b in zip(edges, edges[1:])]
        if kind == "docs-kv":
            q_lengths = [min(x, 3 + i) for i, x in enumerate(k_lengths)]
            Sq = sum(q_lengths) + 5
            m = aa.documents(q_lengths, kv=k_lengths) & aa.causal()
        elif kind == "docs-window":
            m = aa.documents(k_lengths) & aa.sliding_window(60, right=7)
        else:
            m = aa.documents(k_lengths) & aa.causal()
        q, k, v = generate_qkv(1, 1, 1, Sq, Sk, 8)
        call = make_call(q, k, v, mask=m)
        pred = call.bound_mask().pred

        def mask_mod(b, h, qi, ki):
            return pred(b, h, qi, ki)

        ours = structured_block_mask(call, mask_mod, need_q_blocks=True)
        ref = fa.create_block_mask(mask_mod, 1, None, Sq, Sk, device="cpu")
        for num_name, idx_name in FIELDS:
            num, idx = getattr(ours, num_name), getattr(ours, idx_name)
            rnum, ridx = getattr(ref, num_name), getattr(ref, idx_name)
            assert torch.equal(num, rnum), (kind, trial, num_name)
            for row in range(num.shape[-1]):
                n = int(num[0, 0, row])
                assert sorted(idx[0, 0, row, :n].tolist()) == sorted(ridx[0, 0, row, :n].tolist()), (kind, trial, idx_name, row)


# -- the promises flex makes FlexAttention's Triton kernel (flex_blocks.kernel_guarantees) ------


def _promises_hold(bm, dense, Sq, Sk, bm_rows, bn, backward):
    """Walk the kernel's visiting order over a BlockMask: (every row of every query tile sees a
    key in the first key tile it visits, every block list the kernel walks is one ascending run;
    the query-major lists only with ``backward``). ``dense``: (Sq, Sk) bool, what each row sees;
    ``bm_rows`` / ``bn``: the kernel's tile sizes."""
    lists = [(bm.kv_num_blocks, bm.kv_indices), (bm.full_kv_num_blocks, bm.full_kv_indices)]
    if backward:
        lists += [(bm.q_num_blocks, bm.q_indices), (bm.full_q_num_blocks, bm.full_q_indices)]
    runs_ok = True
    for num, idx in lists:
        for row in range(num.shape[-1]):
            got = idx[0, 0, row, : int(num[0, 0, row])].tolist()
            runs_ok &= got == list(range(got[0], got[0] + len(got))) if got else True
    rows_ok = True
    for i in range(bm.kv_num_blocks.shape[-1]):
        order = (bm.kv_indices[0, 0, i, : int(bm.kv_num_blocks[0, 0, i])].tolist()
                 + bm.full_kv_indices[0, 0, i, : int(bm.full_kv_num_blocks[0, 0, i])].tolist())  # fmt: skip
        if not order:
            continue
        k0 = order[0] * 128  # partial blocks first, then full ones
        for t in range(i * 128, min((i + 1) * 128, Sq), bm_rows):
            rows_ok &= bool(dense[t : min(t + bm_rows, Sq), k0 : min(k0 + bn, Sk)].any(-1).all())
    return rows_ok, runs_ok


def _walk(mask, Sq, Sk, grad):
    """(kernel_guarantees for the signature, [_promises_hold at every tile size the kernel may use])."""
    from anyattn.backends.flex_blocks import kernel_guarantees
    from anyattn.call import Signature

    q, k, v = generate_qkv(1, 2, 2, Sq, Sk, 16, requires_grad=grad)
    call = make_call(q, k, v, mask=mask)
    sig = Signature.of(
        B=1, Hq=2, Sq=Sq, Sk=Sk, D=16, dtype=torch.bfloat16, device="cuda", mask=mask, requires_grad=grad
    )
    pred = call.bound_mask().pred
    bm = structured_block_mask(call, lambda b, h, qi, ki: pred(b, h, qi, ki), need_q_blocks=True)
    dense = pred(0, 0, torch.arange(Sq)[:, None], torch.arange(Sk)[None, :])
    tiles = [(r, n) for r in (16, 32, 64, 128) for n in (16, 32, 64, 128)]
    return kernel_guarantees(sig), [_promises_hold(bm, dense, Sq, Sk, r, n, grad) for r, n in tiles]


@pytest.mark.parametrize("grad", [False, True])
@pytest.mark.parametrize(
    "Sq,Sk", [(256, 256), (256, 384), (128, 640), (300, 300), (1000, 1000), (129, 385), (100, 100)]
)
def test_kernel_guarantees_hold_on_the_blocks_flex_builds_for_causal(Sq, Sk, grad):
    """Where kernel_guarantees promises them, the BlockMask flex builds for causal keeps both
    promises at every tile size the kernel may use (16-128 rows x 16-128 keys)."""
    promised, walks = _walk(aa.causal(), Sq, Sk, grad)
    assert promised == (Sq >= 128 and (not grad or Sq % 128 == 0)), (Sq, Sk, grad)
    if promised:
        assert all(w == (True, True) for w in walks), walks


@pytest.mark.parametrize(
    "mask,Sq,Sk,grad,broken",
    [
        (aa.documents([[100, 37, 163]]) & aa.causal(), 300, 300, False, "rows"),  # a document starts inside a tile
        (aa.documents([[200, 312]]) & aa.causal(), 512, 512, False, "runs"),  # its start block and the diagonal
        (aa.sliding_window(150), 384, 384, False, "rows"),  # a window's left edge inside the first block visited
        (aa.causal(), 128, 255, False, "rows"),  # diagonal one key before a block boundary: that block visited first
        (aa.causal(), 300, 300, True, "runs"),  # backward: the incomplete last query block is partial everywhere
    ],
)
def test_masks_outside_kernel_guarantees_break_a_promise(mask, Sq, Sk, grad, broken):
    """The walk is not vacuous: masks kernel_guarantees leaves out break a promise on the blocks
    flex builds for them (the rule is the boundary, not a convenience)."""
    promised, walks = _walk(mask, Sq, Sk, grad)
    assert not promised
    if broken == "rows":
        assert not all(rows for rows, _ in walks), walks
    else:
        assert not all(runs for _, runs in walks), walks


def test_kernel_guarantees_read_score_terms_and_device():
    from anyattn.backends.flex_blocks import kernel_guarantees
    from anyattn.call import Signature

    def sig(mask="causal", score=None, device="cuda", Sq=256, Sk=256):
        mask = aa.causal() if mask == "causal" else mask
        return Signature.of(B=1, Hq=4, Sq=Sq, Sk=Sk, D=64, dtype=torch.bfloat16, device=device, mask=mask, score=score)

    assert kernel_guarantees(sig(score=aa.softcap(30.0)))
    assert kernel_guarantees(sig(score=[aa.alibi(torch.ones(4)), aa.softcap(30.0)]))
    assert kernel_guarantees(sig(mask=None, Sq=300, Sk=333))
    assert not kernel_guarantees(sig(mask=None, Sq=100, Sk=333))  # FlexDecoding: split keys
    assert not kernel_guarantees(sig(Sq=64, Sk=576))  # on a block boundary, but FlexDecoding
    assert not kernel_guarantees(sig(device="cpu"))  # CPU flex: torch's own options
    assert not kernel_guarantees(sig(score=aa.bias(torch.zeros(1, 1, 256, 256))))  # a bias may hold -inf
    assert not kernel_guarantees(sig(score=aa.score_fn(lambda s, b, h, q, k: s)))
    assert not kernel_guarantees(sig(mask=aa.causal(), Sq=384, Sk=256))  # queries before the first key
