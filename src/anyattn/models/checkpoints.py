"""What every model family's loader shares, below the families: finding a checkpoint (a local
directory or a hub id), reading its weights (safetensors or .bin, damaged files named), checking
a state dict's keys, the dtype and saved-backend arguments, and the light config detectors
(no transformers import). ``anyattn.models.hub`` (``load``, the family registry) sits above the
family modules and imports them; the family modules import this module, never ``hub``.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from typing import Callable

from ..errors import bad_type, bad_value

__all__ = [
    "Family", "MODEL_FILES", "TOKENIZER_FILES", "check_state_dict", "download", "is_ankh_config", "is_esm2_config",
    "is_esmc_config", "read_weights", "resolve_dtype", "resolve_saved_backend", "strict_from_pretrained",
]  # fmt: skip


# The tokenizer files of every family: ESM/DPLM vocab.txt, E1's tokenizer.json (ids of its
# 34-token alphabet), a saved anyattn E1 vocab.json; config.json names the family.
TOKENIZER_FILES = [
    "config.json", "vocab.txt", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.json", "vocab.json",
    "spiece.model",  # ANKH's sentencepiece vocabulary (T5 tokenizers; read with the sentencepiece package)
]  # fmt: skip
# What a model directory needs; weights in either format, whichever the repository has.
MODEL_FILES = ["*.safetensors", "*.safetensors.index.json", "pytorch_model*.bin", "pytorch_model.bin.index.json", *TOKENIZER_FILES]


def download(repo_id: str, *, allow_patterns=None) -> str:
    """Download (or reuse from the local cache) the files of a hub repository; returns the local
    directory. ``repo_id`` looks like ``"facebook/esm2_t6_8M_UR50D"``.

    A name that is neither a local path nor a repository the hub serves fails at once, with an
    error naming both readings: offline (no network, or ``HF_HUB_OFFLINE=1``) the local hub cache
    must hold the repository; online, one request (no retries) tells whether it exists."""
    if not isinstance(repo_id, str) or repo_id.count("/") != 1 or repo_id.startswith(("/", ".")) or "" in repo_id.split("/"):
        raise bad_value(
            "path_or_repo", "an existing local directory or a hub id 'owner/name'",
            f"{repo_id!r}" + (f" (no such local path: {os.path.abspath(repo_id)})" if isinstance(repo_id, str) else ""),
        )  # fmt: skip
    if importlib.util.find_spec("huggingface_hub") is None:
        raise ImportError(
            f"loading the hub id {repo_id!r} needs huggingface_hub: pip install 'anyattn[models]' "
            f"(or pass a local directory with config.json and the weights; no such local path: {os.path.abspath(repo_id)})"
        )
    from huggingface_hub import snapshot_download

    files, why_not = _hub_files(repo_id)
    if files is None:  # the hub cannot be asked: only the local cache can serve the name
        try:
            return snapshot_download(repo_id, allow_patterns=allow_patterns or list(MODEL_FILES), local_files_only=True)
        except Exception:  # noqa: BLE001 - not in the cache (huggingface_hub's error types vary by version)
            raise _neither(repo_id, f"the hub cannot be reached ({why_not}) and its cache does not hold this repository") from None
    if allow_patterns is None:
        allow_patterns = _model_patterns(files)
    return snapshot_download(repo_id, allow_patterns=allow_patterns)


def _neither(repo_id: str, hub_reason: str) -> ValueError:
    return bad_value(
        "path_or_repo", "a local model directory or a hub repository id",
        f"{repo_id!r}, which is neither: no such local path ({os.path.abspath(repo_id)}), and as a hub id: {hub_reason}",
    )  # fmt: skip


def _hub_files(repo_id: str):
    """(the repository's file names, None), or (None, why) when the hub cannot be asked (offline,
    unreachable). A repository that does not exist, or that this user may not read, is an error
    naming both readings of the name.

    huggingface_hub's listing retries a failed connection for ~23 s (a mistyped local path 'a/b'
    took that long to fail). It runs in a thread; if it has not answered within 2 s, one request
    without retries (``model_info``) tells whether the hub can be reached at all. The listing
    thread's retry warnings are not printed."""
    import logging
    import threading

    from huggingface_hub import HfApi, constants

    if getattr(constants, "HF_HUB_OFFLINE", False):
        return None, "HF_HUB_OFFLINE is set"
    result: dict = {}
    quiet = _ThreadFilter()
    hub_http_log = logging.getLogger("huggingface_hub.utils._http")

    def listing():
        quiet.ident = threading.get_ident()
        try:
            result["files"] = list(HfApi().list_repo_files(repo_id))
        except BaseException as e:  # noqa: BLE001 - read by the caller
            result["error"] = e
        finally:
            hub_http_log.removeFilter(quiet)

    hub_http_log.addFilter(quiet)
    t = threading.Thread(target=listing, name="anyattn-hub-listing", daemon=True)
    t.start()
    t.join(2.0)
    if t.is_alive():  # slow, or retrying after network errors: ask once
        try:
            HfApi().model_info(repo_id, timeout=10)
        except Exception as e:  # noqa: BLE001 - sorted by what the hub said, if anything
            return _hub_refusal(repo_id, e)
        t.join()  # the hub answers: so will the listing
    if "error" in result:
        return _hub_refusal(repo_id, result["error"])
    return result["files"], None


