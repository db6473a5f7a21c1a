"""Streaming FASTA reader with line numbers and the input policies of ``anyattn embed``.

    >id1 optional description          header: the id is the first whitespace-separated word
    MKTAYIAKQR                         sequence lines are concatenated, whitespace removed,
    QISFVKSHFS                         ASCII lower case upper-cased (a-z only: no other character
    >id2                               is case-folded, so 'ß' never becomes 'SS')
    ...

Errors (all :class:`FastaError`, a ``ValueError``) name the source and the 1-based line number:
a file that cannot be read, is empty, binary, compressed other than with gzip, not UTF-8 in an id
or a sequence (the first bad byte, with its line and column; a header's description is not read), a truncated or corrupt gzip stream, text before the
first header, a header without an id, a record without residues, a character outside the
alphabet (``unknown="error"``; ``unknown="x"`` maps it to ``X`` instead; undecodable bytes and
control characters are errors under either policy). Duplicate ids are checked by the job (it
needs both line numbers and the sequences).

The file is UTF-8 (a leading byte-order mark is skipped); gzip-compressed files are recognized by
their first bytes, whatever their name. Records from Python (``(id, seq)`` pairs or a mapping) go
through the same checks, with "record N" in place of a line number; a list of bare sequence
strings gets ids "0", "1", ... (positions).
"""

from __future__ import annotations

import gzip
import io
import os
import re
import unicodedata
import zlib
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


# ASCII: the characters str.split() removes, and the upper-case map (bytes.translate tables)
_ASCII_SPACE = bytes(i for i in range(128) if chr(i).isspace())
_ASCII_UPPER = bytes(ord(chr(i).upper()) if i < 128 else i for i in range(256))
# str.translate: a-z -> A-Z and nothing else (str.upper() maps 'ß' to 'SS', 'ﬁ' to 'FI', 'ı' to
# 'I': other proteins, or other lengths, that would pass the alphabet check)
_ASCII_UPPER_STR = {c: c - 32 for c in range(ord("a"), ord("z") + 1)}
# bytes that are not UTF-8 decode (errors="surrogateescape") to U+DC80..U+DCFF; with the control
# characters other than whitespace, what is never a residue (not even with unknown="x")
_FATAL = re.compile("[\\x00-\\x08\\x0e-\\x1b\\x7f-\\x84\\x86-\\x9f\\udc80-\\udcff]")


def _upper(seq: str) -> str:
    return seq.translate(_ASCII_UPPER_STR)


def _never_mapped(c: str) -> str | None:
    """Why ``c`` is an error even with ``unknown="x"`` (None when ``x`` may map it): a byte that is
    not UTF-8, or a control character, means the input is not a FASTA text file."""
    if "\udc80" <= c <= "\udcff":
        return f"byte 0x{ord(c) - 0xDC00:02X} is not UTF-8 text (is the file latin-1, UTF-16 or binary? convert it to UTF-8)"
    if unicodedata.category(c) == "Cc" and not c.isspace():
        return f"control character {c!r} (binary data, not FASTA text)"
    return None


class _Checker:
    """The alphabet policy of one reader: ``clean(seq, where)`` upper-cases ``seq`` and applies
    ``unknown`` to the characters not in ``alphabet`` (``check`` the same on an upper-cased
    ``seq``). The test runs at C speed (``translate`` deleting the allowed characters: what is
    left are the bad ones, in order); the characters are only searched when a bad one exists.
    ``where(i) -> str`` locates character i for the error message."""

    def __init__(self, alphabet, unknown: str):
        self.alphabet, self.unknown = alphabet, unknown
        if alphabet is not None and unknown == "x" and "X" not in alphabet:
            raise bad_value("unknown", "'error' for this model: its tokenizer has no X token to map other characters to", "'x'")
        if alphabet is not None:
            # ``c in alphabet`` for one character c: the alphabet's one-character strings
            ok = {c for c in alphabet if isinstance(c, str) and len(c) == 1}
            self.delete_str = dict.fromkeys(map(ord, ok))  # str.translate: allowed -> deleted
            self.delete_ascii = "".join(sorted(c for c in ok if c.isascii())).encode("ascii")

    def clean(self, seq: str, where) -> str:
        return self.check(_upper(seq), where)

    def check(self, seq: str, where, data: bytes | None = None) -> str:
        """``seq`` upper-cased; ``data``: ``seq`` encoded as ASCII when the caller has it."""
        if self.alphabet is None:
            m = _FATAL.search(seq)
            if m is not None:
                raise FastaError(f"{where(m.start())}: {_never_mapped(m.group())}")
            return seq
        if data is None and seq.isascii():
            data = seq.encode("ascii")
        if data is not None:  # bytes.translate with delete: the fastest test
            bad = data.translate(None, self.delete_ascii).decode("ascii")
        else:
            bad = seq.translate(self.delete_str)
        if not bad:
            return seq
        fatal = [c for c in dict.fromkeys(bad) if _never_mapped(c)]
        if fatal:
            i = min(seq.index(c) for c in fatal)
            raise FastaError(f"{where(i)}: {_never_mapped(seq[i])}")
        if self.unknown == "x":
            return seq.translate(dict.fromkeys(map(ord, set(bad)), "X"))
        i = seq.index(bad[0])  # the first bad character (an earlier copy of it would be bad too)
        loc = where(i)
        allowed = "".join(sorted(self.alphabet))
        raise FastaError(
            f"{loc}: character {seq[i]!r} is not in the model's alphabet ({allowed}); "
            f"{len(bad)} such character(s) in this record. Use unknown='x' (--unknown x) to map them to X"
        )


