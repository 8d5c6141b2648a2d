"""One stream's learner and scalers: what ``kalnat learn`` runs on each block of rows.

:class:`OnlineRunner` holds everything one stream needs — the learner and its state, the
online feature scaler and, for a gaussian target, an online target scaler and noise
estimate — and turns a block of raw rows into progressive predictions in the target's own
units, learning the block after predicting it (:func:`kalnat.cli_learn.learn_stream` drives it
over a source; ``kalnat compare`` runs it beside the baselines).

Conventions (the same in ``kalnat compare``):
  * features: each row standardised by the mean and deviation of rows before it
    (:mod:`kalnat.scaling`; :data:`SCALINGS` says which rows, and how the filter follows a
    change of statistics); a feature enters as 0 until two rows have given it a scale, and
    standardised values are clipped to ±``clip`` so an early row scaled by rough statistics
    cannot throw the learner far off;
  * the learner: with no prior and no forgetting given, :func:`kalnat.auto`, a bank that
    weighs priors, forgetting factors and linearisations by their evidence;
  * gaussian targets: standardised online in the same way (and learned as 0 until they
    have a scale); for a normal–inverse-gamma learner (the default) of a linear model in
    the block schemes, in coordinates frozen between
    the same boundaries as the features', the filter re-expressed exactly at each
    (:func:`_target_moved`), and features and target clipped at ±``max(clip, √(n − 1))``
    for coordinates from n rows (:func:`clip_bound`: a trending series leaves the early
    range unclipped); otherwise by the statistics of all earlier rows at every row, clipped
    like the features. A normal–inverse-gamma learner reports its own predictive scale
    there; otherwise the learner's noise variance is 1 in those
    units and the reported predictive variance rescales the filter's ``1 + h P hᵀ`` by the
    noise variance estimated from earlier residuals (:class:`kalnat.baselines.OnlineNoise`). Its log-loss
    starts at row 3, before which the target has no scale; metrics.json also gives the RMSE
    over all rows and after row 10;
  * classes: fixed from ``--classes`` or the first chunk.
"""

from __future__ import annotations

import json
import math
import os
from typing import Optional

import jax
import numpy as np

import kalnat
from kalnat import baselines, representations, saved, scaling
from kalnat.cli_choices import DEFAULT_SCALING, SCALINGS, parse_model, resolve_covariance
from kalnat.cli_setup import build_learner, make_family
from kalnat.programs import compile_quickly, compiler_options

__all__ = ["OnlineRunner", "CHUNK", "clip_bound", "clipped", "target_affine", "block_end",
           "stats_to_json", "stats_from_json"]

# Minibatches per compiled scan call: every block is padded to it (skipped rows cost a branch),
# so a run compiles one program.
CHUNK = 64


def clip_bound(clip: float, rows: Optional[int] = None) -> float:
    """The bound on standardised values in coordinates from ``rows`` rows: ``clip``, or
    ``√(rows − 1)`` when larger (0: none).

    Every one of n values lies within ``√(n − 1)`` deviations of their mean (Samuelson's
    inequality, deviation with divisor n), so a value past that bound lies beyond anything
    the coordinates were computed from: a bound of ``clip`` alone cut off a trending series
    whose values leave the early range, which the exact re-expression at the next boundary
    handles anyway; in the first rows, whose statistics are rough, ``clip`` still binds."""
    if not clip > 0:
        return 0.0
    return float(max(clip, math.sqrt(max(rows - 1, 0)))) if rows is not None else float(clip)


def clipped(Z, clip: float, rows: Optional[int] = None):
    """Standardised values clipped to ±:func:`clip_bound` (0: not clipped)."""
    bound = clip_bound(clip, rows)
    return np.clip(Z, -bound, bound) if bound > 0 else Z


