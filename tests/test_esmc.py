"""ESM C / ESM++ (anyattn.models.esmc) on CPU.

The reference is an independent float64 re-statement of the published equations (EvolutionaryScale's
esm/layers/{attention,blocks,rotary,regression_head,transformer_stack}.py), written here in plain
tensor algebra and run one sequence at a time (no padding, no masks): LayerNorm from its mean and
variance, rotary as a complex rotation of the (x_m, x_{m+D/2}) pairs, softmax attention, SwiGLU,
residue scaling sqrt(L/36), erf GELU in the sequence head. It reads the state dict by
EvolutionaryScale's key names, so it also pins what those names mean.

Besides: transformers' own EsmcForMaskedLM (weights written by transformers' save_pretrained), the
key list of the published esmc_300m_2024_12_v0.pth (tests/fixtures/esmc_300m_2024_12_v0_keys.json,
source named inside), and the published ESM++ config.json files (tests/fixtures/published_configs.json).
"""

from __future__ import annotations

import json
import math
import os

import pytest
import torch

from anyattn.testing import record_calls

pytest.importorskip("transformers")

import anyattn
import anyattn.models as am
from anyattn.models import esmc as esmc_mod
from anyattn.models.esmc import ESMC_VOCAB, ESMCConfig, ESMCForMaskedLM, ESMCModel
from anyattn.models.esmc_checkpoints import build_esmc, load_esmc, map_esmc_keys

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
C, H, L, FF, V = 64, 4, 3, 96, 64  # tiny: head dim 16 (flex needs >= 16)


# ---------------------------------------------------------------------------------------------
# float64 reference of the published equations


def _ln(x, w, b=None, eps=1e-5):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    y = (x - mu) / torch.sqrt(var + eps) * w
    return y if b is None else y + b


def _rope(x_SHD, theta=10000.0):
    """Position s rotates the pair (x_m, x_{m + D/2}) by s * theta^(-2m/D)."""
    S, _, D = x_SHD.shape
    half = D // 2
    ang = torch.arange(S, dtype=torch.float64)[:, None] * theta ** (-2 * torch.arange(half, dtype=torch.float64) / D)
    z = torch.complex(x_SHD[..., :half], x_SHD[..., half:]) * torch.polar(torch.ones_like(ang), ang)[:, None, :]
    return torch.cat((z.real, z.imag), dim=-1)


def reference(sd: dict, ids_S: torch.Tensor, heads: int) -> dict:
    """One sequence: logits (S, V), hidden states (L + 1 of (S, C)), attention probs (L of
    (H, S, S)), s_max (L, H), all float64."""
    g = {k: v.double() for k, v in sd.items()}
    nl = len({k.split(".")[2] for k in g if k.startswith("transformer.blocks.")})
    x = g["embed.weight"][ids_S]
    S, Cm = x.shape
    D = Cm // heads
    s = math.sqrt(nl / 36)
    hidden, probs, smax = [x], [], []
    for i in range(nl):
        p = f"transformer.blocks.{i}."
        h = _ln(x, g[p + "attn.layernorm_qkv.0.weight"], g[p + "attn.layernorm_qkv.0.bias"])
        qkv = h @ g[p + "attn.layernorm_qkv.1.weight"].T
        q, k, v = qkv[:, :Cm], qkv[:, Cm : 2 * Cm], qkv[:, 2 * Cm :]
        q, k = _ln(q, g[p + "attn.q_ln.weight"]), _ln(k, g[p + "attn.k_ln.weight"])
        q, k, v = _rope(q.view(S, heads, D)), _rope(k.view(S, heads, D)), v.view(S, heads, D)
        a = torch.softmax(torch.einsum("ihd,jhd->hij", q, k) / math.sqrt(D), dim=-1)
        probs.append(a)
        smax.append(q.norm(dim=-1).amax(0) * k.norm(dim=-1).amax(0) / math.sqrt(D))
        o = torch.einsum("hij,jhd->ihd", a, v).reshape(S, Cm)
        x = x + (o @ g[p + "attn.out_proj.weight"].T) / s
        u = _ln(x, g[p + "ffn.0.weight"], g[p + "ffn.0.bias"]) @ g[p + "ffn.1.weight"].T
        F_ = u.shape[-1] // 2
        gate = u[:, :F_] / (1 + torch.exp(-u[:, :F_]))  # silu
        x = x + ((gate * u[:, F_:]) @ g[p + "ffn.3.weight"].T) / s
        hidden.append(x)
    x = _ln(x, g["transformer.norm.weight"])
    hidden[-1] = x
    y = x @ g["sequence_head.0.weight"].T + g["sequence_head.0.bias"]
    y = 0.5 * y * (1 + torch.erf(y / math.sqrt(2)))
    y = _ln(y, g["sequence_head.2.weight"], g["sequence_head.2.bias"])
    logits = y @ g["sequence_head.3.weight"].T + g["sequence_head.3.bias"]
    return {"logits": logits, "hidden": hidden, "probs": probs, "s_max": torch.stack(smax)}


