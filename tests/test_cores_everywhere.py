"""Every core learner runs under RTRL and in a bank through the one filter: an iterated core
under RTRL relinearises (and equals an independent iterated RTRL update), a bank of any
learner equals its members run alone, a consumed state says so."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

import kalnat
from kalnat import recurrent
from kalnat import bank as kbank

CELL = recurrent.elman(n_inputs=1, n_state=3)
GAUSS = kalnat.families.Gaussian(0.2)
T = 25


def _series(seed=0):
    rng = np.random.default_rng(seed)
    t = np.arange(T + 1)
    z = np.sin(0.4 * t) + 0.3 * rng.normal(size=T + 1)
    return z[:-1, None], z[1:]


def independent_iterated_rtrl(params, X, Y, *, prior_var, lam, iterations):
    """Natural-gradient RTRL with an iterated EKF core, written from docs/method.md §2f and §4
    with jax.jacobian and NumPy only: per step the transition at θ_{t−1} gives s_t and
    G_t = ∂f/∂s G + ∂f/∂θ; the core relinearises θ ↦ g(s_t + G_t (θ − θ_{t−1}), θ) at each
    iterate; then s_t += G_t δθ."""
    theta, unravel = ravel_pytree(params)
    theta = np.asarray(theta)
    d = theta.size
    P = prior_var * np.eye(d)
    s = np.asarray(CELL.init_state(params))
    G = np.zeros((s.size, d))
    for x, y in zip(X, Y):
        f = lambda s_, th: CELL.transition(unravel(th), s_, jnp.asarray(x))
        s_new = np.asarray(f(jnp.asarray(s), jnp.asarray(theta)))
        fs, ft = (np.asarray(a) for a in jax.jacobian(f, argnums=(0, 1))(jnp.asarray(s), jnp.asarray(theta)))
        G = fs @ G + ft
        s = s_new
        Pm = P / lam
        yhat_of = lambda th: GAUSS.mean(CELL.readout(unravel(th), jnp.asarray(s) + jnp.asarray(G) @ (th - theta)))
        th_i = theta.copy()
        for _ in range(iterations):
            yh = np.asarray(yhat_of(jnp.asarray(th_i))).reshape(1)
            H = np.asarray(jax.jacobian(yhat_of)(jnp.asarray(th_i))).reshape(1, d)
            e = y - yh + H @ (th_i - theta)
            S = H @ Pm @ H.T + 0.2
            K = Pm @ H.T / S
            th_i = theta + (K @ e).ravel()
        P = Pm - K @ S @ K.T
        s = s + G @ (th_i - theta)
        theta = th_i
    return theta, P, s


def test_iterated_core_under_rtrl_relinearises_and_equals_an_independent_update():
    X, Y = _series()
    params = CELL.init(jax.random.PRNGKey(1))
    it = recurrent.rtrl(CELL, GAUSS, learner="iterated_ekf", iterations=3, prior_var=0.5, forgetting=0.98)
    plain = recurrent.rtrl(CELL, GAUSS, prior_var=0.5, forgetting=0.98)
    s_it = recurrent.fit_sequence(it, it.init(params), X, Y).state
    s_pl = recurrent.fit_sequence(plain, plain.init(params), X, Y).state
    th_it, th_pl = (np.asarray(ravel_pytree(s.params)[0]) for s in (s_it, s_pl))
    assert np.max(np.abs(th_it - th_pl)) > 1e-3  # the iterations do something
    theta, P, s = independent_iterated_rtrl(params, X, Y, prior_var=0.5, lam=0.98, iterations=3)
    np.testing.assert_allclose(th_it, theta, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(kalnat.covariance(s_it), P, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(np.asarray(s_it.s)[0], s, rtol=1e-9, atol=1e-12)
    # one iteration is the plain core, bit for bit
    one = recurrent.rtrl(CELL, GAUSS, learner="iterated_ekf", iterations=1, prior_var=0.5, forgetting=0.98)
    s_one = recurrent.fit_sequence(one, one.init(params), X, Y).state
    np.testing.assert_array_equal(ravel_pytree(s_one.params)[0], th_pl)


@pytest.mark.parametrize("core,options", [
    ("sqrt_ekf", {}),
    ("information", {}),
    ("natural_gradient", kalnat.schedules.kalman_to_natural(prior_var=0.5, forgetting=0.98)._asdict()),
], ids=lambda v: v if isinstance(v, str) else "")
def test_every_exact_core_under_rtrl_equals_the_ekf_core(core, options):
    X, Y = _series(1)
    params = CELL.init(jax.random.PRNGKey(2))
    ref = recurrent.rtrl(CELL, GAUSS, prior_var=0.5, forgetting=0.98)
    other = recurrent.rtrl(CELL, GAUSS, learner=core, **(options or dict(prior_var=0.5, forgetting=0.98)))
    a = recurrent.fit_sequence(ref, ref.init(params), X, Y)
    b = recurrent.fit_sequence(other, other.init(params), X, Y)
    np.testing.assert_allclose(ravel_pytree(b.state.params)[0], ravel_pytree(a.state.params)[0], rtol=1e-9)
    np.testing.assert_allclose(kalnat.covariance(b.state), kalnat.covariance(a.state), rtol=1e-9, atol=1e-13)
    np.testing.assert_allclose(b.log_likelihood, a.log_likelihood, rtol=1e-9)


def test_nig_core_under_rtrl_learns_the_noise_scale():
    X, Y = _series(2)
    params = CELL.init(jax.random.PRNGKey(3))
    lrn = recurrent.rtrl(CELL, kalnat.families.Gaussian(1.0), learner="nig_filter", prior_var=0.5)
    res = recurrent.fit_sequence(lrn, lrn.init(params), X, Y)
    core = res.state.core.cov
    assert float(core.shape) == 1.0 + T / 2  # a counts every step
    assert np.all(np.isfinite(res.log_likelihood))
    # its predictive is the Student-t scale (b⁻/a⁻)(H V⁻ Hᵀ + 1), above the noise scale alone
    assert np.all(np.asarray(res.predictions.obs_cov)[:, 0, 0] > 0)


# ---- banks of any learner ------------------------------------------------------------

MODEL = kalnat.models.linear(3)
BERN = kalnat.families.Bernoulli()


def _rows(seed=0, n=20):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, 3))
    y = (rng.random(n) < 1 / (1 + np.exp(-X @ np.array([1.5, -1.0, 0.5])))).astype(np.int64)
    return X, y


@pytest.mark.parametrize("make", [kalnat.sqrt_ekf, kalnat.information_filter,
                                  lambda m, f: kalnat.iterated_ekf(m, f, iterations=2)],
                         ids=["sqrt_ekf", "information", "iterated"])
def test_a_bank_of_any_learner_equals_its_members(make):
    X, y = _rows()
    learner = make(MODEL, BERN)
    configs = [dict(prior_var=v, forgetting=f) for v in (0.3, 3.0) for f in (1.0, 0.9)]
    b = kbank.bank(learner, configs)
    res = kalnat.fit(b, b.init(MODEL.init(None)), X, y)
    for k, cfg in enumerate(configs):
        hyper = learner.hyper._replace(**cfg)
        alone = kalnat.fit(learner, learner.init(MODEL.init(None), hyper), X, y, hyper=hyper)
        member = b.member_state(res.state, k)
        np.testing.assert_allclose(ravel_pytree(member.params)[0], ravel_pytree(alone.state.params)[0],
                                   rtol=1e-12, atol=1e-15)
        np.testing.assert_allclose(kalnat.covariance(member), kalnat.covariance(alone.state), rtol=1e-12, atol=1e-15)
        np.testing.assert_allclose(res.state.log_evidence[k], alone.log_likelihood.sum(), rtol=1e-12)


def test_a_consumed_state_says_so():
    learner = kalnat.ekf(MODEL, BERN)
    X, y = _rows(1)
    state = learner.init(MODEL.init(None))
    new, _ = learner.update(state, X[0], y[0])
    for call in (lambda: learner.update(state, X[1], y[1]), lambda: learner.predict(state, X[1]),
                 lambda: kalnat.fit(learner, state, X, y)):
        with pytest.raises(ValueError, match="consumed by an in-place update"):
            call()
    learner.predict(new, X[1])  # the returned state is live
    cell_learner = recurrent.rtrl(CELL, GAUSS)
    s = cell_learner.init(CELL.init(jax.random.PRNGKey(0)))
    Xs, Ys = _series()
    s2 = recurrent.fit_sequence(cell_learner, s, Xs, Ys).state
    with pytest.raises(ValueError, match="consumed by an in-place update"):
        cell_learner.update(s, Xs[0], Ys[0])
    cell_learner.update(s2, Xs[0], Ys[0])


def test_covariance_of_any_learner_state():
    """kalnat.covariance reads θ's covariance from a core state in every representation, a bank's
    state (one per member), RTRL's core and the joint EKF's θ block (equal by the theorem)."""
    X, y = _rows(2)
    ref = kalnat.fit(kalnat.ekf(MODEL, BERN), kalnat.ekf(MODEL, BERN).init(MODEL.init(None)), X, y).state
    for make in (kalnat.sqrt_ekf, kalnat.information_filter):
        other = make(MODEL, BERN)
        st = kalnat.fit(other, other.init(MODEL.init(None)), X, y).state
        np.testing.assert_allclose(kalnat.covariance(st), kalnat.covariance(ref), rtol=1e-9, atol=1e-14)
    b = kbank.bank(kalnat.ekf(MODEL, BERN), [dict(prior_var=1.0), dict(prior_var=2.0)])
    bs = kalnat.fit(b, b.init(MODEL.init(None)), X, y).state
    assert kalnat.covariance(bs).shape == (2, 4, 4)
    np.testing.assert_allclose(kalnat.covariance(bs)[0], kalnat.covariance(ref), rtol=1e-12)
    Xs, Ys = _series(3)
    params = CELL.init(jax.random.PRNGKey(4))
    rt, jt = recurrent.rtrl(CELL, GAUSS, prior_var=0.5), recurrent.joint_ekf(CELL, GAUSS, prior_var=0.5)
    a = recurrent.fit_sequence(rt, rt.init(params), Xs, Ys).state
    j = recurrent.fit_sequence(jt, jt.init(params), Xs, Ys).state
    np.testing.assert_allclose(kalnat.covariance(j), kalnat.covariance(a), rtol=1e-9, atol=1e-13)
    with pytest.raises(ValueError, match="core learner"):
        kalnat.log_evidence(b, b.hyper, MODEL.init(None), X, y)


# ---- hyperparameters given to a call are checked like the learner's own ------------------


def test_hyperparameters_given_to_a_call_are_checked():
    X, y = _rows(3)
    ekf = kalnat.ekf(MODEL, BERN)
    state = ekf.init(MODEL.init(None))
    for bad, what in [(ekf.hyper._replace(forgetting=-3.0), "forgetting"),
                      (ekf.hyper._replace(iterations=3), "iterations"),
                      (ekf.hyper._replace(max_variance=-1.0), "max_variance")]:
        for call in (lambda: ekf.update(state, X[0], y[0], hyper=bad), lambda: ekf.predict(state, X[0], hyper=bad),
                     lambda: kalnat.fit(ekf, state, X, y, hyper=bad)):
            with pytest.raises(ValueError, match=what):
                call()
    ekf.predict(state, X[0])  # nothing was consumed
    ng = kalnat.natural_gradient(MODEL, BERN, learning_rate=0.1)
    with pytest.raises(ValueError, match="process noise"):
        kalnat.fit(ng, ng.init(MODEL.init(None)), X, y, hyper=ng.hyper._replace(process_noise=0.5))
    with pytest.raises(ValueError, match="fixed schedule"):
        kbank.bank(ng, [dict(forgetting=1.0), dict(forgetting=0.5)])
    nig = kalnat.nig_filter(MODEL)
    with pytest.raises(ValueError, match="noise_shape"):
        nig.init(MODEL.init(None), kalnat.Hyper(prior_var=2.0))
    joint = recurrent.joint_ekf(CELL, GAUSS)
    s = joint.init(CELL.init(jax.random.PRNGKey(0)))
    Xs, Ys = _series()
    with pytest.raises(ValueError, match="no variance bound"):
        recurrent.fit_sequence(joint, s, Xs, Ys, hyper=joint.hyper._replace(max_variance=1.0))
    # a consumed state, wherever it goes
    new, _ = ekf.update(state, X[0], y[0])
    for call in (lambda: kalnat.covariance(state), lambda: kalnat.checkpoint.save("unused.npz", state)):
        with pytest.raises(ValueError, match="consumed"):
            call()


def test_any_representation_through_ekf():
    X, y = _rows(4)
    a = kalnat.ekf(MODEL, BERN, forgetting=0.9)
    b = kalnat.ekf(MODEL, BERN, forgetting=0.9, representation=kalnat.representations.Cholesky())
    ra, rb = (kalnat.fit(l, l.init(MODEL.init(None)), X, y) for l in (a, b))
    np.testing.assert_allclose(kalnat.covariance(rb.state), kalnat.covariance(ra.state), rtol=1e-9, atol=1e-14)
    np.testing.assert_allclose(rb.log_likelihood, ra.log_likelihood, rtol=1e-10)
