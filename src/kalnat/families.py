"""Output distributions: exponential families in their mean parameterisation.

Each family maps a model's raw output ``z`` to the mean parameter ``ŷ = E[T(y)]`` of a
*minimal* sufficient statistic ``T`` (``m`` values), and gives ``T(y)``, ``R = Cov_ŷ(T(y))``,
the log-likelihood, sampling and a domain check for ``y`` (docs/method.md §1).

With ``H = ∂ŷ/∂θ`` and ``e = T(y) − ŷ`` the gradient of the loss is ``−Hᵀ R⁻¹ e`` and the
Fisher information of one observation is ``Hᵀ R⁻¹ H``; every learner is built on these two
identities.

Shapes, for one observation: ``z`` is ``(n_outputs,)``, ``ŷ`` and ``T(y)`` are ``(m,)``, ``R`` is
``(m, m)``, and ``y`` has shape ``event_shape``. Leading batch axes are handled by ``vmap``.
"""

from __future__ import annotations

import abc
import math
import numbers
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
import numpy as np

from kalnat import numerics

__all__ = ["Family", "Gaussian", "Bernoulli", "Categorical", "Poisson"]


class Family(abc.ABC):
    """Interface shared by all output families.

    Attributes:
      m: dimension of the minimal mean parameter ŷ and of T(y).
      n_outputs: number of raw outputs the model must produce.
      event_shape: shape of one observation y.
      is_classifier: whether ``probs`` (class probabilities) are meaningful.
      log_step_slack: ``None``, or how far above ``log max(y, 1)`` a step may raise a row's
        log-mean (:func:`kalnat.filter.bounded_step`; the Poisson's, 1).
    """

    m = 1
    n_outputs = 1
    event_shape = ()
    is_classifier = False
    name = "family"
    log_step_slack = None

    @abc.abstractmethod
    def mean(self, z):
        """Raw output ``z (n_outputs,)`` → mean parameter ``ŷ (m,)``."""

    @abc.abstractmethod
    def stat(self, y):
        """Observation ``y`` → minimal sufficient statistic ``T(y) (m,)``."""

    @abc.abstractmethod
    def cov(self, yhat):
        """``R = Cov_ŷ(T(y))``, shape ``(m, m)``."""

    @abc.abstractmethod
    def log_prob(self, z, y):
        """``log p(y | ŷ(z))`` computed from the raw output (stable near the boundary)."""

    @abc.abstractmethod
    def sample(self, key, yhat, shape=()):
        """Draws ``y`` of shape ``shape + event_shape`` from ``p(· | ŷ)``."""

    def innovation(self, yhat, y):
        """``e = T(y) − ŷ`` (``(m,)``), the innovation every learner uses."""
        return self.stat(y).astype(yhat.dtype) - yhat

    def check(self, y) -> np.ndarray:
        """Validates observations on the host; returns them as a NumPy array.

        ``y`` has shape ``event_shape`` or ``(b,) + event_shape``. Raises ``ValueError`` naming
        the problem (non-finite values, wrong shape, value outside the family's domain).
        """
        y = np.asarray(y)
        if y.dtype.kind not in "biuf":
            raise ValueError(f"{self.name}: y must be numeric, got dtype {y.dtype}")
        nd = len(self.event_shape)
        if y.ndim not in (nd, nd + 1) or y.shape[y.ndim - nd:] != self.event_shape:
            raise ValueError(
                f"{self.name}: y must have shape {self.event_shape} or (batch,) + "
                f"{self.event_shape}, got {y.shape}"
            )
        if y.dtype.kind == "f" and not numerics.all_within(y) and not np.all(np.isfinite(y)):
            raise ValueError(f"{self.name}: y contains NaN or inf")
        self._check_domain(y)
        return y

    def check_rows(self, y):
        """``(y, bad)`` for observations with a leading row axis: ``y (b,) + event_shape``.

        The dtype and shape are validated as in :meth:`check` (``ValueError``); rows that are
        not finite or lie outside the family's domain are reported in ``bad`` (``(b,)``
        booleans) instead of raising, so a stream can skip them.
        """
        y = np.asarray(y)
        if y.dtype.kind not in "biuf":
            raise ValueError(f"{self.name}: y must be numeric, got dtype {y.dtype}")
        nd = len(self.event_shape)
        if y.ndim != nd + 1 or y.shape[1:] != self.event_shape:
            raise ValueError(
                f"{self.name}: y must have shape (rows,) + {self.event_shape}, got {y.shape}"
            )
        with np.errstate(invalid="ignore"):
            ok = np.isfinite(y) & self._in_domain(y)
        return y, ~ok.all(axis=tuple(range(1, y.ndim)))

    # The domain of y: elementwise test and the message naming it (families with a restricted
    # domain override both).
    _domain = ""

    def _in_domain(self, y: np.ndarray) -> np.ndarray:
        return np.ones(y.shape, bool)

    def _check_domain(self, y: np.ndarray) -> None:
        if not self._domain:  # every finite number is in it (checked once per row: skip the work)
            return
        ok = self._in_domain(y)
        if not np.all(ok):
            bad = y[~ok].ravel()[0].item()
            raise ValueError(f"{self.name}: {self._domain}, got {bad!r}")

    def probs(self, yhat):
        """Class probabilities of a classifier, from ``ŷ``; ``None`` otherwise."""
        return None


