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
"""

from kalnat import checkpoint, families, filter, models, numerics, recurrent, representations, schedules
from kalnat.filter import Hyper, Predictive, State, covariance, with_covariance
from kalnat.learners import (
    Learner, ekf, information_filter, iterated_ekf, natural_gradient, nig_filter, sqrt_ekf,
)
from kalnat.linearize import Linearization, linearize
from kalnat.stream import FitResult, fit, log_evidence
from kalnat import bank as bank, predictive, scaling
from kalnat.bank import auto, ekf_bank

__version__ = "0.2.0"

__all__ = [
    "checkpoint", "families", "filter", "models", "numerics", "recurrent", "representations", "schedules",
    "ekf", "sqrt_ekf", "information_filter", "natural_gradient", "iterated_ekf", "nig_filter",
    "fit", "FitResult", "log_evidence", "Learner", "Predictive", "State", "Hyper", "covariance", "with_covariance",
    "Linearization", "linearize", "bank", "ekf_bank", "auto", "predictive", "scaling",
]
