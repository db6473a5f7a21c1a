"""The embed job's plan: records -> unique sequences -> long policy -> token-budget batches.

The plan depends only on the set of unique sequences, the family's special tokens per sequence
and ``max_tokens``, never on the input order or on what an earlier run finished (see
:mod:`anyattn.embed.job`). The input order itself (one id per record, duplicates included) and
the input's identity (sha1 of its ids and sequences, in order) are kept for the store.
"""

from __future__ import annotations

import hashlib
import math
import operator
import os
from dataclasses import dataclass, field

from ..errors import bad_value
from .fasta import FastaError, read_fasta, read_records


@dataclass(slots=True)
class _Seq:
    seq: str  # after the unknown policy
    line: int  # first record with this sequence
    ids: list  # ids not yet in the store are written
    policy: str = ""  # '' | 'truncated' | 'split:<k>'
    chunks: int = 1
    _sha1: str | None = field(default=None, repr=False, compare=False)

    @property
    def sha1(self) -> str:
        """sha1 of ``seq``, computed when first asked for (when a row is written or checked
        against the store), not while the input is read."""
        h = self._sha1
        if h is None:
            h = self._sha1 = _sha1(self.seq)
        return h


def _sha1(s: str) -> str:
    return hashlib.sha1(s.encode()).hexdigest()


def _read_input(source, alphabet, unknown):
    if isinstance(source, (str, os.PathLike)):
        return read_fasta(source, alphabet=alphabet, unknown=unknown), os.fspath(source)
    return read_records(source, alphabet=alphabet, unknown=unknown), "records"


@dataclass
class _Input:
    """What the job keeps of its input: unique sequences, id -> (sequence index, line), and the
    records in input order (``order``: ids, an id given twice listed twice; ``order_seq``: each
    record's sequence index)."""

    seqs: list
    id_map: dict
    n_records: int
    order: list
    order_seq: list

    def records(self) -> list:
        """(id, sha1 of its sequence) per record, in input order (what the store keeps)."""
        seqs = self.seqs
        return [(i, seqs[k].sha1) for i, k in zip(self.order, self.order_seq)]


def _collect(records, where):
    """Unique sequences (first-seen order), the id -> sequence index map and the record count;
    same id with a different sequence is an error naming both lines."""
    inp = _collect_input(records, where)
    return inp.seqs, inp.id_map, inp.n_records


def _collect_input(records, where) -> _Input:
    """:func:`_collect`, plus the records in input order."""
    by_seq: dict = {}
    seqs: list = []
    id_map: dict = {}  # id -> (seq index, line)
    order: list = []
    order_seq: list = []
    n = 0
    unit = "line" if where != "records" else "record"
    for n, r in enumerate(records, 1):
        k = by_seq.get(r.seq)
        if k is None:
            k = by_seq[r.seq] = len(seqs)
            seqs.append(_Seq(r.seq, r.line, []))
        order.append(r.id)
        order_seq.append(k)
        prev = id_map.get(r.id)
        if prev is not None:
            if prev[0] != k:
                raise FastaError(
                    f"{where}: duplicate id {r.id!r} with different sequences at {unit} {prev[1]} and {unit} {r.line}"
                )
            continue  # the same record again: one row
        id_map[r.id] = (k, r.line)
        seqs[k].ids.append(r.id)
    return _Input(seqs, id_map, n, order, order_seq)


def _chunks(n: int, parts: int):
    base, extra = divmod(n, parts)
    out, start = [], 0
    for i in range(parts):
        size = base + (1 if i < extra else 0)
        out.append((start, start + size))
        start += size
    return out


def _plan(seqs, max_residues, long_policy, max_tokens, where, specials: int = 2, special_names: str = "<cls> and <eos>"):
    """Items (seq index, chunk, residues) sorted by (-length, sequence, chunk), then token-budget
    batches (each item costs its residues plus ``specials`` tokens). ``max_residues`` None: no
    length limit. Returns the list of batches, each a list of items."""
    items = []
    unit = "line" if where != "records" else "record"
    for k, s in enumerate(seqs):
        n = len(s.seq)
        if max_residues is None or n <= max_residues:
            items.append((k, 0, s.seq))
            continue
        if long_policy == "error":
            raise FastaError(
                f"{where}: {unit} {s.line}: sequence {s.ids[0]!r} has {n} residues; the model takes at most "
                f"{max_residues} (its maximum length minus {special_names}). Choose long_policy="
                f"'truncate' or 'split' (--long-policy)"
            )
        if long_policy == "truncate":
            s.policy = "truncated"
            items.append((k, 0, s.seq[:max_residues]))
        else:
            parts = math.ceil(n / max_residues)
            s.policy, s.chunks = f"split:{parts}", parts
            items.extend((k, c, s.seq[a:b]) for c, (a, b) in enumerate(_chunks(n, parts)))
    # The order of one stable sort by (-length, sequence, chunk), in groups of one length (longest
    # first), each sorted by (sequence, chunk): sequences of different lengths are never compared.
    by_len: dict = {}
    for it in items:
        n = len(it[2])
        group = by_len.get(n)
        if group is None:
            by_len[n] = [it]
        else:
            group.append(it)
    batches, cur, used = [], [], 0
    for n in sorted(by_len, reverse=True):
        group = by_len[n]
        if len(group) > 1:
            group.sort(key=_SEQUENCE_CHUNK)
        t = n + specials
        if t > max_tokens:
            raise bad_value("max_tokens", f"at least {t} (the longest sequence plus {special_names})", max_tokens)
        for it in group:
            if cur and used + t > max_tokens:
                batches.append(cur)
                cur, used = [], 0
            cur.append(it)
            used += t
    if cur:
        batches.append(cur)
    return batches


_SEQUENCE_CHUNK = operator.itemgetter(2, 1)  # an item's (residues, chunk)
_SEQ_INDEX, _RESIDUES = operator.itemgetter(0), operator.itemgetter(2)
