"""The ``kalnat`` command: learn a stream, predict with uncertainty, compare, verify.

    kalnat learn                       # a bundled real data set, report in ./kalnat-report
    kalnat learn data.csv --target y   # a CSV file (or - for standard input), in chunks
    kalnat predict --model-dir kalnat-report new.csv
    kalnat compare diabetes            # kalnat against SGD, Adam, scikit-learn, river, offline
    kalnat verify                      # the equivalences of docs/method.md on random problems
    kalnat datasets                    # the bundled real data sets

Every row is predicted before it is learned (progressive validation); features are
standardised with statistics of earlier rows only. User errors (a bad CSV cell, a missing
column, an unknown data set) end with a one-line message naming the file, line and column,
never a traceback.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import sys

import click
import numpy as np

from kalnat.cli_choices import (
    AUTO_FLOAT32_ABOVE, AUTO_FULL_MAX, COVARIANCES, DEFAULT_RANK, DEFAULT_SCALING, DTYPES, FAMILIES, METHOD_NAMES,
    SCALINGS, parse_covariance, parse_delimiter, parse_model, resolve_dtype,
)
from kalnat.cli_files import (check_folder, check_output, folder_for, make_folder, output_file, remove_stale,
                              write_json)
from kalnat.datasets import DataError

CONTEXT = dict(help_option_names=["-h", "--help"], max_content_width=100)

# JAX's persistent compilation cache: a second run of the same job skips XLA's compilation.
# Its folder also keeps the bundled data sets once read (a subfolder ``datasets``).
CACHE_ENV = "KALNAT_CACHE_DIR"      # where (default: the user's cache folder, kalnat/jax)
NO_CACHE_ENV = "KALNAT_NO_CACHE"    # set to 1 to turn it off
# its size: KALNAT_CACHE_MAX_MB (kalnat.cache)


def cache_dir():
    """The compilation cache's folder, or ``None`` when it is off (:data:`NO_CACHE_ENV`)."""
    if os.environ.get(NO_CACHE_ENV, "").strip() not in ("", "0"):
        return None
    path = os.environ.get(CACHE_ENV)
    if not path:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        path = os.path.join(base, "kalnat", "jax")
    return path


def _jax():
    """Imports jax for a command that computes: float64 enabled (the filters run in it unless
    ``--dtype``, or its ``auto``, says float32) and the persistent compilation cache (safe to
    delete: it holds compiled programs, keyed by the program, JAX's version and the machine, and
    copies of bundled data sets)."""
    import jax

    from kalnat.cli_runner import quick_setting

    quick_setting()  # a bad KALNAT_QUICK_COMPILE is told before any row is read
    jax.config.update("jax_enable_x64", True)
    path = cache_dir()
    if path is not None:
        jax.config.update("jax_compilation_cache_dir", path)
        # every program, however quick to compile: the command's are many and small
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
        # held within KALNAT_CACHE_MAX_MB, least recently used first (added up once a day)
        from kalnat import cache

        cache.maintain(path)
    return jax


class _Group(click.Group):
    """Turns the library's ``ValueError`` s into click errors (a message, no traceback)."""

    def invoke(self, ctx):
        try:
            # A baseline that diverges (compare's largest rates) is reported as such; NumPy's
            # overflow warnings on the way are not for the terminal.
            with np.errstate(all="ignore"):
                return super().invoke(ctx)
        except DataError as err:
            raise click.ClickException(str(err)) from None
        except ValueError as err:
            raise click.ClickException(str(err)) from None


@click.group(cls=_Group, context_settings=CONTEXT)
@click.version_option(package_name="kalnat")
def cli():
    """One-pass online learning where the extended Kalman filter is natural gradient."""


def main(argv=None):
    """The command, for a caller in Python (it ends with ``SystemExit``, as click's commands do).
    JAX is imported by the commands that compute, not for ``--help``, ``datasets`` or an argument
    error."""
    return cli.main(args=argv, prog_name="kalnat")


