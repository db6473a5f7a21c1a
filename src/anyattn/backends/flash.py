"""The flash-attn package backends: ``flash`` (pip ``flash-attn``) and ``kernels_flash`` (HF
``kernels`` hub builds of the same kernels).

NOT RUN ON A GPU HERE: neither package is installable where this project's GPU tests run. What
is tested (tests/test_flash_backends.py, CPU) is the argument mapping below, which is pure:
``map_window``, ``plan``, ``lse_to_BHS`` and the refusal reasons. See docs/flash.md.

* ``flash``: FlashAttention 3 (``flash_attn_interface``) when it imports on a Hopper GPU
  (compute capability 9.x), else FlashAttention 2 (``flash_attn``).
* ``kernels_flash``: ``kernels.get_kernel("kernels-community/flash-attn3")`` on Hopper, then
  ``kernels-community/flash-attn2``; loaded on first use, API variant detected from the
  functions the loaded module has (``flash_attn_func`` + ``flash_attn_varlen_func``).

Both take (B, S, H, D) (dense) or (T, H, D) (varlen) tensors: the transposes happen here, at the
boundary. GQA is native. Mapping of a call (``plan``)::

    causal()                      causal=True,  window_size=(-1, -1)
    sliding_window(l, r)          causal=False, window_size=(l, r)   (None -> -1)
    documents / padding [& ...]   flash_attn_varlen_func with cu_seqlens from a SeqInfo
    softcap(c)                    softcap=c
    sink(logits)                  return_attn_probs=True, then out * sigmoid(lse - sink) (no grad)
    alibi(slopes)                 alibi_slopes=slopes (float32, (Hq,)); FA2 only
    dropout_p                     dropout_p; FA2 only

Packing (documents, padding) reuses the varlen lowering of ``_varlen``: the same metadata,
the same one-time host syncs, documented there. ``plan`` reads a signature or a call (the same
attribute names): ``supports`` asks it with the signature, ``run`` with the call's values.

The CUDA capability probe can be overridden with ``ANYATTN_CUDA_CAPABILITY=9.0`` (which builds
a Hopper machine would load).
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import inspect
import os
from typing import Any, Callable, NamedTuple

import torch

from .._cache import LRU
from ..spec import Alibi, Documents, Sink, Softcap
from ._varlen import (
    PairPacking,
    lse_out,
    lse_to_TH,
    map_window,
    packing_for,
    pair_packing_for,
    positional_refusal,
    split_mask,
    tokens_in,
    tokens_out,
)
from .base import AttentionBackend, Facts

MAX_HEAD_DIM = 256

FLASH_INSTALL = "flash-attn is not installed: pip install anyattn[flash]"
KERNELS_INSTALL = "the HF kernels package is not installed: pip install anyattn[kernels]"
KERNEL_REPOS_HOPPER = ("kernels-community/flash-attn3", "kernels-community/flash-attn2")
KERNEL_REPOS_OTHER = ("kernels-community/flash-attn2",)


class Impl(NamedTuple):
    """One loaded FlashAttention build."""

    version: int  # 2 or 3
    source: str  # where it came from, for messages ("flash_attn 2.7.4", "kernels-community/flash-attn3")
    func: Callable  # flash_attn_func: (B, S, H, D)
    varlen_func: Callable  # flash_attn_varlen_func: (T, H, D) + cu_seqlens
    func_params: frozenset  # keyword names each accepts (empty: unknown, pass everything)
    varlen_params: frozenset


def _params(fn) -> frozenset:
    try:
        return frozenset(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return frozenset()


def impl_from_module(mod, version: int, source: str) -> Impl | str:
    """The API variant of a loaded module: it must have flash_attn_func and
    flash_attn_varlen_func (the flash-attn Python interface)."""
    func = getattr(mod, "flash_attn_func", None)
    vfunc = getattr(mod, "flash_attn_varlen_func", None)
    if func is None or vfunc is None:
        have = sorted(n for n in dir(mod) if not n.startswith("_"))[:12]
        return f"{source}: unrecognized API (no flash_attn_func/flash_attn_varlen_func; has {have})"
    return Impl(version, source, func, vfunc, _params(func), _params(vfunc))


# --------------------------------------------------------------------------------------------
# pure mapping


class FlashPlan(NamedTuple):
    route: str  # "func" | "varlen"
    kind: str  # dense | causal | window | documents | padding
    kwargs: dict  # keyword arguments of flash_attn_func / flash_attn_varlen_func (besides tensors)
    seq: Any  # varlen: the documents / padding term
    positional: bool  # varlen: a window or alibi measures distances (packing must keep them)


# Keyword defaults shared by FA2 and FA3: a kwarg still at its default is dropped when the
# installed function does not accept it; a kwarg with a real value makes the call refused.
_DEFAULTS = {
    "causal": False,
    "window_size": (-1, -1),
    "softcap": 0.0,
    "alibi_slopes": None,
    "dropout_p": 0.0,
    "return_attn_probs": False,
}


def causal_and_window(w) -> tuple[bool, tuple[int, int]]:
    """FlashAttention's (causal, window_size) for our Window (or None)."""
    if w is not None and w.is_causal:
        return True, (-1, -1)
    return False, map_window(w)


