"""The families of ``anyattn bench model --family`` beyond ESM2 and ESM C: ANKH, E1, DPLM
(see ``families.py``)."""

from __future__ import annotations

import copy

import torch

from .family_base import Family, Unavailable, _hf_build, _hf_check_impl, _strict_load, _transformers

# ---------------------------------------------------------------------------------------------
# ANKH

# stand-in ids of the 20 residues (anyattn ships no ANKH tokenizer: see the module docstring)
_ANKH_IDS = {aa: 3 + i for i, aa in enumerate("LAGVSERTIDPKQNFYMHWC")}
_ANKH_UNK = 2


class _Ankh(Family):
    name = "ankh"
    presets = ("ankh_base", "ankh_large", "ankh2_large")
    default_preset = "ankh_base"
    hf_name = "T5EncoderModel"
    flop_formula = "per sequence of n tokens: 2*n*L*(4*C*A + 3*C*F) + 4*n^2*L*A, A = heads*d_kv (encoder)"

    def config(self, preset):
        from ..models import AnkhConfig

        return AnkhConfig.from_name(preset)

    def quick_config(self):
        from ..models import AnkhConfig

        return AnkhConfig(d_model=48, d_kv=16, num_heads=2, d_ff=40, num_layers=2, relative_attention_num_buckets=16,
                          relative_attention_max_distance=20)  # fmt: skip

    def describe(self, cfg):
        keys = ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads", "relative_attention_num_buckets",
                "relative_attention_max_distance", "layer_norm_epsilon", "dense_act_fn", "pad_token_id", "eos_token_id")  # fmt: skip
        return {k: getattr(cfg, k) for k in keys}

    @property
    def pad_id(self):
        return 0

    def encode(self, seq):
        return [_ANKH_IDS.get(c, _ANKH_UNK) for c in seq] + [1]  # residues, </s>

    def residues(self, n_tokens):
        return slice(0, n_tokens - 1)

    def _t5_config(self, cfg):
        tf = _transformers()
        act = {"gelu_new": "gated-gelu", "silu": "gated-silu"}.get(cfg.dense_act_fn)
        if act is None:
            raise Unavailable(f"T5Config has no gated FFN with {cfg.dense_act_fn!r}")
        return tf.T5Config(vocab_size=cfg.vocab_size, d_model=cfg.d_model, d_kv=cfg.d_kv, d_ff=cfg.d_ff,
                           num_layers=cfg.num_layers, num_heads=cfg.num_heads,
                           relative_attention_num_buckets=cfg.relative_attention_num_buckets,
                           relative_attention_max_distance=cfg.relative_attention_max_distance,
                           layer_norm_epsilon=cfg.layer_norm_epsilon, feed_forward_proj=act, dropout_rate=0.0,
                           is_encoder_decoder=False, use_cache=False, pad_token_id=cfg.pad_token_id,
                           eos_token_id=cfg.eos_token_id)  # fmt: skip

    def template(self, cfg, device, dtype, seed):
        """transformers' T5 initializer (the reference's), T5EncoderModel names without the tied
        ``encoder.embed_tokens.weight``."""
        tf = _transformers()
        torch.manual_seed(seed)
        with torch.device(device):
            m = tf.T5EncoderModel._from_config(self._t5_config(cfg), attn_implementation="eager")
        sd = {k: v.detach().to(dtype) for k, v in m.state_dict().items() if k != "encoder.embed_tokens.weight"}
        del m
        return sd

    def anyattn(self, cfg, sd, device, dtype, **config):
        from ..models import build_ankh

        mcfg = copy.deepcopy(cfg)
        for k, v in config.items():
            setattr(mcfg, k, v)
        return build_ankh(mcfg, sd, dtype=dtype, device=device)

    def hf(self, cfg, sd, device, dtype, impl):
        tf = _transformers()
        m = _hf_build(tf.T5EncoderModel, self._t5_config(cfg), impl, device).to(dtype=dtype).eval()
        _strict_load(m, {**sd, "encoder.embed_tokens.weight": sd["shared.weight"]}, f"HF T5EncoderModel[{impl}]")
        _hf_check_impl(m, impl)
        return lambda ids, am: m(input_ids=ids, attention_mask=am)

    def port(self, cfg, sd, device, dtype):
        from .family_ports import ankh_port

        p = ankh_port(self.describe(cfg), sd, device=device, dtype=dtype)
        return lambda ids, am: p(ids, am)

    def flops(self, cfg, tokens):
        L, C, F_, A = cfg.num_layers, cfg.d_model, cfg.d_ff, cfg.num_heads * cfg.d_kv
        per_tok = 2 * L * (4 * C * A + 3 * C * F_)
        return float(sum(per_tok * n + 4 * n * n * L * A for n in tokens))

    def checkpoint(self, cfg, sd, device, dtype):
        return self.anyattn(cfg, sd, device, dtype)


# ---------------------------------------------------------------------------------------------
# E1


