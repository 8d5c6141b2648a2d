"""Gaussian targets with an unknown noise scale: the normal–inverse-gamma filter
(docs/method.md §2e; :class:`kalnat.representations.NIG` over any representation)."""

from __future__ import annotations

from typing import Optional

from kalnat.families import Family, Gaussian
from kalnat.learners.base import Learner, build
from kalnat.representations import NIG, Full, Representation
from kalnat.schedules import Forgetting

__all__ = ["nig_filter", "noise_var"]


def nig_filter(model, family: Optional[Family] = None, *, prior_var=1.0, noise_shape: float = 1.0,
               noise_scale: float = 1.0, forgetting: Forgetting = 1.0, max_variance=None,
               iterations: int = 1, representation: Optional[Representation] = None,
               input_shape=None) -> Learner:
    """Normal–inverse-gamma filter for a Gaussian target with unknown noise scale.

    Args:
      model: a :class:`kalnat.models.Model` or ``apply(params, x) -> z``.
      family: :class:`kalnat.families.Gaussian` (its ``cov`` is R₀, the noise's shape; default
        ``Gaussian(1.0)``: σ² is the noise variance itself).
      prior_var: ``V₀`` (scalar, ``(d,)`` or ``(d, d)``): θ's prior covariance in units of σ².
      noise_shape: ``a₀`` of the inverse-gamma prior on σ².
      noise_scale: ``b₀`` of the inverse-gamma prior on σ².
      forgetting: λ in (0, 1] or ``t -> λ_t``: ``V⁻ = V/λ``, ``a⁻ = λa``, ``b⁻ = λb``.
      max_variance: ``None`` or a bound on every variance of ``V⁻`` (in units of σ², like
        ``prior_var``), as :func:`kalnat.ekf`'s.
      iterations: linearisations per update (as :func:`kalnat.iterated_ekf`).
      representation: V's form (:mod:`kalnat.representations`; default the full covariance).

    Returns:
      A :class:`~kalnat.learners.base.Learner` whose predictive is a Student-t with ``2a⁻``
      degrees of freedom (``obs_cov`` is its scale matrix ``(b⁻/a⁻) S``).
    """
    family = Gaussian(1.0) if family is None else family
    if family.name != "gaussian":
        raise ValueError(f"nig_filter needs a Gaussian family, got {family.name}")
    if not (float(noise_shape) > 0 and float(noise_scale) > 0):
        raise ValueError("noise_shape and noise_scale must be positive")
    return build("nig_filter", model, family, NIG(representation or Full()), input_shape=input_shape,
                 iterations=iterations, prior_var=prior_var, forgetting=forgetting, max_variance=max_variance,
                 noise_shape=float(noise_shape), noise_scale=float(noise_scale))


def noise_var(state):
    """Posterior mean of σ², ``b / (a − 1)`` (for a > 1), of a normal–inverse-gamma state."""
    return state.cov.scale / (state.cov.shape - 1.0)
