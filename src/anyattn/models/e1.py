"""Profluent E1 (E1-150m / 300m / 600m) on anyattn: retrieval-augmented protein encoder.

Shape legend:
    B batch rows   S row length   C hidden size   H query heads   G kv heads   D head dim (C // H)
    T real tokens of the batch (packed)   N sequences of the batch   V vocabulary

A *sample* is one query protein with optional context (homologous) sequences before it, each
sequence written ``<bos> 1 R E S I D U E S 2 <eos>`` and concatenated, query last::

    sample:        [<bos>1 CTX-A 2<eos>][<bos>1 CTX-B 2<eos>][<bos>1 QUERY 2<eos>]
    sequence_ids:   0 0 0 ...         0  1 1 1 ...        1  2 2 2 ...       2
    within pos:     0 1 2 ...            0 1 2 ...           0 1 2 ...
    global pos:     0 1 2 ....................................................  (one count)

Two kinds of layers (``global_attention_every_n_layers = n``: layer i is global iff (i+1) % n == 0):

    within-sequence layer: key j visible from query i iff same sequence        (rope_theta_within_seq,
                           = anyattn.documents(every sequence of the batch)     within positions)
    global layer:          key j visible iff same sample and seq(j) <= seq(i)  (rope_theta_global,
                           = documents(samples) & block_causal(sequence index)  global positions)
                           (bidirectional inside a sequence; the query sees every context sequence,
                           context sequence k sees sequences 0..k only)

One layer (pre-RMSNorm, no biases)::

    x ──RMSNorm──> q,k,v = Linear(.)          (GQA: G kv heads, H query heads)
                   q,k,v = clamp(., -clip_qkv, clip_qkv)       (when clip_qkv is set)
                   q,k   = rotary(q,k)         float32 cos/sin, NeoX half-split rotation
                   o     = anyattn.attention(q, k, v, mask=<layer kind>, scale=D**-0.5)
    x = x + Linear(o)
    x = x + w2(silu(w1(RMSNorm(x))) * w3(RMSNorm(x)))          (gated_mlp; else w2(act(w1(.))))

Scale: E1 does *not* pre-scale q; its kernels apply the default 1/sqrt(D). We pass
``scale=D**-0.5`` explicitly on every backend (the same number everywhere, never applied twice).

Batch layout (chosen per forward from ``attn_backend``; both give the same numbers, and left,
right or mixed padding give the same numbers as no padding):

    packed  (default; flex, flash_torch, auto, any sequence naming a non-dense backend): the real
            tokens of all rows are gathered into one row (1, T) (``anyattn.unpad``); within layers
            documents(every sequence), global layers documents(samples) & block_causal(sequence
            index); no compute on padding; varlen kernels serve the within layers
    padded  (only eager / sdpa / cudnn requested: backends that materialize dense masks): the
            input rows (B, S); within layers same_segment(sequence index, -1 at padding), global
            layers same_segment(sample index) & block_causal(sequence index): (B, S, S) masks
            instead of one (T, T) mask for the whole batch

Parameter names equal the original checkpoint keys (Profluent-Bio/E1-*: ``model.embed_tokens``,
``model.embed_seq_id``, ``model.layers.{i}.norm_attn_norm.self_attn.{q,k,v,o}_proj``,
``model.layers.{i}.norm_attn_norm.{input,post_attention}_layernorm``, ``model.layers.{i}.ffn.mlp.
{w1,w2,w3}``, ``model.norm``, ``mlm_head.{0,2,3}``). See docs/e1.md for the sources.

transformers is imported here (the ``models`` extra); ``import anyattn`` never imports this module.
"""

from __future__ import annotations

import json
import os
import warnings
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModel, AutoModelForMaskedLM, PretrainedConfig, PreTrainedModel

from ..api import attention, attention_with_weights
from ..errors import bad_type, bad_value
from ..layout import SeqInfo
from ..resolve import check_backend
from ._inputs import check_input_ids, keep_mask
from ._switches import AttnBackendSwitch
from .e1_batch import E1Batch, _s_max, e1_batch_structure, runs_packed
from .e1_tokenizer import _ORIGINAL_MODEL_TYPES, E1_DEFAULT_VOCAB, MODEL_TYPE, E1Tokenizer, is_e1_config
from .checkpoints import check_state_dict, read_weights, resolve_saved_backend

