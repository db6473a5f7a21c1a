"""ANKH (anyattn.models.ankh) on CPU against transformers' T5EncoderModel.

The checkpoints are written by transformers itself: a T5ForConditionalGeneration with ANKH's
architecture (gated FFN, 144-token vocabulary, relative position buckets, attention width
num_heads * d_kv != d_model as in ankh-large), random weights with non-trivial norms and a
strong relative-bias table, saved with save_pretrained (ANKH's published form: encoder, decoder
and LM head). anyattn.models.load detects it and loads the encoder; transformers'
T5EncoderModel.from_pretrained of the same directory (eager attention) is the reference.
float32, every hidden state at the real tokens <= 1e-5, padded batches with right and left
padding, sequences longer than max_distance (the logarithmic buckets and the last bucket).
"""

from __future__ import annotations

import json
import os

import pytest
import torch

pytest.importorskip("transformers")

import anyattn
import anyattn.models as am
from anyattn.models import ankh as ankh_mod
from anyattn.models.ankh import AnkhConfig, AnkhModel, build_ankh, map_ankh_keys

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
LENGTHS = [37, 1, 9, 24]  # > max_distance 20, a single token, short, medium
LAYERS = 3


def _t5_config(act="gated-gelu", **kw):
    from transformers import T5Config

    base = dict(
        vocab_size=144, d_model=48, d_kv=16, num_heads=2, d_ff=40, num_layers=LAYERS, num_decoder_layers=1,
        relative_attention_num_buckets=16, relative_attention_max_distance=20, feed_forward_proj=act, dropout_rate=0.0,
        tie_word_embeddings=False, pad_token_id=0, eos_token_id=1,
    )  # fmt: skip
    base.update(kw)
    return T5Config(**base)


