"""anyattn embed (CPU): packed job vs each sequence alone, resume after SIGKILL, refusals, bad input.

The checkpoint is a tiny random transformers ``EsmForMaskedLM`` written with ``save_pretrained``
(hidden 32, 2 layers, max_position_embeddings 42: 40 residues). The reference for every
embedding is the same model run on that one sequence alone (a (1, n + 2) row, no packing).
"""

from __future__ import annotations

import copy
import json
import os
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

from anyattn.embed import FastaError, StoreMismatchError, embed, open_store, read_fasta  # noqa: E402
from anyattn.models import ProteinTokenizer, load_esm2  # noqa: E402
from .test_embed_support import count_rows, one_thread  # noqa: E402, F401 (one_thread: an autouse fixture)

MAX_POS = 42  # 40 residues + <cls> + <eos>
AA = "ACDEFGHIKLMNPQRSTVWY"
SRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src")


def _save_ckpt(path, seed):
    torch.manual_seed(seed)
    cfg = transformers.EsmConfig(
        vocab_size=33, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=MAX_POS, position_embedding_type="rotary", token_dropout=True,
        emb_layer_norm_before=False, pad_token_id=1, mask_token_id=32, layer_norm_eps=1e-5,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )  # fmt: skip
    hf = transformers.EsmForMaskedLM(cfg).eval()
    with torch.no_grad():  # non-trivial LayerNorms and biases
        for n, p in hf.named_parameters():
            if n.endswith("bias") or "LayerNorm" in n or "layer_norm" in n:
                p.add_(0.1 * torch.randn_like(p))
    hf.save_pretrained(path)
    return str(path)




@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return _save_ckpt(tmp_path_factory.mktemp("esm2_tiny"), 0)


@pytest.fixture(scope="module")
def ref_model(ckpt):
    return load_esm2(ckpt, attn_backend="eager")


def _seqs(n, seed, lo=1, hi=40):
    rng = random.Random(seed)
    return {f"s{i}": "".join(rng.choice(AA) for _ in range(rng.randint(lo, hi))) for i in range(n)}


def _write_fasta(path, records, width=17):
    with open(path, "w") as f:
        for rid, s in records.items():
            f.write(f">{rid} some description\n")
            for j in range(0, len(s), width):
                f.write(s[j : j + width] + "\n")
    return str(path)


@torch.inference_mode()
def _alone(model, seq, dtype=torch.float32):
    """Every hidden state (L + 1 tensors (n + 2, C), float32) of ``seq`` run alone."""
    m = model if dtype == torch.float32 else copy.deepcopy(model).to(dtype)
    ids = torch.tensor([ProteinTokenizer.esm().encode(seq)])
    hs = m.esm(ids, output_hidden_states=True).hidden_states
    return [h[0].float() for h in hs]


def _pool(h, pooling):
    if pooling == "mean":
        return h[1:-1].mean(0)
    if pooling == "max":
        return h[1:-1].amax(0)
    if pooling == "cls":
        return h[0]
    return h[1:-1]


def _maxdiff(a, b):
    return float(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)).max())


# ------------------------------------------------------------------------------ numerics
@pytest.mark.parametrize("pooling", ["mean", "max", "cls", "none"])
def test_packed_job_equals_each_sequence_alone_fp32(ckpt, ref_model, tmp_path, pooling):
    """Packing many sequences per row (tiny token budget: many batches, mixed lengths incl. 1
    residue) gives each sequence's own embedding, for every pooling and a layer list."""
    recs = _seqs(30, seed=1)
    recs["one"] = "M"
    fa = _write_fasta(tmp_path / "in.fasta", recs)
    out = tmp_path / "o.sqlite"
    s = embed(fa, model=ckpt, out=out, pooling=pooling, layers=[0, 1, -1], max_tokens=100, progress=False)
    assert (s.embedded, s.computed, s.skipped, s.duplicates) == (31, 31, 0, 0)
    assert s.batches > 3
    store = open_store(out)
    assert sorted(store.ids()) == sorted(recs)
    worst = 0.0
    for rid, seq in recs.items():
        hs = _alone(ref_model, seq)
        want = np.stack([_pool(hs[i], pooling).numpy() for i in (0, 1, 2)])
        got = store.get(rid)
        assert got.dtype == np.float32 and got.shape == want.shape, (rid, got.shape, want.shape)
        worst = max(worst, _maxdiff(got, want))
    assert worst <= 1e-5, f"max abs diff {worst:.3g}"


