"""Core semantics on CPU: every term and combination against the float64 oracle, on every CPU
backend, forward and backward; validation; refusal; caches; the decision trace."""

from __future__ import annotations

import pytest
import torch

import anyattn as aa
from anyattn.backends import REGISTRY
from anyattn.backends import sdpa as sdpa_backend
from anyattn.testing import compare_to_oracle, generate_qkv, make_call, use_backend

from .variants import VARIANTS, applicable, make, sdpa_can

# (B, Hq, Hkv, Sq, Sk, D, layout): lengths 1/17/113, Sq != Sk both ways, GQA, MQA, head dims
# 64/80/128, non-contiguous (B, S, H, D) memory.
SHAPES = [
    (2, 4, 4, 17, 17, 64, "bhsd"),
    (1, 4, 2, 1, 1, 80, "bshd"),
    (2, 4, 1, 113, 113, 128, "bshd"),
    (1, 2, 2, 9, 40, 64, "bhsd"),
    (1, 2, 2, 40, 9, 64, "bshd"),
]


def _assert_ok(comps, ctx=""):
    bad = [str(c) for c in comps if not c.ok]
    assert not bad, f"{ctx}: " + "; ".join(bad)


def _shape_id(s):
    B, Hq, Hkv, Sq, Sk, D, lay = s
    return f"B{B}-H{Hq}/{Hkv}-{Sq}x{Sk}-D{D}-{lay}"


@pytest.mark.parametrize("shape", SHAPES, ids=_shape_id)
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("backend", ["eager", "sdpa"])
def test_matches_float64_oracle_fwd_bwd(backend, variant, shape):
    B, Hq, Hkv, Sq, Sk, D, layout = shape
    if not applicable(variant, Sq, Sk):
        pytest.skip("variant needs Sq <= Sk")
    if backend == "sdpa" and not sdpa_can(variant):
        pytest.skip("not expressible through SDPA (tested as a refusal)")
    q, k, v = generate_qkv(B, Hq, Hkv, Sq, Sk, D, layout=layout, seed=hash(variant) % 1000)
    kw = make(variant, B, Hq, Sq, Sk)
    _assert_ok(compare_to_oracle(q, k, v, backend=backend, grad=True, **kw), f"{backend}/{variant}")


@pytest.mark.parametrize("variant", ["causal", "documents_causal", "alibi"])
def test_long_sequence_head_dim_256(variant):
    q, k, v = generate_qkv(1, 2, 1, 1025, 1025, 256, seed=7)
    kw = make(variant, 1, 2, 1025, 1025)
    _assert_ok(compare_to_oracle(q, k, v, backend="sdpa", grad=True, **kw), variant)


def test_eager_returns_lse_matching_oracle():
    q, k, v = generate_qkv(2, 4, 2, 17, 33, 64)
    _assert_ok(compare_to_oracle(q, k, v, backend="eager", return_lse=True, mask=aa.causal() & aa.sliding_window(4)))


# -------------------------------------------------------------------- flex (compiled, CPU: forward only)

FLEX_CPU_VARIANTS = ["documents_causal", "softcap_alibi_window", "padding"]


@pytest.mark.slow
@pytest.mark.parametrize("variant", FLEX_CPU_VARIANTS)
def test_flex_cpu_forward_matches_oracle(variant):
    B, H, S, D = 2, 4, 40, 64
    q, k, v = generate_qkv(B, H, 2, S, S, D)
    _assert_ok(compare_to_oracle(q, k, v, backend="flex", grad=False, **make(variant, B, H, S, S)), variant)


