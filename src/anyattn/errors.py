"""Exceptions raised by anyattn.

Every error anyattn raises on purpose derives from :class:`AnyAttnError`. Bad arguments raise the
built-in ``ValueError`` / ``TypeError`` *and* ``AnyAttnError`` (via the subclasses below), so both
``except ValueError`` and ``except anyattn.AnyAttnError`` work.
"""

from __future__ import annotations

__all__ = ["AnyAttnError", "ArgumentError", "ArgumentTypeError", "UnsupportedError"]


class AnyAttnError(Exception):
    """Base class of every exception anyattn raises on purpose."""


class ArgumentError(AnyAttnError, ValueError):
    """An argument has the wrong value or shape. The message names the argument, what was
    expected and what came."""


class ArgumentTypeError(AnyAttnError, TypeError):
    """An argument has the wrong type or dtype."""


class UnsupportedError(AnyAttnError):
    """No requested backend can compute this call exactly.

    ``decision`` holds the full trace: every backend considered and why it was rejected.
    """

    def __init__(self, message: str, decision=None):
        super().__init__(message)
        self.decision = decision


def bad_value(name: str, expected: str, got) -> ArgumentError:
    """Build the standard message: ``{name}: expected {expected}, got {got}``."""
    return ArgumentError(f"{name}: expected {expected}, got {got}")


def bad_type(name: str, expected: str, got) -> ArgumentTypeError:
    return ArgumentTypeError(f"{name}: expected {expected}, got {got}")
