"""``anyattn bench model`` on the CPU (part of CI): the rows of issue 15 (plain, compiled,
uncompiled, HF, the FastPLMs-style SDPA port), their checks, and an import-light command line.

No timing is asserted. The compiled row is skipped under --quick (no torch.compile in CPU CI).
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SRC = str(Path(__file__).resolve().parents[1] / "src")


def _parse(*argv):
    from anyattn.bench import model

    p = argparse.ArgumentParser(prog="anyattn bench model")
    model.add_arguments(p)
    return p.parse_args(list(argv))


# ---------------------------------------------------------------------------------------------
# import-light: --help without transformers


def _blocked(code: str) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter where ``import transformers`` fails (not installed)."""
    pre = "import sys; sys.modules['transformers'] = None\n"
    return subprocess.run([sys.executable, "-c", pre + code], capture_output=True, text=True, timeout=120,
                          env={"PYTHONPATH": SRC, "PATH": "/usr/bin:/bin"})  # fmt: skip


def test_help_works_without_transformers():
    p = _blocked("from anyattn.cli import main\nrc = main(['bench', 'model', '--help'])\nprint('rc', rc)")
    assert p.returncode == 0, p.stderr
    assert "--rows" in p.stdout and "--preset" in p.stdout and "not installed" not in p.stdout
    assert p.stdout.strip().endswith("rc 0")
    p = _blocked("from anyattn.cli import main\nrc = main(['--help'])\nprint('rc', rc)")
    assert p.returncode == 0 and p.stdout.strip().endswith("rc 0"), p.stderr


def test_run_without_transformers_names_the_extra():
    p = _blocked("from anyattn.cli import main\nsys.exit(main(['bench', 'model', '--quick']))")
    assert p.returncode != 0
    assert "pip install 'anyattn[models]'" in p.stderr


# ---------------------------------------------------------------------------------------------
# the SDPA port

transformers = pytest.importorskip("transformers")


def _hf_and_batch(seed=0):
    from anyattn.models import ESM2Config

    cfg = ESM2Config(vocab_size=33, hidden_size=64, num_hidden_layers=3, num_attention_heads=4, intermediate_size=128)
    torch.manual_seed(seed)
    hf = transformers.EsmModel._from_config(transformers.EsmConfig(**cfg.to_hf_dict()), attn_implementation="eager").eval()
    with torch.no_grad():  # non-trivial LayerNorms and biases
        for p in hf.parameters():
            p.add_(0.1 * torch.randn_like(p))
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(4, 24, (3, 21), generator=g)
    am = torch.ones(3, 21, dtype=torch.long)
    am[1, 13:], am[2, 4:] = 0, 0
    ids[am == 0], ids[:, 0], ids[0, 5] = 1, 0, 32  # padding, <cls>, one <mask> (token dropout)
    return cfg, hf, ids, am


def test_sdpa_port_is_esm2_exactly_in_float32():
    from anyattn.bench.sdpa_port import from_hf_state_dict

    cfg, hf, ids, am = _hf_and_batch()
    port = from_hf_state_dict(cfg.to_hf_dict(), hf.state_dict())
    with torch.no_grad():
        ref, out = hf(input_ids=ids, attention_mask=am).last_hidden_state, port(ids, am)
    keep = am.bool()
    assert float((out[keep] - ref[keep]).abs().max()) <= 1e-5 * float(ref[keep].abs().max())
    bf = from_hf_state_dict(cfg.to_hf_dict(), hf.state_dict(), dtype=torch.bfloat16)
    assert bf.inv_freq.dtype == torch.float32 and bf.encoder.layer[0].attention.self.query.weight.dtype == torch.bfloat16


def test_sdpa_port_refuses_weights_that_do_not_fit():
    from anyattn.bench.sdpa_port import from_hf_state_dict

    cfg, hf, _, _ = _hf_and_batch()
    sd = dict(hf.state_dict())
    del sd["encoder.layer.1.intermediate.dense.weight"]
    with pytest.raises(ValueError, match=r"missing \['encoder\.layer\.1\.intermediate\.dense\.weight'\]"):
        from_hf_state_dict(cfg.to_hf_dict(), sd)


# ---------------------------------------------------------------------------------------------
# the run


def test_bench_model_quick_rows_and_schema(tmp_path, capsys):
    from anyattn.bench import model

    rc = model.run_from_args(_parse("--quick", "--num-seqs", "12", "--hf", "sdpa", "--out", str(tmp_path)), "cmd m")
    assert rc == 0
    doc = json.loads((tmp_path / "model.json").read_text())
    assert doc["schema"] == "anyattn.bench.model/1" and doc["command"] == "cmd m" and doc["complete"] is True
    rows = {r["name"]: r for r in doc["results"]}
    assert list(rows) == ["anyattn plain", "hf[sdpa]", "anyattn compiled", "fastplms-sdpa", "anyattn uncompiled"]
    assert rows["anyattn compiled"]["status"] == "skipped" and "--quick" in rows["anyattn compiled"]["error"]
    for name in ("anyattn plain", "anyattn uncompiled", "hf[sdpa]", "fastplms-sdpa"):
        r = rows[name]
        assert r["status"] == "ok" and r["check"] == "ok" and r["check_rel_l2"] <= r["check_bound"]
        assert r["cold_pass_tokens_per_s"] > 0 and r["cold_pass_s"] >= r["first_call_s"] > 0
        assert len(r["times_s"]) == 3 and min(r["times_s"]) <= r["time_s"] <= max(r["times_s"])
    assert "compile_layers=" in rows["anyattn plain"]["variant"]
    ref = doc["reference"]
    assert ref["port_float32_rel_l2"] <= 1e-4 and ref["bound"] >= 1e-2
    assert doc["goal"]["target"] == 2.0 and doc["goal"]["value"] > 0
    out = capsys.readouterr().out
    assert "goal: anyattn plain / hf[sdpa]" in out and "1st pass" in out


def test_bench_model_wrong_port_is_nan_and_the_run_goes_on(monkeypatch):
    """A port that computes something else fails its check: NaN numbers, the other rows run."""
    from anyattn.bench import model, sdpa_port

    monkeypatch.setattr(sdpa_port, "_gelu", torch.relu)
    a = _parse("--quick", "--num-seqs", "8", "--hf", "sdpa", "--rows", "uncompiled,port")
    doc = model.run(model._opts_from_args(a), log=lambda *x: None)
    rows = {r["name"]: r for r in doc["results"]}
    port = rows["fastplms-sdpa"]
    assert port["status"] == "failed" and math.isnan(port["tokens_per_s"]) and "port in float32 differs" in port["error"]
    assert rows["anyattn uncompiled"]["status"] == "ok" and rows["hf[sdpa]"]["status"] == "ok"


def test_bench_model_options_refused():
    from anyattn.bench import UsageError, model

    with pytest.raises(UsageError, match="--rows: unknown"):
        model._opts_from_args(_parse("--quick", "--rows", "plain,fast"))
    with pytest.raises(UsageError, match="--preset"):
        model._opts_from_args(_parse("--preset", "esm2_t99_1T", "--device", "cpu"))