__all__ = [
    "E1Config",
    "E1_PRESETS",
    "E1Model",
    "E1ForMaskedLM",
    "E1Output",
    "E1Tokenizer",
    "E1_DEFAULT_VOCAB",
    "e1_batch_structure",
    "is_e1_config",
    "load_e1",
    "load_e1_state_dict",
    "register_auto",
]



class E1Config(PretrainedConfig):
    """E1 hyper-parameters, with the original config.json field names, plus ``attn_backend``.

    Defaults are E1-300m's (Profluent-Bio/E1-300m config.json); presets: :data:`E1_PRESETS`.
    """

    model_type = MODEL_TYPE

    def __init__(
        self,
        vocab_size: int = 34,
        hidden_size: int = 1024,
        intermediate_size: int = 3072,
        gated_mlp: bool = True,  # w2(act(w1 x) * w3 x); False: w2(act(w1 x))
        num_hidden_layers: int = 20,
        num_attention_heads: int = 16,
        num_key_value_heads: int | None = 16,  # GQA when < num_attention_heads (None: = heads)
        hidden_act: str = "silu",  # the FFN activation (ACT2FN name)
        rms_norm_eps: float = 1e-5,  # also the eps of the LM head's LayerNorm, as the original
        initializer_range: float = 0.02,
        pad_token_id: int = 0,
        bos_token_id: int = 1,
        eos_token_id: int = 2,
        tie_word_embeddings: bool = False,
        # layer i is global (block-causal across the sample's sequences) iff (i+1) % n == 0;
        # 0 = every layer within-sequence
        global_attention_every_n_layers: int = 3,
        max_num_sequences: int = 512,  # rows of embed_seq_id: sequences per sample
        max_num_positions_within_seq: int = 8192,  # within-sequence positions must be below this
        max_num_positions_global: int = 65536,
        rope_theta_within_seq: float = 10000.0,
        rope_theta_global: float = 500000.0,
        clip_qkv: float | None = 8.0,  # clamp q, k, v to [-clip, clip] before rotary; None = off
        attn_backend="auto",  # anyattn backend name, or a sequence of names
        **kwargs,
    ):
        if num_key_value_heads is None:
            num_key_value_heads = num_attention_heads
        if hidden_size % num_attention_heads:
            raise bad_value("hidden_size", f"a multiple of num_attention_heads={num_attention_heads}", hidden_size)
        if num_attention_heads % num_key_value_heads:
            raise bad_value("num_key_value_heads", f"a divisor of num_attention_heads={num_attention_heads}", num_key_value_heads)
        if clip_qkv is not None and not clip_qkv > 0:
            raise bad_value("clip_qkv", "None or a positive number", clip_qkv)
        if global_attention_every_n_layers < 0:
            raise bad_value("global_attention_every_n_layers", "0 (none) or a positive int", global_attention_every_n_layers)
        if isinstance(attn_backend, list):
            attn_backend = tuple(attn_backend)  # JSON round trip gives a list
        check_backend(attn_backend)
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.gated_mlp = gated_mlp
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads
        self.hidden_act = hidden_act
        self.rms_norm_eps = rms_norm_eps
        self.initializer_range = initializer_range
        self.global_attention_every_n_layers = global_attention_every_n_layers
        self.max_num_sequences = max_num_sequences
        self.max_num_positions_within_seq = max_num_positions_within_seq
        self.max_num_positions_global = max_num_positions_global
        self.rope_theta_within_seq = float(rope_theta_within_seq)
        self.rope_theta_global = float(rope_theta_global)
        self.clip_qkv = clip_qkv
        self.attn_backend = attn_backend
        super().__init__(
            pad_token_id=pad_token_id, bos_token_id=bos_token_id, eos_token_id=eos_token_id,
            tie_word_embeddings=tie_word_embeddings, **kwargs,
        )  # fmt: skip

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def is_global_layer(self, i: int) -> bool:
        n = self.global_attention_every_n_layers
        return n > 0 and (i + 1) % n == 0

    @classmethod
    def from_original(cls, config: dict, **overrides) -> E1Config:
        """From the original E1 config.json dict (``model_type`` "E1"). Unknown extra fields of
        the original (gradient checkpointing flags, dtype, ...) are kept as attributes."""
        if not isinstance(config, dict):
            raise bad_type("config", "a dict (the original E1 config.json)", type(config).__name__)
        if not is_e1_config(config):
            types = _ORIGINAL_MODEL_TYPES + (MODEL_TYPE,)
            raise bad_value("config", f"an E1 config.json (model_type in {types})", repr(config.get("model_type")))
        d = {k: v for k, v in config.items() if k not in ("model_type", "architectures", "auto_map", "transformers_version")}
        if "torch_dtype" in d:
            d.setdefault("dtype", d.pop("torch_dtype"))
        d.update(overrides)
        return cls(**d)


