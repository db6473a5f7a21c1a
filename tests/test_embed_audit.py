"""Audit of ``anyattn embed`` (CLI and ``anyattn.embed(...)``) with the inputs a computational
biologist throws at it (CPU, a tiny random ESM2: hidden 32, 2 layers, 40 residues).

What the other embed tests already cover is not repeated; this file adds:

* FASTA variants (lower case, multi-line records, blank and ';' lines, CRLF, CR-only, BOM, gzip
  recognised by content, ``*`` / gaps / J under ``--unknown x``, B Z U O X kept, duplicate ids and
  sequences): every stored number equals the model run directly on the cleaned sequence, and the
  stored ``seq_sha1`` is that sequence's sha1;
* bad inputs through the CLI into an SQLite store and a safetensors export: exit 2, one line naming
  the file and the line / record, and nothing at all left in the output directory;
* every residue pooler over split sequences with a layer list, checked against numpy pooling of
  the job's own per-residue output, and the per-residue output against each chunk run alone;
* sharded float16 per-residue exports with a layer axis and duplicate records;
* interruption (Ctrl-C inside the job, and SIGKILL of the CLI during a single-file safetensors
  job) then resume: bitwise equal to a clean run, and changed settings refused while in progress;
* the Python API's argument errors.

The section "defects found by this audit" holds one test per defect it found (each docstring:
the doc sentence, what happened before the fix).
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import os
import queue
import random
import signal
import sqlite3
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

import anyattn.embed  # noqa: E402
from anyattn.cli import main  # noqa: E402
from anyattn.embed import StoreMismatchError, embed, open_store  # noqa: E402
from anyattn.models import ProteinTokenizer  # noqa: E402

from .test_embed_support import ankh_tokenizer, cli_env, count_rows, make_ckpt, one_thread  # noqa: E402, F401 (one_thread: an autouse fixture)

AA = "ACDEFGHIKLMNPQRSTVWY"
MAXRES = 40  # the tiny checkpoint's max_position_embeddings 42 minus <cls> and <eos>
TOL = 1e-5
POOLERS = ["mean", "max", "min", "norm", "median", "std", "var"]




@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_ckpt("esm2", tmp_path_factory.mktemp("esm2_audit"), seed=0)


@pytest.fixture(scope="module")
def ref(ckpt):
    import anyattn.models as am

    return am.load(ckpt, attn_backend="eager")


@torch.inference_mode()
def _hidden(model, seq):
    """Every hidden state (L + 1 arrays (n + 2, C), float64) of ``seq`` run ALONE (no packing)."""
    ids = torch.tensor([ProteinTokenizer.esm().encode(seq)])
    return [h[0].double().numpy() for h in model.esm(ids, output_hidden_states=True).hidden_states]


_RESIDUE_POOLERS = {
    "mean": lambda x: x.mean(0), "max": lambda x: x.max(0), "min": lambda x: x.min(0),
    "norm": lambda x: np.sqrt((x * x).sum(0)), "median": lambda x: np.median(x, 0), "var": lambda x: x.var(0),
    "std": lambda x: x.std(0),
}  # fmt: skip  (docs/embed.md, "Poolers and what a row holds": residues only, population var/std)


def _pool(h, p):
    """Pooler ``p`` of one sequence's hidden states ``h`` ((n + 2, C): <cls> residues <eos>)."""
    if p == "cls":
        return h[0]
    if p == "eos":
        return h[-1]
    return h[1:-1] if p == "none" else _RESIDUE_POOLERS[p](h[1:-1])


def _rel(got, want):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape, (got.shape, want.shape)
    return float(np.abs(got - want).max() / max(1.0, float(np.abs(want).max())))


def _seqs(n, seed, lo=1, hi=MAXRES):
    rng = random.Random(seed)
    return [(f"r{i}", "".join(rng.choice(AA) for _ in range(rng.randint(lo, hi)))) for i in range(n)]


def _sha1(s):
    return hashlib.sha1(s.encode()).hexdigest()


