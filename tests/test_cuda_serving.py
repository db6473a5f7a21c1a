"""Serving on CUDA (issue 17): learnable sinks, packed attention with Sq != Sk, contiguous and
paged KV caches, on every backend that serves each variant, against the float64 oracle with the
tolerance rule (DESIGN.md section 7); refusals where a backend cannot.

    PYTHONPATH=src python3 -m pytest -q -m cuda tests/test_cuda_serving.py -p no:cacheprovider

About 3-4 minutes on an H100/H200, mostly FlexAttention compiling one kernel per variant and
shape (run with -n 4 under pytest-xdist to halve it).
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys

import pytest
import torch

import anyattn as aa
from anyattn.backends.flash_torch import FlashTorchBackend, load_varlen, varlen_params
from anyattn.backends.flex import FlexBackend
from anyattn.ranking import DECODE_MAX_SQ, RANKING
from anyattn.testing import compare_to_oracle, generate_qkv, record_calls, use_backend

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

BF16 = torch.bfloat16
ROOT = os.path.join(os.path.dirname(__file__), "..")


def _ok(comps, ctx=""):
    bad = [str(c) for c in comps if not c.ok]
    assert not bad, f"{ctx}: " + "; ".join(bad)


def _sink(H, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(H, generator=g) * 2).to("cuda", BF16).requires_grad_(True)


# -------------------------------------------------------------------------------- sinks

SINK_CASES = {
    # name: (B, Hq, Hkv, Sq, Sk, D, mask)
    "causal": (2, 8, 2, 113, 113, 64, aa.causal()),
    "documents": (1, 8, 2, 300, 300, 128, aa.documents([100, 37, 163]) & aa.causal()),
    "window": (2, 4, 4, 200, 200, 64, aa.sliding_window(31)),
    "decode": (3, 8, 2, 1, 300, 128, aa.causal()),
    "packed_layout": (1, 8, 2, 40, 300, 64, aa.documents([30, 1, 9], kv=[100, 150, 50]) & aa.causal()),
}


@pytest.mark.parametrize("case", list(SINK_CASES))
@pytest.mark.parametrize("backend", ["flex", "eager"])
def test_cuda_sinks_match_oracle_fwd_bwd(backend, case):
    """out, lse (which includes the sink) and the gradients of q, k, v and the sink logits."""
    B, Hq, Hkv, Sq, Sk, D, mask = SINK_CASES[case]
    q, k, v = generate_qkv(B, Hq, Hkv, Sq, Sk, D, dtype=BF16, device="cuda", layout="bshd", seed=3)
    comps = compare_to_oracle(q, k, v, backend=backend, grad=True, return_lse=True, mask=mask, score=aa.sink(_sink(Hq)))
    assert [c.name for c in comps][-1] == f"dsink(tensor({Hq},))"
    _ok(comps, f"{backend}/{case}")


@pytest.mark.parametrize("case", ["causal", "documents", "window", "decode", "packed_layout"])
def test_cuda_flash_torch_sinks_forward(case):
    """Combined through varlen_attn's lse (forward only: its backward ignores the lse gradient)."""
    B, Hq, Hkv, Sq, Sk, D, mask = SINK_CASES[case]
    q, k, v = generate_qkv(B, Hq, Hkv, Sq, Sk, D, dtype=BF16, device="cuda", seed=4)
    s = aa.sink(_sink(Hq).detach())
    _ok(compare_to_oracle(q, k, v, backend="flash_torch", grad=False, return_lse=True, mask=mask, score=s), case)
    with pytest.raises(aa.UnsupportedError, match="ignores the lse's gradient"):
        aa.attention(q.requires_grad_(True), k, v, mask=mask, score=s, backend="flash_torch")


def test_cuda_sdpa_family_refuses_sinks_and_auto_trains_on_flex():
    q, k, v = generate_qkv(2, 8, 2, 128, 128, 64, dtype=BF16, device="cuda", requires_grad=True)
    s = aa.sink(_sink(8))
    for be in ("sdpa", "cudnn"):
        with pytest.raises(aa.UnsupportedError, match="log-sum-exp"):
            aa.attention(q, k, v, mask=aa.causal(), score=s, backend=be)
    with record_calls() as seen:
        aa.attention(q, k, v, mask=aa.causal(), score=s).float().sum().backward()
    assert [c.backend for c in seen] == ["flex"] and s.logits.grad is not None


