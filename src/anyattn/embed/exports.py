"""Exports of an embedding store, written at the end of a job from the SQLite work store, in
input order: ``.npz`` (one member per id), ``.safetensors`` (one tensor per id, streamed to disk:
memory stays flat) and, when the rows exceed ``shard_size`` bytes, sharded safetensors as
transformers shards weights (``name-00001-of-00003.safetensors`` ... and
``name.safetensors.index.json``, written last: its presence marks a complete export). The layout of
the work store and the crash guarantees: ``store.py``.
"""

from __future__ import annotations

import errno
import glob
import json
import os
import re
import struct
import zipfile

from ..errors import bad_value
from .store import DEFAULT_SHARD_SIZE, EXPORT_FORMATS, SQLiteStore, StoreError, _HEADER_BUDGET, parse_size
from .store import _np

# --------------------------------------------------------------------------------- exports
_ST_DTYPES = {"float16": "F16", "float32": "F32"}


def _index_path(path: str) -> str:
    """``emb.safetensors`` -> ``emb.safetensors.index.json`` (transformers' name)."""
    return path + ".index.json"


def _shard_name(path: str, k: int, n: int) -> str:
    """``emb.safetensors`` -> ``emb-00001-of-00003.safetensors`` (in the same directory)."""
    stem = os.path.basename(path)[: -len(".safetensors")]
    return f"{stem}-{k:05d}-of-{n:05d}.safetensors"


def _shard_glob(path: str) -> list:
    stem = os.path.basename(path)[: -len(".safetensors")]
    pat = os.path.join(
        glob.escape(os.path.dirname(os.path.abspath(path))), glob.escape(stem) + "-[0-9]*-of-[0-9]*.safetensors"
    )
    rx = re.compile(re.escape(stem) + r"-\d{5}-of-\d{5}\.safetensors")
    return [f for f in glob.glob(pat) if rx.fullmatch(os.path.basename(f))]


def remove_stale(path: str) -> None:
    """Temporary files of an export that was killed: ``path.tmp-<pid>``, its index's and its
    shards' (the caller holds the store's lock, so no other export is running)."""
    d = os.path.dirname(os.path.abspath(path))
    base = os.path.basename(path)
    rx = re.compile(re.escape(base) + r"(\.index\.json)?\.tmp-\d+")
    if base.endswith(".safetensors"):
        stem = re.escape(base[: -len(".safetensors")])
        rx = re.compile(rf"(?:{rx.pattern})|{stem}-\d{{5}}-of-\d{{5}}\.safetensors\.tmp-\d+")
    for f in os.listdir(d):
        if rx.fullmatch(f):
            _remove(os.path.join(d, f))


def export(work: SQLiteStore, path: str, shard_size=None) -> None:
    """Write ``work``'s rows to ``path`` (.safetensors or .npz) atomically and in input order:
    temporary files in the same directory, then ``os.replace``. ``.safetensors`` is streamed
    (one row in memory at a time) and sharded when the rows exceed ``shard_size`` bytes (default
    2 GiB) or one header would grow past 50 MB: shards ``name-0000k-of-0000n.safetensors`` and,
    renamed last, ``name.safetensors.index.json``. A failed write (a full disk) leaves ``path`` as
    it was and the work store complete: it is a :class:`StoreError` saying so."""
    path = os.fspath(path)
    meta = dict(work.metadata)
    tmps = []
    try:
        if path.endswith(".safetensors"):
            _export_safetensors(
                work, path, meta, parse_size(shard_size) if shard_size is not None else DEFAULT_SHARD_SIZE, tmps
            )
        elif path.endswith(".npz"):
            tmp = f"{path}.tmp-{os.getpid()}"
            tmps.append(tmp)
            meta["records"] = json.dumps(work.records())
            _save_npz(tmp, work.items(), meta)
            os.replace(tmp, path)
        else:
            raise bad_value("out", f"a path ending in .sqlite/.db or one of {EXPORT_FORMATS}", path)
    except OSError as e:
        raise StoreError(
            f"out: {path!r}: writing the export failed: {e.strerror or e}"
            + (" (the disk is full: free space)" if e.errno == errno.ENOSPC else "")
            + f"; every row is in the work store {work.path!r}: run the same command again to export"
        ) from None
    finally:
        for tmp in tmps:
            if os.path.exists(tmp):
                os.remove(tmp)