# first bytes of formats that are not (gzip-compressed) text
_OTHER_FORMATS = (
    (b"BZh", "bzip2-compressed"), (b"\xfd7zXZ\x00", "xz-compressed"), (b"\x28\xb5\x2f\xfd", "zstd-compressed"),
    (b"PK\x03\x04", "a zip archive"), (b"\xff\xfe", "UTF-16 text"), (b"\xfe\xff", "UTF-16 text"),
)  # fmt: skip
_GZIP_MAGIC = b"\x1f\x8b"


def _open_text(name: str) -> io.TextIOBase:
    """``name`` as UTF-8 text (a BOM skipped; bytes that are not UTF-8 kept as surrogates, reported
    with their line by the reader), through gzip when its first bytes say so."""
    try:
        f = open(name, "rb")  # noqa: SIM115 - closed by the text wrapper
    except OSError as e:
        raise FastaError(f"{name}: cannot read the input file ({e.strerror or e})") from None
    try:
        head = f.peek(6)[:6] if hasattr(f, "peek") else b""
        for magic, what in _OTHER_FORMATS:
            if head.startswith(magic):
                raise FastaError(f"{name}: the file is {what}, not a FASTA text file (plain or gzip-compressed UTF-8)")
        raw = gzip.GzipFile(fileobj=f, mode="rb") if head.startswith(_GZIP_MAGIC) else f
        text = io.TextIOWrapper(raw, encoding="utf-8-sig", errors="surrogateescape", newline=None)
    except BaseException:
        f.close()
        raise
    return text


def _stream_error(name: str, line: int, e: BaseException) -> FastaError:
    """A FastaError for a read that failed after line ``line``: a truncated or corrupt gzip
    stream, an I/O error."""
    if isinstance(e, EOFError):
        what = "the gzip data ends early (a truncated or partly downloaded file?)"
    elif isinstance(e, (gzip.BadGzipFile, zlib.error)):
        what = f"corrupt gzip data ({e})"
    else:
        what = f"read error ({getattr(e, 'strerror', None) or e})"
    return FastaError(f"{name}: {f'after line {line}: ' if line else ''}{what}")


# a line starting with one of these is a sequence line (not a header, a comment or indented)
_SEQ_START = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")


def _residues(text: str) -> tuple[str, bytes | None]:
    """``text`` without whitespace (newlines included), upper-cased, and the same as ASCII bytes
    (None unless ``text`` is ASCII)."""
    if text.isascii():  # one C pass: whitespace deleted, lower case mapped to upper
        data = text.encode("ascii").translate(_ASCII_UPPER, _ASCII_SPACE)
        return data.decode("ascii"), data
    return _upper("".join(text.split())), None


def _fatal_in(text: str, name: str, line: int, what: str) -> None:
    """Refuse a line holding bytes that are not UTF-8 or control characters, naming its column."""
    m = _FATAL.search(text)
    if m is not None:
        raise FastaError(f"{name}:{line}: column {m.start() + 1} ({what}): {_never_mapped(m.group())}")


