"""``anyattn.embed.embed``: FASTA -> embeddings, packed, resumable, on one or several devices.

Shape legend:
    T tokens of a packed batch (<cls> residues <eos> per sequence, back to back)
    S row length (T, or the bucketed length with ``compile=True``)   D sequences in the batch
    M longest residue count in the batch   L layers asked for   C hidden size   n residues

One job::

    read + validate records ──> unique sequences (duplicates share one computation)
      ──> long policy (error | truncate | split into near-equal chunks)
      ──> items sorted by (-length, sequence) ──> greedy token-budget batches (max_tokens)
      ──> skip batches whose every id is already in the store (resume)
      ──> packed forward (1, S), SeqInfo.from_lengths ──> pooling on the device
      ──> one SQLite transaction per batch (a writer thread, or the parent of the workers)
      ──> .safetensors / .npz: exported atomically from the SQLite work store at the end

The batch plan depends only on the set of unique sequences and ``max_tokens``, never on the input
order or on what an earlier run finished: a resumed run computes the remaining batches exactly as
an uninterrupted run would, so its rows are bitwise equal on the same device and kernels.

Pooling (over the residues; <cls> and <eos> are excluded from mean and max):
    mean  (C,)  float32 mean of the residue vectors, cast to the store dtype
    max   (C,)  elementwise max over the residues
    cls   (C,)  the <cls> token's vector
    none  (n, C) one vector per residue (without <cls>/<eos>)
With ``layers`` a list, every array gets a leading layer axis (L, ...); with ``layers`` None (the
last layer) or one int, it has none.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import operator
import os
import queue
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field

import torch

from .. import __version__
from ..errors import bad_type, bad_value
from ..layout import SeqInfo, host_to_device
from .fasta import UNKNOWN_POLICIES, FastaError, read_fasta, read_records
from .store import EXPORT_FORMATS, FORMAT, SQLiteStore, StoreMismatchError, _np, check_meta, export, open_store

__all__ = ["embed", "EmbedSummary", "POOLINGS", "LONG_POLICIES"]

POOLINGS = ("mean", "cls", "max", "none")
LONG_POLICIES = ("error", "truncate", "split")
_DTYPES = {
    "fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp16": torch.float16, "float16": torch.float16,
}  # fmt: skip
_STORE_DTYPES = ("float16", "float32")
# the architecture fields whose hash identifies a model in the store metadata
_CONFIG_KEYS = (
    "model_type", "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
    "max_position_embeddings", "position_embedding_type", "token_dropout", "emb_layer_norm_before",
    "layer_norm_eps", "pad_token_id", "mask_token_id", "rope_theta",
)  # fmt: skip


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


# ------------------------------------------------------------------------------- model access
def _config(model):
    """The config object of an anyattn model (``model.config``; ESM2ForMaskedLM before the
    transformers port keeps it in ``model.cfg``)."""
    cfg = getattr(model, "config", None)
    if cfg is None:
        cfg = getattr(model, "cfg", None)
    if cfg is None:
        raise bad_type("model", "an anyattn.models model (with .config), a checkpoint directory or a hub id", type(model).__name__)
    return cfg


def _encoder(model):
    """The encoder without the LM head (embeddings need the hidden states only)."""
    return getattr(model, "esm", model)


def _load_model(source, *, backend):
    """Load a model from a directory or hub id on the CPU in float32 (so that the weights
    fingerprint does not depend on ``dtype``); the caller moves it."""
    from .. import models

    loader = getattr(models, "load", None)
    if loader is None:  # anyattn.models.load (all model families) not available: ESM2 only
        loader = models.load_esm2
    return loader(os.fspath(source), attn_backend=backend)  # None: the checkpoint's saved backend, else auto


def _compile(model) -> None:
    """``compile_layers()`` once per model object (a second job with the same in-memory model
    reuses the compiled layers instead of compiling again)."""
    enc = _encoder(model)
    if not hasattr(enc, "compile_layers"):
        raise bad_value("compile", f"False for {type(model).__name__} (it has no compile_layers())", True)
    if not getattr(enc, "_anyattn_embed_compiled", False):
        enc.compile_layers()
        enc._anyattn_embed_compiled = True


def _tokenizer(model, source):
    from ..models import ProteinTokenizer, load_tokenizer

    if source is not None and os.path.isfile(os.path.join(os.fspath(source), "vocab.txt")):
        return load_tokenizer(source)
    if getattr(model, "config", None) is not None:
        return load_tokenizer(model)
    cfg = _config(model)  # ESM2ForMaskedLM with .cfg: ESM2's alphabet is fixed
    if getattr(cfg, "vocab_size", None) == len(ProteinTokenizer.esm()):
        return ProteinTokenizer.esm()
    raise bad_value("model", "a model whose tokenizer anyattn.models.load_tokenizer can find", type(model).__name__)


def _model_identity(model) -> dict:
    cfg = _config(model)
    arch = {k: getattr(cfg, k, None) for k in _CONFIG_KEYS}
    arch["model_type"] = arch["model_type"] or "esm"
    conf = hashlib.sha1(json.dumps(arch, sort_keys=True, default=str).encode()).hexdigest()
    # 64 strided values of every tensor, rounded to bfloat16 so that the fingerprint of one
    # checkpoint is the same whatever dtype it was cast to
    h = hashlib.sha1()
    with torch.no_grad():
        for name, t in sorted(model.state_dict().items()):
            flat = t.detach().reshape(-1)
            step = max(1, flat.numel() // 64)
            sample = flat[::step][:64].to(torch.bfloat16).float().cpu()
            h.update(f"{name}{tuple(t.shape)}".encode())
            h.update(_np().asarray(sample.numpy()).tobytes())
    return {"model_type": str(arch["model_type"]), "model_config_sha1": conf, "model_weights_sha1": h.hexdigest()}


# ------------------------------------------------------------------------------------ the plan
@dataclass(slots=True)
class _Seq:
    seq: str  # after the unknown policy
    line: int  # first record with this sequence
    ids: list  # ids not yet in the store are written
    policy: str = ""  # '' | 'truncated' | 'split:<k>'
    chunks: int = 1
    _sha1: str | None = field(default=None, repr=False, compare=False)

    @property
    def sha1(self) -> str:
        """sha1 of ``seq``, computed when first asked for (when a row is written or checked
        against the store), not while the input is read."""
        h = self._sha1
        if h is None:
            h = self._sha1 = _sha1(self.seq)
        return h


def _sha1(s: str) -> str:
    return hashlib.sha1(s.encode()).hexdigest()


def _read_input(source, alphabet, unknown):
    if isinstance(source, (str, os.PathLike)):
        return read_fasta(source, alphabet=alphabet, unknown=unknown), os.fspath(source)
    return read_records(source, alphabet=alphabet, unknown=unknown), "records"


def _collect(records, where):
    """Unique sequences (first-seen order) and the id -> sequence index map; same id with a
    different sequence is an error naming both lines."""
    by_seq: dict = {}
    seqs: list = []
    id_map: dict = {}  # id -> (seq index, line)
    n = 0
    unit = "line" if where != "records" else "record"
    for n, r in enumerate(records, 1):
        k = by_seq.get(r.seq)
        if k is None:
            k = by_seq[r.seq] = len(seqs)
            seqs.append(_Seq(r.seq, r.line, []))
        prev = id_map.get(r.id)
        if prev is not None:
            if prev[0] != k:
                raise FastaError(
                    f"{where}: duplicate id {r.id!r} with different sequences at {unit} {prev[1]} and {unit} {r.line}"
                )
            continue  # the same record again: one row
        id_map[r.id] = (k, r.line)
        seqs[k].ids.append(r.id)
    return seqs, id_map, n


def _chunks(n: int, parts: int):
    base, extra = divmod(n, parts)
    out, start = [], 0
    for i in range(parts):
        size = base + (1 if i < extra else 0)
        out.append((start, start + size))
        start += size
    return out


def _plan(seqs, max_residues, long_policy, max_tokens, where):
    """Items (seq index, chunk, residues) sorted by (-length, sequence, chunk), then token-budget
    batches. Returns the list of batches, each a list of items."""
    items = []
    unit = "line" if where != "records" else "record"
    for k, s in enumerate(seqs):
        n = len(s.seq)
        if n <= max_residues:
            items.append((k, 0, s.seq))
            continue
        if long_policy == "error":
            raise FastaError(
                f"{where}: {unit} {s.line}: sequence {s.ids[0]!r} has {n} residues; the model takes at most "
                f"{max_residues} (max_position_embeddings minus <cls> and <eos>). Choose long_policy="
                f"'truncate' or 'split' (--long-policy)"
            )
        if long_policy == "truncate":
            s.policy = "truncated"
            items.append((k, 0, s.seq[:max_residues]))
        else:
            parts = math.ceil(n / max_residues)
            s.policy, s.chunks = f"split:{parts}", parts
            items.extend((k, c, s.seq[a:b]) for c, (a, b) in enumerate(_chunks(n, parts)))
    # The order of one stable sort by (-length, sequence, chunk), in groups of one length (longest
    # first), each sorted by (sequence, chunk): sequences of different lengths are never compared.
    by_len: dict = {}
    for it in items:
        n = len(it[2])
        group = by_len.get(n)
        if group is None:
            by_len[n] = [it]
        else:
            group.append(it)
    batches, cur, used = [], [], 0
    for n in sorted(by_len, reverse=True):
        group = by_len[n]
        if len(group) > 1:
            group.sort(key=_SEQUENCE_CHUNK)
        t = n + 2
        if t > max_tokens:
            raise bad_value("max_tokens", f"at least {t} (the longest sequence plus <cls> and <eos>)", max_tokens)
        for it in group:
            if cur and used + t > max_tokens:
                batches.append(cur)
                cur, used = [], 0
            cur.append(it)
            used += t
    if cur:
        batches.append(cur)
    return batches


_SEQUENCE_CHUNK = operator.itemgetter(2, 1)  # an item's (residues, chunk)
_SEQ_INDEX, _RESIDUES = operator.itemgetter(0), operator.itemgetter(2)


# ---------------------------------------------------------------------------------- the runner
class _Runner:
    """Runs packed batches on one device and pools on it. ``submit`` only launches work (no host
    sync on CUDA); ``collect`` waits for one batch and returns one array per item, shaped
    (L, C) (pooled, float32) or (L, n, C) (per residue, store dtype)."""

    def __init__(self, model, device, pooling, layers, store_dtype, pad_to):
        self.enc = _encoder(model)
        self.device = torch.device(device)
        self.pooling, self.layers, self.pad_to = pooling, layers, pad_to
        self.store_dtype = getattr(torch, store_dtype)
        self.L = _config(model).num_hidden_layers
        self.need_hidden = any(layer != self.L for layer in layers)
        self.cuda = self.device.type == "cuda"

    def submit(self, toks_T, lengths):
        """toks_T: flat int64 host tensor of the batch's tokens; lengths: tokens per sequence."""
        if self.cuda:  # the event and the copies must live on this device's stream, not cuda:0's
            with torch.cuda.device(self.device):
                return self._submit(toks_T, lengths)
        return self._submit(toks_T, lengths)

    @torch.inference_mode()
    def _submit(self, toks_T, lengths):
        dev = self.device
        T = int(toks_T.numel())
        S = max(T, self.pad_to or 0)
        ids = torch.full((1, S), self.pad_id, dtype=torch.long)
        ids[0, :T] = toks_T
        ids = host_to_device(ids, dev)
        info = SeqInfo.from_lengths([list(lengths)], total_length=S, device=dev)  # builds without a sync
        out = self.enc(ids, seq_info=info, output_hidden_states=self.need_hidden)
        if self.need_hidden:
            hs = [out.hidden_states[layer][0, :T] for layer in self.layers]
        else:
            hs = [out.last_hidden_state[0, :T]]
        h_LTC = torch.stack(hs)
        n_res = [n - 2 for n in lengths]
        starts = [0]
        for n in lengths[:-1]:
            starts.append(starts[-1] + n)
        if self.pooling == "none":
            idx = host_to_device(torch.cat([torch.arange(s + 1, s + 1 + n) for s, n in zip(starts, n_res)]), dev)
            res = h_LTC[:, idx].to(self.store_dtype)
        elif self.pooling == "cls":
            res = h_LTC[:, host_to_device(torch.tensor(starts), dev)].float()
        else:
            M = max(n_res)
            ar = torch.arange(M)
            idx_DM = host_to_device((torch.tensor(starts)[:, None] + 1 + ar[None]).clamp_max(T - 1), dev)
            valid_DM = host_to_device(ar[None] < torch.tensor(n_res)[:, None], dev)
            g = h_LTC[:, idx_DM].float()  # (L, D, M, C)
            if self.pooling == "mean":
                cnt = host_to_device(torch.tensor(n_res, dtype=torch.float32), dev)
                res = (g * valid_DM[None, :, :, None]).sum(2) / cnt[None, :, None]
            else:
                res = g.masked_fill(~valid_DM[None, :, :, None], float("-inf")).amax(2)
        if self.cuda:
            host = torch.empty(res.shape, dtype=res.dtype, pin_memory=True)
            host.copy_(res, non_blocking=True)
            ev = torch.cuda.Event()
            ev.record(torch.cuda.current_stream(dev))
        else:
            host, ev = res, None
        return host, ev, n_res

    def collect(self, pending):
        host, ev, n_res = pending
        if ev is not None:
            ev.synchronize()
        a = host.numpy()
        if self.pooling != "none":
            return [a[:, d] for d in range(a.shape[1])]
        np = _np()
        return np.split(a, np.cumsum(n_res)[:-1], axis=1)


