"""Recurrent models (docs/method.md §4): RTRL, natural-gradient RTRL with state correction, joint EKF.

The theorem: from the factored prior and without state noise, the joint EKF on (s, θ) and
natural-gradient RTRL with state correction produce the same (s_t, θ_t), and the joint
covariance stays [G; I] P [G; I]ᵀ. Checked step by step, in float64, at 1e-9 relative.
"""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jax.flatten_util import ravel_pytree

import kalnat
from kalnat import checkpoint, families, recurrent, schedules

T = 120
RTOL = 1e-9


# ---- helpers --------------------------------------------------------------------------


def _params(cell, seed):
    """Random parameters with a non-zero readout, so every block of θ is learned from step 1."""
    params = cell.init(jax.random.PRNGKey(seed))
    k1, k2 = jax.random.split(jax.random.PRNGKey(seed + 100))
    params["V"] = jax.random.normal(k1, params["V"].shape) / np.sqrt(cell.n_state)
    params["c"] = 0.1 * jax.random.normal(k2, params["c"].shape)
    return params


def _data(family, p, t_len, seed, batch=None):
    rng = np.random.default_rng(seed)
    lead = (t_len,) if batch is None else (batch, t_len)
    x = rng.normal(size=lead + (p,))
    drive = np.cumsum(x[..., 0], axis=-1) * 0.3
    if family.name == "categorical":
        y = (np.floor(3 * (np.sin(drive) + 1) / 2.0001) + (rng.random(lead) < 0.2)) % family.num_classes
        return x, y.astype(np.int32)
    return x, np.sin(drive) + 0.3 * rng.normal(size=lead)


@functools.lru_cache(maxsize=None)
def _trajectory_fn(learner):
    """Jitted scan recording θ_t, s_t (and the covariance-like matrix) after every step."""

    def body(state, inp):
        x, y = inp
        mask = jnp.ones(state.s.shape[0], bool)
        state, _, _ = learner.step(learner.hyper, state, x, y, mask)
        theta = ravel_pytree(state.params)[0]
        extra = state.cov if hasattr(state, "cov") else (state.jac, state.core.cov.dense())
        return state, (theta, state.s, extra)

    return jax.jit(lambda s, xs, ys: jax.lax.scan(body, s, (xs, ys))[1])


def _trajectory(learner, params, x, y, **init):
    """``x (T, p)`` or ``(B, T, p)``: returns θ_t ``(T, d)``, s_t ``(T, B, n)``, extra."""
    state = learner.init(params, **init)
    if x.ndim == 2:
        x, y = x[:, None], y[:, None]
    else:
        x, y = np.swapaxes(x, 0, 1), np.swapaxes(y, 0, 1)
    return _trajectory_fn(learner)(state, jnp.asarray(x), jnp.asarray(y))


def _rel(a, b):
    """Largest deviation over the trajectory, relative to the size of the reference."""
    a, b = np.asarray(a), np.asarray(b)
    return np.abs(a - b).max() / max(np.abs(b).max(), 1e-300)


CELLS = {
    "elman": recurrent.elman(n_inputs=2, n_state=3, n_outputs=1),
    "gru": recurrent.gru(n_inputs=2, n_state=3, n_outputs=1),
    "elman3": recurrent.elman(n_inputs=2, n_state=3, n_outputs=2),
    "gru3": recurrent.gru(n_inputs=2, n_state=3, n_outputs=2),
}
FAMILIES = {"gaussian": families.Gaussian(0.5), "categorical": families.Categorical(3)}


@functools.lru_cache(maxsize=None)
def _pair(cell_name, fam_name, forgetting, learner="ekf", **extra):
    """(natural-gradient RTRL, joint EKF) with the same prior and forgetting, built once."""
    cell_key = cell_name + ("3" if fam_name == "categorical" else "")
    cell, fam = CELLS[cell_key], FAMILIES[fam_name]
    prior = 0.5
    if learner == "natural_gradient":
        opts = schedules.kalman_to_natural(prior_var=prior, forgetting=forgetting)._asdict()
    else:
        opts = dict(prior_var=prior, forgetting=forgetting)
    ng = recurrent.rtrl(cell, fam, learner=learner, **opts, **extra)
    return cell, fam, ng, _joint(cell_key, fam_name, forgetting)


@functools.lru_cache(maxsize=None)
def _joint(cell_key, fam_name, forgetting):
    return recurrent.joint_ekf(CELLS[cell_key], FAMILIES[fam_name], prior_var=0.5, forgetting=forgetting)


# ---- the theorem: joint EKF == natural-gradient RTRL with state correction --------------


@pytest.mark.parametrize("forgetting", [1.0, 0.99], ids=["static", "fading"])
@pytest.mark.parametrize("fam_name", ["gaussian", "categorical"])
@pytest.mark.parametrize("cell_name", ["elman", "gru"])
def test_joint_ekf_equals_natural_gradient_rtrl(cell_name, fam_name, forgetting):
    cell, fam, ng, joint = _pair(cell_name, fam_name, forgetting)
    params = _params(cell, seed=3)
    x, y = _data(fam, 2, T, seed=4)
    th_a, s_a, (jac, p_theta) = _trajectory(ng, params, x, y)
    th_b, s_b, p_joint = _trajectory(joint, params, x, y)
    # The parameters actually moved (else equality would be trivial).
    assert np.abs(th_a[-1] - ravel_pytree(params)[0]).max() > 1e-2
    assert _rel(th_a, th_b) < RTOL
    assert _rel(s_a, s_b) < RTOL
    # The joint filter's parameter block is the EKF's P_t, its G_t = P^{sθ} (P^{θθ})⁻¹ is RTRL's.
    n = cell.n_state
    assert _rel(p_joint[:, n:, n:], p_theta) < RTOL
    g_joint = np.linalg.solve(p_joint[:, n:, n:], np.swapaxes(p_joint[:, :n, n:], 1, 2))
    assert _rel(np.swapaxes(g_joint, 1, 2), jac[:, 0]) < RTOL


