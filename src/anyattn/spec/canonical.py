"""The canonical form of a variant: one pure function per argument."""

from __future__ import annotations

from ..errors import bad_type, bad_value
from .masks import And, MaskTerm, Not, Or, Window
from .scores import ScoreTerm, Sink

def _flatten(cls, terms) -> list:
    out = []
    for t in terms:
        if isinstance(t, cls):
            out.extend(_flatten(cls, t.terms))
        else:
            out.append(t)
    return out


def _min_side(a, b):
    if a is None:
        return b
    if b is None:
        return a
    return min(a, b)


def _max_side(a, b):
    return None if a is None or b is None else max(a, b)


def canonical_mask(mask) -> MaskTerm | None:
    """The one canonical form of a mask (pure function).

    * ``&``/``|`` trees are flattened; ``~~x`` is ``x``;
    * windows meet into one window: ``causal() & sliding_window(1024)`` is
      ``sliding_window(1024)``; windows joined by ``|`` become the wider window (all windows
      contain the diagonal, so their union is a window);
    * ``sliding_window(None, None)`` (everything visible) disappears from ``&`` and returns None
      when alone.
    """
    if mask is None:
        return None
    if type(mask) is Window:  # the common case, first
        return None if mask.left is None and mask.right is None else mask
    if not isinstance(mask, MaskTerm):
        raise bad_type("mask", "a mask term such as causal() (or None)", type(mask).__name__)
    if isinstance(mask, Not):
        inner = canonical_mask(mask.term)
        if isinstance(inner, Not):
            return inner.term
        if inner is None:
            return Not(Window(None, None))
        return mask if inner is mask.term else Not(inner)
    if isinstance(mask, (And, Or)):
        hit = mask.__dict__.get("_canonical")  # set at construction (terms are immutable)
        return hit[0] if hit is not None else canonical_combination(mask)
    if isinstance(mask, Window) and mask.left is None and mask.right is None:
        return None
    return mask


def canonical_combination(mask):
    """The canonical form of an ``&`` / ``|`` (computed once, when it is built)."""
    cls = type(mask)
    windows = 0
    for t in mask.terms:  # the common case: leaves and at most one window, already canonical
        tt = type(t)
        if tt is Window:
            windows += 1
            if t.left is None and t.right is None:
                break
        elif tt in (And, Or, Not):
            break
    else:
        if windows <= 1:
            return mask
    if True:
        parts = [canonical_mask(t) for t in _flatten(cls, mask.terms)]
        out: list = []
        win_at = None
        for p in parts:
            if p is None:
                if cls is Or:
                    return None  # x | everything == everything
                continue
            if isinstance(p, cls):
                out.extend(p.terms)
                continue
            if isinstance(p, Window):
                if win_at is None:
                    win_at = len(out)
                    out.append(p)
                else:
                    w = out[win_at]
                    if cls is And:
                        out[win_at] = Window(_min_side(w.left, p.left), _min_side(w.right, p.right))
                    else:
                        out[win_at] = Window(_max_side(w.left, p.left), _max_side(w.right, p.right))
                continue
            out.append(p)
        out = [canonical_mask(t) if isinstance(t, Window) else t for t in out]
        out = [t for t in out if t is not None] if cls is And else out
        if any(t is None for t in out):  # an Or that merged into "everything"
            return None
        if not out:
            return None
        if len(out) == 1:
            return out[0]
        if len(out) == len(mask.terms) and all(a is b for a, b in zip(out, mask.terms)):
            return mask  # already canonical: no new object (and no new keys to compute)
        return cls(tuple(out))


def canonical_scores(score) -> tuple[ScoreTerm, ...]:
    """``score=`` as a tuple of score terms in application order."""
    if score is None:
        return ()
    if isinstance(score, ScoreTerm):
        return (score,)
    if isinstance(score, (list, tuple)):
        sinks = 0
        for i, s in enumerate(score):
            if not isinstance(s, ScoreTerm):
                raise bad_type(f"score[{i}]", "a score term such as softcap(50.0)", type(s).__name__)
            sinks += type(s) is Sink
        if sinks > 1:
            raise bad_value("score", "at most one sink(...) term", f"{sinks} sink terms")
        return tuple(score)
    raise bad_type("score", "a score term or a sequence of them (or None)", type(score).__name__)

