"""Audit of anyattn's distributed-training support on the CPU (gloo, spawned processes), against
docs/training.md ("Distributed training") and the decoder's helpers. It adds what
tests/test_distributed.py leaves out on the CPU:

* context parallel (torch's ``context_parallel``): how the buffers are laid out (head/tail split,
  uneven and too-short sequences), whether anyattn's ``sdpa`` backend reaches torch's patched
  SDPA at all, the output and q/k/v gradients gathered over ranks, and the docs' decoder recipe;
  the rest of the recipe (sharded positions, GQA repeat, labels) is checked with a stand-in
  ring kernel installed through ``anyattn.testing.use_backend``;
* FSDP2 and tensor parallel with ``backend="auto"`` (served by sdpa, and by eager when softcap is
  on): loss, gradients, parameters after one SGD step and the loss after it equal one process in
  float64; every rank's ``auto`` decisions (``anyattn.testing.record_calls``) are the same;
* refusals (backends, fields, tensor-parallel mesh sizes), a process group of size 1, and ranks
  whose shapes disagree (must fail, never hang).

Every spawned group runs with a gloo timeout and a join deadline: a hang fails the test. The three
spawns run once per module (fixtures); each test reads its part of the recorded results.

Defects this audit found (fixed since, each docstring says what happened): the sdpa and cudnn
backends bypassed torch's ring attention (they kept F.scaled_dot_product_attention from import
time), a batch of documents under context parallel was neither refused nor right, and
SelfAttention failed on an empty sequence. On the CPU torch has no ring op, so the recipe now
raises torch's NotImplementedError; a stand-in ring kernel checks the rest of it.
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import os
import socket
import time

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

from anyattn.models.decoder import (
    Decoder,
    DecoderConfig,
    apply_fsdp,
    apply_tensor_parallel,
    compile_blocks,
    context_parallel_backends,
    prepare_context_parallel,
)
from anyattn.nn import PackedBatch

pytestmark = pytest.mark.skipif(
    os.environ.get("ANYATTN_CPU_DISTRIBUTED", "1") == "0", reason="ANYATTN_CPU_DISTRIBUTED=0 (spawns processes)"
)

# torch's SDPA as imported, before any context_parallel patch (the stand-in ring kernel's local op)
_ORIG_SDPA = F.scaled_dot_product_attention
LENS = [[10, 12, 6], [32], [3, 29], [16, 16]]  # 4 packed rows of 32 tokens (as tests/test_distributed.py)
GLOO_TIMEOUT_S = 60
JOIN_DEADLINE_S = 150


# --------------------------------------------------------------------------------------------
# spawning with a deadline


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(fn, world: int, *args, deadline: float = JOIN_DEADLINE_S):
    """Run fn(rank, world, port, *args) in ``world`` processes; raise if they are not done within
    ``deadline`` seconds (the processes are killed): a hang fails instead of blocking."""
    ctx = mp.start_processes(fn, args=(world, _free_port(), *args), nprocs=world, join=False, start_method="spawn")
    end = time.monotonic() + deadline
    while not ctx.join(timeout=1):
        if time.monotonic() > end:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            raise TimeoutError(f"{fn.__name__}: process group of {world} still running after {deadline} s (hang)")


def _init(rank, world, port):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=GLOO_TIMEOUT_S))
    return init_device_mesh("cpu", (world,))


def _guard(out: dict, name: str, fn):
    """Record fn()'s result under ``name``, or the error it raised (so that one broken section
    does not hide the others)."""
    try:
        out[name] = fn()
    except Exception as e:  # noqa: BLE001 - recorded for the test to report
        out[name] = {"error": f"{type(e).__name__}: {e}"}


def _loss_sum(model, ids, batch, labels=None):
    logits = model(ids, batch).logits
    labels = batch.labels(ids) if labels is None else labels
    return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum")


def _maxdiff(a, b) -> float:
    return float((a.detach().double() - b.detach().double()).abs().max()) if a.numel() else 0.0


def _full(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t


# --------------------------------------------------------------------------------------------
# context parallel


def _layout(S: int, W: int) -> list[list[int]]:
    """The global token indices each rank holds, independently written from torch's rule: the
    head/tail split (rank r: chunk r and chunk 2W-1-r of 2W chunks) when 2W divides S, otherwise
    DTensor's Shard (torch.chunk: ceil(S/W) per rank, the last ones shorter or empty)."""
    if S % (2 * W) == 0:
        c = S // (2 * W)
        return [list(range(r * c, (r + 1) * c)) + list(range(S - (r + 1) * c, S - r * c)) for r in range(W)]
    parts = [p.tolist() for p in torch.arange(S).chunk(W)]
    return parts + [[] for _ in range(W - len(parts))]


