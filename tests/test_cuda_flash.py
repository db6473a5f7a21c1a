"""flash_torch on CUDA: against the float64 oracle (forward, lse, gradients) in bf16 and fp16;
packed == padded; batch invariance; proof that the FlashAttention kernels ran. Run on a GPU:

    PYTHONPATH=src python3 -m pytest -m cuda tests/test_cuda_flash.py

The flash and kernels_flash backends are not exercised here: their packages are not installed
on the GPU machine (see docs/flash.md); they skip as unavailable.
"""

from __future__ import annotations

import functools

import pytest
import torch

import anyattn as aa
from anyattn.backends import REGISTRY, flash_torch
from anyattn.testing import compare_to_oracle, generate_qkv, use_backend

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

DTYPES = [torch.bfloat16, torch.float16]

# (B, Hq, Hkv, S, D): lengths 1/17/113/1025, head dims 64/128/256, MHA / GQA (8, 2) / MQA (8, 1)
SHAPES = [
    (2, 8, 8, 1, 64),
    (2, 8, 2, 17, 128),
    (2, 8, 1, 113, 256),
    (1, 8, 2, 1025, 64),
    (2, 4, 4, 113, 128),
]


def _sid(s):
    return "B{}-H{}/{}-S{}-D{}".format(*s)


def _docs(S):
    """A zero-length document, a one-token one, one longer than the rest combined, and three
    tokens of padding past the sum."""
    if S < 8:
        return [S]
    a = S // 8
    return [a, 0, 1, S - a - 4]


