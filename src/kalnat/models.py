"""Models: pure JAX functions ``apply(params, x) -> z`` on a params pytree.

Any function of that form works with every learner (plain functions, Flax's ``module.apply``,
Equinox's ``eqx.combine`` wrappers); the learners flatten ``params`` with
``jax.flatten_util.ravel_pytree``. This module ships plain-JAX constructors for the two
models most streams start with: a linear predictor (a GLM, once paired with a family's
link) and a multilayer perceptron.

Shapes: ``x`` is one observation ``(p,)``; ``z`` is ``(n_outputs,)``. Learners ``vmap`` over
minibatches, so ``apply`` never sees a batch axis.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp

from kalnat.validation import positive_int

__all__ = ["Model", "linear", "mlp"]

Params = Any


def own_layer_rows(apply_tapped, apply) -> bool:
    """Whether ``apply_tapped`` is one of :func:`linear`'s or :func:`mlp`'s, paired with its
    own ``apply`` (a model whose ``apply`` was replaced, ``Model._replace(apply=…)``, is not):
    their layers are θ's, in θ's order (tested once, in tests/test_structured.py), so a
    learner does not check them as it checks a model's own."""
    if not isinstance(apply_tapped, (_LinearTapped, _MLPTapped)):
        return False
    own = apply_tapped.own_apply()
    return type(apply) is type(own) and own == apply  # (not a user object's own __eq__)


class Model(NamedTuple):
    """A model: ``init(key) -> params`` and ``apply(params, x) -> z``.

    Attributes:
      init: builds initial parameters from a PRNG key.
      apply: the pure prediction function on one observation.
      input_shape: shape of one ``x``.
      n_outputs: length of ``z``.
      apply_tapped: optional, for a model made of dense layers ``z_l = W_l a_l + b_l``
        (``W_l (n_out, n_in)``, its bias leaf before its weight leaf in ``ravel_pytree``'s
        order): ``apply_tapped(params, x, taps) -> (z, inputs)``, the same function with
        ``taps[l] (n_out,)`` added to layer ``l``'s ``z_l``, also returning the layers' inputs
        ``a_l (n_in,)``. Each layer's row of ``H`` is then ``δ_l āᵀ_l`` (``δ_l = ∂ŷ/∂taps_l``,
        ``ā_l = [a_l; 1]``), which the Kronecker form takes as it is, without forming ``H``
        (:func:`kalnat.linearization.linearize_layers`). A learner checks a model's own
        ``apply_tapped`` once against ``apply``'s Jacobian
        (:func:`kalnat.linearization.check_layer_rows`); :func:`linear`'s and :func:`mlp`'s
        are not checked.
    """

    init: Callable[[jax.Array], Params]
    apply: Callable[[Params, jax.Array], jax.Array]
    input_shape: tuple
    n_outputs: int
    apply_tapped: Optional[Callable] = None


# The constructors' functions are frozen dataclasses, not closures: two calls with equal
# arguments give equal (and equally hashed) functions, so learners built on equal models have
# equal program keys and share their traced and compiled programs (kalnat.programs.once), as
# learners built on one model object do. A closure is a new object on each call: a search that
# built kalnat.models.linear(p) again for each configuration traced each one's programs anew.


class _Function:
    """Immutable: a copy is the object itself, as a function's is (a deep copy of ``jnp.tanh``
    is another object, and a copied model would no longer share its programs)."""

    def __copy__(self):
        return self

    def __deepcopy__(self, memo):
        return self


@dataclasses.dataclass(frozen=True, eq=False)
class _ByIdentity(_Function):
    """An activation that cannot be hashed (a callable holding arrays), compared and hashed by
    identity, as a closure over it was: the model stays hashable (``jax.jit`` of its
    ``apply``), and its learners share programs with learners on that model object only."""

    fn: Callable

    def __call__(self, z):
        return self.fn(z)


@dataclasses.dataclass(frozen=True)
class _LinearInit(_Function):
    n_features: int
    n_outputs: int
    bias: bool
    dtype: Any

    def __call__(self, key=None):
        dt = self.dtype or jax.dtypes.canonicalize_dtype(float)
        params = {"w": jnp.zeros((self.n_outputs, self.n_features), dt)}
        if self.bias:
            params["b"] = jnp.zeros((self.n_outputs,), dt)
        return params


@dataclasses.dataclass(frozen=True)
class _LinearApply(_Function):
    bias: bool

    def __call__(self, params, x):
        z = params["w"] @ x
        return z + params["b"] if self.bias else z


@dataclasses.dataclass(frozen=True)
class _LinearTapped(_Function):
    def own_apply(self):
        return _LinearApply(True)

    def __call__(self, params, x, taps):
        return self.own_apply()(params, x) + taps[0], [x]


def linear(n_features: int, n_outputs: int = 1, *, bias: bool = True, dtype=None) -> Model:
    """A linear predictor ``z = W x + b``; with a family's link this is a GLM.

    Parameters start at zero, the usual (and, for a GLM, harmless) choice: the prior of the
    learner, not the initial value, carries the scale. Two calls with equal arguments give
    equal models (learners on them share their compiled programs).

    Args:
      n_features: p, the length of x.
      n_outputs: the family's ``n_outputs``.
      bias: include the intercept b.
    """
    n_features, n_outputs = positive_int(n_features, "n_features"), positive_int(n_outputs, "n_outputs")
    bias = bool(bias)
    return Model(_LinearInit(n_features, n_outputs, bias, dtype), _LinearApply(bias), (n_features,), n_outputs,
                 _LinearTapped() if bias else None)


@dataclasses.dataclass(frozen=True)
class _MLPInit(_Function):
    sizes: tuple
    dtype: Any

    def __call__(self, key):
        if key is None:  # linear's init takes None (its params are zeros); a network's hidden layers are random
            raise ValueError("mlp: init needs a random key for the hidden layers' weights, "
                             "e.g. model.init(jax.random.PRNGKey(0))")
        sizes = self.sizes
        dt = self.dtype or jax.dtypes.canonicalize_dtype(float)
        keys = jax.random.split(key, len(sizes) - 1)
        layers = []
        for i, (k, fan_in, fan_out) in enumerate(zip(keys, sizes[:-1], sizes[1:])):
            last = i == len(sizes) - 2
            w = jnp.zeros((fan_out, fan_in), dt) if last else (
                jax.random.normal(k, (fan_out, fan_in), dt) / jnp.sqrt(jnp.asarray(fan_in, dt))
            )
            layers.append({"w": w, "b": jnp.zeros((fan_out,), dt)})
        return layers


@dataclasses.dataclass(frozen=True)
class _MLPTapped(_Function):
    activation: Callable

    def own_apply(self):
        return _MLPApply(self.activation)

    def __call__(self, params, x, taps=None):
        h, inputs = x, []
        for i, layer in enumerate(params):
            inputs.append(h)
            z = layer["w"] @ h + layer["b"]
            z = z if taps is None else z + taps[i]
            h = z if i == len(params) - 1 else self.activation(z)
        return h, inputs


@dataclasses.dataclass(frozen=True)
class _MLPApply(_Function):
    activation: Callable

    def __call__(self, params, x):
        return _MLPTapped(self.activation)(params, x)[0]


def mlp(
    n_features: int,
    hidden: Sequence[int],
    n_outputs: int = 1,
    *,
    activation: Callable[[jax.Array], jax.Array] = jnp.tanh,
    dtype=None,
) -> Model:
    """A multilayer perceptron with LeCun-normal weights and zero biases.

    The last layer starts at zero, so the initial prediction is the family's neutral value
    (p = ½, μ = 0, λ = 1) while hidden units already differ — the filter's prior then decides
    how fast the readout moves. Two calls with equal arguments (the same ``activation``
    object) give equal models (learners on them share their compiled programs).

    Args:
      n_features: p, the length of x.
      hidden: widths of the hidden layers, e.g. ``(64, 32)``.
      n_outputs: the family's ``n_outputs``.
      activation: hidden-layer nonlinearity (smooth: the filter linearises through it).
    """
    n_features, n_outputs = positive_int(n_features, "n_features"), positive_int(n_outputs, "n_outputs")
    hidden = tuple(positive_int(h, f"hidden[{i}]") for i, h in enumerate(hidden))
    sizes = (n_features, *hidden, n_outputs)
    try:
        hash(activation)
    except TypeError:
        activation = _ByIdentity(activation)
    return Model(_MLPInit(sizes, dtype), _MLPApply(activation), (n_features,), n_outputs, _MLPTapped(activation))
