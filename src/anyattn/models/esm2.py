"""ESM2 (Lin et al. 2023) on anyattn: HF transformers' ``EsmForMaskedLM`` with rotary positions.

Shape legend:
    B batch rows   S row length   C hidden size   H heads   D head dim (C // H)   F FFN size
    T real tokens of the batch   V vocabulary

One layer (pre-LayerNorm)::

    x ──LN──> q,k,v = Linear(.)          q *= D**-0.5   (BEFORE rotary, as ESM does)
              q,k   = rotary(q,k)        float32 cos/sin, positions restart at 0 per sequence
              o     = anyattn.attention(q, k, v, mask=<batch structure>, scale=1.0)
    x = x + Linear(o)
    x = x + Linear(gelu(Linear(LN(x))))          (erf GELU, exactly ESM's)

Because q is pre-scaled, every backend is called with ``scale=1.0`` (DESIGN.md section 4; a port
that double-scaled on its flash path lost all agreement).

Batch structure, built once per forward and shared by every layer:

    input_ids (B, S), no mask                 -> mask None (dense)
    input_ids (B, S), attention_mask (B, S)   -> SeqInfo.from_padding_mask -> anyattn.padding(info)
    input_ids (B, S), seq_info (documents)    -> anyattn.documents(info): packed rows, no padding
                                                 compute between documents (the fast path)

Rotary positions come from the SeqInfo (position inside each sequence). For right padding (HF's
convention for ESM) this equals HF's ``arange(S)``; for left padding HF shifts the positions of
the real tokens and we do not: our output does not depend on where the padding is.

Parameter names equal HF's ``EsmForMaskedLM.state_dict()`` keys (transformers 5.x layout, with
one ``esm.rotary_embeddings.inv_freq``); checkpoints written by transformers 4.x that store one
``inv_freq`` per layer load too (the first one is kept, as HF's own load hook does).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import warnings
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..api import attention, attention_with_weights
from ..errors import bad_type, bad_value
from ..layout import SeqInfo
from ..resolve import check_backend
from ..spec import documents, padding

__all__ = [
    "ESM2Config",
    "ESM2_PRESETS",
    "ESM2Model",
    "ESM2ForMaskedLM",
    "ESM2Output",
    "esm2_flops",
    "load_esm2",
    "load_hf_state_dict",
]

# ESM's token dropout: during training 15% of tokens were selected and 80% of those masked, with
# the <mask> embedding zeroed. At inference the embeddings are rescaled by
# (1 - 0.12) / (1 - observed mask ratio of the sequence), like dropout's eval-time scaling.
_MASK_RATIO_TRAIN = 0.15 * 0.8


@dataclass(frozen=True)
class ESM2Config:
    """ESM2 hyper-parameters (names as in HF's ``EsmConfig``). Presets: :data:`ESM2_PRESETS`."""

    vocab_size: int = 33
    hidden_size: int = 1280
    num_hidden_layers: int = 33
    num_attention_heads: int = 20
    intermediate_size: int = 5120
    max_position_embeddings: int = 1026  # 1024 residues + <cls> + <eos>
    layer_norm_eps: float = 1e-5
    pad_token_id: int = 1
    mask_token_id: int = 32
    # zero the <mask> embeddings and rescale by (1 - 0.12) / (1 - observed mask ratio)
    token_dropout: bool = True
    # a LayerNorm right after the embeddings (ESM-1b: True; ESM2: False)
    emb_layer_norm_before: bool = False
    rope_theta: float = 10000.0
    # lm_head.decoder.weight is the word embedding matrix (ESM2 checkpoints: True)
    tie_word_embeddings: bool = True
    hidden_dropout_prob: float = 0.0  # training only
    attention_probs_dropout_prob: float = 0.0  # training only
    attn_backend: str = "auto"  # anyattn backend name, or a sequence of names

    def __post_init__(self):
        if self.hidden_size % self.num_attention_heads:
            raise bad_value(
                "hidden_size", f"a multiple of num_attention_heads={self.num_attention_heads}", self.hidden_size
            )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_name(cls, name: str, **overrides) -> ESM2Config:
        """A published size by name ("esm2_t33_650M", also "facebook/esm2_t33_650M_UR50D")."""
        key = name.split("/")[-1].removesuffix("_UR50D")
        if key not in ESM2_PRESETS:
            raise bad_value("name", f"one of {list(ESM2_PRESETS)}", repr(name))
        return dataclasses.replace(ESM2_PRESETS[key], **overrides)

    @classmethod
    def from_hf_config(cls, hf_config, **overrides) -> ESM2Config:
        """From a transformers ``EsmConfig`` (or its ``to_dict()``). Only rotary ESM (ESM2) is
        supported; ESM-1b's absolute positions and ESMFold configs are refused."""
        get = hf_config.get if isinstance(hf_config, dict) else lambda k, d=None: getattr(hf_config, k, d)
        pos = get("position_embedding_type", "absolute")
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
        )  # fmt: skip
        kw.update(overrides)
        return cls(**kw)

    def to_hf_dict(self) -> dict:
        """Keyword arguments for ``transformers.EsmConfig(**d)`` describing the same network."""
        d = dataclasses.asdict(self)
        d.pop("attn_backend")
        d.update(position_embedding_type="rotary", is_folding_model=False)
        return d


