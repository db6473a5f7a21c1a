"""``anyattn bench model``: end-to-end ESM2 throughput, anyattn's model next to HF transformers.

Workload: ``--num-seqs`` protein lengths (residues) drawn from a lognormal (``--median``,
``--sigma``, seed) clipped to ``--min-len``..``--max-len``, or read from ``--fasta``. Every
sequence is tokenized as ``<cls> residues <eos>`` (length + 2 tokens; "real tokens" count both).
Random weights of a published shape (``--preset``, default esm2_t33_650M), bf16 on CUDA.

Batches are length-sorted (longest first) and filled greedily up to ``--max-tokens``:

* anyattn: packed rows, no padding compute between sequences. Each batch is one row of exactly
  ``--max-tokens`` positions holding whole sequences back to back, then padding that sees
  nothing (``documents`` from a ``SeqInfo``). With ``--pack auto`` (default) the model computes
  only the real tokens of the row on varlen backends (flash_torch) and a bucketed length on flex
  (one kernel per length); the compiled layers take any token count without recompiling. With
  ``--pack off`` every position of the row is computed (one static shape).
  ``--inputs padded`` feeds HF's padded batches (``attention_mask``) instead.
* HF transformers ``EsmModel`` (``attn_implementation`` sdpa and eager): padded rows, batch size
  x longest length <= ``--max-tokens``, ``attention_mask`` marking the real tokens.

Per row: the first call alone (includes compilation), then warm-up passes over a few batches
until two consecutive passes differ by < 5% (``warmup_s`` includes the first call;
``compile_s`` = first call - the same batch once warm), then the whole set ``--repeats`` times
(default 3), each pass synchronized at its end: real tokens/s of the median pass (every pass's
time is kept in ``times_s``), MFU and peak memory. Inputs (token tensors, SeqInfos) are built
before timing for every row alike.

FLOPs (:func:`anyattn.models.esm2_flops`): per sequence of n tokens,
``2*n*L*(4*C^2 + 2*C*F)`` (projections and FFN) ``+ 4*n^2*L*C`` (q k^T and p v); ~1.38 GFLOP per
token for the 650M shape at median 320 (DESIGN.md section 6 quotes ~1.36). MFU divides by the
device's dense bf16 peak (H100/H200 SXM: 989 TFLOP/s; ``--peak-tflops`` overrides).
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
import json
import math
import os
import statistics
import time

import torch

from . import UsageError
from .timing import sync

__all__ = ["HELP", "add_arguments", "run_from_args", "make_lengths", "make_batches"]

SCHEMA = "anyattn.bench.model/1"
HELP = "end-to-end ESM2 throughput (tokens/s, MFU): anyattn's model on each backend vs HF transformers"

_PEAK_BF16 = {"H200": 989.4, "H100": 989.4, "A100": 312.0, "L40S": 362.0, "L4": 121.0}  # dense TFLOP/s
CLS, PAD, EOS = 0, 1, 2


# ---------------------------------------------------------------------------------------------
# workload


def make_lengths(num: int, median: float, sigma: float, lo: int, hi: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(num, generator=g, dtype=torch.float64) * sigma + math.log(median)
    return [int(min(hi, max(lo, round(math.exp(v))))) for v in x.tolist()]


def fasta_lengths(path: str, lo: int, hi: int) -> list[int]:
    out, n = [], None
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line.startswith(">"):
                if n is not None:
                    out.append(n)
                n = 0
            elif line and n is not None:
                n += len(line)
    if n is not None:
        out.append(n)
    if not out:
        raise UsageError(f"--fasta {path}: no sequences found")
    return [min(hi, max(lo, x)) for x in out]


def make_batches(tokens: list[int], max_tokens: int, padded: bool) -> list[list[int]]:
    """Indices of length-sorted (longest first) batches: sum(len) <= max_tokens (packed) or
    count * longest <= max_tokens (padded)."""
    order = sorted(range(len(tokens)), key=lambda i: -tokens[i])
    batches, cur, used = [], [], 0
    for i in order:
        n = tokens[i]
        need = (len(cur) + 1) * tokens[cur[0]] if (padded and cur) else used + n
        if cur and need > max_tokens:
            batches.append(cur)
            cur, used = [], 0
        cur.append(i)
        used += n
    if cur:
        batches.append(cur)
    return batches


def _token_ids(tokens: list[int], seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed + 1)
    out = []
    for n in tokens:
        t = torch.randint(4, 24, (n,), generator=g)
        t[0], t[-1] = CLS, EOS
        out.append(t)
    return out


def _padded_inputs(batches, tokens, ids, device) -> list:
    """Right-padded (input_ids, attention_mask) per batch: B rows x the batch's longest."""
    out = []
    for b in batches:
        S = tokens[b[0]]
        x = torch.full((len(b), S), PAD, dtype=torch.long)
        am = torch.zeros((len(b), S), dtype=torch.long)
        for r, i in enumerate(b):
            x[r, : tokens[i]] = ids[i]
            am[r, : tokens[i]] = 1
        out.append((x.to(device), am.to(device)))
    return out


