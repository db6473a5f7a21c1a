"""Where the embed job and the packed ESM2 forward make the host wait for the GPU (probe).

    PYTHONPATH=src python3 benchmarks/sync_probe.py OUT_DIR

Runs ``anyattn.embed.embed`` (ESM2 t12_35M shape, random weights, bf16, compiled layers) on a small
FASTA twice: the first run warms caches; the second runs under
``torch.cuda.set_sync_debug_mode("warn")``, which warns at every synchronizing CUDA call
(pageable copies, ``.item()``, ``nonzero``, stream syncs). Each warning is recorded with the
anyattn frames of its stack. A sync inside a batch's submission leaves the GPU idle while the
host prepares the next batch; the one expected wait is the job's own, on the previous batch's
event before its rows are written. Writes sync_probe.json; prints the distinct call sites.
"""

from __future__ import annotations

import collections
import json
import os
import random
import sys
import tempfile
import traceback
import warnings

import torch

from anyattn.embed import embed
from anyattn.models import ESM2Config, ESM2ForMaskedLM

AA = "ACDEFGHIKLMNPQRSTVWY"


def main(out: str) -> int:
    os.makedirs(out, exist_ok=True)
    work = tempfile.mkdtemp(prefix="sync_probe_")
    rng = random.Random(0)
    fasta = os.path.join(work, "in.fasta")
    with open(fasta, "w") as f:
        for i in range(300):
            f.write(f">s{i}\n{''.join(rng.choices(AA, k=rng.randint(30, 900)))}\n")
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = ESM2ForMaskedLM(ESM2Config.from_name("esm2_t12_35M"))
    model = model.to(torch.bfloat16).eval()
    # compile=True pads every batch to max_tokens: the model then asks which backend serves the
    # packed row (the path that materialized dense masks before), as the embed job does
    kw = dict(model=model, pooling="mean", dtype="bf16", max_tokens=8192, devices="cuda", compile=True, progress=False)
    embed(fasta, out=os.path.join(work, "warm.sqlite"), **kw)

    sites: collections.Counter = collections.Counter()
    first: dict = {}

    def record(message, category, filename, lineno, file=None, line=None):
        stack = [f for f in traceback.extract_stack()[:-1] if "anyattn" in f.filename or "embed" in f.filename]
        key = " <- ".join(f"{os.path.basename(f.filename)}:{f.lineno} {f.name}" for f in reversed(stack[-4:]))
        key = f"{str(message).splitlines()[0][:60]} @ {key}"
        sites[key] += 1
        first.setdefault(key, "".join(traceback.format_list(stack[-8:])))

    old = warnings.showwarning
    warnings.showwarning = record
    torch.cuda.synchronize()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = record
            torch.cuda.set_sync_debug_mode("warn")
            s = embed(fasta, out=os.path.join(work, "probe.sqlite"), **kw)
    finally:
        torch.cuda.set_sync_debug_mode("default")
        warnings.showwarning = old
    doc = {"batches": s.batches, "sites": [{"site": k, "count": n, "stack": first[k]} for k, n in sites.most_common()]}
    with open(os.path.join(out, "sync_probe.json"), "w") as f:
        json.dump(doc, f, indent=1)
    print(f"sync probe: {s.batches} batches, {sum(sites.values())} synchronizing calls at {len(sites)} sites")
    for k, n in sites.most_common(12):
        print(f"  {n:5d}  {k}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "."))
