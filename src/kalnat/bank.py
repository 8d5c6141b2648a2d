"""A bank of filters mixed by their evidence: self-tuning prior scale and forgetting.

K configurations of one learner (prior scale, forgetting factor, linearisations, …) are K
stacked hyperparameter pytrees (:class:`kalnat.filter.Hyper`): the bank's step is ``jax.vmap``
of the learner's own step over (hyperparameters, state), inside one jitted step, so
``kalnat.fit`` scans all of them at once and any learner can be a member. Their
predictions are combined by Bayesian model averaging over the configurations: with a
uniform prior over the K members, the weight of member k after t rows is proportional to
its evidence, the product of its one-step predictive probabilities
``Π_s p_k(y_s | y_<s)``, the log-likelihoods its condition step returns
(:func:`kalnat.filter.condition`, from the prior). For a linear-Gaussian model each member's
evidence is its exact marginal likelihood under its λ, q and bound, so the weights are the
exact posterior over configurations.

The bank's own predictive probability of a row is ``Σ_k w_k p_k(y)``, hence its cumulative
log-loss is ``−log Σ_k (1/K) Π_t p_k(y_t)``, never above the best member's plus ``log K``.

An optional fixed-share rate α (Herbster & Warmuth 1998, "Tracking the best expert") mixes
``α/K`` of uniform weight back in after each row, ``w ← (1 − α) w + α/K``: the mixture can
then move to a member that forgets faster when the stream drifts, at a cost of at most
``−log(1 − α)`` per row plus ``log(K/α)`` per switch.

    >>> bank = kalnat.ekf_bank(model, kalnat.families.Bernoulli())      # doctest: +SKIP
    >>> bank = kalnat.bank.bank(kalnat.ekf(model, fam), [dict(prior_var=v) for v in (0.1, 1, 10)])  # doctest: +SKIP
    >>> result = kalnat.fit(bank, bank.init(model.init(None)), X, y)     # doctest: +SKIP
    >>> kalnat.bank.weights(result.state)                               # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from jax.flatten_util import ravel_pytree

from kalnat import filter as _filter
from kalnat import saved
from kalnat.filter import Hyper, Predictive
from kalnat.learners.base import Boundary, Learner, check_hyper, check_live, check_params, forgetting_is_data

__all__ = [
    "Bank", "BankState", "BankPredictive", "bank", "ekf_bank", "auto", "weights",
    "DEFAULT_PRIOR_VARS", "DEFAULT_FORGETTINGS", "DEFAULT_SHARE", "MAX_VARIANCE_PER_PRIOR",
    "default_max_variance",
]

DEFAULT_PRIOR_VARS = (0.01, 0.1, 1.0, 10.0)
# 0.95 and 0.9 (memories of ~20 and ~10 rows) are what a drifting stream needs
# (trump_approval in the given order, measured with kalnat 0.1: RMSE 0.62 with λ ≥ 0.99, 0.43
# with 0.95, 0.36 with 0.9; 0.358 with the predictive from the prior); the static sets lose
# ≤ 0.0005 of log-loss per row.
DEFAULT_FORGETTINGS = (1.0, 0.998, 0.99, 0.95, 0.9)
# Each member's max_variance is this multiple of its prior variance. Any bound stops the
# wind-up of forgetting members; one at the prior itself (1) binds too often where the
# command's re-expression leaves a weakly informed coordinate above the prior (breast_cancer:
# 0.1356 against 0.1245 unbounded), 10–10⁴ score as unbounded (within ±0.006).
MAX_VARIANCE_PER_PRIOR = 100.0
DEFAULT_SHARE = 1e-3
# The prior weight of the forgetting members (λ < 1) together in the default bank for a
# gaussian target (auto): on a stream with no drift, λ = 1 and λ = 0.998 predict almost alike
# and their evidence differs by a few nats either way over 1000 rows, so a uniform prior left
# most of the weight on members that forget; a drift gives its members many nats per row and
# moves the weight within a few rows all the same (tests/test_regression_default.py).
GAUSSIAN_FORGETTING_MASS = 0.05


class BankState(NamedTuple):
    """State of a bank of K members.

    Attributes:
      members: the members' states, every leaf stacked on a leading ``K`` axis.
      log_weights: ``(K,)`` normalised log weights for the next prediction.
      log_evidence: ``(K,)`` each member's cumulative log predictive likelihood.
      log_marginal: ``()`` the bank's cumulative log predictive likelihood (its −log-loss).
      count: number of updates.
    """

    members: Any
    log_weights: jax.Array
    log_evidence: jax.Array
    log_marginal: jax.Array
    count: jax.Array

    @property
    def params(self):
        """The members' parameters, stacked on the leading ``K`` axis."""
        return self.members.params


