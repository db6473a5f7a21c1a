"""The ranking ``auto`` uses: for each device kind and variant class, backends fastest first.

This is data, not logic. ``auto`` walks the list and takes the first backend that can compute
the call exactly; backends missing from a list are tried after it, in registry order. A class
with a ``+grad`` row uses it when autograd runs through the call (training), because the fastest
forward kernel is not always the fastest forward+backward; a class with a ``+d64`` row uses it
(without autograd) when the head dim is at most 64, where a kernel's standing can differ.

Source of the CUDA rows: ``benchmarks/results/h200/kernels.md`` (H200, torch 2.11, bf16,
Hq=16, D=128, 16k tokens per call; forward and forward+backward), produced by

    python -m anyattn bench kernels --preset h200 --out benchmarks/results/h200

Measured there (TFLOP/s, fwd | fwd+bwd): dense cudnn 619 | 505, flex 452 | 399, flash_torch
340 | 286; causal cudnn 486 | 411, flex 320 | 318; sliding window 1024 flex 313 | 308,
flash_torch 236 | 221; 16 packed documents flash_torch 310 | 251, flex 280 | 285, dense-mask
SDPA 24 | 25; padding (B=8, 25% padded) flex 338 | 329, flash_torch 165 | 169 (unpad/pad
dominates), SDPA 204 | 193; prefix-LM flex 336 | 328, SDPA 180 | 160; ALiBi flex 287 | 296,
SDPA 146 | 142; softcap flex only. The ``decode`` row (at most 16 queries, more keys) is not
from that matrix: it orders backends by whether they run a new KV length without compiling.
The ``decode+paged`` rows (decode on a ``PagedKVCache``) are measured: see their comment. The
``padding+paged`` and ``masked+paged`` rows are reasoned: they put first the backend that reads
pages through the table instead of gathering them (a copy of every cached key per layer).
``documents+paged`` (packed prefill on a paged cache) is measured: see its comment.
The ``fa4`` entries (FlashAttention-4, ``backends/fa4.py``; only where flash-attn-4 imports) were
measured by ``benchmarks/device_round6_fa4.sh`` on an H100 (torch 2.11, flash-attn-4 4.0.0b40,
bf16, Hq=16, D=128, 16k tokens; benchmarks/results/round9/fa4_h100), TFLOP/s fwd | fwd+bwd:
dense fa4 626 | 562, cudnn 592 | 492; causal fa4 504 | 459, cudnn 494 | 400, flex (FLASH
lowering) 497 | 252, flex (Triton) 319 | 309; documents fa4 527 | 478, flex (FLASH) 423 | -;
window fa4 501 | 422; documents + window fa4 353 | 322, flex (FLASH) 286 | 269; softcap flex
(FLASH) 273 | 305, fa4 262 | 294. So fa4 leads dense, causal, window and documents, and flex
keeps the score rows. Padding and the first-sight / small / decode rows were not measured with
fa4: there it comes after the measured backends.
The CPU row comes from ``anyattn bench kernels --quick`` on a 2-core CPU: SDPA's CPU kernels beat the eager reference, and compiled Flex costs seconds of
compilation per new variant and shape, so it is last.
"""

from __future__ import annotations

DECODE_MAX_SQ = 16  # at most this many queries against a longer key sequence: the "decode" row
# paged decode calls whose gathered keys (rows x logical key length) exceed this use "+long"
GATHER_KEYS = 1 << 20

