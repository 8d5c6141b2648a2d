"""Linearisation of a model and family at θ: ŷ, H = ∂ŷ/∂θ, R and e = T(y) − ŷ.

Computed in this one place; every learner consumes a :class:`Linearization` (docs/method.md §1–§2).
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from kalnat import numerics

__all__ = ["Linearization", "LayerRows", "linearize", "linearize_layers", "masked", "stack",
           "in_noise_units", "check_layer_rows"]


class LayerRows(NamedTuple):
    """Rows of ``H`` for a model of dense layers, each layer's part of a row held as its
    factors: the part is the matrix ``δ āᵀ`` (``δ`` the output's sensitivity to the layer's
    pre-activation, ``ā = [a; 1]`` its input with the bias input last), which in θ's order is
    ``δ`` (the bias) followed by ``δ āᵀ`` without its last column (the weights, row by row).
    An example's ``m`` rows share its ``ā``, held once.

    Attributes:
      deltas: per layer, the rows' ``δ``: ``(b, m, n_out)`` in a :class:`Linearization`,
        ``(m, n_out)`` for one example, ``(b·m, n_out)`` once stacked.
      inputs: per layer, the examples' ``ā``: ``(b, n_in + 1)``, ``(n_in + 1,)`` for one
        example, still ``(b, n_in + 1)`` once stacked.
    """

    deltas: tuple
    inputs: tuple

    def layer(self, i: int) -> "LayerRows":
        """The rows of layer ``i`` alone."""
        return LayerRows((self.deltas[i],), (self.inputs[i],))

    def examples(self, i: int = 0) -> int:
        """How many examples the rows come from (static)."""
        a = self.inputs[i]
        return 1 if a.ndim == 1 else a.shape[0]

    def row_inputs(self, i: int = 0):
        """Layer ``i``'s ``ā`` of every row, the shape of its ``δ`` but the last axis."""
        delta, a = self.deltas[i], self.inputs[i]
        if a.ndim < delta.ndim:  # one per example, rows along the axis before δ's last
            return jnp.broadcast_to(a[..., None, :], delta.shape[:-1] + a.shape[-1:])
        return jnp.repeat(a, delta.shape[0] // a.shape[0], axis=0)  # stacked: m rows an example

    def times(self, v):
        """``H v`` for stacked rows (or one example's) and ``v`` in θ's order, ``(d,)`` or
        ``(d, n)``: ``(k,)`` or ``(k, n)``, row ``j``'s ``Σ_l δ_jᵀ M_l ā_j``, ``M_l = [W_l | b_l]``
        being layer ``l``'s part of ``v`` (of each column of ``v``)."""
        out, at = 0.0, 0
        for i, delta in enumerate(self.deltas):
            n_out, p = delta.shape[-1], self.inputs[i].shape[-1]
            part = v[at:at + n_out * p]
            rest = part.shape[1:]
            m = jnp.concatenate([part[n_out:].reshape((n_out, p - 1) + rest), part[:n_out, None]], axis=1)
            t = jnp.tensordot(self.row_inputs(i), m, axes=[[-1], [1]])  # (…, n_out) + rest
            out = out + jnp.sum(delta.reshape(delta.shape + (1,) * len(rest)) * t, axis=delta.ndim - 1)
            at += n_out * p
        return out

    def weights(self, i: int = 0):
        """Layer ``i``'s part of the rows for its weights, ``δ āᵀ`` without the bias column:
        ``(…, n_out, n_in)``."""
        return self.deltas[i][..., :, None] * self.row_inputs(i)[..., None, :-1]

    def inputs_matrix(self):
        """The rows of one layer as ``H = δ Jᵀ``, example by example: ``J (d, e·n_out)`` for
        ``e`` examples, example ``i``'s column ``o`` holding its ``ā`` at the rows of ``b[o]``
        (its last entry) and ``W[o, :]``."""
        a = self.inputs[0].reshape(-1, self.inputs[0].shape[-1])          # (e, n_in + 1)
        e, n_out = a.shape[0], self.deltas[0].shape[-1]
        eye = jnp.eye(n_out, dtype=a.dtype)
        bias = a[:, -1, None, None] * eye                                  # (e, n_out, n_out)
        weights = (eye[:, None, :] * a[:, None, :-1, None]).reshape(e, -1, n_out)
        return jnp.moveaxis(jnp.concatenate([bias, weights], axis=1), 0, 1).reshape(-1, e * n_out)

    def flat(self):
        """``H (…, d)`` in θ's order: what a path that needs the rows themselves takes."""
        parts = []
        for i, delta in enumerate(self.deltas):
            w = self.weights(i)
            parts += [delta, w.reshape(w.shape[:-2] + (-1,))]
        return jnp.concatenate(parts, axis=-1)


class Linearization(NamedTuple):
    """One minibatch of ``b`` observations linearised at one θ.

    Attributes:
      yhat: ``(b, m)`` predicted mean parameters.
      H: ``(b, m, d)`` Jacobians ∂ŷ/∂θ, or the same rows as :class:`LayerRows` (from
        :func:`linearize_layers`: only representations with ``layer_rows`` take them;
        :func:`times` multiplies either).
      R: ``(b, m, m)`` covariances of T(y) at ŷ.
      e: ``(b, m)`` innovations T(y) − ŷ (zero when no y is given).
      y: ``(b, …)`` the observations themselves (``None`` when none is given): what the
        one-step predictive log-likelihood scores.
    """

    yhat: jax.Array
    H: jax.Array
    R: jax.Array
    e: jax.Array
    y: Optional[jax.Array] = None


def linearize(apply_flat, family, theta, xs, ys=None, mask=None) -> Linearization:
    """Linearises ``family.mean(apply_flat(θ, x))`` at ``θ (d,)`` for each ``x`` in ``xs``.

    ``H`` is computed by reverse mode when the output (m values) is smaller than θ, else by
    forward mode. Rows where ``mask`` (``(b,)`` booleans) is false get ``H = 0`` and ``e = 0``,
    which removes them from any update exactly.
    """
    d = theta.shape[0]
    jac = jax.jacrev if family.m < d else jax.jacfwd

    def mean_and_aux(th, x):
        yhat = jnp.reshape(family.mean(apply_flat(th, x)), (family.m,))
        return yhat, yhat

    H, yhat = jax.vmap(jac(mean_and_aux, has_aux=True), in_axes=(None, 0))(theta, xs)
    return _finish(family, yhat, H, ys, mask)


def linearize_layers(apply_tapped, layers, family, params, xs, ys=None, mask=None) -> Linearization:
    """:func:`linearize` for a model of dense layers (:attr:`kalnat.models.Model.apply_tapped`),
    with ``H`` as :class:`LayerRows`: each layer's ``δ`` is the derivative of ŷ with respect to
    a zero added to its pre-activation, its ``ā`` the layer's input, so no ``δ āᵀ`` is formed
    (nor the flat ``H`` concatenated from them). ``layers``: ``((n_out, n_in), …)`` in θ's
    order, which the model's layers must be."""
    dtype = jax.tree_util.tree_leaves(params)[0].dtype
    taps = tuple(jnp.zeros(n_out, dtype) for n_out, _ in layers)
    jac = jax.jacrev if family.m < sum(n_out for n_out, _ in layers) else jax.jacfwd

    def mean_and_aux(taps, x):
        z, inputs = apply_tapped(params, x, list(taps))
        yhat = jnp.reshape(family.mean(z), (family.m,))
        return yhat, (yhat, tuple(inputs))

    deltas, (yhat, inputs) = jax.vmap(jac(mean_and_aux, has_aux=True), in_axes=(None, 0))(taps, xs)
    widths = [a.shape[1:] for a in inputs]
    if widths != [(n_in,) for _, n_in in layers]:
        raise ValueError(f"the model's apply_tapped gives {len(inputs)} layer inputs of shapes {widths} "
                         f"for {len(layers)} dense layers of the representation, of inputs "
                         f"{[(n_in,) for _, n_in in layers]}")
    # ones_like: a's dtype as JAX holds it (a NumPy float64 input without x64 is float32 here)
    abar = tuple(jnp.concatenate([a, jnp.ones_like(a[:, :1])], axis=1) for a in inputs)
    return _finish(family, yhat, LayerRows(tuple(deltas), abar), ys, mask)


#: how far a layer's rows from ``apply_tapped`` may be from the Jacobian's, relative to its
#: largest entry: float32 rounding of two ways of computing the same derivative is ~1e-6 of it;
#: a layer taken in another's place (the same shapes, other values) differs by order one
LAYER_ROWS_TOLERANCE = 1e-4


def check_layer_rows(apply, apply_tapped, layers, family, params, input_shape):
    """Raises ``ValueError`` unless ``apply_tapped`` gives the rows of ``H`` that ``apply``'s
    Jacobian does, layer by layer, at a random point: θ moved off ``params`` by ~0.3 in each
    coordinate (at an MLP's init its output layer is zero and every hidden layer's rows with
    it) and a standard normal ``x``.

    The widths :func:`linearize_layers` checks cannot tell two layers of the same shapes apart:
    an ``apply_tapped`` that lists the layers in another order than θ's (the order
    ``ravel_pytree`` gives a dict's keys is sorted: ``"layer10"`` before ``"layer2"``) would
    give each layer another's factors and the filter a wrong update. One compiled program, run
    once; its cost is the model's Jacobian on one example."""
    theta, unravel = ravel_pytree(params)
    key_theta, key_x = jax.random.split(jax.random.PRNGKey(0))
    theta = theta + 0.3 * jax.random.normal(key_theta, theta.shape, theta.dtype)
    x = jax.random.normal(key_x, (1,) + tuple(input_shape), theta.dtype)

    @jax.jit
    def both(theta, x):
        flat = linearize(lambda th, xx: apply(unravel(th), xx), family, theta, x).H
        return flat, linearize_layers(apply_tapped, layers, family, unravel(theta), x).H.flat()

    flat, tapped = (np.asarray(h, np.float64) for h in both(theta, x))
    scale = max(float(np.max(np.abs(flat))), float(np.finfo(flat.dtype).tiny))
    at = 0
    for i, (n_out, n_in) in enumerate(layers):
        part = slice(at, at + n_out * (n_in + 1))
        gap = float(np.max(np.abs(flat[..., part] - tapped[..., part]))) / scale
        if not gap <= LAYER_ROWS_TOLERANCE:
            raise ValueError(
                f"the model's apply_tapped does not give the Jacobian its apply gives: dense layer {i} of θ "
                f"(W {n_out} × {n_in} and its bias, θ[{at}:{part.stop}]) differs by {gap:.2g} of the largest "
                f"entry at a random point. apply_tapped(params, x, taps) must add taps[l] to the pre-activation "
                f"of θ's l-th layer and return the layers' inputs in θ's order (ravel_pytree's: a dict's keys "
                f"sorted, each layer's bias leaf before its weight leaf); or build the Model without "
                f"apply_tapped (H is then formed as a matrix)")
        at = part.stop


def _finish(family, yhat, H, ys, mask):
    R = jax.vmap(family.cov)(yhat)
    if ys is None:
        e = jnp.zeros_like(yhat)
    else:
        e = jax.vmap(family.innovation)(yhat, ys)
    lin = Linearization(yhat, H, R, e, ys)
    return lin if mask is None else masked(lin, mask)


def masked(lin: Linearization, mask) -> Linearization:
    """Rows where ``mask`` (``(b,)`` booleans) is false get ``H = 0`` and ``e = 0``: removed
    from the update exactly."""
    if isinstance(lin.H, LayerRows):
        H = LayerRows(tuple(jnp.where(mask[:, None, None], a, 0.0) for a in lin.H.deltas),
                      tuple(jnp.where(mask[:, None], a, 0.0) for a in lin.H.inputs))
    else:
        H = jnp.where(mask[:, None, None], lin.H, 0.0)
    return lin._replace(H=H, e=jnp.where(mask[:, None], lin.e, 0.0))


def times(H, v):
    """``H v`` for stacked rows ``H`` (a matrix or :class:`LayerRows`) and ``v (d,)`` or ``(d, n)``."""
    return H.times(v) if isinstance(H, LayerRows) else H @ v


def stack(lin: Linearization):
    """Stacks a minibatch into one observation: ``H (b·m, d)``, ``R (b·m, b·m)``, ``e (b·m,)``.

    A minibatch is one update at one linearisation point with block-diagonal R (docs/method.md §2d).
    """
    b, m = lin.yhat.shape
    R = lin.R[0] if b == 1 else numerics.block_diag(lin.R)
    if isinstance(lin.H, LayerRows):  # (the examples' ā as they are)
        H = lin.H._replace(deltas=tuple(a.reshape(b * m, a.shape[2]) for a in lin.H.deltas))
    else:
        H = lin.H.reshape(b * m, lin.H.shape[2])
    return H, R, lin.e.reshape(b * m)


def in_noise_units(lin: Linearization):
    """The same observations with unit noise: ``(lin', L)``, ``R_i = L_i L_iᵀ`` (``L (b, m, m)``)
    and ``lin'`` holding ``L_i⁻¹ H_i``, ``R' = I``, ``L_i⁻¹ e_i``.

    A change of coordinates of each ``T(y_i)``, exact where no pivot floor binds: every filter
    gives the same θ and ``P`` from ``lin'``, and ``S' = L⁻¹ S L⁻ᵀ = H' P⁻ H'ᵀ + I`` has no
    eigenvalue below 1. A confident classifier's ``R`` is singular to float32's precision (a
    class of probability 1e-7: docs/method.md §2d); an example's ``m × m`` factor, up to
    :data:`numerics.SMALL` outputs, is :func:`numerics.cholesky`'s with its pivot floor, which
    a minibatch's ``S`` of more than that many outputs, factored by LAPACK, does not have
    (beyond, ``R_i``'s own factor is LAPACK's too; :meth:`kalnat.families.Categorical.cov`
    raises its diagonal by a few units of rounding). ``ŷ`` and ``y`` are untouched; ``L`` takes
    ``H P⁻ Hᵀ``'s blocks (and the log-likelihood's determinant) back to the data's
    coordinates."""
    chol = jax.vmap(numerics.cholesky)(lin.R)
    solve = jax.vmap(numerics.solve_lower)  # L_i⁻¹ of each example's (m, …) rows
    if isinstance(lin.H, LayerRows):
        H = lin.H._replace(deltas=tuple(solve(chol, a) for a in lin.H.deltas))
    else:
        H = solve(chol, lin.H)
    eye = jnp.broadcast_to(jnp.eye(lin.R.shape[-1], dtype=lin.R.dtype), lin.R.shape)
    return lin._replace(H=H, R=eye, e=solve(chol, lin.e[..., None])[..., 0]), chol

