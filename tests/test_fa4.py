"""FlashAttention-4 on CPU: the ``fa4`` backend's argument mapping, refusals and availability, its
whole packing / lse / sink path run with a stand-in kernel that follows FA4's conventions, and
flex's choice between its FLASH and Triton lowerings (no kernel is compiled here).

The stand-in follows what flash-attn-4 4.0.0b40 documents and does: (out, lse) tuples, lse
(B, H, S) dense and (H, T) varlen, -inf on rows that see no key, ``window_size`` with None for
unbounded, bottom-right alignment. A mistake in our mapping shows up here; a mistake in the
conventions shows up only in tests/test_cuda_fa4.py.
"""

from __future__ import annotations

import pytest
import torch

import anyattn as aa
from anyattn.backends import REGISTRY, fa4
from anyattn.backends.flex import FlexBackend
from anyattn.call import Signature
from anyattn.resolve import resolve
from anyattn.testing import compare_to_oracle, generate_qkv, make_call, oracle, use_backend

# --------------------------------------------------------------------------------------------
# a stand-in of FA4's kernels (CPU, float32 math, differentiable), in FA4's conventions


def _ref_seq(q, k, v, scale, causal, window, softcap):
    """One sequence: q (Lq, Hq, D), k/v (Lk, Hkv, D) -> out (Lq, Hq, Dv), lse (Hq, Lq)."""
    Lq, Hq, _ = q.shape
    Lk, Hkv, _ = k.shape
    g = Hq // Hkv
    k, v = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)
    s = torch.einsum("qhd,khd->hqk", q.float(), k.float()) * scale
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    i = torch.arange(Lq).view(-1, 1) + (Lk - Lq)
    j = torch.arange(Lk).view(1, -1)
    left, right = (None, 0) if causal else window
    vis = torch.ones(Lq, Lk, dtype=torch.bool)
    if left is not None:
        vis &= j >= i - left
    if right is not None:
        vis &= j <= i + right
    s = s.masked_fill(~vis, float("-inf"))
    empty = ~vis.any(-1)
    lse = torch.logsumexp(s.masked_fill(empty.view(1, -1, 1), 0.0), -1).masked_fill(empty.view(1, -1), float("-inf"))
    p = torch.softmax(s.masked_fill(empty.view(1, -1, 1), 0.0), -1).masked_fill(empty.view(1, -1, 1), 0.0)
    out = torch.einsum("hqk,khd->qhd", p, v.float()).to(q.dtype)
    return out, lse


class StandIn:
    """flash_attn.cute's two functions, recording the keyword arguments of every call."""

    def __init__(self):
        self.calls = []

    def func(self, q, k, v, softmax_scale=None, causal=False, window_size=(None, None), softcap=0.0, return_lse=False):
        self.calls.append(("func", dict(softmax_scale=softmax_scale, causal=causal, window_size=window_size,
                                        softcap=softcap, return_lse=return_lse)))  # fmt: skip
        outs, lses = zip(*(_ref_seq(q[b], k[b], v[b], softmax_scale, causal, window_size, softcap) for b in range(q.shape[0])))
        lse = torch.stack(lses) if return_lse else None
        return torch.stack(outs), lse

    def varlen_func(self, q, k, v, cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=None, max_seqlen_k=None,
                    softmax_scale=None, causal=False, window_size=(None, None), softcap=0.0, return_lse=False):  # fmt: skip
        assert cu_seqlens_q.dtype == torch.int32 and isinstance(max_seqlen_q, int) and isinstance(max_seqlen_k, int)
        self.calls.append(("varlen", dict(softmax_scale=softmax_scale, causal=causal, window_size=window_size,
                                          softcap=softcap, return_lse=return_lse, cu_q=cu_seqlens_q.tolist(),
                                          cu_k=cu_seqlens_k.tolist())))  # fmt: skip
        cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
        outs, lses = [], []
        for n in range(len(cq) - 1):
            o, lse = _ref_seq(q[cq[n] : cq[n + 1]], k[ck[n] : ck[n + 1]], v[ck[n] : ck[n + 1]], softmax_scale, causal,
                              window_size, softcap)  # fmt: skip
            outs.append(o)
            lses.append(lse)
        return torch.cat(outs), (torch.cat(lses, 1) if return_lse else None)