def random_state_dict(Cm=C, nl=L, F_=FF, seed=0) -> dict:
    """EvolutionaryScale-format weights with non-trivial LayerNorms and biases, float32."""
    gen = torch.Generator().manual_seed(seed)
    r = lambda *shape, std=1.0: torch.randn(*shape, generator=gen) * std
    sd = {"embed.weight": r(V, Cm)}
    for i in range(nl):
        p = f"transformer.blocks.{i}."
        sd.update({
            p + "attn.layernorm_qkv.0.weight": 1 + 0.2 * r(Cm), p + "attn.layernorm_qkv.0.bias": 0.1 * r(Cm),
            p + "attn.layernorm_qkv.1.weight": r(3 * Cm, Cm, std=Cm**-0.5), p + "attn.q_ln.weight": 1 + 0.5 * r(Cm),
            p + "attn.k_ln.weight": 1 + 0.5 * r(Cm), p + "attn.out_proj.weight": r(Cm, Cm, std=Cm**-0.5),
            p + "ffn.0.weight": 1 + 0.2 * r(Cm), p + "ffn.0.bias": 0.1 * r(Cm),
            p + "ffn.1.weight": r(2 * F_, Cm, std=Cm**-0.5), p + "ffn.3.weight": r(Cm, F_, std=F_**-0.5),
        })  # fmt: skip
    sd["transformer.norm.weight"] = 1 + 0.2 * r(Cm)
    sd.update({
        "sequence_head.0.weight": r(Cm, Cm, std=Cm**-0.5), "sequence_head.0.bias": 0.1 * r(Cm),
        "sequence_head.2.weight": 1 + 0.2 * r(Cm), "sequence_head.2.bias": 0.1 * r(Cm),
        "sequence_head.3.weight": r(V, Cm, std=Cm**-0.5), "sequence_head.3.bias": 0.1 * r(V),
    })  # fmt: skip
    return sd


def _cfg(**kw) -> ESMCConfig:
    return ESMCConfig(hidden_size=C, num_hidden_layers=L, num_attention_heads=H, intermediate_size=FF, **kw)


LENGTHS = [13, 1, 7, 21]  # tokens per sequence, <cls> ... <eos>


def _sequences(lengths=LENGTHS, seed=1):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        s = torch.randint(4, 29, (n,), generator=gen)
        s[0] = 0
        if n > 1:
            s[-1] = 2
        out.append(s)
    return out


def _padded(seqs, left_rows=()):
    S = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), S), 1, dtype=torch.long)
    am_ = torch.zeros(len(seqs), S, dtype=torch.long)
    for b, s in enumerate(seqs):
        sl = slice(S - len(s), S) if b in left_rows else slice(0, len(s))
        ids[b, sl], am_[b, sl] = s, 1
    return ids, am_


@pytest.fixture(scope="module")
def setup():
    sd = random_state_dict()
    seqs = _sequences()
    refs = [reference(sd, s, H) for s in seqs]
    return sd, seqs, refs


def _err(out, ids, am_, refs, what="logits") -> float:
    """Max abs error at the real tokens against the per-sequence references."""
    worst = 0.0
    for b, ref in enumerate(refs):
        keep = am_[b].bool()
        if what == "logits":
            pairs = [(out.logits[b][keep], ref["logits"])]
        else:
            pairs = [(h[b][keep], r) for h, r in zip(out.hidden_states, ref["hidden"])]
        for a, r in pairs:
            worst = max(worst, (a.double() - r).abs().max().item())
    return worst


# ---------------------------------------------------------------------------------------------
# numerics


