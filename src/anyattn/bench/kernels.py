"""``anyattn bench kernels``: attention variants x modes x dtypes x backends, next to raw torch calls.

Three modes (``--mode``; docs/benchmarks.md):

* ``matrix`` (default): the static matrix, one case at a time (``matrix.py``): every anyattn
  backend and ``auto`` next to the raw torch calls (``raw.py``), each row checked against the
  float64 oracle before its median is taken; results written after every case (``--out``), so a
  run cut short leaves what it measured.
* ``new-packing``: a new random packing (or padding) every step, mask terms built inside the
  step the way a user does (``churn.py``).
* ``host``: tiny calls where host time dominates, cached and freshly built masks vs raw SDPA
  (``hostcall.py``).

This module holds the matrix's options (:class:`Sweep`, :func:`preset`), the run loop and the
command line; ``verify.py`` has the oracle check, ``report.py`` the matrix's tables and files.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import sys
from dataclasses import dataclass

import torch

from .. import backends as _backends
from . import UsageError, raw, report
from . import args as args_
from . import churn, hostcall
from .cases import DTYPES, MODES, VARIANTS, Config, make_config
from .env import environment
from .matrix import LOWERED, Result, State, base_row, err_text, free, host_overhead, run_case
from .verify import check_rows

__all__ = [
    "VARIANTS", "Result", "Sweep", "add_arguments", "check_rows", "environment", "host_overhead", "preset", "run",
    "run_case", "run_from_args", "sweep_from_args",
]  # fmt: skip

SCHEMA = "anyattn.bench.kernels/1"
HELP = "time every attention variant on every backend, next to raw torch calls"


# ---------------------------------------------------------------------------------------------
# configuration


def _registered() -> tuple[str, ...]:
    """Every registered anyattn backend name (available here or not), in registry order."""
    return tuple(b.name for b in _backends())


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
        return (*_registered(), "auto") if self.backends is None else self.backends

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
            dtypes=("bf16",), shapes=((8, 2048),), variant_shapes=(("documents", 1, 16384), ("window", 1, 16384), ("doc_window", 1, 16384)),
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
# the run


def _raise_recompile_limit(state: State) -> None:
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
    state = State(sweep)
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
                free(cfg.device)
                b = base_row(cfg, "", 0)
                rows = [
                    Result(
                        **dict(b, impl="anyattn", backend="(case)", status="failed", check="error", reason=err_text(e))
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


MODES_CLI = ("matrix", "new-packing", "host")


def add_arguments(p) -> None:
    p.add_argument(
        "--mode", choices=MODES_CLI, default="matrix",
        help="matrix: every variant x backend vs raw calls (default); new-packing: a new packing/padding every "
        "step; host: host time of tiny calls, cached and fresh masks (see docs/benchmarks.md)",
    )  # fmt: skip
    p.add_argument(
        "--preset", choices=["h200"], help="h200: bf16, H=16, D=128, 16k tokens per call (see docs/benchmarks.md)"
    )
    p.add_argument("--quick", action="store_true", help="tiny CPU smoke sizes (< 1 min on a laptop CPU)")
    p.add_argument("--variants", help=f"comma list of {','.join(VARIANTS)} (default: all)")
    p.add_argument("--backends", help="comma list of anyattn backends and 'auto', 'raw' (all raw calls) or raw:NAME; "
                   "flex:flash / flex:triton run flex with that lowering forced (docs/fa4.md) "
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
    p.add_argument("--no-host-overhead", action="store_true",
                   help="matrix: skip the tiny-causal host loop before the cases (--mode host is the fuller one)")  # fmt: skip
    p.add_argument("--seed", type=int, help="--mode new-packing/host: random packings and inputs (default 0)")
    churn.add_arguments(p)
    hostcall.add_arguments(p)


# options that only one mode reads: giving them to another mode is an error, not a silent no-op
_ONLY = {
    "matrix": ("preset", "variants", "seqlen", "batch", "window", "docs", "sweep", "no_host_overhead"),
    "new-packing": (*churn._MODE_KEYS, "modes", "heads", "head_dim", "budget_s", "seed"),
    "host": hostcall._MODE_KEYS,
}
_SHARED_MODES = {"modes": ("matrix", "new-packing"), "heads": ("matrix", "new-packing"),
                 "head_dim": ("matrix", "new-packing"), "budget_s": ("matrix", "new-packing"), "seed": ("new-packing", "host")}  # fmt: skip


def _check_mode_options(args) -> None:
    mode = args.mode
    for owner, keys in _ONLY.items():
        for k in keys:
            allowed = _SHARED_MODES.get(k, (owner,))
            v = getattr(args, k, None)
            if mode not in allowed and v not in (None, False):
                raise UsageError(f"--{k.replace('_', '-')} applies to --mode {' or '.join(allowed)}, not --mode {mode}")


_SWEEP_KEYS = ("variants", "backends", "modes", "dtypes", "seqlen", "batch", "heads", "head_dim", "window", "docs",
               "device", "budget_s", "shapes", "preset", "quick")  # fmt: skip


_listopt, _posint, _out_dir = args_.listopt, args_.posint, args_.out_dir


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
        registered = _registered()
        valid = (*registered, "auto", "raw", "anyattn", *LOWERED, *raw.RAW_NAMES)
        names = _listopt("backends", opts["backends"], valid)
        anyattn_names = [n for n in names if n in registered or n == "auto" or n in LOWERED]
        if "anyattn" in names:
            anyattn_names = [*registered, "auto"]
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
    if getattr(args, "no_host_overhead", False):
        ch["host_overhead"] = False
    return dataclasses.replace(sw, **ch)


def run_from_args(args, command: str = "anyattn bench kernels") -> int:
    _check_mode_options(args)
    _out_dir("out", args.out)  # before measuring: the files are written at the end
    if args.mode == "new-packing":
        return _run_mode(churn, churn.options_from_args(args), args, command)
    if args.mode == "host":
        return _run_mode(hostcall, hostcall.options_from_args(args), args, command)
    sw = sweep_from_args(args)
    _sigterm_as_interrupt()  # a killed run (timeout) still writes its final files
    doc = run(sw, out_dir=args.out, command=command, progress=not args.no_progress)
    report.print_final(doc, out_dir=args.out)
    if doc.get("interrupted"):
        return 130
    failed = sum(r["status"] == "failed" for r in doc["results"])
    return 1 if failed else 0


def _run_mode(mod, opts, args, command: str) -> int:
    """--mode new-packing / host: run, then print the table (stdout ends with it)."""
    if torch.device(opts.device).type == "cpu" and (args.quick or mod is hostcall) and torch.get_num_threads() != 1:
        # tiny shapes gain nothing from intra-op threads; on a busy machine OpenMP barriers
        # turn a 40 us call into milliseconds
        torch.set_num_threads(1)
    _sigterm_as_interrupt()
    doc = mod.run(opts, command=command, out_dir=args.out)
    if args.out:
        name = "new_packing" if mod is churn else "host"
        print(f"\nwrote {os.path.join(args.out, name + '.json')} (.md)")
    if not doc["complete"]:
        print("run INCOMPLETE (interrupted): the table holds what was measured")
    m = doc["meta"]
    print(f"\n{m['device_name']} | torch {m['torch']} | anyattn {m['anyattn']} | {doc['elapsed_s']} s")
    print(mod.table(doc))
    if doc.get("interrupted"):
        return 130
    return 1 if any(r["status"] == "failed" for r in doc["results"]) else 0
