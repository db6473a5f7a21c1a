"""``anyattn bench model``: end-to-end ESM2 throughput, anyattn's model next to what users run.

Workload (``workload.py``): ``--num-seqs`` protein lengths from a lognormal (``--median``,
``--sigma``, seed) clipped to ``--min-len``..``--max-len``, or read from ``--fasta``; every
sequence is ``<cls> residues <eos>`` (length + 2 tokens; "real tokens" count both). Random
weights of a published shape (``--preset``, default esm2_t33_650M): ONE state dict (HF
``EsmModel``'s initializer, ``--seed``) that every row loads, bf16 on CUDA. The same padded,
length-sorted batches (rows x longest <= ``--max-tokens``, ``attention_mask`` marking the real
tokens) go to every row below, one process, in the order plain, hf[sdpa], compiled, port,
uncompiled, per-backend rows, the other HF rows (the goal's two rows first: a run cut short by its
time limit keeps them):

    anyattn plain       ESM2Model(config) called as a user would: model(input_ids, attention_mask),
                        default settings (attn_backend "auto", pack_padded "auto", and
                        config.compile_layers "auto" where this tree has it)
    anyattn compiled    the same after model.compile_layers()
    anyattn uncompiled  config.compile_layers = False where the attribute exists (else the
                        default, which is uncompiled on trees without it)
    anyattn[B]...       --backends B: the per-backend rows of earlier rounds (packed rows of exactly
                        --max-tokens positions with a SeqInfo by default; --compile, --tune, ...)
    hf[sdpa], hf[eager] HF transformers EsmModel (--hf)
    fastplms-sdpa       a FastPLMs-style uncompiled port (``sdpa_port.py``): padded batches,
                        HF's rotary, F.scaled_dot_product_attention with a boolean key mask

Per row, on a fresh model: the FIRST whole-set pass (``cold_pass_tokens_per_s``: compilation,
per-shape plans and lazy initialisation included; ``first_call_s`` is its first batch), warm-up
passes over a few batches until two agree within 5%, then ``--repeats`` whole-set passes, each
synchronized at its end: real tokens/s of the median pass (every pass in ``times_s``), MFU, peak
memory. Every anyattn row starts with ``torch.compiler.reset()`` and ``anyattn.clear_caches()``;
inductor's own caches (in memory and on disk) stay, so a compiled row after the first one pays
less than a cold process would (run it alone for its cold number).

Check: a small padded batch from the workload (with one <mask>, so token dropout runs) against
HF's float32 eager output (``model_rows.Reference``): relative L2 of the last hidden state at the
real tokens <= max(1e-2, 2 x HF sdpa's in the run's dtype). The port is checked before it is
timed (and in float32 it must match HF to 1e-4: it is ESM2 exactly); HF rows before timing;
anyattn rows right AFTER their timed passes, on the same model object, because a check before
would compile the model and hide the first-pass cost. A row outside the bound reports NaN.

FLOPs (:func:`anyattn.models.esm2_flops`): per sequence of n tokens ``2*n*L*(4*C^2 + 2*C*F) +
4*n^2*L*C``; ~1.38 GFLOP per token for the 650M shape at median 320. MFU divides by the device's
dense bf16 peak (H100/H200 SXM: 989 TFLOP/s; ``--peak-tflops`` overrides).

Other families (``--family esmc|ankh|e1|dplm``, default esm2: this module's path, unchanged) run
the same method through ``family_run.py`` (its docstring; ``families.py`` says what each family
compares).

Building the options imports nothing beyond torch: ``anyattn bench model --help`` works without
transformers; running it without transformers says ``pip install 'anyattn[models]'``.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import statistics
import time

import torch

from . import UsageError
from .model_rows import _PEAK_BF16, ROWS, Reference, Row, _f, _fresh, _line, anyattn_model, fail, hf_model, template_state_dict, time_row
from .workload import PAD, fasta_lengths, make_batches, make_lengths, padded_inputs, token_ids

__all__ = ["HELP", "ROWS", "add_arguments", "make_batches", "make_lengths", "run", "run_from_args", "table"]

SCHEMA = "anyattn.bench.model/1"
HELP = ("end-to-end protein-model throughput (tokens/s, MFU): anyattn's plain/compiled model vs HF transformers and an SDPA "
        "port (ESM2 by default; --family esmc, ankh, e1, dplm)")
FAMILY_NAMES = ("esm2", "esmc", "ankh", "e1", "dplm")  # families.FAMILIES (kept here: --help imports no transformers)
_PRESETS_HELP = ("esm2: esm2_t6_8M, esm2_t12_35M, esm2_t30_150M, esm2_t33_650M (default), esm2_t36_3B, esm2_t48_15B; "
                 "esmc: esmc_300m (default), esmc_600m, esmc_6b; ankh: ankh_base (default), ankh_large, ankh2_large; "
                 "e1: E1-300m (default), E1-600m; dplm: dplm_150m (default), dplm_650m, dplm_3b")
GOAL = 2.0  # issue 15: the plain call >= 2x HF sdpa warm

_MISSING = "anyattn bench model needs transformers (the ESM2 model and the HF baseline): pip install 'anyattn[models]'"

_token_ids, _padded_inputs = token_ids, padded_inputs  # the names benchmarks/*.py import


# ---------------------------------------------------------------------------------------------
# the run


def _available(names) -> list[str]:
    import anyattn

    avail = {b.name for b in anyattn.backends() if b.available} | {"auto"}
    return [n for n in names if n in avail]


def _check_batch(tokens, ids, n: int = 4):
    """(input_ids, attention_mask) of ``n`` workload sequences (longest, quartiles, shortest),
    right-padded, with one <mask> token in the second sequence."""
    order = sorted(range(len(tokens)), key=lambda i: -tokens[i])
    pick = list(dict.fromkeys(order[min(len(order) - 1, round(q * (len(order) - 1)))] for q in (0, 1 / 3, 2 / 3, 1)))[:n]
    (x, am), = padded_inputs([pick], tokens, ids, "cpu")
    if len(pick) > 1 and tokens[pick[1]] > 3:
        x[1, 1] = 32  # <mask> (ESM alphabet)
    return x, am



def run(opts: dict, *, command: str = "", out_dir: str | None = None, log=print) -> dict:
    try:
        from ..models import esm2_flops
    except ImportError as e:
        raise ImportError(_MISSING) from e
    if importlib.util.find_spec("transformers") is None:
        raise ImportError(_MISSING)
    import anyattn
    import transformers

    from .env import environment, version

    device, dtype = opts["device"], opts["dtype"]
    t_run = time.perf_counter()
    cfg = opts["config"]
    notes: list[str] = [f"transformers {transformers.__version__}", *opts.get("notes", [])]
    lengths = opts["lengths"]
    tokens = [n + 2 for n in lengths]  # <cls> ... <eos>
    real = sum(tokens)
    flops = float(esm2_flops(cfg, tokens))
    peak = opts["peak_tflops"]
    if peak is None and torch.device(device).type == "cuda":
        name = torch.cuda.get_device_name()
        peak = next((v for k, v in _PEAK_BF16.items() if k in name), None)
        if peak is None:
            notes.append(f"MFU not computed: no bf16 peak known for {name!r} (give --peak-tflops)")
    if peak is not None and dtype not in (torch.bfloat16, torch.float16):
        notes.append("MFU is relative to the bf16 dense peak although this run is not bf16")
    max_tokens = opts["max_tokens"]
    if max(tokens) > max_tokens:
        raise UsageError(f"--max-tokens {max_tokens} is smaller than the longest sequence ({max(tokens)} tokens)")
    ids = token_ids(tokens, opts["seed"])
    packed_b = make_batches(tokens, max_tokens, padded=False)
    padded_b = make_batches(tokens, max_tokens, padded=True)
    workload = {
        "preset": opts["preset"], "config": cfg.to_hf_dict(), "dtype": str(dtype).removeprefix("torch."),
        "device": device, "source": opts["source"], "num_seqs": len(lengths), "lengths": lengths,
        "token_lengths": tokens, "real_tokens": real, "median_len": statistics.median(lengths),
        "mean_len": sum(lengths) / len(lengths), "max_tokens": max_tokens, "batches_packed": len(packed_b),
        "batches_padded": len(padded_b), "padded_tokens_hf": sum(len(b) * tokens[b[0]] for b in padded_b),
        "flops_total": flops, "gflop_per_token": flops / real / 1e9, "peak_tflops": peak,
        "flop_formula": "per sequence of n tokens: 2*n*L*(4*C^2 + 2*C*F) + 4*n^2*L*C (encoder, no LM head)",
        "weights": f"HF EsmModel initializer, seed {opts['seed']}, one state dict for every row",
    }  # fmt: skip
    doc = {
        "schema": SCHEMA, "family": "esm2", "command": command,
        "meta": {**environment(device), "transformers": version("transformers")}, "workload": workload, "reference": {}, "results": [], "goal": {}, "notes": notes, "complete": False,
        "interrupted": None, "elapsed_s": 0.0,
    }  # fmt: skip
    rows: list[Row] = []

    def flush(final=False):
        doc["results"] = [dataclasses.asdict(r) for r in rows]
        doc["goal"] = goal(doc["results"])
        doc["elapsed_s"] = round(time.perf_counter() - t_run, 1)
        if out_dir:
            write(out_dir, doc, plot_it=final)

    log(
        f"ESM2 {opts['preset']} ({cfg.num_hidden_layers} layers, C={cfg.hidden_size}, H={cfg.num_attention_heads}), "
        f"{workload['dtype']} on {device}: {len(lengths)} sequences, {real} real tokens, median {workload['median_len']}, "
        f"{len(padded_b)} padded / {len(packed_b)} packed batches of <= {max_tokens} tokens, "
        f"{workload['gflop_per_token']:.3f} GFLOP/token"
    )

    def add(row: Row) -> None:
        rows.append(row)
        log(_line(row))
        flush()

    try:
        sd = template_state_dict(cfg, device, dtype, opts["seed"])
        x, am = _check_batch(tokens, ids)
        ref = Reference(cfg, sd, x, am, device, dtype, port="port" in opts["rows"])
        doc["reference"] = {
            "batch": f"{x.shape[0]} workload sequences (token lengths {am.sum(-1).tolist()}), one <mask> token",
            "reference": "HF EsmModel eager, float32, TF32 off", "hf_sdpa_rel_l2": ref.base, "bound": ref.bound,
            "rule": "relative L2 of the last hidden state at real tokens <= max(1e-2, 2 x HF sdpa's)",
            "port_float32_rel_l2": ref.port32,
        }  # fmt: skip
        padded = padded_inputs(padded_b, tokens, ids, device)
        run_args = (device, real, flops, peak, opts["max_passes"], opts["repeats"])

        def call_padded(model):
            return lambda x: model(x[0], attention_mask=x[1])

        def hf_row(impl):
            row = Row(f"hf[{impl}]", "hf", impl, False, attn_implementation=impl, variant="inputs=padded")
            try:
                _fresh(device)
                hf = hf_model(cfg, sd, device, dtype, impl)
                if ref.check(row, lambda x: hf(input_ids=x[0], attention_mask=x[1]).last_hidden_state):
                    time_row(row, lambda x: hf(input_ids=x[0], attention_mask=x[1]), padded, *run_args)
                del hf
            except Exception as e:  # noqa: BLE001 - a failing row is reported and the run goes on
                fail(row, e, device)
            return row

        # the goal's two rows first (a run cut short by its time limit keeps them), the slow
        # HF eager last
        order = [("anyattn", "plain"), ("hf", "sdpa"), ("anyattn", "compiled"), ("port", None), ("anyattn", "uncompiled"),
                 ("backends", None)] + [("hf", h) for h in opts["hf"] if h != "sdpa"]  # fmt: skip
        budget = opts.get("budget_s")
        for what, arg in order:
            if budget is not None and time.perf_counter() - t_run > budget:
                names = {"anyattn": f"anyattn {arg}", "hf": f"hf[{arg}]", "port": "fastplms-sdpa", "backends": "--backends rows"}
                wanted = (what == "anyattn" and arg in opts["rows"]) or (what == "hf" and arg in opts["hf"]) or (
                    what == "port" and "port" in opts["rows"]) or (what == "backends" and opts["backends"])
                if wanted:
                    add(Row(names[what], "anyattn" if what in ("anyattn", "backends") else what, "auto", False, status="skipped",
                            error=f"time budget (--budget-s {budget:g}) spent before this row started"))
                continue
            if what == "anyattn" and arg in opts["rows"]:
                add(_anyattn_row(arg, cfg, sd, ref, padded, opts, run_args, call_padded))
            elif what == "hf" and arg in opts["hf"]:
                add(hf_row(arg))
            elif what == "port" and "port" in opts["rows"]:
                add(_port_row(cfg, sd, ref, padded, opts, run_args))
            elif what == "backends" and opts["backends"]:
                for row in _backend_rows(cfg, sd, ref, packed_b, padded, tokens, ids, opts, run_args):
                    add(row)
        doc["complete"] = True
    except KeyboardInterrupt as e:  # Ctrl-C or SIGTERM (timeout): keep what was measured
        doc["interrupted"] = str(e) or "KeyboardInterrupt"
    finally:
        flush(final=True)
    return doc


def _anyattn_row(kind, cfg, sd, ref, padded, opts, run_args, call_padded) -> Row:
    device, dtype = opts["device"], opts["dtype"]
    row = Row(f"anyattn {kind}", "anyattn", "auto", kind == "compiled")
    model = None
    try:
        _fresh(device)
        model = anyattn_model(cfg, sd, device, dtype)
        has = hasattr(model.config, "compile_layers")
        if kind == "compiled":
            if opts["no_compile"]:
                row.status, row.error = "skipped", opts["no_compile"]
                return row
            model.compile_layers()
        elif kind == "uncompiled":
            if has:
                model.config.compile_layers = False
            else:
                row.note = "this tree's ESM2Config has no compile_layers: uncompiled is its default"
        setting = getattr(model.config, "compile_layers", "<no such attribute>")
        row.variant = (
            f"model(input_ids, attention_mask) on HF's padded batches; config.compile_layers={setting!r}"
            + ("; model.compile_layers()" if kind == "compiled" else "")
        )
        fn = call_padded(model)
        time_row(row, fn, padded, *run_args)
        ref.check(row, lambda x: model(x[0], attention_mask=x[1]).last_hidden_state)  # after timing: see the docstring
    except Exception as e:  # noqa: BLE001
        fail(row, e, device)
    finally:
        del model
    return row


def _backend_rows(cfg, sd, ref, packed_b, padded, tokens, ids, opts, run_args):
    """The per-backend rows of earlier rounds (``--backends``): one model, uncompiled rows first."""
    import anyattn

    device, dtype, max_tokens = opts["device"], opts["dtype"], opts["max_tokens"]
    _fresh(device)
    model = anyattn_model(cfg, sd, device, dtype, attn_backend="auto", pack_padded=opts["pack"])
    if hasattr(model.config, "compile_layers"):
        model.config.compile_layers = False  # these rows compile explicitly (--compile) or not at all
    inputs = {}
    if "packed" in opts["inputs"]:  # one row of exactly max_tokens positions per batch
        inputs["packed"] = []
        for b in packed_b:
            row_ids = torch.full((1, max_tokens), PAD, dtype=torch.long)
            flat = torch.cat([ids[i] for i in b])
            row_ids[0, : flat.numel()] = flat
            info = anyattn.SeqInfo.from_lengths([tokens[i] for i in b], total_length=max_tokens, device=device)
            inputs["packed"].append((row_ids.to(device), info))
    if "padded" in opts["inputs"]:
        inputs["padded"] = padded
    variants = [(be, False) for be in opts["backends"]] if opts["compile"] != "only" else []
    if opts["compile"] in ("both", "only"):
        variants += [(be, True) for be in opts["backends"]]
    compiled = False
    for be, comp in variants:
        for kind, xs in inputs.items():
            name = f"anyattn[{be}]" + ("+compile" if comp else "") + ("" if kind == "packed" else "+padded-in")
            row = Row(name, "anyattn", be, comp, variant=_variant(opts, comp, kind))
            try:
                if comp and opts["no_compile"]:
                    row.status, row.error = "skipped", opts["no_compile"]
                    yield row
                    continue
                if comp and not compiled:  # uncompiled rows all run first
                    kw = {} if opts["compile_mode"] is None else {"mode": opts["compile_mode"]}
                    if opts["tune"]:  # inductor's coordinate-descent tuning of its generated kernels
                        kw["options"] = {"coordinate_descent_tuning": True}
                    if opts["pack"] is False:
                        kw["dynamic"] = False  # every packed row has max_tokens positions: one static shape
                    model.compile_layers(fuse_qkv=opts["fuse_qkv"], **kw)
                    compiled = True
                model.attn_backend = be
                if kind == "packed":
                    fn = lambda x: model(x[0], seq_info=x[1])  # noqa: E731
                else:
                    fn = lambda x: model(x[0], attention_mask=x[1])  # noqa: E731
                time_row(row, fn, xs, *run_args)
                ref.check(row, lambda x: model(x[0], attention_mask=x[1]).last_hidden_state)
            except Exception as e:  # noqa: BLE001
                fail(row, e, device)
            yield row
    del model, inputs


def _port_row(cfg, sd, ref, padded, opts, run_args) -> Row:
    from .sdpa_port import from_hf_state_dict

    device, dtype = opts["device"], opts["dtype"]
    row = Row("fastplms-sdpa", "port", "sdpa", False, attn_implementation="sdpa",
              variant="uncompiled port (bench/sdpa_port.py), padded batches, SDPA with a boolean key mask")  # fmt: skip
    try:
        _fresh(device)
        if not ref.port32 <= 1e-4:  # in float32 the port must be ESM2 exactly
            raise RuntimeError(f"the sdpa port in float32 differs from HF's float32 EsmModel: relative L2 {ref.port32:.3g} > 1e-4")
        port = from_hf_state_dict(cfg.to_hf_dict(), sd, device=device, dtype=dtype)
        if ref.check(row, lambda x: port(x[0], x[1])):
            time_row(row, lambda x: port(x[0], x[1]), padded, *run_args)
        del port
    except Exception as e:  # noqa: BLE001
        fail(row, e, device)
    return row


def _variant(opts, compiled: bool, inputs: str) -> str:
    """The options that shape a per-backend row, as one string (kept in model.json)."""
    parts = [f"inputs={inputs}", f"pack_padded={opts['pack']}"]
    if compiled:
        parts += [f"compile_mode={opts['compile_mode'] or 'default'}", f"fuse_qkv={opts['fuse_qkv']}", f"tune={opts['tune']}"]
    return " ".join(parts)


# ---------------------------------------------------------------------------------------------
# output




def _hf_sdpa(res) -> float:
    return next((r["tokens_per_s"] for r in res if r["name"] == "hf[sdpa]" and r["status"] == "ok"), float("nan"))


def goal(res) -> dict:
    """Issue 15: the plain call >= 2x HF sdpa warm."""
    plain = next((r["tokens_per_s"] for r in res if r["name"] == "anyattn plain" and r["status"] == "ok"), float("nan"))
    ratio = plain / _hf_sdpa(res)
    return {"what": "anyattn plain / hf[sdpa] warm tokens/s", "value": ratio, "target": GOAL,
            "met": bool(ratio >= GOAL) if ratio == ratio else None}  # fmt: skip


def table(doc: dict) -> str:
    res = doc["results"]
    base = _hf_sdpa(res)
    head = (f"{'row':<26} {'tokens/s':>10} {'1st pass':>10} {'x HF sdpa':>9} {'TFLOP/s':>8} {'MFU':>6} {'peak GiB':>8} "
            f"{'compile s':>9} {'time s':>7} {'check':>6}  status")  # fmt: skip
    out = [head, "-" * len(head)]
    for r in res:
        ratio = r["tokens_per_s"] / base if r["status"] == "ok" else float("nan")
        out.append(
            f"{r['name']:<26} {_f(r['tokens_per_s'], ',.0f'):>10} {_f(r.get('cold_pass_tokens_per_s'), ',.0f'):>10} {_f(ratio, '.2f'):>9} "
            f"{_f(r['tflops'], '.1f'):>8} {_f(r['mfu'] * 100, '.1f') + '%' if r['mfu'] == r['mfu'] else '-':>6} "
            f"{_f(r['peak_mem_gib'], '.2f'):>8} {_f(r['compile_s'], '.1f'):>9} {_f(r['time_s'], '.2f'):>7} {r.get('check', '-'):>6}  "
            + (r["status"] if r["status"] == "ok" else f"{r['status']}: {r['error'][:80]}")
        )  # fmt: skip
    g = doc.get("goal") or goal(res)
    met = {True: "met", False: "NOT met", None: "not measured"}[g["met"]]
    out.append(f"goal: {g['what']} = {_f(g['value'], '.2f')}x (>= {g['target']:g}x): {met}")
    out.append("1st pass = the first whole-set pass of a fresh model, compilation included; tokens/s = median warm pass")
    return "\n".join(out)


def plot(path: str, doc: dict) -> str | None:
    if importlib.util.find_spec("matplotlib") is None:
        return "model.png not written: matplotlib is not installed (pip install matplotlib)"
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in doc["results"] if r["status"] == "ok"]
    if not ok:
        return "model.png not written: no measured rows"
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(ok) + 1.2))
    colors = ["tab:blue" if r["kind"] == "anyattn" else "tab:gray" for r in ok]
    ax.barh([r["name"] for r in ok], [r["tokens_per_s"] / 1e3 for r in ok], color=colors, label="warm (median pass)")
    ax.barh([r["name"] for r in ok], [r["cold_pass_tokens_per_s"] / 1e3 for r in ok], color="none", edgecolor="black",
            hatch="//", label="first pass (compile included)")  # fmt: skip
    for i, r in enumerate(ok):
        mfu = f", MFU {r['mfu'] * 100:.0f}%" if r["mfu"] == r["mfu"] else ""
        ax.text(r["tokens_per_s"] / 1e3, i, f" {r['tokens_per_s'] / 1e3:.0f}k{mfu}", va="center", fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("real tokens / s (thousands)")
    ax.legend(fontsize=7, loc="lower right")
    w, m = doc["workload"], doc["meta"]
    ax.set_title(
        f"{doc.get('family', 'esm2').upper()} {w['preset']} {w['dtype']}, {w['num_seqs']} seqs (median {w['median_len']}), "
        f"{m['device_name']}", fontsize=8
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def write(out_dir: str, doc: dict, *, plot_it: bool) -> None:
    os.makedirs(out_dir, exist_ok=True)
    if plot_it:
        note = plot(os.path.join(out_dir, "model.png"), doc)
        if note and note not in doc["notes"]:
            doc["notes"].append(note)
    path = os.path.join(out_dir, "model.json")
    with open(path + ".tmp", "w") as f:
        json.dump(doc, f, indent=1)
    os.replace(path + ".tmp", path)


# ---------------------------------------------------------------------------------------------
# command line (import-light: --help needs torch only)


def add_arguments(p) -> None:
    p.add_argument("--family", default="esm2", choices=FAMILY_NAMES, help="model family (default esm2: this benchmark's "
                   "original rows and options; the others: family_run.py)")  # fmt: skip
    p.add_argument("--preset", default=None, help=f"model shape, random weights ({_PRESETS_HELP})")
    p.add_argument("--num-seqs", type=int, default=2048)
    p.add_argument("--median", type=float, default=320.0, help="lognormal median length (residues)")
    p.add_argument("--sigma", type=float, default=0.58, help="lognormal sigma (0.58: mean ~378 at median 320)")
    p.add_argument("--min-len", type=int, default=30)
    p.add_argument("--max-len", type=int, default=1022)
    p.add_argument("--seed", type=int, default=0, help="lengths, token ids and the random weights")
    p.add_argument("--fasta", default=None, help="take the sequence lengths from this FASTA file instead")
    p.add_argument("--max-tokens", type=int, default=16384, help="tokens per batch (padded: rows x longest; packed rows: real)")
    p.add_argument("--rows", default=",".join(ROWS), help=f"comma list of {','.join(ROWS)} (default: all), or 'none': "
                   "anyattn plain call / model.compile_layers() / config.compile_layers=False, and the FastPLMs-style SDPA port")  # fmt: skip
    p.add_argument("--hf", default="sdpa,eager", help="HF EsmModel attn_implementations, comma-separated; 'none' to skip")
    p.add_argument("--backends", default=None, help="extra per-backend anyattn rows (earlier rounds' rows), comma-separated, "
                   "e.g. auto,flash_torch (default: none)")  # fmt: skip
    p.add_argument("--compile", nargs="?", const="both", default="off", choices=["off", "both", "only"],
                   help="per-backend rows: torch.compile the layers (--compile = both uncompiled and compiled rows)")  # fmt: skip
    p.add_argument("--compile-mode", default=None, help="per-backend compiled rows: torch.compile mode, e.g. max-autotune-no-cudagraphs")
    p.add_argument("--tune", action="store_true", help="per-backend compiled rows: inductor coordinate-descent tuning (not with --compile-mode)")
    p.add_argument("--fuse-qkv", action="store_true", help="per-backend compiled rows: one (3C, C) q/k/v projection instead of three")
    p.add_argument("--pack", default="auto", choices=["auto", "off"], help="per-backend rows: model.pack_padded (auto, or off = compute every position)")
    p.add_argument("--inputs", default="packed", choices=["packed", "padded", "both"], help="per-backend rows: packed rows (seq_info) and/or HF's padded batches")
    p.add_argument("--dtype", default=None, choices=["bf16", "fp16", "fp32"], help="default bf16 on CUDA, fp32 on CPU")
    p.add_argument("--device", default=None, choices=["cuda", "cpu"])
    p.add_argument("--peak-tflops", type=float, default=None, help="device peak for MFU (default: known bf16 dense peaks)")
    p.add_argument("--max-warmup-passes", type=int, default=10)
    p.add_argument("--repeats", type=int, default=3, help="timed passes over the whole set per row (the median is reported)")
    p.add_argument("--budget-s", type=float, default=None, help="rows not started after this many seconds are skipped (recorded)")
    p.add_argument("--out", default=None, help="write model.json (after every row) and model.png here")
    p.add_argument("--quick", action="store_true", help="tiny config on CPU, < 30 s (a smoke test; no torch.compile)")


def _opts_from_args(a) -> dict:
    try:
        from ..models import ESM2Config
    except ImportError as e:
        raise ImportError(_MISSING) from e
    device = a.device or ("cuda" if torch.cuda.is_available() and not a.quick else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: CUDA is not available")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[a.dtype or ("bf16" if device == "cuda" else "fp32")]
    notes = []
    if a.quick:
        cfg = ESM2Config(vocab_size=33, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256)
        preset, a.num_seqs, a.median, a.min_len, a.max_len = "quick (tiny)", min(a.num_seqs, 24), 40.0, 8, 100
        a.max_tokens, a.max_warmup_passes = min(a.max_tokens, 512), min(a.max_warmup_passes, 3)
    else:
        preset = a.preset or "esm2_t33_650M"
        try:
            cfg = ESM2Config.from_name(preset)
        except ValueError as e:
            raise UsageError(f"--preset: {e}") from None
    for name in ("num_seqs", "min_len", "max_len", "max_tokens", "repeats"):
        if getattr(a, name) <= 0:
            raise UsageError(f"--{name.replace('_', '-')} must be positive")
    if a.min_len > a.max_len:
        raise UsageError("--min-len must be <= --max-len")
    budget = getattr(a, "budget_s", None)
    if budget is not None and budget <= 0:
        raise UsageError("--budget-s must be positive")
    if a.fasta:
        lengths, source = fasta_lengths(a.fasta, a.min_len, a.max_len), f"fasta:{a.fasta}"
    else:
        lengths = make_lengths(a.num_seqs, a.median, a.sigma, a.min_len, a.max_len, a.seed)
        source = f"lognormal(median={a.median}, sigma={a.sigma}) clipped to [{a.min_len}, {a.max_len}], seed {a.seed}"
    import anyattn

    valid = {b.name for b in anyattn.backends()} | {"auto"}
    if a.backends is None or a.backends.strip().lower() == "none":
        backends = []
    else:
        backends = [b.strip() for b in a.backends.split(",") if b.strip()]
        bad = [b for b in backends if b not in valid]
        if bad:
            raise UsageError(f"--backends: unknown {bad}; valid: {sorted(valid)}")
    rows = [] if a.rows.strip().lower() == "none" else [r.strip() for r in a.rows.split(",") if r.strip()]
    bad = [r for r in rows if r not in ROWS]
    if bad:
        raise UsageError(f"--rows: unknown {bad}; expected a comma list of {list(ROWS)} or 'none'")
    if a.tune and a.compile_mode:
        raise UsageError("--tune and --compile-mode: torch.compile takes a mode or options, not both")
    hf = [] if a.hf.strip().lower() == "none" else [h.strip() for h in a.hf.split(",") if h.strip()]
    no_compile = "--quick: no torch.compile (it takes minutes on a CPU); run without --quick" if a.quick else ""
    return dict(
        device=device, dtype=dtype, config=cfg, preset=preset, lengths=lengths, source=source, seed=a.seed,
        max_tokens=a.max_tokens, rows=rows, backends=backends, compile=a.compile, hf=hf, peak_tflops=a.peak_tflops,
        max_passes=max(2, a.max_warmup_passes), repeats=a.repeats, compile_mode=a.compile_mode, fuse_qkv=a.fuse_qkv,
        tune=a.tune, pack={"auto": "auto", "off": False}[a.pack], no_compile=no_compile, notes=notes,
        inputs=["packed", "padded"] if a.inputs == "both" else [a.inputs], budget_s=budget,
    )  # fmt: skip


def run_from_args(args, command: str = "anyattn bench model") -> int:
    from .kernels import _sigterm_as_interrupt

    family = getattr(args, "family", "esm2") or "esm2"
    if family == "esm2":
        opts = _opts_from_args(args)
    else:
        try:
            from . import family_run
        except ImportError as e:
            raise ImportError(_MISSING) from e
        if importlib.util.find_spec("transformers") is None:
            raise ImportError(_MISSING)
        opts = family_run.opts_from_args(args)
    if args.quick:
        torch.set_num_threads(min(2, torch.get_num_threads()))
    _sigterm_as_interrupt()  # a killed run (timeout) still writes what it measured
    if family == "esm2":
        doc, show = run(opts, command=command, out_dir=args.out), table
    else:
        doc, show = family_run.run(opts, command=command, out_dir=args.out, write=write), family_run.table
    if args.out:
        print(f"\nwrote {os.path.join(args.out, 'model.json')}" + (" and model.png" if os.path.exists(os.path.join(args.out, "model.png")) else ""))
    for n in doc["notes"]:
        print(f"note: {n}")
    if not doc["complete"]:
        print("run INCOMPLETE (interrupted): the table holds what was measured")
    m = doc["meta"]
    print(f"\n{m['device_name']} | torch {m['torch']} | transformers {m.get('transformers')} | {doc['elapsed_s']} s")
    print(show(doc))
    if doc.get("interrupted"):
        return 130
    return 1 if any(r["status"] == "failed" for r in doc["results"]) else 0
