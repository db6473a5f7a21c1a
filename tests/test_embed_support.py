"""Builders shared by the embed tests (no tests here): tiny random checkpoints of every family the
embed job takes, written the way users get them (``save_pretrained`` directories with their
tokenizer files), and the reference each job result is compared with: the family's own public
forward on ONE sequence, tokenized by the family's own tokenizer, float32, eager attention.

    family   checkpoint                                         tokenizer files
    esm2     transformers EsmForMaskedLM.save_pretrained        (ESM alphabet, built in)
    dplm     EsmForMaskedLM weights + config dplm_type dplm_esm vocab.txt
    dplm2    EsmForMaskedLM weights + config dplm_type dplm2_esm vocab.txt (DPLM-2: aa + structure tokens)
    esmc     anyattn ESMCForMaskedLM.save_pretrained            (config.vocab_list)
    e1       anyattn E1ForMaskedLM.save_pretrained              vocab.json (E1Tokenizer.save_pretrained)
    ankh     anyattn AnkhModel.save_pretrained                  tokenizer.json (a word-level stand-in: one
                                                                token per residue, </s> appended, as ANKH's)
"""

from __future__ import annotations

import json
import os
import random
import sqlite3

import numpy as np
import pytest
import torch

AA = "ACDEFGHIKLMNPQRSTVWY"
SRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src")
FAMILIES = ("esm2", "dplm", "dplm2", "esmc", "e1", "ankh")
MAX_RESIDUES = {"esm2": 40, "dplm": 40, "dplm2": 40, "e1": 36, "esmc": None, "ankh": None}
_ESM_TOKENS = ("<cls>", "<pad>", "<eos>", "<unk>", *"LAGVSERTIDPKQNFYMHWCXBUZO.-", "<null_1>", "<mask>")
_DPLM2_AA = ("<cls_aa>", "<pad>", "<eos_aa>", "<unk_aa>", *"LAGVSERTIDPKQNFYMHWCXBUZO.-", "<null_1>", "<mask_aa>")
DPLM2_VOCAB = (*_DPLM2_AA, "<cls_struct>", "<eos_struct>", "<unk_struct>", *(f"{i:04d}" for i in range(16)), "<mask_struct>")


def seqs(n, seed, lo=1, hi=40, alphabet=AA):
    rng = random.Random(seed)
    return {f"s{i}": "".join(rng.choice(alphabet) for _ in range(rng.randint(lo, hi))) for i in range(n)}


def write_fasta(path, records, width=17):
    with open(path, "w") as f:
        for rid, s in (records.items() if isinstance(records, dict) else records):
            f.write(f">{rid} some description\n")
            f.writelines(s[j : j + width] + "\n" for j in range(0, len(s), width))
    return str(path)


def _perturb(model, seed):
    """Non-trivial norms and biases (a freshly initialised norm is all ones)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn(p.shape, generator=g))


def _esm_config(vocab_size, tie=True):
    import transformers

    return transformers.EsmConfig(
        vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=42, position_embedding_type="rotary", token_dropout=True, emb_layer_norm_before=False,
        pad_token_id=1, mask_token_id=32, layer_norm_eps=1e-5, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0, tie_word_embeddings=tie,
    )  # fmt: skip


def make_ckpt(family: str, path, seed: int = 0) -> str:
    """A tiny random checkpoint directory of ``family`` (see the module docstring)."""
    import transformers

    path = str(path)
    torch.manual_seed(seed)
    if family in ("esm2", "dplm", "dplm2"):
        V = len(DPLM2_VOCAB) if family == "dplm2" else 33
        hf = transformers.EsmForMaskedLM(_esm_config(V, tie=family != "dplm2")).eval()
        _perturb(hf, seed)
        hf.save_pretrained(path)
        if family != "esm2":
            with open(os.path.join(path, "config.json")) as f:
                cfg = json.load(f)
            kind = "dplm2_esm" if family == "dplm2" else "dplm_esm"
            cfg.update(dplm_type=kind, architectures=["EsmForDPLM2" if family == "dplm2" else "EsmForDPLM"])
            with open(os.path.join(path, "config.json"), "w") as f:
                json.dump(cfg, f)
            with open(os.path.join(path, "vocab.txt"), "w") as f:
                f.write("\n".join(DPLM2_VOCAB if family == "dplm2" else _ESM_TOKENS) + "\n")
    elif family == "esmc":
        from anyattn.models import ESMCConfig, ESMCForMaskedLM

        m = ESMCForMaskedLM(ESMCConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=48)).eval()
        _perturb(m, seed)
        m.save_pretrained(path)
    elif family == "e1":
        from anyattn.models.e1 import E1Config, E1ForMaskedLM, E1Tokenizer

        m = E1ForMaskedLM(E1Config(
            hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
            global_attention_every_n_layers=2, max_num_positions_within_seq=40,
        )).eval()  # fmt: skip
        _perturb(m, seed)
        m.save_pretrained(path)
        E1Tokenizer().save_pretrained(path)
    elif family == "ankh":
        from anyattn.models import AnkhConfig, AnkhModel

        m = AnkhModel(AnkhConfig(
            d_model=32, d_kv=16, num_heads=2, d_ff=40, num_layers=2, relative_attention_num_buckets=16,
            relative_attention_max_distance=20,
        )).eval()  # fmt: skip
        _perturb(m, seed)
        m.save_pretrained(path)
        ankh_tokenizer().save_pretrained(path)
    else:
        raise ValueError(family)
    return path


def ankh_tokenizer(order: str = "LAGVSERTIDPKQNFYMHWCXBUZO"):
    """A transformers tokenizer shaped like ANKH's: <pad> 0, </s> 1, <unk> 2, one token per residue
    (residues given as words), </s> appended; 144 tokens. ``order``: the residues' id order (a
    different order is another tokenizer)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    for c in order:
        vocab[c] = len(vocab)
    while len(vocab) < 144:
        vocab[f"<extra_id_{len(vocab)}>"] = len(vocab)
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tk.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="</s>", pad_token="<pad>", unk_token="<unk>")


