"""scikit-learn estimators: :class:`KalmanClassifier` and :class:`KalmanRegressor`.

    >>> from kalnat.sklearn import KalmanClassifier
    >>> clf = KalmanClassifier().fit(X, y)                           # doctest: +SKIP
    >>> clf.partial_fit(X_new, y_new).predict_proba(X_test)          # doctest: +SKIP

One pass over the rows, in order: ``fit`` starts afresh and learns every row once,
``partial_fit`` continues from the current state (the first call needs ``classes=`` for the
classifier, as scikit-learn's incremental classifiers do). The learner is any core filter
(``method``) or the self-tuning bank :func:`kalnat.auto` (``method="auto"``, the default), on a
linear model (``hidden=None``, the default) or a multilayer perceptron (``hidden=(16,)``), with θ's
uncertainty held in full or in a structured form (``covariance``, docs/structured.md).

Standardisation (``standardize=True``): the filter's prior ``N(0, v·I)`` is stated in
standardised features, so that one prior scale suits features of any units (on raw features
with scales 10⁻³ and 10³ the same prior is far too tight for one and far too loose for the
other, and the filter is poorly conditioned). The centre and scale are the mean and deviation
of every row given so far: each ``fit`` / ``partial_fit`` call first adds its rows to the
running statistics (:mod:`kalnat.scaling`), then re-expresses the filter in the new
coordinates, then learns the rows. A linear model's filter moves with its prior set afresh
there (:func:`kalnat.scaling.reexpress_with_prior`: the information the rows gave moved
exactly, ``θ' = Aθ`` in its mean, and the prior ``v·I`` stated in the new coordinates, as
the command's default ``reprior`` scaling does). Moved exactly (``P' = A P Aᵀ``), the prior
would stay where the first calls stated it: after a first call of one row, whose features have
no deviation yet, in the features' raw units, far too broad once they are rescaled, and
``partial_fit`` one row at a time would learn far worse than ``fit``. A network's filter moves
exactly (its weights are not zero at first, which restating the prior assumes).

The regressor's target is centred and scaled by the statistics of the first call (``fit``: all
its rows), fixed from then on: the Gaussian noise variance ``noise_var`` and the predictive are
in those units, mapped back for ``predict``. A first call whose targets have no deviation (one
row) leaves the target unscaled, and ``noise_var`` of a core method then in the target's own
units: a ``UserWarning`` says so (``method="auto"`` learns the noise scale).
"""

from __future__ import annotations

import numbers
import warnings
from typing import NamedTuple

import jax
import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin, RegressorMixin
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, validate_data

import kalnat
from kalnat import estimators, scaling
from kalnat.datasets import MAX_MAGNITUDE, _too_large
from kalnat.estimators import COVARIANCES, METHODS
from kalnat.validation import plain

__all__ = ["KalmanClassifier", "KalmanRegressor", "METHODS", "COVARIANCES"]

# Rows per jitted scan of kalnat.fit: every call runs the same compiled program (short calls
# are padded with skipped rows), so a stream of calls of any sizes compiles once.
CHUNK = 32
# Predictions are made on row counts padded to a power of two (at least this): a few compiled
# programs serve every batch size.
MIN_PREDICT_ROWS = 8


def _reexpress(learner, state, old, new, linear: bool):
    """A core learner's or a bank's state moved from feature coordinates ``old`` to ``new``
    (``(center, scale)`` pairs): a linear model's with its prior ``N(0, v·I)`` set afresh in
    the new coordinates (:func:`kalnat.scaling.reexpress_with_prior`), a network's exactly
    (:func:`kalnat.scaling.reexpress`, every prediction unchanged)."""
    bank = isinstance(learner, kalnat.bank.Bank)
    priors = scaling.fresh_priors(learner.hyper, state, bank=bank) if linear else None
    return scaling.reexpress_members(state, old, new, bank=bank, priors=priors)


def _in_range(a, what: str):
    """``a``, or a ``ValueError`` naming its first value beyond ±MAX_MAGNITUDE: features and a
    regression target are standardised by running means and variances, whose squares overflow
    float64 beyond it (the filter then learned nothing from them, or went NaN, with no error);
    the command refuses such values in its data too."""
    big = np.abs(a) > MAX_MAGNITUDE
    if big.any():
        at = np.unravel_index(int(np.flatnonzero(big)[0]), a.shape)
        raise ValueError(f"{what}[{', '.join(map(str, at))}]: {_too_large(f'{float(a[at]):g}')}")
    return a


