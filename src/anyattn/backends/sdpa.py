"""SDPA family: ``sdpa`` (torch picks the kernel) and ``cudnn`` (SDPA restricted to cuDNN).

Lowering (cached per call content, so a repeated mask is not rebuilt):

* no mask, no score            -> ``attn_mask=None``            (flash / cuDNN / efficient)
* ``causal()`` with Sq == Sk   -> ``is_causal=True``            (SDPA's is_causal is top-left
  aligned, so only when Sq == Sk; bottom-right causal with Sq != Sk is materialized)
* ``padding(...)`` alone       -> a keys-only (B, 1, 1, Sk) mask; padding query rows are zeroed
* anything else                -> an exact materialized mask (bool, or a float bias in the input
  dtype when additive score terms are present: alibi, bias, relative_bias)

With ``scale <= 0`` the ``is_causal`` fast path is not used: torch's kernels return NaN there
(masked logits are scaled after masking), so the causal mask is materialized instead, and cuDNN
refuses the call.

Score terms that are not additive (softcap, score_fn) cannot be expressed through SDPA and are
refused. Rows with no visible key are unmasked before the kernel and zeroed after it, so no kernel
ever sees a fully masked row: the output is exactly 0 and the gradients are finite.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from .._cache import LRU
from ..spec import Bias, Geometry, Padding, Window, materialize_mask
from ._sdp_switch import run_only
from .base import AttentionBackend, Facts

# Known kernel issues that make a backend refuse a call (checked in supports(), reported by
# explain()). Each entry: (backend name, predicate(signature) -> bool, reason).
KNOWN_ISSUES: list = []


class Lowered(NamedTuple):
    attn_mask: torch.Tensor | None
    is_causal: bool
    row_ok: torch.Tensor | None  # bool, broadcastable to (B, H, Sq, 1): rows that see >= 1 key
    kind: str  # what the lowering chose, for explain() and tests
    # row_ok was not read on the host (lower never syncs): every row may see a key, in which case
    # row_ok can be dropped; SdpaBackend reads it once, when the lowered form is used a second time
    rows_unread: bool = False
    # SdpaBackend's work for a form that is used again (read rows_unread, store a small boolean mask
    # in additive form) is still to do: a mask used once never pays for it
    reuse_pending: bool = False


def lowering_kind(sig) -> str:
    """Which form :func:`lower` builds for calls of this signature (no tensor is touched)."""
    mask = sig.mask
    if not sig.scores:
        if mask is None:
            return "no mask"
        if isinstance(mask, Window) and mask.is_causal and sig.Sq == sig.Sk and sig.scale > 0:
            return "is_causal"
        if isinstance(mask, Padding):
            return "keys-only padding mask"
    return "materialized float bias" if sig.scores else "materialized bool mask"


def lower(call) -> Lowered:
    """The SDPA form of a call (pure: same call -> same form). Whether every row sees a key is not
    read on the host (a device sync that waits for the queue: a mask used once pays more for it
    than for zeroing the rows on the device): ``row_ok`` is kept instead, and the attention mask
    is always a tensor derived here (never the caller's own, which a dense() term's materialized
    mask may be a view of)."""
    geo, mask = call.geo, call.mask
    kind = lowering_kind(call.sig)
    if kind == "no mask":
        return Lowered(None, False, None, kind)
    if kind == "is_causal":
        return Lowered(None, True, None, kind)
    if kind == "keys-only padding mask":
        keep, q_ok = mask.keep_mask(geo), mask.q_keep(geo)  # (B, Sk), (B, Sq)
        keys = keep
        if call.requires_grad or mask.kv is not None:
            any_key = keep.any(-1, keepdim=True)  # (B, 1)
            if call.requires_grad:  # a row with no real key attends everywhere (no NaN reaches the backward), then is zeroed
                keys = keep | ~any_key
            if mask.kv is not None:  # queries of their own layout: a real query may have no real key
                q_ok = q_ok & any_key
        # Otherwise a row with no real key has no real query either (q_keep is a slice of keep):
        # row_ok zeroes its output, whatever the kernel left there (torch.where selects, so a NaN
        # does not leak), and the four small ops that guard such rows (any, not, or, and) are saved.
        return Lowered(keys[:, None, None, :], False, q_ok[:, None, :, None], kind)
    m = materialize_mask(call.bound_mask(), geo) if mask is not None else None
    biases = [bs.dense() for bs in call.bound_scores()]
    bias = None
    if biases:
        bias = biases[0]
        for b in biases[1:]:
            bias = bias + b
        if torch.compiler.is_compiling() or bool(torch.isneginf(bias).any()):  # -inf entries (e.g. finfo.min masks) are masking too
            vis = ~torch.isneginf(bias)
            m = vis if m is None else m & vis
    row_ok = None
    if m is not None:
        any_v = m.any(-1, keepdim=True)
        # a row with no visible key attends everywhere (finite logits), then is zeroed
        m = m | ~any_v
        row_ok = any_v
        if bias is not None:
            bias = torch.where(any_v, bias, torch.zeros((), device=bias.device, dtype=bias.dtype))
    unread = row_ok is not None and not torch.compiler.is_compiling()
    if bias is None:
        return Lowered(m, False, row_ok, kind, unread)
    if call.dtype in (torch.float16, torch.bfloat16):
        # saturate finite values to the dtype's range (a real -inf stays -inf)
        fi = torch.finfo(call.dtype)
        bias = torch.where(torch.isfinite(bias), bias.clamp(fi.min, fi.max), bias)
    bias = bias.to(call.dtype)
    if m is not None:
        bias = bias.masked_fill(~m, float("-inf"))
    return Lowered(bias, False, row_ok, kind, unread)


# A cached boolean mask of at most this many elements is stored, once it is used a second time,
# as the additive mask SDPA would make of it (0 where visible, -inf elsewhere, in the input dtype):
# SDPA converts a boolean attn_mask on every call (an allocation and a kernel launch, a few
# microseconds of host time that dominate a small call); the additive form is passed through. The
# sum with 0 is exact, so the output is the same; the cache holds 2 bytes per element instead of
# 1, hence the bound. A mask used once is passed as it is (converting it would cost what SDPA's
# own conversion costs, on top of it).
ADDITIVE_MASK_MAX = 1 << 22


def _additive_if_small(lw: Lowered, dtype: torch.dtype) -> Lowered:
    m = lw.attn_mask
    if m is None or m.dtype != torch.bool or m.numel() > ADDITIVE_MASK_MAX or not dtype.is_floating_point:
        return lw
    add = torch.zeros(m.shape, dtype=dtype, device=m.device).masked_fill_(~m, float("-inf"))
    return lw._replace(attn_mask=add)


def _placeholder_mask(sig) -> torch.Tensor | None:
    """An uninitialized tensor of the shape and dtype :func:`lower` would give ``attn_mask``, for
    torch's cuDNN check: shapes come from evaluating the terms on the meta device (no compute, no
    mask built); only the allocation is real."""
    kind = lowering_kind(sig)
    if kind in ("no mask", "is_causal"):
        return None
    if kind == "keys-only padding mask":
        return torch.empty(sig.B, 1, 1, sig.Sk, dtype=torch.bool, device=sig.device)
    meta = Geometry(sig.B, sig.Hq, sig.Sq, sig.Sk, torch.device("meta"))
    shape = [1, 1, sig.Sq, sig.Sk]
    try:
        if sig.mask is not None:
            shape = list(materialize_mask(sig.mask.bind(meta), meta).shape)
        for s in sig.scores:
            bshape = s.bind(meta).dense().shape
            shape = [max(a, b) for a, b in zip(shape, [1] * (4 - len(bshape)) + list(bshape))]
    except Exception:  # noqa: BLE001 - a term that cannot run on meta tensors: the full shape
        shape = [sig.B, sig.Hq, sig.Sq, sig.Sk]
    dtype = sig.dtype if sig.scores else torch.bool
    return torch.empty(shape, dtype=dtype, device=sig.device)


def _placeholder_qkv(sig):
    """Uninitialized q, k, v with the signature's shapes and strides (allocation only)."""
    shapes = ((sig.B, sig.Hq, sig.Sq, sig.D), (sig.B, sig.Hkv, sig.Sk, sig.D), (sig.B, sig.Hkv, sig.Sk, sig.Dv))
    strides = sig.strides or (None, None, None)
    out = []
    for shape, stride in zip(shapes, strides):
        if stride is None:
            out.append(torch.empty(shape, dtype=sig.dtype, device=sig.device))
        else:
            out.append(torch.empty_strided(shape, stride, dtype=sig.dtype, device=sig.device))
    return out


