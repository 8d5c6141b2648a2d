"""docs/method.md §3: the EKF, the information filter and online natural gradient (configured by
the translation in kalnat.schedules) produce the same θ_t, and P_t = η_t J_t⁻¹, exactly."""

import jax
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from jax.flatten_util import ravel_pytree

import kalnat
from kalnat import families as F
from kalnat import schedules as S

import reference as ref

RTOL = 1e-9
STEPS = 200
P_IN = 3
# Fading memory is milder on the MLP: with strong forgetting, directions of θ the data do not
# inform inflate as λ^-t, and the nonlinear filter amplifies rounding between the forms.
FORGETTING = {"linear": 0.95, "mlp": 0.99}
ETA0 = 0.3  # natural gradient's η_0 (free: every one gives the EKF's θ_t), a constant of its programs

FAMILIES = {
    "gaussian": F.Gaussian(0.7),
    "gaussian2": F.Gaussian([[1.0, 0.3], [0.3, 0.5]]),
    "bernoulli": F.Bernoulli(),
    "categorical": F.Categorical(3),
    "poisson": F.Poisson(),
}


def flat(params):
    return np.asarray(ravel_pytree(params)[0])


def rel(a, b):
    return float(np.max(np.abs(np.asarray(a) - np.asarray(b))) / np.max(np.abs(np.asarray(b))))


def teacher_stream(model, family, n, seed):
    """Rows from a model with random parameters, so the filters track a real signal."""
    rng = np.random.default_rng(seed)
    params = model.init(jax.random.PRNGKey(seed))
    theta, unravel = ravel_pytree(params)
    teacher = unravel(theta + 0.7 * rng.normal(size=theta.shape))
    X = rng.normal(size=(n, P_IN))
    keys = jax.random.split(jax.random.PRNGKey(seed + 1), n)
    yhat = jax.vmap(lambda x: family.mean(model.apply(teacher, x)).reshape(family.m))(X)
    Y = np.asarray(jax.vmap(family.sample)(keys, yhat))
    return params, X, Y


# Every learner the tests build, kept for the module: a later learner of an equal program key
# (the same model, family, form and η_0; other hyperparameters) runs the compiled programs of
# an earlier one (kalnat.programs) where its stream has as many minibatches: those of
# test_against_numpy_reference run test_three_learners_agree's (STEPS minibatches each).
_LEARNERS = []


def run_all(model, family, params, X, Y, prior_var, forgetting, batch_size, eta0=ETA0, joseph=True):
    learners = {
        "ekf": kalnat.ekf(model, family, prior_var=prior_var, forgetting=forgetting),
        "ekf_joseph": kalnat.ekf(model, family, prior_var=prior_var, forgetting=forgetting, joseph=True),
        "information": kalnat.information_filter(model, family, prior_var=prior_var, forgetting=forgetting),
        "natural": kalnat.natural_gradient(
            model, family, **S.kalman_to_natural(prior_var, forgetting, eta0=eta0)._asdict()),
    }
    if not joseph:
        del learners["ekf_joseph"]
    _LEARNERS.extend(learners.values())
    return {k: kalnat.fit(l, l.init(params), X, Y, batch_size=batch_size, return_predictions=False).state
            for k, l in learners.items()}


def check_equal(states):
    theta = flat(states["ekf"].params)
    P = kalnat.covariance(states["ekf"])
    for name in ("ekf_joseph", "information", "natural"):
        if name in states:
            assert rel(flat(states[name].params), theta) < RTOL, name
    if "ekf_joseph" in states:
        assert rel(kalnat.covariance(states["ekf_joseph"]), P) < RTOL
    assert rel(np.linalg.inv(states["information"].cov.info), P) < RTOL
    ng = states["natural"]
    assert rel(float(ng.cov.lr) * np.linalg.inv(ng.cov.fisher), P) < RTOL  # P_t = η_t J_t⁻¹
    assert int(states["ekf"].count) == int(ng.count)


@pytest.mark.parametrize("fam", list(FAMILIES))
@pytest.mark.parametrize("arch", ["linear", "mlp"])
@pytest.mark.parametrize("batch_size", [1, 8])
def test_three_learners_agree(fam, arch, batch_size):
    family = FAMILIES[fam]
    model = (kalnat.models.linear(P_IN, family.n_outputs) if arch == "linear"
             else kalnat.models.mlp(P_IN, (4,), family.n_outputs))
    params, X, Y = teacher_stream(model, family, STEPS * batch_size, seed=len(fam) + batch_size)
    for forgetting in (1.0, FORGETTING[arch]):
        states = run_all(model, family, params, X, Y, 0.5, forgetting, batch_size,
                         joseph=arch == "linear")
        assert int(states["ekf"].count) == STEPS
        check_equal(states)


