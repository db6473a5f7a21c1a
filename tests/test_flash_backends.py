"""FlashAttention-family backends on CPU: argument mapping, plans, refusals, availability.

The kernels themselves are CUDA-only (flash_torch) or not installable here (flash,
kernels_flash). What runs on CPU: every pure mapping function, and the whole packing / unpacking
/ lse path of each backend with the kernel replaced by a float32 reference that follows
FlashAttention's documented conventions (bottom-right windows, (H, T) varlen lse, +inf lse on
rows with no key). So a mistake in our mapping shows up here; a mistake in the conventions
we assume shows up only in tests/test_cuda_flash.py.
"""

from __future__ import annotations

import re
import sys
import types

import pytest
import torch

import anyattn as aa
from anyattn.backends import REGISTRY, Refusal, flash, flash_torch
from anyattn.backends._varlen import lse_to_TH, map_window, packing_for, split_mask
from anyattn.backends.flash_torch import FlashTorchBackend, varlen_params
from anyattn.testing import generate_qkv, make_call, use_backend

# --------------------------------------------------------------------------------------------
# a reference of FlashAttention's semantics (CPU, float32), in its own conventions


def _ref_seq(q, k, v, scale, left, right, softcap=0.0, slopes=None):
    """One sequence: q (Lq, Hq, D), k/v (Lk, Hkv, D). FlashAttention window (-1 = unbounded),
    bottom-right aligned. Returns out (Lq, Hq, Dv) and lse (Hq, Lq), +inf on empty rows (FA2)."""
    Lq, Hq, _ = q.shape
    Lk, Hkv, _ = k.shape
    g = Hq // Hkv
    k = k.repeat_interleave(g, dim=1)
    v = v.repeat_interleave(g, dim=1)
    s = torch.einsum("qhd,khd->hqk", q.float(), k.float()) * scale
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    i = torch.arange(Lq).view(-1, 1) + (Lk - Lq)
    j = torch.arange(Lk).view(1, -1)
    if slopes is not None:
        s = s - slopes.float().view(-1, 1, 1) * (i - j).abs()
    vis = torch.ones(Lq, Lk, dtype=torch.bool)
    if left >= 0:
        vis &= j >= i - left
    if right >= 0:
        vis &= j <= i + right
    s = s.masked_fill(~vis, float("-inf"))
    empty = ~vis.any(-1)  # (Lq,)
    s = torch.where(empty.view(1, -1, 1), 0.0, s)
    lse = torch.logsumexp(s, -1)
    p = torch.softmax(s, -1)
    p = torch.where(empty.view(1, -1, 1), 0.0, p)
    out = torch.einsum("hqk,khd->qhd", p, v.float()).to(q.dtype)
    lse = torch.where(empty.view(1, -1), float("inf"), lse)
    return out, lse


class Recorder:
    def __init__(self):
        self.calls = []


def fake_varlen(*, gqa_flag: bool, recorder=None):
    """A varlen_attn stand-in; ``gqa_flag``: like torch 2.13 (enable_gqa required)."""

    def varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                    window_size=(-1, -1), enable_gqa=False):  # fmt: skip
        if recorder is not None:
            recorder.calls.append(dict(cu_q=cu_seq_q.tolist(), cu_k=cu_seq_k.tolist(), max_q=max_q, max_k=max_k,
                                       window_size=window_size, enable_gqa=enable_gqa, scale=scale, T=query.shape[0]))  # fmt: skip
        assert isinstance(window_size, tuple)
        assert cu_seq_q.dtype == torch.int32 and cu_seq_k.dtype == torch.int32
        if gqa_flag and query.shape[1] != key.shape[1]:
            assert enable_gqa, "torch 2.13 varlen_attn needs enable_gqa=True for Hq != Hkv"
        cq, ck = cu_seq_q.tolist(), cu_seq_k.tolist()
        assert max_q == max(b - a for a, b in zip(cq, cq[1:]))
        assert max_k == max(b - a for a, b in zip(ck, ck[1:]))
        sc = scale if scale is not None else query.shape[-1] ** -0.5
        outs, lses = [], []
        for n in range(len(cq) - 1):
            o, l = _ref_seq(query[cq[n] : cq[n + 1]], key[ck[n] : ck[n + 1]], value[ck[n] : ck[n + 1]], sc, *window_size)
            outs.append(o)
            lses.append(l)
        out = torch.cat(outs, 0)
        if return_aux is not None and return_aux.lse:
            return out, torch.cat(lses, 1)  # (H, T), like the FlashAttention kernel
        return out

    if not gqa_flag:  # torch 2.11's signature: no enable_gqa

        def varlen_attn_211(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                            window_size=(-1, -1)):  # fmt: skip
            return varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, return_aux=return_aux,
                               scale=scale, window_size=window_size)  # fmt: skip

        return varlen_attn_211
    return varlen_attn


def cpu_flash_torch(varlen=None, **kw) -> FlashTorchBackend:
    """flash_torch around a CPU reference kernel (torch 2.13 signature unless given)."""
    return FlashTorchBackend(varlen=varlen or fake_varlen(gqa_flag=True), cuda_only=False, **kw)


