"""One attention call after validation and normalization: what every backend receives.

Two objects, for the two questions a backend answers:

* :class:`Signature`: the static facts of a call (shapes, strides, dtype, device, options and
  the *structure* of its terms, see ``anyattn.spec.base``). ``supports(signature)`` reads only
  these, so a decision taken once serves every call with the same signature: a new packing, a
  freshly allocated mask tensor or new prefix lengths do not re-rank the backends. A signature
  can be built without tensors (:meth:`Signature.of`), which is how models ask what ``auto``
  would pick for a batch before they build it.
* :class:`Call`: a signature plus this call's tensors and terms (their values) and the content
  key that lowered forms (masks, BlockMasks, varlen metadata) are cached on.

Both are frozen. Shape legend: B batch, Hq query heads, Hkv key/value heads, Sq query length,
Sk key length, D query/key head dim, Dv value head dim.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from .spec import BoundMask, BoundScore, Geometry, MaskTerm, ScoreTerm, Sink, canonical_mask, canonical_scores
from .spec.base import structure_only


@dataclass(frozen=True, eq=False, slots=True)
class Signature:
    """The static facts of a call. ``mask`` / ``scores`` are structure-only copies of the terms of
    the call that created it (tensors on the meta device, no data): backends read their structure
    (types, static parameters, tensor metadata) and never their values."""

    B: int
    Hq: int
    Hkv: int
    Sq: int
    Sk: int
    D: int
    Dv: int
    dtype: torch.dtype
    device: torch.device
    mask: MaskTerm | None  # canonical form
    scores: tuple[ScoreTerm, ...]  # applied in order, before the mask
    scale: float
    dropout_p: float
    return_lse: bool
    requires_grad: bool  # autograd will run through this call
    need_weights: bool = False  # eager only: also return the attention weights
    strides: tuple | None = None  # (q, k, v) strides; None: contiguous (B, H, S, D)
    key: tuple = ()  # decision key: everything above, terms by structure
    geo: Geometry = field(default=None)  # type: ignore[assignment]
    # the keys live in a paged KV cache (``attention(q, kv=view)``): the view's structure (kind,
    # query layout, page size, pages); shapes above are the *logical* keys. Backends that read
    # pages through the table say so (``reads_pages``); the others get the pages gathered.
    paged: tuple | None = None

    @classmethod
    def of(
        cls, *, B: int, Hq: int, Sq: int, D: int, dtype, device, Hkv: int | None = None, Sk: int | None = None,
        Dv: int | None = None, mask=None, score=None, scale: float | None = None, dropout_p: float = 0.0,
        return_lse: bool = False, requires_grad: bool = False, strides: tuple | None = None,
    ) -> Signature:  # fmt: skip
        """A signature without tensors: the call ``attention`` would receive for tensors of
        these shapes (contiguous unless ``strides`` are given)."""
        Hkv = Hq if Hkv is None else Hkv
        Sk = Sq if Sk is None else Sk
        Dv = D if Dv is None else Dv
        m, sc = canonical_mask(mask), canonical_scores(score)
        scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
        device = torch.device(device)
        shapes = ((B, Hq, Sq, D), (B, Hkv, Sk, D), (B, Hkv, Sk, Dv))
        key = decision_key(m, sc, shapes, strides, dtype, device, requires_grad, scale, float(dropout_p), return_lse, False)
        return cls.build(shapes, dtype, device, m, sc, scale, float(dropout_p), return_lse, requires_grad, False, strides, key)

    @classmethod
    def build(cls, shapes, dtype, device, mask, scores, scale, dropout_p, return_lse, requires_grad, need_weights, strides, key,
              paged=None):  # fmt: skip
        (B, Hq, Sq, D), (_, Hkv, Sk, _), (_, _, _, Dv) = shapes
        geo = Geometry(B, Hq, Sq, Sk, device)
        mask, scores = structure_only(mask), tuple(structure_only(s) for s in scores)
        return cls(
            B, Hq, Hkv, Sq, Sk, D, Dv, dtype, device, mask, scores, scale, dropout_p, return_lse, requires_grad,
            need_weights, strides, key, geo, paged,
        )  # fmt: skip

    @property
    def page_size(self) -> int | None:
        """The page size of a paged-KV call, else None."""
        return None if self.paged is None else self.paged[3]

    # the names backends read (shared with Call)
    @property
    def H(self) -> int:
        return self.Hq

    @property
    def gqa(self) -> bool:
        return self.Hq != self.Hkv

    @property
    def packed_layout(self) -> bool:
        """The mask gives queries and keys separate layouts (``documents(q, kv=k)``,
        ``padding(..., kv=...)``): queries sit bottom-right per document / row, not per call."""
        return self.mask is not None and self.mask.packed_layout

    @property
    def sink(self) -> Sink | None:
        """The ``sink(...)`` score term (structure only), or None."""
        return _sink_of(self.scores)

    @property
    def logit_scores(self) -> tuple:
        """The score terms that change logits (every score term but the sink), in order."""
        return _logit_scores(self.scores)

    def describe(self, mask=None, scores=None) -> str:
        """One line for traces and errors (``mask``/``scores``: a call's own terms)."""
        mask = self.mask if mask is None else mask
        scores = self.scores if scores is None else scores
        parts = [f"q{(self.B, self.Hq, self.Sq, self.D)} k{(self.B, self.Hkv, self.Sk, self.D)} v{(self.B, self.Hkv, self.Sk, self.Dv)}"]
        parts.append(str(self.dtype).replace("torch.", ""))
        parts.append(str(self.device))
        parts.append(f"mask={mask!r}" if mask is not None else "mask=None")
        if scores:
            parts.append("score=" + ", ".join(repr(s) for s in scores))
        if self.dropout_p:
            parts.append(f"dropout_p={self.dropout_p}")
        if self.return_lse:
            parts.append("return_lse")
        if self.requires_grad:
            parts.append("grad")
        if self.paged is not None:
            parts.append(f"kv=paged({self.paged[2]}, page_size={self.paged[3]})")
        return " ".join(parts)


def _sink_of(scores) -> Sink | None:
    for s in scores:
        if type(s) is Sink:
            return s
    return None


def _logit_scores(scores) -> tuple:
    if not scores or all(type(s) is not Sink for s in scores):
        return scores
    return tuple(s for s in scores if type(s) is not Sink)


def decision_key(mask, scores, shapes, strides, dtype, device, grad, scale, dropout_p, return_lse, need_weights) -> tuple:
    """The key decisions are cached on: term structures (never values), shapes, strides, options."""
    return (
        mask.structure if mask is not None else None, tuple(s.structure for s in scores), shapes, strides, dtype, device,
        grad, scale, dropout_p, return_lse, need_weights,
    )  # fmt: skip


class Call(NamedTuple):
    """One call: its signature, tensors and terms. ``key`` identifies the terms' *content* (the
    cache key of lowered forms); ``tokens`` are the identity tokens it uses (cache entries built
    for this call are dropped when one of those objects is freed). Immutable (a NamedTuple: the
    cheapest immutable record to build on every call); ``bound`` memoizes the terms bound to
    this call's geometry, shared by the backends that run it."""

    sig: Signature
    q: torch.Tensor  # (B, Hq, Sq, D), any strides
    k: torch.Tensor  # (B, Hkv, Sk, D)
    v: torch.Tensor  # (B, Hkv, Sk, Dv)
    mask: MaskTerm | None  # this call's terms (sig holds the first call's, for their structure)
    scores: tuple[ScoreTerm, ...]
    key: tuple
    tokens: tuple
    cacheable: bool  # False while tracing, or when a term tensor requires grad
    bound: dict  # a fresh {} per call: bound terms (see bound_mask)
    # a paged KV cache view (``anyattn.spec.kv.KVView``) when a backend reads the keys through its
    # page table: k/v are then meta placeholders of the logical shapes; None otherwise
    kv: object = None
    # the keys are a ContiguousKVCache's rows, their length bucketed (``spec.kv_step.kv_bucket``):
    # a growing context keeps this shape for many steps, so a kernel compiled per shape pays off
    bucketed: bool = False

    # -- the static facts, read through the signature -----------------------------------------
    @property
    def geo(self) -> Geometry:
        return self.sig.geo

    @property
    def H(self) -> int:
        return self.sig.Hq

    @property
    def Hkv(self) -> int:
        return self.sig.Hkv

    @property
    def D(self) -> int:
        return self.sig.D

    @property
    def Dv(self) -> int:
        return self.sig.Dv

    @property
    def dtype(self) -> torch.dtype:
        return self.sig.dtype

    @property
    def device(self) -> torch.device:
        return self.sig.device

    @property
    def gqa(self) -> bool:
        return self.sig.Hq != self.sig.Hkv

    @property
    def scale(self) -> float:
        return self.sig.scale

    @property
    def dropout_p(self) -> float:
        return self.sig.dropout_p

    @property
    def return_lse(self) -> bool:
        return self.sig.return_lse

    @property
    def requires_grad(self) -> bool:
        return self.sig.requires_grad

    @property
    def need_weights(self) -> bool:
        return self.sig.need_weights

    # -- bound terms (device tensors, predicates); shared by the backends of this call -------
    def aligned_geo(self) -> Geometry:
        """The geometry terms are bound to: the call's, plus the key position of every query
        when the mask has packed query and key layouts (see ``spec.base.Geometry.align``)."""
        g = self.bound.get("geo")
        if g is None:
            g = self.sig.geo
            if self.sig.packed_layout:
                g = g._replace(align=self.mask.alignment(g))
            self.bound["geo"] = g
        return g

    def bound_mask(self) -> BoundMask | None:
        if self.mask is None:
            return None
        b = self.bound.get("mask")
        if b is None:
            b = self.bound["mask"] = self.mask.bind(self.aligned_geo())
        return b

    @property
    def sink(self) -> Sink | None:
        """This call's ``sink(...)`` term (with its logits), or None."""
        return _sink_of(self.scores) if self.scores else None

    @property
    def logit_scores(self) -> tuple:
        """This call's score terms that change logits (every one but the sink), in order."""
        return _logit_scores(self.scores)

    def bound_scores(self) -> tuple[BoundScore, ...]:
        """:attr:`logit_scores`, bound (the sink changes the softmax denominator, not a logit:
        backends read it from :attr:`sink`)."""
        b = self.bound.get("scores")
        if b is None:
            b = self.bound["scores"] = tuple(s.bind(self.aligned_geo()) for s in self.logit_scores)
        return b

    def describe(self) -> str:
        return self.sig.describe(self.mask, self.scores or ())