class BankPredictive(NamedTuple):
    """The mixture's predictive (moments of the mixture) and the weights it used.

    ``mean``, ``mean_cov``, ``obs_cov``, ``probs`` as in :class:`~kalnat.Predictive` (the
    covariances include the spread of the members' means); ``weights`` ``(b, K)`` are the
    weights of the members when the row was predicted; ``log_prob`` ``(b,)`` the mixture's
    predictive log-likelihood of each row (zero when no ``y`` was given).
    """

    mean: jax.Array
    mean_cov: jax.Array
    obs_cov: jax.Array
    probs: Optional[jax.Array]
    weights: jax.Array
    log_prob: jax.Array


def weights(state: BankState) -> np.ndarray:
    """Normalised weights ``(K,)`` of the members."""
    return np.exp(np.asarray(state.log_weights))


@dataclass(frozen=True, eq=False)
class Bank(Boundary):
    """K configurations of one learner run as one ``vmap``, mixed by evidence (:func:`bank`).

    Attributes:
      learner: the members' learner.
      hyper: the members' hyperparameters, every leaf stacked on a leading ``K`` axis.
      configs: the configurations, one dict per member.
      share: the fixed-share rate α.
      name: the bank's name.
    """

    learner: Learner
    hyper: Hyper
    configs: tuple = ()
    share: float = 0.0
    name: str = "bank"
    # log prior weights of the members, normalised (None: uniform); also what the fixed share
    # mixes back in
    log_prior: Optional[tuple] = None

    @property
    def size(self) -> int:
        return len(self.configs)

    @property
    def family(self):
        return self.learner.family

    @property
    def apply(self):
        return self.learner.apply

    @property
    def input_shape(self):
        return self.learner.input_shape

    @property
    def moderated(self) -> bool:
        return self.learner.moderated

    def program_key(self):
        """What the bank's compiled programs depend on besides their arguments
        (:func:`kalnat.programs.once`): its members' learner's key, its size, fixed share, prior
        weights and name, and the members' counts of linearisations where they group the
        members (:meth:`by_iterations`); the members' hyperparameters are an argument of every
        program. Equal banks share their programs, as learners do (:meth:`Learner.program_key`):
        ``kalnat.ekf_bank(model, family)`` built again, with another grid of as many prior
        variances or forgetting factors, is neither traced nor compiled again while an equal
        bank lives.
        ``None`` (nothing shared) where the learner's key is ``None``, for a bank whose programs
        are saved across processes (:func:`kalnat.saved.describe`), or whose share, prior or
        name is not made of plain values."""
        inner = self.learner.program_key()
        if inner is None or saved.described(self) or not _filter._by_value((self.share, self.name, self.log_prior)):
            return None
        counts = None if self.by_iterations() is None else \
            tuple(int(c) for c in np.asarray(self.hyper.iterations).reshape(-1))
        return (type(self), inner, self.size, self.share, self.name, self.log_prior, counts)

    def member_hyper(self, k: int, hyper: Optional[Hyper] = None) -> Hyper:
        """Member k's hyperparameters (of ``hyper``, stacked; default the bank's own)."""
        return jax.tree_util.tree_map(lambda a: np.asarray(a)[k], self.hyper if hyper is None else hyper)

    def check_given_hyper(self, hyper, state):
        if hyper is not None:
            d = ravel_pytree(self.member_state(state, 0).params)[0].shape[0]
            for k in range(self.size):
                check_hyper(self.learner, self.member_hyper(k, hyper), d)
            given, own = getattr(hyper, "iterations", None), self.hyper.iterations
            if self.by_iterations() is not None and not np.array_equal(np.asarray(given), np.asarray(own)):
                raise ValueError(f"{self.name}: the members' iterations are the bank's own ({np.asarray(own).tolist()}); "
                                 f"given hyperparameters have {np.asarray(given).tolist()} (a bank of other counts "
                                 "is another bank: kalnat.bank.bank)")

    def by_iterations(self):
        """``((members (n,), count), …)``: the members by how many linearisations each is
        configured for, when the learner has more than one (else ``None``); one group when
        they all have the same count. Their steps run apart, each built for its own count:
        in one vectorised step a member of fewer would run every one the step is built for
        (``vmap`` turns the filter's ``lax.cond`` into a select of both)."""
        counts = getattr(self.hyper, "iterations", None)
        if counts is None or getattr(self.learner, "max_iterations", 1) == 1:
            return None
        counts = np.asarray(counts).reshape(-1)
        if counts.size != self.size:
            return None
        return tuple((np.flatnonzero(counts == c), int(c)) for c in sorted(set(counts.tolist())))

    def _over_counts(self, run, hyper, members, vectorised):
        """``run(learner, hyper, members, count)`` of every member, stacked in the bank's order:
        over the members of each count (:meth:`by_iterations`) apart, with the learner built
        for that count and the count itself, where members run ``vectorised`` or the
        linearisations share work (a full covariance given a linear model's layer, whose
        product of ``P⁻`` with the inputs serves every linearisation:
        :meth:`~kalnat.representations.full.PriorCovariance.times_rows`); else all at once,
        with ``count`` ``None``. ``count`` is a Python int, which the members' steps take as
        their ``hyper.iterations``: the filter's ``lax.cond`` over each linearisation then has
        a constant predicate, XLA drops it, and computes the shared product once."""
        rep = self.learner.representation
        shares = rep.layer_rows and not rep.branches  # (the Kronecker form has its own factors)
        groups = self.by_iterations() if vectorised or shares else None
        if groups is None:
            return run(self.learner, hyper, members, None)
        if len(groups) == 1:  # (no copies of the states in and out)
            count = groups[0][1]
            return run(dataclasses.replace(self.learner, max_iterations=count), hyper, members, count)
        outs = [run(dataclasses.replace(self.learner, max_iterations=count),
                    *jax.tree_util.tree_map(lambda a: a[idx], (hyper, members)), count)
                for idx, count in groups]
        order = np.argsort(np.concatenate([idx for idx, _ in groups]), kind="stable")
        return jax.tree_util.tree_map(lambda *a: jnp.concatenate(a)[order], *outs)

    def init(self, params, hyper: Optional[Hyper] = None) -> BankState:
        """Every member's initial state around ``params``, uniform weights."""
        d, dtype = check_params(params)
        hyper = self.hyper if hyper is None else hyper
        for k in range(self.size):
            check_hyper(self.learner, self.member_hyper(k, hyper), d)
        if hasattr(self.learner, "check_outputs"):
            self.learner.check_outputs(params)
        self.learner.check_layer_rows(params)
        members = _filter.fresh(self.learner, hyper, params, stacked=True)
        K = self.size
        lw = np.full((K,), -np.log(K)) if self.log_prior is None else np.asarray(self.log_prior)
        # from the host as they are: each jnp constructor would be a program of its own
        return BankState(members, *jax.device_put((lw.astype(dtype), np.zeros((K,), dtype), np.zeros((), dtype),
                                                   np.zeros((), np.int32))))

    def _mix(self, lw, preds, log_prob, ok):
        """Mixture of the members' ``(K, b, …)`` predictions under normalised log weights
        ``lw (K,)`` (``−∞`` for the members not ``ok``, whose predictions are left out).

        A member whose predictive variance of a row is not positive (a covariance that lost
        positive definiteness, as the EKF's can in float32 on unscaled inputs) is left out of
        that row's mixture too, the others' weights renormalised for the row, so that one such
        member does not make the bank's prediction unusable; where no member's is positive the
        row is mixed as it is (its variance then tells). The weights themselves and the evidence
        are not changed by it."""
        keep = lambda a: None if a is None else jnp.where(ok.reshape((-1,) + (1,) * (a.ndim - 1)), a, 0.0)  # noqa: E731
        preds = jax.tree_util.tree_map(keep, preds)
        sound = ok[:, None] & jnp.all(jnp.diagonal(preds.obs_cov, axis1=-2, axis2=-1) > 0, axis=-1)   # (K, b)
        sound = jnp.where(jnp.any(sound, axis=0), sound, ok[:, None])
        lwr = jnp.where(sound, lw[:, None], -jnp.inf)
        w = jnp.exp(lwr - jax.scipy.special.logsumexp(lwr, axis=0))                            # (K, b)
        mean = jnp.einsum("kb,kbm->bm", w, preds.mean)
        d = preds.mean - mean[None]
        spread = jnp.einsum("kb,kbi,kbj->bij", w, d, d)
        mean_cov = jnp.einsum("kb,kbij->bij", w, preds.mean_cov) + spread
        obs_cov = jnp.einsum("kb,kbij->bij", w, preds.obs_cov) + spread
        mixed = None if preds.probs is None else jnp.einsum("kb,kbc->bc", w, preds.probs)
        return BankPredictive(mean, mean_cov, obs_cov, mixed, w.T, log_prob)

    def _advance(self, state: BankState, members, preds, ll, finite):
        """The weights moved by one minibatch: ``ll (K, b)`` the members' log-likelihoods,
        ``finite (K,)`` whether their predictions were finite, ``preds`` their ``(K, b, …)``
        predictions (``None``: no mixture prediction wanted). Returns ``(BankState,
        BankPredictive or None, log_prob (b,))``."""
        # A member whose prediction is not finite (a forgetting filter's covariance can wind
        # up) is out of the bank from then on: evidence −∞, weight 0, no fixed share.
        ok = jnp.isfinite(state.log_evidence) & finite
        lw = jnp.where(ok, state.log_weights, -jnp.inf)
        lw = lw - jax.scipy.special.logsumexp(lw)  # the weights the row is predicted with
        row_ll = jnp.where(ok[:, None], ll, -jnp.inf)
        log_prob = jax.scipy.special.logsumexp(lw[:, None] + row_ll, axis=0)
        pred = None if preds is None else self._mix(lw, preds, log_prob, ok)
        lw = lw + jnp.sum(row_ll, axis=1)
        marginal = jax.scipy.special.logsumexp(lw)
        lw = lw - marginal
        if self.share > 0 and self.log_prior is None:
            alive = jnp.sum(ok)
            lw = jnp.where(ok, jnp.logaddexp(jnp.log1p(-self.share) + lw, jnp.log(self.share / alive)), -jnp.inf)
        elif self.share > 0:  # mixed back in as the prior, over the members still alive
            lp = jnp.where(ok, jnp.asarray(self.log_prior, lw.dtype), -jnp.inf)
            lp = lp - jax.scipy.special.logsumexp(lp)
            lw = jnp.where(ok, jnp.logaddexp(jnp.log1p(-self.share) + lw, jnp.log(self.share) + lp), -jnp.inf)
        evidence = state.log_evidence + jnp.where(ok, jnp.sum(ll, axis=1), -jnp.inf)
        new = BankState(members, lw, evidence, state.log_marginal + marginal, state.count + 1)
        return new, pred, log_prob

    def step(self, hyper, state: BankState, xs, ys, mask=None):
        """All members predict then learn the minibatch; the weights move by its likelihood.
        Returns ``(BankState, BankPredictive, log_prob (b,))``."""
        # (all members in one vmap, whatever their counts of linearisations: run apart, as a
        # chunk's are, the copies out and back cost a row more than the linearisations saved,
        # and the donated members could not be updated in place)
        members, preds, ll = self._over_members(lambda h, s: self.learner.step(h, s, xs, ys, mask), hyper,
                                                state.members, xs.shape[0])
        return self._advance(state, members, preds, ll, jax.vmap(_all_finite)(preds, ll))

    def scan_chunk(self, hyper, state: BankState, xs, ys, ms, keep: bool = True):
        """:func:`kalnat.fit`'s chunk, member by member: the members do not depend on the
        weights, so each runs through the whole chunk while its covariance stays in the cache
        (row by row, all K covariances would be read from memory at every row), in vmapped
        groups of :func:`members_per_group` (the members of each count of linearisations
        apart: :meth:`by_iterations`); then the weights move row by row. ``hyper.iterations``
        must be the bank's own (the groups are built from them; :func:`kalnat.fit` checks a
        given ``hyper``)."""
        from kalnat.stream import first_nan, scan_rows, step_or_skip

        def members_of(learner, hyper, members, count):
            def member(args):
                h, s = args
                h = h if count is None else h._replace(iterations=count)  # (_over_counts says why)
                s, (pred, ll) = scan_rows(learner, h, s, xs, ys, ms)
                return s, ((pred if keep else None), ll, jax.vmap(_all_finite)(pred, ll))

            # One member at a time: a plain loop (lax.map's batches of one are still vmapped,
            # which turns each member's own conds, such as its count of linearisations, into
            # selects).
            n = jax.tree_util.tree_leaves(members)[0].shape[0]
            return jax.lax.map(member, (hyper, members), batch_size=None if group == 1 else min(group, n))

        group = members_per_group(state.members, self.size, self.learner, xs.shape[1])
        members, (preds, lls, fins) = self._over_counts(members_of, hyper, state.members, group > 1)
        swap = lambda a: None if a is None else jnp.swapaxes(a, 0, 1)  # noqa: E731  (K, c, …) -> (c, K, …)

        def mix(weights, inp):
            pred_k, ll_k, fin_k, mb = inp

            def learn(w):
                w, pred, lp = self._advance(w, None, pred_k, ll_k, fin_k)
                return w, (pred, lp)

            # a minibatch that is all padding: no step for the members either
            w, out = step_or_skip(jnp.any(mb), learn, weights)
            return w, (out if keep else jnp.isnan(out[1]) & mb)

        weights, out = jax.lax.scan(mix, state._replace(members=None),
                                    (jax.tree_util.tree_map(swap, preds), swap(lls), swap(fins), ms))
        # without predictions, the chunk's first row whose mixture log-likelihood is NaN (every
        # member out), as scan_rows gives it: kalnat.fit raises Diverged from it
        return weights._replace(members=members), (out if keep else first_nan(out))

    def predict_batch(self, hyper, state: BankState, xs):
        preds = self.members_predict_batch(hyper, state, xs)
        ok = (jnp.isfinite(state.log_weights) & _finite(preds.mean) & _finite(preds.mean_cov)
              & _finite(preds.obs_cov))
        lw = jnp.where(ok, state.log_weights, -jnp.inf)
        lw = lw - jax.scipy.special.logsumexp(lw)
        return self._mix(lw, preds, jnp.zeros(preds.mean.shape[1], preds.mean.dtype), ok)

    def members_predict_batch(self, hyper, state: BankState, xs) -> Predictive:
        """Each member's own prediction, stacked ``(K, b, …)``."""
        return self._over_members(lambda h, s: self.learner.predict_batch(h, s, xs), hyper, state.members,
                                  xs.shape[0])

    def _over_members(self, f, hyper, members, examples):
        """``f(h, s)`` of every member, stacked: vectorised, or one member at a time when the
        learner's step on ``examples`` rows branches on the data (a ``lax.cond`` under ``vmap``
        runs both branches; alone, only the one taken)."""
        if _branches(self.learner, examples):
            return jax.lax.map(lambda hs: f(*hs), (hyper, members))
        return jax.vmap(f)(hyper, members)

    def member_state(self, state: BankState, k: int):
        """Member k's state, as ``self.learner`` with ``self.member_hyper(k)`` would hold it."""
        return jax.tree_util.tree_map(lambda a: a[k], state.members)

    # ---- validation -------------------------------------------------------------------

    @staticmethod
    def _dtype(state):
        return jax.tree_util.tree_leaves(state.members.params)[0].dtype

    def _check_state(self, state):
        if not isinstance(state, BankState):
            raise ValueError(f"{self.name}: expected a BankState, got {type(state).__name__}")
        check_live(state, self.name)

    def check_x(self, state, x):
        # The member's parameters as shapes: all the check reads (slicing the device arrays
        # would cost more than the update of a small model).
        return self.learner.check_x(state.members._replace(params=member_shapes(state.members.params)), x)


