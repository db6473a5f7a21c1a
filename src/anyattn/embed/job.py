"""``anyattn.embed.embed``: FASTA -> embeddings, packed, resumable, on one or several devices.

Modules: ``plan`` (records -> batches), ``formats`` (each family's tokens per sequence),
``model`` (loading, identity), ``pooling`` (the poolers), ``run`` (devices, workers, writer),
``store`` (SQLite and exports), ``fasta`` (the reader); this module ties them together.

Shape legend:
    T tokens of a packed batch (prefix residues suffix per sequence, back to back)
    S row length (T, or the bucketed length with ``compile=True``)   D sequences in the batch
    M longest residue count in the batch   L layers asked for   C hidden size   n residues
    P poolers asked for (a pooled row has P*C columns per layer)

One job::

    read + validate records ──> unique sequences (duplicates share one computation)
      ──> long policy (error | truncate | split into near-equal chunks)
      ──> items sorted by (-length, sequence) ──> greedy token-budget batches (max_tokens)
      ──> skip batches whose every id is already in the store (resume)
      ──> packed forward (1, S), SeqInfo.from_lengths ──> pooling on the device
      ──> one SQLite transaction per batch (a writer thread, or the parent of the workers)
      ──> .safetensors (sharded past shard_size) / .npz: exported in input order at the end

The batch plan depends only on the set of unique sequences and ``max_tokens``, never on the input
order or on what an earlier run finished: a resumed run computes the remaining batches exactly as
an uninterrupted run would, so its rows are bitwise equal on the same device and kernels. Readers
return rows in input order (``records()`` repeats an id given twice).

Rows (see :mod:`anyattn.embed.pooling` for the poolers):
    pooled        (P*C,)    or (L, P*C) with ``layers`` a list: the poolers concatenated
    none          (n, C)    or (L, n, C): one vector per residue (without the family's specials)
"""

from __future__ import annotations

import itertools
import json
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch

from .. import __version__
from ..errors import bad_type, bad_value
from ..layout import host_to_device  # noqa: F401 - benchmarks/embed_h2d_probe.py patches job.host_to_device
from .fasta import UNKNOWN_POLICIES, FastaError
from .formats import input_format
from .model import _DTYPES, _cast_in_place, _compile, _config, _load_model, _model_identity
from .plan import _RESIDUES, _SEQ_INDEX, _collect, _collect_input, _plan, _read_input  # noqa: F401 - _collect: benchmarks
from .pooling import POOLERS, columns, parse_pooling
from .run import EmbedError, _Assembler, _batch_tokens, _Progress, _run_local, _run_workers  # noqa: F401 - _batch_tokens: benchmarks
from .exports import _index_path, export, remove_stale
from .readers import open_store
from .store import (
    EXPORT_FORMATS, FORMAT, SQLiteStore, StoreMismatchError, _JobLock, check_meta, check_out_path, input_identity, parse_size,
)  # fmt: skip

__all__ = ["embed", "EmbedSummary", "POOLINGS", "LONG_POLICIES"]

POOLINGS = POOLERS  # kept name: every pooler ("none" = per residue)
LONG_POLICIES = ("error", "truncate", "split")
_STORE_DTYPES = ("float16", "float32")


