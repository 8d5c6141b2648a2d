"""An independent NumPy implementation of docs/method.md §1–§2, for checking the JAX learners.

Jacobians are written out by hand (no autodiff) for the linear model and a one-hidden-layer
tanh MLP, in the parameter order ``jax.flatten_util.ravel_pytree`` uses for
``kalnat.models.linear`` ({"b", "w"}) and ``kalnat.models.mlp`` ([{"b", "w"}, {"b", "w"}]).
"""

import numpy as np


def linear_jac(theta, x, n_out):
    p = x.shape[0]
    b, w = theta[:n_out], theta[n_out:].reshape(n_out, p)
    z = w @ x + b
    jz = np.hstack([np.eye(n_out), np.kron(np.eye(n_out), x[None])])
    return z, jz


def mlp_jac(theta, x, hidden, n_out):
    p = x.shape[0]
    i = 0
    b0 = theta[i:i + hidden]; i += hidden
    w0 = theta[i:i + hidden * p].reshape(hidden, p); i += hidden * p
    b1 = theta[i:i + n_out]; i += n_out
    w1 = theta[i:i + n_out * hidden].reshape(n_out, hidden)
    h = np.tanh(w0 @ x + b0)
    z = w1 @ h + b1
    a = w1 * (1 - h**2)
    jz = np.hstack([a, np.kron(a, x[None]), np.eye(n_out), np.kron(np.eye(n_out), h[None])])
    return z, jz


def family_terms(name, z, y, sigma=None):
    """``(ŷ, ∂ŷ/∂z, R, T(y))`` by hand for each family of docs/method.md §1."""
    if name == "gaussian":
        m = z.shape[0]
        return z, np.eye(m), np.asarray(sigma), np.reshape(y, (m,)).astype(float)
    if name == "bernoulli":
        pr = 1 / (1 + np.exp(-z))
        return pr, np.diag(pr * (1 - pr)), np.diag(pr * (1 - pr)), np.array([float(y)])
    if name == "poisson":
        lam = np.exp(z)
        return lam, np.diag(lam), np.diag(lam), np.array([float(y)])
    if name == "categorical":
        k = z.shape[0] + 1
        ez = np.exp(np.append(z, 0.0) - max(z.max(), 0.0))
        pr = (ez / ez.sum())[:-1]
        r = np.diag(pr) - np.outer(pr, pr)
        t = np.zeros(k - 1)
        if int(y) < k - 1:
            t[int(y)] = 1.0
        return pr, r, r, t
    raise ValueError(name)


def stacked(jac_fn, fam, theta, xs, ys, sigma=None):
    hs, rs, es = [], [], []
    for x, y in zip(xs, ys):
        z, jz = jac_fn(theta, x)
        yhat, dy, r, t = family_terms(fam, z, y, sigma)
        hs.append(dy @ jz)
        rs.append(r)
        es.append(t - yhat)
    m = rs[0].shape[0]
    R = np.zeros((len(rs) * m, len(rs) * m))
    for i, r in enumerate(rs):
        R[i * m:(i + 1) * m, i * m:(i + 1) * m] = r
    return np.vstack(hs), R, np.concatenate(es)


def ekf(jac_fn, fam, theta, P, batches, lam=1.0, q=0.0, sigma=None):
    """§2a, textbook form: ``K = P⁻Hᵀ S⁻¹``, ``P = P⁻ − K H P⁻``."""
    theta, P = theta.copy(), P.copy()
    for xs, ys in batches:
        H, R, e = stacked(jac_fn, fam, theta, xs, ys, sigma)
        Pm = P / lam + q * np.eye(len(theta))
        S = H @ Pm @ H.T + R
        K = Pm @ H.T @ np.linalg.inv(S)
        theta = theta + K @ e
        P = Pm - K @ H @ Pm
    return theta, P


def information(jac_fn, fam, theta, P, batches, lam=1.0, sigma=None):
    """§2b: ``Λ = λΛ + Hᵀ R⁻¹ H``, ``θ += Λ⁻¹ Hᵀ R⁻¹ e``."""
    theta, L = theta.copy(), np.linalg.inv(P)
    for xs, ys in batches:
        H, R, e = stacked(jac_fn, fam, theta, xs, ys, sigma)
        Ri = np.linalg.inv(R)
        L = lam * L + H.T @ Ri @ H
        theta = theta + np.linalg.solve(L, H.T @ Ri @ e)
    return theta, np.linalg.inv(L)


def natural_gradient(jac_fn, fam, theta, J, batches, etas, gammas, sigma=None):
    """§2c with given rate sequences: ``J = (1−γ)J + γ HᵀR⁻¹H``, ``θ += η J⁻¹ HᵀR⁻¹e``."""
    theta, J = theta.copy(), J.copy()
    for (xs, ys), eta, gamma in zip(batches, etas, gammas):
        H, R, e = stacked(jac_fn, fam, theta, xs, ys, sigma)
        Ri = np.linalg.inv(R)
        J = (1 - gamma) * J + gamma * H.T @ Ri @ H
        theta = theta + eta * np.linalg.solve(J, H.T @ Ri @ e)
    return theta, J
