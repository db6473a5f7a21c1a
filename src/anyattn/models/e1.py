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
from transformers import AutoConfig, AutoModel, AutoModelForMaskedLM, PreTrainedModel

from ..api import attention, attention_with_weights
from ..errors import bad_type, bad_value
from ..layout import SeqInfo
from ._compile import LayerCompiler
from ._inputs import check_input_ids, keep_mask
from ._switches import AttnBackendSwitch
from .e1_batch import E1Batch, _s_max, e1_batch_structure, runs_packed
from .e1_config import E1_PRESETS, E1Config
from .e1_tokenizer import _ORIGINAL_MODEL_TYPES, E1_DEFAULT_VOCAB, MODEL_TYPE, E1Tokenizer, is_e1_config
from .checkpoints import check_state_dict, read_weights, resolve_saved_backend, strict_from_pretrained

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


# ---------------------------------------------------------------------------------------------
# pure functions: the compute of one layer, parameters passed in (tensors and constants only), so
# that one torch.compile of each serves every layer and every batch (E1Model.compile_layers)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _rope_cos_sin(positions_BS: torch.Tensor, theta: float, D: int):
    """cos, sin (B, S, 1, D) float32. inv_freq = theta ** -(2i/D), computed in float32 like E1."""
    inv_freq = theta ** -(torch.arange(0, D, 2, dtype=torch.float32, device=positions_BS.device) / D)
    angles = positions_BS.float()[..., None] * inv_freq
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos().unsqueeze(-2), angles.sin().unsqueeze(-2)


def _rms(x, w, eps: float):
    return F.rms_norm(x, (x.shape[-1],), w, eps).to(x.dtype)


def _clip_rope(q_BSHD, k_BSGD, v_BSGD, cos_BS1D, sin_BS1D, clip):
    """Optional clamp of q, k, v, then rotary of q, k in float32, cast back to the projections'
    dtype (the residual stream's, or autocast's: q, k and v then share it)."""
    q, k, v = q_BSHD, k_BSGD, v_BSGD
    dtype = v.dtype
    if clip is not None:
        q, k, v = q.clamp(-clip, clip), k.clamp(-clip, clip), v.clamp(-clip, clip)
    qf, kf = q.float(), k.float()
    q = (qf * cos_BS1D + _rotate_half(qf) * sin_BS1D).to(dtype)
    k = (kf * cos_BS1D + _rotate_half(kf) * sin_BS1D).to(dtype)
    return q, k, v


def _qkv(x_BSC, norm_w, eps: float, wq, wk, wv, cos_BS1D, sin_BS1D, H: int, G: int, clip):
    """Pre-RMSNorm, projections, optional clamp, rotary in float32. Returns q (B,S,H,D), k, v (B,S,G,D)."""
    B, S, C = x_BSC.shape
    D = C // H
    h = _rms(x_BSC, norm_w, eps)
    q, k, v = F.linear(h, wq).view(B, S, H, D), F.linear(h, wk).view(B, S, G, D), F.linear(h, wv).view(B, S, G, D)
    return _clip_rope(q, k, v, cos_BS1D, sin_BS1D, clip)


def _out_ffn(o_BSC, x_BSC, w_o, norm_w, eps: float, w1, w2, w3, act):
    """Output projection + residual, then pre-RMSNorm (gated; ``w3`` None: not) FFN + residual."""
    x = x_BSC + F.linear(o_BSC, w_o)
    h = _rms(x, norm_w, eps)
    a = act(F.linear(h, w1))
    if w3 is not None:
        a = a * F.linear(h, w3)
    return x + F.linear(a, w2)


# ---------------------------------------------------------------------------------------------
# modules: containers named like the original, so that state_dict keys match


