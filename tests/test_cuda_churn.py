"""Exact under churn on CUDA: every backend, term tensors allocated and freed every call (see
tests/test_churn.py for the bug these guard), each call checked against float64 with the
tolerance rule of DESIGN.md section 7 (error <= 2 x eager's error in the same dtype + 1e-5).

    PYTHONPATH=src python3 -m pytest -m cuda tests/test_cuda_churn.py
"""

from __future__ import annotations

import gc

import pytest
import torch

import anyattn as aa
from anyattn.testing import generate_qkv, oracle

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

STEPS = 8
B, H, HKV, S, D = 2, 4, 2, 256, 64


def _err(a, b):
    return (a.double() - b.double()).abs().max().item()


def _loop(make, backend):
    q, k, v = generate_qkv(B, H, HKV, S, S, D, dtype=torch.bfloat16, device="cuda", seed=1)
    gen = torch.Generator().manual_seed(2)
    for step in range(STEPS):
        mask, score = make(step, gen)
        out = aa.attention(q, k, v, mask=mask, score=score, backend=backend)
        ref = oracle(q, k, v, mask=mask, score=score)
        same = aa.attention(q, k, v, mask=mask, score=score, backend="eager")
        bound = 2 * _err(same, ref) + 1e-5
        err = _err(out, ref)
        assert err <= bound, f"{backend} step {step}: error {err:.3e} > bound {bound:.3e} (stale cache entry?)"
        del mask, score, out, ref, same
        gc.collect()


def _lengths(gen, n=5):
    cuts = sorted(torch.randperm(S - 1, generator=gen)[: n - 1].add(1).tolist())
    return [b - a for a, b in zip([0, *cuts], [*cuts, S])]


@pytest.mark.parametrize("backend", ["auto", "sdpa", "cudnn", "flex", "eager"])
def test_cuda_fresh_dense_masks(backend):
    def make(i, g):
        m = torch.rand(B, 1, S, S, generator=g) > 0.5
        m[..., 0] = True
        return aa.dense(m.cuda()), None

    _loop(make, backend)


@pytest.mark.parametrize("backend", ["auto", "sdpa", "cudnn", "flex", "eager"])
def test_cuda_fresh_bias_tensors(backend):
    _loop(lambda i, g: (aa.causal(), aa.bias(torch.randn(B, H, S, S, generator=g).cuda().to(torch.bfloat16))), backend)


@pytest.mark.parametrize("backend", ["auto", "sdpa", "cudnn", "flex", "flash_torch", "eager"])
def test_cuda_fresh_keep_masks(backend):
    def make(i, g):
        keep = torch.ones(B, S, dtype=torch.bool)
        keep[0, int(torch.randint(1, S, (1,), generator=g)) :] = False
        keep[1, : int(torch.randint(0, S - 1, (1,), generator=g))] = False
        return aa.padding(mask=keep.cuda()) & aa.causal(), None

    _loop(make, backend)


@pytest.mark.parametrize("backend", ["auto", "sdpa", "cudnn", "flex", "flash_torch", "eager"])
@pytest.mark.parametrize("form", ["list", "cpu_tensor", "cuda_tensor", "seqinfo"])
def test_cuda_fresh_document_lengths(backend, form):
    def make(i, g):
        lengths = _lengths(g)
        if form == "list":
            return aa.documents(lengths) & aa.causal(), None
        if form == "cpu_tensor":
            return aa.documents(torch.tensor(lengths)) & aa.causal(), None
        if form == "cuda_tensor":
            return aa.documents(torch.tensor(lengths, device="cuda")) & aa.causal(), None
        return aa.documents(aa.SeqInfo.from_lengths([lengths, _lengths(g)], device="cuda")) & aa.causal(), None

    _loop(make, backend)


@pytest.mark.parametrize("backend", ["auto", "flex", "flash_torch", "sdpa"])
def test_cuda_fresh_padding_seqinfos(backend):
    def make(i, g):
        keep = torch.ones(B, S, dtype=torch.bool)
        keep[0, int(torch.randint(1, S, (1,), generator=g)) :] = False
        return aa.padding(aa.SeqInfo.from_padding_mask(keep.cuda())), None

    _loop(make, backend)