def _variant(opts, compiled: bool, inputs: str) -> str:
    """The options that shape an anyattn row, as one string (kept in model.json)."""
    parts = [f"inputs={inputs}", f"pack_padded={opts['pack']}"]
    if compiled:
        parts += [f"compile_mode={opts['compile_mode'] or 'default'}", f"fuse_qkv={opts['fuse_qkv']}", f"tune={opts['tune']}"]
    return " ".join(parts)


# ---------------------------------------------------------------------------------------------
# timing one row


@dataclasses.dataclass
class Row:
    name: str
    kind: str  # anyattn | hf
    backend: str
    compiled: bool
    status: str = "ok"  # ok | failed | skipped
    error: str = ""
    tokens_per_s: float = float("nan")
    # the first timed pass over the whole set: every batch shape seen once since warm-up (kernels
    # that build per-shape plans, like cuDNN attention under HF's SDPA, pay for them here)
    first_pass_tokens_per_s: float = float("nan")
    mfu: float = float("nan")
    tflops: float = float("nan")
    peak_mem_gib: float = float("nan")
    first_call_s: float = float("nan")
    compile_s: float = float("nan")
    warmup_s: float = float("nan")
    warmup_passes: int = 0
    time_s: float = float("nan")  # median of the timed passes over the whole set
    times_s: tuple = ()  # every timed pass (their spread is the run-to-run noise)
    batches: int = 0
    attn_implementation: str = ""
    variant: str = ""  # anyattn rows: inputs, pack_padded, compile mode, fuse_qkv


