"""FlexAttention backend: terms lowered to ``mask_mod`` / ``score_mod``, compiled, cached.

* The mask becomes a ``BlockMask`` (``create_block_mask`` on the term's predicate), cached per
  (mask, shapes, device): a repeated mask is never rebuilt (on an H200 a 16k-token document
  BlockMask costs ~5 ms against a ~0.6 ms kernel).
* Score terms are chained into one ``score_mod`` in the order given.
* One compiled entry point per variant structure (the tree of term types) and geometry, each
  with its own code object and therefore its own dynamo cache: every entry compiles exactly
  once, and many variants in one process never exhaust a shared recompile limit. Document
  lengths, padding masks and other term tensors are kernel inputs: changing them never
  recompiles. (Why not dynamic shapes: see _DYNAMIC below.)
* The unfused path never runs silently. An uncompiled ``flex_attention`` call materializes the
  full score matrix (seen at 7 TFLOP/s instead of ~300). If dynamo ever falls back to running
  the entry point eagerly (recompile limit hit, dynamo disabled), the entry point notices it is
  not being compiled and raises instead of computing.
* Inside a caller's ``torch.compile`` region, ``flex_attention`` is called directly and becomes
  part of the caller's graph.
"""

from __future__ import annotations

import functools
import inspect
import os
import shutil
import types
import warnings

import torch

from .._lru import LRU
from ..errors import AnyAttnError

NAME = "flex"

_BLOCK_MASKS = LRU(64)  # (mask key, versions, B, H, Sq, Sk, device) -> BlockMask
_ENTRIES: dict = {}
# Static shapes, one compiled entry point per (variant structure, shapes, dtype, grad mode).
# Dynamic-shape FlexAttention fails to lower on the torch versions we test (torch 2.11 CUDA:
# "LoweringException: 'ShapeAsConstantBuffer' object has no attribute 'dtype'"; torch 2.13 CPU:
# "'Mul' object has no attribute 'get_name'"; python floats such as the scale become unbacked
# scalars), so each entry is compiled for one geometry, exactly once. Changing *document lengths*
# at a fixed sequence length never recompiles (they are tensors captured by the mask); a new
# sequence length compiles one new kernel. ANYATTN_FLEX_DYNAMIC=1 opts into dynamic shapes.
_DYNAMIC = os.environ.get("ANYATTN_FLEX_DYNAMIC", "0") == "1"
STATS = {"block_mask_builds": 0, "compiled_entries": 0}


class FlexFallbackError(AnyAttnError, RuntimeError):
    """The compiled FlexAttention kernel could not be used and the unfused path was refused."""


_FA = None
_HAS_AUX = False


@functools.lru_cache(maxsize=None)
def _flex_api():
    global _FA, _HAS_AUX
    from torch.nn.attention import flex_attention as fa

    _FA, _HAS_AUX = fa, "return_aux" in inspect.signature(fa.flex_attention).parameters
    return _FA, _HAS_AUX


def available() -> str | None:
    try:
        _flex_api()
    except ImportError:
        return f"torch {torch.__version__} has no FlexAttention (needs torch >= 2.5)"
    if not torch.cuda.is_available():
        if tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2]) < (2, 6):
            return f"FlexAttention on CPU needs torch >= 2.6, found {torch.__version__}"
        if not any(shutil.which(c) for c in ("cc", "gcc", "clang", "g++")):
            return "FlexAttention on CPU compiles C++ through inductor, and no C/C++ compiler is on PATH"
    return None


def supports(call) -> str | None:
    dev = call.device.type
    if dev not in ("cuda", "cpu"):
        return f"FlexAttention runs on CUDA or CPU, got {dev}"
    if dev == "cpu" and call.requires_grad:
        return "FlexAttention has no backward on CPU (inputs require grad); use eager or sdpa, or a CUDA device"
    if dev == "cpu" and call.return_lse:
        return "FlexAttention on CPU does not return the log-sum-exp; use eager, or a CUDA device"
    if call.dropout_p > 0:
        return "FlexAttention has no dropout (dropout_p > 0); use eager, sdpa or cudnn"
    if call.dtype == torch.float64:
        return "FlexAttention's compiled kernels do not take float64"
    if dev == "cuda" and call.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"dtype {call.dtype} is not supported by FlexAttention"
    if call.D < 16 or call.Dv < 16:
        return f"FlexAttention needs head dims >= 16, got D={call.D}, Dv={call.Dv}"
    if call.need_weights:
        return "FlexAttention does not return attention weights"
    return None


