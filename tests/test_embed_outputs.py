"""anyattn embed outputs (CPU): rows in input order with duplicates, every store format (SQLite,
npz, safetensors, sharded safetensors with an index), refusals of a changed model / input /
tokenizer / pooling / layers, the command line's new options, the progress bar.

The checkpoint is the tiny random ESM2 of tests/test_embed_support.py (hidden 32, 2 layers, 40
residues); ANKH's stands in where a tokenizer can change.
"""

from __future__ import annotations

import io
import json
import os
import sys

import numpy as np
import pytest

pytest.importorskip("transformers")
safetensors_numpy = pytest.importorskip("safetensors.numpy")

from anyattn.cli import main  # noqa: E402
from anyattn.embed import StoreMismatchError, embed, open_store  # noqa: E402

from .test_embed_support import ankh_tokenizer, make_ckpt, one_thread, seqs, write_fasta  # noqa: E402, F401 (one_thread: an autouse fixture)




@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_ckpt("esm2", tmp_path_factory.mktemp("esm2"), seed=0)


def _cli(capsys, *argv):
    rc = main(list(argv))
    cap = capsys.readouterr()
    return rc, [ln for ln in cap.err.splitlines() if ln.strip()], cap.out


def _input_with_duplicates():
    """Records whose input order is neither length order nor id order, an id given twice (same
    sequence) and two ids sharing a sequence."""
    base = seqs(12, seed=21)
    recs = [(f"z{k}", s) for k, s in zip(range(12, 0, -1), base.values())]
    recs.insert(3, recs[7])  # the same record again: its id appears twice in the input
    recs.append(("twin", recs[0][1]))  # another id, the same sequence
    recs.append(recs[5])
    return recs


# ------------------------------------------------------------------------------ input order
@pytest.mark.parametrize("ext", ["sqlite", "npz", "safetensors", "sharded"])
def test_rows_come_back_in_input_order_with_duplicates_repeated(ckpt, tmp_path, ext):
    """records() is the input, one id per record (an id given twice appears twice); ids() each id
    once at its first record; stack() the rows of records(). The job itself computes each
    sequence once, in length order."""
    recs = _input_with_duplicates()
    out = tmp_path / ("o.safetensors" if ext == "sharded" else f"o.{ext}")
    kw = {"shard_size": "600B"} if ext == "sharded" else {}
    s = embed(recs, model=ckpt, out=out, pooling=["mean", "max"], max_tokens=60, progress=False, **kw)
    ids = list(dict.fromkeys(i for i, _ in recs))
    assert (s.records, s.ids, s.unique, s.computed) == (len(recs), len(ids), 12, 12)
    if ext == "sharded":
        assert os.path.exists(str(out) + ".index.json") and not out.exists()
    with open_store(out) as st:
        assert st.records() == [i for i, _ in recs]
        assert st.ids() == ids == list(st)
        a = st.stack()
        assert a.shape == (len(recs), 64) and a.dtype == np.float32
        for row, (i, _) in zip(a, recs):
            assert np.array_equal(row, st[i])
        assert np.array_equal(st["twin"], st[recs[0][0]])
    if ext != "sqlite":  # every format holds the same numbers as the SQLite store
        ref = tmp_path / "ref.sqlite"
        embed(recs, model=ckpt, out=ref, pooling=["mean", "max"], max_tokens=60, progress=False)
        with open_store(ref) as r, open_store(out) as st:
            assert np.array_equal(r.stack(), st.stack()) and r.records() == st.records()


def test_bare_sequences_get_their_positions_as_ids(ckpt, tmp_path):
    """embed(["MKV", "MKV", ...]): ids "0", "1", ... and stack() in the list's order; the
    duplicate is computed once and stored for both positions."""
    lst = ["MKTAYIAK", "MKV", "MKTAYIAK", "ACDEF"]
    s = embed(lst, model=ckpt, out=tmp_path / "o.sqlite", progress=False)
    assert (s.records, s.unique, s.computed) == (4, 3, 3)
    with open_store(tmp_path / "o.sqlite") as st:
        assert st.records() == ["0", "1", "2", "3"]
        a = st.stack()
        assert np.array_equal(a[0], a[2]) and not np.array_equal(a[0], a[1])
    with pytest.raises(ValueError, match=r"record 2: expected a sequence string like record 1"):
        embed(["MKV", ("a", "MK")], model=ckpt, out=tmp_path / "p.sqlite", progress=False)