def _time_row(row: Row, fn, inputs: list, device, real_tokens: int, flops: float, peak: float | None, max_passes: int, repeats: int = 3) -> Row:
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    row.batches = len(inputs)
    warm = sorted(set([0, len(inputs) // 3, 2 * len(inputs) // 3, len(inputs) - 1]))  # long .. short
    t_start = time.perf_counter()
    with torch.inference_mode():
        sync(device)
        t0 = time.perf_counter()
        fn(inputs[0])
        sync(device)
        row.first_call_s = time.perf_counter() - t0
        passes = []
        while len(passes) < max_passes:
            per = []
            for i in warm:
                t0 = time.perf_counter()
                fn(inputs[i])
                sync(device)
                per.append(time.perf_counter() - t0)
            passes.append(per)
            if len(passes) >= 2 and abs(sum(passes[-1]) - sum(passes[-2])) <= 0.05 * sum(passes[-2]):
                break
        row.warmup_passes = len(passes)
        row.warmup_s = time.perf_counter() - t_start
        row.compile_s = max(0.0, row.first_call_s - min(p[0] for p in passes))
        times = []
        for _ in range(repeats):
            sync(device)
            t0 = time.perf_counter()
            for x in inputs:
                fn(x)
            sync(device)
            times.append(time.perf_counter() - t0)
        row.times_s = tuple(times)  # unrounded: time_s is their median
        row.time_s = statistics.median(times)
    row.tokens_per_s = real_tokens / row.time_s
    row.first_pass_tokens_per_s = real_tokens / times[0]
    row.tflops = flops / row.time_s / 1e12
    if peak:
        row.mfu = row.tflops / peak
    if dev.type == "cuda":
        row.peak_mem_gib = torch.cuda.max_memory_allocated() / 2**30
    return row


def _fail(row: Row, e: BaseException, device) -> Row:
    row.status = "failed"
    row.error = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300] if str(e).strip() else ''}"
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
    return row


# ---------------------------------------------------------------------------------------------
# the run


def _available(names) -> list[str]:
    import anyattn

    avail = {b.name for b in anyattn.backends() if b.available} | {"auto"}
    return [n for n in names if n in avail]


def run(opts: dict, *, command: str = "", log=print) -> dict:
    from ..models import ESM2Model, esm2_flops
    from .env import environment

    import anyattn

    device, dtype = opts["device"], opts["dtype"]
    t_run = time.perf_counter()
    cfg = opts["config"]
    notes: list[str] = []
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
    if peak is not None and dtype != torch.bfloat16 and dtype != torch.float16:
        notes.append("MFU is relative to the bf16 dense peak although this run is not bf16")
    max_tokens = opts["max_tokens"]
    if max(tokens) > max_tokens:
        raise UsageError(f"--max-tokens {max_tokens} is smaller than the longest sequence ({max(tokens)} tokens)")
    ids = _token_ids(tokens, opts["seed"])
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
    }  # fmt: skip
    log(
        f"ESM2 {opts['preset']} ({cfg.num_hidden_layers} layers, C={cfg.hidden_size}, H={cfg.num_attention_heads}), "
        f"{workload['dtype']} on {device}: {len(lengths)} sequences, {real} real tokens, median {workload['median_len']}, "
        f"{len(packed_b)} packed / {len(padded_b)} padded batches of <= {max_tokens} tokens, "
        f"{workload['gflop_per_token']:.3f} GFLOP/token"
    )
    rows: list[Row] = []

    # anyattn: packed rows of exactly max_tokens positions
    if opts["backends"]:
        torch.manual_seed(opts["seed"])
        mcfg = copy.deepcopy(cfg)
        mcfg.attn_backend, mcfg.pack_padded = "auto", opts["pack"]
        with torch.device(device):
            model = ESM2Model(mcfg)
        model = model.to(dtype=dtype).eval()
        inputs = {}
        if "packed" in opts["inputs"]:  # one row of exactly max_tokens positions per batch
            inputs["packed"] = []
            for b in packed_b:
                row_ids = torch.full((1, max_tokens), PAD, dtype=torch.long)
                flat = torch.cat([ids[i] for i in b])
                row_ids[0, : flat.numel()] = flat
                info = anyattn.SeqInfo.from_lengths([tokens[i] for i in b], total_length=max_tokens, device=device)
                inputs["packed"].append((row_ids.to(device), info))
        if "padded" in opts["inputs"]:  # the same batches as HF's, with attention_mask
            inputs["padded"] = _padded_inputs(padded_b, tokens, ids, device)
        variants = [(be, False) for be in opts["backends"]] if opts["compile"] != "only" else []
        if opts["compile"] in ("both", "only"):
            variants += [(be, True) for be in opts["backends"]]
        compiled = False
        for be, comp in variants:
            for kind, xs in inputs.items():
                name = f"anyattn[{be}]" + ("+compile" if comp else "") + ("" if kind == "packed" else "+padded-in")
                row = Row(name, "anyattn", be, comp, variant=_variant(opts, comp, kind))
                try:
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
                    _time_row(row, fn, xs, device, real, flops, peak, opts["max_passes"], opts.get("repeats", 3))
                except Exception as e:  # noqa: BLE001 - a failing row is reported and the run goes on
                    _fail(row, e, device)
                rows.append(row)
                log(_line(row))
        del model, inputs

    # HF transformers EsmModel: padded rows
    if opts["hf"]:
        if importlib.util.find_spec("transformers") is None:
            notes.append("HF transformers rows skipped: transformers is not installed (pip install 'anyattn[models]')")
        else:
            import transformers

            notes.append(f"transformers {transformers.__version__}")
            inputs = _padded_inputs(padded_b, tokens, ids, device)
            for impl in opts["hf"]:
                row = Row(f"hf[{impl}]", "hf", impl, False)
                hf = None
                try:
                    hc = transformers.EsmConfig(**cfg.to_hf_dict())
                    torch.manual_seed(opts["seed"])
                    with torch.device(device):
                        hf = transformers.EsmModel._from_config(hc, attn_implementation=impl)
                    hf = hf.to(dtype=dtype).eval()
                    row.attn_implementation = str(getattr(hf.config, "_attn_implementation", "?"))
                    if row.attn_implementation != impl:
                        raise RuntimeError(f"transformers chose attn_implementation={row.attn_implementation!r}, not {impl!r}")
                    _time_row(row, lambda x: hf(input_ids=x[0], attention_mask=x[1]), inputs, device, real, flops, peak, opts["max_passes"], opts.get("repeats", 3))
                except Exception as e:  # noqa: BLE001
                    _fail(row, e, device)
                del hf
                rows.append(row)
                log(_line(row))
            del inputs

    doc = {
        "schema": SCHEMA, "command": command, "meta": environment(device), "workload": workload,
        "results": [dataclasses.asdict(r) for r in rows], "notes": notes,
        "elapsed_s": round(time.perf_counter() - t_run, 1),
    }  # fmt: skip
    doc["meta"]["transformers"] = _version("transformers")
    return doc


def _version(dist):
    if importlib.util.find_spec(dist) is None:
        return None
    from importlib.metadata import version

    return version(dist)


# ---------------------------------------------------------------------------------------------
# output


