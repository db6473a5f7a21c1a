"""HuggingFace transformers integration: ``attn_implementation="anyattn"``.

    import anyattn.hf
    anyattn.hf.register()
    model = AutoModelForCausalLM.from_pretrained(name, attn_implementation="anyattn")       # auto
    model = AutoModelForCausalLM.from_pretrained(name, attn_implementation="anyattn:flex")  # forced

``register()`` puts two functions into transformers' registries under every name it registers:

* a *mask function* (``AttentionMaskInterface``) that returns an :class:`HFMask` instead of a
  (B, 1, Sq, Sk) tensor. It reads what HF hands every mask builder (the 2-D padding mask, the
  query/key offsets, the ``mask_function`` closure) and turns the patterns it recognizes into
  anyattn terms: ``causal()``, ``sliding_window(W - 1)``, ``padding(...)``, ``documents(...)``
  (packed rows whose ``position_ids`` restart at 0). Anything else (image-token ``or`` masks,
  chunked attention, a static cache's unaligned offsets) is materialized exactly, through HF's own
  ``sdpa_mask``, and passed on as ``dense(...)``: slower, never wrong.
* an *attention function* (``AttentionInterface``) that calls :func:`anyattn.attention` with
  those terms plus what the model passes as keywords: ``scaling``, ``dropout``, ``softcap``,
  ``s_aux`` (attention sinks: the ``sink(...)`` score term), ``cu_seq_lens_q/k``, ``position_bias``,
  and ``anyattn_kv`` (an :class:`anyattn.KVStep`: the layer's keys go into that KV cache and the
  queries attend to it, for continuous batching on an HF model; see docs/serving.md).

Names. transformers reads meaning into substrings of the implementation name: "flash" means
FlashAttention (it tries to load a hub kernel), "sdpa" runs its own SDPA support check (Gemma2
fails it), "flex_attention" its flex checks. So anyattn's backends register under aliases that
contain none of them:

    anyattn               auto              anyattn:sdp       sdpa
    anyattn:eager         eager             anyattn:cudnn     cudnn
    anyattn:flex          flex              anyattn:fa_torch  flash_torch
    anyattn:fa            flash             anyattn:kernels_fa  kernels_flash

A forced name whose backend cannot compute a layer's variant raises
:class:`anyattn.UnsupportedError` (never a silent fallback).

Shape legend: B batch, S/Sq query length, Sk key length, Hq/Hkv heads, D head dim.
HF hands the attention function q (B, Hq, Sq, D), k/v (B, Hkv, Sk, D) and wants (B, Sq, Hq, D) back.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from typing import Any

import torch

from . import api as _api
from . import spec as _spec
from ._cache import LRU, tensor_key
from .errors import AnyAttnError, bad_type, bad_value
from .layout import SeqInfo

if importlib.util.find_spec("transformers") is None:  # pragma: no cover - exercised in a subprocess test
    raise ImportError("anyattn.hf needs HuggingFace transformers (>= 5.0): pip install 'anyattn[hf]'")

__all__ = ["register", "HF_NAMES", "hf_name", "HFMask"]

# HF name suffix -> anyattn backend. No name may contain "flash", "sdpa" or "flex_attention" (module docstring).
_ALIASES = {
    "eager": "eager",
    "sdp": "sdpa",
    "cudnn": "cudnn",
    "flex": "flex",
    "fa_torch": "flash_torch",
    "fa": "flash",
    "kernels_fa": "kernels_flash",
}
HF_NAMES: dict[str, str] = {"anyattn": "auto", **{f"anyattn:{a}": b for a, b in _ALIASES.items()}}


def hf_name(backend: str = "auto") -> str:
    """The ``attn_implementation`` string for an anyattn backend name ("flash_torch" -> "anyattn:fa_torch")."""
    for name, b in HF_NAMES.items():
        if b == backend:
            return name
    raise bad_value("backend", f"one of {sorted(set(HF_NAMES.values()))}", repr(backend))


def _transformers():
    try:
        import transformers
        from transformers import masking_utils
    except ImportError as e:  # pragma: no cover
        raise ImportError("anyattn.hf needs HuggingFace transformers (>= 5.0): pip install 'anyattn[hf]'") from e
    if not hasattr(transformers, "AttentionMaskInterface") or not hasattr(masking_utils, "sdpa_mask"):
        raise ImportError(
            f"anyattn.hf needs transformers >= 5.0 (AttentionMaskInterface), found {transformers.__version__}: "
            "pip install -U 'anyattn[hf]'"
        )
    return transformers, masking_utils


# --------------------------------------------------------------------------------------------
# The mask HF hands to every layer


@dataclass(frozen=True, eq=False)
class HFMask:
    """What the registered mask function returns in place of a 4-D mask tensor.

    ``term`` is the anyattn mask for a self-attention call of shape (q_length, kv_length), or
    None (everything visible). ``how`` says how it was derived: "structured" (recognized HF
    pattern, no S x S tensor) or "dense: <why>" (materialized through HF's ``sdpa_mask``).
    """

    term: Any
    q_length: int
    kv_length: int
    how: str
    documents: Any = field(default=None, repr=False)  # the SeqInfo of packed rows, when any
    plain: bool = False  # structured, no padding, no documents: position_ids may still pack

    @property
    def shape(self) -> tuple:  # a few HF code paths read mask.shape[-1] (the key length)
        return (None, None, self.q_length, self.kv_length)

    # generate() with a compileable cache (cache_implementation="static") builds the mask once per
    # step and passes it to the model as ``attention_mask``; transformers then asks ``.ndim``
    # (2 = a padding mask to prepare) and hands it back to the mask builder, which returns it
    ndim = 4

    def __repr__(self) -> str:
        return f"HFMask({self.term!r}, q_length={self.q_length}, kv_length={self.kv_length}, how={self.how!r})"

    # Models that call HF's mask builders and then use the result as a tensor (their own attention
    # code: Bloom, MPT, XGLM, RoFormer; a bias added onto the mask: Falcon with ALiBi, Doge) cannot
    # run on anyattn's mask, a description rather than a tensor: say so instead of failing deep
    # inside transformers. (Dunder lookups stay plain AttributeErrors: copy, pickle, hasattr.)
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        raise _used_as_tensor(f"reads mask.{name}")

    def _arith(self, *_):
        raise _used_as_tensor("does arithmetic on the mask")

    __add__ = __radd__ = __sub__ = __rsub__ = __mul__ = __rmul__ = __and__ = __rand__ = __or__ = __ror__ = _arith


class MaskUsedAsTensorError(AnyAttnError, AttributeError, TypeError):
    """A model used anyattn's HF mask as a tensor (see ``HFMask.__getattr__``)."""


def _used_as_tensor(what: str) -> MaskUsedAsTensorError:
    return MaskUsedAsTensorError(
        f"attn_implementation: expected a model whose attention layers pass the mask to the attention "
        f"function (anyattn's mask is a description, not a tensor); this model {what}: load it with "
        "attn_implementation='sdpa' or 'eager' (docs/hf.md, 'Models that cannot run on anyattn')"
    )


def _closure(fn) -> dict:
    code = getattr(fn, "__code__", None)
    cells = getattr(fn, "__closure__", None) or ()
    if code is None:
        return {}
    return {name: c.cell_contents for name, c in zip(code.co_freevars, cells)}


def _atoms(fn, mu) -> list | None:
    """Decompose an HF ``mask_function`` into atoms, or None if any part is not recognized.

    Atoms: ("window", left, right) in anyattn's convention, ("packed", ids (B, S)),
    ("remapped", atoms) for a function evaluated on per-document positions.
    Recognition is by identity (module-level functions) and by the qualified name of HF's
    closure factories in ``transformers.masking_utils``, reading their captured values.
    """
    if fn is mu.causal_mask_function:
        return [("window", None, 0)]
    if fn is mu.bidirectional_mask_function:
        return []
    if getattr(fn, "__module__", None) != mu.__name__:
        return None
    qual, cells = getattr(fn, "__qualname__", ""), _closure(fn)
    factory = qual.split(".<locals>.")[0]
    if factory == "and_masks" and "mask_functions" in cells:
        out = []
        for f in cells["mask_functions"]:
            a = _atoms(f, mu)
            if a is None:
                return None
            out += a
        return out
    if factory == "sliding_window_overlay" and isinstance(cells.get("sliding_window"), int):
        w = cells["sliding_window"]  # kv_idx > q_idx - w: the query and w - 1 keys before it
        return [("window", w - 1, None)] if w >= 1 else None
    if factory == "sliding_window_bidirectional_overlay" and isinstance(cells.get("sliding_window"), int):
        w = cells["sliding_window"]  # |q_idx - kv_idx| <= w
        return [("window", w, w)] if w >= 0 else None
    if factory == "packed_sequence_mask_function" and isinstance(cells.get("packed_sequence_mask"), torch.Tensor):
        return [("packed", cells["packed_sequence_mask"])]
    if factory == "remap_positions_for_packed_sequence" and "mask_function" in cells:
        inner = _atoms(cells["mask_function"], mu)
        return None if inner is None else [("remapped", inner)]
    return None


def _int(x) -> int | None:
    if isinstance(x, bool):
        return None
    if isinstance(x, int):
        return x
    return None  # tensors (StaticCache offsets) are not read to the host here: dense path


def _packed_info(ids: torch.Tensor) -> SeqInfo:
    """SeqInfo from HF's packed-sequence ids (B, S): equal ids = one document (reads to host once)."""
    rows = []
    for r in ids.tolist():
        lens, cur, n = [], None, 0
        for x in r:
            if x != cur and n:
                lens.append(n)
                n = 0
            cur = x
            n += 1
        lens.append(n)
        rows.append(lens)
    return SeqInfo.from_lengths(rows, total_length=ids.shape[1], device=ids.device)


def _structured(batch_size, q_length, kv_length, q_offset, kv_offset, mask_function, attention_mask, config, mu):
    """(term, documents SeqInfo, plain) when the mask is recognized and exactly expressible, else a reason (str)."""
    atoms = _atoms(mask_function, mu)
    if atoms is None:
        return f"mask_function {getattr(mask_function, '__qualname__', mask_function)!r} is not a recognized HF pattern"
    qo, ko = _int(q_offset), _int(kv_offset)
    if qo is None or ko is None:
        return "query/key offsets are tensors (static cache)"
    aligned = qo + q_length == ko + kv_length  # the last query sits at the last key: bottom-right
    packed = [a for a in atoms if a[0] == "packed"]
    flat = []
    for a in atoms:
        if a[0] == "remapped":
            if not packed:
                return "position-remapped mask without a packed-sequence mask"
            # Within one document the remapped positions are consecutive, so a translation-invariant
            # window on positions equals the same window on indices; across documents "packed" masks.
            if any(b[0] != "window" for b in a[1]):
                return "position-remapped mask with a non-window part"
            flat += a[1]
        else:
            flat.append(a)
    terms, plain = [], not packed
    for a in flat:
        if a[0] == "window":
            if not aligned:
                return f"window with unaligned offsets (q_offset={qo}, kv_offset={ko}, q_length={q_length}, kv_length={kv_length})"
            terms.append(_spec.sliding_window(a[1], a[2]))
    info = None
    if packed:
        if len(packed) > 1 or qo != 0 or ko != 0 or q_length != kv_length:
            return "packed sequences with a cache or offsets"
        info = _packed_info(packed[0][1])
        terms.append(_spec.documents(info))
    if attention_mask is not None:
        if not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 2:
            return f"attention_mask of shape {tuple(getattr(attention_mask, 'shape', ()))}"
        keep = attention_mask.to(torch.bool)
        if keep.shape[1] < ko + kv_length:  # HF pads short masks with "not visible" (prepare_padding_mask)
            keep = torch.nn.functional.pad(keep, (0, ko + kv_length - keep.shape[1]), value=False)
        keep = keep[:, ko : ko + kv_length]
        if not bool(keep.all()):  # one host read per mask (once per forward, shared by every layer)
            if packed:
                return "packed sequences with a padding mask"
            plain = False
            # anyattn's padding() also empties padding *query* rows (their output is 0). That is
            # invisible in self-attention, where those rows are padding tokens whose outputs nothing
            # reads; it would be wrong for cross-attention, so models with cross-attention keep HF's
            # keys-only meaning through a broadcast (B, 1, 1, Sk) mask.
            cross = bool(getattr(config, "is_encoder_decoder", False) or getattr(config, "add_cross_attention", False))
            if aligned and not cross and q_length < kv_length and bool(keep[:, kv_length - q_length :].all()):
                # a decode (or chunked-prefill) step on a cache: the new tokens are real, the cached
                # keys keep their padding: the key layout of a KV cache (anyattn.spec.kv), which every
                # backend serves (flash_torch packs each row's real keys: cu_seqlens_q != _k)
                terms.append(_spec.padding(kv=SeqInfo.from_padding_mask(keep)))
            elif aligned and not cross:
                terms.append(_spec.padding(SeqInfo.from_padding_mask(keep)))
            else:
                terms.append(_spec.dense(keep[:, None, None, :]))
    term = None
    for t in terms:
        term = t if term is None else term & t
    return _spec.canonical_mask(term), info, plain


def _mask_interface(batch_size=None, q_length=None, kv_length=None, q_offset=0, kv_offset=0, mask_function=None,
                    attention_mask=None, **kwargs):  # fmt: skip
    """Registered in ``AttentionMaskInterface``: returns an :class:`HFMask` (see the module docstring)."""
    _, mu = _transformers()
    if mask_function is None:
        mask_function = mu.causal_mask_function
    if q_length is None and isinstance(kwargs.get("cache_position"), torch.Tensor):  # older mask-builder signature
        cp = kwargs["cache_position"]
        q_length, q_offset = cp.shape[0], cp[0]
    if q_length is None or kv_length is None:
        raise bad_value("mask builder arguments", "q_length and kv_length from transformers", f"{sorted(kwargs)}")
    if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 4:  # a prepared 4-D mask
        return attention_mask
    if isinstance(attention_mask, HFMask):  # built by generate() for this step (see HFMask.ndim)
        if (attention_mask.q_length, attention_mask.kv_length) != (int(q_length), int(kv_length)):
            raise bad_value(
                "attention_mask", f"a mask for {q_length} queries and {kv_length} keys",
                f"an anyattn mask for {attention_mask.q_length} and {attention_mask.kv_length}",
            )  # fmt: skip
        return attention_mask
    got = _structured(batch_size, q_length, kv_length, q_offset, kv_offset, mask_function, attention_mask,
                      kwargs.get("config"), mu)  # fmt: skip
    if not isinstance(got, str):
        term, info, plain = got
        return HFMask(term, int(q_length), int(kv_length), "structured", info, plain)
    dense = mu.sdpa_mask(
        batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset, kv_offset=kv_offset,
        mask_function=mask_function, attention_mask=attention_mask,
        **{**kwargs, "allow_is_causal_skip": False, "allow_is_bidirectional_skip": False},
    )  # fmt: skip
    if dense is None:  # pragma: no cover - sdpa_mask returns a tensor with both skips off
        raise RuntimeError("transformers' sdpa_mask returned None with allow_*_skip=False")
    return HFMask(_spec.dense(dense), int(q_length), int(kv_length), f"dense: {got}")


# --------------------------------------------------------------------------------------------
# The attention function


# The same position_ids / cu_seq_lens tensors reach every layer of a forward: their SeqInfo is
# read once. Keyed like anyattn's own caches (anyattn._cache.tensor_key: an identity token that is
# never reused, plus the version counter), bounded, and dropped when the tensor is freed.
_CU_CHECKED = LRU(64)  # (key of cu_q, key of cu_k) -> SeqInfo: documents from cu_seq_lens
_POS_CHECKED = LRU(64)  # key of position_ids -> SeqInfo | None


def _docs_from_position_ids(pos, B: int, S: int):
    """Packed documents from ``position_ids`` that restart at 0, or None when they do not restart.

    The same tensor reaches every layer, so the host read happens once per forward."""
    if not isinstance(pos, torch.Tensor) or pos.dim() != 2 or pos.shape[1] != S or pos.shape[0] not in (1, B):
        return None
    toks: list = []
    key = None if torch.compiler.is_compiling() else (tensor_key(pos, toks), B)  # no cache inside a trace
    hit = None if key is None else _POS_CHECKED.get(key)
    if hit is not None:
        return hit[0]
    restarts = S > 1 and bool((pos[:, 1:] != pos[:, :-1] + 1).any())
    info = None
    if restarts:
        info = SeqInfo.from_position_ids(pos.expand(B, S))  # raises if the ids are not 0,1,..,0,1,.. rows
    if key is not None:
        _POS_CHECKED.put(key, (info,), toks)
    return info


def _docs_from_cu(cu_q, cu_k, Sq: int, Sk: int, B: int):
    if not isinstance(cu_q, torch.Tensor) or (cu_k is not None and not isinstance(cu_k, torch.Tensor)):
        raise bad_type("cu_seq_lens_q/k", "1-D integer tensors", f"{type(cu_q).__name__}/{type(cu_k).__name__}")
    if B != 1 or Sq != Sk:
        raise bad_value("cu_seq_lens_q", "packed self-attention with one batch row and Sq == Sk", f"B={B}, Sq={Sq}, Sk={Sk}")
    toks: list = []
    key = None if torch.compiler.is_compiling() else (tensor_key(cu_q, toks), None if cu_k is None else tensor_key(cu_k, toks), Sq)
    hit = None if key is None else _CU_CHECKED.get(key)
    if hit is not None:
        return hit
    if cu_k is not None and cu_k is not cu_q and not torch.equal(cu_q.to(cu_k.device), cu_k):
        raise bad_value("cu_seq_lens_k", "the same boundaries as cu_seq_lens_q (self-attention)", "different boundaries")
    info = SeqInfo.from_cu_seqlens(cu_q.to(torch.int32), total_length=Sq)
    if key is not None:
        _CU_CHECKED.put(key, info, toks)
    return info


def _mask_term(module, query, key, attention_mask, kwargs):
    B, _, Sq, _ = query.shape
    Sk = key.shape[2]
    docs_in_mask = None
    if isinstance(attention_mask, HFMask):
        if (attention_mask.q_length, attention_mask.kv_length) != (Sq, Sk):
            raise bad_value(
                "attention_mask", f"a mask built for q_length={Sq}, kv_length={Sk}",
                f"one for q_length={attention_mask.q_length}, kv_length={attention_mask.kv_length}",
            )  # fmt: skip
        term, docs_in_mask = attention_mask.term, attention_mask.documents
    elif attention_mask is None:
        # No mask at all: HF's eager and sdpa apply only `is_causal` (not `sliding_window`).
        is_causal = kwargs.get("is_causal")
        is_causal = getattr(module, "is_causal", True) if is_causal is None else is_causal
        term = _spec.causal() if is_causal else None
    elif isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 4:
        m = attention_mask[:, :, :, :Sk]
        # A prepared 4-D mask (custom, or from a model that builds its own): used as given.
        term = None
        if m.dtype == torch.bool:
            return _spec.dense(m), None
        if m.dtype.is_floating_point:
            return None, _spec.bias(m)
        raise bad_type("attention_mask", "a bool or floating-point 4-D mask", f"dtype {m.dtype}")
    elif isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2:
        # A raw (B, Sk) keep-mask, as flash-style mask builders pass it.
        keep = attention_mask[:, -Sk:].to(torch.bool)
        is_causal = kwargs.get("is_causal")
        is_causal = getattr(module, "is_causal", True) if is_causal is None else is_causal
        term = _spec.padding(mask=keep)
        if is_causal:
            term = _spec.causal() & term
    else:
        raise bad_type(
            "attention_mask", "an anyattn.hf.HFMask, None, or a 2-D/4-D tensor (register() installs the mask builder)",
            type(attention_mask).__name__,
        )  # fmt: skip
    if docs_in_mask is None and isinstance(attention_mask, HFMask) and attention_mask.plain and Sq == Sk:
        # transformers detects packing in the mask builder only without a cache object; a forward
        # with use_cache=True (the default) gets a plain causal mask. FlashAttention's rule applies
        # then, as in HF's flash path: position_ids that restart mean separate documents.
        docs_in_mask = _docs_from_position_ids(kwargs.get("position_ids"), B, Sq)
        if docs_in_mask is not None:
            d = _spec.documents(docs_in_mask)
            term = d if term is None else term & d
    cu_q = kwargs.get("cu_seq_lens_q")
    if cu_q is not None:
        info = _docs_from_cu(cu_q, kwargs.get("cu_seq_lens_k"), Sq, Sk, B)
        if docs_in_mask is not None:
            if info.host_lengths != docs_in_mask.host_lengths:
                raise bad_value(
                    "cu_seq_lens_q", f"the documents position_ids describe {list(docs_in_mask.host_lengths[0])}",
                    f"{list(info.host_lengths[0])}",
                )  # fmt: skip
        else:
            d = _spec.documents(info)
            term = d if term is None else term & d
    return _spec.canonical_mask(term), None


def _window_of(attention_mask, module, kwargs):
    """The window of a layer whose keys come from an anyattn KV cache: from HF's mask for this
    layer type (full or sliding), else from the ``sliding_window`` keyword; causal otherwise."""
    term = attention_mask.term if isinstance(attention_mask, HFMask) else None
    parts = term.terms if isinstance(term, _spec.And) else (term,)
    for t in parts:
        if isinstance(t, _spec.Window):
            return t
    w = kwargs.get("sliding_window")
    return _spec.sliding_window(int(w) - 1) if isinstance(w, int) and w > 0 else _spec.causal()


def _cache_forward(module, query, key, value, attention_mask, step, score, scaling, backend, kwargs):
    """``model(..., anyattn_kv=step)``: this layer's new keys/values go into the step's KV cache
    and the queries attend to the cache (one call per layer; examples/continuous_batching.py)."""
    layer = getattr(module, "layer_idx", None)
    if not isinstance(layer, int):
        raise bad_value("anyattn_kv", "attention modules with an integer layer_idx (decoder LMs)", f"{type(module).__name__}")
    window = _window_of(attention_mask, module, kwargs)
    W = step.cache.window
    if W is not None and (window.left is None or window.left > W - 1):
        # the cache has evicted keys this layer sees: narrowing the layer to the cache's window
        # would change the model (Gemma2's global layers), so it is refused
        sees = "every earlier key" if window.left is None else f"{window.left + 1} keys"
        raise bad_value(
            "anyattn_kv", f"a cache that keeps the keys layer {layer} attends to (it sees {sees}; this cache keeps "
            f"{W}: window={W}). Models with full-attention layers need a cache without a window",
            f"{type(step.cache).__name__}(window={W})",
        )  # fmt: skip
    view = step.write(layer, key, value)
    out = _api.attention(query, kv=view, mask=window, score=score or None, scale=scaling, backend=backend)
    return out.transpose(1, 2), None


def _make_forward(backend: str):
    def anyattn_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        score = []
        step = kwargs.get("anyattn_kv")
        if step is not None:
            mask, bias4 = None, None
        else:
            mask, bias4 = _mask_term(module, query, key, attention_mask, kwargs)
        softcap = kwargs.get("softcap")
        if softcap is not None and softcap != 0:  # HF uses 0 / None for "no soft-capping"
            score.append(_spec.softcap(float(softcap)))
        if bias4 is not None:
            score.append(bias4)
        position_bias = kwargs.get("position_bias")
        if position_bias is not None:
            score.append(_spec.bias(position_bias))
        sinks = kwargs.get("s_aux")
        if sinks is not None:
            # Learned sinks (GPT-OSS): one extra logit per head in the softmax denominator, no value.
            # The sink term serves them on every backend that can (eager and flex natively, the
            # varlen backends through their lse); the others refuse with the reason.
            if not isinstance(sinks, torch.Tensor) or sinks.dim() != 1 or sinks.shape[0] != query.shape[1]:
                raise bad_value("s_aux", f"a (Hq,) = ({query.shape[1]},) tensor", f"{getattr(sinks, 'shape', type(sinks))}")
            score.append(_spec.sink(sinks))
        if isinstance(scaling, torch.Tensor):
            scaling = float(scaling)
        if step is not None:
            return _cache_forward(module, query, key, value, attention_mask, step, score, scaling, backend, kwargs)
        if kwargs.get("output_attentions"):
            out, weights = _api.attention_with_weights(
                query, key, value, mask=mask, score=score or None, scale=scaling, dropout_p=float(dropout)
            )
            return out.transpose(1, 2), weights.to(query.dtype)
        out = _api.attention(query, key, value, mask=mask, score=score or None, scale=scaling, backend=backend,
                             dropout_p=float(dropout))  # fmt: skip
        return out.transpose(1, 2), None

    anyattn_attention_forward.__name__ = f"anyattn_{backend}_attention_forward"
    anyattn_attention_forward.__qualname__ = anyattn_attention_forward.__name__
    return anyattn_attention_forward


def register(names=None) -> list[str]:
    """Register anyattn with transformers (``AttentionInterface`` and ``AttentionMaskInterface``).

    Args:
        names: the ``attn_implementation`` names to register; default every name in
            :data:`HF_NAMES` ("anyattn" = auto, "anyattn:flex", "anyattn:fa_torch", ...).

    Returns the registered names. Safe to call more than once.
    """
    transformers, _ = _transformers()
    if names is None:
        names = list(HF_NAMES)
    elif isinstance(names, str):
        names = [names]
    out = []
    for n in names:
        if n not in HF_NAMES:
            hint = ""
            if isinstance(n, str) and ("flash" in n or "sdpa" in n):
                hint = " (transformers reads 'flash' and 'sdpa' inside names as its own implementations: use the aliases)"
            raise bad_value("names", f"names from {sorted(HF_NAMES)}{hint}", repr(n))
        transformers.AttentionInterface.register(n, _make_forward(HF_NAMES[n]))
        transformers.AttentionMaskInterface.register(n, _mask_interface)
        out.append(n)
    return out