def _backend(arch=9):
    k = StandIn()
    return fa4.Fa4Backend(lambda: fa4.Kernels(k.func, k.varlen_func, "stand-in"), lambda: arch, cuda_only=False), k


def _sig(D=128, Dv=None, dtype=torch.bfloat16, **kw):
    return Signature.of(B=2, Hq=4, Sq=256, D=D, Dv=Dv, dtype=dtype, device="cuda", **kw)


# --------------------------------------------------------------------------------------------
# mapping


def test_plan_maps_causal_windows_softcap_and_lse_to_fa4_arguments():
    q, k, v = generate_qkv(1, 4, 2, 16, 16, 32, dtype=torch.bfloat16)
    p = fa4.plan(make_call(q, k, v, scale=0.5))
    assert (p.route, p.kind, p.kwargs) == ("func", "dense", {"softmax_scale": 0.5, "causal": False, "window_size": (None, None)})
    p = fa4.plan(make_call(q, k, v, mask=aa.causal()))
    assert p.kind == "causal" and p.kwargs["causal"] is True and p.kwargs["window_size"] == (None, None)
    p = fa4.plan(make_call(q, k, v, mask=aa.sliding_window(7, 2)))
    assert p.kind == "window" and p.kwargs["window_size"] == (7, 2) and not p.kwargs["causal"]
    p = fa4.plan(make_call(q, k, v, mask=aa.sliding_window(None, 3)))
    assert p.kwargs["window_size"] == (None, 3)  # None stays unbounded (FA4 reads -1 on one side differently)
    p = fa4.plan(make_call(q, k, v, mask=aa.causal(), score=aa.softcap(30.0), return_lse=True))
    assert p.kwargs["softcap"] == 30.0 and p.kwargs["return_lse"] is True
    p = fa4.plan(make_call(q, k, v, mask=aa.documents([10, 6])))
    assert (p.route, p.kind) == ("varlen", "documents")


def test_plan_refuses_what_fa4_cannot_compute_with_the_reason():
    q, k, v = generate_qkv(1, 4, 4, 16, 16, 32, dtype=torch.bfloat16)
    why = fa4.plan(make_call(q, k, v, mask=aa.causal(), score=aa.alibi(torch.ones(4))))
    assert isinstance(why, str) and "not expressible in FA4" in why and "flex" in why
    why = fa4.plan(make_call(q, k, v, mask=aa.prefix_lm(4)))
    assert isinstance(why, str) and "not expressible in FlashAttention" in why
    q2, k2, v2 = generate_qkv(1, 4, 4, 8, 16, 32, dtype=torch.bfloat16)
    why = fa4.plan(make_call(q2, k2, v2, mask=aa.documents([10, 6])))
    assert isinstance(why, str) and "needs Sq == Sk" in why


@pytest.mark.parametrize(
    "arch,D,Dv,ok",
    [(9, 256, 256, True), (9, 80, 80, True), (9, 264, 264, False), (9, 20, 20, False), (10, 128, 128, True),
     (10, 256, 256, True), (10, 192, 128, True), (10, 256, 128, False), (10, 160, 160, False)],
)  # fmt: skip
def test_head_dims_per_architecture(arch, D, Dv, ok):
    assert (fa4.head_dim_refusal(D, Dv, arch) is None) is ok


def test_supports_refuses_dtype_arch_dropout_weights_and_bad_scale():
    assert fa4.supports_with(_sig(), 9) is None
    assert "float16/bfloat16" in fa4.supports_with(_sig(dtype=torch.float32), 9)
    assert "compute capability 8.x" in fa4.supports_with(_sig(), 8)
    assert "compute capability 12.x" in fa4.supports_with(_sig(), 12)
    assert "dropout" in fa4.supports_with(_sig(dropout_p=0.1), 9)
    assert "scale <= 0" in fa4.supports_with(_sig(scale=-1.0), 9)
    assert "sm10x" in fa4.supports_with(_sig(D=256, Dv=128), 10)


