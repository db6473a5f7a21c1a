"""ESM2 (Lin et al. 2023) on anyattn: HF transformers' ``EsmForMaskedLM`` with rotary positions,
as transformers ``PreTrainedModel`` s (``model_type`` "anyattn_esm2", registered with the Auto
classes on import of this module).

Shape legend:
    B batch rows   S row length   C hidden size   H heads   D head dim (C // H)   F FFN size
    T real tokens of the batch   V vocabulary   L layers

One layer (pre-LayerNorm)::

    x ──LN──> q,k,v = Linear(.)          q *= D**-0.5   (BEFORE rotary, as ESM does)
              q,k   = rotary(q,k)        float32 cos/sin, positions restart at 0 per sequence
              o     = anyattn.attention(q, k, v, mask=<batch structure>, scale=1.0)
    x = x + Linear(o)
    x = x + Linear(gelu(Linear(LN(x))))          (erf GELU, exactly ESM's)

Because q is pre-scaled, every backend is called with ``scale=1.0`` (DESIGN.md section 4; a port
that double-scaled on its flash path lost all agreement).

Batch structure, built once per forward and shared by every layer::

    input_ids (B, S)                            -> dense: every row is one sequence
    input_ids (B, S) + attention_mask (B, S)    -> SeqInfo.from_padding_mask (one host read)
    input_ids (B, S) + seq_info (SeqInfo)       -> packed documents (or padding) as given

    then, with padding or several rows:
      backend takes packed documents (flash_torch, flex, flash, kernels_flash; for "auto" the
      backend auto would choose), and ``pack_padded`` is "auto" or True:
          the real tokens are gathered into ONE row (1, T) of documents; embeddings, every layer
          and the LM head run on T tokens only; outputs are scattered back to (B, S), zeros at
          padding. (A packed row's tail padding is not computed either.)
      otherwise: anyattn.padding(info) / documents(info) on (B, S) (dense-mask backends: eager,
          sdpa, cudnn), padding rows computed and their values unspecified.

Rotary positions come from the SeqInfo (position inside each sequence). For right padding (HF's
convention for ESM) this equals HF's ``arange(S)``; for left padding HF shifts the positions of
the real tokens and we do not: our output does not depend on where the padding is.

Parameter names equal HF's ``EsmForMaskedLM.state_dict()`` keys (transformers 5.x layout, with
one ``esm.rotary_embeddings.inv_freq``); checkpoints written by transformers 4.x that store one
``inv_freq`` per layer load too (the first one is kept, as HF's own load hook does).

transformers is imported here (the ``models`` extra); ``import anyattn.models`` does not import
this module until an ESM2 name is used.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import warnings
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

if importlib.util.find_spec("transformers") is None:
    raise ImportError("anyattn.models.esm2 needs transformers: pip install 'anyattn[models]'")

from transformers import AutoConfig, AutoModel, AutoModelForMaskedLM, PreTrainedModel  # noqa: E402

from ..errors import bad_type, bad_value  # noqa: E402
from ..layout import SeqInfo  # noqa: E402
from ..packing import BatchPlan, plan_batch  # noqa: E402
from ._compile import LayerCompiler  # noqa: E402
from ._inputs import check_input_ids, keep_mask  # noqa: E402
from ._switches import AttnBackendSwitch, PackPaddedSwitch  # noqa: E402
from .esm2_config import ESM2_PRESETS, MODEL_TYPE, ESM2Config, esm2_flops  # noqa: E402
from .esm2_layers import (  # noqa: E402, F401  (the layer functions are part of this module's namespace)
    ESM2Layer,
    _ContactHead,
    _Embeddings,
    _Encoder,
    _gelu,
    _LMHead,
    _mask_ratio,
    _out_ffn,
    _qkv,
    _qkv_fused,
    _rope,
    _Rotary,
    _s_max,
)
from .checkpoints import check_state_dict, is_esm2_config, read_weights, resolve_saved_backend, strict_from_pretrained  # noqa: E402

__all__ = [
    "ESM2Config",
    "ESM2_PRESETS",
    "ESM2Model",
    "ESM2ForMaskedLM",
    "ESM2Output",
    "build_esm2",
    "esm2_flops",
    "is_esm2_config",
    "load_esm2",
    "load_hf_state_dict",
    "register_auto",
]

class ESM2Output(NamedTuple):
    """Every forward returns all six fields; the optional ones are None unless asked for. ``loss``
    comes first so that ``outputs[0]`` is the loss when ``labels`` are given (HF Trainer)."""

    loss: torch.Tensor | None  # masked-LM cross-entropy (labels given; -100 = ignored)
    logits: torch.Tensor | None  # (B, S, V); None from ESM2Model
    last_hidden_state: torch.Tensor  # (B, S, C), after emb_layer_norm_after
    hidden_states: tuple | None  # L + 1 tensors (B, S, C): embeddings, layers 1..L-1, last_hidden_state
    attentions: tuple | None  # L tensors (B, H, S, S) float32 (output_attentions=True)
    s_max: torch.Tensor | None  # (L, H) float32: max over the batch's visible pairs of ||q_i|| * ||k_j||


class ESM2PreTrainedModel(AttnBackendSwitch, PackPaddedSwitch, PreTrainedModel):
    config_class = ESM2Config
    base_model_prefix = "esm"
    _no_split_modules = ["ESM2Layer"]
    supports_gradient_checkpointing = False
    # transformers 4.x wrote one inv_freq per layer; position_ids was an old persistent buffer.
    # Both are derived, not learned (our single inv_freq is recomputed when absent).
    _keys_to_ignore_on_load_unexpected = [r"rotary_embeddings\.inv_freq$", r"position_ids$"]
    _keys_to_ignore_on_load_missing = [r"rotary_embeddings\.inv_freq$"]
    _keep_in_fp32_modules_strict = ["rotary_embeddings"]

    @torch.no_grad()
    def _init_weights(self, module):
        """Random weights like HF's initializer: normal(0, initializer_range), zero biases, unit
        LayerNorms; rotary inv_freq from rope_theta."""
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            module.weight.normal_(0.0, std)
            if module.bias is not None:
                module.bias.zero_()
        elif isinstance(module, nn.Embedding):
            module.weight.normal_(0.0, std)
            if module.padding_idx is not None:
                module.weight[module.padding_idx].zero_()
        elif isinstance(module, nn.LayerNorm):
            module.weight.fill_(1.0)
            module.bias.zero_()
        elif isinstance(module, _LMHead):
            module.bias.zero_()
        elif isinstance(module, _Rotary):
            module.inv_freq.copy_(module.compute_inv_freq(module.inv_freq.device))

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """transformers' ``from_pretrained``, strict: a checkpoint with unknown, missing or
        mis-shaped weights raises (listing them) instead of leaving weights at their random
        initialisation. ``strict=False`` restores transformers' warnings."""
        out = strict_from_pretrained(super().from_pretrained, cls.__name__, args, kwargs)
        model = out[0] if isinstance(out, tuple) else out
        t = getattr(model.config, "dplm_type", None)
        if t and cls.__name__ in ("ESM2Model", "ESM2ForMaskedLM"):  # the Auto classes' targets
            raise bad_value(
                "pretrained_model_name_or_path",
                "an ESM2 checkpoint for ESM2Model / ESM2ForMaskedLM (and the Auto classes): a DPLM "
                "checkpoint's forward differs (positions, default mask, DPLM-2's rescaling); load it with "
                "anyattn.models.load(path) or DPLMForMaskedLM / DPLM2ForMaskedLM.from_pretrained(path)",
                f"a DPLM checkpoint (dplm_type {t!r})",
            )  # fmt: skip
        return out


