"""The learner interface: update/predict/fit semantics, minibatches, input validation."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

import kalnat
from kalnat import families as F
from kalnat import schedules as S
from kalnat.keyed import Keyed

P_IN = 3


def flat(params):
    return np.asarray(ravel_pytree(params)[0])


@pytest.fixture(scope="module")
def logistic():
    model = kalnat.models.linear(P_IN)
    learner = kalnat.ekf(model, F.Bernoulli(), prior_var=1.0, forgetting=0.99)
    rng = np.random.default_rng(0)
    X = rng.normal(size=(37, P_IN))
    y = (rng.uniform(size=37) < 1 / (1 + np.exp(-X @ [1.0, -2.0, 0.5]))).astype(float)
    return model, learner, X, y


def test_fit_equals_row_by_row_update_and_predicts_before_learning(logistic):
    model, learner, X, y = logistic
    state = learner.init(model.init(None))
    preds = []
    for xi, yi in zip(X, y):
        preds.append(np.asarray(learner.predict(state, xi).mean))
        state = learner.update(state, xi, yi)[0]
    res = kalnat.fit(learner, learner.init(model.init(None)), X, y, chunk_size=5)
    np.testing.assert_allclose(flat(res.state.params), flat(state.params), rtol=1e-12)
    np.testing.assert_allclose(kalnat.covariance(res.state), kalnat.covariance(state), rtol=1e-12)
    np.testing.assert_allclose(res.predictions.mean, np.stack(preds), rtol=1e-12)
    assert res.predictions.mean[0, 0] == 0.5  # the first row is predicted from the prior
    assert int(res.state.count) == len(X)


@pytest.mark.parametrize("chunk_size", [1, 4, 100])
def test_chunking_and_partial_batches_do_not_change_the_result(logistic, chunk_size):
    model, learner, X, y = logistic
    full = kalnat.fit(learner, learner.init(model.init(None)), X, y, batch_size=4, chunk_size=100)
    res = kalnat.fit(learner, learner.init(model.init(None)), X, y, batch_size=4, chunk_size=chunk_size)
    assert int(res.state.count) == 10  # 9 full minibatches and one of 1 row
    np.testing.assert_array_equal(flat(res.state.params), flat(full.state.params))
    assert res.predictions.mean.shape == (37, 1)
    np.testing.assert_array_equal(res.predictions.mean, full.predictions.mean)


def test_minibatch_equals_sequential_for_linear_gaussian():
    """A minibatch is one update at one linearisation point; for a linear-Gaussian model the
    linearisation is exact, so it equals the sequential updates (docs/method.md §2d)."""
    rng = np.random.default_rng(1)
    fam = F.Gaussian([[0.5, 0.1], [0.1, 0.3]])
    model = kalnat.models.linear(P_IN, 2)
    X, Y = rng.normal(size=(64, P_IN)), rng.normal(size=(64, 2))
    learner = kalnat.ekf(model, fam, prior_var=2.0)
    seq = kalnat.fit(learner, learner.init(model.init(None)), X, Y, batch_size=1).state
    bat = kalnat.fit(learner, learner.init(model.init(None)), X, Y, batch_size=8).state
    np.testing.assert_allclose(flat(bat.params), flat(seq.params), rtol=1e-10)
    np.testing.assert_allclose(kalnat.covariance(bat), kalnat.covariance(seq), rtol=1e-10, atol=1e-14)
    # and a minibatch through the public update is the same single step
    s = learner.init(model.init(None))
    s = learner.update(s, X[:8], Y[:8])[0]
    s1 = kalnat.fit(learner, learner.init(model.init(None)), X[:8], Y[:8], batch_size=8).state
    np.testing.assert_allclose(kalnat.covariance(s), kalnat.covariance(s1), rtol=1e-12)
    assert int(s.count) == 1


def test_minibatch_differs_from_sequential_for_nonlinear_models(logistic):
    model, learner, X, y = logistic
    seq = kalnat.fit(learner, learner.init(model.init(None)), X[:8], y[:8]).state
    bat = kalnat.fit(learner, learner.init(model.init(None)), X[:8], y[:8], batch_size=8).state
    assert np.max(np.abs(flat(seq.params) - flat(bat.params))) > 1e-4


def test_predictive_of_each_learner(logistic):
    model, _, X, y = logistic
    fam = F.Categorical(3)
    m3 = kalnat.models.linear(P_IN, fam.n_outputs)
    labels = np.arange(37) % 3
    preds = {}
    for learner in (kalnat.ekf(m3, fam, prior_var=0.5),
                    kalnat.information_filter(m3, fam, prior_var=0.5),
                    kalnat.natural_gradient(m3, fam, **S.kalman_to_natural(0.5)._asdict())):
        st = kalnat.fit(learner, learner.init(m3.init(None)), X, labels).state
        preds[learner.name] = learner.predict(st, X[:5])
    ref = preds["ekf"]
    assert ref.mean.shape == (5, 2) and ref.mean_cov.shape == (5, 2, 2) and ref.probs.shape == (5, 3)
    np.testing.assert_allclose(ref.probs.sum(-1), 1.0, rtol=1e-14)
    for p in preds.values():  # H P Hᵀ agrees across the three forms
        np.testing.assert_allclose(p.mean_cov, ref.mean_cov, rtol=1e-9)
        np.testing.assert_allclose(p.obs_cov - p.mean_cov,
                                   jax.vmap(fam.cov)(p.mean), rtol=1e-12, atol=1e-15)
    assert np.all(np.linalg.eigvalsh(np.asarray(ref.mean_cov)) > 0)
    single = kalnat.ekf(m3, fam).predict(kalnat.ekf(m3, fam).init(m3.init(None)), X[0])
    assert single.mean.shape == (2,) and single.probs.shape == (3,)


def test_plain_function_and_nested_pytree_models():
    """Any apply(params, x) on any pytree works; the learner flattens it."""
    def apply(params, x):
        (w, b), scale = params
        return jnp.tanh(x @ w + b) * scale

    params = ((jnp.ones((P_IN, 1)) * 0.1, jnp.zeros(1)), {"s": jnp.ones(1)}["s"])
    learner = kalnat.ekf(apply, F.Gaussian(0.5), prior_var=1.0)
    state = learner.init(params)
    rng = np.random.default_rng(3)
    X = rng.normal(size=(20, P_IN))
    state = learner.update(state, X[0], 0.3)[0]          # one observation, inferred from the model
    state = learner.update(state, X[1:5], np.ones(4))[0]  # a minibatch
    res = kalnat.fit(learner, state, X[5:], np.zeros(15))
    assert int(res.state.count) == 17
    assert learner.predict(res.state, X[0]).mean.shape == (1,)
    assert learner.predict(res.state, X[:4]).mean.shape == (4, 1)
    with pytest.raises(ValueError, match="neither one observation nor a batch"):
        learner.predict(res.state, np.ones(P_IN + 2))


def test_caller_params_survive_in_place_updates(logistic):
    model, learner, X, y = logistic
    params = model.init(None)
    state = learner.init(params)
    for i in range(3):
        state = learner.update(state, X[i], y[i])[0]
    assert np.all(np.asarray(params["w"]) == 0)  # still readable, still the initial values


def test_float32_works(logistic):
    model, _, X, y = logistic
    model32 = kalnat.models.linear(P_IN, dtype=jnp.float32)
    learner = kalnat.ekf(model32, F.Bernoulli(), prior_var=1.0)
    res = kalnat.fit(learner, learner.init(model32.init(None)), X, y)
    assert res.state.cov.p.dtype == jnp.float32 and flat(res.state.params).dtype == np.float32
    ref = kalnat.fit(kalnat.ekf(model, F.Bernoulli(), prior_var=1.0),
                     kalnat.ekf(model, F.Bernoulli()).init(model.init(None)), X, y).state
    np.testing.assert_allclose(flat(res.state.params), flat(ref.params), rtol=1e-4, atol=1e-5)


BAD_UPDATES = [
    (lambda X, y: (X[0] * np.nan, y[0]), "x contains NaN or inf"),
    (lambda X, y: (np.full(P_IN, np.inf), y[0]), "x contains NaN or inf"),
    (lambda X, y: (X[0], np.nan), "NaN"),
    (lambda X, y: (X[0, :2], y[0]), "x must have shape"),
    (lambda X, y: (X[:3], y[:2]), "3 rows but y has 2"),
    (lambda X, y: (X[0], 2.0), "0 or 1"),
    (lambda X, y: (X[0].astype(str), y[0]), "numeric"),
    (lambda X, y: (X[:2], y[:2, None]), "shape"),
]


@pytest.mark.parametrize("bad,message", BAD_UPDATES)
def test_bad_input_raises_and_leaves_state_intact(logistic, bad, message):
    model, learner, X, y = logistic
    state = learner.update(learner.init(model.init(None)), X[0], y[0])[0]
    before = (flat(state.params).copy(), kalnat.covariance(state).copy())
    x_bad, y_bad = bad(X, y)
    with pytest.raises(ValueError, match=message):
        learner.update(state, x_bad, y_bad)
    np.testing.assert_array_equal(flat(state.params), before[0])  # not donated, not changed
    np.testing.assert_array_equal(kalnat.covariance(state), before[1])
    state = learner.update(state, X[1], y[1])[0]  # and still usable
    assert int(state.count) == 2


@pytest.mark.parametrize("prior,message,ng_message", [
    (-1.0, "positive definite", "init_fisher must be positive definite"),
    (np.array([1.0, 1.0, 0.0, 1.0]), "positive definite", "init_fisher must be positive definite"),
    (np.array([[1.0, 2.0, 0, 0], [2.0, 1.0, 0, 0], [0, 0, 1.0, 0], [0, 0, 0, 1.0]]), "positive definite",
     "init_fisher must be positive definite"),
    # natural gradient's J_0 is checked when the learner is built (its values), then at init
    # (its shape against the model's d): this singular matrix fails the first check
    (np.ones((3, 3)), "expected a scalar", "init_fisher must be positive definite"),
    (np.eye(3), "expected a scalar", r"init_fisher: expected a scalar, \(4,\) or \(4, 4\)"),
    (np.nan, "NaN", "init_fisher contains NaN"),
    # (the natural gradient's J_0 when it is built, before it knows d: any square matrix)
    (np.ones((2, 3)), r"prior_var: expected a scalar, \(4,\) or \(4, 4\), got shape \(2, 3\)",
     r"init_fisher: expected a scalar, a vector or a square matrix, got shape \(2, 3\)"),
    (np.ones(3), r"prior_var: expected a scalar, \(4,\) or \(4, 4\), got shape \(3,\)",
     r"init_fisher: expected a scalar, \(4,\) or \(4, 4\), got shape \(3,\)"),
    (np.eye(4) + np.triu(np.full((4, 4), 0.1), 1), "prior_var must be symmetric", "init_fisher must be symmetric"),
])
def test_bad_prior(logistic, prior, message, ng_message):
    model, _, _, _ = logistic
    for make in (kalnat.ekf, kalnat.information_filter):
        with pytest.raises(ValueError, match=message):
            make(model, F.Bernoulli(), prior_var=prior).init(model.init(None))
    with pytest.raises(ValueError, match=ng_message):
        kalnat.natural_gradient(model, F.Bernoulli(), init_fisher=prior).init(model.init(None))


def test_bad_settings_and_states(logistic):
    model, learner, X, y = logistic
    with pytest.raises(ValueError, match="forgetting"):
        kalnat.ekf(model, F.Bernoulli(), forgetting=1.5)
    with pytest.raises(ValueError, match="process_noise"):
        kalnat.ekf(model, F.Bernoulli(), process_noise=-1.0)
    with pytest.raises(ValueError, match="damping"):
        kalnat.natural_gradient(model, F.Bernoulli(), damping=-1.0)
    # a number as text, a flag or None, when the learner is built (prior_var='1' was a JAX
    # tracing error at init; forgetting='0.9' and max_variance='2' were taken)
    for name, value, what in (("prior_var", "1", "a number or an array of numbers, got '1'"),
                              ("prior_var", None, "a number or an array of numbers, got None"),
                              ("prior_var", True, "a number or an array of numbers, got True"),
                              ("forgetting", "0.9", "a number in (0, 1] or a schedule (a function of t), got '0.9'"),
                              ("max_variance", "2", "a number or an array of numbers, got '2'"),
                              ("process_noise", ["x"], "a number or an array of numbers, got ['x']")):
        with pytest.raises(ValueError, match=re.escape(f"{name} must be {what}")):
            kalnat.ekf(model, F.Bernoulli(), **{name: value})
    # numbers of any kind, arrays of them, and a traced one (a derivative in the prior) pass
    from fractions import Fraction

    from kalnat.learners.base import make_hyper
    for value in (np.float32(2), jnp.bfloat16(2), Fraction(1, 2), [1.0, 2.0, 3.0, 4.0], jnp.ones(4), np.eye(4)):
        kalnat.ekf(model, F.Bernoulli(), prior_var=value)
    assert float(jax.grad(lambda v: 3.0 * make_hyper(prior_var=v).prior_var)(1.0)) == 3.0
    with pytest.raises(ValueError, match="params contain NaN"):
        learner.init({"w": jnp.full((1, P_IN), jnp.nan), "b": jnp.zeros(1)})
    other = kalnat.information_filter(model, F.Bernoulli())
    with pytest.raises(ValueError, match="expected a State holding a Covariance, got a State holding a Precision"):
        learner.update(other.init(model.init(None)), X[0], y[0])
    with pytest.raises(ValueError, match="batch_size"):
        kalnat.fit(learner, learner.init(model.init(None)), X, y, batch_size=0)
    with pytest.raises(ValueError, match="leading row axis"):
        kalnat.fit(learner, learner.init(model.init(None)), X[0], y[0])
    with pytest.raises(ValueError, match="37 rows but Y has 36"):
        kalnat.fit(learner, learner.init(model.init(None)), X, y[:-1])


def test_wrong_arguments_are_named_at_every_entry(logistic):
    """What the constructors, init, update, fit (with and without skip_bad_rows) and
    log_evidence refuse, each with what it expected and what it got."""
    model, learner, X, y = logistic
    state = learner.init(model.init(None))
    with pytest.raises(ValueError, match="family must be a kalnat family, got str"):
        kalnat.ekf(model, "bernoulli")
    with pytest.raises(ValueError, match=r"model must be a kalnat Model or a function apply\(params, x\), got int"):
        kalnat.ekf(3, F.Bernoulli())
    with pytest.raises(ValueError, match="params: the pytree has no arrays"):
        learner.init({})
    with pytest.raises(ValueError, match="ekf: hyper must be a kalnat Hyper, got tuple"):
        learner.update(state, X[0], y[0], hyper=(1.0, 1.0))
    with pytest.raises(ValueError, match=r"Y must have a leading row axis, got shape \(\)"):
        kalnat.fit(learner, state, X[:1], y[0])
    for skip in (False, True):
        with pytest.raises(ValueError, match="x must be numeric, got dtype <U1"):
            kalnat.fit(learner, state, np.full((37, P_IN), "a"), y, skip_bad_rows=skip)
    # (without skip_bad_rows: test_bad_settings_and_states)
    with pytest.raises(ValueError, match=r"X must have a leading row axis, got shape \(3,\)"):
        kalnat.fit(learner, state, X[0], y[:1], skip_bad_rows=True)
    with pytest.raises(ValueError, match="X has 37 rows but Y has 36"):
        kalnat.fit(learner, state, X, y[:-1], skip_bad_rows=True)
    with pytest.raises(ValueError, match="log_evidence: 37 rows is not a multiple of batch_size 2"):
        kalnat.log_evidence(learner, learner.hyper, model.init(None), X, y, batch_size=2)
    with pytest.raises(ValueError, match="object holds no covariance of θ"):
        kalnat.covariance(object())
    with pytest.raises(ValueError, match="with_covariance takes a core learner's State, got dict"):
        kalnat.with_covariance({}, model.init(None), np.eye(4))
    with pytest.raises(ValueError, match=r"Groups: a group cannot be in the nig representation \(it needs the whole"):
        kalnat.representations.Groups((2, 2), (kalnat.representations.NIG(), kalnat.representations.Full()))
    two = kalnat.representations.Groups((2,), (kalnat.representations.Full(),))
    with pytest.raises(ValueError, match=r"groups of sizes \(2,\) cover 2 parameters, the model has 4"):
        kalnat.ekf(model, F.Bernoulli(), representation=two).init(model.init(None))


@pytest.mark.parametrize("bad", [0, 2.5, 3.0, None, True, "3"], ids=repr)
def test_sizes_and_counts_must_be_positive_integers_named_at_every_entry(logistic, bad):
    """One check (kalnat.validation.positive_int) for every size or count a caller gives: a
    ValueError naming the argument, where a float reached a shape and raised from JAX, and a
    string raised int()'s own message. A NumPy integer is taken."""
    model, learner, X, y = logistic
    state = learner.init(model.init(None))
    calls = {"n_features": lambda v: kalnat.models.linear(v),
             "hidden[1]": lambda v: kalnat.models.mlp(2, (3, v), 1),
             "n_state": lambda v: kalnat.recurrent.elman(2, v),
             "iterations": lambda v: kalnat.iterated_ekf(model, F.Bernoulli(), iterations=v),
             "batch_size": lambda v: kalnat.fit(learner, state, X, y, batch_size=v),
             "chunk_size": lambda v: kalnat.fit(learner, state, X, y, chunk_size=v),
             "capacity": lambda v: Keyed(learner, model.init(None), capacity=v)}
    for name, call in calls.items():
        with pytest.raises(ValueError, match=re.escape(f"{name} must be a positive integer, got {bad!r}")):
            call(bad)
    assert kalnat.models.mlp(np.int64(2), (np.int64(3),), 1).input_shape == (2,)


