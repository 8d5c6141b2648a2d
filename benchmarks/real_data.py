"""kalnat with no settings against one-pass baselines tuned in hindsight, on real data.

For each bundled set, rows in the given order and shuffled (seed 0), every learner predicts
each row before learning it (progressive validation, one pass) and is scored by log-loss and
accuracy (classifiers) or RMSE and Gaussian log-loss (regression), over all scored rows (a
regression's log-loss from row 3, before which its target has no scale; its RMSE from row 1)
and after the first 10. Learners, on the same online-standardised features (earlier rows only):

  kalnat, no settings   what ``kalnat learn DATA`` does with no options (the command's own
                        option defaults, through ``cli_runner.OnlineRunner``)
  kalnat variants       one change each, through the same runner: EKF at prior_var 0.1, 1, 10;
                        iterated EKF; moderated predictive (classifiers); normal–inverse-gamma
                        filter (regression); banks mixed by evidence (EKFs with one
                        linearisation only; NIG filters with faster forgetting); the default with another of the
                        command's feature-scaling schemes
  optax SGD, Adam       best of a learning-rate grid (same model, same loss)
  scikit-learn          SGDClassifier / SGDRegressor partial_fit, best of a grid
  river                 LogisticRegression / SoftmaxRegression / LinearRegression, best of a
                        learning-rate grid
  offline GLM           maximum likelihood on all rows (in-sample; and 10-fold CV): the
                        reference line, not a competitor

"Best of grid" is chosen in hindsight on the very stream it is scored on, separately for every
score column (each column shows the grid's best value): optimistic for the baselines.
Time per row: kalnat warm (a second pass on the compiled step; the first pass's compile
time is reported apart in the JSON); optax's is its grid's one vmapped, jitted scan (compile
included) over the number of grid points; scikit-learn's and river's, one grid point's loop.

Regression streams (``--regression``: diabetes, trump_approval, chick_weights and the yearly
sunspots series as an AR(9) model, whose lags are written to a CSV and read by the command
like any user's file; statsmodels bundles the series): RMSE over all rows and after row 10,
Gaussian log-loss (NLL) from row 3 (before which the target has no scale) and after row 10,
for the default, the single EKF at its best prior variance in hindsight (λ = 1; prior
variances :data:`EKF_PRIORS`, each column's best) and the baselines' grids, then one summary
row per (stream, order): the goal is default RMSE ≤ the best baseline's, default NLL ≤ the
best single EKF's.

    python benchmarks/real_data.py [--sets breast_cancer diabetes …] [--quick] [--out DIR]
    python benchmarks/real_data.py --regression [--quick]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import time
import warnings

import jax

jax.config.update("jax_enable_x64", True)

import numpy as np  # noqa: E402

from kalnat import baselines, cli, cli_choices, cli_compare, cli_report, cli_runner  # noqa: E402

SETS = ("breast_cancer", "phishing", "image_segments", "trump_approval", "diabetes")
REGRESSION_SETS = ("diabetes", "trump_approval", "chick_weights", "sunspots")
EKF_PRIORS = (0.01, 0.1, 1.0, 10.0, 100.0)
SUNSPOT_LAGS = 9
SKIP = 10  # the second score column starts after this many rows
LRS = baselines.LR_GRID
QUICK_LRS = (0.01, 0.1, 1.0)


def sklearn_grid(classifier: bool, lrs):
    """scikit-learn settings: the default schedule at several penalties (classifier: its
    'optimal' step 1/(α(t + t₀))) or initial rates (regressor: invscaling), and constant rates."""
    first = ([dict(alpha=a) for a in (1e-5, 1e-4, 1e-3, 1e-2, 1e-1)] if classifier
             else [dict(eta0=lr) for lr in lrs])
    return first + [dict(learning_rate="constant", eta0=lr) for lr in lrs]


def label(setting: dict) -> str:
    return ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in setting.items())


# ---- the stream, as `kalnat learn` reads it ----------------------------------------------

def sunspots_csv(shuffle: bool, folder: str) -> str:
    """The yearly sunspot numbers (statsmodels' copy, 1700–2008) as an AR model: a CSV of
    the :data:`SUNSPOT_LAGS` previous years (``lag1`` … ) and the year's value ``y``; rows in
    time order or shuffled with seed 0 (as ``--shuffle 0`` shuffles a bundled set)."""
    try:
        import statsmodels.api as sm
    except ImportError:
        raise SystemExit("the sunspots stream needs statsmodels, which bundles the series: "
                         "pip install statsmodels (or leave sunspots out of --sets)") from None
    s = sm.datasets.sunspots.load_pandas().data["SUNACTIVITY"].to_numpy(np.float64)
    k = SUNSPOT_LAGS
    X = np.column_stack([s[k - j: len(s) - j] for j in range(1, k + 1)])
    y = s[k:]
    order = np.random.default_rng(0).permutation(len(y)) if shuffle else np.arange(len(y))
    path = os.path.join(folder, f"sunspots{'_shuffled' if shuffle else ''}.csv")
    with open(path, "w") as f:
        f.write(",".join([f"lag{j}" for j in range(1, k + 1)] + ["y"]) + "\n")
        for i in order:
            f.write(",".join(f"{v:g}" for v in [*X[i], y[i]]) + "\n")
    return path


def command_config(name: str, shuffle: bool):
    """``(cfg, source)`` of ``kalnat learn NAME [--shuffle 0]``, from the command's own parser."""
    if name == "sunspots":
        import tempfile

        ctx = cli.learn.make_context("learn", [sunspots_csv(shuffle, tempfile.mkdtemp())])
        kw = dict(ctx.params)
        data = kw.pop("data")
        cfg, source = cli._config(kw), cli._open(data, kw)
        return cfg, dataclasses.replace(source, name="sunspots")
    ctx = cli.learn.make_context("learn", [name] + (["--shuffle", "0"] if shuffle else []))
    kw = dict(ctx.params)
    data = kw.pop("data")
    return cli._config(kw), cli._open(data, kw)


def kalnat_run(cfg, family, classes, X, y):
    """Progressive predictions of kalnat at ``cfg`` through the command's runner, and the
    seconds of a warm pass and of compilation."""
    first = cli_runner.OnlineRunner(cfg, family, classes, X.shape[1])
    t0 = time.perf_counter()
    pred = first.step(X, y)
    cold = time.perf_counter() - t0
    again = cli_runner.OnlineRunner(cfg, family, classes, X.shape[1])
    again.learner = first.learner  # the same learner object: its compiled step is reused
    t0 = time.perf_counter()
    again.step(X, y)
    warm = time.perf_counter() - t0
    return pred, warm, max(cold - warm, 0.0)


def variants(cfg, classifier: bool, gaussian: bool):
    """``(name, cfg)`` of each kalnat variant alone, then of banks, as the command builds them
    (``cfg["bank"]``: keywords of :func:`kalnat.ekf_bank`; a bank of one member is that member)."""
    one = dict(cfg, method="ekf", prior_var=1.0, forgetting=1.0)

    def bank(**kw):
        return dict(cfg, method="ekf", prior_var=None, forgetting=None, bank=kw)

    def single(**kw):
        return bank(prior_vars=(1.0,), forgettings=(1.0,), share=0.0, **kw)

    out = [(f"EKF, prior_var {v:g}", dict(one, prior_var=v)) for v in (0.1, 1.0, 10.0)]
    out.append(("iterated EKF (prior_var 1, 2 linearisations)", single(iterations=2)))
    if classifier:
        out.append(("EKF, moderated predictive (prior_var 1)", single(moderated=True)))
    if gaussian:
        out.append(("NIG filter (prior_var 1)", single(learner="nig")))
    if classifier:
        out.append(("bank of EKFs, one linearisation only", bank(iterations=1)))
    if gaussian:
        out.append(("bank of NIG filters, λ down to 0.9", bank(
            learner="nig", forgettings=(1.0, 0.998, 0.99, 0.97, 0.95, 0.9))))
    out += [(f"no settings but --scaling {sc}", dict(cfg, scaling=sc))
            for sc in cli_choices.SCALINGS if sc != cfg.get("scaling")]
    return out


# ---- one stream ------------------------------------------------------------------------------

def regression_variants(cfg):
    """``--regression``: the single EKF at each prior variance of :data:`EKF_PRIORS`, λ = 1."""
    return [(f"EKF, prior_var {v:g}", dict(cfg, method="ekf", prior_var=v, forgetting=1.0)) for v in EKF_PRIORS]


def run_stream(name: str, shuffle: bool, quick: bool, log, regression: bool = False) -> dict:
    cfg, source = command_config(name, shuffle)
    X, y, family, classes, _ = cli_compare._read_all(source, cfg)
    n = len(y)
    first = cli_report.GAUSSIAN_FIRST_SCORED_ROW - 1 if family == "gaussian" else 0
    base = cli_runner.OnlineRunner(cfg, family, classes, X.shape[1])
    fam, classifier, gaussian = base.family, base.family.is_classifier, family == "gaussian"
    metric = "accuracy" if classifier else "rmse"
    rows = []

    def score(pred):
        a, b = (baselines.scores(fam, y, pred, start=s) for s in (first, SKIP))
        # RMSE over every row (rows before the target has a scale included), as other tools report it
        m = baselines.scores(fam, y, pred, start=0)[metric] if not classifier else a[metric]
        return {"log_loss": a["log_loss"], "log_loss_10": b["log_loss"],
                metric: m, metric + "_10": b[metric]}

    def add(learner, setting, pred, sec_row, kind, **extra):
        rows.append(dict(learner=learner, setting=setting, kind=kind, ms_per_row=1e3 * sec_row,
                         **score(pred), **extra))

    log(f"{name} ({'shuffled, seed 0' if shuffle else 'given order'}): {n} rows, {X.shape[1]} features, {family}")
    more = regression_variants(cfg) if regression else variants(cfg, classifier, gaussian)
    for vname, vcfg in [("kalnat, no settings", cfg)] + more:
        log(f"  {vname}")
        kind = "kalnat" if vcfg is cfg else "variant"
        try:
            pred, warm, comp = kalnat_run(vcfg, family, classes, X, y)
        except ValueError as err:  # a diverging setting (or a failing default) is reported, not fatal
            rows.append(dict(learner=vname, setting="", kind=kind, error=str(err)))
            continue
        add(vname, f"kalnat learn {name}" + (" --shuffle 0" if shuffle else "") if kind == "kalnat" else "",
            pred, warm / n, kind, compile_s=comp, learner_name=base.learner.name if kind == "kalnat" else None)

    # Baselines see the runner's features; a gaussian target standardised online the same way.
    Z = base.scale_features(X)
    if gaussian:
        yt, center, scale, _ = cli_runner.target_affine(base.target_scaler, y)
        yt[:2] = 0.0
        yt = np.clip(yt, -cfg["clip"], cfg["clip"]) if cfg.get("clip") else yt
    else:
        yt, center, scale = y, 0.0, 1.0

    def units(pred):
        if not gaussian:
            return pred
        pred = baselines.with_noise(fam, yt, pred)
        return baselines.Predictions(mean=center + scale * pred.mean, var=scale**2 * pred.var)

    lrs = QUICK_LRS if quick else LRS
    grids = {}
    for opt in ("sgd", "adam"):
        log(f"  optax {opt}")
        t0 = time.perf_counter()
        preds = baselines.optax_grid(opt, Z, yt, fam, model=base.model, lrs=lrs)
        sec = (time.perf_counter() - t0) / len(lrs) / n
        grids[f"optax {opt.upper() if opt == 'sgd' else 'Adam'}"] = [
            (f"lr={lr:g}", units(p), sec) for lr, p in zip(lrs, preds)]
    online = [("scikit-learn SGD", baselines.sklearn_sgd, sklearn_grid(classifier, lrs))]
    if "river" in baselines.available_baselines():
        online.append(("river linear", baselines.river_linear, [dict(lr=lr) for lr in lrs]))
    for gname, fn, settings in online:
        log(f"  {gname} ({len(settings)} settings)")
        grids[gname] = []
        for s in settings:
            t0 = time.perf_counter()
            try:
                p = fn(Z, yt, fam, **s)
            except (ValueError, FloatingPointError, OverflowError):
                continue  # diverged (scikit-learn refuses to go on): that point is out of the grid
            grids[gname].append((label(s), units(p), (time.perf_counter() - t0) / n))
    for gname, points in grids.items():
        scored = [(s, score(p), sec) for s, p, sec in points]
        best = {}
        for key in ("log_loss", "log_loss_10", metric, metric + "_10"):
            vals = [sc[key] if np.isfinite(sc[key]) else (-np.inf if classifier and "acc" in key else np.inf)
                    for _, sc, _ in scored]
            k = int(np.argmax(vals) if key.startswith("acc") else np.argmin(vals))
            best[key] = (scored[k][1][key], scored[k][0])
        rows.append(dict(learner=gname + ", best of grid", setting=best["log_loss"][1], kind="baseline",
                         ms_per_row=1e3 * float(np.mean([sec for *_, sec in scored])),
                         **{k: v for k, (v, _) in best.items()},
                         best_setting={k: s for k, (_, s) in best.items()},
                         grid={s: sc for s, sc, _ in scored}))

    if regression:  # the single EKF's best prior in hindsight, each column on its own
        ekfs = [r for r in rows if r["learner"].startswith("EKF, prior_var") and "error" not in r]
        best = {k: min(ekfs, key=lambda r: r[k]) for k in ("log_loss", "log_loss_10", metric, metric + "_10")}
        rows.append(dict(learner="EKF, best prior in hindsight", kind="ekf_best",
                         setting=best["log_loss"]["learner"].replace("EKF, ", ""),
                         ms_per_row=best["log_loss"]["ms_per_row"],
                         **{k: r[k] for k, r in best.items()},
                         best_setting={k: r["learner"].replace("EKF, ", "") for k, r in best.items()}))
    log("  offline GLM")
    for lname, folds in (("offline GLM, in-sample", 0), ("offline GLM, 10-fold CV", 10)):
        t0 = time.perf_counter()
        p = baselines.offline_fit(X, y, fam, folds=folds)
        add(lname, "all rows" if not folds else "held-out folds", p, (time.perf_counter() - t0) / n,
            "offline")
    return {"data": name, "order": "shuffled (seed 0)" if shuffle else "given", "rows": n,
            "n_features": int(X.shape[1]), "family": family, "metric": metric,
            "first_scored_row": first + 1, "settings": {k: cfg.get(k) for k in (
                "model_spec", "method", "prior_var", "forgetting", "batch_size", "clip", "scaling")},
            "results": rows}


# ---- tables ------------------------------------------------------------------------------------

def _fmt(v, key):
    if v is None or not np.isfinite(v):
        return "—"
    return f"{v:.4f}" if key != "rmse" and not key.startswith("rmse") else f"{v:.4g}"


def table(report: dict, markdown: bool = False) -> str:
    m = report["metric"]
    keys = ("log_loss", "log_loss_10", m, m + "_10")
    head = ["learner", "log-loss", "log-loss >10", m, f"{m} >10", "ms/row", "best-of-grid setting (log-loss)"]
    body = []
    for r in report["results"]:
        if "error" in r:
            body.append([r["learner"], "diverged", "", "", "", "", r["error"][:60]])
            continue
        body.append([r["learner"], *(_fmt(r[k], k) for k in keys), f"{r['ms_per_row']:.3f}",
                     r["setting"] if r["kind"] in ("baseline", "ekf_best") else ""])
    title = (f"{report['data']}, {report['order']}: {report['rows']} rows, {report['family']}"
             + (f", scored from row {report['first_scored_row']}" if report["first_scored_row"] > 1 else ""))
    if markdown:
        lines = [f"**{title}**", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in body])
    widths = [max(len(str(x[i])) for x in [head, *body]) for i in range(len(head))]
    fmt = "  ".join(f"{{:<{w}}}" if i in (0, 6) else f"{{:>{w}}}" for i, w in enumerate(widths))
    return "\n".join([title, fmt.format(*head)] + [fmt.format(*r) for r in body])


