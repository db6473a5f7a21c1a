"""Decoder training on 2 GPUs: FSDP2 scaling and context-parallel sequence length.

    PYTHONPATH=src python3 benchmarks/train_multigpu.py --out benchmarks/results/train_h200

Spawns its own NCCL processes (no torchrun needed). Two parts (``--part fsdp|cp|all``):

fsdp  The ~1.1B preset, bf16 compute (FSDP2 ``MixedPrecisionPolicy(param_dtype=bf16,
      reduce_dtype=fp32)``, float32 master weights), B=1 x S=16384 per GPU holding 16 packed
      documents, backend="auto" with the batch structure as device ids, every block compiled
      (fullgraph, before fully_shard). The same per-GPU batch on 1 GPU (fully_shard over a 1-GPU mesh: the same code
      path) and on 2 GPUs. Forward + backward (with FSDP's all-gathers and reduce-scatters), no
      optimizer step. Scaling efficiency = tokens/s on 2 GPUs / (2 x tokens/s on 1 GPU).

cp    Longest causal sequence (B=1, one document) whose forward + backward fits: 1 GPU without
      context parallel vs 2 GPUs with ``torch.distributed.tensor.experimental.context_parallel``
      (load-balanced ring attention over SDPA) plus FSDP2 over the same 2 ranks. Backend "cudnn"
      (``--cp-backend``), k/v repeated to the query heads (the ring handlers take no GQA).
      Uncompiled (a compile per length would dominate). Lengths from ``--cp-seqlens`` are tried
      in order until one fails (out of memory) or the time budget runs out; each success is
      written at once, so a crash keeps what was measured. Throughput is timed at each length
      that trained.

FLOPs: anyattn.models.decoder.decoder_flops (6 x matmul parameters x tokens + attention over the
visible causal pairs, backward 2.5x forward); MFU against 790 TFLOP/s per GPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import socket
import sys
import time
import traceback

import torch
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
PEAK = 790e12


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _init(rank, world, port, timeout_s=600):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=timeout_s))
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh("cuda", (world,))


def _write(path, obj):
    with open(path, "a") as f:
        f.write(json.dumps(obj) + "\n")


def _time(step, warmup, steps):
    for i in range(warmup):
        step(i)
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for i in range(steps):
        step(warmup + i)
    b.record()
    torch.cuda.synchronize()
    return a.elapsed_time(b) / 1e3 / steps


def fsdp_worker(rank, world, port, args, path):
    import torch.distributed as dist
    from torch.distributed.fsdp import MixedPrecisionPolicy

    from anyattn.models.decoder import DECODER_PRESETS, Decoder, apply_fsdp, compile_blocks, decoder_flops
    from anyattn.nn import PackedBatch
    from train_bench import packings

    mesh = _init(rank, world, port)
    try:
        cfg = dataclasses.replace(DECODER_PRESETS[args.preset], backend="auto")
        S = args.seqlen
        packs = packings(4, S, args.docs, seed=rank)  # a different packing per rank and step
        torch.manual_seed(0)
        model = Decoder(cfg).cuda()
        compile_blocks(model)  # before fully_shard: FSDP's hooks stay outside the compiled blocks
        apply_fsdp(model, mesh, mp_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32))
        batches = [PackedBatch.from_lengths([p], total_length=S, device="cuda") for p in packs]
        g = torch.Generator().manual_seed(10 + rank)
        ids = [torch.randint(0, cfg.vocab_size, (1, S), generator=g).cuda() for _ in packs]
        labels = [b.labels(x) for b, x in zip(batches, ids)]
        params = list(model.parameters())

        def step(i):
            j = i % len(packs)
            model(ids[j], batches[j], labels[j]).loss.backward()
            for p in params:
                p.grad = None

        t0 = time.perf_counter()
        step(0)
        torch.cuda.synchronize()
        first = time.perf_counter() - t0
        sec = _time(step, args.warmup, args.steps)
        flops = sum(decoder_flops(cfg, S, [p]) for p in packs) / len(packs)
        t = torch.tensor([sec], device="cuda")
        dist.all_reduce(t, op=dist.ReduceOp.MAX)  # the step ends when the slowest rank ends
        sec = float(t)
        if rank == 0:
            _write(path, {
                "part": "fsdp", "gpus": world, "preset": args.preset, "seqlen_per_gpu": S, "docs": args.docs,
                "step_ms": sec * 1e3, "tokens_per_s": world * S / sec, "tokens_per_s_per_gpu": S / sec,
                "tflops_per_s_per_gpu": flops / sec / 1e12, "mfu": flops / sec / PEAK, "first_step_s": first,
                "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30,
            })  # fmt: skip
    finally:
        dist.destroy_process_group()


def cp_worker(rank, world, port, args, path, seqlens):
    import torch.distributed as dist
    from torch.distributed.fsdp import MixedPrecisionPolicy

    from anyattn.models.decoder import DECODER_PRESETS, Decoder, apply_fsdp, decoder_flops, prepare_context_parallel
    from anyattn.nn import PackedBatch

    mesh = _init(rank, world, port, timeout_s=args.cp_timeout)
    try:
        cfg = dataclasses.replace(DECODER_PRESETS[args.preset], backend=args.cp_backend)
        torch.manual_seed(0)
        model = prepare_context_parallel(Decoder(cfg).cuda())
        apply_fsdp(model, mesh, mp_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32))
        params = list(model.parameters())
        t_start = time.perf_counter()
        for S in seqlens:
            if time.perf_counter() - t_start > args.cp_budget:
                if rank == 0:
                    _write(path, {"part": "cp", "gpus": world, "seqlen": S, "status": "not tried (time budget)"})
                break
            ids = torch.randint(0, cfg.vocab_size, (1, S), device="cuda", generator=torch.Generator("cuda").manual_seed(1))
            labels = torch.full_like(ids, -100)
            labels[:, :-1] = ids[:, 1:]
            pos = torch.arange(S, device="cuda")[None].contiguous()

            def run_step(_i):
                if world == 1:
                    loss = model(ids, PackedBatch(pos), labels).loss
                    loss.backward()
                else:
                    from torch.distributed.tensor.experimental import context_parallel

                    cids, clab, cpos = ids.clone(), labels.clone(), pos.clone()
                    with context_parallel(mesh, buffers=[cids, clab, cpos], buffer_seq_dims=[1, 1, 1]):
                        loss = model(cids, PackedBatch(cpos), clab).loss
                        loss.backward()
                for p in params:
                    p.grad = None

            ok = torch.ones(1, device="cuda")
            err = ""
            torch.cuda.reset_peak_memory_stats()
            try:
                run_step(0)
                torch.cuda.synchronize()
            except torch.OutOfMemoryError as e:
                ok.zero_()
                err = str(e).split("\n")[0][:200]
            for p in params:
                p.grad = None
            torch.cuda.empty_cache()
            dist.all_reduce(ok, op=dist.ReduceOp.MIN)  # a rank that ran out of memory ends the probe for all
            if float(ok) == 0:
                if rank == 0:
                    _write(path, {"part": "cp", "gpus": world, "seqlen": S, "status": "out of memory", "error": err})
                break
            sec = _time(run_step, 0, args.cp_steps)
            t = torch.tensor([sec], device="cuda")
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            sec = float(t)
            flops = decoder_flops(cfg, S, [[S]])  # whole sequence; split over the ranks
            if rank == 0:
                _write(path, {
                    "part": "cp", "gpus": world, "seqlen": S, "status": "trained", "backend": args.cp_backend,
                    "step_s": sec, "tokens_per_s": S / sec, "tflops_per_s_per_gpu": flops / sec / world / 1e12,
                    "mfu": flops / sec / world / PEAK, "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30,
                })  # fmt: skip
    finally:
        dist.destroy_process_group()


def _spawn(fn, world, *a):
    try:
        mp.spawn(fn, args=(world, _port(), *a), nprocs=world, join=True)
        return None
    except Exception as e:  # noqa: BLE001 - recorded; what was written before the failure is kept
        traceback.print_exc()
        return f"{type(e).__name__}: {str(e)[-400:]}"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--part", default="all", choices=["all", "fsdp", "cp"])
    ap.add_argument("--preset", default="1b")
    ap.add_argument("--seqlen", type=int, default=16384)
    ap.add_argument("--docs", type=int, default=16)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--cp-backend", default="cudnn", choices=["cudnn", "sdpa"])
    ap.add_argument("--cp-seqlens", default="32768,65536,98304,131072,163840,196608,262144")
    ap.add_argument("--cp-steps", type=int, default=2)
    ap.add_argument("--cp-budget", type=float, default=60.0, help="seconds of probing per GPU count")
    ap.add_argument("--cp-timeout", type=int, default=120, help="NCCL timeout of the probe (a rank stuck after another's failure)")
    args = ap.parse_args()
    if torch.cuda.device_count() < 2:
        raise SystemExit(f"needs 2 CUDA GPUs, found {torch.cuda.device_count()}")
    os.makedirs(args.out, exist_ok=True)
    # one record file per part: `--part fsdp` and `--part cp` may run as two commands, and the
    # summary below reads whatever both have left
    paths = {part: os.path.join(args.out, f"train_multigpu_{part}.jsonl") for part in ("fsdp", "cp")}
    errors = {}
    seqlens = [int(x) for x in args.cp_seqlens.split(",")]
    for part, fn, extra in (("fsdp", fsdp_worker, ()), ("cp", cp_worker, (seqlens,))):
        if args.part not in ("all", part):
            continue
        if os.path.exists(paths[part]):
            os.remove(paths[part])
        for world in (1, 2):
            errors[f"{part}{world}"] = _spawn(fn, world, args, paths[part], *extra)
    rows = [json.loads(x) for p in paths.values() if os.path.exists(p) for x in open(p)]
    f1 = next((r for r in rows if r["part"] == "fsdp" and r["gpus"] == 1), None)
    f2 = next((r for r in rows if r["part"] == "fsdp" and r["gpus"] == 2), None)
    eff = f2["tokens_per_s"] / (2 * f1["tokens_per_s"]) if f1 and f2 else math.nan
    longest = {w: max((r["seqlen"] for r in rows if r["part"] == "cp" and r["gpus"] == w and r["status"] == "trained"), default=0) for w in (1, 2)}
    meta = {
        "command": "PYTHONPATH=src python3 benchmarks/train_multigpu.py " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()),
        "torch": torch.__version__, "gpu": torch.cuda.get_device_name(), "fsdp_scaling_efficiency": eff,
        "cp_longest_seqlen": longest, "errors": errors,
    }  # fmt: skip
    with open(os.path.join(args.out, "train_multigpu.json"), "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    lines = [f"# Decoder training on 2 GPUs, {meta['gpu']}, torch {meta['torch']}", "", f"`{meta['command']}`", "",
             "## FSDP2, same per-GPU batch", "", "| GPUs | tokens/s | tokens/s/GPU | TFLOP/s/GPU | MFU | step ms | peak GiB |", "|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in (f1, f2):
        if r:
            lines.append(f"| {r['gpus']} | {r['tokens_per_s']:.0f} | {r['tokens_per_s_per_gpu']:.0f} | {r['tflops_per_s_per_gpu']:.0f} | {100 * r['mfu']:.1f}% | {r['step_ms']:.0f} | {r['peak_mem_gib']:.1f} |")
    lines += ["", f"Scaling efficiency 2 GPUs vs 1: {100 * eff:.1f}%", "", f"## Context parallel ({args.cp_backend}, causal, B=1)", "",
              "| GPUs | seqlen | status | tokens/s | TFLOP/s/GPU | MFU | step s | peak GiB |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        if r["part"] != "cp":
            continue
        if r["status"] == "trained":
            lines.append(f"| {r['gpus']} | {r['seqlen']} | trained | {r['tokens_per_s']:.0f} | {r['tflops_per_s_per_gpu']:.0f} | {100 * r['mfu']:.1f}% | {r['step_s']:.2f} | {r['peak_mem_gib']:.1f} |")
        else:
            lines.append(f"| {r['gpus']} | {r['seqlen']} | {r['status']} | | | | | |")
    lines += ["", f"Longest sequence that trained: 1 GPU {longest[1]}, 2 GPUs (context parallel) {longest[2]}"]
    if any(errors.values()):
        lines += ["", "Errors: " + "; ".join(f"{k}: {v[:200]}" for k, v in errors.items() if v)]
    md = "\n".join(lines) + "\n"
    with open(os.path.join(args.out, "train_multigpu.md"), "w") as f:
        f.write(md)
    print(md)


if __name__ == "__main__":
    main()