def test_availability_and_explicit_requests_say_what_to_install_or_use():
    if fa4._cute_spec():
        pytest.skip("flash_attn.cute is installed here")
    assert REGISTRY["fa4"].available() == fa4.FA4_INSTALL and '--pre "anyattn[fa4]"' in fa4.FA4_INSTALL
    q, k, v = generate_qkv(1, 2, 2, 8, 8, 16)
    with pytest.raises(aa.UnsupportedError, match=r"fa4: unavailable: flash-attn-4 .*pip install --pre"):
        aa.attention(q, k, v, backend="fa4")
    be = fa4.Fa4Backend(lambda: fa4.Kernels(None, None, "x"), lambda: 9)  # the package found, no GPU
    if not torch.cuda.is_available():
        assert be.available() == "needs a CUDA GPU (torch.cuda.is_available() is False)"
    assert be.supports(_sig().__class__.of(B=1, Hq=2, Sq=8, D=16, dtype=torch.bfloat16, device="cpu")) == "needs CUDA tensors, got cpu"
    assert fa4.Fa4Backend(lambda: "broken import", lambda: 9).supports(_sig()) == "broken import"


# --------------------------------------------------------------------------------------------
# the backend run with the stand-in kernels, against the float64 oracle


CASES = {
    "dense": lambda S: dict(),
    "causal": lambda S: dict(mask=aa.causal()),
    "window": lambda S: dict(mask=aa.sliding_window(3, 1)),
    "softcap": lambda S: dict(mask=aa.causal(), score=aa.softcap(2.0)),
    "documents": lambda S: dict(mask=aa.documents([5, 1, S - 6]) & aa.causal()),
    "documents_window": lambda S: dict(mask=aa.documents([7, S - 7]) & aa.sliding_window(2, 0)),
    "padding_window": lambda S: dict(mask=aa.padding(torch.tensor([S, 9])) & aa.sliding_window(4, 0)),
    "all_padding": lambda S: dict(mask=aa.padding(torch.tensor([0, 0]))),
}


def _check(comps):
    bad = [str(c) for c in comps if not c.ok]
    assert not bad, "; ".join(bad)


@pytest.mark.parametrize("case", list(CASES))
def test_run_with_the_stand_in_matches_the_oracle(case):
    """Transposes, GQA, packing, lse layout and empty rows of the fa4 backend, forward and
    backward, bf16, through ``use_backend`` (the tolerance rule of DESIGN.md)."""
    B, S = 2, 17
    kw = CASES[case](S)
    q, k, v = generate_qkv(B, 4, 2, S, S, 16, layout="bshd", seed=3, dtype=torch.bfloat16)
    be, kern = _backend()
    with use_backend(be):
        _check(compare_to_oracle(q, k, v, backend="fa4", return_lse=True, **kw))
    if case == "all_padding":
        assert kern.calls == []
        return
    route = "varlen" if "documents" in case or "padding" in case else "func"
    assert {c[0] for c in kern.calls} == {route} and all(c[1]["return_lse"] for c in kern.calls)
    first = kern.calls[0][1]
    assert first["softmax_scale"] == 16**-0.5
    if case == "window":
        assert first["window_size"] == (3, 1) and first["causal"] is False
    if case == "softcap":
        assert first["softcap"] == 2.0 and first["causal"] is True
    if case == "documents":
        assert first["cu_q"] == [0, 5, 6, 17, 22, 23, 34] and first["causal"] is True
    if case == "padding_window":
        assert first["cu_q"] == [0, 17, 26] and first["window_size"] == (4, 0)


def test_causal_with_more_queries_than_keys_zeroes_rows_that_see_no_key():
    """Bottom-right causal with Sq > Sk: the first Sq - Sk queries see nothing (output 0, lse -inf)."""
    q, k, v = generate_qkv(1, 2, 2, 12, 5, 16, seed=1, dtype=torch.bfloat16)
    be, kern = _backend()
    with use_backend(be):
        out = aa.attention(q, k, v, mask=aa.causal(), backend="fa4")
        _check(compare_to_oracle(q, k, v, backend="fa4", mask=aa.causal()))
    assert kern.calls[0][1]["return_lse"] is True  # asked so that the empty rows can be found
    assert (out[:, :, :7] == 0).all()


