"""Iterated extended Kalman filter: relinearise at the updated θ (Gauss–Newton on the MAP).

The EKF linearises once, at θ_{t−1}. The iterated EKF (Bell & Cathey 1993, "The iterated
Kalman filter update as a Gauss–Newton method") repeats the update from the same prior
``N(θ_{t−1}, P⁻)``, each time linearising at the latest iterate θ_i:

    H_i, R_i, e_i at θ_i,   S_i = H_i P⁻ H_iᵀ + R_i,   K_i = P⁻ H_iᵀ S_i⁻¹
    θ_{i+1} = θ_{t−1} + K_i (e_i + H_i (θ_i − θ_{t−1}))

A fixed point satisfies ``P⁻⁻¹ (θ − θ_{t−1}) = H_iᵀ R_i⁻¹ e_i = −∇ℓ_t(θ)`` (the exponential-
family identity of docs/method.md §1), the stationarity condition of the one-step MAP
``½ (θ − θ_{t−1})ᵀ P⁻⁻¹ (θ − θ_{t−1}) + ℓ_t(θ)``. The covariance is the condition step at the
last linearisation. It is a composition over the representation interface (the loop is in
:func:`kalnat.filter.condition`), so it runs on any representation, under RTRL and in a bank,
where ``hyper.iterations`` (data) chooses how many of the learner's ``iterations`` are used
(a bank's ``fit`` runs the members of each count apart, each with the step built for its
count: :meth:`kalnat.bank.Bank.by_iterations`).
"""

from __future__ import annotations

from typing import Optional

from kalnat.families import Family
from kalnat.learners.base import Learner, build
from kalnat.representations import Full, Representation
from kalnat.schedules import Forgetting
from kalnat.validation import positive_int

__all__ = ["iterated_ekf"]


def iterated_ekf(model, family: Family, *, iterations: int = 2, prior_var=1.0,
                 forgetting: Forgetting = 1.0, process_noise=0.0, max_variance=None,
                 representation: Optional[Representation] = None, moderated: bool = False,
                 input_shape=None) -> Learner:
    """Iterated EKF on the flat parameter θ: ``iterations`` Gauss–Newton steps per update.

    Args:
      model: as :func:`kalnat.ekf`.
      family: as :func:`kalnat.ekf`.
      prior_var: as :func:`kalnat.ekf`.
      forgetting: as :func:`kalnat.ekf`.
      process_noise: as :func:`kalnat.ekf`.
      max_variance: as :func:`kalnat.ekf`.
      moderated: as :func:`kalnat.ekf`.
      input_shape: as :func:`kalnat.ekf`.
      iterations: linearisations per update (1 is the EKF exactly).
      representation: θ's uncertainty (:mod:`kalnat.representations`; default the full
        covariance).
    """
    iterations = positive_int(iterations, "iterations")
    return build("iterated_ekf", model, family, representation or Full(), input_shape=input_shape,
                 iterations=int(iterations), moderated=moderated, prior_var=prior_var, forgetting=forgetting,
                 process_noise=process_noise, max_variance=max_variance,
                 config=dict(iterations=int(iterations)))
