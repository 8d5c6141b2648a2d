"""Joint extended Kalman filter on the hidden state and the parameters, z = (s, θ) (PAPER.md §4).

Dynamics ``z_t = (f(s_{t−1}, θ_{t−1}, x_t), θ_{t−1})`` with Jacobian
``F = [[∂f/∂s, ∂f/∂θ], [0, I]]``, observation Jacobian ``[∂ŷ/∂s, ∂ŷ/∂θ]``:

```
P⁻  = F P Fᵀ / λ_t + diag(q_s, q_θ)
S   = H_z P⁻ H_zᵀ + R,   z_t = z⁻ + P⁻ H_zᵀ S⁻¹ e,   P_t = P⁻ − P⁻ H_zᵀ S⁻¹ H_z P⁻
```

**Theorem (PAPER.md §4).** Started from the factored covariance
``P_0 = [G_0; I] P^θ_0 [G_0; I]ᵀ`` (the default, with ``G_0 = 0``) and with no noise on the
state (``state_noise = 0``), the filter keeps that form, with ``G_t = P^{sθ}_t (P^{θθ}_t)⁻¹``,
and its ``(s_t, θ_t)`` equal natural-gradient RTRL with state correction
(:func:`kalnat.recurrent.rtrl`) with ``P_t = P^{θθ}_t``. Forgetting λ applies to the whole
joint covariance and keeps the form. A general initial covariance (``state_var``, ``cov=``) or
noise on the state gives a different filter, still a valid one: it lets the state's
uncertainty exceed what the parameters explain.

``B`` parallel sequences share θ: ``z = (s^1, …, s^B, θ)``, ``F``'s state block is
block-diagonal, and the sequences' observations at a step are one minibatch update.

Cost per step: ``F P Fᵀ`` without forming ``F``, O(B n d (B n + d)) — O(n d²) for one
sequence, n times RTRL's O(n² d) when d ≈ n² — plus the update, O((B n + d)² B m).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree
from jax.scipy.linalg import solve_triangular

from kalnat import numerics
from kalnat.families import Family
from kalnat.learners.base import Predictive, check_params
from kalnat.learners.ekf import check_forgetting, check_prior, check_process_noise, predict_cov
from kalnat.recurrent import base
from kalnat.recurrent.cells import RecurrentModel
from kalnat.schedules import Forgetting

__all__ = ["JointState", "joint_ekf", "propagate_covariance", "factored_covariance"]


class JointState(NamedTuple):
    """State of the joint EKF for ``B`` parallel sequences of ``n`` states and ``d`` parameters.

    Attributes:
      params: θ_t (pytree).
      s: ``(B, n)`` hidden states s_t.
      cov: ``(B n + d, B n + d)`` joint covariance of ``(s^1, …, s^B, θ)``.
      count: t.
    """

    params: Any
    s: jax.Array
    cov: jax.Array
    count: jax.Array


def propagate_covariance(a, b, p):
    """``F P Fᵀ`` for ``F = [[blockdiag(a), b], [0, I]]``, without forming ``F``.

    Shapes: ``a (B, n, n)`` = ∂f/∂s and ``b (B, n, d)`` = ∂f/∂θ per sequence,
    ``P (B n + d, B n + d)``. Only the state rows and columns change (θ's dynamics are the
    identity): ``(F P)_s = A P_s + B P_θ``, then ``P_ss ← (F P)_{s,s} Aᵀ + (F P)_{s,θ} Bᵀ`` and
    ``P_sθ ← (F P)_{s,θ}``. One product of ``n × d`` by ``d × (B n + d)`` dominates: O(n d²).
    """
    nb, n, _ = a.shape
    ns = nb * n
    fp = (jnp.einsum("bij,bjk->bik", a, p[:ns].reshape(nb, n, -1))
          + jnp.einsum("bid,dk->bik", b, p[ns:])).reshape(ns, -1)
    fp_ss, fp_st = fp[:, :ns], fp[:, ns:]
    pss = (jnp.einsum("ibj,bkj->ibk", fp_ss.reshape(ns, nb, n), a).reshape(ns, ns)
           + fp_st @ b.reshape(ns, -1).T)
    return p.at[:ns, :ns].set(numerics.symmetrize(pss)).at[:ns, ns:].set(fp_st).at[ns:, :ns].set(fp_st.T)


def factored_covariance(jac, p):
    """``[G; I] P [G; I]ᵀ`` with ``G (B, n, d)`` stacked to ``(B n, d)`` and ``P (d, d)``."""
    g = jac.reshape(-1, p.shape[0])
    gp = g @ p
    top = jnp.concatenate([gp @ g.T, gp], axis=1)
    return numerics.symmetrize(jnp.concatenate([top, jnp.concatenate([gp.T, p], axis=1)], axis=0))


def _block_rows(blocks):
    """Block-diagonal ``(B m, B n)`` matrix from rectangular ``(B, m, n)`` blocks.

    (:func:`kalnat.numerics.block_diag` takes square blocks; the observation Jacobian's state
    part is ``m × n``.)
    """
    nb, m, n = blocks.shape
    eye = jnp.eye(nb, dtype=blocks.dtype)
    return (eye[:, None, :, None] * blocks[:, :, None, :]).reshape(nb * m, nb * n)


def _diagonal_blocks(q, nb, m):
    """The ``B`` diagonal ``(m, m)`` blocks of a ``(B m, B m)`` matrix."""
    q4 = q.reshape(nb, m, nb, m)
    idx = jnp.arange(nb)
    return q4[idx, :, idx, :]


def joint_ekf(cell: RecurrentModel, family: Family, *, prior_var=1.0,
              forgetting: Forgetting = 1.0, process_noise=0.0, state_noise=0.0,
              state_var=None, joseph: bool = False) -> base.RecurrentLearner:
    """Joint EKF on ``z = (s, θ)`` (PAPER.md §4).

    Args:
      cell: a :class:`~kalnat.recurrent.cells.RecurrentModel`.
      family: the output family.
      prior_var: the parameters' prior covariance ``P^θ_0``: scalar, ``(d,)`` or ``(d, d)``.
      forgetting: λ in (0, 1] or ``t -> λ_t``, applied to the whole joint covariance (keeps the
        theorem's form; fading memory).
      process_noise: additive noise ``q_θ`` on the parameters (scalar or ``(d,)``); a random
        walk on θ, no longer equal to natural-gradient RTRL.
      state_noise: additive noise ``q_s`` on each hidden state (scalar or ``(n,)``); a
        different, still useful filter that trusts the recurrence less.
      state_var: prior variance of ``s_0`` (scalar or ``(n,)``) added to the factored
        ``P_0``; ``None`` keeps the theorem's form. ``init(..., cov=)`` sets any ``P_0``.
      joseph: Joseph-form covariance update.

    Returns:
      A :class:`~kalnat.recurrent.base.RecurrentLearner` whose state is :class:`JointState`.
    """
    base.check_cell(cell, family)
    check_forgetting(forgetting)
    n = cell.n_state
    q_theta = check_process_noise(process_noise)
    q_state = np.asarray(state_noise, dtype=np.float64)
    if q_state.shape not in ((), (n,)) or not np.all(np.isfinite(q_state)) or np.any(q_state < 0):
        raise ValueError(f"state_noise must be a non-negative scalar or ({n},) vector")
    if state_var is not None:
        sv = np.asarray(state_var, dtype=np.float64)
        if sv.shape not in ((), (n,)) or not np.all(np.isfinite(sv)) or np.any(sv < 0):
            raise ValueError(f"state_var must be a non-negative scalar or ({n},) vector")
    trans_noise = bool(np.any(q_theta != 0) or np.any(q_state != 0))

    def init(params, *, batch: int = 1, s0=None, jac0=None, cov=None) -> JointState:
        """State around ``params``; ``P_0 = [G_0; I] P^θ_0 [G_0; I]ᵀ`` (+ ``state_var``) or ``cov``."""
        check_params(params)
        theta, unravel = ravel_pytree(params)
        d, dtype = theta.shape[0], theta.dtype
        s = base.initial_states(cell, params, batch, s0, dtype)
        size = batch * n + d
        if cov is None:
            p0 = jnp.asarray(check_prior(prior_var, d), dtype)
            g0 = base.initial_jacobians(jac0, batch, n, d, dtype)
            p = factored_covariance(g0, p0)
            if state_var is not None:
                p = numerics.add_to_diagonal(
                    p, jnp.concatenate([jnp.tile(jnp.broadcast_to(jnp.asarray(state_var, dtype), (n,)), batch),
                                        jnp.zeros(d, dtype)]))
        else:
            if jac0 is not None:
                raise ValueError("give either cov or jac0, not both")
            c = np.asarray(cov, dtype=np.float64)
            if c.shape != (size, size):
                raise ValueError(f"cov must have shape ({size}, {size}) for {batch} sequence(s) of "
                                 f"{n} states and {d} parameters, got {c.shape}")
            if not np.all(np.isfinite(c)):
                raise ValueError("cov contains NaN or inf")
            if not np.allclose(c, c.T, rtol=1e-10, atol=1e-12 * max(np.abs(c).max(), 1e-300)):
                raise ValueError("cov must be symmetric")
            if np.linalg.eigvalsh(c).min() < -1e-10 * np.abs(c).max():
                raise ValueError("cov must be positive semi-definite")
            p = jnp.asarray(c, dtype)
        params = unravel(jnp.array(theta, copy=True))
        return JointState(params, s, jnp.array(p, copy=True), jnp.zeros((), jnp.int32))

    def noise_vector(nb, d):
        qs = np.broadcast_to(q_state, (n,))
        qt = np.broadcast_to(q_theta, (d,))
        return np.concatenate([np.tile(qs, nb), qt])

    def propagate(state: JointState, xs, mask):
        theta, unravel = ravel_pytree(state.params)
        nb = state.s.shape[0]
        trans = base.transition_jacobians(cell, unravel)
        read = base.readout_jacobians(cell, family, unravel)
        s, a, b = jax.vmap(trans, (None, 0, 0))(theta, state.s, xs)
        # A frozen (padding) sequence keeps its state: F's block is the identity there.
        s = jnp.where(mask[:, None], s, state.s)
        a = jnp.where(mask[:, None, None], a, jnp.eye(n, dtype=a.dtype))
        b = jnp.where(mask[:, None, None], b, 0.0)
        p_dyn = propagate_covariance(a, b, state.cov)
        yhat, hs, ht = jax.vmap(read, (None, 0))(theta, s)
        hz = jnp.concatenate([_block_rows(hs), ht.reshape(nb * family.m, -1)], axis=1)
        # Predictive from F P Fᵀ, before forgetting and noise: the core learners' convention
        # (H P_{t−1} Hᵀ), and under the factored form the same number as RTRL's H P Hᵀ.
        mean_cov = _diagonal_blocks(hz @ p_dyn @ hz.T, nb, family.m)
        r = jax.vmap(family.cov)(yhat)
        probs = family.probs(yhat) if family.is_classifier else None
        pred = Predictive(yhat, mean_cov, mean_cov + r, probs)
        return theta, unravel, s, p_dyn, hz, yhat, r, pred

    def step_and_predict(state: JointState, xs, ys, mask):
        theta, unravel, s, p_dyn, hz, yhat, r, pred = propagate(state, xs, mask)
        nb, d = s.shape[0], theta.shape[0]
        rows = jnp.repeat(mask, family.m)
        e = jax.vmap(family.innovation)(yhat, ys).reshape(-1)
        e = jnp.where(rows, e, 0.0)
        hz = jnp.where(rows[:, None], hz, 0.0)
        p = predict_cov(p_dyn, state.count, forgetting, noise_vector(nb, d) if trans_noise else np.zeros(()))
        ph = p @ hz.T
        sm = hz @ ph + numerics.block_diag(r)
        if joseph:
            gain = numerics.chol_solve(sm, ph.T).T  # K = P⁻ H_zᵀ S⁻¹, (B n + d, B m)
            dz, p = gain @ e, numerics.joseph_update(p, gain, ph.T, sm)
        else:
            # As the core EKF: with S = L Lᵀ, W = P⁻H_zᵀ L⁻ᵀ and v = L⁻¹e give z += W v and
            # P = P⁻ − W Wᵀ, symmetric by construction.
            chol = jnp.linalg.cholesky(sm)
            w = solve_triangular(chol, ph.T, lower=True).T
            dz, p = w @ solve_triangular(chol, e, lower=True), numerics.downdate(p, w)
        s = s + dz[: nb * n].reshape(nb, n)
        theta = theta + dz[nb * n:]
        return JointState(unravel(theta), s, p, state.count + 1), pred

    def advance(state: JointState, xs):
        mask = jnp.ones(state.s.shape[0], bool)
        theta, _, s, p_dyn, _, _, _, pred = propagate(state, xs, mask)
        if trans_noise:  # the time update without an observation still adds the noise
            p_dyn = numerics.add_to_diagonal(p_dyn, jnp.asarray(noise_vector(s.shape[0], theta.shape[0]), p_dyn.dtype))
        return JointState(state.params, s, p_dyn, state.count), pred

    config = dict(prior_var=prior_var, forgetting=forgetting, process_noise=process_noise,
                  state_noise=state_noise, state_var=state_var, joseph=joseph)
    return base.RecurrentLearner("joint_ekf", cell, family, init, step_and_predict, advance,
                                 JointState, config)
