"""E1 on anyattn (CPU): against an independent float64 formulation written from E1's definitions.

No E1 reference package is installable here (none on the package index this machine reaches), so
the oracle below is written from the facts in docs/e1.md: dense per-sample masks built from the
definitions (within-sequence: same sequence; global: seq(j) <= seq(i) inside the sample), plain
softmax, float64, one sample at a time with no padding at all.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("safetensors")

import anyattn  # noqa: E402
from anyattn.models.e1 import (  # noqa: E402
    E1Config,
    E1ForMaskedLM,
    E1Model,
    E1Tokenizer,
    is_e1_config,
    load_e1,
    register_auto,
)

TOK = E1Tokenizer()
MAXLEN = 40  # max_num_positions_within_seq of the tiny config


def tiny_config(**kw) -> E1Config:
    d = dict(
        hidden_size=32, intermediate_size=48, gated_mlp=True, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, global_attention_every_n_layers=3, clip_qkv=8.0, max_num_sequences=8,
        max_num_positions_within_seq=MAXLEN, max_num_positions_global=1024, rope_theta_within_seq=10000.0,
        rope_theta_global=500000.0,
    )  # fmt: skip
    d.update(kw)
    return E1Config(**d)


def make_model(seed=0, **kw) -> E1ForMaskedLM:
    torch.manual_seed(seed)
    m = E1ForMaskedLM(tiny_config(**kw)).eval()
    with torch.no_grad():  # non-trivial weights: large enough for attention and clip_qkv to matter
        for name, p in m.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name or name == "mlm_head.2.weight":
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            else:
                p.copy_(0.3 * torch.randn_like(p))
    return m


# ---------------------------------------------------------------------------------------------
# the float64 oracle


def _rms(x, w, eps):
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * w


def _rope(x, pos, theta):
    D = x.shape[-1]
    inv = theta ** -(torch.arange(0, D, 2, dtype=torch.float64) / D)
    ang = pos.double()[:, None] * inv[None]
    cos, sin = torch.cat((ang, ang), -1).cos()[:, None], torch.cat((ang, ang), -1).sin()[:, None]
    rot = torch.cat((-x[..., D // 2 :], x[..., : D // 2]), -1)
    return x * cos + rot * sin


def reference(model: E1ForMaskedLM, sequences: list[list[int]]):
    """One sample (token lists of its sequences, query last) -> hidden states, logits, weights, s_max."""
    cfg = model.config
    P = {k: v.detach().double() for k, v in model.state_dict().items()}
    ids = torch.tensor([t for s in sequences for t in s])
    seq = torch.tensor([i for i, s in enumerate(sequences) for _ in s])
    wpos = torch.tensor([p for s in sequences for p in range(len(s))])
    gpos = torch.arange(len(ids))
    H, G, D = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    n, eps, clip = len(ids), cfg.rms_norm_eps, cfg.clip_qkv
    x = P["model.embed_tokens.weight"][ids] + P["model.embed_seq_id.weight"][seq]
    hidden, weights, smax = [x], [], []
    for i in range(cfg.num_hidden_layers):
        pre = f"model.layers.{i}."
        a = pre + "norm_attn_norm."
        is_global = (i + 1) % cfg.global_attention_every_n_layers == 0
        vis = (seq[None, :] <= seq[:, None]) if is_global else (seq[None, :] == seq[:, None])
        pos, theta = (gpos, cfg.rope_theta_global) if is_global else (wpos, cfg.rope_theta_within_seq)
        h = _rms(x, P[a + "input_layernorm.weight"], eps)
        q = (h @ P[a + "self_attn.q_proj.weight"].T).view(n, H, D).clamp(-clip, clip)
        k = (h @ P[a + "self_attn.k_proj.weight"].T).view(n, G, D).clamp(-clip, clip)
        v = (h @ P[a + "self_attn.v_proj.weight"].T).view(n, G, D).clamp(-clip, clip)
        q, k = _rope(q, pos, theta), _rope(k, pos, theta)
        kh, vh = k.repeat_interleave(H // G, 1), v.repeat_interleave(H // G, 1)
        s = torch.einsum("ihd,jhd->hij", q, kh) / math.sqrt(D)
        s = s.masked_fill(~vis[None], float("-inf"))
        p = torch.softmax(s, -1)
        weights.append(p)
        norms = q.norm(dim=-1).T[:, :, None] * kh.norm(dim=-1).T[:, None, :] / math.sqrt(D)  # (H, i, j)
        smax.append(norms.masked_fill(~vis[None], 0).amax(dim=(1, 2)))
        o = torch.einsum("hij,jhd->ihd", p, vh).reshape(n, H * D)
        x = x + o @ P[a + "self_attn.o_proj.weight"].T
        h = _rms(x, P[a + "post_attention_layernorm.weight"], eps)
        f = torch.nn.functional.silu(h @ P[pre + "ffn.mlp.w1.weight"].T) * (h @ P[pre + "ffn.mlp.w3.weight"].T)
        x = x + f @ P[pre + "ffn.mlp.w2.weight"].T
        hidden.append(x)
    x = _rms(x, P["model.norm.weight"], eps)
    hidden[-1] = x
    h = x @ P["mlm_head.0.weight"].T + P["mlm_head.0.bias"]
    h = 0.5 * h * (1 + torch.erf(h / math.sqrt(2)))
    h = torch.nn.functional.layer_norm(h, (h.shape[-1],), P["mlm_head.2.weight"], P["mlm_head.2.bias"], eps)
    logits = h @ P["mlm_head.3.weight"].T + P["mlm_head.3.bias"]
    return hidden, logits, weights, torch.stack(smax)


def sample_tokens(sample) -> list[list[int]]:
    parts = sample.split(",") if isinstance(sample, str) else [*sample[1], sample[0]]
    return [TOK._one(p) for p in parts]


def check_against_reference(model, samples, out, rows_mask, tol=1e-5):
    """Compare every hidden state and the logits at the real tokens of each row."""
    worst = 0.0
    smax_ref = None
    for r, sample in enumerate(samples):
        hid, logits, _, smax = reference(model, sample_tokens(sample))
        smax_ref = smax if smax_ref is None else torch.maximum(smax_ref, smax)
        keep = rows_mask[r].bool()
        for li, (a, b) in enumerate(zip(out.hidden_states, hid)):
            d = (a[r][keep].double() - b).abs().max().item()
            assert d <= tol * max(1.0, b.abs().max().item()), f"row {r} hidden state {li}: max abs diff {d:.3g}"
            worst = max(worst, d)
        d = (out.logits[r][keep].double() - logits).abs().max().item()
        assert d <= tol * max(1.0, logits.abs().max().item()), f"row {r} logits: max abs diff {d:.3g}"
    return worst, smax_ref


MIXED = ["MKTAYIAKQR?QISFVKSHF", "GSUZBOX,ACD?EFW,MKV?L", "MA", ("WYVHK", ["ACDE", "FGHIKLMN"])]


# eager / sdpa: padded layout (per-row same_segment & block_causal masks); "auto" and
# ("eager", "flex"): packed layout (one row of documents; eager or sdpa serve it on CPU)
LAYOUTS = ["eager", "sdpa", "auto", ("eager", "flex")]
LAYOUT_IDS = ["eager-padded", "sdpa-padded", "auto-packed", "eager-packed"]


@pytest.mark.parametrize("backend", LAYOUTS, ids=LAYOUT_IDS)
@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_matches_float64_reference_mixed_contexts(backend, padding_side):
    """Logits and every layer's hidden state, mixed lengths, several context sequences."""
    model = make_model(attn_backend=backend)
    b = TOK.batch(MIXED, padding_side=padding_side)
    with torch.no_grad():
        out = model(b["input_ids"], b["attention_mask"], output_hidden_states=True, output_s_max=True)
    assert len(out.hidden_states) == model.config.num_hidden_layers + 1
    _, smax_ref = check_against_reference(model, MIXED, out, b["attention_mask"])
    torch.testing.assert_close(out.s_max.double(), smax_ref, rtol=1e-5, atol=1e-5)
    # padding positions are zeros in the hidden states
    assert out.last_hidden_state[~b["attention_mask"].bool()].abs().max() == 0


