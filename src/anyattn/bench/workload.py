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

__all__ = ["CLS", "EOS", "PAD", "fasta_lengths", "make_batches", "make_lengths", "padded_inputs", "sequences", "token_ids",
           "write_fasta"]

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


def padded_inputs(batches, tokens, ids, device, pad: int = PAD) -> list:
    """Right-padded (input_ids, attention_mask) per batch: B rows x the batch's longest; ``pad``
    fills the padding (ESM's <pad> by default)."""
    out = []
    for b in batches:
        S = max(tokens[i] for i in b)
        x = torch.full((len(b), S), pad, dtype=torch.long)
        am = torch.zeros((len(b), S), dtype=torch.long)
        for r, i in enumerate(b):
            x[r, : tokens[i]] = ids[i]
            am[r, : tokens[i]] = 1
        out.append((x.to(device), am.to(device)))
    return out


# ESM's alphabet ids 4..23 (the residues token_ids draws): L A G V S E R T I D P K Q N F Y M H W C
_ESM_RESIDUES = "LAGVSERTIDPKQNFYMHWC"


def sequences(lengths: list[int], seed: int) -> list[str]:
    """The residue strings of the ESM2 benchmark's sequences: ``token_ids`` of ``length + 2``
    tokens (same seed) read back through ESM's alphabet, so every family and the embed job run
    exactly the residues ESM2's rows run."""
    ids = token_ids([n + 2 for n in lengths], seed)
    return ["".join(_ESM_RESIDUES[i - 4] for i in t[1:-1].tolist()) for t in ids]


def write_fasta(path: str, seqs: list[str], prefix: str = "seq") -> None:
    """One record per sequence, ids ``{prefix}{index}``, 60 residues a line."""
    with open(path, "w") as f:
        for i, s in enumerate(seqs):
            f.write(f">{prefix}{i}\n")
            for j in range(0, len(s), 60):
                f.write(s[j : j + 60] + "\n")
