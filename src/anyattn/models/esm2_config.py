"""ESM2's configuration: HF ``EsmConfig`` field names plus anyattn's switches, the published
sizes as named presets, and the FLOP count of a forward (``esm2_flops``)."""

from __future__ import annotations

from transformers import PretrainedConfig

from ..errors import bad_value
from ._switches import backend_value

__all__ = ["MODEL_TYPE", "ESM2Config", "ESM2_PRESETS", "esm2_flops"]

MODEL_TYPE = "anyattn_esm2"


class ESM2Config(PretrainedConfig):
    """ESM2 hyper-parameters with HF ``EsmConfig`` field names, plus ``attn_backend`` and
    ``pack_padded``. Defaults are ESM2-650M's; presets: :data:`ESM2_PRESETS`."""

    model_type = MODEL_TYPE

    def __init__(
        self,
        vocab_size: int = 33,
        hidden_size: int = 1280,
        num_hidden_layers: int = 33,
        num_attention_heads: int = 20,
        intermediate_size: int = 5120,
        max_position_embeddings: int = 1026,  # 1024 residues + <cls> + <eos>
        layer_norm_eps: float = 1e-5,
        pad_token_id: int = 1,
        mask_token_id: int = 32,
        # zero the <mask> embeddings and rescale by (1 - 0.12) / (1 - observed mask ratio)
        token_dropout: bool = True,
        # a LayerNorm right after the embeddings (ESM-1b: True; ESM2: False)
        emb_layer_norm_before: bool = False,
        rope_theta: float = 10000.0,
        # lm_head.decoder.weight is the word embedding matrix (ESM2 checkpoints: True)
        tie_word_embeddings: bool = True,
        hidden_dropout_prob: float = 0.0,  # training only
        attention_probs_dropout_prob: float = 0.0,  # training only
        initializer_range: float = 0.02,  # random init: normal(0, this)
        attn_backend="auto",  # anyattn backend name, or a sequence of names
        # padded / multi-row batches run as one packed row: "auto" (when the backend takes
        # packed documents natively), True (always, also on dense-mask backends), False (never)
        pack_padded="auto",
        # torch.compile the dense compute of every layer: "auto" (for inference on CUDA, where it
        # is safe: plain layers, triton present; compiled on the first forward), True, False
        compile_layers="auto",
        vocab_list: list | None = None,  # the tokens in id order, when not the ESM alphabet
        **kwargs,
    ):
        pos = kwargs.pop("position_embedding_type", "rotary")
        if pos != "rotary":
            raise bad_value("position_embedding_type", "'rotary' (ESM2; ESM-1b's absolute positions are not implemented)", repr(pos))
        if kwargs.pop("is_folding_model", False):
            raise bad_value("is_folding_model", "False (ESMFold is not implemented)", True)
        if kwargs.get("is_decoder", False):
            raise bad_value("is_decoder", "False (ESM2 is bidirectional)", True)
        kwargs.pop("esmfold_config", None)
        if hidden_size % num_attention_heads:
            raise bad_value("hidden_size", f"a multiple of num_attention_heads={num_attention_heads}", hidden_size)
        attn_backend = backend_value(attn_backend)  # a list (a JSON round trip) becomes a tuple
        if pack_padded not in ("auto", True, False):
            raise bad_value("pack_padded", "'auto', True or False", repr(pack_padded))
        if compile_layers not in ("auto", True, False):
            raise bad_value("compile_layers", "'auto', True or False", repr(compile_layers))
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.intermediate_size = intermediate_size
        self.max_position_embeddings = max_position_embeddings
        self.layer_norm_eps = layer_norm_eps
        self.mask_token_id = mask_token_id
        self.token_dropout = bool(token_dropout)
        self.emb_layer_norm_before = bool(emb_layer_norm_before)
        self.rope_theta = float(rope_theta)
        self.hidden_dropout_prob = float(hidden_dropout_prob or 0.0)
        self.attention_probs_dropout_prob = float(attention_probs_dropout_prob or 0.0)
        self.initializer_range = initializer_range
        self.attn_backend = attn_backend
        self.pack_padded = pack_padded
        self.compile_layers = compile_layers
        self.vocab_list = list(vocab_list) if vocab_list is not None else None
        super().__init__(pad_token_id=pad_token_id, tie_word_embeddings=tie_word_embeddings, **kwargs)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_name(cls, name: str, **overrides) -> ESM2Config:
        """A published size by name ("esm2_t33_650M", also "facebook/esm2_t33_650M_UR50D"): a new
        config each call."""
        key = name.split("/")[-1].removesuffix("_UR50D")
        if key not in _PRESET_SHAPES:
            raise bad_value("name", f"one of {list(_PRESET_SHAPES)}", repr(name))
        return cls(**{**_PRESET_SHAPES[key], **overrides})

    @classmethod
    def from_hf_config(cls, hf_config, **overrides) -> ESM2Config:
        """From a transformers ``EsmConfig`` (or its dict / config.json), or one of ours. Only
        rotary ESM (ESM2) is supported; ESM-1b's absolute positions and ESMFold are refused."""
        get = hf_config.get if isinstance(hf_config, dict) else lambda k, d=None: getattr(hf_config, k, d)
        pos = get("position_embedding_type", "absolute" if get("model_type") == "esm" else "rotary")
        if pos != "rotary":
            raise bad_value("hf_config.position_embedding_type", "'rotary' (ESM2)", repr(pos))
        if get("is_folding_model", False):
            raise bad_value("hf_config.is_folding_model", "False (ESMFold is not implemented)", True)
        if get("is_decoder", False):
            raise bad_value("hf_config.is_decoder", "False (ESM2 is bidirectional)", True)
        theta = get("rope_theta", None)
        if theta is None:  # transformers 5.x may carry it in rope_parameters
            theta = (get("rope_parameters", None) or {}).get("rope_theta", 10000.0)
        tie = get("tie_word_embeddings", True)
        kw = dict(
            vocab_size=get("vocab_size"), hidden_size=get("hidden_size"), num_hidden_layers=get("num_hidden_layers"),
            num_attention_heads=get("num_attention_heads"), intermediate_size=get("intermediate_size"),
            max_position_embeddings=get("max_position_embeddings", 1026), layer_norm_eps=get("layer_norm_eps", 1e-12),
            pad_token_id=get("pad_token_id", 1), mask_token_id=get("mask_token_id", 32),
            token_dropout=bool(get("token_dropout", False)), emb_layer_norm_before=bool(get("emb_layer_norm_before", False)),
            rope_theta=float(theta), tie_word_embeddings=True if tie is None else bool(tie),
            hidden_dropout_prob=float(get("hidden_dropout_prob", 0.0) or 0.0),
            attention_probs_dropout_prob=float(get("attention_probs_dropout_prob", 0.0) or 0.0),
            initializer_range=float(get("initializer_range", 0.02) or 0.02), vocab_list=get("vocab_list", None),
        )  # fmt: skip
        if get("model_type") == MODEL_TYPE:
            kw.update(
                attn_backend=get("attn_backend", "auto"), pack_padded=get("pack_padded", "auto"),
                compile_layers=get("compile_layers", "auto"),
            )  # fmt: skip
        missing = [k for k, v in kw.items() if v is None and k != "vocab_list"]
        if missing:
            raise bad_value("hf_config", "an ESM config with " + ", ".join(missing), "no value for them")
        kw.update(overrides)
        return cls(**kw)

    def to_hf_dict(self) -> dict:
        """Keyword arguments for ``transformers.EsmConfig(**d)`` describing the same network."""
        keys = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                "max_position_embeddings", "layer_norm_eps", "pad_token_id", "mask_token_id", "token_dropout",
                "emb_layer_norm_before", "rope_theta", "tie_word_embeddings", "hidden_dropout_prob",
                "attention_probs_dropout_prob", "initializer_range")  # fmt: skip
        d = {k: getattr(self, k) for k in keys}
        d.update(position_embedding_type="rotary", is_folding_model=False)
        return d


