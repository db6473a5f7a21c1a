"""A compact ESM2 encoder the way FastPLMs-style ports write it: the baseline "what users run
today besides HF" in ``anyattn bench model``.

Uncompiled; padded batches with ``attention_mask``; HF's rotary (cos/sin computed in float32
from ``rope_theta`` and cast to the activations' dtype, the rotation itself in float32); q scaled
by D**-0.5 before rotary, as ESM does; ``F.scaled_dot_product_attention`` with a boolean key mask
``attention_mask[:, None, None, :]`` and ``scale=1.0``; ESM's token dropout rescaling and
embedding masking exactly as HF's ``EsmEmbeddings``. Module names are HF ``EsmModel``'s, so its
state dict loads as is (pooler, contact head and rotary ``inv_freq`` are not used).

Not anyattn: nothing here imports the attention call, so the port is an independent check of the
model semantics too (``bench model`` compares it with HF before timing it).

Shape legend: B batch rows, S row length, C hidden, H heads, D head dim, F FFN size.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["SdpaESM2", "from_hf_state_dict"]

_IGNORED = ("pooler.", "contact_head.")  # HF EsmModel parts an encoder forward does not use


def _gelu(x):  # ESM's erf GELU (F.gelu differs in the last bits)
    return x * 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0)))


def _rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class _Lin(nn.Module):
    def __init__(self, n_in: int, n_out: int):
        super().__init__()
        self.dense = nn.Linear(n_in, n_out)


class _SelfAttn(nn.Module):
    def __init__(self, C: int):
        super().__init__()
        self.query, self.key, self.value = nn.Linear(C, C), nn.Linear(C, C), nn.Linear(C, C)


class _Attn(nn.Module):
    def __init__(self, C: int, eps: float):
        super().__init__()
        self.self = _SelfAttn(C)
        self.output = _Lin(C, C)
        self.LayerNorm = nn.LayerNorm(C, eps=eps)


class _Layer(nn.Module):
    def __init__(self, C: int, F_: int, eps: float):
        super().__init__()
        self.attention = _Attn(C, eps)
        self.intermediate = _Lin(C, F_)
        self.output = _Lin(F_, C)
        self.LayerNorm = nn.LayerNorm(C, eps=eps)

    def forward(self, x_BSC, cos_SD, sin_SD, keep_B11S, H: int):
        B, S, C = x_BSC.shape
        D = C // H
        sa = self.attention.self
        h = self.attention.LayerNorm(x_BSC)
        q = sa.query(h).view(B, S, H, D).transpose(1, 2) * D**-0.5
        k = sa.key(h).view(B, S, H, D).transpose(1, 2)
        v = sa.value(h).view(B, S, H, D).transpose(1, 2)
        dt = q.dtype
        q = (q.float() * cos_SD + _rotate_half(q.float()) * sin_SD).to(dt)
        k = (k.float() * cos_SD + _rotate_half(k.float()) * sin_SD).to(dt)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=keep_B11S, scale=1.0)
        x = x_BSC + self.attention.output.dense(o.transpose(1, 2).reshape(B, S, C))
        return x + self.output.dense(_gelu(self.intermediate.dense(self.LayerNorm(x))))


class _Embeddings(nn.Module):
    def __init__(self, V: int, C: int, pad: int, eps: float, ln_before: bool):
        super().__init__()
        self.word_embeddings = nn.Embedding(V, C, padding_idx=pad)
        self.layer_norm = nn.LayerNorm(C, eps=eps) if ln_before else None


class _Encoder(nn.Module):
    def __init__(self, L: int, C: int, F_: int, eps: float):
        super().__init__()
        self.layer = nn.ModuleList(_Layer(C, F_, eps) for _ in range(L))
        self.emb_layer_norm_after = nn.LayerNorm(C, eps=eps)


class SdpaESM2(nn.Module):
    """ESM2's encoder (HF ``EsmModel`` without pooler): ``forward(input_ids, attention_mask)``
    returns the last hidden state (B, S, C), after the final LayerNorm."""

    def __init__(self, cfg: dict):
        super().__init__()
        C, H = cfg["hidden_size"], cfg["num_attention_heads"]
        eps = cfg["layer_norm_eps"]
        self.H = H
        self.mask_token_id = cfg["mask_token_id"]
        self.token_dropout = bool(cfg["token_dropout"])
        self.embeddings = _Embeddings(cfg["vocab_size"], C, cfg["pad_token_id"], eps, bool(cfg["emb_layer_norm_before"]))
        self.encoder = _Encoder(cfg["num_hidden_layers"], C, cfg["intermediate_size"], eps)
        D = C // H
        inv = 1.0 / (float(cfg["rope_theta"]) ** (torch.arange(0, D, 2, dtype=torch.float32) / D))
        self.register_buffer("inv_freq", inv, persistent=False)

    def _apply(self, fn, *args, **kwargs):  # .to(bf16) keeps the rotary frequencies float32
        inv = self.inv_freq
        out = super()._apply(fn, *args, **kwargs)
        self.inv_freq = inv.to(device=self.encoder.emb_layer_norm_after.weight.device)
        return out

    def forward(self, input_ids_BS: torch.Tensor, attention_mask_BS: torch.Tensor) -> torch.Tensor:
        B, S = input_ids_BS.shape
        am = attention_mask_BS
        x = self.embeddings.word_embeddings(input_ids_BS)
        if self.token_dropout:  # HF EsmEmbeddings: <mask> embeddings zeroed, rescaled per sequence
            is_mask = input_ids_BS == self.mask_token_id
            x = x.masked_fill(is_mask[..., None], 0.0)
            observed = is_mask.sum(-1).float() / am.sum(-1)
            x = (x * (1 - 0.15 * 0.8) / (1 - observed)[:, None, None]).to(x.dtype)
        if self.embeddings.layer_norm is not None:
            x = self.embeddings.layer_norm(x)
        x = (x * am[..., None]).to(x.dtype)
        freqs = torch.arange(S, device=x.device, dtype=torch.float32)[:, None] * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)  # HF casts cos/sin to x's dtype
        keep = am.bool()[:, None, None, :]
        for layer in self.encoder.layer:
            x = layer(x, cos, sin, keep, self.H)
        return self.encoder.emb_layer_norm_after(x)


def from_hf_state_dict(cfg: dict, state_dict: dict, *, device=None, dtype=None) -> SdpaESM2:
    """The port holding exactly the weights of an HF ``EsmModel`` state dict (keys of
    transformers 4.x or 5.x; pooler, contact head and rotary ``inv_freq`` ignored). Refuses a
    missing or unexpected weight, listing it."""
    with torch.device("meta"):
        m = SdpaESM2(cfg)
    sd = {k: v for k, v in state_dict.items() if not k.startswith(_IGNORED) and not k.endswith("inv_freq")}
    sd = {k: v for k, v in sd.items() if k != "embeddings.position_ids"}
    ours = set(m.state_dict())
    missing, unexpected = sorted(ours - set(sd)), sorted(set(sd) - ours)
    if missing or unexpected:
        raise ValueError(f"sdpa port: state dict does not match an ESM2 EsmModel: missing {missing[:5]}, unexpected {unexpected[:5]}")
    m.load_state_dict(sd, assign=True)
    D = cfg["hidden_size"] // cfg["num_attention_heads"]
    m.inv_freq = 1.0 / (float(cfg["rope_theta"]) ** (torch.arange(0, D, 2, dtype=torch.float32) / D))
    return m.to(device=device if device is not None else "cpu", dtype=dtype).eval()