class _Gather(torch.autograd.Function):
    """All-gather along dim 2 (equal shards); backward: all-reduce the gradient, keep this rank's
    slice."""

    @staticmethod
    def forward(ctx, x):
        import torch.distributed as dist

        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        ctx.n = x.shape[2]
        return torch.cat(parts, dim=2)

    @staticmethod
    def backward(ctx, g):
        import torch.distributed as dist

        g = g.contiguous().clone()
        dist.all_reduce(g)
        r = dist.get_rank()
        return g[:, :, r * ctx.n : (r + 1) * ctx.n]


def _ring_standin(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """What torch's ring attention computes for one rank's query shard (is_causal only, like
    torch's handlers): gather every rank's k/v (autograd through the gather), causal mask on the
    global token indices of the layout. Used as the ``sdpa`` kernel through use_backend."""
    import torch.distributed as dist

    assert attn_mask is None and dropout_p == 0.0 and not enable_gqa, "ring attention takes is_causal only"
    W, r = dist.get_world_size(), dist.get_rank()
    S = q.shape[2] * W
    lay = _layout(S, W)
    ks, vs = _Gather.apply(k), _Gather.apply(v)
    qi = torch.tensor(lay[r])
    ki = torch.tensor([i for part in lay for i in part])
    mask = (qi[:, None] >= ki[None, :]) if is_causal else None
    return _ORIG_SDPA(q, ks, vs, attn_mask=mask, scale=scale)


def _late_sdpa(*a, **kw):
    """An SDPA kernel that looks torch.nn.functional's function up at call time (what the sdpa
    backend would need to see context_parallel's patch)."""
    return F.scaled_dot_product_attention(*a, **kw)


def _cp_attention(mesh, rank, world, mode: str, S=16):
    """anyattn.attention(mask=causal(), backend="sdpa") inside context_parallel: output and q/k/v
    gradients gathered over the ranks vs one float64 computation on the whole sequence. ``mode``:
    "shipped" (the registered sdpa backend), "standin" (a ring kernel standing in for torch's),
    "late" (an sdpa backend whose kernel looks F.scaled_dot_product_attention up per call)."""
    from torch.distributed.tensor.experimental import context_parallel
    from torch.distributed.tensor.experimental._attention import context_parallel_unshard

    import anyattn
    from anyattn.backends.sdpa import SdpaBackend
    from anyattn.testing import use_backend

    g = torch.Generator().manual_seed(3)
    q, k, v, gout = (torch.randn(1, 2, S, 8, generator=g, dtype=torch.float64) for _ in range(4))
    qr, kr, vr = (t.clone().requires_grad_() for t in (q, k, v))
    ref = _ORIG_SDPA(qr, kr, vr, is_causal=True)
    ref.backward(gout)
    bufs = [t.clone() for t in (q, k, v, gout)]
    calls = []
    res = {}
    kernel = {"shipped": None, "standin": _ring_standin, "late": _late_sdpa}[mode]
    with contextlib.nullcontext() if kernel is None else use_backend(SdpaBackend("sdpa", kernel=kernel)):
        with context_parallel(mesh, buffers=bufs, buffer_seq_dims=[2, 2, 2, 2]):
            patched = F.scaled_dot_product_attention

            def spy(*a, **kw):  # counts calls that reach torch's patched SDPA
                calls.append(1)
                return patched(*a, **kw)

            F.scaled_dot_product_attention = spy
            try:
                ql, kl, vl = (t.clone().requires_grad_() for t in bufs[:3])
                try:
                    out = anyattn.attention(ql, kl, vl, mask=anyattn.causal(), backend="sdpa")
                except Exception as e:  # "shipped" / "late" on the CPU: torch refuses (no CPU ring op)
                    if mode == "standin":
                        raise
                    return {"reached_patched_sdpa": len(calls), "error": f"{type(e).__name__}: {str(e)[:160]}"}
                out.backward(bufs[3])
                res["reached_patched_sdpa"] = len(calls)  # before the direct call below
                if mode == "shipped":  # torch's own CP path on CPU, for comparison
                    try:
                        F.scaled_dot_product_attention(bufs[0], bufs[1], bufs[2], is_causal=True)
                        res["torch_direct"] = "ran"
                    except Exception as e:  # noqa: BLE001
                        res["torch_direct"] = f"{type(e).__name__}: {str(e)[:160]}"
            finally:
                F.scaled_dot_product_attention = patched
    full = context_parallel_unshard(mesh, [out.detach().contiguous(), ql.grad, kl.grad, vl.grad], [2, 2, 2, 2])
    res.update(
        out=_maxdiff(full[0], ref), dq=_maxdiff(full[1], qr.grad), dk=_maxdiff(full[2], kr.grad), dv=_maxdiff(full[3], vr.grad),
    )
    return res


def _cp_decoder(mesh, rank, world, *, standin: bool, S: int, documents: bool = False):
    """The docs' recipe: prepare_context_parallel(model); ids, labels, positions sharded by
    context_parallel; loss summed over labels / global count, gradients all-reduced; against
    the same model in one process (float64)."""
    import torch.distributed as dist
    from torch.distributed.tensor.experimental import context_parallel

    from anyattn.backends.sdpa import SdpaBackend
    from anyattn.testing import record_calls, use_backend

    cfg = DecoderConfig.from_name("tiny", backend="sdpa")  # GQA 4 -> 2
    torch.manual_seed(0)
    model = prepare_context_parallel(Decoder(cfg)).double()
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, cfg.vocab_size, (2, S), generator=g)
    if documents:
        half = S // 2
        batch = PackedBatch.from_lengths([[half, S - half], [S]], total_length=S)  # a document crosses the shard border
    else:
        batch = PackedBatch(torch.arange(S).expand(2, S).contiguous())
    labels = batch.labels(ids)
    count = int((labels != -100).sum())
    one = copy.deepcopy(model)
    l1 = _loss_sum(one, ids, batch, labels) / count
    l1.backward()
    mean_loss_one = float(one(ids, batch, labels).loss)
    m = copy.deepcopy(model)
    bufs = [ids.clone(), labels.clone(), batch.positions.clone()]
    if documents:
        bufs.append(batch.doc_ids.clone())
    res = {}
    with contextlib.nullcontext() if not standin else use_backend(SdpaBackend("sdpa", kernel=_ring_standin)):
        with record_calls() as seen:
            with context_parallel(mesh, buffers=bufs, buffer_seq_dims=[1] * len(bufs)):
                res["local_positions"] = bufs[2][0].tolist()
                local = PackedBatch(bufs[2], bufs[3] if documents else None)
                loss = _loss_sum(m, bufs[0], local, bufs[1]) / count
                loss.backward()
                rank_mean = m(bufs[0], local, bufs[1]).loss.detach()  # the docs snippet's .loss
    total = loss.detach().clone()
    dist.all_reduce(total)
    dist.all_reduce(rank_mean)
    gerr = 0.0
    for (n, p), (_, p1) in zip(m.named_parameters(), one.named_parameters()):
        gr = p.grad.clone()
        dist.all_reduce(gr)
        gerr = max(gerr, _maxdiff(gr, p1.grad))
    res.update(
        loss=_maxdiff(total, l1.detach()), grads=gerr,
        mean_of_rank_means_vs_one=abs(float(rank_mean) / world - mean_loss_one),
        calls=[(c.backend, c.q_shape[1], c.k_shape[1]) for c in seen],
    )  # fmt: skip
    return res