def read_fasta(path, *, alphabet=None, unknown: str = "error") -> Iterator[Record]:
    """Yield :class:`Record` s from a FASTA file, streaming (one record in memory at a time)."""
    _check_unknown(unknown)
    if not isinstance(path, (str, os.PathLike)):
        raise bad_type("path", "a FASTA file path (str or os.PathLike)", type(path).__name__)
    name = os.fspath(path)
    check = _Checker(alphabet, unknown).check
    with _open_text(name) as f:
        # lines: every line after the header, one entry per line (line hline + 1 + index): the raw
        # line of sequence and blank lines, "" for a comment line. The residues are the
        # concatenation without whitespace; the per-line offsets are only computed for an error.
        rid, hline, lines = None, 0, []

        def locate(i):  # called by check() from finish(): rid, hline and lines are the record's
            spans, offset = [], 0  # (start offset, line) of each sequence line
            for k, raw in enumerate(lines):
                chunk = "".join(raw.split())
                if chunk:
                    spans.append((offset, hline + 1 + k))
                    offset += len(chunk)
            line, start = spans[0][1], 0
            for s, ln in spans:
                if s > i:
                    break
                start, line = s, ln
            return f"{name}:{line}: column {i - start + 1} (record {rid!r})"

        def finish():
            seq, data = _residues("".join(lines))
            if not seq:
                raise FastaError(f"{name}:{hline}: record {rid!r} has no sequence (empty record)")
            return Record(rid, check(seq, locate, data), hline)

        lineno = 0
        try:
            for raw in f:  # up to the first header
                lineno += 1
                text = raw.strip()
                if text.startswith(">"):
                    break
                _fatal_in(raw, name, lineno, "before the first '>' header")
                if text and not text.startswith(";"):  # ';': an old-style FASTA comment line
                    raise FastaError(f"{name}:{lineno}: sequence data before the first '>' header (is this a FASTA file?)")
            else:
                if lineno == 0:
                    raise FastaError(f"{name}: the file is empty (no FASTA records)")
                raise FastaError(f"{name}: no '>' header in {lineno} line(s) (not a FASTA file)")
            while True:  # text: the header on line lineno, stripped
                words = text[1:].split(None, 1)  # the id and the rest
                if not words:
                    raise FastaError(f"{name}:{lineno}: header without an id ('>' must be followed by the sequence id)")
                # the id must be text; the description is never used (a latin-1 'é' there is harmless)
                _fatal_in(">" + words[0], name, lineno, "the id in the header")
                rid, hline, lines = words[0], lineno, []
                append = lines.append
                for raw in f:  # line hline + 1 + len(lines)
                    if raw[0] in _SEQ_START:  # the common case: a sequence line
                        append(raw)
                        continue
                    text = raw.strip()
                    if text.startswith(">"):
                        break
                    append("" if text.startswith(";") else raw)
                else:
                    yield finish()
                    return
                lineno = hline + 1 + len(lines)
                yield finish()
        except (EOFError, OSError, zlib.error) as e:  # a truncated / corrupt gzip stream, an I/O error
            raise _stream_error(name, hline + len(lines) if rid is not None else lineno, e) from None


def read_records(records, *, alphabet=None, unknown: str = "error") -> Iterator[Record]:
    """Python records: a mapping id -> sequence, an iterable of ``(id, sequence)`` pairs, or an
    iterable of sequence strings (ids ``"0"``, ``"1"``, ...: their 0-based positions)."""
    _check_unknown(unknown)
    if isinstance(records, Mapping):
        items: Iterable = records.items()
    elif isinstance(records, Iterable) and not isinstance(records, (str, bytes)):
        items = records
    else:
        raise bad_type("records", "a FASTA path, a mapping id -> sequence or an iterable of (id, sequence)", type(records).__name__)
    clean = _Checker(alphabet, unknown).clean
    n = 0
    bare = None  # sequences without ids (True) or (id, sequence) pairs (False), as the first record
    for n, item in enumerate(items, 1):
        if bare is None:
            bare = isinstance(item, str)
        if bare:
            if not isinstance(item, str):
                raise FastaError(f"record {n}: expected a sequence string like record 1 (ids are positions), got {item!r:.80}")
            item = (str(n - 1), item)
        elif not (isinstance(item, (tuple, list)) and len(item) == 2):
            raise FastaError(f"record {n}: expected an (id, sequence) pair, got {item!r:.80}")
        rid, seq = item
        if not isinstance(rid, str) or not rid or rid != rid.strip() or any(c.isspace() for c in rid):
            raise FastaError(f"record {n}: the id must be a non-empty string without whitespace, got {rid!r:.80}")
        if _FATAL.search(rid):
            raise FastaError(f"record {n}: the id must be text without control characters or undecodable bytes, got {rid!r:.80}")
        if not isinstance(seq, str):
            raise FastaError(f"record {n} ({rid!r}): the sequence must be a str, got {type(seq).__name__}")
        seq = "".join(seq.split())
        if not seq:
            raise FastaError(f"record {n} ({rid!r}): empty sequence")
        yield Record(rid, clean(seq, lambda i: f"record {n} ({rid!r}): position {i + 1}"), n)
    if n == 0:
        raise FastaError("records: no records (empty input)")