def member_shapes(tree):
    """One member's shapes and dtypes (``jax.ShapeDtypeStruct`` leaves) of a tree whose leaves
    stack the members on their first axis: for what reads shapes alone, where ``a[0]`` of each
    leaf would be an eager slice on the device (a program compiled per shape)."""
    return jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape[1:], a.dtype), tree)


def _finite(a):
    """``(K,)``: whether each member's slice of ``a (K, …)`` is finite."""
    return jnp.all(jnp.isfinite(a).reshape(a.shape[0], -1), axis=1)


def _all_finite(pred, ll):
    """Whether one member's prediction of a minibatch (and its log-likelihoods) is finite."""
    parts = [ll, pred.mean, pred.mean_cov, pred.obs_cov]
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(a)) for a in parts]))


# Members run through a chunk in vmapped groups whose states together take at most this many
# bytes: small enough for the cache (a group then reads its covariances once per chunk, not
# once per row), large enough that small members still share one vectorised loop.
GROUP_BYTES = 2**21


def _branches(learner, examples) -> bool:
    """Whether ``learner``'s step on ``examples`` rows branches on the data
    (:meth:`~kalnat.learners.base.Learner.branches_on`; ``Representation.branches`` for a
    learner without it)."""
    if hasattr(learner, "branches_on"):
        return learner.branches_on(examples)
    return bool(getattr(getattr(learner, "representation", None), "branches", False))


