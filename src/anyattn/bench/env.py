"""The environment recorded with every benchmark result (versions, device, timing method)."""

from __future__ import annotations

import datetime
import importlib.util
import platform

import torch

from .timing import timing_method

__all__ = ["environment", "version"]


def environment(device: str) -> dict:
    import anyattn

    dev = torch.device(device)
    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "device": dev.type,
        "device_name": (torch.cuda.get_device_name() if dev.type == "cuda" else f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if dev.type == "cuda" and torch.backends.cudnn.is_available() else None,
        "triton": version("triton"),
        "anyattn": anyattn.__version__,
        "platform": platform.platform(),
        "timing": timing_method(device),
    }  # fmt: skip
    return env


def version(dist: str):
    """The installed version of a distribution; None when not importable."""
    if importlib.util.find_spec(dist) is None:
        return None
    try:
        from importlib.metadata import version as _v

        return _v(dist)
    except Exception:  # noqa: BLE001 - importable but without metadata
        return "unknown"