def run(argv=None):
    """The ``kalnat`` executable (and ``python -m kalnat.cli``): :func:`main`, then a quick exit.
    It ends the process: from Python, call :func:`main`.

    Python's teardown of a process that imported JAX (its CPU client and compiled programs, then
    every module's objects) took about 0.2 s of a 1.6 s warm ``kalnat learn`` (benchmarks/
    startup.py). When the command has finished, nothing of it needs that teardown: its files are
    closed, and here the exit handlers run (JAX's, logging's) and the outputs are flushed before
    the process ends with the command's status. Python's own exit is kept where the command did
    not import JAX, a thread other than a daemon one still runs, an output cannot be flushed
    (Python then reports it), or the status is not a number; an exception other than
    ``SystemExit`` passes.

    SIGTERM (a job's time limit, ``kill``) ends the command as an exception would, with status
    143 (128 + 15, the shell's for it): an output being written under a temporary name is then
    removed (:func:`kalnat.cli_files.output_file`), where Python's default ends the process
    at once and leaves it.
    """
    import signal

    def stop(signum, frame):
        raise SystemExit(128 + signum)

    with contextlib.suppress(ValueError):   # (only the main thread may set a handler)
        signal.signal(signal.SIGTERM, stop)
    try:
        main(argv)
        code = 0
    except SystemExit as stop:
        code = 0 if stop.code is None else stop.code
    import threading

    if ("jax" not in sys.modules or not isinstance(code, int)
            or any(t.is_alive() and not t.daemon for t in threading.enumerate() if t is not threading.main_thread())
            or not _flushed()):
        raise SystemExit(code)
    import atexit

    atexit._run_exitfuncs()  # what Python's exit runs before its teardown (and then forgets)
    if not _flushed():
        raise SystemExit(code)
    os._exit(code)


def _flushed() -> bool:
    """Whether standard output and error (either may be ``None``: closed when Python started)
    were flushed without an error."""
    try:
        for out in (sys.stdout, sys.stderr):
            if out is not None:
                out.flush()
    except (OSError, ValueError):
        return False
    return True


# ---- the learner the options describe ------------------------------------------------------