def _cp_short(mesh):
    """S=1 over the ranks (an empty shard on rank 1): the decoder's forward under the recipe,
    no collective of the test's own."""
    from torch.distributed.tensor.experimental import context_parallel

    m = prepare_context_parallel(Decoder(DecoderConfig.from_name("tiny", backend="sdpa")))
    ids, pos = torch.zeros(2, 1, dtype=torch.long), torch.zeros(2, 1, dtype=torch.long)
    with context_parallel(mesh, buffers=[ids, pos], buffer_seq_dims=[1, 1]):
        return tuple(m(ids, PackedBatch(pos)).logits.shape)


def _cp_worker(rank, world, port, outdir):
    import torch.distributed as dist
    from torch.distributed.tensor.experimental import context_parallel

    mesh = _init(rank, world, port)
    out: dict = {}
    try:
        def layout(S):
            pos = torch.arange(S).expand(1, S).contiguous()
            with context_parallel(mesh, buffers=[pos], buffer_seq_dims=[1]):
                return pos[0].tolist()

        for S in (16, 10, 7, 1):
            _guard(out, f"layout_{S}", lambda S=S: layout(S))
        for mode in ("shipped", "standin", "late"):
            _guard(out, f"attn_{mode}", lambda mode=mode: _cp_attention(mesh, rank, world, mode))
        _guard(out, "dec_shipped", lambda: _cp_decoder(mesh, rank, world, standin=False, S=16))
        _guard(out, "dec_standin_16", lambda: _cp_decoder(mesh, rank, world, standin=True, S=16))
        _guard(out, "dec_standin_10", lambda: _cp_decoder(mesh, rank, world, standin=True, S=10))
        _guard(out, "dec_documents", lambda: _cp_decoder(mesh, rank, world, standin=False, S=16, documents=True))
        # last (no collective in it or after it that a failing rank could desynchronize)
        _guard(out, "dec_short", lambda: _cp_short(mesh))
    finally:
        torch.save(out, os.path.join(outdir, f"cp_rank{rank}.pt"))
        dist.destroy_process_group()


