"""Raw torch calls, written the way users write them today, timed next to anyattn.

Nothing here goes through anyattn: masks and ``mask_mod``/``score_mod`` functions are written by
hand from the variant definitions in ``cases.py`` (so they double as an independent check of
anyattn's semantics: raw outputs are compared with the float64 oracle too, forward only).

    raw:sdpa             F.scaled_dot_product_attention: is_causal for causal/gqa, no mask for
                         dense, a keys-only (B,1,1,S) mask for padding, else a materialized bool
                         mask (a float bias for alibi); torch picks the kernel
    raw:sdpa[flash]      the same call under sdpa_kernel(FLASH_ATTENTION)      (CUDA only)
    raw:sdpa[cudnn]      ... under sdpa_kernel(CUDNN_ATTENTION)                (CUDA only)
    raw:sdpa[efficient]  ... under sdpa_kernel(EFFICIENT_ATTENTION)            (CUDA only)
    raw:flex             torch.compile(flex_attention) with a BlockMask built once, outside the
                         timed region (compilation shows up in first_ms)
    raw:varlen           torch.nn.attention.varlen.varlen_attn on the packed tokens (CUDA,
                         fp16/bf16, when this torch has it): documents, padding (unpadded),
                         dense/causal/window/gqa (one sequence per row)
    raw:sdpa-padded      documents only: every document padded to the longest, one batch row
                         per document, SDPA with a key-padding mask

Each ``prepare`` returns a :class:`Prepared` whose ``run`` is the timed callable (forward, or
forward + backward through ``torch.autograd.grad``) and whose ``forward`` gives the output in
the (B, Hq, S, D) layout for the oracle check. Layout changes (transposes, packing, padding)
happen in ``prepare``, outside the timed region.
"""

from __future__ import annotations

import functools
import inspect
import types
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .cases import Config, Inputs

__all__ = ["COUNTERPART", "RAW_NAMES", "Prepared", "Skip", "prepare", "refusal", "varlen_fn"]

RAW_NAMES = (
    "raw:sdpa",
    "raw:sdpa[flash]",
    "raw:sdpa[cudnn]",
    "raw:sdpa[efficient]",
    "raw:flex",
    "raw:varlen",
    "raw:sdpa-padded",
)
# anyattn backend -> the raw call it dispatches to (for the "overhead vs raw" column)
COUNTERPART = {"sdpa": "raw:sdpa", "cudnn": "raw:sdpa[cudnn]", "flex": "raw:flex", "flash_torch": "raw:varlen"}


class Skip(Exception):
    """This raw call cannot express this case (the message says why)."""


@dataclass
class Prepared:
    run: Callable[[], object]  # timed
    forward: Callable[[], torch.Tensor] | None  # (B, Hq, S, D) output for the oracle check
    compiles: bool = False


# ---------------------------------------------------------------------------------------------
# SDPA


def _idx(S, dev):
    return torch.arange(S, device=dev)[:, None], torch.arange(S, device=dev)[None, :]


def _doc_ids(lengths, S, dev):
    ids = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    if ids.numel() < S:  # tokens past the last document: their own id -1
        ids = torch.cat([ids, torch.full((S - ids.numel(),), -1)])
    return ids.to(dev)


def _sdpa_form(cfg: Config, inp: Inputs):
    """(attn_mask, is_causal) the way a user writes it for this variant."""
    var, S, dev = cfg.variant, cfg.S, inp.q.device
    i, j = _idx(S, dev)
    if var == "dense":
        return None, False
    if var in ("causal", "gqa"):
        return None, True
    if var == "window":
        return (j <= i) & (i - j <= cfg.window), False
    if var in ("documents", "doc_window"):
        ids = _doc_ids(inp.doc_lengths, S, dev)
        m = (ids[:, None] == ids[None, :]) & (ids[:, None] >= 0)
        return (m & (j <= i) & (i - j <= cfg.window) if var == "doc_window" else m), False
    if var == "padding":
        keep = torch.arange(S, device=dev)[None, :] < torch.tensor(inp.pad_lengths, device=dev)[:, None]
        return keep[:, None, None, :], False
    if var == "prefix_lm":
        return (j < inp.prefix) | (j <= i), False
    if var == "alibi":
        slopes = inp.slopes.to(dev)
        bias = -slopes[:, None, None] * (i - j).abs().float()
        bias = bias.masked_fill(j > i, float("-inf"))
        return bias[None].to(cfg.torch_dtype), False
    if var == "softcap":
        raise Skip("SDPA cannot express softcap (not an additive bias)")
    raise Skip(f"no SDPA form for variant {var!r}")


