"""A small Llama-style decoder LM on :class:`anyattn.nn.SelfAttention`, for training.

Shape legend: B batch rows, S row length, C width, V vocabulary, L layers.

One block (pre-RMSNorm)::

    x = x + attn(rmsnorm(x), batch, rope)              anyattn.nn.SelfAttention (GQA, rotary)
    x = x + w2(silu(w1(rmsnorm(x))) * w3(rmsnorm(x)))  SwiGLU

Per-layer sliding windows: ``sliding_window=w`` windows every layer; with ``global_every=k``
every k-th layer (k-1, 2k-1, ...) is full causal (Gemma-2/3 style interleaving).

Distributed helpers (PyTorch's own engines, no collectives written here):
``apply_fsdp`` (FSDP2 ``fully_shard`` per block, then the root), ``apply_tensor_parallel``
(DTensor ``parallelize_module``: q/k/v and w1/w3 column-wise, o and w2 row-wise, i.e. heads and
FFN columns split over the mesh). Context parallel: see docs/training.md (torch's
``context_parallel`` patches SDPA; anyattn's ``sdpa``/``cudnn`` backends with ``causal()`` run
through it).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import bad_value
from ..nn import AttentionConfig, PackedBatch, Rotary, SelfAttention, attention_flops

__all__ = [
    "DecoderConfig",
    "DECODER_PRESETS",
    "Decoder",
    "DecoderOutput",
    "decoder_flops",
    "compile_blocks",
    "apply_fsdp",
    "apply_tensor_parallel",
    "prepare_context_parallel",
    "context_parallel_backends",
]

def context_parallel_backends() -> tuple[str, ...]:
    """The backends torch's context parallel can shard: those dispatched through SDPA's ops,
    which its ring attention intercepts (their ``Facts.context_parallel``)."""
    from ..backends import REGISTRY

    return tuple(n for n, impl in REGISTRY.items() if impl.facts.context_parallel)


@dataclass(frozen=True)
class DecoderConfig:
    """Decoder hyper-parameters. Presets: :data:`DECODER_PRESETS` (``DecoderConfig.from_name``)."""

    vocab_size: int = 32000
    dim: int = 2048
    n_layers: int = 16
    n_heads: int = 16
    n_kv_heads: int = 4  # GQA
    ffn_dim: int = 8192  # SwiGLU hidden size
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    # keys beside the query in windowed layers (anyattn's sliding_window(w)); None = full causal
    sliding_window: int | None = None
    global_every: int = 0  # with a window: every k-th layer full causal (0 = none)
    softcap: float | None = None  # attention logit soft-cap
    logit_clip: float | tuple | None = None  # per-head |logit| clip (flex / eager only)
    attn_dropout: float = 0.0
    tie_embeddings: bool = False
    backend: str | tuple = "auto"  # anyattn backend for every layer

    def __post_init__(self):
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise bad_value(name, "a positive int", repr(v))
        if isinstance(self.global_every, bool) or not isinstance(self.global_every, int) or self.global_every < 0:
            raise bad_value("global_every", "an int >= 0", repr(self.global_every))
        self.attention(0)  # validates the attention fields (names the bad one)

    @classmethod
    def from_name(cls, name: str, **overrides) -> DecoderConfig:
        if name not in DECODER_PRESETS:
            raise bad_value("name", f"one of {list(DECODER_PRESETS)}", repr(name))
        return dataclasses.replace(DECODER_PRESETS[name], **overrides)

    def window(self, layer: int) -> int | None:
        if self.sliding_window is None:
            return None
        if self.global_every and (layer + 1) % self.global_every == 0:
            return None
        return self.sliding_window

    def attention(self, layer: int) -> AttentionConfig:
        return AttentionConfig(
            dim=self.dim, n_heads=self.n_heads, n_kv_heads=self.n_kv_heads, causal=True,
            sliding_window=self.window(layer), softcap=self.softcap, logit_clip=self.logit_clip,
            rope_theta=self.rope_theta, dropout=self.attn_dropout, backend=self.backend,
        )  # fmt: skip

    def num_params(self, embeddings: bool = True) -> int:
        D = self.dim // self.n_heads
        attn = self.dim * D * (2 * self.n_heads + 2 * self.n_kv_heads)
        block = attn + 3 * self.dim * self.ffn_dim + 2 * self.dim
        head = self.vocab_size * self.dim
        emb = 0 if self.tie_embeddings else self.vocab_size * self.dim
        return self.n_layers * block + self.dim + head + (emb if embeddings else 0)


DECODER_PRESETS: dict[str, DecoderConfig] = {
    # CPU tests: 2 layers, D=16, GQA 4 -> 2
    "tiny": DecoderConfig(vocab_size=256, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128),
    # ~125M with untied 32k embeddings (85M in blocks)
    "125m": DecoderConfig(vocab_size=32000, dim=768, n_layers=12, n_heads=6, n_kv_heads=2, ffn_dim=2048),
    # ~1.1B (Llama-3.2-1B-like width, D=128)
    "1b": DecoderConfig(vocab_size=32000, dim=2048, n_layers=16, n_heads=16, n_kv_heads=4, ffn_dim=8192),
}


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    def __init__(self, cfg: DecoderConfig, layer: int):
        super().__init__()
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention = SelfAttention(cfg.attention(layer))
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.feed_forward = FeedForward(cfg.dim, cfg.ffn_dim)

    def forward(self, x, batch, rope):
        x = x + self.attention(self.attention_norm(x), batch, rope)
        return x + self.feed_forward(self.ffn_norm(x))


class DecoderOutput(NamedTuple):
    logits: torch.Tensor | None  # (B, S, V); None when only the loss was asked for
    loss: torch.Tensor | None  # mean cross-entropy over labels != -100


class Decoder(nn.Module):
    """``forward(input_ids, batch=None, labels=None) -> DecoderOutput``.

    input_ids (B, S); batch a :class:`anyattn.nn.PackedBatch` (None: one sequence per row);
    labels (B, S) with -100 where no loss is taken (``batch.labels(input_ids)`` gives next-token
    labels that stop at document boundaries). With labels, the logits are not returned (they are
    the largest activation at 16k tokens x 32k vocabulary).
    """

    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.config = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self.rotary = Rotary(cfg.dim // cfg.n_heads, cfg.rope_theta)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self, std: float = 0.02) -> None:
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=std)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)

    def set_backend(self, backend) -> None:
        """Every layer's anyattn backend (a name or preference list), in place."""
        for layer in self.layers:
            layer.attention.set_backend(backend)
        self.config = dataclasses.replace(self.config, backend=backend)

    context_parallel = False  # set by prepare_context_parallel

    def forward(self, input_ids: torch.Tensor, batch: PackedBatch | None = None, labels: torch.Tensor | None = None):
        B, S = input_ids.shape
        if self.context_parallel and batch is not None and any(x is not None for x in (batch.doc_ids, batch.image_ids, batch.info)):
            raise bad_value(
                "batch", "None under context parallel: one sequence per row (the ring attention takes is_causal "
                "only, not the mask of packed documents)", "a PackedBatch with documents",
            )  # fmt: skip
        pos = batch.positions if batch is not None else torch.arange(S, device=input_ids.device).expand(B, S)
        rope = self.rotary(pos)  # once per forward, shared by every layer
        h = self.tok_embeddings(input_ids)
        for layer in self.layers:
            h = layer(h, batch, rope)
        logits = self.output(self.norm(h))
        if labels is None:
            return DecoderOutput(logits, None)
        loss = F.cross_entropy(logits.float().view(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)
        return DecoderOutput(None, loss)


def visible_pairs(cfg: DecoderConfig, lengths_per_row) -> list[int]:
    """Visible (i, j) pairs per layer for causal packed documents (host lengths, one list per
    row), honouring each layer's window: a document of n tokens with window w has
    sum_i min(i, w) + 1 pairs."""
    out = []
    for layer in range(cfg.n_layers):
        w = cfg.window(layer)
        total = 0
        for row in lengths_per_row:
            for n in row:
                if w is None or w >= n - 1:
                    total += n * (n + 1) // 2
                else:
                    total += (w + 1) * (w + 2) // 2 + (n - w - 1) * (w + 1)
        out.append(total)
    return out


def decoder_flops(cfg: DecoderConfig, tokens: int, lengths_per_row=None, backward: bool = True) -> int:
    """FLOPs of one training step (forward + backward when ``backward``): 6 (2 forward) x
    parameters in matrix products x tokens, plus attention over the visible pairs of
    ``lengths_per_row`` (4 * Hq * D per pair forward, 2.5x that backward). Embedding lookups,
    norms, rotary and softmax are left out."""
    matmul_params = cfg.num_params(embeddings=False) - cfg.n_layers * 2 * cfg.dim - cfg.dim
    dense = (6 if backward else 2) * matmul_params * int(tokens)
    if lengths_per_row is None:
        return dense
    attn_cfg = cfg.attention(0)
    return dense + sum(attention_flops(attn_cfg, p, backward) for p in visible_pairs(cfg, lengths_per_row))


# --------------------------------------------------------------------------------------------
# distributed: PyTorch's engines, applied to this model


def compile_blocks(model: Decoder, **compile_kw) -> Decoder:
    """Compile every block on its own (``torch.compile(block, fullgraph=True)`` by default),
    in place. Identical blocks share one compiled graph (per-layer windows add one per distinct
    window), so this compiles in a fraction of the whole-model time. Call it before
    :func:`apply_fsdp`, so that FSDP2's hooks sit outside the compiled blocks (torchtitan's
    order)."""
    compile_kw.setdefault("fullgraph", True)
    for i, block in enumerate(model.layers):
        model.layers[i] = torch.compile(block, **compile_kw)
    return model


def apply_fsdp(model: Decoder, mesh=None, *, mp_policy=None, reshard_after_forward: bool = True) -> Decoder:
    """FSDP2: ``fully_shard`` every block, then the root (embeddings, norm, output)."""
    from torch.distributed.fsdp import fully_shard

    kw = {"mesh": mesh, "reshard_after_forward": reshard_after_forward}
    if mp_policy is not None:
        kw["mp_policy"] = mp_policy
    for block in model.layers:
        fully_shard(block, **kw)
    fully_shard(model, **kw)
    return model


def apply_tensor_parallel(model: Decoder, tp_mesh) -> Decoder:
    """Tensor parallel over heads with DTensor: per block, wq/wk/wv and w1/w3 column-wise, wo and
    w2 row-wise (activations between blocks stay replicated). Each rank then runs anyattn on its
    own heads; the module reads the local head count from the projection output. Per-head
    parameters (the logit clip) are sliced to the rank's heads."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    cfg = model.config
    n = tp_mesh.size()
    if cfg.n_kv_heads % n or cfg.n_heads % n:
        raise bad_value("tp_mesh", f"a size dividing n_heads={cfg.n_heads} and n_kv_heads={cfg.n_kv_heads}", f"size {n}")
    if cfg.ffn_dim % n:
        raise bad_value("tp_mesh", f"a size dividing ffn_dim={cfg.ffn_dim}", f"size {n}")
    rank = tp_mesh.get_local_rank()
    plan = {
        "attention.wq": ColwiseParallel(), "attention.wk": ColwiseParallel(), "attention.wv": ColwiseParallel(),
        "attention.wo": RowwiseParallel(),
        "feed_forward.w1": ColwiseParallel(), "feed_forward.w3": ColwiseParallel(), "feed_forward.w2": RowwiseParallel(),
    }  # fmt: skip
    for block in model.layers:
        parallelize_module(block, tp_mesh, plan)
        attn = block.attention
        local = cfg.n_heads // n
        attn.head_offset = rank * local
        if hasattr(attn, "logit_clip"):
            attn.logit_clip = attn.logit_clip[attn.head_offset : attn.head_offset + local].clone()
    return model


def prepare_context_parallel(model: Decoder) -> Decoder:
    """Check that ``model`` can run under ``torch.distributed.tensor.experimental.context_parallel``
    and prepare it: full causal attention on every layer (no window, softcap, logit clip or
    dropout: the ring attention takes ``is_causal`` and nothing else), a backend from
    :func:`context_parallel_backends`, and k/v repeated to the query heads (the ring handlers take
    no GQA). Batches must be one sequence per row (no documents): shard ``input_ids``, ``labels``
    and ``positions`` with ``context_parallel(mesh, buffers=..., buffer_seq_dims=...)``."""
    from ..resolve import check_backend

    cfg = model.config
    names = check_backend(cfg.backend)
    allowed = context_parallel_backends()
    if not names or any(n not in allowed for n in names):
        raise bad_value("config.backend", f"one of {allowed} under context parallel", repr(cfg.backend))
    for name in ("sliding_window", "softcap", "logit_clip"):
        if getattr(cfg, name) is not None:
            raise bad_value(f"config.{name}", "None under context parallel (ring attention is causal only)", getattr(cfg, name))
    if cfg.attn_dropout:
        raise bad_value("config.attn_dropout", "0.0 under context parallel", cfg.attn_dropout)
    for layer in model.layers:
        layer.attention.expand_kv = True
    model.context_parallel = True  # forward refuses batches of documents (the ring takes is_causal only)
    return model
