"""Diagnostic (not a CI test): flex's FLASH lowering forced past anyattn's refusals on the
gradient matrix of ``tests/test_cuda_fa4.py`` (GQA x score terms / masks that read the head index
x head dims), forward and backward against the float64 oracle. A case whose FLASH compile fails
is skipped with torch's message (flex would run Triton for it). Run on a Hopper/Blackwell GPU with
flash-attn-4 importable, from the repository root:

    python3 -m pytest -q -rA -p no:cacheprovider -n 14 benchmarks/flash_grad_probe.py

PASSED / FAILED per case say where the FLASH backward itself is exact; flex's refusals
(``flex_lowering.flash_refusal``) are written from these results.
"""

from __future__ import annotations

import pytest
import torch

from anyattn.backends.flex import FlexBackend
from anyattn.testing import compare_to_oracle, use_backend
from tests.test_cuda_fa4 import GRAD_CASES, GRAD_IDS, MISSING, grad_case

pytestmark = pytest.mark.skipif(MISSING is not None, reason=MISSING or "")


class ForcedFlash(FlexBackend):
    """flex with every call on the FLASH lowering (a compile failure still falls back to Triton
    and is recorded in ``flash_failed``)."""

    def lowering_for(self, sig):
        return "flash", ""


@pytest.mark.parametrize("case", GRAD_CASES, ids=GRAD_IDS)
def test_forced_flash_gradients(case):
    be = ForcedFlash(lowering="auto")
    q, k, v, kw = grad_case(case)
    with use_backend(be):
        comps = compare_to_oracle(q, k, v, backend="flex", grad=True, **kw)
    if be.flash_failed:
        pytest.skip(f"FLASH did not compile: {next(iter(be.flash_failed.values()))[:200]}")
    assert be.stats["flash_calls"] > 0
    bad = [str(c) for c in comps if not c.ok]
    assert not bad, "; ".join(bad)
    torch.cuda.synchronize()
