"""Structured covariances on the covariance interface: low rank plus diagonal (LoFi's form),
Kronecker factors per dense layer (K-FAC's form) and groups in representations of their own (the
"full last layer" preset). Each is the exact filter
where nothing is approximated, keeps what it promises where something is, never holds a d × d
array, stays positive definite in float32 and runs everywhere a representation runs."""

import re
import warnings

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import Phase, example, given, settings, strategies as st

import kalnat
from kalnat import recurrent
from kalnat.representations import Blocks, Diagonal, Full, Groups, KronLayer, LowRank, kronecker, last_layer_full

FAMILIES = {"gaussian": kalnat.families.Gaussian(0.5), "bernoulli": kalnat.families.Bernoulli(),
            "poisson": kalnat.families.Poisson(), "categorical": kalnat.families.Categorical(3)}


def _stream(family, seed, n=40, p=4):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, p))
    z = X @ rng.normal(size=(p, 3))
    y = {"gaussian": z[:, 0] + 0.7 * rng.normal(size=n),
         "bernoulli": (rng.random(n) < 1 / (1 + np.exp(-z[:, 0]))) * 1,
         "poisson": rng.poisson(np.exp(0.4 * z[:, 0])),
         "categorical": np.argmax(z + rng.gumbel(size=(n, 3)), axis=1)}[family]
    return X, y


def _agree(a, b, tol):
    np.testing.assert_allclose(kalnat.covariance(b.state), kalnat.covariance(a.state), rtol=tol,
                               atol=tol * np.abs(kalnat.covariance(a.state)).max())
    for x, y in zip(jax.tree_util.tree_leaves(b.state.params), jax.tree_util.tree_leaves(a.state.params)):
        np.testing.assert_allclose(x, y, rtol=tol, atol=tol)
    np.testing.assert_allclose(b.log_likelihood, a.log_likelihood, rtol=tol, atol=tol)


OPTIONS = [dict(), dict(forgetting=0.9, process_noise=0.02, max_variance=0.8)]


@pytest.mark.parametrize("family,opts", [("gaussian", OPTIONS[1]), ("bernoulli", OPTIONS[0]),
                                         ("poisson", OPTIONS[1]), ("categorical", OPTIONS[1])])
def test_low_rank_of_rank_at_least_d_is_the_exact_ekf(family, opts):
    X, y = _stream(family, 1)
    fam = FAMILIES[family]
    model = kalnat.models.linear(4, fam.n_outputs)
    d = 5 * fam.n_outputs
    exact = kalnat.ekf(model, fam, prior_var=0.7, **opts)
    low = kalnat.ekf(model, fam, prior_var=0.7, representation=LowRank(d + 1), **opts)
    a = kalnat.fit(exact, exact.init(model.init(None)), X, y, batch_size=2)
    b = kalnat.fit(low, low.init(model.init(None)), X, y, batch_size=2)
    _agree(a, b, 1e-9)


