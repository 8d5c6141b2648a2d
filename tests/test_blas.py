"""kalnat.blas: learning runs the process's BLAS and LAPACK on one thread (JAX's CPU
factorisations call them, and their threads contend with XLA's), and gives the libraries
their own settings back."""

import threading

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


def recording(monkeypatch, seen, factory):
    """Every call of the jitted function that ``kalnat.keyed.<factory>`` makes records the
    libraries' thread counts."""
    make = getattr(keyed_module, factory)

    def recorded(learner):
        fn = make(learner)

        def call(*args):
            seen.append(threads())
            return fn(*args)
        return call

    monkeypatch.setattr(keyed_module, factory, recorded)


def test_a_keyed_learners_calls_run_on_one_blas_thread(two_threads, monkeypatch):
    """``learn``, ``predict`` and ``flush`` (a minibatch's held rows: the calls whose ``S``
    LAPACK factors)."""
    seen = {"learn": [], "predict": [], "minibatches": []}
    recording(monkeypatch, seen["learn"], "_segment_fn")
    recording(monkeypatch, seen["predict"], "_predict_fn")
    recording(monkeypatch, seen["minibatches"], "_minibatch_segment_fn")
    X, Y = rows()
    keys = ["a", "b"] * 20
    one = keyed_module.Keyed(LEARNER, MODEL.init(None))
    one.learn(keys, X, Y)
    one.predict(keys[:4], X[:4])
    batched = keyed_module.Keyed(LEARNER, MODEL.init(None), batch_size=3)
    batched.learn(keys[:10], X[:10], Y[:10])
    n = len(seen["minibatches"])
    batched.flush()
    assert len(seen["minibatches"]) > n
    for name, counts in seen.items():
        assert counts and all(c == {1} for c in counts), (name, counts)
    assert threads() == {2}


def test_overlapping_calls_in_two_threads_share_one_limit(two_threads):
    """A enters, B enters, A leaves while B still learns, B leaves: B keeps one thread to its
    end, and the libraries have their two again after it (a limit per call, each restoring
    what it found, gave B two threads halfway, or left the process at one)."""
    a_in, b_in, a_out = threading.Event(), threading.Event(), threading.Event()
    seen = []

    def a():
        with blas.one_thread():
            a_in.set()
            b_in.wait(10)
        a_out.set()

    def b():
        a_in.wait(10)
        with blas.one_thread():
            b_in.set()
            a_out.wait(10)
            seen.append(threads())

    workers = [threading.Thread(target=a), threading.Thread(target=b)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(20)
    assert seen == [{1}]
    assert threads() == {2}


def test_nested_limits_restore_in_order(two_threads):
    with blas.one_thread():
        with blas.one_thread():
            assert threads() == {1}
        assert threads() == {1}
    assert threads() == {2}
