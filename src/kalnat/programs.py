"""Jitted programs made once per learner.

A jitted function is traced and compiled again for every new Python function object, so a
program closing over a learner is built once per learner (and what it is for) and kept while
the learner lives: every call of ``fit``, ``update`` or a keyed step on the same learner then
reuses one compiled program for each shape.
"""

from __future__ import annotations

import weakref
from typing import Callable, Hashable

__all__ = ["once"]

_PROGRAMS: "weakref.WeakKeyDictionary[object, dict]" = weakref.WeakKeyDictionary()


def once(owner, key: Hashable, make: Callable):
    """``make()`` (a jitted function) the first time ``(owner, key)`` is asked for, the same
    object every time after, for as long as ``owner`` (a learner, compared by identity) lives."""
    made = _PROGRAMS.setdefault(owner, {})
    if key not in made:
        made[key] = make()
    return made[key]