def _settings_options(f):
    opts = [
        click.option("--target", metavar="COL", help="Target column (default: a column named "
                     "target/label/class/y, else the last column)."),
        click.option("--family", type=click.Choice(FAMILIES), help="Output distribution "
                     "(default: inferred from the target values of the first chunk)."),
        click.option("--classes", metavar="A,B,…", help="Class labels, in order (default: "
                     "those of the first chunk, or 0..max for integer labels)."),
        click.option("--model", "model_spec", default="linear", show_default=True,
                     metavar="linear|mlp:64,32", help="Model: a GLM or an MLP (tanh)."),
        click.option("--method", default="ekf", show_default=True,
                     type=click.Choice(list(METHOD_NAMES)),
                     help="Learner: ekf, ekf-joseph, information and natgrad (configured by the "
                     "exact Kalman translation) are one filter in four forms; sqrt-ekf keeps a "
                     "Cholesky factor (float32, ill-scaled data); iterated relinearises twice per "
                     "update; nig (gaussian targets) learns the noise scale."),
        click.option("--covariance", default="auto", show_default=True, metavar="|".join(COVARIANCES),
                     help="How θ's uncertainty is stored: the full covariance, its diagonal (O(d) "
                     "memory, the variational-diagonal EKF), one block per layer's weights and "
                     "biases (the decoupled EKF), a diagonal plus rank-K precision (O(d K), LoFi's "
                     "form), a full last layer with rank K for the rest, or Kronecker factors per dense layer "
                     "(K-FAC's form). auto: full up to "
                     f"{AUTO_FULL_MAX} parameters, lowrank:{DEFAULT_RANK} beyond. For --method ekf, "
                     "iterated and nig, and the bank."),
        click.option("--dtype", default="auto", show_default=True, metavar="|".join(DTYPES),
                     help="The filters' numbers: auto is float32 where the covariances together (a "
                     f"bank's members all) hold more than {AUTO_FLOAT32_ABOVE} numbers (digits' "
                     "default bank: each row's update then waits on the memory, and float32 "
                     "takes 0.7 × the time), float64 below (one filter to 1 024 parameters)."),
        click.option("--forget", "forgetting", default=None, type=float,
                     metavar="λ", help="Forgetting factor in (0, 1]; < 1 follows drift "
                     "(natural gradient with learning rate → 1 − λ). Default, with no "
                     "--prior-var either: a bank of EKFs over priors and forgetting factors, "
                     "mixed by their evidence; otherwise 1."),
        click.option("--prior-var", default=None, type=float, metavar="V",
                     help="Prior variance of each parameter (gaussian: in units of the noise). "
                     "Default: chosen by the bank (see --forget); otherwise 1."),
        click.option("--batch-size", default=1, show_default=True, type=click.IntRange(1),
                     help="Rows per update (one linearisation point)."),
        click.option("--clip", default=5.0, show_default=True, type=float,
                     help="Clip standardised features to ±CLIP (0: no clipping); a gaussian "
                     "target's default or nig learner on a linear model (block scalings): "
                     "features and target to ±max(CLIP, √(n−1)) in coordinates from n rows."),
        click.option("--scaling", type=click.Choice(list(SCALINGS)), default=DEFAULT_SCALING,
                     show_default=True, help="Feature standardisation (earlier rows only): "
                     "running moves under the filter; follow and reprior freeze the statistics "
                     "between rows 2, 4, 8, … and re-express the filter in the new coordinates, "
                     "reprior with its prior reset there."),
        click.option("--seed", default=0, show_default=True, type=int,
                     help="Seed of the MLP's initial weights."),
        click.option("--shuffle", type=click.IntRange(0), default=None, metavar="SEED",
                     help="Shuffle a bundled data set's rows with this seed (CSV: read in order)."),
        click.option("--chunk-rows", default=10_000, show_default=True, type=click.IntRange(1),
                     help="Rows read and learned per chunk (memory is bounded by this)."),
        click.option("--skip-bad-rows", is_flag=True, help="Skip malformed rows (counted in the "
                     "report) instead of stopping at the first one."),
        click.option("--delimiter", default=",", show_default=True, help="CSV field separator: one "
                     "character, or tab (also \\t), comma, semicolon, space, pipe."),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


def _config(kw) -> dict:
    cfg = {k: kw[k] for k in ("target", "family", "classes", "model_spec", "method", "forgetting",
                              "prior_var", "batch_size", "clip", "scaling", "seed", "skip_bad_rows",
                              "covariance", "dtype")}
    if cfg["classes"]:
        cfg["classes"] = [c.strip() for c in cfg["classes"].split(",") if c.strip()]
        twice = _twice(cfg["classes"])
        if twice is not None:  # (the second '0' took label 0's index, and the first was never predicted)
            raise click.BadParameter(f"the label {twice!r} is given twice", param_hint="--classes")
        if cfg["family"] in ("gaussian", "poisson"):
            raise click.BadParameter(f"labels of classes, for a bernoulli or categorical target, not a "
                                     f"{cfg['family']} one", param_hint="--classes")
    # early, clear usage errors (status 2, as click's own) for a bad --model, --covariance, --dtype
    _option_value(functools.partial(parse_model, strict=True), cfg["model_spec"], "--model")
    _option_value(parse_covariance, cfg["covariance"], "--covariance")
    _option_value(lambda spec: resolve_dtype(spec, 0), cfg["dtype"], "--dtype")
    if cfg["forgetting"] is not None and not 0 < cfg["forgetting"] <= 1:
        raise click.BadParameter("must lie in (0, 1]", param_hint="--forget")
    if cfg["prior_var"] is not None and not 0 < cfg["prior_var"] < float("inf"):
        raise click.BadParameter("must be a positive number", param_hint="--prior-var")
    if not 0 <= cfg["clip"] < float("inf"):
        raise click.BadParameter("must be 0 (no clipping) or a positive number", param_hint="--clip")
    return cfg


def _twice(values):
    """The first of ``values`` that an earlier one equals, or ``None``."""
    return next((v for i, v in enumerate(values) if v in values[:i]), None)


def _option_value(parse, value, hint: str):
    """``parse(value)``, its ``ValueError`` (worded ``"--option 'value': …"`` by
    :mod:`kalnat.cli_choices`) a usage error of ``hint``."""
    try:
        return parse(value)
    except ValueError as err:
        text = str(err)
        raise click.BadParameter(text[len(hint) + 1:] if text.startswith(hint + " ") else text,
                                 param_hint=hint) from None


def _open(data, kw, **more):
    from kalnat import datasets

    folder = cache_dir()
    delimiter = _option_value(parse_delimiter, kw["delimiter"], "--delimiter")
    return datasets.open_source(data, target=kw.get("target"), chunk_rows=kw["chunk_rows"],
                                skip_bad_rows=kw["skip_bad_rows"], delimiter=delimiter,
                                shuffle_seed=kw.get("shuffle"),
                                cache_dir=None if folder is None else os.path.join(folder, "datasets"), **more)


# ---- learn ------------------------------------------------------------------------------------

@cli.command(context_settings=CONTEXT)
@click.argument("data", required=False, default=None, metavar="[DATA]")
@_settings_options
@click.option("--out", "out_dir", default="kalnat-report", show_default=True,
              type=click.Path(file_okay=False), help="Report folder.")
@click.option("--quiet", is_flag=True, help="No progress bar or summary.")
@click.option("--figures/--no-figures", default=True, show_default=True,
              help="Draw the report's PNG figures (learning curves, a bank's weights, a confusion "
              "matrix). Without them no PNG is written; the rest of the report is written as "
              "usual, with the same numbers (e.g. for many runs in a script).")
@click.option("--predictions", "predictions_path", default=None, type=click.Path(dir_okay=False),
              metavar="PATH", help="Also write every row's progressive prediction (made before the "
              "row was learned) as CSV: row (1-based, stream order), then mean,sd (gaussian, "
              "poisson) or p_<class> per class; NaN for a skipped row.")
@click.option("--key", metavar="COL", default=None, help="Learn one model per value of this column "
              "(a user, a sensor, …; not a feature): per-key and pooled scores (CSV only).")
@click.option("--workers", type=click.IntRange(1), default=None, help="With --key: learn on a local Dask "
              "cluster of this many worker processes, keys hashed to one shard per worker (kalnat[dask]).")
@click.option("--scheduler", metavar="ADDRESS", default=None, help="With --key: learn on the Dask cluster "
              "of this scheduler (kalnat[dask]).")
def learn(data, out_dir, quiet, figures, key, workers, scheduler, predictions_path=None, **kw):
    """Learn DATA in one pass and write a report folder.

    DATA is a CSV file with a header row, - for standard input, or a bundled data set's name
    (see `kalnat datasets`); default: breast_cancer. The report folder gets metrics.json
    (progressive log-loss, accuracy or RMSE, over time; rows seen and skipped; time per
    row), model.npz (the final learner state for `kalnat predict`) and PNG figures:
    learning curves, a bank's weights, a confusion matrix (none with --no-figures).
    """
    from kalnat import datasets

    cfg = _config(kw)
    check_folder(out_dir, "--out")
    if (workers or scheduler) and key is None:
        raise click.UsageError("--workers and --scheduler distribute the keys of --key COLUMN; pass --key")
    if workers and scheduler:
        raise click.UsageError("--workers starts a local cluster, --scheduler joins one: pass one of them")
    if key is not None and predictions_path is not None:
        raise click.UsageError("--predictions writes one stream's predictions; with --key the report "
                               "folder's per_key.csv has each key's scores")
    check_output(predictions_path, "--predictions", data=data, report=out_dir)
    source = _open(data or datasets.DEFAULT_DATASET, kw, key=key)  # a missing file fails here, before JAX
    from kalnat.figure_workers import FigureWorkers

    with source:  # a run that stops closes its file
        if key is not None:
            if click.get_current_context().get_parameter_source("scaling") == click.core.ParameterSource.DEFAULT:
                cfg["scaling"] = "running"  # statistics pooled over keys (kalnat.cli_keyed)
            # one figure job, the learning curves (none with --no-figures: no workers, None)
            with FigureWorkers(1) if figures else contextlib.nullcontext() as drawing:
                return _learn_keyed(source, cfg, out_dir, quiet, workers, scheduler, drawing)
        # (the workers start before JAX is imported: see kalnat.figure_workers)
        with FigureWorkers() if figures else contextlib.nullcontext() as drawing:
            _learn_single(source, cfg, out_dir, quiet, predictions_path, drawing)


def _learn_single(source, cfg, out_dir, quiet, predictions_path, figures):
    """``figures``: the :class:`kalnat.figure_workers.FigureWorkers` that draw the report's
    figures, or ``None`` (--no-figures)."""
    _jax()
    from kalnat import cli_learn, cli_report

    # (output_file: complete, or not written; folder_for: --predictions inside --out, made for it)
    with folder_for(predictions_path, out_dir, "--out"), output_file(predictions_path, "--predictions") as pred_file:
        folder = cache_dir()
        result = cli_learn.learn_stream(source, cfg, progress=not quiet,
                                        log=None if quiet else (lambda m: click.echo(m, err=True)),
                                        predictions=pred_file,
                                        programs=None if folder is None else os.path.join(folder, "programs"))
    make_folder(out_dir, "--out")
    metrics = result.metrics
    metric = "accuracy" if result.is_classifier else "rmse"
    what = metrics["learner_text"]
    drawn = []
    if figures is not None:
        drawn.append(figures.draw("learning_curves", metrics["curve"], metric, os.path.join(out_dir, "learning_curve"),
                                  title=f"{source.name}: {what}, {cfg['model_spec']}, {result.family_name}"))
        if "bank" in metrics:
            b = metrics["bank"]
            drawn.append(figures.draw("bank_weights", b["curve"]["row"], b["curve"]["weights"],
                                      [cli_report.member_label(c) for c in b["members"]],
                                      os.path.join(out_dir, "bank_weights.png"),
                                      title=f"{source.name}: weights of the bank's members"))
        if "confusion" in metrics:
            drawn.append(figures.draw("confusion", metrics["confusion"], metrics["classes"],
                                      os.path.join(out_dir, "confusion.png"),
                                      title=f"{source.name}: progressive confusion matrix"))
    result.save(os.path.join(out_dir, "model.npz"))  # while the figures are drawn
    pngs = []
    for job in drawn:  # learning_curves draws two files, the others one
        made = job.result()
        pngs.extend(made if isinstance(made, list) else [made])
    metrics["files"] = {"model": "model.npz", "plots": [os.path.basename(p) for p in pngs]}
    remove_stale(out_dir, metrics["files"])
    write_json(os.path.join(out_dir, "metrics.json"), metrics)
    if not quiet:
        final = metrics["final"]
        shown = cli_report.shown
        main_metric = (f"accuracy {shown(final['accuracy'], '.4f')}" if result.is_classifier
                       else f"RMSE {shown(final['rmse_all_rows'], '.4g')} over all rows, "
                       f"{shown(final[f'rmse_after_row_{cli_report.SKIP_ROWS}'], '.4g')} after row {cli_report.SKIP_ROWS}")
        skipped = f", {metrics['rows_skipped']} skipped" if metrics["rows_skipped"] else ""
        click.echo(f"{source.name}: {metrics['rows_seen']} rows{skipped}, {result.family_name}, "
                   f"{what} on {cfg['model_spec']} ({metrics['n_parameters']} parameters)")
        from_row = f" (from row {metrics['first_scored_row']})" if metrics["first_scored_row"] > 1 else ""
        click.echo(f"  progressive log-loss{from_row} {shown(final['log_loss'], '.4f')}  {main_metric}  "
                   f"({1e3 * metrics['seconds_per_row']:.3f} ms/row)")
        if "bank" in metrics:
            b = metrics["bank"]
            top = sorted(zip(b["final_weights"], b["members"]), key=lambda t: -t[0])[:3]
            click.echo("  bank weights: " + ", ".join(f"{cli_report.member_label(c)}: {w:.2f}" for w, c in top))
        files = ["metrics.json", *metrics["files"]["plots"], "model.npz"]
        click.echo(f"  report: {out_dir}/ ({', '.join(files)})")


def _dask_client(workers, scheduler):
    try:
        import distributed
    except ImportError:
        raise click.ClickException("--workers and --scheduler need Dask: pip install 'kalnat[dask]'") from None
    if scheduler:
        try:
            return distributed.Client(scheduler), None
        except (OSError, ValueError) as err:  # refused, timed out (an OSError), or not an address
            raise click.BadParameter(f"cannot connect to {scheduler} ({err})", param_hint="--scheduler") from None
    cluster = distributed.LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                                       dashboard_address=None, silence_logs=40)
    return distributed.Client(cluster), cluster


