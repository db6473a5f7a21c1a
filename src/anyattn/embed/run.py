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
from .model import _DTYPES, _compile, _config, _encoder, _load_model, _model_identity, _tokenizer
from .store import SQLiteStore, _np


class EmbedError(AnyAttnError, RuntimeError):
    """The job failed while running (a worker died, a non-finite embedding); the rows committed
    before it stay in the store, and running the same job again resumes."""


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
        ids = layout.host_to_device(ids, dev)
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
            idx = layout.host_to_device(torch.cat([torch.arange(s + 1, s + 1 + n) for s, n in zip(starts, n_res)]), dev)
            res = h_LTC[:, idx].to(self.store_dtype)
        elif self.pooling == "cls":
            res = h_LTC[:, layout.host_to_device(torch.tensor(starts), dev)].float()
        else:
            M = max(n_res)
            ar = torch.arange(M)
            idx_DM = layout.host_to_device((torch.tensor(starts)[:, None] + 1 + ar[None]).clamp_max(T - 1), dev)
            valid_DM = layout.host_to_device(ar[None] < torch.tensor(n_res)[:, None], dev)
            g = h_LTC[:, idx_DM].float()  # (L, D, M, C)
            if self.pooling == "mean":
                cnt = layout.host_to_device(torch.tensor(n_res, dtype=torch.float32), dev)
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
        self.seen: set = set()  # sequences without ids to write, already counted

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
