"""``anyattn bench model --family esmc|ankh|e1|dplm``: one protein family's throughput, anyattn's
model next to HF transformers' and a FastPLMs-style SDPA port, side by side in one process.

The ESM2 method (``model.py``), for another family (``families.py`` says what each one runs):

* Workload: the ESM2 benchmark's lengths and residues (``workload.sequences``: lognormal lengths,
  or ``--fasta``), tokenized the family's way; the same right-padded, length-sorted batches
  (rows x longest <= ``--max-tokens``, ``attention_mask`` marking the real tokens) for every row.
* Weights: ONE random state dict (``Family.template``, ``--seed``) loaded by every row, bf16 on
  CUDA.
* Rows, in this order (a run cut short keeps the first ones): ``anyattn plain`` (the model as a
  user calls it: ``model(input_ids, attention_mask)``, default settings), ``hf[sdpa]``,
  ``fastplms-sdpa`` (the port), ``anyattn compiled`` (``model.compile_layers()`` where the family
  has it; a skipped row naming the class where it does not), ``anyattn uncompiled``
  (``config.compile_layers = False`` where that setting exists), then the other ``--hf`` rows.
  A row that cannot exist here (no such HF model in this transformers, no port written) is
  ``skipped`` with the reason. Each row starts on a fresh model after ``torch.compiler.reset()``
  and ``anyattn.clear_caches()``.
* Timing (``model_rows.time_row``): the first whole-set pass of the fresh model (compilation and
  per-shape plans included), warm-up, then the median of ``--repeats`` whole-set passes.
* Check: a small padded batch of workload sequences against a float32 reference (TF32 off): HF's
  eager model where transformers has the network, else the port in float32, else anyattn's own
  eager backend in float32 (then marked not independent). Relative L2 of the family's output at
  real tokens <= max(1e-2, 2 x the error of the same-dtype baseline: HF sdpa, else the port,
  else anyattn eager). The port must match the reference within 1e-4 in float32 (when it IS the
  reference: anyattn's float32 eager model) before it is timed; HF rows and the port are checked
  before timing, anyattn rows right after (a check before would compile the model and hide the
  first-pass cost). A row outside the bound, or one that raises, is ``failed`` with NaN numbers
  and the run goes on.
* ``--budget-s``: rows not started by then are ``skipped`` ("time budget"); SIGTERM / Ctrl-C
  keeps every finished row in the files.

Output: ``model.json`` (schema ``anyattn.bench.model/1``, the ESM2 keys plus ``family``;
``reference`` adds ``kind``, ``independent``, ``baseline``) and ``model.png`` with ``--out``; the
table on stdout.
"""

from __future__ import annotations

import dataclasses
import statistics
import time

import torch

from . import UsageError
from .families import get
from .family_base import Unavailable, _tf32_off
from .model_rows import Reference, Row, fail, time_row
from .workload import make_batches, padded_inputs, sequences

__all__ = ["run", "table"]

SCHEMA = "anyattn.bench.model/1"
PORT32_TOL = 1e-4


