"""The public call: ``attention``, ``explain``, ``use``, ``backends``.

Layout (one, everywhere): q (B, Hq, Sq, D), k (B, Hkv, Sk, D), v (B, Hkv, Sk, Dv), any strides;
output (B, Hq, Sq, Dv). A model holding (B, S, H, D) memory passes ``x.transpose(1, 2)`` views.
GQA/MQA whenever Hq is a multiple of Hkv: query head h reads kv head ``h // (Hq // Hkv)``.

Data flow of one call::

    normalize (canonical terms) -> decision key (term *structure*, shapes, strides, options)
      -> decision (cached per key; validation of shapes and options happens on a miss)
      -> content key (term *values*) -> value checks (cached per content)
      -> backend.run: lowered form (cached per content by the backend) -> kernel

A new packing, a freshly allocated mask tensor or new prefix lengths change the content key only:
the decision is reused, and only what depends on the values is built (see ``call.py``).
"""

from __future__ import annotations

import contextlib
import contextvars
import itertools
import math
import numbers
from dataclasses import dataclass
from typing import NamedTuple

import torch

from ._cache import LRU, obj_key
from .backends import REGISTRY, Refusal
from .call import Call, Signature
from .errors import UnsupportedError, bad_type, bad_value
from .resolve import Decision, availability, check_backend, resolve
from .spec import And, Window, canonical_mask, canonical_scores
from .spec.kv import KVView

__all__ = ["attention", "explain", "use", "backends", "AttentionOutput", "BackendInfo", "clear_caches"]

_DEFAULT = contextvars.ContextVar("anyattn_backend", default=("auto",))
# What torch.compile reads instead: dynamo cannot trace ContextVar.get. A plain list it guards on,
# so a graph traced inside ``use(...)`` is traced again outside it. Process-wide: a graph traced
# while another thread is inside ``use`` sees that thread's default.
_TRACED_DEFAULT: list = [("auto",)]
_DECISIONS = LRU(1024)  # (decision key, requested, deterministic) -> (backend, Decision, Signature)
_SEEN = LRU(4096)  # content keys of auto calls seen before (see FIRST_SIGHT in ranking.py)
_VALIDATED = LRU(4096)  # content key -> True: the term values of this content were checked
_OBSERVERS: list = []  # anyattn.testing.record_calls: callables (call, backend name)
_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class AttentionOutput(NamedTuple):
    """``attention(..., return_lse=True)``: out (B, Hq, Sq, Dv) and lse (B, Hq, Sq) float32
    (float64 for float64 inputs), natural log, ``-inf`` on rows with no visible key."""

    out: torch.Tensor
    lse: torch.Tensor


@dataclass(frozen=True)
class BackendInfo:
    name: str
    available: bool
    reason: str  # why not, when unavailable

    def __str__(self) -> str:
        return f"{self.name:<14} {'available' if self.available else 'unavailable: ' + self.reason}"


def backends() -> list[BackendInfo]:
    """Every registered backend and whether it can run on this machine (and if not, why)."""
    out = []
    for name in REGISTRY:
        why = availability(name)
        out.append(BackendInfo(name, why is None, why or ""))
    return out


@contextlib.contextmanager
def use(backend):
    """Default backend (or preference list) for ``attention`` calls in this block.

    An explicit ``backend=`` argument other than "auto" still wins inside the block.
    """
    names = check_backend(backend)
    token = _DEFAULT.set(names)
    _TRACED_DEFAULT[0] = names
    try:
        yield
    finally:
        _DEFAULT.reset(token)
        # the default this thread returns to (not the value seen on entry: blocks of two threads
        # that overlap would otherwise leave the first block's default for compiled calls)
        _TRACED_DEFAULT[0] = _DEFAULT.get()


def clear_caches() -> None:
    """Drop cached decisions and every backend's lowered forms (BlockMasks, materialized masks,
    varlen metadata)."""
    _DECISIONS.clear()
    _VALIDATED.clear()
    _SEEN.clear()
    _INTERNED.clear()
    for impl in REGISTRY.values():
        impl.clear()