def _learn_keyed(source, cfg, out_dir, quiet, workers, scheduler, figures):
    """``kalnat learn --key``: one model per key (kalnat.cli_keyed), on Dask with --workers or
    --scheduler; ``figures``: the :class:`kalnat.figure_workers.FigureWorkers` that draw the
    report's figures, or ``None`` (--no-figures)."""
    _jax()
    from kalnat import cli_keyed, cli_report

    client, cluster = _dask_client(workers, scheduler) if (workers or scheduler) else (None, None)
    try:
        runner, metrics, scores = cli_keyed.learn_keyed(
            source, cfg, progress=not quiet, log=None if quiet else (lambda m: click.echo(m, err=True)),
            client=client)
        if runner.dask is not None:  # the shards' final states, one checkpoint each
            cli_keyed.write_shards(runner, source, os.path.join(out_dir, "shards"))
    except RuntimeError as err:
        from kalnat.dask_keyed import ShardError  # (imported with the cluster's learner)

        if isinstance(err, ShardError):  # a message, no traceback: the cluster, not the data
            raise click.ClickException(f"{err.summary}. The run stops; its report is not written.") from None
        raise
    finally:
        if client is not None:
            client.close()
        if cluster is not None:
            cluster.close()
    make_folder(out_dir, "--out")
    metric = scores.metric
    keyed = metrics["keyed"]
    what = f"{metrics['learner_text']} per {keyed['key_column']}"
    curves = None if figures is None else figures.draw(
        "learning_curves", metrics["curve"], metric, os.path.join(out_dir, "learning_curve"),
        title=f"{source.name}: {what}, {cfg['model_spec']}, {runner.family.name}")
    cli_keyed.write_per_key(os.path.join(out_dir, "per_key.csv"), runner, scores)
    model_file = "keyed_model.npz" if runner.dask is None else "shards/"
    if runner.dask is None:  # while the figures are drawn
        cli_keyed.save_keyed(os.path.join(out_dir, model_file), runner, source)
    pngs = [] if curves is None else curves.result()
    metrics["files"] = {"model": model_file, "per_key": "per_key.csv",
                        "plots": [os.path.basename(p) for p in pngs]}
    remove_stale(out_dir, metrics["files"])
    write_json(os.path.join(out_dir, "metrics.json"), metrics)
    learned = metrics["rows_seen"] - metrics["rows_skipped"]
    if keyed["n_keys"] > 1 and 2 * keyed["n_keys"] > learned:
        # a measurement or a row number as the key: each key's learner sees about one row and
        # predicts from its prior, with no error to say so
        click.echo(f"Warning: --key {keyed['key_column']}: {keyed['n_keys']} keys in {learned} rows "
                   f"({learned / keyed['n_keys']:.2f} rows a key), so each key's model learned from about "
                   "one row and predicted from the prior; --key takes a column that names an entity seen "
                   "again and again (a user, a sensor, a store)", err=True)
    if not quiet:
        final, per = metrics["final"], keyed["per_key_mean"]
        fmt = functools.partial(cli_report.shown, spec=".4f" if metric == "accuracy" else ".4g")
        skipped = f", {metrics['rows_skipped']} skipped" if metrics["rows_skipped"] else ""
        click.echo(f"{source.name}: {metrics['rows_seen']} rows{skipped}, {keyed['n_keys']} keys "
                   f"({keyed['key_column']}), {runner.family.name}, {what} on {cfg['model_spec']} "
                   f"({metrics['n_parameters']} parameters each)")
        click.echo(f"  pooled:      progressive log-loss {fmt(final['log_loss'], spec='.4f')}  {metric} "
                   f"{fmt(final[metric])}")
        if per["log_loss"] is not None:
            click.echo(f"  key average: progressive log-loss {per['log_loss']:.4f}  {metric} {fmt(per[metric])}")
        where = f" on {keyed['dask_shards']} Dask shards" if keyed["dask_shards"] else ""
        click.echo(f"  {keyed['rows_per_second']:.0f} rows/s{where} (compilation included)")
        files = ["metrics.json", "per_key.csv", *metrics["files"]["plots"], model_file]
        click.echo(f"  report: {out_dir}/ ({', '.join(files)})")


