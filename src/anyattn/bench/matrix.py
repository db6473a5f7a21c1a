"""The static matrix of ``bench kernels``: one case (variant x mode x dtype x shape) at a time.

For every case (a frozen :class:`~anyattn.bench.cases.Config`) :func:`run_case`

1. counts the visible pairs exactly (the one FLOP formula, ``cases.attention_flops``);
2. runs each raw torch call (``raw.py``) and each anyattn backend (every registered backend,
   plus ``auto``) that can serve the case; a backend that refuses is recorded as skipped with
   its reason from ``anyattn.explain``;
3. times the first call on its own (compilation), checks the result against the float64 oracle
   (``verify.Reference``: at the full shape, or on its last query rows when the full oracle is
   too big), and only then times the median (``timing.measure``);
4. records a failing or raising row as NaN with the error, and goes on.

:func:`host_overhead` is the matrix's tiny-causal host loop (the ``--mode host`` benchmark in
``hostcall.py`` is the fuller one).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import time
import warnings
from dataclasses import dataclass, field

import torch

from .. import attention, explain
from ..testing import flex_lowering
from . import raw, verify
from .cases import Config, attention_flops, build_inputs, build_terms, fmt_tflops, make_config, score_gib, visible_pairs
from .timing import first_call_ms, host_us_per_call, measure

__all__ = ["Result", "State", "base_row", "err_text", "free", "host_overhead", "run_case"]


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
    lowering: str = ""  # rows that ran flex: "FLASH" | "Triton" | "unfused", and why (from explain)

    @property
    def key(self) -> tuple:
        return (self.variant, self.mode, self.dtype, self.B, self.S)


@dataclass
class State:
    sweep: object  # kernels.Sweep (the run's options)
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


def err_text(e: BaseException) -> str:
    lines = [ln for ln in str(e).splitlines() if ln.strip()]
    return f"{type(e).__name__}: {lines[0][:300] if lines else ''}"


def free(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------
# one case


def base_row(cfg: Config, inp_spec: str, pairs: int) -> dict:
    return dict(
        variant=cfg.variant, mode=cfg.mode, dtype=cfg.dtype, B=cfg.B, S=cfg.S, Hq=cfg.Hq, Hkv=cfg.Hkv, D=cfg.D,
        spec=inp_spec, flops=attention_flops(pairs, cfg.D, cfg.D, cfg.mode), pairs=pairs, chosen="", raw="",
        status="skipped", ms=math.nan, first_ms=math.nan, tflops=math.nan, raw_ms=math.nan, overhead_pct=math.nan,
        check="-", check_err=math.nan, check_bound=math.nan, verify="", reason="",
    )  # fmt: skip


def _anyattn_fn(inp, name: str, grad: bool):
    q, k, v = inp.q, inp.k, inp.v
    kw = inp.kwargs()

    if not grad:
        return lambda: attention(q, k, v, backend=name, **kw)
    dout = torch.randn(q.shape[:-1] + (v.shape[-1],), device=q.device, dtype=q.dtype)

    def fwd_bwd():
        return torch.autograd.grad(attention(q, k, v, backend=name, **kw), (q, k, v), dout)

    return fwd_bwd


def _verdict(row: dict, comps, ref) -> Result | None:
    """Fill the check columns; a failed Result when a comparison is outside its bound."""
    err, b, msg = verify.verdict(comps)
    row.update(check_err=err, check_bound=b, verify=ref.where)
    if msg:
        return Result(**dict(row, status="failed", check="FAIL", reason=msg))
    row["check"] = "ok"
    return None


# flex's two lowerings side by side: "flex:flash" / "flex:triton" run the flex backend with
# its lowering forced (backends/flex_lowering.py); "flex" runs it as users get it (auto).
LOWERED = ("flex:flash", "flex:triton")


@contextlib.contextmanager
def lowered(name: str):
    """Yields the registry name to call for a bench backend name, with flex's lowering forced
    for "flex:flash" / "flex:triton" (decisions and lowered forms are dropped on entry and exit:
    they were taken under the other lowering)."""
    if name not in LOWERED:
        yield name
        return
    with flex_lowering(name.split(":")[1]):
        yield "flex"


def _run_anyattn(name, cfg, inp, get_ref, base, state, raw_ms) -> Result:
    with lowered(name) as be_name:
        return _run_anyattn_as(name, be_name, cfg, inp, get_ref, base, state, raw_ms)


def _run_anyattn_as(name, be_name, cfg, inp, get_ref, base, state, raw_ms) -> Result:
    sw = state.sweep
    row = dict(base, impl="anyattn", backend=name)
    why = state.over_budget()
    if why:
        return Result(**dict(row, reason=why))
    try:
        d = _decide(inp, be_name, cfg.grad)
    except Exception as e:  # noqa: BLE001 - a raising case is recorded, the run goes on
        return Result(**dict(row, status="failed", check="error", reason=err_text(e)))
    if d.chosen is None:
        rows = [r for r in d.rows if r.status in ("rejected", "unavailable")]
        if name != "auto":
            rows = [r for r in rows if r.backend == be_name] or rows
        if name == "auto":
            why = "; ".join(f"{r.backend}: {r.reason}" for r in rows)
        else:
            why = rows[0].reason if rows else "refused"
        return Result(**dict(row, reason=f"refused: {why}"))
    chosen = d.chosen
    row["chosen"] = chosen
    row["lowering"] = lowering_of(d)
    if chosen == "flex":
        why = state.flex_allowed(cfg)
        if why:
            return Result(**dict(row, reason=why))
    if chosen == "eager" and sw.eager_max_gib is not None and score_gib(cfg) > sw.eager_max_gib:
        gib = score_gib(cfg)
        return Result(
            **dict(row, reason=f"eager would materialize {gib:.1f} GiB float32 scores (> {sw.eager_max_gib:g})")
        )
    fn = _anyattn_fn(inp, be_name, cfg.grad)
    try:
        row["first_ms"] = first_call_ms(fn, cfg.device)
        ref = get_ref()
        q, k, v = (t.detach().requires_grad_(cfg.grad) for t in (inp.q, inp.k, inp.v))
        out = attention(q, k, v, backend=be_name, **inp.kwargs())
        grads = torch.autograd.grad(out, (q, k, v), ref.full_dout(out)) if cfg.grad else ()
        failed = _verdict(row, ref.check(out.detach(), grads), ref)
        del out, grads
        if failed is not None:
            return failed
        t = measure(fn, cfg.device)
        if name == "auto":  # the timed calls reuse one mask: auto's choice for values seen before
            d = _decide(inp, be_name, cfg.grad)
            chosen = row["chosen"] = d.chosen or chosen
            row["lowering"] = lowering_of(d)
    except Exception as e:  # noqa: BLE001
        free(cfg.device)
        check = "error" if row["check"] != "ok" else "ok"
        return Result(**dict(row, status="failed", check=check, reason=err_text(e)))
    cp = raw.COUNTERPART.get(chosen, "")
    rms = raw_ms.get(cp, math.nan)
    ovh = 100.0 * (t.ms - rms) / rms if not math.isnan(rms) and rms > 0 else math.nan
    return Result(
        **dict(row, status="ok", ms=t.ms, tflops=fmt_tflops(row["flops"], t.ms), raw=cp if ovh == ovh else "",
               raw_ms=rms, overhead_pct=ovh)
    )  # fmt: skip


def _decide(inp, be_name: str, grad: bool):
    """``explain`` for a case, in its grad mode (the lowering flex takes may depend on it)."""
    return explain(inp.q.detach().requires_grad_(grad), inp.k, inp.v, backend=be_name, **inp.kwargs())


def lowering_of(decision) -> str:
    """The lowering the chosen backend reports in ``explain`` ("FLASH (...)", "Triton (why)"), or ""."""
    for r in decision.rows:
        if r.backend == decision.chosen and "lowering: " in r.reason:
            return r.reason.split("lowering: ", 1)[1]
    return ""


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
        return Result(**dict(row, status="failed", check="error", reason=err_text(e)))
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
        free(cfg.device)
        check = "error" if row["check"] != "ok" else "ok"
        return Result(**dict(row, status="failed", check=check, reason=err_text(e)))
    return Result(**dict(row, status="ok", ms=t.ms, tflops=fmt_tflops(row["flops"], t.ms)))


def run_case(cfg: Config, state: State) -> list[Result]:
    sw = state.sweep
    pairs = _pairs(dataclasses.replace(cfg, mode="fwd", dtype="fp32", device="cpu"))
    inp = build_inputs(cfg)
    base = base_row(cfg, inp.spec, pairs)
    cache: dict = {}

    def get_ref() -> verify.Reference:
        if "ref" not in cache:
            cache["ref"] = verify.Reference(inp, verify.check_rows(cfg, sw.verify_max_elems), cfg.grad)
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
    free(cfg.device)
    return out


# ---------------------------------------------------------------------------------------------
# host overhead


def host_overhead(state: State) -> list[dict]:
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
        if name in LOWERED:  # host cost does not depend on flex's lowering
            continue
        rec = {"backend": name, "chosen": "", "raw": "", "n_calls": n, "shape": cfg.shape, "dtype": cfg.dtype,
               "anyattn_us": math.nan, "raw_us": math.nan, "overhead_us": math.nan, "reason": ""}  # fmt: skip
        try:
            d = explain(inp.q, inp.k, inp.v, backend=name, **inp.kwargs())
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
            rec["reason"] = err_text(e)
        rows.append(rec)
    return rows
