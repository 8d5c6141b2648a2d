"""kalnat's river estimators against river's and scikit-learn's online learners, on the real data
sets bundled in their wheels, by river's own progressive validation.

Every model is ``river.preprocessing.StandardScaler() | model`` and is run through
``river.evaluate.progressive_val_score`` (each row predicted, then learned; one pass, rows in
the given order). Learners:

  kalnat auto          kalnat.river.KalmanClassifier() / KalmanRegressor(): the self-tuning bank
  kalnat ekf           method="ekf": one EKF at prior_var 1, no forgetting
  river LR             LogisticRegression / LinearRegression, river's defaults
  river LR best*       the same with the best optimiser of a grid (SGD, Adam, AdaGrad at several
                       rates), chosen on the very stream it is scored on: hindsight, optimistic
  river BLR            BayesianLinearRegression (regression), without smoothing and (*) the best
                       smoothing of a grid, in hindsight
  sklearn SGD          SGDClassifier(loss="log_loss") / SGDRegressor, partial_fit one row at a
                       time (river.compat), scikit-learn's defaults

Scores: log-loss and accuracy (classification), MAE and RMSE (regression). Rows per second are
warm: every model runs the stream twice and the second run is timed (kalnat's first run
compiles its steps). Ratios are against "kalnat auto": the model's rows/s and primary score
over kalnat auto's (a score ratio above 1: worse than kalnat auto, for every score here is a loss
or an error).

    nice python benchmarks/streams.py [--quick] [--sets phishing bananas …]
"""

from __future__ import annotations

import argparse
import math
import time
import warnings

import jax
from river import compat, datasets, evaluate, linear_model, metrics, optim, preprocessing, stream
from sklearn import datasets as skdata
from sklearn.linear_model import SGDClassifier, SGDRegressor

from kalnat.river import KalmanClassifier, KalmanRegressor

jax.config.update("jax_enable_x64", True)


def _sk(loader, binary):
    data = loader()

    class Data:
        def __iter__(self):
            for x, y in stream.iter_sklearn_dataset(data):
                yield x, (bool(y) if binary else float(y))

    return Data


SETS = {  # name -> (task, iterable factory)
    "phishing": ("classification", datasets.Phishing),
    "bananas": ("classification", datasets.Bananas),
    "breast_cancer": ("classification", _sk(skdata.load_breast_cancer, True)),
    "trump_approval": ("regression", datasets.TrumpApproval),
    "chick_weights": ("regression", datasets.ChickWeights),
    "diabetes": ("regression", _sk(skdata.load_diabetes, False)),
}

OPTIMISERS = [(f"SGD({lr})", lambda lr=lr: optim.SGD(lr)) for lr in (0.003, 0.01, 0.03, 0.1, 0.3)] + \
             [(f"Adam({lr})", lambda lr=lr: optim.Adam(lr)) for lr in (0.01, 0.1)] + \
             [(f"AdaGrad({lr})", lambda lr=lr: optim.AdaGrad(lr)) for lr in (0.1, 1.0)]
SMOOTHINGS = (0.8, 0.9, 0.95, 0.99, 0.999)


def _models(task):
    """``[(label, [(config, factory), …], hindsight)]``: one config, or a grid to pick from."""
    if task == "classification":
        return [
            ("kalnat auto", [("", KalmanClassifier)], False),
            ("kalnat ekf", [("", lambda: KalmanClassifier(method="ekf"))], False),
            ("river LR", [("", linear_model.LogisticRegression)], False),
            ("river LR best*", [(n, lambda o=o: linear_model.LogisticRegression(optimizer=o()))
                                for n, o in OPTIMISERS], True),
            ("sklearn SGD", [("", lambda: compat.convert_sklearn_to_river(SGDClassifier(loss="log_loss"),
                                                                          classes=[False, True]))], False),
        ]
    return [
        ("kalnat auto", [("", KalmanRegressor)], False),
        ("kalnat ekf", [("", lambda: KalmanRegressor(method="ekf"))], False),
        ("river LR", [("", linear_model.LinearRegression)], False),
        ("river LR best*", [(n, lambda o=o: linear_model.LinearRegression(optimizer=o())) for n, o in OPTIMISERS],
         True),
        ("river BLR", [("", linear_model.BayesianLinearRegression)], False),
        ("river BLR smoothing*", [(f"smoothing={s}", lambda s=s: linear_model.BayesianLinearRegression(smoothing=s))
                                  for s in SMOOTHINGS], True),
        ("sklearn SGD", [("", lambda: compat.convert_sklearn_to_river(SGDRegressor()))], False),
    ]


def _score(task, make, data, rows):
    """``(primary, secondary, rows/s)`` of one configuration (second, warm run timed)."""
    out = None
    for _ in range(2):
        metric = (metrics.LogLoss() + metrics.Accuracy()) if task == "classification" else \
            (metrics.MAE() + metrics.RMSE())
        model = preprocessing.StandardScaler() | make()
        data_rows = list(data())[:rows] if rows else list(data())
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            evaluate.progressive_val_score(data_rows, model, metric)
        seconds = time.perf_counter() - t0
        out = (metric[0].get(), metric[1].get(), len(data_rows) / seconds)
    return out


def run(name, rows):
    task, data = SETS[name]
    results = []
    for label, grid, hindsight in _models(task):
        scored = [(cfg, *_score(task, make, data, rows)) for cfg, make in grid]
        best = min(scored, key=lambda r: r[1] if math.isfinite(r[1]) else math.inf)
        results.append((label, best[0], *best[1:]))
    return task, results


def table(name, task, results):
    first, second = ("log-loss", "accuracy") if task == "classification" else ("MAE", "RMSE")
    ref = results[0]
    lines = [f"**{name}** ({task})", "",
             f"| model | {first} | {second} | rows/s | rows/s ÷ kalnat auto's | {first} ÷ kalnat auto's |",
             "|---|---|---|---|---|---|"]
    for label, cfg, a, b, speed in results:
        shown = f"{label} ({cfg})" if cfg else label
        lines.append(f"| {shown} | {a:.4f} | {b:.4f} | {speed:,.0f} | {speed / ref[4]:.2f} | {a / ref[2]:.2f} |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sets", nargs="*", default=list(SETS), choices=list(SETS))
    ap.add_argument("--quick", action="store_true", help="the first 200 rows of each set (a smoke run)")
    args = ap.parse_args()
    for name in args.sets:
        task, results = run(name, 200 if args.quick else None)
        print(table(name, task, results), "\n", flush=True)


if __name__ == "__main__":
    main()
