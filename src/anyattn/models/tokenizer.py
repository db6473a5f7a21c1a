"""Protein tokenizers: residue strings <-> token ids, padded or packed. Needs torch only.

    tok = ProteinTokenizer.esm()                        # ESM2's 33-token alphabet (HF EsmTokenizer order)
    tok.encode("MKV")                                   # [0, 20, 15, 7, 2]  = <cls> M K V <eos>
    batch = tok(["MKV", "MK"])                          # {"input_ids": (2, 5), "attention_mask": (2, 5)}, right padding
    ids_1T, info = tok.pack(["MKV", "MK"])              # (1, 9) packed row + SeqInfo.from_lengths([5, 4])

One token per residue character; special tokens written inside a sequence in angle brackets
(``"MK<mask>V"``) are read as that token (any multi-character token of the vocabulary,
longest match first). A character outside the vocabulary is an error naming
it and its position (``unknown="error"``), or becomes ``X`` (``unknown="x"``). No case folding:
``"mkv"`` is three unknown characters.

``save_pretrained(dir)`` writes ``vocab.txt`` and ``tokenizer_config.json`` that transformers'
``EsmTokenizer.from_pretrained(dir)`` reads, giving the same ids.
"""

from __future__ import annotations

import json
import os

import torch

from ..errors import bad_type, bad_value
from ..layout import SeqInfo

__all__ = ["ProteinTokenizer"]


def _read_text(file: str) -> str:
    """A UTF-8 text file (a BOM skipped); anything else is an error naming the file."""
    with open(file, "rb") as f:
        data = f.read()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise bad_value(os.path.basename(file), "UTF-8 text", f"{file}: byte 0x{data[e.start]:02X} at offset {e.start}") from None


def read_json(file: str):
    """A JSON file of a checkpoint or tokenizer directory; a damaged one is an error naming it."""
    try:
        return json.loads(_read_text(file))
    except json.JSONDecodeError as e:
        raise bad_value(os.path.basename(file), "valid JSON", f"{file}: {e}") from None

# HF EsmTokenizer / fair-esm order: id = index. 4 specials, 20 standard residues (by frequency),
# X B U Z O (ambiguous / rare), gap characters, a null slot and <mask>.
_ESM_VOCAB = (
    "<cls>", "<pad>", "<eos>", "<unk>",
    "L", "A", "G", "V", "S", "E", "R", "T", "I", "D", "P", "K", "Q", "N", "F", "Y", "M", "H", "W", "C",
    "X", "B", "U", "Z", "O", ".", "-", "<null_1>", "<mask>",
)  # fmt: skip

_SPECIAL_ROLES = ("cls", "pad", "eos", "unk", "mask")
_UNKNOWN_MODES = ("error", "x")


