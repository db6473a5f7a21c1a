"""ANKH (Elnaggar et al. 2023; ElnaggarLab/ankh-base, ankh-large, ankh2-*) on anyattn: the T5
encoder those checkpoints carry, as a transformers ``PreTrainedModel`` (``model_type``
"anyattn_ankh", registered with AutoConfig / AutoModel on import of this module).

ANKH is an encoder-decoder T5 trained by span denoising; protein embeddings come from its
encoder, which is what this module implements (transformers' ``T5EncoderModel``). There is no
masked-LM head: the published LM head belongs to the decoder, which is not implemented.

Shape legend:
    B batch rows   S row length   C d_model   H heads   D d_kv (H * D may differ from C:
    ankh-large has C = 1536, H * D = 1024)   F d_ff   L layers   N relative-position buckets

One block (pre-norm; T5's LayerNorm is an RMS norm: no mean, no bias, float32 statistics)::

    h    = rms(x) * w
    q, k, v = h Wq^T, h Wk^T, h Wv^T             no biases, NOT scaled by D**-0.5 (T5 folds the
                                                 scale into its initialisation): scale=1.0
    o    = anyattn.attention(q, k, v, mask=<batch structure>, scale=1.0,
                             score=relative_bias(table, N, max_distance, bidirectional=True))
    x    = x + o Wo^T
    x    = x + (act(rms(x) Wi0^T) * (rms(x) Wi1^T)) Wo'^T     gated FFN; act = gelu_new (tanh
                                                 GELU; ANKH) or silu (ANKH2)

``table`` (H, N) is the relative-attention-bias embedding of block 0, shared by every block; the
bucket of key j seen from query i depends on j - i only, so packed rows (documents side by side)
give each sequence exactly its own biases. A final RMS norm ends the encoder.

Parameter names equal transformers' ``T5EncoderModel.state_dict()`` without the tied duplicate
``encoder.embed_tokens.weight``; a full ``T5ForConditionalGeneration`` checkpoint (ANKH's
published form) loads with its decoder and LM head dropped (:func:`map_ankh_keys`). Facts and
sources: docs/ankh.md.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import warnings
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

if importlib.util.find_spec("transformers") is None:
    raise ImportError("anyattn.models.ankh needs transformers: pip install 'anyattn[models]'")

from transformers import AutoConfig, AutoModel, PretrainedConfig, PreTrainedModel

from ..api import attention, attention_with_weights
from ..errors import bad_type, bad_value
from ..layout import SeqInfo
from ..spec import relative_bias
from ..packing import BatchPlan, plan_batch
from ._compile import LayerCompiler, check_compile_layers
from ._esmc_ankh_batch import norm_bound
from ._switches import AttnBackendSwitch, PackPaddedSwitch, backend_value
from ._inputs import check_input_ids, keep_mask
from .checkpoints import check_state_dict, is_ankh_config, read_weights, resolve_dtype, resolve_saved_backend, strict_from_pretrained

__all__ = [
    "ANKH_PRESETS",
    "AnkhConfig",
    "AnkhModel",
    "AnkhOutput",
    "build_ankh",
    "is_ankh_config",
    "load_ankh",
    "map_ankh_keys",
    "register_auto",
]

MODEL_TYPE = "anyattn_ankh"
ANKH_VOCAB_SIZE = 144  # ANKH / ANKH2 (ElnaggarLab config.json); hub.is_ankh_config keys on it


def _gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    # transformers' NewGELUActivation ("gelu_new"), written out as it computes it
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


_ACTS = {
    "gelu_new": _gelu_tanh,
    "gelu_pytorch_tanh": _gelu_tanh,
    "gelu": F.gelu,
    "silu": F.silu,
    "swish": F.silu,
    "relu": F.relu,
}


class AnkhConfig(PretrainedConfig):
    """ANKH (T5 encoder) hyper-parameters with T5Config's field names. Defaults are ankh-base's;
    presets: :data:`ANKH_PRESETS` / :meth:`from_name`."""

    model_type = MODEL_TYPE

    def __init__(
        self,
        vocab_size: int = ANKH_VOCAB_SIZE,
        d_model: int = 768,
        d_kv: int = 64,  # head dim; num_heads * d_kv is the attention width (not always d_model)
        d_ff: int = 3072,  # width of each of the two gated FFN projections
        num_layers: int = 48,
        num_heads: int = 12,
        relative_attention_num_buckets: int = 64,  # T5 bucketed relative positions (bidirectional)
        relative_attention_max_distance: int = 128,  # distances beyond share the last bucket
        layer_norm_epsilon: float = 1e-6,
        dense_act_fn: str = "gelu_new",  # gate activation: gelu_new (ANKH) or silu (ANKH2)
        dropout_rate: float = 0.0,  # training only (embeddings, attention, residual branches)
        initializer_factor: float = 1.0,  # random init scale, as T5
        pad_token_id: int = 0,
        eos_token_id: int = 1,
        attn_backend="auto",  # anyattn backend name, or a sequence of names
        # padded / multi-row batches run as one packed row: "auto" (when the chosen backend takes
        # packed documents natively; with the relative bias that is flex), True, False
        pack_padded="auto",
        # torch.compile the dense compute of every block: "auto" (for inference on CUDA, where it
        # is safe: plain blocks, triton present; compiled on the first forward), True, False
        compile_layers="auto",
        **kwargs,
    ):
        if dense_act_fn not in _ACTS:
            raise bad_value("dense_act_fn", f"one of {sorted(_ACTS)}", repr(dense_act_fn))
        if pack_padded not in ("auto", True, False):
            raise bad_value("pack_padded", "'auto', True or False", repr(pack_padded))
        check_compile_layers(compile_layers)
        kwargs.setdefault("tie_word_embeddings", False)
        kwargs.pop("is_encoder_decoder", None)
        self.vocab_size = vocab_size
        self.d_model = d_model
        self.d_kv = d_kv
        self.d_ff = d_ff
        self.num_layers = num_layers
        self.num_heads = num_heads
        self.relative_attention_num_buckets = relative_attention_num_buckets
        self.relative_attention_max_distance = relative_attention_max_distance
        self.layer_norm_epsilon = float(layer_norm_epsilon)
        self.dense_act_fn = dense_act_fn
        self.dropout_rate = float(dropout_rate or 0.0)
        self.initializer_factor = initializer_factor
        self.attn_backend = backend_value(attn_backend)
        self.pack_padded = pack_padded
        self.compile_layers = compile_layers
        super().__init__(pad_token_id=pad_token_id, eos_token_id=eos_token_id, is_encoder_decoder=False, **kwargs)

    @property
    def hidden_size(self) -> int:
        return self.d_model

    @property
    def num_hidden_layers(self) -> int:
        return self.num_layers

    @classmethod
    def from_name(cls, name: str, **overrides) -> AnkhConfig:
        """A published size: "ankh_base", "ankh_large", "ankh2_large" (also "ElnaggarLab/ankh-base" ...)."""
        key = name.split("/")[-1].lower().replace("-", "_")
        if key not in _PRESET_SHAPES:
            raise bad_value("name", f"one of {list(_PRESET_SHAPES)}", repr(name))
        return cls(**{**_PRESET_SHAPES[key], **overrides})

    @classmethod
    def from_config_dict(cls, raw: dict, **overrides) -> AnkhConfig:
        """From a T5 config.json with a gated FFN (ANKH's published files) or ours."""
        if not isinstance(raw, dict) or raw.get("model_type") not in ("t5", MODEL_TYPE):
            got = raw.get("model_type") if isinstance(raw, dict) else type(raw).__name__
            raise bad_value("config", "a T5 config.json (model_type 't5') or 'anyattn_ankh'", repr(got))
        keys = ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads", "relative_attention_num_buckets",
                "relative_attention_max_distance", "layer_norm_epsilon", "dropout_rate", "initializer_factor", "pad_token_id", "eos_token_id")  # fmt: skip
        kw = {k: raw[k] for k in keys if raw.get(k) is not None}
        if raw["model_type"] == MODEL_TYPE:
            kw.update({k: raw[k] for k in ("dense_act_fn", "attn_backend", "pack_padded", "compile_layers") if k in raw})
        else:
            proj = raw.get("feed_forward_proj", "relu")
            if not proj.startswith("gated-"):
                raise bad_value(
                    "config.json feed_forward_proj", "a gated FFN ('gated-gelu' or 'gated-silu', as ANKH)", repr(proj)
                )
            # as transformers' T5Config: the activation comes from feed_forward_proj (a saved
            # dense_act_fn is ignored), and "gated-gelu" means gelu_new, the tanh GELU
            kw["dense_act_fn"] = "gelu_new" if proj == "gated-gelu" else proj[len("gated-") :]
        kw.update(overrides)
        return cls(**kw)


