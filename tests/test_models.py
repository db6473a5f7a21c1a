"""anyattn.models: the protein tokenizer, the light package import, loading and the Auto classes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from anyattn.layout import SeqInfo
from anyattn.models import ProteinTokenizer, load_tokenizer

ESM_ORDER = ("<cls> <pad> <eos> <unk> L A G V S E R T I D P K Q N F Y M H W C X B U Z O . - <null_1> <mask>").split()
SRC = os.path.join(os.path.dirname(__file__), "..", "src")


# ---------------------------------------------------------------- tokenizer
def test_esm_alphabet_is_hf_esm_tokenizer_order():
    tok = ProteinTokenizer.esm()
    assert tok.vocab == tuple(ESM_ORDER)
    assert (tok.cls_token_id, tok.pad_token_id, tok.eos_token_id, tok.unk_token_id, tok.mask_token_id) == (0, 1, 2, 3, 32)
    assert len(tok) == 33 and tok.x_token_id == 24


def test_encode_wraps_residues_in_cls_eos_and_reads_special_tokens():
    tok = ProteinTokenizer.esm()
    assert tok.encode("MKV") == [0, 20, 15, 7, 2]
    assert tok.encode("") == [0, 2]
    assert tok.encode("M<mask>K") == [0, 20, 32, 15, 2]
    assert tok.encode("MKV", add_special_tokens=False) == [20, 15, 7]


def test_encode_unknown_character_error_names_character_and_position():
    tok = ProteinTokenizer.esm()
    with pytest.raises(ValueError, match=r"'J' at position 2"):
        tok.encode("MKJV")
    with pytest.raises(ValueError, match=r"'m' at position 0"):  # no case folding
        tok.encode("mkv")
    with pytest.raises(ValueError, match=r"'<' at position 1"):  # '<' that starts no token
        tok.encode("M<K")
    assert tok.encode("MKJV", unknown="x") == [0, 20, 15, 24, 7, 2]
    with pytest.raises(ValueError, match="unknown: expected one of"):
        tok.encode("MKV", unknown="skip")


def test_batch_error_names_the_sequence():
    with pytest.raises(ValueError, match=r"'J' at position 0 \(sequence 1\)"):
        ProteinTokenizer.esm()(["MKV", "JK"])


def test_call_pads_right_with_attention_mask():
    tok = ProteinTokenizer.esm()
    out = tok(["MKV", "M"])
    assert out["input_ids"].tolist() == [[0, 20, 15, 7, 2], [0, 20, 2, 1, 1]]
    assert out["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]
    assert out["input_ids"].dtype == torch.long
    lists = tok(["MKV", "M"], padding=False, return_tensors=None)
    assert lists["input_ids"] == [[0, 20, 15, 7, 2], [0, 20, 2]]
    with pytest.raises(ValueError, match="padding"):
        tok(["MKV", "M"], padding=False)


def test_pack_gives_one_row_and_seqinfo_of_the_lengths():
    tok = ProteinTokenizer.esm()
    ids, info = tok.pack(["MKV", "M", ""])
    assert ids.shape == (1, 10) and ids.dtype == torch.long
    assert ids[0].tolist() == [0, 20, 15, 7, 2, 0, 20, 2, 0, 2]
    assert isinstance(info, SeqInfo) and info.kind == "documents"
    assert info.cu_seqlens.tolist() == [0, 5, 8, 10] and info.max_seqlen == 5


def test_decode_roundtrip_and_skips_specials():
    tok = ProteinTokenizer.esm()
    seq = "MKVLAGX.-"
    assert tok.decode(tok.encode(seq)) == seq
    assert tok.decode(torch.tensor(tok.encode("MK")), skip_special_tokens=False) == "<cls>MK<eos>"
    with pytest.raises(ValueError, match=r"ids: expected token ids in \[0, 33\)"):
        tok.decode([0, 99])


def test_save_pretrained_is_read_by_hf_esm_tokenizer_with_same_ids(tmp_path):
    transformers = pytest.importorskip("transformers")
    tok = ProteinTokenizer.esm()
    tok.save_pretrained(tmp_path)
    hf = transformers.EsmTokenizer.from_pretrained(str(tmp_path))
    assert hf.get_vocab() == tok.token_to_id
    for s in ["MKVLAGSERTIDPKQNFYMHWCXBUZO", "A", "", "MK<mask>V"]:
        assert hf(s)["input_ids"] == tok.encode(s)
    assert (hf.pad_token_id, hf.mask_token_id, hf.cls_token_id, hf.eos_token_id) == (1, 32, 0, 2)


def test_from_vocab_file_and_from_pretrained_roundtrip(tmp_path):
    tok = ProteinTokenizer.esm()
    tok.save_pretrained(tmp_path)
    assert ProteinTokenizer.from_vocab_file(tmp_path / "vocab.txt").vocab == tok.vocab
    assert load_tokenizer(str(tmp_path)).vocab == tok.vocab
    bad = tmp_path / "bad.txt"
    bad.write_text("A\nB\n")
    with pytest.raises(ValueError, match="cls_token: expected a token of the vocabulary"):
        ProteinTokenizer.from_vocab_file(bad)


def test_custom_special_token_names_survive_save(tmp_path):
    tok = ProteinTokenizer(["[CLS]", "[PAD]", "[SEP]", "[UNK]", "A", "C", "[MASK]"], cls_token="[CLS]", pad_token="[PAD]",
                           eos_token="[SEP]", unk_token="[UNK]", mask_token="[MASK]")  # fmt: skip
    assert tok.encode("AC[MASK]") == [0, 4, 5, 6, 2]
    with pytest.raises(ValueError, match="no 'X' token"):
        tok.encode("A", unknown="x")
    tok.save_pretrained(tmp_path)
    again = ProteinTokenizer.from_pretrained(tmp_path)
    assert again.special_tokens == tok.special_tokens
    assert json.loads((tmp_path / "tokenizer_config.json").read_text())["mask_token"] == "[MASK]"


# ---------------------------------------------------------------- import boundary
def test_import_anyattn_models_does_not_import_transformers():
    """anyattn.models.decoder and the tokenizer must work without transformers: the package
    import may not pull it in; the model classes load on first access."""
    code = (
        "import sys; import anyattn.models as m; assert 'transformers' not in sys.modules, 'eager import';"
        "t = m.ProteinTokenizer.esm(); assert t.encode('A') == [0, 5, 2]; print('ok')"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, "PYTHONPATH": SRC})
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr


# ---------------------------------------------------------------- ESM2 as transformers models
transformers = pytest.importorskip("transformers")

from anyattn.models import ESM2Config, ESM2ForMaskedLM, ESM2Model, load  # noqa: E402
from anyattn.backends import Facts  # noqa: E402
from anyattn.models import esm2 as esm2_module  # noqa: E402
from anyattn.packing import bucket_length  # noqa: E402
from anyattn.backends.eager import EagerBackend  # noqa: E402
from anyattn.testing import record_calls, use_backend  # noqa: E402

TOL = 1e-5
PAD, MASK = 1, 32


def _tiny(**kw) -> ESM2Config:
    base = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, max_position_embeddings=64)
    base.update(kw)
    return ESM2Config(**base)


def _random_model(seed=0, **kw) -> ESM2ForMaskedLM:
    torch.manual_seed(seed)
    m = ESM2ForMaskedLM(_tiny(**kw)).eval()
    with torch.no_grad():  # non-trivial LayerNorms and biases
        for n, p in m.named_parameters():
            if n.endswith("bias") or "LayerNorm" in n or "layer_norm" in n:
                p.add_(0.1 * torch.randn_like(p))
    return m


def _batch(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    S = max(lengths)
    ids = torch.full((len(lengths), S), PAD, dtype=torch.long)
    for b, n in enumerate(lengths):
        ids[b, :n] = torch.randint(4, 24, (n,), generator=g)
    am = (torch.arange(S)[None] < torch.tensor(lengths)[:, None]).long()
    return ids, am


def test_auto_classes_resolve_our_model_type(tmp_path):
    m = _random_model()
    m.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "anyattn_esm2"
    assert isinstance(transformers.AutoConfig.from_pretrained(tmp_path), ESM2Config)
    mlm = transformers.AutoModelForMaskedLM.from_pretrained(tmp_path)
    enc = transformers.AutoModel.from_pretrained(tmp_path)
    assert type(mlm) is ESM2ForMaskedLM and type(enc) is ESM2Model
    ids, am = _batch([9, 4])
    with torch.no_grad():
        a = m(ids, attention_mask=am).last_hidden_state
        b = enc(ids, attention_mask=am).last_hidden_state
    assert (a - b)[am.bool()].abs().max().item() == 0.0
    esm2_module.register_auto()  # idempotent
    esm2_module.register_auto()


def test_save_pretrained_roundtrip_keeps_weights_and_attn_backend(tmp_path):
    m = _random_model(seed=1)
    m.attn_backend = "eager"
    m.save_pretrained(tmp_path)
    again = ESM2ForMaskedLM.from_pretrained(tmp_path)
    assert again.attn_backend == "eager" and again.config.attn_backend == "eager"
    sd, sd2 = m.state_dict(), again.state_dict()
    assert set(sd) == set(sd2) and all(torch.equal(sd[k], sd2[k]) for k in sd)
    assert again.lm_head.decoder.weight is again.esm.embeddings.word_embeddings.weight  # tied
    via_load = load(str(tmp_path), attn_backend="sdpa")
    assert type(via_load) is ESM2ForMaskedLM and via_load.attn_backend == "sdpa" and not via_load.training
    assert all(torch.equal(sd[k], via_load.state_dict()[k]) for k in sd)
    assert load(str(tmp_path)).attn_backend == "eager"  # no argument: the saved backend
    m.attn_backend = ["eager", "sdpa"]
    m.save_pretrained(tmp_path)
    assert tuple(load(str(tmp_path)).attn_backend) == ("eager", "sdpa")


def test_from_pretrained_bf16_keeps_rotary_inv_freq_float32(tmp_path):
    _random_model().save_pretrained(tmp_path)
    m = ESM2ForMaskedLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert m.esm.encoder.layer[0].attention.self.query.weight.dtype == torch.bfloat16
    inv = m.esm.rotary_embeddings.inv_freq
    assert inv.dtype == torch.float32
    assert torch.equal(inv, m.esm.rotary_embeddings.compute_inv_freq())
    m2 = _random_model().to(torch.bfloat16)
    assert m2.esm.rotary_embeddings.inv_freq.dtype == torch.float32


def test_rotary_is_computed_in_float32_for_bf16_models():
    """A bf16 model must rotate q and k in float32 (cos/sin of positions up to ~1000 in bf16 lose
    ~3 digits): the layer's q equals the float32 rotation of the bf16 projection, rounded once,
    and differs from an all-bf16 rotation."""
    m = _random_model(max_position_embeddings=1026).to(torch.bfloat16)
    esm = m.esm
    S = 1026
    pos = torch.arange(S)[None]
    cos, sin = esm.rotary_embeddings(pos)
    assert cos.dtype == sin.dtype == torch.float32
    ang = pos[..., None].double() * esm.rotary_embeddings.inv_freq.double()
    assert (cos[0, :, 0, : ang.shape[-1]].double() - ang[0].cos()).abs().max() < 1e-5
    layer = esm.encoder.layer[0]
    a, sa = layer.attention, layer.attention.self
    x = torch.randn(1, S, 32).to(torch.bfloat16)
    h = torch.nn.functional.layer_norm(x, (32,), a.LayerNorm.weight, a.LayerNorm.bias, a.LayerNorm.eps)
    q, k, _ = esm2_module._qkv(h, sa.query.weight, sa.query.bias, sa.key.weight, sa.key.bias, sa.value.weight,
                               sa.value.bias, cos, sin, 4)  # fmt: skip
    q0 = (torch.nn.functional.linear(h, sa.query.weight, sa.query.bias).view(1, S, 4, 8) * 8**-0.5)
    rot = lambda t: torch.cat((-t[..., 4:], t[..., :4]), -1)  # noqa: E731
    want = (q0.float() * cos + rot(q0.float()) * sin).to(torch.bfloat16)
    bf16_rope = q0 * cos.to(torch.bfloat16) + rot(q0) * sin.to(torch.bfloat16)
    assert torch.equal(q, want)
    assert not torch.equal(q, bf16_rope)


def _direct_s_max(model, ids, am):
    """Per layer, per head: max over (row, i, j) real tokens of the same row of ||q_i|| * ||k_j||,
    with q, k recomputed from each layer's input (hidden_states) by plain torch."""
    with torch.no_grad():
        hs = model(ids, attention_mask=am, output_hidden_states=True).hidden_states
        out = []
        pos = (torch.cumsum(am, -1) - 1).clamp_min(0)
        cos, sin = model.esm.rotary_embeddings(pos)
        for layer, x in zip(model.esm.encoder.layer, hs[:-1]):
            a, sa = layer.attention, layer.attention.self
            h = torch.nn.functional.layer_norm(x, (x.shape[-1],), a.LayerNorm.weight, a.LayerNorm.bias, a.LayerNorm.eps)
            B, S, C = x.shape
            q = sa.query(h).view(B, S, 4, C // 4) * (C // 4) ** -0.5
            k = sa.key(h).view(B, S, 4, C // 4)
            q, k = esm2_module._rope(q, k, cos, sin)
            qn, kn = q.norm(dim=-1), k.norm(dim=-1)  # (B, S, H)
            prod = qn[:, :, None, :] * kn[:, None, :, :]  # (B, S, S, H)
            vis = (am.bool()[:, :, None] & am.bool()[:, None, :])[..., None]
            out.append(torch.where(vis, prod, 0.0).amax((0, 1, 2)))
    return torch.stack(out)


@pytest.mark.parametrize("pack", [False, True])
def test_s_max_matches_a_direct_computation(pack):
    m = _random_model(seed=2, attn_backend="sdpa", pack_padded=pack)
    ids, am = _batch([12, 30, 5, 21], seed=3)
    with torch.no_grad():
        out = m(ids, attention_mask=am, output_s_max=True)
    want = _direct_s_max(m, ids, am)
    assert out.s_max.shape == (2, 4) and out.s_max.dtype == torch.float32
    assert torch.allclose(out.s_max, want, rtol=1e-5, atol=1e-6), (out.s_max, want)
    # padding must not count: a huge embedding at a padding position changes nothing
    with torch.no_grad():
        ids2 = ids.clone()
        ids2[2, 10] = MASK  # row 2 has 5 real tokens; position 10 is padding
        assert torch.equal(m(ids2, attention_mask=am, output_s_max=True).s_max, out.s_max)
    with torch.no_grad():  # no mask: every row one sequence
        dense = m(ids[:1, :12], output_s_max=True).s_max
    assert torch.allclose(dense, _direct_s_max(m, ids[:1, :12], am[:1, :12]), rtol=1e-5, atol=1e-6)


def test_padded_batch_runs_packed_when_the_backend_takes_packed_documents():
    """sdpa on CPU: dense mask, no packing ("auto"); flex: packed; pack_padded=True forces it.
    The packed path must equal the padded one at the real tokens and be 0 at padding."""
    m = _random_model(seed=4, attn_backend="sdpa")
    ids, am = _batch([12, 30, 5, 21], seed=5)
    plan = m.esm._plan(ids, am, None, False)
    assert plan.rows is None and plan.ids.shape == ids.shape
    m.pack_padded = True
    plan = m.esm._plan(ids, am, None, False)
    assert plan.rows is not None and plan.ids.shape == (1, 68) and plan.info.kind == "documents"
    assert plan.info.cu_seqlens.tolist() == [0, 12, 42, 47, 68]
    with torch.no_grad():
        packed = m(ids, attention_mask=am, output_hidden_states=True)
        m.pack_padded = False
        padded = m(ids, attention_mask=am, output_hidden_states=True)
    keep = am.bool()
    for a, b in zip((packed.logits, *packed.hidden_states), (padded.logits, *padded.hidden_states)):
        assert (a - b)[keep].abs().max().item() <= TOL
    assert packed.logits[~keep].abs().max().item() == 0.0
    m.pack_padded = "auto"
    m.attn_backend = "flash_torch"

    class VarlenLike(EagerBackend):  # takes packed documents natively, any length (as flash_torch on CUDA)
        name = "flash_torch"
        facts = Facts(packed_documents=True)

    with use_backend(VarlenLike()):
        plan = m.esm._plan(ids, am, None, False)
    assert plan.ids.shape == (1, 68) and plan.backend == "flash_torch"  # exactly the real tokens
    m.attn_backend = "flex"

    class FlexLike(EagerBackend):  # compiles one kernel per length (as flex): a bucketed row
        name = "flex"
        facts = Facts(packed_documents=True, static_shapes=True)

    with use_backend(FlexLike()):
        plan = m.esm._plan(ids, am, None, False)
    assert plan.ids.shape == (1, 80) and plan.info.total == 68 and not plan.info.keep[0, 68:].any()
    assert (plan.ids[0, 68:] == PAD).all()
    assert m.esm._plan(ids, am, None, True).rows is None  # output_attentions: (B, S, S) weights, padded


def test_packed_row_tail_padding_is_not_computed():
    m = _random_model(seed=6, attn_backend="sdpa", pack_padded=True)
    info = __import__("anyattn").SeqInfo.from_lengths([7, 9, 4], total_length=32)
    ids = torch.full((1, 32), PAD, dtype=torch.long)
    ids[0, :20] = torch.randint(4, 24, (20,))
    plan = m.esm._plan(ids, None, info, False)
    assert plan.ids.shape == (1, 20)
    with torch.no_grad():
        out = m(ids, seq_info=info).logits
        m.pack_padded = False
        ref = m(ids, seq_info=info).logits
    assert out.shape == ref.shape == (1, 32, 33)
    assert (out[0, :20] - ref[0, :20]).abs().max().item() <= TOL and out[0, 20:].abs().max().item() == 0.0


def test_attn_backend_setter_switches_every_layer():
    m = _random_model(seed=7)
    m.attn_backend = "eager"
    ids, am = _batch([6, 3])
    with torch.no_grad(), record_calls() as seen:
        m(ids, attention_mask=am)
    assert [c.backend for c in seen] == ["eager", "eager"] and m.config.attn_backend == "eager" and m.esm.attn_backend == "eager"
    with pytest.raises(ValueError, match="backend"):
        m.attn_backend = "nope"
    with pytest.raises(ValueError, match="attn_backend|backend"):
        ESM2Config(attn_backend="nope")


def test_compiled_layers_do_not_recompile_across_token_counts():
    """Packed batches have a different token count each time; the compiled layer functions mark
    that dimension dynamic (dynamo's default would specialize and, after 8 recompiles, silently
    run uncompiled)."""
    from torch._dynamo.utils import counters

    m = _random_model(seed=8, attn_backend="sdpa", pack_padded=True)
    torch._dynamo.reset()
    counters.clear()
    m.compile_layers(backend="eager")  # dynamo guards only: fast on CPU
    outs, refs = [], []
    with torch.no_grad():
        for lens in ([5, 9], [7, 3, 11], [20, 1], [13]):
            ids, am = _batch(lens, seed=len(lens))
            outs.append(m(ids, attention_mask=am).logits)
    assert counters["stats"]["unique_graphs"] == 2, dict(counters["stats"])
    assert m.config.compile_layers is True  # compile_layers() is the explicit form of the switch
    m.config.compile_layers = False  # the plain layers again
    with torch.no_grad():
        for o, lens in zip(outs, ([5, 9], [7, 3, 11], [20, 1], [13])):
            ids, am = _batch(lens, seed=len(lens))
            assert (o - m(ids, attention_mask=am).logits)[am.bool()].abs().max().item() <= TOL


def test_fused_qkv_equals_separate_projections():
    m = _random_model(seed=9, attn_backend="sdpa")
    ids, am = _batch([9, 14], seed=1)
    with torch.no_grad():
        ref = m(ids, attention_mask=am).logits
        m.compile_layers(fuse_qkv=True, backend="eager")  # dynamo without inductor: fast on CPU
        out = m(ids, attention_mask=am).logits
    assert (out - ref)[am.bool()].abs().max().item() <= TOL


def test_compile_layers_auto_is_the_default_and_compiles_nothing_on_cpu():
    """The plain call compiles its layers where that is safe (inference on CUDA, see the CUDA
    tests); on a CPU it must not: compiling there costs seconds per kernel."""
    from torch._dynamo.utils import counters

    m = _random_model(seed=9, attn_backend="sdpa")
    assert m.config.compile_layers == "auto"
    torch._dynamo.reset()
    counters.clear()
    ids, am = _batch([9, 14], seed=1)
    with torch.no_grad():
        m(ids, attention_mask=am)
    assert counters["stats"]["unique_graphs"] == 0 and m.esm._compiled_fns is None
    with pytest.raises(ValueError, match="compile_layers: expected 'auto', True or False"):
        ESM2Config(compile_layers="yes")


def test_compile_layers_devices_env_selects_where_auto_compiles(monkeypatch):
    """ANYATTN_COMPILE_LAYERS_DEVICES lists the device types where "auto" compiles (docs/embed.md
    suggests "none" for a one-off job too small to pay for compiling); training never compiles."""
    from anyattn.models._compile import auto_compiles

    cpu = torch.device("cpu")
    monkeypatch.setenv("ANYATTN_COMPILE_LAYERS_DEVICES", "cuda, cpu")
    assert auto_compiles(cpu, grad=False) and not auto_compiles(cpu, grad=True)
    monkeypatch.setenv("ANYATTN_COMPILE_LAYERS_DEVICES", "none")
    assert not auto_compiles(cpu, grad=False) and not auto_compiles(torch.device("cuda"), grad=False)
    monkeypatch.delenv("ANYATTN_COMPILE_LAYERS_DEVICES")
    assert not auto_compiles(cpu, grad=False)  # the default: CUDA only


def test_labels_give_the_masked_lm_loss():
    m = _random_model(seed=10, attn_backend="sdpa")
    ids, am = _batch([9, 14], seed=2)
    labels = torch.where(am.bool(), ids, -100)
    with torch.no_grad():
        out = m(ids, attention_mask=am, labels=labels)
    want = torch.nn.functional.cross_entropy(out.logits[am.bool()], ids[am.bool()])
    assert out[0] is out.loss and abs(out.loss.item() - want.item()) < 1e-5
    with pytest.raises(ValueError, match="labels: expected a tensor of shape"):
        m(ids, labels=labels[:, :3])


def test_peft_lora_changes_the_output_trains_and_merges():
    peft = pytest.importorskip("peft")
    m = _random_model(seed=11, attn_backend="sdpa")
    ids, am = _batch([9, 14], seed=3)
    with torch.no_grad():
        base = m(ids, attention_mask=am).logits
    pm = peft.get_peft_model(m, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], init_lora_weights=False))
    labels = torch.where(am.bool(), ids, -100)
    out = pm(input_ids=ids, attention_mask=am, labels=labels)
    # the LoRA terms are applied (the fused path would read the base weights only and miss them)
    assert (out.logits - base)[am.bool()].abs().max().item() > 1e-3
    out.loss.backward()
    trained = [n for n, p in pm.named_parameters() if p.requires_grad]
    assert trained and all("lora_" in n for n in trained)
    assert all(p.grad is not None for n, p in pm.named_parameters() if p.requires_grad)
    merged = pm.merge_and_unload()
    assert type(merged) is ESM2ForMaskedLM
    with torch.no_grad():
        assert (merged(ids, attention_mask=am).logits - out.logits.detach())[am.bool()].abs().max().item() <= TOL


