"""What ``kalnat learn --key COLUMN`` does: one model per key (:class:`kalnat.keyed.Keyed`).

The conventions are ``kalnat learn``'s (:mod:`kalnat.cli_runner`) with one learner definition
per key: every row is predicted by its key's model before that model learns it. Features are
standardised with the statistics of all earlier rows, pooled over keys (the ``running``
scheme: per-key coordinates would need a re-expression per key); a gaussian target is
standardised and its noise variance estimated the same way, pooled. Scores are reported
pooled over all rows and per key (``per_key.csv``).
"""

from __future__ import annotations

import csv
import functools
import os
import time
from typing import Optional

import jax
import numpy as np
from tqdm import tqdm  # a terminal's bar (tqdm.auto would import asyncio: stream._bar)

import kalnat
from kalnat import baselines, datasets
from kalnat.cli_predict import LoadedModel, finite_rows, read_extra
from kalnat.cli_report import GAUSSIAN_FIRST_SCORED_ROW, Accumulator, run_metrics
from kalnat.cli_runner import OnlineRunner
from kalnat.cli_setup import build_learner, checkpoint_settings, first_chunk_task, make_family
from kalnat.keyed import Keyed
from kalnat.programs import compile_quickly
from kalnat.validation import plain

__all__ = ["KeyedRunner", "learn_keyed", "KeyedScores", "save_keyed", "write_shards", "LoadedKeyedModel"]


class KeyedRunner(OnlineRunner):
    """:class:`~kalnat.cli_runner.OnlineRunner`'s scalers and noise estimate, pooled, with one
    learner state per key."""

    def __init__(self, cfg: dict, family_name: str, classes, n_features: int, client=None,
                 rows: Optional[int] = None):
        if cfg.get("scaling") not in (None, "running"):
            raise ValueError(f"--key standardises features with statistics pooled over keys (--scaling running); "
                             f"--scaling {cfg['scaling']} re-expresses one model's coordinates")
        # a short stream's programs compiled quickly, as one model's (OnlineRunner), but not on
        # Dask's workers, whose learners are their own (shard_factory): there the driver's
        # learner, which learns nothing, is left unmarked, and the report says so
        super().__init__(dict(cfg, scaling="running"), family_name, classes, n_features, rows=rows)
        if client is not None:
            compile_quickly(self.learner, False)
            self.quick = False
        self.keyed = self.dask = None
        if client is None:
            self.keyed = Keyed(self.learner, self.state.params if self.bank is None else
                               jax.tree_util.tree_map(lambda a: a[0], self.state.members.params),
                               batch_size=int(cfg.get("batch_size", 1)))
        else:  # one keyed learner per shard, on the Dask workers (kalnat.dask_keyed)
            from kalnat.dask_keyed import DaskKeyed

            self.dask = DaskKeyed(client, functools.partial(shard_factory, cfg, family_name, classes, n_features),
                                  batch_size=int(cfg.get("batch_size", 1)))
        self.state = None  # the keys' states live in self.keyed or the shards

    def finish(self):
        """The end of the stream: each key's rows held in a partial minibatch (``--batch-size``
        > 1) learned, as :func:`kalnat.fit` learns a stream's last one."""
        # (not `keyed or dask`: a Keyed of no keys has length 0, so it is false; learn_keyed
        # calls this only once a row is learned, so the `or` failed only before that check)
        (self.keyed if self.keyed is not None else self.dask).flush()

    def step_keyed(self, keys, X, y) -> baselines.Predictions:
        """Predicts then learns the rows ``X (n, p)``, ``y (n,)``, row ``i`` by ``keys[i]``'s
        model; returns the predictions in the target's units."""
        X = np.asarray(X, np.float64)
        ytrain, affine = self.train_targets(y)
        Z = self.scale_features(X)
        if self.dask is not None:
            p, _ = self.dask.learn(keys, Z, ytrain)
        else:
            p = self.keyed.learn(keys, Z, ytrain).predictions
        bad = self.took(p, len(y))
        if bad is not None:
            raise ValueError(f"the learner of key {plain(keys[bad])!r} diverged (non-finite prediction at row "
                             f"{self.rows - len(y) + bad + 1}); try a smaller --prior-var or a linear --model")
        return self.in_target_units(p, ytrain, affine)


def shard_factory(cfg, family_name, classes, n_features):
    """``(learner, params)`` of the command's settings (run in each Dask worker too)."""
    family = make_family(family_name, len(classes) if family_name == "categorical" else None)
    _, learner, state = build_learner(dict(cfg, scaling="running"), family, n_features)
    bank = isinstance(learner, kalnat.bank.Bank)
    return learner, (jax.tree_util.tree_map(lambda a: a[0], state.members.params) if bank else state.params)


