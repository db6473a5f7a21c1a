"""Audit of ``anyattn.hf`` across the architectures transformers 5 ships (CPU, float32, random
2-layer models with hidden size 64, built in code: nothing is downloaded).

Every check loads the same weights into an HF ``"eager"`` model and an ``"anyattn"`` (or
``"anyattn:<alias>"``) model and compares, on real tokens only (docs/hf.md: "Outputs at padding
positions are 0 under anyattn ... Compare logits on real tokens only"):

* decoders: logits with right and left padding, loss + every gradient (right padding),
  ``output_attentions=True``, packed rows through ``position_ids`` restarting at 0 (with and
  without a cache object) and through ``cu_seq_lens_q/k`` against each document run alone,
  greedy ``generate()`` on a left-padded batch (token for token), the ``anyattn:eager`` /
  ``anyattn:sdp`` aliases;
* encoders: padded logits, loss + gradients, attention weights, aliases, packed rows;
* encoder-decoders (T5 family with ``position_bias``, BART family, Whisper): encoder + decoder
  padding, loss + gradients, encoder / decoder / cross attention weights, ``generate()``;
* vision / CLIP towers: no mask, attention weights, gradients;
* models that are refused, and how.

The audit found models whose layers do not pass output_attentions, position_ids or
cu_seq_lens to the attention function (now documented in docs/hf.md, "What the model must pass
on", and checked against the docs here) and models that use the mask as a tensor (now refused
with MaskUsedAsTensorError naming attn_implementation).
"""

from __future__ import annotations

import copy
import os

import pytest
import torch

transformers = pytest.importorskip("transformers")

import anyattn
import anyattn.hf as ah
from anyattn.testing import record_calls

ah.register()

V = 97  # vocab
W = 5  # HF sliding window (the query and 4 earlier keys)


def _c(**kw):
    d = dict(vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
    d.update(kw)
    return d


def _T(name):
    return getattr(transformers, name)


# name -> (config class, model class, config kwargs)
DECODERS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", _c(num_key_value_heads=2)),
    "mistral": ("MistralConfig", "MistralForCausalLM", _c(num_key_value_heads=2, sliding_window=W)),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM",
                _c(num_key_value_heads=2, sliding_window=W, num_local_experts=4, num_experts_per_tok=2)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM",
              _c(num_key_value_heads=2, use_sliding_window=True, sliding_window=W, max_window_layers=1)),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", _c(num_key_value_heads=2, head_dim=16)),
    "qwen3_sliding": ("Qwen3Config", "Qwen3ForCausalLM",
                      _c(num_key_value_heads=2, head_dim=16, use_sliding_window=True, sliding_window=W, max_window_layers=1)),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM",
                  _c(num_key_value_heads=2, head_dim=16, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", _c(num_key_value_heads=2, head_dim=16)),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM",  # softcap + alternating sliding / global
               _c(num_key_value_heads=2, head_dim=16, sliding_window=W, attn_logit_softcapping=5.0,
                  final_logit_softcapping=30.0, query_pre_attn_scalar=16)),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM",
               _c(num_key_value_heads=2, head_dim=16, sliding_window=W, query_pre_attn_scalar=16,
                  layer_types=["sliding_attention", "full_attention"])),
    "phi": ("PhiConfig", "PhiForCausalLM", _c()),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", _c(num_key_value_heads=2, pad_token_id=0)),
    "gpt_oss": ("GptOssConfig", "GptOssForCausalLM",  # sinks (s_aux)
                _c(intermediate_size=64, num_key_value_heads=2, head_dim=16, num_local_experts=4, num_experts_per_tok=2,
                   sliding_window=W, layer_types=["sliding_attention", "full_attention"])),
    "olmo": ("OlmoConfig", "OlmoForCausalLM", _c(pad_token_id=0)),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", _c(num_key_value_heads=2, pad_token_id=0)),
    "olmo3": ("Olmo3Config", "Olmo3ForCausalLM", _c(num_key_value_heads=2, pad_token_id=0, sliding_window=W)),
    "cohere": ("CohereConfig", "CohereForCausalLM", _c(num_key_value_heads=2, pad_token_id=0)),
    "cohere2": ("Cohere2Config", "Cohere2ForCausalLM",
                _c(num_key_value_heads=2, pad_token_id=0, sliding_window=W, layer_types=["sliding_attention", "full_attention"])),
    "stablelm": ("StableLmConfig", "StableLmForCausalLM", _c(num_key_value_heads=2)),
    "starcoder2": ("Starcoder2Config", "Starcoder2ForCausalLM", _c(num_key_value_heads=2, sliding_window=W)),
    "granite": ("GraniteConfig", "GraniteForCausalLM", _c(num_key_value_heads=2)),
    "smollm3": ("SmolLM3Config", "SmolLM3ForCausalLM", _c(num_key_value_heads=2, pad_token_id=0)),
    "exaone4": ("Exaone4Config", "Exaone4ForCausalLM",
                _c(num_key_value_heads=2, sliding_window=W, layer_types=["sliding_attention", "full_attention"])),
    "helium": ("HeliumConfig", "HeliumForCausalLM", _c(num_key_value_heads=2, head_dim=16)),
    "glm4": ("Glm4Config", "Glm4ForCausalLM", _c(num_key_value_heads=2, head_dim=16, pad_token_id=0)),
    "nemotron": ("NemotronConfig", "NemotronForCausalLM", _c(num_key_value_heads=2)),
    "persimmon": ("PersimmonConfig", "PersimmonForCausalLM", _c()),
    "deepseek_v3": ("DeepseekV3Config", "DeepseekV3ForCausalLM",  # MLA: value head dim 16 != query/key 24
                    _c(num_key_value_heads=4, q_lora_rank=32, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=16,
                       v_head_dim=16, n_routed_experts=4, num_experts_per_tok=2, n_group=1, topk_group=1,
                       first_k_dense_replace=1, moe_intermediate_size=32)),
    "llama4": ("Llama4TextConfig", "Llama4ForCausalLM",  # chunked attention: HF's sdpa_mask (dense)
               _c(num_key_value_heads=2, head_dim=16, intermediate_size_mlp=128, num_local_experts=2,
                  attention_chunk_size=4, no_rope_layers=[1, 0], interleave_moe_layer_step=2)),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", dict(vocab_size=V, n_embd=64, n_layer=2, n_head=4, n_positions=64)),
    "gpt_bigcode": ("GPTBigCodeConfig", "GPTBigCodeForCausalLM",  # multi-query
                    dict(vocab_size=V, n_embd=64, n_layer=2, n_head=4, n_positions=64, multi_query=True)),
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", _c()),
    "gptj": ("GPTJConfig", "GPTJForCausalLM", dict(vocab_size=V, n_embd=64, n_layer=2, n_head=4, rotary_dim=8, n_positions=64)),
    "codegen": ("CodeGenConfig", "CodeGenForCausalLM",
                dict(vocab_size=V, n_embd=64, n_layer=2, n_head=4, rotary_dim=8, n_positions=64)),
    "falcon": ("FalconConfig", "FalconForCausalLM",
               dict(vocab_size=V, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                    new_decoder_architecture=True, num_kv_heads=2)),
    "opt": ("OPTConfig", "OPTForCausalLM",
            dict(vocab_size=V, hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                 word_embed_proj_dim=64, max_position_embeddings=64)),
    "biogpt": ("BioGptConfig", "BioGptForCausalLM", _c(max_position_embeddings=64)),
    # hybrids: one attention layer next to a Mamba / conv / linear-attention layer
    "jamba": ("JambaConfig", "JambaForCausalLM",
              _c(num_key_value_heads=2, num_experts=2, attn_layer_period=2, attn_layer_offset=1, expert_layer_period=2,
                 expert_layer_offset=1, use_mamba_kernels=False, mamba_d_state=4, mamba_d_conv=2, mamba_dt_rank=8)),
    "lfm2": ("Lfm2Config", "Lfm2ForCausalLM", _c(num_key_value_heads=2, layer_types=["conv", "full_attention"])),
    "minimax": ("MiniMaxConfig", "MiniMaxForCausalLM",
                _c(num_key_value_heads=2, head_dim=16, num_local_experts=2, num_experts_per_tok=1,
                   layer_types=["linear_attention", "full_attention"], block_size=4)),
}  # fmt: skip