# --------------------------------------------------------------------------------------------
# validation (on a decision-cache miss: a key seen before was validated then)


def _check_qkv(q, k, v, same_device: bool = True) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise bad_type(name, "a torch.Tensor", type(t).__name__)
        if t.dim() != 4:
            want = {"q": "(B, Hq, Sq, D)", "k": "(B, Hkv, Sk, D)", "v": "(B, Hkv, Sk, Dv)"}[name]
            raise bad_value(name, f"4 dims {want}", f"shape {tuple(t.shape)}")
        if t.dtype not in _FLOATS:
            raise bad_type(name, "float16, bfloat16, float32 or float64", f"dtype {t.dtype}")
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise bad_type(name, f"the same dtype as q ({q.dtype})", f"dtype {t.dtype}")
        if same_device and t.device != q.device:
            raise bad_value(name, f"the same device as q ({q.device})", f"device {t.device}")
    B, Hq, Sq, D = q.shape
    if k.shape[0] != B or v.shape[0] != B:
        raise bad_value("k/v", f"batch size B={B} like q", f"k batch {k.shape[0]}, v batch {v.shape[0]}")
    if v.shape[1] != k.shape[1]:
        raise bad_value("v", f"Hkv={k.shape[1]} heads like k", f"{v.shape[1]} heads")
    if v.shape[2] != k.shape[2]:
        raise bad_value("v", f"Sk={k.shape[2]} positions like k", f"{v.shape[2]} positions")
    if k.shape[3] != D:
        raise bad_value("k", f"head dim D={D} like q", f"head dim {k.shape[3]}")
    if D == 0 or v.shape[3] == 0:
        raise bad_value("q/v", "head dims D >= 1 and Dv >= 1", f"D={D}, Dv={v.shape[3]}")
    Hkv = k.shape[1]
    if Hkv == 0 or Hq % Hkv != 0:
        raise bad_value("k", f"a number of heads that divides Hq={Hq} (GQA/MQA)", f"Hkv={Hkv}")


def _check_options(scale, dropout_p, return_lse) -> float | None:
    if scale is not None:
        if isinstance(scale, torch.Tensor) and scale.numel() == 1 and scale.device.type == "cpu" and not scale.requires_grad:
            scale = scale.item()
        if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not math.isfinite(scale):
            raise bad_value("scale", "a finite float or None (= 1/sqrt(D))", repr(scale))
        scale = float(scale)
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, numbers.Real) or not 0.0 <= dropout_p < 1.0:
        raise bad_value("dropout_p", "a float in [0, 1)", repr(dropout_p))
    if not isinstance(return_lse, bool):
        raise bad_type("return_lse", "a bool", type(return_lse).__name__)
    return scale


def _plain_options(scale, dropout_p, return_lse):
    """The options as the decision key holds them: a float scale (a tensor's value read on every
    call: one edited in place is never served the old one), a float dropout_p, a bool return_lse.
    Checked on every call that passes another type (``True == 1.0`` must not hit a cached
    decision of ``scale=1.0``); plain floats and bools pass untouched."""
    if scale is not None and type(scale) is not float:
        scale = _check_options(scale, 0.0, False)
    if type(dropout_p) is not float:
        _check_options(None, dropout_p, False)
        dropout_p = float(dropout_p)
    if type(return_lse) is not bool:
        _check_options(None, 0.0, return_lse)
    return scale, dropout_p


def _check_values(call: Call) -> None:
    """Checks of term values against the call (lengths within the sequence, shapes of term
    tensors, user functions' results); once per content key."""
    if not call.cacheable:
        _check_terms(call)
        return
    if _VALIDATED.get(call.key) is None:
        _check_terms(call)
        _VALIDATED.put(call.key, True, call.tokens)


def _check_terms(call: Call) -> None:
    if torch.compiler.is_compiling():
        return
    geo = call.geo
    if call.mask is not None:
        call.mask.check(geo)
    for s in call.scores:
        s.check(geo)


# --------------------------------------------------------------------------------------------
# building a call


