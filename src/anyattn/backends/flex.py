"""FlexAttention backend: terms lowered to ``mask_mod`` / ``score_mod``, compiled, cached.

* The mask becomes a ``BlockMask``, cached per call content: a repeated mask is never rebuilt.
  For masks made of documents, padding and windows (what packed training and serving use) the
  block structure is computed from the terms directly: per 128x128 tile, from the range of
  document ids and positions it covers (a few small tensor ops, no host sync). Other masks go
  through ``create_block_mask``, which evaluates the predicate on every (i, j) pair (on an H200
  ~5 ms for a 16k-token row, against a ~0.6 ms kernel: what a new packing per step would pay).
* Score terms are chained into one ``score_mod`` in the order given. A ``sink(...)`` is combined
  with the output through the kernel's lse (``out * sigmoid(lse - sink)``); FlexAttention's
  backward takes the lse's gradient, so training with sinks is exact (CUDA).
* One compiled entry point per variant structure (term types, static parameters, user
  functions) and geometry, each with its own code object and therefore its own dynamo cache:
  every entry compiles exactly once, and many variants in one process never exhaust a shared
  recompile limit. Document lengths, padding masks, prefix lengths and other term values are
  kernel inputs: changing them never recompiles. (Why not dynamic shapes: see ``_DYNAMIC``.)
* The unfused path never runs silently. An uncompiled ``flex_attention`` call materializes the
  full score matrix (seen at 7 TFLOP/s instead of ~300). If dynamo ever falls back to running
  the entry point eagerly (recompile limit hit, dynamo disabled), the entry point notices it is
  not being compiled and raises instead of computing.
* Rows that see no key are zeroed (from the lse) when the mask can produce them: the kernel
  multiplies whole tiles, so a NaN in a value such a row cannot see would reach it (0 * NaN).
* Where the mask is plain causal (diagonal on a block boundary) or absent and the score terms
  are finite, the Triton kernel is told so (``ROWS_GUARANTEED_SAFE``, ``BLOCKS_ARE_CONTIGUOUS``:
  no empty-row guard, no index reads between key blocks; see ``flex_blocks.kernel_guarantees``).
  ``explain`` says "kernel guarantees"; ``FlexBackend(kernel_guarantees=False)`` turns it off.
* Inside a caller's ``torch.compile`` region, ``flex_attention`` is called directly and becomes
  part of the caller's graph (with torch's default, Triton, lowering).
* Two lowerings of the same kernel (an internal option, shown by ``explain``): torch's Triton
  templates, or FlashAttention-4 CuTe kernels (``kernel_options={"BACKEND": "FLASH"}``, torch >=
  2.11 with ``flash_attn.cute`` installed, Hopper/Blackwell). FLASH is used where it is available
  and exact (``flash_refusal`` says why not; on sm90 that excludes gradients at some head dims and
  with GQA and index-reading score terms, measured wrong), else Triton, and Triton also where it
  was measured faster (``triton_beats_flash``); a FLASH compile failure in ``auto`` falls back to
  Triton for that variant. ``ANYATTN_FLEX_LOWERING=auto|flash|triton`` (or
  ``FlexBackend(lowering=...)``): ``flash`` refuses the calls FLASH cannot serve, ``triton`` never
  uses FLASH. See docs/fa4.md.
"""

from __future__ import annotations

import functools
import inspect
import os
import shutil
import types
import warnings

import torch

from .._cache import LRU
from ..errors import AnyAttnError
from ..spec import Softcap
from .base import AttentionBackend, Facts
from .flex_blocks import (
    GUARANTEES, clear_rows, kernel_guarantees, may_have_empty_rows, rows_seen, structured_block_mask,
)  # fmt: skip
from .flex_compile import GQA_COMPILE_FAILURE, OUT_OF_SHARED_MEMORY, code_ids, expand_kv, is_recompile_limit
from .flex_lowering import _FLASH_OPTS, LOWERINGS, _flash_probe, _lowering_from_env, flash_refusal
from .flex_paged import paged_block_mask
from .flex_tanh import fast_tanh as _tanh_op
from .flex_tanh import softcap_mod

