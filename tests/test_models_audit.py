"""Audit of the protein language models (ESM2, ESM C, ANKH, DPLM, DPLM-2, E1) from a user's side.

What the family test files do not cover, checked on tiny random-weight models (hidden 32, 2-3
layers) on the CPU:

* a padded batch of very different lengths (1 token, 1 residue, the maximum length; left, right
  and both-sides padding where documented; an all-padding row) equals each sequence run alone,
  in float64, on eager / sdpa / auto and every ``pack_padded`` setting: last_hidden_state,
  hidden_states, logits, ``output_attentions`` (zero on padding keys, real rows sum to 1) and
  ``output_s_max`` (also against its documented definition, recomputed from the hidden states);
* the ``attn_backend`` switch at run time (same numbers; a bad name leaves the model unchanged;
  a backend that cannot serve the call raises);
* training: gradients through a padded batch equal the sum of the per-sequence gradients
  (float64); dropout only in ``model.train()``;
* ``save_pretrained`` / ``from_pretrained`` / ``anyattn.models.load`` round trips, detection of
  the published config formats, strict refusal of missing / unknown / mis-shaped keys, dtype and
  device arguments;
* bad inputs (dtype, out-of-vocabulary ids, mask shapes and values, empty batches, too long);
* one compiled (``compile_layers``) and one flex case; torch.autocast; the masked-LM loss.

Docstrings that say "Was a bug (fixed)" describe a defect this audit found and what it did; the
test guards the fix.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import warnings

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

import anyattn.models as am  # noqa: E402
from anyattn.errors import UnsupportedError  # noqa: E402
from anyattn.models import (  # noqa: E402
    AnkhConfig,
    AnkhModel,
    ESM2Config,
    ESM2ForMaskedLM,
    ESMCConfig,
    ESMCForMaskedLM,
)
from anyattn.models.dplm import DPLM2ForMaskedLM, DPLMForMaskedLM  # noqa: E402
from anyattn.models.e1 import E1Config, E1ForMaskedLM, E1Tokenizer  # noqa: E402

FAMS = ["esm2", "dplm", "dplm2", "esmc", "ankh", "e1"]
MAXLEN = 24  # max_position_embeddings (ESM2 / DPLM) and max_num_positions_within_seq (E1)
PAD = {"esm2": 1, "dplm": 1, "dplm2": 1, "esmc": 1, "ankh": 0, "e1": 0}
E1TOK = E1Tokenizer()
N_CODES = 16  # structure codes of the tiny DPLM-2 vocabulary: 33 + 3 specials + codes + <mask_struct>
DPLM2_VOCAB = 33 + 3 + N_CODES + 1


# ---------------------------------------------------------------------------------------------
# tiny models and batches


def _config(fam, **kw):
    if fam in ("esm2", "dplm", "dplm2"):
        d = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                 max_position_embeddings=MAXLEN)  # fmt: skip
        if fam == "dplm":
            d.update(dplm_type="dplm_esm")
        if fam == "dplm2":
            d.update(vocab_size=DPLM2_VOCAB, tie_word_embeddings=False, dplm_type="dplm2_esm")
        d.update(kw)
        return ESM2Config(**d)
    if fam == "esmc":
        d = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=48)
        d.update(kw)
        return ESMCConfig(**d)
    if fam == "ankh":
        d = dict(d_model=32, d_kv=8, num_heads=2, d_ff=40, num_layers=2, relative_attention_num_buckets=8,
                 relative_attention_max_distance=10)  # fmt: skip
        d.update(kw)
        return AnkhConfig(**d)
    d = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
             global_attention_every_n_layers=2, max_num_sequences=8, max_num_positions_within_seq=MAXLEN,
             clip_qkv=8.0)  # fmt: skip
    d.update(kw)
    return E1Config(**d)


CLASSES = {
    "esm2": ESM2ForMaskedLM, "dplm": DPLMForMaskedLM, "dplm2": DPLM2ForMaskedLM, "esmc": ESMCForMaskedLM,
    "ankh": AnkhModel, "e1": E1ForMaskedLM,
}  # fmt: skip


def build(fam, seed=0, dtype=torch.float64, **kw):
    """A tiny model of ``fam`` in eval mode, every parameter perturbed in ``dtype`` (non-trivial
    norms and biases; float64 weights that float32 cannot represent)."""
    torch.manual_seed(seed)
    m = CLASSES[fam](_config(fam, **kw)).to(dtype)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.15 * torch.randn(p.shape, generator=g, dtype=torch.float64).to(dtype))
    return m.eval()


def rows(fam, seed=0):
    """Unpadded rows (token id lists) of very different lengths: the maximum, one residue, a
    middle one (with <mask> / context sequences), one token. DPLM-2: (structure, amino-acid) tracks."""
    g = torch.Generator().manual_seed(seed)

    def rnd(n, lo, hi):
        return torch.randint(lo, hi, (n,), generator=g).tolist()

    if fam in ("esm2", "dplm", "esmc"):
        return [[0, *rnd(MAXLEN - 2, 4, 24), 2], [0, 20, 2], [0, *rnd(7, 4, 24), 32, 2], [5]]
    if fam == "ankh":  # longer than the relative max distance: log buckets and the last bucket
        return [[*rnd(MAXLEN + 6, 2, 144), 1], [*rnd(1, 2, 144), 1], [7], [*rnd(9, 2, 144), 1]]
    if fam == "e1":
        aa = "ACDEFGHIKLMNPQRSTVWY"
        return [
            E1TOK.encode("".join(aa[i] for i in rnd(MAXLEN - 4, 0, 20)))["input_ids"],  # the maximum length
            E1TOK.encode("M")["input_ids"],
            E1TOK.encode("MKV?LA", ["ACD", "KW"])["input_ids"],  # two context sequences
            E1TOK.encode("GHIK", "MM")["input_ids"],
        ]
    out = []  # dplm2
    for n in (MAXLEN // 2 - 2, 1, 6):
        out.append(([33, *rnd(n, 36, 36 + N_CODES), 34], [0, *rnd(n, 4, 24), 2]))
    out[2][1][3] = 32  # a <mask_aa>
    return out


def sides(fam):
    """Padding sides the docs allow: ESM2 'left, right or both sides', ESM C / ANKH 'either side',
    E1 'left/right/mixed'; DPLM: column positions (rotary is shift-invariant); DPLM-2: its layout."""
    return ["right"] if fam == "dplm2" else ["right", "left", "both"]


def pad_batch(fam, rs, side="right"):
    """(input_ids, attention_mask) of the rows padded to one length."""
    if fam == "dplm2":  # each track padded on its right, structure track first (the official collater)
        M = max(len(a) for _, a in rs)
        ids = [st + [1] * (M - len(st)) + aa + [1] * (M - len(aa)) for st, aa in rs]
        mask = [[1] * len(st) + [0] * (M - len(st)) + [1] * len(aa) + [0] * (M - len(aa)) for st, aa in rs]
        return torch.tensor(ids), torch.tensor(mask)
    S = max(len(r) for r in rs) + (2 if side == "both" else 0)
    ids, mask = [], []
    for b, r in enumerate(rs):
        n = S - len(r)
        left = {"right": 0, "left": n, "both": min(n, n // 2 + b % 2)}[side]  # both: odd rows one more on the left
        ids.append([PAD[fam]] * left + r + [PAD[fam]] * (n - left))
        mask.append([0] * left + [1] * len(r) + [0] * (n - left))
    return torch.tensor(ids), torch.tensor(mask)


def alone(fam, r):
    return torch.tensor([r[0] + r[1]]) if fam == "dplm2" else torch.tensor([r])


def run(m, *args, **kw):
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # output_attentions warns once per call (documented)
        return m(*args, **kw)


def set_pack(m, pack):
    if hasattr(m.config, "pack_padded"):
        m.config.pack_padded = pack


def packs(fam):
    return ["auto"] if fam == "e1" else ["auto", True, False]  # E1 has no pack_padded switch


def rel(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1.0)).item()


def _logits(out):
    return getattr(out, "logits", None)


# ---------------------------------------------------------------------------------------------
# 1. padded batches = each sequence alone


@pytest.mark.parametrize("fam", FAMS)
def test_padded_batch_rows_equal_each_sequence_alone(fam):
    """Every row of a padded batch (lengths 1 token .. the maximum, padding on each documented
    side) equals that sequence run alone without padding, in float64, on eager / sdpa / auto and
    every pack_padded setting: last_hidden_state, every hidden state and the logits at the real
    tokens; zeros at padding (docs: 'Values at padding positions are zeros, packed or not';
    E1 documents zeros for last_hidden_state only)."""
    m = build(fam)
    rs = rows(fam)
    singles = [run(m, alone(fam, r), output_hidden_states=True) for r in rs]
    bad = []
    for side in sides(fam):
        ids, mask = pad_batch(fam, rs, side)
        keep = mask.bool()
        # DPLM's rotary positions are the columns: a left-padded row is the row alone shifted,
        # equal in exact arithmetic, rounded by the float32 rotary (docs/dplm.md, docs/models.md)
        tol = 1e-6 if (fam == "dplm" and side != "right") else 1e-12
        for backend in ("eager", "sdpa", "auto"):
            for pack in packs(fam):
                m.attn_backend = backend
                set_pack(m, pack)
                out = run(m, ids, attention_mask=mask, output_hidden_states=True)
                what = f"{side} {backend} pack={pack}"
                assert len(out.hidden_states) == m.config.num_hidden_layers + 1
                for b, one in enumerate(singles):
                    pairs = [("last_hidden_state", out.last_hidden_state[b], one.last_hidden_state[0])]
                    pairs += [
                        (f"hidden_states[{i}]", h[b], h1[0])
                        for i, (h, h1) in enumerate(zip(out.hidden_states, one.hidden_states))
                    ]
                    if _logits(out) is not None:
                        pairs.append(("logits", out.logits[b], one.logits[0]))
                    for name, got, want in pairs:
                        if rel(got[keep[b]], want) > tol:
                            bad.append(f"{what} row {b} {name}: {rel(got[keep[b]], want):.2e}")
                        zeros_documented = name != "logits" or fam != "e1"
                        if zeros_documented and (~keep[b]).any() and got[~keep[b]].abs().max() != 0:
                            bad.append(f"{what} row {b} {name}: non-zero at padding")
    assert not bad, "\n".join(bad[:20])


@pytest.mark.parametrize("fam", ["esm2", "dplm", "dplm2", "esmc"])
def test_masked_lm_loss_of_a_padded_batch(fam):
    """labels (-100 at padding) on a padded batch: the loss is the token-weighted mean of the
    losses of the sequences alone, and the loss comes first in the output (HF Trainer). (The loss
    is computed in float32 even for a float64 model, `logits.float()`: hence 2e-6.)"""
    m = build(fam)
    rs = rows(fam)
    ids, mask = pad_batch(fam, rs, sides(fam)[-1])
    out = run(m, ids, attention_mask=mask, labels=torch.where(mask.bool(), ids, -100))
    assert out[0] is out.loss
    total = n = 0
    for r in rs:
        a = alone(fam, r)
        total, n = total + run(m, a, labels=a).loss * a.shape[1], n + a.shape[1]
    assert abs(out.loss.item() - (total / n).item()) <= 2e-6 * abs(out.loss.item())


def smax_reference(fam, m, ids, keep, hs) -> torch.Tensor:
    """(L, H) ``output_s_max`` recomputed from its documented definition, from each layer's input
    (``hidden_states[l]``) and the weights, in float64. Rotary is a rotation (it keeps norms), so
    it is left out. ESM2/DPLM: max over visible pairs of ||q_i|| ||k_j||, q pre-scaled by D**-0.5;
    ESM C: D**-0.5 ||q_i|| ||k_j|| after QK LayerNorm; ANKH: ||q_i|| ||k_j|| (scale 1, bias not
    included); E1: D**-0.5 ||q_i|| ||k_j|| after the clamp, per query head (GQA), visible = same
    sequence (within layers) or seq(j) <= seq(i) in the same sample (global layers)."""
    cfg = m.config
    B = ids.shape[0]

    def per_row_max(qn, kn):  # (B, S, H) norms; every real pair of a row visible
        return torch.stack([qn[b][keep[b]].amax(0) * kn[b][keep[b]].amax(0) for b in range(B) if keep[b].any()]).amax(0)

    def rms(x, norm):
        return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon) * norm.weight

    out = []
    if fam in ("esm2", "dplm", "dplm2"):
        H = cfg.num_attention_heads
        D = cfg.hidden_size // H
        for l, layer in enumerate(m.esm.encoder.layer):
            ln, sa = layer.attention.LayerNorm, layer.attention.self
            h = F.layer_norm(hs[l], (hs[l].shape[-1],), ln.weight, ln.bias, ln.eps)
            q = (F.linear(h, sa.query.weight, sa.query.bias) * D**-0.5).unflatten(-1, (H, D)).norm(dim=-1)
            k = F.linear(h, sa.key.weight, sa.key.bias).unflatten(-1, (H, D)).norm(dim=-1)
            out.append(per_row_max(q, k))
    elif fam == "esmc":
        H = cfg.num_attention_heads
        D = cfg.hidden_size // H
        for l, blk in enumerate(m.transformer.blocks):
            a = blk.attn
            q, k, _ = F.linear(a.layernorm_qkv[0](hs[l]), a.layernorm_qkv[1].weight).chunk(3, -1)
            qn = a.q_ln(q).unflatten(-1, (H, D)).norm(dim=-1) * D**-0.5
            out.append(per_row_max(qn, a.k_ln(k).unflatten(-1, (H, D)).norm(dim=-1)))
    elif fam == "ankh":
        H, D = cfg.num_heads, cfg.d_kv
        for l, blk in enumerate(m.encoder.block):
            att = blk.layer[0]
            h = rms(hs[l], att.layer_norm)
            q = F.linear(h, att.SelfAttention.q.weight).unflatten(-1, (H, D)).norm(dim=-1)
            out.append(per_row_max(q, F.linear(h, att.SelfAttention.k.weight).unflatten(-1, (H, D)).norm(dim=-1)))
    else:
        H, G = cfg.num_attention_heads, cfg.num_key_value_heads
        D, c = cfg.hidden_size // H, cfg.clip_qkv
        for l, layer in enumerate(m.model.layers):
            na = layer.norm_attn_norm
            h = rms(hs[l], na.input_layernorm)
            q = F.linear(h, na.self_attn.q_proj.weight).clamp(-c, c).unflatten(-1, (H, D)).norm(dim=-1)
            k = F.linear(h, na.self_attn.k_proj.weight).clamp(-c, c).unflatten(-1, (G, D)).norm(dim=-1)
            k = k.repeat_interleave(H // G, dim=-1)
            best = torch.zeros(H, dtype=h.dtype)
            for b in range(B):
                idx = keep[b].nonzero().flatten().tolist()
                seq = torch.tensor([int(ids[b, i] == cfg.bos_token_id) for i in idx]).cumsum(0).tolist()
                for a_, i in enumerate(idx):
                    for c_, j in enumerate(idx):
                        if (seq[c_] <= seq[a_]) if layer.is_global else (seq[c_] == seq[a_]):
                            best = torch.maximum(best, q[b, i] * k[b, j])
            out.append(best * D**-0.5)
    return torch.stack(out)


@pytest.mark.parametrize("fam", FAMS)
def test_attentions_and_s_max_of_a_padded_batch(fam):
    """output_attentions: each row's real block equals the sequence alone, weights on padding
    keys (and padding query rows) are 0, real rows sum to 1. output_s_max: the max of the
    per-sequence values, and equal to its documented definition recomputed independently."""
    m = build(fam)
    rs = rows(fam)
    singles = [run(m, alone(fam, r), output_attentions=True, output_s_max=True) for r in rs]
    for side in sides(fam):
        ids, mask = pad_batch(fam, rs, side)
        keep = mask.bool()
        tol = 1e-6 if (fam == "dplm" and side != "right") else 1e-12
        for backend, pack in (("sdpa", "auto"), ("auto", "auto"), ("sdpa", True)):
            m.attn_backend = backend
            set_pack(m, pack)
            with warnings.catch_warnings(record=True) as w:
                warnings.simplefilter("always")
                with torch.no_grad():
                    kw = dict(output_attentions=True, output_s_max=True, output_hidden_states=True)
                    out = m(ids, attention_mask=mask, **kw)
            n_warn = len([x for x in w if "output_attentions" in str(x.message)])
            assert n_warn == 1, "one warning per call (documented)"
            assert len(out.attentions) == m.config.num_hidden_layers
            for b, one in enumerate(singles):
                kb = keep[b]
                for A, A1 in zip(out.attentions, one.attentions):
                    assert A.shape[-2:] == ids.shape[-1:] * 2
                    assert rel(A[b][:, kb][:, :, kb], A1[0]) <= tol, f"{side} {backend} row {b}"
                    assert (A[b][:, :, ~kb] == 0).all(), f"{side} {backend} row {b}: weight on a padding key"
                    assert (A[b][:, ~kb] == 0).all(), f"{side} {backend} row {b}: a padding query row"
                    assert (A[b][:, kb].sum(-1) - 1).abs().max() <= 1e-12
            per_seq = torch.stack([one.s_max for one in singles]).amax(0)
            assert out.s_max.dtype == torch.float32 and out.s_max.shape == per_seq.shape
            assert rel(out.s_max, per_seq) <= 1e-6, f"{side} {backend}: s_max of the batch != max over the sequences"
            ref = smax_reference(fam, m, ids, keep, out.hidden_states)
            assert ((out.s_max.double() - ref).abs() / ref).max() <= 1e-6, f"{side} {backend}: s_max != its definition"


@pytest.mark.parametrize("fam", FAMS)
def test_an_all_padding_row_leaves_the_other_rows_unchanged(fam):
    """An empty row (all padding) in a padded batch: the other rows, their attentions and s_max
    are exactly those of the batch without it; its own outputs are zeros (finite)."""
    m = build(fam)
    ids, mask = pad_batch(fam, rows(fam))
    ids0 = torch.cat([torch.full_like(ids[:1], PAD[fam]), ids])
    mask0 = torch.cat([torch.zeros_like(mask[:1]), mask])
    for backend in ("eager", "sdpa"):
        for pack in packs(fam):
            m.attn_backend = backend
            set_pack(m, pack)
            kw = dict(output_hidden_states=True, output_attentions=True, output_s_max=True)
            got, want = run(m, ids0, attention_mask=mask0, **kw), run(m, ids, attention_mask=mask, **kw)
            what = f"{backend} pack={pack}"
            assert torch.equal(got.last_hidden_state[1:], want.last_hidden_state), what
            assert all(torch.equal(a[1:], b) for a, b in zip(got.hidden_states, want.hidden_states)), what
            assert all(torch.equal(a[1:], b) for a, b in zip(got.attentions, want.attentions)), what
            assert torch.equal(got.s_max, want.s_max), what
            assert all((h[0] == 0).all() for h in got.hidden_states), what
            assert all((a[0] == 0).all() for a in got.attentions), what


def _t5_bucket(rel_pos, num_buckets, max_distance):
    """T5's bidirectional relative-position bucket (Raffel et al. 2020), written out in float64."""
    n_b = num_buckets // 2
    out = (rel_pos > 0).long() * n_b
    n = rel_pos.abs()
    exact = n_b // 2
    large = exact + (torch.log(n.clamp(min=1).double() / exact) / math.log(max_distance / exact) * (n_b - exact)).long()
    return out + torch.where(n < exact, n, large.clamp(max=n_b - 1))