def _probe_enable_gqa() -> bool:
    import inspect

    try:
        return "enable_gqa" in inspect.signature(F.scaled_dot_product_attention).parameters
    except (TypeError, ValueError):  # builtin without a signature: check the docstring
        return "enable_gqa" in (F.scaled_dot_product_attention.__doc__ or "")


_ENABLE_GQA = _probe_enable_gqa()  # a constant: torch.compile traces it without a cache wrapper

# Materialized masks are (B, 1, Sq, Sk): 1 GiB for one 32k-token packed row. The cache of lowered
# forms holds at most this many bytes of them (a repeated call hits; a stream of new packings
# evicts instead of pinning the GPU's memory).
MASK_CACHE_BYTES = 2 << 30


def _lowered_nbytes(lw) -> int:
    return sum(t.numel() * t.element_size() for t in (lw.attn_mask, lw.row_ok) if isinstance(t, torch.Tensor))


class SdpaBackend(AttentionBackend):
    """One SDPA-based backend; ``only`` restricts SDPA to one kernel (None = torch decides).
    ``kernel`` is the SDPA function called (a test passes a recording stand-in); by default
    ``torch.nn.functional.scaled_dot_product_attention`` is looked up at every call, not once:
    torch's ``context_parallel`` replaces that attribute with its ring attention inside its
    block, and a function kept from import time would attend within the local shard only."""

    def __init__(self, name: str = "sdpa", only: str | None = None, *, kernel=None):
        self.name = name
        self._only = only
        self._kernel = kernel
        self.facts = Facts(dropout=True, context_parallel=True)
        self.cache = LRU(256, max_bytes=MASK_CACHE_BYTES, nbytes=_lowered_nbytes)

    def available(self) -> str | None:
        if self._only == "cudnn":
            if not torch.cuda.is_available():
                return "needs a CUDA GPU (torch.cuda.is_available() is False)"
            if not hasattr(torch.backends.cuda, "can_use_cudnn_attention"):
                return f"torch {torch.__version__} has no cuDNN SDPA backend"
            if torch.cuda.get_device_capability() < (8, 0):
                return "cuDNN attention needs compute capability >= 8.0"
        return None

    def supports(self, sig) -> str | None:
        if sig.return_lse:
            return "SDPA does not return the log-sum-exp (use eager, flex or flash_torch for return_lse)"
        if sig.need_weights:
            return "SDPA does not return attention weights (attention_with_weights runs eager)"
        if sig.sink is not None:
            return f"{sig.sink!r} is combined through the log-sum-exp, which SDPA does not return; use eager, flex or flash_torch"
        half = sig.dtype in (torch.float16, torch.bfloat16)
        for s in sig.scores:
            if not s.additive:
                return f"{s!r} is not an additive bias; SDPA takes only additive score terms"
            if half and not (isinstance(s, Bias) and s.tensor.dtype == sig.dtype):
                # SDPA takes the bias in the input dtype. Rounding a float32 ALiBi/relative bias
                # to bf16 broke the accuracy rule in the H200 fuzz run (ALiBi, Sq=48, Sk=4: 10x
                # eager's error); a bias tensor already in the input dtype loses nothing.
                return (
                    f"{s!r} would be rounded to {str(sig.dtype).replace('torch.', '')} in SDPA's attn_mask, which "
                    "costs more accuracy than the tolerance rule allows; use flex (float32 score_mod) or eager, "
                    "or pass a bias tensor already in the input dtype"
                )
        if sig.gqa and not _ENABLE_GQA:
            return f"GQA (Hq={sig.Hq}, Hkv={sig.Hkv}) needs torch >= 2.5 (enable_gqa)"
        if self._only == "cudnn":
            return self._supports_cudnn(sig)
        return None

    def _supports_cudnn(self, sig) -> str | None:
        if sig.device.type != "cuda":
            return f"needs CUDA tensors, got {sig.device.type}"
        if sig.dtype not in (torch.float16, torch.bfloat16):
            return f"cuDNN attention takes float16/bfloat16, got {sig.dtype}"
        if sig.scale <= 0:
            return f"scale={sig.scale}: cuDNN's masking is not verified for a scale <= 0; use sdpa (materialized mask) or eager"
        if torch.are_deterministic_algorithms_enabled() and not torch.is_deterministic_algorithms_warn_only_enabled():
            return (
                "cuDNN attention is not deterministic and torch.use_deterministic_algorithms(True) is set; "
                "use sdpa (flash/efficient run their deterministic variants), flash_torch or eager"
            )
        for name, pred, reason in KNOWN_ISSUES:
            if name == self.name and pred(sig):
                return reason
        if torch.compiler.is_compiling():
            return None  # SDPAParams cannot be traced; the static checks above hold
        from torch.backends.cuda import SDPAParams

        q, k, v = _placeholder_qkv(sig)
        mask = _placeholder_mask(sig)
        is_causal = lowering_kind(sig) == "is_causal"
        try:
            params = SDPAParams(q, k, v, mask, sig.dropout_p, is_causal, sig.gqa)
        except TypeError:  # torch < 2.5: no enable_gqa field
            params = SDPAParams(q, k, v, mask, sig.dropout_p, is_causal)
        ok = run_only("cudnn", lambda: torch.backends.cuda.can_use_cudnn_attention(params, False))
        if not ok:
            return (
                f"torch's cuDNN check refused this call (head dim {sig.D}/{sig.Dv}, "
                f"mask form: {lowering_kind(sig)}); run with TORCH_LOGS or see torch.backends.cuda.can_use_cudnn_attention"
            )
        return None

    def lowered(self, call) -> Lowered:
        """The lowered form of a call (built once per content key)."""
        if not call.cacheable:
            return lower(call)
        lw = self.cache.get(call.key)
        if lw is None:  # first use: no host sync, no conversion (a mask built per call pays neither)
            lw = lower(call)._replace(reuse_pending=True)
            self.cache.put(call.key, lw, call.tokens)
        elif lw.reuse_pending and not call.requires_grad:  # used again: the form is worth settling
            # (not while autograd records: a checkpointed forward recomputed in the backward must
            # run the ops the first forward ran, or torch.utils.checkpoint raises)
            if lw.rows_unread:  # read once whether a row sees no key, drop row_ok if none does
                lw = lw._replace(row_ok=None if bool(lw.row_ok.all()) else lw.row_ok, rows_unread=False)
            if self._only is None:
                lw = _additive_if_small(lw, call.dtype)
            lw = lw._replace(reuse_pending=False)
            self.cache.put(call.key, lw, call.tokens)
        return lw

    def run(self, call):
        lw = self.lowered(call)
        kw = {"enable_gqa": True} if call.gqa else {}
        sdpa = self._kernel or F.scaled_dot_product_attention  # looked up per call (see the class docstring)

        def kernel():
            return sdpa(
                call.q, call.k, call.v, attn_mask=lw.attn_mask, dropout_p=call.dropout_p,
                is_causal=lw.is_causal, scale=call.scale, **kw,
            )  # fmt: skip

        out = kernel() if self._only is None else run_only(self._only, kernel)
        if lw.row_ok is not None:
            out = torch.where(lw.row_ok, out, 0.0)
        return out, None

    def clear(self) -> None:
        self.cache.clear()