# --------------------------------------------------------------------------------------------
# FSDP2 / tensor parallel (and context parallel on a group of one)


def _train_case(mesh, rank, world, mode, variant):
    """One SGD step of the float64 decoder under ``mode`` vs one process: loss, gradients,
    parameters after the step, the loss after it; and the backends auto picked (record_calls)."""
    import torch.distributed as dist

    from anyattn.testing import record_calls

    cfg = DecoderConfig.from_name("tiny", **variant)
    torch.manual_seed(0)
    model = Decoder(cfg).double()
    S = 32
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, cfg.vocab_size, (len(LENS), S), generator=g)
    batch = PackedBatch.from_lengths(LENS, total_length=S)
    count = int((batch.labels(ids) != -100).sum())
    lr = 0.5

    one = copy.deepcopy(model)
    opt1 = torch.optim.SGD(one.parameters(), lr=lr)
    with record_calls() as seen_one:
        l1 = _loss_sum(one, ids, batch) / count
    l1.backward()
    g1 = {n: p.grad.clone() for n, p in one.named_parameters()}
    opt1.step()
    l1b = float(_loss_sum(one, ids, batch).detach() / count)

    m = copy.deepcopy(model)
    if mode == "fsdp_compiled":  # docs: compile_blocks before apply_fsdp (dynamo only: backend="eager")
        compile_blocks(m, backend="eager")
    if mode.startswith("fsdp"):
        apply_fsdp(m, mesh)
        rows = len(LENS) // world
        sl = slice(rank * rows, (rank + 1) * rows)
        x, b = ids[sl], PackedBatch.from_lengths(LENS[sl], total_length=S)
        scale = world  # FSDP averages gradients over ranks
    else:
        apply_tensor_parallel(m, mesh)
        x, b, scale = ids, batch, 1
    opt = torch.optim.SGD(m.parameters(), lr=lr)
    with record_calls() if mode != "fsdp_compiled" else contextlib.nullcontext([]) as seen:
        loss = _loss_sum(m, x, b) / count * scale
    loss.backward()
    total = loss.detach() / scale
    if mode.startswith("fsdp"):
        dist.all_reduce(total)
    def name(n):  # compiled blocks' parameter names carry "._orig_mod"
        return n.replace("._orig_mod", "")
    grads = {name(n): _full(p.grad) for n, p in m.named_parameters()}
    opt.step()
    after = {name(n): _full(p.detach()) for n, p in m.named_parameters()}
    l2 = _loss_sum(m, x, b).detach() / count
    if mode.startswith("fsdp"):
        dist.all_reduce(l2)
    return {
        "loss": _maxdiff(total, l1.detach()),
        "grads": max(_maxdiff(grads[n], g1[n]) for n in g1),
        "params": max(_maxdiff(after[n], p.detach()) for n, p in one.named_parameters()),
        "loss_after": abs(float(l2) - l1b),
        "loss_moved": abs(l1b - float(l1)),
        "backends": [(c.backend, c.q_shape, c.k_shape) for c in seen],
        "backends_one": sorted({c.backend for c in seen_one}),
    }


