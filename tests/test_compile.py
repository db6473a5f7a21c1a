"""anyattn inside a caller's ``torch.compile(fullgraph=True)``: no graph break caused by anyattn,
and the same numbers as the uncompiled call. CPU here (forward); the CUDA variant covers the GPU
backends with gradients."""

from __future__ import annotations

import pytest
import torch

import anyattn as aa
from anyattn.testing import generate_qkv

CASES = [
    ("sdpa", lambda: {"mask": aa.causal()}),
    ("sdpa", lambda: {"mask": aa.documents([5, 0, 11]) & aa.causal()}),
    ("eager", lambda: {"mask": aa.sliding_window(3), "score": aa.softcap(5.0)}),
]


@pytest.mark.parametrize("backend, kw", CASES, ids=["sdpa-causal", "sdpa-documents", "eager-window-softcap"])
def test_fullgraph_compile_has_no_anyattn_graph_break(backend, kw):
    q, k, v = generate_qkv(1, 2, 2, 16, 16, 64)
    kw = kw()

    def f(q, k, v):
        return aa.attention(q, k, v, backend=backend, **kw)

    torch._dynamo.reset()
    out = torch.compile(f, fullgraph=True)(q, k, v)  # fullgraph: any graph break raises
    torch.testing.assert_close(out, f(q, k, v), atol=1e-5, rtol=1e-5)


def test_auto_and_use_under_fullgraph_compile_without_recompiles():
    """backend="auto" (and the ``use`` default it reads) traces with fullgraph; eager calls in
    between (which fill anyattn's decision cache) do not invalidate the compiled graph, and a
    ``use`` block is honoured by tracing again."""
    from torch._dynamo.testing import CompileCounter

    q, k, v = generate_qkv(1, 2, 2, 16, 16, 64)

    def f(q, k, v, mask):
        return aa.attention(q, k, v, mask=mask)

    torch._dynamo.reset()
    counter = CompileCounter()
    g = torch.compile(f, backend=counter, fullgraph=True)
    for lengths in ([5, 11], [8, 8], [3, 13]):
        mask = aa.documents(torch.tensor(lengths)) & aa.causal()
        out = g(q, k, v, mask)
        torch.testing.assert_close(out, aa.attention(q, k, v, mask=mask, backend="eager"), atol=1e-5, rtol=1e-5)
    assert counter.frame_count == 1
    with aa.use("eager"):
        out = g(q, k, v, aa.causal())
    assert counter.frame_count == 2  # the default changed: traced again, not a stale decision
    torch.testing.assert_close(out, aa.attention(q, k, v, mask=aa.causal(), backend="eager"), atol=1e-5, rtol=1e-5)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("backend", ["sdpa", "cudnn", "flex", "flash_torch"])
def test_cuda_fullgraph_compile_fwd_bwd(backend):
    q, k, v = generate_qkv(2, 8, 2, 256, 256, 64, dtype=torch.bfloat16, device="cuda", requires_grad=True)
    mask = aa.causal() if backend in ("sdpa", "cudnn") else aa.documents([100, 156]) & aa.causal()

    def f(q, k, v):
        return aa.attention(q, k, v, backend=backend, mask=mask)

    torch._dynamo.reset()
    out = torch.compile(f, fullgraph=True)(q, k, v)
    (gq,) = torch.autograd.grad(out.float().sum(), q)
    ref = f(q, k, v)
    (rq,) = torch.autograd.grad(ref.float().sum(), q)
    torch.testing.assert_close(out, ref, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(gq, rq, atol=5e-2, rtol=5e-2)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("backend, marker", [("cudnn", "cudnn"), ("flash_torch", "flash")])
def test_cuda_the_requested_kernel_ran(backend, marker):
    """Profiler proof: the GPU kernels launched by a cudnn / flash_torch call are cuDNN's /
    FlashAttention's (kernel names), not another SDPA kernel."""
    from torch.profiler import ProfilerActivity, profile

    q, k, v = generate_qkv(1, 8, 8, 512, 512, 64, dtype=torch.bfloat16, device="cuda")
    aa.attention(q, k, v, mask=aa.causal(), backend=backend)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        aa.attention(q, k, v, mask=aa.causal(), backend=backend)
        torch.cuda.synchronize()
    names = [e.name.lower() for e in prof.events() if e.device_type.name == "CUDA"]
    assert any(marker in n for n in names), names


@pytest.mark.slow
def test_compiled_decoder_on_flex_traces_once_across_packings_with_eager_calls_between():
    """A whole model under fullgraph compile, flex attention, a new packing (new mask tensors)
    every step and uncompiled calls in between: one trace. Guards on tensor ids, on anyattn's
    caches or on its counters would each force a recompile per step."""
    from torch._dynamo.testing import CompileCounter

    from anyattn.models.decoder import Decoder, DecoderConfig
    from anyattn.nn import PackedBatch

    S = 256
    packings = [[[100, 100, 56], [256]], [[128, 0, 128], [250]], [[1, 255], [64] * 4], [[200, 56], [17, 113, 126]]]
    cfg = DecoderConfig(
        vocab_size=512, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128, sliding_window=64, global_every=2,
        softcap=20.0,
    )  # fmt: skip
    torch.manual_seed(0)
    model = Decoder(cfg)
    model.set_backend("flex")
    torch._dynamo.reset()
    counter = CompileCounter()
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    ids = torch.randint(0, 512, (2, S))
    with torch.no_grad():
        for lens in packings:
            batch = PackedBatch.from_lengths(lens, total_length=S)
            out = compiled(ids, batch).logits
            torch.testing.assert_close(out, model(ids, batch).logits, atol=1e-4, rtol=1e-4)
    assert counter.frame_count == 1
