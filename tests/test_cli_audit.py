"""Audit of the command line a new user runs first: ``anyattn doctor`` and ``anyattn bench kernels``
(every ``--mode``), checked against README.md, docs/benchmarks.md and docs/reliability.md.

What tests/test_cli.py, tests/test_first_contact.py and tests/test_bench_modes.py already cover is
not repeated. Added here: the doctor report's internal consistency (text vs JSON, statuses vs
``anyattn.explain`` on the same call, a correctness row and a speed row recomputed by hand against
an independent float64 reference), the FLOP convention and TFLOP/s arithmetic recomputed from the
documented definitions (matrix and new-packing), the host table's arithmetic, refusals shown as
reasons, bad options, ``--debug``, exit statuses 1 / 2 / 130 (a real SIGTERM too) and every
sub-command's ``--help``.

Discrepancies this audit found, fixed since: `doctor --backend ''` ran every backend, `doctor
--json` and `bench kernels --out` paths that cannot be written failed after the whole run (host
mode lost its rows), the variant table missed doc_window, and --quick in the new-packing and host
modes ignored the --device default. Everything runs on a CPU at the smallest sizes the CLI takes;
in-process ``anyattn.cli.main`` wherever possible, one subprocess (the SIGTERM test).
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import re
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import anyattn
from anyattn.backends import REGISTRY
from anyattn.bench import churn, churn_steps, doctor, hostcall, kernels
from anyattn.cli import main

ROOT = Path(__file__).resolve().parents[1]
SRC = str(ROOT / "src")


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny shapes, a shared 2-core machine: one thread (as the CLI's CPU runs do), restored after."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _cli(argv):
    """(exit status, stdout, non-empty stderr lines) of ``anyattn.cli.main(argv)``."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(list(argv))
    return rc, out.getvalue(), [ln for ln in err.getvalue().splitlines() if ln.strip()]


def _close(a, b, rel=1e-6, abs_=1e-12):
    return abs(a - b) <= abs_ + rel * abs(b)


# ================================================================================================
# anyattn doctor (README command 1)


@pytest.fixture(scope="module")
def doctor_run(tmp_path_factory):
    """``anyattn doctor --json PATH`` once, as README command 1 runs it (plus --json)."""
    path = tmp_path_factory.mktemp("doctor") / "doctor.json"
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        anyattn.clear_caches()
        rc, out, err = _cli(["doctor", "--json", str(path), "--no-progress"])
    finally:
        torch.set_num_threads(n)
    return rc, out, err, json.loads(path.read_text())


def test_doctor_finishes_and_its_text_is_its_json(doctor_run):
    rc, out, err, rep = doctor_run
    assert rc == 0 == rep["exit_code"] and rep["ok"] is True, out[-3000:] + "\n".join(err)
    assert (
        rep["schema"] == "anyattn.doctor/1" and rep["device"] == "cpu" and rep["command"].startswith("anyattn doctor")
    )
    lines = out.splitlines()
    # backends: one line per registered backend, in registry order, with the JSON's status and reason
    blines = lines[lines.index("backends:") + 1 :]
    assert [b["name"] for b in rep["backends"]] == list(REGISTRY)
    for b, line in zip(rep["backends"], blines):
        want = "available" if b["available"] else f"unavailable: {b['reason']}"
        assert line.split(None, 1) == [b["name"], want], (line, b)
    # checks: every JSON check has its line, with the same status (and err / bound for ok rows)
    for c in rep["checks"]:
        line = next(ln for ln in lines if ln.split()[:2] == [c["backend"], c["variant"]])
        if c["status"] == "ok":
            assert f"ok   err {c['err']:.2e} <= {c['bound']:.2e}" in line, (line, c)
            assert ("fwd+bwd" in line) == c["grad"]
        elif c["status"] in ("refused", "skipped"):
            assert f"{c['status']}: {c['detail']}" in line, (line, c)
        else:  # a fail / error row
            assert ("FAIL" in line) or ("ERROR" in line), (line, c)
        assert c["device"] == "cpu" and c["dtype"] == "float32"  # "On CPU the checks run in float32"
    # the summary line counts what the JSON holds
    n = {s: sum(c["status"] == s for c in rep["checks"]) for s in ("ok", "refused", "skipped")}
    assert f"OK: {n['ok']} checks passed, 0 failed, {n['refused']} refused, {n['skipped']} skipped" in out
    for note in rep["notes"]:
        assert f"note: {note}" in out
    # environment and packages as printed
    env = rep["environment"]
    assert f"torch {env['torch']}" in lines[0] and env["cuda_available"] is False and env["gpus"] == []
    for dist, ver in rep["packages"].items():
        assert f"{dist} {ver if ver else 'not installed'}" in out


def test_doctor_statuses_match_explain_on_the_same_call(doctor_run):
    """Each backend's availability and each check's status is what ``anyattn.explain`` says on
    the same inputs (grad mode included): ok rows are served, refused rows carry explain's reason,
    rows checked forward only carry the gradient refusal; unavailable backends are not checked."""
    _, _, _, rep = doctor_run
    infos = {b.name: b for b in anyattn.backends()}
    avail = {b["name"]: b for b in rep["backends"]}
    assert {n: (b["available"], b["reason"]) for n, b in avail.items()} == {
        n: (b.available, b.reason) for n, b in infos.items()
    }
    q, k, v, kw = doctor._case("causal", "cpu")
    for name, b in avail.items():
        row = next(r for r in anyattn.explain(q, k, v, backend=name, **kw).rows if r.backend == name)
        if b["available"]:
            assert row.status != "unavailable", row
        else:
            assert (row.status, row.reason) == ("unavailable", b["reason"])
    checked = {c["backend"] for c in rep["checks"]}
    assert checked == {n for n, b in avail.items() if b["available"]}
    for c in rep["checks"]:
        q, k, v, kw = doctor._case(c["variant"], "cpu")
        assert c["shape"] == f"B={q.shape[0]} Hq={q.shape[1]} Hkv={k.shape[1]} S={q.shape[2]} D={q.shape[3]}"
        name = c["backend"]
        qg, kg, vg = (t.detach().requires_grad_(True) for t in (q, k, v))
        d_grad = anyattn.explain(qg, kg, vg, backend=name, **kw)
        d_fwd = anyattn.explain(q, k, v, backend=name, **kw)

        def reason(d, name=name):
            return next(r.reason for r in d.rows if r.backend == name)

        if c["status"] == "refused":
            assert d_fwd.chosen is None and c["detail"] == reason(d_fwd), c
        elif c["status"] == "ok" and c["grad"]:
            assert d_grad.chosen == name, c
        elif c["status"] == "ok":
            assert d_fwd.chosen == name and d_grad.chosen is None and reason(d_grad) in c["detail"], c
        else:
            assert c["status"] == "skipped" and name == "flex" and c["variant"] != "causal", c
    # "Flex ... is checked on causal, forward only" (CPU)
    flex = [c for c in rep["checks"] if c["backend"] == "flex"]
    assert [(c["variant"], c["status"], c["grad"]) for c in flex if c["status"] != "skipped"] == [
        ("causal", "ok", False)
    ]