@pytest.mark.slow
def test_flex_block_mask_is_built_once_for_a_repeated_mask():
    """A repeated call with the same mask must not rebuild the BlockMask (5 ms per build on an
    H200 against a 0.6 ms kernel)."""
    q, k, v = generate_qkv(2, 4, 2, 40, 40, 64)
    lengths = torch.tensor([10, 0, 1, 20])
    aa.attention(q, k, v, mask=aa.documents(lengths) & aa.causal(), backend="flex")
    before = REGISTRY["flex"].stats["block_mask_builds"]
    for _ in range(3):  # a fresh term object each call, same tensor: same cache entry
        aa.attention(q, k, v, mask=aa.documents(lengths) & aa.causal(), backend="flex")
    assert REGISTRY["flex"].stats["block_mask_builds"] == before
    lengths[0] = 11  # an in-place edit is a different mask
    lengths[3] = 19
    aa.attention(q, k, v, mask=aa.documents(lengths) & aa.causal(), backend="flex")
    assert REGISTRY["flex"].stats["block_mask_builds"] == before + 1


def test_flex_refuses_backward_on_cpu_with_reason():
    q, k, v = generate_qkv(1, 2, 2, 8, 8, 64, requires_grad=True)
    with pytest.raises(aa.UnsupportedError, match="no backward on CPU"):
        aa.attention(q, k, v, backend="flex")


# -------------------------------------------------------------------- semantics details


def test_fully_masked_rows_are_zero_with_finite_gradients():
    q, k, v = generate_qkv(1, 2, 2, 12, 12, 64, requires_grad=True)
    mask = aa.documents([5, 3])  # tokens 8..11 are padding and see nothing
    for be in ("eager", "sdpa"):
        r = aa.attention(q, k, v, mask=mask, backend=be, return_lse=True) if be == "eager" else None
        out = aa.attention(q, k, v, mask=mask, backend=be)
        assert torch.all(out[:, :, 8:] == 0), be
        if r is not None:
            assert torch.all(torch.isneginf(r.lse[:, :, 8:]))
        out.sum().backward()
        for t in (q, k, v):
            assert torch.isfinite(t.grad).all(), be
            t.grad = None


def test_bottom_right_alignment_when_sq_differs_from_sk():
    """causal() with Sq=3, Sk=7: query i sits at key position i + 4."""
    q, k, v = generate_qkv(1, 1, 1, 3, 7, 64)
    want = torch.tensor([[j <= i + 4 for j in range(7)] for i in range(3)])
    a = aa.attention(q, k, v, mask=aa.causal(), backend="sdpa")
    b = aa.attention(q, k, v, mask=aa.dense(want), backend="eager")
    torch.testing.assert_close(a, b)
    # Sq > Sk: the first Sq - Sk queries see nothing
    q, k, v = generate_qkv(1, 1, 1, 7, 3, 64)
    out = aa.attention(q, k, v, mask=aa.causal(), backend="sdpa")
    assert torch.all(out[0, 0, :4] == 0) and torch.all(out[0, 0, 4:] != 0)


def test_spec_equals_its_materialized_dense_mask():
    B, H, S = 2, 2, 30
    q, k, v = generate_qkv(B, H, H, S, S, 64)
    lengths = [7, 12, 9]
    ids = torch.repeat_interleave(torch.arange(3), torch.tensor(lengths))
    ids = torch.cat([ids, torch.full((S - 28,), -1)])
    dense = (ids[:, None] == ids[None, :]) & (ids[:, None] >= 0) & torch.ones(S, S, dtype=torch.bool).tril()
    for be in ("eager", "sdpa"):
        a = aa.attention(q, k, v, mask=aa.documents(lengths) & aa.causal(), backend=be)
        b = aa.attention(q, k, v, mask=aa.dense(dense), backend=be)
        torch.testing.assert_close(a, b)


def test_bool_and_uint8_dense_masks_agree_and_cache_separately():
    q, k, v = generate_qkv(1, 2, 2, 16, 16, 64)
    m = torch.rand(16, 16, generator=torch.Generator().manual_seed(0)) > 0.5
    a = aa.attention(q, k, v, mask=aa.dense(m), backend="sdpa")
    b = aa.attention(q, k, v, mask=aa.dense(m.to(torch.uint8)), backend="sdpa")
    torch.testing.assert_close(a, b)
    assert aa.dense(m).key != aa.dense(m.to(torch.uint8)).key