class _ThreadFilter:
    """A logging filter dropping the records of one thread (``ident``)."""

    ident = None

    def filter(self, record) -> bool:
        return record.thread != self.ident


def _hub_refusal(repo_id: str, e: BaseException):
    """(None, why) for a hub that cannot be asked; an error naming both readings of ``repo_id``
    when the hub says the repository does not exist or is not readable."""
    status = getattr(getattr(e, "response", None), "status_code", None)
    kind = type(e).__name__
    if kind in ("RepositoryNotFoundError", "GatedRepoError") or status in (401, 403, 404):
        raise _neither(
            repo_id, "the hub has no such repository, or it is private or gated (log in with `hf auth login` "
            "or set HF_TOKEN if you have access)",
        ) from None  # fmt: skip
    if status is not None:
        return None, f"the hub answered HTTP {status}"
    text = str(e).strip().splitlines()[0][:200] if str(e).strip() else "no answer"
    return None, f"{kind}: {text}"


def _model_patterns(files) -> list:
    """MODEL_FILES for a repository holding ``files``, with one weights format: repositories such
    as facebook/esm2_t33_650M_UR50D hold the same weights as model.safetensors and
    pytorch_model.bin, and only the safetensors are read when both are there
    (:func:`read_weights`), so the .bin files are not downloaded then."""
    if any(f.endswith(".safetensors") for f in files):
        return [p for p in MODEL_FILES if not p.startswith("pytorch_model")]
    return list(MODEL_FILES)


def read_weights(path: str) -> dict:
    """Every tensor of a checkpoint directory: all ``*.safetensors`` files, else all
    ``pytorch_model*.bin`` files (``weights_only`` loading), merged. Shared by every family."""
    import torch

    files = sorted(os.listdir(path))
    st = [f for f in files if f.endswith(".safetensors")]
    sd: dict = {}
    if st:
        try:
            from safetensors.torch import load_file
        except ImportError as e:
            raise ImportError("reading *.safetensors needs safetensors: pip install 'anyattn[models]'") from e
        for f in st:
            sd.update(_read_file(load_file, os.path.join(path, f)))
        return sd
    bins = [f for f in files if f.startswith("pytorch_model") and f.endswith(".bin")]
    for f in bins:
        sd.update(_read_file(lambda p: torch.load(p, map_location="cpu", weights_only=True), os.path.join(path, f)))
    if not bins:
        raise FileNotFoundError(f"no *.safetensors or pytorch_model*.bin weights in {path} (it holds {files})")
    return sd


def _read_file(reader, file: str) -> dict:
    """``reader(file)``; a damaged or truncated weights file is an error naming it."""
    try:
        sd = reader(file)
    except (OSError, MemoryError) as e:
        if isinstance(e, MemoryError) or e.errno is not None:  # a real I/O failure / out of memory
            raise
        raise _damaged(file, e) from None
    except Exception as e:  # noqa: BLE001 - SafetensorError, pickle / zip errors of torch.load: name the file
        raise _damaged(file, e) from None
    if not isinstance(sd, dict):
        raise bad_value("weights", "a file holding a dict of tensors (a state dict)", f"{file}: a {type(sd).__name__}")
    return sd


def _damaged(file: str, e: BaseException) -> ValueError:
    first = str(e).strip().splitlines()[0][:300] if str(e).strip() else "no details"
    return bad_value("weights", "a readable checkpoint file", f"{file}, damaged or truncated ({type(e).__name__}: {first}); download it again")


def strict_from_pretrained(load, name: str, args, kwargs):
    """transformers' ``from_pretrained`` (``load``, the parent's bound classmethod), strict: a
    checkpoint with missing, unexpected or mis-shaped weights raises, naming every one, instead of
    leaving weights at their random initialisation. ``strict=False`` restores transformers'
    warnings. (Strict loading asks transformers to report mis-shaped weights rather than raise on
    them: its own error names no key.)"""
    strict = kwargs.pop("strict", True)
    want_info = kwargs.pop("output_loading_info", False)
    if strict:
        kwargs.setdefault("ignore_mismatched_sizes", True)
    model, info = load(*args, output_loading_info=True, **kwargs)
    if strict:
        parts = [
            f"{k}: {sorted(map(str, info.get(k) or []))}"
            for k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")
            if info.get(k)
        ]
        if parts:
            raise bad_value("pretrained_model_name_or_path", f"a checkpoint with exactly the weights of {name}", "; ".join(parts))
    return (model, info) if want_info else model


