"""The bank of filters: equal to its members, a log K regret bound, exact Bayesian weights."""

import re

import numpy as np
import jax
import jax.extend
import jax.flatten_util
import jax.numpy as jnp
import pytest
from hypothesis import given, settings, strategies as st

import kalnat
from kalnat import bank as kbank

P_FEAT, N_ROWS = 3, 24
MODEL = kalnat.models.linear(P_FEAT)
PRIORS, FORGETS = (0.1, 1.0, 10.0), (1.0, 0.95)
BERN = kalnat.families.Bernoulli()
BANK = kalnat.ekf_bank(MODEL, BERN, prior_vars=PRIORS, forgettings=FORGETS, share=0.0)
BANK_MOD = kalnat.ekf_bank(MODEL, BERN, prior_vars=PRIORS, forgettings=FORGETS, share=0.0, moderated=True)
GAUSS = kalnat.families.Gaussian(0.5)
G_PRIORS = (0.01, 0.3, 1.0, 30.0)
BANK_G = kalnat.ekf_bank(MODEL, GAUSS, prior_vars=G_PRIORS, forgettings=(1.0,), share=0.0)
# A bank's members bound their variances by a multiple of their prior variance (ekf_bank's default).
MEMBERS = {(v, f): kalnat.ekf(MODEL, BERN, prior_var=v, forgetting=f,
                              max_variance=kbank.default_max_variance(v))
           for v in PRIORS for f in FORGETS}


def _stream(seed, n=N_ROWS, scale=2.0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, P_FEAT)) * scale
    w = rng.normal(size=P_FEAT) * 2
    y = (rng.random(n) < 1 / (1 + np.exp(-X @ w))).astype(np.int64)
    return X, y


def _run(learner, X, y):
    return kalnat.fit(learner, learner.init(MODEL.init(None)), X, y, chunk_size=N_ROWS)


def _rel(a, b):
    a, b = np.asarray(a), np.asarray(b)
    return np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-300)


def test_bank_equals_members_run_one_by_one():
    X, y = _stream(0)
    res = _run(BANK, X, y)
    lls = []
    for k, cfg in enumerate(BANK.configs):
        single = _run(MEMBERS[(cfg["prior_var"], cfg["forgetting"])], X, y)
        mem = BANK.member_state(res.state, k)
        assert _rel(mem.params["w"], single.state.params["w"]) < 1e-12
        assert _rel(kalnat.covariance(mem), kalnat.covariance(single.state)) < 1e-12
        p = single.predictions.probs[np.arange(N_ROWS), y]
        lls.append(np.log(p))
    lls = np.array(lls)  # (K, n)
    assert _rel(res.state.log_evidence, lls.sum(1)) < 1e-12
    # The weights of each row are the posterior given the rows before it.
    cum = np.concatenate([np.zeros((len(lls), 1)), np.cumsum(lls, 1)[:, :-1]], 1)
    w = np.exp(cum - cum.max(0))
    w /= w.sum(0)
    assert _rel(res.predictions.weights, w.T) < 1e-12
    mix = np.einsum("tk,ktc->tc", w.T, np.stack([_run(MEMBERS[(c["prior_var"], c["forgetting"])], X, y)
                                                    .predictions.probs for c in BANK.configs]))
    assert _rel(res.predictions.probs, mix) < 1e-12


@settings(max_examples=15, deadline=None, derandomize=True)
@given(seed=st.integers(0, 10_000), scale=st.sampled_from([0.3, 3.0, 30.0]), moderated=st.booleans())
def test_bank_log_marginal_is_the_uniform_mixture_of_member_evidences(seed, scale, moderated):
    X, y = _stream(seed, scale=scale)
    bank = BANK_MOD if moderated else BANK
    s = _run(bank, X, y).state
    K = bank.size
    loss_bank = -float(s.log_marginal)
    best = -float(np.max(s.log_evidence))
    assert loss_bank <= best + np.log(K) + 1e-9
    # and it is exactly the uniform-prior Bayes mixture of the members' evidences
    assert abs(loss_bank + (jax.scipy.special.logsumexp(s.log_evidence) - np.log(K))) < 1e-9


def _gauss_stream(seed, n=N_ROWS):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, P_FEAT))
    y = X @ rng.normal(size=P_FEAT) * 0.7 + 0.3 + rng.normal(size=n) * np.sqrt(0.5)
    return X, y