ENCODERS = {
    "bert": ("BertConfig", "BertForMaskedLM", _c()),
    "roberta": ("RobertaConfig", "RobertaForMaskedLM", _c(pad_token_id=1)),
    "xlm_roberta": ("XLMRobertaConfig", "XLMRobertaForMaskedLM", _c(pad_token_id=1)),
    "xlm_roberta_xl": ("XLMRobertaXLConfig", "XLMRobertaXLForMaskedLM", _c(pad_token_id=1)),
    "camembert": ("CamembertConfig", "CamembertForMaskedLM", _c(pad_token_id=1)),
    "electra": ("ElectraConfig", "ElectraForMaskedLM", _c(embedding_size=64)),
    "distilbert": ("DistilBertConfig", "DistilBertForMaskedLM", dict(vocab_size=V, dim=64, hidden_dim=128, n_layers=2, n_heads=4)),
    "modernbert": ("ModernBertConfig", "ModernBertForMaskedLM",  # local (bidirectional sliding) + global layers
                   _c(local_attention=4, global_attn_every_n_layers=2, pad_token_id=0, bos_token_id=None,
                      eos_token_id=None, cls_token_id=None, sep_token_id=None)),
    "esm": ("EsmConfig", "EsmForMaskedLM",
            dict(vocab_size=33, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 pad_token_id=1, mask_token_id=32, position_embedding_type="rotary", token_dropout=True)),
    "eurobert": ("EuroBertConfig", "EuroBertForMaskedLM", _c(num_key_value_heads=2, pad_token_id=0)),
    "gemma3_bidirectional": ("Gemma3TextConfig", "Gemma3TextModel",  # EmbeddingGemma-style
                             _c(num_key_value_heads=2, head_dim=16, sliding_window=W, query_pre_attn_scalar=16,
                                layer_types=["sliding_attention", "full_attention"], use_bidirectional_attention=True)),
}  # fmt: skip

_ED = dict(vocab_size=V, d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
           encoder_ffn_dim=128, decoder_ffn_dim=128, max_position_embeddings=64)  # fmt: skip