class FamilyReference(Reference):
    """The check of a family's rows (see the module docstring); ``check`` and ``rel_l2`` are
    ``model_rows.Reference``'s."""

    def __init__(self, fam, cfg, sd, ids_BS, am_BS, device, dtype, *, hf_impls=(), port=True):
        self.ids, self.am = ids_BS.to(device), am_BS.to(device)
        self.keep = self.am.bool()
        self.port32, self.port32_vs, self.port32_error = float("nan"), "", ""
        with _tf32_off():
            self.kind, self.name, ref32 = fam.reference32(cfg, sd, device)
            self.ref = self.last_hidden(ref32)
            del ref32
            if port:
                sd32 = {k: v.float() for k, v in sd.items()}
                try:
                    p32 = fam.port(cfg, sd32, device, torch.float32)
                    if self.kind == "port":  # the reference itself: compare with anyattn's float32 eager model
                        m = fam.anyattn(cfg, sd32, device, torch.float32, attn_backend="eager")
                        call = fam.call_anyattn(m)
                        self.port32_vs = "anyattn eager float32"
                        self.port32 = _rel(self.last_hidden(lambda x: p32(*x)), self.last_hidden(lambda x: fam.output(call(x))))
                        del m
                    else:
                        self.port32_vs = "reference"
                        self.port32 = self.rel_l2(self.last_hidden(lambda x: p32(*x)))
                    del p32
                except Unavailable:
                    pass
                except Exception as e:  # noqa: BLE001 - the port row reports it
                    self.port32_error = f"{type(e).__name__}: {str(e).strip()[:300]}"
        self.independent = self.kind != "anyattn"
        self.base, self.base_name, tried = float("nan"), "", []
        flat = [i for spec in hf_impls for i in spec.split("|")]
        for impl in [*flat, None, "anyattn"]:  # None: the port
            try:
                if impl == "anyattn":
                    m = fam.anyattn(cfg, sd, device, dtype, attn_backend="eager")
                    call, self.base_name = fam.call_anyattn(m), f"anyattn eager, {_dt(dtype)}"
                    self.base = self.rel_l2(self.last_hidden(lambda x: fam.output(call(x))))
                elif impl is None:
                    p = fam.port(cfg, sd, device, dtype)
                    self.base_name = f"the sdpa port, {_dt(dtype)}"
                    self.base = self.rel_l2(self.last_hidden(lambda x: p(*x)))
                else:
                    hf = fam.hf(cfg, sd, device, dtype, impl)
                    self.base_name = f"HF {fam.hf_name}[{impl}], {_dt(dtype)}"
                    self.base = self.rel_l2(self.last_hidden(lambda x: fam.hf_output(hf(*x))))
                break
            except Exception as e:  # noqa: BLE001 - Unavailable, or a baseline that fails here: try the next
                tried.append(f"{impl or 'port'}: {type(e).__name__}: {str(e).strip()[:200]}")
                self.base, self.base_name = float("nan"), ""
        self.baseline_skipped = tried
        self.bound = max(1e-2, 2 * self.base) if self.base == self.base else 1e-2


def _rel(h, ref) -> float:
    if not torch.isfinite(h).all():
        return float("nan")
    return float((h - ref).norm() / ref.norm())


