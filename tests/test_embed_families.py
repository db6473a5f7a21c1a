"""anyattn embed over every model family (CPU, float32): ESM2, DPLM, DPLM-2, ESM C, E1, ANKH.

Each family's tiny random checkpoint is written as users get it (``save_pretrained`` plus its
tokenizer files, tests/test_embed_support.py). The job packs many sequences per batch with the
family's own input format; the reference for every stored number is the family's public forward
on that ONE sequence, tokenized by the family's own tokenizer, with eager attention: every pooler,
several layers, and the per-residue vectors (max relative difference <= 1e-5).

E1 and DPLM-2 were refused by the job before (E1's samples are ``<bos> 1 residues 2 <eos>``,
DPLM-2's rows two tracks); ANKH has no start token, so ``cls`` is refused for it by name.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from anyattn.embed import embed, open_store  # noqa: E402
from anyattn.embed.formats import input_format  # noqa: E402
from anyattn.embed.run import _batch_tokens  # noqa: E402

from .test_embed_support import FAMILIES, MAX_RESIDUES, alone, load_ref, make_ckpt, one_thread, pool_ref, rel_err, residues, seqs  # noqa: E402, F401 (one_thread: an autouse fixture)

TOL = 1e-5
FORMATS = {
    "esm2": "esm2: <cls> residues <eos>",
    "dplm": "dplm: <cls> residues <eos>",
    "dplm2": "dplm2: <cls_aa> residues <eos_aa>",
    "esmc": "esmc: <cls> residues <eos>",
    "e1": "e1: <bos> 1 residues 2 <eos>",
    "ankh": "ankh: residues </s>",
}




@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    return {f: make_ckpt(f, tmp_path_factory.mktemp(f"{f}_tiny"), seed=i) for i, f in enumerate(FAMILIES)}


@pytest.fixture(scope="module")
def refs(ckpts):
    return {f: load_ref(p) for f, p in ckpts.items()}


def _records(family):
    hi = MAX_RESIDUES[family] or 60  # the families without a length limit get longer rows too
    recs = seqs(14, seed=3, hi=hi)
    recs["one"] = "W"  # a single residue: median = the value, var = std = 0
    recs["two"] = "MK"  # even n: the median is the mean of the two middle values
    return recs


@pytest.mark.parametrize("family", FAMILIES)
def test_every_pooler_and_layer_equals_each_sequence_alone(family, ckpts, refs, tmp_path):
    """Every pooler at once (concatenated), three hidden states (embeddings, a middle layer by a
    negative index, the last): each column block, found through the stored column metadata,
    equals the pooler applied to that sequence's hidden states run alone."""
    poolers = ["mean", "max", "min", "norm", "median", "std", "var", "eos"] + (["cls"] if family != "ankh" else [])
    recs = _records(family)
    out = tmp_path / "o.sqlite"
    s = embed(recs, model=ckpts[family], out=out, pooling=poolers, layers=[0, -2, -1], max_tokens=120, progress=False)
    assert s.embedded == len(recs) and s.batches > 1  # several sequences per batch, several batches
    L = refs[family].config.num_hidden_layers
    with open_store(out) as st:
        assert st.metadata["input_format"] == FORMATS[family]
        assert st.layout["axes"] == ["layer", "column"] and st.layout["layers"] == [0, L - 1, L]
        cols = st.columns
        C = refs[family].config.hidden_size
        assert [(c.layer, c.pooler) for c in cols] == [(layer, p) for layer in (0, L - 1, L) for p in poolers]
        assert all(c.stop - c.start == C for c in cols)
        worst = 0.0
        for i, seq in recs.items():
            row = st[i]
            assert row.shape == (3, len(poolers) * C) and row.dtype == np.float32
            hs = alone(family, refs[family], ckpts[family], seq)
            flat = row.reshape(-1)
            for c in cols:
                worst = max(worst, rel_err(flat[c.start : c.stop], pool_ref(family, hs[c.layer], c.pooler)))
    assert worst <= TOL, f"{family}: {worst:.3g}"


@pytest.mark.parametrize("family", FAMILIES)
def test_per_residue_vectors_equal_each_sequence_alone(family, ckpts, refs, tmp_path):
    """pooling="none": (n, C) per sequence, the residues only (the family's special tokens
    dropped), equal to the residues' rows of the sequence run alone; with a layer list (L, n, C)."""
    recs = _records(family)
    out = tmp_path / "o.sqlite"
    embed(recs, model=ckpts[family], out=out, pooling="none", max_tokens=120, progress=False)
    out2 = tmp_path / "o2.sqlite"
    embed(recs, model=ckpts[family], out=out2, pooling="none", layers=[1, -1], max_tokens=120, progress=False)
    worst = 0.0
    with open_store(out) as st, open_store(out2) as st2:
        assert st.layout["axes"] == ["residue", "channel"] and st.columns == []
        for i, seq in recs.items():
            hs = alone(family, refs[family], ckpts[family], seq)
            assert st[i].shape == (len(seq), hs[-1].shape[1])
            worst = max(worst, rel_err(st[i], residues(family, hs[-1])))
            assert st2[i].shape == (2, len(seq), hs[-1].shape[1])
            worst = max(worst, rel_err(st2[i][0], residues(family, hs[1])), rel_err(st2[i][1], residues(family, hs[-1])))
    assert worst <= TOL, f"{family}: {worst:.3g}"


