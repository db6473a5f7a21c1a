"""Embedding stores: the SQLite work store (resumable), safetensors/npz exports, one reader.

SQLite schema (``FORMAT = "anyattn.embed/1"``)::

    meta(key TEXT PRIMARY KEY, value TEXT)            format, model identity, pooling, layers,
                                                      dtypes, policies, anyattn version
    embeddings(id TEXT PRIMARY KEY,                   the FASTA id
               seq_sha1 TEXT NOT NULL,                sha1 of the embedded sequence (after policies)
               length INTEGER NOT NULL,               residues of that sequence
               policy TEXT NOT NULL,                  '' | 'truncated' | 'split:<chunks>'
               dtype TEXT NOT NULL,                   'float16' | 'float32'
               shape TEXT NOT NULL,                   JSON list, e.g. [1280] or [412, 1280]
               data BLOB NOT NULL)                    C-order little-endian array bytes

Crash safety: WAL journal, one transaction per batch (``put_many``), plain ``INSERT`` on the
primary key (a second row for an id is an error, never a silent replace). A process killed at
any moment (SIGKILL included) leaves the store at the last committed batch; SQLite rolls the
unfinished transaction back on the next open. ``synchronous=NORMAL`` keeps that guarantee for
process crashes (an OS crash or power loss may lose the last batches, never corrupt the file).

The metadata is written in the transaction that creates the tables and checked on every open for
writing: a store of another model, pooling, layers, dtype or policy is refused, naming each key
that differs.

One writer: a job holds an exclusive lock (``flock`` on ``<store>.lock``, released by the kernel
when the process dies, even by SIGKILL) from before it reads what is stored until it is done; a
second job on the same store stops at once with :class:`StoreBusyError` instead of computing
rows it could not write. Readers take no lock. A failed write (a full disk, an I/O error) is a
:class:`StoreError` naming the store and SQLite's reason; the rows committed before it stay.
Paths are handed to SQLite as quoted ``file:`` URIs (a ``#``, ``?`` or ``%`` in a path is part of
the file name, and ``:memory:`` is a file, never an in-memory database).
"""

from __future__ import annotations

import errno
import json
import os
import socket
import sqlite3
import time
import urllib.parse
import warnings
import zipfile
from collections.abc import Iterator, Mapping

from ..errors import AnyAttnError, bad_value

__all__ = ["FORMAT", "StoreMismatchError", "StoreError", "StoreBusyError", "SQLiteStore", "open_store", "export", "EXPORT_FORMATS"]

FORMAT = "anyattn.embed/1"
EXPORT_FORMATS = (".safetensors", ".npz")
_SQLITE_MAGIC = b"SQLite format 3\x00"
# meta keys that must be equal for two runs to share a store; the rest (model_source,
# anyattn_version, created) are recorded for the reader only
IDENTITY_KEYS = (
    "format", "model_type", "model_config_sha1", "model_weights_sha1", "pooling", "layers", "dtype", "store_dtype",
    "long_policy", "unknown", "max_residues",
)  # fmt: skip


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
    """The work store. ``SQLiteStore(path, meta)`` opens for writing (creating it, or checking
    ``meta`` against the stored metadata); ``SQLiteStore(path)`` opens read-only."""

    def __init__(self, path, meta: dict | None = None):
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
                self.con.executemany("INSERT INTO meta VALUES (?, ?)", [(k, str(v)) for k, v in meta.items()])
                stored = {k: str(v) for k, v in meta.items()}
            else:
                check_meta(stored, meta, self.path)
                if self.con.execute("SELECT name FROM sqlite_master WHERE type='table' AND name='embeddings'").fetchone() is None:
                    raise StoreMismatchError(f"out: {self.path!r} has anyattn metadata but no embeddings table (damaged); move it away")
            self.con.execute("COMMIT")
        except BaseException as e:
            self._rollback()
            self.con.close()
            if isinstance(e, sqlite3.Error):
                raise _sqlite_failure(e, self.path, "creating the store") from None
            raise
        self.metadata = stored

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
    def get(self, id: str):
        row = self.con.execute("SELECT dtype, shape, data FROM embeddings WHERE id = ?", (id,)).fetchone()
        if row is None:
            raise KeyError(id)
        return _array(row[2], row[0], json.loads(row[1]))

    def ids(self) -> list:
        return [r[0] for r in self.con.execute("SELECT id FROM embeddings ORDER BY rowid")]

    def items(self) -> Iterator:
        for i, dt, shape, blob in self.con.execute("SELECT id, dtype, shape, data FROM embeddings ORDER BY rowid"):
            yield i, _array(blob, dt, json.loads(shape))

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


