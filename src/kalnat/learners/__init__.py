"""The core learners: one filter (:mod:`kalnat.filter`), one file per constructor."""

from kalnat.filter import Hyper, Predictive, State
from kalnat.learners.base import Learner
from kalnat.learners.ekf import ekf
from kalnat.learners.information import information_filter
from kalnat.learners.iterated import iterated_ekf
from kalnat.learners.natural import natural_gradient
from kalnat.learners.nig import nig_filter
from kalnat.learners.sqrt import sqrt_ekf

__all__ = [
    "Learner", "Predictive", "State", "Hyper", "ekf", "information_filter", "natural_gradient",
    "sqrt_ekf", "iterated_ekf", "nig_filter",
]