def _export_safetensors(work: SQLiteStore, path: str, meta: dict, shard_size: int, tmps: list) -> None:
    entries = work.entries()  # (id, dtype, shape, nbytes) in input order
    records = work.records()
    shards, cur, size, head = [], [], 0, 0
    for e in entries:
        h = len(json.dumps(e[0])) + len(json.dumps(e[2])) + 64  # this tensor's share of the header
        if cur and (size + e[3] > shard_size or head + h > _HEADER_BUDGET):
            shards.append(cur)
            cur, size, head = [], 0, 0
        cur.append(e)
        size += e[3]
        head += h
    if cur or not shards:
        shards.append(cur)
    records_json = json.dumps(records)
    single = len(shards) == 1 and head + len(records_json) < _HEADER_BUDGET
    blobs = work.blobs()
    if single:
        tmp = f"{path}.tmp-{os.getpid()}"
        tmps.append(tmp)
        _write_safetensors(tmp, shards[0], {**meta, "records": records_json}, blobs)
        os.replace(tmp, path)
        _remove(_index_path(path), *_shard_glob(path))  # a sharded export of an earlier run
        return
    n = len(shards)
    names, weight_map = [], {}
    d = os.path.dirname(os.path.abspath(path))
    for k, shard in enumerate(shards, 1):
        name = _shard_name(path, k, n)
        tmp = os.path.join(d, f"{name}.tmp-{os.getpid()}")
        tmps.append(tmp)
        _write_safetensors(tmp, shard, {**meta, "shard": f"{k}/{n}"}, blobs)
        os.replace(tmp, os.path.join(d, name))
        names.append(name)
        weight_map.update((e[0], name) for e in shard)
    index = {
        "metadata": {**meta, "total_size": sum(e[3] for e in entries), "shards": n},
        "weight_map": weight_map,
        "records": records,
    }
    tmp = f"{_index_path(path)}.tmp-{os.getpid()}"
    tmps.append(tmp)
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(index, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, _index_path(path))  # the export is complete from here on
    _remove(path, *(f for f in _shard_glob(path) if os.path.basename(f) not in names))


def _remove(*files) -> None:
    for f in files:
        try:
            os.remove(f)
        except FileNotFoundError:
            pass


def _write_safetensors(path: str, entries: list, meta: dict, blobs) -> None:
    """A safetensors file written row by row: an 8-byte little-endian header length, the JSON
    header (tensor names, dtypes, shapes, byte offsets; metadata strings), padded with spaces to
    8 bytes, then each tensor's bytes. ``blobs`` yields the rows' bytes in ``entries`` order."""
    header: dict = {"__metadata__": {k: str(v) for k, v in meta.items()}}
    off = 0
    for i, dt, shape, nb in entries:
        if i == "__metadata__":  # the job refuses it before any work; never write an unreadable header
            raise bad_value("ids", "no sequence id named '__metadata__' (reserved in .safetensors)", "that id")
        header[i] = {"dtype": _ST_DTYPES[dt], "shape": list(shape), "data_offsets": [off, off + nb]}
        off += nb
    h = json.dumps(header, separators=(",", ":")).encode("utf-8")
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for i, _, _, nb in entries:
            blob = next(blobs)
            if len(blob) != nb:  # pragma: no cover - the store changed under the export
                raise StoreError(f"out: {path!r}: row {i!r} changed while it was exported")
            f.write(blob)
        f.flush()
        os.fsync(f.fileno())


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
