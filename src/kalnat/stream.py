"""``fit``: run a learner over a stream of rows with ``lax.scan``, in chunks.

Each chunk of ``chunk_size`` minibatches is one jitted ``scan`` whose state buffers are
donated, so the ``d × d`` matrix is updated in place across the whole stream. Every
minibatch is predicted *before* it is learned (progressive validation), from the prior and
the same linearisation the update uses; the hyperparameters are an argument of the compiled
scan, so other values run without recompiling. The rows are moved to the device one chunk at a time, so a
stream larger than device memory works.
"""

from __future__ import annotations

import functools
import math
from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from kalnat import blas
from kalnat import filter as _filter
from kalnat import saved
from kalnat.filter import Predictive
from kalnat.learners.base import Learner, check_range, device_hyper, representable
from kalnat.programs import once, with_options
from kalnat.validation import positive_int

__all__ = ["FitResult", "fit", "log_evidence"]


class FitResult(NamedTuple):
    """The outcome of :func:`fit`.

    Attributes:
      state: the learner's state after the last row.
      predictions: one per row, made before learning it, from the prior (``None`` if not
        kept); rows that were skipped, and a sequence's steps past its ``lengths`` in
        :func:`kalnat.recurrent.fit_sequence`, have NaN predictions.
      skipped: ``(n,)`` booleans (``(T,)`` or ``(B, T)`` from
        :func:`kalnat.recurrent.fit_sequence`), the rows skipped as bad by ``skip_bad_rows``
        (all false without it); ``n_skipped`` is their count.
      log_likelihood: ``(n,)`` each row's one-step predictive log-likelihood (its sum is the
        stream's log evidence; NaN for skipped rows; ``None`` if predictions are not kept).
    """

    state: object
    predictions: Optional[Predictive]
    skipped: Optional[np.ndarray] = None
    log_likelihood: Optional[np.ndarray] = None

    @property
    def n_skipped(self) -> int:
        return 0 if self.skipped is None else int(np.count_nonzero(self.skipped))


def step_or_skip(any_row, learn, carry):
    """``lax.cond(any_row, learn, skip, carry)``, where ``learn(carry) -> (carry, out)`` and
    ``skip`` (a minibatch that is all padding) keeps ``carry`` and gives zeros shaped like
    ``out``.

    ``learn`` is traced once: ``cond`` traces its first branch first, and the second takes the
    shapes from that trace instead of tracing ``learn`` again with ``eval_shape`` (the step is
    most of what a chunk's program takes to trace)."""
    traced = []

    def run(c):
        c, out = learn(c)
        traced.append(jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), out))
        return c, out

    def skip(c):
        shapes = traced[-1] if traced else jax.eval_shape(learn, c)[1]
        return c, jax.tree_util.tree_map(lambda a: jnp.zeros(a.shape, a.dtype), shapes)

    return jax.lax.cond(any_row, run, skip, carry)


def scan_rows(learner, hyper, state, xs, ys, ms, keep: bool = True):
    """``lax.scan`` of ``learner.step`` over the minibatches of a chunk: ``(state, (preds,
    log_liks))``; a minibatch whose rows are all masked is no step at all. Without ``keep``,
    ``(state, first)`` instead: ``first`` the index, in the chunk's ``(c, b)`` rows flattened,
    of the first learned row whose log-likelihood is NaN, or -1 (what :func:`drive_chunks`
    needs to raise :class:`Diverged` at one number per chunk)."""

    def body(state, inp):
        xb, yb, mb = inp

        def learn(s):
            # a single row is learned only when it is not masked: a constant mask then, which
            # removes the masking's pass over H from the step (and every select it feeds)
            s, pred, ll = learner.step(hyper, s, xb, yb, jnp.ones_like(mb) if mb.shape[0] == 1 else mb)
            return s, (pred, ll)

        state, out = step_or_skip(jnp.any(mb), learn, state)
        return state, (out if keep else jnp.isnan(out[1]) & mb)

    state, out = jax.lax.scan(body, state, (xs, ys, ms))
    return state, (out if keep else first_nan(out))


