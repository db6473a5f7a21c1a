"""Cache keys that can never name another object, and the bounded caches that use them.

Identity. A term tensor (``dense(m)``, ``bias(b)``, a keep-mask, a SeqInfo, a mask function) is
keyed by an *identity token*: a number drawn once per object from a counter that never repeats,
stored on the object itself. ``id()`` is not such a key: when an object is freed, the next object
allocated at that address gets the same ``id`` and would be served the freed one's cache entries
(a freshly allocated mask silently received the previous mask's lowering). A token is never
reused, so a cache lookup for a new object can only miss.

Eviction. When an object with a token is freed, the entries that depend on it can never be hit
again; a ``weakref.finalize`` drops them from every cache at once, so a stream of fresh masks
does not pin memory until the size bound evicts it. (PyTorch keeps a tensor's Python object alive
while a view of it lives, e.g. inside a cached BlockMask's closure: then the size bound applies.)

Inside a caller's ``torch.compile`` trace no cache is read or written: what the traced code
builds becomes part of the graph, and a lookup would make the graph guard on the dict. The
callers skip the caches then (``Call.cacheable`` is False while tracing); the lookups themselves
stay a plain ``dict.get`` on the eager hot path.
"""

from __future__ import annotations

import itertools
import weakref

import torch
from torch.compiler import is_compiling

__all__ = ["LRU", "identity", "tensor_key", "obj_key", "CONTENT_KEY_MAX"]

_ATTR = "_anyattn_identity"
_COUNTER = itertools.count(1)
_PINNED: dict = {}  # id -> (object, token) for objects that take no attribute (kept alive: id stays theirs)
# token -> {(cache, key)} of the entries that depend on the object holding that token
_DEPENDENTS: dict[int, set] = {}


def _forget(token: int) -> None:
    for cache, key in _DEPENDENTS.pop(token, ()):
        cache._drop_if_present(key)


def identity(obj) -> int:
    """A token for ``obj`` that no other object will ever get (see the module docstring)."""
    d = getattr(obj, "__dict__", None)
    if d is not None:
        tok = d.get(_ATTR)
        if tok is None:
            tok = next(_COUNTER)
            try:
                d[_ATTR] = tok
                weakref.finalize(obj, _forget, tok)
            except TypeError:  # no weak references: the token stays valid, entries age out by size
                pass
        return tok
    hit = _PINNED.get(id(obj))
    if hit is None:  # builtins and __slots__ objects: pinned (module-level functions, in practice)
        hit = _PINNED[id(obj)] = (obj, next(_COUNTER))
    return hit[1]


# Small host tensors are keyed by content: a fresh ``torch.tensor([16, 40])`` built every call maps
# to the same cached lowering. Larger or device tensors are keyed by identity (of the base tensor
# for views) plus the version counter, which in-place edits bump.
CONTENT_KEY_MAX = 256


def tensor_key(t: torch.Tensor, tokens: list | None = None) -> tuple:
    """Cache key of a term tensor; appends the identity token it uses (if any) to ``tokens``."""
    if is_compiling():
        # Traced: reading values would be data-dependent, and an identity would make the graph
        # guard on this very tensor object. No cache is read or written while tracing.
        return ("traced tensor", tuple(t.shape), t.dtype, t.device)
    if t.device.type == "cpu" and t.numel() <= CONTENT_KEY_MAX and not t.requires_grad:
        return ("value", t.dtype, tuple(t.shape), tuple(t.reshape(-1).tolist()))
    base = t._base if t._base is not None else t
    tok = identity(base)
    if tokens is not None:
        tokens.append(tok)
    if t.is_inference():
        # Tensors made under torch.inference_mode have no version counter: an in-place change
        # inside inference_mode is not seen (docs/reliability.md); pass a new tensor instead.
        return ("inference", tok, t.storage_offset(), tuple(t.shape), t.stride(), t.dtype, t.device)
    return ("tensor", tok, t.storage_offset(), tuple(t.shape), t.stride(), t.dtype, t.device, t._version)


def obj_key(o, tokens: list | None = None) -> tuple:
    """Cache key of a non-tensor object keyed by identity (mask/score functions, SeqInfos)."""
    if is_compiling():
        return ("traced object", type(o).__name__)
    func = getattr(o, "__func__", None)
    if func is not None and getattr(o, "__self__", None) is not None:  # a bound method: new object per access
        return ("method", obj_key(o.__self__, tokens), obj_key(func, tokens))
    tok = identity(o)
    if tokens is not None:
        tokens.append(tok)
    return ("object", tok)


class LRU:
    """``maxsize`` entries at most; with ``max_bytes``, also at most that many bytes as counted by
    ``nbytes(value)`` (oldest entries evicted first; a value larger than ``max_bytes`` alone is not
    stored). Lowered forms can be large (an SDPA mask for a 32k-token packed row is 1 GiB): a bound
    on the count alone let a stream of new packings pin tens of GiB of GPU memory.

    Lookups are a plain ``dict.get`` (they sit on every attention call); when full, the oldest
    inserted entry is evicted (first in, first out), which for caches keyed by call signature
    behaves like LRU in practice at a fraction of the cost. ``put(..., tokens=...)`` registers the
    identity tokens the entry depends on: the entry is dropped when one of those objects is freed.
    """

    def __init__(self, maxsize: int = 256, *, max_bytes: int | None = None, nbytes=None):
        self.maxsize = maxsize
        self.max_bytes, self._nbytes = max_bytes, nbytes
        self._d: dict = {}
        self._sizes: dict = {}
        self._tokens: dict = {}
        self.bytes = 0
        self.hits = 0
        self.misses = 0

    def get(self, key):
        v = self._d.get(key)
        if v is None:
            self.misses += 1
        else:
            self.hits += 1
        return v

    def put(self, key, value, tokens=()) -> None:
        d = self._d
        if key in d:
            self._drop(key)
        if self.max_bytes is not None:
            n = int(self._nbytes(value))
            if n > self.max_bytes:
                return
            while d and self.bytes + n > self.max_bytes:
                self._drop(next(iter(d)))
            self._sizes[key] = n
            self.bytes += n
        d[key] = value
        if tokens:
            self._tokens[key] = tuple(tokens)
            for tok in tokens:
                _DEPENDENTS.setdefault(tok, set()).add((self, key))
        if len(d) > self.maxsize:
            self._drop(next(iter(d)))

    def _drop(self, key) -> None:
        del self._d[key]
        self.bytes -= self._sizes.pop(key, 0)
        for tok in self._tokens.pop(key, ()):
            deps = _DEPENDENTS.get(tok)
            if deps is not None:
                deps.discard((self, key))
                if not deps:
                    del _DEPENDENTS[tok]

    def _drop_if_present(self, key) -> None:
        if key in self._d:
            self._drop(key)

    def clear(self) -> None:
        for key in list(self._d):
            self._drop_if_present(key)  # a finalizer run by an earlier drop may have removed it
        self.hits = self.misses = 0

    def __len__(self) -> int:
        return len(self._d)

    def __contains__(self, key) -> bool:
        return key in self._d

    def values(self):
        return self._d.values()

    # entries are hashed with the cache object itself in _DEPENDENTS
    __hash__ = object.__hash__
