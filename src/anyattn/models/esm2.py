"""ESM2 (Lin et al. 2023) on anyattn: HF transformers' ``EsmForMaskedLM`` with rotary positions,
as transformers ``PreTrainedModel`` s (``model_type`` "anyattn_esm2", registered with the Auto
classes on import of this module).

Shape legend:
    B batch rows   S row length   C hidden size   H heads   D head dim (C // H)   F FFN size
    T real tokens of the batch   V vocabulary   L layers

One layer (pre-LayerNorm)::

    x ──LN──> q,k,v = Linear(.)          q *= D**-0.5   (BEFORE rotary, as ESM does)
              q,k   = rotary(q,k)        float32 cos/sin, positions restart at 0 per sequence
              o     = anyattn.attention(q, k, v, mask=<batch structure>, scale=1.0)
    x = x + Linear(o)
    x = x + Linear(gelu(Linear(LN(x))))          (erf GELU, exactly ESM's)

Because q is pre-scaled, every backend is called with ``scale=1.0`` (DESIGN.md section 4; a port
that double-scaled on its flash path lost all agreement).

Batch structure, built once per forward and shared by every layer::

    input_ids (B, S)                            -> dense: every row is one sequence
    input_ids (B, S) + attention_mask (B, S)    -> SeqInfo.from_padding_mask (one host read)
    input_ids (B, S) + seq_info (SeqInfo)       -> packed documents (or padding) as given

    then, with padding or several rows:
      backend takes packed documents (flash_torch, flex, flash, kernels_flash; for "auto" the
      backend auto would choose), and ``pack_padded`` is "auto" or True:
          the real tokens are gathered into ONE row (1, T) of documents; embeddings, every layer
          and the LM head run on T tokens only; outputs are scattered back to (B, S), zeros at
          padding. (A packed row's tail padding is not computed either.)
      otherwise: anyattn.padding(info) / documents(info) on (B, S) (dense-mask backends: eager,
          sdpa, cudnn), padding rows computed and their values unspecified.

Rotary positions come from the SeqInfo (position inside each sequence). For right padding (HF's
convention for ESM) this equals HF's ``arange(S)``; for left padding HF shifts the positions of
the real tokens and we do not: our output does not depend on where the padding is.

Parameter names equal HF's ``EsmForMaskedLM.state_dict()`` keys (transformers 5.x layout, with
one ``esm.rotary_embeddings.inv_freq``); checkpoints written by transformers 4.x that store one
``inv_freq`` per layer load too (the first one is kept, as HF's own load hook does).

transformers is imported here (the ``models`` extra); ``import anyattn.models`` does not import
this module until an ESM2 name is used.
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
    raise ImportError("anyattn.models.esm2 needs transformers: pip install 'anyattn[models]'")

from transformers import AutoConfig, AutoModel, AutoModelForMaskedLM, PretrainedConfig, PreTrainedModel  # noqa: E402

from ..api import attention, attention_with_weights  # noqa: E402
from ..errors import bad_type, bad_value  # noqa: E402
from ..layout import SeqInfo  # noqa: E402
from ..packing import BatchPlan, plan_batch  # noqa: E402
from ..resolve import check_backend  # noqa: E402
from ._inputs import check_input_ids, keep_mask  # noqa: E402
from .hub import check_state_dict, is_esm2_config, read_weights, resolve_saved_backend  # noqa: E402

__all__ = [
    "ESM2Config",
    "ESM2_PRESETS",
    "ESM2Model",
    "ESM2ForMaskedLM",
    "ESM2Output",
    "build_esm2",
    "esm2_flops",
    "is_esm2_config",
    "load_esm2",
    "load_hf_state_dict",
    "register_auto",
]

MODEL_TYPE = "anyattn_esm2"

# ESM's token dropout: during training 15% of tokens were selected and 80% of those masked, with
# the <mask> embedding zeroed. At inference the embeddings are rescaled by
# (1 - 0.12) / (1 - observed mask ratio of the sequence), like dropout's eval-time scaling.
_MASK_RATIO_TRAIN = 0.15 * 0.8

class ESM2Config(PretrainedConfig):
    """ESM2 hyper-parameters with HF ``EsmConfig`` field names, plus ``attn_backend`` and
    ``pack_padded``. Defaults are ESM2-650M's; presets: :data:`ESM2_PRESETS`."""

    model_type = MODEL_TYPE

    def __init__(
        self,
        vocab_size: int = 33,
        hidden_size: int = 1280,
        num_hidden_layers: int = 33,
        num_attention_heads: int = 20,
        intermediate_size: int = 5120,
        max_position_embeddings: int = 1026,  # 1024 residues + <cls> + <eos>
        layer_norm_eps: float = 1e-5,
        pad_token_id: int = 1,
        mask_token_id: int = 32,
        # zero the <mask> embeddings and rescale by (1 - 0.12) / (1 - observed mask ratio)
        token_dropout: bool = True,
        # a LayerNorm right after the embeddings (ESM-1b: True; ESM2: False)
        emb_layer_norm_before: bool = False,
        rope_theta: float = 10000.0,
        # lm_head.decoder.weight is the word embedding matrix (ESM2 checkpoints: True)
        tie_word_embeddings: bool = True,
        hidden_dropout_prob: float = 0.0,  # training only
        attention_probs_dropout_prob: float = 0.0,  # training only
        initializer_range: float = 0.02,  # random init: normal(0, this)
        attn_backend="auto",  # anyattn backend name, or a sequence of names
        # padded / multi-row batches run as one packed row: "auto" (when the backend takes
        # packed documents natively), True (always, also on dense-mask backends), False (never)
        pack_padded="auto",
        vocab_list: list | None = None,  # the tokens in id order, when not the ESM alphabet
        **kwargs,
    ):
        pos = kwargs.pop("position_embedding_type", "rotary")
        if pos != "rotary":
            raise bad_value("position_embedding_type", "'rotary' (ESM2; ESM-1b's absolute positions are not implemented)", repr(pos))
        if kwargs.pop("is_folding_model", False):
            raise bad_value("is_folding_model", "False (ESMFold is not implemented)", True)
        if kwargs.get("is_decoder", False):
            raise bad_value("is_decoder", "False (ESM2 is bidirectional)", True)
        kwargs.pop("esmfold_config", None)
        if hidden_size % num_attention_heads:
            raise bad_value("hidden_size", f"a multiple of num_attention_heads={num_attention_heads}", hidden_size)
        if isinstance(attn_backend, list):
            attn_backend = tuple(attn_backend)  # a JSON round trip gives a list
        check_backend(attn_backend)
        if pack_padded not in ("auto", True, False):
            raise bad_value("pack_padded", "'auto', True or False", repr(pack_padded))
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.intermediate_size = intermediate_size
        self.max_position_embeddings = max_position_embeddings
        self.layer_norm_eps = layer_norm_eps
        self.mask_token_id = mask_token_id
        self.token_dropout = bool(token_dropout)
        self.emb_layer_norm_before = bool(emb_layer_norm_before)
        self.rope_theta = float(rope_theta)
        self.hidden_dropout_prob = float(hidden_dropout_prob or 0.0)
        self.attention_probs_dropout_prob = float(attention_probs_dropout_prob or 0.0)
        self.initializer_range = initializer_range
        self.attn_backend = attn_backend
        self.pack_padded = pack_padded
        self.vocab_list = list(vocab_list) if vocab_list is not None else None
        super().__init__(pad_token_id=pad_token_id, tie_word_embeddings=tie_word_embeddings, **kwargs)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_name(cls, name: str, **overrides) -> ESM2Config:
        """A published size by name ("esm2_t33_650M", also "facebook/esm2_t33_650M_UR50D"): a new
        config each call."""
        key = name.split("/")[-1].removesuffix("_UR50D")
        if key not in _PRESET_SHAPES:
            raise bad_value("name", f"one of {list(_PRESET_SHAPES)}", repr(name))
        return cls(**{**_PRESET_SHAPES[key], **overrides})

    @classmethod
    def from_hf_config(cls, hf_config, **overrides) -> ESM2Config:
        """From a transformers ``EsmConfig`` (or its dict / config.json), or one of ours. Only
        rotary ESM (ESM2) is supported; ESM-1b's absolute positions and ESMFold are refused."""
        get = hf_config.get if isinstance(hf_config, dict) else lambda k, d=None: getattr(hf_config, k, d)
        pos = get("position_embedding_type", "absolute" if get("model_type") == "esm" else "rotary")
        if pos != "rotary":
            raise bad_value("hf_config.position_embedding_type", "'rotary' (ESM2)", repr(pos))
        if get("is_folding_model", False):
            raise bad_value("hf_config.is_folding_model", "False (ESMFold is not implemented)", True)
        if get("is_decoder", False):
            raise bad_value("hf_config.is_decoder", "False (ESM2 is bidirectional)", True)
        theta = get("rope_theta", None)
        if theta is None:  # transformers 5.x may carry it in rope_parameters
            theta = (get("rope_parameters", None) or {}).get("rope_theta", 10000.0)
        tie = get("tie_word_embeddings", True)
        kw = dict(
            vocab_size=get("vocab_size"), hidden_size=get("hidden_size"), num_hidden_layers=get("num_hidden_layers"),
            num_attention_heads=get("num_attention_heads"), intermediate_size=get("intermediate_size"),
            max_position_embeddings=get("max_position_embeddings", 1026), layer_norm_eps=get("layer_norm_eps", 1e-12),
            pad_token_id=get("pad_token_id", 1), mask_token_id=get("mask_token_id", 32),
            token_dropout=bool(get("token_dropout", False)), emb_layer_norm_before=bool(get("emb_layer_norm_before", False)),
            rope_theta=float(theta), tie_word_embeddings=True if tie is None else bool(tie),
            hidden_dropout_prob=float(get("hidden_dropout_prob", 0.0) or 0.0),
            attention_probs_dropout_prob=float(get("attention_probs_dropout_prob", 0.0) or 0.0),
            initializer_range=float(get("initializer_range", 0.02) or 0.02), vocab_list=get("vocab_list", None),
        )  # fmt: skip
        if get("model_type") == MODEL_TYPE:
            kw.update(attn_backend=get("attn_backend", "auto"), pack_padded=get("pack_padded", "auto"))
        missing = [k for k, v in kw.items() if v is None and k != "vocab_list"]
        if missing:
            raise bad_value("hf_config", "an ESM config with " + ", ".join(missing), "no value for them")
        kw.update(overrides)
        return cls(**kw)

    def to_hf_dict(self) -> dict:
        """Keyword arguments for ``transformers.EsmConfig(**d)`` describing the same network."""
        keys = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                "max_position_embeddings", "layer_norm_eps", "pad_token_id", "mask_token_id", "token_dropout",
                "emb_layer_norm_before", "rope_theta", "tie_word_embeddings", "hidden_dropout_prob",
                "attention_probs_dropout_prob", "initializer_range")  # fmt: skip
        d = {k: getattr(self, k) for k in keys}
        d.update(position_embedding_type="rotary", is_folding_model=False)
        return d