def _requested(backend) -> tuple:
    if backend == "auto":
        return _TRACED_DEFAULT[0] if torch.compiler.is_compiling() else _DEFAULT.get()
    return check_backend(backend)  # remembers hashable arguments


_INTERNED = LRU(4096)  # decision key -> a number never reused (itertools.count): hashed once per call
_KEY_IDS = itertools.count()


def _prepare(q, k, v, mask, score, scale, dropout_p, return_lse, need_weights, backend, full=None, kv=None):
    """(call, backend, decision, requested) for the arguments; ``full`` (explain) re-resolves
    uncached. The hot path (a decision seen before): one hash of the decision key, interned to a
    number that the decision, value-check and lowering caches are keyed by. ``kv``: a paged KV
    view (k/v are then meta placeholders of the logical keys, see ``_attention_kv``)."""
    compiling = torch.compiler.is_compiling()
    if not compiling and not (type(q) is torch.Tensor and type(k) is torch.Tensor and type(v) is torch.Tensor):
        if not (isinstance(q, torch.Tensor) and isinstance(k, torch.Tensor) and isinstance(v, torch.Tensor)):
            _check_qkv(q, k, v)  # raises the precise error
    if not compiling and (type(dropout_p) is not float or type(return_lse) is not bool
                          or (scale is not None and type(scale) is not float)):  # fmt: skip
        scale, dropout_p = _plain_options(scale, dropout_p, return_lse)
    cmask = canonical_mask(mask)
    scores = canonical_scores(score) if score is not None else ()
    grad_on = torch.is_grad_enabled()
    grad = grad_on and (q.requires_grad or k.requires_grad or v.requires_grad)
    term_grad = False
    valued = False  # some term has values beyond its structure (tensors, lengths, functions)
    if not compiling:
        for t in (cmask, *scores) if scores else (cmask,):
            if t is None:
                continue
            if not t.valueless:
                valued = True
            for x in t.tensors():
                if x.requires_grad:
                    term_grad = True
        grad = grad or (term_grad and grad_on)
    if backend == "auto":
        requested = _TRACED_DEFAULT[0] if compiling else _DEFAULT.get()
    else:
        requested = check_backend(backend)
    strides = (q.stride(), k.stride(), v.stride())
    dkey = (
        None if cmask is None else cmask.structure, tuple([x.structure for x in scores]) if scores else (),
        q.shape, k.shape, v.shape, strides, q.dtype, k.dtype, v.dtype, q.device, k.device, v.device, grad, scale,
        dropout_p, return_lse, need_weights, None if kv is None else kv.structure(),
    )  # fmt: skip
    if compiling:
        dk = dkey
    else:
        dk = _INTERNED._d.get(dkey)  # the bare dict: this lookup is on every call
        if dk is None:
            dk = next(_KEY_IDS)
            _INTERNED.put(dkey, dk)
    if not valued:  # the structure is the content: lowered forms are keyed by the decision key
        key, tokens = ("dk", dk), ()
    else:
        toks: list = []
        key = (dk, cmask.content_key(toks) if cmask is not None else None, tuple(s.content_key(toks) for s in scores))
        if kv is not None:  # the page table of this step (a native backend's lowering depends on it)
            key = key + (obj_key(kv.step, toks),)
        tokens = tuple(toks)
    # First sight of a content (auto only): a backend whose lowering is built per content (flex's
    # BlockMask) loses to one whose lowering is cheap when the content is used once (a new packing
    # every call), and wins when it is reused (a model's layers): ranking.FIRST_SIGHT decides.
    first = valued and not compiling and requested == ("auto",) and _SEEN._d.get(key) is None
    if first and full is None:  # explain() only looks: the call it describes is still a first sight
        _SEEN.put(key, True, tokens)
    # torch.use_deterministic_algorithms changes what a backend may run (cuDNN refuses), so a
    # decision taken in the other mode must not be reused.
    ck = (dk, requested, torch.are_deterministic_algorithms_enabled(), first)
    hit = None if (compiling or full is not None) else _DECISIONS.get(ck)
    if hit is not None:
        impl, decision, sig = hit
    else:
        if not compiling:
            _check_qkv(q, k, v, same_device=kv is None)
            scale = _check_options(scale, dropout_p, return_lse)
        if scale is None:
            scale = 1.0 / math.sqrt(q.shape[-1])
        sig = Signature.build(
            (tuple(q.shape), tuple(k.shape), tuple(v.shape)), q.dtype, q.device, cmask, scores, float(scale),
            float(dropout_p), return_lse, grad, need_weights, strides, dkey, None if kv is None else kv.structure(),
        )  # fmt: skip
    call = Call(sig, q, k, v, cmask, scores, key, tokens, not (term_grad or compiling), {}, kv)
    if valued or hit is None:  # term values against this call: once per content, before any decision
        _check_values(call)
    if hit is None:
        if need_weights and full is None:  # attention_with_weights: always eager
            impl, decision = REGISTRY["eager"], None
        else:
            impl, decision = resolve(
                sig, requested, full=bool(full), describe=None if compiling else call.describe(), first_sight=first
            )
        if not compiling and full is None:
            _DECISIONS.put(ck, (impl, decision, sig))
    return call, impl, decision, requested


