"""What every term shares: the geometry it is bound to, its two keys, and argument checks.

Two keys per term:

* ``structure``: what a *decision* depends on (term types, static parameters, tensor shapes,
  dtypes and devices; never tensor values). Calls that differ only in values (a new packing, a
  fresh mask tensor of the same shape) share one decision: ``auto`` does not re-rank them.
* ``key``: the *content* (values of small host tensors, host lengths, or the identity token and
  version of other tensors; see ``anyattn._cache``). Lowered forms (materialized masks,
  BlockMasks, varlen metadata) are cached on it; an identity token is never reused, so a freed
  tensor's entry can never be served to a new one.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import NamedTuple

import torch

from torch.compiler import is_compiling

from .._cache import CONTENT_KEY_MAX, obj_key, tensor_key
from ..errors import bad_type, bad_value
from ..layout import host_to_device

# --------------------------------------------------------------------------------------------
# Call geometry handed to terms when they are bound to a concrete call.


class Geometry(NamedTuple):
    """The shape of one call as terms see it.

    ``align``: the key position i' of every query, (Bd, Sq) int64 (Bd = 1 or B), when the mask
    has packed query and key layouts (``documents(q, kv=k)``, ``padding(..., kv=...)``): the
    bottom-right alignment then holds per document (per row) instead of for the whole row. None:
    ``i' = i + (Sk - Sq)``. Terms read it through :func:`aligner`."""

    B: int
    H: int
    Sq: int
    Sk: int
    device: torch.device
    align: torch.Tensor | None = None

    @property
    def offset(self) -> int:
        """Sk - Sq: add it to a query index to get its key position (bottom-right alignment of
        the whole row; see ``align`` for packed layouts)."""
        return self.Sk - self.Sq


def aligner(geo: Geometry):
    """(fn(b, q) -> i', uses_b): the key position of query index ``q`` of row ``b``, for index
    grids and for FlexAttention's scalar indices alike. ``uses_b``: it depends on the row."""
    a = geo.align
    if a is None:
        off = geo.offset

        def shifted(b, q):
            return q + off

        return shifted, False
    if a.shape[0] == 1:
        a1 = a[0]

        def shared(b, q):
            return a1[q]

        return shared, False

    def per_row(b, q):
        return a[b, q]

    return per_row, True


class BoundMask(NamedTuple):
    """A mask term bound to a geometry: a predicate over index tensors plus what it reads.
    ``tensor``: the mask itself as a 4-D bool tensor broadcastable to (B, H, Sq, Sk), for a term
    that is one (``dense``): what evaluating ``pred`` on the index grids would give, without the
    gather (see :func:`materialize_mask`)."""

    pred: Callable[..., torch.Tensor]
    uses_b: bool
    uses_h: bool
    tensor: torch.Tensor | None = None


class BoundScore(NamedTuple):
    """A score term bound to a geometry."""

    mod: Callable[..., torch.Tensor]
    additive: bool  # s -> s + f(b, h, q, kv): expressible as an additive attention bias
    uses_b: bool
    uses_h: bool
    dense: Callable[[], torch.Tensor] | None  # additive terms: the bias as a broadcast tensor


def _is_seqinfo(v) -> bool:
    return hasattr(v, "cu_seqlens") and hasattr(v, "host_lengths")


def value_key(v, tokens: list | None):
    """Content key of one field value (identity tokens used are appended to ``tokens``)."""
    if isinstance(v, Term):
        return v.content_key(tokens)
    if isinstance(v, torch.Tensor):
        return tensor_key(v, tokens)
    if isinstance(v, (list, tuple)):
        return tuple(value_key(x, tokens) for x in v)
    if callable(v) or _is_seqinfo(v):
        return obj_key(v, tokens)
    return v


def value_structure(v):
    """Structure of one field value: tensor metadata, never values."""
    if isinstance(v, Term):
        return v.structure
    if isinstance(v, torch.Tensor):
        return ("tensor", tuple(v.shape), v.dtype, v.device, v.requires_grad)
    if isinstance(v, (list, tuple)):
        return tuple(value_structure(x) for x in v)
    if _is_seqinfo(v):
        return ("SeqInfo", v.B, v.S, v.kind, v.contiguous)
    if callable(v):
        return ("fn",)
    return v