def check_meta(stored: dict, wanted: dict, path: str) -> None:
    diffs = [
        f"{k}: store has {stored.get(k)!r}, this run {str(wanted.get(k))!r}"
        for k in IDENTITY_KEYS
        if stored.get(k) != (None if wanted.get(k) is None else str(wanted.get(k)))
    ]
    if diffs:
        raise StoreMismatchError(
            f"out: {path!r} holds embeddings made with different settings; refusing to mix them "
            f"(use another --out, or the same settings): " + "; ".join(diffs)
        )


# --------------------------------------------------------------------------------- exports
def export(work: SQLiteStore, path: str) -> None:
    """Write ``work``'s rows to ``path`` (.safetensors or .npz) atomically: a temporary file in
    the same directory, then ``os.replace``. Every array is read into memory first (these
    formats are meant for small sets). A failed write (a full disk) leaves ``path`` as it was and
    the work store complete: it is a :class:`StoreError` saying so."""
    path = os.fspath(path)
    tmp = f"{path}.tmp-{os.getpid()}"
    meta = dict(work.metadata)
    try:
        if path.endswith(".safetensors"):
            try:
                from safetensors.numpy import save_file
            except ImportError as e:
                raise ImportError("anyattn embed --out *.safetensors needs safetensors: pip install 'anyattn[embed]'") from e
            save_file({i: _np().ascontiguousarray(a) for i, a in work.items()}, tmp, metadata=meta)
        elif path.endswith(".npz"):
            _save_npz(tmp, work.items(), meta)
        else:
            raise bad_value("out", f"a path ending in .sqlite/.db or one of {EXPORT_FORMATS}", path)
        os.replace(tmp, path)
    except OSError as e:
        raise StoreError(
            f"out: {path!r}: writing the export failed: {e.strerror or e}"
            + (" (the disk is full: free space)" if e.errno == errno.ENOSPC else "")
            + f"; every row is in the work store {work.path!r}: run the same command again to export"
        ) from None
    except Exception as e:  # safetensors reports a full disk as its own error type
        if "No space left" in str(e):
            raise StoreError(
                f"out: {path!r}: writing the export failed: no space left on the device; every row is in the work "
                f"store {work.path!r}: free space, then run the same command again to export"
            ) from None
        raise
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _save_npz(path: str, items, meta: dict) -> None:
    """An uncompressed .npz (what ``np.savez`` writes, read by ``np.load``) with one member per id.
    Written member by member: ``np.savez(f, **arrays)`` takes ids as keyword arguments, so ids such
    as ``file`` or ``allow_pickle`` collide with its parameters."""
    np = _np()
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED, allowZip64=True) as z:
        with z.open("__anyattn_metadata__.npy", "w", force_zip64=True) as f:
            np.lib.format.write_array(f, np.array(json.dumps(meta)), allow_pickle=False)
        for i, a in items:
            if i == "__anyattn_metadata__":
                raise bad_value("ids", "no sequence id named '__anyattn_metadata__' (reserved in .npz)", "that id")
            with z.open(f"{i}.npy", "w", force_zip64=True) as f:
                np.lib.format.write_array(f, np.ascontiguousarray(a), allow_pickle=False)


class _MemoryStore:
    """Reader over a safetensors or npz export (loaded whole: these are the small-set formats)."""

    def __init__(self, path: str, arrays: dict, metadata: dict):
        self.path, self._arrays, self.metadata = path, arrays, metadata

    def get(self, id: str):
        return self._arrays[id]

    def ids(self) -> list:
        return list(self._arrays)

    def items(self):
        return iter(self._arrays.items())

    def __len__(self) -> int:
        return len(self._arrays)

    def close(self) -> None:
        pass


