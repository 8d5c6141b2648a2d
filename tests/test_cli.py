"""End-to-end tests of the `kalnat` command on small data (click's CliRunner, one process)."""

import csv
import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from click.testing import CliRunner

from kalnat import checkpoint
from kalnat.cli import cli


def _csv(path, X, y, names=None, target="target"):
    names = names or [f"x{i}" for i in range(X.shape[1])]
    with open(path, "w") as f:
        f.write(",".join(names + [target]) + "\n")
        for row, t in zip(X, y):
            f.write(",".join(f"{v:.6g}" for v in row) + f",{t}\n")
    return str(path)


@pytest.fixture(scope="module")
def logistic_csv(tmp_path_factory):
    rng = np.random.default_rng(0)
    X = rng.normal(size=(120, 3)) * [1.0, 10.0, 0.1] + [0.0, 50.0, 0.0]
    y = (X[:, 0] - 0.2 * (X[:, 1] - 50) + rng.normal(size=120) * 0.5 > 0).astype(int)
    return _csv(tmp_path_factory.mktemp("data") / "logit.csv", X, y)


def _run(args, input=None, figures=False):
    """The command's result. ``learn`` runs with --no-figures unless ``figures`` (or the args
    say which): drawing the report's PNGs took a third of this file's time (19 of 59 s in one
    process), and the tests of the figures ask for them."""
    if args[:1] == ["learn"] and not figures and not {"--figures", "--no-figures"} & set(args):
        args = args + ["--no-figures"]
    res = CliRunner().invoke(cli, args, input=input, catch_exceptions=False)
    return res


def _ok(args, input=None, figures=False):
    res = _run(args, input, figures)
    assert res.exit_code == 0, res.output
    return res


def _user_error(args, input=None):
    res = _run(args, input)
    assert res.exit_code != 0
    assert "Traceback" not in res.output and res.output.startswith("Error: "), res.output
    return res.output


def _usage_error(args):
    """The output of a usage error: click's exit status 2, no traceback."""
    res = _run(args)
    assert res.exit_code == 2 and "Traceback" not in res.output, res.output
    return res.output


def test_learn_csv_writes_report_and_checkpoint(tmp_path, logistic_csv):
    out = tmp_path / "rep"
    res = _ok(["learn", logistic_csv, "--out", str(out), "--quiet"], figures=True)
    assert res.output == ""
    m = json.loads((out / "metrics.json").read_text())
    assert m["family"] == "bernoulli" and m["rows_seen"] == 120 and m["rows_skipped"] == 0
    assert m["final"]["rows_scored"] == 120
    # the data are learnable: clearly better than the uniform prediction's log 2
    assert m["final"]["log_loss"] < 0.55 and m["final"]["accuracy"] > 0.75
    assert m["seconds_per_row"] > 0 and m["curve"]["row"][-1] == 120
    assert np.isclose(m["curve"]["log_loss"][-1], m["final"]["log_loss"])
    for png in m["files"]["plots"]:
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    extra = checkpoint.read_header(out / "model.npz")["extra"]
    assert extra["feature_names"] == ["x0", "x1", "x2"] and extra["scaler"]["count"] == 120
    # no --prior-var, no --forget: a bank, its members, final weights and weights over time
    b = m["bank"]
    assert m["learner"] == "ekf_bank" and len(b["members"]) == len(b["final_weights"]) > 1
    assert {"prior_var", "forgetting"} <= set(b["members"][0])
    assert abs(sum(b["final_weights"]) - 1) < 1e-9
    assert b["curve"]["row"] == m["curve"]["row"]
    assert all(abs(sum(w) - 1) < 1e-9 for w in b["curve"]["weights"])
    assert "bank_weights.png" in m["files"]["plots"]


def test_no_figures_writes_the_report_without_them(tmp_path, logistic_csv, monkeypatch):
    """--no-figures: the same scores, curve and model as with figures, no PNG and no figure
    workers, and the figures of a report written there before removed; one model per key too."""
    from kalnat import figure_workers

    keyed_csv = tmp_path / "keyed.csv"
    lines = open(logistic_csv).read().splitlines()
    keyed_csv.write_text("\n".join([lines[0] + ",user"] + [f"{line},u{i % 3}" for i, line in enumerate(lines[1:])]))
    for name, extra, model in (("one", [logistic_csv], "model.npz"), ("keyed", [str(keyed_csv), "--key", "user"],
                                                                     "keyed_model.npz")):
        out = tmp_path / name
        _ok(["learn", *extra, "--out", str(out), "--quiet", "--prior-var", "1"], figures=True)
        drawn = json.loads((out / "metrics.json").read_text())
        assert drawn["files"]["plots"] and all((out / png).exists() for png in drawn["files"]["plots"])
        with np.load(out / model) as z:
            learned = {k: z[k] for k in z.files}
        with monkeypatch.context() as mp:
            mp.setattr(figure_workers, "FigureWorkers", None)  # (started, it would raise)
            res = _ok(["learn", *extra, "--out", str(out), "--prior-var", "1", "--no-figures"])
        m = json.loads((out / "metrics.json").read_text())
        assert m["files"]["plots"] == [] and not list(out.glob("*.png"))
        assert m["final"] == drawn["final"] and m["curve"] == drawn["curve"]
        with np.load(out / model) as z:
            assert set(z.files) == set(learned) and all(np.array_equal(z[k], learned[k]) for k in z.files)
        assert f"{model})" in res.output and ".png" not in res.output


def test_given_settings_run_the_single_learner(tmp_path, logistic_csv):
    out = tmp_path / "one"
    res = _ok(["learn", logistic_csv, "--out", str(out), "--prior-var", "0.5"], figures=True)
    m = json.loads((out / "metrics.json").read_text())
    assert "bank" not in m and m["learner"] == "ekf" and "bank_weights.png" not in m["files"]["plots"]
    assert "ekf on linear" in res.output
    # the model file holds one filter's state, not a bank's
    assert checkpoint.read_header(out / "model.npz")["state_type"] == "State[Covariance]"


def test_chunked_reading_gives_the_same_run(tmp_path, logistic_csv):
    a, b = tmp_path / "a", tmp_path / "b"
    _ok(["learn", logistic_csv, "--out", str(a), "--quiet"])
    _ok(["learn", logistic_csv, "--out", str(b), "--quiet", "--chunk-rows", "7"])
    ma, mb = (json.loads((d / "metrics.json").read_text()) for d in (a, b))
    assert np.isclose(ma["final"]["log_loss"], mb["final"]["log_loss"], rtol=1e-9, atol=0)


def test_learn_from_standard_input_and_natgrad_equals_ekf(tmp_path, logistic_csv):
    text = open(logistic_csv).read()
    _ok(["learn", "-", "--out", str(tmp_path / "s"), "--quiet", "--method", "natgrad"], input=text)
    _ok(["learn", logistic_csv, "--out", str(tmp_path / "e"), "--quiet", "--prior-var", "1"])
    ms, me = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("s", "e"))
    assert ms["data"] == "<stdin>" and ms["rows_seen"] == 120
    # natural gradient with the Kalman rates is the same filter (docs/method.md §3)
    assert np.isclose(ms["final"]["log_loss"], me["final"]["log_loss"], rtol=1e-8)


def test_predict_reads_checkpoint_and_gives_probabilities(tmp_path, logistic_csv):
    out = tmp_path / "rep"
    _ok(["learn", logistic_csv, "--out", str(out), "--quiet"])
    assert checkpoint.read_header(out / "model.npz")["state_type"] == "BankState"
    res = _ok(["predict", "--model-dir", str(out), logistic_csv])
    rows = list(csv.DictReader(io.StringIO(res.output)))
    assert len(rows) == 120 and rows[0]["line"] == "2"
    p0, p1 = np.array([[float(r["prob_0"]), float(r["prob_1"])] for r in rows]).T
    np.testing.assert_allclose(p0 + p1, 1.0, atol=1e-5)
    std = np.array([float(r["prob_std_1"]) for r in rows])
    # at most √(p (1 − p)); p and the deviation as printed, to 6 digits (1e-6 under the root)
    assert np.all(std >= 0) and np.all(std <= np.sqrt(p1 * (1 - p1) + 1e-6))
    y = np.loadtxt(logistic_csv, delimiter=",", skiprows=1)[:, -1]
    assert np.mean((p1 > 0.5) == y) > 0.8       # the final model fits the data it learned
    assert {r["predicted"] for r in rows} <= {"0", "1"}