def test_float64_model_equals_the_published_equations(setup):
    """Our model in float64 on the eager backend against the float64 re-statement: every hidden
    state and the logits, right- and left-padded rows, a length-1 row."""
    sd, seqs, refs = setup
    m = build_esmc(_cfg(attn_backend="eager"), sd, dtype=torch.float64)
    ids, am_ = _padded(seqs, left_rows=(2,))
    with torch.no_grad():
        out = m(ids, attention_mask=am_, output_hidden_states=True)
    assert len(out.hidden_states) == L + 1
    assert _err(out, ids, am_, refs, "logits") < 1e-10
    assert _err(out, ids, am_, refs, "hidden") < 1e-10
    assert out.logits.shape == (len(seqs), ids.shape[1], V)
    assert torch.all(out.last_hidden_state[~am_.bool()] == 0)  # zeros at padding


@pytest.mark.parametrize("backend,pack", [("eager", False), ("sdpa", False), ("sdpa", True), ("auto", "auto")])
def test_float32_backends_within_the_tolerance_rule(setup, backend, pack):
    """float32 on each CPU backend, padded and packed: error vs the float64 reference <= 2 x the
    error of float32 eager (padded) + 1e-5 (DESIGN.md section 7), logits and every hidden state."""
    sd, seqs, refs = setup
    ids, am_ = _padded(seqs, left_rows=(0,))
    base = build_esmc(_cfg(attn_backend="eager", pack_padded=False), sd)
    m = build_esmc(_cfg(attn_backend=backend, pack_padded=pack), sd)
    with torch.no_grad():
        b_out = base(ids, attention_mask=am_, output_hidden_states=True)
        out = m(ids, attention_mask=am_, output_hidden_states=True)
    for what in ("logits", "hidden"):
        bound = 2 * _err(b_out, ids, am_, refs, what) + 1e-5
        got = _err(out, ids, am_, refs, what)
        assert got <= bound, f"{backend} pack={pack} {what}: {got:.3g} > {bound:.3g}"


def test_flex_packs_padded_rows_and_matches(setup):
    """flex (compiled on CPU, one case): the padded batch runs as one packed row (bucketed length)
    and stays within the tolerance rule; the packing is visible in the batch structure."""
    sd, seqs, refs = setup
    ids, am_ = _padded(seqs)
    base = build_esmc(_cfg(attn_backend="eager", pack_padded=False), sd)
    m = build_esmc(_cfg(attn_backend="flex"), sd)
    with torch.no_grad(), record_calls() as seen:
        out = m(ids, attention_mask=am_, output_hidden_states=True)
    assert {c.backend for c in seen} == {"flex"} and seen[0].q_shape[0] == 1 and seen[0].q_shape[2] == 64  # 42 tokens -> bucket 64
    with torch.no_grad():
        b_out = base(ids, attention_mask=am_, output_hidden_states=True)
    for what in ("logits", "hidden"):
        assert _err(out, ids, am_, refs, what) <= 2 * _err(b_out, ids, am_, refs, what) + 1e-5


def test_packed_documents_equal_the_padded_batch(setup):
    """seq_info: the sequences back to back in one row with tail padding (positions restart per
    document) = the padded batch; the tail is not computed (zeros)."""
    sd, seqs, refs = setup
    row = torch.cat(seqs)
    S = len(row) + 5
    ids = torch.cat((row, torch.full((5,), 1))).view(1, S)
    info = anyattn.SeqInfo.from_lengths([[len(s) for s in seqs]], total_length=S)
    for backend, pack in (("sdpa", False), ("eager", True)):
        m = build_esmc(_cfg(attn_backend=backend, pack_padded=pack), sd)
        with torch.no_grad():
            out = m(ids, seq_info=info, output_s_max=True)
        start = 0
        for s, ref in zip(seqs, refs):
            got = out.logits[0, start : start + len(s)].double()
            assert (got - ref["logits"]).abs().max() < 2e-5
            start += len(s)
        assert torch.all(out.logits[0, start:] == 0)
        want = torch.stack([r["s_max"] for r in refs]).amax(0)
        torch.testing.assert_close(out.s_max.double(), want, rtol=1e-5, atol=0)


