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
"""

from __future__ import annotations

import json
import os
import sqlite3
import zipfile
from collections.abc import Iterator, Mapping

from ..errors import AnyAttnError, bad_value

__all__ = ["FORMAT", "StoreMismatchError", "SQLiteStore", "open_store", "export", "EXPORT_FORMATS"]

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
    """The output store holds embeddings of another model, pooling, dtype or policy."""


def _np():
    try:
        import numpy as np
    except ImportError as e:  # pragma: no cover - numpy ships with every torch wheel we support
        raise ImportError("anyattn.embed needs numpy to read and write embeddings: pip install numpy") from e
    return np


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
            uri = "file:" + os.path.abspath(self.path) + "?mode=ro"
            self.con = sqlite3.connect(uri, uri=True, check_same_thread=False)
            self.metadata = self._read_meta()
            if self.metadata is None:
                raise StoreMismatchError(f"{self.path}: not an anyattn embedding store (no metadata table)")
            return
        exists = os.path.exists(self.path) and os.path.getsize(self.path) > 0
        if exists:
            with open(self.path, "rb") as f:
                if f.read(16) != _SQLITE_MAGIC:
                    raise StoreMismatchError(f"out: {self.path!r} exists and is not an SQLite store; refusing to overwrite it")
        # isolation_level=None: transactions are explicit (BEGIN IMMEDIATE ... COMMIT)
        self.con = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=60)
        self.con.execute("PRAGMA journal_mode=WAL")
        self.con.execute("PRAGMA synchronous=NORMAL")
        self.con.execute("BEGIN IMMEDIATE")
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
            self.con.execute("COMMIT")
        except BaseException:
            self.con.execute("ROLLBACK")
            self.con.close()
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
        """One transaction: rows of (id, seq_sha1, length, policy, array). All or nothing."""
        data = [(i, h, int(n), p, str(a.dtype), json.dumps(list(a.shape)), _le_bytes(a)) for i, h, n, p, a in rows]
        self.con.execute("BEGIN IMMEDIATE")
        try:
            self.con.executemany("INSERT INTO embeddings VALUES (?, ?, ?, ?, ?, ?, ?)", data)
            self.con.execute("COMMIT")
        except BaseException:
            self.con.execute("ROLLBACK")
            raise

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
    formats are meant for small sets)."""
    path = os.fspath(path)
    tmp = f"{path}.tmp-{os.getpid()}"
    meta = dict(work.metadata)
    try:
        if path.endswith(".safetensors"):
            try:
                from safetensors.numpy import save_file
            except ImportError as e:
                raise ImportError("anyattn embed --out *.safetensors needs safetensors: pip install safetensors") from e
            save_file({i: _np().ascontiguousarray(a) for i, a in work.items()}, tmp, metadata=meta)
        elif path.endswith(".npz"):
            np = _np()
            arrays = dict(work.items())
            if "__anyattn_metadata__" in arrays:
                raise bad_value("ids", "no sequence id named '__anyattn_metadata__' (reserved in .npz)", "that id")
            with open(tmp, "wb") as f:  # a file object: np.savez would append .npz to a name
                np.savez(f, __anyattn_metadata__=np.array(json.dumps(meta)), **arrays)
        else:
            raise bad_value("out", f"a path ending in .sqlite/.db or one of {EXPORT_FORMATS}", path)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


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
    format is read from the file's first bytes) for reading."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"open_store: no such file {path!r}")
    with open(path, "rb") as f:
        head = f.read(16)
    if head == _SQLITE_MAGIC:
        return EmbeddingStore(SQLiteStore(path))
    if head[:4] == b"PK\x03\x04" and zipfile.is_zipfile(path):
        np = _np()
        with np.load(path, allow_pickle=False) as z:
            if "__anyattn_metadata__" not in z.files:
                raise StoreMismatchError(f"{path}: an .npz without anyattn metadata (not written by anyattn embed)")
            meta = json.loads(str(z["__anyattn_metadata__"]))
            arrays = {k: z[k] for k in z.files if k != "__anyattn_metadata__"}
        return EmbeddingStore(_MemoryStore(path, arrays, meta))
    try:
        from safetensors import safe_open
    except ImportError as e:
        raise ImportError("open_store: reading a .safetensors store needs safetensors: pip install safetensors") from e
    with safe_open(path, framework="numpy") as f:
        meta = f.metadata() or {}
        if meta.get("format") != FORMAT:
            raise StoreMismatchError(f"{path}: not an anyattn embedding store (format {meta.get('format')!r})")
        arrays = {k: f.get_tensor(k) for k in f.keys()}
    return EmbeddingStore(_MemoryStore(path, arrays, meta))