def test_a_model_that_does_not_fit_its_family_or_params_is_refused_at_init(logistic):
    """Raw outputs the family does not take, or another model's params: a ValueError naming
    both at ``init``, where the step would fail deep in JAX (a reshape of the wrong size, a
    product of mismatched shapes)."""
    model, learner, _, _ = logistic
    cases = [(kalnat.models.linear(5), F.Categorical(3), None,
              r"raw outputs of shape \(1,\) for one x of shape \(5,\); the categorical family takes \(2,\) or \(3,\)"),
             (kalnat.models.linear(5, 2), F.Bernoulli(), None, r"the bernoulli family takes \(\) or \(1,\)"),
             (model, F.Bernoulli(), kalnat.models.linear(P_IN + 1).init(None), "are they this model's params"),
             (kalnat.models.linear(5, 3), F.Categorical(3), None, None),
             (kalnat.models.linear(5, 2), F.Categorical(3), None, None)]
    for m, fam, params, message in cases:
        make = lambda: kalnat.ekf(m, fam).init(m.init(None) if params is None else params)  # noqa: E731
        if message is None:
            make()
        else:
            with pytest.raises(ValueError, match=message):
                make()
    with pytest.raises(ValueError, match=r"the categorical family takes"):  # a bank's init too
        kalnat.ekf_bank(kalnat.models.linear(5), F.Categorical(3)).init(kalnat.models.linear(5).init(None))
    with pytest.raises(ValueError, match=r"init needs a random key"):
        kalnat.models.mlp(3, (4,)).init(None)


