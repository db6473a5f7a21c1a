"""DPLM and DPLM-2 (ByteDance's diffusion protein language models) on anyattn.

Both are ESM2 networks (HF ``EsmForMaskedLM`` with rotary positions, q pre-scaled, attention
called with ``scale=1.0``); the checkpoints on the hub (``airkingbd/dplm_*``, ``airkingbd/dplm2_*``)
are HF-format directories whose ``config.json`` is an ``EsmConfig`` plus a ``dplm_type`` field.
Facts and sources: docs/dplm.md.

    dplm_type "dplm_esm"   (dplm_150m/650m/3b, and dplm2_3b)  -> DPLMForMaskedLM (ESM2, column positions)
    dplm_type "dplm2_esm"  (dplm2_150m/650m)                   -> DPLM2ForMaskedLM: two differences more

DPLM-2 input row (one protein, both tracks of equal length L + 2, each padded on its right to
the batch's longest track, then concatenated)::

    | <cls_struct> s_1 .. s_L <eos_struct> <pad>.. | <cls_aa> a_1 .. a_L <eos_aa> <pad>.. |
      rotary positions 0 1 .. (restart) ..         | 0 1 ..                               |
      <-------------------- h ---------------------><--------------- S - h --------------->

The two differences of ``dplm2_esm`` from ESM2 (what the official ``MultimodalDiffusionProtein-
LanguageModel.forward`` computes):

* rotary positions restart at column h = ceil(S / 2) when the row holds both amino-acid tokens
  (id < 33) and structure tokens (id >= 33); otherwise they are the column index 0..S-1;
* the embeddings go through ESM's token-dropout rescaling twice (the official wrapper embeds the
  tokens, then passes them as ``inputs_embeds`` together with ``input_ids`` to an ``EsmModel``
  that applies the rescaling again): with ``token_dropout`` the embedding of a real token is
  ``W[id] * ((1 - 0.12) / (1 - r))**2``, r = share of ``mask_token_id`` among the row's real tokens.

The official code decides "both modalities present" once for the whole batch; we decide per row
(a row's output does not depend on the other rows). Batches whose rows all have the same layout
give the official numbers; see docs/dplm.md.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re

import torch

from ..errors import bad_type, bad_value
from ..layout import SeqInfo
from .checkpoints import Family, read_weights, resolve_saved_backend
from .tokenizer import ProteinTokenizer

# The model classes subclass ESM2ForMaskedLM (a transformers PreTrainedModel): they are built on
# first access (module __getattr__), so that detection, key mapping and the tokenizers import
# with torch only (anyattn.models.load runs every family's detector on every config).

__all__ = [
    "DPLMForMaskedLM",
    "DPLM2ForMaskedLM",
    "DPLM2Tokenizer",
    "DPLM_FAMILY",
    "DPLM_TYPES",
    "dplm2_positions",
    "dplm_config_to_esm2",
    "is_dplm_config",
    "is_dplm2_config",
    "load_dplm",
    "load_dplm_tokenizer",
    "map_dplm_keys",
]

# dplm_type (config.json) -> what it means here. "dplm2_bit_esm" (DPLM-2 Bit: a bit-wise
# structure head) is a different network and is refused by load_dplm.
DPLM_TYPES = {
    "dplm_esm": "EsmForDPLM: HF EsmForMaskedLM unchanged (DPLM; also the published dplm2_3b)",
    "dplm2_esm": "EsmForDPLM2: modality-restarted rotary positions, embeddings rescaled twice, untied LM head",
}
_ARCHITECTURES = {"EsmForDPLM": "dplm_esm", "EsmForDPLM2": "dplm2_esm", "EsmForDPLM2Bit": "dplm2_bit_esm"}

# The official code's modality rule (DPLM-2 get_modality_type): ids below 33 (the ESM alphabet)
# are amino-acid tokens, ids from 33 on are structure tokens (including <cls_struct> etc.).
NUM_AA_TOKENS = 33
_MASK_RATIO_TRAIN = 0.15 * 0.8  # ESM's token-dropout constant (also in esm2.py)


# ---------------------------------------------------------------------------------------------
# config


def _dplm_type(config_dict: dict) -> str | None:
    if not isinstance(config_dict, dict):
        return None
    t = config_dict.get("dplm_type")
    if isinstance(t, str):
        return t
    for arch in config_dict.get("architectures") or ():
        if arch in _ARCHITECTURES:
            return _ARCHITECTURES[arch]
    return None


def is_dplm_config(config_dict: dict) -> bool:
    """True for the ``config.json`` of any DPLM-family checkpoint (DPLM or DPLM-2): it carries
    ``dplm_type`` or names an ``EsmForDPLM*`` architecture. ``load_dplm`` refuses the variants it
    does not implement (``dplm2_bit_esm``) with a message naming them."""
    return _dplm_type(config_dict) is not None


def is_dplm2_config(config_dict: dict) -> bool:
    """True for a DPLM-2 checkpoint: ``dplm_type`` ``dplm2_*``, or a DPLM network over DPLM-2's
    amino-acid + structure vocabulary (more than 33 tokens; the published dplm2_3b is such a one)."""
    t = _dplm_type(config_dict)
    if t is None:
        return False
    return t.startswith("dplm2") or int(config_dict.get("vocab_size") or 0) > NUM_AA_TOKENS


def dplm_config_to_esm2(config_dict: dict, **overrides):
    """The ``ESM2Config`` of a DPLM / DPLM-2 ``config.json`` (an ``EsmConfig`` dict with
    ``dplm_type``), keeping ``dplm_type`` (saved with the model). ``dplm2_esm`` never ties the LM
    head to the embeddings (``EsmForDPLM2`` sets ``tie_word_embeddings=False`` whatever the file
    says)."""
    from .esm2 import ESM2Config

    if not isinstance(config_dict, dict):
        raise bad_type("config_dict", "the dict of a DPLM config.json", type(config_dict).__name__)
    t = _dplm_type(config_dict)
    if t not in DPLM_TYPES:
        raise bad_value("config_dict['dplm_type']", f"one of {sorted(DPLM_TYPES)}", repr(t))
    if t == "dplm2_esm":
        overrides.setdefault("tie_word_embeddings", False)
    overrides.setdefault("dplm_type", t)
    return ESM2Config.from_hf_config(config_dict, **overrides)


# ---------------------------------------------------------------------------------------------
# checkpoint keys

# HF EsmForMaskedLM names that DPLM / DPLM-2 checkpoints hold (transformers 4.x and 5.x spellings);
# load_hf_state_dict then checks completeness and shapes against the model.
_L = r"esm\.encoder\.layer\.(\d+|\*)\."  # "*": how transformers 5.x saves a buffer shared by every layer
_KNOWN = re.compile(
    "|".join(
        (
            r"esm\.embeddings\.word_embeddings\.weight",
            r"esm\.embeddings\.position_ids",
            _L + r"attention\.self\.(query|key|value)\.(weight|bias)",
            _L + r"attention\.self\.rotary_embeddings\.inv_freq",
            _L + r"attention\.output\.dense\.(weight|bias)",
            _L + r"attention\.LayerNorm\.(weight|bias|gamma|beta)",
            _L + r"intermediate\.dense\.(weight|bias)",
            _L + r"output\.dense\.(weight|bias)",
            _L + r"LayerNorm\.(weight|bias|gamma|beta)",
            r"esm\.encoder\.emb_layer_norm_after\.(weight|bias|gamma|beta)",
            r"esm\.rotary_embeddings\.inv_freq",
            r"esm\.contact_head\.regression\.(weight|bias)",
            r"lm_head\.dense\.(weight|bias)",
            r"lm_head\.layer_norm\.(weight|bias|gamma|beta)",
            r"lm_head\.decoder\.weight",
            r"lm_head\.bias",
        )
    )
)
# Wrappers the original code saves around the network: the Lightning checkpoint of a training
# run holds "model.net.<HF name>" (byprot get_net strips 10 characters), the
# DiffusionProteinLanguageModel / MultimodalDiffusionProteinLanguageModel module "net.<HF name>".
# Hub checkpoints (net.save_pretrained) hold the HF names themselves.
_PREFIXES = ("model.net.", "net.")


def map_dplm_keys(state_dict: dict) -> dict:
    """DPLM / DPLM-2 checkpoint keys -> HF ``EsmForMaskedLM`` names (what ``ESM2ForMaskedLM``
    loads). Strips one wrapper prefix (``model.net.`` or ``net.``, the same on every key) and
    refuses keys that are not part of the network, listing them."""
    if not isinstance(state_dict, dict):
        raise bad_type("state_dict", "a dict of name -> tensor", type(state_dict).__name__)
    if not state_dict:
        raise bad_value("state_dict", "a non-empty checkpoint", "no keys")
    keys = list(state_dict)
    prefix = next((p for p in _PREFIXES if all(k.startswith(p) for k in keys)), "")
    if not prefix:
        mixed = sorted(k for k in keys if k.startswith(_PREFIXES))
        if mixed:
            raise bad_value(
                "state_dict", f"one wrapper prefix ({' or '.join(_PREFIXES)}) on every key, or none",
                f"{len(mixed)} of {len(keys)} keys prefixed, e.g. {mixed[:5]}",
            )  # fmt: skip
    out = {k[len(prefix) :]: v for k, v in state_dict.items()}
    unknown = sorted(k for k in out if not _KNOWN.fullmatch(k))
    if unknown:
        raise bad_value(
            "state_dict", "the keys of a DPLM/DPLM-2 network (HF EsmForMaskedLM names, optionally under net. or model.net.)",
            f"{len(unknown)} unknown key(s): {unknown}",
        )  # fmt: skip
    return out


# ---------------------------------------------------------------------------------------------
# DPLM-2 network


def dplm2_positions(input_ids: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
    """Rotary positions (B, S) int64 of DPLM-2 rows: column j of a row holding both amino-acid
    (id < 33) and structure (id >= 33) real tokens sits at ``j`` for ``j < h`` and ``j - h``
    after, h = ceil(S / 2); other rows at ``j``. ``keep`` (B, S) marks real tokens (default:
    every token)."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        got = f"shape {tuple(input_ids.shape)}" if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
        raise bad_value("input_ids", "a (B, S) integer tensor", got)
    if keep is None:
        keep = torch.ones_like(input_ids, dtype=torch.bool)
    B, S = input_ids.shape
    is_aa = (input_ids < NUM_AA_TOKENS) & keep
    is_struct = (input_ids >= NUM_AA_TOKENS) & keep
    two_tracks_B = is_aa.any(-1) & is_struct.any(-1)
    col = torch.arange(S, device=input_ids.device)
    h = (S + 1) // 2  # the official code chunks the row in two (torch.chunk: the first half is the longer)
    split = torch.where(col < h, col, col - h)
    return torch.where(two_tracks_B[:, None], split, col).to(torch.int64)