def test_ankh_float64_eager_is_a_float64_computation():
    """docs/ankh.md: 'eager: any device and dtype (the oracle)'. Each block of a float64 ANKH (true
    float64 weights) equals a float64 formulation written here from the previous hidden state (T5
    buckets, softmax, gated tanh-GELU FFN; RMS statistics in float32, as documented and as
    transformers' T5) within 1e-12. (Until commit 43e6f69, made while this audit ran, the dense
    relative-bias table was rounded to float32: ~1e-7 here.)"""
    m = build("ankh")
    m.attn_backend = "eager"
    cfg = m.config
    ids = torch.tensor([rows("ankh")[0]])
    S, H, D = ids.shape[1], cfg.num_heads, cfg.d_kv
    out = run(m, ids, output_hidden_states=True)
    table = m.encoder.block[0].layer[0].SelfAttention.relative_attention_bias.weight.detach()  # (N, H)
    i = torch.arange(S)
    bucket = _t5_bucket(i[None] - i[:, None], cfg.relative_attention_num_buckets, cfg.relative_attention_max_distance)

    def rms(x, norm):  # T5's norm: statistics in float32 (documented)
        return x * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + norm.variance_epsilon) * norm.weight

    def gelu_new(x):
        return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))

    def worst(tab):
        bias = tab[bucket].permute(2, 0, 1)  # (H, S, S)
        x, err = out.hidden_states[0][0], 0.0
        with torch.no_grad():
            for l, blk in enumerate(m.encoder.block):
                att, ff = blk.layer
                sa, g = att.SelfAttention, ff.DenseReluDense
                h = rms(x, att.layer_norm)
                q, k, v = (F.linear(h, w.weight).view(S, H, D).transpose(0, 1) for w in (sa.q, sa.k, sa.v))
                p = torch.softmax(q @ k.transpose(-1, -2) + bias, -1)
                x = x + F.linear((p @ v).transpose(0, 1).reshape(S, H * D), sa.o.weight)
                h = rms(x, ff.layer_norm)
                x = x + F.linear(gelu_new(F.linear(h, g.wi_0.weight)) * F.linear(h, g.wi_1.weight), g.wo.weight)
                y = x if l < cfg.num_layers - 1 else rms(x, m.encoder.final_layer_norm)
                err = max(err, rel(out.hidden_states[l + 1][0], y))
        return err

    assert worst(table) <= 1e-12, f"float64 ANKH vs a float64 formulation: {worst(table):.2e}"
    assert worst(table.float().double()) > 1e-10  # guard: the check sees a float32 rounding of the table


