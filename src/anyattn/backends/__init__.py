"""Backend registry: name -> one instance of an :class:`AttentionBackend` subclass.

Every backend has the same shape (``backends/base.py``): ``name``, ``facts``, ``available()``,
``supports(signature)``, ``run(call)``, ``clear()``. Adding a backend is one module and one line
in ``REGISTRY``. Backends never import each other; code above them asks the protocol (``facts``,
``supports``) and never keeps its own list of backend names.
"""

from __future__ import annotations

from enum import Enum

from .base import AttentionBackend, Facts, Refusal
from .eager import EagerBackend
from .fa4 import Fa4Backend
from .flash import flash_backend, kernels_flash_backend
from .flash_torch import FlashTorchBackend
from .flex import FlexBackend
from .sdpa import SdpaBackend

__all__ = ["Backend", "REGISTRY", "AttentionBackend", "Facts", "Refusal", "facts"]


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
    FA4 = "fa4"


REGISTRY: dict[str, AttentionBackend] = {
    "eager": EagerBackend(),
    "sdpa": SdpaBackend("sdpa"),
    "cudnn": SdpaBackend("cudnn", only="cudnn"),
    "flex": FlexBackend(),
    "flash_torch": FlashTorchBackend(),
    "flash": flash_backend(),
    "kernels_flash": kernels_flash_backend(),
    "fa4": Fa4Backend(),
}


def facts(name: str) -> Facts:
    """The :class:`Facts` of a registered backend (what it can do, known without a call)."""
    return REGISTRY[name].facts
