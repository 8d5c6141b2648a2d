"""river estimators: :class:`KalmanClassifier` and :class:`KalmanRegressor` (needs the ``river``
extra: ``pip install kalnat[river]``).

    >>> from river import evaluate, metrics, preprocessing
    >>> from kalnat.river import KalmanClassifier
    >>> model = preprocessing.StandardScaler() | KalmanClassifier()       # doctest: +SKIP
    >>> evaluate.progressive_val_score(dataset, model, metrics.LogLoss())  # doctest: +SKIP

They take river's dict features, one row at a time (``learn_one``, ``predict_one``,
``predict_proba_one``) or as pandas minibatches (``learn_many``, ``predict_many``,
``predict_proba_many``: the rows are learned one after another, exactly as by ``learn_one``).
A feature absent from a row is 0 in it (a ``NaN`` of a minibatch likewise): for a linear model,
it contributes nothing, as in river's linear models. Features are numbers; encode categories
first (e.g. ``river.preprocessing.OneHotEncoder``). Features are not rescaled: compose with
``river.preprocessing.StandardScaler`` as for river's own linear models.

New features may appear at any row. The filter's parameter vector has room for a capacity of
features, doubled when it is full (so a new feature recompiles the step only ``log₂`` times);
columns not yet in use are 0 in every row, so their Jacobian columns are 0 and they take no
part in any update. When a feature arrives its coordinates get a fresh prior
(:func:`grow`): θ the model's initial values (0 for a linear model), and the prior covariance
block, uncorrelated with the rest: a linear model's filter then is exactly the one that had
always had the feature, as 0 until now, under a fresh prior for it (a network's first layer is
drawn at its capacity: another draw of the network that had the feature from the start).
"""

from __future__ import annotations

import math
import numbers

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree
from river import base, proba

import kalnat
from kalnat import estimators
from kalnat.filter import State
from kalnat.learners.base import check_range, check_targets
from kalnat.representations import (BlockCovariance, DiagonalCovariance, GroupCovariance, KronCovariance,
                                    LowRankPrecision, NIGCovariance)
from kalnat.representations.groups import part_size
from kalnat.validation import plain

__all__ = ["KalmanClassifier", "KalmanRegressor", "grow"]

# The first capacity (features); then doubled.
MIN_CAPACITY = 8
CHUNK = 32  # rows per jitted scan of learn_many (one compiled program for every batch size)
MIN_PREDICT_ROWS = 8  # predict_many pads its rows to a power of two, at least this


def _grown_dense(P, P0, index):
    """The grown covariance as a matrix: ``P`` on the kept coordinates, the template's ``P0`` on
    the fresh ones (``index < 0``), nothing between them."""
    keep = index >= 0
    i = jnp.where(keep, index, 0)
    return jnp.where(keep[:, None] & keep[None, :], P[i][:, i], jnp.where(keep[:, None] | keep[None, :], 0.0, P0))


