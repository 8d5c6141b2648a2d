"""``kalnat compare``: one stream through kalnat and the baselines, scored identically.

Every one-pass learner sees the same rows in the same order, standardised online the same
way (:mod:`kalnat.cli_runner`'s conventions), and predicts each row before learning it. The
scores are progressive log-loss and accuracy (classifiers) or RMSE, in the target's own
units. Best-of-grid settings are chosen on the stream they are scored on, which flatters
them; kalnat's default settings are reported on their own line for that reason.
"""

from __future__ import annotations

import math
import time
from typing import Callable, Optional

import numpy as np

from kalnat import baselines, cli_choices, cli_report, cli_runner, cli_setup, datasets, plots

__all__ = ["KALNAT_GRID", "run", "format_table", "plot"]

KALNAT_GRID = tuple((pv, lam) for pv in (0.1, 0.3, 1.0) for lam in (1.0, 0.99))

# A grid's run whose progressive log-loss is not finite, or this large, diverged: it is not a
# grid's best, and its table line says "diverged" rather than a number
DIVERGED_LOG_LOSS = 1e6


def diverged(log_loss) -> bool:
    """Whether a scored run diverged (``None``: no row was scored, which is not divergence)."""
    return log_loss is not None and not (math.isfinite(log_loss) and log_loss < DIVERGED_LOG_LOSS)


def _best(losses: list) -> Optional[int]:
    """The index of the least of a grid's log-losses that were scored and did not diverge."""
    kept = [i for i, v in enumerate(losses) if v is not None and not diverged(v)]
    return min(kept, key=lambda i: losses[i]) if kept else None


def _why_none(losses: list) -> str:
    return "every setting diverged" if any(diverged(v) for v in losses) else "no row scored"


def _cell(value, spec: str, log_loss: bool = True) -> str:
    """A score in the table: "not scored" (``None``), "diverged" (not finite, or a log-loss
    past DIVERGED_LOG_LOSS; an RMSE in the target's units may be any size), else the number."""
    if value is not None and (diverged(value) if log_loss else not math.isfinite(value)):
        return "diverged"
    return cli_report.shown(value, spec)


def _read_all(source: datasets.Source, cfg: dict, log):
    Xs, ys, lines, skipped = [], [], [], []
    for chunk in source.chunks:
        skipped.extend(chunk.skipped)
        Xs.append(chunk.X)
        ys.append(chunk.y)
        lines.append(chunk.lines)
    if not Xs or not sum(len(y) for y in ys):
        raise datasets.DataError(source.name, "no data rows")
    X, y_raw, lines = np.concatenate(Xs), np.concatenate(ys), np.concatenate(lines)
    family, classes, coder = cli_setup.first_chunk_task(cfg, source, y_raw[:10_000], log)
    y, good = coder.encode(source.name, y_raw, lines, source.target_name,
                           bool(cfg.get("skip_bad_rows")), skipped)
    return X[good], y[good], family, classes, len(skipped)


