"""The report's figures: no two bank members share a colour, titles wrap instead of running
off the figure; the learning curve they draw, thinned on a long stream."""

import os
import subprocess
import sys

import matplotlib.colors as mcolors
import numpy as np
import pytest

from kalnat import plots


def test_member_colours_are_distinct_for_any_bank_size():
    for n in (3, 10, 12, 20, 40):
        rgba = [mcolors.to_rgba(c) for c in plots.distinct_colors(n)]
        assert len(set(rgba)) == n
        assert mcolors.to_rgba("0.8") not in rgba  # the grey of the "others" band


def test_long_titles_wrap():
    title = "image_segments: bank of 40 EKFs (1 or 2 linearisations), linear, categorical"
    wrapped = plots.wrap_title(title)
    assert max(len(line) for line in wrapped.splitlines()) <= plots.TITLE_WIDTH
    assert wrapped.replace("\n", " ") == title


def test_a_long_streams_learning_curve_is_thinned_and_each_point_still_says_what_it_did(monkeypatch):
    """Past MAX_POINTS the report's curve keeps every other point (and the bank's weights with
    them): each kept point's running log-loss and accuracy are still those of every scored row up
    to it, and its "recent rows" log-loss is the mean since the point kept before it."""
    from kalnat import baselines, cli_report
    from kalnat import families as F

    monkeypatch.setattr(cli_report.Accumulator, "MAX_POINTS", 40)
    rng = np.random.default_rng(0)
    acc = cli_report.Accumulator(F.Bernoulli(), first_scored_row=3, bank_size=2)
    lls, hits, weights = [], [], []
    for n in rng.integers(1, 90, size=30):  # blocks of 1 to 89 rows
        p1 = rng.uniform(0.05, 0.95, n)
        y = (rng.uniform(size=n) < 0.5).astype(np.int64)
        weights.append(rng.dirichlet([1, 1], n))
        acc.add(y, baselines.Predictions(probs=np.stack([1 - p1, p1], axis=1)), weights[-1])
        lls += list(-np.log(np.where(y == 1, p1, 1 - p1)))
        hits += list((p1 > 0.5) == (y == 1))
    lls, hits = np.array(lls[2:]), np.array(hits[2:], float)   # scored from the third row
    c = acc.curve
    rows = np.array(c["row"])
    assert len(rows) <= 40 and np.all(np.diff(rows) > 0) and rows[-1] == len(lls) + 2
    np.testing.assert_array_equal(acc.weights, np.concatenate(weights)[rows - 1])   # each point's own
    upto = rows - 2                                             # scored rows up to each point
    np.testing.assert_allclose(c["log_loss"], [lls[:k].mean() for k in upto], rtol=1e-12)
    np.testing.assert_allclose(c["accuracy"], [hits[:k].mean() for k in upto], rtol=1e-12)
    since = np.concatenate([[0], upto[:-1]])
    np.testing.assert_allclose(c["window_log_loss"], [lls[a:b].mean() for a, b in zip(since, upto)], rtol=1e-12)


def test_each_figure_is_drawn_once_for_its_file_with_its_layout(tmp_path, monkeypatch):
    """kalnat.plots._save: the tight layout is done once, and savefig draws each figure once
    (a figure left with tight_layout's placeholder engine was drawn twice); the layout is still
    the tight one (the axes moved from matplotlib's default margins)."""
    import matplotlib.figure

    draws, positions, draw = [], [], matplotlib.figure.Figure.draw

    def counted(fig, renderer):
        draws.append(fig)
        positions.append(fig.axes[0].get_position().bounds)
        return draw(fig, renderer)

    monkeypatch.setattr(matplotlib.figure.Figure, "draw", counted)
    rows = [1, 2, 3]
    curve = {"row": rows, "log_loss": [0.7, 0.6, 0.5], "accuracy": [0.5, 0.6, 0.7], "window_log_loss": [0.7, 0.5, 0.4]}
    paths = plots.learning_curves(curve, "accuracy", str(tmp_path / "curve"), "a title")
    paths.append(plots.confusion([[3, 1], [0, 2]], ["a", "b"], str(tmp_path / "confusion.png"), "a title"))
    assert all(os.path.getsize(p) > 0 for p in paths)
    assert len(draws) == len(paths) == len(set(map(id, draws))) == 3
    default = matplotlib.figure.SubplotParams()
    assert all(pos[0] != default.left for pos in positions)


