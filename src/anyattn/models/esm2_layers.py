"""ESM2's layers: the pure functions of one layer's compute (parameters passed in, so one
torch.compile of each serves every layer and every batch) and the modules, named like HF's so
that ``state_dict`` keys match. Shape legend as in ``esm2.py``."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..api import attention, attention_with_weights
from ..layout import SeqInfo
from .esm2_config import ESM2Config

# ESM's token dropout: during training 15% of tokens were selected and 80% of those masked, with
# the <mask> embedding zeroed. At inference the embeddings are rescaled by
# (1 - 0.12) / (1 - observed mask ratio of the sequence), like dropout's eval-time scaling.
_MASK_RATIO_TRAIN = 0.15 * 0.8

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

    def __init__(self, cfg: ESM2Config, eos_idx: int = 2, cls_idx: int = 0):
        super().__init__()
        self.eos_idx, self.cls_idx = eos_idx, cls_idx
        self.regression = nn.Linear(cfg.num_hidden_layers * cfg.num_attention_heads, 1)

    def forward(self, tokens_BS, attns_BLHSS):
        # <eos> and <cls> are zeroed wherever they sit (ESM zeroes <eos> and slices off column 0
        # as <cls>: with left padding column 0 is padding and <cls> would stay in the sums)
        keep = (tokens_BS.ne(self.eos_idx) & tokens_BS.ne(self.cls_idx)).to(attns_BLHSS)
        keep = keep.unsqueeze(1) * keep.unsqueeze(2)
        a = (attns_BLHSS * keep[:, None, None])[..., 1:-1, 1:-1]  # the (S - 2) grid of ESM's contact maps
        B, L, H, S, _ = a.shape
        a = a.reshape(B, L * H, S, S).to(self.regression.weight.device)
        a = a + a.transpose(-1, -2)
        a1, a2, a12 = a.sum(-1, keepdim=True), a.sum(-2, keepdim=True), a.sum((-1, -2), keepdim=True)
        a = a - a1 * a2 / a12
        return torch.sigmoid(self.regression(a.permute(0, 2, 3, 1).to(self.regression.weight.dtype)).squeeze(3))



class _LMHead(nn.Module):
    def __init__(self, cfg: ESM2Config):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.layer_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.decoder = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.bias = nn.Parameter(torch.zeros(cfg.vocab_size))

    def forward(self, x):
        return self.decoder(self.layer_norm(_gelu(self.dense(x)))) + self.bias
