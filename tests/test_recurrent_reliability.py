"""Bad time steps in a recurrent stream: ``fit_sequence(..., skip_bad_rows=True)``.

One stream: a skipped step is dropped from the sequence (no transition, no learning), so the
final state is bit for bit that of the sequence without it. A batch: a bad step of one
sequence freezes that sequence at that step, as padding past its end does. Without the
option bad input raises before anything is donated, including finite values that overflow a
float32 state.
"""

import functools

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree
import numpy as np
import pytest

from kalnat import families, recurrent

FAM = families.Categorical(3)
CELL = recurrent.elman(n_inputs=2, n_state=3, n_outputs=3)


def _forgetting(t):  # depends on the step count, so a skipped step must not advance it
    return 1.0 - 0.05 / (1.0 + t)


LEARNERS = {
    "rtrl": recurrent.rtrl(CELL, FAM, prior_var=0.5, forgetting=_forgetting),
    "joint_ekf": recurrent.joint_ekf(CELL, FAM, prior_var=0.5, forgetting=_forgetting),
}


@functools.lru_cache(maxsize=None)
def _params():
    params = CELL.init(jax.random.PRNGKey(0))
    k1, k2 = jax.random.split(jax.random.PRNGKey(1))
    params["V"] = jax.random.normal(k1, params["V"].shape) / np.sqrt(CELL.n_state)
    params["c"] = 0.1 * jax.random.normal(k2, params["c"].shape)
    return params


def _data(t_len, seed, batch=None):
    """``x (…, T, 2)`` and float labels ``y (…, T)`` in {0, 1, 2}."""
    rng = np.random.default_rng(seed)
    lead = (t_len,) if batch is None else (batch, t_len)
    x = rng.normal(size=lead + (2,))
    y = (np.floor(3 * (np.sin(np.cumsum(x[..., 0], axis=-1)) + 1) / 2.0001)).astype(np.float64)
    return x, y


def _leaves(state):
    return [np.array(a) for a in jax.tree_util.tree_leaves(state)]


def _assert_same_state(a, b):
    la, lb = _leaves(a), _leaves(b)
    assert len(la) == len(lb)
    for u, v in zip(la, lb):
        np.testing.assert_array_equal(u, v)


def _spoil(x, y):
    """Bad steps: NaN/inf in x, inf/NaN in y, a label that is not a class, a fractional one.

    Step 0 (the very first), 4 and 8 (chunk boundaries for ``chunk_size=4``), 6 (mid-chunk),
    and 13-14 (two in a row) are bad.
    """
    xb, yb = x.copy(), y.copy()
    xb[0, 1] = np.nan
    xb[4, 0] = np.inf
    yb[6] = np.inf
    yb[8] = 3.0
    xb[13, 0] = -np.inf
    yb[14] = 1.5
    bad = np.zeros(x.shape[0], bool)
    bad[[0, 4, 6, 8, 13, 14]] = True
    return xb, yb, bad


@pytest.mark.parametrize("name", ["rtrl", "joint_ekf"])
def test_one_stream_skipping_equals_the_sequence_without_those_steps(name):
    learner = LEARNERS[name]
    x, y = _data(24, seed=1)
    xb, yb, bad = _spoil(x, y)
    res = recurrent.fit_sequence(learner, learner.init(_params()), xb, yb, chunk_size=4,
                                 skip_bad_rows=True)
    ref = recurrent.fit_sequence(learner, learner.init(_params()), x[~bad], y[~bad], chunk_size=4)
    _assert_same_state(res.state, ref.state)  # θ, covariance, s, G (rtrl), count
    assert int(res.state.count) == 24 - 6
    np.testing.assert_array_equal(res.skipped, bad)
    assert res.skipped.shape == (24,) and res.n_skipped == 6
    for field in ("mean", "mean_cov", "obs_cov", "probs"):
        got, want = getattr(res.predictions, field), getattr(ref.predictions, field)
        assert got.shape == (24,) + want.shape[1:]
        np.testing.assert_array_equal(got[~bad], want)
        assert np.all(np.isnan(got[bad]))
    # The same stream in two calls (split just after a bad step) gives the same state.
    first = recurrent.fit_sequence(learner, learner.init(_params()), xb[:5], yb[:5], chunk_size=4,
                                   skip_bad_rows=True)
    second = recurrent.fit_sequence(learner, first.state, xb[5:], yb[5:], chunk_size=4,
                                    skip_bad_rows=True)
    assert first.n_skipped + second.n_skipped == 6
    _assert_same_state(second.state, ref.state)
    # Clean data with the option: no step skipped, the plain result.
    clean = recurrent.fit_sequence(learner, learner.init(_params()), x[~bad], y[~bad], chunk_size=4,
                                   skip_bad_rows=True)
    assert clean.n_skipped == 0
    _assert_same_state(clean.state, ref.state)