# ElnaggarLab/ankh-base and ankh2-large config.json; ankh-large inferred from ankh2-large (docs/ankh.md):
# L, C, H, F, act. d_kv 64, 64 buckets, max distance 128 in all three.
_PRESET_SHAPES: dict[str, dict] = {
    name: dict(num_layers=L, d_model=C, num_heads=H, d_ff=F_, dense_act_fn=act)
    for name, (L, C, H, F_, act) in {
        "ankh_base": (48, 768, 12, 3072, "gelu_new"),
        "ankh_large": (48, 1536, 16, 3840, "gelu_new"),
        "ankh2_large": (48, 1536, 16, 3840, "silu"),
    }.items()
}
# name -> AnkhConfig (AnkhConfig.from_name gives a fresh copy to modify)
ANKH_PRESETS: dict[str, AnkhConfig] = {name: AnkhConfig(**kw) for name, kw in _PRESET_SHAPES.items()}


# ---------------------------------------------------------------------------------------------
# compute


def _rms(x, w, eps: float):
    """T5's LayerNorm: x / rms(x) * w, statistics in float32, no mean, no bias."""
    var = x.float().pow(2).mean(-1, keepdim=True)
    y = x * torch.rsqrt(var + eps)  # float32 (promoted), as transformers
    return w * y.to(w.dtype)


