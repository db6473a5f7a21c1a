"""``anyattn embed``: FASTA -> protein embeddings, packed, resumable, multi-device.

    from anyattn.embed import embed, open_store
    summary = embed("proteins.fasta", model="facebook/esm2_t33_650M_UR50D", out="emb.sqlite", pooling="mean")
    store = open_store("emb.sqlite")
    store.get("P12345"), store.ids(), len(store), store.metadata

Modules: ``fasta`` (streaming reader, line numbers, input policies), ``store`` (SQLite work store,
its one-writer lock, safetensors/npz exports, the reader), ``plan`` (records -> unique sequences ->
token-budget batches), ``model`` (loading, the model's identity), ``run`` (packed batches and
pooling on a device, the writer thread, worker processes), ``job`` (``embed``: ties them
together), ``cli`` (the ``anyattn embed`` subcommand). See docs/embed.md.
"""

from .fasta import FastaError, Record, read_fasta
from .job import LONG_POLICIES, POOLINGS, EmbedSummary, embed
from .run import EmbedError
from .store import EmbeddingStore, StoreBusyError, StoreError, StoreMismatchError, open_store

__all__ = [
    "embed",
    "open_store",
    "EmbedSummary",
    "EmbeddingStore",
    "FastaError",
    "StoreMismatchError",
    "StoreError",
    "StoreBusyError",
    "EmbedError",
    "Record",
    "read_fasta",
    "POOLINGS",
    "LONG_POLICIES",
]