#: The floor on R the command gives the bernoulli, categorical and poisson families, and the
#: adapters the categorical one (``r_floor``), in float32 and float64 alike. When a prediction
#: saturates (a probability rounds to 0 or 1, a Poisson rate to 0), R becomes singular in
#: floating point, and so does S = H P Hᵀ + R because H = R ∂z/∂θ shrinks with it; in float32
#: a confident softmax's R is below the rounding of its innovation. Adding 10⁻⁶·I bounds the
#: information one observation can carry; for an unsaturated prediction (R ≈ 0.01–0.25) it
#: changes the update by a relative 1e-5 or less.
R_FLOOR = 1e-6

#: The default floor on R, in units of rounding of R's dtype: ``r_floor=None`` adds
#: ``FLOOR_ULPS · ε`` (9.5·10⁻⁷ in float32, 1.8·10⁻¹⁵ in float64). In float32 that is about
#: :data:`R_FLOOR`, which a confident softmax needs (docs/reliability.md); in float64 it only
#: touches a prediction saturated to within 10⁻¹⁴.
FLOOR_ULPS = 8


def _set_floor(family):
    """Checks ``family.r_floor`` (``None``, the default, or a number) and stores a number as a
    Python float (a NumPy scalar would compare and hash equal to it yet carry its own dtype into
    R, and two learners that share a compiled program would then differ)."""
    given = family.r_floor
    if given is None:
        return
    try:
        value = float(given)
        ok = (isinstance(given, numbers.Real) and not isinstance(given, (bool, np.bool_))
              and math.isfinite(value) and value >= 0)
    except (TypeError, ValueError, OverflowError):
        ok = False
    if not ok:
        raise ValueError(f"{family.name}: r_floor must be None or a finite number at least 0, "
                         f"got {family.r_floor!r}")
    object.__setattr__(family, "r_floor", value)


def _floor(family, dtype) -> float:
    """The number ``family.cov`` adds to R's diagonal in ``dtype``."""
    if family.r_floor is None:
        return FLOOR_ULPS * float(jnp.finfo(dtype).eps)
    return family.r_floor


def _tiny(dtype):
    """The smallest positive normal number of ``dtype``: the floor of a variance ``R``, so that
    ``S = H P Hᵀ + R`` stays positive definite when the output is near-deterministic."""
    return jnp.finfo(dtype).tiny


def _as_tuple_matrix(a: np.ndarray):
    return tuple(map(tuple, a.tolist()))