# -------------------------------------------------------------------------------- packed layouts, Sq != Sk

LAYOUT_CASES = {
    # chunked prefill + decode in one row; a document with more queries than keys; one without keys
    "chunked_causal": lambda: (aa.documents([64, 1, 1, 90, 7], kv=[320, 129, 1, 90, 0]) & aa.causal(), 1, 163, 540),
    "window": lambda: (aa.documents([64, 1, 90], kv=[320, 129, 90]) & aa.sliding_window(63), 1, 155, 539),
    "cross": lambda: (aa.documents([17, 100, 3], kv=[200, 33, 64]), 1, 120, 297),
    "padding_kv": lambda: (aa.padding(torch.tensor([5, 1, 16]), kv=torch.tensor([300, 77, 16])) & aa.causal(), 3, 16, 300),
    "padding_kv_left": lambda: (aa.padding(kv_mask=_left(3, 300, [300, 200, 64])) & aa.sliding_window(100), 3, 4, 300),
}


def _left(B, S, n):
    return (torch.arange(S)[None, :] >= S - torch.tensor(n)[:, None]).cuda()


@pytest.mark.parametrize("case", list(LAYOUT_CASES))
@pytest.mark.parametrize("backend", ["flex", "flash_torch", "sdpa", "cudnn", "eager"])
def test_cuda_packed_layouts_match_oracle_fwd_bwd(backend, case):
    mask, B, Sq, Sk = LAYOUT_CASES[case]()
    q, k, v = generate_qkv(B, 8, 2, Sq, Sk, 128, dtype=BF16, device="cuda", layout="bshd", seed=5)
    d = aa.explain(q.detach().requires_grad_(True), k, v, mask=mask, backend=backend)
    if d.chosen is None:
        assert backend == "cudnn", d  # torch's own cuDNN check may refuse a materialized mask; no other may
        pytest.skip(d.rows[0].reason)
    _ok(compare_to_oracle(q, k, v, backend=backend, grad=True, mask=mask), f"{backend}/{case}")


def test_cuda_flash_torch_passes_different_cu_seqlens():
    fn = load_varlen()[0]
    seen = []

    @functools.wraps(fn)
    def recording(*args, **kw):
        seen.append((args[3].tolist(), args[4].tolist(), args[5], args[6]))
        return fn(*args, **kw)

    q, k, v = generate_qkv(1, 8, 2, 73, 600, 128, dtype=BF16, device="cuda")
    with use_backend(FlashTorchBackend(varlen=recording)):
        aa.attention(q, k, v, mask=aa.documents([64, 1, 8], kv=[320, 200, 80]) & aa.causal(), backend="flash_torch")
    assert seen[0] == ([0, 64, 65, 73], [0, 320, 520, 600], 64, 320)


# -------------------------------------------------------------------------------- KV caches

B, H, HKV, D, L = 4, 8, 2, 128, 300
SCHEDULE = (128, 1, 1, 7, 16, 1)


def _seqs(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, h, L, D, generator=g).to("cuda", BF16) for h in (H, HKV, HKV)]


def _make(kind, window):
    if kind == "contiguous":
        # with a window: 140 slots for 154 tokens, so the 16-token step compacts every row first
        return aa.ContiguousKVCache(B, 140 if window else L, HKV, D, dtype=BF16, device="cuda", window=window), None
    cache = aa.PagedKVCache(64, 128, HKV, D, dtype=BF16, device="cuda", window=window)
    return cache, [cache.add_sequence() for _ in range(B)]


def _mask(window):
    return aa.causal() if window is None else aa.sliding_window(window - 1)


def _replay(kind, window, backend, q, k, v):
    cache, seqs = _make(kind, window)
    outs, pos = [], 0
    for n in SCHEDULE:
        step = cache.step(n) if seqs is None else cache.step(seqs, n)
        kv = step.write(0, k[:, :, pos : pos + n], v[:, :, pos : pos + n])
        outs.append(aa.attention(q[:, :, pos : pos + n], kv=kv, mask=_mask(window), backend=backend))
        pos += n
    return torch.cat(outs, 2), pos


