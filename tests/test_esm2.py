"""ESM2 on anyattn against HF transformers' EsmForMaskedLM (float32, CPU), and `bench model --quick`.

The reference is transformers itself: a tiny random EsmForMaskedLM is saved with save_pretrained,
loaded into our model from that directory, and both run the same batches. Logits and every
layer's hidden states must agree to 1e-5 (max abs) at the real tokens; intermediate layers are
compared because the final LayerNorm hides drift.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

import anyattn  # noqa: E402
from anyattn.models import ESM2Config, ESM2ForMaskedLM, esm2_flops, load_esm2, load_hf_state_dict  # noqa: E402

TOL = 1e-5
MAX_POS = 40  # the tiny model's maximum length (max_position_embeddings)
PAD, CLS, EOS, MASK = 1, 0, 2, 32


def _hf_config(**kw):
    base = dict(
        vocab_size=33, hidden_size=64, num_hidden_layers=3, num_attention_heads=4, intermediate_size=128,
        max_position_embeddings=MAX_POS, position_embedding_type="rotary", token_dropout=True,
        emb_layer_norm_before=False, pad_token_id=PAD, mask_token_id=MASK, layer_norm_eps=1e-5,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )  # fmt: skip
    base.update(kw)
    return transformers.EsmConfig(**base)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """(directory, HF model) of a tiny random EsmForMaskedLM written by save_pretrained."""
    torch.manual_seed(0)
    hf = transformers.EsmForMaskedLM(_hf_config()).eval()
    with torch.no_grad():  # non-trivial LayerNorms and biases, so that a swapped tensor shows
        for n, p in hf.named_parameters():
            if n.endswith("bias") or "LayerNorm" in n or "layer_norm" in n:
                p.add_(0.1 * torch.randn_like(p))
    path = tmp_path_factory.mktemp("esm2_tiny")
    hf.save_pretrained(path)
    ref = transformers.EsmForMaskedLM.from_pretrained(path, attn_implementation="eager").eval()
    return path, ref


@pytest.fixture(scope="module")
def ours(ckpt):
    return load_esm2(str(ckpt[0]))


def _batch(lengths, seed=0, masks=()):
    """Right-padded token batch (<cls> ... <eos>, pad): HF's convention for ESM."""
    g = torch.Generator().manual_seed(seed)
    S = max(lengths)
    ids = torch.full((len(lengths), S), PAD, dtype=torch.long)
    for b, n in enumerate(lengths):
        ids[b, :n] = torch.randint(4, 24, (n,), generator=g)
        ids[b, 0] = CLS
        if n > 1:
            ids[b, n - 1] = EOS
    for b, s in masks:
        ids[b, s] = MASK
    am = (torch.arange(S)[None] < torch.tensor(lengths)[:, None]).long()
    return ids, am


def _maxdiff(a, b, keep):
    return (a.float() - b.float())[keep].abs().max().item()


def _compare(out, ref, keep, what=""):
    errs = {"logits": _maxdiff(out.logits, ref.logits, keep)}
    assert len(out.hidden_states) == len(ref.hidden_states)
    for i, (h, r) in enumerate(zip(out.hidden_states, ref.hidden_states)):
        errs[f"hidden_states[{i}]"] = _maxdiff(h, r, keep)
    bad = {k: v for k, v in errs.items() if not v <= TOL}
    assert not bad, f"{what}: max abs diff > {TOL}: {bad} (all: {errs})"
    return errs


CASES = {
    "mixed": ([12, 30, 5, 21], [(0, 3), (1, 7), (1, 8), (3, 10)]),  # token dropout with <mask>s
    "batch_of_one": ([17], [(0, 4)]),
    "length_1": ([1, 1], []),
    "max_length": ([MAX_POS, 9, MAX_POS - 3], [(0, 20)]),
}


@pytest.mark.parametrize("backend", ["eager", "sdpa", "sdpa+packed"])
@pytest.mark.parametrize("case", list(CASES))
def test_matches_transformers_logits_and_every_hidden_state(ckpt, ours, backend, case):
    """``sdpa+packed``: the padded batch runs as one packed row of documents (pack_padded=True),
    the path varlen/flex backends take on GPU."""
    lengths, masks = CASES[case]
    ids, am = _batch(lengths, seed=len(case), masks=masks)
    ours.attn_backend = backend.split("+")[0]
    ours.pack_padded = backend.endswith("+packed")
    labels = torch.where(am.bool(), ids, -100)
    try:
        with torch.no_grad():
            ref = ckpt[1](ids, attention_mask=am, output_hidden_states=True, labels=labels)
            out = ours(ids, attention_mask=am, output_hidden_states=True, labels=labels)
    finally:
        ours.pack_padded = "auto"
    _compare(out, ref, am.bool(), f"{backend}/{case}")
    assert abs(out.loss.item() - ref.loss.item()) <= TOL