@settings(max_examples=6, deadline=None, derandomize=True)
@given(seed=st.integers(0, 10_000), lam=st.floats(0.8, 1.0), q=st.floats(0.0, 0.1))
def test_low_rank_prediction_step_is_exact_on_random_problems(seed, lam, q):
    """υ⁻, W⁻ of the prediction step give exactly (P/λ + qI)⁻¹, whatever W is."""
    rng = np.random.default_rng(seed)
    d, k = 7, 3
    cov = kalnat.representations.LowRankPrecision(jnp.asarray(rng.uniform(0.2, 3.0, d)),
                                                 jnp.asarray(rng.normal(size=(d, k))))
    P = np.linalg.inv(np.diag(cov.ups) + cov.w @ cov.w.T)
    prior = LowRank(k).inflate(cov, 1, lam, q if q > 0 else None, None)
    expected = P / lam + q * np.eye(d)
    np.testing.assert_allclose(prior.dense(), expected, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(np.linalg.inv(np.diag(prior.ups) + prior.w @ prior.w.T), expected, rtol=1e-10,
                               atol=1e-12)


@pytest.mark.parametrize("seed", [0, 1])
def test_low_rank_prediction_step_with_noise_keeps_float32_accuracy_over_a_wide_spectrum(seed):
    """In float32, with W's directions spread over 3.5 decades and half the parameters at υ's
    floor, the prediction step with additive noise gives diag(P⁻) to float32's accuracy (the
    data term of N formed as Zᵀ (Wᵀ diag(ε/υ) W) Z, the product after the Gram matrix, was
    off by ~3e-4)."""
    eps = np.finfo(np.float32).eps
    rng = np.random.default_rng(seed)
    d, k, lam, q = 200, 10, 0.999, 1e-3
    w = rng.normal(size=(d, k)) @ np.diag(np.logspace(0, 3.5, k)) @ np.linalg.qr(rng.normal(size=(k, k)))[0]
    rows = np.sum(w * w, axis=1)
    ups = np.where(rng.random(d) < 0.5, np.sqrt(eps) * rows, rng.uniform(0.5, 2.0, d) * rows.mean())
    cov = kalnat.representations.LowRankPrecision(jnp.asarray(ups, jnp.float32), jnp.asarray(w, jnp.float32))
    dense = lambda c: np.linalg.inv(np.diag(np.asarray(c.ups, np.float64))  # noqa: E731
                                    + np.asarray(c.w, np.float64) @ np.asarray(c.w, np.float64).T)
    expected = np.diag(dense(cov)) / lam + q
    prior = LowRank(k).inflate(cov, 1, np.float32(lam), np.float32(q), None)
    assert np.max(np.abs(np.diag(dense(prior)) - expected) / expected) < 1e-5


def test_low_rank_truncation_keeps_the_precision_diagonal_and_the_top_directions():
    """Re-projection to rank k: diag(Λ⁻ + Hᵀ R⁻¹ H) kept exactly; in the prior's diagonal
    metric, the dropped part is the smallest singular directions."""
    rng = np.random.default_rng(3)
    d, k, m = 9, 2, 3
    rep = LowRank(k)
    cov = kalnat.representations.LowRankPrecision(jnp.asarray(rng.uniform(0.5, 2.0, d)),
                                                 jnp.asarray(rng.normal(size=(d, k))))
    prior = rep.inflate(cov, 1, 1.0, None, None)
    H, R = jnp.asarray(rng.normal(size=(m, d))), jnp.asarray(np.diag(rng.uniform(0.5, 2.0, m)))
    post = rep.posterior(prior, H, R, jnp.zeros(m), None, jnp.ones(m, bool))
    full = np.diag(prior.ups) + prior.w @ prior.w.T + H.T @ np.linalg.solve(R, H)
    np.testing.assert_allclose(post.ups + np.sum(post.w ** 2, axis=1), np.diag(full), rtol=1e-12)
    white = full / np.sqrt(np.outer(prior.ups, prior.ups)) - np.eye(d)       # Ã Ãᵀ
    top = np.linalg.eigvalsh(white)[::-1][:k]
    kept = np.linalg.eigvalsh((post.w / np.sqrt(prior.ups)[:, None]).T @ (post.w / np.sqrt(prior.ups)[:, None]))
    np.testing.assert_allclose(np.sort(kept)[::-1], top, rtol=1e-10)


def _reprojected_by_svd(ups, w, H, R, k):
    """The re-projection from an SVD of the tall Ã = υ⁻^{-1/2} [W⁻, Hᵀ L_R⁻ᵀ] itself, for the
    prior ``diag(ups) + w wᵀ``."""
    ups = np.asarray(ups)
    info = np.linalg.solve(np.linalg.cholesky(R), H).T
    root = np.sqrt(ups)[:, None]
    u, s, _ = np.linalg.svd(np.concatenate([np.asarray(w), info], axis=1) / root, full_matrices=False)
    us = u * s
    kept = root * us[:, :k]
    return ups * (1.0 + np.sum(us[:, k:] ** 2, axis=1)), kept @ kept.T


@pytest.mark.parametrize("d,k,m,zero", [(9, 3, 1, 0), (9, 3, 3, 0), (9, 4, 2, 2), (5, 7, 2, 0), (6, 3, 1, 3)])
def test_low_rank_reprojection_from_the_gram_matrix_is_the_svd_of_the_tall_matrix(d, k, m, zero):
    """The posterior finds Ã's singular directions from its small Gram matrix (the prior's and
    the gain's projections); it is the SVD of Ã itself, also where W is rank deficient (``zero``
    columns of W are 0: the start) and where k > d; the gain's P⁻Hᵀ and H P⁻ Hᵀ are exact."""
    rng = np.random.default_rng(d * 100 + k * 10 + m + zero)
    rep = LowRank(k)
    w = rng.normal(size=(d, k)) * rng.uniform(0.1, 10.0, k)
    w[:, k - zero:] = 0.0
    cov = kalnat.representations.LowRankPrecision(jnp.asarray(rng.uniform(0.5, 2.0, d)), jnp.asarray(w))
    H = jnp.asarray(rng.normal(size=(m, d)))
    a = rng.normal(size=(m, m))
    R = jnp.asarray(a @ a.T + m * np.eye(m))

    @jax.jit  # one program (op by op, each operation of each shape compiled apiece)
    def steps(cov, H, R):
        prior = rep.inflate(cov, 1, 0.95, None, None)
        _, _, aux = rep.gain(prior, H, R, jnp.zeros(m))
        posts = (rep.posterior(prior, H, R, jnp.zeros(m), aux, jnp.ones(m, bool)),
                 rep.posterior(prior, H, R, jnp.zeros(m), None, jnp.ones(m, bool)))
        return prior, prior.w, posts, prior.projections(H.T)

    prior, prior_w, posts, (ph, hph, _, _, _) = steps(cov, H, R)
    prior_w = np.asarray(prior_w)
    ups, wwt = _reprojected_by_svd(prior.ups, prior_w, H, R, k)
    for post in posts:
        w = np.asarray(post.w)
        np.testing.assert_allclose(post.ups, ups, rtol=1e-10)
        np.testing.assert_allclose(w @ w.T, wwt, rtol=1e-10, atol=1e-10 * np.abs(wwt).max())
    P = np.linalg.inv(np.diag(prior.ups) + prior_w @ prior_w.T)
    # (ph, hph: Woodbury through I + AᵀA's factor)
    np.testing.assert_allclose(ph, P @ H.T, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(hph, H @ P @ H.T, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("q,bound", [(None, None), (0.01, None), (None, 2.0)])
def test_a_low_rank_step_reads_the_gram_matrix_and_the_rows_projections_in_one_product(q, bound):
    """Without a variance bound, the prior's ``G = W⁻ᵀΥ⁻⁻¹W⁻`` comes with the rows' ``Aᵀg``
    from one product over the d rows (the slow ``xᵀW (1, k)`` product gone; with process noise
    the prediction step forms the last state's G apart, for its own use); with the bound, which
    reads P⁻, G is formed before the rows come: each way, the same step."""
    d, k, m = 9, 3, 2
    rng = np.random.default_rng(3)
    cov = kalnat.representations.LowRankPrecision(jnp.asarray(rng.uniform(0.5, 2.0, d)),
                                                  jnp.asarray(rng.normal(size=(d, k))))
    H, R, e = jnp.asarray(rng.normal(size=(m, d))), jnp.eye(m), jnp.asarray(rng.normal(size=m))
    rep = LowRank(k)

    def step(cov, H):
        prior = rep.inflate(cov, 1, 0.95, q, bound)
        gain, _, aux = rep.gain(prior, H, R, e)
        return gain, rep.posterior(prior, H, R, e, aux, jnp.ones(m, bool))

    def over_rows(jaxpr):  # the output shapes of the products that sum over the d rows
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "dot_general":
                (lc, _), _ = eqn.params["dimension_numbers"]
                if [eqn.invars[0].aval.shape[i] for i in lc] == [d]:
                    yield eqn.outvars[0].aval.shape
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                yield from over_rows(sub)

    shapes = sorted(over_rows(jax.make_jaxpr(step)(cov, H).jaxpr))
    if bound is None:
        assert (k + m, k) in shapes and (m, k) not in shapes and (k, m) not in shapes, shapes
        assert ((k, k) in shapes) == (q is not None), shapes
    else:
        assert (k, k) in shapes and (k + m, k) not in shapes, shapes
    # a predictive of several rows (quad under vmap) forms G once, not with each row
    rows = sorted(over_rows(jax.make_jaxpr(lambda c, H: jax.vmap(lambda h: rep.quad(
        rep.inflate(c, 1, 0.95, q, bound), h[None]))(H))(cov, H).jaxpr))
    assert (k, k) in rows and not any(r[-2:] == (k + 1, k) for r in rows), rows
    # the same step as the prior with G formed first (LowRankPrior.filled), and, without the
    # bound, P⁻Hᵀ and H P⁻ Hᵀ as NumPy has them: P⁻ = (diag(υ) + W Wᵀ)⁻¹ / λ + q I
    prior = rep.inflate(cov, 1, 0.95, q, bound)
    if bound is None:
        w = np.asarray(cov.w)
        dense = np.linalg.inv(np.diag(np.asarray(cov.ups)) + w @ w.T) / 0.95 + (q or 0.0) * np.eye(d)
        ph, hph = prior.projections(H.T)[:2]
        np.testing.assert_allclose(ph, dense @ np.asarray(H).T, rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(hph, np.asarray(H) @ dense @ np.asarray(H).T, rtol=1e-12)
    filled = prior.filled()
    assert filled.gram is not None and (prior.gram is None) == (bound is None)
    for a, b in zip(prior.projections(H.T), filled.projections(H.T)):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14)


def test_low_rank_state_from_a_dense_covariance_steps_exactly():
    """with_dense (re-expression, with_covariance) puts the top k directions of P⁻¹ in W;
    with k = d they hold nearly all of each Λ_ii, and the state must come out with υ at its
    floor: the next prior, applied through I + WᵀΥ⁻¹W, is then P itself (with υ at ε Λ_ii that
    matrix is singular to float64's precision and P⁻ was wrong by 13 %)."""
    rng = np.random.default_rng(8)
    d = 6
    a = rng.normal(size=(d, d))
    P = a @ a.T + 0.5 * np.eye(d)
    cov = LowRank(d).init(kalnat.filter.Hyper(prior_var=1.0), d, jnp.float64).with_dense(P)
    prior = LowRank(d).inflate(cov, 1, 1.0, None, None)
    np.testing.assert_allclose(prior.dense(), P, rtol=1e-6, atol=1e-6 * np.abs(P).max())


@pytest.mark.parametrize("m", [1, 2])
def test_low_rank_update_keeps_the_diagonal_part_above_its_floor(m):
    """After an update υ_i ≥ √ε Λ_ii (float32): the diagonal part of a parameter whose
    information lies in W, which forgetting would otherwise shrink until it underflows."""
    rng = np.random.default_rng(5)
    d, k = 6, 2
    ups = np.full(d, 1e-20, np.float32)               # below the floor: as after long forgetting
    w = rng.normal(size=(d, k))
    cov = kalnat.representations.LowRankPrecision(jnp.asarray(ups), jnp.asarray(w, jnp.float32))
    rep = LowRank(k)
    H = jnp.asarray((w @ rng.normal(size=(k, m))).T, jnp.float32)   # within W's span: nothing dropped
    post = jax.jit(lambda cov, H: rep.posterior(  # (one program, not op by op)
        rep.inflate(cov, 1, np.float32(1.0), None, None), H, jnp.eye(m, dtype=jnp.float32),
        jnp.zeros(m, jnp.float32), None, jnp.ones(m, bool)))(cov, H)
    diag = np.asarray(post.ups) + np.sum(np.asarray(post.w) ** 2, axis=1)
    assert np.all(np.asarray(post.ups) >= 0.999 * np.sqrt(np.finfo(np.float32).eps) * diag)


@pytest.mark.parametrize("drop", ["random", "the-row", "the-row-negated", "an-old-column"])
def test_low_rank_one_row_deflation_keeps_the_complement_of_the_dropped_direction(drop):
    """One row's re-projection (a Householder reflection, O(d k)) keeps exactly
    [W, h] (I − v vᵀ) [W, h]ᵀ, whichever sign eigh gives v, also where v is the row's own
    direction ±e_{k+1} (the naive reflection v + e_{k+1} vanishes at −e_{k+1})."""
    from kalnat.representations.lowrank import _without
    rng = np.random.default_rng(11)
    d, k = 8, 3
    w, h = rng.normal(size=(d, k)), rng.normal(size=d)
    v = {"random": rng.normal(size=k + 1), "the-row": np.eye(k + 1)[k], "the-row-negated": -np.eye(k + 1)[k],
         "an-old-column": -np.eye(k + 1)[1]}[drop]
    v = v / np.linalg.norm(v)
    full = np.concatenate([w, h[:, None]], axis=1)
    kept, dropped = _without(jnp.asarray(w / 0.8), jnp.asarray(h), jnp.asarray(v), 0.8)   # W = 0.8 base
    np.testing.assert_allclose(kept @ kept.T, full @ (np.eye(k + 1) - np.outer(v, v)) @ full.T, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(dropped, (full @ v) ** 2, rtol=1e-12)


@pytest.mark.parametrize("d,k,m", [(9, 3, 1), (9, 3, 3), (6, 8, 1), (6, 8, 3), (24, 18, 1)])
@pytest.mark.parametrize("lam,q", [(0.9, None), (0.95, 0.05)])
def test_low_rank_bounded_prior_and_its_update_are_the_dense_ones(d, k, m, lam, q):
    """The variance bound's congruence held as a (d,) factor on W's rows (with forgetting's √λ,
    or after additive noise): the prior is S (P/λ + qI) S exactly, with k < d and k ≥ d, and the
    update from it (one row: the reflection; several: the product) is the SVD re-projection of
    that prior (k < d) or the exact information (k ≥ d). The bound's ``diag(P⁻)`` is summed
    column by column up to k = 16 and through the product beyond (k = 18)."""
    rng = np.random.default_rng(10 * d + k + m)
    ups = rng.uniform(0.2, 3.0, d)
    w = rng.normal(size=(d, k)) * rng.uniform(0.1, 3.0, k)
    w[:, d:] = 0.0
    cov = kalnat.representations.LowRankPrecision(jnp.asarray(ups), jnp.asarray(w))
    P = np.linalg.inv(np.diag(ups) + w @ w.T) / lam + (0.0 if q is None else q) * np.eye(d)
    bound = float(np.median(np.diag(P)))                          # binds on about half the rows
    s = np.where(np.diag(P) > bound, np.sqrt(bound / np.diag(P)), 1.0)
    expected = s[:, None] * P * s[None, :]
    rep = LowRank(k)
    H = jnp.asarray(rng.normal(size=(m, d)))
    a = rng.normal(size=(m, m))
    R = jnp.asarray(a @ a.T + m * np.eye(m))

    @jax.jit  # one program (op by op, each operation of each shape compiled apiece)
    def steps(cov, H, R):
        prior = rep.inflate(cov, 1, lam, q, bound)
        post = rep.posterior(prior, H, R, jnp.zeros(m), None, jnp.ones(m, bool))
        return prior, (prior.dense(), prior.w, prior.variances()), (post.ups, post.w)

    prior, (dense, prior_w, variances), (post_ups, post_w) = steps(cov, H, R)
    prior_w, post_w = np.asarray(prior_w), np.asarray(post_w)
    np.testing.assert_allclose(dense, expected, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(np.linalg.inv(np.diag(prior.ups) + prior_w @ prior_w.T), expected, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(variances, np.diag(expected), rtol=1e-10)
    if k >= d:
        info = np.linalg.inv(expected) + np.asarray(H).T @ np.linalg.solve(R, H)
        np.testing.assert_allclose(np.diag(post_ups) + post_w @ post_w.T, info, rtol=1e-10, atol=1e-10 * np.abs(info).max())
    else:
        ups_svd, wwt = _reprojected_by_svd(prior.ups, prior_w, H, R, k)
        np.testing.assert_allclose(post_ups, ups_svd, rtol=1e-10)
        np.testing.assert_allclose(post_w @ post_w.T, wwt, rtol=1e-10, atol=1e-10 * np.abs(wwt).max())


def test_low_rank_one_row_deflation_with_a_per_row_factor():
    """The reflection with W = diag(root) base, root (d,) (the variance bound's factor): the
    same kept complement and dropped diagonal as with W formed."""
    from kalnat.representations.lowrank import _without
    rng = np.random.default_rng(12)
    d, k = 8, 3
    w, h = rng.normal(size=(d, k)), rng.normal(size=d)
    root = rng.uniform(0.3, 1.5, d)
    full = np.concatenate([w, h[:, None]], axis=1)
    for v in (rng.normal(size=k + 1), np.eye(k + 1)[k], -np.eye(k + 1)[k]):
        v = v / np.linalg.norm(v)
        kept, dropped = _without(jnp.asarray(w / root[:, None]), jnp.asarray(h), jnp.asarray(v), jnp.asarray(root))
        np.testing.assert_allclose(kept @ kept.T, full @ (np.eye(k + 1) - np.outer(v, v)) @ full.T, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(dropped, (full @ v) ** 2, rtol=1e-12)


@pytest.mark.parametrize("case", ["one-output", "one-output-bounded", "isotropic-outputs"])
def test_kronecker_is_the_exact_ekf_where_the_information_is_kronecker(case):
    """One output (G is 1 × 1), or several outputs with isotropic gaussian noise (information
    I ⊗ Σ āāᵀ): the updated precision is a Kronecker product and the layer's filter exact.
    With one output, the variance bound too: an input that is always 0 keeps its prior
    variance in ``A`` while forgetting inflates ``G``, and the bound shrinks its variances
    alone, as the full covariance's does (through ``G`` it would shrink the whole layer's)."""
    opts = dict(prior_var=0.7, forgetting=0.9)
    if case.startswith("one-output"):
        X, y = _stream("bernoulli", 6)
        fam, model, batch = FAMILIES["bernoulli"], kalnat.models.linear(4), 2
        if case == "one-output-bounded":
            X = X.copy()
            X[:, 2] = 0.0
            opts["max_variance"] = 1.5
    else:
        X, _ = _stream("gaussian", 6)
        y = X @ np.random.default_rng(7).normal(size=(4, 3)) + np.random.default_rng(8).normal(size=(40, 3))
        fam, model, batch = kalnat.families.Gaussian(0.5, dim=3), kalnat.models.linear(4, 3), 3
    rep = kronecker(model.init(None))
    assert isinstance(rep, KronLayer)
    exact = kalnat.ekf(model, fam, **opts)
    kron = kalnat.ekf(model, fam, representation=rep, **opts)
    a = kalnat.fit(exact, exact.init(model.init(None)), X, y, batch_size=batch)
    _agree(a, kalnat.fit(kron, kron.init(model.init(None)), X, y, batch_size=batch), 1e-9)
    if case == "one-output-bounded":  # the bound binds on the zero input's weight, and only there
        variances = np.diag(np.asarray(kalnat.covariance(a.state)))
        assert variances[3] == pytest.approx(1.5) and np.all(np.delete(variances, 3) < 1.0)  # θ: b, then w


@pytest.mark.parametrize("layout", ["flax", "weights-first", "kernel-first"])
def test_kronecker_reads_the_layouts_networks_use_and_is_exact_there(layout):
    """A dense layer held as flax's {"bias", "kernel" (n_in, n_out)}, as equinox's weights
    (n_out, n_in) then bias, or as a kernel then bias: kronecker(params) reads it as the layer
    (no warning), and where the information is a Kronecker product (three outputs, isotropic
    gaussian noise) the filter is the exact EKF on those params, θ and P in their order."""
    rng = np.random.default_rng(4)
    w, b = rng.normal(size=(3, 4)), rng.normal(size=3)
    params, apply = {
        "flax": ({"bias": b, "kernel": w.T}, lambda p, x: x @ p["kernel"] + p["bias"]),
        "weights-first": ((w, b), lambda p, x: p[0] @ x + p[1]),
        "kernel-first": ((w.T, b), lambda p, x: x @ p[0] + p[1]),
    }[layout]
    params = jax.tree_util.tree_map(jnp.asarray, params)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rep = kronecker(params)
    assert (rep.bias_first, rep.transposed) == {"flax": (True, True), "weights-first": (False, False),
                                                "kernel-first": (False, True)}[layout]
    X, _ = _stream("gaussian", 6)
    y = X @ rng.normal(size=(4, 3)) + rng.normal(size=(40, 3))
    fam, opts = kalnat.families.Gaussian(0.5, dim=3), dict(prior_var=0.7, forgetting=0.9, input_shape=(4,))
    exact, kron = kalnat.ekf(apply, fam, **opts), kalnat.ekf(apply, fam, representation=rep, **opts)
    _agree(kalnat.fit(exact, exact.init(params), X, y, batch_size=3),
           kalnat.fit(kron, kron.init(params), X, y, batch_size=3), 1e-9)


#: The layers (n_out, n_in) and counts of rows k of the docstring test. Each shape is one compiled
#: program (0.4–0.8 s), so its examples draw their shapes from these, and their data (rows that are
#: outer products or not, R coupling them or not, a zero row) freely. The explicit examples take
#: every branch a shape chooses: one output (its rows whitened outright), one row, on the
#: outer-product path k below, at and above n_out and n_in + 1 (``_least``'s zero or an
#: eigenvalue), and on the general path factors of 2 to 5 rows (5: ``numerics``' loops rather than
#: unrolled steps).
_DOCSTRING_SHAPES = [(1, 3, 2), (1, 1, 3), (2, 1, 1), (3, 4, 2), (3, 2, 3), (4, 2, 3), (2, 4, 3)]


@jax.jit
def _kronecker_paths(prior, H, whitened, R, e):
    """The docstring test's paths, jitted: one program per shape (op by op, each of its ~170
    operations would be compiled apiece)."""
    rep = KronLayer(prior.g.shape[0], prior.a.shape[0] - 1)
    gain, hph, aux = rep.gain(prior, H, R, e)  # the posterior takes the gain's aux, as in a step
    post = rep.posterior(prior, H, R, e, aux, jnp.ones(H.shape[0], bool))
    factored = rep._whitened(prior, H, R, aux)[0]  # the path the posterior took
    return aux[0], rep._outer(whitened)[0], factored, (hph, gain), post, prior.dense(), post.dense()


@settings(max_examples=20, deadline=None, derandomize=True, phases=[Phase.explicit, Phase.generate])
@given(shape=st.sampled_from(_DOCSTRING_SHAPES), outer=st.booleans(), seed=st.integers(0, 2**16))
@example(shape=(3, 4, 2), outer=False, seed=5)  # the general path, factors of 5 rows
@example(shape=(3, 2, 3), outer=True, seed=1)   # one example's rows, k = n_out = n_in + 1; a zero row
@example(shape=(3, 2, 3), outer=True, seed=2)   # rows of several examples that R couples: general
@example(shape=(4, 2, 3), outer=True, seed=6)   # rows of three examples, R coupling none of them
@example(shape=(2, 4, 3), outer=True, seed=4)   # k above n_out and below n_in + 1
@example(shape=(2, 1, 1), outer=False, seed=3)  # one row
@example(shape=(1, 3, 2), outer=False, seed=0)  # one output: any rows are outer products
@example(shape=(1, 1, 3), outer=True, seed=5)   # one output, k above n_out and n_in + 1; a zero row
def test_kronecker_posterior_is_the_nearest_kronecker_product_of_its_docstring(shape, outer, seed):
    """On a prior with full G and A and a noise R that couples the rows: P = (L_G U⁻¹ L_Gᵀ) ⊗
    (L_A V⁻¹ L_Aᵀ) from the alternating passes, damped where U ⊗ V falls below I ⊗ I
    (the prior's precision), written out in NumPy, P never above P⁻, and the gain P⁻Hᵀ S⁻¹ e
    and H P⁻ Hᵀ from the dense P⁻. Rows that are outer products δ āᵀ (a dense layer's)
    take the factored path, any others the general one; both are checked against the same
    reference."""
    from kalnat.representations.kron import PASSES
    n_out, n_in, k = shape
    rng = np.random.default_rng(seed)

    def spd(n):
        a = rng.normal(size=(n, n))
        return a @ a.T / n + 0.5 * np.eye(n)

    g, a = spd(n_out), spd(n_in + 1)
    shared = outer and seed % 2  # one example's outputs: one ā, and R couples them
    if outer:  # δ āᵀ with ā = [a; 1]; a zero row (a masked one) among them
        abar = np.r_[rng.normal(size=n_in), 1.0]
        mats = [np.outer(rng.normal(size=n_out), abar if shared else np.r_[rng.normal(size=n_in), 1.0])
                for _ in range(k)]
        if k > 1 and seed % 4 == 1:
            mats[0] = 0.0 * mats[0]
    else:  # sums of two outer products: no dense layer's rows, unless the layer has one output
        mats = [np.outer(rng.normal(size=n_out), rng.normal(size=n_in + 1))
                + np.outer(rng.normal(size=n_out), rng.normal(size=n_in + 1)) for _ in range(k)]
    H = np.stack([np.r_[m[:, n_in], m[:, :n_in].ravel()] for m in mats])  # θ's order: b, then W
    c = rng.normal(size=(k, k))
    # rows of several examples: R couples none of them, except for a third of the seeds (then
    # they are not outer products once whitened, and the general path takes them)
    coupled = shared or not outer or seed % 3 == 2
    R = c @ c.T + k * np.eye(k) if coupled else np.diag(rng.uniform(0.5, 2.0, k))
    prior = kalnat.representations.KronCovariance(jnp.asarray(g), jnp.asarray(a))
    whitened = np.linalg.solve(np.linalg.cholesky(R), H)

    e = rng.normal(size=k)
    is_outer, whitened_outer, factored, (hph, gain), post, P, P_post = _kronecker_paths(
        prior, jnp.asarray(H), jnp.asarray(whitened), jnp.asarray(R), jnp.asarray(e))
    assert bool(is_outer) == (outer or n_out == 1)
    assert bool(factored) == bool(whitened_outer)
    if not coupled or shared:
        assert bool(whitened_outer) == (outer or n_out == 1)
    P = np.asarray(P)
    np.testing.assert_allclose(hph, H @ P @ H.T, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(gain, P @ H.T @ np.linalg.solve(H @ P @ H.T + R, e), rtol=1e-10, atol=1e-12)
    lg, la = np.linalg.cholesky(g), np.linalg.cholesky(a)
    info = np.linalg.solve(np.linalg.cholesky(R), H)
    ms = [lg.T @ np.c_[row[n_out:].reshape(n_out, n_in), row[:n_out]] @ la for row in info]
    v = np.eye(n_in + 1)
    for _ in range(PASSES):
        u = np.trace(v) * np.eye(n_out) + sum(m @ v @ m.T for m in ms)
        u = u / np.linalg.norm(u)
        v = np.trace(u) * np.eye(n_in + 1) + sum(m.T @ u @ m for m in ms)
    least_u, least_v = np.linalg.eigvalsh(u)[0], np.linalg.eigvalsh(v)[0]
    if least_u * least_v < 1:  # balanced to the same least eigenvalue r, both raised by 1 − r
        c, r = np.sqrt(least_v / least_u), np.sqrt(least_u * least_v)
        u, v = c * u + (1 - r) * np.eye(n_out), v / c + (1 - r) * np.eye(n_in + 1)
    expected = np.kron(lg @ np.linalg.solve(u, lg.T), la @ np.linalg.solve(v, la.T))
    np.testing.assert_allclose(np.kron(post.g, post.a), expected, rtol=1e-10, atol=1e-12)
    # and so the step never leaves P above P⁻: Λ⁺ ⪰ Λ⁻
    assert np.linalg.eigvalsh(P - np.asarray(P_post)).min() > -1e-10 * np.abs(P).max()


@pytest.mark.parametrize("least", [(0.3, 0.5), (2.0, 1.5), (-0.2, 0.0), (-0.5, -0.5), (0.0, 0.7)])
def test_kronecker_damping_holds_the_prior_in_every_branch(least):
    """The damping of the whitened factors U, V given their least eigenvalues: U' ⊗ V' ⪰ I ⊗ I
    where uv < 1 (balanced, both raised), untouched where uv ≥ 1, and where rounding left a
    least eigenvalue ≤ 0 (each raised by 1 − min); finite derivatives in every branch, forward
    mode included (√0 in the unused branch made jax.jvp NaN)."""
    from kalnat.representations.kron import _at_least_prior
    rng = np.random.default_rng(0)

    def with_least(n, lo):  # symmetric, least eigenvalue lo
        q, _ = np.linalg.qr(rng.normal(size=(n, n)))
        return q @ np.diag(np.r_[lo, lo + rng.uniform(0.1, 2.0, n - 1)]) @ q.T

    U, V = jnp.asarray(with_least(3, least[0])), jnp.asarray(with_least(4, least[1]))

    def damped(t):
        return _at_least_prior(U, V, jnp.asarray(least[0]) + t, jnp.asarray(least[1]))

    prod = np.kron(*damped(0.0))
    assert np.linalg.eigvalsh(prod)[0] >= 1 - 1e-12
    if min(least) > 0 and least[0] * least[1] >= 1:
        np.testing.assert_array_equal(prod, np.kron(U, V))
    trace = lambda t: jnp.trace(jnp.kron(*damped(t)))
    assert np.isfinite(jax.jvp(trace, (0.0,), (1.0,))[1]) and np.isfinite(jax.grad(trace)(0.0))


@pytest.mark.parametrize("dtype, batch", [(jnp.float64, 1), (jnp.float32, 4)])
def test_a_kronecker_step_never_leaves_p_above_the_prior(dtype, batch):
    """digits' linear softmax on standardised inputs (d = 585), one example a step in float64
    and four in float32, no forgetting: with Λ⁺ ⪰ Λ⁻ kept, P⁻ − P stays positive semidefinite
    over each chunk of 12 rows (to rounding), tr P falls and θ stays of the data's size. The
    nearest Kronecker product alone dropped part of the prior where the rows' information
    dominated it (|ā|² ≈ 65): in float64 tr P rose from 585 to 2 049 within 50 rows and θ
    reached 10¹²; in float32, four rows a step, tr P reached 5·10⁸ over 640 rows (measured
    apart, with a progressive log-loss of 69 against 0.36 now)."""
    from jax.flatten_util import ravel_pytree

    from kalnat import datasets
    X, y, _, _ = datasets.load("digits")
    X = np.asarray((X - X.mean(0)) / (X.std(0) + 1e-9), dtype)
    model = kalnat.models.linear(64, 9, dtype=dtype)
    params = model.init(None)
    learner = kalnat.ekf(model, kalnat.families.Categorical(10), representation=kronecker(params))
    state, traces, drops = learner.init(params), [], []
    before = np.asarray(kalnat.covariance(state), np.float64)
    for start in range(0, 60, 12):  # one compiled program for the five chunks
        state = kalnat.fit(learner, state, X[start:start + 12], y[start:start + 12], batch_size=batch).state
        after = np.asarray(kalnat.covariance(state), np.float64)
        traces.append(np.trace(before))
        drops.append(np.linalg.eigvalsh(before - after)[0] / np.abs(before).max())  # P⁻ − P ⪰ 0
        before = after
    traces.append(np.trace(before))
    assert traces[0] == pytest.approx(585.0)
    assert np.all(np.diff(traces) < 0), traces
    assert min(drops) > -(1e-10 if dtype == jnp.float64 else 1e-4), drops
    assert np.linalg.norm(ravel_pytree(state.params)[0]) < 100, "θ left the data's scale"


@pytest.mark.parametrize("n_out, k", [(3, 3), (20, 20), (1, 52)])
def test_kronecker_factors_stay_bitwise_symmetric(n_out, k):
    """The factored posterior's G and A are exactly symmetric after a step of ``k`` rows (one
    example's outputs, or with one output, ``k`` examples'): up to numerics.FUSED_DOWNDATE rows the
    downdate is a sum of outer products in the same order for an entry and its mirror; beyond,
    a product FᵀF, which is not symmetric to the bit and is mirrored (numerics.downdate).
    Unsymmetrised, float64 A grew 10 × more asymmetric every ~250 steps under forgetting 0.99
    and the filter returned NaN after ~2 800 rows (20 outputs)."""
    rng = np.random.default_rng(k + n_out)
    n_in = 6
    rep = KronLayer(n_out, n_in)

    def spd(n):
        a = rng.normal(size=(n, n))
        a = a @ a.T / n + 0.5 * np.eye(n)
        return 0.5 * (a + a.T)

    prior = kalnat.representations.KronCovariance(jnp.asarray(spd(n_out)), jnp.asarray(spd(n_in + 1)))
    abar = np.r_[rng.normal(size=n_in), 1.0]
    H = np.stack([np.r_[m[:, n_in], m[:, :n_in].ravel()] for m in (
        np.outer(rng.normal(size=n_out), abar if n_out > 1 else np.r_[rng.normal(size=n_in), 1.0])
        for _ in range(k))])
    R = np.diag(rng.uniform(0.5, 2.0, k))
    post, factored = jax.jit(lambda p, H, R: (rep.posterior(p, H, R, jnp.zeros(k), None, jnp.ones(k, bool)),
                                              rep._whitened(p, H, R, None)[0]))(prior, jnp.asarray(H), jnp.asarray(R))
    assert bool(factored)
    np.testing.assert_array_equal(post.g, post.g.T)
    np.testing.assert_array_equal(post.a, post.a.T)


def test_a_dense_layers_rows_are_outer_products_and_a_shared_layers_are_not():
    """What decides the Kronecker form's cost: every row of an MLP's Jacobian is δ āᵀ on each
    layer (its factored path, O(n²) a layer), in float32 too; the rows of a layer used twice
    are sums of such products (the general path)."""
    from jax.flatten_util import ravel_pytree
    for dtype in (jnp.float64, jnp.float32):
        model = kalnat.models.mlp(4, (5, 6), 3, dtype=dtype)
        params = model.init(jax.random.PRNGKey(0))
        theta, unravel = ravel_pytree(params)
        x = np.random.default_rng(1).normal(size=(2, 4)).astype(dtype)
        rep = kronecker(params)
        cuts = np.cumsum((0,) + rep.sizes)

        @jax.jit  # one program (op by op, each of the Jacobian's and the checks' operations compiled apiece)
        def outer(theta, x):
            H = jnp.concatenate([jax.jacobian(lambda t, xi=xi: model.apply(unravel(t), xi))(theta) for xi in x])
            return [layer._outer(H[:, a:b])[0] for layer, a, b in zip(rep.parts, cuts[:-1], cuts[1:])]
        assert [bool(o) for o in outer(theta, x)] == [True] * 3
    # one layer applied twice, z = W tanh(W x + b) + b: each row is a sum of two outer products
    shared = {"b": jnp.ones(3), "w": jax.random.normal(jax.random.PRNGKey(2), (3, 3))}
    theta, unravel = ravel_pytree(shared)

    def twice(t, xi):
        p = unravel(t)
        return p["w"] @ jnp.tanh(p["w"] @ xi + p["b"]) + p["b"]
    is_outer = jax.jit(lambda t, xi: KronLayer(3, 3)._outer(jax.jacobian(twice)(t, xi))[0])
    assert kronecker(shared) == KronLayer(3, 3) and not bool(is_outer(theta, jnp.arange(1.0, 4.0)))


def test_kronecker_factors_round_trip_and_cover_a_network_layer_by_layer():
    model = kalnat.models.mlp(4, (5,), 3)
    params = model.init(jax.random.PRNGKey(0))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every leaf read as a layer: nothing to warn of
        rep = kronecker(params)
    assert rep == Groups((25, 18), (KronLayer(5, 4), KronLayer(3, 5)))
    # a leaf of two or more axes not next to a bias (a convolution's kernel): a full block of
    # its size, named
    with pytest.warns(UserWarning, match=r"\['conv'\] \(2, 2, 3\) \(144 numbers\)"):
        assert kronecker({"conv": jnp.zeros((2, 2, 3))}) == Full()
    # in a dict of several matrices and biases (a recurrent cell's) a matrix takes no bias that
    # is not its own: kalnat's layout (the bias, then W) alone is read there
    rows = {"U": jnp.zeros((4, 3)), "b": jnp.zeros(4), "w": jnp.zeros((4, 5))}
    with pytest.warns(UserWarning, match=r"\['U'\] \(4, 3\)"):
        assert kronecker(rows) == Groups((12, 24), (Full(), KronLayer(4, 5)))
    with pytest.warns(UserWarning, match="not read as a dense layer"):
        gru = kronecker(recurrent.gru(1, 3).init(jax.random.PRNGKey(0)))
    assert all(part == Full() for part in gru.parts)
    # weights and a bias of two containers (two layers') are not one layer
    with pytest.warns(UserWarning, match=r"\[0\]\['w'\] \(3, 4\)"):
        assert kronecker([{"w": jnp.zeros((3, 4))}, {"b": jnp.zeros(3)}]) == Groups((12, 3), (Full(), Full()))
    rng = np.random.default_rng(9)
    g, a = rng.normal(size=(3, 3)), rng.normal(size=(6, 6))
    cov = kalnat.representations.KronCovariance(jnp.asarray(g @ g.T + np.eye(3)), jnp.asarray(a @ a.T + np.eye(6)))
    P = np.asarray(cov.dense())
    # θ's order: the bias, then W row by row; vec([W | b]) is G ⊗ A
    order = np.r_[[3 + 5 * o + np.arange(5) for o in range(3)]]
    full = np.kron(cov.g, cov.a)
    np.testing.assert_allclose(P[np.ix_(order[0], order[0])], full[:5, :5], rtol=1e-12)
    np.testing.assert_allclose(P[0, 0], full[5, 5], rtol=1e-12)
    np.testing.assert_allclose(cov.with_dense(P).dense(), P, rtol=1e-10, atol=1e-12)


def test_one_group_is_its_representation_and_full_groups_are_the_decoupled_ekf():
    X, y = _stream("gaussian", 2)
    X = X[:, :3]
    model = kalnat.models.mlp(3, (3,))
    params = model.init(jax.random.PRNGKey(0))
    d = sum(np.size(a) for a in jax.tree_util.tree_leaves(params))
    fam = kalnat.families.Gaussian(0.2)
    opts = OPTIONS[1]

    def run(rep):
        learner = kalnat.ekf(model, fam, prior_var=0.5, representation=rep, **opts)
        return kalnat.fit(learner, learner.init(params), X, np.tanh(y), batch_size=2)

    _agree(run(Full()), run(Groups((d,), (Full(),))), 1e-10)
    blocks = run(Blocks((d - 4, 4)))
    _agree(blocks, run(Groups((d - 4, 4), (Full(), Full()))), 1e-10)
    # the preset with a rank that drops nothing is the same block-diagonal filter
    _agree(blocks, run(last_layer_full(params, LowRank(d - 4))), 1e-9)


def test_a_diagonal_group_re_expresses_at_its_own_size():
    """A diagonal part's variances are padded (numerics.LANES): the groups' dense covariance and
    its re-expression split P by each part's own size, not its arrays' length."""
    X, y = _stream("gaussian", 2)
    model = kalnat.models.mlp(3, (3,))
    params = model.init(jax.random.PRNGKey(0))
    learner = kalnat.ekf(model, kalnat.families.Gaussian(0.2), prior_var=0.5,
                         representation=last_layer_full(params, Diagonal()))
    s = kalnat.fit(learner, learner.init(params), X[:20, :3], np.tanh(y[:20])).state
    assert s.cov.parts[0].d == 12 and s.cov.parts[0].p.shape == (16,)
    P = kalnat.covariance(s)
    again = kalnat.with_covariance(s, s.params, P)
    np.testing.assert_array_equal(kalnat.covariance(again), P)
    np.testing.assert_array_equal(again.cov.parts[0].p, s.cov.parts[0].p)


def _step_shapes(learner, state, d, p):
    x, y = jnp.ones((1, p)), jnp.ones((1,))
    jaxpr = jax.make_jaxpr(lambda s: learner.step(learner.hyper, s, x, y))(state)

    def walk(jp):
        for eqn in jp.eqns:
            yield from (v.aval.shape for v in eqn.outvars)
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                yield from walk(sub)
    return [s for s in walk(jaxpr.jaxpr) if len(s) >= 2 and s[-1] >= d and s[-2] >= d]  # padded too


@pytest.mark.parametrize("structure", ["lowrank", "last-layer-full", "kron"])
def test_structured_steps_never_hold_a_d_by_d_array(structure):
    model = kalnat.models.mlp(40, (8,))
    params = model.init(jax.random.PRNGKey(0))
    d = sum(np.size(a) for a in jax.tree_util.tree_leaves(params))
    rep = {"lowrank": LowRank(4), "last-layer-full": last_layer_full(params, LowRank(4)),
           "kron": kronecker(params)}[structure]
    learner = kalnat.ekf(model, kalnat.families.Bernoulli(), representation=rep, forgetting=0.99,
                         process_noise=1e-4, max_variance=10.0)
    assert _step_shapes(learner, learner.init(params), d, 40) == []
    full = kalnat.ekf(model, kalnat.families.Bernoulli(), forgetting=0.99)
    assert _step_shapes(full, full.init(params), d, 40)  # the check can see one


@pytest.mark.slow
@pytest.mark.parametrize("structure", ["diag", "blocks", "lowrank", "last-layer-full", "kron"])
def test_structures_stay_positive_definite_over_a_long_float32_stream(structure):
    """10⁵ rows in float32 with forgetting, a dead input and the bound: every structure keeps
    a positive definite, finite, bounded covariance."""
    rng = np.random.default_rng(4)
    n, p = 100_000, 3
    X = rng.normal(size=(n, p)).astype(np.float32)
    X[:, 2] = 0.0  # a dead feature: wind-up without the bound
    y = (rng.random(n) < 1 / (1 + np.exp(-X @ np.array([1.0, -2.0, 0.0])))).astype(np.float32)
    model = kalnat.models.mlp(p, (2,))
    params = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float32), model.init(jax.random.PRNGKey(1)))
    rep = {"diag": Diagonal(), "blocks": Blocks.per_leaf(params), "lowrank": LowRank(2),
           "last-layer-full": last_layer_full(params, LowRank(2)), "kron": kronecker(params)}[structure]
    learner = kalnat.ekf(model, kalnat.families.Bernoulli(), representation=rep, forgetting=0.98,
                         process_noise=1e-6, max_variance=5.0)
    res = kalnat.fit(learner, learner.init(params), X, y, chunk_size=8192)
    leaves = jax.tree_util.tree_leaves(res.state.cov)
    assert all(a.dtype == np.float32 and np.all(np.isfinite(a)) for a in leaves), [(a.dtype, np.isfinite(a).all()) for a in leaves]
    # the bound caps the prior P⁻ a step uses (a truncated low-rank posterior may exceed it);
    # both matrices formed in one program (op by op, each operation would be compiled apiece)
    P, prior = jax.jit(lambda c: (c.dense(), rep.inflate(
        c, n + 1, np.float32(0.98), np.float32(1e-6), np.float32(5.0)).dense()))(res.state.cov)
    P, prior = np.asarray(P, np.float64), np.asarray(prior)   # (as kalnat.covariance gives P)
    assert np.linalg.eigvalsh(P).min() > 0 and np.linalg.eigvalsh(prior).min() > 0
    assert np.diag(prior).max() <= 5.0 * (1 + 1e-3)
    assert np.all(np.isfinite(res.log_likelihood)) and -np.mean(res.log_likelihood[-1000:]) < 0.6


def test_structures_run_in_a_bank_rtrl_and_the_iterated_and_nig_filters():
    X, y = _stream("bernoulli", 5, n=30)
    model = kalnat.models.linear(4)
    params = model.init(None)
    rep = LowRank(2)
    b = kalnat.ekf_bank(model, kalnat.families.Bernoulli(), representation=rep)
    assert np.all(np.isfinite(kalnat.fit(b, b.init(params), X, y).log_likelihood))
    it = kalnat.iterated_ekf(model, kalnat.families.Bernoulli(), iterations=2, representation=rep)
    assert np.all(np.isfinite(kalnat.fit(it, it.init(params), X, y).log_likelihood))
    nig = kalnat.nig_filter(model, representation=rep)
    assert np.all(np.isfinite(kalnat.fit(nig, nig.init(params), X, X[:, 0] + 0.1).log_likelihood))
    kb = kalnat.ekf_bank(model, kalnat.families.Bernoulli(), representation=kronecker(params))
    assert np.all(np.isfinite(kalnat.fit(kb, kb.init(params), X, y).log_likelihood))
    cell = recurrent.elman(1, 3)
    cell_params = cell.init(jax.random.PRNGKey(0))
    z = np.sin(0.3 * np.arange(41))
    with pytest.warns(UserWarning, match="not read as a dense layer"):  # a cell's matrices: full blocks
        cell_kron = kronecker(cell_params)
    for rep in (LowRank(3), cell_kron):
        rt = recurrent.rtrl(cell, kalnat.families.Gaussian(0.3), representation=rep, prior_var=0.5)
        res = recurrent.fit_sequence(rt, rt.init(cell_params), z[:-1, None], z[1:])
        assert np.all(np.isfinite(res.log_likelihood))


def test_bad_structures_say_what_is_wrong():
    with pytest.raises(ValueError, match="rank must be a positive integer"):
        LowRank(0)
    model = kalnat.models.linear(3)
    learner = kalnat.ekf(model, kalnat.families.Bernoulli(), prior_var=np.eye(4), representation=LowRank(2))
    with pytest.raises(ValueError, match="scalar or a \\(d,\\) diagonal"):
        learner.init(model.init(None))
    with pytest.raises(ValueError, match="no layer before its last"):
        last_layer_full(model.init(None), LowRank(2))
    with pytest.raises(ValueError, match="2 sizes for 1 representations"):
        Groups((2, 2), (Full(),))
    for sizes, bad in (((2.5, 1.5), "group size 0 must be a positive integer, got 2.5"),
                       ((4, -1), "group size 1 must be a positive integer, got -1"), ((), "no group sizes")):
        with pytest.raises(ValueError, match=re.escape(bad)):
            Blocks(sizes)
        with pytest.raises(ValueError, match=re.escape(bad)):
            Groups(sizes, (Full(),) * len(sizes))
    assert LowRank(np.int64(3)).rank == 3 and Blocks((np.int64(2), 2)).sizes == (2, 2)


def _conds(jaxpr):
    """How many ``cond`` equations a jaxpr holds, at any depth."""
    n = 0
    for eqn in jaxpr.eqns:
        n += eqn.primitive.name == "cond"
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            n += _conds(sub)
    return n


def test_a_bank_of_kronecker_members_keeps_their_branches(monkeypatch):
    """The Kronecker step chooses its path with a cond, which vmap turns into a select of both
    (a select, not a cond, in the program): a bank advances such members one at a time, so its
    chunk's program keeps those conds, as many as with the members one at a time by force, and
    so do its single update (``bank.update``) and its prediction. (The model as a plain
    function: ``H`` as a matrix, whose rows the form checks; an MLP of ``kalnat.models`` gives
    its rows' factors, and its prediction does not branch at all.)"""
    from kalnat import bank as bank_module
    mlp = kalnat.models.mlp(4, (3,), 2)  # H depends on θ, so each member's predicate is its own
    params = mlp.init(jax.random.PRNGKey(0))
    model = kalnat.models.Model(mlp.init, mlp.apply, mlp.input_shape, mlp.n_outputs)
    fam = kalnat.families.Gaussian(0.5, dim=2)
    X, y, ms = jnp.ones((3, 1, 4)), jnp.ones((3, 1, 2)), jnp.ones((3, 1), bool)  # 3 minibatches of a row

    def conds():  # in a chunk's scan, one update (bank.update's step) and a prediction
        bank = kalnat.ekf_bank(model, fam, representation=kronecker(params))
        state = bank.init(params)
        programs = (lambda s: bank.scan_chunk(bank.hyper, s, X, y, ms), lambda s: bank.step(bank.hyper, s, X[0], y[0]),
                    lambda s: bank.predict_batch(bank.hyper, s, X[0]))
        return [_conds(jax.make_jaxpr(f)(state).jaxpr) for f in programs], jax.jit(programs[1])(state)
    kept, stepped = conds()
    monkeypatch.setattr(KronLayer, "branches", False)
    vmapped, stepped_vmapped = conds()
    assert all(k > v for k, v in zip(kept, vmapped)), (kept, vmapped)
    for a, b in zip(jax.tree_util.tree_leaves(stepped), jax.tree_util.tree_leaves(stepped_vmapped)):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-300)  # the same update either way
    bank = kalnat.ekf_bank(model, fam, representation=kronecker(params))
    monkeypatch.setattr(bank_module, "GROUP_BYTES", 1)  # members one at a time by force: as many conds as kept
    assert _conds(jax.make_jaxpr(lambda s: bank.scan_chunk(bank.hyper, s, X, y, ms))(bank.init(params)).jaxpr) == kept[0]


def test_kronecker_factored_posterior_holds_for_a_saturated_softmax():
    """One example of a confident 10-class softmax: R = diag(p) − p pᵀ (with the command's floor
    1e-6) has a condition number of ~10⁶ and couples the rows; the factored path, which takes
    the rows whitened by L_R⁻¹ as the general path does, agrees with it (R⁻¹ formed outright
    squared that condition number: a relative difference of 1 in float64)."""
    rng = np.random.default_rng(3)
    n_out, n_in = 9, 8
    rep = KronLayer(n_out, n_in)
    logits = np.r_[rng.uniform(20, 40, 1), rng.normal(size=9)]
    p = np.exp(logits - logits.max())
    p = (p / p.sum())[1:]
    R = np.diag(p) - np.outer(p, p) + 1e-6 * np.eye(n_out)
    abar = np.r_[rng.normal(size=n_in), 1.0]
    mats = [np.outer(rng.normal(size=n_out), abar) for _ in range(n_out)]
    H = np.stack([np.r_[m[:, n_in], m[:, :n_in].ravel()] for m in mats])
    g, a = rng.normal(size=(n_out, n_out)), rng.normal(size=(n_in + 1, n_in + 1))
    prior = kalnat.representations.KronCovariance(jnp.asarray(g @ g.T / n_out + 0.1 * np.eye(n_out)),
                                                  jnp.asarray(a @ a.T / n_in + 0.1 * np.eye(n_in + 1)))
    whitened = jnp.asarray(np.linalg.solve(np.linalg.cholesky(R), H))

    @jax.jit  # one program (op by op, each operation compiled apiece)
    def paths(prior, H, R, whitened):
        post = rep.posterior(prior, H, R, jnp.zeros(n_out), None, jnp.ones(n_out, bool))
        ref = rep._general_posterior(prior, rep._join(*rep._parts(whitened)))
        return rep._outer(whitened)[0], rep._whitened(prior, H, R, None)[0], post, ref

    outer, factored, post, ref = paths(prior, jnp.asarray(H), jnp.asarray(R), whitened)
    assert bool(outer)
    assert bool(factored)  # the factored path
    # 1e-7: the observation is ~10⁶ × the prior's information here, and both paths lose that
    # many units of rounding in the update (they differ by ~6e-9)
    np.testing.assert_allclose(np.kron(post.g, post.a), np.kron(ref.g, ref.a), rtol=1e-7,
                               atol=1e-7 * np.abs(np.kron(ref.g, ref.a)).max())


def test_kronecker_process_noise_is_split_by_the_factors_mean_variances():
    """q I becomes (G + αI) ⊗ (A + βI) with αβ = q and α/β the ratio of G's and A's mean
    variances (K-FAC's split of its damping): never less uncertain than P + q I."""
    rep = KronLayer(2, 3)
    g, a, q = 4.0, 0.25, 0.09
    prior = rep.inflate(kalnat.representations.KronCovariance(g * jnp.eye(2), a * jnp.eye(4)), 1, 1.0, q, None)
    alpha, beta = float(prior.g[0, 0]) - g, float(prior.a[0, 0]) - a
    np.testing.assert_allclose([alpha * beta, alpha / beta], [q, g / a], rtol=1e-12)
    P = np.asarray(prior.dense())
    assert np.all(np.linalg.eigvalsh(P - (g * a + q) * np.eye(8)) >= -1e-12)


def _evidence_problem(rep, family):
    """An EKF over ``rep`` on an MLP from ``kalnat.models.mlp``'s init (its output layer zero, so
    the hidden layer's rows are zero at the first step), its params and 30 rows: ``family``
    ``"gaussian"`` (one output) or ``"categorical"`` (three classes: two outputs)."""
    rng = np.random.default_rng(6)
    X = jnp.asarray(rng.normal(size=(30, 3)))
    z = np.tanh(X @ rng.normal(size=3))
    if family == "gaussian":
        fam, y = kalnat.families.Gaussian(0.1), jnp.asarray(z + 0.2 * rng.normal(size=30))
    else:
        fam, y = kalnat.families.Categorical(3), jnp.asarray(np.digitize(z + 0.3 * rng.normal(size=30), [-0.3, 0.3]))
    model = kalnat.models.mlp(3, (4,), fam.n_outputs)
    params = model.init(jax.random.PRNGKey(0))
    return kalnat.ekf(model, fam, representation=rep(params)), params, X, y


def _evidence_derivative(rep, names, at, direction, family="gaussian", reverse=False):
    """The derivative of the log evidence of :func:`_evidence_problem` in the hyperparameters
    ``names`` at ``at`` along ``direction``, by forward mode (``jax.jvp``: the derivative
    ``jax.grad`` gives, in a program that compiles in a fifth of the time), or with ``reverse``
    by ``jax.grad`` (its own hazards: a root's derivative where it is unused), and by central
    differences (float64)."""
    learner, params, X, y = _evidence_problem(rep, family)
    at, direction = jnp.asarray(at, jnp.float64), jnp.asarray(direction, jnp.float64)

    @jax.jit
    def along(t):
        values = at + t * direction
        return kalnat.log_evidence(learner, learner.hyper._replace(**{n: values[i] for i, n in enumerate(names)}),
                                   params, X, y)

    if reverse:
        derivative = jax.jit(jax.grad(along))(0.0)
    else:
        derivative = jax.jit(lambda: jax.jvp(along, (0.0,), (1.0,))[1])()
    h = 1e-6
    return float(derivative), float((along(h) - along(-h)) / (2 * h))


def test_derivative_of_the_evidence_through_the_kronecker_form_matches_finite_differences():
    """Through forgetting, the prior and the process noise at once; the first step's
    hidden-layer rows are zero (√0 in the factored posterior's Woodbury form had an infinite
    derivative: jax.grad of the evidence was NaN)."""
    derivative, fd = _evidence_derivative(kronecker, ("forgetting", "prior_var", "process_noise"),
                                          (0.95, 0.5, 0.01), (0.01, 0.1, 0.001))
    assert np.isfinite(derivative)
    np.testing.assert_allclose(derivative, fd, rtol=1e-6)


def test_the_kronecker_posteriors_weights_have_a_finite_gradient_at_zero():
    """jax.grad through the factored posterior's Woodbury form at a zero weight (a zero row) is
    finite: the reverse mode multiplies by the root's derivative even where the root is unused,
    which a single where leaves infinite (NaN)."""
    from kalnat.representations.kron import _woodbury

    rng = np.random.default_rng(7)
    d = rng.normal(size=(3, 2))
    y, k = jnp.asarray(rng.normal(size=(2, 4))), jnp.asarray(d.T @ d)
    grad = jax.grad(lambda w: jnp.sum(_woodbury(y, k, 0.7, w) ** 2))(jnp.asarray([0.0, 0.5]))
    assert np.all(np.isfinite(grad))


#: the hyperparameters a derivative through the low-rank form is taken in, its point and direction
_LOW_RANK_DERIVATIVE = (("forgetting", "prior_var", "max_variance"), (0.95, 0.5, 1.0), (0.01, 0.1, 0.05))


@pytest.mark.parametrize("family,rep,reverse", [
    ("gaussian", lambda params: LowRank(2), False),                             # one output: the one-row deflation
    ("categorical", lambda params: last_layer_full(params, LowRank(2)), False),  # two: the (k + m)² Gram's eigenvectors
    ("categorical", lambda params: LowRank(2), True),                           # the same by jax.grad, k < d
])
def test_derivative_of_the_evidence_through_the_low_rank_form_matches_finite_differences(family, rep, reverse):
    """Through forgetting, the prior and the variance bound at once, by forward and by reverse
    mode. The re-projection's eigenvalues repeat (all zero at the prior), where JAX's own
    derivative of the eigendecomposition divides by zero and is NaN; the step depends only on
    the dropped and the kept eigenspaces, whose derivative is finite."""
    derivative, fd = _evidence_derivative(rep, *_LOW_RANK_DERIVATIVE, family, reverse)
    assert np.isfinite(derivative)
    np.testing.assert_allclose(derivative, fd, rtol=1e-6)


@pytest.mark.parametrize("family", ["gaussian", "categorical"])
def test_the_low_rank_forms_gradient_at_rank_at_least_d_is_the_exact_ekfs(family):
    """With k ≥ d (21 and 26 parameters, k = 30) nothing is dropped and the filter is the exact
    EKF: so is the evidence's gradient in the three hyperparameters, the low-rank form's by
    ``jax.grad`` (reverse mode) and the exact filter's by forward mode, to rounding. The dropped
    directions are ones the data do not excite, so this checks that the reverse mode is finite
    and exact where nothing is truncated, not the eigenspaces' derivative itself (the
    finite-difference test above does)."""
    names, at, _ = _LOW_RANK_DERIVATIVE

    def gradient(rep, mode):
        learner, params, X, y = _evidence_problem(rep, family)
        return np.asarray(jax.jit(mode(lambda v: kalnat.log_evidence(
            learner, learner.hyper._replace(**{n: v[i] for i, n in enumerate(names)}), params, X, y)))(
            jnp.asarray(at, jnp.float64)))

    # the exact EKF's by forward mode (its program compiles in a fraction of the reverse one's time)
    exact, low = gradient(lambda params: None, jax.jacfwd), gradient(lambda params: LowRank(30), jax.grad)
    assert np.all(np.abs(exact) > 0.1)  # each hyperparameter matters here (the bound binds, not from the start)
    np.testing.assert_allclose(low, exact, rtol=1e-9)


def test_the_low_rank_form_refuses_a_derivative_through_additive_noise_rather_than_give_nan():
    """Its prediction step with process noise uses every eigenvector of the prior's Gram matrix
    and its eigenvalue, whose repeats (all zero at the prior) leave JAX's derivative NaN: a
    derivative through it is an error that says so, alone or as last-layer's rest."""
    for rep in (lambda params: LowRank(2), lambda params: last_layer_full(params, LowRank(2))):
        with pytest.raises(ValueError, match="the low-rank form's prediction step with additive process noise"):
            _evidence_derivative(rep, ("forgetting", "process_noise"), (0.95, 0.01), (1.0, 0.0))


def test_the_eigenspaces_derivative_is_the_projectors_and_leaves_out_gaps_below_rounding():
    """``_eigenspaces``' derivative moves the projector onto the first ``m`` eigenvectors as
    JAX's own ``eigh`` derivative moves it where the eigenvalues are apart (a rotation within
    either group changes no projector), and where a pair across the split is closer than
    ``10 n ε`` of the largest eigenvalue (here a gap of 1e-320, a denormal) it leaves that pair
    out and stays finite, where dividing by the gap gives infinities and JAX's own derivative is
    not finite."""
    from kalnat.representations.lowrank import _eigenspaces

    rng = np.random.default_rng(3)
    q, _ = np.linalg.qr(rng.normal(size=(4, 4)))
    da = rng.normal(size=(4, 4))
    da = jnp.asarray(da + da.T)

    def projector(eig, m):
        return lambda a: (lambda v: v[:, :m] @ v[:, :m].T)(eig(a)[1])

    apart = jnp.asarray(q @ np.diag([0.0, 0.3, 1.0, 2.0]) @ q.T)
    for m in (1, 2):
        ours = jax.jvp(projector(lambda a: _eigenspaces(a, m), m), (apart,), (da,))[1]
        theirs = jax.jvp(projector(jnp.linalg.eigh, m), (apart,), (da,))[1]
        np.testing.assert_allclose(ours, theirs, rtol=1e-10, atol=1e-12)
    close = jnp.diag(jnp.array([0.0, 1e-320, 1.0, 2.0]))  # the pair (0, 1) across the split at m = 1
    ours = jax.jvp(projector(lambda a: _eigenspaces(a, 1), 1), (close,), (da,))[1]
    assert np.all(np.isfinite(ours))
    theirs = jax.jvp(projector(jnp.linalg.eigh, 1), (close,), (da,))[1]
    assert not np.all(np.isfinite(theirs))
    # the pairs it keeps, (0, 2) and (0, 3), as the eigenvectors' formula gives them
    e = np.asarray(da)
    expected = np.zeros((4, 4))
    for j, lam in ((2, 1.0), (3, 2.0)):
        expected[0, j] = expected[j, 0] = e[j, 0] / (0.0 - lam)
    np.testing.assert_allclose(ours, expected, rtol=1e-12, atol=1e-300)


_LAYERED = {}


def _layered(family, hidden, batch, kind, form="kron"):
    """The same network (``kalnat.models.linear`` with no hidden layer) and form (``"kron"``, or
    ``"full"``: the full covariance, which takes the layers from the model), ``H`` as the
    layers' factors and as a matrix: built once per case (a hypothesis example changes data and
    hyperparameters, not programs). ``kind``: the EKF, the iterated EKF (``H δθ`` from the
    factors) or the normal–inverse-gamma filter over the form."""
    key = (family, hidden, batch, kind, form)
    if key not in _LAYERED:
        fam = FAMILIES[family]
        model = (kalnat.models.mlp(4, hidden, fam.n_outputs) if hidden else kalnat.models.linear(4, fam.n_outputs))
        rep = kronecker(model.init(jax.random.PRNGKey(0))) if form == "kron" else None
        plain = kalnat.models.Model(model.init, model.apply, model.input_shape, model.n_outputs)
        make = {"ekf": lambda m: kalnat.ekf(m, fam, process_noise=0.02, **opts),
                "iterated": lambda m: kalnat.iterated_ekf(m, fam, iterations=3, process_noise=0.02, **opts),
                "nig": lambda m: kalnat.nig_filter(m, fam, iterations=1 if form == "kron" else 2, **opts)}[kind]
        if form == "full":  # the layers a bank gives its iterated members of a linear model
            rep = Full().for_layers(kalnat.representations.groups.dense_layers(model.init(jax.random.PRNGKey(0))))
        opts = dict(prior_var=0.5, representation=rep, forgetting=0.9, max_variance=0.8)
        _LAYERED[key] = (model, make(model), make(plain))
    return _LAYERED[key]


@pytest.mark.parametrize("family,hidden,batch,kind,form", [
    ("categorical", (4, 2), 1, "ekf", "kron"),    # one example a step (a softmax's R mixes its rows): no check
    ("categorical", (3,), 2, "ekf", "kron"),      # groups, whose R couples a minibatch's examples
    ("categorical", (), 3, "ekf", "kron"),        # one layer of two outputs, minibatches: checked at run time
    ("bernoulli", (3,), 2, "iterated", "kron"),   # H δθ from the factors; a one-output layer's rows
    ("gaussian", (3,), 1, "nig", "kron"),
    # the full covariance of an iterated filter: P⁻ J from a linear model's inputs, for one
    # example or several; through the matrix for a network (more widths than rows)
    ("categorical", (), 1, "iterated", "full"),
    ("bernoulli", (), 1, "iterated", "full"),
    ("gaussian", (), 1, "nig", "full"),
    ("categorical", (3,), 1, "iterated", "full"),
    ("categorical", (), 3, "iterated", "full")])
@settings(max_examples=3, deadline=None, derandomize=True)
@given(seed=st.integers(0, 10_000), lam=st.floats(0.8, 1.0), q=st.floats(1e-4, 0.1),
       bound=st.floats(0.3, 5.0))
def test_layer_rows_taken_from_the_model_are_the_flat_rows_of_h(family, hidden, batch, kind, form, seed, lam, q,
                                                                bound):
    """A ``kalnat.models`` network gives the Kronecker form (and the full covariance) each
    layer's rows of ``H`` as their factors ``δ āᵀ`` (``Model.apply_tapped``); the same model as
    a plain function gives ``H`` as a matrix, whose rows the Kronecker form checks and factors
    itself. Both are one filter: the same θ, covariance and log-likelihoods, one row or a
    minibatch at a time (13 rows: a partly masked last minibatch), under the EKF, the iterated
    EKF and the normal–inverse-gamma filter; and the same predictive (``predict``, the form's
    ``quad``)."""
    model, rows, flat = _layered(family, hidden, batch, kind, form)
    assert rows.apply_tapped is not None and flat.apply_tapped is None
    if form == "full":
        widths = hidden + (FAMILIES[family].n_outputs,)
        assert rows.representation.dense_layers == tuple(zip(widths, (4,) + hidden))
    X, y = _stream(family, seed, n=13)
    params = jax.tree_util.tree_map(  # no zero layer: every row of H depends on every layer
        lambda a: a + 0.3 * jnp.asarray(np.random.default_rng(seed).normal(size=a.shape)), model.init(jax.random.PRNGKey(seed)))
    hyper = rows.hyper._replace(forgetting=lam, max_variance=bound, process_noise=None if kind == "nig" else q)
    a = kalnat.fit(flat, flat.init(params), X, y, batch_size=batch, hyper=hyper)
    b = kalnat.fit(rows, rows.init(params), X, y, batch_size=batch, hyper=hyper)
    _agree(a, b, 1e-9)
    pa, pb = flat.predict(a.state, X[:3], hyper=hyper), rows.predict(b.state, X[:3], hyper=hyper)
    for u, v in zip(pa, pb):
        if u is not None:
            np.testing.assert_allclose(v, u, rtol=1e-9, atol=1e-12)


def test_layer_rows_spare_the_step_the_flat_h_its_check_and_its_conds(monkeypatch):
    """What the factors from the model save (benchmarks/kron_step.py times it): with one row a
    step the program forms no row of ``H`` as large as a layer and the Kronecker form branches
    nowhere; given as a plain function, the same model's step forms ``H`` and branches on its
    check in the gain, the projection and the posterior of each layer."""
    model = kalnat.models.mlp(40, (8,))
    params = model.init(jax.random.PRNGKey(0))
    fam = kalnat.families.Bernoulli()
    x, y = jnp.ones((1, 40)), jnp.ones((1,))
    cond, branched = jax.lax.cond, []
    monkeypatch.setattr(jax.lax, "cond", lambda *a, **k: branched.append(1) or cond(*a, **k))

    def step(given):
        learner = kalnat.ekf(given, fam, representation=kronecker(params), input_shape=(40,))
        branched.clear()
        jaxpr = jax.make_jaxpr(lambda s: learner.step(learner.hyper, s, x, y))(learner.init(params)).jaxpr
        return jaxpr, len(branched)

    def rows_of_h(jp):  # arrays of one row at least a hidden layer's weights in size
        for eqn in jp.eqns:
            yield from (v.aval.shape for v in eqn.outvars
                        if v.aval.shape[:1] == (1,) and np.prod(v.aval.shape) >= 8 * 40)
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                yield from rows_of_h(sub)
    (by_rows, n_rows), (by_matrix, n_matrix) = step(model), step(model.apply)
    assert list(rows_of_h(by_rows)) == [] and n_rows == 0
    assert list(rows_of_h(by_matrix)) and n_matrix == 6  # the check can see them


def test_a_models_layers_that_are_not_the_representations_are_refused():
    model = kalnat.models.mlp(4, (3,), 1)
    params = model.init(jax.random.PRNGKey(0))
    one_layer = kalnat.models.Model(model.init, model.apply, (4,), 1,
                                    lambda p, x, taps: (model.apply(p, x) + taps[-1], [x]))
    learner = kalnat.ekf(one_layer, kalnat.families.Gaussian(0.5), representation=kronecker(params))
    with pytest.raises(ValueError, match=r"1 layer inputs of shapes \[\(4,\)\] for 2 dense layers"):
        learner.update(learner.init(params), np.ones(4), 0.5)


def _encoder_decoder(theta_order: bool):
    """A model 3 → 3 → 3 whose two dense layers have the same shapes, with its own
    ``apply_tapped``: θ's order is ``"dec"`` then ``"enc"`` (a dict's keys sorted), the forward
    order the other way round. With ``theta_order`` the taps and inputs are listed in θ's order,
    else in the forward one."""
    def init(key):
        k1, k2 = jax.random.split(key)
        return {"enc": {"w": jax.random.normal(k1, (3, 3)) / 2, "b": jnp.zeros(3)},
                "dec": {"w": jax.random.normal(k2, (3, 3)) / 2, "b": jnp.zeros(3)}}

    def apply_tapped(p, x, taps=None):
        enc, dec = (1, 0) if theta_order else (0, 1)
        tap = (lambda i: 0.0) if taps is None else (lambda i: taps[i])
        h = jnp.tanh(p["enc"]["w"] @ x + p["enc"]["b"] + tap(enc))
        z = p["dec"]["w"] @ h + p["dec"]["b"] + tap(dec)
        return z, ([h, x] if theta_order else [x, h])

    return kalnat.models.Model(init, lambda p, x: apply_tapped(p, x)[0], (3,), 3, apply_tapped)


def test_a_models_own_layer_rows_in_another_order_than_thetas_are_refused(monkeypatch):
    """Two layers of the same shapes listed by ``apply_tapped`` in the forward order, not θ's,
    pass the widths check but would give each layer the other's factors: ``init`` (a learner's,
    a bank's) refuses them, naming θ's layer 0; listed in θ's order, the model learns what it
    learns without ``apply_tapped`` (H as a matrix), to 1e-9. kalnat's own models are not
    checked, unless their ``apply`` was replaced."""
    fam = kalnat.families.Gaussian(0.5, dim=3)
    wrong, right = _encoder_decoder(False), _encoder_decoder(True)
    params = wrong.init(jax.random.PRNGKey(0))
    rep = kronecker(params)
    learner = kalnat.ekf(wrong, fam, representation=rep)
    assert learner.apply_tapped is not None
    with pytest.raises(ValueError, match=r"apply_tapped does not give the Jacobian its apply gives: dense layer 0 "
                                         r"of θ \(W 3 × 3 and its bias, θ\[0:12\]\)"):
        learner.init(params)
    with pytest.raises(ValueError, match="apply_tapped does not give the Jacobian"):
        kalnat.ekf_bank(wrong, fam, representation=rep).init(params)
    rng = np.random.default_rng(4)
    X, y = rng.normal(size=(6, 3)), rng.normal(size=(6, 3))
    plain = kalnat.models.Model(right.init, right.apply, (3,), 3)
    fits = [kalnat.fit(lr, lr.init(params), X, y) for lr in
            (kalnat.ekf(m, fam, representation=rep, prior_var=0.5) for m in (right, plain))]
    np.testing.assert_allclose(fits[0].log_likelihood, fits[1].log_likelihood, rtol=1e-9)
    mlp = kalnat.models.mlp(3, (3,), 3)
    mlp_params = mlp.init(jax.random.PRNGKey(0))
    # mlp's apply_tapped with another apply (inputs scaled): a model's own pair, checked
    scaled = mlp._replace(apply=lambda p, x: mlp.apply(p, x / 255.0))
    with pytest.raises(ValueError, match="apply_tapped does not give the Jacobian its apply gives: dense layer 0"):
        kalnat.ekf(scaled, fam, representation=kronecker(mlp_params)).init(mlp_params)
    from kalnat import linearization
    monkeypatch.setattr(linearization, "check_layer_rows", lambda *a: pytest.fail("kalnat's own model checked"))
    kalnat.ekf(mlp, fam, representation=kronecker(mlp_params)).init(mlp_params)


def test_a_bank_runs_kronecker_members_together_on_one_examples_layer_rows(monkeypatch):
    """One example's rows given as its layers' factors leave the Kronecker step nothing to
    branch on (a layer of ``m`` rows too: they share the example's ``ā``): a bank advances such
    members in vmapped groups, not one at a time, and learns what the bank of the same model
    given as a plain function learns (its members one at a time, each checking its rows)."""
    from kalnat import bank as bank_module
    from kalnat.representations import kron
    mlp = kalnat.models.mlp(4, (3,), 2)
    params = mlp.init(jax.random.PRNGKey(0))
    plain = kalnat.models.Model(mlp.init, mlp.apply, mlp.input_shape, mlp.n_outputs)
    fam = kalnat.families.Gaussian(0.5, dim=2)
    rng = np.random.default_rng(3)
    X, y = rng.normal(size=(7, 4)), rng.normal(size=(7, 2))
    paths = []
    branch = kron._branch
    monkeypatch.setattr(kron, "_branch", lambda ok, *a: paths.append(ok is True) or branch(ok, *a))
    res = {}
    for name, model in (("rows", mlp), ("flat", plain)):
        bank = kalnat.ekf_bank(model, fam, representation=kronecker(params))
        state = bank.init(params)
        group = bank_module.members_per_group(state.members, bank.size, bank.learner, 1)
        assert (group > 1) == (name == "rows"), (name, group)
        assert bank_module.members_per_group(state.members, bank.size, bank.learner, 2) == 1
        paths.clear()
        res[name] = kalnat.fit(bank, state, X, y)
        assert paths and all(paths) == (name == "rows"), (name, paths)  # traced: no cond on rows
    np.testing.assert_allclose(res["rows"].log_likelihood, res["flat"].log_likelihood, rtol=1e-9)
    for a, b in zip(jax.tree_util.tree_leaves(res["rows"].state), jax.tree_util.tree_leaves(res["flat"].state)):
        np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12)


def test_the_kronecker_bounds_split_shrinks_the_layer_least():
    """:func:`kalnat.representations.kron._split_cap`: every ``G_ii A_jj`` within the cap after
    the split ``τ``, ``cap/τ``, and no split on a fine grid keeps more of the layer's log-variances;
    nothing over the cap, nothing changes."""
    from kalnat.representations.kron import _split_cap
    rng = np.random.default_rng(3)
    for n_out, n_in, cap in ((1, 4, 1.0), (3, 5, 0.5), (6, 2, 2.0), (4, 4, 0.1)):
        gd, ad = np.exp(rng.normal(size=n_out)), np.exp(rng.normal(size=n_in))
        tau = float(_split_cap(jnp.asarray(gd), jnp.asarray(ad), cap))
        g2, a2 = np.minimum(gd, tau), np.minimum(ad, cap / tau)
        assert np.all(np.outer(g2, a2) <= cap * (1 + 1e-12))

        def kept(t):
            return np.sum(np.log(np.outer(np.minimum(gd, t), np.minimum(ad, cap / t))))
        grid = np.exp(np.linspace(-8, 8, 20_001))
        assert kept(tau) >= max(kept(t) for t in grid) - 1e-9
    gd, ad = np.array([0.5, 0.2]), np.array([1.0, 1.9])
    tau = float(_split_cap(jnp.asarray(gd), jnp.asarray(ad), 1.0))
    assert np.all(np.minimum(gd, tau) == gd) and np.all(np.minimum(ad, 1.0 / tau) == ad)