# facebook/esm2_*_UR50D (Lin et al. 2023, table S1; the hub config.json files): layers, hidden, heads
_PRESET_SHAPES: dict[str, dict] = {
    name: dict(num_hidden_layers=L, hidden_size=C, num_attention_heads=H, intermediate_size=4 * C)
    for name, (L, C, H) in {
        "esm2_t6_8M": (6, 320, 20), "esm2_t12_35M": (12, 480, 20), "esm2_t30_150M": (30, 640, 20),
        "esm2_t33_650M": (33, 1280, 20), "esm2_t36_3B": (36, 2560, 40), "esm2_t48_15B": (48, 5120, 40),
    }.items()  # fmt: skip
}
# name -> ESM2Config (ESM2Config.from_name gives a fresh copy to modify)
ESM2_PRESETS: dict[str, ESM2Config] = {name: ESM2Config(**kw) for name, kw in _PRESET_SHAPES.items()}


def esm2_flops(cfg: ESM2Config, lengths) -> int:
    """Forward FLOPs of the encoder (no LM head) over sequences of these lengths.

    Per sequence of length n::

        matmuls:    2 * n * L * (4*C*C + 2*C*F)      (q, k, v, o projections and the FFN)
        attention:  4 * n * n * L * C                (q k^T and p v over the visible pairs, H*D = C)

    Embeddings, LayerNorms, rotary and softmax are left out (DESIGN.md section 7). For the
    650M shape this is ~1.30 GFLOP per token plus ~0.08 for attention at ESM lengths.
    """
    L, C, F_ = cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size
    per_tok = 2 * L * (4 * C * C + 2 * C * F_)
    return sum(per_tok * n + 4 * n * n * L * C for n in lengths)


