"""Logistic regression learned in one pass over scikit-learn's breast cancer data.

Progressive validation: every row is predicted before it is learned. Features are
standardised with statistics of the rows seen so far only. Prints the progressive log-loss
and accuracy of the EKF (= natural gradient with 1/t rates) next to the offline fit.

    python examples/breast_cancer.py
"""

import jax
import numpy as np
from sklearn.datasets import load_breast_cancer
from sklearn.linear_model import LogisticRegression

import kalnat

jax.config.update("jax_enable_x64", True)


def running_standardise(X):
    """Each row scaled by the mean and deviation of the rows before it (no peeking)."""
    n = np.arange(1, len(X) + 1)[:, None]
    mean = np.cumsum(X, 0) / n
    var = np.cumsum(X**2, 0) / n - mean**2
    prev_mean = np.vstack([np.zeros(X.shape[1]), mean[:-1]])
    prev_std = np.sqrt(np.vstack([np.ones(X.shape[1]), var[:-1]]))
    return (X - prev_mean) / np.where(prev_std > 1e-12, prev_std, 1.0)


def main():
    X, y = load_breast_cancer(return_X_y=True)
    Z = running_standardise(X)
    model = kalnat.models.linear(X.shape[1])
    learner = kalnat.ekf(model, kalnat.families.Bernoulli(), prior_var=0.1)
    result = kalnat.fit(learner, learner.init(model.init(None)), Z, y)
    p = np.clip(result.predictions.mean[:, 0], 1e-12, 1 - 1e-12)
    logloss = -np.mean(y * np.log(p) + (1 - y) * np.log(1 - p))
    acc = np.mean((p > 0.5) == y)
    Zall = (X - X.mean(0)) / X.std(0)
    offline = LogisticRegression(C=1.0, max_iter=5000).fit(Zall, y).predict_proba(Zall)[:, 1]
    off_ll = -np.mean(y * np.log(offline) + (1 - y) * np.log(1 - offline))
    print(f"breast_cancer, {len(y)} rows, one pass, given order")
    print(f"  kalnat EKF (prior_var=0.1)   progressive log-loss {logloss:.4f}  accuracy {acc:.4f}")
    print(f"  offline logistic regression  in-sample log-loss   {off_ll:.4f}  (sees all rows; a floor)")


if __name__ == "__main__":
    main()
