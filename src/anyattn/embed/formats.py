"""What each model family takes as one sequence: the token layout the embed job builds.

Every family's rows are ``prefix residues suffix``, one token per residue; the job packs them
back to back into one row with a ``SeqInfo`` (no padding compute) and reads the residues' hidden
states between the specials::

    family         one sequence "MKV" becomes                 cls pooler   eos pooler   max residues
    ESM2, DPLM     <cls> M K V <eos>                           <cls>        <eos>        max_position_embeddings - 2
    ESM C / ESM++  <cls> M K V <eos>   (ESM C's ids)           <cls>        <eos>        none (rotary)
    DPLM-2         <cls_aa> M K V <eos_aa>  (amino-acid track) <cls_aa>     <eos_aa>     max_position_embeddings - 2
    E1             <bos> 1 M K V 2 <eos>  (no context)         <bos>        <eos>        max_num_positions_within_seq - 4
    ANKH           M K V </s>  (its tokenizer, one per residue) refused     </s>         none (relative buckets)

An :class:`InputFormat` is plain data (token ids), so worker processes and the store's identity
use it without the tokenizer object. ``input_format(model, source, tokenizer)`` derives it from the
model's own tokenizer (anyattn's ESM/ESM C, E1 and DPLM-2 tokenizers), or, for ANKH (whose
sentencepiece tokenizer anyattn does not ship) and an explicit ``tokenizer=``, from a transformers
tokenizer by encoding each letter alone and the whole alphabet (refused unless that gives exactly
one token per residue).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field

from ..errors import bad_type, bad_value

__all__ = ["InputFormat", "input_format"]

# the letters a protein FASTA may hold; a family's alphabet is the subset its tokenizer has
_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


@dataclass(frozen=True)
class InputFormat:
    """One sequence as ``prefix + [residue ids] + suffix`` (token ids)."""

    family: str  # "esm2" | "dplm" | "dplm2" | "esmc" | "e1" | "ankh" | "hf" (an explicit tokenizer)
    prefix: tuple  # token ids before the residues
    suffix: tuple  # token ids after the residues
    prefix_names: tuple  # their token strings (messages, docs)
    suffix_names: tuple
    residues: tuple  # ((letter, id), ...) sorted by letter
    pad_id: int  # fills rows padded to a fixed length (--compile); never attended
    max_residues: int | None  # None: the model has no length limit
    _lut: object = field(default=None, repr=False, compare=False)

    @property
    def alphabet(self) -> frozenset:
        return frozenset(c for c, _ in self.residues)

    @property
    def specials(self) -> int:
        """Tokens per sequence besides its residues."""
        return len(self.prefix) + len(self.suffix)

    @property
    def layout(self) -> str:
        """E.g. ``"<cls> residues <eos>"``."""
        return " ".join([*self.prefix_names, "residues", *self.suffix_names])

    def describe(self) -> str:
        return f"{self.family}: {self.layout}"

    def sha1(self) -> str:
        """Identity of the token ids (a store refuses a run whose tokenizer gives other ids)."""
        data = {"prefix": list(self.prefix), "suffix": list(self.suffix), "residues": [list(r) for r in self.residues]}
        return hashlib.sha1(json.dumps(data, sort_keys=True).encode()).hexdigest()

    def lut(self):
        """A 256-entry byte -> token id table of the residue letters (-1 elsewhere)."""
        lut = self._lut
        if lut is None:
            from .store import _np

            np = _np()
            lut = np.full(256, -1, dtype=np.int64)
            for c, i in self.residues:
                lut[ord(c)] = i
            object.__setattr__(self, "_lut", lut)
        return lut

    def check_vocab(self, vocab_size) -> None:
        """Every id must index the model's embedding table."""
        if not isinstance(vocab_size, int):
            return
        ids = [*self.prefix, *self.suffix, *(i for _, i in self.residues)]
        bad = sorted({i for i in ids if not 0 <= i < vocab_size})
        if bad:
            raise bad_value(
                "tokenizer", f"token ids below the model's vocab_size {vocab_size}", f"{self.family} ids {bad[:5]}"
            )

    def __reduce__(self):  # workers get the data, not the cached table
        return (InputFormat, (self.family, self.prefix, self.suffix, self.prefix_names, self.suffix_names,
                              self.residues, self.pad_id, self.max_residues))  # fmt: skip


