"""ESM C (EvolutionaryScale's ESM Cambrian, 2024; the open 300M / 600M weights, also published as
Synthyra's "ESM++" and as transformers' ``esmc``) on anyattn, as transformers ``PreTrainedModel`` s
(``model_type`` "anyattn_esmc", registered with the Auto classes on import of this module).

Shape legend:
    B batch rows   S row length   C hidden size   H heads   D head dim (C // H = 64 in every
    published size)   F SwiGLU width   L layers   V embedding rows (64; 33 tokens are used)

One block (pre-LayerNorm, no biases in the projections; ``s = sqrt(L / 36)``, the residue
scaling of EvolutionaryScale's TransformerStack)::

    h       = LayerNorm(x)                       (with bias)
    q, k, v = split(h @ Wqkv^T, 3)               Wqkv (3C, C)
    q, k    = LayerNorm_q(q), LayerNorm_k(k)     over all C channels, no bias ("QK LayerNorm")
    q, k    = rotary(q, k)                       per head, half-split, theta 10000, float32 cos/sin
    o       = anyattn.attention(q, k, v, mask=<batch structure>, scale=D**-0.5)
    x       = x + (o @ Wo^T) / s
    a, b    = split(LayerNorm(x) @ W1^T, 2)      W1 (2F, C), F = 256 * ceil(8C / 3 / 256)
    x       = x + ((silu(a) * b) @ W2^T) / s

then a final LayerNorm without bias, and the sequence head ``Linear(C, C) -> erf GELU ->
LayerNorm -> Linear(C, V)`` (with biases) for the logits.

Parameter names are EvolutionaryScale's (``esm.models.esmc.ESMC.state_dict()``: ``embed``,
``transformer.blocks.{i}.attn.layernorm_qkv.{0,1}``, ``...q_ln``, ``...ffn.{0,1,3}``,
``transformer.norm``, ``sequence_head.{0,2,3}``), which Synthyra's ESM++ checkpoints keep; the
transformers-native layout (``esmc.layers.{i}.self_attn.q_proj`` ...) is mapped on load
(``anyattn.models.esmc_checkpoints``: key maps, strict loading, ``load_esmc``). Facts and
sources: docs/esmc.md.

transformers is imported here (the ``models`` extra); ``import anyattn.models`` does not import
this module until an ESM C name is used.
"""

from __future__ import annotations

import importlib.util
import math
import warnings
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

if importlib.util.find_spec("transformers") is None:
    raise ImportError("anyattn.models.esmc needs transformers: pip install 'anyattn[models]'")

from transformers import AutoConfig, AutoModel, AutoModelForMaskedLM, PretrainedConfig, PreTrainedModel

from ..api import attention, attention_with_weights
from ..errors import bad_value
from ..layout import SeqInfo
from ..packing import BatchPlan, plan_batch
from ._compile import LayerCompiler, check_compile_layers
from ._esmc_ankh_batch import norm_bound
from ._switches import AttnBackendSwitch, PackPaddedSwitch, backend_value
from ._inputs import check_input_ids, keep_mask
from .checkpoints import is_esmc_config, strict_from_pretrained
from .tokenizer import ProteinTokenizer

__all__ = [
    "ESMC_PRESETS", "ESMC_VOCAB", "ESMCConfig", "ESMCForMaskedLM", "ESMCModel", "ESMCOutput",
    "esmc_tokenizer", "is_esmc_config", "register_auto", "swiglu_width",
]  # fmt: skip

MODEL_TYPE = "anyattn_esmc"

# EvolutionaryScale's sequence vocabulary (esm.tokenization.EsmSequenceTokenizer; transformers'
# EsmcTokenizer): ESM2's alphabet with the chain break "|" at id 31. The embedding has 64 rows.
ESMC_VOCAB = (
    "<cls>", "<pad>", "<eos>", "<unk>",
    "L", "A", "G", "V", "S", "E", "R", "T", "I", "D", "P", "K", "Q", "N", "F", "Y", "M", "H", "W", "C",
    "X", "B", "U", "Z", "O", ".", "-", "|", "<mask>",
)  # fmt: skip