# pure functions: the dense compute of one block, parameters passed in (tensors and constants
# only), so that one torch.compile of each serves every block (see AnkhModel.compile_layers)


def _qkv(x_BSC, ln_w, eps: float, wq, wk, wv, H: int, D: int):
    """Pre-norm and the q, k, v projections (no bias, no scaling). Returns (B, S, H, D) each."""
    B, S, _ = x_BSC.shape
    h = _rms(x_BSC, ln_w, eps)
    return F.linear(h, wq).view(B, S, H, D), F.linear(h, wk).view(B, S, H, D), F.linear(h, wv).view(B, S, H, D)


def _out_ffn(o_BSI, x_BSC, w_o, p: float, training: bool, ln_w, eps: float, wi_0, wi_1, wo, act):
    """Output projection + residual, then pre-norm gated FFN + residual (I = H * D)."""
    x = x_BSC + F.dropout(F.linear(o_BSI, w_o), p, training)
    h = _rms(x, ln_w, eps)
    u = F.dropout(act(F.linear(h, wi_0)) * F.linear(h, wi_1), p, training)
    return x + F.dropout(F.linear(u.to(wo.dtype), wo), p, training)


class _RMSNorm(nn.Module):
    """T5's LayerNorm (:func:`_rms`)."""

    def __init__(self, C: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(C))
        self.variance_epsilon = eps

    def forward(self, x):
        return _rms(x, self.weight, self.variance_epsilon)


class _SelfAttention(nn.Module):
    def __init__(self, cfg: AnkhConfig, has_bias_table: bool):
        super().__init__()
        C, inner = cfg.d_model, cfg.num_heads * cfg.d_kv
        self.q, self.k, self.v = (nn.Linear(C, inner, bias=False) for _ in range(3))
        self.o = nn.Linear(inner, C, bias=False)
        if has_bias_table:  # block 0 only; every block uses it
            self.relative_attention_bias = nn.Embedding(cfg.relative_attention_num_buckets, cfg.num_heads)


