"""E1's configuration: the original config.json field names plus anyattn's switches, and the
published sizes (``E1_PRESETS``). Model and shape legend: ``e1.py``."""

from __future__ import annotations

from transformers import PretrainedConfig

from ..errors import bad_type, bad_value
from ._switches import backend_value
from ._compile import check_compile_layers
from .e1_tokenizer import _ORIGINAL_MODEL_TYPES, MODEL_TYPE, is_e1_config

__all__ = ["E1_PRESETS", "E1Config"]


class E1Config(PretrainedConfig):
    """E1 hyper-parameters, with the original config.json field names, plus ``attn_backend``.

    Defaults are E1-300m's (Profluent-Bio/E1-300m config.json); presets: :data:`E1_PRESETS`.
    """

    model_type = MODEL_TYPE

    def __init__(
        self,
        vocab_size: int = 34,
        hidden_size: int = 1024,
        intermediate_size: int = 3072,
        gated_mlp: bool = True,  # w2(act(w1 x) * w3 x); False: w2(act(w1 x))
        num_hidden_layers: int = 20,
        num_attention_heads: int = 16,
        num_key_value_heads: int | None = 16,  # GQA when < num_attention_heads (None: = heads)
        hidden_act: str = "silu",  # the FFN activation (ACT2FN name)
        rms_norm_eps: float = 1e-5,  # also the eps of the LM head's LayerNorm, as the original
        initializer_range: float = 0.02,
        pad_token_id: int = 0,
        bos_token_id: int = 1,
        eos_token_id: int = 2,
        tie_word_embeddings: bool = False,
        # layer i is global (block-causal across the sample's sequences) iff (i+1) % n == 0;
        # 0 = every layer within-sequence
        global_attention_every_n_layers: int = 3,
        max_num_sequences: int = 512,  # rows of embed_seq_id: sequences per sample
        max_num_positions_within_seq: int = 8192,  # within-sequence positions must be below this
        max_num_positions_global: int = 65536,
        rope_theta_within_seq: float = 10000.0,
        rope_theta_global: float = 500000.0,
        clip_qkv: float | None = 8.0,  # clamp q, k, v to [-clip, clip] before rotary; None = off
        attn_backend="auto",  # anyattn backend name, or a sequence of names
        # torch.compile the dense compute of every layer: "auto" (for inference on CUDA, where it
        # is safe: plain layers, triton present; compiled on the first forward), True, False
        compile_layers="auto",
        **kwargs,
    ):
        if num_key_value_heads is None:
            num_key_value_heads = num_attention_heads
        if hidden_size % num_attention_heads:
            raise bad_value("hidden_size", f"a multiple of num_attention_heads={num_attention_heads}", hidden_size)
        if num_attention_heads % num_key_value_heads:
            raise bad_value(
                "num_key_value_heads", f"a divisor of num_attention_heads={num_attention_heads}", num_key_value_heads
            )
        if clip_qkv is not None and not clip_qkv > 0:
            raise bad_value("clip_qkv", "None or a positive number", clip_qkv)
        if global_attention_every_n_layers < 0:
            raise bad_value(
                "global_attention_every_n_layers", "0 (none) or a positive int", global_attention_every_n_layers
            )
        attn_backend = backend_value(attn_backend)  # a list (a JSON round trip) becomes a tuple
        check_compile_layers(compile_layers)
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.gated_mlp = gated_mlp
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads
        self.hidden_act = hidden_act
        self.rms_norm_eps = rms_norm_eps
        self.initializer_range = initializer_range
        self.global_attention_every_n_layers = global_attention_every_n_layers
        self.max_num_sequences = max_num_sequences
        self.max_num_positions_within_seq = max_num_positions_within_seq
        self.max_num_positions_global = max_num_positions_global
        self.rope_theta_within_seq = float(rope_theta_within_seq)
        self.rope_theta_global = float(rope_theta_global)
        self.clip_qkv = clip_qkv
        self.attn_backend = attn_backend
        self.compile_layers = compile_layers
        super().__init__(
            pad_token_id=pad_token_id, bos_token_id=bos_token_id, eos_token_id=eos_token_id,
            tie_word_embeddings=tie_word_embeddings, **kwargs,
        )  # fmt: skip

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def is_global_layer(self, i: int) -> bool:
        n = self.global_attention_every_n_layers
        return n > 0 and (i + 1) % n == 0

    @classmethod
    def from_original(cls, config: dict, **overrides) -> E1Config:
        """From the original E1 config.json dict (``model_type`` "E1"). Unknown extra fields of
        the original (gradient checkpointing flags, dtype, ...) are kept as attributes."""
        if not isinstance(config, dict):
            raise bad_type("config", "a dict (the original E1 config.json)", type(config).__name__)
        if not is_e1_config(config):
            types = _ORIGINAL_MODEL_TYPES + (MODEL_TYPE,)
            raise bad_value("config", f"an E1 config.json (model_type in {types})", repr(config.get("model_type")))
        d = {
            k: v
            for k, v in config.items()
            if k not in ("model_type", "architectures", "auto_map", "transformers_version")
        }
        if "torch_dtype" in d:
            d.setdefault("dtype", d.pop("torch_dtype"))
        d.update(overrides)
        return cls(**d)


# Profluent-Bio/E1-300m and E1-600m config.json (via Synthyra's mirrors and the hub commit history;
# docs/e1.md). E1-150m's config.json was not found: load it from its directory.
E1_PRESETS: dict[str, dict] = {
    "E1-300m": dict(
        hidden_size=1024, intermediate_size=3072, num_hidden_layers=20, num_attention_heads=16, num_key_value_heads=16
    ),
    "E1-600m": dict(
        hidden_size=1280, intermediate_size=3840, num_hidden_layers=30, num_attention_heads=20, num_key_value_heads=20
    ),
}
