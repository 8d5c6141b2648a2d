"""Jitted programs made once per learner, and shared by learners that differ only in data.

A jitted function is traced and compiled again for every new Python function object, so a
program closing over a learner is built once per learner (and what it is for) and kept with
the learner: every call of ``fit`` or a keyed step on the same learner then reuses one
compiled program for each shape.

A learner whose ``program_key()`` is not ``None`` also shares its programs with every live
learner of an equal key: learners that differ only in their hyperparameters (an argument of
every program, never a constant in one) run the same programs. A learner built again with
another prior or forgetting, as a search over hyperparameters does, is then neither traced nor
compiled again. The table of shared programs holds them weakly: a program goes when the last
learner holding it goes (it keeps the learner that made it alive until then).
"""

from __future__ import annotations

import threading
import weakref
from typing import Callable, Hashable

__all__ = ["once"]


# (program_key, what the program is for) -> the program, held weakly
_SHARED: "weakref.WeakValueDictionary" = weakref.WeakValueDictionary()
# one program per (owner, key) however many threads ask at once: two would each be compiled
# (``make`` itself only wraps a function, so holding the lock while it runs costs nothing)
_LOCK = threading.RLock()


def once(owner, key: Hashable, make: Callable):
    """``make()`` (a jitted function) the first time ``(owner, key)`` is asked for, the same
    object every time after. Kept in ``owner``'s own ``__dict__`` (a learner's, as its jitted
    ``update`` is): the programs, which close over ``owner``, go when it goes. An owner with a
    ``program_key()`` that is not ``None`` takes the program of a live owner of an equal key,
    if there is one, instead of making its own. Threads asking at once get one program."""
    made = owner.__dict__.get("_programs")
    if made is not None and key in made:  # (no lock once made: a dict's read is atomic)
        return made[key]
    with _LOCK:
        made = owner.__dict__.setdefault("_programs", {})
        if key not in made:
            program_key = getattr(owner, "program_key", None)
            shared = None if program_key is None else program_key()
            program = None if shared is None else _SHARED.get((shared, key))
            if program is None:
                program = make()
                if shared is not None:
                    _SHARED[(shared, key)] = program
            made[key] = program
        return made[key]
