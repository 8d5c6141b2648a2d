"""Save and restore a learner state to a portable ``.npz`` file.

The file holds every leaf of the state (parameters, covariance, step counters) and a small
JSON header: a format version, the state's type and pytree structure, and each leaf's shape
and dtype. It is written atomically (a temporary file in the same folder, then a rename), so
a crash mid-write leaves the previous checkpoint intact. Restoring needs a template state of
the same learner and shapes (e.g. ``learner.init(params)``): a mismatch is a ``ValueError``.
"""

from __future__ import annotations

import json
import os
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["save", "load", "FORMAT_VERSION"]

FORMAT_VERSION = 1


def _header(state, extra=None):
    leaves, treedef = jax.tree_util.tree_flatten(state)
    return {
        "format": "kalnat-checkpoint",
        "version": FORMAT_VERSION,
        "state_type": type(state).__name__,
        "treedef": str(treedef),
        "leaves": [[list(np.shape(a)), str(np.asarray(a).dtype)] for a in leaves],
        "extra": extra or {},
    }


def save(path, state, extra: dict | None = None) -> str:
    """Writes ``state`` (and JSON-able ``extra`` metadata) to ``path`` atomically."""
    path = os.fspath(path)
    leaves = [np.asarray(a) for a in jax.tree_util.tree_leaves(state)]
    header = _header(state, extra)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".npz")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, __header__=np.frombuffer(json.dumps(header).encode(), np.uint8),
                     **{f"leaf_{i}": a for i, a in enumerate(leaves)})
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def read_header(path) -> dict:
    """The JSON header of a checkpoint (``ValueError`` if the file is not one)."""
    try:
        with np.load(os.fspath(path)) as z:
            header = json.loads(bytes(z["__header__"]).decode())
    except (OSError, KeyError, ValueError) as err:
        raise ValueError(f"{path}: not a kalnat checkpoint ({err})") from None
    if header.get("format") != "kalnat-checkpoint":
        raise ValueError(f"{path}: not a kalnat checkpoint")
    if header.get("version") != FORMAT_VERSION:
        raise ValueError(f"{path}: checkpoint format version {header.get('version')}, "
                         f"this kalnat reads version {FORMAT_VERSION}")
    return header


def load(path, like):
    """Restores a state saved by :func:`save`, with the structure of the template ``like``."""
    header = read_header(path)
    expected = _header(like)
    if header["state_type"] != expected["state_type"]:
        raise ValueError(f"{path}: holds a {header['state_type']}, expected a {expected['state_type']} "
                         "(written by a different learner)")
    if header["treedef"] != expected["treedef"] or header["leaves"] != expected["leaves"]:
        raise ValueError(f"{path}: parameter structure or shapes differ from this learner's "
                         f"({header['leaves']} vs {expected['leaves']})")
    treedef = jax.tree_util.tree_structure(like)
    with np.load(os.fspath(path)) as z:
        leaves = [jnp.asarray(z[f"leaf_{i}"]) for i in range(len(header["leaves"]))]
    return jax.tree_util.tree_unflatten(treedef, leaves)
