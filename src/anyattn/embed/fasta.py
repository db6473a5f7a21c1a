"""Streaming FASTA reader with line numbers and the input policies of ``anyattn embed``.

    >id1 optional description          header: the id is the first whitespace-separated word
    MKTAYIAKQR                         sequence lines are concatenated, whitespace removed,
    QISFVKSHFS                         lower case upper-cased
    >id2
    ...

Errors (all :class:`FastaError`, a ``ValueError``) name the source and the 1-based line number:
text before the first header, a header without an id, a record without residues, a character
outside the alphabet (``unknown="error"``; ``unknown="x"`` maps it to ``X`` instead). Duplicate
ids are checked by the job (it needs both line numbers and the sequences).

``.gz`` files are read through gzip. Records from Python (``(id, seq)`` pairs or a mapping) go
through the same checks, with "record N" in place of a line number.
"""

from __future__ import annotations

import gzip
import io
import os
from collections.abc import Iterable, Iterator, Mapping
from typing import NamedTuple

from ..errors import ArgumentError, bad_type, bad_value

__all__ = ["FastaError", "Record", "read_fasta", "read_records", "UNKNOWN_POLICIES"]

UNKNOWN_POLICIES = ("error", "x")


class FastaError(ArgumentError):
    """Malformed or invalid input; the message names the source and the line (or record) number."""


class Record(NamedTuple):
    id: str
    seq: str  # upper case, alphabet-checked (after the ``unknown`` policy)
    line: int  # 1-based line of the header (FASTA) or 1-based record number (Python records)


def _check_unknown(unknown: str) -> None:
    if unknown not in UNKNOWN_POLICIES:
        raise bad_value("unknown", f"one of {UNKNOWN_POLICIES}", repr(unknown))


def _clean(seq: str, alphabet, unknown: str, where) -> str:
    """Upper-case ``seq`` and apply the alphabet policy. ``where(i) -> str`` locates character i
    for the error message."""
    seq = seq.upper()
    if alphabet is None:
        return seq
    bad = [i for i, c in enumerate(seq) if c not in alphabet]
    if not bad:
        return seq
    if unknown == "x":
        chars = list(seq)
        for i in bad:
            chars[i] = "X"
        return "".join(chars)
    i = bad[0]
    loc = where(i)
    allowed = "".join(sorted(alphabet))
    raise FastaError(
        f"{loc}: character {seq[i]!r} is not in the model's alphabet ({allowed}); "
        f"{len(bad)} such character(s) in this record. Use unknown='x' (--unknown x) to map them to X"
    )


def _open_text(path) -> io.TextIOBase:
    p = os.fspath(path)
    if p.endswith(".gz"):
        return gzip.open(p, "rt", encoding="utf-8", newline=None)
    return open(p, encoding="utf-8", newline=None)


def read_fasta(path, *, alphabet=None, unknown: str = "error") -> Iterator[Record]:
    """Yield :class:`Record` s from a FASTA file, streaming (one record in memory at a time)."""
    _check_unknown(unknown)
    if not isinstance(path, (str, os.PathLike)):
        raise bad_type("path", "a FASTA file path (str or os.PathLike)", type(path).__name__)
    name = os.fspath(path)
    with _open_text(name) as f:
        rid, hline, parts, spans = None, 0, [], []  # spans: (start offset, line) of each sequence line

        def finish():
            if not parts:
                raise FastaError(f"{name}:{hline}: record {rid!r} has no sequence (empty record)")
            seq = "".join(parts)

            def locate(i, spans=spans):
                line, start = spans[0][1], 0
                for s, ln in spans:
                    if s > i:
                        break
                    start, line = s, ln
                return f"{name}:{line}: column {i - start + 1} (record {rid!r})"

            return Record(rid, _clean(seq, alphabet, unknown, locate), hline)

        lineno = 0
        for lineno, raw in enumerate(f, 1):
            text = raw.strip()
            if text.startswith(">"):
                if rid is not None:
                    yield finish()
                words = text[1:].split()
                if not words:
                    raise FastaError(f"{name}:{lineno}: header without an id ('>' must be followed by the sequence id)")
                rid, hline, parts, spans = words[0], lineno, [], []
                continue
            if not text:
                continue
            if text.startswith(";"):  # old-style FASTA comment line
                continue
            if rid is None:
                raise FastaError(f"{name}:{lineno}: sequence data before the first '>' header (is this a FASTA file?)")
            chunk = "".join(text.split())
            spans.append((sum(len(p) for p in parts), lineno))
            parts.append(chunk)
        if rid is not None:
            yield finish()
        elif lineno == 0:
            raise FastaError(f"{name}: the file is empty (no FASTA records)")
        else:
            raise FastaError(f"{name}: no '>' header in {lineno} line(s) (not a FASTA file)")


def read_records(records, *, alphabet=None, unknown: str = "error") -> Iterator[Record]:
    """Python records: a mapping id -> sequence, or an iterable of ``(id, sequence)`` pairs."""
    _check_unknown(unknown)
    if isinstance(records, Mapping):
        items: Iterable = records.items()
    elif isinstance(records, Iterable) and not isinstance(records, (str, bytes)):
        items = records
    else:
        raise bad_type("records", "a FASTA path, a mapping id -> sequence or an iterable of (id, sequence)", type(records).__name__)
    n = 0
    for n, item in enumerate(items, 1):
        if not (isinstance(item, (tuple, list)) and len(item) == 2):
            raise FastaError(f"record {n}: expected an (id, sequence) pair, got {item!r:.80}")
        rid, seq = item
        if not isinstance(rid, str) or not rid or rid != rid.strip() or any(c.isspace() for c in rid):
            raise FastaError(f"record {n}: the id must be a non-empty string without whitespace, got {rid!r:.80}")
        if not isinstance(seq, str):
            raise FastaError(f"record {n} ({rid!r}): the sequence must be a str, got {type(seq).__name__}")
        seq = "".join(seq.split())
        if not seq:
            raise FastaError(f"record {n} ({rid!r}): empty sequence")
        yield Record(rid, _clean(seq, alphabet, unknown, lambda i: f"record {n} ({rid!r}): position {i + 1}"), n)
    if n == 0:
        raise FastaError("records: no records (empty input)")
