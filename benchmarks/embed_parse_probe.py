"""Time the parse + plan phase of ``anyattn embed`` (what ``embed()`` does before its first batch).

    python3 benchmarks/embed_parse_probe.py                 # 20k sequences, 5 repeats
    python3 benchmarks/embed_parse_probe.py --num-seqs 2000 --repeats 3

Workload (as benchmarks/embed_bench.py): ``--num-seqs`` random protein sequences, lengths
lognormal (median 320, sigma 0.58) clipped to 30..1022, 60-character lines, letters from
ACDEFGHIKLMNPQRSTVWY, seed 0, written to a FASTA file in a temporary directory (deleted at the end).

Timed, exactly as ``embed()`` calls them: ``_read_input`` (``read_fasta`` with the ESM tokenizer's
one-letter alphabet) consumed by ``_collect``, then ``_plan`` (ESM2 maximum 1024 residues,
``--max-tokens``). The timings print per phase (read+collect, plan) and in total: best and median
of ``--repeats`` runs, each started after a ``gc.collect()`` with the previous run's objects freed.
``sha1s``: reading every unique sequence's ``sha1`` afterwards (``_collect`` computed them up front
before; now they are computed when first read, i.e. when rows are written): ``total+sha1s`` is the
like-for-like number across the two versions. The plan's batches are hashed so that two versions of the code can be
checked for the same result (``plan sha1``).
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import math
import os
import random
import statistics
import tempfile
import time

import torch

from anyattn.embed.job import _collect, _plan, _read_input
from anyattn.models import ProteinTokenizer

AA = "ACDEFGHIKLMNPQRSTVWY"


def make_lengths(num, median, sigma, lo, hi, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(num, generator=g, dtype=torch.float64) * sigma + math.log(median)
    return [int(min(hi, max(lo, round(math.exp(v))))) for v in x.tolist()]


def write_fasta(path, lengths, seed, width=60):
    rng = random.Random(seed)
    with open(path, "w") as f:
        for i, n in enumerate(lengths):
            s = "".join(rng.choices(AA, k=n))
            f.write(f">seq{i}\n")
            f.writelines(s[j : j + width] + "\n" for j in range(0, n, width))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--num-seqs", type=int, default=20000)
    p.add_argument("--max-tokens", type=int, default=16384)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)

    tok = ProteinTokenizer.esm()
    alphabet = frozenset(t for t in tok.vocab if len(t) == 1 and t.isalpha())  # as embed() builds it
    max_residues = 1026 - 2  # ESM2: max_position_embeddings 1026 minus <cls> and <eos>
    lengths = make_lengths(a.num_seqs, 320, 0.58, 30, 1022, a.seed)
    with tempfile.TemporaryDirectory() as d:
        fasta = os.path.join(d, "probe.fasta")
        write_fasta(fasta, lengths, a.seed)
        size = os.path.getsize(fasta)
        t_read, t_plan, t_total, t_sha1, digest = [], [], [], [], None
        for _ in range(a.repeats):
            # each run starts from the same heap (the job parses once): the previous run's
            # objects are freed and collected before the clock starts
            seqs = id_map = batches = None
            gc.collect()
            t0 = time.perf_counter()
            records, where = _read_input(fasta, alphabet, "error")
            seqs, id_map, n_records = _collect(records, where)
            t1 = time.perf_counter()
            batches = _plan(seqs, max_residues, "error", a.max_tokens, where)
            t2 = time.perf_counter()
            for s in seqs:  # computed when rows are written (or already by _collect)
                s.sha1  # noqa: B018
            t3 = time.perf_counter()
            t_read.append(t1 - t0)
            t_plan.append(t2 - t1)
            t_total.append(t2 - t0)
            t_sha1.append(t3 - t2)
            h = hashlib.sha1()
            for b in batches:
                h.update(repr([(k, c) for k, c, _ in b]).encode())
            h.update(repr([(s.sha1, s.line, s.ids) for s in seqs]).encode())
            digest = h.hexdigest()
    print(
        f"{n_records} records, {len(id_map)} ids, {sum(lengths)} residues, {size / 1e6:.1f} MB FASTA, "
        f"{len(batches)} batches (max_tokens {a.max_tokens}), plan sha1 {digest[:12]}"
    )
    t_all = [a + b for a, b in zip(t_total, t_sha1)]
    rows = [("read+collect", t_read), ("plan", t_plan), ("total", t_total), ("sha1s", t_sha1), ("total+sha1s", t_all)]
    for name, ts in rows:
        best, median = min(ts) * 1e3, statistics.median(ts) * 1e3
        print(f"{name:<13} best {best:8.1f} ms   median {median:8.1f} ms   ({a.repeats} runs)")


if __name__ == "__main__":
    main()