# ---------------------------------------------------------------------------------------------
# pure functions: the compute of one layer, parameters passed in. They see tensors (and a few
# constant Python numbers) only, so one torch.compile of each serves every layer and every batch
# (see ESM2Model.compile_layers).


def _gelu(x: torch.Tensor) -> torch.Tensor:
    # ESM's erf GELU, written out: F.gelu differs in the last bits and HF keeps this form.
    return x * 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0)))


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _rope(q_BSHD, k_BSHD, cos_BS1D, sin_BS1D):
    """Rotary in float32 (HF computes cos/sin and the rotation in float32 too), cast back."""
    dtype = q_BSHD.dtype
    qf, kf = q_BSHD.float(), k_BSHD.float()
    q = (qf * cos_BS1D + _rotate_half(qf) * sin_BS1D).to(dtype)
    k = (kf * cos_BS1D + _rotate_half(kf) * sin_BS1D).to(dtype)
    return q, k


def _qkv(h_BSC, wq, bq, wk, bk, wv, bv, cos_BS1D, sin_BS1D, H: int):
    """Projections of the pre-LN'd input, q *= D**-0.5, rotary in float32. Returns q, k, v as
    (B, S, H, D)."""
    B, S, C = h_BSC.shape
    D = C // H
    q = F.linear(h_BSC, wq, bq).view(B, S, H, D) * D**-0.5
    k = F.linear(h_BSC, wk, bk).view(B, S, H, D)
    v = F.linear(h_BSC, wv, bv).view(B, S, H, D)
    q, k = _rope(q, k, cos_BS1D, sin_BS1D)
    return q, k, v


def _qkv_fused(h_BSC, wq, bq, wk, bk, wv, bv, cos_BS1D, sin_BS1D, H: int):
    """:func:`_qkv` with one (3C, C) projection instead of three (C, C) ones: one matmul with a
    3x wider output (the concatenated weight is rebuilt each call: 3*C*C elements, cheap next to
    the activations)."""
    B, S, C = h_BSC.shape
    D = C // H
    qkv = F.linear(h_BSC, torch.cat((wq, wk, wv)), torch.cat((bq, bk, bv)))
    q, k, v = qkv.view(B, S, 3, H, D).unbind(2)
    q, k = _rope(q * D**-0.5, k, cos_BS1D, sin_BS1D)
    return q, k, v.contiguous()


def _out_ffn(o_BSC, x_BSC, wo, bo, ln_w, ln_b, eps: float, w1, b1, w2, b2, p: float, training: bool, next_w, next_b, next_eps: float):
    """Output projection + residual, pre-LN FFN + residual, then the LayerNorm that comes next
    (the next layer's attention LayerNorm, or the encoder's final one). Returns the residual
    stream x and that LayerNorm of it: computing both here lets a compiled graph write them in one
    pass (the residual add and the next LayerNorm fuse) instead of two kernels across the layer
    boundary."""
    x = F.dropout(F.linear(o_BSC, wo, bo), p, training) + x_BSC
    h = F.layer_norm(x, (x.shape[-1],), ln_w, ln_b, eps)
    h = F.linear(_gelu(F.linear(h, w1, b1)), w2, b2)
    x = F.dropout(h, p, training) + x
    return x, F.layer_norm(x, (x.shape[-1],), next_w, next_b, next_eps)


def _mask_ratio(is_mask_BS, info: SeqInfo | None, row_lengths_B=None) -> torch.Tensor:
    """(B, S, 1) float32: for ESM's token dropout, the share of <mask> tokens among the real tokens
    of each token's sequence (a padded row, or a document of ``info``; without ``info`` a row of
    ``row_lengths_B`` tokens, default S). The caller rescales by (1 - 0.15 * 0.8) / (1 - ratio).

    Where HF divides by zero the ratio is 0 instead, so that nothing non-finite appears (in a
    packed row one NaN reaches every other sequence through the attention's p @ v, 0 * NaN = NaN):
    padding tokens and empty sequences, and a sequence made only of <mask> tokens (HF returns NaN
    for it; its embeddings are all zero, and stay zero)."""
    B, S = is_mask_BS.shape
    if info is None:
        n = torch.full((B,), S, dtype=torch.float32, device=is_mask_BS.device) if row_lengths_B is None else row_lengths_B.float()
        ratio = (is_mask_BS.sum(-1).float() / n.clamp_min(1))[:, None].expand(B, S)
    else:
        doc = info.doc_ids.long()
        ids = doc.clamp_min(0).reshape(-1)
        counts = torch.zeros(info.num_docs, device=is_mask_BS.device, dtype=torch.float32)
        counts.index_add_(0, ids, (is_mask_BS & info.keep).reshape(-1).float())
        lens = (info.cu_seqlens[1:] - info.cu_seqlens[:-1]).float().clamp_min(1)
        ratio = (counts / lens)[ids].view(B, S).masked_fill(doc < 0, 0.0)
    return ratio.masked_fill(ratio >= 1, 0.0).unsqueeze(-1)


