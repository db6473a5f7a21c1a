"""Training layers on anyattn: a self-attention module whose variant is configuration.

Shape legend:
    B batch rows   S row length   C model width   Hq query heads   Hkv key/value heads
    D head dim     T tokens

One layer::

    x_BSC ──> q = wq(x), k = wk(x), v = wv(x)        (B, S, H*D) -> (B, S, H, D), H local heads
              q, k = rope(q, k, positions)           float32 cos/sin; positions restart per document
              o = anyattn.attention(q, k, v, mask=<config x batch>, score=<softcap, logit clip>)
    out = wo(o)

The variant (causal, sliding window, softcap, per-head logit clip, dropout, backend) is fixed in
:class:`AttentionConfig`; the batch structure (packed documents, padding, image scopes) comes per
step in a :class:`PackedBatch`. The mask of one layer::

    same_segment(doc_ids) & (window | same_segment(image_ids))     window = causal() or
                                                                    sliding_window(w)
    documents(seq_info)   & (window | same_segment(image_ids))     when the batch carries host
                                                                    metadata (varlen backends)

Two ways to describe packed documents, for two needs:

* **Device ids** (``PackedBatch.from_position_ids`` / ``from_seq_info(info)``): ``doc_ids`` and
  ``positions`` are tensors; nothing about the structure is a Python value, so a whole-model
  ``torch.compile`` does not recompile when document lengths change from step to step. Backends:
  flex (the fast one on CUDA), cudnn/sdpa (dense mask, slow), eager.
* **Host metadata** (``from_seq_info(info, host=True)``): the mask is ``documents(info)``, whose
  ``cu_seqlens``/``max_seqlen`` the varlen kernels (flash_torch) need as Python values. Under
  ``torch.compile`` each distinct structure compiles once: use it uncompiled, or compiled with a
  fixed structure.

Tensor parallel over heads (``anyattn.models.decoder.apply_tensor_parallel``): wq/wk/wv are
column-sharded and wo row-sharded, so each rank sees its own heads; this module reads the local
head count from the projection output and keeps ``head_offset`` for per-head parameters.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .api import _requested, attention
from .errors import bad_type, bad_value
from .layout import SeqInfo, host_to_device
from .backends import REGISTRY
from .resolve import check_backend, facts_of
from .spec import causal, documents, same_segment, score_fn, sliding_window, softcap

__all__ = ["AttentionConfig", "PackedBatch", "SelfAttention", "Rotary", "apply_rotary", "attention_flops"]



@dataclass(frozen=True)
class AttentionConfig:
    """One attention layer's shape and variant."""

    dim: int  # model width C
    n_heads: int  # query heads Hq
    n_kv_heads: int | None = None  # key/value heads Hkv (GQA when < n_heads); None = n_heads
    head_dim: int | None = None  # D; None = dim // n_heads
    causal: bool = True  # decoder (True) or bidirectional (False)
    # keys visible beside the query itself: causal -> sliding_window(w) (w earlier keys), else
    # sliding_window(w, w). HF's ``sliding_window=W`` (W keys including self) is W - 1 here.
    sliding_window: int | None = None
    softcap: float | None = None  # s <- cap * tanh(s / cap) (Gemma-2)
    # per-head logit clip |s| <= clip[h] after softcap: one float for all heads or one per head.
    # Expressed with anyattn.score_fn, so only flex and eager serve it.
    logit_clip: float | tuple | None = None
    rope_theta: float | None = 10000.0  # None = no rotary embedding
    dropout: float = 0.0  # attention-weight dropout while training (sdpa, cudnn, eager only)
    bias: bool = False  # biases on the q/k/v/o projections
    backend: str | tuple = "auto"  # anyattn backend name or preference list

    def __post_init__(self):
        for name in ("dim", "n_heads"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise bad_value(name, "a positive int", repr(v))
        kv = self.kv_heads
        if isinstance(kv, bool) or not isinstance(kv, int) or kv <= 0 or self.n_heads % kv:
            raise bad_value("n_kv_heads", f"a positive divisor of n_heads={self.n_heads}", repr(self.n_kv_heads))
        if self.head_dim is None and self.dim % self.n_heads:
            raise bad_value("dim", f"a multiple of n_heads={self.n_heads} (or give head_dim)", self.dim)
        if self.sliding_window is not None and (
            isinstance(self.sliding_window, bool) or not isinstance(self.sliding_window, int) or self.sliding_window < 0
        ):
            raise bad_value("sliding_window", "None or an int >= 0", repr(self.sliding_window))
        if self.softcap is not None and not (isinstance(self.softcap, (int, float)) and self.softcap > 0):
            raise bad_value("softcap", "None or a positive float", repr(self.softcap))
        clip = self.logit_clip
        if clip is not None:
            vals = clip if isinstance(clip, (tuple, list)) else (clip,)
            if isinstance(clip, (tuple, list)) and len(clip) != self.n_heads:
                raise bad_value("logit_clip", f"one float or {self.n_heads} (one per head)", f"{len(clip)} values")
            if not all(isinstance(c, (int, float)) and not isinstance(c, bool) and c > 0 for c in vals):
                raise bad_value("logit_clip", "positive floats", repr(clip))
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            raise bad_value("dropout", "a float in [0, 1)", repr(self.dropout))
        # checked where the config is built (from the backends' facts), so that a training run
        # fails at construction, not at the first step
        names = check_backend(self.backend)  # raises on unknown names, listing the valid ones
        if self.dropout > 0 and names != ("auto",) and not any(f.dropout for f in facts_of(names)):
            with_dropout = [n for n, impl in REGISTRY.items() if impl.facts.dropout]
            raise bad_value(
                "dropout", f"0.0 with backend={self.backend!r} (no attention dropout there); use one of {with_dropout}",
                self.dropout,
            )
        if clip is not None and names != ("auto",) and not any(f.score_fn for f in facts_of(names)):
            with_fn = [n for n, impl in REGISTRY.items() if impl.facts.score_fn]
            raise bad_value(
                "backend", f"one of {with_fn} (the per-head logit clip is a score_fn) or 'auto'", repr(self.backend)
            )
        if clip is not None and self.dropout > 0:
            raise bad_value("dropout", "0.0 with logit_clip (flex has no dropout, eager is the only other path)", self.dropout)

    @property
    def kv_heads(self) -> int:
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    @property
    def dhead(self) -> int:
        return self.head_dim if self.head_dim is not None else self.dim // self.n_heads


@dataclass(frozen=True, eq=False)
class PackedBatch:
    """The structure of one batch, shared by every layer. Build with a ``from_*`` constructor.

    positions (B, S) int64: position inside the document (rotary); doc_ids (B, S) int32: document
    id per token, -1 for padding (None: one sequence per row, no padding); image_ids (B, S) int32:
    image scope per token, -1 for text (tokens of one image see each other bidirectionally);
    info: the :class:`anyattn.SeqInfo`, set only with ``host=True`` (varlen backends).
    """

    positions: torch.Tensor
    doc_ids: torch.Tensor | None = None
    image_ids: torch.Tensor | None = None
    info: SeqInfo | None = None

    @classmethod
    def from_position_ids(cls, position_ids: torch.Tensor, *, image_ids: torch.Tensor | None = None) -> PackedBatch:
        """From ``position_ids`` (B, S) that restart at 0 for every document (HF's flattening
        collator). Device ops only: no host sync, and nothing the compiler guards on."""
        if not isinstance(position_ids, torch.Tensor) or position_ids.dtype.is_floating_point or position_ids.dim() != 2:
            got = f"shape {tuple(position_ids.shape)} dtype {position_ids.dtype}" if isinstance(position_ids, torch.Tensor) else type(position_ids).__name__
            raise bad_value("position_ids", "a (B, S) integer tensor", got)
        pos = position_ids.to(torch.int64)
        doc = (torch.cumsum((pos == 0).to(torch.int32), dim=-1) - 1).to(torch.int32)
        return cls(pos, doc, _check_ids("image_ids", image_ids, pos.shape))

    @classmethod
    def from_seq_info(cls, info: SeqInfo, *, image_ids: torch.Tensor | None = None, host: bool = False) -> PackedBatch:
        """From a :class:`anyattn.SeqInfo` (packed documents or a padding mask). ``host=True``
        keeps the SeqInfo so that varlen backends (flash_torch) can serve the call; see the
        module docstring for what that means under torch.compile."""
        if not isinstance(info, SeqInfo):
            raise bad_type("info", "an anyattn.SeqInfo", type(info).__name__)
        ids = _check_ids("image_ids", image_ids, (info.B, info.S))
        if host and info.kind != "documents":
            raise bad_value("info", "a SeqInfo of packed documents with host=True", f"kind {info.kind!r}")
        return cls(info.positions, info.doc_ids, ids, info if host else None)

    @classmethod
    def from_lengths(cls, lengths, *, total_length: int, device=None, host: bool = False) -> PackedBatch:
        """From document lengths per row (a list, or a list of lists); see SeqInfo.from_lengths."""
        return cls.from_seq_info(SeqInfo.from_lengths(lengths, total_length=total_length, device=device), host=host)

    def to(self, device) -> PackedBatch:
        mv = lambda t: None if t is None else host_to_device(t, device)  # noqa: E731
        return PackedBatch(mv(self.positions), mv(self.doc_ids), mv(self.image_ids), None if self.info is None else self.info.to(device))

    def labels(self, input_ids: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
        """Next-token labels that never cross a document boundary: labels[t] = input_ids[t + 1]
        when t + 1 is in t's document, else ``ignore_index``."""
        nxt = torch.full_like(input_ids, ignore_index)
        nxt[:, :-1] = input_ids[:, 1:]
        if self.doc_ids is not None:
            same = torch.zeros_like(input_ids, dtype=torch.bool)
            same[:, :-1] = (self.doc_ids[:, 1:] == self.doc_ids[:, :-1]) & (self.doc_ids[:, :-1] >= 0)
            nxt = torch.where(same, nxt, ignore_index)
        return nxt


def _check_ids(name: str, ids, shape) -> torch.Tensor | None:
    if ids is None:
        return None
    if not isinstance(ids, torch.Tensor) or ids.dtype.is_floating_point or ids.dtype == torch.bool:
        raise bad_type(name, "an integer tensor (B, S)", type(ids).__name__ if not isinstance(ids, torch.Tensor) else ids.dtype)
    if tuple(ids.shape) != tuple(shape):
        raise bad_value(name, f"shape {tuple(shape)}", f"shape {tuple(ids.shape)}")
    return ids.to(torch.int32)


# --------------------------------------------------------------------------------------------
# rotary embedding (Llama / HF rotate-half convention)


class Rotary(nn.Module):
    """cos/sin (B, S, 1, D) float32 from positions (B, S); inv_freq stays float32 under .to(dtype)."""

    def __init__(self, head_dim: int, theta: float = 10000.0):
        super().__init__()
        if head_dim % 2:
            raise bad_value("head_dim", "an even head dim for rotary embeddings", head_dim)
        inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        self.register_buffer("inv_freq", inv, persistent=False)

    def _apply(self, fn, *args, **kwargs):
        inv = self.inv_freq
        super()._apply(fn, *args, **kwargs)
        self.inv_freq = inv.to(self.inv_freq.device)  # device moves only: rotary stays float32
        return self

    def forward(self, positions_BS: torch.Tensor):
        f = positions_BS.to(torch.float32)[..., None] * self.inv_freq  # (B, S, D/2)
        emb = torch.cat((f, f), dim=-1)[:, :, None, :]
        return emb.cos(), emb.sin()


def _rotate_half(x):
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


def apply_rotary(x_BSHD: torch.Tensor, cos, sin) -> torch.Tensor:
    """Rotate (B, S, H, D) by cos/sin (B, S, 1, D), in float32, back to x's dtype."""
    xf = x_BSHD.float()
    return (xf * cos + _rotate_half(xf) * sin).to(x_BSHD.dtype)


# --------------------------------------------------------------------------------------------
# the module


class SelfAttention(nn.Module):
    """q/k/v/o projections, GQA, rotary, and one anyattn call whose variant is ``config``.

    ``forward(x_BSC, batch=None, rope=None)``: x (B, S, C); batch a :class:`PackedBatch` (None:
    one sequence per row, positions 0..S-1); rope an optional precomputed (cos, sin) shared by
    layers. Returns (B, S, C).
    """

    def __init__(self, config: AttentionConfig):
        super().__init__()
        if not isinstance(config, AttentionConfig):
            raise bad_type("config", "an AttentionConfig", type(config).__name__)
        self.config = c = config
        D = c.dhead
        self.wq = nn.Linear(c.dim, c.n_heads * D, bias=c.bias)
        self.wk = nn.Linear(c.dim, c.kv_heads * D, bias=c.bias)
        self.wv = nn.Linear(c.dim, c.kv_heads * D, bias=c.bias)
        self.wo = nn.Linear(c.n_heads * D, c.dim, bias=c.bias)
        self.rotary = Rotary(D, c.rope_theta) if c.rope_theta is not None else None
        # tensor-free terms: built once (their cache keys never change)
        if c.sliding_window is None:
            self._window = causal() if c.causal else None
        else:
            self._window = sliding_window(c.sliding_window) if c.causal else sliding_window(c.sliding_window, c.sliding_window)
        scores = [softcap(float(c.softcap))] if c.softcap is not None else []
        if c.logit_clip is not None:
            vals = c.logit_clip if isinstance(c.logit_clip, (tuple, list)) else (c.logit_clip,) * c.n_heads
            self.register_buffer("logit_clip", torch.tensor(vals, dtype=torch.float32), persistent=False)
            scores.append(score_fn(self._clip))
        self._scores = tuple(scores) or None
        self.head_offset = 0  # first global head of this rank (tensor parallel)
        # repeat k/v to the query heads before the call: torch's context-parallel SDPA handlers
        # take no enable_gqa (set by anyattn.models.decoder.prepare_context_parallel)
        self.expand_kv = False
        # anyattn memoizes the normalized backend argument in a module dict that a compiled
        # forward guards on; filling it now keeps the first uncompiled call from invalidating
        # the compiled graph (one avoidable recompile, seen on torch 2.13).
        _requested(c.backend)

    def set_backend(self, backend) -> None:
        """Use another anyattn backend (validated like the config field)."""
        import dataclasses

        self.config = dataclasses.replace(self.config, backend=backend)
        _requested(backend)

    def _clip(self, s, b, h, q_idx, kv_idx):  # score_fn: |s| <= clip[h]
        c = self.logit_clip[h]
        return torch.clamp(s, -c, c)

    def mask_for(self, batch: PackedBatch | None):
        """The mask term of this layer for ``batch`` (see the module docstring)."""
        win = self._window
        if batch is None:
            return win
        scope = win
        if batch.image_ids is not None and win is not None:
            scope = win | same_segment(batch.image_ids)
        if batch.info is not None:
            seq = documents(batch.info)
        elif batch.doc_ids is not None:
            seq = same_segment(batch.doc_ids)
        else:
            return scope
        return seq if scope is None else seq & scope

    def forward(self, x_BSC: torch.Tensor, batch: PackedBatch | None = None, rope=None) -> torch.Tensor:
        c = self.config
        B, S, _ = x_BSC.shape
        D = c.dhead
        q, k, v = self.wq(x_BSC), self.wk(x_BSC), self.wv(x_BSC)
        # heads from the projections' widths: local heads under tensor parallel (and no -1, which
        # a view of zero tokens cannot infer)
        q_BSHD, k_BSHD, v_BSHD = (t.view(B, S, t.shape[-1] // D, D) for t in (q, k, v))
        if self.rotary is not None:
            if rope is None:
                pos = batch.positions if batch is not None else torch.arange(S, device=x_BSC.device).expand(B, S)
                rope = self.rotary(pos)
            q_BSHD, k_BSHD = apply_rotary(q_BSHD, *rope), apply_rotary(k_BSHD, *rope)
        if self.expand_kv and k_BSHD.shape[2] != q_BSHD.shape[2]:
            g = q_BSHD.shape[2] // k_BSHD.shape[2]
            k_BSHD, v_BSHD = k_BSHD.repeat_interleave(g, dim=2), v_BSHD.repeat_interleave(g, dim=2)
        o_BHSD = attention(
            q_BSHD.transpose(1, 2), k_BSHD.transpose(1, 2), v_BSHD.transpose(1, 2),
            mask=self.mask_for(batch), score=self._scores, backend=c.backend,
            dropout_p=c.dropout if self.training else 0.0,
        )  # fmt: skip
        return self.wo(o_BHSD.transpose(1, 2).reshape(B, S, o_BHSD.shape[1] * o_BHSD.shape[3]))


def attention_flops(config: AttentionConfig, visible_pairs: int, backward: bool = True) -> int:
    """Useful attention FLOPs of one layer over ``visible_pairs`` (i, j) pairs summed over the
    batch: 4 * Hq * D per pair forward (q k^T and p v), backward 2.5x (DESIGN.md section 7)."""
    fwd = 4 * config.n_heads * config.dhead * int(visible_pairs)
    return int(fwd * 3.5) if backward else fwd