def test_bf16_job_within_bf16_tolerance(ckpt, ref_model, tmp_path):
    """bf16 compute: error vs the float32 model alone <= 2 x the error of bf16 alone + 1e-5."""
    recs = _seqs(20, seed=2)
    fa = _write_fasta(tmp_path / "in.fasta", recs)
    out = tmp_path / "o.sqlite"
    embed(fa, model=ckpt, out=out, pooling="mean", dtype="bf16", store_dtype="float32", max_tokens=120, progress=False)
    store = open_store(out)
    assert store.metadata["dtype"] == "bf16" and store.metadata["store_dtype"] == "float32"
    err_job = err_alone = 0.0
    for rid, seq in recs.items():
        ref = _pool(_alone(ref_model, seq)[-1], "mean").numpy()
        b16 = _pool(_alone(ref_model, seq, torch.bfloat16)[-1], "mean").numpy()
        err_job = max(err_job, _maxdiff(store.get(rid), ref))
        err_alone = max(err_alone, _maxdiff(b16, ref))
    assert err_alone > 0  # bf16 really ran
    assert err_job <= 2 * err_alone + 1e-5, (err_job, err_alone)


def test_default_layer_and_fp16_store_shapes(ckpt, tmp_path):
    """layers=None: last layer, no layer axis; store_dtype float16 blobs; metadata recorded."""
    recs = {"a": "MKTAYIAK", "b": "MKV"}
    out = tmp_path / "o.sqlite"
    embed(recs, model=ckpt, out=out, pooling="none", store_dtype="float16", progress=False)
    store = open_store(out)
    assert store.get("a").shape == (8, 32) and store.get("a").dtype == np.float16
    m = store.metadata
    assert m["pooling"] == "none" and m["layers"] == "2" and m["store_dtype"] == "float16"
    assert m["anyattn_version"] and m["model_source"] == ckpt and m["format"] == "anyattn.embed/2"
    row = sqlite3.connect(out).execute("SELECT dtype, shape, length, policy FROM embeddings WHERE id='b'").fetchone()
    assert row == ("float16", "[3, 32]", 3, "")


def test_duplicates_computed_once_rows_for_every_id(ckpt, tmp_path):
    recs = [("a", "MKTAYIAK"), ("b", "MKTAYIAK"), ("c", "MKV"), ("a", "MKTAYIAK")]
    out = tmp_path / "o.sqlite"
    s = embed(recs, model=ckpt, out=out, progress=False)
    assert (s.records, s.ids, s.unique, s.duplicates, s.computed, s.embedded) == (4, 3, 2, 2, 2, 3)
    store = open_store(out)
    assert np.array_equal(store["a"], store["b"]) and len(store) == 3


# ------------------------------------------------------------------------------ resume
def test_rerun_skips_everything(ckpt, tmp_path):
    recs = _seqs(10, seed=3)
    fa = _write_fasta(tmp_path / "in.fasta", recs)
    out = tmp_path / "o.sqlite"
    embed(fa, model=ckpt, out=out, max_tokens=60, progress=False)
    s = embed(fa, model=ckpt, out=out, max_tokens=60, progress=False)
    assert (s.embedded, s.skipped, s.computed, s.batches) == (0, 10, 0, 0)
    recs["new"] = "MKKLLV"
    fa2 = _write_fasta(tmp_path / "in2.fasta", recs)
    with pytest.raises(StoreMismatchError, match=r"was made from another input: it has 10 record\(s\) .* this input 11 .* 1 id\(s\) not in the store \(e\.g\. 'new'\), 0 of the store's not in this input; to add new records to this store use append=True"):
        embed(fa2, model=ckpt, out=out, max_tokens=60, progress=False)
    s = embed(fa2, model=ckpt, out=out, max_tokens=60, progress=False, append=True)
    # the new sequence's batch is computed whole (the plan does not depend on what is done)
    assert (s.embedded, s.skipped) == (1, 10) and 1 <= s.computed <= 10
    st = open_store(out)
    assert st.records() == list(recs) and st.metadata["input_records"] == "11"
    s = embed(fa2, model=ckpt, out=out, max_tokens=60, progress=False)  # the appended input is the store's input now
    assert (s.embedded, s.skipped) == (0, 11)


def _rows(path):
    con = sqlite3.connect(path)
    n, distinct = con.execute("SELECT COUNT(*), COUNT(DISTINCT id) FROM embeddings").fetchone()
    assert n == distinct
    assert con.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    con.close()
    st = open_store(path)
    return {i: st.get(i) for i in st.ids()}