@dataclass(frozen=True, init=False)
class Gaussian(Family):
    """Gaussian with known covariance Σ: ``T(y) = y``, ``ŷ = μ = z``, ``R = Σ``.

    Args:
      cov: scalar variance, a vector of per-output variances, or a full ``(m, m)`` covariance.
      dim: output dimension, needed only for an isotropic scalar ``cov`` with ``dim > 1``.
    """

    cov_: tuple
    name = "gaussian"

    def __init__(self, cov=1.0, dim: int | None = None):
        c = np.asarray(cov, dtype=np.float64)
        if c.ndim == 0:
            c = np.eye(dim or 1) * float(c)
        elif c.ndim == 1:
            c = np.diag(c)
        if c.ndim != 2 or c.shape[0] != c.shape[1]:
            raise ValueError(f"gaussian: cov must be a scalar, vector or square matrix, got shape {np.shape(cov)}")
        if dim is not None and c.shape[0] != dim:
            raise ValueError(f"gaussian: cov has dimension {c.shape[0]} but dim={dim}")
        if not np.all(np.isfinite(c)):
            raise ValueError("gaussian: cov contains NaN or inf")
        if not np.allclose(c, c.T) or np.linalg.eigvalsh(c).min() <= 0:
            raise ValueError("gaussian: cov must be symmetric positive definite")
        object.__setattr__(self, "cov_", _as_tuple_matrix(c))

    @property
    def m(self) -> int:
        return len(self.cov_)

    @property
    def n_outputs(self) -> int:
        return self.m

    @property
    def event_shape(self) -> tuple:
        return () if self.m == 1 else (self.m,)

    def _sigma(self, dtype):
        return jnp.asarray(self.cov_, dtype=dtype)

    def mean(self, z):
        return z

    def stat(self, y):
        return jnp.reshape(y, (self.m,))

    def cov(self, yhat):
        return self._sigma(yhat.dtype)

    def log_prob(self, z, y):
        sigma = self._sigma(z.dtype)
        r = self.stat(y).astype(z.dtype) - z
        chol = jnp.linalg.cholesky(sigma)
        w = jax.scipy.linalg.solve_triangular(chol, r, lower=True)
        logdet = 2.0 * jnp.sum(jnp.log(jnp.diag(chol)))
        return -0.5 * (w @ w + logdet + self.m * jnp.log(2.0 * jnp.pi))

    def sample(self, key, yhat, shape=()):
        chol = jnp.linalg.cholesky(self._sigma(yhat.dtype))
        eps = jax.random.normal(key, shape + (self.m,), dtype=yhat.dtype)
        y = yhat + eps @ chol.T
        return y.reshape(shape + self.event_shape)


@dataclass(frozen=True)
class Bernoulli(Family):
    """Bernoulli: ``y ∈ {0, 1}``, ``ŷ = p = sigmoid(z)``, ``R = p(1 − p)``; one raw output.

    ``r_floor`` (keyword only): a number added to ``R``; by default (``None``)
    :data:`FLOOR_ULPS` units of rounding of its dtype, and the command adds :data:`R_FLOOR`,
    10⁻⁶, which bounds what one row can teach. With one output ``S`` is a number and no other
    output's rounding swamps it: float32 filters on breast_cancer and phishing gave the same
    log-loss to four digits with floors of 0, 10⁻⁸ and 10⁻⁶ (unlike :class:`Categorical`'s).
    """

    r_floor: float | None = field(default=None, kw_only=True)
    name = "bernoulli"
    is_classifier = True

    def __post_init__(self):
        _set_floor(self)

    def mean(self, z):
        return jax.nn.sigmoid(z)

    def stat(self, y):
        return jnp.reshape(y, (1,))

    def cov(self, yhat):
        # Floored at the smallest normal number: a saturated sigmoid (p rounds to 0 or 1, in
        # float32 from |z| ≈ 17) gives p(1 − p) = 0 and H = 0, and S = H P Hᵀ + R would be 0.
        # Any representable p(1 − p) > 0 is kept as is.
        return (jnp.maximum(yhat * (1.0 - yhat), _tiny(yhat.dtype)) + _floor(self, yhat.dtype)).reshape(1, 1)

    def log_prob(self, z, y):
        y = jnp.reshape(y, (1,)).astype(z.dtype)
        return jnp.sum(y * jax.nn.log_sigmoid(z) + (1.0 - y) * jax.nn.log_sigmoid(-z))

    def sample(self, key, yhat, shape=()):
        return jax.random.bernoulli(key, yhat[0], shape).astype(jnp.int32)

    _domain = "labels must be 0 or 1"

    def _in_domain(self, y):
        return (y == 0) | (y == 1)

    def probs(self, yhat):
        return jnp.concatenate([1.0 - yhat, yhat], axis=-1)


