"""Choosing a backend: capability checks, ranking, and a decision trace that explains itself.

Decisions read a :class:`anyattn.call.Signature` only (``supports`` is the cheap capability
query), so they are cached per signature: calls that differ only in term values (a new packing,
a fresh mask tensor) share one decision. :func:`choose` answers for a signature built without
tensors; models use it to ask what ``auto`` would pick for a batch before building the batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .backends import REGISTRY, Backend
from .errors import UnsupportedError, bad_value
from .ranking import is_small, ranking_for, variant_class, work

__all__ = ["Decision", "resolve", "choose", "backend_names", "check_backend", "facts_of"]


@dataclass
class Row:
    backend: str
    status: str  # "chosen" | "accepted" | "rejected" | "unavailable" | "not checked"
    reason: str = ""


@dataclass
class Decision:
    """Who could serve a call, who could not and why, and who won. Prints as a table."""

    call: str
    requested: tuple[str, ...]
    variant: str
    rows: list[Row] = field(default_factory=list)
    chosen: str | None = None

    def __str__(self) -> str:
        req = "auto" if self.requested == ("auto",) else ", ".join(self.requested)
        lines = [f"call:      {self.call}", f"requested: {req}   (variant class: {self.variant})"]
        w = max([len(r.backend) for r in self.rows] + [7])
        lines.append(f"  {'backend':<{w}}  {'status':<11}  reason")
        for r in self.rows:
            lines.append(f"  {r.backend:<{w}}  {r.status:<11}  {r.reason}")
        lines.append(f"chosen:    {self.chosen}" if self.chosen else "chosen:    none: no requested backend can serve this call")
        return "\n".join(lines)

    __repr__ = __str__

    def _repr_pretty_(self, p, cycle):  # IPython
        p.text(str(self))


_AVAILABILITY: dict = {}


def _constant_under_compile(fn):
    # Probing availability imports modules, which dynamo cannot trace; inside a caller's
    # torch.compile the probe runs once at trace time and its answer is a constant.
    marker = getattr(getattr(torch, "_dynamo", None), "assume_constant_result", None)
    return marker(fn) if marker is not None else fn


@_constant_under_compile
def availability(name: str) -> str | None:
    """None if the backend can run on this machine, else why not (cached per process in a plain
    dict, which torch.compile traces without a warning, unlike functools.lru_cache)."""
    if name in _AVAILABILITY:
        return _AVAILABILITY[name]
    try:
        why = REGISTRY[name].available()
    except ImportError as e:  # an optional package is missing: say which
        why = f"import failed: {e}"
    _AVAILABILITY[name] = why
    return why


def backend_names() -> tuple[str, ...]:
    return ("auto",) + tuple(REGISTRY)


_NORMALIZED: dict = {}  # hashable backend argument -> normalized tuple


def check_backend(backend) -> tuple[str, ...]:
    """Normalize ``backend=`` to a tuple of registered names; error lists the valid ones.

    Hashable arguments are remembered (one dict lookup on the eager hot path). While tracing the
    argument is normalized afresh, so that no compiled graph guards on that dict."""
    if torch.compiler.is_compiling():  # pure; no dict for the graph to guard on
        return _normalize(backend)
    try:
        hit = _NORMALIZED.get(backend)
    except TypeError:  # unhashable (a list): normalize every time
        return _normalize(backend)
    if hit is None:
        hit = _NORMALIZED[backend] = _normalize(backend)
    return hit


def _normalize(backend) -> tuple[str, ...]:
    if isinstance(backend, Backend):
        backend = backend.value
    if isinstance(backend, str):
        names = (backend,)
    elif isinstance(backend, (list, tuple)) and backend and all(isinstance(b, (str, Backend)) for b in backend):
        names = tuple(b.value if isinstance(b, Backend) else b for b in backend)
    else:
        raise bad_value("backend", f"one of {list(backend_names())} or a sequence of them", repr(backend))
    for n in names:
        if n != "auto" and n not in REGISTRY:
            raise bad_value("backend", f"one of {list(backend_names())}", repr(n))
    if "auto" in names and len(names) > 1:
        raise bad_value("backend", "'auto' alone, or a sequence of explicit backend names", repr(backend))
    return names


def resolve(
    sig, requested: tuple[str, ...], *, full: bool = False, exclude: tuple = (), describe: str | None = None,
    first_sight: bool = False,
):
    """Pick the backend for calls of signature ``sig``. Returns (backend, Decision).

    ``requested == ("auto",)``: walk the ranking for this device and variant; the first backend
    that is available and supports the signature wins. With ``full=True`` (explain) every backend
    is checked; otherwise the ones ranked below the winner are listed as "not checked".
    Explicit names are tried in the order given; none is ever replaced by another. ``exclude``:
    backends that refused this call's values (see ``backends.base.Refusal``), with their reason.
    ``first_sight``: the call's term values were not seen before (auto's FIRST_SIGHT rows).
    """
    auto = requested == ("auto",)
    if auto:
        ranked = ranking_for(sig, first_sight=first_sight)
        # the first-sight note only where a FIRST_SIGHT row ranked this call (none on the CPU)
        first_sight = first_sight and tuple(ranked) != tuple(ranking_for(sig))
        order = [n for n in ranked if n in REGISTRY] + [n for n in REGISTRY if n not in ranked]
    else:
        order = list(requested)
    # the text form joins strings over the mask's terms: not traceable with symbolic sizes
    text = "<call traced by torch.compile>" if torch.compiler.is_compiling() else (describe or sig.describe())
    decision = Decision(text, requested, variant_class(sig))
    refused = dict(exclude)
    chosen = None
    for name in order:
        if chosen is not None and not full:
            decision.rows.append(Row(name, "not checked", "ranked below the chosen backend"))
            continue
        why = availability(name)
        if why is not None:
            decision.rows.append(Row(name, "unavailable", why))
            continue
        why = refused.get(name) or REGISTRY[name].supports(sig)
        if why is not None:
            decision.rows.append(Row(name, "rejected", why))
            continue
        if chosen is None:
            chosen = name
            why_first = "ranked first among the backends that can serve it"
            if auto and is_small(sig):
                why_first += f" (a small call, {work(sig):.1e} multiply-adds: ranked by host cost)"
            elif auto and first_sight:
                why_first += " (first sight of these term values: ranked by per-call cost, lowering included)"
            decision.rows.append(Row(name, "chosen", _noted(name, sig, why_first if auto else "requested")))
        else:
            why = "can serve it; ranked lower" if auto else "can serve it; requested later"
            decision.rows.append(Row(name, "accepted", _noted(name, sig, why)))
    decision.chosen = chosen
    if chosen is None:
        raise UnsupportedError(_unsupported_message(decision), decision)
    return REGISTRY[chosen], decision


def _noted(name: str, sig, reason: str) -> str:
    """``reason`` plus the backend's own note on how it runs the call (flex: which lowering)."""
    note = getattr(REGISTRY[name], "note", None)
    text = note(sig) if note is not None and not torch.compiler.is_compiling() else ""
    return f"{reason}; {text}" if text else reason


def choose(sig, backend="auto") -> str | None:
    """The backend ``attention`` would run for calls of signature ``sig`` with ``backend=``
    (a name, a list or "auto"), or None when none can. Nothing runs, no mask is built."""
    try:
        return resolve(sig, check_backend(backend))[1].chosen
    except UnsupportedError:
        return None


def facts_of(backend) -> list:
    """The facts of the backends a ``backend=`` argument names (every available one for "auto")."""
    names = check_backend(backend)
    if names == ("auto",):
        names = tuple(n for n in REGISTRY if availability(n) is None)
    return [REGISTRY[n].facts for n in names]


def _unsupported_message(d: Decision) -> str:
    lines = [f"no requested backend can compute this call exactly ({d.call})"]
    for r in d.rows:
        lines.append(f"  {r.backend}: {r.status}: {r.reason}")
    if d.requested != ("auto",):
        alts = [n for n in REGISTRY if n not in d.requested]
        lines.append(f"try backend='auto' or one of {alts}; anyattn.explain(...) shows what each backend says")
    return "\n".join(lines)