class KeyedScores:
    """Per-key sums of the progressive scores."""

    def __init__(self, family, first_scored_row: int):
        self.family, self.first = family, first_scored_row
        self.index: dict = {}  # key -> row of the table
        self.keys: list = []
        self.metric = "accuracy" if family.is_classifier else "rmse"
        self.rows = np.zeros(0, np.int64)
        self.log_loss = np.zeros(0)
        self.m = np.zeros(0)
        self.seen = 0

    def add(self, keys, y, pred):
        slots = np.fromiter((self.index.setdefault(k, len(self.index)) for k in keys), np.int64, len(keys))
        self.keys.extend(list(self.index)[len(self.keys):])
        losses = baselines.row_losses(self.family, y, pred)
        keep = self.seen + np.arange(1, len(y) + 1) >= self.first
        self.seen += len(y)
        n = int(slots.max()) + 1 if len(slots) else 0
        if n > self.rows.size:
            grow = n - self.rows.size
            self.rows = np.concatenate([self.rows, np.zeros(grow, np.int64)])
            self.log_loss = np.concatenate([self.log_loss, np.zeros(grow)])
            self.m = np.concatenate([self.m, np.zeros(grow)])
        s = slots[keep]
        np.add.at(self.rows, s, 1)
        np.add.at(self.log_loss, s, losses["log_loss"][keep])
        np.add.at(self.m, s, (losses["correct"] if self.family.is_classifier else losses["sq_err"])[keep])

    def table(self):
        """``(rows, log_loss, metric)`` per slot (NaN where a key has no scored row)."""
        with np.errstate(invalid="ignore", divide="ignore"):
            ll = self.log_loss / self.rows
            m = self.m / self.rows
        return self.rows, ll, (m if self.family.is_classifier else np.sqrt(m))


def learn_keyed(source: datasets.Source, cfg: dict, progress: bool = True, log=None, client=None):
    """Learns every chunk of ``source`` with one model per value of its key column.

    Returns ``(runner, metrics, scores)``: the :class:`KeyedRunner`, the report (``kalnat
    learn``'s, with ``keyed``: the key column, the number of keys, rows per second and a
    summary of the per-key scores) and the :class:`KeyedScores`. With a Dask ``client`` the
    keys' learners live on its workers (:mod:`kalnat.dask_keyed`)."""
    skipped, runner, coder, acc, scores = [], None, None, None, None
    t_learn, t_first, first_rows = 0.0, None, 0
    bar = None
    try:
        for chunk in source.chunks:
            skipped.extend(chunk.skipped)
            if not len(chunk.y):
                continue
            if runner is None:
                family, classes, coder = first_chunk_task(cfg, source, chunk.y, log)
                runner = KeyedRunner(cfg, family, classes, chunk.X.shape[1], client, source.rows_at_most)
                first = GAUSSIAN_FIRST_SCORED_ROW if family == "gaussian" else 1
                acc = Accumulator(runner.family, first, runner.bank.size if runner.bank else 0)
                scores = KeyedScores(runner.family, first)
                bar = tqdm(total=source.n_rows, unit="row", disable=not progress, dynamic_ncols=True,
                           desc=f"{'bank' if runner.bank else cfg['method']} per {source.key_name}")
            y, good = coder.encode(source.name, chunk.y, chunk.lines, source.target_name,
                                   bool(cfg.get("skip_bad_rows")), skipped)
            X, y, keys = chunk.X[good], y[good], chunk.keys[good]
            if not len(y):
                continue
            t0 = time.perf_counter()
            pred = runner.step_keyed(keys, X, y)
            dt = time.perf_counter() - t0
            if t_first is None:
                t_first, first_rows = dt, len(y)
            t_learn += dt
            acc.add(y, pred, runner.weights)
            scores.add(keys.tolist(), y, pred)
            bar.update(len(y))
    finally:
        if bar is not None:
            bar.close()
    if t_first is None:  # no row learned: none read, or every one bad (after the task was read)
        raise datasets.DataError(source.name, "no data rows" + (f" ({len(skipped)} bad rows skipped)"
                                                                if skipped else ""))
    t0 = time.perf_counter()
    runner.finish()
    t_learn += time.perf_counter() - t0
    rows = runner.rows
    n_rows, ll, m = scores.table()
    scored = n_rows > 0
    metrics = {
        **run_metrics(source, runner, cfg,
                      "progressive validation: every row predicted by its key's model before that model "
                      "learns it, one pass, given order; features standardised with statistics of earlier "
                      "rows only, pooled over keys", skipped, acc, t_learn, t_first, first_rows),
        "keyed": {
            "key_column": source.key_name,
            "n_keys": len(scores.keys),
            "dask_shards": None if runner.dask is None else runner.dask.n_shards,
            "dask_recoveries": None if runner.dask is None else runner.dask.recoveries,
            "rows_per_second": rows / t_learn if t_learn > 0 else None,
            # the mean over keys of each key's own scores (the pooled ones weigh keys by rows)
            "per_key_mean": {"log_loss": float(np.mean(ll[scored])) if scored.any() else None,
                             scores.metric: float(np.mean(m[scored])) if scored.any() else None},
            "per_key_file": "per_key.csv",
        },
    }
    return runner, metrics, scores


