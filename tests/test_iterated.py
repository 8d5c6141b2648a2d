"""Iterated EKF: one iteration is the EKF; many reach the one-step MAP."""

import re

import numpy as np
import jax
import jax.numpy as jnp
import pytest
import scipy.optimize

import kalnat

P_FEAT = 3
MODEL = kalnat.models.linear(P_FEAT)
BERN = kalnat.families.Bernoulli()
POIS = kalnat.families.Poisson()


def _stream(n=40, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, P_FEAT))
    y = (rng.random(n) < 1 / (1 + np.exp(-X @ np.array([2.0, -1.0, 0.5])))).astype(np.int64)
    return X, y


@pytest.mark.parametrize("forgetting", [1.0, 0.97])
def test_one_iteration_is_the_ekf_exactly(forgetting):
    X, y = _stream()
    a = kalnat.ekf(MODEL, BERN, prior_var=2.0, forgetting=forgetting)
    b = kalnat.iterated_ekf(MODEL, BERN, prior_var=2.0, forgetting=forgetting, iterations=1)
    ra = kalnat.fit(a, a.init(MODEL.init(None)), X, y)
    rb = kalnat.fit(b, b.init(MODEL.init(None)), X, y)
    np.testing.assert_array_equal(ra.state.params["w"], rb.state.params["w"])
    np.testing.assert_array_equal(ra.state.params["b"], rb.state.params["b"])
    np.testing.assert_array_equal(kalnat.covariance(ra.state), kalnat.covariance(rb.state))
    np.testing.assert_array_equal(ra.predictions.probs, rb.predictions.probs)


@pytest.mark.parametrize("family,y", [(BERN, np.array([1, 0, 1])), (POIS, np.array([3, 0, 7]))])
def test_many_iterations_reach_the_one_step_map(family, y):
    rng = np.random.default_rng(1)
    X = rng.normal(size=(3, P_FEAT)) * 0.8
    # canonical links: Gauss–Newton is Newton's method here, eight steps reach rounding
    learner = kalnat.iterated_ekf(MODEL, family, prior_var=0.7, iterations=8)
    s0 = learner.init({"w": jnp.asarray(rng.normal(size=(1, P_FEAT)) * 0.3), "b": jnp.asarray([0.1])})
    theta0, unravel = jax.flatten_util.ravel_pytree(s0.params)
    P0 = kalnat.covariance(s0)
    s1 = jax.jit(learner.step)(learner.hyper, s0, jnp.asarray(X), jnp.asarray(y))[0]  # one update from three rows

    def objective(th):
        th = jnp.asarray(th)
        d = th - theta0
        nll = -sum(family.log_prob(MODEL.apply(unravel(th), x), yy) for x, yy in zip(X, y))
        return 0.5 * d @ jnp.linalg.solve(jnp.asarray(P0), d) + nll

    f = jax.jit(jax.value_and_grad(objective))
    opt = scipy.optimize.minimize(lambda t: tuple(np.asarray(v) for v in f(t)), np.asarray(theta0),
                                  jac=True, method="BFGS", options=dict(gtol=1e-13, maxiter=1000))
    theta1 = np.asarray(jax.flatten_util.ravel_pytree(s1.params)[0])
    np.testing.assert_allclose(theta1, opt.x, rtol=1e-8, atol=1e-10)
    # and the gradient of the one-step objective vanishes there
    assert np.max(np.abs(np.asarray(f(theta1)[1]))) < 1e-10
    # the two-iteration filter is already closer than the EKF
    one, two = (jax.jit(lrn.step)(lrn.hyper, s0, jnp.asarray(X), jnp.asarray(y))[0]
                for lrn in (kalnat.iterated_ekf(MODEL, family, prior_var=0.7, iterations=n) for n in (1, 2)))
    err = lambda s: np.linalg.norm(np.asarray(jax.flatten_util.ravel_pytree(s.params)[0]) - opt.x)
    assert err(two) < err(one)


def test_iterations_must_be_positive():
    with pytest.raises(ValueError, match="iterations"):
        kalnat.iterated_ekf(MODEL, BERN, iterations=0)