@pytest.mark.parametrize("fam", FAMS)
def test_forward_under_cpu_autocast(fam):
    """torch.autocast (bf16 on the CPU; the same mechanism as CUDA mixed precision) over a float32
    model: the forward runs and stays close to float32, zeros at padding. Was a bug (fixed) in E1: it raised
    'v: expected the same dtype as q (torch.float32), got dtype torch.bfloat16': its layer casts
    the rotated q, k back to the residual stream's dtype (float32) while v keeps the autocast
    dtype of its projection (bf16). Every other family runs."""
    m = build(fam, dtype=torch.float32)
    ids, mask = pad_batch(fam, rows(fam))
    ref = run(m, ids, attention_mask=mask).last_hidden_state
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = run(m, ids, attention_mask=mask).last_hidden_state
    assert rel(out, ref) <= 0.1
    assert (out[~mask.bool()] == 0).all()


# ---------------------------------------------------------------------------------------------
# 2. the attn_backend switch


@pytest.mark.parametrize("fam", FAMS)
def test_backend_switch_at_run_time_gives_the_same_numbers(fam):
    """model.attn_backend = eager / sdpa / auto / a sequence of names: the same float64 numbers
    on a padded batch (docs: 'the same weights and the same numbers ... on every backend')."""
    m = build(fam)
    ids, mask = pad_batch(fam, rows(fam), sides(fam)[-1])
    m.attn_backend = "eager"
    ref = run(m, ids, attention_mask=mask, output_hidden_states=True)
    for backend in ("sdpa", "auto", ("sdpa", "eager"), ["eager", "sdpa"]):
        m.attn_backend = backend
        assert m.config.attn_backend == (tuple(backend) if isinstance(backend, list) else backend)
        out = run(m, ids, attention_mask=mask, output_hidden_states=True)
        assert rel(out.last_hidden_state, ref.last_hidden_state) <= 1e-12, backend
        if _logits(out) is not None:
            assert rel(out.logits, ref.logits) <= 1e-12, backend