def target_affine(stats, y, min_std: float = 1e-8):
    """Online standardisation of a target: ``(z, center, scale, stats')`` per row.

    ``z = (y − center) / scale`` with the mean and deviation of the targets before each row,
    exactly as :func:`kalnat.scaling.transform_and_update` scales a feature; the center and
    scale are returned too, to map predictions back to the target's units.
    """
    y = np.asarray(y, np.float64)
    _, new = scaling.transform_and_update(stats, y[:, None])
    c0 = int(stats.count)
    counts = c0 + np.arange(1, len(y) + 1)
    means = stats.mean[0] + np.cumsum(y - stats.mean[0]) / counts     # after each row
    prev_means = np.concatenate([[stats.mean[0]], means[:-1]])
    m2s = stats.m2[0] + np.cumsum((y - prev_means) * (y - means))
    prev_m2 = np.concatenate([[stats.m2[0]], m2s[:-1]])
    prev_counts = counts - 1
    prev_std = np.sqrt(prev_m2 / np.maximum(prev_counts, 1))
    center = np.where(prev_counts > 0, prev_means, 0.0)
    scale = np.where((prev_counts > 1) & (prev_std > min_std), prev_std, 1.0)
    return (y - center) / scale, center, scale, new


def block_end(rows: int) -> int:
    """The first block boundary after ``rows`` rows: the next power of two (≥ 2)."""
    b = 2
    while b <= rows:
        b *= 2
    return b


def _reexpressed(runner, state, old, new):
    """A learner's or a bank's state moved from coordinates ``old`` to ``new``
    (:func:`kalnat.scaling.reexpress_members`; the prior set afresh there under ``reprior``)."""
    with_prior = runner.scheme == "reprior" and parse_model(runner.cfg["model_spec"])[0] == "linear"
    bank = runner.bank is not None
    priors = scaling.fresh_priors(runner.learner.hyper, state, bank=bank) if with_prior else None
    return scaling.reexpress_members(state, old, new, bank=bank, priors=priors)


def _target_moved(runner, state, old, new):
    """A linear model's state moved from target coordinates ``old = (c, s)`` to ``new = (c', s')``.

    The filter predicts ``z = (y − c)/s``; the same function of y in the new coordinates is
    ``z' = a z + β`` with ``a = s/s'``, ``β = (c − c')/s'``: every weight times a, the bias
    also plus β. For a normal–inverse-gamma filter (its state, or a bank of them) V is in
    units of σ², which scales with the target (σ'² = a² σ²): V stays and the inverse-gamma
    scale b takes a². Exact: every later prediction, mapped back to y, is the same."""
    a = float(old[1] / new[1])
    beta = float((old[0] - new[0]) / new[1])
    members = state if runner.bank is None else state.members
    params = jax.tree_util.tree_map(lambda x: x * a, members.params)
    params = dict(params, b=params["b"] + beta)
    if not isinstance(members.cov, representations.NIGCovariance):
        raise ValueError("target re-expression: a normal–inverse-gamma learner's state is needed")
    cov = members.cov._replace(scale=members.cov.scale * a**2)
    members = members._replace(params=params, cov=cov)
    return members if runner.bank is None else state._replace(members=members)


# A stream of known length is compiled quickly (kalnat.programs.QUICK_COMPILE) when its rows ×
# members × (d² + 40) is at most this. Quick compilation saved 0.06–0.1 s of a single EKF's
# compilation and 0.55–0.65 s of the default bank's, and cost its run ~0.3 ns per row, member and
# unit of d² + 40 at d = 32 (an EKF: 1.46 against 1.14 µs a row; at d = 4 nothing) and ~1.2 ns
# at d = 585 (digits' bank forced quick: 60.5 against 30.6 s; benchmarks/startup.py
# --quick-compile): at this size at most ~0.06 s. breast_cancer's default bank:
# 569 × 40 × 1 001 = 2.3·10⁷. A stream of unknown length (stdin) keeps XLA's defaults.
QUICK_WORK = 5e7
# KALNAT_QUICK_COMPILE=0: XLA's defaults for every stream; =1: quick for every stream; unset
# or "auto": by QUICK_WORK (the one-stream runs of `kalnat learn`: OnlineRunner)
QUICK_ENV = "KALNAT_QUICK_COMPILE"