def test_sinks_get_gradients_through_fa4s_differentiable_lse():
    """A sink is out * sigmoid(lse - sink); FA4's lse carries gradients, so training with sinks is
    exact (unlike flash-attn 2/3, whose lse is not differentiable)."""
    q, k, v = generate_qkv(1, 4, 2, 9, 9, 16, seed=2, dtype=torch.bfloat16)
    sinks = torch.randn(4, requires_grad=True)
    be, kern = _backend()
    with use_backend(be):
        comps = compare_to_oracle(q, k, v, backend="fa4", mask=aa.causal(), score=aa.sink(sinks), return_lse=True)
    _check(comps)
    assert [c.name for c in comps] == ["out", "lse", "dq", "dk", "dv", "dsink(tensor(4,))"]
    assert kern.calls[0][1]["return_lse"] is True


# --------------------------------------------------------------------------------------------
# flex: FLASH or Triton lowering


def _flex(arch=9, **kw):
    return FlexBackend(flash_probe=lambda: (arch, None), **kw)


def test_flex_uses_flash_where_it_is_exact_and_says_why_not_elsewhere():
    be = _flex()
    assert be.flash_refusal(_sig(mask=aa.causal())) is None
    assert be.note(_sig(mask=aa.causal(), score=aa.softcap(20.0), requires_grad=True)) == "lowering: FLASH (FlashAttention-4 CuTe kernel)"
    assert "float16/bfloat16" in be.flash_refusal(_sig(dtype=torch.float32))
    assert "no kernel for D=256, Dv=256" not in (be.flash_refusal(_sig(D=256)) or "")  # sm90 takes 256
    assert "no kernel for D=160" in _flex(arch=10).flash_refusal(_sig(D=160))
    assert "lse" in be.flash_refusal(_sig(mask=aa.causal(), score=aa.sink(torch.zeros(4)), requires_grad=True))
    assert "lse" in be.flash_refusal(_sig(mask=aa.causal(), return_lse=True, requires_grad=True))
    assert be.flash_refusal(_sig(mask=aa.causal(), return_lse=True)) is None  # forward lse is fine
    slopes = torch.ones(4, requires_grad=True)
    assert "score-term tensors" in be.flash_refusal(_sig(mask=aa.causal(), score=aa.alibi(slopes), requires_grad=True))
    assert be.flash_refusal(_sig(mask=aa.causal(), score=aa.alibi(torch.ones(4)), requires_grad=True)) is None
    decode = Signature.of(B=1, Hq=4, Sq=1, Sk=300, D=64, dtype=torch.bfloat16, device="cuda")
    assert "decode-sized" in be.flash_refusal(decode) and be.note(decode).startswith("lowering: unfused (decode-sized call")
    assert "CUDA-only" in be.flash_refusal(Signature.of(B=1, Hq=2, Sq=8, D=16, dtype=torch.bfloat16, device="cpu"))
    none_here = FlexBackend(flash_probe=lambda: (0, "the FLASH lowering needs flash-attn-4"))
    promise = "; kernel guarantees: rows never empty, key blocks contiguous"  # no mask, 256 queries
    assert none_here.note(_sig()) == "lowering: Triton (the FLASH lowering needs flash-attn-4)" + promise
    padded = _sig(mask=aa.padding(torch.tensor([200, 256])))
    assert none_here.note(padded) == "lowering: Triton (the FLASH lowering needs flash-attn-4)"