class _Unbounded(families.Poisson):
    log_step_slack = None  # the EKF's own step, never shortened


def test_joint_ekf_equals_natural_gradient_rtrl_where_a_count_bounds_the_step():
    """Counts at a wide prior (variance 10): the Poisson step is shortened where it would pass
    the count (kalnat.filter.bounded_step; without the bound the trajectory differs by more
    than 1e-2), in RTRL's δθ and in the joint filter's step on (s, θ) alike, and the two stay
    one filter."""
    cell = CELLS["elman"]
    rng = np.random.default_rng(9)
    x = rng.normal(size=(T, 2))
    y = rng.poisson(np.exp(1.5 * np.sin(np.cumsum(x[:, 0]) * 0.3))).astype(np.float64)
    params = _params(cell, seed=10)
    opts = dict(prior_var=10.0, forgetting=1.0)  # (at 0.99 rounding alone parts them by 1e-8, bound or not)
    ng = recurrent.rtrl(cell, families.Poisson(), **opts)
    th_a, s_a, _ = _trajectory(ng, params, x, y)
    th_b, s_b, _ = _trajectory(recurrent.joint_ekf(cell, families.Poisson(), **opts), params, x, y)
    th_c, _, _ = _trajectory(recurrent.rtrl(cell, _Unbounded(), **opts), params, x, y)
    assert _rel(th_c, th_a) > 1e-2  # the bound changed the steps
    assert _rel(th_a, th_b) < RTOL
    assert _rel(s_a, s_b) < RTOL


@pytest.mark.parametrize("learner", ["information", "natural_gradient"])
def test_any_core_learner_gives_the_same_trajectory(learner):
    cell, fam, ng, joint = _pair("elman", "gaussian", 0.99, learner)
    params = _params(cell, seed=5)
    x, y = _data(fam, 2, T, seed=6)
    th_a, s_a, _ = _trajectory(ng, params, x, y)
    th_b, s_b, _ = _trajectory(joint, params, x, y)
    assert _rel(th_a, th_b) < RTOL
    assert _rel(s_a, s_b) < RTOL


def test_factored_covariance_is_preserved():
    cell, fam, ng, joint = _pair("gru", "gaussian", 0.99)
    params = _params(cell, seed=7)
    x, y = _data(fam, 2, T, seed=8)
    _, _, p = _trajectory(joint, params, x, y)
    _, _, (jac, _) = _trajectory(ng, params, x, y)
    n = cell.n_state
    p = np.asarray(p)
    pss, pst, ptt = p[:, :n, :n], p[:, :n, n:], p[:, n:, n:]
    # Schur complement of the parameter block: zero iff P = [G; I] P^θθ [G; I]ᵀ.
    schur = pss - pst @ np.linalg.solve(ptt, np.swapaxes(pst, 1, 2))
    scale = np.abs(pss).max(axis=(1, 2))
    assert np.all(scale > 1e-6)  # the state block is not trivially zero
    assert np.max(np.abs(schur).max(axis=(1, 2)) / scale) < 1e-9
    rebuilt = jax.vmap(recurrent.factored_covariance)(jac, ptt)
    assert _rel(rebuilt, p) < 1e-8


def test_factored_form_with_nonzero_initial_jacobian():
    """The theorem holds for any G_0, not only G_0 = 0."""
    cell, fam, ng, joint = _pair("elman", "gaussian", 1.0)
    params = _params(cell, seed=9)
    d = ravel_pytree(params)[0].shape[0]
    jac0 = 0.1 * np.random.default_rng(10).normal(size=(cell.n_state, d))
    x, y = _data(fam, 2, T, seed=11)
    th_a, s_a, _ = _trajectory(ng, params, x, y, jac0=jac0)
    th_b, s_b, _ = _trajectory(joint, params, x, y, jac0=jac0)
    assert _rel(th_a, th_b) < RTOL and _rel(s_a, s_b) < RTOL


def test_batch_of_sequences_joint_equals_rtrl():
    """B sequences sharing θ: z = (s¹, …, s^B, θ); the theorem carries over."""
    cell, fam, ng, joint = _pair("elman", "categorical", 0.99)
    params = _params(cell, seed=12)
    x, y = _data(fam, 2, T, seed=13, batch=3)
    th_a, s_a, _ = _trajectory(ng, params, x, y, batch=3)
    th_b, s_b, _ = _trajectory(joint, params, x, y, batch=3)
    assert s_a.shape == (T, 3, cell.n_state)
    assert _rel(th_a, th_b) < RTOL and _rel(s_a, s_b) < RTOL


# ---- what breaks the equality (so the checks above can fail) ---------------------------


def test_without_state_correction_the_trajectories_differ():
    cell, fam, _, joint = _pair("elman", "gaussian", 0.99)
    plain = recurrent.rtrl(cell, fam, prior_var=0.5, forgetting=0.99, correct_state=False)
    params = _params(cell, seed=3)
    x, y = _data(fam, 2, T, seed=4)
    th_a, s_a, _ = _trajectory(plain, params, x, y)
    th_b, s_b, _ = _trajectory(joint, params, x, y)
    assert _rel(th_a, th_b) > 1e-3 and _rel(s_a, s_b) > 1e-3


