"""One BLAS thread while kalnat learns.

JAX's CPU factorisations (Cholesky, triangular solves, QR, eigh) call LAPACK in the OpenBLAS
that SciPy ships, whose threads contend with XLA's own: a program that factors inside its scan
(a minibatch's ``S`` of more than 16 outputs, the Kronecker factors, the low-rank form's
re-projection) waits on OpenBLAS's spinning threads at every step. With its default threads,
a row of digits in minibatches of 2–8 through one full-covariance EKF took 1.6 × as long
(``benchmarks/minibatch_cost.py``), and the structured forms' steps on an MLP 3–5 × as long
(``benchmarks/networks.py --blas-threads 0``; docs/structured.md). The host's float64 work
(:mod:`kalnat.scaling`'s re-expression: d in the hundreds) gains little from a second thread
and loses much on a busy machine: OpenBLAS's threads wait for each other at every step of a
factorisation, and one descheduled stalls the rest (with two spinning processes on a 2-core
machine, one boundary of ``kalnat learn digits``'s bank took 4.7 s on one thread against 11.6
s on two; idle, 2.8 s against 2.3 s: ``benchmarks/blas_threads.py``).

:func:`one_thread` is that limit for the duration of a call: :func:`kalnat.fit` (and so the
command), a keyed learner's ``learn`` and ``predict``, :func:`kalnat.sharded.fit`, the
re-expression. A learner's per-row ``update`` runs under the process's own setting
(``OPENBLAS_NUM_THREADS=1`` in the environment, or ``threadpoolctl.threadpool_limits(1,
"blas")``, gives it the same).
"""

from __future__ import annotations

import contextlib

__all__ = ["one_thread", "THREADS"]

# The limit; None: none (benchmarks/minibatch_cost.py and blas_threads.py compare).
THREADS = 1
_controller_made = []


def _controller():
    if not _controller_made:
        # The library JAX takes its LAPACK kernels from, loaded before the controller lists
        # the libraries (JAX loads it only when it first compiles a factorisation, which may
        # be inside the call this limit is for).
        import scipy.linalg.cython_lapack  # noqa: F401
        from threadpoolctl import ThreadpoolController

        _controller_made.append(ThreadpoolController())
    return _controller_made[0]


def one_thread():
    """A context in which the BLAS and LAPACK libraries of the process run on :data:`THREADS`
    (one) thread, their own settings restored at its end; nested uses restore in order.
    threadpoolctl lets one thread of a process set an OpenBLAS's limits (the first to set one,
    while it lives): a call from another thread learns under that thread's setting."""
    if THREADS is None:
        return contextlib.nullcontext()
    return _controller().limit(limits=THREADS, user_api="blas")
