"""Learning-rate schedules and the Kalman ⇄ natural-gradient translation (docs/method.md §3).

A schedule is a callable ``(t, previous) -> rate`` where ``t = 1, 2, …`` is the step and
``previous`` the rate of step ``t − 1`` (``η_0`` at ``t = 1``): the Kalman schedule is a
recursion, ``1/η_t = λ_t/η_{t−1} + 1``, and plain schedules of ``t`` ignore ``previous``.

The correspondence: an EKF with prior ``P_0`` and forgetting ``λ_t`` produces the same θ_t as
online natural gradient with ``γ_t = η_t``, ``1/η_t = λ_t/η_{t−1} + 1``, ``J_0 = η_0 P_0⁻¹``,
and then ``P_t = η_t J_t⁻¹``. :func:`kalman_to_natural` and :func:`natural_to_kalman` give
the settings of one from the other, as keyword arguments for :func:`kalnat.natural_gradient`
and :func:`kalnat.ekf`; they raise ``ValueError`` where no exact counterpart exists.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, NamedTuple, Union

import jax.numpy as jnp
import numpy as np

__all__ = [
    "Kalman", "Constant", "Function", "kalman", "constant", "as_schedule", "forgetting_at",
    "learning_rates", "NaturalGradientSettings", "KalmanSettings", "kalman_to_natural",
    "natural_to_kalman", "inverse",
]

Forgetting = Union[float, Callable[[Any], Any]]


def forgetting_at(forgetting: Forgetting, t):
    """λ_t from a constant or a function of the step ``t`` (1-based)."""
    return forgetting(t) if callable(forgetting) else forgetting


@dataclass(frozen=True)
class Kalman:
    """The Kalman learning rate ``1/η_t = λ_t/η_{t−1} + 1``: ``1/(t + 1/η_0)`` for λ = 1,
    tending to ``1 − λ`` for a constant ``λ < 1`` (fading memory)."""

    forgetting: Forgetting = 1.0

    def __call__(self, t, previous):
        return 1.0 / (forgetting_at(self.forgetting, t) / previous + 1.0)


@dataclass(frozen=True)
class Constant:
    """A constant rate."""

    value: float

    def __call__(self, t, previous):
        return jnp.asarray(self.value, dtype=jnp.result_type(previous))


@dataclass(frozen=True)
class Function:
    """A rate given as a function of the step ``t`` alone (an optax schedule works)."""

    fn: Callable[[Any], Any]

    def __call__(self, t, previous):
        return jnp.asarray(self.fn(t), dtype=jnp.result_type(previous))


def kalman(forgetting: Forgetting = 1.0) -> Kalman:
    return Kalman(forgetting)


def constant(value: float) -> Constant:
    return Constant(float(value))


def as_schedule(rate) -> Callable:
    """A float becomes :class:`Constant`; a one-argument callable of ``t``, :class:`Function`."""
    if isinstance(rate, (Kalman, Constant, Function)):
        return rate
    if callable(rate):
        return Function(rate)
    return Constant(float(rate))


def learning_rates(schedule, eta0: float, steps: int) -> np.ndarray:
    """``η_1 … η_steps`` of a schedule, evaluated in float64 on the host."""
    out, prev = np.empty(steps), np.float64(eta0)
    for t in range(1, steps + 1):
        prev = np.float64(schedule(t, prev))
        out[t - 1] = prev
    return out


class NaturalGradientSettings(NamedTuple):
    """Keyword arguments of :func:`kalnat.natural_gradient`."""

    learning_rate: Any
    fisher_rate: Any
    eta0: float
    init_fisher: Any


class KalmanSettings(NamedTuple):
    """Keyword arguments of :func:`kalnat.ekf` / :func:`kalnat.information_filter`."""

    prior_var: Any
    forgetting: Forgetting


def inverse(a, name):
    """``a⁻¹`` of a positive scalar, ``(d,)`` diagonal or positive definite ``(d, d)`` (host, float64)."""
    a = np.asarray(a, dtype=np.float64)
    if a.ndim <= 1:
        if np.any(a <= 0) or not np.all(np.isfinite(a)):
            raise ValueError(f"{name} must be positive and finite")
        return 1.0 / a
    try:
        np.linalg.cholesky(a)
    except np.linalg.LinAlgError:
        raise ValueError(f"{name} must be positive definite") from None
    return np.linalg.inv(a)


def kalman_to_natural(prior_var=1.0, forgetting: Forgetting = 1.0, process_noise=0.0,
                      eta0: float = 1.0) -> NaturalGradientSettings:
    """Natural-gradient settings that reproduce an EKF exactly.

    ``J_0 = η_0 P_0⁻¹``, ``η_t`` the Kalman schedule with the filter's forgetting, ``γ_t = η_t``.
    ``η_0`` is free (every positive value gives the same θ_t); 1 by default.

    Raises:
      ValueError: for additive process noise ``q·I``, which has no natural-gradient form.
    """
    if np.any(np.asarray(process_noise) != 0):
        raise ValueError(
            "additive process noise q·I has no exact natural-gradient counterpart; "
            "use forgetting (process noise proportional to P) instead"
        )
    if not eta0 > 0:
        raise ValueError(f"eta0 must be positive, got {eta0}")
    return NaturalGradientSettings(Kalman(forgetting), None, float(eta0), eta0 * inverse(prior_var, "prior_var"))


def natural_to_kalman(learning_rate, fisher_rate=None, eta0: float = 1.0,
                      init_fisher=1.0) -> KalmanSettings:
    """EKF settings that reproduce online natural gradient exactly.

    ``P_0 = η_0 J_0⁻¹`` and ``λ_t = η_{t−1} (1/η_t − 1)``.

    Raises:
      ValueError: when ``γ_t ≠ η_t`` (the Fisher matrix and θ must be learned at the same
        rate), a constant rate outside ``(0, 1)``, or rates that would need a forgetting
        factor λ_t outside (0, 1] (λ_t > 1 is negative process noise: no filter does that;
        checked over the first :data:`CHECKED_STEPS` steps of a schedule given as a function).
    """
    lr = as_schedule(learning_rate)
    if fisher_rate is not None and as_schedule(fisher_rate) != lr:
        raise ValueError(
            "a Fisher rate γ_t different from the learning rate η_t has no Kalman counterpart"
        )
    prior = eta0 * inverse(init_fisher, "init_fisher")
    if isinstance(lr, Kalman):
        return KalmanSettings(prior, lr.forgetting)
    if isinstance(lr, Constant):
        c = lr.value
        if not 0 < c < 1:
            raise ValueError(f"a constant learning rate must lie in (0, 1) to be a Kalman filter, got {c}")
        if eta0 == c:
            return KalmanSettings(prior, 1.0 - c)
        first = eta0 * (1.0 / c - 1.0)
        _check_forgetting(1, first, f"eta0 = {eta0:g} with a constant rate {c:g}",
                          f"; use eta0 ≤ {c / (1 - c):g} (e.g. eta0 = {c:g})")
        return KalmanSettings(prior, lambda t: jnp.where(t == 1, first, 1.0 - c))
    fn = lr.fn
    previous = float(eta0)
    for t in range(1, CHECKED_STEPS + 1):
        rate = float(fn(t))
        _check_forgetting(t, previous * (1.0 / rate - 1.0) if rate > 0 else float("nan"),
                          f"the rate η_{t} = {rate:g} after η_{t - 1} = {previous:g}")
        previous = rate
    return KalmanSettings(
        prior, lambda t: jnp.where(t == 1, eta0, fn(t - 1)) * (1.0 / fn(t) - 1.0)
    )


CHECKED_STEPS = 1000


def _check_forgetting(t, lam, what, hint=""):
    if not 0.0 < lam <= 1.0 + 1e-12:  # (1/t schedules give λ = 1 up to rounding)
        raise ValueError(f"no Kalman counterpart: {what} needs a forgetting factor λ_{t} = {lam:g}, outside (0, 1] "
                         f"(λ > 1 is negative process noise){hint}")
