"""Benchmark cases: one frozen Config per (variant, mode, dtype, shape), its inputs, its FLOPs.

Variants (every one a single ``anyattn.attention`` call)::

    dense       mask=None
    causal      causal()
    documents   documents(lengths): n_docs packed documents per row, bidirectional, lengths in
                [S/(8 n), 2 S/n] from a fixed seed summing to S (n=16, S=16384: 128..2048)
    window      sliding_window(W): the query and the W keys before it
    gqa         causal(), Hkv = Hq / 4
    padding     padding(lengths): right padding, row lengths from S/2 to S (25% padding overall)
    prefix_lm   prefix_lm(S // 4)
    softcap     causal(), score=softcap(cap)        (Gemma-2 style)
    alibi       causal(), score=alibi(slopes)       (BLOOM/MPT style, slopes 2^(-8 (h+1) / H))

FLOPs (the one formula, DESIGN.md section 7): useful forward FLOPs = 2 * (D + Dv) * P where P
counts the visible (b, h, i, j) pairs exactly (= 4 * B * Hq * D * pairs-per-head when Dv = D);
backward = 2.5 x forward, so a fwd+bwd call does 3.5 x the forward work. Masked-out pairs are
not useful work, even where a kernel computes them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .. import alibi, attention_with_weights, causal, documents, padding, prefix_lm, sliding_window, softcap

__all__ = [
    "DTYPES",
    "MODES",
    "VARIANTS",
    "Config",
    "Inputs",
    "attention_flops",
    "build_inputs",
    "build_terms",
    "doc_lengths",
    "make_config",
    "pad_lengths",
    "visible_pairs",
]

VARIANTS = ("dense", "causal", "documents", "window", "doc_window", "gqa", "padding", "prefix_lm", "softcap", "alibi")
MODES = ("fwd", "fwd+bwd")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
BWD_FACTOR = 2.5  # backward FLOPs / forward FLOPs


@dataclass(frozen=True)
class Config:
    """One benchmark case."""

    variant: str  # one of VARIANTS
    mode: str  # "fwd" | "fwd+bwd"
    dtype: str  # key of DTYPES
    B: int
    S: int  # Sq == Sk
    Hq: int
    Hkv: int  # Hq except for the gqa variant
    D: int  # head dim (Dv == D)
    window: int = 1024  # window variant: keys before the query
    n_docs: int = 16  # documents variant
    cap: float = 50.0  # softcap variant
    device: str = "cpu"

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def grad(self) -> bool:
        return self.mode == "fwd+bwd"

    @property
    def shape(self) -> str:
        s = f"B={self.B} S={self.S} Hq={self.Hq}"
        if self.Hkv != self.Hq:
            s += f" Hkv={self.Hkv}"
        s += f" D={self.D}"
        if self.variant in ("window", "doc_window"):
            s += f" W={self.window}"
        if self.variant in ("documents", "doc_window"):
            s += f" docs={self.n_docs}"
        return s


def make_config(variant, mode, dtype, *, B, S, H, D, window, n_docs, cap, device) -> Config:
    Hkv = max(1, H // 4) if variant == "gqa" else H
    while H % Hkv:  # keep Hq a multiple of Hkv
        Hkv -= 1
    return Config(
        variant, mode, dtype, B, S, H, Hkv, D, min(window, max(S - 1, 0)), max(1, min(n_docs, S)), cap, device
    )


@dataclass
class Inputs:
    q: torch.Tensor  # (B, Hq, S, D)
    k: torch.Tensor  # (B, Hkv, S, D)
    v: torch.Tensor  # (B, Hkv, S, D)
    mask: object  # anyattn mask term or None
    score: object  # anyattn score term or None
    doc_lengths: tuple[int, ...] | None = None  # documents: shared by every row
    pad_lengths: tuple[int, ...] | None = None  # padding: one per row
    prefix: int | None = None
    slopes: torch.Tensor | None = None  # alibi, float32 (Hq,)

    @property
    def spec(self) -> str:
        parts = [f"mask={self.mask!r}" if self.mask is not None else "mask=None"]
        if self.score is not None:
            parts.append(f"score={self.score!r}")
        return " ".join(parts)

    def kwargs(self) -> dict:
        return {"mask": self.mask, "score": self.score}


def doc_lengths(S: int, n: int, seed: int = 0) -> tuple[int, ...]:
    """n document lengths in [S/(8n), 2S/n] summing exactly to S, from a fixed seed."""
    n = max(1, min(n, S))
    lo, hi = max(1, S // (8 * n)), max(1, (2 * S) // n)
    if n * hi < S:
        hi = -(-S // n)
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(lo, hi + 1, (n,), generator=g).tolist()
    diff, i = S - sum(lens), 0
    while diff != 0:  # walk the documents, nudging lengths within [lo, hi] until the sum is S
        j = i % n
        if diff > 0 and lens[j] < hi:
            step = min(diff, hi - lens[j])
            lens[j] += step
            diff -= step
        elif diff < 0 and lens[j] > lo:
            step = min(-diff, lens[j] - lo)
            lens[j] -= step
            diff += step
        i += 1
    return tuple(lens)


def pad_lengths(B: int, S: int) -> tuple[int, ...]:
    """Right-padding lengths: evenly from S/2 to S (25% padding overall); 3S/4 when B == 1."""
    if B == 1:
        return (max(1, round(0.75 * S)),)
    return tuple(max(1, round(S * (0.5 + 0.5 * b / (B - 1)))) for b in range(B))


def alibi_slopes(H: int) -> torch.Tensor:
    return torch.tensor([2.0 ** (-8.0 * (h + 1) / H) for h in range(H)], dtype=torch.float32)


def build_terms(cfg: Config) -> Inputs:
    """The anyattn terms of a case (and what the raw calls need), without q, k, v."""
    inp = Inputs(None, None, None, None, None)
    var = cfg.variant
    if var == "dense":
        pass
    elif var in ("causal", "gqa"):
        inp.mask = causal()
    elif var == "window":
        inp.mask = sliding_window(cfg.window)
    elif var == "documents":
        inp.doc_lengths = doc_lengths(cfg.S, cfg.n_docs)
        inp.mask = documents(list(inp.doc_lengths))
    elif var == "doc_window":  # packed documents, each attended through a causal sliding window
        inp.doc_lengths = doc_lengths(cfg.S, cfg.n_docs)
        inp.mask = documents(list(inp.doc_lengths)) & sliding_window(cfg.window)
    elif var == "padding":
        inp.pad_lengths = pad_lengths(cfg.B, cfg.S)
        inp.mask = padding(torch.tensor(inp.pad_lengths, dtype=torch.int64))
    elif var == "prefix_lm":
        inp.prefix = cfg.S // 4
        inp.mask = prefix_lm(inp.prefix)
    elif var == "softcap":
        inp.mask, inp.score = causal(), softcap(cfg.cap)
    elif var == "alibi":
        inp.slopes = alibi_slopes(cfg.Hq)
        inp.mask, inp.score = causal(), alibi(inp.slopes)
    else:
        raise ValueError(f"unknown variant {var!r}; expected one of {VARIANTS}")
    return inp


def build_inputs(cfg: Config, *, seed: int = 0) -> Inputs:
    """q, k, v (on the case's device; requiring grad in fwd+bwd mode) and the anyattn terms
    (term tensors stay on the CPU; anyattn moves them once per lowering)."""
    g = torch.Generator().manual_seed(seed)
    dev, dt = torch.device(cfg.device), cfg.torch_dtype

    def make(h):
        return torch.randn(cfg.B, h, cfg.S, cfg.D, generator=g).to(dev, dt).requires_grad_(cfg.grad)

    inp = build_terms(cfg)
    inp.q, inp.k, inp.v = make(cfg.Hq), make(cfg.Hkv), make(cfg.Hkv)
    return inp


def visible_pairs(mask, B: int, H: int, Sq: int, Sk: int, *, chunk_elems: int = 1 << 24) -> int:
    """Exact number of visible (b, h, i, j) pairs of an anyattn mask term, counted on the CPU
    by evaluating the term's predicate over query chunks (never more than ``chunk_elems``
    booleans at a time)."""
    if mask is None:
        return B * H * Sq * Sk
    try:  # the term's own predicate (internal API: fast, chunked)
        from .. import spec as _spec

        cm = _spec.canonical_mask(mask)
        geo = _spec.Geometry(B, H, Sq, Sk, torch.device("cpu"))
        bound = cm.bind(geo)
    except (ImportError, AttributeError, TypeError):  # the internals moved: the public fallback
        return _visible_pairs_public(mask, B, H, Sq, Sk)
    nb, nh = (B if bound.uses_b else 1), (H if bound.uses_h else 1)
    b = torch.arange(nb).view(-1, 1, 1, 1)
    h = torch.arange(nh).view(1, -1, 1, 1)
    kv = torch.arange(Sk).view(1, 1, 1, -1)
    rows = max(1, chunk_elems // max(1, nb * nh * Sk))
    total = 0
    for q0 in range(0, Sq, rows):
        q = torch.arange(q0, min(Sq, q0 + rows)).view(1, 1, -1, 1)
        m = bound.pred(b, h, q, kv)
        while m.dim() < 4:
            m = m.unsqueeze(0)
        m = m.expand(m.shape[0], m.shape[1], q.shape[2], Sk)
        total += int(m.sum()) * (B // m.shape[0]) * (H // m.shape[1])
    return total


def _visible_pairs_public(mask, B: int, H: int, Sq: int, Sk: int) -> int:
    """The same count through the public API: with q = k = 0 every visible key of a row gets the
    weight 1/n and every hidden one exactly 0. One head (the matrix's masks do not depend on the
    head); a (B, 1, Sq, Sk) float32 weight matrix (1 GiB at B=1, S=16384)."""
    qk = torch.zeros(B, 1, Sq, 8), torch.zeros(B, 1, Sk, 8)
    _, w = attention_with_weights(qk[0], qk[1], qk[1], mask=mask)
    return int((w > 0).sum()) * H


def attention_flops(pairs: int, D: int, Dv: int | None = None, mode: str = "fwd") -> float:
    """Useful FLOPs: 2 (D + Dv) per visible pair forward (QK^T and PV); backward 2.5 x that."""
    Dv = D if Dv is None else Dv
    fwd = 2.0 * (D + Dv) * pairs
    return fwd * (1.0 + BWD_FACTOR) if mode == "fwd+bwd" else fwd


def score_gib(cfg: Config) -> float:
    """Size of one float32 score matrix of the case (what eager materializes)."""
    return cfg.B * cfg.Hq * cfg.S * cfg.S * 4 / 2**30


def fmt_tflops(flops: float, ms: float) -> float:
    if not (ms > 0) or math.isnan(ms):
        return float("nan")
    return flops / (ms * 1e-3) / 1e12
