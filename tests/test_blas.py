"""kalnat.blas: learning runs the process's BLAS and LAPACK on one thread (JAX's CPU
factorisations call them, and their threads contend with XLA's), and gives the libraries
their own settings back."""

import numpy as np
import pytest

import kalnat
from kalnat import blas
from kalnat import keyed as keyed_module

threadpoolctl = pytest.importorskip("threadpoolctl")

FAMILY = kalnat.families.Bernoulli()
MODEL = kalnat.models.linear(3)
LEARNER = kalnat.ekf(MODEL, FAMILY)


def threads():
    """The thread counts of the BLAS libraries loaded (SciPy's, which JAX's LAPACK calls, among
    them once a factorisation was compiled)."""
    return {i["num_threads"] for i in threadpoolctl.threadpool_info() if i["user_api"] == "blas"}


@pytest.fixture
def two_threads():
    """The libraries at two threads for the test (the suite's environment sets one)."""
    blas._controller()  # SciPy's LAPACK loaded, as the first limit would load it
    with threadpoolctl.threadpool_limits(limits=2, user_api="blas"):
        if threads() != {2}:
            pytest.skip("the BLAS libraries here do not take a limit of two threads")
        yield


def rows(n=40, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, 3))
    return X, (X[:, 0] > 0).astype(float)


def test_fit_learns_on_one_blas_thread_and_gives_the_libraries_their_threads_back(two_threads):
    seen = []
    X, Y = rows()
    kalnat.fit(LEARNER, LEARNER.init(MODEL.init(None)), X, Y, chunk_size=8,
               callback=lambda *_: seen.append(threads()))
    assert len(seen) == 5 and all(s == {1} for s in seen), seen
    assert threads() == {2}


def test_a_keyed_learners_calls_run_on_one_blas_thread(two_threads, monkeypatch):
    seen, make = [], keyed_module._segment_fn

    def recording(learner):
        fn = make(learner)

        def call(*args):
            seen.append(threads())
            return fn(*args)
        return call

    monkeypatch.setattr(keyed_module, "_segment_fn", recording)
    X, Y = rows()
    keyed_module.Keyed(LEARNER, MODEL.init(None)).learn(["a", "b"] * 20, X, Y)
    assert seen and all(s == {1} for s in seen), seen
    assert threads() == {2}


def test_nested_limits_restore_in_order(two_threads):
    with blas.one_thread():
        with blas.one_thread():
            assert threads() == {1}
        assert threads() == {1}
    assert threads() == {2}