@pytest.mark.parametrize("backend", ["sdpa", ("eager", "flex")], ids=["sdpa-padded", "eager-packed"])
@pytest.mark.parametrize(
    "samples",
    [["ACDEFGHIK,LMNPQ,RSTVW"], ["M"], ["A" * (MAXLEN - 4)], ["M", "A" * (MAXLEN - 4) + ",MKV"]],
    ids=["batch_of_one_context", "length_1", "max_length", "length_1_and_max_padded"],
)
def test_matches_float64_reference_edge_shapes(backend, samples):
    model = make_model(attn_backend=backend)
    b = TOK.batch(samples)
    with torch.no_grad():
        out = model(b["input_ids"], b["attention_mask"], output_hidden_states=True)
    check_against_reference(model, samples, out, b["attention_mask"])
    # no attention_mask at all: every row one full sample
    if len(samples) == 1:
        with torch.no_grad():
            out2 = model(b["input_ids"], output_hidden_states=True)
        torch.testing.assert_close(out2.logits, out.logits, rtol=0, atol=1e-6)


def test_oracle_comparison_catches_a_wrong_global_mask(monkeypatch):
    """The comparison can fail: global layers run as within-sequence layers must be caught."""
    model = make_model(attn_backend="sdpa")
    for layer in model.model.layers:
        monkeypatch.setattr(layer, "is_global", False)
    b = TOK.batch(["ACD,EFGH,MKV"])
    with torch.no_grad():
        out = model(b["input_ids"], b["attention_mask"], output_hidden_states=True)
    with pytest.raises(AssertionError, match="hidden state 3"):
        check_against_reference(model, ["ACD,EFGH,MKV"], out, b["attention_mask"])


