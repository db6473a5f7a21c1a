"""The embed job's execution: tokenizing batches, the packed forward and pooling on a device,
the writer thread, progress, rows from arrays, and the worker processes of a multi-device job.

Shape legend (as in :mod:`anyattn.embed.job`):
    T tokens of a packed batch   S row length   D sequences in the batch
    M longest residue count in the batch   L layers asked for   C hidden size   n residues
"""

from __future__ import annotations

import os
import queue
import sys
import threading
import time
import traceback

import torch

from .. import layout  # layout.host_to_device looked up per call (benchmarks/embed_h2d_probe.py patches it)
from ..errors import AnyAttnError
from ..layout import SeqInfo
from .formats import InputFormat
from .model import _DTYPES, _compile, _config, _encoder, _load_model, _model_identity
from .pooling import pool_device, pool_host, pool_plan
from .store import SQLiteStore, _np


class EmbedError(AnyAttnError, RuntimeError):
    """The job failed while running (a worker died, a non-finite embedding); the rows committed
    before it stay in the store, and running the same job again resumes."""


_FORMATS: dict = {}


def _as_format(fmt_or_tok):
    """An :class:`~anyattn.embed.formats.InputFormat`, or one built from a ProteinTokenizer
    (``<cls> residues <eos>``; benchmarks call ``_batch_tokens`` with a tokenizer)."""
    if isinstance(fmt_or_tok, InputFormat):
        return fmt_or_tok
    tok = fmt_or_tok
    key = (id(tok), getattr(tok, "vocab", None))
    fmt = _FORMATS.get(key)
    if fmt is None:
        from .formats import _letters_of

        fmt = InputFormat(
            "esm2", (tok.cls_token_id,), (tok.eos_token_id,), (tok.cls_token,), (tok.eos_token,),
            _letters_of(tok.token_to_id), tok.pad_token_id, None,
        )  # fmt: skip
        _FORMATS.clear()
        _FORMATS[key] = fmt
    return fmt


def _batch_tokens(fmt, batch):
    """Flat int64 token ids of a batch (``prefix residues suffix`` per item, the family's
    format) and the tokens per item. The residues of the whole batch go through the format's
    lookup table in one call (equal to the tokenizer's encoding of the validated sequences, ~100x
    faster than a Python loop per residue); the specials are written at computed offsets."""
    np = _np()
    fmt = _as_format(fmt)
    P, Q = len(fmt.prefix), len(fmt.suffix)
    res = [r for _, _, r in batch]
    lengths = [len(r) + P + Q for r in res]
    codes = fmt.lut()[np.frombuffer("".join(res).encode("ascii"), dtype=np.uint8)]
    if (codes < 0).any():  # the reader validated every residue against this alphabet
        raise RuntimeError("anyattn.embed: a residue outside the tokenizer's one-letter tokens reached the model")
    n = np.asarray(lengths, dtype=np.int64)
    ends = np.cumsum(n)  # one past each item's last token
    starts = ends - n  # each item's first token
    out = np.empty(int(ends[-1]) if len(ends) else 0, dtype=np.int64)
    body = np.ones(out.size, dtype=bool)
    for j, t in enumerate(fmt.prefix):
        out[starts + j] = t
        body[starts + j] = False
    for j, t in enumerate(fmt.suffix):
        out[ends - Q + j] = t
        body[ends - Q + j] = False
    out[body] = codes
    return out, lengths