_CLASSES: dict = {}


def _model_classes() -> dict:
    """{"DPLMForMaskedLM": ..., "DPLM2ForMaskedLM": ...}, built once (needs transformers)."""
    if _CLASSES:
        return _CLASSES
    from .esm2 import ESM2ForMaskedLM, _mask_ratio

    class DPLMForMaskedLM(ESM2ForMaskedLM):
        """DPLM (``dplm_type`` ``"dplm_esm"``): ESM2 called the way ``EsmForDPLM.forward`` calls
        HF's ``EsmModel``: the attention mask is ``input_ids != pad_token_id`` unless
        ``attention_mask`` is given, and the rotary position of a token is its column
        (transformers' ``RotaryEmbedding``), also where padding sits inside a row (DPLM-2 rows).
        With right padding this is exactly ``ESM2ForMaskedLM``. ``seq_info`` (packed documents)
        is passed through: positions restart per document, as in ESM2."""

        def _positions(self, input_ids, keep):
            return None  # the column index (what HF's RotaryEmbedding uses)

        def forward(self, input_ids=None, attention_mask=None, *, seq_info=None, **kwargs):
            if seq_info is not None:
                return super().forward(input_ids, attention_mask, seq_info=seq_info, **kwargs)
            if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.dtype.is_floating_point:
                if not isinstance(input_ids, torch.Tensor):
                    got = type(input_ids).__name__
                else:
                    got = f"shape {tuple(input_ids.shape)}" if input_ids.dim() != 2 else f"dtype {input_ids.dtype}"
                raise bad_value("input_ids", "a (B, S) integer tensor", got)
            if attention_mask is None:
                keep = input_ids != self.config.pad_token_id
            else:
                if not isinstance(attention_mask, torch.Tensor) or attention_mask.shape != input_ids.shape:
                    got = tuple(attention_mask.shape) if isinstance(attention_mask, torch.Tensor) else type(attention_mask).__name__
                    raise bad_value("attention_mask", f"a tensor of shape {tuple(input_ids.shape)} like input_ids", got)
                keep = attention_mask.to(input_ids.device) != 0
            info = SeqInfo.from_padding_mask(keep)  # one host read (the row lengths)
            positions = self._positions(input_ids, keep)
            if positions is None and info.total == info.B * info.S:
                return super().forward(input_ids, **kwargs)  # no padding: dense rows, columns = positions
            if positions is None:
                B, S = input_ids.shape
                positions = torch.arange(S, device=input_ids.device).expand(B, S)
            info = dataclasses.replace(info, positions=positions.to(torch.int64))
            return super().forward(input_ids, seq_info=info, **kwargs)

    class DPLM2ForMaskedLM(DPLMForMaskedLM):
        """DPLM-2 (``dplm_type`` ``"dplm2_esm"``): :class:`DPLMForMaskedLM` with modality-restarted
        rotary positions (:func:`dplm2_positions`) and the double token-dropout rescaling of the
        official forward (module docstring). ``attention_mask`` defaults to ``input_ids !=
        pad_token_id``, what the official model always uses (padding sits in the middle of a
        two-track row). Packed documents (``seq_info``) are not supported."""

        def __init__(self, config):
            super().__init__(config)
            if config.token_dropout:
                self.esm.embeddings.register_forward_hook(self._second_token_dropout, with_kwargs=True)

        def _second_token_dropout(self, module, args, kwargs, x):
            # The official wrapper's second pass through EsmEmbeddings: the <mask> rows are already
            # zero; the rescaling is applied again, per protein (a padded row, or a document when
            # the padded batch runs packed), over its real tokens.
            ids = args[0] if args else kwargs["input_ids_BS"]
            info = args[1] if len(args) > 1 else kwargs.get("info")
            cfg = self.config
            is_mask = ids == cfg.mask_token_id
            ratio = _mask_ratio(is_mask, info, None if info is not None else (ids != cfg.pad_token_id).sum(-1))
            return (x * (1 - _MASK_RATIO_TRAIN) / (1 - ratio)).to(x.dtype)

        def _positions(self, input_ids, keep):
            return dplm2_positions(input_ids, keep)

        def predict_contacts(self, input_ids, attention_mask=None):
            # ESM2Model.predict_contacts runs the encoder without the modality positions, and the
            # official EsmForDPLM2 sets contact_head = None: refuse rather than return other numbers.
            raise NotImplementedError(
                "DPLM2ForMaskedLM.predict_contacts: not available (the official EsmForDPLM2 has no contact "
                "prediction; use DPLM's, or the attentions of model(..., output_attentions=True))"
            )

        def forward(self, input_ids=None, attention_mask=None, *, seq_info=None, **kwargs):
            if seq_info is not None:
                raise bad_value(
                    "seq_info", "None (DPLM-2 takes padded two-track rows; pass attention_mask or nothing)",
                    type(seq_info).__name__,
                )  # fmt: skip
            return super().forward(input_ids, attention_mask, **kwargs)

    for cls in (DPLMForMaskedLM, DPLM2ForMaskedLM):
        cls.__module__, cls.__qualname__ = __name__, cls.__name__
        _CLASSES[cls.__name__] = cls
        globals()[cls.__name__] = cls
    return _CLASSES


