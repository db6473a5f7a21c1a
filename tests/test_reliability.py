"""Reliability (issue 6): the bad-input catalogue, no silent fallback, determinism.

Every catalogue test runs once per backend and records what happened for that backend through
the ``catalogue`` fixture (tests/conftest.py): ``error: <type>`` (raised before any kernel ran:
the ``no_kernel`` fixture makes every backend's ``run`` fail the test), ``refused: <reason>`` /
``unavailable: <reason>`` (UnsupportedError, with that backend's own reason), or ``exact``
(matches the float64 oracle under the rule in anyattn.testing, forward and backward where the
backend has a backward; ``exact, fwd only`` otherwise). ``ANYATTN_CATALOGUE_OUT=path`` writes the
records; ``python3 tests/catalogue_table.py path`` renders docs/reliability.md's table.

CPU: flex compiles one kernel per new shape (~6 s here), so in the default run flex takes part in
the items listed in FLEX_CPU_ITEMS only; the table run (ANYATTN_CATALOGUE_OUT or
ANYATTN_CATALOGUE_FULL set) runs flex on every item. The ``cuda`` variants run on the GPU machine:

    CUBLAS_WORKSPACE_CONFIG=:4096:8 ANYATTN_CATALOGUE_OUT=$OUT/catalogue.json \
        PYTHONPATH=src python3 -m pytest -m cuda tests/test_reliability.py
"""

from __future__ import annotations

import contextlib
import os

import pytest
import torch

import anyattn as aa
from anyattn.backends import REGISTRY
from anyattn.backends import flex as flex_backend
from anyattn.backends.sdpa import SdpaBackend
from anyattn.testing import compare_to_oracle, generate_qkv, oracle, record_calls, use_backend

BACKENDS = list(REGISTRY)
CUDA_ONLY = ("cudnn", "flash_torch", "flash", "kernels_flash", "fa4")
FLASH = ("flash_torch", "flash", "kernels_flash", "fa4")
FULL = bool(os.environ.get("ANYATTN_CATALOGUE_OUT") or os.environ.get("ANYATTN_CATALOGUE_FULL"))
FLEX_CPU_ITEMS = {"Sq != Sk with causal", "fully masked rows"}

DEVICES = [
    pytest.param("cpu", id="cpu"),
    pytest.param(
        "cuda", id="cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
    ),
]


def _dtype(device):
    return torch.float32 if device == "cpu" else torch.bfloat16


def _qkv(device, B=1, Hq=2, Hkv=2, Sq=16, Sk=None, D=32, dtype=None, **kw):
    return generate_qkv(B, Hq, Hkv, Sq, Sk, D, dtype=dtype or _dtype(device), device=device, **kw)


@pytest.fixture
def no_kernel(monkeypatch):
    """Any backend's run() fails the test: errors must come before a kernel is reached."""
    for name, impl in REGISTRY.items():

        def boom(call, _name=name):
            raise AssertionError(f"{_name}.run was reached; the error should have come first")

        monkeypatch.setattr(impl, "run", boom)


def _skip_flex_cpu(item, backend, device):
    if backend == "flex" and device == "cpu" and not FULL and item not in FLEX_CPU_ITEMS:
        pytest.skip("flex on CPU compiles per shape (~6 s); set ANYATTN_CATALOGUE_FULL=1 to run it")


def _row(decision, backend):
    return next(r for r in decision.rows if r.backend == backend)


def _refusal(backend, q, k, v, grad, **kw):
    """None when ``backend`` serves the call (with inputs requiring grad if ``grad``), else the
    outcome string; also checks that attention() raises UnsupportedError for it."""
    ins = [t.detach().requires_grad_(grad) for t in (q, k, v)]
    d = aa.explain(*ins, backend=backend, **kw)
    if d.chosen == backend:
        return None
    r = _row(d, backend)
    with pytest.raises(aa.UnsupportedError) as ei:
        aa.attention(*ins, backend=backend, **kw)
    assert r.reason in str(ei.value)
    return f"{'unavailable' if r.status == 'unavailable' else 'refused'}: {r.reason}"


def _exact(backend, q, k, v, **kw) -> str:
    """'exact' (fwd+bwd), 'exact, fwd only', or the refusal; asserts the numbers."""
    why = _refusal(backend, q, k, v, True, **kw)
    if why is None:
        comps = compare_to_oracle(q, k, v, backend=backend, grad=True, **kw)
        tag = "exact"
    else:
        why_fwd = _refusal(backend, q, k, v, False, **kw)
        if why_fwd is not None:
            return why_fwd  # the reason that holds even without grad
        comps = compare_to_oracle(q, k, v, backend=backend, grad=False, **kw)
        tag = "exact, fwd only"
    bad = [str(c) for c in comps if not c.ok]
    assert not bad, f"{backend}: " + "; ".join(bad)
    return tag


