"""KV caches: where the keys of an attention call live between generation steps.

Two caches, one protocol, one call::

    cache = ContiguousKVCache(batch=8, capacity=4096, kv_heads=8, head_dim=128, layers=16, ...)
    cache = PagedKVCache(pages=4096, page_size=128, kv_heads=8, head_dim=128, layers=16, ...)

    step = cache.step(...)                       # once per forward: who gets how many new tokens
    for layer in range(L):
        kv = step.write(layer, k_new, v_new)     # the layer's new keys/values, in the queries' layout
        out = anyattn.attention(q, kv=kv, mask=causal())

A cache is a *key layout* plus storage. ``attention(q, kv=view)`` ANDs the layout's term to the
mask and runs one call: each sequence's queries sit bottom-right among its cached keys (the
last new token at the last key), so ``causal()`` and ``sliding_window(...)`` mean what they mean
without a cache. Picture (docs/serving.md draws more)::

    contiguous, rows = sequences                   paged: pool of pages, a table per sequence
      row 0  [k k k k k k . . . .]  m=6              pool   [0: null][1][2][3][4][5]...
      row 1  [k k k . . . . . . .]  m=3              seq 7  table [3, 1, 4]   -> keys 0..(3*ps)
             ^ buffer index 0 = absolute position    seq 9  table [2]         evicted pages -> 0
               `offset` (after a window compaction)

Query layouts of a step: ``"rows"`` (q (B, Hq, Sq, D); row r is sequence ``seqs[r]``, its n_r
new tokens first, right-padded to Sq) or ``"packed"`` (paged only; q (1, Hq, T, D); the new
tokens of every sequence back to back: chunked prefill and decode in one call, continuous
batching). The implied terms are ``padding(q_lengths, kv=cached_lengths)`` (rows) and
``documents(new_tokens, kv=cached_lengths)`` (packed); see ``anyattn.spec.sequences``.

Sliding-window eviction (``window=W``: a query sees itself and W - 1 keys before it, HF's
``sliding_window=W``): keys no query can see again are dropped. The contiguous cache moves the
last W - 1 keys of a full row to its start (one copy per ``capacity - W + 1`` tokens); the
paged cache frees pages that lie wholly before the window (their table entries point at the
null page 0, never read). Calls on a windowed cache must carry a window of at most
``sliding_window(W - 1)`` (checked: an evicted key would be silently missing otherwise).

Storage is zero-initialized, and slots are zeroed again before another sequence gets them (a
page handed out, a row reset, the tail a window compaction leaves): a masked key is multiplied
by 0 on some backends, so a finished request's NaN or inf would leak into the next one. A step
that raises leaves the cache as it was. Caches are inference-only: ``attention(..., kv=...)``
refuses autograd.

Shape legend: L layers, B rows, P pages (+1: the null page), ps page size, Hkv kv heads, D/Dv
head dims, n new tokens of a sequence this step, m its cached keys after the step.
"""

from __future__ import annotations

import itertools
import math
import operator

import torch

from ..errors import bad_type, bad_value
from .kv_step import KVStep, KVView, kv_bucket

__all__ = ["ContiguousKVCache", "PagedKVCache", "KVStep", "KVView", "kv_bucket"]


def _pos_int(name: str, v, low: int = 1) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise bad_type(name, "an int", type(v).__name__)
    if v < low:
        raise bad_value(name, f"an int >= {low}", v)
    return v