def _letters_of(token_to_id: dict, limit: int | None = None) -> tuple:
    """((letter, id), ...) for the one-letter upper-case tokens A-Z (ids below ``limit``)."""
    return tuple(sorted((t, i) for t, i in token_to_id.items() if len(t) == 1 and t in _LETTERS and (limit is None or i < limit)))


def _cfg(model):
    from .model import _config

    return _config(model)


def input_format(model, source, tokenizer=None) -> InputFormat:
    """The input format of ``model`` (loaded from ``source``, a directory / hub id, or None for an
    object). ``tokenizer``: None (the model's own), or a directory / hub id / transformers
    tokenizer (its one-token-per-residue encoding is derived; needed for ANKH checkpoints without
    tokenizer files)."""
    cfg = _cfg(model)
    mt = str(getattr(cfg, "model_type", "") or "")
    vocab_size = getattr(cfg, "vocab_size", None)
    if tokenizer is not None:
        fmt = _from_hf(_hf_tokenizer(tokenizer, "tokenizer"), "hf", None)
        fmt = InputFormat(**{**_fields(fmt), "max_residues": _max_residues(model, cfg, fmt.specials)})
    elif mt == "anyattn_e1":
        fmt = _e1(model, cfg)
    elif mt == "anyattn_ankh":
        fmt = _ankh(model, source, cfg)
    elif type(model).__name__ == "DPLM2ForMaskedLM":
        fmt = _dplm2(model, cfg)
    else:
        fmt = _esm(model, source, cfg)
    fmt.check_vocab(vocab_size)
    if not fmt.residues:
        raise bad_value("tokenizer", "a tokenizer with one-letter residue tokens", f"{fmt.family}: no residue letters")
    return fmt


def _fields(fmt: InputFormat) -> dict:
    return {k: getattr(fmt, k) for k in ("family", "prefix", "suffix", "prefix_names", "suffix_names", "residues", "pad_id", "max_residues")}


def _max_residues(model, cfg, specials: int):
    mt = str(getattr(cfg, "model_type", "") or "")
    if mt == "anyattn_e1":
        return int(cfg.max_num_positions_within_seq) - specials
    mpe = getattr(cfg, "max_position_embeddings", None)
    return int(mpe) - specials if isinstance(mpe, int) else None


def _esm(model, source, cfg) -> InputFormat:
    """ESM2, DPLM (ESM alphabet or the checkpoint's vocab.txt) and ESM C (its vocab_list)."""
    from ..models import ProteinTokenizer
    from .model import _tokenizer

    try:
        tok = _tokenizer(model, source)
    except ValueError as e:  # no tokenizer for this model: say what the job takes
        raise bad_value(
            "model", "a model of a family the embed job knows (ESM2, DPLM, DPLM-2, ESM C, E1, ANKH), or tokenizer=",
            f"{type(model).__name__} ({e})",
        ) from None
    if not isinstance(tok, ProteinTokenizer):
        raise bad_value(
            "model", "a model of a family the embed job knows (ESM2, DPLM, DPLM-2, ESM C, E1, ANKH)",
            f"{type(model).__name__}, whose tokenizer is {type(tok).__name__}",
        )  # fmt: skip
    mt = str(getattr(cfg, "model_type", "") or "")
    family = "esmc" if mt == "anyattn_esmc" else "dplm" if type(model).__name__ == "DPLMForMaskedLM" else "esm2"
    return InputFormat(
        family, (tok.cls_token_id,), (tok.eos_token_id,), (tok.cls_token,), (tok.eos_token,),
        _letters_of(tok.token_to_id), tok.pad_token_id, _max_residues(model, cfg, 2),
    )  # fmt: skip


def _dplm2(model, cfg) -> InputFormat:
    """DPLM-2: the amino-acid track alone (``<cls_aa> residues <eos_aa>``); the model then uses
    column positions and one modality, as the official model does for sequence-only rows."""
    from ..models import load_tokenizer
    from ..models.dplm import NUM_AA_TOKENS

    tok = load_tokenizer(model)
    return InputFormat(
        "dplm2", (tok.cls_aa_id,), (tok.eos_aa_id,), ("<cls_aa>",), ("<eos_aa>",),
        _letters_of(tok.token_to_id, NUM_AA_TOKENS), tok.pad_token_id, _max_residues(model, cfg, 2),
    )  # fmt: skip