def _dt(dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _check_batch(fam, tokens, ids, n: int = 4):
    """(input_ids, attention_mask) of ``n`` workload sequences (longest, quartiles, shortest),
    right-padded with the family's padding id; one <mask> in the second where the family has a
    token-dropout path."""
    order = sorted(range(len(tokens)), key=lambda i: -tokens[i])
    pick = list(dict.fromkeys(order[min(len(order) - 1, round(q * (len(order) - 1)))] for q in (0, 1 / 3, 2 / 3, 1)))[:n]
    (x, am), = padded_inputs([pick], tokens, ids, "cpu", pad=fam.pad_id)
    if fam.mask_id is not None and len(pick) > 1 and tokens[pick[1]] > 3:
        x[1, 1] = fam.mask_id
    return x, am


def run(opts: dict, *, command: str = "", out_dir: str | None = None, log=print, write=None) -> dict:
    """``write(out_dir, doc, plot_it=...)``: how results are saved (bench/model.py passes its own)."""
    import transformers

    from .env import environment, version
    from .model_rows import _PEAK_BF16, _fresh

    fam = get(opts["family"])
    device, dtype, cfg = opts["device"], opts["dtype"], opts["config"]
    t_run = time.perf_counter()
    notes: list[str] = [f"transformers {transformers.__version__}", *opts.get("notes", [])]
    lengths = opts["lengths"]
    seqs = sequences(lengths, opts["seed"])
    ids = [torch.tensor(fam.encode(s), dtype=torch.long) for s in seqs]
    tokens = [int(t.numel()) for t in ids]
    real = sum(tokens)
    flops = fam.flops(cfg, tokens)
    peak = opts["peak_tflops"]
    if peak is None and torch.device(device).type == "cuda":
        name = torch.cuda.get_device_name()
        peak = next((v for k, v in _PEAK_BF16.items() if k in name), None)
        if peak is None:
            notes.append(f"MFU not computed: no bf16 peak known for {name!r} (give --peak-tflops)")
    max_tokens = opts["max_tokens"]
    if max(tokens) > max_tokens:
        raise UsageError(f"--max-tokens {max_tokens} is smaller than the longest sequence ({max(tokens)} tokens)")
    padded_b = make_batches(tokens, max_tokens, padded=True)
    workload = {
        "family": fam.name, "preset": opts["preset"], "config": fam.describe(cfg), "dtype": _dt(dtype), "device": device,
        "source": opts["source"], "num_seqs": len(lengths), "lengths": lengths, "token_lengths": tokens, "real_tokens": real,
        "median_len": statistics.median(lengths), "mean_len": sum(lengths) / len(lengths), "max_tokens": max_tokens,
        "batches_padded": len(padded_b), "padded_tokens_hf": sum(len(b) * tokens[b[0]] for b in padded_b),
        "flops_total": flops, "gflop_per_token": flops / real / 1e9, "peak_tflops": peak, "flop_formula": fam.flop_formula,
        "tokenization": {"esm2": "<cls> seq <eos>", "esmc": "<cls> seq <eos>", "dplm": "<cls> seq <eos>",
                         "e1": "<bos> 1 seq 2 <eos>", "ankh": "seq </s> (stand-in residue ids 3..22)"}.get(fam.name, ""),
        "weights": f"{fam.name} template (families.py), seed {opts['seed']}, one state dict for every row",
    }  # fmt: skip
    doc = {
        "schema": SCHEMA, "family": fam.name, "command": command,
        "meta": {**environment(device), "transformers": version("transformers")}, "workload": workload, "reference": {},
        "results": [], "goal": {}, "notes": notes, "complete": False, "interrupted": None, "elapsed_s": 0.0,
    }  # fmt: skip
    rows: list[Row] = []

    def flush(final=False):
        doc["results"] = [dataclasses.asdict(r) for r in rows]
        doc["goal"] = ratio_line(doc["results"])
        doc["elapsed_s"] = round(time.perf_counter() - t_run, 1)
        if out_dir:
            if write is not None:
                write(out_dir, doc, plot_it=final)

    def add(row: Row) -> None:
        rows.append(row)
        log(_line(row))
        flush()

    log(
        f"{fam.name} {opts['preset']} ({_shape(cfg)}), {workload['dtype']} on {device}: {len(lengths)} sequences, {real} real "
        f"tokens, median {workload['median_len']} residues, {len(padded_b)} padded batches of <= {max_tokens} tokens, "
        f"{workload['gflop_per_token']:.3f} GFLOP/token"
    )
    budget = opts.get("budget_s")

    def over_budget(row: Row) -> bool:
        if budget is not None and time.perf_counter() - t_run > budget:
            row.status, row.error = "skipped", f"time budget (--budget-s {budget:g}) spent before this row started"
            return True
        return False

    try:
        sd = fam.template(cfg, device, dtype, opts["seed"])
        x, am = _check_batch(fam, tokens, ids)
        # "a|b": the first of a, b that this transformers builds for the model (e.g. sdpa|eager)
        hf_impls = [h for h in opts["hf"] if h.split("|")[0] == "sdpa"] + [h for h in opts["hf"] if h.split("|")[0] != "sdpa"]
        ref = FamilyReference(fam, cfg, sd, x, am, device, dtype, hf_impls=hf_impls, port="port" in opts["rows"])
        doc["reference"] = {
            "batch": f"{x.shape[0]} workload sequences (token lengths {am.sum(-1).tolist()})"
            + (", one <mask> token" if fam.mask_id is not None else ""),
            "output": fam.output_name, "kind": ref.kind, "reference": ref.name, "independent": ref.independent,
            "baseline": ref.base_name, "baseline_rel_l2": ref.base, "hf_sdpa_rel_l2": ref.base if "sdpa]" in ref.base_name else float("nan"),
            "bound": ref.bound, "rule": f"relative L2 of the {fam.output_name} at real tokens <= max(1e-2, 2 x the baseline's)",
            "port_float32_rel_l2": ref.port32, "port_float32_vs": ref.port32_vs, "baselines_not_used": ref.baseline_skipped,
        }  # fmt: skip
        if not ref.independent:
            notes.append(f"{fam.name}: no independent reference here; rows are checked against anyattn's float32 eager model")
        padded = padded_inputs(padded_b, tokens, ids, device, pad=fam.pad_id)
        run_args = (device, real, flops, peak, opts["max_passes"], opts["repeats"])
        ctx = dict(fam=fam, cfg=cfg, sd=sd, ref=ref, padded=padded, opts=opts, run_args=run_args, fresh=_fresh)

        order = [("anyattn", "plain")] + [("hf", h) for h in hf_impls[:1]] + [("port", None), ("anyattn", "compiled"),
                 ("anyattn", "uncompiled")] + [("hf", h) for h in hf_impls[1:]]  # fmt: skip
        for what, arg in order:
            if what == "anyattn" and arg in opts["rows"]:
                row = Row(f"anyattn {arg}", "anyattn", "auto", arg == "compiled")
                add(row if over_budget(row) else _anyattn_row(row, arg, ctx))
            elif what == "hf":
                first = arg.split("|")[0]
                row = Row(f"hf[{first}]", "hf", first, False, attn_implementation=first, variant="inputs=padded")
                add(row if over_budget(row) else _hf_row(row, arg, ctx))
            elif what == "port" and "port" in opts["rows"]:
                row = Row("fastplms-sdpa", "port", "sdpa", False, attn_implementation="sdpa",
                          variant="uncompiled port (bench/family_ports.py), padded batches, SDPA")  # fmt: skip
                add(row if over_budget(row) else _port_row(row, ctx))
        doc["complete"] = True
    except KeyboardInterrupt as e:  # Ctrl-C or SIGTERM (timeout): keep what was measured
        doc["interrupted"] = str(e) or "KeyboardInterrupt"
    finally:
        flush(final=True)
    return doc


def _shape(cfg) -> str:
    L = getattr(cfg, "num_hidden_layers", None) or getattr(cfg, "num_layers", None)
    C = getattr(cfg, "hidden_size", None) or getattr(cfg, "d_model", None)
    H = getattr(cfg, "num_attention_heads", None) or getattr(cfg, "num_heads", None)
    return f"{L} layers, C={C}, H={H}"


def _anyattn_row(row: Row, kind: str, c: dict) -> Row:
    fam, opts = c["fam"], c["opts"]
    device = opts["device"]
    model = None
    try:
        c["fresh"](device)
        model = fam.anyattn(c["cfg"], c["sd"], device, opts["dtype"])
        cls = type(model).__name__
        has_setting = hasattr(model.config, "compile_layers")
        if kind == "compiled":
            if not hasattr(model, "compile_layers"):
                row.status, row.error = "skipped", f"{cls} has no compile_layers() in this tree: its plain call is the uncompiled model"
                return row
            if opts["no_compile"]:
                row.status, row.error = "skipped", opts["no_compile"]
                return row
            model.compile_layers()
        elif kind == "uncompiled":
            if not has_setting:
                row.status, row.error = "skipped", f"{cls} has no config.compile_layers: 'anyattn plain' is already uncompiled"
                return row
            model.config.compile_layers = False
        setting = getattr(model.config, "compile_layers", "<no such setting>")
        row.variant = (f"{cls}(input_ids, attention_mask) on the padded batches; attn_backend={model.config.attn_backend!r}, "
                       f"config.compile_layers={setting!r}" + ("; model.compile_layers()" if kind == "compiled" else ""))  # fmt: skip
        call = fam.call_anyattn(model)
        time_row(row, call, c["padded"], *c["run_args"])
        c["ref"].check(row, lambda x: fam.output(call(x)))  # after timing: see the module docstring
    except Exception as e:  # noqa: BLE001 - a failing row is reported and the run goes on
        fail(row, e, device)
    finally:
        del model
    return row


def _hf_row(row: Row, spec: str, c: dict) -> Row:
    """``spec``: an attn_implementation, or alternatives "a|b" (the first one transformers builds
    for this model runs; the row is named after it and its note says what was refused)."""
    fam, opts = c["fam"], c["opts"]
    device = opts["device"]
    try:
        c["fresh"](device)
        refused = []
        for impl in spec.split("|"):
            try:
                hf = fam.hf(c["cfg"], c["sd"], device, opts["dtype"], impl)
                break
            except Unavailable as e:
                refused.append(str(e))
        else:
            raise Unavailable("; ".join(refused))
        if refused:
            row.name, row.backend, row.attn_implementation = f"hf[{impl}]", impl, impl
            row.note = "instead of " + "; ".join(refused)
        row.variant = f"HF {fam.hf_name}(input_ids, attention_mask), attn_implementation={impl!r}, padded batches"
        if c["ref"].check(row, lambda x: fam.hf_output(hf(*x))):
            time_row(row, lambda x: hf(*x), c["padded"], *c["run_args"])
        del hf
    except Unavailable as e:
        row.status, row.error = "skipped", str(e)
    except Exception as e:  # noqa: BLE001
        fail(row, e, device)
    return row


def _port_row(row: Row, c: dict) -> Row:
    fam, opts, ref = c["fam"], c["opts"], c["ref"]
    device = opts["device"]
    try:
        c["fresh"](device)
        port = fam.port(c["cfg"], c["sd"], device, opts["dtype"])
        if ref.port32_error:
            raise RuntimeError(f"the sdpa port in float32 raised: {ref.port32_error}")
        if not ref.port32 <= PORT32_TOL:  # in float32 the port must be the network exactly
            raise RuntimeError(f"the sdpa port in float32 differs from the {ref.port32_vs or 'reference'}: relative L2 "
                               f"{ref.port32:.3g} > {PORT32_TOL:g}")  # fmt: skip
        if ref.check(row, lambda x: port(*x)):
            time_row(row, lambda x: port(*x), c["padded"], *c["run_args"])
        del port
    except Unavailable as e:
        row.status, row.error = "skipped", str(e)
    except Exception as e:  # noqa: BLE001
        fail(row, e, device)
    return row


# ---------------------------------------------------------------------------------------------
# output


def _ok(res, name) -> float:
    return next((r["tokens_per_s"] for r in res if r["name"] == name and r["status"] == "ok"), float("nan"))


def _hf_best(res) -> tuple[str, float]:
    """hf[sdpa] if it ran, else the first HF row that did."""
    v = _ok(res, "hf[sdpa]")
    if v == v:
        return "hf[sdpa]", v
    r = next((r for r in res if r["kind"] == "hf" and r["status"] == "ok"), None)
    return (r["name"], r["tokens_per_s"]) if r else ("hf[sdpa]", float("nan"))


def ratio_line(res) -> dict:
    """anyattn plain over HF's (else the port's) warm tokens/s. No target is set for these families."""
    plain = _ok(res, "anyattn plain")
    name, base = _hf_best(res)
    if base != base:
        name, base = "fastplms-sdpa", _ok(res, "fastplms-sdpa")
    ratio = plain / base
    return {"what": f"anyattn plain / {name} warm tokens/s", "value": ratio, "target": None, "met": None}


def _line(r: Row) -> str:
    from .model_rows import _line as esm2_line

    return esm2_line(r)


def table(doc: dict) -> str:
    from .model_rows import _f

    res = doc["results"]
    hf_name, hf = _hf_best(res)
    port = _ok(res, "fastplms-sdpa")
    head = (f"{'row':<22} {'tokens/s':>10} {'1st pass':>10} {'x HF':>6} {'x port':>6} {'TFLOP/s':>8} {'MFU':>6} {'peak GiB':>8} "
            f"{'compile s':>9} {'check':>6}  status")  # fmt: skip
    out = [head, "-" * len(head)]
    for r in res:
        ok = r["status"] == "ok"
        out.append(
            f"{r['name']:<22} {_f(r['tokens_per_s'], ',.0f'):>10} {_f(r.get('cold_pass_tokens_per_s'), ',.0f'):>10} "
            f"{_f(r['tokens_per_s'] / hf if ok else float('nan'), '.2f'):>6} {_f(r['tokens_per_s'] / port if ok else float('nan'), '.2f'):>6} "
            f"{_f(r['tflops'], '.1f'):>8} {_f(r['mfu'] * 100, '.1f') + '%' if r['mfu'] == r['mfu'] else '-':>6} "
            f"{_f(r['peak_mem_gib'], '.2f'):>8} {_f(r['compile_s'], '.1f'):>9} {r.get('check', '-'):>6}  "
            + (r["status"] if ok else f"{r['status']}: {r['error'][:100]}")
        )  # fmt: skip
    g = doc.get("goal") or ratio_line(res)
    ref = doc.get("reference") or {}
    out.append(f"{g['what']} = {_f(g['value'], '.2f')}x  (x HF: over {hf_name}; x port: over fastplms-sdpa)")
    if ref:
        out.append(f"check: {ref.get('output')} vs {ref.get('reference')}; bound {_f(ref.get('bound'), '.3g')} "
                   f"(baseline {ref.get('baseline')}: {_f(ref.get('baseline_rel_l2'), '.3g')}); port float32 vs "
                   f"{ref.get('port_float32_vs') or '-'}: {_f(ref.get('port_float32_rel_l2'), '.2g')}")  # fmt: skip
    out.append("1st pass = the first whole-set pass of a fresh model, compilation included; tokens/s = median warm pass")
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------
# options


ESM2_ONLY = ("backends", "compile", "compile_mode", "tune", "fuse_qkv", "pack", "inputs")
_ESM2_ONLY_DEFAULTS = {"backends": None, "compile": "off", "compile_mode": None, "tune": False, "fuse_qkv": False, "pack": "auto",
                       "inputs": "packed"}  # fmt: skip


def opts_from_args(a) -> dict:
    """The options of a ``--family`` run (not esm2); refuses the ESM2-only ones."""
    from .model_rows import ROWS
    from .workload import fasta_lengths, make_lengths

    fam = get(a.family)
    for k in ESM2_ONLY:
        if getattr(a, k, _ESM2_ONLY_DEFAULTS[k]) != _ESM2_ONLY_DEFAULTS[k]:
            raise UsageError(f"--{k.replace('_', '-')} applies to --family esm2, not --family {fam.name}")
    device = a.device or ("cuda" if torch.cuda.is_available() and not a.quick else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: CUDA is not available")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[a.dtype or ("bf16" if device == "cuda" else "fp32")]
    if a.quick:
        cfg, preset = fam.quick_config(), "quick (tiny)"
        a.num_seqs, a.median, a.min_len, a.max_len = min(a.num_seqs, 24), 40.0, 8, 100
        a.max_tokens, a.max_warmup_passes = min(a.max_tokens, 512), min(a.max_warmup_passes, 3)
    else:
        preset = a.preset or fam.default_preset
        try:
            cfg = fam.config(preset)
        except ValueError as e:
            raise UsageError(f"--preset {preset!r} for --family {fam.name}: {e}; presets: {', '.join(fam.presets)}") from None
    for name in ("num_seqs", "min_len", "max_len", "max_tokens", "repeats"):
        if getattr(a, name) <= 0:
            raise UsageError(f"--{name.replace('_', '-')} must be positive")
    if a.min_len > a.max_len:
        raise UsageError("--min-len must be <= --max-len")
    if a.budget_s is not None and a.budget_s <= 0:
        raise UsageError("--budget-s must be positive")
    if a.fasta:
        lengths, source = fasta_lengths(a.fasta, a.min_len, a.max_len), f"fasta:{a.fasta} (lengths; residues from --seed)"
    else:
        lengths = make_lengths(a.num_seqs, a.median, a.sigma, a.min_len, a.max_len, a.seed)
        source = f"lognormal(median={a.median}, sigma={a.sigma}) clipped to [{a.min_len}, {a.max_len}], seed {a.seed}"
    rows = [] if a.rows.strip().lower() == "none" else [r.strip() for r in a.rows.split(",") if r.strip()]
    bad = [r for r in rows if r not in ROWS]
    if bad:
        raise UsageError(f"--rows: unknown {bad}; expected a comma list of {list(ROWS)} or 'none'")
    hf = [] if a.hf.strip().lower() == "none" else [h.strip() for h in a.hf.split(",") if h.strip()]
    no_compile = "--quick: no torch.compile (it takes minutes on a CPU); run without --quick" if a.quick else ""
    return dict(
        family=fam.name, device=device, dtype=dtype, config=cfg, preset=preset, lengths=lengths, source=source, seed=a.seed,
        max_tokens=a.max_tokens, rows=rows, hf=hf, peak_tflops=a.peak_tflops, max_passes=max(2, a.max_warmup_passes),
        repeats=a.repeats, no_compile=no_compile, notes=[], budget_s=a.budget_s,
    )  # fmt: skip
