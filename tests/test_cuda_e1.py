"""E1 on GPU backends: bf16 on each backend against the float32 model (issue 5's thresholds).

    PYTHONPATH=src python3 -m pytest -q -m cuda tests/test_cuda_e1.py -p no:cacheprovider

Random weights (no checkpoint on the device machine), E1's layer pattern (every third layer global,
clip_qkv, gated SiLU FFN, two RoPE bases), a padded batch of samples with 0-3 context sequences
and mixed lengths, left padding. The float32 reference runs the same model on the eager backend
(its float32 agreement with a float64 formulation is tested on CPU in tests/test_e1.py). Metrics over the real
tokens: relative L2 of last_hidden_state <= 1e-2, per-residue cosine (1st percentile) >= 0.999,
pooled cosine (mean over each query's residues) >= 0.9995, top-1 agreement of the logits >= 0.995.

The random LM head reads back the input token (mlm_head.0 = identity, mlm_head.3 = 2 x the token
embeddings), so that top-1 is well defined; a plain random head has near-ties everywhere and its
top-1 would measure ties rather than agreement.
"""

from __future__ import annotations

import math
import random

import pytest
import torch

pytest.importorskip("transformers")

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

from anyattn.models.e1 import E1Config, E1ForMaskedLM, E1Tokenizer  # noqa: E402

TOK = E1Tokenizer()
AA = "ACDEFGHIKLMNPQRSTVWY"


def _config(kv: int) -> E1Config:
    return E1Config(
        hidden_size=512, intermediate_size=1536, num_hidden_layers=6, num_attention_heads=8, num_key_value_heads=kv,
        global_attention_every_n_layers=3, clip_qkv=8.0, max_num_sequences=16, max_num_positions_within_seq=1024,
    )  # fmt: skip


def _model(kv: int) -> E1ForMaskedLM:
    torch.manual_seed(0)
    m = E1ForMaskedLM(_config(kv)).eval()
    with torch.no_grad():
        for name, p in m.named_parameters():
            if p.dim() == 2 and "embed" not in name:
                # half gain on q, k (attention logits of std ~2, not ~8: softmax not saturated) and on
                # the residual branches o_proj, w2 (the stream dominates, as in trained networks)
                gain = 0.5 if name.endswith(("q_proj.weight", "k_proj.weight", "o_proj.weight", "w2.weight")) else 1.0
                p.normal_(0.0, gain / math.sqrt(p.shape[1]))
            elif "embed" in name:
                p.normal_(0.0, 1.0)
        C = m.config.hidden_size
        m.mlm_head[0].weight.copy_(torch.eye(C))
        m.mlm_head[0].bias.zero_()
        m.mlm_head[3].weight.copy_(2.0 * m.model.embed_tokens.weight / math.sqrt(C))
    return m.cuda()


def _samples(n: int, max_context: int, seed: int = 0) -> list:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        def seq():
            return "".join(rng.choice(AA) for _ in range(int(min(600, max(8, rng.lognormvariate(5.0, 0.6))))))

        out.append((seq(), [seq() for _ in range(rng.randint(0, max_context))]))
    return out


def _query_mask(batch) -> torch.Tensor:
    """(B, S) bool: residues of each row's query sequence (its last sequence, without the 4 specials)."""
    sid, keep, ids = batch["sequence_ids"], batch["attention_mask"].bool(), batch["input_ids"]
    last = sid.max(dim=1, keepdim=True).values
    special = torch.isin(ids, torch.tensor([TOK.vocab[t] for t in ("<bos>", "<eos>", "1", "2")], device=ids.device))
    return keep & (sid == last) & ~special


def _metrics(got, ref, batch) -> dict:
    keep = batch["attention_mask"].bool()
    a, b = got.last_hidden_state.float()[keep], ref.last_hidden_state.float()[keep]
    rel_l2 = ((a - b).norm() / b.norm()).item()
    cos = torch.nn.functional.cosine_similarity(a, b, dim=-1)
    p1 = torch.quantile(cos, 0.01).item()
    qm = _query_mask(batch).unsqueeze(-1).float()
    pa = (got.last_hidden_state.float() * qm).sum(1) / qm.sum(1)
    pb = (ref.last_hidden_state.float() * qm).sum(1) / qm.sum(1)
    pooled = torch.nn.functional.cosine_similarity(pa, pb, dim=-1).min().item()
    top1 = (got.logits.float()[keep].argmax(-1) == ref.logits.float()[keep].argmax(-1)).float().mean().item()
    return dict(rel_l2=rel_l2, cos_p1=p1, pooled_min=pooled, top1=top1)


