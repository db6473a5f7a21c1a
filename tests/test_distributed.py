"""Distributed training of the anyattn decoder on PyTorch's own engines: FSDP2 (``fully_shard``),
tensor parallel over heads (DTensor ``parallelize_module``), context parallel
(``torch.distributed.tensor.experimental.context_parallel``).

Every case compares the sharded loss and gradients with the same model on one process, against a
float64 oracle (DESIGN.md tolerance: sharded error <= 2x (loss) / 3x (gradients) the one-process
error + 1e-5 / 1e-4). CPU: gloo, 2 spawned processes, tiny model (FSDP2 and TP). ``multigpu``:
NCCL on 2 GPUs, bf16, for each backend that supports the mode; context parallel needs CUDA.
"""

from __future__ import annotations

import copy
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from anyattn.models.decoder import (
    context_parallel_backends,
    Decoder,
    DecoderConfig,
    apply_fsdp,
    apply_tensor_parallel,
    prepare_context_parallel,
)
from anyattn.nn import PackedBatch

LENS = [[10, 12, 6], [32], [3, 29], [16, 16]]  # 4 packed rows of 32 tokens


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _data(S: int, lens, device, vocab: int):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (len(lens), S), generator=g).to(device)
    return ids


def _loss_sum(model, ids, batch):
    logits = model(ids, batch).logits
    labels = batch.labels(ids)
    return torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum")


def _one_process(model, dtype, ids, batch, count):
    m = copy.deepcopy(model).to(dtype)
    loss = _loss_sum(m, ids, batch) / count
    loss.backward()
    return loss.detach().double(), {n: p.grad.double() for n, p in m.named_parameters()}


def _check(tag, loss, grads, ref, one, rank):
    lo, go = ref
    l1, g1 = one
    le = float((loss - lo).abs())
    assert le <= 2 * float((l1 - lo).abs()) + 1e-5, f"{tag} rank {rank}: loss error {le}"
    for n in go:
        e = float((grads[n] - go[n]).abs().max())
        bound = 3 * float((g1[n] - go[n]).abs().max()) + 1e-4
        assert e <= bound, f"{tag} rank {rank}: grad {n} error {e} > {bound}"


def _full(g):
    return g.full_tensor() if hasattr(g, "full_tensor") else g


def _worker(rank, world, port, device_type, modes, backend, dtype_name, host):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("nccl" if device_type == "cuda" else "gloo", rank=rank, world_size=world)
    try:
        device = torch.device(device_type, rank) if device_type == "cuda" else torch.device("cpu")
        if device_type == "cuda":
            torch.cuda.set_device(device)
        mesh = init_device_mesh(device_type, (world,))
        dtype = getattr(torch, dtype_name)
        S = 32 if device_type == "cpu" else 1024
        lens = LENS if device_type == "cpu" else [[100, 300, 24, 600], [1024], [512, 0, 500], [1000]]
        variant = dict(sliding_window=5 if S == 32 else 128, global_every=2)
        if backend in ("eager", "flex"):
            variant.update(softcap=20.0, logit_clip=(0.01, 0.02, 0.04, 0.08) if S == 32 else (0.02, 0.05, 0.1, 0.2))
        base = DecoderConfig.from_name("tiny") if device_type == "cpu" else DecoderConfig.from_name(
            "tiny", dim=256, n_heads=4, n_kv_heads=2, ffn_dim=512, vocab_size=512
        )
        cfg = DecoderConfig.from_name("tiny", **{**base.__dict__, **variant, "backend": backend})
        torch.manual_seed(0)
        model = Decoder(cfg).to(device)
        ids = _data(S, lens, device, cfg.vocab_size)
        batch = PackedBatch.from_lengths(lens, total_length=S, device=device, host=host)
        count = int((batch.labels(ids) != -100).sum())
        oracle = copy.deepcopy(model)
        oracle.set_backend("eager")  # the float64 oracle (flex, flash and cuDNN take no float64)
        ref = _one_process(oracle, torch.float64, ids, batch, count)
        one = _one_process(model, dtype, ids, batch, count)  # the same backend on one process
        if "fsdp" in modes:
            from torch.distributed.fsdp import MixedPrecisionPolicy

            m = copy.deepcopy(model)
            mp_policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32) if dtype != torch.float32 else None
            apply_fsdp(m, mesh, mp_policy=mp_policy)
            rows = len(lens) // world
            sl = slice(rank * rows, (rank + 1) * rows)
            local = PackedBatch.from_lengths(lens[sl], total_length=S, device=device, host=host)
            # FSDP averages gradients over ranks: scale the per-rank share of the global sum
            loss = _loss_sum(m, ids[sl], local) / count * world
            loss.backward()
            total = loss.detach().double() / world
            dist.all_reduce(total)
            grads = {n: _full(p.grad).double() for n, p in m.named_parameters()}
            _check(f"fsdp/{backend}", total, grads, ref, one, rank)
        if "tp" in modes:
            m = copy.deepcopy(model).to(dtype)
            apply_tensor_parallel(m, mesh)
            loss = _loss_sum(m, ids, batch) / count
            loss.backward()
            grads = {n: _full(p.grad).double() for n, p in m.named_parameters()}
            _check(f"tp/{backend}", loss.detach().double(), grads, ref, one, rank)
        if "cp" in modes:
            _context_parallel_case(rank, world, mesh, device, dtype, backend)
    finally:
        dist.destroy_process_group()