class _AttnLayer(nn.Module):
    def __init__(self, cfg: AnkhConfig, first: bool):
        super().__init__()
        self.SelfAttention = _SelfAttention(cfg, first)
        self.layer_norm = _RMSNorm(cfg.d_model, cfg.layer_norm_epsilon)


class _Gated(nn.Module):
    def __init__(self, cfg: AnkhConfig):
        super().__init__()
        self.wi_0 = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.wi_1 = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.wo = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)


class _FFLayer(nn.Module):
    def __init__(self, cfg: AnkhConfig):
        super().__init__()
        self.DenseReluDense = _Gated(cfg)
        self.layer_norm = _RMSNorm(cfg.d_model, cfg.layer_norm_epsilon)


class AnkhBlock(nn.Module):
    def __init__(self, cfg: AnkhConfig, first: bool):
        super().__init__()
        self.layer = nn.ModuleList((_AttnLayer(cfg, first), _FFLayer(cfg)))
        self.num_heads, self.d_kv, self.p = cfg.num_heads, cfg.d_kv, cfg.dropout_rate
        self.act = _ACTS[cfg.dense_act_fn]

    def _plain(self) -> bool:
        """True when every projection and norm is the plain module (the layer functions read their
        weights); PEFT/LoRA and similar wrappers replace them: then the modules are called."""
        att, ff = self.layer
        sa, g = att.SelfAttention._modules, ff.DenseReluDense._modules
        lins = (sa["q"], sa["k"], sa["v"], sa["o"], g["wi_0"], g["wi_1"], g["wo"])
        return all(type(m) is nn.Linear for m in lins) and type(att.layer_norm) is _RMSNorm and type(ff.layer_norm) is _RMSNorm

    def forward(self, x_BSC, batch: BatchPlan, score, backend, fns, dynamic: bool, need_weights: bool, need_s_max: bool):
        """Returns (x, attention weights or None, s_max (H,) or None). ``fns``: the layer
        functions (:func:`_qkv`, :func:`_out_ffn`, plain or compiled); ``dynamic``: mark the token
        dimension dynamic for them."""
        att, ff = self.layer
        sa, p, train = att.SelfAttention, self.p, self.training
        B, S, _ = x_BSC.shape
        H, D = self.num_heads, self.d_kv
        plain = self._plain()
        if plain:
            if dynamic:  # compiled: one graph for every token count (packed batches vary)
                torch._dynamo.maybe_mark_dynamic(x_BSC, 1)
            ln = att.layer_norm
            q, k, v = fns[0](x_BSC, ln.weight, ln.variance_epsilon, sa.q.weight, sa.k.weight, sa.v.weight, H, D)
        else:
            h = att.layer_norm(x_BSC)
            q, k, v = (proj(h).view(B, S, H, D) for proj in (sa.q, sa.k, sa.v))
        s = norm_bound(q, k, batch.info, 1.0) if need_s_max else None  # bias not included
        qh, kh, vh = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, S, D) views
        w = None
        if need_weights:
            o, w = attention_with_weights(
                qh, kh, vh, mask=batch.mask, score=score, scale=1.0, dropout_p=p if train else 0.0
            )
        else:
            o = attention(
                qh, kh, vh, mask=batch.mask, score=score, scale=1.0, backend=backend, dropout_p=p if train else 0.0
            )
        o_BSI = o.transpose(1, 2).reshape(B, S, H * D)
        g = ff.DenseReluDense
        if plain:
            if dynamic:
                torch._dynamo.maybe_mark_dynamic(o_BSI, 1)
            ln = ff.layer_norm
            x = fns[1](o_BSI, x_BSC, sa.o.weight, p, train, ln.weight, ln.variance_epsilon, g.wi_0.weight, g.wi_1.weight, g.wo.weight, self.act)
            return x, w, s
        x = x_BSC + F.dropout(sa.o(o_BSI), p, train)
        h = ff.layer_norm(x)
        u = F.dropout(self.act(g.wi_0(h)) * g.wi_1(h), p, train)
        return x + F.dropout(g.wo(u.to(g.wo.weight.dtype)), p, train), w, s