def _mask_bool(variant, B, S):
    """The visible (i, j) pairs of the doctor's CPU cases, from the docs' definitions."""
    i, j = torch.arange(S)[:, None], torch.arange(S)[None, :]
    full = torch.ones(S, S, dtype=torch.bool)
    if variant in ("dense", "softcap"):
        m = full
    elif variant == "causal":
        m = j <= i
    elif variant == "window":
        m = (j <= i) & (j >= i - 8)
    elif variant == "documents":
        ids = torch.repeat_interleave(torch.arange(3), torch.tensor([20, 17, 11]))
        m = ids[:, None] == ids[None, :]
    elif variant == "padding":  # both i and j real tokens
        real = torch.arange(S)[None, :] < torch.tensor([48, 30])[:, None]
        return (real[:, :, None] & real[:, None, :])[:, None]
    else:
        raise AssertionError(variant)
    return m.expand(B, 1, S, S)


def _ref64(q, k, v, visible, cap=None):
    """float64 attention written out by hand (not through anyattn): rows with no key are 0."""
    s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if cap is not None:
        s = cap * torch.tanh(s / cap)
    row_ok = visible.any(-1, keepdim=True)
    s = torch.where(visible, s, torch.full_like(s, -math.inf))
    s = torch.where(row_ok, s, torch.zeros_like(s))
    return (torch.softmax(s, -1) * row_ok) @ v


@pytest.mark.parametrize(
    "backend, variant", [("sdpa", "causal"), ("sdpa", "padding"), ("eager", "documents"), ("eager", "softcap")]
)
def test_doctor_correctness_row_recomputed_against_float64(doctor_run, backend, variant):
    """The doctor's err / bound are the worst of out, dq, dk, dv against a float64 reference
    (bound: 2x / 3x eager's same-dtype error + 1e-5 / 1e-4): recomputed here with a float64
    reference written by hand, the same inputs and the oracle rule's fixed cotangent."""
    _, _, _, rep = doctor_run
    c = next(c for c in rep["checks"] if (c["backend"], c["variant"]) == (backend, variant))
    assert c["status"] == "ok" and c["grad"] is True
    q, k, v, kw = doctor._case(variant, "cpu")
    assert repr(kw.get("mask")) in {
        "causal": "causal()", "padding": "padding(lengths=tensor(2,))", "documents": "documents([20, 17, 11])",
        "softcap": "None",
    }[variant]  # fmt: skip
    cap = 20.0 if variant == "softcap" else None
    if cap is not None:
        assert repr(kw["score"]) == "softcap(20.0)"
    B, _, S, _ = q.shape
    vis = _mask_bool(variant, B, S)
    dout = torch.randn(q.shape[:-1] + (v.shape[-1],), generator=torch.Generator().manual_seed(1), dtype=torch.float64)

    def run(fn, dt):
        ins = [t.detach().to(dt).requires_grad_(True) for t in (q, k, v)]
        out = fn(*ins)
        return [out.detach(), *torch.autograd.grad(out, ins, dout.to(dt))]

    want = run(lambda a, b, c_: _ref64(a, b, c_, vis, cap), torch.float64)
    got = run(lambda a, b, c_: anyattn.attention(a, b, c_, backend=backend, **kw), torch.float32)
    ref = run(lambda a, b, c_: anyattn.attention(a, b, c_, backend="eager", **kw), torch.float32)
    comps = []
    for idx, (g, r, w) in enumerate(zip(got, ref, want)):
        e, re_ = float((g.double() - w).abs().max()), float((r.double() - w).abs().max())
        comps.append((e, (2 * re_ + 1e-5) if idx == 0 else (3 * re_ + 1e-4)))
    err, bound = max(comps, key=lambda t: t[0] / t[1])
    assert all(e <= b for e, b in comps)
    assert _close(c["err"], err, rel=1e-4) and _close(c["bound"], bound, rel=1e-4), (c, comps)


def test_doctor_speed_rows_are_measured_or_nan_and_follow_the_flop_convention(doctor_run):
    _, out, _, rep = doctor_run
    assert {s["backend"] for s in rep["speed"]} == {b["name"] for b in rep["backends"] if b["available"]}
    assert "speed probe (perf_counter):" in out  # the CPU timing method (docs: "on CPU: time.perf_counter")
    for s in rep["speed"]:
        if s["status"] != "ok":
            assert math.isnan(s["ms"]) and math.isnan(s["tflops"]) and s["detail"], s
            assert f"{s['backend']:<14} {s['status']}: {s['detail']}" in out
            continue
        m = re.fullmatch(r"causal fwd B=(\d+) H=(\d+) S=(\d+) D=(\d+) float32", s["case"])
        assert m, s["case"]
        B, H, S, D = map(int, m.groups())
        flops = 4 * B * H * D * S * (S + 1) // 2  # 4 * B * Hq * D * visible pairs per head
        assert s["ms"] > 0 and s["first_ms"] > 0 and s["detail"] == "perf_counter"
        assert _close(s["tflops"], flops / (s["ms"] * 1e-3) / 1e12, rel=1e-9)
        assert f"{s['ms']:9.3f} ms  {s['tflops']:7.2f} TFLOP/s" in out
    assert next(s for s in rep["speed"] if s["backend"] == "flex")["status"] == "skipped"  # Flex on CPU


