"""``flash_torch``: PyTorch's own FlashAttention kernels, no extra package.

Two entry points of torch reach the FlashAttention kernels that ship inside torch:

* ``F.scaled_dot_product_attention`` restricted to ``SDPBackend.FLASH_ATTENTION`` (dense, and
  causal when Sq == Sk: SDPA's ``is_causal`` is top-left aligned, ours bottom-right);
* ``torch.nn.attention.varlen.varlen_attn`` over packed (T, H, D) tokens with ``cu_seqlens``
  (documents, padding, windows, bottom-right causal with Sq != Sk, and every call that asks for
  the log-sum-exp, which SDPA does not return).

Shape legend: B batch, Hq/Hkv heads, S row length (Sq == Sk on the packed paths), T real tokens,
D head dim. ``x_BSHD`` is a (B, S, H, D) view, ``x_THD`` packed tokens, ``lse_TH`` (T, Hq).

Lowering (pure, cached per (mask key, shapes, device) in ``_PLANS``)::

    mask                          route    window_size   sequences
    None                          sdpa     -             -            (varlen when return_lse)
    causal(), Sq == Sk            sdpa     -             -            (varlen when return_lse)
    causal(), Sq != Sk            varlen   (-1, 0)       one per row, cu_q = [0, Sq, 2Sq, ...]
    sliding_window(l, r)          varlen   (l, r)        one per row
    documents(...) [& window]     varlen   (l, r)|none   one per document (SeqInfo)
    padding(...)   [& window]     varlen   (l, r)|none   one per row's real tokens (SeqInfo)

Window convention: our ``sliding_window(left, right)`` counts keys beside the query itself, which
is exactly FlashAttention's ``window_size=(left, right)``; None maps to -1 (unbounded). See
docs/flash.md for the picture and HF's off-by-one (HF ``sliding_window=W`` is ``(W - 1, 0)``).

Host <-> device synchronization. The hot path never syncs: max lengths are Python ints from
``SeqInfo.max_seqlen`` or ``Documents.host_lengths``. Building a plan (once per mask key, then
cached) reads device values to the host when the term holds only device data:
``documents(tensor)`` without host lengths (the lengths), ``padding(mask=...)`` (the row counts,
through ``SeqInfo.from_padding_mask``; plus one bool when combined with a window, see
``_contiguous``), ``padding(lengths=tensor)`` (the lengths). Terms built from Python lists or
from a :class:`anyattn.SeqInfo` never sync.

Limits (refused by ``supports``, with the reason): CUDA fp16/bf16 only, head dim <= 256 and a
multiple of 8, D == Dv, no dropout, no score terms, no masks beyond the table above, Sq == Sk for
documents/padding. The returned lse is detached: varlen's backward ignores a gradient on the lse,
so gradients flow through ``out`` only (use eager or flex to differentiate through the lse).
"""

from __future__ import annotations

import functools
import importlib
import inspect
import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

from .._lru import LRU
from ..layout import pad, unpad
from ..spec import Documents
from ._sdp_switch import run_only
from ._varlen import Packing, lse_to_TH, map_window, packing_for, split_mask  # noqa: F401  (re-exported)

NAME = "flash_torch"

# The kernels this backend calls, as module-level references: tests patch them to record what
# ran (tests/test_cuda_flash.py) or to run the packing logic on CPU (tests/test_flash_backends.py).
_VARLEN = None  # torch.nn.attention.varlen.varlen_attn, bound on first use
_VARLEN_PARAMS: frozenset = frozenset()  # its keyword parameters (signatures change between releases)
_AUX_REQUEST = None  # torch.nn.attention.varlen.AuxRequest, when this torch has return_aux
_SDPA = F.scaled_dot_product_attention
_SDPA_KERNEL = "flash"  # SDPA kernel of the dense/causal route (see _sdp_switch.run_only)

_LSE_HEADS_FIRST: dict = {}  # varlen function -> whether its lse is (H, T)
_UNIFORM_CU = LRU(64)  # (B, Sq, Sk, device) -> (cu_q, cu_k)

MAX_HEAD_DIM = 256


# --------------------------------------------------------------------------------------------
# torch capability probes