def test_state_noise_gives_a_different_valid_filter():
    cell, fam, ng, _ = _pair("elman", "gaussian", 1.0)
    noisy = recurrent.joint_ekf(cell, fam, prior_var=0.5, state_noise=1e-2)
    params = _params(cell, seed=3)
    x, y = _data(fam, 2, T, seed=4)
    th_a, _, _ = _trajectory(ng, params, x, y)
    th_b, _, p = _trajectory(noisy, params, x, y)
    assert _rel(th_a, th_b) > 1e-3
    n = cell.n_state
    p = np.asarray(p)
    schur = p[:, :n, :n] - p[:, :n, n:] @ np.linalg.solve(p[:, n:, n:], np.swapaxes(p[:, :n, n:], 1, 2))
    assert np.abs(schur).max() > 1e-4  # no longer factored
    assert np.linalg.eigvalsh(p[-1]).min() > -1e-10  # still a covariance


def test_joseph_form_and_parameter_noise():
    """The Joseph form is the same filter; noise on θ alone breaks the equality (docs/method.md §4)."""
    cell, fam, ng, joint = _pair("elman", "gaussian", 1.0)
    params = _params(cell, seed=3)
    x, y = _data(fam, 2, T, seed=4)
    th_ref, s_ref, _ = _trajectory(joint, params, x, y)
    joseph = recurrent.joint_ekf(cell, fam, prior_var=0.5, joseph=True)
    th_j, s_j, _ = _trajectory(joseph, params, x, y)
    assert _rel(th_j, th_ref) < RTOL and _rel(s_j, s_ref) < RTOL
    noisy = recurrent.joint_ekf(cell, fam, prior_var=0.5, process_noise=1e-3)
    th_n, _, _ = _trajectory(noisy, params, x, y)
    assert _rel(th_n, th_ref) > 1e-3


def test_general_initial_covariance():
    cell, fam, ng, _ = _pair("elman", "gaussian", 1.0)
    params = _params(cell, seed=3)
    d = ravel_pytree(params)[0].shape[0]
    n = cell.n_state
    joint = recurrent.joint_ekf(cell, fam, prior_var=0.5)
    cov = np.diag(np.r_[np.zeros(n), np.full(d, 0.5)])
    x, y = _data(fam, 2, T, seed=4)
    # The factored prior written out by hand is the default prior.
    th_a, _, _ = _trajectory(joint, params, x, y, cov=cov)
    th_b, _, _ = _trajectory(joint, params, x, y)
    assert _rel(th_a, th_b) < 1e-12
    cov[:n, :n] += 0.2 * np.eye(n)
    th_c, _, _ = _trajectory(joint, params, x, y, cov=cov)
    assert _rel(th_c, th_b) > 1e-4
    with pytest.raises(ValueError, match="positive semi-definite"):
        joint.init(params, cov=-np.eye(n + d))
    with pytest.raises(ValueError, match="shape"):
        joint.init(params, cov=np.eye(d))


# ---- RTRL Jacobian == Jacobian of the unrolled recurrence ------------------------------


@pytest.mark.parametrize("cell_name", ["elman", "gru"])
def test_rtrl_jacobian_equals_unrolled_jacfwd(cell_name):
    cell = CELLS[cell_name]
    params = _params(cell, seed=14)
    theta, unravel = ravel_pytree(params)
    x, _ = _data(FAMILIES["gaussian"], 2, 40, seed=15)
    s_rtrl, g_rtrl = recurrent.rtrl_forward(cell, params, x)

    def unrolled(th):
        p = unravel(th)

        def body(s, xt):
            s = cell.transition(p, s, xt)
            return s, s

        return jax.lax.scan(body, cell.init_state(p), x)[1]

    g_ref = jax.jacfwd(unrolled)(theta)  # (T, n, d), through the whole sequence
    assert np.abs(g_ref).max() > 1e-2
    assert _rel(g_rtrl, g_ref) < 1e-12
    assert _rel(s_rtrl, unrolled(theta)) < 1e-14


def test_user_defined_cell():
    """Any transition/readout pair on any pytree: here a leaky linear cell with a dict of arrays."""

    def transition(p, s, x):
        return p["a"] * s + jnp.tanh(p["w"] @ x)

    def readout(p, s):
        return jnp.atleast_1d(p["v"] @ s)

    cell = recurrent.recurrent_model(transition, readout, n_state=2, input_shape=(2,), n_outputs=1)
    params = {"a": jnp.array([0.5, -0.3]), "w": jnp.array([[0.4, 0.1], [-0.2, 0.7]]),
              "v": jnp.array([1.0, -0.5])}
    fam = families.Gaussian(0.5)
    ng = recurrent.rtrl(cell, fam, prior_var=0.5)
    joint = recurrent.joint_ekf(cell, fam, prior_var=0.5)
    x, y = _data(fam, 2, 100, seed=16)
    th_a, s_a, _ = _trajectory(ng, params, x, y)
    th_b, s_b, _ = _trajectory(joint, params, x, y)
    assert _rel(th_a, th_b) < RTOL and _rel(s_a, s_b) < RTOL
    with pytest.raises(ValueError, match="no init"):
        cell.init(jax.random.PRNGKey(0))


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)
@given(seed=st.integers(0, 10_000), scale=st.floats(0.2, 2.0), cell_name=st.sampled_from(["elman", "gru"]),
       forgetting=st.sampled_from([1.0, 0.99]))