CASES = [
    # (backend, samples: max context sequences per sample)
    ("sdpa", 3),
    ("cudnn", 3),
    ("flex", 3),
    ("flash_torch", 0),  # varlen kernels serve documents only: single-sequence samples
    (("flash_torch", "flex"), 3),  # within-sequence layers on varlen, global layers on flex
]


@pytest.fixture(scope="module", params=[2, 8], ids=["gqa_kv2", "mha_kv8"])
def models(request):
    m32 = _model(request.param)
    m32.config.compile_layers = False  # the reference: plain layers (m16 runs the default, "auto")
    m16 = _model(request.param).to(torch.bfloat16)
    return m32, m16


@pytest.mark.parametrize("backend,max_context", CASES, ids=[str(c[0]) for c in CASES])
def test_cuda_e1_bf16_backend_agrees_with_float32(models, backend, max_context):
    m32, m16 = models
    batch = TOK.batch(_samples(8, max_context), padding_side="left", device="cuda")
    m32.attn_backend = "eager"
    m16.attn_backend = backend
    with torch.no_grad():
        ref = m32(batch["input_ids"], batch["attention_mask"], output_s_max=True)
        got = m16(batch["input_ids"], batch["attention_mask"], output_s_max=True)
    m = _metrics(got, ref, batch)
    print(backend, m)
    assert m["rel_l2"] <= 1e-2, m
    assert m["cos_p1"] >= 0.999, m
    assert m["pooled_min"] >= 0.9995, m
    assert m["top1"] >= 0.995, m
    torch.testing.assert_close(got.s_max, ref.s_max, rtol=3e-2, atol=0)
    assert m16.attn_backend == backend


def test_cuda_e1_packed_equals_padded_bf16_flex():
    m16 = _model(2).to(torch.bfloat16)
    m16.attn_backend = "flex"
    samples = _samples(6, 3, seed=1)
    b = TOK.batch(samples, device="cuda")
    p = TOK.pack(samples, device="cuda")
    with torch.no_grad():
        padded = m16(b["input_ids"], b["attention_mask"]).last_hidden_state
        packed = m16(p["input_ids"], seq_info=p["seq_info"]).last_hidden_state
    keep = b["attention_mask"].bool()
    torch.testing.assert_close(packed[0][: int(keep.sum())], padded[keep], rtol=0, atol=0)


def test_cuda_e1_default_auto_compiles_and_equals_plain_layers(models):
    """The plain call with the default compile_layers="auto" (compiled on CUDA) against
    compile_layers=False, bf16, packed layout (("eager", "flex"): eager serves it, and compiles
    nothing itself, so that dynamo's graph count is the layers'), both against the float32 plain
    model: error(auto) <= 2 x error(False) + 1e-5 (relative L2 of the last hidden state, max abs
    of the logits). A second batch of another token count adds no graph."""
    from torch._dynamo.utils import counters

    m32, m16 = models
    m32.attn_backend, m16.attn_backend = "eager", ("eager", "flex")
    batches = [TOK.batch(_samples(8, 3, seed=4), padding_side="left", device="cuda"),
               TOK.batch(_samples(5, 2, seed=5), device="cuda")]  # fmt: skip
    with torch.no_grad():
        refs = [m32(b["input_ids"], b["attention_mask"]) for b in batches]
    errs = {}
    try:
        for mode in (False, "auto"):
            m16.config.compile_layers = mode
            torch._dynamo.reset()
            counters.clear()
            graphs, errs[mode] = [], []
            for b, ref in zip(batches, refs):
                with torch.no_grad():
                    got = m16(b["input_ids"], b["attention_mask"])
                graphs.append(counters["stats"]["unique_graphs"])
                keep = b["attention_mask"].bool()
                a, r = got.last_hidden_state.float()[keep], ref.last_hidden_state.float()[keep]
                errs[mode].append({"rel_l2": ((a - r).norm() / r.norm()).item(),
                                   "max_abs_logits": (got.logits.float()[keep] - ref.logits[keep]).abs().max().item()})  # fmt: skip
            assert graphs == ([2, 2] if mode == "auto" else [0, 0]), f"{mode}: graphs after each batch {graphs}"
    finally:
        m16.config.compile_layers = "auto"
        m16.attn_backend = "auto"
    for i, (got, base) in enumerate(zip(errs["auto"], errs[False])):
        bounds = {k: 2 * base[k] + 1e-5 for k in got}
        print(f"E1 compile_layers='auto' batch {i}: {got} (bounds {bounds})")
        assert all(got[k] <= bounds[k] for k in got), (got, bounds)