class _Encoder(nn.Module):
    def __init__(self, cfg: AnkhConfig):
        super().__init__()
        self.block = nn.ModuleList(AnkhBlock(cfg, i == 0) for i in range(cfg.num_layers))
        self.final_layer_norm = _RMSNorm(cfg.d_model, cfg.layer_norm_epsilon)


class AnkhOutput(NamedTuple):
    """Every forward returns all four fields; the optional ones are None unless asked for."""

    last_hidden_state: torch.Tensor  # (B, S, C) after the final norm; zeros at padding
    # L + 1 tensors (B, S, C): embeddings, blocks 1..L-1, last_hidden_state (as T5EncoderModel)
    hidden_states: tuple | None
    attentions: tuple | None  # L tensors (B, H, S, S) float32 (output_attentions=True)
    # (L, H) float32: max over visible pairs of ||q_i|| * ||k_j|| (the bias is not included)
    s_max: torch.Tensor | None


class AnkhModel(AttnBackendSwitch, PackPaddedSwitch, PreTrainedModel):
    """ANKH's encoder (transformers' ``T5EncoderModel``) on anyattn. ``attn_backend`` switches
    every block at the next call."""

    config_class = AnkhConfig
    base_model_prefix = "ankh"  # no submodule has this name: keys sit at the top level, as T5EncoderModel's
    _no_split_modules = ["AnkhBlock"]
    supports_gradient_checkpointing = False
    # a full T5 checkpoint through from_pretrained: the decoder, its LM head and the tied copy of
    # the embeddings are not ours (load_ankh checks the copy equals shared.weight)
    _keys_to_ignore_on_load_unexpected = [r"^decoder\.", r"^lm_head\.", r"^encoder\.embed_tokens\.weight$"]

    def __init__(self, config: AnkhConfig):
        super().__init__(config)
        self.shared = nn.Embedding(config.vocab_size, config.d_model)
        self.encoder = _Encoder(config)
        # the block functions, plain and compiled (by compile_layers(), explicitly or on first use)
        self._compiler = LayerCompiler("ANKH", (_qkv, _out_ffn))
        self.post_init()

    def compile_layers(self, **compile_kwargs) -> None:
        """torch.compile the dense compute of every block (pre-norm + q/k/v projections, and
        output projection + gated FFN with their residuals), leaving the attention call (with its
        relative-position bias) and the batch structure outside. ``compile_kwargs`` go to
        ``torch.compile``.

        The two functions take tensors only, so one compile serves every block; the token
        dimension is marked dynamic, so packed batches of any token count reuse it. Sets
        ``config.compile_layers = True``; ``"auto"`` (the default) compiles on the first
        inference forward on CUDA (anyattn.models._compile)."""
        self._compiler.compile((_qkv, _out_ffn), compile_kwargs)
        self.config.compile_layers = True

    @torch.no_grad()
    def _init_weights(self, module):
        """Random weights like transformers' T5 initializer (scaled normal), unit norms."""
        f, C, H, D = self.config.initializer_factor, self.config.d_model, self.config.num_heads, self.config.d_kv
        if isinstance(module, _RMSNorm):
            module.weight.fill_(f)
        elif isinstance(module, nn.Embedding):
            module.weight.normal_(0.0, f * (1.0 if module is self.shared else C**-0.5))
        elif isinstance(module, _SelfAttention):
            module.q.weight.normal_(0.0, f * (C * D) ** -0.5)
            for lin in (module.k, module.v):
                lin.weight.normal_(0.0, f * C**-0.5)
            module.o.weight.normal_(0.0, f * (H * D) ** -0.5)
        elif isinstance(module, _Gated):
            module.wi_0.weight.normal_(0.0, f * C**-0.5)
            module.wi_1.weight.normal_(0.0, f * C**-0.5)
            module.wo.weight.normal_(0.0, f * self.config.d_ff**-0.5)

    def get_input_embeddings(self):
        return self.shared

    def set_input_embeddings(self, value):
        self.shared = value

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """transformers' ``from_pretrained``, strict (missing, unexpected or mis-shaped weights
        raise, naming them; the decoder of a full T5 checkpoint is skipped). ``strict=False``
        restores transformers' warnings. :func:`load_ankh` is the checked path for ANKH's files."""
        return strict_from_pretrained(super().from_pretrained, "AnkhModel", args, kwargs)

    def _score(self):
        cfg = self.config
        table = self.encoder.block[0].layer[0].SelfAttention.relative_attention_bias.weight.t()  # (H, N)
        return relative_bias(
            table, cfg.relative_attention_num_buckets, cfg.relative_attention_max_distance, bidirectional=True
        )

    def forward(
        self, input_ids=None, attention_mask=None, *, seq_info: SeqInfo | None = None, inputs_embeds=None,
        output_hidden_states: bool | None = False, output_attentions: bool | None = False, output_s_max: bool = False,
        return_dict: bool | None = None,
    ) -> AnkhOutput:  # fmt: skip
        """input_ids (B, S); ``attention_mask`` (B, S) 1 = real token (a padded batch), or
        ``seq_info`` (packed documents). Returns :class:`AnkhOutput` (``return_dict`` is accepted
        for HF callers; the result is always the same NamedTuple)."""
        if inputs_embeds is not None:
            raise bad_value("inputs_embeds", "None (AnkhModel takes input_ids)", "a tensor")
        cfg = self.config
        on_cpu = isinstance(input_ids, torch.Tensor) and input_ids.device.type == "cpu"
        check_input_ids(input_ids, cfg.vocab_size, check_range=on_cpu or attention_mask is not None)
        need_w = bool(output_attentions)
        score = self._score()  # one term per forward: every block shares the table (and its lowering)

        batch = plan_batch(
            input_ids, keep_mask(attention_mask, input_ids) if attention_mask is not None else None, seq_info,
            backend=cfg.attn_backend, pack=cfg.pack_padded, heads=cfg.num_heads, head_dim=cfg.d_kv,
            dtype=self.shared.weight.dtype, grad=torch.is_grad_enabled() and self.training, need_weights=need_w,
            pad_id=cfg.pad_token_id, scale=1.0, score=score,
        )  # fmt: skip
        if need_w:
            warnings.warn(
                f"ANKH: output_attentions=True runs this call through the eager path (anyattn.attention_with_weights); attn_backend stays {self.attn_backend!r}",
                stacklevel=2,
            )
        x = F.dropout(self.shared(batch.ids), cfg.dropout_rate, self.training)
        hidden = [x] if output_hidden_states else None
        attns, smax = ([] if need_w else None), ([] if output_s_max else None)
        x0 = x

        def run_layers(fns, dynamic):  # from scratch: the "auto" fallback may run it twice
            x = x0
            for acc in (hidden, attns, smax):
                if acc is not None:
                    del acc[1 if acc is hidden else 0 :]
            for block in self.encoder.block:
                x, w, s = block(x, batch, score, cfg.attn_backend, fns, dynamic, need_w, bool(output_s_max))
                for acc, val in ((hidden, x), (attns, w), (smax, s)):
                    if acc is not None:
                        acc.append(val)
            return x

        x = self._compiler.run(self, batch.ids.device, torch.is_grad_enabled() and self.training, run_layers, stacklevel=2)
        x = F.dropout(self.encoder.final_layer_norm(x), cfg.dropout_rate, self.training)
        if hidden is not None:
            hidden[-1] = x  # as T5EncoderModel: the last entry is after the final norm
        rows = batch.to_rows
        return AnkhOutput(
            rows(x), tuple(rows(h) for h in hidden) if hidden is not None else None,
            tuple(attns) if attns is not None else None, torch.stack(smax) if smax is not None else None,
        )  # fmt: skip