SHORT = {"optax SGD": "SGD", "optax Adam": "Adam", "scikit-learn SGD": "scikit-learn", "river linear": "river"}


def summary(reports) -> str:
    """One markdown row per stream: kalnat with no settings against the best baseline of each
    column (✗: kalnat is not at or below it; accuracy: not at or above)."""
    lines = ["| set, order | log-loss (all / >10): kalnat, no settings | best baseline | "
             "accuracy or RMSE (all / >10): kalnat | best baseline | offline CV |", "|" + "---|" * 6]
    for rep in reports:
        res = {r["learner"]: r for r in rep["results"] if "error" not in r}
        if "kalnat, no settings" not in res:
            lines.append(f"| {rep['data']}, {rep['order']} | failed (see its table) | | | | |")
            continue
        ours, m = res["kalnat, no settings"], rep["metric"]
        cells = []
        for keys in (("log_loss", "log_loss_10"), (m, m + "_10")):
            sign = -1 if m == "accuracy" and keys[0] == m else 1
            best = [min((r for r in res.values() if r["kind"] == "baseline"), key=lambda r: sign * r[k])
                    for k in keys]
            cells.append(" / ".join(_fmt(ours[k], k) + ("" if sign * ours[k] <= sign * b[k] else " ✗")
                                    for k, b in zip(keys, best)))
            name = SHORT[best[0]["learner"].replace(", best of grid", "")]
            cells.append(" / ".join(_fmt(b[k], k) for k, b in zip(keys, best))
                         + f" ({name}, {best[0]['best_setting'][keys[0]]})")
        cv = res["offline GLM, 10-fold CV"]
        lines.append(f"| {rep['data']}, {rep['order']} | " + " | ".join(cells)
                     + f" | {_fmt(cv['log_loss'], 'log_loss')} / {_fmt(cv[m], m)} |")
    return "\n".join(lines)