def test_a_one_row_report_draws_without_a_warning(tmp_path):
    """A stream of one row: one point on every figure, drawn without matplotlib's warning of
    equal axis limits (the bank's weights set their own)."""
    import warnings

    curve = {"row": [1], "log_loss": [0.69], "accuracy": [0.0], "window_log_loss": [0.69]}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plots.learning_curves(curve, "accuracy", str(tmp_path / "c"))
        plots.bank_weights([1], [[0.5, 0.5]], ["a", "b"], str(tmp_path / "w.png"))
        plots.confusion([[0, 1], [0, 0]], ["0", "1"], str(tmp_path / "m.png"))


def _figure_texts(monkeypatch):
    """Every tick label, legend entry and title of each figure saved, by file name."""
    import os

    from matplotlib.figure import Figure

    texts, save = {}, Figure.savefig

    def recording(fig, path, *args, **kwargs):
        seen = []
        for ax in fig.axes:
            seen += [t.get_text() for t in ax.get_xticklabels() + ax.get_yticklabels()]
            legend = ax.get_legend()
            seen += [t.get_text() for t in legend.get_texts()] if legend else []
            seen.append(ax.get_title())
        texts[os.path.basename(str(path))] = seen
        return save(fig, path, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", recording)
    return texts


def test_a_bundled_sets_figures_name_its_classes(tmp_path, monkeypatch):
    """`kalnat learn` on a bundled classification set labels its figures with the set's class
    names (breast_cancer: malignant, benign; iris: setosa, versicolor, virginica), not 0/1/2;
    the report and `kalnat predict` use the same names."""
    import csv
    import io
    import json

    from click.testing import CliRunner

    from kalnat.cli import cli

    texts = _figure_texts(monkeypatch)
    for name, classes in (("breast_cancer", ["malignant", "benign"]),
                          ("iris", ["setosa", "versicolor", "virginica"])):
        out = tmp_path / name
        res = CliRunner().invoke(cli, ["learn", name, "--out", str(out), "--quiet", "--prior-var", "1"],
                                 catch_exceptions=False)
        assert res.exit_code == 0, res.output
        m = json.loads((out / "metrics.json").read_text())
        assert m["classes"] == classes
        assert "confusion.png" in m["files"]["plots"]
        assert set(classes) <= set(texts["confusion.png"])       # the axes' tick labels
        confusion = m["confusion"]                               # [true][predicted], rows scored
        assert sum(map(sum, confusion)) == m["final"]["rows_scored"]
        correct = sum(confusion[k][k] for k in range(len(classes)))
        assert abs(correct / m["final"]["rows_scored"] - m["final"]["accuracy"]) < 1e-12
    pred = CliRunner().invoke(cli, ["predict", "--model-dir", str(tmp_path / "iris"), "iris"],
                              catch_exceptions=False)
    rows = list(csv.DictReader(io.StringIO(pred.output)))
    assert {"prob_setosa", "prob_versicolor", "prob_virginica"} <= set(rows[0])
    assert {r["predicted"] for r in rows} <= {"setosa", "versicolor", "virginica"}


WORKERS_PROBE = """
import sys
from kalnat.figure_workers import FigureWorkers
with FigureWorkers() as figures:
    assert figures.forked, "no workers without JAX on Linux"
    import jax  # as the command does once the workers run: nothing more is forked after this
    done = figures.draw("confusion", [[3, 1], [0, 4]], ["a", "b"], sys.argv[1] + "/c.png", title="t")
    bad = figures.draw("confusion", [[3, 1], [0, 4]], ["a", "b"], sys.argv[1] + "/missing/c.png")
    print(done.result())
    try:
        bad.result()
    except OSError as err:
        print("raised", type(err).__name__)
    # drawn by the workers: this process never imported matplotlib (a fallback drawing here would)
    print("matplotlib here:", "matplotlib" in sys.modules)
"""


DEAD_WORKERS_PROBE = """
import concurrent.futures, sys
from concurrent.futures.process import BrokenProcessPool
from kalnat.figure_workers import FigureWorkers

def already_broken(*args, **kwargs):
    raise BrokenProcessPool("a worker died before this figure")

died = concurrent.futures.Future()
died.set_exception(BrokenProcessPool("a worker died while drawing"))
with FigureWorkers() as figures:
    assert figures.forked
    figures._pool.submit = lambda *args, **kwargs: died  # the pool as a worker's death leaves it
    first = figures.draw("confusion", [[3, 1], [0, 4]], ["a", "b"], sys.argv[1] + "/c.png")
    figures._pool.submit = already_broken
    second = figures.draw("confusion", [[3, 1], [0, 4]], ["a", "b"], sys.argv[1] + "/d.png")
    print(first.result(), second.result(), figures.forked)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="workers are forked on Linux only")
def test_figures_whose_workers_died_are_drawn_by_the_command(tmp_path):
    out = subprocess.run([sys.executable, "-c", DEAD_WORKERS_PROBE, str(tmp_path)], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [str(tmp_path / "c.png"), str(tmp_path / "d.png"), "False"]
    assert (tmp_path / "c.png").stat().st_size > 0 and (tmp_path / "d.png").stat().st_size > 0


KILLED_COMMAND_PROBE = """
import os, signal
from kalnat.figure_workers import FigureWorkers

figures = FigureWorkers()
assert figures.forked
figures._pool.submit(int).result()  # the workers ready and waiting for figures
print(" ".join(str(p) for p in figures._pool._processes), flush=True)
os.kill(os.getpid(), signal.SIGKILL)  # the command ended from outside: nothing is shut down
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="workers are forked on Linux only")
def test_figure_workers_end_when_the_command_is_killed(tmp_path):
    import os
    import time

    # output to a file: a worker left behind would hold a pipe open, and the run would wait on it
    with open(tmp_path / "out", "w") as out, open(tmp_path / "err", "w") as err:
        subprocess.run([sys.executable, "-c", KILLED_COMMAND_PROBE], stdout=out, stderr=err, timeout=120)
    pids = [int(p) for p in (tmp_path / "out").read_text().split()]
    assert len(pids) == 2, (tmp_path / "err").read_text()

    def alive(pid):
        try:
            with open(f"/proc/{pid}/stat") as f:
                return f.read().split(")")[-1].split()[0] != "Z"
        except FileNotFoundError:
            return False

    deadline = time.monotonic() + 30
    while any(alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    left = [p for p in pids if alive(p)]
    for p in left:
        os.kill(p, 9)
    assert not left, f"workers {left} outlived their command"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="workers are forked on Linux only")
