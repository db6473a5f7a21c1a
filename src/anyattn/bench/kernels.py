"""``anyattn bench kernels``: variants x modes x dtypes x backends, next to raw torch calls.

For every case (a frozen :class:`~anyattn.bench.cases.Config`) the runner

1. counts the visible pairs exactly (the one FLOP formula, ``cases.attention_flops``);
2. runs each raw torch call (``raw.py``) and each anyattn backend (every entry of the backend
   registry, plus ``auto``) that can serve the case; a backend that refuses is recorded as
   skipped with its reason from ``anyattn.explain``;
3. times the first call on its own (compilation), checks the result against the float64 oracle
   (at a reduced shape of the same variant when the full one is too big for float64 eager), and
   only then times the median (``timing.measure``);
4. records a failing or raising row as NaN with the error, and goes on.

Results are written after every case (``--out``), so a run cut short leaves what it measured.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import importlib.util
import math
import os
import platform
import sys
import time
import warnings
from dataclasses import dataclass, field

import torch

from .. import api as _api
from ..backends import REGISTRY
from . import UsageError, raw, report
from .cases import (
    DTYPES,
    MODES,
    VARIANTS,
    Config,
    attention_flops,
    build_inputs,
    build_terms,
    fmt_tflops,
    make_config,
    score_gib,
    visible_pairs,
)
from .timing import first_call_ms, host_us_per_call, measure, timing_method

__all__ = ["Result", "Sweep", "add_arguments", "preset", "run", "run_from_args", "sweep_from_args"]

SCHEMA = "anyattn.bench.kernels/1"
HELP = "time every attention variant on every backend, next to raw torch calls"


# ---------------------------------------------------------------------------------------------
# configuration


@dataclass(frozen=True)
class Sweep:
    """Everything one ``bench kernels`` run measures."""

    variants: tuple[str, ...] = VARIANTS
    modes: tuple[str, ...] = MODES
    dtypes: tuple[str, ...] = ("bf16", "fp16")
    backends: tuple[str, ...] | None = None  # anyattn backends (registry names, "auto"); None = all
    raw: tuple[str, ...] = raw.RAW_NAMES  # raw torch calls
    shapes: tuple[tuple[int, int], ...] = ((4, 2048),)  # (batch, seqlen) for every variant
    variant_shapes: tuple[tuple[str, int, int], ...] = ()  # per-variant (variant, batch, seqlen)
    heads: int = 16
    head_dim: int = 128
    window: int = 1024
    docs: int = 16
    cap: float = 50.0
    device: str = "cuda" if torch.cuda.is_available() else "cpu"
    budget_s: float | None = None  # stop compiling at 80% of it, stop measuring at 100%
    flex_cases: int | None = None  # at most this many cases compile flex (anyattn or raw)
    host_overhead: bool = True
    preset: str | None = None
    verify_max_elems: int = 1 << 25  # float64 reference over at most this many scores (B*Hq*R*S)
    eager_max_gib: float | None = None  # skip eager when a float32 score matrix is larger
    cpu_threads: int | None = None  # torch.set_num_threads for a CPU run (None: leave as is)

    def all_backends(self) -> tuple[str, ...]:
        return (*REGISTRY, "auto") if self.backends is None else self.backends

    def configs(self) -> list[Config]:
        shapes_for = {v: (b, s) for v, b, s in self.variant_shapes}
        out = []
        for B, S in self.shapes:
            for mode in self.modes:
                for dtype in self.dtypes:
                    for var in self.variants:
                        b, s = shapes_for.get(var, (B, S))
                        out.append(
                            make_config(
                                var, mode, dtype, B=b, S=s, H=self.heads, D=self.head_dim, window=self.window,
                                n_docs=self.docs, cap=self.cap, device=self.device,
                            )
                        )  # fmt: skip
        return list(dict.fromkeys(out))  # per-variant shapes can repeat across shape sweeps


def preset(name: str, device: str | None = None) -> Sweep:
    """Named sweeps. ``h200``: DESIGN.md section 6's setting; ``quick``: a CPU smoke test."""
    if name == "h200":
        # 16k tokens per call: B=8 x S=2048, except the long-sequence variants at B=1 x S=16384.
        # Budget: ~7 min on an H200 incl. Flex compiles; rows needing a new compile are skipped
        # (with that reason) past 80% of it, everything past 100%.
        return Sweep(
            dtypes=("bf16",), shapes=((8, 2048),), variant_shapes=(("documents", 1, 16384), ("window", 1, 16384)),
            heads=16, head_dim=128, window=1024, docs=16, cap=50.0, device=device or "cuda", budget_s=420.0,
            preset="h200", eager_max_gib=4.0,
        )  # fmt: skip
    if name == "quick":
        # Tiny shapes; Flex compiles for one case only (each CPU Flex kernel compiles ~5-20 s).
        return Sweep(
            dtypes=("bf16",), shapes=((2, 64),), heads=2, head_dim=32, window=16, docs=4, cap=20.0,
            device=device or ("cuda" if torch.cuda.is_available() else "cpu"), flex_cases=1, preset="quick",
            cpu_threads=1,
        )  # fmt: skip
    raise UsageError(f"--preset: expected one of ['h200'], got {name!r}")


