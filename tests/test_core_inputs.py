"""Odd inputs to the core call (issue 16's core cases): an exact result or a clear refusal that
names the argument, never NaN, a raw torch error or a wrong answer."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import anyattn as aa
from anyattn.testing import generate_qkv, oracle


def _err(a, b):
    return (a.double() - b.double()).abs().max().item()


@pytest.mark.parametrize("scale", [0.0, -0.5])
@pytest.mark.parametrize("backend", ["sdpa", "eager", "auto"])
def test_causal_with_a_scale_at_or_below_zero_is_exact(scale, backend):
    """torch's is_causal kernels return NaN for scale <= 0 (they scale after masking); the sdpa
    backend materializes the causal mask there instead of using the fast path."""
    q, k, v = generate_qkv(2, 2, 2, 12, 12, 16)
    out = aa.attention(q, k, v, mask=aa.causal(), scale=scale, backend=backend)
    assert torch.isfinite(out).all()
    assert _err(out, oracle(q, k, v, mask=aa.causal(), scale=scale)) < 1e-5


def test_fused_kernels_refuse_a_non_positive_scale_with_the_reason():
    from anyattn.backends.flash_torch import FlashTorchBackend
    from anyattn.call import Signature

    sig = Signature.of(B=1, Hq=2, Sq=8, D=64, dtype=torch.bfloat16, device="cpu", mask=aa.causal(), scale=-1.0)
    why = FlashTorchBackend(varlen=lambda *a, **k: None, cuda_only=False).supports(sig)  # the device check aside
    assert why is not None and "scale=-1.0" in why


def test_numpy_and_tensor_scales_are_taken():
    q, k, v = generate_qkv(1, 2, 2, 8, 8, 16)
    ref = aa.attention(q, k, v, scale=0.3)
    assert torch.equal(aa.attention(q, k, v, scale=np.float32(0.3)), aa.attention(q, k, v, scale=float(np.float32(0.3))))
    assert _err(aa.attention(q, k, v, scale=np.float64(0.3)), ref) == 0.0
    assert _err(aa.attention(q, k, v, scale=torch.tensor(0.3)), aa.attention(q, k, v, scale=float(torch.tensor(0.3)))) == 0.0
    with pytest.raises(ValueError, match="scale: expected a finite float"):
        aa.attention(q, k, v, scale=float("nan"))
    with pytest.raises(ValueError, match="scale: expected a finite float"):
        aa.attention(q, k, v, scale="0.3")


def test_total_length_must_be_an_int():
    with pytest.raises(TypeError, match="total_length: expected an int"):
        aa.SeqInfo.from_lengths([3, 4], total_length=9.5)
    with pytest.raises(TypeError, match="total_length: expected an int"):
        aa.SeqInfo.from_cu_seqlens(torch.tensor([0, 3, 7], dtype=torch.int32), total_length=9.5)


def test_score_fn_returning_a_scalar_is_refused_naming_it():
    q, k, v = generate_qkv(1, 2, 2, 8, 8, 16)
    with pytest.raises(TypeError, match=r"score_fn\(<lambda>\) result: expected a floating-point tensor"):
        aa.attention(q, k, v, score=aa.score_fn(lambda s, b, h, i, j: 0.0))
    with pytest.raises(TypeError, match=r"mask_fn\(<lambda>\) result: expected a bool tensor"):
        aa.attention(q, k, v, mask=aa.mask_fn(lambda b, h, i, j: True))
    with pytest.raises(ValueError, match=r"score_fn\(boom\)"):

        def boom(s, b, h, i, j):
            raise KeyError("x")

        aa.attention(q, k, v, score=aa.score_fn(boom))


def test_not_of_everything_is_nothing_on_every_backend():
    """~(causal() | sliding_window(0, None)) sees no key anywhere: zeros, not a TypeError."""
    q, k, v = generate_qkv(1, 2, 2, 8, 8, 16)
    mask = ~(aa.causal() | aa.sliding_window(0, None))
    d = aa.explain(q, k, v, mask=mask)
    assert d.chosen is not None
    for be in ("auto", "eager", "sdpa"):
        out = aa.attention(q, k, v, mask=mask, backend=be)
        assert torch.equal(out, torch.zeros_like(out)), be


def test_zero_head_dim_is_refused():
    with pytest.raises(ValueError, match="q/v: expected head dims D >= 1 and Dv >= 1, got D=0"):
        aa.attention(torch.randn(1, 1, 4, 0), torch.randn(1, 1, 4, 0), torch.randn(1, 1, 4, 3))


@pytest.mark.parametrize("empty", [[], [[]], [[], []], ()])
def test_documents_of_nothing_says_so(empty):
    with pytest.raises(ValueError, match="documents\\(lengths\\): expected at least one document length"):
        aa.documents(empty)


@pytest.mark.parametrize("backend", ["eager", "sdpa", "auto"])
def test_rows_that_see_no_key_are_zero_whatever_the_values_hold(backend):
    """NaN at keys no row can see (padding past the last document): the rows that see no key
    are exactly 0 on every backend (the README's promise), not NaN."""
    q, k, v = generate_qkv(1, 2, 2, 8, 8, 16)
    k, v = k.clone(), v.clone()
    k[:, :, 5:] = float("nan")
    v[:, :, 5:] = float("nan")
    out = aa.attention(q, k, v, mask=aa.documents([5]), backend=backend)
    assert torch.equal(out[:, :, 5:], torch.zeros_like(out[:, :, 5:]))


@pytest.mark.parametrize("backend", ["eager", "sdpa"])
def test_nan_in_a_visible_value_propagates(backend):
    """A NaN a row can see makes that row NaN (documented); rows that cannot see it and see
    other keys are not promised to stay finite on fused kernels (tiles: 0 x NaN)."""
    q, k, v = generate_qkv(1, 2, 2, 8, 8, 16)
    v = v.clone()
    v[:, :, 2] = float("nan")
    out = aa.attention(q, k, v, mask=aa.causal(), backend=backend)
    assert torch.isnan(out[:, :, 2:]).all()
