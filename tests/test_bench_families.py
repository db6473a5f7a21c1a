"""``anyattn bench model --family ...`` and the embed benchmark on the CPU (part of CI): the SDPA
ports of ESM C and ANKH against their references, the rows of each family, their checks, what a
missing reference or a wrong row records, and the device script's summary.

Tiny configs, float32, no torch.compile; no timing is asserted.
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

ROOT = Path(__file__).resolve().parents[1]
SRC = str(ROOT / "src")


def _parse(*argv):
    from anyattn.bench import model

    p = argparse.ArgumentParser(prog="anyattn bench model")
    model.add_arguments(p)
    return p.parse_args(list(argv))


def test_help_lists_families_without_transformers():
    pre = "import sys; sys.modules['transformers'] = None\nfrom anyattn.cli import main\nrc = main(['bench', 'model', '--help'])\n"
    p = subprocess.run([sys.executable, "-c", pre + "print('rc', rc)"], capture_output=True, text=True, timeout=120,
                       env={"PYTHONPATH": SRC, "PATH": "/usr/bin:/bin"})  # fmt: skip
    assert p.returncode == 0, p.stderr
    assert "--family" in p.stdout and "esmc_300m" in p.stdout and "--budget-s" in p.stdout
    assert p.stdout.strip().endswith("rc 0")


def test_summary_reports_missing_and_partial_stages(tmp_path, capsys):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import families_summary as fs
    finally:
        sys.path.pop(0)
    work, out = tmp_path / "work", tmp_path / "out"
    (work / "esm2").mkdir(parents=True)
    row = {"name": "anyattn plain", "kind": "anyattn", "status": "ok", "tokens_per_s": 2000.0, "cold_pass_tokens_per_s": 1000.0,
           "check": "ok", "check_rel_l2": 1e-3, "error": ""}  # fmt: skip
    doc = {"family": "esm2", "complete": False, "interrupted": "SIGTERM", "workload": {}, "reference": {}, "results": [row]}
    (work / "esm2" / "model.json").write_text(json.dumps(doc))
    (work / "esmc_300m").mkdir()
    (work / "esmc_300m" / "model.json").write_text("{not json")
    fs.bundle(str(work), str(out))
    fs.summary(str(out))
    text = capsys.readouterr().out
    assert "[esm2] (INCOMPLETE (SIGTERM))" in text and "2.0k tok/s warm" in text
    assert "[esmc_300m] (esmc_300m" not in text and "unreadable" in json.dumps(json.loads((out / "families.json").read_text()))
    assert "[ankh_base] (not produced)" in text and "[embed] (not produced)" in text


def test_device_script_is_valid_bash():
    assert subprocess.run(["bash", "-n", str(ROOT / "benchmarks" / "device_round5_families.sh")]).returncode == 0


# ---------------------------------------------------------------------------------------------
# the ports

transformers = pytest.importorskip("transformers")


def _ids(pad: int, vocab_lo: int, vocab_hi: int, lengths, seed=1):
    g = torch.Generator().manual_seed(seed)
    S = max(lengths)
    x = torch.full((len(lengths), S), pad, dtype=torch.long)
    am = torch.zeros((len(lengths), S), dtype=torch.long)
    for r, n in enumerate(lengths):
        x[r, :n] = torch.randint(vocab_lo, vocab_hi, (n,), generator=g)
        am[r, :n] = 1
    return x, am


def _perturb(sd: dict, seed=2) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in sd.items()}


def test_esmc_port_equals_anyattn_and_transformers_in_float32():
    from anyattn.bench import families
    from anyattn.bench.family_ports import esmc_port

    fam = families.get("esmc")
    cfg = fam.quick_config()
    sd = _perturb(fam.template(cfg, "cpu", torch.float32, 0))  # non-trivial norms
    x, am = _ids(1, 4, 24, [21, 13, 5])
    keep = am.bool()
    with torch.no_grad():
        port = esmc_port(fam.describe(cfg), sd)(x, am)[keep]
        ours = fam.anyattn(cfg, sd, "cpu", torch.float32, attn_backend="eager")(x, attention_mask=am).last_hidden_state[keep]
    assert (port - ours).abs().max() <= 1e-5
    if not hasattr(transformers, "EsmcModel"):
        pytest.skip(f"transformers {transformers.__version__} has no EsmcModel")
    hf = fam.hf(cfg, sd, "cpu", torch.float32, "eager")
    with torch.no_grad():
        theirs = hf(x, am).last_hidden_state[keep]
    assert (port - theirs).abs().max() <= 1e-5


def test_ankh_port_and_buckets_equal_transformers_in_float32():
    from anyattn.bench import families
    from anyattn.bench.family_ports import ankh_port, t5_bucket

    rel = torch.arange(-300, 301)[None, :]
    for N, M in ((16, 20), (64, 128), (32, 128)):
        want = transformers.models.t5.modeling_t5.T5Attention._relative_position_bucket(rel, True, N, M)
        assert torch.equal(t5_bucket(rel, N, M), want)
    fam = families.get("ankh")
    cfg = fam.quick_config()
    sd = _perturb(fam.template(cfg, "cpu", torch.float32, 0))
    x, am = _ids(0, 3, 23, [37, 24, 9])  # longer than max_distance 20: the log and last buckets
    keep = am.bool()
    with torch.no_grad():
        port = ankh_port(fam.describe(cfg), sd)(x, am)[keep]
        theirs = fam.hf(cfg, sd, "cpu", torch.float32, "eager")(x, am).last_hidden_state[keep]
        ours = fam.anyattn(cfg, sd, "cpu", torch.float32, attn_backend="eager")(x, attention_mask=am).last_hidden_state[keep]
    assert (port - theirs).abs().max() <= 1e-5
    assert (ours - theirs).abs().max() <= 1e-5


@pytest.mark.parametrize("gqa", [False, True])
def test_e1_port_equals_anyattn_in_float64_on_single_sequence_rows(gqa):
    """The port is written without anyattn (padded SDPA, every layer sees the whole row): on
    single-sequence samples, left and right padded, both layer kinds, GQA and the clamp active, it
    equals E1Model's eager path in float64 (up to the float32 rotary both use); a row with a context sequence is refused."""
    import copy

    from anyattn.bench import families
    from anyattn.bench.family_ports import e1_port

    fam = families.get("e1")
    cfg = copy.deepcopy(fam.quick_config())
    if not gqa:
        cfg.num_key_value_heads = cfg.num_attention_heads
    cfg.clip_qkv = 0.5  # the perturbed weights reach it
    sd = _perturb(fam.template(cfg, "cpu", torch.float64, 0))
    seqs = ["MKTAYIAKQR", "QISFVKSHF", "SRQLEERLGLIEVQAPILSRVGDGTQDNLSGAEK"]
    enc = [fam.encode(s) for s in seqs]
    S = max(map(len, enc))
    x = torch.zeros((3, S), dtype=torch.long)
    am = torch.zeros((3, S), dtype=torch.long)
    for r, ids in enumerate(enc):
        sl = slice(S - len(ids), S) if r == 1 else slice(0, len(ids))  # row 1 left-padded
        x[r, sl], am[r, sl] = torch.tensor(ids), 1
    keep = am.bool()
    port = e1_port(cfg.to_dict(), sd, dtype=torch.float64)
    assert any(port.is_global) and not all(port.is_global)
    with torch.no_grad():
        got = port(x, am)[keep]
        want = fam.anyattn(cfg, sd, "cpu", torch.float64, attn_backend="eager")(x, attention_mask=am).last_hidden_state[keep]
    assert (got - want).abs().max() <= 1e-5  # both rotate in float32, as E1 does
    two = torch.tensor([fam.encode("MKTAY") + fam.encode("QISF")])
    with pytest.raises(ValueError, match="one <bos>"):
        port(two, torch.ones_like(two))


