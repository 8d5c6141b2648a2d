"""Save and restore a learner state to a portable ``.npz`` file.

The file holds every leaf of the state (parameters, covariance, step counters, random keys)
and a small JSON header: a format version, the state's type (a core learner's with its
representation, e.g. ``State[Covariance]``), the path of every leaf in the pytree (JAX's key
paths, stable across JAX versions, unlike the printed tree structure) and each leaf's shape
and dtype. It is written atomically (a temporary file in the same folder, fsync, rename, fsync
of the folder), so a crash or a power loss mid-write leaves the previous checkpoint intact.

Files written by kalnat 0.1 (format 1: ``EKFState``, ``SqrtEKFState``, ``InformationState``,
``NaturalGradientState``, ``NIGState``, a bank's state with its hyperparameters inside) load
into the equivalent 0.2 state, whose leaves are the same arrays in the same order (a bank's
hyperparameters now live in the bank, not its state); anything else from format 1 fails with a
message naming the version. A diagonal covariance's variances saved before they were padded to
``numerics.LANES`` entries load padded with zeros. Restoring needs a
template state of the same learner and shapes (e.g. ``learner.init(params)``): a mismatch is
a ``ValueError``. The values are restored bit for bit, so a stream resumed from a checkpoint
continues exactly as if it had never stopped.

Typed random keys (``jax.random.key``) are stored as their raw key data with the name of
their implementation; raw ``uint32`` keys (``jax.random.PRNGKey``) are plain arrays.
"""

from __future__ import annotations

import json
import os
import tempfile
import zipfile

import jax
import numpy as np

from kalnat import numerics
from kalnat.filter import check_live

__all__ = ["save", "load", "read_header", "FORMAT_VERSION"]

FORMAT_VERSION = 2

# kalnat 0.1's state types, by the representation that holds the same leaves in 0.2
_V1_NAMES = {"Covariance": "EKFState", "CholeskyFactor": "SqrtEKFState", "Precision": "InformationState",
             "Fisher": "NaturalGradientState", "NIGCovariance": "NIGState"}


def _is_key(a) -> bool:
    return hasattr(a, "dtype") and jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key)


def _leaf_spec(a):
    if _is_key(a):
        return [list(a.shape), f"key:{jax.random.key_impl(a)}"]
    return [list(np.shape(a)), str(np.asarray(a).dtype)]


def _state_type(state, v1=False) -> str:
    """``State[Covariance]`` for a core learner's state (its type and representation), else the
    state's type name; with ``v1``, the name kalnat 0.1 gave the same state."""
    cov = getattr(state, "cov", None)
    if hasattr(state, "core"):
        return type(state).__name__
    if cov is not None and hasattr(cov, "dense"):
        return _V1_NAMES.get(type(cov).__name__, "") if v1 else f"{type(state).__name__}[{type(cov).__name__}]"
    return type(state).__name__


def _header(state, extra=None):
    paths, _ = jax.tree_util.tree_flatten_with_path(state)
    return {
        "format": "kalnat-checkpoint",
        "version": FORMAT_VERSION,
        "state_type": _state_type(state),
        "paths": [jax.tree_util.keystr(p) for p, _ in paths],
        "leaves": [_leaf_spec(a) for _, a in paths],
        "extra": extra or {},
    }


def save(path, state, extra: dict | None = None) -> str:
    """Writes ``state`` (and JSON-able ``extra`` metadata) to ``path`` atomically.

    Nothing is written unless the whole file is: on any failure the temporary file is removed
    and an existing checkpoint at ``path`` is left as it was.
    """
    check_live(state, "checkpoint.save")
    leaves = [np.asarray(jax.random.key_data(a)) if _is_key(a) else np.asarray(a)
              for a in jax.tree_util.tree_leaves(state)]
    try:
        header = json.dumps(_header(state, extra)).encode()
    except TypeError as err:
        raise ValueError(f"checkpoint: extra metadata must be JSON-serialisable ({err})") from None
    return write_atomically(path, lambda f: np.savez(f, __header__=np.frombuffer(header, np.uint8),
                                                     **{f"leaf_{i}": a for i, a in enumerate(leaves)}))


