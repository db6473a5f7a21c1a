"""Models on anyattn: same weights and numbers as the reference implementation, every backend.

    import anyattn.models as am
    model = am.load("path/or/hub-id", attn_backend="auto", dtype=torch.bfloat16, device="cuda")
    tok = am.load_tokenizer(model)                       # or ProteinTokenizer.esm()
    out = model(**tok(["MKV...", "MA..."]))              # logits, last_hidden_state, ...
    model.attn_backend = "flex"                          # every layer, in place

Importing this package is light (torch only): the tokenizer is here; the model classes, which
are transformers ``PreTrainedModel`` s (extra ``anyattn[models]``), load on first access.
See docs/models.md.
"""

from __future__ import annotations

import importlib

from .tokenizer import ProteinTokenizer

# name -> submodule; imported on first attribute access (these need transformers)
_LAZY = {
    "ESM2Config": "esm2",
    "ESM2_PRESETS": "esm2",
    "ESM2Model": "esm2",
    "ESM2ForMaskedLM": "esm2",
    "ESM2Output": "esm2",
    "esm2_flops": "esm2",
    "load_esm2": "esm2",
    "load_hf_state_dict": "esm2",
    "build_esm2": "esm2",
    "is_esm2_config": "hub",
    "register_auto": "esm2",
    "load": "hub",
    "load_tokenizer": "hub",
    "FAMILIES": "hub",
    "Family": "hub",
    "register_family": "hub",
    # E1 (docs/e1.md)
    "E1Config": "e1",
    "E1_PRESETS": "e1",
    "E1Model": "e1",
    "E1ForMaskedLM": "e1",
    "E1Output": "e1",
    "load_e1": "e1",
    "E1Tokenizer": "e1_tokenizer",
    "is_e1_config": "e1_tokenizer",
    # DPLM / DPLM-2 (docs/dplm.md)
    "DPLMForMaskedLM": "dplm",
    "DPLM2ForMaskedLM": "dplm",
    "DPLM2Tokenizer": "dplm",
    "load_dplm": "dplm",
    "load_dplm_tokenizer": "dplm",
    "is_dplm_config": "dplm",
    "is_dplm2_config": "dplm",
    # ESM C / ESM++ (docs/esmc.md)
    "ESMCConfig": "esmc",
    "ESMC_PRESETS": "esmc",
    "ESMC_VOCAB": "esmc",
    "ESMCModel": "esmc",
    "ESMCForMaskedLM": "esmc",
    "ESMCOutput": "esmc",
    "esmc_tokenizer": "esmc",
    "load_esmc": "esmc_checkpoints",
    "build_esmc": "esmc_checkpoints",
    "map_esmc_keys": "esmc_checkpoints",
    "is_esmc_config": "hub",
    # ANKH (docs/ankh.md)
    "AnkhConfig": "ankh",
    "ANKH_PRESETS": "ankh",
    "AnkhModel": "ankh",
    "AnkhOutput": "ankh",
    "load_ankh": "ankh",
    "build_ankh": "ankh",
    "map_ankh_keys": "ankh",
    "is_ankh_config": "hub",
}

__all__ = ["ProteinTokenizer", *_LAZY]


def __getattr__(name: str):
    mod = _LAZY.get(name)
    if mod is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{mod}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
