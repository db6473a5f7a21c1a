"""Packed attention with Sq != Sk on CPU: ``documents(q_lengths, kv=k_lengths)`` and
``padding(..., kv=...)`` give queries and keys separate layouts, each document (row) aligned
bottom-right on its own. Chunked prefill, prefill + decode in one batch and packed cross-attention
are one call; every case is checked against running each document alone (an independent
reference) and against the float64 oracle with the tolerance rule, forward and backward."""

from __future__ import annotations

import random

import pytest
import torch

import anyattn as aa
from anyattn.backends import Refusal
from anyattn.testing import compare_to_oracle, generate_qkv, make_call, record_calls, use_backend

from .test_flash_backends import Recorder, cpu_flash_torch, fake_varlen


def _cut(x, starts, lens, dim=2):
    return [x.narrow(dim, a, n) for a, n in zip(starts, lens)]


def _starts(lens):
    out, s = [], 0
    for n in lens:
        out.append(s)
        s += n
    return out


def per_document(q, k, v, ql, kl, term=None, score=None, backend="eager"):
    """Each document run alone (bottom-right within the document), outputs placed back; queries
    past the documents and documents without keys give 0."""
    out = torch.zeros(*q.shape[:3], v.shape[-1], dtype=q.dtype)
    for a, n, b, m in zip(_starts(ql), ql, _starts(kl), kl):
        if n == 0 or m == 0:
            continue
        sc = score(a, b) if callable(score) else score
        o = aa.attention(q[:, :, a : a + n], k[:, :, b : b + m], v[:, :, b : b + m], mask=term, score=sc, backend=backend)
        out[:, :, a : a + n] = o
    return out


WINDOWS = [None, aa.causal(), aa.sliding_window(3), aa.sliding_window(2, 1)]

LAYOUTS = [
    # (query lengths, key lengths, tail queries, tail keys)
    ([3, 1, 4], [7, 5, 4], 0, 0),  # chunked prefill + a decode step + a fresh prompt
    ([1, 1, 1, 1], [9, 3, 12, 1], 2, 3),  # decode of four sequences, padded tails
    ([5, 2], [2, 6], 0, 1),  # more queries than keys: the first queries of doc 0 see nothing under causal
    ([0, 4, 2], [3, 0, 5], 1, 0),  # a document without queries, one without keys
]


@pytest.mark.parametrize("window", WINDOWS, ids=repr)
@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda lay: f"q{lay[0]}-k{lay[1]}")
@pytest.mark.parametrize("backend", ["eager", "sdpa"])
def test_documents_with_key_layout_equal_each_document_alone(backend, layout, window):
    ql, kl, tq, tk = layout
    Sq, Sk = sum(ql) + tq, sum(kl) + tk
    q, k, v = generate_qkv(1, 4, 2, Sq, Sk, 16, dtype=torch.float64, seed=len(ql))
    mask = aa.documents(ql, kv=kl) if window is None else aa.documents(ql, kv=kl) & window
    got = aa.attention(q, k, v, mask=mask, backend=backend)
    want = per_document(q, k, v, ql, kl, window)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("backend", ["eager", "sdpa"])
@pytest.mark.parametrize("variant", ["causal", "window", "cross", "alibi"])
def test_documents_with_key_layout_meet_the_tolerance_rule_fwd_bwd(backend, variant):
    ql, kl = [5, 1, 9, 3], [11, 17, 9, 2]
    q, k, v = generate_qkv(2, 4, 2, sum(ql) + 2, sum(kl) + 1, 32, seed=5)
    m = aa.documents(ql, kv=kl)
    kw = {
        "causal": dict(mask=m & aa.causal()),
        "window": dict(mask=m & aa.sliding_window(4)),
        "cross": dict(mask=m),
        "alibi": dict(mask=m & aa.causal(), score=aa.alibi(torch.tensor([0.5, 0.25, 0.125, 0.0625]))),
    }[variant]
    comps = compare_to_oracle(q, k, v, backend=backend, grad=True, **kw)
    assert all(c.ok for c in comps), [str(c) for c in comps]


