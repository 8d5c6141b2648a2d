"""Numerical stability of the exact filter in its forms (issue: reliability).

Stress streams: features scaled by 1e6, perfectly separable logistic data, Poisson counts in
the thousands, 10⁴ steps of fading memory with λ = 0.9. Each runs through the covariance
form, its Joseph option, the square-root form and the information form, in float64 and in
float32: no NaN, and the covariance stays symmetric positive definite (a Cholesky
factorisation of the float64 copy succeeds and its smallest eigenvalue is positive).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import example, given, settings, strategies as st
from jax.flatten_util import ravel_pytree

import kalnat
from kalnat import covariance
from kalnat import families as F
from kalnat import numerics

P_IN = 4
FORMS = ("ekf", "joseph", "sqrt", "information")


def flat(params):
    return np.asarray(ravel_pytree(params)[0], np.float64)


def stored_matrix(state):
    for name in ("chol", "info", "p"):
        if hasattr(state.cov, name):
            return np.asarray(getattr(state.cov, name), np.float64)


def assert_healthy(state):
    """θ finite; the stored matrix finite and (for P or P⁻¹) symmetric positive definite."""
    assert np.all(np.isfinite(flat(state.params))), "θ is not finite"
    a = stored_matrix(state)
    assert np.all(np.isfinite(a)), "the covariance is not finite"
    if hasattr(state.cov, "chol"):
        # P = L Lᵀ is positive definite iff the triangular factor has a positive diagonal.
        assert np.all(np.diag(a) > 0), f"non-positive diagonal of L: {np.diag(a).min()}"
        assert np.all(np.triu(a, 1) == 0), "L is not lower-triangular"
        return
    np.testing.assert_array_equal(a, a.T)  # symmetric by construction, not to rounding
    np.linalg.cholesky(a)  # raises LinAlgError when not positive definite
    assert np.linalg.eigvalsh(a).min() > 0


@functools.lru_cache(maxsize=None)
def learner(form, family, forgetting=1.0, bias=True):
    """Built once per configuration, so each jitted chunk function compiles once."""
    model = kalnat.models.linear(P_IN, bias=bias)
    kw = dict(prior_var=1.0, forgetting=forgetting)
    if form == "ekf":
        return model, kalnat.ekf(model, family, **kw)
    if form == "joseph":
        return model, kalnat.ekf(model, family, joseph=True, **kw)
    if form == "sqrt":
        return model, kalnat.sqrt_ekf(model, family, **kw)
    return model, kalnat.information_filter(model, family, **kw)


def run(form, family, X, y, dtype, forgetting=1.0, chunk_size=512):
    model, lrn = learner(form, family, forgetting)
    params = jax.tree_util.tree_map(lambda a: jnp.asarray(a, dtype), model.init(None))
    return kalnat.fit(lrn, lrn.init(params), X, y, chunk_size=chunk_size,
                      return_predictions=False).state


DTYPES = [jnp.float64, jnp.float32]


# In float32 only the square-root form: after one row P has variances ~1 across x and ~1e-14
# along it, a condition number (1e14) that a float32 P or P⁻¹ cannot hold (it is ~1e7 times
# its rounding), while the factor L only needs ~1e7 (its square root).
@pytest.mark.parametrize("form,dtype", [(f, jnp.float64) for f in FORMS] + [("sqrt", jnp.float32)],
                         ids=[f"{f}-f64" for f in FORMS] + ["sqrt-f32"])
def test_features_scaled_by_1e6(form, dtype):
    """Ill-scaled inputs: x ~ 1e6, so H Hᵀ ~ 1e12 against a unit prior."""
    rng = np.random.default_rng(0)
    X = rng.normal(size=(1000, P_IN)) * 1e6
    theta = rng.normal(size=P_IN) * 1e-6
    y = X @ theta + 0.3 + 0.1 * rng.normal(size=1000)
    state = run(form, F.Gaussian(0.01), X, y, dtype)
    assert_healthy(state)
    w = flat(state.params)[1:]  # params flatten as b, w
    assert np.allclose(w * 1e6, theta * 1e6, atol=1e-2)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f64", "f32"])
@pytest.mark.parametrize("form", FORMS)
def test_perfectly_separable_logistic(form, dtype):
    """θ grows without bound and p → 0 or 1: R = p(1 − p) underflows unless floored (at the
    smallest normal number; ``r_floor=0``, since the default floor of a few units of rounding
    would also keep float32 finite without it)."""
    rng = np.random.default_rng(1)
    X = rng.normal(size=(2000, P_IN))
    y = (X @ np.array([3.0, -2.0, 1.0, 0.5]) > 0).astype(float)
    model, lrn = learner(form, F.Bernoulli(r_floor=0))
    params = jax.tree_util.tree_map(lambda a: jnp.asarray(a, dtype), model.init(None))
    res = kalnat.fit(lrn, lrn.init(params), X, y, chunk_size=512)
    assert_healthy(res.state)
    assert np.all(np.isfinite(res.predictions.mean))
    assert np.mean((res.predictions.mean[1000:, 0] > 0.5) == y[1000:]) > 0.97


@pytest.mark.parametrize("dtype", DTYPES, ids=["f64", "f32"])
@pytest.mark.parametrize("form", FORMS)
def test_perfectly_separable_three_classes(form, dtype):
    """A saturated softmax (one p_j rounds to 1) must leave R = diag(p) − p pᵀ positive
    definite; computed as p_j(1 − p_j) it was singular and every form turned to NaN (with
    ``r_floor=0``: the default floor would hide it). The filters' later guards now carry this
    stream through even with R computed that way and no floor at all (checked when the default
    floor came in), so this test checks the forms' health and accuracy on it;
    ``test_saturated_softmax_noise_is_positive_definite`` checks R itself."""
    rng = np.random.default_rng(4)
    X = rng.normal(size=(600, P_IN)) * 30  # logits of hundreds: p_j rounds to 1
    y = np.argmax(X[:, :3], axis=1).astype(float)
    model = kalnat.models.linear(P_IN, 2)
    lrn = {"ekf": kalnat.ekf, "joseph": lambda *a: kalnat.ekf(*a, joseph=True),
           "sqrt": kalnat.sqrt_ekf, "information": kalnat.information_filter}[form](model, F.Categorical(3, r_floor=0))
    params = jax.tree_util.tree_map(lambda a: jnp.asarray(a, dtype), model.init(None))
    res = kalnat.fit(lrn, lrn.init(params), X, y, chunk_size=600)
    assert_healthy(res.state)
    assert np.all(np.isfinite(res.predictions.probs))
    assert np.mean(np.argmax(res.predictions.probs[300:], axis=1) == y[300:]) > 0.95


@pytest.mark.parametrize("dtype", DTYPES, ids=["f64", "f32"])
@pytest.mark.parametrize("form", FORMS)
def test_poisson_counts_in_the_thousands(form, dtype):
    """From λ = 1 the first count of ~2000 throws z far up (capped); the filter walks back."""
    rng = np.random.default_rng(2)
    X = rng.normal(size=(2000, P_IN)) * 0.3
    w = np.array([0.5, -0.3, 0.2, 0.1])
    y = rng.poisson(np.exp(X @ w + 7.5)).astype(float)
    assert y.min() > 500 and y.mean() > 1500
    model, lrn = learner(form, F.Poisson())
    params = jax.tree_util.tree_map(lambda a: jnp.asarray(a, dtype), model.init(None))
    res = kalnat.fit(lrn, lrn.init(params), X, y, chunk_size=512)
    assert_healthy(res.state)
    assert np.all(np.isfinite(res.predictions.mean))
    rate = np.exp(X @ w + 7.5)
    assert np.median(np.abs(np.log(res.predictions.mean[1000:, 0] / rate[1000:]))) < 0.1
    assert abs(flat(res.state.params)[0] - 7.5) < 0.1


@pytest.mark.parametrize("dtype", DTYPES, ids=["f64", "f32"])
@pytest.mark.parametrize("form", FORMS)
def test_fading_memory_ten_thousand_steps(form, dtype):
    """λ = 0.9 over 10⁴ rows of a drifting linear-Gaussian stream: P settles where forgetting
    balances the data (an effective window of ~10 rows), neither collapsing nor blowing up,
    and the filter tracks the drift."""
    rng = np.random.default_rng(3)
    n = 10_000
    X = rng.normal(size=(n, P_IN))
    drift = np.cumsum(rng.normal(size=(n, P_IN)) * 0.01, axis=0)
    y = np.sum(X * drift, axis=1) + 0.1 * rng.normal(size=n)
    model, lrn = learner(form, F.Gaussian(0.01), 0.9, False)
    params = jax.tree_util.tree_map(lambda a: jnp.asarray(a, dtype), model.init(None))
    res = kalnat.fit(lrn, lrn.init(params), X, y, chunk_size=1024)
    assert_healthy(res.state)
    assert int(res.state.count) == n
    eig = np.linalg.eigvalsh(covariance(res.state))
    # Steady state: P ≈ (1 − λ) R (Σ x xᵀ)⁻¹-ish, about 1e-3 here; far from 0 and from ∞.
    assert 1e-5 < eig.min() and eig.max() < 1e-1
    assert np.all(np.isfinite(res.predictions.mean))
    assert np.mean(np.abs(res.predictions.mean[1000:, 0] - y[1000:])) < 0.2


def test_poisson_innovation_is_exact_for_plausible_counts():
    """The cap on a Poisson innovation never touches counts within 6σ of λ (nor any count ≤ 3
    above it): there the filter is the plain EKF of docs/method.md §2a."""
    fam = F.Poisson()
    lams, ys = [], []
    for lam in (1e-3, 0.3, 1.0, 4.0, 50.0, 2000.0):
        top = int(lam + 6 * np.sqrt(lam) + 3)
        ys.append(np.arange(0, top + 1, dtype=float))
        lams.append(np.full(top + 1, lam))
    lams, ys = np.concatenate(lams), np.concatenate(ys)
    e = np.asarray(jax.vmap(fam.innovation)(jnp.asarray(lams)[:, None], jnp.asarray(ys)))[:, 0]
    np.testing.assert_array_equal(e, ys - lams)
    e = float(fam.innovation(jnp.array([1.0]), 2000.0)[0])
    assert e == 3.0 + 6.0  # a count of 2000 at λ = 1 is learned as 10


class _UnboundedPoisson(F.Poisson):
    log_step_slack = None


@pytest.mark.parametrize("form", ["ekf", "sqrt", "information", "natgrad", "diag", "lowrank"])
def test_a_poisson_step_never_raises_its_log_rate_an_e_fold_past_the_count(form):
    """A count of 4 at a rate of e⁻¹⁰ with prior variance 10 (q = x P xᵀ = 170): the EKF's step
    would raise the row's log-rate by about 510 (the bank's members reached rates of 10⁴² so);
    it is shortened to log 4 + 1, the covariance as before. A count of 2 at a rate of 1, above
    the rate but not passed by the step (0.99 against log 2 + 1), is the plain EKF's, bit for
    bit."""
    model = kalnat.models.linear(P_IN)
    rep = {"diag": kalnat.representations.Diagonal(), "lowrank": kalnat.representations.LowRank(2)}.get(form)
    make = {"sqrt": kalnat.sqrt_ekf, "information": kalnat.information_filter,
            "natgrad": lambda m, f, **kw: kalnat.natural_gradient(m, f, **kalnat.schedules.kalman_to_natural(
                prior_var=kw["prior_var"])._asdict())}.get(form, kalnat.ekf)
    extra = {} if rep is None else dict(representation=rep)
    x = np.array([2.0, -2.0, 2.0, -2.0])
    params = dict(model.init(None), b=jnp.array([-10.0]))
    for y, bound in ((4.0, True), (2.0, False)):
        start = params if bound else model.init(None)
        out = {}
        for fam in (F.Poisson(), _UnboundedPoisson()):
            lrn = make(model, fam, prior_var=10.0, **extra) if form != "natgrad" else make(model, fam, prior_var=10.0)
            state, _ = lrn.update(lrn.init(start), x, y)
            out[fam.log_step_slack] = (float(flat(state.params) @ np.append(1.0, x)), covariance(state))
        (z, P), (z_free, P_free) = out[1.0], out[None]
        np.testing.assert_allclose(P, P_free, rtol=1e-12, atol=1e-300)
        if bound:
            assert z_free > 100 and abs(z - (np.log(4.0) + 1.0)) < 1e-9, (z, z_free)
        else:
            assert z == z_free


@pytest.mark.parametrize("forgetting,noise,batch", [(1.0, 0.0, 1), (0.97, 1e-3, 3)])
def test_sqrt_ekf_equals_ekf_in_float64(forgetting, noise, batch):
    """Same θ_t and P_t = L Lᵀ as the covariance form, to rounding (docs/method.md §2a)."""
    rng = np.random.default_rng(5)
    model = kalnat.models.linear(3, 2)
    fam = F.Categorical(3)
    kw = dict(prior_var=0.5, forgetting=forgetting, process_noise=noise)
    params = jax.tree_util.tree_map(lambda a: a + 0.1, model.init(None))
    X = rng.normal(size=(60, 3))
    y = rng.integers(0, 3, 60)
    a = kalnat.fit(kalnat.ekf(model, fam, **kw), kalnat.ekf(model, fam, **kw).init(params), X, y,
                   batch_size=batch)
    sq = kalnat.sqrt_ekf(model, fam, **kw)
    b = kalnat.fit(sq, sq.init(params), X, y, batch_size=batch)
    th = flat(a.state.params)
    assert np.linalg.norm(flat(b.state.params) - th) <= 1e-9 * np.linalg.norm(th)
    p = covariance(a.state)
    assert np.linalg.norm(covariance(b.state) - p) <= 1e-9 * np.linalg.norm(p)
    np.testing.assert_allclose(b.predictions.mean, a.predictions.mean, rtol=1e-9, atol=1e-12)
    assert_healthy(b.state)


def _long_stream_states(n, d, seed, chunk_size):
    """The square-root form's states, float32 and float64, after the same ill-scaled
    linear-Gaussian stream (feature scales 10^±1)."""
    rng = np.random.default_rng(seed)
    scales = 10.0 ** np.linspace(-1, 1, d)
    X = (rng.normal(size=(n, d)) * scales).astype(np.float32)
    y = (X.astype(np.float64) @ (rng.normal(size=d) / scales) + 0.5 * rng.normal(size=n)).astype(np.float32)
    model = kalnat.models.linear(d, bias=False)
    learner = kalnat.sqrt_ekf(model, F.Gaussian(0.25), prior_var=1.0)
    out = []
    for dtype in (jnp.float32, jnp.float64):
        params = jax.tree_util.tree_map(lambda a: jnp.asarray(a, dtype), model.init(None))
        out.append(kalnat.fit(learner, learner.init(params), X, y, chunk_size=chunk_size,
                              return_predictions=False).state)
    return tuple(out)


@pytest.mark.slow
def test_float32_long_stream_sqrt_stays_close_to_float64():
    """2·10⁴ rows of an ill-scaled linear-Gaussian stream (feature scales 10^±1, P's condition
    number ~10⁴) in float32: L keeps a positive diagonal and θ, P stay near the float64 run
    (benchmarks/long_stream_float32.py runs 10⁶ rows)."""
    s32, s64 = _long_stream_states(20_000, 6, seed=6, chunk_size=4096)
    assert s32.cov.chol.dtype == jnp.float32
    assert_healthy(s32)
    th32, th64 = flat(s32.params), flat(s64.params)
    assert np.linalg.norm(th32 - th64) < 1e-4 * np.linalg.norm(th64)
    p32, p64 = covariance(s32), covariance(s64)
    assert np.linalg.norm(p32 - p64) < 1e-4 * np.linalg.norm(p64)
    assert np.linalg.eigvalsh(p32).min() > 0.5 * np.linalg.eigvalsh(p64).min()


@settings(max_examples=25, deadline=None, derandomize=True)
@given(d=st.integers(1, 12), m=st.integers(1, 56), seed=st.integers(0, 10_000))
@example(d=7, m=49, seed=0)
@example(d=5, m=50, seed=0)
def test_downdate_is_symmetric_and_exact(d, m, seed):
    """``P − W Wᵀ`` as fused outer products (m ≤ numerics.FUSED_DOWNDATE, 48) or a product:
    bitwise symmetric for any m, compiled and scaled as the filters use it (the product alone
    was not: an asymmetry that forgetting then grew until the filter failed), and equal to the
    NumPy product to rounding."""
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(d, d))
    P = a @ a.T
    P = 0.5 * (P + P.T)
    F = rng.normal(size=(m, d)) * 0.1
    # W = Fᵀ, a transpose, as the filters pass it (whitened rows): then a product W Wᵀ is not
    # symmetric to the bit at (d, m) = (7, 49), seed 0, and (5, 50), seed 0
    out, scaled = jax.jit(lambda p, f: (numerics.downdate(p, f.T), numerics.downdate(p, f.T) * 2.3))(
        jnp.asarray(P), jnp.asarray(F))
    out, scaled = np.asarray(out), np.asarray(scaled)
    np.testing.assert_allclose(out, P - F.T @ F, rtol=1e-12, atol=1e-12 * np.abs(P).max())
    np.testing.assert_array_equal(out, out.T)
    np.testing.assert_array_equal(scaled, scaled.T)


def test_downdate_is_one_pass_of_outer_products_up_to_its_bound():
    """Up to numerics.FUSED_DOWNDATE outputs the downdate is the sum of outer products, one
    pass over P (a minibatch of 2–4 of digits' rows: 1.2–1.8 × faster than the product,
    benchmarks/minibatch_cost.py); beyond, the product W Wᵀ."""
    d = 6

    def dots(m):
        hlo = jax.jit(numerics.downdate).lower(jnp.zeros((d, d)), jnp.zeros((d, m))).as_text()
        return hlo.count("dot_general")

    assert dots(36) == 0  # four of digits' rows, nine outputs each
    assert dots(numerics.FUSED_DOWNDATE) == 0
    assert dots(numerics.FUSED_DOWNDATE + 1) == 1


@pytest.mark.slow
def test_float32_square_root_factor_tracks_float64_over_a_long_stream():
    """The compensated summation of the square-root form (README Reliability: P within 5e-8 of
    float64 over 10⁶ float32 rows): over 2·10⁵ rows P stays within 2e-6 of the float64 run.
    Without the compensation the error is ~100 × larger (rounding drops a biased share of each
    late, tiny update and P drifts up)."""
    s32, s64 = _long_stream_states(200_000, 8, seed=0, chunk_size=8192)
    P32, P64 = covariance(s32), covariance(s64)
    rel = np.linalg.norm(P32 - P64) / np.linalg.norm(P64)
    assert rel < 2e-6, rel


def test_fit_reports_a_diverged_filter_instead_of_returning_nans():
    """Forgetting without a variance bound on an input that is always 0, in float32: the
    dead weight's variance grows as λ^{-t} until it overflows. fit raises at the first NaN
    log-likelihood, naming the row and the remedy, rather than returning NaN scores."""
    rng = np.random.default_rng(0)
    n = 1200
    X = rng.normal(size=(n, 2)).astype(np.float32)
    X[:, 1] = 0.0
    y = (X[:, 0] > 0).astype(np.float32)
    model = kalnat.models.linear(2)
    learner = kalnat.ekf(model, F.Bernoulli(), forgetting=0.9)
    params = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float32), model.init(None))
    with pytest.raises(kalnat.Diverged, match=r"diverged: the one-step log-likelihood of row \d+ .*max_variance") as err:
        kalnat.fit(learner, learner.init(params), X, y, chunk_size=64)
    assert 64 < err.value.row < n            # not at the start: the variance grows as 0.9^{-t}
    # without the predictions too, at the same row (it returned a NaN state)
    with pytest.raises(kalnat.Diverged) as quiet:
        kalnat.fit(learner, learner.init(params), X, y, chunk_size=64, return_predictions=False)
    assert quiet.value.row == err.value.row
    # a bank whose every member diverges: its mixture's log-likelihood, with predictions or not
    bank = kalnat.ekf_bank(model, F.Bernoulli(), prior_vars=[1.0, 2.0], forgettings=[0.9], max_variance=None)
    rows = []
    for keep in (True, False):
        with pytest.raises(kalnat.Diverged) as both:
            kalnat.fit(bank, bank.init(params), X, y, chunk_size=64, return_predictions=keep)
        rows.append(both.value.row)
    assert rows[0] == rows[1] > 64
    # with the bound the same stream is learned to the end
    bounded = kalnat.ekf(model, F.Bernoulli(), forgetting=0.9, max_variance=10.0)
    res = kalnat.fit(bounded, bounded.init(params), X, y, chunk_size=64)
    assert np.all(np.isfinite(res.log_likelihood))


def _confident_softmax_s(m, seed, dtype):
    """``S = H P⁻ Hᵀ + R`` of a softmax over ``m + 1`` classes whose reference class (the one
    left out of the ``m`` outputs) and one other have probability ~1e-7: ``H = R J`` (the
    logits' Jacobian ``J`` through the softmax), ``P⁻`` diagonal, 400 parameters."""
    rng = np.random.default_rng(seed)
    p = np.geomspace(1e-5, 0.5, m)
    p[m // 2] = 1.6e-7
    p = p / p.sum() * (1 - 3e-7)
    R = jnp.asarray(np.diag(p) - np.outer(p, p), dtype)
    H = R @ jnp.asarray(rng.normal(size=(m, 400)), dtype)
    return (H * jnp.asarray(rng.uniform(0.03, 0.6, 400), dtype)) @ H.T + R


def test_a_confident_classifiers_innovation_covariance_has_a_float32_factor():
    """R = diag(p) − p pᵀ has an eigenvalue as small as the reference class's probability, along
    a dense direction, below the rounding of H P⁻ Hᵀ's entries: in float32 many such S have a
    negative eigenvalue (no Cholesky factor exists; the plain one is NaN, and the float32
    diagonal filter on digits' MLP diverged on one). numerics.cholesky's is finite, within
    2 n ε max S_ii of S; in float64 (no pivot below the floor) L Lᵀ is S to 1e-14 of its
    largest entry."""
    from kalnat import numerics

    m, indefinite = 9, 0  # ten classes: the factor written out (up to numerics.SMALL outputs)
    for seed in range(12):
        S = _confident_softmax_s(m, seed, jnp.float32)
        indefinite += int(np.linalg.eigvalsh(np.asarray(S, np.float64)).min() < 0)
        L = np.asarray(numerics.cholesky(S), np.float64)
        assert np.all(np.isfinite(L)), seed
        tol = m * np.finfo(np.float32).eps * float(np.max(np.diag(S)))
        assert np.max(np.abs(L @ L.T - np.asarray(S, np.float64))) <= 2 * tol, seed
        S64 = _confident_softmax_s(m, seed, jnp.float64)
        L64 = np.asarray(numerics.cholesky(S64))
        np.testing.assert_allclose(L64 @ L64.T, S64, rtol=0, atol=1e-14 * float(np.max(S64)))
    assert indefinite >= 3  # the premise: as computed in float32, these S have no factor
