"""DPLM and DPLM-2 on GPU backends: bf16 on each backend against the float32 model (issue 5).

    PYTHONPATH=src python3 -m pytest -q -m cuda tests/test_cuda_dplm.py -p no:cacheprovider

Random weights (no checkpoint on the device machine) at the published head dims: DPLM with
DPLM-150M's layer shape (hidden 640, 20 heads, head dim 32), DPLM-2 with DPLM2-650M's (hidden
1280, 20 heads, head dim 64) and the full 8229-token vocabulary; 6 layers each. Batches of 8
proteins with lognormal lengths and 15% masked residues: right-padded DPLM rows, two-track DPLM-2
rows (structure codes then residues, padding in the middle of each row). The float32 reference is
the same model on SDPA; its float32 agreement with transformers / a float64 formulation of the
official forward is tested on CPU in tests/test_dplm.py.

Metrics over the real tokens: relative L2 of last_hidden_state <= 1e-2, per-token cosine (1st
percentile) >= 0.999, pooled cosine (mean over each row's real tokens, worst row) >= 0.9995,
top-1 agreement of the logits >= 0.995. The random LM head reads back the input token
(lm_head.dense = identity, decoder = the token embeddings) so that top-1 is well
defined; a plain random head has near-ties everywhere and its top-1 would measure ties.
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

from anyattn.models.dplm import DPLM2ForMaskedLM, DPLM2Tokenizer, DPLMForMaskedLM  # noqa: E402
from anyattn.models.esm2 import ESM2Config  # noqa: E402
from anyattn.models.tokenizer import ProteinTokenizer  # noqa: E402

AA = "ACDEFGHIKLMNPQRSTVWY"
DPLM2_VOCAB = (
    "<cls_aa>", "<pad>", "<eos_aa>", "<unk_aa>", *"LAGVSERTIDPKQNFYMHWCXBUZO.-", "<null_1>", "<mask_aa>",
    "<cls_struct>", "<eos_struct>", "<unk_struct>", *(f"{i:04d}" for i in range(8192)), "<mask_struct>",
)  # fmt: skip
BACKENDS = ["sdpa", "cudnn", "flash_torch", "flex"]


def _config(kind: str) -> ESM2Config:
    if kind == "dplm":
        return ESM2Config(vocab_size=33, hidden_size=640, num_hidden_layers=6, num_attention_heads=20, intermediate_size=2560)
    return ESM2Config(
        vocab_size=len(DPLM2_VOCAB), hidden_size=1280, num_hidden_layers=6, num_attention_heads=20, intermediate_size=5120,
        tie_word_embeddings=False,
    )  # fmt: skip


def _model(kind: str, device="cuda"):
    torch.manual_seed(0)
    cfg = _config(kind)
    m = (DPLMForMaskedLM if kind == "dplm" else DPLM2ForMaskedLM)(cfg).eval()
    C = cfg.hidden_size
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "word_embeddings" in name:
                p.normal_(0.0, 1.0)
            elif p.dim() == 2 and name.startswith("esm.encoder"):
                p.normal_(0.0, 1.0 / math.sqrt(p.shape[1]))
            elif p.dim() == 1 and name.startswith("esm.encoder") and name.endswith("bias"):
                p.normal_(0.0, 0.02)
        m.lm_head.dense.weight.copy_(torch.eye(C))
        m.lm_head.dense.bias.zero_()
        if not cfg.tie_word_embeddings:  # DPLM-2's head is untied: a copy of the embeddings
            m.lm_head.decoder.weight.copy_(m.esm.embeddings.word_embeddings.weight)
    return m.to(device)


def _lengths(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [int(min(500, max(8, rng.lognormvariate(5.0, 0.6)))) for _ in range(n)]


def _batch(kind: str, seed: int = 0, device="cuda") -> dict:
    rng = random.Random(seed)
    seqs, structs = [], []
    for n in _lengths(8, seed):
        seqs.append("".join(rng.choice(AA) if rng.random() > 0.15 else "*" for _ in range(n)))
        structs.append([rng.randrange(8192) if rng.random() > 0.15 else -1 for _ in range(n)])
    if kind == "dplm":
        tok = ProteinTokenizer.esm()
        b = tok([s.replace("*", "<mask>") for s in seqs])
    else:
        tok = DPLM2Tokenizer(DPLM2_VOCAB)
        b = tok([s.replace("*", "<mask_aa>") for s in seqs], [[max(c, 0) for c in st] for st in structs])
        ids = b["input_ids"]
        h = ids.shape[1] // 2
        for r, st in enumerate(structs):  # <mask_struct> where the code was drawn as masked
            for j, c in enumerate(st):
                if c < 0:
                    ids[r, 1 + j] = tok.mask_struct_id
        assert h * 2 == ids.shape[1]
    return {k: v.to(device) for k, v in b.items()}


def _metrics(got, ref, keep) -> dict:
    a, b = got.last_hidden_state.float()[keep], ref.last_hidden_state.float()[keep]
    rel_l2 = ((a - b).norm() / b.norm()).item()
    cos = torch.nn.functional.cosine_similarity(a, b, dim=-1)
    p1 = torch.quantile(cos, 0.01).item()
    k = keep.unsqueeze(-1).float()
    pa = (got.last_hidden_state.float() * k).sum(1) / k.sum(1)
    pb = (ref.last_hidden_state.float() * k).sum(1) / k.sum(1)
    pooled = torch.nn.functional.cosine_similarity(pa, pb, dim=-1).min().item()
    top1 = (got.logits.float()[keep].argmax(-1) == ref.logits.float()[keep].argmax(-1)).float().mean().item()
    return dict(rel_l2=rel_l2, cos_p1=p1, pooled_min=pooled, top1=top1)


@pytest.fixture(scope="module", params=["dplm", "dplm2"])
def models(request):
    """(kind, float32 model, bf16 model, batch, float32 output on SDPA, bf16 eager's metrics)."""
    kind = request.param
    m32 = _model(kind)
    m16 = _model(kind).to(torch.bfloat16)
    batch = _batch(kind)
    m32.attn_backend, m16.attn_backend = "sdpa", "eager"
    with torch.no_grad():
        ref = m32(batch["input_ids"], batch["attention_mask"])
        base = _metrics(m16(batch["input_ids"], batch["attention_mask"]), ref, batch["attention_mask"].bool())
    print(kind, "eager bf16 (the error of plain bf16 compute)", base)
    return kind, m16, batch, ref, base


@pytest.mark.parametrize("backend", BACKENDS)
def test_cuda_dplm_bf16_backend_agrees_with_float32(models, backend):
    """Issue 5's thresholds, and (DESIGN.md section 7) the backend's error within 2x the error
    of bf16 eager attention in the same model. The relative L2 grows with depth: measured on CPU
    (bf16, eager) 0.008 at 6 layers, 0.012 at 30 (docs/dplm.md); 6 layers are tested here."""
    kind, m16, batch, ref, base = models
    m16.attn_backend = backend
    with torch.no_grad():
        got = m16(batch["input_ids"], batch["attention_mask"])
    m = _metrics(got, ref, batch["attention_mask"].bool())
    print(kind, backend, m)
    assert m["rel_l2"] <= 2 * base["rel_l2"] + 1e-4, (m, base)
    assert m["rel_l2"] <= 1e-2, m
    assert m["cos_p1"] >= 0.999, m
    assert m["pooled_min"] >= 0.9995, m
    assert m["top1"] >= 0.995, m
    assert m16.attn_backend == backend


def test_cuda_dplm_packed_equals_padded_bf16():
    """DPLM (not DPLM-2) takes packed documents: flash_torch on a packed row equals the padded batch."""
    m16 = _model("dplm").to(torch.bfloat16)
    m16.attn_backend = "flash_torch"
    tok = ProteinTokenizer.esm()
    rng = random.Random(3)
    seqs = ["".join(rng.choice(AA) for _ in range(n)) for n in _lengths(6, 3)]
    b = {k: v.cuda() for k, v in tok(seqs).items()}
    ids, info = tok.pack(seqs, device="cuda")
    with torch.no_grad():
        padded = m16(b["input_ids"], b["attention_mask"]).last_hidden_state
        packed = m16(ids, seq_info=info).last_hidden_state
    a, r = packed[0].float(), padded[b["attention_mask"].bool()].float()
    assert ((a - r).norm() / r.norm()).item() <= 5e-3
