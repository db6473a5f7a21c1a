"""An audit of the serving features (docs/serving.md, docs/hf.md) the way an inference engine
drives them, on CPU:

* long decode chains on both KV caches: mixed-length prefill in chunks, decode steps of 1 token and
  speculative chunks of 2..16, sequences finishing at different times and new ones joining
  (continuous batching), sliding windows small enough that eviction / compaction happens many
  times, GQA, pages that do not divide the lengths, pages reused after eviction and release,
  block tables in non-monotonic order; after every step each sequence's output is compared with
  attention over its whole history in float64, written here from the documented semantics (no
  anyattn call in the reference);
* cache errors: each bad call raises naming its argument and leaves the cache as it was;
* ``documents(q_lengths, kv=k_lengths)`` with empty query / key documents and documents with
  more queries than keys, with causal / windows / sinks, forward and backward, against an
  index-by-index float64 reference;
* HF ``generate()`` with ``attn_implementation="anyattn"`` against ``"eager"``: greedy with left
  padding (one row a single real token), beam search, seeded sampling, a static cache.

Tests whose docstrings say what happened before were defects this audit found (fixed since).
"""

from __future__ import annotations

import math
import random
import warnings

import pytest
import torch

import anyattn as aa
from anyattn.testing import record_calls

warnings.filterwarnings("ignore", message=".*flex_attention.*")

D = 16
GARBAGE = 1e3  # value of padding queries: finite junk an engine may leave there


# ------------------------------------------------------------------------------------ reference


