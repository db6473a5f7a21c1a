"""E1's tokenizer (alphabet, multi-sequence context format) and config detection.

No transformers import here: ``is_e1_config`` is what ``anyattn.models.load()`` calls to pick the
family from a config.json dict, and the tokenizer needs only torch and anyattn.SeqInfo. The model
classes live in :mod:`anyattn.models.e1` (which re-exports these names).
"""

from __future__ import annotations

import json
import os

import torch

from ..errors import bad_type, bad_value
from ..layout import SeqInfo

__all__ = ["E1Tokenizer", "E1_DEFAULT_VOCAB", "is_e1_config"]

MODEL_TYPE = "anyattn_e1"
_ORIGINAL_MODEL_TYPES = ("E1", "e1")  # Profluent-Bio/E1-* config.json: "E1" (older uploads: "e1")


def is_e1_config(config: dict) -> bool:
    """True for an original E1 config.json (``model_type`` "E1"/"e1", or ours, "anyattn_e1"), or one
    without ``model_type`` that has E1's distinctive fields."""
    if not isinstance(config, dict):
        return False
    mt = config.get("model_type")
    if mt in _ORIGINAL_MODEL_TYPES or mt == MODEL_TYPE:
        return True
    return mt is None and {"rope_theta_within_seq", "rope_theta_global", "global_attention_every_n_layers"} <= set(config)


# Ids 0, 1, 2 (<pad>, <bos>, <eos>) are the checkpoints' config.json pad/bos/eos_token_id; the
# symbols "1", "2" (sequence start/end markers), "?" (mask) and the 26 letters A-Z come from the
# original batch preparer; vocab_size is 34. The order of ids 3..33 below is NOT the released
# tokenizer.json's (not found): with real weights, build the tokenizer from the checkpoint's
# tokenizer.json (E1Tokenizer.from_pretrained(dir)).
E1_DEFAULT_VOCAB: dict[str, int] = {
    tok: i
    for i, tok in enumerate(["<pad>", "<bos>", "<eos>", "<unk>", "1", "2", "?", *"ABCDEFGHIJKLMNOPQRSTUVWXYZ", "<mask>"])
}