@dataclass(frozen=True)
class EmbedSummary:
    """What a job did. ``embedded`` rows were written by this run; ``skipped`` ids were already in
    the store; ``computed`` unique sequences ran through the model (rows of duplicate sequences
    share them); rates are per second of ``run_s`` (batches, pooling, writes, export)."""

    out: str
    records: int  # FASTA records read
    ids: int  # distinct ids (= rows of a complete store)
    unique: int  # distinct sequences
    duplicates: int  # records whose sequence equals an earlier record's (computed once)
    embedded: int  # rows written by this run
    skipped: int  # ids already in the store (resume)
    computed: int  # unique sequences run through the model by this run
    truncated: int  # unique sequences cut to the model's maximum (long_policy="truncate")
    split: int  # unique sequences embedded in chunks (long_policy="split")
    tokens: int  # tokens (<cls>/<eos> included) run through the model by this run
    batches: int
    devices: tuple
    parse_s: float
    load_s: float
    run_s: float
    elapsed_s: float
    seq_per_s: float  # computed / run_s
    tok_per_s: float  # tokens / run_s
    # where the run's time went (one device: seconds on the job's thread, and the writer thread's
    # busy time): tokenize, submit (launching a batch), wait (for the device's results), assemble
    # (rows from arrays), queue (blocked on a full write queue), write (SQLite, writer thread)
    phases: dict = field(default_factory=dict, compare=False)

    def __str__(self) -> str:
        rows = [
            ("out", self.out), ("records", self.records), ("ids (rows)", self.ids), ("unique sequences", self.unique),
            ("duplicates", self.duplicates), ("embedded (rows written)", self.embedded),
            ("skipped (already in store)", self.skipped), ("computed sequences", self.computed),
            ("truncated", self.truncated), ("split", self.split), ("tokens", self.tokens), ("batches", self.batches),
            ("devices", ",".join(self.devices)),
            ("elapsed", f"{self.elapsed_s:.2f} s (parse {self.parse_s:.2f}, load {self.load_s:.2f}, run {self.run_s:.2f})"),
            ("throughput", f"{self.seq_per_s:.1f} seq/s, {self.tok_per_s:.0f} tok/s"),
        ]  # fmt: skip
        if self.phases:
            rows.append(("run phases", ", ".join(f"{k} {v:.2f} s" for k, v in self.phases.items())))
        w = max(len(k) for k, _ in rows)
        return "\n".join(f"{k:<{w}}  {v}" for k, v in rows)


def _parse_devices(devices):
    if devices is None:
        return ["cuda" if torch.cuda.is_available() else "cpu"]
    if isinstance(devices, (str, torch.device)):
        devices = [d for d in str(devices).split(",") if d.strip()]
    if not isinstance(devices, (list, tuple)) or not devices:
        raise bad_value("devices", "a device, a comma-separated string or a list of devices", repr(devices))
    out = []
    for d in devices:
        try:
            dev = torch.device(str(d).strip())
        except RuntimeError as e:
            raise bad_value("devices", "device names like 'cuda:0' or 'cpu'", repr(d)) from e
        _check_device(dev, d)
        out.append(str(dev))
    if len(out) > 1:
        real = [d for d in out if d != "cpu"]
        if len(set(real)) != len(real):
            raise bad_value("devices", "distinct GPUs (each device gets one process)", ",".join(out))
    return out


def _check_device(dev: torch.device, given) -> None:
    """Refuse a device this machine does not have, before a model is loaded onto it."""
    if dev.type == "cpu":
        return
    if dev.type == "meta":
        raise bad_value("devices", "real devices ('meta' tensors hold no values)", repr(given))
    mod = getattr(torch, dev.type, None)
    avail = getattr(mod, "is_available", None)
    if avail is None or not avail():
        raise bad_value("devices", f"devices of this machine (torch.{dev.type}.is_available() is False)", repr(given))
    count = getattr(mod, "device_count", None)
    if dev.index is not None and count is not None and dev.index >= count():
        raise bad_value("devices", f"device indices below {count()} ({dev.type} devices here)", repr(given))


def _check_input(source) -> None:
    """A FASTA path must name a readable file: said before a model is loaded or downloaded."""
    if isinstance(source, (str, os.PathLike)):
        name = os.fspath(source)
        if not os.path.exists(name):
            raise FastaError(f"{name}: no such input file")
        if os.path.isdir(name):
            raise FastaError(f"{name}: a directory, expected a FASTA file")
        if not os.access(name, os.R_OK):
            raise FastaError(f"{name}: the input file is not readable (permissions)")
    elif isinstance(source, (bytes, bytearray)) or not isinstance(source, Iterable):
        raise bad_type(
            "fasta_or_records", "a FASTA path, a mapping id -> sequence or an iterable of (id, sequence)", type(source).__name__
        )