_KERNELS = {
    "raw:sdpa[flash]": "FLASH_ATTENTION",
    "raw:sdpa[cudnn]": "CUDNN_ATTENTION",
    "raw:sdpa[efficient]": "EFFICIENT_ATTENTION",
}


def _prepare_sdpa(name, cfg, inp):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    kernel = None
    if name in _KERNELS:
        if inp.q.device.type != "cuda":
            raise Skip("per-kernel SDPA rows run on CUDA only")
        kernel = getattr(SDPBackend, _KERNELS[name], None)
        if kernel is None:
            raise Skip(f"torch {torch.__version__} has no SDPBackend.{_KERNELS[name]}")
    mask, is_causal = _sdpa_form(cfg, inp)
    kw = {"enable_gqa": True} if cfg.Hq != cfg.Hkv else {}
    q, k, v = _leaves(inp, cfg.grad)

    def fwd():
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, **kw)

    if kernel is not None:
        inner = fwd

        def fwd():
            with sdpa_kernel([kernel]):
                return inner()

    return Prepared(_runner(fwd, (q, k, v), cfg.grad), fwd)


# ---------------------------------------------------------------------------------------------
# FlexAttention

_FLEX_CACHE: dict = {}  # (variant, mode, dtype, device) -> compiled function (own code object)
_flex_attention = None  # torch.nn.attention.flex_attention.flex_attention, set on first use


def _flex_template(q, k, v, score_mod, block_mask, enable_gqa):
    if not torch.compiler.is_compiling():  # dynamo fell back to eager: the unfused O(S^2) path
        raise RuntimeError("raw flex: torch.compile fell back to eager (recompile limit?); refusing the unfused path")
    return _flex_attention(q, k, v, score_mod=score_mod, block_mask=block_mask, enable_gqa=enable_gqa)


def _compiled_flex(cfg: Config):
    key = (cfg.variant, cfg.mode, cfg.dtype, cfg.device, cfg.B, cfg.S, cfg.Hq, cfg.Hkv, cfg.D)
    fn = _FLEX_CACHE.get(key)
    if fn is None:
        # One code object per case and shape: each has its own dynamo cache, so many variants
        # in one process never exhaust one shared recompile limit. Static shapes: dynamic-shape
        # flex fails to lower on torch 2.11 CUDA and 2.13 CPU (see anyattn/backends/flex.py).
        name = f"raw_flex_{len(_FLEX_CACHE)}"
        code = _flex_template.__code__.replace(co_name=name)
        raw = types.FunctionType(code, _flex_template.__globals__, name)
        fn = torch.compile(raw, dynamic=False, fullgraph=True)
        _FLEX_CACHE[key] = fn
    return fn


def _flex_mods(cfg: Config, inp: Inputs):
    """(mask_mod | None, score_mod | None, mask depends on b)."""
    var, dev = cfg.variant, inp.q.device

    def causal(b, h, q, kv):
        return q >= kv

    if var == "dense":
        return None, None, False
    if var in ("causal", "gqa"):
        return causal, None, False
    if var == "window":
        w = cfg.window

        def window(b, h, q, kv):
            return (q >= kv) & (q - kv <= w)

        return window, None, False
    if var == "documents":
        ids = _doc_ids(inp.doc_lengths, cfg.S, dev)

        def document(b, h, q, kv):
            return (ids[q] == ids[kv]) & (ids[q] >= 0)

        return document, None, False
    if var == "doc_window":
        ids, w = _doc_ids(inp.doc_lengths, cfg.S, dev), cfg.window

        def document_window(b, h, q, kv):
            return (ids[q] == ids[kv]) & (ids[q] >= 0) & (q >= kv) & (q - kv <= w)

        return document_window, None, False
    if var == "padding":
        lens = torch.tensor(inp.pad_lengths, device=dev)

        def pad(b, h, q, kv):
            return (q < lens[b]) & (kv < lens[b])

        return pad, None, True
    if var == "prefix_lm":
        p = inp.prefix

        def prefix(b, h, q, kv):
            return (kv < p) | (q >= kv)

        return prefix, None, False
    if var == "softcap":
        cap = cfg.cap

        def tanh_cap(score, b, h, q, kv):
            return cap * torch.tanh(score / cap)

        return causal, tanh_cap, False
    if var == "alibi":
        slopes = inp.slopes.to(dev)

        def alibi(score, b, h, q, kv):
            return score - slopes[h] * (q - kv).abs()

        return causal, alibi, False
    raise Skip(f"no flex form for variant {var!r}")


