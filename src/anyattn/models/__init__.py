"""Models on anyattn: same weights and numbers as the reference implementation, every backend.

    from anyattn.models import ESM2ForMaskedLM, load_esm2
    model = load_esm2("path/to/hf_esm2_dir", attn_backend="auto")   # config.json + safetensors/.bin
    out = model(input_ids, attention_mask=attention_mask)            # logits, last_hidden_state, ...
    model.attn_backend = "flex"                                       # every layer, in place

Implemented so far: ESM2 (``esm2``). The models are plain ``torch.nn.Module``s whose parameter
names equal HF transformers' ``EsmForMaskedLM`` state_dict keys; transformers itself is only
needed to read an HF config object (``ESM2Config.from_hf_config``). See docs/models.md.
"""

from .esm2 import (
    ESM2_PRESETS,
    ESM2Config,
    ESM2ForMaskedLM,
    ESM2Model,
    ESM2Output,
    esm2_flops,
    load_esm2,
    load_hf_state_dict,
)

from .esm2 import __all__  # noqa: E402,F401  (one list of public names, kept in esm2.py)
