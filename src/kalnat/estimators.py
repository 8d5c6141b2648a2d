"""The learner behind the scikit-learn and river estimators (:mod:`kalnat.sklearn`,
:mod:`kalnat.river`), built from their settings and cached.

Learners are cached by their settings (:func:`learner`), so that every estimator with the same
settings and input size runs the same compiled programs: a refit, a clone or an unpickled
estimator compiles nothing new. Learners of one architecture run on equal models
(:func:`_model`), so settings that differ only in ``prior_var`` or ``forgetting`` share
programs too (:func:`kalnat.programs.once`; a bank's, :meth:`kalnat.bank.Bank.program_key`).
Estimators hold the cache key and the state, never the learner itself (an MLP's activation,
``jnp.tanh``, does not pickle; nor need a user's model function).
"""

from __future__ import annotations

import copy
import numbers
from typing import NamedTuple

import jax
import numpy as np

import kalnat
from kalnat import families, models, representations, schedules
from kalnat.cli_choices import parse_covariance
from kalnat.validation import positive_int

__all__ = ["METHODS", "COVARIANCES", "Settings", "learner", "family", "settings_key"]

METHODS = ("auto", "ekf", "sqrt_ekf", "information_filter", "natural_gradient", "iterated_ekf")
# the command's --covariance names (kalnat.representations.from_name)
COVARIANCES = ("full", "diag", "blocks", "lowrank:K", "last-layer:K", "kron", "auto")

_LEARNERS: dict = {}  # settings -> (learner, model)


def family(spec):
    """A family from its hashable spec: ``("bernoulli",)``, ``("categorical", K)``,
    ``("gaussian", noise_var)``; the categorical with the command's floor on R
    (:data:`kalnat.families.R_FLOOR`: with ``r_floor=0`` a float32 softmax on digits scored an
    accuracy of 0.11, with it 0.78); the others at their default floor (a Bernoulli family's
    log-loss was the same to four digits with floors of 0 and 10⁻⁶)."""
    if spec[0] == "categorical":
        return families.Categorical(*spec[1:], r_floor=families.R_FLOOR)
    return {"bernoulli": families.Bernoulli, "gaussian": families.Gaussian}[spec[0]](*spec[1:])


class Settings(NamedTuple):
    """An estimator's learner's settings: the cache key of :func:`learner` (a tuple)."""

    family: tuple
    n_features: int
    hidden: tuple
    method: str
    covariance: str
    prior_var: object
    forgetting: object
    seed: int


def settings_key(est, family_spec, n_features) -> Settings:
    """The cache key of an estimator's learner, its settings checked (``ValueError`` naming the
    setting). ``est`` has ``hidden``, ``method``, ``covariance``, ``prior_var``, ``forgetting``,
    ``random_state``."""
    if est.method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}; got {est.method!r}")
    try:
        parse_covariance(est.covariance) if isinstance(est.covariance, str) else parse_covariance("?")
    except ValueError:
        raise ValueError(f"covariance must be one of {', '.join(COVARIANCES)}; got {est.covariance!r}") from None
    if est.method == "auto" and (est.prior_var is not None or est.forgetting is not None):
        raise ValueError("method='auto' chooses prior_var and forgetting by their evidence; give a core "
                         "method (e.g. method='ekf') to set them")
    if est.covariance not in ("full", "auto") and est.method not in ("auto", "ekf", "iterated_ekf"):
        raise ValueError(f"covariance={est.covariance!r} is an option of method 'auto', 'ekf' or "
                         f"'iterated_ekf'; {est.method!r} keeps its own representation of P")
    if est.prior_var is not None and not (isinstance(est.prior_var, numbers.Real) and est.prior_var > 0):
        raise ValueError(f"prior_var must be a positive number, got {est.prior_var!r}")
    if est.forgetting is not None and not (isinstance(est.forgetting, numbers.Real) and 0 < est.forgetting <= 1):
        raise ValueError(f"forgetting must be a number in (0, 1], got {est.forgetting!r}")
    hidden = (est.hidden,) if isinstance(est.hidden, numbers.Integral) else (est.hidden or ())   # 16: (16,)
    hidden = tuple(positive_int(h, f"hidden[{i}]") for i, h in enumerate(hidden))
    return Settings(tuple(family_spec), int(n_features), hidden, est.method, est.covariance,
                    est.prior_var, est.forgetting, _seed(est.random_state))


def _seed(random_state) -> int:
    """The MLP's initial weights' seed: an int as it is, ``None`` 0, and from a NumPy
    ``RandomState`` or ``Generator`` (scikit-learn's conventions) a number drawn from a copy,
    so that the settings' key, computed more than once, is the same each time."""
    if random_state is None:
        return 0
    if isinstance(random_state, (np.random.RandomState, np.random.Generator)):
        rng = copy.deepcopy(random_state)
        draw = rng.randint if isinstance(rng, np.random.RandomState) else rng.integers
        return int(draw(2**31 - 1))
    if isinstance(random_state, numbers.Integral) and not isinstance(random_state, bool):
        return int(random_state)
    raise ValueError(f"random_state must be an int, a NumPy RandomState or Generator, or None; got {random_state!r}")


def learner(key):
    """``(learner, model)`` for a :func:`settings_key`, built once."""
    if key not in _LEARNERS:
        _LEARNERS[key] = _build(*key)
    return _LEARNERS[key]


def _model(n_features, hidden, n_out):
    """The model of an architecture: equal for equal arguments (:mod:`kalnat.models`), so
    learners that differ only in their hyperparameters share their compiled programs
    (:func:`kalnat.programs.once`) and a search over ``prior_var`` or ``forgetting`` compiles
    once."""
    return models.linear(n_features, n_out) if not hidden else models.mlp(n_features, hidden, n_out)


def _build(family_spec, n_features, hidden, method, covariance, prior_var, forgetting, seed):
    fam = family(family_spec)
    n_out = fam.n_outputs
    model = _model(n_features, hidden, n_out)
    params = model.init(jax.random.PRNGKey(seed))
    own_form = method not in ("auto", "ekf", "iterated_ekf")
    rep = None if own_form else representations.from_name(covariance, params)
    if method == "auto":
        return kalnat.auto(model, fam, representation=rep), model
    v = 1.0 if prior_var is None else float(prior_var)
    lam = 1.0 if forgetting is None else float(forgetting)
    # A forgetting filter gets the bank members' variance bound (no wind-up along a feature
    # that stays constant); without forgetting P only shrinks and the filter is exact.
    bound = None if lam == 1.0 else kalnat.bank.default_max_variance(v)
    if method == "natural_gradient":  # the rates that make it the same filter (docs/method.md §3)
        return kalnat.natural_gradient(model, fam, max_variance=bound,
                                       **schedules.kalman_to_natural(v, lam)._asdict()), model
    more = {} if own_form else {"representation": rep}
    return getattr(kalnat, method)(model, fam, prior_var=v, forgetting=lam, max_variance=bound, **more), model
