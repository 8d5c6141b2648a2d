"""One BLAS thread while kalnat learns.

JAX's CPU factorisations (Cholesky, triangular solves, QR, eigh) call LAPACK in the OpenBLAS
that SciPy ships, whose threads contend with XLA's own: a program that factors inside its scan
(a minibatch's ``S`` of more than 16 outputs, the Kronecker factors, the low-rank form's
re-projection) waits on OpenBLAS's spinning threads at every step. With its default threads,
a row of digits in minibatches of 2 and 4 took 1.6–1.8 × as long through one full-covariance
EKF and 1.3–1.6 × through the command's default bank (``benchmarks/minibatch_cost.py``), and
the structured forms' steps on an MLP 3–5 × as long (``benchmarks/networks.py --blas-threads
0``; docs/structured.md). The host's float64 work (:mod:`kalnat.scaling`'s re-expression: d in
the hundreds) gains little from a second thread and loses much on a busy machine: OpenBLAS's
threads wait for each other at every step of a factorisation, and one descheduled stalls the
rest (with two spinning processes on a 2-core machine, one boundary of ``kalnat learn
digits``'s bank took 4.7 s on one thread against 11.6 s on two; idle, 2.8 s against 2.3 s:
``benchmarks/blas_threads.py``).

:func:`one_thread` is that limit for the duration of a call: :func:`kalnat.fit` (and so the
command, and a ``fit``'s callback), a keyed learner's ``learn``, ``predict`` and ``flush``,
:func:`kalnat.sharded.fit`, the re-expression. It limits every BLAS library of the process
(NumPy's too). A learner's per-row ``update`` runs under the process's own setting
(``OPENBLAS_NUM_THREADS=1`` in the environment, or ``threadpoolctl.threadpool_limits(1,
"blas")``, gives it the same).
"""

from __future__ import annotations

import contextlib
import threading

__all__ = ["one_thread", "THREADS"]

# The limit; None: none (benchmarks/minibatch_cost.py and blas_threads.py compare).
THREADS = 1
_lock = threading.Lock()
_held = {"depth": 0, "limiter": None, "controller": None}


def _controller():
    if _held["controller"] is None:
        # The library JAX takes its LAPACK kernels from, loaded before the controller lists
        # the libraries (JAX loads it only when it first compiles a factorisation, which may
        # be inside the call this limit is for).
        import scipy.linalg.cython_lapack  # noqa: F401
        from threadpoolctl import ThreadpoolController

        _held["controller"] = ThreadpoolController()
    return _held["controller"]


def _free_openblas():
    """threadpoolctl (3.6 on) lets one thread set a pthreads OpenBLAS's limits, the first to
    set one, and ignores the others' calls until it lets go: the limit is set and restored
    here by whichever thread enters first and leaves last, so this thread must hold it."""
    try:
        from threadpoolctl import OpenBLASController
    except ImportError:
        return
    clear = getattr(OpenBLASController, "clear_controlling_thread", None)
    if clear is not None:
        clear(force=True)


@contextlib.contextmanager
def one_thread():
    """A context in which the BLAS and LAPACK libraries of the process run on :data:`THREADS`
    (one) thread. Nested and concurrent uses (threads of one process: a server's, a Dask
    worker's) share one limit: the first to enter sets it, the last to leave restores the
    libraries' own settings (a limit per call, each restoring what it found, would lift the
    limit under a call still running and could leave the process at one thread). An OpenBLAS
    built on OpenMP (threadpoolctl's ``threading_layer`` "openmp") takes a limit per calling
    thread, and XLA's threads, which run the factorisations, keep theirs: set
    ``OMP_NUM_THREADS=1`` in the environment there."""
    if THREADS is None:
        yield
        return
    with _lock:
        if _held["depth"] == 0:
            controller = _controller()
            _free_openblas()
            _held["limiter"] = controller.limit(limits=THREADS, user_api="blas")
            _free_openblas()
        _held["depth"] += 1
    try:
        yield
    finally:
        with _lock:
            _held["depth"] -= 1
            if _held["depth"] == 0:
                _free_openblas()
                _held["limiter"].restore_original_limits()
                _free_openblas()
                _held["limiter"] = None
