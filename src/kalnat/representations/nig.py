"""An unknown noise scale on top of any representation: the normal–inverse-gamma filter.

Model: ``y = f(θ, x) + ε``, ``ε ~ N(0, σ² R₀)`` with ``R₀`` the family's covariance and σ²
unknown; prior ``θ | σ² ~ N(θ₀, σ² V₀)``, ``σ² ~ InvGamma(a₀, b₀)``. The posterior stays in that
conjugate family (DeGroot 1970 §9.10; West & Harrison 1997 §4.5); per row, linearised at
θ_{t−1} (docs/method.md §2e):

    S = H V⁻ Hᵀ + R₀,   the inner representation's update of θ and V with R₀,
    a_t = a⁻ + k/2,     b_t = b⁻ + ½ eᵀ S⁻¹ e        (k scalar observations, counted from the mask)

with ``V⁻`` the inner prediction step and ``a⁻ = λ a``, ``b⁻ = λ b`` under forgetting. σ² cancels
from the gain, so the noise scale only moves the predictive: a Student-t with ``2a⁻`` degrees
of freedom, location ŷ and scale ``(b⁻/a⁻) S``. For a linear-Gaussian model with λ = 1 it is the
exact conjugate posterior, and its predictive the exact one-step marginal.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from kalnat import numerics
from kalnat.representations import moves
from kalnat.representations.base import Representation
from kalnat.representations.full import Full

__all__ = ["NIGCovariance", "NIG"]


class NIGCovariance(NamedTuple):
    """``inner``: V (θ's covariance in units of σ²) in the inner representation's form;
    ``shape`` a and ``scale`` b of the inverse-gamma on σ²."""

    inner: Any
    shape: jax.Array
    scale: jax.Array

    def dense(self):
        """V, θ's covariance in units of σ² (the posterior mean of Cov θ is ``V b/(a − 1)``)."""
        return self.inner.dense()

    def with_dense(self, P):
        return self._replace(inner=self.inner.with_dense(P))

    def moved(self, move):
        """V moved in the inner form (:func:`~kalnat.representations.moves.moved`); the
        inverse-gamma is in the target's units and stays."""
        return self._replace(inner=moves.moved(self.inner, move))

    def prior_movable(self, move):
        """Whether :meth:`moved_with_prior` applies: where the inner form's does."""
        return moves.prior_movable(self.inner, move)

    def moved_with_prior(self, move, theta, c):
        """The inner form's."""
        theta, inner = self.inner.moved_with_prior(move, theta, c)
        return theta, self._replace(inner=inner)


@dataclass(frozen=True)
class NIG(Representation):
    """The inverse-gamma noise scale over ``inner`` (the full covariance by default)."""

    inner: Representation = field(default_factory=Full)
    name = "nig"
    state_type = NIGCovariance
    noise_prior = True

    @property
    def branches(self):
        return self.inner.branches

    @property
    def layer_rows(self):  # H only passes through to the inner form
        return self.inner.layer_rows

    @property
    def dense_layers(self):
        return self.inner.dense_layers

    @property
    def process_noise(self):
        return self.inner.process_noise

    @property
    def uses_forgetting(self):
        return self.inner.uses_forgetting

    def init(self, hyper, d, dtype):
        return NIGCovariance(self.inner.init(hyper, d, dtype), jnp.asarray(hyper.noise_shape, dtype),
                             jnp.asarray(hyper.noise_scale, dtype))

    def inflate(self, cov, t, lam, q, bound):
        lam = jnp.asarray(lam, cov.shape.dtype)
        return NIGCovariance(self.inner.inflate(cov.inner, t, lam, q, bound), lam * cov.shape, lam * cov.scale)

    def quad(self, prior, h):
        return self.inner.quad(prior.inner, h)

    def gain(self, prior, H, R, e):
        delta, hph, aux = self.inner.gain(prior.inner, H, R, e)
        return delta, hph, (aux, hph)

    def posterior(self, prior, H, R, e, aux, rows):
        inner_aux, hph = aux
        v = numerics.solve_lower(numerics.cholesky(hph + R), e)
        return NIGCovariance(self.inner.posterior(prior.inner, H, R, e, inner_aux, rows),
                             prior.shape + 0.5 * jnp.sum(rows.astype(e.dtype)), prior.scale + 0.5 * (v @ v))

    def noise(self, prior):
        return prior.scale / prior.shape, 2.0 * prior.shape
