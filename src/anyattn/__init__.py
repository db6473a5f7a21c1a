"""anyattn: one attention call over every PyTorch attention backend.

    import anyattn as aa
    out = aa.attention(q, k, v, mask=aa.causal() & aa.sliding_window(1024), score=aa.softcap(50.0))
    print(aa.explain(q, k, v, mask=aa.documents([300, 700, 24]) & aa.causal()))
"""

from .api import AttentionOutput, BackendInfo, attention, attention_with_weights, backends, clear_caches, explain, use
from .backends import Backend
from .errors import AnyAttnError, ArgumentError, ArgumentTypeError, UnsupportedError
from .layout import SeqInfo, pad, unpad
from .resolve import Decision
from .spec.kv import ContiguousKVCache, KVStep, KVView, PagedKVCache
from .spec import (
    MaskTerm,
    ScoreTerm,
    alibi,
    bias,
    block_causal,
    causal,
    chunked,
    dense,
    documents,
    mask_fn,
    padding,
    prefix_lm,
    relative_bias,
    same_segment,
    score_fn,
    sink,
    sliding_window,
    softcap,
)

__version__ = "0.1.0"

__all__ = [
    "attention",
    "attention_with_weights",
    "explain",
    "use",
    "backends",
    "clear_caches",
    "AttentionOutput",
    "BackendInfo",
    "Backend",
    "Decision",
    "AnyAttnError",
    "ArgumentError",
    "ArgumentTypeError",
    "UnsupportedError",
    "SeqInfo",
    "ContiguousKVCache",
    "PagedKVCache",
    "KVStep",
    "KVView",
    "pad",
    "unpad",
    "MaskTerm",
    "ScoreTerm",
    "causal",
    "sliding_window",
    "documents",
    "padding",
    "prefix_lm",
    "block_causal",
    "same_segment",
    "chunked",
    "mask_fn",
    "dense",
    "softcap",
    "alibi",
    "bias",
    "relative_bias",
    "score_fn",
    "sink",
    "__version__",
]


def __getattr__(name: str):
    # ``anyattn.embed(...)``: the embedding job lives in the subpackage anyattn.embed (the `embed`
    # extra); importing it on first use keeps ``import anyattn`` light
    if name == "embed":
        import importlib

        return importlib.import_module(".embed", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
