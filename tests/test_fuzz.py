"""Property-based fuzzing of the public boundary (issue: reliability).

Random shapes, dtypes and values — NaN, inf, labels outside the family's domain, negative or
fractional counts, non-positive-definite priors — go into ``init``, ``update``, ``predict`` and
``fit`` of several learners and families. An independent oracle says whether the input is
valid: if it is, the call must succeed with a finite result; if not, it must raise a
``ValueError``, never another exception, and the state passed in must be left as it was (same
values, still usable).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import kalnat
from kalnat import families as F

P_IN = 3
MODEL = kalnat.models.linear(P_IN)
PARAMS = MODEL.init(None)
FAMILIES = {
    "gaussian": F.Gaussian(0.5),
    "bernoulli": F.Bernoulli(),
    "categorical": F.Categorical(3),
    "poisson": F.Poisson(),
}


def _make(kind, family):
    if family.name == "categorical":
        model = kalnat.models.linear(P_IN, 2)
    else:
        model = MODEL
    if kind == "ekf":
        return model, kalnat.ekf(model, family, forgetting=0.99)
    if kind == "joseph":
        return model, kalnat.ekf(model, family, joseph=True)
    if kind == "sqrt_ekf":
        return model, kalnat.sqrt_ekf(model, family)
    if kind == "information":
        return model, kalnat.information_filter(model, family)
    if kind == "natural_gradient":
        return model, kalnat.natural_gradient(model, family)
    if kind == "iterated":
        return model, kalnat.iterated_ekf(model, family)
    return model, kalnat.nig_filter(model, family)


# Built once at import, so every jitted step compiles once per input shape for the file.
CASES = [("ekf", "bernoulli"), ("sqrt_ekf", "poisson"), ("information", "categorical"),
         ("natural_gradient", "gaussian"), ("joseph", "poisson"), ("iterated", "bernoulli"),
         ("nig", "gaussian"), ("sqrt_ekf", "categorical")]
LEARNERS = {case: _make(case[0], FAMILIES[case[1]]) for case in CASES}

SETTINGS = settings(max_examples=40, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# ---- the oracle ------------------------------------------------------------------------


def numeric(a):
    return a.dtype.kind in "biuf"


def finite(a):
    return numeric(a) and bool(np.all(np.isfinite(a)))


def in_domain(family, y):
    if family.name == "bernoulli":
        return bool(np.all((y == 0) | (y == 1)))
    if family.name == "categorical":
        return bool(np.all((y == np.round(y)) & (y >= 0) & (y <= 2)))
    if family.name == "poisson":
        return bool(np.all((y >= 0) & (y == np.round(y))))
    return True


def x_rows(x):
    """Rows of a valid x: ``None`` for one observation, ``b`` for a batch, ``False`` if neither."""
    if x.shape == (P_IN,):
        return None
    if x.ndim == 2 and x.shape[1] == P_IN:
        return x.shape[0]
    return False


def y_rows(family, y):
    ev = family.event_shape
    if y.shape == ev:
        return None
    if y.ndim == len(ev) + 1 and y.shape[1:] == ev:
        return y.shape[0]
    return False


# ---- strategies ----------------------------------------------------------------------

SPECIAL = st.sampled_from([np.nan, np.inf, -np.inf])


def values(draw, shape, good, clean=False):
    """``good`` values; unless ``clean``, sometimes NaN/inf sprinkled in."""
    a = np.asarray(draw(hnp.arrays(np.float64, shape, elements=good)), dtype=np.float64)
    if not clean and a.size and draw(st.integers(0, 2)) == 0:
        idx = draw(st.integers(0, a.size - 1))
        a.reshape(-1)[idx] = draw(SPECIAL)
    return a


def cast(draw, a, clean=False, kinds=("f8", "f4", "i8")):
    """Sometimes another dtype; unless ``clean``, also ones no learner accepts."""
    kinds = list(kinds) if clean else ["f8", "f4", "bool", "complex", "str", "object"]
    kind = draw(st.sampled_from(kinds))
    if kind in ("f8", "f4"):
        return a.astype(kind)
    if kind == "i8":
        return np.nan_to_num(a, nan=0.0, posinf=0.0, neginf=0.0).round().astype(np.int64)
    if kind == "bool":
        return a != 0
    if kind == "complex":
        return a.astype(complex)
    if kind == "str":
        return a.astype(str)
    return np.array(a.tolist(), dtype=object) if a.ndim else np.array(None, dtype=object)


@st.composite
def xs(draw, rows, single, layout, clean):
    """``layout``: a shape and dtype the learner takes; ``clean``: finite values."""
    if layout:
        shape = (P_IN,) if single else (rows, P_IN)
    else:
        shape = draw(st.sampled_from([(P_IN,), (rows, P_IN), (P_IN + 1,), (rows, P_IN - 1), (),
                                      (rows, P_IN, 1), (0, P_IN)]))
    a = values(draw, shape, st.floats(-30, 30).map(lambda v: round(v, 2)), clean)
    return cast(draw, a, layout)


@st.composite
def ys(draw, family, rows, single, layout, clean):
    """``layout``: a shape and dtype the family takes; ``clean``: finite values in its domain."""
    ev = family.event_shape
    if layout:
        lead = () if single else (rows,)
    else:
        lead = draw(st.sampled_from([() if single else (rows,), (rows + 1,), (1, 1), (rows, 2), (0,)]))
    if family.name == "gaussian":
        good = st.floats(-30, 30).map(lambda v: round(v, 2))
    elif clean:
        good = st.sampled_from({"bernoulli": [0.0, 1.0], "categorical": [0.0, 1.0, 2.0],
                                "poisson": [0.0, 1.0, 4.0, 1500.0]}[family.name])
    else:
        # Valid labels mostly; also a class past the last, negative and fractional values.
        good = st.sampled_from([0.0, 1.0, 0.0, 1.0, 2.0, 3.0, -1.0, 0.5, 1500.0])
    # One float dtype when the layout is right: y keeps its dtype into the jitted step, and
    # each new dtype would compile it again.
    return cast(draw, values(draw, lead + ev, good, clean), layout, kinds=("f8",))


# ---- checks --------------------------------------------------------------------------


def snapshot(state):
    return [np.array(a, copy=True) for a in jax.tree_util.tree_leaves(state)]


def assert_unchanged(state, before):
    after = [np.asarray(a) for a in jax.tree_util.tree_leaves(state)]  # fails if donated
    assert len(after) == len(before)
    for a, b in zip(after, before):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)


def assert_finite_state(state):
    for a in jax.tree_util.tree_leaves(state):
        assert np.all(np.isfinite(np.asarray(a, np.float64))), "non-finite state after a valid input"


def expect(valid, call, state):
    """Runs ``call``: success iff ``valid``; on failure a ValueError and the state intact."""
    before = snapshot(state)
    try:
        out = call()
    except ValueError as err:
        assert not valid, f"valid input refused: {err}"
        assert str(err)
        assert_unchanged(state, before)
        return None
    assert valid, "invalid input accepted"
    return out


# ---- properties ----------------------------------------------------------------------


@SETTINGS
@given(case=st.sampled_from(CASES), data=st.data())
def test_update_and_predict(case, data):
    model, learner = LEARNERS[case]
    family = learner.family
    rows = data.draw(st.sampled_from([1, 3]))
    single = data.draw(st.booleans())
    likely = st.integers(0, 2).map(bool)  # mostly clean: two of three
    x = data.draw(xs(rows, single, data.draw(likely), data.draw(likely)))
    y = data.draw(ys(family, rows, single, data.draw(likely), data.draw(likely)))
    state = learner.init(model.init(None))

    xr, yr = x_rows(x), y_rows(family, y)
    x_ok = numeric(x) and finite(x) and xr is not False
    pred = expect(x_ok, lambda: learner.predict(state, x), state)
    if pred is not None:
        mean = np.asarray(pred.mean)
        assert mean.shape == ((family.m,) if xr is None else (xr, family.m))
        assert np.all(np.isfinite(mean)) and np.all(np.isfinite(np.asarray(pred.obs_cov)))

    # One observation counts as one row: x (3,) with y (1,), or x (1, 3) with a scalar y.
    valid = x_ok and finite(y) and yr is not False and in_domain(family, y) and (
        (1 if xr is None else xr) == (1 if yr is None else yr))
    event(f"predict valid: {x_ok}, update valid: {valid}")
    count, cov_type = int(state.count), type(state.cov)
    out = expect(valid, lambda: learner.update(state, x, y), state)
    if out is not None:
        new, _ = out
        assert isinstance(new, kalnat.State) and type(new.cov) is cov_type
        assert_finite_state(new)
        empty = xr == 0
        assert int(new.count) == count + (0 if empty else 1)


@SETTINGS
@given(case=st.sampled_from(CASES), skip=st.booleans(), data=st.data())
def test_fit(case, skip, data):
    model, learner = LEARNERS[case]
    family = learner.family
    n = data.draw(st.integers(4, 8))
    layout, clean = data.draw(st.integers(0, 3)) > 0, data.draw(st.integers(0, 2)) == 0
    x = values(data.draw, (n, P_IN), st.floats(-30, 30), clean)
    if not layout and data.draw(st.booleans()):
        x = x[:, :-1]  # a shape no learner accepts, skip_bad_rows or not
    y = data.draw(ys(family, n, False, layout, clean))
    state = learner.init(model.init(None))

    shapes_ok = x.shape[1] == P_IN and numeric(y) and y_rows(family, y) == n
    good = np.array([finite(x[i]) and finite(y[i]) and in_domain(family, y[i]) for i in range(n)]) \
        if shapes_ok else None
    valid = shapes_ok and (skip or bool(good.all()))
    event(f"valid: {valid}, bad rows: {shapes_ok and not good.all()}")
    res = expect(valid, lambda: kalnat.fit(learner, state, x, y, chunk_size=4, skip_bad_rows=skip), state)
    if res is None:
        return
    assert_finite_state(res.state)
    np.testing.assert_array_equal(res.skipped, ~good)
    assert res.n_skipped == int((~good).sum())
    assert int(res.state.count) == int(good.sum())
    mean = np.asarray(res.predictions.mean)
    assert mean.shape == (n, family.m)
    assert np.all(np.isnan(mean[~good])) and np.all(np.isfinite(mean[good]))


BAD_PRIORS = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    hnp.arrays(np.float64, st.sampled_from([(4,), (3,), (5,), (4, 4), (4, 3), (2, 2, 2)]),
               elements=st.floats(-2, 2) | SPECIAL),
)


def prior_ok(p):
    p = np.asarray(p, np.float64)
    d = P_IN + 1
    if p.ndim == 0:
        return bool(np.isfinite(p) and p > 0)
    if p.shape == (d,):
        return bool(np.all(np.isfinite(p)) and np.all(p > 0))
    if p.shape != (d, d) or not np.all(np.isfinite(p)) or not np.allclose(
            p, p.T, rtol=1e-10, atol=1e-12 * np.abs(p).max()):
        return False
    return bool(np.linalg.eigvalsh(p).min() > 1e-12 * max(1.0, np.abs(p).max()))


@settings(max_examples=80, deadline=None, derandomize=True)
@given(prior=BAD_PRIORS, sym=st.booleans(),
       kind=st.sampled_from(["ekf", "sqrt_ekf", "information", "iterated", "nig"]))
def test_priors(prior, sym, kind):
    """A prior that is not finite, symmetric and positive definite (or of the wrong shape) is
    a ValueError at ``init``; a valid one gives a finite state."""
    prior = np.asarray(prior)
    if sym and prior.ndim == 2 and prior.shape[0] == prior.shape[1]:
        with np.errstate(invalid="ignore"):  # inf + (−inf): a NaN, another bad prior
            prior = prior @ prior.T if np.all(np.isfinite(prior)) else prior + prior.T
    fam = FAMILIES["gaussian"]
    build = {"ekf": kalnat.ekf, "sqrt_ekf": kalnat.sqrt_ekf, "information": kalnat.information_filter,
             "iterated": kalnat.iterated_ekf, "nig": kalnat.nig_filter}[kind]
    assume(prior_ok(prior) or not _borderline(prior))
    try:
        state = build(MODEL, fam, prior_var=prior).init(PARAMS)
    except ValueError as err:
        assert not prior_ok(prior), f"valid prior refused: {err}"
        return
    assert prior_ok(prior), f"invalid prior accepted: {prior!r}"
    assert_finite_state(state)


def _borderline(p):
    """Singular to rounding: whether a Cholesky factorisation succeeds is not for a test to say."""
    p = np.asarray(p, np.float64)
    if p.ndim != 2 or p.shape != (P_IN + 1, P_IN + 1) or not np.all(np.isfinite(p)):
        return False
    w = np.linalg.eigvalsh(0.5 * (p + p.T))
    return abs(w.min()) <= 1e-8 * max(1.0, np.abs(p).max())


def test_state_of_another_learner_is_a_value_error():
    _, ekf = LEARNERS[("ekf", "bernoulli")]
    model, sq = LEARNERS[("sqrt_ekf", "poisson")]
    state = sq.init(model.init(None))
    before = snapshot(state)
    for call in (lambda: ekf.update(state, np.zeros(P_IN), 1.0), lambda: ekf.predict(state, np.zeros(P_IN)),
                 lambda: kalnat.fit(ekf, state, np.zeros((4, P_IN)), np.ones(4))):
        with pytest.raises(ValueError, match="expected a State holding a Covariance, got a State holding a CholeskyFactor"):
            call()
    assert_unchanged(state, before)


@pytest.mark.parametrize("bad", [np.nan, np.inf, "a"])
def test_params_that_are_not_finite_floats_are_refused(bad):
    _, learner = LEARNERS[("ekf", "bernoulli")]
    params = {"w": np.array([[0.0, bad, 0.0]]), "b": np.zeros(1)}
    with pytest.raises(ValueError, match="params"):
        learner.init(params)


def test_skip_bad_rows_equals_learning_only_the_good_rows():
    """Skipping is exact: the state equals that of a stream without the bad rows, bit for bit,
    with batch size 1 (a skipped row is no update: count and forgetting do not advance)."""
    model, learner = LEARNERS[("ekf", "bernoulli")]
    rng = np.random.default_rng(0)
    X = rng.normal(size=(40, P_IN))
    y = (rng.uniform(size=40) < 0.5).astype(float)
    Xb, yb = X.copy(), y.copy()
    Xb[0, 1], Xb[9, 2], yb[17], yb[30] = np.nan, -np.inf, 2.0, np.nan
    bad = np.zeros(40, bool)
    bad[[0, 9, 17, 30]] = True
    res = kalnat.fit(learner, learner.init(model.init(None)), Xb, yb, chunk_size=4, skip_bad_rows=True)
    ref = kalnat.fit(learner, learner.init(model.init(None)), X[~bad], y[~bad], chunk_size=4)
    for a, b in zip(jax.tree_util.tree_leaves(res.state), jax.tree_util.tree_leaves(ref.state)):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(res.skipped, bad)
    np.testing.assert_array_equal(res.predictions.mean[~bad], ref.predictions.mean)
    assert np.all(np.isnan(res.predictions.mean[bad]))
    with pytest.raises(ValueError, match="NaN or inf"):
        kalnat.fit(learner, learner.init(model.init(None)), Xb, yb, chunk_size=4)


def test_values_beyond_a_float32_state_are_refused():
    """1e39 is finite in float64 but inf in a float32 state: refused, not learned as inf."""
    model, learner = LEARNERS[("ekf", "bernoulli")]
    gauss = kalnat.ekf(model, FAMILIES["gaussian"])
    f32 = jax.tree_util.tree_map(lambda a: a.astype(jnp.float32), model.init(None))
    for lrn, x, y in ((learner, [1e39, 0.0, 0.0], 1.0), (gauss, [1.0, 0.0, 0.0], -1e39)):
        state = lrn.init(f32)
        before = snapshot(state)
        with pytest.raises(ValueError, match="beyond the range of float32"):
            lrn.update(state, np.array(x), y)
        with pytest.raises(ValueError, match="beyond the range of float32"):
            kalnat.fit(lrn, state, np.array([x] * 4), np.array([y] * 4))
        assert_unchanged(state, before)
        res = kalnat.fit(lrn, state, np.array([x] + [[0.5, 0.5, 0.5]] * 3), np.array([y, 1, 0, 1.0]),
                         skip_bad_rows=True)
        np.testing.assert_array_equal(res.skipped, [True, False, False, False])
        assert_finite_state(res.state)


def test_an_update_with_no_rows_changes_nothing():
    for case in (("ekf", "bernoulli"), ("sqrt_ekf", "categorical")):
        model, learner = LEARNERS[case]
        state = learner.init(model.init(None))
        before = snapshot(state)
        new, _ = learner.update(state, np.zeros((0, P_IN)), np.zeros(0))
        assert_unchanged(new, before)


def test_a_fit_of_no_rows_changes_nothing_and_returns_no_rows_of_each_kind():
    """fit of 0 rows: the state as it was, and predictions and log-likelihoods of 0 rows with
    the shapes and dtypes of those of 1 (they were None, and ``result.log_likelihood.sum()``, the
    stream's evidence, an AttributeError)."""
    for case in (("ekf", "bernoulli"), ("sqrt_ekf", "categorical")):
        model, learner = LEARNERS[case]
        state = learner.init(model.init(None))
        one = kalnat.fit(learner, learner.init(model.init(None)), np.full((1, P_IN), 0.5), np.zeros(1))
        none = kalnat.fit(learner, state, np.zeros((0, P_IN)), np.zeros(0))
        assert none.log_likelihood.shape == (0,) and none.log_likelihood.sum() == 0.0
        for a, b in zip(none.predictions, one.predictions):
            assert (a is None) == (b is None)
            if a is not None:
                assert a.shape == (0,) + b.shape[1:] and a.dtype == b.dtype
        assert int(none.state.count) == 0 and none.skipped.shape == (0,)
        assert kalnat.fit(learner, none.state, np.zeros((0, P_IN)), np.zeros(0), return_predictions=False).predictions is None