RANKING: dict[str, dict[str, tuple[str, ...]]] = {
    "cuda": {
        # fa4 (where flash-attn-4 is installed) leads the rows it was measured on: see the docstring
        "dense": ("fa4", "cudnn", "sdpa", "flex", "flash_torch", "flash", "kernels_flash", "eager"),
        "causal": ("fa4", "cudnn", "sdpa", "flex", "flash_torch", "flash", "kernels_flash", "eager"),
        "window": ("fa4", "flex", "flash_torch", "flash", "kernels_flash", "cudnn", "sdpa", "eager"),
        "documents": ("fa4", "flash_torch", "flex", "flash", "kernels_flash", "cudnn", "sdpa", "eager"),
        "documents+grad": ("fa4", "flex", "flash_torch", "flash", "kernels_flash", "cudnn", "sdpa", "eager"),
        "padding": ("flex", "cudnn", "sdpa", "flash_torch", "fa4", "flash", "kernels_flash", "eager"),
        # padding (and padding & causal: a decoder's padded prefill) with head_dim <= 64 (a 1B
        # Llama: 32 heads of 64): flex's kernel falls far behind, measured on the H200 (torch 2.11,
        # B=16, S=2048, Hq=32, D=64, bf16, fwd, one mask reused; benchmarks/results/round8/
        # prefill_shape): flash_torch 2.074 ms, sdpa 2.121, cudnn 2.121, flex 6.416; and `bench
        # serving` padded prefill (padding & causal, 16 prompts, one process): H100 round 7
        # flash_torch 179.6 ms/step, sdpa 208.7, flex 251.6; H100 round 10 flash_torch 179.0,
        # sdpa 204.1, auto running flex 248.7 (benchmarks/results/round10)
        "padding+d64": ("flash_torch", "sdpa", "cudnn", "flex", "fa4", "flash", "kernels_flash", "eager"),
        "masked": ("flex", "cudnn", "sdpa", "eager"),
        "scored": ("flex", "fa4", "flash", "kernels_flash", "cudnn", "sdpa", "eager"),
        # a few queries against a longer KV cache (generation): the KV length changes every step,
        # so backends compiled per shape come last; SDPA takes any mask as a small (Sq, Sk) tensor
        "decode": ("sdpa", "cudnn", "flash_torch", "fa4", "flash", "kernels_flash", "eager", "flex"),
        # the same from a paged KV cache (attention(q, kv=paged_view)). flex reads the pages through
        # the page table (a pool of fixed shape: one compiled kernel per batch shape, no copy);
        # sdpa and flash_torch (torch 2.11: no block_table) run on the pages gathered into
        # contiguous keys, a copy per layer. Measured with benchmarks/decode_probe.py (attention
        # of 16 layers per step, Hq=32, Hkv=8, D=64, bf16, ms per step; one process per card):
        #   H200 (round 12)  4k B=1/8/64: sdpa 3.89 / 4.18 / 8.30, flex 5.55 / 7.95 / 8.32;
        #                    32k B=1/8: sdpa 4.46 / 8.36, flex 6.93 / 8.91
        #   H100 (round 11, before flex's page-table BlockMask) 4k: sdpa 3.87 / 3.95 / 11.51,
        #                    flex 7.21 / 8.86 / 9.04, flash_torch 4.74 / 5.50 / 28.24
        # and the whole 1B model (`bench serving`, H200, round 12): paged sdpa 23.2 / 23.3 / 24.5
        # ms per step at 4k, 22.6 / 23.2 at 32k B=1/8, against paged flex 26-45 in the same run.
        # The gather grows with the cached keys: at 32k B=64 (2M keys per layer) paged sdpa ran
        # 69.2 ms against flex's 41.6-42.5, and needs a transient copy of a layer's keys: beyond
        # GATHER_KEYS rows x keys, the "+long" row (flex first) applies
        "decode+paged": ("sdpa", "flex", "cudnn", "flash_torch", "fa4", "flash", "kernels_flash", "eager"),
        "decode+paged+long": ("flex", "sdpa", "cudnn", "flash_torch", "fa4", "flash", "kernels_flash", "eager"),
        # packed prefill chunks next to decode tokens (continuous batching) on a paged cache, measured
        # with `anyattn bench serving --mode prefill` (H100, torch 2.11, 1B Llama shape, 16 prompts
        # + 16 decode steps, 12.8k tokens per step; benchmarks/results/round7): flash_torch 101.8
        # ms/step (pages gathered: torch 2.11 has no block_table), flex 180.3, sdpa 484.2
        "documents+paged": ("flash_torch", "flex", "flash", "kernels_flash", "fa4", "cudnn", "sdpa", "eager"),
        # prefill chunks of a rows-layout step (padding(kv=) & causal, Sq > 16) and other masks on a
        # paged cache: reasoned (flex reads the pages in place), not measured per backend
        "padding+paged": ("flex", "flash_torch", "flash", "kernels_flash", "fa4", "cudnn", "sdpa", "eager"),
        "masked+paged": ("flex", "flash_torch", "flash", "kernels_flash", "fa4", "cudnn", "sdpa", "eager"),
    },
    "cpu": {
        "*": ("sdpa", "eager", "flex"),
    },
}