def test_outputs_it_cannot_write_are_usage_errors_and_a_stopped_run_writes_no_file(tmp_path, logistic_csv):
    """A report folder under a file, or an output file in a folder that does not exist: a usage
    error naming the option, before any work. A run stopped by a bad row leaves neither a partial
    file nor a clobbered one: ``predict --out`` and ``learn --predictions`` write under a
    temporary name and rename once complete."""
    a_file = tmp_path / "a_file"
    a_file.write_text("mine\n")
    for args in (["learn", logistic_csv, "--out", str(a_file / "rep")],
                 ["learn", logistic_csv, "--out", str(a_file)],
                 ["compare", logistic_csv, "--out", str(a_file / "rep")]):
        res = _run(args + ["--quiet"] if args[0] == "learn" else args)
        assert res.exit_code == 2 and "Invalid value for" in res.output and "--out" in res.output, res.output
    rep = tmp_path / "rep"
    _ok(["learn", logistic_csv, "--out", str(rep), "--quiet"])
    for out in (a_file / "p.csv", tmp_path / "missing" / "p.csv", tmp_path):
        res = _run(["predict", "--model-dir", str(rep), logistic_csv, "--out", str(out)])
        assert res.exit_code == 2 and "Invalid value for --out" in res.output, res.output
    lines = open(logistic_csv).read().splitlines()
    lines[60] = "abc," + lines[60].split(",", 1)[1]
    bad = tmp_path / "bad.csv"
    bad.write_text("\n".join(lines) + "\n")
    before = sorted(p.name for p in tmp_path.iterdir())
    assert "Error: " in _run(["predict", "--model-dir", str(rep), str(bad), "--out", str(a_file)]).output
    assert _run(["learn", str(bad), "--out", str(tmp_path / "rep2"), "--quiet",
                 "--predictions", str(tmp_path / "pred.csv")]).exit_code == 1
    assert a_file.read_text() == "mine\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    # through a link the file it names is written (the link stays); a device is written in place
    (tmp_path / "link.csv").symlink_to(a_file)
    _ok(["predict", "--model-dir", str(rep), logistic_csv, "--out", str(tmp_path / "link.csv")])
    assert (tmp_path / "link.csv").is_symlink() and a_file.read_text().startswith("line,")
    _ok(["predict", "--model-dir", str(rep), logistic_csv, "--out", os.devnull])


def test_a_terminated_command_leaves_no_partial_output(tmp_path, logistic_csv):
    """SIGTERM (a job's time limit) while ``kalnat predict`` writes: status 143 and neither the
    output nor its temporary file left behind (Python's default ends the process at once). The
    command waits on its standard input for rows when the signal comes."""
    rep = tmp_path / "rep"
    _ok(["learn", logistic_csv, "--out", str(rep), "--quiet"])
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    out = tmp_path / "out" / "p.csv"
    out.parent.mkdir()
    lines = open(logistic_csv).read().splitlines()
    proc = subprocess.Popen([sys.executable, "-m", "kalnat.cli", "predict", "--model-dir", str(rep), "-",
                             "--out", str(out)], stdin=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(env, JAX_PLATFORMS="cpu"))
    try:
        proc.stdin.write("\n".join(lines[:4]) + "\n")
        proc.stdin.flush()
        deadline = time.monotonic() + 120
        while not os.listdir(out.parent) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert [p.endswith(".part") for p in os.listdir(out.parent)] == [True], proc.poll()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 143
    finally:
        proc.kill()
        proc.stdin.close()
        proc.stderr.close()
    assert os.listdir(out.parent) == []


@pytest.mark.parametrize("method", ["ekf-joseph", "information", "sqrt-ekf", "iterated", "nig"])
def test_every_method_learns_and_its_checkpoint_predicts(tmp_path, logistic_csv, method):
    """Every --method runs the stream and writes a model that `kalnat predict` loads; the
    forms of the exact filter score as the EKF does. nig takes a gaussian target."""
    data = logistic_csv
    if method == "nig":
        rng = np.random.default_rng(3)
        X = rng.normal(size=(80, 2))
        data = _csv(tmp_path / "g.csv", X, 2 * X[:, 0] - X[:, 1] + 0.3 * rng.normal(size=80))
    runs = {}
    for m in (method, "ekf"):
        _ok(["learn", data, "--out", str(tmp_path / m), "--quiet", "--prior-var", "1", "--method", m])
        runs[m] = json.loads((tmp_path / m / "metrics.json").read_text())["final"]
    key = "rmse" if method == "nig" else "log_loss"
    if method in ("ekf-joseph", "information", "sqrt-ekf"):
        assert runs[method][key] == pytest.approx(runs["ekf"][key], rel=1e-8)
    else:  # a different learner, as good on these data
        assert runs[method][key] < 1.1 * runs["ekf"][key]
    rows = list(csv.DictReader(io.StringIO(_ok(["predict", "--model-dir", str(tmp_path / method), data]).output)))
    assert len(rows) == (80 if method == "nig" else 120)
    assert all(np.isfinite(float(v)) for r in rows for k, v in r.items() if k != "line")


def test_bundled_regression_set_and_predict_uncertainty(tmp_path):
    out = tmp_path / "rep"
    _ok(["learn", "diabetes", "--out", str(out), "--quiet"], figures=True)  # a regression's figures
    m = json.loads((out / "metrics.json").read_text())
    assert m["family"] == "gaussian" and m["rows_seen"] == 442 and m["first_scored_row"] == 3
    assert "learning_curve_rmse.png" in m["files"]["plots"] and (out / "learning_curve_rmse.png").exists()
    assert 50 < m["final"]["rmse"] < 65        # y has sd 77; least squares in-sample 53.5
    X = np.random.default_rng(0).normal(0, 0.05, size=(4, 10))
    names = ["age", "sex", "bmi", "bp", "s1", "s2", "s3", "s4", "s5", "s6"]
    path = _csv(tmp_path / "new.csv", X, [0] * 4, names=names, target="unused")
    res = _ok(["predict", "--model-dir", str(out), path])
    rows = list(csv.DictReader(io.StringIO(res.output)))
    assert len(rows) == 4
    for r in rows:
        assert 0 < float(r["param_std"]) < float(r["std"]) and 0 < float(r["mean"]) < 400