def test_gradients_flow_into_bias_and_relative_bias_tables():
    q, k, v = generate_qkv(1, 2, 2, 9, 9, 64)
    for term_of in (lambda t: aa.bias(t), lambda t: aa.relative_bias(t, 8, 32)):
        grads = []
        for be in ("eager", "sdpa"):
            t = torch.randn(2, 8) if "relative" in repr(term_of(torch.randn(2, 8))) else torch.randn(2, 9, 9)
            t = t.to(torch.float64).requires_grad_(True) if not grads else grads[0][0].detach().clone().requires_grad_(True)
            out = aa.attention(q.double(), k.double(), v.double(), score=term_of(t), backend=be)
            out.square().sum().backward()
            grads.append((t, t.grad))
        torch.testing.assert_close(grads[0][1], grads[1][1])


def test_t5_buckets_match_the_published_formula():
    import math

    def ref_bucket(rel, num_buckets, max_distance, bidirectional):  # T5 paper / mesh-tf, scalar form
        ret, n = 0, -rel
        if bidirectional:
            num_buckets //= 2
            ret += (n < 0) * num_buckets
            n = abs(n)
        else:
            n = max(n, 0)
        max_exact = num_buckets // 2
        if n < max_exact:
            return ret + n
        val = max_exact + int(math.log(n / max_exact) / math.log(max_distance / max_exact) * (num_buckets - max_exact))
        return ret + min(val, num_buckets - 1)

    from anyattn.spec import t5_bucket

    rel = torch.arange(-300, 301)
    for nb, md, bi in ((32, 128, True), (32, 128, False), (16, 64, True)):
        got = t5_bucket(rel, nb, md, bi).tolist()
        want = [ref_bucket(int(r), nb, md, bi) for r in rel]
        assert got == want, (nb, md, bi)


# -------------------------------------------------------------------- canonical form and repr


def test_canonical_form_merges_windows_and_echoes_readably():
    from anyattn.spec import canonical_mask

    assert repr(canonical_mask(aa.causal() & aa.sliding_window(1024))) == "sliding_window(1024)"
    assert repr(canonical_mask(aa.sliding_window(8, 2) & aa.sliding_window(4, 6))) == "sliding_window(4, 2)"
    assert repr(canonical_mask(aa.sliding_window(8) | aa.causal())) == "causal()"
    assert canonical_mask(aa.sliding_window(None, None)) is None
    assert repr(canonical_mask(~~aa.chunked(4))) == "chunked(4)"
    m = aa.documents([3, 4]) & (aa.causal() & aa.chunked(2))
    assert repr(canonical_mask(m)) == "documents([3, 4]) & causal() & chunked(2)"


# -------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "make_args, exc, match",
    [
        (lambda q, k, v: ((q, k, v.double()), {}), TypeError, r"v: expected the same dtype as q"),
        (lambda q, k, v: ((q[0], k, v), {}), ValueError, r"q: expected 4 dims"),
        (lambda q, k, v: ((q, k[:, :3], v[:, :3]), {}), ValueError, r"k: expected a number of heads that divides Hq=4"),
        (lambda q, k, v: ((q, k, v[:, :, :5]), {}), ValueError, r"v: expected Sk=17 positions"),
        (lambda q, k, v: ((q, k[..., :32], v), {}), ValueError, r"k: expected head dim D=64"),
        (lambda q, k, v: ((q, k, v), {"scale": float("nan")}), ValueError, r"scale: expected a finite float"),
        (lambda q, k, v: ((q, k, v), {"dropout_p": 1.0}), ValueError, r"dropout_p: expected a float in \[0, 1\)"),
        (lambda q, k, v: ((q, k, v), {"mask": "causal"}), TypeError, r"mask: expected a mask term"),
        (lambda q, k, v: ((q, k, v), {"score": [aa.softcap(1.0), 3]}), TypeError, r"score\[1\]: expected a score term"),
        (lambda q, k, v: ((q, k, v), {"mask": aa.documents([10, 10])}), ValueError, r"documents\(lengths\).*summing to 20"),
        (lambda q, k, v: ((q, k, v), {"mask": aa.padding(torch.tensor([3]))}), ValueError, r"padding\(lengths\): expected shape \(B,\)"),
        (lambda q, k, v: ((q, k, v), {"mask": aa.padding(torch.tensor([3, 18]))}), ValueError, r"lengths <= the key length 17"),
        (lambda q, k, v: ((q, k, v), {"mask": aa.block_causal(torch.arange(16))}), ValueError, r"block_causal\(ids\).*Sk=17"),
        (lambda q, k, v: ((q, k, v), {"score": aa.alibi(torch.ones(3))}), ValueError, r"alibi\(slopes\): expected one slope per query head"),
        (lambda q, k, v: ((q, k, v), {"mask": aa.dense(torch.ones(3, 17, 17, dtype=torch.bool))}), ValueError, r"dense\(mask\)"),
        (lambda q, k, v: ((q, k, v), {"backend": "flash9"}), ValueError, r"backend: expected one of \['auto', 'eager'"),
    ],
)
def test_bad_input_names_the_argument(make_args, exc, match):
    q, k, v = generate_qkv(2, 4, 4, 17, 17, 64)
    args, kw = make_args(q, k, v)
    with pytest.raises(exc, match=match):
        aa.attention(*args, **kw)