def test_alibi_measures_from_each_documents_own_alignment():
    ql, kl = [2, 3], [6, 4]
    q, k, v = generate_qkv(1, 2, 2, 5, 10, 16, dtype=torch.float64)
    slopes = torch.tensor([0.7, 0.3], dtype=torch.float64)
    got = aa.attention(q, k, v, mask=aa.documents(ql, kv=kl) & aa.causal(), score=aa.alibi(slopes), backend="eager")
    want = per_document(q, k, v, ql, kl, aa.causal(), aa.alibi(slopes))
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-10)


def test_chunked_prefill_equals_full_causal_attention():
    """A 23-token sequence prefilled in chunks of 8 (each chunk's queries against all keys so far)
    and a second sequence decoded one token per call: the packed calls equal full causal."""
    q, k, v = generate_qkv(1, 4, 1, 23, 23, 16, dtype=torch.float64, seed=2)
    full = aa.attention(q, k, v, mask=aa.causal(), backend="eager")
    for a in range(0, 23, 8):
        n = min(8, 23 - a)
        o = aa.attention(q[:, :, a : a + n], k[:, :, : a + n], v[:, :, : a + n], mask=aa.documents([n], kv=[a + n]) & aa.causal())
        torch.testing.assert_close(o, full[:, :, a : a + n], atol=1e-12, rtol=1e-10)
    # two sequences at different stages in one call: tokens 8..15 of sequence 0 (chunk 2) and
    # token 22 of the same prompt used as another sequence's single decode step
    qq = torch.cat([q[:, :, 8:16], q[:, :, 22:23]], 2)
    kk = torch.cat([k[:, :, :16], k], 2)
    vv = torch.cat([v[:, :, :16], v], 2)
    o = aa.attention(qq, kk, vv, mask=aa.documents([8, 1], kv=[16, 23]) & aa.causal())
    torch.testing.assert_close(o, torch.cat([full[:, :, 8:16], full[:, :, 22:23]], 2), atol=1e-12, rtol=1e-10)


def _right(B, S, n):
    return torch.arange(S)[None, :] < torch.tensor(n)[:, None]


def _left(B, S, n):
    return torch.arange(S)[None, :] >= S - torch.tensor(n)[:, None]


@pytest.mark.parametrize("side", ["right", "left", "lengths", "all"])
@pytest.mark.parametrize("window", [None, aa.causal(), aa.sliding_window(2)], ids=repr)
@pytest.mark.parametrize("backend", ["eager", "sdpa"])
def test_padding_with_key_layout_equals_each_row_alone(backend, window, side):
    """Row b has nq[b] real queries among Sq and nk[b] real keys among Sk (a KV cache of its own
    length, a decode batch next to prefills): each row computed alone, bottom-right."""
    B, Sq, Sk = 3, 4, 9
    nq, nk = [4, 1, 0], [9, 3, 5]
    if side == "all":
        nq = [Sq] * B
        nk = [9, 6, 4]
    q, k, v = generate_qkv(B, 4, 2, Sq, Sk, 16, dtype=torch.float64, seed=4)
    qkeep = (_left if side == "left" else _right)(B, Sq, nq)
    kkeep = (_left if side == "left" else _right)(B, Sk, nk)
    if side == "lengths":
        term = aa.padding(torch.tensor(nq), kv=torch.tensor(nk))
    elif side == "all":
        term = aa.padding(kv=torch.tensor(nk))
    else:
        term = aa.padding(mask=qkeep, kv_mask=kkeep)
    got = aa.attention(q, k, v, mask=term if window is None else term & window, backend=backend)
    for b in range(B):
        qi, ki = qkeep[b].nonzero().flatten(), kkeep[b].nonzero().flatten()
        if len(qi) and len(ki):
            want = aa.attention(q[b : b + 1, :, qi], k[b : b + 1, :, ki], v[b : b + 1, :, ki], mask=window, backend="eager")
            torch.testing.assert_close(got[b : b + 1, :, qi], want, atol=1e-12, rtol=1e-10)
        rest = torch.ones(Sq, dtype=torch.bool)
        rest[qi] = False
        if not len(ki):
            rest[:] = True
        assert torch.equal(got[b, :, rest], torch.zeros_like(got[b, :, rest]))