# ------------------------------------------------------------------------------ progress
class _Progress:
    """tqdm on a terminal (seq/s, tok/s), else one log line on stderr every 10 s."""

    def __init__(self, total_seqs, total_tokens, enabled):
        self.enabled, self.total, self.total_tokens = enabled, total_seqs, total_tokens
        self.seqs = self.tokens = 0
        self.t0 = self.last = time.perf_counter()
        self.bar = None
        if enabled and sys.stderr.isatty():
            try:
                from tqdm import tqdm
            except ImportError:
                tqdm = None
            if tqdm is not None:
                self.bar = tqdm(total=total_seqs, unit="seq", desc="embed", dynamic_ncols=True, file=sys.stderr)

    def update(self, seqs, tokens):
        self.seqs += seqs
        self.tokens += tokens
        if not self.enabled:
            return
        now = time.perf_counter()
        dt = max(now - self.t0, 1e-9)
        if self.bar is not None:
            self.bar.update(seqs)
            if now - self.last > 0.5:
                self.bar.set_postfix_str(f"{self.tokens / dt:,.0f} tok/s")
                self.last = now
        elif now - self.last > 10:
            self._line(dt)
            self.last = now

    def _line(self, dt):
        print(
            f"embed: {self.seqs}/{self.total} sequences, {self.tokens}/{self.total_tokens} tokens, "
            f"{self.seqs / dt:.1f} seq/s, {self.tokens / dt:,.0f} tok/s",
            file=sys.stderr, flush=True,
        )  # fmt: skip

    def close(self):
        if self.bar is not None:
            self.bar.close()
        elif self.enabled:
            self._line(max(time.perf_counter() - self.t0, 1e-9))