_T5 = dict(vocab_size=V, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4, decoder_start_token_id=0, pad_token_id=0)
ENC_DEC = {
    "t5": ("T5Config", "T5ForConditionalGeneration", _T5),
    "mt5": ("MT5Config", "MT5ForConditionalGeneration", _T5),
    "umt5": ("UMT5Config", "UMT5ForConditionalGeneration", _T5),  # a position bias in every layer
    "longt5": ("LongT5Config", "LongT5ForConditionalGeneration", {**_T5, "local_radius": 2}),
    "switch_transformers": ("SwitchTransformersConfig", "SwitchTransformersForConditionalGeneration",
                            {**_T5, "num_decoder_layers": 2, "num_experts": 2}),
    "bart": ("BartConfig", "BartForConditionalGeneration", {**_ED, "pad_token_id": 1, "decoder_start_token_id": 2}),
    "mbart": ("MBartConfig", "MBartForConditionalGeneration", {**_ED, "pad_token_id": 1, "decoder_start_token_id": 2}),
    "marian": ("MarianConfig", "MarianMTModel", {**_ED, "pad_token_id": 1, "decoder_start_token_id": 1}),
    "pegasus": ("PegasusConfig", "PegasusForConditionalGeneration", {**_ED, "pad_token_id": 0, "decoder_start_token_id": 0}),
    "m2m_100": ("M2M100Config", "M2M100ForConditionalGeneration", {**_ED, "pad_token_id": 1, "decoder_start_token_id": 2}),
    "whisper": ("WhisperConfig", "WhisperForConditionalGeneration",
                {**{k: v for k, v in _ED.items() if k != "max_position_embeddings"}, "num_mel_bins": 16,
                 "max_source_positions": 16, "max_target_positions": 64, "pad_token_id": 0, "decoder_start_token_id": 1,
                 "bos_token_id": 1, "eos_token_id": 2, "suppress_tokens": None, "begin_suppress_tokens": None}),
}  # fmt: skip

_VIS = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, image_size=32, patch_size=8)
TOWERS = {
    "vit": ("ViTConfig", "ViTModel", _VIS),
    "dinov2": ("Dinov2Config", "Dinov2Model", {**{k: v for k, v in _VIS.items() if k != "intermediate_size"}, "mlp_ratio": 2}),
    "clip_vision": ("CLIPVisionConfig", "CLIPVisionModel", _VIS),
    "siglip_vision": ("SiglipVisionConfig", "SiglipVisionModel", _VIS),
    "clip_text": ("CLIPTextConfig", "CLIPTextModel",
                  dict(vocab_size=V, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                       max_position_embeddings=32, bos_token_id=0, eos_token_id=2)),
}  # fmt: skip

ALL = {**DECODERS, **ENCODERS, **ENC_DEC, **TOWERS}

# Limits found by this audit (docs/hf.md, "What the model must pass on").
NO_ATTN_KWARG = {"gpt2", "opt", "stablelm", "falcon", "gpt_bigcode", "persimmon", "nemotron", "siglip_vision"}
NO_POS_KWARG = {"gpt_bigcode", "persimmon", "llama4"}  # position_ids never reach the attention function
NO_CU_KWARG = {"stablelm", "falcon", "nemotron"}  # cu_seq_lens_q/k never reach the attention function
ABS_POS = {"gpt2", "opt", "gpt_bigcode", "biogpt"}  # learned absolute positions: packed rows need position_ids
HYBRID = {"jamba", "lfm2", "minimax"}  # Mamba / conv / linear-attention layers mix packed documents (in HF too)
SOFTCAP_OR_SINKS = {"gemma2": "softcap", "gpt_oss": "sink"}  # not expressible as SDPA's additive bias


def _build(name, impl, seed=0):
    cfg_cls, model_cls, kw = ALL[name]
    try:
        cfg = _T(cfg_cls)(**copy.deepcopy(kw))
        cls = _T(model_cls)
    except Exception as e:  # noqa: BLE001 - depends on the installed transformers
        pytest.skip(f"{name}: tiny config not constructible offline with transformers {transformers.__version__}: {e}")
    torch.manual_seed(seed)
    return cls._from_config(cfg, attn_implementation=impl).eval()


def _pair(name, impl="anyattn"):
    """(HF eager model, anyattn model) with the same weights, each with its own config object."""
    ref = _build(name, "eager")
    ours = _build(name, impl)
    ours.load_state_dict(ref.state_dict())
    if name == "gpt_oss":  # sinks are zero-initialized: make them matter
        with torch.no_grad():
            g = torch.Generator().manual_seed(5)
            for (n, p), (_, q) in zip(ref.named_parameters(), ours.named_parameters()):
                if n.endswith("sinks"):
                    p.copy_(torch.randn(p.shape, generator=g))
                    q.copy_(p)
    assert ours.config._attn_implementation == impl
    return ref, ours


def _close(a, b, where=None, rel=2e-5):
    """fp32 on both sides; the bound scales with the reference's magnitude (T5 logits are ~10s)."""
    if where is not None:
        a, b = a[where], b[where]
    err = (a - b).abs().max().item()
    bound = rel * max(1.0, a.abs().max().item())
    assert err <= bound, f"max |diff| {err:.3e} > {bound:.1e}"


def _grads_close(ref, ours, rel=1e-5):
    n_grads = 0
    for (n, p), (_, q) in zip(ref.named_parameters(), ours.named_parameters()):
        assert (p.grad is None) == (q.grad is None), n
        if p.grad is None:
            continue
        n_grads += 1
        err = (p.grad - q.grad).abs().max().item()
        assert err <= rel * max(1.0, p.grad.abs().max().item()), (n, err)
    assert n_grads > 0