def _grown_cov(cov, template, index):
    """``cov`` re-laid as :func:`grow` describes (``index (d',)``, ``-1`` for a fresh
    coordinate), in its representation at the template's size (what ``cov`` carries besides P,
    e.g. the noise scale of the normal–inverse-gamma filter or the Fisher form's rate, is kept).

    The grown P is block-diagonal between the kept coordinates and the fresh ones, so each form
    is re-laid exactly in its own storage, never through a d' × d' matrix:
    - a diagonal, its kept variances and the template's fresh ones;
    - a low-rank plus diagonal precision, the kept rows of ``υ`` and ``W`` with the template's
      ``υ`` and zero rows of ``W`` for the fresh ones (a coordinate dropped is one no row has
      informed: ``W``'s row there is 0, and leaving it out of ``Λ`` is its marginal), where
      through the dense P the form's ``with_dense`` would keep only its top directions;
    - blocks and groups (consecutive ranges of θ, one per params leaf or group), each block in
      its own form, from the coordinates of the same block (a coordinate moved to another block
      would lose its variance: river's growth inserts within a leaf, and no cross-covariance
      between blocks is held to move with it);
    - a full covariance, its kept rows and columns.
    Kronecker factors, whose layout is a layer's shape, go through the dense P of their layer
    (for a linear model, all of θ) and take the template's layout. A form unlike the template's
    (``covariance="auto"``, full up to its size and low rank beyond) goes through the dense P
    into the template's form."""
    if type(cov) is not type(template) and hasattr(template, "with_dense"):
        return template.with_dense(_grown_dense(cov.dense(), template.dense(), index))
    if isinstance(cov, NIGCovariance):
        return cov._replace(inner=_grown_cov(cov.inner, template.inner, index))
    keep = index >= 0
    i = jnp.where(keep, index, 0)
    if isinstance(cov, LowRankPrecision):
        return LowRankPrecision(jnp.where(keep, cov.ups[i], template.ups), jnp.where(keep[:, None], cov.w[i], 0.0))
    if isinstance(cov, DiagonalCovariance):
        fresh = template.p[:template.d]
        return template._replace(p=template.p.at[:template.d].set(jnp.where(keep, cov.p[i], fresh)))
    pieces = {BlockCovariance: "blocks", GroupCovariance: "parts"}.get(type(cov))
    if pieces is not None and len(getattr(cov, pieces)) == len(getattr(template, pieces)):
        olds, news = getattr(cov, pieces), getattr(template, pieces)
        old_at = np.cumsum([0] + [part_size(p) for p in olds])
        new_at = np.cumsum([0] + [part_size(p) for p in news])
        grown = []
        for g, (old, new) in enumerate(zip(olds, news)):
            local = index[new_at[g]:new_at[g + 1]] - old_at[g]
            inside = (index[new_at[g]:new_at[g + 1]] >= 0) & (local >= 0) & (local < old_at[g + 1] - old_at[g])
            grown.append(_grown_cov(old, new, jnp.where(inside, local, -1)))
        return type(cov)(tuple(grown))
    P, P0 = (c.dense() if hasattr(c, "dense") else c for c in (cov, template))
    P_new = _grown_dense(P, P0, index)
    if isinstance(cov, (BlockCovariance, GroupCovariance, KronCovariance)):
        return template.with_dense(P_new)
    if not hasattr(cov, "with_dense"):  # a block of BlockCovariance: a plain (n, n) array
        return jnp.asarray(P_new, cov.dtype)
    return cov.with_dense(P_new)


def grow(state: State, template: State, index) -> State:
    """A core state re-laid on a new parameter vector (pure; jit and vmap it).

    Coordinate ``j`` of the result is coordinate ``index[j]`` of ``state``; where ``index[j] < 0``
    it is fresh: θ_j is the template's (the model's initial value) and the covariance gets the
    template's prior there, uncorrelated with every other coordinate. For the full covariance
    that is the block-diagonal extension ``P' = blockdiag(P, P₀)`` up to a permutation; every
    structured form is re-laid in its own storage, block by block (``_grown_cov``), with no
    d' × d' array.

    A coordinate that ``index`` moves into another block or group of a structured form than its
    own takes the template's prior there (no cross-covariance between blocks is held to carry its
    variance), θ_j its old value; river's growth inserts columns within a leaf and never does.
    A low-rank plus diagonal precision is re-laid exactly where every
    coordinate left out (``index`` naming none of them) is one no row has informed, as for the
    estimators' unused columns (its row of ``W`` is 0); for an informed one that drops its
    coupling to the rest rather than marginalising it.

    Args:
      state: the filter's state, θ of size ``d``.
      template: the prior state at the new size ``d'`` (``learner.init(params)``).
      index: ``(d',)`` integers in ``-1 .. d−1``.
    """
    theta, _ = ravel_pytree(state.params)
    theta0, unravel = ravel_pytree(template.params)
    keep = index >= 0
    i = jnp.where(keep, index, 0)
    return State(unravel(jnp.where(keep, theta[i], theta0)), _grown_cov(state.cov, template.cov, index),
                 state.count)


@jax.jit
def _grow_core(state, template, index):
    return grow(state, template, index)


