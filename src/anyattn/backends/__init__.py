"""Backend registry.

Every backend exposes the same entry points: ``NAME``, ``available() -> None | reason`` (can it
run on this machine at all), ``supports(call) -> None | reason`` (can it compute this call
exactly) and ``run(call) -> (out, lse | None)``. Adding a backend is one module and one line in
``REGISTRY``. Backends never import each other.
"""

from __future__ import annotations

from enum import Enum

from . import eager, flash, flash_torch, flex, sdpa


class Backend(str, Enum):
    """The closed set of backend names (plus ``auto``)."""

    AUTO = "auto"
    EAGER = "eager"
    SDPA = "sdpa"
    CUDNN = "cudnn"
    FLEX = "flex"
    FLASH_TORCH = "flash_torch"
    FLASH = "flash"
    KERNELS_FLASH = "kernels_flash"


REGISTRY = {
    "eager": eager,
    "sdpa": sdpa.SDPA,
    "cudnn": sdpa.CUDNN,
    "flex": flex,
    "flash_torch": flash_torch,
    "flash": flash.FLASH,
    "kernels_flash": flash.KERNELS_FLASH,
}