# ------------------------------------------------------------------------------ the job
def embed(
    fasta_or_records,
    *,
    model,
    out,
    pooling="mean",
    layers=None,
    dtype: str = "auto",
    store_dtype: str | None = None,
    max_tokens: int = 32768,
    backend: str | None = None,
    devices=None,
    long_policy: str = "error",
    unknown: str = "error",
    compile: bool = False,
    progress: bool = True,
    tokenizer=None,
    shard_size=None,
    append: bool = False,
) -> EmbedSummary:
    """Embed every sequence of a FASTA file (path, ``.gz`` too) or of Python records
    (mapping id -> sequence, ``(id, sequence)`` pairs, or bare sequence strings whose ids are
    their positions ``"0"``, ``"1"``, ...) into the store ``out``. Readers return the rows in
    input order (``open_store(out).records()`` / ``.stack()``: one row per record, duplicates
    repeated).

    Args:
        model: a checkpoint directory or hub id (loaded with ``anyattn.models``: ESM2, DPLM,
            DPLM-2, ESM C / ESM++, E1, ANKH), or a model object (used as is: moved/cast in place
            to the device and ``dtype``). Each family gets its own input format
            (:mod:`anyattn.embed.formats`).
        out: ``*.safetensors`` (sharded past ``shard_size``) or ``*.npz`` (written at the end from
            a SQLite work store ``out + ".work.sqlite"``, removed afterwards); anything else is an
            SQLite store.
        pooling: a pooler, several (a list or ``"mean,max"``: concatenated in that order), or
            "none" (per-residue vectors, without the special tokens). Poolers: mean, max, min,
            norm, median, std, var (over the residues), cls, eos (one special token); see
            :mod:`anyattn.embed.pooling`.
        layers: None (last layer, no layer axis), an int, a list of ints (a layer axis first), or
            "all", indexing the L+1 hidden states (0 = embeddings, L = the last layer; negatives
            count from the end).
        dtype: compute dtype "bf16" | "fp16" | "fp32"; "auto": bf16 on CUDA, fp32 on CPU.
        store_dtype: "float16" | "float32"; default float32 for fp32 compute, else float16.
        max_tokens: token budget of one packed batch (the family's special tokens included).
        backend: anyattn attention backend for every layer (None: the model's / "auto").
        devices: None (CUDA if available, else CPU), "cuda:0,cuda:1", or a list. Several devices
            run one process each (torch.multiprocessing spawn); this process is the only writer.
        long_policy: sequences longer than the model's maximum: "error", "truncate" (keep the
            first residues) or "split" (near-equal chunks, each embedded alone; pooled over all
            the residues, per-residue concatenated; not with pooling cls or eos).
        unknown: characters outside the model's alphabet: "error" or "x" (mapped to X).
        compile: ``compile_layers()`` on the model (ESM2 / DPLM) and pad every batch to
            ``max_tokens`` (one shape, no recompiles).
        progress: a progress bar (tqdm on a terminal) or log lines on stderr.
        tokenizer: None (the model's own), or a tokenizer directory / hub id / transformers
            tokenizer giving one token per residue (ANKH checkpoints without tokenizer files).
        shard_size: bytes of rows per safetensors shard, an int or "2GB", "500MB" (default 2 GiB);
            only for ``*.safetensors`` output.
        append: an existing SQLite store made from another input takes this input's new ids
            (added after its records) instead of refusing it; an id stored with another sequence
            is refused either way.

    Returns an :class:`EmbedSummary`. Re-running the same call after a crash continues where it
    stopped; a store of another model, input (unless ``append``), tokenizer, pooling, layers or
    dtype is refused (:class:`StoreMismatchError`).
    """
    t_start = time.perf_counter()
    poolers = parse_pooling(pooling)
    if long_policy not in LONG_POLICIES:
        raise bad_value("long_policy", f"one of {LONG_POLICIES}", repr(long_policy))
    if unknown not in UNKNOWN_POLICIES:
        raise bad_value("unknown", f"one of {UNKNOWN_POLICIES}", repr(unknown))
    token = [p for p in poolers if p in ("cls", "eos")]
    if long_policy == "split" and token:
        raise bad_value(
            "long_policy", f"'error' or 'truncate' with pooling={token[0]!r} (a split sequence has no single {'start' if token[0] == 'cls' else 'end'} token)", "'split'"
        )  # fmt: skip
    for name, flag in (("append", append), ("compile", compile), ("progress", progress)):
        if not isinstance(flag, bool):
            raise bad_type(name, "a bool", type(flag).__name__)
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 3:
        raise bad_value("max_tokens", "an int >= 3 (tokens per packed batch)", repr(max_tokens))
    if not isinstance(out, (str, os.PathLike)):
        raise bad_type("out", "an output path (str or os.PathLike)", type(out).__name__)
    out = os.fspath(out)
    if shard_size is not None:
        if not out.endswith(".safetensors"):
            raise bad_value("shard_size", "None unless out is a *.safetensors path (only safetensors output is sharded)", repr(shard_size))
        parse_size(shard_size)
    if tokenizer is not None and not isinstance(tokenizer, (str, os.PathLike)) and not hasattr(tokenizer, "convert_ids_to_tokens"):
        raise bad_type("tokenizer", "None, a tokenizer directory / hub id, or a transformers tokenizer", type(tokenizer).__name__)
    _check_layers_arg(layers)
    devs = _parse_devices(devices)
    if isinstance(dtype, torch.dtype) and dtype in _DTYPES.values():  # torch.bfloat16 as well as "bf16"
        dtype = str(dtype).removeprefix("torch.")
    if dtype == "auto":
        dtype = "bf16" if devs[0].startswith("cuda") else "fp32"
    if not isinstance(dtype, str) or dtype not in _DTYPES:
        raise bad_value("dtype", f"'auto' or one of {sorted(_DTYPES)}", repr(dtype))
    tdtype = _DTYPES[dtype]
    dtype = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[tdtype]
    if store_dtype is None:
        store_dtype = "float32" if tdtype == torch.float32 else "float16"
    if store_dtype not in _STORE_DTYPES:
        raise bad_value("store_dtype", f"one of {_STORE_DTYPES}", repr(store_dtype))
    source = model if isinstance(model, (str, os.PathLike)) else None
    if source is None and len(devs) > 1:
        raise bad_value("model", "a checkpoint directory or hub id when devices has several entries (each process loads its own copy)", type(model).__name__)
    _check_input(fasta_or_records)
    export_to = out if out.endswith(EXPORT_FORMATS) else None
    work_path = out + ".work.sqlite" if export_to else out
    check_out_path(out)
    # one writer per store, from before the model loads (a second job stops at once) to the end
    lock = _JobLock(work_path)
    try:
        opts = dict(
            poolers=poolers, layers=layers, dtype=dtype, tdtype=tdtype, store_dtype=store_dtype, max_tokens=max_tokens,
            backend=backend, devs=devs, long_policy=long_policy, unknown=unknown, compile=compile, progress=progress,
            tokenizer=tokenizer, shard_size=shard_size, append=append,
        )  # fmt: skip
        return _embed(fasta_or_records, model, source, out, export_to, work_path, t_start, **opts)
    finally:
        lock.release()


