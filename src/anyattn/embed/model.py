"""The embed job's access to a model: loading, the encoder, its tokenizer, its identity in a store.

A model is an ``anyattn.models`` protein LM (ESM2, DPLM, DPLM-2, ESM C / ESM++, E1, ANKH), given
as a checkpoint directory, a hub id or an object. Its identity (architecture fields and a weights
fingerprint) is what a store records, so that a resumed run refuses another model. What one
sequence looks like to each family is :mod:`anyattn.embed.formats`.
"""

from __future__ import annotations

import hashlib
import json
import os

import torch

from ..errors import ArgumentError, ArgumentTypeError, bad_type, bad_value
from .store import _np

_DTYPES = {
    "fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp16": torch.float16, "float16": torch.float16,
}  # fmt: skip
# the architecture fields whose hash identifies a model in the store metadata
_CONFIG_KEYS = (
    "model_type", "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
    "max_position_embeddings", "position_embedding_type", "token_dropout", "emb_layer_norm_before",
    "layer_norm_eps", "pad_token_id", "mask_token_id", "rope_theta",
)  # fmt: skip
# fields of the other families, hashed when the config has them (an ESM2 config hashes as before)
_MORE_CONFIG_KEYS = (
    "d_kv", "d_ff", "num_heads", "relative_attention_num_buckets", "relative_attention_max_distance",
    "dense_act_fn", "layer_norm_epsilon", "num_key_value_heads", "global_attention_every_n_layers",
    "max_num_sequences", "max_num_positions_within_seq", "rope_theta_within_seq", "rope_theta_global", "clip_qkv",
    "rms_norm_eps", "gated_mlp", "hidden_act", "scale_residue", "bos_token_id", "eos_token_id",
)  # fmt: skip


def _config(model):
    """The config object of an anyattn model (``model.config``; ESM2ForMaskedLM before the
    transformers port keeps it in ``model.cfg``)."""
    cfg = getattr(model, "config", None)
    if cfg is None:
        cfg = getattr(model, "cfg", None)
    if cfg is None:
        raise bad_type("model", "an anyattn.models model (with .config), a checkpoint directory or a hub id", type(model).__name__)
    return cfg


def _encoder(model):
    """The encoder without the LM head (embeddings need the hidden states only): ``.esm`` of
    ESM2 / DPLM / DPLM-2, ``.model`` of E1; ESM C and ANKH are called whole (ESM C's sequence
    head is one small MLP; ANKH's model is the encoder)."""
    enc = getattr(model, "esm", None)
    if enc is None and type(model).__name__ == "E1ForMaskedLM":
        enc = model.model
    return enc if enc is not None else model


def _load_model(source, *, backend):
    """Load a model from a directory or hub id on the CPU in float32 (so that the weights
    fingerprint does not depend on ``dtype``); the caller moves it."""
    from .. import models

    loader = getattr(models, "load", None)
    if loader is None:  # anyattn.models.load (all model families) not available: ESM2 only
        loader = models.load_esm2
    try:
        return loader(os.fspath(source), attn_backend=backend)  # None: the checkpoint's saved backend, else auto
    except (ArgumentError, ArgumentTypeError) as e:  # the loader names its own argument: name ours
        msg = str(e)
        if msg.startswith("path_or_repo: "):
            raise type(e)("model: " + msg[len("path_or_repo: "):]) from None
        raise


def _compile(model) -> None:
    """``compile_layers()`` once per model object (a second job with the same in-memory model
    reuses the compiled layers instead of compiling again)."""
    enc = _encoder(model)
    if not hasattr(enc, "compile_layers"):
        raise bad_value("compile", f"False for {type(model).__name__} (it has no compile_layers())", True)
    if not getattr(enc, "_anyattn_embed_compiled", False):
        enc.compile_layers()
        enc._anyattn_embed_compiled = True


def _tokenizer(model, source):
    from ..models import ProteinTokenizer, load_tokenizer

    if source is not None and os.path.isfile(os.path.join(os.fspath(source), "vocab.txt")):
        return load_tokenizer(source)
    if getattr(model, "config", None) is not None:
        return load_tokenizer(model)
    cfg = _config(model)  # ESM2ForMaskedLM with .cfg: ESM2's alphabet is fixed
    if getattr(cfg, "vocab_size", None) == len(ProteinTokenizer.esm()):
        return ProteinTokenizer.esm()
    raise bad_value("model", "a model whose tokenizer anyattn.models.load_tokenizer can find", type(model).__name__)


# set on a model object the job casts in place: (its identity right after the cast, the identity
# of the weights before it). Rounding float32 -> float16 -> bfloat16 is not float32 -> bfloat16,
# so without it a second job on the same object after a float16 run would see another model.
_CAST_FROM = "_anyattn_embed_cast_from"


def _model_identity(model) -> dict:
    """Architecture fields and a fingerprint of every weight, rounded to bfloat16 (the fingerprint
    of one checkpoint is the same whatever dtype it was cast to). ``model_weights_sha1`` hashes 64
    strided values per tensor (the key stores of earlier versions hold, kept so they resume);
    ``model_weights_all_sha1`` hashes every value, so that two checkpoints differing in any weight
    never share a store."""
    cfg = _config(model)
    arch = {k: getattr(cfg, k, None) for k in _CONFIG_KEYS}
    arch.update({k: v for k in _MORE_CONFIG_KEYS if (v := getattr(cfg, k, None)) is not None})
    arch["model_type"] = arch["model_type"] or "esm"
    conf = hashlib.sha1(json.dumps(arch, sort_keys=True, default=str).encode()).hexdigest()
    sampled, full = hashlib.sha1(), hashlib.sha1()
    with torch.no_grad():
        for name, t in sorted(model.state_dict().items()):
            flat = t.detach().reshape(-1)
            step = max(1, flat.numel() // 64)
            label = f"{name}{tuple(t.shape)}".encode()
            sampled.update(label)
            sampled.update(_np().asarray(flat[::step][:64].to(torch.bfloat16).float().cpu().numpy()).tobytes())
            full.update(label)
            for chunk in flat.split(1 << 24):  # bounded host memory for large tensors
                bits = chunk.to(torch.bfloat16).view(torch.int16).cpu() if chunk.is_floating_point() else chunk.cpu()
                full.update(_np().ascontiguousarray(bits.numpy()).tobytes())
    ident = {
        "model_type": str(arch["model_type"]), "model_config_sha1": conf,
        "model_weights_sha1": sampled.hexdigest(), "model_weights_all_sha1": full.hexdigest(),
    }  # fmt: skip
    cast = getattr(model, _CAST_FROM, None)
    if cast is not None and cast[0] == ident:  # unchanged since the job cast it: the weights it came from
        return dict(cast[1])
    return ident


def _cast_in_place(model, identity: dict, **to) -> None:
    """``model.to(**to)``, remembering ``identity`` (of the weights before the cast) on the object."""
    model.to(**to)
    after = _model_identity(model)
    if after != identity:
        setattr(model, _CAST_FROM, (after, dict(identity)))