def test_stack_of_per_residue_rows_is_refused_naming_iteration(ckpt, tmp_path):
    embed({"a": "MKV", "b": "MKTAY"}, model=ckpt, out=tmp_path / "o.sqlite", pooling="none", progress=False)
    with open_store(tmp_path / "o.sqlite") as st:
        with pytest.raises(ValueError, match=r"stack: expected rows of one shape .*per-residue rows: iterate items\(\) or get\(id\)"):
            st.stack()
        assert st.stack(["a"]).shape == (1, 3, 32)


# ------------------------------------------------------------------------------ sharded safetensors
def test_sharded_safetensors_index_maps_ids_to_shards_and_reads_like_sqlite(ckpt, tmp_path):
    recs = seqs(40, seed=5)
    fa = write_fasta(tmp_path / "in.fasta", recs)
    out = tmp_path / "emb.safetensors"
    embed(fa, model=ckpt, out=out, pooling="none", shard_size="8KB", progress=False)
    embed(fa, model=ckpt, out=tmp_path / "ref.sqlite", pooling="none", progress=False)
    index = json.loads((tmp_path / "emb.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    n = len(shards)
    assert n > 3 and shards == [f"emb-{k:05d}-of-{n:05d}.safetensors" for k in range(1, n + 1)]
    assert sorted(index["weight_map"]) == sorted(recs) and index["records"] == list(recs)
    meta = index["metadata"]
    assert meta["format"] == "anyattn.embed/2" and meta["pooling"] == "none" and meta["shards"] == n
    assert not out.exists() and not os.path.exists(str(out) + ".work.sqlite")
    total = 0
    with open_store(tmp_path / "ref.sqlite") as ref:
        for name in shards:  # every shard is a plain safetensors file of its ids, each under 8 KB of data
            arrays = safetensors_numpy.load_file(str(tmp_path / name))
            size = sum(a.nbytes for a in arrays.values())
            assert size <= 8000 or len(arrays) == 1
            total += size
            for i, a in arrays.items():
                assert index["weight_map"][i] == name and np.array_equal(a, ref[i])
        assert total == meta["total_size"]
        for path in (out, tmp_path / "emb.safetensors.index.json"):  # either name opens the set
            with open_store(path) as st:
                assert st.ids() == ref.ids() and all(np.array_equal(st[i], ref[i]) for i in recs)
    with pytest.raises(StoreMismatchError, match=r"one shard \(1/\d+\) of a sharded export: open its \.safetensors\.index\.json"):
        open_store(tmp_path / shards[0])
    s = embed(fa, model=ckpt, out=out, pooling="none", shard_size="8KB", progress=False)
    assert (s.embedded, s.skipped) == (0, 40)  # complete: nothing to do
    (tmp_path / shards[1]).unlink()
    with pytest.raises(StoreMismatchError, match=rf"shard file\(s\) \['{shards[1]}'\] of this index are missing"):
        open_store(out)


def test_a_set_that_fits_one_shard_is_one_file_and_stale_temporaries_are_removed(ckpt, tmp_path):
    recs = seqs(6, seed=2)
    out = tmp_path / "emb.safetensors"
    stale = [tmp_path / "emb.safetensors.tmp-99999", tmp_path / "emb-00001-of-00002.safetensors.tmp-4242",
             tmp_path / "emb.safetensors.index.json.tmp-7"]  # fmt: skip
    for f in stale:  # left by an export killed with SIGKILL
        f.write_bytes(b"partial")
    keep = tmp_path / "emb-notes.safetensors.tmp-1"
    keep.write_bytes(b"not ours")
    embed(recs, model=ckpt, out=out, progress=False)
    assert out.exists() and not (tmp_path / "emb.safetensors.index.json").exists()
    assert not any(f.exists() for f in stale) and keep.exists()
    arrays = safetensors_numpy.load_file(str(out))
    with open_store(out) as st:
        assert sorted(arrays) == sorted(recs) and st.records() == list(recs)
        assert st.metadata["format"] == "anyattn.embed/2"


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"shard_size": "2GB", "out": "o.sqlite"}, r"shard_size: expected None unless out is a \*\.safetensors path"),
        ({"shard_size": "lots", "out": "o.safetensors"}, r"shard_size: expected a size such as 2GB"),
        ({"shard_size": 0, "out": "o.safetensors"}, r"shard_size: expected a positive size"),
        ({"pooling": ["mean", "mean"]}, r"pooling: expected each pooler at most once"),
        ({"pooling": ["mean", "none"]}, r"pooling: expected 'none' \(per-residue output\) alone"),
        ({"pooling": "mean,avg"}, r"pooling: expected one of .* got 'avg'"),
        ({"pooling": []}, r"pooling: expected one of"),
        ({"layers": []}, r"layers: expected None, 'all', an int or a non-empty list of ints"),
        ({"layers": "last"}, r"layers: expected None, 'all'"),
        ({"layers": [1.0]}, r"layers: expected"),
        ({"append": "yes"}, r"append: expected a bool"),
        ({"long_policy": "split", "pooling": ["mean", "eos"]}, r"long_policy: expected 'error' or 'truncate' with pooling='eos'"),
    ],
)
def test_new_arguments_are_checked_before_the_model_loads(tmp_path, kw, match):
    args = dict(model=str(tmp_path / "no_model"), out="o.sqlite", progress=False)
    args.update(kw)
    args["out"] = str(tmp_path / args["out"])
    with pytest.raises(ValueError if "append" not in kw else TypeError, match=match):
        embed({"a": "MKV"}, **args)
    assert not os.listdir(tmp_path)