# ---- predict ----------------------------------------------------------------------------------

@cli.command(context_settings=CONTEXT)
@click.option("--model-dir", required=True, type=click.Path(exists=True, file_okay=False),
              help="A report folder written by `kalnat learn`.")
@click.argument("data")
@click.option("--out", "out_file", default="-", show_default=True,
              help="Output CSV (- for standard output).")
@click.option("--chunk-rows", default=10_000, show_default=True, type=click.IntRange(1))
@click.option("--skip-bad-rows", is_flag=True, help="Skip malformed rows instead of stopping.")
@click.option("--delimiter", default=",", show_default=True, help="CSV field separator (as for learn).")
def predict(model_dir, data, out_file, chunk_rows, skip_bad_rows, delimiter):
    """Predictions with uncertainty for the rows of DATA (CSV, - or a bundled set).

    Classifiers: the predicted class and each class's probability with its standard
    deviation from the parameters' uncertainty (the delta method's, at most √(p (1 − p)),
    the most a probability of mean p can vary). Regression and counts: the predictive mean
    and standard deviation (noise included) and the part due to the parameters. The feature
    columns are found by name; other columns are ignored. The model does not learn here.
    """
    check_output(out_file, "--out", data=data, report=model_dir)
    _jax()
    from kalnat.cli_predict import LoadedModel

    keyed = _keyed_model_file(model_dir)
    if keyed:
        from kalnat.cli_keyed import LoadedKeyedModel

        model = LoadedKeyedModel.load(keyed)
    else:
        model = LoadedModel.load(os.path.join(model_dir, "model.npz"))
    kw = dict(chunk_rows=chunk_rows, skip_bad_rows=skip_bad_rows, delimiter=delimiter)
    source = _open(data, kw, require_target=False, feature_names=model.feature_names,
                   **({"key": model.key_name} if keyed else {}))
    with source, output_file(out_file, "--out") as out:   # complete, or not written
        n, skipped = model.predict_csv(source, out, skip_bad_rows)
    if keyed and model.unseen_rows:
        click.echo(f"{model.unseen_rows} rows of {model.unseen_keys} keys not seen in learning: predicted "
                   "from the prior (key_seen = 0)", err=True)
    if out_file != "-":
        click.echo(f"{n} predictions written to {out_file}" +
                   (f" ({skipped} rows skipped)" if skipped else ""), err=True)


