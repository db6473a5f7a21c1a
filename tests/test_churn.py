"""Exact under churn: term tensors allocated and freed every call, never served a stale entry.

The bug these tests guard (issue 15): lowered masks were cached under ``id()`` of a term's tensor
without keeping it alive. A freed mask's address was reused by the next allocation of the same
shape, which then received the *old* mask (12-59 of 60 calls wrong on sdpa/auto). Identity keys
are now tokens that are never reused (``anyattn._cache``). Every call here builds a fresh term,
frees the previous one, and is compared against a float64 computation of *its own* mask.

CPU here (eager, sdpa, auto; flex in one case: it compiles per shape); the same loops run on
CUDA for every backend in tests/test_cuda_churn.py.
"""

from __future__ import annotations

import gc

import pytest
import torch

import anyattn as aa
from anyattn.backends import REGISTRY
from anyattn.testing import generate_qkv, oracle

STEPS = 24


def _check(out, ref, what):
    err = (out.double() - ref.double()).abs().max().item()
    assert err < 1e-4, f"{what}: max error {err:.3e} (a stale cache entry serves another call's mask?)"


def _loop(make, backend, *, B=2, H=2, S=32, D=16, Hkv=None, seed=0):
    """``make(step, gen) -> (mask, score)`` builds fresh terms each step; the previous step's
    terms are dropped (and collected) before the next allocation."""
    q, k, v = generate_qkv(B, H, Hkv or H, S, S, D, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    for step in range(STEPS):
        mask, score = make(step, gen)
        out = aa.attention(q, k, v, mask=mask, score=score, backend=backend)
        ref = oracle(q, k, v, mask=mask, score=score)
        _check(out, ref, f"{backend} step {step}")
        del mask, score, out, ref
        gc.collect()


BACKENDS = ["eager", "sdpa", "auto"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_fresh_dense_masks(backend):
    """The issue's reproducer: a new random bool mask each call, the old one freed."""
    _loop(lambda i, g: (aa.dense(torch.rand(1, 1, 32, 32, generator=g) > 0.5), None), backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fresh_large_dense_masks(backend):
    """Above the content-key size: keyed by identity, the case that was served stale entries."""
    _loop(lambda i, g: (aa.dense(torch.rand(2, 2, 32, 32, generator=g) > 0.3), None), backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fresh_bias_tensors(backend):
    _loop(lambda i, g: (aa.causal(), aa.bias(torch.randn(2, 2, 32, 32, generator=g))), backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fresh_keep_masks(backend):
    def make(i, g):
        keep = torch.rand(2, 32, generator=g) > 0.4
        keep[:, 0] = True
        return aa.padding(mask=keep), None

    _loop(make, backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("form", ["list", "tensor", "seqinfo", "large_tensor"])
def test_fresh_document_lengths(backend, form):
    def make(i, g):
        cuts = sorted(torch.randperm(31, generator=g)[:4].add(1).tolist())
        lengths = [b - a for a, b in zip([0, *cuts], [*cuts, 32])]
        if form == "list":
            return aa.documents(lengths) & aa.causal(), None
        if form == "tensor":
            return aa.documents(torch.tensor(lengths)) & aa.causal(), None
        if form == "large_tensor":  # 2 rows of 200 (mostly empty) documents: identity-keyed
            t = torch.zeros(2, 200, dtype=torch.long)
            t[:, : len(lengths)] = torch.tensor(lengths)
            return aa.documents(t.requires_grad_(False)) & aa.causal(), None
        return aa.documents(aa.SeqInfo.from_lengths([lengths, lengths[::-1]])) & aa.causal(), None

    _loop(make, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fresh_padding_seqinfos(backend):
    def make(i, g):
        keep = torch.ones(2, 32, dtype=torch.bool)
        keep[0, int(torch.randint(1, 32, (1,), generator=g)) :] = False
        keep[1, : int(torch.randint(0, 31, (1,), generator=g))] = False
        return aa.padding(aa.SeqInfo.from_padding_mask(keep)), None

    _loop(make, backend)


def test_in_place_edits_are_seen():
    """The same tensor edited in place between calls: its version changes, so does its key."""
    q, k, v = generate_qkv(2, 2, 2, 32, 32, 16)
    m = torch.ones(2, 2, 32, 32, dtype=torch.bool)
    for step in range(6):
        m[:, :, :, step * 4 : step * 4 + 4] = False
        out = aa.attention(q, k, v, mask=aa.dense(m), backend="sdpa")
        _check(out, oracle(q, k, v, mask=aa.dense(m)), f"step {step}")


@pytest.mark.parametrize("backend", ["eager", "sdpa", "flex"])
def test_one_term_with_lengths_edited_in_place(backend):
    """One term reused while the caller's CPU lengths tensor is edited in place between calls.
    ``padding(t)`` keys its keep-mask (and flex's blocks) by the tensor's version, so every call
    sees the lengths as they are now; ``documents(t)`` reads a CPU tensor when the term is built
    (its documented contract) and keeps a copy, so key, checks and lowering all keep the values
    it was built with."""
    q, k, v = generate_qkv(2, 2, 2, 32, 32, 16)
    docs = torch.tensor([[8, 8, 16], [4, 20, 8]])
    lengths = torch.tensor([32, 10])
    dterm, pterm = aa.documents(docs) & aa.causal(), aa.padding(lengths)
    built = aa.documents(torch.tensor([[8, 8, 16], [4, 20, 8]])) & aa.causal()
    for step in range(4):
        docs[0, :2] = torch.tensor([20, 20])  # an invalid packing: must not reach the term
        lengths[1] = 6 + 7 * step
        out = aa.attention(q, k, v, mask=pterm, backend=backend)
        _check(out, oracle(q, k, v, mask=aa.padding(lengths.clone())), f"{backend} step {step} padding")
        out = aa.attention(q, k, v, mask=dterm, backend=backend)
        _check(out, oracle(q, k, v, mask=built), f"{backend} step {step} documents")


def test_freed_terms_leave_the_caches():
    """An entry keyed by a freed tensor can never be hit again: it is dropped when the tensor is
    freed, so a stream of fresh masks does not pin memory up to the size bound."""
    aa.clear_caches()
    sdpa = REGISTRY["sdpa"]
    q, k, v = generate_qkv(1, 2, 2, 32, 32, 16)
    for _ in range(10):
        m = torch.rand(1, 1, 32, 32) > 0.5
        m[..., 0] = True
        aa.attention(q, k, v, mask=aa.dense(m), backend="sdpa")
        del m
        gc.collect()
    assert len(sdpa.cache) == 0, f"{len(sdpa.cache)} entries of freed masks left"
    keep = torch.rand(1, 1, 32, 32) > 0.5
    aa.attention(q, k, v, mask=aa.dense(keep), backend="sdpa")
    assert len(sdpa.cache) == 1  # a live tensor's entry stays


def test_a_new_packing_does_not_re_decide():
    """Decisions depend on the term structure, never on values: new lengths reuse the decision
    (no re-ranking work per packing); only the value checks and the lowered form are new."""
    from anyattn import api

    aa.clear_caches()
    q, k, v = generate_qkv(1, 2, 2, 64, 64, 16)
    for lengths in ([10, 54], [30, 34], [1, 2, 61], [64]):
        aa.attention(q, k, v, mask=aa.documents(lengths) & aa.causal())
    assert len(api._DECISIONS) == 1
    assert len(api._VALIDATED) == 4


def test_identity_tokens_are_never_reused():
    from anyattn._cache import identity

    seen = set()
    for _ in range(200):
        t = torch.empty(64)
        tok = identity(t)
        assert tok not in seen
        seen.add(tok)
        del t


def test_first_sight_of_term_values_uses_the_first_sight_row(monkeypatch):
    """auto ranks a call whose term values it has not seen with ranking.FIRST_SIGHT (per-call
    cost, lowering included) and the same values again with RANKING (kernel speed): a one-off
    packing avoids a backend that builds an index per mask, a model's layers reuse it."""
    from anyattn import ranking
    from anyattn.testing import record_calls

    aa.clear_caches()
    monkeypatch.setitem(ranking.FIRST_SIGHT, "cpu", {"documents": ("eager", "sdpa", "flex")})
    q, k, v = generate_qkv(1, 2, 2, 16, 16, 16)
    with record_calls() as calls:
        aa.attention(q, k, v, mask=aa.documents([5, 11]))  # first sight: eager
        aa.attention(q, k, v, mask=aa.documents([5, 11]))  # seen: the regular CPU row (sdpa)
        aa.attention(q, k, v, mask=aa.documents([7, 9]))  # new values: first sight again
    assert [c.backend for c in calls] == ["eager", "sdpa", "eager"]
    d = aa.explain(q, k, v, mask=aa.documents([5, 11]))
    assert d.chosen == "sdpa"


def test_sdpa_reads_empty_rows_on_the_host_only_when_a_mask_is_reused():
    """A mask used once is lowered without a device sync (the rows that see no key are zeroed on
    the device); used again, the rows are read once and row_ok is dropped when every row sees a key.
    Exact on every call, with and without empty rows."""
    from anyattn.testing import make_call

    sd = REGISTRY["sdpa"]
    q, k, v = generate_qkv(1, 2, 2, 8, 8, 16, seed=5)
    full = torch.ones(8, 8, dtype=torch.bool).tril()[None, None]
    holed = full.clone()
    holed[..., 3, :] = False  # query 3 sees no key
    for m, empty in ((full, False), (holed, True)):
        call = make_call(q, k, v, mask=aa.dense(m))
        first = sd.lowered(call)
        assert first.rows_unread and first.row_ok is not None
        assert first.attn_mask.dtype == torch.bool  # used once: passed as it is, no conversion
        again = sd.lowered(call)
        assert not again.rows_unread and (again.row_ok is not None) == empty
        assert again.attn_mask.dtype == q.dtype  # used again: stored in SDPA's additive form
        for _ in range(2):
            out = aa.attention(q, k, v, mask=aa.dense(m), backend="sdpa")
            _check(out, oracle(q, k, v, mask=aa.dense(m)), "dense")
            if empty:
                assert out[..., 3, :].eq(0).all()


@pytest.mark.parametrize("grad", [False, True])
def test_sdpa_padding_with_an_empty_row(grad):
    """New padding each call with a row of length 0, as lengths and as a keep-mask: without
    autograd the kernel sees that row fully masked (the four ops that guard it are skipped) and
    its output is replaced by zeros; with autograd the row attends everywhere, so no NaN reaches
    the backward. Both exact, gradients finite."""
    from anyattn.testing import make_call

    sd = REGISTRY["sdpa"]
    gen = torch.Generator().manual_seed(4)
    for step in range(6):
        lengths = torch.randint(1, 12, (3,), generator=gen)
        lengths[step % 3] = 0
        q, k, v = generate_qkv(3, 2, 1, 12, 12, 8, seed=step)
        keep = torch.arange(12)[None, :] < lengths[:, None]
        for mask in (aa.padding(lengths), aa.padding(mask=keep)):
            leaves = [t.detach().requires_grad_(grad) for t in (q, k, v)]
            with torch.set_grad_enabled(grad):
                lw = sd.lowered(make_call(*leaves, mask=mask))
                out = aa.attention(*leaves, mask=mask, backend="sdpa")
            # the empty row's keys: all masked without autograd, all visible with it
            assert bool(lw.attn_mask[step % 3].any()) == grad
            _check(out, oracle(q, k, v, mask=mask), f"{mask!r} grad={grad}")
            assert out[step % 3].eq(0).all()
            if grad:
                g = torch.autograd.grad(out, leaves, torch.randn_like(out))
                assert all(torch.isfinite(x).all() for x in g)


@pytest.mark.parametrize("shape", [(8, 8), (1, 1, 8, 8), (2, 1, 8, 8), (1, 2, 1, 8), (2, 2, 8, 1)], ids=str)
def test_dense_mask_materializes_without_a_gather_and_sdpa_never_caches_the_callers_memory(shape):
    """A dense() term's materialized mask is a view of the tensor (no index-grid gather), equal to
    what its predicate gives on the grids and broadcast the same way; the SDPA form lowered from
    it, first use and reuse, is a tensor of its own (the cache never holds the caller's memory)."""
    from anyattn.spec.base import Geometry, index_grids, materialize_mask
    from anyattn.testing import make_call

    g = torch.Generator().manual_seed(3)
    m = torch.rand(shape, generator=g) > 0.4
    geo = Geometry(2, 2, 8, 8, torch.device("cpu"))
    bound = aa.dense(m).bind(geo)
    got = materialize_mask(bound, geo)
    want = bound.pred(*index_grids(geo, bound.uses_b, bound.uses_h))
    assert got.shape == want.shape and torch.equal(got, want)
    q, k, v = generate_qkv(2, 2, 2, 8, 8, 16, seed=7)
    call = make_call(q, k, v, mask=aa.dense(m))
    for lw in (REGISTRY["sdpa"].lowered(call), REGISTRY["sdpa"].lowered(call)):
        assert lw.attn_mask.untyped_storage().data_ptr() != m.untyped_storage().data_ptr()