def test_default_learn_runs_on_a_bundled_set(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    res = _ok(["learn"], figures=True)  # the command as it is, figures and all
    assert "breast_cancer: 569 rows" in res.output
    m = json.load(open("kalnat-report/metrics.json"))
    assert len(m["files"]["plots"]) == 4  # two learning curves, the bank's weights, the confusion matrix
    assert f"report: kalnat-report/ ({', '.join(['metrics.json', *m['files']['plots'], 'model.npz'])})" in res.output
    # the numbers README.md and docs/cli.md (kalnat compare) give for the default, to their printed digits
    assert round(m["final"]["log_loss"], 4) == 0.1248 and round(m["final"]["accuracy"], 4) == 0.9578


def test_categorical_text_labels_and_mlp(tmp_path):
    rng = np.random.default_rng(1)
    X = rng.normal(size=(60, 2))
    y = np.where(X[:, 0] > 0.5, "hi", np.where(X[:, 0] < -0.5, "lo", "mid"))
    path = _csv(tmp_path / "c.csv", X, y, target="level")
    out = tmp_path / "rep"
    _ok(["learn", path, "--out", str(out), "--quiet", "--model", "mlp:4", "--prior-var", "0.3"])
    m = json.loads((out / "metrics.json").read_text())
    assert m["family"] == "categorical" and m["classes"] == ["hi", "lo", "mid"]
    res = _ok(["predict", "--model-dir", str(out), path])
    assert res.output.splitlines()[0] == "line,predicted,prob_hi,prob_lo,prob_mid,prob_std_hi,prob_std_lo,prob_std_mid"
    # classes x and std_x: P(std_x) and the deviation of P(x) were both prob_std_x
    named = _csv(tmp_path / "s.csv", X, np.where(np.asarray(y) == "hi", "std_x", "x"), target="level")
    _ok(["learn", named, "--out", str(tmp_path / "s"), "--quiet", "--prior-var", "1"])
    head = _ok(["predict", "--model-dir", str(tmp_path / "s"), named]).output.splitlines()[0].split(",")
    assert head == ["line", "predicted", "prob_std_x", "prob_x", "prob_std__std_x", "prob_std__x"]


def test_bad_rows_give_located_errors(tmp_path):
    good = "a,b,y\n1,2,0\n3,4,1\n"
    cases = [
        (good + "5,6\n", "line 4: expected 3 fields"),
        (good + "5,oops,1\n", "line 4, column 'b': non-numeric value 'oops'"),
        (good + "5,6,maybe\n", "line 4, column 'y': label 'maybe'"),
    ]
    for k, (text, msg) in enumerate(cases):
        path = tmp_path / f"bad{k}.csv"
        path.write_text(text)
        # --chunk-rows 2: the task (bernoulli) is inferred from the first two rows
        out = _user_error(["learn", str(path), "--out", str(tmp_path / "r"), "--quiet",
                           "--chunk-rows", "2"])
        assert str(path) in out and msg in out, out
    out = _user_error(["learn", str(tmp_path / "bad0.csv"), "--target", "price", "--quiet",
                       "--out", str(tmp_path / "r")])
    assert "no target column 'price'" in out and "line 1" in out
    assert "no such file or bundled data set" in _user_error(["learn", "nope.csv"])
    # a malformed option value is a usage error, status 2, as click's own are
    for option, value in (("--model", "mlp:x"), ("--model", "mlp:3,,2"), ("--covariance", "lowrank:0"),
                          ("--dtype", "f16"), ("--delimiter", "ab")):   # (mlp:3,,2 was read as mlp:3,2)
        res = _run(["learn", "iris", option, value])
        assert res.exit_code == 2 and f"Invalid value for {option}: {value!r}: expected" in res.output, res.output
    assert "filters would need" in _user_error(["learn", "iris", "--model", "mlp:3000,3000"])
    # a checkpoint stores the spec as typed: one written before the option was checked so loads
    from kalnat.cli_choices import parse_model
    assert parse_model("mlp:3,,2") == parse_model("mlp:3,2") == ("mlp", (3, 2))


def test_skip_bad_rows_counts_them_in_the_report(tmp_path):
    rng = np.random.default_rng(2)
    lines = ["a,b,y"] + [f"{u:.3f},{v:.3f},{int(u > 0)}" for u, v in rng.normal(size=(30, 2))]
    lines[5] = "1,oops,1"
    lines[9] = "1,2"
    lines[12] = "1,2,7"        # not a label of the bernoulli task inferred from the first rows
    path = tmp_path / "some_bad.csv"
    path.write_text("\n".join(lines) + "\n")
    out = tmp_path / "rep"
    _ok(["learn", str(path), "--out", str(out), "--quiet", "--skip-bad-rows", "--chunk-rows", "8"])
    m = json.loads((out / "metrics.json").read_text())
    assert m["rows_skipped"] == 3 and m["rows_seen"] == 27
    assert sorted(s["line"] for s in m["skipped"]) == [6, 10, 13]


def test_datasets_command_lists_sets():
    res = _ok(["datasets"])
    assert "breast_cancer" in res.output and "569" in res.output and "10 classes" in res.output


def test_verify_quick_table():
    res = _ok(["verify", "--quick", "--rows", "12"])
    assert "equal up to rounding" in res.output
    devs = [float(x) for line in res.output.splitlines()[2:6] for x in line.split()[-4:]]
    assert len(devs) == 16 and max(devs) < 1e-10


def test_a_missing_model_a_bad_out_folder_and_a_file_of_no_rows_are_located_errors(tmp_path, logistic_csv):
    """`predict` from a folder with no model, or with a checkpoint `kalnat learn` did not write
    (keyed or not); `--out` an empty path or under a file; a file of no rows, or only bad ones
    (one stream or one per key), to `learn` and `compare`: each an error that names the file or
    the option, a non-zero exit, no traceback."""
    empty, foreign, keyed = (tmp_path / name for name in ("empty", "foreign", "keyed"))
    for folder in (empty, foreign, keyed):
        folder.mkdir()
    checkpoint.save(foreign / "model.npz", {"w": np.zeros(2)})
    checkpoint.save(keyed / "keyed_model.npz", {"w": np.zeros(2)})
    for folder, said in ((empty, "model.npz: no model here (run `kalnat learn --out DIR` first)"),
                         (foreign, "model.npz: not written by `kalnat learn`"),
                         (keyed, "keyed_model.npz: not a keyed model written by `kalnat learn --key`")):
        assert said in _user_error(["predict", "--model-dir", str(folder), logistic_csv])
    (empty / "metrics.json").write_text('{"files": {"model": "keyed_model.npz"}}')  # named, not there
    assert "keyed_model.npz: no keyed model here (run `kalnat learn --key COL --out DIR` first)" in _user_error(
        ["predict", "--model-dir", str(empty), logistic_csv])
    (empty / "keyed_model.npz").write_text("not an archive")   # named, there, not a checkpoint
    assert "keyed_model.npz: not a kalnat checkpoint" in _user_error(
        ["predict", "--model-dir", str(empty), logistic_csv])
    (empty / "metrics.json").write_text('{"files": {"model": "shards/"}}')   # learned on Dask
    (empty / "shards").mkdir()
    (empty / "shards" / "model.json").write_text("{not JSON")
    assert "shards: not a keyed model written by `kalnat learn --key`" in _user_error(
        ["predict", "--model-dir", str(empty), logistic_csv])
    header = tmp_path / "header.csv"
    header.write_text("k,a,target\n")
    out = ["--out", str(tmp_path / "o"), "--quiet"]
    for folder, said in (("", "Invalid value for --out: an empty path"),
                         (f"{header}/a/b", f"Invalid value for --out: cannot make the folder {header}/a/b: {header} "
                                           "is a file")):
        assert said in _usage_error(["learn", logistic_csv, "--out", folder])
    assert "header.csv: no data rows" in _user_error(["learn", str(header), *out])
    assert "header.csv: no data rows" in _user_error(["compare", str(header), "--out", str(tmp_path / "c")])
    # a feature that is not a number (skipped as the file is read), then a label that is not a
    # class (skipped once the learner is built): a learner, and not one row learned
    bad = tmp_path / "bad.csv"
    bad.write_text("k,a,target\n1,x,0\n2,2,3\n")
    for key in ([], ["--key", "k"]):
        assert "bad.csv: no data rows (2 bad rows skipped)" in _user_error(
            ["learn", str(bad), *out, "--skip-bad-rows", "--classes", "0,1", *key])


def test_options_that_do_not_go_together_or_out_of_range_are_usage_errors(tmp_path, logistic_csv):
    """Each a usage error (click's exit status 2, the option named), before any data is read."""
    out = ["--out", str(tmp_path / "o")]
    for args, said in (
            (["learn", logistic_csv, "--forget", "1.5"], "Invalid value for --forget: must lie in (0, 1]"),
            (["learn", logistic_csv, "--prior-var", "0"], "Invalid value for --prior-var: must be a positive number"),
            (["learn", logistic_csv, "--prior-var", "inf"], "Invalid value for --prior-var: must be a positive number"),
            *((["learn", logistic_csv, "--clip", v], "Invalid value for --clip: must be 0 (no clipping) or a positive number")
              for v in ("nan", "-1", "inf")),   # (NaN was written to metrics.json, -1 taken as 0)
            (["learn", logistic_csv, "--classes", "0,1,0"], "Invalid value for --classes: the label '0' is given twice"),
            (["learn", logistic_csv, "--family", "poisson", "--classes", "0,1"],
             "Invalid value for --classes: labels of classes, for a bernoulli or categorical target, not a poisson one"),
            (["learn", logistic_csv, "--shuffle", "-1"], "Invalid value for '--shuffle': -1 is not in the range x>=0"),
            *((["learn", logistic_csv, "--delimiter", d], f"Invalid value for --delimiter: {d!r}: a separator cannot be "
               "a character of numbers, a quote or a line break") for d in ('"', "1", ".", "e")),
            (["compare", logistic_csv, "--lr-grid", "0.1,0.01,0.1"], "Invalid value for --lr-grid: the rate 0.1 is given twice"),
            *((["compare", logistic_csv, "--lr-grid", f"0.1,{v}"], f"Invalid value for --lr-grid: learning rates are "
               f"positive numbers, not {v}") for v in ("nan", "0.0", "-1.0", "inf")),
            (["learn", logistic_csv, "--workers", "2"],
             "--workers and --scheduler distribute the keys of --key COLUMN; pass --key"),
            (["learn", logistic_csv, "--key", "x0", "--workers", "2", "--scheduler", "tcp://nowhere:1"],
             "--workers starts a local cluster, --scheduler joins one: pass one of them"),
            (["learn", logistic_csv, "--key", "x0", "--predictions", str(tmp_path / "p.csv")],
             "--predictions writes one stream's predictions; with --key the report folder's per_key.csv"),
            (["compare", logistic_csv, "--lr-grid", "0.1,fast"], "Invalid value for --lr-grid: not a list of numbers")):
        assert said in _usage_error([*args, *out])
    assert not (tmp_path / "o").exists() and not (tmp_path / "p.csv").exists()


def test_a_target_that_does_not_fit_the_task_asked_for_is_a_located_error(tmp_path):
    """--family bernoulli on real targets or on three labels, --family categorical on 300
    distinct names, --method nig on labels: each says what the target is and what to pass,
    before anything is learned."""
    rng = np.random.default_rng(0)
    X = rng.normal(size=(300, 2))
    reals = _csv(tmp_path / "reals.csv", X, np.round(rng.normal(size=300), 4))
    three = _csv(tmp_path / "three.csv", X, rng.integers(0, 3, 300))
    labels = _csv(tmp_path / "labels.csv", X, rng.integers(0, 2, 300))
    ids = _csv(tmp_path / "ids.csv", X, [f"user{i}" for i in range(300)])
    out = ["--out", str(tmp_path / "o"), "--quiet"]
    for args, said in (
            ([reals, "--family", "bernoulli"], "reals.csv: the target 'target' is not a class label (it looks "
                                                "gaussian); pass --classes or another --family"),
            ([ids, "--family", "categorical"], "ids.csv: 300 distinct values in the target 'target' is too many "
                                                "classes; is it a regression (--family gaussian)"),
            ([three, "--family", "bernoulli"], "three.csv: bernoulli needs two classes, the target has 3 (0, 1, 2); "
                                                "use --family categorical"),
            ([labels, "--method", "nig"], "--method nig learns the noise scale of a gaussian target; this target is "
                                           "bernoulli")):
        assert said in _user_error(["learn", *args, *out])
    assert not (tmp_path / "o").exists()


def test_the_command_says_what_it_guessed_the_target_to_be(tmp_path, logistic_csv):
    """With no --family and a file that names no task, `learn` (one stream or one per key) and
    `compare` read the task from the first rows and say so; with --family they guess nothing."""
    keyed = tmp_path / "keyed.csv"
    with open(logistic_csv) as src, open(keyed, "w") as dst:  # a key column in front: two users
        dst.writelines(("user," if i == 0 else f"u{i % 2},") + line for i, line in enumerate(src))
    one = ["--prior-var", "1", "--forget", "1"]   # one EKF: quick to compile
    said = "target 'target' looks bernoulli over 2 classes (0, 1) from its first rows; pass --family"
    runs = {"learn": ["learn", logistic_csv, *one], "learn --key": ["learn", str(keyed), "--key", "user", *one],
            "compare": ["compare", logistic_csv, *one, "--no-kalnat-grid", "--lr-grid", "0.1"]}
    for name, args in runs.items():
        assert said in _ok([*args, "--out", str(tmp_path / name)]).output, name
    told = _ok([*runs["learn"], "--out", str(tmp_path / "told"), "--family", "bernoulli"]).output
    assert "looks" not in told and "--classes" not in told and "no header row" not in told
    # a file with no header row: its first row is read as the names (and not learned), as said
    headless = tmp_path / "headless.csv"
    headless.write_text("".join(open(logistic_csv).readlines()[1:]))
    out = _ok(["learn", str(headless), *one, "--out", str(tmp_path / "headless"), "--family", "bernoulli"]).output
    first = open(logistic_csv).readlines()[1].strip().split(",")
    assert (f"headless.csv: every column name ({first[-1]}, {', '.join(first[:3])}) is a number: a file with no "
            "header row? Its first line was read as the names, not learned") in out, out


def test_compare_on_a_small_set(tmp_path, monkeypatch):
    monkeypatch.delenv("KALNAT_QUICK_COMPILE", raising=False)
    out = tmp_path / "cmp"
    res = _ok(["compare", "iris", "--out", str(out), "--no-kalnat-grid", "--lr-grid", "0.01,0.1"])
    rep = json.loads((out / "compare.json").read_text())
    names = [r["name"] for r in rep["results"]]
    assert names[0] == "kalnat" and rep["results"][0]["setting"].startswith("no settings")
    assert rep["quick_compile"] is True   # a short set's programs compiled quickly, as kalnat learn's
    assert "offline GLM, 10-fold CV" in names
    assert "sgd (optax), best of grid" in names and "scikit-learn SGD partial_fit" in names
    assert set(rep["grids"]["adam"]) == {"lr=0.01", "lr=0.1"}
    assert all(np.isfinite(r["log_loss"]) for r in rep["results"])
    assert (out / "compare.png").read_bytes()[:4] == b"\x89PNG"
    assert "no settings: bank of 40 EKFs (1 or 2 linearisations)" in res.output and "log-loss" in res.output


def test_compare_runs_one_filter_as_set_and_over_kalnats_grid(tmp_path, logistic_csv):
    """With --prior-var and --forget, `compare` runs that one filter, then (its default) the
    same filter over kalnat's grid of priors and forgetting factors, every setting's log-loss
    reported and the best in hindsight beside the rest."""
    from kalnat.cli_compare import KALNAT_GRID

    out = tmp_path / "cmp"
    _ok(["compare", logistic_csv, "--out", str(out), "--prior-var", "1", "--forget", "1", "--lr-grid", "0.1",
         "--family", "bernoulli"])
    rep = json.loads((out / "compare.json").read_text())
    assert (rep["results"][0]["name"], rep["results"][0]["setting"]) == ("kalnat ekf", "prior_var=1, λ=1")
    grid = rep["grids"]["kalnat"]
    assert set(grid) == {f"prior_var={pv:g}, λ={lam:g}" for pv, lam in KALNAT_GRID}
    assert all(np.isfinite(v) for v in grid.values())
    best = [r for r in rep["results"] if r["name"] == "kalnat ekf, best of grid"]
    assert len(best) == 1 and best[0]["log_loss"] == min(grid.values())
    assert grid[best[0]["setting"]] == best[0]["log_loss"]
    # the grid's setting (1, 1) is the filter run first: the same rows, the same log-loss
    assert grid["prior_var=1, λ=1"] == rep["results"][0]["log_loss"]


def test_compare_on_counts_skips_the_libraries_without_a_poisson_learner(tmp_path):
    """On a count target `compare` says which libraries have no online Poisson learner and goes
    on, the offline GLM a Poisson regression."""
    rng = np.random.default_rng(0)
    X = rng.normal(size=(150, 2))
    data = _csv(tmp_path / "counts.csv", X, rng.poisson(np.exp(0.5 * X[:, 0])))
    out = tmp_path / "cmp"
    res = _ok(["compare", data, "--family", "poisson", "--prior-var", "1", "--forget", "1", "--no-kalnat-grid",
               "--lr-grid", "0.1", "--out", str(out)])
    assert "skipped: scikit-learn has no online Poisson learner" in res.output
    assert "skipped: river has no Poisson linear model" in res.output
    rep = {r["name"]: r for r in json.loads((out / "compare.json").read_text())["results"]}
    assert {"kalnat ekf", "offline GLM, in-sample", "offline GLM, 10-fold CV"} <= set(rep)
    assert all(np.isfinite(r["log_loss"]) for r in rep.values())
    # in-sample, the maximum-likelihood fit scores at least as well as its held-out folds
    assert rep["offline GLM, in-sample"]["log_loss"] <= rep["offline GLM, 10-fold CV"]["log_loss"]


def test_a_diverging_learner_is_a_located_error_in_the_command_s_terms(tmp_path):
    """A Poisson MLP with a prior variance of 10⁶ overflows its log link within a few dozen
    rows: the command stops with the stream's row and its own flags (not the Python API's
    advice, which kalnat.fit raises underneath), and a non-zero exit."""
    rng = np.random.default_rng(0)
    X = rng.normal(size=(200, 2))
    y = rng.poisson(np.exp(0.5 * X[:, 0]))
    data = _csv(tmp_path / "counts.csv", X, y)
    out = _user_error(["learn", data, "--family", "poisson", "--model", "mlp:8", "--prior-var", "1e6",
                       "--quiet", "--out", str(tmp_path / "r")])
    assert "diverged (non-finite prediction at row " in out and "--prior-var" in out
    assert "learner.init" not in out


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="reads /proc/self/fd (Linux)")
def test_a_command_that_stops_closes_its_file(tmp_path, open_paths):
    """A run stopped by its data after reading began (here a third class for a Bernoulli
    family) has closed the CSV file it read when it returns, not whenever the garbage collector
    frees its stream (a ResourceWarning in whichever test that falls in)."""
    path = tmp_path / "d.csv"
    path.write_text("a,b,y\n1,2,0\n2,3,1\n3,4,2\n")
    res = CliRunner().invoke(cli, ["learn", str(path), "--family", "bernoulli", "--quiet",
                                   "--out", str(tmp_path / "r")])
    assert res.exit_code == 1 and "bernoulli needs two classes" in res.output, res.output
    assert os.path.realpath(path) not in open_paths()


