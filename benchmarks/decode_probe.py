"""Where the time of a decode step goes: attention only, 16 layers of a Llama-3.2-1B shape
(Hq=32, Hkv=8, D=64, bf16), one new token per sequence per step (GPU; CPU with --device cpu is a
smoke run).

    PYTHONPATH=src python3 benchmarks/decode_probe.py [--batches 1,8,64] [--context 4096] [--steps 20]

Rows, ms per step (a step = the cache bookkeeping, 16 layers' K/V writes and 16 attention calls):

  paged/<backend>       PagedKVCache (128-token pages): cache.step + per layer step.write + attention(q, kv=view)
  contiguous/<backend>  ContiguousKVCache, the same calls
  paged/<backend> same-step   the 16 calls repeated on one step (the call's cached path only)
  raw flex              a contiguous (B, Hkv, N, D) buffer, one BlockMask per step from
                        create_block_mask (keys up to each row's length), compiled flex_attention
                        with enable_gqa: what a hand-written decode loop on FlexAttention does
  bookkeeping only      cache.step + the 16 writes, no attention

Then torch.profiler of three paged auto steps at the middle batch: the top host and device operators.
"""

import argparse
import time

import torch

import anyattn as aa
from anyattn.bench.timing import profile_tables
from anyattn.testing import record_calls

HQ, HKV, D, LAYERS, PAGE = 32, 8, 64, 16, 128


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", default="1,8,64")
    ap.add_argument("--context", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--backends", default="auto,flex,sdpa,flash_torch")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--no-profile", action="store_true")
    a = ap.parse_args()
    dev = torch.device(a.device)
    dt = torch.bfloat16 if dev.type == "cuda" else torch.float32
    C, warm = a.context, 3
    extra = warm + 2 * a.steps + 8
    results = []

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    def timed(fn, label, B):
        for _ in range(warm):
            fn()
        sync()
        t0 = time.perf_counter()
        for _ in range(a.steps):
            fn()
        sync()
        ms = (time.perf_counter() - t0) / a.steps * 1e3
        results.append((label, B, ms))
        print(f"{label:<40} B={B:<3} {ms:9.3f} ms/step", flush=True)

    def caches(B):
        per = -(-(C + extra) // PAGE)
        paged = aa.PagedKVCache(B * per, PAGE, HKV, D, layers=LAYERS, dtype=dt, device=dev)
        seqs = [paged.add_sequence() for _ in range(B)]
        paged.step(seqs, C)
        cont = aa.ContiguousKVCache(B, C + extra, HKV, D, layers=LAYERS, dtype=dt, device=dev)
        cont.step(C)
        return paged, seqs, cont

    for B in [int(x) for x in a.batches.split(",")]:
        q = torch.randn(B, HQ, 1, D, device=dev, dtype=dt)
        kn = torch.randn(B, HKV, 1, D, device=dev, dtype=dt)
        with torch.no_grad():
            for backend in a.backends.split(","):
                for kind in ("paged", "contiguous"):
                    paged, seqs, cont = caches(B)
                    new = (lambda: paged.step(seqs, 1)) if kind == "paged" else (lambda: cont.step(1))

                    def step(new=new, backend=backend):
                        s = new()
                        for layer in range(LAYERS):
                            aa.attention(q, kv=s.write(layer, kn, kn), mask=aa.causal(), backend=backend)

                    try:
                        with record_calls() as rec:
                            step()
                        ran = sorted({c.backend for c in rec})
                        timed(step, f"{kind}/{backend} (ran {','.join(ran)})", B)
                        if kind == "paged":
                            s = new()
                            views = [s.write(layer, kn, kn) for layer in range(LAYERS)]

                            def same(views=views, backend=backend):
                                for view in views:
                                    aa.attention(q, kv=view, mask=aa.causal(), backend=backend)

                            timed(same, f"{kind}/{backend} same-step", B)
                    except Exception as e:  # noqa: BLE001 - a refusal is a row of the table
                        print(f"{kind}/{backend:<34} B={B:<3} {type(e).__name__}: {str(e)[:160]}", flush=True)
            paged, seqs, _ = caches(B)

            def book():
                s = paged.step(seqs, 1)
                for layer in range(LAYERS):
                    s.write(layer, kn, kn)

            timed(book, "bookkeeping only (paged)", B)
            if dev.type == "cuda":
                raw_flex(B, C, extra, q, kn, timed, dt, dev)
        aa.clear_caches()

    if dev.type == "cuda" and not a.no_profile:
        profile_paged(int(a.batches.split(",")[len(a.batches.split(",")) // 2]), C, extra, dt, dev)
    print("\n| row | B | ms/step |\n|---|---|---|")
    for label, B, ms in results:
        print(f"| {label} | {B} | {ms:.3f} |")


def raw_flex(B, C, extra, q, kn, timed, dt, dev):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    flex = torch.compile(flex_attention, dynamic=False)
    N = C + extra
    kbuf = [torch.randn(B, HKV, N, D, device=dev, dtype=dt) for _ in range(LAYERS)]
    length = torch.full((B,), C, device=dev, dtype=torch.int32)

    def step():
        length.add_(1)
        pos = length - 1

        def mask_mod(b, h, q_idx, kv_idx):
            return kv_idx <= pos[b]

        bm = create_block_mask(mask_mod, B, None, 1, N, device=dev, BLOCK_SIZE=(128, PAGE))
        for layer in range(LAYERS):
            kbuf[layer].index_copy_(2, pos[:1].long(), kn[:, :, :1])  # the new key (row 0's slot: time only)
            flex(q, kbuf[layer], kbuf[layer], block_mask=bm, enable_gqa=True)

    timed(step, "raw flex (create_block_mask per step)", B)


def profile_paged(B, C, extra, dt, dev):
    per = -(-(C + extra) // PAGE)
    paged = aa.PagedKVCache(B * per, PAGE, HKV, D, layers=LAYERS, dtype=dt, device=dev)
    seqs = [paged.add_sequence() for _ in range(B)]
    paged.step(seqs, C)
    q = torch.randn(B, HQ, 1, D, device=dev, dtype=dt)
    kn = torch.randn(B, HKV, 1, D, device=dev, dtype=dt)

    def step():
        s = paged.step(seqs, 1)
        for layer in range(LAYERS):
            aa.attention(q, kv=s.write(layer, kn, kn), mask=aa.causal())

    def steps():
        for _ in range(3):
            step()

    with torch.no_grad():
        steps()
        torch.cuda.synchronize()
        print("\n" + profile_tables(steps, f"paged auto B={B} x3 steps"))


if __name__ == "__main__":
    main()
