"""The posterior covariance P of θ, read from and written into each learner's state form.

The core learners hold the same Gaussian posterior in different forms (PAPER.md §2–§3):
the covariance ``P`` (EKF, iterated EKF, NIG), its lower Cholesky factor (square-root EKF),
the information matrix ``P⁻¹``, or the natural-gradient pair with ``P = η J⁻¹``. Code that
changes coordinates or inspects P goes through these two functions, on the host, in float64.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

__all__ = ["covariance", "with_covariance"]

_FORMS = ("cov", "chol", "info", "fisher")


def _check_form(state):
    if not any(hasattr(state, f) for f in _FORMS):
        raise ValueError(f"{type(state).__name__} holds no covariance of θ")


def covariance(state) -> np.ndarray:
    """``P (d, d)`` held by a core learner's state, as a float64 NumPy array."""
    _check_form(state)
    if hasattr(state, "cov"):
        return np.asarray(state.cov, np.float64)
    if hasattr(state, "chol"):
        chol = np.asarray(state.chol, np.float64)
        if hasattr(state, "chol_err"):  # the compensated factor (see kalnat.learners.sqrt)
            chol = chol + np.asarray(state.chol_err, np.float64)
        return chol @ chol.T
    if hasattr(state, "info"):
        return np.linalg.inv(np.asarray(state.info, np.float64))
    return float(state.lr) * np.linalg.inv(np.asarray(state.fisher, np.float64))  # P = η J⁻¹ (§3)


def with_covariance(state, params, cov):
    """``state`` with parameters ``params`` and covariance ``cov (d, d)``, in its own form."""
    _check_form(state)
    P = np.asarray(cov, np.float64)
    dtype = next(getattr(state, f) for f in _FORMS if hasattr(state, f)).dtype
    put = lambda a: jnp.asarray(a, dtype)
    if hasattr(state, "cov"):
        return state._replace(params=params, cov=put(P))
    if hasattr(state, "chol"):
        new = state._replace(params=params, chol=put(np.linalg.cholesky(P)))
        if hasattr(state, "chol_err"):
            new = new._replace(chol_err=jnp.zeros_like(state.chol_err))
        return new
    if hasattr(state, "info"):
        return state._replace(params=params, info=put(np.linalg.inv(P)))
    return state._replace(params=params, fisher=put(float(state.lr) * np.linalg.inv(P)))