@pytest.mark.parametrize(
    "build, exc, match",
    [
        (lambda: aa.sliding_window(-1), ValueError, r"sliding_window\(left\): expected a non-negative int"),
        (lambda: aa.sliding_window(2.5), TypeError, r"sliding_window\(left\)"),
        (lambda: aa.softcap(0.0), ValueError, r"softcap\(cap\): expected a positive finite float"),
        (lambda: aa.softcap(float("inf")), ValueError, r"softcap\(cap\)"),
        (lambda: aa.alibi(torch.ones(4, dtype=torch.int64)), TypeError, r"alibi\(slopes\): expected a floating-point tensor"),
        (lambda: aa.alibi(torch.ones(2, 4)), ValueError, r"alibi\(slopes\)"),
        (lambda: aa.documents([3, -1]), ValueError, r"documents\(lengths\)"),
        (lambda: aa.documents([1.5]), TypeError, r"documents\(lengths\)"),
        (lambda: aa.padding(), ValueError, r"padding: expected exactly one of lengths= or mask="),
        (lambda: aa.padding(mask=torch.ones(4)), ValueError, r"padding\(mask\): expected a \(B, S\) keep-mask"),
        (lambda: aa.chunked(0), ValueError, r"chunked\(size\): expected a positive int"),
        (lambda: aa.dense(torch.ones(4, 4)), TypeError, r"dense\(mask\): expected a bool or uint8 tensor"),
        (lambda: aa.relative_bias(torch.ones(2, 8), 16, 32), ValueError, r"relative_bias\(table\)"),
        (lambda: aa.causal() & 3, TypeError, r"mask operand of '&'"),
        (lambda: aa.mask_fn(3), TypeError, r"mask_fn\(fn\)"),
    ],
)
def test_bad_term_arguments_are_refused_where_the_term_is_built(build, exc, match):
    with pytest.raises(exc, match=match):
        build()


def test_errors_share_one_base_class():
    with pytest.raises(aa.AnyAttnError):
        aa.softcap(-1.0)


# -------------------------------------------------------------------- backends, refusal, use(), explain


def test_named_backend_never_falls_back():
    q, k, v = generate_qkv(1, 2, 2, 8, 8, 64)
    with pytest.raises(aa.UnsupportedError, match=r"sdpa: rejected: softcap\(2.0\) is not an additive bias") as ei:
        aa.attention(q, k, v, score=aa.softcap(2.0), backend="sdpa")
    assert ei.value.decision.chosen is None
    with pytest.raises(aa.UnsupportedError, match="cudnn: unavailable"):
        aa.attention(q, k, v, backend="cudnn") if not torch.cuda.is_available() else (_ for _ in ()).throw(
            aa.UnsupportedError("cudnn: unavailable (skip)")
        )