def variant_class(call) -> str:
    """Which RANKING row a call belongs to."""
    from .spec import And, Documents, Padding, Window

    geo = call.geo
    if geo.Sq <= DECODE_MAX_SQ < geo.Sk:
        return "decode"
    if call.logit_scores:  # a sink alone changes no logit: the mask decides the class
        return "scored"
    m = call.mask
    if m is None:
        return "dense"
    if isinstance(m, Window):
        return "causal" if m.is_causal else "window"
    if isinstance(m, Padding):
        return "padding"
    parts = m.terms if isinstance(m, And) else (m,)
    if any(isinstance(p, Padding) for p in parts) and all(isinstance(p, (Padding, Window)) for p in parts):
        return "padding"  # a padded batch of causal / windowed rows (a decoder's prefill)
    if any(isinstance(p, Documents) for p in parts) and all(isinstance(p, (Documents, Window)) for p in parts):
        return "documents"
    return "masked"


# Rows used the first time a call's term values are seen (a new packing, new padding). A backend
# that builds its lowered form per content (flex's BlockMask: a few small kernels and a host-side
# index per new mask) wins when the content is reused (the layers of a model share one mask) and
# loses when it is used once. Measured with `anyattn bench kernels --mode new-packing` (H100,
# torch 2.11, bf16, 16 heads, D=128; benchmarks/results/round5/bench_h100 and final_h100): one
# 16k-token doc-causal row with new lengths each step, fwd+bwd: flash_torch 1.54 ms, raw
# varlen_attn 1.87-2.01, flex 3.4-5.3; 8 x 2048 with new padding each step, fwd: sdpa 0.80 ms,
# flash_torch 0.94-1.47, flex 2.2-4.1; fwd+bwd: sdpa 3.01-3.02, flash_torch 2.40-3.15 (the two runs
# disagree), flex 3.3-5.0. A content seen before uses RANKING.
# New padding with autograd, given as lengths or a SeqInfo (each row's real tokens known on the host
# to be one run): flash_torch unpads without reading the mask and wins forward+backward, measured
# on the H100 in two later runs (8 x 2048, fwd+bwd, ms per step; benchmarks/results/round14 and
# round16): flash_torch [lengths] 2.482 / 2.471, sdpa [lengths] 3.014 / 3.030, flex [lengths]
# - / 2.562. Given as a keep-mask, flash_torch must read the mask first (3.852 against sdpa's
# 3.391 in round 16): the "padding" row applies. Round 17 (another H100, benchmarks/results/round17)
# measured flex faster on new padding of a fixed padded shape, fwd+bwd, ms per step: 8 x 2048 flex
# 1.89-1.96 / flash_torch 2.45; 4 x 4096 2.99 / 3.94; 2 x 8192 4.53 / 5.76; 16 x 1024 1.91 / 1.87.
# With the same flex code rounds 14 and 16 had flex at 2.83 / 2.56 for 8 x 2048: flex's rows on
# new content move between runs, flash_torch's stay within 1%, and flex compiles one kernel per
# padded length on its first call (3-7 s). Round 18 (benchmarks/results/round18) found why they
# move: a new padding costs flex 66 / 93 kernel launches (fwd / fwd+bwd; flash_torch 29 / 41),
# so on a slow host its step is host-bound (enqueue 3.0 ms against 1.9 ms of kernels). Round 19
# (benchmarks/results/round19) builds that BlockMask on the host (9 / 14 launches): flex [lengths]
# 2.48 / 2.33 ms fwd+bwd against flash_torch's 2.89 / 2.62 on two H100 hosts, so the reason left
# for flash_torch first is flex's compile per new padded length (3-7 s), which a server with
# varying padded lengths would pay again and again. flash_torch stays first for a content seen
# once; a model's later layers see the content again and use RANKING's "padding" row.
FIRST_SIGHT: dict[str, dict[str, tuple[str, ...]]] = {
    "cuda": {
        "documents+grad": ("flash_torch", "flex", "flash", "kernels_flash", "cudnn", "sdpa", "eager"),
        "padding": ("sdpa", "cudnn", "flash_torch", "flex", "flash", "kernels_flash", "eager"),
        "padding+grad+runs": ("flash_torch", "sdpa", "cudnn", "flex", "flash", "kernels_flash", "eager"),
        # a dense() / function mask never seen before: flex would build a BlockMask for one use
        # (create_block_mask over every tile: 4.3 ms for a 64-token call, host-overhead table of
        # round 5), SDPA reads the boolean tensor as it is
        "masked": ("sdpa", "cudnn", "flex", "eager"),
    },
}