@pytest.fixture
def cpu_varlen():
    """flash_torch served by the CPU reference kernel (the supported seam: use_backend)."""
    rec = Recorder()
    with use_backend(cpu_flash_torch(fake_varlen(gqa_flag=True, recorder=rec))):
        yield rec


def run_flash_torch(call):
    return REGISTRY["flash_torch"].run(call)


def _call(q, k, v, mask=None, score=None, scale=None, dropout_p=0.0, return_lse=False):
    return make_call(q, k, v, mask=mask, score=score, scale=scale, dropout_p=dropout_p, return_lse=return_lse)


def _plan(call):
    return flash_torch.plan(call.sig)


def _packing(call, be=None):
    """The varlen metadata flash_torch builds for a call (its own values)."""
    be = be or cpu_flash_torch()
    p = flash_torch.plan(call.sig)
    return be.packing(call, split_mask(call.mask).seq, p.window != (-1, -1))


def _supports_portable(call, be=None):
    """flash_torch's answer with the device check left out (a CPU stand-in kernel)."""
    return (be or cpu_flash_torch()).supports(call.sig)


def _eager(q, k, v, **kw):
    return aa.attention(q, k, v, backend="eager", **kw)


def _check_against_eager(run, q, k, v, *, return_lse=True, **kw):
    """run(call) -> (out, lse) matches eager in float32, forward and backward; padding rows 0."""
    q, k, v = (t.detach().requires_grad_(True) for t in (q, k, v))
    out, lse = run(_call(q, k, v, return_lse=return_lse, **kw))
    ref = _eager(q, k, v, return_lse=return_lse, **kw)
    ref_out, ref_lse = (ref.out, ref.lse) if return_lse else (ref, None)
    torch.testing.assert_close(out, ref_out, atol=2e-5, rtol=1e-4)
    if return_lse:
        assert lse.shape == ref_lse.shape and lse.dtype == torch.float32
        assert torch.equal(torch.isneginf(lse), torch.isneginf(ref_lse)), "-inf rows differ"
        fin = torch.isfinite(ref_lse)
        torch.testing.assert_close(lse[fin], ref_lse[fin], atol=2e-5, rtol=1e-4)
    dout = torch.randn_like(out)
    g = torch.autograd.grad(out, (q, k, v), dout)
    gr = torch.autograd.grad(ref_out, (q, k, v), dout)
    for a, b in zip(g, gr):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, atol=5e-5, rtol=1e-4)


# --------------------------------------------------------------------------------------------
# window convention


@pytest.mark.parametrize(
    "mask, expected",
    [
        (None, (-1, -1)),
        (aa.causal(), (-1, 0)),
        (aa.sliding_window(3), (3, 0)),
        (aa.sliding_window(3, 2), (3, 2)),
        (aa.sliding_window(0, 0), (0, 0)),
        (aa.sliding_window(None, 5), (-1, 5)),
        (aa.sliding_window(4, None), (4, -1)),
    ],
)
def test_map_window_carries_numbers_over_and_none_is_minus_one(mask, expected):
    assert map_window(mask) == expected


def _fa_visible(Sq, Sk, left, right):
    """FlashAttention's documented window rule: query i sees keys in
    [i + Sk - Sq - left, i + Sk - Sq + right], -1 = unbounded on that side."""
    vis = torch.zeros(Sq, Sk, dtype=torch.bool)
    for i in range(Sq):
        c = i + Sk - Sq
        for j in range(Sk):
            vis[i, j] = (left < 0 or j >= c - left) and (right < 0 or j <= c + right)
    return vis


@pytest.mark.parametrize("Sq, Sk", [(7, 7), (3, 9), (9, 3)])
@pytest.mark.parametrize("left, right", [(None, 0), (2, 0), (2, 1), (0, 0), (None, 3), (1, None)])
def test_window_mapping_matches_flashattention_rule_bottom_right(Sq, Sk, left, right):
    """The mapped window selects exactly the pairs our Window selects, Sq != Sk included."""
    from anyattn.spec import Geometry, materialize_mask

    w = aa.sliding_window(left, right)
    geo = Geometry(1, 1, Sq, Sk, torch.device("cpu"))
    ours = materialize_mask(w.bind(geo), geo)[0, 0]
    assert torch.equal(ours, _fa_visible(Sq, Sk, *map_window(w)))


def test_hf_sliding_window_is_one_more_than_ours():
    """HF sliding_window=W sees W keys including itself = our sliding_window(W - 1) = FA (W-1, 0)."""
    W = 4
    vis = _fa_visible(10, 10, *map_window(aa.sliding_window(W - 1)))
    assert int(vis[9].sum()) == W
    assert flash.causal_and_window(aa.sliding_window(W - 1)) == (False, (W - 1, 0))
    assert flash.causal_and_window(aa.causal()) == (True, (-1, -1))
    assert flash.causal_and_window(None) == (False, (-1, -1))