def quick_setting() -> str:
    """:data:`QUICK_ENV`'s value: ``"0"``, ``"1"`` or ``"auto"`` (unset), or a ``ValueError``
    (the command checks it when it starts, before reading any row)."""
    setting = os.environ.get(QUICK_ENV, "").strip().lower() or "auto"
    if setting not in ("auto", "0", "1"):
        raise ValueError(f"{QUICK_ENV}={os.environ[QUICK_ENV]!r}: expected 0 (XLA's defaults), 1 (quick "
                         f"compilation) or auto (by the job's size)")
    return setting


def quick_job(rows: Optional[int], members: int, d: int) -> bool:
    """Whether a stream of ``rows`` rows (``None``: unknown) for ``members`` learners of ``d``
    parameters is compiled quickly: by :data:`QUICK_WORK`, unless :data:`QUICK_ENV` says."""
    setting = quick_setting()
    if setting != "auto":
        return setting == "1"
    return rows is not None and float(rows) * members * (d * d + 40) <= QUICK_WORK


def mark_quick(learner, rows: Optional[int], n_parameters: int) -> bool:
    """Marks ``learner`` for quick compilation, or removes the mark, by :func:`quick_job` (``rows``,
    its members, ``n_parameters`` of one member); returns whether its programs take the options
    (not where the compiler does not: :func:`kalnat.programs.compiler_options`)."""
    members = learner.size if isinstance(learner, kalnat.bank.Bank) else 1
    compile_quickly(learner, quick_job(rows, members, n_parameters))
    return compiler_options(learner) is not None


def member_parameters(learner, params) -> int:
    """One member's number of parameters, from a learner's state's ``params`` (a bank's members
    stacked along their first axis)."""
    total = int(sum(np.size(a) for a in jax.tree_util.tree_leaves(params)))
    return total // learner.size if isinstance(learner, kalnat.bank.Bank) else total