def _check_layers_arg(layers) -> None:
    """The type of ``layers`` (its range needs the model: checked once it is loaded)."""
    ok = layers is None or (isinstance(layers, str) and layers == "all") or _is_int(layers) or (
        isinstance(layers, (list, tuple)) and len(layers) > 0 and all(_is_int(x) for x in layers))
    if not ok:
        raise bad_value("layers", "None, 'all', an int or a non-empty list of ints (hidden-state indices)", repr(layers))


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _resolve_layers(layers, L: int):
    """(hidden-state indices in 0..L, layer axis?) from ``layers``."""
    if isinstance(layers, str):  # "all" (_check_layers_arg refused other strings)
        return list(range(L + 1)), True
    layer_axis = isinstance(layers, (list, tuple))
    raw = list(layers) if layer_axis else [L if layers is None else layers]
    norm = []
    for x in raw:
        if not _is_int(x) or not -(L + 1) <= x <= L:
            raise bad_value("layers", f"None, 'all', an int or a list of ints in [{-(L + 1)}, {L}] (hidden states 0..{L})", repr(layers))
        norm.append(x % (L + 1))
    if len(set(norm)) < len(norm):
        n = next(x for x in norm if norm.count(x) > 1)
        same = " and ".join(str(x) for x, y in zip(raw, norm) if y == n)
        raise bad_value("layers", f"distinct hidden states (of 0..{L}; {same} are all hidden state {n})", repr(layers))
    return norm, layer_axis