def test_padding_with_key_layout_and_holes_counts_real_tokens():
    """Holes in both layouts: the t-th real query of a row sits at the (m - n + t)-th real key."""
    qkeep = torch.tensor([[1, 0, 1, 1]], dtype=torch.bool)
    kkeep = torch.tensor([[1, 1, 0, 1, 0, 1, 1]], dtype=torch.bool)
    q, k, v = generate_qkv(1, 2, 2, 4, 7, 16, dtype=torch.float64)
    got = aa.attention(q, k, v, mask=aa.padding(mask=qkeep, kv_mask=kkeep) & aa.causal(), backend="eager")
    qi, ki = qkeep[0].nonzero().flatten(), kkeep[0].nonzero().flatten()
    want = aa.attention(q[:, :, qi], k[:, :, ki], v[:, :, ki], mask=aa.causal(), backend="eager")
    torch.testing.assert_close(got[:, :, qi], want, atol=1e-12, rtol=1e-10)


def test_flash_torch_packs_queries_and_keys_separately():
    """cu_seqlens_q != cu_seqlens_k; documents with no query or no key are left out; exact
    against eager forward and backward (CPU reference kernel with FlashAttention's conventions)."""
    rec = Recorder()
    be = cpu_flash_torch(fake_varlen(gqa_flag=True, recorder=rec))
    ql, kl = [3, 0, 1, 4], [7, 2, 5, 0]
    q, k, v = generate_qkv(1, 4, 2, 9, 15, 16, requires_grad=True, seed=1)
    mask = aa.documents(ql, kv=kl) & aa.causal()
    out, lse = be.run(make_call(q, k, v, mask=mask, return_lse=True))
    first = rec.calls[0]  # (a second, tiny call may follow: the lse-layout probe, since T == Hq here)
    assert first["cu_q"] == [0, 3, 4] and first["cu_k"] == [0, 7, 12]
    assert (first["max_q"], first["max_k"]) == (3, 7)
    ref = aa.attention(q, k, v, mask=mask, backend="eager", return_lse=True)
    torch.testing.assert_close(out, ref.out, atol=2e-5, rtol=1e-4)
    assert torch.equal(torch.isneginf(lse), torch.isneginf(ref.lse))
    g = torch.autograd.grad(out.sum(), (q, k, v))
    gr = torch.autograd.grad(ref.out.sum(), (q, k, v))
    for a, b in zip(g, gr):
        torch.testing.assert_close(a, b, atol=5e-5, rtol=1e-4)


def test_flash_torch_padding_with_key_layout_random_against_eager():
    be = cpu_flash_torch()
    rng = random.Random(3)
    for _ in range(25):
        B, Sq, Sk = rng.randint(1, 3), rng.randint(1, 6), rng.randint(1, 10)
        nq = [rng.randint(0, Sq) for _ in range(B)]
        nk = [rng.randint(0, Sk) for _ in range(B)]
        q, k, v = generate_qkv(B, 4, 2, Sq, Sk, 16, seed=rng.randint(0, 99))
        side = rng.choice(["lengths", "left"])
        if side == "lengths":
            term = aa.padding(torch.tensor(nq), kv=torch.tensor(nk))
        else:
            term = aa.padding(mask=_left(B, Sq, nq), kv_mask=_left(B, Sk, nk))
        w = rng.choice([None, aa.causal(), aa.sliding_window(2)])
        mask = term if w is None else term & w
        out, _ = be.run(make_call(q, k, v, mask=mask))
        torch.testing.assert_close(out, aa.attention(q, k, v, mask=mask, backend="eager"), atol=2e-5, rtol=1e-4)