def _padded(S=12, side="left", vocab=V, seed=1, B=3):
    """Rows of S, S//2+1 and 2 real tokens; padding ids are 0."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (B, S), generator=g)
    am = torch.ones(B, S, dtype=torch.long)
    for b, n in enumerate([S, S // 2 + 1, 2][:B]):
        if side == "left":
            am[b, : S - n] = 0
        else:
            am[b, n:] = 0
    return ids.masked_fill(am == 0, 0), am


def _packed(lengths, vocab=V, seed=3):
    g = torch.Generator().manual_seed(seed)
    docs = [torch.randint(3, vocab, (n,), generator=g) for n in lengths]
    return docs, torch.cat(docs)[None], torch.cat([torch.arange(n) for n in lengths])[None]


def _weights_close(a, b, rows=None):
    """Attention weights layer by layer; rows (B, S) keeps real query rows where shapes allow."""
    assert a is not None and b is not None and len(a) == len(b) and len(a) > 0, (
        f"eager gave {None if a is None else len(a)} attention tensors, anyattn {None if b is None else len(b)}"
    )  # fmt: skip
    for x, y in zip(a, b):
        assert y is not None and x.shape == y.shape, (None if y is None else y.shape, x.shape)
        if rows is not None and x.dim() == 4 and x.shape[0] == rows.shape[0] and x.shape[2] == rows.shape[1]:
            m = rows.bool()[:, None, :, None]
            x, y = x * m, y * m
        _close(x, y)


def _masks(seen):
    return {repr(c.mask) for c in seen}


# ================================================================================ decoders


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("name", sorted(DECODERS))
def test_decoder_padded_logits_equal_eager(name, side):
    ref, ours = _pair(name)
    ids, am = _padded(side=side)
    with torch.no_grad(), record_calls() as seen:
        a = ref(ids, attention_mask=am).logits
        b = ours(ids, attention_mask=am).logits
    _close(a, b, am.bool())
    assert seen, "no layer reached anyattn"
    if name == "llama4":  # chunked attention: HF's own sdpa_mask, passed as dense (docs/hf.md)
        assert any("dense(" in m for m in _masks(seen))
    else:
        assert all("padding(" in m and "dense" not in m for m in _masks(seen)), _masks(seen)
    if name in ("mistral", "qwen2", "gemma2", "gemma3", "gpt_oss", "cohere2", "starcoder2", "olmo3", "exaone4"):
        assert any(f"sliding_window({W - 1})" in m for m in _masks(seen)), _masks(seen)


@pytest.mark.parametrize("name", sorted(DECODERS))
def test_decoder_loss_and_gradients_equal_eager(name):
    ref, ours = _pair(name)
    ids, am = _padded(side="right")
    labels = ids.masked_fill(am == 0, -100)
    l1 = ref(ids, attention_mask=am, labels=labels).loss
    l2 = ours(ids, attention_mask=am, labels=labels).loss
    l1.backward()
    l2.backward()
    assert abs(l1.item() - l2.item()) <= 2e-6 * max(1.0, abs(l1.item()))
    _grads_close(ref, ours)


@pytest.mark.parametrize("name", sorted(set(DECODERS) - NO_ATTN_KWARG))
def test_decoder_output_attentions_equal_eager(name):
    ref, ours = _pair(name)
    ids, am = _padded()
    with torch.no_grad(), record_calls() as seen:
        a = ref(ids, attention_mask=am, output_attentions=True).attentions
        b = ours(ids, attention_mask=am, output_attentions=True).attentions
    _weights_close(a, b, am)
    assert seen and all(c.backend == "eager" for c in seen)


@pytest.mark.parametrize("name", sorted(NO_ATTN_KWARG))
def test_output_attentions_limit_is_documented(name):
    """These models do not forward `output_attentions` to the attention function (GPT2Model pops
    it; SiglipAttention passes no **kwargs; Falcon, StableLM, OPT, Persimmon and GPTBigCode take it
    as a named argument; NemotronDecoderLayer does not forward **kwargs), so no weights come back
    (HF's own "sdpa" behaves the same way). docs/hf.md ("What the model must pass on") names each
    of them; this test fails when a transformers release starts passing it (update the docs)."""
    doc = open(os.path.join(os.path.dirname(__file__), "..", "docs", "hf.md")).read()
    assert DOC_NAMES[name] in doc.split("**`output_attentions`**", 1)[1].split("* **", 1)[0], name
    ref, ours = _pair(name)
    if name in TOWERS:
        inp = dict(pixel_values=torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)))
    else:
        ids, am = _padded()
        inp = dict(input_ids=ids, attention_mask=am)
    with torch.no_grad():
        assert ref(**inp, output_attentions=True).attentions  # eager has them
        b = ours(**inp, output_attentions=True).attentions
    assert not b or all(x is None for x in b), "weights arrive now: docs/hf.md can drop this model"


@pytest.mark.parametrize("use_cache", [False, True])
@pytest.mark.parametrize("name", sorted(DECODERS))
def test_decoder_packed_rows_equal_separate_documents(name, use_cache):
    """docs/hf.md: position_ids restarting at 0, no mask -> documents(...), "also when HF's own
    builder does not detect packing because a cache object exists (the default use_cache=True)".
    Hybrids (Mamba / conv / linear-attention layers) mix documents outside attention in HF too:
    they are compared with HF eager on the same packed row (use_cache=False: HF detects packing)."""
    if use_cache and name in NO_POS_KWARG:
        pytest.skip("position_ids do not reach the attention function: test_packed_rows_with_a_cache_object_limit_is_documented")
    if name == "minimax" and use_cache:
        pytest.skip("MiniMaxCache: see test_minimax_decode_is_refused_clearly")
    ref, ours = _pair(name)
    lengths = [5, 9, 3, 7]
    docs, ids, pos = _packed(lengths)
    with torch.no_grad(), record_calls() as seen:
        got = ours(ids, position_ids=pos, use_cache=use_cache).logits[0]
    with torch.no_grad():
        if name in HYBRID:
            want = ref(ids, position_ids=pos, use_cache=False).logits[0]
        else:
            want = torch.cat([ref(d[None]).logits[0] for d in docs])
    _close(want, got)
    assert all("documents([5, 9, 3, 7])" in m for m in _masks(seen) if "dense" not in m), _masks(seen)


@pytest.mark.parametrize("name", sorted(NO_POS_KWARG))
def test_packed_rows_with_a_cache_object_limit_is_documented(name):
    """GPTBigCode, Persimmon and Llama4 consume position_ids in the layer and never pass them on,
    so with a cache object (use_cache=True) the packing cannot reach anyattn; docs/hf.md names
    them and says to pass use_cache=False, which is exact (checked here)."""
    doc = open(os.path.join(os.path.dirname(__file__), "..", "docs", "hf.md")).read()
    assert DOC_NAMES[name] in doc.split("**Packed rows with a cache object**", 1)[1].split("* **", 1)[0], name
    ref, ours = _pair(name)
    docs, ids, pos = _packed([5, 9, 3, 7])
    with torch.no_grad():
        got = ours(ids, position_ids=pos, use_cache=False).logits[0]
        want = torch.cat([ref(d[None]).logits[0] for d in docs])
    _close(want, got)


@pytest.mark.parametrize("name", sorted(set(DECODERS) - NO_CU_KWARG - HYBRID))
def test_decoder_cu_seq_lens_equal_separate_documents(name):
    """cu_seq_lens_q/k (flash-style packing) without a mask. Models with learned absolute
    positions also need the restarting position_ids (as with HF's flash path); docs: both must
    agree."""
    ref, ours = _pair(name)
    lengths = [4, 8, 5]
    docs, ids, pos = _packed(lengths)
    cu = torch.tensor([0, 4, 12, 17], dtype=torch.int32)
    kw = dict(position_ids=pos) if name in ABS_POS else {}
    with torch.no_grad(), record_calls() as seen:
        got = ours(ids, cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=8, max_length_k=8, **kw).logits[0]
        want = torch.cat([ref(d[None]).logits[0] for d in docs])
    _close(want, got)
    assert all("documents([4, 8, 5])" in m for m in _masks(seen)), _masks(seen)


@pytest.mark.parametrize("name", sorted(NO_CU_KWARG))
def test_cu_seq_lens_limit_is_documented(name):
    """StableLM, Falcon and Nemotron do not forward the layer's **kwargs to the attention function,
    so cu_seq_lens_q/k never arrive; docs/hf.md names them and says to pass restarting position_ids
    with use_cache=False instead, which is exact (checked here)."""
    doc = open(os.path.join(os.path.dirname(__file__), "..", "docs", "hf.md")).read()
    assert DOC_NAMES[name] in doc.split("**`cu_seq_lens_q/k`**", 1)[1].split("###", 1)[0], name
    ref, ours = _pair(name)
    docs, ids, pos = _packed([4, 8, 5])
    with torch.no_grad():
        got = ours(ids, position_ids=pos, use_cache=False).logits[0]
        want = torch.cat([ref(d[None]).logits[0] for d in docs])
    _close(want, got)


@pytest.mark.parametrize("name", sorted(set(DECODERS) - {"minimax"}))
def test_decoder_greedy_generation_left_padded_equals_eager(name):
    """Prompts of 7, 4 and 2 real tokens, 8 new tokens: the sliding layers (window 5) are crossed."""
    ref, ours = _pair(name)
    ids, am = _padded(S=7, side="left")
    kw = dict(attention_mask=am, max_new_tokens=8, do_sample=False, pad_token_id=0, eos_token_id=None)
    with torch.no_grad(), record_calls() as seen:
        want = ref.generate(ids, **kw)
        got = ours.generate(ids, **kw)
    assert torch.equal(want, got), (want.tolist(), got.tolist())
    assert any(c.q_shape[2] == 1 for c in seen)  # decode steps came through anyattn


def test_minimax_decode_is_refused_clearly():
    """MiniMax (linear-attention layer 0, full layer 1): its MiniMaxCache reports no linear layers,
    so HF sizes the full layer's decode mask from layer 0 (kv_length=1). HF eager broadcasts that
    (B,1,1,1) mask over all keys and attends to the left padding (the padded rows' decode logits
    differ from the rows alone by ~5e-3); anyattn refuses, naming the argument and both sizes."""
    ref, ours = _pair("minimax")
    ids, am = _padded(S=7, side="left")
    kw = dict(attention_mask=am, max_new_tokens=3, do_sample=False, pad_token_id=0, eos_token_id=None)
    with torch.no_grad(), pytest.raises(ValueError, match=r"attention_mask: expected a mask built for q_length=1, kv_length=8"):
        ours.generate(ids, **kw)
    # HF's own decode step is the inexact one: the 2-token row against that row alone
    with torch.no_grad():
        past = ref(ids, attention_mask=am, use_cache=True).past_key_values
        nxt = torch.full((3, 1), 5)
        step = ref(nxt, attention_mask=torch.cat([am, torch.ones(3, 1, dtype=am.dtype)], 1), cache=past).logits
        alone = ref(torch.cat([ids[2:, -2:], nxt[2:]], 1)).logits
    assert (step[2, -1] - alone[0, -1]).abs().max().item() > 1e-3


@pytest.mark.parametrize("impl", ["anyattn:eager", "anyattn:sdp"])
@pytest.mark.parametrize("name", sorted(DECODERS))
def test_decoder_aliases_equal_eager_or_refuse(name, impl):
    """Forced backends run every layer on that backend, or raise UnsupportedError naming the
    backend and the term it cannot compute (docs: never a fallback)."""
    ref, ours = _pair(name, impl)
    ids, am = _padded(side="left")
    if impl == "anyattn:sdp" and name in SOFTCAP_OR_SINKS:
        with torch.no_grad(), pytest.raises(anyattn.UnsupportedError, match=rf"sdpa(.|\n)*{SOFTCAP_OR_SINKS[name]}"):
            ours(ids, attention_mask=am)
        return
    with torch.no_grad(), record_calls() as seen:
        a = ref(ids, attention_mask=am).logits
        b = ours(ids, attention_mask=am).logits
    _close(a, b, am.bool())
    assert {c.backend for c in seen} == {ah.HF_NAMES[impl]}


@pytest.mark.parametrize("impl,why", [
    ("anyattn:cudnn", "needs a CUDA GPU"),
    ("anyattn:fa_torch", "needs a CUDA GPU"),
    ("anyattn:fa", "flash-attn is not installed|needs a CUDA GPU"),
    ("anyattn:kernels_fa", "needs a CUDA GPU|not installed"),
])  # fmt: skip
def test_gpu_only_aliases_refuse_on_cpu_with_the_reason(impl, why):
    _, ours = _pair("gemma2", impl)
    ids, am = _padded()
    with torch.no_grad(), pytest.raises(anyattn.UnsupportedError, match=rf"{ah.HF_NAMES[impl]}: (.*)({why})"):
        ours(ids, attention_mask=am)


def test_flex_alias_refuses_training_on_cpu_with_the_reason():
    """docs: FlexAttention on CPU has no backward; the refusal comes before any compile."""
    _, ours = _pair("llama", "anyattn:flex")
    ids, am = _padded(side="right")
    with pytest.raises(anyattn.UnsupportedError, match="flex: rejected: FlexAttention has no backward on CPU"):
        ours(ids, attention_mask=am, labels=ids)


def test_position_ids_with_a_gap_and_a_cache_object_are_refused_clearly():
    """Not a restart at 0, a jump (PoSE-style position skipping): with use_cache=False HF's builder
    calls it two documents and anyattn follows (equal to eager); with a cache object (the default)
    HF eager runs one causal sequence, anyattn's position_ids rule refuses with a clear message."""
    ref, ours = _pair("llama")
    ids = torch.randint(3, V, (1, 10), generator=torch.Generator().manual_seed(2))
    pos = torch.tensor([[0, 1, 2, 3, 10, 11, 12, 13, 14, 15]])
    with torch.no_grad():
        _close(ref(ids, position_ids=pos, use_cache=False).logits, ours(ids, position_ids=pos, use_cache=False).logits)
        with pytest.raises(ValueError, match=r"position_ids: expected each id to be the previous \+ 1 or 0"):
            ours(ids, position_ids=pos)


@pytest.mark.parametrize("name", ["mistral", "gemma3", "gpt_oss", "cohere2", "llama4", "phi3"])
def test_decoder_static_cache_generation_equals_eager(name):
    ref, ours = _pair(name)
    ids, am = _padded(S=7, side="left")
    kw = dict(attention_mask=am, max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=None,
              cache_implementation="static")  # fmt: skip
    with torch.no_grad():
        assert torch.equal(ref.generate(ids, **kw), ours.generate(ids, **kw))


# ================================================================================ encoders


def _enc_out(model, **kw):
    out = model(**kw)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("name", sorted(ENCODERS))
def test_encoder_padded_outputs_equal_eager(name, side):
    ref, ours = _pair(name)
    ids, am = _padded(S=10, side=side, vocab=ref.config.vocab_size)
    with torch.no_grad(), record_calls() as seen:
        a = _enc_out(ref, input_ids=ids, attention_mask=am)
        b = _enc_out(ours, input_ids=ids, attention_mask=am)
    _close(a, b, am.bool())
    if name == "gemma3_bidirectional":  # Gemma3's own or_mask overlay: HF's sdpa_mask (dense), as documented
        assert all("dense(" in m for m in _masks(seen)), _masks(seen)
    else:
        assert all("padding(" in m and "causal" not in m and "dense" not in m for m in _masks(seen)), _masks(seen)
    if name == "modernbert":  # local_attention=4 -> 2 keys each side
        assert any("sliding_window(2, 2)" in m for m in _masks(seen)), _masks(seen)


@pytest.mark.parametrize("name", sorted(set(ENCODERS) - {"gemma3_bidirectional"}))
def test_encoder_loss_and_gradients_equal_eager(name):
    ref, ours = _pair(name)
    ids, am = _padded(S=10, side="right", vocab=ref.config.vocab_size)
    labels = ids.masked_fill(am == 0, -100)
    l1 = ref(ids, attention_mask=am, labels=labels).loss
    l2 = ours(ids, attention_mask=am, labels=labels).loss
    l1.backward()
    l2.backward()
    assert abs(l1.item() - l2.item()) <= 2e-6 * max(1.0, abs(l1.item()))
    _grads_close(ref, ours)


@pytest.mark.parametrize("name", sorted(ENCODERS))
def test_encoder_output_attentions_equal_eager(name):
    ref, ours = _pair(name)
    ids, am = _padded(S=10, side="right", vocab=ref.config.vocab_size)
    with torch.no_grad():
        a = ref(ids, attention_mask=am, output_attentions=True).attentions
        b = ours(ids, attention_mask=am, output_attentions=True).attentions
    _weights_close(a, b, am)


@pytest.mark.parametrize("impl", ["anyattn:eager", "anyattn:sdp"])
@pytest.mark.parametrize("name", sorted(ENCODERS))
def test_encoder_aliases_equal_eager(name, impl):
    ref, ours = _pair(name, impl)
    ids, am = _padded(S=10, side="right", vocab=ref.config.vocab_size)
    with torch.no_grad(), record_calls() as seen:
        a = _enc_out(ref, input_ids=ids, attention_mask=am)
        b = _enc_out(ours, input_ids=ids, attention_mask=am)
    _close(a, b, am.bool())
    assert {c.backend for c in seen} == {ah.HF_NAMES[impl]}


@pytest.mark.parametrize("name", sorted(set(ENCODERS) - {"gemma3_bidirectional"}))
def test_encoder_packed_row_equals_eager_on_the_same_row(name):
    """position_ids restarting per document, no mask. Where the model hands position_ids to
    HF's mask builder (BERT family, ESM) both sides split documents; DistilBERT / ModernBERT never
    do (no documents term, eager neither). EuroBERT builds its mask without position_ids, so HF
    eager attends across the row, while anyattn applies the docs' position_ids rule (documents):
    there anyattn equals each document run alone instead."""
    ref, ours = _pair(name)
    lengths = [5, 9, 3]
    vocab = ref.config.vocab_size
    docs, ids, pos = _packed(lengths, vocab=vocab)
    if name in ("roberta", "xlm_roberta", "xlm_roberta_xl", "camembert"):
        pos = pos + 2  # RoBERTa positions start after padding_idx
    with torch.no_grad(), record_calls() as seen:
        got = ours(ids, position_ids=pos).logits[0]
        if name == "eurobert":
            want = torch.cat([ref(d[None]).logits[0] for d in docs])
        else:
            want = ref(ids, position_ids=pos).logits[0]
    _close(want, got)
    if name not in ("distilbert", "modernbert"):
        assert all("documents([5, 9, 3])" in m for m in _masks(seen)), _masks(seen)


# ================================================================================ encoder-decoders


def _ed_inputs(name, side="right"):
    g = torch.Generator().manual_seed(1)
    dec = torch.randint(3, V, (3, 7), generator=g)
    dam = torch.ones(3, 7, dtype=torch.long)
    for b, n in enumerate([7, 4, 2]):
        if side == "right":
            dam[b, n:] = 0
        else:
            dam[b, : 7 - n] = 0
    if name == "whisper":  # (B, mel bins, 2 * max_source_positions); no encoder mask
        return dict(input_features=torch.randn(3, 16, 32, generator=g), decoder_input_ids=dec, decoder_attention_mask=dam), dam
    ids, am = _padded(S=10, side="right", B=3)
    return dict(input_ids=ids, attention_mask=am, decoder_input_ids=dec, decoder_attention_mask=dam), dam


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("name", sorted(ENC_DEC))
def test_encoder_decoder_outputs_equal_eager(name, side):
    """Encoder padding, decoder padding on either side; T5-family layers get position_bias as a
    bias() score; cross-attention configs keep keys-only padding (dense (B,1,1,Sk), docs/hf.md)."""
    ref, ours = _pair(name)
    inp, dam = _ed_inputs(name, side)
    with torch.no_grad(), record_calls() as seen:
        a = ref(**inp)
        b = ours(**inp)
    _close(a.logits, b.logits, dam.bool())
    am = inp.get("attention_mask")
    _close(a.encoder_last_hidden_state, b.encoder_last_hidden_state, None if am is None else am.bool())
    assert seen
    assert not any("padding(" in m for m in _masks(seen)), _masks(seen)  # no query-row emptying
    if name in ("t5", "mt5", "umt5", "switch_transformers"):
        assert all(any(type(s).__name__ == "Bias" for s in c.scores) for c in seen)


@pytest.mark.parametrize("name", sorted(ENC_DEC))
def test_encoder_decoder_loss_and_gradients_equal_eager(name):
    ref, ours = _pair(name)
    inp, dam = _ed_inputs(name)
    labels = inp["decoder_input_ids"].masked_fill(dam == 0, -100)
    l1 = ref(**inp, labels=labels).loss
    l2 = ours(**inp, labels=labels).loss
    l1.backward()
    l2.backward()
    assert abs(l1.item() - l2.item()) <= 2e-6 * max(1.0, abs(l1.item()))
    _grads_close(ref, ours)


@pytest.mark.parametrize("name", sorted(set(ENC_DEC) - {"longt5"}))
def test_encoder_decoder_attention_weights_equal_eager(name):
    ref, ours = _pair(name)
    inp, dam = _ed_inputs(name)
    with torch.no_grad():
        a = ref(**inp, output_attentions=True)
        b = ours(**inp, output_attentions=True)
    _weights_close(a.encoder_attentions, b.encoder_attentions, inp.get("attention_mask"))
    _weights_close(a.decoder_attentions, b.decoder_attentions, dam)
    _weights_close(a.cross_attentions, b.cross_attentions, dam)


def test_longt5_decoder_attention_weights_equal_eager():
    """LongT5's local-attention encoder is its own code (not the attention interface): only the
    decoder and cross weights come from anyattn."""
    ref, ours = _pair("longt5")
    inp, dam = _ed_inputs("longt5")
    with torch.no_grad():
        a = ref(**inp, output_attentions=True)
        b = ours(**inp, output_attentions=True)
    _weights_close(a.decoder_attentions, b.decoder_attentions, dam)
    _weights_close(a.cross_attentions, b.cross_attentions, dam)


@pytest.mark.parametrize("name", sorted(ENC_DEC))
def test_encoder_decoder_greedy_generation_equals_eager(name):
    ref, ours = _pair(name)
    inp, _ = _ed_inputs(name)
    inp = {k: v for k, v in inp.items() if not k.startswith("decoder")}
    kw = dict(max_new_tokens=6, do_sample=False, eos_token_id=None)
    with torch.no_grad():
        want = ref.generate(**inp, **kw)
        got = ours.generate(**inp, **kw)
    assert torch.equal(want, got), (want.tolist(), got.tolist())


@pytest.mark.parametrize("impl", ["anyattn:eager", "anyattn:sdp"])
@pytest.mark.parametrize("name", ["t5", "bart", "whisper", "umt5"])
def test_encoder_decoder_aliases_equal_eager(name, impl):
    ref, ours = _pair(name, impl)
    inp, dam = _ed_inputs(name)
    with torch.no_grad(), record_calls() as seen:
        a = ref(**inp).logits
        b = ours(**inp).logits
    _close(a, b, dam.bool())
    assert {c.backend for c in seen} == {ah.HF_NAMES[impl]}


# ================================================================================ vision / CLIP towers


@pytest.mark.parametrize("name", sorted(TOWERS))
def test_tower_outputs_and_gradients_equal_eager(name):
    ref, ours = _pair(name)
    g = torch.Generator().manual_seed(1)
    if name == "clip_text":
        ids, am = _padded(S=10, side="right")
        inp, where = dict(input_ids=ids, attention_mask=am), am.bool()
    else:
        inp, where = dict(pixel_values=torch.randn(2, 3, 32, 32, generator=g)), None
    with record_calls() as seen:
        a = ref(**inp).last_hidden_state
        b = ours(**inp).last_hidden_state
    _close(a.detach(), b.detach(), where)
    (a if where is None else a[where]).square().mean().backward()
    (b if where is None else b[where]).square().mean().backward()
    _grads_close(ref, ours)
    want = {"causal() & padding(mask=tensor(3, 10))"} if name == "clip_text" else {"None"}
    assert _masks(seen) == want


@pytest.mark.parametrize("name", sorted(set(TOWERS) - NO_ATTN_KWARG))
def test_tower_attention_weights_equal_eager(name):
    ref, ours = _pair(name)
    if name == "clip_text":
        ids, am = _padded(S=10, side="right")
        inp, rows = dict(input_ids=ids, attention_mask=am), am
    else:
        inp, rows = dict(pixel_values=torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))), None
    with torch.no_grad():
        _weights_close(ref(**inp, output_attentions=True).attentions, ours(**inp, output_attentions=True).attentions, rows)