class Term:
    """Shared plumbing of mask and score terms (frozen dataclasses): keys and tensors."""

    # True for terms whose content is their structure (causal, windows, chunks, softcap): calls
    # with only such terms skip the content key and the per-content value checks
    valueless = False

    def __post_init__(self):
        # computed at construction, never later: a compiled graph that reads a term must not see
        # its attributes change when an eager call in between fills a memo (dynamo guards on them)
        self.structure
        self.tensors()

    def _fields(self) -> tuple:
        return tuple(getattr(self, f) for f in self.__dataclass_fields__)  # type: ignore[attr-defined]

    def content_key(self, tokens: list | None = None) -> tuple:
        """Hashable identity of the term's content; appends the identity tokens it uses to
        ``tokens``. Memoized for terms without tensors (their content cannot change); recomputed
        otherwise, so that in-place edits (version bumps) are seen."""
        hit = self.__dict__.get("_key")
        if hit is not None:
            if tokens is not None:
                tokens.extend(hit[1])
            return hit[0]
        mine: list = []
        k = (type(self).__name__,) + tuple(value_key(v, mine) for v in self._fields())
        if not self.tensors():
            object.__setattr__(self, "_key", (k, tuple(mine)))
        if tokens is not None:
            tokens.extend(mine)
        return k

    @property
    def key(self) -> tuple:
        return self.content_key(None)

    @property
    def structure(self) -> tuple:
        """What decisions depend on (see the module docstring). Memoized: it never changes."""
        s = self.__dict__.get("_structure")
        if s is None:
            s = self._structure()
            object.__setattr__(self, "_structure", s)
        return s

    def _structure(self) -> tuple:
        return (type(self).__name__,) + tuple(value_structure(v) for v in self._fields())

    def tensors(self) -> tuple[torch.Tensor, ...]:
        ts = self.__dict__.get("_tensors")
        if ts is None:
            ts = []
            for v in self._fields():
                if isinstance(v, torch.Tensor):
                    ts.append(v)
                elif isinstance(v, Term):
                    ts.extend(v.tensors())
                elif isinstance(v, tuple):
                    for x in v:
                        if isinstance(x, Term):
                            ts.extend(x.tensors())
            ts = tuple(ts)
            object.__setattr__(self, "_tensors", ts)
        return ts


def _meta_like(t: torch.Tensor) -> torch.Tensor:
    m = torch.empty(t.shape, dtype=t.dtype, device="meta")
    return m.requires_grad_(True) if t.requires_grad and t.dtype.is_floating_point else m


def structure_only(term):
    """A copy of ``term`` that holds its structure but none of its data: tensors become meta
    tensors (shape, dtype, requires_grad), SeqInfos are dropped, functions become named stubs.
    What a cached decision keeps of the call that made it (holding the real terms would pin
    the first call's mask tensors, and their cache entries, for the decision's lifetime)."""
    if not isinstance(term, Term):
        return term
    changes = {}
    for name in term.__dataclass_fields__:  # type: ignore[attr-defined]
        v = getattr(term, name)
        if isinstance(v, torch.Tensor):
            changes[name] = _meta_like(v)
        elif isinstance(v, tuple) and any(isinstance(x, Term) for x in v):
            changes[name] = tuple(structure_only(x) for x in v)
        elif isinstance(v, Term):
            changes[name] = structure_only(v)
        elif _is_seqinfo(v):
            changes[name] = None
        elif callable(v):
            changes[name] = _stub(getattr(v, "__name__", "fn"))
    if not changes:
        return term
    out = dataclasses.replace(term, **changes)
    object.__setattr__(out, "_structure", term.structure)  # the original's (device included)
    return out


def _stub(name: str):
    def stub(*args):
        raise RuntimeError("a structure-only term was evaluated; this is a bug in anyattn")

    stub.__name__ = name
    return stub


# --------------------------------------------------------------------------------------------
# argument checks shared by the factories


def check_positional(name: str, geo: Geometry) -> None:
    # Terms that look up a query's own key position i' need i' >= 0, i.e. Sq <= Sk.
    if geo.Sq > geo.Sk:
        raise bad_value(
            name, "Sq <= Sk (queries are aligned to the last Sq of the Sk keys)", f"Sq={geo.Sq} > Sk={geo.Sk}"
        )


