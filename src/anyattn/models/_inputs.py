"""Checks of the token inputs shared by the protein models (ESM2, DPLM, DPLM-2, E1)."""

from __future__ import annotations

import torch

from ..errors import bad_type, bad_value

_ID_DTYPES = (torch.int64, torch.int32)  # what nn.Embedding indexes with


def check_input_ids(input_ids, vocab_size: int, *, check_range: bool) -> None:
    """``input_ids``: a (B, S) int64/int32 tensor. With ``check_range``, every id lies in
    [0, vocab_size) (one host read of its min and max: done for CPU tensors, and for CUDA ones
    only where the call reads the batch structure to the host anyway, so that the fast path
    stays free of synchronizations; an id out of range on CUDA otherwise ends in the embedding
    kernel's device-side assert)."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        got = f"shape {tuple(input_ids.shape)}" if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
        raise bad_value("input_ids", "a (B, S) integer tensor", got)
    if input_ids.dtype not in _ID_DTYPES:
        raise bad_type("input_ids", "an int64 (or int32) tensor of token ids", f"dtype {input_ids.dtype}")
    if check_range and input_ids.numel():
        lo, hi = torch.aminmax(input_ids)
        lo, hi = int(lo), int(hi)
        if lo < 0 or hi >= vocab_size:
            raise bad_value("input_ids", f"token ids in [0, {vocab_size}) (the model's vocabulary)", f"ids from {lo} to {hi}")


def keep_mask(attention_mask, input_ids) -> torch.Tensor:
    """HF's ``attention_mask`` (1 = real token, 0 = padding; bool, integer or floating 0/1) as a
    bool keep-mask on ``input_ids``' device."""
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.shape != input_ids.shape:
        got = f"shape {tuple(attention_mask.shape)}" if isinstance(attention_mask, torch.Tensor) else type(attention_mask).__name__
        raise bad_value("attention_mask", f"a tensor of shape {tuple(input_ids.shape)} like input_ids", got)
    if attention_mask.is_complex():
        raise bad_type("attention_mask", "a bool, integer or floating 0/1 tensor", f"dtype {attention_mask.dtype}")
    return attention_mask.to(input_ids.device) != 0
