"""anyattn.nn: SelfAttention against a hand-written float64 reference, the batch description,
config validation, dropout. CPU, small shapes."""

from __future__ import annotations

import math

import pytest
import torch

import anyattn as aa
from anyattn.nn import AttentionConfig, PackedBatch, SelfAttention


def _reference(attn: SelfAttention, x, doc_ids, positions, image_ids=None):
    """The layer written out: projections, rotate-half RoPE, explicit visibility, float64."""
    c = attn.config
    B, S, _ = x.shape
    D, Hq, Hkv = c.dhead, c.n_heads, c.kv_heads
    q = (x @ attn.wq.weight.T).view(B, S, Hq, D)
    k = (x @ attn.wk.weight.T).view(B, S, Hkv, D)
    v = (x @ attn.wv.weight.T).view(B, S, Hkv, D)
    inv = 1.0 / (c.rope_theta ** (torch.arange(0, D, 2, dtype=torch.float64) / D))
    ang = positions.double()[..., None] * inv  # (B, S, D/2)
    cos, sin = ang.cos()[:, :, None], ang.sin()[:, :, None]

    def rope(t):
        a, b = t[..., : D // 2], t[..., D // 2 :]
        return torch.cat((a * cos - b * sin, b * cos + a * sin), dim=-1)

    q, k = rope(q), rope(k)
    k = k.repeat_interleave(Hq // Hkv, dim=2)
    v = v.repeat_interleave(Hq // Hkv, dim=2)
    s = torch.einsum("bihd,bjhd->bhij", q, k) / math.sqrt(D)
    if c.softcap is not None:
        s = c.softcap * torch.tanh(s / c.softcap)
    if c.logit_clip is not None:
        clip = torch.tensor(c.logit_clip if isinstance(c.logit_clip, tuple) else [c.logit_clip] * Hq, dtype=s.dtype)
        s = torch.maximum(torch.minimum(s, clip.view(1, -1, 1, 1)), -clip.view(1, -1, 1, 1))
    i = torch.arange(S)
    d = i[:, None] - i[None, :]  # query - key
    win = d >= 0
    if c.sliding_window is not None:
        win = win & (d <= c.sliding_window)
    win = win[None].expand(B, S, S)
    if image_ids is not None:
        win = win | ((image_ids[:, :, None] == image_ids[:, None, :]) & (image_ids[:, :, None] >= 0))
    vis = (doc_ids[:, :, None] == doc_ids[:, None, :]) & (doc_ids[:, :, None] >= 0) & win
    s = s.masked_fill(~vis[:, None], float("-inf"))
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)  # rows with no visible key -> 0
    o = torch.einsum("bhij,bjhd->bihd", p, v).reshape(B, S, Hq * D)
    return o @ attn.wo.weight.T


def _layer(**kw):
    torch.manual_seed(0)
    cfg = AttentionConfig(dim=32, n_heads=4, n_kv_heads=2, **kw)
    return SelfAttention(cfg).double()


LENGTHS = [[5, 0, 7, 3], [11, 2]]  # row 0 has one padding token (15 of 16), row 1 three


@pytest.mark.parametrize(
    "kw",
    [
        {"backend": "eager", "sliding_window": 3, "softcap": 2.0, "logit_clip": (0.5, 1.0, 2.0, 0.25)},
        {"backend": "eager", "logit_clip": 0.3},
        {"backend": "sdpa", "sliding_window": 2},
        {"backend": "sdpa"},
    ],
    ids=["eager-window-softcap-clip", "eager-clip", "sdpa-window", "sdpa-causal"],
)
def test_self_attention_matches_reference_on_packed_documents(kw):
    layer = _layer(**kw)
    batch = PackedBatch.from_lengths(LENGTHS, total_length=16)
    x = torch.randn(2, 16, 32, dtype=torch.float64)
    got = layer(x, batch)
    want = _reference(layer, x, batch.doc_ids, batch.positions)
    # cos/sin are float32 by design (as in Llama/HF), so float64 agreement stops near 1e-8
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    assert got[0, 15].abs().max() == 0 and got[1, 13:].abs().max() == 0  # padding tokens output 0


def test_image_scopes_see_their_whole_image():
    """Tokens of one image attend to each other in both directions, text stays causal."""
    layer = _layer(backend="eager", sliding_window=1)
    img = torch.full((1, 16), -1, dtype=torch.int32)
    img[0, 2:6] = 0
    img[0, 11:14] = 1
    batch = PackedBatch.from_seq_info(aa.SeqInfo.from_lengths([[10, 6]], total_length=16), image_ids=img)
    x = torch.randn(1, 16, 32, dtype=torch.float64)
    got = layer(x, batch)
    torch.testing.assert_close(got, _reference(layer, x, batch.doc_ids, batch.positions, img), atol=1e-6, rtol=1e-6)
    # an image token depends on a later token of its image, not on a later text token
    x2 = x.clone()
    x2[0, 5] += 1.0
    assert (layer(x2, batch)[0, 2] - got[0, 2]).abs().max() > 1e-6
    x3 = x.clone()
    x3[0, 7] += 1.0
    assert (layer(x3, batch)[0, 6] - got[0, 6]).abs().max() == 0


def test_batch_from_position_ids_equals_from_lengths():
    pos = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3, 0], [0, 1, 2, 3, 4, 5, 0, 1, 2, 3]])
    a = PackedBatch.from_position_ids(pos)
    b = PackedBatch.from_lengths([[3, 2, 4, 1], [6, 4]], total_length=10)
    assert torch.equal(a.positions, b.positions)
    # ids are per-row in one, global in the other: compare the partition they induce
    same = lambda ids: ids[:, :, None] == ids[:, None, :]  # noqa: E731
    assert torch.equal(same(a.doc_ids), same(b.doc_ids))


