"""KV caches on CPU: a contiguous and a paged cache, sliding-window eviction, GQA, bottom-right
alignment, through ``attention(q, kv=step.write(layer, k, v))``. Every case replays a full
sequence step by step (prefill chunks, then decode steps of 1..16 tokens, sequences of different
lengths in one batch) and compares with one call over the whole sequence in float64."""

from __future__ import annotations

import random
import warnings

import pytest
import torch

import anyattn as aa
from anyattn.testing import record_calls, use_backend

from .test_flash_backends import _ref_seq

warnings.filterwarnings("ignore", message=".*flex_attention.*")

B, H, HKV, D, L = 3, 4, 2, 16, 40


def _seq(dtype=torch.float32, seed=0, Hq=H, Hkv=HKV, length=L):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, length, D, generator=g).to(dtype)
    k = torch.randn(B, Hkv, length, D, generator=g).to(dtype)
    v = torch.randn(B, Hkv, length, D, generator=g).to(dtype)
    return q, k, v


def _full(q, k, v, mask):
    return aa.attention(q.double(), k.double(), v.double(), mask=mask, backend="eager")


def _mask(window):
    return aa.causal() if window is None else aa.sliding_window(window - 1)


SCHEDULE = (17, 1, 1, 5, 16)  # a prefill chunk, decode steps, a 5-token chunk, a 16-token speculative step


def _replay_rows(cache, q, k, v, backend, window, seqs=None, schedule=SCHEDULE):
    """Equal new-token counts for every row: the row layout; returns the outputs (B, H, sum, D)."""
    outs, pos = [], 0
    for n in schedule:
        step = cache.step(n) if seqs is None else cache.step(seqs, n)
        kv = step.write(0, k[:, :, pos : pos + n], v[:, :, pos : pos + n])
        outs.append(aa.attention(q[:, :, pos : pos + n], kv=kv, mask=_mask(window), backend=backend))
        pos += n
    return torch.cat(outs, 2), pos


def _err(a, b):
    return (a.double() - b).abs().max().item()


@pytest.mark.parametrize("window", [None, 6])
@pytest.mark.parametrize("backend", ["eager", "sdpa"])
def test_contiguous_cache_replays_full_attention(backend, window):
    q, k, v = _seq()
    cache = aa.ContiguousKVCache(B, 24 if window else 48, HKV, D, window=window)
    got, n = _replay_rows(cache, q, k, v, backend, window)
    assert _err(got, _full(q, k, v, _mask(window))[:, :, :n]) < 2e-6
    if window:  # 40 tokens through 24 slots: rows were compacted, positions kept absolute
        assert cache.offsets == [40 - cache.lengths[0]] * B and cache.lengths[0] <= 24


@pytest.mark.parametrize("window", [None, 6])
@pytest.mark.parametrize("backend", ["eager", "sdpa", "flex"])
def test_paged_cache_replays_full_attention(backend, window):
    q, k, v = _seq()
    cache = aa.PagedKVCache(24, 16, HKV, D, window=window)
    seqs = [cache.add_sequence() for _ in range(B)]
    with record_calls() as seen:
        got, n = _replay_rows(cache, q, k, v, backend, window, seqs)
    assert _err(got, _full(q, k, v, _mask(window))[:, :, :n]) < 2e-6
    assert {c.backend for c in seen} == {backend}
    assert cache.free_pages == 24 - B * (3 if window is None else 3 - 1)  # 40 tokens = 3 pages; a window frees the first


