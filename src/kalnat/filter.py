"""The filter, written once: predict, condition and the predictive, over any representation.

Every core learner is these pure functions (docs/method.md §6) with a different
:mod:`~kalnat.representations` object, in the style of a Kalman filter library:

    prior = filter.predict(learner, hyper, state)                    # P⁻ = D (P/λ + qI) D
    pred = filter.predictive(learner, hyper, prior, lin)             # ŷ, H P⁻ Hᵀ, H P⁻ Hᵀ + R
    state, log_lik = filter.condition(learner, hyper, prior, lin, mask)

``hyper`` (:class:`Hyper`) is data: a pytree of arrays, so many configurations are one
``jax.vmap`` (:mod:`kalnat.bank`) and ``jax.grad`` of a stream's summed ``log_lik`` with respect
to λ or the prior scale is the gradient of the evidence (type-II maximum likelihood). The
predictive is computed from the *prior*, so ``log_lik`` is the exact one-step marginal
``log N(y_t; ŷ_t, H P⁻ Hᵀ + R)`` of a linear-Gaussian model under any λ, q and bound, and a
stream's sum is its exact log marginal likelihood.

With a minibatch, each row's log-likelihood is conditioned on the rows before it in the
minibatch as well (:func:`minibatch_log_likelihood`), so the sum stays the exact evidence. A
minibatch whose ``S`` is beyond the written-out factor's size is conditioned in noise units
(:func:`~kalnat.linearization.in_noise_units`; docs/method.md §2d).

The iterated update (``learner.max_iterations > 1``) relinearises from the same prior: pass
``relinearize(θ) -> Linearization`` to :func:`condition`; ``hyper.iterations`` of them are used.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from kalnat import numerics
from kalnat.linearization import Linearization, in_noise_units, masked, stack, times
from kalnat.predictive import log_predictive, moderated_probs, student_t_log_prob
from kalnat.programs import once

__all__ = [
    "Hyper", "State", "Predictive", "init", "predict", "predictive", "condition", "step",
    "assemble_predictive", "row_log_likelihood", "minibatch_log_likelihood", "forgetting_at",
    "covariance", "with_covariance", "check_live",
]


class Hyper(NamedTuple):
    """A learner's hyperparameters, as data (a pytree: ``None`` fields are absent).

    ``prior_var``, ``noise_shape`` and ``noise_scale`` define the prior: ``init`` reads them (and
    :func:`kalnat.log_evidence`, which starts from them); a step reads the others.

    Attributes:
      prior_var: ``P_0``: scalar (``v·I``), ``(d,)`` diagonal or ``(d, d)``.
      forgetting: λ in (0, 1]: ``P⁻ = P/λ`` (fading memory; natural gradient's
        ``1/η_t = λ/η_{t−1} + 1``).
      process_noise: ``q`` (scalar or ``(d,)``): ``P⁻ = P/λ + q I``, a random walk on θ;
        ``None``: none.
      max_variance: a bound (scalar or ``(d,)``) on every variance of ``P⁻``, against covariance
        wind-up; ``None``: the exact filter.
      iterations: linearisations per update used (at most the learner's ``max_iterations``).
      noise_shape, noise_scale: ``a₀``, ``b₀`` of the inverse-gamma prior on the noise scale
        (the normal–inverse-gamma filter only).
    """

    prior_var: Any = 1.0
    forgetting: Any = 1.0
    process_noise: Any = None
    max_variance: Any = None
    iterations: Any = 1
    noise_shape: Any = None
    noise_scale: Any = None


class State(NamedTuple):
    """A core learner's state.

    Attributes:
      params: θ_t as the model's params pytree.
      cov: θ's covariance in the learner's representation (:class:`~kalnat.representations.
        Covariance`, ``CholeskyFactor``, ``Precision``, ``Fisher``, ``NIGCovariance``);
        :func:`kalnat.covariance` gives it as a matrix.
      count: t, the number of updates.
    """

    params: Any
    cov: Any
    count: jax.Array


class Predictive(NamedTuple):
    """Linearised one-step predictive distribution (docs/method.md §5), from the prior.

    Shapes are for a minibatch of ``b`` rows; a single observation drops the ``b`` axis.

    Attributes:
      mean: ``(b, m)`` predicted mean parameter ŷ.
      mean_cov: ``(b, m, m)`` uncertainty of ŷ from the parameters, ``H P⁻ Hᵀ``.
      obs_cov: ``(b, m, m)`` covariance of a new T(y), ``H P⁻ Hᵀ + R`` (for the
        normal–inverse-gamma filter: the scale matrix of its Student-t).
      probs: ``(b, K)`` class probabilities for classifiers, ``None`` otherwise.
    """

    mean: jax.Array
    mean_cov: jax.Array
    obs_cov: jax.Array
    probs: Optional[jax.Array] = None


def init(learner, hyper: Hyper, params) -> State:
    """``State`` around ``params`` with the prior of ``hyper`` (pure: traceable in ``hyper``)."""
    return _init_state(learner.representation, hyper, params)


def fresh(learner, hyper: Hyper, params, stacked: bool = False) -> State:
    """:func:`init` in buffers of its own (updates donate them; none is shared with ``params``),
    as one compiled program: run op by op, its array operations were each a program to compile
    or load from the cache (about twenty for a bank). ``stacked``: ``hyper``'s leaves have a
    leading axis of K members; the states are stacked the same way.

    A representation given by plain values (numbers, flags, text) is a static argument of one
    program shared by every learner with an equal one; any other (one holding a function: a
    schedule) gets a program kept with its learner, so that neither outlives the learner."""
    rep = learner.representation
    if _by_value(rep):
        return _fresh_shared(rep, hyper, params, stacked)
    return once(learner, ("init", stacked), lambda: jax.jit(
        lambda h, p: _fresh(rep, h, p, stacked)))(hyper, params)


def _by_value(x) -> bool:
    """Whether ``x`` is made of plain values only, so that equal means interchangeable: exact
    Python numbers, flags, text, ``None``, tuples and dataclasses of them (``np.float64(1)``
    equals ``1.0`` but makes float64 arrays where ``1.0`` follows the parameters' dtype)."""
    if x is None or type(x) in (bool, int, float, str):
        return True
    if type(x) is tuple:
        return all(_by_value(v) for v in x)
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return all(_by_value(getattr(x, f.name)) for f in dataclasses.fields(x))
    return False


def _init_state(representation, hyper: Hyper, params) -> State:
    theta, unravel = ravel_pytree(params)
    return State(unravel(theta), representation.init(hyper, theta.shape[0], theta.dtype), jnp.zeros((), jnp.int32))


def _fresh(representation, hyper, params, stacked):
    one = functools.partial(_init_state, representation)
    state = (jax.vmap(one, in_axes=(0, None)) if stacked else one)(hyper, params)
    return jax.tree_util.tree_map(lambda a: jnp.array(a, copy=True), state)


_fresh_shared = jax.jit(_fresh, static_argnums=(0, 3))


def forgetting_at(learner, hyper: Hyper, t):
    """λ_t: ``hyper.forgetting``, or the learner's schedule of ``t`` when it was built with one."""
    return hyper.forgetting if learner.schedule is None else learner.schedule(t)


def predict(learner, hyper: Hyper, state: State) -> State:
    """The prediction step: ``state`` with ``cov`` replaced by the prior ``P⁻`` (θ unchanged)."""
    t = state.count + 1
    prior = learner.representation.inflate(state.cov, t, forgetting_at(learner, hyper, t),
                                           hyper.process_noise, hyper.max_variance)
    return state._replace(cov=prior)


def assemble_predictive(family, moderated, yhat, hph, R, noise=None) -> Predictive:
    """:class:`Predictive` from ``ŷ (b, m)``, the blocks ``H P⁻ Hᵀ (b, m, m)`` and ``R (b, m, m)``;
    ``noise = (scale, dof)`` scales both covariances (unknown noise scale)."""
    if noise is not None:
        hph = noise[0] * hph
        R = noise[0] * R
    probs = None
    if family.is_classifier:
        probs = (jax.vmap(lambda m, c: moderated_probs(family, m, c))(yhat, hph) if moderated
                 else family.probs(yhat))
    return Predictive(yhat, hph, hph + R, probs)


def row_log_likelihood(family, moderated, pred: Predictive, ys, noise=None):
    """``(b,)`` one-step predictive log-likelihoods ``log p(y | past)`` of the rows, each row on its
    own (a Student-t with ``noise``'s degrees of freedom, else
    :func:`kalnat.predictive.log_predictive`)."""
    if noise is not None:
        dof = noise[1]
        return jax.vmap(lambda m, o, y: student_t_log_prob(family.stat(y).astype(m.dtype), m, o, dof))(
            pred.mean, pred.obs_cov, ys)
    return jax.vmap(lambda m, c, o, y: log_predictive(family, m, c, o, y, moderated))(
        pred.mean, pred.mean_cov, pred.obs_cov, ys)


def minibatch_log_likelihood(family, moderated, pred: Predictive, ys, hph, R, e, mask, noise=None,
                             log_scale=None):
    """``(b,)`` the rows' log-likelihoods, summing to the minibatch's joint one-step log-likelihood.

    Rows of one minibatch share θ's uncertainty, so they are not independent given the past.
    For a Gaussian target the joint predictive of the stacked ``T(y)`` is ``N(ŷ, S)`` with
    ``S = H P⁻ Hᵀ + R`` (``k × k``; a multivariate t with the noise scale unknown), and its
    Cholesky factor splits the joint log-density, row after row, into ``log p(y_i | past, y_<i)``:
    exact (for a linear-Gaussian model, the same numbers as learning the rows one by one). For
    classifiers and counts each row is scored on its own (plug-in or moderated). Masked rows
    score 0 and do not count.

    ``log_scale (b·m,)``: ``log diag L`` when ``hph``, ``R`` and ``e`` are in noise units
    (:func:`~kalnat.linearization.in_noise_units`): the factor of ``S = L S' Lᵀ`` is ``L L_S'``,
    lower-triangular with the diagonal ``diag L · diag L_S'``, so each scalar's term is the one of
    ``S'`` less its ``log L_jj``.
    """
    b, m = pred.mean.shape
    if family.name != "gaussian":
        return jnp.where(mask, row_log_likelihood(family, moderated, pred, ys, noise), 0.0)
    rows = jnp.repeat(mask, m)
    S = hph + R if noise is None else noise[0] * (hph + R)
    chol = numerics.cholesky(S)
    v = jnp.where(rows, numerics.solve_lower(chol, e), 0.0)
    log_diag = jnp.log(jnp.diagonal(chol))
    if log_scale is not None:
        log_diag = log_diag + log_scale
    if noise is None:
        terms = -0.5 * v * v - log_diag - 0.5 * jnp.log(2.0 * jnp.pi)
    else:  # the chain rule of a multivariate t: dof ν + j − 1 for the j-th counted scalar
        nu = noise[1]
        j = jnp.cumsum(rows).astype(v.dtype)
        c = jnp.cumsum(v * v)
        g = jax.scipy.special.gammaln
        terms = (g(0.5 * (nu + j)) - g(0.5 * (nu + j - 1.0)) - 0.5 * jnp.log(nu * jnp.pi) - log_diag
                 - 0.5 * (nu + j) * jnp.log1p(c / nu) + 0.5 * (nu + j - 1.0) * jnp.log1p((c - v * v) / nu))
    return jnp.where(mask, jnp.sum(jnp.where(rows, terms, 0.0).reshape(b, m), axis=1), 0.0)


def predictive(learner, hyper: Hyper, prior: State, lin: Linearization) -> Predictive:
    """The one-step predictive of the rows of ``lin`` (linearised at the prior's θ)."""
    rep = learner.representation
    # a step that branches on the data keeps its conds under a map (vmap: selects); each row's
    # quad is one example's
    quad = lambda h: rep.quad(prior.cov, h)  # noqa: E731
    hph = jax.lax.map(quad, lin.H) if learner.branches_on(1) else jax.vmap(quad)(lin.H)
    return assemble_predictive(learner.family, learner.moderated, lin.yhat, hph, lin.R, rep.noise(prior.cov))


def condition(learner, hyper: Hyper, prior: State, lin: Linearization, mask=None,
              relinearize: Optional[Callable] = None):
    """The update on the rows of ``lin`` (``(b,)`` ``mask``: which count; default all).

    Returns ``(posterior State, log_likelihood (b,))``: each row's one-step predictive
    log-likelihood under the prior (0 for masked rows).
    """
    post, _, ll = _condition(learner, hyper, prior, lin, mask, relinearize)
    return post, ll


def step(learner, hyper: Hyper, state: State, linearize_at: Callable, mask=None):
    """One step: predict, then condition on ``linearize_at(θ)`` (at the prior's θ, and at the
    iterates of an iterated update). Returns ``(State, Predictive, log_likelihood (b,))``."""
    prior = predict(learner, hyper, state)
    theta, _ = ravel_pytree(prior.params)
    return _condition(learner, hyper, prior, linearize_at(theta), mask, linearize_at)


def _noise_units(b: int, m: int) -> bool:
    """Whether a minibatch of ``b`` rows of ``m`` outputs is conditioned in noise units
    (:func:`~kalnat.linearization.in_noise_units`): where its ``S`` has more than
    :data:`numerics.SMALL` outputs, so LAPACK, without the written-out factor's pivot floor,
    would factor it. Up to that size ``S`` is factored as it is, with the floor (a single row of
    a classifier of up to 17 classes: the same numbers as before noise units were taken)."""
    return b * m > numerics.SMALL


def _stacked(lin: Linearization, mask, unit: bool):
    """``(stack(masked(lin, mask)), L)``: with ``unit``, in noise units
    (:func:`~kalnat.linearization.in_noise_units`; ``L (b, m, m)``, a masked row's the identity),
    else as they are (``L = None``)."""
    lin = masked(lin, mask)
    if not unit:
        return stack(lin), None
    eye = jnp.eye(lin.R.shape[-1], dtype=lin.R.dtype)
    lin, chol = in_noise_units(lin._replace(R=jnp.where(mask[:, None, None], lin.R, eye)))
    return stack(lin), chol


def _condition(learner, hyper, prior, lin, mask, relinearize):
    rep = learner.representation
    b, m = lin.yhat.shape
    if mask is None:
        mask = jnp.ones(b, bool)
    theta0, unravel = ravel_pytree(prior.params)
    unit = _noise_units(b, m)
    (H, R, e), chol = _stacked(lin, mask, unit)
    delta, hph, aux = rep.gain(prior.cov, H, R, e)
    delta = bounded_step(learner.family, lin.yhat, lin.y, H, mask, delta)
    # The predictive of each row is the diagonal block of the H P⁻ Hᵀ the gain computed (in the
    # data's coordinates: L_i (H' P⁻ H'ᵀ)_ii L_iᵀ).
    blocks = numerics.diagonal_blocks(hph, b, m)
    if unit:
        blocks = jnp.einsum("bij,bjk,blk->bil", chol, blocks, chol)
    noise = rep.noise(prior.cov)
    pred = assemble_predictive(learner.family, learner.moderated, lin.yhat, blocks, lin.R, noise)
    if lin.y is None:
        ll = jnp.zeros(b, lin.yhat.dtype)
    else:
        log_scale = None if chol is None else jnp.log(jnp.diagonal(chol, axis1=1, axis2=2)).reshape(b * m)
        ll = minibatch_log_likelihood(learner.family, learner.moderated, pred, lin.y, hph, R, e, mask, noise,
                                      log_scale)
    if learner.max_iterations > 1:
        if relinearize is None:
            raise ValueError(f"{learner.name}: an iterated update needs relinearize(θ)")
        def again(carry):
            delta = carry[0]
            (H_i, R_i, e_i), _ = _stacked(relinearize(theta0 + delta), mask, unit)
            e_i = e_i + times(H_i, delta)  # the innovation of the linear model about θ_i, from θ_{t−1}
            d_i, _, aux_i = rep.gain(prior.cov, H_i, R_i, e_i)
            # bounded before the next linearisation too: relinearised where an overshooting
            # step left the rate (10³⁴ × the counts), P collapsed along the row for good
            return bounded_step(learner.family, lin.yhat, lin.y, H, mask, d_i), H_i, R_i, e_i, aux_i

        carry = (delta, H, R, e, aux)
        for i in range(learner.max_iterations - 1):  # a small static count: unrolled
            # A cond, not a select: a member of a bank that uses fewer linearisations than the
            # bank is built for skips the work when its step runs on its own (Bank.scan_chunk's
            # members one at a time, as a representation that branches runs them); under vmap
            # (members in groups) JAX turns it into a select of both. A bank's chunk gives the
            # members of each count their count as a Python int (Bank._over_counts): the
            # predicate is then a constant, and XLA drops the cond.
            carry = jax.lax.cond(i + 2 <= hyper.iterations, again, lambda c: c, carry)
        delta, H, R, e, aux = carry
    cov = rep.posterior(prior.cov, H, R, e, aux, jnp.repeat(mask, m))
    # θ + δθ leaf by leaf (the same sums): adding to the flat θ would concatenate the
    # parameters only to slice them apart again, a copy of θ per step
    params = jax.tree_util.tree_map(jnp.add, prior.params, unravel(delta))
    return State(params, cov, prior.count + 1), pred, ll


def bounded_step(family, yhat, y, H, mask, delta):
    """``δθ`` of one row, shortened where the family bounds a step (``family.log_step_slack``:
    the Poisson's) so that the row's log-rate rises at most that slack above ``log max(y, 1)``;
    ``yhat (b, m)`` and ``y (b, …)`` (``None``: no step to bound) as in :class:`Linearization`,
    ``H`` the row's stacked Jacobian at ``θ⁻`` (the one the first gain used), ``mask (b,)``.
    The joint filter of a recurrent model bounds its step on ``(s, θ)`` here too.

    The EKF moves a Poisson row's log-rate by ``q e / (1 + λ q)`` for the rate ``λ``, the
    innovation ``e = y − λ`` and ``q = x P⁻ xᵀ``: for a small rate and a wide ``P⁻`` nearly
    ``q y``, far above the count (a count of 4 at a rate near 0 and ``q = 40`` throws it up by
    160; members of the default bank reached rates of 10⁴² on counts of a few). The exact
    posterior's mode never rises past ``log y`` (it solves ``z − z⁻ = q (y − e^z)``, so
    ``e^z < y`` where ``z > z⁻``), so the bound leaves it, and every step that does not pass the
    count by a factor ``e^slack``, as it is. The EKF's covariance update does not depend on ``e``
    and is unchanged (an iterated update relinearises at the bounded iterates; an MLP's rise is
    to first order, ``H δθ / λ`` at ``θ⁻``). Every form of the filter computes the same ``δθ``
    and so takes the same bound (the EKF and natural gradient stay one filter). One row at a
    time only: in a minibatch the other rows move a row's log-rate too, and the joint
    posterior's mode may pass its count (a teacher's stream in minibatches of 8 did), so there
    the step is the EKF's."""
    slack = family.log_step_slack
    if slack is None or y is None or yhat.size != 1:
        return delta
    lam = jnp.maximum(yhat.reshape(()), jnp.finfo(yhat.dtype).tiny)
    y = family.stat(y[0]).astype(lam.dtype).reshape(())
    rise = times(H, delta)[0] / lam                                   # H δθ / λ: Δ log λ
    top = jnp.log(jnp.maximum(y, 1.0) / lam) + slack
    over = mask[0] & (y > lam) & (rise > top)
    return delta * jnp.where(over, top / jnp.where(over, rise, 1.0), 1.0)


def check_live(state, name):
    """A state whose buffers were donated to an in-place update cannot be used again."""
    for leaf in jax.tree_util.tree_leaves(state):
        try:  # (per row of update: a method call is cheaper than an isinstance check of jax.Array)
            deleted = leaf.is_deleted()
        except AttributeError:  # a NumPy array or a number: never donated
            continue
        if deleted:
            raise ValueError(
                f"{name}: this state was consumed by an in-place update (update and fit donate the "
                "state's buffers); continue with the state they returned")


def covariance(state) -> np.ndarray:
    """θ's covariance ``P (d, d)`` held by any learner's state, as a float64 NumPy array.

    A core learner's :class:`State` in any representation (for the normal–inverse-gamma filter
    ``V``, θ's covariance in units of σ²); a bank's state gives ``(K, d, d)``, one per member;
    a recurrent state gives its core's (RTRL) or the θ block of the joint covariance.
    """
    check_live(state, "covariance")
    if hasattr(state, "members"):  # a bank
        return np.stack([covariance(jax.tree_util.tree_map(lambda a: a[k], state.members))
                         for k in range(state.log_weights.shape[0])])
    if hasattr(state, "core"):  # natural-gradient RTRL
        return covariance(state.core)
    if isinstance(state, State):
        return np.asarray(state.cov.dense(), np.float64)
    if hasattr(state, "s") and hasattr(state, "cov"):  # the joint EKF on (s, θ)
        d = ravel_pytree(state.params)[0].shape[0]
        return np.asarray(state.cov, np.float64)[-d:, -d:]
    raise ValueError(f"{type(state).__name__} holds no covariance of θ")


def with_covariance(state: State, params, cov) -> State:
    """``state`` with parameters ``params`` and covariance ``cov (d, d)``, in its own representation."""
    if not isinstance(state, State):
        raise ValueError(f"with_covariance takes a core learner's State, got {type(state).__name__}")
    return state._replace(params=params, cov=state.cov.with_dense(jnp.asarray(np.asarray(cov, np.float64))))