class _E1(Family):
    name = "e1"
    presets = ("E1-300m", "E1-600m")
    default_preset = "E1-300m"
    flop_formula = ("per sequence of n tokens: 2*n*L*(2*C*H*D + 2*C*G*D + 3*C*F) + 4*n^2*L*H*D "
                    "(single-sequence samples: every layer sees the whole sequence)")  # fmt: skip

    def config(self, preset):
        from ..models import E1_PRESETS, E1Config

        if preset not in E1_PRESETS:
            raise ValueError(f"one of {list(E1_PRESETS)}, not {preset!r}")
        return E1Config(**E1_PRESETS[preset])

    def quick_config(self):
        from ..models import E1Config

        return E1Config(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                        max_num_sequences=8, max_num_positions_within_seq=1024, max_num_positions_global=4096)  # fmt: skip

    @property
    def pad_id(self):
        return 0

    def encode(self, seq):
        from ..models import E1Tokenizer

        return E1Tokenizer().encode(seq)["input_ids"]

    def residues(self, n_tokens):
        return slice(2, n_tokens - 2)

    def template(self, cfg, device, dtype, seed):
        from ..models import E1Model

        torch.manual_seed(seed)
        with torch.device(device):
            m = E1Model(copy.deepcopy(cfg))
        sd = {k: v.detach().to(dtype) for k, v in m.state_dict().items()}
        del m
        return sd

    def anyattn(self, cfg, sd, device, dtype, **config):
        from ..models import E1Model

        mcfg = copy.deepcopy(cfg)
        for k, v in config.items():
            setattr(mcfg, k, v)
        with torch.device("meta"):
            m = E1Model(mcfg)
        _strict_load(m, sd, "anyattn E1Model", assign=True)
        return m.to(device=device, dtype=dtype).eval()

    def hf(self, cfg, sd, device, dtype, impl):
        tf = _transformers()
        raise Unavailable(f"transformers {tf.__version__} has no E1 model")

    def port(self, cfg, sd, device, dtype):
        from .family_ports import e1_port

        p = e1_port(cfg.to_dict(), sd, device=device, dtype=dtype)  # single-sequence samples, as the benchmark's
        return lambda ids, am: p(ids, am)

    def flops(self, cfg, tokens):
        L, C, F_ = cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size
        H, G, D = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        per_tok = 2 * L * (2 * C * H * D + 2 * C * G * D + (3 if cfg.gated_mlp else 2) * C * F_)
        return float(sum(per_tok * n + 4 * n * n * L * H * D for n in tokens))

    def checkpoint(self, cfg, sd, device, dtype):
        from ..models import E1ForMaskedLM

        torch.manual_seed(0)
        with torch.device(device):
            m = E1ForMaskedLM(copy.deepcopy(cfg))
        m = m.to(dtype=dtype).eval()
        _strict_load(m.model, sd, "E1ForMaskedLM.model")
        return m


# ---------------------------------------------------------------------------------------------
# DPLM

_DPLM_SHAPES = {"dplm_150m": "esm2_t30_150M", "dplm_650m": "esm2_t33_650M", "dplm_3b": "esm2_t36_3B"}


class _DPLM(Family):
    name = "dplm"
    presets = tuple(_DPLM_SHAPES)
    default_preset = "dplm_150m"
    hf_name = "EsmForMaskedLM"
    mask_id = 32
    output_name = "logits"
    flop_formula = "per sequence of n tokens: 2*n*L*(4*C^2 + 2*C*F) + 4*n^2*L*C (encoder; the LM head is not counted)"

    def _cfg(self, esm2_cfg):
        from ..models.dplm import dplm_config_to_esm2

        return dplm_config_to_esm2({**esm2_cfg.to_hf_dict(), "model_type": "esm", "dplm_type": "dplm_esm"})

    def config(self, preset):
        from ..models import ESM2Config

        if preset not in _DPLM_SHAPES:
            raise ValueError(f"one of {list(_DPLM_SHAPES)}, not {preset!r}")
        return self._cfg(ESM2Config.from_name(_DPLM_SHAPES[preset]))

    def quick_config(self):
        from ..models import ESM2Config

        return self._cfg(ESM2Config(vocab_size=33, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256))

    def describe(self, cfg):
        return {**cfg.to_hf_dict(), "dplm_type": getattr(cfg, "dplm_type", None)}

    @property
    def pad_id(self):
        return 1

    def encode(self, seq):
        from ..models import ProteinTokenizer

        return ProteinTokenizer.esm().encode(seq)

    def template(self, cfg, device, dtype, seed):
        tf = _transformers()
        torch.manual_seed(seed)
        with torch.device(device):
            m = tf.EsmForMaskedLM._from_config(tf.EsmConfig(**cfg.to_hf_dict()), attn_implementation="eager")
        sd = {k: v.detach().to(dtype) for k, v in m.state_dict().items() if not k.endswith("inv_freq")}
        del m
        return sd

    def anyattn(self, cfg, sd, device, dtype, **config):
        from ..models import DPLMForMaskedLM, load_hf_state_dict

        mcfg = copy.deepcopy(cfg)
        for k, v in config.items():
            setattr(mcfg, k, v)
        with torch.device("meta"):
            m = DPLMForMaskedLM(mcfg)
        load_hf_state_dict(m, dict(sd))
        return m.to(device=device, dtype=dtype).eval()

    def output(self, model_out):
        return model_out.logits

    def hf(self, cfg, sd, device, dtype, impl):
        tf = _transformers()
        m = _hf_build(tf.EsmForMaskedLM, tf.EsmConfig(**cfg.to_hf_dict()), impl, device).to(dtype=dtype).eval()
        _strict_load(m, sd, f"HF EsmForMaskedLM[{impl}]")
        _hf_check_impl(m, impl)
        return lambda ids, am: m(input_ids=ids, attention_mask=am)

    def hf_output(self, out):
        return out.logits

    def port(self, cfg, sd, device, dtype):
        from .family_ports import dplm_port

        p = dplm_port(cfg.to_hf_dict(), sd, device=device, dtype=dtype)
        return lambda ids, am: p(ids, am)

    def flops(self, cfg, tokens):
        from ..models import esm2_flops

        return float(esm2_flops(cfg, tokens))

    def checkpoint(self, cfg, sd, device, dtype):
        return self.anyattn(cfg, sd, device, dtype)