# --------------------------------------------------------------------------------------------
# flash_torch plans


def _qkv(B=2, Hq=4, Hkv=None, Sq=16, Sk=None, D=64, dtype=torch.float32, **kw):
    return generate_qkv(B, Hq, Hkv, Sq, Sk, D, dtype=dtype, **kw)


def test_plan_dense_and_causal_use_sdpa_flash_unless_lse():
    q, k, v = _qkv()
    assert _plan(_call(q, k, v)) == ("sdpa", "dense", (-1, -1), False, None)
    assert _plan(_call(q, k, v, aa.causal())) == ("sdpa", "causal", (-1, 0), True, None)
    p = _plan(_call(q, k, v, aa.causal(), return_lse=True))
    assert (p.route, p.window, p.seq) == ("varlen", (-1, 0), None)
    assert _plan(_call(q, k, v, return_lse=True)).route == "varlen"


def test_plan_causal_with_sq_ne_sk_uses_varlen_bottom_right():
    """SDPA's is_causal is top-left aligned; varlen's (-1, 0) is bottom-right like ours."""
    q, k, v = _qkv(Sq=5, Sk=12)
    p = _plan(_call(q, k, v, aa.causal()))
    assert (p.route, p.kind, p.window, p.is_causal) == ("varlen", "causal", (-1, 0), False)


def test_plan_window_on_dense_rows_uses_varlen():
    q, k, v = _qkv()
    p = _plan(_call(q, k, v, aa.sliding_window(3, 1)))
    assert (p.route, p.kind, p.window, p.seq) == ("varlen", "window", (3, 1), None)


def test_plan_documents_drops_zero_length_docs_and_knows_max_on_host():
    q, k, v = _qkv(B=1, Sq=20)
    call = _call(q, k, v, aa.documents([5, 0, 1, 11]))  # 3 tokens of padding
    p, pk = _plan(call), _packing(call)
    assert (p.route, p.kind) == ("varlen", "documents")
    assert pk.cu.tolist() == [0, 5, 6, 17]
    assert pk.cu.dtype == torch.int32
    assert (pk.max_seqlen, pk.total, pk.route) == (11, 17, "slice")
    assert isinstance(pk.max_seqlen, int)


def test_plan_documents_shared_by_batch_rows_and_per_row():
    q, k, v = _qkv(B=2, Sq=10)
    pk = _packing(_call(q, k, v, aa.documents([4, 6])))
    assert pk.cu.tolist() == [0, 4, 10, 14, 20] and pk.route == "reshape"
    pk = _packing(_call(q, k, v, aa.documents([[4, 6], [2, 3, 1]])))
    assert pk.cu.tolist() == [0, 4, 10, 12, 15, 16] and pk.route == "gather"
    assert pk.info.indices.tolist() == list(range(10)) + list(range(10, 16))


def test_plan_documents_and_window():
    q, k, v = _qkv(B=1, Sq=10)
    p = _plan(_call(q, k, v, aa.documents([4, 6]) & aa.sliding_window(2)))
    assert (p.kind, p.window) == ("documents", (2, 0))
    p = _plan(_call(q, k, v, aa.documents([4, 6]) & aa.causal()))
    assert (p.kind, p.window) == ("documents", (-1, 0))


def test_plan_padding_keep_mask_and_lengths():
    q, k, v = _qkv(B=3, Sq=6)
    keep = torch.tensor([[1, 1, 1, 0, 0, 0], [0, 0, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0]], dtype=torch.bool)
    call = _call(q, k, v, aa.padding(mask=keep) & aa.causal())
    p, pk = _plan(call), _packing(call)
    assert (p.kind, p.window) == ("padding", (-1, 0))
    assert pk.cu.tolist() == [0, 3, 7]  # the empty row is left out
    assert pk.max_seqlen == 4
    pk = _packing(_call(q, k, v, aa.padding(torch.tensor([2, 6, 0]))))
    assert pk.cu.tolist() == [0, 2, 8]


def test_plan_reuses_the_seqinfo_a_term_came_from():
    info = aa.SeqInfo.from_lengths([[3, 5], [6]], total_length=8)
    q, k, v = _qkv(B=2, Sq=8)
    pk = _packing(_call(q, k, v, aa.documents(info)))
    assert pk.route == "gather" and pk.info is info
    assert pk.cu.tolist() == [0, 3, 8, 14]
    assert pk.cu is info.varlen()[0]  # built once per SeqInfo


def test_packing_is_built_once_per_content_key():
    """A repeated mask does not rebuild its varlen metadata; new lengths do (and nothing else)."""
    be = cpu_flash_torch()
    q, k, v = _qkv(B=1, Sq=10, dtype=torch.bfloat16)
    with use_backend(be):
        for _ in range(3):
            aa.attention(q, k, v, mask=aa.documents([4, 6]), backend="flash_torch")
        assert be.stats["packings_built"] == 1
        aa.attention(q, k, v, mask=aa.documents([5, 5]), backend="flash_torch")
        assert be.stats["packings_built"] == 2


