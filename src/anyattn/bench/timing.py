"""The one timing function, and the host-overhead loop.

Method, best available first (reported with every measurement):

* ``triton.do_bench``  CUDA with triton: ``triton.testing.do_bench(..., return_mode="median")``
  (it flushes L2 between calls and picks the repetition count from a time budget);
* ``cuda_events``      CUDA without triton: one CUDA event pair per call, median;
* ``perf_counter``     CPU: ``time.perf_counter`` around each call, median.

The first call is timed on its own (``first_call_ms``): it includes compilation (Flex), cuDNN
plan building and lazy initialisation, which the median must not.
"""

from __future__ import annotations

import functools
import importlib.util
import inspect
import statistics
import time
from dataclasses import dataclass

import torch

__all__ = [
    "Timing", "compile_workers_ready", "first_call_ms", "host_us_per_call", "measure", "profile_tables", "sync", "timing_method",
]  # fmt: skip


@dataclass(frozen=True)
class Timing:
    ms: float  # median milliseconds per call
    n: int  # calls timed (0 when do_bench chose)
    method: str


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def compile_workers_ready(timeout_s: float = 120.0) -> str:
    """Start inductor's pool of compile worker processes and wait until it is up, so that its
    start (each worker imports torch: seconds of CPU per process) never overlaps timed steps.
    Inductor starts the pool lazily at a process's first compile and compiles in-process until it
    is ready; without this, the host-bound steps timed right after the first compile of a run
    share the host with a dozen starting processes. Returns what happened ("ready", "not used",
    or why it could not wait): the pool is inductor's internal API, so anything unexpected is
    reported, never raised."""
    try:
        from torch._inductor.async_compile import AsyncCompile
    except ImportError as e:  # pragma: no cover - torch without inductor
        return f"unavailable: {e}"
    try:
        if not AsyncCompile.use_process_pool() and AsyncCompile._ready_future is None:
            return "not used (one compile thread, or subprocesses not allowed)"
        AsyncCompile.wait_pool_ready(timeout=timeout_s)
    except Exception as e:  # noqa: BLE001 - internal API: report, do not fail a benchmark
        return f"could not wait: {type(e).__name__}: {e}"
    return "ready"


@functools.cache
def _do_bench():
    if importlib.util.find_spec("triton") is None:
        return None
    try:
        from triton.testing import do_bench
    except ImportError:  # a triton without testing helpers (or a broken install): CUDA events
        return None
    return do_bench


def timing_method(device) -> str:
    if torch.device(device).type != "cuda":
        return "perf_counter"
    return "triton.do_bench" if _do_bench() is not None else "cuda_events"


def first_call_ms(fn, device) -> float:
    """Wall time of one call, synchronized: compile + first run when nothing is cached yet."""
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return (time.perf_counter() - t0) * 1e3


def measure(fn, device, *, warmup_ms: float = 25.0, rep_ms: float = 100.0, max_reps: int = 1000) -> Timing:
    """Median milliseconds per call of ``fn`` (already called once: compiled and warm)."""
    method = timing_method(device)
    if method == "triton.do_bench":
        do_bench = _do_bench()
        params = inspect.signature(do_bench).parameters
        if "return_mode" in params:
            ms = do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median")
        else:  # older triton: quantiles
            ms = do_bench(fn, warmup=warmup_ms, rep=rep_ms, quantiles=[0.5])
        if isinstance(ms, (list, tuple)):
            ms = ms[0]
        return Timing(float(ms), 0, method)
    # Estimate the cost of one call, warm up for warmup_ms, then time n calls one by one.
    est = _estimate_ms(fn, device)
    n_warm = max(1, min(max_reps, int(warmup_ms / max(est, 1e-3))))
    for _ in range(n_warm):
        fn()
    n = max(3, min(max_reps, int(rep_ms / max(est, 1e-3))))
    times = []
    if method == "cuda_events":
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
        torch.cuda.synchronize()
        for i in range(n):
            starts[i].record()
            fn()
            ends[i].record()
        torch.cuda.synchronize()
        times = [s.elapsed_time(e) for s, e in zip(starts, ends)]
    else:
        for _ in range(n):
            t0 = time.perf_counter()
            fn()
            sync(device)
            times.append((time.perf_counter() - t0) * 1e3)
    return Timing(statistics.median(times), n, method)


def _estimate_ms(fn, device, calls: int = 3) -> float:
    sync(device)
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    sync(device)
    return (time.perf_counter() - t0) * 1e3 / calls


def host_us_per_call(fn, device, n: int) -> float:
    """Microseconds per call of ``n`` back-to-back calls, synchronized only at the end.

    On a tiny problem the GPU finishes each kernel before the host issues the next one, so
    this is the host cost of a call (Python, dispatch, launch), the number anyattn adds to.
    """
    for _ in range(3):
        fn()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    sync(device)
    return (time.perf_counter() - t0) * 1e6 / n


def profile_tables(fn, label: str, *, cpu_rows: int = 18, cuda_rows: int = 12, width: int = 70) -> str:
    """``fn()`` under torch.profiler (CPU and CUDA activities, synchronized at the end): the top
    operators by self CPU time and by self CUDA time, as text headed by ``label`` (the probes'
    "where the time goes" tables)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    avg = prof.key_averages()
    return "\n".join((
        f"--- {label}, by self CPU time",
        avg.table(sort_by="self_cpu_time_total", row_limit=cpu_rows, max_name_column_width=width),
        f"--- {label}, by self CUDA time",
        avg.table(sort_by="self_cuda_time_total", row_limit=cuda_rows, max_name_column_width=width),
    ))
