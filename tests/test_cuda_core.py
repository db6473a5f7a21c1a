"""Core semantics on CUDA: every backend x variant x dtype against the float64 oracle, forward and
backward; compile stability of flex; the cuDNN known issue. Run on a GPU machine:

    PYTHONPATH=src python3 -m pytest -m cuda tests/test_cuda_core.py
"""

from __future__ import annotations

import pytest
import torch

import anyattn as aa
from anyattn.backends import flex as flex_backend
from anyattn.backends.flex import FlexBackend
from anyattn.testing import compare_to_oracle, generate_qkv, use_backend

from .variants import VARIANTS, applicable, make

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

SHAPES = [
    (2, 8, 2, 113, 113, 64),
    (1, 4, 4, 1025, 1025, 128),
    (2, 4, 1, 17, 40, 128),
    (1, 4, 4, 40, 17, 64),
    (1, 2, 1, 1, 1, 256),
    (2, 4, 2, 200, 200, 80),
]


def _sid(s):
    return "B{}-H{}/{}-{}x{}-D{}".format(*s)


def _cases():
    # SDPA-family: every variant x dtype x shape (no compilation). flex: every variant in bf16 on
    # two shapes, a few in fp16 (each new variant structure compiles a kernel).
    out = []
    for be in ("sdpa", "cudnn"):
        for var in VARIANTS:
            for dt in ("bf16", "fp16"):
                for sh in SHAPES:
                    out.append((be, var, dt, sh))
    for var in VARIANTS:
        for sh in (SHAPES[0], SHAPES[2]):
            out.append(("flex", var, "bf16", sh))
    for var in ("causal", "documents_causal", "softcap_alibi_window", "padding"):
        out.append(("flex", var, "fp16", SHAPES[5]))
    return [pytest.param(*c, id=f"{c[0]}-{c[1]}-{c[2]}-{_sid(c[3])}") for c in out]


_DT = {"bf16": torch.bfloat16, "fp16": torch.float16}


@pytest.mark.parametrize("backend, variant, dtype, shape", _cases())
def test_cuda_backend_matches_oracle(backend, variant, dtype, shape):
    dtype = _DT[dtype]
    B, Hq, Hkv, Sq, Sk, D = shape
    if not applicable(variant, Sq, Sk):
        pytest.skip("variant needs Sq <= Sk")
    q, k, v = generate_qkv(B, Hq, Hkv, Sq, Sk, D, dtype=dtype, device="cuda", layout="bshd", seed=11)
    kw = make(variant, B, Hq, Sq, Sk)
    d = aa.explain(q.detach().requires_grad_(True), k, v, backend=backend, **kw)
    if d.chosen is None:
        pytest.skip(f"refused: {d.rows[0].reason}")
    comps = compare_to_oracle(q, k, v, backend=backend, grad=True, **kw)
    bad = [str(c) for c in comps if not c.ok]
    assert not bad, f"{backend}/{variant}: " + "; ".join(bad)


@pytest.mark.parametrize("variant", ["causal", "documents_causal", "softcap", "padding"])
def test_cuda_flex_return_lse_matches_oracle(variant):
    q, k, v = generate_qkv(2, 4, 2, 113, 113, 64, dtype=torch.bfloat16, device="cuda")
    comps = compare_to_oracle(q, k, v, backend="flex", grad=True, return_lse=True, **make(variant, 2, 4, 113, 113))
    assert all(c.ok for c in comps), [str(c) for c in comps]


def test_cuda_fully_masked_rows_zero_and_finite_grads_every_backend():
    for be in ("sdpa", "cudnn", "flex", "eager"):
        q, k, v = generate_qkv(1, 4, 4, 256, 256, 64, dtype=torch.bfloat16, device="cuda", requires_grad=True)
        out = aa.attention(q, k, v, mask=aa.documents([100, 60]) & aa.causal(), backend=be)
        assert torch.all(out[:, :, 160:] == 0), be
        out.float().square().sum().backward()
        for t in (q, k, v):
            assert torch.isfinite(t.grad).all(), be


