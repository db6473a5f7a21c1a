"""``anyattn.models.load``: one entry point for every model family, from a directory or a hub id.

    model = anyattn.models.load("facebook/esm2_t33_650M_UR50D", attn_backend="auto", dtype=torch.bfloat16, device="cuda")

Steps: resolve the path (a local directory, else a hub id downloaded with huggingface_hub) ->
read config.json -> the FIRST family in :data:`FAMILIES` whose ``detect(config)`` is true ->
its ``loader`` maps the checkpoint's keys onto our classes and refuses unknown, missing or
mis-shaped weights, naming them (no weight is silently left at its random initialisation).

Order matters: families that reuse another's ``model_type`` (DPLM writes ``"esm"`` with its own
architectures) come before the family whose type they borrow; ESM2's detector accepts only HF's
ESM2 architectures, so an unregistered look-alike is refused rather than misread.
"""

from __future__ import annotations

import json
import os
import warnings

from ..errors import bad_type, bad_value
from . import tokenizer as _tokenizer_module
from .checkpoints import (  # noqa: F401  (re-exported: the names load() and the families share)
    MODEL_FILES,
    TOKENIZER_FILES,
    Family,
    check_state_dict,
    download,
    is_ankh_config,
    is_esm2_config,
    is_esmc_config,
    read_weights,
    resolve_dtype,
    resolve_saved_backend,
)

__all__ = [
    "Family", "FAMILIES", "MODEL_FILES", "TOKENIZER_FILES", "check_state_dict", "download", "is_esm2_config", "load",
    "load_tokenizer", "read_weights", "register_family", "resolve_dtype", "resolve_saved_backend",
]  # fmt: skip


def _load_esm2(path, config, attn_backend, dtype, device):
    from .esm2 import load_esm2

    return load_esm2(path, attn_backend=attn_backend, dtype=dtype, device=device)


# First match wins. Other families go BEFORE esm2 (DPLM checkpoints say model_type "esm" too):
# DPLM / DPLM2 (anyattn.models.dplm) and E1 (anyattn.models.e1) enter this list as
# Family(name, detect, loader) with the loader signature of _load_esm2, either in this literal or
# through register_family. A detector must not import transformers (use the config dict only).
FAMILIES: list[Family] = [
    Family("esm2", is_esm2_config, _load_esm2),
]


def register_family(family: Family, *, before: str | None = "esm2") -> None:
    """Add (or replace, by name) a family; ``before`` names the family it must precede (None:
    append at the end)."""
    if not isinstance(family, Family):
        raise bad_type("family", "an anyattn.models.Family", type(family).__name__)
    FAMILIES[:] = [f for f in FAMILIES if f.name != family.name]
    names = [f.name for f in FAMILIES]
    if before is None:
        FAMILIES.append(family)
    elif before in names:
        FAMILIES.insert(names.index(before), family)
    else:
        raise bad_value("before", f"None or one of {names}", repr(before))


def _resolve_path(path_or_repo) -> str:
    if not isinstance(path_or_repo, (str, os.PathLike)):
        raise bad_type("path_or_repo", "a local directory or a hub id 'owner/name'", type(path_or_repo).__name__)
    path = os.fspath(path_or_repo)
    if not path.strip():
        raise bad_value("path_or_repo", "a local directory or a hub id 'owner/name'", repr(path))
    if os.path.isdir(path):
        return path
    if os.path.exists(path):
        raise bad_value("path_or_repo", "a directory with config.json and weights (not a file)", repr(path))
    return download(path)


# dtype names a user may write (torch's names, HF's config.json "torch_dtype" values, short forms)
def _resolve_device(device):
    """None, or a device of this machine (a CUDA device without CUDA is refused here, before the
    weights are read, instead of failing in ``model.to``)."""
    import torch

    if device is None:
        return None
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise bad_value("device", "a device such as 'cpu', 'cuda' or 'cuda:1'", repr(device)) from e
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise bad_value("device", "a device of this machine (torch.cuda.is_available() is False)", repr(device))
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise bad_value("device", f"a CUDA index below {torch.cuda.device_count()}", repr(device))
    return dev