@pytest.mark.parametrize("how", ["running", "key"])
def test_a_learner_diverging_under_running_scaling_or_per_key_names_its_row(tmp_path, how):
    """The Poisson MLP above in float32 diverges under --scaling running (kalnat.fit's check,
    raised underneath) and with a model per key (the command's check of the predictions): the
    error names the first row whose prediction is not finite, counted over the chunks before it
    (--chunk-rows 20), and the key of that row as the file spells it ('u2', not NumPy's
    np.str_('u2')). The file cut just before that row learns; nothing is written for the one
    that failed."""
    rng = np.random.default_rng(0)
    X = rng.normal(size=(200, 2))
    y = rng.poisson(np.exp(0.5 * X[:, 0]))
    keys = [f"u{k}" for k in rng.integers(0, 3, 200)]
    flags = ["--family", "poisson", "--model", "mlp:8", "--prior-var", "1e6", "--dtype", "float32",
             "--chunk-rows", "20", "--quiet"]
    flags += ["--key", "user"] if how == "key" else ["--scaling", "running"]

    def write(name, n):  # the first n rows, with the key column (text) where there is one
        with open(tmp_path / name, "w") as f:
            f.write("user,a,b,target\n" if how == "key" else "a,b,target\n")
            for k, (a, b), t in zip(keys[:n], X[:n], y[:n]):
                f.write((f"{k}," if how == "key" else "") + f"{a:.6g},{b:.6g},{t}\n")
        return str(tmp_path / name)

    out = _user_error(["learn", write("all.csv", 200), "--out", str(tmp_path / "all")] + flags)
    row = int(re.search(r"non-finite prediction at row (\d+)\)", out).group(1))
    assert row > 20, out  # in a later chunk than the first
    if how == "key":
        assert f"the learner of key '{keys[row - 1]}' diverged" in out, out
    assert not (tmp_path / "all").exists()
    _ok(["learn", write("before.csv", row - 1), "--out", str(tmp_path / "before")] + flags)