def _train_worker(rank, world, port, outdir):
    import torch.distributed as dist

    mesh = _init(rank, world, port)
    out: dict = {}
    try:
        variants = {
            "window": {"sliding_window": 5, "global_every": 2, "backend": "auto"},  # CPU auto: sdpa
            "softcap": {"sliding_window": 5, "global_every": 2, "softcap": 20.0, "backend": "auto"},  # sdpa refuses: eager
        }
        for vname, variant in variants.items():
            for mode in ("fsdp", "tp"):
                _guard(out, f"{mode}_{vname}", lambda mode=mode, variant=variant: _train_case(mesh, rank, world, mode, variant))
        if world > 1:
            _guard(out, "fsdp_compiled_window", lambda: _train_case(mesh, rank, world, "fsdp_compiled", variants["window"]))

        def tp_refusal():
            m = Decoder(DecoderConfig.from_name("tiny", n_kv_heads=1, backend="sdpa"))
            apply_tensor_parallel(m, mesh)
            return "accepted"

        if world > 1:
            _guard(out, "tp_refusal", tp_refusal)
        if world == 1:  # context parallel over a group of one: nothing to exchange
            _guard(out, "cp_one", lambda: _cp_decoder(mesh, rank, world, standin=False, S=16))
    finally:
        torch.save(out, os.path.join(outdir, f"train{world}_rank{rank}.pt"))
        dist.destroy_process_group()


def _mismatch_worker(rank, world, port):
    """Tensor parallel where the ranks disagree on the sequence length (a caller's bug)."""
    import torch.distributed as dist

    mesh = _init(rank, world, port)
    m = apply_tensor_parallel(Decoder(DecoderConfig.from_name("tiny", backend="sdpa")), mesh)
    ids = torch.randint(0, 256, (2, 8 if rank == 0 else 6))
    m(ids)
    dist.destroy_process_group()


# --------------------------------------------------------------------------------------------
# fixtures: one spawn each


def _load(outdir, prefix, world):
    return [torch.load(os.path.join(outdir, f"{prefix}_rank{r}.pt"), weights_only=False) for r in range(world)]


@pytest.fixture(scope="module")
def cp_results(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("cp"))
    _spawn(_cp_worker, 2, d)
    return _load(d, "cp", 2)


@pytest.fixture(scope="module")
def train2(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("train2"))
    _spawn(_train_worker, 2, d)
    return _load(d, "train2", 2)


@pytest.fixture(scope="module")
def train1(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("train1"))
    _spawn(_train_worker, 1, d)
    return _load(d, "train1", 1)


def _ok(res, name):
    r = res[name]
    assert not (isinstance(r, dict) and "error" in r), f"{name}: {r}"
    return r


# --------------------------------------------------------------------------------------------
# context parallel: layout


def test_cp_layout_is_head_tail_when_2w_divides_s(cp_results):
    """docs: "each rank holds S / world tokens"; torch's default split is head/tail (rank r holds
    chunks r and 2W-1-r), which balances causal work."""
    got = [_ok(r, "layout_16") for r in cp_results]
    assert got == _layout(16, 2) == [[0, 1, 2, 3, 12, 13, 14, 15], [4, 5, 6, 7, 8, 9, 10, 11]]
    assert all(len(g) == 16 // 2 for g in got)


def test_cp_layout_for_uneven_lengths(cp_results):
    """S divisible by W but not 2W: contiguous halves, no load balancing. S not divisible by W:
    uneven shards (not "S / world"); S < W: an empty shard. torch's behaviour, recorded so that a
    change is noticed (the docs do not say what happens there)."""
    assert [_ok(r, "layout_10") for r in cp_results] == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]
    assert [_ok(r, "layout_7") for r in cp_results] == [[0, 1, 2, 3], [4, 5, 6]]
    assert [_ok(r, "layout_1") for r in cp_results] == [[0], []]


