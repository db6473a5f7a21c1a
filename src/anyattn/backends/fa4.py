"""The FlashAttention-4 backend ``fa4``: the ``flash-attn-4`` package (``flash_attn.cute``, CuTe DSL
kernels JIT-compiled per configuration; written against 4.0.0b40).

Install: ``pip install --pre "anyattn[fa4]"`` (the package is a pre-release: pip needs ``--pre``
or the pinned version; on CUDA 13 add ``nvidia-cutlass-dsl-libs-cu13``, or ``flash-attn-4[cu13]``).

What 4.0.0b40 runs (read from its ``interface.py`` / ``config.py``):

* Hopper (sm90) and Blackwell (sm100/sm103, sm110): forward *and* backward, fp16/bf16, GQA,
  causal (bottom-right aligned when Sq != Sk, as ours), local windows, softcap, varlen
  (cu_seqlens), lse (differentiable: the backward takes its gradient), learnable sinks.
* Head dims: sm90 any D, Dv in [8, 256], multiples of 8; sm100/sm110 D, Dv in [8, 128] (multiples
  of 8), or (192, 128), or (256, 256). sm80 has a forward only, sm120 no score-mod backward:
  both are refused here (not run on our machines).
* No alibi slopes, no dropout, no attention weights.

Mapping of a call (``plan``), tensors (B, S, H, D) / (T, H, D), transposed at the boundary::

    causal()                      causal=True
    sliding_window(l, r)          window_size=(l, r)   (None stays None: unbounded)
    documents / padding [& ...]   flash_attn_varlen_func with cu_seqlens (``_varlen``, as ``flash``)
    softcap(c)                    softcap=c            (applied after the scale, as ours)
    sink(logits)                  return_lse=True, then out * sigmoid(lse - sink): the lse is
                                  differentiable in FA4, so gradients reach q, k, v and the sink
    return_lse                    return_lse=True      (lse (B, H, S) dense, (H, T) varlen)

The kernels are constructor arguments (``loader() -> Kernels | reason``, ``arch() -> int``), so
CPU tests run a stand-in through ``anyattn.testing.use_backend``. ``ANYATTN_CUDA_CAPABILITY=9.0``
overrides the capability probe (as for ``flash``).
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os
from typing import Any, Callable, NamedTuple

import torch

from .._cache import LRU
from ..spec import Documents, Sink, Softcap
from ._varlen import (
    PairPacking,
    lse_out,
    lse_to_TH,
    packing_for,
    pair_packing_for,
    positional_refusal,
    split_mask,
    tokens_in,
    tokens_out,
)
from .base import AttentionBackend, Facts

FA4_INSTALL = 'flash-attn-4 (flash_attn.cute) is not installed: pip install --pre "anyattn[fa4]"'
ARCHS = (9, 10, 11)  # compute capability majors with FA4 forward and backward (4.0.0b40)


class Kernels(NamedTuple):
    """The two FA4 entry points (``flash_attn.cute.flash_attn_func`` / ``flash_attn_varlen_func``)."""

    func: Callable  # (B, S, H, D) tensors
    varlen_func: Callable  # (T, H, D) tensors + cu_seqlens_q / cu_seqlens_k
    source: str  # for messages ("flash_attn.cute 4.0.0b40")


# --------------------------------------------------------------------------------------------
# pure mapping


class Fa4Plan(NamedTuple):
    route: str  # "func" | "varlen"
    kind: str  # dense | causal | window | documents | padding
    kwargs: dict  # keyword arguments of the FA4 function besides the tensors
    seq: Any  # varlen: the documents / padding term
    positional: bool  # a window measures distances (packing must keep them)
    empty_rows: bool  # rows may see no key inside the kernel (Sq > Sk under a window)


def head_dim_refusal(D: int, Dv: int, arch: int) -> str | None:
    """Why FA4 4.0.0b40 has no kernel for these head dims on this architecture (bf16/fp16)."""
    if D % 8 or Dv % 8:
        return f"FA4 needs head dims that are multiples of 8, got D={D}, Dv={Dv}"
    if arch == 9:
        if not (8 <= D <= 256 and 8 <= Dv <= 256):
            return f"FA4 on Hopper (sm90) takes head dims in [8, 256], got D={D}, Dv={Dv}"
        return None
    if (8 <= D <= 128 and 8 <= Dv <= 128) or (D, Dv) in ((192, 128), (256, 256)):
        return None
    return f"FA4 on Blackwell (sm{arch}x) takes head dims in [8, 128], (192, 128) or (256, 256), got D={D}, Dv={Dv}"


def fa4_window(w) -> tuple[bool, tuple]:
    """FA4's (causal, window_size) for our Window (or None). FA4 reads None as unbounded; a
    window (None, 0) is its causal."""
    if w is None:
        return False, (None, None)
    if w.is_causal:
        return True, (None, None)
    return False, (w.left, w.right)


def plan(call) -> Fa4Plan | str:
    """The FA4 arguments for a call (or a signature), or why FA4 cannot compute it exactly."""
    parts = split_mask(call.mask)
    if isinstance(parts, str):
        return parts
    geo = call.geo
    causal, window = fa4_window(parts.window)
    kw: dict[str, Any] = {"softmax_scale": call.scale, "causal": causal, "window_size": window}
    softcap = None
    for s in call.scores:
        if isinstance(s, Sink):
            continue  # combined through the lse by the backend (see the module docstring)
        if isinstance(s, Softcap) and softcap is None:
            softcap = s
        else:
            return f"score term {s!r} is not expressible in FA4 (it takes softcap); use flex"
    if softcap is not None:
        kw["softcap"] = float(softcap.cap)
    if call.return_lse or call.sink is not None:
        kw["return_lse"] = True
    positional = parts.window is not None
    if parts.seq is None:
        kind = "dense" if parts.window is None else ("causal" if causal else "window")
        return Fa4Plan("func", kind, kw, None, positional, positional and geo.Sq > geo.Sk)
    kind = "documents" if isinstance(parts.seq, Documents) else "padding"
    if geo.Sq != geo.Sk and not parts.seq.packed_layout:
        return (
            f"{kind} on FA4 needs Sq == Sk, got Sq={geo.Sq}, Sk={geo.Sk}; give the keys their own layout (kv=...), "
            "or use flex or sdpa"
        )
    why = positional_refusal(parts.seq, positional)
    if why is not None:
        return why
    return Fa4Plan("varlen", kind, kw, parts.seq, positional, positional and parts.seq.packed_layout)


def supports_with(sig, arch: int) -> str | None:
    """Everything but the device and the loading (CPU tests pass the architecture)."""
    if arch not in ARCHS:
        return f"FA4 (flash-attn-4 4.0.0b40) has forward and backward kernels for sm90/sm100/sm110, not compute capability {arch}.x"
    if sig.dtype not in (torch.float16, torch.bfloat16):
        return f"FA4 takes float16/bfloat16, got {sig.dtype}"
    if sig.need_weights:
        return "FA4 does not return attention weights"
    if sig.dropout_p > 0:
        return "FA4 has no dropout (dropout_p > 0); use eager, sdpa or cudnn"
    if sig.scale <= 0:
        return f"scale={sig.scale}: FA4 masks before it scales, which breaks for a scale <= 0; use sdpa or eager"
    why = head_dim_refusal(sig.D, sig.Dv, arch)
    if why is not None:
        return why
    p = plan(sig)
    return p if isinstance(p, str) else None


def lse_to_BHS(lse: torch.Tensor, B: int, H: int, S: int) -> torch.Tensor:
    """flash_attn_func's lse as (B, H, S) float32 (FA4 returns (B, H, S); -inf on rows that saw no key)."""
    if tuple(lse.shape) != (B, H, S):
        raise RuntimeError(f"FA4 returned an lse of shape {tuple(lse.shape)}, expected (B={B}, H={H}, S={S})")
    return lse.float()


