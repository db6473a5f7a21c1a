"""Faults around the embed job (issue 16): odd paths, odd and damaged files, two writers, a full
disk, a resumed split job, non-finite embeddings. Each test names the defect it guards; the
catalogue in docs/reliability.md points here.

The checkpoint is the tiny random ESM2 of tests/test_embed.py (hidden 32, 2 layers, 40 residues).
"""

from __future__ import annotations

import gzip
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

from anyattn.cli import main  # noqa: E402
from anyattn.embed import (  # noqa: E402
    EmbedError,
    FastaError,
    StoreBusyError,
    StoreError,
    StoreMismatchError,
    embed,
    open_store,
    read_fasta,
)
from anyattn.embed import store as store_mod  # noqa: E402
from anyattn.embed.fasta import read_records  # noqa: E402
from anyattn.models import load_esm2  # noqa: E402

from .test_embed_support import one_thread  # noqa: E402, F401 (one_thread: an autouse fixture)

MAX_POS = 42  # 40 residues
AA = "ACDEFGHIKLMNPQRSTVWY"
ALPHABET = frozenset("LAGVSERTIDPKQNFYMHWCXBUZO")
SRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src")
META = {"format": store_mod.FORMAT, "pooling": "mean"}


def _save_ckpt(path, seed=0):
    torch.manual_seed(seed)
    cfg = transformers.EsmConfig(
        vocab_size=33, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=MAX_POS, position_embedding_type="rotary", token_dropout=True,
        emb_layer_norm_before=False, pad_token_id=1, mask_token_id=32, layer_norm_eps=1e-5,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )  # fmt: skip
    transformers.EsmForMaskedLM(cfg).eval().save_pretrained(path)
    return str(path)




@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return _save_ckpt(tmp_path_factory.mktemp("esm2_tiny"))


def _seqs(n, seed, lo=1, hi=40):
    rng = random.Random(seed)
    return {f"s{i}": "".join(rng.choice(AA) for _ in range(rng.randint(lo, hi))) for i in range(n)}


def _fasta(path, records):
    with open(path, "w") as f:
        for rid, s in records.items():
            f.write(f">{rid}\n{s}\n")
    return str(path)


def _store(path, ids, value=0.0):
    """A writable store with one row per id (no model involved)."""
    st = store_mod.SQLiteStore(str(path), META)
    st.put_many([(i, "h" + i, 3, "", np.full(4, value, dtype=np.float32)) for i in ids])
    return st


def _cli(capsys, *argv):
    """``anyattn ARGV`` in this process: (exit status, stderr lines)."""
    rc = main(list(argv))
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    return rc, err


# ------------------------------------------------------------------------------ odd paths
@pytest.mark.parametrize("name", ["a#b.sqlite", "a?mode=rw.sqlite", "100%.sqlite", "a b.sqlite", "é.sqlite"])
def test_open_store_reads_exactly_the_named_file(tmp_path, name):
    """open_store built an unquoted SQLite URI: 'a#b.sqlite' opened 'a' (another store, read-write)
    and 'x?y' created a stray empty file 'x'."""
    _store(tmp_path / "a", ["OTHER"]).close()  # what the unquoted URI opened instead
    _store(tmp_path / name, ["mine"], value=1.0).close()
    before = sorted(os.listdir(tmp_path))
    with open_store(tmp_path / name) as st:
        assert st.ids() == ["mine"] and float(st["mine"][0]) == 1.0
    after = [f for f in sorted(os.listdir(tmp_path)) if f not in (name + "-wal", name + "-shm")]  # SQLite's own
    assert after == before  # nothing created beside it


def test_memory_named_store_is_a_file(tmp_path, monkeypatch):
    """out=':memory:' wrote to an in-memory database: every row lost without a word."""
    monkeypatch.chdir(tmp_path)
    _store(":memory:", ["a"]).close()
    assert (tmp_path / ":memory:").is_file()
    assert open_store(":memory:").ids() == ["a"]


