"""What ``kalnat learn`` does, usable from Python too: :func:`learn_stream` runs a source's
chunks through an :class:`~kalnat.cli_runner.OnlineRunner` (the conventions are its module's)
with a progress bar, and collects the report (:mod:`kalnat.cli_report`)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
from tqdm import tqdm  # a terminal's bar (tqdm.auto would import asyncio: stream._bar)

from kalnat import checkpoint, datasets
from kalnat.cli_report import GAUSSIAN_FIRST_SCORED_ROW, Accumulator, PredictionWriter, bank_report, \
    prediction_table, run_metrics, shown
from kalnat.cli_runner import OnlineRunner
from kalnat.cli_setup import first_chunk_task

__all__ = ["learn_stream", "LearnResult"]

# What this module held before the command's modules were split by job, and where it is now
_MOVED = {"METHODS": "kalnat.cli_setup", "build_learner": "kalnat.cli_setup", "resolve_task": "kalnat.cli_setup",
          "inference_note": "kalnat.cli_setup", "parse_model": "kalnat.cli_choices",
          "LoadedModel": "kalnat.cli_predict"}


def __getattr__(name):
    """A name this module held before the split, from its module now, with a DeprecationWarning."""
    if name not in _MOVED:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib
    import warnings

    warnings.warn(f"kalnat.cli_learn.{name} is now {_MOVED[name]}.{name}", DeprecationWarning, stacklevel=2)
    return getattr(importlib.import_module(_MOVED[name]), name)


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


def learn_stream(source: datasets.Source, cfg: dict, progress: bool = True,
                 log=None, predictions=None, programs: Optional[str] = None) -> LearnResult:
    """Learns every chunk of ``source`` in order; returns the runner and the report.

    ``log(message)`` receives a note when the task was inferred from the data;
    ``predictions``: a text file to which :class:`~kalnat.cli_report.PredictionWriter` writes every row's
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
                family, classes, coder = first_chunk_task(cfg, source, chunk.y, log)
                runner = OnlineRunner(cfg, family, classes, chunk.X.shape[1], programs, source.rows_at_most)
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
                writer.write(np.asarray(chunk.lines)[good], prediction_table(pred),
                             [s[0] for s in skipped[before:]])
            f = acc.final()
            bar.set_postfix({"log-loss": shown(f["log_loss"], ".4f"), acc.key: shown(f[acc.key], ".4f")},
                            refresh=True)
    finally:
        if bar is not None:
            bar.close()
    if t_first is None:  # no row learned: none read, or every one bad (after the task was read)
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