def _run(call: Call, impl, requested):
    """Run, moving on when a backend refuses the call's values (auto and preference lists)."""
    refused: list = []
    while True:
        if _OBSERVERS:
            for fn in _OBSERVERS:
                fn(call, impl.name)
        try:
            return impl.run(call)
        except Refusal as e:
            refused.append((impl.name, str(e)))
            try:  # the next backend of auto's ranking or of the preference list; never another one
                impl, _ = resolve(call.sig, requested, exclude=tuple(refused), describe=call.describe())
            except UnsupportedError as u:
                raise UnsupportedError(str(u), u.decision) from None


def _empty_result(call: Call):
    """Sq == 0 or Sk == 0: every row sees no key -> zeros (lse -inf), gradients 0."""
    B, Hq, Sq, _ = call.q.shape
    out = call.q.new_zeros(B, Hq, Sq, call.Dv)
    if call.requires_grad:  # keep the graph so that .backward() gives zero gradients
        out = out + 0.0 * (call.q.sum() + call.k.sum() + call.v.sum())
    lse_dtype = torch.float64 if call.q.dtype == torch.float64 else torch.float32
    lse = torch.full((B, Hq, Sq), float("-inf"), device=call.device, dtype=lse_dtype)
    sink = call.sink
    if sink is not None:  # the sink's term is the whole denominator: lse = its logit, output still 0
        lse = sink.logits.to(device=call.device, dtype=lse_dtype).view(1, -1, 1).expand(B, Hq, Sq)
    return out, lse


def _result(call: Call, impl, requested, return_lse: bool):
    """Run a prepared call (zeros when it has no queries or no keys): out, or (out, lse)."""
    if call.sig.Sq == 0 or call.sig.Sk == 0:
        out, lse = _empty_result(call)
    else:
        out, lse = _run(call, impl, requested)
    return AttentionOutput(out, lse) if return_lse else out


def attention(
    q: torch.Tensor,
    k: torch.Tensor | None = None,
    v: torch.Tensor | None = None,
    *,
    kv=None,
    mask=None,
    score=None,
    scale: float | None = None,
    backend="auto",
    dropout_p: float = 0.0,
    return_lse: bool = False,
):
    """Attention ``softmax(score_terms(scale * q k^T) masked) @ v`` on the backend that computes
    it exactly and fastest.

    Args:
        q: (B, Hq, Sq, D). k: (B, Hkv, Sk, D). v: (B, Hkv, Sk, Dv). Any strides; Hq % Hkv == 0.
        kv: instead of k and v, a KV cache view (``step.write(layer, k_new, v_new)`` of a
            :class:`ContiguousKVCache` or :class:`PagedKVCache`): the keys are the cache's, each
            sequence's queries sit bottom-right among its cached keys (docs/serving.md).
        mask: a mask term (``causal()``, ``documents(...)``, ... combined with ``& | ~``) or None.
        score: a score term or a sequence of them, applied in order before the mask.
        scale: logit scale, default ``1/sqrt(D)``. Models that pre-scale q pass 1.0.
        backend: "auto", a backend name, or a sequence of names tried in order. A named backend
            that cannot serve the call raises :class:`UnsupportedError`; it is never replaced.
        dropout_p: attention-weight dropout probability (applied whenever > 0).
        return_lse: also return the log-sum-exp (B, Hq, Sq), float32 (float64 for float64 inputs), natural log.

    Returns:
        out (B, Hq, Sq, Dv), or ``AttentionOutput(out, lse)`` when ``return_lse=True``.
        Rows with no visible key are exactly 0 (lse -inf), forward and backward.
    """
    if kv is not None:
        return _attention_kv(q, k, v, kv, mask, score, scale, backend, dropout_p, return_lse)
    if k is None or v is None:
        raise bad_value("k/v", "key and value tensors (or kv=, a KV cache view)", "None")
    call, impl, _, requested = _prepare(q, k, v, mask, score, scale, dropout_p, return_lse, False, backend)
    return _result(call, impl, requested, return_lse)