def _preset(L: int, C: int, H: int) -> ESM2Config:
    return ESM2Config(num_hidden_layers=L, hidden_size=C, num_attention_heads=H, intermediate_size=4 * C)


# facebook/esm2_*_UR50D (Lin et al. 2023, table S1; the hub config.json files)
ESM2_PRESETS: dict[str, ESM2Config] = {
    "esm2_t6_8M": _preset(6, 320, 20),
    "esm2_t12_35M": _preset(12, 480, 20),
    "esm2_t30_150M": _preset(30, 640, 20),
    "esm2_t33_650M": _preset(33, 1280, 20),
    "esm2_t36_3B": _preset(36, 2560, 40),
    "esm2_t48_15B": _preset(48, 5120, 40),
}


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
# of the same shape (see ESM2Model.compile_layers).


def _gelu(x: torch.Tensor) -> torch.Tensor:
    # ESM's erf GELU, written out: F.gelu differs in the last bits and HF keeps this form.
    return x * 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0)))


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _qkv(x_BSC, ln_w, ln_b, eps: float, wq, bq, wk, bk, wv, bv, cos_BS1D, sin_BS1D, H: int):
    """Pre-LN, projections, q *= D**-0.5, rotary in float32. Returns q, k, v as (B, S, H, D)."""
    B, S, C = x_BSC.shape
    D = C // H
    h = F.layer_norm(x_BSC, (C,), ln_w, ln_b, eps)
    q = F.linear(h, wq, bq).view(B, S, H, D) * D**-0.5
    k = F.linear(h, wk, bk).view(B, S, H, D)
    v = F.linear(h, wv, bv).view(B, S, H, D)
    qf, kf = q.float(), k.float()
    q = (qf * cos_BS1D + _rotate_half(qf) * sin_BS1D).to(x_BSC.dtype)
    k = (kf * cos_BS1D + _rotate_half(kf) * sin_BS1D).to(x_BSC.dtype)
    return q, k, v


def _out_ffn(o_BSC, x_BSC, wo, bo, ln_w, ln_b, eps: float, w1, b1, w2, b2, p: float, training: bool):
    """Output projection + residual, then pre-LN FFN + residual."""
    x = F.dropout(F.linear(o_BSC, wo, bo), p, training) + x_BSC
    h = F.layer_norm(x, (x.shape[-1],), ln_w, ln_b, eps)
    h = F.linear(_gelu(F.linear(h, w1, b1)), w2, b2)
    return F.dropout(h, p, training) + x


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
        self.cfg = cfg
        self.attention = _Attention(cfg)
        self.intermediate = _Dense(cfg.hidden_size, cfg.intermediate_size)
        self.output = _Dense(cfg.intermediate_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, x_BSC, cos, sin, mask, backend, fns, need_weights: bool = False):
        cfg, a = self.cfg, self.attention
        B, S, C = x_BSC.shape
        qkv_fn, out_fn = fns
        sa = a.self
        q, k, v = qkv_fn(
            x_BSC, a.LayerNorm.weight, a.LayerNorm.bias, a.LayerNorm.eps, sa.query.weight, sa.query.bias,
            sa.key.weight, sa.key.bias, sa.value.weight, sa.value.bias, cos, sin, cfg.num_attention_heads,
        )  # fmt: skip
        p = cfg.attention_probs_dropout_prob if self.training else 0.0
        # (B, S, H, D) memory, (B, H, S, D) views: the layout anyattn takes (DESIGN.md section 4)
        q_BHSD, k_BHSD, v_BHSD = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        weights = None
        if need_weights:
            o, weights = attention_with_weights(q_BHSD, k_BHSD, v_BHSD, mask=mask, scale=1.0, dropout_p=p)
        else:
            o = attention(q_BHSD, k_BHSD, v_BHSD, mask=mask, scale=1.0, backend=backend, dropout_p=p)
        o_BSC = o.transpose(1, 2).reshape(B, S, C)
        ph = cfg.hidden_dropout_prob
        x = out_fn(
            o_BSC, x_BSC, a.output.dense.weight, a.output.dense.bias, self.LayerNorm.weight, self.LayerNorm.bias,
            self.LayerNorm.eps, self.intermediate.dense.weight, self.intermediate.dense.bias, self.output.dense.weight,
            self.output.dense.bias, ph, self.training,
        )  # fmt: skip
        return x, weights


