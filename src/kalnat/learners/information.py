"""Information filter: the EKF written on ``Λ = P⁻¹`` (PAPER.md §2b).

``Λ_t = Λ⁻ + Hᵀ R⁻¹ H``, ``θ_t = θ_{t−1} + Λ_t⁻¹ Hᵀ R⁻¹ e``, with ``Λ⁻ = λ_t Λ_{t−1}`` under
forgetting. It solves a ``d × d`` system each step (O(d³)); it exists to show the
equivalence and for problems where the information matrix is the natural object (sparse
priors, pooling evidence). Additive noise ``q·I`` needs ``(Λ⁻¹ + qI)⁻¹``: two more
factorisations. ``max_variance`` is the EKF's bound written on ``Λ⁻``: ``D⁻¹ Λ⁻ D⁻¹``, the
inverse of ``D P⁻ D`` (:func:`kalnat.numerics.precision_bound`, one more inverse per step).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from kalnat import numerics
from kalnat.families import Family
from kalnat.learners.base import Learner, Rule, resolve_model
from kalnat.learners.ekf import (
    check_bound_shape, check_forgetting, check_max_variance, check_prior, check_process_noise, predicted,
)
from kalnat.schedules import Forgetting, forgetting_at

__all__ = ["InformationState", "information_filter", "fisher_terms"]


class InformationState(NamedTuple):
    """``params`` (pytree, θ), ``info`` ``(d, d)`` = P_t⁻¹, ``count`` = t."""

    params: Any
    info: jax.Array
    count: jax.Array


def fisher_terms(H, R, e):
    """``(Hᵀ R⁻¹ H, Hᵀ R⁻¹ e)``: the Fisher information and the negative loss gradient."""
    rinv_h = numerics.chol_solve(R, H)
    return H.T @ rinv_h, rinv_h.T @ e


def information_filter(model, family: Family, *, prior_var=1.0, forgetting: Forgetting = 1.0,
                       process_noise=0.0, max_variance=None, input_shape=None) -> Learner:
    """Information-form EKF (PAPER.md §2b); same arguments and θ_t as :func:`kalnat.ekf`."""
    apply, input_shape = resolve_model(model, input_shape)
    check_forgetting(forgetting)
    q = check_process_noise(process_noise)
    max_variance = check_max_variance(max_variance)

    def init(theta):
        p0 = check_prior(prior_var, theta.shape[0])
        check_bound_shape(max_variance, theta.shape[0])
        return (jnp.asarray(np.linalg.inv(p0), theta.dtype),)

    def update(state, theta, H, R, e):
        if np.any(q != 0):  # P⁻ is at hand here: the EKF's prediction step, bound included
            p = predicted(numerics.spd_inverse(state.info), state.count, forgetting, q, max_variance)
            info = numerics.spd_inverse(p.matrix())
        else:
            info = state.info * forgetting_at(forgetting, state.count + 1)
            if max_variance is not None:
                info = numerics.precision_bound(info, jnp.asarray(max_variance, info.dtype))
        fisher, grad = fisher_terms(H, R, e)
        info = numerics.symmetrize(info + fisher)
        return theta + numerics.chol_solve(info, grad), (info,)

    def quad(state, h):
        return h @ numerics.chol_solve(state.info, h.T)

    config = dict(prior_var=prior_var, forgetting=forgetting, process_noise=process_noise,
                  max_variance=max_variance)
    return Learner("information", apply, family, Rule(init, update, quad, InformationState), input_shape, config)