def test_property_random_problems(seed, scale, cell_name, forgetting):
    """Random parameters (readout scaled by ``scale``) and random data: the theorem holds."""
    cell, fam, ng, joint = _pair(cell_name, "gaussian", forgetting)
    params = _params(cell, seed)
    params["V"] = scale * params["V"]
    x, y = _data(fam, 2, T, seed)
    th_a, s_a, _ = _trajectory(ng, params, x, y)
    th_b, s_b, _ = _trajectory(joint, params, x, y)
    assert _rel(th_a, th_b) < RTOL and _rel(s_a, s_b) < RTOL


# ---- the sequence driver ---------------------------------------------------------------


def test_fit_sequence_chunks_and_pieces_are_one_stream(tmp_path):
    cell, fam, ng, _ = _pair("elman", "gaussian", 0.99)
    params = _params(cell, seed=17)
    x, y = _data(fam, 2, 100, seed=18)
    whole = recurrent.fit_sequence(ng, ng.init(params), x, y, chunk_size=256)
    chunked = recurrent.fit_sequence(ng, ng.init(params), x, y, chunk_size=10)
    first = recurrent.fit_sequence(ng, ng.init(params), x[:37], y[:37], chunk_size=10)
    # A checkpoint in the middle of the stream (θ, P, s, G) restores the same learner.
    checkpoint.save(tmp_path / "mid.npz", first.state)
    restored = checkpoint.load(tmp_path / "mid.npz", ng.init(params))
    second = recurrent.fit_sequence(ng, restored, x[37:], y[37:], chunk_size=10)
    # no steps: the state as it was, and predictions and log-likelihoods of no steps, shaped as
    # those of one (they were None)
    none = recurrent.fit_sequence(ng, first.state, x[:0], y[:0])
    assert none.state is first.state and none.log_likelihood.shape == (0,)
    for a, b in zip(none.predictions, first.predictions):
        assert (a is None) == (b is None) and (a is None or a.shape == (0,) + b.shape[1:])
    th = ravel_pytree(whole.state.params)[0]
    for other in (chunked.state, second.state):
        assert _rel(ravel_pytree(other.params)[0], th) < 1e-12
        assert _rel(other.s, whole.state.s) < 1e-12
    assert int(second.state.count) == 100
    means = np.concatenate([first.predictions.mean, second.predictions.mean])
    assert whole.predictions.mean.shape == (100, 1)
    assert _rel(chunked.predictions.mean, whole.predictions.mean) < 1e-12
    assert _rel(means, whole.predictions.mean) < 1e-12
    # Pieces of any length with fixed_chunk: one compiled program, the same stream (padded
    # steps are frozen: no transition, no observation)
    from kalnat.stream import chunk_fn
    state, pieces, programs = ng.init(params), [], chunk_fn(ng, True)._cache_size()
    for a, b in ((0, 7), (7, 20), (20, 23), (23, 100)):
        res = recurrent.fit_sequence(ng, state, x[a:b], y[a:b], chunk_size=16, fixed_chunk=True)
        state = res.state
        pieces.append(res.predictions.mean)
    assert _rel(ravel_pytree(state.params)[0], th) < 1e-12 and int(state.count) == 100
    assert _rel(np.concatenate(pieces), whole.predictions.mean) < 1e-12
    assert chunk_fn(ng, True)._cache_size() <= programs + 1   # one for chunk_size 16, not one a length
    # Predict-then-update: the first prediction uses θ_0 and s_1 = f(θ_0, s_0, x_1).
    s1 = cell.transition(params, cell.init_state(params), x[0])
    np.testing.assert_allclose(whole.predictions.mean[0], cell.readout(params, s1), rtol=1e-12)


def test_fit_sequence_matches_update_and_joint_predictive():
    cell, fam, ng, joint = _pair("elman", "categorical", 0.99)
    params = _params(cell, seed=19)
    x, y = _data(fam, 2, 30, seed=20)
    ra = recurrent.fit_sequence(ng, ng.init(params), x, y, chunk_size=10)
    rb = recurrent.fit_sequence(joint, joint.init(params), x, y, chunk_size=10)
    for field in ("mean", "mean_cov", "obs_cov", "probs"):
        assert _rel(getattr(ra.predictions, field), getattr(rb.predictions, field)) < RTOL
    np.testing.assert_allclose(ra.predictions.probs.sum(-1), 1.0, rtol=1e-12)
    state = ng.init(params)
    for t in range(3):
        state, pred = ng.update(state, x[t], y[t])
        np.testing.assert_allclose(pred.mean, ra.predictions.mean[t], rtol=1e-12)


