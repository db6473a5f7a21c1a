"""The command line: ``anyattn doctor`` and ``anyattn bench kernels`` (CPU, part of CI).

Subprocess tests run ``python -m anyattn`` the way a user does; the rest call the bench
functions in-process on tiny shapes. The whole file stays well under 90 s on a 2-core CPU.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import anyattn
from anyattn.backends import REGISTRY
from anyattn.bench import kernels, raw
from anyattn.bench.cases import (
    Config,
    build_terms,
    doc_lengths,
    make_config,
    pad_lengths,
    visible_pairs,
)
from anyattn.cli import main

ROOT = Path(__file__).resolve().parents[1]


def _run(*args, timeout=120):
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    return subprocess.run(
        [sys.executable, "-m", "anyattn", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )


# ------------------------------------------------------------------------------------------------
# doctor


def test_doctor_writes_documented_json_and_exits_0(tmp_path):
    out = tmp_path / "doctor.json"
    p = _run("doctor", "--json", str(out), "--no-progress")
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    rep = json.loads(out.read_text())
    for key in (
        "schema",
        "ok",
        "exit_code",
        "device",
        "environment",
        "packages",
        "backends",
        "checks",
        "speed",
        "notes",
        "command",
    ):
        assert key in rep, key
    assert rep["schema"] == "anyattn.doctor/1" and rep["ok"] is True and rep["exit_code"] == 0
    assert {"python", "torch", "cuda", "cuda_available", "gpus"} <= set(rep["environment"])
    assert set(rep["packages"]) >= {"tqdm", "matplotlib", "pyyaml", "transformers", "flash-attn", "kernels", "triton"}
    assert [b["name"] for b in rep["backends"]] == [b.name for b in anyattn.backends()]
    statuses = {c["status"] for c in rep["checks"]}
    assert statuses <= {"ok", "refused", "skipped"}, statuses
    # every available backend was checked, against the oracle, on the dense case at least
    avail = [b["name"] for b in rep["backends"] if b["available"]]
    assert {c["backend"] for c in rep["checks"]} == set(avail)
    assert any(
        c["backend"] == "eager" and c["variant"] == "dense" and c["status"] == "ok" and c["grad"] for c in rep["checks"]
    )
    # a refusal (SDPA cannot express softcap) is reported with its reason, and is not a failure
    soft = next(c for c in rep["checks"] if c["backend"] == "sdpa" and c["variant"] == "softcap")
    assert soft["status"] == "refused" and "softcap" in soft["detail"]
    assert all({"backend", "status", "ms", "tflops"} <= set(s) for s in rep["speed"])
    assert "correctness vs the float64 oracle" in p.stdout


def test_doctor_unavailable_requested_backend_is_an_error(capsys):
    unavailable = [b.name for b in anyattn.backends() if not b.available]
    if not unavailable:
        pytest.skip("every backend is available here")
    rc = main(["doctor", "--backend", unavailable[0], "--no-speed", "--no-progress"])
    assert rc == 1
    assert "unavailable" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------------
# bench kernels --quick (subprocess, the documented schema)

RESULT_TYPES = {
    "variant": str, "mode": str, "dtype": str, "impl": str, "backend": str, "chosen": str, "B": int, "S": int,
    "Hq": int, "Hkv": int, "D": int, "spec": str, "status": str, "ms": float, "first_ms": float, "tflops": float,
    "flops": float, "pairs": int, "raw": str, "raw_ms": float, "overhead_pct": float, "check": str,
    "check_err": float, "check_bound": float, "verify": str, "reason": str, "lowering": str,
}  # fmt: skip


def test_bench_kernels_quick_writes_json_csv_md(tmp_path):
    p = _run("bench", "kernels", "--quick", "--out", str(tmp_path), "--no-progress")
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    doc = json.loads((tmp_path / "kernels.json").read_text())
    assert doc["schema"] == "anyattn.bench.kernels/1" and doc["complete"] is True
    for key in ("command", "date", "device", "device_name", "torch", "cuda", "triton", "python", "timing"):
        assert key in doc["meta"], key
    assert "bench kernels --quick" in doc["meta"]["command"]
    assert isinstance(doc["host_overhead"], list) and isinstance(doc["notes"], list)
    rows = doc["results"]
    assert rows
    for r in rows:
        assert set(r) == set(RESULT_TYPES)
        for k, t in RESULT_TYPES.items():
            assert isinstance(r[k], t) or (t is float and isinstance(r[k], int)), (k, r[k])
        assert r["status"] in ("ok", "skipped", "failed")
        assert r["impl"] in ("anyattn", "raw")
        if r["status"] == "ok":
            assert r["ms"] > 0 and r["tflops"] > 0 and r["check"] in ("ok", "-")
        else:
            assert math.isnan(r["ms"]) and r["reason"]
    # every variant and mode ran; every registered backend and auto has a row per case
    assert {r["variant"] for r in rows} == set(kernels.VARIANTS)
    assert {r["mode"] for r in rows} == {"fwd", "fwd+bwd"}
    names = {r["backend"] for r in rows if r["impl"] == "anyattn"}
    assert names == {*REGISTRY, "auto"}
    assert not [r for r in rows if r["status"] == "failed"], [r for r in rows if r["status"] == "failed"]
    # anyattn rows of a backend with a raw counterpart report an overhead
    assert any(
        r["backend"] == "sdpa" and r["raw"] == "raw:sdpa" and r["overhead_pct"] == r["overhead_pct"] for r in rows
    )
    # Flex compiled for at most one case in --quick
    flex_cases = {
        (r["variant"], r["mode"]) for r in rows if "flex" in (r["backend"], r["chosen"]) and r["status"] == "ok"
    }
    assert len(flex_cases) <= 1
    with open(tmp_path / "kernels.csv") as f:
        csv_rows = list(csv.DictReader(f))
    assert len(csv_rows) == len(rows) and set(csv_rows[0]) == set(RESULT_TYPES)
    md = (tmp_path / "kernels.md").read_text()
    assert doc["meta"]["command"] in md and doc["meta"]["device_name"] in md
    # stdout ends with the compact table
    tail = p.stdout.strip().splitlines()
    assert any(line.startswith("alibi | fwd+bwd") for line in tail[-12:]), tail[-12:]


# ------------------------------------------------------------------------------------------------
# a wrong or raising backend: NaN, the error, and the run goes on


def _tiny_sweep(**kw):
    base = dict(
        variants=("causal", "documents"), modes=("fwd",), dtypes=("fp32",), backends=("eager", "sdpa", "auto"),
        raw=("raw:sdpa",), shapes=((1, 32),), heads=2, head_dim=16, window=8, docs=3, device="cpu", host_overhead=False,
    )  # fmt: skip
    base.update(kw)
    return kernels.Sweep(**base)


def test_wrong_backend_output_is_recorded_as_nan_and_the_run_goes_on(monkeypatch, tmp_path):
    """A backend returning garbage fails its oracle check: NaN time, FAIL, the error; other rows
    and later cases still run."""

    def garbage(call):
        B, H, S, _ = call.q.shape
        return torch.full((B, H, S, call.Dv), 3.0, dtype=call.dtype, device=call.device), None

    anyattn.clear_caches()
    monkeypatch.setattr(REGISTRY["sdpa"], "run", garbage)
    doc = kernels.run(_tiny_sweep(), out_dir=str(tmp_path), progress=False, log=lambda *a: None)
    rows = doc["results"]
    assert doc["complete"] is True
    bad = [r for r in rows if r["backend"] == "sdpa"]
    assert len(bad) == 2
    for r in bad:
        assert r["status"] == "failed" and r["check"] == "FAIL" and math.isnan(r["ms"]) and math.isnan(r["tflops"])
        assert "oracle" in r["reason"]
    ok = [r for r in rows if r["backend"] in ("eager", "raw:sdpa")]
    assert len(ok) == 4 and all(r["status"] == "ok" and r["check"] == "ok" for r in ok)
    text = (tmp_path / "kernels.csv").read_text()
    assert "failed" in text and "nan" in text


def test_raising_backend_is_recorded_with_its_error(monkeypatch):
    def boom(call):
        raise RuntimeError("kernel exploded")

    anyattn.clear_caches()
    monkeypatch.setattr(REGISTRY["sdpa"], "run", boom)
    doc = kernels.run(_tiny_sweep(variants=("causal",)), progress=False, log=lambda *a: None)
    r = next(r for r in doc["results"] if r["backend"] == "sdpa")
    assert r["status"] == "failed" and math.isnan(r["ms"]) and "kernel exploded" in r["reason"]
    assert next(r for r in doc["results"] if r["backend"] == "eager")["status"] == "ok"


def test_failed_rows_make_the_exit_status_1(monkeypatch, capsys):
    anyattn.clear_caches()
    monkeypatch.setattr(REGISTRY["sdpa"], "run", lambda call: (torch.zeros_like(call.q), None))
    rc = main(
        [
            "bench",
            "kernels",
            "--quick",
            "--variants",
            "causal",
            "--modes",
            "fwd",
            "--backends",
            "eager,sdpa",
            "--no-progress",
        ]
    )
    assert rc == 1
    out = capsys.readouterr().out
    assert "FAIL" in out and "nan" in out


def test_refused_backend_is_skipped_with_its_reason():
    doc = kernels.run(
        _tiny_sweep(variants=("softcap",), backends=("sdpa", "eager")), progress=False, log=lambda *a: None
    )
    r = next(r for r in doc["results"] if r["backend"] == "sdpa")
    assert r["status"] == "skipped" and "softcap" in r["reason"]
    r = next(r for r in doc["results"] if r["backend"] == "raw:sdpa")
    assert r["status"] == "skipped" and "softcap" in r["reason"]


# ------------------------------------------------------------------------------------------------
# bad options


@pytest.mark.parametrize(
    "argv, message",
    [
        (["bench", "kernels", "--variants", "nope"], "--variants: unknown ['nope']"),
        (["bench", "kernels", "--dtypes", "fp8"], "--dtypes: unknown ['fp8']"),
        (["bench", "kernels", "--modes", "bwd"], "--modes: unknown ['bwd']"),
        (["bench", "kernels", "--backends", "flashy"], "--backends: unknown ['flashy']"),
        (["bench", "kernels", "--seqlen", "0"], "--seqlen: expected a positive integer"),
        (["bench", "kernels", "--quick", "--preset", "h200"], "exclude each other"),
        (["bench", "kernels", "--sweep", "/nonexistent/sweep.yaml"], "no such file"),
        (["bench", "kernels", "--seqlen", "abc"], "invalid int value"),
        (["bench", "kernels", "--frobnicate"], "unrecognized arguments"),
        (["doctor", "--backend", "nope"], "--backend: unknown ['nope']"),
        (["frobnicate"], "invalid choice"),
    ],
)
def test_bad_options_give_a_clear_error_and_exit_2(argv, message, capsys):
    assert main(argv) == 2
    assert message in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only error")
def test_h200_preset_without_a_gpu_is_a_clear_error(capsys):
    assert main(["bench", "kernels", "--preset", "h200"]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err


def test_bad_option_exit_status_from_the_process():
    p = _run("bench", "kernels", "--variants", "dense,nope", timeout=60)
    assert p.returncode == 2 and "unknown ['nope']" in p.stderr


def test_sweep_file_needs_pyyaml(monkeypatch, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "yaml" else real(name, *a))
    assert main(["bench", "kernels", "--sweep", str(ROOT / "benchmarks/sweeps/example.yaml")]) == 2
    assert "pip install pyyaml" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------
# configuration: the example sweep, the h200 preset, FLOP counting, verification shapes


def _sweep(argv):
    from anyattn.cli import build_parser

    return kernels.sweep_from_args(build_parser().parse_args(["bench", "kernels", *argv]))


def test_example_sweep_file_loads_and_the_command_line_wins():
    pytest.importorskip("yaml")
    sw = _sweep(["--sweep", str(ROOT / "benchmarks/sweeps/example.yaml"), "--device", "cpu", "--heads", "4"])
    assert sw.variants == ("dense", "causal", "documents", "window") and sw.shapes == ((8, 2048), (2, 8192))
    assert sw.heads == 4 and sw.head_dim == 128 and "raw:flex" in sw.raw and "auto" in sw.all_backends()
    assert len(sw.configs()) == 2 * 2 * 1 * 4


def test_h200_preset_matrix():
    sw = kernels.preset("h200", device="cpu")  # the configuration only; nothing runs
    cfgs = sw.configs()
    assert len(cfgs) == len(kernels.VARIANTS) * 2 and {c.dtype for c in cfgs} == {"bf16"}
    assert all(c.Hq == 16 and c.D == 128 and c.B * c.S == 16384 for c in cfgs)
    by = {c.variant: c for c in cfgs}
    assert (by["documents"].B, by["documents"].S, by["window"].S, by["window"].window) == (1, 16384, 16384, 1024)
    assert by["gqa"].Hkv == 4 and by["dense"].Hkv == 16
    assert [c.mode for c in cfgs[: len(kernels.VARIANTS)]] == ["fwd"] * len(kernels.VARIANTS)  # forward first
    lens = doc_lengths(16384, 16)
    assert sum(lens) == 16384 and len(lens) == 16 and min(lens) >= 128 and max(lens) <= 2048
    assert sum(pad_lengths(8, 2048)) == pytest.approx(0.75 * 8 * 2048, rel=0.01)
    assert sw.budget_s is not None and sw.budget_s <= 480


def test_seqlen_and_batch_override_every_variant():
    sw = _sweep(["--quick", "--seqlen", "96", "--batch", "3"])
    assert {(c.B, c.S) for c in sw.configs()} == {(3, 96)}


@pytest.mark.parametrize("variant", ["dense", "causal", "window", "documents", "padding", "prefix_lm", "gqa"])
def test_visible_pairs_are_exact(variant):
    cfg = make_config(variant, "fwd", "fp32", B=3, S=200, H=2, D=8, window=17, n_docs=5, cap=1.0, device="cpu")
    t = build_terms(cfg)
    S, H, B = cfg.S, cfg.Hq, cfg.B
    want = {
        "dense": S * S,
        "causal": S * (S + 1) // 2,
        "gqa": S * (S + 1) // 2,
        "window": sum(min(i, 17) + 1 for i in range(S)),
        "documents": sum(n * n for n in (t.doc_lengths or ())),
        "prefix_lm": sum(max(i + 1, S // 4) for i in range(S)),
    }
    per_row = [n * n for n in t.pad_lengths] if variant == "padding" else [want[variant]] * B
    assert visible_pairs(t.mask, B, H, S, S, chunk_elems=1000) == H * sum(per_row)


def test_large_cases_are_checked_on_the_last_query_rows():
    cfg = make_config("window", "fwd", "bf16", B=1, S=16384, H=16, D=128, window=1024, n_docs=16, cap=1.0, device="cpu")
    assert kernels.check_rows(cfg, 1 << 25) == 128
    small = make_config("causal", "fwd", "bf16", B=2, S=64, H=2, D=32, window=16, n_docs=4, cap=1.0, device="cpu")
    assert kernels.check_rows(small, 1 << 25) == 64


def test_raw_calls_know_what_they_cannot_express():
    cfg = Config("softcap", "fwd", "fp32", 1, 32, 2, 2, 16, device="cpu")
    from anyattn.bench.cases import build_inputs

    inp = build_inputs(cfg)
    with pytest.raises(raw.Skip, match="softcap"):
        raw.prepare("raw:sdpa", cfg, inp)
    with pytest.raises(raw.Skip, match="CUDA"):
        raw.prepare("raw:varlen", cfg, inp)


def test_time_budget_skips_rows_with_the_reason():
    doc = kernels.run(_tiny_sweep(variants=("causal",), budget_s=1e-9), progress=False, log=lambda *a: None)
    assert doc["results"] and all(r["status"] == "skipped" and "time budget" in r["reason"] for r in doc["results"])


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
def test_slice_verification_of_large_cases(mode, monkeypatch):
    """Cases too big for the float64 oracle are checked on the last query rows of the full shape
    (outputs and, in fwd+bwd, dq/dk/dv); a wrong gradient is caught there too."""
    sw = _tiny_sweep(variants=("window", "documents", "padding"), shapes=((2, 96),), modes=(mode,),
                     raw=("raw:sdpa", "raw:sdpa-padded"), backends=("eager", "sdpa"), docs=4, verify_max_elems=20000)  # fmt: skip
    doc = kernels.run(sw, progress=False, log=lambda *a: None)
    ran = [r for r in doc["results"] if r["status"] != "skipped"]
    assert len(ran) == 10 and all(r["status"] == "ok" for r in ran), [r["reason"] for r in ran]
    assert all(r["verify"] == "last 52 query rows of the full shape" for r in ran if r["check"] == "ok")
    assert {r["check"] for r in ran} == ({"ok"} if mode == "fwd" else {"ok", "-"})
    if mode == "fwd+bwd":  # a backend with a wrong backward fails the sliced gradient check
        real = REGISTRY["sdpa"].run

        class _Scale(torch.autograd.Function):
            @staticmethod
            def forward(ctx, x):
                return x.clone()

            @staticmethod
            def backward(ctx, g):
                return 1.5 * g

        anyattn.clear_caches()
        monkeypatch.setattr(REGISTRY["sdpa"], "run", lambda call: (_Scale.apply(real(call)[0]), None))
        doc = kernels.run(dataclasses.replace(sw, variants=("window",)), progress=False, log=lambda *a: None)
        r = next(r for r in doc["results"] if r["backend"] == "sdpa")
        assert r["status"] == "failed" and r["check"] == "FAIL" and "dq" in r["reason"]


def _fake_varlen(q, k, v, cu_q, cu_k, max_q, max_k, *, window_size=(-1, -1), enable_gqa=False):
    """varlen_attn's semantics through SDPA, one segment at a time (CPU stand-in)."""
    outs = []
    cu = cu_q.tolist()
    for a, b in zip(cu[:-1], cu[1:]):
        qq, kk, vv = (t[a:b].transpose(0, 1)[None] for t in (q, k, v))
        i, j = torch.arange(b - a)[:, None], torch.arange(b - a)[None, :]
        m = torch.ones(b - a, b - a, dtype=torch.bool)
        if window_size[0] >= 0:
            m &= i - j <= window_size[0]
        if window_size[1] >= 0:
            m &= j - i <= window_size[1]
        outs.append(
            torch.nn.functional.scaled_dot_product_attention(qq, kk, vv, attn_mask=m, enable_gqa=enable_gqa)[
                0
            ].transpose(0, 1)
        )
    return torch.cat(outs)


@pytest.mark.parametrize("variant", ["dense", "causal", "window", "gqa", "documents", "padding"])
def test_raw_varlen_packing_matches_the_oracle(variant):
    """The raw varlen_attn row packs tokens, builds cu_seqlens and the window exactly (checked
    with a CPU stand-in for the CUDA-only kernel)."""
    from anyattn.bench.cases import build_inputs
    from anyattn.testing import oracle

    cfg = make_config(variant, "fwd", "fp32", B=2, S=40, H=4, D=16, window=7, n_docs=3, cap=1.0, device="cpu")
    inp = build_inputs(cfg)
    prep = raw.packed(cfg, inp, _fake_varlen, frozenset({"window_size", "enable_gqa"}))
    got = prep.forward()
    want = oracle(inp.q, inp.k, inp.v, return_lse=True, **inp.kwargs())
    rows = torch.isfinite(want.lse)[..., None]
    assert torch.allclose(torch.where(rows, got.double(), 0.0), torch.where(rows, want.out, 0.0), atol=1e-5)