def _numeric(y):
    """A regression target as given, or a ``ValueError`` where it holds text (scikit-learn's
    ``y_numeric`` converts an object array, with NumPy's "could not convert string to float",
    and passes an array of str to NumPy's arithmetic, "ufunc 'absolute' did not contain a loop")."""
    if y is None:  # (scikit-learn's own message for it)
        return y
    a = np.asarray(y)
    text = a.ravel()[:1] if a.dtype.kind in "US" else []
    if a.dtype.kind == "O":
        text = [v for v in a.ravel() if not isinstance(v, numbers.Real)][:1]
    if len(text):
        raise ValueError(f"y must be numbers (a regression target), got values such as {plain(text[0])!r}")
    return y


def _alive(learner, state) -> bool:
    """Whether the filter's parameters are finite (a bank's: those of a member still in the
    mixture; a member that diverged is out of it, and the bank goes on without it)."""
    finite = [np.isfinite(np.asarray(a)) for a in jax.tree_util.tree_leaves(state.params)]
    if not isinstance(learner, kalnat.bank.Bank):
        return all(np.all(f) for f in finite)
    per_member = np.all([f.reshape(f.shape[0], -1).all(axis=1) for f in finite], axis=0)
    return bool(np.any(per_member & np.isfinite(np.asarray(state.log_weights))))


class _Coords(NamedTuple):
    center: np.ndarray
    scale: np.ndarray


class _KalmanEstimator(BaseEstimator):
    """What the classifier and the regressor share: settings, validation, the stream."""

    def __init__(self, hidden=None, method="auto", covariance="full", prior_var=None, forgetting=None,
                 standardize=True, random_state=0):
        self.hidden = hidden
        self.method = method
        self.covariance = covariance
        self.prior_var = prior_var
        self.forgetting = forgetting
        self.standardize = standardize
        self.random_state = random_state

    # ---- settings ----------------------------------------------------------------------

    def _start(self, family, n_features):
        """A fresh state for ``family`` (:func:`kalnat.estimators.family`'s spec) and
        ``n_features``: what ``fit`` and a first ``partial_fit`` do."""
        self.learner_key_ = estimators.settings_key(self, family, n_features)
        learner, model = estimators.learner(self.learner_key_)
        self.state_ = learner.init(model.init(jax.random.PRNGKey(self.learner_key_[-1])))
        self.scaler_ = scaling.init(n_features)
        self.coords_ = None
        self.n_rows_seen_ = 0

    @property
    def learner_(self):
        """The kalnat learner (a :class:`~kalnat.Learner` or a :class:`~kalnat.bank.Bank`)."""
        check_is_fitted(self)
        return estimators.learner(self.learner_key_)[0]

    # ---- the stream --------------------------------------------------------------------

    def _features(self, X):
        X = np.asarray(X, np.float64)
        if self.coords_ is None:
            return X
        return (X - self.coords_.center) / self.coords_.scale

    def _family_now(self):
        """The family's spec from the settings as they are now (as ``_begin`` made it)."""
        return self.learner_key_[0]

    def _settings_now(self):
        """Takes settings changed by ``set_params`` since the stream began: the regressor's
        ``noise_var`` from the next row on (the family's ``R``, nothing the state holds). Any
        other change is a ``ValueError``, where it was ignored: the method, the model and the
        covariance are the state's form, and ``prior_var`` and ``forgetting`` are its prior and
        the weight forgetting has left of it, which each re-expression restates. A
        ``random_state`` that is a ``RandomState`` moving between calls is no change (the seed
        was drawn at the start)."""
        key = estimators.settings_key(self, self._family_now(), self.learner_key_[1])
        changed = [name for name, a, b in zip(key._fields, self.learner_key_, key) if a != b and name != "seed"]
        if not changed:
            return
        if changed == ["family"]:   # the regressor's noise_var
            self.learner_key_ = key._replace(seed=self.learner_key_[-1])   # the same state, learned on with the new R
            return
        changed = ["noise_var" if name == "family" else name for name in changed]
        raise ValueError(f"{type(self).__name__}: {', '.join(changed)} changed (set_params) since the stream "
                         "began, and the state learned so far holds the old ones; fit() starts afresh with "
                         "the new settings")

    def _learn(self, X, t):
        """Adds the rows to the statistics, re-expresses the filter, learns the rows."""
        self._settings_now()
        learner = self.learner_
        if self.standardize:
            self.scaler_ = scaling.transform_and_update(self.scaler_, X)[1]
            new = _Coords(*scaling.standardizer(self.scaler_))
            old = self.coords_
            if old is not None and not (np.array_equal(old.center, new.center)
                                        and np.array_equal(old.scale, new.scale)):
                self.state_ = _reexpress(learner, self.state_, old, new, linear=not self.learner_key_[2])
            self.coords_ = new
        advice = "try a smaller prior_var" + (" or a linear model (hidden=None)" if self.learner_key_[2] else "")
        try:
            res = kalnat.fit(learner, self.state_, self._features(X), t, chunk_size=CHUNK, fixed_chunk=True,
                             return_predictions=False)
        except kalnat.Diverged as err:
            row = self.n_rows_seen_ + err.row
            # the state given was consumed (donated to the step): the estimator is unfitted again,
            # and predict or partial_fit say so rather than name a consumed state
            for name in [k for k in vars(self) if k.endswith("_") and not k.startswith("_")]:
                delattr(self, name)
            raise ValueError(f"{type(self).__name__}: the filter diverged (a NaN prediction at row {row} of the "
                             f"stream, from 0), and the estimator is unfitted again; {advice}") from err
        self.state_ = res.state
        self.n_rows_seen_ += X.shape[0]
        if not _alive(learner, self.state_):
            raise ValueError(f"{type(self).__name__}: the filter diverged (non-finite parameters after "
                             f"{self.n_rows_seen_} rows); {advice}")

    def _predictive(self, X):
        """The one-step predictive of the rows ``X``, padded to a power of two rows."""
        check_is_fitted(self)
        X = _in_range(validate_data(self, X, reset=False, dtype=np.float64), "X")
        n = X.shape[0]
        rows = max(MIN_PREDICT_ROWS, 1 << max(0, n - 1).bit_length())
        Z = np.zeros((rows, X.shape[1]))
        Z[:n] = self._features(X)
        pred = self.learner_.predict(self.state_, Z)
        return jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64)[:n], pred)

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.allow_nan = False
        tags.non_deterministic = False
        return tags


