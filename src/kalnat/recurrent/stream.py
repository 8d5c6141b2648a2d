"""``fit_sequence``: a recurrent learner over time with ``lax.scan``, in chunks of time steps.

The same pattern as :func:`kalnat.fit`: each chunk of ``chunk_size`` time steps is one jitted
``scan`` whose state buffers are donated (the ``d × d`` — or joint — covariance and the
``n × d`` RTRL Jacobians are updated in place), and every step is predicted *before* it is
learned (progressive validation). The hidden state travels in the learner's state, so a long
stream can be fed in pieces: calling ``fit_sequence`` again with the returned state continues
the same sequence exactly where it stopped.

A batch of ``B`` independent sequences (``X (B, T, …)``) is advanced in parallel (``vmap``
over sequences inside each step), sharing θ; sequences of different lengths are padded and
given ``lengths``: past its end a sequence is frozen and learns nothing.
"""

from __future__ import annotations

import jax
import numpy as np
from tqdm.auto import tqdm

from kalnat.recurrent.base import RecurrentLearner, _check_numeric
from kalnat.stream import FitResult, chunk_fn

__all__ = ["fit_sequence"]


def fit_sequence(learner: RecurrentLearner, state, X, Y, *, lengths=None, chunk_size: int = 256,
                 return_predictions: bool = True, progress: bool = False, callback=None) -> FitResult:
    """Learns a sequence (or ``B`` sequences) step by step, predicting each ``y_t`` first.

    Args:
      learner: from :func:`kalnat.recurrent.rtrl` or :func:`kalnat.recurrent.joint_ekf`.
      state: the learner's state (donated: use the returned one). Its ``B`` (``state.s``'s
        first axis, the ``batch`` given to ``init``) is the number of sequences.
      X: ``(T,) + input_shape`` for one stream (``B = 1``) or ``(B, T) + input_shape``.
      Y: ``(T,) + event_shape`` or ``(B, T) + event_shape``, aligned with ``X``: ``y_t`` is
        predicted from ``x_1 … x_t`` (for one-step-ahead forecasting put ``x_t = y_{t−1}``).
      lengths: ``(B,)`` true lengths of padded sequences (default: all ``T``).
      chunk_size: time steps per jitted ``scan``.
      return_predictions: keep the progressive predictions.
      progress: show a progress bar.
      callback: ``callback(steps_done, state, chunk_predictions)`` after each chunk.

    Returns:
      :class:`kalnat.FitResult`: the state after the last step and the predictions
      (:class:`~kalnat.Predictive` with leading axes ``(T,)`` or ``(B, T)``).
    """
    learner.check_state(state)
    if int(chunk_size) != chunk_size or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size}")
    nb = state.s.shape[0]
    in_shape = tuple(learner.cell.input_shape)
    ev_shape = tuple(learner.family.event_shape)
    x = _check_numeric(X, "X")
    if nb == 1 and x.ndim == len(in_shape) + 1 and x.shape[1:] == in_shape:
        single, x = True, x[None]
    elif x.ndim == len(in_shape) + 2 and x.shape[0] == nb and x.shape[2:] == in_shape:
        single = False
    else:
        raise ValueError(f"X must have shape (T,) + {in_shape}" + (" or" if nb == 1 else "")
                         + f" ({nb}, T) + {in_shape} for this state of {nb} sequence(s), got {x.shape}")
    y = np.asarray(Y)
    want = ((x.shape[1],) if single else (nb, x.shape[1])) + ev_shape
    if y.shape != want:
        raise ValueError(f"Y must have shape {want} to match X, got {y.shape}")
    y = learner.family.check(y.reshape((-1,) + ev_shape)).reshape((nb,) + want[-1 - len(ev_shape):])
    t_len = x.shape[1]
    if lengths is None:
        lens = np.full(nb, t_len)
    else:
        lens = np.asarray(lengths)
        if lens.shape != (nb,) or lens.dtype.kind not in "iu" or np.any(lens < 0) or np.any(lens > t_len):
            raise ValueError(f"lengths must be {nb} integers in 0..{t_len}, got {lengths!r}")
    if t_len == 0:
        return FitResult(state, None)

    dtype = np.dtype(learner.dtype(state))
    # Time-major: the scan runs over time, each step over the B sequences.
    xt = np.swapaxes(x, 0, 1).astype(dtype, copy=False)
    yt = np.swapaxes(y, 0, 1)
    mt = np.arange(t_len)[:, None] < lens[None, :]
    per_chunk = min(int(chunk_size), t_len)
    run = chunk_fn(learner, bool(return_predictions))
    preds = []
    with tqdm(total=t_len, disable=not progress, unit="step") as bar:
        for start in range(0, t_len, per_chunk):
            stop = min(start + per_chunk, t_len)
            xc, yc, mc = _pad(xt[start:stop], yt[start:stop], mt[start:stop], per_chunk)
            state, pc = run(state, xc, yc, mc)
            if return_predictions:
                pc = jax.tree_util.tree_map(lambda a: np.asarray(a)[: stop - start], pc)
                preds.append(pc)
            bar.update(stop - start)
            if callback is not None:
                callback(stop, state, pc if return_predictions else None)
    predictions = None
    if return_predictions:
        predictions = jax.tree_util.tree_map(
            lambda *a: _batch_major(np.concatenate(a), single), *preds)
    return FitResult(state, predictions)


def _batch_major(a, single):
    return a[:, 0] if single else np.swapaxes(a, 0, 1)


def _pad(x, y, m, rows):
    k = x.shape[0]
    if k < rows:  # copies of the first step: valid inputs, masked out of every update
        x = np.concatenate([x, np.repeat(x[:1], rows - k, axis=0)])
        y = np.concatenate([y, np.repeat(y[:1], rows - k, axis=0)])
        m = np.concatenate([m, np.zeros((rows - k,) + m.shape[1:], bool)])
    return x, y, m