def _s_max(q_BSHD, k_BSHD, info: SeqInfo | None) -> torch.Tensor:
    """(H,) float32: max over visible (i, j) pairs of ||q_i|| * ||k_j|| (q as given to attention:
    pre-scaled, rotated). Visible = same sequence (row, or document of ``info``), real tokens."""
    qn = q_BSHD.float().norm(dim=-1)  # (B, S, H)
    kn = k_BSHD.float().norm(dim=-1)
    B, S, H = qn.shape
    if info is None:  # every row one sequence
        return (qn.amax(1) * kn.amax(1)).amax(0)
    ids = info.doc_ids.reshape(-1).long()
    real = (ids >= 0)[:, None]
    ids = ids.clamp_min(0)[:, None].expand(-1, H)
    # norms are >= 0, so 0 is neutral for max: padding tokens (and empty documents) drop out
    qd = torch.zeros(info.num_docs, H, device=qn.device).scatter_reduce_(0, ids, qn.reshape(-1, H) * real, "amax")
    kd = torch.zeros(info.num_docs, H, device=kn.device).scatter_reduce_(0, ids, kn.reshape(-1, H) * real, "amax")
    return (qd * kd).amax(0)


# ---------------------------------------------------------------------------------------------
# modules: containers named like HF's, so that state_dict keys match


class _Dense(nn.Module):
    def __init__(self, n_in: int, n_out: int):
        super().__init__()
        self.dense = nn.Linear(n_in, n_out)


class _SelfAttention(nn.Module):
    def __init__(self, C: int):
        super().__init__()
        self.query = nn.Linear(C, C)
        self.key = nn.Linear(C, C)
        self.value = nn.Linear(C, C)


class _Attention(nn.Module):
    def __init__(self, cfg: ESM2Config):
        super().__init__()
        self.self = _SelfAttention(cfg.hidden_size)
        self.output = _Dense(cfg.hidden_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)


class ESM2Layer(nn.Module):
    def __init__(self, cfg: ESM2Config):
        super().__init__()
        self.num_heads = cfg.num_attention_heads
        self.attention_probs_dropout_prob = cfg.attention_probs_dropout_prob
        self.hidden_dropout_prob = cfg.hidden_dropout_prob
        self.attention = _Attention(cfg)
        self.intermediate = _Dense(cfg.hidden_size, cfg.intermediate_size)
        self.output = _Dense(cfg.intermediate_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def _plain(self) -> bool:
        """True when every projection is a plain nn.Linear (the fused functions read .weight and
        .bias directly). PEFT/LoRA and similar wrappers replace them: then the modules are called,
        so that their extra terms are applied."""
        # through _modules: nn.Module.__getattr__ costs ~1 us a lookup, and this runs every layer
        # of every forward (host time that a fast GPU waits for)
        m = self._modules
        a = m["attention"]._modules
        sa = a["self"]._modules
        mods = (sa["query"], sa["key"], sa["value"], a["output"]._modules["dense"], m["intermediate"]._modules["dense"], m["output"]._modules["dense"])
        return all(type(x) is nn.Linear for x in mods) and type(m["LayerNorm"]) is nn.LayerNorm

    def forward(self, x_BSC, h_BSC, next_ln, cos, sin, info, mask, backend, fns, dynamic: bool, need_weights: bool, need_s_max: bool):
        """One layer on the residual stream ``x_BSC`` and its attention LayerNorm ``h_BSC`` (the
        caller's, computed by the previous layer). Returns ``(x, next_ln(x), weights, s_max)``:
        the next LayerNorm is applied here so that a compiled layer fuses it with the residual add
        (see :func:`_out_ffn`)."""
        a, sa = self.attention, self.attention.self
        B, S, C = x_BSC.shape
        H = self.num_heads
        plain = self._plain()
        if dynamic and plain:  # compiled: one graph for every token count (packed batches vary)
            for t in (x_BSC, h_BSC, cos, sin):
                torch._dynamo.maybe_mark_dynamic(t, 1)
        if plain:
            q, k, v = fns[0](
                h_BSC, sa.query.weight, sa.query.bias, sa.key.weight, sa.key.bias, sa.value.weight, sa.value.bias,
                cos, sin, H,
            )  # fmt: skip
        else:
            D = C // H
            q = sa.query(h_BSC).view(B, S, H, D) * D**-0.5
            k, v = sa.key(h_BSC).view(B, S, H, D), sa.value(h_BSC).view(B, S, H, D)
            q, k = _rope(q, k, cos, sin)
        s = _s_max(q, k, info) if need_s_max else None
        p = self.attention_probs_dropout_prob if self.training else 0.0
        # (B, S, H, D) memory, (B, H, S, D) views: the layout anyattn takes (DESIGN.md section 4)
        q_BHSD, k_BHSD, v_BHSD = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        weights = None
        if need_weights:
            o, weights = attention_with_weights(q_BHSD, k_BHSD, v_BHSD, mask=mask, scale=1.0, dropout_p=p)
        else:
            o = attention(q_BHSD, k_BHSD, v_BHSD, mask=mask, scale=1.0, backend=backend, dropout_p=p)
        o_BSC = o.transpose(1, 2).reshape(B, S, C)
        ph = self.hidden_dropout_prob
        if plain and type(next_ln) is nn.LayerNorm:
            if dynamic:
                torch._dynamo.maybe_mark_dynamic(o_BSC, 1)
            x, h = fns[1](
                o_BSC, x_BSC, a.output.dense.weight, a.output.dense.bias, self.LayerNorm.weight, self.LayerNorm.bias,
                self.LayerNorm.eps, self.intermediate.dense.weight, self.intermediate.dense.bias, self.output.dense.weight,
                self.output.dense.bias, ph, self.training, next_ln.weight, next_ln.bias, next_ln.eps,
            )  # fmt: skip
        else:
            x = F.dropout(a.output.dense(o_BSC), ph, self.training) + x_BSC
            g = self.output.dense(_gelu(self.intermediate.dense(self.LayerNorm(x))))
            x = F.dropout(g, ph, self.training) + x
            h = next_ln(x)
        return x, h, weights, s


class _Embeddings(nn.Module):
    def __init__(self, cfg: ESM2Config):
        super().__init__()
        self.token_dropout = cfg.token_dropout
        self.mask_token_id = cfg.mask_token_id
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size, padding_idx=cfg.pad_token_id)
        if cfg.emb_layer_norm_before:
            self.layer_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        else:
            self.layer_norm = None

    def forward(self, input_ids_BS: torch.Tensor, info: SeqInfo | None) -> torch.Tensor:
        x = self.word_embeddings(input_ids_BS)
        if self.token_dropout:
            is_mask = input_ids_BS == self.mask_token_id
            x = x.masked_fill(is_mask.unsqueeze(-1), 0.0)
            x = (x * (1 - _MASK_RATIO_TRAIN) / (1 - _mask_ratio(is_mask, info))).to(x.dtype)
        if self.layer_norm is not None:
            x = self.layer_norm(x)
        if info is not None and info.total < info.B * info.S:  # HF zeroes padding positions here
            x = (x * info.keep.unsqueeze(-1)).to(x.dtype)
        return x