@jax.jit
def _grow_bank(state, template, index):
    members = jax.vmap(lambda s, t: grow(s, t, index))(state.members, template.members)
    return state._replace(members=members)


def _first_layer_w(params):
    return params["w"] if isinstance(params, dict) else params[0]["w"]


def _with_first_layer_w(params, w):
    if isinstance(params, dict):
        return dict(params, w=w)
    return [dict(params[0], w=w), *params[1:]]


class _Features:
    """What the classifier and the regressor share: settings, the feature columns, the state."""

    def __init__(self, hidden=None, method="auto", covariance="full", prior_var=None, forgetting=None,
                 random_state=0):
        self.hidden = hidden
        self.method = method
        self.covariance = covariance
        self.prior_var = prior_var
        self.forgetting = forgetting
        self.random_state = random_state
        self._columns = {}   # feature name -> column of x
        self._key = None     # the learner's settings (kalnat.estimators), at the current capacity
        self._state = None   # the filter's state
        # fail early on bad settings (the family and size do not matter for the checks)
        estimators.settings_key(self, self._family(), MIN_CAPACITY)

    # ---- the learner at a capacity ------------------------------------------------------

    def _at(self, capacity):
        key = estimators.settings_key(self, self._family(), capacity)
        learner, model = estimators.learner(key)
        return key, learner, model

    def _template(self, capacity):
        """The prior state at ``capacity`` features."""
        key, learner, model = self._at(capacity)
        return learner.init(model.init(jax.random.PRNGKey(key[-1])))

    @property
    def _learner(self):
        return estimators.learner(self._key)[0]

    def _regrow(self, capacity, index):
        template = self._template(capacity)
        fn = _grow_bank if isinstance(self._at(capacity)[1], kalnat.bank.Bank) else _grow_core
        self._key = self._at(capacity)[0]
        self._state = fn(self._state, template, jnp.asarray(index))

    def _layout(self, capacity):
        """``(d, (o, capacity))``: θ's size at ``capacity`` features and the flat index of each
        first-layer weight."""
        _, _, model = self._at(capacity)
        theta, unravel = ravel_pytree(model.init(jax.random.PRNGKey(0)))
        w = _first_layer_w(unravel(jnp.arange(theta.shape[0], dtype=theta.dtype)))
        return theta.shape[0], np.asarray(w).astype(np.int64), lambda a: unravel(jnp.asarray(a, theta.dtype))

    def _add_features(self, names):
        """Columns for the features not seen before, each with a fresh prior."""
        # Features arriving together take columns in a canonical order, not the dict's: the
        # model's arithmetic is then the same whatever order a row lists its features in.
        new = sorted((n for n in dict.fromkeys(names) if n not in self._columns),
                     key=lambda n: (type(n).__name__, repr(n)))
        if self._state is None:  # the first row (with or without features)
            capacity = max(MIN_CAPACITY, 1 << (len(new) - 1).bit_length())
            self._key = self._at(capacity)[0]
            self._state = self._template(capacity)
            self._columns.update((n, i) for i, n in enumerate(new))
            return
        if not new:
            return
        capacity = self._key[1]
        needed = len(self._columns) + len(new)
        if needed > capacity:
            grown = capacity
            while grown < needed:
                grown *= 2
            # The old coordinates laid out at the new capacity: the added columns are fresh.
            d, w, unravel = self._layout(capacity)
            old = unravel(np.arange(d))
            wide = np.concatenate([w, -np.ones((w.shape[0], grown - capacity), np.int64)], axis=1)
            index = ravel_pytree(_with_first_layer_w(old, jnp.asarray(wide, _first_layer_w(old).dtype)))[0]
            self._regrow(grown, np.asarray(index).astype(np.int64))
            capacity = grown
        cols = list(range(len(self._columns), needed))
        self._columns.update(zip(new, cols))
        # A column not used so far may have wound up under forgetting (its Jacobian column is 0,
        # P/λ grows to the variance bound): the feature starts from the prior.
        d, w, _ = self._layout(capacity)
        index = np.arange(d)
        index[w[:, cols].ravel()] = -1
        self._regrow(capacity, index)

    # ---- rows ---------------------------------------------------------------------------

    @staticmethod
    def _check(x):
        """``ValueError`` naming a feature whose value is not a finite number (``None``: absent)."""
        for name, value in x.items():
            if value is None:
                continue
            if not isinstance(value, numbers.Real):
                raise ValueError(f"feature {name!r} has the value {value!r}: kalnat's estimators take numbers "
                                 "(encode categories first, e.g. with river.preprocessing.OneHotEncoder)")
            if not math.isfinite(value):
                raise ValueError(f"feature {name!r} is {value!r}: features must be finite")

    def _row(self, x, capacity):
        """A dict of features as a vector of ``capacity`` values (unknown features left out)."""
        self._check(x)
        v = np.zeros(capacity)
        for name, value in x.items():
            c = self._columns.get(name)
            if c is not None and value is not None:
                v[c] = float(value)
        return v

    @staticmethod
    def _column(X, name):
        """A DataFrame's column as float64, or a ``ValueError`` naming it (NumPy's own named
        neither the column nor what to do)."""
        try:
            return np.asarray(X[name], np.float64)
        except (TypeError, ValueError):
            raise ValueError(f"feature {name!r} is not numeric (dtype {X[name].dtype}): kalnat's estimators take "
                             "numbers (encode categories first, e.g. with river.preprocessing.OneHotEncoder)") from None

    def _matrix(self, X, capacity):
        """A pandas DataFrame as ``(n, capacity)`` rows (NaN: the feature is absent from the row)."""
        M = np.zeros((len(X), capacity))
        for name in X.columns:
            c = self._columns.get(name)
            if c is None:
                continue
            col = self._column(X, name)
            if np.any(np.isinf(col)):
                raise ValueError(f"feature {name!r} has an infinite value")
            M[:, c] = np.nan_to_num(col, nan=0.0)
        return M

    # One row goes straight to the learner's jitted step: the row is built and checked here
    # (finite numbers, in the state's range, of the capacity's width), and the public
    # update/predict would check it again.

    def _learn_one(self, x, y):
        self._check(x)  # before a bad row adds columns
        self._add_features([n for n, v in x.items() if v is not None])
        learner = self._learner
        dtype = learner._dtype(self._state)
        xs = self._row(x, self._key[1])[None]
        check_range(xs, dtype, "x")
        ys = check_targets(learner.family, y, dtype, 1, "rows")
        self._state, _ = learner._update_jit(learner._hyper(None, dtype), self._state, xs.astype(dtype), ys, True)

    def _learn_many(self, X, y):
        present = [c for c in X.columns if np.any(np.isfinite(self._column(X, c)))]
        self._add_features(present)
        try:
            res = kalnat.fit(self._learner, self._state, self._matrix(X, self._key[1]), y, chunk_size=CHUNK,
                             fixed_chunk=True, return_predictions=False)
        except kalnat.Diverged as err:
            # the state given was consumed (donated to the step): the model starts afresh
            self._columns, self._key, self._state = {}, None, None
            raise ValueError(f"kalnat.river: the filter diverged at row {err.row} (from 0) of this learn_many, "
                             "and the model is reset to its prior; learn it behind "
                             "preprocessing.StandardScaler(), or with method='sqrt_ekf' or the default 'auto'") from err
        self._state = res.state

    def _predictive_one(self, x):
        if self._state is None:
            state, learner, cap = self._template(MIN_CAPACITY), self._at(MIN_CAPACITY)[1], MIN_CAPACITY
        else:
            state, learner, cap = self._state, self._learner, self._key[1]
        dtype = learner._dtype(state)
        xs = self._row(x, cap)[None]
        check_range(xs, dtype, "x")
        pred = learner._predict_jit(learner._hyper(None, dtype), state, xs.astype(dtype), True)
        return _checked(jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), pred))

    def _predictive_many(self, X):
        n = len(X)
        rows = max(MIN_PREDICT_ROWS, 1 << max(0, n - 1).bit_length())
        if self._state is None:
            state, learner, cap = self._template(MIN_CAPACITY), self._at(MIN_CAPACITY)[1], MIN_CAPACITY
        else:
            state, learner, cap = self._state, self._learner, self._key[1]
        M = np.zeros((rows, cap))
        M[:n] = self._matrix(X, cap)
        pred = learner.predict(state, M)
        return _checked(jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64)[:n], pred))