def test_sigkill_at_random_points_then_resume_equals_uninterrupted(ckpt, tmp_path):
    """The CLI is SIGKILLed 3 times (seeded random points: during start-up and at random row
    counts mid-run), re-run each time with the same command; the final store equals an
    uninterrupted run bit for bit (several poolers, two layers): same ids in the same order,
    every value bitwise equal, no duplicate rows, integrity_check ok."""
    recs = _seqs(400, seed=4)
    fa = _write_fasta(tmp_path / "in.fasta", recs)
    ref = tmp_path / "ref.sqlite"
    embed(fa, model=ckpt, out=ref, pooling=["mean", "max", "norm"], layers=[1, 2], max_tokens=48, backend="sdpa", progress=False)
    out = tmp_path / "out.sqlite"
    cmd = [sys.executable, "-m", "anyattn", "embed", fa, "--model", ckpt, "--out", str(out), "--pooling", "mean,max,norm",
           "--layers", "1", "2", "--max-tokens", "48", "--backend", "sdpa", "--no-progress"]  # fmt: skip
    env = dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    rng = random.Random(1234)
    killed, counts = 0, []
    for attempt in range(3):
        before = count_rows(out)
        p = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        if attempt == 0:
            time.sleep(rng.uniform(0.0, 0.3))  # still importing / loading
        else:
            target = before + rng.randint(5, 120)
            t_end = time.time() + 60
            while p.poll() is None and count_rows(out) < target and time.time() < t_end:
                time.sleep(0.01)
        if p.poll() is None:
            p.send_signal(signal.SIGKILL)
            killed += 1
        p.wait()
        p.stderr.close()
        counts.append(count_rows(out))
    assert killed >= 2, f"the job finished before it could be killed: {counts}"
    assert counts[-1] < len(recs), counts
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "skipped (already in store)" in r.stdout
    got, want = _rows(out), _rows(ref)
    assert list(got) == list(want) == list(recs)  # input order
    for i in want:
        assert got[i].dtype == want[i].dtype and np.array_equal(got[i], want[i]), i


# ------------------------------------------------------------------------------ refusals
def test_refuses_to_mix_pooling_dtype_layers_model(ckpt, tmp_path):
    recs = {"a": "MKTAYIAK", "b": "MKV"}
    out = tmp_path / "o.sqlite"
    embed(recs, model=ckpt, out=out, pooling="mean", progress=False)
    with pytest.raises(StoreMismatchError, match=r"pooling: store has 'mean', this run 'max'"):
        embed(recs, model=ckpt, out=out, pooling="max", progress=False)
    with pytest.raises(StoreMismatchError, match=r"dtype: store has 'fp32', this run 'bf16'"):
        embed(recs, model=ckpt, out=out, dtype="bf16", progress=False)
    with pytest.raises(StoreMismatchError, match=r"layers: store has '2', this run '1'"):
        embed(recs, model=ckpt, out=out, layers=1, progress=False)
    other = _save_ckpt(tmp_path / "other", seed=7)  # same architecture, other weights
    with pytest.raises(StoreMismatchError, match=r"model_weights_sha1"):
        embed(recs, model=other, out=out, progress=False)
    with pytest.raises(StoreMismatchError, match=r"holds id 'a' with another sequence"):
        embed({"a": "MKKKK"}, model=ckpt, out=out, progress=False)
    assert len(open_store(out)) == 2  # nothing written by the refused runs
    (tmp_path / "not_a_store.sqlite").write_text("hello")
    with pytest.raises(StoreMismatchError, match="not an SQLite store"):
        embed(recs, model=ckpt, out=tmp_path / "not_a_store.sqlite", progress=False)


@pytest.mark.parametrize(
    "text, match",
    [
        ("MKV\n>a\nMK\n", r"in\.fasta:1: sequence data before the first '>' header"),
        (">a\nMKV\n>\nMK\n", r"in\.fasta:3: header without an id"),
        (">a\nMKV\n>b desc\n\n>c\nMK\n", r"in\.fasta:3: record 'b' has no sequence"),
        (">a\nMKV\n>b\nMKVL\nMK1V\n", r"in\.fasta:5: column 3 \(record 'b'\): character '1' is not in the model's alphabet"),
        (">a\nMKV\n>b\nMK\n>a\nMKL\n", r"duplicate id 'a' with different sequences at line 1 and line 5"),
        ("", r"in\.fasta: the file is empty"),
        ("\n\n", r"no '>' header in 2 line"),
    ],
)
def test_bad_fasta_errors_name_the_line(ckpt, tmp_path, text, match):
    fa = tmp_path / "in.fasta"
    fa.write_text(text)
    out = tmp_path / "o.sqlite"
    with pytest.raises(FastaError, match=match):
        embed(str(fa), model=ckpt, out=out, progress=False)
    assert not out.exists() or len(open_store(out)) == 0


def test_unknown_characters_map_to_x(ckpt, ref_model, tmp_path):
    fa = tmp_path / "in.fasta"
    fa.write_text(">a\nmkv*J\n")  # lower case is upper-cased; '*' and 'J' are outside the alphabet
    out = tmp_path / "o.sqlite"
    with pytest.raises(FastaError, match=r"column 4 .*'\*'.* 2 such character"):
        embed(str(fa), model=ckpt, out=out, progress=False)
    embed(str(fa), model=ckpt, out=out, unknown="x", progress=False)
    want = _pool(_alone(ref_model, "MKVXX")[-1], "mean").numpy()
    assert _maxdiff(open_store(out)["a"], want) <= 1e-5
    assert open_store(out).metadata["unknown"] == "x"


# record 'b' (header on line 3) spans lines 4-8 with a blank and a comment line; its bad
# characters: '*' (line 7, column 4: the first), '1' and '*' (line 8): 3 in all
_MULTILINE = ">a\nMKV\n>b desc\nMKVLA\n\n; comment\nmkt*Q\nMK1V*\n>c\nMK\n"


def _esm_alphabet():
    """The alphabet embed() checks against: the tokenizer's one-letter tokens."""
    return frozenset(t for t in ProteinTokenizer.esm().vocab if len(t) == 1 and t.isalpha())


def test_bad_character_in_a_multiline_record_names_first_line_column_and_count(ckpt, tmp_path):
    fa = tmp_path / "in.fasta"
    fa.write_text(_MULTILINE)
    want = (
        r"in\.fasta:7: column 4 \(record 'b'\): character '\*' is not in the model's alphabet \(.*\); "
        r"3 such character\(s\) in this record"
    )
    records = read_fasta(fa, alphabet=_esm_alphabet())
    assert next(records) == ("a", "MKV", 1)
    with pytest.raises(FastaError, match=want):
        next(records)
    out = tmp_path / "o.sqlite"
    with pytest.raises(FastaError, match=want):
        embed(str(fa), model=ckpt, out=out, progress=False)
    assert not out.exists() or len(open_store(out)) == 0


def test_unknown_x_in_a_multiline_record(ckpt, ref_model, tmp_path):
    fa = tmp_path / "in.fasta"
    fa.write_text(_MULTILINE)
    got = list(read_fasta(fa, alphabet=_esm_alphabet(), unknown="x"))
    assert got == [("a", "MKV", 1), ("b", "MKVLAMKTXQMKXVX", 3), ("c", "MK", 9)]
    out = tmp_path / "o.sqlite"
    embed(str(fa), model=ckpt, out=out, unknown="x", progress=False)
    want = _pool(_alone(ref_model, "MKVLAMKTXQMKXVX")[-1], "mean").numpy()
    assert _maxdiff(open_store(out)["b"], want) <= 1e-5


def test_python_records_errors(ckpt, tmp_path):
    with pytest.raises(FastaError, match=r"record 2 \('b'\): empty sequence"):
        embed([("a", "MK"), ("b", "")], model=ckpt, out=tmp_path / "o.sqlite", progress=False)
    with pytest.raises(FastaError, match=r"duplicate id 'a' with different sequences at record 1 and record 3"):
        embed([("a", "MK"), ("b", "MV"), ("a", "ML")], model=ckpt, out=tmp_path / "o.sqlite", progress=False)
    with pytest.raises(ValueError, match=r"pooling: expected one of"):
        embed({"a": "MK"}, model=ckpt, out=tmp_path / "o.sqlite", pooling="avg", progress=False)
    with pytest.raises(ValueError, match=r"max_tokens: expected at least 12"):
        embed({"a": "M" * 10}, model=ckpt, out=tmp_path / "o.sqlite", max_tokens=8, progress=False)