def reference_case(fam, arch, params, X, Y, batch_size, prior, lam):
    family = FAMILIES[fam]
    n_out = family.n_outputs
    jac = ((lambda th, x: ref.linear_jac(th, x, n_out)) if arch == "linear"
           else (lambda th, x: ref.mlp_jac(th, x, 4, n_out)))
    sigma = np.asarray(family.cov_) if fam.startswith("gaussian") else None
    batches = [(X[i:i + batch_size], Y[i:i + batch_size]) for i in range(0, len(X), batch_size)]
    name = "gaussian" if fam.startswith("gaussian") else fam
    return jac, name, sigma, batches


@pytest.mark.parametrize("fam", list(FAMILIES))
@pytest.mark.parametrize("arch,batch_size", [("linear", 1), ("linear", 8), ("mlp", 1)])
def test_against_numpy_reference(fam, arch, batch_size):
    family = FAMILIES[fam]
    model = (kalnat.models.linear(P_IN, family.n_outputs) if arch == "linear"
             else kalnat.models.mlp(P_IN, (4,), family.n_outputs))
    n = STEPS * batch_size
    params, X, Y = teacher_stream(model, family, n, seed=7)
    lam, prior, eta0 = FORGETTING[arch], 0.5, ETA0
    states = run_all(model, family, params, X, Y, prior, lam, batch_size, joseph=False)
    jac, name, sigma, batches = reference_case(fam, arch, params, X, Y, batch_size, prior, lam)
    theta0 = flat(params)
    d = theta0.size
    th_ekf, P_ekf = ref.ekf(jac, name, theta0, prior * np.eye(d), batches, lam=lam, sigma=sigma)
    th_inf, P_inf = ref.information(jac, name, theta0, prior * np.eye(d), batches, lam=lam, sigma=sigma)
    etas = S.learning_rates(S.kalman(lam), eta0, len(batches))
    th_ng, J_ng = ref.natural_gradient(jac, name, theta0, eta0 / prior * np.eye(d), batches,
                                       etas, etas, sigma=sigma)
    assert rel(flat(states["ekf"].params), th_ekf) < RTOL
    assert rel(kalnat.covariance(states["ekf"]), P_ekf) < RTOL
    assert rel(flat(states["information"].params), th_inf) < RTOL
    assert rel(flat(states["natural"].params), th_ng) < RTOL
    assert rel(states["natural"].cov.fisher, J_ng) < RTOL
    assert rel(th_ng, th_ekf) < RTOL  # the theorem holds in the reference too


def test_reference_additive_noise_filter():
    """Additive q·I is a filter option (no natural-gradient form): EKF = information form = reference."""
    family = F.Bernoulli()
    model = kalnat.models.linear(P_IN)
    params, X, Y = teacher_stream(model, family, 120, seed=3)
    q = 1e-3
    e = kalnat.ekf(model, family, prior_var=0.5, process_noise=q)
    i = kalnat.information_filter(model, family, prior_var=0.5, process_noise=q)
    se = kalnat.fit(e, e.init(params), X, Y).state
    si = kalnat.fit(i, i.init(params), X, Y).state
    jac = lambda th, x: ref.linear_jac(th, x, 1)
    th, P = ref.ekf(jac, "bernoulli", flat(params), 0.5 * np.eye(P_IN + 1),
                    [(X[k:k + 1], Y[k:k + 1]) for k in range(len(X))], q=q)
    assert rel(flat(se.params), th) < RTOL and rel(kalnat.covariance(se), P) < RTOL
    assert rel(flat(si.params), th) < RTOL and rel(np.linalg.inv(si.cov.info), P) < RTOL


def random_spd(rng, d, kind):
    if kind == "scalar":
        return float(rng.uniform(0.1, 3.0))
    if kind == "diag":
        return rng.uniform(0.1, 3.0, size=d)
    a = rng.normal(size=(d, d))
    return a @ a.T / d + 0.2 * np.eye(d)