class _Rotary(nn.Module):
    """inv_freq (D/2,) float32, kept float32 through ``model.to(bfloat16)``."""

    def __init__(self, cfg: ESM2Config):
        super().__init__()
        self.head_dim, self.theta = cfg.head_dim, cfg.rope_theta
        self.register_buffer("inv_freq", self.compute_inv_freq())

    def compute_inv_freq(self, device=None) -> torch.Tensor:
        D = self.head_dim
        return 1.0 / (self.theta ** (torch.arange(0, D, 2, dtype=torch.float32, device=device) / D))

    def _apply(self, fn, *args, **kwargs):
        inv = self.inv_freq
        super()._apply(fn, *args, **kwargs)
        if inv.device.type != "meta" and self.inv_freq.device.type != "meta":
            self.inv_freq = inv.to(self.inv_freq.device)  # device moves only: rotary stays float32
        return self

    def forward(self, positions_BS: torch.Tensor):
        """cos, sin (B, S, 1, D) float32 for integer positions (B, S)."""
        freqs = positions_BS[..., None].float() * self.inv_freq.float()
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().unsqueeze(2), emb.sin().unsqueeze(2)


class _Encoder(nn.Module):
    def __init__(self, cfg: ESM2Config):
        super().__init__()
        self.layer = nn.ModuleList(ESM2Layer(cfg) for _ in range(cfg.num_hidden_layers))
        self.emb_layer_norm_after = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)


class _ContactHead(nn.Module):
    """Logistic regression on symmetrized, APC-corrected attention maps (ESM's contact head)."""

    def __init__(self, cfg: ESM2Config, eos_idx: int = 2):
        super().__init__()
        self.eos_idx = eos_idx
        self.regression = nn.Linear(cfg.num_hidden_layers * cfg.num_attention_heads, 1)

    def forward(self, tokens_BS, attns_BLHSS):
        eos = tokens_BS.ne(self.eos_idx).to(attns_BLHSS)
        eos = eos.unsqueeze(1) * eos.unsqueeze(2)
        a = (attns_BLHSS * eos[:, None, None])[..., 1:-1, 1:-1]  # drop <cls> and the last token
        B, L, H, S, _ = a.shape
        a = a.reshape(B, L * H, S, S).to(self.regression.weight.device)
        a = a + a.transpose(-1, -2)
        a1, a2, a12 = a.sum(-1, keepdim=True), a.sum(-2, keepdim=True), a.sum((-1, -2), keepdim=True)
        a = a - a1 * a2 / a12
        return torch.sigmoid(self.regression(a.permute(0, 2, 3, 1).to(self.regression.weight.dtype)).squeeze(3))


class ESM2Output(NamedTuple):
    """Every forward returns all six fields; the optional ones are None unless asked for. ``loss``
    comes first so that ``outputs[0]`` is the loss when ``labels`` are given (HF Trainer)."""

    loss: torch.Tensor | None  # masked-LM cross-entropy (labels given; -100 = ignored)
    logits: torch.Tensor | None  # (B, S, V); None from ESM2Model
    last_hidden_state: torch.Tensor  # (B, S, C), after emb_layer_norm_after
    hidden_states: tuple | None  # L + 1 tensors (B, S, C): embeddings, layers 1..L-1, last_hidden_state
    attentions: tuple | None  # L tensors (B, H, S, S) float32 (output_attentions=True)
    s_max: torch.Tensor | None  # (L, H) float32: max over the batch's visible pairs of ||q_i|| * ||k_j||