def test_out_paths_that_cannot_be_a_store_are_refused_before_the_model_loads(tmp_path, capsys):
    fa = _fasta(tmp_path / "in.fasta", {"a": "MKV"})
    for out, match in [
        (tmp_path, "out: expected a store file path"),
        (tmp_path / "no" / "dir" / "o.sqlite", "no directory"),
        (str(tmp_path / "newdir") + "/", "a directory name"),  # SQLite opened 'newdir' as the store
    ]:
        with pytest.raises(ValueError, match=match):  # the model path does not exist: it was never read
            embed(fa, model=str(tmp_path / "no_model"), out=out, progress=False)
    rc, err = _cli(capsys, "embed", fa, "--model", str(tmp_path / "no_model"), "--out", str(tmp_path))
    assert rc == 2 and len(err) == 1 and "out: expected a store file path" in err[0]


def test_missing_input_is_named_before_the_model_loads(tmp_path, capsys):
    """A mistyped FASTA path was only reported after the model was loaded (or downloaded)."""
    with pytest.raises(FastaError, match=r"nope\.fasta: no such input file"):
        embed(str(tmp_path / "nope.fasta"), model=str(tmp_path / "no_model"), out=tmp_path / "o.sqlite", progress=False)
    rc, err = _cli(capsys, "embed", str(tmp_path), "--model", "x/y", "--out", str(tmp_path / "o.sqlite"))
    assert rc == 2 and len(err) == 1 and "a directory, expected a FASTA file" in err[0]


# ------------------------------------------------------------------------------ odd input files
GOOD = b">a desc\nMKV\n>b\nmktay\n"


@pytest.mark.parametrize(
    "name, data, match",
    [
        ("latin1.fa", ">caf\xe9 desc\nMKV\n".encode("latin-1"), r"latin1\.fa:1: column 5 \(the id in the header\): byte 0xE9 is not UTF-8"),
        ("latin1s.fa", ">a\nMKV\n>b\nMK\xe9V\n".encode("latin-1"), r"latin1s\.fa:4: column 3 \(record 'b'\): byte 0xE9 is not UTF-8"),
        ("bin.fa", bytes(range(256)), r"bin\.fa:1: column 1 .*control character '\\x00'"),
        ("nul.fa", b">a\nMK\x00V\n", r"nul\.fa:2: column 3 .*control character"),
        ("trunc.fa.gz", gzip.compress(GOOD * 2000)[:-40], r"trunc\.fa\.gz: after line \d+: the gzip data ends early"),
        ("corrupt.fa.gz", gzip.compress(GOOD * 50)[:12] + b"\x00" * 64, r"corrupt\.fa\.gz: .*corrupt gzip data"),
        ("utf16.fa", ">a\nMKV\n".encode("utf-16"), r"utf16\.fa: the file is UTF-16 text"),
        ("x.fa.bz2", b"BZh91AY&SY" + bytes(20), r"the file is bzip2-compressed"),
        ("empty.fa.gz", gzip.compress(b""), r"empty\.fa\.gz: the file is empty"),
    ],
)
def test_undecodable_and_damaged_inputs_name_the_file_and_line(tmp_path, name, data, match):
    """Binary, latin-1, truncated-gzip and not-really-gzip inputs raised raw UnicodeDecodeError /
    EOFError / BadGzipFile with no file or line."""
    p = tmp_path / name
    p.write_bytes(data)
    for unknown in ("error", "x"):  # bytes that are not text are never mapped to X
        with pytest.raises(FastaError, match=match):
            list(read_fasta(str(p), alphabet=ALPHABET, unknown=unknown))


@pytest.mark.parametrize(
    "name, data",
    [
        ("bom.fa", b"\xef\xbb\xbf" + GOOD),  # a UTF-8 BOM gave "sequence data before the first '>' header"
        ("plain_named.fa.gz", GOOD),  # named .gz, not compressed: BadGzipFile
        ("gzip_named.fa", gzip.compress(GOOD)),  # compressed, not named .gz
        ("bom_in.fa.gz", gzip.compress(b"\xef\xbb\xbf" + GOOD)),
        ("crlf.fa", GOOD.replace(b"\n", b"\r\n")),
        ("latin1_description.fa", GOOD.replace(b"desc", b"caf\xe9")),  # the description is never read
    ],
)
def test_bom_and_gzip_by_content_read_like_the_plain_file(tmp_path, name, data):
    p = tmp_path / name
    p.write_bytes(data)
    got = [(r.id, r.seq, r.line) for r in read_fasta(str(p), alphabet=ALPHABET)]
    assert got == [("a", "MKV", 1), ("b", "MKTAY", 3)]