def _layout(poolers, layers, layer_axis, hidden) -> dict:
    """What a row holds (stored as metadata ``layout``; ``open_store(...).layout`` / ``.columns``)."""
    if poolers == ("none",):
        axes = ["layer", "residue", "channel"] if layer_axis else ["residue", "channel"]
        return {"axes": axes, "layers": layers, "poolers": list(poolers), "hidden_size": hidden, "columns": []}
    axes = ["layer", "column"] if layer_axis else ["column"]
    return {
        "axes": axes, "layers": layers, "poolers": list(poolers), "hidden_size": hidden,
        "columns": columns(poolers, layers, layer_axis, hidden),
    }  # fmt: skip


def _embed(fasta_or_records, model, source, out, export_to, work_path, t_start, *, poolers, layers, dtype, tdtype,
           store_dtype, max_tokens, backend, devs, long_policy, unknown, compile, progress, tokenizer, shard_size, append):  # fmt: skip
    """:func:`embed` after its arguments are checked, holding the store's lock."""
    # ---- model (in this process: identity, input format, config; workers load their own)
    t0 = time.perf_counter()
    if source is not None:
        m = _load_model(source, backend=backend)
        identity = _model_identity(m)  # float32 CPU weights
    else:
        m = model
        identity = _model_identity(m)
        if backend is not None:
            m.attn_backend = backend
    fmt = input_format(m, source, tokenizer)
    cfg = _config(m)
    L = cfg.num_hidden_layers
    norm_layers, layer_axis = _resolve_layers(layers, L)
    if "cls" in poolers and not fmt.prefix:
        raise bad_value("pooling", f"poolers of tokens this family has: {fmt.describe()} has no start token for 'cls' (use 'eos' or 'mean')", "'cls'")
    if "eos" in poolers and not fmt.suffix:
        raise bad_value("pooling", f"poolers of tokens this family has: {fmt.describe()} has no end token for 'eos'", "'eos'")
    if len(devs) == 1:
        if source is None:  # the caller's object, cast in place: it remembers the weights it came from
            _cast_in_place(m, identity, device=devs[0], dtype=tdtype)
        else:
            m.to(device=devs[0], dtype=tdtype)
        m.eval()
        if compile:
            _compile(m)
    load_s = time.perf_counter() - t0

    # ---- input
    t0 = time.perf_counter()
    records, where = _read_input(fasta_or_records, fmt.alphabet, unknown)
    inp = _collect_input(records, where)
    seqs, id_map, n_records = inp.seqs, inp.id_map, inp.n_records
    if export_to and export_to.endswith(".npz") and "__anyattn_metadata__" in id_map:
        raise FastaError(f"{where}: the id '__anyattn_metadata__' is reserved in .npz stores (write to *.sqlite or *.safetensors)")
    if export_to and export_to.endswith(".safetensors") and "__metadata__" in id_map:
        raise FastaError(f"{where}: the id '__metadata__' is reserved in .safetensors files (write to *.sqlite or *.npz)")
    names = " and ".join(" ".join(x) for x in (fmt.prefix_names, fmt.suffix_names) if x) or "no special tokens"
    batches = _plan(seqs, fmt.max_residues, long_policy, max_tokens, where, fmt.specials, names)
    parse_s = time.perf_counter() - t0

    pooling_name = ",".join(poolers)
    records_in = inp.records()  # (id, sequence sha1) per record, in input order
    meta = {
        "format": FORMAT, **identity, "model_source": str(source) if source is not None else type(m).__name__,
        "input_format": fmt.describe(), "tokenizer_sha1": fmt.sha1(), **input_identity(records_in),
        "pooling": pooling_name, "layers": json.dumps(norm_layers if layer_axis else norm_layers[0]), "dtype": dtype,
        "store_dtype": store_dtype, "long_policy": long_policy, "unknown": unknown, "max_residues": fmt.max_residues,
        "layout": json.dumps(_layout(poolers, norm_layers, layer_axis, int(cfg.hidden_size))),
        "anyattn_version": __version__, "torch_version": torch.__version__,
    }  # fmt: skip

    # ---- the store
    if export_to and (os.path.exists(export_to) or (export_to.endswith(".safetensors") and os.path.exists(_index_path(export_to)))):
        done_store = open_store(export_to)
        try:
            check_meta(done_store.metadata, meta, export_to)
            have = set(done_store.ids())
        finally:
            done_store.close()
        if have != set(id_map):  # append=True too: the work store of a finished export is gone
            raise StoreMismatchError(
                f"out: {export_to!r} exists with {len(have)} ids, this input has {len(id_map)} "
                f"({len(set(id_map) - have)} not in it); remove it or write to another path"
            )
        return _summary(out, n_records, id_map, seqs, 0, len(id_map), 0, 0, 0, devs, parse_s, load_s, 0.0, t_start)
    if export_to:
        remove_stale(export_to)  # temporary files of an export that was killed (we hold the lock)
    store = SQLiteStore(work_path, meta, records_in, append=append)
    try:
        done = store.done()
        for i, h in done.items():
            entry = id_map.get(i)
            if entry is not None and seqs[entry[0]].sha1 != h:
                raise StoreMismatchError(_other_sequence(work_path, i, entry, where))
        skipped = sum(1 for i in id_map if i in done) if done else 0
        if done:
            for s in seqs:
                s.ids = [i for i in s.ids if i not in done]
        todo = [(bi, b) for bi, b in enumerate(batches) if any(seqs[k].ids for k, _, _ in b)]
        # tokens: residues plus the family's specials per item; the seqs with an item in todo
        total_tokens = sum(sum(map(len, map(_RESIDUES, b))) + fmt.specials * len(b) for _, b in todo)
        n_todo_seqs = len(set(map(_SEQ_INDEX, itertools.chain.from_iterable(b for _, b in todo))))

        t0 = time.perf_counter()
        asm = _Assembler(seqs, poolers, layer_axis, store_dtype)
        prog = _Progress(n_todo_seqs, total_tokens, progress)
        runner_kw = dict(
            poolers=poolers, layers=norm_layers, store_dtype=store_dtype, pad_to=max_tokens if compile else None,
            prefix=len(fmt.prefix), suffix=len(fmt.suffix), pad_id=fmt.pad_id,
        )  # fmt: skip
        written = 0
        phases: dict = {}
        try:
            if len(devs) == 1:
                written = _run_local(m, devs[0], fmt, runner_kw, todo, asm, store, prog, phases)
            else:
                written = _run_workers(source, devs, dtype, backend, compile, runner_kw, fmt, todo, asm, store, prog, identity)
        finally:
            prog.close()
        if asm.partial:  # every chunk of a split sequence that needs a row is in a batch of todo
            raise EmbedError(f"anyattn.embed: {len(asm.partial)} split sequence(s) incomplete after the last batch (a bug: please report it)")
        if export_to:
            export(store, export_to, shard_size)
        run_s = time.perf_counter() - t0
    finally:
        store.close()
    if export_to:
        for suffix in ("", "-wal", "-shm"):
            if os.path.exists(work_path + suffix):
                os.remove(work_path + suffix)
    computed = n_todo_seqs
    return _summary(out, n_records, id_map, seqs, written, skipped, computed, total_tokens, len(todo), devs, parse_s, load_s, run_s, t_start, phases)


def _other_sequence(path, i, entry, where) -> str:
    unit = "line" if where != "records" else "record"
    return (
        f"out: {path!r} holds id {i!r} with another sequence than {where} {unit} {entry[1]}; "
        "refusing to mix inputs (use another --out)"
    )


def _summary(out, n_records, id_map, seqs, written, skipped, computed, tokens, nbatches, devs, parse_s, load_s, run_s, t_start, phases=None):
    return EmbedSummary(
        out=out, records=n_records, ids=len(id_map), unique=len(seqs), duplicates=n_records - len(seqs),
        embedded=written, skipped=skipped, computed=computed,
        truncated=sum(1 for s in seqs if s.policy == "truncated"),
        split=sum(1 for s in seqs if s.policy.startswith("split")), tokens=tokens, batches=nbatches,
        devices=tuple(devs), parse_s=parse_s, load_s=load_s, run_s=run_s,
        elapsed_s=time.perf_counter() - t_start, seq_per_s=computed / run_s if run_s > 0 else 0.0,
        tok_per_s=tokens / run_s if run_s > 0 else 0.0, phases=dict(phases or {}),
    )  # fmt: skip
