"""kalnat: one-pass online learning where the extended Kalman filter is natural gradient.

    >>> import kalnat
    >>> model = kalnat.models.linear(n_features=30)
    >>> learner = kalnat.ekf(model, kalnat.families.Bernoulli(), prior_var=1.0)
    >>> state = learner.init(model.init(None))
    >>> result = kalnat.fit(learner, state, X, y)        # doctest: +SKIP

See docs/method.md for the method: ``ekf``, ``sqrt_ekf``, ``information_filter`` and
``natural_gradient`` are one filter (:mod:`kalnat.filter`) on different representations of
θ's uncertainty (:mod:`kalnat.representations`), and produce the same θ_t under the
translation in :mod:`kalnat.schedules`.

The names below are imported on first use (PEP 562), so ``import kalnat`` — and the command's
``--help`` — does not import JAX until something needs it.
"""

import importlib

__version__ = "0.2.0"

_SUBMODULES = (
    "bank", "blas", "checkpoint", "families", "filter", "models", "numerics", "predictive", "recurrent",
    "representations", "scaling", "schedules",
)
_NAMES = {
    "Hyper": "kalnat.filter", "Predictive": "kalnat.filter", "State": "kalnat.filter",
    "covariance": "kalnat.filter", "with_covariance": "kalnat.filter",
    "Learner": "kalnat.learners", "ekf": "kalnat.learners", "information_filter": "kalnat.learners",
    "iterated_ekf": "kalnat.learners", "natural_gradient": "kalnat.learners",
    "nig_filter": "kalnat.learners", "sqrt_ekf": "kalnat.learners",
    "Linearization": "kalnat.linearization", "linearize": "kalnat.linearization",
    "FitResult": "kalnat.stream", "Diverged": "kalnat.stream", "fit": "kalnat.stream", "log_evidence": "kalnat.stream",
    "auto": "kalnat.bank", "ekf_bank": "kalnat.bank",
}

# `filter` stays out of the star-import: it would shadow the builtin.
__all__ = sorted(set(_SUBMODULES + tuple(_NAMES)) - {"filter"})


def __getattr__(name):
    if name in _SUBMODULES:
        return importlib.import_module(f"kalnat.{name}")
    if name in _NAMES:
        value = getattr(importlib.import_module(_NAMES[name]), name)
        globals()[name] = value  # later lookups skip this function
        return value
    raise AttributeError(f"module 'kalnat' has no attribute {name!r}")


def __dir__():
    return __all__ + ["filter", "__version__"]