def _f(x, fmt):
    return "-" if x is None or (isinstance(x, float) and x != x) else format(x, fmt)


def _line(r: Row) -> str:
    if r.status != "ok":
        return f"  {r.name:<26} {r.status}: {r.error}"
    return f"  {r.name:<26} {r.tokens_per_s / 1e3:9.1f}k tokens/s  ({r.time_s:.2f} s, warm-up {r.warmup_s:.1f} s, compile {r.compile_s:.1f} s)"


def table(doc: dict) -> str:
    res = doc["results"]
    hf_best = max((r["tokens_per_s"] for r in res if r["kind"] == "hf" and r["status"] == "ok"), default=float("nan"))
    head = f"{'row':<26} {'tokens/s':>10} {'1st pass':>10} {'x HF best':>9} {'TFLOP/s':>8} {'MFU':>6} {'peak GiB':>8} {'warm-up s':>9} {'compile s':>9} {'time s':>7}  status"
    out = [head, "-" * len(head)]
    for r in res:
        ratio = r["tokens_per_s"] / hf_best if hf_best == hf_best and r["status"] == "ok" else float("nan")
        out.append(
            f"{r['name']:<26} {_f(r['tokens_per_s'], ',.0f'):>10} {_f(r.get('first_pass_tokens_per_s'), ',.0f'):>10} {_f(ratio, '.2f'):>9} {_f(r['tflops'], '.1f'):>8} "
            f"{_f(r['mfu'] * 100, '.1f') + '%' if r['mfu'] == r['mfu'] else '-':>6} {_f(r['peak_mem_gib'], '.2f'):>8} "
            f"{_f(r['warmup_s'], '.1f'):>9} {_f(r['compile_s'], '.1f'):>9} {_f(r['time_s'], '.2f'):>7}  "
            + (r["status"] if r["status"] == "ok" else f"{r['status']}: {r['error'][:80]}")
        )  # fmt: skip
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
    ax.barh([r["name"] for r in ok], [r["tokens_per_s"] / 1e3 for r in ok], color=colors)
    for i, r in enumerate(ok):
        mfu = f", MFU {r['mfu'] * 100:.0f}%" if r["mfu"] == r["mfu"] else ""
        ax.text(r["tokens_per_s"] / 1e3, i, f" {r['tokens_per_s'] / 1e3:.0f}k{mfu}", va="center", fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("real tokens / s (thousands)")
    w, m = doc["workload"], doc["meta"]
    ax.set_title(
        f"ESM2 {w['preset']} {w['dtype']}, {w['num_seqs']} seqs (median {w['median_len']}), {m['device_name']}", fontsize=8
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


# ---------------------------------------------------------------------------------------------
# command line


def add_arguments(p) -> None:
    from ..models import ESM2_PRESETS

    p.add_argument("--preset", default="esm2_t33_650M", choices=list(ESM2_PRESETS), help="model shape (random weights)")
    p.add_argument("--num-seqs", type=int, default=2048)
    p.add_argument("--median", type=float, default=320.0, help="lognormal median length (residues)")
    p.add_argument("--sigma", type=float, default=0.58, help="lognormal sigma (0.58: mean ~378 at median 320)")
    p.add_argument("--min-len", type=int, default=30)
    p.add_argument("--max-len", type=int, default=1022)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fasta", default=None, help="take the sequence lengths from this FASTA file instead")
    p.add_argument("--max-tokens", type=int, default=16384, help="tokens per batch (packed: real; padded: B x longest)")
    p.add_argument("--backends", default=None, help="anyattn backends, comma-separated (default auto,flex,flash_torch,sdpa where available; CPU: auto,sdpa,eager); 'none' to skip")
    p.add_argument("--compile", nargs="?", const="both", default="off", choices=["off", "both", "only"], help="torch.compile the layers (--compile = both uncompiled and compiled rows)")
    p.add_argument("--compile-mode", default=None, help="torch.compile mode for the layers, e.g. max-autotune-no-cudagraphs (default: torch's default)")
    p.add_argument("--tune", action="store_true", help="compiled layers: inductor coordinate-descent tuning of the fused LayerNorm/GELU/rotary kernels (longer compile; not with --compile-mode)")
    p.add_argument("--fuse-qkv", action="store_true", help="compiled layers: one (3C, C) q/k/v projection instead of three")
    p.add_argument("--pack", default="auto", choices=["auto", "off"], help="model.pack_padded: auto = padded batches and a packed row's tail padding run as packed tokens on backends that take them; off = compute every position (the layers compile for one static shape)")
    p.add_argument("--inputs", default="packed", choices=["packed", "padded", "both"], help="anyattn rows: packed rows (seq_info) and/or HF's padded batches (attention_mask)")
    p.add_argument("--hf", default="sdpa,eager", help="HF EsmModel attn_implementations, comma-separated; 'none' to skip")
    p.add_argument("--dtype", default=None, choices=["bf16", "fp16", "fp32"], help="default bf16 on CUDA, fp32 on CPU")
    p.add_argument("--device", default=None, choices=["cuda", "cpu"])
    p.add_argument("--peak-tflops", type=float, default=None, help="device peak for MFU (default: known bf16 dense peaks)")
    p.add_argument("--max-warmup-passes", type=int, default=10)
    p.add_argument("--repeats", type=int, default=3, help="timed passes over the whole set per row (the median is reported)")
    p.add_argument("--out", default=None, help="write model.json and model.png here")
    p.add_argument("--quick", action="store_true", help="tiny config on CPU, < 30 s (a smoke test)")


def _opts_from_args(a) -> dict:
    from ..models import ESM2Config

    device = a.device or ("cuda" if torch.cuda.is_available() and not a.quick else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: CUDA is not available")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[a.dtype or ("bf16" if device == "cuda" else "fp32")]
    if a.quick:
        cfg = ESM2Config(vocab_size=33, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256)
        preset, a.num_seqs, a.median, a.min_len, a.max_len = "quick (tiny)", min(a.num_seqs, 24), 40.0, 8, 100
        a.max_tokens, a.max_warmup_passes = min(a.max_tokens, 512), min(a.max_warmup_passes, 3)
    else:
        cfg, preset = ESM2Config.from_name(a.preset), a.preset
    for name in ("num_seqs", "min_len", "max_len", "max_tokens", "repeats"):
        if getattr(a, name) <= 0:
            raise UsageError(f"--{name.replace('_', '-')} must be positive")
    if a.min_len > a.max_len:
        raise UsageError("--min-len must be <= --max-len")
    if a.fasta:
        lengths, source = fasta_lengths(a.fasta, a.min_len, a.max_len), f"fasta:{a.fasta}"
    else:
        lengths = make_lengths(a.num_seqs, a.median, a.sigma, a.min_len, a.max_len, a.seed)
        source = f"lognormal(median={a.median}, sigma={a.sigma}) clipped to [{a.min_len}, {a.max_len}], seed {a.seed}"
    import anyattn

    valid = {b.name for b in anyattn.backends()} | {"auto"}
    if a.backends is None:
        default = ["auto", "flex", "flash_torch", "sdpa"] if device == "cuda" else ["auto", "sdpa", "eager"]
        backends = _available(default)
    elif a.backends.strip().lower() == "none":
        backends = []
    else:
        backends = [b.strip() for b in a.backends.split(",") if b.strip()]
        bad = [b for b in backends if b not in valid]
        if bad:
            raise UsageError(f"--backends: unknown {bad}; valid: {sorted(valid)}")
    if a.tune and a.compile_mode:
        raise UsageError("--tune and --compile-mode: torch.compile takes a mode or options, not both")
    hf = [] if a.hf.strip().lower() == "none" else [h.strip() for h in a.hf.split(",") if h.strip()]
    return dict(
        device=device, dtype=dtype, config=cfg, preset=preset, lengths=lengths, source=source, seed=a.seed,
        max_tokens=a.max_tokens, backends=backends, compile=a.compile, hf=hf, peak_tflops=a.peak_tflops,
        max_passes=max(2, a.max_warmup_passes), repeats=a.repeats, compile_mode=a.compile_mode, fuse_qkv=a.fuse_qkv,
        tune=a.tune, pack={"auto": "auto", "off": False}[a.pack], inputs=["packed", "padded"] if a.inputs == "both" else [a.inputs],
    )  # fmt: skip


def run_from_args(args, command: str = "anyattn bench model") -> int:
    opts = _opts_from_args(args)
    if args.quick:
        torch.set_num_threads(min(2, torch.get_num_threads()))
    doc = run(opts, command=command)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        note = plot(os.path.join(args.out, "model.png"), doc)
        if note:
            doc["notes"].append(note)
        with open(os.path.join(args.out, "model.json"), "w") as f:
            json.dump(doc, f, indent=1)
        print(f"\nwrote {os.path.join(args.out, 'model.json')}" + ("" if note else " and model.png"))
    for n in doc["notes"]:
        print(f"note: {n}")
    m = doc["meta"]
    print(f"\n{m['device_name']} | torch {m['torch']} | transformers {m.get('transformers')} | {doc['elapsed_s']} s")
    print(table(doc))
    return 1 if any(r["status"] == "failed" for r in doc["results"]) else 0