def test_longer_than_max_length_is_refused():
    model = make_model()
    b = TOK.batch(["A" * (MAXLEN - 3)])
    with pytest.raises(ValueError, match="max_num_positions_within_seq=40"):
        model(b["input_ids"], b["attention_mask"])


@pytest.mark.slow
def test_flex_compiled_matches_reference():
    """One flex case (CPU flex compiles a kernel per mask signature; flex needs D >= 16)."""
    model = make_model(attn_backend="flex", hidden_size=64, intermediate_size=96)
    samples = ["GSUZBOX,ACD?EFW,MKV?L", "MKTAYIAK"]
    b = TOK.batch(samples)
    with torch.no_grad():
        out = model(b["input_ids"], b["attention_mask"], output_hidden_states=True)
    check_against_reference(model, samples, out, b["attention_mask"])


@pytest.mark.parametrize("backend", ["sdpa", "auto"], ids=["padded-layout", "packed-layout"])
def test_packed_input_equals_padded_input_and_explicit_ids(backend):
    """seq_info input (several samples in one row) = padded input; explicit ids = derived ids."""
    model = make_model(attn_backend=backend)
    p = TOK.pack(MIXED, total_length=200)
    b = TOK.batch(MIXED)
    with torch.no_grad():
        packed = model(p["input_ids"], seq_info=p["seq_info"])
        padded = model(b["input_ids"], b["attention_mask"])
        explicit = model(
            b["input_ids"], b["attention_mask"], sequence_ids=b["sequence_ids"],
            within_seq_position_ids=b["within_seq_position_ids"], global_position_ids=b["global_position_ids"],
        )  # fmt: skip
    torch.testing.assert_close(explicit.logits, padded.logits, rtol=0, atol=0)
    keep = b["attention_mask"].bool()
    got = packed.logits[0][: keep.sum()]
    torch.testing.assert_close(got, padded.logits[keep], rtol=0, atol=2e-5)


