"""Information filter: the EKF written on ``Λ = P⁻¹`` (docs/method.md §2b;
:class:`kalnat.representations.PrecisionForm`)."""

from __future__ import annotations

from kalnat.families import Family
from kalnat.learners.base import Learner, build
from kalnat.representations import PrecisionForm
from kalnat.schedules import Forgetting

__all__ = ["information_filter"]


def information_filter(model, family: Family, *, prior_var=1.0, forgetting: Forgetting = 1.0,
                       process_noise=0.0, max_variance=None, moderated: bool = False,
                       input_shape=None) -> Learner:
    """Information-form EKF (docs/method.md §2b); same arguments and θ_t as :func:`kalnat.ekf`,
    at O(d³) per step (a ``d × d`` solve)."""
    return build("information", model, family, PrecisionForm(), input_shape=input_shape, moderated=moderated,
                 prior_var=prior_var, forgetting=forgetting, process_noise=process_noise,
                 max_variance=max_variance)
