"""``fit_sequence``: a recurrent learner over time with ``lax.scan``, in chunks of time steps.

The same pattern as :func:`kalnat.fit`: each chunk of ``chunk_size`` time steps is one jitted
``scan`` whose state buffers are donated (the ``d × d`` — or joint — covariance and the
``n × d`` RTRL Jacobians are updated in place), and every step is predicted *before* it is
learned (progressive validation). The hidden state travels in the learner's state, so a long
stream can be fed in pieces: calling ``fit_sequence`` again with the returned state continues
the same sequence exactly where it stopped.

A batch of ``B`` independent sequences (``X (B, T, …)``) is advanced in parallel (``vmap``
over sequences inside each step), sharing θ; sequences of different lengths are padded and
given ``lengths``: past its end a sequence is frozen (no transition, no observation), its
padding is not validated and its predictions there are NaN.

With ``skip_bad_rows``, a time step whose ``x_t`` or ``y_t`` is bad (NaN/inf, beyond the
state's float range, ``y`` outside the family's domain) is dropped through the same mask as
the padding: found on the host with NumPy, then masked inside the jitted scan.
"""

from __future__ import annotations

import functools

import jax
import numpy as np

from kalnat.learners.base import check_range, device_hyper, representable
from kalnat.recurrent.base import RecurrentLearner, _check_numeric
from kalnat.stream import FitResult, bad_rows_of, chunk_fn, drive_chunks, no_steps, pad_chunk
from kalnat.validation import positive_int

__all__ = ["fit_sequence"]