def _keyed_model_file(model_dir):
    """The report's ``keyed_model.npz`` (or ``shards/``, learned on Dask) when ``kalnat learn
    --key`` wrote the folder (its metrics.json names the model; without one, a keyed model
    alone), else ``None``."""
    path = os.path.join(model_dir, "keyed_model.npz")
    try:
        with open(os.path.join(model_dir, "metrics.json")) as f:
            named = json.load(f).get("files", {}).get("model")
    except (OSError, ValueError, AttributeError):
        named = None
    if named == "shards/":
        return os.path.join(model_dir, "shards")
    if named == "keyed_model.npz" or (named is None and os.path.exists(path)
                                      and not os.path.exists(os.path.join(model_dir, "model.npz"))):
        return path
    return None


# ---- datasets ---------------------------------------------------------------------------------

@cli.command(context_settings=CONTEXT)
def datasets():
    """List the bundled real data sets (nothing is downloaded)."""
    from kalnat import datasets as ds

    rows = [(d.name, d.package, f"{d.n_rows}", f"{d.n_features}", d.task_text, d.order)
            for d in ds.available()]
    _table(("name", "package", "rows", "features", "task", "row order"), rows)
    if not ds.river_installed():
        click.echo("\n(river's bundled sets are listed too once river is installed: "
                   "pip install 'kalnat[river]')")


