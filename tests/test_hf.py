"""anyattn.hf on CPU, float32: random-weight models built by transformers itself, anyattn vs HF eager.

Every comparison loads the same weights into an HF "eager" model and an "anyattn*" model and
compares logits (or hidden states) on the real tokens. ``anyattn.testing.record_calls`` records
the mask every layer handed to the core, so the tests also prove the structured path ran (no S x S
mask) where it should.
"""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")

import anyattn  # noqa: E402
import anyattn.hf as ah  # noqa: E402
from anyattn.testing import record_calls  # noqa: E402

ah.register()

V = 97  # vocab


def tiny_config(name: str, *, vocab: int = V, hidden: int = 64, window: int = 5, softcap: float = 5.0):
    """(config, class) of a 2-layer random-weight model per family (4 heads, FFN 2x hidden);
    windows small enough to matter. Also used by test_cuda_hf.py with larger sizes."""
    common = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2, num_attention_heads=4)
    if name == "llama":
        return transformers.LlamaConfig(**common, num_key_value_heads=2), transformers.LlamaForCausalLM
    if name == "qwen2":
        cfg = transformers.Qwen2Config(**common, num_key_value_heads=2, use_sliding_window=True, sliding_window=window,
                                       max_window_layers=1)  # fmt: skip
        return cfg, transformers.Qwen2ForCausalLM
    if name == "mistral":
        return transformers.MistralConfig(**common, num_key_value_heads=2, sliding_window=window), transformers.MistralForCausalLM
    if name == "gemma2":
        cfg = transformers.Gemma2Config(**common, num_key_value_heads=2, head_dim=hidden // 4, sliding_window=window,
                                        attn_logit_softcapping=softcap, final_logit_softcapping=30.0,
                                        query_pre_attn_scalar=hidden // 4)  # fmt: skip
        return cfg, transformers.Gemma2ForCausalLM
    if name == "esm":
        cfg = transformers.EsmConfig(vocab_size=33, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                                     num_attention_heads=4, pad_token_id=1, mask_token_id=32,
                                     position_embedding_type="rotary", token_dropout=True)  # fmt: skip
        return cfg, transformers.EsmForMaskedLM
    if name == "bert":
        return transformers.BertConfig(**common), transformers.BertForMaskedLM
    raise KeyError(name)


def _pair(name: str, impl: str = "anyattn", seed: int = 0, ref_impl: str = "eager"):
    """(HF reference model, anyattn model) with the same weights. Each gets its own config object:
    transformers writes the implementation into the config, and modules read it at call time."""
    cfg, cls = tiny_config(name)
    torch.manual_seed(seed)
    ref = cls._from_config(copy.deepcopy(cfg), attn_implementation=ref_impl).eval()
    ours = cls._from_config(copy.deepcopy(cfg), attn_implementation=impl).eval()
    ours.load_state_dict(ref.state_dict())
    assert ref.config._attn_implementation == ref_impl and ours.config._attn_implementation == impl
    return ref, ours


class _Seen(list):
    """(mask repr, backend that ran) of every core call, read from anyattn.testing.record_calls."""

    def __init__(self, calls):
        super().__init__()
        self._calls = calls

    def __iter__(self):
        return iter([(repr(c.mask), c.backend) for c in self._calls])

    def __repr__(self):
        return repr(list(self))


@pytest.fixture
def spy():
    """Masks (repr) and backends of every core call made by the HF attention function."""
    with record_calls() as calls:
        yield _Seen(calls)


def _tol(a: torch.Tensor, b: torch.Tensor, where: torch.Tensor | None = None, atol: float = 2e-5):
    """fp32 on CPU: both sides are fp32 softmax attention; 2e-5 is ~100 ulp of logits of size ~1."""
    if where is not None:
        a, b = a[where], b[where]
    err = (a - b).abs().max().item()
    assert err <= atol, f"max |diff| {err:.3e} > {atol:.1e}"


def _batch(S=12, B=3, side="left", vocab=V, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, vocab, (B, S), generator=g)
    am = torch.ones(B, S, dtype=torch.long)
    lens = [S, S // 2 + 1, 2][:B]  # every row has real tokens: an all-padding prompt has no defined output
    for b, n in enumerate(lens):
        if side == "left":
            am[b, : S - n] = 0
        else:
            am[b, n:] = 0
    return ids, am


# -------------------------------------------------------------------------------- registration


def test_import_anyattn_does_not_import_transformers():
    code = "import sys, anyattn; assert 'transformers' not in sys.modules, 'transformers imported'; print('ok')"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr


def test_missing_transformers_names_the_extra():
    """With transformers blocked, `import anyattn.hf` fails with the pip command, not a bare ModuleNotFoundError."""
    code = (
        "import sys, importlib.abc\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'transformers' or name.startswith('transformers.'): raise ImportError('blocked')\n"
        "sys.meta_path.insert(0, Block())\n"
        "import importlib.util\n"
        "_fs = importlib.util.find_spec\n"
        "importlib.util.find_spec = lambda name, *a: None if name == 'transformers' else _fs(name, *a)\n"
        "try:\n"
        "    import anyattn.hf\n"
        "except ImportError as e:\n"
        "    print('ERR', e)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert "pip install 'anyattn[hf]'" in r.stdout, r.stdout + r.stderr


def test_register_names_and_flash_alias():
    names = ah.register()
    assert "anyattn" in names and "anyattn:flex" in names and "anyattn:fa_torch" in names
    assert not any(w in n for n in names for w in ("flash", "sdpa", "flex_attention"))  # transformers reads these
    with pytest.raises(ValueError, match="names: expected .*aliases"):
        ah.register("anyattn:sdpa")
    assert ah.hf_name("flash_torch") == "anyattn:fa_torch" and ah.hf_name() == "anyattn"
    with pytest.raises(ValueError, match="names: expected .*aliases"):
        ah.register("anyattn:flash_torch")
    with pytest.raises(ValueError, match="backend: expected"):
        ah.hf_name("nope")


# -------------------------------------------------------------------------------- equivalence


@pytest.mark.parametrize("name", ["llama", "qwen2", "mistral", "gemma2", "esm", "bert"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_logits_match_eager_with_padding(name, side, spy):
    ref, ours = _pair(name)
    vocab = 33 if name == "esm" else V
    ids, am = _batch(side=side, vocab=vocab)
    with torch.no_grad():
        a = ref(ids, attention_mask=am).logits
        b = ours(ids, attention_mask=am).logits
    _tol(a, b, am.bool())
    masks = {m for m, _ in spy}
    assert all("padding(" in m for m in masks), masks  # the 2-D mask became padding(), not a dense mask
    assert not any("dense" in m or "bias" in m for m in masks), masks
    if name in ("qwen2", "mistral", "gemma2"):
        assert any("sliding_window(4)" in m for m in masks), masks  # HF window 5 = self + 4 earlier keys
    if name in ("esm", "bert"):
        assert not any("causal" in m or "sliding" in m for m in masks), masks


@pytest.mark.parametrize("name", ["llama", "gemma2"])
def test_unpadded_batch_is_plain_causal(name, spy):
    """No padding: the mask is causal()/sliding_window only, so SDPA's is_causal / FA paths apply."""
    ref, ours = _pair(name)
    ids = torch.randint(2, V, (2, 12))
    with torch.no_grad():
        _tol(ref(ids).logits, ours(ids).logits)
    assert {m for m, _ in spy} <= {"causal()", "sliding_window(4)"}, spy


@pytest.mark.parametrize("impl", ["anyattn:eager", "anyattn:sdp"])
def test_forced_backend_is_used(impl, spy):
    ref, ours = _pair("llama", impl)
    ids, am = _batch()
    with torch.no_grad():
        _tol(ref(ids, attention_mask=am).logits, ours(ids, attention_mask=am).logits, am.bool())
    assert {b for _, b in spy} == {ah.HF_NAMES[impl]}


def test_forced_backend_that_cannot_run_raises():
    """Gemma2's softcap cannot run on SDPA: a forced "anyattn:sdp" raises, it does not fall back
    (and the name passes transformers' checks, which a name containing "sdpa" would not for Gemma2)."""
    _, ours = _pair("gemma2", "anyattn:sdp")
    with torch.no_grad(), pytest.raises(anyattn.UnsupportedError, match="sdpa"):
        ours(torch.randint(2, V, (1, 8)))


def test_training_gradients_match_eager():
    ref, ours = _pair("qwen2")
    ref.train(), ours.train()
    ids, am = _batch(side="right")
    labels = ids.masked_fill(am == 0, -100)
    ref(ids, attention_mask=am, labels=labels).loss.backward()
    ours(ids, attention_mask=am, labels=labels).loss.backward()
    for (n, p), q in zip(ref.named_parameters(), ours.parameters()):
        err = (p.grad - q.grad).abs().max().item()
        assert err <= 1e-5 * max(1.0, p.grad.abs().max().item()), (n, err)


# -------------------------------------------------------------------------------- packed input


def _packed(lengths, vocab=V, seed=3):
    g = torch.Generator().manual_seed(seed)
    docs = [torch.randint(2, vocab, (n,), generator=g) for n in lengths]
    ids = torch.cat(docs)[None]
    pos = torch.cat([torch.arange(n) for n in lengths])[None]
    return docs, ids, pos


@pytest.mark.parametrize("use_cache", [True, False])
@pytest.mark.parametrize("name", ["llama", "qwen2", "gemma2"])
def test_packed_equals_separate_documents(name, use_cache, spy):
    """position_ids restarting at 0, no attention mask (DataCollatorWithFlattening): per-document
    attention through documents(...), equal to running each document alone. use_cache=False: HF's
    mask builder detects the packing and hands over its packed-sequence mask function (recognized);
    use_cache=True: HF's builder sees a cache and builds a plain causal mask, and the attention
    function finds the documents in position_ids (HF's FlashAttention rule)."""
    ref, ours = _pair(name)
    lengths = [5, 9, 3, 7]
    docs, ids, pos = _packed(lengths)
    with torch.no_grad():
        packed = ours(ids, position_ids=pos, use_cache=use_cache).logits[0]
        alone = torch.cat([ref(d[None]).logits[0] for d in docs])
    _tol(alone, packed)
    masks = {m for m, _ in spy}
    assert all("documents([5, 9, 3, 7])" in m for m in masks), masks
    assert not any("dense" in m for m in masks), masks


def test_packed_equals_padded_batch():
    ref, ours = _pair("llama")
    lengths = [6, 11, 4]
    docs, ids, pos = _packed(lengths)
    S = max(lengths)
    padded = torch.zeros(len(docs), S, dtype=torch.long)
    am = torch.zeros(len(docs), S, dtype=torch.long)
    for b, d in enumerate(docs):
        padded[b, : len(d)], am[b, : len(d)] = d, 1
    with torch.no_grad():
        p = ours(ids, position_ids=pos).logits[0]
        q = ref(padded, attention_mask=am).logits[am.bool()]
    _tol(q, p)


def test_cu_seq_lens_kwargs_give_documents(spy):
    """Flash-style packing kwargs (cu_seq_lens_q/k) without position_ids still split documents."""
    ref, ours = _pair("llama")
    lengths = [4, 8, 5]
    docs, ids, _ = _packed(lengths)
    cu = torch.tensor([0, 4, 12, 17], dtype=torch.int32)
    with torch.no_grad():
        p = ours(ids, cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=8, max_length_k=8).logits[0]
        alone = torch.cat([ref(d[None]).logits[0] for d in docs])
    _tol(alone, p)
    assert all("documents([4, 8, 5])" in m for m, _ in spy), spy


def test_cu_seq_lens_disagreeing_with_position_ids_raises():
    _, ours = _pair("llama")
    _, ids, pos = _packed([4, 8, 5])
    cu = torch.tensor([0, 5, 12, 17], dtype=torch.int32)
    with torch.no_grad(), pytest.raises(ValueError, match="cu_seq_lens_q: expected the documents position_ids describe"):
        ours(ids, position_ids=pos, cu_seq_lens_q=cu, cu_seq_lens_k=cu)


# -------------------------------------------------------------------------------- generation


@pytest.mark.parametrize("name", ["llama", "qwen2", "gemma2"])
def test_generation_with_cache_matches_sdpa(name):
    """Left-padded batch, greedy decoding with a KV cache: every decode step has Sq=1 < Sk, which
    is bottom-right aligned; the tokens equal HF sdpa's (eager for Gemma2's softcap)."""
    ref, ours = _pair(name, ref_impl="eager" if name == "gemma2" else "sdpa")
    ids, am = _batch(S=7, side="left")
    kw = dict(attention_mask=am, max_new_tokens=8, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        a = ref.generate(ids, **kw)
        b = ours.generate(ids, **kw)
    assert torch.equal(a, b), (a, b)


def test_decode_step_logits_match_eager(spy):
    """One cached decode step (Sq=1, Sk=past+1) with left padding: logits equal eager's."""
    ref, ours = _pair("mistral")
    ids, am = _batch(S=9, side="left")
    with torch.no_grad():
        outs = []
        nxt = torch.randint(2, V, (ids.shape[0], 1))
        for m in (ref, ours):
            o = m(ids, attention_mask=am, use_cache=True)
            am2 = torch.cat([am, torch.ones(am.shape[0], 1, dtype=am.dtype)], 1)
            outs.append(m(nxt, attention_mask=am2, past_key_values=o.past_key_values).logits)
    _tol(outs[0], outs[1])
    assert not any("dense" in m for m, _ in spy), spy


# -------------------------------------------------------------------------------- what cannot be structured


def test_unrecognized_mask_function_goes_dense_and_exact():
    """An or_mask_function (image tokens seeing each other) is not a recognized pattern: the mask
    builder materializes it through HF's sdpa_mask, so the result is exact."""
    from transformers import masking_utils as mu

    img = torch.zeros(1, 10, dtype=torch.bool)
    img[0, 2:6] = True

    def image_block(b, h, q, kv):
        return img[b, q] & img[b, kv]

    fn = mu.or_masks(mu.causal_mask_function, image_block)
    got = ah._mask_interface(batch_size=1, q_length=10, kv_length=10, mask_function=fn, attention_mask=None)
    assert got.how.startswith("dense: mask_function"), got
    want = mu.sdpa_mask(batch_size=1, q_length=10, kv_length=10, mask_function=fn, allow_is_causal_skip=False)
    assert torch.equal(got.term.mask, want)


def test_static_cache_offsets_go_dense():
    from transformers import masking_utils as mu

    am = torch.ones(2, 6, dtype=torch.bool)
    got = ah._mask_interface(batch_size=2, q_length=1, kv_length=16, q_offset=torch.tensor(5), kv_offset=0,
                             mask_function=mu.causal_mask_function, attention_mask=am)  # fmt: skip
    assert got.how.startswith("dense:"), got
    assert got.term.mask[0, 0, 0].tolist() == [True] * 6 + [False] * 10


def test_four_d_float_mask_is_a_bias():
    """A prepared 4-D float mask (custom masking) is passed as bias(): same result as eager."""
    ref, ours = _pair("llama")
    S = 8
    bias = torch.zeros(1, 1, S, S)
    bias.masked_fill_(torch.ones(S, S, dtype=torch.bool).triu(1), torch.finfo(torch.float32).min)
    bias[..., 3] = torch.finfo(torch.float32).min  # nobody sees key 3, except through its own row's diagonal below
    bias[0, 0, 3, 3] = 0.0
    ids = torch.randint(2, V, (1, S))
    with torch.no_grad():
        _tol(ref(ids, attention_mask=bias).logits, ours(ids, attention_mask=bias).logits)


def test_cross_attention_config_keeps_keys_only_padding():
    """Models with cross-attention: HF's bidirectional padding masks keys only; anyattn's padding()
    would also empty query rows, so such configs get a broadcast (B, 1, 1, Sk) keys-only mask."""
    from transformers import masking_utils as mu

    cfg = transformers.BertConfig(is_decoder=True, add_cross_attention=True)
    am = torch.tensor([[1, 1, 0, 0]], dtype=torch.bool)
    got = ah._mask_interface(batch_size=1, q_length=4, kv_length=4, mask_function=mu.bidirectional_mask_function,
                             attention_mask=am, config=cfg)  # fmt: skip
    assert "dense(" in repr(got.term) and tuple(got.term.mask.shape) == (1, 1, 1, 4), got


def test_bad_mask_type_names_the_argument():
    fwd = ah._make_forward("auto")
    q = torch.randn(1, 2, 4, 8)
    with pytest.raises(TypeError, match="attention_mask: expected an anyattn.hf.HFMask"):
        fwd(torch.nn.Module(), q, q, q, "nope")


# -------------------------------------------------------------------------------- sinks, weights


def test_sinks_match_gpt_oss_eager():
    """GPT-OSS passes learned sinks as s_aux: out * sigmoid(lse - sink) equals eager's extra column."""
    cfg = transformers.GptOssConfig(vocab_size=V, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=4,
                                    num_experts_per_tok=2, sliding_window=5,
                                    layer_types=["sliding_attention", "full_attention"])  # fmt: skip
    torch.manual_seed(0)
    ref = transformers.GptOssForCausalLM._from_config(copy.deepcopy(cfg), attn_implementation="eager").eval()
    ours = transformers.GptOssForCausalLM._from_config(copy.deepcopy(cfg), attn_implementation="anyattn").eval()
    with torch.no_grad():
        for mod in ref.modules():
            if hasattr(mod, "sinks"):
                mod.sinks.normal_(0, 1)
    ours.load_state_dict(ref.state_dict())
    ids, am = _batch(side="right")
    with torch.no_grad():
        _tol(ref(ids, attention_mask=am).logits, ours(ids, attention_mask=am).logits, am.bool())


def test_output_attentions_returns_eager_weights():
    ref, ours = _pair("llama")
    ids, am = _batch()
    with torch.no_grad():
        a = ref(ids, attention_mask=am, output_attentions=True).attentions
        b = ours(ids, attention_mask=am, output_attentions=True).attentions
    rows = am.bool()[:, None, :, None]
    for x, y in zip(a, b):
        _tol(x * rows, y * rows)


@pytest.mark.slow
def test_flex_packed_cpu(spy):
    """The one CPU flex case (compiles one kernel, ~20 s): a forced "anyattn:flex" on packed input
    runs documents & causal through FlexAttention and equals each document run alone in eager."""
    ref, ours = _pair("llama", "anyattn:flex")
    docs, ids, pos = _packed([5, 9, 3, 7])
    with torch.no_grad():
        packed = ours(ids, position_ids=pos).logits[0]
        alone = torch.cat([ref(d[None]).logits[0] for d in docs])
    _tol(alone, packed)
    assert {b for _, b in spy} == {"flex"} and all("documents([5, 9, 3, 7])" in m for m, _ in spy), spy