def _checked(pred):
    """``pred`` (on the host), or a ``ValueError`` where it is not finite or its predictive
    variance is negative: the filter has diverged (``learn_one`` does not wait for each row's
    result, so the divergence is told at the next prediction rather than returned as NaN)."""
    variances = np.diagonal(pred.obs_cov, axis1=-2, axis2=-1)
    if all(np.all(np.isfinite(a)) for a in jax.tree_util.tree_leaves(pred)) and np.all(variances >= 0):
        return pred
    raise ValueError("kalnat.river: the filter has diverged (a prediction that is not finite, or a negative "
                     "predictive variance: its covariance lost positive definiteness, as a full covariance in "
                     "float32 does on features of large scale); learn a new model behind "
                     "preprocessing.StandardScaler(), or with method='sqrt_ekf' or the default 'auto'")


class KalmanClassifier(_Features, base.MiniBatchClassifier):
    """A classifier learned by a Kalman filter on its parameters (one pass, row by row).

    Binary by default: ``y`` is ``True``/``False`` (or 1/0) and the probabilities are keyed
    ``False`` and ``True``, as river's ``LogisticRegression`` does; give ``classes`` (every
    label of the stream) for other labels or more classes: without it another label (a string,
    −1) is a ``ValueError``, not read by its truth.

    Parameters
    ----------
    hidden
        Widths of the hidden layers, e.g. ``(16,)``; ``None`` a linear model (logistic regression).
    method
        ``"auto"`` (the evidence-weighted bank :func:`kalnat.auto`) or a core learner: ``"ekf"``,
        ``"sqrt_ekf"``, ``"information_filter"``, ``"natural_gradient"``, ``"iterated_ekf"``.
    covariance
        θ's uncertainty: ``"full"``, ``"diag"`` or ``"blocks"`` (per layer's weights and biases).
    prior_var
        Prior variance of every parameter (core methods; default 1).
    forgetting
        λ in (0, 1] (core methods; default 1).
    random_state
        Seed of an MLP's initial weights.
    classes
        The labels, for a multiclass stream (``None``: binary).
    """

    def __init__(self, hidden=None, method="auto", covariance="full", prior_var=None, forgetting=None,
                 random_state=0, classes=None):
        self.classes = classes
        if isinstance(classes, (str, bytes)):  # (read as its characters: 'ab' as ['a', 'b'])
            raise ValueError(f"classes must be a list of labels, got the string {classes!r}")
        if classes is not None and len(set(classes)) != len(classes) or (classes is not None and len(classes) < 2):
            raise ValueError(f"classes must be at least 2 distinct labels, got {classes!r}")
        super().__init__(hidden=hidden, method=method, covariance=covariance, prior_var=prior_var,
                         forgetting=forgetting, random_state=random_state)

    @classmethod
    def _unit_test_params(cls):
        yield {"method": "ekf"}

    @property
    def _multiclass(self):
        return self.classes is not None and len(self.classes) > 2

    def _family(self):
        return ("categorical", len(self.classes)) if self._multiclass else ("bernoulli",)

    def _labels(self):
        return [False, True] if self.classes is None else list(self.classes)

    def _target(self, y):
        if self.classes is None:
            # a boolean, 0 or 1 (or None: False, as river's LogisticRegression reads it); any
            # other label would be read by its truth, every string and ±1 as True, with no error
            if y is None or isinstance(y, (bool, np.bool_)) or (isinstance(y, numbers.Real) and y in (0, 1)):
                return 1 if y else 0
            raise ValueError(f"label {plain(y)!r}: without classes= the classifier is binary and takes True/False "
                             "(or 1/0) labels; give classes=[…], every label of the stream, for others")
        try:
            return list(self.classes).index(y)
        except ValueError:
            raise ValueError(f"label {plain(y)!r} is not one of the classes {list(self.classes)}") from None

    def learn_one(self, x, y):
        self._learn_one(x, self._target(y))

    def predict_proba_one(self, x):
        p = self._predictive_one(x).probs
        p = p / p.sum()
        return dict(zip(self._labels(), (float(v) for v in p)))

    def learn_many(self, X, y):
        self._learn_many(X, np.array([self._target(v) for v in y], np.int64))

    def predict_proba_many(self, X):
        import pandas as pd

        p = self._predictive_many(X).probs
        return pd.DataFrame(p / p.sum(axis=1, keepdims=True), index=X.index, columns=self._labels())