class _Embeddings(nn.Module):
    def __init__(self, cfg: ESM2Config):
        super().__init__()
        self.cfg = cfg
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size, padding_idx=cfg.pad_token_id)
        if cfg.emb_layer_norm_before:
            self.layer_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        else:
            self.layer_norm = None

    def forward(self, input_ids_BS: torch.Tensor, info: SeqInfo | None) -> torch.Tensor:
        cfg = self.cfg
        x = self.word_embeddings(input_ids_BS)
        if cfg.token_dropout:
            is_mask = input_ids_BS == cfg.mask_token_id
            x = x.masked_fill(is_mask.unsqueeze(-1), 0.0)
            if info is None:  # every row is one sequence of length S
                ratio = (is_mask.sum(-1).float() / input_ids_BS.shape[1])[:, None, None]
            else:  # per sequence (document or padded row), over its real tokens
                ids = info.doc_ids.long().clamp_min(0).reshape(-1)
                counts = torch.zeros(info.num_docs, device=x.device, dtype=torch.float32)
                counts.index_add_(0, ids, (is_mask & info.keep).reshape(-1).float())
                lens = (info.cu_seqlens[1:] - info.cu_seqlens[:-1]).float()
                ratio = (counts / lens)[ids].view(*input_ids_BS.shape, 1)
            x = (x * (1 - _MASK_RATIO_TRAIN) / (1 - ratio)).to(x.dtype)
        if self.layer_norm is not None:
            x = self.layer_norm(x)
        if info is not None:  # HF zeroes padding positions here
            x = (x * info.keep.unsqueeze(-1)).to(x.dtype)
        return x


class _Rotary(nn.Module):
    """inv_freq (D/2,) float32, kept float32 through ``model.to(bfloat16)``."""

    def __init__(self, cfg: ESM2Config):
        super().__init__()
        D = cfg.head_dim
        self.register_buffer("inv_freq", 1.0 / (cfg.rope_theta ** (torch.arange(0, D, 2, dtype=torch.float) / D)))

    def _apply(self, fn, *args, **kwargs):
        inv = self.inv_freq
        super()._apply(fn, *args, **kwargs)
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
    """Every forward returns all four fields; the optional ones are None unless asked for."""

    logits: torch.Tensor | None  # (B, S, V); None from ESM2Model
    last_hidden_state: torch.Tensor  # (B, S, C), after emb_layer_norm_after
    hidden_states: tuple | None  # L + 1 tensors (B, S, C): embeddings, layers 1..L-1, last_hidden_state
    attentions: tuple | None  # L tensors (B, H, S, S) float32 (output_attentions=True)


