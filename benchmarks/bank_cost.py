"""What a bank of K filters costs per row inside ``kalnat.fit``, against K single filters.

A bank is ``jax.vmap`` of one learner's step over K stacked hyperparameter pytrees
(:mod:`kalnat.bank`); its members' work is K times one filter's, plus the mixing of K
predictions. Printed, side by side in one process (ratios; absolute times on a shared machine
mislead), for a logistic model with d parameters:

  single ms    one filter of the members' kind (bounded, forgetting), per row inside fit
  bank ms      the bank, per row inside fit
  bank/(K·1)   the bank ÷ K single filters: 1 is "the vmap costs nothing"; target ≤ 1.3
  /ekf         the bank ÷ one plain EKF step (how many EKF steps a row of the bank costs)

Banks: ``ekf_bank`` with one linearisation (K = 20, members: EKFs), and ``kalnat.auto``
(K = 40, one and two linearisations, members: iterated EKFs with two); ``auto, one vmap`` is
``kalnat.auto`` with its members of both counts in one ``vmap`` (``Bank.by_iterations`` off:
every member then runs two linearisations), what ``fit`` did before it ran them apart;
``auto, H a matrix`` is ``kalnat.auto`` on the same model given as a plain function, so its
full covariances take ``H`` as a matrix: each linearisation of an iterated member then makes
its own product with ``P`` (``kalnat.auto`` shares one between them, docs/method.md §6).
``--classes C`` uses a linear softmax model of ``C`` classes (``kalnat learn digits``: 10 classes,
d = 585) instead of a logistic one. ``--pairs N`` times only ``auto`` against ``auto, H a matrix``,
alternately N times each (a machine whose speed drifts favours neither), and prints the median
of the N ratios.

    python benchmarks/bank_cost.py [--dims 32 128 512] [--rows 512] [--classes 10] [--pairs 8]
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import jax
import numpy as np

jax.config.update("jax_enable_x64", True)

import kalnat  # noqa: E402


def per_row(learner, X, y, reps=5):
    """Median seconds per row of ``fit`` over ``X, y`` (compiled first; predictions kept)."""
    kalnat.fit(learner, _init(learner, X), X, y, chunk_size=len(y))  # compile
    return float(np.median([_once(learner, X, y) for _ in range(reps)]))


def _init(learner, X):
    return learner.init(MODELS[X.shape[1]].init(None))


def _once(learner, X, y):
    """Seconds per row of one ``fit`` over ``X, y`` from a fresh state."""
    state = _init(learner, X)
    jax.block_until_ready(state)
    t = time.perf_counter()
    res = kalnat.fit(learner, state, X, y, chunk_size=len(y))
    jax.block_until_ready(res.state)
    return (time.perf_counter() - t) / len(y)


def pairs(a, b, X, y, n):
    """``a``'s and ``b``'s seconds per row, timed alternately ``n`` times each (compiled first)."""
    for learner in (a, b):
        kalnat.fit(learner, _init(learner, X), X, y, chunk_size=len(y))
    times = np.array([(_once(a, X, y), _once(b, X, y)) for _ in range(n)])
    return times[:, 0], times[:, 1]


MODELS = {}


class OneVmap(kalnat.bank.Bank):
    """A bank whose members of every count of linearisations run in one ``vmap``."""

    def by_iterations(self):
        return None


def one_vmap(bank):
    return OneVmap(**{f.name: getattr(bank, f.name) for f in dataclasses.fields(bank)})


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dims", type=int, nargs="+", default=[32, 128, 512])
    ap.add_argument("--rows", type=int, default=512)
    ap.add_argument("--classes", type=int, default=2)
    ap.add_argument("--pairs", type=int, default=0)
    args = ap.parse_args()
    m = args.classes - 1
    fam = kalnat.families.Bernoulli() if m == 1 else kalnat.families.Categorical(args.classes)
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}; float64; per row inside fit, medians")
    if not args.pairs:
        print(f"{'bank':16} {'K':>3} {'d':>5} {'single ms':>10} {'bank ms':>9} {'bank/(K·1)':>11} {'/ekf':>7}")
    for d in args.dims:
        p = max(1, d // m - 1)
        d = m * (p + 1)
        model = MODELS.setdefault(p, kalnat.models.linear(p, m))
        rng = np.random.default_rng(0)
        rows = args.rows if d <= 128 else max(64, args.rows // 4)
        X = rng.normal(size=(rows, p)) / np.sqrt(p)
        z = X @ rng.normal(size=(p, m)) * 2
        y = ((rng.random(rows) < 1 / (1 + np.exp(-z[:, 0]))) if m == 1
             else np.argmax(np.c_[z, np.zeros(rows)] + rng.gumbel(size=(rows, m + 1)), axis=1)).astype(np.int64)
        if args.pairs:
            shared, matrix = pairs(kalnat.auto(model, fam), kalnat.auto(model.apply, fam, input_shape=(p,)), X, y,
                                   args.pairs)
            print(f"d = {d}: auto {np.min(shared) * 1e3:.1f}–{np.max(shared) * 1e3:.1f} ms a row, "
                  f"auto, H a matrix {np.min(matrix) * 1e3:.1f}–{np.max(matrix) * 1e3:.1f} ms; "
                  f"median of the {args.pairs} ratios {np.median(shared / matrix):.3f}", flush=True)
            continue
        bound = kalnat.bank.default_max_variance(1.0)
        ekf = kalnat.ekf(model, fam, prior_var=1.0, forgetting=0.99, max_variance=bound)
        t_ekf = per_row(ekf, X, y)
        it2 = kalnat.iterated_ekf(model, fam, iterations=2, prior_var=1.0, forgetting=0.99, max_variance=bound)
        t_it2 = per_row(it2, X, y)
        cases = [("ekf_bank", kalnat.ekf_bank(model, fam), t_ekf),
                 ("auto", kalnat.auto(model, fam), t_it2),
                 ("auto, one vmap", one_vmap(kalnat.auto(model, fam)), t_it2),
                 ("auto, H a matrix", kalnat.auto(model.apply, fam, input_shape=(p,)), t_it2)]
        for name, bank, t_one in cases:
            t_bank = per_row(bank, X, y)
            print(f"{name:16} {bank.size:3d} {d:5d} {t_one * 1e3:10.4f} {t_bank * 1e3:9.4f} "
                  f"{t_bank / (bank.size * t_one):11.2f} {t_bank / t_ekf:7.1f}", flush=True)


if __name__ == "__main__":
    main()
