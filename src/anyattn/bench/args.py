"""Command-line value parsing shared by the ``bench kernels`` modes (errors name the option)."""

from __future__ import annotations

import torch

from . import UsageError

__all__ = ["device", "listopt", "posint", "shape"]


def listopt(name: str, value, valid) -> tuple[str, ...]:
    """A comma list (or a list) of names from ``valid``, de-duplicated in order."""
    items = value if isinstance(value, (list, tuple)) else str(value).split(",")
    items = tuple(str(x).strip() for x in items if str(x).strip())
    if not items:
        raise UsageError(f"--{name}: expected a comma list of {list(valid)}, got an empty list")
    bad = [x for x in items if x not in valid]
    if bad:
        raise UsageError(f"--{name}: unknown {bad}; expected a comma list of {list(valid)}")
    return tuple(dict.fromkeys(items))


def posint(name: str, v) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
        raise UsageError(f"--{name}: expected a positive integer, got {v!r}")
    return v


def shape(name: str, text: str, n: int, sep: str) -> tuple[int, ...]:
    """``n`` positive integers written with ``sep`` between them, e.g. "8x2048"."""
    parts = str(text).lower().split(sep)
    try:
        vals = tuple(int(x) for x in parts)
    except ValueError:
        vals = ()
    if len(vals) != n or any(x <= 0 for x in vals):
        example = sep.join(["8", "2048", "16", "128"][:n])
        raise UsageError(f"--{name}: expected {n} positive integers like {example!r}, got {text!r}")
    return vals


def device(value) -> str | None:
    """--device: None (default), "cuda" (refused without a GPU) or "cpu"."""
    if value is None:
        return None
    if value not in ("cuda", "cpu"):
        raise UsageError(f"--device: expected cuda or cpu, got {value!r}")
    if value == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: torch.cuda.is_available() is False on this machine")
    return value