def _record_error(catalogue, item, backend, device, exc, match, fn):
    with pytest.raises(exc, match=match) as ei:
        fn()
    catalogue(item, backend, device, f"error: {type(ei.value).__name__}")


# ============================================================== 1. the bad-input catalogue


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_mixed_dtypes_are_an_error(backend, device, catalogue, no_kernel):
    q, k, v = _qkv(device)
    other = torch.float64 if q.dtype != torch.float64 else torch.float32
    _record_error(
        catalogue, "mixed dtypes (k float64, q not)", backend, device, aa.ArgumentTypeError,
        r"k: expected the same dtype as q \(torch\.\w+\), got dtype torch\.float", lambda: aa.attention(q, k.to(other), v, backend=backend),
    )  # fmt: skip


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_mixed_devices_are_an_error(backend, device, catalogue, no_kernel):
    """CPU: 'meta' tensors stand in for a second device (the check compares devices only)."""
    q, k, v = _qkv(device)
    other = "meta" if device == "cpu" else "cpu"
    _record_error(
        catalogue, "mixed devices (k, v on another device)", backend, device, aa.ArgumentError,
        rf"k: expected the same device as q \({device}[:0-9]*\), got device {other}",
        lambda: aa.attention(q, k.to(other), v.to(other), backend=backend),
    )  # fmt: skip


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_cpu_tensors_to_a_cuda_only_backend_are_refused(backend, device, catalogue):
    """Runs on the GPU machine too: CPU tensors there still go to a CUDA-only backend."""
    item = "CPU tensors"
    _skip_flex_cpu(item, backend, "cpu")
    q, k, v = _qkv("cpu")
    out = _exact(backend, q, k, v, mask=aa.causal())
    if backend in CUDA_ONLY:
        assert out.startswith(("refused", "unavailable")), out
        if backend in ("cudnn", "flash_torch"):
            assert "CUDA" in out, out
    else:
        assert out.startswith("exact"), out
    catalogue(item, backend, device, out)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_fp32_fp64_inputs_exact_or_refused(backend, device, dtype, catalogue):
    item = f"{str(dtype).replace('torch.', '')} inputs"
    _skip_flex_cpu(item, backend, device)
    q, k, v = _qkv(device, dtype=dtype)
    out = _exact(backend, q, k, v, mask=aa.causal())
    if backend in FLASH:
        assert out.startswith(("refused", "unavailable")), out
        if device == "cuda" and out.startswith("refused"):
            assert "float16/bfloat16" in out, out
    catalogue(item, backend, device, out)


@pytest.mark.parametrize("D", [264, 20, 8], ids=["D264", "D20", "D8"])
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_head_dim_limits_exact_or_refused(backend, device, D, catalogue):
    """264: above FlashAttention's 256; 20: not a multiple of 8; 8: below flex's 16."""
    item = {264: "head_dim 264 (> 256)", 20: "head_dim 20 (not a multiple of 8)", 8: "head_dim 8 (< 16)"}[D]
    _skip_flex_cpu(item, backend, device)
    q, k, v = _qkv(device, D=D)
    out = _exact(backend, q, k, v, mask=aa.causal())
    if backend == "flash_torch" and device == "cuda" and D != 8:
        assert out.startswith("refused") and "head dim" in out, out
    if backend == "flex" and D == 8:
        assert out.startswith(("refused", "unavailable")), out
    catalogue(item, backend, device, out)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_hq_not_a_multiple_of_hkv_is_an_error(backend, device, catalogue, no_kernel):
    q, k, v = _qkv(device, Hq=3, Hkv=2)
    _record_error(
        catalogue, "Hq not a multiple of Hkv (3 / 2)", backend, device, aa.ArgumentError,
        r"k: expected a number of heads that divides Hq=3 \(GQA/MQA\), got Hkv=2", lambda: aa.attention(q, k, v, backend=backend),
    )  # fmt: skip


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_length_sequences_give_zeros_and_zero_grads(backend, device, catalogue):
    results = []
    for Sq, Sk in ((0, 9), (9, 0)):
        q, k, v = _qkv(device, Sq=Sq, Sk=Sk)
        grad = True
        why = _refusal(backend, q, k, v, True, mask=aa.causal())
        if why is not None:
            grad = False
            why = _refusal(backend, q, k, v, False, mask=aa.causal())
        if why is not None:
            results.append(why)
            continue
        ins = [t.detach().requires_grad_(grad) for t in (q, k, v)]
        out = aa.attention(*ins, mask=aa.causal(), backend=backend)
        assert out.shape == (1, 2, Sq, 32) and torch.all(out == 0)
        if grad and out.numel():
            out.float().sum().backward()
            for t in ins:
                assert t.grad is not None and torch.all(t.grad == 0)
        results.append("exact (zeros)" + ("" if grad else ", fwd only"))
    assert len(set(results)) == 1, results
    catalogue("zero-length sequences (Sq=0 or Sk=0)", backend, device, results[0])