def plan(call, impl: Impl) -> FlashPlan | str:
    """The flash-attn arguments for a call (or a signature), or why this build cannot compute it
    exactly."""
    parts = split_mask(call.mask)
    if isinstance(parts, str):
        return parts
    geo = call.geo
    causal, window = causal_and_window(parts.window)
    kw: dict[str, Any] = {"softmax_scale": call.scale, "causal": causal, "window_size": window}
    softcap = alibi = sink = None
    for s in call.scores:
        if isinstance(s, Sink) and sink is None:
            if call.requires_grad:
                return (
                    f"{s!r} with gradients: the sink is combined through the lse, whose gradient flash-attn's "
                    "backward ignores; use flex or eager for training with sinks"
                )
            sink = s
        elif isinstance(s, Softcap) and softcap is None:
            softcap = s
        elif isinstance(s, Alibi) and alibi is None:
            alibi = s
        else:
            return f"score term {s!r} is not expressible in flash-attn (it takes softcap and alibi); use flex"
    if softcap is not None and alibi is not None:
        return "softcap and alibi together are not verified against flash-attn's order of application; use flex"
    if softcap is not None:
        kw["softcap"] = softcap.cap
    if alibi is not None:
        if impl.version != 2:
            return f"alibi: {impl.source} (FlashAttention {impl.version}) has no alibi_slopes; use flash-attn 2 or flex"
        if alibi.slopes.requires_grad:
            return "alibi slopes that require grad: flash-attn does not differentiate them; use flex or eager"
        kw["alibi_slopes"] = alibi.slopes.to(device=geo.device, dtype=torch.float32)
    if call.dropout_p > 0:
        if impl.version != 2:
            return f"dropout_p > 0: {impl.source} (FlashAttention {impl.version}) has no dropout"
        if softcap is not None:
            return "flash-attn 2 does not combine softcap with dropout"
        kw["dropout_p"] = call.dropout_p
    if call.return_lse or sink is not None:
        kw["return_attn_probs"] = True  # FA2: (out, lse, S_dmask); FA3: (out, lse)
    positional = parts.window is not None or alibi is not None
    if parts.seq is None:
        route, params = "func", impl.func_params
        kind = "dense" if parts.window is None else ("causal" if causal else "window")
    else:
        route, params = "varlen", impl.varlen_params
        kind = "documents" if isinstance(parts.seq, Documents) else "padding"
        if geo.Sq != geo.Sk and not parts.seq.packed_layout:
            return f"{kind} on flash-attn needs Sq == Sk, got Sq={geo.Sq}, Sk={geo.Sk}; give the keys their own layout (kv=...), or use flex or sdpa"
        why = positional_refusal(parts.seq, positional)
        if why is not None:
            return why
    if params:  # an argument this build lacks: drop it at its default, refuse it otherwise
        for name in [n for n in kw if n not in params and n != "softmax_scale"]:
            value, default = kw[name], _DEFAULTS.get(name)
            at_default = value is None if default is None else (not isinstance(value, torch.Tensor) and value == default)
            if name == "return_attn_probs" and impl.version == 3:
                at_default = True  # early FA3 builds have no such flag and always return (out, lse)
            if not at_default:
                return f"{impl.source}: its {route} function has no {name!r} argument (installed version too old?)"
            del kw[name]
    return FlashPlan(route, kind, kw, parts.seq, positional)