def _cli(*argv):
    """``anyattn ARGV`` in this process: (exit status, non-empty stderr lines)."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        rc = main(list(argv))
    return rc, [ln for ln in err.getvalue().splitlines() if ln.strip()]


# ------------------------------------------------------------------------------ FASTA variants
GOOD = [("sp|P12345|A_HUMAN", "MKTAYIAKQRQISFVK"), ("b", "MKVL")]
_GOOD_TEXT = ">sp|P12345|A_HUMAN some protein OS=Homo sapiens\nmktay\nIAKqr\n\n; a comment\nQISFVK\n>b\n\nMK V\tL\n"

VARIANTS = {
    # lower case, multi-line record, a blank line and a ';' comment line inside it, spaces and a tab
    "multiline_lower_blank_comment": (_GOOD_TEXT.encode(), {}, GOOD),
    "bom_crlf": (b"\xef\xbb\xbf" + _GOOD_TEXT.replace("\n", "\r\n").encode(), {}, GOOD),
    "cr_only": (_GOOD_TEXT.replace("\n", "\r").encode(), {}, GOOD),
    "gzip_by_content_not_name": (gzip.compress(_GOOD_TEXT.replace("\n", "\r\n").encode()), {}, GOOD),
    "ambiguous_letters_kept": (b">a\nMBZUOX\n>b\nbzuox\n", {}, [("a", "MBZUOX"), ("b", "BZUOX")]),
    "stop_gap_J_to_X": (b">a\nMKT*\n>b\nMKJV*\n>c\nmk-v.\n", {"unknown": "x"}, [("a", "MKTX"), ("b", "MKXVX"), ("c", "MKXVX")]),
    "duplicate_ids_and_sequences": (
        b">a\nMKV\n>b\nMKTAY\n>a\nMKV\n>c\nmkv\n>b\nMKT\nAY\n", {}, [("a", "MKV"), ("b", "MKTAY"), ("a", "MKV"), ("c", "MKV"), ("b", "MKTAY")],
    ),  # fmt: skip
    "exactly_the_maximum": (b">a\n" + b"M" * MAXRES + b"\n>b\nK\n", {}, [("a", "M" * MAXRES), ("b", "K")]),
}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_fasta_variants_embed_the_cleaned_sequence_exactly(ckpt, ref, tmp_path, name):
    """Each variant is read as documented (docs/embed.md, "Input policies and errors"), records come
    back in input order with duplicates repeated, and every stored number (several poolers, the
    embeddings layer and the last layer) equals the model run alone on the cleaned sequence."""
    data, kw, want = VARIANTS[name]
    fa = tmp_path / "input.txt"  # no .fasta / .gz extension: the content decides
    fa.write_bytes(data)
    out = tmp_path / "o.sqlite"
    pool = ["mean", "max", "cls", "eos"]
    s = embed(str(fa), model=ckpt, out=out, pooling=pool, layers=[0, -1], max_tokens=60, progress=False, **kw)
    assert s.records == len(want) and s.unique == len({q for _, q in want})
    with open_store(out) as st:
        assert st.records() == [i for i, _ in want]
        assert st.ids() == list(dict.fromkeys(i for i, _ in want))
        worst = 0.0
        for rid, seq in dict(want).items():
            hs = _hidden(ref, seq)
            row = st[rid].reshape(-1)
            for c in st.columns:
                worst = max(worst, _rel(row[c.start : c.stop], _pool(hs[c.layer], c.pooler)))
        assert worst <= TOL, worst
    con = sqlite3.connect(out)
    stored = dict(con.execute("SELECT id, seq_sha1 FROM embeddings").fetchall())
    lengths = dict(con.execute("SELECT id, length FROM embeddings").fetchall())
    con.close()
    assert stored == {i: _sha1(q) for i, q in want}  # sha1 of the sequence after upper-casing and unknown
    assert lengths == {i: len(q) for i, q in want}


def test_per_residue_vectors_of_a_messy_fasta_equal_the_model(ckpt, ref, tmp_path):
    fa = tmp_path / "in.fa"
    fa.write_bytes(VARIANTS["bom_crlf"][0])
    out = tmp_path / "o.npz"
    embed(str(fa), model=ckpt, out=out, pooling="none", progress=False)
    with open_store(out) as st:
        assert st.records() == [i for i, _ in GOOD] and st.layout["axes"] == ["residue", "channel"]
        for rid, seq in GOOD:
            assert st[rid].shape == (len(seq), 32)
            assert _rel(st[rid], _hidden(ref, seq)[-1][1:-1]) <= TOL


# ------------------------------------------------------------------------------ bad inputs, CLI
BAD = {
    # name: (file bytes, substrings of the one error line besides the file name)
    "stop_codon": (b">a\nMKV\n>b\nMK\nTV*\n", [":5: column 3 (record 'b')", "'*'", "--unknown x"]),
    "letter_J": (b">a\nMKJV\n", [":2: column 3 (record 'a')", "'J'"]),
    "non_ascii": (">a\nMKéV\n".encode(), [":2: column 3 (record 'a')", "'é'"]),
    "header_only_record": (b">a\nMKV\n>b desc\n>c\nMK\n", [":3: record 'b' has no sequence"]),
    "duplicate_id_other_sequence": (b">a\nMKV\n>b\nMK\n>a\nMKL\n", ["duplicate id 'a' with different sequences at line 1 and line 5"]),
    "too_long": (b">a\nMKV\n>x\n" + b"A" * 45 + b"\n", ["line 3: sequence 'x' has 45 residues; the model takes at most 40", "--long-policy"]),
    "csv": (b"id,sequence\na,MKV\n", [":1: sequence data before the first '>' header"]),
    "utf16": (">a\nMKV\n".encode("utf-16"), [": the file is UTF-16 text"]),
    "empty": (b"", [": the file is empty"]),
    "latin1": (b">a\nMK\xe9V\n", [":2: column 3 (record 'a')", "byte 0xE9 is not UTF-8"]),
}


@pytest.mark.parametrize("ext", ["sqlite", "safetensors"])
@pytest.mark.parametrize("name", list(BAD))
def test_bad_input_through_the_cli_is_one_line_exit_2_and_leaves_nothing(ckpt, tmp_path, name, ext):
    data, parts = BAD[name]
    d = tmp_path / "job"
    d.mkdir()
    fa = d / "in.fasta"
    fa.write_bytes(data)
    rc, err = _cli("embed", str(fa), "--model", ckpt, "--out", str(d / f"o.{ext}"), "--no-progress")
    assert rc == 2 and len(err) == 1, err
    assert err[0].startswith("anyattn embed: error: ") and str(fa) in err[0], err
    for p in parts:
        assert p in err[0], (p, err[0])
    assert sorted(os.listdir(d)) == ["in.fasta"]  # no store, no work store, no lock file


# ------------------------------------------------------------------------------ poolers, layers, split
def test_every_pooler_over_split_sequences_equals_numpy_on_the_jobs_own_residue_vectors(ckpt, ref, tmp_path):
    """All seven residue poolers, three layers (one given as a negative index), sequences up to
    2.5x the maximum split into the fewest near-equal chunks: the pooled columns (found through
    store.columns) equal numpy's poolers applied to the job's per-residue output of the same
    records, and the per-residue output of a split sequence equals its chunks run alone."""
    recs = _seqs(18, seed=5, hi=100)
    recs.insert(4, recs[1])  # an id given twice
    recs.append(("twin", recs[0][1]))  # another id, the same sequence
    kw = dict(model=ckpt, layers=[0, -2, -1], long_policy="split", max_tokens=84, progress=False)
    s = embed(recs, out=tmp_path / "p.sqlite", pooling=POOLERS, **kw)
    assert s.split == len({q for _, q in recs if len(q) > MAXRES}) > 2  # unique sequences
    embed(recs, out=tmp_path / "r.sqlite", pooling="none", **kw)
    with open_store(tmp_path / "p.sqlite") as p, open_store(tmp_path / "r.sqlite") as r:
        assert p.records() == r.records() == [i for i, _ in recs]
        assert p.layout["layers"] == [0, 1, 2] and p.stack().shape == (len(recs), 3, len(POOLERS) * 32)
        worst = 0.0
        for rid, _ in recs:
            row, res = p[rid].reshape(-1), r[rid].astype(np.float64)
            for c in p.columns:
                worst = max(worst, _rel(row[c.start : c.stop], _RESIDUE_POOLERS[c.pooler](res[p.layout["layers"].index(c.layer)])))
        assert worst <= 1e-6, worst
        long_id, long_seq = max(recs, key=lambda x: len(x[1]))
        n = len(long_seq)
        k = -(-n // MAXRES)
        sizes = [n // k + (1 if j < n % k else 0) for j in range(k)]
        bounds = np.cumsum([0, *sizes])
        chunks = [_hidden(ref, long_seq[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]
        for li, layer in enumerate((0, 1, 2)):
            want = np.concatenate([h[layer][1:-1] for h in chunks])
            assert _rel(r[long_id][li], want) <= TOL


def test_cli_negative_layers_keep_the_order_given(ckpt, tmp_path):
    fa = tmp_path / "in.fa"
    fa.write_text(">a\nMKTAYIAK\n>b\nMKV\n")
    rc, err = _cli("embed", str(fa), "--model", ckpt, "--out", str(tmp_path / "o.sqlite"), "--pooling", "mean,max",
                   "--layers", "-1", "0", "--no-progress")  # fmt: skip
    assert rc == 0, err
    with open_store(tmp_path / "o.sqlite") as st:
        assert st.layout["layers"] == [2, 0] and st.stack().shape == (2, 2, 64)
        assert [(c.layer, c.pooler) for c in st.columns] == [(2, "mean"), (2, "max"), (0, "mean"), (0, "max")]


def test_sharded_float16_per_residue_export_with_layers_and_duplicates(ckpt, tmp_path):
    recs = _seqs(30, seed=6)
    recs.insert(10, recs[2])
    recs.append(("same_as_r0", recs[0][1]))
    kw = dict(model=ckpt, pooling="none", layers=[1, -1], dtype="fp32", store_dtype="float16", max_tokens=100, progress=False)
    embed(recs, out=tmp_path / "ref.sqlite", **kw)
    out = tmp_path / "emb.safetensors"
    embed(recs, out=out, shard_size="3KB", **kw)
    index = json.loads((tmp_path / "emb.safetensors.index.json").read_text())
    names = sorted(set(index["weight_map"].values()))
    n = len(names)
    assert n >= 8 and names == [f"emb-{k:05d}-of-{n:05d}.safetensors" for k in range(1, n + 1)]
    assert index["records"] == [i for i, _ in recs] and index["metadata"]["store_dtype"] == "float16"
    assert sorted(f for f in os.listdir(tmp_path) if not f.startswith("ref.sqlite")) == sorted(["emb.safetensors.index.json", *names])
    from safetensors import safe_open

    total = 0
    for k, name in enumerate(names, 1):
        with safe_open(str(tmp_path / name), framework="numpy") as f:
            assert f.metadata()["shard"] == f"{k}/{n}"
            arrays = {key: f.get_tensor(key) for key in f.keys()}
        size = sum(a.nbytes for a in arrays.values())
        assert size <= 3000 or len(arrays) == 1
        total += size
    assert total == index["metadata"]["total_size"]
    with open_store(out) as st, open_store(tmp_path / "ref.sqlite") as r:
        assert st.records() == r.records() and st.ids() == r.ids()
        for i in r.ids():
            assert st[i].dtype == np.float16 and st[i].shape == (2, len(dict(recs)[i]), 32) and np.array_equal(st[i], r[i])
        assert st.get("nope") is None and "nope" not in st


# ------------------------------------------------------------------------------ resume
def _interrupt_at(monkeypatch, nth):
    """Ctrl-C (KeyboardInterrupt) while the job launches its ``nth`` batch."""
    from anyattn.embed import run as run_mod

    orig, calls = run_mod._Runner._submit, [0]

    def submit(self, *a, **k):
        calls[0] += 1
        if calls[0] == nth:
            raise KeyboardInterrupt
        return orig(self, *a, **k)

    monkeypatch.setattr(run_mod._Runner, "_submit", submit)


@pytest.mark.parametrize("ext", ["sqlite", "npz", "safetensors"])
def test_interrupted_then_resumed_equals_a_clean_run_and_changed_settings_are_refused(ckpt, tmp_path, monkeypatch, ext):
    recs = _seqs(40, seed=7, hi=70)
    recs += [recs[3], ("twin", recs[5][1]), ("stop", "MKTAY*IAK")]
    kw = dict(model=ckpt, pooling=["mean", "median", "std"], layers=[1, -1], long_policy="split", unknown="x",
              max_tokens=60, progress=False)  # fmt: skip
    (tmp_path / "ref").mkdir()
    (tmp_path / "run").mkdir()
    ref_out, out = tmp_path / "ref" / f"o.{ext}", tmp_path / "run" / f"o.{ext}"
    embed(recs, out=ref_out, **kw)
    with monkeypatch.context() as m:
        _interrupt_at(m, 5)
        with pytest.raises(KeyboardInterrupt):
            embed(recs, out=out, **kw)
    work = str(out) if ext == "sqlite" else str(out) + ".work.sqlite"
    assert not os.path.exists(str(out) + ".lock") and not os.path.exists(work + ".lock")
    with open_store(work) as st:
        kept = len(st)
    assert 0 < kept < 42
    other = make_ckpt("esm2", tmp_path / "other", seed=3)
    for change, key in [({"pooling": ["median", "mean", "std"]}, "pooling"), ({"layers": [-1, 1]}, "layers"),
                        ({"unknown": "error", "records": recs[:-1]}, "unknown"), ({"long_policy": "truncate"}, "long_policy"),
                        ({"model": other}, "model_weights_sha1"), ({"store_dtype": "float16"}, "store_dtype")]:  # fmt: skip
        args = {**kw, **change}
        with pytest.raises(StoreMismatchError, match=rf"{key}: store has"):
            embed(args.pop("records", recs), out=out, **args)
    with open_store(work) as st:
        assert len(st) == kept  # nothing written by the refused runs
    s = embed(recs, out=out, **kw)
    assert s.skipped == kept and s.embedded == 42 - kept
    with open_store(out) as a, open_store(ref_out) as b:
        assert a.records() == b.records() == [i for i, _ in recs]
        for i in b.ids():
            assert a[i].dtype == b[i].dtype and np.array_equal(a[i], b[i]), i
    if ext != "sqlite":
        assert sorted(os.listdir(out.parent)) == [out.name]  # the work store is gone
    if ext == "safetensors":  # (an npz's zip members carry their write time)
        assert out.read_bytes() == ref_out.read_bytes()




def test_sigkill_of_a_single_file_safetensors_job_then_resume_is_byte_identical(ckpt, tmp_path):
    """The CLI into one .safetensors file (truncated sequences, '*' mapped to X, duplicate records)
    is SIGKILLed after some rows are committed to its work store; the same command then finishes,
    and the file equals an uninterrupted export byte for byte."""
    recs = _seqs(300, seed=8, hi=55)
    recs[7] = ("stop", "MKTAY*IAKQR")
    recs += [recs[11], ("twin", recs[12][1])]
    fa = tmp_path / "in.fasta"
    fa.write_text("".join(f">{i} desc\n{q[:30]}\n{q[30:]}\n" for i, q in recs))
    (tmp_path / "ref").mkdir()
    (tmp_path / "run").mkdir()
    ref_out, out = tmp_path / "ref" / "emb.safetensors", tmp_path / "run" / "emb.safetensors"
    embed(str(fa), model=ckpt, out=ref_out, pooling=["mean", "max"], long_policy="truncate", unknown="x", max_tokens=48, progress=False)
    cmd = [sys.executable, "-m", "anyattn", "embed", str(fa), "--model", ckpt, "--out", str(out), "--pooling", "mean", "max",
           "--long-policy", "truncate", "--unknown", "x", "--max-tokens", "48", "--no-progress"]  # fmt: skip
    work = str(out) + ".work.sqlite"
    p = subprocess.Popen(cmd, env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    target = random.Random(1).randint(20, 120)
    t_end = time.time() + 120
    while p.poll() is None and count_rows(work) < target and time.time() < t_end:
        time.sleep(0.005)
    assert p.poll() is None, "the job ended before it could be killed"
    p.send_signal(signal.SIGKILL)
    p.wait()
    p.stderr.close()
    kept = count_rows(work)
    assert 0 < kept < 301 and not out.exists()
    r = subprocess.run(cmd, env=cli_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert sorted(os.listdir(out.parent)) == ["emb.safetensors"]
    assert out.read_bytes() == ref_out.read_bytes()
    with open_store(out) as st:
        assert st.records() == [i for i, _ in recs]


# ------------------------------------------------------------------------------ Python API
def test_the_module_is_callable_and_equals_embed(ckpt, tmp_path):
    recs = [("a", "MKTAYIAK"), ("b", "mkv")]
    anyattn.embed(recs, model=ckpt, out=tmp_path / "a.sqlite", pooling="mean,max", progress=False)
    embed(recs, model=ckpt, out=tmp_path / "b.sqlite", pooling=["mean", "max"], progress=False)
    with open_store(tmp_path / "a.sqlite") as a, open_store(tmp_path / "b.sqlite") as b:
        assert np.array_equal(a.stack(), b.stack()) and a.metadata["pooling"] == "mean,max"


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"unknown": "X"}, r"unknown: expected one of \('error', 'x'\), got 'X'"),
        ({"long_policy": "trunc"}, r"long_policy: expected one of \('error', 'truncate', 'split'\), got 'trunc'"),
        ({"store_dtype": "bf16"}, r"store_dtype: expected one of \('float16', 'float32'\), got 'bf16'"),
        ({"pooling": "MEAN"}, r"pooling: expected one of .*, got 'MEAN'"),
        ({"pooling": ["mean", 3]}, r"pooling: expected one of .*got \['mean', 3\]"),
        ({"layers": [0, "1"]}, r"layers: expected None, 'all', an int or a non-empty list of ints .*got \[0, '1'\]"),
        ({"devices": 0}, r"devices: expected a device, a comma-separated string or a list of devices, got 0"),
        ({"shard_size": 1.5, "out": "o.safetensors"}, r"shard_size: expected a size such as 2GB, 500MB or a number of bytes, got 1\.5"),
        ({"shard_size": "-5KB", "out": "o.safetensors"}, r"shard_size: expected a size such as 2GB.*got '-5KB'"),
        ({"tokenizer": 5}, r"tokenizer: expected None, a tokenizer directory / hub id, or a transformers tokenizer, got int"),
        ({"records": [("a", "MKV"), ("b", 5)]}, r"record 2 \('b'\): the sequence must be a str, got int"),
        ({"records": {1: "MKV"}}, r"record 1: the id must be a non-empty string without whitespace, got 1"),
        ({"records": []}, r"records: no records \(empty input\)"),
    ],
)
def test_api_argument_errors_name_the_argument_expected_and_got(ckpt, tmp_path, kw, match):
    kw = dict(kw)
    records = kw.pop("records", None)
    args = dict(out=str(tmp_path / kw.pop("out", "o.sqlite")), progress=False, **kw)
    if records is None:  # checked before the model (which does not exist) is read
        with pytest.raises((ValueError, TypeError), match=match):
            embed({"a": "MKV"}, model=str(tmp_path / "no_model"), **args)
    else:  # records are read once the model is loaded
        with pytest.raises(ValueError, match=match):
            embed(records, model=ckpt, **args)
    assert not os.listdir(tmp_path)


def test_layers_out_of_range_name_the_range(ckpt, tmp_path):
    with pytest.raises(ValueError, match=r"layers: expected None, 'all', an int or a list of ints in \[-3, 2\] .*got \[0, -4\]"):
        embed({"a": "MKV"}, model=ckpt, out=tmp_path / "o.sqlite", layers=[0, -4], progress=False)
    assert not os.listdir(tmp_path)


# ------------------------------------------------------------------------------ defects found by this audit (fixed)
@pytest.mark.parametrize("sharded", [False, True])
def test_an_id_named___metadata___is_refused_before_a_safetensors_export(ckpt, tmp_path, sharded):
    """An id '__metadata__' (safetensors' own header key) overwrote the header's metadata: the job
    reported success, deleted its work store, and the export could not be opened. It is now
    refused before any work, as the .npz reserved id is; SQLite and .npz take it."""
    recs = {f"q{i}": "MKTAYIAK"[: 1 + i] for i in range(6)} | {"__metadata__": "MKV"}
    out = tmp_path / "o.safetensors"
    with pytest.raises(ValueError, match="'__metadata__' is reserved in .safetensors"):
        embed(recs, model=ckpt, out=out, shard_size="200B" if sharded else None, progress=False)
    assert not [f for f in os.listdir(tmp_path) if f.startswith("o.")]
    embed(recs, model=ckpt, out=tmp_path / "o.npz", progress=False)
    with open_store(tmp_path / "o.npz") as st:
        assert st.records() == list(recs)
        assert st["__metadata__"].shape == (32,)


def test_npz_ids_x_and_x_npy_read_their_own_rows(ckpt, tmp_path):
    """An .npz export holds ids 'foo' and 'foo.npy' (members foo.npy and foo.npy.npy); numpy's
    NpzFile resolves the key 'foo.npy' to the member of 'foo', so open_store(...)['foo.npy'] was
    silently the row of 'foo'. The reader now opens members by their exact names."""
    recs = {"foo": "MKV", "foo.npy": "MKTAYIAK"}
    embed(recs, model=ckpt, out=tmp_path / "o.npz", progress=False)
    embed(recs, model=ckpt, out=tmp_path / "o.sqlite", progress=False)
    with open_store(tmp_path / "o.npz") as z, open_store(tmp_path / "o.sqlite") as s:
        assert z.ids() == s.ids()
        for i in recs:
            assert np.array_equal(z[i], s[i]), i


def test_unknown_x_with_a_tokenizer_without_X_is_refused_before_any_store(ckpt, tmp_path):
    """docs/embed.md: "`--unknown x` maps other characters to `X`"; "Every error ... raised before
    anything is computed or written"; exit 2 for bad input. With a tokenizer that has no X token
    (here an ANKH-shaped one without X), --unknown x maps '*' to 'X', which is not in the alphabet
    either: the job died with `internal error RuntimeError: ... a residue outside the tokenizer's
    one-letter tokens reached the model` (exit 1), after creating an empty store that recorded
    unknown='x'. Now refused up front naming --unknown (and the missing X), nothing written."""
    model = make_ckpt("ankh", tmp_path / "ankh")
    tok = tmp_path / "tok_no_x"
    ankh_tokenizer(order="LAGVSERTIDPKQNFYMHWCBUZO").save_pretrained(tok)
    d = tmp_path / "job"
    d.mkdir()
    (d / "in.fa").write_text(">a\nMK*V\n")
    rc, err = _cli("embed", str(d / "in.fa"), "--model", model, "--tokenizer", str(tok), "--unknown", "x",
                   "--out", str(d / "o.sqlite"), "--no-progress")  # fmt: skip
    assert len(err) == 1 and "internal error" not in err[0], err
    assert rc == 2 and "unknown" in err[0], err
    assert sorted(os.listdir(d)) == ["in.fa"]


def test_rerun_with_the_same_model_object_after_fp16_resumes(ckpt, tmp_path, monkeypatch):
    """docs/embed.md: model_weights_sha1 is "rounded to bf16, so independent of the compute dtype";
    "Run the same command again after any interruption (Ctrl-C, ...): it continues where it
    stopped"; a model object "is used as is (moved/cast in place)". A job with dtype="fp16" casts
    the object to float16, and the store identity of the same object is then computed from the
    float16 weights (double rounding fp32 -> fp16 -> bf16 differs): re-running the same call after
    a Ctrl-C was refused with "model_weights_sha1: store has ..., this run ...". The object now
    remembers the weights it was cast from, as long as they are unchanged since the cast."""
    import anyattn.models as am

    m = am.load(ckpt)
    recs = _seqs(12, seed=9)
    kw = dict(model=m, out=tmp_path / "o.sqlite", dtype="fp16", store_dtype="float32", max_tokens=60, progress=False)
    with monkeypatch.context() as mp:
        _interrupt_at(mp, 3)
        with pytest.raises(KeyboardInterrupt):
            embed(recs, **kw)
    assert next(m.parameters()).dtype == torch.float16  # cast in place, as documented
    s = embed(recs, **kw)  # the same call again
    assert s.skipped > 0 and s.skipped + s.embedded == 12
    with torch.no_grad():  # weights changed after the cast: another model, refused
        next(m.parameters()).add_(1.0)
    with pytest.raises(StoreMismatchError, match="model_weights"):
        embed(recs, **{**kw, "out": tmp_path / "o.sqlite"}, append=True)


def test_fp16_workers_report_the_parents_model(ckpt):
    """docs/embed.md: several devices give results "identical to a single-device run"; --dtype
    fp16 is a documented compute dtype. Each worker casts its model to the compute dtype *before*
    computing the model identity it reported, while the parent hashes the float32 weights; for
    fp16 the two differed, so `anyattn embed ... --dtype fp16 --devices cuda:0,cuda:1` (or
    `cpu,cpu`) always stopped with "the worker on cpu loaded a different model". Checked with the
    worker function itself, in this process (the spawned job takes ~15 s)."""
    from anyattn.embed.model import _load_model, _model_identity
    from anyattn.embed.run import _worker

    parent = _model_identity(_load_model(ckpt, backend=None))  # what embed() compares with
    tasks, results = queue.Queue(), queue.Queue()
    tasks.put(None)
    runner_kw = dict(poolers=("mean",), layers=[2], store_dtype="float32", pad_to=None, prefix=1, suffix=1, pad_id=1)
    threads = torch.get_num_threads()
    try:
        _worker(0, "cpu", ckpt, "fp16", None, runner_kw, False, tasks, results, os.getpid(), 0)
    finally:
        torch.set_num_threads(threads)
    kind, _, identity = results.get_nowait()
    assert kind == "ready", identity
    assert identity == parent


@pytest.mark.parametrize("arg", ["compile", "progress"])
def test_bool_options_refuse_other_types(tmp_path, arg):
    """docs/reliability.md: "wrong argument types and values (`out=3`, `max_tokens=2.5`, ...) |
    named before any work" (and `append="yes"` is refused: "append: expected a bool").
    compile="no" and progress="no" were taken as True (compile="no" compiled the layers and padded
    every batch to max_tokens)."""
    with pytest.raises((TypeError, ValueError), match=rf"{arg}: expected a bool"):
        embed({"a": "MKV"}, model=str(tmp_path / "no_model"), out=tmp_path / "o.sqlite", **{arg: "no"})


def test_weights_that_differ_off_the_sampled_values_are_another_model(ckpt, tmp_path):
    """docs/embed.md: "a different model (config or weights) ... is refused with
    StoreMismatchError". The weights fingerprint samples 64 strided values per tensor (rounded to
    bf16): a checkpoint differing in one weight between the samples (here query weight [0, 1],
    +0.5: the stored embeddings differ by ~2e-4) had the same fingerprint, so its run skipped the
    other model's rows and completed the store with a mix of the two models. Every weight is now
    hashed too (model_weights_all_sha1)."""
    recs = {"a": "MKTAYIAKQR", "b": "MKV"}
    embed(recs, model=ckpt, out=tmp_path / "o.sqlite", progress=False)
    hf = transformers.EsmForMaskedLM.from_pretrained(ckpt)
    with torch.no_grad():
        hf.esm.encoder.layer[0].attention.self.query.weight[0, 1] += 0.5
    hf.save_pretrained(tmp_path / "edited")
    embed(recs, model=str(tmp_path / "edited"), out=tmp_path / "e.sqlite", progress=False)
    with open_store(tmp_path / "o.sqlite") as a, open_store(tmp_path / "e.sqlite") as b:
        assert not np.array_equal(a["a"], b["a"])  # another model: other embeddings
    with pytest.raises(StoreMismatchError, match="model_weights_all_sha1"):
        embed(recs, model=str(tmp_path / "edited"), out=tmp_path / "o.sqlite", progress=False)


def test_a_store_without_the_full_weights_hash_still_resumes(ckpt, tmp_path):
    """Stores written before model_weights_all_sha1 existed have the sampled fingerprint only:
    they resume on it (the key is checked when the store has it)."""
    recs = _seqs(6, seed=3)
    out = tmp_path / "o.sqlite"
    embed(recs[:3], model=ckpt, out=out, progress=False)
    con = sqlite3.connect(out)
    with con:
        assert con.execute("DELETE FROM meta WHERE key = 'model_weights_all_sha1'").rowcount == 1
    con.close()
    s = embed(recs, model=ckpt, out=out, progress=False, append=True)
    assert s.skipped == 3 and s.embedded == 3


def test_the_same_hidden_state_twice_is_refused(ckpt, tmp_path):
    """layers=[1, 1] or [-1, 2] on a 2-layer model gave duplicated columns; duplicate poolers were
    already refused."""
    for layers in ([1, 1], [-1, 2]):
        with pytest.raises(ValueError, match="layers: expected distinct hidden states"):
            embed({"a": "MKV"}, model=ckpt, out=tmp_path / "o.sqlite", layers=layers, progress=False)
    assert not (tmp_path / "o.sqlite").exists()


def test_a_missing_model_path_is_named_model(tmp_path):
    """The loader's own argument name (path_or_repo) reached embed's users; the job names its
    argument: model (--model)."""
    with pytest.raises(ValueError, match=r"^model: expected an existing local directory"):
        embed({"a": "MKV"}, model=str(tmp_path / "nope"), out=tmp_path / "o.sqlite", progress=False)
    assert not (tmp_path / "o.sqlite").exists()