def write_per_key(path, runner: KeyedRunner, scores: KeyedScores):
    """``per_key.csv``: each key's rows scored, progressive log-loss and accuracy or RMSE."""
    n_rows, ll, m = scores.table()
    with open(path, "w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["key", "rows_scored", "log_loss", scores.metric])
        for i, key in enumerate(scores.keys):
            n = int(n_rows[i]) if i < n_rows.size else 0
            w.writerow([key, n, f"{ll[i]:.6g}" if n else "", f"{m[i]:.6g}" if n else ""])
    return os.path.basename(path)


# ---- the keyed model for `kalnat predict` ----------------------------------------------------

def _model_extra(runner: KeyedRunner, source: datasets.Source) -> dict:
    extra = runner.extra()
    extra.update(feature_names=list(source.feature_names), target=source.target_name, key_column=source.key_name)
    return extra


def save_keyed(path, runner: KeyedRunner, source: datasets.Source) -> str:
    """``keyed_model.npz``: every key's state (:meth:`Keyed.save`) with what
    :class:`LoadedKeyedModel` needs to predict: the runner's scalers and settings (as
    ``model.npz`` holds them), the feature names and the key column."""
    return runner.keyed.save(path, extra=_model_extra(runner, source))


SHARDS_HEADER = "model.json"


def save_shards_header(folder, runner: KeyedRunner, source: datasets.Source) -> str:
    """A Dask run's ``shards/model.json``: what :func:`save_keyed` puts in the header of
    ``keyed_model.npz``, and the number of shards (``shard_<i>.npz``, their checkpoints)."""
    import json

    path = os.path.join(folder, SHARDS_HEADER)
    with open(path, "w") as f:
        json.dump(dict(_model_extra(runner, source), n_shards=runner.dask.n_shards), f)
    return path


def write_shards(runner: KeyedRunner, source: datasets.Source, folder: str):
    """The shards' checkpoints and their header into ``folder`` (replaced whole): written in a
    new folder first, then swapped in (the old one renamed aside, and back if the swap fails),
    so that a failed checkpoint or swap leaves no mix of two runs' shards."""
    import shutil
    import tempfile

    parent = os.path.dirname(folder) or "."
    os.makedirs(parent, exist_ok=True)
    new = tempfile.mkdtemp(prefix=".shards-new-", dir=parent)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(new, 0o777 & ~umask)  # (mkdtemp's is 0700)
    old = None
    try:
        runner.dask.checkpoint_dir = new
        runner.dask.checkpoint()
        save_shards_header(new, runner, source)
        if os.path.lexists(folder):
            old = tempfile.mkdtemp(prefix=".shards-old-", dir=parent)
            os.replace(folder, old)  # (onto the empty folder mkdtemp made)
        try:
            os.replace(new, folder)
        except OSError:
            if old is not None:
                os.replace(old, folder)
                old = None
            raise
    finally:
        runner.dask.checkpoint_dir = None
        shutil.rmtree(new, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


class LoadedKeyedModel(LoadedModel):
    """Every key's learner restored from ``keyed_model.npz``, or from a Dask run's ``shards/``
    folder (it predicts, it does not learn).

    A row is predicted by its key's state (:meth:`Keyed.predict`; on the shard
    :func:`kalnat.dask_keyed.shard_of` names), in the output columns of
    :class:`~kalnat.cli_predict.LoadedModel` with the key after the line and ``key_seen`` last
    (0: a key not seen in learning, predicted from the prior every key starts from)."""

    def __init__(self, extra: dict, shards: list, family):
        super().__init__(extra, None, shards[0].learner, family)
        self.shards = shards
        self.keyed = shards[0] if len(shards) == 1 else None
        self.key_name = extra["key_column"]

    @classmethod
    def load(cls, path) -> "LoadedKeyedModel":
        """From ``keyed_model.npz``, or a ``shards/`` folder (its ``model.json`` and
        ``shard_<i>.npz``)."""
        import json

        from kalnat import checkpoint

        folder = os.path.isdir(path)
        not_keyed = ValueError(f"{path}: not a keyed model written by `kalnat learn --key`")
        # (read_header would take a missing file for a file that is not a checkpoint)
        if not os.path.exists(os.path.join(path, SHARDS_HEADER) if folder else path):
            raise ValueError(f"{path}: no keyed model here (run `kalnat learn --key COL --out DIR` first)")
        if folder:
            try:
                with open(os.path.join(path, SHARDS_HEADER), encoding="utf-8") as f:
                    extra = json.load(f)
            except (OSError, ValueError):  # unreadable, or not JSON
                raise not_keyed from None
        else:
            extra = checkpoint.read_header(path)["extra"]   # (its error says what the file is not)
        if not isinstance(extra, dict) or extra.get("kalnat_cli") != 1 or "key_column" not in extra:
            raise not_keyed
        extra = read_extra(path, extra)
        classes = extra["classes"]
        learner, params = shard_factory(checkpoint_settings(extra), extra["family"], classes,
                                        len(extra["feature_names"]))
        family = make_family(extra["family"], len(classes) if extra["family"] == "categorical" else None)
        files = [os.path.join(path, f"shard_{i}.npz") for i in range(int(extra["n_shards"]))] if folder else [path]
        for f in files:
            if not os.path.exists(f):
                raise ValueError(f"{f}: missing (the shards of a keyed model learned on Dask)")
        return cls(extra, [Keyed.load(f, learner, params) for f in files], family)

    def header(self):
        head = super().header()
        return head[:1] + ["key"] + head[1:] + ["key_seen"]

    def predict_keyed(self, keys, X) -> tuple[np.ndarray, np.ndarray]:
        """``(table (n, columns), seen (n,))`` for raw features ``X (n, p)``, row ``i`` by the
        state of ``keys[i]``: the table's columns are :class:`LoadedModel`'s (no line, key or
        ``key_seen``); ``seen`` is false where the key was not learned (the prior's prediction)."""
        keys = np.asarray(keys)
        if len(self.shards) == 1:
            shard = np.zeros(len(keys), np.int64)
        else:  # as the driver sharded them (once per distinct key)
            from kalnat.dask_keyed import _key_array, _shards

            keys = _key_array(keys)
            shard = _shards(keys, len(self.shards))
        seen = np.zeros(len(keys), bool)
        for i, keyed in enumerate(self.shards):
            rows = np.flatnonzero(shard == i)
            seen[rows] = keyed.known(keys[rows])
        if not len(X):
            return np.zeros((0, len(self.header()) - 3)), seen
        Z, table = self._scale(X), None
        for i, keyed in enumerate(self.shards):
            rows = np.flatnonzero(shard == i)
            if rows.size:
                part = self.table(keyed.predict(keys[rows], Z[rows]))
                if table is None:
                    table = np.zeros((len(keys), part.shape[1]))
                table[rows] = part
        return table, seen

    def predict_csv(self, source: datasets.Source, out, skip_bad_rows: bool = False) -> tuple[int, int]:
        """Writes a CSV of predictions for every row of ``source`` (opened with ``key=``
        :attr:`key_name`); returns ``(rows, skipped)``; :attr:`unseen_rows` and
        :attr:`unseen_keys` count the rows and keys predicted from the prior (a row predicted
        as no finite number: :func:`~kalnat.cli_predict.finite_rows`)."""
        # Keyed.params: one member's, a keyed bank given its first member's (KeyedRunner), so
        # not cli_runner.member_parameters, which divides a bank's stacked params
        self.compile_for(source, int(sum(np.size(a) for a in jax.tree_util.tree_leaves(self.shards[0].params))))
        w = csv.writer(out, lineterminator="\n")
        w.writerow(self.header())
        n = skipped = 0
        self.unseen_rows, unseen = 0, set()
        for chunk in source.chunks:
            skipped += len(chunk.skipped)
            table, seen = self.predict_keyed(chunk.keys, chunk.X)
            ok = finite_rows(source, chunk.lines, table, skip_bad_rows)
            skipped += int(np.count_nonzero(~ok))
            lines, keys, table, seen = np.asarray(chunk.lines)[ok], np.asarray(chunk.keys)[ok], table[ok], seen[ok]
            self.unseen_rows += int(np.count_nonzero(~seen))
            unseen.update(keys[~seen].tolist())
            for line, key, row, s in zip(lines, keys, table, seen):
                if self.family.is_classifier:
                    w.writerow([int(line), key, self.classes[int(row[0])], *(f"{v:.6g}" for v in row[1:]), int(s)])
                else:
                    w.writerow([int(line), key, *(f"{v:.6g}" for v in row), int(s)])
            n += len(table)  # (the rows written)
        self.unseen_keys = len(unseen)
        return n, skipped
