"""The learners: EKF (covariance form), information filter, online natural gradient."""

from kalnat.learners.base import Learner, Predictive
from kalnat.learners.ekf import EKFState, ekf
from kalnat.learners.information import InformationState, information_filter
from kalnat.learners.natural import NaturalGradientState, natural_gradient
from kalnat.learners.sqrt import SqrtEKFState, sqrt_ekf
from kalnat.learners.iterated import iterated_ekf
from kalnat.learners.nig import NIGState, nig_filter
from kalnat.learners.forms import covariance, with_covariance

__all__ = [
    "Learner", "Predictive", "EKFState", "InformationState", "NaturalGradientState",
    "ekf", "information_filter", "natural_gradient", "sqrt_ekf", "SqrtEKFState",
    "iterated_ekf", "nig_filter", "NIGState", "covariance", "with_covariance",
]