@settings(max_examples=10, deadline=None, derandomize=True)
@given(
    p=st.integers(1, 4),
    fam=st.sampled_from(["gaussian", "bernoulli", "categorical", "poisson"]),
    prior_kind=st.sampled_from(["scalar", "diag", "full"]),
    lam=st.floats(0.9, 1.0),
    eta0=st.floats(0.05, 5.0),
    batch_size=st.integers(1, 3),
    seed=st.integers(0, 2**16),
)
def test_property_random_problems(p, fam, prior_kind, lam, eta0, batch_size, seed):
    """Random dimensions, priors, forgetting and data: JAX EKF = NumPy reference, and the
    information filter and translated natural gradient equal the EKF."""
    rng = np.random.default_rng(seed)
    family = {"gaussian": F.Gaussian(0.5), "bernoulli": F.Bernoulli(),
              "categorical": F.Categorical(3), "poisson": F.Poisson()}[fam]
    model = kalnat.models.linear(p, family.n_outputs)
    d = family.n_outputs * (p + 1)
    prior = random_spd(rng, d, prior_kind)
    params = {"b": rng.normal(size=family.n_outputs) * 0.3, "w": rng.normal(size=(family.n_outputs, p)) * 0.3}
    n = 20 * batch_size
    X = rng.normal(size=(n, p))
    Y = {"gaussian": lambda: rng.normal(size=n), "bernoulli": lambda: rng.integers(0, 2, n),
         "categorical": lambda: rng.integers(0, 3, n), "poisson": lambda: rng.poisson(1.5, n)}[fam]()
    states = run_all(model, family, params, X, Y, prior, lam, batch_size, eta0=eta0, joseph=False)
    check_equal(states)
    jac = lambda th, x: ref.linear_jac(th, x, family.n_outputs)
    P0 = np.asarray(kalnat.numerics.check_covariance(prior, "prior", d))
    batches = [(X[i:i + batch_size], Y[i:i + batch_size]) for i in range(0, n, batch_size)]
    th, P = ref.ekf(jac, fam, flat(params), P0, batches, lam=lam,
                    sigma=np.array([[0.5]]) if fam == "gaussian" else None)
    assert rel(flat(states["ekf"].params), th) < RTOL
    assert rel(kalnat.covariance(states["ekf"]), P) < RTOL


def test_uninformative_prior_gives_one_over_t():
    """P_0⁻¹ → 0 is η_0 → ∞: then η_1 = 1 and η_t = 1/t exactly (docs/method.md §3)."""
    etas = S.learning_rates(S.kalman(), np.inf, 50)
    np.testing.assert_allclose(etas, 1.0 / np.arange(1, 51), rtol=1e-15)
    lam = 0.9
    etas = S.learning_rates(S.kalman(lam), 0.5, 400)
    assert abs(etas[-1] - (1 - lam)) < 1e-12  # constant-rate natural gradient = forgetting filter


def test_constant_rate_natural_gradient_is_forgetting_filter():
    """natural_to_kalman: constant η = c (from η_0 = c) is the EKF with λ = 1 − c; a constant
    rate from another η_0 gives a time-varying λ_t; both reproduce θ_t exactly. (An η_0 above
    c/(1 − c) would need λ_1 > 1, negative process noise: refused, tests/test_schedules.py.)"""
    family = F.Poisson()
    model = kalnat.models.linear(P_IN)
    params, X, Y = teacher_stream(model, family, 200, seed=11)
    for eta0 in (0.05, 0.04):
        ng_kw = dict(learning_rate=S.constant(0.05), eta0=eta0, init_fisher=4.0)
        ng = kalnat.natural_gradient(model, family, **ng_kw)
        kf = kalnat.ekf(model, family, **S.natural_to_kalman(**ng_kw)._asdict())
        s_ng = kalnat.fit(ng, ng.init(params), X, Y).state
        s_kf = kalnat.fit(kf, kf.init(params), X, Y).state
        assert rel(flat(s_ng.params), flat(s_kf.params)) < RTOL
        assert rel(float(s_ng.cov.lr) * np.linalg.inv(s_ng.cov.fisher), kalnat.covariance(s_kf)) < RTOL


def test_function_schedule_translates():
    """A rate given as a function of t (η_t = 1/(t + 3)) maps to λ_t = η_{t−1}(1/η_t − 1)."""
    family = F.Bernoulli()
    model = kalnat.models.linear(P_IN)
    params, X, Y = teacher_stream(model, family, 150, seed=5)
    ng_kw = dict(learning_rate=lambda t: 1.0 / (t + 3.0), eta0=0.25, init_fisher=2.0)
    ng = kalnat.natural_gradient(model, family, **ng_kw)
    kf = kalnat.ekf(model, family, **S.natural_to_kalman(**ng_kw)._asdict())
    s_ng = kalnat.fit(ng, ng.init(params), X, Y).state
    s_kf = kalnat.fit(kf, kf.init(params), X, Y).state
    assert rel(flat(s_ng.params), flat(s_kf.params)) < RTOL
