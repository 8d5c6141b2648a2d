"""kalnat.river: river's own estimator checks, growing features, the predictive distribution."""

import re

import numpy as np
import pytest

river = pytest.importorskip("river")
from river import checks  # noqa: E402

import kalnat  # noqa: E402
from kalnat.river import KalmanClassifier, KalmanRegressor, grow  # noqa: E402

MODELS = [KalmanClassifier(method="ekf"), KalmanRegressor(method="ekf")]
CHECKS = [(model, check) for model in MODELS for check in checks.yield_checks(model)
          if check.__name__ not in model._unit_test_skips()]


@pytest.mark.parametrize("model,check", CHECKS,
                         ids=[f"{type(m).__name__}-{c.__name__}-{i}" for i, (m, c) in enumerate(CHECKS)])
def test_river_checks(model, check):
    check(model.clone())


def _stream(n=40, p=12, seed=0):
    """Rows whose features arrive a few at a time (feature j from row 3j on)."""
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, p))
    for j in range(p):
        X[: 3 * j, j] = 0.0
    y = X @ rng.normal(size=p) + 0.1 * rng.normal(size=n)
    rows = [{f"f{j}": X[i, j] for j in range(p) if i >= 3 * j} for i in range(n)]
    return X, y, rows


def test_growing_is_the_filter_that_always_had_the_features():
    """Features arriving mid-stream, past the first capacity (8): without forgetting the filter
    equals kalnat.ekf run from the start on all of them, each 0 until it arrived."""
    X, y, rows = _stream()
    reg = KalmanRegressor(method="ekf", prior_var=0.7)
    for x, t in zip(rows, y):
        reg.learn_one(x, t)
    model = kalnat.models.linear(12)
    learner = kalnat.ekf(model, kalnat.families.Gaussian(1.0), prior_var=0.7)
    state = kalnat.fit(learner, learner.init(model.init(None)), X, y).state
    rng = np.random.default_rng(1)
    for z in rng.normal(size=(5, 12)):
        ref = learner.predict(state, z)
        got = reg.predict_one({f"f{j}": z[j] for j in range(12)}, with_dist=True)
        np.testing.assert_allclose(got.mu, float(ref.mean[0]), rtol=1e-10)
        np.testing.assert_allclose(got.sigma, np.sqrt(float(ref.obs_cov[0, 0])), rtol=1e-10)


@pytest.mark.parametrize("covariance", ["diag", "lowrank:2"])
def test_a_feature_arriving_late_is_the_feature_there_as_0_from_the_start(covariance):
    """A structured form grows as the full covariance does: a feature arriving at row 10 gives
    the filter that had it from the start, as 0 until then (a low-rank precision re-laid in its
    own storage; through the dense P its with_dense kept only its top directions)."""
    rng = np.random.default_rng(1)
    X = rng.normal(size=(30, 3))
    y = X @ np.array([1.0, -2.0, 0.5]) + 0.1 * rng.normal(size=30)
    late, there = (KalmanRegressor(method="ekf", covariance=covariance) for _ in range(2))
    for i in range(30):
        late.learn_one({"a": X[i, 0], "b": X[i, 1], **({"c": X[i, 2]} if i >= 10 else {})}, y[i])
        there.learn_one({"a": X[i, 0], "b": X[i, 1], "c": X[i, 2] if i >= 10 else 0.0}, y[i])
    q = {"a": 1.0, "b": 1.0, "c": 1.0}
    a, b = late.predict_one(q, with_dist=True), there.predict_one(q, with_dist=True)
    np.testing.assert_allclose([a.mu, a.sigma], [b.mu, b.sigma], rtol=1e-10)


def _shapes(jaxpr):
    """The shapes of every value a jaxpr computes, at any depth."""
    import jax.extend

    out = {tuple(v.aval.shape) for eqn in jaxpr.eqns for v in eqn.outvars}
    for eqn in jaxpr.eqns:
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            out |= _shapes(sub)
    return out