def _e1(model, cfg) -> InputFormat:
    """E1: one sequence per sample, no context: ``<bos> 1 residues 2 <eos>``."""
    from ..models import load_tokenizer

    tok = load_tokenizer(model)  # warns when the checkpoint has no tokenizer file (an unverified id order)
    v = tok.vocab
    return InputFormat(
        "e1", (v["<bos>"], v["1"]), (v["2"], v["<eos>"]), ("<bos>", "1"), ("2", "<eos>"),
        _letters_of(v), tok.pad_token_id, _max_residues(model, cfg, 4),
    )  # fmt: skip


def _ankh(model, source, cfg) -> InputFormat:
    """ANKH: its checkpoint's own tokenizer (tokenizer.json / spiece.model), read by transformers."""
    where = os.fspath(source) if isinstance(source, (str, os.PathLike)) and os.path.isdir(os.fspath(source)) else None
    if where is None:
        src = getattr(cfg, "_name_or_path", "") or ""
        where = src if src and os.path.isdir(src) else None
    files = ("tokenizer.json", "spiece.model", "tokenizer_config.json")
    if where is None or not any(os.path.isfile(os.path.join(where, f)) for f in files):
        raise bad_value(
            "tokenizer", "ANKH's tokenizer: its files (tokenizer.json or spiece.model) in the model directory, or "
            "tokenizer=DIR_OR_HUB_ID (--tokenizer), e.g. ElnaggarLab/ankh-base",
            f"no tokenizer files in {where!r}" if where else f"{type(model).__name__} without a checkpoint directory",
        )  # fmt: skip
    return _from_hf(_hf_tokenizer(where, "model"), "ankh", None)


def _hf_tokenizer(tok, name: str):
    """A transformers tokenizer from an object, a directory or a hub id."""
    if isinstance(tok, (str, os.PathLike)):
        try:
            from transformers import AutoTokenizer
        except ImportError as e:
            raise ImportError("anyattn embed: reading a tokenizer directory needs transformers: pip install 'anyattn[embed]'") from e
        try:
            return AutoTokenizer.from_pretrained(os.fspath(tok))
        except (OSError, ValueError) as e:
            raise bad_value(name, "a tokenizer directory or hub id transformers' AutoTokenizer reads", f"{os.fspath(tok)!r}: {str(e).splitlines()[0][:200]}") from None
    if not callable(tok) or not hasattr(tok, "convert_ids_to_tokens"):
        raise bad_type(name, "None, a tokenizer directory / hub id, or a transformers tokenizer", type(tok).__name__)
    return tok


def _from_hf(tok, family: str, max_residues) -> InputFormat:
    """Derive the format from a transformers tokenizer: each letter alone must give one token
    (not <unk>), and the whole alphabet as words must give exactly those tokens between the
    specials the tokenizer adds to one residue."""

    def enc(words, special):
        return list(tok(words, is_split_into_words=True, add_special_tokens=special)["input_ids"])

    unk = getattr(tok, "unk_token_id", None)
    residues = {}
    for c in _LETTERS:
        ids = enc([c], False)
        if len(ids) == 1 and ids[0] != unk:
            residues[c] = ids[0]
    if not residues:
        raise bad_value("tokenizer", "a tokenizer with one token per residue letter", f"{type(tok).__name__}: none of A-Z is one token")
    c0 = next(iter(residues))
    full = enc([c0], True)
    i = full.index(residues[c0]) if residues[c0] in full else -1
    if i < 0:
        raise bad_value("tokenizer", "a tokenizer that keeps a residue's token when it adds its special tokens", f"{full}")
    prefix, suffix = tuple(full[:i]), tuple(full[i + 1 :])
    letters = sorted(residues)
    got = enc(letters, True)
    want = [*prefix, *(residues[c] for c in letters), *suffix]
    if got != want:
        raise bad_value(
            "tokenizer", "one token per residue (each letter a word, as ANKH's own usage)",
            f"{type(tok).__name__} encodes {''.join(letters)!r} as {len(got)} tokens, not {len(want)}",
        )  # fmt: skip
    names = tok.convert_ids_to_tokens
    pad = getattr(tok, "pad_token_id", None)
    return InputFormat(
        family, prefix, suffix, tuple(names(list(prefix))), tuple(names(list(suffix))),
        tuple(sorted(residues.items())), int(pad if pad is not None else 0), max_residues,
    )  # fmt: skip
