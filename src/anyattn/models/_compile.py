"""``compile_layers``, shared by the protein models (ESM2 / DPLM, ESM C, ANKH, E1).

Each model splits one layer into tensor-only functions (its dense compute: projections, norms,
rotary, FFN) and the parts that stay outside a graph (the anyattn call, the batch structure with
its Python ints). ``torch.compile`` of those functions serves every layer and every batch: the
parameters are arguments, and the token dimension is marked dynamic by the caller. This module
holds the part that is the same for every family:

    config.compile_layers   False   the plain functions, always
                            True    compiled (on the first forward, or by model.compile_layers())
                            "auto"  compiled for inference (no grad, or eval mode) on a device of
                                    ANYATTN_COMPILE_LAYERS_DEVICES (default "cuda"; CUDA also needs
                                    triton); plain otherwise. The first compiled forward is
                                    checked: if compiling fails, that forward and every later one
                                    run the plain functions, after ONE warning.

Why not ``torch.compile(model)``: the batch structure (SeqInfo) carries Python ints (document
lengths) that a whole-model graph would guard on, recompiling for every batch.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import warnings
from collections.abc import Callable

import torch

from ..errors import bad_value

__all__ = ["COMPILE_ERRORS", "LayerCompiler", "auto_compiles", "check_compile_layers"]

# inductor generates CUDA kernels with triton; without it "auto" leaves CUDA layers plain
_HAS_TRITON = importlib.util.find_spec("triton") is not None
# device types where "auto" compiles (comma-separated); e.g. "cuda,cpu" on a machine where CPU
# inductor compiles are worth their seconds
_DEVICES_ENV = "ANYATTN_COMPILE_LAYERS_DEVICES"


def _compile_errors() -> tuple:
    errs = []
    for mod, name in (("torch._dynamo.exc", "TorchDynamoException"), ("torch._inductor.exc", "InductorError")):
        try:
            errs.append(getattr(importlib.import_module(mod), name))
        except (ImportError, AttributeError):
            pass
    return tuple(errs) or (RuntimeError,)


# what a failing torch.compile raises (dynamo's exceptions, inductor's wrapped errors): "auto"
# falls back on these, and only these (a bug in the layer code still raises)
COMPILE_ERRORS = _compile_errors()


def check_compile_layers(value):
    """A ``compile_layers`` setting: "auto", True or False (the error names the argument)."""
    if value not in ("auto", True, False):
        raise bad_value("compile_layers", "'auto', True or False", repr(value))
    return value


def auto_compiles(device: torch.device, grad: bool) -> bool:
    """Whether "auto" compiles a forward on ``device``: inference only (``grad`` False), on a
    device type listed in ANYATTN_COMPILE_LAYERS_DEVICES (default "cuda"; CUDA needs triton)."""
    if grad:
        return False
    devices = os.environ.get(_DEVICES_ENV, "cuda")
    if device.type not in {d.strip() for d in devices.split(",")}:
        return False
    return device.type != "cuda" or _HAS_TRITON


class LayerCompiler:
    """The ``compile_layers`` state of one model: its plain layer functions, the compiled ones
    (made by :meth:`compile`, explicitly or on the first forward that wants them), and what the
    "auto" check found. ``family`` names the model in the fallback warning."""

    def __init__(self, family: str, plain: tuple):
        self.family = family
        self.plain = tuple(plain)
        self.compiled: tuple | None = None  # (functions, mark the token dim dynamic)
        self.failed: str | None = None  # why "auto" fell back (set once)
        self.verified = False  # a compiled forward under "auto" ran through

    def compile(self, fns, compile_kwargs: dict) -> None:
        """``torch.compile`` each of ``fns`` with ``compile_kwargs``; the token dimension is
        marked dynamic unless ``dynamic=False`` is among them."""
        self.compiled = (
            tuple(torch.compile(f, **compile_kwargs) for f in fns),
            compile_kwargs.get("dynamic", None) is not False,
        )
        self.failed = None
        self.verified = False

    def fns(self, model, device: torch.device, grad: bool):
        """(layer functions, mark the token dim dynamic) for this forward, from
        ``model.config.compile_layers``; compiles on first use through ``model.compile_layers()``
        (which sets the setting to True: the user's setting is put back)."""
        mode = model.config.compile_layers
        if mode is False or (mode == "auto" and (self.failed or not auto_compiles(device, grad))):
            return self.plain, False
        if self.compiled is None:
            model.compile_layers()
            model.config.compile_layers = mode  # compiling on first use keeps the user's setting
        return self.compiled

    def run(self, model, device: torch.device, grad: bool, run_layers: Callable, *, stacklevel: int = 2):
        """``run_layers(fns, dynamic)`` with this forward's functions. Under "auto", the first
        compiled run is checked: a compile error (:data:`COMPILE_ERRORS`) makes it, and every
        later forward, run the plain functions, after one warning. ``run_layers`` must start from
        scratch each call (it may run twice)."""
        fns, dynamic = self.fns(model, device, grad)
        if fns is self.plain or model.config.compile_layers is True or self.verified:
            return run_layers(fns, dynamic)
        try:
            out = run_layers(fns, dynamic)
        except COMPILE_ERRORS as e:
            self.failed = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            warnings.warn(
                f"{self.family}: compile_layers='auto' could not compile the layers ({self.failed}); running them "
                "uncompiled from now on. Set model.config.compile_layers = False to skip the attempt.",
                stacklevel=stacklevel + 1,
            )
            return run_layers(*self.fns(model, device, False))
        self.verified = True
        return out
