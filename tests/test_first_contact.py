"""First contact (issue 16): a fresh install, the CLI's errors, model loading from a mistyped path.

* The import boundary: `anyattn --help` and every sub-command's `--help` with only torch (the
  optional packages blocked in a subprocess, as in a torch-only venv); a sub-command whose extra
  is missing names the `pip install 'anyattn[...]'` to run. `.ci/run` proves the same in a real
  fresh venv, with README command 1 exactly as written.
* Every CLI error is one line on stderr, exit 2 for bad input and 1 for a failed run, a traceback
  only with --debug.
* `anyattn.models.load`: dtype names, damaged weights named, a mistyped local path that fails fast
  naming both of its readings.
* The docs' tiny-embedding example runs twice.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from anyattn.cli import main

ROOT = Path(__file__).resolve().parents[1]
SRC = str(ROOT / "src")
# what a torch-only environment lacks (the extras: cli, bench, models, embed, hf, test)
OPTIONAL = ("transformers", "safetensors", "huggingface_hub", "tokenizers", "numpy", "tqdm", "matplotlib", "yaml",
            "peft", "hypothesis", "accelerate")  # fmt: skip

# Runs anyattn's CLI with the optional packages blocked (sys.modules[name] = None: `import name`
# fails and importlib.util.find_spec(name) is None, as when the package is not installed). torch
# is imported first, as it would be without numpy installed.
_BLOCKED_RUNNER = r"""
import contextlib, io, json, sys
import torch
for name in list(sys.modules):
    if name.split(".")[0] in BLOCKED:
        del sys.modules[name]
for name in BLOCKED:
    sys.modules[name] = None
from anyattn.cli import main
results = []
for argv in ARGVS:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(argv)
    results.append({"argv": argv, "rc": rc, "out": out.getvalue(), "err": err.getvalue()})