@pytest.mark.parametrize("fam", FAMS)
def test_bad_backend_is_refused_and_leaves_the_model_unchanged(fam):
    """An unknown name: ValueError naming attn_backend, model and config unchanged. A known
    backend that cannot serve the call (flash_torch on a CPU): UnsupportedError at the call,
    naming it (no silent fallback); switching back gives the same numbers as before."""
    m = build(fam)
    ids, mask = pad_batch(fam, rows(fam))
    m.attn_backend = "sdpa"
    ref = run(m, ids, attention_mask=mask).last_hidden_state
    for bad in ("nope", ("eager", "nope"), 3, None, ""):
        with pytest.raises(ValueError, match="attn_backend"):
            m.attn_backend = bad
        assert m.attn_backend == "sdpa" and m.config.attn_backend == "sdpa"
    assert torch.equal(run(m, ids, attention_mask=mask).last_hidden_state, ref)
    m.attn_backend = "flash_torch"
    with pytest.raises(UnsupportedError, match="flash_torch"):
        run(m, ids, attention_mask=mask)
    m.attn_backend = "sdpa"
    assert torch.equal(run(m, ids, attention_mask=mask).last_hidden_state, ref)


@pytest.mark.slow
def test_dplm2_on_flex_packed_equals_sdpa():
    """flex on the CPU (compiled; float32, head dim 16): a padded DPLM-2 batch runs packed
    (pack_padded 'auto' packs on flex) and gives sdpa's numbers."""
    m = build("dplm2", dtype=torch.float32, num_attention_heads=2)
    ids, mask = pad_batch("dplm2", rows("dplm2"))
    m.attn_backend = "sdpa"
    ref = run(m, ids, attention_mask=mask, output_hidden_states=True)
    m.attn_backend = "flex"
    out = run(m, ids, attention_mask=mask, output_hidden_states=True)
    assert rel(out.logits, ref.logits) <= 1e-5
    assert all(rel(a, b) <= 1e-5 for a, b in zip(out.hidden_states, ref.hidden_states))
    assert (out.logits[~mask.bool()] == 0).all()