def write_atomically(path, write) -> str:
    """``write(f)`` on a temporary file in ``path``'s folder, synced, then renamed to ``path``
    (and the folder synced): on any failure the temporary file is removed and an existing file
    at ``path`` is left as it was. Returns ``path``."""
    path = os.fspath(path)
    if os.path.isdir(path):  # (os.replace's error named the temporary file, not this path)
        raise IsADirectoryError(f"{path} is a folder: give the file to write, e.g. {os.path.join(path, 'model.npz')}")
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=os.path.splitext(path)[1])
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_folder(folder)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def _fsync_folder(folder):
    """The rename is durable once the folder's entry is on disk (POSIX; a no-op elsewhere)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def read_header(path) -> dict:
    """The JSON header of a checkpoint (``ValueError`` if the file is not one)."""
    try:
        with np.load(os.fspath(path)) as z:
            header = json.loads(bytes(z["__header__"]).decode())
    except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile, TypeError, AttributeError) as err:
        # A truncated or foreign file: numpy raises any of these depending on where it stops.
        raise ValueError(f"{path}: not a kalnat checkpoint ({type(err).__name__}: {err})") from None
    if not isinstance(header, dict) or header.get("format") != "kalnat-checkpoint":
        raise ValueError(f"{path}: not a kalnat checkpoint")
    if header.get("version") not in (1, FORMAT_VERSION):
        raise ValueError(f"{path}: checkpoint format version {header.get('version')}, "
                         f"this kalnat reads versions 1 (kalnat 0.1) and {FORMAT_VERSION}")
    return header


def _selection(path, header, expected, like):
    """Indices of the file's leaves that make ``like``'s state, in order (all of them for
    this format; a format-1 bank's hyperparameter leaves are dropped)."""
    n = len(expected["leaves"])
    if header["version"] == FORMAT_VERSION:
        if header.get("state_type") != expected["state_type"]:
            raise ValueError(f"{path}: holds a {header.get('state_type')}, expected a {expected['state_type']} "
                             "(written by a different learner)")
        if header.get("paths") != expected["paths"]:
            raise ValueError(f"{path}: the state's structure differs from this learner's "
                             "(another model or learner configuration)")
        return list(range(n))
    old = f"{path}: written by kalnat 0.1 (checkpoint format 1)"
    want = _state_type(like, v1=True)
    if header.get("state_type") != want:
        raise ValueError(f"{old} and holds a {header.get('state_type')}; this learner's state was "
                         f"{want or 'not written'} in that version")
    found = len(header.get("leaves", []))
    if hasattr(like, "members"):  # 0.1 kept the members' hyperparameters between them and the weights
        if found < n:
            raise ValueError(f"{old}: {found} arrays, this bank's state has {n}")
        return list(range(n - 4)) + list(range(found - 4, found))
    return list(range(found))


def _diagonal_sizes(like) -> dict:
    """``{leaf position: d}`` for each diagonal covariance's variances in ``like``."""
    from kalnat.representations.diagonal import DiagonalCovariance

    nodes = jax.tree_util.tree_leaves(like, is_leaf=lambda x: isinstance(x, DiagonalCovariance))
    return {j: node.d for j, node in enumerate(nodes) if isinstance(node, DiagonalCovariance)}


def _unpadded_variances(sizes, specs, expected):
    """The leaves (by position) that are a diagonal covariance's variances saved unpadded: a
    checkpoint written before they were padded to ``numerics.LANES`` entries holds ``d`` of them."""
    return {j for j, d in sizes.items()
            if specs[j] != expected[j] and specs[j][1] == expected[j][1]
            and specs[j][0][:-1] == expected[j][0][:-1] and specs[j][0][-1:] == [d]}


def load(path, like):
    """Restores a state saved by :func:`save`, with the structure of the template ``like``.

    Raises ``ValueError`` when the file is not a checkpoint, holds another learner's state
    type, or its pytree structure, shapes or dtypes differ from ``like``'s.
    """
    header = read_header(path)
    expected = _header(like)
    keep = _selection(path, header, expected, like)
    specs = [header["leaves"][i] for i in keep]
    sizes = _diagonal_sizes(like)
    unpadded = _unpadded_variances(sizes, specs, expected["leaves"])
    file_specs = specs
    specs = [expected["leaves"][j] if j in unpadded else spec for j, spec in enumerate(specs)]
    if specs != expected["leaves"]:
        diff = [(i, a, b) for i, (a, b) in enumerate(zip(specs, expected["leaves"])) if a != b]
        first = f"leaf {diff[0][0]}: {diff[0][1]} in the file, {diff[0][2]} expected" if diff else \
            f"{len(specs)} leaves in the file, {len(expected['leaves'])} expected"
        raise ValueError(f"{path}: shapes or dtypes differ from this learner's ({first})")
    treedef = jax.tree_util.tree_structure(like)
    leaves, other_size = [], None
    try:
        with np.load(os.fspath(path)) as z:
            for i, (shape, dtype) in zip(keep, file_specs):
                a = z[f"leaf_{i}"]
                if dtype.startswith("key:"):
                    leaves.append(jax.random.wrap_key_data(jax.device_put(a), impl=dtype[4:]))
                    continue
                if list(a.shape) != shape or str(a.dtype) != dtype:
                    raise ValueError(f"leaf {i} is {a.shape} {a.dtype}, its header says {shape} {dtype}")
                j = len(leaves)
                if j in unpadded:  # zeros after the d variances, as the state holds them
                    a = np.pad(a, [(0, 0)] * (a.ndim - 1) + [(0, numerics.lanes(a.shape[-1]) - a.shape[-1])])
                if j in sizes and np.any(a[..., sizes[j]:] != 0) and other_size is None:
                    other_size = j
                # device_put, not jnp.asarray: that compiles a copy program for each new shape
                # (jax 0.10): 7 for the default bank's 8 leaves (`a` is this load's own)
                leaves.append(jax.device_put(a))
    except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile) as err:
        raise ValueError(f"{path}: damaged checkpoint ({err})") from None
    if other_size is not None:
        # variances where this learner's padding is: saved for other sizes (the groups of
        # another layout, whose padded lengths can be the same)
        raise ValueError(f"{path}: leaf {other_size} holds the variances of a diagonal covariance of another size "
                         f"than this learner's ({sizes[other_size]} parameters)")
    return jax.tree_util.tree_unflatten(treedef, leaves)
