"""Embedding stores: the SQLite work store (resumable). Its exports (safetensors, npz, shards): ``exports.py``; the one reader: ``readers.py``.

SQLite schema (``FORMAT = "anyattn.embed/2"``)::

    meta(key TEXT PRIMARY KEY, value TEXT)            format, model identity, input identity,
                                                      input format, pooling, layers, dtypes,
                                                      policies, layout, anyattn version
    inputs(pos INTEGER PRIMARY KEY, id TEXT)          the input's records in order (one row per
                                                      record: an id given twice is listed twice)
    embeddings(id TEXT PRIMARY KEY,                   the FASTA id
               seq_sha1 TEXT NOT NULL,                sha1 of the embedded sequence (after policies)
               length INTEGER NOT NULL,               residues of that sequence
               policy TEXT NOT NULL,                  '' | 'truncated' | 'split:<chunks>'
               dtype TEXT NOT NULL,                   'float16' | 'float32'
               shape TEXT NOT NULL,                   JSON list, e.g. [1280] or [412, 1280]
               data BLOB NOT NULL)                    C-order little-endian array bytes

Rows are written in batch order (length-sorted); readers return them in input order
(``ids()``: each id once, at its first record; ``records()``: one per input record, duplicates
repeated; ``stack()``: the rows of ``records()`` as one array).

Crash safety: WAL journal, one transaction per batch (``put_many``), plain ``INSERT`` on the
primary key (a second row for an id is an error, never a silent replace). A process killed at
any moment (SIGKILL included) leaves the store at the last committed batch; SQLite rolls the
unfinished transaction back on the next open. ``synchronous=NORMAL`` keeps that guarantee for
process crashes (an OS crash or power loss may lose the last batches, never corrupt the file).

The metadata and the input order are written in the transaction that creates the tables; the
metadata is checked on every open for writing: a store of another model, input, tokenizer,
pooling, layers, dtype or policy is refused, naming each key that differs.

One writer: a job holds an exclusive lock (``flock`` on ``<store>.lock``, released by the kernel
when the process dies, even by SIGKILL) from before it reads what is stored until it is done; a
second job on the same store stops at once with :class:`StoreBusyError` instead of computing
rows it could not write. Readers take no lock. A failed write (a full disk, an I/O error) is a
:class:`StoreError` naming the store and SQLite's reason; the rows committed before it stay.
Paths are handed to SQLite as quoted ``file:`` URIs (a ``#``, ``?`` or ``%`` in a path is part of
the file name, and ``:memory:`` is a file, never an in-memory database).

Exports (:func:`export`), written at the end of a job from the work store, in input order:
``.npz`` (one member per id), ``.safetensors`` (one tensor per id, streamed to disk: memory stays
flat) and, when the rows exceed ``shard_size`` bytes, sharded safetensors as transformers shards
weights: ``name-00001-of-00003.safetensors`` ... and ``name.safetensors.index.json`` (``metadata``,
``weight_map`` id -> shard file, ``records`` the input order), written last: its presence marks a
complete export.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import socket
import sqlite3
import time
import urllib.parse
import warnings
from collections.abc import Iterator

from ..errors import AnyAttnError, bad_value

__all__ = [
    "FORMAT", "READ_FORMATS", "EXPORT_FORMATS", "DEFAULT_SHARD_SIZE", "IDENTITY_KEYS", "StoreMismatchError", "StoreError",
    "StoreBusyError", "SQLiteStore", "check_meta", "check_out_path", "input_identity", "parse_size",
]  # fmt: skip
# exports (npz, safetensors, shards): exports.py; the one reader (open_store): readers.py

FORMAT = "anyattn.embed/2"
READ_FORMATS = ("anyattn.embed/1", FORMAT)  # /1: no input order, no layout (read in write order)
EXPORT_FORMATS = (".safetensors", ".npz")
DEFAULT_SHARD_SIZE = 2 * 1024**3  # bytes of tensor data per safetensors shard
# a safetensors header must stay under 100 MB (the reader's limit): shards also split on it
_HEADER_BUDGET = 50 * 1024**2
_SQLITE_MAGIC = b"SQLite format 3\x00"
# meta keys that must be equal for two runs to share a store; the rest (model_source,
# anyattn_version, created) are recorded for the reader only
IDENTITY_KEYS = (
    "format", "model_type", "model_config_sha1", "model_weights_sha1", "model_weights_all_sha1", "input_format", "tokenizer_sha1",
    "input_records", "input_sha1", "pooling", "layers", "dtype", "store_dtype", "long_policy", "unknown",
    "max_residues",
)  # fmt: skip
_INPUT_KEYS = ("input_records", "input_sha1")
# identity keys added after format /2 was first written: a store without them resumes on the rest
_ADDED_KEYS = ("model_weights_all_sha1",)


class StoreMismatchError(AnyAttnError, ValueError):
    """The output store holds embeddings of another model, pooling, dtype or policy, or the file
    is not an anyattn embedding store."""


class StoreError(AnyAttnError, RuntimeError):
    """A store could not be written or read: a full disk, an I/O error, a file that changed under
    the job. The message names the store and the reason; committed rows stay."""


class StoreBusyError(StoreError):
    """Another job is writing the same store."""


def _np():
    try:
        import numpy as np
    except ImportError as e:  # torch wheels do not depend on numpy
        raise ImportError("anyattn.embed needs numpy to read and write embeddings: pip install 'anyattn[embed]'") from e
    return np


def _uri(path: str, **params) -> str:
    """A ``file:`` URI SQLite reads as exactly ``path`` (absolute, every special character
    quoted: unquoted, ``a#b.sqlite`` opens ``a`` and ``x?y`` creates ``x``)."""
    q = urllib.parse.quote(os.path.abspath(path), safe="/")
    return f"file:{q}" + ("?" + urllib.parse.urlencode(params) if params else "")


def _connect(uri: str, **kw) -> sqlite3.Connection:
    """The one place connections are made (tests wrap it, e.g. to limit the database size)."""
    return sqlite3.connect(uri, uri=True, check_same_thread=False, **kw)


def _sqlite_failure(e: sqlite3.Error, path: str, doing: str) -> StoreError:
    """SQLite's error as a StoreError naming the store, what was being done and SQLite's reason."""
    name = getattr(e, "sqlite_errorname", "") or ""
    msg = str(e)
    if name == "SQLITE_FULL" or "disk is full" in msg:
        hint = "the disk (or the database size limit) is full: free space, then run the same command again to resume"
    elif name.startswith("SQLITE_IOERR") or "disk I/O error" in msg:
        hint = "an I/O error (a failing disk, a network file system, a file removed under the job): run the same command again to resume"
    elif name.startswith(("SQLITE_READONLY", "SQLITE_CANTOPEN", "SQLITE_PERM")) or "readonly" in msg or "unable to open" in msg:
        hint = "the store or its directory is not writable"
    elif name.startswith(("SQLITE_CORRUPT", "SQLITE_NOTADB")) or "malformed" in msg:
        hint = "the file is damaged: move it away and start again (or write to another --out)"
    elif name.startswith("SQLITE_BUSY") or "locked" in msg:
        hint = "another process holds the database (two jobs on one store?)"
    else:
        hint = "see SQLite's message"
    return StoreError(f"out: {path!r}: {doing} failed: {msg} ({hint})")


class _JobLock:
    """The one-writer lock of a store: an exclusive, non-blocking ``flock`` on ``<path>.lock``,
    holding the holder's pid and host. The kernel drops it when the process exits (SIGKILL too);
    ``release`` removes the file. A file system without locks gives a warning, not a refusal
    (the store's primary key still refuses a second row for an id, naming it)."""

    def __init__(self, path: str):
        self.store, self.path, self.fd = path, path + ".lock", None
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as e:
                raise _os_failure(e, path, "creating its lock file") from None
            try:
                _lock_fd(fd)
            except BlockingIOError:
                holder = _read_fd(fd)
                os.close(fd)
                raise StoreBusyError(
                    f"out: {path!r} is being written by another job ({holder or 'holder unknown'}); wait for it to "
                    f"finish or write to another --out (a lock left by a dead process does not count: {self.path!r} "
                    "is only a name)"
                ) from None
            except OSError as e:  # ENOLCK, EOPNOTSUPP, ...: a file system without locks
                os.close(fd)
                warnings.warn(f"anyattn.embed: cannot lock {self.path!r} ({e.strerror or e}); make sure no other job writes this store", stacklevel=3)
                return
            try:  # the previous holder may have removed the file between our open and flock
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        self.fd = fd
        info = f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}".encode()
        os.ftruncate(fd, 0)
        os.write(fd, info)

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            os.unlink(self.path)
        except OSError:
            pass
        os.close(self.fd)
        self.fd = None