def __getattr__(name: str):
    if name in ("DPLMForMaskedLM", "DPLM2ForMaskedLM"):
        return _model_classes()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ---------------------------------------------------------------------------------------------
# tokenizers


class DPLM2Tokenizer:
    """DPLM-2's vocabulary: amino-acid tokens (ESM's 33 ids, specials ``<cls_aa>`` ``<pad>``
    ``<eos_aa>`` ``<unk_aa>`` ... ``<mask_aa>``) and structure tokens (``<cls_struct>``
    ``<eos_struct>`` ``<unk_struct>`` ``<mask_struct>`` and the codes ``"0000"`` .. ``"8191"`` of
    the structure tokenizer), ids read from the checkpoint's ``vocab.txt``.

    ``tok(seqs)`` encodes amino-acid-only rows ``<cls_aa> seq <eos_aa>``; ``tok(seqs, structs)``
    two-track rows (module docstring): ``structs[b]`` is a list of structure codes (ints), a
    string of codes (``"0042,0100"`` or ``"42 100"``), or None for a fully masked structure track
    (``<mask_struct>`` x L, what folding starts from). Each track is padded on its right to the
    batch's longest track, as the official collater does.

    ``vocab_size``: the model's embedding rows; a token whose id does not fit is refused when
    encoded (the published vocab.txt may list more ids than the table holds: docs/dplm.md).
    """

    AA_SPECIALS = ("<cls_aa>", "<eos_aa>", "<unk_aa>", "<mask_aa>")
    STRUCT_SPECIALS = ("<cls_struct>", "<eos_struct>", "<unk_struct>", "<mask_struct>")

    def __init__(self, vocab, *, vocab_size: int | None = None):
        if isinstance(vocab, (str, bytes)) or not all(isinstance(t, str) for t in vocab):
            raise bad_type("vocab", "a sequence of token strings in id order", repr(vocab)[:80])
        self.vocab = tuple(vocab)
        # as the official DPLM2Tokenizer: id = line number; a token listed twice keeps its last id
        self.token_to_id = {t: i for i, t in enumerate(self.vocab)}
        missing = [t for t in ("<pad>", *self.AA_SPECIALS, *self.STRUCT_SPECIALS) if t not in self.token_to_id]
        if missing:
            raise bad_value("vocab", "a DPLM-2 vocabulary (amino-acid and structure specials)", f"missing {missing}")
        self.codes = sorted(int(t) for t in self.token_to_id if len(t) == 4 and t.isdigit())
        if not self.codes or self.codes != list(range(len(self.codes))):
            raise bad_value("vocab", "structure codes '0000'..'NNNN' without gaps", f"{len(self.codes)} four-digit tokens")
        self.vocab_size = vocab_size
        self.pad_token_id = self.token_to_id["<pad>"]
        for t in (*self.AA_SPECIALS, *self.STRUCT_SPECIALS):
            setattr(self, t.strip("<>") + "_id", self.token_to_id[t])  # cls_aa_id, mask_struct_id, ...
        shadowed = {i for i, t in enumerate(self.vocab) if self.token_to_id[t] != i}
        self._aa = ProteinTokenizer(  # amino-acid track; listed-twice tokens renamed at their dead id
            [f"<unused_{i}>" if i in shadowed else t for i, t in enumerate(self.vocab)],
            cls_token="<cls_aa>", eos_token="<eos_aa>", unk_token="<unk_aa>", mask_token="<mask_aa>",
        )  # fmt: skip

    @classmethod
    def from_pretrained(cls, directory, *, vocab_size: int | None = None) -> DPLM2Tokenizer:
        """From a checkpoint directory: its ``vocab.txt`` and, for ``vocab_size``, its
        ``config.json`` when present."""
        directory = os.fspath(directory)
        path = os.path.join(directory, "vocab.txt")
        if not os.path.isfile(path):
            raise bad_value("directory", "a DPLM-2 checkpoint directory containing vocab.txt", repr(directory))
        with open(path, encoding="utf-8") as f:
            vocab = [line.strip() for line in f.read().splitlines()]
        while vocab and vocab[-1] == "":
            vocab.pop()
        if vocab_size is None and os.path.isfile(os.path.join(directory, "config.json")):
            with open(os.path.join(directory, "config.json")) as f:
                vocab_size = json.load(f).get("vocab_size")
        return cls(vocab, vocab_size=vocab_size)

    def __len__(self) -> int:
        return len(self.vocab)

    def __repr__(self) -> str:
        return f"DPLM2Tokenizer(tokens={len(self.vocab)}, structure_codes={len(self.codes)}, vocab_size={self.vocab_size})"

    def _check_ids(self, ids: list[int], what: str) -> list[int]:
        if self.vocab_size is not None:
            bad = sorted({i for i in ids if i >= self.vocab_size})
            if bad:
                raise bad_value(
                    what, f"tokens whose ids fit the model's {self.vocab_size} embedding rows",
                    f"{[self.vocab[i] for i in bad]} with id(s) {bad}",
                )  # fmt: skip
        return ids

    def encode_aa(self, seq: str, *, unknown: str = "error") -> list[int]:
        """``<cls_aa> residues <eos_aa>``; special tokens may be written inside (``"MK<mask_aa>V"``)."""
        return self._check_ids(self._aa.encode(seq, unknown=unknown), "seq")

    def encode_struct(self, codes, length: int | None = None) -> list[int]:
        """``<cls_struct> codes <eos_struct>``. ``codes``: ints, a string of codes separated by
        commas or spaces, or None for ``<mask_struct>`` x ``length``."""
        if codes is None:
            if length is None:
                raise bad_value("length", "the track length for a masked structure track", None)
            body = [self.mask_struct_id] * length
        else:
            if isinstance(codes, str):
                parts = [p for p in re.split(r"[\s,]+", codes.strip()) if p]
                if not all(p.isdigit() for p in parts):
                    raise bad_value("structs", "structure codes as digits separated by commas or spaces", repr(codes[:40]))
                codes = [int(p) for p in parts]
            if isinstance(codes, torch.Tensor):
                codes = codes.tolist()
            if not isinstance(codes, (list, tuple)) or not all(isinstance(c, int) and not isinstance(c, bool) for c in codes):
                raise bad_type("structs", "a list of int structure codes, a string of codes or None", type(codes).__name__)
            bad = [c for c in codes if not 0 <= c < len(self.codes)]
            if bad:
                raise bad_value("structs", f"structure codes in [0, {len(self.codes)})", bad[:5])
            body = [self.token_to_id[f"{c:04d}"] for c in codes]
        return self._check_ids([self.cls_struct_id, *body, self.eos_struct_id], "structs")

    def __call__(self, seqs, structs=None, *, unknown: str = "error") -> dict:
        """``{"input_ids": (B, S) int64, "attention_mask": (B, S) int64}``; see the class docstring."""
        if isinstance(seqs, str):
            seqs = [seqs]
        if not isinstance(seqs, (list, tuple)) or not seqs:
            raise bad_type("seqs", "a non-empty list of amino-acid sequence strings", repr(seqs)[:80])
        aa = [self.encode_aa(s, unknown=unknown) for s in seqs]
        if structs is None:
            rows = [aa]
        else:
            if isinstance(structs, str) or not isinstance(structs, (list, tuple)) or len(structs) != len(seqs):
                raise bad_value("structs", f"a list of {len(seqs)} structure tracks (one per sequence)", repr(structs)[:80])
            st = [self.encode_struct(c, length=len(a) - 2) for c, a in zip(structs, aa)]
            for b, (s, a) in enumerate(zip(st, aa)):
                if len(s) != len(a):
                    raise bad_value(
                        f"structs[{b}]", f"{len(a) - 2} structure codes (one per residue of seqs[{b}])", f"{len(s) - 2}"
                    )
            rows = [st, aa]  # structure track first, as the official model
        ids, mask = [[] for _ in seqs], [[] for _ in seqs]
        for track in rows:
            M = max(len(t) for t in track)
            for b, t in enumerate(track):
                ids[b] += t + [self.pad_token_id] * (M - len(t))
                mask[b] += [1] * len(t) + [0] * (M - len(t))
        return {"input_ids": torch.tensor(ids, dtype=torch.long), "attention_mask": torch.tensor(mask, dtype=torch.long)}

    def decode(self, ids) -> tuple[str, list[int]]:
        """(amino-acid string, structure codes) of one row; special tokens and padding dropped."""
        if isinstance(ids, torch.Tensor):
            if ids.dim() != 1:
                raise bad_value("ids", "a 1-D sequence of ids (decode rows one at a time)", f"shape {tuple(ids.shape)}")
            ids = ids.tolist()
        aa, codes = [], []
        specials = {self.pad_token_id, *(self.token_to_id[t] for t in (*self.AA_SPECIALS, *self.STRUCT_SPECIALS))}
        for i in ids:
            if not isinstance(i, int) or not 0 <= i < len(self.vocab):
                raise bad_value("ids", f"token ids in [0, {len(self.vocab)})", i)
            if i in specials:
                continue
            t = self.vocab[i]
            if i >= NUM_AA_TOKENS and len(t) == 4 and t.isdigit():
                codes.append(int(t))
            else:
                aa.append(t)
        return "".join(aa), codes