# ---------------------------------------------------------------------------------- the runner
class _Runner:
    """Runs packed batches on one device and pools on it. ``submit`` only launches work (no host
    sync on CUDA); ``collect`` waits for one batch and returns one array per item: (L, P*C)
    pooled float32, or (L, n, C) residue vectors (per-residue output in the store dtype; the
    chunks of split sequences, ``raw``, in float32 for pooling on the host)."""

    def __init__(self, model, device, poolers, layers, store_dtype, pad_to, prefix, suffix, pad_id):
        self.enc = _encoder(model)
        self.device = torch.device(device)
        self.poolers, self.layers, self.pad_to = tuple(poolers), list(layers), pad_to
        self.prefix, self.suffix, self.pad_id = int(prefix), int(suffix), int(pad_id)
        self.per_residue = self.poolers == ("none",)
        self.store_dtype = getattr(torch, store_dtype)
        self.L = _config(model).num_hidden_layers
        self.need_hidden = any(layer != self.L for layer in layers)
        self.cuda = self.device.type == "cuda"

    def submit(self, toks_T, lengths, raw=None):
        """toks_T: flat int64 host tensor of the batch's tokens; lengths: tokens per sequence;
        raw: per item, True to get its residue vectors back instead of pooled ones."""
        if self.cuda:  # the event and the copies must live on this device's stream, not cuda:0's
            with torch.cuda.device(self.device):
                return self._submit(toks_T, lengths, raw)
        return self._submit(toks_T, lengths, raw)

    def _residues(self, hs, starts, n_res, sel, dtype):
        """(L, sum n, C) residue vectors of the items ``sel``."""
        dev = self.device
        idx = torch.cat([torch.arange(starts[d] + self.prefix, starts[d] + self.prefix + n_res[d]) for d in sel])
        idx = layout.host_to_device(idx, dev)
        return torch.stack([h[idx].to(dtype) for h in hs])

    @torch.inference_mode()
    def _submit(self, toks_T, lengths, raw):
        dev = self.device
        T = int(toks_T.numel())
        S = max(T, self.pad_to or 0)
        ids = torch.full((1, S), self.pad_id, dtype=torch.long)
        ids[0, :T] = toks_T
        ids = layout.host_to_device(ids, dev)
        info = SeqInfo.from_lengths([list(lengths)], total_length=S, device=dev)  # builds without a sync
        out = self.enc(ids, seq_info=info, output_hidden_states=self.need_hidden)
        if self.need_hidden:
            hs = [out.hidden_states[layer][0, :T] for layer in self.layers]
        else:
            hs = [out.last_hidden_state[0, :T]]
        n_res = [n - self.prefix - self.suffix for n in lengths]
        starts = [0]
        for n in lengths[:-1]:
            starts.append(starts[-1] + n)
        D = len(lengths)
        results = []
        if self.per_residue:
            results.append(self._residues(hs, starts, n_res, range(D), self.store_dtype))
            kinds = None
        else:
            raw = [bool(r) for r in raw] if raw is not None else [False] * D
            pooled = [d for d in range(D) if not raw[d]]
            if pooled:
                st = layout.host_to_device(torch.tensor([starts[d] for d in pooled], dtype=torch.long), dev)
                nr = layout.host_to_device(torch.tensor([n_res[d] for d in pooled], dtype=torch.long), dev)
                plan = pool_plan(st, nr, self.prefix, self.suffix, self.poolers, max(n_res[d] for d in pooled), T)
                results.append(torch.stack([pool_device(h, plan, self.poolers) for h in hs]))
            chunks = [d for d in range(D) if raw[d]]
            if chunks:
                results.append(self._residues(hs, starts, n_res, chunks, torch.float32))
            kinds = raw
        if self.cuda:
            hosts = []
            for r in results:
                host = torch.empty(r.shape, dtype=r.dtype, pin_memory=True)
                host.copy_(r, non_blocking=True)
                hosts.append(host)
            ev = torch.cuda.Event()
            ev.record(torch.cuda.current_stream(dev))
        else:
            hosts, ev = results, None
        return hosts, ev, n_res, kinds

    def collect(self, pending):
        hosts, ev, n_res, kinds = pending
        if ev is not None:
            ev.synchronize()
        np = _np()
        arrays = [h.numpy() for h in hosts]
        if kinds is None:  # per residue
            return np.split(arrays[0], np.cumsum(n_res)[:-1], axis=1)
        out, k = [], 0
        pooled = arrays.pop(0) if not all(kinds) else None
        raw_parts = iter(np.split(arrays[0], np.cumsum([n for n, r in zip(n_res, kinds) if r])[:-1], axis=1)) if any(kinds) else None
        for d, r in enumerate(kinds):
            if r:
                out.append(next(raw_parts))
            else:
                out.append(pooled[:, k])
                k += 1
        return out


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
    """Item results -> rows. The chunks of a split sequence come back as residue vectors and are
    combined once all have arrived: concatenated (per-residue output), or pooled on the host over
    all the sequence's residues (every pooler exact, the median included)."""

    def __init__(self, seqs, poolers, layer_axis, store_dtype):
        self.seqs, self.poolers, self.layer_axis = seqs, tuple(poolers), layer_axis
        self.store_dtype = store_dtype
        self.partial: dict = {}
        self.seen: set = set()  # sequences without ids to write, already counted

    def raw_flags(self, items):
        """Per item: True when the runner must return its residue vectors (a chunk of a split
        sequence, pooled on the host)."""
        if self.poolers == ("none",):
            return None
        return [self.seqs[k].chunks > 1 for k, _, _ in items]

    def rows(self, items, arrays):
        """Rows of the items whose sequence still needs one. A sequence whose ids are all stored
        (a resumed job computes whole batches, so its items can come back) gives no row; its
        chunks are not kept (a split sequence stored before a resume has some chunks in batches
        that are not run again)."""
        np = _np()
        out, done_seqs = [], 0
        for (k, c, res), a in zip(items, arrays):
            s = self.seqs[k]
            if not s.ids:  # nothing to write: count it once
                if k not in self.seen:
                    self.seen.add(k)
                    done_seqs += 1
                continue
            if s.chunks > 1:
                parts = self.partial.setdefault(k, {})
                parts[c] = a
                if len(parts) < s.chunks:
                    continue
                chunks = [parts[i] for i in range(s.chunks)]
                del self.partial[k]
                a = np.concatenate(chunks, axis=1)  # (L, n, C): every residue of the sequence
                if self.poolers != ("none",):
                    a = pool_host(a, self.poolers)
            with np.errstate(over="ignore", invalid="ignore"):  # checked right below, with the reason
                stored = np.ascontiguousarray(a.astype(self.store_dtype, copy=False))
            if not np.isfinite(stored).all():
                raise self._not_finite(s, a)
            if not self.layer_axis:
                stored = stored[0]
            done_seqs += 1
            out.extend((i, s.sha1, len(s.seq), s.policy, stored) for i in s.ids)
        return out, done_seqs

    def _not_finite(self, s, computed) -> EmbedError:
        """NaN or inf is never stored: the rows before this batch stay, the job stops."""
        where = f"sequence {s.ids[0]!r} (line/record {s.line})"
        if _np().isfinite(computed).all():
            return EmbedError(
                f"anyattn.embed: the embedding of {where} exceeds {self.store_dtype}'s range (largest magnitude "
                f"{float(abs(computed).max()):.4g}); use --store-dtype float32 (store_dtype='float32')"
            )
        return EmbedError(
            f"anyattn.embed: the model's output for {where} is NaN or inf ({computed.dtype} after pooling); "
            "an overflow in half precision (try --dtype fp32 or bf16) or non-finite weights; nothing of this batch was stored"
        )