def members_per_group(members, K: int, learner=None, examples: int = 0) -> int:
    """How many members :meth:`Bank.scan_chunk` advances together: from their states' sizes,
    and one at a time when ``learner``'s step on minibatches of ``examples`` rows branches on
    the data (a ``lax.cond`` under ``vmap`` runs both branches; alone, only the one taken)."""
    if _branches(learner, examples):
        return 1
    per = sum(a.size * a.dtype.itemsize for a in jax.tree_util.tree_leaves(members)) // max(K, 1)
    return int(max(1, min(K, GROUP_BYTES // max(per, 1))))


def bank(learner: Learner, configs: Sequence[dict], *, share: float = 0.0, name: str = "bank",
         prior: Optional[Sequence[float]] = None) -> Bank:
    """A bank of ``K = len(configs)`` configurations of ``learner`` mixed by their evidence.

    Args:
      learner: any core learner (:func:`kalnat.ekf`, :func:`kalnat.sqrt_ekf`,
        :func:`kalnat.iterated_ekf`, :func:`kalnat.nig_filter`, …).
      configs: one dict per member of hyperparameters (fields of
        :class:`~kalnat.filter.Hyper`: ``prior_var``, ``forgetting``, ``max_variance``,
        ``iterations``, …; the same keys in each), over the learner's own defaults.
      share: fixed-share rate α in [0, 1): after each update ``w ← (1 − α) w + α/K``.
      prior: ``(K,)`` positive prior weights of the members (normalised here; default
        uniform): the weights start there, and the fixed share mixes them back in,
        ``w ← (1 − α) w + α π``.

    Returns:
      A :class:`Bank`, which runs under :func:`kalnat.fit` like any learner; its predictions
      are :class:`BankPredictive`.
    """
    if not isinstance(learner, Learner):
        raise ValueError(f"bank: learner must be a kalnat core learner, got {type(learner).__name__}")
    configs = tuple(dict(cfg) for cfg in configs)
    if not configs:
        raise ValueError("bank: at least one configuration is needed")
    keys = set(configs[0])
    if any(set(c) != keys for c in configs):
        raise ValueError("bank: every configuration must have the same hyperparameter names")
    unknown = keys - set(Hyper._fields)
    if unknown:
        raise ValueError(f"bank: unknown hyperparameters {sorted(unknown)}; expected some of {Hyper._fields}")
    if not 0.0 <= float(share) < 1.0:
        raise ValueError(f"bank: share must lie in [0, 1), got {share}")
    if "forgetting" in keys and not forgetting_is_data(learner):
        raise ValueError("bank: the learner forgets on a fixed schedule of t (a forgetting function, or a "
                         "natural-gradient rate other than the Kalman one); varying forgetting would do nothing")
    members = [learner.hyper._replace(**cfg) for cfg in configs]
    for h in members:
        if "forgetting" in keys and not 0.0 < float(h.forgetting) <= 1.0:
            raise ValueError(f"forgetting must lie in (0, 1], got {h.forgetting}")
        if h.iterations != int(h.iterations) or not 1 <= int(h.iterations) <= learner.max_iterations:
            raise ValueError(f"iterations must be positive integers up to the learner's "
                             f"{learner.max_iterations}, got {h.iterations}")
    log_prior = None
    if prior is not None:
        pr = np.asarray(prior, np.float64)
        if pr.shape != (len(configs),) or not np.all(np.isfinite(pr) & (pr > 0)):
            raise ValueError(f"bank: prior must hold {len(configs)} positive weights, got {prior!r}")
        log_prior = tuple(float(v) for v in np.log(pr / pr.sum()))
    stacked = jax.tree_util.tree_map(lambda *a: np.stack([np.asarray(v) for v in a]), *members)
    return Bank(learner, stacked, configs, float(share), name, log_prior)


def default_max_variance(prior_var: float) -> float:
    """The variance bound of a bank member (and of the command's forgetting filters):
    :data:`MAX_VARIANCE_PER_PRIOR` times its prior variance."""
    return MAX_VARIANCE_PER_PRIOR * float(prior_var)


def ekf_bank(model, family, *, prior_vars: Sequence[float] = DEFAULT_PRIOR_VARS,
             forgettings: Sequence[float] = DEFAULT_FORGETTINGS, iterations=1,
             share: float = DEFAULT_SHARE, moderated: bool = False,
             max_variance: Union[None, float, Callable[[float], float]] = default_max_variance, input_shape=None,
             learner: Optional[str] = None, representation=None,
             forgetting_mass: Optional[float] = None) -> Bank:
    """The grid ``prior_vars × forgettings`` of EKFs (or iterated EKFs, or normal–inverse-gamma
    filters for a Gaussian family with unknown noise when ``learner="nig"``) as one bank.

    ``iterations``: linearisations per update (:func:`kalnat.iterated_ekf`), or a sequence of
    such counts, a third axis of the grid (``hyper.iterations``: the step is built for the
    largest count and each member uses its own; :func:`kalnat.fit` runs the members of each
    count apart, :meth:`Bank.by_iterations`).

    ``max_variance``: the members' bound on every variance of ``P⁻``, as :func:`kalnat.ekf`'s
    (a variance): one value for all, or a function of a member's prior variance (default
    :func:`default_max_variance`, 100 × it). Without a bound a forgetting member winds up along
    any direction the data never excite (a feature constant so far) until its covariance
    overflows and it leaves the bank. ``None``: the exact filters.

    ``forgetting_mass``: the prior weight of all members with λ < 1 together (the rest goes
    to λ = 1; uniform within each group), also what the fixed share returns to them. ``None``:
    every member the same prior weight.
    """
    from kalnat.learners.ekf import ekf
    from kalnat.learners.iterated import iterated_ekf
    from kalnat.learners.nig import nig_filter

    for f in forgettings:
        if not 0.0 < float(f) <= 1.0:
            raise ValueError(f"forgetting must lie in (0, 1], got {f}")
    for v in prior_vars:
        if not float(v) > 0.0:
            raise ValueError(f"prior_var must be positive, got {v}")
    kind = learner or "ekf"
    counts = tuple(int(i) for i in np.atleast_1d(iterations))
    if any(i < 1 for i in counts) or any(i != j for i, j in zip(counts, np.atleast_1d(iterations))):
        raise ValueError(f"iterations must be positive integers, got {iterations}")

    bound_of = max_variance if callable(max_variance) else (lambda v: max_variance)
    for v in prior_vars:
        b = bound_of(v)
        if b is not None and not float(b) > 0:
            raise ValueError(f"max_variance must be positive or None, got {b} (prior_var {v})")

    top = max(counts)
    if top > 1:
        representation = _shared_inputs(model, family, representation)
    rep = dict(representation=representation)
    if kind == "nig":
        base = nig_filter(model, family, iterations=top, input_shape=input_shape, **rep)
    elif kind in ("ekf", "iterated"):
        base = iterated_ekf(model, family, iterations=top, input_shape=input_shape, **rep) if top > 1 else \
            ekf(model, family, input_shape=input_shape, **rep)
    else:
        raise ValueError(f"unknown learner {kind!r}; expected 'ekf', 'iterated' or 'nig'")
    base = dataclasses.replace(base, moderated=bool(moderated))
    configs = []
    for v, f, i in itertools.product(prior_vars, forgettings, counts):
        cfg = dict(prior_var=float(v), forgetting=float(f))
        if len(counts) > 1:
            cfg["iterations"] = i
        if max_variance is not None:
            cfg["max_variance"] = float(bound_of(v))
        configs.append(cfg)
    prior = None
    if forgetting_mass is not None:
        fast = np.array([c["forgetting"] < 1.0 for c in configs])
        if not 0.0 < float(forgetting_mass) < 1.0 or fast.all() or not fast.any():
            raise ValueError(f"forgetting_mass must lie in (0, 1) with λ = 1 and λ < 1 members in the "
                             f"grid, got {forgetting_mass} over forgettings {tuple(forgettings)}")
        prior = np.where(fast, float(forgetting_mass) / fast.sum(), (1.0 - float(forgetting_mass)) / (~fast).sum())
    return bank(base, configs, share=share, name=f"{kind}_bank", prior=prior)


def _shared_inputs(model, family, representation):
    """``representation`` (default the full covariance) given a linear model's one dense layer
    (:meth:`~kalnat.representations.base.Representation.for_layers`): the linearisations of an
    iterated member then share the product of ``P⁻`` with the model's inputs
    (:meth:`~kalnat.representations.full.PriorCovariance.times_rows`, :meth:`Bank._over_counts`);
    else ``representation`` as it was (a network's rows gain nothing from their factors there)."""
    from kalnat.models import Model
    from kalnat.representations import Full
    from kalnat.representations.groups import dense_layers

    if not isinstance(model, Model) or model.apply_tapped is None:
        return representation
    layers = dense_layers(jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0))))
    if layers is None or len(layers) != 1 or layers[0][0] > family.m:
        return representation
    return (representation or Full()).for_layers(layers)


def auto(model, family, *, input_shape=None, representation=None) -> Bank:
    """kalnat with no settings: a bank over prior scale and forgetting.

    Gaussian targets use normal–inverse-gamma filters (noise scale learned online and
    forgotten with θ, Student-t predictive); other families use EKFs with one and with two
    linearisations per update (the evidence picks: neither wins on every bundled set) and
    plug-in probabilities (moderated ones scored worse on every bundled classification set).
    For a gaussian target the members with λ < 1 share a prior weight of
    :data:`GAUSSIAN_FORGETTING_MASS` (the rest goes to λ = 1), which the fixed share also
    mixes back in.
    """
    if family.name == "gaussian" and family.m == 1:
        return ekf_bank(model, family, learner="nig", input_shape=input_shape, representation=representation,
                        forgetting_mass=GAUSSIAN_FORGETTING_MASS)
    return ekf_bank(model, family, iterations=(1, 2), input_shape=input_shape, representation=representation)