def test_dplm_port_equals_transformers_in_float32():
    from anyattn.bench import families
    from anyattn.bench.family_ports import dplm_port

    fam = families.get("dplm")
    cfg = fam.quick_config()
    sd = _perturb(fam.template(cfg, "cpu", torch.float32, 0))
    sd["lm_head.decoder.weight"] = sd["esm.embeddings.word_embeddings.weight"]  # tied, as the checkpoint
    x, am = _ids(1, 4, 24, [21, 13, 5])
    keep = am.bool()
    with torch.no_grad():
        port = dplm_port(cfg.to_hf_dict(), sd)(x, am)[keep]
        theirs = fam.hf(cfg, sd, "cpu", torch.float32, "eager")(x, am).logits[keep]
        untied = {k: v for k, v in sd.items() if k != "lm_head.decoder.weight"}
        again = dplm_port(cfg.to_hf_dict(), untied)(x, am)[keep]
    assert port.shape[-1] == cfg.vocab_size
    assert (port - theirs).abs().max() <= 1e-4 * theirs.abs().max()
    assert torch.equal(port, again)


def test_ports_refuse_weights_that_do_not_fit():
    from anyattn.bench import families
    from anyattn.bench.family_ports import ankh_port, dplm_port, e1_port, esmc_port

    makers = (("esmc", esmc_port, None), ("ankh", ankh_port, None), ("e1", e1_port, "to_dict"), ("dplm", dplm_port, "to_hf_dict"))
    for name, make, how in makers:
        fam = families.get(name)
        cfg = fam.quick_config()
        desc = getattr(cfg, how)() if how else fam.describe(cfg)
        sd = fam.template(cfg, "cpu", torch.float32, 0)
        key = sorted(sd)[3]
        with pytest.raises(ValueError, match="missing"):
            make(desc, {k: v for k, v in sd.items() if k != key})
        with pytest.raises(ValueError, match="unexpected"):
            make(desc, {**sd, "extra.weight": torch.zeros(1)})


