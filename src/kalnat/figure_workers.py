"""The command's report figures, drawn by worker processes started before JAX is imported.

Importing matplotlib and drawing a report's figures took about a third of a warm ``kalnat
learn`` of a small data set (about 1 s of 3). Workers forked at the command's start import
matplotlib while the command imports JAX and learns, and draw the figures side by side at the
end. Forking is safe only before JAX starts its threads, and cheap only where ``fork`` is the
platform's way of starting a process (Linux); elsewhere, or once JAX is imported (a test, a
notebook), or when no worker can be started or one dies, the figures are drawn in the calling
process. The files are the same either way.
"""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import os
import sys
from concurrent.futures.process import BrokenProcessPool
from typing import Optional

__all__ = ["FigureWorkers", "WORKERS"]

WORKERS = 2  # a report has up to four figures; two workers draw them in about half the time


def _ready(parent: int):
    import ctypes
    import os
    import signal

    # Ctrl-C is the command's to handle (it shuts the workers down), not each worker's
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # A command ended from outside (SIGTERM from `timeout` or a scheduler, SIGKILL, a crash in
    # native code) shuts nothing down, and its workers, each holding the others' end of the
    # pool's pipe, would wait for work forever: Linux ends a worker when its parent does
    # (prctl PR_SET_PDEATHSIG), and one whose parent is already gone ends now.
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1: PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # no prctl: the worker ends with the pool, as before
        pass
    if os.getppid() != parent:
        os._exit(0)
    # behind the command's own work: on a machine with fewer free cores than processes, the
    # workers take what the command leaves (the figures are wanted only at its end)
    os.nice(5)
    import kalnat.plots  # noqa: F401  (the import is the work done ahead)


def _draw(name, args, kwargs):
    from kalnat import plots

    return getattr(plots, name)(*args, **kwargs)


class _Figure:
    """One figure being drawn: :meth:`result` gives what ``kalnat.plots.<name>`` returned, or
    raises what it raised; a figure whose worker died is drawn here instead."""

    def __init__(self, future: Optional[concurrent.futures.Future], name, args, kwargs):
        self.future, self.call = future, (name, args, kwargs)

    def result(self):
        if self.future is not None:
            try:
                return self.future.result()
            except BrokenProcessPool:
                pass
        return _draw(*self.call)


class FigureWorkers:
    """Runs :mod:`kalnat.plots` functions in forked workers, or in this process where
    forking is unsafe or unavailable.

    ``draw(name, *args, **kwargs)`` starts ``kalnat.plots.<name>(*args, **kwargs)``; the
    returned object's ``result()`` gives its return value or raises what the drawing raised.
    Use as a context manager: leaving it shuts the workers down (unfinished figures are
    cancelled when leaving on an error).
    """

    def __init__(self, workers: int = WORKERS):
        self._pool = None
        if workers > 0 and sys.platform.startswith("linux") and "jax" not in sys.modules:
            try:
                self._pool = concurrent.futures.ProcessPoolExecutor(
                    workers, mp_context=multiprocessing.get_context("fork"), initializer=_ready,
                    initargs=(os.getpid(),))
                self._pool.submit(int)  # with fork, the first submit starts every worker: now, before JAX
            except OSError:  # no process to spare (a limit on processes, memory): drawn here
                self._abandon()

    @property
    def forked(self) -> bool:
        """Whether the figures are drawn by worker processes."""
        return self._pool is not None

    def draw(self, name: str, *args, **kwargs) -> _Figure:
        future = None
        if self._pool is not None:
            try:
                future = self._pool.submit(_draw, name, args, kwargs)
            except BrokenProcessPool:  # a worker died: this figure and the next are drawn here
                self._abandon()
        return _Figure(future, name, args, kwargs)

    def _abandon(self):
        """Stops the workers that did start (a pool whose start failed halfway has no manager
        to stop them, and a waiting worker would keep the command from exiting)."""
        pool, self._pool = self._pool, None
        if pool is not None:
            for process in list((getattr(pool, "_processes", None) or {}).values()):
                process.terminate()
            pool.shutdown(wait=False, cancel_futures=True)

    def close(self, cancel: bool = False):
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=cancel)
            self._pool = None

    def __enter__(self):
        return self

    def __exit__(self, kind, err, tb):
        self.close(cancel=kind is not None)
        return False