# --------------------------------------------------------------------------------------------
# compiled entry points


def _entry_template(q, k, v, score_mod, block_mask, scale, enable_gqa, return_lse):
    if not torch.compiler.is_compiling():
        # Traced by dynamo this branch is dead code. Executed, it means dynamo fell back to
        # running this function eagerly, which would run the unfused O(S^2) path.
        raise FlexFallbackError(
            "flex: torch.compile fell back to eager execution for this variant (recompile limit "
            f"{torch._dynamo.config.recompile_limit} reached, or dynamo disabled); refusing to run "
            "FlexAttention's unfused path. Raise torch._dynamo.config.recompile_limit, or keep the "
            "number of distinct variants, dtypes and grad modes per process bounded."
        )
    return _call_flex(q, k, v, score_mod, block_mask, scale, enable_gqa, return_lse)


def _call_flex(q, k, v, score_mod, block_mask, scale, enable_gqa, return_lse):
    fa, has_aux = _FA, _HAS_AUX  # plain globals: traced code must not call the lru_cache'd probe
    if return_lse and has_aux:
        out, aux = fa.flex_attention(
            q, k, v, score_mod=score_mod, block_mask=block_mask, scale=scale, enable_gqa=enable_gqa,
            return_aux=fa.AuxRequest(lse=True),
        )  # fmt: skip
        return out, aux.lse
    if return_lse:
        return fa.flex_attention(
            q, k, v, score_mod=score_mod, block_mask=block_mask, scale=scale, enable_gqa=enable_gqa, return_lse=True
        )
    out = fa.flex_attention(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=scale, enable_gqa=enable_gqa)
    return out, None


def _structure(term) -> tuple:
    """The shape of a variant that decides the generated kernel: term types and user functions."""
    if term is None:
        return ()
    parts: list = [type(term).__name__]
    for name in term.__dataclass_fields__:
        v = getattr(term, name)
        if isinstance(v, tuple) and v and hasattr(v[0], "__dataclass_fields__"):
            parts.append(tuple(_structure(t) for t in v))
        elif hasattr(v, "__dataclass_fields__"):
            parts.append(_structure(v))
        elif callable(v) and not isinstance(v, torch.Tensor):
            parts.append(id(getattr(v, "__code__", v)))
        elif isinstance(v, torch.Tensor):
            parts.append(v.dim())
    return tuple(parts)


def _entry_for(call):
    key = (
        _structure(call.mask), tuple(_structure(s) for s in call.scores), call.device.type,
        None if _DYNAMIC else (tuple(call.q.shape), tuple(call.k.shape), tuple(call.v.shape)),
        call.dtype, call.requires_grad, call.return_lse,
    )  # fmt: skip
    return _entry(key)


def _entry(key):
    """The compiled entry point for ``key``: a fresh code object (its own dynamo cache) of
    ``_entry_template``, compiled once."""
    fn = _ENTRIES.get(key)
    if fn is None:
        name = f"anyattn_flex_{len(_ENTRIES)}"
        raw = types.FunctionType(_entry_template.__code__.replace(co_name=name), _entry_template.__globals__, name)
        fn = torch.compile(raw, dynamic=_DYNAMIC, fullgraph=True)
        _ENTRIES[key] = fn
        STATS["compiled_entries"] += 1
    return fn


# --------------------------------------------------------------------------------------------
# lowering


def block_mask_for(call):
    """The BlockMask of a call's mask (None when there is no mask), built once and cached."""
    if call.mask is None:
        return None
    geo = call.geo
    key = (call.mask.key, geo.B, geo.H, geo.Sq, geo.Sk, geo.device)
    bm = _BLOCK_MASKS.get(key)
    if bm is None:
        fa = _FA if _FA is not None else _flex_api()[0]
        bound = call.bound_mask()
        pred = bound.pred

        def mask_mod(b, h, q_idx, kv_idx):
            return pred(b, h, q_idx, kv_idx)

        mask_mod.__name__ = f"anyattn_mask:{call.mask!r}"
        bm = fa.create_block_mask(
            mask_mod, geo.B if bound.uses_b else None, geo.H if bound.uses_h else None, geo.Sq, geo.Sk, device=geo.device
        )
        if not torch.compiler.is_compiling():  # a counter read while tracing becomes a guard
            STATS["block_mask_builds"] += 1
        _BLOCK_MASKS.put(key, (bm, call.mask))  # the term keeps its tensors (and their ids) alive
        return bm
    return bm[0]


