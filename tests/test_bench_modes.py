"""``anyattn bench kernels --mode new-packing`` and ``--mode host`` on the CPU (part of CI).

Smoke tests of the plumbing: the modes run at tiny sizes, emit their documented JSON schema and
table, check every row against the float64 oracle before timing it, and turn a wrong row into
NaN without stopping the run. No timing is asserted (numbers on a shared CPU mean nothing).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math

import pytest
import torch

from anyattn import attention, causal, documents
from anyattn.bench import UsageError, churn, churn_steps, hostcall, kernels

ROW_KEYS = {
    "case", "mode", "impl", "backend", "form", "chosen", "B", "S", "H", "D", "dtype", "status", "ms", "wall_ms",
    "first_ms", "tflops", "x_best", "steps", "times_ms", "check", "check_err", "check_bound", "checked", "reason",
}  # fmt: skip
HOST_KEYS = {
    "name", "impl", "backend", "chosen", "term", "fresh", "status", "us", "us_min", "rounds_us", "over_sdpa_us",
    "counterpart", "over_counterpart_us", "check", "check_err", "check_bound", "reason",
}  # fmt: skip


def _parse(*argv):
    p = argparse.ArgumentParser(prog="anyattn bench kernels")
    kernels.add_arguments(p)
    return p.parse_args(list(argv))


def _tiny(**kw) -> churn.Options:
    return dataclasses.replace(churn.quick("cpu"), **kw)


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ---------------------------------------------------------------------------------------------
# new packing every step


def test_new_packing_quick_writes_schema_and_table(tmp_path, capsys):
    rc = kernels.run_from_args(_parse("--mode", "new-packing", "--quick", "--device", "cpu", "--out", str(tmp_path)), "cmd np")
    assert rc == 0
    doc = json.loads((tmp_path / "new_packing.json").read_text())
    assert doc["schema"] == "anyattn.bench.kernels.new_packing/1" and doc["complete"] is True
    assert doc["meta"]["command"] == "cmd np"
    assert {"options", "timing", "flop_convention", "best_of", "results", "targets", "elapsed_s"} <= set(doc)
    rows = doc["results"]
    assert {(r["case"], r["mode"]) for r in rows} == {(c, m) for c in churn.CASES for m in ("fwd", "fwd+bwd")}
    for r in rows:
        assert set(r) == ROW_KEYS
        if r["status"] == "ok":
            assert r["check"] == "ok" and r["ms"] > 0 and len(r["times_ms"]) == r["steps"] == 4
        else:
            assert math.isnan(r["ms"]) and r["reason"]
    ok = {(r["case"], r["backend"], r["form"]) for r in rows if r["status"] == "ok"}
    # on a CPU: auto in every form and raw SDPA on padding (varlen, flash_torch: CUDA; flex: not compiled)
    assert {("packing", "auto", f) for f in churn.FORMS["packing"]} <= ok
    assert ("padding", "raw:sdpa", "") in ok
    skipped = {r["backend"]: r["reason"] for r in rows if r["status"] == "skipped"}
    assert "CUDA" in skipped["raw:varlen"] and "flash_torch" in skipped
    assert [t["what"].split(":")[0] for t in doc["targets"]] == (
        ["packing fwd+bwd"] * 2 + ["padding fwd+bwd (goal)"] + ["packing fwd"] * 2 + ["padding fwd (goal)"]
    )
    out = capsys.readouterr().out
    assert "new packing every step | fwd+bwd" in out and "target:" in out.splitlines()[-1]
    assert (tmp_path / "new_packing.md").read_text().startswith("# anyattn bench kernels --mode new-packing")


def test_new_packing_packings_are_distinct_and_sum_to_the_row():
    o = _tiny(pack_S=512, docs=(3, 9))
    packs = churn_steps.packings(o, "packing", 40)
    assert len({tuple(p) for p in packs}) == 40
    assert all(sum(p) == 512 and 3 <= len(p) <= 9 and min(p) > 0 for p in packs)
    pads = churn_steps.packings(o, "padding", 10)
    assert all(len(p) == o.pad_B and all(o.pad_S // 4 <= n <= o.pad_S for n in p) for p in pads)


@pytest.mark.parametrize("grad", [False, True])
def test_new_packing_oracle_per_document_equals_the_whole_row(grad):
    """The per-document float64 oracle (what makes a 16k-token check affordable) is the oracle of
    the whole doc-causal row."""
    p = [5, 17, 1, 9]
    g = torch.Generator().manual_seed(3)
    leaves = tuple(torch.randn(1, sum(p), 2, 8, generator=g).requires_grad_(grad) for _ in range(3))
    orc = churn_steps.Oracle("packing", p, leaves, grad, seed=1)
    q, k, v = (t.detach().double().transpose(1, 2).requires_grad_(grad) for t in leaves)
    out = attention(q, k, v, mask=documents(p) & causal(), backend="eager")
    assert torch.allclose(out.transpose(1, 2), orc.out, atol=1e-12)
    if grad:
        gs = torch.autograd.grad(out, (q, k, v), orc.dout.transpose(1, 2))
        for a, b in zip(gs, orc.grads):
            assert torch.allclose(a.transpose(1, 2), b, atol=1e-12)


def test_new_packing_wrong_row_prints_nan_and_the_run_goes_on(monkeypatch):
    real = churn_steps.term

    def forgetful(case, form, dev, S):  # the [list] form "forgets" causal(): a wrong answer
        if case == "packing" and form == "list":
            return lambda p: documents(p)
        return real(case, form, dev, S)

    monkeypatch.setattr(churn_steps, "term", forgetful)
    doc = churn.run(_tiny(cases=("packing",), modes=("fwd",)), log=lambda *a: None)
    rows = {(r["backend"], r["form"]): r for r in doc["results"]}
    bad = rows[("auto", "list")]
    assert bad["status"] == "failed" and bad["check"] == "FAIL" and math.isnan(bad["ms"])
    assert "wrong result vs float64 oracle" in bad["reason"]
    assert rows[("auto", "seqinfo")]["status"] == "ok"  # the rows after it still ran
    assert "nan" in churn.table(doc)


def test_new_packing_raising_row_is_recorded(monkeypatch):
    def boom(case, form, dev, S):
        def make(p):
            raise RuntimeError("kernel exploded")

        return make

    monkeypatch.setattr(churn_steps, "term", boom)
    doc = churn.run(_tiny(cases=("padding",), modes=("fwd",), backends=("sdpa",)), log=lambda *a: None)
    rows = [r for r in doc["results"] if r["impl"] == "anyattn"]
    assert rows and all(r["status"] == "failed" and "kernel exploded" in r["reason"] for r in rows)
    assert any(r["status"] == "ok" for r in doc["results"] if r["impl"] == "raw")


def test_new_packing_budget_skips_rows():
    doc = churn.run(_tiny(cases=("padding",), modes=("fwd",), budget_s=1e-9), log=lambda *a: None)
    assert all(r["status"] == "skipped" and "budget" in r["reason"] for r in doc["results"])


# ---------------------------------------------------------------------------------------------
# host overhead


def test_host_quick_writes_schema_and_table(tmp_path, capsys):
    rc = kernels.run_from_args(_parse("--mode", "host", "--quick", "--device", "cpu", "--out", str(tmp_path)), "cmd host")
    doc = json.loads((tmp_path / "host.json").read_text())
    assert doc["schema"] == "anyattn.bench.kernels.host/1" and doc["complete"] is True
    assert doc["meta"]["command"] == "cmd host" and doc["options"]["S"] == 64
    rows = {r["name"]: r for r in doc["results"]}
    assert all(set(r) == HOST_KEYS for r in rows.values())
    for name in ("raw sdpa is_causal", "auto causal() [cached]", "auto documents(list) [fresh]"):
        assert rows[name]["status"] == "ok" and rows[name]["check"] == "ok" and rows[name]["us"] > 0
        assert len(rows[name]["rounds_us"]) == 3
    r = rows["auto documents(list) [fresh]"]
    assert r["over_sdpa_us"] == pytest.approx(r["us"] - rows["raw sdpa is_causal"]["us"])
    assert [t["target"] for t in doc["targets"]] == [10.0, 30.0]
    # a failing row (wrong numbers) makes the exit status 1, and only then
    assert rc == (1 if any(x["status"] == "failed" for x in rows.values()) else 0)
    assert "target: auto documents(list) [fresh]" in capsys.readouterr().out


def test_host_wrong_row_prints_nan(monkeypatch):
    """A row whose numbers are wrong is not timed: NaN, FAIL, and the other rows still run."""
    import anyattn.bench.hostcall as hc

    real = hc.attention

    def off_by_one(q, k, v, *, mask=None, backend="auto", **kw):
        out = real(q, k, v, mask=mask, backend=backend, **kw)
        return out + 1 if backend == "sdpa" else out

    monkeypatch.setattr(hc, "attention", off_by_one)
    doc = hostcall.run(dataclasses.replace(hostcall.quick("cpu"), backends=("sdpa", "eager")), log=lambda *a: None)
    rows = {r["name"]: r for r in doc["results"]}
    assert rows["sdpa causal() [cached]"]["check"] == "FAIL" and math.isnan(rows["sdpa causal() [cached]"]["us"])
    assert rows["eager causal() [cached]"]["status"] == "ok"


# ---------------------------------------------------------------------------------------------
# options


@pytest.mark.parametrize(
    "argv, match",
    [
        (["--mode", "host", "--steps", "3"], "--steps applies to --mode new-packing"),
        (["--mode", "new-packing", "--preset", "h200"], "--preset applies to --mode matrix"),
        (["--cases", "packing"], "--cases applies to --mode new-packing, not --mode matrix"),
        (["--mode", "host", "--modes", "fwd"], "--modes applies to --mode matrix or new-packing"),
        (["--mode", "new-packing", "--pad-shape", "8x"], "--pad-shape: expected 2 positive integers"),
        (["--mode", "new-packing", "--docs-range", "9-3"], "LO <= HI"),
        (["--mode", "new-packing", "--dtypes", "bf16,fp16"], "runs one dtype"),
        (["--mode", "new-packing", "--backends", "flexx"], "--backends: unknown"),
        (["--mode", "new-packing", "--steps", "0"], "--steps: expected a positive integer"),
        (["--mode", "host", "--host-shape", "1,1,32,64"], "S must hold documents"),
        (["--mode", "host", "--backends", "raw:sdpa"], "--backends: unknown"),
    ],
)
def test_mode_options_refused_with_the_option_named(argv, match):
    with pytest.raises(UsageError, match=match):
        kernels.run_from_args(_parse(*argv, "--device", "cpu"), "cmd")


def test_new_packing_options_from_args():
    o = churn.options_from_args(_parse("--mode", "new-packing", "--device", "cpu", "--backends", "raw,auto",
                                       "--pad-shape", "4x128", "--docs-range", "2-5", "--steps", "7", "--seed", "3"))  # fmt: skip
    assert o.raw == ("raw:varlen", "raw:flex", "raw:sdpa") and o.backends == ("auto",)
    assert (o.pad_B, o.pad_S, o.docs, o.steps, o.seed) == (4, 128, (2, 5), 7, 3)
    h = hostcall.options_from_args(_parse("--mode", "host", "--device", "cpu", "--host-shape", "2,4,128,32",
                                          "--host-calls", "10", "--backends", "auto,eager"))  # fmt: skip
    assert (h.B, h.H, h.S, h.D, h.calls, h.backends) == (2, 4, 128, 32, 10, ("auto", "eager"))


def test_matrix_case_that_raises_is_recorded(monkeypatch):
    """A case whose construction raises becomes a failed '(case)' row; the run goes on."""

    def boom(cfg, state):
        raise RuntimeError("case construction failed")

    monkeypatch.setattr(kernels, "run_case", boom)
    sw = kernels.Sweep(variants=("causal",), modes=("fwd",), dtypes=("fp32",), shapes=((1, 16),), heads=2,
                       head_dim=8, device="cpu", host_overhead=False, backends=("eager",), raw=())  # fmt: skip
    doc = kernels.run(sw, progress=False, log=lambda *a: None)
    (r,) = doc["results"]
    assert r["backend"] == "(case)" and r["status"] == "failed" and "case construction failed" in r["reason"]


def test_visible_pairs_public_fallback_counts_the_same():
    """The FLOP count survives a move of the spec internals: the public fallback (weights of
    q = k = 0 through attention_with_weights) counts the same pairs for every matrix variant."""
    from anyattn.bench import cases

    for var in cases.VARIANTS:
        cfg = cases.make_config(var, "fwd", "fp32", B=3, S=40, H=2, D=8, window=7, n_docs=4, cap=20.0, device="cpu")
        m = cases.build_terms(cfg).mask
        want = cases.visible_pairs(m, 3, 2, 40, 40)
        got = cases._visible_pairs_public(m, 3, 2, 40, 40) if m is not None else want
        assert got == want, var
