"""ESM2 on CUDA: bf16 on every GPU backend against the float32 model (issue 5's thresholds), with
mixed-length padded batches and packed rows; the compiled layers of the benchmark. Run on a GPU
machine (< 3 minutes on an H200):

    PYTHONPATH=src python3 -m pytest -m cuda tests/test_cuda_models.py -s

Random weights of the 35M and 150M shapes (esm2_t12_35M: D=24, esm2_t30_150M: D=32), with
non-trivial LayerNorms and biases. The word embeddings (tied to the LM head) are drawn with std 1
and the LM head's dense layer starts near the identity, so that predictions depend on the input
token with clear margins, as in a trained model: with the default std 0.02 initialisation the
33 logits of a random model are nearly tied and top-1 "agreement" would measure ties, not errors.

Thresholds (bf16 vs float32, at real tokens), issue 5's: relative L2 of the last hidden state
and of every layer's hidden state <= 1e-2, per-residue cosine (1st percentile) >= 0.999,
per-sequence mean-pooled cosine (worst sequence) >= 0.9995, top-1 agreement of the logits >=
0.995. The float32 reference is the same weights on the eager backend with the padded structure
(no packing), float32 matmuls (TF32 off).

Each bound is the issue's threshold or, where larger, the achievable error (STYLE.md: 2 x the
error of the same-dtype reference): the same bf16 model on the eager backend, padded, as HF
computes it. Measured on CPU with these random weights: HF's own bf16 EsmForMaskedLM has
relative L2 0.0135 at 30 layers (150M shape) and ~0.0094 at 12 layers (35M shape); the residual
stream's bf16 rounding accumulates over the layers. Every case prints the bound it used.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("transformers")

import anyattn  # noqa: E402
from anyattn.backends import REGISTRY  # noqa: E402
from anyattn.errors import UnsupportedError  # noqa: E402
from anyattn.models import ESM2Config, ESM2ForMaskedLM  # noqa: E402

from .test_esm2 import _batch as esm2_batch  # noqa: E402

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

BACKENDS = ["sdpa", "cudnn", "flash_torch", "flex"]
SHAPES = {"35M": "esm2_t12_35M", "150M": "esm2_t30_150M"}
# token lengths (with <cls>/<eos>): the maximum (1026), long, short, length 1 (<cls> only), 3
LENGTHS = [1026, 700, 321, 97, 30, 1, 3, 412, 64, 129]
PAD = 1
LIMITS = {"rel_l2": 1e-2, "cos_p1": 0.999, "pooled_cos": 0.9995, "top1": 0.995}


def _model(preset: str) -> ESM2ForMaskedLM:
    torch.manual_seed(0)
    with torch.device("cuda"):
        m = ESM2ForMaskedLM(ESM2Config.from_name(preset, attn_backend="eager", pack_padded=False))
    with torch.no_grad():
        for n, p in m.named_parameters():
            if n.endswith("bias") or "LayerNorm" in n or "layer_norm" in n:
                p.add_(0.1 * torch.randn_like(p))
        m.esm.embeddings.word_embeddings.weight.normal_(0.0, 1.0)
        C = m.config.hidden_size
        m.lm_head.dense.weight.copy_(torch.eye(C, device="cuda") + 0.02 * torch.randn(C, C, device="cuda"))
    return m.eval()


def _batch():
    """Right-padded LENGTHS batch with three <mask> tokens (token dropout), on the GPU."""
    ids, am = esm2_batch(LENGTHS, seed=1, masks=[(0, 100), (1, 5), (3, 50)])
    return ids.cuda(), am.cuda()


@pytest.fixture(scope="module", params=list(SHAPES))
def setup(request):
    torch.backends.cuda.matmul.allow_tf32 = False
    m32 = _model(SHAPES[request.param])
    ids, am = _batch()
    with torch.no_grad():
        ref = m32(ids, attention_mask=am, output_hidden_states=True)
    m16 = copy.deepcopy(m32).to(torch.bfloat16)
    with torch.no_grad():  # the same-dtype reference: bf16, eager, padded (as HF computes it)
        base = _metrics(m16(ids, attention_mask=am, output_hidden_states=True), ref, am.bool(), am)
    limits = {
        "rel_l2": max(LIMITS["rel_l2"], 2 * max(base["rel_l2"], base["rel_l2_worst_layer"])),
        "cos_p1": min(LIMITS["cos_p1"], 1 - 2 * (1 - base["cos_p1"])),
        "pooled_cos": min(LIMITS["pooled_cos"], 1 - 2 * (1 - base["pooled_cos"])),
        "top1": min(LIMITS["top1"], base["top1"] - 0.005),
    }
    print(f"\n{request.param} bf16 eager (same-dtype reference): " + ", ".join(f"{k} {v:.6f}" for k, v in base.items()))
    m16.pack_padded = "auto"
    yield request.param, m16, ids, am, ref, limits
    del m32, m16


def _metrics(out, ref, keep_out, am) -> dict:
    keep = am.bool()
    h, r = out.last_hidden_state[keep_out].float(), ref.last_hidden_state[keep].float()
    seq = torch.nonzero(keep)[:, 0]  # the row (sequence) of each real token
    n = int(keep.shape[0])
    pooled_h = torch.zeros(n, h.shape[1], device=h.device).index_add_(0, seq, h)
    pooled_r = torch.zeros(n, r.shape[1], device=r.device).index_add_(0, seq, r)
    per_layer = [
        ((a[keep_out].float() - b[keep].float()).norm() / b[keep].float().norm()).item()
        for a, b in zip(out.hidden_states, ref.hidden_states)
    ]
    return {
        "rel_l2": ((h - r).norm() / r.norm()).item(),
        "rel_l2_worst_layer": max(per_layer),
        "cos_p1": torch.quantile(F.cosine_similarity(h, r, dim=-1), 0.01).item(),
        "pooled_cos": F.cosine_similarity(pooled_h, pooled_r, dim=-1).min().item(),
        "top1": (out.logits[keep_out].float().argmax(-1) == ref.logits[keep].argmax(-1)).float().mean().item(),
    }


def _check(m: dict, limits: dict, what: str) -> None:
    print(f"\n{what}: " + ", ".join(f"{k} {v:.6f}" for k, v in m.items()) + f"  (bounds {limits})")
    bad = []
    if not m["rel_l2"] <= limits["rel_l2"] or not m["rel_l2_worst_layer"] <= limits["rel_l2"]:
        bad.append("relative L2")
    for k in ("cos_p1", "pooled_cos", "top1"):
        if not m[k] >= limits[k]:
            bad.append(k)
    assert not bad, f"{what}: {bad} outside {limits}: {m}"


def _run_or_skip(fn, backend):
    try:
        with torch.no_grad():
            return fn()
    except UnsupportedError as e:
        pytest.skip(f"{backend} cannot serve this call here: {str(e).splitlines()[0]}")


@pytest.mark.parametrize("inputs", ["padded", "packed"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_backend_matches_float32(setup, backend, inputs):
    name, m16, ids, am, ref, limits = setup
    m16.attn_backend = backend
    keep = am.bool()
    if inputs == "padded":
        out = _run_or_skip(lambda: m16(ids, attention_mask=am, output_hidden_states=True), backend)
        keep_out = keep
    else:  # one packed row with 13 positions of tail padding
        T = int(keep.sum())
        info = anyattn.SeqInfo.from_lengths(LENGTHS, total_length=T + 13, device="cuda")
        row = torch.full((1, T + 13), PAD, dtype=torch.long, device="cuda")
        row[0, :T] = ids[keep]
        out = _run_or_skip(lambda: m16(row, seq_info=info, output_hidden_states=True), backend)
        keep_out = torch.zeros(1, T + 13, dtype=torch.bool, device="cuda")
        keep_out[0, :T] = True
    _check(_metrics(out, ref, keep_out, am), limits, f"{name} bf16 {backend} {inputs}")


@pytest.mark.parametrize("fuse_qkv", [False, True])
def test_compiled_layers_bf16_match_float32_without_recompiles(setup, fuse_qkv):
    """The benchmark's path: compile_layers (inductor), packed padded batches on flash_torch; three
    batches of different token counts must reuse one compiled graph per function."""
    from torch._dynamo.utils import counters

    name, m16, ids, am, ref, limits = setup
    if name != "35M":
        pytest.skip("one shape is enough for the compiled path (compile time)")
    m = copy.deepcopy(m16)
    m.attn_backend = "flash_torch"
    torch._dynamo.reset()
    counters.clear()
    m.compile_layers(fuse_qkv=fuse_qkv)
    for rows in (slice(0, 10), slice(1, 6), slice(3, 10)):
        sub_ids, sub_am = ids[rows], am[rows]
        out = _run_or_skip(lambda: m(sub_ids, attention_mask=sub_am, output_hidden_states=True), "flash_torch")
    assert counters["stats"]["unique_graphs"] == 2, dict(counters["stats"])
    out = _run_or_skip(lambda: m(ids, attention_mask=am, output_hidden_states=True), "flash_torch")
    _check(_metrics(out, ref, am.bool(), am), limits, f"{name} bf16 flash_torch compiled fuse_qkv={fuse_qkv}")


def test_packed_forward_on_auto_materializes_no_dense_masks():
    """ESM2 asks which backend would serve its packed row before packing it. Asking with a full
    explain() made cuDNN's check materialize a dense (1, 1, T, T) mask for every new batch, and the
    count-bounded cache kept them: 75 GiB of GPU memory in the 32k-token ESM2-650M benchmark.
    The row is 8192 tokens: below ranking.SMALL_WORK (about 5200 tokens of this model) auto runs SDPA on
    purpose, with the dense mask that SDPA needs (H100 round 9 ran this test at 2048 tokens and
    found SDPA's six masks: the small-call rule, not explain)."""

    from anyattn import ranking
    from anyattn.call import Signature

    cfg = ESM2Config.from_name("esm2_t6_8M", attn_backend="auto")
    H, D = cfg.num_attention_heads, cfg.hidden_size // cfg.num_attention_heads
    assert not ranking.is_small(Signature.of(B=1, Hq=H, Sq=8192, D=D, dtype=torch.bfloat16, device=torch.device("cuda")))
    anyattn.clear_caches()
    with torch.device("cuda"):
        m = ESM2ForMaskedLM(cfg).to(torch.bfloat16).eval()
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    with torch.no_grad():
        for i in range(6):
            lengths = [3000 + i, 2500, 1500 - i, 900]
            ids = torch.randint(4, 24, (1, 8192), device="cuda")
            info = anyattn.SeqInfo.from_lengths(lengths, total_length=8192, device="cuda")
            m(ids, seq_info=info)
    torch.cuda.synchronize()
    assert len(REGISTRY["sdpa"].cache) == 0 and len(REGISTRY["cudnn"].cache) == 0
    assert torch.cuda.memory_allocated() - before < 64 << 20