# ------------------------------------------------------------------------------ long sequences
def test_long_policy_error_truncate_split(ckpt, ref_model, tmp_path):
    long = "".join(random.Random(5).choice(AA) for _ in range(95))  # 95 residues > 40: 3 chunks 32/32/31
    recs = {"short": "MKV", "long": long}
    fa = _write_fasta(tmp_path / "in.fasta", recs)
    with pytest.raises(FastaError, match=r"line 3: sequence 'long' has 95 residues; the model takes at most 40"):
        embed(fa, model=ckpt, out=tmp_path / "e.sqlite", progress=False)
    s = embed(fa, model=ckpt, out=tmp_path / "t.sqlite", long_policy="truncate", pooling="none", progress=False)
    assert (s.truncated, s.split) == (1, 0)
    got = open_store(tmp_path / "t.sqlite")["long"]
    assert got.shape == (40, 32)
    assert _maxdiff(got, _alone(ref_model, long[:40])[-1][1:-1].numpy()) <= 1e-5
    chunks = [long[0:32], long[32:64], long[64:95]]
    hs = [_alone(ref_model, c)[-1][1:-1].numpy() for c in chunks]
    for pooling, want in [
        ("mean", np.concatenate(hs).mean(0)),
        ("max", np.concatenate(hs).max(0)),
        ("none", np.concatenate(hs)),
    ]:
        out = tmp_path / f"s_{pooling}.sqlite"
        s = embed(fa, model=ckpt, out=out, long_policy="split", pooling=pooling, max_tokens=40, progress=False)
        assert (s.truncated, s.split) == (0, 1)
        assert _maxdiff(open_store(out)["long"], want) <= 1e-5, pooling
    row = sqlite3.connect(tmp_path / "s_none.sqlite").execute("SELECT policy, length FROM embeddings WHERE id='long'").fetchone()
    assert row == ("split:3", 95)
    with pytest.raises(ValueError, match=r"long_policy: expected 'error' or 'truncate' with pooling='cls'"):
        embed(fa, model=ckpt, out=tmp_path / "c.sqlite", long_policy="split", pooling="cls", progress=False)


# ------------------------------------------------------------------------------ outputs
@pytest.mark.parametrize("ext", ["npz", "safetensors"])
def test_small_set_exports_equal_sqlite(ckpt, tmp_path, ext):
    recs = _seqs(8, seed=6)
    fa = _write_fasta(tmp_path / "in.fasta", recs)
    embed(fa, model=ckpt, out=tmp_path / "o.sqlite", pooling="none", progress=False)
    out = tmp_path / f"o.{ext}"
    embed(fa, model=ckpt, out=out, pooling="none", progress=False)
    assert not os.path.exists(str(out) + ".work.sqlite")
    a, b = open_store(tmp_path / "o.sqlite"), open_store(out)
    assert sorted(b.ids()) == sorted(recs) and len(b) == 8
    assert b.metadata["pooling"] == "none" and b.metadata["model_weights_sha1"] == a.metadata["model_weights_sha1"]
    for i in recs:
        assert np.array_equal(a[i], b[i])
    s = embed(fa, model=ckpt, out=out, pooling="none", progress=False)  # complete: nothing to do
    assert (s.embedded, s.skipped) == (0, 8)
    with pytest.raises(StoreMismatchError, match="pooling"):
        embed(fa, model=ckpt, out=out, pooling="mean", progress=False)


def test_reader_api(ckpt, tmp_path):
    out = tmp_path / "o.sqlite"
    embed([("x1", "MKV"), ("x2", "MKTAY")], model=ckpt, out=out, progress=False)
    with open_store(out) as st:
        assert len(st) == 2 and list(st) == ["x2", "x1"] or list(st) == ["x1", "x2"]
        assert "x1" in st and "nope" not in st
        assert st.get("nope") is None
        with pytest.raises(KeyError):
            st["nope"]
        assert dict(st.items()).keys() == {"x1", "x2"}
        assert json.loads(st.metadata["layers"]) == 2
    with pytest.raises(FileNotFoundError):
        open_store(tmp_path / "missing.sqlite")


def test_plain_progress_lines_when_not_a_tty(ckpt, tmp_path, capsys):
    embed({"a": "MKV"}, model=ckpt, out=tmp_path / "o.sqlite", progress=True)
    assert "embed: 1/1 sequences" in capsys.readouterr().err


