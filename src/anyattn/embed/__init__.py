"""``anyattn embed``: FASTA -> protein embeddings, packed, resumable, multi-device.

    from anyattn.embed import embed, open_store
    summary = embed("proteins.fasta", model="facebook/esm2_t33_650M_UR50D", out="emb.sqlite", pooling="mean")
    store = open_store("emb.sqlite")
    store.get("P12345"), store.ids(), len(store), store.metadata

Modules: ``fasta`` (streaming reader, line numbers, input policies), ``store`` (SQLite work store,
safetensors/npz exports, the reader), ``job`` (plan, packed batches, pooling, workers), ``cli``
(the ``anyattn embed`` subcommand). See docs/embed.md.
"""

from .fasta import FastaError, Record, read_fasta
from .job import LONG_POLICIES, POOLINGS, EmbedSummary, embed
from .store import EmbeddingStore, StoreMismatchError, open_store

__all__ = [
    "embed",
    "open_store",
    "EmbedSummary",
    "EmbeddingStore",
    "FastaError",
    "StoreMismatchError",
    "Record",
    "read_fasta",
    "POOLINGS",
    "LONG_POLICIES",
]