class E1Tokenizer:
    """E1's alphabet and multi-sequence context format.

    One sequence ``SEQ`` -> ``<bos> 1 S E Q 2 <eos>``. A sample = context sequences then the query,
    concatenated; as a string, comma-separated with the query last (the original's format:
    ``"CTX1,CTX2,QUERY"``). Residues: letters A-Z and ``?`` (the mask token).
    """

    def __init__(self, vocab: dict[str, int] | None = None):
        vocab = dict(E1_DEFAULT_VOCAB if vocab is None else vocab)
        need = ["<pad>", "<bos>", "<eos>", "1", "2", "?"]
        absent = [t for t in need if t not in vocab]
        if absent:
            raise bad_value("vocab", f"a vocabulary holding {need} and the letters", f"one without {absent}")
        self.vocab = vocab
        self.ids_to_tokens = {i: t for t, i in vocab.items()}
        self.pad_token_id, self.bos_token_id, self.eos_token_id = vocab["<pad>"], vocab["<bos>"], vocab["<eos>"]
        self.mask_token_id = vocab["?"]

    @classmethod
    def from_pretrained(cls, path: str) -> E1Tokenizer:
        """From a directory's ``tokenizer.json`` (a tokenizers WordLevel/BPE file: its
        ``model.vocab`` plus ``added_tokens``) or ``vocab.json``."""
        for name in ("tokenizer.json", "vocab.json"):
            f = os.path.join(path, name)
            if os.path.isfile(f):
                from .tokenizer import read_json

                data = read_json(f)
                if name == "vocab.json":
                    return cls(data)
                try:
                    vocab = dict(data.get("model", {}).get("vocab", {}))
                    for t in data.get("added_tokens", []):
                        vocab.setdefault(t["content"], t["id"])
                except (AttributeError, KeyError, TypeError, ValueError) as e:
                    raise bad_value("tokenizer.json", "a tokenizers file with model.vocab and added_tokens", f"{f}: {type(e).__name__}: {e}") from None
                return cls(vocab)
        raise FileNotFoundError(f"E1Tokenizer.from_pretrained: no tokenizer.json or vocab.json in {path}")

    def save_pretrained(self, path: str) -> None:
        os.makedirs(path, exist_ok=True)
        with open(os.path.join(path, "vocab.json"), "w") as f:
            json.dump(self.vocab, f, indent=1)

    def __len__(self) -> int:
        return len(self.vocab)

    def _one(self, seq: str, what: str = "sequence") -> list[int]:
        if not isinstance(seq, str):
            raise bad_type(what, "a protein string", type(seq).__name__)
        bad = sorted({c for c in seq if c not in self.vocab or not (c.isalpha() and c.isupper() or c == "?")})
        if bad:
            raise bad_value(what, "upper-case letters A-Z and '?' that the vocabulary holds", f"{bad} in {seq[:40]!r}")
        v = self.vocab
        return [v["<bos>"], v["1"], *(v[c] for c in seq), v["2"], v["<eos>"]]

    def encode(self, query: str, context=()) -> dict:
        """One sample: ``query`` (a string; commas split off context sequences, query last) with
        optional ``context`` sequences before it (a string, a list/tuple of strings, or None).
        Returns lists: input_ids, sequence_ids, within_seq_position_ids, global_position_ids, and
        context_len (tokens before the query)."""
        if not isinstance(query, str):
            raise bad_type("query", "a protein string (context sequences before it, comma-separated)", type(query).__name__)
        if context is None:
            context = ()
        elif isinstance(context, str):
            context = [context]
        elif not isinstance(context, (list, tuple)):
            raise bad_type("context", "a string or a list of strings", type(context).__name__)
        *ctx_parts, query_part = query.split(",")
        parts = [(c, f"context[{i}]") for i, c in enumerate(context)]
        parts += [(c, "query (a context part before its last comma)") for c in ctx_parts] + [(query_part, "query")]
        ids, sids, wpos = [], [], []
        for s, (seq, what) in enumerate(parts):
            t = self._one(seq, what)
            ids += t
            sids += [s] * len(t)
            wpos += list(range(len(t)))
        ctx = len(ids) - (len(query_part) + 4)
        return dict(
            input_ids=ids, sequence_ids=sids, within_seq_position_ids=wpos,
            global_position_ids=list(range(len(ids))), context_len=ctx,
        )  # fmt: skip

    def _encode_all(self, samples) -> list[dict]:
        if isinstance(samples, str) or not isinstance(samples, (list, tuple)):
            raise bad_type("samples", "a list of samples (strings 'CTX,...,QUERY' or (query, context) pairs)", type(samples).__name__)
        encs = []
        for i, smp in enumerate(samples):
            if isinstance(smp, str):
                encs.append(self.encode(smp))
            elif isinstance(smp, (tuple, list)) and len(smp) == 2 and isinstance(smp[0], str):
                encs.append(self.encode(smp[0], smp[1]))
            else:
                raise bad_type(f"samples[{i}]", "a string or a (query, context) pair", repr(smp)[:60])
        if not encs:
            raise bad_value("samples", "at least one sample", "none")
        return encs

    def batch(self, samples, *, padding_side: str = "right", device=None) -> dict:
        """A padded batch: one sample per row. ``samples``: strings ("CTX,...,QUERY") or
        (query, context) pairs. Returns tensors input_ids, attention_mask, sequence_ids (-1 at
        padding), within/global position ids (0 at padding)."""
        if padding_side not in ("right", "left"):
            raise bad_value("padding_side", "'right' or 'left'", repr(padding_side))
        encs = self._encode_all(samples)
        S = max(len(e["input_ids"]) for e in encs)
        cols = {"input_ids": self.pad_token_id, "sequence_ids": -1, "within_seq_position_ids": 0, "global_position_ids": 0}
        out = {k: [] for k in cols}
        out["attention_mask"] = []
        for e in encs:
            n = S - len(e["input_ids"])
            for k, fill in cols.items():
                out[k].append(e[k] + [fill] * n if padding_side == "right" else [fill] * n + e[k])
            keep = [1] * len(e["input_ids"])
            out["attention_mask"].append(keep + [0] * n if padding_side == "right" else [0] * n + keep)
        return {k: torch.tensor(v, dtype=torch.long, device=device) for k, v in out.items()}

    def pack(self, samples, *, total_length: int | None = None, device=None) -> dict:
        """Packed form: every sample back to back in one row (1, T). Returns input_ids (1, S),
        seq_info (a SeqInfo with one document per sample) and sequence_ids (1, S)."""
        encs = self._encode_all(samples)
        lens = [len(e["input_ids"]) for e in encs]
        info = SeqInfo.from_lengths([lens], total_length=total_length, device=device)
        ids = [i for e in encs for i in e["input_ids"]]
        sids = [i for e in encs for i in e["sequence_ids"]]
        n = info.S - len(ids)
        return dict(
            input_ids=torch.tensor([ids + [self.pad_token_id] * n], dtype=torch.long, device=device),
            sequence_ids=torch.tensor([sids + [-1] * n], dtype=torch.long, device=device), seq_info=info,
        )  # fmt: skip

    def decode(self, ids) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return "".join(self.ids_to_tokens.get(int(i), "<unk>") for i in ids)