@dataclass(frozen=True)
class Categorical(Family):
    """Categorical over ``K`` classes, labels ``0..K−1``.

    ``T(y)`` is the one-hot vector of ``y`` without the last class (``m = K − 1``), whose
    covariance ``R = diag(p) − p pᵀ`` is non-singular (docs/method.md §1). The model produces either
    ``K − 1`` logits (the last class has logit 0; the minimal parameterisation) or ``K``
    logits; ``n_outputs`` is the minimal ``K − 1``.

    ``r_floor`` (keyword only): a number added to ``R``'s diagonal; by default (``None``)
    :data:`FLOOR_ULPS` units of rounding of its dtype (9.5·10⁻⁷ in float32), and the command and
    the adapters add :data:`R_FLOOR`, 10⁻⁶. R's least eigenvalue is about the least class
    probability, and a confident softmax takes it below float32's resolution, where the
    innovation's rounding (``ε``, absolute) is no longer small against its standard deviation
    along it: with ``r_floor=0`` a float32 filter on digits' standardised linear softmax
    predicted over 100 of 640 rows with a probability below e⁻⁵⁰ (mean predictive
    log-likelihood −15, float64's −1.1); at the default floor none (float64: one), and
    float32's mean is −1.01 against float64's −1.08 (``benchmarks/float32_softmax.py``,
    ``test_a_floor_on_r_keeps_a_float32_softmax_accurate``). A floor also bounds what one row
    teaches: a larger one (``R_FLOOR``) is a modelling choice, not a numerical one.
    """

    num_classes: int = 2
    r_floor: float | None = field(default=None, kw_only=True)
    name = "categorical"
    is_classifier = True

    def __post_init__(self):
        if int(self.num_classes) < 2:
            raise ValueError(f"categorical: num_classes must be at least 2, got {self.num_classes}")
        _set_floor(self)

    @property
    def m(self) -> int:
        return self.num_classes - 1

    @property
    def n_outputs(self) -> int:
        return self.num_classes - 1

    def _logits(self, z):
        if z.shape[-1] == self.num_classes - 1:
            z = jnp.concatenate([z, jnp.zeros(z.shape[:-1] + (1,), z.dtype)], axis=-1)
        return z

    def mean(self, z):
        return jax.nn.softmax(self._logits(z))[..., :-1]

    def stat(self, y):
        # Labels arrive as any numeric dtype (bool, float from a CSV), already checked to be
        # integers in 0..K−1; one_hot wants an integer index.
        return jax.nn.one_hot(jnp.asarray(y).astype(jnp.int32), self.num_classes)[:-1]

    def cov(self, yhat):
        # diag(p) − p pᵀ, with 1 − p_j written as the sum of the other classes' probabilities:
        # a saturated softmax (p_j rounds to 1) would otherwise give p_j(1 − p_j) = 0 and a
        # singular R, and S = H P Hᵀ + R with H ≈ 0 would be singular too (NaN in every form).
        # The diagonal is then raised by a few units of rounding of its largest entry (at least
        # the smallest normal number), which keeps R positive definite when the last class's
        # probability underflows; it changes a well-conditioned R by ~1e-15 relative.
        p_last = jnp.maximum(1.0 - jnp.sum(yhat), 0.0)
        others = 1.0 - jnp.eye(yhat.shape[0], dtype=yhat.dtype)  # m × m, m = K − 1 is small
        rest = others @ yhat + p_last  # Σ_{k≠j} p_k summed, not 1 − p_j (it cancels)
        diag = yhat * rest
        floor = jnp.maximum(4.0 * jnp.finfo(yhat.dtype).eps * jnp.max(diag), _tiny(yhat.dtype))
        # − p pᵀ off the diagonal only, by a mask: ``outer − diag(p²)`` leaves a saturated
        # class's diagonal a rounding error of p² (~ε) once XLA contracts it into a fused
        # multiply-add, against a true p(1 − p) of ~1e-14, and R is then indefinite
        return jnp.diag(diag + floor + _floor(self, yhat.dtype)) - jnp.outer(yhat, yhat) * others

    def log_prob(self, z, y):
        return jax.nn.log_softmax(self._logits(z))[jnp.asarray(y).astype(jnp.int32)]

    def sample(self, key, yhat, shape=()):
        p = jnp.concatenate([yhat, 1.0 - jnp.sum(yhat, keepdims=True)])
        return jax.random.categorical(key, jnp.log(p), shape=shape)

    @property
    def _domain(self):
        return f"labels must be integers in 0..{self.num_classes - 1}"

    def _in_domain(self, y):
        return (y == np.round(y)) & (y >= 0) & (y < self.num_classes)

    def probs(self, yhat):
        return jnp.concatenate([yhat, 1.0 - jnp.sum(yhat, axis=-1, keepdims=True)], axis=-1)