@pytest.mark.parametrize("window", [None, 6])
@pytest.mark.parametrize("backend", ["eager", "flex"])
def test_paged_cache_packed_steps_mix_prefill_and_decode(backend, window):
    """Continuous batching: each step packs every active sequence's new tokens into one row
    (a prefill chunk next to decode steps); one call per step."""
    q, k, v = _seq(seed=3)
    cache = aa.PagedKVCache(24, 16, HKV, D, window=window)
    seqs = [cache.add_sequence() for _ in range(B)]
    schedule = [[9, 3, 0], [1, 1, 20], [1, 5, 1], [2, 1, 1], [16, 1, 0]]
    done, outs = [0] * B, [[] for _ in range(B)]
    for counts in schedule:
        act = [s for s in range(B) if counts[s]]
        step = cache.step([seqs[s] for s in act], [counts[s] for s in act], layout="packed", q_len=32)
        pick = lambda x: torch.cat([x[s : s + 1, :, done[s] : done[s] + counts[s]] for s in act], 2)  # noqa: E731
        pad = lambda x: torch.nn.functional.pad(x, (0, 0, 0, 32 - x.shape[2]))  # noqa: E731
        kv = step.write(0, pad(pick(k)), pad(pick(v)))
        o = aa.attention(pad(pick(q)), kv=kv, mask=_mask(window), backend=backend)
        assert torch.equal(o[:, :, sum(counts):], torch.zeros_like(o[:, :, sum(counts):]))  # q_len padding
        a = 0
        for s in act:
            outs[s].append(o[:, :, a : a + counts[s]])
            a += counts[s]
            done[s] += counts[s]
    full = _full(q, k, v, _mask(window))
    for s in range(B):
        assert _err(torch.cat(outs[s], 2), full[s : s + 1, :, : done[s]]) < 2e-6, s


def test_rows_with_different_new_token_counts_and_idle_rows():
    """Row layout with counts (3, 1, 0): q right-padded to 3; the idle row and the padding give 0."""
    q, k, v = _seq(dtype=torch.float64)
    cache = aa.ContiguousKVCache(B, 16, HKV, D, dtype=torch.float64)
    cache.step(5).write(0, k[:, :, :5], v[:, :, :5])
    step = cache.step([3, 1, 0])
    assert step.positions.tolist() == [[5, 6, 7], [5, 0, 0], [0, 0, 0]]
    kn = torch.stack([k[b, :, 5:8] for b in range(B)])
    vn = torch.stack([v[b, :, 5:8] for b in range(B)])
    out = aa.attention(torch.stack([q[b, :, 5:8] for b in range(B)]), kv=step.write(0, kn, vn), mask=aa.causal())
    full = _full(q, k, v, aa.causal())
    assert _err(out[0], full[0, :, 5:8]) < 1e-12 and _err(out[1, :, :1], full[1, :, 5:6]) < 1e-12
    assert torch.equal(out[1, :, 1:], torch.zeros_like(out[1, :, 1:])) and torch.equal(out[2], torch.zeros_like(out[2]))
    assert cache.lengths == [8, 6, 5]


def test_gqa_and_mqa_caches():
    for hkv in (1, 4):
        q, k, v = _seq(Hkv=hkv, seed=hkv)
        cache = aa.PagedKVCache(12, 16, hkv, D)
        seqs = [cache.add_sequence() for _ in range(B)]
        got, n = _replay_rows(cache, q, k, v, "sdpa", None, seqs)
        assert _err(got, _full(q, k, v, aa.causal())[:, :, :n]) < 2e-6


def test_sink_and_softcap_through_a_cache():
    q, k, v = _seq(dtype=torch.float64, seed=7)
    sink, cap = torch.tensor([0.5, 1.0, -0.5, 2.0], dtype=torch.float64), aa.softcap(3.0)
    cache = aa.PagedKVCache(12, 16, HKV, D, dtype=torch.float64)
    seqs = [cache.add_sequence() for _ in range(B)]
    outs, pos = [], 0
    for n in (9, 1, 2):
        kv = cache.step(seqs, n).write(0, k[:, :, pos : pos + n], v[:, :, pos : pos + n])
        outs.append(aa.attention(q[:, :, pos : pos + n], kv=kv, mask=aa.causal(), score=[cap, aa.sink(sink)]))
        pos += n
    want = aa.attention(q, k, v, mask=aa.causal(), score=[cap, aa.sink(sink)], backend="eager")[:, :, :pos]
    assert _err(torch.cat(outs, 2), want) < 1e-12


