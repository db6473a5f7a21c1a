"""Variant factories shared by the CPU and CUDA suites.

Each factory takes the call geometry and returns ``dict(mask=..., score=...)`` for attention().
Factories that need Sq <= Sk (terms that look up the query's own key position) say so.
"""

from __future__ import annotations

import torch

import anyattn as aa


def _docs(Sk, B):
    # uneven documents, a zero-length one, a one-token one, and padding past the sum
    if Sk < 6:
        return [Sk]
    a = Sk // 3
    return [a, 0, 1, Sk - a - 3]  # two tokens of padding past the sum


def _keep(B, Sk):
    keep = torch.ones(B, Sk, dtype=torch.bool)
    for b in range(B):
        n = max(1, Sk - 3 * b - b * Sk // 4)
        if b % 2:
            keep[b, : Sk - n] = False  # left padding
        else:
            keep[b, n:] = False  # right padding
    return keep


def _slopes(H):
    return torch.tensor([2.0 ** (-8 * (h + 1) / H) for h in range(H)])


def _mod_diag(b, h, q, kv):
    return (q + kv) % 3 != 1


def _score_tilt(s, b, h, q, kv):
    return s + 0.01 * (h + 1) * (q - kv).float().clamp(-4, 4)


# name -> (factory(B, H, Sq, Sk), needs Sq <= Sk, additive-or-mask-only (SDPA can serve it))
VARIANTS = {
    "none": (lambda B, H, Sq, Sk: {}, False, True),
    "causal": (lambda B, H, Sq, Sk: {"mask": aa.causal()}, False, True),
    "window": (lambda B, H, Sq, Sk: {"mask": aa.sliding_window(5)}, False, True),
    "window_lr": (lambda B, H, Sq, Sk: {"mask": aa.sliding_window(4, 3)}, False, True),
    "documents": (lambda B, H, Sq, Sk: {"mask": aa.documents(_docs(Sk, B))}, True, True),
    "documents_causal": (lambda B, H, Sq, Sk: {"mask": aa.documents(_docs(Sk, B)) & aa.causal()}, True, True),
    "padding": (lambda B, H, Sq, Sk: {"mask": aa.padding(mask=_keep(B, Sk))}, True, True),
    "padding_causal": (lambda B, H, Sq, Sk: {"mask": aa.padding(mask=_keep(B, Sk)) & aa.causal()}, True, True),
    "prefix_lm": (lambda B, H, Sq, Sk: {"mask": aa.prefix_lm(torch.tensor([min(Sk, 5 + 7 * b) for b in range(B)]))}, False, True),
    "block_causal": (lambda B, H, Sq, Sk: {"mask": aa.block_causal(torch.arange(Sk) // 4)}, True, True),
    "image_scope": (
        lambda B, H, Sq, Sk: {"mask": aa.causal() | aa.same_segment(torch.where((torch.arange(Sk) % 11) < 4, torch.arange(Sk) // 11, -1))},
        True,
        True,
    ),
    "chunked": (lambda B, H, Sq, Sk: {"mask": aa.chunked(6)}, False, True),
    "not_window": (lambda B, H, Sq, Sk: {"mask": aa.causal() & ~aa.sliding_window(2)}, False, True),
    "mask_fn": (lambda B, H, Sq, Sk: {"mask": aa.mask_fn(_mod_diag)}, False, True),
    "dense": (
        lambda B, H, Sq, Sk: {"mask": aa.dense(torch.rand(B, 1, Sq, Sk, generator=torch.Generator().manual_seed(3)) > 0.3)},
        False,
        True,
    ),
    "softcap": (lambda B, H, Sq, Sk: {"mask": aa.causal(), "score": aa.softcap(2.0)}, False, False),
    "alibi": (lambda B, H, Sq, Sk: {"mask": aa.causal(), "score": aa.alibi(_slopes(H))}, False, True),
    "bias": (
        lambda B, H, Sq, Sk: {"score": aa.bias(torch.randn(1, H, Sq, Sk, generator=torch.Generator().manual_seed(4)))},
        False,
        True,
    ),
    "relative_bias": (
        lambda B, H, Sq, Sk: {
            "score": aa.relative_bias(torch.randn(H, 32, generator=torch.Generator().manual_seed(5)), 32, 128)
        },
        False,
        True,
    ),
    "score_fn": (lambda B, H, Sq, Sk: {"score": aa.score_fn(_score_tilt)}, False, False),
    "softcap_alibi_window": (
        lambda B, H, Sq, Sk: {"mask": aa.sliding_window(6), "score": [aa.softcap(3.0), aa.alibi(_slopes(H))]},
        False,
        False,
    ),
}


def make(name, B, H, Sq, Sk):
    factory, needs_aligned, _ = VARIANTS[name]
    return factory(B, H, Sq, Sk)


def applicable(name, Sq, Sk) -> bool:
    return not (VARIANTS[name][1] and Sq > Sk)


def sdpa_can(name) -> bool:
    return VARIANTS[name][2]