def _timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def run(source: datasets.Source, cfg: dict, *, lrs=baselines.LR_GRID, kalnat_grid: bool = True,
        log: Optional[Callable[[str], None]] = None) -> dict:
    """Scores of kalnat and every available baseline on ``source`` (held in memory)."""
    log = log or (lambda m: None)
    X, y, family, classes, n_skipped = _read_all(source, cfg, log)
    n = len(y)
    start = cli_report.GAUSSIAN_FIRST_SCORED_ROW - 1 if family == "gaussian" else 0
    log(f"{source.name}: {n} rows, {X.shape[1]} features, {family}"
        + (f", {len(classes)} classes" if classes else ""))

    def score(pred):
        return baselines.scores(family, y, pred, start=start)

    results, grids = [], {}

    def add(name, setting, pred, seconds, kind="one-pass"):
        s = score(pred)
        s.update(name=name, setting=setting, kind=kind, seconds_per_row=seconds / n)
        results.append(s)
        return s

    # kalnat, as configured, then over a small grid of priors and forgetting factors.
    # (rows=n: a short set's programs compiled quickly, as kalnat learn compiles them)
    def kalnat_run(c):
        runner = cli_runner.OnlineRunner(c, family, classes, X.shape[1], rows=n)
        return _timed(lambda: runner.step(X, y))

    runner = cli_runner.OnlineRunner(cfg, family, classes, X.shape[1], rows=n)
    quick = runner.quick
    if runner.bank:
        name, setting = "kalnat", "no settings: " + cli_report.learner_text(runner.learner, cfg, runner.dtype, runner.covariance)
    else:
        pv, lam = cli_setup.single_settings(cfg)
        name, setting = f"kalnat {cfg['method']}", f"prior_var={pv:g}, λ={lam:g}" + (
            ", float32" if runner.dtype == "float32" else "")
    log(f"  {name} ({setting}) …")
    pred, secs = _timed(lambda: runner.step(X, y))
    add(name, setting, pred, secs)
    if kalnat_grid:
        grid = {}
        for pv, lam in KALNAT_GRID:
            log(f"  kalnat grid prior_var={pv}, λ={lam} …")
            c = dict(cfg, prior_var=pv, forgetting=lam)
            try:
                p, s = kalnat_run(c)
                grid[(pv, lam)] = (score(p), p, s)
            except ValueError as err:  # a diverging setting is reported, not fatal
                grid[(pv, lam)] = ({"log_loss": math.inf, "error": str(err)}, None, 0.0)
        grids["kalnat"] = {f"prior_var={pv:g}, λ={lam:g}": g[0]["log_loss"] for (pv, lam), g in grid.items()}
        settings = list(grid)
        k = _best([grid[c][0]["log_loss"] for c in settings])
        if k is None:
            log(f"    no best of the kalnat grid: {_why_none([g[0]['log_loss'] for g in grid.values()])}")
        else:
            (pv, lam), (_, p, s) = settings[k], grid[settings[k]]
            add(f"kalnat {cfg['method']}, best of grid", f"prior_var={pv:g}, λ={lam:g}", p, s)

    # The same features (and, for a gaussian, the same standardised target) for every baseline.
    runner = cli_runner.OnlineRunner(cfg, family, classes, X.shape[1])
    Z = runner.scale_features(X)
    if family == "gaussian":
        yt, center, scale, _ = cli_runner.target_affine(runner.target_scaler, y)
        yt[:2] = 0.0
        clip = float(cfg.get("clip") or 0.0)
        yt = np.clip(yt, -clip, clip) if clip > 0 else yt

        def to_units(pred):
            pred = baselines.with_noise(family, yt, pred)
            return baselines.Predictions(mean=center + scale * pred.mean, var=scale**2 * pred.var)
    else:
        yt = y

        def to_units(pred):
            return pred

    fam = runner.family
    for opt in ("sgd", "adam"):
        log(f"  {opt} over learning rates {', '.join(f'{v:g}' for v in lrs)} …")
        preds, secs = _timed(lambda: baselines.optax_grid(opt, Z, yt, fam, model=runner.model, lrs=lrs))
        sc = [score(to_units(p)) for p in preds]
        grids[opt] = {f"lr={lr:g}": s["log_loss"] for lr, s in zip(lrs, sc)}
        k = _best([s["log_loss"] for s in sc])
        if k is None:  # no best of grid to table (each learning rate's line says why)
            log(f"    no best of the {opt} grid: {_why_none([s['log_loss'] for s in sc])}")
            continue
        add(f"{opt} (optax), best of grid", f"lr={lrs[k]:g}", to_units(preds[k]), secs / len(lrs))

    linear_only = cli_choices.parse_model(cfg["model_spec"])[0] == "linear"
    for name, label in (("sklearn_sgd", "scikit-learn SGD partial_fit"), ("river", "river linear model")):
        if name not in baselines.available_baselines():
            continue
        log(f"  {label} …")
        try:
            pred, secs = _timed(lambda: baselines.run_baseline(name, Z, yt, fam))
        except ValueError as err:  # e.g. no online Poisson learner in that library
            log(f"    skipped: {err}")
            continue
        add(label, "defaults" + ("" if linear_only else ", linear"), to_units(pred), secs)

    log("  offline maximum-likelihood fit …")
    for name, setting, folds in (
            ("offline GLM, in-sample", "all rows, weak L2" if fam.is_classifier or family == "poisson" else "all rows", 0),
            ("offline GLM, 10-fold CV", "held-out folds", 10)):
        try:
            pred, secs = _timed(lambda: baselines.offline_fit(X, y, fam, folds=folds))
        except ValueError as err:  # too few rows, or one class: a reference line that cannot be had
            log(f"    {name} skipped: {err}")
            continue
        add(name, setting, pred, secs, kind="offline")

    return {"data": source.name, "rows": n, "rows_skipped": n_skipped, "n_features": int(X.shape[1]),
            "family": family, "classes": classes, "metric": "accuracy" if fam.is_classifier else "rmse",
            "first_scored_row": start + 1, "dtype": runner.dtype, "quick_compile": quick,
            "settings": {k: cfg.get(k) for k in ("model_spec", "method", "prior_var", "forgetting",
                                                   "batch_size", "clip", "seed")},
            "protocol": ("progressive validation, one pass, given order; features standardised "
                         "online (earlier rows only); best-of-grid settings are chosen on the "
                         "scored stream (optimistic for them)"),
            "results": results, "grids": grids}


def format_table(report: dict) -> str:
    """The comparison as a plain-text table (the README shows this output)."""
    metric = report["metric"]
    head = ("learner", "setting", "log-loss", metric, "ms/row")
    rows = []
    for r in report["results"]:
        m = r.get(metric, math.nan)
        rows.append((r["name"], r["setting"], _cell(r["log_loss"], ".4f"),
                     _cell(m, ".4f" if metric == "accuracy" else ".4g", log_loss=False),
                     f"{1e3 * r['seconds_per_row']:.3f}"))
    widths = [max(len(str(x[i])) for x in [head, *rows]) for i in range(len(head))]
    fmt = "  ".join(f"{{:<{w}}}" if i < 2 else f"{{:>{w}}}" for i, w in enumerate(widths))
    lines = [f"{report['data']}: {report['rows']} rows, {report['n_features']} features, "
             f"{report['family']}, model {report['settings']['model_spec']}; progressive scores"
             + (f" from row {report['first_scored_row']}" if report["first_scored_row"] > 1 else ""),
             fmt.format(*head), "  ".join("-" * w for w in widths)]
    lines += [fmt.format(*r) for r in rows]
    for name, grid in report["grids"].items():
        lines.append(f"  {name} grid (log-loss): " + ", ".join(
            f"{k} {_cell(v, '.4f')}" for k, v in grid.items()))
    return "\n".join(lines)


def plot(report: dict, path: str) -> str:
    curves = {r["name"]: (r["curve"]["row"], r["curve"]["log_loss"])
              for r in report["results"] if r["kind"] == "one-pass"}
    refs = {r["name"]: r["log_loss"] for r in report["results"]
            if r["kind"] == "offline" and r["log_loss"] is not None and math.isfinite(r["log_loss"])}
    plots.comparison(curves, refs, path, title=f"{report['data']} ({report['family']})")
    return path