def test_every_family_loads_one_state_dict_and_tokenizes_the_bench_residues():
    from anyattn.bench import families
    from anyattn.bench.workload import sequences

    seqs = sequences([5, 9], 0)
    extra = {"esm2": 2, "esmc": 2, "dplm": 2, "e1": 4, "ankh": 1}
    for name, fam in families.FAMILIES.items():
        cfg = fam.quick_config()
        sd = fam.template(cfg, "cpu", torch.float32, 0)
        m = fam.anyattn(cfg, sd, "cpu", torch.float32)
        got = m.state_dict()
        assert all(torch.equal(got[k], v) for k, v in sd.items() if k in got), name
        assert [len(fam.encode(s)) for s in seqs] == [5 + extra[name], 9 + extra[name]], name
        n = len(fam.encode(seqs[1]))
        assert len(range(n)[fam.residues(n)]) == 9, name
        assert fam.flops(cfg, [n]) > 0


# ---------------------------------------------------------------------------------------------
# the runs


@pytest.mark.parametrize("family", ["esmc", "ankh", "e1", "dplm"])
def test_family_quick_rows_and_schema(family, tmp_path, capsys):
    from anyattn.bench import model

    rc = model.run_from_args(_parse("--family", family, "--quick", "--num-seqs", "8", "--hf", "sdpa", "--repeats", "2",
                                    "--out", str(tmp_path)), "cmd f")  # fmt: skip
    assert rc == 0
    doc = json.loads((tmp_path / "model.json").read_text())
    assert doc["schema"] == "anyattn.bench.model/1" and doc["family"] == family and doc["command"] == "cmd f"
    assert doc["complete"] is True and doc["workload"]["family"] == family
    for k in ("meta", "workload", "reference", "results", "goal", "notes", "interrupted", "elapsed_s"):
        assert k in doc
    rows = {r["name"]: r for r in doc["results"]}
    assert list(rows) == ["anyattn plain", "hf[sdpa]", "fastplms-sdpa", "anyattn compiled", "anyattn uncompiled"]
    plain = rows["anyattn plain"]
    assert plain["status"] == "ok" and plain["check"] == "ok" and plain["check_rel_l2"] <= plain["check_bound"]
    assert plain["cold_pass_tokens_per_s"] > 0 and len(plain["times_s"]) == 2
    ref = doc["reference"]
    if family == "e1":  # no HF model: the port in float32 is the (independent) reference
        assert ref["kind"] == "port" and ref["independent"] is True
        assert rows["hf[sdpa]"]["status"] == "skipped" and "no E1" in rows["hf[sdpa]"]["error"]
        assert ref["port_float32_vs"] == "anyattn eager float32"
    else:
        assert ref["independent"] is True and rows["hf[sdpa]"]["status"] == "ok" and rows["hf[sdpa]"]["check"] == "ok"
    port = rows["fastplms-sdpa"]
    assert port["status"] == "ok" and port["check"] == "ok" and ref["port_float32_rel_l2"] <= 1e-4
    # every family has compile_layers: its row is skipped under --quick only (compile time), and
    # the uncompiled row (config.compile_layers = False) runs
    compiled = rows["anyattn compiled"]
    assert compiled["status"] == "skipped" and "--quick" in compiled["error"], compiled["error"]
    assert rows["anyattn uncompiled"]["status"] == "ok" and rows["anyattn uncompiled"]["check"] == "ok"
    assert "config.compile_layers=False" in rows["anyattn uncompiled"]["variant"]
    if family == "dplm":
        assert ref["output"] == "logits"
    out = capsys.readouterr().out
    assert "x HF" in out and "x port" in out and "1st pass" in out


