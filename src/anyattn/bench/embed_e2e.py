"""The embed job end to end: ``anyattn embed`` over a FASTA of the ``bench model`` sequences.

    python -m anyattn.bench.embed_e2e --out DIR                      # CUDA: ESM2-650M shape, bf16, 1024 sequences
    python -m anyattn.bench.embed_e2e --family esmc --out DIR        # another family (what anyattn embed accepts)
    python -m anyattn.bench.embed_e2e --quick --out DIR              # CPU smoke test (tiny model, seconds)

Workload: the sequences of ``anyattn bench model`` with the same options (``workload.sequences``:
lognormal lengths, the ESM2 rows' residues), written to a FASTA file (ids ``seq0``..). Model: the
family's random weights (``families.py``: the same template as the family's ``bench model`` rows;
a head the template lacks is random too), saved with ``save_pretrained`` as the user's
checkpoint directory, in the run's dtype. Only public entry points are used: the ``anyattn
embed`` command line and ``anyattn.embed.embed`` / ``open_store``.

Rows (``embed.json``, the table on stdout):

    cli, first job       ``python -m anyattn embed FASTA --model CKPT --out A.sqlite --no-progress ...`` in a
                         new process: wall time from process start to exit (imports, model loading,
                         parsing, compilation, every batch, the store), and the job's own summary
                         lines (parsed: parse/load/run seconds, its seq/s and tok/s over run_s, the
                         run phases; the raw text is kept)
    embed(), warm job    ``anyattn.embed.embed(FASTA, model=CKPT, out=B.sqlite, ...)`` in this process
                         after a warm-up job over a few sequences of every length (kernels compiled,
                         per-shape plans made): the steady-state job, its EmbedSummary (parse_s,
                         load_s, run_s, elapsed_s, seq/s, tok/s, phases)

sequences/s and tokens/s (``<cls>``/``<eos>`` included, as the job counts them) are given over the
whole wall time (``e2e``) and over the job's ``run_s`` (batches, pooling, writes). Check: for
``--check-seqs`` sequences (longest, shortest, quantiles between), the stored mean embedding
against the float32 reference of the family (``families.Family.reference32``: HF's model where
transformers has it, TF32 off) pooled over the residues: relative L2 over those vectors <= max(1e-2,
2 x the same-dtype baseline's, e.g. HF sdpa in bf16), and the worst cosine similarity. A store
with a missing or wrong row fails the row (NaN numbers), and the run goes on.

``--budget-s``: the warm job is skipped when the first one left less than its time; SIGTERM /
Ctrl-C keep what was measured (the child process is killed).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import time

import torch

__all__ = ["main", "parse_summary"]

SCHEMA = "anyattn.bench.embed/2"


@dataclasses.dataclass
class EmbedRow:
    name: str
    status: str = "ok"  # ok | failed | skipped
    error: str = ""
    wall_s: float = float("nan")  # measured here: process start to exit (cli), or the embed() call
    seqs: int = 0
    tokens: int = 0
    seq_per_s_e2e: float = float("nan")  # seqs / wall_s
    tok_per_s_e2e: float = float("nan")
    run_s: float = float("nan")  # the job's own run time (batches, pooling, writes)
    seq_per_s_run: float = float("nan")
    tok_per_s_run: float = float("nan")
    parse_s: float = float("nan")
    load_s: float = float("nan")
    job_elapsed_s: float = float("nan")
    phases: dict = dataclasses.field(default_factory=dict)
    summary: dict = dataclasses.field(default_factory=dict)  # the job's summary (parsed text or EmbedSummary)
    stdout: str = ""
    command: str = ""
    store_rows: int = 0
    check: str = "-"  # ok | FAIL | error | -
    check_rel_l2: float = float("nan")
    check_cos_min: float = float("nan")
    check_bound: float = float("nan")
    note: str = ""


_NUM = r"([0-9][0-9,]*\.?[0-9]*(?:e[-+]?\d+)?)"


def _num(s: str) -> float:
    return float(s.replace(",", ""))


def parse_summary(text: str) -> dict:
    """The ``key  value`` lines ``anyattn embed`` prints (EmbedSummary.__str__), with the numbers
    of the known ones read out; unknown lines are kept as text. Lenient: a format change leaves
    fewer parsed numbers, never an exception."""
    out: dict = {}
    for line in text.splitlines():
        parts = re.split(r"\s{2,}", line.strip(), maxsplit=1)
        if len(parts) == 2 and parts[0] and not parts[0].startswith(("anyattn", "note", "warning")):
            out[parts[0]] = parts[1]
    nums: dict = {}
    for k in ("records", "ids (rows)", "unique sequences", "computed sequences", "tokens", "batches", "embedded (rows written)"):
        m = re.match(_NUM, out.get(k, ""))
        if m:
            nums[k] = _num(m.group(1))
    el = out.get("elapsed", "")
    for key, pat in (("elapsed_s", rf"^{_NUM}\s*s"), ("parse_s", rf"parse {_NUM}"), ("load_s", rf"load {_NUM}"), ("run_s", rf"run {_NUM}")):
        m = re.search(pat, el)
        if m:
            nums[key] = _num(m.group(1))
    th = out.get("throughput", "")
    for key, pat in (("seq_per_s", rf"{_NUM}\s*seq/s"), ("tok_per_s", rf"{_NUM}\s*tok/s")):
        m = re.search(pat, th)
        if m:
            nums[key] = _num(m.group(1))
    phases = {k: _num(v) for k, v in re.findall(rf"([a-z_]+) {_NUM} s", out.get("run phases", ""))}
    return {"lines": out, "numbers": nums, "phases": phases}


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _pooled(h_BSX, tokens, slicer) -> torch.Tensor:
    """Mean over each row's residues (the family's residue positions) -> (B, X) float64."""
    return torch.stack([h_BSX[i, slicer(n)].double().mean(0) for i, n in enumerate(tokens)])


class _Check:
    """The pooled float32 reference of a few sequences and the bound (module docstring)."""

    def __init__(self, fam, cfg, sd, picks, ids, device, dtype, hf_impls=("sdpa",)):
        from .family_base import Unavailable, _tf32_off
        from .workload import padded_inputs

        self.picks = picks
        tokens = [int(ids[i].numel()) for i in picks]
        tk = {i: int(ids[i].numel()) for i in picks}
        (x, am), = padded_inputs([picks], tk, ids, device, pad=fam.pad_id)
        self.x = (x, am)
        with torch.inference_mode(), _tf32_off():
            self.kind, self.name, ref = fam.reference32(cfg, sd, device)
            self.ref = _pooled(ref(self.x).float(), tokens, fam.residues)
        del ref
        self.base, self.base_name = float("nan"), ""
        for impl in [*hf_impls, None, "anyattn"]:  # None: the port
            try:
                with torch.inference_mode():
                    if impl == "anyattn":
                        m = fam.anyattn(cfg, sd, device, dtype, attn_backend="eager")
                        self.base_name, h = "anyattn eager", fam.output(fam.call_anyattn(m)(self.x))
                    elif impl is None:
                        p = fam.port(cfg, sd, device, dtype)
                        self.base_name, h = "the sdpa port", p(*self.x)
                    else:
                        hf = fam.hf(cfg, sd, device, dtype, impl)
                        self.base_name, h = f"HF {fam.hf_name}[{impl}]", fam.hf_output(hf(*self.x))
                self.base = self.rel(_pooled(h.float(), tokens, fam.residues))
                break
            except Unavailable:
                continue
        self.bound = max(1e-2, 2 * self.base) if self.base == self.base else 1e-2

    def rel(self, got: torch.Tensor) -> float:
        got = got.to(self.ref.device, torch.float64)
        if not torch.isfinite(got).all():
            return float("nan")
        return float((got - self.ref).norm() / self.ref.norm())

    def check(self, row: EmbedRow, store_path: str) -> None:
        from ..embed import open_store

        try:
            st = open_store(store_path)
            try:
                row.store_rows = len(st)
                got = torch.stack([torch.tensor(st.get(f"seq{i}").tolist(), dtype=torch.float64).reshape(-1) for i in self.picks])
            finally:
                st.close()
            row.check_rel_l2 = self.rel(got)
            row.check_cos_min = float(torch.nn.functional.cosine_similarity(got.to(self.ref.device), self.ref, dim=-1).min())
            row.check_bound = self.bound
            if row.check_rel_l2 <= self.bound:
                row.check = "ok"
            else:
                row.check = "FAIL"
                _fail(row, f"stored embeddings differ from the float32 reference: relative L2 {row.check_rel_l2:.3g} > {self.bound:.3g}")
        except Exception as e:  # noqa: BLE001 - a store that cannot be read fails the row
            row.check = "error"
            _fail(row, f"{type(e).__name__}: {str(e).strip()[:300]}")


def _fail(row: EmbedRow, msg: str) -> EmbedRow:
    row.status, row.error = "failed", msg
    for k in ("seq_per_s_e2e", "tok_per_s_e2e", "seq_per_s_run", "tok_per_s_run"):
        setattr(row, k, float("nan"))
    return row


def _rates(row: EmbedRow) -> None:
    if row.wall_s > 0:
        row.seq_per_s_e2e, row.tok_per_s_e2e = row.seqs / row.wall_s, row.tokens / row.wall_s
    if row.run_s > 0:
        row.seq_per_s_run, row.tok_per_s_run = row.seqs / row.run_s, row.tokens / row.run_s


def _cli_row(fasta, ckpt, store, args, n_seqs, n_tokens, timeout_s, env) -> EmbedRow:
    cmd = [sys.executable, "-m", "anyattn", "embed", fasta, "--model", ckpt, "--out", store, "--no-progress",
           "--max-tokens", str(args.max_tokens), "--dtype", args.dtype, "--pooling", "mean"] + (["--compile"] if args.compile else [])  # fmt: skip
    row = EmbedRow("cli, first job (new process)", command=shlex.join(["python3", *cmd[1:]]), seqs=n_seqs, tokens=n_tokens)
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        out, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        row.wall_s = time.perf_counter() - t0
        row.stdout = (out + err)[-4000:]
        return _fail(row, f"timed out after {timeout_s:.0f} s")
    except BaseException:  # Ctrl-C / SIGTERM: never leave the child on the GPU
        proc.kill()
        proc.communicate()
        raise
    row.wall_s = time.perf_counter() - t0
    row.stdout = (out + ("\n[stderr]\n" + err if err.strip() else ""))[-4000:]
    if proc.returncode != 0:
        return _fail(row, f"exit status {proc.returncode}: {(err.strip().splitlines() or ['?'])[-1][:300]}")
    s = parse_summary(out)
    row.summary, row.phases = s, s["phases"]
    n = s["numbers"]
    row.tokens = int(n.get("tokens", n_tokens))
    row.seqs = int(n.get("computed sequences", n_seqs))
    for k in ("parse_s", "load_s", "run_s"):
        setattr(row, k, n.get(k, float("nan")))
    row.job_elapsed_s = n.get("elapsed_s", float("nan"))
    _rates(row)
    return row


def _api_row(name, fasta, ckpt, store, args) -> EmbedRow:
    from ..embed import embed

    row = EmbedRow(name, command=f"anyattn.embed.embed({fasta!r}, model={ckpt!r}, out={store!r}, pooling='mean', dtype={args.dtype!r}, "
                                 f"max_tokens={args.max_tokens}, compile={args.compile}, progress=False)")  # fmt: skip
    t0 = time.perf_counter()
    s = embed(fasta, model=ckpt, out=store, pooling="mean", dtype=args.dtype, max_tokens=args.max_tokens, compile=args.compile,
              progress=False)  # fmt: skip
    row.wall_s = time.perf_counter() - t0
    d = dataclasses.asdict(s) if dataclasses.is_dataclass(s) else dict(vars(s))
    row.summary = {k: (list(v) if isinstance(v, tuple) else v) for k, v in d.items()}
    row.phases = dict(d.get("phases") or {})
    row.seqs, row.tokens = int(d.get("computed", 0)), int(d.get("tokens", 0))
    row.parse_s, row.load_s, row.run_s = (float(d.get(k, float("nan"))) for k in ("parse_s", "load_s", "run_s"))
    row.job_elapsed_s = float(d.get("elapsed_s", float("nan")))
    _rates(row)
    return row


def _f(x, fmt) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)


def table(doc: dict) -> str:
    head = (f"{'row':<34} {'wall s':>7} {'seq/s e2e':>9} {'tok/s e2e':>10} {'run s':>6} {'seq/s run':>9} {'tok/s run':>10} "
            f"{'parse s':>7} {'load s':>6} {'check':>6}  status")  # fmt: skip
    out = [head, "-" * len(head)]
    for r in doc["rows"]:
        out.append(
            f"{r['name']:<34} {_f(r['wall_s'], '.1f'):>7} {_f(r['seq_per_s_e2e'], ',.1f'):>9} {_f(r['tok_per_s_e2e'], ',.0f'):>10} "
            f"{_f(r['run_s'], '.2f'):>6} {_f(r['seq_per_s_run'], ',.1f'):>9} {_f(r['tok_per_s_run'], ',.0f'):>10} "
            f"{_f(r['parse_s'], '.2f'):>7} {_f(r['load_s'], '.1f'):>6} {r['check']:>6}  "
            + (r["status"] if r["status"] == "ok" else f"{r['status']}: {r['error'][:90]}")
        )  # fmt: skip
        if r["phases"]:
            out.append(f"{'':<36}phases: " + ", ".join(f"{k} {v:.2f} s" for k, v in r["phases"].items()))
    w = doc.get("workload", {})
    c = doc.get("check", {})
    out.append(f"{w.get('num_seqs')} sequences, {w.get('tokens')} tokens ({w.get('tokenization', '')}); check: mean embeddings of "
               f"{c.get('n')} sequences vs {c.get('reference')}, bound {_f(c.get('bound'), '.3g')} (baseline {c.get('baseline')})")  # fmt: skip
    out.append("e2e = over the wall time (cli: process start to exit); run = over the job's run_s (batches, pooling, writes)")
    return "\n".join(out)


def _write(out_dir, doc) -> None:
    if not out_dir:
        return
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "embed.json")
    with open(path + ".tmp", "w") as f:
        json.dump(doc, f, indent=1)
    os.replace(path + ".tmp", path)


def main(argv=None) -> int:
    from .families import FAMILIES, get
    from .kernels import _sigterm_as_interrupt
    from .workload import make_lengths, sequences, write_fasta

    p = argparse.ArgumentParser(prog="python -m anyattn.bench.embed_e2e", description=__doc__.split("\n")[0])
    p.add_argument("--family", default="esm2", choices=sorted(FAMILIES))
    p.add_argument("--preset", default=None, help="model shape (default: the family's; see bench model --help)")
    p.add_argument("--num-seqs", type=int, default=1024)
    p.add_argument("--median", type=float, default=320.0)
    p.add_argument("--sigma", type=float, default=0.58)
    p.add_argument("--min-len", type=int, default=30)
    p.add_argument("--max-len", type=int, default=1022)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-tokens", type=int, default=32768)
    p.add_argument("--dtype", default=None, choices=("bf16", "fp16", "fp32"), help="default bf16 on CUDA, fp32 on CPU")
    p.add_argument("--device", default=None, choices=("cuda", "cpu"))
    p.add_argument("--compile", action="store_true", help="anyattn embed --compile (compile_layers, batches padded to --max-tokens)")
    p.add_argument("--rows", default="cli,api", help="cli (a new process), api (embed() warm, in this process), comma-separated")
    p.add_argument("--check-seqs", type=int, default=8)
    p.add_argument("--warmup-seqs", type=int, default=48, help="the in-process warm-up job (every length range)")
    p.add_argument("--budget-s", type=float, default=None, help="skip the warm job if the time spent so far exceeds this")
    p.add_argument("--cli-timeout-s", type=float, default=600.0)
    p.add_argument("--work", default=None, help="directory for the FASTA, the checkpoint and the stores (default: a temp dir)")
    p.add_argument("--out", default=None, help="write embed.json here")
    p.add_argument("--quick", action="store_true", help="tiny model on the CPU, 24 sequences (a smoke test)")
    a = p.parse_args(argv)
    command = "python3 -m anyattn.bench.embed_e2e " + shlex.join(sys.argv[1:] if argv is None else list(argv))
    t_run = time.perf_counter()
    fam = get(a.family)
    device = a.device or ("cuda" if torch.cuda.is_available() and not a.quick else "cpu")
    a.dtype = a.dtype or ("bf16" if device == "cuda" else "fp32")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[a.dtype]
    if a.quick:
        cfg, preset = fam.quick_config(), "quick (tiny)"
        a.num_seqs, a.median, a.min_len, a.max_len, a.max_tokens = min(a.num_seqs, 24), 40.0, 8, 100, min(a.max_tokens, 512)
        a.warmup_seqs, a.check_seqs = min(a.warmup_seqs, 6), min(a.check_seqs, 4)
        torch.set_num_threads(min(2, torch.get_num_threads()))
    else:
        preset = a.preset or fam.default_preset
        cfg = fam.config(preset)
    rows_wanted = [r.strip() for r in a.rows.split(",") if r.strip()]
    _sigterm_as_interrupt()
    work = a.work or tempfile.mkdtemp(prefix="embed_e2e_")
    os.makedirs(work, exist_ok=True)
    lengths = make_lengths(a.num_seqs, a.median, a.sigma, a.min_len, a.max_len, a.seed)
    seqs = sequences(lengths, a.seed)
    ids = [torch.tensor(fam.encode(s), dtype=torch.long) for s in seqs]
    n_tokens = sum(int(t.numel()) for t in ids)
    fasta = os.path.join(work, "in.fasta")
    write_fasta(fasta, seqs)
    by_len = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    step = max(1, len(by_len) // max(1, a.warmup_seqs))
    warm_fasta = os.path.join(work, "warm.fasta")
    write_fasta(warm_fasta, [seqs[i] for i in by_len[::step]][: a.warmup_seqs], prefix="warm")
    k = max(1, min(a.check_seqs, len(seqs)))
    picks = list(dict.fromkeys(by_len[round(q * (len(by_len) - 1) / max(1, k - 1))] for q in range(k)))

    from .env import environment

    doc = {
        "schema": SCHEMA, "command": command, "meta": environment(device), "family": fam.name, "preset": preset,
        "workload": {"num_seqs": len(seqs), "tokens": n_tokens, "lengths": lengths, "median": a.median, "sigma": a.sigma,
                     "min_len": a.min_len, "max_len": a.max_len, "seed": a.seed, "max_tokens": a.max_tokens, "dtype": a.dtype,
                     "device": device, "compile": a.compile, "pooling": "mean",
                     "tokenization": "tokens as the job counts them (specials included)",
                     "sequences": "workload.sequences: the bench model rows' residues"},
        "model": {}, "check": {}, "rows": [], "notes": [], "complete": False, "interrupted": None, "elapsed_s": 0.0,
    }  # fmt: skip
    rows: list[EmbedRow] = []
    if os.environ.get("TORCHINDUCTOR_CACHE_DIR"):
        doc["notes"].append(f"TORCHINDUCTOR_CACHE_DIR={os.environ['TORCHINDUCTOR_CACHE_DIR']}: compiled kernels that earlier "
                            "runs wrote there are reused (the cli row is then a first job on a machine that compiled these "
                            "shapes before)")  # fmt: skip

    def flush():
        doc["rows"] = [dataclasses.asdict(r) for r in rows]
        doc["elapsed_s"] = round(time.perf_counter() - t_run, 1)
        _write(a.out, doc)

    try:
        t0 = time.perf_counter()
        sd = fam.template(cfg, device, dtype, a.seed)
        model = fam.checkpoint(cfg, sd, device, dtype)
        ckpt = os.path.join(work, "ckpt")
        model.save_pretrained(ckpt)
        size = sum(os.path.getsize(os.path.join(ckpt, f)) for f in os.listdir(ckpt))
        doc["model"] = {"class": type(model).__name__, "checkpoint": ckpt, "bytes": size, "save_s": round(time.perf_counter() - t0, 2),
                        "weights": f"{fam.name} template, seed {a.seed} (families.py)", "config": fam.describe(cfg)}  # fmt: skip
        del model
        if fam.output_name == "last hidden state":
            chk = _Check(fam, cfg, sd, picks, ids, device, dtype)
            doc["check"] = {"n": len(picks), "ids": [f"seq{i}" for i in picks], "reference": chk.name, "kind": chk.kind,
                            "baseline": chk.base_name, "baseline_rel_l2": chk.base, "bound": chk.bound,
                            "rule": "relative L2 of the stored mean embeddings vs the float32 reference's <= max(1e-2, 2 x the baseline's)"}  # fmt: skip
        else:
            chk = None
            doc["check"] = {"n": 0, "reference": f"none: {fam.name}'s benchmark output is {fam.output_name}"}
        del sd
        if device == "cuda":
            torch.cuda.empty_cache()
        flush()
        env = dict(os.environ)
        src = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")

        def finish(row: EmbedRow, store: str) -> None:
            if row.status == "ok":
                if row.seqs != len(seqs):
                    row.note = f"the job computed {row.seqs} of {len(seqs)} sequences"
                if chk is not None:
                    chk.check(row, store)
            rows.append(row)
            print(table({**doc, "rows": [dataclasses.asdict(row)]}).splitlines()[2], flush=True)
            flush()

        if "cli" in rows_wanted:
            store = os.path.join(work, "cli.sqlite")
            finish(_cli_row(fasta, ckpt, store, a, len(seqs), n_tokens, a.cli_timeout_s, env), store)
        if "api" in rows_wanted:
            name = "embed(), warm job (in-process)"
            if a.budget_s is not None and time.perf_counter() - t_run > a.budget_s:
                rows.append(EmbedRow(name, status="skipped", error=f"time budget (--budget-s {a.budget_s:g}) spent"))
                flush()
            else:
                store = os.path.join(work, "api.sqlite")
                try:
                    t0 = time.perf_counter()
                    _api_row("embed() warm-up job", warm_fasta, ckpt, os.path.join(work, "warm.sqlite"), a)
                    doc["notes"].append(f"in-process warm-up job ({min(a.warmup_seqs, len(seqs))} sequences of every length): "
                                        f"{time.perf_counter() - t0:.1f} s")  # fmt: skip
                    row = _api_row(name, fasta, ckpt, store, a)
                except Exception as e:  # noqa: BLE001
                    row = _fail(EmbedRow(name), f"{type(e).__name__}: {str(e).strip()[:300]}")
                finish(row, store)
        doc["complete"] = True
    except KeyboardInterrupt as e:
        doc["interrupted"] = str(e) or "KeyboardInterrupt"
    finally:
        flush()
    m = doc["meta"]
    print(f"\n{fam.name} {preset} {a.dtype} on {m.get('device_name')} | torch {m.get('torch')} | {doc['elapsed_s']} s")
    print(table(doc))
    for n in doc["notes"]:
        print(f"note: {n}")
    if a.out:
        print(f"wrote {os.path.join(a.out, 'embed.json')}")
    if doc["interrupted"]:
        return 130
    return 1 if any(r.status == "failed" for r in rows) else 0


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.default_int_handler)
    sys.exit(main())