@pytest.mark.parametrize("window", [None, 64])
@pytest.mark.parametrize("kind", ["contiguous", "paged"])
@pytest.mark.parametrize("backend", ["flex", "flash_torch", "sdpa", "cudnn", "eager", "auto"])
def test_cuda_kv_cache_replay_within_rule(backend, kind, window):
    """Prefill 128, decode 1, 1, a 7-token and a 16-token (speculative) step, decode 1; each step
    one call on the cache; against one float64 call over the whole sequence (eager replay in
    bf16 sets the bound)."""
    q, k, v = _seqs()
    with record_calls() as seen:
        try:
            got, n = _replay(kind, window, backend, q, k, v)
        except aa.UnsupportedError as e:
            assert backend == "cudnn", e  # torch's cuDNN check may refuse a materialized decode mask
            pytest.skip(str(e).splitlines()[1])
    ref, _ = _replay(kind, window, "eager", q, k, v)
    full = aa.attention(q[:, :, :n].double(), k[:, :, :n].double(), v[:, :, :n].double(), mask=_mask(window), backend="eager")
    err, ref_err = (got.double() - full).abs().max().item(), (ref.double() - full).abs().max().item()
    assert err <= 2 * ref_err + 1e-5, f"{backend}/{kind}/{window}: err {err:.3e} vs eager bf16 {ref_err:.3e}"
    if backend == "auto" and kind == "paged":  # the +paged rows: the prefill step, then the decode steps
        rows = RANKING["cuda"]
        want = [rows["padding+paged"][0] if c.q_shape[2] > DECODE_MAX_SQ else rows["decode+paged"][0] for c in seen]
        assert [c.backend for c in seen] == want


@pytest.mark.parametrize("backend", ["flex", "flash_torch", "sdpa", "eager"])
def test_cuda_paged_packed_steps_within_rule(backend):
    """Continuous batching: a prefill chunk next to decode steps in one packed row per step."""
    q, k, v = _seqs(seed=1)
    cache = aa.PagedKVCache(64, 128, HKV, D, dtype=BF16, device="cuda")
    seqs = [cache.add_sequence() for _ in range(B)]
    schedule = [[100, 3, 0, 1], [1, 1, 150, 1], [1, 60, 1, 1], [16, 1, 1, 1]]
    full = aa.attention(q.double(), k.double(), v.double(), mask=aa.causal(), backend="eager")
    results = {}
    for be in (backend, "eager"):
        cache = aa.PagedKVCache(64, 128, HKV, D, dtype=BF16, device="cuda")
        seqs = [cache.add_sequence() for _ in range(B)]
        done, outs = [0] * B, [[] for _ in range(B)]
        for counts in schedule:
            act = [s for s in range(B) if counts[s]]
            step = cache.step([seqs[s] for s in act], [counts[s] for s in act], layout="packed", q_len=256)
            pick = lambda x: torch.nn.functional.pad(  # noqa: E731
                torch.cat([x[s : s + 1, :, done[s] : done[s] + counts[s]] for s in act], 2), (0, 0, 0, 256 - sum(counts)))
            o = aa.attention(pick(q), kv=step.write(0, pick(k), pick(v)), mask=aa.causal(), backend=be)
            a = 0
            for s in act:
                outs[s].append(o[:, :, a : a + counts[s]])
                a += counts[s]
                done[s] += counts[s]
        results[be] = max((torch.cat(outs[s], 2).double() - full[s : s + 1, :, : done[s]]).abs().max().item() for s in range(B))
    assert results[backend] <= 2 * results["eager"] + 1e-5, results