class ESM2PreTrainedModel(PreTrainedModel):
    config_class = ESM2Config
    base_model_prefix = "esm"
    _no_split_modules = ["ESM2Layer"]
    supports_gradient_checkpointing = False
    # transformers 4.x wrote one inv_freq per layer; position_ids was an old persistent buffer.
    # Both are derived, not learned (our single inv_freq is recomputed when absent).
    _keys_to_ignore_on_load_unexpected = [r"rotary_embeddings\.inv_freq$", r"position_ids$"]
    _keys_to_ignore_on_load_missing = [r"rotary_embeddings\.inv_freq$"]
    _keep_in_fp32_modules_strict = ["rotary_embeddings"]

    @torch.no_grad()
    def _init_weights(self, module):
        """Random weights like HF's initializer: normal(0, initializer_range), zero biases, unit
        LayerNorms; rotary inv_freq from rope_theta."""
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            module.weight.normal_(0.0, std)
            if module.bias is not None:
                module.bias.zero_()
        elif isinstance(module, nn.Embedding):
            module.weight.normal_(0.0, std)
            if module.padding_idx is not None:
                module.weight[module.padding_idx].zero_()
        elif isinstance(module, nn.LayerNorm):
            module.weight.fill_(1.0)
            module.bias.zero_()
        elif isinstance(module, _LMHead):
            module.bias.zero_()
        elif isinstance(module, _Rotary):
            module.inv_freq.copy_(module.compute_inv_freq(module.inv_freq.device))

    @property
    def attn_backend(self):
        return self.config.attn_backend

    @attn_backend.setter
    def attn_backend(self, value) -> None:
        if isinstance(value, list):
            value = tuple(value)
        check_backend(value)  # raises listing the valid names
        self.config.attn_backend = value  # every layer reads it at each call; save_pretrained keeps it

    @property
    def pack_padded(self):
        return self.config.pack_padded

    @pack_padded.setter
    def pack_padded(self, value) -> None:
        if value not in ("auto", True, False):
            raise bad_value("pack_padded", "'auto', True or False", repr(value))
        self.config.pack_padded = value

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """transformers' ``from_pretrained``, strict: a checkpoint with unknown, missing or
        mis-shaped weights raises (listing them) instead of leaving weights at their random
        initialisation. ``strict=False`` restores transformers' warnings."""
        strict = kwargs.pop("strict", True)
        want_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(*args, output_loading_info=True, **kwargs)
        if strict:
            parts = [f"{k}: {sorted(map(str, info.get(k) or []))}" for k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs") if info.get(k)]
            if parts:
                raise bad_value("pretrained_model_name_or_path", f"a checkpoint with exactly the weights of {cls.__name__}", "; ".join(parts))
        return (model, info) if want_info else model


class ESM2Model(ESM2PreTrainedModel):
    """The encoder (HF ``EsmModel`` without the pooler). ``attn_backend`` switches every layer."""

    # the encoder alone may come from a masked-LM checkpoint: its head is not ours to load
    _keys_to_ignore_on_load_unexpected = [*ESM2PreTrainedModel._keys_to_ignore_on_load_unexpected, r"^lm_head\."]

    def __init__(self, config: ESM2Config):
        super().__init__(config)
        self.embeddings = _Embeddings(config)
        self.rotary_embeddings = _Rotary(config)
        self.encoder = _Encoder(config)
        self.contact_head = _ContactHead(config)
        self._fns = (_qkv, _out_ffn)
        self._dynamic = False
        self.post_init()

    def get_input_embeddings(self):
        return self.embeddings.word_embeddings

    def set_input_embeddings(self, value):
        self.embeddings.word_embeddings = value

    def compile_layers(self, *, fuse_qkv: bool = False, **compile_kwargs) -> None:
        """torch.compile the dense compute of every layer (projections + rotary, and output
        projection + FFN + the next LayerNorm), leaving the attention call and the batch structure
        outside.

        The two compiled functions take tensors only, so one compile serves every layer; the
        token dimension is marked dynamic, so packed batches of any token count reuse it (no
        recompiles from batch to batch). ``fuse_qkv``: one (3C, C) projection instead of three.
        Why not ``torch.compile(model)``: the batch structure (SeqInfo) carries Python ints (the
        document lengths) that a whole-model graph would guard on, recompiling for every batch."""
        qkv = _qkv_fused if fuse_qkv else _qkv
        self._fns = (torch.compile(qkv, **compile_kwargs), torch.compile(_out_ffn, **compile_kwargs))
        self._dynamic = compile_kwargs.get("dynamic", None) is not False

    def _plan(self, input_ids, attention_mask, seq_info, need_weights: bool) -> BatchPlan:
        """The batch plan of one forward (``anyattn.packing``: packed on backends that take
        packed documents natively, unless ``pack_padded`` says otherwise)."""
        on_cpu = isinstance(input_ids, torch.Tensor) and input_ids.device.type == "cpu"
        check_input_ids(input_ids, self.config.vocab_size, check_range=on_cpu or attention_mask is not None)
        if attention_mask is not None and seq_info is not None:
            raise bad_value("attention_mask/seq_info", "at most one of them", "both")
        keep = keep_mask(attention_mask, input_ids) if attention_mask is not None else None
        cfg = self.config
        plan = plan_batch(
            input_ids, keep, seq_info, backend=self.attn_backend, pack=cfg.pack_padded, heads=cfg.num_attention_heads,
            head_dim=cfg.head_dim, dtype=self.embeddings.word_embeddings.weight.dtype,
            grad=torch.is_grad_enabled() and self.training, need_weights=need_weights, pad_id=cfg.pad_token_id, scale=1.0,
        )  # fmt: skip
        info = plan.rows if plan.packed else plan.info
        longest = input_ids.shape[1] if info is None else info.max_seqlen
        if longest > cfg.max_position_embeddings:
            warnings.warn(
                f"ESM2: a sequence of {longest} tokens is longer than the {cfg.max_position_embeddings} "
                "the model was trained on",
                stacklevel=4,
            )
        return plan

    def _encode(self, input_ids, attention_mask, seq_info, inputs_embeds, output_hidden_states, output_attentions, output_s_max):
        """Run the encoder. Returns (plan, x after the final LayerNorm, hidden list, attentions,
        s_max), tensors in the layers' shape (see :class:`anyattn.packing.BatchPlan`)."""
        if inputs_embeds is not None:
            raise bad_value("inputs_embeds", "None (ESM2 takes input_ids: token dropout needs the <mask> positions)", "a tensor")
        plan = self._plan(input_ids, attention_mask, seq_info, bool(output_attentions))
        if output_attentions:
            warnings.warn(
                "ESM2: output_attentions=True runs this call's attention through the eager path "
                f"(anyattn.attention_with_weights); attn_backend stays {self.attn_backend!r}",
                stacklevel=3,
            )
        info = plan.info
        x = self.embeddings(plan.ids, info)
        if info is None:
            positions = torch.arange(plan.ids.shape[1], device=plan.ids.device).expand(plan.ids.shape)
        else:
            positions = info.positions
        cos, sin = self.rotary_embeddings(positions)
        hidden = [x] if output_hidden_states else None
        attns = [] if output_attentions else None
        smax = [] if output_s_max else None
        backend, fns, dynamic = self.attn_backend, self._fns, self._dynamic
        layers = self.encoder.layer
        # each layer returns the residual stream and the LayerNorm that follows it (the next
        # layer's attention LayerNorm, after the last layer the final one): see _out_ffn
        lns = [l.attention.LayerNorm for l in layers[1:]] + [self.encoder.emb_layer_norm_after]
        h = layers[0].attention.LayerNorm(x) if len(layers) else self.encoder.emb_layer_norm_after(x)
        for layer, next_ln in zip(layers, lns):
            x, h, w, s = layer(x, h, next_ln, cos, sin, info, plan.mask, backend, fns, dynamic, bool(output_attentions), bool(output_s_max))
            if hidden is not None:
                hidden.append(x)
            if attns is not None:
                attns.append(w)
            if smax is not None:
                smax.append(s)
        x = h  # after the final LayerNorm
        if hidden is not None:
            hidden[-1] = x  # as HF (and fair-esm's repr_layers): the last entry is after the final LN
        return plan, x, hidden, attns, (torch.stack(smax) if smax is not None else None)

    @staticmethod
    def _to_rows(plan: BatchPlan, t: torch.Tensor) -> torch.Tensor:
        return plan.to_rows(t)

    def forward(
        self, input_ids=None, attention_mask=None, *, seq_info: SeqInfo | None = None, inputs_embeds=None,
        output_hidden_states: bool | None = False, output_attentions: bool | None = False, output_s_max: bool = False,
        return_dict: bool | None = None,
    ) -> ESM2Output:  # fmt: skip
        """input_ids (B, S); ``attention_mask`` (B, S) 1 = real token (a padded batch), or
        ``seq_info`` (a SeqInfo of packed documents, or of padding). Returns :class:`ESM2Output`
        with ``logits=None`` (``return_dict`` is accepted for HF callers; the result is always
        the same NamedTuple)."""
        plan, x, hidden, attns, smax = self._encode(
            input_ids, attention_mask, seq_info, inputs_embeds, output_hidden_states, output_attentions, output_s_max
        )
        rows = self._to_rows
        return ESM2Output(
            None, None, rows(plan, x), tuple(rows(plan, h) for h in hidden) if hidden is not None else None,
            tuple(attns) if attns is not None else None, smax,
        )  # fmt: skip

    def predict_contacts(self, input_ids, attention_mask=None) -> torch.Tensor:
        """Contact probabilities (B, S-2, S-2) from the attention maps (ESM's contact head)."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = self(input_ids, attention_mask=attention_mask, output_attentions=True)
        a = torch.stack(out.attentions, dim=1)
        m = attention_mask.to(a.dtype)
        a = a * m[:, None, None, None, :] * m[:, None, None, :, None]
        return self.contact_head(input_ids, a)


class _LMHead(nn.Module):
    def __init__(self, cfg: ESM2Config):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.layer_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.decoder = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.bias = nn.Parameter(torch.zeros(cfg.vocab_size))

    def forward(self, x):
        return self.decoder(self.layer_norm(_gelu(self.dense(x)))) + self.bias


class ESM2ForMaskedLM(ESM2PreTrainedModel):
    """ESM2 with its LM head; ``state_dict()`` keys equal HF's ``EsmForMaskedLM``.

    ``model.attn_backend = "flex"`` switches every layer; ``model.esm`` is the encoder alone.
    """

    _tied_weights_keys = {"lm_head.decoder.weight": "esm.embeddings.word_embeddings.weight"}

    def __init__(self, config: ESM2Config):
        super().__init__(config)
        self.esm = ESM2Model(config)
        self.lm_head = _LMHead(config)
        if config.tie_word_embeddings:
            self.lm_head.decoder.weight = self.esm.embeddings.word_embeddings.weight
        self.post_init()

    def get_input_embeddings(self):
        return self.esm.embeddings.word_embeddings

    def set_input_embeddings(self, value):
        self.esm.embeddings.word_embeddings = value

    def get_output_embeddings(self):
        return self.lm_head.decoder

    def set_output_embeddings(self, new_embeddings):
        self.lm_head.decoder = new_embeddings

    def compile_layers(self, **kwargs) -> None:
        """See :meth:`ESM2Model.compile_layers`."""
        self.esm.compile_layers(**kwargs)

    def forward(
        self, input_ids=None, attention_mask=None, *, labels=None, seq_info: SeqInfo | None = None, inputs_embeds=None,
        output_hidden_states: bool | None = False, output_attentions: bool | None = False, output_s_max: bool = False,
        return_dict: bool | None = None,
    ) -> ESM2Output:  # fmt: skip
        """As :meth:`ESM2Model.forward`, plus ``logits`` (B, S, V) and, with ``labels`` (B, S)
        (-100 = ignored), the masked-LM ``loss``. On the packed path the LM head runs on the
        real tokens only."""
        esm = self.esm
        plan, x, hidden, attns, smax = esm._encode(
            input_ids, attention_mask, seq_info, inputs_embeds, output_hidden_states, output_attentions, output_s_max
        )
        logits = esm._to_rows(plan, self.lm_head(x))
        loss = None
        if labels is not None:
            if not isinstance(labels, torch.Tensor) or labels.shape != input_ids.shape:
                got = tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__
                raise bad_value("labels", f"a tensor of shape {tuple(input_ids.shape)} like input_ids", got)
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.to(logits.device).reshape(-1), ignore_index=-100)
        rows = esm._to_rows
        return ESM2Output(
            loss, logits, rows(plan, x), tuple(rows(plan, h) for h in hidden) if hidden is not None else None,
            tuple(attns) if attns is not None else None, smax,
        )  # fmt: skip

    def predict_contacts(self, input_ids, attention_mask=None) -> torch.Tensor:
        return self.esm.predict_contacts(input_ids, attention_mask)


# ---------------------------------------------------------------------------------------------
# Auto classes


def register_auto() -> None:
    """Register ESM2Config / ESM2Model / ESM2ForMaskedLM with transformers' AutoConfig, AutoModel
    and AutoModelForMaskedLM under model_type "anyattn_esm2" (idempotent; run on import)."""
    AutoConfig.register(MODEL_TYPE, ESM2Config, exist_ok=True)
    AutoModel.register(ESM2Config, ESM2Model, exist_ok=True)
    AutoModelForMaskedLM.register(ESM2Config, ESM2ForMaskedLM, exist_ok=True)


register_auto()


# ---------------------------------------------------------------------------------------------
# loading HF checkpoints

_OLD_INV_FREQ = ".attention.self.rotary_embeddings.inv_freq"  # transformers 4.x: one per layer
_IGNORED = ("esm.embeddings.position_ids",)  # a buffer older checkpoints saved; derived, not learned


def _map_hf_keys(state_dict: dict) -> dict:
    """HF checkpoint keys -> ours (the same names, up to the layout changes of transformers)."""
    # transformers 5.x save_pretrained writes LayerNorm.weight/bias as LayerNorm.gamma/beta (its
    # "legacy" renaming run backwards) and renames them back on load; so do we.
    sd = {}
    for k, v in state_dict.items():
        if k.endswith("LayerNorm.gamma"):
            k = k[: -len("gamma")] + "weight"
        elif k.endswith("LayerNorm.beta"):
            k = k[: -len("beta")] + "bias"
        sd[k] = v
    if sd and not any(k.startswith("esm.") for k in sd) and any(k.startswith("embeddings.") for k in sd):
        sd = {f"esm.{k}": v for k, v in sd.items()}  # saved from EsmModel rather than EsmForMaskedLM
    old = sorted(k for k in sd if k.endswith(_OLD_INV_FREQ))
    if old:
        sd.setdefault("esm.rotary_embeddings.inv_freq", sd[old[0]])
        for k in old:
            del sd[k]
    for k in _IGNORED:
        sd.pop(k, None)
    return sd


def load_hf_state_dict(model: ESM2ForMaskedLM, state_dict: dict) -> None:
    """Load an HF ``EsmForMaskedLM`` state dict (transformers 4.x or 5.x naming) into ``model``.

    Refuses unknown, missing or mis-shaped keys, listing them; nothing is silently left at its
    random initialisation. A missing ``lm_head.decoder.weight`` is accepted when the embeddings
    are tied (``save_pretrained`` drops the tied copy). A missing ``esm.rotary_embeddings.inv_freq``
    is recomputed from ``rope_theta`` (it is derived, not learned). ``model`` may live on the meta
    device (built without initialisation): the checkpoint tensors are then assigned, not copied.
    """
    if not isinstance(model, ESM2ForMaskedLM):
        raise bad_type("model", "an ESM2ForMaskedLM", type(model).__name__)
    sd = _map_hf_keys(state_dict)
    ours = model.state_dict()
    optional = {"esm.rotary_embeddings.inv_freq"}
    tie = model.config.tie_word_embeddings
    if tie:
        optional.add("lm_head.decoder.weight")
    check_state_dict(sd, ours, optional=optional, expected="the keys of an HF EsmForMaskedLM ESM2 checkpoint for this config")
    if tie and "lm_head.decoder.weight" in sd:
        if not torch.equal(sd["lm_head.decoder.weight"].cpu(), sd["esm.embeddings.word_embeddings.weight"].cpu()):
            raise bad_value("state_dict", "lm_head.decoder.weight equal to the word embeddings (tie_word_embeddings=True)", "different tensors")
        del sd["lm_head.decoder.weight"]
    rot = model.esm.rotary_embeddings
    meta = any(p.device.type == "meta" for p in model.parameters())
    if meta:
        model.load_state_dict(sd, strict=False, assign=True)  # completeness checked above
        if tie:
            model.lm_head.decoder.weight = model.esm.embeddings.word_embeddings.weight
    else:
        model.load_state_dict(sd, strict=False)
    inv = sd.get("esm.rotary_embeddings.inv_freq")
    # float32 always (a bf16 checkpoint's inv_freq is widened; a missing one recomputed)
    rot.inv_freq = inv.detach().to(torch.float32).clone() if inv is not None else rot.compute_inv_freq()


def build_esm2(cfg: ESM2Config, state_dict: dict, *, dtype=None, device=None) -> ESM2ForMaskedLM:
    """An ESM2ForMaskedLM holding exactly ``state_dict`` (HF key names, strict), in eval mode.
    Built on the meta device (no random initialisation); float32 unless ``dtype`` is given."""
    with torch.device("meta"):
        model = ESM2ForMaskedLM(cfg)
    load_hf_state_dict(model, state_dict)
    model.eval()
    model.to(device=device if device is not None else "cpu", dtype=dtype if dtype is not None else torch.float32)
    return model


def load_esm2(path: str, *, attn_backend=None, dtype=None, device=None) -> ESM2ForMaskedLM:
    """An ESM2 from a local HF-format directory (config.json + safetensors or .bin; HF's
    ``EsmForMaskedLM`` or ours), or a hub id (downloaded through huggingface_hub). Eval mode,
    float32 unless ``dtype`` is given. Prefer :func:`anyattn.models.load`, which detects the
    family.
    ``attn_backend`` None: the one an anyattn checkpoint saved, else "auto"."""
    if not isinstance(path, (str, os.PathLike)):
        raise bad_type("path", "a local directory or a hub id", type(path).__name__)
    path = os.fspath(path)
    if not os.path.isdir(path):
        from .hub import download

        path = download(path)
    cfg_file = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_file):
        raise bad_value("path", "a directory with config.json", repr(path))
    with open(cfg_file) as f:
        raw = json.load(f)
    if not is_esm2_config(raw):
        raise bad_value(
            "config.json", "an ESM2 config (model_type 'esm' with rotary positions and architectures EsmForMaskedLM/EsmModel, or 'anyattn_esm2')",
            f"model_type {raw.get('model_type')!r}, position_embedding_type {raw.get('position_embedding_type')!r}, architectures {raw.get('architectures')}",
        )  # fmt: skip
    cfg = ESM2Config.from_hf_config(raw, attn_backend=resolve_saved_backend(raw, attn_backend))
    model = build_esm2(cfg, read_weights(path), dtype=dtype, device=device)
    model.config._name_or_path = path  # where load_tokenizer(model) finds vocab.txt (HF's convention)
    return model
