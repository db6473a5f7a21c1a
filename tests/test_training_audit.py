"""Audit of the training-facing API (CPU, tiny shapes): packing round trips and gradients through
pack -> attention -> unpack, ``anyattn.nn`` / the decoder against per-document runs, the HF
integration in training (padding, packed rows, cu_seq_lens, output_attentions, LoRA, gradient
checkpointing), ``torch.compile`` across lengths and packings, the core call's input validation,
and ``torch.autograd.gradcheck`` through ``attention``.

Docstrings that start "Was a bug (fixed)" are defects this audit found; each test guards its fix.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch.utils.checkpoint import checkpoint

import anyattn as aa
from anyattn import SeqInfo
from anyattn.nn import AttentionConfig, PackedBatch, SelfAttention
from anyattn.testing import compare_to_oracle, oracle

F64 = torch.float64


def _maxerr(a, b) -> float:
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def _rand(*shape, dtype=F64, seed=None, requires_grad=False):
    g = torch.Generator().manual_seed(0 if seed is None else seed)
    return torch.randn(*shape, generator=g, dtype=dtype).requires_grad_(requires_grad)


def _formula(q, k, v, *, visible=None, bias=None, scale=None):
    """softmax(scale q k^T + bias, masked) v in float64 with GQA; rows with no visible key -> 0."""
    q, k, v = q.double(), k.double(), v.double()
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    s = (q @ k.transpose(-1, -2)) * (1 / math.sqrt(q.shape[-1]) if scale is None else scale)
    if bias is not None:
        s = s + bias.double()
    if visible is not None:
        s = s.masked_fill(~visible, float("-inf"))
    p = torch.softmax(s, -1).nan_to_num(0.0)
    return p @ v


# =============================================================================================
# 1. Packing: SeqInfo / unpad / pad / pack / unpack, PackedBatch, SelfAttention, Decoder

ROUND_TRIPS = [
    ([[3, 0, 2], [5]], 6),  # an empty document inside a row
    ([[1]], 1),  # a single token
    ([[1], [1], [1]], 1),  # rows of one token
    ([[0], [4]], 4),  # an empty row
    ([[1, 1, 1, 1]], 4),  # documents of length 1
    ([[0, 0], [2, 0]], 3),  # mostly empty
    ([[1, 30]], 31),  # very uneven
    ([[30], [1]], 30),  # very uneven rows
]


@pytest.mark.parametrize("lengths, S", ROUND_TRIPS, ids=[str(x[0]) for x in ROUND_TRIPS])
def test_unpad_pad_pack_unpack_round_trips(lengths, S):
    info = SeqInfo.from_lengths(lengths, total_length=S)
    T = sum(sum(r) for r in lengths)
    assert info.total == T and info.B == len(lengths) and info.S == S
    x = _rand(info.B, S, 3, requires_grad=True)
    keep = info.keep
    # unpad / pad
    flat = aa.unpad(x, info)
    assert flat.shape == (T, 3)
    back = aa.pad(flat, info)
    assert torch.equal(back[keep], x.detach()[keep]) and bool((back[~keep] == 0).all())
    # pack / unpack, with a tail of padding
    p = info.pack(x, total_length=T + 2, value=7.0)
    assert p.shape == (1, T + 2, 3) and bool((p[0, T:] == 7.0).all())
    up = info.unpack(p)
    assert torch.equal(up, back)
    # the packed description: every document in row order, zero-length ones included
    pk = info.packed(T + 2)
    assert pk.B == 1 and pk.S == T + 2 and pk.total == T
    assert [x for x in pk.host_lengths[0] if x] == [x for r in lengths for x in r if x]
    assert pk.doc_ids[0, T:].eq(-1).all() and pk.keep[0, :T].all() and not pk.keep[0, T:].any()
    # gradients of the round trip: the cotangent at real tokens, 0 at padding
    w = _rand(*x.shape, seed=1)
    (gx,) = torch.autograd.grad((up * w).sum(), x)
    assert torch.equal(gx, torch.where(keep[..., None], w, torch.zeros_like(w)))


@pytest.mark.parametrize(
    "keep",
    [[[1, 1, 0], [0, 0, 0]], [[0, 1, 1], [1, 1, 1]], [[1, 0, 1], [0, 1, 0]], [[1]]],
    ids=["right+empty-row", "left", "holes", "one-token"],
)
def test_padding_mask_round_trips(keep):
    keep = torch.tensor(keep, dtype=torch.bool)
    info = SeqInfo.from_padding_mask(keep)
    x = _rand(*keep.shape, 2)
    up = info.unpack(info.pack(x))
    assert torch.equal(up[keep], x[keep]) and bool((up[~keep] == 0).all())
    assert info.packed().host_lengths == (tuple(int(n) for n in keep.sum(-1)),)


def _per_sequence_attention(q, k, v, segments, causal: bool):
    """Each (row, start, length) segment's tokens alone, (B, H, S, D) layout, zeros elsewhere."""
    out = torch.zeros_like(q[..., : v.shape[-1]])
    for b, s, n in segments:
        if n:
            o = aa.attention(q[b : b + 1, :, s : s + n], k[b : b + 1, :, s : s + n], v[b : b + 1, :, s : s + n],
                             mask=aa.causal() if causal else None, backend="eager")  # fmt: skip
            out[b : b + 1, :, s : s + n] = o
    return out