class OnlineRunner:
    """One stream's learner, scalers and noise estimate (see the module's conventions)."""

    def __init__(self, cfg: dict, family_name: str, classes: Optional[list], n_features: int,
                 programs: Optional[str] = None, rows: Optional[int] = None):
        self.cfg = dict(cfg)
        self.classes = classes
        self.family = make_family(family_name, len(classes) if family_name == "categorical" else None)
        self.model, self.learner, self.state = build_learner(cfg, self.family, n_features)
        if programs is not None:  # build_learner makes the same learner from these every time
            try:  # text that names every setting exactly; a setting that is not JSON (an array
                # from Python, a function) is not named by its repr: such a learner is not saved
                recipe = json.dumps([self.cfg, self.family.name, None if classes is None else len(classes),
                                     n_features], sort_keys=True, allow_nan=False)
            except (TypeError, ValueError):
                recipe = None
            if recipe is not None:
                saved.describe(self.learner, recipe, programs)
        self.bank = self.learner if isinstance(self.learner, kalnat.bank.Bank) else None
        self.n_parameters = member_parameters(self.learner, self.state.params)
        self.quick = mark_quick(self.learner, rows, self.n_parameters)
        own_form = self.cfg["method"] not in ("ekf", "iterated", "nig")
        self.covariance = "full" if own_form else resolve_covariance(self.cfg.get("covariance"), self.n_parameters)
        self.dtype = np.dtype(jax.tree_util.tree_leaves(self.state.params)[0].dtype).name
        self.weights = None  # (n, K) the bank's weights when each row of the last block was predicted
        self.scaler = scaling.init(n_features)
        self.gaussian = self.family.name == "gaussian"
        self.target_scaler = scaling.init(2) if self.gaussian else None
        self.rows = 0
        self.clip = float(cfg.get("clip") or 0.0)
        self.scheme = cfg.get("scaling") or DEFAULT_SCALING
        if self.scheme not in SCALINGS:
            raise ValueError(f"unknown scaling {self.scheme!r}; expected one of {', '.join(SCALINGS)}")
        self.coords = None  # (center, scale) the filter is expressed in (block schemes)
        # A gaussian target of a linear model, in the block schemes, is standardised like the
        # features: coordinates frozen between boundaries, the filter re-expressed at each
        # (_target_moved). Standardised by the statistics of all earlier rows at every row
        # instead, the target's units move under the filter at every row, a drift that made
        # the bank's forgetting members win on streams with none.
        # Only a normal–inverse-gamma learner (the default bank's members, --method nig): its
        # noise scale moves with the target's units, so the re-expression is exact; a filter
        # whose noise variance is fixed at 1 in the units it learns in is not (it keeps the
        # running standardisation).
        self.frozen_target = (self.gaussian and self.scheme != "running"
                              and parse_model(self.cfg["model_spec"])[0] == "linear"
                              and self.learner.name in ("nig_bank", "nig_filter"))
        self.target_coords = None  # (center, scale) of the target (frozen_target)
        # The noise estimate that scales the filter's predictive. A normal–inverse-gamma
        # filter carries its own, in the target's frozen units: a second one on top, a
        # running mean of r²/(its predictive variance), counted every early miss for the
        # whole stream (Gaussian NLL, rows 3+: chick_weights 5.15 against 4.33 without it,
        # trump_approval 0.47 against 0.30; benchmarks/real_data.py).
        self.noise = baselines.OnlineNoise() if self.gaussian and not self.frozen_target else None
        self.coords_rows = self.target_coords_rows = None  # rows behind coords, target_coords

    def scale_features(self, X, update: bool = True):
        """Standardised, clipped features, each row by the statistics of all rows before it
        (the ``running`` scheme; ``compare`` gives these to the baselines); rows before a scale
        exists enter as 0."""
        X = np.asarray(X, np.float64)
        c0 = int(self.scaler.count)
        Z, stats = scaling.transform_and_update(self.scaler, X)
        if update:
            self.scaler = stats
        Z[: max(0, 2 - c0)] = 0.0
        return clipped(Z, self.clip)

    @staticmethod
    def _diverged(row):
        """The command's error for a learner that diverged at ``row`` (from 0) of the stream."""
        return ValueError(f"the learner diverged (non-finite prediction at row {row + 1}); "
                          "try a smaller --prior-var, --batch-size 1, a linear --model or --dtype float64")

    def step(self, X, y, callback=None) -> baselines.Predictions:
        """Predicts the rows ``X (n, p)`` with targets ``y (n,)`` (class indices, counts or
        reals), then learns them; returns the predictions in the target's units."""
        X = np.asarray(X, np.float64)
        if self.frozen_target:
            ytrain, affine = np.asarray(y, np.float64), None  # standardised block by block in _learn_in_blocks
        else:
            ytrain, affine = self.train_targets(y)
        batch = int(self.cfg["batch_size"])
        if self.scheme == "running":
            try:
                res = kalnat.fit(self.learner, self.state, self.scale_features(X), ytrain,
                                 batch_size=batch, chunk_size=CHUNK, fixed_chunk=True, callback=callback)
            except kalnat.Diverged as err:
                raise self._diverged(self.rows + err.row) from None
            self.state, p = res.state, res.predictions
        else:
            p = self._learn_in_blocks(X, ytrain, batch, callback)
            if self.frozen_target:
                p, y_mean, y_var = p
        bad = self.took(p, len(y))
        if bad is not None:
            raise self._diverged(self.rows - len(y) + bad)
        if self.frozen_target:  # a gaussian target, predicted in its units block by block
            return baselines.Predictions(mean=y_mean, var=y_var)
        return self.in_target_units(p, ytrain, affine)

    def took(self, p, n: int):
        """Counts ``n`` rows learned with the predictions ``p`` (a bank's weights kept); returns
        the index of the first row whose prediction is not finite, or None."""
        self.rows += n
        if self.bank:
            self.weights = np.asarray(p.weights, np.float64)
        bad = np.flatnonzero(~np.all(np.isfinite(np.asarray(p.mean, np.float64)), axis=1))
        return int(bad[0]) if bad.size else None

    def train_targets(self, y):
        """``(targets as learned, affine)``: a gaussian target standardised online, each by the
        targets before it (``affine = (center, scale)`` per row, to map predictions back), others
        as given (``affine = None``)."""
        if not self.gaussian:
            return y, None
        c0 = int(self.target_scaler.count)
        ytrain, center, scale, self.target_scaler = target_affine(self.target_scaler, y)
        # Until two targets have given it a scale, a target teaches nothing but "average"; and
        # like the features, an early target scaled by rough statistics is clipped.
        ytrain[: max(0, 2 - c0)] = 0.0
        return clipped(ytrain, self.clip), (center, scale)

    def in_target_units(self, p, ytrain, affine) -> baselines.Predictions:
        """The learner's predictions ``p`` of rows learned as ``ytrain`` (:meth:`train_targets`)
        in the target's units: class probabilities, or a mean and a variance."""
        mean = np.asarray(p.mean, np.float64)
        if self.family.is_classifier:
            return baselines.Predictions(probs=np.asarray(p.probs, np.float64))
        if self.gaussian:
            center, scale = affine
            unit = np.asarray(p.obs_cov, np.float64)[:, 0, 0]  # 1 + h P hᵀ (noise variance 1)
            var = self.noise(ytrain - mean[:, 0], unit)
            return baselines.Predictions(mean=center + scale * mean[:, 0], var=scale**2 * var)
        # a count's predictive variance: Poisson noise plus the parameters' part (as `predict`);
        # a bank is scored by its mixture's probability of each count (its log_prob), which the
        # Poisson at the mixture's mean is not: members far off move that mean by orders of
        # magnitude (tests/test_cli.py::test_a_poisson_banks_log_loss_is_its_mixtures_evidence)
        log_prob = getattr(p, "log_prob", None)
        return baselines.Predictions(mean=mean[:, 0],
                                     var=mean[:, 0] + np.asarray(p.mean_cov, np.float64)[:, 0, 0],
                                     log_loss=None if log_prob is None else -np.asarray(log_prob, np.float64))

    def _learn_in_blocks(self, X, ytrain, batch, callback):
        """Learns with coordinates frozen between :func:`block_end` boundaries, re-expressing
        the filter in the new coordinates at each boundary (see :data:`~kalnat.cli_choices.SCALINGS`)."""
        preds, pos, n = [], 0, len(ytrain)
        means, variances = [], []  # frozen_target: the predictions in the target's units
        while pos < n:
            rows = self.rows + pos
            cut = min(n, pos + block_end(rows) - rows)
            Xb = X[pos:cut]
            if self.coords is None:  # no scale yet: the rows teach the intercept only
                Z = np.zeros_like(Xb)
            else:
                # the growing bound for a regression only: on breast_cancer it cost log-loss
                # (0.1267 against 0.1248 with ±clip), whose heavy-tailed features gain from it
                Z = clipped((Xb - self.coords[0]) / self.coords[1], self.clip,
                             self.coords_rows if self.frozen_target else None)
            self.scaler = scaling.transform_and_update(self.scaler, Xb)[1]
            if self.frozen_target:  # the target in this block's coordinates (0: none yet)
                yb = ytrain[pos:cut]
                if self.target_coords is None:  # learned as 0, predicted as the earlier rows' mean
                    c, sc = target_affine(self.target_scaler, yb)[1], 1.0
                else:
                    c, sc = self.target_coords
                self.target_scaler = scaling.transform_and_update(self.target_scaler, yb[:, None])[1]
                zb = np.zeros_like(yb) if self.target_coords is None else \
                    clipped((yb - c) / sc, self.clip, self.target_coords_rows)
                ytrain = np.concatenate([ytrain[:pos], zb, ytrain[cut:]])
            cb = None if callback is None else (lambda off: lambda done, st, pc: callback(off + done, st, pc))(pos)
            # one scan shape for every block (the short early ones padded with skipped rows):
            # one compiled program per run
            try:
                res = kalnat.fit(self.learner, self.state, Z, ytrain[pos:cut], batch_size=batch,
                                 chunk_size=CHUNK, fixed_chunk=True, callback=cb)
            except kalnat.Diverged as err:
                raise self._diverged(self.rows + pos + err.row) from None
            self.state = res.state
            preds.append(res.predictions)
            if self.frozen_target:  # in this block's units; the noise estimate absorbs them here
                m = np.asarray(res.predictions.mean, np.float64)[:, 0]
                unit = np.asarray(res.predictions.obs_cov, np.float64)[:, 0, 0]
                means.append(c + sc * m)
                variances.append(sc**2 * (unit if self.noise is None else self.noise(zb - m, unit)))
            pos = cut
            if self.rows + pos == block_end(self.rows + pos - 1):
                self._move_coords()
        out = jax.tree_util.tree_map(lambda *a: np.concatenate(a), *preds)
        if self.frozen_target:
            return out, np.concatenate(means), np.concatenate(variances)
        return out

    def _move_coords(self):
        new = scaling.standardizer(self.scaler)
        if self.coords is not None and int(self.scaler.count) > 1:
            self.state = _reexpressed(self, self.state, self.coords, new)
        if int(self.scaler.count) > 1:
            self.coords = new
            self.coords_rows = int(self.scaler.count)
        if self.frozen_target and int(self.target_scaler.count) > 1:
            new_y = tuple(float(a[0]) for a in scaling.standardizer(self.target_scaler))
            if self.target_coords is not None:
                self.state = _target_moved(self, self.state, self.target_coords, new_y)
                # the noise estimate's squared residuals, into the new units
                if self.noise is not None:
                    self.noise.total *= (self.target_coords[1] / new_y[1]) ** 2
            self.target_coords = new_y
            self.target_coords_rows = int(self.target_scaler.count)

    def extra(self) -> dict:
        """Everything :class:`~kalnat.cli_predict.LoadedModel` needs to rebuild this learner, as JSON."""
        ts = self.target_scaler
        return {
            "kalnat_cli": 1,
            "family": self.family.name,
            "classes": self.classes,
            "model": self.cfg["model_spec"],
            "method": self.cfg["method"],
            "covariance": self.covariance,
            "dtype": self.dtype,
            "prior_var": self.cfg.get("prior_var"),
            "forgetting": self.cfg.get("forgetting"),
            "bank": self.cfg.get("bank"),
            "batch_size": int(self.cfg["batch_size"]),
            "clip": self.clip,
            "seed": int(self.cfg.get("seed", 0)),
            "scaler": stats_to_json(self.scaler),
            "scaling": self.scheme,
            "coords": None if self.coords is None else [np.asarray(a).tolist() for a in self.coords],
            "target_coords": None if self.target_coords is None else list(self.target_coords),
            "coords_rows": self.coords_rows if self.frozen_target else None,
            "target_scaler": stats_to_json(ts) if ts is not None else None,
            # a filter that learns its noise scale: the predictive as it is (a factor of 1)
            "noise": [self.noise.total, self.noise.weight] if self.noise else ([1.0, 1.0] if self.gaussian else None),
            "rows_seen": self.rows,
        }


def stats_to_json(s):
    return {"count": int(s.count), "mean": np.asarray(s.mean).tolist(), "m2": np.asarray(s.m2).tolist()}


def stats_from_json(d):
    return scaling.RunningStats(np.asarray(d["count"], np.int64), np.asarray(d["mean"], np.float64),
                                np.asarray(d["m2"], np.float64))