# ---------------------------------------------------------------------------------------------
# 3. training


@pytest.mark.parametrize("fam", FAMS)
def test_padded_batch_gradients_equal_the_sum_of_per_sequence_gradients(fam):
    """model.train() (dropout 0): the gradient of a loss summed over a padded batch (padding
    positions included: their outputs are constant zeros) equals the sum of the gradients of
    each sequence alone, float64, on eager / sdpa / auto and every pack_padded setting."""
    m = build(fam).train()
    rs = rows(fam)
    ids, mask = pad_batch(fam, rs, "right" if fam in ("dplm", "dplm2") else "left")
    keep = mask.bool()
    g = torch.Generator().manual_seed(7)
    w_h = torch.randn(m.config.hidden_size, dtype=torch.float64, generator=g)
    w_l = torch.randn(m.config.vocab_size, dtype=torch.float64, generator=g)

    def loss(out, keep_b):
        v = (out.last_hidden_state * w_h).sum()  # every position
        if _logits(out) is not None:
            v = v + (out.logits[keep_b] * w_l).sum()
        return v

    m.zero_grad()
    for r in rs:
        a = alone(fam, r)
        loss(m(a), torch.ones_like(a, dtype=torch.bool)).backward()
    want = {n: (p.grad.clone() if p.grad is not None else None) for n, p in m.named_parameters()}
    # ANKH's RMS norm keeps its statistics in float32 (docs/ankh.md, as transformers' T5)
    tol = 1e-6 if fam == "ankh" else 1e-10
    for backend in ("eager", "sdpa", "auto"):
        for pack in packs(fam):
            m.attn_backend = backend
            set_pack(m, pack)
            m.zero_grad()
            loss(m(ids, attention_mask=mask), keep).backward()
            for n, p in m.named_parameters():
                if want[n] is None:
                    assert p.grad is None or (p.grad == 0).all(), n
                    continue
                assert p.grad is not None, f"{backend} pack={pack}: no gradient for {n}"
                assert rel(p.grad, want[n]) <= tol, f"{backend} pack={pack} {n}: {rel(p.grad, want[n]):.2e}"


DROPOUT = {
    "esm2": dict(hidden_dropout_prob=0.3, attention_probs_dropout_prob=0.3),
    "dplm": dict(hidden_dropout_prob=0.3, attention_probs_dropout_prob=0.3),
    "dplm2": dict(hidden_dropout_prob=0.3, attention_probs_dropout_prob=0.3),
    "esmc": dict(dropout=0.3),
    "ankh": dict(dropout_rate=0.3),
    "e1": {},  # E1 has no dropout
}


@pytest.mark.parametrize("fam", FAMS)
def test_dropout_applies_in_train_mode_only(fam):
    """docs: 'dropout probabilities from the config apply in model.train()'. eval() equals the
    same weights without dropout; train() differs from eval() and from call to call (the same
    seed reproduces it); padding stays zero; without dropout train() equals eval()."""
    plain, drop = build(fam), build(fam, **DROPOUT[fam])
    ids, mask = pad_batch(fam, rows(fam))
    keep = mask.bool()
    for backend in ("eager", "sdpa"):
        plain.attn_backend = drop.attn_backend = backend
        ev = run(drop.eval(), ids, attention_mask=mask).last_hidden_state
        assert torch.equal(ev, run(plain, ids, attention_mask=mask).last_hidden_state)
        drop.train()
        torch.manual_seed(1)
        t1 = run(drop, ids, attention_mask=mask).last_hidden_state
        torch.manual_seed(1)
        t1b = run(drop, ids, attention_mask=mask).last_hidden_state
        t2 = run(drop, ids, attention_mask=mask).last_hidden_state
        assert torch.equal(t1, t1b)
        assert (t1[~keep] == 0).all()
        if DROPOUT[fam]:
            assert (t1 - ev).abs().max() > 1e-3 and (t1 - t2).abs().max() > 1e-3
        else:
            assert torch.equal(t1, ev) and torch.equal(t2, ev)
        plain.train()
        assert torch.equal(run(plain, ids, attention_mask=mask).last_hidden_state, ev)
        plain.eval()
        drop.eval()


# ---------------------------------------------------------------------------------------------
# 4. save / load


def _weights_file(d):
    return os.path.join(d, next(f for f in os.listdir(d) if f.endswith(".safetensors")))


@pytest.mark.parametrize("fam", FAMS)
def test_save_pretrained_round_trips_through_every_loader(fam, tmp_path):
    """save_pretrained -> anyattn.models.load (family detected, class, weights, attn_backend,
    eval mode, float32) and -> Class.from_pretrained; attn_backend given to load wins; dtype and
    device arguments."""
    m = build(fam, dtype=torch.float32)
    m.attn_backend = ("eager", "sdpa")
    d = str(tmp_path / fam)
    m.save_pretrained(d)
    ids, mask = pad_batch(fam, rows(fam))
    ref = run(m, ids, attention_mask=mask).last_hidden_state
    for loaded in (am.load(d), type(m).from_pretrained(d)):
        assert type(loaded) is type(m)
        assert loaded.attn_backend == ("eager", "sdpa")
        assert not loaded.training and next(loaded.parameters()).dtype == torch.float32
        assert torch.equal(run(loaded, ids, attention_mask=mask).last_hidden_state, ref)
    assert am.load(d, attn_backend="sdpa").attn_backend == "sdpa"
    assert {p.dtype for p in am.load(d, dtype="bf16").parameters()} == {torch.bfloat16}
    assert {p.dtype for p in am.load(d, dtype=torch.float64).parameters()} == {torch.float64}
    with pytest.raises(ValueError, match="dtype"):
        am.load(d, dtype=torch.int8)
    with pytest.raises(ValueError, match="dtype"):
        am.load(d, dtype="float8")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="device"):
            am.load(d, device="cuda")


