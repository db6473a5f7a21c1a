"""SeqInfo built from host lengths: every field against a per-token reference, and (CUDA) built
without a host sync."""

import random

import pytest
import torch

from anyattn import SeqInfo


def _reference(rows, S):
    """The structure written out token by token (the definition in layout.py's docstring)."""
    B, N = len(rows), max(len(r) for r in rows)
    keep = torch.zeros(B, S, dtype=torch.bool)
    doc_ids = torch.full((B, S), -1, dtype=torch.int32)
    positions = torch.zeros(B, S, dtype=torch.int64)
    indices, cu, doc = [], [0], 0
    for b, r in enumerate(rows):
        col = 0
        for n in r:
            for p in range(n):
                keep[b, col], doc_ids[b, col], positions[b, col] = True, doc, p
                indices.append(b * S + col)
                col += 1
            cu.append(cu[-1] + n)
            doc += 1
    lengths = torch.tensor([r + [0] * (N - len(r)) for r in rows], dtype=torch.int64)
    return dict(lengths=lengths, cu_seqlens=torch.tensor(cu, dtype=torch.int32), indices=torch.tensor(indices, dtype=torch.int64),
                keep=keep, doc_ids=doc_ids, positions=positions)  # fmt: skip


def _cases():
    rng = random.Random(0)
    fixed = [[[3, 5]], [[1]], [[0, 4, 0]], [[2, 3], [5]], [[7], [1, 1, 1]], [[4, 0], [0, 2]], [[1000, 24, 3000]]]
    rand = [[[rng.randint(0, 40) for _ in range(rng.randint(1, 6))] for _ in range(rng.randint(1, 4))] for _ in range(30)]
    return [r for r in fixed + rand if any(sum(x) for x in r)]


@pytest.mark.parametrize("rows", _cases(), ids=lambda r: str(r)[:40])
def test_from_lengths_equals_the_per_token_definition(rows):
    """The vectorized builder (repeat_interleave, scatter) must give exactly the structure the
    per-token definition gives: zero-length documents, ragged rows and tail padding included."""
    S = max(sum(r) for r in rows) + 3
    info = SeqInfo.from_lengths(rows if len(rows) > 1 else rows[0], total_length=S)
    want = _reference(rows, S)
    for name, t in want.items():
        got = getattr(info, name)
        assert got.dtype == t.dtype and torch.equal(got, t), f"{name}: {got} != {t}"
    assert info.total == sum(map(sum, rows)) and info.max_seqlen == max(x for r in rows for x in r)
    assert info.host_lengths == tuple(tuple(r) for r in want["lengths"].tolist())


@pytest.mark.cuda
def test_from_lengths_on_cuda_does_not_sync():
    """Building a packed batch's structure must not wait for the GPU: the embed job builds batch
    n+1 while batch n runs, and a sync there left the GPU idle for the whole host build (a
    pageable host->device copy waits for the stream)."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    rows = [[300] * 50 + [17]]
    SeqInfo.from_lengths(rows[0], total_length=16384, device="cuda")  # warm the pinned-memory cache
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        info = SeqInfo.from_lengths(rows[0], total_length=16384, device="cuda")
        got = {name: getattr(info, name) for name in ("lengths", "cu_seqlens", "indices", "keep", "doc_ids", "positions")}
        info.varlen()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    want = _reference(rows, 16384)
    for name, t in want.items():
        assert torch.equal(got[name].cpu(), t), name


class _Ops(torch.utils._python_dispatch.TorchDispatchMode):
    """Records every aten op run under it, with the largest element count it produced."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        outs = out if isinstance(out, (tuple, list)) else (out,)
        self.ops.append((str(func), max((t.numel() for t in outs if isinstance(t, torch.Tensor)), default=0)))
        return out


def test_from_lengths_derives_per_token_maps_only_when_read():
    """A varlen kernel needs only cu_seqlens / max_seqlen: building a SeqInfo from host lengths
    and asking for its varlen metadata must not run the per-token ops (B*S-sized tensors, ~0.3 ms
    of launches per call on a GPU host); each per-token map is derived on its own first read
    (flash_torch's unpad reads only ``indices``), once, with the values of the per-token
    definition."""
    rows, S = [[300] * 50 + [17]], 16384
    with _Ops() as rec:
        info = SeqInfo.from_lengths(rows[0], total_length=S)
        cu, mx = info.varlen()
    assert max(n for _, n in rec.ops) < 1000, rec.ops  # only per-document tensors (52 documents)
    assert cu is info.cu_seqlens and mx == 300  # no empty document: cu_seqlens is the varlen metadata
    with _Ops() as rec:
        indices = info.indices
    assert any(n == 300 * 50 + 17 for _, n in rec.ops), "reading indices derived nothing"  # one per real token
    assert not any(n == S for _, n in rec.ops), "reading indices built a (B, S) map it does not need"
    with _Ops() as rec:
        doc_ids = info.doc_ids
    assert any(n >= S for _, n in rec.ops), "reading doc_ids derived nothing"
    with _Ops() as rec:
        again = (info.doc_ids, info.positions, info.keep, info.indices)
    assert rec.ops, "positions and keep were not read before"
    with _Ops() as rec:
        twice = (info.doc_ids, info.positions, info.keep, info.indices)
    assert rec.ops == [] and again[0] is doc_ids and twice[3] is indices  # each derived once
    want = _reference(rows, S)
    for name in ("indices", "keep", "doc_ids", "positions"):
        assert torch.equal(getattr(info, name), want[name]), name


def test_varlen_leaves_out_empty_documents():
    info = SeqInfo.from_lengths([[3, 0, 2], [4]], total_length=6)
    cu, mx = info.varlen()
    assert cu.tolist() == [0, 3, 5, 9] and mx == 4
    assert info.cu_seqlens.tolist() == [0, 3, 3, 5, 9]  # the SeqInfo's own keeps every document


def test_to_keeps_the_per_token_maps_deferred():
    """Moving a SeqInfo that has not derived its maps moves the per-document buffer only; the maps
    derived after the move equal the definition (and equal the moved maps of a derived one)."""
    rows, S = [[5, 0, 3], [2, 2]], 64
    info = SeqInfo.from_lengths(rows, total_length=S)
    moved = info.to("meta")  # another device: nothing read, nothing derived, on either side
    assert moved.cu_seqlens.device.type == "meta"
    with _Ops() as rec:
        SeqInfo.from_lengths(rows, total_length=S).to("meta")
    assert max(n for _, n in rec.ops) < len(rows) * S, rec.ops  # per-document tensors only
    assert moved.doc_ids.device.type == "meta" and moved.doc_ids.shape == (2, S)
    want = _reference(rows, S)
    derived = SeqInfo.from_lengths(rows, total_length=S)
    derived.doc_ids  # noqa: B018  derive, then move the maps themselves
    for name in ("indices", "keep", "doc_ids", "positions"):
        assert torch.equal(getattr(info, name), want[name]), name
        assert getattr(derived.to("meta"), name).shape == want[name].shape, name


def test_deferred_maps_read_inside_a_fullgraph_compile():
    """A SeqInfo whose maps were never read, passed into a fullgraph-compiled function that reads
    them: the derivation is traced and gives the per-token definition."""
    rows, S = [[3, 5], [4]], 9
    want = _reference(rows, S)

    @torch.compile(fullgraph=True, backend="eager")
    def f(info):
        return info.doc_ids + 0, info.positions + 0

    doc_ids, positions = f(SeqInfo.from_lengths(rows, total_length=S))
    assert torch.equal(doc_ids, want["doc_ids"]) and torch.equal(positions, want["positions"])
