"""Training throughput of the anyattn decoder on one GPU: anyattn auto vs the dense-mask SDPA
approach vs flex vs flash_torch, on packed documents.

    PYTHONPATH=src python3 benchmarks/train_bench.py --out benchmarks/results/train_h200

Default case (issue 9): the ~1.1B preset (``DECODER_PRESETS["1b"]``: 16 layers, width 2048, 16
query / 4 kv heads of 128, SwiGLU 8192, vocab 32000), bf16 weights, B=1 x S=16384 tokens holding
16 packed documents (lengths drawn uniformly in 128..2048 and rescaled to fill the row; a new
packing every step, cycling through ``--packings`` of them), causal document masking,
forward + backward (no optimizer step), every block compiled with ``torch.compile(fullgraph=True)``
(``--compile model`` compiles the whole model instead).

Cases (same weights, same batches):
    auto            backend="auto", batch structure as device tensors (PackedBatch ids)
    sdpa_dense      backend="sdpa": the document mask materialized as a dense (B, 1, S, S) mask
                    and handed to F.scaled_dot_product_attention, k/v heads repeated to the query
                    heads first (HF's repeat_kv; SDPA's memory-efficient kernel takes a mask but
                    no GQA) -- what training frameworks do today
    flex            backend="flex" (ids)
    flash_torch     backend="flash_torch": varlen_attn with cu_seqlens (PackedBatch host=True);
                    host metadata is part of the compiled graph's guards, so this case keeps ONE
                    packing for every step (a new packing would compile again)

FLOPs per step (decoder_flops): 6 x (parameters in matrix products, lm head included, embedding
lookup excluded) x tokens + attention 4 * Hq * D * (visible causal pairs inside documents) x 3.5
(forward + 2.5x backward), per layer. MFU = FLOP/s / 790e12 (bf16 dense matmul peak measured on
this machine kind, DESIGN.md section 6).

Before timing, each case's loss and gradients are checked against the float64 eager oracle on a
reduced model (2 layers of the same width, S=2048, 4 documents), DESIGN.md tolerance relative to
eager in bf16. Timing: CUDA events around ``--steps`` steps after ``--warmup`` steps; the first
step (compilation) is reported separately. A failing case records NaN and the run goes on.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import os
import random
import time
import traceback

import torch

import anyattn as aa
from anyattn.models.decoder import DECODER_PRESETS, Decoder, compile_blocks, decoder_flops
from anyattn.nn import PackedBatch

PEAK = 790e12
DEVICE = "cuda"  # --device cpu: a smoke run of the script itself (tiny preset), not a measurement


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    backend: str
    host: bool  # PackedBatch(host=True): documents(SeqInfo), varlen-capable, guards on the packing
    expand_kv: bool = False  # repeat k/v heads before the call (as HF does for SDPA with a mask)


CASES = {
    "auto": Case("auto", "auto", False),
    "sdpa_dense": Case("sdpa_dense", "sdpa", False, expand_kv=True),
    "flex": Case("flex", "flex", False),
    "flash_torch": Case("flash_torch", "flash_torch", True),
}


def packings(n: int, S: int, docs: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        lens = [rng.randint(128, 2048) for _ in range(docs)]
        tot = sum(lens)
        lens = [max(1, x * S // tot) for x in lens]
        lens[-1] += S - sum(lens)
        out.append(lens)
    return out


def _loss_grads(model, dtype, backend, lens, S, host, expand_kv=False):
    m = copy.deepcopy(model).to(dtype)
    m.set_backend(backend)
    for block in m.layers:
        block.attention.expand_kv = expand_kv
    batch = PackedBatch.from_lengths([lens], total_length=S, device=DEVICE, host=host)
    ids = torch.randint(0, m.config.vocab_size, (1, S), generator=torch.Generator().manual_seed(3)).to(DEVICE)
    loss = m(ids, batch, batch.labels(ids)).loss
    loss.backward()
    return loss.detach().double(), {n: p.grad.double() for n, p in m.named_parameters()}


def check(case: Case, cfg) -> dict:
    """Loss/gradients of a 2-layer model of the same width vs the float64 eager oracle."""
    small = dataclasses.replace(cfg, n_layers=2, backend="eager")
    torch.manual_seed(0)
    model = Decoder(small).to(DEVICE)
    S, lens = 2048, [300, 900, 48, 800]
    lo, go = _loss_grads(model, torch.float64, "eager", lens, S, False)
    le, ge = _loss_grads(model, torch.bfloat16, "eager", lens, S, False)
    lb, gb = _loss_grads(model, torch.bfloat16, case.backend, lens, S, case.host, case.expand_kv)
    loss_err, loss_bound = float((lb - lo).abs()), 2 * float((le - lo).abs()) + 1e-5
    worst = 0.0
    for n in go:
        e, bound = float((gb[n] - go[n]).abs().max()), 3 * float((ge[n] - go[n]).abs().max()) + 1e-4
        worst = max(worst, e / bound)
    del model
    _empty()
    return {"loss_err": loss_err, "loss_bound": loss_bound, "grad_err_over_bound": worst, "ok": loss_err <= loss_bound and worst <= 1.0}


def time_case(case: Case, cfg, packs, args) -> dict:
    torch._dynamo.reset()
    aa.clear_caches()
    torch.manual_seed(0)
    model = Decoder(dataclasses.replace(cfg, backend=case.backend)).to(DEVICE).to(torch.bfloat16)
    for block in model.layers:
        block.attention.expand_kv = case.expand_kv
    if args.compile == "blocks":
        compile_blocks(model)
        step_model = model
    elif args.compile == "model":
        step_model = torch.compile(model, fullgraph=True)
    else:
        step_model = model
    S = args.seqlen
    used = packs[:1] if case.host else packs
    batches = [PackedBatch.from_lengths([p], total_length=S, device=DEVICE, host=case.host) for p in used]
    g = torch.Generator().manual_seed(5)
    ids = [torch.randint(0, cfg.vocab_size, (1, S), generator=g).to(DEVICE) for _ in used]
    labels = [b.labels(x) for b, x in zip(batches, ids)]
    params = list(model.parameters())

    def step(i):
        j = i % len(used)
        loss = step_model(ids[j], batches[j], labels[j]).loss
        loss.backward()
        for p in params:
            p.grad = None
        return loss

    cuda = DEVICE == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    first_loss = float(step(0))
    sync()
    compile_s = time.perf_counter() - t0
    for i in range(1, args.warmup + 1):
        step(i)
    sync()
    if cuda:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
    t1 = time.perf_counter()
    for i in range(args.steps):
        step(args.warmup + 1 + i)
    if cuda:
        end.record()
    sync()
    sec = (start.elapsed_time(end) / 1e3 if cuda else time.perf_counter() - t1) / args.steps
    steps_used = [used[(args.warmup + 1 + i) % len(used)] for i in range(args.steps)]
    flops = sum(decoder_flops(cfg, S, [p]) for p in steps_used) / args.steps
    dense_flops = decoder_flops(cfg, S)  # without attention: for reference
    out = {
        "case": case.name, "backend": case.backend, "host_metadata": case.host, "packings_cycled": len(used),
        "step_ms": sec * 1e3, "tokens_per_s": S / sec, "tflops_per_s": flops / sec / 1e12, "mfu": flops / sec / PEAK,
        "flops_per_step": flops, "attention_share_of_flops": 1 - dense_flops / flops, "first_step_s": compile_s,
        "first_loss": first_loss, "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else math.nan,
    }  # fmt: skip
    model = step_model = None  # free the weights before the next case
    _empty()
    return out


def _empty():
    if DEVICE == "cuda":
        torch.cuda.empty_cache()


def auto_choice(cfg, S, lens) -> str:
    """What backend="auto" picks for one layer's training call on this batch."""
    D = cfg.dim // cfg.n_heads
    q = torch.empty(1, cfg.n_heads, S, D, device=DEVICE, dtype=torch.bfloat16 if DEVICE == "cuda" else torch.float32, requires_grad=True)
    k = torch.empty(1, cfg.n_kv_heads, S, D, device=DEVICE, dtype=torch.bfloat16 if DEVICE == "cuda" else torch.float32, requires_grad=True)
    batch = PackedBatch.from_lengths([lens], total_length=S, device=DEVICE)
    d = aa.explain(q, k, k, mask=aa.same_segment(batch.doc_ids) & aa.causal())
    return str(d.chosen)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--preset", default="1b", choices=list(DECODER_PRESETS))
    ap.add_argument("--seqlen", type=int, default=16384)
    ap.add_argument("--docs", type=int, default=16)
    ap.add_argument("--packings", type=int, default=4)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--compile", default="blocks", choices=["blocks", "model", "none"])
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--no-check", action="store_true")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    args = ap.parse_args()
    global DEVICE
    DEVICE = args.device
    os.makedirs(args.out, exist_ok=True)
    cfg = DECODER_PRESETS[args.preset]
    packs = packings(args.packings, args.seqlen, args.docs)
    meta = {
        "command": "PYTHONPATH=src python3 benchmarks/train_bench.py " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if v not in (False, None)),
        "torch": torch.__version__, "gpu": torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu", "preset": args.preset, "params": cfg.num_params(),
        "seqlen": args.seqlen, "docs": args.docs, "packings": packs, "compile": args.compile, "peak_flops": PEAK,
        "auto_picks": auto_choice(cfg, args.seqlen, packs[0]),
    }  # fmt: skip
    rows = []
    for name in args.cases.split(","):
        case = CASES[name]
        row = {"case": name}
        try:
            if not args.no_check:
                row["check"] = check(case, cfg)
            row.update(time_case(case, cfg, packs, args))
        except Exception as e:  # noqa: BLE001 - a failing case is recorded and the run goes on
            row.update(error=f"{type(e).__name__}: {str(e)[:500]}", tokens_per_s=math.nan, mfu=math.nan)
            traceback.print_exc()
            torch._dynamo.reset()
            _empty()
        rows.append(row)
        print(json.dumps(row), flush=True)
    # rows of earlier runs into the same --out (e.g. --cases auto,sdpa_dense then --cases
    # flex,flash_torch) are kept unless this run measured the same case again
    jpath = os.path.join(args.out, "train_bench.json")
    if os.path.exists(jpath):
        with open(jpath) as f:
            old = json.load(f)
        same = all(old.get("meta", {}).get(k) == meta[k] for k in ("preset", "seqlen", "docs", "compile", "gpu"))
        if same:
            mine = {r["case"] for r in rows}
            rows = [r for r in old["rows"] if r["case"] not in mine] + rows
            rows.sort(key=lambda r: list(CASES).index(r["case"]) if r["case"] in CASES else 99)
    base = next((r["tokens_per_s"] for r in rows if r["case"] == "sdpa_dense"), math.nan)
    for r in rows:
        r["speedup_vs_sdpa_dense"] = r["tokens_per_s"] / base if base == base and base else math.nan
    with open(jpath, "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    lines = [
        f"# Decoder training throughput, {meta['gpu']}, torch {meta['torch']}",
        "",
        f"`{meta['command']}`",
        "",
        f"Preset {args.preset} ({cfg.num_params() / 1e9:.2f}B parameters), bf16, B=1 x S={args.seqlen}, {args.docs} packed "
        f"documents per row, forward+backward, compile={args.compile}. auto picks `{meta['auto_picks']}`. MFU against "
        f"{PEAK / 1e12:.0f} TFLOP/s.",
        "",
        "| case | check vs float64 oracle | step ms | tokens/s | TFLOP/s | MFU | x sdpa_dense | first step s | peak GiB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        chk = r.get("check", {})
        ok = "pass" if chk.get("ok") else ("FAIL" if chk else "-")
        if "error" in r:
            lines.append(f"| {r['case']} | {ok} | error: {r['error'][:80]} | nan | | | | | |")
            continue
        lines.append(
            f"| {r['case']} | {ok} | {r['step_ms']:.1f} | {r['tokens_per_s']:.0f} | {r['tflops_per_s']:.0f} | "
            f"{100 * r['mfu']:.1f}% | {r['speedup_vs_sdpa_dense']:.2f} | {r['first_step_s']:.1f} | {r['peak_mem_gib']:.1f} |"
        )
    md = "\n".join(lines) + "\n"
    with open(os.path.join(args.out, "train_bench.md"), "w") as f:
        f.write(md)
    print()
    print(md)


if __name__ == "__main__":
    main()