def test_padding_on_both_sides_matches_transformers_right_padded(ckpt, ours):
    """Rows padded on the left, the right and both sides at once (a keep-mask with real tokens in
    the middle) give HF's right-padded result: positions restart at each row's first real token."""
    lengths = [12, 30, 5, 21]
    ids, am = _batch(lengths, seed=8, masks=[(1, 4)])
    S = 36
    shift = [3, 0, 31, 7]  # pad tokens before each row's sequence
    both_ids, both_am = torch.full((4, S), PAD, dtype=torch.long), torch.zeros((4, S), dtype=torch.long)
    for b, n in enumerate(lengths):
        both_ids[b, shift[b] : shift[b] + n], both_am[b, shift[b] : shift[b] + n] = ids[b, :n], 1
    with torch.no_grad():
        ref = ckpt[1](ids, attention_mask=am, output_hidden_states=True)
        for backend, pack in (("eager", False), ("sdpa", True)):
            ours.attn_backend, ours.pack_padded = backend, pack
            out = ours(both_ids, attention_mask=both_am, output_hidden_states=True)
            for i, (h, r) in enumerate(zip((out.logits, *out.hidden_states), (ref.logits, *ref.hidden_states))):
                d = (h[both_am.bool()] - r[am.bool()]).abs().max().item()
                assert d <= TOL, f"{backend}, pack={pack}: output {i} differs by {d}"
    ours.attn_backend, ours.pack_padded = "auto", "auto"


def test_matches_transformers_on_flex_forward(ckpt, ours):
    """One shape only: CPU flex compiles a kernel per geometry (~5-20 s each). The padded batch
    runs as one packed row of documents (flex takes them natively)."""
    if not next(b for b in anyattn.backends() if b.name == "flex").available:
        pytest.skip("flex unavailable")
    ids, am = _batch([16, 9, 3], seed=5, masks=[(0, 5)])
    ours.attn_backend = "flex"
    assert ours.esm._plan(ids, am, None, False).rows is not None  # flex takes packed documents: packed
    try:
        with torch.no_grad():
            ref = ckpt[1](ids, attention_mask=am, output_hidden_states=True)
            out = ours(ids, attention_mask=am, output_hidden_states=True)
    finally:
        ours.attn_backend = "auto"
    _compare(out, ref, am.bool(), "flex")


def test_packed_documents_equal_padded_batch(ours):
    """The benchmark's path: one packed row (documents from a SeqInfo), padded to a fixed length."""
    lengths = [12, 30, 5, 21]
    ids, am = _batch(lengths, seed=3, masks=[(1, 4), (3, 2)])
    info = anyattn.SeqInfo.from_lengths(lengths, total_length=sum(lengths) + 7)
    packed = torch.full((1, info.S), PAD, dtype=torch.long)
    packed[0, : info.total] = ids[am.bool()]
    ours.attn_backend = "sdpa"
    with torch.no_grad():
        padded = ours(ids, attention_mask=am, output_hidden_states=True)
        out = ours(packed, seq_info=info, output_hidden_states=True)
    for a, b in zip((out.logits, *out.hidden_states), (padded.logits, *padded.hidden_states)):
        assert (a[0, : info.total] - b[am.bool()]).abs().max().item() <= TOL


def test_left_padding_gives_the_right_padded_result(ours):
    """Rotary positions restart at each sequence's first real token, wherever the padding is.
    (HF shifts the positions of left-padded rows; ESM's own convention is right padding.)"""
    lengths = [12, 30, 5]
    ids, am = _batch(lengths, seed=4)
    S = ids.shape[1]
    left_ids, left_am = torch.full_like(ids, PAD), torch.zeros_like(am)
    for b, n in enumerate(lengths):
        left_ids[b, S - n :], left_am[b, S - n :] = ids[b, :n], 1
    ours.attn_backend = "eager"
    with torch.no_grad():
        right = ours(ids, attention_mask=am).logits[am.bool()]
        left = ours(left_ids, attention_mask=left_am).logits[left_am.bool()]
    assert (right - left).abs().max().item() <= TOL


