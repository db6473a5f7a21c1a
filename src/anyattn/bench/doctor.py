"""``anyattn doctor``: what this machine can run, whether it computes the right numbers, how fast.

1. environment: python, torch, CUDA, cuDNN, GPUs, optional packages (version or not installed);
2. backends: every registered backend, available or not and why;
3. correctness: each available backend vs the float64 oracle (``anyattn.testing.compare_to_oracle``)
   on small cases (dense, causal, documents, padding, sliding window, softcap): float32 on CPU,
   bf16 on CUDA, with gradients wherever the backend has a backward. A backend that refuses a
   case shows "refused: <reason>", which is not a failure. Compiled Flex costs seconds per new
   kernel (5-20 s on a CPU), so it is checked on a few cases only (``--full``: all);
4. speed: one medium causal case per backend (ms, useful TFLOP/s).

Exit status 1 when a check that ran failed (wrong numbers or an unexpected exception) or a
backend named with ``--backend`` is unavailable.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import math
import platform
import sys
import time

import torch

from .. import api as _api
from ..backends import REGISTRY
from ..spec import causal, documents, padding, sliding_window, softcap
from ..testing import compare_to_oracle, generate_qkv
from . import UsageError
from .cases import attention_flops, fmt_tflops, visible_pairs
from .timing import first_call_ms, measure, timing_method

__all__ = ["HELP", "add_arguments", "diagnose", "run_from_args"]

HELP = "check this machine: environment, backends, correctness vs the float64 oracle, speed"
SCHEMA = "anyattn.doctor/1"

# (distribution, import name)
PACKAGES = (
    ("tqdm", "tqdm"),
    ("matplotlib", "matplotlib"),
    ("pyyaml", "yaml"),
    ("transformers", "transformers"),
    ("flash-attn", "flash_attn"),
    ("kernels", "kernels"),
    ("triton", "triton"),
)
CHECK_VARIANTS = ("dense", "causal", "documents", "padding", "window", "softcap")
# Compiled Flex: one kernel per variant and grad mode, seconds each. CPU: one variant, forward.
FLEX_VARIANTS = {"cpu": ("causal",), "cuda": ("dense", "causal", "documents")}


def add_arguments(p) -> None:
    p.add_argument("--json", metavar="PATH", help="write the whole report as JSON")
    p.add_argument("--backend", action="append", metavar="NAME",
                   help="check only this backend (repeat, or a comma list); its being unavailable is an error")  # fmt: skip
    p.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    p.add_argument("--full", action="store_true", help="check Flex on every case (compiles one kernel per case)")
    p.add_argument("--no-speed", action="store_true", help="skip the speed probe")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")


def _version(dist: str, module: str):
    if importlib.util.find_spec(module) is None:
        return None
    try:
        from importlib.metadata import version

        return version(dist)
    except Exception:  # noqa: BLE001 - importable, but no distribution metadata
        return "installed (version unknown)"


def environment() -> dict:
    import anyattn

    gpus = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            gpus.append(
                {
                    "index": i,
                    "name": p.name,
                    "capability": f"{p.major}.{p.minor}",
                    "memory_gib": round(p.total_memory / 2**30, 1),
                }
            )
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "gpus": gpus,
        "cpu_threads": torch.get_num_threads(),
        "anyattn": anyattn.__version__,
    }


def _case(variant: str, device: str):
    """Small inputs: CPU float32 B=2 Hq=4 S=48 D=32; CUDA bf16 B=2 Hq=8 Hkv=2 S=300 D=64."""
    if device == "cuda":
        B, Hq, Hkv, S, D, dt = 2, 8, 2, 300, 64, torch.bfloat16
        docs, lens, win, cap = [100, 37, 150, 13], [300, 171], 64, 30.0
    else:
        B, Hq, Hkv, S, D, dt = 2, 4, 4, 48, 32, torch.float32
        docs, lens, win, cap = [20, 17, 11], [48, 30], 8, 20.0
    kw = {
        "dense": {},
        "causal": {"mask": causal()},
        "documents": {"mask": documents(docs)},
        "padding": {"mask": padding(torch.tensor(lens))},
        "window": {"mask": sliding_window(win)},
        "softcap": {"score": softcap(cap)},
    }[variant]
    q, k, v = generate_qkv(B, Hq, Hkv, S, None, D, dtype=dt, device=device)
    return q, k, v, kw


def _decide(q, k, v, kw, name):
    """(grad, None) when the backend serves the case with gradients, (False, note) forward only,
    (None, reason) when it refuses outright."""
    qg, kg, vg = (t.detach().requires_grad_(True) for t in (q, k, v))
    d = _api.explain(qg, kg, vg, backend=name, **kw)
    if d.chosen is not None:
        return True, None
    why_grad = next((r.reason for r in d.rows if r.backend == name), "refused")
    d = _api.explain(q, k, v, backend=name, **kw)
    if d.chosen is not None:
        return False, f"forward only ({why_grad})"
    return None, next((r.reason for r in d.rows if r.backend == name), "refused")


@contextlib.contextmanager
def _quiet_build_logs():
    """Flex's first compile on a machine without a GPU imports torch.utils.cpp_extension, which
    logs "No CUDA runtime is found, using CUDA_HOME=..." at import when a CUDA toolkit is
    installed: noise in a CPU report. Its logger is raised to ERROR for the check."""
    log = logging.getLogger("torch.utils.cpp_extension")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def _check(name, variant, device, full) -> dict:
    q, k, v, kw = _case(variant, device)
    rec = {"backend": name, "variant": variant, "device": device, "dtype": str(q.dtype).replace("torch.", ""),
           "shape": f"B={q.shape[0]} Hq={q.shape[1]} Hkv={k.shape[1]} S={q.shape[2]} D={q.shape[3]}",
           "grad": False, "status": "", "err": math.nan, "bound": math.nan, "detail": ""}  # fmt: skip
    if name == "flex" and not full and variant not in FLEX_VARIANTS.get(device, ()):
        rec.update(
            status="skipped",
            detail=f"Flex checked on {', '.join(FLEX_VARIANTS[device])} only (a new compiled kernel costs seconds; --full checks all)",
        )
        return rec
    try:
        grad, note = _decide(q, k, v, kw, name)
        if grad is None:
            rec.update(status="refused", detail=note)
            return rec
        if name == "flex" and device == "cpu":
            grad, note = False, note or "forward only (Flex on CPU: checked forward only)"
        rec["grad"] = grad
        with _quiet_build_logs():
            comps = compare_to_oracle(q, k, v, backend=name, grad=grad, **kw)
    except Exception as e:  # noqa: BLE001 - an unexpected exception is a failed check
        rec.update(status="error", detail=f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}")
        return rec
    worst = max(comps, key=lambda c: c.err / c.bound if c.bound > 0 and c.err == c.err else math.inf)
    rec.update(err=worst.err, bound=worst.bound)
    if all(c.ok for c in comps):
        rec.update(status="ok", detail=note or "")
    else:
        rec.update(status="fail", detail="; ".join(str(c) for c in comps if not c.ok))
    return rec


def _speed(name, device) -> dict:
    if device == "cuda":
        B, H, S, D, dt = 4, 16, 4096, 128, torch.bfloat16
    else:
        B, H, S, D, dt = 1, 8, 1024, 64, torch.float32
    rec = {"backend": name, "case": f"causal fwd B={B} H={H} S={S} D={D} {str(dt).replace('torch.', '')}",
           "status": "", "ms": math.nan, "first_ms": math.nan, "tflops": math.nan, "detail": ""}  # fmt: skip
    if name == "flex" and device == "cpu":
        rec.update(status="skipped", detail="Flex on CPU: a new shape compiles a new kernel (~5-20 s)")
        return rec
    q, k, v = generate_qkv(B, H, None, S, None, D, dtype=dt, device=device)
    mask = causal()
    try:
        d = _api.explain(q, k, v, mask=mask, backend=name)
        if d.chosen is None:
            rec.update(status="refused", detail=next((r.reason for r in d.rows if r.backend == name), ""))
            return rec

        def fn():
            return _api.attention(q, k, v, mask=mask, backend=name)

        rec["first_ms"] = first_call_ms(fn, device)
        t = measure(
            fn, device, warmup_ms=10, rep_ms=150 if device == "cpu" else 100, max_reps=20 if device == "cpu" else 1000
        )
        flops = attention_flops(visible_pairs(mask, B, H, S, S), D)
        rec.update(status="ok", ms=t.ms, tflops=fmt_tflops(flops, t.ms), detail=t.method)
    except Exception as e:  # noqa: BLE001
        rec.update(status="error", detail=f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}")
    return rec


def diagnose(*, backends=None, device=None, full=False, speed=True, progress=True, log=print) -> dict:
    """Build the doctor report (see docs/benchmarks.md for its keys) and print it as it goes."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    t0 = time.perf_counter()
    env = environment()
    pkgs = {dist: _version(dist, mod) for dist, mod in PACKAGES}
    infos = _api.backends()
    report = {"schema": SCHEMA, "ok": True, "exit_code": 0, "device": device, "environment": env, "packages": pkgs,
              "backends": [{"name": b.name, "available": b.available, "reason": b.reason} for b in infos],
              "checks": [], "speed": [], "notes": [], "elapsed_s": 0.0}  # fmt: skip
    log(f"anyattn {env['anyattn']} | python {env['python']} | torch {env['torch']} | CUDA {env['cuda']} "
        f"(available: {env['cuda_available']}) | cuDNN {env['cudnn']}")  # fmt: skip
    for g in env["gpus"]:
        log(f"GPU {g['index']}: {g['name']} (sm {g['capability']}, {g['memory_gib']} GiB)")
    if not env["gpus"]:
        log(f"GPU: none; CPU with {env['cpu_threads']} threads")
    log("packages: " + ", ".join(f"{d} {v if v else 'not installed'}" for d, v in pkgs.items()))
    log("\nbackends:")
    for b in infos:
        log(f"  {b}")
    requested = list(backends) if backends else None
    names = requested or [b.name for b in infos]
    avail = {b.name: b.available for b in infos}
    for n in requested or ():
        if not avail[n]:
            report["ok"] = False
            report["notes"].append(
                f"requested backend {n!r} is unavailable: {next(b.reason for b in infos if b.name == n)}"
            )
    run_names = [n for n in names if avail[n]]
    notes = report["notes"]
    if "flex" in run_names and not full:
        fv = FLEX_VARIANTS.get(device, ())
        notes.append(f"Flex checked on {', '.join(fv)} only" + (", forward only" if device == "cpu" else "") +
                     " (each new compiled kernel costs seconds); --full checks every case")  # fmt: skip
    if device == "cpu":
        notes.append("CPU checks run in float32; gradients are checked wherever the backend has a backward")
    else:
        notes.append("CUDA checks run in bfloat16 with gradients wherever the backend has a backward")

    jobs = [(n, v) for n in run_names for v in CHECK_VARIANTS]
    log(
        f"\ncorrectness vs the float64 oracle ({device}; bound = 2x / 3x for grads the error of eager in the same dtype):"
    )
    bar = _bar(len(jobs), progress)
    threads = torch.get_num_threads()
    if device == "cpu":  # tiny shapes: one thread, immune to OpenMP contention on a busy machine
        torch.set_num_threads(1)
    for name, var in jobs:
        if bar is not None:
            bar.set_description(f"{name} {var}")
        rec = _check(name, var, device, full)
        report["checks"].append(rec)
        line = _check_line(rec)
        (bar.write if bar is not None else log)(line)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    torch.set_num_threads(threads)
    if speed:
        log(f"\nspeed probe ({timing_method(device)}):")
        for name in run_names:
            rec = _speed(name, device)
            report["speed"].append(rec)
            if rec["status"] == "ok":
                log(
                    f"  {name:<14} {rec['ms']:9.3f} ms  {rec['tflops']:7.2f} TFLOP/s  (first call {rec['first_ms']:.0f} ms; {rec['case']})"
                )
            else:
                log(f"  {name:<14} {rec['status']}: {rec['detail']}")
    bad = [c for c in report["checks"] if c["status"] in ("fail", "error")] + [
        s for s in report["speed"] if s["status"] == "error"
    ]
    if bad:
        report["ok"] = False
    report["exit_code"] = 0 if report["ok"] else 1
    report["elapsed_s"] = round(time.perf_counter() - t0, 1)
    for n in notes:
        log(f"note: {n}")
    n_ok = sum(c["status"] == "ok" for c in report["checks"])
    log(f"\n{'OK' if report['ok'] else 'PROBLEMS FOUND'}: {n_ok} checks passed, {len(bad)} failed, "
        f"{sum(c['status'] == 'refused' for c in report['checks'])} refused, "
        f"{sum(c['status'] == 'skipped' for c in report['checks'])} skipped ({report['elapsed_s']} s)")  # fmt: skip
    return report