# ------------------------------------------------------------------------------ writing
class _Writer:
    """One thread doing the SQLite writes, so that the device keeps working meanwhile. The queue
    is bounded (back-pressure); a write error is raised in the caller at the next put/close."""

    def __init__(self, store: SQLiteStore):
        self.store = store
        self.q: queue.Queue = queue.Queue(maxsize=8)
        self.error = None
        self.busy_s = 0.0  # time in put_many (writer thread)
        self.blocked_s = 0.0  # time the job's thread waited for room in the queue
        self.thread = threading.Thread(target=self._loop, name="anyattn-embed-writer", daemon=True)
        self.thread.start()

    def _loop(self):
        while True:
            rows = self.q.get()
            if rows is None:
                return
            if self.error is None:
                t0 = time.perf_counter()
                try:
                    self.store.put_many(rows)
                except BaseException as e:  # re-raised in the job's thread
                    self.error = e
                self.busy_s += time.perf_counter() - t0

    def put(self, rows):
        if self.error is not None:
            raise self.error
        if rows:
            t0 = time.perf_counter()
            self.q.put(rows)
            self.blocked_s += time.perf_counter() - t0

    def close(self):
        self.q.put(None)
        self.thread.join()
        if self.error is not None:
            raise self.error


class _Assembler:
    """Item results -> rows. Chunks of a split sequence are combined once all have arrived (mean
    weighted by chunk length, max of maxima, per-residue concatenated)."""

    def __init__(self, seqs, pooling, layer_axis, store_dtype):
        self.seqs, self.pooling, self.layer_axis = seqs, pooling, layer_axis
        self.store_dtype = store_dtype
        self.partial: dict = {}

    def rows(self, items, arrays):
        np = _np()
        out, done_seqs = [], 0
        for (k, c, res), a in zip(items, arrays):
            s = self.seqs[k]
            if s.chunks > 1:
                parts = self.partial.setdefault(k, {})
                parts[c] = (a, len(res))
                if len(parts) < s.chunks:
                    continue
                chunks = [parts[i] for i in range(s.chunks)]
                del self.partial[k]
                if self.pooling == "mean":
                    tot = sum(n for _, n in chunks)
                    a = sum(x.astype(np.float64) * n for x, n in chunks) / tot
                elif self.pooling == "max":
                    a = np.maximum.reduce([x for x, _ in chunks])
                else:  # none (cls is refused with split)
                    a = np.concatenate([x for x, _ in chunks], axis=1)
            a = np.ascontiguousarray(a.astype(self.store_dtype, copy=False))
            if not self.layer_axis:
                a = a[0]
            done_seqs += 1
            out.extend((i, s.sha1, len(s.seq), s.policy, a) for i in s.ids)
        return out, done_seqs


