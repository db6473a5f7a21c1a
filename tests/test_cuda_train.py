"""Training the anyattn decoder on one CUDA GPU: loss and gradients of every backend against the
float64 eager oracle (DESIGN.md tolerance, relative to eager in the same dtype) on packed
documents with causal + sliding window (+ softcap and per-head logit clip where the backend
computes score terms); whole-model ``torch.compile(fullgraph=True)`` with inductor, no recompiles
while packings change; dropout where supported, refusal where not."""

from __future__ import annotations

import copy

import pytest
import torch

import anyattn as aa
from anyattn.models.decoder import Decoder, DecoderConfig
from anyattn.nn import AttentionConfig, PackedBatch

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

S = 1024
PACKINGS = [
    [[100, 300, 24, 600], [1024]],
    [[512, 0, 500], [1000]],
    [[1, 1023], [256, 256, 256, 256]],
    [[700, 300], [17, 113, 894]],
]


def _cfg(**kw):
    base = dict(vocab_size=512, dim=256, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=512, sliding_window=128, global_every=2)
    base.update(kw)
    return DecoderConfig(**base)


def _run(model, dtype, backend, lens, host=False):
    m = copy.deepcopy(model).to(dtype)
    m.set_backend(backend)
    batch = PackedBatch.from_lengths(lens, total_length=S, device="cuda", host=host)
    ids = torch.randint(0, 512, (len(lens), S), generator=torch.Generator().manual_seed(1)).cuda()
    logits = m(ids, batch).logits
    labels = batch.labels(ids)
    loss = torch.nn.functional.cross_entropy(logits.float().view(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)
    loss.backward()
    return logits.detach().double(), loss.detach().double(), {n: p.grad.double() for n, p in m.named_parameters()}


def _assert_within(tag, got, eager, oracle):
    """DESIGN.md rule on the elementwise outputs: logits 2x eager's error + 1e-5, gradients 3x +
    1e-4. The loss is one number whose error is a sum of cancelling terms, so eager's loss error
    is a lottery; it is bounded through the logits instead: cross-entropy moves by at most 2x the
    largest logit change, so |loss - oracle| <= 2 x the logits bound."""
    (zb, lb, gb), (ze, le, ge), (zo, lo, go) = got, eager, oracle
    ez, bz = float((zb - zo).abs().max()), 2 * float((ze - zo).abs().max()) + 1e-5
    assert ez <= bz, f"{tag}: logits error {ez:.3e} > {bz:.3e}"
    assert float((lb - lo).abs()) <= 2 * bz, f"{tag}: loss {float(lb)} vs {float(lo)} (bound {2 * bz:.3e})"
    for n in go:
        e, bound = float((gb[n] - go[n]).abs().max()), 3 * float((ge[n] - go[n]).abs().max()) + 1e-4
        assert e <= bound, f"{tag}: grad {n} error {e:.3e} > {bound:.3e}"


CASES = [  # (backend, variant, host metadata, dtype)
    ("flex", dict(softcap=20.0, logit_clip=(0.5, 1.0, 2.0, 4.0)), False, torch.bfloat16),
    ("flex", dict(softcap=20.0, logit_clip=(0.5, 1.0, 2.0, 4.0)), False, torch.float16),
    ("flex", dict(), False, torch.bfloat16),
    ("flash_torch", dict(), True, torch.bfloat16),
    ("flash_torch", dict(), True, torch.float16),
    ("cudnn", dict(), False, torch.bfloat16),
    ("sdpa", dict(), False, torch.bfloat16),
    ("auto", dict(softcap=20.0), False, torch.bfloat16),
    ("auto", dict(), True, torch.bfloat16),
]


@pytest.mark.parametrize(
    "backend, variant, host, dtype", CASES,
    ids=[f"{b}-{'scored' if v else 'plain'}-{'host' if h else 'ids'}-{str(d)[6:]}" for b, v, h, d in CASES],
)
def test_loss_and_gradients_match_eager(backend, variant, host, dtype):
    torch.manual_seed(0)
    model = Decoder(_cfg(**variant)).cuda()
    lens = PACKINGS[0]
    oracle = _run(model, torch.float64, "eager", lens)
    eager = _run(model, dtype, "eager", lens)
    got = _run(model, dtype, backend, lens, host)
    _assert_within(f"{backend} {dtype}", got, eager, oracle)


@pytest.mark.parametrize("backend", ["flash_torch", "cudnn", "sdpa"])
def test_backends_without_score_terms_refuse_softcap(backend):
    model = Decoder(_cfg(softcap=20.0)).cuda().bfloat16()
    model.set_backend(backend)
    batch = PackedBatch.from_lengths(PACKINGS[0], total_length=S, device="cuda", host=backend == "flash_torch")
    ids = torch.zeros(2, S, dtype=torch.long, device="cuda")
    with pytest.raises(aa.UnsupportedError, match="softcap"):
        model(ids, batch)


@pytest.mark.parametrize("backend", ["flex", "auto", "cudnn"])
def test_compiled_model_matches_and_compiles_once_across_packings(backend):
    """Inductor, fullgraph: one compile for four different packings (lengths and counts)."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    torch.manual_seed(0)
    model = Decoder(_cfg(softcap=20.0) if backend != "cudnn" else _cfg()).cuda().bfloat16()
    model.set_backend(backend)
    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    ids = torch.randint(0, 512, (2, S), device="cuda")
    for lens in PACKINGS:
        batch = PackedBatch.from_lengths(lens, total_length=S, device="cuda")
        loss = compiled(ids, batch, batch.labels(ids)).loss
        loss.backward()
        ref = model(ids, batch, batch.labels(ids)).loss
        torch.testing.assert_close(loss.float(), ref.float(), atol=2e-2, rtol=2e-2)
    assert counter.frame_count == 1, f"{counter.frame_count} compiles for {len(PACKINGS)} packings"


def test_compiled_flash_torch_with_host_metadata_fixed_packing():
    """flash_torch needs cu_seqlens/max_seqlen as host values (PackedBatch host=True): with a
    fixed packing the whole model compiles once and matches the uncompiled model."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    torch.manual_seed(0)
    model = Decoder(_cfg()).cuda().bfloat16()
    model.set_backend("flash_torch")
    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    ids = torch.randint(0, 512, (2, S), device="cuda")
    batch = PackedBatch.from_lengths(PACKINGS[0], total_length=S, device="cuda", host=True)
    for _ in range(3):
        loss = compiled(ids, batch, batch.labels(ids)).loss
        loss.backward()
    torch.testing.assert_close(loss.float(), model(ids, batch, batch.labels(ids)).loss.float(), atol=2e-2, rtol=2e-2)
    assert counter.frame_count == 1


@pytest.mark.parametrize("backend", ["sdpa", "eager", "auto"])
def test_dropout_trains_where_supported(backend):
    torch.manual_seed(0)
    model = Decoder(_cfg(attn_dropout=0.1, backend=backend)).cuda().bfloat16().train()
    batch = PackedBatch.from_lengths(PACKINGS[0], total_length=S, device="cuda")
    ids = torch.randint(0, 512, (2, S), device="cuda")
    a = model(ids, batch, batch.labels(ids)).loss
    a.backward()
    b = model(ids, batch, batch.labels(ids)).loss
    assert torch.isfinite(a) and float((a - b).abs()) > 0  # different dropout masks
    model.eval()
    assert float((model(ids, batch, batch.labels(ids)).loss - model(ids, batch, batch.labels(ids)).loss).abs()) == 0


@pytest.mark.parametrize("backend", ["flex", "flash_torch"])
def test_dropout_is_refused_by_backends_without_it(backend):
    with pytest.raises(ValueError, match=f"dropout: expected 0.0 with backend='{backend}'"):
        AttentionConfig(dim=256, n_heads=4, dropout=0.1, backend=backend)


@pytest.mark.parametrize("backend", ["sdpa", "cudnn", "flex", "flash_torch", "auto"])
@pytest.mark.parametrize("variant", ["documents", "window", "padding"])
def test_non_reentrant_checkpoint_around_a_first_use_mask(backend, variant):
    """torch.utils.checkpoint(use_reentrant=False) (transformers' gradient checkpointing) around a
    call whose term values are new (a new packing every step): the recomputation in the backward
    must run the forward's ops (a lowering settled between the two raised CheckpointError on CPU
    SDPA), and the gradients equal the call without checkpointing."""
    from torch.utils.checkpoint import checkpoint

    aa.clear_caches()
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(2, 4, 256, 64, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_() for _ in range(3))
    for step in range(3):  # new values each step: every call is a first use
        if variant == "documents":
            mask = aa.documents([[40 + step, 216 - step], [128, 128 - step]]) & aa.causal()
        elif variant == "window":
            mask = aa.sliding_window(16 + step) & aa.padding(torch.tensor([256, 200 - step]))
        else:
            mask = aa.padding(torch.tensor([256 - step, 100 + step]))

        def f(q, k, v, mask=mask):
            return aa.attention(q, k, v, mask=mask, backend=backend)

        try:
            want = torch.autograd.grad(f(q, k, v).float().square().sum(), (q, k, v))
        except aa.UnsupportedError:
            pytest.skip(f"{backend} does not serve {variant}")
        got = torch.autograd.grad(checkpoint(f, q, k, v, use_reentrant=False).float().square().sum(), (q, k, v))
        for a, b in zip(got, want):  # flash backwards accumulate in a nondeterministic order: bf16 tolerance
            torch.testing.assert_close(a, b, atol=2e-2, rtol=2e-2)