# Calls so small that the host decides (kernels of a few tens of microseconds): the backend with
# the cheapest host path comes first, whatever the variant. ``work`` counts the dense problem's
# multiply-adds, B * Hq * Sq * Sk * (D + Dv). Measured with benchmarks/small_calls.py (H100,
# torch 2.11, bf16, Hq=16, D=128, one doc-causal row of T tokens, 4 documents, us per call):
#   fwd      T=1024: sdpa 44.5, flex 113.9, flash_torch 130.2;  T=2048: sdpa 113.2, flex 120.5,
#            flash_torch 128.1;  T=4096: flex 145.5, flash_torch 161.1, sdpa 459.7
#   fwd+bwd  T=1024: sdpa 246.7, flex 578.9, flash_torch 678.6;  T=2048: sdpa 482.6, flex 573.3;
#            T=4096: flex 586.1, flash_torch 695.2, sdpa 1690.5
# so up to T=2048 at that shape (work 2**34) SDPA's dense path wins, beyond it the kernels do.
SMALL_WORK = 1 << 34
SMALL: dict[str, tuple[str, ...]] = {
    "cuda": ("sdpa", "cudnn", "flash_torch", "flex", "flash", "kernels_flash", "eager"),
}


def work(sig) -> int:
    """Multiply-adds of the dense problem: B * Hq * Sq * Sk * (D + Dv)."""
    return sig.B * sig.Hq * sig.Sq * sig.Sk * (sig.D + sig.Dv)


def is_small(sig, cls: str | None = None) -> bool:
    """Whether ``auto`` ranks this call by host cost (the SMALL row)."""
    if sig.device.type not in SMALL or getattr(sig, "paged", None) is not None:
        return False
    return (cls or variant_class(sig)) != "decode" and work(sig) <= SMALL_WORK


def _padding_in_runs(call) -> bool:
    """Whether every padding term of the call knows on the host that each row's real tokens are
    one run (lengths, or a SeqInfo that says so); a bare keep-mask does not."""
    from .spec import And, Padding

    m = call.mask
    parts = m.terms if isinstance(m, And) else (m,)
    pads = [p for p in parts if isinstance(p, Padding)]
    return bool(pads) and all(p.contiguous is True for p in pads)


def ranking_for(call, first_sight: bool = False) -> tuple[str, ...]:
    rows = RANKING.get(call.device.type, RANKING["cpu"])
    cls = variant_class(call)
    if getattr(call, "paged", None) is not None and cls + "+paged" in rows:  # a paged KV cache
        if call.B * call.Sk > GATHER_KEYS and cls + "+paged+long" in rows:
            return rows[cls + "+paged+long"]
        return rows[cls + "+paged"]
    if is_small(call, cls):
        return SMALL[call.device.type]
    first = FIRST_SIGHT.get(call.device.type, {}) if first_sight else {}
    if call.requires_grad and cls == "padding" and "padding+grad+runs" in first and _padding_in_runs(call):
        return first["padding+grad+runs"]
    if call.requires_grad and cls + "+grad" in first:
        return first[cls + "+grad"]
    if cls in first and not (call.requires_grad and cls + "+grad" in rows):
        return first[cls]
    if call.requires_grad and cls + "+grad" in rows:
        return rows[cls + "+grad"]
    if call.D <= 64 and cls + "+d64" in rows:  # a row measured apart for heads of at most 64
        return rows[cls + "+d64"]
    return rows.get(cls) or rows.get("*") or ()
