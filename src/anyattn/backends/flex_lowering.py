"""flex's choice of lowering: torch's Triton templates, or FlashAttention-4 CuTe kernels through
FlexAttention's ``kernel_options={"BACKEND": "FLASH"}`` (torch >= 2.11 with ``flash_attn.cute``).

Both compute the same ``score_mod`` / ``mask_mod`` / BlockMask; the choice is an internal option of
the ``flex`` backend, shown by ``explain`` ("lowering: FLASH" / "lowering: Triton (why)"). Torch
never falls back silently from an explicit ``BACKEND="FLASH"``: it raises at compile time, so a
call that ran with FLASH requested ran the FA4 kernel.

What the FLASH lowering cannot take, read from torch's ``_inductor/kernel/flex/`` (2.11 and 2.13)
and flash-attn-4 4.0.0b40 (``flash_attn/cute/interface.py``, ``config.py``); a call with any of
these uses Triton (``flash_refusal`` returns the reason):

* not CUDA, not Hopper (sm90) / Blackwell (sm100); dtype not fp16/bf16; head dims FA4 lacks
  (sm90: [8, 256]; sm100: [8, 128], (192, 128), (256, 256); multiples of 8);
* gradients through the lse (torch: "FLASH backend backward does not support differentiating
  through logsumexp"): sinks (combined through the lse) and ``return_lse`` with grad;
* score-term tensors that require grad (torch: "Input buffers require gradients");
* captured dynamic scalars (``ANYATTN_FLEX_DYNAMIC=1``);
* deterministic backward with a block mask below sm100;
* paged KV caches and decode-sized calls (they keep FlexDecoding / the unfused path).

``ANYATTN_FLEX_LOWERING``: ``auto`` (default: FLASH where the above allows, and Triton for a
variant whose FLASH compile failed), ``flash`` (flex refuses calls FLASH cannot serve, never
Triton), ``triton`` (never FLASH).
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch

from ..spec.masks import And, Not, Or
from ..spec.patterns import Dense, MaskFn
from ..spec.scores import Softcap, Sink

LOWERINGS = ("auto", "flash", "triton")
_FLASH_OPTS = {"BACKEND": "FLASH"}
FA4_INSTALL = 'the FLASH lowering needs flash-attn-4 (flash_attn.cute): pip install --pre "anyattn[fa4]"'


def _lowering_from_env() -> str:
    v = os.environ.get("ANYATTN_FLEX_LOWERING", "auto").strip().lower() or "auto"
    if v not in LOWERINGS:
        raise ValueError(f"ANYATTN_FLEX_LOWERING: expected one of {list(LOWERINGS)}, got {v!r}")
    return v


@functools.lru_cache(maxsize=None)
def _flash_probe() -> tuple[int, str | None]:
    """(compute capability major, None) where FlexAttention's FLASH lowering can run, else (0, why)."""
    from torch.nn.attention import flex_attention as fa

    opts = getattr(fa, "FlexKernelOptions", None)
    if opts is None or "BACKEND" not in getattr(opts, "__annotations__", {}):
        return 0, f"torch {torch.__version__} has no FlexAttention BACKEND option (FLASH needs torch >= 2.11)"
    try:
        found = importlib.util.find_spec("flash_attn.cute") is not None
    except (ImportError, ValueError):  # no flash_attn package at all
        found = False
    if not found:
        return 0, FA4_INSTALL
    if not torch.cuda.is_available():
        return 0, "the FLASH lowering needs a CUDA GPU"
    major, minor = torch.cuda.get_device_capability()
    if major not in (9, 10):
        return 0, f"the FLASH lowering runs on Hopper (sm90) and Blackwell (sm100), found compute capability {major}.{minor}"
    return major, None


def _flash_head_dims(D: int, Dv: int, arch: int) -> str | None:
    """FA4 4.0.0b40's head dims (bf16/fp16): sm90 [8, 256], sm100 [8, 128] or (192, 128) or (256, 256)."""
    if D % 8 or Dv % 8:
        return f"FA4 needs head dims that are multiples of 8, got D={D}, Dv={Dv}"
    if arch == 9:
        ok = 8 <= D <= 256 and 8 <= Dv <= 256
    else:
        ok = (D <= 128 and Dv <= 128) or (D, Dv) in ((192, 128), (256, 256))
    return None if ok else f"FA4 on sm{arch}x has no kernel for D={D}, Dv={Dv}"


