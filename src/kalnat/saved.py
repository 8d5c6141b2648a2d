"""The command's chunk programs kept across processes with ``jax.export``.

JAX's persistent compilation cache spares a new process the XLA compilation of a program it
compiled before, but not the tracing and lowering that compute the cache's key: for the
default bank's chunk program these were about half a second of a warm ``kalnat learn`` of 569
rows, a quarter of its time. A program exported once (serialised StableHLO) and read by the
next process is called without tracing the learner; its XLA compilation still comes from the
persistent cache.

A saved program is found by a *recipe*: text that determines the learner completely, which the
caller vouches for (the command's settings and the data's shape:
:func:`kalnat.cli_setup.build_learner` builds the same learner from them every time), together
with a digest of kalnat's own source, JAX's version and configuration, the platform, and the
arguments' structure, shapes and dtypes. Only a learner given a recipe (:func:`describe`) is
saved: one built in Python may close over anything, so it is traced every time.

A file that cannot be read or written is no error: the program is exported again, or used
without being kept. The folder is safe to delete.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import sys
import tempfile
import weakref
from typing import Callable, Sequence

import jax
import numpy as np
from jax import export
from jax.sharding import SingleDeviceSharding

from kalnat.programs import jax_jit

__all__ = ["describe", "jit"]

_RECIPES: "weakref.WeakKeyDictionary[object, tuple[str, str]]" = weakref.WeakKeyDictionary()
_SOURCE: list = []  # the digest of kalnat's source, computed once per process


def describe(learner, recipe: str, folder: str) -> None:
    """Declares that ``recipe`` determines ``learner`` completely, and that its programs are
    kept in ``folder``. Call it before the learner's first ``fit``."""
    _RECIPES[learner] = (recipe, folder)


def described(learner) -> bool:
    """Whether ``learner`` was given a recipe (:func:`describe`)."""
    return learner in _RECIPES


def jit(learner, name: str, fn: Callable, donate_argnums: Sequence[int] = (), compiler_options=None):
    """``jax.jit(fn, donate_argnums=…, compiler_options=…)``, or, for a learner given a recipe,
    a function that returns the same values from a program saved by an earlier process when
    there is one (the options apply to its compilation, not to the saved program).
    ``name`` tells ``fn`` apart from the learner's other programs."""
    if learner not in _RECIPES:
        return jax_jit(fn, compiler_options, donate_argnums=tuple(donate_argnums))
    recipe, folder = _RECIPES[learner]
    return _Saved(fn, f"{name}\n{recipe}", folder, tuple(donate_argnums), compiler_options)


def _source_digest() -> str:
    if not _SOURCE:
        root = os.path.dirname(os.path.abspath(__file__))
        h = hashlib.sha256()
        for here, dirs, files in os.walk(root):
            dirs.sort()
            for f in sorted(files):
                if f.endswith(".py"):
                    path = os.path.join(here, f)
                    h.update(os.path.relpath(path, root).encode())
                    with open(path, "rb") as fh:
                        h.update(fh.read())
        _SOURCE.append(h.hexdigest())
    return _SOURCE[0]


def _environment() -> str:
    """What besides the recipe and the arguments shapes a traced program: kalnat's source,
    JAX's version and flags (x64, matmul precision, …), the platform, Python's version."""
    import jaxlib

    # where caches and logs go changes no program: a cache folder moved keeps its programs
    flags = sorted((k, repr(v)) for k, v in jax.config.values.items() if "cache" not in k and "log" not in k)
    device = jax.devices()[0]
    return repr((_source_digest(), jax.__version__, jaxlib.__version__, device.platform,
                 device.device_kind, sys.version_info[:2], flags))


def _device(leaves):
    """Where ``jax.jit`` would run on ``leaves``: the device of an argument committed to one,
    else ``jax.default_device``'s, else the first device."""
    for a in leaves:
        if isinstance(a, jax.Array) and a.committed and len(a.devices()) == 1:
            return next(iter(a.devices()))
    device = jax.config.jax_default_device
    if isinstance(device, str):  # a platform's name
        return jax.devices(device)[0]
    return device if device is not None else jax.devices()[0]


class _Saved:
    """``fn`` called through programs exported once per argument signature."""

    def __init__(self, fn, recipe, folder, donate, options=None):
        self.fn, self.recipe, self.folder, self.donate, self.options = fn, recipe, folder, donate, options
        self.programs: dict = {}

    def __call__(self, *args):
        leaves, tree = jax.tree_util.tree_flatten(args)
        signature = (tree, tuple((a.shape, a.dtype) if hasattr(a, "dtype") else (np.shape(a), np.result_type(a))
                                 for a in leaves), _device(leaves))
        program = self.programs.get(signature)
        if program is None:
            program = self.programs[signature] = self._program(args, signature)
        return program(args, leaves)

    def _program(self, args, signature):
        tree, shapes, device = signature
        key = hashlib.sha256(repr((self.recipe, _environment(), str(tree), shapes, self.donate)).encode()).hexdigest()
        path = os.path.join(self.folder, f"{key}.program")
        exported, out_tree = self._read(path)
        if exported is None:
            try:
                exported, out_tree = self._export(tree, [jax.ShapeDtypeStruct(*s) for s in shapes])
            except Exception:  # a program jax.export does not take (a host callback): traced each run
                jitted = jax_jit(self.fn, self.options, donate_argnums=self.donate)
                return lambda args, leaves: jitted(*args)
            self._write(path, exported, out_tree)
        # the donated arguments' leaves, by their place among all leaves
        starts = np.cumsum([0] + [len(jax.tree_util.tree_leaves(a)) for a in args])
        donated = tuple(i for n in self.donate for i in range(starts[n], starts[n + 1]))
        # every argument placed on the default device: arrays from the host, from jnp and from
        # an earlier call differ in placement, and would otherwise each be a program of its own
        call = jax_jit(exported.call, self.options, donate_argnums=donated, in_shardings=SingleDeviceSharding(device))
        return lambda args, leaves: jax.tree_util.tree_unflatten(out_tree, call(*leaves))

    def _export(self, tree, avals):
        out_trees = []

        def flat(*leaves):
            out, out_tree = jax.tree_util.tree_flatten(self.fn(*jax.tree_util.tree_unflatten(tree, leaves)))
            out_trees.append(out_tree)
            return out

        exported = export.export(jax.jit(flat))(*avals)
        return exported, out_trees[0]

    @staticmethod
    def _read(path):
        try:
            with open(path, "rb") as f:
                blob, out_tree = pickle.load(f)
            program = export.deserialize(bytearray(blob)), out_tree
        except Exception:  # none yet, or unreadable (another version wrote it): export again
            return None, None
        try:  # its last use, which kalnat.cache's pruning keeps the most recent of
            os.utime(path)
        except OSError:  # a read-only folder
            pass
        return program

    @staticmethod
    def _write(path, exported, out_tree):
        try:
            blob = pickle.dumps((bytes(exported.serialize()), out_tree))
            os.makedirs(os.path.dirname(path), exist_ok=True)
            # written aside, then renamed: a reader sees the whole file or none
            fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".tmp")
        except Exception:  # a read-only folder, no serialiser: used unsaved
            return
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(blob)
            os.chmod(tmp, 0o644)  # as JAX's own cache files: a shared cache folder serves everyone
            os.replace(tmp, path)
        except OSError:  # a full disk: nothing half-written is left
            try:
                os.remove(tmp)
            except OSError:
                pass