def test_output_attentions_and_s_max(setup):
    """output_attentions: (B, H, S, S) float32 equal to the reference probabilities among each
    row's real tokens (one warning: the eager path); s_max = max over the batch's sequences of
    D**-0.5 * max ||q_i|| * max ||k_j||, padded and packed."""
    sd, seqs, refs = setup
    ids, am_ = _padded(seqs, left_rows=(3,))
    m = build_esmc(_cfg(), sd)
    with pytest.warns(UserWarning, match="eager path"), torch.no_grad():
        out = m(ids, attention_mask=am_, output_attentions=True, output_s_max=True)
    assert len(out.attentions) == L and out.attentions[0].shape == (len(seqs), H, ids.shape[1], ids.shape[1])
    for b, ref in enumerate(refs):
        keep = am_[b].bool()
        for lay in range(L):
            w = out.attentions[lay][b][:, keep][:, :, keep].double()
            assert (w - ref["probs"][lay]).abs().max() < 1e-5
    want = torch.stack([r["s_max"] for r in refs]).amax(0)
    torch.testing.assert_close(out.s_max.double(), want, rtol=1e-5, atol=0)
    m.pack_padded = True
    with torch.no_grad():
        packed = m(ids, attention_mask=am_, output_s_max=True)
    torch.testing.assert_close(packed.s_max.double(), want, rtol=1e-5, atol=0)


def test_masked_lm_loss(setup):
    sd, seqs, refs = setup
    ids, am_ = _padded(seqs)
    labels = torch.full_like(ids, -100)
    labels[0, 3], labels[3, 5], labels[2, 1] = 7, 12, 5
    m = build_esmc(_cfg(), sd)
    with torch.no_grad():
        out = m(ids, attention_mask=am_, labels=labels)
    ref_logits = torch.stack([refs[0]["logits"][3], refs[3]["logits"][5], refs[2]["logits"][1]])
    want = torch.nn.functional.cross_entropy(ref_logits, torch.tensor([7, 12, 5]))
    assert abs(out.loss.item() - want.item()) < 1e-5
    assert out[0] is out.loss


def test_matches_transformers_esmc_written_by_transformers(tmp_path):
    """transformers' EsmcForMaskedLM (random weights, perturbed norms), saved by its
    save_pretrained, loaded by anyattn.models.load (model_type "esmc": split q/k/v and gate/up
    fused on load): logits and every hidden state <= 1e-5 in float32, padded batch."""
    from transformers import EsmcConfig, EsmcForMaskedLM

    torch.manual_seed(0)
    hc = EsmcConfig(hidden_size=C, intermediate_size=FF, num_hidden_layers=L, num_attention_heads=H)
    hf = EsmcForMaskedLM(hc).eval()
    with torch.no_grad():
        for _, p in hf.named_parameters():
            p.add_(0.1 * torch.randn_like(p))
    hf.save_pretrained(tmp_path)
    m = am.load(str(tmp_path))
    assert type(m) is ESMCForMaskedLM and m.config.intermediate_size == FF
    ids, am_ = _padded(_sequences(), left_rows=())
    with torch.no_grad():
        r = hf(ids, attention_mask=am_, output_hidden_states=True)
        o = m(ids, attention_mask=am_, output_hidden_states=True)
    keep = am_.bool()
    assert (r.logits[keep] - o.logits[keep]).abs().max() <= 1e-5
    assert len(r.hidden_states) == len(o.hidden_states) == L + 1
    for a, b in zip(r.hidden_states, o.hidden_states):
        assert (a[keep] - b[keep]).abs().max() <= 1e-5


# ---------------------------------------------------------------------------------------------
# checkpoints and configs


def _fixture(name):
    with open(os.path.join(FIXTURES, name)) as f:
        return json.load(f)


def test_parameter_names_and_shapes_equal_the_published_300m_checkpoint():
    """Our ESM C 300M preset's state_dict = the tensor list of EvolutionaryScale's
    esmc_300m_2024_12_v0.pth (names and shapes, all 308); transformers' native EsmcForMaskedLM of
    the same shape maps onto exactly that list (map_esmc_keys)."""
    from transformers import EsmcConfig, EsmcForMaskedLM

    published = {k: tuple(v) for k, v in _fixture("esmc_300m_2024_12_v0_keys.json")["keys"].items()}
    with torch.device("meta"):
        ours = ESMCForMaskedLM(ESMCConfig.from_name("EvolutionaryScale/esmc-300m-2024-12"))
        native = EsmcForMaskedLM(
            EsmcConfig(hidden_size=960, intermediate_size=2560, num_hidden_layers=30, num_attention_heads=15)
        )
    assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == published
    mapped = map_esmc_keys(native.state_dict())
    assert {k: tuple(v.shape) for k, v in mapped.items()} == published


