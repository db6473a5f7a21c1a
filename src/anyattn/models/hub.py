"""Hugging Face Hub ids -> local directories (huggingface_hub, imported on first use)."""

from __future__ import annotations

import importlib.util

from ..errors import bad_value

__all__ = ["download"]

# What a model directory needs; weights in either format, whichever the repository has.
MODEL_FILES = ["config.json", "*.safetensors", "*.safetensors.index.json", "pytorch_model*.bin",
               "pytorch_model.bin.index.json", "vocab.txt", "tokenizer_config.json", "special_tokens_map.json"]  # fmt: skip


def download(repo_id: str, *, allow_patterns=None) -> str:
    """Download (or reuse from the local cache) the files of a hub repository; returns the local
    directory. ``repo_id`` looks like ``"facebook/esm2_t6_8M_UR50D"``."""
    if not isinstance(repo_id, str) or repo_id.count("/") != 1 or repo_id.startswith(("/", ".")):
        raise bad_value("path_or_repo", "an existing local directory or a hub id 'owner/name'", repr(repo_id))
    if importlib.util.find_spec("huggingface_hub") is None:
        raise ImportError(
            f"loading the hub id {repo_id!r} needs huggingface_hub: pip install huggingface_hub "
            "(or pass a local directory with config.json and the weights)"
        )
    from huggingface_hub import snapshot_download

    return snapshot_download(repo_id, allow_patterns=allow_patterns or MODEL_FILES)