def first_nan(nan):
    """The index of the first true entry of ``nan (c, b)`` (a chunk's learned rows whose
    log-likelihood is NaN), flattened, or -1."""
    nan = nan.reshape(-1)
    return jnp.where(nan.any(), jnp.argmax(nan), -1)


def chunk_fn(learner, keep: bool):
    """The jitted, state-donating scan over one chunk of minibatches (cached per learner).

    Works for any learner with ``step(hyper, state, xs, ys, mask) -> (state, pred, log_lik)``
    (the core learners, the recurrent ones), or with its own ``scan_chunk`` (a bank, which runs
    its members member by member). ``(hyper, state, xs (c, b, …), ys, mask (c, b)) -> (state,
    (preds, log_liks))``, or without ``keep`` ``(state, index)``: the chunk's first learned row
    whose log-likelihood is NaN (:func:`first_nan`).
    """
    scan = getattr(learner, "scan_chunk", None) or functools.partial(scan_rows, learner)
    key, options = with_options(learner, ("chunk", keep))
    return once(learner, key, lambda: saved.jit(
        learner, f"chunk keep={keep}", lambda hyper, state, xs, ys, ms: scan(hyper, state, xs, ys, ms, keep),
        donate_argnums=(1,), compiler_options=options))


def no_steps(learner, hyper, state, dtype, x_shape, y_shape, y_dtype, width: int = 1):
    """``(predictions, log_lik)`` of no steps, leaves ``(0, width, …)``: what :func:`chunk_fn`'s
    program returns for steps of ``width`` rows (each ``x_shape``, and ``y_shape`` of ``y_dtype``),
    its shapes traced (``jax.eval_shape``), nothing compiled: :func:`fit` of no rows (and
    ``fit_sequence`` of no steps) keeps the arrays its docstring names, of length 0."""
    learner.check_given_hyper(hyper, state)
    one = (np.zeros((1, width) + tuple(x_shape), dtype), np.zeros((1, width) + tuple(y_shape), y_dtype),
           np.ones((1, width), bool))
    _, out = jax.eval_shape(functools.partial(chunk_fn(learner, True), device_hyper(learner, hyper, dtype)),
                            state, *one)
    return jax.tree_util.tree_map(lambda a: np.zeros((0,) + a.shape[1:], a.dtype), out)


