"""A running Fisher matrix and learning rate: online natural gradient (docs/method.md §2c).

``J_t = (1 − γ_t) J_{t−1} + γ_t Hᵀ R⁻¹ H``, ``δθ = η_t (J_t + εI)⁻¹ Hᵀ R⁻¹ e``.

With the Kalman schedule (``γ_t = η_t``, ``1/η_t = λ_t/η_{t−1} + 1``, the default: λ_t is the
filter's forgetting) and ``ε = 0`` this is the same filter as the other representations, with
``P_t = η_t J_t⁻¹`` and ``P⁻ = η_t ((1 − γ_t) J_{t−1})⁻¹`` (docs/method.md §3). Other schedules
(a constant rate, a function of t, ``γ ≠ η``) and damping ``ε`` make it online natural gradient
outside that correspondence; ``H P⁻ Hᵀ`` is then ``η_t H ((1 − γ_t) J_{t−1} + εI)⁻¹ Hᵀ``.
Each step factors a ``d × d`` matrix (O(d³)), which the covariance form avoids; without damping
it is one factorisation, of the prior's precision (:func:`~kalnat.representations.precision.
precision_gain`), with damping two.

The variance bound caps the variances of ``P⁻`` as the covariance form's does, by
``J_{t−1} ← D⁻¹ J_{t−1} D⁻¹`` (the precision of ``P⁻`` is ``(1 − γ_t)/η_t · J_{t−1}``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp

from kalnat import numerics
from kalnat.representations.base import Representation
from kalnat.representations.precision import fisher_terms, precision_gain

__all__ = ["Fisher", "FisherPrior", "FisherForm"]


class Fisher(NamedTuple):
    """``fisher (d, d)`` = J_t, ``lr`` = η_t, ``fisher_lr`` = γ_t (after step t; η_0, γ_0 at t = 0)."""

    fisher: jax.Array
    lr: jax.Array
    fisher_lr: jax.Array

    def dense(self):
        return self.lr * numerics.spd_inverse(self.fisher)  # P = η J⁻¹ (§3)

    def with_dense(self, P):
        return self._replace(fisher=self.lr * numerics.spd_inverse(jnp.asarray(P, self.fisher.dtype)))


class FisherPrior(NamedTuple):
    """The prediction step's pieces: ``fisher`` = J_{t−1} (bounded), ``lr`` = η_t,
    ``fisher_lr`` = γ_t; ``P⁻ = η_t ((1 − γ_t) J_{t−1})⁻¹``."""

    fisher: jax.Array
    lr: jax.Array
    fisher_lr: jax.Array

    def dense(self):
        return self.lr * numerics.spd_inverse((1.0 - self.fisher_lr) * self.fisher)


@dataclass(frozen=True)
class FisherForm(Representation):
    """Natural gradient's state. ``schedule``: ``None`` for the Kalman rate with the filter's
    forgetting, else a schedule of :mod:`kalnat.schedules`; ``fisher_schedule``: ``None`` for
    ``γ_t = η_t``; ``eta0``: η_0 (and γ_0); ``damping``: ε."""

    schedule: Optional[Any] = None
    fisher_schedule: Optional[Any] = None
    eta0: float = 1.0
    damping: float = 0.0
    name = "fisher"
    state_type = Fisher
    process_noise = False

    @property
    def uses_forgetting(self):
        return self.schedule is None  # a Kalman rate with the filter's λ; other schedules ignore it

    def init(self, hyper, d, dtype):
        eta = jnp.asarray(self.eta0, dtype)
        prior = numerics.prior_matrix(hyper.prior_var, d, dtype)
        return Fisher(self.eta0 * numerics.spd_inverse(prior), eta, eta)  # J_0 = η_0 P_0⁻¹

    def inflate(self, cov, t, lam, q, bound):
        dtype = cov.fisher.dtype
        if self.schedule is None:
            eta = 1.0 / (jnp.asarray(lam, dtype) / cov.lr + 1.0)
        else:
            eta = jnp.asarray(self.schedule(t, cov.lr), dtype)
        gamma = eta if self.fisher_schedule is None else jnp.asarray(self.fisher_schedule(t, cov.fisher_lr), dtype)
        fisher = cov.fisher
        if bound is not None:
            # The precision of P⁻ is (1 − γ)/η · J: bound J with the cap moved to its units.
            # At γ = 1 the step forgets J altogether and there is nothing to bound.
            cap = jnp.asarray(bound, dtype) * (1.0 - gamma) / eta
            fisher = jnp.where(gamma < 1.0, numerics.precision_bound(fisher, cap), fisher)
        return FisherPrior(fisher, eta, gamma)

    def _regularised(self, fisher):
        return numerics.add_to_diagonal(fisher, self.damping) if self.damping else fisher

    def quad(self, prior, h):
        return prior.lr * (h @ numerics.chol_solve(self._regularised((1.0 - prior.fisher_lr) * prior.fisher), h.T))

    def gain(self, prior, H, R, e):
        eta, gamma = prior.lr, prior.fisher_lr
        if not self.damping:
            # In precision terms Λ⁻ = (1 − γ) J/η and J_t/η = Λ⁻ + (γ/η) Hᵀ R⁻¹ H: the information
            # form's step with the observation weighted by γ/η (1 on the Kalman schedule).
            delta, hph, info = precision_gain((1.0 - gamma) / eta * prior.fisher, H, R, e, gamma / eta)
            return delta, hph, eta * info
        fisher_obs, grad = fisher_terms(H, R, e)
        fisher = numerics.symmetrize((1.0 - gamma) * prior.fisher + gamma * fisher_obs)
        delta = eta * numerics.chol_solve(self._regularised(fisher), grad)
        hph = eta * (H @ numerics.chol_solve(self._regularised((1.0 - gamma) * prior.fisher), H.T))
        return delta, hph, fisher

    def posterior(self, prior, H, R, e, aux, rows):
        return Fisher(aux, prior.lr, prior.fisher_lr)