print("RESULTS" + json.dumps(results))
"""


def _run_blocked(argvs, blocked=OPTIONAL):
    code = _BLOCKED_RUNNER.replace("BLOCKED", repr(tuple(blocked))).replace("ARGVS", repr(argvs))
    env = dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""))
    p = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0 and "RESULTS" in p.stdout, p.stdout[-3000:] + p.stderr[-3000:]
    assert "Traceback" not in p.stderr, p.stderr
    return json.loads(p.stdout.split("RESULTS", 1)[1])


def _cli(capsys, *argv):
    rc = main(list(argv))
    cap = capsys.readouterr()
    return rc, [ln for ln in cap.err.splitlines() if ln.strip()], cap.out


# ------------------------------------------------------------------------------ the import boundary
HELPS = [["--help"], ["doctor", "--help"], ["bench", "--help"], ["bench", "kernels", "--help"], ["bench", "model", "--help"],
         ["embed", "--help"]]  # fmt: skip


def test_every_help_works_with_torch_only(tmp_path):
    """In a fresh venv with only `pip install -e ".[cli]"` every anyattn command (`--help` and
    `doctor` included) died with "ImportError: anyattn.models.esm2 needs transformers": building
    the `bench model` sub-parser imported the models."""
    fasta = tmp_path / "x.fasta"
    fasta.write_text(">a\nMKV\n")
    embed_argv = ["embed", str(fasta), "--model", "facebook/esm2_t6_8M_UR50D", "--out", str(tmp_path / "o.sqlite")]
    *helps, emb = _run_blocked([*HELPS, embed_argv])
    for r in helps:
        assert r["rc"] == 0, r
        assert "usage: anyattn" in r["out"] and not r["err"].strip(), r
    top = helps[0]["out"]
    assert "doctor" in top and "bench" in top and "embed" in top and "--debug" in top
    # a sub-command whose packages are missing: one line, the pip command, exit 1, nothing written
    assert emb["rc"] == 1, emb
    assert emb["err"].count("\n") == 1 and "pip install 'anyattn[embed]'" in emb["err"], emb
    assert "transformers" in emb["err"] and not (tmp_path / "o.sqlite").exists()


def test_open_store_without_numpy_names_the_extra(tmp_path):
    """docs/embed.md said numpy ships with torch; torch wheels do not depend on it."""
    from anyattn.embed.store import SQLiteStore

    np = pytest.importorskip("numpy")
    st = SQLiteStore(str(tmp_path / "o.sqlite"), {"format": "anyattn.embed/1"})
    st.put_many([("a", "h", 1, "", np.zeros(2, dtype=np.float32))])
    st.close()
    code = (
        "import sys; import torch; sys.modules['numpy'] = None\n"
        "from anyattn.embed import open_store\n"
        f"st = open_store({str(tmp_path / 'o.sqlite')!r})\n"
        "try:\n    st.get('a')\nexcept ImportError as e:\n    print('IMPORTERROR', e)\n"
    )
    env = dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""))
    p = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert "IMPORTERROR anyattn.embed needs numpy" in p.stdout and "pip install 'anyattn[embed]'" in p.stdout, p.stdout + p.stderr


def test_extras_that_need_numpy_list_it_and_the_docs_no_longer_say_torch_brings_it():
    text = (ROOT / "pyproject.toml").read_text()
    for extra in ("cli", "embed"):
        line = re.search(rf"^{extra} = \[(.*)\]$", text, re.M).group(1)
        assert '"numpy' in line, (extra, line)
    doc = (ROOT / "docs" / "embed.md").read_text()
    assert "ships with PyTorch" not in doc and "come with Python/torch" not in text


def test_a_subcommand_whose_options_need_a_missing_package_is_listed_with_the_pip_command(monkeypatch, capsys):
    """The bench model parser once imported the ESM2 presets (transformers) while the parser was
    built: every command died. Such a sub-command is now listed, its --help says what to install,
    and running it fails with that one line."""
    from anyattn.bench import model as bench_model

    def needs_transformers(parser):
        raise ModuleNotFoundError("No module named 'transformers'", name="transformers")

    monkeypatch.setattr(bench_model, "add_arguments", needs_transformers)
    rc, err, out = _cli(capsys, "bench", "model", "--help")
    flat = " ".join(out.split())  # argparse wraps the help text at the terminal width
    assert rc == 0 and "not installed here" in flat and "pip install 'anyattn[models]'" in flat
    rc, err, out = _cli(capsys, "--help")
    assert rc == 0 and "embed" in out
    rc, err, _ = _cli(capsys, "bench", "model", "--quick")
    assert rc == 1 and len(err) == 1 and "pip install 'anyattn[models]'" in err[0]


def test_readme_command_1_is_what_ci_runs_in_a_fresh_venv():
    """`.ci/run` extracts README command 1 and runs it, as written, in a venv without system
    site-packages holding torch 2.13.0 only."""
    ci = (ROOT / ".ci" / "run").read_text()
    awk = re.search(r"CMD1=\$\(awk '(.*)' README\.md\)", ci).group(1)
    cmd1 = subprocess.run(["awk", awk, str(ROOT / "README.md")], capture_output=True, text=True, check=True).stdout.strip()
    assert 'python3 -m pip install -e ".[cli]"' in cmd1 and cmd1.endswith("anyattn doctor"), cmd1
    readme = (ROOT / "README.md").read_text()
    first_block = readme.split("```bash", 1)[1].split("```", 1)[0]
    assert cmd1 == next(ln for ln in first_block.splitlines() if ln.strip() and not ln.startswith("#"))
    venv = re.search(r'^python3 -m venv "\$TMP/venv"$', ci, re.M)
    assert venv and "--system-site-packages" not in ci
    torch_first = ci.index('"$TMP/venv/bin/python" -m pip install -q "$TORCH"')
    assert ci.index("TORCH=torch==2.13.0") < torch_first < ci.index('bash -c "$CMD1"')


# ------------------------------------------------------------------------------ CLI errors
def test_cli_usage_errors_are_one_line_exit_2(capsys):
    for argv, text in [
        ([], "a command is required: doctor, bench or embed"),
        (["bench"], "a benchmark is required: kernels"),
        (["embed", "x.fasta"], "the following arguments are required: --model, --out"),
        (["embed", "x.fasta", "--model", "m", "--out", "o", "--max-tokens", "many"], "argument --max-tokens: invalid int value: 'many'"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
    ]:
        rc, err, _ = _cli(capsys, *argv)
        assert rc == 2 and len(err) == 1 and text in err[0], (argv, err)


def test_an_unexpected_error_is_one_line_and_debug_shows_the_traceback(monkeypatch, tmp_path, capsys):
    from anyattn.embed import job

    def broken(*a, **kw):
        raise TypeError("something nobody planned for")

    monkeypatch.setattr(job, "embed", broken)
    argv = ["embed", str(tmp_path / "x.fasta"), "--model", "m", "--out", str(tmp_path / "o.sqlite")]
    rc, err, _ = _cli(capsys, *argv)
    assert rc == 1 and len(err) == 1
    assert err[0] == "anyattn embed: error: internal error TypeError: something nobody planned for (rerun with --debug for the traceback and report it)"
    for debug_argv in (["--debug", *argv], [*argv, "--debug"]):
        rc, err, _ = _cli(capsys, *debug_argv)
        assert rc == 1 and err[0] == "Traceback (most recent call last):" and err[-1].startswith("anyattn embed: error: internal error")


def test_interrupt_is_one_line_exit_130(monkeypatch, tmp_path, capsys):
    from anyattn.embed import job

    def interrupted(*a, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(job, "embed", interrupted)
    rc, err, _ = _cli(capsys, "embed", "x.fasta", "--model", "m", "--out", str(tmp_path / "o.sqlite"))
    assert rc == 130 and err == ["anyattn embed: interrupted"]


def test_embed_help_states_the_real_backend_default(capsys):
    """`embed --help` said the backend default was `auto`; the job uses the checkpoint's saved
    backend (else auto)."""
    rc, _, out = _cli(capsys, "embed", "--help")
    text = " ".join(out.split())
    assert rc == 0 and "the one an anyattn checkpoint saved, else auto" in text and "(default: auto)" not in text


def test_the_real_entry_point_prints_no_traceback(tmp_path):
    env = dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""))
    p = subprocess.run(
        [sys.executable, "-m", "anyattn", "embed", str(tmp_path / "missing.fasta"), "--model", "m", "--out", str(tmp_path / "o.sqlite")],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert p.returncode == 2 and p.stderr.count("\n") == 1, p.stderr
    assert "missing.fasta: no such input file" in p.stderr and "Traceback" not in p.stderr


# ------------------------------------------------------------------------------ model loading
transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    torch.manual_seed(0)
    cfg = transformers.EsmConfig(
        vocab_size=33, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=42, position_embedding_type="rotary", token_dropout=True, pad_token_id=1,
        mask_token_id=32,
    )  # fmt: skip
    path = tmp_path_factory.mktemp("esm2_tiny")
    transformers.EsmForMaskedLM(cfg).save_pretrained(path)
    return str(path)


@pytest.mark.parametrize(
    "dtype, want",
    [("bfloat16", torch.bfloat16), ("bf16", torch.bfloat16), ("float16", torch.float16), ("fp16", torch.float16),
     ("float32", torch.float32), ("torch.bfloat16", torch.bfloat16), (torch.float16, torch.float16), (None, torch.float32)],
)  # fmt: skip
def test_load_takes_dtype_names(ckpt, dtype, want):
    """`load(dtype="bfloat16")` gave a raw torch error."""
    from anyattn.models import load

    m = load(ckpt, dtype=dtype)
    assert {p.dtype for p in m.parameters()} == {want}


@pytest.mark.parametrize(
    "dtype, err, match",
    [("int8", ValueError, r"dtype: expected a torch floating dtype or one of \['bf16'"), (torch.int64, ValueError, r"dtype: expected a floating dtype"),
     ("", ValueError, r"dtype: expected"), (16, TypeError, r"dtype: expected a torch.dtype or a dtype name")],
)  # fmt: skip
def test_load_refuses_other_dtypes_naming_the_argument(ckpt, dtype, err, match):
    from anyattn.models import load

    with pytest.raises(err, match=match):
        load(ckpt, dtype=dtype)


def test_resolve_dtype_is_shared():
    from anyattn.models.hub import resolve_dtype

    assert resolve_dtype("BF16") is torch.bfloat16 and resolve_dtype("half") is torch.float16
    with pytest.raises(ValueError, match=r"^torch_dtype: expected"):
        resolve_dtype("fp8", name="torch_dtype")


@pytest.mark.parametrize("bad, err, match", [("", ValueError, r"path_or_repo: expected a local directory or a hub id 'owner/name', got ''"),
                                              (3, TypeError, r"path_or_repo: expected a local directory")])
def test_load_refuses_empty_and_non_path_arguments(bad, err, match):
    from anyattn.models import load

    with pytest.raises(err, match=match):
        load(bad)


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_a_damaged_safetensors_file_is_named(ckpt, tmp_path, damage):
    """A corrupt safetensors file raised safetensors' own error, without the file's name."""
    from anyattn.models import load

    d = tmp_path / "ckpt"
    shutil.copytree(ckpt, d)
    f = d / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(b"\x00" * 64 if damage == "garbage" else data[: len(data) // 2])
    with pytest.raises(ValueError, match=rf"weights: expected a readable checkpoint file, got {re.escape(str(f))}, damaged or truncated"):
        load(str(d))


def test_a_damaged_config_json_is_named(ckpt, tmp_path):
    from anyattn.models import load, load_tokenizer

    d = tmp_path / "ckpt"
    shutil.copytree(ckpt, d)
    (d / "config.json").write_bytes(b'{"model_type": "esm", \xff}')
    with pytest.raises(ValueError, match=r"config.json: expected valid JSON \(UTF-8\)"):
        load(str(d))
    with pytest.raises(ValueError, match=r"config.json: expected UTF-8 text"):
        load_tokenizer(str(d))  # it fell back to the ESM alphabet without a word


@pytest.fixture
def hub(monkeypatch):
    """huggingface_hub as a machine without network sees it: the listing retries for ~23 s (here:
    blocks until released), one probe fails at once, the cache is empty."""
    huggingface_hub = pytest.importorskip("huggingface_hub")
    release = threading.Event()
    state = {"probe": OSError("[Errno -2] Name or service not known"), "listing": None}

    def list_repo_files(self, repo_id, **kw):
        import logging

        logging.getLogger("huggingface_hub.utils._http").warning("Retrying in 1s [Retry 1/5].")
        if state["listing"] is not None:
            raise state["listing"]
        release.wait(30)
        raise OSError("gave up after 5 retries")

    def model_info(self, repo_id, **kw):
        raise state["probe"]

    def snapshot_download(repo_id, **kw):
        if kw.get("local_files_only") and state.get("cached"):
            return state["cached"]
        raise FileNotFoundError("not in the cache")

    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files", list_repo_files)
    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", model_info)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    yield state
    release.set()


def test_a_mistyped_local_path_fails_fast_naming_both_readings(hub, tmp_path, monkeypatch, caplog):
    """A mistyped local path ('a/b') was taken for a hub id and retried for 23 s, then failed
    with huggingface_hub's LocalEntryNotFoundError."""
    from anyattn.models import load

    monkeypatch.chdir(tmp_path)
    t0 = time.perf_counter()
    with pytest.raises(ValueError) as e:
        load("a/b")
    assert time.perf_counter() - t0 < 8
    msg = str(e.value)
    assert msg.startswith("path_or_repo: expected a local model directory or a hub repository id, got 'a/b', which is neither")
    assert f"no such local path ({tmp_path / 'a' / 'b'})" in msg and "the hub cannot be reached" in msg
    assert "Name or service not known" in msg and "cache does not hold" in msg
    assert "Retrying" not in caplog.text  # the listing's retries are not printed


