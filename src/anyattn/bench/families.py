"""The protein-model families of ``anyattn bench model --family`` and of the embed benchmark:
for each, its shapes, how a residue string becomes tokens, one set of random weights, and the
models a run compares (anyattn's, HF transformers' where it has the network, a FastPLMs-style
SDPA port where one is written here).

Every builder loads the SAME state dict (``template``), so the rows of a run hold identical
weights. What each family compares (``output``: the tensor a check reads, at real tokens):

    family  anyattn (plain call)       HF transformers                 port                    output
    esm2    ESM2Model                  EsmModel                        sdpa_port.SdpaESM2      last hidden state
    esmc    ESMCModel                  EsmcModel (if installed)        family_ports.SdpaESMC   last hidden state
    ankh    AnkhModel                  T5EncoderModel                  family_ports.SdpaAnkh   last hidden state
    e1      E1Model                    none (transformers has no E1)   family_ports.SdpaE1     last hidden state
    dplm    DPLMForMaskedLM            EsmForMaskedLM (DPLM's network) family_ports.SdpaDPLM   logits

A builder that cannot exist here raises :class:`Unavailable` with the reason, which the run
records on a skipped row. transformers is imported inside the builders only, so that building
the command line needs torch alone.

Tokens: the residue strings are the ESM2 benchmark's (``workload.sequences``: the same lengths and
residues for every family), tokenized the family's way: ESM2, ESM C and DPLM ``<cls> seq <eos>``
(n + 2 tokens, ESM's ids), E1 ``<bos> 1 seq 2 <eos>`` (n + 4, :class:`E1Tokenizer`), ANKH
``seq </s>`` (n + 1). anyattn ships no ANKH tokenizer (its ids are T5's sentencepiece vocabulary):
residues take the stand-in ids 3..22 in ``_ANKH_IDS`` order. With random weights which id stands
for which residue changes neither the speed nor the check.
"""

from __future__ import annotations

import copy
import importlib.util

import torch

from .family_base import Family, Unavailable, _hf_build, _hf_check_impl, _strict_load, _transformers
from .family_more import _DPLM, _E1, _Ankh

__all__ = ["FAMILIES", "Family", "Unavailable", "get"]


# ---------------------------------------------------------------------------------------------
# ESM2 (the default path of bench model is model.py's; this adapter serves the embed benchmark)


class _ESM2(Family):
    name = "esm2"
    presets = ("esm2_t6_8M", "esm2_t12_35M", "esm2_t30_150M", "esm2_t33_650M", "esm2_t36_3B", "esm2_t48_15B")
    default_preset = "esm2_t33_650M"
    hf_name = "EsmModel"
    mask_id = 32
    flop_formula = "per sequence of n tokens: 2*n*L*(4*C^2 + 2*C*F) + 4*n^2*L*C (encoder, no LM head)"

    def config(self, preset):
        from ..models import ESM2Config

        return ESM2Config.from_name(preset)

    def quick_config(self):
        from ..models import ESM2Config

        return ESM2Config(vocab_size=33, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256)

    def describe(self, cfg):
        return cfg.to_hf_dict()

    @property
    def pad_id(self):
        return 1

    def encode(self, seq):
        from ..models import ProteinTokenizer

        return ProteinTokenizer.esm().encode(seq)

    def template(self, cfg, device, dtype, seed):
        from .model_rows import template_state_dict

        return template_state_dict(cfg, device, dtype, seed)

    def anyattn(self, cfg, sd, device, dtype, **config):
        from .model_rows import anyattn_model

        return anyattn_model(cfg, sd, device, dtype, **config)

    def hf(self, cfg, sd, device, dtype, impl):
        from .model_rows import hf_model

        m = hf_model(cfg, sd, device, dtype, impl)
        return lambda ids, am: m(input_ids=ids, attention_mask=am)

    def port(self, cfg, sd, device, dtype):
        from .sdpa_port import from_hf_state_dict

        p = from_hf_state_dict(cfg.to_hf_dict(), sd, device=device, dtype=dtype)
        return lambda ids, am: p(ids, am)

    def flops(self, cfg, tokens):
        from ..models import esm2_flops

        return float(esm2_flops(cfg, tokens))

    def checkpoint(self, cfg, sd, device, dtype):
        """The model ``anyattn.models.load`` reads back from ``save_pretrained`` (embed job)."""
        from ..models import ESM2ForMaskedLM

        torch.manual_seed(0)  # the LM head (not in the template) is random too
        with torch.device(device):
            m = ESM2ForMaskedLM(copy.deepcopy(cfg))
        m = m.to(dtype=dtype).eval()
        _strict_load(m.esm, {k: v for k, v in sd.items() if not k.startswith("pooler.")}, "ESM2ForMaskedLM.esm")
        return m


# ---------------------------------------------------------------------------------------------
# ESM C