def test_forgetting_with_a_constant_column_does_not_wind_up(tmp_path):
    """λ = 0.95 overflows a float64 covariance along a never-excited feature after ~14 000 rows:
    the command's learners bound it and run on, the EKF and the natural gradient as the same
    bounded filter (equal scores)."""
    rng = np.random.default_rng(5)
    n = 15_000
    X = rng.normal(size=(n, 3))
    X[:, 2] = 4.0
    y = (X[:, 0] - X[:, 1] + rng.normal(size=n) > 0).astype(int)
    data = _csv(tmp_path / "const.csv", X, y)
    final = {}
    for method in ("ekf", "natgrad"):
        _ok(["learn", data, "--out", str(tmp_path / method), "--quiet", "--forget", "0.95",
             "--prior-var", "1", "--method", method])
        m = json.loads((tmp_path / method / "metrics.json").read_text())
        assert m["rows_seen"] == n and m["final"]["log_loss"] < 0.5
        final[method] = m["final"]["log_loss"]
    assert final["natgrad"] == pytest.approx(final["ekf"], rel=1e-9)


COVARIANCE_STATES = {"diag": "DiagonalCovariance", "blocks": "BlockCovariance", "lowrank:2": "LowRankPrecision",
                     "kron": "KronCovariance", "last-layer:2": "GroupCovariance"}


@pytest.mark.parametrize("covariance", list(COVARIANCE_STATES))
def test_covariance_option_learns_and_its_checkpoint_predicts(tmp_path, logistic_csv, covariance):
    """--covariance diag|blocks|lowrank:K|kron|last-layer:K: the filter on another
    representation, single and as the bank, and the checkpoint rebuilds it for predict; a method
    with a form of its own refuses it."""
    model = ["--model", "mlp:3"] if covariance.startswith("last-layer") else []
    for extra, name in ((["--prior-var", "1"], "one"), ([], "bank")):
        out = tmp_path / f"{covariance}-{name}"
        _ok(["learn", logistic_csv, "--out", str(out), "--quiet", "--covariance", covariance] + model + extra)
        metrics = json.loads((out / "metrics.json").read_text())
        assert metrics["settings"]["covariance"] == covariance and f"{covariance} covariance" in metrics["learner_text"]
        # learns (the data's base rate is ~0.69; the small MLP at prior 1 is slower in 120 rows)
        assert metrics["final"]["log_loss"] < (0.68 if model else 0.6)
        if name == "one":
            assert checkpoint.read_header(out / "model.npz")["state_type"] == f"State[{COVARIANCE_STATES[covariance]}]"
        rows = list(csv.DictReader(io.StringIO(_ok(["predict", "--model-dir", str(out), logistic_csv]).output)))
        assert len(rows) == 120
    res = CliRunner().invoke(cli, ["learn", logistic_csv, "--out", str(tmp_path / "x"), "--quiet",
                                   "--covariance", covariance, "--method", "information", "--prior-var", "1"])
    assert res.exit_code != 0 and "applies to --method ekf" in res.output


def test_default_covariance_is_chosen_by_size_and_recorded(tmp_path, logistic_csv):
    """auto: the full covariance up to AUTO_FULL_MAX parameters, a diagonal plus rank-10
    precision beyond (the checkpoint records which, so it loads the same way later); a bad
    --covariance is a one-line error."""
    from kalnat.cli_choices import AUTO_FULL_MAX, resolve_covariance
    assert resolve_covariance("auto", AUTO_FULL_MAX) == "full"
    assert resolve_covariance(None, AUTO_FULL_MAX + 1) == "lowrank:10"
    assert resolve_covariance("last-layer", 5) == "last-layer:10"
    width = AUTO_FULL_MAX // 4  # 3 inputs: 5·width + 1 parameters
    out = tmp_path / "wide"
    _ok(["learn", logistic_csv, "--out", str(out), "--quiet", "--model", f"mlp:{width}", "--prior-var", "0.1"])
    header = checkpoint.read_header(out / "model.npz")
    assert header["state_type"] == "State[LowRankPrecision]" and header["extra"]["covariance"] == "lowrank:10"
    assert json.loads((out / "metrics.json").read_text())["settings"]["covariance"] == "lowrank:10"   # auto, resolved


def test_dtype_is_float32_where_the_covariances_together_are_large_and_is_recorded(tmp_path, logistic_csv):
    """--dtype auto: float64 up to AUTO_FLOAT32_ABOVE numbers in the learner's covariances
    together, float32 beyond (one filter of 321 parameters: 103 041 numbers, float64; the bank
    of 40 of them: float32). --dtype float32 runs the filter in float32 (its state, the report
    saying so) and the checkpoint records it, predicting what the float64 run predicts to
    float32's precision (a linear model: an MLP's path through 120 rows moves with rounding); a
    float64 checkpoint written before --dtype (no such field) still loads as float64, not as what
    auto now picks; a bad --dtype is a one-line error."""
    from kalnat import cli_setup
    from kalnat.cli_choices import AUTO_FLOAT32_ABOVE, resolve_dtype
    assert resolve_dtype("auto", AUTO_FLOAT32_ABOVE) == "float64"
    assert resolve_dtype(None, AUTO_FLOAT32_ABOVE + 1) == "float32"
    assert resolve_dtype("float64", 10**9) == "float64" and resolve_dtype("Float32", 1) == "float32"
    with pytest.raises(ValueError, match="--dtype"):
        resolve_dtype("float16", 1)
    family = cli_setup.make_family("bernoulli")
    for model, prior_var, dtype in (("mlp:64", 0.1, "float64"), ("mlp:64", None, "float32"),
                                    ("linear", None, "float64")):
        cfg = {"model_spec": model, "method": "ekf", "prior_var": prior_var, "forgetting": None,
               "covariance": "auto"}
        state = cli_setup.build_learner(cfg, family, 3)[2]
        assert {a.dtype.name for a in jax.tree_util.tree_leaves(state) if a.dtype.kind == "f"} == {dtype}

    def learned(name, options):
        out = tmp_path / name
        _ok(["learn", logistic_csv, "--out", str(out), "--quiet", "--prior-var", "1"] + options)
        rows = list(csv.DictReader(io.StringIO(_ok(["predict", "--model-dir", str(out), logistic_csv]).output)))
        return out, json.loads((out / "metrics.json").read_text()), np.array([float(r["prob_1"]) for r in rows])

    probs = {}
    for dtype, option in (("float32", ["--dtype", "float32"]), ("float64", [])):
        out, metrics, probs[dtype] = learned(dtype, option)
        assert metrics["dtype"] == dtype
        assert metrics["learner_text"] == ("ekf in float32" if dtype == "float32" else "ekf")
        assert metrics["final"]["log_loss"] < 0.6
        header = checkpoint.read_header(out / "model.npz")
        assert header["extra"]["dtype"] == dtype
        assert {spec[1] for spec in header["leaves"] if spec[1].startswith("float")} == {dtype}
    np.testing.assert_allclose(probs["float32"], probs["float64"], atol=1e-5)
    # a float64 checkpoint as an earlier version wrote it, no dtype in its header, of a learner
    # that auto now runs in float32 (one filter of 1 026 parameters: 1 052 676 numbers)
    out, metrics, before = learned("old", ["--model", "mlp:205", "--covariance", "full", "--dtype", "float64"])
    assert metrics["n_parameters"] == 1026
    with np.load(out / "model.npz") as f:
        arrays = {k: f[k] for k in f}
    header = json.loads(bytes(arrays["__header__"]).decode())
    del header["extra"]["dtype"]
    arrays["__header__"] = np.frombuffer(json.dumps(header).encode(), np.uint8)
    np.savez(out / "model.npz", **arrays)
    rows = list(csv.DictReader(io.StringIO(_ok(["predict", "--model-dir", str(out), logistic_csv]).output)))
    np.testing.assert_array_equal([float(r["prob_1"]) for r in rows], before)
    res = _run(["learn", logistic_csv, "--dtype", "float16"])
    assert res.exit_code == 2 and "Invalid value for --dtype: 'float16'" in res.output, res.output