@pytest.mark.parametrize("shape", [(5, 11), (11, 5)], ids=["Sq<Sk", "Sq>Sk"])
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_causal_with_sq_ne_sk_is_bottom_right_and_exact(backend, device, shape, catalogue):
    Sq, Sk = shape
    item = "Sq != Sk with causal"
    if Sq > Sk and device == "cpu" and backend == "flex" and not FULL:
        pytest.skip("one flex compile per shape on CPU; Sq < Sk covers flex here")
    _skip_flex_cpu(item, backend, device)
    q, k, v = _qkv(device, Sq=Sq, Sk=Sk)
    want = torch.tensor([[j <= i + Sk - Sq for j in range(Sk)] for i in range(Sq)], device=device)
    a, b = oracle(q, k, v, mask=aa.causal()), oracle(q, k, v, mask=aa.dense(want))
    assert torch.equal(a, b)  # the oracle itself is bottom-right aligned
    catalogue(f"{item} ({Sq} x {Sk})", backend, device, _exact(backend, q, k, v, mask=aa.causal()))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_causal_plus_a_dense_mask_is_their_intersection(backend, device, catalogue):
    item = "is_causal plus a mask: causal() & dense(m)"
    _skip_flex_cpu(item, backend, device)
    q, k, v = _qkv(device, B=2)
    m = torch.rand(2, 1, 16, 16, generator=torch.Generator().manual_seed(0)).to(device) > 0.4
    both = m & torch.ones(16, 16, dtype=torch.bool, device=device).tril()
    assert torch.equal(oracle(q, k, v, mask=aa.causal() & aa.dense(m)), oracle(q, k, v, mask=aa.dense(both)))
    out = _exact(backend, q, k, v, mask=aa.causal() & aa.dense(m))
    if out.startswith("exact"):
        x = aa.attention(q, k, v, mask=aa.causal() & aa.dense(m), backend=backend)
        y = aa.attention(q, k, v, mask=aa.dense(both), backend=backend)
        tol = 1e-5 if q.dtype == torch.float32 else 2e-2
        torch.testing.assert_close(x, y, atol=tol, rtol=tol)
    catalogue(item, backend, device, out)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_fully_masked_rows_are_zero_no_nan_zero_grads(backend, device, catalogue):
    """documents([5, 7]) on 16 tokens: tokens 12..15 see no key: out 0, lse -inf, grads 0."""
    item = "fully masked rows"
    _skip_flex_cpu(item, backend, device)
    mask = aa.documents([5, 7]) & aa.causal()
    q, k, v = _qkv(device, B=2, Hq=4, Hkv=2)
    out = _exact(backend, q, k, v, mask=mask)
    if out.startswith("exact"):
        grad = out == "exact"
        ins = [t.detach().requires_grad_(grad) for t in (q, k, v)]
        lse_ok = _refusal(backend, *ins, grad, mask=mask, return_lse=True) is None
        r = aa.attention(*ins, mask=mask, backend=backend, return_lse=lse_ok)
        o = r.out if lse_ok else r
        assert torch.all(o[:, :, 12:] == 0) and not o.isnan().any()
        if lse_ok:
            assert torch.all(torch.isneginf(r.lse[:, :, 12:]))
        if grad:
            o.float().square().sum().backward()
            assert torch.all(ins[0].grad[:, :, 12:] == 0)
            assert torch.all(ins[1].grad[:, :, 12:] == 0) and torch.all(ins[2].grad[:, :, 12:] == 0)
            for t in ins:
                assert torch.isfinite(t.grad).all()
        out += ", lse -inf" if lse_ok else ""
    catalogue(item, backend, device, out)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_finfo_min_bias_behaves_like_the_mask(backend, device, catalogue):
    """A user-made ``torch.where(m, 0, finfo.min)`` bias behaves exactly like ``dense(m)``,
    fully masked rows included (0, like -inf): anyattn reads a bias entry at its dtype's
    finfo.min as a mask. Guards the H200 finding that fused kernels (which scale logits by
    1/ln 2) turned such rows into 0 while eager averaged v over them."""
    item = "finfo.min bias vs dense(m)"
    _skip_flex_cpu(item, backend, device)
    q, k, v = _qkv(device)
    m = torch.rand(16, 16, generator=torch.Generator().manual_seed(1)).to(device) > 0.5
    m[:, 0] = True
    m[3] = False  # a fully masked row
    b = aa.bias(torch.where(m, 0.0, torch.finfo(torch.float32).min))
    out = _exact(backend, q, k, v, score=b)
    if out.startswith("exact"):
        x = aa.attention(q, k, v, score=b, backend=backend)
        y = aa.attention(q, k, v, mask=aa.dense(m), backend=backend)
        tol = 1e-5 if q.dtype == torch.float32 else 2e-2
        torch.testing.assert_close(x, y, atol=tol, rtol=tol)
        assert torch.all(x[:, :, 3] == 0) and torch.isfinite(x).all()
        out += "; fully masked row = 0 (like -inf)"
    catalogue(item, backend, device, out)


