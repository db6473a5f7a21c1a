"""One forward's view of a KV cache (``anyattn.spec.kv``): :class:`KVStep`, the bookkeeping a
``cache.step(...)`` returns and every layer shares (where the new tokens go, the key layout the
calls see, and the page maps and indices backends read, each built once per step), and
:class:`KVView`, one layer of it as ``attention(q, kv=view)`` takes it."""

from __future__ import annotations

import itertools

import torch

from ..errors import bad_type, bad_value
from ..layout import host_to_device

__all__ = ["KVStep", "KVView", "kv_bucket"]

_STEPS = itertools.count(1)


def kv_bucket(n: int) -> int:
    """A key length (or page count) rounded up to the next of 4, 5, 6, 7 x 2^k (at most 25% more;
    at least 4): a growing cache changes shapes, and with them decisions and compiled kernels,
    about 4 times per doubling instead of every step."""
    if n <= 4:
        return max(n, 1)
    k = (n - 1).bit_length() - 3
    return next(m << k for m in (4, 5, 6, 7, 8) if (m << k) >= n)


def _runs(counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Items laid out as back-to-back runs of ``counts`` (host int64): each item's run and its
    index inside the run."""
    n = int(counts.sum())
    run = torch.repeat_interleave(torch.arange(counts.numel()), counts, output_size=n)
    return run, torch.arange(n) - (torch.cumsum(counts, 0) - counts)[run]


# --------------------------------------------------------------------------------------------
# a step, and a layer's view of it


class KVStep:
    """One forward's cache bookkeeping, shared by every layer: which sequences get how many new
    tokens, where those go, and the key layout the calls see. Built by ``cache.step(...)``.

    ``positions``: (rows, Sq) or (1, T) int64 absolute position of every new token in q's layout
    (0 at padding): what rotary embeddings take. ``q_shape``: (rows, Sq) of the queries."""

    def __init__(self, cache, layout, seqs, new, lengths, Sq, slots, src, positions, *, Sk=None, tables=None):
        self.cache, self.layout, self.seqs, self.new, self.lengths = cache, layout, seqs, new, lengths
        self.Sq = Sq
        self.id = next(_STEPS)
        dev = cache.device
        self.positions = host_to_device(torch.tensor(positions, dtype=torch.int64), dev)
        self._slots = host_to_device(torch.tensor(slots, dtype=torch.int64), dev)
        self._src = None if src is None else host_to_device(torch.tensor(src, dtype=torch.int64), dev)
        self._Sk, self._tables = Sk, tables
        self._memo: dict = {}
        # the sequences' state this step was made for; the cache's epoch counts every step,
        # release and reset, so a write of the latest step compares one int
        self._epoch, self._stamp = cache._epoch, cache._stamp(seqs)

    @property
    def rows(self) -> int:
        return len(self.seqs) if self.layout == "rows" else 1

    @property
    def q_shape(self) -> tuple:
        return (self.rows, self.Sq)

    def __repr__(self) -> str:
        return f"KVStep({self.cache.kind}, {self.layout}, seqs={list(self.seqs)[:8]}, new={list(self.new)[:8]}, q_len={self.Sq})"

    def write(self, layer: int, k_new: torch.Tensor, v_new: torch.Tensor) -> KVView:
        """Store this step's new keys/values of ``layer`` and return the layer's view for
        ``attention(q, kv=view)``. ``k_new`` (rows, Hkv, Sq, D) in the queries' layout (any
        strides); positions beyond a row's new tokens (padding) are not stored."""
        c = self.cache
        if not isinstance(layer, int) or not 0 <= layer < c.layers:
            raise bad_value("layer", f"a layer index in [0, {c.layers})", repr(layer))
        if c._epoch != self._epoch and c._stamp(self.seqs) != self._stamp:  # its slots may be another sequence's
            raise bad_value(
                "step", "the latest step of its sequences (a later step, release() or reset() changed them "
                "since this one was made)", repr(self),
            )  # fmt: skip
        for name, x, d in (("k_new", k_new, c.head_dim), ("v_new", v_new, c.value_dim)):
            want = (self.rows, c.kv_heads, self.Sq, d)
            if not isinstance(x, torch.Tensor):
                raise bad_type(name, "a torch.Tensor", type(x).__name__)
            if tuple(x.shape) != want:
                raise bad_value(name, f"shape (rows, Hkv, Sq, D) = {want} (the step's query layout)", f"shape {tuple(x.shape)}")
            if x.device != c.device:
                raise bad_value(name, f"the cache's device {c.device}", f"device {x.device}")
            if x.dtype != c.dtype:
                raise bad_value(name, f"the cache's dtype {c.dtype}", f"dtype {x.dtype}")
        with torch.no_grad():
            for store, x in ((c.k[layer], k_new), (c.v[layer], v_new)):
                tok = x.transpose(1, 2).reshape(-1, x.shape[1], x.shape[3])  # (rows * Sq, Hkv, D)
                if self._src is not None:
                    tok = tok.index_select(0, self._src)
                elif tok.shape[0] != self._slots.numel():  # a packed step padded to q_len: the tail is padding
                    tok = tok[: self._slots.numel()]
                store.view(-1, store.shape[-2], store.shape[-1]).index_copy_(0, self._slots, tok)
        return KVView(self, layer)

    def view(self, layer: int) -> KVView:
        """The layer's view without writing (its keys were written by another call)."""
        if not isinstance(layer, int) or not 0 <= layer < self.cache.layers:
            raise bad_value("layer", f"a layer index in [0, {self.cache.layers})", repr(layer))
        return KVView(self, layer)

    # -- the key layout (memoized: shared by every layer) ---------------------------------
    def layout_terms(self):
        """(query lengths or None, key lengths, gap lengths or None), per the layout."""
        return self._memo_get("terms", self._layout_terms)

    def _memo_get(self, name, fn):
        hit = self._memo.get(name)
        if hit is None:
            hit = self._memo[name] = fn()
        return hit

    def _layout_terms(self):
        from .sequences import documents, padding

        if self.cache.kind == "contiguous":
            q = None if all(x == self.Sq for x in self.new) else torch.tensor(self.new)
            return padding(q, kv=torch.tensor(self.lengths))
        live = self.live()
        if self.layout == "rows":
            q = None if all(x == self.Sq for x in self.new) else torch.tensor(self.new)
            return padding(q, kv=torch.tensor([m for m, _ in live]))
        ps = self.cache.page_size
        qd, kd = [], []
        for n, (m, pages) in zip(self.new, live):
            qd += [n, 0]
            kd += [m, len(pages) * ps - m]  # the rest of the sequence's last page: a document of no query
        return documents(qd, kv=kd)

    def live(self) -> list:
        """Paged: per sequence (cached keys counted from its first live page, the live pages)."""
        def build():
            ps, out = self.cache.page_size, []
            for m, table in zip(self.lengths, self._tables):
                first = 0
                while first < len(table) and table[first] == 0:
                    first += 1
                out.append((m - first * ps, table[first:]))
            return out

        return self._memo_get("live", build)

    def _live_pages(self):
        """Paged, on the host: (live pages of every sequence back to back, int64; each sequence's
        cached keys m (per sequence); each page's sequence index; its index in the sequence)."""
        def build():
            live = self.live()
            counts = torch.tensor([len(p) for _, p in live], dtype=torch.int64)
            pages = torch.tensor([x for _, p in live for x in p], dtype=torch.int64)
            return (pages, torch.tensor([x for x, _ in live], dtype=torch.int64), *_runs(counts))

        return self._memo_get("live_pages", build)

    def logical_pages(self) -> torch.Tensor:
        """Paged: (rows, nk) int64 page of every logical key block (0 = none), on the device; the
        logical key length is nk * page_size (nk bucketed, see :func:`kv_bucket`)."""
        def build():
            live = self.live()
            if self.layout == "rows":
                nk = kv_bucket(max(len(p) for _, p in live) or 1)
                rows = [p + [0] * (nk - len(p)) for _, p in live]
            else:
                flat = [x for _, p in live for x in p]
                nk = kv_bucket(len(flat) or 1)
                rows = [flat + [0] * (nk - len(flat))]
            return host_to_device(torch.tensor(rows, dtype=torch.int64), self.cache.device)

        return self._memo_get("lpages", build)

    def physical_to_logical(self) -> torch.Tensor:
        """Paged: (rows, P + 1) int64 logical block of every physical page in each row, -1 where
        the page is not this row's (always for the null page 0)."""
        def build():
            lp = self.logical_pages()
            R, nk = lp.shape
            out = torch.full((R, self.cache.pages + 1), -1, dtype=torch.int64, device=lp.device)
            out.scatter_(1, lp, torch.arange(nk, device=lp.device).expand(R, nk).contiguous())
            out[:, 0] = -1
            return out

        return self._memo_get("p2l", build)

    def page_maps(self):
        """Paged: the step's layout in pool coordinates, every tensor of a shape fixed by the pool
        and the query layout (so a kernel compiled for one step serves the next, see the flex
        backend): ``page_owner`` (P + 1,) the step-row / document index owning each page (-1: none),
        ``page_start`` (P + 1,) the live-relative position of its first key, ``page_valid`` (P + 1,)
        its valid keys, ``q_owner`` (rows, Sq) each query's row / document (-1: padding), ``q_pos``
        (rows, Sq) its live-relative key position (bottom-right: the last new token at the last key)."""
        def build():
            live, ps, P1 = self.live(), self.cache.page_size, self.cache.pages + 1
            pages, m, doc, j = self._live_pages()
            owner = torch.full((P1,), -1, dtype=torch.int64)
            start = torch.zeros(P1, dtype=torch.int64)
            valid = torch.zeros(P1, dtype=torch.int64)
            owner[pages], start[pages], valid[pages] = doc, j * ps, (m[doc] - j * ps).clamp(0, ps)
            n = torch.tensor(self.new, dtype=torch.int64)
            t = torch.arange(self.Sq)
            if self.layout == "rows":
                real = t[None, :] < n[:, None]
                q_owner = torch.where(real, torch.arange(len(live))[:, None], -1)
                q_pos = torch.where(real, (m - n)[:, None] + t[None, :], 0)
            else:
                qd, tt = _runs(n)
                pad = self.Sq - qd.numel()
                q_owner = torch.nn.functional.pad(qd, (0, pad), value=-1)[None]
                q_pos = torch.nn.functional.pad((m - n)[qd] + tt, (0, pad))[None]
            dev = self.cache.device
            owner[0] = -1  # the null page is nobody's
            return tuple(host_to_device(x, dev) for x in (owner, start, valid, q_owner, q_pos))

        return self._memo_get("page_maps", build)

    def row_pages(self, width: int, left: int | None = None, right: int | None = None):
        """Paged, rows layout: the key blocks of a query block that covers its whole row
        (decoding), in the shape of FlexAttention's BlockMask index, on the device:
        ``(partial_num, partial_idx, full_num, full_idx)``, int32 (rows, 1, 1) and (rows, 1, 1,
        width), zero-padded. A live page is *full* when every query of the row sees every key in
        it under the row's causal offset ``right`` (None: no causal limit) and window ``left``
        (None: none): all its keys are written, the row has no padding queries, the page ends
        at most ``right`` keys after the first query and starts at most ``left`` keys before the
        last one. Full pages skip the mask_mod in the kernel; the others are evaluated per key.
        Built on the host from the page tables (vectorized) and copied once."""
        def build():
            R, ps = len(self.live()), self.cache.page_size
            flat, m, row, j = self._live_pages()
            m = m[row]  # the row's keys, live-relative
            n = torch.tensor(self.new, dtype=torch.int64)[row]  # its new tokens: queries at m - n .. m - 1
            lo, hi = j * ps, j * ps + ps - 1
            full = (n == self.Sq) & (n > 0) & (hi < m)
            if right is not None:
                full &= hi <= m - n + right
            if left is not None:
                full &= m - 1 - lo <= left

            def place(sel):
                num = torch.bincount(row[sel], minlength=R)
                r, col = _runs(num)  # row[sel] is sorted: the selected pages keep their rows' order
                idx = torch.zeros(R, width, dtype=torch.int32)
                idx[r, col] = flat[sel].to(torch.int32)
                return num.to(torch.int32).view(R, 1, 1), idx.view(R, 1, 1, width)

            dev = self.cache.device
            return tuple(host_to_device(x, dev) for x in (*place(~full), *place(full)))

        return self._memo_get(("row_pages", width, left, right), build)

    def block_table(self):
        """Paged, for varlen kernels: (block_table (N, max pages) int32, seqused_k (N,) int32) over
        the live pages of every sequence of the step, on the device."""
        def build():
            live = self.live()
            width = max(len(p) for _, p in live) or 1
            bt = [p + [0] * (width - len(p)) for _, p in live]
            dev = self.cache.device
            return (host_to_device(torch.tensor(bt, dtype=torch.int32), dev),
                    host_to_device(torch.tensor([m for m, _ in live], dtype=torch.int32), dev))  # fmt: skip

        return self._memo_get("block_table", build)

    @property
    def Sk(self) -> int:
        """The logical key length of a view."""
        if self._Sk is not None:
            return self._Sk
        return self.logical_pages().shape[1] * self.cache.page_size