def test_cuda_flex_paged_decode_compiles_once_for_a_growing_context():
    """The pool's shape is fixed and the decode mask lives in pool coordinates: 199 decode steps
    over a context growing from 1 to 3 pages reuse the first step's kernel without a recompile
    (dynamo's recompile limit is 1 here: a recompile would raise)."""
    q, k, v = _seqs(seed=2)
    cache = aa.PagedKVCache(64, 128, HKV, D, dtype=BF16, device="cuda")
    seqs = [cache.add_sequence() for _ in range(B)]
    outs = []
    with use_backend(FlexBackend()) as flex:
        cache.step(seqs, 100).write(0, k[:, :, :100], v[:, :, :100])
        kv = cache.step(seqs, 1).write(0, k[:, :, 100:101], v[:, :, 100:101])
        outs.append(aa.attention(q[:, :, 100:101], kv=kv, mask=aa.causal(), backend="flex"))
        before = flex.stats["compiled_entries"]
        with torch._dynamo.config.patch(recompile_limit=1):
            for t in range(101, L):
                kv = cache.step(seqs, 1).write(0, k[:, :, t : t + 1], v[:, :, t : t + 1])
                outs.append(aa.attention(q[:, :, t : t + 1], kv=kv, mask=aa.causal(), backend="flex"))
        assert flex.stats["compiled_entries"] == before
    got = torch.cat(outs, 2)
    full = aa.attention(q.double(), k.double(), v.double(), mask=aa.causal(), backend="eager")[:, :, 100:]
    ref = aa.attention(q, k, v, mask=aa.causal(), backend="eager")[:, :, 100:]
    assert (got.double() - full).abs().max() <= 2 * (ref.double() - full).abs().max() + 1e-5


@pytest.mark.parametrize("window", [None, 64])
def test_cuda_flex_contiguous_decode_compiles_once_per_key_bucket(window):
    """A ContiguousKVCache's views have bucketed key lengths (128, 160, 192, 224, 256, then the
    capacity): flex compiles FlexDecoding once per bucket instead of running unfused, each
    kernel serves every step of its bucket (a second pass over the same buckets compiles
    nothing), and the outputs stay within the rule against float64."""
    q, k, v = _seqs(seed=3)
    cap = 140 if window else L
    outs, ref_outs = [], []
    with use_backend(FlexBackend()) as flex:
        for backend, sink in (("flex", outs), ("eager", ref_outs)):
            cache = aa.ContiguousKVCache(B, cap, HKV, D, dtype=BF16, device="cuda", window=window)
            cache.step(100).write(0, k[:, :, :100], v[:, :, :100])
            for t in range(100, L):
                kv = cache.step(1).write(0, k[:, :, t : t + 1], v[:, :, t : t + 1])
                sink.append(aa.attention(q[:, :, t : t + 1], kv=kv, mask=_mask(window), backend=backend))
            if backend == "flex":
                entries = flex.stats["compiled_entries"]
                assert flex.stats["unfused_calls"] == 0, flex.stats
                assert 1 <= entries <= 6, flex.stats  # one per bucket at most
                cache = aa.ContiguousKVCache(B, cap, HKV, D, dtype=BF16, device="cuda", window=window)
                cache.step(100).write(0, k[:, :, :100], v[:, :, :100])
                for t in range(100, L):  # the same buckets again: nothing new to compile
                    kv = cache.step(1).write(0, k[:, :, t : t + 1], v[:, :, t : t + 1])
                    aa.attention(q[:, :, t : t + 1], kv=kv, mask=_mask(window), backend="flex")
                assert flex.stats["compiled_entries"] == entries and flex.stats["unfused_calls"] == 0
    full = aa.attention(q.double(), k.double(), v.double(), mask=_mask(window), backend="eager")[:, :, 100:]
    got, ref = torch.cat(outs, 2), torch.cat(ref_outs, 2)
    assert (got.double() - full).abs().max() <= 2 * (ref.double() - full).abs().max() + 1e-5


