"""A minibatch whose S is too large for the written-out factor is conditioned in noise units
(kalnat.linearization.in_noise_units): the same filter, exactly, and in float32 a confident
classifier's minibatches no longer make LAPACK's factor NaN."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

import kalnat
from kalnat import datasets, filter as _filter
from kalnat import families as F
from kalnat import representations as R

P_IN = 3
FAMILIES = {  # b rows of m outputs, b·m = 18 > numerics.SMALL
    "categorical": (F.Categorical(4), 6),
    "gaussian2": (F.Gaussian([[1.0, 0.3], [0.3, 0.5]]), 9),
}


def _step_both_ways(learner, params, X, Y):
    """One minibatch step from a state that has seen a few rows, with and without noise units,
    each its own trace (the choice is read when the step is traced)."""
    state = kalnat.fit(learner, learner.init(params), X[:4], Y[:4], batch_size=2).state
    hyper = learner.hyper
    out = []
    for unit in (False, True):
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(_filter, "_noise_units", lambda b, m, unit=unit: unit)
            new, pred, ll = jax.jit(lambda h, s, x, y: learner.step(h, s, x, y))(hyper, state, X[4:], Y[4:])
            out.append((np.asarray(ravel_pytree(new.params)[0]), kalnat.covariance(new),
                        np.asarray(pred.mean_cov), np.asarray(pred.obs_cov), np.asarray(ll)))
    return out


# (the unknown noise scale, nig, is a Gaussian's)
FORMS = ("full", "full-layer-rows", "diag", "lowrank:2", "kron", "iterated", "nig")


@pytest.mark.parametrize("fam,rep", [(f, r) for f in FAMILIES for r in FORMS
                                     if r != "nig" or f == "gaussian2"])
def test_a_minibatch_in_noise_units_is_the_same_update(fam, rep):
    """θ, P, each row's H P⁻ Hᵀ and H P⁻ Hᵀ + R, and each row's one-step log-likelihood (for
    the Gaussian the chain rule of the joint density, whose factor changes with the units) are
    the update's in the data's coordinates, to 1e-10 (float64)."""
    family, b = FAMILIES[fam]
    model = kalnat.models.linear(P_IN, family.m)
    params = model.init(None)
    if rep == "iterated":
        learner = kalnat.iterated_ekf(model, family, iterations=3)
    elif rep == "nig":
        learner = kalnat.nig_filter(model, family)
    elif rep == "full-layer-rows":  # H as the layer's factors, as a bank's members take it: L⁻¹ on δ
        full = R.Full(layers=((family.m, P_IN),))
        learner = kalnat.ekf(model, family, representation=full, forgetting=0.9)
    else:
        learner = kalnat.ekf(model, family, representation=R.from_name(rep, params), forgetting=0.9)
    rng = np.random.default_rng(len(fam) + len(rep))
    X = rng.normal(size=(4 + b, P_IN))
    Y = (rng.integers(0, family.num_classes, 4 + b) if fam == "categorical"
         else rng.normal(size=(4 + b, family.m)))
    plain, units = _step_both_ways(learner, params, X, Y)
    for name, a, u in zip(("θ", "P", "H P⁻ Hᵀ", "H P⁻ Hᵀ + R", "log-likelihood"), plain, units):
        scale = np.max(np.abs(a))
        assert np.max(np.abs(u - a)) <= 1e-10 * scale, name


@functools.lru_cache(maxsize=None)
def _digits32(n):
    X, y, _, _ = datasets.load("digits")
    X = (X - X.mean(0)) / (X.std(0) + 1e-9)
    return np.asarray(X[:n], np.float32), y[:n]


@pytest.mark.slow
@pytest.mark.parametrize("rep", ["blocks", "lowrank:10"])
def test_float32_minibatches_of_a_confident_classifier_do_not_diverge(rep):
    """digits' ten-class linear softmax (d = 585), float32, minibatches of 2 rows (S of 18
    outputs, more than numerics.SMALL): a row's R = diag(p) − p pᵀ has eigenvalues as small as
    its least class probability, and the minibatch's S (and R, which these forms factor too),
    factored by LAPACK without a pivot floor, was NaN: the learner diverged (with the suite's
    XLA options; blocks and the low-rank form; the full covariance too with XLA's defaults, at
    row 600). In noise units the stream runs through, θ and the covariance finite."""
    X, y = _digits32(640)
    model = kalnat.models.linear(64, 9, dtype=jnp.float32)
    params = model.init(None)
    # no floor on R: the default one (9.5e-7 in float32) alone kept blocks finite without noise units
    learner = kalnat.ekf(model, F.Categorical(10, r_floor=0), representation=R.from_name(rep, params))
    result = kalnat.fit(learner, learner.init(params), X, y, batch_size=2)
    assert np.all(np.isfinite(result.log_likelihood))
    assert np.all(np.isfinite(np.asarray(ravel_pytree(result.state.params)[0])))
    assert np.all(np.isfinite(kalnat.covariance(result.state)))