@pytest.mark.parametrize("name", ["rtrl", "joint_ekf"])
def test_without_the_option_bad_steps_raise_and_the_state_is_untouched(name):
    learner = LEARNERS[name]
    x, y = _data(24, seed=1)
    xb, yb, bad = _spoil(x, y)
    state = learner.init(_params())
    before = _leaves(state)
    for xs, ys, match in ((xb, y, "NaN or inf"), (x, yb, "NaN or inf"),
                          (x, np.where(np.arange(24) == 8, 3.0, y), "labels")):
        with pytest.raises(ValueError, match=match):
            recurrent.fit_sequence(learner, state, xs, ys, chunk_size=4)
    # Shapes and dtypes raise with the option too.
    with pytest.raises(ValueError, match="shape"):
        recurrent.fit_sequence(learner, state, xb[:, :1], yb, skip_bad_rows=True)
    with pytest.raises(ValueError, match="Y must have shape"):
        recurrent.fit_sequence(learner, state, xb, yb[:-1], skip_bad_rows=True)
    with pytest.raises(ValueError, match="numeric"):
        recurrent.fit_sequence(learner, state, xb.astype(str), yb, skip_bad_rows=True)
    with pytest.raises(ValueError, match="numeric"):
        recurrent.fit_sequence(learner, state, xb, yb.astype(str), skip_bad_rows=True)
    for a, b in zip(_leaves(state), before):  # nothing donated: the state is as it was
        np.testing.assert_array_equal(a, b)
    out = recurrent.fit_sequence(learner, state, x[~bad], y[~bad], chunk_size=4)
    assert np.isfinite(np.concatenate([a.ravel() for a in _leaves(out.state)])).all()


@pytest.mark.parametrize("name", ["rtrl", "joint_ekf"])
def test_batch_bad_step_freezes_that_sequence_as_padding_does(name):
    """B = 2: a bad step of sequence b is b frozen at that step, as past its end."""
    learner = LEARNERS[name]
    t_len, t_bad = 12, 5
    x, y = _data(t_len, seed=2, batch=2)
    xb, yb = x.copy(), y.copy()
    xb[1, t_bad, 0] = np.nan
    yb[1, 9] = 7.0  # sequence 1 has lengths 9: this is padding, not a skipped step
    xb[1, 10, 1] = np.inf  # padding too
    res = recurrent.fit_sequence(learner, learner.init(_params(), batch=2), xb, yb, lengths=np.array([12, 9]),
                                 chunk_size=4, skip_bad_rows=True)
    expect = np.zeros((2, t_len), bool)
    expect[1, t_bad] = True
    np.testing.assert_array_equal(res.skipped, expect)
    assert res.n_skipped == 1
    assert np.all(np.isnan(res.predictions.mean[1, t_bad]))
    assert np.isfinite(res.predictions.mean[0]).all() and np.isfinite(res.predictions.mean[1, :t_bad]).all()
    # The same through the public API: the bad step of sequence 1 as one step past its end.
    # (The skipped entries of x are zeroed, so give the reference the same values.)
    xr = x.copy()
    xr[1, t_bad, 0] = 0.0
    pieces = [(slice(0, t_bad), None), (slice(t_bad, t_bad + 1), [1, 0]), (slice(t_bad + 1, 9), None),
              (slice(9, t_len), [3, 0])]
    state = learner.init(_params(), batch=2)
    for sl, lens in pieces:
        state = recurrent.fit_sequence(learner, state, xr[:, sl], y[:, sl], chunk_size=4,
                                       lengths=None if lens is None else np.array(lens)).state
    _assert_same_state(res.state, state)
    assert int(res.state.count) == t_len  # sequence 0 learned at every step
    if name == "rtrl":  # the frozen sequence does not advance: G carries over the skipped
        # step and the state moves only by the correction G δθ (as the joint EKF moves it)
        steps = []
        recurrent.fit_sequence(learner, learner.init(_params(), batch=2), xb[:, :t_bad + 1], yb[:, :t_bad + 1],
                               chunk_size=1, skip_bad_rows=True,
                               callback=lambda t, s, p: steps.append(
                                   (np.array(s.s), np.array(s.jac), np.array(ravel_pytree(s.core.params)[0]))))
        (s0, g0, th0), (s1, g1, th1) = steps[t_bad - 1], steps[t_bad]
        np.testing.assert_array_equal(g1[1], g0[1])
        np.testing.assert_allclose(s1[1], s0[1] + g0[1] @ (th1 - th0), rtol=1e-12, atol=1e-15)
        assert np.abs(s1[0] - s0[0]).max() > 0
    # A step that is bad in every sequence is no step at all: as if removed from the batch.
    xa = xb.copy()
    xa[0, 7, 1] = np.nan
    xa[1, 7, 0] = np.inf
    res2 = recurrent.fit_sequence(learner, learner.init(_params(), batch=2), xa[:, :9], yb[:, :9],
                                  chunk_size=4, skip_bad_rows=True)
    keep = np.arange(9) != 7
    ref2 = recurrent.fit_sequence(learner, learner.init(_params(), batch=2), xa[:, :9][:, keep],
                                  yb[:, :9][:, keep], chunk_size=4, skip_bad_rows=True)
    assert res2.skipped.shape == (2, 9) and res2.n_skipped == 3 and ref2.n_skipped == 1
    _assert_same_state(res2.state, ref2.state)
    assert int(res2.state.count) == 8


