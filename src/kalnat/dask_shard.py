"""One shard of :class:`kalnat.dask_keyed.DaskKeyed`: a keyed learner run as a Dask actor.

Its methods raise what its own code raises as :class:`_Raised`, so that the driver tells an
error of the shard (it learned nothing of the call) from a lost worker's (the shard is rebuilt).
"""

from __future__ import annotations

import functools
import os
import tempfile
from typing import Callable

import numpy as np

__all__ = ["ShardLearner"]


class _Raised(RuntimeError):
    """What a shard's own code raised (``ShardLearner``'s methods), as text: the driver tells it
    from the errors of a lost worker, which are everything else (``OSError``, a timeout,
    ``RuntimeError("Worker holding Actor was lost")``, …)."""


def _own_errors(method):
    @functools.wraps(method)
    def wrapped(self, *args):
        try:
            return method(self, *args)
        except Exception as err:
            raise _Raised(f"{type(err).__name__}: {err}") from None
    return wrapped


class ShardLearner:
    """One shard's keyed learner, run as a Dask actor.

    ``factory() -> (learner, params)`` builds the learner inside the worker (it is pickled by
    reference or by cloudpickle); ``x64``: float64, set before any array is made.
    """

    def __init__(self, factory: Callable, x64: bool = True, batch_size: int = 1):
        import jax

        if x64:
            jax.config.update("jax_enable_x64", True)
        from kalnat.keyed import Keyed

        self.learner, self.params = factory()
        self.keyed = Keyed(self.learner, self.params, batch_size=batch_size)
        self.batch = -1  # the last batch learned

    @_own_errors
    def learn(self, batch: int, keys, X, Y):
        """Learns one batch's rows of this shard; returns ``(predictions, log_likelihoods)``
        as NumPy arrays."""
        if batch <= self.batch:
            raise ValueError(f"shard asked to learn batch {batch} again (it has learned up to {self.batch})")
        # DaskKeyed sends a NumPy array (_key_array): Keyed groups int and str arrays by sorting
        res = self.keyed.learn(keys if isinstance(keys, np.ndarray) else list(keys), X, Y)
        self.batch = batch
        return res.predictions, res.log_likelihood

    @_own_errors
    def flush(self, batch: int):
        """:meth:`Keyed.flush` (the held rows of partial minibatches learned), as batch ``batch``."""
        if batch <= self.batch:
            raise ValueError(f"shard asked to flush as batch {batch} (it has learned up to {self.batch})")
        self.keyed.flush()
        self.batch = batch

    @_own_errors
    def snapshot(self) -> tuple[int, bytes]:
        """``(last batch, checkpoint file's bytes)``."""
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "shard.npz")
            self.keyed.save(path, extra={"batch": self.batch})
            with open(path, "rb") as f:
                return self.batch, f.read()

    @_own_errors
    def restore(self, data: bytes):
        from kalnat import checkpoint
        from kalnat.keyed import Keyed

        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "shard.npz")
            with open(path, "wb") as f:
                f.write(data)
            self.keyed = Keyed.load(path, self.learner, self.params)
            self.batch = int(checkpoint.read_header(path)["extra"]["batch"])
        return self.batch

    @_own_errors
    def leaves(self) -> dict:
        """Every key's state as a list of NumPy arrays (for checks)."""
        import jax

        return {k: [np.asarray(a) for a in jax.tree_util.tree_leaves(self.keyed.state(k))] for k in self.keyed.keys}

    @_own_errors
    def n_keys(self) -> int:
        return len(self.keyed)

    @_own_errors
    def dtype(self) -> str:
        """The states' float dtype (``"float64"`` or ``"float32"``)."""
        return np.dtype(self.keyed._dtype).name