def test_flex_keeps_gradients_off_flash_where_the_sm90_backward_was_wrong():
    """sm90 (round 23, benchmarks/flash_grad_probe.py): the FLASH backward gave wrong gradients at
    D=80 and, with GQA, for every score term but softcap: with gradients such calls go to Triton,
    as do GQA calls whose mask may read the head index (never checked); forward-only calls, no
    GQA, softcap and head-independent masks keep FLASH. sm100 (never run) keeps the GQA rule, not
    the head-dim one."""
    be = _flex()
    gqa = dict(Hkv=2, requires_grad=True)
    assert "wrong gradients at D=80), got D=80, Dv=80" in be.flash_refusal(_sig(D=80, mask=aa.causal(), requires_grad=True))
    assert "got D=256" in be.flash_refusal(_sig(D=256, mask=aa.causal(), requires_grad=True))
    assert be.flash_refusal(_sig(D=80, mask=aa.causal())) is None  # forward
    for d in (64, 96, 128):
        assert be.flash_refusal(_sig(D=d, mask=aa.causal(), requires_grad=True)) is None
    assert _flex(arch=10).flash_refusal(_sig(D=80, mask=aa.causal(), requires_grad=True)) is None
    head = "wrong gradients with GQA for score terms other than softcap"
    for kw in (dict(mask=aa.causal(), score=aa.alibi(torch.ones(4))), dict(score=aa.bias(torch.zeros(1, 4, 256, 256))),
               dict(score=aa.bias(torch.zeros(1, 1, 256, 256))), dict(score=aa.score_fn(lambda s, b, h, q, kv: s + q - kv)),
               dict(mask=~aa.mask_fn(lambda b, h, q, kv: q >= kv)),
               dict(mask=aa.dense(torch.ones(1, 4, 256, 256, dtype=torch.bool)) & aa.causal())):  # fmt: skip
        assert head in be.flash_refusal(_sig(**kw, **gqa)), kw
        assert be.flash_refusal(_sig(**kw, requires_grad=True)) is None, kw  # no GQA
        assert be.flash_refusal(_sig(**kw, Hkv=2)) is None, kw  # forward
        assert head in _flex(arch=10).flash_refusal(_sig(**kw, **gqa)), kw  # never run on sm100: kept off
    for kw in (dict(mask=aa.causal(), score=aa.softcap(5.0)), dict(mask=aa.documents([100, 156]) & aa.causal()),
               dict(mask=aa.dense(torch.ones(1, 1, 256, 256, dtype=torch.bool)) & aa.causal())):  # fmt: skip
        assert be.flash_refusal(_sig(**kw, **gqa)) is None, kw


def test_flex_keeps_a_softcap_forward_on_triton_where_it_was_measured_faster():
    """Hopper, auto: a softcap forward with the kernel guarantees and tanh.approx.f32 stays on
    Triton (measured faster than FLASH, round 22); with gradients, with other score terms, without
    the guarantees or the fast tanh, forced FLASH, or on Blackwell, FLASH serves it."""
    fast = "lowering: Triton (measured faster than FLASH for a softcap forward); softcap's tanh: tanh.approx.f32"
    promise = "; kernel guarantees: rows never empty, key blocks contiguous"
    be = _flex(lowering="auto")
    for mask in (aa.causal(), None):
        sig = _sig(mask=mask, score=aa.softcap(20.0))
        assert be.lowering_for(sig) == ("triton", "measured faster than FLASH for a softcap forward")
        assert be.note(sig) == fast + promise
    flash = ("flash", "")
    assert be.lowering_for(_sig(mask=aa.causal(), score=aa.softcap(20.0), requires_grad=True)) == flash
    assert be.lowering_for(_sig(mask=aa.causal())) == flash  # no softcap
    assert be.lowering_for(_sig(mask=aa.causal(), score=[aa.softcap(20.0), aa.alibi(torch.ones(4))])) == flash
    assert be.lowering_for(_sig(mask=aa.sliding_window(64), score=aa.softcap(20.0))) == flash  # no guarantees
    assert _flex(lowering="auto", kernel_guarantees=False).lowering_for(_sig(mask=aa.causal(), score=aa.softcap(20.0))) == flash
    assert _flex(lowering="auto", fast_tanh=False).lowering_for(_sig(mask=aa.causal(), score=aa.softcap(20.0))) == flash
    assert _flex(lowering="flash").lowering_for(_sig(mask=aa.causal(), score=aa.softcap(20.0))) == flash
    assert _flex(arch=10, lowering="auto").lowering_for(_sig(mask=aa.causal(), score=aa.softcap(20.0))) == flash