# ------------------------------------------------------------------------------ workers
def _worker(rank, device, source, dtype_name, backend, runner_kw, compile_, tasks, results, parent_pid, threads):
    try:
        if threads:
            torch.set_num_threads(threads)
        if torch.device(device).type == "cuda":
            torch.cuda.set_device(torch.device(device))
        model = _load_model(source, backend=backend)
        model.to(device=device, dtype=_DTYPES[dtype_name]).eval()
        if compile_:
            _compile(model)
        runner = _Runner(model, device, **runner_kw)
        runner.pad_id = _tokenizer(model, source).pad_token_id
        results.put(("ready", rank, _model_identity(model)))
        pending = None
        while True:
            try:
                task = tasks.get(timeout=1.0)
            except queue.Empty:
                if os.getppid() != parent_pid:  # the parent died (e.g. SIGKILL): stop
                    return
                continue
            if task is None:
                break
            bi, toks, lengths = task
            p = runner.submit(torch.from_numpy(toks), lengths)
            if pending is not None:
                results.put(("batch", pending[0], runner.collect(pending[1])))
            pending = (bi, p)
        if pending is not None:
            results.put(("batch", pending[0], runner.collect(pending[1])))
        results.put(("done", rank, None))
    except BaseException:
        results.put(("error", rank, traceback.format_exc()))


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
        out.append(str(dev))
    if len(out) > 1:
        real = [d for d in out if d != "cpu"]
        if len(set(real)) != len(real):
            raise bad_value("devices", "distinct GPUs (each device gets one process)", ",".join(out))
    return out


