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
    e1      E1Model                    none (transformers has no E1)   none                    last hidden state
    dplm    DPLMForMaskedLM            EsmForMaskedLM (DPLM's network) none (= ESM2's port)    logits

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

__all__ = ["FAMILIES", "Family", "Unavailable", "get"]


class Unavailable(Exception):
    """A row that cannot run here (no such model in this transformers, no port written)."""


def _transformers():
    import transformers

    return transformers


def _strict_load(model, sd: dict, what: str, *, ignore=(), assign=False) -> None:
    sd = {k: v for k, v in sd.items() if not k.startswith(ignore)}
    res = model.load_state_dict(sd, strict=False, assign=assign)
    missing = [k for k in res.missing_keys if not k.endswith("inv_freq")]
    if missing or res.unexpected_keys:
        raise ValueError(f"{what}: the run's weights do not fit: missing {missing[:5]}, unexpected {res.unexpected_keys[:5]}")


def _hf_check_impl(hf, impl: str) -> None:
    got = str(getattr(hf.config, "_attn_implementation", "?"))
    if got != impl:
        raise RuntimeError(f"transformers chose attn_implementation={got!r}, not {impl!r}")


def _hf_build(cls, config, impl: str, device):
    """``cls._from_config(config, attn_implementation=impl)``; transformers refusing the
    implementation for this class (ValueError / ImportError at construction) is Unavailable."""
    try:
        with torch.device(device):
            return cls._from_config(config, attn_implementation=impl)
    except (ValueError, ImportError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise Unavailable(f"transformers {_transformers().__version__} {cls.__name__} refuses attn_implementation={impl!r}: {msg[:200]}") from e


def _tf32_off():
    """Context: float32 matmuls without TF32 (the float32 reference)."""

    class _Ctx:
        def __enter__(self):
            self.saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False

        def __exit__(self, *exc):
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = self.saved

    return _Ctx()


class Family:
    """One family's adapter. Subclasses fill in the hooks; ``cfg`` is the anyattn config object."""

    name = ""
    presets: tuple = ()
    default_preset = ""
    hf_name = ""  # what the HF row runs, for the notes
    mask_id: int | None = None  # a <mask> token put into the check batch (token dropout paths)
    output_name = "last hidden state"
    flop_formula = ""

    # -- shapes and tokens
    def config(self, preset: str):
        raise NotImplementedError

    def quick_config(self):
        raise NotImplementedError

    def describe(self, cfg) -> dict:
        return cfg.to_dict() if hasattr(cfg, "to_dict") else dict(vars(cfg))

    @property
    def pad_id(self) -> int:
        raise NotImplementedError

    def encode(self, seq: str) -> list[int]:
        raise NotImplementedError

    def residues(self, n_tokens: int) -> slice:
        """Where the residues sit in a sequence of ``n_tokens`` tokens (for pooled checks)."""
        return slice(1, n_tokens - 1)

    # -- weights and models
    def template(self, cfg, device, dtype, seed: int) -> dict:
        raise NotImplementedError

    def anyattn(self, cfg, sd: dict, device, dtype, **config):
        raise NotImplementedError

    def output(self, model_out):
        return model_out.last_hidden_state

    def call_anyattn(self, model):
        return lambda x: model(x[0], attention_mask=x[1])

    def hf(self, cfg, sd: dict, device, dtype, impl: str):
        """A callable ``(input_ids, attention_mask) -> model output`` of HF's model."""
        raise Unavailable(f"transformers has no {self.name} model")

    def hf_output(self, out):
        return out.last_hidden_state

    def port(self, cfg, sd: dict, device, dtype):
        """A callable ``(input_ids, attention_mask) -> output tensor``."""
        raise Unavailable(f"no FastPLMs-style port of {self.name} is written here")

    def reference32(self, cfg, sd: dict, device):
        """(kind, description, callable x -> output tensor) of the float32 reference: HF eager
        ("hf"), else the port ("port"), else anyattn's own eager backend ("anyattn": not an
        independent reference). Call it with TF32 off."""
        sd32 = {k: v.float() for k, v in sd.items()}
        try:
            try:
                hf = self.hf(cfg, sd32, device, torch.float32, "eager")
            except Unavailable:
                raise
            except Exception as e:  # noqa: BLE001 - this transformers' model cannot be built here: fall back
                raise Unavailable(f"HF {self.hf_name} could not be built: {type(e).__name__}: {str(e).strip()[:200]}") from e
            return "hf", f"HF {self.hf_name} eager, float32, TF32 off", (lambda x: self.hf_output(hf(*x)))
        except Unavailable as why_hf:
            try:
                p = self.port(cfg, sd32, device, torch.float32)
                return "port", f"the sdpa port in float32, TF32 off (no HF row: {why_hf})", (lambda x: p(*x))
            except Unavailable as why_port:
                m = self.anyattn(cfg, sd32, device, torch.float32, attn_backend="eager")
                call = self.call_anyattn(m)
                what = (f"anyattn's own model on the eager backend, float32, TF32 off: NOT an independent reference "
                        f"(no HF row: {why_hf}; no port: {why_port})")  # fmt: skip
                return "anyattn", what, (lambda x: self.output(call(x)))

    def flops(self, cfg, tokens) -> float:
        raise NotImplementedError


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
        raise Unavailable("no E1 port is written here (its multi-sequence layout needs its own masks): anyattn rows only")

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
        raise Unavailable("DPLM is ESM2's network: its port is the ESM2 one (bench model --family esm2)")

    def flops(self, cfg, tokens):
        from ..models import esm2_flops

        return float(esm2_flops(cfg, tokens))

    def checkpoint(self, cfg, sd, device, dtype):
        return self.anyattn(cfg, sd, device, dtype)


FAMILIES: dict[str, Family] = {f.name: f for f in (_ESM2(), _ESMC(), _Ankh(), _E1(), _DPLM())}


def get(name: str) -> Family:
    if name not in FAMILIES:
        raise KeyError(name)
    return FAMILIES[name]


def transformers_missing() -> bool:
    return importlib.util.find_spec("transformers") is None