def _prepare_flex(cfg, inp):
    global _flex_attention
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError:
        raise Skip(f"torch {torch.__version__} has no FlexAttention") from None
    _flex_attention = flex_attention
    dev = inp.q.device
    if dev.type == "cpu" and cfg.grad:
        raise Skip("FlexAttention has no backward on CPU")
    if cfg.torch_dtype == torch.float64:
        raise Skip("FlexAttention does not take float64")
    mask_mod, score_mod, uses_b = _flex_mods(cfg, inp)
    bm = None
    if mask_mod is not None:  # built once, outside the timed region
        bm = create_block_mask(mask_mod, cfg.B if uses_b else None, None, cfg.S, cfg.S, device=dev)
    fn = _compiled_flex(cfg)
    gqa = cfg.Hq != cfg.Hkv
    q, k, v = _leaves(inp, cfg.grad)

    def fwd():
        return fn(q, k, v, score_mod, bm, gqa)

    return Prepared(_runner(fwd, (q, k, v), cfg.grad), fwd, compiles=True)


# ---------------------------------------------------------------------------------------------
# varlen_attn


@functools.cache
def varlen_fn():
    """(varlen_attn, its keyword parameters) or (None, why not)."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None, f"torch {torch.__version__} has no torch.nn.attention.varlen.varlen_attn"
    try:
        params = frozenset(inspect.signature(varlen_attn).parameters)
    except (TypeError, ValueError):
        params = frozenset()
    return varlen_attn, params


def _segments(cfg: Config, inp: Inputs):
    """(token index (T,) into the flattened (B*S) tokens, cu_seqlens, max_len, window_size)."""
    B, S = cfg.B, cfg.S
    var = cfg.variant
    if var in ("documents", "doc_window"):
        lens = list(inp.doc_lengths) * B
        starts = [b * S + s for b in range(B) for s in _cumsum0(inp.doc_lengths)]
        window = (cfg.window, 0) if var == "doc_window" else (-1, -1)
    elif var == "padding":
        lens = list(inp.pad_lengths)
        starts = [b * S for b in range(B)]
        window = (-1, -1)
    elif var in ("dense", "causal", "gqa", "window"):
        lens, starts = [S] * B, [b * S for b in range(B)]
        window = {"dense": (-1, -1), "causal": (-1, 0), "gqa": (-1, 0), "window": (cfg.window, 0)}[var]
    else:
        raise Skip(f"varlen_attn has no form for {var!r} (no mask or score terms beyond windows)")
    idx = torch.cat([torch.arange(s, s + n) for s, n in zip(starts, lens)])
    cu = torch.tensor(_cumsum0(lens) + [sum(lens)], dtype=torch.int32)
    return idx, cu, max(lens), window


def _cumsum0(xs):
    out, t = [], 0
    for x in xs:
        out.append(t)
        t += x
    return out


def _prepare_varlen(cfg, inp):
    dev = inp.q.device
    if dev.type != "cuda":
        raise Skip("varlen_attn runs on CUDA only")
    if cfg.torch_dtype not in (torch.float16, torch.bfloat16):
        raise Skip("varlen_attn takes float16/bfloat16 only")
    fn, params = varlen_fn()
    if fn is None:
        raise Skip(params)
    return packed(cfg, inp, fn, params)


def packed(cfg: Config, inp: Inputs, fn, params) -> Prepared:
    """``fn(q, k, v, cu_seq_q, cu_seq_k, max_q, max_k, **kw)`` (varlen_attn's signature) on the
    packed tokens of a case; ``params`` are the keyword parameters ``fn`` accepts."""
    dev = inp.q.device
    idx, cu, max_len, window = _segments(cfg, inp)
    kw = {}
    if window != (-1, -1):
        if "window_size" not in params:
            if "is_causal" in params and window == (-1, 0):
                kw["is_causal"] = True
            else:
                raise Skip("this torch's varlen_attn has no window_size")
        else:
            kw["window_size"] = window
    if cfg.Hq != cfg.Hkv and "enable_gqa" in params:
        kw["enable_gqa"] = True
    idx, cu = idx.to(dev), cu.to(dev)

    def pack(t):  # (B, H, S, D) -> (T, H, D)
        B, H, S, D = t.shape
        return t.detach().transpose(1, 2).reshape(B * S, H, D)[idx].contiguous().requires_grad_(cfg.grad)

    q, k, v = pack(inp.q), pack(inp.k), pack(inp.v)

    def fwd():
        return fn(q, k, v, cu, cu, max_len, max_len, **kw)

    def forward_bhsd():
        out = fwd()
        full = out.new_zeros(cfg.B * cfg.S, cfg.Hq, cfg.D)
        full[idx] = out
        return full.view(cfg.B, cfg.S, cfg.Hq, cfg.D).transpose(1, 2)

    return Prepared(_runner(fwd, (q, k, v), cfg.grad), forward_bhsd)


# ---------------------------------------------------------------------------------------------
# padded SDPA for packed documents


def _prepare_padded(cfg, inp):
    if cfg.variant != "documents":
        raise Skip("padded SDPA is the packed-documents baseline only")
    dev = inp.q.device
    lens = list(inp.doc_lengths) * cfg.B
    starts = [b * cfg.S + s for b in range(cfg.B) for s in _cumsum0(inp.doc_lengths)]
    L = max(lens)
    pos = torch.arange(L)
    valid = pos[None, :] < torch.tensor(lens)[:, None]  # (N, L)
    idx = (torch.tensor(starts)[:, None] + pos[None, :]).clamp(max=cfg.B * cfg.S - 1)
    valid, idx = valid.to(dev), idx.to(dev)

    def pad(t):  # (B, H, S, D) -> (N, H, L, D), zeros past each document
        B, H, S, D = t.shape
        flat = t.detach().transpose(1, 2).reshape(B * S, H, D)
        p = flat[idx] * valid[..., None, None].to(t.dtype)
        return p.transpose(1, 2).contiguous().requires_grad_(cfg.grad)

    q, k, v = pad(inp.q), pad(inp.k), pad(inp.v)
    keys = valid[:, None, None, :]
    kw = {"enable_gqa": True} if cfg.Hq != cfg.Hkv else {}

    def fwd():
        return F.scaled_dot_product_attention(q, k, v, attn_mask=keys, **kw)

    def forward_bhsd():
        out = fwd().transpose(1, 2)  # (N, L, H, D)
        full = out.new_zeros(cfg.B * cfg.S, cfg.Hq, cfg.D)
        full[idx[valid]] = out[valid]
        return full.view(cfg.B, cfg.S, cfg.Hq, cfg.D).transpose(1, 2)

    return Prepared(_runner(fwd, (q, k, v), cfg.grad), forward_bhsd)


# ---------------------------------------------------------------------------------------------


def _leaves(inp: Inputs, grad: bool):
    return tuple(t.detach().requires_grad_(grad) for t in (inp.q, inp.k, inp.v))


def _runner(fwd, leaves, grad: bool):
    """The timed callable: forward, or forward + backward w.r.t. q, k, v."""
    if not grad:
        return fwd
    dout = None

    def fwd_bwd():
        nonlocal dout
        out = fwd()
        if dout is None:
            dout = torch.randn_like(out)
        return torch.autograd.grad(out, leaves, dout)

    return fwd_bwd


def refusal(exc: BaseException, caught) -> str | None:
    """The reason when ``exc`` (raised by a raw call's first run, with warnings ``caught``) is
    SDPA refusing the call ("No available kernel"), else None (a real failure)."""
    text = str(exc).lower()
    # torch <= 2.12: "No available kernel. Aborting execution."; later: "No viable backend ..."
    if isinstance(exc, RuntimeError) and ("no available kernel" in text or "no viable backend" in text):
        why = "; ".join(dict.fromkeys(str(w.message).splitlines()[0] for w in caught))
        return "SDPA refused: " + (why[:300] or str(exc).splitlines()[0])
    return None


def prepare(name: str, cfg: Config, inp: Inputs) -> Prepared:
    """Build the raw call ``name`` for a case; raises :class:`Skip` when it cannot express it."""
    if name in ("raw:sdpa", *_KERNELS):
        return _prepare_sdpa(name, cfg, inp)
    if name == "raw:flex":
        return _prepare_flex(cfg, inp)
    if name == "raw:varlen":
        return _prepare_varlen(cfg, inp)
    if name == "raw:sdpa-padded":
        return _prepare_padded(cfg, inp)
    raise ValueError(f"unknown raw call {name!r}; expected one of {RAW_NAMES}")