# ---------------------------------------------------------------- loading and refusals
def _hf_dir(tmp_path, **kw):
    cfg = _tiny(**kw)
    torch.manual_seed(0)
    hf = transformers.EsmForMaskedLM(transformers.EsmConfig(**cfg.to_hf_dict())).eval()
    hf.save_pretrained(tmp_path)
    return hf


def test_load_detects_hf_esm2_and_matches_transformers(tmp_path):
    hf = _hf_dir(tmp_path)
    m = load(str(tmp_path), attn_backend="eager")
    assert type(m) is ESM2ForMaskedLM and m.attn_backend == "eager"
    assert m.esm.encoder.layer[0].attention.self.query.weight.dtype == torch.float32
    ids, am = _batch([9, 14], seed=4)
    with torch.no_grad():
        d = (m(ids, attention_mask=am).logits - hf(ids, attention_mask=am).logits)[am.bool()].abs().max().item()
    assert d <= TOL
    m16 = load(str(tmp_path), dtype=torch.bfloat16)
    assert m16.lm_head.decoder.weight.dtype == torch.bfloat16 and m16.esm.rotary_embeddings.inv_freq.dtype == torch.float32
    also = ESM2ForMaskedLM.from_pretrained(tmp_path)  # HF's own directory through from_pretrained
    assert all(torch.equal(v, also.state_dict()[k]) for k, v in m.state_dict().items())