def test_values_beyond_a_float32_state_are_refused_or_skipped():
    """1e39 is finite in float64 but inf in a float32 state: refused, or skipped."""
    cell = recurrent.elman(n_inputs=2, n_state=3, dtype=jnp.float32)
    fam = families.Gaussian(0.5)
    params = cell.init(jax.random.PRNGKey(3))
    rng = np.random.default_rng(4)
    x, y = rng.normal(size=(10, 2)), rng.normal(size=10)
    xb, yb = x.copy(), y.copy()
    xb[3, 1] = 1e39
    yb[7] = -1e39
    bad = np.zeros(10, bool)
    bad[[3, 7]] = True
    for learner in (recurrent.rtrl(cell, fam, prior_var=0.5), recurrent.joint_ekf(cell, fam, prior_var=0.5)):
        state = learner.init(params)
        before = _leaves(state)
        for xs, ys, what in ((xb, y, "X"), (x, yb, "Y")):
            with pytest.raises(ValueError, match=f"{what} has values beyond the range of float32"):
                recurrent.fit_sequence(learner, state, xs, ys)
        with pytest.raises(ValueError, match="x has values beyond the range of float32"):
            learner.update(state, xb[3], y[3])
        with pytest.raises(ValueError, match="y has values beyond the range of float32"):
            learner.update(state, x[7], yb[7])
        with pytest.raises(ValueError, match="x has values beyond the range of float32"):
            learner.predict(state, xb[3])
        for a, b in zip(_leaves(state), before):
            np.testing.assert_array_equal(a, b)
        res = recurrent.fit_sequence(learner, state, xb, yb, chunk_size=4, skip_bad_rows=True)
        np.testing.assert_array_equal(res.skipped, bad)
        assert res.state.s.dtype == jnp.float32
        ref = recurrent.fit_sequence(learner, learner.init(params), x[~bad], y[~bad], chunk_size=4)
        _assert_same_state(res.state, ref.state)
        assert np.all(np.isnan(res.predictions.mean[bad]))


@pytest.mark.slow
def test_float32_forgetting_runs_with_the_square_root_core():
    """Float32 RTRL with forgetting: the square-root core runs the whole stream, finite, and
    forecasts at the noise level (the covariance-form core lost positive definiteness to
    rounding after ~1 400 steps at λ = 0.995 on this series, docs/reliability.md; a fact about
    it, not a requirement, so it is not run here).

    The network's sensitivities burst on this series (float64 too), and a float32 run can leave
    a burst with worse weights for 1 000–2 000 steps, at a place rounding decides: with this
    suite's XLA compile settings steps 2 000–3 000 had an RMSE of 0.22 and later 0.10–0.12; after
    a change of fusion alone (the same arithmetic) steps 5 000–6 000 had 0.18 and the others
    0.10–0.11 (benchmarks/rtrl_float32.py). So the forecasts are judged by the median RMSE of the
    five windows of 1 000 steps after the first."""
    cell = recurrent.elman(n_inputs=1, n_state=4)
    rng = np.random.default_rng(0)
    series = np.sin(0.3 * np.arange(6001)) + 0.1 * rng.normal(size=6001)
    x, y = series[:-1, None].astype(np.float32), series[1:].astype(np.float32)
    params = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float32), cell.init(jax.random.PRNGKey(0)))
    fam = families.Gaussian(0.1)
    out = {}
    for core, bound in (("sqrt_ekf", 1.0),):
        lrn = recurrent.rtrl(cell, fam, learner=core, prior_var=1.0, forgetting=0.995, max_variance=bound)
        res = recurrent.fit_sequence(lrn, lrn.init(params), x, y, chunk_size=1000)
        out[core] = np.asarray(res.predictions.mean, np.float64).ravel()
    assert np.all(np.isfinite(out["sqrt_ekf"]))
    windows = [np.sqrt(np.mean((out["sqrt_ekf"][i:i + 1000] - y[i:i + 1000]) ** 2)) for i in range(1000, 6000, 1000)]
    assert np.median(windows) < 0.13, windows  # the noise level is 0.1; not learning, ~0.7
