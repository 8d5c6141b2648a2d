"""kalnat: one-pass online learning where the extended Kalman filter is natural gradient.

    >>> import kalnat
    >>> model = kalnat.models.linear(n_features=30)
    >>> learner = kalnat.ekf(model, kalnat.families.Bernoulli(), prior_var=1.0)
    >>> state = learner.init(model.init(None))
    >>> result = kalnat.fit(learner, state, X, y)        # doctest: +SKIP

See PAPER.md for the method: ``ekf``, ``information_filter`` and ``natural_gradient``
produce the same θ_t under the translation in :mod:`kalnat.schedules`.
"""

from kalnat import checkpoint, families, models, numerics, recurrent, schedules
from kalnat.learners import (
    EKFState, InformationState, Learner, NaturalGradientState, Predictive, ekf,
    information_filter, natural_gradient, SqrtEKFState, sqrt_ekf,
)
from kalnat.linearize import Linearization, linearize
from kalnat.stream import FitResult, fit
from kalnat.learners import iterated_ekf, nig_filter
from kalnat import bank as bank, predictive, scaling
from kalnat.bank import auto, ekf_bank

__version__ = "0.1.0"

__all__ = [
    "checkpoint", "families", "models", "numerics", "recurrent", "schedules",
    "ekf", "sqrt_ekf", "SqrtEKFState", "information_filter", "natural_gradient", "fit", "FitResult",
    "Learner", "Predictive", "EKFState", "InformationState", "NaturalGradientState",
    "Linearization", "linearize",
    "bank", "ekf_bank", "auto", "iterated_ekf", "nig_filter", "predictive", "scaling",
]