def test_padding_with_holes_and_window_is_refused():
    """A hole inside a row would shrink window distances after packing: refused from the
    SeqInfo's host flag when the term carries one, else when the keep-mask is read (auto then
    takes the next backend; an explicit request raises)."""
    q, k, v = _qkv(B=1, Sq=6, dtype=torch.bfloat16)
    keep = torch.tensor([[1, 1, 0, 1, 1, 0]], dtype=torch.bool)
    info = aa.SeqInfo.from_padding_mask(keep)
    assert info.contiguous is False
    why = _plan(_call(q, k, v, aa.padding(info) & aa.sliding_window(1)))
    assert isinstance(why, str) and "holes" in why
    with pytest.raises(Refusal, match="holes"):
        _packing(_call(q, k, v, aa.padding(mask=keep) & aa.sliding_window(1)))
    with use_backend(cpu_flash_torch()):
        with pytest.raises(aa.UnsupportedError, match="holes"):
            aa.attention(q, k, v, mask=aa.padding(mask=keep) & aa.sliding_window(1), backend="flash_torch")
        out = aa.attention(q, k, v, mask=aa.padding(mask=keep) & aa.sliding_window(1), backend=["flash_torch", "eager"])
        ref = aa.attention(q, k, v, mask=aa.padding(mask=keep) & aa.sliding_window(1), backend="eager")
        assert torch.equal(out, ref)
    # without a window, holes do not matter
    assert _plan(_call(q, k, v, aa.padding(mask=keep))).kind == "padding"


# --------------------------------------------------------------------------------------------
# flash_torch refusals


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(dtype=torch.float32), "float16/bfloat16, got torch.float32"),
        (dict(dtype=torch.float64), "float16/bfloat16, got torch.float64"),
        (dict(D=264), "head dim <= 256"),
        (dict(D=60), "multiple of 8"),
    ],
)
def test_flash_torch_refuses_dtype_and_head_dim(kw, match):
    dtype = kw.pop("dtype", torch.bfloat16)
    q, k, v = _qkv(dtype=dtype, **kw)
    assert match in _supports_portable(_call(q, k, v))


def test_flash_torch_refuses_cpu_tensors():
    q, k, v = _qkv(dtype=torch.bfloat16)
    assert "needs CUDA tensors, got cpu" in REGISTRY["flash_torch"].supports(_call(q, k, v).sig)


def test_flash_torch_refuses_unequal_v_head_dim():
    q, k, v = generate_qkv(1, 2, 2, 8, 8, 64, Dv=32, dtype=torch.bfloat16)
    assert "D=64, Dv=32" in _supports_portable(_call(q, k, v))


@pytest.mark.parametrize(
    "mask, score, dropout, match",
    [
        (None, aa.softcap(30.0), 0.0, "score terms (softcap(30.0))"),
        (None, aa.alibi(torch.ones(4)), 0.0, "score terms (alibi"),
        (aa.causal(), None, 0.1, "no dropout"),
        (aa.prefix_lm(3), None, 0.0, "prefix_lm(3) is not expressible"),
        (aa.chunked(4), None, 0.0, "chunked(4) is not expressible"),
        (aa.causal() | aa.chunked(4), None, 0.0, "is not expressible"),
        (aa.causal() & ~aa.sliding_window(2), None, 0.0, "is not expressible"),
        (aa.dense(torch.ones(16, 16, dtype=torch.bool)), None, 0.0, "is not expressible"),
        (aa.documents([8, 8]) & aa.padding(torch.tensor([16, 10])), None, 0.0, "one sequence structure"),
    ],
)
def test_flash_torch_refuses_what_it_cannot_compute_exactly(mask, score, dropout, match):
    q, k, v = _qkv(dtype=torch.bfloat16)
    assert match in _supports_portable(_call(q, k, v, mask, score, dropout_p=dropout))


def test_flash_torch_refuses_documents_with_sq_ne_sk():
    q, k, v = _qkv(Sq=8, Sk=16, dtype=torch.bfloat16)
    assert "needs Sq == Sk" in _supports_portable(_call(q, k, v, aa.documents([8, 8])))


def test_flash_torch_refuses_window_where_varlen_has_no_window_size():
    """Older torch releases' varlen_attn has no window_size: say which torch."""

    def old_varlen(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, is_causal=False, return_aux=None):
        raise AssertionError("not called")

    def older_varlen(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, is_causal=False):
        raise AssertionError("not called")

    be = cpu_flash_torch(old_varlen)
    q, k, v = _qkv(dtype=torch.bfloat16)
    why = _supports_portable(_call(q, k, v, aa.sliding_window(3)), be)
    assert "no window_size" in why and torch.__version__ in why
    # causal still works there through is_causal; return_lse needs return_aux, which it has
    assert _supports_portable(_call(q, k, v, aa.documents([8, 8]) & aa.causal()), be) is None
    assert "no return_aux" in _supports_portable(_call(q, k, v, return_lse=True), cpu_flash_torch(older_varlen))


