"""Command-line value parsing shared by the ``bench kernels`` modes (errors name the option)."""

from __future__ import annotations

import os

import torch

from . import UsageError

__all__ = ["device", "listopt", "out_dir", "out_file", "posint", "shape"]


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


def out_dir(name: str, path) -> None:
    """An output directory option, checked before any work (a run that measures for minutes must
    not fail at its end): an existing directory, or a new one whose parent exists and is writable."""
    if path is None:
        return
    p = os.path.abspath(os.fspath(path))
    if os.path.exists(p) and not os.path.isdir(p):
        raise UsageError(f"--{name}: expected a directory (new or existing), got {path!r}, which is a file")
    parent = p if os.path.isdir(p) else os.path.dirname(p)
    while parent and not os.path.exists(parent):  # makedirs creates missing parents: check the first that exists
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK):
        raise UsageError(f"--{name}: expected a writable place for {path!r}, got {parent!r}, which is not writable")


def out_file(name: str, path) -> None:
    """An output file option, checked before any work: not a directory, in an existing writable directory."""
    if path is None:
        return
    p = os.path.abspath(os.fspath(path))
    if os.path.isdir(p):
        raise UsageError(f"--{name}: expected a file path, got {path!r}, which is a directory")
    parent = os.path.dirname(p)
    if not os.path.isdir(parent):
        raise UsageError(f"--{name}: expected a file in an existing directory, got {path!r} ({parent!r} does not exist)")
    if not os.access(parent, os.W_OK) or (os.path.exists(p) and not os.access(p, os.W_OK)):
        raise UsageError(f"--{name}: expected a writable file, got {path!r}")