def test_batch_with_lengths_freezes_finished_sequences():
    """Past its length a sequence is frozen: its padding is neither data nor an error (NaN, a
    label that is no class), its predictions there are NaN and its log-likelihoods 0."""
    cell, fam, ng, joint = _pair("elman", "categorical", 0.99)
    params = _params(cell, seed=21)
    x, y = _data(fam, 2, 50, seed=22, batch=2)
    lengths = np.array([50, 20])
    x2, y2 = x.copy(), y.copy()
    x2[1, 20:] = np.nan  # padding: must not matter
    y2[1, 20:] = -1
    for learner in (ng, joint):
        a = recurrent.fit_sequence(learner, learner.init(params, batch=2), x, y, lengths=lengths, chunk_size=8)
        b = recurrent.fit_sequence(learner, learner.init(params, batch=2), x2, y2, lengths=lengths, chunk_size=8)
        assert a.predictions.mean.shape == (2, 50, 2)
        assert _rel(ravel_pytree(a.state.params)[0], ravel_pytree(b.state.params)[0]) < 1e-14
        assert _rel(a.state.s, b.state.s) < 1e-14
        for field in ("mean", "mean_cov", "obs_cov", "probs"):
            got = getattr(a.predictions, field)
            assert np.isnan(got[1, 20:]).all() and np.isfinite(got[:, :20]).all() and np.isfinite(got[0]).all()
            np.testing.assert_array_equal(got, getattr(b.predictions, field))
        np.testing.assert_array_equal(a.log_likelihood[1, 20:], 0.0)
        assert not a.skipped.any()
    with pytest.raises(ValueError, match="X contains NaN"):  # within its length it is data
        recurrent.fit_sequence(ng, ng.init(params, batch=2), x2, y, lengths=np.array([50, 21]))
    with pytest.raises(ValueError, match="labels"):
        recurrent.fit_sequence(ng, ng.init(params, batch=2), x, y2, lengths=np.array([50, 21]))
    # Past its end, sequence 2 does not advance: its G stays where its 20th step left it and
    # its state moves only by the correction for θ's change, G (θ_50 − θ_20).
    c = recurrent.fit_sequence(ng, ng.init(params, batch=2), x[:, :20], y[:, :20], chunk_size=10)
    s_at_20, g_at_20 = np.array(c.state.s), np.array(c.state.jac)
    theta_20 = np.array(ravel_pytree(c.state.core.params)[0])
    e = recurrent.fit_sequence(ng, c.state, x[:, 20:], y[:, 20:], lengths=np.array([30, 0]), chunk_size=10)
    d = recurrent.fit_sequence(ng, ng.init(params, batch=2), x, y, lengths=lengths, chunk_size=10)
    np.testing.assert_array_equal(e.state.jac[1], g_at_20[1])
    moved = g_at_20[1] @ (np.array(ravel_pytree(e.state.core.params)[0]) - theta_20)
    assert _rel(e.state.s[1], s_at_20[1] + moved) < 1e-12
    assert np.abs(moved).max() > 1e-6
    assert _rel(d.state.s, e.state.s) < 1e-12
    assert np.abs(d.state.s[0] - s_at_20[0]).max() > 1e-3  # sequence 1 went on
    # The theorem holds with frozen sequences: the joint EKF corrects them the same way.
    j = recurrent.fit_sequence(joint, joint.init(params, batch=2), x, y, lengths=lengths, chunk_size=10)
    assert _rel(ravel_pytree(j.state.params)[0], ravel_pytree(d.state.core.params)[0]) < RTOL
    assert _rel(j.state.s, d.state.s) < RTOL
    for field in ("mean", "mean_cov", "obs_cov"):
        assert _rel(getattr(j.predictions, field)[:, :20], getattr(d.predictions, field)[:, :20]) < RTOL


def test_divergence_raises_with_or_without_predictions():
    """Fading memory on an input that is always 0, in float32: the dead weights' variance grows
    as λ^{-t} until it overflows. Without predictions it returned a NaN state silently."""
    cell, fam = CELLS["elman"], FAMILIES["gaussian"]
    params = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float32), _params(cell, seed=41))
    x, y = _data(fam, 2, 200, seed=42)
    x[:, 1] = 0.0
    for build in (recurrent.rtrl, recurrent.joint_ekf):
        learner = build(cell, fam, forgetting=0.5)
        with pytest.raises(kalnat.Diverged) as kept:
            recurrent.fit_sequence(learner, learner.init(params), x, y, chunk_size=64)
        with pytest.raises(kalnat.Diverged) as quiet:
            recurrent.fit_sequence(learner, learner.init(params), x, y, chunk_size=64, return_predictions=False)
        assert 0 < quiet.value.row == kept.value.row < 200


def test_independent_learners_by_vmap():
    """One θ per sequence: the pure step vmapped over stacked states equals separate runs."""
    cell, fam, ng, _ = _pair("elman", "gaussian", 1.0)
    params = [_params(cell, seed) for seed in range(3)]
    stacked = jax.tree_util.tree_map(lambda *a: jnp.stack(a), *[ng.init(p) for p in params])
    x, y = _data(fam, 2, 20, seed=27, batch=3)
    step = jax.jit(jax.vmap(lambda s, xt, yt, m: ng.step(ng.hyper, s, xt, yt, m)))
    for t in range(20):
        stacked, _, _ = step(stacked, x[:, t, None], y[:, t, None], jnp.ones((3, 1), bool))
    for i, p in enumerate(params):
        alone = recurrent.fit_sequence(ng, ng.init(p), x[i], y[i]).state
        assert _rel(ravel_pytree(jax.tree_util.tree_map(lambda a: a[i], stacked.params))[0],
                    ravel_pytree(alone.params)[0]) < 1e-12
        assert _rel(stacked.s[i], alone.s) < 1e-12


def test_advance_moves_the_state_without_learning():
    cell, fam, ng, joint = _pair("elman", "gaussian", 1.0)
    params = _params(cell, seed=23)
    x, _ = _data(fam, 2, 5, seed=24)
    for learner in (ng, joint):
        state = learner.init(params)
        theta0 = ravel_pytree(state.params)[0]
        s_ref = cell.init_state(params)
        for t in range(5):
            state, pred = learner.advance(state, x[t])
            s_ref = cell.transition(params, s_ref, x[t])
            np.testing.assert_allclose(pred.mean, cell.readout(params, s_ref), rtol=1e-12)
        assert _rel(ravel_pytree(state.params)[0], theta0) == 0
        np.testing.assert_allclose(state.s[0], s_ref, rtol=1e-12)