# Profluent-Bio/E1-300m and E1-600m config.json (via Synthyra's mirrors and the hub commit history;
# docs/e1.md). E1-150m's config.json was not found: load it from its directory.
E1_PRESETS: dict[str, dict] = {
    "E1-300m": dict(
        hidden_size=1024, intermediate_size=3072, num_hidden_layers=20, num_attention_heads=16, num_key_value_heads=16
    ),
    "E1-600m": dict(
        hidden_size=1280, intermediate_size=3840, num_hidden_layers=30, num_attention_heads=20, num_key_value_heads=20
    ),
}


# ---------------------------------------------------------------------------------------------
# pure functions: the compute of one layer, parameters passed in


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _rope_cos_sin(positions_BS: torch.Tensor, theta: float, D: int):
    """cos, sin (B, S, 1, D) float32. inv_freq = theta ** -(2i/D), computed in float32 like E1."""
    inv_freq = theta ** -(torch.arange(0, D, 2, dtype=torch.float32, device=positions_BS.device) / D)
    angles = positions_BS.float()[..., None] * inv_freq
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos().unsqueeze(-2), angles.sin().unsqueeze(-2)


def _qkv(x_BSC, norm, q_proj, k_proj, v_proj, cos_BS1D, sin_BS1D, H: int, G: int, clip):
    """Pre-RMSNorm, projections, optional clamp, rotary in float32. Returns q (B,S,H,D), k, v (B,S,G,D).

    The projections are called as modules (not read as weights) so that adapters wrapping them
    (PEFT LoRA) take effect."""
    B, S, C = x_BSC.shape
    D = C // H
    h = norm(x_BSC)
    q = q_proj(h).view(B, S, H, D)
    k = k_proj(h).view(B, S, G, D)
    v = v_proj(h).view(B, S, G, D)
    if clip is not None:
        q, k, v = q.clamp(-clip, clip), k.clamp(-clip, clip), v.clamp(-clip, clip)
    qf, kf = q.float(), k.float()
    q = (qf * cos_BS1D + _rotate_half(qf) * sin_BS1D).to(x_BSC.dtype)
    k = (kf * cos_BS1D + _rotate_half(kf) * sin_BS1D).to(x_BSC.dtype)
    return q, k, v


def _out_ffn(o_BSC, x_BSC, o_proj, norm, w1, w2, w3, act):
    """Output projection + residual, then pre-RMSNorm (gated) FFN + residual."""
    x = x_BSC + o_proj(o_BSC)
    h = norm(x)
    a = act(w1(h))
    if w3 is not None:
        a = a * w3(h)
    return x + w2(a)


# ---------------------------------------------------------------------------------------------
# modules: containers named like the original, so that state_dict keys match


class _RMSNorm(nn.Module):
    def __init__(self, C: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(C))
        self.variance_epsilon = eps

    def forward(self, x):
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.variance_epsilon).to(x.dtype)


class _SelfAttn(nn.Module):
    def __init__(self, cfg: E1Config):
        super().__init__()
        C, H, G, D = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_proj = nn.Linear(C, H * D, bias=False)
        self.k_proj = nn.Linear(C, G * D, bias=False)
        self.v_proj = nn.Linear(C, G * D, bias=False)
        self.o_proj = nn.Linear(H * D, C, bias=False)


class _NormAttnNorm(nn.Module):
    def __init__(self, cfg: E1Config):
        super().__init__()
        self.self_attn = _SelfAttn(cfg)
        self.input_layernorm = _RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = _RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class _MLP(nn.Module):
    def __init__(self, cfg: E1Config):
        super().__init__()
        self.w1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.w2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)
        self.w3 = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False) if cfg.gated_mlp else None


class _FFN(nn.Module):
    def __init__(self, cfg: E1Config):
        super().__init__()
        self.mlp = _MLP(cfg)