def _corrupt(d, out, kind):
    """A copy of checkpoint ``d`` with one key missing / an unknown key / a mis-shaped key."""
    os.makedirs(out, exist_ok=True)
    for f in os.listdir(d):
        if not f.endswith(".safetensors"):
            shutil.copy(os.path.join(d, f), out)
    sd = safetensors_torch.load_file(_weights_file(d))
    key = sorted(sd)[3]
    if kind == "missing":
        sd.pop(key)
    elif kind == "unknown":
        key = "foo.extra_weight"
        sd[key] = torch.zeros(2)
    else:
        sd[key] = torch.zeros(*[s + 1 for s in sd[key].shape])
    safetensors_torch.save_file(sd, os.path.join(out, os.path.basename(_weights_file(d))), metadata={"format": "pt"})
    return key


@pytest.mark.parametrize("fam", FAMS)
def test_load_refuses_missing_unknown_and_misshaped_keys_naming_them(fam, tmp_path):
    """docs/models.md: 'The family's loader ... refuses unknown, missing or mis-shaped weights,
    listing every one'."""
    m = build(fam, dtype=torch.float32)
    d = str(tmp_path / "ok")
    m.save_pretrained(d)
    for kind in ("missing", "unknown", "misshaped"):
        key = _corrupt(d, str(tmp_path / kind), kind)
        with pytest.raises(ValueError, match=key.replace(".", r"\.")):
            am.load(str(tmp_path / kind))


@pytest.mark.parametrize("fam", [f for f in FAMS if f != "e1"])
def test_from_pretrained_refuses_missing_and_unknown_keys_naming_them(fam, tmp_path):
    """docs/models.md (ESM2) and docs/esmc.md: from_pretrained is strict, listing the keys."""
    m = build(fam, dtype=torch.float32)
    d = str(tmp_path / "ok")
    m.save_pretrained(d)
    for kind in ("missing", "unknown"):
        key = _corrupt(d, str(tmp_path / kind), kind)
        with pytest.raises(ValueError, match=key.replace(".", r"\.")):
            type(m).from_pretrained(str(tmp_path / kind))


def test_from_pretrained_error_for_a_misshaped_key_names_the_key(tmp_path):
    """Was a bug (fixed) in every family: docs/models.md says 'from_pretrained is strict: missing, unexpected or
    mis-shaped weights raise (listing them)'. For a mis-shaped key transformers raises first,
    RuntimeError('You set `ignore_mismatched_sizes` to `False`, thus raising an error. For
    details look at the above report!'), whose message names no key (only the logged report does)."""
    failures = []
    for fam in FAMS:
        m = build(fam, dtype=torch.float32)
        d = str(tmp_path / fam)
        m.save_pretrained(d)
        key = _corrupt(d, str(tmp_path / (fam + "_bad")), "misshaped")
        try:
            type(m).from_pretrained(str(tmp_path / (fam + "_bad")))
            failures.append(f"{fam}: loaded")
        except Exception as e:  # noqa: BLE001 - the message is what is checked
            if key not in str(e):
                failures.append(f"{fam}: {type(e).__name__}: {str(e)[:100]}")
    assert not failures, "\n".join(failures)


def test_e1_from_pretrained_is_strict(tmp_path):
    """Was a bug (fixed): E1ForMaskedLM.from_pretrained loads a checkpoint with a missing key (left at its
    random initialisation) or an unknown key, with transformers' warning only, where every other
    family's from_pretrained raises (docs/models.md: 'no weight is silently left at its random
    initialisation'; ESM2/ESM C/ANKH/DPLM: 'from_pretrained is strict')."""
    m = build("e1", dtype=torch.float32)
    d = str(tmp_path / "ok")
    m.save_pretrained(d)
    for kind in ("missing", "unknown"):
        key = _corrupt(d, str(tmp_path / kind), kind)
        with pytest.raises(ValueError, match=key.replace(".", r"\.")):
            E1ForMaskedLM.from_pretrained(str(tmp_path / kind))


def test_an_unknown_attn_backend_at_load_is_refused_naming_attn_backend(tmp_path):
    """Was a bug (fixed) in ESM2, DPLM, DPLM-2, E1: load(dir, attn_backend='nope') and ESM2Config /
    E1Config(attn_backend='nope') raise 'backend: expected one of [...]', naming an argument the
    caller did not pass; ESM C and ANKH (and every model.attn_backend setter) say 'attn_backend'."""
    failures = []
    for fam in FAMS:
        m = build(fam, dtype=torch.float32)
        d = str(tmp_path / fam)
        m.save_pretrained(d)
        for what in ("load", "config"):
            try:
                if what == "load":
                    am.load(d, attn_backend="nope")
                else:
                    type(m.config)(attn_backend="nope")
                failures.append(f"{fam} {what}: accepted")
            except ValueError as e:
                if "attn_backend" not in str(e):
                    failures.append(f"{fam} {what}: {str(e)[:60]}")
    assert not failures, "\n".join(failures)


