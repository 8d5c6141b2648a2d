"""Square-root extended Kalman filter: the EKF of docs/method.md §2a on a Cholesky factor of P
(:class:`kalnat.representations.Cholesky`; the update and its numerics are documented there)."""

from __future__ import annotations

from kalnat.families import Family
from kalnat.learners.base import Learner, build
from kalnat.representations import Cholesky
from kalnat.schedules import Forgetting

__all__ = ["sqrt_ekf"]


def sqrt_ekf(model, family: Family, *, prior_var=1.0, forgetting: Forgetting = 1.0,
             process_noise=0.0, joseph: bool = False, max_variance=None, moderated: bool = False,
             input_shape=None) -> Learner:
    """Square-root EKF on the flat parameter θ (docs/method.md §2a), on a Cholesky factor of P.

    Same arguments, same θ_t and same ``P_t`` as :func:`kalnat.ekf`; the state holds ``L``
    (``P_t = L Lᵀ``) and stays positive definite in float32 over long streams. Additive noise
    costs one QR per step (O(d³)); ``max_variance`` is a row scaling ``D L⁻`` that keeps ``L``
    lower-triangular with a positive diagonal. ``joseph`` is accepted for compatibility with
    :func:`kalnat.ekf` and changes nothing: the factored update is already a congruence.
    """
    return build("sqrt_ekf", model, family, Cholesky(), input_shape=input_shape, moderated=moderated,
                 prior_var=prior_var, forgetting=forgetting, process_noise=process_noise,
                 max_variance=max_variance, config=dict(joseph=joseph))