def _check_line(rec) -> str:
    head = f"  {rec['backend']:<14} {rec['variant']:<10}"
    if rec["status"] in ("ok", "fail"):
        g = "fwd+bwd" if rec["grad"] else "fwd    "
        s = (
            f"{head} {g} {rec['status'].upper() if rec['status'] == 'fail' else 'ok':<4} err {rec['err']:.2e} <= {rec['bound']:.2e}"
            if rec["status"] == "ok"
            else f"{head} {g} FAIL {rec['detail']}"
        )
        if rec["status"] == "ok" and rec["detail"]:
            s += f"  ({rec['detail']})"
        return s
    if rec["status"] == "refused":
        return f"{head} refused: {rec['detail']}"
    if rec["status"] == "skipped":
        return f"{head} skipped: {rec['detail']}"
    return f"{head} ERROR {rec['detail']}"


def _bar(n, enabled):
    if not enabled or not sys.stderr.isatty() or importlib.util.find_spec("tqdm") is None:
        return None
    from tqdm import tqdm

    return tqdm(total=n, unit="check", file=sys.stderr, leave=False)


def run_from_args(args, command: str = "anyattn doctor") -> int:
    from .args import out_file

    names = None
    if args.backend is not None:
        names = [n.strip() for a in args.backend for n in a.split(",") if n.strip()]
        if not names:
            raise UsageError(f"--backend: expected a comma list of {list(REGISTRY)}, got an empty list")
        bad = [n for n in names if n not in REGISTRY]
        if bad:
            raise UsageError(f"--backend: unknown {bad}; expected some of {list(REGISTRY)}")
        names = list(dict.fromkeys(names))
    device = args.device
    if device is not None and device not in ("cuda", "cpu"):
        raise UsageError(f"--device: expected cuda or cpu, got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: torch.cuda.is_available() is False on this machine")
    out_file("json", args.json)  # before the run, not after it
    report = diagnose(
        backends=names, device=device, full=args.full, speed=not args.no_speed, progress=not args.no_progress
    )
    report["command"] = command
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
        print(f"wrote {args.json}")
    return report["exit_code"]