class ProteinTokenizer:
    """A character-level protein tokenizer over a fixed vocabulary.

    Attributes:
        vocab: tuple of tokens in id order (``vocab[i]`` is the token of id ``i``).
        token_to_id: dict token -> id.
        cls_token_id, pad_token_id, eos_token_id, unk_token_id, mask_token_id: ids of the specials.
        x_token_id: id of ``X`` (used by ``unknown="x"``), or None if the vocabulary has no ``X``.
    """

    def __init__(
        self,
        vocab,
        *,
        cls_token: str = "<cls>",
        pad_token: str = "<pad>",
        eos_token: str = "<eos>",
        unk_token: str = "<unk>",
        mask_token: str = "<mask>",
        model_max_length: int | None = None,
    ):
        if isinstance(vocab, (str, bytes)) or not all(isinstance(t, str) for t in vocab):
            raise bad_type("vocab", "a sequence of token strings in id order", repr(vocab)[:80])
        vocab = tuple(vocab)
        if len(set(vocab)) != len(vocab):
            dup = next(t for t in vocab if vocab.count(t) > 1)
            raise bad_value("vocab", "distinct tokens", f"{dup!r} more than once")
        if any(t == "" for t in vocab):
            raise bad_value("vocab", "non-empty tokens", f"an empty token at id {vocab.index('')}")
        self.vocab = vocab
        self.token_to_id = {t: i for i, t in enumerate(vocab)}
        self.special_tokens = {}
        for role, tok in zip(_SPECIAL_ROLES, (cls_token, pad_token, eos_token, unk_token, mask_token)):
            if tok not in self.token_to_id:
                raise bad_value(f"{role}_token", f"a token of the vocabulary ({len(vocab)} tokens)", repr(tok))
            self.special_tokens[role] = tok
            setattr(self, f"{role}_token", tok)
            setattr(self, f"{role}_token_id", self.token_to_id[tok])
        self.x_token_id = self.token_to_id.get("X")
        self.model_max_length = model_max_length
        # multi-character tokens ("<mask>", "<null_1>", ...) that may be written inside a sequence
        self._multi = sorted((t for t in vocab if len(t) > 1), key=len, reverse=True)
        self._multi_first = frozenset(t[0] for t in self._multi)
        self._special_ids = frozenset(self.token_to_id[t] for t in self.special_tokens.values())

    # ---------------------------------------------------------------- constructors
    @classmethod
    def esm(cls) -> ProteinTokenizer:
        """ESM2's alphabet: the 33 tokens of HF ``EsmTokenizer`` (facebook/esm2_*), same ids."""
        return cls(_ESM_VOCAB)

    @classmethod
    def from_vocab_file(cls, path, **special_tokens) -> ProteinTokenizer:
        """Read an HF ``vocab.txt`` (one token per line, id = line number). ``special_tokens``
        override the default names (``cls_token="<cls>"``, ...)."""
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise bad_value("path", "an existing vocab.txt file", repr(path))
        vocab = [line.strip() for line in _read_text(path).splitlines()]
        while vocab and vocab[-1] == "":  # trailing newline(s)
            vocab.pop()
        return cls(vocab, **special_tokens)

    @classmethod
    def from_pretrained(cls, directory) -> ProteinTokenizer:
        """Read a tokenizer directory: ``vocab.txt`` plus, when present, the special-token names
        and ``model_max_length`` of ``tokenizer_config.json``."""
        directory = os.fspath(directory)
        vocab_file = os.path.join(directory, "vocab.txt")
        if not os.path.isfile(vocab_file):
            raise bad_value("directory", "a directory containing vocab.txt", repr(directory))
        kwargs = {}
        cfg_file = os.path.join(directory, "tokenizer_config.json")
        if os.path.isfile(cfg_file):
            cfg = read_json(cfg_file)
            for role in _SPECIAL_ROLES:
                name = cfg.get(f"{role}_token")
                if isinstance(name, dict):  # AddedToken serialisation
                    name = name.get("content")
                if isinstance(name, str):
                    kwargs[f"{role}_token"] = name
            mml = cfg.get("model_max_length")
            if isinstance(mml, int) and mml < 10**9:  # HF writes a huge sentinel for "no limit"
                kwargs["model_max_length"] = mml
        return cls.from_vocab_file(vocab_file, **kwargs)

    def save_pretrained(self, directory) -> None:
        """Write ``vocab.txt`` and ``tokenizer_config.json`` (readable by transformers'
        ``EsmTokenizer`` and by :meth:`from_pretrained`)."""
        directory = os.fspath(directory)
        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, "vocab.txt"), "w", encoding="utf-8") as f:
            f.write("\n".join(self.vocab) + "\n")
        cfg = {"tokenizer_class": "EsmTokenizer"}
        cfg.update({f"{role}_token": tok for role, tok in self.special_tokens.items()})
        if self.model_max_length is not None:
            cfg["model_max_length"] = self.model_max_length
        with open(os.path.join(directory, "tokenizer_config.json"), "w", encoding="utf-8") as f:
            json.dump(cfg, f, indent=2)
            f.write("\n")

    # ---------------------------------------------------------------- encoding
    def __len__(self) -> int:
        return len(self.vocab)

    def __repr__(self) -> str:
        return f"ProteinTokenizer(vocab_size={len(self.vocab)}, specials={self.special_tokens})"

    def encode(self, seq: str, *, unknown: str = "error", add_special_tokens: bool = True) -> list[int]:
        """``<cls> residues <eos>`` as ids. ``unknown``: "error" (raise, naming the character and
        its 0-based position in ``seq``) or "x" (map it to ``X``)."""
        if not isinstance(seq, str):
            raise bad_type("seq", "a protein sequence string", type(seq).__name__)
        if unknown not in _UNKNOWN_MODES:
            raise bad_value("unknown", f"one of {list(_UNKNOWN_MODES)}", repr(unknown))
        if unknown == "x" and self.x_token_id is None:
            raise bad_value("unknown", "'error' (this vocabulary has no 'X' token)", "'x'")
        t2i = self.token_to_id
        ids = [self.cls_token_id] if add_special_tokens else []
        i, n = 0, len(seq)
        while i < n:
            c = seq[i]
            if c in self._multi_first:
                tok = next((t for t in self._multi if seq.startswith(t, i)), None)
                if tok is not None:
                    ids.append(t2i[tok])
                    i += len(tok)
                    continue
            tid = t2i.get(c)
            if tid is None:
                if unknown == "error":
                    raise bad_value(
                        "seq", "characters of the vocabulary (or unknown='x' to map them to X)", f"{c!r} at position {i}"
                    )
                tid = self.x_token_id
            ids.append(tid)
            i += 1
        if add_special_tokens:
            ids.append(self.eos_token_id)
        return ids

    def _encode_all(self, seqs, unknown: str) -> list[list[int]]:
        if isinstance(seqs, str):
            seqs = [seqs]
        if not isinstance(seqs, (list, tuple)) or not seqs:
            raise bad_type("seqs", "a non-empty list of sequence strings", repr(seqs)[:80])
        out = []
        for j, s in enumerate(seqs):
            try:
                out.append(self.encode(s, unknown=unknown))
            except ValueError as e:
                raise type(e)(f"{e} (sequence {j})") from None
        return out

    def __call__(self, seqs, *, padding: bool = True, return_tensors: str | None = "pt", unknown: str = "error") -> dict:
        """Encode a batch: ``{"input_ids", "attention_mask"}``, right padding with ``<pad>``.
        ``return_tensors="pt"`` gives (B, S) int64 tensors, ``None`` lists of lists (unpadded
        when ``padding=False``)."""
        if return_tensors not in ("pt", None):
            raise bad_value("return_tensors", "'pt' or None", repr(return_tensors))
        ids = self._encode_all(seqs, unknown)
        if not padding:
            if return_tensors is None:
                return {"input_ids": ids, "attention_mask": [[1] * len(r) for r in ids]}
            if len({len(r) for r in ids}) != 1:
                raise bad_value("padding", "True for sequences of different lengths with return_tensors='pt'", "False")
        S = max(len(r) for r in ids)
        input_ids = [r + [self.pad_token_id] * (S - len(r)) for r in ids]
        mask = [[1] * len(r) + [0] * (S - len(r)) for r in ids]
        if return_tensors is None:
            return {"input_ids": input_ids, "attention_mask": mask}
        return {"input_ids": torch.tensor(input_ids, dtype=torch.long), "attention_mask": torch.tensor(mask, dtype=torch.long)}

    def pack(self, seqs, *, unknown: str = "error", device=None) -> tuple[torch.Tensor, SeqInfo]:
        """Encode a batch as ONE packed row: ``(input_ids (1, T) int64, SeqInfo.from_lengths)``,
        each sequence ``<cls> residues <eos>`` back to back, no padding. Pass both to a model as
        ``model(input_ids, seq_info=info)``."""
        ids = self._encode_all(seqs, unknown)
        flat = [t for r in ids for t in r]
        input_ids = torch.tensor([flat], dtype=torch.long, device=device)
        return input_ids, SeqInfo.from_lengths([len(r) for r in ids], device=device)

    def decode(self, ids, *, skip_special_tokens: bool = True) -> str:
        """Ids -> string (tokens concatenated). With ``skip_special_tokens`` the specials
        (<cls>, <pad>, <eos>, <unk>, <mask>) are dropped."""
        if isinstance(ids, torch.Tensor):
            if ids.dim() > 1:
                raise bad_value("ids", "a 1-D sequence of ids (decode rows one at a time)", f"shape {tuple(ids.shape)}")
            ids = ids.tolist()
        out = []
        for i in ids:
            if not isinstance(i, int) or not 0 <= i < len(self.vocab):
                raise bad_value("ids", f"token ids in [0, {len(self.vocab)})", i)
            if skip_special_tokens and i in self._special_ids:
                continue
            out.append(self.vocab[i])
        return "".join(out)