class _RMSNorm(nn.Module):
    def __init__(self, C: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(C))
        self.variance_epsilon = eps

    def forward(self, x):
        return _rms(x, self.weight, self.variance_epsilon)


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
    def __init__(self, cfg: E1Config, index: int, act: nn.Module | None = None):
        super().__init__()
        self.cfg = cfg
        self.is_global = cfg.is_global_layer(index)
        self.norm_attn_norm = _NormAttnNorm(cfg)
        self.ffn = _FFN(cfg)
        # E1Model gives every layer the same activation object: the compiled layer functions take
        # it as an argument, and one object keeps them at one graph for all layers
        self._act = act if act is not None else _act(cfg.hidden_act)

    def _plain(self) -> bool:
        """True when every projection and norm is the plain module (the layer functions read their
        weights); PEFT/LoRA and similar wrappers replace them: then the modules are called, so
        that their extra terms apply."""
        na, mlp = self.norm_attn_norm._modules, self.ffn.mlp._modules
        sa = na["self_attn"]._modules
        lins = (sa["q_proj"], sa["k_proj"], sa["v_proj"], sa["o_proj"], mlp["w1"], mlp["w2"]) + ((mlp["w3"],) if mlp["w3"] is not None else ())
        norms = (na["input_layernorm"], na["post_attention_layernorm"])
        return all(type(m) is nn.Linear for m in lins) and all(type(m) is _RMSNorm for m in norms)

    def forward(
        self, x_BSC, cos, sin, mask, backend, need_weights: bool = False, need_s_max: bool = False, batch=None,
        fns=None, dynamic: bool = False,
    ):  # fmt: skip
        """x (B, S, C): the packed row (1, T, C) or the padded rows; ``mask`` for that layout.
        ``fns``: the layer functions (:func:`_qkv`, :func:`_out_ffn`, plain or compiled; None:
        plain); ``dynamic``: mark the token dimension dynamic for them."""
        cfg, na = self.cfg, self.norm_attn_norm
        sa = na.self_attn
        H, G, D = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        B, S, C = x_BSC.shape
        plain = self._plain()
        fns = fns or (_qkv, _out_ffn)
        if plain:
            if dynamic:  # compiled: one graph for every token count (packed batches vary)
                for t in (x_BSC, cos, sin):
                    torch._dynamo.maybe_mark_dynamic(t, 1)
            ln = na.input_layernorm
            q, k, v = fns[0](
                x_BSC, ln.weight, ln.variance_epsilon, sa.q_proj.weight, sa.k_proj.weight, sa.v_proj.weight, cos, sin,
                H, G, cfg.clip_qkv,
            )  # fmt: skip
        else:  # modules called (PEFT LoRA and other wrappers take effect)
            h = na.input_layernorm(x_BSC)
            q, k, v = sa.q_proj(h).view(B, S, H, D), sa.k_proj(h).view(B, S, G, D), sa.v_proj(h).view(B, S, G, D)
            q, k, v = _clip_rope(q, k, v, cos, sin, cfg.clip_qkv)
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
        if plain:
            if dynamic:
                torch._dynamo.maybe_mark_dynamic(o_BSC, 1)
            w3 = mlp.w3.weight if mlp.w3 is not None else None
            ln = na.post_attention_layernorm
            x = fns[1](o_BSC, x_BSC, sa.o_proj.weight, ln.weight, ln.variance_epsilon, mlp.w1.weight, mlp.w2.weight, w3, self._act)
            return x, weights, s_max
        h = na.post_attention_layernorm(x := x_BSC + sa.o_proj(o_BSC))
        a = self._act(mlp.w1(h))
        if mlp.w3 is not None:
            a = a * mlp.w3(h)
        return x + mlp.w2(a), weights, s_max


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

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """transformers' ``from_pretrained``, strict: missing, unexpected or mis-shaped weights
        raise, naming them. ``strict=False`` restores transformers' warnings. :func:`load_e1` is
        the checked path for E1's own files."""
        return strict_from_pretrained(super().from_pretrained, cls.__name__, args, kwargs)

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

    # the encoder alone may come from a masked-LM checkpoint: its head is not ours to load
    _keys_to_ignore_on_load_unexpected = [r"^mlm_head\."]

    def __init__(self, config: E1Config):
        super().__init__(config)
        C = config.hidden_size
        self.embed_tokens = nn.Embedding(config.vocab_size, C, padding_idx=config.pad_token_id)
        self.embed_seq_id = nn.Embedding(config.max_num_sequences, C)
        act = _act(config.hidden_act)
        self.layers = nn.ModuleList(E1Layer(config, i, act) for i in range(config.num_hidden_layers))
        self.norm = _RMSNorm(C, config.rms_norm_eps)
        # the layer functions, plain and compiled (by compile_layers(), explicitly or on first use)
        self._compiler = LayerCompiler("E1", (_qkv, _out_ffn))
        self.post_init()

    def compile_layers(self, **compile_kwargs) -> None:
        """torch.compile the dense compute of every layer (pre-RMSNorm + projections + clamp +
        rotary, and output projection + FFN with their residuals), leaving the attention call and
        the batch structure (samples, sequences, their masks) outside. ``compile_kwargs`` go to
        ``torch.compile``.

        The two functions take tensors only, so one compile serves every layer, within-sequence
        and global alike; the token dimension is marked dynamic, so packed batches of any token
        count reuse it. Sets ``config.compile_layers = True``; ``"auto"`` (the default) compiles
        on the first inference forward on CUDA (anyattn.models._compile)."""
        self._compiler.compile((_qkv, _out_ffn), compile_kwargs)
        self.config.compile_layers = True

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
            if seq_info is None and sequence_ids is None and input_ids.dim() == 2 and (
                    input_ids.numel() == 0 or (isinstance(attention_mask, torch.Tensor) and attention_mask.shape == input_ids.shape
                                               and attention_mask.device.type == "cpu" and not bool(attention_mask.any()))):  # fmt: skip
                raise bad_value(
                    "input_ids", "at least one real token (E1 samples: <bos> 1 ... 2 <eos>; an empty batch or one of "
                    "padding only has no sample)", f"shape {tuple(input_ids.shape)}" + ("" if input_ids.numel() == 0 else ", all padding"),
                )  # fmt: skip
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
        backend, x0 = cfg.attn_backend, x

        def run_layers(fns, dynamic):  # from scratch: the "auto" fallback may run it twice
            x = x0
            for acc in (hidden, attns, smax):
                if acc is not None:
                    del acc[1 if acc is hidden else 0 :]
            for layer in self.layers:
                cos, sin = rope_g if layer.is_global else rope_w
                mask = b.global_mask if layer.is_global else b.within_mask
                x, w, s = layer(x, cos, sin, mask, backend, output_attentions, output_s_max, b, fns, dynamic)
                for acc, val in ((hidden, x), (attns, w), (smax, s)):
                    if acc is not None:
                        acc.append(b.weights_to_rows(val) if acc is attns else val)
            return x

        grad = torch.is_grad_enabled() and self.training
        x = self.norm(self._compiler.run(self, x.device, grad, run_layers, stacklevel=2))
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

    def compile_layers(self, **kwargs) -> None:
        """See :meth:`E1Model.compile_layers`."""
        self.model.compile_layers(**kwargs)

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
