"""The import layering of the package (DESIGN.md section 3), read from the source:

    errors, _cache  <-  layout  <-  spec  <-  call  <-  backends  <-  resolve  <-  api
        <-  packing, testing, nn  <-  models, hf  <-  embed, bench, cli

* every module-level or function-level import of an anyattn module points down this list (or
  stays inside its own layer);
* no import cycle anywhere in the package (lazy imports included: a cycle "fixed" by importing
  inside a function is still a cycle);
* backends never import each other (shared helpers: base, _varlen, _sdp_switch);
* model families import the shared ``models.checkpoints`` and never ``models.hub``, which sits
  above them (``load``, the registry).
"""

from __future__ import annotations

import ast
import os

import pytest

SRC = os.path.join(os.path.dirname(__file__), "..", "src")

# lower number = lower layer; a module may import its own layer or lower ones
LAYERS = [
    ("anyattn.errors", 0), ("anyattn._cache", 0), ("anyattn.layout", 1), ("anyattn.spec", 2), ("anyattn.call", 3),
    ("anyattn.backends", 4), ("anyattn.ranking", 4), ("anyattn.resolve", 5), ("anyattn.api", 6),
    ("anyattn.packing", 7), ("anyattn.testing", 7), ("anyattn.nn", 7), ("anyattn.models", 8), ("anyattn.hf", 8),
    ("anyattn.embed", 9), ("anyattn.bench", 9), ("anyattn.cli", 10), ("anyattn.__main__", 10), ("anyattn", 11),
]  # fmt: skip
SHARED_BACKEND_HELPERS = {
    "anyattn.backends", "anyattn.backends.base", "anyattn.backends._varlen", "anyattn.backends._sdp_switch",
    "anyattn.backends.flex_blocks",  # flex's own block structure, split out of flex.py for size
    "anyattn.backends.flex_compile",  # flex's known compile failures and entry keys, split out of flex.py for size
    "anyattn.backends.flex_lowering",  # flex's FLASH/Triton lowering choice, split out of flex.py for size
    "anyattn.backends.flex_paged",  # flex's BlockMask on a paged KV cache, split out of flex.py for size
    "anyattn.backends.flex_tanh",  # softcap's tanh in flex's CUDA Triton kernels (a custom op and its lowering)
}  # fmt: skip
FAMILIES = {"esm2", "esm2_config", "esm2_layers", "e1", "e1_batch", "e1_tokenizer", "dplm", "esmc", "esmc_checkpoints", "ankh", "_esmc_ankh_batch"}


def _modules() -> dict[str, str]:
    out = {}
    root = os.path.join(SRC, "anyattn")
    for dp, _, files in os.walk(root):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(dp, f)
                name = os.path.relpath(path, SRC)[:-3].replace(os.sep, ".")
                out[name.removesuffix(".__init__")] = path
    return out


def _imports(mods: dict[str, str]) -> dict[str, set[str]]:
    edges: dict[str, set[str]] = {m: set() for m in mods}
    for m, path in mods.items():
        pkg = m if path.endswith("__init__.py") else m.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(open(path).read())):
            targets = []
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    parts = pkg.split(".")
                    base = ".".join(parts[: len(parts) - (node.level - 1)])
                    mod = base + ("." + node.module if node.module else "")
                else:
                    mod = node.module or ""
                targets = [f"{mod}.{a.name}" for a in node.names] + [mod]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            for t in targets:
                if t in mods and t != m and t.startswith("anyattn"):
                    edges[m].add(t)
                    break
    return edges


MODS = _modules()
EDGES = _imports(MODS)


def _layer(mod: str) -> int:
    best = None
    for prefix, layer in LAYERS:
        if (mod == prefix or mod.startswith(prefix + ".")) and (best is None or len(prefix) > len(best[0])):
            best = (prefix, layer)
    assert best is not None, f"{mod}: not placed in a layer (add it to LAYERS)"
    return best[1]


@pytest.mark.parametrize("mod", sorted(MODS))
def test_imports_point_down(mod):
    for target in EDGES[mod]:
        if target == "anyattn":  # the package itself (its __init__ re-exports; leaves import it lazily for names)
            continue
        assert _layer(target) <= _layer(mod), f"{mod} (layer {_layer(mod)}) imports {target} (layer {_layer(target)})"


def test_no_import_cycles():
    index, low, stack, on, cycles, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in EDGES[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in MODS:
        if v not in index:
            visit(v)
    assert cycles == [], f"import cycles: {cycles}"


def test_backends_never_import_each_other():
    backends = {m for m in MODS if m.startswith("anyattn.backends.")}
    for m in backends - SHARED_BACKEND_HELPERS:
        bad = {t for t in EDGES[m] if t in backends and t not in SHARED_BACKEND_HELPERS}
        assert not bad, f"{m} imports {bad}"


def test_model_families_sit_below_the_loader():
    for name in FAMILIES:
        mod = f"anyattn.models.{name}"
        if mod in MODS:
            assert "anyattn.models.hub" not in EDGES[mod], f"{mod} imports models.hub (the loader above the families)"


def test_layout_imports_only_errors():
    assert EDGES["anyattn.layout"] <= {"anyattn.errors"}, EDGES["anyattn.layout"]