@dataclass(frozen=True)
class Poisson(Family):
    """Poisson counts: ``y ∈ {0, 1, 2, …}``, ``ŷ = λ = exp(z)``, ``R = λ``; one raw output.

    ``r_floor`` (keyword only): a number added to ``R`` (by default a few units of rounding, as
    :class:`Bernoulli`'s).
    """

    r_floor: float | None = field(default=None, kw_only=True)
    name = "poisson"
    log_step_slack = 1.0

    def __post_init__(self):
        _set_floor(self)

    def mean(self, z):
        # λ = exp(z) with z capped at 0.4·log(max float) (≈ 35 in float32, 283 in float64): a
        # large first count can throw a filter far above the data (λ = e^370 overflows float32
        # and S ∝ λ² overflows float64); capped, the next steps walk z back down. The cap keeps
        # the slope (∂λ/∂z = λ at the cap), so the filter still sees which way to move, and it
        # changes nothing below it.
        z = jnp.asarray(z)
        cap = 0.4 * float(np.log(np.finfo(z.dtype).max))
        return jnp.exp(z - jax.lax.stop_gradient(jnp.maximum(z - cap, 0.0)))

    def stat(self, y):
        return jnp.reshape(y, (1,))

    def innovation(self, yhat, y):
        # A count far above the predicted rate (a cold start at λ = 1 meeting counts in the
        # thousands) is learned as if it were e_max = 3·max(λ, 1) + 6√λ above it. The linearised
        # update moves λ by about e, i.e. the log-rate by up to ~e/λ: uncapped, one count of
        # 2000 at λ = 1 throws z up by ~1000, the filter collapses P along x at the capped
        # rate and never recovers (or loses positive definiteness). e_max is over 6 standard
        # deviations of a Poisson(λ) above λ and at least 3 counts: data the model explains
        # (P < 1e-7 per row) never reach it, so there the filter is unchanged.
        e = self.stat(y).astype(yhat.dtype) - yhat
        return jnp.minimum(e, 3.0 * jnp.maximum(yhat, 1.0) + 6.0 * jnp.sqrt(yhat))

    def cov(self, yhat):
        # Floored at the smallest normal number (λ = exp(z) underflows to 0 for very negative z).
        return (jnp.maximum(yhat, _tiny(yhat.dtype)) + _floor(self, yhat.dtype)).reshape(1, 1)

    def log_prob(self, z, y):
        y = jnp.reshape(y, (1,)).astype(z.dtype)
        return jnp.sum(y * z - jnp.exp(z) - jax.scipy.special.gammaln(y + 1.0))

    def sample(self, key, yhat, shape=()):
        return jax.random.poisson(key, yhat[0], shape)

    _domain = "counts must be non-negative integers"

    def _in_domain(self, y):
        return (y >= 0) & (y == np.round(y))


def from_name(name: str, num_classes: int | None = None) -> Family:
    """Family from its name: ``gaussian``, ``bernoulli``, ``categorical`` or ``poisson``."""
    key = name.lower()
    if key == "gaussian":
        return Gaussian()
    if key == "bernoulli":
        return Bernoulli()
    if key == "poisson":
        return Poisson()
    if key == "categorical":
        if num_classes is None:
            raise ValueError("categorical: num_classes is required")
        return Categorical(int(num_classes))
    raise ValueError(f"unknown family {name!r}; expected gaussian, bernoulli, categorical or poisson")