class _ESMC(Family):
    name = "esmc"
    presets = ("esmc_300m", "esmc_600m", "esmc_6b")
    default_preset = "esmc_300m"
    hf_name = "EsmcModel"
    flop_formula = "per sequence of n tokens: 2*n*L*(4*C^2 + 3*C*F) + 4*n^2*L*C (encoder, no sequence head)"

    def config(self, preset):
        from ..models import ESMCConfig

        return ESMCConfig.from_name(preset)

    def quick_config(self):
        from ..models import ESMCConfig

        return ESMCConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96)

    def describe(self, cfg):
        keys = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                "scale_residue", "layer_norm_eps", "rope_theta", "pad_token_id", "mask_token_id")  # fmt: skip
        return {k: getattr(cfg, k) for k in keys}

    @property
    def pad_id(self):
        return 1

    def encode(self, seq):
        from ..models import esmc_tokenizer

        return esmc_tokenizer().encode(seq)

    def template(self, cfg, device, dtype, seed):
        from ..models import ESMCModel

        torch.manual_seed(seed)
        with torch.device(device):
            m = ESMCModel(copy.deepcopy(cfg))
        sd = {k: v.detach().to(dtype) for k, v in m.state_dict().items()}
        del m
        return sd

    def anyattn(self, cfg, sd, device, dtype, **config):
        from ..models import build_esmc

        mcfg = copy.deepcopy(cfg)
        for k, v in config.items():
            setattr(mcfg, k, v)
        return build_esmc(mcfg, sd, dtype=dtype, device=device, head=False)

    def _hf_sd(self, sd, C, F_):
        """Ours (EvolutionaryScale's names) -> transformers' EsmcModel names (q/k/v, gate/up split)."""
        out = {}
        for k, v in sd.items():
            if k == "embed.weight":
                out["embed_tokens.weight"] = v
            elif k == "transformer.norm.weight":
                out["norm.weight"] = v
            else:
                _, _, i, rest = k.split(".", 3)
                p = f"layers.{i}."
                if rest == "attn.layernorm_qkv.1.weight":
                    for name, t in zip(("q_proj", "k_proj", "v_proj"), v.split(C, dim=0)):
                        out[p + f"self_attn.{name}.weight"] = t
                elif rest == "ffn.1.weight":
                    out[p + "mlp.gate_proj.weight"], out[p + "mlp.up_proj.weight"] = v.split(F_, dim=0)
                else:
                    simple = {"attn.layernorm_qkv.0.weight": "input_layernorm.weight", "attn.layernorm_qkv.0.bias": "input_layernorm.bias",
                              "attn.q_ln.weight": "self_attn.q_norm.weight", "attn.k_ln.weight": "self_attn.k_norm.weight",
                              "attn.out_proj.weight": "self_attn.o_proj.weight", "ffn.0.weight": "post_attention_layernorm.weight",
                              "ffn.0.bias": "post_attention_layernorm.bias", "ffn.3.weight": "mlp.down_proj.weight"}  # fmt: skip
                    out[p + simple.get(rest, rest)] = v
        return out

    def hf(self, cfg, sd, device, dtype, impl):
        tf = _transformers()
        if not (hasattr(tf, "EsmcModel") and hasattr(tf, "EsmcConfig")):
            raise Unavailable(f"transformers {tf.__version__} has no EsmcModel (native ESM C came with a later release)")
        try:
            hc = tf.EsmcConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
                               num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
                               pad_token_id=cfg.pad_token_id)  # fmt: skip
        except (TypeError, ValueError) as e:
            raise Unavailable(f"transformers {tf.__version__} EsmcConfig refuses ESM C's fields: {str(e).strip()[:200]}") from e
        if not cfg.scale_residue or cfg.rope_theta != 10000.0 or cfg.layer_norm_eps != 1e-5:
            raise Unavailable("EsmcModel fixes residue scaling, rotary theta 10000 and LayerNorm eps 1e-5; this config differs")
        m = _hf_build(tf.EsmcModel, hc, impl, device).to(dtype=dtype).eval()
        _strict_load(m, self._hf_sd(sd, cfg.hidden_size, cfg.intermediate_size), f"HF EsmcModel[{impl}]")
        _hf_check_impl(m, impl)
        return lambda ids, am: m(input_ids=ids, attention_mask=am)

    def port(self, cfg, sd, device, dtype):
        from .family_ports import esmc_port

        p = esmc_port(self.describe(cfg), sd, device=device, dtype=dtype)
        return lambda ids, am: p(ids, am)

    def flops(self, cfg, tokens):
        L, C, F_ = cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size
        per_tok = 2 * L * (4 * C * C + 3 * C * F_)
        return float(sum(per_tok * n + 4 * n * n * L * C for n in tokens))

    def checkpoint(self, cfg, sd, device, dtype):
        from ..models import ESMCForMaskedLM

        torch.manual_seed(0)
        with torch.device(device):
            m = ESMCForMaskedLM(copy.deepcopy(cfg))
        m = m.to(dtype=dtype).eval()
        _strict_load(m, {**sd, **{k: v for k, v in m.state_dict().items() if k.startswith("sequence_head.")}}, "ESMCForMaskedLM")
        return m


FAMILIES: dict[str, Family] = {f.name: f for f in (_ESM2(), _ESMC(), _Ankh(), _E1(), _DPLM())}


def get(name: str) -> Family:
    if name not in FAMILIES:
        raise KeyError(name)
    return FAMILIES[name]


def transformers_missing() -> bool:
    return importlib.util.find_spec("transformers") is None