def load_dplm_tokenizer(path):
    """The tokenizer of a DPLM / DPLM-2 checkpoint directory (or hub id, or a model returned by
    :func:`load_dplm`, which remembers its directory): a :class:`~anyattn.models.ProteinTokenizer`
    (ESM alphabet, from ``vocab.txt`` when present) for DPLM, a :class:`DPLM2Tokenizer` for DPLM-2
    vocabularies."""
    config = getattr(path, "config", None)
    if config is not None and not isinstance(path, (str, os.PathLike)):
        src = getattr(config, "_name_or_path", "") or ""
        if not src or not os.path.isdir(src):
            raise bad_value("path", "a model loaded by load_dplm (its config names its directory)", f"_name_or_path {src!r}")
        path = src
    path = _resolve(path, what="path")
    cfg = _read_config(path)
    if is_dplm2_config(cfg):
        return DPLM2Tokenizer.from_pretrained(path)
    if os.path.isfile(os.path.join(path, "vocab.txt")):
        return ProteinTokenizer.from_pretrained(path)
    return ProteinTokenizer.esm()


# ---------------------------------------------------------------------------------------------
# loading


def _resolve(path, *, what: str) -> str:
    if not isinstance(path, (str, os.PathLike)):
        raise bad_type(what, "a checkpoint directory or a hub id", type(path).__name__)
    path = os.fspath(path)
    if os.path.isdir(path):
        return path
    if os.path.exists(path):
        raise bad_value(what, "a checkpoint directory (config.json + weights) or a hub id", repr(path))
    from .checkpoints import download

    return download(path)


