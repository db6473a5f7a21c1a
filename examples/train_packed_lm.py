"""Train the anyattn decoder on synthetic packed documents.

One GPU or CPU:
    PYTHONPATH=src python3 examples/train_packed_lm.py --preset tiny --device cpu --steps 50
Several GPUs (FSDP2 data parallel, or tensor parallel over heads with --tp):
    PYTHONPATH=src torchrun --nproc-per-node 2 examples/train_packed_lm.py --preset 125m --steps 100

Every step packs a new set of documents into each row (lengths drawn at random), so the batch
structure changes every step: it reaches the model as device tensors (PackedBatch), and the
compiled model does not recompile. Each synthetic document is an arithmetic sequence of tokens
(start and stride drawn per document), so the loss falls as the model learns to continue it
within a document and to ignore its neighbours. The progress bar uses tqdm when installed
(``pip install anyattn[cli]``); without it a line is printed every ``--log-every`` steps.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import random
import time

import torch

from anyattn.models.decoder import DECODER_PRESETS, Decoder, apply_fsdp, apply_tensor_parallel, compile_blocks, decoder_flops
from anyattn.nn import PackedBatch


def synthetic_batch(rows: int, S: int, docs: int, vocab: int, rng: random.Random, device):
    """(input_ids (rows, S), PackedBatch, lengths per row): ``docs`` documents per row."""
    lengths = []
    ids = torch.empty(rows, S, dtype=torch.long)
    for r in range(rows):
        cuts = sorted(rng.sample(range(1, S), docs - 1)) if docs > 1 else []
        lens = [b - a for a, b in zip([0] + cuts, cuts + [S])]
        lengths.append(lens)
        pos = 0
        for n in lens:
            start, stride = rng.randrange(vocab), rng.randrange(1, 8)
            ids[r, pos : pos + n] = (start + stride * torch.arange(n)) % vocab
            pos += n
    batch = PackedBatch.from_lengths(lengths, total_length=S, device=device)
    return ids.to(device), batch, lengths


def main():
    ap = argparse.ArgumentParser(description="train the anyattn decoder on synthetic packed documents")
    ap.add_argument("--preset", default="tiny", choices=list(DECODER_PRESETS))
    ap.add_argument("--backend", default="auto", help="anyattn backend: auto, flex, sdpa, cudnn, eager, ...")
    ap.add_argument("--seqlen", type=int, default=None, help="tokens per row (default: 256 tiny, 4096 otherwise)")
    ap.add_argument("--rows", type=int, default=1, help="rows per rank")
    ap.add_argument("--docs", type=int, default=8, help="documents packed per row")
    ap.add_argument("--window", type=int, default=None, help="sliding window (keys before the query)")
    ap.add_argument("--global-every", type=int, default=0, help="every k-th layer full causal")
    ap.add_argument("--softcap", type=float, default=None)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--compile", default="none", choices=["none", "blocks", "model"])
    ap.add_argument("--tp", action="store_true", help="tensor parallel over heads instead of FSDP2")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--log-every", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    device = torch.device(args.device)
    mesh = None
    if world > 1:
        import torch.distributed as dist
        from torch.distributed.device_mesh import init_device_mesh

        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        mesh = init_device_mesh(device.type, (world,))

    S = args.seqlen or (256 if args.preset == "tiny" else 4096)
    cfg = dataclasses.replace(
        DECODER_PRESETS[args.preset], backend=args.backend, sliding_window=args.window,
        global_every=args.global_every, softcap=args.softcap,
    )  # fmt: skip
    bf16 = device.type == "cuda"
    torch.manual_seed(args.seed)
    model = Decoder(cfg).to(device)
    if args.compile == "blocks" and not (mesh is not None and args.tp):
        compile_blocks(model)  # before fully_shard: FSDP's hooks stay outside the compiled blocks
    if mesh is not None and args.tp:
        model = apply_tensor_parallel(model.to(torch.bfloat16) if bf16 else model, mesh)
        if args.compile == "blocks":
            compile_blocks(model)  # after parallelize_module: the blocks trace DTensor weights
    elif mesh is not None:
        from torch.distributed.fsdp import MixedPrecisionPolicy

        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else None
        apply_fsdp(model, mesh, mp_policy=mp)
    elif bf16:
        model = model.to(torch.bfloat16)
    step_model = torch.compile(model, fullgraph=True) if args.compile == "model" else model
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)

    # tensor parallel: every rank sees the same rows; FSDP: each rank its own
    rng = random.Random(args.seed + (0 if args.tp else rank))
    try:
        from tqdm import tqdm

        bar = tqdm(total=args.steps, disable=rank != 0, unit="step")
    except ImportError:
        bar = None
    tokens = flops = 0
    t0 = None
    for step in range(args.steps):
        ids, batch, lengths = synthetic_batch(args.rows, S, args.docs, cfg.vocab_size, rng, device)
        loss = step_model(ids, batch, batch.labels(ids)).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step == 0:  # compilation and warm-up stay out of the throughput
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
        else:
            tokens += args.rows * S
            flops += decoder_flops(cfg, args.rows * S, lengths)
        if bar is not None:
            bar.update(1)
            if step % args.log_every == 0 or step == args.steps - 1:
                bar.set_postfix(loss=f"{float(loss.detach()):.3f}")
        elif rank == 0 and (step % args.log_every == 0 or step == args.steps - 1):
            print(f"step {step:5d}  loss {float(loss.detach()):.4f}", flush=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    sec = time.perf_counter() - t0 if t0 is not None else float("nan")
    if bar is not None:
        bar.close()
    if rank == 0:
        ranks_with_own_data = 1 if args.tp else world
        tps = tokens * ranks_with_own_data / sec if sec > 0 else float("nan")
        mfu = f", MFU {100 * flops / sec / world / 790e12 * ranks_with_own_data:.1f}% of 790 TFLOP/s per GPU" if device.type == "cuda" else ""
        print(
            f"throughput: {tps:,.0f} tokens/s over {args.steps - 1} steps on {world} {device.type} rank(s) "
            f"(backend={args.backend}, preset={args.preset}, final loss {float(loss.detach()):.4f}{mfu})"
        )
    if world > 1:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
