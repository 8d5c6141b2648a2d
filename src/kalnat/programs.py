"""Jitted programs made once per learner.

A jitted function is traced and compiled again for every new Python function object, so a
program closing over a learner is built once per learner (and what it is for) and kept with
the learner: every call of ``fit`` or a keyed step on the same learner then reuses one
compiled program for each shape.
"""

from __future__ import annotations

from typing import Callable, Hashable

__all__ = ["once"]


def once(owner, key: Hashable, make: Callable):
    """``make()`` (a jitted function) the first time ``(owner, key)`` is asked for, the same
    object every time after. Kept in ``owner``'s own ``__dict__`` (a learner's, as its jitted
    ``update`` is): the programs, which close over ``owner``, go when it goes."""
    made = owner.__dict__.setdefault("_programs", {})
    if key not in made:
        made[key] = make()
    return made[key]
