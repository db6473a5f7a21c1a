"""The ``bench model`` workload: protein lengths, token ids and length-sorted batches.

Lengths (residues) come from a lognormal (median, sigma, seed) clipped to [lo, hi], or from a
FASTA file. Every sequence is tokenized as ``<cls> residues <eos>`` (length + 2 tokens); token
ids are random residues (ids 4..23), so no <mask> token appears. Batches are length-sorted
(longest first) and filled greedily up to a token budget: packed (the sum of lengths) or padded
(rows x the longest).
"""

from __future__ import annotations

import math

import torch

from . import UsageError

__all__ = ["CLS", "EOS", "PAD", "fasta_lengths", "make_batches", "make_lengths", "padded_inputs", "token_ids"]

CLS, PAD, EOS = 0, 1, 2


def make_lengths(num: int, median: float, sigma: float, lo: int, hi: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(num, generator=g, dtype=torch.float64) * sigma + math.log(median)
    return [int(min(hi, max(lo, round(math.exp(v))))) for v in x.tolist()]


def fasta_lengths(path: str, lo: int, hi: int) -> list[int]:
    out, n = [], None
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line.startswith(">"):
                if n is not None:
                    out.append(n)
                n = 0
            elif line and n is not None:
                n += len(line)
    if n is not None:
        out.append(n)
    if not out:
        raise UsageError(f"--fasta {path}: no sequences found")
    return [min(hi, max(lo, x)) for x in out]


def make_batches(tokens: list[int], max_tokens: int, padded: bool) -> list[list[int]]:
    """Indices of length-sorted (longest first) batches: sum(len) <= max_tokens (packed) or
    count * longest <= max_tokens (padded)."""
    order = sorted(range(len(tokens)), key=lambda i: -tokens[i])
    batches, cur, used = [], [], 0
    for i in order:
        n = tokens[i]
        need = (len(cur) + 1) * tokens[cur[0]] if (padded and cur) else used + n
        if cur and need > max_tokens:
            batches.append(cur)
            cur, used = [], 0
        cur.append(i)
        used += n
    if cur:
        batches.append(cur)
    return batches


def token_ids(tokens: list[int], seed: int) -> list[torch.Tensor]:
    """One random token-id sequence per length: <cls>, residues (ids 4..23), <eos>."""
    g = torch.Generator().manual_seed(seed + 1)
    out = []
    for n in tokens:
        t = torch.randint(4, 24, (n,), generator=g)
        t[0], t[-1] = CLS, EOS
        out.append(t)
    return out


def padded_inputs(batches, tokens, ids, device) -> list:
    """Right-padded (input_ids, attention_mask) per batch: B rows x the batch's longest."""
    out = []
    for b in batches:
        S = max(tokens[i] for i in b)
        x = torch.full((len(b), S), PAD, dtype=torch.long)
        am = torch.zeros((len(b), S), dtype=torch.long)
        for r, i in enumerate(b):
            x[r, : tokens[i]] = ids[i]
            am[r, : tokens[i]] = 1
        out.append((x.to(device), am.to(device)))
    return out