def _table(header, rows, out=None):
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = "  ".join(f"{{:<{w}}}" for w in widths)
    click.echo(line.format(*header).rstrip(), file=out)
    click.echo("  ".join("-" * w for w in widths), file=out)
    for r in rows:
        click.echo(line.format(*r).rstrip(), file=out)


# ---- verify -----------------------------------------------------------------------------------

@cli.command(context_settings=CONTEXT)
@click.option("--rows", default=40, show_default=True, type=click.IntRange(2),
              help="Rows per random problem.")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--quick", is_flag=True, help="One family and the linear model only (seconds).")
@click.option("--full", is_flag=True, help="Both batch sizes for every family and model.")
def verify(rows, seed, quick, full):
    """Check the method's equivalences (docs/method.md) on random problems, in float64.

    For each family, a linear model and a small MLP, static (λ = 1) and forgetting
    (λ = 0.95), with one row or 4 rows per update (alternating between the models; --full:
    both), the EKF, the information filter and online natural gradient configured by the
    Kalman translation run on the same stream; the table shows the largest relative
    deviation of θ and of P (natural gradient: P = η J⁻¹) from the EKF over all steps. Equal
    up to rounding means deviations around 1e-10 or below.
    """
    from kalnat import cli_verify as _verify

    _jax()
    table = _verify.run_all(rows=rows, seed=seed, quick=quick, full=full)
    _table(("family", "model", "λ", "batch", "d", "θ: info vs ekf", "P: info vs ekf",
            "θ: natgrad vs ekf", "P: natgrad vs ekf"),
           [(r["family"], r["model"], r["forgetting"], r["batch"], r["d"],
             *(f"{r[k]:.1e}" for k in ("theta_info", "cov_info", "theta_ng", "cov_ng")))
            for r in table])
    worst = max(max(r[k] for k in ("theta_info", "cov_info", "theta_ng", "cov_ng")) for r in table)
    click.echo(f"\nlargest relative deviation: {worst:.1e} "
               f"({'equal up to rounding' if worst < 1e-6 else 'NOT equal: a bug'})")
    if worst >= 1e-6:
        raise SystemExit(1)