# facebook/esm2_*_UR50D (Lin et al. 2023, table S1; the hub config.json files): layers, hidden, heads
_PRESET_SHAPES: dict[str, dict] = {
    name: dict(num_hidden_layers=L, hidden_size=C, num_attention_heads=H, intermediate_size=4 * C)
    for name, (L, C, H) in {
        "esm2_t6_8M": (6, 320, 20), "esm2_t12_35M": (12, 480, 20), "esm2_t30_150M": (30, 640, 20),
        "esm2_t33_650M": (33, 1280, 20), "esm2_t36_3B": (36, 2560, 40), "esm2_t48_15B": (48, 5120, 40),
    }.items()  # fmt: skip
}
# name -> ESM2Config (ESM2Config.from_name gives a fresh copy to modify)
ESM2_PRESETS: dict[str, ESM2Config] = {name: ESM2Config(**kw) for name, kw in _PRESET_SHAPES.items()}


def esm2_flops(cfg: ESM2Config, lengths) -> int:
    """Forward FLOPs of the encoder (no LM head) over sequences of these lengths.

    Per sequence of length n::

        matmuls:    2 * n * L * (4*C*C + 2*C*F)      (q, k, v, o projections and the FFN)
        attention:  4 * n * n * L * C                (q k^T and p v over the visible pairs, H*D = C)

    Embeddings, LayerNorms, rotary and softmax are left out (DESIGN.md section 7). For the
    650M shape this is ~1.30 GFLOP per token plus ~0.08 for attention at ESM lengths.
    """
    L, C, F_ = cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size
    per_tok = 2 * L * (4 * C * C + 2 * C * F_)
    return sum(per_tok * n + 4 * n * n * L * C for n in lengths)