def test_load_refuses_unknown_families_with_a_clear_error(tmp_path):
    _hf_dir(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    for change, match in [
        ({"architectures": ["EsmForTokenClassification"]}, r"known family \(e1, dplm, esm2.*architectures \['EsmForTokenClassification'\]"),
        ({"position_embedding_type": "absolute"}, r"position_embedding_type 'absolute'"),
        ({"model_type": "bert"}, r"model_type 'bert'"),
    ]:
        (tmp_path / "config.json").write_text(json.dumps({**cfg, **change}))
        with pytest.raises(ValueError, match=match):
            load(str(tmp_path))
    with pytest.raises(ValueError, match="config.json"):
        load(str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="hub id 'owner/name'"):
        load("/definitely/not/here")


def test_loaders_refuse_unknown_missing_and_mismatched_weights(tmp_path):
    from safetensors.torch import load_file, save_file

    _hf_dir(tmp_path)
    sd = load_file(str(tmp_path / "model.safetensors"))
    bad = dict(sd)
    bad["esm.encoder.layer.0.attention.self.qkv.weight"] = torch.zeros(3)
    del bad["esm.encoder.layer.1.output.dense.bias"]
    save_file(bad, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match=r"unknown key.*qkv\.weight.*missing key.*layer\.1\.output\.dense\.bias"):
        load(str(tmp_path))
    with pytest.raises(ValueError, match=r"qkv\.weight"):  # transformers' path, made strict
        ESM2ForMaskedLM.from_pretrained(tmp_path)
    shaped = dict(sd)
    shaped["esm.encoder.layer.0.intermediate.dense.weight"] = torch.zeros(5, 32)
    save_file(shaped, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match=r"shape mismatch.*intermediate\.dense\.weight"):
        load(str(tmp_path))


def test_families_registry_order_and_replacement():
    from anyattn.models import FAMILIES, Family, register_family

    saved = list(FAMILIES)
    try:
        fam = Family("lookalike", lambda c: c.get("architectures") == ["EsmForDPLM"], lambda *a: "loaded")
        assert [f.name for f in FAMILIES] == ["e1", "dplm", "esm2", "esmc", "ankh"]  # the registered families
        register_family(fam)  # before esm2 by default
        assert [f.name for f in FAMILIES] == ["e1", "dplm", "lookalike", "esm2", "esmc", "ankh"]
        register_family(fam, before=None)  # replaced, now last
        assert [f.name for f in FAMILIES] == ["e1", "dplm", "esm2", "esmc", "ankh", "lookalike"]
        with pytest.raises(ValueError, match="before"):
            register_family(fam, before="nope")
    finally:
        FAMILIES[:] = saved


def test_load_tokenizer_from_a_model_and_its_directory(tmp_path):
    m = _random_model()
    assert load_tokenizer(m).vocab == tuple(ESM_ORDER)
    m.save_pretrained(tmp_path)
    ProteinTokenizer.esm().save_pretrained(tmp_path)
    assert load_tokenizer(str(tmp_path)).vocab == tuple(ESM_ORDER)
    odd = _random_model(vocab_size=40)
    with pytest.raises(ValueError, match="path_or_model"):
        load_tokenizer(odd)


@pytest.mark.parametrize("pack", [False, True])
def test_forward_under_inference_mode(pack):
    """Masks built from inference tensors must still be usable as cache keys (they have no
    version counter): padded batches, packed rows and seq_info built inside inference_mode."""
    import anyattn

    m = _random_model(seed=12, attn_backend="sdpa", pack_padded=pack)
    ids, am = _batch([300, 40, 7], seed=6)  # > 256 mask elements: keyed by identity, not content
    with torch.no_grad():
        ref = m(ids, attention_mask=am).logits
    with torch.inference_mode():
        out = m(ids, attention_mask=am.bool()).logits
        info = anyattn.SeqInfo.from_lengths([300, 40, 7], total_length=360)
        row = torch.full((1, 360), PAD, dtype=torch.long)
        row[0, :347] = ids[am.bool()]
        packed = m(row, seq_info=info).logits
    assert (out - ref)[am.bool()].abs().max().item() <= TOL
    assert (packed[0, :347] - ref[am.bool()]).abs().max().item() <= TOL


def test_bucket_lengths_bound_padding_and_kernel_count():
    b = bucket_length
    assert [b(t) for t in (1, 64, 65, 68, 16000, 16384, 16385, 6880)] == [64, 64, 80, 80, 16384, 16384, 20480, 7168]
    for t in range(65, 40000, 37):
        assert t <= b(t) <= 1.25 * t + 1
    assert len({b(t) for t in range(14337, 16385)}) == 1  # ~16k-token batches share one kernel


def test_hub_download_fetches_one_weights_format(monkeypatch, tmp_path):
    """A hub repository with both model.safetensors and pytorch_model.bin: only the safetensors
    are downloaded (read_weights reads those alone). Without safetensors the .bin files are
    fetched; when the file list cannot be had (offline) every pattern is kept."""
    huggingface_hub = pytest.importorskip("huggingface_hub")
    from anyattn.models import hub

    listing = {"owner/both": ["config.json", "model.safetensors", "pytorch_model.bin", "tf_model.h5", "vocab.txt"],
               "owner/bin": ["config.json", "pytorch_model.bin", "vocab.txt"]}  # fmt: skip
    asked = {}

    def list_repo_files(self, repo_id, **kw):
        if repo_id not in listing:
            raise OSError("offline")
        return listing[repo_id]

    def snapshot_download(repo_id, allow_patterns=None, **kw):
        asked[repo_id] = list(allow_patterns)
        return str(tmp_path)

    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files", list_repo_files)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    for repo in ("owner/both", "owner/bin", "owner/offline"):
        assert hub.download(repo) == str(tmp_path)
    assert "*.safetensors" in asked["owner/both"] and not any(p.startswith("pytorch_model") for p in asked["owner/both"])
    assert "pytorch_model*.bin" in asked["owner/bin"] and "config.json" in asked["owner/bin"]
    assert asked["owner/offline"] == hub.MODEL_FILES
    hub.download("owner/both", allow_patterns=["vocab.txt"])
    assert asked["owner/both"] == ["vocab.txt"]  # explicit patterns are used as given


@pytest.mark.parametrize("backend", ["eager", "sdpa"])
@pytest.mark.parametrize("pack", ["auto", True, False])
def test_degenerate_rows_stay_in_their_row(backend, pack):
    """Token dropout divides by the <mask> share of each sequence. An all-padding row (an empty
    sequence) and a sequence made only of <mask> tokens are 0/0 and x/0 in HF's formula; in a
    packed row a non-finite value would reach every other sequence through attention. Both
    leave the other rows exactly as they are alone, and stay finite themselves."""
    m = _random_model(seed=4, token_dropout=True)
    m.attn_backend, m.config.pack_padded = backend, pack
    ids, am = _batch([7, 5, 3], seed=2)
    ids[0], am[0] = PAD, 0  # empty first row
    ids[2, :3] = MASK  # third row: <mask> tokens only
    with torch.no_grad():
        out = m(ids, attention_mask=am).logits
        alone = m(ids[1:2, :5], attention_mask=am[1:2, :5]).logits
    assert torch.isfinite(out[am.bool()]).all()
    assert (out[1, :5] - alone[0]).abs().max().item() <= TOL


def test_bad_token_inputs_name_the_argument():
    m = _random_model()
    ids, am = _batch([6, 4])
    with pytest.raises(ValueError, match=r"input_ids: expected token ids in \[0, 33\)"):
        m(ids.clone().fill_(40), attention_mask=am)
    bad = ids.clone()
    bad[1, 5] = -1  # at a padding position: still refused (the embedding reads every position)
    with pytest.raises(ValueError, match="input_ids"):
        m(bad, attention_mask=am)
    for dtype in (torch.int8, torch.uint8, torch.bool, torch.float32):
        with pytest.raises((TypeError, ValueError), match="input_ids"):
            m(ids.to(dtype), attention_mask=am)
    with torch.no_grad():  # HF also takes a floating 0/1 attention_mask
        a = m(ids, attention_mask=am).logits
        b = m(ids, attention_mask=am.float()).logits
        c = m(ids.int(), attention_mask=am.bool()).logits
    assert torch.equal(a, b) and torch.equal(a, c)
    with pytest.raises(ValueError, match="attention_mask"):
        m(ids, attention_mask=am[:, :3])