def test_a_hub_id_that_does_not_exist_names_both_readings(hub, tmp_path, monkeypatch):
    from anyattn.models import load

    class RepositoryNotFoundError(Exception):
        pass

    hub["listing"] = RepositoryNotFoundError("404 Client Error")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=r"got 'a/b', which is neither: no such local path .* the hub has no such repository"):
        load("a/b")


def test_offline_with_the_repository_cached_loads_from_the_cache(hub, ckpt, monkeypatch):
    import huggingface_hub.constants
    from anyattn.models import load

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ValueError, match=r"hub cannot be reached \(HF_HUB_OFFLINE is set\)"):
        load("owner/model")
    hub["cached"] = ckpt
    assert load("owner/model").config.hidden_size == 32


# ------------------------------------------------------------------------------ the docs example
def test_the_docs_tiny_embedding_example_runs_twice(tmp_path):
    """The example made new random weights each run into the same store: the second run was
    refused (another model's weights)."""
    doc = (ROOT / "docs" / "embed.md").read_text()
    block = doc.split("A runnable end-to-end example", 1)[1].split("```python", 1)[1].split("```", 1)[0]
    code = block.replace("/tmp/", f"{tmp_path}/")
    assert str(tmp_path) in code
    env = dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    outs = []
    for _ in range(2):  # two separate processes, as a reader runs it twice
        p = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
        assert p.returncode == 0, p.stderr[-3000:]
        outs.append(p.stdout)
    assert "(32,)" in outs[1] and re.search(r"skipped \(already in store\)\s+3", outs[1]), outs[1]