def test_preference_list_tries_in_order():
    q, k, v = generate_qkv(1, 2, 2, 8, 8, 64)
    d = aa.explain(q, k, v, score=aa.softcap(2.0), backend=["sdpa", "eager"])
    assert d.chosen == "eager"
    assert [r.status for r in d.rows] == ["rejected", "chosen"]


def test_use_sets_the_default_and_rejects_unknown_names_without_changing_state():
    q, k, v = generate_qkv(1, 2, 2, 8, 8, 64)
    with aa.use("eager"):
        assert aa.explain(q, k, v).chosen == "eager"
        with pytest.raises(ValueError, match=r"backend: expected one of"):
            with aa.use("nope"):
                pass
        assert aa.explain(q, k, v).chosen == "eager"
        assert aa.explain(q, k, v, backend="sdpa").chosen == "sdpa"  # explicit wins
    assert aa.explain(q, k, v).chosen == "sdpa"


def test_auto_on_cpu_picks_sdpa_and_explains_every_backend():
    q, k, v = generate_qkv(1, 2, 2, 8, 8, 64)
    d = aa.explain(q, k, v, mask=aa.documents([3, 5]) & aa.causal())
    text = str(d)
    assert d.chosen == "sdpa"
    for name in aa.backends():
        assert name.name in text
    assert "documents([3, 5]) & causal()" in text
    assert aa.explain(q, k, v, score=aa.softcap(3.0)).chosen == "eager"


def test_backends_lists_every_registered_backend_with_a_reason_when_unavailable():
    infos = aa.backends()
    names = [i.name for i in infos]
    assert names[:4] == ["eager", "sdpa", "cudnn", "flex"]
    for i in infos:
        assert i.available or i.reason


def test_sdpa_lowering_is_cached_and_uses_fast_paths():
    q, k, v = generate_qkv(2, 2, 2, 16, 16, 64)
    REGISTRY["sdpa"].cache.clear()
    aa.attention(q, k, v, mask=aa.causal(), backend="sdpa")
    aa.attention(q, k, v, mask=aa.causal(), backend="sdpa")
    assert REGISTRY["sdpa"].cache.hits >= 1
    call = make_call(q, k, v, mask=aa.causal())
    assert sdpa_backend.lower(call).kind == "is_causal"
    call = make_call(q, k, v, mask=aa.padding(torch.tensor([16, 3])))
    lw = sdpa_backend.lower(call)
    assert lw.kind == "keys-only padding mask" and lw.attn_mask.shape == (2, 1, 1, 16)


def test_sdpa_sees_the_requested_mask():
    """The kernel receives what the lowering promised (proof the SDPA path ran)."""
    seen = []
    real = torch.nn.functional.scaled_dot_product_attention

    def spy(*a, **kw):
        seen.append(kw)
        return real(*a, **kw)

    q, k, v = generate_qkv(1, 2, 2, 16, 16, 64)
    with use_backend(sdpa_backend.SdpaBackend("sdpa", kernel=spy)):
        aa.attention(q, k, v, mask=aa.causal(), backend="sdpa")
    assert seen[-1]["is_causal"] is True and seen[-1]["attn_mask"] is None


def test_zero_length_sequences_give_zeros():
    q, k, v = generate_qkv(1, 2, 2, 0, 5, 64)
    assert aa.attention(q, k, v).shape == (1, 2, 0, 64)
    q, k, v = generate_qkv(1, 2, 2, 4, 0, 64, requires_grad=True)
    out = aa.attention(q, k, v)
    assert out.shape == (1, 2, 4, 64) and torch.all(out == 0)
    out.sum().backward()
    assert torch.all(q.grad == 0)


def test_return_lse_is_a_named_tuple_and_refused_by_sdpa():
    q, k, v = generate_qkv(1, 2, 2, 8, 8, 64)
    r = aa.attention(q, k, v, return_lse=True)
    assert isinstance(r, aa.AttentionOutput) and r.lse.shape == (1, 2, 8)
    assert aa.explain(q, k, v, return_lse=True).chosen == "eager"


