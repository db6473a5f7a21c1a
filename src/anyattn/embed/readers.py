"""Reading embeddings: one reader (:func:`open_store`) for the SQLite work store, npz, single and
sharded safetensors exports; rows in input order (see ``store.py`` for the formats).
"""

from __future__ import annotations

import json
import os
import zipfile
from collections.abc import Mapping
from typing import NamedTuple

from ..errors import bad_value
from .exports import _index_path
from .store import READ_FORMATS, SQLiteStore, StoreMismatchError
from .store import _SQLITE_MAGIC, _np


class _MemoryStore:
    """Reader over an npz export (loaded whole: the small-set format)."""

    def __init__(self, path: str, arrays: dict, metadata: dict, records=None):
        self.path, self._arrays, self.metadata = path, arrays, metadata
        self._records = records

    def get(self, id: str):
        return self._arrays[id]

    def ids(self) -> list:
        return list(self._arrays)

    def records(self) -> list:
        return list(self._records) if self._records is not None else self.ids()

    def items(self):
        return iter(self._arrays.items())

    def __len__(self) -> int:
        return len(self._arrays)

    def close(self) -> None:
        pass


class _SafetensorsStore:
    """Reader over a safetensors export, one file or shards with their index. Lazy: a row is read
    from its file when asked for (memory-mapped by safetensors), so sets larger than memory open
    at once."""

    def __init__(self, path: str, files: dict, order: list, records: list, metadata: dict):
        self.path, self.metadata = path, metadata
        self._files, self._order, self._records = files, order, records  # id -> file, ids, records
        self._handles: dict = {}

    def _handle(self, file: str):
        f = self._handles.get(file)
        if f is None:
            from safetensors import safe_open

            try:
                f = self._handles[file] = safe_open(file, framework="numpy")
            except Exception as e:  # noqa: BLE001 - safetensors' errors: name the shard
                raise StoreMismatchError(
                    f"{file}: a damaged or truncated .safetensors shard ({type(e).__name__}: {e})"
                ) from None
        return f

    def get(self, id: str):
        file = self._files[id]  # KeyError for an unknown id
        return self._handle(file).get_tensor(id)

    def ids(self) -> list:
        return list(self._order)

    def records(self) -> list:
        return list(self._records)

    def items(self):
        for i in self._order:
            yield i, self.get(i)

    def __len__(self) -> int:
        return len(self._order)

    def close(self) -> None:
        self._handles.clear()


class Column(NamedTuple):
    """Which columns of a pooled row (flattened: ``row.reshape(-1)``) come from which layer
    (hidden-state index) and pooler."""

    layer: int
    pooler: str
    start: int
    stop: int


class EmbeddingStore(Mapping):
    """Read access to any store: ``get(id)`` / ``store[id]`` -> numpy array, ``ids()`` (input
    order, each id once), ``records()`` (one id per input record, duplicates repeated),
    ``stack()`` (the rows of ``records()`` as one array), ``len(store)``, ``iter(store)``,
    ``items()``, ``metadata`` (dict), ``layout`` and ``columns`` (what the columns hold)."""

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

    def records(self) -> list:
        """One id per input record in input order (an id given twice appears twice); ids not
        stored (a job still running) are left out."""
        return self._b.records()

    def stack(self, ids=None):
        """The rows of ``ids`` (default: :meth:`records`, input order with duplicates) stacked into
        one array (N, ...). Per-residue rows have different lengths: iterate instead."""
        np = _np()
        ids = self.records() if ids is None else list(ids)
        if not ids:
            raise bad_value("ids", "at least one stored id", "none")
        rows = [self._b.get(i) for i in ids]
        shapes = {r.shape for r in rows}
        if len(shapes) > 1:
            raise bad_value(
                "stack", "rows of one shape (pooled embeddings)",
                f"{len(shapes)} shapes, e.g. {sorted(shapes)[:2]} (per-residue rows: iterate items() or get(id))",
            )  # fmt: skip
        return np.stack(rows)

    @property
    def layout(self) -> dict:
        """What a row holds: ``axes`` (e.g. ``["layer", "column"]``), ``layers`` (hidden-state
        indices), ``poolers``, ``hidden_size``, ``columns``; {} for stores before anyattn.embed/2."""
        raw = self.metadata.get("layout")
        return json.loads(raw) if raw else {}

    @property
    def columns(self) -> list:
        """:class:`Column` s of a flattened pooled row ([] for per-residue stores)."""
        return [Column(**c) for c in self.layout.get("columns", [])]

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
        try:
            rows = f"{len(self)} rows"
        except Exception:  # noqa: BLE001 - a closed store still has a repr
            rows = "closed"
        return f"EmbeddingStore({self.path!r}, {rows}, pooling={m.get('pooling')}, layers={m.get('layers')}, store_dtype={m.get('store_dtype')})"


