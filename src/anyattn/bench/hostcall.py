"""``anyattn bench kernels --mode host``: the host cost of one call, where the host dominates.

A tiny problem (default B=1, H=1, S=64, D=64) called ``--host-calls`` times back to back with one
synchronization at the end: the GPU finishes each kernel before the host issues the next one, so
microseconds per call are host time (Python, validation, the cached call key, lowering, launch).
Every row is measured in ``--host-rounds`` interleaved rounds (row 1, row 2, ..., row 1, ...), so a
slow moment of the machine hits every row alike; the median round is reported.

Rows (the term, and any tensor in it, built where the row says)::

    raw sdpa is_causal          F.scaled_dot_product_attention(q, k, v, is_causal=True)
    raw sdpa docs mask [cached] attn_mask = the (S, S) bool mask of documents([30, 34]), built once
    raw sdpa docs mask [fresh]  the same mask built from the Python list in every call
    raw sdpa keep [fresh]       attn_mask = keep[:, None, None, :], keep a fresh (B, S) bool tensor
    raw sdpa dense [fresh]      attn_mask = a fresh (B, 1, S, S) bool tensor
    X causal() [cached]         attention(q, k, v, mask=m, backend=X), m = causal() built once
    X causal() [fresh]          mask=causal() built in every call
    X documents(list) [cached]  m = documents([30, 34]) & causal() built once
    X documents(list) [fresh]   mask=documents([30, 34]) & causal(), the list written in the call
    X padding(mask=) [fresh]    mask=padding(mask=keep), keep a fresh tensor every call
    X dense() [fresh]           mask=dense(m), m a fresh tensor every call

Fresh tensors are ``.clone()`` s of a pool of different patterns (cycled), on the device, the
same clones for the raw and the anyattn rows: each call gets a new tensor with new contents,
the way a research loop builds a mask per call (and the way the identity-keyed cache bug of issue
15 showed up). X is ``auto`` unless ``--backends`` names others. The documents rows are the
issue's ``documents([30, 34])`` written as a Python list, doc-causal.

``over_sdpa_us`` is a row's time minus raw SDPA is_causal (the issue's reference: a cached call
<= 10 us over it, a documents(list) call built fresh <= 30 us over it); ``over_counterpart_us``
is the row's time minus the raw SDPA row that computes the same thing with the same freshness.

Check (before timing): every row's output against float64 eager on every pattern of its pool,
called in sequence (raw rows on the query rows that see a key; SDPA leaves the others to its
kernel), within ``verify.bound``. A wrong or raising row prints NaN and the run goes on.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .. import attention, causal, clear_caches, dense, documents, explain, padding
from . import verify
from .cases import DTYPES
from .env import environment
from .matrix import err_text

__all__ = ["SCHEMA", "HostOptions", "quick", "run", "table"]

SCHEMA = "anyattn.bench.kernels.host/1"
DOCS = [30, 34]  # the issue's documents([30, 34])


@dataclass(frozen=True)
class HostOptions:
    B: int = 1
    H: int = 1
    S: int = 64
    D: int = 64
    dtype: str | None = None  # default bf16 on CUDA, fp32 on CPU
    device: str = "cuda" if torch.cuda.is_available() else "cpu"
    backends: tuple[str, ...] = ("auto",)
    calls: int = 1000  # calls per round
    rounds: int = 7
    pool: int = 4  # fresh-tensor patterns cycled through
    seed: int = 0

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype or ("bf16" if torch.device(self.device).type == "cuda" else "fp32")]


def quick(device: str = "cpu") -> HostOptions:
    """A few hundred calls per row: a smoke test of the mode and its schema, not a measurement."""
    return HostOptions(device=device, calls=50, rounds=3, pool=2)


@dataclass
class _Spec:
    name: str
    impl: str  # raw | anyattn
    backend: str  # "" for raw
    term: str  # what the row computes (shared with its counterpart)
    fresh: bool
    fn: object  # the call
    outputs: object  # () -> list of (output, oracle kwargs) over the pool, for the check
    counterpart: str = ""  # raw row name
    rows_only: bool = False  # raw: compare only rows that see a key


@dataclass(frozen=True)
class HostRow:
    name: str
    impl: str
    backend: str
    chosen: str
    term: str
    fresh: bool
    status: str  # ok | failed | skipped
    us: float  # median over rounds of microseconds per call
    us_min: float  # fastest round
    rounds_us: tuple
    over_sdpa_us: float  # us - raw sdpa is_causal
    counterpart: str
    over_counterpart_us: float
    check: str
    check_err: float
    check_bound: float
    reason: str


def _docs_mask(S: int, dev) -> torch.Tensor:
    """The (S, S) bool mask of documents(DOCS) & causal(), as a user writes it from the list."""
    ids = torch.repeat_interleave(torch.arange(len(DOCS), device=dev), torch.tensor(DOCS, device=dev))
    if ids.numel() < S:  # tokens past the documents: their own id, never visible
        ids = torch.cat([ids, torch.full((S - ids.numel(),), -1, device=dev)])
    i = torch.arange(S, device=dev)
    return (ids[:, None] == ids[None, :]) & (ids[:, None] >= 0) & (i[None, :] <= i[:, None])


def _specs(o: HostOptions, q, k, v) -> list[_Spec]:
    dev, B, S = q.device, o.B, o.S
    g = torch.Generator().manual_seed(o.seed + 1)
    # pools of patterns: keep-masks with S/2..S real tokens per row, dense masks with the
    # diagonal visible (so that raw SDPA never sees an empty row)
    keeps = [(torch.arange(S)[None, :] < torch.randint(S // 2, S + 1, (B, 1), generator=g)).to(dev) for _ in range(o.pool)]
    denses = [((torch.rand(B, 1, S, S, generator=g) < 0.5) | torch.eye(S, dtype=torch.bool)).to(dev) for _ in range(o.pool)]
    it = {"keep": 0, "dense": 0}

    def fresh(kind, pool):
        def get():
            i = it[kind] = (it[kind] + 1) % len(pool)
            return pool[i].clone()

        return get

    fresh_keep, fresh_dense = fresh("keep", keeps), fresh("dense", denses)
    docs_cached = _docs_mask(S, dev)
    sdpa = F.scaled_dot_product_attention

    # (output, oracle kwargs) for the check: every pattern of the pool, called in sequence
    def pooled(call, kwargs_of, pool, getter_kind):
        def outs():
            res = []
            for i in range(len(pool)):
                it[getter_kind] = i - 1  # the next get() returns pool[i]
                res.append((call(), kwargs_of(pool[i])))
            return res

        return outs

    def once(call, kw):
        return lambda: [(call(), kw)]

    dm = documents(DOCS) & causal()

    def raw_row(name, term, is_fresh, call, outs, rows_only=False):
        return _Spec(name, "raw", "", term, is_fresh, call, outs, rows_only=rows_only)

    def keep_call():
        return sdpa(q, k, v, attn_mask=fresh_keep()[:, None, None, :])

    def dense_call():
        return sdpa(q, k, v, attn_mask=fresh_dense())

    def causal_call():
        return sdpa(q, k, v, is_causal=True)

    def docs_cached_call():
        return sdpa(q, k, v, attn_mask=docs_cached)

    def docs_fresh_call():
        return sdpa(q, k, v, attn_mask=_docs_mask(S, dev))

    specs = [
        raw_row("raw sdpa is_causal", "causal", False, causal_call, once(causal_call, {"mask": causal()})),
        # rows_only: with S > 64 the tokens past the documents see nothing (NaN rows in SDPA)
        raw_row("raw sdpa docs mask [cached]", "documents", False, docs_cached_call, once(docs_cached_call, {"mask": dm}), rows_only=True),
        raw_row("raw sdpa docs mask [fresh]", "documents", True, docs_fresh_call, once(docs_fresh_call, {"mask": dm}), rows_only=True),
        raw_row("raw sdpa keep [fresh]", "padding", True, keep_call,
                pooled(keep_call, lambda t: {"mask": padding(mask=t)}, keeps, "keep"), rows_only=True),
        raw_row("raw sdpa dense [fresh]", "dense", True, dense_call,
                pooled(dense_call, lambda t: {"mask": dense(t)}, denses, "dense")),
    ]  # fmt: skip
    for be in o.backends:
        m_causal = causal()

        def a(mask_fn, be=be):
            return lambda: attention(q, k, v, mask=mask_fn(), backend=be)

        rows = [
            ("causal() [cached]", "causal", False, lambda m=m_causal: m, "raw sdpa is_causal", None),
            ("causal() [fresh]", "causal", True, causal, "raw sdpa is_causal", None),
            ("documents(list) [cached]", "documents", False, lambda m=dm: m, "raw sdpa docs mask [cached]", None),
            # the list literal written in the call, as the issue's user does (== DOCS)
            ("documents(list) [fresh]", "documents", True, lambda: documents([30, 34]) & causal(), "raw sdpa docs mask [fresh]", None),
            ("padding(mask=) [fresh]", "padding", True, lambda: padding(mask=fresh_keep()), "raw sdpa keep [fresh]", ("keep", keeps, lambda t: {"mask": padding(mask=t)})),
            ("dense() [fresh]", "dense", True, lambda: dense(fresh_dense()), "raw sdpa dense [fresh]", ("dense", denses, lambda t: {"mask": dense(t)})),
        ]  # fmt: skip
        for label, term, is_fresh, mask_fn, cp, pool in rows:
            call = a(mask_fn)
            outs = pooled(call, pool[2], pool[1], pool[0]) if pool else once(call, {"mask": mask_fn()})
            specs.append(_Spec(f"{be} {label}", "anyattn", be, term, is_fresh, call, outs, counterpart=cp))
    return specs


def _check(spec: _Spec, q, k, v) -> tuple[str, float, float, str]:
    """(check, err, bound, failure message) of a row on every pattern of its pool."""
    from ..testing import oracle

    comps = []
    with torch.no_grad():
        for out, kw in spec.outputs():
            ref64 = oracle(q, k, v, **kw)
            ref = attention(q, k, v, backend="eager", **kw)
            rows = None
            if spec.rows_only:  # SDPA's rows with no visible key are its own
                rows = torch.isfinite(oracle(q, k, v, return_lse=True, **kw).lse)[..., None]
            comps.append(("out", verify.maxdiff(out, ref64, rows), verify.bound(verify.maxdiff(ref, ref64, rows))))
    err, bnd, msg = verify.verdict(comps)
    return ("FAIL" if msg else "ok"), err, bnd, msg


def _us_per_call(fn, dev, n: int) -> float:
    if dev.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) * 1e6 / n


def run(o: HostOptions, *, command: str = "", out_dir: str | None = None, log=print) -> dict:
    from .report import write_json, write_text

    t0 = time.perf_counter()
    dev, dt = torch.device(o.device), o.torch_dtype
    g = torch.Generator().manual_seed(o.seed)
    q, k, v = (torch.randn(o.B, o.H, o.S, o.D, generator=g).to(dev, dt) for _ in range(3))
    clear_caches()
    specs = _specs(o, q, k, v)
    doc = {
        "schema": SCHEMA,
        "meta": {"command": command, **environment(o.device)},
        "options": {**dataclasses.asdict(o), "dtype": str(dt).removeprefix("torch.")},
        "timing": f"{o.calls} back-to-back calls and one synchronization per round, {o.rounds} interleaved rounds, median round",
        "complete": False,
        "interrupted": None,
        "elapsed_s": 0.0,
        "results": [],
        "targets": [],
    }
    log(f"host overhead: q{tuple(q.shape)} {doc['options']['dtype']} on {doc['meta']['device_name']}, {len(specs)} rows")
    state = {}  # name -> dict of row fields
    try:
        live = []
        for s in specs:  # refusals, checks and warm-up first: nothing is timed before its check
            st = dict(name=s.name, impl=s.impl, backend=s.backend, chosen="", term=s.term, fresh=s.fresh, status="skipped",
                      us=math.nan, us_min=math.nan, rounds_us=(), over_sdpa_us=math.nan, counterpart=s.counterpart,
                      over_counterpart_us=math.nan, check="-", check_err=math.nan, check_bound=math.nan, reason="")  # fmt: skip
            state[s.name] = st
            try:
                if s.impl == "anyattn":
                    d = explain(q, k, v, mask=_probe_mask(s.term, o, dev), backend=s.backend, full=False)
                    if d.chosen is None:
                        st["reason"] = "refused: " + "; ".join(f"{r.backend}: {r.reason}" for r in d.rows if r.status in ("rejected", "unavailable"))[:300]
                        continue
                    st["chosen"] = d.chosen
                    if d.chosen == "flex" and dev.type == "cpu":
                        st["reason"] = "skipped on CPU: a new Flex kernel compiles for ~5-20 s"
                        continue
                for _ in range(5):
                    s.fn()
                st["check"], st["check_err"], st["check_bound"], msg = _check(s, q, k, v)
                if msg:
                    st.update(status="failed", reason=msg)
                    continue
                live.append(s)
            except Exception as e:  # noqa: BLE001 - a raising row is recorded, the run goes on
                st.update(status="failed", check="error" if st["check"] == "-" else st["check"], reason=err_text(e))
        for r in range(o.rounds):
            for s in live:
                state[s.name].setdefault("_rounds", []).append(_us_per_call(s.fn, dev, o.calls))
        for s in live:
            st = state[s.name]
            rs = st.pop("_rounds")
            st.update(status="ok", us=statistics.median(rs), us_min=min(rs), rounds_us=tuple(round(x, 2) for x in rs))
        doc["complete"] = True
    except KeyboardInterrupt as e:
        doc["interrupted"] = str(e) or "KeyboardInterrupt"
    finally:
        for st in state.values():
            st.pop("_rounds", None)
        base = state.get("raw sdpa is_causal", {}).get("us", math.nan)
        for st in state.values():
            st["over_sdpa_us"] = st["us"] - base
            cp = state.get(st["counterpart"], {}).get("us", math.nan)
            st["over_counterpart_us"] = st["us"] - cp
        rows = [HostRow(**st) for st in state.values()]
        doc["results"] = [dataclasses.asdict(r) for r in rows]
        doc["targets"] = _targets(rows, o.backends)
        doc["elapsed_s"] = round(time.perf_counter() - t0, 1)
        clear_caches()
        if out_dir:
            write_json(out_dir, "host.json", doc)
            write_text(out_dir, "host.md", markdown(doc))
    return doc


def _probe_mask(term: str, o: HostOptions, dev):
    """A representative mask of a row's term, for asking ``explain`` which backend serves it."""
    if term == "causal":
        return causal()
    if term == "documents":
        return documents(DOCS) & causal()
    if term == "padding":
        return padding(mask=torch.ones(o.B, o.S, dtype=torch.bool, device=dev))
    return dense(torch.ones(o.B, 1, o.S, o.S, dtype=torch.bool, device=dev))