def test_doctor_a_wrong_backend_fails_its_check_and_exits_1(monkeypatch, tmp_path):
    """Exit status 1 when a check that ran failed (wrong numbers); the report says which."""

    real = REGISTRY["sdpa"].run

    def off(call):  # wrong by 0.5 everywhere, gradients still flow
        out, lse = real(call)
        return out + 0.5, lse

    anyattn.clear_caches()
    monkeypatch.setattr(REGISTRY["sdpa"], "run", off)
    p = tmp_path / "d.json"
    rc, out, err = _cli(["doctor", "--backend", "sdpa", "--no-speed", "--no-progress", "--json", str(p)])
    anyattn.clear_caches()
    rep = json.loads(p.read_text())
    assert rc == 1 == rep["exit_code"] and rep["ok"] is False and not err
    fails = [c for c in rep["checks"] if c["status"] == "fail"]
    assert fails and all(c["backend"] == "sdpa" and c["err"] > c["bound"] for c in fails)
    assert "PROBLEMS FOUND" in out and f"{len(fails)} failed" in out and "FAIL out: err" in out
    assert rep["speed"] == []  # --no-speed


def test_doctor_backend_option_comma_list_repeats_and_no_speed():
    rc, out, err = _cli(["doctor", "--backend", "sdpa,eager", "--backend", "eager", "--no-speed", "--no-progress"])
    assert rc == 0 and not err
    rows = [ln.split()[:2] for ln in out.splitlines() if ln.startswith("  ") and len(ln.split()) > 2]
    checked = [r for r in rows if r[1] in doctor.CHECK_VARIANTS]
    assert {b for b, _ in checked} == {"sdpa", "eager"} and len(checked) == 2 * len(doctor.CHECK_VARIANTS)
    assert "speed probe" not in out


def test_doctor_full_checks_flex_on_every_case(monkeypatch):
    """``--full`` checks Flex on every case (the check itself is stubbed: compiling six CPU kernels
    costs ~25 s; what is tested is that every case is attempted and reported)."""
    from anyattn.testing import Comparison

    calls = []

    def fake(q, k, v, *, backend, grad, **kw):
        calls.append((backend, grad))
        return [Comparison("out", 0.0, 0.0, 1e-5)]

    monkeypatch.setattr(doctor, "compare_to_oracle", fake)
    rep = doctor.diagnose(backends=["flex"], device="cpu", full=True, speed=False, progress=False, log=lambda *a: None)
    assert [(c["variant"], c["status"], c["grad"]) for c in rep["checks"]] == [
        (v, "ok", False) for v in doctor.CHECK_VARIANTS
    ]
    assert calls == [("flex", False)] * len(doctor.CHECK_VARIANTS)
    rep = doctor.diagnose(backends=["flex"], device="cpu", full=False, speed=False, progress=False, log=lambda *a: None)
    assert [c["variant"] for c in rep["checks"] if c["status"] != "skipped"] == ["causal"]