class KalmanRegressor(_Features, base.MiniBatchRegressor):
    """A regressor learned by a Kalman filter on its parameters (one pass, row by row).

    ``predict_one(x, with_dist=True)`` gives the predictive distribution, as river's
    ``BayesianLinearRegression`` does: a ``river.proba.Gaussian`` with the filter's predictive
    mean and standard deviation ``sqrt(h P⁻ hᵀ + R)`` (for the normal–inverse-gamma filters of
    ``method="auto"`` the scale of their Student-t predictive).

    Parameters
    ----------
    hidden
        Widths of the hidden layers, e.g. ``(16,)``; ``None`` a linear model.
    method
        ``"auto"`` (a bank of normal–inverse-gamma filters: the noise scale learned) or a core
        learner: ``"ekf"``, ``"sqrt_ekf"``, ``"information_filter"``, ``"natural_gradient"``,
        ``"iterated_ekf"``.
    covariance
        θ's uncertainty: ``"full"``, ``"diag"`` or ``"blocks"``.
    prior_var
        Prior variance of every parameter (core methods; default 1).
    forgetting
        λ in (0, 1] (core methods; default 1).
    noise_var
        The Gaussian noise variance of the core methods, in the target's units squared.
    random_state
        Seed of an MLP's initial weights.
    """

    def __init__(self, hidden=None, method="auto", covariance="full", prior_var=None, forgetting=None,
                 noise_var=1.0, random_state=0):
        if not (isinstance(noise_var, numbers.Real) and noise_var > 0):
            raise ValueError(f"noise_var must be a positive number, got {noise_var!r}")
        self.noise_var = noise_var
        super().__init__(hidden=hidden, method=method, covariance=covariance, prior_var=prior_var,
                         forgetting=forgetting, random_state=random_state)

    @classmethod
    def _unit_test_params(cls):
        yield {"method": "ekf"}

    def _family(self):
        return ("gaussian", float(self.noise_var))

    def learn_one(self, x, y):
        if not (isinstance(y, numbers.Real) and math.isfinite(y)):
            raise ValueError(f"the target must be a finite number, got {y!r}")
        self._learn_one(x, float(y))

    def predict_one(self, x, with_dist=False):
        pred = self._predictive_one(x)
        mean = float(pred.mean[0])
        if not with_dist:
            return mean
        return proba.Gaussian._from_state(n=1, m=mean, var=float(pred.obs_cov[0, 0]), ddof=0)

    def learn_many(self, X, y):
        try:
            y = np.asarray(y, np.float64)
        except (TypeError, ValueError):  # (NumPy's "could not convert string to float")
            raise ValueError(f"the target must be finite numbers, got {next(v for v in y if not isinstance(v, numbers.Real))!r} "
                             "in this learn_many") from None
        bad = np.flatnonzero(~np.isfinite(y))
        if bad.size:  # (kalnat.fit's message offers skip_bad_rows, which learn_many has not)
            raise ValueError(f"the target must be finite numbers, got {float(y[bad[0]])!r} at row {bad[0]} (from 0) of "
                             "this learn_many")
        self._learn_many(X, y)

    def predict_many(self, X):
        import pandas as pd

        return pd.Series(self._predictive_many(X).mean[:, 0], index=X.index)
