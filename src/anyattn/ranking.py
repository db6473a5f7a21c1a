"""The ranking ``auto`` uses: for each device kind and variant class, backends fastest first.

This is data, not logic. ``auto`` walks the list and takes the first backend that can compute
the call exactly; backends missing from a list are tried after it, in registry order.

Source of the CUDA rows: ``benchmarks/results/h200_kernels.md`` (H200, torch 2.11, bf16, H=16,
D=128, 16k tokens per call), produced by

    python -m anyattn bench kernels --preset h200 --out benchmarks/results

and DESIGN.md section 6 for the rows that benchmark does not cover. The CPU rows come from
``anyattn bench kernels --quick`` on a 2-core CPU: SDPA's CPU kernels beat the eager reference,
and compiled Flex costs ~20 s of compilation per new variant, so it is last.
"""

from __future__ import annotations

RANKING: dict[str, dict[str, tuple[str, ...]]] = {
    "cuda": {
        "dense": ("cudnn", "flash_torch", "flex", "sdpa", "flash", "kernels_flash", "eager"),
        "causal": ("cudnn", "flash_torch", "flex", "sdpa", "flash", "kernels_flash", "eager"),
        "window": ("flex", "flash_torch", "flash", "kernels_flash", "cudnn", "sdpa", "eager"),
        "documents": ("flash_torch", "flex", "flash", "kernels_flash", "cudnn", "sdpa", "eager"),
        "padding": ("flash_torch", "flex", "cudnn", "sdpa", "flash", "kernels_flash", "eager"),
        "masked": ("flex", "cudnn", "sdpa", "eager"),
        "scored": ("flex", "flash", "kernels_flash", "cudnn", "sdpa", "eager"),
    },
    "cpu": {
        "*": ("sdpa", "eager", "flex"),
    },
}


def variant_class(call) -> str:
    """Which RANKING row a call belongs to."""
    from .spec import And, Documents, Padding, Window

    if call.scores:
        return "scored"
    m = call.mask
    if m is None:
        return "dense"
    if isinstance(m, Window):
        return "causal" if m.is_causal else "window"
    if isinstance(m, Padding):
        return "padding"
    parts = m.terms if isinstance(m, And) else (m,)
    if any(isinstance(p, Documents) for p in parts) and all(isinstance(p, (Documents, Window)) for p in parts):
        return "documents"
    return "masked"


def ranking_for(call) -> tuple[str, ...]:
    rows = RANKING.get(call.device.type, RANKING["cpu"])
    return rows.get(variant_class(call)) or rows.get("*") or ()