def _act(name: str):
    from transformers.activations import ACT2FN

    if name not in ACT2FN:
        raise bad_value("hidden_act", f"one of transformers' ACT2FN names, e.g. {['silu', 'gelu', 'relu']}", repr(name))
    return ACT2FN[name]


class E1Layer(nn.Module):
    def __init__(self, cfg: E1Config, index: int):
        super().__init__()
        self.cfg = cfg
        self.is_global = cfg.is_global_layer(index)
        self.norm_attn_norm = _NormAttnNorm(cfg)
        self.ffn = _FFN(cfg)
        self._act = _act(cfg.hidden_act)

    def forward(self, x_BSC, cos, sin, mask, backend, need_weights: bool = False, need_s_max: bool = False, batch=None):
        """x (B, S, C): the packed row (1, T, C) or the padded rows; ``mask`` for that layout."""
        cfg, na = self.cfg, self.norm_attn_norm
        sa = na.self_attn
        H, G, D = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        B, S, C = x_BSC.shape
        q, k, v = _qkv(x_BSC, na.input_layernorm, sa.q_proj, sa.k_proj, sa.v_proj, cos, sin, H, G, cfg.clip_qkv)
        # (B, S, H, D) memory, (B, H, S, D) views: the layout anyattn takes (DESIGN.md section 4)
        q4, k4, v4 = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        scale = D**-0.5
        weights = None
        if need_weights:
            o, weights = attention_with_weights(q4, k4, v4, mask=mask, scale=scale)
        else:
            o = attention(q4, k4, v4, mask=mask, scale=scale, backend=backend)
        s_max = _s_max(batch.tokens(q), batch.tokens(k), self.is_global, batch, scale) if need_s_max else None
        mlp = self.ffn.mlp
        o_BSC = o.transpose(1, 2).reshape(B, S, C)
        x = _out_ffn(o_BSC, x_BSC, sa.o_proj, na.post_attention_layernorm, mlp.w1, mlp.w2, mlp.w3, self._act)
        return x, weights, s_max


class E1Output(NamedTuple):
    """Every forward returns all five fields; the optional ones are None unless asked for."""

    logits: torch.Tensor | None  # (B, S, V) float32 (as the original); None from E1Model
    last_hidden_state: torch.Tensor  # (B, S, C), after the final RMSNorm; zeros at padding
    hidden_states: tuple | None  # L + 1 tensors (B, S, C): embeddings, layers 1..L-1, last_hidden_state
    attentions: tuple | None  # L tensors (B, H, S, S) float32, weights among a row's tokens
    s_max: torch.Tensor | None  # (L, H) float32: per layer, per head max of scale*||q_i||*||k_j||


class E1PreTrainedModel(AttnBackendSwitch, PreTrainedModel):
    config_class = E1Config
    base_model_prefix = "model"
    _no_split_modules = ["E1Layer"]
    supports_gradient_checkpointing = False

    @torch.no_grad()
    def _init_weights(self, module):
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            module.weight.normal_(0.0, std)
            if module.bias is not None:
                module.bias.zero_()
        elif isinstance(module, nn.Embedding):
            module.weight.normal_(0.0, std)
            if module.padding_idx is not None:
                module.weight[module.padding_idx].zero_()
        elif isinstance(module, (_RMSNorm, nn.LayerNorm)):
            module.weight.fill_(1.0)
            if getattr(module, "bias", None) is not None:
                module.bias.zero_()


