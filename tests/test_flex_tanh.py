"""softcap's tanh in flex's Triton kernels on CUDA: the ``anyattn::tanh_approx`` op (flex_tanh) and
where flex uses it. Its kernel-side form (``tanh.approx.f32``) runs only on a GPU
(tests/test_cuda_core.py checks it against the float64 oracle); here: the op's eager value and
derivative, and that flex picks it for CUDA Triton calls with a softcap and nowhere else."""

from __future__ import annotations

import torch

import anyattn as aa
from anyattn.backends.flex import FlexBackend
from anyattn.backends.flex_tanh import fast_tanh, softcap_mod, why
from anyattn.call import Signature
from anyattn.testing import generate_qkv, make_call


def _sig(device="cuda", score=aa.softcap(30.0), **kw):
    return Signature.of(B=1, Hq=4, Sq=256, D=64, dtype=torch.bfloat16, device=device, score=score, **kw)


def test_op_is_tanh_eagerly_with_its_derivative():
    op = fast_tanh()
    assert op is not None, why()
    x = torch.linspace(-30, 30, 601, dtype=torch.float64, requires_grad=True)
    y = op(x)
    assert torch.equal(y, torch.tanh(x))
    (g,) = torch.autograd.grad(y.sum(), x)
    torch.testing.assert_close(g, 1 - torch.tanh(x) ** 2, rtol=0, atol=1e-15)
    assert fast_tanh() is op  # registered once


def test_flex_takes_it_for_cuda_triton_softcap_calls_only():
    be = FlexBackend()
    assert be.uses_fast_tanh(_sig())
    assert be.uses_fast_tanh(_sig(score=[aa.alibi(torch.ones(4)), aa.softcap(5.0)]))
    assert not be.uses_fast_tanh(_sig(), "flash")  # FlashAttention-4's kernel has its own tanh
    assert not be.uses_fast_tanh(_sig(device="cpu"))  # CPU inductor: torch.tanh
    assert not be.uses_fast_tanh(_sig(score=aa.alibi(torch.ones(4))))  # no softcap, nothing to change
    be.fast_tanh = False
    assert not be.uses_fast_tanh(_sig())


def test_score_mod_keeps_the_order_and_the_other_terms():
    """With the op, the chained score_mod computes what the terms' own mods compute (the op is
    tanh eagerly), softcap in its place among the other terms, sinks skipped."""
    q, k, v = generate_qkv(1, 4, 4, 32, 32, 16, dtype=torch.float32)
    slopes = torch.tensor([0.5, 0.25, 0.125, 0.0625])
    score = [aa.alibi(slopes), aa.softcap(3.0), aa.sink(torch.zeros(4))]
    call = make_call(q, k, v, score=score)
    be = FlexBackend()
    s = torch.randn(1, 4, 32, 32) * 10
    b, h = torch.zeros(1, 1, 1, 1, dtype=torch.long), torch.arange(4).view(1, 4, 1, 1)
    qi, kv = torch.arange(32).view(1, 1, 32, 1), torch.arange(32).view(1, 1, 1, 32)
    plain = be.score_mod_for(call)(s, b, h, qi, kv)  # CPU call: the terms' own mods
    ref = 3.0 * torch.tanh((s + call.bound_scores()[0].mod(torch.zeros_like(s), b, h, qi, kv)) / 3.0)
    torch.testing.assert_close(plain, ref)
    be_cuda = FlexBackend()
    be_cuda.uses_fast_tanh = lambda sig, lowering="triton": True  # as on a CUDA Triton call
    torch.testing.assert_close(be_cuda.score_mod_for(call)(s, b, h, qi, kv), ref)
    torch.testing.assert_close(softcap_mod(3.0, fast_tanh())(s, b, h, qi, kv), 3.0 * torch.tanh(s / 3.0))


def test_op_batches_under_vmap_without_the_per_sample_fallback():
    """FlexAttention's unfused path (decode-sized calls, HF generation) runs the score_mod under
    vmap: the op has its own batching rule, so no per-sample loop (torch warns when it falls back)."""
    import warnings

    from torch.nn.attention.flex_attention import flex_attention

    op = fast_tanh()
    x = torch.randn(3, 5, 7)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        torch.testing.assert_close(torch.vmap(torch.vmap(op))(x), torch.tanh(x))
        q, k, v = generate_qkv(1, 2, 2, 4, 40, 16, dtype=torch.float32)
        warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")
        got = flex_attention(q, k, v, score_mod=softcap_mod(2.0, op))
    ref = aa.attention(q, k, v, score=aa.softcap(2.0), backend="eager")
    torch.testing.assert_close(got, ref)


def test_only_compiled_triton_kernels_take_it():
    """The unfused decode path computes the score_mod eagerly (torch.tanh either way) and FLASH has
    its own tanh: neither gets the op, even on CUDA."""
    be = FlexBackend()
    assert not be.uses_fast_tanh(_sig(), "unfused")
    assert not be.uses_fast_tanh(_sig(), "flash")


_FIRST_USE_IN_A_COMPILED_GRAPH = r"""
import torch
from anyattn.backends.flex_tanh import fast_tanh

@torch.compile(fullgraph=True, backend="aot_eager")
def f(x):
    op = fast_tanh()  # the first use in this process: inside dynamo's trace
    return op(x) if op is not None else x

x = torch.randn(64, dtype=torch.float64, requires_grad=True)
y = f(x)
y.sum().backward()
assert fast_tanh() is not None
assert torch.allclose(y, torch.tanh(x)) and torch.allclose(x.grad, 1 - torch.tanh(x) ** 2)
print("ok")
"""


def test_first_use_inside_a_callers_compiled_graph_registers_the_op():
    """A model compiled before its first call reaches the op's registration inside dynamo's trace
    (a fresh process: nothing registered yet). Registration runs eagerly there, instead of being
    traced (which fails on torch.library's schema inference), and the graph uses the op."""
    import os
    import subprocess
    import sys

    src = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src")
    env = {**os.environ, "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", "")}
    r = subprocess.run([sys.executable, "-c", _FIRST_USE_IN_A_COMPILED_GRAPH], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-3000:]
