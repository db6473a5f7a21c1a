"""``flash_torch``: PyTorch's own FlashAttention kernels, no extra package.

Two entry points of torch reach the FlashAttention kernels that ship inside torch:

* ``F.scaled_dot_product_attention`` restricted to ``SDPBackend.FLASH_ATTENTION`` (dense, and
  causal when Sq == Sk: SDPA's ``is_causal`` is top-left aligned, ours bottom-right);
* ``torch.nn.attention.varlen.varlen_attn`` over packed (T, H, D) tokens with ``cu_seqlens``
  (documents, padding, windows, bottom-right causal with Sq != Sk, and every call that asks for
  the log-sum-exp, which SDPA does not return).

Shape legend: B batch, Hq/Hkv heads, S row length (Sq == Sk on the packed paths), T real tokens,
D head dim. ``x_BSHD`` is a (B, S, H, D) view, ``x_THD`` packed tokens, ``lse_TH`` (T, Hq).

Routes (``plan``, from the signature alone)::

    mask                          route    window_size   sequences
    None                          sdpa     -             -            (varlen when return_lse)
    causal(), Sq == Sk            sdpa     -             -            (varlen when return_lse)
    causal(), Sq != Sk            varlen   (-1, 0)       one per row, cu_q = [0, Sq, 2Sq, ...]
    sliding_window(l, r)          varlen   (l, r)        one per row
    documents(...) [& window]     varlen   (l, r)|none   one per document (see _varlen.Packing)
    padding(...)   [& window]     varlen   (l, r)|none   one per row's real tokens
    documents(q, kv=k) / padding(..., kv=...)            one per document / row with queries and
                                  varlen   (l, r)|none   keys: cu_seqlens_q != cu_seqlens_k, Sq != Sk

Window convention: our ``sliding_window(left, right)`` counts keys beside the query itself, which
is exactly FlashAttention's ``window_size=(left, right)``; None maps to -1 (unbounded). See
docs/flash.md for the picture and HF's off-by-one (HF ``sliding_window=W`` is ``(W - 1, 0)``).

Host <-> device synchronization. The hot path never syncs: max lengths are Python ints from
host lengths (``documents(list)``, CPU tensors, a SeqInfo). A new packing costs building
``cu_seqlens`` on the CPU and one pinned, non-blocking copy. Only a term that holds nothing but
device data is read to the host, once per content: ``documents(cuda tensor)`` (the lengths),
``padding(mask=...)`` (the row counts and whether each row is one run), ``padding(lengths=cuda
tensor)`` (the lengths).

Limits (refused by ``supports``, with the reason): CUDA fp16/bf16 only, head dim <= 256 and a
multiple of 8, D == Dv, no dropout, no score terms, a positive scale, no masks beyond the table
above, Sq == Sk for documents/padding without a key layout of their own (``kv=``). The returned lse is detached: varlen's backward ignores a
gradient on the lse, so gradients flow through ``out`` only (use eager or flex for that).
"""

from __future__ import annotations

import importlib
import inspect
import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

from .._cache import LRU
from ..layout import host_to_device
from ..spec import Documents
from ._sdp_switch import run_only
from ._varlen import (
    Packing,
    PairPacking,
    lse_out,
    lse_to_TH,
    map_window,
    packing_for,
    pair_packing_for,
    positional_refusal,
    side_packing,
    split_mask,
    tokens_in,
    tokens_out,
)
from .base import AttentionBackend, Facts

MAX_HEAD_DIM = 256
# torch's FlashAttention kernel behind varlen_attn reads a paged KV cache only in pages of a
# multiple of 256 tokens: mha_varlen_fwd (aten/src/ATen/native/transformers/cuda/flash_attn/
# flash_api.cpp) checks "Paged KV cache block size must be divisible by 256". A cache with other
# pages (PagedKVCache's default is 128) is gathered into contiguous keys instead of failing there.
PAGE_MULTIPLE = 256


def load_varlen():
    """(varlen_attn, AuxRequest or None), or why this torch has none (a str)."""
    try:
        varlen_mod = importlib.import_module("torch.nn.attention.varlen")
    except ImportError:
        return f"torch {torch.__version__} has no torch.nn.attention.varlen (varlen_attn); upgrade torch"
    fn = getattr(varlen_mod, "varlen_attn", None)
    if fn is None:
        return f"torch {torch.__version__}: torch.nn.attention.varlen has no varlen_attn; upgrade torch"
    return fn, getattr(varlen_mod, "AuxRequest", None)