# --------------------------------------------------------------------------------------------
# calls on a KV cache


def _kv_mask(view, mask):
    """The cache's key layout AND the caller's mask; a windowed cache needs a window at least as
    narrow as what it keeps (an evicted key would otherwise be silently missing). Memoized per
    step and mask object (every layer of a step passes the same ``causal()``): one ``&`` per step."""
    memo = view.step._memo
    try:
        hit = memo.get(("mask", mask))  # keyed by the mask object itself (kept alive by the memo)
    except TypeError:  # not a term (unhashable): the uncached path names the argument
        return _kv_mask_uncached(view, mask)
    if hit is None:
        hit = memo[("mask", mask)] = _kv_mask_uncached(view, mask)
    return hit


def _kv_mask_uncached(view, mask):
    m = canonical_mask(mask)
    if view.window is not None:
        parts = m.terms if isinstance(m, And) else (m,)
        w = next((t for t in parts if isinstance(t, Window)), None)
        if w is None or w.left is None or w.left > view.window - 1:
            raise bad_value(
                "mask", f"a window of at most sliding_window({view.window - 1}) (the cache was built with window={view.window} "
                f"and keeps only the last {view.window - 1} keys before each query)", repr(m),
            )  # fmt: skip
    term = view.term()
    return term if m is None else term & m


def _check_kv_query(q, view, dropout_p) -> None:
    if not isinstance(view, KVView):
        raise bad_type("kv", "a KV cache view (step.write(layer, k_new, v_new) or step.view(layer))", type(view).__name__)
    if not isinstance(q, torch.Tensor) or q.dim() != 4:
        raise bad_value("q", "a (rows, Hq, Sq, D) tensor", getattr(q, "shape", type(q).__name__))
    c, (rows, Sq) = view.cache, view.step.q_shape
    if (q.shape[0], q.shape[2]) != (rows, Sq):
        raise bad_value("q", f"(rows, Sq) = {(rows, Sq)}, the step's query layout ({view.step.layout})", f"shape {tuple(q.shape)}")
    if q.shape[3] != c.head_dim or q.shape[1] % c.kv_heads:
        raise bad_value("q", f"head dim {c.head_dim} and a multiple of the cache's {c.kv_heads} kv heads", f"shape {tuple(q.shape)}")
    if q.dtype != c.dtype or q.device != c.device:
        raise bad_value("q", f"the cache's dtype {c.dtype} and device {c.device}", f"{q.dtype} on {q.device}")
    if torch.is_grad_enabled() and q.requires_grad:
        raise bad_value("q", "no autograd through a KV cache call (caches are inference-only)", "q.requires_grad=True")
    if dropout_p:
        raise bad_value("dropout_p", "0 with a KV cache (inference)", dropout_p)