def test_advance_leaves_theta_and_its_covariance_alone_in_both_learners():
    """advance is a time step without an observation: with process noise on θ, rtrl's core
    state does not move, and neither does the joint EKF's θ block (it gained q_θ per advance)."""
    cell, fam = CELLS["elman"], FAMILIES["gaussian"]
    params = _params(cell, seed=35)
    x, _ = _data(fam, 2, 3, seed=36)
    ng = recurrent.rtrl(cell, fam, prior_var=0.5, process_noise=0.1)
    joint = recurrent.joint_ekf(cell, fam, prior_var=0.5, process_noise=0.1)
    a, b = ng.init(params), joint.init(params)
    for t in range(3):
        a, _ = ng.advance(a, x[t])
        b, _ = joint.advance(b, x[t])
    n, p = cell.n_state, np.asarray(a.core.cov.dense())
    np.testing.assert_allclose(b.cov[n:, n:], p, rtol=1e-12)
    np.testing.assert_allclose(b.cov[n:, n:], 0.5 * np.eye(p.shape[0]), rtol=1e-12)
    np.testing.assert_allclose(b.cov, np.asarray(recurrent.factored_covariance(a.jac, p)), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(b.s, a.s, rtol=1e-12)
    assert int(a.count) == int(b.count) == 0


def test_state_noise_skips_frozen_sequences():
    """A frozen sequence has no transition, hence no state noise: with G_0 = 0 and length 0 its
    rows of the joint covariance stay zero (they grew by q_s at every step)."""
    cell, fam = CELLS["elman"], FAMILIES["gaussian"]
    params = _params(cell, seed=37)
    x, y = _data(fam, 2, 6, seed=38, batch=2)
    joint = recurrent.joint_ekf(cell, fam, prior_var=0.5, state_noise=0.01)
    out = recurrent.fit_sequence(joint, joint.init(params, batch=2), x, y, lengths=np.array([6, 0]))
    n = cell.n_state
    np.testing.assert_array_equal(np.asarray(out.state.cov)[n:2 * n], 0.0)
    assert np.abs(np.asarray(out.state.cov)[:n, :n]).max() > 1e-3  # sequence 0 did gain its noise


# ---- validation --------------------------------------------------------------------------


def test_bad_input_raises_before_touching_the_state():
    cell, fam, ng, joint = _pair("elman", "categorical", 0.99)
    params = _params(cell, seed=25)
    x, y = _data(fam, 2, 10, seed=26)
    for learner in (ng, joint):
        state = learner.init(params)
        bad_x = x.copy()
        bad_x[3, 1] = np.nan
        with pytest.raises(ValueError, match="NaN"):
            recurrent.fit_sequence(learner, state, bad_x, y)
        with pytest.raises(ValueError, match="labels"):
            recurrent.fit_sequence(learner, state, x, np.where(np.arange(10) == 4, 3, y))
        with pytest.raises(ValueError, match="shape"):
            recurrent.fit_sequence(learner, state, x[:, :1], y)
        with pytest.raises(ValueError, match="Y must have shape"):
            recurrent.fit_sequence(learner, state, x, y[:9])
        with pytest.raises(ValueError, match="lengths"):
            recurrent.fit_sequence(learner, state, x, y, lengths=[11])
        with pytest.raises(ValueError, match=r"^X must have shape \(2, T\) \+ \(2,\) for this state of 2 "
                                             r"sequences, got \(10, 2\)$"):
            recurrent.fit_sequence(learner, learner.init(params, batch=2), x, y)
        with pytest.raises(ValueError, match="NaN"):
            learner.update(state, np.array([np.inf, 0.0]), 1)
        with pytest.raises(ValueError, match="shape"):
            learner.update(state, np.zeros(3), 1)
        # The state is intact and usable.
        out = recurrent.fit_sequence(learner, state, x, y, chunk_size=10)
        assert np.isfinite(ravel_pytree(out.state.params)[0]).all()
    with pytest.raises(ValueError, match="outputs"):
        recurrent.rtrl(recurrent.elman(2, 3, n_outputs=1), families.Categorical(3))
    with pytest.raises(ValueError, match="learner"):
        recurrent.rtrl(cell, fam, learner="sgd")
    with pytest.raises(ValueError, match="forgetting"):
        recurrent.joint_ekf(cell, fam, forgetting=1.5)
    with pytest.raises(ValueError, match="state_noise"):
        recurrent.joint_ekf(cell, fam, state_noise=-1.0)
    with pytest.raises(ValueError, match="s0"):
        ng.init(params, s0=np.zeros(5))
    with pytest.raises(ValueError, match="NaN"):
        ng.init(jax.tree_util.tree_map(lambda a: a * np.nan, params))


def test_what_the_recurrent_learners_refuse_is_named():
    """The constructors', init's and update's refusals that the test above leaves out, each
    message checked: a cell or family of the wrong kind, a bad state_var, s0 or G_0, a joint
    covariance given with G_0, not finite or not symmetric, another learner's state, x that is
    not numbers, and a joint EKF's forgetting and process noise given at init."""
    cell, fam, ng, joint = _pair("elman", "categorical", 0.99)
    params = _params(cell, seed=25)
    n, d = cell.n_state, ravel_pytree(params)[0].shape[0]
    size = n + d
    refused = [
        (lambda: recurrent.rtrl(object(), fam), "cell must be a kalnat.recurrent.RecurrentModel, got object"),
        (lambda: recurrent.joint_ekf(cell, "categorical"), "family must be a kalnat family, got str"),
        (lambda: recurrent.joint_ekf(cell, fam, state_var=-1.0),
         f"state_var must be a non-negative scalar or ({n},) vector"),
        (lambda: ng.init(params, s0=np.full(n, np.nan)), "s0 contains NaN or inf"),
        (lambda: ng.init(params, jac0=np.zeros((n, d + 1))),
         f"jac0 must have shape ({n}, {d}) or (1, {n}, {d}), got ({n}, {d + 1})"),
        (lambda: ng.init(params, jac0=np.full((n, d), np.inf)), "jac0 contains NaN or inf"),
        (lambda: joint.init(params, cov=np.eye(size), jac0=np.zeros((n, d))), "give either cov or jac0, not both"),
        (lambda: joint.init(params, cov=np.full((size, size), np.nan)), "cov contains NaN or inf"),
        (lambda: joint.init(params, cov=np.eye(size) + np.triu(np.ones((size, size)), 1)), "cov must be symmetric"),
        (lambda: ng.update(joint.init(params), np.zeros(2), 1), "expected a RTRLState, got JointState"),
        (lambda: ng.update(ng.init(params), np.array(["a", "b"]), 1), "x must be numeric, got dtype <U1"),
        (lambda: joint.init(params, joint.hyper._replace(forgetting=0.0)), "forgetting must lie in (0, 1], got 0.0"),
        (lambda: joint.init(params, joint.hyper._replace(process_noise=-1.0)),
         "process_noise must be finite and non-negative"),
        (lambda: recurrent.rtrl(cell, fam, learner=3), "learner must be a name or a learner constructor, got int"),
        (lambda: recurrent.rtrl(cell, fam, learner=lambda *a, **k: None),
         "learner must build a kalnat Learner (kalnat.ekf, kalnat.natural_gradient, …)"),
    ]
    for make, said in refused:
        with pytest.raises(ValueError, match=re.escape(said)):
            make()


def test_rtrl_takes_a_learner_constructor_as_well_as_its_name():
    """``learner=kalnat.ekf`` (any constructor of a core learner) is the core ``learner="ekf"``
    names: the same step."""
    cell, fam = CELLS["elman"], FAMILIES["gaussian"]
    params = _params(cell, seed=41)
    x, y = _data(fam, 2, 3, seed=42)
    built = []

    def ekf(model, family, **options):   # kalnat.ekf, seen being called
        built.append((model, options["input_shape"]))
        return kalnat.ekf(model, family, **options)

    by_name, given = (recurrent.rtrl(cell, fam, learner=core, prior_var=0.5, forgetting=0.99)
                      for core in ("ekf", ekf))
    assert built == [(cell.readout, (cell.n_state,))]   # the constructor given built the core, on the readout
    a, b = (recurrent.fit_sequence(lrn, lrn.init(params), x, y).state for lrn in (by_name, given))
    for u, v in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_array_equal(u, v)


def test_joint_ekf_refuses_a_forgetting_its_schedule_would_ignore():
    cell, fam = CELLS["elman"], FAMILIES["gaussian"]
    params = _params(cell, seed=31)
    x, y = _data(fam, 2, 4, seed=32)
    for build in (recurrent.rtrl, recurrent.joint_ekf):
        learner = build(cell, fam, prior_var=0.5, forgetting=lambda t: 0.99)
        with pytest.raises(ValueError, match="fixed schedule of t; hyper.forgetting = 0.9 would be ignored"):
            recurrent.fit_sequence(learner, learner.init(params), x, y, hyper=learner.hyper._replace(forgetting=0.9))


def test_joint_ekf_checks_process_noise_against_d_at_init():
    cell = CELLS["elman"]
    params = _params(cell, seed=33)
    d = ravel_pytree(params)[0].shape[0]
    learner = recurrent.joint_ekf(cell, FAMILIES["gaussian"], process_noise=np.ones(5))
    with pytest.raises(ValueError, match=rf"process_noise must be a scalar or \({d},\), got shape \(5,\)"):
        learner.init(params)
    ok = recurrent.joint_ekf(cell, FAMILIES["gaussian"], process_noise=np.full(d, 1e-3))
    assert ok.init(params).cov.shape == (cell.n_state + d,) * 2


def test_params_and_cells_that_do_not_fit_are_refused_at_init():
    cell, fam = CELLS["elman"], FAMILIES["gaussian"]
    params = _params(cell, seed=43)
    ng, joint = _pair("elman", "gaussian", 1.0)[2:]
    no_b = {k: v for k, v in params.items() if k != "b"}
    wide_u = dict(params, U=jnp.zeros((3, 5)))
    for learner in (ng, joint):
        with pytest.raises(ValueError, match="the cell's transition cannot run on these params.*KeyError"):
            learner.init(no_b)
        with pytest.raises(ValueError, match="the cell's transition cannot run on these params"):
            learner.init(wide_u)
        with pytest.raises(ValueError, match="transition cannot run"):
            learner.init(CELLS["gru"].init(jax.random.PRNGKey(0)))

    def grows(p, s, x):
        return jnp.concatenate([cell.transition(p, s, x), s[:1]])

    def read(p, s):
        return cell.readout(p, s)

    for bad, what in ((recurrent.recurrent_model(grows, read, n_state=3, input_shape=(2,), n_outputs=1),
                       r"transition gives a state of shape \(4,\)"),
                      (recurrent.recurrent_model(cell.transition, read, n_state=3, input_shape=(2,), n_outputs=1,
                                                 init_state=lambda p: jnp.zeros(2)),
                       r"init_state gives shape \(2,\), not \(3,\)")):
        for build in (recurrent.rtrl, recurrent.joint_ekf):
            with pytest.raises(ValueError, match=what):
                build(bad, fam).init(params)
    for shape in (2, (-1,), (2.0,), "2"):
        with pytest.raises(ValueError, match="input_shape must be a tuple of non-negative integers"):
            recurrent.recurrent_model(cell.transition, read, n_state=3, input_shape=shape, n_outputs=1)


@pytest.mark.slow
def test_float32_long_stream_is_stable():
    cell = recurrent.elman(n_inputs=1, n_state=3, dtype=jnp.float32)
    fam = families.Gaussian(0.1)
    params = cell.init(jax.random.PRNGKey(0))
    t = np.arange(3001)
    series = (np.sin(2 * np.pi * t / 23.0) + 0.1 * np.random.default_rng(0).normal(size=t.size)).astype(np.float32)
    for learner in (recurrent.rtrl(cell, fam, prior_var=1.0), recurrent.joint_ekf(cell, fam, prior_var=1.0)):
        out = recurrent.fit_sequence(learner, learner.init(params), series[:-1, None], series[1:], chunk_size=1000)
        assert out.state.s.dtype == jnp.float32
        cov = out.state.core.cov.dense() if learner.name == "rtrl" else out.state.cov
        assert np.isfinite(np.asarray(cov)).all()
        err = out.predictions.mean[-1000:, 0] - series[-1000:]
        assert np.sqrt(np.mean(err ** 2)) < 0.12  # the noise level is 0.1: it learned the oscillation


def test_recurrent_learners_that_differ_only_in_hyperparameters_share_programs_and_learn_as_if_alone():
    """kalnat.programs.once: an RTRL or joint-EKF learner built again on the same cell and
    family with another prior, forgetting or process noise runs the chunk and one-step programs
    (update, predict, advance) of a live equal learner, and learns exactly what it learns with
    programs of its own; a learner that differs in what its programs hold (the core learner, the
    state correction, the Joseph form, the state noise, a schedule of λ, the cell, the family),
    or whose functions are not the ones its constructor made, has another key or none."""
    import dataclasses

    from kalnat.stream import chunk_fn
    cell, fam = CELLS["elman"], FAMILIES["gaussian"]
    params = _params(cell, seed=3)
    x, y = _data(fam, 2, 30, seed=4)
    one_step = ("_update_jit", "_predict_jit", "_advance_jit")

    def run(learner):  # a fit, then one step learned, one predicted and one advanced
        res = recurrent.fit_sequence(learner, learner.init(params), x, y)
        learned = [np.array(a) for a in jax.tree_util.tree_leaves((res.state, res.predictions))]
        state, pred = learner.update(res.state, x[0], y[0])  # (res.state donated)
        learned += [np.array(a) for a in jax.tree_util.tree_leaves((state, pred, learner.predict(state, x[1])))]
        return learned + [np.asarray(a) for a in jax.tree_util.tree_leaves(learner.advance(state, x[2]))]

    for build, first_kw, kws in (
            (recurrent.rtrl, dict(prior_var=1.0), [dict(prior_var=2.0, forgetting=0.95), dict(process_noise=1e-3)]),
            (recurrent.joint_ekf, dict(prior_var=1.0, state_noise=0.01),
             [dict(prior_var=0.3, forgetting=0.9, state_noise=0.01), dict(process_noise=1e-3, state_noise=0.01)])):
        first = build(cell, fam, **first_kw)
        run(first)
        for kw in kws:
            again = build(cell, fam, **kw)
            # the same functions, wrapped: programs of their own
            alone = dataclasses.replace(again, step=lambda *a, f=again.step: f(*a),
                                        propagate=lambda *a, f=again.propagate: f(*a))
            assert again.program_key() == first.program_key() is not None and alone.program_key() is None
            runs = [run(again), run(alone)]
            assert chunk_fn(again, True) is chunk_fn(first, True) and chunk_fn(alone, True) is not chunk_fn(first, True)
            assert all(getattr(again, p) is getattr(first, p) is not getattr(alone, p) for p in one_step)
            for a, b in zip(*runs):
                np.testing.assert_array_equal(a, b)
    # what the programs hold: each of these differs from `base` in one part of its recipe
    base = recurrent.rtrl(cell, fam)
    others = [recurrent.rtrl(cell, fam, learner="information"), recurrent.rtrl(cell, fam, correct_state=False),
              recurrent.rtrl(cell, fam, joseph=True),
              recurrent.rtrl(cell._replace(transition=CELLS["gru"].transition), fam),  # the same readout
              recurrent.rtrl(cell, families.Gaussian(0.7))]
    joint = recurrent.joint_ekf(cell, fam)
    others_joint = [recurrent.joint_ekf(cell, fam, joseph=True), recurrent.joint_ekf(cell, fam, state_noise=0.01),
                    recurrent.joint_ekf(cell, fam, forgetting=lambda t: 0.9),
                    recurrent.joint_ekf(cell, fam, forgetting=lambda t: 0.9),  # another schedule, equal or not
                    recurrent.joint_ekf(CELLS["gru"], fam), recurrent.joint_ekf(cell, families.Gaussian(0.7))]
    for first, rest in ((base, others), (joint, others_joint)):
        keys = [first.program_key()] + [o.program_key() for o in rest]
        assert None not in keys and len(set(keys)) == len(keys)
    assert recurrent.joint_ekf(cell, fam, prior_var=3.0, state_var=0.5).program_key() == joint.program_key()
    # a learner given another step (or cell: its functions run the old one) is not its constructor's
    assert dataclasses.replace(joint, step=lambda *a: joint.step(*a)).program_key() is None
    assert dataclasses.replace(joint, cell=CELLS["gru"]).program_key() == joint.program_key()