def _split(r, want_lse: bool):
    if isinstance(r, (tuple, list)):
        return r[0], (r[1] if want_lse else None)
    if want_lse:
        raise RuntimeError("FA4 returned no lse although return_lse=True was passed")
    return r, None


# --------------------------------------------------------------------------------------------
# loader and hardware probe (first use)


@functools.lru_cache(maxsize=None)
def _cute_spec() -> bool:
    try:
        return importlib.util.find_spec("flash_attn.cute") is not None
    except (ImportError, ValueError):  # no flash_attn package at all
        return False


@functools.lru_cache(maxsize=None)
def _load_fa4() -> Kernels | str:
    if not _cute_spec():
        return FA4_INSTALL
    try:
        mod = importlib.import_module("flash_attn.cute")
    except ImportError as e:  # e.g. nvidia-cutlass-dsl missing or built for another CUDA
        return f"flash_attn.cute failed to import ({e}); reinstall flash-attn-4 and nvidia-cutlass-dsl for this CUDA"
    func, vfunc = getattr(mod, "flash_attn_func", None), getattr(mod, "flash_attn_varlen_func", None)
    if func is None or vfunc is None:
        return "flash_attn.cute: unrecognized API (no flash_attn_func / flash_attn_varlen_func)"
    return Kernels(func, vfunc, f"flash_attn.cute {getattr(mod, '__version__', '')}".strip())


@functools.lru_cache(maxsize=None)
def _cuda_arch() -> int:
    """The CUDA compute capability major (``ANYATTN_CUDA_CAPABILITY=9.0`` overrides it)."""
    forced = os.environ.get("ANYATTN_CUDA_CAPABILITY")
    if forced:
        return int(forced.split(".")[0].strip())
    return torch.cuda.get_device_capability()[0] if torch.cuda.is_available() else 0


# --------------------------------------------------------------------------------------------
# the backend


