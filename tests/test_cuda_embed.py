"""anyattn embed on CUDA (quick): bf16 packed job vs the float32 model on each sequence alone,
per-residue output, compile_layers + bucketed rows, every family and every pooler (the pooling
runs on the GPU), and two GPUs equal one (multigpu).

    PYTHONPATH=src python3 -m pytest -q -m "cuda or multigpu" tests/test_cuda_embed.py
"""

from __future__ import annotations

import copy
import random

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from anyattn.embed import embed, open_store  # noqa: E402
from anyattn.models import ProteinTokenizer, load_esm2  # noqa: E402

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

AA = "ACDEFGHIKLMNPQRSTVWY"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    torch.manual_seed(0)
    cfg = transformers.EsmConfig(
        vocab_size=33, hidden_size=128, num_hidden_layers=3, num_attention_heads=2, intermediate_size=256,
        max_position_embeddings=514, position_embedding_type="rotary", token_dropout=True,
        emb_layer_norm_before=False, pad_token_id=1, mask_token_id=32, layer_norm_eps=1e-5,
    )  # fmt: skip
    hf = transformers.EsmForMaskedLM(cfg).eval()
    path = tmp_path_factory.mktemp("esm2_cuda")
    hf.save_pretrained(path)
    return str(path)


def _recs(n, seed):
    rng = random.Random(seed)
    return {f"s{i}": "".join(rng.choices(AA, k=rng.randint(1, 500))) for i in range(n)}


@torch.inference_mode()
def _alone_mean(model, seq):
    ids = torch.tensor([ProteinTokenizer.esm().encode(seq)], device=next(model.parameters()).device)
    return model.esm(ids).last_hidden_state[0, 1:-1].float().mean(0).cpu().numpy()


def _errs(store, recs, ref32, ref16):
    job = alone = 0.0
    for i, s in recs.items():
        want = _alone_mean(ref32, s)
        job = max(job, float(np.abs(store[i].astype(np.float64) - want).max()))
        alone = max(alone, float(np.abs(_alone_mean(ref16, s) - want).max()))
    return job, alone


@pytest.mark.cuda
@pytest.mark.parametrize("compile", [False, True])
def test_bf16_packed_job_on_cuda_within_tolerance(ckpt, tmp_path, compile):
    """err(bf16 job vs fp32 alone) <= 2 x err(bf16 alone vs fp32 alone) + 1e-3 (float16 storage
    adds up to ~5e-4 at these magnitudes)."""
    recs = _recs(60, seed=1)
    out = tmp_path / "o.sqlite"
    s = embed(recs, model=ckpt, out=out, dtype="bf16", devices="cuda", max_tokens=4096, compile=compile, progress=False)
    assert s.embedded == 60 and s.devices == ("cuda",)
    ref32 = load_esm2(ckpt, device="cuda")
    ref16 = copy.deepcopy(ref32).to(torch.bfloat16)
    job, alone = _errs(open_store(out), recs, ref32, ref16)
    assert job <= 2 * alone + 1e-3, (job, alone)


@pytest.mark.cuda
def test_per_residue_on_cuda_equals_cpu_fp32(ckpt, tmp_path):
    recs = _recs(20, seed=2)
    embed(recs, model=ckpt, out=tmp_path / "g.sqlite", pooling="none", dtype="fp32", devices="cuda", max_tokens=2048, progress=False)
    embed(recs, model=ckpt, out=tmp_path / "c.sqlite", pooling="none", dtype="fp32", devices="cpu", max_tokens=2048, progress=False)
    g, c = open_store(tmp_path / "g.sqlite"), open_store(tmp_path / "c.sqlite")
    worst = max(float(np.abs(g[i] - c[i]).max()) for i in recs)
    assert worst <= 1e-3, worst  # TF32 may be on for CUDA matmuls


@pytest.mark.multigpu
def test_two_gpus_equal_one(ckpt, tmp_path):
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    recs = _recs(200, seed=3)
    embed(recs, model=ckpt, out=tmp_path / "one.sqlite", dtype="bf16", devices="cuda:0", max_tokens=4096, progress=False)
    s = embed(recs, model=ckpt, out=tmp_path / "two.sqlite", dtype="bf16", devices="cuda:0,cuda:1", max_tokens=4096, progress=False)
    assert s.devices == ("cuda:0", "cuda:1")
    a, b = open_store(tmp_path / "one.sqlite"), open_store(tmp_path / "two.sqlite")
    assert sorted(a.ids()) == sorted(b.ids())
    worst = max(float(np.abs(a[i].astype(np.float32) - b[i].astype(np.float32)).max()) for i in recs)
    assert worst == 0.0, f"same batches on two identical GPUs should be bitwise equal, got {worst}"


# ------------------------------------------------------------------------------ every family, every pooler
from .test_embed_support import FAMILIES, MAX_RESIDUES, alone, load_ref, make_ckpt, pool_ref, seqs  # noqa: E402

POOLERS = ["mean", "max", "min", "norm", "median", "std", "var", "eos"]


@pytest.mark.cuda
@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_and_pooler_bf16_on_cuda_within_tolerance(family, tmp_path):
    """The bf16 job on the GPU (pooling on the GPU, float32) vs the family's float32 forward on
    each sequence alone: per column block, err(job) <= 2 x err(the bf16 model alone) + 1e-3
    (float16 storage adds up to ~5e-4 at these magnitudes)."""
    path = make_ckpt(family, tmp_path / family)
    recs = seqs(24, seed=4, hi=MAX_RESIDUES[family] or 200)
    out = tmp_path / "o.sqlite"
    embed(recs, model=path, out=out, pooling=POOLERS, layers=[-1], dtype="bf16", devices="cuda", max_tokens=2048, progress=False)
    ref32 = load_ref(path).to("cuda")
    ref16 = copy.deepcopy(ref32).to(torch.bfloat16)
    st = open_store(out)
    job = bf = 0.0
    for i, seq in recs.items():
        h32, h16 = alone(family, ref32, path, seq)[-1], alone(family, ref16, path, seq)[-1]
        flat = st[i].astype(np.float64).reshape(-1)
        for c in st.columns:
            want = pool_ref(family, h32, c.pooler)
            job = max(job, float(np.abs(flat[c.start : c.stop] - want).max()))
            bf = max(bf, float(np.abs(pool_ref(family, h16, c.pooler) - want).max()))
    assert job <= 2 * bf + 1e-3, (family, job, bf)


@pytest.mark.cuda
def test_every_pooler_fp32_on_cuda_equals_cpu(tmp_path):
    path = make_ckpt("esm2", tmp_path / "esm2")
    recs = seqs(30, seed=5)
    kw = dict(pooling=POOLERS + ["cls"], layers=[0, -1], dtype="fp32", max_tokens=1024, progress=False)
    embed(recs, model=path, out=tmp_path / "g.sqlite", devices="cuda", **kw)
    embed(recs, model=path, out=tmp_path / "c.sqlite", devices="cpu", **kw)
    g, c = open_store(tmp_path / "g.sqlite").stack(), open_store(tmp_path / "c.sqlite").stack()
    worst = float(np.abs(g - c).max())
    assert worst <= 1e-3, worst  # TF32 may be on for CUDA matmuls