def test_release_returns_pages_and_the_pool_is_reused():
    cache = aa.PagedKVCache(6, 16, HKV, D)
    a, b = cache.add_sequence(), cache.add_sequence()
    cache.step([a, b], [33, 20], layout="packed")
    assert cache.free_pages == 6 - 3 - 2 and len(cache.pages_of(a)) == 3
    with pytest.raises(ValueError, match=r"new_tokens: expected at most the free pages \(1 of 6"):
        cache.step([a], [40])
    cache.release(a)
    assert cache.free_pages == 4 and a not in cache.sequences
    c = cache.add_sequence()
    cache.step([c], [48])
    assert cache.free_pages == 1 and len(set(cache.pages_of(c) + cache.pages_of(b))) == 5
    assert 0 not in cache.pages_of(c)  # the null page is never handed out


def test_memory_of_a_cache():
    c = aa.ContiguousKVCache(2, 100, 2, 16, layers=3, dtype=torch.bfloat16)
    assert c.memory_bytes() == 3 * 2 * (2 * 100 * 2 * 16 * 2)
    p = aa.PagedKVCache(10, 16, 2, 16, layers=3, dtype=torch.bfloat16)
    assert p.memory_bytes() == 3 * 2 * (11 * 16 * 2 * 16 * 2)


def test_a_windowed_cache_needs_a_window_in_the_mask():
    """An evicted key would be silently missing from a mask that could see it."""
    q, k, v = _seq()
    cache = aa.PagedKVCache(12, 16, HKV, D, window=6)
    seqs = [cache.add_sequence() for _ in range(B)]
    kv = cache.step(seqs, 2).write(0, k[:, :, :2], v[:, :, :2])
    for bad in (aa.causal(), None, aa.sliding_window(6)):
        with pytest.raises(ValueError, match=r"mask: expected a window of at most sliding_window\(5\)"):
            aa.attention(q[:, :, :2], kv=kv, mask=bad)
    aa.attention(q[:, :, :2], kv=kv, mask=aa.sliding_window(3))  # narrower is fine


def test_cache_calls_check_their_arguments():
    q, k, v = _seq()
    cache = aa.ContiguousKVCache(B, 8, HKV, D)
    step = cache.step(2)
    kv = step.write(0, k[:, :, :2], v[:, :, :2])
    with pytest.raises(ValueError, match=r"q: expected \(rows, Sq\) = \(3, 2\)"):
        aa.attention(q[:, :, :3], kv=kv, mask=aa.causal())
    with pytest.raises(ValueError, match="k/v: expected None when kv= is given"):
        aa.attention(q[:, :, :2], k, v, kv=kv)
    with pytest.raises(ValueError, match="caches are inference-only"):
        aa.attention(q[:, :, :2].clone().requires_grad_(True), kv=kv)
    with pytest.raises(TypeError, match="kv: expected a KV cache view"):
        aa.attention(q[:, :, :2], kv=cache)
    with pytest.raises(ValueError, match=r"k_new: expected shape \(rows, Hkv, Sq, D\) = \(3, 2, 2, 16\)"):
        step.write(0, k[:, :, :3], v[:, :, :3])
    with pytest.raises(ValueError, match="new_tokens: expected at most 6 more tokens in row 0"):
        cache.step(7)
    with pytest.raises(ValueError, match="k/v: expected key and value tensors"):
        aa.attention(q)
    with pytest.raises(ValueError, match="page_size: expected a multiple of 16"):
        aa.PagedKVCache(4, 10, HKV, D)


