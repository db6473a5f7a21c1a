"""anyattn.models: the protein tokenizer, the light package import, loading and the Auto classes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from anyattn.layout import SeqInfo
from anyattn.models import ProteinTokenizer, load_tokenizer

ESM_ORDER = ("<cls> <pad> <eos> <unk> L A G V S E R T I D P K Q N F Y M H W C X B U Z O . - <null_1> <mask>").split()
SRC = os.path.join(os.path.dirname(__file__), "..", "src")


# ---------------------------------------------------------------- tokenizer
def test_esm_alphabet_is_hf_esm_tokenizer_order():
    tok = ProteinTokenizer.esm()
    assert tok.vocab == tuple(ESM_ORDER)
    assert (tok.cls_token_id, tok.pad_token_id, tok.eos_token_id, tok.unk_token_id, tok.mask_token_id) == (0, 1, 2, 3, 32)
    assert len(tok) == 33 and tok.x_token_id == 24


def test_encode_wraps_residues_in_cls_eos_and_reads_special_tokens():
    tok = ProteinTokenizer.esm()
    assert tok.encode("MKV") == [0, 20, 15, 7, 2]
    assert tok.encode("") == [0, 2]
    assert tok.encode("M<mask>K") == [0, 20, 32, 15, 2]
    assert tok.encode("MKV", add_special_tokens=False) == [20, 15, 7]


def test_encode_unknown_character_error_names_character_and_position():
    tok = ProteinTokenizer.esm()
    with pytest.raises(ValueError, match=r"'J' at position 2"):
        tok.encode("MKJV")
    with pytest.raises(ValueError, match=r"'m' at position 0"):  # no case folding
        tok.encode("mkv")
    with pytest.raises(ValueError, match=r"'<' at position 1"):  # '<' that starts no token
        tok.encode("M<K")
    assert tok.encode("MKJV", unknown="x") == [0, 20, 15, 24, 7, 2]
    with pytest.raises(ValueError, match="unknown: expected one of"):
        tok.encode("MKV", unknown="skip")


def test_batch_error_names_the_sequence():
    with pytest.raises(ValueError, match=r"'J' at position 0 \(sequence 1\)"):
        ProteinTokenizer.esm()(["MKV", "JK"])


def test_call_pads_right_with_attention_mask():
    tok = ProteinTokenizer.esm()
    out = tok(["MKV", "M"])
    assert out["input_ids"].tolist() == [[0, 20, 15, 7, 2], [0, 20, 2, 1, 1]]
    assert out["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]
    assert out["input_ids"].dtype == torch.long
    lists = tok(["MKV", "M"], padding=False, return_tensors=None)
    assert lists["input_ids"] == [[0, 20, 15, 7, 2], [0, 20, 2]]
    with pytest.raises(ValueError, match="padding"):
        tok(["MKV", "M"], padding=False)


def test_pack_gives_one_row_and_seqinfo_of_the_lengths():
    tok = ProteinTokenizer.esm()
    ids, info = tok.pack(["MKV", "M", ""])
    assert ids.shape == (1, 10) and ids.dtype == torch.long
    assert ids[0].tolist() == [0, 20, 15, 7, 2, 0, 20, 2, 0, 2]
    assert isinstance(info, SeqInfo) and info.kind == "documents"
    assert info.cu_seqlens.tolist() == [0, 5, 8, 10] and info.max_seqlen == 5


def test_decode_roundtrip_and_skips_specials():
    tok = ProteinTokenizer.esm()
    seq = "MKVLAGX.-"
    assert tok.decode(tok.encode(seq)) == seq
    assert tok.decode(torch.tensor(tok.encode("MK")), skip_special_tokens=False) == "<cls>MK<eos>"
    with pytest.raises(ValueError, match=r"ids: expected token ids in \[0, 33\)"):
        tok.decode([0, 99])


def test_save_pretrained_is_read_by_hf_esm_tokenizer_with_same_ids(tmp_path):
    transformers = pytest.importorskip("transformers")
    tok = ProteinTokenizer.esm()
    tok.save_pretrained(tmp_path)
    hf = transformers.EsmTokenizer.from_pretrained(str(tmp_path))
    assert hf.get_vocab() == tok.token_to_id
    for s in ["MKVLAGSERTIDPKQNFYMHWCXBUZO", "A", "", "MK<mask>V"]:
        assert hf(s)["input_ids"] == tok.encode(s)
    assert (hf.pad_token_id, hf.mask_token_id, hf.cls_token_id, hf.eos_token_id) == (1, 32, 0, 2)


def test_from_vocab_file_and_from_pretrained_roundtrip(tmp_path):
    tok = ProteinTokenizer.esm()
    tok.save_pretrained(tmp_path)
    assert ProteinTokenizer.from_vocab_file(tmp_path / "vocab.txt").vocab == tok.vocab
    assert load_tokenizer(str(tmp_path)).vocab == tok.vocab
    bad = tmp_path / "bad.txt"
    bad.write_text("A\nB\n")
    with pytest.raises(ValueError, match="cls_token: expected a token of the vocabulary"):
        ProteinTokenizer.from_vocab_file(bad)


def test_custom_special_token_names_survive_save(tmp_path):
    tok = ProteinTokenizer(["[CLS]", "[PAD]", "[SEP]", "[UNK]", "A", "C", "[MASK]"], cls_token="[CLS]", pad_token="[PAD]",
                           eos_token="[SEP]", unk_token="[UNK]", mask_token="[MASK]")  # fmt: skip
    assert tok.encode("AC[MASK]") == [0, 4, 5, 6, 2]
    with pytest.raises(ValueError, match="no 'X' token"):
        tok.encode("A", unknown="x")
    tok.save_pretrained(tmp_path)
    again = ProteinTokenizer.from_pretrained(tmp_path)
    assert again.special_tokens == tok.special_tokens
    assert json.loads((tmp_path / "tokenizer_config.json").read_text())["mask_token"] == "[MASK]"


# ---------------------------------------------------------------- import boundary
def test_import_anyattn_models_does_not_import_transformers():
    """anyattn.models.decoder and the tokenizer must work without transformers: the package
    import may not pull it in; the model classes load on first access."""
    code = (
        "import sys; import anyattn.models as m; assert 'transformers' not in sys.modules, 'eager import';"
        "t = m.ProteinTokenizer.esm(); assert t.encode('A') == [0, 5, 2]; print('ok')"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, "PYTHONPATH": SRC})
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr
