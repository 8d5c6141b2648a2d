"""Recurrent models: a transition ``f(params, s, x) -> s'`` and a readout ``g(params, s) -> z``.

docs/method.md §4 writes the model as ``s_t = f(s_{t−1}, θ, x_t)``, ``ŷ_t = g(s_t, θ)``; here both
functions take the params pytree first, like every ``apply`` in :mod:`kalnat.models`, and the
family's link turns the raw output ``z`` into ``ŷ``. Any pair of pure JAX functions works
(:func:`recurrent_model`); :func:`elman` and :func:`gru` ship the two classic cells with a
linear readout.

Shapes, for one sequence: ``s`` is ``(n,)``, ``x`` is ``input_shape`` (``(p,)`` for the shipped
cells), ``z`` is ``(n_outputs,)``. The learners ``vmap`` over a batch of sequences, so the cell
never sees a batch axis.
"""

from __future__ import annotations

import numbers
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp

from kalnat.validation import positive_int

__all__ = ["RecurrentModel", "recurrent_model", "elman", "gru"]

Params = Any


class RecurrentModel(NamedTuple):
    """A recurrent model (docs/method.md §4).

    Attributes:
      init: ``key -> params`` (any pytree of float arrays).
      transition: ``f(params, s (n,), x) -> s' (n,)``.
      readout: ``g(params, s (n,)) -> z (n_outputs,)``, the raw output fed to the family.
      n_state: n, the length of the hidden state.
      input_shape: shape of one ``x``.
      n_outputs: length of ``z``.
      init_state: ``params -> s_0 (n,)``, the state before the first input (zeros by
        default). ``s_0`` is not learned: with ``G_0 = 0`` the theorem's factored prior holds.
    """

    init: Callable[[jax.Array], Params]
    transition: Callable[[Params, jax.Array, jax.Array], jax.Array]
    readout: Callable[[Params, jax.Array], jax.Array]
    n_state: int
    input_shape: tuple
    n_outputs: int
    init_state: Callable[[Params], jax.Array]


def _zeros_state(n):
    def init_state(params):
        dtype = jax.tree_util.tree_leaves(params)[0].dtype
        return jnp.zeros((n,), dtype)

    return init_state


def recurrent_model(transition, readout, *, n_state: int, input_shape, n_outputs: int,
                    init: Optional[Callable] = None, init_state: Optional[Callable] = None
                    ) -> RecurrentModel:
    """Wraps a user-defined pair ``f(params, s, x) -> s'``, ``g(params, s) -> z``.

    Args:
      transition: ``f(params, s, x) -> s'``, a pure JAX function on one sequence (no batch axis).
      readout: ``g(params, s) -> z``, likewise.
      n_state: n.
      input_shape: shape of one ``x``, a tuple of non-negative integers (``(p,)`` for a vector
        input; a bare ``p`` is refused).
      n_outputs: length of ``z`` (the family's ``n_outputs``).
      init: optional ``key -> params``; without it pass params to the learner's ``init``.
      init_state: optional ``params -> s_0``; zeros by default.
    """
    n_state, n_outputs = positive_int(n_state, "n_state"), positive_int(n_outputs, "n_outputs")
    input_shape = _shape(input_shape, "input_shape")
    if not callable(transition) or not callable(readout):
        raise ValueError("transition and readout must be functions")
    if init is None:
        def init(key=None):
            raise ValueError("this recurrent model has no init: pass params to the learner's init")
    return RecurrentModel(init, transition, readout, int(n_state), input_shape,
                          int(n_outputs), init_state or _zeros_state(int(n_state)))


def _shape(shape, what):
    """``shape`` as a tuple of non-negative ints, or a ``ValueError`` naming ``what`` (an int,
    a float or a negative entry would only fail later, inside JAX)."""
    if not isinstance(shape, (tuple, list)):
        raise ValueError(f"{what} must be a tuple of non-negative integers ((p,) for a vector of p), "
                         f"got {shape!r}")
    for a in shape:
        if not isinstance(a, numbers.Integral) or isinstance(a, bool) or a < 0:
            raise ValueError(f"{what} must be a tuple of non-negative integers, got {tuple(shape)!r}")
    return tuple(int(a) for a in shape)


