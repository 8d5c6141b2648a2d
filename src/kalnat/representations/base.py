"""The interface every representation of θ's uncertainty implements (docs/method.md §6).

The filter step of :mod:`kalnat.filter` is written once over these operations; a
representation says how ``P`` is stored and how each operation is computed in that storage:

- ``init(hyper, d, dtype) -> cov``: the prior ``P_0`` from ``hyper.prior_var``;
- ``inflate(cov, t, lam, q, bound) -> prior``: the prediction step
  ``P⁻ = D (P/λ_t + q I) D`` (forgetting, additive noise, the variance bound's congruence);
- ``quad(prior, h (m, d)) -> h P⁻ hᵀ (m, m)``: the predictive's parameter term for one row;
- ``gain(prior, H (k, d), R (k, k), e (k,)) -> (δθ (d,), H P⁻ Hᵀ (k, k), aux)``: the update of
  θ, ``δθ = P⁻ Hᵀ S⁻¹ e`` with ``S = H P⁻ Hᵀ + R``, and what the covariance update needs;
- ``posterior(prior, H, R, e, aux, rows (k,)) -> cov``: the rank-k condition step,
  ``P = P⁻ − P⁻ Hᵀ S⁻¹ H P⁻`` in the representation's own form.

``cov`` (the state's) is a pytree (a ``NamedTuple``, or a registered dataclass where a size is
static, as the diagonal form's ``d``) with ``dense() -> P (d, d)``, ``_replace`` and
``with_dense(P) -> cov`` (the same posterior in this form: for re-expression in new coordinates
and :func:`kalnat.covariance`); ``prior`` is one too, with ``dense() -> P⁻``. ``gain`` and
``posterior`` are separate so that the iterated update (several linearisations from one prior)
computes the gain at each and the covariance once. ``project`` and ``gain_projected``
(optional) split ``gain`` where its products are those of ``quad``.
"""

from __future__ import annotations

import abc

from kalnat.validation import positive_int

__all__ = ["Representation"]


class Representation(abc.ABC):
    """Base of the static (hashable) representation objects held by a learner."""

    name = "representation"
    #: the pytree type of the state's ``cov`` (set by every representation)
    state_type: type = tuple
    #: whether additive process noise ``q I`` has a form in this representation
    process_noise = True
    #: whether ``hyper.forgetting`` is used (a natural-gradient rate schedule may replace it)
    uses_forgetting = True
    #: whether ``init`` reads ``hyper.noise_shape`` and ``hyper.noise_scale``
    noise_prior = False
    #: whether its step branches on the data (``lax.cond``): under ``vmap`` every branch would
    #: run, so a bank advances such members one at a time
    branches = False
    #: whether its steps take ``H`` as :class:`~kalnat.linearization.LayerRows` (a dense layer's
    #: factors) as well as a matrix
    layer_rows = False
    #: ``((n_out, n_in), …)``: the dense layers it holds, in θ's order (what the rows are taken for)
    dense_layers = ()

    @abc.abstractmethod
    def init(self, hyper, d, dtype):
        ...

    @abc.abstractmethod
    def inflate(self, cov, t, lam, q, bound):
        ...

    @abc.abstractmethod
    def quad(self, prior, h):
        ...

    @abc.abstractmethod
    def gain(self, prior, H, R, e):
        ...

    @abc.abstractmethod
    def posterior(self, prior, H, R, e, aux, rows):
        ...

    def for_layers(self, layers) -> "Representation":
        """This representation taking ``H`` as the factors of the dense layers ``((n_out, n_in),
        …)`` that make up all of θ, where it has a use for them (:class:`~kalnat.representations.
        Full`); else itself. The filter is the same either way."""
        return self

    def project(self, prior, H):
        """``(H P⁻ Hᵀ (k, k), projection)`` for ``H (k, d)``: what :meth:`gain_projected` reuses.
        A representation whose gain recomputes its quad's products (``P⁻ Hᵀ``) overrides both,
        so that :class:`~kalnat.representations.Groups`, which needs every group's quad before
        any gain, computes them once."""
        return self.quad(prior, H), None

    def gain_projected(self, prior, H, R, e, projection):
        """:meth:`gain` given ``projection`` from :meth:`project` of the same ``prior`` and ``H``."""
        return self.gain(prior, H, R, e)

    def noise(self, prior):
        """``(scale, dof)`` when the observation noise scale is itself uncertain (a Student-t
        predictive with ``dof`` degrees of freedom and scale ``scale · S``), else ``None``."""
        return None


def group_sizes(sizes, owner: str) -> tuple:
    """``sizes`` as a non-empty tuple of positive ``int`` s, or a ``ValueError`` naming ``owner``."""
    sizes = tuple(sizes)
    if not sizes:
        raise ValueError(f"{owner}: no group sizes given")
    return tuple(positive_int(n, f"{owner}: group size {i}") for i, n in enumerate(sizes))