@pytest.mark.parametrize("method", ["ekf", "auto"])  # auto: a bank (grown by a vmap) of NIG filters
@pytest.mark.parametrize("covariance", ["diag", "blocks", "lowrank:2", "last-layer:2", "kron"])
def test_growth_relays_each_form_in_its_own_storage_without_a_d_by_d_array(covariance, method, monkeypatch):
    """A network's structured covariance grows past its first capacity (8 features) block by
    block in its own form: the grow program holds no d' × d' array (d' the parameters at the new
    capacity), and, but for Kronecker factors (which take a layer's nearest product), the grown
    covariance is the rule's exactly: the kept coordinates' P, the template's prior on the
    fresh ones, nothing between them."""
    import jax
    from kalnat import river as kriver

    seen = []
    name = "_grow_bank" if method == "auto" else "_grow_core"
    real = getattr(kriver, name)

    def spied(state, template, index):
        shapes = _shapes(jax.make_jaxpr(real)(state, template, index).jaxpr)
        members = (lambda s: s.members) if method == "auto" else (lambda s: s)
        lead = 1 if method == "auto" else 0  # a bank's leaves carry the members' axis
        d = sum(int(np.prod(a.shape[lead:])) for a in jax.tree_util.tree_leaves(members(template).params))
        out = real(state, template, index)
        # the dense forms now (a bank's first member): the states are donated to the next update
        dense = [members(s).cov for s in (state, template, out)]
        if method == "auto":
            dense = [jax.tree_util.tree_map(lambda a: a[0], c) for c in dense]
        seen.append((d, np.asarray(index), shapes, *(np.asarray(c.dense()) for c in dense)))
        return out

    monkeypatch.setattr(kriver, name, spied)
    reg = KalmanRegressor(hidden=(3,), method=method, covariance=covariance)
    rng = np.random.default_rng(3)
    for i in range(12):  # 8 features, then 10
        reg.learn_one({f"x{j}": rng.normal() for j in range(8 if i < 6 else 10)}, rng.normal())
    assert len(seen) == 2  # the capacity doubled, then the new columns' prior set afresh
    for d, index, shapes, P, P0, grown in seen:
        assert (d, d) not in shapes, covariance
        if covariance == "kron":
            continue
        keep, i = index >= 0, np.where(index >= 0, index, 0)
        expected = np.where(keep[:, None] & keep[None, :], P[i][:, i],
                            np.where(keep[:, None] | keep[None, :], 0.0, P0))
        np.testing.assert_allclose(grown, expected, rtol=1e-10, atol=1e-14)


def test_auto_covariance_growing_past_its_full_size_takes_the_low_rank_form():
    """covariance="auto" is full up to 1 024 parameters and low rank beyond: growth across that
    size lays the grown P in the new form (it kept the full form, which the next update, built
    for the low-rank one, could not read)."""
    rng = np.random.default_rng(0)
    reg = KalmanRegressor(method="ekf", covariance="auto")
    for n in (300, 300, 600, 600):
        reg.learn_one({f"x{j}": rng.normal() for j in range(n)}, rng.normal())
    assert type(reg._state.cov).__name__ == "LowRankPrecision"
    assert np.isfinite(reg.predict_one({f"x{j}": 0.1 for j in range(600)}))


def test_a_divergence_in_learn_many_resets_the_model(monkeypatch):
    """kalnat.fit's Diverged (raised without predictions too) consumed the state: river's
    message, and the model back at its prior, rather than a consumed state's error later."""
    pd = pytest.importorskip("pandas")
    reg = KalmanRegressor(method="ekf")
    reg.learn_one({"a": 1.0}, 1.0)

    def diverging(*args, **kwargs):
        raise kalnat.Diverged("the learner diverged", 2)
    monkeypatch.setattr(kalnat, "fit", diverging)
    with pytest.raises(ValueError, match=r"diverged at row 2 \(from 0\) of this learn_many, and the model is reset"):
        reg.learn_many(pd.DataFrame({"a": [1.0, 2.0, 3.0]}), pd.Series([1.0, 2.0, 3.0]))
    monkeypatch.undo()
    assert reg._state is None and np.isfinite(reg.predict_one({"a": 1.0}))


def test_learn_many_is_learn_one():
    pd = pytest.importorskip("pandas")
    X, y, rows = _stream(n=24, p=10)
    one = KalmanRegressor(method="ekf")
    for x, t in zip(rows, y):
        one.learn_one(x, t)
    many = KalmanRegressor(method="ekf")
    for i in range(0, 24, 8):
        many.learn_many(pd.DataFrame(rows[i:i + 8]), pd.Series(y[i:i + 8]))
    queries = pd.DataFrame(rows[-4:])
    np.testing.assert_allclose(many.predict_many(queries), [one.predict_one(x) for x in rows[-4:]], rtol=1e-10)