def _grad_tensors(term) -> bool:
    """Whether a (structure-only) term holds a tensor that requires grad (a bias, ALiBi slopes)."""
    for name in getattr(term, "__dataclass_fields__", ()):
        v = getattr(term, name)
        if isinstance(v, torch.Tensor):
            if v.requires_grad:
                return True
        elif isinstance(v, tuple):
            if any(_grad_tensors(x) for x in v if hasattr(x, "__dataclass_fields__")):
                return True
        elif hasattr(v, "__dataclass_fields__") and _grad_tensors(v):
            return True
    return False


def flash_refusal(sig, probe, unfused_max_sq: int, dynamic: bool) -> str | None:
    """Why the FLASH lowering cannot compute calls of ``sig`` exactly (None: it can). Reads the
    signature only. ``probe() -> (arch, None | why)``: the machine (``_flash_probe``)."""
    if sig.device.type != "cuda":
        return "the FLASH lowering is CUDA-only"
    arch, why = probe()
    if why is not None:
        return why
    if sig.dtype not in (torch.float16, torch.bfloat16):
        return f"FA4 takes float16/bfloat16, got {sig.dtype}"
    why = _flash_head_dims(sig.D, sig.Dv, arch)
    if why is not None:
        return why
    if sig.paged is not None:
        return "paged KV caches keep the Triton kernels (FlexDecoding reads pages of any size)"
    if sig.Sq <= unfused_max_sq < sig.Sk:
        return "decode-sized calls run FlexAttention unfused (no kernel compiled per KV length)"
    if dynamic:
        return "ANYATTN_FLEX_DYNAMIC=1: FLASH cannot inline captured dynamic scalars"
    if sig.requires_grad:
        if sig.sink is not None or sig.return_lse:
            return "the FLASH backward does not differentiate through the lse (sinks, return_lse with grad)"
        if any(_grad_tensors(t) for t in sig.scores):
            return "the FLASH backward does not differentiate score-term tensors (a bias or slopes that require grad)"
        if torch.are_deterministic_algorithms_enabled() and sig.mask is not None and arch < 10:
            return "deterministic FLASH backward with a block mask needs sm100 (torch.use_deterministic_algorithms is on)"
        if arch == 9 and (sig.D not in _SM90_BWD_HEAD_DIMS or sig.Dv not in _SM90_BWD_HEAD_DIMS):
            return (
                f"the FLASH backward on sm90 is checked only at D, Dv in {sorted(_SM90_BWD_HEAD_DIMS)} (wrong "
                f"gradients at D=80), got D={sig.D}, Dv={sig.Dv}"
            )
        if sig.Hq != sig.Hkv and _gqa_bwd_unsafe(sig):
            # measured on sm90; sm100 was never run, and FA4 packs GQA heads into the query rows
            # there too (pack_gqa): kept off it as well until a run shows it exact
            return (
                "the FLASH backward gives wrong gradients with GQA for score terms other than softcap "
                "(alibi, bias, score_fn; measured on sm90) and is unchecked for masks that read the head index"
            )
    return None


# The FLASH backward on sm90 (torch 2.11, flash-attn-4 4.0.0b40, H100; benchmarks/results/round23,
# benchmarks/flash_grad_probe.py): against the float64 oracle, gradients matched at D = 64, 96 and
# 128 and were wrong at D=80 (errors of 1 to 10, with and without GQA); D=256 does not compile with
# a block mask. With GQA they were wrong for every score term that reads an index (alibi, bias with
# or without a head dimension, a score_fn of q and kv only) and right for softcap, causal and
# documents. sm100 was never run: the GQA rule is applied there too, the head-dim rule is not.
_SM90_BWD_HEAD_DIMS = frozenset({64, 96, 128})


def _gqa_bwd_unsafe(sig) -> bool:
    """Whether a call of ``sig`` has a score term other than softcap, or a mask that may read the
    head index (a mask function, a dense mask with a head dimension): what the sm90 FLASH
    backward with GQA got wrong or was never checked on."""

    def mask_reads_head(m) -> bool:
        if isinstance(m, (And, Or)):
            return any(mask_reads_head(t) for t in m.terms)
        if isinstance(m, Not):
            return mask_reads_head(m.term)
        if isinstance(m, MaskFn):
            return True
        if isinstance(m, Dense):
            t = m.mask
            return not isinstance(t, torch.Tensor) or (t.dim() >= 3 and t.shape[-3] != 1)
        return False

    if any(type(s) not in (Softcap, Sink) for s in sig.scores):
        return True
    return sig.mask is not None and mask_reads_head(sig.mask)
