"""FlashAttention-4 on CUDA: the ``fa4`` backend and flex's FLASH lowering against the float64
oracle (tolerance rule of DESIGN.md), forward and backward, on adversarial shapes; proof that the
FA4 kernels ran. Run on a Hopper/Blackwell GPU with flash-attn-4 installed:

    PYTHONPATH=src python3 -m pytest -m cuda -rf tests/test_cuda_fa4.py

Each new FA4 configuration JIT-compiles (CuTe DSL, tens of seconds on first use), so the matrix is
small and ordered by importance: bf16, D=128 (plus one D=64 case), the variants of issue 19.
"""

from __future__ import annotations

import importlib

import pytest
import torch

import anyattn as aa
from anyattn.backends import REGISTRY
from anyattn.testing import compare_to_oracle, flex_lowering, generate_qkv


def _fa4_missing() -> str | None:
    if not torch.cuda.is_available():
        return "needs a CUDA GPU"
    major, minor = torch.cuda.get_device_capability()
    if major < 9:
        return f"FA4 needs compute capability >= 9.0 (Hopper/Blackwell), found {major}.{minor}"
    try:
        importlib.import_module("flash_attn.cute")
    except ImportError as e:
        return f"flash_attn.cute is not importable ({e}): pip install --pre 'anyattn[fa4]'"
    return None


MISSING = _fa4_missing()
pytestmark = [pytest.mark.cuda, pytest.mark.skipif(MISSING is not None, reason=MISSING or "")]


def _check(comps):
    bad = [str(c) for c in comps if not c.ok]
    assert not bad, "; ".join(bad)


def _docs(S):
    """An empty document, a one-token one, the rest, and three tokens of padding past the sum."""
    a = S // 8
    return [a, 0, 1, S - a - 4]


# (id, B, Hq, Hkv, Sq, Sk, D, kwargs): non-multiple-of-128 lengths, GQA, Sq != Sk
CASES = [
    ("causal-gqa", 2, 8, 2, 113, 113, 128, lambda S: dict(mask=aa.causal())),
    ("dense", 2, 4, 4, 200, 200, 128, lambda S: dict()),
    ("documents-causal", 1, 8, 2, 1025, 1025, 128, lambda S: dict(mask=aa.documents(_docs(S)) & aa.causal())),
    ("softcap-causal", 2, 8, 8, 113, 113, 128, lambda S: dict(mask=aa.causal(), score=aa.softcap(20.0))),
    ("window", 1, 8, 2, 1025, 1025, 128, lambda S: dict(mask=aa.sliding_window(100, 0))),
    ("documents-window", 1, 8, 8, 1025, 1025, 128, lambda S: dict(mask=aa.documents(_docs(S)) & aa.sliding_window(64, 0))),
    ("causal-sq<sk", 2, 8, 2, 77, 300, 128, lambda S: dict(mask=aa.causal())),
    ("causal-sq>sk", 1, 4, 4, 300, 77, 64, lambda S: dict(mask=aa.causal())),
    ("padding-window", 2, 4, 4, 113, 113, 128, lambda S: dict(mask=aa.padding(torch.tensor([113, 40])) & aa.sliding_window(16, 0))),
]  # fmt: skip
FLEX_CASES = ("causal-gqa", "documents-causal", "softcap-causal", "window", "documents-window")


def _run(backend, case, grad=True, return_lse=True):
    _, B, Hq, Hkv, Sq, Sk, D, kw = case
    q, k, v = generate_qkv(B, Hq, Hkv, Sq, Sk, D, dtype=torch.bfloat16, device="cuda", layout="bshd", seed=7)
    return compare_to_oracle(q, k, v, backend=backend, grad=grad, return_lse=return_lse, **kw(Sq))


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_fa4_matches_the_oracle_forward_and_backward(case):
    be = REGISTRY["fa4"]
    before = be.stats["func_calls"] + be.stats["varlen_calls"]
    _check(_run("fa4", case))
    assert be.stats["func_calls"] + be.stats["varlen_calls"] > before  # the FA4 kernel ran


def test_fa4_sinks_forward_and_backward():
    q, k, v = generate_qkv(2, 8, 2, 113, 113, 128, dtype=torch.bfloat16, device="cuda", seed=3)
    sinks = torch.randn(8, device="cuda", requires_grad=True)
    _check(compare_to_oracle(q, k, v, backend="fa4", mask=aa.causal(), score=aa.sink(sinks), return_lse=True))


def test_fa4_refuses_what_it_cannot_compute():
    q, k, v = generate_qkv(1, 4, 4, 64, 64, 128, dtype=torch.bfloat16, device="cuda")
    with pytest.raises(aa.UnsupportedError, match="not expressible in FA4"):
        aa.attention(q, k, v, mask=aa.causal(), score=aa.alibi(torch.ones(4)), backend="fa4")
    with pytest.raises(aa.UnsupportedError, match="float16/bfloat16"):
        aa.attention(q.float(), k.float(), v.float(), backend="fa4")


@pytest.fixture
def flex_flash():
    """flex with the FLASH lowering forced (a call FLASH cannot serve is refused, never Triton)."""
    with flex_lowering("flash") as be:
        yield be


@pytest.mark.parametrize("case", [c for c in CASES if c[0] in FLEX_CASES], ids=list(FLEX_CASES))
def test_flex_flash_lowering_matches_the_oracle_forward_and_backward(case, flex_flash):
    before = flex_flash.stats["flash_calls"]
    triton_before = flex_flash.stats["triton_calls"]
    _check(_run("flex", case, return_lse=False))
    # torch raises rather than fall back from an explicit BACKEND="FLASH": these calls ran FA4
    assert flex_flash.stats["flash_calls"] > before and flex_flash.stats["triton_calls"] == triton_before


