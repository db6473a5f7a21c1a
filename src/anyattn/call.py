"""One attention call after validation and normalization: what every backend receives.

Shape legend: B batch, Hq query heads, Hkv key/value heads, Sq query length, Sk key length,
D query/key head dim, Dv value head dim.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .spec import BoundMask, BoundScore, Geometry, MaskTerm, ScoreTerm


@dataclass(eq=False, slots=True)
class Call:
    q: torch.Tensor  # (B, Hq, Sq, D), any strides
    k: torch.Tensor  # (B, Hkv, Sk, D)
    v: torch.Tensor  # (B, Hkv, Sk, Dv)
    mask: MaskTerm | None  # canonical form
    scores: tuple[ScoreTerm, ...]  # applied in order, before the mask
    scale: float
    dropout_p: float
    return_lse: bool
    requires_grad: bool  # autograd will run through this call
    key: tuple  # identity of (spec, shapes, dtype, device, options): decisions are cached on it
    cacheable: bool  # False when a term tensor requires grad: lowered forms are rebuilt per call
    need_weights: bool = False  # eager only: also return the attention weights
    _bound: dict = field(default_factory=dict)

    # -- geometry ---------------------------------------------------------------------------
    @property
    def geo(self) -> Geometry:
        g = self._bound.get("geo")
        if g is None:
            B, Hq, Sq, _ = self.q.shape
            g = Geometry(B, Hq, Sq, self.k.shape[2], self.q.device)
            self._bound["geo"] = g
        return g

    @property
    def Hkv(self) -> int:
        return self.k.shape[1]

    @property
    def D(self) -> int:
        return self.q.shape[-1]

    @property
    def Dv(self) -> int:
        return self.v.shape[-1]

    @property
    def dtype(self) -> torch.dtype:
        return self.q.dtype

    @property
    def device(self) -> torch.device:
        return self.q.device

    @property
    def gqa(self) -> bool:
        return self.q.shape[1] != self.k.shape[1]

    # -- bound terms (device tensors, predicates); shared by the backends of this call -------
    def bound_mask(self) -> BoundMask | None:
        if self.mask is None:
            return None
        if "mask" not in self._bound:
            self._bound["mask"] = self.mask.bind(self.geo)
        return self._bound["mask"]

    def bound_scores(self) -> tuple[BoundScore, ...]:
        if "scores" not in self._bound:
            self._bound["scores"] = tuple(s.bind(self.geo) for s in self.scores)
        return self._bound["scores"]

    def describe(self) -> str:
        B, Hq, Sq, D = self.q.shape
        parts = [f"q{tuple(self.q.shape)} k{tuple(self.k.shape)} v{tuple(self.v.shape)}"]
        parts.append(str(self.dtype).replace("torch.", ""))
        parts.append(str(self.device))
        parts.append(f"mask={self.mask!r}" if self.mask is not None else "mask=None")
        if self.scores:
            parts.append("score=" + ", ".join(repr(s) for s in self.scores))
        if self.dropout_p:
            parts.append(f"dropout_p={self.dropout_p}")
        if self.return_lse:
            parts.append("return_lse")
        if self.requires_grad:
            parts.append("grad")
        return " ".join(parts)