def fit(learner: Learner, state, X, Y, *, batch_size: int = 1, chunk_size: int = 256,
        return_predictions: bool = True, progress: bool = False,
        callback: Optional[Callable] = None, skip_bad_rows: bool = False, hyper=None,
        fixed_chunk: bool = False) -> FitResult:
    """Learns rows ``X (n, …)``, ``Y (n, …)`` in order, ``batch_size`` rows per update.

    A minibatch is one update at one linearisation point (docs/method.md §2d); for a
    linear-Gaussian model it equals ``batch_size`` sequential updates exactly.

    Args:
      learner: from :func:`kalnat.ekf`, :func:`kalnat.natural_gradient`, …
      state: the learner's state (donated: use the returned one).
      X: ``(n, …)`` rows; validated up front (``ValueError`` on NaN/inf or shape).
      Y: ``(n, …)`` targets; validated up front (``ValueError`` on NaN/inf, shape or domain).
      batch_size: rows per update; a last partial minibatch is learned as a smaller one.
      chunk_size: minibatches per jitted ``scan`` call.
      return_predictions: keep the progressive predictions (``n`` rows of :class:`Predictive`).
      progress: show a progress bar.
      callback: ``callback(rows_done, state, chunk_predictions)`` after each chunk.
      skip_bad_rows: instead of raising, skip the rows with NaN/inf in ``x`` or ``y`` or a
        ``y`` outside the family's domain (a label that is not a class, a negative or
        fractional count). A skipped row is not learned (a minibatch of skipped rows is no
        update at all: the step count and forgetting do not advance), its prediction is NaN,
        and it is flagged in ``FitResult.skipped``. Wrong shapes and dtypes still raise.
      hyper: the hyperparameters (:class:`kalnat.filter.Hyper`; a bank's stacked ones);
        default the learner's own.
      fixed_chunk: always scan ``chunk_size`` minibatches per call, padding a shorter stream
        with masked rows (skipped, no step): one compiled program for streams of any length,
        where the default compiles one per shorter length (cheaper to run, more to compile).

    The process's BLAS and LAPACK run on one thread during the call (:mod:`kalnat.blas`: JAX's
    CPU factorisations call them, and their threads contend with XLA's).

    Raises :class:`Diverged` (a ``ValueError``) where a learned row's one-step log-likelihood
    is NaN (the filter diverged), naming the row, whether or not predictions are kept.
    """
    learner._check_state(state)
    batch_size = positive_int(batch_size, "batch_size")
    chunk_size = positive_int(chunk_size, "chunk_size")
    if skip_bad_rows:
        xs, ys, bad = _bad_rows(learner, state, X, Y)
    else:
        xs, ys = _checked(learner, state, X, Y)
        bad = np.zeros(xs.shape[0], bool)
    n = xs.shape[0]
    dtype = np.dtype(learner._dtype(state))
    if n == 0:
        if not return_predictions:
            return FitResult(state, None, bad)
        empty = no_steps(learner, hyper, state, dtype, xs.shape[1:], ys.shape[1:], ys.dtype)
        predictions, ll = jax.tree_util.tree_map(lambda a: a[:, 0], empty)
        return FitResult(state, predictions, bad, ll)

    n_batches = math.ceil(n / batch_size)
    per_chunk = chunk_size if fixed_chunk else min(chunk_size, n_batches)
    rows_per_chunk = per_chunk * batch_size
    shape = (per_chunk, batch_size)

    def inputs(start, stop):
        xc, yc, mc = pad_chunk(xs[start:stop].astype(dtype, copy=False), ys[start:stop],
                               ~bad[start:stop], rows_per_chunk)
        return xc.reshape(shape + xc.shape[1:]), yc.reshape(shape + yc.shape[1:]), mc.reshape(shape)

    learner.check_given_hyper(hyper, state)
    run = functools.partial(chunk_fn(learner, bool(return_predictions)), device_hyper(learner, hyper, dtype))
    state, preds = drive_chunks(
        run, state, n, rows_per_chunk, inputs,
        lambda a, k: a.reshape((rows_per_chunk,) + a.shape[2:])[:k], bad,
        bool(return_predictions), progress, callback, "row")
    if not return_predictions:
        return FitResult(state, None, bad)
    predictions, ll = jax.tree_util.tree_map(lambda *a: np.concatenate(a), *preds)
    return FitResult(state, predictions, bad, ll)


def _checked(learner, state, X, Y):
    """``(xs, ys)`` validated on the host, or a ``ValueError`` that names the first row whose
    values fail (``x`` or ``y``, the one the message is about)."""
    try:
        xs, single = learner.check_x(state, X)
    except ValueError as err:
        raise _at_row(err, lambda: ~np.all(representable(np.asarray(X), learner._dtype(state)),
                                            axis=tuple(range(1, np.ndim(X))))) from None
    if single:
        raise ValueError(f"X must have a leading row axis, got shape {np.shape(X)}")
    try:
        ys = learner.family.check(Y)
        check_range(ys, learner._dtype(state), "y")
    except ValueError as err:
        raise _at_row(err, lambda: bad_rows_of(learner.family, Y, learner._dtype(state))[1]) from None
    if ys.ndim == len(learner.family.event_shape):
        raise ValueError(f"Y must have a leading row axis, got shape {ys.shape}")
    if ys.shape[0] != xs.shape[0]:
        raise ValueError(f"X has {xs.shape[0]} rows but Y has {ys.shape[0]}")
    return xs, ys


def _at_row(err, bad_rows):
    """``err`` with the first row that ``bad_rows()`` flags named, where it is one row's."""
    try:
        bad = np.asarray(bad_rows())
    except (ValueError, TypeError):  # not a row's values (a shape, a dtype)
        return err
    if bad.ndim != 1 or not bad.any():
        return err
    return ValueError(f"row {int(np.argmax(bad))} (0-based): {err} (skip_bad_rows=True skips such rows)")