def test_decisions_are_reused_across_steps_of_one_bucket():
    """The key length grows every decode step; views are bucketed (kv_bucket), so a stream of
    steps shares a handful of decisions instead of one per step."""
    from anyattn import api

    q, k, v = _seq(length=300)
    cache = aa.ContiguousKVCache(B, 512, HKV, D)
    kv = cache.step(8).write(0, k[:, :, :8], v[:, :, :8])
    aa.attention(q[:, :, :8], kv=kv, mask=aa.causal())
    keys, n = set(), len(api._DECISIONS)
    for t in range(8, 300):
        kv = cache.step(1).write(0, k[:, :, t : t + 1], v[:, :, t : t + 1])
        keys.add(kv.logical_shapes()[0][2])
        aa.attention(q[:, :, t : t + 1], kv=kv, mask=aa.causal())
    assert sorted(keys) == [128, 160, 192, 224, 256, 320], keys
    assert len(api._DECISIONS) - n <= len(keys)


def test_contiguous_cache_calls_are_marked_bucketed_and_flex_runs_them_unfused_on_cpu():
    """A ContiguousKVCache's calls reach the backend with ``call.bucketed`` (their key length is a
    bucket, so flex compiles FlexDecoding per bucket on CUDA: tests/test_cuda_serving.py); plain
    calls and a paged cache's gathered calls do not. On a CPU flex keeps the unfused path (a
    compile there costs ~20 s) and still matches float64."""
    from anyattn.backends.eager import EagerBackend
    from anyattn.backends.flex import FlexBackend

    seen = []

    class Spy(EagerBackend):
        def run(self, call):
            seen.append(call.bucketed)
            return super().run(call)

    q, k, v = _seq()
    with use_backend(Spy()):
        _replay_rows(aa.ContiguousKVCache(B, L, HKV, D), q, k, v, "eager", None)
        assert seen == [True] * len(SCHEDULE)
        cache = aa.PagedKVCache(16, 16, HKV, D)
        seen.clear()
        _replay_rows(cache, q, k, v, "eager", None, seqs=[cache.add_sequence() for _ in range(B)])
        aa.attention(q, k, v, mask=aa.causal(), backend="eager")
        assert seen == [False] * (len(SCHEDULE) + 1)
    with use_backend(FlexBackend()) as flex:
        got, n = _replay_rows(aa.ContiguousKVCache(B, L, HKV, D), q, k, v, "flex", None, schedule=(1, 1, 1))
    assert flex.stats["unfused_calls"] == 3 and flex.stats["compiled_entries"] == 0
    assert _err(got, _full(q[:, :, :n], k[:, :, :n], v[:, :, :n], aa.causal())) < 1e-5


def test_paged_decode_ranks_by_the_keys_a_gather_would_copy():
    """Paged decode: SDPA on gathered pages first while the copy is small (measured faster than
    flex at 4k-32k contexts, batch 1-64), flex (pages read in place) once rows x keys exceed
    GATHER_KEYS (32k x 64: the gather made SDPA slower and costs a layer's keys in memory)."""
    from anyattn.call import Signature
    from anyattn.ranking import GATHER_KEYS, ranking_for

    def paged(B, Sk):
        return Signature.build(((B, 8, 1, 64), (B, 2, Sk, 64), (B, 2, Sk, 64)), torch.bfloat16, torch.device("cuda"),
                               None, (), 0.125, 0.0, False, False, False, None, (), ("kv", "paged", "rows", 128, 65))  # fmt: skip

    sig = Signature.of(B=4, Hq=8, Hkv=2, Sq=1, Sk=512, D=64, dtype=torch.bfloat16, device="cuda")
    assert ranking_for(sig)[0] == "sdpa"  # a contiguous cache: the decode row
    assert ranking_for(paged(4, 512))[0] == "sdpa" and paged(4, 512).page_size == 128
    assert ranking_for(paged(64, 4096))[0] == "sdpa"  # 2**18 keys
    assert 64 * 32768 > GATHER_KEYS and ranking_for(paged(64, 32768))[0] == "flex"


# -------------------------------------------------------------------------------- flash_torch paged