def fit_sequence(learner: RecurrentLearner, state, X, Y, *, lengths=None, chunk_size: int = 256,
                 return_predictions: bool = True, progress: bool = False, callback=None,
                 skip_bad_rows: bool = False, hyper=None, fixed_chunk: bool = False) -> FitResult:
    """Learns a sequence (or ``B`` sequences) step by step, predicting each ``y_t`` first.

    Args:
      learner: from :func:`kalnat.recurrent.rtrl` or :func:`kalnat.recurrent.joint_ekf`.
      state: the learner's state (donated: use the returned one). Its ``B`` (``state.s``'s
        first axis, the ``batch`` given to ``init``) is the number of sequences.
      X: ``(T,) + input_shape`` for one stream (``B = 1``) or ``(B, T) + input_shape``.
      Y: ``(T,) + event_shape`` or ``(B, T) + event_shape``, aligned with ``X``: ``y_t`` is
        predicted from ``x_1 … x_t`` (for one-step-ahead forecasting put ``x_t = y_{t−1}``).
        Validated up front (the steps within ``lengths``): ``ValueError`` on NaN/inf, a value
        beyond the range of the state's dtype (1e39 for float32), a ``y`` outside the
        family's domain, wrong shapes.
      lengths: ``(B,)`` true lengths of padded sequences (default: all ``T``). Past its end
        a sequence is frozen (no transition, no observation); its padding is not validated
        and may hold anything (NaN, a label that is no class), its predictions there are NaN
        and its log-likelihoods 0 (no observation: a row's sum is that sequence's log
        evidence).
      chunk_size: time steps per jitted ``scan``.
      fixed_chunk: always scan ``chunk_size`` steps per call, padding a shorter piece with
        masked steps (no transition, no observation): one compiled program for pieces of any
        length, as a stream fed in pieces needs, where the default compiles one per shorter
        length (:func:`kalnat.fit`'s ``fixed_chunk``).
      return_predictions: keep the progressive predictions. Either way a divergence raises
        :class:`kalnat.Diverged` (below).
      progress: show a progress bar.
      callback: ``callback(steps_done, state, chunk_predictions)`` after each chunk.
      skip_bad_rows: instead of raising, skip the time steps whose ``x_t`` or ``y_t`` has
        NaN/inf or a value beyond the state's float range, or whose ``y_t`` lies outside the
        family's domain. A skipped step is dropped from its sequence: no transition and no
        learning (that sequence's hidden state — and RTRL Jacobian — carries over to its next
        step, as if the step were not there), its prediction is NaN, and it is flagged in
        ``FitResult.skipped``. For one stream the result is bit-identical to the sequence
        with those steps removed (θ, covariance, hidden state, ``G``, step count). In a batch
        (``B > 1``) the sequences step together on one θ, so a bad step of sequence ``b``
        freezes ``b`` at that step exactly as padding past its end does (see ``lengths``):
        ``b`` neither advances nor contributes an observation, while the other sequences
        learn at that step as usual (θ, the step count and forgetting move with them, and
        ``b``'s state is still corrected for θ's change, by ``G δθ`` in RTRL and through its
        covariance with θ in the joint EKF, as for padding). A step that is bad (or padding) in every sequence is no update at all.
        Bad values past a sequence's ``lengths`` are padding: ignored, not counted. Wrong
        shapes and dtypes still raise.
      hyper: the hyperparameters (:class:`kalnat.filter.Hyper`); default the learner's own.

    Returns:
      :class:`kalnat.FitResult`: the state after the last step, the predictions
      (:class:`~kalnat.Predictive` with leading axes ``(T,)`` or ``(B, T)``) and ``skipped``,
      booleans of shape ``(T,)`` or ``(B, T)`` (all false without ``skip_bad_rows``;
      ``n_skipped`` is their total).

    Raises:
      kalnat.Diverged: (a ``ValueError``) where a learned step's one-step log-likelihood is
        NaN, the filter having diverged; ``row`` is that step (from 0). With predictions kept
        it is raised at the chunk where it happens, without them once every chunk has run.
        The state given was consumed either way: start again from ``learner.init``.
      ValueError: bad input (above), before the state is touched.
    """
    learner.check_state(state)
    chunk_size = positive_int(chunk_size, "chunk_size")
    nb = state.s.shape[0]
    in_shape = tuple(learner.cell.input_shape)
    ev_shape = tuple(learner.family.event_shape)
    dtype = np.dtype(learner.dtype(state))
    x = np.asarray(X)
    if x.dtype.kind not in "biuf":
        raise ValueError(f"X must be numeric, got dtype {x.dtype}")
    if nb == 1 and x.ndim == len(in_shape) + 1 and x.shape[1:] == in_shape:
        single, x = True, x[None]
    elif x.ndim == len(in_shape) + 2 and x.shape[0] == nb and x.shape[2:] == in_shape:
        single = False
    else:
        want = f"(T,) + {in_shape} or (1, T) + {in_shape}" if nb == 1 else f"({nb}, T) + {in_shape}"
        raise ValueError(f"X must have shape {want} for this state of {nb} sequence{'s' * (nb > 1)}, "
                         f"got {x.shape}")
    y = np.asarray(Y)
    want = ((x.shape[1],) if single else (nb, x.shape[1])) + ev_shape
    if y.shape != want:
        raise ValueError(f"Y must have shape {want} to match X, got {y.shape}")
    t_len = x.shape[1]
    y = y.reshape((nb, t_len) + ev_shape)
    if lengths is None:
        lens = np.full(nb, t_len)
    else:
        lens = np.asarray(lengths)
        if lens.shape != (nb,) or lens.dtype.kind not in "iu" or np.any(lens < 0) or np.any(lens > t_len):
            raise ValueError(f"lengths must be {nb} integers in 0..{t_len}, got {lengths!r}")
    live = np.arange(t_len)[None, :] < lens[:, None]  # (B, T): within each sequence's length
    padded = not live.all()
    if not skip_bad_rows:
        # only the live steps are data: padding past a sequence's end may hold anything
        xl, yl = (x[live], y[live]) if padded else (x, y.reshape((-1,) + ev_shape))
        _check_numeric(xl, "X")
        check_range(xl, dtype, "X")
        yl = learner.family.check(yl)
        check_range(yl, dtype, "Y")
    # A frozen sequence still runs through a step's arithmetic in a batch, so its padding (and
    # a bad step, with skip_bad_rows) is replaced by finite, in-domain values (_bad_steps).
    if skip_bad_rows or padded:
        x, y, bad = _bad_steps(learner, x, y, dtype)
    else:
        y = yl.reshape((nb, t_len) + ev_shape)
    skipped = bad & live if skip_bad_rows else np.zeros((nb, t_len), bool)
    skipped_out = skipped[0] if single else skipped
    if t_len == 0:
        if not return_predictions:
            return FitResult(state, None, skipped_out)
        empty = no_steps(learner, hyper, state, dtype, x.shape[2:], y.shape[2:], y.dtype, width=nb)
        predictions, ll = jax.tree_util.tree_map(lambda a: _batch_major(a, single), empty)
        return FitResult(state, predictions, skipped_out, ll)

    # Time-major: the scan runs over time, each step over the B sequences.
    xt = np.swapaxes(x, 0, 1).astype(dtype, copy=False)
    yt = np.swapaxes(y, 0, 1)
    mt = (live & ~skipped).T
    st = skipped.T
    per_chunk = int(chunk_size) if fixed_chunk else min(int(chunk_size), t_len)
    learner.check_given_hyper(hyper, state)
    run = functools.partial(chunk_fn(learner, bool(return_predictions)), device_hyper(learner, hyper, dtype))
    state, preds = drive_chunks(
        run, state, t_len, per_chunk,
        lambda start, stop: pad_chunk(xt[start:stop], yt[start:stop], mt[start:stop], per_chunk),
        lambda a, k: a[:k], st, bool(return_predictions), progress, callback, "step", ~live.T if padded else None)
    if not return_predictions:
        return FitResult(state, None, skipped_out)
    predictions, ll = jax.tree_util.tree_map(lambda *a: _batch_major(np.concatenate(a), single), *preds)
    return FitResult(state, predictions, skipped_out, ll)


def _bad_steps(learner, x, y, dtype):
    """``(x, y, bad (B, T))`` for ``x (B, T, …)``, ``y (B, T, …)``: dtypes validated
    (``ValueError``), bad steps flagged and their values replaced (in copies) by finite,
    in-domain ones.

    A masked sequence still runs through the step's arithmetic in a batch (its readout's
    ``R`` sits in the block-diagonal ``S``), so it must stay finite: non-finite or
    out-of-range entries of ``x`` become 0 and a bad ``y_t`` becomes the first good one.
    """
    nb, t_len = x.shape[:2]
    ok = representable(x, dtype)
    ys, bad_y = bad_rows_of(learner.family, y.reshape((-1,) + y.shape[2:]), dtype)
    bad = ~np.all(ok, axis=tuple(range(2, ok.ndim))) | bad_y.reshape(nb, t_len)
    if bad.any():
        if not ok.all():
            x = np.where(ok, x, 0)
        ys = ys.copy()
        good = np.flatnonzero(~bad_y)
        ys[bad_y] = ys[good[0]] if good.size else 0
    return x, ys.reshape(y.shape), bad


def _batch_major(a, single):
    return a[:, 0] if single else np.swapaxes(a, 0, 1)