def _published(fam, m):
    """(config.json dict, state dict) of ``m`` in the family's published format."""
    sd = {k: v.contiguous() for k, v in m.state_dict().items()}
    if fam in ("esm2", "dplm", "dplm2"):
        cfg = transformers.EsmConfig(**m.config.to_hf_dict()).to_dict()
        cfg.update(model_type="esm", architectures=["EsmForMaskedLM"])
        if fam != "esm2":
            cfg.update(dplm_type=m.config.dplm_type, architectures=["EsmForDPLM" if fam == "dplm" else "EsmForDPLM2"])
        if m.config.tie_word_embeddings:
            sd.pop("lm_head.decoder.weight", None)
        return cfg, sd
    if fam == "esmc":  # Synthyra's ESM++ config.json (its attn_backend field is not anyattn's)
        c = m.config
        return dict(model_type="ESMplusplus", architectures=["ESMplusplusForMaskedLM"], hidden_size=c.hidden_size,
                    num_attention_heads=c.num_attention_heads, num_hidden_layers=c.num_hidden_layers,
                    vocab_size=c.vocab_size, dropout=0.0, initializer_range=0.02, attn_backend="sdpa"), sd  # fmt: skip
    if fam == "ankh":  # an encoder-only T5 re-save
        c = m.config
        cfg = dict(model_type="t5", architectures=["T5EncoderModel"], feed_forward_proj="gated-gelu", vocab_size=144,
                   d_model=c.d_model, d_kv=c.d_kv, d_ff=c.d_ff, num_layers=c.num_layers, num_heads=c.num_heads,
                   relative_attention_num_buckets=c.relative_attention_num_buckets,
                   relative_attention_max_distance=c.relative_attention_max_distance, layer_norm_epsilon=1e-6,
                   dropout_rate=0.0, pad_token_id=0, eos_token_id=1, is_encoder_decoder=False)  # fmt: skip
        sd["encoder.embed_tokens.weight"] = sd["shared.weight"].clone()
        return cfg, sd
    ours = ("attn_backend", "compile_layers", "transformers_version")
    cfg = {k: v for k, v in m.config.to_dict().items() if k not in ours}
    cfg.update(model_type="E1", architectures=["E1ForMaskedLM"])
    return cfg, sd


@pytest.mark.parametrize("fam", FAMS)
def test_load_detects_each_published_config_format(fam, tmp_path):
    """anyattn.models.load on a directory in the published format (HF EsmConfig; + dplm_type and
    EsmForDPLM*; Synthyra's ESMplusplus; a T5 config with a gated FFN and 144 tokens; E1's 'E1'):
    the family's class, the same numbers, attn_backend 'auto' (a foreign attn_backend field is
    not read)."""
    kw = dict(intermediate_size=None) if fam == "esmc" else {}  # ESM++ configs carry no FFN width
    m = build(fam, dtype=torch.float32, **kw)
    cfg, sd = _published(fam, m)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    safetensors_torch.save_file(sd, str(tmp_path / "model.safetensors"))
    loaded = am.load(str(tmp_path))
    assert type(loaded) is type(m)
    assert loaded.attn_backend == "auto"
    ids, mask = pad_batch(fam, rows(fam))
    m.attn_backend = loaded.attn_backend = "sdpa"
    want = run(m, ids, attention_mask=mask).last_hidden_state
    assert torch.equal(run(loaded, ids, attention_mask=mask).last_hidden_state, want)


def test_auto_class_on_a_saved_dplm2_directory_gives_dplm2_or_refuses(tmp_path):
    """Was a bug (fixed): DPLM2ForMaskedLM.save_pretrained writes model_type 'anyattn_esm2' (+ dplm_type), which
    the Auto classes map to ESM2ForMaskedLM: AutoModelForMaskedLM.from_pretrained(dir) silently
    returns a plain ESM2 network without DPLM-2's modality positions and second rescaling
    (different logits), while anyattn.models.load(dir) returns DPLM2ForMaskedLM."""
    m = build("dplm2", dtype=torch.float32)
    m.save_pretrained(tmp_path)
    assert type(am.load(str(tmp_path))) is DPLM2ForMaskedLM
    ids, mask = pad_batch("dplm2", rows("dplm2"))
    try:
        auto = transformers.AutoModelForMaskedLM.from_pretrained(str(tmp_path))
    except ValueError:
        return  # a refusal is fine
    got = run(auto, ids, attention_mask=mask).logits
    want = run(m, ids, attention_mask=mask).logits
    what = f"{type(auto).__name__}, logits differ by {rel(got, want):.3g}"
    assert type(auto) is DPLM2ForMaskedLM and rel(got, want) <= 1e-6, what


# ---------------------------------------------------------------------------------------------
# 5. inputs


@pytest.mark.parametrize("fam", FAMS)
def test_bad_inputs_are_refused_naming_the_argument(fam):
    """docs/models.md: 'input_ids must be int64 (or int32); ids outside the vocabulary are refused
    with a ValueError naming input_ids' (CPU); attention_mask must have input_ids' shape."""
    m = build(fam, dtype=torch.float32)
    ids, mask = pad_batch(fam, rows(fam))
    V = m.config.vocab_size
    for bad in (ids.float(), ids.to(torch.int8), ids.bool()):
        with pytest.raises((TypeError, ValueError), match="input_ids"):
            run(m, bad, attention_mask=mask)
    for value in (V, -1):
        for at in ((0, 1), (int(mask[:, -1].argmin()), ids.shape[1] - 1)):  # a real token, a padding position
            bad = ids.clone()
            bad[at] = value
            for kw in (dict(attention_mask=mask), {}):
                with pytest.raises(ValueError, match="input_ids"):
                    run(m, bad, **kw)
    for bad_mask in (mask[:, :-1], mask[:-1], mask[:, None], mask.tolist()):
        with pytest.raises(ValueError, match="attention_mask"):
            run(m, ids, attention_mask=bad_mask)
    for bad in (ids[0], ids.tolist()):
        with pytest.raises(ValueError, match="input_ids"):
            run(m, bad)
    ref = run(m, ids, attention_mask=mask).last_hidden_state  # bool / float 0-1 masks are HF's too
    assert torch.equal(run(m, ids, attention_mask=mask.bool()).last_hidden_state, ref)
    assert torch.equal(run(m, ids, attention_mask=mask.float()).last_hidden_state, ref)
    assert torch.equal(run(m, ids.int(), attention_mask=mask).last_hidden_state, ref)


def test_float_input_ids_error_says_the_dtype_is_wrong():
    """Was a bug (fixed) in DPLM, DPLM-2: float input_ids of a correct (B, S) shape are refused with
    'input_ids: expected a (B, S) integer tensor, got shape (B, S)': the message reports the
    shape, which is right, not the dtype, which is wrong (ESM2, ESM C, ANKH, E1: 'expected an int64
    (or int32) tensor of token ids, got dtype torch.float32')."""
    failures = []
    for fam in FAMS:
        m = build(fam, dtype=torch.float32)
        ids, mask = pad_batch(fam, rows(fam))
        try:
            run(m, ids.float(), attention_mask=mask)
            failures.append(f"{fam}: accepted")
        except (TypeError, ValueError) as e:
            if "dtype" not in str(e):
                failures.append(f"{fam}: {e}")
    assert not failures, "\n".join(failures)