def lse_to_BHS(lse: torch.Tensor, B: int, H: int, S: int) -> torch.Tensor:
    """flash_attn_func's lse as (B, H, S) float32, -inf on rows that saw no key (FA2 writes +inf)."""
    if tuple(lse.shape) == (B, S, H) and (B, S, H) != (B, H, S):
        lse = lse.transpose(1, 2)
    elif tuple(lse.shape) != (B, H, S):
        raise RuntimeError(f"flash-attn returned an lse of shape {tuple(lse.shape)}, expected (B={B}, H={H}, S={S})")
    lse = lse.float()
    return torch.where(lse == float("inf"), float("-inf"), lse)


def _split_result(r, want_lse: bool):
    if isinstance(r, (tuple, list)):
        return r[0], (r[1] if want_lse else None)
    if want_lse:
        raise RuntimeError("flash-attn returned no lse although return_attn_probs=True was passed")
    return r, None


# --------------------------------------------------------------------------------------------
# loaders (first use)


@functools.lru_cache(maxsize=None)
def _is_hopper() -> bool:
    forced = os.environ.get("ANYATTN_CUDA_CAPABILITY")
    if forced:
        return forced.split(".")[0].strip() == "9"
    return torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9


def _version_of(mod, name: str) -> str:
    return f"{name} {getattr(mod, '__version__', '')}".strip()


@functools.lru_cache(maxsize=None)
def _load_flash_attn() -> Impl | str:
    if _is_hopper() and importlib.util.find_spec("flash_attn_interface") is not None:
        try:
            mod = importlib.import_module("flash_attn_interface")
        except ImportError as e:
            fa3_err = f"flash_attn_interface (FA3) failed to import: {e}"
        else:
            return impl_from_module(mod, 3, "flash_attn_interface (FA3)")
    else:
        fa3_err = None
    if importlib.util.find_spec("flash_attn") is None:
        return fa3_err or FLASH_INSTALL
    try:
        mod = importlib.import_module("flash_attn")
    except ImportError as e:
        return f"flash_attn failed to import ({e}); reinstall flash-attn for torch {torch.__version__}"
    return impl_from_module(mod, 2, _version_of(mod, "flash_attn"))


@functools.lru_cache(maxsize=None)
def _load_kernels() -> Impl | str:
    try:
        from kernels import get_kernel
    except ImportError as e:
        return f"{KERNELS_INSTALL} ({e})"
    repos = KERNEL_REPOS_HOPPER if _is_hopper() else KERNEL_REPOS_OTHER
    errors = []
    for repo in repos:
        try:
            mod = get_kernel(repo)
        except (ImportError, OSError) as e:  # not on the hub cache / no build for this torch+CUDA
            errors.append(f"{repo}: {type(e).__name__}: {e}")
            continue
        impl = impl_from_module(mod, 3 if repo.endswith("3") else 2, repo)
        if isinstance(impl, Impl):
            return impl
        errors.append(impl)
    return "no usable flash-attn build from the kernels hub: " + "; ".join(errors)


# --------------------------------------------------------------------------------------------
# the two backends