@pytest.mark.parametrize("backend", ["eager", "sdpa", "auto"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
@pytest.mark.parametrize("form", ["padding-mask", "lengths"])
def test_gradients_through_pack_attention_unpack_equal_per_sequence(backend, causal, form):
    """A padded (B, S, H, D) batch packed into one row of documents, attention, unpacked: output
    and gradients equal running every sequence alone (float64)."""
    if form == "padding-mask":
        lens = [1, 9, 4, 0]  # a length-1 row, a full row, an empty row
        S = 9
        keep = torch.arange(S)[None] < torch.tensor(lens)[:, None]
        info = SeqInfo.from_padding_mask(keep)
        segments = [(b, 0, n) for b, n in enumerate(lens)]
    else:
        rows = [[1, 0, 6], [2, 2, 3], [7]]
        info = SeqInfo.from_lengths(rows, total_length=7)
        keep = info.keep
        segments = [(b, sum(r[:i]), n) for b, r in enumerate(rows) for i, n in enumerate(r)]
    B, S, Hq, Hkv, D = info.B, info.S, 4, 2, 8
    xq, xk, xv = (_rand(B, S, h, D, seed=i, requires_grad=True) for i, h in enumerate((Hq, Hkv, Hkv)))
    packed = info.packed()
    q, k, v = (info.pack(t).transpose(1, 2) for t in (xq, xk, xv))  # (1, H, T, D) views
    mask = aa.documents(packed) & aa.causal() if causal else aa.documents(packed)
    out = info.unpack(aa.attention(q, k, v, mask=mask, backend=backend).transpose(1, 2))  # (B, S, Hq, D)
    w = _rand(*out.shape, seed=9)
    g = torch.autograd.grad((out * w).sum(), (xq, xk, xv))

    rq, rk, rv = (t.detach().clone().requires_grad_(True) for t in (xq, xk, xv))
    ref = _per_sequence_attention(rq.transpose(1, 2), rk.transpose(1, 2), rv.transpose(1, 2), segments, causal).transpose(1, 2)
    rg = torch.autograd.grad((ref * w).sum(), (rq, rk, rv), allow_unused=True)
    assert _maxerr(out, ref) < 1e-12
    for name, a, b in zip(("dq", "dk", "dv"), g, rg):
        b = torch.zeros_like(a) if b is None else b
        assert _maxerr(a, b) < 1e-12, name
        assert bool((a[~keep] == 0).all()), f"{name}: gradient at padding"


def _layer(**kw):
    torch.manual_seed(0)
    return SelfAttention(AttentionConfig(dim=16, n_heads=4, n_kv_heads=2, **kw)).double()


@pytest.mark.parametrize("host", [False, True], ids=["device-ids", "host"])
@pytest.mark.parametrize(
    "kw",
    [
        {"backend": "eager"},
        {"backend": "sdpa"},
        {"backend": "auto"},
        {"backend": "eager", "sliding_window": 2, "softcap": 3.0, "logit_clip": 1.5},
        {"backend": "sdpa", "causal": False},
    ],
    ids=["eager", "sdpa", "auto", "eager-window-softcap-clip", "sdpa-bidir"],
)
def test_self_attention_packed_gradients_equal_per_document(kw, host):
    """One SelfAttention over packed rows (empty documents, length-1 documents, an all-padding row,
    uneven lengths) equals the layer run on each document alone: output and every gradient
    (input and parameters), float64; padding tokens output 0 and get no gradient."""
    layer = _layer(**kw)
    lens, S = [[1, 0, 9, 1], [1], [0], [3, 3, 3, 3]], 12
    batch = PackedBatch.from_lengths(lens, total_length=S, host=host)
    x = _rand(len(lens), S, 16, requires_grad=True)
    w = _rand(len(lens), S, 16, seed=1)
    y = layer(x, batch)
    g = torch.autograd.grad((y * w).sum(), [x, *layer.parameters()])
    xd = x.detach().clone().requires_grad_(True)
    total = 0.0
    for b, row in enumerate(lens):
        s = 0
        for n in row:
            if n:
                total = total + (layer(xd[b : b + 1, s : s + n], None) * w[b : b + 1, s : s + n]).sum()
            s += n
    rg = torch.autograd.grad(total, [xd, *layer.parameters()])
    for a, b in zip(g, rg):
        assert _maxerr(a, b) < 1e-12
    for b, row in enumerate(lens):
        assert bool((y[b, sum(row) :] == 0).all()) and bool((g[0][b, sum(row) :] == 0).all())


def test_decoder_packed_loss_and_gradients_equal_per_document():
    """The Llama-style decoder on one packed row (length-1 documents, trailing padding) from
    position_ids, lengths and host lengths: the summed loss and every gradient equal the
    per-document runs."""
    from anyattn.models.decoder import Decoder, DecoderConfig

    cfg = DecoderConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64, sliding_window=3,
                        global_every=2, softcap=10.0)  # fmt: skip
    torch.manual_seed(0)
    model = Decoder(cfg)
    lens, S = [1, 7, 2, 1, 5], 18
    ids = torch.randint(0, 64, (1, S), generator=torch.Generator().manual_seed(3))
    model.zero_grad()
    ref = 0.0
    s = 0
    for n in lens:
        d = ids[:, s : s + n]
        s += n
        if n > 1:
            ref = ref + torch.nn.functional.cross_entropy(model(d).logits[0, :-1], d[0, 1:], reduction="sum")
    ref.backward()
    want = [p.grad.clone() for p in model.parameters()]
    pos = torch.cat([torch.arange(n) for n in lens] + [torch.arange(S - sum(lens))])[None]
    for name, batch in (
        ("position_ids", PackedBatch.from_position_ids(pos)),
        ("lengths", PackedBatch.from_lengths([lens], total_length=S)),
        ("host", PackedBatch.from_lengths([lens], total_length=S, host=True)),
    ):
        labels = batch.labels(ids)
        labels[0, sum(lens) :] = -100  # from position_ids the tail is one more document
        model.zero_grad()
        loss = model(ids, batch, labels).loss * (labels != -100).sum()
        loss.backward()
        assert abs(loss.item() - ref.item()) <= 1e-5 * abs(ref.item()), name
        for p, gw in zip(model.parameters(), want):
            assert _maxerr(p.grad, gw) <= 1e-5 * max(1.0, gw.abs().max().item()), name


# =============================================================================================
# 2. HF transformers in training

V = 97


@pytest.fixture(scope="module")
def hf():
    transformers = pytest.importorskip("transformers")
    import anyattn.hf as ah

    ah.register()
    return transformers


def _hf_pair(transformers, name, impl="anyattn", ref_impl="eager"):
    common = {"vocab_size": V, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
              "num_attention_heads": 4}  # fmt: skip
    if name == "llama":
        cfg, cls = transformers.LlamaConfig(**common, num_key_value_heads=2), transformers.LlamaForCausalLM
    elif name == "qwen2":
        cfg = transformers.Qwen2Config(**common, num_key_value_heads=2, use_sliding_window=True, sliding_window=5,
                                       max_window_layers=1)  # fmt: skip
        cls = transformers.Qwen2ForCausalLM
    elif name == "bert":
        cfg = transformers.BertConfig(**common, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
        cls = transformers.BertForMaskedLM
    else:
        raise KeyError(name)
    torch.manual_seed(0)
    ref = cls._from_config(copy.deepcopy(cfg), attn_implementation=ref_impl)
    ours = cls._from_config(copy.deepcopy(cfg), attn_implementation=impl)
    ours.load_state_dict(ref.state_dict())
    ref.train(), ours.train()
    return ref, ours


def _grads_close(ref, ours, rel=1e-5):
    for (n, p), (_, q) in zip(ref.named_parameters(), ours.named_parameters()):
        if p.grad is None and q.grad is None:
            continue
        assert (p.grad is None) == (q.grad is None), n
        err = (p.grad - q.grad).abs().max().item()
        assert err <= rel * max(1.0, p.grad.abs().max().item()), (n, err)


def _packed_docs(lengths, seed=3):
    g = torch.Generator().manual_seed(seed)
    docs = [torch.randint(2, V, (n,), generator=g) for n in lengths]
    return docs, torch.cat(docs)[None], torch.cat([torch.arange(n) for n in lengths])[None]


def _packed_ce(logits, ids, lengths):
    """Summed next-token cross-entropy of a packed row, never across a document boundary."""
    labels = ids[0].clone()
    s = 0
    for n in lengths:
        labels[s] = -100  # the first token of a document is no target of the previous one
        s += n
    return torch.nn.functional.cross_entropy(logits[0, :-1], labels[1:], ignore_index=-100, reduction="sum")


def _per_doc_ce(model, docs):
    total = 0.0
    for d in docs:
        if len(d) > 1:
            lg = model(d[None]).logits[0]
            total = total + torch.nn.functional.cross_entropy(lg[:-1], d[1:], reduction="sum")
    return total


@pytest.mark.parametrize("name", ["llama", "bert"])
def test_hf_right_padded_training_matches_eager(hf, name):
    ref, ours = _hf_pair(hf, name)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(2, V, (3, 10), generator=g)
    am = torch.ones(3, 10, dtype=torch.long)
    am[1, 6:] = 0
    am[2, 2:] = 0
    labels = ids.masked_fill(am == 0, -100)
    l1 = ref(ids, attention_mask=am, labels=labels).loss
    l2 = ours(ids, attention_mask=am, labels=labels).loss
    l1.backward(), l2.backward()
    assert abs(l1.item() - l2.item()) <= 1e-6
    _grads_close(ref, ours)


@pytest.mark.parametrize("use_cache", [False, True])
@pytest.mark.parametrize("name", ["llama", "qwen2"])
def test_hf_packed_training_equals_per_document(hf, name, use_cache):
    """position_ids restarting at 0 (length-1 documents, uneven lengths): the summed loss and
    every gradient equal each document run alone in HF eager."""
    ref, ours = _hf_pair(hf, name)
    lengths = [1, 9, 3, 1, 6]
    docs, ids, pos = _packed_docs(lengths)
    loss = _packed_ce(ours(ids, position_ids=pos, use_cache=use_cache).logits, ids, lengths)
    want = _per_doc_ce(ref, docs)
    loss.backward(), want.backward()
    assert abs(loss.item() - want.item()) <= 1e-5 * want.item()
    _grads_close(ref, ours, rel=2e-5)


def test_hf_two_packed_rows_training_equal_per_document(hf):
    """B=2, each row packed (position_ids restart per document): loss and gradients equal each
    document alone."""
    ref, ours = _hf_pair(hf, "llama")
    rows = [[2, 4, 1, 3], [10]]
    docs_rows, ids_rows, pos_rows = zip(*(_packed_docs(r, seed=20 + i) for i, r in enumerate(rows)))
    ids, pos = torch.cat(ids_rows), torch.cat(pos_rows)
    logits = ours(ids, position_ids=pos, use_cache=False).logits
    loss = sum(_packed_ce(logits[b : b + 1], ids[b : b + 1], r) for b, r in enumerate(rows))
    want = sum(_per_doc_ce(ref, d) for d in docs_rows)
    loss.backward(), want.backward()
    assert abs(loss.item() - want.item()) <= 1e-5 * want.item()
    _grads_close(ref, ours, rel=2e-5)


def test_hf_cu_seq_lens_training_equals_per_document(hf):
    ref, ours = _hf_pair(hf, "llama")
    lengths = [4, 1, 7]
    docs, ids, _ = _packed_docs(lengths, seed=5)
    cu = torch.tensor([0, 4, 5, 12], dtype=torch.int32)
    out = ours(ids, cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=7, max_length_k=7).logits
    loss = _packed_ce(out, ids, lengths)
    want = _per_doc_ce(ref, docs)
    loss.backward(), want.backward()
    assert abs(loss.item() - want.item()) <= 1e-5 * want.item()
    _grads_close(ref, ours, rel=2e-5)


def test_hf_output_attentions_in_training_gives_eager_weights_and_gradients(hf):
    """output_attentions=True while training: the weights (real query rows) equal eager's, and a
    loss that reads the weights backpropagates the same gradients."""
    ref, ours = _hf_pair(hf, "llama")
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(2, V, (2, 8), generator=g)
    am = torch.ones(2, 8, dtype=torch.long)
    am[1, 5:] = 0
    rows = am.bool()[:, None, :, None]
    o1 = ref(ids, attention_mask=am, output_attentions=True)
    o2 = ours(ids, attention_mask=am, output_attentions=True)
    w = torch.randn(o1.attentions[0].shape, generator=g)
    losses = []
    for o in (o1, o2):
        losses.append(o.logits[am.bool()].sum() + sum(((a * rows) * w).sum() for a in o.attentions))
    for a, b in zip(o1.attentions, o2.attentions):
        assert _maxerr(a * rows, b * rows) <= 2e-6
    losses[0].backward(), losses[1].backward()
    assert abs(losses[0].item() - losses[1].item()) <= 1e-4
    _grads_close(ref, ours)


def test_hf_peft_lora_training_matches_eager(hf):
    peft = pytest.importorskip("peft")
    ref, ours = _hf_pair(hf, "llama")
    cfg = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"], "init_lora_weights": False}
    torch.manual_seed(1)
    pr = peft.get_peft_model(ref, peft.LoraConfig(**cfg))
    po = peft.get_peft_model(ours, peft.LoraConfig(**cfg))
    po.load_state_dict(pr.state_dict())
    pr.train(), po.train()
    trained = {n: p for n, p in po.named_parameters() if p.requires_grad}
    assert trained and all("lora_" in n for n in trained)
    # (a) right padding
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(2, V, (2, 9), generator=g)
    am = torch.ones(2, 9, dtype=torch.long)
    am[1, 4:] = 0
    labels = ids.masked_fill(am == 0, -100)
    l1 = pr(input_ids=ids, attention_mask=am, labels=labels).loss
    l2 = po(input_ids=ids, attention_mask=am, labels=labels).loss
    l1.backward(), l2.backward()
    assert abs(l1.item() - l2.item()) <= 1e-6
    for n, p in pr.named_parameters():
        if p.requires_grad:
            assert _maxerr(p.grad, trained[n].grad) <= 1e-5 * max(1.0, p.grad.abs().max().item()), n
    # (b) packed rows against each document alone
    pr.zero_grad(), po.zero_grad()
    lengths = [3, 1, 5]
    docs, ids, pos = _packed_docs(lengths, seed=7)
    loss = _packed_ce(po(input_ids=ids, position_ids=pos).logits, ids, lengths)
    want = _per_doc_ce(pr, docs)
    loss.backward(), want.backward()
    assert abs(loss.item() - want.item()) <= 1e-5 * want.item()
    for n, p in pr.named_parameters():
        if p.requires_grad:
            assert _maxerr(p.grad, trained[n].grad) <= 2e-5 * max(1.0, p.grad.abs().max().item()), n


@pytest.mark.parametrize("impl", ["anyattn", "anyattn:sdp"])
def test_hf_gradient_checkpointing_on_a_new_packing(hf, impl):
    """Was a bug (fixed): ``model.gradient_checkpointing_enable()`` (non-reentrant torch checkpoint) and a
    packing anyattn has not seen yet: backward raises ``CheckpointError: A different number of
    tensors was saved during the original forward and recomputation`` (40 vs 39). The sdpa backend
    lowers a mask differently on its first and second use (``SdpaBackend.lowered``: ``row_ok`` is
    dropped and the bool mask becomes additive on reuse), so the recomputation runs other ops than
    the forward. Every training step with a fresh packing hits it. Expected: loss and gradients
    equal eager's (checkpointed too)."""
    aa.clear_caches()
    ref, ours = _hf_pair(hf, "llama", impl=impl)
    for m in (ref, ours):
        m.gradient_checkpointing_enable()
    lengths = [3, 1, 5, 7]
    docs, ids, pos = _packed_docs(lengths, seed=11)
    loss = _packed_ce(ours(ids, position_ids=pos, use_cache=False).logits, ids, lengths)
    loss.backward()
    want = _per_doc_ce(ref, docs)
    want.backward()
    assert abs(loss.item() - want.item()) <= 1e-5 * want.item()
    _grads_close(ref, ours, rel=2e-5)


@pytest.mark.parametrize("case", ["sdpa-documents", "sdpa-window", "nn-layer-auto"])
def test_non_reentrant_checkpoint_around_a_first_use_mask(case):
    """Was a bug (fixed), the core form of the test above: ``torch.utils.checkpoint(..., use_reentrant=False)``
    around an sdpa call whose materialized mask is used for the first time (a new packing, or the
    first windowed call of the process) raises CheckpointError in backward (7 vs 6 saved tensors),
    because the forward (first use) and the recomputation (second use) lower the mask differently."""
    aa.clear_caches()
    if case == "nn-layer-auto":
        torch.manual_seed(0)
        layer = SelfAttention(AttentionConfig(dim=32, n_heads=4))
        x = _rand(2, 12, 32, dtype=torch.float32, requires_grad=True)
        batch = PackedBatch.from_lengths([[5, 7], [12]], total_length=12)
        out = checkpoint(layer, x, batch, use_reentrant=False)
        (g,) = torch.autograd.grad(out.sum(), x)
        (want,) = torch.autograd.grad(layer(x, batch).sum(), x)
    else:
        mask = aa.documents([3, 5]) & aa.causal() if case == "sdpa-documents" else aa.sliding_window(2)
        q, k, v = (_rand(1, 2, 8, 16, dtype=torch.float32, seed=i, requires_grad=True) for i in range(3))

        def f(q, k, v):
            return aa.attention(q, k, v, mask=mask, backend="sdpa")

        (g,) = torch.autograd.grad(checkpoint(f, q, k, v, use_reentrant=False).sum(), q)
        (want,) = torch.autograd.grad(f(q, k, v).sum(), q)
    assert _maxerr(g, want) < 1e-6


# =============================================================================================
# 3. torch.compile


def test_compiled_layer_inductor_fullgraph_across_lengths_and_packings():
    """A SelfAttention layer (backend auto) under torch.compile(fullgraph=True) with inductor: new
    packings at a fixed length reuse the graph, a new length compiles once more, and every call's
    output and gradients equal the uncompiled layer."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch.manual_seed(0)
    layer = SelfAttention(AttentionConfig(dim=32, n_heads=4, n_kv_heads=2))
    counter = CompileCounterWithBackend("inductor")
    torch._dynamo.reset()
    compiled = torch.compile(layer, backend=counter, fullgraph=True)
    steps = [(16, [[5, 11], [16]]), (16, [[1, 1, 14], [3, 13]]), (24, [[24], [10, 10, 4]]), (24, [[1, 23], [12, 0, 12]]),
             (20, [[20], [19]])]  # fmt: skip
    frames = []
    for S, lens in steps:
        x = _rand(2, S, 32, dtype=torch.float32, seed=S, requires_grad=True)
        batch = PackedBatch.from_lengths(lens, total_length=S)
        y = compiled(x, batch)
        g = torch.autograd.grad(y.pow(2).sum(), [x, *layer.parameters()])
        yr = layer(x, batch)
        gr = torch.autograd.grad(yr.pow(2).sum(), [x, *layer.parameters()])
        assert _maxerr(y, yr) <= 1e-5, (S, lens)
        for a, b in zip(g, gr):
            assert _maxerr(a, b) <= 1e-5 * max(1.0, b.abs().max().item()), (S, lens)
        frames.append(counter.frame_count)
    assert frames[0] == frames[1] == 1  # a new packing at the same length: no recompile
    assert frames[-1] <= 2, frames  # one more for the dynamic length, none after


def test_compiled_call_with_documents_across_lengths_and_counts_is_exact():
    """aa.attention with documents(tensor) & causal() built outside a fullgraph compile, the
    sequence length and the number of documents changing: forward and backward match the
    float64 oracle on every call."""
    def f(q, k, v, mask):
        return aa.attention(q, k, v, mask=mask)

    torch._dynamo.reset()
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    for S, lens in [(12, [5, 7]), (12, [1, 11]), (20, [3, 17]), (20, [10, 4, 6]), (9, [9])]:
        q, k, v = (_rand(2, 2, S, 16, dtype=torch.float32, seed=i, requires_grad=True) for i in range(3))
        mask = aa.documents(torch.tensor(lens)) & aa.causal()
        out = compiled(q, k, v, mask)
        g = torch.autograd.grad(out.sum(), (q, k, v))
        ref = oracle(q, k, v, mask=mask)
        assert _maxerr(out, ref) <= 1e-5, (S, lens)
        q64, k64, v64 = (t.detach().double().requires_grad_(True) for t in (q, k, v))
        rg = torch.autograd.grad(aa.attention(q64, k64, v64, mask=mask, backend="eager").sum(), (q64, k64, v64))
        for a, b in zip(g, rg):
            assert _maxerr(a, b) <= 1e-4, (S, lens)


@pytest.mark.parametrize("term", ["documents", "padding", "prefix_lm"])
def test_length_terms_from_a_tensor_build_inside_fullgraph_compile(term):
    """Was a bug (fixed): ``documents(t)`` / ``padding(t)`` / ``prefix_lm(t)`` built from a CPU tensor
    *inside* a ``torch.compile(fullgraph=True)`` region fail (dynamo UserError / Unsupported:
    ``int(t.min()) < 0`` in ``spec/base.py:int_tensor`` reads the tensor on the host). The call's
    own value checks are skipped while compiling (``_check_terms``), the constructor's check is
    not; without fullgraph it is a graph break per call. ``same_segment(t)``, ``padding(mask=t)``
    and ``block_causal(t)`` work."""
    make = {
        "documents": lambda t: aa.documents(t) & aa.causal(),
        "padding": lambda t: aa.padding(t) & aa.causal(),
        "prefix_lm": lambda t: aa.prefix_lm(t),
    }[term]

    def f(q, k, v, t):
        return aa.attention(q, k, v, mask=make(t), backend="eager")

    torch._dynamo.reset()
    q, k, v = (_rand(2, 2, 12, 16, dtype=torch.float32, seed=i) for i in range(3))
    t = torch.tensor([5, 7])
    out = torch.compile(f, backend="eager", fullgraph=True)(q, k, v, t)
    assert _maxerr(out, f(q, k, v, t)) <= 1e-6


# =============================================================================================
# 4. Input validation of the core call

def Q4():
    return _rand(2, 4, 8, 16, dtype=torch.float32)


def K2():
    return _rand(2, 2, 8, 16, dtype=torch.float32, seed=1)

BAD_INPUTS = [
    ("k dtype", lambda: aa.attention(Q4(), K2().double(), K2().double()), TypeError, r"^k: expected the same dtype as q"),
    ("v dtype", lambda: aa.attention(Q4(), K2(), K2().half()), TypeError, r"^v: expected the same dtype as q"),
    ("int dtype", lambda: aa.attention(Q4().long(), K2().long(), K2().long()), TypeError, r"^q: expected float16"),
    ("devices", lambda: aa.attention(Q4(), K2().to("meta"), K2().to("meta")), ValueError, r"^k: expected the same device"),
    ("batch", lambda: aa.attention(Q4(), K2()[:1], K2()[:1]), ValueError, r"^k/v: expected batch size B=2"),
    ("heads 4/3", lambda: aa.attention(Q4(), _rand(2, 3, 8, 16, dtype=torch.float32), _rand(2, 3, 8, 16, dtype=torch.float32)),
     ValueError, r"^k: expected a number of heads that divides Hq=4"),
    ("v heads", lambda: aa.attention(Q4(), K2(), _rand(2, 1, 8, 16, dtype=torch.float32)), ValueError, r"^v: expected Hkv=2"),
    ("v length", lambda: aa.attention(Q4(), K2(), _rand(2, 2, 7, 16, dtype=torch.float32)), ValueError, r"^v: expected Sk=8"),
    ("D mismatch", lambda: aa.attention(Q4(), _rand(2, 2, 8, 8, dtype=torch.float32), K2()), ValueError, r"^k: expected head dim D=16"),
    ("3-D q", lambda: aa.attention(Q4()[0], K2(), K2()), ValueError, r"^q: expected 4 dims"),
    ("numpy q", lambda: aa.attention(Q4().numpy(), K2(), K2()), TypeError, r"^q: expected a torch.Tensor"),
    ("k None", lambda: aa.attention(Q4(), None, K2()), ValueError, r"^k/v: expected key and value tensors"),
    ("scale nan", lambda: aa.attention(Q4(), K2(), K2(), scale=float("nan")), ValueError, r"^scale: expected a finite float"),
    ("scale inf", lambda: aa.attention(Q4(), K2(), K2(), scale=float("inf")), ValueError, r"^scale: expected a finite float"),
    ("scale bool", lambda: aa.attention(Q4(), K2(), K2(), scale=True), ValueError, r"^scale: expected a finite float"),
    ("scale str", lambda: aa.attention(Q4(), K2(), K2(), scale="1"), ValueError, r"^scale: expected a finite float"),
    ("dropout -0.1", lambda: aa.attention(Q4(), K2(), K2(), dropout_p=-0.1), ValueError, r"^dropout_p: expected a float in \[0, 1\)"),
    ("dropout 1.0", lambda: aa.attention(Q4(), K2(), K2(), dropout_p=1.0), ValueError, r"^dropout_p: expected a float in \[0, 1\)"),
    ("dropout 5", lambda: aa.attention(Q4(), K2(), K2(), dropout_p=5), ValueError, r"^dropout_p: expected a float in \[0, 1\)"),
    ("dropout nan", lambda: aa.attention(Q4(), K2(), K2(), dropout_p=float("nan")), ValueError, r"^dropout_p: expected"),
    ("dropout str", lambda: aa.attention(Q4(), K2(), K2(), dropout_p="0.1"), ValueError, r"^dropout_p: expected"),
    ("return_lse int", lambda: aa.attention(Q4(), K2(), K2(), return_lse=1), TypeError, r"^return_lse: expected a bool"),
    ("backend unknown", lambda: aa.attention(Q4(), K2(), K2(), backend="nope"), ValueError, r"^backend: expected one of \['auto', 'eager'"),
    ("backend case", lambda: aa.attention(Q4(), K2(), K2(), backend="Eager"), ValueError, r"^backend: expected one of"),
    ("backend list unknown", lambda: aa.attention(Q4(), K2(), K2(), backend=["eager", "nope"]), ValueError, r"^backend: .*got 'nope'"),
    ("backend empty list", lambda: aa.attention(Q4(), K2(), K2(), backend=[]), ValueError, r"^backend: .*got \[\]"),
    ("backend None", lambda: aa.attention(Q4(), K2(), K2(), backend=None), ValueError, r"^backend: .*got None"),
    ("backend auto in list", lambda: aa.attention(Q4(), K2(), K2(), backend=["auto", "eager"]), ValueError, r"^backend: expected 'auto' alone"),
    ("mask tensor", lambda: aa.attention(Q4(), K2(), K2(), mask=torch.ones(8, 8, dtype=torch.bool)), TypeError, r"^mask: expected a mask term"),
    ("mask factory", lambda: aa.attention(Q4(), K2(), K2(), mask=aa.causal), TypeError, r"^mask: expected a mask term"),
    ("score tensor", lambda: aa.attention(Q4(), K2(), K2(), score=torch.zeros(8, 8)), TypeError, r"^score: expected a score term"),
    ("D=0", lambda: aa.attention(torch.randn(1, 1, 4, 0), torch.randn(1, 1, 4, 0), torch.randn(1, 1, 4, 3)), ValueError, r"^q/v: expected head dims"),
]


@pytest.mark.parametrize("fn, exc, match", [b[1:] for b in BAD_INPUTS], ids=[b[0] for b in BAD_INPUTS])
def test_bad_inputs_are_errors_naming_the_argument(fn, exc, match):
    with pytest.raises(exc, match=match) as ei:
        fn()
    assert isinstance(ei.value, aa.AnyAttnError)


@pytest.mark.parametrize("case", ["scale=True after scale=1.0", "return_lse=1 after return_lse=True"])
def test_validation_does_not_depend_on_what_ran_before(case):
    """Was a bug (fixed): options are validated only on a decision-cache miss, and the decision key holds
    the raw argument, so ``True == 1.0`` / ``1 == True`` hit a decision taken for a valid value:
    ``scale=True`` raises in a fresh process but is accepted (as 1.0) after a ``scale=1.0`` call;
    ``return_lse=1`` likewise after ``return_lse=True``."""
    q = _rand(1, 2, 4, 8, dtype=torch.float32, seed=42)
    if case.startswith("scale"):
        aa.attention(q, q, q, scale=1.0)
        with pytest.raises(ValueError, match="scale: expected a finite float"):
            aa.attention(q, q, q, scale=True)
    else:
        aa.attention(q, q, q, return_lse=True, backend="eager")
        with pytest.raises(TypeError, match="return_lse: expected a bool"):
            aa.attention(q, q, q, return_lse=1, backend="eager")


def test_a_tensor_scale_edited_in_place_is_not_served_a_stale_value():
    """Was a bug (fixed): a 0-dim CPU tensor ``scale`` is accepted (tests/test_core_inputs.py), but the
    decision key holds the tensor object, so after ``s.fill_(2.0)`` the cached decision's old
    scale (0.3) is used: a quiet wrong result (max error ~1 here)."""
    q, k, v = (_rand(1, 2, 4, 8, dtype=torch.float32, seed=i) for i in range(3))
    s = torch.tensor(0.3)
    aa.attention(q, k, v, scale=s)
    s.fill_(2.0)
    assert _maxerr(aa.attention(q, k, v, scale=s), aa.attention(q, k, v, scale=2.0)) < 1e-6


@pytest.mark.parametrize("backend", ["eager", "sdpa", "auto"])
@pytest.mark.parametrize("mask", [None, "causal", "documents"])
def test_zero_size_dims_give_empty_or_zero_results_and_zero_gradients(backend, mask):
    m = {None: None, "causal": aa.causal(), "documents": aa.documents([2, 2])}[mask]
    for shapes in [((0, 4, 4, 8), (0, 2, 4, 8)), ((1, 4, 0, 8), (1, 2, 4, 8)), ((1, 4, 4, 8), (1, 2, 0, 8))]:
        if mask == "documents" and shapes[1][2] == 0:
            continue  # documents(...) of 4 tokens over 0 keys is an ArgumentError (Sq > Sk), by design
        q = _rand(*shapes[0], requires_grad=True)
        k = _rand(*shapes[1], seed=1, requires_grad=True)
        v = _rand(*shapes[1], seed=2, requires_grad=True)
        out = aa.attention(q, k, v, mask=m, backend=backend)
        assert out.shape == (shapes[0][0], 4, shapes[0][2], 8) and bool((out == 0).all())
        g = torch.autograd.grad(out.sum(), (q, k, v))
        assert all(t.shape == x.shape and bool((t == 0).all()) for t, x in zip(g, (q, k, v)))


@pytest.mark.parametrize("case", ["Sk=0", "Sq=0"])
def test_empty_call_lse_is_float64_for_float64_inputs(case):
    """Was a bug (fixed): README: "lse float32, float64 for float64 inputs". A call with Sq == 0 or Sk == 0
    returns a float32 lse for float64 inputs (``api._empty_result`` hard-codes float32), unlike
    the same call with keys."""
    q = _rand(1, 2, 0 if case == "Sq=0" else 3, 8)
    kv = _rand(1, 2, 0 if case == "Sk=0" else 3, 8, seed=1)
    r = aa.attention(q, kv, kv, backend="eager", return_lse=True)
    assert r.lse.dtype == torch.float64


def test_sink_lse_with_no_keys_at_all_is_the_sink_logit():
    """Was a bug (fixed): a row that sees no key has lse = the sink logit (README: "the lse includes it";
    tests/test_sinks.py checks it for masked rows), but with Sk == 0 every row's lse is -inf."""
    s = torch.tensor([0.5, -1.0])
    r = aa.attention(_rand(1, 2, 2, 8, dtype=torch.float32), _rand(1, 2, 0, 8, dtype=torch.float32),
                     _rand(1, 2, 0, 8, dtype=torch.float32), score=aa.sink(s), backend="eager", return_lse=True)  # fmt: skip
    masked = aa.attention(_rand(1, 2, 2, 8, dtype=torch.float32), _rand(1, 2, 3, 8, dtype=torch.float32),
                          _rand(1, 2, 3, 8, dtype=torch.float32), mask=~(aa.causal() | aa.sliding_window(0, None)),
                          score=aa.sink(s), backend="eager", return_lse=True)  # fmt: skip
    assert torch.equal(masked.lse, s.view(1, 2, 1).expand(1, 2, 2))  # documented behaviour, holds
    assert torch.equal(r.lse, masked.lse)


@pytest.mark.parametrize("backend", ["eager", "sdpa"])
@pytest.mark.parametrize("layout", ["expanded", "channels_last", "bshd", "head-dim-stride-2"])
@pytest.mark.parametrize("mask", ["none", "causal", "documents", "padding"])
def test_strided_inputs_are_exact(backend, layout, mask):
    m = {"none": None, "causal": aa.causal(), "documents": aa.documents([3, 5]) & aa.causal(), "padding": aa.padding([8, 3])}[mask]
    q = _rand(2, 4, 8, 16, dtype=torch.float32)
    if layout == "expanded":
        k = _rand(1, 1, 8, 16, dtype=torch.float32, seed=1).expand(2, 2, 8, 16)
        v = _rand(1, 1, 8, 16, dtype=torch.float32, seed=2).expand(2, 2, 8, 16)
    elif layout == "channels_last":
        q = q.contiguous(memory_format=torch.channels_last)
        k = _rand(2, 2, 8, 16, dtype=torch.float32, seed=1).contiguous(memory_format=torch.channels_last)
        v = _rand(2, 2, 8, 16, dtype=torch.float32, seed=2)
    elif layout == "bshd":
        q = _rand(2, 8, 4, 16, dtype=torch.float32).transpose(1, 2)
        k = _rand(2, 8, 2, 16, dtype=torch.float32, seed=1).transpose(1, 2)
        v = _rand(2, 8, 2, 16, dtype=torch.float32, seed=2).transpose(1, 2)
    else:
        q = _rand(2, 4, 8, 32, dtype=torch.float32)[..., ::2]
        k = _rand(2, 2, 8, 32, dtype=torch.float32, seed=1)[..., ::2]
        v = _rand(2, 2, 8, 32, dtype=torch.float32, seed=2)[..., ::2]
    bad = [str(c) for c in compare_to_oracle(q, k, v, backend=backend, mask=m) if not c.ok]
    assert not bad, bad


@pytest.mark.parametrize("backend", ["eager", "sdpa", "auto"])
def test_scale_zero_is_a_uniform_average(backend):
    q, k, v = (_rand(1, 2, 6, 8, dtype=torch.float32, seed=i) for i in range(3))
    for m in (None, aa.causal(), aa.documents([2, 4]) & aa.causal()):
        out = aa.attention(q, k, v, mask=m, scale=0, backend=backend)
        assert _maxerr(out, oracle(q, k, v, mask=m, scale=0.0)) < 1e-6
    assert _maxerr(aa.attention(q, k, v, scale=0, backend=backend), v.mean(2, keepdim=True).expand_as(v)) < 1e-6


@pytest.mark.parametrize("backend", ["eager", "sdpa", "auto"])
def test_dropout_is_seeded_and_keeps_empty_rows_zero(backend):
    q, k, v = (_rand(1, 2, 6, 8, dtype=torch.float32, seed=i) for i in range(3))
    torch.manual_seed(5)
    a = aa.attention(q, k, v, dropout_p=0.3, backend=backend)
    torch.manual_seed(5)
    b = aa.attention(q, k, v, dropout_p=0.3, backend=backend)
    c = aa.attention(q, k, v, dropout_p=0.3, backend=backend)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert not torch.equal(a, aa.attention(q, k, v, backend=backend))
    out = aa.attention(q, k, v, dropout_p=0.5, mask=aa.documents([3]), backend=backend)
    assert bool((out[:, :, 3:] == 0).all())


@pytest.mark.parametrize("backend", ["eager", "sdpa"])
def test_non_finite_keys_and_values_follow_the_formula(backend):
    """README: "a NaN or inf in a key or value that a row can see makes that row NaN". NaN: so.
    inf: the backends follow the float64 formula, which is *not* always NaN (docs note in the
    report): an inf value gives inf; an inf key whose logit is -inf acts as a masked key."""
    q, k, v = (_rand(1, 2, 6, 8, dtype=torch.float32, seed=i) for i in range(3))
    vis = torch.ones(6, 6, dtype=torch.bool).tril()
    kn, vn = k.clone(), v.clone()
    vn[:, :, 2] = float("nan")
    out = aa.attention(q, kn, vn, mask=aa.causal(), backend=backend)
    assert bool(out[:, :, 2:].isnan().all())  # rows 0-1 are not promised finite (README: 0 x NaN)
    vi = v.clone()
    vi[:, :, 2] = float("inf")
    out = aa.attention(q, k, vi, mask=aa.causal(), backend=backend)
    assert torch.equal(out[:, :, 2:].isinf(), _formula(q, k, vi, visible=vis)[:, :, 2:].isinf())
    assert not out[:, :, 2:].isnan().any()
    ki, qq = k.clone(), q.clone()
    ki[:, :, 2, 0] = float("inf")
    qq[..., 0] = -1.0  # q . k = -inf at key 2: the key is as good as masked
    out = aa.attention(qq, ki, v, mask=aa.causal(), backend=backend)
    ref = _formula(qq, ki, v, visible=vis)
    assert bool(out.isfinite().all()) and _maxerr(out, ref) < 1e-5


def test_nan_query_rows_stay_in_their_row():
    """A NaN in a query row gives NaN on eager (and the float64 oracle) and, on sdpa's fused CPU
    paths (no mask, is_causal), exactly 0: torch's kernel, documented in docs/reliability.md
    ("NaN or inf in q"). Either way no other row changes."""
    q, k, v = (_rand(1, 2, 6, 8, dtype=torch.float32, seed=i) for i in range(3))
    clean = aa.attention(q, k, v, backend="eager")
    q = q.clone()
    q[:, :, 3] = float("nan")
    for m in (None, aa.causal(), aa.sliding_window(2)):
        e = aa.attention(q, k, v, mask=m, backend="eager")
        s = aa.attention(q, k, v, mask=m, backend="sdpa")
        assert bool(e[:, :, 3].isnan().all())
        row = s[:, :, 3]
        assert bool(row.isnan().all()) or bool((row == 0).all()), f"mask={m!r}: sdpa row 3 = {row[0, 0, :3].tolist()}"
        ref = aa.attention(q.nan_to_num(0.0), k, v, mask=m, backend="eager")
        for out in (e, s):
            others = [i for i in range(6) if i != 3]
            assert _maxerr(out[:, :, others], ref[:, :, others]) < 1e-5
    assert clean.isfinite().all()


# =============================================================================================
# 5. gradcheck (float64) through attention

GRADCHECK = {
    "causal": (lambda ex: {"mask": aa.causal()}, []),
    "documents&causal": (lambda ex: {"mask": aa.documents([2, 3]) & aa.causal()}, []),
    "padding": (lambda ex: {"mask": aa.padding([3])}, []),
    "empty-rows": (lambda ex: {"mask": aa.documents([3])}, []),
    "window+alibi": (lambda ex: {"mask": aa.sliding_window(1), "score": aa.alibi(torch.tensor([0.5, 0.25], dtype=F64))}, []),
    "softcap": (lambda ex: {"mask": aa.causal(), "score": aa.softcap(2.0)}, []),
    "sink(learnable)": (lambda ex: {"mask": aa.causal(), "score": aa.sink(ex[0])}, [(2,)]),
    "bias(learnable)": (lambda ex: {"mask": aa.causal(), "score": aa.bias(ex[0])}, [(1, 2, 5, 5)]),
    "bias(learnable, broadcast)+padding": (lambda ex: {"mask": aa.padding([4]), "score": aa.bias(ex[0])}, [(5, 5)]),
    "relative_bias(learnable)": (lambda ex: {"mask": aa.causal(), "score": aa.relative_bias(ex[0], 8, 16)}, [(2, 8)]),
    "bias+sink(learnable)": (lambda ex: {"mask": aa.documents([3, 2]), "score": [aa.bias(ex[0]), aa.sink(ex[1])]},
                             [(1, 2, 5, 5), (2,)]),
}
SDPA_REFUSES = {"softcap", "sink(learnable)", "bias+sink(learnable)"}  # documented: softcap is not additive, sinks need the lse


@pytest.mark.parametrize("backend", ["eager", "sdpa"])
@pytest.mark.parametrize("case", list(GRADCHECK))
def test_gradcheck(backend, case):
    make, extra_shapes = GRADCHECK[case]
    q = _rand(1, 2, 5, 4, requires_grad=True)
    k = _rand(1, 1, 5, 4, seed=1, requires_grad=True)
    v = _rand(1, 1, 5, 4, seed=2, requires_grad=True)
    extra = [_rand(*s, seed=3 + i, requires_grad=True) for i, s in enumerate(extra_shapes)]

    def f(q, k, v, *ex):
        return aa.attention(q, k, v, backend=backend, **make(ex))

    if backend == "sdpa" and case in SDPA_REFUSES:
        with pytest.raises(aa.UnsupportedError):
            f(q, k, v, *extra)
        return
    assert torch.autograd.gradcheck(f, (q, k, v, *extra), eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("backend", ["eager", "sdpa"])
@pytest.mark.parametrize("term", ["bias", "alibi"])
def test_float64_additive_scores_are_computed_in_float64(backend, term):
    """Regression: at HEAD (3c7b6cc) ``Bias.bind`` / ``Alibi.bind`` / ``RelativeBias.bind`` gave
    the backends their dense form as ``.float()``, so with float64 inputs the term was rounded to
    float32 (~8e-9 against the float64 formula; ``gradcheck`` through a learnable bias failed on
    eager and sdpa) and the float64 oracle itself was only float32-accurate for these terms.
    Fixed in 43e6f69 (spec/scores.py ``_dense_dtype``), which landed while this audit ran."""
    q, k, v = (_rand(1, 2, 4, 4, seed=i) for i in range(3))
    if term == "bias":
        bias = _rand(1, 2, 4, 4, seed=5)
        score = aa.bias(bias)
    else:
        slopes = torch.tensor([0.3, 0.1], dtype=F64)
        i = torch.arange(4)
        bias = -slopes.view(1, 2, 1, 1) * (i[:, None] - i[None, :]).abs().double()
        score = aa.alibi(slopes)
    out = aa.attention(q, k, v, score=score, backend=backend)
    assert _maxerr(out, _formula(q, k, v, bias=bias)) < 1e-12
