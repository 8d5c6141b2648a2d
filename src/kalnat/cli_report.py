"""The report of ``kalnat learn``: progressive scores, the learning curve, metrics.json, and
every row's prediction as CSV (``--predictions``)."""

from __future__ import annotations

import csv
import math

import numpy as np

import kalnat
from kalnat import baselines, families

__all__ = ["GAUSSIAN_FIRST_SCORED_ROW", "SKIP_ROWS", "Accumulator", "PredictionWriter", "prediction_table",
           "run_metrics", "bank_report", "learner_text", "member_label"]

# a gaussian target is scored from this row on: before it, the target has no scale
GAUSSIAN_FIRST_SCORED_ROW = 3
# metrics.json's second RMSE starts after this many rows (the first ones mostly measure the
# empty start every one-pass learner shares)
SKIP_ROWS = 10


def shown(value, spec: str) -> str:
    """A score as the command prints it: ``format(value, spec)``, or "not scored" for ``None``
    (too few rows, or none after the first SKIP_ROWS: :meth:`Accumulator.final`)."""
    return "not scored" if value is None else format(value, spec)


def _window(sums, i):
    """The mean log-loss of the rows scored between point ``i`` of the curve and the one before
    it (the first: since the start), from ``sums``: (rows scored, their summed log-loss) at each,
    the rows scored growing from point to point (``add`` makes a point only after a row)."""
    n, ll = sums[i]
    n0, ll0 = sums[i - 1] if i % len(sums) else (0, 0.0)
    return float((ll - ll0) / (n - n0))


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
        self.curve = {"row": [], "log_loss": [], self.key: [], "window_log_loss": []}
        self._sums = []     # (rows scored, their summed log-loss) at each point of the curve
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
        self._sums.append((count, float(cum_ll)))
        c["window_log_loss"].append(_window(self._sums, -1))
        if len(c["row"]) > self.MAX_POINTS:  # thin to every other point (the last one stays)
            for k in c:
                c[k] = c[k][-1::-2][::-1]
            if self.weights is not None:
                self.weights = self.weights[-1::-2][::-1]
            self._sums = self._sums[-1::-2][::-1]
            # a kept point's recent rows are now those since the point kept before it
            c["window_log_loss"] = [_window(self._sums, i) for i in range(len(self._sums))]

    def final(self) -> dict:
        """The scores over the rows scored so far; ``None`` (JSON's null) where no row was
        scored (a gaussian target's first two rows are not, nor its first SKIP_ROWS for the
        second RMSE): a number that is not one, not NaN."""
        out = {"log_loss": self.sum_ll / self.n if self.n else None, "rows_scored": self.n}
        metric = self.sum_m / self.n if self.n else None
        out[self.key] = metric if self.family.is_classifier or metric is None else math.sqrt(metric)
        if not self.family.is_classifier:
            out["rmse_all_rows"] = math.sqrt(self.sq_all / self.seen) if self.seen else None
            out[f"rmse_after_row_{SKIP_ROWS}"] = (math.sqrt(self.sq_after / self.n_after)
                                                  if self.n_after else None)
        return out


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


def prediction_table(pred: baselines.Predictions) -> np.ndarray:
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
        "settings": {**{k: cfg.get(k) for k in ("model_spec", "method", "prior_var", "forgetting",
                                                  "batch_size", "clip", "seed")},
                     "covariance": runner.covariance},   # auto resolved
        "scaling": runner.scheme,
        "learner": runner.learner.name,
        "learner_text": learner_text(runner.learner, cfg, runner.dtype, runner.covariance),
        "dtype": runner.dtype,
        # the chunk program compiled quickly (a short stream: kalnat.cli_runner.QUICK_WORK)
        "quick_compile": bool(getattr(runner, "quick", False)),
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


def learner_text(learner, cfg: dict, dtype: str = "float64", covariance: str = "full") -> str:
    """What runs, in words: ``"ekf"`` or ``"bank of 40 EKFs (1 or 2 linearisations)"``, with
    ``", lowrank:10 covariance"`` when the covariance is structured and ``" in float32"`` when
    it computes in float32."""
    more = ("" if covariance == "full" else f", {covariance} covariance") + (" in float32" if dtype == "float32" else "")
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