class ESM2Model(ESM2PreTrainedModel):
    """The encoder (HF ``EsmModel`` without the pooler). ``attn_backend`` switches every layer."""

    # the encoder alone may come from a masked-LM checkpoint: its head is not ours to load
    _keys_to_ignore_on_load_unexpected = [*ESM2PreTrainedModel._keys_to_ignore_on_load_unexpected, r"^lm_head\."]

    def __init__(self, config: ESM2Config):
        super().__init__(config)
        self.embeddings = _Embeddings(config)
        self.rotary_embeddings = _Rotary(config)
        self.encoder = _Encoder(config)
        self.contact_head = _ContactHead(config)
        # the layer functions, plain and compiled (by compile_layers(), explicitly or on first use)
        self._compiler = LayerCompiler("ESM2", (_qkv, _out_ffn))
        self.post_init()

    def get_input_embeddings(self):
        return self.embeddings.word_embeddings

    def set_input_embeddings(self, value):
        self.embeddings.word_embeddings = value

    def compile_layers(self, *, fuse_qkv: bool = False, **compile_kwargs) -> None:
        """torch.compile the dense compute of every layer (projections + rotary, and output
        projection + FFN + the next LayerNorm), leaving the attention call and the batch structure
        outside.

        The two compiled functions take tensors only, so one compile serves every layer; the
        token dimension is marked dynamic, so packed batches of any token count reuse it (no
        recompiles from batch to batch). ``fuse_qkv``: one (3C, C) projection instead of three.
        Why not ``torch.compile(model)``: the batch structure (SeqInfo) carries Python ints (the
        document lengths) that a whole-model graph would guard on, recompiling for every batch."""
        self._compiler.compile((_qkv_fused if fuse_qkv else _qkv, _out_ffn), compile_kwargs)
        self.config.compile_layers = True

    @property
    def _compiled_fns(self):
        """(compiled functions, dynamic), or None before the first compile."""
        return self._compiler.compiled

    def _plan(self, input_ids, attention_mask, seq_info, need_weights: bool) -> BatchPlan:
        """The batch plan of one forward (``anyattn.packing``: packed on backends that take
        packed documents natively, unless ``pack_padded`` says otherwise)."""
        on_cpu = isinstance(input_ids, torch.Tensor) and input_ids.device.type == "cpu"
        check_input_ids(input_ids, self.config.vocab_size, check_range=on_cpu or attention_mask is not None)
        if attention_mask is not None and seq_info is not None:
            raise bad_value("attention_mask/seq_info", "at most one of them", "both")
        keep = keep_mask(attention_mask, input_ids) if attention_mask is not None else None
        cfg = self.config
        plan = plan_batch(
            input_ids, keep, seq_info, backend=self.attn_backend, pack=cfg.pack_padded, heads=cfg.num_attention_heads,
            head_dim=cfg.head_dim, dtype=self.embeddings.word_embeddings.weight.dtype,
            grad=torch.is_grad_enabled() and self.training, need_weights=need_weights, pad_id=cfg.pad_token_id, scale=1.0,
        )  # fmt: skip
        info = plan.rows if plan.packed else plan.info
        longest = input_ids.shape[1] if info is None else info.max_seqlen
        if longest > cfg.max_position_embeddings:
            warnings.warn(
                f"ESM2: a sequence of {longest} tokens is longer than the {cfg.max_position_embeddings} "
                "the model was trained on",
                stacklevel=4,
            )
        return plan

    def _encode(self, input_ids, attention_mask, seq_info, inputs_embeds, output_hidden_states, output_attentions, output_s_max):
        """Run the encoder. Returns (plan, x after the final LayerNorm, hidden list, attentions,
        s_max), tensors in the layers' shape (see :class:`anyattn.packing.BatchPlan`)."""
        if inputs_embeds is not None:
            raise bad_value("inputs_embeds", "None (ESM2 takes input_ids: token dropout needs the <mask> positions)", "a tensor")
        plan = self._plan(input_ids, attention_mask, seq_info, bool(output_attentions))
        if output_attentions:
            warnings.warn(
                "ESM2: output_attentions=True runs this call's attention through the eager path "
                f"(anyattn.attention_with_weights); attn_backend stays {self.attn_backend!r}",
                stacklevel=3,
            )
        info = plan.info
        x = self.embeddings(plan.ids, info)
        if info is None:
            positions = torch.arange(plan.ids.shape[1], device=plan.ids.device).expand(plan.ids.shape)
        else:
            positions = info.positions
        cos, sin = self.rotary_embeddings(positions)
        hidden = [x] if output_hidden_states else None
        attns = [] if output_attentions else None
        smax = [] if output_s_max else None
        backend = self.attn_backend
        layers = self.encoder.layer
        # each layer returns the residual stream and the LayerNorm that follows it (the next
        # layer's attention LayerNorm, after the last layer the final one): see _out_ffn
        lns = [l.attention.LayerNorm for l in layers[1:]] + [self.encoder.emb_layer_norm_after]
        h = layers[0].attention.LayerNorm(x) if len(layers) else self.encoder.emb_layer_norm_after(x)
        x0, h0 = x, h

        def run_layers(fns, dynamic):
            x, h = x0, h0
            for acc in (hidden, attns, smax):
                if acc is not None:
                    del acc[1 if acc is hidden else 0 :]
            for layer, next_ln in zip(layers, lns):
                x, h, w, s = layer(x, h, next_ln, cos, sin, info, plan.mask, backend, fns, dynamic, bool(output_attentions), bool(output_s_max))
                for acc, val in ((hidden, x), (attns, w), (smax, s)):
                    if acc is not None:
                        acc.append(val)
            return h

        # after the final LayerNorm; "auto" compiled for the first time: a failing compile falls
        # back, once, with a warning (anyattn.models._compile)
        grad = torch.is_grad_enabled() and self.training
        x = self._compiler.run(self, plan.ids.device, grad, run_layers, stacklevel=3)
        if hidden is not None:
            hidden[-1] = x  # as HF (and fair-esm's repr_layers): the last entry is after the final LN
        return plan, x, hidden, attns, (torch.stack(smax) if smax is not None else None)

    @staticmethod
    def _to_rows(plan: BatchPlan, t: torch.Tensor) -> torch.Tensor:
        return plan.to_rows(t)

    def forward(
        self, input_ids=None, attention_mask=None, *, seq_info: SeqInfo | None = None, inputs_embeds=None,
        output_hidden_states: bool | None = False, output_attentions: bool | None = False, output_s_max: bool = False,
        return_dict: bool | None = None,
    ) -> ESM2Output:  # fmt: skip
        """input_ids (B, S); ``attention_mask`` (B, S) 1 = real token (a padded batch), or
        ``seq_info`` (a SeqInfo of packed documents, or of padding). Returns :class:`ESM2Output`
        with ``logits=None`` (``return_dict`` is accepted for HF callers; the result is always
        the same NamedTuple)."""
        plan, x, hidden, attns, smax = self._encode(
            input_ids, attention_mask, seq_info, inputs_embeds, output_hidden_states, output_attentions, output_s_max
        )
        rows = self._to_rows
        return ESM2Output(
            None, None, rows(plan, x), tuple(rows(plan, h) for h in hidden) if hidden is not None else None,
            tuple(attns) if attns is not None else None, smax,
        )  # fmt: skip

    def predict_contacts(self, input_ids, attention_mask=None) -> torch.Tensor:
        """Contact probabilities (B, S-2, S-2) from the attention maps (ESM's contact head)."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = self(input_ids, attention_mask=attention_mask, output_attentions=True)
        a = torch.stack(out.attentions, dim=1)
        m = attention_mask.to(a.dtype)
        a = a * m[:, None, None, None, :] * m[:, None, None, :, None]
        return self.contact_head(input_ids, a)


class ESM2ForMaskedLM(ESM2PreTrainedModel):
    """ESM2 with its LM head; ``state_dict()`` keys equal HF's ``EsmForMaskedLM``.

    ``model.attn_backend = "flex"`` switches every layer; ``model.esm`` is the encoder alone.
    """

    _tied_weights_keys = {"lm_head.decoder.weight": "esm.embeddings.word_embeddings.weight"}

    def __init__(self, config: ESM2Config):
        super().__init__(config)
        self.esm = ESM2Model(config)
        self.lm_head = _LMHead(config)
        if config.tie_word_embeddings:
            self.lm_head.decoder.weight = self.esm.embeddings.word_embeddings.weight
        self.post_init()

    def get_input_embeddings(self):
        return self.esm.embeddings.word_embeddings

    def set_input_embeddings(self, value):
        self.esm.embeddings.word_embeddings = value

    def get_output_embeddings(self):
        return self.lm_head.decoder

    def set_output_embeddings(self, new_embeddings):
        self.lm_head.decoder = new_embeddings

    def compile_layers(self, **kwargs) -> None:
        """See :meth:`ESM2Model.compile_layers`."""
        self.esm.compile_layers(**kwargs)

    def forward(
        self, input_ids=None, attention_mask=None, *, labels=None, seq_info: SeqInfo | None = None, inputs_embeds=None,
        output_hidden_states: bool | None = False, output_attentions: bool | None = False, output_s_max: bool = False,
        return_dict: bool | None = None,
    ) -> ESM2Output:  # fmt: skip
        """As :meth:`ESM2Model.forward`, plus ``logits`` (B, S, V) and, with ``labels`` (B, S)
        (-100 = ignored), the masked-LM ``loss``. On the packed path the LM head runs on the
        real tokens only."""
        esm = self.esm
        plan, x, hidden, attns, smax = esm._encode(
            input_ids, attention_mask, seq_info, inputs_embeds, output_hidden_states, output_attentions, output_s_max
        )
        logits = esm._to_rows(plan, self.lm_head(x))
        loss = None
        if labels is not None:
            if not isinstance(labels, torch.Tensor) or labels.shape != input_ids.shape:
                got = tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__
                raise bad_value("labels", f"a tensor of shape {tuple(input_ids.shape)} like input_ids", got)
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.to(logits.device).reshape(-1), ignore_index=-100)
        rows = esm._to_rows
        return ESM2Output(
            loss, logits, rows(plan, x), tuple(rows(plan, h) for h in hidden) if hidden is not None else None,
            tuple(attns) if attns is not None else None, smax,
        )  # fmt: skip

    def predict_contacts(self, input_ids, attention_mask=None) -> torch.Tensor:
        return self.esm.predict_contacts(input_ids, attention_mask)


# ---------------------------------------------------------------------------------------------
# Auto classes


def register_auto() -> None:
    """Register ESM2Config / ESM2Model / ESM2ForMaskedLM with transformers' AutoConfig, AutoModel
    and AutoModelForMaskedLM under model_type "anyattn_esm2" (idempotent; run on import)."""
    AutoConfig.register(MODEL_TYPE, ESM2Config, exist_ok=True)
    AutoModel.register(ESM2Config, ESM2Model, exist_ok=True)
    AutoModelForMaskedLM.register(ESM2Config, ESM2ForMaskedLM, exist_ok=True)


register_auto()


# ---------------------------------------------------------------------------------------------
# loading HF checkpoints

_OLD_INV_FREQ = ".attention.self.rotary_embeddings.inv_freq"  # transformers 4.x: one per layer
_IGNORED = ("esm.embeddings.position_ids",)  # a buffer older checkpoints saved; derived, not learned


def _map_hf_keys(state_dict: dict) -> dict:
    """HF checkpoint keys -> ours (the same names, up to the layout changes of transformers)."""
    # transformers 5.x save_pretrained writes LayerNorm.weight/bias as LayerNorm.gamma/beta (its
    # "legacy" renaming run backwards) and renames them back on load; so do we.
    sd = {}
    for k, v in state_dict.items():
        if k.endswith("LayerNorm.gamma"):
            k = k[: -len("gamma")] + "weight"
        elif k.endswith("LayerNorm.beta"):
            k = k[: -len("beta")] + "bias"
        sd[k] = v
    if sd and not any(k.startswith("esm.") for k in sd) and any(k.startswith("embeddings.") for k in sd):
        sd = {f"esm.{k}": v for k, v in sd.items()}  # saved from EsmModel rather than EsmForMaskedLM
    old = sorted(k for k in sd if k.endswith(_OLD_INV_FREQ))
    if old:
        sd.setdefault("esm.rotary_embeddings.inv_freq", sd[old[0]])
        for k in old:
            del sd[k]
    for k in _IGNORED:
        sd.pop(k, None)
    return sd


def load_hf_state_dict(model: ESM2ForMaskedLM, state_dict: dict) -> None:
    """Load an HF ``EsmForMaskedLM`` state dict (transformers 4.x or 5.x naming) into ``model``.

    Refuses unknown, missing or mis-shaped keys, listing them; nothing is silently left at its
    random initialisation. A missing ``lm_head.decoder.weight`` is accepted when the embeddings
    are tied (``save_pretrained`` drops the tied copy). A missing ``esm.rotary_embeddings.inv_freq``
    is recomputed from ``rope_theta`` (it is derived, not learned). ``model`` may live on the meta
    device (built without initialisation): the checkpoint tensors are then assigned, not copied.
    """
    if not isinstance(model, ESM2ForMaskedLM):
        raise bad_type("model", "an ESM2ForMaskedLM", type(model).__name__)
    sd = _map_hf_keys(state_dict)
    ours = model.state_dict()
    optional = {"esm.rotary_embeddings.inv_freq"}
    tie = model.config.tie_word_embeddings
    if tie:
        optional.add("lm_head.decoder.weight")
    check_state_dict(sd, ours, optional=optional, expected="the keys of an HF EsmForMaskedLM ESM2 checkpoint for this config")
    if tie and "lm_head.decoder.weight" in sd:
        if not torch.equal(sd["lm_head.decoder.weight"].cpu(), sd["esm.embeddings.word_embeddings.weight"].cpu()):
            raise bad_value("state_dict", "lm_head.decoder.weight equal to the word embeddings (tie_word_embeddings=True)", "different tensors")
        del sd["lm_head.decoder.weight"]
    rot = model.esm.rotary_embeddings
    meta = any(p.device.type == "meta" for p in model.parameters())
    if meta:
        model.load_state_dict(sd, strict=False, assign=True)  # completeness checked above
        if tie:
            model.lm_head.decoder.weight = model.esm.embeddings.word_embeddings.weight
    else:
        model.load_state_dict(sd, strict=False)
    inv = sd.get("esm.rotary_embeddings.inv_freq")
    # float32 always (a bf16 checkpoint's inv_freq is widened; a missing one recomputed)
    rot.inv_freq = inv.detach().to(torch.float32).clone() if inv is not None else rot.compute_inv_freq()


def build_esm2(cfg: ESM2Config, state_dict: dict, *, dtype=None, device=None) -> ESM2ForMaskedLM:
    """An ESM2ForMaskedLM holding exactly ``state_dict`` (HF key names, strict), in eval mode.
    Built on the meta device (no random initialisation); float32 unless ``dtype`` is given."""
    with torch.device("meta"):
        model = ESM2ForMaskedLM(cfg)
    load_hf_state_dict(model, state_dict)
    model.eval()
    model.to(device=device if device is not None else "cpu", dtype=dtype if dtype is not None else torch.float32)
    return model


def load_esm2(path: str, *, attn_backend=None, dtype=None, device=None) -> ESM2ForMaskedLM:
    """An ESM2 from a local HF-format directory (config.json + safetensors or .bin; HF's
    ``EsmForMaskedLM`` or ours), or a hub id (downloaded through huggingface_hub). Eval mode,
    float32 unless ``dtype`` is given. Prefer :func:`anyattn.models.load`, which detects the
    family.
    ``attn_backend`` None: the one an anyattn checkpoint saved, else "auto"."""
    if not isinstance(path, (str, os.PathLike)):
        raise bad_type("path", "a local directory or a hub id", type(path).__name__)
    path = os.fspath(path)
    if not os.path.isdir(path):
        from .checkpoints import download

        path = download(path)
    cfg_file = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_file):
        raise bad_value("path", "a directory with config.json", repr(path))
    with open(cfg_file) as f:
        raw = json.load(f)
    if not is_esm2_config(raw):
        raise bad_value(
            "config.json", "an ESM2 config (model_type 'esm' with rotary positions and architectures EsmForMaskedLM/EsmModel, or 'anyattn_esm2')",
            f"model_type {raw.get('model_type')!r}, position_embedding_type {raw.get('position_embedding_type')!r}, architectures {raw.get('architectures')}",
        )  # fmt: skip
    cfg = ESM2Config.from_hf_config(raw, attn_backend=resolve_saved_backend(raw, attn_backend))
    model = build_esm2(cfg, read_weights(path), dtype=dtype, device=device)
    model.config._name_or_path = path  # where load_tokenizer(model) finds vocab.txt (HF's convention)
    return model
