"""Backend registry.

Every backend exposes the same entry points: ``NAME``, ``available() -> None | reason`` (can it
run on this machine at all), ``supports(call) -> None | reason`` (can it compute this call
exactly) and ``run(call) -> (out, lse | None)``. Adding a backend is one module and one line in
``REGISTRY``. Backends never import each other.
"""

from __future__ import annotations

from enum import Enum

from . import eager, flex, sdpa


class Backend(str, Enum):
    """The closed set of backend names (plus ``auto``)."""

    AUTO = "auto"
    EAGER = "eager"
    SDPA = "sdpa"
    CUDNN = "cudnn"
    FLEX = "flex"


REGISTRY = {
    "eager": eager,
    "sdpa": sdpa.SDPA,
    "cudnn": sdpa.CUDNN,
    "flex": flex,
}
