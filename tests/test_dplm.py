"""DPLM and DPLM-2 on anyattn against their reference formulations (float32, CPU).

Checkpoints are written here in the original format: a config.json shaped like the hub's (an
EsmConfig dict plus ``dplm_type`` and ``architectures``) and safetensors under the names that
``EsmForDPLM`` / ``EsmForDPLM2`` (transformers 4.x) save, random weights.

* DPLM's network is HF ``EsmForMaskedLM``: the reference is transformers itself, loaded with the
  same tensors through an explicit name mapping written below (``_to_hf_names``).
* DPLM-2 (``dplm2_esm``) differs in its rotary positions and in rescaling the embeddings twice:
  the reference is ``_reference``, an independent float64 forward written here from the official
  code's description (docs/dplm.md). It is first checked against transformers on a DPLM network
  (same weights, no DPLM-2 differences), so the reference itself is anchored.

Logits and every hidden state must agree to 1e-5 (max abs) at the real tokens.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

from anyattn.models.dplm import (  # noqa: E402
    DPLM2ForMaskedLM,
    DPLMForMaskedLM,
    DPLM2Tokenizer,
    dplm2_positions,
    is_dplm2_config,
    is_dplm_config,
    load_dplm,
    load_dplm_tokenizer,
    map_dplm_keys,
)
from anyattn.models.tokenizer import ProteinTokenizer  # noqa: E402

TOL = 1e-5
PAD, MASK = 1, 32
C, L, H, F = 32, 2, 4, 64  # hidden, layers, heads, FFN
ESM_VOCAB = ("<cls>", "<pad>", "<eos>", "<unk>", *"LAGVSERTIDPKQNFYMHWCXBUZO.-", "<null_1>", "<mask>")
DPLM2_AA = ("<cls_aa>", "<pad>", "<eos_aa>", "<unk_aa>", *"LAGVSERTIDPKQNFYMHWCXBUZO.-", "<null_1>", "<mask_aa>")
NUM_CODES = 16  # structure codes of the tiny DPLM-2 vocabulary (the real one has 8192)
DPLM2_VOCAB = (*DPLM2_AA, "<cls_struct>", "<eos_struct>", "<unk_struct>", *(f"{i:04d}" for i in range(NUM_CODES)), "<mask_struct>")


def _config(dplm_type, vocab_size, tie):
    cfg = transformers.EsmConfig(
        vocab_size=vocab_size, hidden_size=C, num_hidden_layers=L, num_attention_heads=H, intermediate_size=F,
        max_position_embeddings=64, position_embedding_type="rotary", token_dropout=True, emb_layer_norm_before=False,
        pad_token_id=PAD, mask_token_id=MASK, layer_norm_eps=1e-5, hidden_dropout_prob=0.1,
        attention_probs_dropout_prob=0.0, tie_word_embeddings=tie,
    ).to_dict()  # fmt: skip
    arch = {"dplm_esm": "EsmForDPLM", "dplm2_esm": "EsmForDPLM2"}.get(dplm_type, "EsmForDPLM2Bit")
    cfg.update(dplm_type=dplm_type, architectures=[arch], model_type="esm")
    return cfg


def _original_state_dict(vocab_size, tie, seed):
    """Random weights under the names EsmForDPLM/EsmForDPLM2 checkpoints carry (transformers 4.x:
    one rotary inv_freq per layer, the tied decoder stored too)."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, std=0.1, mean=0.0):
        return mean + std * torch.randn(*shape, generator=g)

    D = C // H
    inv_freq = 1.0 / (10000 ** (torch.arange(0, D, 2, dtype=torch.float) / D))
    sd = {"esm.embeddings.word_embeddings.weight": rnd(vocab_size, C, std=0.3)}
    for i in range(L):
        p = f"esm.encoder.layer.{i}."
        for n in ("query", "key", "value"):
            sd[p + f"attention.self.{n}.weight"] = rnd(C, C, std=0.2)
            sd[p + f"attention.self.{n}.bias"] = rnd(C)
        sd[p + "attention.self.rotary_embeddings.inv_freq"] = inv_freq.clone()
        sd[p + "attention.output.dense.weight"] = rnd(C, C, std=0.2)
        sd[p + "attention.output.dense.bias"] = rnd(C)
        sd[p + "attention.LayerNorm.weight"] = rnd(C, mean=1.0)
        sd[p + "attention.LayerNorm.bias"] = rnd(C)
        sd[p + "intermediate.dense.weight"] = rnd(F, C, std=0.2)
        sd[p + "intermediate.dense.bias"] = rnd(F)
        sd[p + "output.dense.weight"] = rnd(C, F, std=0.2)
        sd[p + "output.dense.bias"] = rnd(C)
        sd[p + "LayerNorm.weight"] = rnd(C, mean=1.0)
        sd[p + "LayerNorm.bias"] = rnd(C)
    sd["esm.encoder.emb_layer_norm_after.weight"] = rnd(C, mean=1.0)
    sd["esm.encoder.emb_layer_norm_after.bias"] = rnd(C)
    sd["esm.contact_head.regression.weight"] = rnd(1, L * H)
    sd["esm.contact_head.regression.bias"] = rnd(1)
    sd["lm_head.dense.weight"] = rnd(C, C, std=0.2)
    sd["lm_head.dense.bias"] = rnd(C)
    sd["lm_head.layer_norm.weight"] = rnd(C, mean=1.0)
    sd["lm_head.layer_norm.bias"] = rnd(C)
    sd["lm_head.decoder.weight"] = sd["esm.embeddings.word_embeddings.weight"].clone() if tie else rnd(vocab_size, C, std=0.3)
    sd["lm_head.bias"] = rnd(vocab_size)
    return sd