@pytest.mark.parametrize("family", FAMILIES)
def test_job_tokens_equal_the_family_tokenizer(family, ckpts, refs):
    """The job's table-driven tokenizing (every sequence of a batch at once) gives, per sequence,
    exactly the ids of the family's own tokenizer."""
    import anyattn.models as am

    model = refs[family]
    fmt = input_format(model, ckpts[family])
    recs = list(seqs(12, seed=9, hi=30, alphabet="ACDEFGHIKLMNPQRSTVWYXBUZO" if family != "e1" else "ACDEFGHIKLMNPQRSTVWYX").values())
    toks, lengths = _batch_tokens(fmt, [(0, 0, r) for r in recs])
    got = np.split(toks, np.cumsum(lengths)[:-1])
    for seq, g in zip(recs, got):
        if family == "ankh":
            from transformers import AutoTokenizer

            want = AutoTokenizer.from_pretrained(ckpts[family])(list(seq), is_split_into_words=True)["input_ids"]
        elif family == "e1":
            want = am.load_tokenizer(model).encode(seq)["input_ids"]
        elif family == "dplm2":
            want = am.load_tokenizer(model).encode_aa(seq)
        else:
            want = am.load_tokenizer(model).encode(seq)
        assert g.tolist() == list(want), (family, seq)


def test_ankh_has_no_start_token_for_cls(ckpts, tmp_path):
    with pytest.raises(ValueError, match=r"pooling: expected poolers of tokens this family has: ankh: residues </s> has no start token for 'cls'"):
        embed({"a": "MKV"}, model=ckpts["ankh"], out=tmp_path / "o.sqlite", pooling=["mean", "cls"], progress=False)
    assert not (tmp_path / "o.sqlite").exists()


def test_ankh_without_tokenizer_files_is_refused_naming_the_option(ckpts, tmp_path):
    """ANKH's sentencepiece tokenizer is not shipped with anyattn: a checkpoint directory without
    its tokenizer files is refused naming --tokenizer; given explicitly, it is used."""
    import shutil

    bare = tmp_path / "ankh_bare"
    shutil.copytree(ckpts["ankh"], bare)
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (bare / f).exists():
            (bare / f).unlink()
    with pytest.raises(ValueError, match=r"tokenizer: expected ANKH's tokenizer: its files .* or tokenizer=DIR_OR_HUB_ID \(--tokenizer\)"):
        embed({"a": "MKV"}, model=str(bare), out=tmp_path / "o.sqlite", progress=False)
    embed({"a": "MKV"}, model=str(bare), out=tmp_path / "o.sqlite", tokenizer=ckpts["ankh"], progress=False)
    with open_store(tmp_path / "o.sqlite") as st:
        assert st.metadata["input_format"] == "hf: residues </s>" and st["a"].shape == (32,)


def test_a_tokenizer_that_splits_residues_is_refused(ckpts, tmp_path):
    """A tokenizer that does not give one token per residue (here: a BPE-like merge of 'MK')
    would shift every residue vector: refused, naming what it did."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, "A": 3}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", unk_token="<unk>")
    tok.add_tokens(["B"])  # B: one token; every other letter is <unk>
    s = embed({"a": "ABAB"}, model=ckpts["ankh"], out=tmp_path / "o.sqlite", tokenizer=tok, progress=False)
    assert s.embedded == 1
    with pytest.raises(ValueError, match=r"in the model's alphabet"):  # M is not a residue of this tokenizer
        embed({"b": "MKV"}, model=ckpts["ankh"], out=tmp_path / "o2.sqlite", tokenizer=tok, progress=False)
    bad = ankh_like_merging_tokenizer()
    with pytest.raises(ValueError, match=r"tokenizer: expected one token per residue"):
        embed({"a": "MKV"}, model=ckpts["ankh"], out=tmp_path / "o3.sqlite", tokenizer=bad, progress=False)


def ankh_like_merging_tokenizer():
    """Encodes each letter alone as one token but the alphabet as a whole differently: words are
    joined before the model splits them (a whitespace-free pre-tokenizer over the joined text)."""

    class Joining:
        unk_token_id, pad_token_id = 2, 0

        def __call__(self, words, is_split_into_words=True, add_special_tokens=True):
            text = "".join(words)
            ids = [3 + ord(c) - 65 for c in text[:1]] + [3 + ord(c) - 65 for c in text[2:]]  # drops the second
            return {"input_ids": ids + ([1] if add_special_tokens else [])}

        def convert_ids_to_tokens(self, ids):
            return [str(i) for i in ids]

    return Joining()


def test_e1_sequences_longer_than_its_maximum_follow_the_long_policy(ckpts, refs, tmp_path):
    """E1's maximum is max_num_positions_within_seq - 4 (<bos> 1 ... 2 <eos>): 36 here."""
    long = seqs(1, seed=11, lo=50, hi=50)["s0"]
    with pytest.raises(ValueError, match=r"has 50 residues; the model takes at most 36 \(its maximum length minus <bos> 1 and 2 <eos>\)"):
        embed({"x": long}, model=ckpts["e1"], out=tmp_path / "o.sqlite", progress=False)
    embed({"x": long}, model=ckpts["e1"], out=tmp_path / "t.sqlite", long_policy="truncate", pooling="none", progress=False)
    with open_store(tmp_path / "t.sqlite") as st:
        want = residues("e1", alone("e1", refs["e1"], ckpts["e1"], long[:36])[-1])
        assert rel_err(st["x"], want) <= TOL


def test_metadata_names_the_input_format_and_tokenizer(ckpts, tmp_path):
    embed({"a": "MKV"}, model=ckpts["dplm2"], out=tmp_path / "o.sqlite", progress=False)
    with open_store(tmp_path / "o.sqlite") as st:
        m = st.metadata
        assert m["input_format"] == FORMATS["dplm2"] and len(m["tokenizer_sha1"]) == 40
        assert json.loads(m["layout"])["poolers"] == ["mean"]
