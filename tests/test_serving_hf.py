"""Serving through transformers on CPU (float32, random weights): ``generate()`` with
``attn_implementation="anyattn"`` runs its decode steps on the KV-cache key layout
(``padding(kv=...)``: queries bottom-right among each row's real keys) and gives HF eager's greedy
tokens on left-padded batches; ``model(..., anyattn_kv=step)`` puts an HF model on anyattn's own
caches (continuous batching, examples/continuous_batching.py); learned sinks train exactly."""

from __future__ import annotations

import copy
import os
import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")

import anyattn as aa  # noqa: E402
import anyattn.hf as ah  # noqa: E402
from anyattn.testing import record_calls  # noqa: E402

from .test_hf import V, _batch, tiny_config  # noqa: E402

ah.register()
ROOT = os.path.join(os.path.dirname(__file__), "..")


def _pair(name, impl):
    cfg, cls = tiny_config(name)
    torch.manual_seed(0)
    ref = cls._from_config(copy.deepcopy(cfg), attn_implementation="eager").eval()
    ours = cls._from_config(copy.deepcopy(cfg), attn_implementation=impl).eval()
    ours.load_state_dict(ref.state_dict())
    return ref, ours


@pytest.mark.parametrize("impl", ["anyattn", "anyattn:eager", "anyattn:sdp"])
@pytest.mark.parametrize("name", ["llama", "qwen2", "gemma2"])
def test_greedy_generation_equals_hf_eager_with_left_padding(name, impl):
    if name == "gemma2" and impl == "anyattn:sdp":
        pytest.skip("softcap is not an additive bias: sdpa refuses Gemma2 (tested in test_hf.py)")
    ref, ours = _pair(name, impl)
    ids, am = _batch(S=9, side="left")
    kw = dict(attention_mask=am, max_new_tokens=10, do_sample=False, pad_token_id=0)
    with torch.no_grad(), record_calls() as seen:
        want = ref.generate(ids, **kw)
        got = ours.generate(ids, **kw)
    assert torch.equal(want, got), (want, got)
    decode = [c for c in seen if c.q_shape[2] == 1]
    assert len(decode) == 9 * 2  # 9 decode steps x 2 layers
    # the KV-cache key layout: every row's real keys, the new token bottom-right among them (a
    # sliding layer's cache keeps only the window: once the padding has left it, no padding term)
    ok = ("causal() & padding(kv_mask=", "sliding_window(4) & padding(kv_mask=")
    assert all(repr(c.mask).startswith(ok) or repr(c.mask) == "sliding_window(4)" for c in decode), {repr(c.mask) for c in decode}
    assert any("padding(kv_mask=" in repr(c.mask) for c in decode)


def test_decode_step_with_holes_in_the_prompt_mask_is_exact():
    """A keep-mask with a hole in the middle of a prompt (not left padding): the decode step's
    queries are real, so the key layout form still applies; logits equal eager's."""
    ref, ours = _pair("llama", "anyattn")
    ids = torch.randint(2, V, (2, 8), generator=torch.Generator().manual_seed(3))
    am = torch.ones(2, 8, dtype=torch.long)
    am[1, 2:4] = 0
    nxt = torch.randint(2, V, (2, 1), generator=torch.Generator().manual_seed(4))
    am2 = torch.cat([am, torch.ones(2, 1, dtype=am.dtype)], 1)
    with torch.no_grad():
        outs = []
        for m in (ref, ours):
            o = m(ids, attention_mask=am, use_cache=True)
            outs.append(m(nxt, attention_mask=am2, past_key_values=o.past_key_values).logits)
    torch.testing.assert_close(outs[1], outs[0], atol=2e-5, rtol=1e-4)