def _read_config(path: str) -> dict:
    f = os.path.join(path, "config.json")
    if not os.path.isfile(f):
        raise bad_value("path", "a checkpoint directory containing config.json", repr(path))
    with open(f) as fh:
        return json.load(fh)


def _build(path: str, cfg_dict: dict, attn_backend, dtype, device):
    t = _dplm_type(cfg_dict)
    if t is None:
        raise bad_value(
            "path", "a DPLM/DPLM-2 checkpoint (config.json with dplm_type)",
            f"config.json with model_type {cfg_dict.get('model_type')!r}, architectures {cfg_dict.get('architectures')}",
        )  # fmt: skip
    if t not in DPLM_TYPES:
        raise bad_value("config.json dplm_type", f"one of {sorted(DPLM_TYPES)} (implemented)", repr(t))
    from .esm2 import load_hf_state_dict

    cfg = dplm_config_to_esm2(cfg_dict, attn_backend=attn_backend)
    cls = _model_classes()["DPLM2ForMaskedLM" if t == "dplm2_esm" else "DPLMForMaskedLM"]
    sd = map_dplm_keys(read_weights(path))
    with torch.device("meta"):  # no random initialisation: every weight comes from the checkpoint
        model = cls(cfg)
    load_hf_state_dict(model, sd)
    model.config._name_or_path = path  # where the tokenizer files are (HF's convention)
    model.eval()
    model.to(device=device if device is not None else "cpu", dtype=dtype if dtype is not None else torch.float32)
    return model


def load_dplm(path, *, attn_backend=None, dtype=None, device=None):
    """A DPLM or DPLM-2 checkpoint (local HF-format directory or hub id) as an anyattn model, in
    eval mode, float32 unless ``dtype`` is given: :class:`DPLMForMaskedLM` for ``dplm_type``
    ``"dplm_esm"``, :class:`DPLM2ForMaskedLM` for ``"dplm2_esm"``. Every checkpoint key is mapped
    (:func:`map_dplm_keys`) and checked against the model: unknown, missing or mis-shaped keys
    raise, listing them."""
    path = _resolve(path, what="path")
    config = _read_config(path)
    return _build(path, config, resolve_saved_backend(config, attn_backend), dtype, device)


def _family_loader(path, config, attn_backend, dtype, device):
    return _build(path, config, attn_backend, dtype, device)


# For anyattn.models.load: hub.register_family(DPLM_FAMILY) (before "esm2": DPLM configs say
# model_type "esm" too). Detection reads the config dict only.
DPLM_FAMILY = Family("dplm", is_dplm_config, _family_loader)
