"""``anyattn bench serving`` end to end on the CPU with the tiny model (a smoke run: the module
imports, every row kind runs, results are written); the GPU numbers come from the lead's run."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("transformers")

from anyattn.cli import main  # noqa: E402


def test_bench_serving_decode_rows_and_outputs(tmp_path, capsys):
    code = main(["bench", "serving", "--quick", "--batches", "2", "--contexts", "48", "--steps", "2", "--warmup", "1",
                 "--impls", "anyattn/paged,anyattn/contiguous,hf/sdpa", "--backends", "auto,eager", "--out", str(tmp_path)])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0, out
    data = json.loads((tmp_path / "serving.json").read_text())
    rows = data["rows"]
    assert {(r["impl"], r["backend"]) for r in rows} == {
        ("anyattn/paged", "auto"), ("anyattn/paged", "eager"), ("anyattn/contiguous", "auto"),
        ("anyattn/contiguous", "eager"), ("hf/sdpa", "-"),
    }  # fmt: skip
    assert all(r["status"] == "ok" and r["tokens_per_s"] > 0 for r in rows), rows
    assert [r["chosen"] for r in rows if r["backend"] == "eager"] == ["eager", "eager"]
    assert all(r["cache_bytes"] > 0 for r in rows)
    assert all(r["ms_min"] <= r["ms"] <= r["ms_max"] and r["compiles"] == 0 for r in rows), rows
    assert all(r["alloc_retries"] is None for r in rows if r["impl"].startswith("anyattn")), rows  # CUDA only
    assert data["command"].startswith("anyattn bench serving --quick")
    assert "| decode | anyattn/paged | auto |" in (tmp_path / "serving.md").read_text()


def test_bench_serving_prefill_packed_vs_padded(tmp_path, capsys):
    code = main(["bench", "serving", "--quick", "--mode", "prefill", "--prompts", "3", "--steps", "2", "--warmup", "1",
                 "--out", str(tmp_path)])  # fmt: skip
    assert code == 0, capsys.readouterr().out
    rows = json.loads((tmp_path / "serving.json").read_text())["rows"]
    assert [r["impl"] for r in rows if r["status"] == "ok"] == ["anyattn/paged/mixed-packed", "anyattn/padded", "hf/sdpa/padded"]


def test_bench_serving_names_a_bad_option(capsys):
    assert main(["bench", "serving", "--quick", "--impls", "nope"]) == 2
    assert "--impls: unknown ['nope']" in capsys.readouterr().err


def test_timed_steps_count_compilation_inside_the_timed_steps():
    """A row whose timed steps compile (a new shape each step) says so: its median is not a
    steady-state step. A steady step compiles nothing once warmed up."""
    import torch

    from anyattn.bench.serving import _timed_steps

    fn = torch.compile(lambda x: x * 2 + 1, backend="eager", dynamic=False)
    n = [4]

    def growing():  # a new static shape every call: a new graph every step
        n[0] += 1
        fn(torch.ones(n[0]))

    torch._dynamo.config.automatic_dynamic_shapes, saved = False, torch._dynamo.config.automatic_dynamic_shapes
    limit, torch._dynamo.config.recompile_limit = torch._dynamo.config.recompile_limit, 64
    try:
        t = _timed_steps(growing, "cpu", warmup=1, steps=3)
        assert t["compiles"] == 3, t
        x = torch.ones(3)
        t = _timed_steps(lambda: fn(x), "cpu", warmup=2, steps=3)
        assert t["compiles"] == 0, t
        assert t["ms_min"] <= t["ms"] <= t["ms_max"]
    finally:
        torch._dynamo.config.automatic_dynamic_shapes = saved
        torch._dynamo.config.recompile_limit = limit


def test_compile_workers_ready_waits_once_and_never_raises():
    """bench serving starts inductor's compile workers before its first timed step (on CUDA); the
    helper reports what happened and returns at once when the pool is already up."""
    import time

    from anyattn.bench.timing import compile_workers_ready

    first = compile_workers_ready()
    assert first == "ready" or first.startswith(("not used", "could not wait", "unavailable")), first
    t0 = time.perf_counter()
    assert compile_workers_ready() == first
    assert time.perf_counter() - t0 < 1.0