# ---------------------------------------------------------------------------------------------
# results


@dataclass(frozen=True)
class Result:
    """One row: an anyattn backend or a raw torch call on one case. NaN where not measured."""

    variant: str
    mode: str
    dtype: str
    impl: str  # "anyattn" | "raw"
    backend: str  # anyattn: registry name or "auto"; raw: "raw:..."
    chosen: str  # the backend that ran ("auto" resolves to one); "" for raw rows
    B: int
    S: int
    Hq: int
    Hkv: int
    D: int
    spec: str  # the anyattn mask/score of the case
    status: str  # "ok" | "failed" | "skipped"
    ms: float  # median milliseconds per call (NaN unless ok)
    first_ms: float  # first call at full shape, incl. compilation (NaN if not run)
    tflops: float  # useful TFLOP/s (NaN unless ok)
    flops: float  # useful FLOPs per call (forward, or forward + backward)
    pairs: int  # visible (b, h, i, j) pairs
    raw: str  # raw counterpart for the overhead ("" if none)
    raw_ms: float
    overhead_pct: float  # 100 * (ms - raw_ms) / raw_ms
    check: str  # "ok" | "FAIL" | "error" | "-" (not checked)
    check_err: float  # worst max-abs error vs the float64 oracle
    check_bound: float  # its bound: 2 x (3 x for grads) eager-same-dtype error + 1e-5 (1e-4)
    verify: str  # where it was checked: "full shape" or "reduced: B=.. S=.."
    reason: str  # why skipped, or the error

    @property
    def key(self) -> tuple:
        return (self.variant, self.mode, self.dtype, self.B, self.S)


@dataclass
class _State:
    sweep: Sweep
    t0: float = field(default_factory=time.perf_counter)
    flex_keys: set = field(default_factory=set)
    results: list = field(default_factory=list)
    host: list = field(default_factory=list)
    notes: list = field(default_factory=list)

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def over_budget(self, compile_: bool = False) -> str | None:
        b = self.sweep.budget_s
        if b is None:
            return None
        limit = 0.8 * b if compile_ else b
        if self.elapsed() > limit:
            what = "new compilations stop at 80% of" if compile_ else "measuring stops at"
            return f"time budget: {what} --budget-s {b:g} (elapsed {self.elapsed():.0f} s)"
        return None

    def flex_allowed(self, cfg: Config) -> str | None:
        why = self.over_budget(compile_=True)
        if why:
            return why
        key = (cfg.variant, cfg.mode, cfg.dtype, cfg.B, cfg.S)
        if key in self.flex_keys:
            return None
        lim = self.sweep.flex_cases
        if lim is not None and len(self.flex_keys) >= lim:
            return f"Flex compiles limited to {lim} case(s) in this run (each new kernel compiles for seconds)"
        self.flex_keys.add(key)
        return None


@functools.lru_cache(maxsize=256)
def _pairs(cfg: Config) -> int:
    """Visible pairs of a case (cached: the same for every mode and dtype)."""
    return visible_pairs(build_terms(cfg).mask, cfg.B, cfg.Hq, cfg.S, cfg.S)


def _err_text(e: BaseException) -> str:
    lines = [ln for ln in str(e).splitlines() if ln.strip()]
    return f"{type(e).__name__}: {lines[0][:300] if lines else ''}"


