"""``anyattn bench kernels --mode new-packing``: a new packing (or padding) every step.

Users do not reuse masks: a training loop packs new documents every step, a server sees new
padding every batch. This mode times exactly that, side by side in one process (issue 15):

    packing   one row of S tokens (default B=1, S=16384), doc-causal
              ``documents(lengths) & causal()``, a NEW random set of document lengths every
              step (``--docs-range`` documents, lengths from ``cases.doc_lengths``)
    padding   B rows of S tokens (default 8 x 2048), ``padding(...)``, NEW random row lengths
              (S/4..S) every step

Rows (each does, inside the timed step, what a user writes):

    raw:varlen   varlen_attn with cu_seqlens built from the lengths: ``torch.tensor(cu,
                 dtype=torch.int32, device=...)``, max length as a Python int   (packing, CUDA)
    raw:flex     a doc-causal ``mask_mod`` closure, ``create_block_mask`` per step, compiled
                 ``flex_attention``                                                 (packing)
    raw:sdpa     ``F.scaled_dot_product_attention`` with a boolean key mask ``keep[:, None,
                 None, :]`` built on the device from the lengths                    (padding)
    anyattn X [form]   ``attention(q, k, v, mask=..., backend=X)``, the term built in the step:
                 packing: ``documents(torch.tensor(lengths))`` [tensor], ``documents(lengths)``
                 [list], ``documents(SeqInfo.from_lengths(lengths, device=...))`` [seqinfo],
                 each ``& causal()``; padding: ``padding(torch.tensor(lengths))`` [lengths],
                 ``padding(mask=keep)`` with ``keep`` built on the device [keep]

q, k, v live in (B, S, H, D) memory (as models hold them): anyattn, flex and SDPA get the
(B, H, S, D) ``transpose(1, 2)`` view, varlen the packed (S, H, D) view of the same memory.
fwd+bwd steps call ``torch.autograd.grad`` w.r.t. that memory.

Per row: ``anyattn.clear_caches()`` (no lowered form of an earlier row survives), the first step
alone (``first_ms``: includes compilation), the rest of the warm-up steps, the check, then the
timed steps. Warm-up, check and timed steps use disjoint packings, so every timed step sees a
packing nothing has seen before. Timing: on CUDA a CUDA event pair around each whole step (host
work included: while the host builds a mask the GPU waits, and the events see it), median over
the steps (``ms``), and wall time over all steps with one synchronization (``wall_ms`` per
step); on CPU ``time.perf_counter`` per step. ``x_best`` = ms / the best of the reference rows
(packing: raw:varlen, flex [tensor], flash_torch [tensor]; padding: raw:sdpa, flex, flash_torch,
sdpa [lengths]).

Check (before timing, outside the timed loop): on ``--check-steps`` packings the output (and
dq, dk, dv in fwd+bwd) against float64 eager computed per document / per row (the call is
block-diagonal, so the oracle of a 16k-token row costs the sum of its documents' squares),
within the rule of ``verify.bound``. A wrong or raising row prints NaN and the run goes on.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import time
from dataclasses import dataclass, field

import torch

from .. import clear_caches, explain
from ..testing import record_calls
from . import UsageError, verify
from . import churn_steps as cs
from .cases import DTYPES
from .env import environment
from .matrix import err_text, free
from .report import _f, _tf

__all__ = ["CASES", "FORMS", "SCHEMA", "Options", "Row", "quick", "run", "table"]

SCHEMA = "anyattn.bench.kernels.new_packing/1"
CASES = ("packing", "padding")
FORMS, RAW_ROWS = cs.FORMS, cs.RAW_ROWS
ANYATTN_ROWS = {"packing": ("auto", "flex", "flash_torch"), "padding": ("auto", "flex", "flash_torch", "sdpa")}
# the rows x_best divides by: what a user can already get for this case
BEST_OF = {
    "packing": (("raw:varlen", ""), ("flex", "tensor"), ("flash_torch", "tensor")),
    "padding": (("raw:sdpa", ""), ("flex", "lengths"), ("flash_torch", "lengths"), ("sdpa", "lengths")),
}


@dataclass(frozen=True)
class Options:
    """Everything one new-packing run measures."""

    cases: tuple[str, ...] = CASES
    modes: tuple[str, ...] = ("fwd+bwd", "fwd")
    backends: tuple[str, ...] | None = None  # anyattn rows (names or "auto"); None: ANYATTN_ROWS per case
    raw: tuple[str, ...] | None = None  # raw rows; None: RAW_ROWS per case
    forms: tuple[str, ...] | None = None  # term forms; None: every form of the case
    pack_S: int = 16384  # packing: tokens in the one row
    docs: tuple[int, int] = (8, 24)  # packing: documents per step, drawn uniformly from this range
    pad_B: int = 8
    pad_S: int = 2048
    heads: int = 16
    head_dim: int = 128
    dtype: str = "bf16"
    device: str = "cuda" if torch.cuda.is_available() else "cpu"
    steps: int = 50  # timed steps, each a new packing
    warmup: int = 3  # warm-up steps (new packings too); the first is reported as first_ms
    check_steps: int = 2  # packings checked against the oracle, before timing
    seed: int = 0
    cpu_flex: bool = False  # compile Flex on a CPU run (~5-20 s a kernel on this kind of CPU)
    budget_s: float | None = None  # no row starts past it


def quick(device: str = "cpu") -> Options:
    """A tiny CPU-sized run (a smoke test, not a measurement)."""
    return Options(
        pack_S=256, docs=(2, 6), pad_B=3, pad_S=64, heads=2, head_dim=32, dtype="fp32" if device == "cpu" else "bf16",
        device=device, steps=4, warmup=1, check_steps=1,
    )  # fmt: skip


@dataclass(frozen=True)
class Row:
    """One row: a raw call or an anyattn backend with one term form, on one case and mode."""

    case: str  # "packing" | "padding"
    mode: str  # "fwd" | "fwd+bwd"
    impl: str  # "raw" | "anyattn"
    backend: str  # "raw:..." or an anyattn backend name / "auto"
    form: str  # term form ("" for raw rows)
    chosen: str  # anyattn rows: the backend(s) that ran on the checked packings ("a/b" if several; a refusal moving on shows both)
    B: int
    S: int
    H: int
    D: int
    dtype: str
    status: str  # ok | failed | skipped
    ms: float  # median ms per step (event pair around the whole step), NaN unless ok
    wall_ms: float  # wall time of all timed steps / steps (one synchronization at the end)
    first_ms: float  # the first step of the row, synchronized (compilation included)
    tflops: float  # mean useful FLOPs per step / ms
    x_best: float  # ms / the best reference row of this case and mode
    steps: int
    times_ms: tuple = ()  # every timed step
    check: str = "-"  # ok | FAIL | error | -
    check_err: float = math.nan
    check_bound: float = math.nan
    checked: str = ""  # what was compared
    reason: str = ""  # why skipped / failed


# ---------------------------------------------------------------------------------------------
# timing


def _sync(dev) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def _time_steps(step, packings, dev) -> tuple[list[float], float]:
    """(ms of every step, wall ms per step)."""
    _sync(dev)
    if dev.type == "cuda":
        ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in packings]
        t0 = time.perf_counter()
        for (s, e), p in zip(ev, packings):
            s.record()
            step(p)
            e.record()
        torch.cuda.synchronize()
        wall = (time.perf_counter() - t0) * 1e3
        return [s.elapsed_time(e) for s, e in ev], wall / len(packings)
    times = []
    t0 = time.perf_counter()
    for p in packings:
        t = time.perf_counter()
        step(p)
        times.append((time.perf_counter() - t) * 1e3)
    return times, (time.perf_counter() - t0) * 1e3 / len(packings)


# ---------------------------------------------------------------------------------------------
# one case x mode


@dataclass
class _Ctx:
    opts: Options
    case: str
    mode: str
    leaves: tuple
    warm: list
    check: list
    timed: list
    oracles: dict = field(default_factory=dict)

    @property
    def grad(self) -> bool:
        return self.mode == "fwd+bwd"

    def oracle(self, i: int) -> cs.Oracle:
        if i not in self.oracles:
            self.oracles[i] = cs.Oracle(self.case, self.check[i], self.leaves, self.grad, self.opts.seed + 100 + i)
        return self.oracles[i]


def _leaves(opts: Options, case: str, grad: bool):
    B, S = (1, opts.pack_S) if case == "packing" else (opts.pad_B, opts.pad_S)
    g = torch.Generator().manual_seed(opts.seed)
    dt, dev = DTYPES[opts.dtype], torch.device(opts.device)
    return tuple(
        torch.randn(B, S, opts.heads, opts.head_dim, generator=g).to(dev, dt).requires_grad_(grad) for _ in range(3)
    )


def _row_specs(opts: Options, case: str) -> list[tuple[str, str]]:
    raws = RAW_ROWS[case] if opts.raw is None else tuple(r for r in opts.raw if r in RAW_ROWS[case])
    names = ANYATTN_ROWS[case] if opts.backends is None else opts.backends
    forms = FORMS[case] if opts.forms is None else tuple(f for f in opts.forms if f in FORMS[case])
    return [(r, "") for r in raws] + [(n, f) for n in names for f in forms]


def _run_row(ctx: _Ctx, name: str, form: str, t_start: float) -> Row:
    opts, leaves = ctx.opts, ctx.leaves
    B, S, H, D = leaves[0].shape
    base = dict(
        case=ctx.case, mode=ctx.mode, impl="raw" if name.startswith("raw:") else "anyattn", backend=name, form=form,
        chosen="", B=B, S=S, H=H, D=D, dtype=opts.dtype, status="skipped", ms=math.nan, wall_ms=math.nan,
        first_ms=math.nan, tflops=math.nan, x_best=math.nan, steps=len(ctx.timed),
    )  # fmt: skip
    if opts.budget_s is not None and time.perf_counter() - t_start > opts.budget_s:
        return Row(**base, reason=f"time budget: --budget-s {opts.budget_s:g} spent before this row")
    dev = leaves[0].device
    try:
        if base["impl"] == "raw":
            fwd, canon = cs.raw_forward(name, ctx.case, leaves, opts, ctx.grad)
        else:
            chosen = _chosen(name, ctx, form)
            if chosen is None or chosen.startswith("refused"):
                return Row(**base, reason=chosen or "refused")
            base["chosen"] = chosen
            if "flex" in chosen.split("/") and dev.type == "cpu" and not opts.cpu_flex:
                return Row(**base, reason="Flex compiles for ~5-20 s a kernel on CPU (--cpu-flex runs it)")
            if "flex" in chosen.split("/") and dev.type == "cpu" and ctx.grad:
                return Row(**base, reason="FlexAttention has no backward on CPU")
            fwd, canon = cs.anyattn_forward(name, ctx.case, form, leaves)
    except cs.Skip as e:
        return Row(**base, reason=str(e))
    except Exception as e:  # noqa: BLE001 - a raising row is recorded, the run goes on
        return Row(**dict(base, status="failed", check="error"), reason=err_text(e))
    step = cs.stepper(fwd, leaves, ctx.grad)
    check = dict(check="-", check_err=math.nan, check_bound=math.nan, checked="")
    try:
        clear_caches()  # no lowered form of an earlier row (same packings) is reused
        _sync(dev)
        t = time.perf_counter()
        step(ctx.warm[0])
        _sync(dev)
        base["first_ms"] = (time.perf_counter() - t) * 1e3
        for p in ctx.warm[1:]:
            step(p)
        comps = []
        for i in range(len(ctx.check)):
            ctx.oracle(i)  # built first: its eager calls are not the row's
        with record_calls() as ran:  # what actually ran on new packings (refusals moving on included)
            for i, p in enumerate(ctx.check):
                comps += _check(ctx, i, fwd, canon, rows_only=base["impl"] == "raw")
        names = list(dict.fromkeys(c.backend for c in ran))
        if base["impl"] == "anyattn" and names and names != base["chosen"].split("/"):
            base["chosen"] = "/".join(names)
        err, bnd, msg = verify.verdict(comps)
        what = "out" + (", dq, dk, dv" if ctx.grad else "") + (" (real tokens)" if base["impl"] == "raw" and ctx.case == "padding" else "")
        check = dict(check="FAIL" if msg else "ok", check_err=err, check_bound=bnd, checked=f"{what} on {len(ctx.check)} packing(s)")
        if msg:
            return Row(**dict(base, status="failed", **check), reason=msg)
        times, wall = _time_steps(step, ctx.timed, dev)
    except Exception as e:  # noqa: BLE001
        free(opts.device)
        if check["check"] == "-":
            check["check"] = "error"
        return Row(**dict(base, status="failed", **check), reason=err_text(e))
    ms = statistics.median(times)
    flops = statistics.fmean(4 * D * cs.pairs(ctx.case, p, H) * (3.5 if ctx.grad else 1.0) for p in ctx.timed)
    return Row(
        **dict(base, status="ok", ms=ms, wall_ms=wall, tflops=flops / (ms * 1e-3) / 1e12, **check),
        times_ms=tuple(round(x, 4) for x in times),
    )


def _chosen(name: str, ctx: _Ctx, form: str) -> str | None:
    """The backend(s) ``name`` resolves to on the checked packings and the first timed one
    ("a/b" when they differ); "refused: ..." when it cannot serve the case."""
    q, k, v = (t.detach().transpose(1, 2).requires_grad_(ctx.grad) for t in ctx.leaves)
    term = cs.term(ctx.case, form, q.device, q.shape[2])
    seen = []
    with torch.set_grad_enabled(ctx.grad):
        for p in [*ctx.check, ctx.timed[0]]:
            d = explain(q, k, v, mask=term(p), backend=name, full=False)
            if d.chosen is None:
                rows = [r for r in d.rows if r.status in ("rejected", "unavailable")]
                if name != "auto":
                    rows = [r for r in rows if r.backend == name] or rows
                return "refused: " + "; ".join(f"{r.backend}: {r.reason}" for r in rows)[:400]
            if d.chosen not in seen:
                seen.append(d.chosen)
    return "/".join(seen)


def _check(ctx: _Ctx, i: int, fwd, canon, rows_only: bool) -> list:
    p = ctx.check[i]
    orc = ctx.oracle(i)
    with torch.set_grad_enabled(ctx.grad):
        out = canon(fwd(p))
        grads = torch.autograd.grad(out, ctx.leaves, orc.dout.to(out.dtype)) if ctx.grad else ()
    return orc.compare(out.detach(), [g.detach() for g in grads], rows_only)


def _fill_best(rows: list[Row], case: str, mode: str) -> list[Row]:
    refs = [
        r.ms for r in rows
        if r.case == case and r.mode == mode and r.status == "ok" and (r.backend, r.form) in BEST_OF[case]
    ]  # fmt: skip
    best = min(refs, default=math.nan)
    return [
        dataclasses.replace(r, x_best=r.ms / best if r.status == "ok" and best == best else math.nan)
        if r.case == case and r.mode == mode else r
        for r in rows
    ]  # fmt: skip


# ---------------------------------------------------------------------------------------------
# the run


def run(opts: Options, *, command: str = "", out_dir: str | None = None, log=print) -> dict:
    """Run every case x mode x row; returns the report (also written to ``out_dir`` after
    every row)."""
    from .report import write_json, write_text

    t0 = time.perf_counter()
    doc = {
        "schema": SCHEMA,
        "meta": {"command": command, **environment(opts.device)},
        "options": {**dataclasses.asdict(opts)},
        "timing": (
            "CUDA event pair around each whole step (host work included), median over the steps; "
            "wall_ms = wall time of all timed steps / steps, one synchronization at the end"
            if torch.device(opts.device).type == "cuda" else "time.perf_counter per step (CPU), median"
        ),
        "flop_convention": "useful FLOPs = 4*D*visible (b,h,i,j) pairs; fwd+bwd = 3.5 x fwd; mean over the timed packings",
        "best_of": {c: [f"{b}" + (f" [{f}]" if f else "") for b, f in BEST_OF[c]] for c in opts.cases},
        "complete": False,
        "interrupted": None,
        "elapsed_s": 0.0,
        "results": [],
        "targets": [],
    }
    rows: list[Row] = []

    def flush():
        doc["elapsed_s"] = round(time.perf_counter() - t0, 1)
        doc["results"] = [dataclasses.asdict(r) for r in rows]
        doc["targets"] = targets(rows)
        if out_dir:
            write_json(out_dir, "new_packing.json", doc)
            write_text(out_dir, "new_packing.md", markdown(doc))

    n = opts.warmup + opts.check_steps + opts.steps
    try:
        for case in opts.cases:
            packs = cs.packings(opts, case, n)
            warm, check, timed = packs[: opts.warmup], packs[opts.warmup : n - opts.steps], packs[n - opts.steps :]
            for mode in opts.modes:
                leaves = _leaves(opts, case, mode == "fwd+bwd")
                ctx = _Ctx(opts, case, mode, leaves, warm, check, timed)
                log(f"new-packing {case} {mode}: {_shape(leaves)}, {len(timed)} timed steps")
                for name, form in _row_specs(opts, case):
                    r = _run_row(ctx, name, form, t0)
                    rows.append(r)
                    rows[:] = _fill_best(rows, case, mode)
                    log("  " + _line(r))
                    flush()
                del ctx, leaves
                free(opts.device)
        doc["complete"] = True
    except KeyboardInterrupt as e:  # Ctrl-C or SIGTERM (timeout): keep what was measured
        doc["interrupted"] = str(e) or "KeyboardInterrupt"
    finally:
        clear_caches()
        flush()
    return doc


def _shape(leaves) -> str:
    B, S, H, D = leaves[0].shape
    return f"B={B} S={S} H={H} D={D} {leaves[0].dtype}".replace("torch.", "")


# ---------------------------------------------------------------------------------------------
# output


def _name(r) -> str:
    g = r.get if isinstance(r, dict) else lambda k: getattr(r, k)
    n = g("backend")
    if g("impl") == "anyattn" and g("backend") == "auto" and g("chosen"):
        n = f"auto>{g('chosen')}"
    return n + (f" [{g('form')}]" if g("form") else "")


def _line(r: Row) -> str:
    if r.status == "skipped":
        return f"{_name(r):<28} skipped: {r.reason[:100]}"
    if r.status == "failed":
        return f"{_name(r):<28} FAILED ({r.check}): {r.reason[:120]}"
    return f"{_name(r):<28} {r.ms:8.3f} ms/step  wall {r.wall_ms:8.3f}  first {r.first_ms:9.1f} ms  check {r.check}"


def targets(rows) -> list[dict]:
    """Issue 15's targets for the packing case, as measured (NaN when a row is missing), and the
    same goal for auto on new padding given as lengths (auto within 5% of the best row; not one of
    the issue's targets: it shows whether auto's first-sight padding rows pick the fastest)."""
    out = []
    get = {(r.case, r.mode, r.backend, r.form): r for r in rows if r.status == "ok"}
    for mode in ("fwd+bwd", "fwd"):
        auto = get.get(("packing", mode, "auto", "tensor"))
        ft = get.get(("packing", mode, "flash_torch", "tensor"))
        rv = get.get(("packing", mode, "raw:varlen", ""))
        if auto is not None or ft is not None:
            out.append({"what": f"packing {mode}: auto [tensor] / best of {{raw:varlen, flex, flash_torch}}",
                        "value": auto.x_best if auto else math.nan, "target": 1.05})  # fmt: skip
            out.append({"what": f"packing {mode}: flash_torch [tensor] / raw:varlen",
                        "value": ft.ms / rv.ms if ft and rv else math.nan, "target": 1.05})  # fmt: skip
        pad = get.get(("padding", mode, "auto", "lengths"))
        if pad is not None:
            out.append({"what": f"padding {mode} (goal): auto [lengths] / best of {{raw:sdpa, flex, flash_torch, sdpa}}",
                        "value": pad.x_best, "target": 1.05})  # fmt: skip
    for t in out:
        t["met"] = bool(t["value"] <= t["target"]) if t["value"] == t["value"] else None
    return out


def table(doc: dict) -> str:
    """The stdout table: one block per case and mode."""
    lines = []
    res = doc["results"]
    o = doc["options"]
    for case in o["cases"]:
        for mode in o["modes"]:
            rs = [r for r in res if r["case"] == case and r["mode"] == mode]
            if not rs:
                continue
            r0 = rs[0]
            what = f"docs {o['docs'][0]}..{o['docs'][1]} per row, doc-causal" if case == "packing" else "row lengths S/4..S"
            lines.append(
                f"new {case} every step | {mode} | {r0['dtype']} | B={r0['B']} S={r0['S']} H={r0['H']} D={r0['D']} | "
                f"{r0['steps']} timed steps, {what}"
            )
            lines.append(f"  {'row':<30} {'ms/step':>8} {'wall ms':>8} {'TFLOP/s':>8} {'x best':>7} {'first ms':>9}  check")
            for r in rs:
                if r["status"] == "skipped":
                    lines.append(f"  {_name(r):<30} {'-':>8} {'-':>8} {'-':>8} {'-':>7} {'-':>9}  skipped: {r['reason'][:70]}")
                    continue
                lines.append(
                    f"  {_name(r):<30} {_f(r['ms'], '.3f'):>8} {_f(r['wall_ms'], '.3f'):>8} {_tf(r['tflops']):>8} "
                    f"{_f(r['x_best'], '.2f'):>7} {_f(r['first_ms'], '.1f'):>9}  {r['check']}"
                    + (f": {r['reason'][:80]}" if r["status"] == "failed" else "")
                )
    for t in doc.get("targets", []):
        met = {True: "met", False: "NOT met", None: "not measured"}[t["met"]]
        lines.append(f"target: {t['what']} = {_f(t['value'], '.3f')} (<= {t['target']}): {met}")
    return "\n".join(lines)


def markdown(doc: dict) -> str:
    m = doc["meta"]
    out = [
        "# anyattn bench kernels --mode new-packing",
        "",
        f"- command: `{m['command']}`",
        f"- device: {m['device_name']}; torch {m['torch']}, CUDA {m['cuda']}, triton {m['triton']}, anyattn {m['anyattn']}",
        f"- date: {m['date']}; elapsed {doc['elapsed_s']} s; complete: {doc['complete']}",
        f"- timing: {doc['timing']}",
        f"- FLOPs: {doc['flop_convention']}",
        f"- x best: ms / the best of {doc['best_of']}",
        "",
        "```",
        table(doc),
        "```",
        "",
    ]
    skipped = [r for r in doc["results"] if r["status"] != "ok" and r["reason"]]
    if skipped:
        out += ["| case | mode | row | status | reason |", "|---|---|---|---|---|"]
        for r in skipped:
            out.append(f"| {r['case']} | {r['mode']} | {_name(r)} | {r['status']} | {r['reason'][:200].replace('|', '/')} |")
    return "\n".join(out) + "\n"


# ---------------------------------------------------------------------------------------------
# command line (``bench kernels --mode new-packing``)


def add_arguments(p) -> None:
    """The options only this mode reads (it also reads --quick, --modes, --backends, --dtypes,
    --heads, --head-dim, --device, --budget-s, --seed, --out)."""
    g = p.add_argument_group("--mode new-packing")
    g.add_argument("--cases", help="comma list of packing,padding (default: both)")
    g.add_argument("--forms", help="term forms, comma list of " + ",".join(f for fs in FORMS.values() for f in fs)
                   + " (default: every form of each case)")  # fmt: skip
    g.add_argument("--steps", type=int, help="timed steps, each a new packing (default 50; --quick 4)")
    g.add_argument("--warmup-steps", type=int, help="warm-up steps before the check and the timing (default 3)")
    g.add_argument("--check-steps", type=int, help="packings checked against the float64 oracle per row (default 2)")
    g.add_argument("--pack-seqlen", type=int, help="packing: tokens in the one row (default 16384)")
    g.add_argument("--docs-range", metavar="LO-HI", help="packing: documents per step, drawn from LO..HI (default 8-24)")
    g.add_argument("--pad-shape", metavar="BxS", help="padding: batch x row length (default 8x2048)")
    g.add_argument("--cpu-flex", action="store_true", help="compile Flex rows on a CPU run too (~5-20 s per kernel)")


_MODE_KEYS = ("cases", "forms", "steps", "warmup_steps", "check_steps", "pack_seqlen", "docs_range", "pad_shape", "cpu_flex")


def options_from_args(a) -> Options:
    from . import args as A

    device = A.device(a.device)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")  # --device default, read now
    o = quick(device) if a.quick else Options(device=device)
    ch: dict = {}
    if a.cases:
        ch["cases"] = A.listopt("cases", a.cases, CASES)
    if a.modes:
        ch["modes"] = A.listopt("modes", a.modes, ("fwd", "fwd+bwd"))
    if a.forms:
        ch["forms"] = A.listopt("forms", a.forms, tuple(f for fs in FORMS.values() for f in fs))
    if a.backends:
        import anyattn

        names = tuple(b.name for b in anyattn.backends())
        raws = tuple(dict.fromkeys(r for rs in RAW_ROWS.values() for r in rs))
        sel = A.listopt("backends", a.backends, (*names, "auto", "anyattn", "raw", *raws))
        ch["backends"] = (*names, "auto") if "anyattn" in sel else tuple(n for n in sel if n in names or n == "auto")
        ch["raw"] = raws if "raw" in sel else tuple(n for n in sel if n in raws)
    if a.dtypes:
        dts = A.listopt("dtypes", a.dtypes, ("bf16", "fp16", "fp32"))
        if len(dts) != 1:
            raise UsageError("--dtypes: --mode new-packing runs one dtype, got " + ",".join(dts))
        ch["dtype"] = dts[0]
    for key, name in (("steps", "steps"), ("warmup", "warmup_steps"), ("check_steps", "check_steps"),
                      ("pack_S", "pack_seqlen"), ("heads", "heads"), ("head_dim", "head_dim")):  # fmt: skip
        v = getattr(a, name, None)
        if v is not None:
            ch[key] = A.posint(name.replace("_", "-"), v)
    if a.docs_range:
        lo, hi = A.shape("docs-range", a.docs_range, 2, "-")
        if lo > hi:
            raise UsageError(f"--docs-range: expected LO <= HI, got {a.docs_range!r}")
        ch["docs"] = (lo, hi)
    if a.pad_shape:
        ch["pad_B"], ch["pad_S"] = A.shape("pad-shape", a.pad_shape, 2, "x")
    if a.cpu_flex:
        ch["cpu_flex"] = True
    if a.budget_s is not None:
        if a.budget_s <= 0:
            raise UsageError(f"--budget-s: expected a positive number of seconds, got {a.budget_s!r}")
        ch["budget_s"] = float(a.budget_s)
    if a.seed is not None:
        ch["seed"] = a.seed
    o = dataclasses.replace(o, **ch)
    if o.docs[1] > o.pack_S:
        raise UsageError(f"--docs-range: at most --pack-seqlen ({o.pack_S}) documents, got {o.docs[1]}")
    return o