@pytest.mark.parametrize("text, bad, col", [("MKßV", "ß", 3), ("MKV\nmkﬁv", "ﬁ", 3), ("mkıv", "ı", 3), ("MKVµ", "µ", 4)])
def test_non_ascii_letters_are_refused_not_case_folded(tmp_path, text, bad, col):
    """Sequences were upper-cased before the alphabet check: 'ß' became 'SS', 'ﬁ' 'FI', 'ı' 'I'
    (other proteins, other lengths) and passed. Now: refused with line and column; with
    unknown='x' each becomes one X (the length is kept)."""
    p = tmp_path / "in.fa"
    p.write_text(f">a\n{text}\n", encoding="utf-8")
    line = 2 + text.count("\n")
    with pytest.raises(FastaError, match=rf"in\.fa:{line}: column {col} \(record 'a'\): character '{bad}' is not in the model's alphabet"):
        list(read_fasta(str(p), alphabet=ALPHABET))
    (rec,) = read_fasta(str(p), alphabet=ALPHABET, unknown="x")
    want = text.replace("\n", "").replace(bad, "X").translate({c: c - 32 for c in range(97, 123)})
    assert rec.seq == want and len(rec.seq) == len(text.replace("\n", ""))
    joined = text.replace("\n", "")
    with pytest.raises(FastaError, match=rf"record 1 \('a'\): position {joined.index(bad) + 1}: character '{bad}'"):
        list(read_records({"a": joined}, alphabet=ALPHABET))


def test_python_record_ids_with_control_characters_are_refused():
    with pytest.raises(FastaError, match=r"record 1: the id must be text without control characters"):
        list(read_records({"a\x00b": "MKV"}, alphabet=ALPHABET))
    with pytest.raises(FastaError, match=r"record 1: the id must be text"):
        list(read_records([("a\udce9", "MKV")], alphabet=ALPHABET))


def test_bad_input_through_the_cli_is_one_line_and_exit_2(ckpt, tmp_path, capsys):
    p = tmp_path / "in.fa"
    p.write_bytes(">a\nMK\xe9V\n".encode("latin-1"))
    rc, err = _cli(capsys, "embed", str(p), "--model", ckpt, "--out", str(tmp_path / "o.sqlite"), "--no-progress")
    assert rc == 2 and len(err) == 1, err
    assert err[0].startswith("anyattn embed: error: ") and "in.fa:2: column 3" in err[0] and "not UTF-8" in err[0]


# ------------------------------------------------------------------------------ odd store files
def _truncated_safetensors(path):
    from safetensors.numpy import save_file

    save_file({"a": np.ones(1000, dtype=np.float32)}, str(path), metadata={"format": store_mod.FORMAT})
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _truncated_npz(path):
    with open(path, "wb") as f:  # a file object: np.savez would append .npz to a name
        np.savez(f, __anyattn_metadata__=np.array("{}"), a=np.ones(1000))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda p: p.write_bytes(b""), "got an empty file"),
        (lambda p: p.write_bytes(b"hello, world, not a store"), r"got first bytes b'hello, w'"),
        (_truncated_safetensors, "damaged or truncated .safetensors"),
        (_truncated_npz, "damaged or truncated .npz"),
        (lambda p: sqlite3.connect(str(p)).execute("CREATE TABLE t(x)").connection.commit(), "no metadata table"),
    ],
)
def test_open_store_names_files_that_are_not_stores(tmp_path, make, match):
    p = tmp_path / "weird.store"
    make(p)
    with pytest.raises(StoreMismatchError, match=rf"weird\.store.*{match}|{match}.*weird\.store|weird\.store: not an anyattn"):
        open_store(p)