def _targets(rows, backends) -> list[dict]:
    by = {r.name: r for r in rows}
    out = []
    for be in backends:
        for label, target in (("causal() [cached]", 10.0), ("documents(list) [fresh]", 30.0)):
            r = by.get(f"{be} {label}")
            v = r.over_sdpa_us if r is not None else math.nan
            out.append({"what": f"{be} {label}: us over raw sdpa is_causal", "value": v, "target": target,
                        "met": bool(v <= target) if v == v else None})  # fmt: skip
    return out


def _f(x, fmt) -> str:
    return "nan" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)


def table(doc: dict) -> str:
    o = doc["options"]
    lines = [
        f"host overhead per call: B={o['B']} H={o['H']} S={o['S']} D={o['D']} {o['dtype']}, "
        f"{o['calls']} calls x {o['rounds']} rounds, one sync per round (median round)",
        f"  {'row':<34} {'us/call':>8} {'over sdpa':>9} {'over cp':>8}  check  counterpart",
    ]
    for r in doc["results"]:
        name = r["name"] if not (r["backend"] == "auto" and r["chosen"]) else r["name"].replace("auto ", f"auto>{r['chosen']} ", 1)
        if r["status"] == "skipped":
            lines.append(f"  {name:<34} {'-':>8} {'-':>9} {'-':>8}  skipped: {r['reason'][:70]}")
            continue
        extra = f"  {r['reason'][:80]}" if r["status"] == "failed" else ""
        over = "" if r["impl"] == "raw" and r["name"] == "raw sdpa is_causal" else _f(r["over_sdpa_us"], "+.1f")
        lines.append(
            f"  {name:<34} {_f(r['us'], '.1f'):>8} {over:>9} {_f(r['over_counterpart_us'], '+.1f') if r['counterpart'] else '':>8}  "
            f"{r['check']:<5}  {r['counterpart']}{extra}"
        )
    for t in doc.get("targets", []):
        met = {True: "met", False: "NOT met", None: "not measured"}[t["met"]]
        lines.append(f"target: {t['what']} = {_f(t['value'], '+.1f')} (<= {t['target']:g}): {met}")
    return "\n".join(lines)