# ------------------------------------------------------------------------------ the job
def embed(
    fasta_or_records,
    *,
    model,
    out,
    pooling: str = "mean",
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
) -> EmbedSummary:
    """Embed every sequence of a FASTA file (path, ``.gz`` too) or of Python records
    (mapping id -> sequence, or ``(id, sequence)`` pairs) into the store ``out``.

    Args:
        model: a checkpoint directory or hub id (loaded with ``anyattn.models``), or a model
            object (used as is: moved/cast in place to the device and ``dtype``).
        out: ``*.safetensors`` or ``*.npz`` (written atomically at the end from a SQLite work
            store ``out + ".work.sqlite"``, removed afterwards); anything else is an SQLite store.
        pooling: "mean" | "max" (over residues, <cls>/<eos> excluded) | "cls" | "none" (per residue).
        layers: None (last layer, no layer axis), an int, or a list of ints (a layer axis first),
            indexing the L+1 hidden states (0 = embeddings, L = the last layer; negatives count
            from the end).
        dtype: compute dtype "bf16" | "fp16" | "fp32"; "auto": bf16 on CUDA, fp32 on CPU.
        store_dtype: "float16" | "float32"; default float32 for fp32 compute, else float16.
        max_tokens: token budget of one packed batch (<cls>/<eos> included).
        backend: anyattn attention backend for every layer (None: the model's / "auto").
        devices: None (CUDA if available, else CPU), "cuda:0,cuda:1", or a list. Several devices
            run one process each (torch.multiprocessing spawn); this process is the only writer.
        long_policy: sequences longer than the model's maximum: "error", "truncate" (keep the
            first residues) or "split" (near-equal chunks, each embedded alone; mean weighted by
            chunk length, max of maxima, per-residue concatenated; not with pooling="cls").
        unknown: characters outside the model's alphabet: "error" or "x" (mapped to X).
        compile: ``compile_layers()`` on the model and pad every batch to ``max_tokens`` (one
            shape, no recompiles).
        progress: a progress bar (tqdm on a terminal) or log lines on stderr.

    Returns an :class:`EmbedSummary`. Re-running the same call after a crash continues where it
    stopped; a store of other settings is refused (:class:`StoreMismatchError`).
    """
    t_start = time.perf_counter()
    if pooling not in POOLINGS:
        raise bad_value("pooling", f"one of {POOLINGS}", repr(pooling))
    if long_policy not in LONG_POLICIES:
        raise bad_value("long_policy", f"one of {LONG_POLICIES}", repr(long_policy))
    if unknown not in UNKNOWN_POLICIES:
        raise bad_value("unknown", f"one of {UNKNOWN_POLICIES}", repr(unknown))
    if long_policy == "split" and pooling == "cls":
        raise bad_value("long_policy", "'error' or 'truncate' with pooling='cls' (a split sequence has no single <cls>)", "'split'")
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 3:
        raise bad_value("max_tokens", "an int >= 3 (tokens per packed batch)", repr(max_tokens))
    if not isinstance(out, (str, os.PathLike)):
        raise bad_type("out", "an output path (str or os.PathLike)", type(out).__name__)
    out = os.fspath(out)
    devs = _parse_devices(devices)
    if dtype == "auto":
        dtype = "bf16" if devs[0].startswith("cuda") else "fp32"
    if dtype not in _DTYPES:
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

    # ---- model (in this process: identity, tokenizer, config; workers load their own)
    t0 = time.perf_counter()
    if source is not None:
        m = _load_model(source, backend=backend)
        identity = _model_identity(m)  # float32 CPU weights
    else:
        m = model
        identity = _model_identity(m)
        if backend is not None:
            m.attn_backend = backend
    tok = _tokenizer(m, source)
    from ..models import ProteinTokenizer

    if not isinstance(tok, ProteinTokenizer):  # E1 (multi-sequence samples), DPLM-2 (two tracks)
        raise bad_value(
            "model", "an ESM2 or DPLM model (one sequence as <cls> residues <eos>, the ESM alphabet)",
            f"{type(m).__name__}, whose inputs are {type(tok).__name__}'s format: the embed job does not build "
            "them; run the model's forward on its tokenizer's batches instead",
        )  # fmt: skip
    cfg = _config(m)
    L = cfg.num_hidden_layers
    max_residues = cfg.max_position_embeddings - 2
    layer_axis = isinstance(layers, (list, tuple))
    raw_layers = list(layers) if layer_axis else [L if layers is None else layers]
    norm_layers = []
    for x in raw_layers:
        if not isinstance(x, int) or isinstance(x, bool) or not -(L + 1) <= x <= L:
            raise bad_value("layers", f"None, an int or a list of ints in [{-(L + 1)}, {L}] (hidden states 0..{L})", repr(layers))
        norm_layers.append(x % (L + 1))
    if layer_axis and not norm_layers:
        raise bad_value("layers", "a non-empty list", "[]")
    if len(devs) == 1:
        m.to(device=devs[0], dtype=tdtype).eval()
        if compile:
            _compile(m)
    load_s = time.perf_counter() - t0

    meta = {
        "format": FORMAT, **identity, "model_source": str(source) if source is not None else type(m).__name__,
        "pooling": pooling, "layers": json.dumps(norm_layers if layer_axis else norm_layers[0]), "dtype": dtype,
        "store_dtype": store_dtype, "long_policy": long_policy, "unknown": unknown, "max_residues": max_residues,
        "anyattn_version": __version__, "torch_version": torch.__version__,
    }  # fmt: skip

    # ---- input
    t0 = time.perf_counter()
    alphabet = frozenset(t for t in tok.vocab if len(t) == 1 and t.isalpha())
    records, where = _read_input(fasta_or_records, alphabet, unknown)
    seqs, id_map, n_records = _collect(records, where)
    batches = _plan(seqs, max_residues, long_policy, max_tokens, where)
    parse_s = time.perf_counter() - t0

    # ---- the store
    export_to = out if out.endswith(EXPORT_FORMATS) else None
    work_path = out + ".work.sqlite" if export_to else out
    if export_to and os.path.exists(export_to):
        done_store = open_store(export_to)
        try:
            check_meta(done_store.metadata, meta, export_to)
            have = set(done_store.ids())
        finally:
            done_store.close()
        if have != set(id_map):
            raise StoreMismatchError(
                f"out: {export_to!r} exists with {len(have)} ids, this input has {len(id_map)} "
                f"({len(set(id_map) - have)} not in it); remove it or write to another path"
            )
        return _summary(out, n_records, id_map, seqs, 0, len(id_map), 0, 0, 0, devs, parse_s, load_s, 0.0, t_start)
    store = SQLiteStore(work_path, meta)
    try:
        done = store.done()
        for i, h in done.items():
            entry = id_map.get(i)
            if entry is not None and seqs[entry[0]].sha1 != h:
                unit = "line" if where != "records" else "record"
                raise StoreMismatchError(
                    f"out: {work_path!r} holds id {i!r} with another sequence than {where} {unit} {entry[1]}; "
                    "refusing to mix inputs (use another --out)"
                )
        skipped = sum(1 for i in id_map if i in done) if done else 0
        if done:
            for s in seqs:
                s.ids = [i for i in s.ids if i not in done]
        todo = [(bi, b) for bi, b in enumerate(batches) if any(seqs[k].ids for k, _, _ in b)]
        # tokens: residues plus <cls> and <eos> per item; the seqs with an item in todo
        total_tokens = sum(sum(map(len, map(_RESIDUES, b))) + 2 * len(b) for _, b in todo)
        n_todo_seqs = len(set(map(_SEQ_INDEX, itertools.chain.from_iterable(b for _, b in todo))))

        t0 = time.perf_counter()
        asm = _Assembler(seqs, pooling, layer_axis, store_dtype)
        prog = _Progress(n_todo_seqs, total_tokens, progress)
        runner_kw = dict(pooling=pooling, layers=norm_layers, store_dtype=store_dtype, pad_to=max_tokens if compile else None)
        written = 0
        phases: dict = {}
        try:
            if len(devs) == 1:
                written = _run_local(m, devs[0], tok, runner_kw, todo, asm, store, prog, phases)
            else:
                written = _run_workers(source, devs, dtype, backend, compile, runner_kw, tok, todo, asm, store, prog, identity)
        finally:
            prog.close()
        if asm.partial:  # every chunk of every split sequence is in some batch: cannot happen
            raise RuntimeError(f"anyattn.embed: {len(asm.partial)} split sequence(s) incomplete after the last batch")
        if export_to:
            export(store, export_to)
        run_s = time.perf_counter() - t0
    finally:
        store.close()
    if export_to:
        for suffix in ("", "-wal", "-shm"):
            if os.path.exists(work_path + suffix):
                os.remove(work_path + suffix)
    computed = n_todo_seqs
    return _summary(out, n_records, id_map, seqs, written, skipped, computed, total_tokens, len(todo), devs, parse_s, load_s, run_s, t_start, phases)


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


