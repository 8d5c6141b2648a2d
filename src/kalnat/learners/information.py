"""Information filter: the EKF written on ``Λ = P⁻¹`` (PAPER.md §2b).

``Λ_t = Λ⁻ + Hᵀ R⁻¹ H``, ``θ_t = θ_{t−1} + Λ_t⁻¹ Hᵀ R⁻¹ e``, with ``Λ⁻ = λ_t Λ_{t−1}`` under
forgetting. It solves a ``d × d`` system each step (O(d³)); it exists to show the
equivalence and for problems where the information matrix is the natural object (sparse
priors, pooling evidence). Additive noise ``q·I`` needs ``(Λ⁻¹ + qI)⁻¹``: two more
factorisations.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from kalnat import numerics
from kalnat.families import Family
from kalnat.learners.base import Learner, Rule, resolve_model
from kalnat.learners.ekf import check_forgetting, check_prior, check_process_noise, predict_cov
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


def _inv_spd(a):
    chol = jnp.linalg.cholesky(a)
    return jax.scipy.linalg.cho_solve((chol, True), jnp.eye(a.shape[0], dtype=a.dtype))


def information_filter(model, family: Family, *, prior_var=1.0, forgetting: Forgetting = 1.0,
                       process_noise=0.0, input_shape=None) -> Learner:
    """Information-form EKF (PAPER.md §2b); same arguments and θ_t as :func:`kalnat.ekf`."""
    apply, input_shape = resolve_model(model, input_shape)
    check_forgetting(forgetting)
    q = check_process_noise(process_noise)

    def init(theta):
        p0 = check_prior(prior_var, theta.shape[0])
        return (jnp.asarray(np.linalg.inv(p0), theta.dtype),)

    def update(state, theta, H, R, e):
        if np.any(q != 0):
            info = _inv_spd(predict_cov(_inv_spd(state.info), state.count, forgetting, q))
        else:
            info = state.info * forgetting_at(forgetting, state.count + 1)
        fisher, grad = fisher_terms(H, R, e)
        info = numerics.symmetrize(info + fisher)
        return theta + numerics.chol_solve(info, grad), (info,)

    def quad(state, h):
        return h @ numerics.chol_solve(state.info, h.T)

    config = dict(prior_var=prior_var, forgetting=forgetting, process_noise=process_noise)
    return Learner("information", apply, family, Rule(init, update, quad, InformationState), input_shape, config)
