"""A bounded dict for lowered forms and decisions (oldest entry evicted first)."""

from __future__ import annotations

from collections import OrderedDict


class LRU:
    def __init__(self, maxsize: int = 256):
        self.maxsize = maxsize
        self._d: OrderedDict = OrderedDict()
        self.hits = 0
        self.misses = 0

    def get(self, key):
        d = self._d
        v = d.get(key)
        if v is None:
            self.misses += 1
            return None
        d.move_to_end(key)
        self.hits += 1
        return v

    def put(self, key, value) -> None:
        d = self._d
        d[key] = value
        d.move_to_end(key)
        if len(d) > self.maxsize:
            d.popitem(last=False)

    def clear(self) -> None:
        self._d.clear()
        self.hits = self.misses = 0

    def __len__(self) -> int:
        return len(self._d)
