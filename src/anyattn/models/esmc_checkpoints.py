"""Loading ESM C checkpoints (anyattn.models.esmc): the published key layouts mapped onto ours,
strict loading, and ``load_esmc`` for hub-format directories and EvolutionaryScale's raw ``.pth``.

Layouts (docs/esmc.md has the full table):

* EvolutionaryScale's ``esmc_*_v0.pth`` and Synthyra's ESM++ safetensors: our names already
  (``embed.weight``, ``transformer.blocks.{i}.attn.layernorm_qkv.{0,1}...``, ``sequence_head...``).
* transformers' native ESMC (``esmc.layers.{i}.self_attn.q_proj.weight`` ...): renamed, with
  q/k/v and gate/up concatenated into EvolutionaryScale's fused projections.
* TransformerEngine-style names under ``esmc.`` (``...attn.layernorm_qkv.layer_norm_weight``,
  ``...ffn.fc1_weight``, ``lm_head.{0,2,3}``): renamed. This layout is known from third-party code
  that converts Biohub ESMC safetensors; no file of it was read here.
"""

from __future__ import annotations

import json
import os

import torch

from ..errors import bad_type, bad_value
from ._switches import backend_value
from .esmc import MODEL_TYPE, ESMCConfig, ESMCForMaskedLM, ESMCModel
from .checkpoints import check_state_dict, read_weights, resolve_dtype, resolve_saved_backend

__all__ = ["build_esmc", "load_esmc", "load_esmc_state_dict", "map_esmc_keys"]

# transformers-native ESMC names (biohub/ESMC-*; EsmcForMaskedLM.state_dict()) -> ours. q/k/v are
# concatenated into layernorm_qkv.1 and gate/up into ffn.1 (EvolutionaryScale's fused layout:
# the first half of ffn.1 goes through silu, as gate_proj does).
_NATIVE_LAYER = {
    "input_layernorm.weight": "attn.layernorm_qkv.0.weight", "input_layernorm.bias": "attn.layernorm_qkv.0.bias",
    "self_attn.q_norm.weight": "attn.q_ln.weight", "self_attn.k_norm.weight": "attn.k_ln.weight",
    "self_attn.o_proj.weight": "attn.out_proj.weight", "post_attention_layernorm.weight": "ffn.0.weight",
    "post_attention_layernorm.bias": "ffn.0.bias", "mlp.down_proj.weight": "ffn.3.weight",
}  # fmt: skip
_NATIVE_FUSED = {"attn.layernorm_qkv.1.weight": ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"),
                 "ffn.1.weight": ("mlp.gate_proj.weight", "mlp.up_proj.weight")}  # fmt: skip
_NATIVE_TOP = {"embed_tokens.weight": "embed.weight", "norm.weight": "transformer.norm.weight",
               "lm_head.dense.weight": "sequence_head.0.weight", "lm_head.dense.bias": "sequence_head.0.bias",
               "lm_head.layer_norm.weight": "sequence_head.2.weight", "lm_head.layer_norm.bias": "sequence_head.2.bias",
               "lm_head.decoder.weight": "sequence_head.3.weight", "lm_head.decoder.bias": "sequence_head.3.bias"}  # fmt: skip


# TransformerEngine-style block names (te.LayerNormLinear / te.LayerNormMLP) -> ours
_TE_BLOCK = {
    "attn.layernorm_qkv.layer_norm_weight": "attn.layernorm_qkv.0.weight", "attn.layernorm_qkv.layer_norm_bias": "attn.layernorm_qkv.0.bias",
    "attn.layernorm_qkv.weight": "attn.layernorm_qkv.1.weight", "ffn.layer_norm_weight": "ffn.0.weight",
    "ffn.layer_norm_bias": "ffn.0.bias", "ffn.fc1_weight": "ffn.1.weight", "ffn.fc2_weight": "ffn.3.weight",
}  # fmt: skip