def _keep(B, S):
    """Row 0 right-padded, row 1 left-padded (contiguous runs of real tokens)."""
    keep = torch.ones(B, S, dtype=torch.bool, device="cuda")
    if S > 1:
        keep[0, S - max(1, S // 4) :] = False
        if B > 1:
            keep[1, : max(1, S // 3)] = False
    return keep


VARIANTS = {
    "dense": lambda B, S: {},
    "causal": lambda B, S: {"mask": aa.causal()},
    "window": lambda B, S: {"mask": aa.sliding_window(max(1, S // 5))},
    "window_lr": lambda B, S: {"mask": aa.sliding_window(max(1, S // 5), 3)},
    "documents": lambda B, S: {"mask": aa.documents(_docs(S))},
    "documents_causal": lambda B, S: {"mask": aa.documents(_docs(S)) & aa.causal()},
    "documents_window": lambda B, S: {"mask": aa.documents(_docs(S)) & aa.sliding_window(5)},  # crosses boundaries
    "padding": lambda B, S: {"mask": aa.padding(mask=_keep(B, S))},
    "padding_causal": lambda B, S: {"mask": aa.padding(mask=_keep(B, S)) & aa.causal()},
    "padding_window": lambda B, S: {"mask": aa.padding(mask=_keep(B, S)) & aa.sliding_window(7, 2)},
    "padding_lengths": lambda B, S: {"mask": aa.padding(torch.tensor([S, max(0, S - 5)][:B], device="cuda"))},
}


def _assert_ok(comps, ctx=""):
    bad = [str(c) for c in comps if not c.ok]
    assert not bad, f"{ctx}: " + "; ".join(bad)


@pytest.mark.parametrize("shape", SHAPES, ids=_sid)
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "fp16"])
def test_flash_torch_matches_float64_oracle(dtype, variant, shape):
    B, Hq, Hkv, S, D = shape
    q, k, v = generate_qkv(B, Hq, Hkv, S, S, D, dtype=dtype, device="cuda", layout="bshd", seed=S + D)
    kw = VARIANTS[variant](B, S)
    aa.clear_caches()
    _assert_ok(compare_to_oracle(q, k, v, backend="flash_torch", grad=True, **kw), f"{variant} out/grads")
    _assert_ok(compare_to_oracle(q, k, v, backend="flash_torch", grad=True, return_lse=True, **kw), f"{variant} lse")


@pytest.mark.parametrize("return_lse", [False, True], ids=["out", "lse"])  # SDPA route / varlen route
@pytest.mark.parametrize("variant", ["dense", "causal", "documents_causal", "padding"])
def test_flash_torch_takes_a_head_dim_with_a_stride_other_than_one(variant, return_lse):
    """The FlashAttention kernels need a unit stride on the head dim; q[..., ::2]-style views
    are copied first (docs/reliability.md). Forward and gradients against float64."""
    B, Hq, Hkv, S, D = 2, 8, 2, 113, 64
    wide = generate_qkv(B, Hq, Hkv, S, S, 2 * D, dtype=torch.bfloat16, device="cuda", layout="bshd", seed=5)
    q, k, v = (t[..., ::2] for t in wide)
    assert q.stride(-1) == 2 and q.shape[-1] == D
    aa.clear_caches()
    kw = VARIANTS[variant](B, S)
    comps = compare_to_oracle(q, k, v, backend="flash_torch", grad=True, return_lse=return_lse, **kw)
    _assert_ok(comps, variant)


@pytest.mark.parametrize("return_lse", [False, True], ids=["out", "lse"])  # SDPA route / varlen route
@pytest.mark.parametrize("Sq, Sk", [(17, 113), (113, 17), (1, 1025)])
@pytest.mark.parametrize("variant", ["dense", "causal", "window", "window_lr"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "fp16"])
def test_flash_torch_sq_ne_sk_bottom_right(dtype, variant, Sq, Sk, return_lse):
    """Causal/window with Sq != Sk are bottom-right aligned; queries above the first key see
    nothing (Sq > Sk) and must give 0 and lse -inf."""
    q, k, v = generate_qkv(2, 8, 2, Sq, Sk, 128, dtype=dtype, device="cuda", seed=Sq)
    kw = VARIANTS[variant](2, min(Sq, Sk))
    if variant == "window_lr" and Sq > Sk:
        # refused on purpose: the fuzz run found the varlen window with a right extent wrong on
        # queries before the first key (sliding_window(3, 57), Sq=35, Sk=22); see flash_torch.plan
        with pytest.raises(aa.UnsupportedError, match="differs from the bottom-right definition"):
            aa.attention(q, k, v, backend="flash_torch", return_lse=return_lse, **kw)
        return
    _assert_ok(compare_to_oracle(q, k, v, backend="flash_torch", grad=True, return_lse=return_lse, **kw), variant)


def test_flash_torch_padding_rows_are_zero_with_finite_gradients():
    B, S = 3, 64
    keep = torch.zeros(B, S, dtype=torch.bool, device="cuda")
    keep[0, :40] = True
    keep[1, 30:] = True  # row 2 is all padding
    q, k, v = generate_qkv(B, 8, 2, S, S, 128, dtype=torch.bfloat16, device="cuda", requires_grad=True)
    r = aa.attention(q, k, v, mask=aa.padding(mask=keep) & aa.causal(), backend="flash_torch", return_lse=True)
    pad_rows = ~keep[:, None, :].expand(B, 8, S)
    assert torch.equal(r.out[pad_rows], torch.zeros_like(r.out[pad_rows]))
    assert torch.isneginf(r.lse[pad_rows]).all() and torch.isfinite(r.lse[~pad_rows]).all()
    r.out.float().square().sum().backward()
    for t in (q, k, v):
        assert torch.isfinite(t.grad).all()
    assert (q.grad[2] == 0).all() and (k.grad[2] == 0).all()


def _tol(dtype):
    # two ulps of the output dtype, relative; same-kernel results differ only in reduction order
    return dict(atol=1e-2, rtol=2 ** -6) if dtype == torch.bfloat16 else dict(atol=1e-3, rtol=2 ** -9)


def _run_grads(q, k, v, mask, dout):
    q, k, v = (t.detach().requires_grad_(True) for t in (q, k, v))
    out = aa.attention(q, k, v, mask=mask, backend="flash_torch")
    out.backward(dout)
    return out.detach(), q.grad, k.grad, v.grad


@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "fp16"])
@pytest.mark.parametrize("causal", [False, True])
def test_packed_equals_padded(dtype, causal):
    """The same sequences packed into one row (documents) or padded into a batch (padding) give
    the same outputs and gradients, token by token."""
    lengths = [37, 1, 200, 64]
    Hq, Hkv, D = 8, 2, 128
    T, Smax = sum(lengths), max(lengths)
    g = torch.Generator().manual_seed(0)
    q_T, k_T, v_T, do_T = (torch.randn(T, h, D, generator=g).to("cuda", dtype) for h in (Hq, Hkv, Hkv, Hq))
    extra = aa.causal() if causal else None

    # packed: (1, H, T, D)
    packed = lambda x: x.transpose(0, 1)[None]  # noqa: E731
    m = aa.documents(lengths)
    out_p, dq_p, dk_p, dv_p = _run_grads(packed(q_T), packed(k_T), packed(v_T), m & extra if extra is not None else m, packed(do_T))

    # padded: (B, H, Smax, D), right padding
    info = aa.SeqInfo.from_padding_mask(
        torch.arange(Smax)[None, :] < torch.tensor(lengths)[:, None]
    ).to("cuda")  # fmt: skip
    padded = lambda x: aa.pad(x, info).transpose(1, 2)  # noqa: E731
    mp = aa.padding(info)
    out_b, dq_b, dk_b, dv_b = _run_grads(padded(q_T), padded(k_T), padded(v_T), mp & extra if extra is not None else mp, padded(do_T))

    back = lambda x: aa.unpad(x.transpose(1, 2), info)  # noqa: E731  (B, H, S, D) -> (T, H, D)
    for name, a, b in (("out", out_p, out_b), ("dq", dq_p, dq_b), ("dk", dk_p, dk_b), ("dv", dv_p, dv_b)):
        torch.testing.assert_close(a[0].transpose(0, 1), back(b), **_tol(dtype), msg=lambda s: f"{name}: {s}")


@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "fp16"])
def test_batch_invariance_under_document_permutation(dtype):
    """Reordering the documents of a packed row reorders the outputs and nothing else."""
    lengths = [50, 3, 130, 17]
    perm = [2, 0, 3, 1]
    Hq, Hkv, D = 8, 2, 64
    T = sum(lengths)
    g = torch.Generator().manual_seed(1)
    q_T, k_T, v_T, do_T = (torch.randn(T, h, D, generator=g).to("cuda", dtype) for h in (Hq, Hkv, Hkv, Hq))
    starts = [sum(lengths[:i]) for i in range(len(lengths))]
    idx = torch.cat([torch.arange(starts[i], starts[i] + lengths[i]) for i in perm]).to("cuda")
    to_row = lambda x: x.transpose(0, 1)[None]  # noqa: E731

    def run(order_idx, lens):
        m = aa.documents(lens) & aa.causal()
        return _run_grads(to_row(q_T[order_idx]), to_row(k_T[order_idx]), to_row(v_T[order_idx]), m, to_row(do_T[order_idx]))

    base = run(torch.arange(T, device="cuda"), lengths)
    permuted = run(idx, [lengths[i] for i in perm])
    for name, a, b in zip(("out", "dq", "dk", "dv"), base, permuted):
        torch.testing.assert_close(a[0].transpose(0, 1)[idx], b[0].transpose(0, 1), **_tol(dtype), msg=lambda s: f"{name}: {s}")


def test_varlen_attn_actually_ran_with_the_mapped_arguments():
    """Documents & window reach torch's varlen_attn with cu_seqlens (int32, zero-length documents
    left out), host max lengths and FlashAttention's window_size."""
    assert REGISTRY["flash_torch"].available() is None, REGISTRY["flash_torch"].available()
    real = flash_torch.load_varlen()[0]
    calls = []

    @functools.wraps(real)  # the backend reads the kernel's keyword parameters from its signature
    def recording(q, k, v, cu_q, cu_k, max_q, max_k, **kw):
        calls.append(dict(shapes=(tuple(q.shape), tuple(k.shape)), cu=cu_q.tolist(), cu_dtype=cu_q.dtype, max=(max_q, max_k), **kw))
        return real(q, k, v, cu_q, cu_k, max_q, max_k, **kw)

    q, k, v = generate_qkv(1, 8, 2, 64, 64, 128, dtype=torch.bfloat16, device="cuda")
    with use_backend(flash_torch.FlashTorchBackend(varlen=recording)):
        out = aa.attention(q, k, v, mask=aa.documents([20, 0, 40]) & aa.sliding_window(5), backend="flash_torch")
    assert torch.isfinite(out).all()
    (c,) = calls
    assert c["cu"] == [0, 20, 60] and c["cu_dtype"] == torch.int32
    assert c["max"] == (40, 40)
    assert c["window_size"] == (5, 0)
    assert c["shapes"] == ((60, 8, 128), (60, 2, 128))
    # a call this small is ranked by host cost (ranking.SMALL): SDPA's dense path; flash_torch on request
    assert aa.explain(q, k, v, mask=aa.documents([20, 0, 40]) & aa.causal()).chosen == "sdpa"
    assert aa.explain(q, k, v, mask=aa.documents([20, 0, 40]) & aa.causal(), backend="flash_torch").chosen == "flash_torch"


def test_sdpa_route_is_restricted_to_the_flash_kernel():
    """Dense/causal calls go to SDPA with only FLASH_ATTENTION enabled."""
    seen = []
    real = torch.nn.functional.scaled_dot_product_attention

    def recording(*a, **kw):
        seen.append(
            (torch.backends.cuda.flash_sdp_enabled(), torch.backends.cuda.mem_efficient_sdp_enabled(), torch.backends.cuda.math_sdp_enabled(), kw.get("is_causal"))
        )  # fmt: skip
        return real(*a, **kw)

    q, k, v = generate_qkv(2, 8, 2, 128, 128, 64, dtype=torch.bfloat16, device="cuda")
    with use_backend(flash_torch.FlashTorchBackend(sdpa=recording)):
        aa.attention(q, k, v, mask=aa.causal(), backend="flash_torch")
        aa.attention(q, k, v, backend="flash_torch")
    assert seen == [(True, False, False, True), (True, False, False, False)]


def test_flash_torch_refuses_fp32_on_cuda_with_the_reason():
    q, k, v = generate_qkv(1, 4, 4, 16, 16, 64, dtype=torch.float32, device="cuda")
    with pytest.raises(aa.UnsupportedError, match="float16/bfloat16, got torch.float32"):
        aa.attention(q, k, v, backend="flash_torch")


# --------------------------------------------------------------------------------------------
# cuDNN vs flash_torch: the same padded/documents calls through both kernels


@pytest.mark.parametrize("S", [192, 320])  # 64 mod 128: cuDNN's reported backward NaN (pytorch#196678)
def test_flash_torch_gradients_are_finite_where_cudnn_has_a_reported_nan(S):
    q, k, v = generate_qkv(2, 8, 8, S, S, 128, dtype=torch.bfloat16, device="cuda", seed=S)
    keep = _keep(2, S)
    _assert_ok(compare_to_oracle(q, k, v, backend="flash_torch", grad=True, mask=aa.padding(mask=keep)), f"S={S}")


@pytest.mark.parametrize("variant", ["dense", "causal"])
def test_cudnn_and_flash_torch_agree(variant):
    if aa.explain(*generate_qkv(1, 2, 2, 8, 8, 64, dtype=torch.bfloat16, device="cuda"), backend="cudnn").chosen is None:
        pytest.skip("cudnn backend unavailable here")
    q, k, v = generate_qkv(2, 8, 8, 1025, 1025, 128, dtype=torch.bfloat16, device="cuda", seed=11)
    kw = VARIANTS[variant](2, 1025)
    a = aa.attention(q, k, v, backend="flash_torch", **kw)
    b = aa.attention(q, k, v, backend="cudnn", **kw)
    torch.testing.assert_close(a, b, atol=2e-2, rtol=2e-2)