_WRONG_SHAPES = [
    (lambda S: {"mask": aa.dense(torch.ones(S, S + 1, dtype=torch.bool))}, r"dense\(mask\): expected a tensor broadcastable"),
    (lambda S: {"mask": aa.padding(mask=torch.ones(1, S + 1, dtype=torch.bool))}, r"padding\(mask\): expected rows of the key length"),
    (lambda S: {"mask": aa.padding(mask=torch.ones(3, S, dtype=torch.bool))}, r"padding\(mask\): expected one row per batch"),
    (lambda S: {"mask": aa.padding(torch.tensor([3, 4, 5]))}, r"padding\(lengths\): expected shape \(B,\)"),
    (lambda S: {"mask": aa.padding(torch.tensor([S + 1]))}, r"padding\(lengths\): expected lengths <= the key length"),
    (lambda S: {"mask": aa.documents([S, 1])}, r"documents\(lengths\): expected lengths summing to at most"),
    (lambda S: {"mask": aa.documents([[S], [1], [1]])}, r"documents\(lengths\): expected 1 or B=1 rows"),
    (lambda S: {"mask": aa.prefix_lm(torch.tensor([1, 2]))}, r"prefix_lm\(prefix_lengths\): expected an int or shape"),
    (lambda S: {"score": aa.bias(torch.ones(2, 3, S, S))}, r"bias\(tensor\): expected a tensor broadcastable"),
    (lambda S: {"score": aa.relative_bias(torch.ones(3, 8), 8, 32)}, r"relative_bias\(table\): expected shape \(H=2"),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_masks_and_lengths_of_the_wrong_shape_are_errors(backend, device, catalogue, no_kernel):
    q, k, v = _qkv(device)
    for make, match in _WRONG_SHAPES:
        with pytest.raises(aa.ArgumentError, match=match):
            aa.attention(q, k, v, backend=backend, **make(16))
    catalogue(f"masks / lengths / biases of the wrong shape ({len(_WRONG_SHAPES)} cases)", backend, device, "error: ArgumentError")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_block_structure_for_another_length_is_an_error_not_a_crop(backend, device, catalogue, no_kernel):
    q, k, v = _qkv(device)
    for n in (15, 17):
        for term, name in ((aa.block_causal, "block_causal"), (aa.same_segment, "same_segment")):
            for ids in (torch.arange(n) // 4, (torch.arange(n) // 4)[None]):
                with pytest.raises(aa.ArgumentError, match=rf"{name}\(ids\): expected ids over the key length Sk=16, got length {n}"):
                    aa.attention(q, k, v, mask=term(ids), backend=backend)
    catalogue("block_causal / same_segment ids of length S-1 or S+1", backend, device, "error: ArgumentError")


def test_cu_seqlens_malformed_are_errors(catalogue):
    cu = lambda *x, dt=torch.int32: torch.tensor(x, dtype=dt)  # noqa: E731
    cases = [
        (lambda: aa.SeqInfo.from_cu_seqlens(cu(0, 3, 8, dt=torch.int64)), aa.ArgumentTypeError, r"cu_seqlens: expected dtype torch.int32, got dtype torch.int64"),
        (lambda: aa.SeqInfo.from_cu_seqlens(cu(0, 3.0, 8, dt=torch.float32)), aa.ArgumentTypeError, r"cu_seqlens: expected dtype torch.int32"),
        (lambda: aa.SeqInfo.from_cu_seqlens([0, 3, 8]), aa.ArgumentTypeError, r"cu_seqlens: expected a 1-D int32 tensor, got list"),
        (lambda: aa.SeqInfo.from_cu_seqlens(cu(0)), aa.ArgumentError, r"cu_seqlens: expected a 1-D tensor of at least 2 values"),
        (lambda: aa.SeqInfo.from_cu_seqlens(cu(0, 3, 8)[None]), aa.ArgumentError, r"cu_seqlens: expected a 1-D tensor"),
        (lambda: aa.SeqInfo.from_cu_seqlens(cu(0, 5, 3, 8)), aa.ArgumentError, r"cu_seqlens: expected non-decreasing values, got 5 then 3"),
        (lambda: aa.SeqInfo.from_cu_seqlens(cu(1, 3, 8)), aa.ArgumentError, r"cu_seqlens: expected a first value of 0, got 1"),
        (lambda: aa.SeqInfo.from_cu_seqlens(cu(0, 3, 8), total_length=6), aa.ArgumentError, r"total_length: expected at least cu_seqlens\[-1\] = 8"),
        (lambda: aa.SeqInfo.from_cu_seqlens(cu(0, 3, 8), max_seqlen=4), aa.ArgumentError, r"max_seqlen: expected the longest document"),
    ]  # fmt: skip
    for fn, exc, match in cases:
        with pytest.raises(exc, match=match):
            fn()
    catalogue(f"SeqInfo.from_cu_seqlens: wrong dtype, length, order, start, end ({len(cases)} cases)", "any", "cpu", "error: ArgumentError / ArgumentTypeError")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_cu_seqlens_ending_past_the_sequence_is_an_error_at_the_call(backend, device, catalogue, no_kernel):
    info = aa.SeqInfo.from_cu_seqlens(torch.tensor([0, 3, 20], dtype=torch.int32))
    q, k, v = _qkv(device)
    _record_error(
        catalogue, "cu_seqlens ending past the call's length", backend, device, aa.ArgumentError,
        r"documents\(lengths\): expected lengths summing to at most the sequence length 16, got a row summing to 20",
        lambda: aa.attention(q, k, v, mask=aa.documents(info), backend=backend),
    )  # fmt: skip


def test_position_ids_malformed_are_errors(catalogue):
    P = aa.SeqInfo.from_position_ids
    cases = [
        (lambda: P(torch.zeros(1, 1, 8, dtype=torch.long)), aa.ArgumentError, r"position_ids: expected a \(S,\) or \(B, S\) tensor"),
        (lambda: P(torch.tensor([1, 2, 3, 0, 1])), aa.ArgumentError, r"position_ids: expected each row to start at 0, got row 0 starts at 1"),
        (lambda: P(torch.tensor([[0, 1, 2], [2, 0, 1]])), aa.ArgumentError, r"got row 1 starts at 2"),
        (lambda: P(torch.tensor([0, 1, 3, 0, 1])), aa.ArgumentError, r"each id to be the previous \+ 1 or 0 \(a new document\), got 1 then 3"),
        (lambda: P(torch.tensor([0, 1, 2, -1, 0])), aa.ArgumentError, r"got 2 then -1"),
        (lambda: P(torch.tensor([0.0, 1.0])), aa.ArgumentTypeError, r"position_ids: expected integer position ids"),
        (lambda: P([0, 1, 2]), aa.ArgumentTypeError, r"position_ids: expected an integer tensor"),
        (lambda: P(torch.zeros(1, 0, dtype=torch.long)), aa.ArgumentError, r"position_ids: expected non-empty rows"),
    ]  # fmt: skip
    for fn, exc, match in cases:
        with pytest.raises(exc, match=match):
            fn()
    catalogue(f"SeqInfo.from_position_ids malformed: 3-D, not starting at 0, jumps ({len(cases)} cases)", "any", "cpu", "error: ArgumentError / ArgumentTypeError")


@pytest.mark.parametrize("layout", ["bshd", "expand", "lastdim"])
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_and_stride_0_inputs_are_exact(backend, device, layout, catalogue):
    item = {
        "bshd": "non-contiguous: (B, S, H, D) memory, transposed",
        "expand": "stride 0: k, v expand()ed over heads and batch",
        "lastdim": "head-dim stride 2: q[..., ::2]",
    }[layout]
    _skip_flex_cpu(item, backend, device)
    if layout == "bshd":
        q, k, v = _qkv(device, B=2, Hq=4, Hkv=2, layout="bshd")
        assert not q.is_contiguous()
    elif layout == "expand":
        q, k1, v1 = _qkv(device, B=2, Hq=4, Hkv=1)
        k, v = k1[:1].expand(2, 4, 16, 32), v1[:1].expand(2, 4, 16, 32)
        assert k.stride(0) == 0 and k.stride(1) == 0
    else:
        q, k, v = _qkv(device, D=64)
        q, k, v = q[..., ::2], k[..., ::2], v[..., ::2]
        assert q.stride(-1) == 2
    catalogue(item, backend, device, _exact(backend, q, k, v, mask=aa.causal()))


def test_softcap_non_positive_or_non_finite_is_an_error(catalogue):
    for cap, exc in ((0.0, aa.ArgumentError), (-1.0, aa.ArgumentError), (float("nan"), aa.ArgumentError),
                     (float("inf"), aa.ArgumentError), (float("-inf"), aa.ArgumentError), ("1", aa.ArgumentTypeError),
                     (True, aa.ArgumentTypeError)):  # fmt: skip
        with pytest.raises(exc, match=r"softcap\(cap\): expected a positive finite float"):
            aa.softcap(cap)
    catalogue("softcap <= 0, nan, +-inf, non-number", "any", "cpu", "error: ArgumentError / ArgumentTypeError (when the term is built)")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_alibi_slopes_of_the_wrong_shape_or_dtype_are_errors(backend, device, catalogue, no_kernel):
    with pytest.raises(aa.ArgumentError, match=r"alibi\(slopes\): expected shape \(Hq,\), got shape \(2, 2\)"):
        aa.alibi(torch.ones(2, 2))
    with pytest.raises(aa.ArgumentTypeError, match=r"alibi\(slopes\): expected a floating-point tensor .*int32"):
        aa.alibi(torch.ones(2, dtype=torch.int32))
    with pytest.raises(aa.ArgumentTypeError, match=r"alibi\(slopes\): expected a floating-point tensor .*list"):
        aa.alibi([0.5, 0.25])
    q, k, v = _qkv(device)
    _record_error(
        catalogue, "ALiBi slopes: wrong shape, dtype, or count != Hq", backend, device, aa.ArgumentError,
        r"alibi\(slopes\): expected one slope per query head, shape \(2,\), got shape \(3,\)",
        lambda: aa.attention(q, k, v, score=aa.alibi(torch.ones(3)), backend=backend),
    )  # fmt: skip


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_windows_larger_than_the_sequence_equal_no_window(backend, device, catalogue):
    item = "window larger than the sequence"
    _skip_flex_cpu(item, backend, device)
    q, k, v = _qkv(device)
    big, both = aa.sliding_window(10**6), aa.sliding_window(10**6, 10**6)
    assert torch.equal(oracle(q, k, v, mask=big), oracle(q, k, v, mask=aa.causal()))
    assert torch.equal(oracle(q, k, v, mask=both), oracle(q, k, v))
    outs = {_exact(backend, q, k, v, mask=big), _exact(backend, q, k, v, mask=both)}
    assert len(outs) == 1 or not any(o.startswith("exact") for o in outs), outs
    catalogue(item, backend, device, " / ".join(sorted(outs)))


def test_unknown_backend_names_list_the_valid_ones_and_leave_state_unchanged(catalogue):
    q, k, v = generate_qkv(1, 2, 2, 8, 8, 32)
    valid = r"backend: expected one of \['auto', 'eager', 'sdpa', 'cudnn', 'flex', 'flash_torch', 'flash', 'kernels_flash', 'fa4'\]"
    for bad in ("flash9", "SDPA", ["sdpa", "nope"], ["auto", "eager"], 3, None, []):
        with pytest.raises(aa.ArgumentError, match=r"backend: expected"):
            aa.attention(q, k, v, backend=bad)
    with pytest.raises(aa.ArgumentError, match=valid + r", got 'flash9'"):
        aa.attention(q, k, v, backend="flash9")
    before = aa.explain(q, k, v).chosen
    with aa.use("eager"):
        with pytest.raises(aa.ArgumentError, match=valid):
            with aa.use("nope"):
                pass
        assert aa.explain(q, k, v).chosen == "eager"
    assert aa.explain(q, k, v).chosen == before
    catalogue("unknown backend names (error lists the valid ones; use() state unchanged)", "any", "cpu", "error: ArgumentError")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_large_magnitude_bf16_inputs_no_nan(backend, device, catalogue):
    item = "bf16 inputs x100 (logits ~1e4)"
    _skip_flex_cpu(item, backend, device)
    q, k, v = _qkv(device, dtype=torch.bfloat16, seed=3)
    q, k = q * 100, k * 100
    out = _exact(backend, q, k, v, mask=aa.causal())
    if out.startswith("exact"):
        assert not aa.attention(q, k, v, mask=aa.causal(), backend=backend).isnan().any()
    catalogue(item, backend, device, out)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_bool_and_uint8_masks_agree_and_cache_separately(backend, device, catalogue):
    item = "bool vs uint8 dense mask, same content"
    _skip_flex_cpu(item, backend, device)
    q, k, v = _qkv(device)
    m = torch.rand(16, 16, generator=torch.Generator().manual_seed(2)).to(device) > 0.5
    m[:, 0] = True
    mb, mu = aa.dense(m), aa.dense(m.to(torch.uint8))
    assert mb.key != mu.key
    out = _exact(backend, q, k, v, mask=mb)
    if out.startswith("exact"):
        aa.clear_caches()
        a = aa.attention(q, k, v, mask=mb, backend=backend)
        n = len(aa.api._DECISIONS)
        b = aa.attention(q, k, v, mask=mu, backend=backend)
        assert len(aa.api._DECISIONS) == n + 1  # a separate cache entry
        assert torch.equal(a, b)
        out += " (bitwise equal, separate cache entries)"
    else:  # the same refusal for both (the reason echoes the mask, so its dtype differs)
        assert _refusal(backend, q, k, v, False, mask=mu) == out.replace("bool)", "uint8)")
    catalogue(item, backend, device, out)


# ============================================================== 2. no silent fallback


@contextlib.contextmanager
def _spies():
    """Record which backend ran each call (anyattn.testing.record_calls) and what SDPA's function
    received (an SDPA backend built around a recording kernel, installed with use_backend)."""
    real_sdpa = torch.nn.functional.scaled_dot_product_attention
    ran = []

    def sdpa_spy(q, k, v, **kw):
        ran.append(("sdpa kernel", q, kw))
        return real_sdpa(q, k, v, **kw)

    with use_backend(SdpaBackend("sdpa", kernel=sdpa_spy)), record_calls() as calls:
        yield ran, calls


def test_eager_runs_its_own_computation_and_nothing_else():
    q, k, v = generate_qkv(1, 2, 2, 16, 16, 32)
    with _spies() as (ran, calls):
        aa.attention(q, k, v, mask=aa.causal(), score=aa.softcap(5.0), backend="eager")
    assert [c.backend for c in calls] == ["eager"] and ran == []


def test_sdpa_runs_the_sdpa_kernel_with_the_lowered_mask():
    q, k, v = generate_qkv(1, 4, 2, 16, 16, 32)
    with _spies() as (ran, calls):
        aa.attention(q, k, v, mask=aa.causal(), backend="sdpa")
        aa.attention(q, k, v, mask=aa.documents([5, 11]), score=aa.alibi(torch.ones(4)), backend="sdpa")
        assert [c.backend for c in calls] == ["sdpa", "sdpa"] and len(ran) == 2
        assert ran[0][1] is q and ran[0][2]["is_causal"] is True and ran[0][2]["attn_mask"] is None
        assert ran[0][2]["enable_gqa"] is True
        bias = ran[1][2]["attn_mask"]
        assert bias.dtype == q.dtype and bias.shape[-2:] == (16, 16) and torch.isneginf(bias[0, 0, 0, 5])
        # auto on CPU picks sdpa for a plain mask: the same kernel, not eager
        aa.attention(q, k, v, mask=aa.causal())
        assert [c.backend for c in calls] == ["sdpa"] * 3 and len(ran) == 3


@pytest.mark.slow
def test_flex_runs_its_compiled_kernel_and_never_the_unfused_path():
    """The compiled entry is what runs (it raises FlexFallbackError if ever executed eagerly)."""
    q, k, v = generate_qkv(2, 4, 2, 16, 16, 32)
    flex = REGISTRY["flex"]
    with _spies() as (ran, calls):
        aa.attention(q, k, v, mask=aa.documents([5, 7]) & aa.causal(), backend="flex")  # same compile as the catalogue
    assert [c.backend for c in calls] == ["flex"] and ran == []
    assert any(getattr(fn, "__wrapped__", fn).__name__.startswith("anyattn_flex_") for fn in flex._entries.values())
    with pytest.raises(flex_backend.FlexFallbackError, match="refusing to run FlexAttention's unfused path"):
        flex_backend._entry_template(q, k, v, None, None, 1.0, True, False)  # what an eager fallback would hit


def test_attention_with_weights_is_the_only_detour_to_eager():
    q, k, v = generate_qkv(1, 2, 2, 16, 16, 32)
    with _spies() as (ran, calls):
        with aa.use("sdpa"):
            out, w = aa.attention_with_weights(q, k, v, mask=aa.causal())
            assert [c.backend for c in calls] == ["eager"] and w.shape == (1, 2, 16, 16) and ran == []
            calls.clear()
            aa.attention(q, k, v, mask=aa.causal())
            assert [c.backend for c in calls] == ["sdpa"]
        calls.clear()
        # every explicitly named backend that cannot serve a call refuses; none detours to eager
        for be in ("sdpa", "flex", "cudnn", "flash_torch", "flash", "kernels_flash", "fa4"):
            with pytest.raises(aa.UnsupportedError):
                aa.attention(q, k, v, score=aa.score_fn(lambda s, b, h, i, j: s), backend=be, return_lse=True)
        assert calls == []


# ============================================================== 3. determinism


@pytest.fixture
def deterministic(monkeypatch):
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS reads it per call (CUDA eager)
    prev, prev_warn = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(prev, warn_only=prev_warn)


def _repeat(backend, q, k, v, grad, **kw):
    outs = []
    for _ in range(3):
        ins = [t.detach().requires_grad_(grad) for t in (q, k, v)]
        o = aa.attention(*ins, backend=backend, **kw)
        gs = torch.autograd.grad(o.float().square().sum(), ins) if grad else ()
        outs.append((o.detach(), gs))
    fwd = all(torch.equal(outs[0][0], o) for o, _ in outs[1:])
    bwd = all(all(torch.equal(a, b) for a, b in zip(outs[0][1], g)) for _, g in outs[1:])
    return fwd, bwd


@pytest.mark.parametrize("backend", ["eager", "sdpa", "flex"])
def test_cpu_forward_and_backward_are_bitwise_repeatable(backend, catalogue):
    q, k, v = generate_qkv(2, 4, 2, 16, 16, 32)
    mask = aa.documents([5, 7]) & aa.causal()  # flex: the shape the catalogue compiled already
    grad = backend != "flex"
    fwd, bwd = _repeat(backend, q, k, v, grad, mask=mask)
    assert fwd and bwd
    catalogue("bitwise repeatable (3 runs)", backend, "cpu", "fwd+bwd" if grad else "fwd (no CPU backward)")


@pytest.mark.parametrize("backend", ["eager", "sdpa", "flex"])
def test_cpu_use_deterministic_algorithms_is_honoured(backend, catalogue, deterministic):
    q, k, v = generate_qkv(2, 4, 2, 16, 16, 32)
    grad = backend != "flex"
    fwd, bwd = _repeat(backend, q, k, v, grad, mask=aa.documents([5, 7]) & aa.causal())
    assert fwd and bwd
    catalogue("torch.use_deterministic_algorithms(True)", backend, "cpu", "honoured (runs, bitwise repeatable)")


def test_decisions_are_retaken_when_deterministic_mode_changes():
    """cuDNN refuses under deterministic mode, so a decision cached in the other mode must not be
    reused (a cached 'cudnn' would otherwise reach SDPA with no allowed kernel)."""
    q, k, v = generate_qkv(1, 2, 2, 8, 8, 32)
    aa.clear_caches()
    aa.attention(q, k, v)
    n = len(aa.api._DECISIONS)
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        aa.attention(q, k, v)
    finally:
        torch.use_deterministic_algorithms(prev)
    assert len(aa.api._DECISIONS) == n + 1


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("deterministic_mode", [False, True], ids=["default", "deterministic"])
def test_cuda_determinism(backend, deterministic_mode, catalogue, request):
    """Forward bitwise repeatable on every backend; under use_deterministic_algorithms(True) each
    backend either runs (and the backward is then bitwise repeatable where torch promises it:
    sdpa's flash/efficient kernels and flash_torch pass deterministic=True) or refuses cleanly."""
    if deterministic_mode:
        request.getfixturevalue("deterministic")
    item = "torch.use_deterministic_algorithms(True)" if deterministic_mode else "bitwise repeatable (3 runs)"
    q, k, v = generate_qkv(2, 8, 2, 300, 300, 128, dtype=torch.bfloat16, device="cuda", seed=5)
    mask = aa.causal()
    grad = True
    why = _refusal(backend, q, k, v, True, mask=mask)
    if why is not None:
        grad = False
        why = _refusal(backend, q, k, v, False, mask=mask)
    if why is not None:
        if deterministic_mode and backend == "cudnn":
            assert "not deterministic" in why, why
        catalogue(item, backend, "cuda", why)
        return
    fwd, bwd = _repeat(backend, q, k, v, grad, mask=mask)
    assert fwd, f"{backend}: forward not bitwise repeatable"
    if deterministic_mode and backend in ("sdpa", "flash_torch", "eager"):
        assert bwd, f"{backend}: backward not bitwise repeatable under deterministic mode"
    res = "fwd" + ("; bwd " + ("repeatable" if bwd else "NOT repeatable") if grad else "")
    catalogue(item, backend, "cuda", ("honoured: " if deterministic_mode else "") + res)


def test_decode_sized_calls_do_not_compile_and_rank_sdpa_first():
    """Generation: one query against a KV cache that grows every step. flex runs such calls
    unfused (exact, O(Sq * Sk)) instead of compiling a kernel per KV length; auto ranks the
    backends that take any length without compiling first."""
    before = REGISTRY["flex"].stats["compiled_entries"]
    keep = torch.ones(2, 48, dtype=torch.bool)
    keep[0, :7] = False  # left padding in the cache
    for Sk in (40, 41, 42, 48):
        q, k, v = generate_qkv(2, 4, 2, 1, Sk, 32)
        mask = aa.causal() & aa.padding(mask=keep[:, :Sk].clone())
        out = aa.attention(q, k, v, mask=mask, score=aa.softcap(5.0), backend="flex")
        ref = aa.attention(q, k, v, mask=mask, score=aa.softcap(5.0), backend="eager")
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
        assert aa.explain(q, k, v, mask=mask).chosen == "sdpa"
    assert REGISTRY["flex"].stats["compiled_entries"] == before


def test_masks_built_under_inference_mode_work():
    """Inference tensors have no version counter; a mask made under inference_mode is keyed by
    identity (large tensors are not keyed by content)."""
    with torch.inference_mode():
        keep = torch.ones(2, 300, dtype=torch.bool)
        keep[1, 250:] = False
        q, k, v = generate_qkv(2, 2, 2, 300, 300, 16)
        out = aa.attention(q, k, v, mask=aa.padding(mask=keep), backend="sdpa")
        ref = aa.attention(q, k, v, mask=aa.padding(mask=keep), backend="eager")
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