class E1Model(E1PreTrainedModel):
    """The encoder: embeddings (+ sequence-index embedding), L layers, final RMSNorm."""

    def __init__(self, config: E1Config):
        super().__init__(config)
        C = config.hidden_size
        self.embed_tokens = nn.Embedding(config.vocab_size, C, padding_idx=config.pad_token_id)
        self.embed_seq_id = nn.Embedding(config.max_num_sequences, C)
        self.layers = nn.ModuleList(E1Layer(config, i) for i in range(config.num_hidden_layers))
        self.norm = _RMSNorm(C, config.rms_norm_eps)
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def forward(
        self, input_ids, attention_mask=None, *, seq_info: SeqInfo | None = None, sequence_ids=None,
        within_seq_position_ids=None, global_position_ids=None, output_hidden_states: bool = False,
        output_attentions: bool = False, output_s_max: bool = False, **kwargs,
    ) -> E1Output:  # fmt: skip
        """input_ids (B, S) in the E1 format (see :class:`E1Tokenizer`); ``attention_mask`` (B, S)
        1 = real token (a padded batch, one sample per row), or ``seq_info`` (packed rows, one
        document per sample). Returns :class:`E1Output` with ``logits=None``."""
        if kwargs:
            raise bad_value("forward", "no other keyword arguments", sorted(kwargs))
        cfg = self.config
        if isinstance(input_ids, torch.Tensor):
            check_input_ids(input_ids, cfg.vocab_size, check_range=input_ids.device.type == "cpu" or attention_mask is not None)
        b = e1_batch_structure(
            input_ids, attention_mask, seq_info=seq_info, sequence_ids=sequence_ids,
            within_seq_position_ids=within_seq_position_ids, global_position_ids=global_position_ids,
            bos_token_id=cfg.bos_token_id, packed=runs_packed(cfg.attn_backend),
        )  # fmt: skip
        self._check_limits(b)
        if isinstance(within_seq_position_ids, torch.Tensor) and within_seq_position_ids.shape == input_ids.shape:
            self._check_positions(within_seq_position_ids, attention_mask, seq_info, input_ids)
        if output_attentions:
            warnings.warn(
                "E1: output_attentions=True runs this call's attention through the eager path "
                f"(anyattn.attention_with_weights); attn_backend stays {self.attn_backend!r}",
                stacklevel=2,
            )
        x = self.embed_tokens(b.layout(input_ids)) + self.embed_seq_id(b.seq_ids)
        x = x.to(self.layers[0].norm_attn_norm.self_attn.q_proj.weight.dtype if len(self.layers) else x.dtype)
        D = cfg.head_dim
        rope_w = _rope_cos_sin(b.within_pos, cfg.rope_theta_within_seq, D)
        rope_g = _rope_cos_sin(b.global_pos, cfg.rope_theta_global, D)
        hidden = [x] if output_hidden_states else None
        attns = [] if output_attentions else None
        smax = [] if output_s_max else None
        backend = cfg.attn_backend
        for layer in self.layers:
            cos, sin = rope_g if layer.is_global else rope_w
            mask = b.global_mask if layer.is_global else b.within_mask
            x, w, s = layer(x, cos, sin, mask, backend, output_attentions, output_s_max, b)
            if hidden is not None:
                hidden.append(x)
            if attns is not None:
                attns.append(b.weights_to_rows(w))
            if smax is not None:
                smax.append(s)
        x = self.norm(x)
        if hidden is not None:
            hidden[-1] = x  # as the original: the last entry is after the final norm
            hidden = tuple(b.to_rows(h) for h in hidden)
        return E1Output(
            None, b.to_rows(x), hidden, tuple(attns) if attns is not None else None,
            torch.stack(smax) if smax is not None else None,
        )  # fmt: skip

    def _check_positions(self, pos, attention_mask, seq_info, input_ids) -> None:
        """Explicit within-sequence positions of real tokens must lie in [0, max_num_positions_within_seq)
        (the original asserts it; rotary itself would take any position). One host read."""
        keep = keep_mask(attention_mask, input_ids) if attention_mask is not None else seq_info.keep.to(pos.device) if seq_info is not None else None
        real = pos if keep is None else pos[keep]
        if real.numel():
            lo, hi = (int(v) for v in torch.aminmax(real))
            n = self.config.max_num_positions_within_seq
            if lo < 0 or hi >= n:
                raise bad_value("within_seq_position_ids", f"positions of real tokens in [0, max_num_positions_within_seq={n})", f"{lo}..{hi}")

    def _check_limits(self, b: E1Batch) -> None:
        cfg = self.config
        if b.sample_nseq and max(b.sample_nseq) > cfg.max_num_sequences:
            raise bad_value(
                "input_ids", f"at most max_num_sequences={cfg.max_num_sequences} sequences per sample", max(b.sample_nseq)
            )
        if b.seq_lengths and max(b.seq_lengths) > cfg.max_num_positions_within_seq:
            raise bad_value(
                "input_ids", f"sequences of at most max_num_positions_within_seq={cfg.max_num_positions_within_seq} tokens",
                f"a sequence of {max(b.seq_lengths)}",
            )  # fmt: skip