@pytest.mark.parametrize("backend", ["sdpa", "auto"], ids=["padded", "packed"])
def test_output_attentions_are_the_reference_weights_and_backend_stays(backend):
    model = make_model(attn_backend=backend)
    samples = ["ACD,EFGH,MKV", "MKTA"]
    b = TOK.batch(samples, padding_side="left")
    with pytest.warns(UserWarning, match="eager path"):
        out = model(b["input_ids"], b["attention_mask"], output_attentions=True)
    assert model.attn_backend == backend
    for r, s in enumerate(samples):
        _, _, w, _ = reference(model, sample_tokens(s))
        keep = b["attention_mask"][r].bool()
        for li in range(model.config.num_hidden_layers):
            got = out.attentions[li][r][:, keep][:, :, keep].double()
            torch.testing.assert_close(got, w[li], rtol=0, atol=2e-6)


def test_attn_backend_switches_every_layer_and_is_validated(monkeypatch):
    import anyattn.models.e1 as e1

    model = make_model()
    seen = []
    real = e1.attention

    def spy(*a, **kw):
        seen.append(kw["backend"])
        return real(*a, **kw)

    monkeypatch.setattr(e1, "attention", spy)
    model.attn_backend = "eager"
    b = TOK.batch(["ACD,MKV"])
    with torch.no_grad():
        model(b["input_ids"], b["attention_mask"])
    assert seen == ["eager"] * 3
    assert model.config.attn_backend == "eager" and model.model.attn_backend == "eager"
    with pytest.raises(ValueError, match="backend"):
        model.attn_backend = "no_such_backend"


def test_named_backend_that_cannot_serve_block_causal_refuses():
    """No silent fallback: a backend without block-causal support raises for context samples."""
    names = {b.name for b in anyattn.backends()}
    if "flash_torch" not in names:
        pytest.skip("flash_torch not registered")
    model = make_model(attn_backend="flash_torch")
    b = TOK.batch(["ACD,MKV"])
    with pytest.raises(anyattn.UnsupportedError):
        model(b["input_ids"], b["attention_mask"])