class KVView:
    """One layer of a step, as ``attention(q, kv=view)`` takes it: the storage, the key layout
    (:meth:`term`) and, for a paged cache, the page mapping native backends read."""

    def __init__(self, step: KVStep, layer: int):
        self.step, self.layer = step, layer
        self.cache = step.cache

    @property
    def kind(self) -> str:
        return self.cache.kind

    @property
    def paged(self) -> bool:
        return self.cache.kind == "paged"

    @property
    def window(self) -> int | None:
        return self.cache.window

    @property
    def page_size(self) -> int | None:
        return self.cache.page_size if self.paged else None

    def __repr__(self) -> str:
        return f"KVView(layer={self.layer}, {self.step!r})"

    def term(self):
        """The mask term of the key layout: ``padding(q, kv=m)`` or ``documents(n, kv=m)``."""
        return self.step.layout_terms()

    def structure(self) -> tuple:
        """What decisions depend on: the cache kind, the query layout, the page size."""
        return ("kv", self.cache.kind, self.step.layout, self.page_size, self.cache.pages + 1 if self.paged else None)

    def logical_shapes(self) -> tuple:
        """((rows, Hkv, Sk, D), (rows, Hkv, Sk, Dv)) of the keys the call attends to."""
        c, s = self.cache, self.step
        return (s.rows, c.kv_heads, s.Sk, c.head_dim), (s.rows, c.kv_heads, s.Sk, c.value_dim)

    def logical(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(k, v) (rows, Hkv, Sk, D): views of a contiguous cache; gathered pages of a paged one
        (a copy of the step's keys, per layer: what backends without a page table run on)."""
        c, s = self.cache, self.step
        if not self.paged:
            return c.k[self.layer][:, : s.Sk].transpose(1, 2), c.v[self.layer][:, : s.Sk].transpose(1, 2)
        lp = s.logical_pages()  # (rows, nk)
        out = []
        for store in (c.k[self.layer], c.v[self.layer]):
            g = store.index_select(0, lp.reshape(-1))  # (rows * nk, ps, Hkv, D)
            out.append(g.view(lp.shape[0], lp.shape[1] * c.page_size, store.shape[-2], store.shape[-1]).transpose(1, 2))
        return out[0], out[1]

    def logical_strides(self) -> tuple:
        """The strides :meth:`logical` gives (the signature's, without building anything)."""
        c = self.cache
        (R, H, Sk, D), (_, _, _, Dv) = self.logical_shapes()
        if self.paged:
            return ((Sk * H * D, D, H * D, 1), (Sk * H * Dv, Dv, H * Dv, 1))
        cap = c.capacity
        return ((cap * H * D, D, H * D, 1), (cap * H * Dv, Dv, H * Dv, 1))

    def pool(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Paged: the layer's whole pool as one key row, (1, Hkv, (P + 1) * ps, D) views (no copy)."""
        c = self.cache
        out = []
        for store in (c.k[self.layer], c.v[self.layer]):
            out.append(store.view(1, -1, store.shape[-2], store.shape[-1]).transpose(1, 2))
        return out[0], out[1]

    def memory_bytes(self) -> int:
        return self.cache.memory_bytes()
