"""Linearisation of a model and family at θ: ŷ, H = ∂ŷ/∂θ, R and e = T(y) − ŷ.

Computed in this one place; every learner consumes a :class:`Linearization` (docs/method.md §1–§2).
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

from kalnat import numerics

__all__ = ["Linearization", "linearize", "masked", "stack"]


class Linearization(NamedTuple):
    """One minibatch of ``b`` observations linearised at one θ.

    Attributes:
      yhat: ``(b, m)`` predicted mean parameters.
      H: ``(b, m, d)`` Jacobians ∂ŷ/∂θ.
      R: ``(b, m, m)`` covariances of T(y) at ŷ.
      e: ``(b, m)`` innovations T(y) − ŷ (zero when no y is given).
      y: ``(b, …)`` the observations themselves (``None`` when none is given): what the
        one-step predictive log-likelihood scores.
    """

    yhat: jax.Array
    H: jax.Array
    R: jax.Array
    e: jax.Array
    y: Optional[jax.Array] = None


def linearize(apply_flat, family, theta, xs, ys=None, mask=None) -> Linearization:
    """Linearises ``family.mean(apply_flat(θ, x))`` at ``θ (d,)`` for each ``x`` in ``xs``.

    ``H`` is computed by reverse mode when the output (m values) is smaller than θ, else by
    forward mode. Rows where ``mask`` (``(b,)`` booleans) is false get ``H = 0`` and ``e = 0``,
    which removes them from any update exactly.
    """
    d = theta.shape[0]
    jac = jax.jacrev if family.m < d else jax.jacfwd

    def mean_and_aux(th, x):
        yhat = jnp.reshape(family.mean(apply_flat(th, x)), (family.m,))
        return yhat, yhat

    H, yhat = jax.vmap(jac(mean_and_aux, has_aux=True), in_axes=(None, 0))(theta, xs)
    R = jax.vmap(family.cov)(yhat)
    if ys is None:
        e = jnp.zeros_like(yhat)
    else:
        e = jax.vmap(family.innovation)(yhat, ys)
    lin = Linearization(yhat, H, R, e, ys)
    return lin if mask is None else masked(lin, mask)


def masked(lin: Linearization, mask) -> Linearization:
    """Rows where ``mask`` (``(b,)`` booleans) is false get ``H = 0`` and ``e = 0``: removed
    from the update exactly."""
    return lin._replace(H=jnp.where(mask[:, None, None], lin.H, 0.0), e=jnp.where(mask[:, None], lin.e, 0.0))


def stack(lin: Linearization):
    """Stacks a minibatch into one observation: ``H (b·m, d)``, ``R (b·m, b·m)``, ``e (b·m,)``.

    A minibatch is one update at one linearisation point with block-diagonal R (docs/method.md §2d).
    """
    b, m, d = lin.H.shape
    R = lin.R[0] if b == 1 else numerics.block_diag(lin.R)
    return lin.H.reshape(b * m, d), R, lin.e.reshape(b * m)