def test_rotary_is_computed_in_float32(monkeypatch):
    """bf16 model: q after rotary equals float32 rotation of the bf16 projection, cast once."""
    import anyattn.models.e1 as e1

    model = make_model(num_hidden_layers=3).to(torch.bfloat16)
    captured = []
    real = e1.attention
    monkeypatch.setattr(e1, "attention", lambda q, k, v, **kw: captured.append(q) or real(q, k, v, **kw))
    b = TOK.batch(["A" * 30 + ",MKVLA"])
    with torch.no_grad():
        model(b["input_ids"], b["attention_mask"])
    cfg, layer = model.config, model.model.layers[2]  # global layer: positions up to 41, theta 5e5
    # recompute layer 2's q from the model's own input to that layer (hidden state 2)
    with torch.no_grad():
        hs = model(b["input_ids"], b["attention_mask"], output_hidden_states=True).hidden_states[2][0]
    na = layer.norm_attn_norm
    h = torch.nn.functional.rms_norm(hs, (cfg.hidden_size,), na.input_layernorm.weight, cfg.rms_norm_eps)
    q = (h @ na.self_attn.q_proj.weight.T).view(-1, cfg.num_attention_heads, cfg.head_dim).clamp(-8, 8)
    pos = b["global_position_ids"][0].double()
    inv = cfg.rope_theta_global ** -(torch.arange(0, cfg.head_dim, 2, dtype=torch.float64) / cfg.head_dim)
    ang = torch.cat((pos[:, None] * inv, pos[:, None] * inv), -1)[:, None]
    rot = torch.cat((-q[..., cfg.head_dim // 2 :], q[..., : cfg.head_dim // 2]), -1)
    want = (q.double() * ang.cos() + rot.double() * ang.sin()).to(torch.bfloat16)
    got = captured[2][0].transpose(0, 1)
    diff = (got.double() - want.double()).abs().max().item()
    assert got.dtype == torch.bfloat16
    # float32 rotation, one rounding to bf16: at most one bf16 ulp from the float64 rotation
    assert diff <= 2 ** -7 * want.double().abs().max().item(), diff


# ---------------------------------------------------------------------------------------------
# HF integration and loading


def _original_config(cfg: E1Config) -> dict:
    keys = [
        "vocab_size", "hidden_size", "intermediate_size", "gated_mlp", "num_hidden_layers", "num_attention_heads",
        "num_key_value_heads", "hidden_act", "rms_norm_eps", "initializer_range", "pad_token_id", "bos_token_id",
        "eos_token_id", "tie_word_embeddings", "global_attention_every_n_layers", "max_num_sequences",
        "max_num_positions_within_seq", "max_num_positions_global", "rope_theta_within_seq", "rope_theta_global", "clip_qkv",
    ]  # fmt: skip
    d = {k: getattr(cfg, k) for k in keys}
    d.update(model_type="E1", architectures=["E1ForMaskedLM"], dtype="float32", gradient_checkpointing=False,
             no_ffn_gradient_checkpointing=True, use_cache=True, transformers_version="4.57.1")  # fmt: skip
    return d


def _write_original(tmp_path, model, sd=None):
    from safetensors.torch import save_file

    d = tmp_path / "e1_original"
    d.mkdir(exist_ok=True)
    (d / "config.json").write_text(json.dumps(_original_config(model.config)))
    sd = {k: v.contiguous() for k, v in (model.state_dict() if sd is None else sd).items()}
    save_file(sd, str(d / "model.safetensors"))
    return str(d)


def test_load_original_format_directory(tmp_path):
    model = make_model(seed=3, attn_backend="sdpa")
    path = _write_original(tmp_path, model)
    assert is_e1_config(json.load(open(os.path.join(path, "config.json"))))
    loaded = load_e1(path, attn_backend="sdpa")
    assert loaded.attn_backend == "sdpa" and not loaded.training
    b = TOK.batch(MIXED)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**{k: b[k] for k in ("input_ids", "attention_mask")}).logits,
                                   model(b["input_ids"], b["attention_mask"]).logits, rtol=0, atol=0)  # fmt: skip


def test_anyattn_models_load_and_load_tokenizer_detect_e1(tmp_path):
    """anyattn.models.load routes an original E1 directory to E1ForMaskedLM (the family is
    registered ahead of esm2), and load_tokenizer gives the E1 tokenizer for it."""
    import anyattn.models as am
    from anyattn.models.e1_tokenizer import E1Tokenizer

    model = make_model(seed=3, attn_backend="sdpa")
    path = _write_original(tmp_path, model)
    loaded = am.load(path, attn_backend="eager")
    assert type(loaded).__name__ == "E1ForMaskedLM" and loaded.attn_backend == "eager"
    # no tokenizer.json next to the weights: the default vocabulary, with a warning (its ids 3..33
    # are not verified against the released checkpoints')
    with pytest.warns(UserWarning, match="no tokenizer.json"):
        assert isinstance(am.load_tokenizer(path), E1Tokenizer)
    with pytest.warns(UserWarning, match="no tokenizer.json"):
        assert isinstance(am.load_tokenizer(loaded), E1Tokenizer)


def test_load_tokenizer_reads_the_checkpoints_tokenizer_json(tmp_path):
    """With a tokenizer.json (the tokenizers-library format the checkpoints carry) next to the
    weights, its ids are used, for the directory, for a model loaded from it and for a hub id
    (the hub download fetches config.json and tokenizer.json, not the weights)."""
    import warnings

    import anyattn.models as am
    import anyattn.models.hub as hub

    model = make_model(seed=3, attn_backend="sdpa")
    path = _write_original(tmp_path, model)
    # another id order than the default: letters first, then the markers (ids 0-2 fixed)
    order = ["<pad>", "<bos>", "<eos>", *"ABCDEFGHIJKLMNOPQRSTUVWXYZ", "?", "1", "2", "<unk>", "<mask>"]
    vocab = {t: i for i, t in enumerate(order)}
    tj = {"model": {"type": "WordLevel", "vocab": {t: i for t, i in vocab.items() if not t.startswith("<")}},
          "added_tokens": [{"id": i, "content": t} for t, i in vocab.items() if t.startswith("<")]}  # fmt: skip
    with open(os.path.join(path, "tokenizer.json"), "w") as f:
        json.dump(tj, f)
    loaded = am.load(path, attn_backend="eager")
    calls = []

    def fake_download(repo_id, *, allow_patterns=None):
        calls.append((repo_id, list(allow_patterns or [])))
        return path

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no default-vocabulary warning on any of these
        for src in (path, loaded):
            tok = am.load_tokenizer(src)
            assert isinstance(tok, E1Tokenizer) and tok.vocab == vocab
        orig = hub.download
        hub.download = fake_download
        try:
            tok = am.load_tokenizer("Profluent-Bio/E1-300m")
        finally:
            hub.download = orig
    assert tok.vocab == vocab
    assert tok.encode("AC")["input_ids"] == [1, 30, 3, 5, 31, 2]  # <bos> 1 A C 2 <eos> in this order
    assert calls and calls[0][0] == "Profluent-Bio/E1-300m"
    assert "tokenizer.json" in calls[0][1] and "config.json" in calls[0][1]
    assert not any(p.endswith((".safetensors", ".bin")) for p in calls[0][1])  # no weights for a tokenizer
    assert "tokenizer.json" in hub.MODEL_FILES  # a model downloaded from the hub brings its tokenizer


def test_load_refuses_unknown_missing_and_misshaped_keys(tmp_path):
    model = make_model()
    sd = dict(model.state_dict())
    sd["model.layers.0.extra.weight"] = torch.zeros(3)
    del sd["model.layers.1.ffn.mlp.w3.weight"]
    sd["model.norm.weight"] = torch.ones(31)
    path = _write_original(tmp_path, model, sd)
    with pytest.raises(ValueError) as e:
        load_e1(path)
    msg = str(e.value)
    assert "1 unknown key(s): ['model.layers.0.extra.weight']" in msg
    assert "1 missing key(s): ['model.layers.1.ffn.mlp.w3.weight']" in msg
    assert "model.norm.weight: checkpoint (31,), model (32,)" in msg


def test_load_refuses_non_e1_config(tmp_path):
    d = tmp_path / "esm"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "esm", "hidden_size": 8}))
    with pytest.raises(ValueError, match="config.json: expected an E1 config"):
        load_e1(str(d))
    assert not is_e1_config({"model_type": "esm"})
    assert is_e1_config({"model_type": "E1"}) and is_e1_config({"model_type": "anyattn_e1"})