class EmbeddingStore(Mapping):
    """Read access to any store: ``get(id)`` / ``store[id]`` -> numpy array, ``ids()``,
    ``len(store)``, ``iter(store)`` (ids, in write order), ``items()``, ``metadata`` (dict)."""

    def __init__(self, backend):
        self._b = backend
        self.path = backend.path
        self.metadata = dict(backend.metadata)

    def get(self, id: str, default=None):
        try:
            return self._b.get(id)
        except KeyError:
            return default

    def __getitem__(self, id: str):
        return self._b.get(id)

    def ids(self) -> list:
        return self._b.ids()

    def items(self):
        return self._b.items()

    def __iter__(self):
        return iter(self._b.ids())

    def __len__(self) -> int:
        return len(self._b)

    def close(self) -> None:
        self._b.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self) -> str:
        m = self.metadata
        return f"EmbeddingStore({self.path!r}, {len(self)} rows, pooling={m.get('pooling')}, layers={m.get('layers')}, store_dtype={m.get('store_dtype')})"


def open_store(path) -> EmbeddingStore:
    """Open an embedding store written by ``anyattn embed`` (SQLite, safetensors or npz; the
    format is read from the file's first bytes) for reading. A file that is none of these, or
    that is damaged, is a :class:`StoreMismatchError` naming it."""
    if not isinstance(path, (str, os.PathLike)):
        raise bad_value("path", "a store path (str or os.PathLike)", type(path).__name__)
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"open_store: no such file {path!r}")
    if os.path.isdir(path):
        raise bad_value("path", "an embedding store file (SQLite, .safetensors or .npz)", f"the directory {path!r}")
    with open(path, "rb") as f:
        head = f.read(16)
    if head == _SQLITE_MAGIC:
        return EmbeddingStore(SQLiteStore(path))
    if head[:4] == b"PK\x03\x04":
        return EmbeddingStore(_open_npz(path))
    if len(head) >= 9 and head[8:9] == b"{":  # safetensors: an 8-byte header length, then JSON
        return EmbeddingStore(_open_safetensors(path))
    what = "an empty file" if not head else f"first bytes {head[:8]!r}"
    raise StoreMismatchError(
        f"{path}: not an anyattn embedding store (expected an SQLite, .safetensors or .npz file written by anyattn embed, got {what})"
    )


def _open_npz(path: str) -> _MemoryStore:
    np = _np()
    try:
        with np.load(path, allow_pickle=False) as z:
            if "__anyattn_metadata__" not in z.files:
                raise StoreMismatchError(f"{path}: an .npz without anyattn metadata (not written by anyattn embed)")
            meta = json.loads(str(z["__anyattn_metadata__"]))
            arrays = {k: z[k] for k in z.files if k != "__anyattn_metadata__"}
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as e:
        if isinstance(e, StoreMismatchError):
            raise
        raise StoreMismatchError(f"{path}: a damaged or truncated .npz ({type(e).__name__}: {e})") from None
    return _MemoryStore(path, arrays, meta)


def _open_safetensors(path: str) -> _MemoryStore:
    try:
        from safetensors import safe_open
    except ImportError as e:
        raise ImportError("open_store: reading a .safetensors store needs safetensors: pip install 'anyattn[embed]'") from e
    try:
        with safe_open(path, framework="numpy") as f:
            meta = f.metadata() or {}
            if meta.get("format") != FORMAT:
                raise StoreMismatchError(f"{path}: not an anyattn embedding store (format {meta.get('format')!r})")
            arrays = {k: f.get_tensor(k) for k in f.keys()}
    except StoreMismatchError:
        raise
    except Exception as e:  # noqa: BLE001 - safetensors' errors (SafetensorError, OSError): name the file
        raise StoreMismatchError(f"{path}: a damaged or truncated .safetensors file ({type(e).__name__}: {e})") from None
    return _MemoryStore(path, arrays, meta)