def score_mod_for(call):
    mods = [bs.mod for bs in call.bound_scores()]
    if not mods:
        return None
    if len(mods) == 1:
        return mods[0]

    def score_mod(score, b, h, q_idx, kv_idx):
        for m in mods:
            score = m(score, b, h, q_idx, kv_idx)
        return score

    return score_mod


# calls with at most this many queries against more keys (and at most this many scores) run
# FlexAttention unfused: see run()
UNFUSED_MAX_SQ = 16
UNFUSED_MAX_SCORES = 2**26

_BY_CALL = LRU(256)  # call key -> (entry, score_mod, expand_kv, BlockMask): one lookup per repeated call

# Known issue (torch 2.11, H200): FlexAttention forward+backward with GQA fails to compile at some
# sequence lengths ("NoValidChoicesError: No choices to select", e.g. S=113 with 8 query / 2 kv
# heads; the same geometry without GQA, and S=128 or 200 with GQA, compile). Reproducer:
# benchmarks/flex_diag.py; results in benchmarks/results/flex_diag_h200.txt. When it happens the
# kv heads are repeated to the query heads (the same math: head h reads kv head h // (Hq // Hkv))
# and that form is compiled instead; the call stays on flex and stays exact.
_GQA_COMPILE_FAILURE = "NoValidChoicesError"


def _is_recompile_limit(e: BaseException) -> bool:
    """Dynamo's recompile-limit failure (torch 2.11 raises FailOnRecompileLimitHit, "Hard failure
    due to fullgraph=True", chained to an Unsupported("Dynamo recompile limit exceeded"))."""
    seen = 0
    while e is not None and seen < 8:
        name = type(e).__name__
        if "RecompileLimit" in name or "CacheLimit" in name or "recompile limit" in str(e):
            return True
        e = e.__cause__ or e.__context__
        seen += 1
    return False


def _expand_kv(call):
    g = call.geo.H // call.Hkv
    return call.k.repeat_interleave(g, dim=1), call.v.repeat_interleave(g, dim=1)


def _entry_expanded(call):
    return _entry(("expanded-kv", id(_entry_for(call))))


def run(call):
    if _FA is None:
        _flex_api()
    q, k, v = call.q, call.k, call.v
    if torch.compiler.is_compiling():  # inside the caller's compiled graph
        return _call_flex(q, k, v, score_mod_for(call), block_mask_for(call), call.scale, call.gqa, call.return_lse)
    geo = call.geo
    if geo.Sq <= UNFUSED_MAX_SQ < geo.Sk and geo.B * geo.H * geo.Sq * geo.Sk <= UNFUSED_MAX_SCORES:
        # Decode-sized calls (a few queries against a KV cache that grows every step): the kernel
        # is compiled per shape, so each step would compile again. FlexAttention's unfused path
        # computes the same scores, mask and score_mod exactly, at O(Sq * Sk) like the kernel.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*flex_attention.*")
            return _call_flex(q, k, v, score_mod_for(call), block_mask_for(call), call.scale, call.gqa, call.return_lse)
    # one lookup on the hot path: the call key determines entry, score_mod and BlockMask
    hit = _BY_CALL.get(call.key) if call.cacheable else None
    if hit is None:
        hit = (_entry_for(call), score_mod_for(call), False, block_mask_for(call))
        if call.cacheable:
            _BY_CALL.put(call.key, hit)
    fn, sm, expand, bm = hit
    if expand:
        k, v = _expand_kv(call)
        return fn(q, k, v, sm, bm, call.scale, False, call.return_lse)
    try:
        return fn(q, k, v, sm, bm, call.scale, call.gqa, call.return_lse)
    except Exception as e:  # noqa: BLE001 - re-raised below unless it is one of two known cases
        msg = str(e)
        if _is_recompile_limit(e):
            # fullgraph=True: dynamo raises at its recompile limit; say what it means
            raise FlexFallbackError(
                f"flex: torch.compile reached its recompile limit ({torch._dynamo.config.recompile_limit}) for "
                f"this variant; refusing to run FlexAttention's unfused path. Raise "
                "torch._dynamo.config.recompile_limit or keep the number of input layouts per geometry bounded."
            ) from e
        if call.gqa and _GQA_COMPILE_FAILURE in msg:
            STATS["gqa_expanded"] = STATS.get("gqa_expanded", 0) + 1
            fn = _entry_expanded(call)
            if call.cacheable:
                _BY_CALL.put(call.key, (fn, sm, True, bm))
            k, v = _expand_kv(call)
            return fn(q, k, v, sm, bm, call.scale, False, call.return_lse)
        raise