def esmc_tokenizer() -> ProteinTokenizer:
    """ESM C's tokenizer (``<cls> residues <eos>``, ids of :data:`ESMC_VOCAB`)."""
    return ProteinTokenizer(ESMC_VOCAB)


def swiglu_width(C: int, ratio: float = 8 / 3) -> int:
    """EvolutionaryScale's SwiGLU width: ``ratio * C`` rounded up to a multiple of 256."""
    return int((ratio * C + 255) // 256 * 256)


class ESMCConfig(PretrainedConfig):
    """ESM C hyper-parameters (transformers-style names). Defaults are ESM C 300M's; presets:
    :data:`ESMC_PRESETS` / :meth:`from_name`."""

    model_type = MODEL_TYPE

    def __init__(
        self,
        vocab_size: int = 64,  # embedding and logit rows (the tokenizer uses ids 0..32)
        hidden_size: int = 960,
        num_hidden_layers: int = 30,
        num_attention_heads: int = 15,
        intermediate_size: int | None = None,  # SwiGLU width F; None: swiglu_width(hidden_size)
        # divide each residual branch by sqrt(num_hidden_layers / 36) (every published checkpoint)
        scale_residue: bool = True,
        layer_norm_eps: float = 1e-5,  # torch's LayerNorm default, which the published model uses
        rope_theta: float = 10000.0,
        pad_token_id: int = 1,
        mask_token_id: int = 32,
        dropout: float = 0.0,  # residual-branch dropout, training only (ESM++'s field)
        initializer_range: float = 0.02,  # random init: normal(0, this)
        attn_backend="auto",  # anyattn backend name, or a sequence of names
        # padded / multi-row batches run as one packed row: "auto" (when the chosen backend takes
        # packed documents natively: flash_torch, flex, ...), True (always), False (never)
        pack_padded="auto",
        # torch.compile the dense compute of every block: "auto" (for inference on CUDA, where it
        # is safe: plain blocks, triton present; compiled on the first forward), True, False
        compile_layers="auto",
        vocab_list: list | None = None,  # tokens in id order (anyattn.models.load_tokenizer reads it)
        **kwargs,
    ):
        if hidden_size % num_attention_heads or (hidden_size // num_attention_heads) % 2:
            raise bad_value(
                "hidden_size",
                f"a multiple of num_attention_heads={num_attention_heads} with an even head dim",
                hidden_size,
            )
        if pack_padded not in ("auto", True, False):
            raise bad_value("pack_padded", "'auto', True or False", repr(pack_padded))
        check_compile_layers(compile_layers)
        kwargs.setdefault("tie_word_embeddings", False)  # the sequence head has its own weights
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.intermediate_size = swiglu_width(hidden_size) if intermediate_size is None else int(intermediate_size)
        self.scale_residue = bool(scale_residue)
        self.layer_norm_eps = float(layer_norm_eps)
        self.rope_theta = float(rope_theta)
        self.mask_token_id = mask_token_id
        self.dropout = float(dropout or 0.0)
        self.initializer_range = initializer_range
        self.attn_backend = backend_value(attn_backend)
        self.pack_padded = pack_padded
        self.compile_layers = compile_layers
        self.vocab_list = list(vocab_list) if vocab_list is not None else list(ESMC_VOCAB)
        super().__init__(pad_token_id=pad_token_id, **kwargs)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def residue_scale(self) -> float:
        return math.sqrt(self.num_hidden_layers / 36) if self.scale_residue else 1.0

    @classmethod
    def from_name(cls, name: str, **overrides) -> ESMCConfig:
        """A published size: "esmc_300m", "esmc_600m", "esmc_6b" (also hub-style names such as
        "EvolutionaryScale/esmc-300m-2024-12", "Synthyra/ESMplusplus_small", "biohub/ESMC-600M")."""
        key = name.split("/")[-1].lower().replace("-", "_")
        key = {"esmplusplus_small": "esmc_300m", "esmplusplus_large": "esmc_600m"}.get(key, key)
        key = next((k for k in _PRESET_SHAPES if key.startswith(k)), key)
        if key not in _PRESET_SHAPES:
            raise bad_value("name", f"one of {list(_PRESET_SHAPES)}", repr(name))
        return cls(**{**_PRESET_SHAPES[key], **overrides})

    @classmethod
    def from_config_dict(cls, raw: dict, **overrides) -> ESMCConfig:
        """From a published config.json: Synthyra's ESM++ (``model_type`` "ESMplusplus"),
        transformers' ESMC ("esmc", e.g. biohub/ESMC-300M) or ours ("anyattn_esmc")."""
        if not is_esmc_config(raw):
            raise bad_value(
                "config",
                "an ESM C config (model_type 'ESMplusplus', 'esmc' or 'anyattn_esmc')",
                f"model_type {raw.get('model_type')!r}",
            )
        mt = raw["model_type"]
        # EvolutionaryScale's own names (d_model, n_heads, n_layers) where transformers' are absent
        C, H = raw.get("hidden_size", raw.get("d_model")), raw.get("num_attention_heads", raw.get("n_heads"))
        kw = dict(
            vocab_size=raw.get("vocab_size", 64),
            hidden_size=C,
            num_hidden_layers=raw.get("num_hidden_layers", raw.get("n_layers")),
            num_attention_heads=H,
        )
        if mt == MODEL_TYPE:
            keys = ("intermediate_size", "scale_residue", "layer_norm_eps", "rope_theta", "pad_token_id", "mask_token_id", "dropout",
                    "initializer_range", "attn_backend", "pack_padded", "compile_layers", "vocab_list")  # fmt: skip
            kw.update({k: raw[k] for k in keys if k in raw})
        elif mt == "ESMplusplus":  # shape fields only; the rest is fixed by the architecture
            kw.update(dropout=raw.get("dropout", 0.0), initializer_range=raw.get("initializer_range", 0.02))
        else:  # transformers "esmc": a Llama config with ESM C's LayerNorms, QK norm and residue scaling
            bad = {k: raw.get(k) for k in ("attention_bias", "mlp_bias") if raw.get(k)}
            if raw.get("hidden_act", "silu") != "silu":
                bad["hidden_act"] = raw["hidden_act"]
            if raw.get("num_key_value_heads", H) != H:
                bad["num_key_value_heads"] = raw["num_key_value_heads"]
            if raw.get("head_dim") not in (None, (C or 0) // (H or 1)):
                bad["head_dim"] = raw["head_dim"]
            if bad:
                raise bad_value(
                    "config.json", "ESM C's architecture (no biases, silu, no GQA, head_dim = hidden/heads)", bad
                )
            rope = raw.get("rope_parameters") or {}
            kw.update(
                intermediate_size=raw.get("intermediate_size"), rope_theta=raw.get("rope_theta", rope.get("rope_theta", 10000.0)),
                pad_token_id=raw.get("pad_token_id", 1), mask_token_id=raw.get("mask_token_id", 32),
                initializer_range=raw.get("initializer_range", 0.02),
            )  # fmt: skip
        missing = [k for k, v in kw.items() if v is None and k != "intermediate_size"]
        if missing:
            raise bad_value("config.json", "an ESM C config with " + ", ".join(missing), "no value for them")
        kw.update(overrides)
        return cls(**kw)


# EvolutionaryScale's esm/pretrained.py (ESMC_300M_202412, ESMC_600M_202412) and transformers'
# EsmcConfig defaults (6B): layers, hidden, heads. FFN width from swiglu_width (2560, 3072, 6912).
_PRESET_SHAPES: dict[str, dict] = {
    name: dict(num_hidden_layers=L, hidden_size=C, num_attention_heads=H)
    for name, (L, C, H) in {"esmc_300m": (30, 960, 15), "esmc_600m": (36, 1152, 18), "esmc_6b": (80, 2560, 40)}.items()
}
# name -> ESMCConfig (ESMCConfig.from_name gives a fresh copy to modify)
ESMC_PRESETS: dict[str, ESMCConfig] = {name: ESMCConfig(**kw) for name, kw in _PRESET_SHAPES.items()}


# ---------------------------------------------------------------------------------------------
# compute


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _rope_tables(positions_BS: torch.Tensor, D: int, theta: float, dtype: torch.dtype):
    """cos, sin (B, S, 1, D) of half-split rotary (GPT-NeoX style, as EvolutionaryScale's
    RotaryEmbedding), computed once per forward in float32 (float64 for a float64 model)."""
    wide = torch.promote_types(dtype, torch.float32)
    inv = 1.0 / theta ** (torch.arange(0, D, 2, device=positions_BS.device, dtype=wide) / D)
    f = positions_BS[..., None].to(wide) * inv
    emb = torch.cat((f, f), dim=-1)[:, :, None, :]
    return emb.cos(), emb.sin()


def _rotary(q_BSHD, k_BSHD, cos, sin):
    """The rotation in the tables' precision (float32 at least), cast back once (the reference
    rotates in the input dtype: in bf16 this is the more accurate of the two)."""
    w = cos.dtype
    out = [(t.to(w) * cos + _rotate_half(t.to(w)) * sin).to(t.dtype) for t in (q_BSHD, k_BSHD)]
    return out[0], out[1]


def _qkv(x_BSC, ln_w, ln_b, eps: float, w_qkv, q_ln_w, k_ln_w, qk_eps: float, cos, sin, H: int):
    """Pre-LayerNorm, the fused (3C, C) projection, QK LayerNorm over all C channels, rotary.
    Returns q, k, v (B, S, H, D). Parameters passed in, tensors only: one torch.compile serves
    every block (see ESMCModel.compile_layers)."""
    B, S, C = x_BSC.shape
    D = C // H
    h = F.layer_norm(x_BSC, (C,), ln_w, ln_b, eps)
    q, k, v = F.linear(h, w_qkv).chunk(3, dim=-1)
    q, k = F.layer_norm(q, (C,), q_ln_w, None, qk_eps), F.layer_norm(k, (C,), k_ln_w, None, qk_eps)
    q, k = _rotary(q.reshape(B, S, H, D), k.reshape(B, S, H, D), cos, sin)
    return q, k, v.reshape(B, S, H, D)


def _out_ffn(o_BSC, x_BSC, w_o, scale: float, p: float, training: bool, ln_w, ln_b, eps: float, w1, w2):
    """Output projection + residual, pre-LayerNorm SwiGLU FFN + residual (each branch / scale)."""
    x = x_BSC + F.dropout(F.linear(o_BSC, w_o), p, training) / scale
    a, b = F.linear(F.layer_norm(x, (x.shape[-1],), ln_w, ln_b, eps), w1).chunk(2, dim=-1)
    return x + F.dropout(F.linear(F.silu(a) * b, w2), p, training) / scale


class _SwiGLU(nn.Module):
    def forward(self, x):
        a, b = x.chunk(2, dim=-1)
        return F.silu(a) * b


class _Attention(nn.Module):
    def __init__(self, cfg: ESMCConfig):
        super().__init__()
        C, eps = cfg.hidden_size, cfg.layer_norm_eps
        self.layernorm_qkv = nn.Sequential(nn.LayerNorm(C, eps=eps), nn.Linear(C, 3 * C, bias=False))
        self.out_proj = nn.Linear(C, C, bias=False)
        self.q_ln = nn.LayerNorm(C, eps=eps, bias=False)
        self.k_ln = nn.LayerNorm(C, eps=eps, bias=False)


class ESMCBlock(nn.Module):
    def __init__(self, cfg: ESMCConfig):
        super().__init__()
        C, F_ = cfg.hidden_size, cfg.intermediate_size
        self.num_heads, self.scale = cfg.num_attention_heads, cfg.residue_scale
        self.p = cfg.dropout
        self.attn = _Attention(cfg)
        self.ffn = nn.Sequential(
            nn.LayerNorm(C, eps=cfg.layer_norm_eps),
            nn.Linear(C, 2 * F_, bias=False),
            _SwiGLU(),
            nn.Linear(F_, C, bias=False),
        )

    def _plain(self) -> bool:
        """True when every projection and norm is the plain torch module (the layer functions read
        their weights directly); PEFT/LoRA and similar wrappers replace them: then the modules are
        called, so that their extra terms apply."""
        a, f = self.attn._modules, self.ffn._modules
        lq = a["layernorm_qkv"]._modules
        lns = (lq["0"], a["q_ln"], a["k_ln"], f["0"])
        lins = (lq["1"], a["out_proj"], f["1"], f["3"])
        return all(type(m) is nn.LayerNorm for m in lns) and all(type(m) is nn.Linear for m in lins) and type(f["2"]) is _SwiGLU

    def forward(self, x_BSC, batch: BatchPlan, cos, sin, backend, fns, dynamic: bool, need_weights: bool, need_s_max: bool):
        """Returns (x, attention weights or None, s_max (H,) or None). ``fns``: the layer
        functions (:func:`_qkv`, :func:`_out_ffn`, plain or compiled); ``dynamic``: mark the token
        dimension dynamic for them."""
        a = self.attn
        B, S, C = x_BSC.shape
        H = self.num_heads
        D = C // H
        plain = self._plain()
        if plain:
            if dynamic:  # compiled: one graph for every token count (packed batches vary)
                for t in (x_BSC, cos, sin):
                    torch._dynamo.maybe_mark_dynamic(t, 1)
            ln, lin = a.layernorm_qkv[0], a.layernorm_qkv[1]
            q, k, v = fns[0](x_BSC, ln.weight, ln.bias, ln.eps, lin.weight, a.q_ln.weight, a.k_ln.weight, a.q_ln.eps, cos, sin, H)
        else:
            q, k, v = a.layernorm_qkv(x_BSC).chunk(3, dim=-1)
            q, k = a.q_ln(q), a.k_ln(k)
            q, k = _rotary(q.reshape(B, S, H, D), k.reshape(B, S, H, D), cos, sin)
            v = v.reshape(B, S, H, D)
        s = norm_bound(q, k, batch.info, D**-0.5) if need_s_max else None
        # (B, S, H, D) memory, (B, H, S, D) views: the layout anyattn takes
        qh, kh, vh = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        w = None
        if need_weights:
            o, w = attention_with_weights(qh, kh, vh, mask=batch.mask, scale=D**-0.5)
        else:
            o = attention(qh, kh, vh, mask=batch.mask, scale=D**-0.5, backend=backend)
        o_BSC = o.transpose(1, 2).reshape(B, S, C)
        if plain:
            if dynamic:
                torch._dynamo.maybe_mark_dynamic(o_BSC, 1)
            ln, f = self.ffn[0], self.ffn
            x = fns[1](o_BSC, x_BSC, a.out_proj.weight, self.scale, self.p, self.training, ln.weight, ln.bias, ln.eps, f[1].weight, f[3].weight)
            return x, w, s
        x = x_BSC + F.dropout(a.out_proj(o_BSC), self.p, self.training) / self.scale
        x = x + F.dropout(self.ffn(x), self.p, self.training) / self.scale
        return x, w, s


class _Transformer(nn.Module):
    def __init__(self, cfg: ESMCConfig):
        super().__init__()
        self.blocks = nn.ModuleList(ESMCBlock(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, bias=False)


class ESMCOutput(NamedTuple):
    """Every forward returns all six fields; the optional ones are None unless asked for. ``loss``
    first, so that ``outputs[0]`` is the loss when ``labels`` are given (HF Trainer)."""

    loss: torch.Tensor | None  # masked-LM cross-entropy (labels given; -100 = ignored)
    logits: torch.Tensor | None  # (B, S, V); None from ESMCModel
    last_hidden_state: torch.Tensor  # (B, S, C) after the final LayerNorm; zeros at padding
    hidden_states: tuple | None  # L + 1 tensors (B, S, C): embeddings, blocks 1..L-1, last_hidden_state
    attentions: tuple | None  # L tensors (B, H, S, S) float32 (output_attentions=True)
    s_max: torch.Tensor | None  # (L, H) float32: max over visible pairs of D**-0.5 * ||q_i|| * ||k_j||


class ESMCPreTrainedModel(AttnBackendSwitch, PackPaddedSwitch, PreTrainedModel):
    config_class = ESMCConfig
    base_model_prefix = "esmc"  # no submodule has this name: the encoder's keys sit at the top level
    _no_split_modules = ["ESMCBlock"]
    supports_gradient_checkpointing = False

    @torch.no_grad()
    def _init_weights(self, module):
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Embedding)):
            module.weight.normal_(0.0, std)
            if getattr(module, "bias", None) is not None:
                module.bias.zero_()
        elif isinstance(module, nn.LayerNorm):
            module.weight.fill_(1.0)
            if module.bias is not None:
                module.bias.zero_()

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """transformers' ``from_pretrained``, strict: missing, unexpected or mis-shaped weights
        raise, naming them. ``strict=False`` restores transformers' warnings."""
        return strict_from_pretrained(super().from_pretrained, cls.__name__, args, kwargs)


class ESMCModel(ESMCPreTrainedModel):
    """The encoder (EvolutionaryScale's ESMC without the sequence head). ``attn_backend``
    switches every block at the next call."""

    _keys_to_ignore_on_load_unexpected = [r"^sequence_head\."]  # loads from a masked-LM checkpoint

    def __init__(self, config: ESMCConfig):
        super().__init__(config)
        self._build(config)
        self.post_init()

    def _build(self, config: ESMCConfig) -> None:
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.transformer = _Transformer(config)
        # the block functions, plain and compiled (by compile_layers(), explicitly or on first use)
        self._compiler = LayerCompiler("ESM C", (_qkv, _out_ffn))

    def compile_layers(self, **compile_kwargs) -> None:
        """torch.compile the dense compute of every block (LayerNorm + QKV projection + QK
        LayerNorm + rotary, and output projection + SwiGLU FFN with their residuals), leaving the
        attention call and the batch structure outside. ``compile_kwargs`` go to ``torch.compile``.

        The two functions take tensors only, so one compile serves every block; the token
        dimension is marked dynamic, so packed batches of any token count reuse it. Sets
        ``config.compile_layers = True``; ``"auto"`` (the default) compiles on the first
        inference forward on CUDA (anyattn.models._compile)."""
        self._compiler.compile((_qkv, _out_ffn), compile_kwargs)
        self.config.compile_layers = True

    def get_input_embeddings(self):
        return self.embed

    def set_input_embeddings(self, value):
        self.embed = value

    def _encode(
        self, input_ids, attention_mask, seq_info, inputs_embeds, output_hidden_states, output_attentions, output_s_max
    ):
        if inputs_embeds is not None:
            raise bad_value("inputs_embeds", "None (ESM C takes input_ids)", "a tensor")
        on_cpu = isinstance(input_ids, torch.Tensor) and input_ids.device.type == "cpu"
        check_input_ids(input_ids, self.config.vocab_size, check_range=on_cpu or attention_mask is not None)
        need_w = bool(output_attentions)
        cfg = self.config
        batch = plan_batch(
            input_ids, keep_mask(attention_mask, input_ids) if attention_mask is not None else None, seq_info,
            backend=cfg.attn_backend, pack=cfg.pack_padded, heads=cfg.num_attention_heads, head_dim=cfg.head_dim,
            dtype=self.embed.weight.dtype, grad=torch.is_grad_enabled() and self.training, need_weights=need_w,
            pad_id=cfg.pad_token_id, scale=cfg.head_dim**-0.5,
        )  # fmt: skip
        if need_w:
            warnings.warn(
                f"ESM C: output_attentions=True runs this call through the eager path (anyattn.attention_with_weights); attn_backend stays {self.attn_backend!r}",
                stacklevel=3,
            )
        x = self.embed(batch.ids)
        cos, sin = _rope_tables(batch.positions, self.config.head_dim, self.config.rope_theta, self.embed.weight.dtype)
        hidden = [x] if output_hidden_states else None
        attns, smax = ([] if need_w else None), ([] if output_s_max else None)
        x0, backend = x, self.config.attn_backend

        def run_layers(fns, dynamic):  # from scratch: the "auto" fallback may run it twice
            x = x0
            for acc in (hidden, attns, smax):
                if acc is not None:
                    del acc[1 if acc is hidden else 0 :]
            for block in self.transformer.blocks:
                x, w, s = block(x, batch, cos, sin, backend, fns, dynamic, need_w, bool(output_s_max))
                for acc, val in ((hidden, x), (attns, w), (smax, s)):
                    if acc is not None:
                        acc.append(val)
            return x

        grad = torch.is_grad_enabled() and self.training
        x = self.transformer.norm(self._compiler.run(self, batch.ids.device, grad, run_layers, stacklevel=3))
        if hidden is not None:
            hidden[-1] = x  # HF's convention: the last entry is after the final norm
        return batch, x, hidden, attns, (torch.stack(smax) if smax is not None else None)

    def _output(self, batch, loss, logits, x, hidden, attns, smax) -> ESMCOutput:
        rows = batch.to_rows
        return ESMCOutput(
            loss, logits, rows(x), tuple(rows(h) for h in hidden) if hidden is not None else None,
            tuple(attns) if attns is not None else None, smax,
        )  # fmt: skip

    def forward(
        self, input_ids=None, attention_mask=None, *, seq_info: SeqInfo | None = None, inputs_embeds=None,
        output_hidden_states: bool | None = False, output_attentions: bool | None = False, output_s_max: bool = False,
        return_dict: bool | None = None,
    ) -> ESMCOutput:  # fmt: skip
        """input_ids (B, S); ``attention_mask`` (B, S) (1 = real token) or ``seq_info`` (packed
        documents). Returns :class:`ESMCOutput` with ``logits=None``."""
        batch, x, hidden, attns, smax = self._encode(
            input_ids, attention_mask, seq_info, inputs_embeds, output_hidden_states, output_attentions, output_s_max
        )
        return self._output(batch, None, None, x, hidden, attns, smax)


class ESMCForMaskedLM(ESMCModel):
    """ESM C with its sequence head (logits over the 64 embedding rows). ``state_dict()`` keys
    equal EvolutionaryScale's ``ESMC`` and Synthyra's ``ESMplusplusForMaskedLM``."""

    _keys_to_ignore_on_load_unexpected = []

    def __init__(self, config: ESMCConfig):
        ESMCPreTrainedModel.__init__(self, config)
        self._build(config)
        C = config.hidden_size
        self.sequence_head = nn.Sequential(
            nn.Linear(C, C), nn.GELU(), nn.LayerNorm(C, eps=config.layer_norm_eps), nn.Linear(C, config.vocab_size)
        )
        self.post_init()

    def get_output_embeddings(self):
        return self.sequence_head[3]

    def set_output_embeddings(self, value):
        self.sequence_head[3] = value

    def forward(
        self, input_ids=None, attention_mask=None, *, labels=None, seq_info: SeqInfo | None = None, inputs_embeds=None,
        output_hidden_states: bool | None = False, output_attentions: bool | None = False, output_s_max: bool = False,
        return_dict: bool | None = None,
    ) -> ESMCOutput:  # fmt: skip
        """As :meth:`ESMCModel.forward`, plus ``logits`` (B, S, V) and, with ``labels`` (-100 =
        ignored), the masked-LM ``loss``. On the packed path the head runs on real tokens only."""
        batch, x, hidden, attns, smax = self._encode(
            input_ids, attention_mask, seq_info, inputs_embeds, output_hidden_states, output_attentions, output_s_max
        )
        logits = batch.to_rows(self.sequence_head(x))
        loss = None
        if labels is not None:
            if not isinstance(labels, torch.Tensor) or labels.shape != input_ids.shape:
                got = tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__
                raise bad_value("labels", f"a tensor of shape {tuple(input_ids.shape)} like input_ids", got)
            loss = F.cross_entropy(
                logits.reshape(-1, logits.shape[-1]).float(), labels.to(logits.device).reshape(-1), ignore_index=-100
            )
        return self._output(batch, loss, logits, x, hidden, attns, smax)


def register_auto() -> None:
    """Register the ESM C classes with AutoConfig / AutoModel / AutoModelForMaskedLM under
    model_type "anyattn_esmc" (idempotent; run on import)."""
    AutoConfig.register(MODEL_TYPE, ESMCConfig, exist_ok=True)
    AutoModel.register(ESMCConfig, ESMCModel, exist_ok=True)
    AutoModelForMaskedLM.register(ESMCConfig, ESMCForMaskedLM, exist_ok=True)


register_auto()
