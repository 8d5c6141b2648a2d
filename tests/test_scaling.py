"""Online feature scaling, and the exact re-expression of a filter under a change of scaling."""

import numpy as np
import jax
import jax.extend.core
import jax.numpy as jnp
import pytest

import kalnat
from kalnat import scaling

P_FEAT = 3
FAMILIES = {
    "gaussian": kalnat.families.Gaussian(0.7),
    "bernoulli": kalnat.families.Bernoulli(),
    "categorical": kalnat.families.Categorical(3),
    "poisson": kalnat.families.Poisson(),
}
OLD = (np.array([1.0, -2.0, 0.5]), np.array([2.0, 0.5, 3.0]))
NEW = (np.array([1.4, -1.0, 0.0]), np.array([0.7, 1.5, 4.0]))


def _stream(family, n=40, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, P_FEAT)) * OLD[1] + OLD[0]
    z = ((X - OLD[0]) / OLD[1]) @ np.array([0.8, -0.6, 0.4])
    if family.name == "gaussian":
        y = z + rng.normal(size=n)
    elif family.name == "bernoulli":
        y = (rng.random(n) < 1 / (1 + np.exp(-z))).astype(np.int64)
    elif family.name == "categorical":
        y = np.digitize(z + rng.normal(size=n) * 0.5, [-0.5, 0.5])
    else:
        y = rng.poisson(np.exp(0.5 * z))
    return X, y


def _coords(X, stats):
    return (X - stats[0]) / stats[1]


def _theta(state):
    return np.asarray(jax.flatten_util.ravel_pytree(state.params)[0])


CASES = [(kind, fam) for kind in ("linear", "mlp") for fam in FAMILIES]