def _map_te(state_dict: dict) -> dict:
    out = {}
    for k, v in state_dict.items():
        if k.endswith("._extra_state"):  # TransformerEngine's FP8 metadata, not a weight
            continue
        n = k.removeprefix("esmc.")
        if n.startswith("lm_head."):
            n = "sequence_head." + n[len("lm_head.") :]
        elif n.startswith("transformer.blocks."):
            i, rest = n[len("transformer.blocks.") :].split(".", 1)
            n = f"transformer.blocks.{i}.{_TE_BLOCK.get(rest, rest)}"
        out[n] = v
    return out


def map_esmc_keys(state_dict: dict) -> dict:
    """A published ESM C state dict -> our (EvolutionaryScale's) key names.

    * EvolutionaryScale's ``esmc_*_v0.pth`` and Synthyra's ESM++ (``embed.weight``,
      ``transformer.blocks.{i}....``, ``sequence_head.{0,2,3}...``): unchanged.
    * transformers-native (``esmc.embed_tokens.weight``, ``esmc.layers.{i}.self_attn.q_proj.weight``
      ..., ``lm_head.*``; without ``esmc.`` when saved from ``EsmcModel``): renamed, q/k/v and
      gate/up concatenated. A split projection with a missing part is refused, naming it.
    * TransformerEngine-style (``esmc.transformer.blocks.{i}.ffn.fc1_weight`` ...): renamed,
      ``_extra_state`` entries dropped.

    Unknown keys are passed through for :func:`check_state_dict` to refuse by name."""
    if not isinstance(state_dict, dict):
        raise bad_type("state_dict", "a dict of name -> tensor", type(state_dict).__name__)
    if any(k.startswith(("esmc.transformer.", "esmc.embed.")) for k in state_dict):
        return _map_te(state_dict)
    native = [k for k in state_dict if k.startswith(("esmc.", "layers.", "embed_tokens.", "lm_head."))]
    if not native:
        return dict(state_dict)
    out, parts, missing = {}, {}, []
    for k, v in state_dict.items():
        n = k.removeprefix("esmc.")
        if n in _NATIVE_TOP:
            out[_NATIVE_TOP[n]] = v
        elif n.startswith("layers.") and n.split(".", 2)[1].isdigit():
            _, i, rest = n.split(".", 2)
            if rest in _NATIVE_LAYER:
                out[f"transformer.blocks.{i}.{_NATIVE_LAYER[rest]}"] = v
            elif any(rest in srcs for srcs in _NATIVE_FUSED.values()):
                parts[(i, rest)] = v
            else:
                out[k] = v  # unknown: refused by the completeness check
        else:
            out[k] = v
    for i in sorted({i for i, _ in parts}, key=int):
        for ours, srcs in _NATIVE_FUSED.items():
            got = [parts.get((i, s)) for s in srcs]
            if all(t is not None for t in got):
                out[f"transformer.blocks.{i}.{ours}"] = torch.cat(got, dim=0)
            elif any(t is not None for t in got):
                missing += [f"esmc.layers.{i}.{s}" for s, t in zip(srcs, got) if t is None]
    if missing:
        raise bad_value(
            "state_dict", "complete split projections of a transformers ESMC checkpoint", f"missing {missing}"
        )
    return out


def load_esmc_state_dict(model: ESMCModel, state_dict: dict) -> None:
    """Load a published ESM C state dict (any of the formats of :func:`map_esmc_keys`) into
    ``model``, strictly: unknown, missing or mis-shaped keys raise, listing every one. An
    :class:`ESMCModel` (no head) drops a checkpoint's ``sequence_head`` keys. ``model`` may live on
    the meta device: the tensors are then assigned, not copied."""
    if not isinstance(model, ESMCModel):
        raise bad_type("model", "an ESMCModel or ESMCForMaskedLM", type(model).__name__)
    sd = map_esmc_keys(state_dict)
    if not isinstance(model, ESMCForMaskedLM):
        sd = {k: v for k, v in sd.items() if not k.startswith("sequence_head.")}
    check_state_dict(
        sd, model.state_dict(), expected=f"the keys of an ESM C checkpoint for {type(model).__name__} with this config"
    )
    meta = any(p.device.type == "meta" for p in model.parameters())
    model.load_state_dict(sd, strict=True, assign=meta)