class Fa4Backend(AttentionBackend):
    """FA4 as a backend. ``loader() -> Kernels | reason`` finds the kernels and ``arch() -> int``
    the compute capability major; a test passes stand-ins (``cuda_only=False`` then runs them on
    CPU tensors)."""

    name = "fa4"

    def __init__(self, loader=_load_fa4, arch=_cuda_arch, *, cuda_only: bool = True):
        self._loader = loader
        self._arch = arch
        self._cuda_only = cuda_only
        self.facts = Facts(packed_documents=True)
        self.packings = LRU(128)
        self.stats = {"func_calls": 0, "varlen_calls": 0}

    def available(self) -> str | None:
        if not self._cuda_only:
            return None
        if not _cute_spec() and self._loader is _load_fa4:
            return FA4_INSTALL
        if not torch.cuda.is_available():
            return "needs a CUDA GPU (torch.cuda.is_available() is False)"
        arch = self._arch()
        if arch not in ARCHS:
            major, minor = torch.cuda.get_device_capability()
            return (
                f"FA4 runs on Hopper (sm90) and Blackwell (sm100/sm110) here, found compute capability {major}.{minor}; "
                "use flash_torch, flash or cudnn"
            )
        return None  # the package itself is imported on first use (supports/run)

    def supports(self, sig) -> str | None:
        if self._cuda_only and sig.device.type != "cuda":
            return f"needs CUDA tensors, got {sig.device.type}"
        k = self._loader()
        if isinstance(k, str):
            return k
        return supports_with(sig, self._arch())

    def clear(self) -> None:
        self.packings.clear()
        if self._loader is _load_fa4:
            _load_fa4.cache_clear()
            _cute_spec.cache_clear()
            _cuda_arch.cache_clear()

    def run(self, call):
        sink = call.sink
        if sink is None:
            return self._run(call, call.return_lse)
        out, lse = self._run(call, True)  # out * sigmoid(lse - sink); FA4's lse carries gradients
        out, lse = sink.combine(out, lse)
        return out, (lse if call.return_lse else None)

    def _run(self, call, want_lse: bool):
        kern = self._loader()
        if isinstance(kern, str):
            raise RuntimeError(f"fa4: {kern}")
        p = plan(call)
        if isinstance(p, str):
            raise RuntimeError(f"fa4 cannot run this call: {p}")
        kw = dict(p.kwargs)
        if p.empty_rows:
            kw["return_lse"] = True  # rows that see no key are zeroed from the lse below
        lse_needed = kw.get("return_lse", False)
        B, Hq, Sq, _ = call.q.shape
        q_BSHD, k_BSHD, v_BSHD = (t.transpose(1, 2) for t in (call.q, call.k, call.v))
        if p.route == "func":
            self.stats["func_calls"] += 1
            out, lse = _split(kern.func(q_BSHD, k_BSHD, v_BSHD, **kw), lse_needed)
            out = out.transpose(1, 2)
            if lse is not None:
                lse = lse_to_BHS(lse, B, Hq, Sq)
        else:
            out, lse = self._varlen(call, kern, p, kw, q_BSHD, k_BSHD, v_BSHD, lse_needed)
        if p.empty_rows and lse is not None:
            out = torch.where((lse == float("-inf"))[..., None], torch.zeros((), dtype=out.dtype, device=out.device), out)
        return out, (lse if want_lse else None)

    def _varlen(self, call, kern, p, kw, q_BSHD, k_BSHD, v_BSHD, lse_needed):
        B, Hq, Sq, _ = call.q.shape
        pk = self.packings.get(call.key) if call.cacheable else None
        if pk is None:
            if p.seq.packed_layout:  # separate query and key layouts: cu_seqlens_q != cu_seqlens_k
                pk = pair_packing_for(call, p.seq, p.positional, (kw["window_size"][1] or 0) > 0)
            else:
                pk = packing_for(call, p.seq, p.positional)
            if call.cacheable:
                self.packings.put(call.key, pk, call.tokens)
        pq, pkv = (pk.q, pk.k) if isinstance(pk, PairPacking) else (pk, pk)
        if pk.route == "empty":
            out = call.q.new_zeros(B, Hq, Sq, call.Dv)
            if call.requires_grad:
                out = out + 0.0 * (call.q.sum() + call.k.sum() + call.v.sum())
            lse = torch.full((B, Hq, Sq), float("-inf"), device=call.device) if lse_needed else None
            return out, lse
        self.stats["varlen_calls"] += 1
        r = kern.varlen_func(
            tokens_in(pq, q_BSHD), tokens_in(pkv, k_BSHD), tokens_in(pkv, v_BSHD), cu_seqlens_q=pq.cu,
            cu_seqlens_k=pkv.cu, max_seqlen_q=pq.max_seqlen, max_seqlen_k=pkv.max_seqlen, **kw,
        )  # fmt: skip
        out_THD, lse = _split(r, lse_needed)
        out = tokens_out(pq, out_THD, B, Sq).transpose(1, 2)
        if lse is not None:  # FA4 varlen: (H, T)
            lse = lse_out(pq, lse_to_TH(lse, pq.total, Hq), B, Sq, Hq)
        return out, lse
