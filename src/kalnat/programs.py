"""Jitted programs made once per learner, and shared by learners that differ only in data.

A jitted function is traced and compiled again for every new Python function object, so a
program closing over a learner is built once per learner (and what it is for) and kept with
the learner: every call of ``fit`` or a keyed step on the same learner then reuses one
compiled program for each shape.

A learner (core or recurrent) or bank whose ``program_key()`` is not ``None`` shares its
programs with every live learner of an equal key: learners that differ only in their
hyperparameters (an argument of every program, never a constant in one) run the same programs,
on the same model or an equal one (:mod:`kalnat.models`' constructors give equal models for
equal arguments; a recurrent learner's cell: the same object). A learner built again with
another prior or forgetting, as a search over hyperparameters does, is then neither traced nor
compiled again. The table of shared programs holds them weakly: a program goes when the last
learner holding it goes (it keeps the learner that made it alive until then).

An owner marked by :func:`compile_quickly` has its chunk program (``kalnat.fit``'s scan,
:func:`kalnat.stream.chunk_fn`), its predictive (a core learner's or a bank's; a recurrent
learner's keeps XLA's defaults) and its keyed programs (:mod:`kalnat.keyed`)
compiled with :data:`QUICK_COMPILE` on a CPU, for a job short enough that XLA's optimisation
would cost more time than it saves (:func:`compiler_options`, :func:`jit`).
"""

from __future__ import annotations

import threading
import weakref
from typing import Callable, Hashable, Optional

__all__ = ["once", "jit", "jax_jit", "with_options", "QUICK_COMPILE", "compile_quickly", "compiler_options"]

# XLA's CPU compiler with its older elemental emitters in place of its MLIR fusion emitters:
# the default bank's chunk program on breast_cancer took ~0.65 s less of a cold `kalnat learn`
# (2.56 against 3.21 s), and a d = 32 EKF's scan ran 1.3 × longer a row, a d = 4 one's no
# longer, digits' bank (d = 585) 2 × longer (benchmarks/startup.py --quick-compile): for short
# jobs (kalnat.cli_runner.QUICK_WORK). LLVM's optimisation passes left out as well
# (xla_backend_optimization_level=0; the same benchmark with that XLA_FLAGS) saved another
# 0.4–0.55 s of that cold run but ran 3 × longer a row. Options of the
# compilation, not of the process (XLA_FLAGS), so that one learner's programs take them and an
# XLA that does not know one is a Python error, found once (:func:`compiler_options`), not an
# abort of the process.
QUICK_COMPILE = {"xla_cpu_use_fusion_emitters": False}
_TAKEN: dict = {}  # platform -> whether its compiler takes QUICK_COMPILE


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


def compile_quickly(owner, quick: bool = True) -> None:
    """Marks ``owner`` (a learner) so that its programs asked for from now on (``kalnat.fit``'s
    scan, its predictive, its keyed programs) are compiled with :data:`QUICK_COMPILE` where the
    compiler takes it (a CPU: :func:`compiler_options`): for a short job, whose compilation
    takes longer than its run. The results are the same to rounding. ``quick=False`` removes
    the mark."""
    owner.__dict__["_compile_quickly"] = bool(quick)  # the object's own: equal learners are not marked
    # a core learner's or a bank's predictive, cached by the learner: asked for again with the mark's key
    owner.__dict__.pop("_predict_jit", None)


def with_options(owner, key):
    """``(key, options)``: the program key of ``owner``'s program ``key`` and its compiler options
    (:func:`compiler_options`). A quickly compiled program's key holds its options, so it is
    never an equal default learner's (nor one of other options)."""
    options = compiler_options(owner)
    return (key, None) if options is None else ((key, tuple(sorted(options.items()))), options)


def jit(owner, key, fn, **kwargs):
    """``jax.jit(fn, **kwargs)`` made once per ``(owner, key)`` (:func:`once`), compiled with
    ``owner``'s compiler options where it has them (:func:`compile_quickly`)."""
    key, options = with_options(owner, key)
    return once(owner, key, lambda: jax_jit(fn, options, **kwargs))


def jax_jit(fn, options: Optional[dict], **kwargs):
    """``jax.jit``, given ``compiler_options`` only when there are some (a JAX before them
    takes no such argument; :func:`compiler_options` gives none there)."""
    import jax

    return jax.jit(fn, **kwargs) if options is None else jax.jit(fn, compiler_options=options, **kwargs)


def compiler_options(owner) -> Optional[dict]:
    """The compiler options of ``owner``'s programs: :data:`QUICK_COMPILE` for an owner marked
    by :func:`compile_quickly` on a CPU whose XLA takes them (tried once per process, on a
    one-operation program), else ``None`` (XLA's defaults)."""
    if not owner.__dict__.get("_compile_quickly"):
        return None
    import jax

    platform = jax.default_backend()
    if platform not in _TAKEN:
        taken = platform == "cpu"
        if taken:
            try:
                jax.jit(lambda x: x + 1, compiler_options=QUICK_COMPILE).lower(1.0).compile()
            except Exception:  # an XLA (or a jax.jit) without these options: its defaults
                taken = False
        _TAKEN[platform] = taken
    return dict(QUICK_COMPILE) if _TAKEN[platform] else None