def test_attention_mask_values_other_than_0_and_1_read_as_real_tokens():
    """docs/models.md: attention_mask is '1 = real token; bool, integer or floating 0/1 like HF's;
    read as mask != 0'. The audit found the != 0 reading undocumented (HF's additive mask partly
    masks 0.5 and -1); the docs now say it. Other values give the numbers of the 0/1 mask."""
    for fam in FAMS:
        m = build(fam, dtype=torch.float32)
        ids, mask = pad_batch(fam, rows(fam))
        want = run(m, ids, attention_mask=mask).last_hidden_state
        for bad in (mask * 2, mask * 0.5):
            assert torch.equal(run(m, ids, attention_mask=bad).last_hidden_state, want), fam


@pytest.mark.parametrize("fam", [f for f in FAMS if f != "e1"])
def test_empty_batches_give_empty_or_zero_outputs(fam):
    """No rows, rows of length 0, and a batch of padding only: outputs of the right shape (zeros
    for padding), no error."""
    m = build(fam, dtype=torch.float32)
    ids, mask = pad_batch(fam, rows(fam))
    C = m.config.hidden_size
    assert run(m, ids[:0], attention_mask=mask[:0]).last_hidden_state.shape == (0, ids.shape[1], C)
    assert run(m, ids[:0]).last_hidden_state.shape == (0, ids.shape[1], C)
    assert run(m, ids[:, :0], attention_mask=mask[:, :0]).last_hidden_state.shape == (ids.shape[0], 0, C)
    out = run(m, torch.full_like(ids, PAD[fam]), attention_mask=torch.zeros_like(mask), output_hidden_states=True)
    assert all((h == 0).all() for h in out.hidden_states)


@pytest.mark.parametrize("case", ["no rows", "rows of length 0", "padding only"])
def test_e1_empty_batches_give_empty_outputs_or_a_clear_error(case):
    """Was a bug (fixed): E1 crashes on degenerate batches that every other family runs: no rows and a batch
    of padding only raise 'lengths: expected at least one row with at least one document' (an
    argument the caller never passed), rows of length 0 'RuntimeError: step must be nonzero'.
    Expected: empty/zero outputs like the other families, or a ValueError naming input_ids or
    attention_mask."""
    m = build("e1", dtype=torch.float32)
    ids, mask = pad_batch("e1", rows("e1"))
    if case == "no rows":
        ids, mask = ids[:0], mask[:0]
    elif case == "rows of length 0":
        ids, mask = ids[:, :0], mask[:, :0]
    else:
        ids, mask = torch.zeros_like(ids), torch.zeros_like(mask)
    try:
        out = run(m, ids, attention_mask=mask)
    except ValueError as e:
        assert str(e).startswith(("input_ids", "attention_mask")), str(e)
        return
    assert out.last_hidden_state.shape == (*ids.shape, m.config.hidden_size)
    assert (out.last_hidden_state == 0).all()


@pytest.mark.parametrize("fam", FAMS)
def test_sequences_longer_than_the_maximum(fam):
    """E1 refuses a sequence over max_num_positions_within_seq, naming it (docs/e1.md). ESM2 and
    DPLM warn and compute (rotary has no table: code behaviour, not in the docs); ESM C and ANKH
    have no maximum."""
    m = build(fam, dtype=torch.float32)
    if fam == "e1":
        ids = torch.tensor([E1TOK.encode("A" * (MAXLEN - 3))["input_ids"]])  # MAXLEN + 1 tokens
        with pytest.raises(ValueError, match="max_num_positions_within_seq"):
            run(m, ids)
        return
    if fam == "dplm2":
        n = MAXLEN
        ids = torch.tensor([[33, *[40] * n, 34, 0, *[5] * n, 2]])
    elif fam == "ankh":
        ids = torch.tensor([[5] * (4 * MAXLEN) + [1]])
    else:
        ids = torch.tensor([[0, *[5] * MAXLEN, 2]])
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        with torch.no_grad():
            out = m(ids)
    assert torch.isfinite(out.last_hidden_state).all()
    if fam in ("esm2", "dplm", "dplm2"):
        assert any("longer than" in str(x.message) for x in w)


# ---------------------------------------------------------------------------------------------
# contact prediction with left padding


@pytest.mark.parametrize("fam", ["esm2", "dplm"])
def test_predict_contacts_of_a_left_padded_batch_equals_each_row_alone(fam):
    """docs/models.md: padded batches may be padded 'left, right or both sides' and 'our result
    does not depend on the padding side'; predict_contacts takes attention_mask. With left padding
    a row's contact map differed from the row alone (4e-4 relative): the contact head dropped
    column 0 and the last column as <cls> and <eos> (HF's right-padding assumption), so a
    left-padded row kept its <cls> in the APC normalisation. <cls> is now zeroed where it sits
    (right padding: unchanged, HF's numbers)."""
    m = build(fam)
    rs = rows(fam)[:3]
    for side in ("right", "left"):
        ids, mask = pad_batch(fam, rs, side)
        c = run(m.predict_contacts, ids, mask)
        for b, r in enumerate(rs):
            want = run(m.predict_contacts, torch.tensor([r]))[0]
            real = mask[b].nonzero().flatten()
            inner = real[1:-1] - 1  # real residues in the (S - 2) grid of the padded row
            got = c[b][inner][:, inner]
            assert rel(got, want) <= 1e-10, f"{side} row {b}: {rel(got, want):.2e}"


# ---------------------------------------------------------------------------------------------
# compiled layers


@pytest.mark.slow
def test_compiled_layers_of_dplm2_equal_the_plain_layers():
    """compile_layers() (inductor on the CPU) on a padded DPLM-2 batch run packed (its forward
    hook for the second token-dropout rescaling stays outside the compiled functions): the same
    logits, hidden states, attentions and s_max as the plain layers."""
    m = build("dplm2", dtype=torch.float32)
    m.attn_backend, m.pack_padded = "sdpa", True
    ids, mask = pad_batch("dplm2", rows("dplm2"))
    kw = dict(output_hidden_states=True, output_s_max=True)
    m.config.compile_layers = False
    ref = run(m, ids, attention_mask=mask, **kw)
    m.compile_layers()
    assert m.config.compile_layers is True
    out = run(m, ids, attention_mask=mask, **kw)
    assert rel(out.logits, ref.logits) <= 1e-5
    assert all(rel(a, b) <= 1e-5 for a, b in zip(out.hidden_states, ref.hidden_states))
    assert rel(out.s_max, ref.s_max) <= 1e-5
    assert (out.logits[~mask.bool()] == 0).all()