def _dense(key, fan_out, fan_in, dtype):
    return jax.random.normal(key, (fan_out, fan_in), dtype) / jnp.sqrt(jnp.asarray(fan_in, dtype))


def _orthogonal(key, n, dtype, scale):
    # A scaled orthogonal matrix: the linearised recurrence starts neither exploding nor vanishing.
    q, r = jnp.linalg.qr(jax.random.normal(key, (n, n), dtype))
    return scale * q * jnp.sign(jnp.diag(r))


def elman(n_inputs: int, n_state: int, n_outputs: int = 1, *, recurrent_scale: float = 0.9,
          dtype=None) -> RecurrentModel:
    """Elman cell ``s' = tanh(W s + U x + b)`` with linear readout ``z = V s + c``.

    ``W`` starts as an orthogonal matrix times ``recurrent_scale`` (< 1 keeps the linearised
    recurrence contracting), ``U`` LeCun-normal, biases and the readout at zero so the first
    prediction is the family's neutral value (as :func:`kalnat.models.mlp` does).
    d = n² + n p + n + k n + k parameters for n states, p inputs and k outputs.
    """
    n_inputs, n_state, n_outputs = (positive_int(n_inputs, "n_inputs"), positive_int(n_state, "n_state"),
                                    positive_int(n_outputs, "n_outputs"))

    def init(key):
        dt = dtype or jax.dtypes.canonicalize_dtype(float)
        kw, ku = jax.random.split(key)
        return {
            "W": _orthogonal(kw, n_state, dt, recurrent_scale),
            "U": _dense(ku, n_state, n_inputs, dt),
            "b": jnp.zeros((n_state,), dt),
            "V": jnp.zeros((n_outputs, n_state), dt),
            "c": jnp.zeros((n_outputs,), dt),
        }

    def transition(params, s, x):
        return jnp.tanh(params["W"] @ s + params["U"] @ x + params["b"])

    def readout(params, s):
        return params["V"] @ s + params["c"]

    return RecurrentModel(init, transition, readout, n_state, (n_inputs,), n_outputs,
                          _zeros_state(n_state))


def gru(n_inputs: int, n_state: int, n_outputs: int = 1, *, dtype=None) -> RecurrentModel:
    """Gated recurrent unit with linear readout ``z = V s + c``.

    ``u = σ(W_u x + U_u s + b_u)``, ``r = σ(W_r x + U_r s + b_r)``,
    ``h = tanh(W_h x + U_h (r ⊙ s) + b_h)``, ``s' = (1 − u) ⊙ s + u ⊙ h``.
    d = 3(n p + n² + n) + k n + k parameters.
    """
    n_inputs, n_state, n_outputs = (positive_int(n_inputs, "n_inputs"), positive_int(n_state, "n_state"),
                                    positive_int(n_outputs, "n_outputs"))

    def init(key):
        dt = dtype or jax.dtypes.canonicalize_dtype(float)
        keys = jax.random.split(key, 6)
        params = {}
        for i, gate in enumerate("urh"):
            params[f"W{gate}"] = _dense(keys[2 * i], n_state, n_inputs, dt)
            params[f"U{gate}"] = _orthogonal(keys[2 * i + 1], n_state, dt, 1.0)
            params[f"b{gate}"] = jnp.zeros((n_state,), dt)
        params["V"] = jnp.zeros((n_outputs, n_state), dt)
        params["c"] = jnp.zeros((n_outputs,), dt)
        return params

    def transition(p, s, x):
        u = jax.nn.sigmoid(p["Wu"] @ x + p["Uu"] @ s + p["bu"])
        r = jax.nn.sigmoid(p["Wr"] @ x + p["Ur"] @ s + p["br"])
        h = jnp.tanh(p["Wh"] @ x + p["Uh"] @ (r * s) + p["bh"])
        return (1.0 - u) * s + u * h

    def readout(p, s):
        return p["V"] @ s + p["c"]

    return RecurrentModel(init, transition, readout, n_state, (n_inputs,), n_outputs,
                          _zeros_state(n_state))