def _varlen_paged(calls):
    """torch 2.13's varlen_attn with block_table / seqused_k, in FlashAttention's conventions."""

    def varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                    window_size=(-1, -1), enable_gqa=False, seqused_k=None, block_table=None, num_splits=None):  # fmt: skip
        cq = cu_seq_q.tolist()
        calls.append(dict(paged=block_table is not None, cu_q=cq, used=None if seqused_k is None else seqused_k.tolist()))
        outs, lses = [], []
        for n in range(len(cq) - 1):
            if block_table is not None:
                assert block_table.dtype == torch.int32 and seqused_k.dtype == torch.int32
                m, ps = int(seqused_k[n]), key.shape[1]
                pages = block_table[n, : -(-m // ps)].long()
                kk, vv = key[pages].flatten(0, 1)[:m], value[pages].flatten(0, 1)[:m]
            else:
                ck = cu_seq_k.tolist()
                kk, vv = key[ck[n] : ck[n + 1]], value[ck[n] : ck[n + 1]]
            o, lse = _ref_seq(query[cq[n] : cq[n + 1]], kk, vv, scale, *window_size)
            outs.append(o)
            lses.append(lse)
        out = torch.cat(outs)
        return (out, torch.cat(lses, 1)) if return_aux is not None and return_aux.lse else out

    return varlen_attn


@pytest.mark.parametrize("window", [None, 6])
def test_flash_torch_reads_pages_through_the_block_table(window):
    """Where torch's varlen_attn has block_table (2.13), flash_torch reads the pool directly: no
    gather; bottom-right per sequence; evicted pages are not in the table it passes."""
    from anyattn.backends.flash_torch import FlashTorchBackend

    calls: list = []
    q, k, v = (t.to(torch.bfloat16) for t in _seq(seed=5))
    cache = aa.PagedKVCache(24, 16, HKV, D, dtype=torch.bfloat16, window=window)
    seqs = [cache.add_sequence() for _ in range(B)]
    with use_backend(FlashTorchBackend(varlen=_varlen_paged(calls), cuda_only=False)):
        got, n = _replay_rows(cache, q, k, v, "flash_torch", window, seqs)
    assert all(c["paged"] for c in calls) and calls[-1]["used"] == ([40] * B if window is None else [24] * B)
    ref = _full(q, k, v, _mask(window))[:, :, :n]
    eager = aa.attention(q, k, v, mask=_mask(window), backend="eager")[:, :, :n]  # same dtype: the tolerance rule
    assert _err(got, ref) <= 2 * _err(eager, ref) + 1e-5


def test_flash_torch_without_a_block_table_runs_on_gathered_pages():
    """torch 2.11's varlen_attn has no block_table: the pages are gathered and flash_torch packs
    the real keys of each sequence (cu_seqlens_k)."""
    from anyattn.backends.flash_torch import FlashTorchBackend

    from .test_flash_backends import fake_varlen

    q, k, v = (t.to(torch.bfloat16) for t in _seq(seed=6))
    cache = aa.PagedKVCache(24, 16, HKV, D, dtype=torch.bfloat16)
    seqs = [cache.add_sequence() for _ in range(B)]
    be = FlashTorchBackend(varlen=fake_varlen(gqa_flag=False), cuda_only=False)
    with use_backend(be):
        assert not be.reads_pages(_paged_sig())
        got, n = _replay_rows(cache, q, k, v, "flash_torch", None, seqs)
    ref = _full(q, k, v, aa.causal())[:, :, :n]
    eager = aa.attention(q, k, v, mask=aa.causal(), backend="eager")[:, :, :n]
    assert _err(got, ref) <= 2 * _err(eager, ref) + 1e-5


def test_flash_torch_gathers_pages_its_cuda_kernel_cannot_read():
    """torch's FlashAttention kernel takes a paged KV cache only in pages of a multiple of 256
    tokens ("Paged KV cache block size must be divisible by 256"): on CUDA a cache with 128-token
    pages (PagedKVCache's default) is gathered instead of reaching the kernel's error; 256 and
    512 are read through the block table. The signatures are built only: nothing runs on a GPU."""
    from anyattn.backends.flash_torch import PAGE_MULTIPLE, FlashTorchBackend
    from anyattn.call import Signature

    def paged(ps, device):
        return Signature.build(((2, 8, 1, 64), (2, 2, 1024, 64), (2, 2, 1024, 64)), torch.bfloat16, torch.device(device),
                               None, (), 0.125, 0.0, False, False, False, None, (), ("kv", "paged", "rows", ps, 9))  # fmt: skip

    be = FlashTorchBackend(varlen=_varlen_paged([]), cuda_only=False)
    assert PAGE_MULTIPLE == 256
    assert not be.reads_pages(paged(128, "cuda")) and not be.reads_pages(paged(16, "cuda"))
    assert be.reads_pages(paged(256, "cuda")) and be.reads_pages(paged(512, "cuda"))
    assert be.reads_pages(paged(16, "cpu"))  # the rule is the CUDA kernel's (a CPU stand-in has none)


def _paged_sig():
    from anyattn.call import Signature

    return Signature.build(((1, 4, 1, 16), (1, 2, 64, 16), (1, 2, 64, 16)), torch.bfloat16, torch.device("cpu"), None, (),
                           0.25, 0.0, False, False, False, None, (), ("kv", "paged", "rows", 16, 25))  # fmt: skip


@pytest.mark.parametrize("window", [None, 24])
def test_row_pages_marks_full_exactly_the_pages_every_query_sees_whole(window):
    """KVStep.row_pages (flex's decode BlockMask): a page is listed full iff every query of its row
    sees every key of it (brute force over the pairs), partial otherwise; every live page once."""
    rnd = random.Random(window or 0)
    seen_full = 0
    for trial in range(30):
        ps = 16
        cache = aa.PagedKVCache(64, ps, HKV, D, window=window)
        seqs = [cache.add_sequence() for _ in range(3)]
        cache.step(seqs, [rnd.randint(0, 70) for _ in seqs], layout="rows")
        counts = [rnd.choice([0, 1, 3, 3]) for _ in seqs] if trial % 3 else [3, 3, 3]
        if not any(counts):
            counts[0] = 1
        step = cache.step(seqs, counts, layout="rows")
        for left, right in [(None, None), (None, 0), (None, 5), (20, 0), (40, 0), (window - 1 if window else 9, 0)]:
            pn, pi, fn, fi = (x.flatten(1) if x.dim() == 4 else x.flatten() for x in step.row_pages(70, left, right))
            for r, ((m, pages), n) in enumerate(zip(step.live(), step.new)):
                want_full = []
                for j, page in enumerate(pages):
                    keys = range(j * ps, j * ps + ps)
                    sees = lambda q, k: k < m and (right is None or k <= q + right) and (left is None or q - k <= left)  # noqa: E731
                    if n == step.Sq and all(sees(q, k) for q in range(m - n, m) for k in keys):
                        want_full.append(page)
                got_full, got_part = fi[r, : fn[r]].tolist(), pi[r, : pn[r]].tolist()
                assert got_full == want_full, (trial, r, left, right)
                seen_full += len(got_full)
                assert sorted(got_full + got_part) == sorted(pages) and not set(got_full) & set(got_part)
                assert not fi[r, fn[r] :].any() and not pi[r, pn[r] :].any()
    assert seen_full > 20  # the cases reach full pages, not only partial ones


@pytest.mark.slow
@pytest.mark.parametrize("window", [None, 5])
def test_flex_paged_decode_compiles_one_kernel_for_a_growing_context(window):
    """A pool of fixed shape and a mask in pool coordinates: the compiled FlexAttention kernel
    (CPU here) built for the first decode step serves every later one while the context grows
    across several logical key lengths, without a single recompile (dynamo would raise at its
    recompile limit, set to 1 here: anyattn refuses to fall back to the unfused path)."""
    from anyattn.backends.flex import FlexBackend

    q, k, v = _seq(seed=9, length=96)
    cache = aa.PagedKVCache(32, 16, HKV, D)
    seqs = [cache.add_sequence() for _ in range(B)]
    outs = []
    mask = _mask(window)
    with use_backend(FlexBackend(unfused_max_sq=0)) as be:  # the compiled kernel even for decode-sized calls
        kv = cache.step(seqs, 16).write(0, k[:, :, :16], v[:, :, :16])
        outs.append(aa.attention(q[:, :, :16], kv=kv, mask=mask, backend="flex"))
        kv = cache.step(seqs, 1).write(0, k[:, :, 16:17], v[:, :, 16:17])
        outs.append(aa.attention(q[:, :, 16:17], kv=kv, mask=mask, backend="flex"))
        lengths = set()
        with torch._dynamo.config.patch(recompile_limit=1):
            for t in range(17, 96):
                kv = cache.step(seqs, 1).write(0, k[:, :, t : t + 1], v[:, :, t : t + 1])
                lengths.add(kv.logical_shapes()[0][2])
                outs.append(aa.attention(q[:, :, t : t + 1], kv=kv, mask=mask, backend="flex"))
    assert len(lengths) >= 4, lengths  # the logical key length changed several times
    assert be.stats["compiled_entries"] == 2  # Sq=16 and Sq=1: not one per context length
    assert be.stats["page_table_block_masks"] == 81  # every step's BlockMask from the page tables (full pages included)
    assert _err(torch.cat(outs, 2), _full(q, k, v, mask)) < 2e-6


@pytest.mark.slow
def test_flex_contiguous_decode_reuses_one_kernel_within_a_key_bucket():
    """The compiled kernel flex runs for a ContiguousKVCache's decode steps on CUDA (CPU here,
    forced with unfused_max_sq=0): the view's key length stays at its bucket (128) while the
    context grows from 101 to 128 keys, so the first step's kernel serves all 28 steps without
    a recompile (dynamo's limit is 1 here), within 2e-6 of float64."""
    from anyattn.backends.flex import FlexBackend

    q, k, v = _seq(seed=10, length=128)
    cache = aa.ContiguousKVCache(B, 256, HKV, D)
    cache.step(100).write(0, k[:, :, :100], v[:, :, :100])
    outs, lengths = [], set()
    with use_backend(FlexBackend(unfused_max_sq=0)) as be:
        kv = cache.step(1).write(0, k[:, :, 100:101], v[:, :, 100:101])
        outs.append(aa.attention(q[:, :, 100:101], kv=kv, mask=aa.causal(), backend="flex"))
        with torch._dynamo.config.patch(recompile_limit=1):
            for t in range(101, 128):
                kv = cache.step(1).write(0, k[:, :, t : t + 1], v[:, :, t : t + 1])
                lengths.add(kv.logical_shapes()[0][2])
                outs.append(aa.attention(q[:, :, t : t + 1], kv=kv, mask=aa.causal(), backend="flex"))
    assert lengths == {128} and be.stats["compiled_entries"] == 1 and be.stats["unfused_calls"] == 0
    assert _err(torch.cat(outs, 2), _full(q, k, v, aa.causal())[:, :, 100:]) < 2e-6


def test_flex_refuses_small_pages_where_its_main_kernel_would_run():
    """On CUDA, FlexDecoding (few queries, a power-of-2 GQA group) takes key blocks of any page
    size; the main kernel's key blocks must divide the page: pages of a multiple of 128 there."""
    from anyattn.backends.flex import FlexBackend
    from anyattn.call import Signature

    def sig(Sq, Hq, ps):
        shapes = ((1, Hq, Sq, 64), (1, 2, 1024, 64), (1, 2, 1024, 64))
        return Signature.build(shapes, torch.bfloat16, torch.device("cuda"), None, (), 0.125, 0.0, False, False, False, None,
                               (), ("kv", "paged", "packed", ps, 65))  # fmt: skip

    flex = FlexBackend()
    assert flex.supports(sig(1, 8, 16)) is None  # decoding, group 4
    assert flex.supports(sig(256, 8, 128)) is None
    assert "multiple of 128 tokens" in flex.supports(sig(256, 8, 16))
    assert "not a power of 2" in flex.supports(sig(1, 6, 16))