# --------------------------------------------------------------------------------------------
# context parallel: anyattn's sdpa backend under torch's context_parallel


def test_cp_sdpa_backend_reaches_torchs_patched_sdpa(cp_results):
    """docs/training.md: context parallel "goes through torch.distributed.tensor.experimental.
    context_parallel, which replaces F.scaled_dot_product_attention with a ring attention inside
    its block" (sdpa/cudnn are the supported backends).

    Was a bug (fixed): SdpaBackend bound ``F.scaled_dot_product_attention`` when anyattn was
    imported, so the function context_parallel installs was never called: sdpa and cudnn ran the
    original SDPA on the local shard (wrong outputs and gradients, no error; the mechanism is not
    CPU-specific). It now looks the function up per call: the call reaches torch's ring, which on
    the CPU refuses (no CPU ring op) instead of answering wrongly."""
    for r in cp_results:
        res = r["attn_shipped"]
        assert res["reached_patched_sdpa"] == 1, res
        assert "NotImplementedError" in res.get("error", ""), res


def test_cp_an_sdpa_kernel_looked_up_per_call_reaches_torchs_patch(cp_results):
    """Control for the bypass: the same sdpa backend built around a kernel that reads
    F.scaled_dot_product_attention per call (use_backend) does reach context_parallel's patch,
    and on the CPU gets torch's refusal (no CPU ring op) instead of a wrong answer."""
    for r in cp_results:
        res = r["attn_late"]
        assert res["reached_patched_sdpa"] == 1 and "NotImplementedError" in res["error"], res


def test_cp_attention_with_a_ring_kernel_matches_the_whole_sequence(cp_results):
    """Control for the two tests above: the same call with a stand-in ring kernel installed
    through anyattn.testing.use_backend (what torch's ring attention computes) gives the whole-
    sequence output and gradients: anyattn's side (is_causal lowering, no GQA, no mask) is right."""
    for r in cp_results:
        res = _ok(r, "attn_standin")
        for key in ("out", "dq", "dk", "dv"):
            assert res[key] < 1e-10, (key, res)


def test_cp_decoder_recipe_is_refused_by_torch_on_the_cpu_not_answered_wrongly(cp_results):
    """The docs' recipe (prepare_context_parallel, context_parallel over ids/labels/positions,
    backend="sdpa") gave a silently different loss and gradients while the sdpa backend bypassed
    torch's ring (fixed). On the CPU torch has no ring op: the recipe now raises torch's
    NotImplementedError; the ring-kernel stand-in below checks the rest of the recipe."""
    for r in cp_results:
        res = r["dec_shipped"]
        assert isinstance(res, dict) and "NotImplementedError" in res.get("error", ""), res


@pytest.mark.parametrize("S", [16, 10], ids=["head_tail", "contiguous"])
def test_cp_decoder_recipe_with_a_ring_kernel_matches_one_process(cp_results, S):
    """With a ring kernel standing in for torch's (use_backend), the rest of the recipe is right:
    sharded positions (rotary), labels, k/v repeated to the query heads (every call has
    Hkv == Hq and is served by sdpa), loss and all-reduced gradients equal one process, for the
    head/tail split (S=16) and the contiguous one (S=10)."""
    for r in cp_results:
        res = _ok(r, f"dec_standin_{S}")
        assert res["loss"] < 1e-9 and res["grads"] < 1e-9, res
        assert res["calls"] and all(c == ("sdpa", 4, 4) for c in res["calls"]), res["calls"]


def test_cp_docs_snippet_mean_loss_is_not_the_global_mean(cp_results):
    """The docs snippet backpropagates each rank's ``.loss`` (a mean over the rank's own labels).
    With the head/tail split, rank 0 holds the last token of each row (no label), so the ranks'
    label counts differ and the average of the per-rank means is not the one-process loss (a
    documentation gap: reduce by the global label count, as this file does)."""
    diffs = [_ok(r, "dec_standin_16")["mean_of_rank_means_vs_one"] for r in cp_results]
    assert all(d > 1e-4 for d in diffs), diffs