# ------------------------------------------------------------------------------ workers
def _worker(rank, device, source, dtype_name, backend, runner_kw, compile_, tasks, results, parent_pid, threads):
    try:
        if threads:
            torch.set_num_threads(threads)
        if torch.device(device).type == "cuda":
            torch.cuda.set_device(torch.device(device))
        model = _load_model(source, backend=backend)
        identity = _model_identity(model)  # float32 CPU weights, as the parent's (before any cast)
        model.to(device=device, dtype=_DTYPES[dtype_name]).eval()
        if compile_:
            _compile(model)
        runner = _Runner(model, device, **runner_kw)
        results.put(("ready", rank, identity))
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
            bi, toks, lengths, raw = task
            p = runner.submit(torch.from_numpy(toks), lengths, raw)
            if pending is not None:
                results.put(("batch", pending[0], runner.collect(pending[1])))
            pending = (bi, p)
        if pending is not None:
            results.put(("batch", pending[0], runner.collect(pending[1])))
        results.put(("done", rank, None))
    except BaseException:
        results.put(("error", rank, traceback.format_exc()))


def _run_local(model, device, fmt, runner_kw, todo, asm, store, prog, phases):
    """One device, in this process. Batch n+1 is submitted (launched) before batch n's results are
    collected and written, so the host work of one batch overlaps the device work of the next.
    ``phases`` (a dict) receives where the time went (see :class:`EmbedSummary`)."""
    runner = _Runner(model, device, **runner_kw)
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
            toks, lengths = _batch_tokens(fmt, batch)
            t1 = clock()
            handle = runner.submit(torch.from_numpy(toks), lengths, asm.raw_flags(batch))
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


def _run_workers(source, devs, dtype, backend, compile_, runner_kw, fmt, todo, asm, store, prog, identity):
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
    specials = len(fmt.prefix) + len(fmt.suffix)
    ntok = {bi: sum(len(r) + specials for _, _, r in b) for bi, b in todo}
    feed = iter(todo)

    def put_next():
        """Keep a bounded number of batches in flight (memory stays flat for millions of sequences)."""
        for bi, batch in feed:
            toks, lengths = _batch_tokens(fmt, batch)
            tasks.put((bi, toks, lengths, asm.raw_flags(batch)))
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
                    raise EmbedError(f"anyattn.embed: worker process(es) died: {', '.join(dead)}; the rows written so far stay, run the same command again to resume") from None
                continue
            if kind == "error":
                last = [ln for ln in payload.strip().splitlines() if ln.strip()][-1:] or ["?"]
                err = EmbedError(f"anyattn.embed: the worker on {devs[key]} failed: {last[0].strip()} (the rows written so far stay)")
                err.detail = payload  # the worker's traceback (anyattn --debug prints it)
                raise err
            if kind == "ready":
                if payload != identity:
                    raise EmbedError(f"anyattn.embed: the worker on {devs[key]} loaded a different model ({payload} vs {identity})")
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
            raise EmbedError(f"anyattn.embed: {len(remaining)} batch(es) never came back from the workers")
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
        for p in procs:
            p.join(timeout=10)
    return written
