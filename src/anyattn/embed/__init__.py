"""``anyattn embed``: FASTA -> protein embeddings, packed, resumable, multi-device.

    import anyattn.embed
    summary = anyattn.embed("proteins.fasta", model="facebook/esm2_t33_650M_UR50D", out="emb.sqlite",
                            pooling=["mean", "max"], layers=[-1, -2])    # the module is callable: embed(...)
    store = anyattn.embed.open_store("emb.sqlite")
    store.stack(), store.records(), store.columns, store.get("P12345"), store.metadata

Modules: ``fasta`` (streaming reader, line numbers, input policies), ``formats`` (what one
sequence looks like to each model family), ``pooling`` (the poolers), ``store`` (SQLite work
store, its one-writer lock, safetensors (sharded) / npz exports, the reader), ``plan`` (records ->
unique sequences -> token-budget batches), ``model`` (loading, the model's identity), ``run``
(packed batches and pooling on a device, the writer thread, worker processes), ``job`` (``embed``:
ties them together), ``cli`` (the ``anyattn embed`` subcommand). See docs/embed.md.
"""

import sys as _sys
import types as _types

from .fasta import FastaError, Record, read_fasta
from .formats import InputFormat
from .job import LONG_POLICIES, POOLINGS, EmbedSummary, embed
from .pooling import POOLERS
from .run import EmbedError
from .readers import Column, EmbeddingStore, open_store
from .store import StoreBusyError, StoreError, StoreMismatchError

__all__ = [
    "embed",
    "open_store",
    "EmbedSummary",
    "EmbeddingStore",
    "Column",
    "InputFormat",
    "FastaError",
    "StoreMismatchError",
    "StoreError",
    "StoreBusyError",
    "EmbedError",
    "Record",
    "read_fasta",
    "POOLERS",
    "POOLINGS",
    "LONG_POLICIES",
]


class _CallableModule(_types.ModuleType):
    """``anyattn.embed(...)`` is ``anyattn.embed.embed(...)`` (the module stays a module)."""

    def __call__(self, *args, **kwargs):
        return embed(*args, **kwargs)


_sys.modules[__name__].__class__ = _CallableModule
