"""The per-row checks of ``update`` and ``predict``: a one-call test of finiteness and range that
answers only when it is sure (:func:`kalnat.numerics.all_within`), the elementwise check
behind it, and a bank that checks a row against its members' shapes without slicing them."""

import math

import hypothesis.extra.numpy as hnp
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import kalnat
from kalnat import families as F
from kalnat.learners.base import check_values
from kalnat.numerics import all_within

F32_MAX = float(np.finfo(np.float32).max)
SPECIAL = [0.0, 1.0, -2.5, 1e-300, 1e38, F32_MAX, 3.5e38, 1e154, 1.5e154, 1e200, 1.7e308,
           np.nan, np.inf, -np.inf]


def exact(a, top):
    with np.errstate(invalid="ignore", over="ignore"):
        return bool(np.all(np.isfinite(a)) and (not a.size or np.abs(a).max() <= top))


@settings(derandomize=True, max_examples=300, deadline=None)
@given(dtype=st.sampled_from([np.float16, np.float32, np.float64, np.longdouble]),
       shape=hnp.array_shapes(min_dims=0, max_dims=2, max_side=5),
       top=st.sampled_from([math.inf, F32_MAX, float(np.finfo(np.float16).max), float(np.finfo(np.float64).max)]),
       data=st.data())
def test_the_quick_test_is_never_wrong_when_it_passes(dtype, shape, top, data):
    values = st.one_of(st.sampled_from(SPECIAL), st.floats(allow_nan=True, allow_infinity=True))
    a = np.asarray(data.draw(hnp.arrays(np.float64, shape, elements=values)))
    with np.errstate(over="ignore"):
        a = a.astype(dtype)
    if all_within(a, top):
        assert exact(a, top)
    if dtype is np.float64 and top == math.inf and np.all(np.abs(a) < 1e150):
        assert all_within(a, top) == exact(a, top)  # no overflow of the sum: the test answers


def test_a_long_double_just_beyond_float64_is_not_let_through():
    top = float(np.finfo(np.float64).max)
    beyond = np.longdouble(top) * (1 + np.finfo(np.longdouble).eps)
    if beyond == np.longdouble(top):
        pytest.skip("long double is float64 here")
    assert float(beyond) == top  # what a float compare would see
    assert not all_within(np.asarray(beyond), top) and not all_within(np.array([beyond, 0.0]), top)


@pytest.mark.parametrize("a,state,message", [
    (np.array([1.0, np.nan]), np.float64, "NaN or inf"),
    (np.array([-np.inf]), np.float32, "NaN or inf"),
    (np.array([[1.0, 2.0], [0.5, 3.5e38]]), np.float32, "beyond the range of float32"),
    (np.array(1e39), np.float32, "beyond the range of float32"),
])
def test_bad_values_are_named(a, state, message):
    with pytest.raises(ValueError, match=f"x .*{message}|x contains {message}"):
        check_values(a, np.dtype(state), "x")


@pytest.mark.parametrize("a,state", [
    (np.full(4, 1e200), np.float64),           # the sum of squares overflows: checked elementwise
    (np.full(3, 1.7e308), np.float64),
    (np.full((2, 3), 3.0e38), np.float32),      # each within float32, the sum beyond its bound
    (np.array([F32_MAX, -F32_MAX]), np.float32),
    (np.array(F32_MAX), np.float32),
    (np.arange(5), np.float32),                 # integers: nothing to check
    (np.zeros(0), np.float32),
])
def test_finite_values_within_range_pass(a, state):
    check_values(a, np.dtype(state), "x")


def test_targets_near_the_top_of_the_range_pass_and_beyond_it_are_refused():
    model = kalnat.models.linear(2)
    learner = kalnat.ekf(model, F.Gaussian(1.0))
    state = learner.init({k: v.astype(jnp.float32) for k, v in model.init(None).items()})
    assert learner.check_x(state, np.full(2, 3.0e38))[0].shape == (1, 2)
    F.Gaussian(1.0).check(np.full(3, 1e200))
    for x, y, message in ((np.ones(2), np.float64(np.nan), "y contains NaN"),
                          (np.ones((2, 2)), np.array([1.0, np.inf]), "y contains NaN"),
                          (np.ones(2), 4e38, "y has values beyond the range of float32")):
        with pytest.raises(ValueError, match=message):
            learner.update(state, x, y)
    learner.update(state, np.ones(2), 1.0)  # nothing was consumed by the refusals


def test_a_bank_checks_rows_against_its_members_shapes():
    def apply(params, x):
        return x @ params["w"] + params["b"]

    params = {"w": jnp.zeros((3, 1)), "b": jnp.zeros(1)}
    bank = kalnat.ekf_bank(apply, F.Gaussian(1.0), prior_vars=(0.5, 2.0), forgettings=(1.0,))
    state = bank.init(params)
    rng = np.random.default_rng(0)
    state, pred = bank.update(state, rng.normal(size=3), 0.5)      # one row, inferred from the model
    assert pred.mean.shape == (1,)
    state, pred = bank.update(state, rng.normal(size=(4, 3)), np.ones(4))  # a minibatch
    assert pred.mean.shape == (4, 1)
    for x, message in ((np.array([1.0, np.nan, 0.0]), "x contains NaN or inf"),
                       (np.ones(5), "neither one observation nor a batch")):
        with pytest.raises(ValueError, match=message):
            bank.update(state, x, 0.5)
    assert int(bank.update(state, np.ones(3), 0.5)[0].members.count[0]) == 3