# ================================================================================ what is refused


REFUSED = {  # models whose attention does not (only) go through transformers' AttentionInterface
    "bloom": ("BloomConfig", "BloomForCausalLM", dict(vocab_size=V, hidden_size=64, n_layer=2, n_head=4)),
    "mpt": ("MptConfig", "MptForCausalLM", dict(vocab_size=V, d_model=64, n_layers=2, n_heads=4)),
    "xglm": ("XGLMConfig", "XGLMForCausalLM", dict(vocab_size=V, d_model=64, num_layers=2, attention_heads=4, ffn_dim=128)),
    "roformer": ("RoFormerConfig", "RoFormerForMaskedLM", _c()),
    "falcon_alibi": ("FalconConfig", "FalconForCausalLM",  # adds ALiBi onto the mask tensor
                     dict(vocab_size=V, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, alibi=True)),
    "doge": ("DogeConfig", "DogeForCausalLM", _c(num_key_value_heads=2, keep_window_size=4)),  # adds its dynamic mask
    "gpt_neo": ("GPTNeoConfig", "GPTNeoForCausalLM",
                dict(vocab_size=V, hidden_size=64, num_layers=2, num_heads=4, attention_types=[[["global", "local"], 1]],
                     max_position_embeddings=64)),
    "deberta_v2": ("DebertaV2Config", "DebertaV2ForMaskedLM", _c()),
}  # fmt: skip
ALL.update(REFUSED)
MASK_AS_TENSOR = ["bloom", "mpt", "xglm", "roformer", "falcon_alibi", "doge"]
# how docs/hf.md names the architectures of its limits
DOC_NAMES = {
    "gpt2": "GPT-2", "opt": "OPT", "stablelm": "StableLM", "falcon": "Falcon", "gpt_bigcode": "GPTBigCode",
    "persimmon": "Persimmon", "nemotron": "Nemotron", "siglip_vision": "SigLIP", "llama4": "Llama 4",
}