def _lock_fd(fd: int) -> None:
    """Exclusive, non-blocking; BlockingIOError when another process holds it."""
    try:
        import fcntl
    except ImportError:  # Windows
        import msvcrt

        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        except OSError as e:
            raise BlockingIOError(str(e)) from None
        return
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)


def _read_fd(fd: int) -> str:
    try:
        return os.pread(fd, 200, 0).decode("utf-8", "replace").strip() if hasattr(os, "pread") else ""
    except OSError:
        return ""


def _os_failure(e: OSError, path: str, doing: str) -> StoreError:
    hint = " (the disk is full: free space, then run the same command again)" if e.errno == errno.ENOSPC else ""
    return StoreError(f"out: {path!r}: {doing} failed: {e.strerror or e}{hint}")


def check_out_path(path: str, name: str = "out") -> None:
    """Refuse an output path that cannot be a store file: a directory, or one whose directory does
    not exist."""
    if os.path.isdir(path):
        raise bad_value(name, "a store file path (*.sqlite, *.safetensors or *.npz)", f"the directory {path!r}")
    if path.endswith((os.sep, "/")) or not os.path.basename(path):  # SQLite would open the name without the '/'
        raise bad_value(name, "a store file path (*.sqlite, *.safetensors or *.npz)", f"{path!r}, a directory name")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise bad_value(name, "a path in an existing directory", f"{path!r} (no directory {parent!r})")