def test_flash_torch_refuses_a_lookahead_window_when_a_document_has_more_queries_than_keys():
    """The varlen kernel's window differs from the bottom-right definition on queries before the
    first key (found by the H200 fuzz run for Sq > Sk): refused on the values, auto moves on."""
    q, k, v = generate_qkv(1, 2, 2, 7, 6, 16, dtype=torch.bfloat16)
    mask = aa.documents([5, 2], kv=[2, 4]) & aa.sliding_window(2, 1)
    with use_backend(cpu_flash_torch()):
        assert REGISTRY_supports("flash_torch", make_call(q, k, v, mask=mask).sig) is None
        with pytest.raises(Refusal, match="more queries than keys"):
            cpu_flash_torch().run(make_call(q.float(), k.float(), v.float(), mask=mask))
        out = aa.attention(q, k, v, mask=mask, backend=["flash_torch", "eager"])
    torch.testing.assert_close(out, aa.attention(q, k, v, mask=mask, backend="eager"))


def REGISTRY_supports(name, sig):
    from anyattn.backends import REGISTRY

    return REGISTRY[name].supports(sig)


def test_flash_torch_still_refuses_sq_ne_sk_without_a_key_layout():
    q, k, v = generate_qkv(1, 2, 2, 4, 9, 16, dtype=torch.bfloat16)
    why = cpu_flash_torch().supports(make_call(q, k, v, mask=aa.documents([4])).sig)
    assert "needs Sq == Sk" in why and "kv=" in why


def test_layout_arguments_are_checked():
    q, k, v = generate_qkv(1, 2, 2, 6, 9, 16)
    with pytest.raises(ValueError, match=r"documents\(kv\): expected as many documents per row"):
        aa.attention(q, k, v, mask=aa.documents([3, 3], kv=[9]))
    with pytest.raises(ValueError, match=r"documents\(lengths\): expected lengths summing to at most the query length Sq 6"):
        aa.attention(q, k, v, mask=aa.documents([7], kv=[9]))
    with pytest.raises(ValueError, match=r"documents\(kv\): expected lengths summing to at most the key length Sk 9"):
        aa.attention(q, k, v, mask=aa.documents([6], kv=[10]))
    with pytest.raises(ValueError, match=r"padding\(kv\): expected lengths <= the key length 9"):
        aa.attention(q, k, v, mask=aa.padding(kv=torch.tensor([10])))
    with pytest.raises(ValueError, match=r"padding\(kv_mask\): expected rows of the key length Sk=9"):
        aa.attention(q, k, v, mask=aa.padding(kv_mask=torch.ones(1, 8, dtype=torch.bool)))
    with pytest.raises(ValueError, match="one documents.* or padding.* term when queries and keys have separate layouts"):
        aa.attention(q, k, v, mask=aa.documents([6], kv=[9]) & aa.padding(kv=torch.tensor([9])))


def test_new_lengths_reuse_the_decision_and_the_structure_says_packed():
    from anyattn import api

    q, k, v = generate_qkv(1, 2, 2, 6, 9, 16)
    aa.attention(q, k, v, mask=aa.documents([3, 3], kv=[4, 5]) & aa.causal())
    n = len(api._DECISIONS)
    with record_calls() as seen:
        aa.attention(q, k, v, mask=aa.documents([1, 5], kv=[2, 7]) & aa.causal())
    assert len(api._DECISIONS) == n
    assert make_call(q, k, v, mask=aa.documents([1, 5], kv=[2, 7])).sig.packed_layout
    assert repr(seen[0].mask) == "documents([1, 5], kv=[2, 7]) & causal()"


