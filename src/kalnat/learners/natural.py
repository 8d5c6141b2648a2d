"""Online natural gradient with a running Fisher estimate (docs/method.md §2c;
:class:`kalnat.representations.FisherForm`).

With the default Kalman schedule (``γ_t = η_t``, ``1/η_t = λ/η_{t−1} + 1``) and no damping it is
exactly the EKF with ``P_0 = η_0 J_0⁻¹`` and ``P_t = η_t J_t⁻¹`` (docs/method.md §3); see
:mod:`kalnat.schedules` for the translation. ``max_variance`` bounds the variances of the
filter's ``P⁻ = η_t ((1 − γ_t) J_{t−1})⁻¹`` as :func:`kalnat.ekf`'s does.
"""

from __future__ import annotations

import numpy as np

from kalnat import numerics, schedules
from kalnat.families import Family
from kalnat.learners.base import Learner, build
from kalnat.representations import FisherForm

__all__ = ["natural_gradient"]


def natural_gradient(model, family: Family, *, learning_rate=None, fisher_rate=None,
                     eta0: float = 1.0, init_fisher=1.0, damping: float = 0.0,
                     max_variance=None, moderated: bool = False, input_shape=None) -> Learner:
    """Online natural gradient (docs/method.md §2c).

    Args:
      model: a :class:`kalnat.models.Model` or a function ``apply(params, x) -> z``.
      family: the output family.
      learning_rate: η_t: a schedule from :mod:`kalnat.schedules`, a float (constant), or a
        function of ``t``. Default: the Kalman schedule ``1/η_t = 1/η_{t−1} + 1``. A Kalman
        schedule with a constant λ keeps λ as data (``hyper.forgetting``).
      fisher_rate: γ_t, same forms; ``None`` means ``γ_t = η_t`` (what the filter does).
      eta0: η_0 (and γ_0), the rate before the first step, used by recursive schedules.
      init_fisher: J_0: scalar (``c·I``), ``(d,)`` diagonal or ``(d, d)``; the learner's
        ``hyper.prior_var`` is ``P_0 = η_0 J_0⁻¹``.
      damping: ε ≥ 0 added to the diagonal of J_t in the solve (Fisher regularisation).
      max_variance: ``None`` or a bound (scalar or ``(d,)``) on every variance of ``P⁻``.
      moderated: as :func:`kalnat.ekf`.
      input_shape: as :func:`kalnat.ekf`.
    """
    if not float(eta0) > 0:
        raise ValueError(f"eta0 must be positive, got {eta0}")
    if not float(damping) >= 0:
        raise ValueError(f"damping must be non-negative, got {damping}")
    lr = schedules.kalman() if learning_rate is None else schedules.as_schedule(learning_rate)
    forgetting, schedule = 1.0, lr
    if isinstance(lr, schedules.Kalman) and not callable(lr.forgetting):
        forgetting, schedule = float(lr.forgetting), None  # the filter's λ, as data
    fisher = None if fisher_rate is None else schedules.as_schedule(fisher_rate)
    rep = FisherForm(schedule, fisher, float(eta0), float(damping))
    j0 = numerics.check_covariance(init_fisher, "init_fisher", None)
    prior_var = float(eta0) * np.asarray(schedules.inverse(j0, "init_fisher"))  # P_0 = η_0 J_0⁻¹
    return build("natural_gradient", model, family, rep, input_shape=input_shape, moderated=moderated,
                 prior_var=prior_var, forgetting=forgetting, max_variance=max_variance,
                 config=dict(learning_rate=lr, fisher_rate=fisher, eta0=eta0, init_fisher=init_fisher,
                             damping=damping, prior_name="init_fisher"))