def _bad_rows(learner, state, X, Y):
    """``(xs, ys, bad (n,))``: shapes and dtypes validated (``ValueError``), bad rows flagged.

    Bad rows are overwritten (in copies) with the first good row, so that every row of a
    minibatch linearises to finite numbers: a masked row contributes ``H = 0``, ``e = 0``, but
    a NaN in its ``ŷ`` or ``R`` would still reach the factorisation of the stacked ``S``.
    """
    x = np.asarray(X)
    if x.dtype.kind not in "biuf":
        raise ValueError(f"x must be numeric, got dtype {x.dtype}")
    dtype = learner._dtype(state)
    ok = representable(x, dtype)
    xs, single = learner.check_x(state, np.where(ok, x, 0) if not ok.all() else x)
    if single:
        raise ValueError(f"X must have a leading row axis, got shape {x.shape}")
    ys, bad_y = bad_rows_of(learner.family, Y, dtype)
    n = xs.shape[0]
    if ys.shape[0] != n:
        raise ValueError(f"X has {n} rows but Y has {ys.shape[0]}")
    bad = bad_y | ~np.all(ok, axis=tuple(range(1, ok.ndim)))
    if bad.any():
        good = np.flatnonzero(~bad)
        xs, ys = xs.copy(), ys.copy()
        if good.size:
            xs[bad], ys[bad] = xs[good[0]], ys[good[0]]
        else:  # nothing to learn: every minibatch is skipped, any valid values will do
            ys[bad] = 0
    return xs, ys, bad


def bad_rows_of(family, Y, dtype):
    """``(y, bad (b,))``: ``family.check_rows`` (the family's domain) and, besides, values
    beyond the range of the state's ``dtype``."""
    ys, bad = family.check_rows(Y)
    return ys, bad | ~np.all(representable(ys, dtype), axis=tuple(range(1, ys.ndim)))


def pad_chunk(x, y, mask, rows):
    """A chunk of ``k ≤ rows`` rows (or time steps) padded to ``rows`` with copies of its first
    one: valid inputs, masked out of every update (``mask`` gets ``False`` there)."""
    k = x.shape[0]
    if k < rows:
        x = np.concatenate([x, np.repeat(x[:1], rows - k, axis=0)])
        y = np.concatenate([y, np.repeat(y[:1], rows - k, axis=0)])
        mask = np.concatenate([mask, np.zeros((rows - k,) + mask.shape[1:], bool)])
    return x, y, mask


def _bar(n: int, progress: bool, unit: str):
    """A progress bar over ``n`` rows: tqdm.auto's (a widget in a notebook) when it is shown,
    else a disabled plain one. tqdm.auto imports asyncio, 40 ms of a warm ``kalnat learn``
    (``python -X importtime``), which a bar nobody sees need not pay."""
    if progress:
        from tqdm.auto import tqdm
    else:
        from tqdm import tqdm
    return tqdm(total=n, disable=not progress, unit=unit)


def drive_chunks(run, state, n, step, inputs, unpack, skipped, keep, progress, callback, unit, padding=None):
    """Runs the jitted chunk function ``run`` over ``n`` rows (or time steps), ``step`` at a time.

    ``inputs(start, stop)`` gives one padded chunk's arguments (the mask last), ``unpack(a,
    k)`` the first ``k`` rows of a chunk's output array on the host (its predictions and
    log-likelihoods); rows flagged in ``skipped`` get NaN, and so do the predictions (not the
    log-likelihoods, 0: no observation) flagged in ``padding`` (a sequence past its end).
    Raises :class:`Diverged` where a learned row's log-likelihood is NaN, with or without
    ``keep`` (without, from the chunk's index of the first such row, read once all chunks
    have run: no wait on the device per chunk). Shows the progress bar and calls
    ``callback(stop, state, predictions)``. Returns ``(state, [chunk (predictions,
    log-likelihoods)])`` (an empty list unless ``keep``). The BLAS libraries run on one thread
    meanwhile, the callback's work included (:mod:`kalnat.blas`).
    """
    preds, firsts = [], []
    with blas.one_thread(), _bar(n, progress, unit) as bar:
        for start in range(0, n, step):
            stop = min(start + step, n)
            args = inputs(start, stop)
            state, pc = run(state, *args)
            if keep:
                pc = jax.tree_util.tree_map(lambda a: unpack(np.asarray(a), stop - start), pc)
                check_diverged(pc[1], skipped[start:stop], start, unit)
                if skipped[start:stop].any():
                    pc = jax.tree_util.tree_map(lambda a: _blank(a, skipped[start:stop]), pc)
                if padding is not None and padding[start:stop].any():
                    pc = (jax.tree_util.tree_map(lambda a: _blank(a, padding[start:stop]), pc[0]), pc[1])
                preds.append(pc)
            elif pc is not None:  # the index of the chunk's first NaN log-likelihood (scan_rows)
                firsts.append((start, stop, np.shape(args[-1]), pc))
            bar.update(stop - start)
            if callback is not None:
                callback(stop, state, pc[0] if keep else None)
        jax.block_until_ready(state)  # the last chunk's factorisations within the limit too
    for (start, stop, shape, _), first in zip(firsts, jax.device_get([f[-1] for f in firsts])):
        if first >= 0:
            nan = np.zeros(int(np.prod(shape)), bool)
            nan[int(first)] = True
            rows = unpack(nan.reshape(shape), stop - start)
            raise_diverged(start + int(np.flatnonzero(rows.reshape(rows.shape[0], -1).any(axis=1))[0]), unit)
    return state, preds