def test_bank_over_iteration_counts_equals_its_members():
    X, y = _stream(n=12, seed=2)
    b = kalnat.ekf_bank(MODEL, BERN, prior_vars=(3.0,), forgettings=(1.0,), iterations=(1, 2), share=0.0)
    res = kalnat.fit(b, b.init(MODEL.init(None)), X, y)
    for k, cfg in enumerate(b.configs):
        one = kalnat.iterated_ekf(MODEL, BERN, prior_var=cfg["prior_var"], iterations=int(cfg["iterations"]))
        s = kalnat.fit(one, one.init(MODEL.init(None)), X, y).state
        mem = b.member_state(res.state, k)
        np.testing.assert_allclose(mem.params["w"], s.params["w"], rtol=1e-12, atol=1e-15)
        np.testing.assert_allclose(kalnat.covariance(mem), kalnat.covariance(s), rtol=1e-12, atol=1e-15)
    with pytest.raises(ValueError, match="iterations"):
        kalnat.ekf_bank(MODEL, BERN, iterations=(1, 0))


def _products_with(txt, d, n):
    """How many instructions of a compiled module (outside fused computations: a fusion counts
    once) take a ``(d, d)`` operand and give a ``(d, n)`` result: the products ``P⁻ J``."""
    comps, cur = {}, None
    for line in txt.splitlines():
        head = re.match(r"^(?:ENTRY )?%(\S+) .*\{$", line)
        if head:
            cur = comps.setdefault(head.group(1), [])
        elif cur is not None and line.strip().startswith(("%", "ROOT")):
            cur.append(line.strip())
    fused = set(re.findall(r"calls=%([\w.\-]+)", txt))
    count = 0
    for name, lines in comps.items():
        if name in fused:
            continue
        shapes = dict(re.findall(r"^(?:ROOT )?%(\S+) = (\w+\[[\d,]*\])", "\n".join(lines), re.M))
        for ln in lines:
            m = re.match(r"(?:ROOT )?%\S+ = \w+\[(\d+),(\d+)\]\S* [\w\-]+\((.*?)\)", ln)
            if m and (int(m.group(1)), int(m.group(2))) == (d, n):
                if any(re.fullmatch(rf"\w+\[{d},{d}\]", shapes.get(o, ""))
                       for o in re.findall(r"%([\w.\-]+)", m.group(3))):
                    count += 1
    return count


def test_a_banks_iterated_members_share_the_product_with_a_linear_models_inputs():
    """A linear model's rows are ``H = Δ Jᵀ`` with ``J`` its inputs, the same at every iterate, so
    the full covariance's ``P⁻ H_iᵀ = (P⁻ J) Δ_iᵀ`` needs one product with ``P`` for all the
    linearisations of a step. A bank gives its members the model's layer and runs the members
    of each count apart, with the count known when tracing (the filter's ``lax.cond`` over a
    linearisation has a constant predicate), and XLA computes that product once: the compiled
    chunk has one for each member, of one linearisation or two, mixed or not, a row or a
    minibatch of two at a time (``J (15, 2 × 3)``); with ``H`` as a matrix (the model as a plain
    function) a member of two makes two."""
    if jax.default_backend() != "cpu":
        pytest.skip("reads the CPU compiler's module")
    model, fam = kalnat.models.linear(4, 3), kalnat.families.Categorical(4)  # d = 15, J (15, 3)

    def products(bank, batch=1):
        xs, ys, ms = np.ones((2, batch, 4)), np.zeros((2, batch), np.int64), np.ones((2, batch), bool)
        state = bank.init(model.init(None))
        txt = jax.jit(lambda h, s: bank.scan_chunk(h, s, xs, ys, ms)).lower(bank.hyper, state).compile().as_text()
        return _products_with(txt, 15, 3 * batch)

    mixed = kalnat.ekf_bank(model, fam, prior_vars=(1.0,), forgettings=(0.9,), iterations=(1, 2))
    assert mixed.learner.representation.dense_layers == ((3, 4),)
    assert products(mixed) == 2
    iterated = kalnat.ekf_bank(model, fam, prior_vars=(1.0,), forgettings=(0.9,), iterations=2)
    assert products(iterated) == 1
    assert products(iterated, batch=2) == 1
    plain = kalnat.ekf_bank(model.apply, fam, prior_vars=(1.0,), forgettings=(0.9,), iterations=2, input_shape=(4,))
    assert products(plain) == 2
    assert products(plain, batch=2) == 2
    # alone, a filter's count is data (a lax.cond each: nothing shared): H as a matrix, its
    # programs as they were, as the EKF's
    assert kalnat.iterated_ekf(model, fam, iterations=2).representation.dense_layers == ()
    assert kalnat.ekf(model, fam).representation.dense_layers == ()