def test_open_store_refuses_a_directory(tmp_path):
    with pytest.raises(ValueError, match=r"path: expected an embedding store file .* got the directory"):
        open_store(tmp_path)


@pytest.mark.parametrize("ext", ["npz", "safetensors"])
def test_exports_take_ids_that_are_python_keywords_of_savez(ckpt, tmp_path, ext):
    """np.savez(f, **arrays) took the ids as keyword arguments: an id 'file' raised TypeError
    after the whole job had run."""
    recs = {"file": "MKV", "allow_pickle": "MKTAY", "args": "MA", "a/b": "MKK"}
    out = tmp_path / f"o.{ext}"
    embed(recs, model=ckpt, out=out, progress=False)
    with open_store(out) as st:
        assert sorted(st.ids()) == sorted(recs) and st["file"].shape == (32,)


def test_reserved_npz_id_is_refused_before_any_work(ckpt, tmp_path):
    with pytest.raises(FastaError, match="'__anyattn_metadata__' is reserved"):
        embed({"__anyattn_metadata__": "MKV"}, model=ckpt, out=tmp_path / "o.npz", progress=False)
    assert not os.path.exists(str(tmp_path / "o.npz.work.sqlite"))


# ------------------------------------------------------------------------------ disk full
@pytest.fixture
def small_disk(monkeypatch):
    """Every SQLite connection may hold at most ``pages`` pages (4 KiB each): a full disk, as
    SQLite reports it (SQLITE_FULL)."""
    real = sqlite3.connect
    limit = {"pages": 40}

    def connect(*a, **kw):
        con = real(*a, **kw)
        con.execute(f"PRAGMA max_page_count={limit['pages']}")
        return con

    monkeypatch.setattr(sqlite3, "connect", connect)
    return limit


def test_disk_full_is_reported_not_hidden_behind_cannot_rollback(tmp_path, small_disk):
    """On SQLITE_FULL SQLite rolls the transaction back itself; the job's ROLLBACK then raised
    'cannot rollback - no transaction is active', hiding 'database or disk is full'."""
    st = _store(tmp_path / "o.sqlite", ["first"])
    big = [(f"r{i}", "h", 1, "", np.zeros(4096, dtype=np.float32)) for i in range(200)]
    with pytest.raises(StoreError, match=r"o\.sqlite'.*writing 200 row\(s\) failed: database or disk is full \(the disk .* is full") as e:
        st.put_many(big)
    assert "cannot rollback" not in str(e.value)
    assert sorted(st.done()) == ["first"]  # the batch is all or nothing; the earlier row stays
    st.put_many([("second", "h", 1, "", np.zeros(4, dtype=np.float32))])  # the store still works
    st.close()
    assert open_store(tmp_path / "o.sqlite").ids() == ["first", "second"]


def test_disk_full_in_a_job_exits_1_keeps_rows_and_resumes(ckpt, tmp_path, small_disk, capsys):
    recs = _seqs(300, seed=1, lo=30, hi=40)
    fa = _fasta(tmp_path / "in.fasta", recs)
    out = tmp_path / "o.sqlite"
    small_disk["pages"] = 60
    rc, err = _cli(capsys, "embed", fa, "--model", ckpt, "--out", str(out), "--pooling", "none", "--max-tokens", "84", "--no-progress")
    assert rc == 1 and len(err) == 1, err
    assert "database or disk is full" in err[0] and "run the same command again to resume" in err[0]
    kept = len(open_store(out))
    assert 0 < kept < 300
    small_disk["pages"] = 1 << 30
    rc, err = _cli(capsys, "embed", fa, "--model", ckpt, "--out", str(out), "--pooling", "none", "--max-tokens", "84", "--no-progress")
    assert rc == 0, err
    assert sorted(open_store(out).ids()) == sorted(recs)