@pytest.mark.parametrize("name", MASK_AS_TENSOR)
def test_models_that_use_the_mask_as_a_tensor_are_refused_clearly(name):
    """These models call HF's mask builders (create_causal_mask / create_bidirectional_mask) but
    then treat the result as a tensor: Bloom, MPT, XGLM and RoFormer run their own attention
    (no ALL_ATTENTION_FUNCTIONS), Falcon with alibi=True and Doge add a bias onto the mask.
    transformers accepts `attn_implementation="anyattn"` for them; the registered mask builder
    returns an `HFMask`, and the forward dies inside transformers:
    `TypeError: unsupported operand type(s) for +: 'Tensor' and 'HFMask'` (Bloom, RoFormer),
    `AttributeError: 'HFMask' object has no attribute 'to'` (MPT) / `'size'` (XGLM) / `'dtype'`
    (Falcon-alibi, Doge); was a bug (fixed): HFMask now raises MaskUsedAsTensorError naming
    attn_implementation and what the model did with the mask, and docs/hf.md lists the models."""
    _, ours = _pair(name)
    ids, am = _padded(side="right")
    with torch.no_grad(), pytest.raises(Exception) as info:
        ours(ids, attention_mask=am)
    assert "attn_implementation" in str(info.value), f"{type(info.value).__name__}: {info.value}"


def test_gpt_neo_is_refused_by_transformers_at_construction():
    """GPT-Neo picks its attention class from a dict keyed by the implementation name:
    KeyError('anyattn') while building the model, inside transformers (no anyattn code runs)."""
    with pytest.raises(KeyError, match="anyattn"):
        _build("gpt_neo", "anyattn")


def test_deberta_v2_silently_runs_its_own_attention():
    """DeBERTa-v2 has its own disentangled attention and no HF mask builder: the name is accepted,
    the model is exactly eager, and anyattn is never called (no error, no warning)."""
    ref, ours = _pair("deberta_v2")
    ids, am = _padded(S=10, side="right")
    with torch.no_grad(), record_calls() as seen:
        _close(ref(ids, attention_mask=am).logits, ours(ids, attention_mask=am).logits, am.bool())
    assert ours.config._attn_implementation == "anyattn" and len(seen) == 0