def _array(blob: bytes, dtype: str, shape):
    np = _np()
    return np.frombuffer(blob, dtype=np.dtype(dtype).newbyteorder("<")).reshape(shape)


class SQLiteStore:
    """The work store. ``SQLiteStore(path, meta, inputs)`` opens for writing: it creates the store
    with the metadata and the input's records ``inputs`` ((id, sha1 of its sequence) per record,
    in order), or checks ``meta`` against the stored metadata and ``inputs`` against the stored
    records. ``append=True`` adds the records of ids the store has not seen at the end of its
    records (another input may extend a store; an id with another sequence is refused always).
    ``SQLiteStore(path)`` opens read-only."""

    def __init__(self, path, meta: dict | None = None, inputs=None, *, append: bool = False):
        self.path = os.fspath(path)
        self.writable = meta is not None
        if not self.writable:
            if not os.path.exists(self.path):
                raise FileNotFoundError(f"open_store: no such store {self.path!r}")
            self.con = _connect(_uri(self.path, mode="ro"))
            try:
                self.metadata = self._read_meta()
            except sqlite3.DatabaseError as e:
                self.con.close()
                raise StoreMismatchError(f"{self.path}: not a readable SQLite store ({e})") from None
            if self.metadata is None:
                self.con.close()
                raise StoreMismatchError(f"{self.path}: not an anyattn embedding store (no metadata table)")
            self._ordered = None
            return
        check_out_path(self.path)
        exists = os.path.exists(self.path) and os.path.getsize(self.path) > 0
        if exists:
            with open(self.path, "rb") as f:
                if f.read(16) != _SQLITE_MAGIC:
                    raise StoreMismatchError(f"out: {self.path!r} exists and is not an SQLite store; refusing to overwrite it")
        # isolation_level=None: transactions are explicit (BEGIN IMMEDIATE ... COMMIT)
        try:
            self.con = _connect(_uri(self.path), isolation_level=None, timeout=60)
        except sqlite3.Error as e:
            raise _sqlite_failure(e, self.path, "opening the store") from None
        try:
            self.con.execute("PRAGMA journal_mode=WAL")
            self.con.execute("PRAGMA synchronous=NORMAL")
            self.con.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as e:
            self.con.close()
            raise _sqlite_failure(e, self.path, "opening the store") from None
        try:
            stored = self._read_meta()
            if stored is None:
                self.con.execute("CREATE TABLE meta(key TEXT PRIMARY KEY, value TEXT NOT NULL)")
                self.con.execute(
                    "CREATE TABLE embeddings(id TEXT PRIMARY KEY, seq_sha1 TEXT NOT NULL, length INTEGER NOT NULL, "
                    "policy TEXT NOT NULL, dtype TEXT NOT NULL, shape TEXT NOT NULL, data BLOB NOT NULL)"
                )
                self.con.execute("CREATE TABLE inputs(pos INTEGER PRIMARY KEY, id TEXT NOT NULL, seq_sha1 TEXT NOT NULL)")
                self.con.execute("CREATE INDEX inputs_id ON inputs(id)")
                if inputs is not None:
                    self.con.executemany("INSERT INTO inputs VALUES (?, ?, ?)", ((p, i, h) for p, (i, h) in enumerate(inputs)))
                    meta = {**meta, **input_identity(inputs)}
                self.con.executemany("INSERT INTO meta VALUES (?, ?)", [(k, str(v)) for k, v in meta.items()])
                stored = {k: str(v) for k, v in meta.items()}
            else:
                check_meta(stored, meta, self.path, skip=_INPUT_KEYS)
                if self.con.execute("SELECT name FROM sqlite_master WHERE type='table' AND name='embeddings'").fetchone() is None:
                    raise StoreMismatchError(f"out: {self.path!r} has anyattn metadata but no embeddings table (damaged); move it away")
                if inputs is not None:
                    stored = self._check_inputs(stored, inputs, append)
            self.con.execute("COMMIT")
        except BaseException as e:
            self._rollback()
            self.con.close()
            if isinstance(e, sqlite3.Error):
                raise _sqlite_failure(e, self.path, "creating the store") from None
            raise
        self.metadata = stored
        self._ordered = None

    def _check_inputs(self, stored: dict, inputs, append: bool) -> dict:
        """Inside the opening transaction: this run's records against the stored ones. The same
        records: nothing to do. An id whose sequence differs: refused. Other records (added,
        missing, reordered): refused, or with ``append`` the new ids' records are added at the
        end and the input identity updated. Returns the metadata."""
        want = input_identity(inputs)
        if all(stored.get(k) == str(v) for k, v in want.items()):
            return stored
        have = self.con.execute("SELECT id, seq_sha1 FROM inputs ORDER BY pos").fetchall()
        known = dict(have)
        if not known:  # rows written without their input (a store of an older anyattn is refused by format)
            known = dict(self.con.execute("SELECT id, seq_sha1 FROM embeddings"))
        for i, h in inputs:
            if known.get(i, h) != h:
                raise StoreMismatchError(
                    f"out: {self.path!r} holds id {i!r} with another sequence than this input's; refusing to mix "
                    "inputs (use another --out)"
                )
        new = [(i, h) for i, h in inputs if i not in known]
        if not append:
            ids = {i for i, _ in inputs}
            missing = sum(1 for i in known if i not in ids)
            raise StoreMismatchError(
                f"out: {self.path!r} was made from another input: it has {stored.get('input_records')} record(s) "
                f"(sha1 {str(stored.get('input_sha1'))[:12]}), this input {want['input_records']} (sha1 "
                f"{want['input_sha1'][:12]}): {len({i for i, _ in new})} id(s) not in the store"
                + (f" (e.g. {new[0][0]!r})" if new else "") + f", {missing} of the store's not in this input"
                + (", or the same ids in another order" if not new and not missing else "")
                + "; to add new records to this store use append=True (--append), else another --out"
            )
        if new:
            start = len(have)
            self.con.executemany("INSERT INTO inputs VALUES (?, ?, ?)", ((start + p, i, h) for p, (i, h) in enumerate(new)))
        combined = have + new if have else list(inputs)
        ident = input_identity(combined)
        self.con.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)", [(k, str(v)) for k, v in ident.items()])
        return {**stored, **{k: str(v) for k, v in ident.items()}}

    def input_records(self) -> list:
        """(id, sha1 of its sequence) of every record, in input order."""
        return self.con.execute("SELECT id, seq_sha1 FROM inputs ORDER BY pos").fetchall()

    def _read_meta(self) -> dict | None:
        row = self.con.execute("SELECT name FROM sqlite_master WHERE type='table' AND name='meta'").fetchone()
        if row is None:
            return None
        return dict(self.con.execute("SELECT key, value FROM meta").fetchall())

    # ----------------------------------------------------------------- writing
    def done(self) -> dict:
        """id -> seq_sha1 of every stored row (what a resumed job skips)."""
        return dict(self.con.execute("SELECT id, seq_sha1 FROM embeddings"))

    def put_many(self, rows) -> None:
        """One transaction: rows of (id, seq_sha1, length, policy, array). All or nothing; a
        failure is a :class:`StoreError` naming the store and SQLite's reason."""
        data = [(i, h, int(n), p, str(a.dtype), json.dumps(list(a.shape)), _le_bytes(a)) for i, h, n, p, a in rows]
        try:
            self.con.execute("BEGIN IMMEDIATE")
            self.con.executemany("INSERT INTO embeddings VALUES (?, ?, ?, ?, ?, ?, ?)", data)
            self.con.execute("COMMIT")
        except BaseException as e:
            self._rollback()
            if isinstance(e, sqlite3.IntegrityError):
                have = {r[0] for r in data} & set(self.done())
                raise StoreError(
                    f"out: {self.path!r}: id(s) {sorted(have)[:3]} already stored: another process wrote to this store "
                    "while this job ran (two jobs on one store?); nothing of this batch was written, run the same "
                    "command again to resume"
                ) from None
            if isinstance(e, sqlite3.Error):
                raise _sqlite_failure(e, self.path, f"writing {len(data)} row(s)") from None
            raise

    def _rollback(self) -> None:
        """Roll back the open transaction, if SQLite has not already (it does on SQLITE_FULL and
        some I/O errors; a ROLLBACK then fails with "cannot rollback" and would hide the cause)."""
        if self.con.in_transaction:
            try:
                self.con.execute("ROLLBACK")
            except sqlite3.Error:  # the original error is the one to report
                pass

    # ----------------------------------------------------------------- reading
    def _has_inputs(self) -> bool:
        if self._ordered is None:
            row = self.con.execute("SELECT name FROM sqlite_master WHERE type='table' AND name='inputs'").fetchone()
            self._ordered = row is not None and self.con.execute("SELECT 1 FROM inputs LIMIT 1").fetchone() is not None
        return self._ordered

    # stored rows in input order (each id at its first record), rows not in the input last
    _ORDER = (
        "FROM embeddings e LEFT JOIN (SELECT id, MIN(pos) AS p FROM inputs GROUP BY id) i ON i.id = e.id "
        "ORDER BY i.p IS NULL, i.p, e.rowid"
    )

    def get(self, id: str):
        row = self.con.execute("SELECT dtype, shape, data FROM embeddings WHERE id = ?", (id,)).fetchone()
        if row is None:
            raise KeyError(id)
        return _array(row[2], row[0], json.loads(row[1]))

    def ids(self) -> list:
        """Stored ids in input order (write order for a store without an input order)."""
        if not self._has_inputs():
            return [r[0] for r in self.con.execute("SELECT id FROM embeddings ORDER BY rowid")]
        return [r[0] for r in self.con.execute("SELECT e.id " + self._ORDER)]

    def records(self) -> list:
        """One id per input record, in input order (an id given twice is listed twice); only ids
        that are stored."""
        if not self._has_inputs():
            return self.ids()
        return [r[0] for r in self.con.execute("SELECT i.id FROM inputs i JOIN embeddings e ON e.id = i.id ORDER BY i.pos")]

    def items(self) -> Iterator:
        q = "SELECT id, dtype, shape, data FROM embeddings ORDER BY rowid" if not self._has_inputs() else (
            "SELECT e.id, e.dtype, e.shape, e.data " + self._ORDER)
        for i, dt, shape, blob in self.con.execute(q):
            yield i, _array(blob, dt, json.loads(shape))

    def entries(self) -> list:
        """(id, dtype, shape, nbytes) of every row, in :meth:`ids` order, without the data."""
        q = "SELECT id, dtype, shape, length(data) FROM embeddings ORDER BY rowid" if not self._has_inputs() else (
            "SELECT e.id, e.dtype, e.shape, length(e.data) " + self._ORDER)
        return [(i, dt, json.loads(shape), n) for i, dt, shape, n in self.con.execute(q)]

    def blobs(self) -> Iterator:
        """The raw little-endian bytes of every row, in :meth:`ids` order."""
        q = "SELECT data FROM embeddings ORDER BY rowid" if not self._has_inputs() else "SELECT e.data " + self._ORDER
        for (blob,) in self.con.execute(q):
            yield blob

    def __len__(self) -> int:
        return self.con.execute("SELECT COUNT(*) FROM embeddings").fetchone()[0]

    def close(self) -> None:
        self.con.close()