def test_seqinfo_layouts_are_accepted():
    qi = aa.SeqInfo.from_lengths([2, 3])
    ki = aa.SeqInfo.from_lengths([6, 4])
    q, k, v = generate_qkv(1, 2, 2, 5, 10, 16, dtype=torch.float64)
    got = aa.attention(q, k, v, mask=aa.documents(qi, kv=ki) & aa.causal(), backend="eager")
    torch.testing.assert_close(got, per_document(q, k, v, [2, 3], [6, 4], aa.causal()), atol=1e-12, rtol=1e-10)


@pytest.mark.slow
def test_flex_cpu_packed_layouts_forward():
    """The one compiled-flex case of this file (~20 s): chunked prefill + decode packed, against
    each document alone; the BlockMask comes from the terms (no create_block_mask)."""
    from anyattn.backends import REGISTRY

    ql, kl = [40, 1, 1, 70], [200, 33, 129, 70]
    q, k, v = generate_qkv(1, 4, 2, sum(ql), sum(kl), 32, seed=6)
    mask = aa.documents(ql, kv=kl) & aa.sliding_window(64)
    before = REGISTRY["flex"].stats["structured_block_masks"]
    got = aa.attention(q, k, v, mask=mask, backend="flex")
    assert REGISTRY["flex"].stats["structured_block_masks"] == before + 1
    want = per_document(q.double(), k.double(), v.double(), ql, kl, aa.sliding_window(64))
    ref = per_document(q, k, v, ql, kl, aa.sliding_window(64))
    err, ref_err = (got.double() - want).abs().max().item(), (ref.double() - want).abs().max().item()
    assert err <= 2 * ref_err + 1e-5, (err, ref_err)


def _fa2_varlen_reference(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                          softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                          deterministic=False, return_attn_probs=False):  # fmt: skip
    """flash-attn 2's flash_attn_varlen_func in its own conventions (separate cu_seqlens_q/k)."""
    from .test_flash_backends import _ref_seq

    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    assert max_seqlen_q == max(b - a for a, b in zip(cq, cq[1:])) and max_seqlen_k == max(b - a for a, b in zip(ck, ck[1:]))
    left, right = (-1, 0) if causal else window_size
    outs, lses = [], []
    for n in range(len(cq) - 1):
        o, lse = _ref_seq(q[cq[n] : cq[n + 1]], k[ck[n] : ck[n + 1]], v[ck[n] : ck[n + 1]], softmax_scale, left, right, softcap, alibi_slopes)
        outs.append(o)
        lses.append(lse)
    out = torch.cat(outs)
    return (out, torch.cat(lses, 1), None) if return_attn_probs else out


def test_flash_package_backend_packs_queries_and_keys_separately():
    from anyattn.backends import flash

    f = _fa2_varlen_reference
    impl = flash.Impl(2, "reference FA2", f, f, flash._params(f), flash._params(f))
    be = flash.FlashPackageBackend("flash", ("flash_attn",), flash.FLASH_INSTALL, lambda: impl, cuda_only=False)
    ql, kl = [3, 0, 1, 4], [7, 2, 5, 0]
    q, k, v = generate_qkv(1, 4, 2, 9, 15, 16, seed=2)
    for mask in (aa.documents(ql, kv=kl) & aa.causal(), aa.documents(ql, kv=kl)):
        out, lse = be.run(make_call(q, k, v, mask=mask, return_lse=True))
        ref = aa.attention(q, k, v, mask=mask, backend="eager", return_lse=True)
        torch.testing.assert_close(out, ref.out, atol=2e-5, rtol=1e-4)
        assert torch.equal(torch.isneginf(lse), torch.isneginf(ref.lse))
    # and a sink through the same path (forward)
    s = aa.sink(torch.tensor([0.5, -1.0, 2.0, 0.0]))
    out, _ = be.run(make_call(q, k, v, mask=aa.documents(ql, kv=kl) & aa.causal(), score=s))
    ref = aa.attention(q, k, v, mask=aa.documents(ql, kv=kl) & aa.causal(), score=s, backend="eager")
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)