def register_auto() -> None:
    """Register AnkhConfig / AnkhModel with AutoConfig and AutoModel under model_type
    "anyattn_ankh" (idempotent; run on import)."""
    AutoConfig.register(MODEL_TYPE, AnkhConfig, exist_ok=True)
    AutoModel.register(AnkhConfig, AnkhModel, exist_ok=True)


register_auto()

# ---------------------------------------------------------------------------------------------
# checkpoints

_DECODER = ("decoder.", "lm_head.")  # a T5ForConditionalGeneration's parts that are not the encoder


def map_ankh_keys(state_dict: dict) -> dict:
    """ANKH checkpoint keys (transformers ``T5ForConditionalGeneration`` / ``T5EncoderModel``) ->
    ours: the decoder and LM head are dropped; ``encoder.embed_tokens.weight`` (the encoder's
    view of the shared embeddings) becomes ``shared.weight`` when that is absent, and must equal it
    when both are there. Other keys pass through for :func:`check_state_dict` to judge."""
    if not isinstance(state_dict, dict):
        raise bad_type("state_dict", "a dict of name -> tensor", type(state_dict).__name__)
    sd = {k: v for k, v in state_dict.items() if not k.startswith(_DECODER)}
    emb = sd.pop("encoder.embed_tokens.weight", None)
    if emb is not None:
        shared = sd.setdefault("shared.weight", emb)
        if shared is not emb and (shared.shape != emb.shape or not torch.equal(shared.cpu(), emb.cpu())):
            raise bad_value(
                "state_dict", "encoder.embed_tokens.weight equal to shared.weight (T5 ties them)", "different tensors"
            )
    return sd