# ------------------------------------------------------------------------------ refusals
def test_a_changed_model_input_tokenizer_pooling_or_layers_is_refused_by_name(ckpt, tmp_path):
    recs = {"a": "MKTAYIAK", "b": "MKV"}
    out = tmp_path / "o.sqlite"
    embed(recs, model=ckpt, out=out, pooling=["mean", "max"], layers=[1, -1], progress=False)
    kw = dict(model=ckpt, out=out, pooling=["mean", "max"], layers=[1, -1], progress=False)

    def refused(match, records=recs, **changes):
        with pytest.raises(StoreMismatchError, match=match):
            embed(records, **{**kw, **changes})

    refused(r"pooling: store has 'mean,max', this run 'max,mean'", pooling=["max", "mean"])
    refused(r"layers: store has '\[1, 2\]', this run '\[2\]'", layers=[-1])
    refused(r"layers: store has '\[1, 2\]', this run '2'", layers=None)
    refused(r"model_weights_sha1", model=make_ckpt("esm2", tmp_path / "other", seed=7))
    refused(r"holds id 'a' with another sequence than this input's", records={"a": "MKTAYIAL", "b": "MKV"})
    refused(r"was made from another input: it has 2 record\(s\) .* this input 2 .* 0 id\(s\) not in the store, 0 of the store's not in this input, or the same ids in another order", records={"b": "MKV", "a": "MKTAYIAK"})
    refused(r"1 id\(s\) not in the store \(e\.g\. 'c'\), 1 of the store's not in this input", records={"a": "MKTAYIAK", "c": "MK"})
    assert len(open_store(out)) == 2  # nothing written by the refused runs
    s = embed({"a": "MKTAYIAK", "c": "MK"}, **kw, append=True)  # new ids join the store (a kept)
    assert (s.embedded, s.skipped) == (1, 1) and open_store(out).records() == ["a", "b", "c"]
    with pytest.raises(StoreMismatchError, match=r"holds id 'b' with another sequence"):  # append never mixes sequences
        embed({"b": "MKL"}, **kw, append=True)


def test_a_changed_tokenizer_is_refused(tmp_path):
    """Two tokenizers giving other ids for the same letters: another input to the model."""
    path = make_ckpt("ankh", tmp_path / "ankh")
    other = tmp_path / "tok2"
    ankh_tokenizer(order="ALGVSERTIDPKQNFYMHWCXBUZO").save_pretrained(other)  # A and L swapped
    out = tmp_path / "o.sqlite"
    embed({"a": "MKAL"}, model=path, out=out, progress=False)
    with pytest.raises(StoreMismatchError, match=r"input_format: store has 'ankh: residues </s>', this run 'hf: residues </s>'; tokenizer_sha1: store has"):
        embed({"a": "MKAL"}, model=path, out=out, tokenizer=str(other), progress=False)


def test_a_store_of_the_previous_format_is_read_but_not_resumed(ckpt, tmp_path):
    """anyattn.embed/1 stores (no input order, no layout) open for reading; a run refuses to add
    to them, naming the format."""
    import sqlite3

    out = tmp_path / "old.sqlite"
    embed({"a": "MKV", "b": "MK"}, model=ckpt, out=out, progress=False)
    con = sqlite3.connect(out)
    con.execute("UPDATE meta SET value = 'anyattn.embed/1' WHERE key = 'format'")
    con.execute("DELETE FROM meta WHERE key IN ('layout', 'input_records', 'input_sha1', 'input_format', 'tokenizer_sha1')")
    con.execute("DROP TABLE inputs")
    con.commit()
    con.close()
    with open_store(out) as st:
        assert sorted(st.ids()) == ["a", "b"] and sorted(st.records()) == ["a", "b"] and st.columns == []
    with pytest.raises(StoreMismatchError, match=r"format: store has 'anyattn\.embed/1' \(written by an older anyattn; open_store still reads it\)"):
        embed({"a": "MKV", "b": "MK"}, model=ckpt, out=out, progress=False)


