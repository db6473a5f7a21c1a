"""Checks of ``compile_layers`` shared by the protein-model tests (ESM C, ANKH, E1): compiled vs
plain outputs without recompiles across token counts, the "auto" fallback after a failing
compile, and the default ("auto" on a CPU) compiling nothing."""

from __future__ import annotations

import warnings

import pytest
import torch

DEVICES_ENV = "ANYATTN_COMPILE_LAYERS_DEVICES"
FALLBACK = "compile_layers='auto' could not compile the layers"


def _tensors(out):
    """The tensors of a model output (NamedTuple of tensors, tuples of tensors and Nones), flat."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _tensors(o)]
    return []


def assert_same(got, want, tol: float, what: str) -> None:
    a, b = _tensors(got), _tensors(want)
    assert len(a) == len(b), f"{what}: {len(a)} tensors, expected {len(b)}"
    for i, (x, y) in enumerate(zip(a, b)):
        if x.numel():
            d = (x.double() - y.double()).abs().max().item()
            scale = max(1.0, y.double().abs().max().item())
            assert d <= tol * scale, f"{what}, tensor {i} of shape {tuple(x.shape)}: max abs diff {d:.3g}"


def compiled_equals_plain_without_recompiles(model, runs, tol: float = 1e-4) -> None:
    """``runs``: (name, fn(model) -> output) pairs, each a different token count in the layers.
    All of them run with ``model.compile_layers()`` (inductor), then with
    ``config.compile_layers = False``: outputs equal within ``tol`` (relative to max(1, |ref|)),
    and the compiled side traced two graphs in all (the two layer functions: no recompile for a
    new token count)."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    model.compile_layers()
    assert model.config.compile_layers is True  # compile_layers() is the explicit form of the switch
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*eager path")
        got = [(name, fn(model)) for name, fn in runs]
        graphs = dict(counters["stats"])
        model.config.compile_layers = False
        want = [fn(model) for _, fn in runs]
    assert graphs.get("unique_graphs") == 2, graphs
    for (name, g), w in zip(got, want):
        assert_same(g, w, tol, name)


def _failing_backend(gm, example_inputs):
    raise RuntimeError("no kernels today")


def auto_falls_back_once_with_a_warning(model, call, monkeypatch) -> None:
    """A compile that fails under "auto" (made to fail through ``compile_layers(backend=...)``,
    "auto" allowed on the CPU through ANYATTN_COMPILE_LAYERS_DEVICES): the forward warns once,
    returns the plain result, and later forwards run plain without a warning; an explicit
    ``compile_layers=True`` raises instead of falling back."""
    model.config.compile_layers = False
    with torch.no_grad():
        want = call(model)
    torch._dynamo.reset()
    model.compile_layers(backend=_failing_backend)
    with torch.no_grad(), pytest.raises(Exception, match="no kernels today"):
        call(model)  # True: the error surfaces
    model.config.compile_layers = "auto"
    monkeypatch.setenv(DEVICES_ENV, "cpu")
    with torch.no_grad(), pytest.warns(UserWarning, match=FALLBACK) as rec:
        got = call(model)
    assert sum(FALLBACK in str(w.message) for w in rec) == 1
    assert_same(got, want, 0.0, "after the fallback")
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error")  # one warning, not one per forward
        assert_same(call(model), want, 0.0, "the next forward")
    assert model.config.compile_layers == "auto"


def auto_compiles_nothing_on_cpu(model, call, monkeypatch) -> None:
    """The default ("auto") compiles for inference on CUDA only: on a CPU nothing is traced."""
    from torch._dynamo.utils import counters

    monkeypatch.delenv(DEVICES_ENV, raising=False)
    assert model.config.compile_layers == "auto"
    torch._dynamo.reset()
    counters.clear()
    with torch.no_grad():
        call(model)
    assert counters["stats"]["unique_graphs"] == 0