class KalmanClassifier(ClassifierMixin, _KalmanEstimator):
    """A classifier learned by a Kalman filter on its parameters, one pass (see the module).

    Two classes use a Bernoulli output, more a categorical one (K − 1 logits).

    Args:
      hidden: widths of the hidden layers, e.g. ``(16,)`` (or ``16``); ``None`` (default) a linear model
        (logistic regression).
      method: ``"auto"`` (the evidence-weighted bank :func:`kalnat.auto`), or one core learner:
        ``"ekf"``, ``"sqrt_ekf"``, ``"information_filter"``, ``"natural_gradient"``,
        ``"iterated_ekf"`` (docs/method.md §2).
      covariance: θ's uncertainty, by the command's ``--covariance`` names: ``"full"``,
        ``"diag"`` (O(d)), ``"blocks"`` (one block per layer's weights and biases),
        ``"lowrank:K"`` (diagonal plus rank K), ``"last-layer:K"``, ``"kron"`` (Kronecker factors
        per layer) or ``"auto"`` (full up to 1 024 parameters) (docs/structured.md).
      prior_var: the prior variance of every parameter (core methods; default 1).
      forgetting: λ in (0, 1] (core methods; default 1, no forgetting).
      standardize: learn on standardised features (see the module).
      random_state: seed of an MLP's initial weights: an int, a NumPy ``RandomState`` or
        ``Generator`` (a seed drawn from a copy of it), or ``None`` (0).

    Attributes:
      classes_: the class labels; ``state_``: the filter's state; ``learner_``: its learner.
    """

    def fit(self, X, y):
        """Learns the rows of ``X (n, p)``, ``y (n,)`` in order, from a fresh state."""
        X, y = validate_data(self, X, y, dtype=np.float64)
        _in_range(X, "X")
        check_classification_targets(y)
        classes = np.unique(y)
        self._begin(classes, X.shape[1])
        return self._learn_labels(X, y)

    def partial_fit(self, X, y, classes=None):
        """Learns the rows of ``X``, ``y`` from the current state; the first call needs
        ``classes``, every label the stream will have."""
        first = not hasattr(self, "classes_")
        X, y = validate_data(self, X, y, dtype=np.float64, reset=first)
        _in_range(X, "X")
        check_classification_targets(y)
        if first:
            if classes is None:
                raise ValueError("classes must be given to the first call of partial_fit (every label of the "
                                 "stream), e.g. partial_fit(X, y, classes=[0, 1])")
            self._begin(np.unique(np.asarray(classes)), X.shape[1])
        elif classes is not None and not np.array_equal(np.unique(np.asarray(classes)), self.classes_):
            raise ValueError(f"classes {np.unique(classes).tolist()} differ from those of the first call "
                             f"{self.classes_.tolist()}")
        return self._learn_labels(X, y)

    def _begin(self, classes, n_features):
        if len(classes) < 2:
            raise ValueError(f"{type(self).__name__} needs samples of at least 2 classes; got 1 class "
                             f"({plain(classes[0])!r})")
        family = ("bernoulli",) if len(classes) == 2 else ("categorical", len(classes))
        self._start(family, n_features)
        self.classes_ = classes

    def _learn_labels(self, X, y):
        index = np.searchsorted(self.classes_, y)
        unknown = (index >= len(self.classes_)) | (self.classes_[np.minimum(index, len(self.classes_) - 1)] != y)
        if np.any(unknown):
            bad = y[np.argmax(unknown):][:1].tolist()[0]   # a Python value: 7, not np.int64(7)
            raise ValueError(f"label {bad!r} is not one of the classes {self.classes_.tolist()} "
                             "given to the first partial_fit")
        self._learn(X, index.astype(np.int64))
        return self

    def predict_proba(self, X):
        """``(n, n_classes)`` predictive class probabilities, columns in ``classes_`` order."""
        probs = self._predictive(X).probs
        return probs / probs.sum(axis=1, keepdims=True)

    def predict_log_proba(self, X):
        """``(n, n_classes)`` the logarithms of :meth:`predict_proba`."""
        with np.errstate(divide="ignore"):
            return np.log(self.predict_proba(X))

    def predict(self, X):
        """``(n,)`` the most probable class of each row."""
        check_is_fitted(self)
        return self.classes_[np.argmax(self.predict_proba(X), axis=1)]

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.classifier_tags.multi_class = True
        return tags


