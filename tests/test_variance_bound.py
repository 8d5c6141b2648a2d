"""Covariance wind-up under forgetting, and the variance bound that stops it.

A direction the data never excite (here a feature that stays 0) has its variance multiplied by
1/λ at every step: it overflows after log(max float)/log(1/λ) rows. ``max_variance`` caps every
variance of P⁻ by a congruence D P⁻ D; below the cap the filter is exact, bit for bit.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import kalnat
from kalnat import bank as kbank, numerics
from kalnat import covariance

P_IN, CAP = 3, 1.0
BERN, GAUSS = kalnat.families.Bernoulli(), kalnat.families.Gaussian(0.5)
MODEL = kalnat.models.linear(P_IN)
# θ's flat index of the weight of feature 2, the one the stream keeps at 0
_mark = jax.tree_util.tree_map(np.zeros_like, MODEL.init(None))
_mark["w"][0, 2] = 1.0
DEAD = int(np.argmax(np.asarray(jax.flatten_util.ravel_pytree(_mark)[0])))


@functools.lru_cache(maxsize=None)
def make(form, max_variance, forgetting=0.9, process_noise=0.0):
    kw = dict(prior_var=CAP, forgetting=forgetting, max_variance=max_variance)
    if process_noise:  # a filter option (no natural-gradient counterpart)
        kw["process_noise"] = process_noise
    return {
        "ekf": lambda: kalnat.ekf(MODEL, BERN, **kw),
        "joseph": lambda: kalnat.ekf(MODEL, BERN, joseph=True, **kw),
        "sqrt": lambda: kalnat.sqrt_ekf(MODEL, BERN, **kw),
        "iterated": lambda: kalnat.iterated_ekf(MODEL, BERN, iterations=2, **kw),
        "nig": lambda: kalnat.nig_filter(MODEL, GAUSS, **kw),
        "information": lambda: kalnat.information_filter(MODEL, BERN, **kw),
        "natural": lambda: kalnat.natural_gradient(
            MODEL, BERN, max_variance=max_variance,
            **kalnat.schedules.kalman_to_natural(CAP, forgetting)._asdict()),
    }[form]()


def stream(n, seed=0, dead_column=True):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, P_IN))
    if dead_column:
        X[:, 2] = 0.0
    z = X[:, 0] - X[:, 1]
    return X, (rng.random(n) < 1 / (1 + np.exp(-z))).astype(np.int64), z + rng.normal(size=n)


def run(form, max_variance, X, yb, yg, dtype=jnp.float64, forgetting=0.9, process_noise=0.0):
    lrn = make(form, max_variance, forgetting, process_noise)
    params = jax.tree_util.tree_map(lambda a: jnp.asarray(a, dtype), MODEL.init(None))
    y = yg if form == "nig" else yb
    return kalnat.fit(lrn, lrn.init(params), X, y, chunk_size=1000, return_predictions=False).state


FORMS = ("ekf", "joseph", "sqrt", "iterated", "nig", "information", "natural")


def test_exact_filter_winds_up():
    """The failure the bound exists for: 10⁴ rows at λ = 0.9 overflow the unexcited variance,
    and fit says so (Diverged) though it keeps no predictions."""
    with pytest.raises(kalnat.Diverged):
        run("ekf", None, *stream(10_000))


@pytest.mark.parametrize("dtype", [jnp.float64, jnp.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("form", FORMS)
def test_bound_stops_windup(form, dtype):
    state = run(form, CAP, *stream(10_000), dtype=dtype)
    P = np.asarray(covariance(state), np.float64)
    assert np.all(np.isfinite(P)) and np.all(np.isfinite(np.asarray(jax.flatten_util.ravel_pytree(state.params)[0])))
    cov = state.cov.inner if form == "nig" else state.cov
    held = np.asarray(getattr(cov, {"sqrt": "chol", "information": "info", "natural": "fisher"}.get(form, "p")))
    if form != "sqrt":
        np.testing.assert_array_equal(held, held.T)
    assert np.linalg.eigvalsh(P).min() > 0
    # P_t ≤ P⁻ (a data update only removes variance) and P⁻'s variances are capped.
    assert np.max(np.diag(P)) <= CAP * (1 + 1e-5)
    # The dead coordinate sits at the cap: with no data it falls back to its prior variance.
    np.testing.assert_allclose(P[DEAD, DEAD], CAP, rtol=1e-5)


@pytest.mark.parametrize("form", FORMS)
def test_bound_is_exact_below_it(form):
    """No forgetting: P only shrinks, the bound never binds (its factors are exactly 1) and
    the bounded filter is the exact one, to rounding (XLA may order the products differently)."""
    data = stream(1_000, seed=1, dead_column=False)  # chunks of 1 000 rows, as the other tests here
    a = run(form, CAP, *data, forgetting=1.0)
    b = run(form, None, *data, forgetting=1.0)
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("form,process_noise", [("sqrt", 0.0), ("information", 0.0), ("natural", 0.0),
                                                ("information", 1e-3)])
def test_forms_agree_under_the_bound(form, process_noise):
    """Every form applies the same congruence to P⁻ (the information and natural-gradient
    forms its inverse to Λ⁻ and J; with additive noise the information form holds
    P⁻ = Λ⁻¹/λ + qI and bounds it there): the same θ_t and P_t while the bound binds."""
    data = stream(2_000, seed=2)
    a = run("ekf", CAP, *data, process_noise=process_noise)
    b = run(form, CAP, *data, process_noise=process_noise)
    assert covariance(a)[DEAD, DEAD] == pytest.approx(CAP, rel=1e-6)  # it binds
    np.testing.assert_allclose(covariance(b), covariance(a), rtol=1e-9, atol=1e-12)
    for leaf in ("w", "b"):
        np.testing.assert_allclose(np.asarray(b.params[leaf]), np.asarray(a.params[leaf]), rtol=1e-9, atol=1e-12)


@settings(max_examples=60, deadline=None, derandomize=True)
@given(d=st.integers(1, 6), seed=st.integers(0, 10_000), log_cap=st.floats(-3, 3))
def test_variance_bound_congruence(d, seed, log_cap):
    rng = np.random.default_rng(seed)
    A = rng.normal(size=(d, d)) * np.exp(rng.uniform(-2, 2, size=d))
    P = A @ A.T + 1e-3 * np.eye(d)
    cap = np.exp(log_cap) * np.exp(rng.uniform(-1, 1, size=d))
    s = np.asarray(numerics.variance_bound(jnp.asarray(np.diag(P)), jnp.asarray(cap)))
    Q = s[:, None] * P * s[None, :]
    assert np.all(np.diag(Q) <= cap * (1 + 1e-12))
    within = np.diag(P) <= cap
    np.testing.assert_array_equal(s[within], 1.0)  # untouched, exactly
    corr = lambda M: M / np.sqrt(np.outer(np.diag(M), np.diag(M)))
    np.testing.assert_allclose(corr(Q), corr(P), rtol=1e-12, atol=1e-12)
    np.linalg.cholesky(Q)


@pytest.mark.slow
def test_bank_keeps_its_forgetting_members():
    """Without the bound a fast-forgetting member overflows on a stream with a dead feature in
    float32 (λ = 0.95: after ~1 700 rows) and leaves the bank for good; with the default bound
    it stays, its variances below 100 × its prior variance."""
    X, y, _ = stream(3_000)
    params = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float32), MODEL.init(None))
    alive = {}
    for bound in (kbank.default_max_variance, None):
        bank = kalnat.ekf_bank(MODEL, BERN, prior_vars=(1.0,), forgettings=(1.0, 0.95), max_variance=bound)
        state = kalnat.fit(bank, bank.init(params), X, y, chunk_size=1000, return_predictions=False).state
        alive[bound] = np.isfinite(np.asarray(state.log_weights))
        member = covariance(bank.member_state(state, 1))
        if bound is not None:
            assert np.max(np.diag(np.asarray(member))) <= bound(1.0) * 1.0001
    assert alive[kbank.default_max_variance].all()
    assert not alive[None][1]


@pytest.mark.parametrize("bad", [0.0, -1.0, np.nan, np.inf, np.ones((2, 2))])
@pytest.mark.parametrize("make_learner", [kalnat.ekf, kalnat.information_filter, kalnat.natural_gradient])
def test_bad_max_variance(bad, make_learner):
    with pytest.raises(ValueError, match="max_variance"):
        make_learner(MODEL, BERN, max_variance=bad)


def test_max_variance_shape_checked_at_init():
    lrn = kalnat.ekf(MODEL, BERN, max_variance=np.ones(P_IN + 3))
    with pytest.raises(ValueError, match="max_variance"):
        lrn.init(MODEL.init(None))
    with pytest.raises(ValueError, match="max_variance"):
        kalnat.ekf_bank(MODEL, BERN, max_variance=-1.0)