def varlen_params(fn) -> frozenset:
    """The parameter names of a varlen_attn function (torch 2.11: ... return_aux, scale,
    window_size; torch 2.13 adds enable_gqa, seqused_k, block_table, num_splits)."""
    try:
        return frozenset(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return frozenset()


class Plan(NamedTuple):
    route: str  # "sdpa" | "varlen"
    kind: str  # "dense" | "causal" | "window" | "documents" | "padding" (for explain and tests)
    window: tuple[int, int]  # FlashAttention window_size
    is_causal: bool  # SDPA route only
    seq: object  # the documents / padding term of the signature (None: one sequence per row)


def wants_lse(sig) -> bool:
    """The kernel's lse is needed: asked for, or a sink is combined through it."""
    return sig.return_lse or sig.sink is not None


def plan(sig) -> Plan | str:
    """How ``flash_torch`` computes calls of this signature, or why it cannot. Checks only the
    mask; dtype/device/options are ``supports``' job."""
    parts = split_mask(sig.mask)
    if isinstance(parts, str):
        return parts
    window = map_window(parts.window)
    lse = wants_lse(sig)
    if parts.seq is None:
        if parts.window is None:
            return Plan("varlen" if lse else "sdpa", "dense", window, False, None)
        if parts.window.is_causal:
            if sig.Sq == sig.Sk and not lse:
                return Plan("sdpa", "causal", window, True, None)
            return Plan("varlen", "causal", window, False, None)
        if sig.Sq > sig.Sk and parts.window.right != 0:
            # Found by the H200 fuzz run (sliding_window(3, 57), Sq=35, Sk=22: max error 1.4): with
            # a right extent the varlen kernel's local window disagrees with the bottom-right
            # definition on queries that sit before the first key. Windows with right=0 and Sq > Sk
            # passed every H200 test (tests/test_cuda_flash.py) and stay allowed.
            return (
                f"{parts.window!r} with Sq={sig.Sq} > Sk={sig.Sk}: FlashAttention's local window differs from "
                "the bottom-right definition on queries before the first key; use flex, sdpa or cudnn"
            )
        return Plan("varlen", "window", window, False, None)
    kind = "documents" if isinstance(parts.seq, Documents) else "padding"
    if sig.Sq != sig.Sk and not parts.seq.packed_layout:
        return (
            f"{kind} on FlashAttention needs Sq == Sk, got Sq={sig.Sq}, Sk={sig.Sk}; give the keys their own layout "
            f"({kind}(..., kv=...)), or use flex or sdpa"
        )
    why = positional_refusal(parts.seq, parts.window is not None)
    if why is not None:
        return why
    return Plan("varlen", kind, window, False, parts.seq)


class FlashTorchBackend(AttentionBackend):
    """``varlen`` / ``sdpa``: the kernels called (default: torch's; a test passes stand-ins),
    ``sdpa_kernel``: the SDPA kernel of the dense/causal route, ``cuda_only=False`` lets the
    packing logic run on CPU tensors around a stand-in kernel."""

    name = "flash_torch"
    facts = Facts(packed_documents=True)

    def __init__(self, *, varlen=None, sdpa=None, sdpa_kernel: str = "flash", cuda_only: bool = True):
        self._varlen_given = varlen
        self._varlen = varlen
        self._aux = None
        self._params: frozenset = varlen_params(varlen) if varlen is not None else frozenset()
        self._sdpa = sdpa if sdpa is not None else F.scaled_dot_product_attention
        self._sdpa_kernel = sdpa_kernel
        self._cuda_only = cuda_only
        self._lse_heads_first: bool | None = None
        self.packings = LRU(128)  # content key -> Packing
        self._uniform_cu = LRU(64)  # (B, Sq, Sk, device) -> (cu_q, cu_k)
        self.stats = {"packings_built": 0}

    def _bind(self) -> str | None:
        """Bind torch's varlen_attn (unless a stand-in was given); None on success, else why not."""
        if self._varlen is not None:
            return None
        got = load_varlen()
        if isinstance(got, str):
            return got
        self._varlen, self._aux = got
        self._params = varlen_params(self._varlen)
        return None

    def _aux_request(self):
        if self._aux is None:
            got = load_varlen()
            self._aux = got[1] if not isinstance(got, str) else None
        return self._aux

    def available(self) -> str | None:
        why = self._bind()
        if why is not None:
            return why
        if not self._cuda_only:
            return None
        if not torch.cuda.is_available():
            return "needs a CUDA GPU (torch.cuda.is_available() is False); PyTorch's FlashAttention kernels are CUDA-only"
        probe = getattr(torch.backends.cuda, "is_flash_attention_available", None)
        if probe is not None and not probe():
            return f"torch {torch.__version__} was built without FlashAttention kernels"
        major, minor = torch.cuda.get_device_capability()
        if major < 8:
            return f"FlashAttention needs compute capability >= 8.0, found {major}.{minor}"
        return None

    def supports(self, sig) -> str | None:
        if self._cuda_only and sig.device.type != "cuda":
            return f"needs CUDA tensors, got {sig.device.type} (PyTorch's FlashAttention kernels are CUDA-only)"
        if sig.dtype not in (torch.float16, torch.bfloat16):
            return f"FlashAttention takes float16/bfloat16, got {sig.dtype}"
        if sig.dropout_p > 0:
            return "flash_torch has no dropout (dropout_p > 0); use sdpa, cudnn or eager"
        if sig.need_weights:
            return "FlashAttention does not return attention weights"
        if sig.logit_scores:
            names = ", ".join(repr(s) for s in sig.logit_scores)
            return f"score terms ({names}) are not supported by PyTorch's FlashAttention; use flash (softcap, alibi) or flex"
        if sig.sink is not None and sig.requires_grad:
            return (
                f"{sig.sink!r} with gradients: the sink is combined through the lse, and varlen_attn's backward "
                "ignores the lse's gradient; use flex or eager for training with sinks"
            )
        if sig.D != sig.Dv:
            return f"FlashAttention needs equal q/k and v head dims, got D={sig.D}, Dv={sig.Dv}"
        if sig.D > MAX_HEAD_DIM or sig.D % 8 != 0:
            return f"FlashAttention needs a head dim <= {MAX_HEAD_DIM} and a multiple of 8, got {sig.D}"
        if sig.scale <= 0:
            return f"scale={sig.scale}: FlashAttention masks before it scales, which breaks for a scale <= 0; use sdpa or eager"
        p = plan(sig)
        if isinstance(p, str):
            return p
        if p.route == "varlen":
            why = self._bind()
            if why is not None:
                return why
            params = self._params
            if p.window not in ((-1, -1), (-1, 0)) and "window_size" not in params:
                return f"torch {torch.__version__}'s varlen_attn has no window_size; sliding windows need torch >= 2.11"
            if p.window == (-1, 0) and "window_size" not in params and "is_causal" not in params:
                return f"torch {torch.__version__}'s varlen_attn has no causal option"
            if wants_lse(sig) and "return_aux" not in params:
                return f"torch {torch.__version__}'s varlen_attn cannot return the log-sum-exp (no return_aux)"
            if not math.isclose(sig.scale, 1.0 / math.sqrt(sig.D)) and "scale" not in params:
                return f"torch {torch.__version__}'s varlen_attn has no scale argument (only 1/sqrt(D))"
        return None

    def clear(self) -> None:
        self.packings.clear()
        self._uniform_cu.clear()

    def reads_pages(self, sig) -> bool:
        """A paged KV cache is read through varlen_attn's block table where this torch has one
        (torch 2.13: ``block_table`` + ``seqused_k``, inference only) and, on CUDA, the page size
        is one its kernel takes (:data:`PAGE_MULTIPLE`); else the pages are gathered."""
        if sig.paged is None or self._bind() is not None:
            return False
        if sig.device.type == "cuda" and sig.page_size % PAGE_MULTIPLE:
            return False
        return "block_table" in self._params and "seqused_k" in self._params

    def _run_paged(self, call, p, want_lse: bool):
        """varlen_attn over the pool with the step's block table: one sequence per sequence of
        the step that has new tokens and cached keys; bottom-right per sequence (the cache's)."""
        step = call.kv.step
        B, Hq, Sq, _ = call.q.shape
        pk = self.packings.get(call.key) if call.cacheable else None
        if pk is None:
            live = step.live()
            keep = [i for i, (n, (m, _)) in enumerate(zip(step.new, live)) if n > 0 and m > 0]
            if not keep:
                pk = ("empty",)
            else:
                starts, t = [], 0
                for i, n in enumerate(step.new):  # first flat position of each sequence's queries
                    starts.append(i * Sq if step.layout == "rows" else t)
                    t += n
                qpk = side_packing([step.new[i] for i in keep], [starts[i] for i in keep], B, Sq, call.device)
                bt, used = step.block_table()
                idx = host_to_device(torch.tensor(keep, dtype=torch.int64), bt.device)
                used_k = [live[i][0] for i in keep]
                cu = [0]
                for m in used_k:
                    cu.append(cu[-1] + m)
                cu_k = host_to_device(torch.tensor(cu, dtype=torch.int32), call.device)
                pk = (qpk, bt.index_select(0, idx), used.index_select(0, idx), cu_k, max(used_k))
            if call.cacheable:
                self.packings.put(call.key, pk, call.tokens)
        if pk[0] == "empty":
            return _zeros(call, want_lse)
        qpk, bt, used, cu_k, max_k = pk
        c = call.kv.cache
        kpool, vpool = c.k[call.kv.layer], c.v[call.kv.layer]  # (P + 1, ps, Hkv, D)
        q = call.q if call.q.stride(-1) == 1 else call.q.contiguous()
        kw = {"block_table": bt, "seqused_k": used}
        if p.window != (-1, -1):
            kw["window_size"] = p.window
        if "scale" in self._params:
            kw["scale"] = call.scale
        if call.gqa and "enable_gqa" in self._params:
            kw["enable_gqa"] = True
        if want_lse:
            kw["return_aux"] = self._aux_request()(lse=True)
        r = self._varlen(tokens_in(qpk, q.transpose(1, 2)), kpool, vpool, qpk.cu, cu_k, qpk.max_seqlen, max_k, **kw)
        out_THD, lse = (r[0], r[1]) if want_lse else (r, None)
        out = tokens_out(qpk, out_THD, B, Sq).transpose(1, 2)
        if lse is not None:
            lse = lse_out(qpk, self._lse_TH(lse, qpk.total, Hq, q), B, Sq, Hq)
        return out, lse

    # -- running --------------------------------------------------------------------------
    def packing(self, call, seq, positional: bool) -> Packing:
        """The call's varlen metadata, built once per content key."""
        pk = self.packings.get(call.key) if call.cacheable else None
        if pk is None:
            pk = packing_for(call, seq, positional)
            if not torch.compiler.is_compiling():
                self.stats["packings_built"] += 1
            if call.cacheable:
                self.packings.put(call.key, pk, call.tokens)
        return pk

    def pair_packing(self, call, seq, window) -> PairPacking:
        """The varlen metadata of separate query and key layouts, built once per content key."""
        pk = self.packings.get(call.key) if call.cacheable else None
        if pk is None:
            pk = pair_packing_for(call, seq, window != (-1, -1), window[1] > 0)
            if not torch.compiler.is_compiling():
                self.stats["packings_built"] += 1
            if call.cacheable:
                self.packings.put(call.key, pk, call.tokens)
        return pk

    def _uniform(self, B: int, Sq: int, Sk: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        key = (B, Sq, Sk, device)
        compiling = torch.compiler.is_compiling()  # no cache lookups inside a trace (see _cache)
        hit = None if compiling else self._uniform_cu.get(key)
        if hit is None:
            ar = torch.arange(B + 1, dtype=torch.int32)
            hit = (host_to_device(ar * Sq, device), host_to_device(ar * Sk, device))
            if not compiling:
                self._uniform_cu.put(key, hit)
        return hit

    def _heads_first(self, lse: torch.Tensor, T: int, H: int, like: torch.Tensor) -> bool:
        """The layout of the varlen kernel's lse, learned from an unambiguous shape; when the call
        itself is ambiguous (T == H), from one tiny probe call (3 tokens, 1 head), once."""
        if self._lse_heads_first is None:
            if T != H:
                self._lse_heads_first = tuple(lse.shape[:2]) == (H, T)
            else:
                x = torch.zeros(3, 1, 8, device=like.device, dtype=like.dtype)
                cu = torch.tensor([0, 3], dtype=torch.int32, device=like.device)
                with torch.no_grad():
                    _, probe = self._varlen(x, x, x, cu, cu, 3, 3, return_aux=self._aux_request()(lse=True))
                self._lse_heads_first = tuple(probe.shape[:2]) == (1, 3)
        return self._lse_heads_first

    def _call_varlen(self, q_THD, k_THD, v_THD, cu_q, cu_k, max_q, max_k, window, scale, gqa, want_lse):
        params = self._params
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
            kw["return_aux"] = self._aux_request()(lse=True)
        r = self._varlen(q_THD, k_THD, v_THD, cu_q, cu_k, max_q, max_k, **kw)
        if want_lse:
            return r[0], r[1]
        return r, None

    def _lse_TH(self, lse, T, H, like):
        return lse_to_TH(lse, T, H, self._heads_first(lse, T, H, like)).detach()

    def run(self, call):
        """(out (B, Hq, Sq, Dv), lse (B, Hq, Sq) float32 or None)."""
        sink = call.sink
        if sink is None:
            return self._run(call, call.return_lse)
        out, lse = self._run(call, True)
        out, lse = sink.combine(out, lse)
        return out, (lse if call.return_lse else None)

    def _run(self, call, want_lse: bool):
        p = plan(call.sig)
        if isinstance(p, str):  # resolve() checked supports(); reaching this is a bug
            raise RuntimeError(f"flash_torch cannot run this call: {p}")
        # FlashAttention needs a unit stride on the head dim (SDPA's FLASH check and varlen_attn
        # refuse otherwise); copy only the inputs that lack it (e.g. q[..., ::2]).
        q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (call.q, call.k, call.v))
        if p.route == "sdpa":
            kw = {"enable_gqa": True} if call.gqa else {}
            sdpa = self._sdpa
            out = run_only(self._sdpa_kernel, lambda: sdpa(q, k, v, is_causal=p.is_causal, scale=call.scale, **kw))
            return out, None
        if self._varlen is None:  # bound by available() (at trace time under torch.compile)
            self._bind()
        if call.kv is not None:  # a paged KV cache, read through the block table
            return self._run_paged(call, p, want_lse)
        B, Hq, Sq, D = q.shape
        Sk, Hkv, Dv = k.shape[2], call.Hkv, call.Dv
        q_BSHD, k_BSHD, v_BSHD = (t.transpose(1, 2) for t in (q, k, v))
        if p.seq is None:  # one sequence per row
            cu_q, cu_k = self._uniform(B, Sq, Sk, call.device)
            out_THD, lse = self._call_varlen(
                q_BSHD.reshape(B * Sq, Hq, D), k_BSHD.reshape(B * Sk, Hkv, D), v_BSHD.reshape(B * Sk, Hkv, Dv),
                cu_q, cu_k, Sq, Sk, p.window, call.scale, call.gqa, want_lse,
            )  # fmt: skip
            out = out_THD.view(B, Sq, Hq, Dv).transpose(1, 2)
            if lse is not None:
                lse = self._lse_TH(lse, B * Sq, Hq, q).view(B, Sq, Hq).transpose(1, 2)
            return out, lse
        seq = split_mask(call.mask).seq
        if seq.packed_layout:  # queries and keys packed differently: cu_seqlens_q != cu_seqlens_k
            pp = self.pair_packing(call, seq, p.window)
            if pp.route == "empty":
                return _zeros(call, want_lse)
            out_THD, lse = self._call_varlen(
                tokens_in(pp.q, q_BSHD), tokens_in(pp.k, k_BSHD), tokens_in(pp.k, v_BSHD), pp.q.cu, pp.k.cu,
                pp.q.max_seqlen, pp.k.max_seqlen, p.window, call.scale, call.gqa, want_lse,
            )  # fmt: skip
            out = tokens_out(pp.q, out_THD, B, Sq).transpose(1, 2)
            if lse is not None:
                lse = lse_out(pp.q, self._lse_TH(lse, pp.q.total, Hq, q), B, Sq, Hq)
            return out, lse
        pk = self.packing(call, seq, p.window != (-1, -1))  # this call's values
        if pk.route == "empty":
            return _zeros(call, want_lse)
        out_THD, lse = self._call_varlen(
            tokens_in(pk, q_BSHD), tokens_in(pk, k_BSHD), tokens_in(pk, v_BSHD), pk.cu, pk.cu, pk.max_seqlen,
            pk.max_seqlen, p.window, call.scale, call.gqa, want_lse,
        )  # fmt: skip
        out = tokens_out(pk, out_THD, B, Sq).transpose(1, 2)
        if lse is not None:
            lse = lse_out(pk, self._lse_TH(lse, pk.total, Hq, q), B, Sq, Hq)
        return out, lse


def _zeros(call, want_lse=None):
    """No real token in the batch: every row sees nothing."""
    B, Hq, Sq, _ = call.q.shape
    out = call.q.new_zeros(B, Hq, Sq, call.Dv)
    if call.requires_grad:  # keep the graph so that backward gives zero gradients
        out = out + 0.0 * (call.q.sum() + call.k.sum() + call.v.sum())
    want = call.return_lse if want_lse is None else want_lse
    lse = torch.full((B, Hq, Sq), float("-inf"), device=call.device) if want else None
    return out, lse