def test_family_wrong_port_is_nan_and_the_run_goes_on(monkeypatch):
    from anyattn.bench import family_ports, family_run, model

    monkeypatch.setattr(family_ports, "_gelu_tanh", torch.relu)  # not ANKH's activation
    doc = family_run.run(family_run.opts_from_args(_parse("--family", "ankh", "--quick", "--num-seqs", "6", "--hf", "sdpa",
                                                          "--rows", "plain,port")), log=lambda *x: None)  # fmt: skip
    rows = {r["name"]: r for r in doc["results"]}
    port = rows["fastplms-sdpa"]
    assert port["status"] == "failed" and math.isnan(port["tokens_per_s"]) and "port in float32 differs" in port["error"]
    assert rows["anyattn plain"]["status"] == "ok" and rows["hf[sdpa]"]["status"] == "ok"
    assert model.ROWS  # the module the options come from


def test_family_wrong_anyattn_row_is_nan(monkeypatch):
    """A model computing something else fails its check after timing: NaN numbers; a raising
    row is recorded with its error; the other rows run."""
    from anyattn.bench import families, family_run

    fam = families.get("esmc")
    real = fam.anyattn

    def wrong(cfg, sd, device, dtype, **kw):
        m = real(cfg, sd, device, dtype, **kw)
        if not kw:  # the rows (the reference and the baseline pass attn_backend="eager")
            # a new tensor: the rows' parameters may share the run's state dict (assigned, not copied)
            m.transformer.norm.weight = torch.nn.Parameter(m.transformer.norm.weight.detach() * 1.5)
        return m

    monkeypatch.setattr(fam, "anyattn", wrong)
    doc = family_run.run(family_run.opts_from_args(_parse("--family", "esmc", "--quick", "--num-seqs", "6", "--hf", "sdpa",
                                                          "--rows", "plain,port")), log=lambda *x: None)  # fmt: skip
    rows = {r["name"]: r for r in doc["results"]}
    assert rows["anyattn plain"]["status"] == "failed" and rows["anyattn plain"]["check"] == "FAIL"
    assert math.isnan(rows["anyattn plain"]["tokens_per_s"]) and rows["fastplms-sdpa"]["status"] == "ok"

    def boom(*a, **kw):
        raise RuntimeError("no such kernel")

    monkeypatch.setattr(fam, "anyattn", lambda cfg, sd, device, dtype, **kw: real(cfg, sd, device, dtype, **kw) if kw else boom())
    doc = family_run.run(family_run.opts_from_args(_parse("--family", "esmc", "--quick", "--num-seqs", "6", "--hf", "none",
                                                          "--rows", "plain,port")), log=lambda *x: None)  # fmt: skip
    rows = {r["name"]: r for r in doc["results"]}
    assert rows["anyattn plain"]["status"] == "failed" and "no such kernel" in rows["anyattn plain"]["error"]
    assert rows["fastplms-sdpa"]["status"] == "ok"


def test_esmc_without_native_transformers_model_falls_back_to_the_port(monkeypatch):
    import types

    from anyattn.bench import families, family_run

    # a transformers without the native ESM C model (e.g. an older release than the one that added it)
    monkeypatch.setattr(families, "_transformers", lambda: types.SimpleNamespace(__version__="5.0-test"))
    doc = family_run.run(family_run.opts_from_args(_parse("--family", "esmc", "--quick", "--num-seqs", "6", "--hf", "sdpa")),
                         log=lambda *x: None)  # fmt: skip
    rows = {r["name"]: r for r in doc["results"]}
    assert rows["hf[sdpa]"]["status"] == "skipped" and "no EsmcModel" in rows["hf[sdpa]"]["error"]
    ref = doc["reference"]
    assert ref["kind"] == "port" and ref["independent"] is True and ref["port_float32_vs"] == "anyattn eager float32"
    assert ref["port_float32_rel_l2"] <= 1e-4 and "port" in ref["baseline"]
    assert rows["anyattn plain"]["check"] == "ok" and rows["fastplms-sdpa"]["status"] == "ok"
    assert "fastplms-sdpa" in doc["goal"]["what"]


def test_hf_alternatives_take_the_first_that_builds(monkeypatch):
    from anyattn.bench import families, family_run

    fam = families.get("ankh")
    real = fam.hf

    def no_sdpa(cfg, sd, device, dtype, impl):
        if impl == "sdpa":
            raise families.Unavailable("T5EncoderModel refuses attn_implementation='sdpa'")
        return real(cfg, sd, device, dtype, impl)

    monkeypatch.setattr(fam, "hf", no_sdpa)
    doc = family_run.run(family_run.opts_from_args(_parse("--family", "ankh", "--quick", "--num-seqs", "6", "--hf", "sdpa|eager",
                                                          "--rows", "plain")), log=lambda *x: None)  # fmt: skip
    rows = {r["name"]: r for r in doc["results"]}
    assert rows["hf[eager]"]["status"] == "ok" and "refuses" in rows["hf[eager]"]["note"]
    assert "eager" in doc["reference"]["baseline"] and "hf[eager]" in doc["goal"]["what"]