def test_flex_flash_lowering_runs_no_triton_attention_kernel(flex_flash):
    """The profiler's kernel names: no Triton flex template kernel (``triton_tem_...``) under FLASH."""
    q, k, v = generate_qkv(1, 8, 2, 1025, 1025, 128, dtype=torch.bfloat16, device="cuda", seed=5)
    aa.attention(q, k, v, mask=aa.causal(), backend="flex")  # compile outside the profile
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        aa.attention(q, k, v, mask=aa.causal(), backend="flex")
        torch.cuda.synchronize()
    names = [e.key for e in prof.key_averages()]  # FunctionEventAvg: the kernel name is its key
    assert names, "the profiler saw no CUDA kernel"
    assert not [n for n in names if "triton_tem" in n], names
    assert "lowering: FLASH" in str(aa.explain(q, k, v, mask=aa.causal(), backend="flex"))


@pytest.fixture
def flex_auto():
    """flex with the default lowering choice (FLASH where it is exact, Triton where measured faster)."""
    with flex_lowering("auto") as be:
        yield be


def test_flex_runs_a_softcap_forward_on_triton_and_its_backward_on_flash(flex_auto):
    """auto on Hopper: a softcap forward with the kernel guarantees runs the Triton kernel
    (``triton_beats_flash``), the same variant with gradients runs FLASH; both match the oracle."""
    if torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("the Triton-over-FLASH softcap forward was measured on Hopper only")
    q, k, v = generate_qkv(2, 8, 2, 256, 256, 128, dtype=torch.bfloat16, device="cuda", layout="bshd", seed=11)
    kw = dict(mask=aa.causal(), score=aa.softcap(20.0))
    assert "measured faster than FLASH for a softcap forward" in str(aa.explain(q, k, v, backend="flex", **kw))
    tri, fl = flex_auto.stats["triton_calls"], flex_auto.stats["flash_calls"]
    _check(compare_to_oracle(q, k, v, backend="flex", grad=False, **kw))
    assert flex_auto.stats["triton_calls"] > tri and flex_auto.stats["flash_calls"] == fl
    tri = flex_auto.stats["triton_calls"]
    _check(compare_to_oracle(q, k, v, backend="flex", grad=True, **kw))
    assert flex_auto.stats["flash_calls"] > fl and flex_auto.stats["triton_calls"] == tri


# --------------------------------------------------------------------------------------------
# flex's lowering choice with gradients: GQA x score terms / masks that read the head index x
# head dims. The FLASH backward on sm90 gave wrong gradients at D=80 and, with GQA, for every
# score term but softcap (round 23): flex must route those calls to Triton; every case matches
# the oracle.
# benchmarks/flash_grad_probe.py runs the same cases with FLASH forced past those refusals.


def _scale_by_head(s, b, h, q, kv):
    return s * (0.5 + 0.25 * h)


def _tilt(s, b, h, q, kv):
    return s + 0.05 * (q - kv)


def _grad_variants(H, S):
    g = torch.Generator().manual_seed(4)
    return {
        "causal": dict(mask=aa.causal()),
        "softcap": dict(mask=aa.causal(), score=aa.softcap(5.0)),
        "alibi": dict(mask=aa.causal(), score=aa.alibi(torch.linspace(0.05, 0.5, H))),
        "bias_h": dict(score=aa.bias(torch.randn(1, H, S, S, generator=g))),
        "bias_1": dict(score=aa.bias(torch.randn(1, 1, S, S, generator=g))),
        "score_fn_h": dict(mask=aa.causal(), score=aa.score_fn(_scale_by_head)),
        "score_fn_q": dict(mask=aa.causal(), score=aa.score_fn(_tilt)),
        "documents": dict(mask=aa.documents([S // 3, S - S // 3 - 5]) & aa.causal()),
    }


# (Hq, Hkv, S, D, dtype, variant)
GRAD_CASES = [
    (hq, hkv, 128, d, "bf16", var)
    for hq, hkv in ((4, 4), (8, 2))
    for d in (64, 128)
    for var in ("causal", "softcap", "alibi", "bias_h", "bias_1", "score_fn_h", "score_fn_q", "documents")
] + [
    (hq, hkv, s, d, dt, "causal")
    for hq, hkv in ((4, 4), (8, 2))
    for s, d, dt in ((128, 80, "bf16"), (200, 80, "fp16"), (128, 96, "bf16"), (128, 256, "bf16"), (128, 64, "fp16"))
]  # fmt: skip
GRAD_IDS = [f"{v}-H{hq}/{hkv}-S{s}-D{d}-{dt}" for hq, hkv, s, d, dt, v in GRAD_CASES]


def grad_case(case):
    """(q, k, v, attention kwargs) of a GRAD_CASES entry."""
    hq, hkv, s, d, dt, var = case
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[dt]
    q, k, v = generate_qkv(2, hq, hkv, s, s, d, dtype=dtype, device="cuda", layout="bshd", seed=13)
    return q, k, v, _grad_variants(hq, s)[var]


@pytest.mark.parametrize("case", GRAD_CASES, ids=GRAD_IDS)
def test_flex_lowering_choice_keeps_gradients_exact(case, flex_auto):
    q, k, v, kw = grad_case(case)
    _check(compare_to_oracle(q, k, v, backend="flex", grad=True, **kw))