def test_fit_names_the_first_bad_row(logistic):
    model, learner, X, y = logistic
    state = learner.init(model.init(None))
    x_bad, y_bad = X.copy(), y.copy()
    x_bad[17, 1] = np.nan
    y_bad[23] = 2.0
    with pytest.raises(ValueError, match=r"row 17 \(0-based\): x contains NaN or inf \(skip_bad_rows=True"):
        kalnat.fit(learner, state, x_bad, y_bad)
    with pytest.raises(ValueError, match=r"row 23 \(0-based\): bernoulli: labels must be 0 or 1"):
        kalnat.fit(learner, state, X, y_bad)
    # the row of the values the message is about, not the first bad row of x or y
    x_late = X.copy()
    x_late[30, 0] = np.inf
    with pytest.raises(ValueError, match=r"row 30 \(0-based\): x contains NaN or inf"):
        kalnat.fit(learner, state, x_late, y_bad)
    # the rows it names are the rows skip_bad_rows skips
    assert np.flatnonzero(kalnat.fit(learner, state, x_bad, y_bad, skip_bad_rows=True).skipped).tolist() == [17, 23]


def test_damping_regularises_the_natural_gradient_step(logistic):
    model, _, X, y = logistic
    plain = kalnat.natural_gradient(model, F.Gaussian(1.0), init_fisher=1.0)
    damped = kalnat.natural_gradient(model, F.Gaussian(1.0), init_fisher=1.0, damping=10.0)
    a = kalnat.fit(plain, plain.init(model.init(None)), X, y).state
    b = kalnat.fit(damped, damped.init(model.init(None)), X, y).state
    assert np.linalg.norm(flat(b.params)) < 0.5 * np.linalg.norm(flat(a.params))
    # a linear-Gaussian H does not depend on θ, so J_t is the same: damping enters the solve only
    np.testing.assert_allclose(a.cov.fisher, b.cov.fisher, rtol=1e-12)