def test_hf_model_on_an_anyattn_contiguous_cache_equals_a_full_forward():
    """Mistral (sliding window 5) driven step by step on a ContiguousKVCache with a window:
    prefill, then decode steps; logits equal HF eager's single forward over the whole sequence."""
    cfg, cls = tiny_config("mistral")
    torch.manual_seed(0)
    ref = cls._from_config(copy.deepcopy(cfg), attn_implementation="eager").eval()
    ours = cls._from_config(copy.deepcopy(cfg), attn_implementation="anyattn").eval()
    ours.load_state_dict(ref.state_dict())
    ids = torch.randint(2, V, (2, 13), generator=torch.Generator().manual_seed(2))
    hd = cfg.hidden_size // cfg.num_attention_heads
    cache = aa.ContiguousKVCache(2, 8, cfg.num_key_value_heads, hd, layers=cfg.num_hidden_layers, window=cfg.sliding_window)
    got, at = [], 0
    with torch.no_grad():
        for n in (6, 1, 1, 4, 1):
            step = cache.step(n)
            got.append(ours(ids[:, at : at + n], position_ids=step.positions, anyattn_kv=step, use_cache=False).logits)
            at += n
        want = ref(ids, use_cache=False).logits
    assert cache.offsets[0] > 0  # 13 tokens through 8 slots: the rows were compacted
    torch.testing.assert_close(torch.cat(got, 1), want, atol=2e-5, rtol=1e-4)


def test_anyattn_kv_needs_decoder_layers():
    fwd = ah._make_forward("auto")
    q = torch.randn(1, 2, 1, 16)
    cache = aa.ContiguousKVCache(1, 8, 2, 16)
    with pytest.raises(ValueError, match="anyattn_kv: expected attention modules with an integer layer_idx"):
        fwd(torch.nn.Module(), q, q, q, None, anyattn_kv=cache.step(1))


def test_continuous_batching_example_equals_hf_generate():
    """examples/continuous_batching.py --check: chunked prefill and decode packed into one row per
    step on a PagedKVCache; every request's greedy tokens equal HF generate run on it alone. The
    24-page pool is too small for all requests at once: admission waits for released pages."""
    pages = "24"
    env = dict(os.environ, PYTHONPATH=os.path.join(ROOT, "src") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run(
        [sys.executable, os.path.join(ROOT, "examples", "continuous_batching.py"), "--check", "--requests", "12",
         "--pages", pages, "--budget", "64", "--chunk", "16"],
        capture_output=True, text=True, env=env, timeout=600,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    assert "equal HF's greedy generate" in r.stdout
    assert "up to 12 running" not in r.stdout  # the pool held fewer at a time


def test_gpt_oss_sink_gradients_equal_hf_eager():
    """Training with learned sinks: s_aux becomes sink(...); gradients reach the sink logits and
    equal HF eager's (which appends the sink as a softmax column)."""
    cfg = transformers.GptOssConfig(vocab_size=V, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=4,
                                    num_experts_per_tok=2, sliding_window=5,
                                    layer_types=["sliding_attention", "full_attention"])  # fmt: skip
    torch.manual_seed(0)
    ref = transformers.GptOssForCausalLM._from_config(copy.deepcopy(cfg), attn_implementation="eager")
    ours = transformers.GptOssForCausalLM._from_config(copy.deepcopy(cfg), attn_implementation="anyattn")
    with torch.no_grad():
        for mod in ref.modules():
            if hasattr(mod, "sinks"):
                mod.sinks.normal_(0, 1)
    ours.load_state_dict(ref.state_dict())
    ids, am = _batch(side="right")
    grads = []
    with record_calls() as seen:
        for m in (ref, ours):
            m.zero_grad()
            logits = m(ids, attention_mask=am).logits
            (logits * am[..., None]).square().sum().backward()
            grads.append({n: p.grad.clone() for n, p in m.named_parameters() if "sinks" in n})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == 2
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], atol=1e-4, rtol=1e-3, msg=n)
        assert grads[0][n].abs().sum() > 0
    assert all(any(type(s).__name__ == "Sink" for s in c.scores) for c in seen)