def test_flex_lowering_switch_from_argument_and_environment(monkeypatch):
    note = _flex(lowering="triton").note(_sig(mask=aa.sliding_window(64)))
    assert note == "lowering: Triton (ANYATTN_FLEX_LOWERING=triton)"
    monkeypatch.setenv("ANYATTN_FLEX_LOWERING", "triton")
    assert _flex().lowering == "triton"
    monkeypatch.setenv("ANYATTN_FLEX_LOWERING", "flash")
    forced = _flex()
    assert forced.supports(_sig(mask=aa.causal())) is None
    why = forced.supports(_sig(dtype=torch.float32))
    assert why.startswith("the FLASH lowering is forced (ANYATTN_FLEX_LOWERING=flash)") and "float16" in why
    monkeypatch.setenv("ANYATTN_FLEX_LOWERING", "fast")
    with pytest.raises(ValueError, match=r"ANYATTN_FLEX_LOWERING: expected one of \['auto', 'flash', 'triton'\]"):
        _flex().lowering
    with pytest.raises(ValueError, match="lowering: expected"):
        FlexBackend(lowering="cute")


def test_explain_names_the_lowering_flex_uses():
    sig = _sig(mask=aa.causal())
    with use_backend(_flex()):
        _, d = resolve(sig, ("flex",), full=True)
    row = [r for r in d.rows if r.backend == "flex"][0]
    assert row.status == "chosen" and row.reason == "requested; lowering: FLASH (FlashAttention-4 CuTe kernel)"


def test_a_flash_compile_failure_falls_back_to_triton_for_that_variant(monkeypatch):
    """auto: the first FLASH call of a variant fails to compile -> the Triton entry computes it,
    the variant is remembered (explain says so), later calls go straight to Triton. Forced
    FLASH re-raises. The entry points are stand-ins: nothing compiles."""
    q, k, v = generate_qkv(1, 2, 2, 32, 32, 16, seed=4)
    ref = oracle(q, k, v, mask=aa.causal())
    ran = []

    def entry_for(self, call, return_lse, lowering="triton"):
        def fn(q, k, v, score_mod, block_mask, scale, gqa, want_lse, opts):
            ran.append((lowering, opts))
            if lowering == "flash":
                raise RuntimeError("CuteDSL template failed: op not supported")
            return aa.attention(q, k, v, mask=aa.causal(), backend="eager").to(q.dtype), None

        return fn

    monkeypatch.setattr(FlexBackend, "entry_for", entry_for)
    monkeypatch.setattr(FlexBackend, "lowering_for", lambda self, sig: ("flash", "") if not self.flash_failed else ("triton", "failed"))
    be = FlexBackend(flash_probe=lambda: (9, None), lowering="auto")
    call = make_call(q, k, v, mask=aa.causal())
    out, _ = be.run(call)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    assert ran == [("flash", {"BACKEND": "FLASH"}), ("triton", None)]
    assert be.stats["flash_fallbacks"] == 1 and be.stats["triton_calls"] == 1 and be.stats["flash_calls"] == 0
    assert "CuteDSL template failed" in next(iter(be.flash_failed.values()))
    be.run(make_call(q, k, v, mask=aa.causal()))
    assert ran[-1] == ("triton", None) and be.stats["flash_fallbacks"] == 1

    forced = FlexBackend(flash_probe=lambda: (9, None), lowering="flash")
    monkeypatch.setattr(FlexBackend, "lowering_for", lambda self, sig: ("flash", ""))
    with pytest.raises(RuntimeError, match="CuteDSL template failed"):
        forced.run(make_call(q, k, v, mask=aa.causal()))