class _Cache:
    """Storage shared by both caches: per layer a K and a V tensor, zero-initialized."""

    kind = ""

    def __init__(self, shape, *, kv_heads, head_dim, layers, value_dim, dtype, device, window):
        self.layers = _pos_int("layers", layers)
        self.kv_heads = _pos_int("kv_heads", kv_heads)
        self.head_dim = _pos_int("head_dim", head_dim)
        self.value_dim = self.head_dim if value_dim is None else _pos_int("value_dim", value_dim)
        if window is not None:
            window = _pos_int("window", window)
        self.window = window  # keys a query sees, itself included (HF sliding_window)
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise bad_type("dtype", "a floating-point torch.dtype", repr(dtype))
        self.dtype, self.device = dtype, torch.device(device)
        self.k = [torch.zeros(*shape, self.kv_heads, self.head_dim, dtype=dtype, device=self.device) for _ in range(self.layers)]
        self.v = [torch.zeros(*shape, self.kv_heads, self.value_dim, dtype=dtype, device=self.device) for _ in range(self.layers)]
        self.device = self.k[0].device  # "cuda" -> "cuda:0": the device tensors report, which writes are checked against
        self._epoch = 0  # bumped by every step, release and reset (KVStep.write's fast check)

    @property
    def keep(self) -> int | None:
        """Keys kept before a query (window - 1), None without a window."""
        return None if self.window is None else self.window - 1

    def memory_bytes(self) -> int:
        """Bytes of K and V storage over all layers (what the cache allocated)."""
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    def _new_counts(self, new_tokens, count: int) -> list[int]:
        if isinstance(new_tokens, int) and not isinstance(new_tokens, bool):
            counts = [new_tokens] * count
        elif isinstance(new_tokens, (list, tuple)) and all(isinstance(x, int) and not isinstance(x, bool) for x in new_tokens):
            counts = list(new_tokens)
        else:
            raise bad_type("new_tokens", "an int or a list of ints (new tokens per sequence)", repr(new_tokens)[:60])
        if len(counts) != count:
            raise bad_value("new_tokens", f"one count per sequence ({count})", f"{len(counts)} counts")
        if any(x < 0 for x in counts):
            raise bad_value("new_tokens", "non-negative counts", min(counts))
        return counts


# --------------------------------------------------------------------------------------------
# the contiguous cache


class ContiguousKVCache(_Cache):
    """``batch`` rows of ``capacity`` key/value slots per layer, (batch, capacity, Hkv, D) each.

    Row b holds sequence b. ``window=W`` keeps the last W - 1 keys when a row fills up (moved
    to the row's start; ``offsets[b]`` is then the absolute position of slot 0). Steps are
    row-layout: q (batch, Hq, Sq, D)."""

    kind = "contiguous"

    def __init__(self, batch: int, capacity: int, kv_heads: int, head_dim: int, *, layers: int = 1, value_dim=None,
                 dtype=torch.float32, device="cpu", window: int | None = None):  # fmt: skip
        self.batch = _pos_int("batch", batch)
        self.capacity = _pos_int("capacity", capacity)
        super().__init__((self.batch, self.capacity), kv_heads=kv_heads, head_dim=head_dim, layers=layers,
                         value_dim=value_dim, dtype=dtype, device=device, window=window)  # fmt: skip
        self.lengths = [0] * self.batch  # keys stored per row (slot index space)
        self.offsets = [0] * self.batch  # absolute position of slot 0
        self._generation = [0] * self.batch  # bumped by reset(): a new sequence in the row

    def _stamp(self, seqs) -> tuple:
        """What a step's writes assume about its rows (KVStep.write checks it is unchanged)."""
        return (tuple(self.lengths), tuple(self._generation))

    def reset(self, rows=None) -> None:
        """Empty the given rows (all by default): a new sequence starts there (its slots zeroed)."""
        rows = list(range(self.batch)) if rows is None else list(rows)
        for i, given in enumerate(rows):
            try:
                b = None if isinstance(given, bool) else operator.index(given)  # numpy / tensor ints too
            except TypeError:
                b = None
            if b is None or not 0 <= b < self.batch:
                raise bad_value("rows", f"row indices in [0, {self.batch})", repr(given))
            rows[i] = b
        with torch.no_grad():
            for t in self.k + self.v:
                t[rows] = 0
        for b in rows:
            self.lengths[b] = self.offsets[b] = 0
            self._generation[b] += 1
        self._epoch += 1

    def step(self, new_tokens) -> KVStep:
        """Reserve ``new_tokens`` slots per row (an int: every row; a list: per row, 0 = idle this
        step). Compacts windowed rows that would overflow, for every layer, before any writes."""
        n = self._new_counts(new_tokens, self.batch)
        before = list(self.lengths)
        full = [b for b, nb in enumerate(n) if nb and before[b] + nb > self.capacity]
        for b in full:  # every row checked before any is compacted: a step that raises changes nothing
            if self.window is None:
                raise bad_value(
                    "new_tokens", f"at most {self.capacity - before[b]} more tokens in row {b} (capacity {self.capacity}, "
                    f"{before[b]} cached; a windowed cache evicts, this one has no window)", n[b],
                )  # fmt: skip
            if min(before[b], self.keep) + n[b] > self.capacity:
                raise bad_value("new_tokens", f"at most capacity - (window - 1) = {self.capacity - self.keep} in one step", n[b])
        for b in full:
            keep = min(before[b], self.keep)
            shift = before[b] - keep
            with torch.no_grad():
                for t in self.k + self.v:  # the keys the window still needs move to the row's start
                    t[b, :keep] = t[b, shift : before[b]].clone()
                    t[b, keep : before[b]] = 0
            self.offsets[b] += shift
            before[b] = keep
        after = [a + x for a, x in zip(before, n)]
        self.lengths = list(after)
        self._epoch += 1
        Sq = max(n)
        slots = [b * self.capacity + before[b] + t for b in range(self.batch) for t in range(n[b])]
        src = None if all(x == Sq for x in n) else [b * Sq + t for b in range(self.batch) for t in range(n[b])]
        positions = [[self.offsets[b] + before[b] + t if t < n[b] else 0 for t in range(Sq)] for b in range(self.batch)]
        Sk = min(self.capacity, max(128, kv_bucket(max(after))))  # at least one 128-key tile
        return KVStep(self, "rows", tuple(range(self.batch)), tuple(n), tuple(after), Sq, slots, src, positions, Sk=Sk)