# ------------------------------------------------------------------------------ two writers
def test_two_jobs_on_one_store_the_second_stops_at_once(ckpt, tmp_path, capsys):
    """The later of two jobs on one store did all its compute, then died with a raw
    sqlite3.IntegrityError. Now it stops before loading its model, naming the holder; the first
    job finishes undisturbed."""
    recs = _seqs(400, seed=2)
    fa = _fasta(tmp_path / "in.fasta", recs)
    out = tmp_path / "o.sqlite"
    env = dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    first = subprocess.Popen(
        [sys.executable, "-m", "anyattn", "embed", fa, "--model", ckpt, "--out", str(out), "--max-tokens", "48", "--no-progress"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        t_end = time.time() + 60
        while not os.path.exists(str(out) + ".lock") and time.time() < t_end and first.poll() is None:
            time.sleep(0.02)
        assert first.poll() is None, "the first job ended before the second could start"
        t0 = time.perf_counter()
        rc, err = _cli(capsys, "embed", fa, "--model", ckpt, "--out", str(out), "--max-tokens", "48", "--no-progress")
        assert time.perf_counter() - t0 < 5
        assert rc == 1 and len(err) == 1, err
        assert f"is being written by another job (pid {first.pid} on" in err[0]
        with pytest.raises(StoreBusyError):
            embed(fa, model=str(tmp_path / "no_model"), out=out, progress=False)  # before any model is read
    finally:
        stdout, stderr = first.communicate(timeout=300)
    assert first.returncode == 0, stderr
    assert sorted(open_store(out).ids()) == sorted(recs)
    assert not os.path.exists(str(out) + ".lock")


def test_a_lock_left_by_a_killed_job_does_not_block(tmp_path):
    out = str(tmp_path / "o.sqlite")
    code = f"import sys, time; sys.path.insert(0, {SRC!r}); from anyattn.embed.store import _JobLock; _JobLock({out!r}); print('locked', flush=True); time.sleep(60)"
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "locked"
    with pytest.raises(StoreBusyError, match=rf"pid {p.pid} on"):
        store_mod._JobLock(out)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert os.path.exists(out + ".lock")  # left behind by SIGKILL: a name, not a lock
    store_mod._JobLock(out).release()
    assert not os.path.exists(out + ".lock")


def test_a_writer_without_the_lock_is_named_not_a_raw_integrity_error(tmp_path):
    st = _store(tmp_path / "o.sqlite", ["a"])
    other = store_mod.SQLiteStore(str(tmp_path / "o.sqlite"), META)
    other.put_many([("b", "h", 1, "", np.zeros(4, dtype=np.float32))])
    with pytest.raises(StoreError, match=r"id\(s\) \['b'\] already stored: another process wrote to this store"):
        st.put_many([("c", "h", 1, "", np.zeros(4, dtype=np.float32)), ("b", "h", 1, "", np.zeros(4, dtype=np.float32))])
    assert sorted(st.done()) == ["a", "b"]


# ------------------------------------------------------------------------------ resume
def test_split_resume_with_every_row_of_a_split_sequence_stored(ckpt, tmp_path, capsys):
    """`--long-policy split` resumed after a kill exited 1 with "split sequence(s) incomplete"
    although every row was stored, and skipped its export: a batch still to run held chunk 0 of a
    split sequence whose row was already written (its other chunk's batch was not run again)."""
    long = "A" * 30 + "M" * 30  # 60 residues > 40: chunks 'A'*30 and 'M'*30
    recs = {"long": long, "t": "C" * 30, "u": "W" * 30}  # batches of two 32-token items: [A.., C..], [M.., W..]
    fa = _fasta(tmp_path / "in.fasta", recs)
    out = tmp_path / "o.npz"
    work = str(out) + ".work.sqlite"
    args = ["--pooling", "mean", "--long-policy", "split", "--max-tokens", "64", "--no-progress"]
    assert _cli(capsys, "embed", fa, "--model", ckpt, "--out", work, *args)[0] == 0  # the work store, complete
    ref = {i: open_store(work)[i] for i in recs}
    con = sqlite3.connect(work)
    con.execute("DELETE FROM embeddings WHERE id = 't'")  # as if killed before t's batch was written
    con.commit()
    con.close()
    rc, err = _cli(capsys, "embed", fa, "--model", ckpt, "--out", str(out), *args)
    assert rc == 0, err
    with open_store(out) as st:  # the export happened
        assert sorted(st.ids()) == sorted(recs)
        for i in recs:
            assert np.array_equal(st[i], ref[i]), i
    assert not os.path.exists(work)


# ------------------------------------------------------------------------------ non-finite values
def test_nan_embeddings_are_refused_not_stored(ckpt, tmp_path, capsys):
    m = load_esm2(ckpt, attn_backend="eager")
    with torch.no_grad():
        m.esm.encoder.emb_layer_norm_after.weight[3] = float("nan")
    out = tmp_path / "o.sqlite"
    with pytest.raises(EmbedError, match=r"the model's output for sequence '[ab]' .* is NaN or inf"):
        embed({"a": "MKV", "b": "MKTAY"}, model=m, out=out, progress=False)
    assert len(open_store(out)) == 0


def test_values_beyond_float16_are_refused_with_the_store_dtype_to_use(ckpt, tmp_path):
    m = load_esm2(ckpt, attn_backend="eager")
    with torch.no_grad():
        m.esm.encoder.emb_layer_norm_after.weight.mul_(1e6)
    with pytest.raises(EmbedError, match=r"exceeds float16's range .* use --store-dtype float32"):
        embed({"a": "MKV"}, model=m, out=tmp_path / "o.sqlite", store_dtype="float16", progress=False)
    embed({"a": "MKV"}, model=m, out=tmp_path / "o32.sqlite", store_dtype="float32", progress=False)
    assert np.isfinite(open_store(tmp_path / "o32.sqlite")["a"]).all()


# ------------------------------------------------------------------------------ wrong types, devices
@pytest.mark.parametrize(
    "kw, err, match",
    [
        ({"out": 3}, TypeError, r"out: expected an output path"),
        ({"max_tokens": 2.5}, ValueError, r"max_tokens: expected an int >= 3"),
        ({"max_tokens": True}, ValueError, r"max_tokens"),
        ({"devices": ""}, ValueError, r"devices: expected a device"),
        ({"devices": "meta"}, ValueError, r"devices: expected real devices"),
        ({"devices": "gpu"}, ValueError, r"devices: expected device names"),
        ({"dtype": "int8"}, ValueError, r"dtype: expected 'auto' or one of"),
        ({"dtype": ["bf16"]}, ValueError, r"dtype: expected 'auto' or one of"),
        ({"dtype": torch.int8}, ValueError, r"dtype: expected 'auto' or one of"),
        ({"pooling": None}, ValueError, r"pooling: expected one of"),
        ({"records": 42}, TypeError, r"fasta_or_records: expected a FASTA path, a mapping .* got int"),
        ({"records": b">a\nMKV\n"}, TypeError, r"fasta_or_records: expected .* got bytes"),
    ],
)
def test_wrong_arguments_are_named_before_any_work(tmp_path, kw, err, match):
    args = dict(model=str(tmp_path / "no_model"), out=str(tmp_path / "o.sqlite"), progress=False)
    args.update(kw)
    records = args.pop("records", {"a": "MKV"})
    with pytest.raises(err, match=match):  # the model path does not exist: it was never read
        embed(records, **args)
    assert not os.path.exists(tmp_path / "o.sqlite")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only refusal")
def test_a_cuda_device_on_a_machine_without_one_is_refused_up_front(tmp_path, capsys):
    fa = _fasta(tmp_path / "in.fasta", {"a": "MKV"})
    rc, err = _cli(capsys, "embed", fa, "--model", "x/y", "--out", str(tmp_path / "o.sqlite"), "--devices", "cuda:0,cuda:1")
    assert rc == 2 and len(err) == 1 and "devices: expected devices of this machine (torch.cuda.is_available() is False)" in err[0]


def test_embed_takes_a_torch_dtype_like_its_name(ckpt, tmp_path):
    embed({"a": "MKV"}, model=ckpt, out=tmp_path / "o.sqlite", dtype=torch.float32, progress=False)
    assert open_store(tmp_path / "o.sqlite").metadata["dtype"] == "fp32"
    s = embed({"a": "MKV"}, model=ckpt, out=tmp_path / "o.sqlite", dtype="fp32", progress=False)
    assert s.skipped == 1  # the same settings