def _perturb(model, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "layer_norm" in n:
                p.mul_(1 + 0.3 * torch.randn(p.shape, generator=gen))
            elif "relative_attention_bias" in n:
                p.copy_(torch.randn(p.shape, generator=gen))  # biases of order 1: they matter
            elif n.endswith(".q.weight"):
                p.mul_(4.0)  # T5 folds 1/sqrt(d_kv) into q's init: undo it, for sharp attention


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A full T5ForConditionalGeneration (ANKH's published form) written by transformers, and
    transformers' T5EncoderModel of it (eager)."""
    from transformers import T5EncoderModel, T5ForConditionalGeneration

    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("ankh_full")
    full = T5ForConditionalGeneration(_t5_config()).eval()
    _perturb(full)
    full.save_pretrained(d)
    hf = T5EncoderModel.from_pretrained(d, attn_implementation="eager").eval()
    return str(d), hf


def _batch(lengths=LENGTHS, left_rows=(2,), seed=1):
    gen = torch.Generator().manual_seed(seed)
    S = max(lengths)
    ids = torch.zeros(len(lengths), S, dtype=torch.long)
    mask = torch.zeros(len(lengths), S, dtype=torch.long)
    for b, n in enumerate(lengths):
        seq = torch.randint(2, 144, (n,), generator=gen)
        seq[-1] = 1  # </s>
        sl = slice(S - n, S) if b in left_rows else slice(0, n)
        ids[b, sl], mask[b, sl] = seq, 1
    return ids, mask


def _worst(a_out, b_out, keep) -> float:
    return max((a[keep] - b[keep]).abs().max().item() for a, b in zip(a_out, b_out))


@pytest.mark.parametrize(
    "backend,pack", [("eager", False), ("sdpa", False), ("sdpa", True), ("eager", True), ("auto", "auto")]
)
def test_matches_transformers_t5_encoder_every_layer(ckpt, backend, pack):
    path, hf = ckpt
    m = am.load(path, attn_backend=backend)
    assert type(m) is AnkhModel
    m.pack_padded = pack
    ids, mask = _batch()
    with torch.no_grad():
        r = hf(ids, attention_mask=mask, output_hidden_states=True)
        o = m(ids, attention_mask=mask, output_hidden_states=True)
    keep = mask.bool()
    assert len(o.hidden_states) == len(r.hidden_states) == LAYERS + 1
    assert _worst(o.hidden_states, r.hidden_states, keep) <= 1e-5
    assert (o.last_hidden_state[keep] - r.last_hidden_state[keep]).abs().max() <= 1e-5
    assert torch.all(o.last_hidden_state[~keep] == 0)


def test_flex_packed(ckpt):
    """flex (compiled on CPU; one case): relative_bias as a score_mod on one packed row."""
    path, hf = ckpt
    m = am.load(path, attn_backend="flex")
    ids, mask = _batch()
    with torch.no_grad():
        r = hf(ids, attention_mask=mask, output_hidden_states=True)
        o = m(ids, attention_mask=mask, output_hidden_states=True)
    assert _worst(o.hidden_states, r.hidden_states, mask.bool()) <= 1e-5


def test_packed_documents_equal_the_padded_batch(ckpt):
    """Sequences back to back in one row (seq_info): each gets exactly its own relative biases
    (j - i inside the document), equal to the padded batch; the tail padding stays zero."""
    path, hf = ckpt
    ids, mask = _batch(left_rows=())
    seqs = [ids[b, :n] for b, n in enumerate(LENGTHS)]
    row = torch.cat(seqs)
    S = len(row) + 3
    packed = torch.cat((row, torch.zeros(3, dtype=torch.long)))[None]
    info = anyattn.SeqInfo.from_lengths([LENGTHS], total_length=S)
    with torch.no_grad():
        r = hf(ids, attention_mask=mask).last_hidden_state
    for backend, pack in (("sdpa", False), ("eager", True)):
        m = am.load(path, attn_backend=backend)
        m.pack_padded = pack
        with torch.no_grad():
            o = m(packed, seq_info=info).last_hidden_state[0]
        start = 0
        for b, n in enumerate(LENGTHS):
            assert (o[start : start + n] - r[b, :n]).abs().max() <= 1e-5
            start += n
        assert torch.all(o[start:] == 0)


def test_output_attentions_equal_transformers(ckpt):
    path, hf = ckpt
    m = am.load(path, attn_backend="sdpa")
    ids, mask = _batch()
    with torch.no_grad():
        r = hf(ids, attention_mask=mask, output_attentions=True)
        with pytest.warns(UserWarning, match="eager path"):
            o = m(ids, attention_mask=mask, output_attentions=True)
    assert len(o.attentions) == LAYERS
    for b in range(len(LENGTHS)):
        k = mask[b].bool()
        for a, w in zip(o.attentions, r.attentions):
            assert (a[b][:, k][:, :, k] - w[b][:, k][:, :, k]).abs().max() <= 1e-5


def test_s_max_is_the_norm_bound_over_visible_pairs(ckpt):
    """s_max[l, h] = max over sequences of max_i ||q_i|| * max_j ||k_j|| (real tokens), with q, k
    computed here from transformers' layer inputs and the weights; padded and packed."""
    path, hf = ckpt
    ids, mask = _batch()
    with torch.no_grad():
        hs = hf(ids, attention_mask=mask, output_hidden_states=True).hidden_states
    want = []
    for lay, blk in enumerate(hf.encoder.block):
        sa, ln = blk.layer[0].SelfAttention, blk.layer[0].layer_norm
        h = ln(hs[lay])
        qn = sa.q(h).view(*h.shape[:2], 2, 16).norm(dim=-1)
        kn = sa.k(h).view(*h.shape[:2], 2, 16).norm(dim=-1)
        keep = mask.bool()[..., None]
        want.append(((qn * keep).amax(1) * (kn * keep).amax(1)).amax(0))
    want = torch.stack(want)
    for pack in (False, True):
        m = am.load(path, attn_backend="eager")
        m.pack_padded = pack
        with torch.no_grad():
            got = m(ids, attention_mask=mask, output_s_max=True).s_max
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_gated_silu_encoder_only_checkpoint(tmp_path):
    """ANKH2's gated-silu FFN, saved as T5EncoderModel (the published encoder-only re-saves)."""
    from transformers import T5EncoderModel

    torch.manual_seed(1)
    hf = T5EncoderModel(_t5_config("gated-silu")).eval()
    _perturb(hf, seed=2)
    hf.save_pretrained(tmp_path)
    hf = T5EncoderModel.from_pretrained(tmp_path, attn_implementation="eager").eval()
    m = am.load(str(tmp_path), attn_backend="sdpa")
    assert m.config.dense_act_fn == "silu"
    ids, mask = _batch(left_rows=(0, 3))
    with torch.no_grad():
        r = hf(ids, attention_mask=mask, output_hidden_states=True)
        o = m(ids, attention_mask=mask, output_hidden_states=True)
    assert _worst(o.hidden_states, r.hidden_states, mask.bool()) <= 1e-5


def test_published_configs_detection_and_presets():
    """ElnaggarLab's ankh2-large and the ankh-base encoder re-saves are ANKH to
    anyattn.models.load; a general T5 (flan-t5-large) is not claimed; the presets equal the
    published shapes."""
    with open(os.path.join(FIXTURES, "published_configs.json")) as f:
        cfgs = json.load(f)["configs"]
    ankh = {k: v["config"] for k, v in cfgs.items() if "ankh" in k.lower() and "flan" not in k}
    assert len(ankh) == 3 and all(am.is_ankh_config(c) for c in ankh.values())
    assert not am.is_ankh_config(next(v["config"] for k, v in cfgs.items() if "flan" in k))
    assert not am.is_esmc_config(ankh["ElnaggarLab/ankh2-large"])
    fields = (
        "d_model",
        "d_kv",
        "d_ff",
        "num_layers",
        "num_heads",
        "relative_attention_num_buckets",
        "relative_attention_max_distance",
        "dense_act_fn",
    )
    for name, key in (
        ("ankh2_large", "ElnaggarLab/ankh2-large"),
        ("ankh_base", next(k for k in ankh if k.startswith("lhallee"))),
    ):
        got = AnkhConfig.from_config_dict(ankh[key])
        preset = AnkhConfig.from_name(name)
        assert [getattr(got, f) for f in fields] == [getattr(preset, f) for f in fields], name
    large = AnkhConfig.from_name("ElnaggarLab/ankh-large")
    assert (large.d_model, large.num_heads * large.d_kv, large.d_ff, large.dense_act_fn) == (
        1536,
        1024,
        3840,
        "gelu_new",
    )


def test_strict_loading_names_every_bad_key(ckpt):
    hf = ckpt[1]
    sd = dict(hf.state_dict())
    cfg = AnkhConfig.from_config_dict(hf.config.to_dict())
    with pytest.raises(ValueError, match=r"unknown key.*encoder\.block\.1\.layer\.0\.SelfAttention\.bogus"):
        build_ankh(cfg, dict(sd, **{"encoder.block.1.layer.0.SelfAttention.bogus": torch.zeros(1)}))
    with pytest.raises(ValueError, match=r"missing key.*relative_attention_bias"):
        build_ankh(cfg, {k: v for k, v in sd.items() if "relative_attention_bias" not in k})
    with pytest.raises(ValueError, match=r"shape mismatch.*encoder\.block\.2\.layer\.1\.DenseReluDense\.wo\.weight"):
        build_ankh(cfg, dict(sd, **{"encoder.block.2.layer.1.DenseReluDense.wo.weight": torch.zeros(48, 41)}))
    with pytest.raises(ValueError, match=r"encoder\.embed_tokens\.weight equal to shared\.weight"):
        map_ankh_keys(dict(sd, **{"encoder.embed_tokens.weight": sd["shared.weight"] + 1}))
    only_enc = {k: v for k, v in sd.items() if k != "shared.weight"}
    only_enc["encoder.embed_tokens.weight"] = sd["shared.weight"]
    build_ankh(cfg, only_enc)  # the encoder's copy stands in for shared.weight
    with pytest.raises(ValueError, match="feed_forward_proj"):
        AnkhConfig.from_config_dict(dict(hf.config.to_dict(), feed_forward_proj="relu"))
    with pytest.raises(ValueError, match="dense_act_fn"):
        AnkhConfig(dense_act_fn="tanh")


def test_save_pretrained_round_trip_and_auto_classes(ckpt, tmp_path):
    from transformers import AutoModel

    path = ckpt[0]
    m = am.load(path, attn_backend="eager")
    m.save_pretrained(tmp_path)
    ref = m.state_dict()
    for loaded in (AnkhModel.from_pretrained(tmp_path), AutoModel.from_pretrained(tmp_path), am.load(str(tmp_path))):
        assert type(loaded) is AnkhModel and loaded.attn_backend == "eager"
        assert loaded.state_dict().keys() == ref.keys()
        assert all(torch.equal(loaded.state_dict()[k], v) for k, v in ref.items())
    assert AnkhModel.from_pretrained(path).state_dict().keys() == ref.keys()  # transformers' full checkpoint, strict
    assert am.load(str(tmp_path), attn_backend="sdpa").attn_backend == "sdpa"


def test_attn_backend_switch(ckpt, monkeypatch):
    path, _ = ckpt
    m = am.load(path, attn_backend="sdpa")
    m.pack_padded = False
    seen = []
    real = ankh_mod.attention

    def record(*a, **k):
        seen.append((k["backend"], repr(k["score"]).split("(")[0], k["scale"]))
        return real(*a, **k)

    monkeypatch.setattr(ankh_mod, "attention", record)
    ids, mask = _batch()
    with torch.no_grad():
        m(ids, attention_mask=mask)
        m.attn_backend = "eager"
        m(ids, attention_mask=mask)
    assert seen == [("sdpa", "relative_bias", 1.0)] * LAYERS + [("eager", "relative_bias", 1.0)] * LAYERS
    with pytest.raises(ValueError, match="sdpa"):
        m.attn_backend = "nope"


def test_training_step_reaches_every_parameter(ckpt):
    """Backward through relative_bias reaches the bias table (and every other weight), padded on
    sdpa and packed on eager."""
    m = am.load(ckpt[0])
    m.train()
    ids, mask = _batch()
    for backend, pack in (("sdpa", False), ("eager", True)):
        m.attn_backend, m.pack_padded = backend, pack
        m.zero_grad()
        m(ids, attention_mask=mask).last_hidden_state.pow(2).mean().backward()
        bad = [
            n for n, p in m.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all() or not p.grad.any()
        ]
        assert not bad, (backend, bad)


# ---------------------------------------------------------------------------------------------
# compile_layers


def _tiny_model(**kw):
    torch.manual_seed(0)
    cfg = AnkhConfig(vocab_size=144, d_model=48, d_kv=16, num_heads=2, d_ff=40, num_layers=LAYERS,
                     relative_attention_num_buckets=16, relative_attention_max_distance=20, **kw)  # fmt: skip
    m = AnkhModel(cfg).eval()
    _perturb(m)
    return m


@pytest.mark.slow
def test_compile_layers_equals_plain_on_padded_and_packed_batches_without_recompiles():
    """compile_layers() (inductor on this CPU) against the plain blocks: every hidden state, s_max
    and attention weights; a second token count reuses the two compiled graphs (the relative bias
    stays in the attention call, outside them)."""
    from .compile_layers_checks import compiled_equals_plain_without_recompiles

    m = _tiny_model(attn_backend="sdpa", pack_padded=True)
    ids, mask = _batch()
    row, _ = _batch([6, 25, 11], left_rows=(), seed=3)
    row = row[row != 0][None]  # the three sequences side by side (no id 0 inside a sequence)
    info = anyattn.SeqInfo.from_lengths([6, 25, 11], total_length=row.shape[1])
    one, _ = _batch([19], left_rows=(), seed=4)
    runs = [
        ("padded", lambda m: m(ids, attention_mask=mask, output_hidden_states=True, output_s_max=True)),
        ("packed", lambda m: m(row, seq_info=info, output_hidden_states=True)),
        ("attentions", lambda m: m(one, output_attentions=True)),
    ]
    compiled_equals_plain_without_recompiles(m, runs)


def test_compile_layers_auto_falls_back_once_when_compiling_fails(monkeypatch):
    from .compile_layers_checks import auto_compiles_nothing_on_cpu, auto_falls_back_once_with_a_warning

    m = _tiny_model(attn_backend="sdpa")
    ids, mask = _batch()
    call = lambda m: m(ids, attention_mask=mask).last_hidden_state
    auto_compiles_nothing_on_cpu(m, call, monkeypatch)
    auto_falls_back_once_with_a_warning(m, call, monkeypatch)


def test_compile_layers_setting_is_validated_and_saved():
    with pytest.raises(ValueError, match="compile_layers: expected 'auto', True or False"):
        AnkhConfig(compile_layers="yes")
    assert AnkhConfig.from_config_dict(AnkhConfig(compile_layers=False).to_dict()).compile_layers is False
    assert AnkhConfig().compile_layers == "auto"