def markdown(doc: dict) -> str:
    m = doc["meta"]
    return "\n".join([
        "# anyattn bench kernels --mode host",
        "",
        f"- command: `{m['command']}`",
        f"- device: {m['device_name']}; torch {m['torch']}, CUDA {m['cuda']}, anyattn {m['anyattn']}",
        f"- date: {m['date']}; elapsed {doc['elapsed_s']} s; complete: {doc['complete']}",
        f"- timing: {doc['timing']}",
        "",
        "```",
        table(doc),
        "```",
        "",
    ])  # fmt: skip


# ---------------------------------------------------------------------------------------------
# command line (``bench kernels --mode host``)


def add_arguments(p) -> None:
    """The options only this mode reads (it also reads --quick, --backends, --dtypes, --device,
    --seed, --out)."""
    g = p.add_argument_group("--mode host")
    g.add_argument("--host-calls", type=int, help="calls per round (default 1000; --quick 50)")
    g.add_argument("--host-rounds", type=int, help="interleaved rounds per row, the median is reported (default 7)")
    g.add_argument("--host-shape", metavar="B,H,S,D", help="the tiny call's shape (default 1,1,64,64)")


_MODE_KEYS = ("host_calls", "host_rounds", "host_shape")


def options_from_args(a) -> HostOptions:
    from . import UsageError
    from . import args as A

    device = A.device(a.device)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")  # --device default, read now
    o = quick(device) if a.quick else HostOptions(device=device)
    ch: dict = {}
    if a.backends:
        import anyattn

        names = tuple(b.name for b in anyattn.backends())
        ch["backends"] = A.listopt("backends", a.backends, (*names, "auto"))
    if a.dtypes:
        dts = A.listopt("dtypes", a.dtypes, ("bf16", "fp16", "fp32"))
        if len(dts) != 1:
            raise UsageError("--dtypes: --mode host runs one dtype, got " + ",".join(dts))
        ch["dtype"] = dts[0]
    if a.host_calls is not None:
        ch["calls"] = A.posint("host-calls", a.host_calls)
    if a.host_rounds is not None:
        ch["rounds"] = A.posint("host-rounds", a.host_rounds)
    if a.host_shape:
        ch["B"], ch["H"], ch["S"], ch["D"] = A.shape("host-shape", a.host_shape, 4, ",")
        if ch["S"] < sum(DOCS):
            raise UsageError(f"--host-shape: S must hold documents({DOCS}) ({sum(DOCS)} tokens), got S={ch['S']}")
    if a.seed is not None:
        ch["seed"] = a.seed
    return dataclasses.replace(o, **ch)