@pytest.mark.parametrize("covariance", ["full", "diag", "blocks"])
@pytest.mark.parametrize("method", ["ekf", "auto"])
def test_a_new_feature_gets_a_fresh_prior(method, covariance):
    """Under forgetting an unused column's variance winds up (to the bound); when its feature
    arrives its coordinates are back at the prior, uncorrelated with the rest."""
    settings = dict(prior_var=0.5, forgetting=0.9) if method == "ekf" else {}
    reg = KalmanRegressor(hidden=(3,), method=method, covariance=covariance, **settings)
    rng = np.random.default_rng(2)
    for _ in range(30):
        reg.learn_one({"a": rng.normal(), "b": rng.normal()}, rng.normal())
    reg.learn_one({"a": 0.0, "b": 0.0, "c": 0.0}, 0.0)   # "c" arrives as 0: nothing learned about it
    state, learner = reg._state, reg._learner
    members = [state] if method == "ekf" else [learner.member_state(state, k) for k in range(learner.size)]
    priors = [0.5] if method == "ekf" else list(np.asarray(learner.hyper.prior_var))
    lams = [0.9] if method == "ekf" else list(np.asarray(learner.hyper.forgetting))
    d, w, _ = reg._layout(reg._key[1])
    c = w[:, reg._columns["c"]]
    others = np.setdiff1d(np.arange(d), c)
    for s, v, lam in zip(members, priors, lams):
        P = kalnat.covariance(s)
        # the prior, then one prediction step (P/λ) and an update that does not touch it
        np.testing.assert_allclose(P[np.ix_(c, c)], v / lam * np.eye(len(c)), rtol=1e-12, atol=1e-15)
        np.testing.assert_array_equal(P[np.ix_(c, others)], 0.0)


@pytest.mark.parametrize("covariance,hidden", [("diag", None), ("blocks", None), ("kron", None),
                                               ("last-layer:2", (3,))])
def test_features_past_the_first_capacities_keep_learning(covariance, hidden):
    """New features double the model's capacity (8, then 16 columns at the 9th feature): the
    growth re-expresses the structured covariance at the new size (a diagonal's variances are
    padded to 8 lanes; the Kronecker factors and a network's groups take the new sizes)."""
    reg = KalmanRegressor(covariance=covariance, method="ekf", prior_var=1.0, hidden=hidden)
    rng = np.random.default_rng(5)
    for i in range(12):
        x = {f"f{j}": rng.normal() for j in range(i + 1)}
        reg.learn_one(x, sum(x.values()))
    d, _, _ = reg._layout(reg._key[1])
    assert kalnat.covariance(reg._state).shape == (d, d)
    assert np.isfinite(reg.predict_one(x))


def test_grow_moves_theta_and_covariance():
    """grow: kept coordinates carry θ and P over (permuted), fresh ones get the template's."""
    model = kalnat.models.linear(3)
    learner = kalnat.ekf(model, kalnat.families.Gaussian(1.0))
    rng = np.random.default_rng(3)
    state = kalnat.fit(learner, learner.init(model.init(None)), rng.normal(size=(10, 3)), rng.normal(size=10)).state
    big = kalnat.models.linear(5)
    template = kalnat.ekf(big, kalnat.families.Gaussian(1.0), prior_var=2.0).init(big.init(None))
    index = np.array([0, 3, -1, 1, -1, 2])  # b, then w's 5 columns: two fresh
    out = grow(state, template, index)
    P, Pn = kalnat.covariance(state), kalnat.covariance(out)
    keep = index >= 0
    np.testing.assert_array_equal(Pn[np.ix_(keep, keep)], P[np.ix_(index[keep], index[keep])])
    np.testing.assert_array_equal(Pn[np.ix_(~keep, ~keep)], 2.0 * np.eye(2))
    np.testing.assert_array_equal(Pn[np.ix_(keep, ~keep)], 0.0)
    theta = np.concatenate([np.asarray(state.params["b"]), np.asarray(state.params["w"]).ravel()])
    new = np.concatenate([np.asarray(out.params["b"]), np.asarray(out.params["w"]).ravel()])
    np.testing.assert_array_equal(new, np.where(keep, theta[np.maximum(index, 0)], 0.0))