def test_attention_weights_come_from_the_eager_path():
    q, k, v = generate_qkv(1, 2, 2, 8, 8, 64)
    out, w = aa.attention_with_weights(q, k, v, mask=aa.causal())
    assert w.shape == (1, 2, 8, 8) and torch.allclose(w.sum(-1), torch.ones(1, 2, 8))
    assert torch.all(w.triu(1) == 0)
    torch.testing.assert_close(out, aa.attention(q, k, v, mask=aa.causal()))


def test_dropout_is_applied_and_refused_where_unsupported():
    q, k, v = generate_qkv(1, 2, 2, 32, 32, 64)
    torch.manual_seed(0)
    a = aa.attention(q, k, v, dropout_p=0.5, backend="sdpa")
    assert not torch.allclose(a, aa.attention(q, k, v, backend="sdpa"))
    assert "no dropout" in str(aa.explain(q, k, v, dropout_p=0.5, backend="flex"))


def test_sdpa_refuses_float32_additive_terms_in_half_precision():
    """H200 fuzz finding: SDPA takes the bias in the input dtype, and rounding a float32 ALiBi
    bias to bf16 broke the accuracy rule (ALiBi, Sq=48, Sk=4: 10x eager's error)."""
    q, k, v = generate_qkv(1, 2, 2, 8, 8, 64, dtype=torch.bfloat16)
    d = aa.explain(q, k, v, score=aa.alibi(torch.rand(2)), backend="sdpa")
    assert d.chosen is None and "would be rounded to bfloat16" in d.rows[0].reason
    assert aa.explain(q, k, v, score=aa.bias(torch.randn(8, 8, dtype=torch.bfloat16)), backend="sdpa").chosen == "sdpa"


def test_lowered_mask_cache_is_bounded_in_bytes_not_only_in_entries():
    """A stream of new packings must not pin memory: each new documents() mask lowers to a dense
    (B, 1, S, S) mask for SDPA (1 GiB for a 32k-token row). On the H200 a count-bounded cache
    held 75 GiB of them during the ESM2 benchmark."""
    from anyattn._cache import LRU

    c = LRU(100, max_bytes=1000, nbytes=len)
    for i in range(10):
        c.put(i, b"x" * 300)
    assert len(c) == 3 and c.bytes == 900 and list(c._d) == [7, 8, 9]  # oldest evicted first
    c.put("big", b"x" * 1001)  # larger than the budget alone: not stored, nothing evicted
    assert c.get("big") is None and len(c) == 3
    c.put(9, b"x" * 100)  # replacing an entry releases its old size
    assert c.bytes == 700
    c.clear()
    assert c.bytes == 0 and len(c) == 0

    REGISTRY["sdpa"].cache.clear()
    budget = REGISTRY["sdpa"].cache.max_bytes
    q = torch.randn(1, 1, 64, 8)
    for i in range(3):
        aa.attention(q, q, q, mask=aa.documents([10 + i, 54 - i]), backend="sdpa")
    assert len(REGISTRY["sdpa"].cache) == 3 and 0 < REGISTRY["sdpa"].cache.bytes <= budget


def test_explain_full_false_stops_at_the_winner_like_attention():
    """Code that only needs the chosen backend asks with full=False: lower-ranked backends are not
    asked (some build their lowered form to answer, e.g. a dense mask for SDPA's kernel check)."""
    q = torch.randn(1, 2, 16, 8)
    d = aa.explain(q, q, q, mask=aa.documents([5, 11]), full=False)
    full = aa.explain(q, q, q, mask=aa.documents([5, 11]))
    assert d.chosen == full.chosen == "sdpa"
    statuses = {r.backend: r.status for r in d.rows}
    assert statuses["eager"] == statuses["flex"] == "not checked"
    assert {r.backend: r.status for r in full.rows}["eager"] == "accepted"