def _free(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------
# one case


def _base(cfg: Config, inp_spec: str, pairs: int) -> dict:
    return dict(
        variant=cfg.variant, mode=cfg.mode, dtype=cfg.dtype, B=cfg.B, S=cfg.S, Hq=cfg.Hq, Hkv=cfg.Hkv, D=cfg.D,
        spec=inp_spec, flops=attention_flops(pairs, cfg.D, cfg.D, cfg.mode), pairs=pairs, chosen="", raw="",
        status="skipped", ms=math.nan, first_ms=math.nan, tflops=math.nan, raw_ms=math.nan, overhead_pct=math.nan,
        check="-", check_err=math.nan, check_bound=math.nan, verify="", reason="",
    )  # fmt: skip


def _anyattn_fn(inp, name: str, grad: bool):
    from ..api import attention

    q, k, v = inp.q, inp.k, inp.v
    kw = inp.kwargs()

    if not grad:
        return lambda: attention(q, k, v, backend=name, **kw)
    dout = torch.randn(q.shape[:-1] + (v.shape[-1],), device=q.device, dtype=q.dtype)

    def fwd_bwd():
        return torch.autograd.grad(attention(q, k, v, backend=name, **kw), (q, k, v), dout)

    return fwd_bwd


class _Reference:
    """The float64 oracle and same-dtype eager on the last ``R`` query rows of a case.

    With bottom-right alignment the last R queries of a call with Sq = R and the full keys are
    exactly the last R rows of the full call, so the backend under test runs at the full shape
    (the kernel that is timed, no extra compilation) and only the reference is small. Gradients:
    the upstream gradient is nonzero only on those rows, so dk and dv of the full call equal
    those of the sliced reference, and dq is zero elsewhere. R = S when the full oracle fits.
    """

    def __init__(self, inp, R: int, grad: bool):
        q, k, v = inp.q.detach(), inp.k.detach(), inp.v.detach()
        self.S, self.R, self.grad, self.kw = q.shape[2], R, grad, inp.kwargs()
        g = torch.Generator().manual_seed(1)
        self.dout = torch.randn(q.shape[:2] + (R, v.shape[-1]), generator=g, dtype=torch.float64).to(q.device)
        res = {}
        for name, dt in (("oracle", torch.float64), ("ref", q.dtype)):
            qs = q[:, :, self.S - R :].to(dt).requires_grad_(grad)
            ks, vs = k.to(dt).requires_grad_(grad), v.to(dt).requires_grad_(grad)
            with torch.set_grad_enabled(grad):
                r = _api.attention(qs, ks, vs, backend="eager", return_lse=True, **self.kw)
            grads = torch.autograd.grad(r.out, (qs, ks, vs), self.dout.to(dt)) if grad else ()
            res[name] = (r.out.detach(), r.lse.detach(), [x.detach() for x in grads])
        self.out, self.lse, self.grads = res["oracle"]
        self.ref_out, _, self.ref_grads = res["ref"]
        self.rows = torch.isfinite(self.lse)[..., None]

    @property
    def where(self) -> str:
        return "full shape" if self.R == self.S else f"last {self.R} query rows of the full shape"

    def check(self, out, grads=(), rows_only=False) -> list[tuple[str, float, float]]:
        """(name, err, bound) for the output (and q, k, v gradients) of the full-shape call."""
        rows = self.rows if rows_only else None
        res = []
        err = _maxdiff(out[:, :, self.S - self.R :], self.out, rows)
        res.append(("out", err, 2 * _maxdiff(self.ref_out, self.out, rows) + 1e-5))
        for i, n in enumerate(("dq", "dk", "dv")[: len(grads)]):
            got = grads[i]
            if n == "dq":  # rows outside the slice had zero upstream gradient
                outside = got[:, :, : self.S - self.R]
                spill = float(outside.abs().max()) if outside.numel() else 0.0
                got = got[:, :, self.S - self.R :]
            err = _maxdiff(got, self.grads[i])
            if n == "dq" and spill == spill:
                err = max(err, spill) if err == err else err
            res.append((n, err, 3 * _maxdiff(self.ref_grads[i], self.grads[i]) + 1e-4))
        return res

    def full_dout(self, out):
        d = torch.zeros_like(out)
        d[:, :, self.S - self.R :] = self.dout.to(out.dtype)
        return d


def _maxdiff(a, b, rows=None) -> float:
    d = (a.detach().double() - b.detach().double()).abs()
    if rows is not None:
        d = torch.where(rows, d, torch.zeros_like(d))
    if torch.isnan(d).any():
        return math.nan
    return float(d.max()) if d.numel() else 0.0


def _verdict(row: dict, comps, ref) -> Result | None:
    """Fill the check columns; a failed Result when a comparison is outside its bound."""
    worst = max(comps, key=lambda c: (c[1] / c[2]) if c[1] == c[1] else math.inf)
    row.update(check_err=worst[1], check_bound=worst[2], verify=ref.where)
    bad = [c for c in comps if not c[1] <= c[2]]  # NaN never passes
    if bad:
        msg = "; ".join(f"{n} err {e:.3g} > bound {b:.3g}" for n, e, b in bad)
        return Result(**dict(row, status="failed", check="FAIL", reason=f"wrong result vs float64 oracle: {msg}"))
    row["check"] = "ok"
    return None


def _run_anyattn(name, cfg, inp, get_ref, base, state, raw_ms) -> Result:
    sw = state.sweep
    row = dict(base, impl="anyattn", backend=name)
    why = state.over_budget()
    if why:
        return Result(**dict(row, reason=why))
    try:
        d = _api.explain(inp.q, inp.k, inp.v, backend=name, **inp.kwargs())
    except Exception as e:  # noqa: BLE001 - a raising case is recorded, the run goes on
        return Result(**dict(row, status="failed", check="error", reason=_err_text(e)))
    if d.chosen is None:
        rows = [r for r in d.rows if r.status in ("rejected", "unavailable")]
        if name != "auto":
            rows = [r for r in rows if r.backend == name] or rows
        if name == "auto":
            why = "; ".join(f"{r.backend}: {r.reason}" for r in rows)
        else:
            why = rows[0].reason if rows else "refused"
        return Result(**dict(row, reason=f"refused: {why}"))
    chosen = d.chosen
    row["chosen"] = chosen
    if chosen == "flex":
        why = state.flex_allowed(cfg)
        if why:
            return Result(**dict(row, reason=why))
    if chosen == "eager" and sw.eager_max_gib is not None and score_gib(cfg) > sw.eager_max_gib:
        gib = score_gib(cfg)
        return Result(
            **dict(row, reason=f"eager would materialize {gib:.1f} GiB float32 scores (> {sw.eager_max_gib:g})")
        )
    fn = _anyattn_fn(inp, name, cfg.grad)
    try:
        row["first_ms"] = first_call_ms(fn, cfg.device)
        ref = get_ref()
        q, k, v = (t.detach().requires_grad_(cfg.grad) for t in (inp.q, inp.k, inp.v))
        out = _api.attention(q, k, v, backend=name, **inp.kwargs())
        grads = torch.autograd.grad(out, (q, k, v), ref.full_dout(out)) if cfg.grad else ()
        failed = _verdict(row, ref.check(out.detach(), grads), ref)
        del out, grads
        if failed is not None:
            return failed
        t = measure(fn, cfg.device)
    except Exception as e:  # noqa: BLE001
        _free(cfg.device)
        check = "error" if row["check"] != "ok" else "ok"
        return Result(**dict(row, status="failed", check=check, reason=_err_text(e)))
    cp = raw.COUNTERPART.get(chosen, "")
    rms = raw_ms.get(cp, math.nan)
    ovh = 100.0 * (t.ms - rms) / rms if not math.isnan(rms) and rms > 0 else math.nan
    return Result(
        **dict(row, status="ok", ms=t.ms, tflops=fmt_tflops(row["flops"], t.ms), raw=cp if ovh == ovh else "",
               raw_ms=rms, overhead_pct=ovh)
    )  # fmt: skip


def _run_raw(name, cfg, inp, get_ref, base, state) -> Result:
    row = dict(base, impl="raw", backend=name)
    why = state.over_budget()
    if why:
        return Result(**dict(row, reason=why))
    if name == "raw:flex":
        if cfg.device == "cpu" and cfg.grad:
            return Result(**dict(row, reason="FlexAttention has no backward on CPU"))
        why = state.flex_allowed(cfg)
        if why:
            return Result(**dict(row, reason=why))
    try:
        prep = raw.prepare(name, cfg, inp)
    except raw.Skip as e:
        return Result(**dict(row, reason=str(e)))
    except Exception as e:  # noqa: BLE001
        return Result(**dict(row, status="failed", check="error", reason=_err_text(e)))
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                row["first_ms"] = first_call_ms(prep.run, cfg.device)
            except Exception as e:
                why = raw.refusal(e, caught)
                if why:
                    return Result(**dict(row, reason=why))
                raise
        if not cfg.grad:  # raw rows: forward, on rows that see a key (raw kernels leave garbage on the others)
            with torch.no_grad():
                out = prep.forward()
            ref = get_ref()
            failed = _verdict(row, ref.check(out, rows_only=True), ref)
            del out
            if failed is not None:
                return failed
        t = measure(prep.run, cfg.device)
    except Exception as e:  # noqa: BLE001
        _free(cfg.device)
        check = "error" if row["check"] != "ok" else "ok"
        return Result(**dict(row, status="failed", check=check, reason=_err_text(e)))
    return Result(**dict(row, status="ok", ms=t.ms, tflops=fmt_tflops(row["flops"], t.ms)))


def check_rows(cfg: Config, max_elems: int) -> int:
    """Query rows the float64 reference covers: all when B*Hq*S*S <= max_elems, else the last R."""
    per_row = cfg.B * cfg.Hq * cfg.S
    return max(1, min(cfg.S, max_elems // per_row))


def run_case(cfg: Config, state: _State) -> list[Result]:
    sw = state.sweep
    pairs = _pairs(dataclasses.replace(cfg, mode="fwd", dtype="fp32", device="cpu"))
    inp = build_inputs(cfg)
    base = _base(cfg, inp.spec, pairs)
    cache: dict = {}

    def get_ref() -> _Reference:
        if "ref" not in cache:
            cache["ref"] = _Reference(inp, check_rows(cfg, sw.verify_max_elems), cfg.grad)
        return cache["ref"]

    out: list[Result] = []
    raw_ms: dict = {}
    for name in sw.raw:  # raw first: the anyattn rows report their overhead against them
        r = _run_raw(name, cfg, inp, get_ref, base, state)
        out.append(r)
        if r.status == "ok":
            raw_ms[name] = r.ms
    for name in sw.all_backends():
        out.append(_run_anyattn(name, cfg, inp, get_ref, base, state, raw_ms))
    cache.clear()
    _free(cfg.device)
    return out


# ---------------------------------------------------------------------------------------------
# host overhead


def host_overhead(state: _State) -> list[dict]:
    """Microseconds per call on a tiny causal case, N calls and one sync: anyattn vs raw."""
    sw = state.sweep
    cuda = torch.device(sw.device).type == "cuda"
    B, S, H, D = (1, 128, 4, 64) if cuda else (1, 32, 2, 32)
    n = 500 if cuda else 200
    cfg = make_config(
        "causal", "fwd", sw.dtypes[0], B=B, S=S, H=H, D=D, window=16, n_docs=1, cap=sw.cap, device=sw.device
    )
    inp = build_inputs(cfg)
    rows = []
    for name in sw.all_backends():
        rec = {"backend": name, "chosen": "", "raw": "", "n_calls": n, "shape": cfg.shape, "dtype": cfg.dtype,
               "anyattn_us": math.nan, "raw_us": math.nan, "overhead_us": math.nan, "reason": ""}  # fmt: skip
        try:
            d = _api.explain(inp.q, inp.k, inp.v, backend=name, **inp.kwargs())
            if d.chosen is None:
                rec["reason"] = "refused"
                rows.append(rec)
                continue
            rec["chosen"] = d.chosen
            cp = raw.COUNTERPART.get(d.chosen)
            if cp is None:
                rec["reason"] = f"no raw counterpart for {d.chosen}"
                rows.append(rec)
                continue
            if d.chosen == "flex" and not cuda:
                rec["reason"] = "skipped on CPU: a new Flex kernel compiles for ~5-20 s"
                rows.append(rec)
                continue
            if d.chosen == "flex" and state.over_budget(compile_=True):
                rec["reason"] = state.over_budget(compile_=True)
                rows.append(rec)
                continue
            prep = raw.prepare(cp, cfg, inp)
            fn = _anyattn_fn(inp, name, False)
            rec["raw"] = cp
            rec["anyattn_us"] = host_us_per_call(fn, sw.device, n)
            rec["raw_us"] = host_us_per_call(prep.run, sw.device, n)
            rec["overhead_us"] = rec["anyattn_us"] - rec["raw_us"]
        except raw.Skip as e:
            rec["reason"] = str(e)
        except Exception as e:  # noqa: BLE001
            rec["reason"] = _err_text(e)
        rows.append(rec)
    return rows


# ---------------------------------------------------------------------------------------------
# the run


def environment(device: str) -> dict:
    import anyattn

    dev = torch.device(device)
    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "device": dev.type,
        "device_name": (torch.cuda.get_device_name() if dev.type == "cuda" else f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if dev.type == "cuda" and torch.backends.cudnn.is_available() else None,
        "triton": _version("triton"),
        "anyattn": anyattn.__version__,
        "platform": platform.platform(),
        "timing": timing_method(device),
    }  # fmt: skip
    return env


def _version(dist: str):
    if importlib.util.find_spec(dist) is None:
        return None
    try:
        from importlib.metadata import version

        return version(dist)
    except Exception:  # noqa: BLE001 - importable but without metadata
        return "unknown"


def _raise_recompile_limit(state: _State) -> None:
    cfg = torch._dynamo.config
    for attr in ("recompile_limit", "cache_size_limit"):
        if hasattr(cfg, attr) and getattr(cfg, attr) < 64:
            setattr(cfg, attr, 64)
            state.notes.append(
                f"torch._dynamo.config.{attr} raised to 64 for this process (one compiled entry serves several variants)"
            )
            break


def run(sweep: Sweep, *, out_dir: str | None = None, command: str = "", progress: bool = True, log=print) -> dict:
    """Run the sweep; return the report dict (also written to ``out_dir`` after every case)."""
    state = _State(sweep)
    _raise_recompile_limit(state)
    if sweep.cpu_threads and torch.device(sweep.device).type == "cpu" and torch.get_num_threads() != sweep.cpu_threads:
        # Tiny shapes gain nothing from intra-op threads, and on a busy machine OpenMP barriers
        # turn a 40 us call into 16 ms.
        torch.set_num_threads(sweep.cpu_threads)
        state.notes.append(f"CPU run with torch.set_num_threads({sweep.cpu_threads}) (tiny shapes)")
    configs = sweep.configs()
    meta = {"command": command, **environment(sweep.device), "preset": sweep.preset}
    doc = {
        "schema": SCHEMA,
        "meta": meta,
        "sweep": _sweep_dict(sweep),
        "flop_convention": "useful FLOPs = 2*(D+Dv)*visible (b,h,i,j) pairs (= 4*B*Hq*D*pairs per head); fwd+bwd = 3.5 x fwd",
        "notes": state.notes,
        "complete": False,
        "interrupted": None,
        "elapsed_s": 0.0,
        "host_overhead": state.host,
        "results": [],
    }

    def flush(final=False):
        doc["elapsed_s"] = round(state.elapsed(), 1)
        doc["results"] = [dataclasses.asdict(r) for r in state.results]
        if out_dir:
            report.write_outputs(out_dir, doc, state.results, final=final, log=log)

    bar = _progress(len(configs), progress)
    log(
        f"anyattn bench kernels: {len(configs)} cases on {meta['device_name']} (torch {meta['torch']}, timing: {meta['timing']})"
    )
    try:
        if sweep.host_overhead:
            state.host.extend(host_overhead(state))
            flush()
        for i, cfg in enumerate(configs):
            if bar is not None:
                bar.set_description(f"{cfg.variant} {cfg.mode} {cfg.dtype}")
            try:
                rows = run_case(cfg, state)
            except Exception as e:  # noqa: BLE001 - building the case itself failed: record it, go on
                _free(cfg.device)
                b = _base(cfg, "", 0)
                rows = [
                    Result(
                        **dict(b, impl="anyattn", backend="(case)", status="failed", check="error", reason=_err_text(e))
                    )
                ]
            state.results.extend(rows)
            msg = report.case_line(i + 1, len(configs), cfg, rows)
            if bar is not None:
                bar.write(msg)
                bar.update(1)
            else:
                log(msg)
            flush()
        doc["complete"] = True
    except KeyboardInterrupt as e:  # Ctrl-C or SIGTERM (timeout): keep what was measured
        doc["interrupted"] = str(e) or "KeyboardInterrupt"
    finally:
        if bar is not None:
            bar.close()
        flush(final=True)
    return doc


def _sigterm_as_interrupt() -> None:
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return

    def handler(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, handler)


def _progress(n, enabled):
    if not enabled or importlib.util.find_spec("tqdm") is None:
        return None
    from tqdm import tqdm

    return tqdm(total=n, unit="case", file=sys.stderr, dynamic_ncols=True)


def _sweep_dict(sw: Sweep) -> dict:
    d = dataclasses.asdict(sw)
    d["backends"] = list(sw.all_backends())
    return d


# ---------------------------------------------------------------------------------------------
# command line


def add_arguments(p) -> None:
    p.add_argument(
        "--preset", choices=["h200"], help="h200: bf16, H=16, D=128, 16k tokens per call (see docs/benchmarks.md)"
    )
    p.add_argument("--quick", action="store_true", help="tiny CPU smoke sizes (< 1 min on a laptop CPU)")
    p.add_argument("--variants", help=f"comma list of {','.join(VARIANTS)} (default: all)")
    p.add_argument("--backends", help="comma list of anyattn backends and 'auto', 'raw' (all raw calls) or raw:NAME "
                   "(default: every registered backend, auto and every raw call)")  # fmt: skip
    p.add_argument("--modes", help="comma list of fwd,fwd+bwd (default: both)")
    p.add_argument("--dtypes", help=f"comma list of {','.join(DTYPES)} (default: bf16,fp16)")
    p.add_argument("--seqlen", type=int, help="sequence length S for every variant")
    p.add_argument("--batch", type=int, help="batch size B for every variant")
    p.add_argument("--heads", type=int, help="query heads Hq (the gqa variant uses Hkv = Hq/4)")
    p.add_argument("--head-dim", type=int, help="head dim D")
    p.add_argument("--window", type=int, help="keys before the query in the window variant (default 1024)")
    p.add_argument("--docs", type=int, help="packed documents per row in the documents variant (default 16)")
    p.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    p.add_argument("--budget-s", type=float, help="time budget: no new compiles past 80%%, nothing past 100%%")
    p.add_argument("--sweep", metavar="FILE.yaml", help="a sweep file (needs pyyaml); command-line options win")
    p.add_argument("--out", metavar="DIR", help="write kernels.json/.csv/.md/.png here (updated after every case)")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")


_SWEEP_KEYS = ("variants", "backends", "modes", "dtypes", "seqlen", "batch", "heads", "head_dim", "window", "docs",
               "device", "budget_s", "shapes", "preset", "quick")  # fmt: skip


def _listopt(name: str, value, valid) -> tuple[str, ...]:
    items = value if isinstance(value, (list, tuple)) else str(value).split(",")
    items = tuple(str(x).strip() for x in items if str(x).strip())
    if not items:
        raise UsageError(f"--{name}: expected a comma list of {list(valid)}, got an empty list")
    bad = [x for x in items if x not in valid]
    if bad:
        raise UsageError(f"--{name}: unknown {bad}; expected a comma list of {list(valid)}")
    return tuple(dict.fromkeys(items))


def _posint(name: str, v) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
        raise UsageError(f"--{name}: expected a positive integer, got {v!r}")
    return v


def _load_sweep_file(path: str) -> dict:
    if importlib.util.find_spec("yaml") is None:
        raise UsageError("--sweep needs PyYAML: pip install pyyaml  (or pip install 'anyattn[bench]')")
    import yaml

    if not os.path.isfile(path):
        raise UsageError(f"--sweep: no such file {path!r}")
    with open(path) as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise UsageError(f"--sweep {path}: expected a mapping of options, got {type(data).__name__}")
    bad = [k for k in data if k.replace("-", "_") not in _SWEEP_KEYS]
    if bad:
        raise UsageError(f"--sweep {path}: unknown keys {bad}; expected some of {list(_SWEEP_KEYS)}")
    return {k.replace("-", "_"): v for k, v in data.items()}


def sweep_from_args(args) -> Sweep:
    """Defaults < --preset/--quick < --sweep file < command-line options."""
    opts = {}
    if args.sweep:
        opts.update(_load_sweep_file(args.sweep))
    for k in _SWEEP_KEYS:
        v = getattr(args, k, None)
        if v is not None and v is not False:  # 0 is a value (and an error), not "unset"
            opts[k] = v
    device = opts.get("device")
    if device is not None and device not in ("cuda", "cpu"):
        raise UsageError(f"--device: expected cuda or cpu, got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: torch.cuda.is_available() is False on this machine")
    if opts.get("preset") and opts.get("quick"):
        raise UsageError("--preset and --quick exclude each other")
    if opts.get("preset"):
        sw = preset(opts["preset"], device)
        if sw.device == "cuda" and not torch.cuda.is_available():
            raise UsageError("--preset h200 needs a CUDA GPU (torch.cuda.is_available() is False); use --quick on CPU")
    elif opts.get("quick"):
        sw = preset("quick", device)
    else:
        sw = Sweep(device=device or Sweep.device, dtypes=("bf16", "fp16"))
    ch = {}
    if "variants" in opts:
        ch["variants"] = _listopt("variants", opts["variants"], VARIANTS)
    if "modes" in opts:
        ch["modes"] = _listopt("modes", opts["modes"], MODES)
    if "dtypes" in opts:
        ch["dtypes"] = _listopt("dtypes", opts["dtypes"], tuple(DTYPES))
    if "backends" in opts:
        valid = (*REGISTRY, "auto", "raw", "anyattn", *raw.RAW_NAMES)
        names = _listopt("backends", opts["backends"], valid)
        anyattn_names = [n for n in names if n in REGISTRY or n == "auto"]
        if "anyattn" in names:
            anyattn_names = [*REGISTRY, "auto"]
        raw_names = [n for n in names if n.startswith("raw:")]
        if "raw" in names:
            raw_names = list(raw.RAW_NAMES)
        ch["backends"] = tuple(anyattn_names)
        ch["raw"] = tuple(raw_names)
    for k in ("heads", "head_dim", "window", "docs"):
        if k in opts:
            ch[k] = _posint(k.replace("_", "-"), opts[k])
    if "budget_s" in opts:
        b = opts["budget_s"]
        if not isinstance(b, (int, float)) or b <= 0:
            raise UsageError(f"--budget-s: expected a positive number of seconds, got {b!r}")
        ch["budget_s"] = float(b)
    if "shapes" in opts:
        shapes = opts["shapes"]
        if not isinstance(shapes, list) or not all(
            isinstance(s, dict) and set(s) <= {"batch", "seqlen"} for s in shapes
        ):
            raise UsageError("sweep 'shapes': expected a list of {batch: B, seqlen: S} mappings")
        ch["shapes"] = tuple((_posint("batch", s.get("batch", 1)), _posint("seqlen", s["seqlen"])) for s in shapes)
        ch["variant_shapes"] = ()
    if "seqlen" in opts or "batch" in opts:
        S = _posint("seqlen", opts["seqlen"]) if "seqlen" in opts else None
        B = _posint("batch", opts["batch"]) if "batch" in opts else None
        base = ch.get("shapes", sw.shapes)
        ch["shapes"] = tuple((B or b, S or s) for b, s in base)
        ch["variant_shapes"] = tuple((v, B or b, S or s) for v, b, s in sw.variant_shapes) if "shapes" not in ch else ()
        if S is not None:  # one explicit length for every variant
            ch["variant_shapes"] = ()
            ch["shapes"] = tuple(dict.fromkeys((B or b, S) for b, _ in base))
    return dataclasses.replace(sw, **ch)


def run_from_args(args, command: str = "anyattn bench kernels") -> int:
    sw = sweep_from_args(args)
    _sigterm_as_interrupt()  # a killed run (timeout) still writes its final files
    doc = run(sw, out_dir=args.out, command=command, progress=not args.no_progress)
    report.print_final(doc, out_dir=args.out)
    if doc.get("interrupted"):
        return 130
    failed = sum(r["status"] == "failed" for r in doc["results"])
    return 1 if failed else 0