def _le_bytes(a) -> bytes:
    np = _np()
    a = np.ascontiguousarray(a)
    if a.dtype.byteorder == ">":
        a = a.astype(a.dtype.newbyteorder("<"))
    return a.tobytes()


def input_identity(records) -> dict:
    """``input_records`` and ``input_sha1`` (of every record's id and sequence sha1, in order)."""
    h = hashlib.sha1()
    n = 0
    for n, (i, s) in enumerate(records, 1):
        h.update(f"{i}\0{s}\n".encode("utf-8", "surrogateescape"))
    return {"input_records": n, "input_sha1": h.hexdigest()}


def check_meta(stored: dict, wanted: dict, path: str, skip=()) -> None:
    """Refuse to mix runs: every identity key that differs is named, with both values."""
    diffs = []
    for k in IDENTITY_KEYS:
        have, want = stored.get(k), (None if wanted.get(k) is None else str(wanted.get(k)))
        if k in skip or have == want or k == "input_sha1" and "input_records" in [d[0] for d in diffs]:
            continue
        if k in _ADDED_KEYS and k not in stored:  # a store of an earlier version: its other keys decide
            continue
        if k in _INPUT_KEYS:
            diffs.append((k, (
                f"input: the store was made from {stored.get('input_records')} record(s) (sha1 of ids and "
                f"sequences {str(stored.get('input_sha1'))[:12]}), this run has {wanted.get('input_records')} "
                f"(sha1 {str(wanted.get('input_sha1'))[:12]}): another input file, or records added, removed, "
                "reordered or changed"
            )))
        elif k == "format" and have in READ_FORMATS:
            diffs.append((k, f"format: store has {have!r} (written by an older anyattn; open_store still reads it), this run {want!r}"))
        else:
            diffs.append((k, f"{k}: store has {have!r}, this run {want!r}"))
    if diffs:
        raise StoreMismatchError(
            f"out: {path!r} holds embeddings made with different settings; refusing to mix them "
            f"(use another --out, or the same settings): " + "; ".join(d for _, d in diffs)
        )


def parse_size(value, name: str = "shard_size") -> int:
    """Bytes from an int or a string like ``"2GB"``, ``"500MB"``, ``"1.5GiB"``, ``"1000000"``."""
    if isinstance(value, int) and not isinstance(value, bool):
        n = value
    elif isinstance(value, str):
        m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([kKmMgGtT]i?[bB]?|[bB])?\s*", value)
        if m is None:
            raise bad_value(name, "a size such as 2GB, 500MB, 1.5GiB or a number of bytes", repr(value))
        unit = (m.group(2) or "b").lower().rstrip("b")
        mult = {"": 1, "k": 1000, "m": 1000**2, "g": 1000**3, "t": 1000**4, "ki": 1024, "mi": 1024**2, "gi": 1024**3, "ti": 1024**4}[unit]
        n = int(float(m.group(1)) * mult)
    else:
        raise bad_value(name, "a size such as 2GB, 500MB or a number of bytes", repr(value))
    if n < 1:
        raise bad_value(name, "a positive size", repr(value))
    return n