_LUTS: dict = {}


def _lut(tok):
    """A 256-entry byte -> token id table of the tokenizer's one-letter tokens (-1 elsewhere),
    equal to ``tok.encode`` on the validated (ASCII letter) sequences, ~100x faster than a Python
    loop per residue: tokenizing stays off the critical path of a GPU batch."""
    np = _np()
    key = (id(tok), tok.vocab)
    lut = _LUTS.get(key)
    if lut is None:
        lut = np.full(256, -1, dtype=np.int64)
        for t, i in tok.token_to_id.items():
            if len(t) == 1 and t.isascii():
                lut[ord(t)] = i
        _LUTS.clear()
        _LUTS[key] = lut
    return lut


def _batch_tokens(tok, batch):
    """Flat int64 token ids of a batch (``<cls> residues <eos>`` per item) and the lengths: the
    residues of the whole batch go through the lookup table in one call, and <cls>/<eos> are
    written at computed offsets (no per-item Python work besides the lengths)."""
    np = _np()
    lut = _lut(tok)
    res = [r for _, _, r in batch]
    lengths = [len(r) + 2 for r in res]
    codes = lut[np.frombuffer("".join(res).encode("ascii"), dtype=np.uint8)]
    if (codes < 0).any():  # the reader validated every residue against this alphabet
        raise RuntimeError("anyattn.embed: a residue outside the tokenizer's one-letter tokens reached the model")
    n = np.asarray(lengths, dtype=np.int64)
    ends = np.cumsum(n)  # one past each item's <eos>
    starts = ends - n  # each item's <cls>
    out = np.empty(int(ends[-1]) if len(ends) else 0, dtype=np.int64)
    out[starts] = tok.cls_token_id
    out[ends - 1] = tok.eos_token_id
    body = np.ones(out.size, dtype=bool)
    body[starts] = False
    body[ends - 1] = False
    out[body] = codes
    return out, lengths