class FlashPackageBackend(AttentionBackend):
    """A flash-attn build as a backend. ``loader() -> Impl | reason`` finds the build (a test
    passes one that returns a stand-in Impl; ``cuda_only=False`` then runs it on CPU tensors)."""

    def __init__(self, name: str, spec_names: tuple[str, ...], install: str, loader, *, cuda_only: bool = True):
        self.name = name
        self._specs = spec_names
        self._install = install
        self._loader = loader
        self._cuda_only = cuda_only
        self.facts = Facts(packed_documents=True, dropout=True)  # dropout: FA2 builds (FA3 refuses in supports)
        self.packings = LRU(128)

    def available(self) -> str | None:
        if not self._cuda_only:
            return None
        if all(importlib.util.find_spec(n) is None for n in self._specs):
            return self._install
        if not torch.cuda.is_available():
            return "needs a CUDA GPU (torch.cuda.is_available() is False)"
        major, minor = torch.cuda.get_device_capability()
        if major < 8:
            return f"FlashAttention needs compute capability >= 8.0, found {major}.{minor}"
        return None  # the package itself is imported on first use (supports/run)

    def impl(self) -> Impl | str:
        return self._loader()

    def supports(self, sig) -> str | None:
        if self._cuda_only and sig.device.type != "cuda":
            return f"needs CUDA tensors, got {sig.device.type}"
        impl = self.impl()
        if isinstance(impl, str):
            return impl
        return supports_with(sig, impl)

    def clear(self) -> None:
        self.packings.clear()
        if self._loader in (_load_flash_attn, _load_kernels):
            _load_flash_attn.cache_clear()
            _load_kernels.cache_clear()
            _is_hopper.cache_clear()

    def run(self, call):
        sink = call.sink
        if sink is None:
            return self._run(call, call.return_lse)
        out, lse = self._run(call, True)  # a sink is combined through the lse (out * sigmoid(lse - sink))
        out, lse = sink.combine(out, lse)
        return out, (lse if call.return_lse else None)

    def _run(self, call, want_lse: bool):
        impl = self.impl()
        if isinstance(impl, str):
            raise RuntimeError(f"{self.name}: {impl}")
        p = plan(call, impl)
        if isinstance(p, str):
            raise RuntimeError(f"flash-attn cannot run this call: {p}")
        B, Hq, Sq, _ = call.q.shape
        q_BSHD, k_BSHD, v_BSHD = (t.transpose(1, 2) for t in (call.q, call.k, call.v))
        if p.route == "func":
            out, lse = _split_result(impl.func(q_BSHD, k_BSHD, v_BSHD, **p.kwargs), want_lse)
            out = out.transpose(1, 2)
            if lse is not None:
                lse = lse_to_BHS(lse, B, Hq, Sq).detach()
            return out, lse
        pk = self.packings.get(call.key) if call.cacheable else None
        if pk is None:
            if p.seq.packed_layout:  # separate query and key layouts: cu_seqlens_q != cu_seqlens_k
                pk = pair_packing_for(call, p.seq, p.positional, p.kwargs.get("window_size", (-1, -1))[1] > 0)
            else:
                pk = packing_for(call, p.seq, p.positional)
            if call.cacheable:
                self.packings.put(call.key, pk, call.tokens)
        pq, pkv = (pk.q, pk.k) if isinstance(pk, PairPacking) else (pk, pk)
        if pk.route == "empty":
            out = call.q.new_zeros(B, Hq, Sq, call.Dv)
            if call.requires_grad:
                out = out + 0.0 * (call.q.sum() + call.k.sum() + call.v.sum())
            lse = torch.full((B, Hq, Sq), float("-inf"), device=call.device) if want_lse else None
            return out, lse
        r = impl.varlen_func(
            tokens_in(pq, q_BSHD), tokens_in(pkv, k_BSHD), tokens_in(pkv, v_BSHD), pq.cu, pkv.cu, pq.max_seqlen,
            pkv.max_seqlen, **p.kwargs,
        )  # fmt: skip
        out_THD, lse = _split_result(r, want_lse)
        out = tokens_out(pq, out_THD, B, Sq).transpose(1, 2)
        if lse is not None:
            lse = lse_out(pq, lse_to_TH(lse, pq.total, Hq).detach(), B, Sq, Hq)
        return out, lse


def supports_with(sig, impl: Impl) -> str | None:
    """Everything but the device and the loading (CPU tests pass a stand-in Impl)."""
    if sig.dtype not in (torch.float16, torch.bfloat16):
        return f"FlashAttention takes float16/bfloat16, got {sig.dtype}"
    if sig.need_weights:
        return "FlashAttention does not return attention weights"
    if sig.D != sig.Dv:
        return f"flash-attn here needs equal q/k and v head dims, got D={sig.D}, Dv={sig.Dv}"
    if sig.D > MAX_HEAD_DIM or sig.D % 8 != 0:
        return f"FlashAttention needs a head dim <= {MAX_HEAD_DIM} and a multiple of 8, got {sig.D}"
    if sig.scale <= 0:
        return f"scale={sig.scale}: FlashAttention masks before it scales, which breaks for a scale <= 0; use sdpa or eager"
    p = plan(sig, impl)
    return p if isinstance(p, str) else None


def flash_backend() -> FlashPackageBackend:
    return FlashPackageBackend("flash", ("flash_attn", "flash_attn_interface"), FLASH_INSTALL, _load_flash_attn)


def kernels_flash_backend() -> FlashPackageBackend:
    return FlashPackageBackend("kernels_flash", ("kernels",), KERNELS_INSTALL, _load_kernels)