def test_multiclass_and_bad_input():
    clf = KalmanClassifier(method="ekf", classes=("x", "y", "z"))
    rng = np.random.default_rng(4)
    for _ in range(30):
        a = rng.normal()
        clf.learn_one({"a": a}, "x" if a < -0.5 else ("y" if a < 0.5 else "z"))
    p = clf.predict_proba_one({"a": 2.0})
    assert set(p) == {"x", "y", "z"} and max(p, key=p.get) == "z"
    with pytest.raises(ValueError, match="not one of the classes"):
        clf.learn_one({"a": 1.0}, "w")
    with pytest.raises(ValueError, match=re.escape("label 'w' is not one of the classes ['x', 'y', 'z']")):
        clf.learn_one({"a": 1.0}, np.str_("w"))   # (not np.str_('w'))
    with pytest.raises(ValueError, match=re.escape("label 2: without classes=")):
        KalmanClassifier(method="ekf").learn_one({"a": 1.0}, np.int64(2))
    with pytest.raises(ValueError, match=re.escape("classes must be a list of labels, got the string 'xy'")):
        KalmanClassifier(classes="xy")   # (read as ['x', 'y'])
    with pytest.raises(ValueError, match="take numbers"):
        clf.learn_one({"a": "red"}, "x")
    with pytest.raises(ValueError, match="method must be one of"):
        KalmanRegressor(method="adam")
    with pytest.raises(ValueError, match=r"classes must be at least 2 distinct labels, got \('x', 'x'\)"):
        KalmanClassifier(classes=("x", "x"))
    with pytest.raises(ValueError, match="noise_var must be a positive number, got -1"):
        KalmanRegressor(noise_var=-1)
    pd = pytest.importorskip("pandas")   # learn_many's frame: a column with an infinite value
    with pytest.raises(ValueError, match="feature 'a' has an infinite value"):
        clf.learn_many(pd.DataFrame({"a": [1.0, np.inf]}), pd.Series(["x", "y"]))
    # binary without classes=: True/False or 1/0 (None as False, as river's own); a string or −1
    # was read by its truth (every label True), now refused before anything is learned
    binary = KalmanClassifier(method="ekf")
    for y in (True, False, 1, 0, np.int64(1), np.bool_(False), 1.0, None):
        binary.learn_one({"a": 1.0}, y)
    for y in ("spam", -1, 2, 0.5):
        with pytest.raises(ValueError, match=r"give classes=\[…\]"):
            binary.learn_one({"a": 1.0}, y)
    assert binary._state.count == 8


def test_bad_rows_are_refused_before_anything_changes():
    reg = KalmanRegressor(method="ekf")
    reg.learn_one({}, 1.0)                               # a first row without features: the intercept
    with pytest.raises(ValueError, match="'a' is nan"):
        reg.learn_one({"a": float("nan")}, 1.0)
    with pytest.raises(ValueError, match="finite number"):
        reg.learn_one({"b": 1.0}, float("inf"))
    assert reg._columns == {}
    assert reg.predict_one({"a": 3.0}) == pytest.approx(0.5)   # the posterior mean of the intercept
    pd = pytest.importorskip("pandas")   # learn_many: a column of text, a NaN target, each named
    with pytest.raises(ValueError, match=re.escape("feature 'a' is not numeric (dtype ")):
        reg.learn_many(pd.DataFrame({"a": ["x", "y"]}), pd.Series([1.0, 2.0]))   # (NumPy's "could not convert")
    with pytest.raises(ValueError, match=re.escape("the target must be finite numbers, got nan at row 1 (from 0) "
                                                   "of this learn_many")):   # (it offered skip_bad_rows=True)
        reg.learn_many(pd.DataFrame({"a": [1.0, 2.0]}), pd.Series([1.0, np.nan]))
    with pytest.raises(ValueError, match=re.escape("the target must be finite numbers, got 'high' in this learn_many")):
        reg.learn_many(pd.DataFrame({"a": [1.0, 2.0]}), pd.Series([1.0, "high"]))
    assert reg._columns == {} and reg.predict_one({"a": 3.0}) == pytest.approx(0.5)


def test_feature_order_does_not_matter_to_the_bank():
    """river's shuffle check on the default (a bank of normal–inverse-gamma filters) with raw
    TrumpApproval features (a date near 7·10⁵): the features of a row take columns in a
    canonical order, so the arithmetic is the same whatever order the dict lists them in."""
    from river import datasets
    from river.checks.common import check_shuffle_features_no_impact

    check_shuffle_features_no_impact(KalmanRegressor(), datasets.TrumpApproval().take(200))


@pytest.mark.parametrize("corrupt", ["negative variance", "nan"])
def test_a_diverged_filter_is_told_at_the_next_prediction_not_returned_as_nan(corrupt):
    """A full covariance that lost positive definiteness (the EKF in float32 on unscaled
    features: TrumpApproval's raw rows did it at the first row) predicted a negative variance,
    then NaN; river's Gaussian took the square root of the negative variance as a complex σ."""
    import pandas as pd

    reg = KalmanRegressor(method="ekf")
    for i in range(5):
        reg.learn_one({"a": float(i), "b": 1.0}, 0.5 * i)
    assert np.isfinite(reg.predict_one({"a": 1.0, "b": 1.0}))
    p = reg._state.cov.p
    reg._state = reg._state._replace(cov=reg._state.cov._replace(p=-10 * np.eye(len(p)) if corrupt == "negative variance" else p * np.nan))
    for predict in (lambda: reg.predict_one({"a": 1.0, "b": 1.0}, with_dist=True),
                    lambda: reg.predict_many(pd.DataFrame({"a": [1.0], "b": [1.0]}))):
        with pytest.raises(ValueError, match="diverged"):
            predict()