def regression_summary(reports) -> str:
    """One markdown row per regression stream: the default against the best baseline (RMSE)
    and the single EKF's best prior (NLL), each column's best chosen in hindsight (✗: the
    default misses that goal)."""
    lines = ["| set, order | RMSE all rows: default | best baseline | RMSE after row 10: default | "
             "best baseline | NLL: default | best EKF | NLL after row 10: default | best EKF |",
             "|" + "---|" * 9]
    for rep in reports:
        res = {r["learner"]: r for r in rep["results"] if "error" not in r}
        ours = res.get("kalnat, no settings")
        if ours is None:
            lines.append(f"| {rep['data']}, {rep['order']} | failed (see its table) |" + " |" * 7)
            continue
        base = [r for r in res.values() if r["kind"] == "baseline"]
        ekf = res["EKF, best prior in hindsight"]
        cells = []
        for key, pool in (("rmse", base), ("rmse_10", base), ("log_loss", [ekf]), ("log_loss_10", [ekf])):
            b = min(pool, key=lambda r: r[key])
            name = SHORT.get(b["learner"].replace(", best of grid", ""), "EKF")
            cells += [_fmt(ours[key], key) + ("" if ours[key] <= b[key] else " ✗"),
                      f"{_fmt(b[key], key)} ({name}, {b['best_setting'][key]})"]
        lines.append(f"| {rep['data']}, {rep['order']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sets", nargs="+", default=list(SETS), metavar="NAME",
                    help=f"bundled sets (default: {' '.join(SETS)})")
    ap.add_argument("--order", choices=("given", "shuffled", "both"), default="both")
    ap.add_argument("--quick", action="store_true", help=f"learning-rate grid {QUICK_LRS} only")
    ap.add_argument("--out", metavar="DIR", help="write real_data.json and real_data.md here")
    ap.add_argument("--regression", action="store_true",
                    help=f"the regression table: {' '.join(REGRESSION_SETS)} (unless --sets), "
                    f"the default, the single EKF over prior variances {EKF_PRIORS} and the baselines")
    args = ap.parse_args(argv)
    if args.regression and args.sets == list(SETS):
        args.sets = list(REGRESSION_SETS)
    warnings.filterwarnings("ignore", category=RuntimeWarning)  # overflow in diverged grid points
    log = lambda msg: print(msg, flush=True)  # noqa: E731
    orders = {"given": (False,), "shuffled": (True,), "both": (False, True)}[args.order]
    reports = []
    t0 = time.perf_counter()
    for name in args.sets:
        for shuffle in orders:
            rep = run_stream(name, shuffle, args.quick, log, regression=args.regression)
            reports.append(rep)
            print("\n" + table(rep) + "\n", flush=True)
    overview = regression_summary(reports) if args.regression else summary(reports)
    print(overview)
    print(f"\n({time.perf_counter() - t0:.0f} s in all)")
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "real_data.json"), "w") as f:
            json.dump({"reports": reports, "quick": args.quick, "skip": SKIP}, f, indent=1,
                      default=lambda v: None if isinstance(v, float) and not math.isfinite(v) else v)
        with open(os.path.join(args.out, "real_data.md"), "w") as f:
            f.write(overview + "\n\n" + "\n\n".join(table(r, markdown=True) for r in reports) + "\n")


if __name__ == "__main__":
    main()