def load(path_or_repo, *, attn_backend=None, dtype=None, device=None):
    """The model in ``path_or_repo`` (a local HF-format directory: config.json + *.safetensors
    or pytorch_model*.bin; or a hub id), as the anyattn class of its family, in eval mode.

    ``attn_backend``: anyattn backend for every layer (``model.attn_backend = ...`` changes it
    later); None (default): the backend a checkpoint saved by anyattn names in its config.json,
    else "auto". ``dtype``: parameter dtype (default float32): a torch floating dtype or a name
    (:func:`resolve_dtype`: "bfloat16"/"bf16", "float16"/"fp16"/"half", "float32"/"fp32"/"float",
    "float64"). ``device``: where to put it (default CPU): a device of this machine.
    """
    dtype = resolve_dtype(dtype)
    device = _resolve_device(device)
    path = _resolve_path(path_or_repo)
    cfg_file = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_file):
        raise bad_value("path_or_repo", "a model directory containing config.json", f"{path!r} without config.json")
    with open(cfg_file, "rb") as f:
        try:
            config = json.loads(f.read().decode("utf-8-sig"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise bad_value("config.json", "valid JSON (UTF-8)", f"{cfg_file}: {e}") from None
    if not isinstance(config, dict):
        raise bad_value("config.json", "a JSON object", type(config).__name__)
    for fam in FAMILIES:
        if fam.detect(config):
            return fam.loader(path, config, resolve_saved_backend(config, attn_backend), dtype, device)
    raise bad_value(
        "path_or_repo",
        f"a checkpoint of a known family ({', '.join(f.name for f in FAMILIES)})",
        f"config.json with model_type {config.get('model_type')!r}, architectures {config.get('architectures')}"
        + (f", position_embedding_type {config['position_embedding_type']!r}" if "position_embedding_type" in config else ""),
    )


# ---------------------------------------------------------------------------------------------
# the other families, registered ahead of esm2 (their detectors read the config dict only)


def _load_e1(path, config, attn_backend, dtype, device):
    from .e1 import load_e1

    return load_e1(path, attn_backend=attn_backend, dtype=dtype, device=device)


def _is_e1(config: dict) -> bool:
    from .e1_tokenizer import is_e1_config  # torch-only module

    return is_e1_config(config)


def _is_dplm(config: dict) -> bool:
    from .dplm import is_dplm_config  # imported on use: dplm needs transformers

    return is_dplm_config(config)


def _load_dplm(path, config, attn_backend, dtype, device):
    from .dplm import DPLM_FAMILY

    return DPLM_FAMILY.loader(path, config, attn_backend, dtype, device)


register_family(Family("e1", _is_e1, _load_e1))
register_family(Family("dplm", _is_dplm, _load_dplm))


# ---------------------------------------------------------------------------------------------
# ESM C / ESM++ (anyattn.models.esmc, docs/esmc.md) and ANKH (anyattn.models.ankh, docs/ankh.md).
# Their detectors live here so that detection needs no transformers import.

def _load_esmc(path, config, attn_backend, dtype, device):
    from .esmc_checkpoints import load_esmc

    return load_esmc(path, attn_backend=attn_backend, dtype=dtype, device=device, config=config)


def _load_ankh(path, config, attn_backend, dtype, device):
    from .ankh import load_ankh

    return load_ankh(path, attn_backend=attn_backend, dtype=dtype, device=device, config=config)


# our save_pretrained writes these model types too: load() honours their saved attn_backend
# after esm2: their model types ("ESMplusplus", "esmc", "t5", ours) are no other family's
register_family(Family("esmc", is_esmc_config, _load_esmc), before=None)
register_family(Family("ankh", is_ankh_config, _load_ankh), before=None)


# ---------------------------------------------------------------------------------------------
# the tokenizer of a model, by family (above the family modules, like load)


def _family_tokenizer(path_or_model):
    """E1's and DPLM-2's own tokenizers (their vocabularies and input formats are not the ESM
    alphabet's), or None for the ESM family."""
    from .dplm import is_dplm2_config, load_dplm_tokenizer
    from .e1_tokenizer import E1Tokenizer, is_e1_config

    config = getattr(path_or_model, "config", None)
    path = None
    if isinstance(path_or_model, (str, os.PathLike)):
        path = os.fspath(path_or_model)
        f = os.path.join(path, "config.json")
        if not os.path.isfile(f):
            return None
        cfg = _tokenizer_module.read_json(f)  # a damaged config.json is an error, not a silent fall back to the ESM alphabet
    elif config is not None and hasattr(config, "to_dict"):
        cfg = config.to_dict()
        src = getattr(config, "_name_or_path", "") or ""
        path = src if src and os.path.isdir(src) else None
    else:
        return None
    if not isinstance(cfg, dict):
        return None
    if is_e1_config(cfg):
        if path is not None and any(os.path.isfile(os.path.join(path, n)) for n in ("tokenizer.json", "vocab.json")):
            return E1Tokenizer.from_pretrained(path)
        if path is not None:  # a checkpoint without its token ids: the default order is not the released one
            warnings.warn(
                f"{path} has no tokenizer.json or vocab.json: using anyattn's default E1 vocabulary, whose ids "
                "0-2 (<pad>, <bos>, <eos>) match the released checkpoints but whose order of ids 3-33 is not "
                "verified against theirs. With released weights, put the checkpoint's tokenizer.json in that "
                "directory (or build E1Tokenizer.from_pretrained(dir) from a directory that has it).",
                UserWarning,
                stacklevel=3,
            )
        return E1Tokenizer()
    if is_dplm2_config(cfg):
        return load_dplm_tokenizer(path_or_model)
    return None


def load_tokenizer(path_or_model):
    """The tokenizer of a model. E1 checkpoints get :class:`~anyattn.models.e1_tokenizer.E1Tokenizer`
    and DPLM-2 ones :class:`~anyattn.models.dplm.DPLM2Tokenizer`; the ESM family gets a
    :class:`_tokenizer_module.ProteinTokenizer` from a directory with ``vocab.txt`` (a saved model or tokenizer), a
    hub id (downloaded with huggingface_hub), or a model object of anyattn.models (its
    ``config.vocab_list`` when set, else its checkpoint directory ``config._name_or_path``, else
    the ESM alphabet for a 33-token ESM-family model)."""
    if isinstance(path_or_model, (str, os.PathLike)) and not os.path.exists(os.fspath(path_or_model)):
        path_or_model = download(os.fspath(path_or_model), allow_patterns=TOKENIZER_FILES)
    other = _family_tokenizer(path_or_model)
    if other is not None:
        return other
    if isinstance(path_or_model, (str, os.PathLike)):
        path = os.fspath(path_or_model)
        if os.path.isdir(path):
            return _tokenizer_module.ProteinTokenizer.from_pretrained(path)
        raise bad_value("path_or_model", "a directory containing vocab.txt, a hub id or a model", repr(path))
    config = getattr(path_or_model, "config", None)
    if config is None:
        raise bad_type("path_or_model", "a directory, a hub id or a model with a .config", type(path_or_model).__name__)
    vocab_list = getattr(config, "vocab_list", None)
    if vocab_list:
        return _tokenizer_module.ProteinTokenizer(vocab_list)
    src = getattr(config, "_name_or_path", "") or ""
    if src and os.path.isfile(os.path.join(src, "vocab.txt")):
        return _tokenizer_module.ProteinTokenizer.from_pretrained(src)
    if getattr(config, "vocab_size", None) == len(_tokenizer_module._ESM_VOCAB) and "esm" in str(getattr(config, "model_type", "")):
        return _tokenizer_module.ProteinTokenizer.esm()
    raise bad_value(
        "path_or_model",
        "a model whose config names its vocabulary (vocab_list), its checkpoint directory, or a 33-token ESM model",
        f"{type(path_or_model).__name__} with model_type {getattr(config, 'model_type', None)!r}, vocab_size {getattr(config, 'vocab_size', None)}",
    )