def test_cuda_flex_recompiles_are_bounded_when_lengths_change():
    """Changing document lengths at a fixed sequence length never recompiles; each new sequence
    length compiles exactly one kernel (static shapes: dynamic-shape flex does not lower on
    torch 2.11)."""
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list

    torch._dynamo.reset()
    flex = FlexBackend()  # a fresh instance: its own compiled entries and caches
    gen = torch.Generator().manual_seed(0)
    S = 2048
    q, k, v = generate_qkv(1, 4, 4, S, S, 64, dtype=torch.bfloat16, device="cuda")
    with use_backend(flex):
        for _ in range(6):
            cuts = sorted(torch.randint(1, S, (3,), generator=gen).tolist())
            lengths = [cuts[0], cuts[1] - cuts[0], cuts[2] - cuts[1], S - cuts[2]]
            aa.attention(q, k, v, mask=aa.documents(lengths) & aa.causal(), backend="flex")
        assert flex.stats["compiled_entries"] == 1 and flex.stats["structured_block_masks"] == 6
        (fn,) = flex._entries.values()
        assert len(_debug_get_cache_entry_list(fn._torchdynamo_orig_callable.__code__)) == 1
        for S in (512, 640, 1024):
            q, k, v = generate_qkv(1, 4, 4, S, S, 64, dtype=torch.bfloat16, device="cuda")
            aa.attention(q, k, v, mask=aa.documents([S // 2, S - S // 2]) & aa.causal(), backend="flex")
        assert flex.stats["compiled_entries"] == 4
        for fn in flex._entries.values():
            assert len(_debug_get_cache_entry_list(fn._torchdynamo_orig_callable.__code__)) == 1


def test_cuda_flex_refuses_to_run_unfused_when_dynamo_gives_up():
    q, k, v = generate_qkv(1, 4, 4, 256, 256, 64, dtype=torch.bfloat16, device="cuda")
    torch._dynamo.reset()
    with use_backend(FlexBackend()):
        aa.attention(q, k, v, mask=aa.chunked(64), backend="flex")
        # a second input layout recompiles the same entry (stride guards); with a limit of 1 dynamo
        # would run it eagerly, i.e. the unfused path: anyattn must raise instead
        qt = q.transpose(1, 2).contiguous().transpose(1, 2)
        with torch._dynamo.config.patch(recompile_limit=1):
            with pytest.raises(flex_backend.FlexFallbackError, match="refusing to run"):
                aa.attention(qt, k, v, mask=aa.chunked(64), backend="flex")


def test_cuda_cudnn_masked_backward_at_64_mod_128():
    """pytorch#196678: cuDNN attention backward with a mask at lengths = 64 mod 128 reported NaN on
    H100/H200. Records what this torch/cuDNN does; anyattn's cudnn backend must never return NaN."""
    for S in (192, 320, 1088):
        q, k, v = generate_qkv(1, 4, 4, S, S, 128, dtype=torch.bfloat16, device="cuda", requires_grad=True)
        d = aa.explain(q, k, v, mask=aa.documents([S // 2, S - S // 2]), backend="cudnn")
        if d.chosen is None:
            continue  # refused (known issue) is acceptable
        out = aa.attention(q, k, v, mask=aa.documents([S // 2, S - S // 2]), backend="cudnn")
        out.float().sum().backward()
        assert all(torch.isfinite(t.grad).all() for t in (q, k, v)), f"NaN in cuDNN backward at S={S}"


def test_cuda_auto_prefers_fast_backends():
    from anyattn.backends import REGISTRY

    fa4 = REGISTRY["fa4"].available() is None  # flash-attn-4 installed: it leads the rows it was measured on
    q, k, v = generate_qkv(1, 16, 16, 4096, 4096, 128, dtype=torch.bfloat16, device="cuda")
    assert aa.explain(q, k, v, mask=aa.causal()).chosen in (("fa4",) if fa4 else ("cudnn", "flash_torch", "flex"))
    assert aa.explain(q, k, v, mask=aa.documents([2000, 2096]) & aa.causal()).chosen in (
        ("fa4",) if fa4 else ("flex", "flash_torch")
    )
    assert aa.explain(q, k, v, score=aa.softcap(30.0)).chosen == "flex"
    # measured on the H200: flash_torch leads packed documents forward, flex forward+backward,
    # and flex leads padded batches (flash_torch's unpad/pad dominates there); a packing or padding
    # seen for the first time uses ranking.FIRST_SIGHT (no BlockMask built for one use)
    docs = aa.documents([2000, 2096]) & aa.causal()
    assert aa.explain(q, k, v, mask=docs).chosen == ("fa4" if fa4 else "flash_torch")
    qg = q.detach().requires_grad_(True)
    assert aa.explain(qg, k, v, mask=docs).chosen == "flash_torch"  # first sight with autograd
    assert aa.explain(qg, k, v, mask=docs).chosen == "flash_torch"  # explain only looks
    aa.attention(qg, k, v, mask=docs)
    assert aa.explain(qg, k, v, mask=docs).chosen == ("fa4" if fa4 else "flex")  # the same packing again
    keep = torch.ones(1, 4096, dtype=torch.bool, device="cuda")
    keep[:, 3000:] = False
    assert aa.explain(q, k, v, mask=aa.padding(mask=keep)).chosen == "sdpa"  # first sight
    aa.attention(q, k, v, mask=aa.padding(mask=keep))
    assert aa.explain(q, k, v, mask=aa.padding(mask=keep)).chosen == "flex"
    # new padding given as lengths, with autograd: flash_torch unpads without reading a mask
    # (ranking.FIRST_SIGHT "padding+grad+runs"); the same lengths again: the padding row
    lens = aa.padding(torch.tensor([3000], device="cuda"))
    assert aa.explain(qg, k, v, mask=lens).chosen == "flash_torch"
    aa.attention(qg, k, v, mask=lens)
    assert aa.explain(qg, k, v, mask=lens).chosen == "flex"
    # with 64-wide heads flash_torch leads padded batches even when the mask is reused, causal or
    # not (ranking "padding+d64": flex is the slowest padded backend there)
    q6, k6, v6 = (t[..., :64] for t in (q, k, v))
    for m in (aa.padding(mask=keep), aa.padding(mask=keep) & aa.causal()):
        aa.attention(q6, k6, v6, mask=m)
        assert aa.explain(q6, k6, v6, mask=m).chosen == "flash_torch", m
    # half the length: small enough that the host decides (ranking.SMALL_WORK), SDPA for every mask
    q2, k2, v2 = (t[:, :, :2048] for t in (q, k, v))
    for m in (aa.causal(), aa.documents([1000, 1048]) & aa.causal(), aa.padding(mask=keep[:, :2048])):
        assert aa.explain(q2, k2, v2, mask=m).chosen == "sdpa", m


@pytest.mark.parametrize("cap", [0.5, 20.0])
@pytest.mark.parametrize("shape", [(2, 8, 2, 113, 113, 64), (1, 4, 4, 300, 300, 128)], ids=_sid)
def test_cuda_flex_softcap_fast_tanh_matches_oracle(shape, cap):
    """softcap's tanh as tanh.approx.f32 in flex's Triton kernel (flex_tanh): explain says so, and
    on large logits (q x 8: scores far into tanh's saturation at cap 0.5, across it at 20) the
    output and gradients are within the tolerance rule, as with the accurate tanh (fast_tanh off)."""
    B, Hq, Hkv, S, _, D = shape
    q, k, v = generate_qkv(B, Hq, Hkv, S, S, D, dtype=torch.bfloat16, device="cuda", seed=3)
    q = (q * 8).detach()
    kw = dict(mask=aa.causal(), score=aa.softcap(cap))
    _flex_switch_vs_oracle(q, k, v, "fast_tanh", "tanh.approx.f32", True, True, **kw)


def _flex_switch_vs_oracle(q, k, v, switch, note, expect_note, grad, **kw):
    """flex (Triton lowering) with ``switch`` on and off: ``explain`` names ``note`` exactly when
    the switch is on and ``expect_note``; both meet the tolerance rule against float64; and the
    errors with it on stay near those with it off (no loose bound hiding a worse kernel).
    Returns the comparisons with it on."""
    errs, got = {}, None
    for on in (True, False):
        flex = FlexBackend(**{switch: on})
        flex.lowering = "triton"
        with use_backend(flex):
            text = str(aa.explain(q.detach().requires_grad_(grad), k, v, backend="flex", **kw))
            assert (note in text) == (on and expect_note), text
            comps = compare_to_oracle(q, k, v, backend="flex", grad=grad, **kw)
        assert all(c.ok for c in comps), (switch, on, [str(c) for c in comps])
        errs[on] = {c.name: c.err for c in comps}
        got = got or comps
    for name, e in errs[True].items():
        assert e <= 2 * errs[False][name] + 1e-3, (name, errs)
    return got


def test_cuda_flex_softcap_fast_tanh_in_a_callers_compiled_graph():
    """Inside torch.compile of the caller (a model's layers), the op is lowered by the caller's
    inductor: output and gradients within the rule against float64, as eager bf16 sets it."""
    q, k, v = generate_qkv(1, 4, 4, 256, 256, 64, dtype=torch.bfloat16, device="cuda", seed=5)
    kw = dict(mask=aa.causal(), score=aa.softcap(10.0))

    @torch.compile(fullgraph=True)
    def f(q, k, v):
        return aa.attention(q, k, v, backend="flex", **kw)

    def run(fn, dtype):
        ins = [t.detach().to(dtype).requires_grad_(True) for t in (q, k, v)]
        out = fn(*ins)
        dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out.device, dtype)
        return [out.double()] + [g.double() for g in torch.autograd.grad(out, ins, dout)]

    full = run(lambda *t: aa.attention(*t, backend="eager", **kw), torch.float64)
    ref = run(lambda *t: aa.attention(*t, backend="eager", **kw), torch.bfloat16)
    got = run(f, torch.bfloat16)
    for name, g, r, o in zip(("out", "dq", "dk", "dv"), got, ref, full):
        err, ref_err = (g - o).abs().max().item(), (r - o).abs().max().item()
        bound = 2 * ref_err + 1e-5 if name == "out" else 3 * ref_err + 1e-4
        assert err <= bound, (name, err, bound)


_PROMISE_CASES = [
    # (B, Hq, Hkv, Sq, Sk, D), mask, score, grad, promised
    ((2, 8, 2, 256, 256, 64), "causal", "softcap", True, True),
    ((1, 4, 4, 256, 256, 64), "causal", "softcap+sink", True, True),  # gradients through the lse: dsink, return_lse
    ((1, 4, 4, 128, 640, 128), "causal", "alibi", True, True),  # bottom-right, offset 512
    ((1, 4, 4, 1000, 1000, 64), "causal", "softcap", False, True),  # no autograd: Sq off a block boundary is fine
    ((1, 4, 4, 1000, 1000, 64), "causal", "softcap", True, False),  # the backward's query-major lists are not one run
    ((1, 4, 4, 128, 255, 64), "causal", None, False, False),  # diagonal one key before a block boundary
    ((2, 4, 4, 300, 333, 64), None, "alibi", True, True),
    ((2, 4, 4, 100, 333, 64), None, "alibi", False, False),  # Sq < 128: FlexDecoding splits the keys
    ((1, 8, 8, 64, 576, 64), "causal", "softcap", False, False),  # likewise, diagonal on a boundary
    ((1, 4, 4, 300, 300, 64), "docs", None, True, False),
]


@pytest.mark.parametrize("case", _PROMISE_CASES, ids=lambda c: f"{c[1]}-{c[2]}-{c[0][3]}x{c[0][4]}-{'grad' if c[3] else 'fwd'}")
def test_cuda_flex_kernel_guarantees_match_oracle(case):
    """flex tells its Triton kernel that rows are never empty and key blocks contiguous only
    where flex_blocks.kernel_guarantees proves it (explain says so); there the output and
    gradients stay within the tolerance rule (q x 4: large logits), with errors near those of the
    kernel without the promises."""
    (B, Hq, Hkv, Sq, Sk, D), mask, score, grad, promised = case
    q, k, v = generate_qkv(B, Hq, Hkv, Sq, Sk, D, dtype=torch.bfloat16, device="cuda", seed=11)
    q = (q * 4).detach()
    kw = {}
    if mask == "causal":
        kw["mask"] = aa.causal()
    elif mask == "docs":
        kw["mask"] = aa.documents([[100, 37, 163]]) & aa.causal()
    if score == "softcap":
        kw["score"] = aa.softcap(20.0)
    elif score == "alibi":
        kw["score"] = aa.alibi(torch.linspace(0.05, 0.5, Hq, device="cuda"))
    elif score == "softcap+sink":
        sink = torch.randn(Hq, generator=torch.Generator().manual_seed(2)).to("cuda", torch.bfloat16).requires_grad_(True)
        kw["score"] = [aa.softcap(20.0), aa.sink(sink)]
        kw["return_lse"] = True
    comps = _flex_switch_vs_oracle(q, k, v, "kernel_guarantees", "kernel guarantees", promised, grad, **kw)
    if score == "softcap+sink":  # the sink's gradient comes through the kernel's lse
        assert {"lse", "dq"} <= {c.name for c in comps} and any(c.name.startswith("dsink") for c in comps)