class Diverged(ValueError):
    """A learned row's one-step log-likelihood is NaN: the filter diverged. ``row``: its index
    (from 0) among the rows (or time steps) of the call that raised."""

    def __init__(self, message, row):
        super().__init__(message)
        self.row = row

    def __reduce__(self):  # raised in another process (a Dask worker), it arrives whole
        return Diverged, (str(self), self.row)


def check_diverged(log_lik, skipped, start, unit):
    """Raises :class:`Diverged` where a learned row's one-step log-likelihood is NaN: every
    later number would be NaN too."""
    ll = np.asarray(log_lik)
    learned = ~np.asarray(skipped).reshape(ll.shape[0], -1)     # (k, 1), or (k, B) sequences
    bad = np.flatnonzero((np.isnan(ll.reshape(ll.shape[0], -1)) & learned).any(axis=1))
    if bad.size:
        raise_diverged(start + int(bad[0]), unit)


def raise_diverged(row, unit):
    """Raises :class:`Diverged` for ``row`` (from 0), a ``unit`` (row, step) of the call."""
    raise Diverged(
        f"the learner diverged: the one-step log-likelihood of {unit} {row} (from 0) is NaN, a "
        "variance or a prediction having left the float range. Common causes: forgetting < 1 "
        "without max_variance (the variance of a parameter the rows do not inform grows without "
        "end), a prior variance too large for the model (a network's or a log link's outputs "
        "overflow), float32 where float64 has the range. The state given to fit was consumed: "
        "start again from learner.init", row)


def _blank(a, bad):
    if a.dtype.kind != "f":
        return a
    a = np.array(a)
    a[bad] = np.nan
    return a


def log_evidence(learner, hyper, params, X, Y, *, batch_size: int = 1):
    """A stream's log evidence ``Σ_t log p(y_t | y_<t)`` as a pure function of ``hyper``.

    The learner starts from ``params`` with the prior of ``hyper`` and learns ``X (n, …)``,
    ``Y (n, …)`` in minibatches of ``batch_size`` (``n`` a multiple of it); everything is
    traceable, so ``jax.grad`` with respect to ``hyper`` (λ, the prior scale, q, …) gives the
    gradient of the evidence: type-II maximum likelihood of the hyperparameters. For a
    linear-Gaussian model it is the exact log marginal likelihood. No validation and no
    donation: check the data with :func:`fit` first.
    """
    if not isinstance(learner, Learner):
        raise ValueError(f"log_evidence takes a core learner, got {type(learner).__name__}")
    n = X.shape[0]
    if n % batch_size:
        raise ValueError(f"log_evidence: {n} rows is not a multiple of batch_size {batch_size}")
    xs = jnp.reshape(X, (n // batch_size, batch_size) + X.shape[1:])
    ys = jnp.reshape(Y, (n // batch_size, batch_size) + Y.shape[1:])
    state = _filter.init(learner, hyper, params)

    def body(s, xy):
        s, _, ll = learner.step(hyper, s, xy[0], xy[1])
        return s, jnp.sum(ll)

    return jnp.sum(jax.lax.scan(body, state, (xs, ys))[1])