def test_a_triton_kernel_out_of_shared_memory_compiles_again_with_fewer_stages(monkeypatch):
    """Triton "No valid triton configs ... out of resource" (round 23: a bias at D=64 on an H100):
    flex retries the variant with num_stages 2, then 1, keeps the cap for the variant (explain
    says so), and re-raises what still fails. The entry points are stand-ins: nothing compiles."""
    q, k, v = generate_qkv(1, 2, 2, 32, 32, 16, seed=4)
    ref = oracle(q, k, v, mask=aa.causal())
    ran, limit = [], {"fits": 2}
    oor = "No valid triton configs. OutOfMemoryError: out of resource: triton_tem_fused_flex_attention_4 Required: 245760"

    def entry_for(self, call, return_lse, lowering="triton"):
        def fn(q, k, v, score_mod, block_mask, scale, gqa, want_lse, opts):
            ran.append(opts)
            if (opts or {}).get("num_stages", 3) > limit["fits"]:
                raise RuntimeError(oor)
            return aa.attention(q, k, v, mask=aa.causal(), backend="eager").to(q.dtype), None

        return fn

    monkeypatch.setattr(FlexBackend, "entry_for", entry_for)
    be = FlexBackend(flash_probe=lambda: (0, "no FLASH here"), lowering="auto")
    out, _ = be.run(make_call(q, k, v, mask=aa.causal()))
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    assert ran == [None, {"num_stages": 2}] and be.stats["fewer_stages"] == 1 and be.stats["triton_calls"] == 1
    assert list(be.triton_stages.values()) == [2]
    assert be.triton_options(make_call(q, k, v, mask=aa.causal()).sig) == {"num_stages": 2}
    be.run(make_call(q, k, v, mask=aa.causal()))  # the cached decision: straight to 2 stages
    assert ran[-1] == {"num_stages": 2} and be.stats["fewer_stages"] == 1

    limit["fits"] = 1  # needs one stage
    be2 = FlexBackend(flash_probe=lambda: (0, "no FLASH here"), lowering="auto")
    be2.run(make_call(q, k, v, mask=aa.causal()))
    assert ran[-3:] == [None, {"num_stages": 2}, {"num_stages": 1}] and be2.stats["fewer_stages"] == 2

    limit["fits"] = 0  # never fits: the failure is raised
    be3 = FlexBackend(flash_probe=lambda: (0, "no FLASH here"), lowering="auto")
    with pytest.raises(RuntimeError, match="No valid triton configs"):
        be3.run(make_call(q, k, v, mask=aa.causal()))


# --------------------------------------------------------------------------------------------
# bench kernels: flex's lowerings as bench backend names


def test_bench_names_force_flex_lowering_and_restore_it():
    from anyattn.bench import kernels, matrix

    flex = REGISTRY["flex"]
    prev = flex._lowering
    with matrix.lowered("flex:flash") as name:
        assert name == "flex" and flex.lowering == "flash"
    assert flex._lowering == prev
    with matrix.lowered("fa4") as name:
        assert name == "fa4" and flex._lowering == prev
    p = __import__("argparse").ArgumentParser()
    kernels.add_arguments(p)
    sw = kernels.sweep_from_args(p.parse_args(["--quick", "--backends", "cudnn,flex:triton,flex:flash,fa4", "--variants", "doc_window"]))
    assert sw.backends == ("cudnn", "flex:triton", "flex:flash", "fa4") and sw.raw == () and sw.variants == ("doc_window",)


def test_bench_rows_name_the_lowering_flex_ran():
    """``bench kernels`` rows carry the lowering from explain's flex row, decided in the row's grad
    mode; the tables name it (``flex[FLASH]``), the plot's series do not."""
    from anyattn.bench import matrix, report

    with use_backend(_flex()):
        _, fwd = resolve(_sig(mask=aa.causal(), score=aa.softcap(20.0)), ("flex",), full=True)
        _, bwd = resolve(_sig(mask=aa.causal(), score=aa.softcap(20.0), requires_grad=True), ("flex",), full=True)
    assert matrix.lowering_of(fwd).startswith("Triton (measured faster than FLASH for a softcap forward)")
    assert matrix.lowering_of(bwd) == "FLASH (FlashAttention-4 CuTe kernel)"
    row = {"backend": "auto", "chosen": "flex", "lowering": matrix.lowering_of(bwd)}
    assert report._name(row) == "auto>flex[FLASH]" and report._name(row, False) == "auto>flex"
    assert report._name({"backend": "sdpa", "chosen": "sdpa", "lowering": ""}) == "sdpa"