def test_delimiter_by_name_and_a_hint_for_a_tsv(tmp_path):
    """--delimiter tab (or '\\t') reads a TSV; reading one without it names the fix; a long
    delimiter is a one-line error, not a traceback."""
    rng = np.random.default_rng(4)
    X = rng.normal(size=(40, 2))
    y = (X[:, 0] > 0).astype(int)
    path = tmp_path / "d.tsv"
    path.write_text("a\tb\ty\n" + "".join(f"{r[0]:.5f}\t{r[1]:.5f}\t{t}\n" for r, t in zip(X, y)))
    for name in ("tab", "\\t", "\t"):
        _ok(["learn", str(path), "--out", str(tmp_path / "out"), "--quiet", "--prior-var", "1", "--delimiter", name])
    res = CliRunner().invoke(cli, ["learn", str(path), "--out", str(tmp_path / "o2"), "--quiet", "--target", "y"])
    assert res.exit_code != 0 and "--delimiter tab" in res.output and "Traceback" not in res.output
    res = CliRunner().invoke(cli, ["learn", str(path), "--out", str(tmp_path / "o3"), "--quiet", "--delimiter", "ab"])
    assert res.exit_code != 0 and "expected one character" in res.output and res.exception is None or \
        isinstance(res.exception, SystemExit)


@pytest.mark.parametrize("where", ["target", "feature"])
def test_a_value_too_large_to_standardise_is_a_located_error(tmp_path, where):
    """1e308 in a cell: a located error and a non-zero exit (it used to print a NaN log-loss
    and exit 0, or blame the prior), and with --skip-bad-rows the row is skipped and counted."""
    rng = np.random.default_rng(5)
    X = rng.normal(size=(30, 2))
    y = X[:, 0] + 0.1 * rng.normal(size=30)
    lines = ["a,b,y"] + [f"{r[0]:.5f},{r[1]:.5f},{t:.5f}" for r, t in zip(X, y)]
    lines[17] = "1e308,0.5,1.0" if where == "feature" else "0.5,0.5,1e308"
    path = tmp_path / "big.csv"
    path.write_text("\n".join(lines) + "\n")
    res = CliRunner().invoke(cli, ["learn", str(path), "--out", str(tmp_path / "o"), "--quiet", "--family", "gaussian"])
    column = "a" if where == "feature" else "y"
    assert res.exit_code != 0 and f"line 18, column '{column}'" in res.output and "too large" in res.output
    assert not (tmp_path / "o" / "metrics.json").exists()
    _ok(["learn", str(path), "--out", str(tmp_path / "s"), "--quiet", "--family", "gaussian", "--skip-bad-rows"])
    metrics = json.loads((tmp_path / "s" / "metrics.json").read_text())
    assert metrics["rows_skipped"] == 1 and np.isfinite(metrics["final"]["rmse"])


def test_an_empty_target_cell_in_a_numeric_target_is_named(tmp_path):
    """One empty cell among 300 real targets: the task is still a regression, and the cell is
    named (it used to make the target look like 299 classes), or skipped with --skip-bad-rows."""
    rng = np.random.default_rng(6)
    X = rng.normal(size=(300, 2))
    y = 100 + 10 * X[:, 0] + rng.normal(size=300)
    lines = ["a,b,price"] + [f"{r[0]:.5f},{r[1]:.5f},{t:.3f}" for r, t in zip(X, y)]
    lines[41] = lines[41].rsplit(",", 1)[0] + ","
    path = tmp_path / "p.csv"
    path.write_text("\n".join(lines) + "\n")
    res = CliRunner().invoke(cli, ["learn", str(path), "--out", str(tmp_path / "o"), "--quiet"])
    assert res.exit_code != 0 and "line 42, column 'price': empty target" in res.output
    _ok(["learn", str(path), "--out", str(tmp_path / "s"), "--quiet", "--skip-bad-rows"])
    metrics = json.loads((tmp_path / "s" / "metrics.json").read_text())
    assert metrics["family"] == "gaussian" and metrics["rows_skipped"] == 1


def test_compare_skips_the_offline_lines_it_cannot_have_and_says_why(tmp_path):
    """compare on a target of one class (learn takes it, as 0..1): the offline fits are skipped
    with a note in the command's words (scikit-learn's error ended the command after every
    online run), and the online learners are tabled."""
    rng = np.random.default_rng(0)
    data = _csv(tmp_path / "one.csv", rng.normal(size=(30, 2)), np.ones(30, int))
    res = _ok(["compare", data, "--out", str(tmp_path / "c"), "--no-kalnat-grid", "--lr-grid", "0.1"])
    for line in ("offline GLM, in-sample skipped: every row it learns from has the same class",
                 "offline GLM, 10-fold CV skipped: every row it learns from (a fold's other rows) has the same class"):
        assert line in res.output, res.output
    names = [r["name"] for r in _strict_json(tmp_path / "c" / "compare.json")["results"]]
    assert "kalnat" in names and not [n for n in names if n.startswith("offline")]


def _strict_json(path):
    """The file's JSON, read as a strict parser reads it (NaN and Infinity are not JSON)."""
    def refuse(name):
        raise AssertionError(f"{path}: {name} is not JSON")
    return json.loads(Path(path).read_text(), parse_constant=refuse)


def test_no_numpy_warnings_on_the_terminal(tmp_path):
    """compare with a learning rate that makes the baselines diverge: reported as diverged,
    and no RuntimeWarning reaches the output. A grid whose every rate diverged (SGD at 1 here)
    has no best of grid in the table (it was tabled with a NaN log-loss and an infinite RMSE),
    and compare.json is strict JSON: the diverged rate's score is null."""
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = _ok(["compare", "diabetes", "--out", str(tmp_path / "c"), "--no-kalnat-grid", "--lr-grid", "1"])
    assert "diverged" in res.output and "Warning" not in res.output
    assert not [w for w in caught if issubclass(w.category, RuntimeWarning)]
    assert "sgd grid (log-loss): lr=1 diverged" in res.output and "no best of the sgd grid: every setting diverged" in res.output
    report = _strict_json(tmp_path / "c" / "compare.json")
    assert report["grids"]["sgd"] == {"lr=1": None}
    names = [r["name"] for r in report["results"]]
    assert "sgd (optax), best of grid" not in names and "adam (optax), best of grid" in names
    assert all(np.isfinite(r["log_loss"]) for r in report["results"])


def test_a_stream_too_short_to_score_says_so_and_its_report_is_strict_json(tmp_path):
    """A gaussian target's first two rows are not scored (nor, for the second RMSE, its first
    ten): on two rows the command says "not scored" where it printed nan, and metrics.json has
    null where it had NaN (which strict JSON parsers refuse); compare tables "not scored", and
    neither calls it a divergence."""
    data = tmp_path / "two.csv"
    data.write_text("a,b,y\n0.1,0.2,1.5\n0.3,0.1,2.5\n")
    # (the figures of a curve with no point drawn too)
    res = _ok(["learn", str(data), "--out", str(tmp_path / "o"), "--prior-var", "1"], figures=True)
    assert ("progressive log-loss (from row 3) not scored  RMSE 1.275 over all rows, not scored after row 10"
            in res.output), res.output
    final = _strict_json(tmp_path / "o" / "metrics.json")["final"]
    assert final["log_loss"] is None and final["rmse"] is None and final["rmse_after_row_10"] is None
    assert final["rows_scored"] == 0 and final["rmse_all_rows"] == pytest.approx(1.2747548783981961, rel=1e-6)
    # compare: no row scored is not a divergence (it said every learning rate diverged)
    res = _ok(["compare", str(data), "--out", str(tmp_path / "c"), "--no-kalnat-grid", "--lr-grid", "0.1"])
    assert "no best of the sgd grid: no row scored" in res.output and "lr=0.1 not scored" in res.output, res.output
    assert "diverged" not in res.output and "nan" not in res.output
    report = _strict_json(tmp_path / "c" / "compare.json")
    assert all(r["log_loss"] is None for r in report["results"]) and report["grids"]["sgd"] == {"lr=0.1": None}


# ---- --predictions and the named RMSEs (issue 15) ---------------------------------------------

def _pred_rows(path):
    with open(path) as f:
        return list(csv.reader(f))