def test_cp_documents_batch_is_refused(cp_results):
    """docs: context parallel serves "full causal, one sequence per row: no documents ...
    (torch's ring attention takes is_causal and nothing else)". A PackedBatch with documents (one
    crossing the shard border) under context_parallel must be refused (torch's handlers raise
    "attn_bias is not supported yet" for a mask) or be right. Actual: no error, and a loss that
    differs from one process: the materialized document mask ran on the local shard only (was a
    bug). The prepared decoder now refuses the batch, naming it."""
    for r in cp_results:
        res = r["dec_documents"]
        assert isinstance(res, dict) and "batch: expected None under context parallel" in res.get("error", ""), res


def test_cp_sequence_shorter_than_the_ranks_does_not_hang(cp_results):
    """S=1 over 2 ranks leaves rank 1 an empty shard (no hang: the spawn finished). Rank 1's
    decoder failed on the empty shard (a reshape of 0 elements; fixed): it now returns (2, 0, V)
    without calling attention, while rank 0 reaches torch's ring (on the CPU: NotImplementedError;
    with a real ring it would wait for rank 1: docs/training.md asks for S >= the ranks)."""
    r0, r1 = (r["dec_short"] for r in cp_results)
    assert isinstance(r0, dict) and "NotImplementedError" in r0.get("error", ""), r0
    assert r1 == (2, 0, 256), r1


def test_decoder_on_an_empty_shard_returns_an_empty_result():
    """An empty local sequence (what context_parallel leaves a rank when S < world, see
    test_cp_layout_for_uneven_lengths). docs/reliability.md: zero-length sequences (Sq=0 or
    Sk=0) are "exact (zeros)" for anyattn.attention. Expected: SelfAttention and the decoder
    return (B, 0, ...) too. SelfAttention.forward's ``view(B, S, -1, D)`` raised "cannot reshape
    tensor of 0 elements ... ambiguous" (nn.py; fixed: heads from the projections' widths)."""
    from anyattn.nn import AttentionConfig, SelfAttention

    attn = SelfAttention(AttentionConfig(dim=64, n_heads=4, n_kv_heads=2, backend="sdpa"))
    assert tuple(attn(torch.zeros(2, 0, 64)).shape) == (2, 0, 64)
    m = Decoder(DecoderConfig.from_name("tiny", backend="sdpa"))
    assert tuple(m(torch.zeros(2, 0, dtype=torch.long)).logits.shape) == (2, 0, 256)


def test_cp_over_a_group_of_one_reaches_torchs_ring(train1):
    """context_parallel over a single rank: the sdpa backend reaches torch's ring attention, which
    the CPU does not have (it matched one process only while the backend bypassed the ring)."""
    res = train1[0]["cp_one"]
    assert isinstance(res, dict) and "NotImplementedError" in res.get("error", ""), res


# --------------------------------------------------------------------------------------------
# context parallel: refusals (no process group needed)


@pytest.mark.parametrize(
    "backend",
    ["flex", "flash_torch", "eager", "auto", ("sdpa", "eager"), ("flex", "sdpa")],
    ids=lambda b: b if isinstance(b, str) else "+".join(b),
)
def test_cp_refuses_backends_outside_sdpa_cudnn(backend):
    """docs: context parallel's backends are "sdpa, cudnn only"; the others are refused, naming
    the field (auto too: it could pick a backend the ring does not see)."""
    m = Decoder(DecoderConfig.from_name("tiny", backend=backend))
    with pytest.raises(ValueError, match=r"config\.backend: expected one of \('sdpa', 'cudnn'\)"):
        prepare_context_parallel(m)


def test_cp_accepts_sdpa_cudnn_and_repeats_kv_heads():
    """sdpa, cudnn and a preference list of both are accepted; afterwards every layer's call has
    k/v repeated to the query heads and the same output as before (GQA is the same math)."""
    from anyattn.testing import record_calls

    assert set(context_parallel_backends()) == {"sdpa", "cudnn"}
    for backend in ("sdpa", "cudnn", ("sdpa", "cudnn")):
        prepare_context_parallel(Decoder(DecoderConfig.from_name("tiny", backend=backend)))
    torch.manual_seed(0)
    m = Decoder(DecoderConfig.from_name("tiny", backend="sdpa")).double()
    ids = torch.randint(0, 256, (2, 12))
    before = m(ids).logits
    prepare_context_parallel(m)
    with record_calls() as seen:
        after = m(ids).logits
    assert [(c.backend, c.q_shape[1], c.k_shape[1], str(c.mask)) for c in seen] == [("sdpa", 4, 4, "causal()")] * 2
    assert _maxdiff(before, after) < 1e-12


