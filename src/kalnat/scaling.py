"""Online feature standardisation: each row is scaled by statistics of the rows before it.

No row is scaled with statistics that include itself or later rows, so progressive
validation stays honest. The statistics are merged per chunk with the parallel form of
Welford's update (Chan et al.), so a stream is processed chunk by chunk with the same result
as row by row.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

__all__ = ["RunningStats", "init", "transform_and_update"]


class RunningStats(NamedTuple):
    """``count`` rows seen, their per-feature ``mean (p,)`` and sum of squared deviations
    ``m2 (p,)``."""

    count: np.ndarray
    mean: np.ndarray
    m2: np.ndarray

    @property
    def std(self):
        var = self.m2 / np.maximum(self.count, 1)
        return np.sqrt(var)


def init(n_features: int) -> RunningStats:
    return RunningStats(np.zeros((), np.int64), np.zeros(n_features), np.zeros(n_features))


def transform_and_update(stats: RunningStats, X, min_std: float = 1e-8):
    """Scales each row of ``X (n, p)`` by the statistics of all rows before it.

    The first row (nothing seen yet) is left unscaled; a feature whose running deviation is
    below ``min_std`` (e.g. constant so far) is centred but not divided.

    Returns:
      ``(Z (n, p), stats')`` with ``stats'`` including the rows of ``X``.
    """
    X = np.asarray(X, dtype=np.float64)
    n = X.shape[0]
    if n == 0:
        return X.copy(), stats
    c0 = int(stats.count)
    counts = c0 + np.arange(1, n + 1)[:, None]
    # running mean / M2 after each row, continuing from the stored statistics
    csum = np.cumsum(X - stats.mean, axis=0)
    means = stats.mean + csum / counts
    # M2 after k rows: m2_0 + Σ (x_i − mean_{i−1})(x_i − mean_i)
    prev_means = np.vstack([stats.mean[None], means[:-1]])
    m2s = stats.m2 + np.cumsum((X - prev_means) * (X - means), axis=0)
    prev_counts = counts - 1
    prev_m2 = np.vstack([stats.m2[None], m2s[:-1]])
    prev_std = np.sqrt(prev_m2 / np.maximum(prev_counts, 1))
    center = np.where(prev_counts > 0, prev_means, 0.0)
    scale = np.where((prev_counts > 1) & (prev_std > min_std), prev_std, 1.0)
    Z = (X - center) / scale
    return Z, RunningStats(np.asarray(c0 + n), means[-1].copy(), m2s[-1].copy())
