"""Learnable attention sinks, ``sink(logits)``, on CPU: semantics against an independent float64
reference (the extra softmax column of GPT-OSS's eager attention), forward and backward (the sink
logits get gradients), the exact combination ``out * sigmoid(lse - sink)`` that the lse backends
use, and the refusals of the backends that can do neither."""

from __future__ import annotations

import pytest
import torch

import anyattn as aa
from anyattn.backends import flash_torch
from anyattn.testing import compare_to_oracle, generate_qkv, make_call, record_calls, use_backend

from .test_flash_backends import cpu_flash_torch


def _column_reference(q, k, v, sink, vis, scale):
    """float64: logits, masked, then one more column per head holding the sink logit; softmax;
    the column is dropped before ``@ v`` (GPT-OSS's eager_attention_forward)."""
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    s = (q @ k.transpose(-1, -2)) * scale
    s = s.masked_fill(~vis, float("-inf"))
    col = sink.view(1, -1, 1, 1).expand(*s.shape[:-1], 1)
    full = torch.cat([s, col], -1)
    p = torch.softmax(full, -1)[..., :-1]
    return p @ v, torch.logsumexp(full, -1)


def _f64(*ts):
    return [t.detach().double().requires_grad_(True) for t in ts]


CASES = [
    # (B, Hq, Hkv, Sq, Sk, mask)
    (2, 4, 4, 9, 9, "causal"),
    (1, 4, 2, 5, 12, "causal"),  # decode-like, GQA, bottom-right
    (2, 4, 1, 11, 11, "documents_tail"),  # rows past the documents see no key
    (1, 2, 2, 7, 7, None),
]


def _mask(kind, B, Sq, Sk):
    """(term, visible (B or 1, 1, Sq, Sk) bool) written independently of the terms."""
    i = torch.arange(Sq).view(-1, 1) + (Sk - Sq)
    j = torch.arange(Sk).view(1, -1)
    if kind is None:
        return None, torch.ones(1, 1, Sq, Sk, dtype=torch.bool)
    if kind == "causal":
        return aa.causal(), (j <= i)[None, None]
    docs = torch.tensor([0] * 4 + [1] * 5 + [-1] * (Sk - 9))
    vis = (docs.view(-1, 1) == docs.view(1, -1)) & (docs.view(-1, 1) >= 0)
    return aa.documents([4, 5]), vis[None, None]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}x{c[1]}/{c[2]}-{c[3]}x{c[4]}-{c[5]}")