def test_learn_predictions_csv_for_a_regression(tmp_path):
    """`--predictions`: one row per data row, 1-based, with the mean and sd the scores came
    from; metrics.json names its RMSEs over all rows and after row 10, and they are those of
    the written means."""
    rng = np.random.default_rng(4)
    X = rng.normal(size=(60, 2))
    y = 3.0 + X[:, 0] - 2 * X[:, 1] + 0.3 * rng.normal(size=60)
    data = _csv(tmp_path / "g.csv", X, [f"{v:.6f}" for v in y])
    out, pred = tmp_path / "rep", tmp_path / "pred.csv"
    res = _ok(["learn", data, "--out", str(out), "--predictions", str(pred)])
    rows = _pred_rows(pred)
    assert rows[0] == ["row", "mean", "sd"] and len(rows) == 61
    table = np.array(rows[1:], float)
    assert np.array_equal(table[:, 0], np.arange(1, 61)) and np.all(table[:, 2] > 0)
    yy = np.array([float(f"{v:.6f}") for v in y])
    final = json.loads((out / "metrics.json").read_text())["final"]
    rmse_all = np.sqrt(np.mean((yy - table[:, 1]) ** 2))
    rmse_10 = np.sqrt(np.mean((yy[10:] - table[10:, 1]) ** 2))
    assert final["rmse_all_rows"] == pytest.approx(rmse_all, rel=1e-8)
    assert final["rmse_after_row_10"] == pytest.approx(rmse_10, rel=1e-8)
    assert final["rmse"] == pytest.approx(np.sqrt(np.mean((yy[2:] - table[2:, 1]) ** 2)), rel=1e-8)
    # the scored log-loss (from row 3) is the Gaussian one of the written mean and sd
    nll = 0.5 * np.log(2 * np.pi * table[2:, 2] ** 2) + 0.5 * ((yy[2:] - table[2:, 1]) / table[2:, 2]) ** 2
    assert final["log_loss"] == pytest.approx(nll.mean(), rel=1e-8)
    assert f"RMSE {rmse_all:.4g} over all rows, {rmse_10:.4g} after row 10" in res.output


def test_learn_predictions_csv_for_a_classifier_with_a_skipped_row(tmp_path):
    """Classifiers: one p_<class> column per class, named as the data name them; a skipped row
    keeps its place in stream order with NaN."""
    rng = np.random.default_rng(6)
    X = rng.normal(size=(40, 2))
    labels = np.where(X[:, 0] > 0, "yes", "no")
    lines = ["a,b,target"] + [f"{r[0]:.5f},{r[1]:.5f},{t}" for r, t in zip(X, labels)]
    lines[8] = "oops,0.5,yes"  # data row 8
    path = tmp_path / "c.csv"
    path.write_text("\n".join(lines) + "\n")
    pred = tmp_path / "p.csv"
    _ok(["learn", str(path), "--out", str(tmp_path / "o"), "--quiet", "--skip-bad-rows",
         "--classes", "no,yes", "--predictions", str(pred)])
    rows = _pred_rows(pred)
    assert rows[0] == ["row", "p_no", "p_yes"] and len(rows) == 41
    table = np.array(rows[1:], float)
    assert np.array_equal(table[:, 0], np.arange(1, 41))
    assert np.all(np.isnan(table[7, 1:]))
    good = np.delete(table, 7, axis=0)
    assert np.allclose(good[:, 1:].sum(axis=1), 1.0) and np.all(np.isfinite(good))
    m = json.loads((tmp_path / "o" / "metrics.json").read_text())
    y = np.delete((labels == "yes").astype(int), 7)
    ll = -np.log(good[np.arange(39), 1 + y])
    assert m["final"]["log_loss"] == pytest.approx(ll.mean(), rel=1e-6)


def test_a_scheduler_that_cannot_be_reached_is_named_without_a_traceback(tmp_path):
    """--scheduler with no scheduler there (a refused port, after Dask's connect timeout, set to
    0.2 s here) or not an address: a usage error naming the option and why (it was a 72-line
    traceback), and nothing written."""
    dask = pytest.importorskip("dask")
    pytest.importorskip("distributed")
    data = tmp_path / "k.csv"
    data.write_text("user,a,y\nu,1,0\nv,2,1\n")
    with dask.config.set({"distributed.comm.timeouts.connect": "200ms"}):
        for address, said in (("tcp://127.0.0.1:1", "cannot connect to tcp://127.0.0.1:1 (Timed out trying to connect"),
                              ("bogus", "cannot connect to bogus (missing port number in address 'bogus')")):
            out = _usage_error(["learn", str(data), "--out", str(tmp_path / "o"), "--quiet", "--key", "user",
                                "--scheduler", address])
            assert "Invalid value for --scheduler: " + said in out, out
    assert not (tmp_path / "o").exists()


def test_a_report_written_over_another_leaves_none_of_the_others_files(tmp_path):
    """A report folder written again holds the new report's files only: a single filter's
    model and confusion figure go when a keyed run writes there, the keyed model and per-key
    scores when a single filter's run does (they were left beside it, passing for this run's).
    What the folder holds besides (a file of the user's, a name the old metrics.json lists
    outside the folder) stays."""
    rng = np.random.default_rng(3)
    X = rng.normal(size=(40, 2))
    keyed, plain = tmp_path / "k.csv", tmp_path / "p.csv"
    keyed.write_text("user,a,b,y\n" + "".join(f"u{i % 3},{a:.4f},{b:.4f},{int(a > 0)}\n" for i, (a, b) in enumerate(X)))
    plain.write_text("a,b,y\n" + "".join(f"{a:.4f},{b:.4f},{int(a > 0)}\n" for a, b in X))
    rep, single = tmp_path / "rep", ["--quiet", "--prior-var", "1"]
    _ok(["learn", str(keyed), "--out", str(rep), "--key", "user"] + single, figures=True)
    assert {"keyed_model.npz", "per_key.csv"} <= {p.name for p in rep.iterdir()}
    (rep / "notes.txt").write_text("mine")
    (tmp_path / "outside.txt").write_text("mine too")
    metrics = json.loads((rep / "metrics.json").read_text())
    metrics["files"]["plots"].append("../outside.txt")
    (rep / "metrics.json").write_text(json.dumps(metrics))
    _ok(["learn", str(plain), "--out", str(rep)] + single, figures=True)
    files = json.loads((rep / "metrics.json").read_text())["files"]
    assert {p.name for p in rep.iterdir()} == {"metrics.json", "notes.txt", files["model"], *files["plots"]}
    assert "confusion.png" in files["plots"] and (tmp_path / "outside.txt").exists()
    _ok(["learn", str(keyed), "--out", str(rep), "--key", "user"] + single, figures=True)
    assert not (rep / "model.npz").exists() and not (rep / "confusion.png").exists()
    assert (rep / "notes.txt").read_text() == "mine"


def test_a_prediction_that_is_not_a_number_is_a_located_error(tmp_path, logistic_csv):
    """predict with a model whose state is not finite (a damaged file, edited here): an error at
    the first line, exit 1, and no output file, where every row was written as nan with exit 0;
    with --skip-bad-rows, such rows are left out and counted."""
    keyed = tmp_path / "k.csv"
    keyed.write_text("user,a,y\n" + "".join(f"u{i % 2},{i / 10},{i % 3 == 0:d}\n" for i in range(12)))
    for data, flags, model in ((logistic_csv, [], "model.npz"), (str(keyed), ["--key", "user"], "keyed_model.npz")):
        rep = tmp_path / model
        _ok(["learn", data, "--out", str(rep), "--quiet", "--prior-var", "1"] + flags)
        with np.load(rep / model) as z:
            arrays = {k: (np.full_like(z[k], np.nan) if k.startswith("leaf_") and z[k].dtype.kind == "f" else z[k])
                      for k in z.files}
        np.savez(rep / model, **arrays)
        written = tmp_path / f"{model}.csv"
        out = _user_error(["predict", "--model-dir", str(rep), data, "--out", str(written)])
        assert out.startswith(f"Error: {data}, line 2: the model's prediction is not a finite number"), out
        assert not written.exists()
        # --skip-bad-rows leaves such rows out, and counts them
        res = _ok(["predict", "--model-dir", str(rep), data, "--out", str(written), "--skip-bad-rows"])
        rows = len(open(data).readlines()) - 1
        assert f"0 predictions written to {written} ({rows} rows skipped)" in res.output, res.output
        assert len(written.read_text().splitlines()) == 1   # the header


def _edit_header(path, edit):
    """Rewrites a checkpoint's JSON header with ``edit(header)`` (a damaged or older file)."""
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files}
    header = json.loads(bytes(arrays["__header__"]).decode())
    edit(header)
    arrays["__header__"] = np.frombuffer(json.dumps(header).encode(), np.uint8)
    np.savez(path, **arrays)


def test_a_models_header_is_read_as_predict_needs_it(tmp_path, logistic_csv):
    """A model whose classes do not fit its family is named as damaged, a single one and a
    keyed one (an IndexError came after the CSV's header was written); a model whose first
    feature name kept an Excel byte-order mark (learned before the CSV reader dropped it)
    finds that column in the same file without one."""
    keyed = tmp_path / "k.csv"
    keyed.write_text("user,a,y\n" + "".join(f"u{i % 2},{i / 10},{i % 3 == 0:d}\n" for i in range(12)))
    for data, flags, model in ((logistic_csv, [], "model.npz"), (str(keyed), ["--key", "user"], "keyed_model.npz")):
        rep = tmp_path / model
        _ok(["learn", data, "--out", str(rep), "--quiet", "--prior-var", "1"] + flags)
        before = _ok(["predict", "--model-dir", str(rep), data]).output
        _edit_header(rep / model, lambda h: h["extra"].update(feature_names=["\ufeff" + h["extra"]["feature_names"][0]]
                                                                 + h["extra"]["feature_names"][1:]))
        assert _ok(["predict", "--model-dir", str(rep), data]).output == before
        _edit_header(rep / model, lambda h: h["extra"].update(classes=h["extra"]["classes"][:1]))
        out = _user_error(["predict", "--model-dir", str(rep), data])
        assert f"{model}: damaged: its classes (['0']) do not fit a bernoulli model" in out, out