def ref_attention(q, k, v, vis, *, scale=None, sink=None, cap=None, lse=False):
    """float64 attention from the definitions. q (B, Hq, Sq, D), k/v (B, Hkv, Sk, D), vis
    broadcastable to (B, Hq, Sq, Sk) bool. GQA: query head h reads kv head h // (Hq // Hkv).
    ``cap``: s <- cap * tanh(s / cap). ``sink`` (Hq,): one extra softmax column without a value.
    A row that sees no key outputs 0."""
    Hq, Hkv = q.shape[1], k.shape[1]
    k = k.repeat_interleave(Hq // Hkv, 1)
    v = v.repeat_interleave(Hq // Hkv, 1)
    s = (q @ k.transpose(-1, -2)) * (1 / math.sqrt(q.shape[-1]) if scale is None else scale)
    if cap is not None:
        s = cap * torch.tanh(s / cap)
    s = s.masked_fill(~vis, float("-inf"))
    if sink is not None:
        col = sink.view(1, Hq, 1, 1).expand(*s.shape[:-1], 1).to(s.dtype)
        s = torch.cat([s, col], -1)
    m = s.amax(-1, keepdim=True).detach()
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    p = torch.exp(s - m)
    p = p / p.sum(-1, keepdim=True).clamp_min(1e-300)
    if sink is not None:
        p = p[..., :-1]
    if lse:
        return p @ v, torch.logsumexp(s, -1)
    return p @ v


def seq_reference(q, k, v, start, n, left, **kw):
    """Outputs of the queries start..start+n-1 of ONE sequence (q (Hq, T, D), k/v (Hkv, T, D),
    position = index): causal, and a window of ``left`` keys before the query (None: unbounded)."""
    qpos = torch.arange(start, start + n).view(-1, 1)
    j = torch.arange(start + n).view(1, -1)
    vis = j <= qpos
    if left is not None:
        vis &= j >= qpos - left
    out = ref_attention(q[None, :, start : start + n].double(), k[None, :, : start + n].double(),
                        v[None, :, : start + n].double(), vis[None, None], **kw)  # fmt: skip
    return tuple(x[0] for x in out) if isinstance(out, tuple) else out[0]


class Req:
    """One request: its queries/keys/values of every layer for the whole sequence (float32),
    ``prompt`` tokens to prefill then ``T - prompt`` tokens to decode."""

    def __init__(self, g, prompt, gen, layers, hq, hkv, dv=D, dtype=torch.float32):
        self.prompt, self.T, self.done = prompt, prompt + gen, 0
        # values representable in the cache's dtype: the reference sees exactly what the cache holds
        self.q = torch.randn(layers, hq, self.T, D, generator=g).to(dtype).float()
        self.k = torch.randn(layers, hkv, self.T, D, generator=g).to(dtype).float()
        self.v = torch.randn(layers, hkv, self.T, dv, generator=g).to(dtype).float()


def next_count(req, rnd, chunk_max, spec_max=16, p1=0.55):
    """Prefill in chunks of 1..chunk_max, then decode: 1 token (probability p1), or a speculative
    chunk of 2..spec_max."""
    if req.done < req.prompt:
        return min(req.prompt - req.done, rnd.randint(1, chunk_max))
    n = 1 if rnd.random() < p1 else rnd.randint(2, spec_max)
    return min(n, req.T - req.done)


def _check_out(got, req, layer, n, left, tol, score_kw, where, lse=None):
    if n == 0:
        return
    want = seq_reference(req.q[layer], req.k[layer], req.v[layer], req.done, n, left, lse=lse is not None, **score_kw)
    if lse is not None:
        want, want_lse = want
        err = (lse.double() - want_lse).abs().max().item()
        assert err < tol, f"{where}: lse max |diff| {err:.3e}"
    err = (got.double() - want).abs().max().item()
    assert err < tol, f"{where}: max |diff| {err:.3e}"


# ------------------------------------------------------------------------ paged continuous batching


def drive_paged(*, backend, window, page_size, layout, hq=4, hkv=2, layers=2, nreq=24, running_max=6, seed=0,
                mask_left=None, score_kw=None, tol=5e-6, chunk_max=20, gen=(4, 40), p1=0.55, p_idle=0.0, dv=D,
                return_lse=False, dtype=torch.float32):  # fmt: skip
    """Continuous batching on a PagedKVCache; returns statistics of what the run exercised."""
    rnd, g = random.Random(seed), torch.Generator().manual_seed(seed)
    score_kw = score_kw or {}
    score = None
    if score_kw:
        score = []
        if "cap" in score_kw:
            score.append(aa.softcap(score_kw["cap"]))
        if "sink" in score_kw:
            score.append(aa.sink(score_kw["sink"].float()))
    left = mask_left if mask_left is not None else (None if window is None else window - 1)
    mask = aa.causal() if left is None else aa.sliding_window(left)
    max_T = 60 + gen[1]
    per_seq = -(-max_T // page_size)
    pages = running_max * per_seq  # enough for the running set, far fewer than all requests need
    cache = aa.PagedKVCache(pages, page_size, hkv, D, layers=layers, window=window, value_dim=dv, dtype=dtype)
    # a pool that has served before: every page handed out once and given back in random order, so
    # the free list (and with it the block tables below) is scrambled
    warm = [cache.add_sequence() for _ in range(pages)]
    cache.step(warm, 1, layout="packed")
    rnd.shuffle(warm)
    for s in warm:
        cache.release(s)
    assert cache.free_pages == pages
    waiting = [Req(g, rnd.randint(3, 60), rnd.randint(*gen), layers, hq, hkv, dv, dtype) for _ in range(nreq)]
    running: dict[int, Req] = {}
    owners: dict[int, set] = {}
    stats = dict(steps=0, nonmono=0, evicted=0, reused=0, spec=0, mixed=0, rows=0, packed=0)
    while waiting or running:
        while waiting and len(running) < running_max:
            running[cache.add_sequence()] = waiting.pop(0)
        seqs = list(running)
        rnd.shuffle(seqs)  # the step's order is not the admission order
        counts = [0 if rnd.random() < p_idle else next_count(running[s], rnd, chunk_max, p1=p1) for s in seqs]
        if not any(counts):
            counts[0] = 1
        lay = layout if layout != "mixed" else rnd.choice(["rows", "packed"])
        q_len = None
        if lay == "packed" and rnd.random() < 0.5:
            q_len = sum(counts) + rnd.randint(1, 6)
        step = cache.step(seqs, counts, layout=lay, q_len=q_len)
        stats["steps"] += 1
        stats[lay] += 1
        stats["mixed"] += len(set(counts)) > 1
        stats["spec"] += any(running[s].done >= running[s].prompt and c > 1 for s, c in zip(seqs, counts))
        # positions: the absolute positions of the new tokens
        if lay == "rows":
            Sq = max(counts)
            want_pos = [[running[s].done + t if t < c else 0 for t in range(Sq)] for s, c in zip(seqs, counts)]
        else:
            Sq = sum(counts) if q_len is None else q_len
            flat = [running[s].done + t for s, c in zip(seqs, counts) for t in range(c)]
            want_pos = [flat + [0] * (Sq - len(flat))]
        assert step.positions.tolist() == want_pos
        for layer in range(layers):
            R = len(seqs) if lay == "rows" else 1
            q = torch.full((R, hq, Sq, D), GARBAGE, dtype=dtype)
            kn = torch.full((R, hkv, Sq, D), float("nan"), dtype=dtype)  # padding keys are documented as not stored
            vn = torch.full((R, hkv, Sq, dv), float("nan"), dtype=dtype)
            at = 0
            for r, (s, c) in enumerate(zip(seqs, counts)):
                req = running[s]
                row, a = (r, 0) if lay == "rows" else (0, at)
                q[row, :, a : a + c] = req.q[layer, :, req.done : req.done + c]
                kn[row, :, a : a + c] = req.k[layer, :, req.done : req.done + c]
                vn[row, :, a : a + c] = req.v[layer, :, req.done : req.done + c]
                at += c
            out = aa.attention(q, kv=step.write(layer, kn, vn), mask=mask, score=score, backend=backend, return_lse=return_lse)
            if return_lse:
                out, lse = out
            at = 0
            for r, (s, c) in enumerate(zip(seqs, counts)):
                row, a = (r, 0) if lay == "rows" else (0, at)
                _check_out(out[row, :, a : a + c], running[s], layer, c, left, tol, score_kw,
                           f"step {stats['steps']} seq {s} layer {layer} ({lay})",
                           lse[row, :, a : a + c] if return_lse else None)  # fmt: skip
                if lay == "rows":
                    assert torch.equal(out[r, :, c:], torch.zeros_like(out[r, :, c:])), "row padding queries"
                at += c
            if lay == "packed":
                assert torch.equal(out[0, :, at:], torch.zeros_like(out[0, :, at:])), "q_len padding queries"
        # bookkeeping and memory accounting
        live = 0
        for s, c in zip(seqs, counts):
            req = running[s]
            req.done += c
            assert cache.length(s) == req.done
            table = cache.pages_of(s)
            assert len(table) == -(-req.done // page_size)
            real = [p for p in table if p]
            stats["evicted"] += len(real) < len(table)
            if window is not None:  # evicted at the step: the pages wholly before its first query's window
                assert all(p == 0 for p in table[: max(0, req.done - c - (window - 1)) // page_size])
            if real != sorted(real):
                stats["nonmono"] += 1
            for p in real:
                owners.setdefault(p, set()).add(s)
            assert 0 not in real and len(set(real)) == len(real)
        for s in running:
            live += sum(1 for p in cache.pages_of(s) if p)
        assert live + cache.free_pages == pages, "pages leaked or double-counted"
        all_live = [p for s in running for p in cache.pages_of(s) if p]
        assert len(all_live) == len(set(all_live)), "a page is in two tables"
        for s in [s for s in seqs if running[s].done == running[s].T]:
            cache.release(s)
            del running[s]
    assert cache.free_pages == pages and cache.sequences == ()
    stats["reused"] = sum(len(o) > 1 for o in owners.values())
    return stats


@pytest.mark.parametrize(
    "backend,window,page_size,layout",
    [
        ("eager", None, 16, "mixed"),
        ("sdpa", None, 48, "packed"),  # 48: not a power of 2, divides none of the lengths on purpose
        ("sdpa", 7, 16, "mixed"),  # a window of 7: pages evicted every few steps
        ("eager", 20, 16, "rows"),
        ("auto", 7, 32, "packed"),
        ("flex", 7, 16, "rows"),  # rows of <= 16 queries: flex's unfused path on CPU (no 20 s compile)
    ],
)
def test_paged_continuous_batching_equals_full_history(backend, window, page_size, layout):
    st = drive_paged(backend=backend, window=window, page_size=page_size, layout=layout, seed=page_size + (window or 0),
                     chunk_max=16 if backend == "flex" else 20)  # fmt: skip
    assert st["reused"] > 0 and st["spec"] > 0, st
    if page_size <= 32:
        assert st["nonmono"] > 0, st
    if window is not None and window < 20:
        assert st["evicted"] > 5, st
    if layout == "mixed":
        assert st["rows"] and st["packed"] and st["mixed"], st


def test_paged_continuous_batching_mqa_narrower_window_sink_softcap():
    """MQA (Hkv=1, Hq=6: a group that is not a power of 2), a mask window narrower than the cache's,
    learned sinks and softcap on every step (eager: sdpa refuses sinks)."""
    sink = torch.tensor([0.3, -1.0, 2.0, 0.0, 1.5, -0.5])
    st = drive_paged(backend="auto", window=9, page_size=16, layout="mixed", hq=6, hkv=1, seed=11, mask_left=4,
                     score_kw=dict(sink=sink.double(), cap=4.0))  # fmt: skip
    assert st["evicted"] > 5 and st["reused"] > 0, st


@pytest.mark.parametrize("backend,window", [("sdpa", None), ("sdpa", 5), ("eager", 1)])
def test_paged_long_decode_chains_with_idle_sequences(backend, window):
    """Long decode chains (40..120 generated tokens per request, 80% single-token steps), a
    running sequence sitting out a step now and then (0 new tokens: a document / row without
    queries), values of another head dim (value_dim=8), 16-token pages; window=1: each query sees
    only itself."""
    st = drive_paged(backend=backend, window=window, page_size=16, layout="mixed", nreq=10, gen=(40, 120), p1=0.8,
                     p_idle=0.1, dv=8, seed=21 + (window or 0), running_max=3)  # fmt: skip
    assert st["steps"] > 100 and st["reused"] > 0 and st["nonmono"] > 0, st
    if window:
        assert st["evicted"] > 100, st


@pytest.mark.parametrize("backend", ["sdpa", "eager"])
def test_paged_bfloat16_chain(backend):
    """A bfloat16 pool (what an engine runs): every step within bf16 accuracy of float64."""
    drive_paged(backend=backend, window=6, page_size=16, layout="mixed", nreq=10, seed=31, dtype=torch.bfloat16, tol=2e-2)


def test_paged_lse_through_the_cache_equals_the_reference():
    """``return_lse=True`` on cache calls (eager): the log-sum-exp of every query's visible scores."""
    drive_paged(backend="eager", window=6, page_size=16, layout="mixed", nreq=8, seed=4, return_lse=True, p_idle=0.1)


# ------------------------------------------------------------------- contiguous continuous batching


def drive_contiguous(*, backend, window, capacity, batch=4, hq=4, hkv=2, layers=2, nreq=16, seed=0, tol=5e-6):
    """Continuous batching on a ContiguousKVCache: row b serves one request at a time; a finished
    row idles a step (0 new tokens) and is reset for the next request; rows of different counts
    (right-padded queries). With a window, rows are compacted whenever they fill up."""
    rnd, g = random.Random(seed), torch.Generator().manual_seed(seed)
    left = None if window is None else window - 1
    mask = aa.causal() if left is None else aa.sliding_window(left)
    cache = aa.ContiguousKVCache(batch, capacity, hkv, D, layers=layers, window=window)
    waiting = [Req(g, rnd.randint(3, 50), rnd.randint(4, 40), layers, hq, hkv) for _ in range(nreq)]
    if window is None:
        assert max(r.T for r in waiting) <= capacity
    rows: list = [None] * batch
    stats = dict(steps=0, compactions=0, idle=0, joined=0)
    spec_max = 16 if window is None else min(16, capacity - left)
    while waiting or any(rows):
        counts = []
        for b in range(batch):
            if rows[b] is None and waiting and rnd.random() < 0.7:  # a new request joins this row
                rows[b] = waiting.pop(0)
                cache.reset([b])
                stats["joined"] += 1
            if rows[b] is None:
                counts.append(0)
                continue
            cmax = 20 if window is None else capacity - left
            counts.append(min(next_count(rows[b], rnd, cmax, spec_max), cmax))
        if not any(counts):
            continue
        offsets = list(cache.offsets)
        step = cache.step(counts)
        stats["steps"] += 1
        stats["idle"] += 0 in counts
        stats["compactions"] += sum(a != b for a, b in zip(offsets, cache.offsets))
        Sq = max(counts)
        assert step.positions.tolist() == [[rows[b].done + t if t < c else 0 for t in range(Sq)] if rows[b] else [0] * Sq
                                           for b, c in enumerate(counts)]  # fmt: skip
        for layer in range(layers):
            q = torch.full((batch, hq, Sq, D), GARBAGE)
            kn = torch.full((batch, hkv, Sq, D), float("nan"))
            vn = torch.full((batch, hkv, Sq, D), float("nan"))
            for b, c in enumerate(counts):
                if c:
                    r = rows[b]
                    q[b, :, :c] = r.q[layer, :, r.done : r.done + c]
                    kn[b, :, :c] = r.k[layer, :, r.done : r.done + c]
                    vn[b, :, :c] = r.v[layer, :, r.done : r.done + c]
            out = aa.attention(q, kv=step.write(layer, kn, vn), mask=mask, backend=backend)
            for b, c in enumerate(counts):
                if c:
                    _check_out(out[b, :, :c], rows[b], layer, c, left, tol, {}, f"step {stats['steps']} row {b} layer {layer}")
                assert torch.equal(out[b, :, c:], torch.zeros_like(out[b, :, c:])), f"padding queries of row {b}"
        for b, c in enumerate(counts):
            if c:
                rows[b].done += c
                assert cache.offsets[b] + cache.lengths[b] == rows[b].done and cache.lengths[b] <= capacity
                if rows[b].done == rows[b].T:
                    rows[b] = None
    return stats


@pytest.mark.parametrize(
    "backend,window,capacity",
    [("eager", None, 96), ("sdpa", None, 96), ("sdpa", 6, 21), ("eager", 6, 21), ("auto", 9, 24), ("sdpa", 17, 32),
     ("eager", 1, 12), ("flex", 6, 21)],  # window 1: a query sees only itself; flex: <= 16 queries, unfused on CPU
)
def test_contiguous_continuous_batching_equals_full_history(backend, window, capacity):
    st = drive_contiguous(backend=backend, window=window, capacity=capacity, seed=capacity + (window or 0))
    assert st["joined"] == 16 and st["idle"] > 0, st
    if window is not None:
        assert st["compactions"] > 10, st


# ------------------------------------------------------------------ documents(q_lengths, kv=k_lengths)


def docs_visibility(ql_rows, kl_rows, Sq, Sk, *, causal=False, left=None, right=None):
    """(B, 1, Sq, Sk) bool, index by index from docs/serving.md: document n's queries see document
    n's keys; query i of document n sits at key position i' = i + kv_end[n] - q_end[n]; causal:
    j <= i'; window: i' - left <= j <= i' + right; queries/keys past the documents: nothing."""
    B = len(ql_rows)
    vis = torch.zeros(B, 1, Sq, Sk, dtype=torch.bool)
    for b, (ql, kl) in enumerate(zip(ql_rows, kl_rows)):
        qs = ks = 0
        for nq, nk in zip(ql, kl):
            qe, ke = qs + nq, ks + nk
            for i in range(qs, qe):
                ip = i + ke - qe
                for j in range(ks, ke):
                    ok = (not causal or j <= ip) and (left is None or j >= ip - left) and (right is None or j <= ip + right)
                    vis[b, 0, i, j] = ok
            qs, ks = qe, ke
    return vis


# (query lengths per row, key lengths per row, extra queries, extra keys): Sq = max row sum + extra
DOC_LAYOUTS = {
    "empty-q-empty-k-q>k": ([[0, 3, 2, 4]], [[2, 0, 5, 1]], 1, 2),
    "all-q>k": ([[5, 3]], [[2, 1]], 0, 0),
    "ragged-rows": ([[2, 0, 6], [1, 1]], [[3, 3, 2], [0, 7]], 2, 1),
    "decode+prefill+empty": ([[1, 1, 7, 0, 1]], [[9, 4, 7, 3, 1]], 3, 0),
}

DOC_MASKS = {
    "cross": dict(),
    "causal": dict(causal=True),
    "window2": dict(causal=True, left=2, right=0),
    "window2+1": dict(left=2, right=1),  # looks one key ahead: a query just before its document's keys sees the first
    "window0": dict(causal=True, left=0, right=0),
}


def _doc_term(ql, kl, spec, tensors):
    if tensors:  # (B, N) tensors (ragged rows padded with zero-length documents by hand)
        N = max(len(r) for r in ql)
        ql = torch.tensor([r + [0] * (N - len(r)) for r in ql])
        kl = torch.tensor([r + [0] * (N - len(r)) for r in kl])
    elif len(ql) == 1:
        ql, kl = ql[0], kl[0]
    m = aa.documents(ql, kv=kl)
    if spec.get("left") is not None or spec.get("right") not in (None, 0):
        m = m & aa.sliding_window(spec.get("left"), spec.get("right"))
    elif spec.get("causal"):
        m = m & aa.causal()
    return m


def _doc_case(layout, mask_name, sink, cap, backend, tensors=False, dtype=torch.float64):
    ql, kl, eq, ek = DOC_LAYOUTS[layout]
    spec = DOC_MASKS[mask_name]
    B = len(ql)
    Sq, Sk = max(sum(r) for r in ql) + eq, max(sum(r) for r in kl) + ek
    g = torch.Generator().manual_seed(len(layout) * 7 + len(mask_name))
    q = torch.randn(B, 4, Sq, D, generator=g, dtype=torch.float64)
    k = torch.randn(B, 2, Sk, D, generator=g, dtype=torch.float64)
    v = torch.randn(B, 2, Sk, D, generator=g, dtype=torch.float64)
    s = torch.tensor([0.5, -1.0, 1.5, 0.0], dtype=torch.float64) if sink else None
    w = torch.randn(B, 4, Sq, D, generator=g, dtype=torch.float64)
    vis = docs_visibility(ql, kl, Sq, Sk, **spec)
    ref_in = [t.clone().requires_grad_(True) for t in (q, k, v)] + ([s.clone().requires_grad_(True)] if sink else [])
    want = ref_attention(*ref_in[:3], vis, sink=ref_in[3] if sink else None, cap=cap)
    (want * w).sum().backward()
    ours_in = [t.to(dtype).requires_grad_(True) for t in (q, k, v)] + ([s.to(dtype).requires_grad_(True)] if sink else [])
    score = ([aa.softcap(cap)] if cap else []) + ([aa.sink(ours_in[3])] if sink else [])
    got = aa.attention(*ours_in[:3], mask=_doc_term(ql, kl, spec, tensors), score=score or None, backend=backend)
    (got * w.to(dtype)).sum().backward()
    tol = 1e-10 if dtype == torch.float64 else 2e-5
    torch.testing.assert_close(got.double(), want, atol=tol, rtol=0)
    for a, b, name in zip(ours_in, ref_in, "qkvs"):
        torch.testing.assert_close(a.grad.double(), b.grad, atol=tol * 10, rtol=0, msg=lambda m, name=name: f"d{name}: {m}")
    # rows that see no key: exactly 0 (with or without a sink), their gradients too
    blind = ~vis.any(-1)  # (B, 1, Sq)
    assert blind.any() or mask_name == "cross" or layout == "decode+prefill+empty"
    assert torch.equal(got.detach()[blind.expand(B, 4, Sq)], torch.zeros_like(got.detach()[blind.expand(B, 4, Sq)]))
    return vis


@pytest.mark.parametrize("mask_name", list(DOC_MASKS))
@pytest.mark.parametrize("layout", list(DOC_LAYOUTS))
@pytest.mark.parametrize("backend", ["eager", "sdpa"])
def test_documents_with_kv_layout_forward_backward_float64(backend, layout, mask_name):
    _doc_case(layout, mask_name, sink=False, cap=None, backend=backend)


@pytest.mark.parametrize("mask_name", ["causal", "window2+1", "cross"])
@pytest.mark.parametrize("layout", list(DOC_LAYOUTS))
def test_documents_with_kv_layout_sink_and_softcap(layout, mask_name):
    """Sinks need the eager path on CPU (sdpa refuses: no lse); auto must pick it."""
    with record_calls() as seen:
        _doc_case(layout, mask_name, sink=True, cap=3.0, backend="auto")
    assert {c.backend for c in seen} == {"eager"}


@pytest.mark.parametrize("backend", ["eager", "sdpa"])
def test_documents_with_kv_layout_tensor_lengths_float32(backend):
    """(B, N) tensor lengths, float32 against the float64 reference."""
    _doc_case("ragged-rows", "window2+1", sink=False, cap=None, backend=backend, tensors=True, dtype=torch.float32)
    _doc_case("empty-q-empty-k-q>k", "causal", sink=False, cap=None, backend=backend, tensors=True, dtype=torch.float32)


def test_documents_q_longer_than_k_semantics_spelled_out():
    """docs/serving.md: 'A document with more queries than keys has queries before its first key
    (they see nothing under causal())'; without causal() every query of document n sees every key
    of document n. 5 queries on 2 keys: queries 0..2 sit before key 0."""
    vis = docs_visibility([[5]], [[2]], 5, 2, causal=True)[0, 0]
    assert vis.tolist() == [[False, False]] * 3 + [[True, False], [True, True]]
    q = torch.randn(1, 2, 5, D, dtype=torch.float64)
    k = torch.randn(1, 2, 2, D, dtype=torch.float64)
    out, lse = aa.attention(q, k, k, mask=aa.documents([5], kv=[2]) & aa.causal(), return_lse=True)
    assert torch.equal(out[0, :, :3], torch.zeros_like(out[0, :, :3])) and torch.isinf(lse[0, :, :3]).all()
    s = torch.tensor([0.25, -2.0], dtype=torch.float64)
    out, lse = aa.attention(q, k, k, mask=aa.documents([5], kv=[2]) & aa.causal(), score=aa.sink(s), return_lse=True)
    assert torch.equal(out[0, :, :3], torch.zeros_like(out[0, :, :3]))
    torch.testing.assert_close(lse[0, :, :3].double(), s.view(2, 1).expand(2, 3), atol=1e-6, rtol=0)  # lse = sink[h]
    cross = aa.attention(q, k, k, mask=aa.documents([5], kv=[2]))
    want = ref_attention(q, k, k, torch.ones(1, 1, 5, 2, dtype=torch.bool))
    torch.testing.assert_close(cross, want, atol=1e-12, rtol=0)


# ------------------------------------------------------------------------------- cache errors


def _snapshot(cache):
    """Everything observable about a cache: its storage and its bookkeeping."""
    st = [t.clone() for t in cache.k + cache.v]
    if isinstance(cache, aa.PagedKVCache):
        book = (cache.free_pages, {s: (cache.length(s), cache.pages_of(s)) for s in cache.sequences})
    else:
        book = (list(cache.lengths), list(cache.offsets))
    return st, book


def _unchanged(cache, snap):
    st, book = _snapshot(cache)
    assert book == snap[1], f"bookkeeping changed: {snap[1]} -> {book}"
    for a, b in zip(st, snap[0]):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True, msg="storage changed")


def _filled_paged(window=None):
    g = torch.Generator().manual_seed(5)
    cache = aa.PagedKVCache(6, 16, 2, D, layers=2, window=window)
    a, b = cache.add_sequence(), cache.add_sequence()
    step = cache.step([a, b], [21, 40], layout="packed")
    for layer in range(2):
        step.write(layer, torch.randn(1, 2, 61, D, generator=g), torch.randn(1, 2, 61, D, generator=g))
    return cache, a, b


def test_paged_errors_name_the_argument_and_leave_the_cache_unchanged():
    cache, a, b = _filled_paged()
    snap = _snapshot(cache)
    bad_steps = [
        (dict(seqs=[a], new_tokens=[60]), r"new_tokens: expected at most the free pages \(1 of 6"),  # past capacity
        (dict(seqs=[a, b], new_tokens=[1]), r"new_tokens: expected one count per sequence \(2\)"),
        (dict(seqs=[a, b], new_tokens=[1, -1]), r"new_tokens: expected non-negative counts"),
        (dict(seqs=[a, a], new_tokens=1), r"seqs: expected distinct sequence ids"),
        (dict(seqs=[a, 99], new_tokens=1), r"seq: expected a live sequence id"),
        (dict(seqs=[], new_tokens=1), r"seqs: expected at least one sequence id"),
        (dict(seqs=[a], new_tokens=2, layout="columns"), r"layout: expected 'rows' or 'packed'"),
    ]
    for kw, msg in bad_steps:
        with pytest.raises(ValueError, match=msg):
            cache.step(kw.pop("seqs"), kw.pop("new_tokens"), **kw)
        _unchanged(cache, snap)
    step = cache.step([a, b], 1)  # a valid step, then bad writes to it
    snap = _snapshot(cache)
    good = torch.randn(2, 2, 1, D)
    bad_writes = [
        ((2, good, good), ValueError, r"layer: expected a layer index in \[0, 2\)"),  # a 3-layer model on a 2-layer cache
        ((-1, good, good), ValueError, r"layer: expected a layer index in \[0, 2\)"),
        ((0, torch.randn(2, 4, 1, D), good), ValueError, r"k_new: expected shape \(rows, Hkv, Sq, D\) = \(2, 2, 1, 16\)"),
        ((0, good, torch.randn(2, 1, 1, D)), ValueError, r"v_new: expected shape"),  # k fine, v wrong: nothing written
        ((0, good, torch.randn(2, 2, 1, D, device="meta")), ValueError, r"v_new: expected the cache's device cpu"),
        ((0, good, good[..., :8]), ValueError, r"v_new: expected shape"),
        ((0, good.numpy(), good), TypeError, r"k_new: expected a torch.Tensor"),
    ]
    for args, exc, msg in bad_writes:
        with pytest.raises(exc, match=msg):
            step.write(*args)
        _unchanged(cache, snap)
    # freed sequences: every way of reaching one raises, naming it
    cache.release(a)
    for fn in (lambda: cache.release(a), lambda: cache.step([a], 1), lambda: cache.pages_of(a), lambda: cache.length(a)):
        with pytest.raises(ValueError, match=r"seq: expected a live sequence id of this cache"):
            fn()


def test_paged_step_with_a_too_short_q_len_leaves_the_cache_unchanged():
    """``step(..., layout="packed", q_len=T-1)`` raised ``q_len`` only after the pages were
    allocated and the length advanced (a retry saw phantom zero keys); it now checks first."""
    cache, a, b = _filled_paged()
    snap = _snapshot(cache)
    with pytest.raises(ValueError, match=r"q_len: expected at least the 5 new tokens"):
        cache.step([a, b], [3, 2], layout="packed", q_len=4)
    _unchanged(cache, snap)


def test_a_failed_paged_step_on_a_windowed_cache_keeps_every_sequence_readable():
    """Out of pages on a windowed cache: the step raises after evicting the pages that lie before
    the window (pages no query can see again). The sequences' keys and lengths stay as they were,
    and a smaller retry gives the same attention as without the failed step."""
    cache, a, b = _filled_paged(window=8)
    lengths = (cache.length(a), cache.length(b))
    with pytest.raises(ValueError, match=r"new_tokens: expected at most the free pages"):
        cache.step([a, b], [100, 100], layout="packed")
    assert (cache.length(a), cache.length(b)) == lengths
    step = cache.step([a, b], 1)
    q = torch.randn(2, 4, 1, D)
    out = aa.attention(q, kv=step.write(0, q[:, :2], q[:, :2]), mask=aa.sliding_window(7))
    assert torch.isfinite(out).all()


def test_contiguous_errors_name_the_argument_and_leave_the_cache_unchanged():
    g = torch.Generator().manual_seed(2)
    cache = aa.ContiguousKVCache(2, 16, 2, D, layers=2)
    st = cache.step([14, 10])
    for layer in range(2):
        st.write(layer, torch.randn(2, 2, 14, D, generator=g), torch.randn(2, 2, 14, D, generator=g))
    snap = _snapshot(cache)
    for bad, msg in [([1, 7], r"new_tokens: expected at most 6 more tokens in row 1"), ([1], "one count per sequence"),
                     (3, "at most 2 more tokens in row 0"), ([1, -1], "non-negative"), (1.0, "new_tokens: expected an int")]:  # fmt: skip
        with pytest.raises((ValueError, TypeError), match=msg):
            cache.step(bad)
        _unchanged(cache, snap)


def test_contiguous_windowed_step_that_fails_on_a_later_row_leaves_earlier_rows_unchanged():
    """A windowed ContiguousKVCache compacted rows one by one inside ``step`` and raised when a
    later row asked for more than ``capacity - (window - 1)`` tokens: row 0 had been compacted
    (its offset moved) while its length was not updated, and the next valid step reported
    positions shifted by the compaction. Every row is now checked before any is compacted."""
    cache = aa.ContiguousKVCache(2, 16, 1, D, window=5)
    k = torch.randn(2, 1, 14, D)
    cache.step([14, 10]).write(0, k, k)
    snap = _snapshot(cache)
    with pytest.raises(ValueError, match=r"new_tokens: expected at most capacity - \(window - 1\) = 12 in one step"):
        cache.step([4, 13])
    try:
        _unchanged(cache, snap)
    finally:
        step = cache.step([4, 1])  # what an engine does next: a smaller, valid step
        assert step.positions[0].tolist() == [14, 15, 16, 17], step.positions[0].tolist()


def test_memory_accounting_with_a_value_dim_and_across_steps():
    """memory_bytes: K (head_dim) and V (value_dim) of every layer, the null page included; it is
    what was allocated up front and does not move while sequences come and go."""
    p = aa.PagedKVCache(10, 32, 2, 16, layers=3, value_dim=8, dtype=torch.bfloat16)
    assert p.memory_bytes() == 3 * 11 * 32 * 2 * (16 + 8) * 2
    c = aa.ContiguousKVCache(2, 50, 2, 16, layers=3, value_dim=8, dtype=torch.float16)
    assert c.memory_bytes() == 3 * 2 * 50 * 2 * (16 + 8) * 2
    s = p.add_sequence()
    p.step([s], 300)
    assert p.free_pages == 0 and p.memory_bytes() == 3 * 11 * 32 * 2 * (16 + 8) * 2
    with pytest.raises(ValueError, match=r"new_tokens: expected at most the free pages \(0 of 10, 0 more past the window\)"):
        p.step([s], 21)
    p.release(s)
    assert p.free_pages == 10


def test_write_refuses_keys_of_another_dtype_as_attention_refuses_queries():
    """``step.write`` stored float64, int64 or bool keys into a float32 cache by casting, while
    ``attention`` refuses a q whose dtype is not the cache's: both now refuse, and a refused
    write changes nothing."""
    cache = aa.PagedKVCache(4, 16, 2, D)
    s = cache.add_sequence()
    step = cache.step([s], 2)
    for dt in (torch.float64, torch.bfloat16, torch.int64, torch.bool):
        bad = torch.ones(1, 2, 2, D, dtype=dt)
        with pytest.raises(ValueError, match=rf"k_new: expected the cache's dtype torch.float32, got dtype {dt}"):
            step.write(0, bad, bad)
    assert not cache.k[0].any() and not cache.v[0].any()
    with pytest.raises(ValueError, match=r"q: expected the cache's dtype torch.float32"):
        aa.attention(torch.randn(1, 4, 2, D, dtype=torch.float64), kv=step.view(0), mask=aa.causal())


@pytest.mark.parametrize("kind", ["paged", "contiguous"])
def test_a_stale_step_cannot_write_over_a_newer_sequence(kind):
    """A step kept past a release() / reset() (or a later step of its sequences) wrote into slots
    that another sequence may own by then, silently. Its write now raises, naming the step; a
    step made for other sequences in between stays valid (two reservations, then two writes)."""
    if kind == "paged":
        cache = aa.PagedKVCache(1, 16, 1, D)
        a = cache.add_sequence()
        old = cache.step([a], 4)
        cache.release(a)
        b = cache.add_sequence()
        cache.step([b], 3).write(0, *(torch.ones(1, 1, 3, D),) * 2)  # b now owns a's page
        keys = cache.k[0].clone()
        with pytest.raises(ValueError, match=r"step: expected the latest step of its sequences"):
            old.write(0, *(torch.zeros(1, 1, 4, D),) * 2)
        assert torch.equal(cache.k[0], keys)
        c2 = aa.PagedKVCache(4, 16, 1, D)
        x, y = c2.add_sequence(), c2.add_sequence()
        sx, sy = c2.step([x], 2), c2.step([y], 3)
        sx.write(0, *(torch.ones(1, 1, 2, D),) * 2)
        sy.write(0, *(torch.ones(1, 1, 3, D),) * 2)
    else:
        cache = aa.ContiguousKVCache(1, 16, 1, D)
        old = cache.step(4)
        cache.reset()
        with pytest.raises(ValueError, match=r"step: expected the latest step of its sequences"):
            old.write(0, *(torch.zeros(1, 1, 4, D),) * 2)
        cache.step(4).write(0, *(torch.ones(1, 1, 4, D),) * 2)
        later = cache.step(1)
        with pytest.raises(ValueError, match=r"step: expected the latest step"):
            old.write(0, *(torch.zeros(1, 1, 4, D),) * 2)
        later.write(0, *(torch.ones(1, 1, 1, D),) * 2)


# ---------------------------------------------------------------- stale contents of reused storage


@pytest.mark.parametrize("which", ["k", "v"])
@pytest.mark.parametrize("backend", ["eager", "sdpa"])
@pytest.mark.parametrize("kind", ["paged", "contiguous"])
def test_a_finished_requests_non_finite_values_do_not_reach_the_next_one(kind, backend, which):
    """docs/serving.md: 'Storage is zero-initialized: a masked slot is multiplied by 0 on some
    backends, and NaN garbage would leak.' ``release`` / ``reset`` handed the storage to the next
    request without clearing it (fixed: slots are zeroed when handed out), so a request whose keys or values overflowed (inf / NaN, e.g. in
    fp16) poisons every later request that gets its page / row: the slots past the new request's
    keys are masked, yet eager (values) and sdpa (keys and values) multiply them by 0."""
    bad = torch.full((1, 1, 16, D), float("nan"))
    ok = torch.randn(1, 1, 16, D)
    k_old, v_old = (bad, ok) if which == "k" else (ok, bad)
    if kind == "paged":
        cache = aa.PagedKVCache(1, 16, 1, D)
        old = cache.add_sequence()
        cache.step([old], 16).write(0, k_old, v_old)
        cache.release(old)
        new = cache.add_sequence()
        step = cache.step([new], 3)
    else:
        cache = aa.ContiguousKVCache(1, 16, 1, D)
        cache.step(16).write(0, k_old, v_old)
        cache.reset([0])
        step = cache.step(3)
    x = torch.randn(1, 1, 3, D, dtype=torch.float64).float()
    out = aa.attention(x, kv=step.write(0, x, x), mask=aa.causal(), backend=backend)
    want = seq_reference(x[0], x[0], x[0], 0, 3, None)
    assert torch.isfinite(out).all(), "the previous request's NaN reached the new one"
    assert (out[0].double() - want).abs().max() < 1e-6


# ------------------------------------------------------------------------------ HF generate()

VOCAB = 101


def _hf_model(name, impl, seed=0):
    transformers = pytest.importorskip("transformers")
    import anyattn.hf

    anyattn.hf.register()
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, bos_token_id=None, eos_token_id=None, pad_token_id=0)  # fmt: skip
    if name == "llama":
        cfg, cls = transformers.LlamaConfig(**common), transformers.LlamaForCausalLM
    elif name == "qwen2":  # layer 0 full attention, layer 1 a window of 4 (max_window_layers=1)
        cfg = transformers.Qwen2Config(**common, use_sliding_window=True, sliding_window=4, max_window_layers=1)
        cls = transformers.Qwen2ForCausalLM
    else:  # gemma2: alternating sliding (window 4) / global layers, attention softcap, query_pre_attn_scalar
        cfg = transformers.Gemma2Config(**common, head_dim=16, sliding_window=4, attn_logit_softcapping=5.0,
                                        final_logit_softcapping=30.0, query_pre_attn_scalar=16)  # fmt: skip
        cls = transformers.Gemma2ForCausalLM
    torch.manual_seed(seed)
    return cls._from_config(cfg, attn_implementation=impl).eval()


def _pair_hf(name):
    ref = _hf_model(name, "eager")
    ours = _hf_model(name, "anyattn")
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def _left_padded(seed=3, S=7):
    """Rows of 7, 4 and 1 real tokens (left padding): the last row is padding except 1 token."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (3, S), generator=g)
    am = torch.ones(3, S, dtype=torch.long)
    for b, n in enumerate([S, 4, 1]):
        am[b, : S - n] = 0
        ids[b, : S - n] = 0
    return ids, am


def _generate_both(name, **kw):
    ref, ours = _pair_hf(name)
    ids, am = _left_padded()
    out = []
    with torch.no_grad(), record_calls() as seen:
        for m in (ref, ours):
            if kw.get("do_sample"):
                torch.manual_seed(1234)
            out.append(m.generate(ids, attention_mask=am, max_new_tokens=12, pad_token_id=0, **kw))
    return out, seen


@pytest.mark.parametrize("name", ["llama", "qwen2", "gemma2"])
def test_hf_greedy_generation_left_padded_with_a_one_token_row(name):
    (want, got), seen = _generate_both(name, do_sample=False)
    assert torch.equal(want, got), (want, got)
    assert any(c.q_shape[2] == 1 for c in seen)  # the decode steps came through anyattn


@pytest.mark.parametrize("name", ["llama", "qwen2", "gemma2"])
def test_hf_beam_search_equals_eager(name):
    (want, got), _ = _generate_both(name, do_sample=False, num_beams=2)
    assert torch.equal(want, got), (want, got)


@pytest.mark.parametrize("name", ["llama", "gemma2"])
def test_hf_seeded_sampling_equals_eager(name):
    (want, got), _ = _generate_both(name, do_sample=True, top_k=0, temperature=1.0)
    assert torch.equal(want, got), (want, got)


def test_hf_one_token_row_logits_equal_eager_at_every_step():
    """The 1-real-token row's decode logits, step by step, against eager (not only the argmax)."""
    ref, ours = _pair_hf("qwen2")
    ids, am = _left_padded()
    with torch.no_grad():
        outs = [m.generate(ids, attention_mask=am, max_new_tokens=8, do_sample=False, pad_token_id=0,
                           output_logits=True, return_dict_in_generate=True) for m in (ref, ours)]  # fmt: skip
    assert torch.equal(outs[0].sequences, outs[1].sequences)
    for a, b in zip(outs[0].logits, outs[1].logits):
        torch.testing.assert_close(b, a, atol=2e-5, rtol=1e-4)


def _hf_on_cache(model, cache, seqs_ids, schedule, layout):
    """Drive ``model(..., anyattn_kv=step)`` over ``schedule`` (a list of per-sequence new-token
    counts); returns each sequence's logits over all its tokens."""
    done = [0] * len(seqs_ids)
    got = [[] for _ in seqs_ids]
    paged = isinstance(cache, aa.PagedKVCache)
    seqs = [cache.add_sequence() for _ in seqs_ids] if paged else None
    with torch.no_grad():
        for counts in schedule:
            act = [i for i, c in enumerate(counts) if c]
            if paged:
                step = cache.step([seqs[i] for i in act], [counts[i] for i in act], layout=layout)
            else:
                step = cache.step(list(counts))
            if step.layout == "packed":
                ids = torch.cat([seqs_ids[i][done[i] : done[i] + counts[i]] for i in act])[None]
            else:
                rows = act if paged else range(len(counts))
                Sq = step.Sq
                ids = torch.stack([torch.nn.functional.pad(seqs_ids[i][done[i] : done[i] + counts[i]], (0, Sq - counts[i]))
                                   for i in rows])  # fmt: skip
            logits = model(ids, position_ids=step.positions, anyattn_kv=step, use_cache=False).logits
            at = 0
            for r, i in enumerate(act if paged else range(len(counts))):
                c = counts[i]
                if step.layout == "packed":
                    got[i].append(logits[0, at : at + c])
                    at += c
                elif c:
                    got[i].append(logits[r, :c])
                done[i] += c
    return [torch.cat(x) for x in got], done


def test_hf_gemma2_on_a_paged_cache_packed_continuous_batching_equals_eager():
    """Gemma2 (sliding and global layers, softcap) on one PagedKVCache without a window: chunked
    prefill next to decode steps in one packed row; each sequence's logits equal HF eager run on
    the sequence alone."""
    ref, ours = _pair_hf("gemma2")
    g = torch.Generator().manual_seed(8)
    seqs_ids = [torch.randint(1, VOCAB, (20,), generator=g) for _ in range(3)]
    schedule = [[5, 6, 0], [5, 1, 4], [3, 0, 5], [1, 1, 1], [0, 1, 0], [1, 3, 1], [1, 1, 0]]
    cache = aa.PagedKVCache(8, 16, 2, 16, layers=2)
    got, done = _hf_on_cache(ours, cache, seqs_ids, schedule, "packed")
    with torch.no_grad():
        for i, ids in enumerate(seqs_ids):
            want = ref(ids[None, : done[i]], use_cache=False).logits[0]
            torch.testing.assert_close(got[i], want, atol=2e-5, rtol=1e-4, msg=lambda m, i=i: f"sequence {i}: {m}")


@pytest.mark.parametrize("kind", ["paged", "contiguous"])
def test_hf_global_layers_on_a_windowed_cache_raise_or_stay_exact(kind):
    """docs/serving.md: 'A call on a windowed cache must carry sliding_window(l) with l <= W - 1:
    an evicted key would otherwise be silently missing, so anything else raises.' Through
    ``anyattn_kv`` a model whose global layers see the whole context (Gemma2: every other layer)
    on a cache built with Gemma2's window must either raise or give eager's logits. The HF
    attention function narrowed the global layers to the cache's window (no error, different
    logits); it now raises before writing."""
    ref, ours = _pair_hf("gemma2")
    g = torch.Generator().manual_seed(9)
    ids = torch.randint(1, VOCAB, (12,), generator=g)
    if kind == "paged":
        cache = aa.PagedKVCache(8, 16, 2, 16, layers=2, window=4)
    else:
        cache = aa.ContiguousKVCache(1, 8, 2, 16, layers=2, window=4)
    try:
        got, _ = _hf_on_cache(ours, cache, [ids], [[6], [1], [1], [4]], "rows")
    except ValueError as e:
        assert "window" in str(e)
        return
    with torch.no_grad():
        want = ref(ids[None], use_cache=False).logits[0]
    torch.testing.assert_close(got[0], want, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("name", ["llama", "qwen2", "gemma2"])
def test_hf_generate_with_a_static_cache_equals_eager(name):
    """docs/hf.md lists 'a static cache's tensor offsets' among the masks anyattn takes through
    HF's sdpa_mask. With ``cache_implementation="static"`` (a compileable cache) ``generate``
    builds the mask once per step through the registered mask function and hands the returned
    ``HFMask`` back to the model as ``attention_mask``; Llama's ``create_causal_mask`` read
    ``attention_mask.ndim`` (AttributeError). HFMask now answers ndim 4 and the mask builder
    returns it. Models with several layer types (Qwen2, Gemma2) get a dict of masks."""
    (want, got), _ = _generate_both(name, do_sample=False, cache_implementation="static")
    assert torch.equal(want, got), (want, got)


@pytest.mark.parametrize("name", ["llama", "qwen2", "gemma2"])
def test_hf_prompt_lookup_speculative_decoding_equals_eager(name):
    """Prompt-lookup decoding: HF verifies several drafted tokens per step (decode steps with
    Sq > 1 on its cache, then crops the rejected ones): same tokens as eager."""
    ref, ours = _pair_hf(name)
    g = torch.Generator().manual_seed(4)
    base = torch.randint(1, VOCAB, (5,), generator=g)
    ids = torch.cat([base, base, base[:3]])[None]  # repeats: the lookup finds drafts
    with torch.no_grad(), record_calls() as seen:
        want = ref.generate(ids, max_new_tokens=14, do_sample=False, pad_token_id=0, prompt_lookup_num_tokens=3)
        got = ours.generate(ids, max_new_tokens=14, do_sample=False, pad_token_id=0, prompt_lookup_num_tokens=3)
    assert torch.equal(want, got), (want, got)
    assert any(1 < c.q_shape[2] < c.k_shape[2] for c in seen), "no multi-token verification step reached anyattn"


def test_flex_documents_with_kv_layout_empty_documents_and_lookahead_window():
    """The one compiled flex case (~20 s on CPU): a BlockMask built from the terms for a packed
    layout with documents without queries, without keys and with more queries than keys, under
    a window that looks one key ahead; float32 against the float64 reference."""
    ql, kl = [[0, 20, 7, 30, 0]], [[9, 0, 3, 40, 5]]
    Sq, Sk = 57 + 3, 57 + 2
    g = torch.Generator().manual_seed(12)
    q, k, v = (torch.randn(1, h, S, D, generator=g) for h, S in ((4, Sq), (2, Sk), (2, Sk)))
    mask = aa.documents(ql[0], kv=kl[0]) & aa.sliding_window(6, 1)
    got = aa.attention(q, k, v, mask=mask, backend="flex")
    want = ref_attention(q.double(), k.double(), v.double(), docs_visibility(ql, kl, Sq, Sk, left=6, right=1))
    assert (got.double() - want).abs().max().item() < 2e-5


@pytest.mark.parametrize("name,kind", [("llama", "paged"), ("qwen2", "contiguous"), ("qwen2", "paged")])
def test_hf_on_a_cache_rows_layout_with_uneven_counts_equals_eager(name, kind):
    """``model(..., anyattn_kv=step)`` with the rows layout and different new-token counts per row
    (right-padded ids; idle rows with 0 tokens on the contiguous cache): every sequence's logits
    equal eager's over the sequence alone (Qwen2: a sliding layer of window 4 and a full layer
    on one cache without a window)."""
    ref, ours = _pair_hf(name)
    g = torch.Generator().manual_seed(10)
    seqs_ids = [torch.randint(1, VOCAB, (20,), generator=g) for _ in range(3)]
    schedule = [[6, 2, 0], [1, 3, 5], [2, 1, 1], [0, 1, 4], [1, 1, 1], [3, 0, 1]]
    if kind == "paged":
        cache = aa.PagedKVCache(8, 16, 2, 16, layers=2)
        schedule = [c if all(c) else [x or 1 for x in c] for c in schedule]  # every sequence in every step
    else:
        cache = aa.ContiguousKVCache(3, 32, 2, 16, layers=2)
    got, done = _hf_on_cache(ours, cache, seqs_ids, schedule, "rows")
    with torch.no_grad():
        for i, ids in enumerate(seqs_ids):
            want = ref(ids[None, : done[i]], use_cache=False).logits[0]
            torch.testing.assert_close(got[i], want, atol=2e-5, rtol=1e-4, msg=lambda m, i=i: f"sequence {i}: {m}")


def test_contiguous_reset_takes_numpy_and_tensor_row_indices_and_refuses_others():
    """reset(rows) took any iterable before it zeroed rows; it now checks each index (numpy and
    tensor ints are indices too) before changing anything."""
    import numpy as np

    cache = aa.ContiguousKVCache(3, 16, 1, D)
    cache.step(4).write(0, *(torch.ones(3, 1, 4, D),) * 2)
    cache.reset([np.int64(1), torch.tensor(2)])
    assert cache.lengths == [4, 0, 0] and not cache.k[0][1:].any() and cache.k[0][0, :4].all()
    for bad in ([True], [3], ["0"]):
        with pytest.raises(ValueError, match=r"rows: expected row indices in \[0, 3\)"):
            cache.reset(bad)
    assert cache.lengths == [4, 0, 0]