def _run_local(model, device, tok, runner_kw, todo, asm, store, prog, phases):
    """One device, in this process. Batch n+1 is submitted (launched) before batch n's results are
    collected and written, so the host work of one batch overlaps the device work of the next.
    ``phases`` (a dict) receives where the time went (see :class:`EmbedSummary`)."""
    runner = _Runner(model, device, **runner_kw)
    runner.pad_id = tok.pad_token_id
    writer = _Writer(store)
    written = 0
    pending = None
    t = dict.fromkeys(("tokenize", "submit", "wait", "assemble"), 0.0)
    clock = time.perf_counter

    def finish(p):
        nonlocal written
        batch, handle, ntok = p
        t0 = clock()
        arrays = runner.collect(handle)
        t1 = clock()
        rows, nseq = asm.rows(batch, arrays)
        t["wait"] += t1 - t0
        t["assemble"] += clock() - t1
        writer.put(rows)
        written += len(rows)
        prog.update(nseq, ntok)

    try:
        for _, batch in todo:
            t0 = clock()
            toks, lengths = _batch_tokens(tok, batch)
            t1 = clock()
            handle = runner.submit(torch.from_numpy(toks), lengths)
            t["tokenize"] += t1 - t0
            t["submit"] += clock() - t1
            if pending is not None:  # the previous batch's host work overlaps this one's compute
                finish(pending)
            pending = (batch, handle, sum(lengths))
        if pending is not None:
            finish(pending)
    finally:
        writer.close()
        phases.update(t, queue=writer.blocked_s, write=writer.busy_s)
    return written