def test_linear_gaussian_weights_are_exact_posterior_over_configurations():
    X, y = _gauss_stream(1)
    res = _run(BANK_G, X, y)
    A = np.hstack([X, np.ones((N_ROWS, 1))])
    logml = []
    for v in G_PRIORS:
        C = v * A @ A.T + 0.5 * np.eye(N_ROWS)
        _, logdet = np.linalg.slogdet(C)
        logml.append(-0.5 * (y @ np.linalg.solve(C, y) + logdet + N_ROWS * np.log(2 * np.pi)))
    logml = np.array(logml)
    post = np.exp(logml - logml.max())
    post /= post.sum()
    np.testing.assert_allclose(kbank.weights(res.state), post, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(res.state.log_evidence, logml, rtol=1e-9)


def test_fixed_share_moves_to_forgetting_after_a_drift():
    rng = np.random.default_rng(3)
    n = 400
    X = rng.normal(size=(n, P_FEAT)) * 2
    w = np.where(np.arange(n)[:, None] < n // 2, 3.0, -3.0) * np.ones(P_FEAT)
    y = (rng.random(n) < 1 / (1 + np.exp(-(X * w).sum(1)))).astype(np.int64)
    alpha = 0.01
    b = kalnat.ekf_bank(MODEL, BERN, prior_vars=(1.0,), forgettings=(1.0, 0.97), share=alpha)
    res = kalnat.fit(b, b.init(MODEL.init(None)), X, y, chunk_size=200)
    wts = res.predictions.weights
    assert wts[n // 2 + 20, 1] > 0.9  # the forgetting member takes over soon after the change
    assert np.all(np.abs(wts.sum(1) - 1) < 1e-12)
    # fixed-share regret: at most log K − n log(1 − α) above the best member
    s = res.state
    assert -float(s.log_marginal) <= -float(np.max(s.log_evidence)) + np.log(2) - n * np.log1p(-alpha)


def test_bank_public_update_and_predict_and_errors():
    X, y = _stream(5)
    s = BANK.init(MODEL.init(None))
    s = BANK.update(s, X[0], y[0])[0]
    pred = BANK.predict(s, X[1])
    assert pred.probs.shape == (2,) and abs(float(pred.probs.sum()) - 1) < 1e-12
    with pytest.raises(ValueError, match="BankState"):
        BANK.update(MEMBERS[(1.0, 1.0)].init(MODEL.init(None)), X[0], y[0])
    with pytest.raises(ValueError, match="share"):
        kalnat.ekf_bank(MODEL, BERN, share=1.0)
    with pytest.raises(ValueError, match="forgetting"):
        kalnat.ekf_bank(MODEL, BERN, forgettings=(1.5,))


def test_the_banks_wrong_settings_are_named():
    """What kalnat.bank.bank and ekf_bank refuse, each message checked."""
    base = MEMBERS[(1.0, 1.0)]
    refused = [
        (lambda: kalnat.bank.bank(BANK, [{}]), "bank: learner must be a kalnat core learner, got Bank"),
        (lambda: kalnat.bank.bank(base, []), "bank: at least one configuration is needed"),
        (lambda: kalnat.bank.bank(base, [{"prior_var": 1.0}, {"forgetting": 0.9}]),
         "bank: every configuration must have the same hyperparameter names"),
        (lambda: kalnat.bank.bank(base, [{"prior_variance": 1.0}]),
         "bank: unknown hyperparameters ['prior_variance']"),
        (lambda: kalnat.bank.bank(base, [{"forgetting": 0.0}]), "forgetting must lie in (0, 1], got 0.0"),
        (lambda: kalnat.bank.bank(base, [{"iterations": 2}]),
         "iterations must be positive integers up to the learner's 1, got 2"),
        (lambda: kalnat.ekf_bank(MODEL, BERN, prior_vars=(1.0, -1.0)), "prior_var must be positive, got -1.0"),
        (lambda: kalnat.ekf_bank(MODEL, BERN, learner="ukf"),
         "unknown learner 'ukf'; expected 'ekf', 'iterated' or 'nig'"),
        (lambda: kalnat.ekf_bank(MODEL, BERN, forgettings=(1.0,), forgetting_mass=0.5),
         "forgetting_mass must lie in (0, 1) with λ = 1 and λ < 1 members in the grid, got 0.5"),
    ]
    for make, said in refused:
        with pytest.raises(ValueError, match=re.escape(said)):
            make()


def test_a_diverged_member_leaves_the_bank():
    X, y = _stream(7)
    b = kalnat.ekf_bank(MODEL, BERN, prior_vars=(1.0,), forgettings=(1.0, 0.95), share=0.05)
    s = b.init(MODEL.init(None))
    # member 1's covariance has blown up (as a forgetting filter's can, unexcited)
    cov = s.members.cov
    s = s._replace(members=s.members._replace(cov=cov._replace(p=cov.p.at[1].set(jnp.nan))))
    res = kalnat.fit(b, s, X, y, chunk_size=N_ROWS)
    single = _run(MEMBERS[(1.0, 1.0)], X, y)
    assert np.all(res.predictions.weights[:, 1] == 0) and np.all(res.predictions.weights[:, 0] == 1)
    assert _rel(res.predictions.probs, single.predictions.probs) < 1e-12
    assert _rel(res.state.log_marginal, res.state.log_evidence[0]) < 1e-12
    assert np.isneginf(float(res.state.log_evidence[1]))
    assert np.all(np.isfinite(np.asarray(b.predict(res.state, X[:3]).probs)))


def _indefinite_along(learner, state, k, x, by=2.0):
    """``state`` with member ``k``'s covariance ``I − by u uᵀ``, ``u`` the unit Jacobian of
    row ``x``: a covariance that lost positive definiteness, negative along that row only."""
    params = learner.member_state(state, k).params
    flat, unravel = jax.flatten_util.ravel_pytree(params)
    h = jax.jacfwd(lambda t: MODEL.apply(unravel(t), jnp.asarray(x)).reshape(-1))(flat)[0]
    u = h / jnp.linalg.norm(h)
    cov = state.members.cov
    return state._replace(members=state.members._replace(
        cov=cov._replace(p=cov.p.at[k].set(jnp.eye(flat.shape[0]) - by * jnp.outer(u, u)))))


def _mixture(pred, rows, keep, w):
    """The mean and variance of members ``keep`` at ``w`` (renormalised), from the members'
    own predictions ``pred`` of ``rows``."""
    w = np.asarray(w)[keep] / np.asarray(w)[keep].sum()
    means, var = np.asarray(pred.mean)[keep, rows, 0], np.asarray(pred.obs_cov)[keep, rows, 0, 0]
    mean = w @ means
    return mean, w @ var + w @ (means - mean) ** 2


def test_a_member_predicting_a_negative_variance_is_left_out_of_that_rows_prediction():
    """A member whose covariance lost positive definiteness (as the EKF's can in float32 on
    unscaled inputs) predicts a finite, negative variance: the bank predicts that row from the
    others (their weights renormalised), not as a mixture whose variance may be negative, and
    its other rows as before, so a row predicted with others is predicted as alone; with no
    member left the row is mixed as it is (its negative variance tells). Learning predicts the
    row as predict does; the weights are not changed by it."""
    rng = np.random.default_rng(3)
    X = rng.normal(size=(N_ROWS, P_FEAT))
    y = X @ np.array([1.0, -0.5, 0.3]) + 0.5 * rng.normal(size=N_ROWS)
    s = kalnat.fit(BANK_G, BANK_G.init(MODEL.init(None)), X, y, chunk_size=N_ROWS).state
    w = np.exp(np.asarray(s.log_weights))
    k = int(np.argmax(w))                              # the heaviest member (weight 0.63)
    broken = _indefinite_along(BANK_G, s, k, X[1])
    own = BANK_G.members_predict_batch(BANK_G.hyper, broken, X[:2])
    assert float(own.obs_cov[k, 1, 0, 0]) < 0 < float(own.obs_cov[k, 0, 0, 0])
    pred = BANK_G.predict(broken, X[:2])
    assert float(pred.weights[1, k]) == 0 and _rel(pred.weights[0], w) < 1e-12
    for row, keep in ((0, [0, 1, 2, 3]), (1, [j for j in range(4) if j != k])):
        mean, var = _mixture(own, row, keep, w)
        assert _rel(pred.mean[row, 0], mean) < 1e-12 and _rel(pred.obs_cov[row, 0, 0], var) < 1e-12
    alone = BANK_G.predict(broken, X[1])
    assert _rel(alone.mean, pred.mean[1]) < 1e-12 and float(alone.obs_cov[0, 0]) > 0
    every = broken
    for j in range(4):
        every = every if j == k else _indefinite_along(BANK_G, every, j, X[1])
    pred = BANK_G.predict(every, X[1])
    mean, var = _mixture(BANK_G.members_predict_batch(BANK_G.hyper, every, X[1:2]), 0, [0, 1, 2, 3], w)
    assert _rel(pred.mean[0], mean) < 1e-12 and _rel(pred.obs_cov[0, 0], var) < 1e-12 and var < 0
    # learning's prediction of the row is predict's (update consumes the state: last); a
    # Gaussian member with a negative variance has a NaN log-likelihood and is dropped there,
    # a classifier's is finite and stays in the bank, left out of the row's prediction only
    learned = BANK_G.update(broken, X[1], y[1])[1]
    assert _rel(learned.mean, alone.mean) < 1e-12 and _rel(learned.obs_cov, alone.obs_cov) < 1e-12
    Xb, yb = _stream(4)
    s = _run(BANK, Xb, yb).state
    heaviest = int(np.argmax(np.asarray(s.log_weights)))
    broken = _indefinite_along(BANK, s, heaviest, Xb[1], by=50.0)
    alone = BANK.predict(broken, Xb[1])
    assert float(alone.weights[heaviest]) == 0 and float(alone.obs_cov[0, 0]) > 0
    new, learned = BANK.update(broken, Xb[1], yb[1])
    assert _rel(learned.probs, alone.probs) < 1e-12 and _rel(learned.obs_cov, alone.obs_cov) < 1e-12
    assert np.isfinite(float(new.log_evidence[heaviest])) and np.isfinite(float(new.log_weights[heaviest]))  # still in


def test_row_by_row_update_equals_the_chunked_fit():
    """The bank's two paths, Bank.step (update, one row) and Bank.scan_chunk (fit, member by
    member through a chunk): the same members, weights, evidence and predictions."""
    X, y = _stream(9)
    b = kalnat.ekf_bank(MODEL, BERN, prior_vars=PRIORS, forgettings=FORGETS, iterations=(1, 2), share=0.01)
    res = kalnat.fit(b, b.init(MODEL.init(None)), X, y)
    s = b.init(MODEL.init(None))
    probs = []
    for x_t, y_t in zip(X, y):
        s, pred = b.update(s, x_t, y_t)
        probs.append(np.asarray(pred.probs))
    np.testing.assert_allclose(np.array(probs), res.predictions.probs, rtol=1e-12, atol=1e-15)
    for a_leaf, b_leaf in zip(jax.tree_util.tree_leaves(s), jax.tree_util.tree_leaves(res.state)):
        np.testing.assert_allclose(a_leaf, b_leaf, rtol=1e-12, atol=1e-15)


def test_members_of_each_count_of_linearisations_run_apart():
    """A bank of EKFs with one and with two linearisations (kalnat.auto's grid): each member
    equals its own filter alone, and a chunk's program runs each member's linearisations only
    (as many logistic functions as a bank of the one-linearisation members and one of the
    two-linearisation members together, not two linearisations for every member: a vectorised
    step built for two would run the second for all, as a select). Given hyperparameters of
    other counts are an error, not a silent regrouping."""
    X, y = _stream(3)
    mixed = kalnat.ekf_bank(MODEL, BERN, prior_vars=PRIORS, forgettings=FORGETS, iterations=(1, 2))
    res = _run(mixed, X, y)
    for k, cfg in enumerate(mixed.configs):
        alone = kalnat.iterated_ekf(MODEL, BERN, iterations=cfg["iterations"], prior_var=cfg["prior_var"],
                                    forgetting=cfg["forgetting"], max_variance=cfg["max_variance"])
        single = _run(alone, X, y)
        mem = mixed.member_state(res.state, k)
        assert _rel(mem.params["w"], single.state.params["w"]) < 1e-12
        assert _rel(kalnat.covariance(mem), kalnat.covariance(single.state)) < 1e-12

    def logistics(jaxpr):
        return sum((eqn.primitive.name == "logistic")
                   + sum(logistics(sub) for sub in jax.extend.core.jaxprs_in_params(eqn.params))
                   for eqn in jaxpr.eqns)

    def count(bank):
        state = bank.init(MODEL.init(None))
        xs, ys, ms = X[:4, None], y[:4, None], np.ones((4, 1), bool)
        return logistics(jax.make_jaxpr(lambda h, s: bank.scan_chunk(h, s, xs, ys, ms))(bank.hyper, state).jaxpr)

    one, two = (kalnat.ekf_bank(MODEL, BERN, prior_vars=PRIORS, forgettings=FORGETS, iterations=i) for i in (1, 2))
    assert count(one) < count(two)
    assert count(mixed) == count(one) + count(two)
    other = mixed.hyper._replace(iterations=np.full(mixed.size, 2))
    with pytest.raises(ValueError, match="the members' iterations are the bank's own"):
        kalnat.fit(mixed, mixed.init(MODEL.init(None)), X, y, hyper=other)