# Static shapes, one compiled entry point per (variant structure, shapes, dtype, grad mode).
# Dynamic-shape FlexAttention fails to lower on the torch versions we test (torch 2.11 CUDA:
# "LoweringException: 'ShapeAsConstantBuffer' object has no attribute 'dtype'"; torch 2.13 CPU:
# "'Mul' object has no attribute 'get_name'"; python floats such as the scale become unbacked
# scalars), so each entry is compiled for one geometry, exactly once. Changing *document lengths*
# at a fixed sequence length never recompiles (they are tensors captured by the mask); a new
# sequence length compiles one new kernel. ANYATTN_FLEX_DYNAMIC=1 opts into dynamic shapes.
_DYNAMIC = os.environ.get("ANYATTN_FLEX_DYNAMIC", "0") == "1"

# calls with at most this many queries against more keys (and at most this many scores) run
# FlexAttention unfused: see FlexBackend.run
UNFUSED_MAX_SQ = 16
UNFUSED_MAX_SCORES = 2**26


class FlexFallbackError(AnyAttnError, RuntimeError):
    """The compiled FlexAttention kernel could not be used and the unfused path was refused."""


_FA = None
_HAS_AUX = False


@functools.lru_cache(maxsize=None)
def _flex_api():
    global _FA, _HAS_AUX
    from torch.nn.attention import flex_attention as fa

    _FA, _HAS_AUX = fa, "return_aux" in inspect.signature(fa.flex_attention).parameters
    return _FA, _HAS_AUX


# --------------------------------------------------------------------------------------------
# compiled entry points


def _entry_template(q, k, v, score_mod, block_mask, scale, enable_gqa, return_lse, opts=None):
    if not torch.compiler.is_compiling():
        # Traced by dynamo this branch is dead code. Executed, it means dynamo fell back to
        # running this function eagerly, which would run the unfused O(S^2) path.
        raise FlexFallbackError(
            "flex: torch.compile fell back to eager execution for this variant (recompile limit "
            f"{torch._dynamo.config.recompile_limit} reached, or dynamo disabled); refusing to run "
            "FlexAttention's unfused path. Raise torch._dynamo.config.recompile_limit, or keep the "
            "number of distinct variants, dtypes and grad modes per process bounded."
        )
    return _call_flex(q, k, v, score_mod, block_mask, scale, enable_gqa, return_lse, opts)


def _call_flex(q, k, v, score_mod, block_mask, scale, enable_gqa, return_lse, opts=None):
    fa, has_aux = _FA, _HAS_AUX  # plain globals: traced code must not call the lru_cache'd probe
    flash = opts is not None and opts.get("BACKEND") == "FLASH"  # (Triton may get options too)
    if return_lse and has_aux:
        out, aux = fa.flex_attention(
            q, k, v, score_mod=score_mod, block_mask=block_mask, scale=scale, enable_gqa=enable_gqa,
            return_aux=fa.AuxRequest(lse=True), kernel_options=opts,
        )  # fmt: skip
        # FLASH has no lse gradient; it is requested only where none is needed (see
        # flex_lowering), so the lse leaves here detached: an lse output that required grad would
        # hand the backward a (zero) lse cotangent, which the FLASH backward refuses
        return out, (aux.lse.detach() if flash else aux.lse)
    if return_lse:
        out, lse = fa.flex_attention(
            q, k, v, score_mod=score_mod, block_mask=block_mask, scale=scale, enable_gqa=enable_gqa, return_lse=True,
            kernel_options=opts,
        )
        return out, (lse.detach() if flash else lse)
    out = fa.flex_attention(
        q, k, v, score_mod=score_mod, block_mask=block_mask, scale=scale, enable_gqa=enable_gqa, kernel_options=opts
    )
    return out, None


# --------------------------------------------------------------------------------------------
# the backend


