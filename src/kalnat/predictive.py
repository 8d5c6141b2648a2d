"""Predictive log-likelihoods and moderated (posterior-averaged) predictive probabilities.

The filter's Gaussian posterior N(θ, P) gives, through the linearisation, a Gaussian on the
mean parameter ŷ with covariance ``H P⁻ Hᵀ`` (``Predictive.mean_cov``, from the prior of the
step, docs/method.md §5). The
*plug-in* probability uses ŷ alone; the *moderated* one integrates the family's likelihood
over the posterior of the raw output z (MacKay 1992, "The evidence framework applied to
classification networks"):

- Bernoulli: the probit approximation ``p ≈ σ(μ_z / √(1 + π s²/8))``.
- Categorical: its multi-class analogue, the mean-field approximation of Lu, Ie & Sha
  (2020, "Uncertainty estimation with infinitesimal jackknife", eq. 12): for each class
  ``p_k ≈ 1 / (1 + Σ_{j≠k} exp(−(μ_k − μ_j) / √(1 + π/8 · Var(z_k − z_j))))``, renormalised.
- Poisson: the Poisson–log-normal probability by Gauss–Hermite quadrature over z.

The covariance of z follows from that of ŷ exactly, because ŷ = link(z) and H_ŷ = J_link H_z:
``Cov z = J⁻¹ (H P⁻ Hᵀ) J⁻ᵀ`` with ``J = ∂ŷ/∂z`` (``p(1−p)`` for Bernoulli, ``λ`` for Poisson,
``diag(p) − p pᵀ`` on the K−1 free logits for Categorical).

:func:`log_predictive` is the one-step predictive log-likelihood ``log p(y_t | y_<t)`` of a
row, the quantity whose product over the stream is a filter's evidence (used by
:mod:`kalnat.bank`). For a Gaussian family it is the exact ``N(y; ŷ, H P⁻ Hᵀ + R)``; for
a linear-Gaussian model that is the exact marginal likelihood.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "moderated_probs", "log_predictive", "student_t_log_prob", "gaussian_log_prob",
    "logit_cov",
]

# Gauss–Hermite nodes for the Poisson–log-normal integral (exact for polynomials of degree 39).
_GH_X, _GH_W = np.polynomial.hermite_e.hermegauss(20)


def _floor(a, dtype):
    return jnp.maximum(a, jnp.finfo(dtype).tiny ** 0.5)


def logit_cov(family, yhat, mean_cov):
    """Covariance of the raw output z given that of ŷ: ``(m,) , (m, m) -> (m, m)``."""
    name = family.name
    dt = yhat.dtype
    if name == "bernoulli":
        j = _floor(yhat * (1.0 - yhat), dt)
        return mean_cov / (j[:, None] * j[None, :])
    if name == "poisson":
        j = _floor(yhat, dt)
        return mean_cov / (j[:, None] * j[None, :])
    if name == "categorical":
        # J = diag(p) − p pᵀ on the K−1 free logits (last logit fixed at 0); Cov z = J⁻¹ C J⁻ᵀ.
        J = jnp.diag(yhat) - jnp.outer(yhat, yhat)
        J = J + jnp.eye(J.shape[0], dtype=dt) * jnp.finfo(dt).eps
        a = jnp.linalg.solve(J, mean_cov)
        c = jnp.linalg.solve(J, a.T)
        return 0.5 * (c + c.T)
    return mean_cov


def moderated_probs(family, yhat, mean_cov):
    """Class probabilities ``(K,)`` averaged over the posterior of z (one row).

    Args:
      family: Bernoulli or Categorical.
      yhat: ``(m,)`` plug-in mean parameter; mean_cov: ``(m, m)`` = ``H P⁻ Hᵀ``.
    """
    dt = yhat.dtype
    if family.name == "bernoulli":
        p = jnp.clip(yhat[0], jnp.finfo(dt).tiny, 1.0 - jnp.finfo(dt).eps)
        mu = jnp.log(p) - jnp.log1p(-p)
        s2 = logit_cov(family, yhat, mean_cov)[0, 0]
        q = jax.nn.sigmoid(mu / jnp.sqrt(1.0 + jnp.pi * s2 / 8.0))
        return jnp.stack([1.0 - q, q])
    if family.name == "categorical":
        pk = jnp.concatenate([yhat, 1.0 - jnp.sum(yhat, keepdims=True)])
        pk = jnp.clip(pk, jnp.finfo(dt).tiny, 1.0)
        mu = jnp.log(pk) - jnp.log(pk[-1])
        cz = logit_cov(family, yhat, mean_cov)
        k = pk.shape[0]
        C = jnp.zeros((k, k), dt).at[:-1, :-1].set(cz)
        dv = jnp.diag(C)
        var_diff = jnp.maximum(dv[:, None] + dv[None, :] - 2.0 * C, 0.0)
        scaled = (mu[:, None] - mu[None, :]) / jnp.sqrt(1.0 + jnp.pi / 8.0 * var_diff)
        # p_k = 1 / Σ_j exp(−scaled_kj) (the j = k term is 1), computed in log space.
        logp = -jax.scipy.special.logsumexp(-scaled, axis=1)
        return jax.nn.softmax(logp)
    raise ValueError(f"moderated probabilities are defined for classifiers, not {family.name}")


def gaussian_log_prob(y, mean, cov):
    """``log N(y; mean, cov)`` for ``(m,)``, ``(m,)``, ``(m, m)``."""
    chol = jnp.linalg.cholesky(cov)
    w = jax.scipy.linalg.solve_triangular(chol, y - mean, lower=True)
    logdet = 2.0 * jnp.sum(jnp.log(jnp.diag(chol)))
    return -0.5 * (w @ w + logdet + y.shape[0] * jnp.log(2.0 * jnp.pi))


def student_t_log_prob(y, loc, scale_cov, dof):
    """Multivariate Student-t ``log t_ν(y; loc, Σ)``: ``(m,)``, ``(m,)``, ``(m, m)``, scalar ν.

    The predictive of a Gaussian with a normal–inverse-gamma posterior on (θ, σ²)
    (:mod:`kalnat.learners.nig`).
    """
    m = y.shape[0]
    chol = jnp.linalg.cholesky(scale_cov)
    w = jax.scipy.linalg.solve_triangular(chol, y - loc, lower=True)
    logdet = 2.0 * jnp.sum(jnp.log(jnp.diag(chol)))
    g = jax.scipy.special.gammaln
    return (g(0.5 * (dof + m)) - g(0.5 * dof) - 0.5 * m * jnp.log(dof * jnp.pi) - 0.5 * logdet
            - 0.5 * (dof + m) * jnp.log1p(w @ w / dof))


def _log_poisson(y, z):
    return y * z - jnp.exp(z) - jax.scipy.special.gammaln(y + 1.0)


def log_predictive(family, yhat, mean_cov, obs_cov, y, moderated: bool = False):
    """One-step predictive log-likelihood ``log p(y | past)`` of one row.

    Args:
      family: the output family.
      yhat: ``(m,)`` ŷ; mean_cov: ``(m, m)`` ``H P⁻ Hᵀ``; obs_cov: ``(m, m)`` ``H P⁻ Hᵀ + R``.
      y: the observation (the family's event shape).
      moderated: integrate over the posterior (classifiers, Poisson); a Gaussian family is
        always integrated (``N(y; ŷ, H P⁻ Hᵀ + R)``).
    """
    dt = yhat.dtype
    name = family.name
    if name == "gaussian":
        return gaussian_log_prob(family.stat(y).astype(dt), yhat, obs_cov)
    if name in ("bernoulli", "categorical"):
        if moderated:
            p = moderated_probs(family, yhat, mean_cov)
        else:
            p = family.probs(yhat)
        idx = jnp.asarray(y).astype(jnp.int32).reshape(())
        return jnp.log(jnp.clip(p[idx], jnp.finfo(dt).tiny, 1.0))
    if name == "poisson":
        lam = _floor(yhat[0], dt)
        mu = jnp.log(lam)
        yy = jnp.asarray(y).astype(dt).reshape(())
        if not moderated:
            return _log_poisson(yy, mu)
        s = jnp.sqrt(jnp.maximum(logit_cov(family, yhat, mean_cov)[0, 0], 0.0))
        w = jnp.asarray(_GH_W / np.sqrt(2.0 * np.pi), dt)
        zs = mu + s * jnp.asarray(_GH_X, dt)
        return jax.scipy.special.logsumexp(_log_poisson(yy, zs), b=w)
    raise ValueError(f"no predictive log-likelihood for family {name}")