class E1ForMaskedLM(E1PreTrainedModel):
    """E1 with its masked-LM head; ``state_dict()`` keys equal the original checkpoint's."""

    def __init__(self, config: E1Config):
        super().__init__(config)
        self.model = E1Model(config)
        C = config.hidden_size
        self.mlm_head = nn.Sequential(
            nn.Linear(C, C, bias=True),
            nn.GELU(),
            nn.LayerNorm(C, eps=config.rms_norm_eps),
            nn.Linear(C, config.vocab_size, bias=True),
        )
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def forward(
        self, input_ids, attention_mask=None, *, seq_info: SeqInfo | None = None, sequence_ids=None,
        within_seq_position_ids=None, global_position_ids=None, output_hidden_states: bool = False,
        output_attentions: bool = False, output_s_max: bool = False, **kwargs,
    ) -> E1Output:  # fmt: skip
        out = self.model(
            input_ids, attention_mask, seq_info=seq_info, sequence_ids=sequence_ids,
            within_seq_position_ids=within_seq_position_ids, global_position_ids=global_position_ids,
            output_hidden_states=output_hidden_states, output_attentions=output_attentions,
            output_s_max=output_s_max, **kwargs,
        )  # fmt: skip
        return out._replace(logits=self.mlm_head(out.last_hidden_state).float())


# ---------------------------------------------------------------------------------------------
# Auto classes


def register_auto() -> None:
    """Register E1Config / E1Model / E1ForMaskedLM with transformers' Auto classes (idempotent)."""
    AutoConfig.register(MODEL_TYPE, E1Config, exist_ok=True)
    AutoModel.register(E1Config, E1Model, exist_ok=True)
    AutoModelForMaskedLM.register(E1Config, E1ForMaskedLM, exist_ok=True)


register_auto()


# ---------------------------------------------------------------------------------------------
# loading original checkpoints


def load_e1_state_dict(model: E1ForMaskedLM, state_dict: dict) -> None:
    """Load an original E1 checkpoint's state dict (keys as Profluent-Bio/E1-*) into ``model``.

    Keys saved from an ``E1Model`` (no ``model.`` prefix) get the prefix; the LM head must then be
    present anyway. Refuses unknown, missing or mis-shaped keys, listing every one: nothing is
    silently left at its random initialisation. (The original's rotary tables are non-persistent
    buffers, so no rotary key exists in a checkpoint.)"""
    if not isinstance(model, E1ForMaskedLM):
        raise bad_type("model", "an E1ForMaskedLM", type(model).__name__)
    sd = dict(state_dict)
    if sd and not any(k.startswith("model.") for k in sd) and any(k.startswith("embed_tokens.") for k in sd):
        sd = {(k if k.startswith("mlm_head.") else f"model.{k}"): v for k, v in sd.items()}
    ours = model.state_dict()
    check_state_dict(sd, ours, expected="the keys of an original E1ForMaskedLM checkpoint for this config")
    model.load_state_dict(sd, strict=True)


def load_e1(path: str, *, attn_backend=None, dtype=None, device=None) -> E1ForMaskedLM:
    """An E1ForMaskedLM from a local directory in the original format (config.json with
    ``model_type`` "E1" + model.safetensors or pytorch_model*.bin), or one written by our
    ``save_pretrained``. Evaluation mode; ``dtype``/``device`` applied after loading.
    ``attn_backend`` None: the one an anyattn checkpoint saved, else "auto"."""
    if not isinstance(path, (str, os.PathLike)) or not os.path.isdir(path):
        raise bad_value("path", "a local directory with config.json and *.safetensors / pytorch_model*.bin", repr(path))
    with open(os.path.join(path, "config.json")) as f:
        raw = json.load(f)
    if not is_e1_config(raw):
        types = _ORIGINAL_MODEL_TYPES + (MODEL_TYPE,)
        raise bad_value("config.json", f"an E1 config (model_type in {types})", repr(raw.get("model_type")))
    cfg = E1Config.from_original(raw, attn_backend=resolve_saved_backend(raw, attn_backend))
    model = E1ForMaskedLM(cfg)
    load_e1_state_dict(model, read_weights(path))
    model.config._name_or_path = os.fspath(path)  # where load_tokenizer(model) finds tokenizer.json (HF's convention)
    model.eval()
    if dtype is not None or device is not None:
        model.to(device=device, dtype=dtype)
    return model