class FlexBackend(AttentionBackend):
    name = "flex"
    facts = Facts(packed_documents=True, score_fn=True, static_shapes=True)

    def __init__(
        self, *, unfused_max_sq: int = UNFUSED_MAX_SQ, lowering: str | None = None, flash_probe=_flash_probe,
        fast_tanh: bool = True, kernel_guarantees: bool = True,
    ):  # fmt: skip
        # calls of at most this many queries against more keys run FlexAttention unfused (exact,
        # no compilation per shape); 0: always the compiled kernel (a test seam)
        self.unfused_max_sq = unfused_max_sq
        self._flash_probe = flash_probe  # () -> (arch, None | why FLASH cannot run here)
        self.block_masks = LRU(64)  # content key -> BlockMask
        self._by_call = LRU(256)  # key -> (entry, score_mod, expand_kv, BlockMask, zero_empty, lowering, options)
        # "auto" | "flash" | "triton"; None: ANYATTN_FLEX_LOWERING (read when a call is first seen)
        self.lowering = lowering
        self.fast_tanh = fast_tanh  # softcap's tanh on CUDA Triton kernels (flex_tanh)
        self.kernel_guarantees = kernel_guarantees  # tell the Triton kernel what the mask guarantees
        self._entries: dict = {}
        self.flash_failed: dict = {}  # variant key -> why FLASH failed to compile (auto uses Triton for it)
        self.triton_stages: dict = {}  # variant key -> num_stages cap after a shared-memory compile failure
        self._ran: set = set()  # ids of entry points that have run once (compiled)
        self.stats = {"block_mask_builds": 0, "structured_block_masks": 0, "compiled_entries": 0, "gqa_expanded": 0,
                      "page_table_block_masks": 0, "flash_calls": 0, "triton_calls": 0, "flash_fallbacks": 0, "unfused_calls": 0,
                      "fewer_stages": 0}  # fmt: skip

    def available(self) -> str | None:
        try:
            _flex_api()
        except ImportError:
            return f"torch {torch.__version__} has no FlexAttention (needs torch >= 2.5)"
        if not torch.cuda.is_available():
            if tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2]) < (2, 6):
                return f"FlexAttention on CPU needs torch >= 2.6, found {torch.__version__}"
            if not any(shutil.which(c) for c in ("cc", "gcc", "clang", "g++")):
                return "FlexAttention on CPU compiles C++ through inductor, and no C/C++ compiler is on PATH"
        return None

    def supports(self, sig) -> str | None:
        dev = sig.device.type
        if dev not in ("cuda", "cpu"):
            return f"FlexAttention runs on CUDA or CPU, got {dev}"
        if dev == "cpu" and sig.requires_grad:
            return "FlexAttention has no backward on CPU (inputs require grad); use eager or sdpa, or a CUDA device"
        if dev == "cpu" and sig.return_lse:
            return "FlexAttention on CPU does not return the log-sum-exp; use eager, or a CUDA device"
        if dev == "cpu" and sig.sink is not None:
            return "sinks are combined through the log-sum-exp, which FlexAttention on CPU does not return; use eager, or a CUDA device"
        if sig.dropout_p > 0:
            return "FlexAttention has no dropout (dropout_p > 0); use eager, sdpa or cudnn"
        if sig.dtype == torch.float64:
            return "FlexAttention's compiled kernels do not take float64"
        if dev == "cuda" and sig.dtype not in (torch.float16, torch.bfloat16, torch.float32):
            return f"dtype {sig.dtype} is not supported by FlexAttention"
        if sig.D < 16 or sig.Dv < 16:
            return f"FlexAttention needs head dims >= 16, got D={sig.D}, Dv={sig.Dv}"
        if sig.need_weights:
            return "FlexAttention does not return attention weights"
        if self.lowering == "flash" and not torch.compiler.is_compiling():
            why = self.flash_refusal(sig)
            if why is not None:
                return f"the FLASH lowering is forced (ANYATTN_FLEX_LOWERING=flash) and cannot serve this call: {why}"
        if sig.paged is not None and dev == "cuda":
            g = sig.Hq // sig.Hkv
            decoding = sig.Sq < 128 and g & (g - 1) == 0  # FlexDecoding: key blocks of any page size
            if not decoding and sig.page_size % 128:
                return (
                    f"a paged KV cache with {sig.page_size}-token pages: FlexAttention's main kernel (used for "
                    f"Sq={sig.Sq} >= 128 or {g} query heads per kv head, not a power of 2) needs pages of a multiple "
                    "of 128 tokens; use page_size=128, or another backend (the pages are gathered for it)"
                )
        return None

    @property
    def lowering(self) -> str:
        return _lowering_from_env() if self._lowering is None else self._lowering

    @lowering.setter
    def lowering(self, value: str | None) -> None:
        """Force a lowering (None: the environment's); callers then drop cached decisions
        (``anyattn.clear_caches()``), which were taken under the previous one."""
        if value is not None and value not in LOWERINGS:
            raise ValueError(f"lowering: expected one of {list(LOWERINGS)} or None, got {value!r}")
        self._lowering = value
        self._by_call.clear()

    @property
    def fast_tanh(self) -> bool:
        """softcap's tanh in Triton kernels on CUDA: ``tanh.approx.f32`` (True, the default) or
        libdevice's accurate tanh (False); see flex_tanh. Setting it drops the cached per-call
        decisions (their score_mods were built under the previous setting)."""
        return self._fast_tanh

    @fast_tanh.setter
    def fast_tanh(self, value: bool) -> None:
        self._fast_tanh = bool(value)
        self._by_call.clear()

    @property
    def kernel_guarantees(self) -> bool:
        """Whether flex's Triton kernels are told what a plain causal (or absent) mask with finite
        score terms guarantees (``flex_blocks.kernel_guarantees``: no empty-row guard, no index
        reads between key blocks). Setting it drops the cached per-call decisions."""
        return self._kernel_guarantees

    @kernel_guarantees.setter
    def kernel_guarantees(self, value: bool) -> None:
        self._kernel_guarantees = bool(value)
        self._by_call.clear()

    def promises(self, sig) -> bool:
        """Whether calls of ``sig`` on the Triton lowering get the kernel guarantees."""
        return self._kernel_guarantees and kernel_guarantees(sig)

    def triton_options(self, sig) -> dict | None:
        """The ``kernel_options`` of calls of ``sig`` on the Triton lowering (None: torch's defaults):
        the kernel guarantees where they hold, and a pipeline-stage cap for a variant whose
        default kernel ran out of shared memory (``triton_stages``)."""
        opts = GUARANTEES if self.promises(sig) else None
        stages = self.triton_stages.get(self._variant(sig))
        return opts if stages is None else {**(opts or {}), "num_stages": stages}

    def clear(self) -> None:
        self.block_masks.clear()
        self._by_call.clear()
        self.flash_failed.clear()
        self.triton_stages.clear()
        clear_rows()

    # -- lowering choice (FLASH / Triton) ---------------------------------------------------
    def flash_refusal(self, sig) -> str | None:
        """Why the FLASH lowering cannot compute calls of ``sig`` exactly (None: it can)."""
        return flash_refusal(sig, self._flash_probe, self.unfused_max_sq, _DYNAMIC)

    def _variant(self, sig) -> tuple:
        return (sig.mask.structure if sig.mask is not None else None, tuple(s.structure for s in sig.scores),
                sig.D, sig.Dv, sig.dtype, sig.requires_grad)  # fmt: skip

    def lowering_for(self, sig) -> tuple[str, str]:
        """("flash" | "triton", why) for calls of ``sig``."""
        if self.lowering == "triton":
            return "triton", "ANYATTN_FLEX_LOWERING=triton"
        why = self.flash_refusal(sig)
        if why is None:
            if self.lowering != "auto":
                return "flash", ""
            failed = self.flash_failed.get(self._variant(sig))
            if failed:
                return "triton", f"FLASH failed to compile this variant: {failed}"
            if self.triton_beats_flash(sig):
                return "triton", "measured faster than FLASH for a softcap forward"
            return "flash", ""
        return "triton", why

    def triton_beats_flash(self, sig) -> bool:
        """Whether a call FLASH could serve runs faster on the Triton lowering, from measurements
        (benchmarks/results/round22, H100, 1 x 16 x 16384 x 128 bf16, useful TFLOP/s): a softcap
        forward (causal or no mask) with ``tanh.approx.f32`` and the kernel guarantees runs at 398
        on Triton against FLASH's 344 (round 21, 8 x 2048: 313 against 273). With gradients FLASH
        is faster (404 against 347), and so it is on documents and sliding windows at that shape.
        (ALiBi at 8 x 2048 ran slower in a round-23 row believed to be FLASH, a run that did not
        record the lowering: not acted on.) Measured on Hopper only: on Blackwell FLASH keeps
        every call."""
        scores = sig.logit_scores
        return (
            not sig.requires_grad and bool(scores) and all(type(s) is Softcap for s in scores)
            and self.uses_fast_tanh(sig, "triton") and self.promises(sig)
            and self._flash_probe()[0] == 9
        )  # fmt: skip

    def note(self, sig) -> str:
        """For ``explain``: which lowering flex uses for calls of ``sig``."""
        if sig.device.type != "cuda":
            return ""
        if sig.Sq <= self.unfused_max_sq < sig.Sk:
            return "lowering: unfused (decode-sized call; on a ContiguousKVCache: FlexDecoding, Triton, per key-length bucket)"
        low, why = self.lowering_for(sig)
        if low == "flash":
            return "lowering: FLASH (FlashAttention-4 CuTe kernel)"
        tanh = "; softcap's tanh: tanh.approx.f32" if self.uses_fast_tanh(sig, low) else ""
        promise = "; kernel guarantees: rows never empty, key blocks contiguous" if self.promises(sig) else ""
        stages = self.triton_stages.get(self._variant(sig))
        cap = f"; {stages} pipeline stages (the default kernel ran out of shared memory)" if stages else ""
        return f"lowering: Triton ({why}){tanh}{promise}{cap}"

    def _run_with_fewer_stages(self, call, fn, sm, bm, zero, want_lse, first):
        """Compile a Triton variant that ran out of shared memory with 2, then 1 pipeline stage;
        the cap is kept for the variant (later calls, new packings included, start with it)."""
        key, err = self._variant(call.sig), first
        for stages in (2, 1):
            if stages >= self.triton_stages.get(key, 3):
                continue
            self.triton_stages[key] = stages
            self.stats["fewer_stages"] += 1
            opts = self.triton_options(call.sig)
            try:
                out, lse = fn(call.q, call.k, call.v, sm, bm, call.scale, call.gqa, want_lse, opts)
            except Exception as e:  # noqa: BLE001 - only the same failure is retried
                if OUT_OF_SHARED_MEMORY not in str(e):
                    raise
                err = e
                continue
            if call.cacheable:
                self._by_call.put(call.key, (fn, sm, False, bm, zero, "triton", opts), call.tokens)
            return out, lse
        raise err

    def reads_pages(self, sig) -> bool:
        return True  # a BlockMask over the pool, through the page table (see _paged)

    # -- lowering -------------------------------------------------------------------------
    def _entry(self, key):
        """The compiled entry point for ``key``: a fresh code object (its own dynamo cache) of
        ``_entry_template``, compiled once."""
        fn = self._entries.get(key)
        if fn is None:
            name = f"anyattn_flex_{len(self._entries)}"
            raw = types.FunctionType(
                _entry_template.__code__.replace(co_name=name), _entry_template.__globals__, name, _entry_template.__defaults__
            )
            fn = torch.compile(raw, dynamic=_DYNAMIC, fullgraph=True)
            self._entries[key] = fn
            self.stats["compiled_entries"] += 1
        return fn

    def entry_for(self, call, return_lse: bool, lowering: str = "triton"):
        sig = call.sig
        key = (
            sig.mask.structure if sig.mask is not None else None, tuple(s.structure for s in sig.scores),
            code_ids(call.mask), tuple(code_ids(s) for s in call.scores), sig.device.type,
            None if _DYNAMIC else (tuple(call.q.shape), tuple(call.k.shape), tuple(call.v.shape)),
            sig.dtype, sig.requires_grad, return_lse, lowering,
        )  # fmt: skip
        return self._entry(key)

    def block_mask_for(self, call):
        """The BlockMask of a call's mask (None when there is no mask), built once per content."""
        if call.mask is None:
            return None
        key = call.key
        bm = self.block_masks.get(key) if call.cacheable else None
        if bm is not None:
            return bm
        fa = _FA if _FA is not None else _flex_api()[0]
        geo = call.geo
        bound = call.bound_mask()
        pred = bound.pred

        def mask_mod(b, h, q_idx, kv_idx):
            return pred(b, h, q_idx, kv_idx)

        mask_mod.__name__ = f"anyattn_mask:{call.mask!r}"
        bm = None if torch.compiler.is_compiling() else structured_block_mask(call, mask_mod, call.requires_grad)
        counting = not torch.compiler.is_compiling()  # a counter read while tracing becomes a guard
        if bm is None:
            bm = fa.create_block_mask(
                mask_mod, geo.B if bound.uses_b else None, geo.H if bound.uses_h else None, geo.Sq, geo.Sk, device=geo.device
            )
        elif counting:
            self.stats["structured_block_masks"] += 1
        if counting:
            self.stats["block_mask_builds"] += 1
        if call.cacheable:
            self.block_masks.put(key, bm, call.tokens)
        return bm

    def uses_fast_tanh(self, sig, lowering: str = "triton") -> bool:
        """Whether calls of ``sig`` get ``softcap``'s tanh as ``tanh.approx.f32`` (flex_tanh): a
        softcap term, CUDA, a compiled Triton kernel (``lowering`` "triton"; not "flash", not the
        "unfused" decode path, whose eager math gains nothing), ``fast_tanh`` on, and a torch
        that can lower it."""
        return (
            self.fast_tanh and lowering == "triton" and sig.device.type == "cuda"
            and any(type(s) is Softcap for s in sig.logit_scores) and _tanh_op() is not None
        )  # fmt: skip

    def score_mod_for(self, call, lowering: str = "triton"):
        bound = call.bound_scores()
        if self.uses_fast_tanh(call.sig, lowering):
            op = _tanh_op()
            mods = [softcap_mod(t.cap, op) if type(t) is Softcap else bs.mod for t, bs in zip(call.logit_scores, bound)]
        else:
            mods = [bs.mod for bs in bound]
        if not mods:
            return None
        if len(mods) == 1:
            return mods[0]

        def score_mod(score, b, h, q_idx, kv_idx):
            for m in mods:
                score = m(score, b, h, q_idx, kv_idx)
            return score

        return score_mod

    # -- paged KV caches ------------------------------------------------------------------
    def _paged(self, call):
        """(BlockMask over the whole pool, score_mod, pool-coordinate mask?) of a paged-KV call:
        see ``flex_paged.paged_block_mask``."""
        fa = _FA if _FA is not None else _flex_api()[0]
        return paged_block_mask(fa, call, self.stats)

    def _run_paged(self, call):
        hit = self._by_call.get(call.key) if call.cacheable else None
        geo = call.geo
        kp, vp = call.kv.pool()
        N = kp.shape[2]
        # The pool has a fixed shape, so the compiled kernel (FlexDecoding for few queries) is built
        # once per batch shape and reads only the listed pages; the unfused path would score every
        # slot of the pool. Unfused only on a CPU (compiling there costs ~20 s) and a small pool.
        unfused = (
            geo.device.type == "cpu" and geo.Sq <= self.unfused_max_sq and geo.B * geo.H * geo.Sq * N <= UNFUSED_MAX_SCORES
        )
        if hit is None:
            bm, sm, pooled = self._paged(call)
            zero = may_have_empty_rows(call)
            if zero and geo.device.type == "cpu" and not unfused:  # compiled CPU flex returns no lse
                zero = rows_seen(call)
            want_lse = call.return_lse or call.sink is not None or zero is True
            fn = None
            if not unfused:
                sig = call.sig
                # the pool-coordinate mask captures tensors of fixed shapes: one kernel for every step;
                # a logical-coordinate mask captures tensors of the logical key length: one per bucket
                fn = self._entry((
                    "paged", sig.mask.structure, tuple(x.structure for x in sig.scores), code_ids(call.mask),
                    tuple(code_ids(x) for x in call.scores), sig.device.type, tuple(call.q.shape), tuple(kp.shape),
                    tuple(vp.shape), sig.dtype, want_lse, None if pooled else geo.Sk,
                ))  # fmt: skip
            hit = (fn, sm, bm, zero, want_lse)
            if call.cacheable:
                self._by_call.put(call.key, hit, call.tokens)
        fn, sm, bm, zero, want_lse = hit
        if fn is None:  # few queries against a small pool: the unfused path, exact, no compilation
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*flex_attention.*")
                out, lse = _call_flex(call.q, kp, vp, sm, bm, call.scale, call.gqa, want_lse or geo.device.type == "cpu")
        else:
            out, lse = fn(call.q, kp, vp, sm, bm, call.scale, call.gqa, want_lse)
        return _finish(call, out, lse, zero)

    # -- running --------------------------------------------------------------------------
    def run(self, call):
        if _FA is None:
            _flex_api()
        if call.kv is not None:
            return self._run_paged(call)
        q, k, v = call.q, call.k, call.v
        if torch.compiler.is_compiling():  # inside the caller's compiled graph
            sink = call.sink
            out, lse = _call_flex(
                q, k, v, self.score_mod_for(call), self.block_mask_for(call), call.scale, call.gqa,
                call.return_lse or sink is not None, self.triton_options(call.sig),
            )  # fmt: skip
            if sink is not None:
                out, lse = sink.combine(out, lse)
            return out, (lse if call.return_lse else None)
        geo = call.geo
        if (
            geo.Sq <= self.unfused_max_sq < geo.Sk and geo.B * geo.H * geo.Sq * geo.Sk <= UNFUSED_MAX_SCORES
            and not (call.bucketed and geo.device.type == "cuda")
        ):  # fmt: skip
            # Decode-sized calls (a few queries against a KV cache that grows every step): the kernel
            # is compiled per shape, so each step would compile again. FlexAttention's unfused path
            # computes the same scores, mask and score_mod exactly, at O(Sq * Sk) like the kernel.
            # A ContiguousKVCache's calls (``call.bucketed``) keep their key length for many steps:
            # on CUDA they compile FlexDecoding once per bucket (a CPU compile costs ~20 s: unfused).
            self.stats["unfused_calls"] += 1
            zero = may_have_empty_rows(call)
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*flex_attention.*")
                out, lse = _call_flex(  # eager math: torch.tanh, which the op would run anyway
                    q, k, v, self.score_mod_for(call, "unfused"), self.block_mask_for(call), call.scale, call.gqa,
                    call.return_lse or call.sink is not None or (zero and geo.device.type != "cpu"),
                )  # fmt: skip
            return _finish(call, out, lse, zero)
        # one lookup on the hot path: the call key determines entry, score_mod, BlockMask, lowering
        hit = self._by_call.get(call.key) if call.cacheable else None
        if hit is None:
            zero = may_have_empty_rows(call)
            if zero and geo.device.type == "cpu":  # no lse on CPU: the rows come from the mask
                zero = rows_seen(call)
            want_lse = call.return_lse or call.sink is not None or zero is True
            low = self.lowering_for(call.sig)[0]
            opts = _FLASH_OPTS if low == "flash" else self.triton_options(call.sig)
            hit = (self.entry_for(call, want_lse, low), self.score_mod_for(call, low), False, self.block_mask_for(call), zero, low, opts)  # fmt: skip
            if call.cacheable:
                self._by_call.put(call.key, hit, call.tokens)
        fn, sm, expand, bm, zero, low, opts = hit
        want_lse = call.return_lse or call.sink is not None or zero is True
        if expand:
            k, v = expand_kv(call)
            out, lse = fn(q, k, v, sm, bm, call.scale, False, want_lse, opts)
            self.stats[f"{low}_calls"] += 1
            return _finish(call, out, lse, zero)
        try:
            out, lse = fn(q, k, v, sm, bm, call.scale, call.gqa, want_lse, opts)
        except Exception as e:  # noqa: BLE001 - re-raised below unless it is one of three known cases
            if is_recompile_limit(e):
                # fullgraph=True: dynamo raises at its recompile limit; say what it means
                raise FlexFallbackError(
                    f"flex: torch.compile reached its recompile limit ({torch._dynamo.config.recompile_limit}) for "
                    f"this variant; refusing to run FlexAttention's unfused path. Raise "
                    "torch._dynamo.config.recompile_limit or keep the number of input layouts per geometry bounded."
                ) from e
            if low == "flash" and self.lowering == "auto" and id(fn) not in self._ran:
                # FLASH failed to compile this variant (an op its CuTe codegen lacks, a constraint
                # of this torch/FA4 pair): the Triton lowering computes the same, exactly
                lines = [ln for ln in str(e).splitlines() if ln.strip()]
                self.flash_failed[self._variant(call.sig)] = f"{type(e).__name__}: {lines[0][:200] if lines else ''}"
                self.stats["flash_fallbacks"] += 1
                low, opts = "triton", self.triton_options(call.sig)
                fn, sm = self.entry_for(call, want_lse, low), self.score_mod_for(call, low)
                if call.cacheable:
                    self._by_call.put(call.key, (fn, sm, False, bm, zero, low, opts), call.tokens)
                out, lse = fn(q, k, v, sm, bm, call.scale, call.gqa, want_lse, opts)
            elif low == "triton" and OUT_OF_SHARED_MEMORY in str(e) and self.triton_stages.get(self._variant(call.sig), 3) > 1:
                # fewer software-pipeline stages need less shared memory: same math
                out, lse = self._run_with_fewer_stages(call, fn, sm, bm, zero, want_lse, e)
            elif call.gqa and GQA_COMPILE_FAILURE in str(e):
                self.stats["gqa_expanded"] += 1
                fn = self._entry(("expanded-kv", id(fn)))
                if call.cacheable:
                    self._by_call.put(call.key, (fn, sm, True, bm, zero, low, opts), call.tokens)
                k, v = expand_kv(call)
                out, lse = fn(q, k, v, sm, bm, call.scale, False, want_lse, opts)
            else:
                raise
        self._ran.add(id(fn))
        self.stats[f"{low}_calls"] += 1
        return _finish(call, out, lse, zero)


def _finish(call, out, lse, zero):
    """Rows that saw no key: exactly 0, whatever the values they could not see held. ``zero``:
    False, True (read the rows from the lse) or a (.., Sq, 1) bool tensor of rows that see a key.
    A sink is combined last, from the kernel's lse (whose gradient FlexAttention's backward takes)."""
    if zero is True and lse is not None:
        out = torch.where((lse == float("-inf"))[..., None], torch.zeros((), dtype=out.dtype, device=out.device), out)
    elif isinstance(zero, torch.Tensor):
        out = torch.where(zero, out, torch.zeros((), dtype=out.dtype, device=out.device))
    elif zero is True:  # CPU decode path: no lse
        out = torch.where(rows_seen(call), out, torch.zeros((), dtype=out.dtype, device=out.device))
    sink = call.sink
    if sink is not None:
        out, lse = sink.combine(out, lse)
    return out, (lse if call.return_lse else None)