def test_save_pretrained_from_pretrained_and_auto_classes(tmp_path):
    from transformers import AutoConfig, AutoModel, AutoModelForMaskedLM

    register_auto()
    register_auto()  # idempotent
    model = make_model(seed=5, attn_backend="eager")
    model.save_pretrained(str(tmp_path / "ours"))
    again = E1ForMaskedLM.from_pretrained(str(tmp_path / "ours")).eval()
    auto = AutoModelForMaskedLM.from_pretrained(str(tmp_path / "ours")).eval()
    assert type(auto) is E1ForMaskedLM and auto.attn_backend == "eager"
    assert type(AutoConfig.from_pretrained(str(tmp_path / "ours"))) is E1Config
    enc = AutoModel.from_pretrained(str(tmp_path / "ours")).eval()
    assert type(enc) is E1Model
    b = TOK.batch(MIXED)
    with torch.no_grad():
        ref = model(b["input_ids"], b["attention_mask"])
        for m in (again, auto):
            torch.testing.assert_close(m(b["input_ids"], b["attention_mask"]).logits, ref.logits, rtol=0, atol=0)
        got = enc(b["input_ids"], b["attention_mask"]).last_hidden_state
        torch.testing.assert_close(got, ref.last_hidden_state, rtol=0, atol=0)
    # our own saved directory also loads through load_e1 (model_type anyattn_e1), by default on
    # the backend it was saved with
    loaded = load_e1(str(tmp_path / "ours"))
    assert loaded.attn_backend == "eager" and load_e1(str(tmp_path / "ours"), attn_backend="sdpa").attn_backend == "sdpa"
    torch.testing.assert_close(loaded(b["input_ids"], b["attention_mask"]).logits, ref.logits, rtol=0, atol=0)


