"""What ``kalnat learn`` and ``kalnat predict`` do, usable from Python too.

:class:`OnlineRunner` holds everything one stream needs — the learner and its state, the
online feature scaler and, for a gaussian target, an online target scaler and noise
estimate — and turns a block of raw rows into progressive predictions in the target's own
units, learning the block after predicting it. :func:`learn_stream` drives it over a
chunked source with a progress bar and collects the report; :class:`LoadedModel` rebuilds
the learner from its checkpoint for prediction.

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

import csv
import json
import math
import time
from dataclasses import dataclass, field
from typing import Optional

import jax
import numpy as np
from tqdm import tqdm  # a terminal's bar (tqdm.auto would import asyncio: stream._bar)

import kalnat
from kalnat import baselines, checkpoint, datasets, families, models, representations, saved, scaling, schedules
from kalnat.cli_choices import (  # noqa: F401
    COVARIANCES, DEFAULT_SCALING, METHOD_NAMES, SCALINGS, parse_covariance, parse_model, resolve_covariance,
    resolve_dtype)

__all__ = ["METHODS", "parse_model", "build_learner", "resolve_task", "OnlineRunner",
           "learn_stream", "LearnResult", "LoadedModel", "PredictionWriter"]


def _filter(make, **options):
    """``make`` (a core learner's constructor) at prior ``pv`` and forgetting ``lam``. When it
    forgets, its variances are bounded as the bank's members' are (no wind-up along a feature
    that stays constant); without forgetting P only shrinks and the bound is left off (the
    exact filter)."""
    def build(model, fam, pv, lam, **more):  # more: the representation (--covariance)
        bound = None if lam == 1.0 else kalnat.bank.default_max_variance(pv)
        return make(model, fam, prior_var=pv, forgetting=lam, max_variance=bound, **options, **more)
    return build


def _natural_gradient(model, fam, prior_var, forgetting, max_variance):
    """Online natural gradient with the rates that make it the same filter (docs/method.md §3)."""
    return kalnat.natural_gradient(model, fam, max_variance=max_variance, **schedules.kalman_to_natural(
        prior_var=prior_var, forgetting=forgetting)._asdict())


# Every learner of the core library, as built from the command's settings, bound included:
# the exact filter in four forms (ekf, ekf-joseph, information, natgrad give the same θ_t),
# its square-root form, the EKF relinearised twice per update, and for gaussian targets the
# normal–inverse-gamma filter that learns the noise scale.
METHODS = {
    "ekf": _filter(kalnat.ekf),
    "ekf-joseph": _filter(kalnat.ekf, joseph=True),
    "information": _filter(kalnat.information_filter),
    "natgrad": _filter(_natural_gradient),
    "sqrt-ekf": _filter(kalnat.sqrt_ekf),
    "iterated": _filter(kalnat.iterated_ekf, iterations=2),
    "nig": _filter(kalnat.nig_filter),
}

GAUSSIAN_FIRST_SCORED_ROW = 3
# metrics.json's second RMSE starts after this many rows (the first ones mostly measure the
# empty start every one-pass learner shares)
SKIP_ROWS = 10
# Minibatches per compiled scan call: every block is padded to it (skipped rows cost a branch),
# so a run compiles one program.
CHUNK = 64


def make_family(name: str, n_classes: Optional[int] = None) -> families.Family:
    """The family the command learns with: gaussian as is, the others with
    :data:`kalnat.families.R_FLOOR`."""
    if name == "categorical":
        return families.Categorical(int(n_classes), r_floor=families.R_FLOOR)
    if name == "bernoulli":
        return families.Bernoulli(r_floor=families.R_FLOOR)
    if name == "poisson":
        return families.Poisson(r_floor=families.R_FLOOR)
    return families.from_name(name, n_classes)


def build_model(spec: str, n_features: int, family: families.Family):
    kind, hidden = parse_model(spec)
    if kind == "linear":
        return models.linear(n_features, family.n_outputs)
    return models.mlp(n_features, hidden, family.n_outputs)


MAX_COVARIANCE_BYTES = 8 * 2**30
MAX_CLASSES = 200


def uses_bank(cfg: dict) -> bool:
    """No prior and no forgetting given (and the EKF): the learner is a bank that tunes them."""
    return cfg.get("prior_var") is None and cfg.get("forgetting") is None and cfg["method"] == "ekf"


def single_settings(cfg: dict) -> tuple[float, float]:
    """``(prior_var, forgetting)`` of a single learner; an unset one takes its neutral value 1."""
    pv, lam = cfg.get("prior_var"), cfg.get("forgetting")
    return float(1.0 if pv is None else pv), float(1.0 if lam is None else lam)


def build_learner(cfg: dict, family: families.Family, n_features: int):
    """``(model, learner, initial state)`` from the command's settings, in ``cfg["dtype"]``
    (:func:`~kalnat.cli_choices.resolve_dtype`; settings without it: ``auto``, while a checkpoint
    without it loads as float64, :func:`checkpoint_settings`).

    With :func:`uses_bank` the learner is :func:`kalnat.auto` (or, when ``cfg["bank"]`` holds
    keyword arguments of :func:`kalnat.ekf_bank`, that bank); otherwise ``cfg["method"]`` at
    :func:`single_settings`.
    """
    if cfg["method"] not in METHODS:
        raise ValueError(f"unknown method {cfg['method']!r}; expected one of {', '.join(METHODS)}")
    if cfg["method"] == "nig" and family.name != "gaussian":
        raise ValueError(f"--method nig learns the noise scale of a gaussian target; this target is {family.name}")
    model = build_model(cfg["model_spec"], n_features, family)
    shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0)))
    d = int(sum(np.prod(a.shape) for a in jax.tree_util.tree_leaves(shapes)))
    own_form = cfg["method"] not in ("ekf", "iterated", "nig")
    if own_form and (cfg.get("covariance") or "auto") not in ("auto", "full"):
        raise ValueError(f"--covariance {cfg['covariance']} applies to --method ekf, iterated or nig "
                         f"({cfg['method']} has a form of its own)")
    rep = None if own_form else representations.from_name(cfg.get("covariance"), shapes)
    extra = {} if rep is None else dict(representation=rep)
    if uses_bank(cfg):
        opts = cfg.get("bank")
        learner = kalnat.ekf_bank(model, family, **opts, **extra) if opts else kalnat.auto(model, family, **extra)
    else:
        learner = METHODS[cfg["method"]](model, family, *single_settings(cfg), **extra)
    filters = learner.size if isinstance(learner, kalnat.bank.Bank) else 1
    stored = filters * representations.stored_floats(rep, d)
    dtype = np.dtype(resolve_dtype(cfg.get("dtype"), stored))
    needed = dtype.itemsize * stored
    if needed > MAX_COVARIANCE_BYTES:  # before allocating, not as an out-of-memory crash
        kind = "covariance" if rep is None else f"--covariance {resolve_covariance(cfg.get('covariance'), d)}"
        raise ValueError(f"--model {cfg['model_spec']} on {n_features} features has {d} parameters: "
                         f"the {kind} of {filters} filter{'s' * (filters > 1)} would need "
                         f"{needed / 2**30:.0f} GiB in {dtype.name}; use a smaller model, --covariance "
                         "diag, a smaller rank, one filter (--prior-var)"
                         + (" or --dtype float32" if dtype.name == "float64" else ""))
    params = model.init(jax.random.PRNGKey(int(cfg.get("seed", 0))))  # as kalnat.models' own, bit for bit
    # the filter computes in its parameters' dtype (kalnat.fit casts the rows to it)
    params = jax.tree_util.tree_map(lambda a: a.astype(dtype), params)
    return model, learner, learner.init(params)


def resolve_task(cfg: dict, source: datasets.Source, first_y) -> tuple[str, Optional[list]]:
    """The family name and class labels: from the options, the data set, or the first chunk."""
    family, classes = cfg.get("family"), cfg.get("classes")
    if family is None and source.task_hint is not None:
        family = source.task_hint
        if classes is None and source.n_classes_hint:
            classes = source.class_names or [str(i) for i in range(source.n_classes_hint)]
    guess_family, guess_classes = datasets.infer_task(first_y)
    if family is None:
        family = guess_family
    if family in ("bernoulli", "categorical") and classes is None:
        if guess_classes is None:
            raise ValueError(f"{source.name}: the target {source.target_name!r} is not a class "
                             f"label (it looks {guess_family}); pass --classes or another --family")
        classes = guess_classes
        if family == "categorical" and len(classes) < 2:
            raise ValueError(f"{source.name}: only one class in the first chunk; pass --classes")
    if family == "categorical" and len(classes) > MAX_CLASSES:
        raise ValueError(f"{source.name}: {len(classes)} distinct values in the target "
                         f"{source.target_name!r} is too many classes; is it a regression "
                         "(--family gaussian) or a count (--family poisson)?")
    if family == "bernoulli" and classes is not None and len(classes) != 2:
        raise ValueError(f"{source.name}: bernoulli needs two classes, the target has "
                         f"{len(classes)} ({', '.join(classes[:10])}); use --family categorical")
    if family not in ("bernoulli", "categorical"):
        classes = None
    return family, classes


def inference_note(cfg: dict, source: datasets.Source, family: str, classes) -> Optional[str]:
    """A line telling the user what was guessed about the task, or None if nothing was."""
    if cfg.get("family") or source.task_hint:
        return None
    what = family + (f" over {len(classes)} classes ({', '.join(classes[:6])}"
                     + (", …" if len(classes) > 6 else "") + ")" if classes else "")
    return (f"{source.name}: target {source.target_name!r} looks {what} from its first rows; "
            "pass --family (and --classes) to say otherwise")


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


def _clipped(Z, clip: float, rows: Optional[int] = None):
    """Standardised values clipped to ±:func:`clip_bound` (0: not clipped)."""
    bound = clip_bound(clip, rows)
    return np.clip(Z, -bound, bound) if bound > 0 else Z


def _target_affine(stats, y, min_std: float = 1e-8):
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
    bank = runner.bank
    priors = None
    if with_prior and bank is None:
        v, lam = single_settings(runner.cfg)
        priors = [v], [float(lam) ** int(state.count)]
    elif with_prior:
        counts = np.asarray(state.members.count)
        priors = (np.asarray(bank.hyper.prior_var),
                  np.asarray(bank.hyper.forgetting, np.float64) ** counts)  # ρ = λ^t: what forgetting left
    return scaling.reexpress_members(state, old, new, bank=bank is not None, priors=priors)


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


class OnlineRunner:
    """One stream's learner, scalers and noise estimate (see the module's conventions)."""

    def __init__(self, cfg: dict, family_name: str, classes: Optional[list], n_features: int,
                 programs: Optional[str] = None):
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
        size = int(sum(np.size(a) for a in jax.tree_util.tree_leaves(self.state.params)))
        self.n_parameters = size // self.bank.size if self.bank else size
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
        return _clipped(Z, self.clip)

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
        self.rows += len(y)
        if self.bank:
            self.weights = np.asarray(p.weights, np.float64)
        mean = np.asarray(p.mean, np.float64)
        bad = np.flatnonzero(~np.all(np.isfinite(mean), axis=1))
        if bad.size:
            raise self._diverged(self.rows - len(y) + bad[0])
        if self.frozen_target:  # a gaussian target, predicted in its units block by block
            return baselines.Predictions(mean=y_mean, var=y_var)
        return self.in_target_units(p, ytrain, affine)

    def train_targets(self, y):
        """``(targets as learned, affine)``: a gaussian target standardised online, each by the
        targets before it (``affine = (center, scale)`` per row, to map predictions back), others
        as given (``affine = None``)."""
        if not self.gaussian:
            return y, None
        c0 = int(self.target_scaler.count)
        ytrain, center, scale, self.target_scaler = _target_affine(self.target_scaler, y)
        # Until two targets have given it a scale, a target teaches nothing but "average"; and
        # like the features, an early target scaled by rough statistics is clipped.
        ytrain[: max(0, 2 - c0)] = 0.0
        return _clipped(ytrain, self.clip), (center, scale)

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
        # a count's predictive variance: Poisson noise plus the parameters' part (as `predict`)
        return baselines.Predictions(mean=mean[:, 0],
                                     var=mean[:, 0] + np.asarray(p.mean_cov, np.float64)[:, 0, 0])

    def _learn_in_blocks(self, X, ytrain, batch, callback):
        """Learns with coordinates frozen between :func:`block_end` boundaries, re-expressing
        the filter in the new coordinates at each boundary (see :data:`SCALINGS`)."""
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
                Z = _clipped((Xb - self.coords[0]) / self.coords[1], self.clip,
                             self.coords_rows if self.frozen_target else None)
            self.scaler = scaling.transform_and_update(self.scaler, Xb)[1]
            if self.frozen_target:  # the target in this block's coordinates (0: none yet)
                yb = ytrain[pos:cut]
                if self.target_coords is None:  # learned as 0, predicted as the earlier rows' mean
                    c, sc = _target_affine(self.target_scaler, yb)[1], 1.0
                else:
                    c, sc = self.target_coords
                self.target_scaler = scaling.transform_and_update(self.target_scaler, yb[:, None])[1]
                zb = np.zeros_like(yb) if self.target_coords is None else \
                    _clipped((yb - c) / sc, self.clip, self.target_coords_rows)
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
        """Everything :class:`LoadedModel` needs to rebuild this learner, as JSON."""
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
            "scaler": _stats_json(self.scaler),
            "scaling": self.scheme,
            "coords": None if self.coords is None else [np.asarray(a).tolist() for a in self.coords],
            "target_coords": None if self.target_coords is None else list(self.target_coords),
            "coords_rows": self.coords_rows if self.frozen_target else None,
            "target_scaler": _stats_json(ts) if ts is not None else None,
            # a filter that learns its noise scale: the predictive as it is (a factor of 1)
            "noise": [self.noise.total, self.noise.weight] if self.noise else ([1.0, 1.0] if self.gaussian else None),
            "rows_seen": self.rows,
        }


def _stats_json(s):
    return {"count": int(s.count), "mean": np.asarray(s.mean).tolist(), "m2": np.asarray(s.m2).tolist()}


def _stats_from(d):
    return scaling.RunningStats(np.asarray(d["count"], np.int64), np.asarray(d["mean"], np.float64),
                                np.asarray(d["m2"], np.float64))


# ---- the report ---------------------------------------------------------------------------------

class Accumulator:
    """Running progressive scores and a thinned learning curve, in bounded memory."""

    MAX_POINTS = 2000

    def __init__(self, family: families.Family, first_scored_row: int = 1, bank_size: int = 0):
        self.family, self.first = family, first_scored_row
        self.key = "accuracy" if family.is_classifier else "rmse"
        self.weights = [] if bank_size else None  # a bank's weights at the curve's points
        self.n = 0          # rows scored
        self.seen = 0       # rows predicted (scored or not)
        self.sum_ll = 0.0
        self.sum_m = 0.0
        self.last_point_ll, self.last_point_n = 0.0, 0
        self.curve = {"row": [], "log_loss": [], self.key: [], "window_log_loss": []}
        # rows scored by (true class, predicted class): the report's confusion figure
        k = int(getattr(family, "num_classes", 2))
        self.confusion = np.zeros((k, k), np.int64) if family.is_classifier else None
        # regression: squared errors of every predicted row and of those after row SKIP_ROWS,
        # whatever the first scored row (the RMSEs other tools report)
        self.sq_all = self.sq_after = 0.0
        self.n_after = 0

    def add(self, y, pred: baselines.Predictions, weights=None):
        """Scores a block; ``weights (n, K)``: a bank's weights for its rows."""
        losses = baselines.row_losses(self.family, y, pred)
        rows = self.seen + np.arange(1, len(y) + 1)
        if not self.family.is_classifier:
            sq = losses["sq_err"]
            self.sq_all += float(np.sum(sq))
            self.sq_after += float(np.sum(sq[rows > SKIP_ROWS]))
            self.n_after += int(np.sum(rows > SKIP_ROWS))
        keep = rows >= self.first
        ll = losses["log_loss"][keep]
        m = (losses["correct"] if self.family.is_classifier else losses["sq_err"])[keep]
        rows = rows[keep]
        w = None if self.weights is None else np.asarray(weights)[keep]
        self.seen += len(y)
        if not len(ll):
            return
        if self.confusion is not None:
            true = np.asarray(y, np.int64)[keep]
            np.add.at(self.confusion, (true, np.argmax(np.asarray(pred.probs)[keep], axis=1)), 1)
        cum_ll = self.sum_ll + np.cumsum(ll)
        cum_m = self.sum_m + np.cumsum(m)
        counts = self.n + np.arange(1, len(ll) + 1)
        every = max(1, len(ll) // 50)
        for k in list(range(every - 1, len(ll), every)) + ([len(ll) - 1] if len(ll) % every else []):
            self._point(int(rows[k]), cum_ll[k], cum_m[k], int(counts[k]),
                        None if w is None else w[k])
        self.n = int(counts[-1])
        self.sum_ll, self.sum_m = float(cum_ll[-1]), float(cum_m[-1])

    def _point(self, row, cum_ll, cum_m, count, weights=None):
        c = self.curve
        if weights is not None:
            self.weights.append([float(v) for v in weights])
        c["row"].append(row)
        c["log_loss"].append(float(cum_ll / count))
        metric = cum_m / count
        c[self.key].append(float(metric if self.family.is_classifier else math.sqrt(metric)))
        w = count - self.last_point_n
        c["window_log_loss"].append(float((cum_ll - self.last_point_ll) / w) if w else math.nan)
        self.last_point_ll, self.last_point_n = float(cum_ll), count
        if len(c["row"]) > self.MAX_POINTS:  # thin to every other point (the last one stays)
            for k in c:
                c[k] = c[k][-1::-2][::-1]
            if self.weights is not None:
                self.weights = self.weights[-1::-2][::-1]

    def final(self) -> dict:
        out = {"log_loss": self.sum_ll / self.n if self.n else math.nan, "rows_scored": self.n}
        metric = self.sum_m / self.n if self.n else math.nan
        out[self.key] = metric if self.family.is_classifier else math.sqrt(metric)
        if not self.family.is_classifier:
            out["rmse_all_rows"] = math.sqrt(self.sq_all / self.seen) if self.seen else math.nan
            out[f"rmse_after_row_{SKIP_ROWS}"] = (math.sqrt(self.sq_after / self.n_after)
                                                  if self.n_after else math.nan)
        return out


@dataclass
class LearnResult:
    runner: OnlineRunner
    metrics: dict
    feature_names: list
    target_name: Optional[str]
    family_name: str = field(init=False)

    def __post_init__(self):
        self.family_name = self.runner.family.name

    @property
    def is_classifier(self):
        return self.runner.family.is_classifier

    def save(self, path):
        extra = self.runner.extra()
        extra.update(feature_names=self.feature_names, target=self.target_name)
        return checkpoint.save(path, self.runner.state, extra=extra)


class PredictionWriter:
    """``kalnat learn --predictions``: every row's progressive prediction (made before the row
    was learned) as CSV, written chunk by chunk. Columns: ``row`` (1-based, in stream order,
    skipped rows included), then ``mean,sd`` (gaussian: the predictive mean and standard
    deviation, noise included; poisson: the rate and the standard deviation of the count)
    or ``p_<class>`` per class; NaN in every column but ``row`` for a skipped row."""

    def __init__(self, out):
        self.out = out
        self.writer = csv.writer(out, lineterminator="\n")
        self.header = None
        self.row = 0
        self.pending = 0  # skipped rows seen before the task (and so the header) was known

    def start(self, family: str, classes):
        self.header = ["row"] + ([f"p_{c}" for c in classes] if classes is not None else ["mean", "sd"])
        self.writer.writerow(self.header)
        self.write([], [None] * self.pending)
        self.pending = 0

    def write(self, lines, values, skipped_lines=()):
        """Rows of one chunk: ``values[k]`` (a vector, or None for a skipped row) at file line
        ``lines[k]``; ``skipped_lines``: rows skipped in it, merged in by line number (a CSV's
        lines increase; a bundled set, possibly shuffled, skips none)."""
        entries = list(zip(lines, values)) + [(line, None) for line in skipped_lines]
        if skipped_lines:
            entries.sort(key=lambda e: e[0])
        if self.header is None:
            self.pending += len(entries)
            return
        nan = ["nan"] * (len(self.header) - 1)
        for _, v in entries:
            self.row += 1
            self.writer.writerow([self.row] + (nan if v is None else [f"{x:.10g}" for x in v]))


def _prediction_table(pred: baselines.Predictions) -> np.ndarray:
    """``(n, columns)``: class probabilities, or the mean and standard deviation."""
    if pred.probs is not None:
        return np.asarray(pred.probs, np.float64)
    return np.column_stack([pred.mean, np.sqrt(np.maximum(pred.var, 0.0))])


def run_metrics(source, runner, cfg: dict, protocol: str, skipped, acc, t_learn, t_first, first_rows) -> dict:
    """A run's metrics.json: the data, the task, the learner and its settings, the protocol, the
    rows seen and skipped, the scores and the time per row (the one-stream and the keyed runs)."""
    rows = runner.rows
    return {
        "data": source.name,
        "family": runner.family.name,
        "classes": runner.classes,
        "target": source.target_name,
        "n_features": len(source.feature_names),
        "n_parameters": runner.n_parameters,
        "settings": {k: cfg.get(k) for k in ("model_spec", "method", "prior_var", "forgetting",
                                               "batch_size", "clip", "seed")},
        "scaling": runner.scheme,
        "learner": runner.learner.name,
        "learner_text": learner_text(runner.learner, cfg, runner.dtype),
        "dtype": runner.dtype,
        "protocol": protocol,
        "rows_seen": rows,
        "rows_skipped": len(skipped),
        "skipped": [{"line": s[0], "column": s[1], "reason": s[2]} for s in skipped[:100]],
        "final": acc.final(),
        "first_scored_row": acc.first,
        "seconds_total": t_learn,
        "seconds_per_row": t_learn / rows,
        # The first chunk includes compiling the update; later chunks show the running cost.
        "seconds_per_row_after_first_chunk": ((t_learn - t_first) / (rows - first_rows)
                                              if rows > first_rows else None),
        "curve": acc.curve,
    }


def learn_stream(source: datasets.Source, cfg: dict, progress: bool = True,
                 log=None, predictions=None, programs: Optional[str] = None) -> LearnResult:
    """Learns every chunk of ``source`` in order; returns the runner and the report.

    ``log(message)`` receives a note when the task was inferred from the data;
    ``predictions``: a text file to which :class:`PredictionWriter` writes every row's
    progressive prediction; ``programs``: a folder where the learner's compiled programs are
    kept for the next run (:mod:`kalnat.saved`)."""
    chunks = iter(source.chunks)
    skipped, runner, coder, acc = [], None, None, None
    t_learn, t_first, first_rows = 0.0, None, 0
    bar = None  # made once the learner exists, so a setup error is not printed inside a bar
    writer = None if predictions is None else PredictionWriter(predictions)
    try:
        for chunk in chunks:
            before = len(skipped)
            skipped.extend(chunk.skipped)
            if not len(chunk.y):
                if writer is not None:
                    writer.write([], [], [s[0] for s in skipped[before:]])
                continue
            if runner is None:
                family, classes = resolve_task(cfg, source, chunk.y)
                note = inference_note(cfg, source, family, classes)
                if note and log:
                    log(note)
                coder = datasets.TargetCoder(family, classes)
                runner = OnlineRunner(cfg, family, classes, chunk.X.shape[1], programs)
                first = GAUSSIAN_FIRST_SCORED_ROW if family == "gaussian" else 1
                acc = Accumulator(runner.family, first, runner.bank.size if runner.bank else 0)
                bar = tqdm(total=source.n_rows, unit="row", disable=not progress,
                           dynamic_ncols=True,
                           desc=f"{'bank' if runner.bank else cfg['method']} {source.name}")
                if writer is not None:
                    writer.start(family, classes)
            y, good = coder.encode(source.name, chunk.y, chunk.lines, source.target_name,
                                   bool(cfg.get("skip_bad_rows")), skipped)
            X, y = chunk.X[good], y[good]
            if not len(y):
                if writer is not None:
                    writer.write([], [], [s[0] for s in skipped[before:]])
                continue
            done = [0]

            def tick(rows_done, state, preds):
                bar.update(rows_done - done[0])
                done[0] = rows_done

            t0 = time.perf_counter()
            pred = runner.step(X, y, callback=tick)
            dt = time.perf_counter() - t0
            if t_first is None:
                t_first, first_rows = dt, len(y)
            t_learn += dt
            acc.add(y, pred, runner.weights)
            if writer is not None:
                writer.write(np.asarray(chunk.lines)[good], _prediction_table(pred),
                             [s[0] for s in skipped[before:]])
            f = acc.final()
            bar.set_postfix({"log-loss": f"{f['log_loss']:.4f}",
                             acc.key: f"{f[acc.key]:.4f}"}, refresh=True)
    finally:
        if bar is not None:
            bar.close()
    if runner is None:
        raise datasets.DataError(source.name, "no data rows" + (f" ({len(skipped)} bad rows skipped)"
                                                                if skipped else ""))
    metrics = run_metrics(source, runner, cfg,
                          "progressive validation: every row predicted before it is learned, one pass, "
                          "given order; features standardised with statistics of earlier rows only",
                          skipped, acc, t_learn, t_first, first_rows)
    if acc.confusion is not None:
        metrics["confusion"] = acc.confusion.tolist()  # [true class][predicted class], rows scored
    if runner.bank:
        metrics["bank"] = bank_report(runner.bank, runner.state, acc)
    return LearnResult(runner, metrics, list(source.feature_names), source.target_name)


def bank_report(bank, state, acc: Accumulator) -> dict:
    """The members' configurations, their final weights and evidence, and the weights at the
    learning curve's points."""
    return {
        "members": [dict(c) for c in bank.configs],
        "share": bank.share,
        "moderated": bank.moderated,
        "final_weights": [float(v) for v in kalnat.bank.weights(state)],
        "log_evidence": [float(v) for v in np.asarray(state.log_evidence)],
        "curve": {"row": list(acc.curve["row"]), "weights": acc.weights},
    }


def learner_text(learner, cfg: dict, dtype: str = "float64") -> str:
    """What runs, in words: ``"ekf"`` or ``"bank of 40 EKFs (1 or 2 linearisations)"``, with
    ``" in float32"`` when it computes in float32."""
    more = " in float32" if dtype == "float32" else ""
    if not isinstance(learner, kalnat.bank.Bank):
        return cfg["method"] + more
    kind = "normal–inverse-gamma filters" if learner.name == "nig_bank" else "EKFs"
    counts = sorted({int(c["iterations"]) for c in learner.configs if "iterations" in c})
    more = (f" ({' or '.join(map(str, counts))} linearisations)" if len(counts) > 1 else "") + more
    return f"bank of {learner.size} {kind}{more}"


def member_label(config: dict) -> str:
    """``v=1, λ=0.99, iterations=2``: what tells the members apart (their variance bound follows
    from the prior variance and is left out)."""
    return ", ".join(f"{'v' if k == 'prior_var' else 'λ' if k == 'forgetting' else k}={v:g}"
                     for k, v in config.items() if k != "max_variance")


# ---- prediction from a checkpoint ------------------------------------------------------------

def checkpoint_settings(extra: dict) -> dict:
    """The settings :func:`build_learner` takes, from a checkpoint's ``extra`` (a model's or a
    keyed model's): as they were learned, ``auto`` resolved; a checkpoint written before a
    setting existed has what the command did then (the full covariance, float64)."""
    return {"model_spec": extra["model"], "method": extra["method"], "prior_var": extra["prior_var"],
            "forgetting": extra["forgetting"], "bank": extra.get("bank"), "seed": extra["seed"],
            "covariance": extra.get("covariance", "full"), "dtype": extra.get("dtype", "float64")}


class LoadedModel:
    """A learner restored from ``kalnat learn``'s ``model.npz`` (it predicts, it does not learn)."""

    def __init__(self, extra: dict, state, learner, family):
        self.extra, self.state, self.learner, self.family = extra, state, learner, family
        self.feature_names = extra["feature_names"]
        self.classes = extra["classes"]
        self.scaler = _stats_from(extra["scaler"])
        self.target_scaler = _stats_from(extra["target_scaler"]) if extra.get("target_scaler") else None

    @classmethod
    def load(cls, path) -> "LoadedModel":
        try:
            extra = checkpoint.read_header(path)["extra"]
        except FileNotFoundError:
            raise ValueError(f"{path}: no model here (run `kalnat learn --out DIR` first)") from None
        if extra.get("kalnat_cli") != 1:
            raise ValueError(f"{path}: not written by `kalnat learn`")
        classes = extra["classes"]
        family = make_family(extra["family"], len(classes) if extra["family"] == "categorical" else None)
        _, learner, template = build_learner(checkpoint_settings(extra), family, len(extra["feature_names"]))
        state = checkpoint.load(path, like=template)
        return cls(extra, state, learner, family)

    def _scale(self, X):
        X = np.asarray(X, np.float64)
        coords = self.extra.get("coords")
        if coords is not None:  # the coordinates the filter was left in (block schemes)
            center, scale = (np.asarray(a) for a in coords)
        elif self.extra.get("scaling", "running") != "running" or int(self.scaler.count) < 2:
            return np.zeros_like(X)  # fewer than two rows learned: no scale yet
        else:
            center, scale = scaling.standardizer(self.scaler)
        return _clipped((X - center) / scale, float(self.extra.get("clip") or 0.0),
                        self.extra.get("coords_rows") if coords is not None else None)

    def header(self):
        if self.family.is_classifier:
            return (["line", "predicted"] + [f"prob_{c}" for c in self.classes]
                    + [f"prob_std_{c}" for c in self.classes])
        return ["line", "mean", "std", "param_std"]

    def predict(self, X) -> np.ndarray:
        """Rows of the output table (without the line column) for raw features ``X (n, p)``."""
        if not len(X):
            return np.zeros((0, len(self.header()) - 1))
        return self.table(self.learner.predict(self.state, self._scale(X)))

    def table(self, pred) -> np.ndarray:
        """Rows of the output table (without the line column) for the learner's predictive
        ``pred`` of standardised rows (``kalnat predict --key`` reuses it, one state per row)."""
        mean = np.asarray(pred.mean, np.float64)
        mc = np.asarray(pred.mean_cov, np.float64)
        if self.family.is_classifier:
            probs = np.asarray(pred.probs, np.float64)
            if self.family.name == "bernoulli":
                var = np.repeat(mc[:, 0, 0][:, None], 2, axis=1)
            else:  # the last class's probability is 1 − Σ the others: its variance is 1ᵀΣ1
                var = np.concatenate([np.diagonal(mc, axis1=1, axis2=2),
                                      mc.sum(axis=(1, 2))[:, None]], axis=1)
            return np.column_stack([np.argmax(probs, 1), probs, np.sqrt(np.maximum(var, 0))])
        param_var = mc[:, 0, 0]
        if self.family.name == "gaussian":
            if self.extra.get("target_coords") is not None:  # frozen target coordinates
                center, scale = self.extra["target_coords"]
            else:
                center, scale = (float(a[0]) for a in scaling.standardizer(self.target_scaler))
            total, weight = self.extra["noise"]
            noise = total / weight
            m = center + scale * mean[:, 0]
            # obs_cov is 1 + h P hᵀ for a filter with noise variance 1 in these units; a bank's
            # or a normal–inverse-gamma filter's also carries its own noise estimate and spread.
            sd = scale * np.sqrt(noise * np.asarray(pred.obs_cov, np.float64)[:, 0, 0])
            psd = scale * np.sqrt(noise * param_var)
            return np.column_stack([m, sd, psd])
        lam = mean[:, 0]
        return np.column_stack([lam, np.sqrt(lam + param_var), np.sqrt(param_var)])

    def predict_csv(self, source: datasets.Source, out) -> tuple[int, int]:
        """Writes a CSV of predictions for every row of ``source``; returns (rows, skipped)."""
        w = csv.writer(out, lineterminator="\n")
        w.writerow(self.header())
        n = skipped = 0
        for chunk in source.chunks:
            skipped += len(chunk.skipped)
            table = self.predict(chunk.X)
            for line, row in zip(chunk.lines, table):
                if self.family.is_classifier:
                    w.writerow([int(line), self.classes[int(row[0])], *(f"{v:.6g}" for v in row[1:])])
                else:
                    w.writerow([int(line), *(f"{v:.6g}" for v in row)])
            n += len(table)
        return n, skipped