def open_store(path) -> EmbeddingStore:
    """Open an embedding store written by ``anyattn embed`` for reading: SQLite, ``.npz``,
    ``.safetensors``, or sharded safetensors (``name.safetensors.index.json``, or
    ``name.safetensors`` when only its index and shards exist); the format is read from the
    file's first bytes. A file that is none of these, or that is damaged, is a
    :class:`StoreMismatchError` naming it."""
    if not isinstance(path, (str, os.PathLike)):
        raise bad_value("path", "a store path (str or os.PathLike)", type(path).__name__)
    path = os.fspath(path)
    if not os.path.exists(path) and path.endswith(".safetensors") and os.path.isfile(_index_path(path)):
        path = _index_path(path)
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
    if path.endswith(".index.json") and head.lstrip()[:1] == b"{":
        return EmbeddingStore(_open_index(path))
    what = "an empty file" if not head else f"first bytes {head[:8]!r}"
    raise StoreMismatchError(
        f"{path}: not an anyattn embedding store (expected an SQLite, .safetensors or .npz file written by anyattn embed, got {what})"
    )


def _records_of(meta: dict, ids: list) -> list:
    raw = meta.pop("records", None)
    if raw is None:
        return list(ids)
    return json.loads(raw) if isinstance(raw, str) else list(raw)


def _open_npz(path: str) -> _MemoryStore:
    """Members read by their exact names (``<id>.npy``): numpy's ``NpzFile["x.npy"]`` returns the
    member of id ``x`` when one exists, so ids ``x`` and ``x.npy`` would read the same row."""
    np = _np()
    try:
        with zipfile.ZipFile(path) as z:
            names = [n for n in z.namelist() if n.endswith(".npy")]
            if "__anyattn_metadata__.npy" not in names:
                raise StoreMismatchError(f"{path}: an .npz without anyattn metadata (not written by anyattn embed)")
            arrays = {}
            for n in names:
                with z.open(n) as f:
                    arrays[n[: -len(".npy")]] = np.lib.format.read_array(f, allow_pickle=False)
            meta = json.loads(str(arrays.pop("__anyattn_metadata__")))
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as e:
        if isinstance(e, StoreMismatchError):
            raise
        raise StoreMismatchError(f"{path}: a damaged or truncated .npz ({type(e).__name__}: {e})") from None
    records = _records_of(meta, list(arrays))
    return _MemoryStore(path, arrays, meta, records)


def _open_safetensors(path: str) -> _SafetensorsStore:
    try:
        from safetensors import safe_open
    except ImportError as e:
        raise ImportError(
            "open_store: reading a .safetensors store needs safetensors: pip install 'anyattn[embed]'"
        ) from e
    try:
        f = safe_open(path, framework="numpy")
        meta = dict(f.metadata() or {})
        keys = list(f.keys())
    except Exception as e:  # noqa: BLE001 - safetensors' errors (SafetensorError, OSError): name the file
        raise StoreMismatchError(
            f"{path}: a damaged or truncated .safetensors file ({type(e).__name__}: {e})"
        ) from None
    if meta.get("format") not in READ_FORMATS:
        raise StoreMismatchError(f"{path}: not an anyattn embedding store (format {meta.get('format')!r})")
    if "shard" in meta:
        raise StoreMismatchError(
            f"{path}: one shard ({meta['shard']}) of a sharded export: open its .safetensors.index.json"
        )
    records = _records_of(meta, keys)
    have = set(keys)
    order = [r for r in dict.fromkeys(records) if r in have]
    seen = set(order)
    order += [k for k in keys if k not in seen]
    st = _SafetensorsStore(path, dict.fromkeys(keys, path), order, records, meta)
    st._handles[path] = f
    return st


def _open_index(path: str) -> _SafetensorsStore:
    try:
        with open(path, encoding="utf-8") as fh:
            index = json.load(fh)
        meta = dict(index["metadata"])
        weight_map = dict(index["weight_map"])
        records = list(index.get("records") or weight_map)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise StoreMismatchError(f"{path}: a damaged safetensors index ({type(e).__name__}: {e})") from None
    if meta.get("format") not in READ_FORMATS:
        raise StoreMismatchError(
            f"{path}: not the index of an anyattn embedding export (format {meta.get('format')!r})"
        )
    d = os.path.dirname(os.path.abspath(path))
    missing = sorted({f for f in weight_map.values() if not os.path.isfile(os.path.join(d, f))})
    if missing:
        raise StoreMismatchError(f"{path}: shard file(s) {missing[:3]} of this index are missing")
    meta = {k: str(v) for k, v in meta.items()}
    files = {i: os.path.join(d, f) for i, f in weight_map.items()}
    order = [r for r in dict.fromkeys(records) if r in files]
    seen = set(order)
    order += [k for k in weight_map if k not in seen]
    return _SafetensorsStore(path, files, order, records, meta)