def test_presets():
    c3, c6 = ESMCConfig.from_name("esmc_300m"), ESMCConfig.from_name("Synthyra/ESMplusplus_large")
    assert (c3.hidden_size, c3.num_hidden_layers, c3.num_attention_heads, c3.intermediate_size, c3.head_dim) == (
        960,
        30,
        15,
        2560,
        64,
    )
    assert (c6.hidden_size, c6.num_hidden_layers, c6.num_attention_heads, c6.intermediate_size, c6.head_dim) == (
        1152,
        36,
        18,
        3072,
        64,
    )
    assert c6.residue_scale == 1.0 and abs(c3.residue_scale - math.sqrt(30 / 36)) < 1e-12
    with pytest.raises(ValueError, match="esmc_300m"):
        ESMCConfig.from_name("esmc_9b")


def test_published_esm_plus_plus_configs_are_detected_and_load(tmp_path):
    """Both published Synthyra/ESMplusplus_small config.json versions are ESM C to
    anyattn.models.load; a directory with one of them (shape fields set to the tiny test shape)
    and EvolutionaryScale-named safetensors loads strictly, equal to the reference."""
    from safetensors.torch import save_file

    cfgs = {k: v["config"] for k, v in _fixture("published_configs.json")["configs"].items() if "ESMplusplus" in k}
    assert len(cfgs) == 2 and all(am.is_esmc_config(c) for c in cfgs.values())
    for c in cfgs.values():
        full = ESMCConfig.from_config_dict(c)
        assert (full.hidden_size, full.num_hidden_layers, full.num_attention_heads, full.intermediate_size) == (
            960,
            30,
            15,
            2560,
        )
    raw = dict(next(iter(cfgs.values())), hidden_size=C, num_hidden_layers=L, num_attention_heads=H)
    # the ESM++ config has no FFN field: the width follows EvolutionaryScale's rule (256 for C=64)
    sd256 = random_state_dict(F_=esmc_mod.swiglu_width(C))
    (tmp_path / "config.json").write_text(json.dumps(raw))
    save_file(sd256, str(tmp_path / "model.safetensors"))
    m = am.load(str(tmp_path))
    assert type(m) is ESMCForMaskedLM and m.attn_backend == "auto"  # ESM++'s "sdpa" is not our field
    s = _sequences([9])[0]
    ref = reference(sd256, s, H)
    with torch.no_grad():
        assert (m(s[None]).logits[0].double() - ref["logits"]).abs().max() < 2e-5
    raw_model = dict(raw, architectures=["ESMplusplusModel"])
    (tmp_path / "config.json").write_text(json.dumps(raw_model))
    enc = am.load(str(tmp_path))  # the encoder drops the checkpoint's sequence head
    assert type(enc) is ESMCModel


def test_evolutionaryscale_pth_directory_loads(tmp_path):
    """EvolutionaryScale's layout (no config.json; data/weights/esmc_*.pth): the shape comes from
    the weights (head dim 64), the model equals the reference."""
    Cm = 128
    sd = random_state_dict(Cm=Cm, nl=2, F_=esmc_mod.swiglu_width(Cm))
    (tmp_path / "data" / "weights").mkdir(parents=True)
    torch.save(sd, tmp_path / "data" / "weights" / "esmc_300m_2024_12_v0.pth")
    m = load_esmc(str(tmp_path), attn_backend="sdpa")
    assert (m.config.hidden_size, m.config.num_attention_heads, m.config.num_hidden_layers) == (Cm, 2, 2)
    s = _sequences([11])[0]
    with torch.no_grad():
        got = m(s[None]).logits[0].double()
    assert (got - reference(sd, s, 2)["logits"]).abs().max() < 2e-5