def check_state_dict(sd: dict, ours: dict, *, expected: str, optional=()) -> None:
    """Refuse a checkpoint whose keys are not exactly the model's (``optional`` keys may be
    absent) or whose tensors have other shapes, listing every offending key."""
    unknown = sorted(set(sd) - set(ours))
    missing = sorted(set(ours) - set(sd) - set(optional))
    shapes = sorted(
        f"{k}: checkpoint {tuple(sd[k].shape)}, model {tuple(ours[k].shape)}"
        for k in set(sd) & set(ours)
        if sd[k].shape != ours[k].shape
    )
    parts = []
    if unknown:
        parts.append(f"{len(unknown)} unknown key(s): {unknown}")
    if missing:
        parts.append(f"{len(missing)} missing key(s): {missing}")
    if shapes:
        parts.append(f"{len(shapes)} shape mismatch(es): {shapes}")
    if parts:
        raise bad_value("state_dict", expected, "; ".join(parts))


@dataclass(frozen=True)
class Family:
    """A model family: ``detect(config_dict) -> bool`` on the parsed config.json, and
    ``loader(path, config_dict, attn_backend, dtype, device) -> model`` for a local directory."""

    name: str
    detect: Callable[[dict], bool]
    loader: Callable


def is_esm2_config(config: dict) -> bool:
    """True for a config.json of ours (model_type "anyattn_esm2") or of an HF ESM2 ``EsmForMaskedLM``
    / ``EsmModel`` (model_type "esm", rotary positions, not ESMFold). Checkpoints that reuse
    model_type "esm" with other architectures (DPLM's ``EsmForDPLM``, ...) are not ESM2."""
    if not isinstance(config, dict):
        return False
    mt = config.get("model_type")
    if mt == "anyattn_esm2":
        return True
    if mt != "esm" or config.get("position_embedding_type", "absolute") != "rotary" or config.get("is_folding_model"):
        return False
    return all(a in ("EsmForMaskedLM", "EsmModel") for a in (config.get("architectures") or []))


_DTYPE_NAMES = {
    "float32": "float32", "fp32": "float32", "float": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
    "float16": "float16", "fp16": "float16", "half": "float16", "float64": "float64", "fp64": "float64", "double": "float64",
}  # fmt: skip


def resolve_dtype(dtype, name: str = "dtype"):
    """``dtype`` as a torch floating dtype: None stays None (the loader's default, float32); a
    torch floating dtype as is; a name such as "bfloat16", "bf16", "float16", "fp16", "float32",
    "fp32" or "torch.bfloat16". Anything else is an error naming ``name``. Shared by the loaders of
    every family."""
    import torch

    if dtype is None:
        return None
    if isinstance(dtype, torch.dtype):
        if not dtype.is_floating_point:
            raise bad_value(name, "a floating dtype (torch.float32, torch.bfloat16, torch.float16)", dtype)
        return dtype
    if isinstance(dtype, str):
        key = dtype.strip().lower().removeprefix("torch.")
        if key in _DTYPE_NAMES:
            return getattr(torch, _DTYPE_NAMES[key])
        raise bad_value(name, f"a torch floating dtype or one of {sorted(_DTYPE_NAMES)}", repr(dtype))
    raise bad_type(name, "a torch.dtype or a dtype name such as 'bfloat16'", type(dtype).__name__)


_OWN_MODEL_TYPES = ("anyattn_esm2", "anyattn_e1")  # what our save_pretrained writes


def resolve_saved_backend(config: dict, attn_backend):
    """``attn_backend`` as given; None: the ``attn_backend`` an anyattn checkpoint saved in its
    config.json (our own model types only: other checkpoints' fields of that name belong to other
    libraries), else "auto"."""
    if attn_backend is not None:
        return attn_backend
    if isinstance(config, dict) and config.get("model_type") in _OWN_MODEL_TYPES and config.get("attn_backend") is not None:
        return config["attn_backend"]
    return "auto"


_ESMC_MODEL_TYPES = ("anyattn_esmc", "ESMplusplus", "esmc")  # ours, Synthyra's ESM++, transformers'
_ANKH_VOCAB_SIZE = 144  # ANKH / ANKH2's vocabulary (ElnaggarLab config.json)


def is_esmc_config(config: dict) -> bool:
    """True for the config.json of an ESM C checkpoint: ours ("anyattn_esmc"), Synthyra's ESM++
    ("ESMplusplus") or transformers' native ESMC ("esmc", biohub/ESMC-*). Reads the dict only."""
    return isinstance(config, dict) and config.get("model_type") in _ESMC_MODEL_TYPES


def is_ankh_config(config: dict) -> bool:
    """True for ours ("anyattn_ankh") or a T5 config.json with a gated FFN over ANKH's 144-token
    vocabulary (ElnaggarLab/ankh-*, ankh2-*, and encoder-only re-saves of them). Other T5
    checkpoints are not claimed. Reads the dict only."""
    if not isinstance(config, dict):
        return False
    if config.get("model_type") == "anyattn_ankh":
        return True
    gated = str(config.get("feed_forward_proj", "")).startswith("gated-")
    return config.get("model_type") == "t5" and gated and config.get("vocab_size") == _ANKH_VOCAB_SIZE


_OWN_MODEL_TYPES = (*_OWN_MODEL_TYPES, "anyattn_esmc", "anyattn_ankh")
