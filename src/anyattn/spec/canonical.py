"""The canonical form of a variant: one pure function per argument."""

from __future__ import annotations

from ..errors import bad_type, bad_value
from .masks import MaskTerm, Window, canonical_part
from .scores import ScoreTerm, Sink

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
    return canonical_part(mask)


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

