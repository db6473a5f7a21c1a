"""auto's ranking rows (pure data and the rules that pick a row; no kernels run)."""

import torch

import anyattn as aa
from anyattn import ranking
from anyattn.call import Signature

CUDA = torch.device("cuda")  # signatures only: nothing is allocated on the device


def sig(T, *, H=16, D=128, mask=None, grad=False):
    return Signature.of(B=1, Hq=H, Sq=T, D=D, dtype=torch.bfloat16, device=CUDA, mask=mask, requires_grad=grad)


def test_small_calls_are_ranked_by_host_cost():
    tiny = sig(64, H=1, D=64, mask=aa.causal())
    assert ranking.is_small(tiny) and ranking.ranking_for(tiny) == ranking.SMALL["cuda"]
    docs = sig(64, H=1, D=64, mask=aa.documents([30, 34]) & aa.causal(), grad=True)
    assert ranking.ranking_for(docs, first_sight=True)[0] == "sdpa"


def test_large_calls_keep_their_variant_rows():
    big = sig(16384, mask=aa.causal())
    assert not ranking.is_small(big) and ranking.ranking_for(big) == ranking.RANKING["cuda"]["causal"]
    docs = sig(16384, mask=aa.documents([8000, 8384]) & aa.causal(), grad=True)
    assert ranking.ranking_for(docs, first_sight=True) == ranking.FIRST_SIGHT["cuda"]["documents+grad"]
    assert ranking.ranking_for(docs) == ranking.RANKING["cuda"]["documents+grad"]


def test_the_threshold_is_the_dense_work():
    at = sig(64, H=1, D=64)
    assert ranking.work(at) == 64 * 64 * 128
    n = ranking.SMALL_WORK // (16 * 2 * 128)  # Sq * Sk at the threshold for H=16, D=128
    side = int(n**0.5)
    assert ranking.is_small(sig(side)) and not ranking.is_small(sig(side + 1))


def test_decode_keeps_its_row_when_small():
    d = Signature.of(B=1, Hq=1, Sq=1, Sk=64, D=64, dtype=torch.bfloat16, device=CUDA)
    assert ranking.variant_class(d) == "decode" and not ranking.is_small(d)


def test_a_fresh_dense_mask_is_not_ranked_to_flex_first():
    m = torch.ones(1, 1, 8192, 8192, dtype=torch.bool, device="meta")
    s = sig(8192, mask=aa.dense(m))
    assert ranking.variant_class(s) == "masked"
    assert ranking.ranking_for(s, first_sight=True)[0] == "sdpa"
    assert ranking.ranking_for(s)[0] == "flex"  # the same tensor again: its BlockMask is reused


def test_cpu_rows_are_unchanged_by_size():
    s = Signature.of(B=1, Hq=1, Sq=8, D=16, dtype=torch.float32, device=torch.device("cpu"), mask=aa.causal())
    assert not ranking.is_small(s) and ranking.ranking_for(s) == ranking.RANKING["cpu"]["*"]


def test_padding_with_small_heads_puts_sdpa_before_flex():
    keep = aa.padding(torch.tensor([2048, 1536]))
    d64 = Signature.of(B=2, Hq=32, Sq=2048, D=64, dtype=torch.bfloat16, device=CUDA, mask=keep)
    d128 = Signature.of(B=2, Hq=16, Sq=2048, D=128, dtype=torch.bfloat16, device=CUDA, mask=keep)
    assert ranking.variant_class(d64) == ranking.variant_class(d128) == "padding"
    assert ranking.ranking_for(d64) == ranking.RANKING["cuda"]["padding+d64"]
    assert ranking.ranking_for(d64).index("sdpa") < ranking.ranking_for(d64).index("flex")
    assert ranking.ranking_for(d128) == ranking.RANKING["cuda"]["padding"]
    assert ranking.ranking_for(d64, first_sight=True) == ranking.FIRST_SIGHT["cuda"]["padding"]


def test_padded_causal_rows_are_padding_not_an_arbitrary_mask():
    """A decoder's padded prefill (padding & causal, or a window) ranks as padding: its d64 row,
    not the masked row meant for dense() and function masks."""
    keep = aa.padding(torch.tensor([2048, 1536]))
    for mask in (keep & aa.causal(), keep & aa.sliding_window(128)):
        d64 = Signature.of(B=2, Hq=32, Sq=2048, D=64, dtype=torch.bfloat16, device=CUDA, mask=mask)
        assert ranking.variant_class(d64) == "padding"
        assert ranking.ranking_for(d64)[0] == "flash_torch"
    other = Signature.of(B=2, Hq=32, Sq=2048, D=64, dtype=torch.bfloat16, device=CUDA, mask=keep & aa.prefix_lm(16))
    assert ranking.variant_class(other) == "masked"


def test_explain_only_looks_at_first_sight(monkeypatch):
    """explain() reports the decision of the next call and leaves it unchanged: values auto has
    not run are a first sight before and after asking; running them once moves to the regular row."""
    monkeypatch.setitem(ranking.RANKING, "cpu", {"documents": ("eager", "sdpa"), "*": ("sdpa", "eager")})
    monkeypatch.setitem(ranking.FIRST_SIGHT, "cpu", {"documents": ("sdpa", "eager")})
    aa.clear_caches()
    try:
        q, k, v = (torch.randn(1, 2, 64, 16) for _ in range(3))
        docs = aa.documents(torch.tensor([20, 44])) & aa.causal()
        assert aa.explain(q, k, v, mask=docs).chosen == "sdpa"
        assert aa.explain(q, k, v, mask=docs).chosen == "sdpa"
        aa.attention(q, k, v, mask=docs)
        assert aa.explain(q, k, v, mask=docs).chosen == "eager"
    finally:
        aa.clear_caches()


def test_new_padding_in_runs_with_autograd_ranks_flash_torch_first():
    """Padding given as lengths (each row's real tokens one run, known on the host) seen for the
    first time with autograd: flash_torch unpads without reading a mask and led forward+backward
    in the new-padding benchmark; a bare keep-mask (contiguity unknown) keeps the padding row."""
    lengths = aa.padding(torch.tensor([2048, 1536]))
    keep = torch.ones(2, 2048, dtype=torch.bool)
    keep[1, 1536:] = False
    bare = aa.padding(mask=keep)

    def s(mask, grad):
        return Signature.of(B=2, Hq=16, Sq=2048, D=128, dtype=torch.bfloat16, device=CUDA, mask=mask, requires_grad=grad)

    runs = ranking.FIRST_SIGHT["cuda"]["padding+grad+runs"]
    assert ranking.ranking_for(s(lengths, True), first_sight=True) == runs
    assert ranking.ranking_for(s(lengths & aa.causal(), True), first_sight=True) == runs
    assert runs[0] == "flash_torch"
    assert ranking.ranking_for(s(bare, True), first_sight=True) == ranking.FIRST_SIGHT["cuda"]["padding"]
    assert ranking.ranking_for(s(lengths, False), first_sight=True) == ranking.FIRST_SIGHT["cuda"]["padding"]
    assert ranking.ranking_for(s(lengths, True)) == ranking.RANKING["cuda"]["padding"]  # seen before