# ------------------------------------------------------------------------------ devices, CLI
def test_two_cpu_workers_equal_single_device(ckpt, tmp_path):
    """Two worker processes (each its own model copy) equal one device: several poolers, split
    sequences (their chunks come back as residue vectors from whichever worker ran them and are
    pooled by the parent), rows in input order."""
    recs = _seqs(40, seed=8)
    recs.update(long1="".join(random.Random(1).choices(AA, k=70)), long2="".join(random.Random(2).choices(AA, k=95)))
    fa = _write_fasta(tmp_path / "in.fasta", recs)
    kw = dict(max_tokens=80, pooling=["mean", "median", "std"], long_policy="split", progress=False)
    embed(fa, model=ckpt, out=tmp_path / "one.sqlite", **kw)
    s = embed(fa, model=ckpt, out=tmp_path / "two.sqlite", devices="cpu,cpu", **kw)
    assert s.devices == ("cpu", "cpu") and s.embedded == 42 and s.split == 2
    a, b = _rows(tmp_path / "one.sqlite"), _rows(tmp_path / "two.sqlite")
    assert list(a) == list(b) == list(recs)
    assert max(_maxdiff(a[i], b[i]) for i in a) <= 1e-6


def test_cli_exit_codes(ckpt, tmp_path):
    from anyattn.cli import main

    fa = tmp_path / "in.fasta"
    fa.write_text(">a\nMKV\n>b\n\n")
    assert main(["embed", str(fa), "--model", ckpt, "--out", str(tmp_path / "o.sqlite"), "--pooling", "avg"]) == 2
    assert main(["embed", str(fa), "--model", ckpt, "--out", str(tmp_path / "o.sqlite"), "--no-progress"]) == 2  # bad input
    fa.write_text(">a\nMKV\n>b\nMK\n")
    assert main(["embed", str(fa), "--model", ckpt, "--out", str(tmp_path / "o.sqlite"), "--no-progress", "--layers", "-1"]) == 0
    assert open_store(tmp_path / "o.sqlite").metadata["layers"] == "2"


def test_gzip_fasta_and_in_memory_model(ckpt, ref_model, tmp_path):
    """A .gz FASTA reads like the plain file; an in-memory model object works on one device and
    is refused (with the reason) for several devices, which each load their own copy."""
    import gzip

    fa = tmp_path / "in.fasta.gz"
    with gzip.open(fa, "wt") as f:
        f.write(">a\nMKTAY\nIAK\n")
    out = tmp_path / "o.sqlite"
    embed(str(fa), model=ref_model, out=out, progress=False)
    want = _pool(_alone(ref_model, "MKTAYIAK")[-1], "mean").numpy()
    assert _maxdiff(open_store(out)["a"], want) <= 1e-5
    assert open_store(out).metadata["model_source"] == type(ref_model).__name__
    # the same weights from the directory are the same model for the store
    s = embed(str(fa), model=ckpt, out=out, progress=False)
    assert s.skipped == 1
    with pytest.raises(ValueError, match=r"model: expected a checkpoint directory or hub id when devices has several entries"):
        embed(str(fa), model=ref_model, out=tmp_path / "o2.sqlite", devices="cpu,cpu", progress=False)


def test_batch_tokenization_equals_tokenizer_encode():
    """The job's table-driven tokenizing equals ProteinTokenizer.encode on every letter of the
    alphabet (incl. X B U Z O)."""
    from anyattn.embed.job import _batch_tokens

    tok = ProteinTokenizer.esm()
    rng = random.Random(0)
    batch = [(0, 0, "".join(rng.choices(AA + "XBUZO", k=rng.randint(1, 300)))) for _ in range(20)]
    toks, lengths = _batch_tokens(tok, batch)
    assert toks.tolist() == [t for _, _, r in batch for t in tok.encode(r)]
    assert lengths == [len(r) + 2 for _, _, r in batch]


def test_a_model_of_no_known_family_is_refused_before_any_work(tmp_path):
    """A model the job has no input format for (here anyattn's decoder LM, whose config names no
    protein vocabulary) is refused naming the families it takes; no store is written. (E1 and
    DPLM-2, refused here before, run with their own formats: tests/test_embed_families.py.)"""
    from anyattn.models.decoder import Decoder, DecoderConfig

    m = Decoder(DecoderConfig(vocab_size=40, dim=32, n_layers=1, n_heads=2, n_kv_heads=2, ffn_dim=48))
    fasta = tmp_path / "x.fasta"
    fasta.write_text(">a\nMKV\n")
    out = tmp_path / "m.sqlite"
    with pytest.raises(ValueError, match=r"model: expected a model of a family the embed job knows \(ESM2, DPLM, DPLM-2, ESM C, E1, ANKH\)"):
        embed(str(fasta), model=m, out=str(out), devices="cpu")
    assert not out.exists()