def _attention_kv(q, k, v, view, mask, score, scale, backend, dropout_p, return_lse):
    if k is not None or v is not None:
        raise bad_value("k/v", "None when kv= is given (the keys come from the cache)", "tensors")
    _check_kv_query(q, view, dropout_p)
    full = _kv_mask(view, mask)
    if not view.paged:  # views of the cache's rows: an ordinary call whose key length is bucketed
        k, v = view.logical()
        call, impl, _, requested = _prepare(q, k, v, full, score, scale, dropout_p, return_lse, False, backend)
        return _result(call._replace(bucketed=True), impl, requested, return_lse)
    (ks, vs), (kst, vst) = view.logical_shapes(), view.logical_strides()
    km = torch.empty_strided(ks, kst, dtype=q.dtype, device="meta")
    vm = torch.empty_strided(vs, vst, dtype=q.dtype, device="meta")
    call, impl, _, requested = _prepare(q, km, vm, full, score, scale, dropout_p, return_lse, False, backend, kv=view)
    if call.sig.Sq == 0:  # a step without new tokens
        out, lse = _empty_result(call)
        return AttentionOutput(out, lse) if return_lse else out
    gathered = None
    refused: list = []
    while True:
        native = impl.reads_pages(call.sig)
        if not native and gathered is None:  # pages -> contiguous keys, once, for backends without a page table
            lk, lv = view.logical()
            gathered = call._replace(k=lk, v=lv, kv=None)
        this = call if native else gathered
        if _OBSERVERS:
            for fn in _OBSERVERS:
                fn(this, impl.name)
        try:
            out, lse = impl.run(this)
            break
        except Refusal as e:
            refused.append((impl.name, str(e)))
            try:
                impl, _ = resolve(call.sig, requested, exclude=tuple(refused), describe=call.describe())
            except UnsupportedError as u:
                raise UnsupportedError(str(u), u.decision) from None
    return AttentionOutput(out, lse) if return_lse else out


def attention_with_weights(q, k, v, *, mask=None, score=None, scale=None, dropout_p=0.0):
    """Eager attention that also returns the weights (B, Hq, Sq, Sk), float32 (float64 for float64
    inputs): (out, weights).

    This is the one sanctioned path to attention weights (``output_attentions``); it always runs
    the eager backend.
    """
    call, _, _, _ = _prepare(q, k, v, mask, score, scale, dropout_p, False, True, "eager")
    if _OBSERVERS:
        for fn in _OBSERVERS:
            fn(call, "eager")
    out, _, weights = REGISTRY["eager"].run_with_weights(call)
    return out, weights


def explain(q, k=None, v=None, *, kv=None, mask=None, score=None, scale=None, backend="auto", dropout_p=0.0, return_lse=False,
            full: bool = True) -> Decision:  # fmt: skip
    """The decision ``attention`` would take for these arguments, with every backend's answer.

    Prints as a table: backend, chosen/accepted/rejected/unavailable, reason. Raises the same
    validation errors as ``attention``; a call no backend can serve returns the decision with
    ``chosen=None`` instead of raising. ``full=False`` stops at the winner, as ``attention``
    does (backends ranked below it are listed as "not checked"). No backend builds a mask to
    answer: capability checks read the call's shapes, options and term structure only. Asking
    changes nothing: term values ``auto`` has not run yet are still a first sight afterwards
    (``ranking.FIRST_SIGHT``), so the decision shown is the one the next call takes.
    ``kv=``: a KV cache view instead of k and v, as in :func:`attention`.
    """
    paged = None
    if kv is not None:
        if k is not None or v is not None:
            raise bad_value("k/v", "None when kv= is given (the keys come from the cache)", "tensors")
        _check_kv_query(q, kv, dropout_p)
        mask = _kv_mask(kv, mask)
        if kv.paged:
            paged = kv
            (ks, vs), (kst, vst) = kv.logical_shapes(), kv.logical_strides()
            k = torch.empty_strided(ks, kst, dtype=q.dtype, device="meta")
            v = torch.empty_strided(vs, vst, dtype=q.dtype, device="meta")
        else:
            k, v = kv.logical()
    _check_qkv(q, k, v, same_device=paged is None)
    _check_options(scale, dropout_p, return_lse)
    try:
        call, _, decision, _ = _prepare(
            q, k, v, mask, score, scale, dropout_p, return_lse, False, backend, full=bool(full), kv=paged
        )
    except UnsupportedError as e:
        return e.decision
    return decision