@pytest.mark.parametrize("kind,fam", CASES, ids=[f"{k}-{f}" for k, f in CASES])
def test_reexpression_leaves_predictions_and_later_updates_unchanged(kind, fam):
    family = FAMILIES[fam]
    model = (kalnat.models.linear(P_FEAT, family.n_outputs) if kind == "linear"
             else kalnat.models.mlp(P_FEAT, (4,), family.n_outputs))
    learner = kalnat.ekf(model, family, prior_var=0.5)
    X, y = _stream(family)
    first = kalnat.fit(learner, learner.init(model.init(jax.random.PRNGKey(1))),
                       _coords(X[:20], OLD), y[:20])
    # the state is donated by later fits: keep a copy for each branch
    s_old = jax.tree_util.tree_map(jnp.copy, first.state)
    s_new = scaling.reexpress_state(jax.tree_util.tree_map(jnp.copy, first.state), OLD, NEW)
    Zo, Zn = _coords(X[20:], OLD), _coords(X[20:], NEW)
    po, pn = learner.predict(s_old, Zo), learner.predict(s_new, Zn)
    for a, b in ((po.mean, pn.mean), (po.mean_cov, pn.mean_cov), (po.obs_cov, pn.obs_cov)):
        np.testing.assert_allclose(b, a, rtol=1e-9, atol=1e-12 * float(np.max(np.abs(a))))
    # the filter is equivariant: learning on in new coordinates is learning on in the old ones
    ro = kalnat.fit(learner, s_old, Zo, y[20:])
    rn = kalnat.fit(learner, s_new, Zn, y[20:])
    for a, b in ((ro.predictions.mean, rn.predictions.mean),
                 (ro.predictions.mean_cov, rn.predictions.mean_cov)):
        np.testing.assert_allclose(b, a, rtol=1e-9, atol=1e-12 * float(np.max(np.abs(a))))
    back = scaling.reexpress_state(rn.state, NEW, OLD)
    np.testing.assert_allclose(_theta(back), _theta(ro.state), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(kalnat.covariance(back), kalnat.covariance(ro.state), rtol=1e-9, atol=1e-12)


def test_reexpression_of_the_normal_inverse_gamma_filter():
    model = kalnat.models.linear(P_FEAT)
    learner = kalnat.nig_filter(model, FAMILIES["gaussian"], prior_var=2.0)
    X, y = _stream(FAMILIES["gaussian"], seed=3)
    s = kalnat.fit(learner, learner.init(model.init(None)), _coords(X[:25], OLD), y[:25]).state
    s2 = scaling.reexpress_state(jax.tree_util.tree_map(jnp.copy, s), OLD, NEW)
    po, pn = learner.predict(s, _coords(X[25:], OLD)), learner.predict(s2, _coords(X[25:], NEW))
    np.testing.assert_allclose(pn.mean, po.mean, rtol=1e-9)
    np.testing.assert_allclose(pn.obs_cov, po.obs_cov, rtol=1e-9)


@pytest.mark.parametrize("forgetting", [1.0, 0.95])
def test_reexpression_with_prior_is_the_filter_that_saw_the_new_coordinates(forgetting):
    # linear-Gaussian: the filter is the batch posterior, so resetting the prior in the new
    # coordinates gives exactly the filter run there from the start
    model = kalnat.models.linear(P_FEAT)
    learner = kalnat.ekf(model, FAMILIES["gaussian"], prior_var=0.5, forgetting=forgetting)
    X, y = _stream(FAMILIES["gaussian"], n=25, seed=6)
    s_old = kalnat.fit(learner, learner.init(model.init(None)), _coords(X, OLD), y).state
    s_new = kalnat.fit(learner, learner.init(model.init(None)), _coords(X, NEW), y).state
    params, cov = scaling.reexpress_with_prior(s_old.params, kalnat.covariance(s_old), OLD, NEW, 0.5, forgetting ** 25)
    np.testing.assert_allclose(np.asarray(jax.flatten_util.ravel_pytree(params)[0]), _theta(s_new),
                               rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(cov, kalnat.covariance(s_new), rtol=1e-9, atol=1e-14)
    # while the exact re-expression keeps the old prior, and so differs
    exact = scaling.reexpress_state(s_old, OLD, NEW)
    assert np.max(np.abs(kalnat.covariance(exact) - kalnat.covariance(s_new))) > 1e-3


def test_reexpression_needs_a_first_layer_with_bias_for_a_new_centre():
    model = kalnat.models.linear(P_FEAT, bias=False)
    s = kalnat.ekf(model, FAMILIES["bernoulli"]).init(model.init(None))
    with pytest.raises(ValueError, match="bias"):
        scaling.reexpress_state(s, OLD, NEW)
    scaled = scaling.reexpress_state(s, OLD, (OLD[0], NEW[1]))  # a change of scale alone is fine
    assert kalnat.covariance(scaled).shape == kalnat.covariance(s).shape
    with pytest.raises(ValueError, match="must be"):
        scaling.reexpress({"weights": jnp.zeros(3)}, jnp.eye(3), OLD, NEW)


def test_running_statistics_use_earlier_rows_only_in_any_chunking():
    rng = np.random.default_rng(4)
    X = rng.normal(size=(30, 2)) * [1.0, 5.0] + [3.0, -1.0]
    Z, stats = scaling.transform_and_update(scaling.init(2), X)
    for t in (2, 7, 29):
        np.testing.assert_allclose(Z[t], (X[t] - X[:t].mean(0)) / X[:t].std(0), rtol=1e-12)
    np.testing.assert_allclose(Z[1], X[1] - X[0])  # one row: centred, no scale yet
    parts, s = [], scaling.init(2)
    for a, b in ((0, 4), (4, 5), (5, 30)):
        z, s = scaling.transform_and_update(s, X[a:b])
        parts.append(z)
    np.testing.assert_allclose(np.concatenate(parts), Z, rtol=1e-12)
    np.testing.assert_allclose(s.std, X.std(0), rtol=1e-12)
    np.testing.assert_allclose(stats.mean, X.mean(0), rtol=1e-12)


def test_frozen_statistics_stop_after_the_warm_up():
    rng = np.random.default_rng(5)
    X = rng.normal(size=(30, 2)) * [2.0, 0.3]
    Z, fs = scaling.transform_frozen(scaling.init_frozen(2, warmup=10), X)
    Zr, _ = scaling.transform_and_update(scaling.init(2), X[:10])
    np.testing.assert_allclose(Z[:10], Zr)
    np.testing.assert_allclose(Z[10:], (X[10:] - X[:10].mean(0)) / X[:10].std(0), rtol=1e-12)
    assert int(fs.stats.count) == 10
    Z2, _ = scaling.transform_frozen(fs, X[:3])  # later chunks keep the frozen statistics
    np.testing.assert_allclose(Z2, (X[:3] - X[:10].mean(0)) / X[:10].std(0), rtol=1e-12)
    with pytest.raises(ValueError, match="warmup"):
        scaling.init_frozen(2, warmup=1)


# ---- each covariance form moved in its own storage ----------------------------------------

R = kalnat.representations
_FORMS = {
    "full": lambda params: R.Full(),
    "diag": lambda params: R.Diagonal(),
    "blocks": lambda params: R.Blocks.per_leaf(params),   # a bias and its weights in two blocks
    "kron": R.kronecker,
    "lowrank": lambda params: R.LowRank(3),
    "lowrank-exact": lambda params: R.LowRank(100),   # k ≥ d: the exact filter
    "one-block": lambda params: R.Blocks((int(jax.flatten_util.ravel_pytree(params)[0].size),)),
    "nig-kron": R.kronecker,     # the inner form of a normal–inverse-gamma filter
}
_MOVED = {}


def _moved_case(kind, form, bank):
    """A fitted state of ``form`` on a small ``kind`` model (a bank of 2 members or one
    learner), cached: the programs are shared by the tests below."""
    key = (kind, form, bank)
    if key not in _MOVED:
        family = FAMILIES["gaussian" if form.startswith("nig") else "categorical"]
        model = (kalnat.models.linear(P_FEAT, family.n_outputs) if kind == "linear"
                 else kalnat.models.mlp(P_FEAT, (4,), family.n_outputs))
        params = model.init(jax.random.PRNGKey(2))
        rep = _FORMS[form](params)
        if bank:
            learner = kalnat.ekf_bank(model, family, prior_vars=(0.3, 1.0), forgettings=(1.0,),
                                      representation=rep, learner="nig" if form.startswith("nig") else None)
        elif form.startswith("nig"):
            learner = kalnat.nig_filter(model, family, prior_var=0.5, representation=rep)
        else:
            learner = kalnat.ekf(model, family, prior_var=0.5, representation=rep)
        X, y = _stream(family)
        state = kalnat.fit(learner, learner.init(params), _coords(X[:25], OLD), y[:25]).state
        _MOVED[key] = (learner, state, X[25:], y[25:])
    learner, state, X, y = _MOVED[key]
    return learner, jax.tree_util.tree_map(jnp.copy, state), X, y


@pytest.mark.parametrize("kind", ["linear", "mlp"])
@pytest.mark.parametrize("form", ["full", "diag", "blocks", "one-block", "kron", "nig-kron", "lowrank-exact"])
def test_a_form_moves_in_its_storage_as_its_dense_matrix_would(kind, form):
    """θ' = Aθ, and the moved covariance is ``with_dense(A P Aᵀ)``, to rounding: exactly
    ``A P Aᵀ`` for the full and Kronecker forms (the layer's rows all move by one ``Tᵀ``), one
    block and the low-rank precision of rank ≥ d, its diagonal and blocks for the others
    (blocks: a bias and its weights, coupled by the move, are moved together)."""
    _, state, _, _ = _moved_case(kind, form, bank=False)
    A = scaling.reexpression_matrix(state.params, OLD, NEW)

    @jax.jit  # one program (op by op, each operation of each shape compiled apiece)
    def moved(state):
        P = state.cov.dense()
        return P, state.cov.with_dense(A @ P @ A.T).dense(), scaling.reexpress_members(state, OLD, NEW, bank=False)

    P, expected, got = moved(state)
    P, expected = np.asarray(P), np.asarray(expected)
    np.testing.assert_allclose(_theta(got), A @ _theta(state), rtol=1e-12, atol=1e-14)
    # the low-rank form of rank ≥ d goes through P⁻¹, whose floor on υ (√ε Λ_ii,
    # kalnat.representations.lowrank) leaves it ill-conditioned: agreement to ~1e-7
    rtol, atol = (1e-6, 1e-7) if form == "lowrank-exact" else (1e-10, 1e-13)
    np.testing.assert_allclose(np.asarray(got.cov.dense()), expected, rtol=rtol, atol=atol * np.abs(expected).max())
    if form in ("full", "one-block", "kron", "nig-kron", "lowrank-exact"):
        np.testing.assert_allclose(np.asarray(got.cov.dense()), A @ P @ A.T, rtol=rtol, atol=atol * np.abs(P).max())


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_a_kronecker_state_moved_predicts_and_learns_as_before(kind):
    """The Kronecker form is moved exactly: in the new coordinates the predictions (means and
    their variances) and everything learned afterwards are those of the old ones."""
    learner, state, X, y = _moved_case(kind, "kron", bank=False)
    s_old = jax.tree_util.tree_map(jnp.copy, state)
    s_new = scaling.reexpress_members(state, OLD, NEW, bank=False)
    Zo, Zn = _coords(X, OLD), _coords(X, NEW)
    ro, rn = kalnat.fit(learner, s_old, Zo, y), kalnat.fit(learner, s_new, Zn, y)
    for a, b in ((ro.predictions.mean, rn.predictions.mean), (ro.predictions.mean_cov, rn.predictions.mean_cov),
                 (ro.log_likelihood, rn.log_likelihood)):
        np.testing.assert_allclose(b, a, rtol=1e-9, atol=1e-12 * float(np.max(np.abs(a))))


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_a_low_rank_precision_moved_keeps_its_rank_part_and_its_diagonal(kind):
    """``Λ' = A⁻ᵀ Λ A⁻¹`` with ``Λ = diag(υ) + W Wᵀ``: ``W' = A⁻ᵀ W`` exactly and ``υ'`` the
    diagonal of ``A⁻ᵀ diag(υ) A⁻¹``, so the diagonal of the precision is that of the exact
    ``Λ'`` (the coupling of a row's bias and weights is what is dropped)."""
    _, state, _, _ = _moved_case(kind, "lowrank", bank=False)
    Binv_t = np.linalg.inv(scaling.reexpression_matrix(state.params, OLD, NEW)).T     # A⁻ᵀ
    ups, w = (np.asarray(a) for a in state.cov)
    got = scaling.reexpress_members(state, OLD, NEW, bank=False)
    np.testing.assert_allclose(np.asarray(got.cov.w), Binv_t @ w, rtol=1e-12, atol=1e-14 * np.abs(w).max())
    exact = Binv_t @ (np.diag(ups) + w @ w.T) @ Binv_t.T
    lam = np.asarray(got.cov.ups) + np.sum(np.asarray(got.cov.w) ** 2, axis=1)
    np.testing.assert_allclose(lam, np.diagonal(exact), rtol=1e-12)


def test_a_bank_moves_every_member_in_its_form_and_leaves_a_diverged_one():
    """A bank's members move together (one vmap), each as it would alone; a member that is not
    finite is left as it was."""
    _, state, _, _ = _moved_case("mlp", "kron", bank=True)
    members = state.members
    broken = jax.tree_util.tree_map(lambda a: a.at[1].set(jnp.nan) if jnp.issubdtype(a.dtype, jnp.floating) else a,
                                    members.cov)
    state = state._replace(members=members._replace(cov=broken))
    got = scaling.reexpress_members(state, OLD, NEW, bank=True)
    A = scaling.reexpression_matrix(jax.tree_util.tree_map(lambda a: a[0], members.params), OLD, NEW)
    first = jax.tree_util.tree_map(lambda a: a[0], members)
    np.testing.assert_allclose(np.asarray(jax.tree_util.tree_map(lambda a: a[0], got.members.cov).dense()),
                               A @ np.asarray(first.cov.dense()) @ A.T, rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(_theta(jax.tree_util.tree_map(lambda a: a[0], got.members)), A @ _theta(first),
                               rtol=1e-12, atol=1e-14)
    for a, b in zip(jax.tree_util.tree_leaves(jax.tree_util.tree_map(lambda a: a[1], got.members)),
                    jax.tree_util.tree_leaves(jax.tree_util.tree_map(lambda a: a[1], state.members))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_a_banks_move_is_one_compiled_program_whatever_the_coordinates(compiled_programs):
    """reexpress_members compiles one program for a model's layout and a bank's forms (T and
    T⁻¹ its arguments), where its operations run one by one (before commit fd80951) compiled
    44 programs at a new layout (60 with the prior set afresh; ~0.4 s a move in the command):
    this test, run against that code, counts [44, 0, 60, 0]; later moves to other coordinates
    compile nothing."""
    family = FAMILIES["categorical"]
    model = kalnat.models.mlp(P_FEAT, (13,), family.n_outputs)  # a layout no other test moves
    params = model.init(jax.random.PRNGKey(0))
    learner = kalnat.ekf_bank(model, family, prior_vars=(0.3, 1.0), forgettings=(1.0,),
                              representation=R.kronecker(params))
    state = learner.init(params)
    priors = scaling.fresh_priors(learner.hyper, state, bank=True)
    counts = []
    for old, new, with_prior in [(OLD, NEW, False), (NEW, OLD, False), (OLD, NEW, True), (NEW, OLD, True)]:
        with compiled_programs() as compiled:
            jax.block_until_ready(scaling.reexpress_members(state, old, new, bank=True,
                                                            priors=priors if with_prior else None))
        counts.append(len(compiled))
    # (at least one: a rerun in the same process, which finds every program made, fails too)
    assert 1 <= counts[0] <= 2 and 1 <= counts[2] <= 2 and counts[1] == counts[3] == 0, counts


@pytest.mark.parametrize("form", ["diag", "kron", "lowrank"])
def test_a_structured_form_moves_without_a_d_by_d_array(form):
    """The move of a structured state, with or without a new prior, forms no array as large as
    ``d × d`` (its program's shapes, inner programs included), where the dense route forms
    several."""
    family = FAMILIES["categorical"]
    model = kalnat.models.mlp(P_FEAT, (40,), family.n_outputs)
    params = model.init(jax.random.PRNGKey(0))
    d = int(jax.flatten_util.ravel_pytree(params)[0].size)
    learner = kalnat.ekf(model, family, prior_var=0.5, representation=_FORMS[form](params))
    state = learner.init(params)
    move = scaling.layer_move(params, OLD, NEW)
    from kalnat.representations.moves import moved

    theta = jax.flatten_util.ravel_pytree(params)[0]

    def sizes(jaxpr):
        for eqn in jaxpr.eqns:
            yield from (int(np.prod(v.aval.shape)) for v in eqn.outvars)
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                yield from sizes(sub)

    def largest(f):
        return max(sizes(jax.make_jaxpr(f)(state.cov).jaxpr))

    assert largest(lambda c: moved(c, move)) < d * d // 10
    assert largest(lambda c: c.moved_with_prior(move, theta, 2.0)) < d * d // 10
    assert largest(lambda c: c.with_dense(move.congruence(c.dense()))) >= d * d


def _dense_route_with_prior(state, prior_var, weight, old=OLD, new=NEW):
    """:func:`scaling.reexpress_with_prior` on the dense matrix, back in the state's form."""
    params, cov = scaling.reexpress_with_prior(state.params, np.asarray(state.cov.dense()), old, new, prior_var, weight)
    return _theta(state._replace(params=params)), np.asarray(state.cov.with_dense(cov).dense())


@pytest.mark.parametrize("form", ["diag", "kron", "nig-kron", "lowrank-exact"])
@pytest.mark.parametrize("prior_var", [0.5, 1e-7])
def test_a_form_sets_the_prior_afresh_in_its_storage_as_the_dense_route_does(form, prior_var):
    """With the prior reset (``reprior``), a diagonal or Kronecker state of a linear model
    moves in its own storage to what the dense route (``reexpress_with_prior``, then the form's
    ``with_dense``) gives, to rounding (a low-rank precision of rank ≥ d takes that route). A
    tiny prior variance makes the new information indefinite, and both fall back to the exact
    move."""
    _, state, _, _ = _moved_case("linear", form, bank=False)
    weight = 0.8
    theta, dense = _dense_route_with_prior(state, prior_var, weight)
    got = scaling.reexpress_members(state, OLD, NEW, bank=False, priors=([prior_var], [weight]))
    np.testing.assert_allclose(_theta(got), theta, rtol=1e-10, atol=1e-12 * np.abs(theta).max())
    np.testing.assert_allclose(np.asarray(got.cov.dense()), dense, rtol=1e-9, atol=1e-12 * np.abs(dense).max())


def test_a_low_rank_precision_sets_the_prior_afresh_on_its_data_part():
    """``reprior`` for the low-rank precision: its data part ``Λ − cI`` moved as
    :func:`test_a_low_rank_precision_moved_keeps_its_rank_part_and_its_diagonal` says, the
    prior ``cI`` added afresh (``c = ρ/v``), and θ' exactly the dense computation's (the exact
    new information's solve of the moved information vector ``A⁻ᵀ Λ θ``)."""
    _, state, _, _ = _moved_case("linear", "lowrank", bank=False)
    v, rho = 0.5, 0.8
    c = rho / v
    Binv_t = np.linalg.inv(scaling.reexpression_matrix(state.params, OLD, NEW)).T     # A⁻ᵀ
    ups, w = (np.asarray(a) for a in state.cov)
    got = scaling.reexpress_members(state, OLD, NEW, bank=False, priors=([v], [rho]))
    np.testing.assert_allclose(np.asarray(got.cov.w), Binv_t @ w, rtol=1e-12, atol=1e-14 * np.abs(w).max())
    np.testing.assert_allclose(np.asarray(got.cov.ups), np.diagonal(Binv_t @ np.diag(ups - c) @ Binv_t.T) + c,
                               rtol=1e-12)
    theta, _ = _dense_route_with_prior(state, v, rho)
    np.testing.assert_allclose(_theta(got), theta, rtol=1e-10, atol=1e-12 * np.abs(theta).max())
    # a tiny prior variance: the new information is indefinite, and both take the exact move
    theta, _ = _dense_route_with_prior(state, 1e-7, rho)
    got = scaling.reexpress_members(state, OLD, NEW, bank=False, priors=([1e-7], [rho]))
    np.testing.assert_allclose(_theta(got), theta, rtol=1e-10, atol=1e-12 * np.abs(theta).max())


def test_a_bank_sets_each_members_prior_afresh_in_its_storage():
    """A bank's members (their own ``v`` and ``ρ``) move together, each as the dense route
    moves it alone."""
    _, state, _, _ = _moved_case("linear", "kron", bank=True)
    priors = (np.array([0.3, 1.0]), np.array([0.9, 0.6]))
    one = lambda s, k: jax.tree_util.tree_map(lambda a: a[k], s)  # noqa: E731
    expected = [_dense_route_with_prior(one(state.members, k), priors[0][k], priors[1][k]) for k in range(2)]
    got = scaling.reexpress_members(state, OLD, NEW, bank=True, priors=priors)
    for k, (theta, dense) in enumerate(expected):
        member = one(got.members, k)
        np.testing.assert_allclose(_theta(member), theta, rtol=1e-10, atol=1e-12 * np.abs(theta).max())
        np.testing.assert_allclose(np.asarray(member.cov.dense()), dense, rtol=1e-9, atol=1e-12 * np.abs(dense).max())


def test_the_hosts_re_expression_runs_its_blas_on_one_thread(monkeypatch):
    """The full covariance's prior set afresh on the host (inverses of d × d matrices) runs
    NumPy's and SciPy's BLAS on one thread: with the machine's cores busy, OpenBLAS's threads
    stall each other (kalnat.blas). The test's own limit is two threads."""
    threadpoolctl = pytest.importorskip("threadpoolctl")
    _, state, _, _ = _moved_case("linear", "full", bank=True)
    seen, inverse = [], scaling._spd_inverse
    blas = lambda: {i["num_threads"] for i in threadpoolctl.threadpool_info() if i["user_api"] == "blas"}  # noqa: E731

    def recording(M):
        seen.append(blas())
        return inverse(M)

    monkeypatch.setattr(scaling, "_spd_inverse", recording)
    with threadpoolctl.threadpool_limits(limits=2, user_api="blas"):
        if blas() == {1}:
            pytest.skip("NumPy's BLAS runs on one thread here whatever the limit")
        scaling.reexpress_members(state, OLD, NEW, bank=True, priors=(np.array([0.3, 1.0]), np.array([0.9, 0.6])))
        params, cov = state.members.params, np.asarray(state.members.cov.dense())
        scaling.reexpress_with_prior(jax.tree_util.tree_map(lambda a: a[0], params), cov[0], OLD, NEW, 0.3, 0.9)
        outside = blas()
    assert len(seen) == 6 and all(s == {1} for s in seen), seen
    assert outside != {1}  # the limit is the re-expression's own, and ends with it