def test_figure_workers_draw_in_forked_processes_and_pass_their_errors_back(tmp_path):
    out = subprocess.run([sys.executable, "-c", WORKERS_PROBE, str(tmp_path)], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert lines[0] == str(tmp_path / "c.png") and (tmp_path / "c.png").stat().st_size > 0
    assert lines[1] == "raised FileNotFoundError"
    assert lines[2] == "matplotlib here: False"


def test_figure_workers_draw_here_once_jax_is_imported(tmp_path):
    import jax  # noqa: F401  (forking a process with JAX's threads running is unsafe)
    from kalnat.figure_workers import FigureWorkers

    with FigureWorkers() as figures:
        assert not figures.forked
        path = figures.draw("confusion", [[3, 1], [0, 4]], ["a", "b"], str(tmp_path / "c.png")).result()
        bad = figures.draw("confusion", [[3, 1], [0, 4]], ["a", "b"], str(tmp_path / "missing" / "c.png"))
        with pytest.raises(FileNotFoundError):  # raised by result(), as from a worker
            bad.result()
    assert path == str(tmp_path / "c.png") and (tmp_path / "c.png").stat().st_size > 0


COMMAND_PROBE = """
import sys
from kalnat.cli import main
try:
    main(sys.argv[1:])
except SystemExit as exit:
    assert not exit.code, exit.code
print("matplotlib here:", "matplotlib" in sys.modules)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="workers are forked on Linux only")
@pytest.mark.parametrize("keyed", [False, True], ids=["one stream", "--key"])
def test_the_command_draws_its_figures_in_workers(tmp_path, keyed):
    rng = np.random.default_rng(0)
    with open(tmp_path / "d.csv", "w") as f:
        f.write("k,a,b,y\n")
        for i in range(40):
            a, b = rng.normal(size=2)
            f.write(f"{i % 3},{a:.5f},{b:.5f},{int(a + 0.3 * rng.normal() > 0)}\n")  # k: a feature alone
    argv = ["learn", str(tmp_path / "d.csv"), "--prior-var", "1", "--quiet", "--out", str(tmp_path / "r")]
    env = {k: v for k, v in os.environ.items() if k != "KALNAT_CACHE_DIR"}
    out = subprocess.run([sys.executable, "-c", COMMAND_PROBE, *argv, *(["--key", "k"] if keyed else [])],
                         capture_output=True, text=True, timeout=300, env=dict(env, KALNAT_NO_CACHE="1"))
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "matplotlib here: False"  # the command's process never drew one
    pngs = sorted(p.name for p in (tmp_path / "r").glob("*.png"))
    assert "learning_curve_log_loss.png" in pngs and "learning_curve_accuracy.png" in pngs