def load_ref(path):
    import anyattn.models as am

    return am.load(str(path), attn_backend="eager")


# residue slice of one sequence's tokens, per family: (specials before, specials after)
SPECIALS = {"esm2": (1, 1), "dplm": (1, 1), "dplm2": (1, 1), "esmc": (1, 1), "e1": (2, 2), "ankh": (0, 1)}


@torch.inference_mode()
def alone(family: str, model, path, seq: str):
    """Every hidden state (L + 1 arrays (tokens, C), float64) of ``seq`` run ALONE through the
    family's public forward, tokenized by the family's own tokenizer."""
    import anyattn.models as am

    dev = next(model.parameters()).device
    if family == "ankh":
        from transformers import AutoTokenizer

        ids = torch.tensor([AutoTokenizer.from_pretrained(str(path))(list(seq), is_split_into_words=True)["input_ids"]])
        out = model(ids.to(dev), output_hidden_states=True)
    elif family == "e1":
        b = am.load_tokenizer(model).batch([seq])
        out = model(b["input_ids"].to(dev), b["attention_mask"].to(dev), output_hidden_states=True)
    elif family == "dplm2":
        out = model(am.load_tokenizer(model)([seq])["input_ids"].to(dev), output_hidden_states=True)
    else:
        tok = am.load_tokenizer(model)
        out = model(torch.tensor([tok.encode(seq)], device=dev), output_hidden_states=True)
    return [h[0].double().cpu().numpy() for h in out.hidden_states]


def residues(family: str, h):
    a, b = SPECIALS[family]
    return h[a : h.shape[0] - b]


def pool_ref(family: str, h, pooler: str):
    """The documented poolers, written independently of the job (numpy, float64)."""
    x = residues(family, h)
    return {
        "mean": lambda: x.mean(0), "max": lambda: x.max(0), "min": lambda: x.min(0),
        "norm": lambda: np.sqrt((x * x).sum(0)), "median": lambda: np.median(x, axis=0),
        "var": lambda: ((x - x.mean(0)) ** 2).mean(0), "std": lambda: np.sqrt(((x - x.mean(0)) ** 2).mean(0)),
        "cls": lambda: h[0], "eos": lambda: h[-1], "none": lambda: x,
    }[pooler]()  # fmt: skip


def rel_err(got, want) -> float:
    """max |got - want| / max(1, max |want|)."""
    got, want = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
    assert got.shape == want.shape, (got.shape, want.shape)
    return float(np.abs(got - want).max() / max(1.0, float(np.abs(want).max())))


def rows_of(path):
    """{id: array} of a store, and its integrity (SQLite: no duplicate rows, integrity_check ok)."""
    import sqlite3

    from anyattn.embed import open_store

    if str(path).endswith((".sqlite", ".db")):
        con = sqlite3.connect(str(path))
        n, distinct = con.execute("SELECT COUNT(*), COUNT(DISTINCT id) FROM embeddings").fetchone()
        assert n == distinct
        assert con.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        con.close()
    with open_store(path) as st:
        return {i: st.get(i) for i in st.ids()}, st.records()


def cli_env():
    return dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny tensors: one intra-op thread (on a shared CPU, spinning OpenMP threads made each
    layer norm ~100x slower). Autouse in every module that imports it."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def count_rows(path) -> int:
    """Rows committed to an SQLite store (0 while it does not exist or is locked): what a test
    that kills a job part-way polls."""
    try:
        con = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=0.2)
        try:
            return con.execute("SELECT COUNT(*) FROM embeddings").fetchone()[0]
        finally:
            con.close()
    except sqlite3.Error:
        return 0
