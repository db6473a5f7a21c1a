"""Where the time of a new-packing call goes when the packing comes as a SeqInfo (GPU only).

    PYTHONPATH=src python3 benchmarks/seqinfo_probe.py [--steps 20]

Prints ms per step for: building the SeqInfo alone; flash_torch and auto fed the SeqInfo, the
host lengths list and the tensor, fwd+bwd (one 16k-token doc-causal row, H=16, D=128, bf16); the
backends auto ran; and the top host/device operators of one auto step in each form (torch.profiler).
"""

import argparse
import random
import time

import torch

from anyattn import SeqInfo, attention, causal, clear_caches, documents
from anyattn.bench.cases import doc_lengths
from anyattn.bench.timing import profile_tables
from anyattn.testing import record_calls


def packings(n, S, seed=0):
    """n packings of one S-token row, 8..24 documents each (as `bench kernels --mode new-packing`)."""
    rnd = random.Random(seed)
    return [list(doc_lengths(S, rnd.randint(8, 24), seed=rnd.randrange(1 << 30))) for _ in range(n)]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--seqlen", type=int, default=16384)
    a = ap.parse_args()
    dev = torch.device("cuda")
    S, H, D = a.seqlen, 16, 128
    q, k, v = (torch.randn(1, H, S, D, device=dev, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    dout = torch.randn(1, H, S, D, device=dev, dtype=torch.bfloat16)
    packs = packings(a.steps + 3, S)
    forms = {
        "seqinfo": lambda p: documents(SeqInfo.from_lengths(p, device=dev)) & causal(),
        "list": lambda p: documents(p) & causal(),
        "tensor": lambda p: documents(torch.tensor(p)) & causal(),
    }

    rows = [0]

    def timeit(fn, label):
        clear_caches()  # nothing lowered or seen by an earlier row
        rows[0] += 1
        packs[:] = packings(a.steps + 3, S, seed=rows[0])  # new packings for every row
        for p in packs[:3]:
            fn(p)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for p in packs[3:]:
            fn(p)
        torch.cuda.synchronize()
        ms = (time.perf_counter() - t0) / a.steps * 1e3
        print(f"{label:<34} {ms:9.3f} ms/step", flush=True)
        return ms

    timeit(lambda p: SeqInfo.from_lengths(p, device=dev), "SeqInfo.from_lengths only")
    timeit(lambda p: SeqInfo.from_lengths(p, device=dev).varlen(), "SeqInfo.from_lengths + varlen()")
    for backend in ("flash_torch", "auto"):
        for form, make in forms.items():
            def step(p, make=make, backend=backend):
                out = attention(q, k, v, mask=make(p), backend=backend)
                torch.autograd.grad(out, (q, k, v), dout)
            timeit(step, f"{backend} [{form}] fwd+bwd")
            with record_calls() as rec:  # on new packings, as the timed steps were
                for p in packings(3, S, seed=1000 + rows[0]):
                    step(p)
            ran = [c.backend for c in rec]
            print(f"   ran: {ran}")
    with torch.no_grad():  # forward only, the two backends alternated in one process
        for _ in range(2):
            for backend in ("flash_torch", "auto"):
                for form in ("tensor", "list", "seqinfo"):
                    make = forms[form]
                    timeit(lambda p, make=make, backend=backend: attention(q, k, v, mask=make(p), backend=backend),
                           f"{backend} [{form}] fwd")  # fmt: skip
    for form in ("seqinfo", "list"):
        make = forms[form]
        clear_caches()
        packs[:] = packings(8, S, seed=2000 + len(form))
        for p in packs[:2]:
            attention(q, k, v, mask=make(p), backend="auto")
        torch.cuda.synchronize()

        def steps(make=make):
            for p in packs[3:6]:
                out = attention(q, k, v, mask=make(p), backend="auto")
                torch.autograd.grad(out, (q, k, v), dout)

        print("\n" + profile_tables(steps, f"auto [{form}] x3", cpu_rows=12, width=60))


if __name__ == "__main__":
    main()