def _context_parallel_case(rank, world, mesh, device, dtype, backend):
    """One 4096-token causal sequence per row, sharded over the ranks with torch's
    context_parallel (load-balanced head/tail split); gradients all-reduced by the test."""
    import torch.distributed as dist
    from torch.distributed.tensor.experimental import context_parallel

    S = 4096
    cfg = DecoderConfig.from_name("tiny", dim=256, n_heads=4, n_kv_heads=2, ffn_dim=512, vocab_size=512, backend=backend)
    torch.manual_seed(0)
    model = prepare_context_parallel(Decoder(cfg).to(device))
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, cfg.vocab_size, (2, S), generator=g).to(device)
    labels = torch.full_like(ids, -100)
    labels[:, :-1] = ids[:, 1:]
    count = int((labels != -100).sum())
    pos = torch.arange(S, device=device).expand(2, S).contiguous()

    def loss_sum(m, ids, labels, pos):
        logits = m(ids, PackedBatch(pos)).logits
        return torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum")

    oracle = copy.deepcopy(model).double()
    oracle.set_backend("eager")
    lo = loss_sum(oracle, ids, labels, pos) / count
    lo.backward()
    go = {n: p.grad for n, p in oracle.named_parameters()}
    one = copy.deepcopy(model).to(dtype)
    l1 = loss_sum(one, ids, labels, pos) / count
    l1.backward()
    g1 = {n: p.grad.double() for n, p in one.named_parameters()}
    m = copy.deepcopy(model).to(dtype)
    cids, clabels, cpos = ids.clone(), labels.clone(), pos.clone()
    with context_parallel(mesh, buffers=[cids, clabels, cpos], buffer_seq_dims=[1, 1, 1]):
        assert cids.shape[1] == S // world
        loss = loss_sum(m, cids, clabels, cpos) / count
        loss.backward()
    total = loss.detach().double()
    dist.all_reduce(total)
    grads = {}
    for n, p in m.named_parameters():
        gr = p.grad.double()
        dist.all_reduce(gr)
        grads[n] = gr
    _check(f"cp/{backend}", total, grads, (lo.detach(), go), (l1.detach().double(), g1), rank)


def _spawn(device_type, modes, backend, dtype_name="float32", host=False):
    mp.spawn(_worker, args=(2, _free_port(), device_type, modes, backend, dtype_name, host), nprocs=2, join=True)


@pytest.mark.skipif(
    os.environ.get("ANYATTN_CPU_DISTRIBUTED", "1") == "0", reason="ANYATTN_CPU_DISTRIBUTED=0 (spawns 2 processes, ~30 s)"
)
def test_fsdp2_and_tensor_parallel_match_one_process_on_cpu():
    """gloo, 2 processes: FSDP2 (rows split over ranks) and TP over heads (eager backend, so the
    per-head logit clip is sliced to each rank's heads) give the one-process loss and gradients."""
    _spawn("cpu", ("fsdp", "tp"), "eager")


def test_context_parallel_refuses_backends_it_cannot_reach():
    m = Decoder(DecoderConfig.from_name("tiny", backend="flex"))
    with pytest.raises(ValueError, match="config.backend: expected one of"):
        prepare_context_parallel(m)
    m = Decoder(DecoderConfig.from_name("tiny", backend="sdpa", sliding_window=4))
    with pytest.raises(ValueError, match="config.sliding_window"):
        prepare_context_parallel(m)


_two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")


@pytest.mark.multigpu
@_two_gpus
@pytest.mark.parametrize(
    "backend, host",
    [("flex", False), ("flash_torch", True), ("cudnn", False), ("sdpa", False), ("auto", False)],
    ids=["flex", "flash_torch", "cudnn", "sdpa", "auto"],
)
def test_fsdp2_and_tensor_parallel_match_one_gpu(backend, host):
    """NCCL, 2 GPUs, bf16 (FSDP2: bf16 params, float32 gradient reduction), packed documents
    with causal + sliding window (+ softcap and logit clip on flex)."""
    _spawn("cuda", ("fsdp", "tp"), backend, "bfloat16", host)


@pytest.mark.multigpu
@_two_gpus
@pytest.mark.parametrize("backend", context_parallel_backends())
def test_context_parallel_matches_one_gpu(backend):
    _spawn("cuda", ("cp",), backend, "bfloat16")
