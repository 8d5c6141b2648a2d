"""Joint extended Kalman filter on the hidden state and the parameters, z = (s, θ) (docs/method.md §4).

Dynamics ``z_t = (f(s_{t−1}, θ_{t−1}, x_t), θ_{t−1})`` with Jacobian
``F = [[∂f/∂s, ∂f/∂θ], [0, I]]``, observation Jacobian ``[∂ŷ/∂s, ∂ŷ/∂θ]``:

```
P⁻  = F P Fᵀ / λ_t + diag(q_s, q_θ)
S   = H_z P⁻ H_zᵀ + R,   z_t = z⁻ + P⁻ H_zᵀ S⁻¹ e,   P_t = P⁻ − P⁻ H_zᵀ S⁻¹ H_z P⁻
```

**Theorem (docs/method.md §4).** Started from the factored covariance
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

from kalnat import numerics
from kalnat.families import Family
from kalnat.filter import assemble_predictive, bounded_step, minibatch_log_likelihood
from kalnat.learners.base import check_forgetting_used, check_params, make_hyper
from kalnat.recurrent import base
from kalnat.representations.full import Full, inflate_dense
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


def joint_ekf(cell: RecurrentModel, family: Family, *, prior_var=1.0,
              forgetting: Forgetting = 1.0, process_noise=0.0, state_noise=0.0,
              state_var=None, joseph: bool = False) -> base.RecurrentLearner:
    """Joint EKF on ``z = (s, θ)`` (docs/method.md §4).

    Args:
      cell: a :class:`~kalnat.recurrent.cells.RecurrentModel`.
      family: the output family.
      prior_var: the parameters' prior covariance ``P^θ_0``: scalar, ``(d,)`` or ``(d, d)``.
      forgetting: λ in (0, 1] or ``t -> λ_t``, applied to the whole joint covariance (keeps the
        theorem's form; fading memory).
      process_noise: additive noise ``q_θ`` on the parameters (scalar or ``(d,)``) at each
        learned step (an ``advance`` adds none: θ does not move there); a random walk on θ, no
        longer equal to natural-gradient RTRL.
      state_noise: additive noise ``q_s`` on each hidden state (scalar or ``(n,)``) at each of
        its transitions (an ``advance`` too; none while a sequence is frozen, past its end or
        at a skipped step); a different, still useful filter that trusts the recurrence less.
      state_var: prior variance of ``s_0`` (scalar or ``(n,)``) added to the factored
        ``P_0``; ``None`` keeps the theorem's form. ``init(..., cov=)`` sets any ``P_0``.
      joseph: Joseph-form covariance update.

    Returns:
      A :class:`~kalnat.recurrent.base.RecurrentLearner` whose state is :class:`JointState`.
    """
    base.check_cell(cell, family)
    n = cell.n_state
    hyper = own = make_hyper(prior_var=prior_var, forgetting=forgetting, process_noise=process_noise)
    schedule = forgetting if callable(forgetting) else None
    rep = Full(bool(joseph))
    q_state = np.asarray(state_noise, dtype=np.float64)
    if q_state.shape not in ((), (n,)) or not np.all(np.isfinite(q_state)) or np.any(q_state < 0):
        raise ValueError(f"state_noise must be a non-negative scalar or ({n},) vector")
    if state_var is not None:
        sv = np.asarray(state_var, dtype=np.float64)
        if sv.shape not in ((), (n,)) or not np.all(np.isfinite(sv)) or np.any(sv < 0):
            raise ValueError(f"state_var must be a non-negative scalar or ({n},) vector")
    state_noise_on = bool(np.any(q_state != 0))

    fits = base.fit_checker(cell)

    def init(params, hyper=None, *, batch: int = 1, s0=None, jac0=None, cov=None) -> JointState:
        """State around ``params``; ``P_0 = [G_0; I] P^θ_0 [G_0; I]ᵀ`` (+ ``state_var``) or ``cov``,
        with ``P^θ_0`` from ``hyper.prior_var`` (default the learner's)."""
        check_params(params)
        fits(params, with_init_state=s0 is None)
        prior_var = (own if hyper is None else hyper).prior_var
        theta, unravel = ravel_pytree(params)
        d, dtype = theta.shape[0], theta.dtype
        # the configured (or given) q_θ against this d: a wrong length would first fail in the step
        check(own if hyper is None else hyper, d)
        s = base.initial_states(cell, params, batch, s0, dtype)
        size = batch * n + d
        if cov is None:
            p0 = jnp.asarray(numerics.check_covariance(prior_var, "prior_var", d), dtype)
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

    def noise_vector(hyper, mask, d, dtype, on_theta=True):
        """``diag(q_s, …, q_s, q_θ)``, or ``None`` without noise. The state noise is the
        transition's: a frozen sequence (``mask`` false: past its end, a skipped step) has no
        transition, so none. ``on_theta=False`` leaves θ's part out."""
        theta_noise = on_theta and hyper.process_noise is not None
        if not theta_noise and not state_noise_on:
            return None
        qt = jnp.broadcast_to(jnp.asarray(hyper.process_noise, dtype), (d,)) if theta_noise else jnp.zeros(d, dtype)
        qs = jnp.where(mask[:, None], jnp.broadcast_to(jnp.asarray(q_state, dtype), (n,)), 0.0)
        return jnp.concatenate([qs.reshape(-1).astype(dtype), qt])

    def transition(state: JointState, xs, mask):
        theta, unravel = ravel_pytree(state.params)
        trans = base.transition_jacobians(cell, unravel)
        s, a, b = jax.vmap(trans, (None, 0, 0))(theta, state.s, xs)
        # A frozen (padding) sequence keeps its state: F's block is the identity there.
        s = jnp.where(mask[:, None], s, state.s)
        a = jnp.where(mask[:, None, None], a, jnp.eye(n, dtype=a.dtype))
        b = jnp.where(mask[:, None, None], b, 0.0)
        return theta, unravel, s, propagate_covariance(a, b, state.cov)

    def readout(theta, unravel, s):
        """``(ŷ (B, m), H_z (B m, B n + d), R (B, m, m))`` at the states ``s``."""
        read = base.readout_jacobians(cell, family, unravel)
        yhat, hs, ht = jax.vmap(read, (None, 0))(theta, s)
        hz = jnp.concatenate([_block_rows(hs), ht.reshape(s.shape[0] * family.m, -1)], axis=1)
        return yhat, hz, jax.vmap(family.cov)(yhat)

    def prior_of(hyper, state, p_dyn, d, mask):
        t = state.count + 1
        lam = hyper.forgetting if schedule is None else schedule(t)
        return inflate_dense(p_dyn, lam, noise_vector(hyper, mask, d, p_dyn.dtype), None)

    def step(hyper, state: JointState, xs, ys, mask):
        theta, unravel, s, p_dyn = transition(state, xs, mask)
        nb, d, m = s.shape[0], theta.shape[0], family.m
        yhat, hz, r = readout(theta, unravel, s)
        rows = jnp.repeat(mask, m)
        e = jnp.where(rows, jax.vmap(family.innovation)(yhat, ys).reshape(-1), 0.0)
        hz = jnp.where(rows[:, None], hz, 0.0)
        R = numerics.block_diag(r)
        # The condition step of the covariance form, on z = (s, θ): the same operations as the
        # core EKF's (kalnat.representations.Full), from P⁻ = F P Fᵀ/λ + diag(q).
        prior = prior_of(hyper, state, p_dyn, d, mask)
        dz, hph, aux = rep.gain(prior, hz, R, e)
        # a Poisson count's step bounded as the core filter bounds RTRL's δθ: the rise of the
        # log-rate, hz dz = H δθ, is the same in both (dz's state part is G δθ), and so is the
        # step, shortened by the same factor
        dz = bounded_step(family, yhat, ys, hz, mask, dz)
        pred = assemble_predictive(family, False, yhat, numerics.diagonal_blocks(hph, nb, m), r)
        ll = minibatch_log_likelihood(family, False, pred, ys, hph, R, e, mask)
        p = rep.posterior(prior, hz, R, e, aux, rows).p
        s = s + dz[: nb * n].reshape(nb, n)
        theta = theta + dz[nb * n:]
        return JointState(unravel(theta), s, p, state.count + 1), pred, ll

    def propagate(hyper, state: JointState, xs):
        mask = jnp.ones(state.s.shape[0], bool)
        theta, unravel, s, p_dyn = transition(state, xs, mask)
        yhat, hz, r = readout(theta, unravel, s)
        d = theta.shape[0]
        # the prediction is the one a step would make here: from the prior of step t (λ_t, q_θ)
        prior = prior_of(hyper, state, p_dyn, d, mask)
        hph = jax.vmap(lambda h: prior.times(h.T).T @ h.T)(hz.reshape(s.shape[0], family.m, -1))
        pred = assemble_predictive(family, False, yhat, hph, r)
        # The state keeps only what the transition did: the states moved (F P Fᵀ) and gain the
        # transition's noise q_s; θ did not move, so its covariance takes neither λ nor q_θ (t
        # counts learned steps), as in rtrl, whose core state an advance leaves alone.
        q = noise_vector(hyper, mask, d, p_dyn.dtype, on_theta=False)
        if q is not None:
            p_dyn = numerics.add_to_diagonal(p_dyn, q)
        return JointState(state.params, s, p_dyn, state.count), pred

    config = dict(prior_var=prior_var, forgetting=forgetting, process_noise=process_noise,
                  state_noise=state_noise, state_var=state_var, joseph=joseph)
    def check(hyper, d):
        """The joint EKF reads λ and q (and the prior at init); it has no bound and no iterations."""
        if hyper.max_variance is not None or int(hyper.iterations) != 1:
            raise ValueError("joint_ekf: no variance bound and no iterated update here (a bound on θ alone would "
                             "break the factored covariance; use recurrent.rtrl)")
        if not 0 < float(hyper.forgetting) <= 1:
            raise ValueError(f"forgetting must lie in (0, 1], got {hyper.forgetting}")
        # a schedule t -> λ_t is what prior_of reads: a λ given in hyper would be dropped
        check_forgetting_used("joint_ekf", hyper.forgetting, schedule is not None)
        if hyper.process_noise is not None:
            q = np.asarray(hyper.process_noise, np.float64)
            if q.shape not in ((), (d,)):
                raise ValueError(f"process_noise must be a scalar or ({d},), got shape {q.shape}")
            if not np.all(np.isfinite(q)) or np.any(q < 0):
                raise ValueError("process_noise must be finite and non-negative")

    # step and propagate close over the cell, the family, λ's schedule (a function of t), the
    # Joseph form and q_s (by value: a constant of the programs, not a hyperparameter)
    step, propagate = base.with_recipe(
        (cell, family, schedule, bool(joseph), q_state.shape, tuple(q_state.ravel().tolist())), step, propagate)
    return base.RecurrentLearner("joint_ekf", cell, family, init, step, propagate, JointState, hyper, check, config)