def test_transformer_engine_style_names_map_onto_ours(setup):
    """The TransformerEngine-style layout (names from third-party code converting Biohub ESMC
    safetensors): esmc.-prefixed, fused LayerNorm+Linear names, FP8 _extra_state entries, lm_head
    indices. Built here from our names, so this pins the rename, not a published file."""
    sd = setup[0]
    te = {}
    for k, v in sd.items():
        n = (
            k.replace("attn.layernorm_qkv.0.weight", "attn.layernorm_qkv.layer_norm_weight")
            .replace("attn.layernorm_qkv.0.bias", "attn.layernorm_qkv.layer_norm_bias")
            .replace("attn.layernorm_qkv.1.weight", "attn.layernorm_qkv.weight")
            .replace("ffn.0.weight", "ffn.layer_norm_weight")
            .replace("ffn.0.bias", "ffn.layer_norm_bias")
            .replace("ffn.1.weight", "ffn.fc1_weight")
            .replace("ffn.3.weight", "ffn.fc2_weight")
        )
        te["lm_head." + n[len("sequence_head.") :] if n.startswith("sequence_head.") else "esmc." + n] = v
    te["esmc.transformer.blocks.0.ffn._extra_state"] = torch.empty(0)
    mapped = map_esmc_keys(te)
    assert mapped.keys() == sd.keys() and all(mapped[k] is sd[k] for k in sd)
    cfg = ESMCConfig.from_config_dict(
        {"model_type": "esmc", "d_model": C, "n_heads": H, "n_layers": L, "intermediate_size": FF}
    )
    build_esmc(cfg, te)


def test_strict_loading_names_every_bad_key(setup):
    sd = dict(setup[0])
    cfg = _cfg()
    bad = dict(sd, **{"transformer.blocks.0.attn.bogus.weight": torch.zeros(3)})
    with pytest.raises(ValueError, match=r"unknown key.*transformer\.blocks\.0\.attn\.bogus\.weight"):
        build_esmc(cfg, bad)
    missing = {k: v for k, v in sd.items() if k != "transformer.blocks.2.attn.k_ln.weight"}
    with pytest.raises(ValueError, match=r"missing key.*transformer\.blocks\.2\.attn\.k_ln\.weight"):
        build_esmc(cfg, missing)
    shaped = dict(sd, **{"transformer.blocks.1.ffn.3.weight": torch.zeros(C, FF + 1)})
    with pytest.raises(ValueError, match=r"shape mismatch.*transformer\.blocks\.1\.ffn\.3\.weight"):
        build_esmc(cfg, shaped)
    with pytest.raises(ValueError, match=r"missing key.*sequence_head\.3\.bias"):
        build_esmc(cfg, {k: v for k, v in sd.items() if k != "sequence_head.3.bias"})
    native = {
        "esmc.layers.0.self_attn.q_proj.weight": torch.zeros(C, C),
        "esmc.layers.0.self_attn.v_proj.weight": torch.zeros(C, C),
    }
    with pytest.raises(ValueError, match=r"esmc\.layers\.0\.self_attn\.k_proj\.weight"):
        map_esmc_keys(native)
    build_esmc(cfg, sd, head=False)  # the encoder takes a masked-LM checkpoint (head dropped)


def test_attn_backend_switch_and_refusals(setup, monkeypatch):
    """model.attn_backend switches every block at the next call (the backend each call received
    is recorded); an unknown name is refused listing the valid ones; a named backend that cannot
    serve the call raises instead of falling back."""
    sd, seqs, _ = setup
    m = build_esmc(_cfg(attn_backend="sdpa", pack_padded=False), sd)
    got = []
    real = esmc_mod.attention

    def record(*a, **k):
        got.append(k["backend"])
        return real(*a, **k)

    monkeypatch.setattr(esmc_mod, "attention", record)
    ids, am_ = _padded(seqs)
    with torch.no_grad():
        m(ids, attention_mask=am_)
        m.attn_backend = "eager"
        m(ids, attention_mask=am_)
    assert got == ["sdpa"] * L + ["eager"] * L
    with pytest.raises(ValueError, match="eager"):
        m.attn_backend = "no_such_backend"
    m.attn_backend = "flash_torch"  # CUDA only
    with pytest.raises(anyattn.UnsupportedError), torch.no_grad():
        m(ids, attention_mask=am_)


def test_input_checks(setup):
    m = build_esmc(_cfg(), setup[0])
    with pytest.raises(ValueError, match="input_ids"):
        m(torch.tensor([[0, 64, 2]]))
    with pytest.raises(ValueError, match="attention_mask/seq_info"):
        m(torch.tensor([[0, 5, 2]]), attention_mask=torch.ones(1, 3), seq_info=anyattn.SeqInfo.from_lengths([3]))
    with pytest.raises(ValueError, match="seq_info"):
        m(torch.tensor([[0, 5, 2]]), seq_info=anyattn.SeqInfo.from_lengths([2]))