class ESM2Model(nn.Module):
    """The encoder (HF ``EsmModel`` without the pooler). ``attn_backend`` switches every layer."""

    def __init__(self, cfg: ESM2Config):
        super().__init__()
        self.cfg = cfg
        self.embeddings = _Embeddings(cfg)
        self.rotary_embeddings = _Rotary(cfg)
        self.encoder = _Encoder(cfg)
        self.contact_head = _ContactHead(cfg)
        self._fns = (_qkv, _out_ffn)
        self.attn_backend = cfg.attn_backend

    @property
    def attn_backend(self):
        return self._attn_backend

    @attn_backend.setter
    def attn_backend(self, value) -> None:
        check_backend(value)  # raises listing the valid names
        self._attn_backend = value

    def compile_layers(self, **compile_kwargs) -> None:
        """torch.compile the dense compute of every layer (pre-LN + projections + rotary, and
        output projection + FFN), leaving the attention call and the batch structure outside.

        Why not ``torch.compile(model)``: the batch structure (SeqInfo) carries Python ints (the
        document lengths) that a whole-model graph would guard on, recompiling for every batch.
        The two compiled functions take tensors only, so one compile serves all layers and every
        batch of the same (B, S) (the benchmark packs every batch into the same S)."""
        compile_kwargs.setdefault("dynamic", False)
        self._fns = (torch.compile(_qkv, **compile_kwargs), torch.compile(_out_ffn, **compile_kwargs))

    def structure(self, input_ids, attention_mask=None, seq_info=None):
        """(SeqInfo | None, mask term | None) for a batch: built once, shared by every layer."""
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
            got = f"shape {tuple(input_ids.shape)}" if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
            raise bad_value("input_ids", "a (B, S) integer tensor", got)
        if attention_mask is not None and seq_info is not None:
            raise bad_value("attention_mask/seq_info", "at most one of them", "both")
        if attention_mask is not None:
            if attention_mask.shape != input_ids.shape:
                raise bad_value("attention_mask", f"shape {tuple(input_ids.shape)} like input_ids", tuple(attention_mask.shape))
            seq_info = SeqInfo.from_padding_mask(attention_mask.to(input_ids.device))
        if seq_info is None:
            return None, None
        if not isinstance(seq_info, SeqInfo):
            raise bad_type("seq_info", "an anyattn.SeqInfo", type(seq_info).__name__)
        if (seq_info.B, seq_info.S) != tuple(input_ids.shape):
            raise bad_value("seq_info", f"B, S = {tuple(input_ids.shape)} like input_ids", f"B={seq_info.B}, S={seq_info.S}")
        seq_info = seq_info.to(input_ids.device)
        if seq_info.max_seqlen > self.cfg.max_position_embeddings:
            warnings.warn(
                f"ESM2: a sequence of {seq_info.max_seqlen} tokens is longer than the "
                f"{self.cfg.max_position_embeddings} the model was trained on",
                stacklevel=3,
            )
        if seq_info.kind == "padding":
            mask = None if seq_info.total == seq_info.B * seq_info.S else padding(seq_info)
        else:
            mask = documents(seq_info)
        return seq_info, mask

    def forward(
        self, input_ids, attention_mask=None, *, seq_info: SeqInfo | None = None, output_hidden_states: bool = False,
        output_attentions: bool = False,
    ) -> ESM2Output:  # fmt: skip
        """input_ids (B, S); ``attention_mask`` (B, S) 1 = real token (padded batch), or
        ``seq_info`` (a SeqInfo of packed documents, or of padding). Returns :class:`ESM2Output`
        with ``logits=None``."""
        info, mask = self.structure(input_ids, attention_mask, seq_info)
        if output_attentions:
            warnings.warn(
                "ESM2: output_attentions=True runs this call's attention through the eager path "
                f"(anyattn.attention_with_weights); attn_backend stays {self.attn_backend!r}",
                stacklevel=2,
            )
        x = self.embeddings(input_ids, info)
        if info is None:
            positions = torch.arange(input_ids.shape[1], device=input_ids.device).expand(input_ids.shape)
        else:
            positions = info.positions
        cos, sin = self.rotary_embeddings(positions)
        hidden = [x] if output_hidden_states else None
        attns = [] if output_attentions else None
        for layer in self.encoder.layer:
            x, w = layer(x, cos, sin, mask, self._attn_backend, self._fns, need_weights=output_attentions)
            if hidden is not None:
                hidden.append(x)
            if attns is not None:
                attns.append(w)
        x = self.encoder.emb_layer_norm_after(x)
        if hidden is not None:
            hidden[-1] = x  # as HF (and fair-esm's repr_layers): the last entry is after the final LN
        return ESM2Output(None, x, tuple(hidden) if hidden is not None else None, tuple(attns) if attns is not None else None)

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