def _to_hf_names(sd_orig):
    """Explicit map from the original checkpoint names to transformers 5.x EsmForMaskedLM's: the
    per-layer rotary inv_freq (all equal) becomes the model-level one; every other name is HF's."""
    out = {}
    for k, v in sd_orig.items():
        if k.endswith(".attention.self.rotary_embeddings.inv_freq"):
            if k.startswith("esm.encoder.layer.0."):
                out["esm.rotary_embeddings.inv_freq"] = v
            continue
        out[k] = v
    return out


def _hf_model(cfg):
    hf_cfg = transformers.EsmConfig(**cfg)
    hf_cfg._attn_implementation = "eager"
    return transformers.EsmForMaskedLM(hf_cfg).eval()


def _write(path, cfg, sd, *, fmt="safetensors", vocab=None):
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(cfg))
    if fmt == "safetensors":
        safetensors_torch.save_file({k: v.contiguous() for k, v in sd.items()}, str(path / "model.safetensors"))
    else:
        torch.save(sd, path / "pytorch_model.bin")
    if vocab is not None:
        (path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    return path


@pytest.fixture(scope="module")
def dplm(tmp_path_factory):
    cfg = _config("dplm_esm", 33, tie=True)
    sd = _original_state_dict(33, tie=True, seed=0)
    path = _write(tmp_path_factory.mktemp("dplm_tiny"), cfg, sd, vocab=ESM_VOCAB)
    hf = _hf_model(cfg)
    hf.load_state_dict(_to_hf_names(sd), strict=True)
    return path, cfg, sd, hf


@pytest.fixture(scope="module")
def dplm2(tmp_path_factory):
    V = len(DPLM2_VOCAB)
    cfg = _config("dplm2_esm", V, tie=False)
    sd = _original_state_dict(V, tie=False, seed=1)
    path = _write(tmp_path_factory.mktemp("dplm2_tiny"), cfg, sd, vocab=DPLM2_VOCAB)
    return path, cfg, sd


# ---------------------------------------------------------------------------------------------
# the independent float64 reference of the official DPLM-2 forward


def _reference(sd, cfg, ids, *, twice, modality_positions):
    """Float64 forward of the official model. ``twice``: the multimodal wrapper's second pass
    through EsmEmbeddings; ``modality_positions``: EsmForDPLM2's rotary (positions restart at the
    second half when the BATCH holds both amino-acid (<33) and structure (>=33) real tokens)."""
    sd = {k: v.double() for k, v in sd.items()}
    D = C // H
    B, S = ids.shape
    keep = ids != cfg["pad_token_id"]
    x = sd["esm.embeddings.word_embeddings.weight"][ids]
    for _ in range(2 if twice else 1):  # EsmEmbeddings with attention_mask = input_ids != pad
        is_mask = ids == cfg["mask_token_id"]
        x = x.masked_fill(is_mask[..., None], 0.0)
        r = is_mask.sum(-1).double() / keep.sum(-1).double()
        x = x * (1 - 0.15 * 0.8) / (1 - r)[:, None, None]
        x = x * keep[..., None]
    hidden = [x]
    if modality_positions and ((ids < 33) & keep).any() and ((ids >= 33) & keep).any():
        h = math.ceil(S / 2)
        pos = torch.cat([torch.arange(h), torch.arange(S - h)]).double()
    else:
        pos = torch.arange(S).double()
    inv = 1.0 / (10000 ** (torch.arange(0, D, 2).double() / D))
    ang = torch.cat([pos[:, None] * inv, pos[:, None] * inv], -1)
    cos, sin = ang.cos(), ang.sin()

    def rot(t):
        t1, t2 = t.chunk(2, -1)
        return t * cos + torch.cat([-t2, t1], -1) * sin

    def lin(t, name):
        return t @ sd[name + ".weight"].T + sd[name + ".bias"]

    def ln(t, name):
        return torch.nn.functional.layer_norm(t, (C,), sd[name + ".weight"], sd[name + ".bias"], cfg["layer_norm_eps"])

    def gelu(t):
        return t * 0.5 * (1.0 + torch.erf(t / math.sqrt(2.0)))

    key_bias = torch.where(keep, 0.0, -math.inf).double()[:, None, None, :]
    for i in range(L):
        p = f"esm.encoder.layer.{i}."
        a = ln(x, p + "attention.LayerNorm")
        q, k, v = (lin(a, p + f"attention.self.{n}").view(B, S, H, D).transpose(1, 2) for n in ("query", "key", "value"))
        q, k = rot(q * D**-0.5), rot(k)
        w = torch.softmax(q @ k.transpose(-1, -2) + key_bias, -1)
        o = (w @ v).transpose(1, 2).reshape(B, S, C)
        x = x + lin(o, p + "attention.output.dense")
        x = x + lin(gelu(lin(ln(x, p + "LayerNorm"), p + "intermediate.dense")), p + "output.dense")
        hidden.append(x)
    x = ln(x, "esm.encoder.emb_layer_norm_after")
    hidden[-1] = x
    y = ln(gelu(lin(x, "lm_head.dense")), "lm_head.layer_norm")
    logits = y @ sd["lm_head.decoder.weight"].T + sd["lm_head.bias"]
    return logits, hidden


def _errs(out, logits, hidden, keep):
    errs = {"logits": (out.logits.double() - logits.double())[keep].abs().max().item()}
    assert len(out.hidden_states) == len(hidden) == L + 1
    for i, (a, b) in enumerate(zip(out.hidden_states, hidden)):
        errs[f"hidden[{i}]"] = (a.double() - b.double())[keep].abs().max().item()
    return errs


def _assert_close(errs, what):
    bad = {k: v for k, v in errs.items() if not v <= TOL}
    assert not bad, f"{what}: max abs diff above {TOL}: {bad} (all: {errs})"


# ---------------------------------------------------------------------------------------------
# DPLM: transformers is the reference


def _dplm_batch(lengths, seed=0, masks=()):
    g = torch.Generator().manual_seed(seed)
    ids = torch.full((len(lengths), max(lengths)), PAD, dtype=torch.long)
    for b, n in enumerate(lengths):
        ids[b, :n] = torch.randint(4, 24, (n,), generator=g)
        ids[b, 0] = 0
        if n > 1:
            ids[b, n - 1] = 2
    for b, s in masks:
        ids[b, s] = MASK
    return ids


@pytest.mark.parametrize(
    "lengths,masks",
    [([17, 9, 30, 3], [(0, 3), (0, 5), (2, 7), (1, 1)]), ([12], [(0, 4)]), ([1], []), ([1, 5], [(1, 2)])],
    ids=["mixed-padded", "batch-of-one", "length-1", "length-1-padded"],
)
@pytest.mark.parametrize("backend", ["eager", "sdpa"])
def test_dplm_matches_transformers(dplm, lengths, masks, backend):
    """DPLM checkpoint -> load_dplm == HF EsmForMaskedLM with the same weights (attention_mask =
    input_ids != pad, as EsmForDPLM.forward builds it), logits and every hidden state."""
    path, cfg, sd, hf = dplm
    model = load_dplm(str(path), attn_backend=backend)
    assert type(model) is DPLMForMaskedLM and model.config.dplm_type == "dplm_esm"
    ids = _dplm_batch(lengths, masks=masks)
    am = (ids != PAD).long()
    with torch.no_grad():
        out = model(ids, attention_mask=am, output_hidden_states=True)
        ref = hf(ids, attention_mask=am, output_hidden_states=True)
    _assert_close(_errs(out, ref.logits, ref.hidden_states, am.bool()), f"DPLM {lengths} on {backend}")


def test_reference_matches_transformers_on_a_dplm_network(dplm):
    """The float64 reference used for DPLM-2, run without the DPLM-2 differences, equals
    transformers (in float64) on a DPLM network: the reference's ESM layer math is transformers'."""
    _, cfg, sd, _ = dplm
    hf64 = _hf_model(cfg).double()
    hf64.load_state_dict(_to_hf_names(sd), strict=True)
    ids = _dplm_batch([17, 9, 30], masks=[(0, 3), (2, 5)])
    with torch.no_grad():
        ref = hf64(ids, attention_mask=(ids != PAD).long(), output_hidden_states=True)
    logits, hidden = _reference(sd, cfg, ids, twice=False, modality_positions=False)
    errs = _errs(ref, logits, hidden, ids != PAD)
    _assert_close(errs, "float64 reference vs transformers in float64 (HF keeps rotary in float32)")


def test_dplm_checkpoint_under_wrapper_prefixes_loads_the_same(dplm, tmp_path):
    """Checkpoints saved from the training wrapper (net.*) or its Lightning module (model.net.*,
    .bin) load to the same model."""
    path, cfg, sd, _ = dplm
    base = load_dplm(str(path))
    for prefix, fmt in (("net.", "safetensors"), ("model.net.", "bin")):
        p = _write(tmp_path / prefix.strip("."), cfg, {prefix + k: v for k, v in sd.items()}, fmt=fmt)
        m = load_dplm(str(p))
        for (k, a), (k2, b) in zip(base.state_dict().items(), m.state_dict().items()):
            assert k == k2 and torch.equal(a, b), k


def test_dplm2_3b_style_checkpoint_is_a_plain_dplm_network(tmp_path):
    """dplm_type "dplm_esm" over the DPLM-2 vocabulary (the published dplm2_3b): EsmForDPLM, no
    modality positions, one embedding pass; equals transformers' EsmForMaskedLM."""
    V = len(DPLM2_VOCAB)
    cfg = _config("dplm_esm", V, tie=False)
    sd = _original_state_dict(V, tie=False, seed=2)
    path = _write(tmp_path / "d", cfg, sd, vocab=DPLM2_VOCAB)
    assert is_dplm_config(cfg) and is_dplm2_config(cfg)
    model = load_dplm(str(path))
    assert type(model) is DPLMForMaskedLM
    hf = _hf_model(cfg)
    hf.load_state_dict(_to_hf_names(sd), strict=True)
    tok = load_dplm_tokenizer(str(path))
    batch = tok(["MKVLA", "GH"], [[1, 2, 3, 4, 5], [6, 7]])
    with torch.no_grad():
        out = model(**batch, output_hidden_states=True)
        ref = hf(**batch, output_hidden_states=True)
    _assert_close(_errs(out, ref.logits, ref.hidden_states, batch["attention_mask"].bool()), "dplm2_3b-style")


# ---------------------------------------------------------------------------------------------
# DPLM-2: the float64 reference


@pytest.fixture(scope="module")
def dplm2_model(dplm2):
    return load_dplm(str(dplm2[0]), attn_backend="eager")


@pytest.fixture(scope="module")
def tok2(dplm2):
    return load_dplm_tokenizer(str(dplm2[0]))


DPLM2_CASES = {
    "mixed-padded": (["MKVLAGHK", "GH", "MK<mask_aa>LAWCDEFGH"], [[1, 2, 3, 4, 5, 6, 7, 8], None, "0,1,2,3,4,5,6,7,15,9,9,12"]),
    "masked-struct": (["MKVLA", "ACD"], [[1, 2, 3, 4, 5], [0, 0, 0]]),
    "batch-of-one": (["MKV<mask_aa>AG"], [[3, 1, 4, 1, 5, 9]]),
    "length-1": (["M"], [[3]]),
    "length-1-padded": (["M", "MKVL"], [[3], None]),
    "aa-only": (["MKVLAGHK", "GH", "MK<mask_aa>LAW"], None),
}


@pytest.mark.parametrize("case", list(DPLM2_CASES))
@pytest.mark.parametrize("backend", ["eager", "sdpa"])
def test_dplm2_matches_reference(dplm2, dplm2_model, tok2, case, backend):
    """load_dplm(dplm2_esm) == the official forward (float64 reference): modality-restarted
    rotary positions, embeddings rescaled twice, padding in the middle of two-track rows."""
    _, cfg, sd = dplm2
    model = dplm2_model
    assert type(model) is DPLM2ForMaskedLM
    model.attn_backend = backend
    seqs, structs = DPLM2_CASES[case]
    batch = tok2(seqs, structs)
    ids = batch["input_ids"]
    with torch.no_grad():
        out = model(ids, output_hidden_states=True)
        out2 = model(ids, attention_mask=batch["attention_mask"], output_hidden_states=True)
    logits, hidden = _reference(sd, cfg, ids, twice=True, modality_positions=True)
    keep = batch["attention_mask"].bool()
    _assert_close(_errs(out, logits, hidden, keep), f"DPLM-2 {case} on {backend}")
    assert torch.equal(out.logits, out2.logits)


@pytest.mark.parametrize("case", ["mixed-padded", "aa-only"])
def test_dplm2_packed_run_of_a_padded_batch_matches_reference(dplm2, tok2, case):
    """pack_padded=True: the padded batch runs as one packed row (the path flash_torch and flex
    take); the modality positions and the per-protein second rescaling survive the packing."""
    _, cfg, sd = dplm2
    model = load_dplm(str(dplm2[0]), attn_backend="sdpa")
    model.pack_padded = True
    batch = tok2(*DPLM2_CASES[case])
    with torch.no_grad():
        out = model(batch["input_ids"], output_hidden_states=True)
    logits, hidden = _reference(sd, cfg, batch["input_ids"], twice=True, modality_positions=True)
    _assert_close(_errs(out, logits, hidden, batch["attention_mask"].bool()), f"DPLM-2 {case} packed")


def test_dplm_packed_documents_equal_the_padded_batch(dplm):
    """DPLM takes packed documents (seq_info): the same numbers as the padded batch."""
    from anyattn import SeqInfo

    model = load_dplm(str(dplm[0]), attn_backend="sdpa")
    ids = _dplm_batch([17, 9, 30], masks=[(0, 3), (2, 7)])
    keep = ids != PAD
    lengths = keep.sum(-1).tolist()
    with torch.no_grad():
        padded = model(ids).logits[keep]
        packed = model(ids[keep][None], seq_info=SeqInfo.from_lengths(lengths)).logits[0]
    assert (padded - packed).abs().max() <= TOL


def test_dplm2_differences_are_exercised(dplm2, tok2):
    """Guard for the test above: on these inputs each DPLM-2 difference changes the result by far
    more than the tolerance (a port without them would fail)."""
    _, cfg, sd = dplm2
    ids = tok2(*DPLM2_CASES["mixed-padded"])["input_ids"]
    full, _ = _reference(sd, cfg, ids, twice=True, modality_positions=True)
    keep = ids != PAD
    for kw in (dict(twice=False, modality_positions=True), dict(twice=True, modality_positions=False)):
        other, _ = _reference(sd, cfg, ids, **kw)
        assert (full - other)[keep].abs().max() > 1e-2, kw


def test_dplm2_rows_do_not_depend_on_the_batch(dplm2, dplm2_model, tok2):
    """A batch mixing amino-acid-only rows with two-track rows: each row equals the row alone
    (which equals the official output). The official code decides positions for the whole batch,
    so it gives the amino-acid-only row split positions here; we do not (docs/dplm.md)."""
    _, cfg, sd = dplm2
    two = tok2(["MKVLA"], [[1, 2, 3, 4, 5]])["input_ids"]
    one = tok2(["MKVLAGHKW"])["input_ids"]
    S = max(two.shape[1], one.shape[1])
    mixed = torch.full((2, S), PAD, dtype=torch.long)
    mixed[0, : two.shape[1]] = two[0]
    mixed[1, : one.shape[1]] = one[0]
    with torch.no_grad():
        out = dplm2_model(mixed).logits
        alone = [dplm2_model(two).logits[0], dplm2_model(one).logits[0]]
    for b, ref in enumerate(alone):
        n = ref.shape[0]
        assert (out[b, :n] - ref).abs().max() <= TOL
    exp, _ = _reference(sd, cfg, one, twice=True, modality_positions=True)
    assert (alone[1].double() - exp[0]).abs().max() <= TOL


@pytest.mark.parametrize("pack", ["auto", True, False])
def test_dplm2_empty_row_stays_in_its_row(dplm2, tok2, pack):
    """An all-padding first row (an empty sequence: 0/0 in the token-dropout ratio of both
    embedding passes) leaves the other row exactly as alone, packed or not."""
    model = load_dplm(str(dplm2[0]), attn_backend="sdpa")
    model.config.pack_padded = pack
    one = tok2(["MKVLAGHKW"])["input_ids"]
    ids = torch.full((2, one.shape[1] + 3), PAD, dtype=torch.long)  # padding in both rows
    ids[1, : one.shape[1]] = one[0]
    am = (ids != PAD).long()
    with torch.no_grad():
        out = model(ids, attention_mask=am).logits
        alone = model(one).logits
    n = one.shape[1]
    assert torch.isfinite(out[1, :n]).all() and (out[1, :n] - alone[0]).abs().max() <= TOL


def test_dplm2_positions():
    ids = torch.tensor([[33, 40, 41, 34, 0, 5, 6, 2], [33, 40, 34, 1, 0, 5, 2, 1], [0, 5, 6, 7, 8, 2, 1, 1]])
    pos = dplm2_positions(ids, ids != PAD)
    assert pos.tolist() == [[0, 1, 2, 3, 0, 1, 2, 3], [0, 1, 2, 3, 0, 1, 2, 3], list(range(8))]
    odd = torch.tensor([[33, 40, 34, 0, 5, 2, 1]])  # the official torch.chunk: first half ceil(S/2)
    assert dplm2_positions(odd, odd != PAD).tolist() == [[0, 1, 2, 3, 0, 1, 2]]


def test_dplm2_refuses_contact_prediction(dplm2_model, tok2):
    with pytest.raises(NotImplementedError, match="contact"):
        dplm2_model.predict_contacts(tok2(["MKV"], [[1, 2, 3]])["input_ids"])


def test_dplm2_refuses_packed_documents(dplm2_model, tok2):
    from anyattn import SeqInfo

    ids = tok2(["MKV"], [[1, 2, 3]])["input_ids"]
    with pytest.raises(ValueError, match="seq_info"):
        dplm2_model(ids, seq_info=SeqInfo.from_lengths([ids.shape[1]]))


# ---------------------------------------------------------------------------------------------
# refusals


def test_unknown_keys_are_refused_with_their_names(dplm):
    _, _, sd, _ = dplm
    bad = dict(sd, **{"esm.pooler.dense.weight": torch.zeros(C, C), "net_extra": torch.zeros(1)})
    with pytest.raises(ValueError, match=r"2 unknown key\(s\).*esm\.pooler\.dense\.weight.*net_extra"):
        map_dplm_keys(bad)
    mixed = {("net." + k if i % 2 else k): v for i, (k, v) in enumerate(sd.items())}
    with pytest.raises(ValueError, match="one wrapper prefix"):
        map_dplm_keys(mixed)
    assert map_dplm_keys({"model.net." + k: v for k, v in sd.items()}).keys() == sd.keys()


def test_missing_and_misshaped_keys_are_refused(dplm, tmp_path):
    _, cfg, sd, _ = dplm
    missing = {k: v for k, v in sd.items() if k != "esm.encoder.layer.1.output.dense.bias"}
    with pytest.raises(ValueError, match=r"missing key\(s\).*esm\.encoder\.layer\.1\.output\.dense\.bias"):
        load_dplm(str(_write(tmp_path / "m", cfg, missing)))
    shaped = dict(sd, **{"lm_head.dense.weight": torch.zeros(C, C + 1)})
    with pytest.raises(ValueError, match=r"shape mismatch.*lm_head\.dense\.weight"):
        load_dplm(str(_write(tmp_path / "s", cfg, shaped)))
    untied = dict(sd, **{"lm_head.decoder.weight": sd["lm_head.decoder.weight"] + 1})  # config ties them
    with pytest.raises(ValueError, match="lm_head.decoder.weight"):
        load_dplm(str(_write(tmp_path / "t", cfg, untied)))


def test_non_dplm_and_unimplemented_configs_are_refused(dplm, tmp_path):
    _, cfg, sd, _ = dplm
    esm = {k: v for k, v in cfg.items() if k not in ("dplm_type", "architectures")}
    assert not is_dplm_config(esm) and not is_dplm2_config(esm)
    with pytest.raises(ValueError, match="dplm_type"):
        load_dplm(str(_write(tmp_path / "e", esm, sd)))
    bit = dict(cfg, dplm_type="dplm2_bit_esm", architectures=["EsmForDPLM2Bit"])
    assert is_dplm_config(bit) and is_dplm2_config(bit)
    with pytest.raises(ValueError, match="dplm2_bit_esm"):
        load_dplm(str(_write(tmp_path / "b", bit, sd)))
    with pytest.raises(ValueError, match="path"):
        load_dplm(str(tmp_path / "e" / "config.json"))


def test_detection():
    assert is_dplm_config({"dplm_type": "dplm_esm", "vocab_size": 33})
    assert not is_dplm2_config({"dplm_type": "dplm_esm", "vocab_size": 33})
    assert is_dplm2_config({"dplm_type": "dplm2_esm", "vocab_size": 8229})
    assert is_dplm2_config({"architectures": ["EsmForDPLM2"]})  # no dplm_type: the architecture says it
    assert is_dplm_config({"architectures": ["EsmForDPLM"], "vocab_size": 33})
    assert not is_dplm_config({"model_type": "esm", "architectures": ["EsmForMaskedLM"]})
    assert not is_dplm_config("not a dict")


# ---------------------------------------------------------------------------------------------
# tokenizers


def test_dplm_tokenizer_is_the_esm_alphabet(dplm, tmp_path):
    path = dplm[0]
    tok = load_dplm_tokenizer(str(path))
    assert isinstance(tok, ProteinTokenizer) and tok.vocab == ESM_VOCAB
    assert tok.encode("MKV<mask>") == ProteinTokenizer.esm().encode("MKV<mask>") == [0, 20, 15, 7, 32, 2]
    no_vocab = _write(tmp_path / "nv", dplm[1], dplm[2])
    assert load_dplm_tokenizer(str(no_vocab)).vocab == ESM_VOCAB


def test_tokenizer_from_a_loaded_model(dplm, dplm2, dplm2_model):
    assert load_dplm_tokenizer(dplm2_model).vocab == DPLM2_VOCAB
    assert load_dplm_tokenizer(load_dplm(str(dplm[0]))).vocab == ESM_VOCAB


def test_dplm2_tokenizer_layout(tok2):
    """Structure track then amino-acid track, each padded on its right to the longest track."""
    assert isinstance(tok2, DPLM2Tokenizer)
    t = tok2.token_to_id
    cs, es, ca, ea, ms = t["<cls_struct>"], t["<eos_struct>"], t["<cls_aa>"], t["<eos_aa>"], t["<mask_struct>"]
    assert (cs, es, ca, ea) == (33, 34, 0, 2)
    b = tok2(["AC", "M"], [[0, 2], None])
    assert b["input_ids"].tolist() == [
        [cs, t["0000"], t["0002"], es, ca, 5, 23, ea],
        [cs, ms, es, PAD, ca, 20, ea, PAD],
    ]
    assert b["attention_mask"].tolist() == [[1] * 8, [1, 1, 1, 0, 1, 1, 1, 0]]
    assert tok2(["AC"], ["0 2"])["input_ids"].equal(tok2(["AC"], [[0, 2]])["input_ids"])
    assert tok2(["AC"])["input_ids"].tolist() == [[ca, 5, 23, ea]]
    assert tok2.decode(b["input_ids"][0]) == ("AC", [0, 2])


def test_dplm2_tokenizer_refusals(tok2):
    with pytest.raises(ValueError, match=r"structs\[0\].*2 structure codes"):
        tok2(["AC"], [[1, 2, 3]])
    with pytest.raises(ValueError, match=f"structure codes in \\[0, {NUM_CODES}\\)"):
        tok2(["AC"], [[1, NUM_CODES]])
    with pytest.raises(ValueError, match="one per sequence"):
        tok2(["AC", "MK"], [[1, 2]])
    with pytest.raises(ValueError, match="'J' at position 1"):
        tok2(["AJ"])
    small = DPLM2Tokenizer(DPLM2_VOCAB, vocab_size=len(DPLM2_VOCAB) - 1)  # <mask_struct> does not fit
    with pytest.raises(ValueError, match=r"<mask_struct>.*embedding rows|embedding rows.*<mask_struct>"):
        small(["AC"], [None])
    with pytest.raises(ValueError, match="missing"):
        DPLM2Tokenizer(ESM_VOCAB)


def test_dplm2_tokenizer_keeps_the_last_id_of_a_token_listed_twice():
    """As the official DPLM2Tokenizer (_token_to_id built from vocab.txt, later lines win)."""
    vocab = (*DPLM2_VOCAB[:-1], "0003", "<mask_struct>")
    tok = DPLM2Tokenizer(vocab)
    assert tok.token_to_id["0003"] == len(vocab) - 2
    assert tok(["A"], [[3]])["input_ids"][0, 1].item() == len(vocab) - 2


# ---------------------------------------------------------------------------------------------
# integration


def test_anyattn_models_load_routes_dplm_checkpoints(dplm, dplm2):
    """DPLM_FAMILY is registered ahead of esm2: anyattn.models.load gives the DPLM classes, and
    load_tokenizer the DPLM-2 tokenizer for DPLM-2 directories."""
    import anyattn.models as am
    from anyattn.models.dplm import DPLM2Tokenizer

    assert [f.name for f in am.FAMILIES].index("dplm") < [f.name for f in am.FAMILIES].index("esm2")
    assert type(am.load(str(dplm[0]))) is DPLMForMaskedLM
    assert type(am.load(str(dplm2[0]))) is DPLM2ForMaskedLM
    assert isinstance(am.load_tokenizer(str(dplm2[0])), DPLM2Tokenizer)
    assert not isinstance(am.load_tokenizer(str(dplm[0])), DPLM2Tokenizer)


@pytest.mark.parametrize("which", ["dplm", "dplm2"])
def test_save_pretrained_round_trip(dplm, dplm2, tok2, which, tmp_path):
    """save_pretrained keeps dplm_type in config.json; load_dplm reads the saved directory back
    to the same model (same class, same outputs)."""
    path = (dplm if which == "dplm" else dplm2)[0]
    model = load_dplm(str(path), attn_backend="sdpa")
    model.save_pretrained(tmp_path / "saved")
    cfg = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert cfg["dplm_type"] == ("dplm_esm" if which == "dplm" else "dplm2_esm")
    again = load_dplm(str(tmp_path / "saved"), attn_backend="sdpa")
    assert type(again) is type(model)
    ids = _dplm_batch([9, 4], masks=[(0, 2)]) if which == "dplm" else tok2(*DPLM2_CASES["mixed-padded"])["input_ids"]
    with torch.no_grad():
        assert torch.equal(model(ids).logits, again(ids).logits)