def test_save_pretrained_round_trip_auto_classes_and_tokenizer(setup, tmp_path):
    """save_pretrained / from_pretrained / AutoModelForMaskedLM / anyattn.models.load keep the
    weights and the saved attn_backend; load_tokenizer(model) gives ESM C's vocabulary, whose
    ids equal transformers' EsmcTokenizer."""
    from transformers import AutoModelForMaskedLM, EsmcTokenizer

    sd = setup[0]
    m = build_esmc(_cfg(attn_backend="eager"), sd)
    m.save_pretrained(tmp_path)
    for loaded in (
        ESMCForMaskedLM.from_pretrained(tmp_path),
        AutoModelForMaskedLM.from_pretrained(tmp_path),
        am.load(str(tmp_path)),
    ):
        assert type(loaded) is ESMCForMaskedLM and loaded.attn_backend == "eager"
        for k, v in sd.items():
            assert torch.equal(loaded.state_dict()[k], v), k
    assert am.load(str(tmp_path), attn_backend="sdpa").attn_backend == "sdpa"
    tok = am.load_tokenizer(m)
    assert tok.vocab == ESMC_VOCAB
    seq = "MKT|AYIAKX"
    assert tok.encode(seq) == EsmcTokenizer()(seq)["input_ids"]


def test_training_step_reaches_every_parameter(setup):
    """Dropout in train mode, backward through the padded and packed layouts on sdpa and eager:
    every parameter gets a finite gradient."""
    m = build_esmc(_cfg(dropout=0.1), setup[0])
    m.train()
    ids, am_ = _padded(_sequences())
    labels = ids.masked_fill(am_ == 0, -100)
    for backend, pack in (("sdpa", False), ("eager", True)):
        m.attn_backend, m.pack_padded = backend, pack
        m.zero_grad()
        m(ids, attention_mask=am_, labels=labels).loss.backward()
        bad = [n for n, p in m.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
        assert not bad, (backend, bad)


# ---------------------------------------------------------------------------------------------
# compile_layers


def _compile_runs():
    """A padded batch and a packed row (different token counts in the layers), then one full row
    with output_attentions (the eager path, outside the compiled functions)."""
    ids, am_ = _padded(_sequences())
    packed_seqs = _sequences([5, 9, 17], seed=3)
    row = torch.full((1, 35), 1, dtype=torch.long)
    row[0, :31] = torch.cat(packed_seqs)
    info = anyattn.SeqInfo.from_lengths([5, 9, 17], total_length=35)
    one = _sequences([11], seed=4)[0][None]
    return [
        ("padded", lambda m: m(ids, attention_mask=am_, output_hidden_states=True, output_s_max=True)),
        ("packed", lambda m: m(row, seq_info=info, output_hidden_states=True)[:4]),
        ("attentions", lambda m: m(one, output_attentions=True)),
    ]


@pytest.mark.slow
def test_compile_layers_equals_plain_on_padded_and_packed_batches_without_recompiles(setup):
    """compile_layers() (inductor on this CPU) against the plain blocks: logits, every hidden
    state, s_max and attention weights; a second token count reuses the two compiled graphs."""
    from .compile_layers_checks import compiled_equals_plain_without_recompiles

    m = build_esmc(_cfg(attn_backend="sdpa", pack_padded=True), setup[0])
    compiled_equals_plain_without_recompiles(m, _compile_runs())


def test_compile_layers_auto_falls_back_once_when_compiling_fails(setup, monkeypatch):
    from .compile_layers_checks import auto_compiles_nothing_on_cpu, auto_falls_back_once_with_a_warning

    m = build_esmc(_cfg(attn_backend="sdpa", pack_padded=True), setup[0])
    ids, am_ = _padded(_sequences())
    call = lambda m: m(ids, attention_mask=am_).logits
    auto_compiles_nothing_on_cpu(m, call, monkeypatch)
    auto_falls_back_once_with_a_warning(m, call, monkeypatch)
    enc = build_esmc(_cfg(attn_backend="sdpa"), setup[0], head=False)
    auto_falls_back_once_with_a_warning(enc, lambda m: m(ids, attention_mask=am_).last_hidden_state, monkeypatch)


def test_compile_layers_setting_is_validated_and_saved():
    with pytest.raises(ValueError, match="compile_layers: expected 'auto', True or False"):
        _cfg(compile_layers="yes")
    cfg = _cfg(compile_layers=False)
    assert ESMCConfig.from_config_dict(cfg.to_dict()).compile_layers is False
    assert _cfg().compile_layers == "auto"
