"""Restricting SDPA to one kernel, cheaply (shared by the sdpa-family backends unchanged).

``torch.nn.attention.sdpa_kernel`` is a contextlib context manager that costs ~20 us of host time
per call on an H200 host, as much as anyattn's whole per-call budget. ``run_only`` flips the same
global switches through torch's C bindings (~1 us) and restores them. Under torch.compile, or on a
torch without those bindings, it uses the public context manager.
"""

from __future__ import annotations

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

_NAMES = ("flash", "mem_efficient", "math", "cudnn")
_BACKEND_OF = {
    "flash": SDPBackend.FLASH_ATTENTION,
    "mem_efficient": SDPBackend.EFFICIENT_ATTENTION,
    "math": SDPBackend.MATH,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
}


def _switches():
    out = []
    for n in _NAMES:
        g = getattr(torch._C, f"_get_{n}_sdp_enabled", None)
        s = getattr(torch._C, f"_set_sdp_use_{n}", None)
        if g is None or s is None:
            return None
        out.append((g, s))
    return out


_SWITCHES = _switches()


def run_only(kernel: str, fn):
    """Call ``fn()`` with SDPA allowed to use only ``kernel`` ("flash" or "cudnn", ...)."""
    if _SWITCHES is None or torch.compiler.is_compiling():
        with sdpa_kernel([_BACKEND_OF[kernel]]):
            return fn()
    want = [n == kernel for n in _NAMES]
    prev = [g() for g, _ in _SWITCHES]
    try:
        for (_, s), on in zip(_SWITCHES, want):
            s(on)
        return fn()
    finally:
        for (_, s), on in zip(_SWITCHES, prev):
            s(on)