def test_eager_sink_equals_the_extra_column_forward_and_backward(case):
    B, Hq, Hkv, Sq, Sk, kind = case
    q, k, v = generate_qkv(B, Hq, Hkv, Sq, Sk, 16, dtype=torch.float64, seed=3)
    logits = torch.randn(Hq, dtype=torch.float64, generator=torch.Generator().manual_seed(5)) * 2
    mask, vis = _mask(kind, B, Sq, Sk)
    ours = _f64(q, k, v, logits)
    ref = _f64(q, k, v, logits)
    o, lse = aa.attention(*ours[:3], mask=mask, score=aa.sink(ours[3]), backend="eager", return_lse=True)
    ro, rlse = _column_reference(*ref[:3], ref[3], vis, 16**-0.5)
    torch.testing.assert_close(o, ro, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(lse, rlse, atol=1e-12, rtol=1e-10)
    dout = torch.randn(o.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    g = torch.autograd.grad((o * dout).sum() + lse.sum(), ours)
    rg = torch.autograd.grad((ro * dout).sum() + rlse.sum(), ref)
    for name, a, b in zip(("dq", "dk", "dv", "dsink"), g, rg):
        torch.testing.assert_close(a, b, atol=1e-11, rtol=1e-9, msg=name)
    assert g[3].abs().sum() > 0


def test_rows_without_keys_output_zero_and_their_lse_is_the_sink():
    q, k, v = generate_qkv(1, 2, 2, 6, 6, 16, dtype=torch.float64)
    logits = torch.tensor([0.5, -1.0], dtype=torch.float64, requires_grad=True)
    o, lse = aa.attention(q, k, v, mask=aa.documents([3]), score=aa.sink(logits), backend="eager", return_lse=True)
    assert torch.equal(o[:, :, 3:], torch.zeros_like(o[:, :, 3:]))
    assert torch.equal(lse[0, :, 3:], logits.detach().view(2, 1).expand(2, 3))
    (o.sum() + lse[..., :3].sum()).backward()
    assert torch.isfinite(logits.grad).all()


def test_combination_through_the_lse_is_exact_forward_and_backward():
    """What flex, flash_torch and flash do: plain attention (out, lse), then
    ``Sink.combine`` = out * sigmoid(lse - sink), lse' = logaddexp(lse, sink). Equal to eager's
    own denominator in float64, gradients (through the lse) included."""
    q, k, v = generate_qkv(2, 4, 2, 8, 13, 16, dtype=torch.float64, seed=11)
    logits = torch.randn(4, dtype=torch.float64) * 3
    mask = aa.causal() & aa.sliding_window(4)
    a = _f64(q, k, v, logits)
    b = _f64(q, k, v, logits)
    o, lse = aa.attention(*a[:3], mask=mask, score=aa.sink(a[3]), backend="eager", return_lse=True)
    plain = aa.attention(*b[:3], mask=mask, backend="eager", return_lse=True)
    co, clse = aa.sink(b[3]).combine(plain.out, plain.lse)
    torch.testing.assert_close(co, o, atol=1e-13, rtol=1e-11)
    torch.testing.assert_close(clse, lse, atol=1e-13, rtol=1e-11)
    dout = torch.randn(o.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    ga = torch.autograd.grad((o * dout).sum() + lse.sum(), a)
    gb = torch.autograd.grad((co * dout).sum() + clse.sum(), b)
    for x, y in zip(ga, gb):
        torch.testing.assert_close(x, y, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_eager_with_sink_meets_the_tolerance_rule_including_dsink(dtype):
    q, k, v = generate_qkv(2, 4, 2, 17, 17, 32, dtype=dtype, seed=4)
    logits = torch.randn(4).to(dtype).requires_grad_(True)
    comps = compare_to_oracle(q, k, v, backend="eager", return_lse=True, mask=aa.causal(), score=[aa.softcap(5.0), aa.sink(logits)])
    names = [c.name for c in comps]
    assert names == ["out", "lse", "dq", "dk", "dv", "dsink(tensor(4,))"], names
    assert all(c.ok for c in comps), [str(c) for c in comps]


def test_flash_torch_combines_sinks_through_the_varlen_lse():
    """flash_torch around the CPU reference varlen kernel (FlashAttention's conventions): the
    sink call goes to varlen for its lse, and out * sigmoid(lse - sink) equals eager."""
    q, k, v = generate_qkv(2, 4, 2, 9, 9, 16, seed=8)
    logits = torch.randn(4)
    be = cpu_flash_torch()
    for mask in (aa.causal(), aa.documents([4, 3]) & aa.causal(), None):
        want = aa.attention(q, k, v, mask=mask, score=aa.sink(logits), backend="eager", return_lse=True)
        sig = make_call(q.bfloat16(), k.bfloat16(), v.bfloat16(), mask=mask, score=aa.sink(logits)).sig
        assert be.supports(sig) is None and flash_torch.plan(sig).route == "varlen"
        out, lse = be.run(make_call(q, k, v, mask=mask, score=aa.sink(logits), return_lse=True))
        torch.testing.assert_close(out, want.out, atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(lse, want.lse, atol=2e-5, rtol=1e-4)


def test_flash_torch_refuses_sinks_with_gradients():
    q, k, v = generate_qkv(1, 2, 2, 8, 8, 16, dtype=torch.bfloat16, requires_grad=True)
    with use_backend(cpu_flash_torch()):
        with pytest.raises(aa.UnsupportedError, match="varlen_attn's backward ignores the lse's gradient"):
            aa.attention(q, k, v, mask=aa.causal(), score=aa.sink(torch.zeros(2)), backend="flash_torch")


def test_sdpa_and_cpu_flex_refuse_sinks_and_auto_runs_eager():
    q, k, v = generate_qkv(1, 2, 2, 8, 8, 16)
    s = aa.sink(torch.zeros(2))
    with pytest.raises(aa.UnsupportedError, match="SDPA does not return"):
        aa.attention(q, k, v, mask=aa.causal(), score=s, backend="sdpa")
    with pytest.raises(aa.UnsupportedError, match="FlexAttention on CPU does not return"):
        aa.attention(q, k, v, mask=aa.causal(), score=s, backend="flex")
    d = aa.explain(q, k, v, mask=aa.causal(), score=s)
    assert d.chosen == "eager" and d.variant == "causal", d
    with record_calls() as seen:
        aa.attention(q, k, v, mask=aa.causal(), score=s)
    assert [c.backend for c in seen] == ["eager"]


def test_sink_arguments_are_checked():
    q, k, v = generate_qkv(1, 4, 4, 8, 8, 16)
    with pytest.raises(ValueError, match=r"sink\(logits\): expected one logit per query head, shape \(4,\)"):
        aa.attention(q, k, v, score=aa.sink(torch.zeros(3)))
    with pytest.raises(TypeError, match=r"sink\(logits\)"):
        aa.sink(torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="at most one sink"):
        aa.attention(q, k, v, score=[aa.sink(torch.zeros(4)), aa.sink(torch.zeros(4))])
    assert repr(aa.sink(torch.zeros(4))) == "sink(tensor(4,))"


def test_a_new_sink_value_reuses_the_decision():
    """The sink's values are content, not structure: a training step that updates them does not
    re-rank the backends."""
    from anyattn import api

    q, k, v = generate_qkv(1, 2, 2, 8, 8, 16)
    aa.attention(q, k, v, mask=aa.causal(), score=aa.sink(torch.tensor([0.125, -0.5])))  # values not seen before
    n = len(api._DECISIONS)
    aa.attention(q, k, v, mask=aa.causal(), score=aa.sink(torch.tensor([0.75, 0.0625])))  # new values again
    assert len(api._DECISIONS) == n
