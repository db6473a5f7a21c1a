"""Resume after ``kill -9``, bit for bit, across the embed job's new outputs (CPU).

Each case runs ``python -m anyattn embed ...`` in a subprocess, SIGKILLs it at seeded random
points (once while it starts up, then after a random number of committed rows), re-runs the same
command until it completes, and compares the result with an uninterrupted run of the same job
(in this process, one thread, as the subprocesses): every row bitwise equal (``np.array_equal``,
same dtype), the same records in the same order, and for safetensors exports every file
byte-for-byte equal. A kill during the export (between shards) is covered too.

Cases: E1 with several poolers, two layers and sequences split by the long policy into an .npz;
DPLM-2 per-residue vectors into sharded safetensors (with duplicate records). ESM2 (SQLite, several
poolers and layers) is tests/test_embed.py::test_sigkill_at_random_points_then_resume_equals_uninterrupted.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from anyattn.embed import embed, open_store  # noqa: E402

from .test_embed_support import cli_env, count_rows, make_ckpt, one_thread, seqs, write_fasta  # noqa: E402, F401 (one_thread: an autouse fixture)






def _kill_and_resume(cmd, work, n_rows, seed, kills=2):
    """Run ``cmd``, SIGKILL it ``kills`` times (first while it starts, then after a random number of
    new rows in ``work``), then run it to the end. Returns the row counts seen after each kill."""
    rng = random.Random(seed)
    env = cli_env()
    killed, counts = 0, []
    for attempt in range(kills):
        before = count_rows(work)
        p = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        if attempt == 0:
            time.sleep(rng.uniform(0.0, 1.5))  # importing, loading the model, reading the input
        else:
            target = before + rng.randint(5, max(6, n_rows // 3))
            t_end = time.time() + 120
            while p.poll() is None and count_rows(work) < target and time.time() < t_end:
                time.sleep(0.01)
        if p.poll() is None:
            p.send_signal(signal.SIGKILL)
            killed += 1
        p.wait()
        p.stderr.close()
        counts.append(count_rows(work))
    assert killed == kills, f"the job finished before it could be killed: {counts}"
    assert 0 < counts[-1] < n_rows, counts  # the last run resumed a partly written store
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    return counts


def _same_rows(got_path, want_path):
    with open_store(got_path) as got, open_store(want_path) as want:
        assert got.records() == want.records() and got.ids() == want.ids()
        assert {k: v for k, v in got.metadata.items() if k != "model_source"} == {
            k: v for k, v in want.metadata.items() if k != "model_source"
        }
        for i in want.ids():
            a, b = got[i], want[i]
            assert a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b), i


def test_e1_poolers_layers_split_npz_killed_and_resumed_equals_uninterrupted(tmp_path):
    ckpt = make_ckpt("e1", tmp_path / "e1")
    recs = seqs(260, seed=31, hi=50)  # E1 takes 36 residues: longer ones are split in two
    fa = write_fasta(tmp_path / "in.fasta", recs)
    args = dict(pooling=["mean", "median", "std"], layers=[1, -1], max_tokens=60, long_policy="split")
    ref = tmp_path / "ref" / "emb.npz"
    ref.parent.mkdir()
    embed(fa, model=ckpt, out=ref, progress=False, **args)
    out = tmp_path / "run" / "emb.npz"
    out.parent.mkdir()
    cmd = [sys.executable, "-m", "anyattn", "embed", fa, "--model", ckpt, "--out", str(out), "--pooling", "mean", "median",
           "std", "--layers", "1", "-1", "--max-tokens", "60", "--long-policy", "split", "--no-progress"]  # fmt: skip
    _kill_and_resume(cmd, str(out) + ".work.sqlite", len(recs), seed=5)
    assert not os.path.exists(str(out) + ".work.sqlite")
    _same_rows(out, ref)


def test_dplm2_per_residue_sharded_safetensors_killed_and_resumed_is_byte_identical(tmp_path):
    ckpt = make_ckpt("dplm2", tmp_path / "dplm2")
    recs = list(seqs(240, seed=32).items())
    recs += [recs[10], ("again", recs[20][1])]  # an id twice, a sequence under a second id
    fa = write_fasta(tmp_path / "in.fasta", recs)
    ref = tmp_path / "ref" / "emb.safetensors"
    ref.parent.mkdir()
    embed(fa, model=ckpt, out=ref, pooling="none", shard_size="64KB", max_tokens=80, progress=False)
    out = tmp_path / "run" / "emb.safetensors"
    out.parent.mkdir()
    cmd = [sys.executable, "-m", "anyattn", "embed", fa, "--model", ckpt, "--out", str(out), "--pooling", "none",
           "--shard-size", "64KB", "--max-tokens", "80", "--no-progress"]  # fmt: skip
    _kill_and_resume(cmd, str(out) + ".work.sqlite", 241, seed=6)
    want = sorted(os.listdir(ref.parent))
    assert sorted(os.listdir(out.parent)) == want and len(want) > 3  # the shards and the index, nothing else
    for name in want:
        assert (out.parent / name).read_bytes() == (ref.parent / name).read_bytes(), name
    _same_rows(out, ref)


def test_killed_during_the_export_between_shards_then_resumed_is_byte_identical(tmp_path):
    """SIGKILL after the first shard is in place, before the index: the work store is complete,
    the next run writes every shard again (removing the killed export's temporary file) and the
    index last; the result equals an export that was never interrupted."""
    ckpt = make_ckpt("esm2", tmp_path / "esm2")
    recs = seqs(60, seed=33)
    fa = write_fasta(tmp_path / "in.fasta", recs)
    ref = tmp_path / "ref" / "emb.safetensors"
    ref.parent.mkdir()
    embed(fa, model=ckpt, out=ref, pooling=["mean", "max"], shard_size="4KB", progress=False)
    out = tmp_path / "run" / "emb.safetensors"
    out.parent.mkdir()
    argv = ["embed", fa, "--model", ckpt, "--out", str(out), "--pooling", "mean", "max", "--shard-size", "4KB", "--no-progress"]
    slow = (
        "import sys, time\n"
        "import anyattn.embed.exports as s\n"
        "orig = s._write_safetensors\n"
        "def slow(*a, **k):\n"
        "    orig(*a, **k)\n"
        "    time.sleep(0.3)\n"
        "s._write_safetensors = slow\n"
        "from anyattn.cli import main\n"
        f"sys.exit(main({argv!r}))\n"
    )
    p = subprocess.Popen([sys.executable, "-c", slow], env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    first = out.parent / "emb-00001-of-"
    t_end = time.time() + 180
    while p.poll() is None and time.time() < t_end and not any(f.startswith(first.name) and f.endswith(".safetensors") for f in os.listdir(out.parent)):
        time.sleep(0.005)
    assert p.poll() is None, p.stderr.read().decode()[-2000:]
    p.send_signal(signal.SIGKILL)
    p.wait()
    p.stderr.close()
    left = os.listdir(out.parent)
    assert "emb.safetensors.index.json" not in left and "emb.safetensors.work.sqlite" in left
    r = subprocess.run([sys.executable, "-m", "anyattn", *argv], env=cli_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    want = sorted(os.listdir(ref.parent))
    assert sorted(os.listdir(out.parent)) == want
    for name in want:
        assert (out.parent / name).read_bytes() == (ref.parent / name).read_bytes(), name