def load_ankh_state_dict(model: AnkhModel, state_dict: dict) -> None:
    """Load an ANKH / T5 state dict into ``model`` strictly: unknown, missing or mis-shaped keys
    raise, listing every one. ``model`` may live on the meta device (tensors assigned)."""
    if not isinstance(model, AnkhModel):
        raise bad_type("model", "an AnkhModel", type(model).__name__)
    sd = map_ankh_keys(state_dict)
    check_state_dict(sd, model.state_dict(), expected="the encoder keys of a T5 / ANKH checkpoint for this config")
    meta = any(p.device.type == "meta" for p in model.parameters())
    model.load_state_dict(sd, strict=True, assign=meta)


def build_ankh(cfg: AnkhConfig, state_dict: dict, *, dtype=None, device=None) -> AnkhModel:
    """An AnkhModel holding exactly ``state_dict`` (strict), eval mode, built on the meta device
    (no random initialisation); float32 unless ``dtype``."""
    with torch.device("meta"):
        model = AnkhModel(cfg)
    load_ankh_state_dict(model, state_dict)
    model.eval()
    return model.to(device=device if device is not None else "cpu", dtype=dtype if dtype is not None else torch.float32)


def load_ankh(path, *, attn_backend=None, dtype=None, device=None, config: dict | None = None) -> AnkhModel:
    """ANKH's encoder from a local HF-format directory (a T5 config.json with a gated FFN, or
    ours, + safetensors or .bin; the full encoder-decoder checkpoint or an encoder-only re-save) or
    a hub id. Strict; eval mode; float32 unless ``dtype``. ``attn_backend`` None: the one our
    checkpoint saved, else "auto"."""
    dtype = resolve_dtype(dtype)
    if not isinstance(path, (str, os.PathLike)):
        raise bad_type("path", "a local directory or a hub id", type(path).__name__)
    path = os.fspath(path)
    if not os.path.isdir(path):
        from .checkpoints import download

        path = download(path)
    if config is None:
        cfg_file = os.path.join(path, "config.json")
        if not os.path.isfile(cfg_file):
            raise bad_value("path", "a directory with config.json", repr(path))
        with open(cfg_file) as f:
            config = json.load(f)
    if attn_backend is None and config.get("model_type") == MODEL_TYPE:
        attn_backend = config.get("attn_backend")  # what our save_pretrained wrote
    cfg = AnkhConfig.from_config_dict(config, attn_backend=resolve_saved_backend(config, attn_backend))
    model = build_ankh(cfg, read_weights(path), dtype=dtype, device=device)
    model.config._name_or_path = path
    return model
