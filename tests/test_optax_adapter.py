"""kalnat.optax: online natural gradient as an optax transformation is the EKF (docs/method.md §3)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import kalnat
import kalnat.optax as kx


def _run_optax(tx, model, family, params, X, Y):
    """The optax loop a user writes: the gradient of −log p, the Jacobian of ŷ, then update."""
    mean = lambda p, x: jnp.reshape(family.mean(model.apply(p, x)), (family.m,))  # noqa: E731
    nll = lambda p, x, y: -family.log_prob(model.apply(p, x), y).sum()  # noqa: E731

    @jax.jit
    def step(params, state, x, y):
        grads = jax.grad(nll)(params, x, y)
        updates, state = tx.update(grads, state, params, jacobian=jax.jacrev(mean)(params, x),
                                   prediction=mean(params, x))
        return optax.apply_updates(params, updates), state

    state = tx.init(params)
    out = []
    for x, y in zip(X, Y):
        params, state = step(params, state, x, y)
        out.append(jax.flatten_util.ravel_pytree(params)[0])
    return np.stack(out), state


def _run_ekf(model, family, params, X, Y, prior_var, forgetting):
    learner = kalnat.ekf(model, family, prior_var=prior_var, forgetting=forgetting)
    state = learner.init(params)
    out = []
    for x, y in zip(X, Y):
        state, _ = learner.update(state, x, y)
        out.append(jax.flatten_util.ravel_pytree(state.params)[0])
    return np.stack(out), state


def _problem(seed, family_name, n, p):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, p))
    z = X @ rng.normal(size=p)
    if family_name == "gaussian":
        return X, z + 0.5 * rng.normal(size=n), kalnat.families.Gaussian(0.3)
    return X, (rng.random(n) < 1 / (1 + np.exp(-z))).astype(float), kalnat.families.Bernoulli()


@pytest.mark.parametrize("hidden", [(), (3,)])
@pytest.mark.parametrize("family_name", ["gaussian", "bernoulli"])
def test_optax_natural_gradient_is_the_ekf(family_name, hidden):
    """Every θ_t of the optax loop equals kalnat.ekf's to 1e-10 (relative), for a linear model
    and an MLP, on a random problem with random prior, forgetting and η_0; and P_t = η_t J_t⁻¹."""
    seed = 11 * len(hidden) + len(family_name)
    rng = np.random.default_rng(seed)
    prior_var, eta0 = 10 ** rng.uniform(-1, 1), rng.uniform(0.1, 2.0)
    forgetting = 0.97 if hidden else 1.0  # each family with and without forgetting
    X, Y, family = _problem(seed, family_name, n=25, p=3)
    model = kalnat.models.linear(3) if not hidden else kalnat.models.mlp(3, hidden)
    params = model.init(jax.random.PRNGKey(seed % 7))
    ref, ekf_state = _run_ekf(model, family, params, X, Y, prior_var, forgetting)
    settings_ = kalnat.schedules.kalman_to_natural(prior_var, forgetting, eta0=eta0)
    tx = kx.natural_gradient(forgetting=forgetting, eta0=eta0, init_fisher=settings_.init_fisher, family=family)
    got, state = _run_optax(tx, model, family, params, X, Y)
    scale = np.max(np.abs(ref))
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-10 * scale)
    P = kalnat.covariance(ekf_state)
    np.testing.assert_allclose(kx.covariance(state), P, rtol=0, atol=1e-10 * np.max(np.abs(P)))


def test_chains_with_clipping_and_schedules():
    """In optax.chain the extra arguments reach it; clipping before it preconditions the clipped
    gradient; an optax schedule sets η_t (counted from 0) and a constant rate γ the Fisher's."""
    X, Y, family = _problem(0, "bernoulli", n=5, p=2)
    model = kalnat.models.linear(2)
    params = model.init(None)
    schedule = optax.linear_schedule(0.5, 0.1, 4)
    tx = optax.chain(optax.clip_by_global_norm(0.1),
                     kx.natural_gradient(schedule, fisher_rate=0.2, family=family))
    got, _ = _run_optax(tx, model, family, params, X, Y)
    # the same recursion by hand
    theta, J = np.zeros(3), np.eye(3)
    for t, (x, y) in enumerate(zip(X, Y)):
        h = np.concatenate([[1.0], x])          # ravel order: b, then w
        p = 1 / (1 + np.exp(-h @ theta))
        g = -(y - p) * h
        g = g * min(1.0, 0.1 / np.linalg.norm(g))
        J = 0.8 * J + 0.2 * p * (1 - p) * np.outer(h, h)
        eta = float(jax.jit(schedule)(jnp.int32(t)))  # as the step sees it (optax's rates are float32)
        theta = theta - eta * np.linalg.solve(J, g)
        np.testing.assert_allclose(got[t], theta, rtol=1e-10)