def _run_workers(source, devs, dtype, backend, compile_, runner_kw, tok, todo, asm, store, prog, identity):
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    tasks, results = ctx.Queue(), ctx.Queue()
    n_cpu = sum(1 for d in devs if d == "cpu")
    threads = max(1, (os.cpu_count() or 1) // n_cpu) if n_cpu else 0
    procs = [
        ctx.Process(
            target=_worker, args=(r, d, os.fspath(source), dtype, backend, runner_kw, compile_, tasks, results, os.getpid(), threads if d == "cpu" else 0),
            daemon=True,
        )  # fmt: skip
        for r, d in enumerate(devs)
    ]
    for p in procs:
        p.start()
    by_index = dict(todo)
    ntok = {bi: sum(len(r) + 2 for _, _, r in b) for bi, b in todo}
    feed = iter(todo)

    def put_next():
        """Keep a bounded number of batches in flight (memory stays flat for millions of sequences)."""
        for bi, batch in feed:
            toks, lengths = _batch_tokens(tok, batch)
            tasks.put((bi, toks, lengths))
            return
        for _ in procs:  # exhausted: one stop marker per worker
            tasks.put(None)
        put_next.done = True

    put_next.done = False
    for _ in range(4 * len(procs)):
        if not put_next.done:
            put_next()
    written, finished, remaining = 0, 0, set(by_index)
    try:
        while finished < len(procs):
            try:
                kind, key, payload = results.get(timeout=1.0)
            except queue.Empty:
                dead = [f"{devs[r]} (exit code {p.exitcode})" for r, p in enumerate(procs) if p.exitcode is not None and p.exitcode != 0]
                if dead:
                    raise RuntimeError(f"anyattn.embed: worker process(es) died: {', '.join(dead)}") from None
                continue
            if kind == "error":
                raise RuntimeError(f"anyattn.embed: the worker on {devs[key]} failed:\n{payload}")
            if kind == "ready":
                if payload != identity:
                    raise RuntimeError(f"anyattn.embed: the worker on {devs[key]} loaded a different model ({payload} vs {identity})")
            elif kind == "batch":
                rows, nseq = asm.rows(by_index[key], payload)
                store.put_many(rows)  # this process is the only writer
                written += len(rows)
                remaining.discard(key)
                prog.update(nseq, ntok[key])
                if not put_next.done:
                    put_next()
            elif kind == "done":
                finished += 1
        if remaining:
            raise RuntimeError(f"anyattn.embed: {len(remaining)} batch(es) never came back from the workers")
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
        for p in procs:
            p.join(timeout=10)
    return written
