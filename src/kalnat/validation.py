"""Checks of the values a caller gives, shared by every entry point (no JAX: the command's
argument checks import it too)."""

from __future__ import annotations

import numbers

__all__ = ["plain", "positive_int"]


def positive_int(value, what: str) -> int:
    """``value`` as an ``int`` if it is a positive integer (a NumPy one too; not a bool, nor a
    float, which as a size or count is a mistake somewhere upstream), else a ``ValueError``
    naming ``what``."""
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{what} must be a positive integer, got {value!r}")
    return int(value)


def plain(value):
    """NumPy scalars as Python ones (``np.int64(3)`` as ``3``, ``np.str_('u')`` as ``'u'``):
    one key for both, and a message that shows a value as the user wrote it."""
    numpy_scalar = type(value).__module__ == "numpy" and getattr(value, "ndim", None) == 0  # (NumPy not imported)
    return value.item() if numpy_scalar else value