def test_doctor_interrupt_is_one_line_exit_130(monkeypatch):
    def interrupted(**kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(doctor, "diagnose", interrupted)
    rc, _, err = _cli(["doctor", "--no-progress"])
    assert rc == 130 and err == ["anyattn doctor: interrupted"]


def test_doctor_an_empty_backend_value_is_a_bad_option(monkeypatch):
    """``--backend ''`` (e.g. an empty shell variable) silently checked every backend (exit 0);
    README: "exit status 2 for bad input", and ``bench kernels --backends ''`` is refused."""
    ran = []
    monkeypatch.setattr(doctor, "diagnose", lambda **kw: ran.append(kw) or {"exit_code": 0})
    rc, _, err = _cli(["doctor", "--backend", "", "--no-speed", "--no-progress"])
    assert rc == 2 and len(err) == 1 and "--backend" in err[0], (rc, err, ran)
    assert not ran


def test_doctor_an_unwritable_json_path_is_refused_before_the_run(monkeypatch, tmp_path):
    """``--json`` into a missing directory ran every check, then failed with exit 1 and a bare
    OSError ("No such file or directory '...'"). A bad option value is bad input (exit 2, one line
    naming the option, what was expected), as ``embed --out`` into a missing directory is
    refused up front (docs/reliability.md)."""
    ran = []
    real = doctor.diagnose
    monkeypatch.setattr(doctor, "diagnose", lambda **kw: ran.append(1) or real(**kw))
    bad = tmp_path / "missing-dir" / "doctor.json"
    rc, _, err = _cli(["doctor", "--json", str(bad), "--backend", "eager", "--no-speed", "--no-progress"])
    assert rc == 2 and len(err) == 1 and "--json" in err[0], (rc, err)
    assert not ran  # nothing ran before the path was found unusable


# ================================================================================================
# anyattn bench kernels (the static matrix)

ALL_VARIANTS = (
    "dense",
    "causal",
    "documents",
    "window",
    "doc_window",
    "gqa",
    "padding",
    "prefix_lm",
    "softcap",
    "alibi",
)
SIZES = ["--dtypes", "fp32", "--seqlen", "24", "--batch", "2", "--heads", "4", "--head-dim", "8", "--window", "5",
         "--docs", "3", "--no-host-overhead", "--no-progress"]  # fmt: skip


@pytest.fixture(scope="module")
def matrix_run(tmp_path_factory):
    """Every variant forward, and three variants forward+backward, on eager / sdpa / auto and the
    raw SDPA rows, through the command line, with --out."""
    runs = []
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for modes, variants in (("fwd", ALL_VARIANTS), ("fwd+bwd", ("causal", "gqa", "padding"))):
            d = tmp_path_factory.mktemp("kernels")
            anyattn.clear_caches()
            rc, out, err = _cli(["bench", "kernels", "--modes", modes, "--variants", ",".join(variants),
                                 "--backends", "eager,sdpa,auto,raw:sdpa,raw:sdpa-padded", *SIZES, "--out", str(d)])  # fmt: skip
            runs.append((rc, out, err, d, json.loads((d / "kernels.json").read_text())))
    finally:
        torch.set_num_threads(n)
    return runs


def _visible_pairs(r):
    """Visible (b, h, i, j) pairs of a result row, from the row's spec and the docs' definitions."""
    B, S, H, var, spec = r["B"], r["S"], r["Hq"], r["variant"], r["spec"]
    i, j = torch.arange(S)[:, None], torch.arange(S)[None, :]
    m = torch.ones(S, S, dtype=torch.bool)
    if var in ("causal", "gqa", "softcap", "alibi"):
        m = j <= i
    if "sliding_window(" in spec:
        w = int(re.search(r"sliding_window\((\d+)\)", spec).group(1))
        m = m & (j <= i) & (j >= i - w)
    if "documents(" in spec:
        lens = [int(x) for x in re.search(r"documents\(\[([\d, ]+)\]\)", spec).group(1).split(",")]
        assert sum(lens) == S
        ids = torch.repeat_interleave(torch.arange(len(lens)), torch.tensor(lens))
        m = m & (ids[:, None] == ids[None, :])
    if var == "prefix_lm":
        p = int(re.search(r"prefix_lm\((\d+)\)", spec).group(1))
        assert p == S // 4
        m = (j < p) | (j <= i)
    if var == "padding":  # "right padding, row lengths evenly from S/2 to S"
        lens = [round(S * (0.5 + 0.5 * b / (B - 1))) for b in range(B)]
        return H * sum(n * n for n in lens)
    return B * H * int(m.sum())


def test_matrix_runs_writes_its_files_and_every_row_is_checked_or_explained(matrix_run):
    for rc, out, err, d, doc in matrix_run:
        assert rc == 0 and not err, out[-2000:] + "\n".join(err)
        assert doc["complete"] is True and doc["interrupted"] is None and doc["host_overhead"] == []
        assert {p.name for p in d.iterdir()} >= {"kernels.json", "kernels.csv", "kernels.md"}
        rows = doc["results"]
        with open(d / "kernels.csv") as f:
            assert [(c["variant"], c["backend"], c["status"]) for c in csv.DictReader(f)] == [
                (r["variant"], r["backend"], r["status"]) for r in rows
            ]
        md = (d / "kernels.md").read_text()
        assert md.count("\n| ") - 1 == len(rows)  # the flat table: every row, skipped ones included
        for r in rows:
            assert r["verify"] in ("full shape", "") and r["dtype"] == "fp32"
            if r["status"] == "ok":
                assert r["ms"] > 0 and r["first_ms"] > 0 and r["check"] in ("ok", "-")
                assert r["check"] == "ok" or (r["impl"] == "raw" and r["mode"] == "fwd+bwd")  # "-": raw, fwd+bwd
                if r["check"] == "ok":
                    assert r["check_err"] <= r["check_bound"] and r["verify"] == "full shape"
            else:
                assert r["status"] == "skipped" and r["reason"], r
                assert all(math.isnan(r[k]) for k in ("ms", "tflops", "first_ms", "check_err"))
        # every anyattn backend asked for has one row per case; auto names its choice
        cases = {(r["variant"], r["mode"]) for r in rows}
        for name in ("eager", "sdpa", "auto"):
            assert sum(r["backend"] == name for r in rows) == len(cases)
        assert all(r["chosen"] in ("sdpa", "eager") for r in rows if r["backend"] == "auto")


def test_matrix_flops_follow_the_documented_convention(matrix_run):
    """useful FLOPs = 4 * B * Hq * D * visible pairs per head (Dv = D), fwd+bwd 3.5x; pairs counted
    here from each row's spec and the variant definitions of docs/benchmarks.md."""
    seen = set()
    for *_, doc in matrix_run:
        for r in doc["results"]:
            pairs = _visible_pairs(r)
            assert r["pairs"] == pairs, (r["variant"], r["spec"], r["pairs"], pairs)
            assert r["flops"] == 4 * r["D"] * pairs * (3.5 if r["mode"] == "fwd+bwd" else 1.0)
            seen.add(r["variant"])
            if r["variant"] == "gqa":
                assert r["Hkv"] == max(1, r["Hq"] // 4) and r["Hq"] == 4  # pairs count query heads
    assert seen == set(ALL_VARIANTS)


def test_matrix_tflops_and_vs_raw_are_the_documented_arithmetic(matrix_run):
    for *_, doc in matrix_run:
        rows = doc["results"]
        for r in rows:
            if r["status"] != "ok":
                continue
            assert _close(r["tflops"], r["flops"] / (r["ms"] * 1e-3) / 1e12, rel=1e-12)
            if r["impl"] == "anyattn" and r["chosen"] == "sdpa":  # sdpa -> raw:sdpa when that row ran
                raw = next(
                    x for x in rows if (x["variant"], x["mode"], x["backend"]) == (r["variant"], r["mode"], "raw:sdpa")
                )
                if raw["status"] == "ok":
                    assert r["raw"] == "raw:sdpa" and r["raw_ms"] == raw["ms"]
                    assert _close(r["overhead_pct"], 100 * (r["ms"] - raw["ms"]) / raw["ms"], rel=1e-12)
            if r["impl"] == "anyattn" and r["chosen"] == "eager":  # no raw counterpart: empty
                assert r["raw"] == "" and math.isnan(r["overhead_pct"])


def test_matrix_row_check_recomputed_against_float64(matrix_run):
    """check_err / check_bound of the sdpa causal forward row: the max-abs error of the very call
    against a float64 reference written by hand, bound 2 x eager's float32 error + 1e-5."""
    from anyattn.bench import cases

    *_, doc = matrix_run[0]
    r = next(r for r in doc["results"] if (r["variant"], r["backend"]) == ("causal", "sdpa"))
    assert r["status"] == "ok" and r["check"] == "ok" and r["verify"] == "full shape"
    cfg = cases.make_config("causal", "fwd", "fp32", B=2, S=24, H=4, D=8, window=5, n_docs=3, cap=50.0, device="cpu")
    inp = cases.build_inputs(cfg)
    vis = (torch.arange(24)[None, :] <= torch.arange(24)[:, None]).expand(2, 1, 24, 24)
    want = _ref64(inp.q.double(), inp.k.double(), inp.v.double(), vis)
    got = anyattn.attention(inp.q, inp.k, inp.v, mask=anyattn.causal(), backend="sdpa")
    ref = anyattn.attention(inp.q, inp.k, inp.v, mask=anyattn.causal(), backend="eager")
    err, ref_err = float((got.double() - want).abs().max()), float((ref.double() - want).abs().max())
    assert _close(r["check_err"], err, rel=1e-6) and _close(r["check_bound"], 2 * ref_err + 1e-5, rel=1e-6)


def test_matrix_a_refusing_backend_shows_the_refusal_not_a_number(matrix_run):
    _, out, _, d, doc = matrix_run[0]
    r = next(r for r in doc["results"] if (r["variant"], r["backend"]) == ("softcap", "sdpa"))
    inp = {"mask": anyattn.causal(), "score": anyattn.softcap(50.0)}
    q = k = v = torch.zeros(2, 4, 24, 8)
    why = next(x.reason for x in anyattn.explain(q, k, v, backend="sdpa", **inp).rows if x.backend == "sdpa")
    assert r["status"] == "skipped" and r["reason"] == f"refused: {why}" and math.isnan(r["tflops"])
    raw = next(r for r in doc["results"] if (r["variant"], r["backend"]) == ("softcap", "raw:sdpa"))
    assert raw["status"] == "skipped" and "softcap" in raw["reason"]
    # stdout's compact table lists measured rows only; kernels.md has the refusal with its reason
    block = out.split("softcap | fwd | fp32 | B=2 S=24", 1)[1].split("alibi | fwd", 1)[0]
    assert [ln.split()[0] for ln in block.strip().splitlines()] == ["eager", "auto>eager"]
    md_row = next(
        ln
        for ln in (d / "kernels.md").read_text().splitlines()
        if ln.startswith("| softcap | fwd | fp32 | 2 | 24 | sdpa |")
    )
    assert "| skipped | nan |" in md_row and why[:60] in md_row


def test_matrix_without_tqdm_and_matplotlib_prints_plain_progress_and_names_the_skipped_plot(monkeypatch, tmp_path):
    """docs/benchmarks.md: without the optional packages "the commands still run, print plain
    progress lines and say which file they skipped". Also the host-overhead rows' arithmetic."""
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name in ("tqdm", "matplotlib") else real(name, *a)
    )
    argv = ["bench", "kernels", "--variants", "causal", "--modes", "fwd", "--backends", "eager,sdpa,auto,raw:sdpa",
            *[a for a in SIZES if a not in ("--no-host-overhead", "--no-progress")], "--out", str(tmp_path)]  # fmt: skip
    rc, out, err = _cli(argv)
    assert rc == 0 and not err, err
    assert "[1/1] causal fwd fp32 B=2 S=24 Hq=4 D=8: " in out  # the plain progress line
    assert not (tmp_path / "kernels.png").exists()
    doc = json.loads((tmp_path / "kernels.json").read_text())
    note = "kernels.png not written: matplotlib is not installed"
    assert f"note: {note}" in out  # (stdout only: kernels.json / .md are written before the plot is tried)
    assert f"wrote {tmp_path / 'kernels.json'} (.csv, .md)" in out
    host = {h["backend"]: h for h in doc["host_overhead"]}
    assert set(host) == {"eager", "sdpa", "auto"}
    assert host["eager"]["reason"] == "no raw counterpart for eager" and math.isnan(host["eager"]["anyattn_us"])
    for name in ("sdpa", "auto"):
        h = host[name]
        assert h["raw"] == "raw:sdpa" and h["chosen"] == "sdpa" and not h["reason"]
        assert _close(h["overhead_us"], h["anyattn_us"] - h["raw_us"], rel=1e-12)
        assert f"{h['anyattn_us']:>11.1f} {h['raw_us']:>9.1f} {h['overhead_us']:>+12.1f}  raw:sdpa" in out


def test_docs_matrix_table_lists_every_variant():
    """docs/benchmarks.md "The matrix" lists nine variants; the CLI runs ten (`doc_window`:
    `documents(lengths) & sliding_window(W)`, in --help, in --quick and in --preset h200)."""
    text = (ROOT / "docs" / "benchmarks.md").read_text()
    table = text.split("Variants, each one `anyattn.attention` call", 1)[1].split("\n\n", 2)[1]
    documented = {ln.split("|")[1].strip() for ln in table.splitlines() if ln.startswith("| ") and "---" not in ln}
    documented.discard("variant")
    assert documented == set(kernels.VARIANTS), set(kernels.VARIANTS) ^ documented


# ================================================================================================
# --mode new-packing and --mode host: the arithmetic of their tables


def _parse_kernels(*argv):
    from anyattn.cli import build_parser

    return build_parser().parse_args(["bench", "kernels", *argv])


def test_new_packing_tflops_x_best_and_checks_follow_the_docs(tmp_path, capsys):
    """TFLOP/s = mean over the timed packings of 4 * D * visible pairs (doc-causal n(n+1)/2 per
    document and head, padding n^2 per row and head; fwd+bwd 3.5x) / ms/step; x best = ms / the
    best reference row; every row checked; packings distinct and of the documented ranges."""
    rc = main(["bench", "kernels", "--mode", "new-packing", "--quick", "--device", "cpu", "--no-progress",
               "--out", str(tmp_path)])  # fmt: skip
    assert rc == 0
    doc = json.loads((tmp_path / "new_packing.json").read_text())
    o = doc["options"]
    opts = churn.Options(**{k: tuple(v) if isinstance(v, list) else v for k, v in o.items()})
    n = opts.warmup + opts.check_steps + opts.steps
    for case in opts.cases:
        packs = churn_steps.packings(opts, case, n)
        assert len({tuple(p) for p in packs}) == n  # warm-up, check and timed steps never share one
        timed = packs[n - opts.steps :]
        for p in packs:
            if case == "packing":
                nd = len(p)
                assert sum(p) == opts.pack_S and opts.docs[0] <= nd <= opts.docs[1]
                assert all(max(1, opts.pack_S // (8 * nd)) <= x <= 2 * opts.pack_S // nd for x in p), p
            else:
                assert len(p) == opts.pad_B and all(opts.pad_S // 4 <= x <= opts.pad_S for x in p)
        for mode in opts.modes:
            rows = [r for r in doc["results"] if r["case"] == case and r["mode"] == mode]
            best = [
                r["ms"]
                for r in rows
                if r["status"] == "ok"
                and f"{r['backend']}" + (f" [{r['form']}]" if r["form"] else "") in doc["best_of"][case]
            ]
            for r in rows:
                if r["status"] != "ok":
                    assert math.isnan(r["ms"]) and math.isnan(r["tflops"]) and r["reason"]
                    continue
                assert r["check"] == "ok" and r["check_err"] <= r["check_bound"]
                assert r["ms"] == pytest.approx(statistics.median(r["times_ms"]), abs=1e-3)
                per = [sum(x * (x + 1) // 2 if case == "packing" else x * x for x in p) * r["H"] for p in timed]
                flops = statistics.fmean(4 * r["D"] * pp * (3.5 if mode == "fwd+bwd" else 1.0) for pp in per)
                assert _close(r["tflops"], flops / (r["ms"] * 1e-3) / 1e12, rel=1e-9), r
                if best:
                    assert _close(r["x_best"], r["ms"] / min(best), rel=1e-9)
                else:
                    assert math.isnan(r["x_best"])
    for t in doc["targets"]:
        assert t["met"] is (None if t["value"] != t["value"] else bool(t["value"] <= t["target"]))
    capsys.readouterr()


def test_host_mode_over_columns_and_targets_are_the_documented_arithmetic(tmp_path, capsys):
    rc = main(["bench", "kernels", "--mode", "host", "--quick", "--device", "cpu", "--host-calls", "20",
               "--host-rounds", "3", "--backends", "auto,sdpa,cudnn", "--out", str(tmp_path)])  # fmt: skip
    doc = json.loads((tmp_path / "host.json").read_text())
    rows = {r["name"]: r for r in doc["results"]}
    assert rc == (1 if any(r["status"] == "failed" for r in rows.values()) else 0)
    base = rows["raw sdpa is_causal"]["us"]
    for r in rows.values():
        if r["status"] != "ok":
            assert math.isnan(r["us"]) and r["reason"], r
            continue
        assert r["check"] == "ok" and len(r["rounds_us"]) == 3 == doc["options"]["rounds"]
        assert r["us"] == pytest.approx(statistics.median(r["rounds_us"]), abs=0.01)
        assert _close(r["over_sdpa_us"], r["us"] - base, rel=1e-9, abs_=1e-9)
        if r["counterpart"]:
            assert _close(r["over_counterpart_us"], r["us"] - rows[r["counterpart"]]["us"], rel=1e-9, abs_=1e-9)
    # a backend that cannot run here shows why, not a number
    cud = [r for r in rows.values() if r["backend"] == "cudnn"]
    assert cud and all(r["status"] == "skipped" and "CUDA" in r["reason"] for r in cud)
    for t in doc["targets"]:
        r = rows[t["what"].split(":")[0]]
        assert t["value"] == r["over_sdpa_us"] or (math.isnan(t["value"]) and math.isnan(r["over_sdpa_us"]))
        assert t["met"] is (None if t["value"] != t["value"] else bool(t["value"] <= t["target"]))
    assert [t["target"] for t in doc["targets"]] == [10.0, 30.0] * 3
    capsys.readouterr()


@pytest.mark.parametrize("mode", ["host", "new-packing"])
def test_interrupted_modes_keep_their_files_and_exit_130(mode, monkeypatch, tmp_path, capsys):
    """Ctrl-C / SIGTERM: the rows measured so far stay in the files, exit status 130."""
    if mode == "host":
        real, n = hostcall._us_per_call, []

        def stop(*a):
            n.append(1)
            if len(n) > 3:
                raise KeyboardInterrupt("signal 15")
            return real(*a)

        monkeypatch.setattr(hostcall, "_us_per_call", stop)
        argv = ["--mode", "host", "--quick", "--device", "cpu", "--host-calls", "5", "--host-rounds", "2"]
        name = "host.json"
    else:
        real, n = churn._time_steps, []

        def stop(*a):
            n.append(1)
            if len(n) > 1:
                raise KeyboardInterrupt("signal 15")
            return real(*a)

        monkeypatch.setattr(churn, "_time_steps", stop)
        argv = ["--mode", "new-packing", "--quick", "--device", "cpu", "--cases", "padding", "--modes", "fwd"]
        name = "new_packing.json"
    rc = main(["bench", "kernels", *argv, "--out", str(tmp_path)])
    out = capsys.readouterr().out
    doc = json.loads((tmp_path / name).read_text())
    assert rc == 130 and doc["complete"] is False and doc["interrupted"] == "signal 15"
    assert "run INCOMPLETE" in out and (tmp_path / name.replace(".json", ".md")).exists()
    if mode == "new-packing":
        assert [r["status"] for r in doc["results"]][:1] == ["ok"]  # the finished row is kept


def test_sigterm_during_the_matrix_writes_the_files_and_exits_130(tmp_path):
    """docs/benchmarks.md: "SIGTERM / Ctrl-C writes the final files before exiting with status 130"."""
    env = dict(os.environ, PYTHONPATH=SRC, OMP_NUM_THREADS="1")
    argv = ["--variants", "dense,causal,documents,window,gqa,padding,prefix_lm", "--modes", "fwd,fwd+bwd",
            "--backends", "eager,sdpa,raw:sdpa", *SIZES, "--out", str(tmp_path)]  # fmt: skip
    p = subprocess.Popen([sys.executable, "-m", "anyattn", "bench", "kernels", *argv], cwd=ROOT, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        t0 = time.monotonic()
        while not (tmp_path / "kernels.json").exists() and p.poll() is None and time.monotonic() - t0 < 90:
            time.sleep(0.05)
        p.send_signal(signal.SIGTERM)
        out, err = p.communicate(timeout=90)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 130, (p.returncode, out[-2000:], err[-2000:])
    assert "Traceback" not in err
    doc = json.loads((tmp_path / "kernels.json").read_text())
    assert doc["complete"] is False and doc["interrupted"] == f"signal {int(signal.SIGTERM)}"
    assert 0 < len(doc["results"]) < 14 * 3
    assert (tmp_path / "kernels.csv").exists() and "complete: False" in (tmp_path / "kernels.md").read_text()
    assert "run INCOMPLETE (interrupted)" in out


def test_quick_new_packing_and_host_default_to_cuda_when_available(monkeypatch):
    """``--device`` help: "cuda or cpu (default: cuda when available)". The matrix's --quick follows
    it; --mode new-packing / host with --quick run on the CPU even on a GPU machine (the docs pass
    ``--device cpu`` explicitly for the CPU smoke tests)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert kernels.preset("quick").device == "cuda"
    o = churn.options_from_args(_parse_kernels("--mode", "new-packing", "--quick"))
    h = hostcall.options_from_args(_parse_kernels("--mode", "host", "--quick"))
    assert (o.device, h.device) == ("cuda", "cuda")


# ================================================================================================
# options, errors, --debug, --help, exit statuses

BAD = [
    (["bench", "kernels", "--heads", "0"], "--heads: expected a positive integer, got 0"),
    (["bench", "kernels", "--head-dim", "-3"], "--head-dim: expected a positive integer"),
    (["bench", "kernels", "--window", "0"], "--window: expected a positive integer"),
    (["bench", "kernels", "--docs", "0"], "--docs: expected a positive integer"),
    (["bench", "kernels", "--batch", "0"], "--batch: expected a positive integer"),
    (["bench", "kernels", "--budget-s", "0"], "--budget-s: expected a positive number of seconds"),
    (["bench", "kernels", "--device", "tpu"], "--device: expected cuda or cpu, got 'tpu'"),
    (["bench", "kernels", "--mode", "bogus"], "argument --mode: invalid choice: 'bogus'"),
    (["bench", "kernels", "--preset", "h100"], "argument --preset: invalid choice: 'h100'"),
    (["bench", "kernels", "--variants", ""], "--variants: expected a comma list"),
    (["bench", "kernels", "--backends", ""], "--backends: expected a comma list"),
    (["bench", "kernels", "--backends", "raw:nope"], "--backends: unknown ['raw:nope']"),
    (["bench", "kernels", "--seqlen", "1.5"], "argument --seqlen: invalid int value: '1.5'"),
    (["bench", "kernels", "--mode", "host", "--host-shape", "1,1,64"], "--host-shape: expected 4 positive integers"),
    (["bench", "kernels", "--mode", "host", "--host-calls", "0"], "--host-calls: expected a positive integer"),
    (["bench", "kernels", "--mode", "host", "--host-rounds", "-1"], "--host-rounds: expected a positive integer"),
    (["bench", "kernels", "--mode", "host", "--dtypes", "bf16,fp32"], "--mode host runs one dtype"),
    (
        ["bench", "kernels", "--mode", "host", "--budget-s", "5"],
        "--budget-s applies to --mode matrix or new-packing, not --mode host",
    ),
    (
        ["bench", "kernels", "--mode", "host", "--variants", "dense"],
        "--variants applies to --mode matrix, not --mode host",
    ),
    (
        ["bench", "kernels", "--mode", "matrix", "--seed", "3"],
        "--seed applies to --mode new-packing or host, not --mode matrix",
    ),
    (["bench", "kernels", "--mode", "host", "--no-host-overhead"], "--no-host-overhead applies to --mode matrix"),
    (["bench", "kernels", "--mode", "new-packing", "--window", "3"], "--window applies to --mode matrix"),
    (["bench", "kernels", "--mode", "new-packing", "--forms", "nope"], "--forms: unknown ['nope']"),
    (["bench", "kernels", "--mode", "new-packing", "--cases", "nope"], "--cases: unknown ['nope']"),
    (
        ["bench", "kernels", "--mode", "new-packing", "--docs-range", "0-3"],
        "--docs-range: expected 2 positive integers",
    ),
    (
        ["bench", "kernels", "--mode", "new-packing", "--warmup-steps", "0"],
        "--warmup-steps: expected a positive integer",
    ),
    (["bench", "kernels", "--mode", "new-packing", "--check-steps", "0"], "--check-steps: expected a positive integer"),
    (
        ["bench", "kernels", "--mode", "new-packing", "--budget-s", "-1"],
        "--budget-s: expected a positive number of seconds",
    ),
    (
        ["bench", "kernels", "--mode", "new-packing", "--pack-seqlen", "64", "--docs-range", "2-65"],
        "at most --pack-seqlen (64) documents",
    ),
    (["bench", "frobnicate"], "invalid choice: 'frobnicate'"),
    (["bench"], "a benchmark is required: kernels"),
    (["doctor", "--device", "tpu"], "--device: expected cuda or cpu, got 'tpu'"),
    (["doctor", "--backend", "eager,auto"], "--backend: unknown ['auto']"),
    (["doctor", "stray"], "unrecognized arguments: stray"),
    (["--debug"], "a command is required"),
]
if not torch.cuda.is_available():
    BAD += [
        (["bench", "kernels", "--device", "cuda"], "--device cuda: torch.cuda.is_available() is False"),
        (["doctor", "--device", "cuda"], "--device cuda: torch.cuda.is_available() is False"),
        (
            ["bench", "kernels", "--mode", "host", "--device", "cuda"],
            "--device cuda: torch.cuda.is_available() is False",
        ),
    ]


@pytest.mark.parametrize("argv, text", BAD, ids=[" ".join(a) or "-" for a, _ in BAD])
def test_bad_input_is_one_line_on_stderr_exit_2(argv, text):
    rc, _, err = _cli(argv)
    assert rc == 2 and len(err) == 1 and text in err[0], (rc, err)
    assert "Traceback" not in err[0] and "usage:" not in err[0]


def test_debug_adds_the_traceback_before_the_same_one_line():
    rc, _, plain = _cli(["bench", "kernels", "--heads", "0"])
    assert rc == 2 and len(plain) == 1
    for argv in (["--debug", "bench", "kernels", "--heads", "0"], ["bench", "kernels", "--heads", "0", "--debug"]):
        rc, _, err = _cli(argv)
        assert rc == 2 and err[0] == "Traceback (most recent call last):" and err[-1] == plain[0], err[-3:]
        assert any("UsageError" in ln for ln in err)
    # argparse's own usage errors stay one line with --debug (nothing to trace)
    rc, _, err = _cli(["--debug", "bench", "kernels", "--seqlen", "x"])
    assert rc == 2 and len(err) == 1


def test_an_unexpected_error_in_bench_kernels_is_one_line_exit_1(monkeypatch):
    def broken(*a, **kw):
        raise TypeError("nobody planned for this")

    monkeypatch.setattr(kernels, "run", broken)
    argv = ["bench", "kernels", "--variants", "causal", "--modes", "fwd", "--backends", "eager", *SIZES]
    rc, _, err = _cli(argv)
    assert rc == 1 and err == [
        "anyattn bench kernels: error: internal error TypeError: nobody planned for this (rerun with --debug for the traceback and report it)"
    ]
    rc, _, err = _cli(["--debug", *argv])
    assert (
        rc == 1
        and err[0].startswith("Traceback")
        and err[-1].startswith("anyattn bench kernels: error: internal error")
    )


def test_a_failed_matrix_row_is_exit_1_and_a_clean_run_exit_0(monkeypatch):
    argv = ["bench", "kernels", "--variants", "causal", "--modes", "fwd", "--backends", "eager,sdpa", *SIZES]
    rc, out, err = _cli(argv)
    assert rc == 0 and not err
    anyattn.clear_caches()
    monkeypatch.setattr(REGISTRY["sdpa"], "run", lambda call: (torch.zeros_like(call.q), None))
    rc, out, err = _cli(argv)
    anyattn.clear_caches()
    assert rc == 1 and not err and "1 failed" in out


HELP_FLAGS = {
    ("doctor",): ["--json", "--backend", "--device", "--full", "--no-speed"],
    ("bench", "kernels"): ["--mode", "--preset", "--quick", "--variants", "--backends", "--modes", "--dtypes", "--out",
                           "--seqlen", "--batch", "--heads", "--head-dim", "--window", "--docs", "--device", "--budget-s",
                           "--sweep", "--no-host-overhead", "--seed", "--cases", "--forms", "--steps", "--warmup-steps",
                           "--check-steps", "--pack-seqlen", "--docs-range", "--pad-shape", "--cpu-flex", "--host-calls",
                           "--host-rounds", "--host-shape"],
    ("bench", "model"): ["--family", "--preset", "--quick", "--rows", "--hf", "--out", "--max-tokens", "--budget-s"],
    ("bench", "serving"): ["--mode", "--preset", "--quick"],
    ("bench",): ["kernels", "model", "serving"],
    ("embed",): ["--model", "--out", "--pooling", "--layers"],
    (): ["doctor", "bench", "embed", "--debug"],
}  # fmt: skip


@pytest.mark.parametrize("cmd", list(HELP_FLAGS), ids=lambda c: " ".join(c) or "anyattn")
def test_every_subcommand_help_exits_0_and_lists_the_documented_options(cmd):
    rc, out, err = _cli([*cmd, "--help"])
    assert rc == 0 and not err and out.startswith(f"usage: anyattn {' '.join(cmd)}".rstrip())
    missing = [f for f in HELP_FLAGS[cmd] if not re.search(rf"(?<![\w-]){re.escape(f)}(?![\w-])", out)]
    assert not missing, missing


@pytest.mark.parametrize("mode", ["matrix", "new-packing", "host"])
def test_an_out_path_that_is_a_file_is_bad_input_refused_before_the_run(mode, tmp_path):
    """``--out`` naming an existing file: each mode ran (host: every row, then lost them all: its
    files are written only at the end), then failed with exit 1 and "File exists '...'". A bad
    option value is exit 2 with the option named, before any work (README, docs/reliability.md:
    ``embed --out`` that cannot be a store is refused up front)."""
    f = tmp_path / "a-file"
    f.write_text("x")
    argv = {
        "matrix": ["--variants", "causal", "--modes", "fwd", "--backends", "eager", *SIZES],
        "new-packing": ["--mode", "new-packing", "--quick", "--device", "cpu", "--cases", "padding", "--modes", "fwd",
                        "--backends", "sdpa"],
        "host": ["--mode", "host", "--quick", "--device", "cpu", "--host-calls", "5", "--host-rounds", "1"],
    }[mode]  # fmt: skip
    rc, _, err = _cli(["bench", "kernels", *argv, "--out", str(f)])
    assert rc == 2 and len(err) == 1 and "--out" in err[0], (rc, err)
    assert f.read_text() == "x"