def test_an_output_file_that_is_the_data_or_a_report_file_is_refused(tmp_path, logistic_csv):
    """learn --predictions and predict --out refuse, before any row is read, a path that is the
    data file (the data would be replaced by its predictions) or one of the report folder's own
    files (metrics.json, the model, a figure); both files stay as they were. Predictions into a
    report folder that does not exist yet are written there (the folder made first), and a run
    that fails leaves no folder behind."""
    data = tmp_path / "d.csv"
    data.write_text(open(logistic_csv).read())
    before = data.read_text()
    rep = tmp_path / "rep"
    (tmp_path / "link.csv").symlink_to(data)
    for path, said in ((data, "d.csv is the data file: the data would be replaced"),
                       (tmp_path / "link.csv", "link.csv is the data file"),     # the same file by a link
                       (rep / "metrics.json", "rep/metrics.json is the report folder's metrics.json"),
                       (f"{tmp_path}/elsewhere/../rep/curve.png", "is the report folder's curve.png")):
        out = _usage_error(["learn", str(data), "--out", str(rep), "--quiet", "--predictions", str(path)])
        assert "Invalid value for --predictions" in out and said in out, out
        assert not rep.exists()
    _ok(["learn", str(data), "--out", str(rep), "--quiet", "--prior-var", "1", "--predictions", str(rep / "p.csv")])
    assert len(_pred_rows(rep / "p.csv")) == 121 and (rep / "metrics.json").exists()
    model = (rep / "model.npz").read_bytes()
    for path, said in ((data, "d.csv is the data file"), (rep / "model.npz", "rep/model.npz is the report folder's model.npz"),
                       (rep / "shards" / "model.json", "is the report folder's shards/model.json")):
        out = _usage_error(["predict", "--model-dir", str(rep), str(data), "--out", str(path)])
        assert "Invalid value for --out" in out and said in out, out
    assert data.read_text() == before and (rep / "model.npz").read_bytes() == model
    bad = tmp_path / "bad.csv"
    bad.write_text("a,b,y\n1,2,0\n1,x,1\n")
    _user_error(["learn", str(bad), "--out", str(tmp_path / "failed" / "a" / "b"), "--quiet", "--predictions",
                 str(tmp_path / "failed" / "a" / "b" / "p.csv")])
    assert not (tmp_path / "failed").exists()   # nor the folders above it that the run made


def test_learn_predictions_csv_for_counts(tmp_path):
    rng = np.random.default_rng(7)
    X = rng.normal(size=(50, 2))
    y = rng.poisson(np.exp(0.5 + 0.5 * X[:, 0]))
    pred = tmp_path / "p.csv"
    _ok(["learn", _csv(tmp_path / "n.csv", X, y), "--family", "poisson", "--out", str(tmp_path / "o"),
         "--quiet", "--predictions", str(pred)])
    rows = _pred_rows(pred)
    assert rows[0] == ["row", "mean", "sd"] and len(rows) == 51
    table = np.array(rows[1:], float)
    assert np.all(table[:, 2] >= np.sqrt(table[:, 1]))  # Poisson noise plus the parameters' part
    final = json.loads((tmp_path / "o" / "metrics.json").read_text())["final"]
    assert final["rmse_all_rows"] == pytest.approx(np.sqrt(np.mean((y - table[:, 1]) ** 2)), rel=1e-8)


def test_predict_from_the_saved_model_is_the_next_progressive_prediction(tmp_path):
    """A gaussian target (frozen target coordinates): `kalnat predict` with the model learned on
    rows 1–59 gives row 60 the mean and sd that `--predictions` gives it when learning 1–60."""
    rng = np.random.default_rng(8)
    X = rng.normal(size=(60, 2)) * [1.0, 5.0] + [0.0, 20.0]
    y = 100.0 + 10.0 * X[:, 0] - X[:, 1] + rng.normal(size=60)
    ys = [f"{v:.6f}" for v in y]
    _ok(["learn", _csv(tmp_path / "a.csv", X[:59], ys[:59]), "--out", str(tmp_path / "m"), "--quiet"])
    pred = tmp_path / "p.csv"
    _ok(["learn", _csv(tmp_path / "b.csv", X, ys), "--out", str(tmp_path / "n"), "--quiet",
         "--predictions", str(pred)])
    last = np.array(_pred_rows(pred)[-1], float)
    out = list(csv.DictReader(io.StringIO(_ok(["predict", "--model-dir", str(tmp_path / "m"),
                                                _csv(tmp_path / "c.csv", X[59:], ys[59:])]).output)))
    assert float(out[0]["mean"]) == pytest.approx(last[1], rel=1e-5)
    assert float(out[0]["std"]) == pytest.approx(last[2], rel=1e-5)


def test_a_poisson_banks_log_loss_is_its_mixtures_evidence():
    """The command scores a bank of Poisson members by its mixture's probability of each count:
    its progressive log-loss is the bank's own evidence, ``−log_marginal / n`` (1.57 here). The
    Poisson at the mixture's mean, which members at prior variance 10 move to rates of 10³ on
    this stream of counts of a few, scores 15.9 (before the Poisson step's bound, with rates of
    10²², 1.6·10²⁰)."""
    from kalnat import baselines, cli_report, cli_runner

    rng = np.random.default_rng(1)
    X = rng.normal(size=(120, 3))
    y = rng.poisson(np.exp(0.5 * X[:, 0] + 0.3)).astype(float)
    cfg = dict(model_spec="linear", method="ekf", prior_var=None, forgetting=None, batch_size=1, clip=5.0,
               seed=0, scaling=None, covariance=None, dtype="float64")
    runner = cli_runner.OnlineRunner(cfg, "poisson", None, 3)
    scores = cli_report.Accumulator(runner.family, 1, runner.bank.size)
    pred = runner.step(X, y)
    scores.add(y, pred, runner.weights)
    log_loss = scores.final()["log_loss"]
    np.testing.assert_allclose(log_loss, -float(runner.state.log_marginal) / len(y), rtol=1e-12)
    assert abs(log_loss - 1.57) < 0.01
    at_mean = baselines.row_losses("poisson", y, pred._replace(log_loss=None))["log_loss"].mean()
    # what docs/cli.md says of this stream: the mixture's mean reaches 10³, and a Poisson there
    # would score 15.9
    assert 1e3 < pred.mean.max() < 1e4 and 15 < at_mean < 17


@pytest.mark.parametrize("family", [[], ["--family", "categorical"]], ids=["inferred", "categorical"])
def test_a_first_chunk_of_one_class_asks_for_every_label(tmp_path, family):
    """A stream sorted by its label: the first chunk holds one class. The message asks for
    --classes (the bernoulli one used to say "use --family categorical", whose own message then
    asked for --classes)."""
    path = tmp_path / "sorted.csv"
    path.write_text("a,label\n" + "".join(f"{i},{'no' if i < 10 else 'yes'}\n" for i in range(20)))
    res = CliRunner().invoke(cli, ["learn", str(path), "--out", str(tmp_path / "o"), "--quiet", "--chunk-rows", "5",
                                   *family])
    assert res.exit_code != 0 and "only one class" in res.output and "--classes" in res.output, res.output
    assert "--family categorical" not in res.output
    # --classes itself naming one class says so, for either family (categorical's was a raw
    # "num_classes must be at least 2")
    res = CliRunner().invoke(cli, ["learn", str(path), "--out", str(tmp_path / "o"), "--quiet", "--classes", "no",
                                   *family])
    assert res.exit_code != 0 and "--classes names one class (no)" in res.output, res.output


def test_the_names_kalnat_cli_learn_held_before_its_split_still_import():
    from kalnat import cli_predict, cli_setup

    with pytest.warns(DeprecationWarning, match="kalnat.cli_setup.build_learner"):
        from kalnat.cli_learn import build_learner
    with pytest.warns(DeprecationWarning, match="kalnat.cli_predict.LoadedModel"):
        from kalnat.cli_learn import LoadedModel
    assert build_learner is cli_setup.build_learner and LoadedModel is cli_predict.LoadedModel
    from kalnat import cli_report, cli_runner
    from kalnat.cli_learn import OnlineRunner, PredictionWriter  # (imported there: no warning)
    assert OnlineRunner is cli_runner.OnlineRunner and PredictionWriter is cli_report.PredictionWriter