def test_cuda_flash_torch_reads_pages_only_where_torch_has_a_block_table():
    """torch 2.13's varlen_attn takes block_table/seqused_k; 2.11's does not (then the pages are
    gathered into contiguous keys first). Detected from the signature, never assumed. Its kernel
    reads pages of a multiple of 256 tokens only: 128-token pages are gathered on every torch."""
    fn = load_varlen()[0]
    native = {"block_table", "seqused_k"} <= varlen_params(fn)
    q, k, v = _seqs(seed=3)
    want = aa.attention(q[:, :, :40].double(), k[:, :, :40].double(), v[:, :, :40].double(), mask=aa.causal(), backend="eager")
    ref = aa.attention(q[:, :, :40], k[:, :, :40], v[:, :, :40], mask=aa.causal(), backend="eager")
    for page_size, reads in ((128, False), (256, native)):
        seen = []

        @functools.wraps(fn)
        def recording(*args, **kw):
            seen.append("block_table" in kw)
            return fn(*args, **kw)

        cache = aa.PagedKVCache(64, page_size, HKV, D, dtype=BF16, device="cuda")
        seqs = [cache.add_sequence() for _ in range(B)]
        kv = cache.step(seqs, 40).write(0, k[:, :, :40], v[:, :, :40])
        with use_backend(FlashTorchBackend(varlen=recording)):
            out = aa.attention(q[:, :, :40], kv=kv, mask=aa.causal(), backend="flash_torch")
        assert seen == [reads], (page_size, seen, native)
        assert (out.double() - want).abs().max() <= 2 * (ref.double() - want).abs().max() + 1e-5, page_size


def test_cuda_continuous_batching_example_equals_hf_generate():
    """examples/continuous_batching.py on the GPU in float32: packed steps on a PagedKVCache (auto:
    flex through the page table) give HF eager generate's greedy tokens, request by request."""
    env = dict(os.environ, PYTHONPATH=os.path.join(ROOT, "src") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run(
        [sys.executable, os.path.join(ROOT, "examples", "continuous_batching.py"), "--check", "--device", "cuda",
         "--requests", "16", "--pages", "32", "--budget", "64", "--chunk", "16"],
        capture_output=True, text=True, env=env, timeout=600,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]


def test_cuda_bench_serving_rows_count_compiles_and_allocator_retries(tmp_path):
    """On CUDA a decode row says how many graphs compiled and how many cudaMalloc retries the
    caching allocator made during its timed steps (a row near a full card can be slow for that
    reason alone); a small row on an empty card has none."""
    import json

    from anyattn.cli import main

    code = main(["bench", "serving", "--quick", "--device", "cuda", "--batches", "2", "--contexts", "256", "--steps", "3",
                 "--impls", "anyattn/paged", "--backends", "sdpa", "--out", str(tmp_path)])  # fmt: skip
    assert code == 0
    rows = json.loads((tmp_path / "serving.json").read_text())["rows"]
    assert rows and all(r["status"] == "ok" for r in rows), rows
    assert all(r["alloc_retries"] == 0 and r["compiles"] == 0 for r in rows), rows


@pytest.mark.parametrize("backend", ["sdpa", "cudnn", "flex", "flash_torch", "auto"])
@pytest.mark.parametrize("kind", ["paged", "contiguous"])
def test_cuda_a_finished_requests_nan_does_not_reach_the_next_one(kind, backend):
    """A request whose keys and values overflowed (NaN) is released; the next one gets its page
    (or row): the slots past the new keys are masked but read by the kernels, so they must hold
    zeros (they are zeroed when handed out), on every backend."""
    nan = torch.full((1, HKV, 128, D), float("nan"), device="cuda", dtype=BF16)
    if kind == "paged":
        cache = aa.PagedKVCache(1, 128, HKV, D, dtype=BF16, device="cuda")
        old = cache.add_sequence()
        cache.step([old], 128).write(0, nan, nan)
        cache.release(old)
        step = cache.step([cache.add_sequence()], 5)
    else:
        cache = aa.ContiguousKVCache(1, 128, HKV, D, dtype=BF16, device="cuda")
        cache.step(128).write(0, nan, nan)
        cache.reset()
        step = cache.step(5)
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(1, H, 5, D, device="cuda", dtype=BF16, generator=g)
    k, v = (torch.randn(1, HKV, 5, D, device="cuda", dtype=BF16, generator=g) for _ in range(2))
    try:
        out = aa.attention(q, kv=step.write(0, k, v), mask=aa.causal(), backend=backend)
    except aa.UnsupportedError:
        pytest.skip(f"{backend} does not serve a {kind} cache step")
    want = aa.attention(q.double(), k.double(), v.double(), mask=aa.causal(), backend="eager")
    assert torch.isfinite(out).all(), "the previous request's NaN reached the new one"
    assert (out.double() - want).abs().max().item() < 3e-2
