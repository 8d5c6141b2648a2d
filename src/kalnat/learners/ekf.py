"""Extended Kalman filter on the parameters, covariance form (docs/method.md §2a).

Per step, with ``P⁻ = P_{t−1}/λ_t + q I`` and the linearisation at θ_{t−1}:
``S = H P⁻ Hᵀ + R``, ``K = P⁻ Hᵀ S⁻¹``, ``θ_t = θ_{t−1} + K e``, ``P_t = P⁻ − K H P⁻``
(:class:`kalnat.representations.Full`, run by :mod:`kalnat.filter`).

Forgetting inflates ``P`` in every direction, also in those the data never excite (a feature
that stays 0, a hidden unit that never turns on): there ``P`` grows as ``λ^−t`` and overflows
after ``log(max float)/log(1/λ)`` rows (λ = 0.95: ~1 700 in float32, ~14 000 in float64), the
classic covariance wind-up. ``max_variance`` bounds it: ``P⁻`` is replaced by ``D P⁻ D`` with
``D`` the diagonal of :func:`kalnat.numerics.variance_bound`, so no parameter is ever more
uncertain than the bound. Coordinates within the bound are untouched, so the filter is exact
until then; beyond it the filter is no longer the fixed-schedule natural gradient of
docs/method.md §3, so the bound is off by default (:func:`kalnat.auto` uses 100 × the prior
variance).
"""

from __future__ import annotations

from typing import Optional

from kalnat.families import Family
from kalnat.learners.base import Learner, build
from kalnat.representations import Full, Representation
from kalnat.schedules import Forgetting

__all__ = ["ekf"]


def ekf(model, family: Family, *, prior_var=1.0, forgetting: Forgetting = 1.0,
        process_noise=0.0, joseph: bool = False, max_variance=None, moderated: bool = False,
        representation: Optional[Representation] = None, input_shape=None) -> Learner:
    """Extended Kalman filter on the flat parameter θ (docs/method.md §2a).

    Args:
      model: a :class:`kalnat.models.Model` or a function ``apply(params, x) -> z``.
      family: the output family (``kalnat.families``).
      prior_var: prior covariance ``P_0``: scalar (``v·I``), ``(d,)`` diagonal or ``(d, d)``.
      forgetting: λ in (0, 1] (``P⁻ = P/λ``, Q = μP, fading memory; equals natural gradient with
        ``1/η_t = λ/η_{t−1} + 1``) or a function ``t -> λ_t`` (then fixed, not a hyperparameter).
      process_noise: additive ``q`` (scalar or ``(d,)``): ``P⁻ = P + q I``, a random walk on θ.
      joseph: use the Joseph-form covariance update.
      max_variance: ``None`` (exact filter) or a bound (scalar or ``(d,)``, e.g. the prior
        variance) on every variance of ``P⁻``: stops covariance wind-up under forgetting.
      moderated: classifiers' probabilities averaged over the posterior.
      representation: how θ's uncertainty is stored (:mod:`kalnat.representations`); default
        the full covariance ``Full(joseph)``. Any representation runs the same filter.
      input_shape: shape of one ``x`` when ``model`` is a plain function (optional).

    Returns:
      A :class:`~kalnat.learners.base.Learner`; its state is a :class:`~kalnat.filter.State`
      holding the representation's ``cov`` (:class:`~kalnat.representations.Covariance` by
      default).
    """
    if representation is not None and joseph:
        raise ValueError("ekf: joseph=True is the full covariance's option; give Full(joseph=True) as the representation")
    rep = Full(bool(joseph)) if representation is None else representation
    return build("ekf", model, family, rep, input_shape=input_shape, moderated=moderated,
                 prior_var=prior_var, forgetting=forgetting, process_noise=process_noise,
                 max_variance=max_variance, config=dict(joseph=joseph))