class KalmanRegressor(RegressorMixin, _KalmanEstimator):
    """A regressor learned by a Kalman filter on its parameters, one pass (see the module).

    Args: as :class:`KalmanClassifier`, and
      noise_var: the Gaussian noise variance of the core methods, in units of the target's
        variance (default 1: the target's whole variance, so ``return_std`` is about the
        target's own deviation however well the model fits; ``method="auto"`` learns the noise
        scale: normal–inverse-gamma filters).

    ``predict(X, return_std=True)`` also gives the predictive standard deviation of a new
    target, ``sqrt(h P⁻ hᵀ + R)`` in the target's units (for the normal–inverse-gamma filter
    the scale of its Student-t predictive), as scikit-learn's Bayesian regressors do.
    """

    def __init__(self, hidden=None, method="auto", covariance="full", prior_var=None, forgetting=None,
                 noise_var=1.0, standardize=True, random_state=0):
        super().__init__(hidden=hidden, method=method, covariance=covariance, prior_var=prior_var,
                         forgetting=forgetting, standardize=standardize, random_state=random_state)
        self.noise_var = noise_var

    def fit(self, X, y):
        """Learns the rows of ``X (n, p)``, ``y (n,)`` in order, from a fresh state."""
        X, y = validate_data(self, X, _numeric(y), dtype=np.float64, y_numeric=True)
        _in_range(X, "X")
        _in_range(y, "y")
        self._begin(X.shape[1], y)
        self._learn(X, self._target(y))
        return self

    def partial_fit(self, X, y):
        """Learns the rows of ``X``, ``y`` from the current state."""
        first = not hasattr(self, "state_")
        X, y = validate_data(self, X, _numeric(y), dtype=np.float64, y_numeric=True, reset=first)
        _in_range(X, "X")
        _in_range(y, "y")
        if first:
            self._begin(X.shape[1], y)
        self._learn(X, self._target(y))
        return self

    def _begin(self, n_features, y):
        self._start(self._family_now(), n_features)
        center, scale = (float(np.mean(y)), float(np.std(y))) if self.standardize else (0.0, 1.0)
        spread = scale > 1e-8 * max(1.0, abs(center))
        self.target_coords_ = _Coords(center, scale if spread else 1.0)
        if self.standardize and not spread and self.method != "auto":
            # the noise variance is fixed in the target's units from here on (the bank learns
            # its noise scale and needs none)
            warnings.warn(f"{type(self).__name__}: the first call's {len(y)} target value(s) have no "
                          "deviation to scale the target by, so noise_var is in the target's own units "
                          "from now on; give the first partial_fit several rows, or method='auto' "
                          "(which learns the noise scale)", UserWarning, stacklevel=3)

    def _target(self, y):
        return (np.asarray(y, np.float64) - self.target_coords_.center) / self.target_coords_.scale

    def _family_now(self):
        if not (isinstance(self.noise_var, numbers.Real) and self.noise_var > 0):
            raise ValueError(f"noise_var must be a positive number, got {self.noise_var!r}")
        return ("gaussian", float(self.noise_var))

    def predict(self, X, return_std=False):
        """Predictive means ``(n,)`` (and standard deviations ``(n,)`` with ``return_std``)."""
        pred = self._predictive(X)
        c, s = self.target_coords_
        mean = c + s * pred.mean[:, 0]
        if not return_std:
            return mean
        return mean, s * np.sqrt(pred.obs_cov[:, 0, 0])
