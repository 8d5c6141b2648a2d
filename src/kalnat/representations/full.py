"""The full covariance ``P (d, d)``: the extended Kalman filter's covariance form (docs/method.md §2a).

Per step, with ``P⁻ = D (P/λ + q I) D`` and the linearisation at θ_{t−1}: ``S = H P⁻ Hᵀ + R``;
with ``S = L Lᵀ`` and ``W = P⁻ Hᵀ L⁻ᵀ`` the update is ``δθ = W (L⁻¹ e)``, ``P = P⁻ − W Wᵀ``:
symmetric by construction, O(d² m) per step, no ``d × d`` inverse. The Joseph form
``(I − KH) P⁻ (I − KH)ᵀ + K R Kᵀ`` is an option (more robust to rounding, ~2× the work).

``P⁻`` is never written as a new matrix: :class:`PriorCovariance` holds ``P``, the forgetting
``c = 1/λ`` and the bound's factors ``s``, and the products fold them in, so a step reads ``P``
once for ``P⁻ Hᵀ`` and once for the downdate, which writes it back in place.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from kalnat import numerics
from kalnat.linearization import LayerRows, times
from kalnat.representations.base import Representation

__all__ = ["Covariance", "PriorCovariance", "Full"]


class Covariance(NamedTuple):
    """``p (d, d)``: the posterior covariance ``P_t``."""

    p: jax.Array

    def dense(self):
        return self.p

    def with_dense(self, P):
        return Covariance(jnp.asarray(P, self.p.dtype))


class PriorCovariance(NamedTuple):
    """``P⁻ = c · (s sᵀ) ∘ p``, held in pieces: ``p (d, d)`` the stored ``P`` (or ``P/λ + qI``
    with additive noise, then ``c = 1``), ``c = 1/λ_t``, ``s (d,)`` the variance bound's
    factors (``None``: no bound)."""

    p: jax.Array
    c: Any
    s: Any

    def times(self, ht):
        """``P⁻ Hᵀ`` for ``Hᵀ (d, m)``."""
        if self.s is None:
            return (self.p @ ht) * self.c
        return (self.p @ (ht * self.s[:, None])) * (self.c * self.s[:, None])

    def times_rows(self, H):
        """``P⁻ Hᵀ (d, k)`` for the rows ``H``: a matrix ``(k, d)``, or :class:`LayerRows`.

        The rows of one dense layer (a linear model) are, example by example, ``H_i = Δ_i J_iᵀ``,
        ``J_i (d, n_out)`` example ``i``'s inputs (:meth:`LayerRows.inputs_matrix`), ``Δ_i`` its
        rows' ``δ``: ``P⁻ H_iᵀ = (P⁻ J_i) Δ_iᵀ``, where the product with ``P`` no longer depends
        on ``δ``. ``J`` is the same at every θ, so the iterated update's linearisations share
        that product (XLA computes it once where their count is known when the step is traced:
        :meth:`kalnat.bank.Bank.scan_chunk`), for a minibatch as for one row. Taken where it is
        no more work than ``P⁻ Hᵀ`` itself (``n_out ≤ m``, an example's rows); else, and for
        several layers, through the matrix."""
        if isinstance(H, LayerRows):
            delta = H.deltas[0]
            e, n_out = H.examples(), delta.shape[-1]
            m = delta.size // (e * n_out)  # an example's rows
            if len(H.deltas) == 1 and n_out <= m:
                if e == 1:  # the product the command was measured with (the einsum rounds otherwise in float32)
                    return self.times(H.inputs_matrix()) @ delta.reshape(m, n_out).T
                pj = self.times(H.inputs_matrix()).reshape(-1, e, n_out)              # (d, e, n_out)
                return jnp.einsum("dio,imo->dim", pj, delta.reshape(e, m, n_out)).reshape(pj.shape[0], e * m)
            H = H.flat()
        return self.times(H.T)

    def matrix(self):
        """``P⁻`` as an expression (XLA fuses it into the update that consumes it)."""
        if self.s is None:
            return self.p * self.c
        # s_i s_j first: the factor is then bitwise symmetric. Forgetting multiplies any
        # asymmetry of P by 1/λ at every step and the update never removes it.
        return self.p * (self.c * (self.s[:, None] * self.s[None, :]))

    def dense(self):
        return self.matrix()


def inflate_dense(p, lam, q, bound) -> PriorCovariance:
    """The prediction step on a dense ``P``: forgetting, additive noise and the variance bound."""
    c = 1.0 / jnp.asarray(lam, p.dtype)
    if q is not None:
        p, c = numerics.add_to_diagonal(p * c, jnp.asarray(q, p.dtype)), jnp.ones((), p.dtype)
    s = None
    if bound is not None:
        s = numerics.variance_bound(c * jnp.diagonal(p), jnp.asarray(bound, p.dtype))
    return PriorCovariance(p, c, s)


@dataclass(frozen=True)
class Full(Representation):
    """The covariance form; ``joseph=True`` updates ``P`` in Joseph form.

    ``layers``: ``((n_out, n_in), …)``, θ's dense layers in its order, when the model gives its
    rows as their factors (:func:`kalnat.linearization.linearize_layers`; :func:`kalnat.ekf_bank`
    gives a linear model's layer to its iterated members, :meth:`for_layers`): then
    ``P⁻ Hᵀ = (P⁻ J) Δᵀ``, whose product with ``P`` a linear model's linearisations share
    (:meth:`PriorCovariance.times_rows`). The filter is the same."""

    joseph: bool = False
    layers: tuple = ()
    name = "full"
    state_type = Covariance

    def init(self, hyper, d, dtype):
        return Covariance(numerics.prior_matrix(hyper.prior_var, d, dtype))

    def inflate(self, cov, t, lam, q, bound):
        return inflate_dense(cov.p, lam, q, bound)

    @property
    def layer_rows(self):
        return bool(self.layers)

    @property
    def dense_layers(self):
        return self.layers

    def for_layers(self, layers):
        return self if self.layers else dataclasses.replace(self, layers=tuple(layers))

    def quad(self, prior, h):
        return times(h, prior.times_rows(h))

    def gain(self, prior, H, R, e):
        ph = prior.times_rows(H)
        hph = times(H, ph)
        s = hph + R
        if self.joseph:
            gain = numerics.chol_solve(s, ph.T).T
            return gain @ e, hph, (gain, ph, s)
        w, v = numerics.whiten(s, ph, e)
        return w @ v, hph, w

    def posterior(self, prior, H, R, e, aux, rows):
        if self.joseph:
            gain, ph, s = aux
            return Covariance(numerics.joseph_update(prior.matrix(), gain, ph.T, s))
        return Covariance(numerics.downdate(prior.matrix(), aux))