@pytest.mark.parametrize("settings", [dict(forgetting=0.97, init_fisher=2.0, damping=0.01),
                                      dict(learning_rate=0.1, eta0=0.5)])
def test_inject_hyperparams_jits_and_is_the_transformation(settings):
    """optax.inject_hyperparams calls the factory again inside the jitted update, its numbers
    traced: the same steps as the transformation itself (its checks, on the host, ran at init)."""
    X, Y, family = _problem(3, "bernoulli", n=6, p=2)
    model = kalnat.models.linear(2)
    plain, _ = _run_optax(kx.natural_gradient(family=family, **settings), model, family, model.init(None), X, Y)
    injected = optax.inject_hyperparams(kx.natural_gradient, static_args=("family",))(family=family, **settings)
    got, state = _run_optax(injected, model, family, model.init(None), X, Y)
    np.testing.assert_allclose(got, plain, rtol=1e-12, atol=1e-15)
    assert float(state.hyperparams["damping" if "damping" in settings else "learning_rate"]) > 0
    with pytest.raises(ValueError, match="forgetting must lie in"):
        optax.inject_hyperparams(kx.natural_gradient, static_args=("family",))(family=family, forgetting=1.5).init(
            model.init(None))


def test_a_minibatchs_prediction_gives_r_row_by_row():
    """prediction of B rows (B,): R = diag of each row's variance, as obs_cov given by hand."""
    X, Y, family = _problem(4, "bernoulli", n=4, p=2)
    model = kalnat.models.linear(2)
    params = model.init(None)
    mean = lambda p: family.mean(jax.vmap(lambda x: model.apply(p, x))(X)).reshape(-1)  # noqa: E731
    nll = lambda p: -jnp.sum(jax.vmap(lambda x, y: family.log_prob(model.apply(p, x), y))(X, Y))  # noqa: E731
    tx = kx.natural_gradient(0.3, family=family)

    @jax.jit  # one program (op by op, each of the step's small operations compiled apiece)
    def both(params):
        grads, jac, mu = jax.grad(nll)(params), jax.jacrev(mean)(params), mean(params)
        a, _ = tx.update(grads, tx.init(params), params, jacobian=jac, prediction=mu)
        b, _ = tx.update(grads, tx.init(params), params, jacobian=jac, obs_cov=jnp.diag(mu * (1 - mu)))
        return a, b, grads, jac
    a, b, grads, jac = both(params)
    for u, v in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_allclose(u, v, rtol=1e-12)
    with pytest.raises(ValueError, match="not rows of the family's 3"):
        kx.natural_gradient(family=kalnat.families.Categorical(4)).update(
            grads, tx.init(params), params, jacobian=jac, prediction=jnp.ones(4))


def test_missing_extra_arguments_are_reported():
    tx = kx.natural_gradient()
    params = {"w": jnp.zeros(2)}
    state = tx.init(params)
    with pytest.raises(ValueError, match="jacobian"):
        tx.update(params, state, params)
    with pytest.raises(ValueError, match="obs_cov"):
        tx.update(params, state, params, jacobian={"w": jnp.ones((1, 2))})
    with pytest.raises(ValueError, match="3 parameters per output"):
        tx.update(params, state, params, jacobian={"w": jnp.ones((1, 3))}, obs_cov=jnp.eye(1))


def test_r_from_a_prediction_takes_the_updates_dtype():
    """R built from ``prediction`` is in the updates' dtype before the family's default floor
    on R (a few units of rounding of R's dtype) is added: a float64 prediction for float32
    parameters gets float32's floor (9.5e-7), not float64's (1.8e-15), which float32 loses."""
    family = kalnat.families.Bernoulli()
    tx = kx.natural_gradient(1.0, family=family)
    params = {"w": jnp.zeros(2, jnp.float32)}
    state = tx.init(params)
    grads = {"w": jnp.asarray([1e-3, -2e-3], jnp.float32)}
    jac = {"w": jnp.asarray([[1.0, 0.5]], jnp.float32)}
    p = 1e-9  # a saturated prediction: R = p(1 − p) is below float32's floor
    got, _ = tx.update(grads, state, params, jacobian=jac, prediction=jnp.asarray([p], jnp.float64))
    want, _ = tx.update(grads, state, params, jacobian=jac, obs_cov=family.cov(jnp.asarray([p], jnp.float32)))
    np.testing.assert_array_equal(got["w"], want["w"])
    assert got["w"].dtype == jnp.float32