@functools.lru_cache(maxsize=None)
def _load_varlen() -> str | None:
    """Bind the varlen entry point; None on success, else why it is missing."""
    global _VARLEN, _VARLEN_PARAMS, _AUX_REQUEST
    try:
        varlen_mod = importlib.import_module("torch.nn.attention.varlen")
    except ImportError:
        return f"torch {torch.__version__} has no torch.nn.attention.varlen (varlen_attn); upgrade torch"
    fn = getattr(varlen_mod, "varlen_attn", None)
    if fn is None:
        return f"torch {torch.__version__}: torch.nn.attention.varlen has no varlen_attn; upgrade torch"
    _VARLEN_PARAMS = varlen_params(fn)
    _AUX_REQUEST = getattr(varlen_mod, "AuxRequest", None)
    _VARLEN = fn
    return None


def varlen_params(fn) -> frozenset:
    """The parameter names of a varlen_attn function (torch 2.11: ... return_aux, scale,
    window_size; torch 2.13 adds enable_gqa, seqused_k, block_table, num_splits)."""
    try:
        return frozenset(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return frozenset()


def available() -> str | None:
    why = _load_varlen()
    if why is not None:
        return why
    if not torch.cuda.is_available():
        return "needs a CUDA GPU (torch.cuda.is_available() is False); PyTorch's FlashAttention kernels are CUDA-only"
    probe = getattr(torch.backends.cuda, "is_flash_attention_available", None)
    if probe is not None and not probe():
        return f"torch {torch.__version__} was built without FlashAttention kernels"
    major, minor = torch.cuda.get_device_capability()
    if major < 8:
        return f"FlashAttention needs compute capability >= 8.0, found {major}.{minor}"
    return None


# --------------------------------------------------------------------------------------------
# lowering


class Plan(NamedTuple):
    route: str  # "sdpa" | "varlen"
    kind: str  # "dense" | "causal" | "window" | "documents" | "padding" (for explain and tests)
    window: tuple[int, int]  # FlashAttention window_size
    is_causal: bool  # SDPA route only
    packing: Packing | None  # documents / padding; None: one sequence per row


def plan(call) -> Plan | str:
    """How ``flash_torch`` computes a call, or why it cannot. Checks only the mask;
    dtype/device/options are ``supports``' job. Sequence metadata is cached (``packing_for``)."""
    parts = split_mask(call.mask)
    if isinstance(parts, str):
        return parts
    geo = call.geo
    window = map_window(parts.window)
    if parts.seq is None:
        if parts.window is None:
            return Plan("varlen" if call.return_lse else "sdpa", "dense", window, False, None)
        if parts.window.is_causal:
            if geo.Sq == geo.Sk and not call.return_lse:
                return Plan("sdpa", "causal", window, True, None)
            return Plan("varlen", "causal", window, False, None)
        if geo.Sq > geo.Sk and parts.window.right != 0:
            # Found by the H200 fuzz run (sliding_window(3, 57), Sq=35, Sk=22: max error 1.4): with
            # a right extent the varlen kernel's local window disagrees with the bottom-right
            # definition on queries that sit before the first key. Windows with right=0 and Sq > Sk
            # passed every H200 test (tests/test_cuda_flash.py) and stay allowed.
            return (
                f"{parts.window!r} with Sq={geo.Sq} > Sk={geo.Sk}: FlashAttention's local window differs from "
                "the bottom-right definition on queries before the first key; use flex, sdpa or cudnn"
            )
        return Plan("varlen", "window", window, False, None)
    kind = "documents" if isinstance(parts.seq, Documents) else "padding"
    if geo.Sq != geo.Sk:
        return f"{kind} on FlashAttention needs Sq == Sk, got Sq={geo.Sq}, Sk={geo.Sk}; use flex or sdpa"
    packing = packing_for(call, parts.seq, parts.window is not None)
    if isinstance(packing, str):
        return packing
    return Plan("varlen", kind, window, False, packing)


# --------------------------------------------------------------------------------------------
# capability check


def supports(call) -> str | None:
    if call.device.type != "cuda":
        return f"needs CUDA tensors, got {call.device.type} (PyTorch's FlashAttention kernels are CUDA-only)"
    return _supports_portable(call)


def _supports_portable(call) -> str | None:
    """Everything but the device check (the CPU tests exercise it with a stand-in kernel)."""
    if call.dtype not in (torch.float16, torch.bfloat16):
        return f"FlashAttention takes float16/bfloat16, got {call.dtype}"
    if call.dropout_p > 0:
        return "flash_torch has no dropout (dropout_p > 0); use sdpa, cudnn or eager"
    if call.need_weights:
        return "FlashAttention does not return attention weights"
    if call.scores:
        names = ", ".join(repr(s) for s in call.scores)
        return f"score terms ({names}) are not supported by PyTorch's FlashAttention; use flash (softcap, alibi) or flex"
    if call.D != call.Dv:
        return f"FlashAttention needs equal q/k and v head dims, got D={call.D}, Dv={call.Dv}"
    if call.D > MAX_HEAD_DIM or call.D % 8 != 0:
        return f"FlashAttention needs a head dim <= {MAX_HEAD_DIM} and a multiple of 8, got {call.D}"
    p = plan(call)
    if isinstance(p, str):
        return p
    if p.route == "varlen":
        why = None if _VARLEN is not None else _load_varlen()  # bound: no traced import under compile
        if why is not None:
            return why
        params = _VARLEN_PARAMS
        if p.window not in ((-1, -1), (-1, 0)) and "window_size" not in params:
            return f"torch {torch.__version__}'s varlen_attn has no window_size; sliding windows need torch >= 2.11"
        if p.window == (-1, 0) and "window_size" not in params and "is_causal" not in params:
            return f"torch {torch.__version__}'s varlen_attn has no causal option"
        if call.return_lse and "return_aux" not in params:
            return f"torch {torch.__version__}'s varlen_attn cannot return the log-sum-exp (no return_aux)"
        if not math.isclose(call.scale, 1.0 / math.sqrt(call.D)) and "scale" not in params:
            return f"torch {torch.__version__}'s varlen_attn has no scale argument (only 1/sqrt(D))"
    return None


# --------------------------------------------------------------------------------------------
# running


def _uniform_cu(B: int, Sq: int, Sk: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    key = (B, Sq, Sk, device)
    hit = _UNIFORM_CU.get(key)
    if hit is None:
        ar = torch.arange(B + 1, dtype=torch.int32)
        hit = ((ar * Sq).to(device), (ar * Sk).to(device))
        _UNIFORM_CU.put(key, hit)
    return hit


def _lse_heads_first(lse: torch.Tensor, T: int, H: int, like: torch.Tensor) -> bool:
    """The layout of the current varlen kernel's lse, learned from an unambiguous shape; when the
    call itself is ambiguous (T == H), from one tiny probe call (3 tokens, 1 head), once."""
    fn = _VARLEN
    known = _LSE_HEADS_FIRST.get(fn)
    if known is not None:
        return known
    if T != H:
        known = tuple(lse.shape[:2]) == (H, T)
    else:
        x = torch.zeros(3, 1, 8, device=like.device, dtype=like.dtype)
        cu = torch.tensor([0, 3], dtype=torch.int32, device=like.device)
        with torch.no_grad():
            _, probe = _VARLEN(x, x, x, cu, cu, 3, 3, return_aux=_AUX_REQUEST(lse=True))
        known = tuple(probe.shape[:2]) == (1, 3)
    _LSE_HEADS_FIRST[fn] = known
    return known


def _lse_TH(lse, T, H, like):
    return lse_to_TH(lse, T, H, _lse_heads_first(lse, T, H, like)).detach()


def _varlen(q_THD, k_THD, v_THD, cu_q, cu_k, max_q, max_k, window, scale, gqa, want_lse):
    params = _VARLEN_PARAMS
    kw = {}
    if window != (-1, -1):
        if "window_size" in params:
            kw["window_size"] = window  # a tuple: torch compares it with (-1, 0) to set is_causal
        else:
            kw["is_causal"] = True  # supports() let only (-1, 0) through
    if "scale" in params:
        kw["scale"] = scale
    if gqa and "enable_gqa" in params:
        kw["enable_gqa"] = True  # torch 2.13 checks heads; 2.11's kernel handles Hq != Hkv natively
    if want_lse:
        kw["return_aux"] = _AUX_REQUEST(lse=True)
    r = _VARLEN(q_THD, k_THD, v_THD, cu_q, cu_k, max_q, max_k, **kw)
    if want_lse:
        return r[0], r[1]
    return r, None


def _zeros(call):
    """No real token in the batch: every row sees nothing."""
    B, Hq, Sq, _ = call.q.shape
    out = call.q.new_zeros(B, Hq, Sq, call.Dv)
    if call.requires_grad:  # keep the graph so that backward gives zero gradients
        out = out + 0.0 * (call.q.sum() + call.k.sum() + call.v.sum())
    lse = torch.full((B, Hq, Sq), float("-inf"), device=call.device) if call.return_lse else None
    return out, lse


def run(call):
    """(out (B, Hq, Sq, Dv), lse (B, Hq, Sq) float32 or None)."""
    p = plan(call)
    if isinstance(p, str):  # resolve() checked supports(); reaching this is a bug
        raise RuntimeError(f"flash_torch cannot run this call: {p}")
    if call.q.stride(-1) != 1 or call.k.stride(-1) != 1 or call.v.stride(-1) != 1:
        # FlashAttention needs a unit stride on the head dim (SDPA's FLASH check and varlen_attn
        # refuse otherwise); copy only the inputs that lack it (e.g. q[..., ::2]).
        call.q, call.k, call.v = (t if t.stride(-1) == 1 else t.contiguous() for t in (call.q, call.k, call.v))
    if p.route == "sdpa":
        kw = {"enable_gqa": True} if call.gqa else {}
        out = run_only(_SDPA_KERNEL, lambda: _SDPA(call.q, call.k, call.v, is_causal=p.is_causal, scale=call.scale, **kw))
        return out, None
    if _VARLEN is None:  # bound by available() (at trace time under torch.compile)
        _load_varlen()
    B, Hq, Sq, D = call.q.shape
    Sk, Hkv = call.k.shape[2], call.Hkv
    q_BSHD, k_BSHD, v_BSHD = (t.transpose(1, 2) for t in (call.q, call.k, call.v))
    pk = p.packing
    if pk is None:  # one sequence per row
        cu_q, cu_k = _uniform_cu(B, Sq, Sk, call.device)
        out_THD, lse = _varlen(
            q_BSHD.reshape(B * Sq, Hq, D), k_BSHD.reshape(B * Sk, Hkv, D), v_BSHD.reshape(B * Sk, Hkv, call.Dv),
            cu_q, cu_k, Sq, Sk, p.window, call.scale, call.gqa, call.return_lse,
        )  # fmt: skip
        out = out_THD.view(B, Sq, Hq, call.Dv).transpose(1, 2)
        if lse is not None:
            lse = _lse_TH(lse, B * Sq, Hq, call.q).view(B, Sq, Hq).transpose(1, 2)
        return out, lse
    if pk.total == 0:
        return _zeros(call)
    info = pk.info
    T = info.total
    # Copy-free fast paths: rows filled exactly (no padding) are a reshape; one packed row with
    # right padding is a slice. Otherwise gather the real tokens (unpad) and scatter back (pad).
    if T == B * Sq and info.kind == "documents":
        ins = (q_BSHD.reshape(T, Hq, D), k_BSHD.reshape(T, Hkv, D), v_BSHD.reshape(T, Hkv, call.Dv))
        finish = lambda o: o.view(B, Sq, Hq, call.Dv)  # noqa: E731
    elif B == 1 and info.kind == "documents":
        ins = (q_BSHD[0, :T], k_BSHD[0, :T], v_BSHD[0, :T])
        finish = lambda o: torch.nn.functional.pad(o, (0, 0, 0, 0, 0, Sq - T)).unsqueeze(0)  # noqa: E731
    else:
        ins = (unpad(q_BSHD, info), unpad(k_BSHD, info), unpad(v_BSHD, info))
        finish = lambda o: pad(o, info)  # noqa: E731  padding tokens: exactly 0
    out_THD, lse = _varlen(
        *ins, pk.cu, pk.cu, pk.max_seqlen, pk.max_seqlen, p.window, call.scale, call.gqa, call.return_lse,
    )  # fmt: skip
    out = finish(out_THD).transpose(1, 2)
    if lse is not None:
        lse_TH = _lse_TH(lse, info.total, Hq, call.q)
        full = torch.full((B * Sq, Hq), float("-inf"), device=call.device).index_copy(0, info.indices, lse_TH)
        lse = full.view(B, Sq, Hq).transpose(1, 2)
    return out, lse
