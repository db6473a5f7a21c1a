"""Why the embed job runs slower than the model's forward alone: the job's loop under three ways
of moving host tensors to the GPU, with its phase breakdown, next to the forward alone (probe).

    PYTHONPATH=src python3 benchmarks/embed_h2d_probe.py OUT_DIR [NUM_SEQS]

Variants (monkeypatched in this process only):
  pinned    the library's path: pinned memory, non-blocking copies (no host sync)
  pageable  ``t.to(device, non_blocking=True)`` from pageable memory
  sync      ``t.to(device)``: a synchronizing copy (what ``torch.tensor(..., device=)`` does)
Same compiled ESM2-650M shape model, same FASTA (lognormal lengths), 16k-token batches padded to
one shape. Each variant and the forward alone run twice, interleaved; medians reported.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from embed_bench import forward_alone, write_fasta  # noqa: E402

from anyattn.backends import _varlen as varlen  # noqa: E402
import anyattn.layout as layout  # noqa: E402
from anyattn.bench.model import make_lengths  # noqa: E402
from anyattn.embed import embed  # noqa: E402
from anyattn.embed import job as job_mod  # noqa: E402
from anyattn.models import ESM2Config, ESM2ForMaskedLM  # noqa: E402

VARIANTS = {
    "pinned": lambda t, d: t.pin_memory().to(d, non_blocking=True),
    "pageable": lambda t, d: t.to(d, non_blocking=True),
    "sync": lambda t, d: t.to(d),
}


def main(out: str, n: int) -> int:
    os.makedirs(out, exist_ok=True)
    work = tempfile.mkdtemp(prefix="h2d_probe_")
    fasta = os.path.join(work, "in.fasta")
    write_fasta(fasta, make_lengths(n, 320.0, 0.58, 30, 1022, 0), 0)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = ESM2ForMaskedLM(ESM2Config.from_name("esm2_t33_650M"))
    model = model.to(torch.bfloat16).eval()
    kw = dict(model=model, pooling="mean", dtype="bf16", max_tokens=16384, devices="cuda", compile=True, progress=False)
    embed(fasta, out=os.path.join(work, "warm.sqlite"), **kw)
    orig_h2d = layout.host_to_device
    res = {k: [] for k in [*VARIANTS, "forward"]}
    phases = {}
    try:
        for rep in range(2):
            for name, fn in VARIANTS.items():
                layout.host_to_device = varlen.host_to_device = job_mod.host_to_device = lambda t, d, fn=fn: fn(t, torch.device(d))
                s = embed(fasta, out=os.path.join(work, f"{name}{rep}.sqlite"), **kw)
                res[name].append(s.run_s)
                phases[name] = s.phases
            layout.host_to_device = varlen.host_to_device = job_mod.host_to_device = orig_h2d
            fwd_s, tokens, _, _ = forward_alone(model, fasta, 16384, True, "cuda")
            res["forward"].append(fwd_s)
    finally:
        layout.host_to_device = varlen.host_to_device = job_mod.host_to_device = orig_h2d
    # host cost of launching one batch's forward (GPU idle before, so the launch queue never
    # blocks): if it approaches the GPU time per batch, the job's loop is host-bound
    from anyattn.layout import SeqInfo

    enc, launch = model.esm, []
    ids = torch.randint(4, 24, (1, 16384), device="cuda")
    with torch.inference_mode():
        for i in range(8):
            info = SeqInfo.from_lengths([400 + i] * 40, total_length=16384, device="cuda")
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            enc(ids, seq_info=info)
            t1 = time.perf_counter()
            torch.cuda.synchronize()
            launch.append((t1 - t0, time.perf_counter() - t0))
    host_ms = statistics.median(a for a, _ in launch[2:]) * 1e3
    total_ms = statistics.median(b for _, b in launch[2:]) * 1e3
    print(f"one 16k-token batch (40 x ~400): host launch {host_ms:.1f} ms, launch to done {total_ms:.1f} ms")
    med = {k: statistics.median(v) for k, v in res.items()}
    doc = {"num_seqs": n, "tokens": tokens, "runs_s": res, "median_s": med, "phases": phases,
           "launch_one_batch_ms": {"host": host_ms, "launch_to_done": total_ms}}
    with open(os.path.join(out, "embed_h2d_probe.json"), "w") as f:
        json.dump(doc, f, indent=1)
    print(f"embed h2d probe: {n} sequences, {tokens} tokens")
    for k, v in med.items():
        loss = 1 - med["forward"] / v
        ph = ", ".join(f"{a} {b:.2f}" for a, b in phases.get(k, {}).items())
        print(f"  {k:<9} {v:6.2f} s  {tokens / v:9,.0f} tok/s  loss {100 * loss:5.1f}%  {ph}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else ".", int(sys.argv[2]) if len(sys.argv) > 2 else 6000))
