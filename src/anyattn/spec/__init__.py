"""Attention variants as data: mask terms, score terms, composition and canonical form.

A *mask term* says which (query i, key j) pairs are visible; a *score term* changes the logit
``s = scale * <q_i, k_j>`` before the mask applies. Terms are small frozen objects with a readable
repr; masks compose with ``&``, ``|`` and ``~``.

Shape legend used in this file:
    B  batch            H  query heads          Sq query length       Sk key length
    Bd batch of a term (1 = shared by every row, or B)

Alignment (defined once, used by every term). When Sq != Sk the query i sits at key position
``i' = i + (Sk - Sq)`` (bottom-right, as in FlashAttention and KV-cache decoding)::

    causal(), Sq=2, Sk=5          key j:  0 1 2 3 4
        query 0 (i'=3)                    x x x x .
        query 1 (i'=4)                    x x x x x

    causal(), Sq=5, Sk=2          query 0..2 (i' = -3..-1) see no key -> output 0, lse -inf
        query 3 (i'=0)                    x .
        query 4 (i'=1)                    x x

Every term's visibility rule is written once, as a *predicate* on index tensors
``pred(b, h, q, kv) -> bool``. The same predicate serves two purposes:

* on broadcast index grids ``b (B,1,1,1), h (1,H,1,1), q (1,1,Sq,1), kv (1,1,1,Sk)`` it
  materializes the mask (eager and SDPA backends);
* on FlexAttention's scalar indices it *is* the ``mask_mod`` (flex backend).

So the dense mask and the flex mask cannot drift apart. Score terms are written the same way, as
``mod(score, b, h, q, kv) -> score``.

Modules: ``base`` (geometry, the two keys every term has, argument checks), ``masks`` (the base
class, ``& | ~``, windows), ``sequences`` (documents, padding), ``patterns`` (the other masks),
``scores`` (score terms), ``canonical`` (the canonical form).
"""

from __future__ import annotations

# the term classes and helpers below are imported from here by backends and tests
from .base import BoundMask, BoundScore, Geometry, Term, index_grids, materialize_mask  # noqa: F401
from .canonical import canonical_mask, canonical_scores
from .masks import And, MaskTerm, Not, Or, Window, causal, sliding_window  # noqa: F401
from .patterns import (  # noqa: F401
    BlockCausal,
    Chunked,
    Dense,
    MaskFn,
    PrefixLM,
    SameSegment,
    block_causal,
    chunked,
    dense,
    mask_fn,
    prefix_lm,
    same_segment,
)
from .sequences import Documents, Padding, documents, padding  # noqa: F401
from .scores import (  # noqa: F401
    Alibi,
    Bias,
    RelativeBias,
    ScoreFn,
    ScoreTerm,
    Sink,
    Softcap,
    alibi,
    bias,
    relative_bias,
    score_fn,
    sink,
    softcap,
    split_sink,
    t5_bucket,
)

__all__ = [
    "MaskTerm",
    "ScoreTerm",
    "causal",
    "sliding_window",
    "documents",
    "padding",
    "prefix_lm",
    "block_causal",
    "same_segment",
    "chunked",
    "mask_fn",
    "dense",
    "softcap",
    "alibi",
    "bias",
    "relative_bias",
    "score_fn",
    "sink",
    "canonical_mask",
    "canonical_scores",
]
