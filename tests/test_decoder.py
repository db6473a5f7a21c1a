"""anyattn.models.decoder: presets, training loss and gradients per backend against a float64
oracle (DESIGN.md tolerance), whole-model torch.compile without graph breaks and with a bounded
number of compiles while document lengths change every step, FLOP counting. CPU."""

from __future__ import annotations

import copy

import pytest
import torch

from anyattn.models.decoder import DECODER_PRESETS, Decoder, DecoderConfig, decoder_flops, visible_pairs
from anyattn.nn import PackedBatch

# every step a different packing of the same 2 x 32 tokens (document counts change too)
STEPS = [[[10, 12, 6], [32]], [[3, 29], [16, 16]], [[1, 1, 30], [31]], [[32], [20, 4, 4]], [[7, 7, 7, 7, 4], [2, 30]]]


def test_presets_have_the_advertised_sizes():
    assert 0.11e9 < DECODER_PRESETS["125m"].num_params() < 0.14e9
    assert 1.0e9 < DECODER_PRESETS["1b"].num_params() < 1.2e9
    m = Decoder(DECODER_PRESETS["tiny"])
    assert sum(p.numel() for p in m.parameters()) == DECODER_PRESETS["tiny"].num_params()


def test_per_layer_windows():
    cfg = DecoderConfig.from_name("tiny", n_layers=4, sliding_window=8, global_every=2)
    assert [cfg.window(i) for i in range(4)] == [8, None, 8, None]
    m = Decoder(cfg)
    assert [layer.attention.config.sliding_window for layer in m.layers] == [8, None, 8, None]


def _loss_grads(model, dtype, backend, lens, ids):
    m = copy.deepcopy(model).to(dtype)
    m.set_backend(backend)
    batch = PackedBatch.from_lengths(lens, total_length=ids.shape[1])
    loss = m(ids, batch, batch.labels(ids)).loss
    loss.backward()
    return loss.detach().double(), {n: p.grad.double() for n, p in m.named_parameters()}


def _err(a, b) -> float:
    return float((a - b).abs().max())


@pytest.mark.parametrize(
    "backend, variant",
    [("eager", dict(sliding_window=5, softcap=3.0)), ("sdpa", dict(sliding_window=5)), ("sdpa", dict())],
    ids=["eager-window-softcap", "sdpa-window", "sdpa-causal"],
)
def test_loss_and_gradients_match_the_float64_oracle(backend, variant):
    """Packed documents + causal + window (+ softcap where the backend computes it): loss and
    every parameter gradient within DESIGN.md's tolerance of the float64 eager oracle, relative to
    the float32 eager error."""
    torch.manual_seed(0)
    model = Decoder(DecoderConfig.from_name("tiny", global_every=2, **variant))
    ids = torch.randint(0, 256, (2, 32))
    lens = STEPS[0]
    lo, go = _loss_grads(model, torch.float64, "eager", lens, ids)
    le, ge = _loss_grads(model, torch.float32, "eager", lens, ids)
    lb, gb = _loss_grads(model, torch.float32, backend, lens, ids)
    assert _err(lb, lo) <= 2 * _err(le, lo) + 1e-5, (float(lb), float(lo))
    for name in go:
        bound = 3 * _err(ge[name], go[name]) + 1e-4
        assert _err(gb[name], go[name]) <= bound, (name, _err(gb[name], go[name]), bound)


def test_compiled_model_does_not_recompile_when_documents_change():
    """Whole-model torch.compile(fullgraph=True): anyattn causes no graph break, and packing a
    different set of documents each step (lengths and counts) reuses the one compiled graph,
    because the batch structure reaches the model as tensors (PackedBatch), never Python ints."""
    torch._dynamo.reset()
    from torch._dynamo.testing import CompileCounterWithBackend

    torch.manual_seed(0)
    model = Decoder(DecoderConfig.from_name("tiny", sliding_window=5, global_every=2, backend="sdpa"))
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    ids = torch.randint(0, 256, (2, 32))
    for lens in STEPS:
        batch = PackedBatch.from_lengths(lens, total_length=32)
        loss = compiled(ids, batch, batch.labels(ids)).loss
        loss.backward()
        ref = model(ids, batch, batch.labels(ids)).loss
        torch.testing.assert_close(loss, ref, atol=1e-5, rtol=1e-5)
    assert counter.frame_count == 1, f"{counter.frame_count} compiles for {len(STEPS)} packings"


def test_compiled_model_with_image_scopes_and_position_ids():
    torch._dynamo.reset()
    from torch._dynamo.testing import CompileCounterWithBackend

    torch.manual_seed(0)
    model = Decoder(DecoderConfig.from_name("tiny", backend="sdpa"))
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    ids = torch.randint(0, 256, (1, 16))
    for start in (2, 5):
        pos = torch.tensor([[0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 3, 4, 5, 6, 7]])
        img = torch.full((1, 16), -1)
        img[0, start : start + 3] = 0
        batch = PackedBatch.from_position_ids(pos, image_ids=img)
        torch.testing.assert_close(compiled(ids, batch).logits, model(ids, batch).logits, atol=1e-5, rtol=1e-5)
    assert counter.frame_count == 1


def test_visible_pairs_and_flops_by_hand():
    cfg = DecoderConfig.from_name("tiny", n_layers=2, sliding_window=1, global_every=2)
    # doc of 4 tokens: window 1 -> 1 + 2 + 2 + 2 = 7 pairs; causal -> 10; doc of 1 -> 1
    assert visible_pairs(cfg, [[4, 1]]) == [8, 11]
    D = cfg.dim // cfg.n_heads
    matmul = cfg.n_layers * (cfg.dim * D * (2 * cfg.n_heads + 2 * cfg.n_kv_heads) + 3 * cfg.dim * cfg.ffn_dim)
    matmul += cfg.vocab_size * cfg.dim  # output projection (the embedding lookup is no matmul)
    attn = sum(4 * cfg.n_heads * D * p * 3.5 for p in (8, 11))
    assert decoder_flops(cfg, 5, [[4, 1]]) == 6 * matmul * 5 + int(attn)


def test_compile_blocks_shares_one_graph_per_distinct_layer():
    """Regional compilation: 4 blocks, 2 distinct windows -> 2 compiled graphs, reused across
    packings; the numbers equal the uncompiled model."""
    torch._dynamo.reset()
    from torch._dynamo.testing import CompileCounterWithBackend

    from anyattn.models.decoder import compile_blocks

    torch.manual_seed(0)
    model = Decoder(DecoderConfig.from_name("tiny", n_layers=4, sliding_window=5, global_every=2, backend="sdpa"))
    ref = copy.deepcopy(model)
    counter = CompileCounterWithBackend("aot_eager")
    compile_blocks(model, backend=counter)
    ids = torch.randint(0, 256, (2, 32))
    for lens in STEPS[:3]:
        batch = PackedBatch.from_lengths(lens, total_length=32)
        torch.testing.assert_close(model(ids, batch).logits, ref(ids, batch).logits, atol=1e-5, rtol=1e-5)
    assert counter.frame_count == 2
