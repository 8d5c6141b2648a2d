"""What ``kalnat predict`` does with a model of ``kalnat learn``: :class:`LoadedModel` rebuilds
the learner from its checkpoint, scales new rows as the stream left them, and writes predictions
with their uncertainty."""

from __future__ import annotations

import csv
import os

import numpy as np

from kalnat import checkpoint, datasets, scaling
from kalnat.cli_runner import clipped, mark_quick, member_parameters, stats_from_json
from kalnat.cli_setup import build_learner, checkpoint_settings, make_family

__all__ = ["LoadedModel"]


def read_extra(path, extra: dict) -> dict:
    """A model's settings (its checkpoint's ``extra``) as predict reads them: classes that fit
    its family, else a ``ValueError`` naming the file as damaged (an ``IndexError`` came after
    the output's header); names read without a byte-order mark, which a model learned from an
    Excel "CSV UTF-8" file before the reader dropped it kept in its first column's name (so
    that the same file's columns are found by name)."""
    family, classes = extra.get("family"), extra.get("classes")
    if family in ("bernoulli", "categorical") and not (
            isinstance(classes, list) and len(classes) >= 2 and (family == "categorical" or len(classes) == 2)):
        raise ValueError(f"{path}: damaged: its classes ({classes!r}) do not fit a {family} model")
    names = [n[1:] if isinstance(n, str) and n.startswith("\ufeff") else n for n in extra.get("feature_names") or []]
    extra = dict(extra, feature_names=names)
    if isinstance(extra.get("key_column"), str):
        extra["key_column"] = extra["key_column"].lstrip("\ufeff")
    return extra


def finite_rows(source: datasets.Source, lines, table, skip: bool = False) -> np.ndarray:
    """``(n,)`` whether each row's prediction in ``table`` is a finite number; with ``skip``
    (--skip-bad-rows) the others are left out, else the first is a ``DataError`` at its line
    (written, it would be a NaN reported as a result)."""
    ok = np.all(np.isfinite(table), axis=1)
    if not skip and not ok.all():
        raise datasets.DataError(source.name, "the model's prediction is not a finite number (a feature far "
                                 "outside the range it learned from, or a damaged model file; "
                                 "--skip-bad-rows leaves such rows out)", line=int(np.asarray(lines)[np.argmin(ok)]))
    return ok


class LoadedModel:
    """A learner restored from ``kalnat learn``'s ``model.npz`` (it predicts, it does not learn)."""

    def __init__(self, extra: dict, state, learner, family):
        self.extra, self.state, self.learner, self.family = extra, state, learner, family
        self.feature_names = extra["feature_names"]
        self.classes = extra["classes"]
        self.scaler = stats_from_json(extra["scaler"])
        self.target_scaler = stats_from_json(extra["target_scaler"]) if extra.get("target_scaler") else None

    @classmethod
    def load(cls, path) -> "LoadedModel":
        # (read_header takes a missing file for a file that is not a checkpoint)
        if not os.path.exists(path):
            raise ValueError(f"{path}: no model here (run `kalnat learn --out DIR` first)")
        extra = checkpoint.read_header(path)["extra"]
        if extra.get("kalnat_cli") != 1:
            raise ValueError(f"{path}: not written by `kalnat learn`")
        extra = read_extra(path, extra)
        classes = extra["classes"]
        family = make_family(extra["family"], len(classes) if extra["family"] == "categorical" else None)
        _, learner, template = build_learner(checkpoint_settings(extra), family, len(extra["feature_names"]))
        state = checkpoint.load(path, like=template)
        return cls(extra, state, learner, family)

    def compile_for(self, source: datasets.Source, n_parameters: int):
        """A stream of known, short length is predicted by quickly compiled programs, as ``kalnat
        learn`` learns one (:func:`kalnat.cli_runner.mark_quick`; ``n_parameters``: one
        member's); ``quick`` says whether they are."""
        self.quick = mark_quick(self.learner, source.rows_at_most, n_parameters)

    def _scale(self, X):
        X = np.asarray(X, np.float64)
        coords = self.extra.get("coords")
        if coords is not None:  # the coordinates the filter was left in (block schemes)
            center, scale = (np.asarray(a) for a in coords)
        elif self.extra.get("scaling", "running") != "running" or int(self.scaler.count) < 2:
            return np.zeros_like(X)  # fewer than two rows learned: no scale yet
        else:
            center, scale = scaling.standardizer(self.scaler)
        return clipped((X - center) / scale, float(self.extra.get("clip") or 0.0),
                        self.extra.get("coords_rows") if coords is not None else None)

    def header(self):
        if self.family.is_classifier:
            probs = [f"prob_{c}" for c in self.classes]
            std = "prob_std_"
            while any(f"{std}{c}" in probs for c in self.classes):  # a class named std_…: prob_std__…
                std += "_"
            return ["line", "predicted"] + probs + [f"{std}{c}" for c in self.classes]
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
            # the delta method's variance, linear in θ's covariance, is not bounded where θ is
            # uncertain; no probability of mean p varies by more than p (1 − p)
            return np.column_stack([np.argmax(probs, 1), probs, np.sqrt(np.clip(var, 0, probs * (1 - probs)))])
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

    def predict_csv(self, source: datasets.Source, out, skip_bad_rows: bool = False) -> tuple[int, int]:
        """Writes a CSV of predictions for every row of ``source``; returns (rows, skipped)
        (:func:`finite_rows`: with ``skip_bad_rows``, a row predicted as no finite number is
        skipped)."""
        self.compile_for(source, member_parameters(self.learner, self.state.params))
        w = csv.writer(out, lineterminator="\n")
        w.writerow(self.header())
        n = skipped = 0
        for chunk in source.chunks:
            skipped += len(chunk.skipped)
            table = self.predict(chunk.X)
            ok = finite_rows(source, chunk.lines, table, skip_bad_rows)
            skipped += int(np.count_nonzero(~ok))
            for line, row in zip(np.asarray(chunk.lines)[ok], table[ok]):
                if self.family.is_classifier:
                    w.writerow([int(line), self.classes[int(row[0])], *(f"{v:.6g}" for v in row[1:])])
                else:
                    w.writerow([int(line), *(f"{v:.6g}" for v in row)])
            n += int(np.count_nonzero(ok))
        return n, skipped