def test_output_attentions_uses_eager_weights_once_and_keeps_the_backend(ckpt, ours):
    ids, am = _batch([12, 20, 6], seed=6)
    ours.attn_backend = "sdpa"
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = ours(ids, attention_mask=am, output_attentions=True)
        ref = ckpt[1](ids, attention_mask=am, output_attentions=True)
    assert sum("output_attentions" in str(w.message) for w in caught) == 1
    assert ours.attn_backend == "sdpa"
    assert len(out.attentions) == len(ref.attentions) == 3
    pair = am.bool()[:, None, :, None] & am.bool()[:, None, None, :]
    for a, r in zip(out.attentions, ref.attentions):
        assert a.shape == r.shape
        assert (a - r).abs()[pair.expand_as(a)].max().item() <= TOL
    with torch.no_grad():
        c_ours, c_ref = ours.predict_contacts(ids, am), ckpt[1].predict_contacts(ids, am)
    assert (c_ours - c_ref).abs().max().item() <= TOL


def test_state_dict_keys_equal_transformers(ckpt):
    ref = ckpt[1]
    model = ESM2ForMaskedLM(ESM2Config.from_hf_config(ref.config))
    assert set(model.state_dict()) == set(ref.state_dict())
    model.load_state_dict(ref.state_dict())  # strict: the plain torch path works too


def test_loader_accepts_transformers_4_per_layer_inv_freq(ckpt):
    ref = ckpt[1]
    sd = dict(ref.state_dict())
    inv = sd.pop("esm.rotary_embeddings.inv_freq")
    for i in range(ref.config.num_hidden_layers):
        sd[f"esm.encoder.layer.{i}.attention.self.rotary_embeddings.inv_freq"] = inv.clone()
    model = ESM2ForMaskedLM(ESM2Config.from_hf_config(ref.config))
    load_hf_state_dict(model, sd)
    assert torch.equal(model.esm.rotary_embeddings.inv_freq, inv)


def test_loader_refuses_unknown_and_missing_keys_listing_them(ckpt):
    ref = ckpt[1]
    sd = dict(ref.state_dict())
    sd["esm.encoder.layer.0.attention.self.qkv.weight"] = torch.zeros(1)
    del sd["esm.encoder.layer.2.output.dense.bias"]
    model = ESM2ForMaskedLM(ESM2Config.from_hf_config(ref.config))
    with pytest.raises(ValueError, match=r"unknown key.*qkv\.weight.*missing key.*layer\.2\.output\.dense\.bias"):
        load_hf_state_dict(model, sd)
    sd = dict(ref.state_dict())
    sd["esm.encoder.layer.1.intermediate.dense.weight"] = torch.zeros(3, 3)
    with pytest.raises(ValueError, match=r"shape mismatch.*layer\.1\.intermediate\.dense\.weight"):
        load_hf_state_dict(model, sd)


def test_config_presets_and_refusals():
    c = ESM2Config.from_name("facebook/esm2_t33_650M_UR50D")
    assert (c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.intermediate_size) == (33, 1280, 20, 5120)
    n = sum(p.numel() for p in ESM2ForMaskedLM(ESM2Config.from_name("esm2_t6_8M")).parameters())
    assert 7.5e6 < n < 8.5e6  # "8M"
    per_tok = esm2_flops(c, [1]) / 1e9
    assert 1.29 < per_tok < 1.31  # matmuls of the 650M shape; attention adds ~0.08 at ESM lengths
    with pytest.raises(ValueError, match="rotary"):
        ESM2Config.from_hf_config(_hf_config(position_embedding_type="absolute"))
    model = ESM2ForMaskedLM(ESM2Config.from_name("esm2_t6_8M", num_hidden_layers=1))
    with pytest.raises(ValueError, match="backend"):
        model.attn_backend = "nope"


def test_bench_model_quick_schema(tmp_path, capsys):
    from anyattn.cli import main

    rc = main(["bench", "model", "--quick", "--out", str(tmp_path)])
    assert rc == 0
    doc = json.loads((tmp_path / "model.json").read_text())
    assert doc["schema"] == "anyattn.bench.model/1"
    assert {"meta", "workload", "results", "notes", "command"} <= set(doc)
    w = doc["workload"]
    assert w["num_seqs"] == len(w["lengths"]) and w["real_tokens"] == sum(w["token_lengths"])
    names = [r["name"] for r in doc["results"]]
    assert any(n.startswith("anyattn") for n in names) and any(n.startswith("hf") for n in names)
    for r in doc["results"]:
        assert {"name", "status", "tokens_per_s", "mfu", "peak_mem_gib", "warmup_s", "compile_s", "time_s", "batches"} <= set(r)
        if r["status"] == "ok":
            assert r["tokens_per_s"] > 0 and r["time_s"] > 0
            assert len(r["times_s"]) == 3 and min(r["times_s"]) <= r["time_s"] <= max(r["times_s"])  # median of --repeats
    assert sum(r["status"] == "ok" for r in doc["results"]) >= 3
    assert "tokens/s" in capsys.readouterr().out