def test_cuda_structured_block_mask_equals_create_block_mask():
    """flex's BlockMask built from the document / padding / window terms marks every tile the
    predicate marks (partial or full); full tiles skip the predicate, so a wrong one would show
    as a wrong output in the loops above, which run these masks every step."""
    from torch.nn.attention.flex_attention import create_block_mask

    from anyattn.backends.flex import structured_block_mask
    from anyattn.testing import make_call

    gen = torch.Generator().manual_seed(3)
    q, k, v = generate_qkv(B, H, H, 1000, 1000, D, dtype=torch.bfloat16, device="cuda")
    keep = torch.ones(B, 1000, dtype=torch.bool, device="cuda")
    keep[1, 700:] = False
    for mask in (
        aa.documents([[300, 500, 200], [999, 1]]) & aa.causal(),
        aa.documents([_lengths(gen) for _ in range(B)]) & aa.sliding_window(200),
        aa.padding(mask=keep) & aa.causal(),
        aa.sliding_window(300, 100),
    ):
        call = make_call(q, k, v, mask=mask)
        pred = call.bound_mask().pred
        ours = structured_block_mask(call, lambda b, h, qi, ki: pred(b, h, qi, ki))
        ref = create_block_mask(lambda b, h, qi, ki: pred(b, h, qi, ki), B, None, 1000, 1000, device="cuda")
        o_any, r_any = ours.to_dense(), ref.to_dense()
        assert o_any.shape[-2:] == r_any.shape[-2:]
        assert bool((o_any.expand_as(r_any) >= r_any).all()), f"{mask!r}: a visible tile is missing"
        out = aa.attention(q, k, v, mask=mask, backend="flex")
        assert _err(out, oracle(q, k, v, mask=mask)) <= 2 * _err(aa.attention(q, k, v, mask=mask, backend="eager"), oracle(q, k, v, mask=mask)) + 1e-5


@pytest.mark.parametrize("rows,S", [([[300, 0, 212]], 512), ([[5, 7], [12], []], 16), ([[2048] * 8], 16384)])
def test_cuda_seqinfo_is_built_on_the_device_without_a_sync(rows, S):
    """SeqInfo.from_lengths(..., device="cuda") derives its per-token maps on the device from one
    pinned copy of the per-document numbers: equal to the CPU build, and no host sync."""
    cpu = aa.SeqInfo.from_lengths(rows, total_length=S)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any synchronizing CUDA call raises
    try:
        gpu = aa.SeqInfo.from_lengths(rows, total_length=S, device="cuda")
        cu, mx = gpu.varlen()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for name in ("lengths", "cu_seqlens", "indices", "keep", "doc_ids", "positions"):
        a, b = getattr(gpu, name), getattr(cpu, name)
        assert a.device.type == "cuda" and a.dtype == b.dtype and torch.equal(a.cpu(), b), name
    assert (gpu.host_lengths, gpu.total, gpu.max_seqlen, mx) == (cpu.host_lengths, cpu.total, cpu.max_seqlen, cpu.max_seqlen)


@pytest.mark.parametrize("backend", ["auto", "sdpa", "cudnn", "flash_torch", "flex"])
@pytest.mark.parametrize("grad", [False, True])
def test_cuda_padding_with_an_empty_row(backend, grad):
    """A batch row with no real token (length 0), new lengths every call, as CPU tensors (copied
    through pinned memory) and as keep-masks: the empty row outputs 0, the others match float64,
    forward and backward, and no gradient is NaN (SDPA's no-grad lowering lets the kernel see a
    fully masked row and zeroes it afterwards)."""
    gen = torch.Generator().manual_seed(3)
    for step in range(4):
        lengths = torch.randint(1, S + 1, (B,), generator=gen)
        lengths[step % B] = 0
        q, k, v = generate_qkv(B, H, HKV, S, S, D, dtype=torch.bfloat16, device="cuda", seed=10 + step)
        keep = torch.arange(S)[None, :] < lengths[:, None]
        for mask in (aa.padding(lengths), aa.padding(mask=keep.cuda())):
            leaves = [t.detach().requires_grad_(grad) for t in (q, k, v)]
            with torch.set_grad_enabled(grad):
                out = aa.attention(*leaves, mask=mask, backend=backend)
            ref = oracle(q, k, v, mask=mask)
            same = aa.attention(q, k, v, mask=mask, backend="eager")
            err, bound = _err(out, ref), 2 * _err(same, ref) + 1e-5
            assert err <= bound, f"{backend} step {step} {mask!r}: error {err:.3e} > bound {bound:.3e}"
            assert not out[step % B].any(), "the empty row must output 0"
            if grad:
                g = torch.autograd.grad(out, leaves, torch.randn_like(out))
                assert all(torch.isfinite(x).all() for x in g), f"{backend}: NaN/inf gradient with an empty row"
