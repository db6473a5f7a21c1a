"""What flex does when a compile fails, and what keys its compiled entry points.

Each known failure of FlexAttention's compile has a recovery that computes the same math, so a
call stays on flex and stays exact (``FlexBackend.run``); the failures are matched on torch's
messages, which are written here with the run that found them. Any other compile failure is
raised as it is.
"""

from __future__ import annotations

import torch

# Known issue (torch 2.11, H200): FlexAttention forward+backward with GQA fails to compile at some
# sequence lengths ("NoValidChoicesError: No choices to select", e.g. S=113 with 8 query / 2 kv
# heads; the same geometry without GQA, and S=128 or 200 with GQA, compile). Reproducer:
# benchmarks/flex_diag.py; results in benchmarks/results/flex_diag_h200.txt. When it happens the
# kv heads are repeated to the query heads (the same math: head h reads kv head h // (Hq // Hkv))
# and that form is compiled instead; the call stays on flex and stays exact.
GQA_COMPILE_FAILURE = "NoValidChoicesError"
# Round 23 (H100, torch 2.11): a bias score_mod (8 query / 2 kv heads, D=64, S=128, bf16, with
# gradients) failed to compile with "No valid triton configs. OutOfMemoryError: out of resource:
# ... Required: 245760 Hardware limit: 232448" (torch's default config there: 128 x 128 blocks, 3
# pipeline stages; 3 x (64 KiB float32 bias tile + 16 KiB K tile) is that size: our reading, not
# traced). flex recompiles such a variant with 2, then 1 stage (``triton_stages``);
# benchmarks/flex_gqa_oor_probe.py says which forms compile.
OUT_OF_SHARED_MEMORY = "No valid triton configs"


def code_ids(term) -> tuple:
    """The user functions inside a term: a different function is a different kernel."""
    out = []
    for name in getattr(term, "__dataclass_fields__", ()):
        v = getattr(term, name)
        if isinstance(v, tuple):
            for x in v:
                out.extend(code_ids(x))
        elif hasattr(v, "__dataclass_fields__") and not hasattr(v, "cu_seqlens"):
            out.extend(code_ids(v))
        elif callable(v) and not isinstance(v, torch.Tensor):
            out.append(id(getattr(v, "__code__", v)))
    return tuple(out)


def is_recompile_limit(e: BaseException) -> bool:
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


def expand_kv(call):
    """k and v with each kv head repeated to its query heads (GQA as plain multi-head: the same math)."""
    g = call.geo.H // call.Hkv
    return call.k.repeat_interleave(g, dim=1), call.v.repeat_interleave(g, dim=1)