def test_flash_torch_accepts_the_supported_variants_in_bf16_and_fp16():
    for dtype in (torch.bfloat16, torch.float16):
        q, k, v = _qkv(B=2, Hq=8, Hkv=2, Sq=16, dtype=dtype)
        keep = torch.ones(2, 16, dtype=torch.bool)
        keep[1, :5] = False
        for mask in (None, aa.causal(), aa.sliding_window(3), aa.sliding_window(3, 2), aa.documents([3, 0, 1, 10]),
                     aa.padding(mask=keep), aa.documents([8, 8]) & aa.sliding_window(2), aa.padding(mask=keep) & aa.causal()):  # fmt: skip
            assert _supports_portable(_call(q, k, v, mask, return_lse=True)) is None, mask


# --------------------------------------------------------------------------------------------
# availability and explicit requests


def test_flash_torch_availability_on_this_machine_names_the_reason():
    why = REGISTRY["flash_torch"].available()
    if torch.cuda.is_available():
        pytest.skip("CUDA machine")
    assert "needs a CUDA GPU" in why


def test_flash_torch_says_when_torch_has_no_varlen(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.nn.attention.varlen", None)  # import raises ImportError
    why = FlashTorchBackend().available()
    assert "has no torch.nn.attention.varlen" in why and torch.__version__ in why


def test_explicit_flash_torch_on_cpu_raises_unsupported_with_the_reason():
    q, k, v = _qkv(dtype=torch.bfloat16)
    with pytest.raises(aa.UnsupportedError, match="flash_torch: unavailable: needs a CUDA GPU"):
        aa.attention(q, k, v, mask=aa.causal(), backend="flash_torch")


@pytest.mark.parametrize("name, match", [("flash", r"pip install anyattn\[flash\]"), ("kernels_flash", r"pip install anyattn\[kernels\]")])
def test_package_backends_say_how_to_install(name, match, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n.split(".")[0] in ("flash_attn", "flash_attn_interface", "kernels") else real(n, *a))
    why = REGISTRY[name].available()
    assert why is not None and re.search(match, why)


def test_auto_never_picks_unavailable_flash_backends_on_cpu():
    q, k, v = _qkv(dtype=torch.float32)
    d = aa.explain(q, k, v, mask=aa.causal())
    rows = {r.backend: r.status for r in d.rows}
    for name in ("flash_torch", "flash", "kernels_flash"):
        assert rows[name] in ("unavailable", "not checked")
    assert d.chosen not in ("flash_torch", "flash", "kernels_flash")


def test_backend_enum_has_the_flash_family():
    assert aa.Backend("flash_torch") is aa.Backend.FLASH_TORCH
    assert aa.Backend.FLASH.value == "flash" and aa.Backend.KERNELS_FLASH.value == "kernels_flash"


# --------------------------------------------------------------------------------------------
# flash_torch end to end on CPU with the reference kernel


def _keep_lr(B, S):
    keep = torch.ones(B, S, dtype=torch.bool)
    keep[0, S - 3 :] = False  # right padding
    if B > 1:
        keep[1, :4] = False  # left padding
    return keep


CASES = {
    "dense": lambda B, S: dict(),
    "causal": lambda B, S: dict(mask=aa.causal()),
    "window": lambda B, S: dict(mask=aa.sliding_window(3)),
    "window_lr": lambda B, S: dict(mask=aa.sliding_window(3, 2)),
    "documents": lambda B, S: dict(mask=aa.documents([S // 3, 0, 1, S - S // 3 - 3])),
    "documents_causal": lambda B, S: dict(mask=aa.documents([S // 3, 0, 1, S - S // 3 - 3]) & aa.causal()),
    "documents_window": lambda B, S: dict(mask=aa.documents([S // 3, S - S // 3]) & aa.sliding_window(4)),
    "documents_per_row": lambda B, S: dict(mask=aa.documents([[S - 2, 1], [1, 2, S - 5]][:B])),
    "padding": lambda B, S: dict(mask=aa.padding(mask=_keep_lr(B, S))),
    "padding_causal": lambda B, S: dict(mask=aa.padding(mask=_keep_lr(B, S)) & aa.causal()),
    "padding_window": lambda B, S: dict(mask=aa.padding(mask=_keep_lr(B, S)) & aa.sliding_window(2, 1)),
    "padding_lengths": lambda B, S: dict(mask=aa.padding(torch.tensor([S, 0, 5][:B]))),
    "all_padding": lambda B, S: dict(mask=aa.documents([0])),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("heads", [(4, 4), (4, 2), (4, 1)], ids=["mha", "gqa", "mqa"])
def test_flash_torch_packing_path_matches_eager(case, heads, cpu_varlen):
    Hq, Hkv = heads
    B, S = 2, 17
    q, k, v = generate_qkv(B, Hq, Hkv, S, S, 16, layout="bshd", seed=3)
    _check_against_eager(run_flash_torch, q, k, v, **CASES[case](B, S))


@pytest.mark.parametrize("Sq, Sk", [(5, 12), (12, 5)])
@pytest.mark.parametrize("mask", [aa.causal(), aa.sliding_window(2), None], ids=["causal", "window", "none"])
def test_flash_torch_sq_ne_sk_is_bottom_right(Sq, Sk, mask, cpu_varlen):
    """Rows that see no key (Sq > Sk, causal) give 0 and -inf, not FA2's +inf."""
    q, k, v = generate_qkv(2, 4, 2, Sq, Sk, 16, seed=4)
    _check_against_eager(run_flash_torch, q, k, v, mask=mask)


def test_flash_torch_torch_211_signature_has_no_enable_gqa():
    """On torch 2.11 GQA goes to the kernel natively (no enable_gqa keyword to pass)."""
    fn = fake_varlen(gqa_flag=False)
    assert "enable_gqa" not in varlen_params(fn)
    q, k, v = generate_qkv(1, 4, 2, 12, 12, 16, seed=5)
    with use_backend(cpu_flash_torch(fn)):
        _check_against_eager(run_flash_torch, q, k, v, mask=aa.documents([5, 7]) & aa.causal())


def test_flash_torch_passes_host_ints_and_the_mapped_window(cpu_varlen):
    q, k, v = generate_qkv(1, 4, 2, 20, 20, 16, seed=6)
    run_flash_torch(_call(q, k, v, aa.documents([5, 0, 1, 11]) & aa.sliding_window(3)))
    (c,) = cpu_varlen.calls
    assert c["cu_q"] == c["cu_k"] == [0, 5, 6, 17]
    assert (c["max_q"], c["max_k"], c["T"]) == (11, 11, 17)
    assert c["window_size"] == (3, 0) and c["enable_gqa"] is True
    assert c["scale"] == pytest.approx(16**-0.5)


def test_flash_torch_sdpa_route_on_cpu_matches_eager():
    """The SDPA route (dense / causal with Sq == Sk), with CPU's SDPA standing in."""
    with use_backend(cpu_flash_torch(sdpa_kernel="math")):
        for mask in (None, aa.causal()):
            q, k, v = generate_qkv(2, 4, 2, 9, 9, 16, seed=7)
            _check_against_eager(run_flash_torch, q, k, v, return_lse=False, mask=mask, scale=0.3)


def test_lse_layouts_are_both_understood():
    lse_HT = torch.tensor([[1.0, 2.0, float("inf")], [4.0, 5.0, 6.0]])  # H=2, T=3
    got = lse_to_TH(lse_HT, 3, 2)
    assert got.shape == (3, 2) and got[2, 0] == float("-inf") and got[1, 1] == 5.0
    assert torch.equal(lse_to_TH(lse_HT.t(), 3, 2), got)
    with pytest.raises(RuntimeError, match="lse of shape"):
        lse_to_TH(torch.zeros(4, 4), 3, 2)


# --------------------------------------------------------------------------------------------
# flash / kernels_flash: argument mapping


def _impl(version, func=None, varlen=None, func_params=None, varlen_params=None):
    fp = frozenset(func_params) if func_params is not None else frozenset()
    vp = frozenset(varlen_params) if varlen_params is not None else frozenset()
    return flash.Impl(version, f"fake FA{version}", func or (lambda *a, **k: None), varlen or (lambda *a, **k: None), fp, vp)


FA2_FUNC = ("q", "k", "v", "dropout_p", "softmax_scale", "causal", "window_size", "softcap", "alibi_slopes",
            "deterministic", "return_attn_probs")  # fmt: skip
FA2_VARLEN = ("q", "k", "v", "cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q", "max_seqlen_k") + FA2_FUNC[3:] + ("block_table",)
FA3_FUNC = ("q", "k", "v", "softmax_scale", "causal", "qv", "q_descale", "k_descale", "v_descale", "window_size",
            "attention_chunk", "softcap", "num_splits", "pack_gqa", "deterministic", "sm_margin", "return_attn_probs")  # fmt: skip
FA3_VARLEN = ("q", "k", "v", "cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q", "max_seqlen_k", "seqused_q", "seqused_k") + FA3_FUNC[3:]
FA2 = _impl(2, func_params=FA2_FUNC, varlen_params=FA2_VARLEN)
FA3 = _impl(3, func_params=FA3_FUNC, varlen_params=FA3_VARLEN)


def test_flash_plan_dense_causal_window():
    q, k, v = _qkv(dtype=torch.bfloat16)
    p = flash.plan(_call(q, k, v, scale=0.5), FA2)
    assert (p.route, p.kind) == ("func", "dense")
    assert p.kwargs == {"softmax_scale": 0.5, "causal": False, "window_size": (-1, -1)}
    p = flash.plan(_call(q, k, v, aa.causal()), FA3)
    assert p.kwargs["causal"] is True and p.kwargs["window_size"] == (-1, -1) and p.kind == "causal"
    p = flash.plan(_call(q, k, v, aa.sliding_window(7, 1)), FA2)
    assert p.kwargs["causal"] is False and p.kwargs["window_size"] == (7, 1) and p.kind == "window"


def test_flash_plan_softcap_alibi_dropout_lse():
    q, k, v = _qkv(Hq=4, dtype=torch.bfloat16)
    p = flash.plan(_call(q, k, v, aa.causal(), aa.softcap(30.0), return_lse=True), FA3)
    assert p.kwargs["softcap"] == 30.0 and p.kwargs["return_attn_probs"] is True
    slopes = torch.tensor([0.5, 0.25, 0.125, 0.0625], dtype=torch.float64)
    p = flash.plan(_call(q, k, v, None, aa.alibi(slopes), dropout_p=0.1), FA2)
    assert p.kwargs["alibi_slopes"].dtype == torch.float32 and p.kwargs["alibi_slopes"].shape == (4,)
    assert p.kwargs["dropout_p"] == 0.1


@pytest.mark.parametrize(
    "kw, impl, match",
    [
        (dict(score=aa.alibi(torch.ones(4))), "FA3", "has no alibi_slopes"),
        (dict(dropout_p=0.1), "FA3", "has no dropout"),
        (dict(score=aa.softcap(5.0), dropout_p=0.1), "FA2", "softcap with dropout"),
        (dict(score=aa.score_fn(lambda s, b, h, q, kv: s)), "FA2", "not expressible in flash-attn"),
        (dict(score=aa.bias(torch.zeros(16, 16))), "FA2", "not expressible in flash-attn"),
        (dict(score=[aa.softcap(5.0), aa.alibi(torch.ones(4))]), "FA2", "softcap and alibi together"),
        (dict(mask=aa.prefix_lm(2)), "FA2", "not expressible in FlashAttention"),
    ],
)
def test_flash_plan_refusals(kw, impl, match):
    q, k, v = _qkv(Hq=4, dtype=torch.bfloat16)
    why = flash.plan(_call(q, k, v, **kw), {"FA2": FA2, "FA3": FA3}[impl])
    assert isinstance(why, str) and match in why


def test_flash_plan_old_build_without_softcap_is_refused_not_silently_dropped():
    old = _impl(2, func_params=[p for p in FA2_FUNC if p != "softcap"], varlen_params=FA2_VARLEN)
    q, k, v = _qkv(dtype=torch.bfloat16)
    assert "no 'softcap' argument" in flash.plan(_call(q, k, v, score=aa.softcap(5.0)), old)
    p = flash.plan(_call(q, k, v), old)  # softcap at its default: simply not passed
    assert "softcap" not in p.kwargs


def test_flash_plan_documents_and_padding_use_varlen_metadata():
    q, k, v = _qkv(B=1, Sq=12, dtype=torch.bfloat16)
    call = _call(q, k, v, aa.documents([3, 0, 9]) & aa.causal())
    p = flash.plan(call, FA2)
    assert (p.route, p.kind, p.kwargs["causal"]) == ("varlen", "documents", True)
    pk = packing_for(call, p.seq, p.positional)
    assert pk.cu.tolist() == [0, 3, 12] and pk.max_seqlen == 9
    keep = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    call = _call(q, k, v, aa.padding(mask=keep) & aa.sliding_window(2))
    p = flash.plan(call, FA3)
    assert p.kind == "padding" and p.kwargs["window_size"] == (2, 0)
    assert packing_for(call, p.seq, p.positional).cu.tolist() == [0, 10]


def test_flash_supports_refuses_cpu_fp32_and_big_head_dim():
    q, k, v = _qkv(dtype=torch.float32)
    assert "needs CUDA tensors" in flash.flash_backend().supports(_call(q, k, v).sig)
    assert "float16/bfloat16" in flash.supports_with(_call(q, k, v).sig, FA2)
    q, k, v = _qkv(D=512, dtype=torch.bfloat16)
    assert "head dim <= 256" in flash.supports_with(_call(q, k, v).sig, FA2)


def _fake_fa_func(version):
    def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                        alibi_slopes=None, deterministic=False, return_attn_probs=False):  # fmt: skip
        B, Sq, Hq, _ = q.shape
        Sk = k.shape[1]
        left, right = (-1, 0) if causal else window_size
        outs, lses = [], []
        for b in range(B):
            o, l = _ref_seq(q[b], k[b], v[b], softmax_scale, left, right, softcap, alibi_slopes)
            outs.append(o)
            lses.append(l)
        out = torch.stack(outs)
        if return_attn_probs or version == 3:
            return (out, torch.stack(lses), None) if version == 2 else (out, torch.stack(lses))
        return out

    return flash_attn_func


def _fake_fa_varlen(version):
    def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                               softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                               deterministic=False, return_attn_probs=False):  # fmt: skip
        cq = cu_seqlens_q.tolist()
        left, right = (-1, 0) if causal else window_size
        outs, lses = [], []
        for n in range(len(cq) - 1):
            a, b = cq[n], cq[n + 1]
            o, l = _ref_seq(q[a:b], k[a:b], v[a:b], softmax_scale, left, right, softcap, alibi_slopes)
            outs.append(o)
            lses.append(l)
        out = torch.cat(outs)
        if return_attn_probs:
            return (out, torch.cat(lses, 1), None) if version == 2 else (out, torch.cat(lses, 1))
        return out

    return flash_attn_varlen_func


@pytest.mark.parametrize("version", [2, 3])
@pytest.mark.parametrize(
    "case",
    ["dense", "causal", "window_lr", "documents_causal", "documents_window", "padding_window", "all_padding", "softcap", "alibi"],
)
def test_flash_run_with_reference_kernels_matches_eager(version, case):
    """Transposes, packing and lse handling of the flash backends, with a reference kernel."""
    if case == "alibi" and version == 3:
        pytest.skip("FA3 has no alibi")
    f, vf = _fake_fa_func(version), _fake_fa_varlen(version)
    impl = flash.Impl(version, f"ref FA{version}", f, vf, flash._params(f), flash._params(vf))
    B, S, H = 2, 17, 4
    if case == "softcap":
        kw = dict(mask=aa.causal(), score=aa.softcap(2.0))
    elif case == "alibi":
        kw = dict(mask=aa.causal(), score=aa.alibi(torch.tensor([0.5, 0.25, 0.125, 0.0625])))
    else:
        kw = CASES[case](B, S)
    q, k, v = generate_qkv(B, H, 2, S, S, 16, layout="bshd", seed=8)
    be = flash.FlashPackageBackend("flash", ("flash_attn",), flash.FLASH_INSTALL, lambda: impl, cuda_only=False)
    _check_against_eager(be.run, q, k, v, **kw)


# --------------------------------------------------------------------------------------------
# kernels_flash: loading and API variant detection


def test_kernels_flash_falls_back_to_flash_attn2_and_detects_the_api(monkeypatch):
    tried = []
    good = types.SimpleNamespace(flash_attn_func=_fake_fa_func(2), flash_attn_varlen_func=_fake_fa_varlen(2))

    def get_kernel(repo):
        tried.append(repo)
        if repo.endswith("flash-attn3"):
            raise OSError("no build for this torch/CUDA")
        return good

    monkeypatch.setitem(sys.modules, "kernels", types.SimpleNamespace(get_kernel=get_kernel))
    monkeypatch.setenv("ANYATTN_CUDA_CAPABILITY", "9.0")  # the supported override of the hardware probe
    flash._is_hopper.cache_clear()
    flash._load_kernels.cache_clear()
    try:
        impl = REGISTRY["kernels_flash"].impl()
        assert tried == ["kernels-community/flash-attn3", "kernels-community/flash-attn2"]
        assert impl.version == 2 and impl.source == "kernels-community/flash-attn2"
        assert "softcap" in impl.func_params
    finally:
        flash._load_kernels.cache_clear()
        flash._is_hopper.cache_clear()


def test_kernels_flash_unrecognized_module_says_what_it_has(monkeypatch):
    raw = types.SimpleNamespace(mha_fwd=lambda: None, mha_varlen_fwd=lambda: None)
    monkeypatch.setitem(sys.modules, "kernels", types.SimpleNamespace(get_kernel=lambda repo: raw))
    monkeypatch.setenv("ANYATTN_CUDA_CAPABILITY", "8.0")
    flash._is_hopper.cache_clear()
    flash._load_kernels.cache_clear()
    try:
        why = REGISTRY["kernels_flash"].impl()
        assert isinstance(why, str) and "unrecognized API" in why and "mha_fwd" in why
    finally:
        flash._load_kernels.cache_clear()
        flash._is_hopper.cache_clear()


@pytest.mark.parametrize("heads_first", [True, False], ids=["lse_HT", "lse_TH"])
def test_flash_torch_learns_the_lse_layout_when_the_shape_cannot_tell(heads_first):
    """T == H: a (T, H) lse read as (H, T) would be silently transposed; a probe call decides."""
    base = fake_varlen(gqa_flag=True)

    def varlen_attn(*a, return_aux=None, scale=None, window_size=(-1, -1), enable_gqa=False):
        r = base(*a, return_aux=return_aux, scale=scale, window_size=window_size, enable_gqa=enable_gqa)
        if return_aux is not None and not heads_first:
            return r[0], r[1].t().contiguous()
        return r

    q, k, v = generate_qkv(1, 4, 4, 4, 4, 16, seed=9)  # T = 4 tokens, H = 4 heads
    with use_backend(cpu_flash_torch(varlen_attn)) as be:
        _check_against_eager(run_flash_torch, q, k, v, mask=aa.causal())
        assert be._lse_heads_first is heads_first


def test_flash_torch_refuses_windows_with_a_right_extent_when_sq_exceeds_sk():
    """H200 fuzz finding: varlen_attn's window with right > 0 and Sq > Sk disagreed with the
    bottom-right definition (sliding_window(3, 57), Sq=35, Sk=22: error 1.4)."""
    q, k, v = generate_qkv(1, 2, 2, 12, 5, 16)
    why = _plan(_call(q, k, v, aa.sliding_window(3, 4)))
    assert isinstance(why, str) and "Sq=12 > Sk=5" in why
    assert not isinstance(_plan(_call(q, k, v, aa.sliding_window(3))), str)