def build_esmc(cfg: ESMCConfig, state_dict: dict, *, dtype=None, device=None, head: bool = True) -> ESMCModel:
    """An ESM C model holding exactly ``state_dict`` (strict), in eval mode, built on the meta
    device (no random initialisation); float32 unless ``dtype``. ``head=False``: the encoder."""
    with torch.device("meta"):
        model = (ESMCForMaskedLM if head else ESMCModel)(cfg)
    load_esmc_state_dict(model, state_dict)
    model.eval()
    return model.to(device=device if device is not None else "cpu", dtype=dtype if dtype is not None else torch.float32)


def _config_from_weights(sd: dict) -> ESMCConfig:
    """The shape of an EvolutionaryScale ``.pth`` (no config.json): C from the embedding, L from
    the blocks, F from ffn.3; H = C / 64 (the head dim of every published size)."""
    sd = map_esmc_keys(sd)
    if "embed.weight" not in sd:
        raise bad_value(
            "checkpoint", "an ESM C state dict (embed.weight, transformer.blocks...)", f"keys {sorted(sd)[:5]}"
        )
    V, C = sd["embed.weight"].shape
    L = len({k.split(".")[2] for k in sd if k.startswith("transformer.blocks.")})
    F_ = sd["transformer.blocks.0.ffn.3.weight"].shape[1] if L else None
    return ESMCConfig(
        vocab_size=V, hidden_size=C, num_hidden_layers=L, num_attention_heads=C // 64, intermediate_size=F_
    )


def load_esmc(path, *, attn_backend=None, dtype=None, device=None, config: dict | None = None) -> ESMCForMaskedLM:
    """ESM C from a local directory (config.json of ESM++ / transformers ESMC / ours + safetensors
    or .bin), EvolutionaryScale's raw ``.pth`` (a file, or a directory holding
    ``data/weights/esmc_*.pth``; the shape is read from the weights), or a hub id. Strict; eval
    mode; float32 unless ``dtype``. ``attn_backend`` None: the one our checkpoint saved, else "auto"."""
    dtype = resolve_dtype(dtype)
    if not isinstance(path, (str, os.PathLike)):
        raise bad_type("path", "a directory, a .pth file or a hub id", type(path).__name__)
    path = os.fspath(path)
    pth = path if os.path.isfile(path) else None
    if (
        pth is None
        and os.path.isdir(os.path.join(path, "data", "weights"))
        and not os.path.isfile(os.path.join(path, "config.json"))
    ):
        found = sorted(f for f in os.listdir(os.path.join(path, "data", "weights")) if f.endswith((".pth", ".pt")))
        if len(found) != 1:
            raise bad_value("path", "an EvolutionaryScale ESM C directory with one data/weights/*.pth", found)
        pth = os.path.join(path, "data", "weights", found[0])
    if pth is not None:
        sd = torch.load(pth, map_location="cpu", weights_only=True)
        cfg = _config_from_weights(sd)
        cfg.attn_backend = backend_value(attn_backend or "auto")
        return build_esmc(cfg, sd, dtype=dtype, device=device)
    if not os.path.isdir(path):
        from .checkpoints import download

        path = download(path)
    if config is None:
        cfg_file = os.path.join(path, "config.json")
        if not os.path.isfile(cfg_file):
            raise bad_value(
                "path", "a directory with config.json (or EvolutionaryScale's data/weights/*.pth)", repr(path)
            )
        with open(cfg_file) as f:
            config = json.load(f)
    if attn_backend is None and config.get("model_type") == MODEL_TYPE:
        attn_backend = config.get("attn_backend")  # what our save_pretrained wrote
    cfg = ESMCConfig.from_config_dict(config, attn_backend=resolve_saved_backend(config, attn_backend))
    head = not (config.get("architectures") or ["ForMaskedLM"])[0].endswith("Model")
    model = build_esmc(cfg, read_weights(path), dtype=dtype, device=device, head=head)
    model.config._name_or_path = path
    return model
