"""The one packing policy: how a model runs a batch of sequences on anyattn.

Shape legend: B batch rows, S row length, T real tokens of the batch, S' packed row length.

A model receives ``input_ids`` (B, S) with an ``attention_mask`` (a padded batch) or a
:class:`anyattn.SeqInfo` (packed documents or padding), or neither (full rows). It runs either

* **as rows**: (B, S) with ``padding(info)`` / ``documents(info)`` masks (padding positions are
  computed, their values unspecified), or
* **packed**: the real tokens gathered into ONE row (1, S') of documents, ``S' = T`` (or a
  bucketed length, below); embeddings, every layer and the head run on real tokens only, and
  outputs are scattered back to (B, S) with zeros at padding.

``plan_batch`` decides, once per forward, from the backend's facts (``anyattn.backends.Facts``):

    pack="auto"   packed when the backend that would serve the packed row takes documents
                  natively (varlen metadata or a block-sparse mask); the others would build a
                  dense (T, T) mask for it, so they run as rows
    pack=True     packed on any backend          pack=False   as rows
    S'            T, or the next of 4, 5, 6, 7 x 2^k when that backend compiles one kernel per
                  sequence length (flex): at most 25% padding, and a stream of ~16k-token
                  batches shares one kernel instead of compiling one per batch

Which backend "would serve" is asked of the resolver with a signature (``Signature.of``): no
tensor is allocated, no mask is built. ESM2, DPLM, E1 and the HF integration all plan their
batches here; the movement of tensors between the layouts is ``SeqInfo.pack`` / ``unpack``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .backends import REGISTRY
from .call import Signature
from .errors import bad_type, bad_value
from .layout import SeqInfo
from .resolve import choose
from .spec import documents, padding

__all__ = ["BatchPlan", "plan_batch", "packed_backend", "bucket_length"]


def bucket_length(T: int) -> int:
    """Row length for a packed row of T tokens on a backend that compiles one kernel per
    sequence length: the next of 4, 5, 6, 7 x 2^k (at most 25% padding), at least 64."""
    if T <= 64:
        return 64
    k = (T - 1).bit_length() - 3  # 2^(k+2) < T <= 2^(k+3)
    return next(m << k for m in (4, 5, 6, 7, 8) if (m << k) >= T)


@dataclass(frozen=True, eq=False)
class BatchPlan:
    """How one forward runs: the ids the layers see, their batch structure and mask, and how to
    turn a layer-shaped tensor back into the caller's (B, S) rows."""

    ids: torch.Tensor  # (B, S), or (1, S') when packed
    info: SeqInfo | None  # structure of ``ids`` (None: full rows, no padding)
    mask: object  # the anyattn mask term for every layer (None: full rows)
    rows: SeqInfo | None  # when packed: the caller's structure, to scatter outputs back
    backend: str | None = None  # the backend the packed row was planned for (None: not asked)

    @property
    def packed(self) -> bool:
        return self.rows is not None

    @property
    def positions(self) -> torch.Tensor:
        """int64 like ``ids``: position inside its sequence (0 at padding), for rotary."""
        if self.info is not None:
            return self.info.positions
        B, S = self.ids.shape[:2]
        return torch.arange(S, device=self.ids.device).expand(B, S)

    def layout(self, t_BS: torch.Tensor, value=0) -> torch.Tensor:
        """A caller-shaped (B, S, ...) tensor in the layers' layout."""
        return t_BS if self.rows is None else self.rows.pack(t_BS, self.ids.shape[1], value)

    def to_rows(self, t: torch.Tensor) -> torch.Tensor:
        """A layer-shaped tensor back in the caller's (B, S, ...) rows, zeros at padding (in both
        layouts: padding positions computed as rows are not left unspecified)."""
        if self.rows is not None:
            return self.rows.unpack(t)
        info = self.info
        if info is None or info.total == info.B * info.S:
            return t
        return t * info.keep.view(*info.keep.shape, *([1] * (t.dim() - 2))).to(t.dtype)


def batch_info(input_ids: torch.Tensor, attention_mask=None, seq_info=None) -> SeqInfo | None:
    """The structure of a (B, S) batch: from a keep-mask (one host read), a SeqInfo, or None
    (full rows). A keep-mask without padding is full rows too."""
    if attention_mask is not None and seq_info is not None:
        raise bad_value("attention_mask/seq_info", "at most one of them", "both")
    if attention_mask is not None:
        info = SeqInfo.from_padding_mask(attention_mask)  # one host read (row counts)
        return None if info.total == info.B * info.S else info
    if seq_info is None:
        return None
    if not isinstance(seq_info, SeqInfo):
        raise bad_type("seq_info", "an anyattn.SeqInfo", type(seq_info).__name__)
    if (seq_info.B, seq_info.S) != tuple(input_ids.shape[:2]):
        raise bad_value("seq_info", f"B, S = {tuple(input_ids.shape[:2])} like input_ids", f"B={seq_info.B}, S={seq_info.S}")
    return seq_info.to(input_ids.device)


def packed_backend(
    backend, info: SeqInfo, *, heads: int, head_dim: int, dtype, grad: bool, scale: float | None = None, score=None,
    kv_heads: int | None = None,
) -> str | None:  # fmt: skip
    """The backend that would serve self-attention over ``info``'s real tokens as one packed row
    (with the model's ``score`` terms), when it takes packed documents natively; else None. Asks
    the resolver with a signature: nothing runs, no tensor is allocated."""
    sig = Signature.of(
        B=1, Hq=heads, Hkv=kv_heads, Sq=max(info.total, 1), D=head_dim, dtype=dtype, device=info.keep.device,
        mask=documents([max(info.total, 1)]), score=score, scale=scale, requires_grad=grad,
    )  # fmt: skip
    name = choose(sig, backend)
    return name if name is not None and REGISTRY[name].facts.packed_documents else None


def plan_batch(
    input_ids: torch.Tensor, attention_mask=None, seq_info: SeqInfo | None = None, *, backend="auto", pack="auto",
    heads: int, head_dim: int, dtype, grad: bool = False, need_weights: bool = False, pad_id: int = 0,
    scale: float | None = None, score=None, kv_heads: int | None = None,
) -> BatchPlan:  # fmt: skip
    """The plan of one forward (see the module docstring). ``heads``/``kv_heads``/``head_dim``/
    ``dtype``/``scale``/``score``: the model's attention call, which decides the backend.
    ``need_weights`` (output_attentions) keeps the rows: weights are returned per row."""
    if pack not in ("auto", True, False):
        raise bad_value("pack", "'auto', True or False", repr(pack))
    info = batch_info(input_ids, attention_mask, seq_info)
    if info is None:
        return BatchPlan(input_ids, None, None, None)
    one_row = info.kind == "documents" and info.B == 1 and info.total == info.S  # already one packed row
    if not one_row and not need_weights and info.total > 0 and pack is not False:
        chosen = packed_backend(
            backend, info, heads=heads, head_dim=head_dim, dtype=dtype, grad=grad, scale=scale, score=score, kv_heads=kv_heads
        )
        if pack is True or chosen is not None:
            static = chosen is not None and REGISTRY[chosen].facts.static_shapes
            S = bucket_length(info.total) if static else info.total
            packed = info.packed(S)
            ids = info.pack(input_ids, S, value=pad_id)
            return BatchPlan(ids, packed, documents(packed), info, chosen)
    mask = padding(info) if info.kind == "padding" else documents(info)
    return BatchPlan(input_ids, info, mask, None)