# ------------------------------------------------------------------------------ command line
def test_cli_pooling_layers_shards_append(ckpt, tmp_path, capsys):
    recs = seqs(10, seed=8)
    fa = write_fasta(tmp_path / "in.fasta", recs)
    a, b = tmp_path / "a.sqlite", tmp_path / "b.sqlite"
    assert _cli(capsys, "embed", fa, "--model", ckpt, "--out", str(a), "--pooling", "mean", "median", "--layers", "all", "--no-progress")[0] == 0
    assert _cli(capsys, "embed", fa, "--model", ckpt, "--out", str(b), "--pooling", "mean,median", "--layers", "0", "1", "2", "--no-progress")[0] == 0
    with open_store(a) as sa, open_store(b) as sb:
        assert sa.metadata["pooling"] == "mean,median" and sa.layout["layers"] == [0, 1, 2]
        assert np.array_equal(sa.stack(), sb.stack()) and sa.stack().shape == (10, 3, 64)
    out = tmp_path / "s.safetensors"
    rc, err, stdout = _cli(capsys, "embed", fa, "--model", ckpt, "--out", str(out), "--shard-size", "1KB", "--no-progress")
    assert rc == 0 and "records" in stdout, err
    assert len(json.loads((tmp_path / "s.safetensors.index.json").read_text())["weight_map"]) == 10
    fa2 = write_fasta(tmp_path / "in2.fasta", {**recs, "new": "MKV"})
    rc, err, _ = _cli(capsys, "embed", fa2, "--model", ckpt, "--out", str(a), "--pooling", "mean", "median", "--layers", "all", "--no-progress")
    assert rc == 2 and len(err) == 1 and "--append" in err[0], err
    rc, err, _ = _cli(capsys, "embed", fa2, "--model", ckpt, "--out", str(a), "--pooling", "mean", "median", "--layers", "all", "--append", "--no-progress")
    assert rc == 0 and open_store(a).records()[-1] == "new"


@pytest.mark.parametrize(
    "argv, text",
    [
        (["--pooling", "avg"], "embed: error: pooling: expected one of"),
        (["--pooling", "mean", "none"], "pooling: expected 'none' (per-residue output) alone"),
        (["--layers", "last"], "--layers: expected integers (hidden-state indices, -1 = last) or 'all', got last"),
        (["--layers", "7"], "layers: expected None, 'all', an int or a list of ints in [-3, 2]"),
        (["--shard-size", "huge", "--out", "x.safetensors"], "shard_size: expected a size such as 2GB"),
        (["--tokenizer", "/nonexistent/tok"], "tokenizer: expected a tokenizer directory or hub id"),
    ],
)
def test_cli_bad_new_options_are_one_line_exit_2(ckpt, tmp_path, capsys, argv, text):
    fa = write_fasta(tmp_path / "in.fasta", {"a": "MKV"})
    out = ["--out", str(tmp_path / "o.sqlite")] if "--out" not in argv else []
    argv = [str(tmp_path / a) if a == "x.safetensors" else a for a in argv]
    rc, err, _ = _cli(capsys, "embed", fa, "--model", ckpt, *out, *argv, "--no-progress")
    assert rc == 2 and len(err) == 1 and text in err[0], err
    assert not (tmp_path / "o.sqlite").exists()


def test_progress_bar_on_a_terminal(ckpt, tmp_path, monkeypatch):
    """tqdm on a terminal: sequences, seq/s; plain log lines otherwise (tests/test_embed.py)."""
    pytest.importorskip("tqdm")

    class Tty(io.StringIO):
        def isatty(self):
            return True

    err = Tty()
    monkeypatch.setattr(sys, "stderr", err)
    embed(seqs(5, seed=1), model=ckpt, out=tmp_path / "o.sqlite", progress=True)
    text = err.getvalue()
    assert "embed: 100%" in text and "5/5" in text and "seq/s" in text


def test_embed_help_lists_the_poolers_and_the_new_options(capsys):
    rc, _, out = _cli(capsys, "embed", "--help")
    text = " ".join(out.split())
    assert rc == 0
    for word in ("mean, max, min, norm, median, std, var, cls, eos, none", "--layers", "'all'", "--tokenizer", "--shard-size", "--append"):
        assert word in text, word