def test_labels_never_cross_a_document_boundary():
    batch = PackedBatch.from_lengths([[3, 2]], total_length=6)
    ids = torch.tensor([[10, 11, 12, 20, 21, 99]])
    assert batch.labels(ids).tolist() == [[11, 12, -100, 21, -100, -100]]


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"dropout": 0.1, "backend": "flex"}, "dropout: expected 0.0 with backend='flex'"),
        ({"dropout": 0.1, "backend": ["flash_torch", "flex"]}, "dropout: expected 0.0"),
        ({"logit_clip": 1.0, "backend": "sdpa"}, r"backend: expected one of \['eager', 'flex'\]"),
        ({"logit_clip": (1.0, 2.0)}, "logit_clip: expected one float or 4"),
        ({"n_kv_heads": 3}, "n_kv_heads: expected a positive divisor of n_heads=4"),
        ({"sliding_window": -1}, "sliding_window: expected None or an int >= 0"),
        ({"backend": "nope"}, "nope"),
    ],
)
def test_config_refuses_impossible_combinations(kw, match):
    with pytest.raises((ValueError, TypeError), match=match):
        AttentionConfig(dim=32, n_heads=4, **kw)


def test_named_backend_that_cannot_serve_the_variant_raises():
    """softcap is a score term SDPA cannot compute: a named backend is never replaced."""
    layer = _layer(backend="sdpa", softcap=5.0)
    with pytest.raises(aa.UnsupportedError, match="sdpa"):
        layer(torch.randn(1, 8, 32, dtype=torch.float64))


def test_dropout_applies_in_training_only():
    layer = _layer(backend="eager", dropout=0.5).float()
    x = torch.randn(1, 8, 32)
    layer.train()
    torch.manual_seed(1)
    a = layer(x)
    torch.manual_seed(2)
    b = layer(x)
    assert (a - b).abs().max() > 1e-4
    layer.eval()
    torch.testing.assert_close(layer(x), layer(x))


def test_tensor_parallel_style_local_heads():
    """With column-sharded projections a rank sees Hq/n heads; the module takes the head count
    from the projection output (simulated here by slicing the weights to heads 2..3)."""
    full = _layer(backend="eager", logit_clip=(0.5, 1.0, 2.0, 0.25))
    x = torch.randn(1, 8, 32, dtype=torch.float64)
    D = 8
    part = _layer(backend="eager", logit_clip=(0.5, 1.0, 2.0, 0.25))
    with torch.no_grad():
        part.wq.weight.copy_(full.wq.weight)
        part.wk.weight.copy_(full.wk.weight)
        part.wv.weight.copy_(full.wv.weight)
        part.wo.weight.copy_(full.wo.weight)
    part.wq = torch.nn.Linear(32, 2 * D, bias=False).double()
    part.wq.weight.data = full.wq.weight.data[2 * D :]
    part.wk = torch.nn.Linear(32, D, bias=False).double()
    part.wk.weight.data = full.wk.weight.data[D:]
    part.wv = torch.nn.Linear(32, D, bias=False).double()
    part.wv.weight.data = full.wv.weight.data[D:]
    part.wo = torch.nn.Linear(2 * D, 32, bias=False).double()
    part.wo.weight.data = full.wo.weight.data[:, 2 * D :]
    part.logit_clip = part.logit_clip[2:].clone()
    part.head_offset = 2
    other = full.wo.weight.data[:, : 2 * D]
    full.wo.weight.data = torch.cat([torch.zeros_like(other), full.wo.weight.data[:, 2 * D :]], dim=1)
    torch.testing.assert_close(part(x), full(x), atol=1e-10, rtol=1e-10)