def check_broadcast(name: str, t: torch.Tensor, geo: Geometry) -> None:
    target = (geo.B, geo.H, geo.Sq, geo.Sk)
    if t.dim() > 4 or any(s not in (1, g) for s, g in zip(t.shape[::-1], target[::-1])):
        raise bad_value(name, f"a tensor broadcastable to (B, H, Sq, Sk) = {target}", f"shape {tuple(t.shape)}")


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``t`` on ``device``; a CPU tensor (lengths, a keep-mask written on the host) goes to a GPU
    through pinned memory (``layout.host_to_device``), the copy CUDA documents as never waiting
    for the GPU's queue. A small CPU tensor that stays on the CPU is copied too: such tensors are
    cache-keyed by value (``_cache.tensor_key``), so what is lowered from them (SDPA's keep-mask,
    flex's closures) must not read the caller's memory, which another call with the same values
    would then see after the caller refills it."""
    if t.device != device:
        return host_to_device(t, device)
    if t.device.type == "cpu" and t.numel() <= CONTENT_KEY_MAX and not t.requires_grad and not is_compiling():
        return t.clone()
    return t


def fmt_arg(v) -> str:
    if isinstance(v, torch.Tensor):
        return f"tensor{tuple(v.shape)}"
    return repr(v)


def int_tensor(name: str, x, *, dims: tuple[int, ...], nonneg: bool = True) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        t = x
    else:
        try:
            t = torch.as_tensor(x)
        except (TypeError, ValueError, RuntimeError) as e:
            raise bad_type(name, "a list of ints or an integer tensor", type(x).__name__) from e
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise bad_type(name, "integer values", f"dtype {t.dtype}")
    if t.dim() not in dims:
        raise bad_value(name, f"a tensor of {' or '.join(str(d) for d in dims)} dimensions", f"shape {tuple(t.shape)}")
    # inside a caller's torch.compile trace the value is not read (a data-dependent branch would
    # break the graph); the call-time checks are skipped there too (api._check_terms)
    if nonneg and t.numel() and t.device.type == "cpu" and not torch.compiler.is_compiling() and int(t.min()) < 0:
        raise bad_value(name, "non-negative values", f"minimum {int(t.min())}")
    return t


def float_tensor(name: str, t, dims: tuple[int, ...], what: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise bad_type(name, f"a floating-point tensor ({what})", type(t).__name__)
    if not t.dtype.is_floating_point:
        raise bad_type(name, f"a floating-point tensor ({what})", f"dtype {t.dtype}")
    if t.dim() not in dims:
        raise bad_value(name, what, f"shape {tuple(t.shape)}")
    return t


# --------------------------------------------------------------------------------------------
# evaluation on index grids (eager and SDPA backends)


def materialize_mask(bound: BoundMask, geo: Geometry) -> torch.Tensor:
    """Evaluate a bound mask on broadcast index grids: a bool tensor broadcastable to
    (B, H, Sq, Sk), with size-1 dims where the mask does not depend on them. A bound mask that is
    a tensor (``dense``) is returned as an expanded view of it instead of being gathered through
    four index grids (the gather cost ~60 us of host time per call: a fresh dense() mask per call
    paid it every time). The result may therefore share the caller's memory: callers derive new
    tensors from it (``~m``, ``m | x``, ``m.any()``) and never write to it or cache it as it is."""
    if bound.tensor is not None:
        t = bound.tensor
        return t.expand(t.shape[0], t.shape[1], geo.Sq, geo.Sk)
    m = bound.pred(*index_grids(geo, bound.uses_b, bound.uses_h))
    if not isinstance(m, torch.Tensor) or m.dtype != torch.bool:
        got = type(m).__name__ if not isinstance(m, torch.Tensor) else f"dtype {m.dtype}"
        raise bad_type("mask predicate result", "a bool tensor (write mask_fn with tensor comparisons)", got)
    while m.dim() < 4:
        m = m.unsqueeze(0)
    return m


def index_grids(geo: Geometry, uses_b: bool = True, uses_h: bool = True):
    d = geo.device
    return (
        torch.arange(geo.B if uses_b else 1, device=d).view(-1, 1, 1, 1),
        torch.arange(geo.H if uses_h else 1, device=d).view(1, -1, 1, 1),
        torch.arange(geo.Sq, device=d).view(1, 1, -1, 1),
        torch.arange(geo.Sk, device=d).view(1, 1, 1, -1),
    )