# ---- compare ----------------------------------------------------------------------------------

@cli.command(context_settings=CONTEXT)
@click.argument("data", required=False, default=None, metavar="[DATA]")
@_settings_options
@click.option("--out", "out_dir", default="kalnat-report-compare", show_default=True,
              type=click.Path(file_okay=False), help="Folder for compare.json and compare.png.")
@click.option("--lr-grid", default=",".join(str(x) for x in (0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0)),
              show_default=True, help="Learning rates tried for SGD and Adam.")
@click.option("--kalnat-grid/--no-kalnat-grid", default=True, show_default=True,
              help="Also run kalnat over a small grid of priors and forgetting factors.")
def compare(data, out_dir, lr_grid, kalnat_grid, **kw):
    """Run DATA through kalnat and one-pass baselines, scored the same way.

    Baselines: SGD and Adam (optax, same model, best of a learning-rate grid chosen on the
    stream itself, which flatters them), scikit-learn's SGD with partial_fit, river's linear
    models (when installed), and the offline maximum-likelihood GLM (in-sample and 10-fold
    cross-validated) as the reference line. DATA is held in memory (default: breast_cancer).
    """
    from kalnat import cli_compare as _compare, datasets

    _jax()
    data = data or datasets.DEFAULT_DATASET
    cfg = _config(kw)
    check_folder(out_dir, "--out")
    try:
        lrs = tuple(float(v) for v in lr_grid.split(","))
    except ValueError:
        raise click.BadParameter(f"not a list of numbers: {lr_grid!r}", param_hint="--lr-grid") from None
    bad = [v for v in lrs if not 0 < v < float("inf")]
    if bad:
        raise click.BadParameter(f"learning rates are positive numbers, not {bad[0]}", param_hint="--lr-grid")
    if _twice(lrs) is not None:  # (run twice, and one line of the grid's table)
        raise click.BadParameter(f"the rate {_twice(lrs):g} is given twice", param_hint="--lr-grid")
    with _open(data, kw) as source:
        report = _compare.run(source, cfg, lrs=lrs, kalnat_grid=kalnat_grid,
                              log=lambda m: click.echo(m, err=True))
    make_folder(out_dir, "--out")
    report["plot"] = _compare.plot(report, os.path.join(out_dir, "compare.png"))
    write_json(os.path.join(out_dir, "compare.json"), report)
    click.echo(_compare.format_table(report))
    click.echo(f"\n(written: {out_dir}/compare.json, {out_dir}/compare.png)")


if __name__ == "__main__":  # pragma: no cover
    run()