class ESM2ForMaskedLM(nn.Module):
    """ESM2 with its LM head; ``state_dict()`` keys equal HF's ``EsmForMaskedLM``.

    ``model.attn_backend = "flex"`` switches every layer; ``model.esm`` is the encoder alone.
    """

    def __init__(self, cfg: ESM2Config):
        super().__init__()
        self.cfg = cfg
        self.esm = ESM2Model(cfg)
        self.lm_head = _LMHead(cfg)
        if cfg.tie_word_embeddings:
            self.lm_head.decoder.weight = self.esm.embeddings.word_embeddings.weight
        self._init_weights()

    @torch.no_grad()
    def _init_weights(self, std: float = 0.02) -> None:
        """Random weights like HF's initializer (normal(0, 0.02), zero biases, unit LayerNorms)."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                m.weight.normal_(0.0, std)
                if m.bias is not None:
                    m.bias.zero_()
            elif isinstance(m, nn.Embedding):
                m.weight.normal_(0.0, std)
                if m.padding_idx is not None:
                    m.weight[m.padding_idx].zero_()
            elif isinstance(m, nn.LayerNorm):
                m.weight.fill_(1.0)
                m.bias.zero_()
        self.lm_head.bias.zero_()

    @property
    def attn_backend(self):
        return self.esm.attn_backend

    @attn_backend.setter
    def attn_backend(self, value) -> None:
        self.esm.attn_backend = value

    def compile_layers(self, **compile_kwargs) -> None:
        self.esm.compile_layers(**compile_kwargs)

    def forward(
        self, input_ids, attention_mask=None, *, seq_info: SeqInfo | None = None, output_hidden_states: bool = False,
        output_attentions: bool = False,
    ) -> ESM2Output:  # fmt: skip
        out = self.esm(
            input_ids, attention_mask, seq_info=seq_info, output_hidden_states=output_hidden_states,
            output_attentions=output_attentions,
        )  # fmt: skip
        return out._replace(logits=self.lm_head(out.last_hidden_state))

    def predict_contacts(self, input_ids, attention_mask=None) -> torch.Tensor:
        return self.esm.predict_contacts(input_ids, attention_mask)

    @classmethod
    def from_pretrained(cls, path: str, **kwargs) -> ESM2ForMaskedLM:
        """Same as :func:`load_esm2`."""
        return load_esm2(path, **kwargs)


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
    is recomputed from ``rope_theta`` (it is derived, not learned).
    """
    sd = _map_hf_keys(state_dict)
    ours = model.state_dict()
    optional = {"esm.rotary_embeddings.inv_freq"}
    if model.cfg.tie_word_embeddings:
        optional.add("lm_head.decoder.weight")
    unknown = sorted(set(sd) - set(ours))
    missing = sorted(set(ours) - set(sd) - optional)
    shapes = sorted(f"{k}: checkpoint {tuple(sd[k].shape)}, model {tuple(ours[k].shape)}" for k in set(sd) & set(ours) if sd[k].shape != ours[k].shape)
    if unknown or missing or shapes:
        parts = []
        if unknown:
            parts.append(f"{len(unknown)} unknown key(s): {unknown}")
        if missing:
            parts.append(f"{len(missing)} missing key(s): {missing}")
        if shapes:
            parts.append(f"{len(shapes)} shape mismatch(es): {shapes}")
        raise bad_value("state_dict", "the keys of an HF EsmForMaskedLM ESM2 checkpoint for this config", "; ".join(parts))
    tied = model.cfg.tie_word_embeddings and "lm_head.decoder.weight" in sd
    if tied and not torch.equal(sd["lm_head.decoder.weight"].cpu(), sd["esm.embeddings.word_embeddings.weight"].cpu()):
        raise bad_value("state_dict", "lm_head.decoder.weight equal to the word embeddings (tie_word_embeddings=True)", "different tensors")
    model.load_state_dict(sd, strict=False)  # completeness checked above


def _read_checkpoint(path: str) -> dict:
    st = [f for f in sorted(os.listdir(path)) if f.endswith(".safetensors")]
    if st:
        try:
            from safetensors.torch import load_file
        except ImportError as e:
            raise ImportError("anyattn.models.load_esm2 needs safetensors for *.safetensors: pip install 'anyattn[models]'") from e
        sd = {}
        for f in st:
            sd.update(load_file(os.path.join(path, f)))
        return sd
    bins = [f for f in sorted(os.listdir(path)) if f.endswith(".bin") and f.startswith("pytorch_model")]
    if bins:
        sd = {}
        for f in bins:
            sd.update(torch.load(os.path.join(path, f), map_location="cpu", weights_only=True))
        return sd
    raise FileNotFoundError(f"load_esm2: no *.safetensors or pytorch_model*.bin in {path}")


def load_esm2(path: str, *, attn_backend="auto", dtype=None, device=None) -> ESM2ForMaskedLM:
    """An ESM2 from a local HF-format directory (config.json + safetensors or .bin), or a hub id
    (downloaded through huggingface_hub when installed)."""
    if not os.path.isdir(path):
        try:
            from huggingface_hub import snapshot_download
        except ImportError as e:
            raise FileNotFoundError(f"load_esm2: {path!r} is not a directory and huggingface_hub is not installed") from e
        path = snapshot_download(path, allow_patterns=["config.json", "*.safetensors", "pytorch_model*.bin"])
    with open(os.path.join(path, "config.json")) as f:
        cfg = ESM2Config.from_hf_config(json.load(f), attn_backend=attn_backend)
    model = ESM2ForMaskedLM(cfg)
    load_hf_state_dict(model, _read_checkpoint(path))
    model.eval()
    if dtype is not None or device is not None:
        model.to(device=device, dtype=dtype)
    return model
