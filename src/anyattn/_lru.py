"""A bounded dict for lowered forms and decisions.

Lookups are a plain ``dict.get`` (they sit on every attention call); when full, the oldest
inserted entry is evicted (first in, first out), which for caches keyed by call signature behaves
like LRU in practice at a fraction of the cost.

Inside a caller's ``torch.compile`` trace the cache is neither read nor written: what the traced
code builds becomes part of the graph, and a lookup would make the graph guard on the dict, so
every eager call that adds an entry afterwards would force a recompile.
"""

from __future__ import annotations

from torch.compiler import is_compiling


class LRU:
    """``maxsize`` entries at most; with ``max_bytes``, also at most that many bytes as counted by
    ``nbytes(value)`` (oldest entries evicted first; a value larger than ``max_bytes`` alone is not
    stored). Lowered forms can be large (an SDPA mask for a 32k-token packed row is 1 GiB): a bound
    on the count alone let a stream of new packings pin tens of GiB of GPU memory."""

    def __init__(self, maxsize: int = 256, *, max_bytes: int | None = None, nbytes=None):
        self.maxsize = maxsize
        self.max_bytes, self._nbytes = max_bytes, nbytes
        self._d: dict = {}
        self._sizes: dict = {}
        self.bytes = 0
        self.hits = 0
        self.misses = 0

    def get(self, key):
        if is_compiling():
            return None
        v = self._d.get(key)
        if v is None:
            self.misses += 1
        else:
            self.hits += 1
        return v

    def put(self, key, value) -> None:
        if is_compiling():
            return
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
        if len(d) > self.maxsize:
            self._drop(next(iter(d)))

    def _drop(self, key) -> None:
        del self._d[key]
        self.bytes -= self._sizes.pop(key, 0)

    def clear(self) -> None:
        self._d.clear()
        self._sizes.clear()
        self.bytes = 0
        self.hits = self.misses = 0

    def __len__(self) -> int:
        return len(self._d)

    def values(self):
        return self._d.values()