# --------------------------------------------------------------------------------------------
# the paged cache


class PagedKVCache(_Cache):
    """A pool of ``pages`` pages of ``page_size`` key/value slots per layer, (pages + 1,
    page_size, Hkv, D) each (page 0 is the null page: never handed out, always zero). A sequence
    owns a table of pages in logical order (vLLM's block table, FlexAttention's page table);
    pages come from a free list as it grows and go back when it is released or when a window
    has passed them."""

    kind = "paged"

    def __init__(self, pages: int, page_size: int, kv_heads: int, head_dim: int, *, layers: int = 1, value_dim=None,
                 dtype=torch.float32, device="cpu", window: int | None = None):  # fmt: skip
        self.pages = _pos_int("pages", pages)
        self.page_size = _pos_int("page_size", page_size)
        if self.page_size % 16:
            raise bad_value("page_size", "a multiple of 16 (the smallest key block of the kernels)", page_size)
        super().__init__((self.pages + 1, self.page_size), kv_heads=kv_heads, head_dim=head_dim, layers=layers,
                         value_dim=value_dim, dtype=dtype, device=device, window=window)  # fmt: skip
        self._free = list(range(self.pages, 0, -1))
        self._tables: dict[int, list[int]] = {}
        self._lengths: dict[int, int] = {}
        self._ids = itertools.count()

    # -- sequences ------------------------------------------------------------------------
    def add_sequence(self) -> int:
        """A new, empty sequence; returns its id."""
        s = next(self._ids)
        self._tables[s], self._lengths[s] = [], 0
        return s

    def release(self, seq: int) -> None:
        """Free a sequence's pages (it is finished)."""
        self._check_seq(seq)
        self._free.extend(p for p in reversed(self._tables.pop(seq)) if p)
        del self._lengths[seq]
        self._epoch += 1

    def length(self, seq: int) -> int:
        """Tokens the sequence has had (absolute: evicted ones included)."""
        self._check_seq(seq)
        return self._lengths[seq]

    @property
    def free_pages(self) -> int:
        return len(self._free)

    @property
    def sequences(self) -> tuple:
        return tuple(self._tables)

    def _stamp(self, seqs) -> tuple:
        """What a step's writes assume about its sequences: their lengths (ids are never reused,
        so a released sequence reads None)."""
        return tuple(self._lengths.get(s) for s in seqs)

    def _check_seq(self, seq) -> None:
        if seq not in self._tables:
            raise bad_value("seq", f"a live sequence id of this cache ({sorted(self._tables)[:8]}...)", repr(seq))

    def pages_of(self, seq: int) -> list[int]:
        """The sequence's page table (0 = evicted)."""
        self._check_seq(seq)
        return list(self._tables[seq])

    # -- a step ---------------------------------------------------------------------------
    def step(self, seqs, new_tokens, *, layout: str | None = None, q_len: int | None = None) -> KVStep:
        """Reserve slots for ``new_tokens`` (an int, or one per sequence) of the sequences ``seqs``
        (their order is the order of q's rows or documents). ``layout``: "rows" (q (len(seqs),
        Hq, max n, D)) or "packed" (q (1, Hq, T, D), T = sum n); default rows when every count
        is equal, else packed. ``q_len``: pad the packed query length to it (bucketed lengths
        keep compiled kernels from recompiling; the tail queries are padding)."""
        seqs = list(seqs)
        if not seqs:
            raise bad_value("seqs", "at least one sequence id", "none")
        if len(set(seqs)) != len(seqs):
            raise bad_value("seqs", "distinct sequence ids", seqs)
        for s in seqs:
            self._check_seq(s)
        n = self._new_counts(new_tokens, len(seqs))
        if layout is None:
            layout = "rows" if len(set(n)) == 1 else "packed"
        if layout not in ("rows", "packed"):
            raise bad_value("layout", "'rows' or 'packed'", repr(layout))
        if layout == "packed" and q_len is not None and _pos_int("q_len", q_len) < sum(n):
            raise bad_value("q_len", f"at least the {sum(n)} new tokens", q_len)
        ps = self.page_size
        need = 0
        for s, ns in zip(seqs, n):
            need += max(0, -(-(self._lengths[s] + ns) // ps) - len(self._tables[s]))
        evictable = self._evictable(seqs)
        if need > len(self._free) + len(evictable):
            raise bad_value("new_tokens", f"at most the free pages ({len(self._free)} of {self.pages}, {len(evictable)} more "
                            "past the window)", f"{need} more pages")  # fmt: skip
        for s, j in evictable:  # pages wholly before every window this step can reach
            self._free.append(self._tables[s][j])
            self._tables[s][j] = 0
        before, handed_out = [], []
        for s, ns in zip(seqs, n):
            before.append(self._lengths[s])
            table = self._tables[s]
            while len(table) * ps < self._lengths[s] + ns:
                table.append(self._free.pop())
                handed_out.append(table[-1])
            self._lengths[s] += ns
        if handed_out:  # a page's slots past this step's writes are masked, not unread: no stale values
            with torch.no_grad():
                for t in self.k + self.v:
                    t[handed_out] = 0
        self._epoch += 1
        slots = []
        for s, b0, ns in zip(seqs, before, n):
            table = self._tables[s]
            slots.extend(table[p // ps] * ps + p % ps for p in range(b0, b0 + ns))
        if layout == "rows":
            Sq = max(n)
            src = None if all(x == Sq for x in n) else [r * Sq + t for r in range(len(seqs)) for t in range(n[r])]
            positions = [[b0 + t if t < nr else 0 for t in range(Sq)] for b0, nr in zip(before, n)]
        else:
            T = sum(n)
            Sq = T if q_len is None else q_len  # checked before the cache changed
            src = None
            positions = [[b0 + t for b0, nr in zip(before, n) for t in range(nr)] + [0] * (Sq - T)]
        after = tuple(self._lengths[s] for s in seqs)
        tables = [list(self._tables[s]) for s in seqs]
        return KVStep(self, layout, tuple(seqs), tuple(n), after, Sq, slots, src, positions, tables=tables)

    def _evictable(self, seqs) -> list[tuple[int, int]]:
        """(sequence, table index) of the pages of ``seqs`` that lie wholly before every window
        this step can reach (the first new query sits at the current length)."""
        if self.window is None:
            return []
        ps, out = self.page_size, []
        for s in seqs:
            table = self._tables[s]
            first_needed = self._lengths[s] - self.keep
            out.extend((s, j) for j in range(min(len(table), max(0, first_needed) // ps)) if table[j])
        return out


def page_bytes(kv_heads: int, head_dim: int, page_size: int, dtype, layers: int = 1, value_dim: int | None = None) -> int:
    """Bytes one page takes over all layers (K and V): for sizing a pool."""
    el = torch.empty((), dtype=dtype).element_size()
    return layers * page_size * kv_heads * (head_dim + (value_dim or head_dim)) * el


def pages_for(tokens: int, page_size: int) -> int:
    return math.ceil(tokens / page_size)
