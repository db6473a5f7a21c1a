"""Batch structure of the ESM C and ANKH models: the ONE place where ``attention_mask`` /
``seq_info`` become the layers' layout and mask term, and where padded rows are packed into one
row. Temporary: the shared packing policy of anyattn.models replaces :func:`batch_structure`
(and :func:`choose_backend`, ``_PACKED_NATIVE``) for every model. :func:`norm_bound`
(``output_s_max``) reads the same structure.

    input_ids (B, S)                          -> dense rows: no mask term
    + attention_mask (B, S)                   -> SeqInfo.from_padding_mask (one host read)
    + seq_info (SeqInfo)                      -> packed documents (or padding) as given
    then, with padding or several rows, and pack_padded True, or "auto" with a backend that takes
    packed documents natively (flash_torch, flex, ...; for "auto", what the resolver picks):
        the real tokens as ONE row (1, T) of documents (flex: T rounded up, see _bucket);
    otherwise the rows keep their layout under padding(info) / documents(info).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F

from ..api import backends, explain
from ..errors import bad_type, bad_value
from ..layout import SeqInfo, pad
from ..spec import documents, padding
from ._inputs import keep_mask

# Backends that take packed documents natively (varlen metadata or a block-sparse mask); the others
# would materialize a (T, T) mask for one packed row, so a padded batch keeps its rows there.
_PACKED_NATIVE = frozenset({"flash_torch", "flex", "flash", "kernels_flash"})


def check_backend_value(value):
    """``attn_backend``: "auto", a registered backend name, or a list of names (kept as a tuple,
    what a JSON round trip of the config gives back)."""
    if isinstance(value, list):
        value = tuple(value)
    names = {b.name for b in backends()}
    items = value if isinstance(value, tuple) else (value,)
    if not items or not all(isinstance(v, str) and (v in names or v == "auto") for v in items):
        raise bad_value("attn_backend", f"'auto', one of {sorted(names)} or a list of them", repr(value))
    return value


class Batch(NamedTuple):
    ids: torch.Tensor  # (B, S) as given, or (1, S') one packed row of the real tokens
    info: SeqInfo | None  # structure of ``ids`` (None: every row one full sequence)
    mask: object  # mask term of every layer (None: dense rows)
    positions: torch.Tensor  # int64 like ids: position inside its sequence (0 at padding)
    packed_from: SeqInfo | None  # the caller's (B, S) structure when ids is a packed row

    def to_rows(self, t: torch.Tensor) -> torch.Tensor:
        """A layer-layout tensor (leading dims like ``ids``) -> (B, S, ...), zeros at padding."""
        if self.packed_from is not None:
            return pad(t[0, : self.packed_from.total], self.packed_from)
        if self.info is None or self.info.total == self.info.B * self.info.S:
            return t
        keep = self.info.keep
        return t * keep.view(*keep.shape, *([1] * (t.dim() - 2))).to(t.dtype)


def norm_bound(q_BSHD: torch.Tensor, k_BSHD: torch.Tensor, info: SeqInfo | None, scale: float) -> torch.Tensor:
    """(H,) float32: the max over visible pairs (same sequence, real tokens; ``info`` is the
    layers' structure, None for dense rows) of ``scale * ||q_i|| * ||k_j||`` (``output_s_max``)."""
    qn, kn = q_BSHD.float().norm(dim=-1), k_BSHD.float().norm(dim=-1)  # (B, S, H)
    H = qn.shape[-1]
    if info is None:
        return (qn.amax(1) * kn.amax(1)).amax(0) * scale
    doc = info.doc_ids.reshape(-1).long()
    real = (doc >= 0)[:, None]
    idx = doc.clamp_min(0)[:, None].expand(-1, H)
    # norms are >= 0, so 0 is neutral for the max: padding tokens drop out
    qd = qn.new_zeros(info.num_docs, H).scatter_reduce_(0, idx, qn.reshape(-1, H) * real, "amax")
    kd = kn.new_zeros(info.num_docs, H).scatter_reduce_(0, idx, kn.reshape(-1, H) * real, "amax")
    return (qd * kd).amax(0) * scale


def _plain(info: SeqInfo) -> SeqInfo:
    """``info`` with ordinary tensors: anyattn caches mask lowerings by tensor identity and version
    counter, which tensors made under ``torch.inference_mode`` lack."""
    fields = {f.name: getattr(info, f.name) for f in dataclasses.fields(info)}
    if not any(isinstance(v, torch.Tensor) and v.is_inference() for v in fields.values()):
        return info
    with torch.inference_mode(False):
        return dataclasses.replace(info, **{k: v.clone() for k, v in fields.items() if isinstance(v, torch.Tensor)})


def _bucket(T: int) -> int:
    """Packed-row length for flex, which compiles one kernel per length: T rounded up to the next
    m * 2^k, m in 4..8 (at most 25% padding; batches of similar size share a kernel)."""
    if T <= 64:
        return 64
    k = (T - 1).bit_length() - 3
    return next(m << k for m in (4, 5, 6, 7, 8) if (m << k) >= T)


def choose_backend(
    backend, packed: SeqInfo, *, heads: int, head_dim: int, dtype, grad: bool, scale: float, score=None
) -> str | None:
    """The backend that would serve the attention of a packed row (a named one as is; for "auto"
    or a list, the resolver's answer with the real shape and score term). Runs nothing."""
    if isinstance(backend, str) and backend != "auto":
        return backend
    q = torch.empty(1, packed.S, heads, head_dim, device=packed.keep.device, dtype=dtype, requires_grad=grad)
    with torch.set_grad_enabled(grad):
        q = q.transpose(1, 2)
        return explain(q, q, q, mask=documents(packed), score=score, scale=scale, backend=backend, full=False).chosen


def batch_structure(
    input_ids: torch.Tensor, attention_mask=None, seq_info=None, *, pack_padded="auto",
    choose: Callable[[SeqInfo], str | None] | None = None, pad_token_id: int = 0,
) -> Batch:  # fmt: skip
    """The layout every layer runs on (module docstring). ``choose(packed_info)`` names the backend
    that would serve the packed row; positions restart at 0 at each sequence's first real token."""
    if attention_mask is not None and seq_info is not None:
        raise bad_value("attention_mask/seq_info", "at most one of them", "both")
    B, S = input_ids.shape
    dev = input_ids.device
    info = None
    if attention_mask is not None:
        keep = keep_mask(attention_mask, input_ids)
        with torch.inference_mode(False):
            info = SeqInfo.from_padding_mask(keep.clone())  # one host read (row lengths)
        if info.total == B * S:
            info = None
    elif seq_info is not None:
        if not isinstance(seq_info, SeqInfo):
            raise bad_type("seq_info", "an anyattn.SeqInfo", type(seq_info).__name__)
        if (seq_info.B, seq_info.S) != (B, S):
            raise bad_value("seq_info", f"B, S = {(B, S)} like input_ids", f"B={seq_info.B}, S={seq_info.S}")
        info = _plain(seq_info.to(dev))
    if info is None:
        return Batch(input_ids, None, None, torch.arange(S, device=dev).expand(B, S), None)
    one_row = info.kind == "documents" and B == 1 and info.total == S
    if not one_row and info.total > 0 and pack_padded is not False:
        lengths = [n for row in info.host_lengths for n in row if n]
        with torch.inference_mode(False):
            packed = SeqInfo.from_lengths([lengths], device=dev)
        chosen = choose(packed) if choose is not None else None
        if pack_padded is True or chosen in _PACKED_NATIVE:
            if chosen == "flex" and _bucket(info.total) != info.total:
                with torch.inference_mode(False):
                    packed = SeqInfo.from_lengths([lengths], total_length=_bucket(info.total), device=dev)
            ids = input_ids.reshape(-1).index_select(0, info.indices)
            ids = F.pad(ids, (0, packed.S - info.total), value=pad_token_id)[None]
            return Batch(ids, packed, documents(packed), packed.positions, info)
    mask = padding(info) if info.kind == "padding" else documents(info)
    return Batch(input_ids, info, mask, info.positions, None)