def test_budget_skips_rows_and_says_so():
    from anyattn.bench import family_run, model

    doc = family_run.run(family_run.opts_from_args(_parse("--family", "esmc", "--quick", "--num-seqs", "6", "--budget-s", "1e-9")),
                         log=lambda *x: None)  # fmt: skip
    assert doc["complete"] and all(r["status"] == "skipped" and "time budget" in r["error"] for r in doc["results"])
    doc = model.run(model._opts_from_args(_parse("--quick", "--num-seqs", "6", "--hf", "sdpa", "--budget-s", "1e-9")), log=lambda *x: None)
    assert doc["results"] and all(r["status"] == "skipped" and "time budget" in r["error"] for r in doc["results"])


def test_family_options_refused():
    from anyattn.bench import UsageError, family_run

    with pytest.raises(UsageError, match="--backends applies to --family esm2"):
        family_run.opts_from_args(_parse("--family", "esmc", "--quick", "--backends", "auto"))
    with pytest.raises(UsageError, match="--tune applies to --family esm2"):
        family_run.opts_from_args(_parse("--family", "ankh", "--quick", "--tune"))
    with pytest.raises(UsageError, match="presets: esmc_300m"):
        family_run.opts_from_args(_parse("--family", "esmc", "--preset", "esm2_t33_650M", "--device", "cpu"))
    with pytest.raises(UsageError, match="--rows: unknown"):
        family_run.opts_from_args(_parse("--family", "e1", "--quick", "--rows", "plain,fast"))
    o = family_run.opts_from_args(_parse("--family", "ankh", "--preset", "ankh_large", "--device", "cpu", "--num-seqs", "4"))
    assert o["config"].d_model == 1536 and o["preset"] == "ankh_large"


# ---------------------------------------------------------------------------------------------
# the embed job end to end

SUMMARY = """out                         /tmp/x.sqlite
records                     24
ids (rows)                  24
unique sequences            24
computed sequences          24
tokens                      1,968
batches                     3
devices                     cpu
elapsed                     2.50 s (parse 0.01, load 1.20, run 1.00)
throughput                  24.0 seq/s, 1968 tok/s
run phases                  tokenize 0.01 s, submit 0.90 s, wait 0.00 s, write 0.02 s
"""


def test_parse_summary_reads_the_numbers_and_tolerates_other_lines():
    from anyattn.bench.embed_e2e import parse_summary

    s = parse_summary(SUMMARY)
    n = s["numbers"]
    assert n["tokens"] == 1968 and n["computed sequences"] == 24 and n["batches"] == 3
    assert (n["elapsed_s"], n["parse_s"], n["load_s"], n["run_s"]) == (2.5, 0.01, 1.2, 1.0)
    assert n["seq_per_s"] == 24.0 and n["tok_per_s"] == 1968
    assert s["phases"] == {"tokenize": 0.01, "submit": 0.9, "wait": 0.0, "write": 0.02}
    assert parse_summary("something else entirely\n")["numbers"] == {}


def test_embed_e2e_quick(tmp_path, capsys):
    from anyattn.bench import embed_e2e

    rc = embed_e2e.main(["--quick", "--out", str(tmp_path / "o"), "--work", str(tmp_path / "w")])
    doc = json.loads((tmp_path / "o" / "embed.json").read_text())
    rows = {r["name"]: r for r in doc["rows"]}
    assert doc["schema"] == "anyattn.bench.embed/2" and doc["complete"] is True, doc
    assert list(rows) == ["cli, first job (new process)", "embed(), warm job (in-process)"]
    for r in rows.values():
        assert r["status"] == "ok", r["error"] + r["stdout"][-2000:]
        assert r["check"] == "ok" and r["check_rel_l2"] <= r["check_bound"] and r["check_cos_min"] > 0.99
        assert r["store_rows"] == doc["workload"]["num_seqs"] and r["seqs"] == doc["workload"]["num_seqs"]
        assert r["tokens"] == doc["workload"]["tokens"] and r["wall_s"] > 0 and r["tok_per_s_e2e"] > 0
    assert rows["cli, first job (new process)"]["command"].startswith("python3 -m anyattn embed ")
    assert rc == 0
    assert "seq/s e2e" in capsys.readouterr().out