def test_peft_lora_trains_adapters_only():
    peft = pytest.importorskip("peft")
    model = make_model()
    cfg = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"])
    pm = peft.get_peft_model(model, cfg)
    trainable = [n for n, p in pm.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    b = TOK.batch(["ACD,MKV", "MKTAY"])
    out = pm(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
    out.logits.float().pow(2).mean().backward()
    assert all(p.grad is not None for n, p in pm.named_parameters() if p.requires_grad)


# ---------------------------------------------------------------------------------------------
# tokenizer


def test_tokenizer_multi_sequence_format():
    v = TOK.vocab
    enc = TOK.encode("MK", context=["A"])
    seq = lambda *t: [v["<bos>"], v["1"], *(v[x] for x in t), v["2"], v["<eos>"]]  # noqa: E731
    assert enc["input_ids"] == seq("A") + seq("M", "K")
    assert enc["sequence_ids"] == [0] * 5 + [1] * 6
    assert enc["within_seq_position_ids"] == list(range(5)) + list(range(6))
    assert enc["global_position_ids"] == list(range(11))
    assert enc["context_len"] == 5
    assert TOK.encode("A,MK") == enc  # the original's comma format, query last
    assert TOK.decode(enc["input_ids"]) == "<bos>1A2<eos><bos>1MK2<eos>"
    b = TOK.batch(["A,MK", "M?"], padding_side="left")
    assert b["attention_mask"].tolist()[1] == [0] * 5 + [1] * 6
    assert b["sequence_ids"].tolist()[1] == [-1] * 5 + [0] * 6
    with pytest.raises(ValueError, match="upper-case letters"):
        TOK.encode("mk")
    p = TOK.pack(["A,MK", "M"], total_length=20)
    assert p["seq_info"].host_lengths == ((11, 5),) and p["input_ids"].shape == (1, 20)


def test_tokenizer_reads_tokenizer_json(tmp_path):
    vocab = {t: i for i, t in enumerate(["<pad>", "<bos>", "<eos>", "1", "2", "?", *"ACDEFGHIKLMNPQRSTVWYXBUZOJ"])}
    (tmp_path / "tokenizer.json").write_text(json.dumps({"model": {"type": "WordLevel", "vocab": vocab}}))
    t = E1Tokenizer.from_pretrained(str(tmp_path))
    assert t.encode("A")["input_ids"] == [1, 3, 6, 4, 2]


def test_bad_sequence_ids_are_refused():
    model = make_model()
    b = TOK.batch(["ACD,MKV"])
    sid = b["sequence_ids"].clone()
    sid[sid == 1] = 2
    with pytest.raises(ValueError, match=r"sequence_ids: expected 0, 1, 2, ... in order"):
        model(b["input_ids"], b["attention_mask"], sequence_ids=sid)


def test_bad_token_inputs_name_the_argument():
    model = make_model()
    b = TOK.batch(["ACD,MKV", "MA"])
    ids, am = b["input_ids"], b["attention_mask"]
    with pytest.raises(ValueError, match=r"input_ids: expected token ids in \[0, 34\)"):
        model(ids.masked_fill(ids == TOK.vocab["A"], 60), am)
    with pytest.raises(TypeError, match="input_ids"):
        model(ids.to(torch.int8), am)
    with torch.no_grad():  # a floating 0/1 attention_mask, as HF takes it
        torch.testing.assert_close(model(ids, am.float()).logits, model(ids, am).logits, rtol=0, atol=0)


def test_explicit_positions_beyond_the_maximum_are_refused():
    model = make_model()
    b = TOK.batch(["ACD,MKV", "MA"])
    pos = b["within_seq_position_ids"].clone()
    ok = model(b["input_ids"], b["attention_mask"], within_seq_position_ids=pos)
    assert torch.isfinite(ok.logits).all()
    pos[0, 2] = MAXLEN
    with pytest.raises(ValueError, match=r"within_seq_position_ids: expected positions of real tokens in \[0, max_num_positions_within_seq=40\)"):
        model(b["input_ids"], b["attention_mask"], within_seq_position_ids=pos)


def test_tokenizer_refuses_wrong_types_naming_the_argument():
    with pytest.raises(TypeError, match="samples: expected a list of samples"):
        TOK.batch("MKV")  # a bare string is not three one-residue samples
    with pytest.raises(TypeError, match="samples"):
        TOK.pack("MKV")
    with pytest.raises(TypeError, match="query"):
        TOK.encode(None)
    with pytest.raises(TypeError, match="context"):
        TOK.encode("MKV", context=5)
    with pytest.raises(TypeError, match=r"samples\[1\]"):
        TOK.batch(["MKV", ("AC",)])
    with pytest.raises(ValueError, match=r"context\[0\]"):
        TOK.encode("MKV", context=["mkv"])
    assert TOK.encode("MKV", context=None) == TOK.encode("MKV")
    assert TOK.batch([["MKV", ["AC"]]])["input_ids"].tolist() == TOK.batch([("MKV", ["AC"])])["input_ids"].tolist()


def test_input_without_bos_is_refused():
    model = make_model()
    ids = torch.tensor([[TOK.vocab["A"], TOK.vocab["<eos>"]]])
    with pytest.raises(ValueError, match="start with <bos>"):
        model(ids)


def test_import_anyattn_and_the_e1_detector_do_not_import_transformers():
    """anyattn.models.load() detects the family from config.json without the models extra."""
    code = (
        "import sys, anyattn; assert 'transformers' not in sys.modules, 'anyattn imported transformers'\n"
        "from anyattn.models.e1_tokenizer import is_e1_config, E1Tokenizer\n"
        "assert is_e1_config({'model_type': 'E1'}) and E1Tokenizer().encode('M')\n"
        "assert 'transformers' not in sys.modules, 'the E1 detector imported transformers'"
    )
    env = dict(os.environ)
    subprocess.run([sys.executable, "-c", code], check=True, env=env)


# ---------------------------------------------------------------------------------------------
# compile_layers


@pytest.mark.slow
def test_compile_layers_equals_plain_on_padded_and_packed_batches_without_recompiles():
    """compile_layers() (inductor on this CPU) against the plain layers: logits, every hidden
    state, s_max and attention weights, within-sequence and global layers alike; a second token
    count reuses the two compiled graphs."""
    from .compile_layers_checks import compiled_equals_plain_without_recompiles

    model = make_model(attn_backend=("eager", "flex"))  # packed layout, eager serves it on CPU
    b = TOK.batch(MIXED)
    p = TOK.pack(["MKTAYIAK", "GSU,ACDEF"], total_length=40)
    one = TOK.batch(["ACD,EFGHIKL"])
    runs = [
        ("padded", lambda m: m(b["input_ids"], b["attention_mask"], output_hidden_states=True, output_s_max=True)),
        ("packed", lambda m: m(p["input_ids"], seq_info=p["seq_info"], output_hidden_states=True)),
        ("attentions", lambda m: m(one["input_ids"], output_attentions=True)),
    ]
    compiled_equals_plain_without_recompiles(model, runs)


def test_compile_layers_auto_falls_back_once_when_compiling_fails(monkeypatch):
    from .compile_layers_checks import auto_compiles_nothing_on_cpu, auto_falls_back_once_with_a_warning

    b = TOK.batch(MIXED)
    call = lambda m: m(b["input_ids"], b["attention_mask"]).logits
    model = make_model(attn_backend="sdpa")
    auto_compiles_nothing_on_cpu(model, call, monkeypatch)
    auto_falls_back_once_with_a_warning(model, call, monkeypatch)  # E1ForMaskedLM forwards to E1Model
    enc = make_model(attn_backend="sdpa").model
    auto_falls_back_once_with_a_warning(enc, lambda m: m(b["input_ids"], b["attention_mask"]).last_hidden_state, monkeypatch)


def test_compile_layers_setting_is_validated_and_saved():
    with pytest.raises(ValueError, match="compile_layers: expected 'auto', True or False"):
        tiny_config(compile_layers="yes")
    assert E1Config.from_original(tiny_config(compile_layers=False).to_dict()).compile_layers is False
    assert tiny_config().compile_layers == "auto"