@pytest.mark.parametrize(
    "field, kw",
    [
        ("sliding_window", {"sliding_window": 4}),
        ("softcap", {"softcap": 30.0}),
        ("attn_dropout", {"attn_dropout": 0.1}),
    ],
)
def test_cp_refuses_variants_the_ring_cannot_serve(field, kw):
    """docs: no windows, softcap, logit clip or dropout under context parallel; refused naming
    the config field. (A logit clip cannot reach this check: the config already refuses it with
    sdpa/cudnn, and any backend serving it is refused as a backend.)"""
    m = Decoder(DecoderConfig.from_name("tiny", backend="sdpa", **kw))
    with pytest.raises(ValueError, match=rf"config\.{field}"):
        prepare_context_parallel(m)
    with pytest.raises(ValueError, match="logit_clip|backend"):
        DecoderConfig.from_name("tiny", backend="sdpa", logit_clip=5.0)


# --------------------------------------------------------------------------------------------
# FSDP2 and tensor parallel


_TRAIN_CASES = ["fsdp_window", "tp_window", "fsdp_softcap", "tp_softcap", "fsdp_compiled_window"]


@pytest.mark.parametrize("case", _TRAIN_CASES)
def test_train_step_matches_one_process(train2, case):
    """docs: FSDP2 and tensor parallel "all" backends and variants. float64, 2 ranks, packed
    documents with windows (+ softcap), backend="auto": loss, every gradient, every parameter
    after one SGD step and the loss after the step equal one process. ``fsdp_compiled``: the
    docs' order, compile_blocks (fullgraph, dynamo with the eager backend) then apply_fsdp."""
    for r in train2:
        res = _ok(r, case)
        assert res["loss_moved"] > 1e-4  # the step changed something
        for key in ("loss", "grads", "params", "loss_after"):
            assert res[key] < 1e-9, (key, res)


@pytest.mark.parametrize("case, expected", [("fsdp_window", "sdpa"), ("tp_window", "sdpa"), ("fsdp_softcap", "eager"), ("tp_softcap", "eager")])
def test_auto_decides_the_same_on_every_rank(train2, case, expected):
    """backend="auto": every rank's calls (record_calls) are served by the same backend, the one
    a single process picks (CPU ranking: sdpa; softcap is not additive, so eager); under tensor
    parallel each rank sees its 2 of 4 query heads and 1 of 2 kv heads."""
    seen = [_ok(r, case)["backends"] for r in train2]
    assert seen[0] == seen[1]
    assert {b for b, _, _ in seen[0]} == {expected} == set(_ok(train2[0], case)["backends_one"])
    if case.startswith("tp"):
        assert all(q[1] == 2 and k[1] == 1 for _, q, k in seen[0])


def test_tensor_parallel_refuses_a_mesh_that_does_not_divide_the_heads(train2):
    """docs: n_heads, n_kv_heads, ffn_dim divisible by the mesh size; 1 kv head over 2 ranks is
    refused naming tp_mesh."""
    for r in train2:
        msg = r["tp_refusal"]
        assert isinstance(msg, dict) and "tp_mesh" in msg["error"] and "n_kv_heads=1" in msg["error"], msg


@pytest.mark.parametrize("case", ["fsdp_window", "tp_window", "fsdp_softcap", "tp_softcap"])
def test_group_of_one_matches_one_process(train1, case):
    res = _ok(train1[0], case)
    for key in ("loss", "grads", "params", "loss_after"):
        assert res[key] < 1e-9, (key, res)


def test_ranks_with_mismatched_shapes_fail_instead_of_hanging():
    """Tensor parallel where rank 0 has 8 tokens and rank 1 has 6: the group must fail (gloo
    aborts on the size mismatch), never hang."""
    t = time.monotonic()
    with pytest.raises((mp.ProcessRaisedException, mp.ProcessExitedException)):
        _spawn(_mismatch_worker, 2, deadline=90)
    assert time.monotonic() - t < 90
