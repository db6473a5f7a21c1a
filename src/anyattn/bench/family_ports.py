"""Compact ESM C, ANKH, E1 and DPLM models the way FastPLMs-style ports write them: the "what
users run today besides HF" rows of ``anyattn bench model --family esmc|ankh|e1|dplm``
(``sdpa_port.py`` is ESM2's).

All are uncompiled, take padded batches with ``attention_mask`` (right padding) and call
``F.scaled_dot_product_attention`` once per layer; nothing here imports anyattn's attention, so a
port is an independent statement of the network too (the benchmark compares it with the float32
reference before timing it). Module names are the published checkpoints', so a state dict of
the benchmark's weights loads as is.

* :class:`SdpaESMC` (ESM C / ESM++; EvolutionaryScale's names ``embed``,
  ``transformer.blocks.{i}.attn.layernorm_qkv.{0,1}``, ``q_ln``, ``k_ln``, ``out_proj``,
  ``ffn.{0,1,3}``, ``transformer.norm``): pre-LN blocks, fused q/k/v projection, QK LayerNorm
  over all channels, half-split rotary with cos/sin computed in float32 and cast to the
  activations' dtype and the rotation in that dtype (as EvolutionaryScale's and FastPLMs'
  RotaryEmbedding), SDPA with a boolean key mask ``(B, 1, 1, S)`` and ``scale=D**-0.5``, SwiGLU,
  each residual branch divided by ``sqrt(L / 36)``, a final LayerNorm without bias.
* :class:`SdpaAnkh` (ANKH = T5 encoder; transformers' ``T5EncoderModel`` names): RMS norms with
  float32 statistics, unscaled q.k (``scale=1.0``), T5's bidirectional bucketed relative position
  bias computed once per forward as a ``(1, H, S, S)`` tensor in the activations' dtype from block
  0's table, plus ``-inf`` at padded keys, given to SDPA as a float ``attn_mask``; gated FFN
  ``wo(act(wi_0 h) * wi_1 h)`` (act: tanh GELU for ANKH, silu for ANKH2); a final RMS norm.
* :class:`SdpaE1` (Profluent E1; the names of ``anyattn.models.E1Model``, which are the published
  checkpoint's under ``model.``): single-sequence samples only (one ``<bos>`` per row: then every
  layer, within-sequence or global, sees the whole row and the attention mask is the key padding
  mask; a row with context sequences is refused, it needs E1's sequence masks). Token plus
  sequence-0 embeddings, pre-RMSNorm layers with float32 statistics (the ANKH port's RMS
  norm), q/k/v clamped to ``clip_qkv``, NeoX rotary in float32 with
  ``rope_theta_within_seq`` or ``rope_theta_global`` by layer kind, positions counted from each
  row's first real token, SDPA with GQA (``enable_gqa``) and the default scale, gated FFN.
* :class:`SdpaDPLM` (DPLM = HF ``EsmForMaskedLM``'s network, its names): the ESM2 port above plus
  ESM's LM head ``decoder(LayerNorm(gelu(dense(h)))) + bias``; returns the logits.

Shape legend: B batch rows, S row length, C hidden, H heads, D head dim, F FFN width, N buckets.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .sdpa_port import _gelu, from_hf_state_dict

__all__ = ["SdpaAnkh", "SdpaDPLM", "SdpaE1", "SdpaESMC", "ankh_port", "dplm_port", "e1_port", "esmc_port", "t5_bucket"]


def _load(m: nn.Module, sd: dict, what: str, ignore=()) -> None:
    sd = {k: v for k, v in sd.items() if not k.startswith(ignore)}
    ours = set(m.state_dict())
    missing, unexpected = sorted(ours - set(sd)), sorted(set(sd) - ours)
    if missing or unexpected:
        raise ValueError(f"{what}: state dict does not fit: missing {missing[:5]}, unexpected {unexpected[:5]}")
    m.load_state_dict(sd, assign=True)


# ---------------------------------------------------------------------------------------------
# ESM C


def _rotate_half(x):
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


class _ESMCAttn(nn.Module):
    def __init__(self, C: int):
        super().__init__()
        self.layernorm_qkv = nn.Sequential(nn.LayerNorm(C), nn.Linear(C, 3 * C, bias=False))
        self.out_proj = nn.Linear(C, C, bias=False)
        self.q_ln = nn.LayerNorm(C, bias=False)
        self.k_ln = nn.LayerNorm(C, bias=False)


class _SwiGLU(nn.Module):
    def forward(self, x):
        a, b = x.chunk(2, dim=-1)
        return F.silu(a) * b


class _ESMCBlock(nn.Module):
    def __init__(self, C: int, F_: int):
        super().__init__()
        self.attn = _ESMCAttn(C)
        self.ffn = nn.Sequential(nn.LayerNorm(C), nn.Linear(C, 2 * F_, bias=False), _SwiGLU(), nn.Linear(F_, C, bias=False))

    def forward(self, x_BSC, cos_S1D, sin_S1D, keep_B11S, H: int, s: float):
        B, S, C = x_BSC.shape
        D = C // H
        a = self.attn
        q, k, v = a.layernorm_qkv(x_BSC).chunk(3, dim=-1)
        q, k = a.q_ln(q).to(q.dtype), a.k_ln(k).to(q.dtype)
        q, k, v = (t.view(B, S, H, D) for t in (q, k, v))
        q = q * cos_S1D + _rotate_half(q) * sin_S1D  # in the activations' dtype, as the reference
        k = k * cos_S1D + _rotate_half(k) * sin_S1D
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                           attn_mask=keep_B11S, scale=D**-0.5)  # fmt: skip
        x = x_BSC + a.out_proj(o.transpose(1, 2).reshape(B, S, C)) / s
        return x + self.ffn(x) / s


class _ESMCStack(nn.Module):
    def __init__(self, L: int, C: int, F_: int):
        super().__init__()
        self.blocks = nn.ModuleList(_ESMCBlock(C, F_) for _ in range(L))
        self.norm = nn.LayerNorm(C, bias=False)


class SdpaESMC(nn.Module):
    """ESM C's encoder (no sequence head): ``forward(input_ids, attention_mask)`` returns the last
    hidden state (B, S, C) after the final LayerNorm. ``cfg``: hidden_size, num_hidden_layers,
    num_attention_heads, intermediate_size (F), vocab_size, rope_theta, layer_norm_eps (1e-5, the
    LayerNorm default the published model uses), scale_residue."""

    def __init__(self, cfg: dict):
        super().__init__()
        C, L, H = cfg["hidden_size"], cfg["num_hidden_layers"], cfg["num_attention_heads"]
        self.H, self.theta = H, float(cfg.get("rope_theta", 10000.0))
        self.s = math.sqrt(L / 36) if cfg.get("scale_residue", True) else 1.0
        self.embed = nn.Embedding(cfg["vocab_size"], C)
        self.transformer = _ESMCStack(L, C, cfg["intermediate_size"])

    def forward(self, input_ids_BS: torch.Tensor, attention_mask_BS: torch.Tensor) -> torch.Tensor:
        S = input_ids_BS.shape[1]
        x = self.embed(input_ids_BS)
        D = x.shape[-1] // self.H
        inv = 1.0 / self.theta ** (torch.arange(0, D, 2, device=x.device, dtype=torch.float32) / D)
        f = torch.outer(torch.arange(S, device=x.device, dtype=torch.float32), inv)
        emb = torch.cat((f, f), dim=-1)[:, None, :]  # (S, 1, D)
        cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
        keep = attention_mask_BS.bool()[:, None, None, :]  # keys only: padded queries stay finite
        for blk in self.transformer.blocks:
            x = blk(x, cos, sin, keep, self.H, self.s)
        return self.transformer.norm(x)


def esmc_port(cfg: dict, state_dict: dict, *, device=None, dtype=None) -> SdpaESMC:
    """The ESM C port holding exactly ``state_dict`` (EvolutionaryScale's names; a
    ``sequence_head`` is ignored). Refuses a missing or unexpected weight, listing it."""
    with torch.device("meta"):
        m = SdpaESMC(cfg)
    _load(m, state_dict, "ESM C sdpa port", ignore=("sequence_head.",))
    return m.to(device=device if device is not None else "cpu", dtype=dtype).eval()


# ---------------------------------------------------------------------------------------------
# ANKH (T5 encoder)


def t5_bucket(rel: torch.Tensor, num_buckets: int, max_distance: int) -> torch.Tensor:
    """T5's bidirectional bucket of a relative position ``rel = j - i``: half the buckets per
    direction (the upper half for keys after the query), exact up to a quarter of the buckets,
    then logarithmic up to ``max_distance``, the last bucket beyond."""
    n = num_buckets // 2
    out = (rel > 0).long() * n
    a = rel.abs()
    exact = n // 2
    a_f = a.float().clamp(min=1.0)  # log(0) is never used: those positions take the exact branch
    large = exact + (torch.log(a_f / exact) / math.log(max_distance / exact) * (n - exact)).long()
    large = large.clamp(max=n - 1)
    return out + torch.where(a < exact, a, large)


def _gelu_tanh(x):
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))


class _RMS(nn.Module):
    def __init__(self, C: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(C))
        self.eps = eps

    def forward(self, x):
        var = x.float().pow(2).mean(-1, keepdim=True)
        return self.weight * (x * torch.rsqrt(var + self.eps)).to(self.weight.dtype)


class _T5SelfAttn(nn.Module):
    def __init__(self, C: int, inner: int, H: int, N: int, first: bool):
        super().__init__()
        self.q, self.k, self.v = (nn.Linear(C, inner, bias=False) for _ in range(3))
        self.o = nn.Linear(inner, C, bias=False)
        if first:
            self.relative_attention_bias = nn.Embedding(N, H)


class _T5AttnLayer(nn.Module):
    def __init__(self, C, inner, H, N, eps, first):
        super().__init__()
        self.SelfAttention = _T5SelfAttn(C, inner, H, N, first)
        self.layer_norm = _RMS(C, eps)


class _T5Gated(nn.Module):
    def __init__(self, C: int, F_: int):
        super().__init__()
        self.wi_0, self.wi_1 = nn.Linear(C, F_, bias=False), nn.Linear(C, F_, bias=False)
        self.wo = nn.Linear(F_, C, bias=False)


class _T5FFLayer(nn.Module):
    def __init__(self, C, F_, eps):
        super().__init__()
        self.DenseReluDense = _T5Gated(C, F_)
        self.layer_norm = _RMS(C, eps)


class _T5Block(nn.Module):
    def __init__(self, C, inner, H, N, F_, eps, first):
        super().__init__()
        self.layer = nn.ModuleList((_T5AttnLayer(C, inner, H, N, eps, first), _T5FFLayer(C, F_, eps)))

    def forward(self, x_BSC, bias_BHSS, H: int, D: int, act):
        B, S, _ = x_BSC.shape
        att, ff = self.layer
        sa = att.SelfAttention
        h = att.layer_norm(x_BSC)
        q, k, v = (p(h).view(B, S, H, D).transpose(1, 2) for p in (sa.q, sa.k, sa.v))
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=bias_BHSS, scale=1.0)
        x = x_BSC + sa.o(o.transpose(1, 2).reshape(B, S, H * D))
        g = ff.DenseReluDense
        h = ff.layer_norm(x)
        return x + g.wo(act(g.wi_0(h)) * g.wi_1(h))


class _T5Encoder(nn.Module):
    def __init__(self, L, C, inner, H, N, F_, eps):
        super().__init__()
        self.block = nn.ModuleList(_T5Block(C, inner, H, N, F_, eps, i == 0) for i in range(L))
        self.final_layer_norm = _RMS(C, eps)


class SdpaAnkh(nn.Module):
    """ANKH's encoder: ``forward(input_ids, attention_mask)`` returns the last hidden state
    (B, S, C) after the final RMS norm. ``cfg``: T5Config field names (d_model, d_kv, d_ff,
    num_layers, num_heads, relative_attention_num_buckets, relative_attention_max_distance,
    layer_norm_epsilon, vocab_size, dense_act_fn)."""

    def __init__(self, cfg: dict):
        super().__init__()
        C, D, H = cfg["d_model"], cfg["d_kv"], cfg["num_heads"]
        N = cfg["relative_attention_num_buckets"]
        self.H, self.D, self.N, self.max_distance = H, D, N, cfg["relative_attention_max_distance"]
        self.act = F.silu if cfg.get("dense_act_fn", "gelu_new") in ("silu", "swish") else _gelu_tanh
        self.shared = nn.Embedding(cfg["vocab_size"], C)
        self.encoder = _T5Encoder(cfg["num_layers"], C, H * D, H, N, cfg["d_ff"], cfg.get("layer_norm_epsilon", 1e-6))

    def forward(self, input_ids_BS: torch.Tensor, attention_mask_BS: torch.Tensor) -> torch.Tensor:
        S = input_ids_BS.shape[1]
        x = self.shared(input_ids_BS)
        pos = torch.arange(S, device=x.device)
        buckets = t5_bucket(pos[None, :] - pos[:, None], self.N, self.max_distance)  # (S, S): key - query
        table = self.encoder.block[0].layer[0].SelfAttention.relative_attention_bias
        bias = table(buckets).permute(2, 0, 1)[None].to(x.dtype)  # (1, H, S, S)
        pad = torch.zeros(attention_mask_BS.shape, dtype=x.dtype, device=x.device)
        pad = pad.masked_fill(attention_mask_BS == 0, float("-inf"))[:, None, None, :]
        bias = bias + pad  # (B, H, S, S): the relative bias and -inf at padded keys, shared by every layer
        for blk in self.encoder.block:
            x = blk(x, bias, self.H, self.D, self.act)
        return self.encoder.final_layer_norm(x)


def ankh_port(cfg: dict, state_dict: dict, *, device=None, dtype=None) -> SdpaAnkh:
    """The ANKH port holding exactly ``state_dict`` (transformers' T5 encoder names; the tied
    ``encoder.embed_tokens.weight`` stands in for ``shared.weight`` when that is absent; a decoder
    and LM head are ignored). Refuses a missing or unexpected weight, listing it."""
    sd = dict(state_dict)
    emb = sd.pop("encoder.embed_tokens.weight", None)
    if emb is not None:
        sd.setdefault("shared.weight", emb)
    with torch.device("meta"):
        m = SdpaAnkh(cfg)
    _load(m, sd, "ANKH sdpa port", ignore=("decoder.", "lm_head."))
    return m.to(device=device if device is not None else "cpu", dtype=dtype).eval()


# ---------------------------------------------------------------------------------------------
# E1 (single-sequence samples)


class _E1SelfAttn(nn.Module):
    def __init__(self, C: int, H: int, G: int, D: int):
        super().__init__()
        self.q_proj, self.k_proj = nn.Linear(C, H * D, bias=False), nn.Linear(C, G * D, bias=False)
        self.v_proj, self.o_proj = nn.Linear(C, G * D, bias=False), nn.Linear(H * D, C, bias=False)


class _E1NormAttnNorm(nn.Module):
    def __init__(self, C, H, G, D, eps):
        super().__init__()
        self.self_attn = _E1SelfAttn(C, H, G, D)
        self.input_layernorm, self.post_attention_layernorm = _RMS(C, eps), _RMS(C, eps)


class _E1MLP(nn.Module):
    def __init__(self, C: int, F_: int, gated: bool):
        super().__init__()
        self.w1, self.w2 = nn.Linear(C, F_, bias=False), nn.Linear(F_, C, bias=False)
        self.w3 = nn.Linear(C, F_, bias=False) if gated else None


class _E1FFN(nn.Module):
    def __init__(self, C, F_, gated):
        super().__init__()
        self.mlp = _E1MLP(C, F_, gated)


class _E1Layer(nn.Module):
    def __init__(self, C, H, G, F_, eps, gated):
        super().__init__()
        self.norm_attn_norm = _E1NormAttnNorm(C, H, G, C // H, eps)
        self.ffn = _E1FFN(C, F_, gated)

    def forward(self, x_BSC, cos_BS1D, sin_BS1D, keep_B11S, H: int, G: int, clip, act):
        B, S, C = x_BSC.shape
        D = C // H
        na = self.norm_attn_norm
        sa = na.self_attn
        h = na.input_layernorm(x_BSC)
        q, k, v = sa.q_proj(h).view(B, S, H, D), sa.k_proj(h).view(B, S, G, D), sa.v_proj(h).view(B, S, G, D)
        if clip is not None:
            q, k, v = q.clamp(-clip, clip), k.clamp(-clip, clip), v.clamp(-clip, clip)
        dt = q.dtype
        q = (q.float() * cos_BS1D + _rotate_half(q.float()) * sin_BS1D).to(dt)
        k = (k.float() * cos_BS1D + _rotate_half(k.float()) * sin_BS1D).to(dt)
        o = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=keep_B11S, enable_gqa=G != H
        )  # fmt: skip
        x = x_BSC + sa.o_proj(o.transpose(1, 2).reshape(B, S, C))
        h = na.post_attention_layernorm(x)
        mlp = self.ffn.mlp
        a = act(mlp.w1(h))
        if mlp.w3 is not None:
            a = a * mlp.w3(h)
        return x + mlp.w2(a)


_E1_ACTS = {"silu": F.silu, "swish": F.silu, "gelu": F.gelu, "relu": F.relu}


class SdpaE1(nn.Module):
    """E1's encoder for single-sequence samples: ``forward(input_ids, attention_mask)`` returns
    the last hidden state (B, S, C) after the final RMSNorm. ``cfg``: E1Config field names."""

    def __init__(self, cfg: dict):
        super().__init__()
        C, L, H = cfg["hidden_size"], cfg["num_hidden_layers"], cfg["num_attention_heads"]
        G = cfg.get("num_key_value_heads") or H
        eps = cfg["rms_norm_eps"]
        if cfg["hidden_act"] not in _E1_ACTS:
            raise ValueError(f"E1 sdpa port: hidden_act one of {sorted(_E1_ACTS)}, not {cfg['hidden_act']!r}")
        self.H, self.G, self.clip, self.act = H, G, cfg.get("clip_qkv"), _E1_ACTS[cfg["hidden_act"]]
        self.bos = cfg["bos_token_id"]
        n = cfg["global_attention_every_n_layers"]
        self.is_global = [n > 0 and (i + 1) % n == 0 for i in range(L)]
        self.thetas = (float(cfg["rope_theta_within_seq"]), float(cfg["rope_theta_global"]))
        self.embed_tokens = nn.Embedding(cfg["vocab_size"], C, padding_idx=cfg["pad_token_id"])
        self.embed_seq_id = nn.Embedding(cfg["max_num_sequences"], C)
        self.layers = nn.ModuleList(_E1Layer(C, H, G, cfg["intermediate_size"], eps, cfg["gated_mlp"]) for _ in range(L))
        self.norm = _RMS(C, eps)

    def forward(self, input_ids_BS: torch.Tensor, attention_mask_BS: torch.Tensor) -> torch.Tensor:
        am = attention_mask_BS.bool()
        n_bos = ((input_ids_BS == self.bos) & am).sum(-1)
        if bool((n_bos != 1).any()):  # one host read per forward (anyattn's E1Model reads its batch structure too)
            raise ValueError(f"E1 sdpa port: one <bos> (id {self.bos}) per row (single-sequence samples); got {n_bos.tolist()}")
        x = self.embed_tokens(input_ids_BS) + self.embed_seq_id.weight[0]
        D = x.shape[-1] // self.H
        pos = (am.long().cumsum(-1) - 1).clamp(min=0).float()  # from each row's first real token
        rope = []
        for theta in self.thetas:
            inv = 1.0 / theta ** (torch.arange(0, D, 2, device=x.device, dtype=torch.float32) / D)
            f = pos[..., None] * inv
            emb = torch.cat((f, f), dim=-1)[:, :, None, :]  # (B, S, 1, D) float32
            rope.append((emb.cos(), emb.sin()))
        keep = am[:, None, None, :]
        for layer, glob in zip(self.layers, self.is_global):
            cos, sin = rope[int(glob)]
            x = layer(x, cos, sin, keep, self.H, self.G, self.clip, self.act)
        return self.norm(x)


def e1_port(cfg: dict, state_dict: dict, *, device=None, dtype=None) -> SdpaE1:
    """The E1 port holding exactly ``state_dict`` (``E1Model`` names, or the published
    ``model.``-prefixed ones; an ``mlm_head`` is ignored). Refuses a missing or unexpected weight."""
    sd = {k.removeprefix("model."): v for k, v in state_dict.items()}
    with torch.device("meta"):
        m = SdpaE1(cfg)
    _load(m, sd, "E1 sdpa port", ignore=("mlm_head.",))
    return m.to(device=device if device is not None else "cpu", dtype=dtype).eval()


# ---------------------------------------------------------------------------------------------
# DPLM (ESM2's encoder, ESM's LM head)


class _EsmLMHead(nn.Module):
    def __init__(self, C: int, V: int, eps: float):
        super().__init__()
        self.dense = nn.Linear(C, C)
        self.layer_norm = nn.LayerNorm(C, eps=eps)
        self.decoder = nn.Linear(C, V, bias=False)
        self.bias = nn.Parameter(torch.zeros(V))

    def forward(self, h):  # ESM's erf GELU
        return self.decoder(self.layer_norm(_gelu(self.dense(h)))) + self.bias


class SdpaDPLM(nn.Module):
    """DPLM's masked LM: :class:`~anyattn.bench.sdpa_port.SdpaESM2` then ESM's LM head;
    ``forward(input_ids, attention_mask)`` returns the logits (B, S, V)."""

    def __init__(self, esm: nn.Module, head: _EsmLMHead):
        super().__init__()
        self.esm, self.lm_head = esm, head

    def forward(self, input_ids_BS: torch.Tensor, attention_mask_BS: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.esm(input_ids_BS, attention_mask_BS))


def dplm_port(cfg: dict, state_dict: dict, *, device=None, dtype=None) -> SdpaDPLM:
    """The DPLM port holding exactly ``state_dict`` (HF ``EsmForMaskedLM`` names: ``esm.*``,
    ``lm_head.*``; a missing ``lm_head.decoder.weight`` is the tied word embeddings). Refuses a
    missing or unexpected weight."""
    unexpected = sorted(k for k in state_dict if not k.startswith(("esm.", "lm_head.")))
    if unexpected:
        raise ValueError(f"DPLM sdpa port: state dict does not fit: unexpected {unexpected[:5]}")
    esm = from_hf_state_dict(cfg, {k[4:]: v for k, v in state_dict.items() if k.startswith("esm.")}, device=device, dtype=dtype)
    head_sd = {k[8:]: v for k, v in state_dict.items() if k.startswith("lm_head.")}
    head_sd.setdefault("decoder.weight", state_dict.get("esm.embeddings.word_embeddings.weight"))
    with torch.device("meta"):
        head = _EsmLMHead(cfg["hidden_size"], cfg["vocab_size"], cfg["layer_norm_eps"])
    _load(head, {k: v for k, v in head_sd.items() if v is not None}, "DPLM sdpa port (lm_head)")
    head = head.to(device=device if device is not None else "cpu", dtype=dtype)
    return SdpaDPLM(esm, head).eval()
