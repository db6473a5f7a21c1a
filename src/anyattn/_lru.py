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
    def __init__(self, maxsize: int = 256):
        self.maxsize = maxsize
        self._d: dict = {}
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
        d.pop(key, None)
        d[key] = value
        if len(d) > self.maxsize:
            del d[next(iter(d))]

    def clear(self) -> None:
        self._d.clear()
        self.hits = self.misses = 0

    def __len__(self) -> int:
        return len(self._d)

    def values(self):
        return self._d.values()
