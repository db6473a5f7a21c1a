"""SDPA family: ``sdpa`` (torch picks the kernel) and ``cudnn`` (SDPA restricted to cuDNN).

Lowering (cached per call signature, so a repeated mask is not rebuilt):

* no mask, no score            -> ``attn_mask=None``            (flash / cuDNN / efficient)
* ``causal()`` with Sq == Sk   -> ``is_causal=True``            (SDPA's is_causal is top-left
  aligned, so only when Sq == Sk; bottom-right causal with Sq != Sk is materialized)
* ``padding(...)`` alone       -> a keys-only (B, 1, 1, Sk) mask; padding query rows are zeroed
* anything else                -> an exact materialized mask (bool, or a float bias in the input
  dtype when additive score terms are present: alibi, bias, relative_bias)

Score terms that are not additive (softcap, score_fn) cannot be expressed through SDPA and are
refused. Rows with no visible key are unmasked before the kernel and zeroed after it, so no kernel
ever sees a fully masked row: the output is exactly 0 and the gradients are finite.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from .._lru import LRU
from ._sdp_switch import run_only
from ..spec import Bias, Padding, Window, materialize_mask

# Known kernel issues that make a backend refuse a call (checked in supports(), reported by
# explain()). Each entry: (backend, predicate(call) -> bool, reason).
KNOWN_ISSUES: list = []


class Lowered(NamedTuple):
    attn_mask: torch.Tensor | None
    is_causal: bool
    row_ok: torch.Tensor | None  # bool, broadcastable to (B, H, Sq, 1): rows that see >= 1 key
    kind: str  # what the lowering chose, for explain() and tests


def lower(call) -> Lowered:
    """The SDPA form of a call (pure: same call -> same form)."""
    geo, mask = call.geo, call.mask
    if not call.scores:
        if mask is None:
            return Lowered(None, False, None, "no mask")
        if isinstance(mask, Window) and mask.is_causal and geo.Sq == geo.Sk:
            return Lowered(None, True, None, "is_causal")
        if isinstance(mask, Padding):
            keep = mask.keep_mask(geo)  # (B, Sk)
            any_key = keep.any(-1)  # (B,)
            keys = keep | ~any_key[:, None]  # a row with no real key attends everywhere, then is zeroed
            q_ok = keep[:, geo.offset :] & any_key[:, None]  # (B, Sq)
            return Lowered(keys[:, None, None, :], False, q_ok[:, None, :, None], "keys-only padding mask")
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
        if torch.compiler.is_compiling() or not bool(any_v.all()):  # one sync per lowering (cached)
            # a row with no visible key attends everywhere (finite logits), then is zeroed
            m = m | ~any_v
            row_ok = any_v
            if bias is not None:
                bias = torch.where(any_v, bias, torch.zeros((), device=bias.device, dtype=bias.dtype))
    if bias is None:
        return Lowered(m, False, row_ok, "materialized bool mask")
    if call.dtype in (torch.float16, torch.bfloat16):
        # saturate finite values to the dtype's range (a real -inf stays -inf)
        fi = torch.finfo(call.dtype)
        bias = torch.where(torch.isfinite(bias), bias.clamp(fi.min, fi.max), bias)
    bias = bias.to(call.dtype)
    if m is not None:
        bias = bias.masked_fill(~m, float("-inf"))
    return Lowered(bias, False, row_ok, "materialized float bias")


def _sdpa_params(call, lw: Lowered):
    from torch.backends.cuda import SDPAParams

    try:
        return SDPAParams(call.q, call.k, call.v, lw.attn_mask, call.dropout_p, lw.is_causal, call.gqa)
    except TypeError:  # torch < 2.5: no enable_gqa field
        return SDPAParams(call.q, call.k, call.v, lw.attn_mask, call.dropout_p, lw.is_causal)


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
_MASK_CACHE_BYTES = 2 << 30


def _lowered_nbytes(lw) -> int:
    return sum(t.numel() * t.element_size() for t in (lw.attn_mask, lw.row_ok) if isinstance(t, torch.Tensor))


class _SdpaBackend:
    """One SDPA-based backend; ``only`` restricts SDPA to one kernel (None = torch decides)."""

    def __init__(self, name: str, only: str | None):
        self.NAME = name
        self._only = only
        self.cache = LRU(256, max_bytes=_MASK_CACHE_BYTES, nbytes=_lowered_nbytes)

    def __repr__(self) -> str:
        return f"<backend {self.NAME}>"

    def available(self) -> str | None:
        if self.NAME == "cudnn":
            if not torch.cuda.is_available():
                return "needs a CUDA GPU (torch.cuda.is_available() is False)"
            if not hasattr(torch.backends.cuda, "can_use_cudnn_attention"):
                return f"torch {torch.__version__} has no cuDNN SDPA backend"
            if torch.cuda.get_device_capability() < (8, 0):
                return "cuDNN attention needs compute capability >= 8.0"
        return None

    def supports(self, call) -> str | None:
        if call.return_lse:
            return "SDPA does not return the log-sum-exp (use eager, flex or flash_torch for return_lse)"
        half = call.dtype in (torch.float16, torch.bfloat16)
        for s in call.scores:
            if not s.additive:
                return f"{s!r} is not an additive bias; SDPA takes only additive score terms"
            if half and not (isinstance(s, Bias) and s.tensor.dtype == call.dtype):
                # SDPA takes the bias in the input dtype. Rounding a float32 ALiBi/relative bias
                # to bf16 broke the accuracy rule in the H200 fuzz run (ALiBi, Sq=48, Sk=4: 10x
                # eager's error); a bias tensor already in the input dtype loses nothing.
                return (
                    f"{s!r} would be rounded to {str(call.dtype).replace('torch.', '')} in SDPA's attn_mask, which "
                    "costs more accuracy than the tolerance rule allows; use flex (float32 score_mod) or eager, "
                    "or pass a bias tensor already in the input dtype"
                )
        if call.gqa and not _ENABLE_GQA:
            return f"GQA (Hq={call.geo.H}, Hkv={call.Hkv}) needs torch >= 2.5 (enable_gqa)"
        if self.NAME == "cudnn":
            if call.device.type != "cuda":
                return f"needs CUDA tensors, got {call.device.type}"
            if call.dtype not in (torch.float16, torch.bfloat16):
                return f"cuDNN attention takes float16/bfloat16, got {call.dtype}"
            if torch.are_deterministic_algorithms_enabled() and not torch.is_deterministic_algorithms_warn_only_enabled():
                return (
                    "cuDNN attention is not deterministic and torch.use_deterministic_algorithms(True) is set; "
                    "use sdpa (flash/efficient run their deterministic variants), flash_torch or eager"
                )
            for name, pred, reason in KNOWN_ISSUES:
                if name == self.NAME and pred(call):
                    return reason
            if torch.compiler.is_compiling():
                return None  # SDPAParams cannot be traced; the static checks above hold
            lw = self._lowered(call)
            ok = run_only("cudnn", lambda: torch.backends.cuda.can_use_cudnn_attention(_sdpa_params(call, lw), False))
            if not ok:
                return (
                    f"torch's cuDNN check refused this call (head dim {call.D}/{call.Dv}, "
                    f"mask form: {lw.kind}); run with TORCH_LOGS or see torch.backends.cuda.can_use_cudnn_attention"
                )
        return None

    def _lowered(self, call) -> Lowered:
        if not call.cacheable:
            return lower(call)
        lw = self.cache.get(call.key)
        if lw is None:
            lw = lower(call)
            self.cache.put(call.key, lw)
        return lw

    def run(self, call):
        lw = self._lowered(call)
        kw = {"enable_gqa": True} if call.gqa else {}
        if self._only is None:
            out = F.scaled_dot_product_attention(
                call.q, call.k, call.v, attn_mask=lw.attn_mask, dropout_p=call.dropout_p,
                is_causal=lw.is_causal, scale=call.scale, **kw,
            )  # fmt: skip
        else:
            out = run_only(
                self._only,
                lambda: F.scaled_dot_product_attention(
                    call.q, call.k, call.v, attn_mask=lw.attn_mask, dropout_p=call.dropout_p,
                    is_causal=lw.is_causal, scale=call.scale, **kw,
                ),
            )  # fmt: skip
        if lw.row_ok is not None:
            out = torch.where(lw.row_ok, out, 0.0)
        return out, None


SDPA = _SdpaBackend("sdpa", None)
CUDNN = _SdpaBackend("cudnn", "cudnn")
