"""The tanh of ``softcap`` in flex's Triton kernels on CUDA: the hardware ``tanh.approx.f32``.

Triton lowers ``torch.tanh`` to libdevice's accurate tanh, a few dozen instructions per score; in
a FlexAttention kernel that is most of the softcap's cost (H100, 1 x 16 x 16384 x 128 bf16 causal,
``benchmarks/results/round20/``: 198 TFLOP/s with ``torch.tanh``, 357 forward / 321 forward+backward
with ``tanh.approx.f32``, against 402 / 400 without softcap). ``tanh.approx.f32`` is one
special-function-unit instruction with a maximum relative error of about 2^-11 (PTX ISA), below the
rounding of the bf16 / fp16 scores the kernel's inputs carry: the flex backend checks it against the
float64 oracle with anyattn's tolerance rule (``tests/test_cuda_core.py``), and it matched the
accurate tanh's error to three digits in that run.

``tanh_approx`` is a custom op: ``torch.tanh`` wherever it runs eagerly (CPU, FlexAttention's
unfused path), its derivative ``1 - y^2`` from its own output, and an inductor lowering to the
inline PTX instruction, used when FlexAttention's Triton kernel is generated for a CUDA device.
The lowering goes through inductor's ``register_lowering`` / ``ops.inline_asm_elementwise``; on a
torch without them :func:`fast_tanh` returns None (with :func:`why`) and flex keeps ``torch.tanh``.
"""

from __future__ import annotations

import functools

import torch

_ASM = "tanh.approx.f32 $0, $1;"
_STATE: dict = {}  # "op": the registered op, or "why": why it could not be registered


def _register():
    from torch._inductor.lowering import make_pointwise, register_lowering
    from torch._inductor.virtualized import ops

    @torch.library.custom_op("anyattn::tanh_approx", mutates_args=())
    def tanh_approx(x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x)

    @tanh_approx.register_fake
    def _(x):
        return torch.empty_like(x)

    def setup(ctx, inputs, output):
        ctx.save_for_backward(output)

    def backward(ctx, grad):
        (y,) = ctx.saved_tensors
        return grad * (1 - y * y)

    tanh_approx.register_autograd(backward, setup_context=setup)

    @tanh_approx.register_vmap
    def _(info, in_dims, x):  # elementwise: the batched tensor goes through as it is
        return tanh_approx(x), in_dims[0]

    def lower(x):
        # FlexAttention's scores are float32 inside the kernel (the instruction's type)
        return make_pointwise(functools.partial(ops.inline_asm_elementwise, asm=_ASM))(x)

    register_lowering(torch.ops.anyattn.tanh_approx)(lower)
    return torch.ops.anyattn.tanh_approx


@torch.compiler.assume_constant_result
def _registered() -> bool:
    """Register the op once; whether it is registered. Dynamo runs this function rather than
    tracing it, so the first use may come inside a caller's compiled graph (a model compiled
    before its first call): tracing the registration itself fails ("Attempted to call function
    marked as skipped": ``infer_schema``)."""
    if "op" not in _STATE and "why" not in _STATE:
        try:
            _STATE["op"] = _register()
        except (ImportError, AttributeError, TypeError, RuntimeError) as e:
            _STATE["why"] = f"{type(e).__name__}: {e}"
    return "op" in _STATE


def fast_tanh():
    """The ``anyattn::tanh_approx`` op (registered on first use), or None where this torch lacks
    the hooks it needs (then :func:`why` says which)."""
    return torch.ops.anyattn.tanh_approx if _registered() else None


def why() -> str | None:
    """Why :func:`fast_tanh` is None (None when it is not, or was not tried yet)."""
    return _STATE.get("why")


def softcap_mod(cap: float, tanh):
    """``cap * tanh(s / cap)`` as a score_mod, with the given tanh."""

    def mod(s, b, h, q, kv):
        return cap * tanh(s / cap)

    return mod
