"""Start-up: the command imports JAX only for the commands that compute, and keeps compiled
programs in a persistent cache (relocatable, safe to delete, off by an environment variable)."""

import dataclasses
import io
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
from click.testing import CliRunner

from kalnat import cli_choices, cli_setup, datasets

PROBE = """
import sys
from kalnat.cli import main
try:
    main({argv!r})
except SystemExit:
    pass
print("JAX_IMPORTED" if "jax" in sys.modules else "NO_JAX", file=sys.stderr)
"""


def _env(**more):
    # without the suite's shared JAX cache (tests/conftest.py): the command's own is under test
    env = {k: v for k, v in os.environ.items() if not k.startswith("KALNAT_") and k != "JAX_COMPILATION_CACHE_DIR"}
    env.update(JAX_PLATFORMS="cpu", **more)
    return env


@pytest.mark.parametrize("argv", [["--help"], ["learn", "--help"], ["datasets"], ["learn", "no_such_file.csv"],
                                  ["learn", "--model", "mlp:x"]], ids=" ".join)
def test_help_listing_and_argument_errors_do_not_import_jax(argv):
    out = subprocess.run([sys.executable, "-c", PROBE.format(argv=argv)], capture_output=True, text=True,
                         env=_env(), timeout=60)
    assert out.stderr.strip().splitlines()[-1] == "NO_JAX", out.stderr


QUICK_EXIT = """
import atexit, sys, threading, time
import jax  # the quick exit is for a process that imported JAX
class Teardown:
    def __del__(self):
        print("torn down", flush=True)
kept = Teardown()  # its __del__ runs in Python's teardown of __main__
atexit.register(print, "exit handler ran")
if sys.argv[1] == "thread":  # a thread the command left running
    threading.Thread(target=lambda: (time.sleep(0.5), print("thread finished"))).start()
print("unflushed", end="")  # stdout is a pipe here: block-buffered
from kalnat.cli import run
run(sys.argv[2:])
"""


def test_the_commands_modules_and_a_fit_without_a_bar_do_not_import_asyncio():
    """tqdm.auto imports asyncio (40 ms of a warm `kalnat learn`): the command's modules take
    the terminal's tqdm, and ``kalnat.fit`` imports tqdm.auto only for a bar it shows."""
    probe = ("import sys, numpy as np, kalnat, kalnat.cli_learn, kalnat.cli_predict, kalnat.cli_keyed\n"
             "m = kalnat.models.linear(2)\n"
             "learner = kalnat.ekf(m, kalnat.families.Bernoulli())\n"
             "kalnat.fit(learner, learner.init(m.init(None)), np.zeros((3, 2)), np.zeros(3))\n"
             "print('ASYNCIO' if 'asyncio' in sys.modules else 'NO_ASYNCIO', file=sys.stderr)\n")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=_env(), timeout=120)
    assert out.stderr.strip().splitlines()[-1] == "NO_ASYNCIO", out.stderr


@pytest.mark.parametrize("thread", ["thread", "none"])
@pytest.mark.parametrize("argv", [["datasets"], ["learn", "no_such_file.csv"]], ids=" ".join)
def test_the_executable_exits_with_the_commands_status_after_its_exit_handlers_and_flushed_outputs(argv, thread):
    env = _env()
    env.pop("PYTHONUNBUFFERED", None)  # buffered outputs, as a user's are
    out = subprocess.run([sys.executable, "-c", QUICK_EXIT, thread, *argv], capture_output=True, text=True,
                         env=env, timeout=60)
    assert out.returncode == (0 if argv == ["datasets"] else 1), out.stderr
    assert out.stdout.startswith("unflushed") and "exit handler ran" in out.stdout, out.stdout
    if argv == ["datasets"]:
        assert "breast_cancer" in out.stdout
    else:
        assert "no such file" in out.stderr
    # Python's teardown is skipped, unless a thread still runs: the thread then finishes
    assert ("thread finished" in out.stdout) == ("torn down" in out.stdout) == (thread == "thread"), out.stdout


def test_the_executable_exits_with_the_commands_status_when_standard_output_was_closed():
    # Python starts with sys.stdout None when its descriptor 1 is closed
    code = "import jax; from kalnat.cli import run; run(['datasets'])"
    out = subprocess.run(["sh", "-c", 'exec "$@" >&-', "sh", sys.executable, "-c", code],  # (no fork here: JAX's threads)
                         stderr=subprocess.PIPE, text=True, env=_env(), timeout=60)
    assert out.returncode == 0, out.stderr


def test_method_names_for_help_are_the_methods():
    assert tuple(cli_setup.METHODS) == cli_choices.METHOD_NAMES


def _csv(path):
    rng = np.random.default_rng(0)
    X = rng.normal(size=(60, 3))
    y = (X[:, 0] + 0.5 * rng.normal(size=60) > 0).astype(int)
    with open(path, "w") as f:
        f.write("a,b,c,y\n")
        for row, t in zip(X, y):
            f.write(",".join(f"{v:.6f}" for v in row) + f",{t}\n")
    return str(path)


def _learn(data, out, env):
    cmd = [sys.executable, "-m", "kalnat.cli", "learn", data, "--prior-var", "1", "--quiet", "--out", str(out)]
    run = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr
    with open(os.path.join(out, "metrics.json")) as f:
        return json.load(f)["final"]


def test_the_compilation_cache_is_written_reused_relocatable_and_can_be_turned_off(tmp_path):
    data = _csv(tmp_path / "d.csv")
    cache = tmp_path / "cache"
    first = _learn(data, tmp_path / "r1", _env(KALNAT_CACHE_DIR=str(cache)))
    entries = sorted(os.listdir(cache))
    assert entries  # compiled programs were written there
    programs = sorted(os.listdir(cache / "programs"))
    assert len(programs) == 1  # the traced chunk program, kept for the next run (kalnat.saved)
    # the folder was last added up (kalnat.cache) two days ago: this run adds it up again, and
    # under the limit removes nothing
    stamp, old = cache / ".pruned", time.time() - 2 * 86400
    os.utime(stamp, (old, old))
    os.utime(cache / "programs" / programs[0], (old, old))
    again = _learn(data, tmp_path / "r2", _env(KALNAT_CACHE_DIR=str(cache)))
    assert again == first and sorted(os.listdir(cache)) == entries  # reused: nothing new to compile
    assert sorted(os.listdir(cache / "programs")) == programs
    assert stamp.stat().st_mtime > old + 86400
    assert (cache / "programs" / programs[0]).stat().st_mtime > old + 86400  # read: marked as used
    bad = subprocess.run([sys.executable, "-m", "kalnat.cli", "learn", data, "--quiet", "--out", str(tmp_path / "r4")],
                         capture_output=True, text=True, env=_env(KALNAT_CACHE_DIR=str(cache), KALNAT_CACHE_MAX_MB="lots"),
                         timeout=300)
    assert bad.returncode == 1 and "Error: KALNAT_CACHE_MAX_MB='lots': the compilation cache's limit" in bad.stderr
    assert "Traceback" not in bad.stderr and not (tmp_path / "r4").exists()
    off = tmp_path / "off"
    assert _learn(data, tmp_path / "r3", _env(KALNAT_CACHE_DIR=str(off), KALNAT_NO_CACHE="1")) == first
    assert not off.exists()


def _model_of_its_own(n_features):
    """``kalnat.models.linear(n_features)`` with an ``apply`` no other test's model equals: a
    test that counts a learner's programs, or their release, then counts its own (equal models
    share their programs, and other modules keep learners on them alive)."""
    import kalnat

    linear = kalnat.models.linear(n_features)
    return linear._replace(apply=lambda p, x: linear.apply(p, x))


def test_fixed_chunk_compiles_one_program_and_learns_the_same():
    import jax
    import kalnat
    from kalnat.stream import chunk_fn

    model = _model_of_its_own(3)
    learner = kalnat.ekf(model, kalnat.families.Bernoulli(), forgetting=0.99)
    rng = np.random.default_rng(1)
    X = rng.normal(size=(50, 3))
    y = (X[:, 0] > 0).astype(int)
    plain = kalnat.fit(learner, learner.init(model.init(None)), X, y, chunk_size=16)
    state, preds = learner.init(model.init(None)), []
    for a, b in [(0, 2), (2, 4), (4, 8), (8, 16), (16, 50)]:  # blocks of the command's lengths
        res = kalnat.fit(learner, state, X[a:b], y[a:b], chunk_size=16, fixed_chunk=True)
        state = res.state
        preds.append(res.predictions.probs)
    assert chunk_fn(learner, True)._cache_size() == 1  # one shape for every block length
    np.testing.assert_array_equal(np.concatenate(preds), plain.predictions.probs)
    for a_leaf, b_leaf in zip(jax.tree_util.tree_leaves(state), jax.tree_util.tree_leaves(plain.state)):
        np.testing.assert_array_equal(a_leaf, b_leaf)


def test_the_command_compiles_a_short_stream_quickly_and_says_so(monkeypatch, tmp_path):
    """The command compiles a stream of known length quickly (kalnat.programs.QUICK_COMPILE)
    when its rows × members × (d² + 40) is small (cli_runner.QUICK_WORK), or as
    KALNAT_QUICK_COMPILE says, and metrics.json says which: the rows are a bundled set's, or a
    regular file's lines past its header (whatever its line ends, or as standard input), never a
    pipe's or an in-memory stream's."""
    from kalnat import cli, cli_learn, cli_runner, programs

    monkeypatch.delenv("KALNAT_QUICK_COMPILE", raising=False)
    quick = cli_runner.quick_job
    assert quick(569, 40, 31) and not quick(1797, 40, 585) and not quick(None, 1, 3)
    monkeypatch.setenv("KALNAT_QUICK_COMPILE", "0")
    assert not quick(569, 40, 31)
    monkeypatch.setenv("KALNAT_QUICK_COMPILE", "1")
    assert quick(None, 1, 3) and quick(1797, 40, 585)
    monkeypatch.setenv("KALNAT_QUICK_COMPILE", "fast")
    with pytest.raises(ValueError, match="KALNAT_QUICK_COMPILE='fast': expected 0 .XLA's defaults., 1"):
        quick(569, 40, 31)
    # the command checks it as it starts, before it reads a row
    monkeypatch.setattr(cli_learn, "learn_stream", lambda *a, **k: pytest.fail("rows read"))
    bad = CliRunner().invoke(cli.cli, ["learn", "-", "--quiet", "--out", str(tmp_path / "r")], input="a,y\n1,0\n")
    assert bad.exit_code == 1 and "Error: KALNAT_QUICK_COMPILE='fast': expected 0" in bad.output
    assert not (tmp_path / "r").exists()
    monkeypatch.undo()
    monkeypatch.delenv("KALNAT_QUICK_COMPILE", raising=False)
    ctx = cli.learn.make_context("learn", ["data.csv"])
    kw = dict(ctx.params)
    kw.pop("data")
    cfg = dict(cli._config(kw), method="ekf", prior_var=1.0, forgetting=0.99)
    for rows, marked in [(569, True), (None, False), (10**7, False)]:  # d = 4: 10⁷ × 56
        runner = cli_runner.OnlineRunner(cfg, "bernoulli", ["0", "1"], 3, rows=rows)
        assert (programs.compiler_options(runner.learner) is not None) == marked, rows
    assert datasets.open_source("breast_cancer").rows_at_most == 569
    data = _csv(tmp_path / "d.csv")
    text = open(data).read()
    n = len(text.splitlines()) - 1
    for end in ("\r", "\r\n"):  # the csv module's other line ends, counted as it counts them
        other = tmp_path / f"d{len(end)}.csv"
        other.write_bytes(text.replace("\n", end).encode())
        assert datasets.open_source(str(other)).rows_at_most == n
    with open(data) as f:  # standard input redirected from a file: counted, and read in full
        as_stdin = datasets.open_source("-", stdin=f)
        assert as_stdin.rows_at_most == n and sum(len(c.y) for c in as_stdin.chunks) == n
    for source, marked in [(datasets.open_source(data), True), (datasets.open_source("-", stdin=io.StringIO(text)), False)]:
        assert source.rows_at_most == (n if marked else None)
        result = cli_learn.learn_stream(source, cfg, progress=False)
        assert (programs.compiler_options(result.runner.learner) is not None) == marked
        assert result.metrics["quick_compile"] == marked and result.metrics["rows_seen"] == n
    # kalnat learn --key: the keyed programs of a short file compiled quickly, a pipe's not
    from kalnat import cli_keyed

    keyed_text = "\n".join(["k," + text.splitlines()[0]] + [f"u{i % 3}," + line for i, line in
                                                           enumerate(text.splitlines()[1:])]) + "\n"
    (tmp_path / "k.csv").write_text(keyed_text)
    for source, marked in [(datasets.open_source(str(tmp_path / "k.csv"), key="k"), True),
                           (datasets.open_source("-", stdin=io.StringIO(keyed_text), key="k"), False)]:
        runner, metrics, _ = cli_keyed.learn_keyed(source, dict(cfg, scaling="running"), progress=False)
        assert metrics["quick_compile"] == marked and metrics["rows_seen"] == n
        keys = runner.keyed.learner.__dict__["_programs"]
        assert programs.with_options(runner.learner, "segment")[0] in keys and runner.quick == marked, keys
        assert ("segment" in keys) != marked
        if marked:  # and its predictions
            cli_keyed.save_keyed(str(tmp_path / "keyed.npz"), runner, source)
            model = cli_keyed.LoadedKeyedModel.load(str(tmp_path / "keyed.npz"))
            model.predict_csv(datasets.open_source(str(tmp_path / "k.csv"), key="k", require_target=False,
                                                   feature_names=model.feature_names), io.StringIO())
            keys = model.learner.__dict__["_programs"]
            assert model.quick and programs.with_options(model.learner, "predict")[0] in keys, keys
    # on Dask's workers (their own learners), never: the driver's learner is left unmarked and
    # the report says so, also where KALNAT_QUICK_COMPILE=1 would mark every job
    import kalnat.dask_keyed

    monkeypatch.setattr(kalnat.dask_keyed, "DaskKeyed", lambda client, factory, batch_size: None)
    monkeypatch.setenv("KALNAT_QUICK_COMPILE", "1")
    on_dask = cli_keyed.KeyedRunner(dict(cfg, scaling="running"), "bernoulli", ["0", "1"], 3, client=object(),
                                    rows=n)
    assert not on_dask.quick and programs.compiler_options(on_dask.learner) is None
    monkeypatch.delenv("KALNAT_QUICK_COMPILE")
    # kalnat predict: a short file's rows predicted by a quickly compiled program, a pipe's not
    assert CliRunner().invoke(cli.cli, ["learn", data, "--method", "ekf", "--quiet", "--out",
                                        str(tmp_path / "m")]).exit_code == 0
    seen = []
    monkeypatch.setattr(cli_runner, "compile_quickly", lambda learner, quick: seen.append((learner, quick)) or
                        programs.compile_quickly(learner, quick))
    for given, quick in [([data], True), (["-"], False)]:
        del seen[:]
        done = CliRunner().invoke(cli.cli, ["predict", *given, "--model-dir", str(tmp_path / "m"),
                                            "--out", str(tmp_path / "p.csv")], input=text)
        assert done.exit_code == 0, done.output
        (learner, marked), = seen
        assert marked == quick and len(open(tmp_path / "p.csv").read().splitlines()) == n + 1
        keys = learner.__dict__["_programs"]
        assert (programs.with_options(learner, "predict one")[0] in keys) and (("predict one" in keys) != quick), keys
    if hasattr(os, "mkfifo"):  # a pipe: its rows are not read to count them
        fifo = tmp_path / "pipe"
        os.mkfifo(fifo)
        writer = subprocess.Popen([sys.executable, "-c", f"open({str(fifo)!r}, 'w').write({text!r})"])
        piped = datasets.open_source(str(fifo))
        assert piped.rows_at_most is None and sum(len(c.y) for c in piped.chunks) == n
        writer.wait(timeout=60)


QUICK_AND_DEFAULT = """
import json, jax, numpy as np, kalnat
from kalnat import programs
jax.config.update("jax_enable_x64", True)
model = kalnat.models.linear(3)
rng = np.random.default_rng(2)
X = rng.normal(size=(40, 3))
y = (X @ [1.0, -0.5, 0.2] + rng.normal(size=40) > 0).astype(int)
out = []
for mark in (True, False):
    learner = kalnat.ekf(model, kalnat.families.Bernoulli(), forgetting=0.99)
    if mark:
        programs.compile_quickly(learner)
    assert (programs.compiler_options(learner) is not None) == mark
    r = kalnat.fit(learner, learner.init(model.init(None)), X, y, chunk_size=16)
    out.append(np.concatenate([np.ravel(a) for a in jax.tree_util.tree_leaves((r.state, r.predictions))]))
print(json.dumps(float(np.max(np.abs(out[0] - out[1]) / np.maximum(np.abs(out[1]), 1e-300)))))
"""


def test_a_quickly_compiled_learner_takes_the_options_alone_and_learns_what_the_defaults_learn(monkeypatch, tmp_path):
    """A learner marked by kalnat.programs.compile_quickly has its chunk program compiled with
    QUICK_COMPILE, saved (kalnat.saved) or not, and an equal learner without the mark does not
    share that program (nor the reverse): with an option XLA does not know in its place, the
    marked learners' fits fail and the others' do not. With XLA's defaults otherwise (the
    suite's own XLA_FLAGS use the same emitters), the two learn the same to rounding. An XLA
    that does not take the options is given none."""
    import jax
    import kalnat
    from kalnat import programs, saved
    from kalnat.keyed import Keyed

    if jax.default_backend() != "cpu":
        pytest.skip("quick compilation is for XLA's CPU compiler")
    out = subprocess.run([sys.executable, "-c", QUICK_AND_DEFAULT], capture_output=True, text=True,
                         env=_env(XLA_FLAGS=""), timeout=300)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) <= 1e-12

    monkeypatch.setattr(programs, "QUICK_COMPILE", {"xla_no_such_option": 0})
    monkeypatch.setattr(programs, "_TAKEN", {"cpu": True})  # taken as if the probe had passed
    model = kalnat.models.linear(3)
    X, y = np.ones((8, 3)), np.ones(8, int)
    learners = []  # all alive: equal learners share programs (kalnat.programs.once)
    for mark, recipe in [(False, None), (True, None), (False, None), (True, "quick, saved")]:
        learner = kalnat.ekf(model, kalnat.families.Bernoulli(), forgetting=0.99)
        learners.append(learner)
        if mark:
            programs.compile_quickly(learner)
        if recipe:
            saved.describe(learner, recipe, str(tmp_path))
        if mark:
            with pytest.raises(Exception, match="No such compile option"):
                kalnat.fit(learner, learner.init(model.init(None)), X, y)
        else:
            kalnat.fit(learner, learner.init(model.init(None)), X, y)
    # its predictive (a learner that predicted before its mark too: the cached program is
    # asked for again) and its keyed programs take them as well, and a mark taken off is gone
    state = learners[0].init(model.init(None))
    learners[0].predict(state, X)
    for quick in (True, False):
        programs.compile_quickly(learners[0], quick)
        if quick:
            with pytest.raises(Exception, match="No such compile option"):
                learners[0].predict(state, X)
        else:
            learners[0].predict(state, X)
        keyed = Keyed(learners[0], model.init(None))
        if quick:
            with pytest.raises(Exception, match="No such compile option"):
                keyed.learn(["a"] * 8, X, y)
        else:
            keyed.learn(["a"] * 8, X, y)
    monkeypatch.setattr(programs, "_TAKEN", {})  # the probe itself finds the option unknown
    assert programs.compiler_options(learners[1]) is None


def test_a_learner_and_its_compiled_programs_are_freed_with_it():
    """A learner's programs close over it (kalnat.programs.once): kept in a global table they
    would keep every learner ever used alive."""
    import gc
    import weakref

    import kalnat

    model = kalnat.models.linear(3)
    X, y = np.zeros((8, 3)), np.zeros(8, int)
    alive = []
    for _ in range(3):
        learner = kalnat.auto(model, kalnat.families.Bernoulli())
        kalnat.fit(learner, learner.init(model.init(None)), X, y, chunk_size=8)
        alive.append(weakref.ref(learner))
        del learner
    gc.collect()
    assert [ref() for ref in alive] == [None] * 3


def test_equal_representations_share_one_initial_program_and_others_go_with_their_learner():
    """kalnat.filter.fresh: a representation of plain values is a static argument of one shared
    program; one holding a function (a schedule) would stay in JAX's cache with everything it
    holds, so its program is kept with its learner instead."""
    import gc
    import weakref

    import kalnat
    from kalnat import filter as _filter

    model = kalnat.models.linear(3)
    params = model.init(None)
    kalnat.ekf(model, kalnat.families.Gaussian(1.0), prior_var=1.0).init(params)
    shared = _filter._fresh_shared._cache_size()
    kalnat.ekf(model, kalnat.families.Gaussian(1.0), prior_var=2.0).init(params)  # an equal Full()
    assert _filter._fresh_shared._cache_size() == shared
    reps = []
    for k in range(2):
        learner = kalnat.natural_gradient(model, kalnat.families.Gaussian(1.0),
                                          learning_rate=lambda t, k=k: 0.1 / (1.0 + t + k))
        learner.init(params)
        reps.append(weakref.ref(learner.representation))
        del learner
    gc.collect()
    assert _filter._fresh_shared._cache_size() == shared
    assert [r() for r in reps] == [None, None]


def _chunk_program(learner, params, X, y):
    """The learner's fit program after a fit of ``X, y``, and the fit's result."""
    import kalnat

    res = kalnat.fit(learner, learner.init(params), X, y, chunk_size=16)
    return learner.__dict__["_programs"][("chunk", True)], res


def test_learners_that_differ_only_in_hyperparameters_share_programs_and_learn_as_if_alone(monkeypatch):
    """kalnat.programs.once: a learner built again with another prior, forgetting, process
    noise or variance bound runs the programs of a live equal learner (hyperparameters are an
    argument of every program), on the same model or on one built again by an equal call of
    kalnat.models.linear or mlp, and learns exactly what it learns with programs of its own."""
    import copy
    import dataclasses

    import jax
    import jax.numpy as jnp

    import kalnat
    from kalnat import families as F
    from kalnat.learners.base import Learner

    model = kalnat.models.linear(3)
    params = model.init(None)
    rng = np.random.default_rng(0)
    X, y = rng.normal(size=(40, 3)), rng.normal(size=40)
    a = kalnat.ekf(model, F.Gaussian(0.5), prior_var=1.0, forgetting=0.9)
    first, _ = _chunk_program(a, params, X, y)
    settings = [dict(prior_var=2.0, forgetting=0.99), dict(prior_var=np.full(4, 0.5), process_noise=1e-3),
                dict(forgetting=0.95, max_variance=2.0)]
    shared, updates = [], []
    for kw in settings:
        b = kalnat.ekf(model, F.Gaussian(0.5), **kw)
        program, res = _chunk_program(b, params, X, y)
        assert program is first
        learned = [np.array(a) for a in jax.tree_util.tree_leaves((res.state, res.predictions))]
        s, pred = b.update(res.state, X[0], y[0])  # the one-row program too (res.state donated)
        updates.append(b.__dict__["_programs"]["update one"])
        shared.append(learned + [np.array(a) for a in jax.tree_util.tree_leaves((s, pred))])
    assert all(u is updates[0] for u in updates)
    # the constructors' functions are equal for equal arguments (not a closure made anew)
    again = kalnat.ekf(kalnat.models.linear(3), F.Gaussian(0.5), prior_var=3.0)
    assert _chunk_program(again, params, X, y)[0] is first
    net = kalnat.models.mlp(3, (4,), 2)
    assert kalnat.ekf(kalnat.models.mlp(3, (4,), 2), F.Gaussian(0.5, dim=2)).program_key() \
        == kalnat.ekf(net, F.Gaussian(0.5, dim=2), forgetting=0.9).program_key() is not None
    assert kalnat.ekf(kalnat.models.mlp(3, (4,), 2, activation=jax.nn.softplus), F.Gaussian(0.5, dim=2)) \
        .program_key() != kalnat.ekf(net, F.Gaussian(0.5, dim=2)).program_key()
    assert copy.deepcopy(net) == net  # (a deep copy of jnp.tanh is another object)

    @dataclasses.dataclass
    class Scaled:  # an activation that cannot be hashed: its model still can, and equals itself only
        s: float

        def __call__(self, z):
            return jnp.tanh(self.s * z)

    odd = kalnat.models.mlp(3, (4,), 2, activation=Scaled(2.0))
    assert hash(odd) == hash(odd) and odd != kalnat.models.mlp(3, (4,), 2, activation=odd.apply.activation.fn)
    assert kalnat.ekf(odd, F.Gaussian(0.5, dim=2)).program_key() \
        == kalnat.ekf(odd, F.Gaussian(0.5, dim=2), prior_var=2.0).program_key() is not None
    monkeypatch.setattr(Learner, "program_key", lambda self: None)  # each learner its own programs
    for kw, leaves in zip(settings, shared):
        b = kalnat.ekf(model, F.Gaussian(0.5), **kw)
        program, alone = _chunk_program(b, params, X, y)
        assert program is not first
        learned = [np.array(a) for a in jax.tree_util.tree_leaves((alone.state, alone.predictions))]
        s, pred = b.update(alone.state, X[0], y[0])
        alone_leaves = learned + [np.array(a) for a in jax.tree_util.tree_leaves((s, pred))]
        assert len(leaves) == len(alone_leaves)
        for u, v in zip(leaves, alone_leaves):
            np.testing.assert_array_equal(u, v)


def test_learners_that_differ_in_what_a_program_holds_do_not_share_it():
    """Every field of a learner but its hyperparameters shapes its programs: learners that
    differ in one of them, or whose programs are saved by recipe, or whose representation
    holds a function, each run their own."""
    import kalnat
    from kalnat import families as F
    from kalnat import saved

    model = kalnat.models.linear(3)
    params = model.init(None)
    rng = np.random.default_rng(1)
    X, y = rng.normal(size=(16, 3)), (rng.uniform(size=16) < 0.5).astype(float)
    base = kalnat.ekf(model, F.Bernoulli(), prior_var=1.0)
    first, _ = _chunk_program(base, params, X, y)
    other_model = model._replace(apply=lambda p, x: p["w"] @ x + p["b"])  # the same layout, another apply function
    described = kalnat.ekf(model, F.Bernoulli(), prior_var=2.0)
    saved.describe(described, "a recipe", "/nonexistent-kalnat-programs")
    others = {
        "joseph": kalnat.ekf(model, F.Bernoulli(), joseph=True),
        "moderated": kalnat.ekf(model, F.Bernoulli(), moderated=True),
        "iterations": kalnat.iterated_ekf(model, F.Bernoulli(), iterations=2),
        "learner": kalnat.information_filter(model, F.Bernoulli()),
        "family": kalnat.ekf(model, F.Poisson()),
        "model": kalnat.ekf(other_model, F.Bernoulli()),
        "schedule": kalnat.ekf(model, F.Bernoulli(), forgetting=lambda t: 0.99),
        "representation holding a function": kalnat.natural_gradient(
            model, F.Bernoulli(), learning_rate=lambda t: 1.0 / (t + 2.0)),
        "described": described,
    }
    for name, learner in others.items():
        program, _ = _chunk_program(learner, params if name != "model" else other_model.init(None), X, y)
        assert program is not first, name
    assert base.program_key() == kalnat.ekf(model, F.Bernoulli(), prior_var=3.0, forgetting=0.5).program_key()
    assert described.program_key() is None and others["representation holding a function"].program_key() is None
    # linearisations per update (unrolled in the step) differ, all else equal
    two = kalnat.iterated_ekf(model, F.Bernoulli(), iterations=2)
    assert two.program_key() == kalnat.iterated_ekf(model, F.Bernoulli(), iterations=2, prior_var=3.0).program_key()
    assert two.program_key() != kalnat.iterated_ekf(model, F.Bernoulli(), iterations=3).program_key()
    # a subclass's own fields are in the key; every field of a learner is either in it or
    # named as not shaping a program (a new field needs that decision)
    from dataclasses import dataclass, fields

    from kalnat.learners.base import Learner

    @dataclass(frozen=True, eq=False)
    class Scaled(Learner):
        scale: float = 1.0

    given = {f.name: getattr(base, f.name) for f in fields(base) if f.name != "_shapes"}
    assert Scaled(**given, scale=1.0).program_key() != Scaled(**given, scale=5.0).program_key()
    assert Learner.NOT_IN_PROGRAMS == {"hyper", "config", "_shapes"}
    assert {f.name for f in fields(Learner)} == {"name", "apply", "family", "representation", "max_iterations",
                                                 "moderated", "schedule", "input_shape",
                                                 "apply_tapped"} | Learner.NOT_IN_PROGRAMS
    # the same model and Kronecker form, H given as its layers' factors or as a matrix
    kron = kalnat.representations.kronecker(params)
    untapped = kalnat.models.Model(model.init, model.apply, model.input_shape, model.n_outputs)
    tapped, plain = kalnat.ekf(model, F.Bernoulli(), representation=kron), kalnat.ekf(untapped, F.Bernoulli(), representation=kron)
    assert tapped.apply_tapped is not None and plain.apply_tapped is None
    assert tapped.program_key() != plain.program_key()


def test_equal_banks_share_programs_and_learn_as_if_alone(monkeypatch):
    """Bank.program_key: a bank built again (on an equal model, with other prior variances and
    forgetting factors) runs the programs of a live equal bank and learns exactly what it
    learns with programs of its own; a bank of another size, fixed share, prior weights, name,
    members' learner or counts of linearisations runs its own."""
    import dataclasses

    import jax

    import kalnat
    from kalnat import families as F
    from kalnat.bank import Bank, bank

    model = kalnat.models.linear(3)
    params = model.init(None)
    rng = np.random.default_rng(2)
    X, y = rng.normal(size=(40, 3)), (rng.uniform(size=40) < 0.5).astype(float)
    grid = dict(prior_vars=(0.1, 1.0), forgettings=(1.0, 0.99))
    a = kalnat.ekf_bank(model, F.Bernoulli(), **grid)
    first, _ = _chunk_program(a, params, X, y)
    again = kalnat.ekf_bank(kalnat.models.linear(3), F.Bernoulli(), prior_vars=(0.3, 3.0), forgettings=(0.95, 0.9))
    program, shared = _chunk_program(again, params, X, y)
    assert program is first
    iterated = kalnat.iterated_ekf(model, F.Bernoulli(), iterations=2)
    others = {
        "size": kalnat.ekf_bank(model, F.Bernoulli(), prior_vars=(0.1, 1.0, 10.0), forgettings=(1.0, 0.99)),
        "share": kalnat.ekf_bank(model, F.Bernoulli(), share=0.01, **grid),
        "prior": bank(a.learner, a.configs, share=a.share, name=a.name, prior=(1.0, 2.0, 3.0, 4.0)),
        "name": bank(a.learner, a.configs, share=a.share, name="another"),
        "learner": bank(kalnat.ekf(model, F.Bernoulli(), moderated=True), a.configs, share=a.share, name=a.name),
    }
    assert _chunk_program(others["share"], params, X, y)[0] is not first
    for name, other in others.items():  # (once shares a program exactly where the keys are equal)
        # each differs from a in that one part of its key
        assert sum(u != v for u, v in zip(other.program_key(), a.program_key())) == 1, name
    others["counts"] = bank(iterated, [dict(iterations=k) for k in (1, 2, 2, 1)])
    # the members in another order of counts: other groups, another program
    swapped = bank(iterated, [dict(iterations=k) for k in (2, 1, 1, 2)])
    assert sum(u != v for u, v in zip(swapped.program_key(), others["counts"].program_key())) == 1
    assert bank(iterated, [dict(iterations=k, prior_var=3.0) for k in (1, 2, 2, 1)]).program_key() \
        == others["counts"].program_key()
    # every field of a bank is in the key or an argument of its programs (a new one needs that decision)
    assert {f.name for f in dataclasses.fields(Bank)} == {"learner", "hyper", "configs", "share", "name", "log_prior"}
    monkeypatch.setattr(Bank, "program_key", lambda self: None)
    again = kalnat.ekf_bank(kalnat.models.linear(3), F.Bernoulli(), prior_vars=(0.3, 3.0), forgettings=(0.95, 0.9))
    program, alone = _chunk_program(again, params, X, y)
    assert program is not first
    for u, v in zip(jax.tree_util.tree_leaves((shared.state, shared.predictions)),
                    jax.tree_util.tree_leaves((alone.state, alone.predictions))):
        np.testing.assert_array_equal(np.asarray(u), np.asarray(v))


def test_threads_asking_for_a_program_at_once_get_one():
    """``programs.once`` is atomic: threads that ask for an owner's program at the same time get
    one object, made once (two would each be traced and compiled)."""
    import threading
    import time

    from kalnat import programs

    class Owner:
        pass

    owner, calls, got = Owner(), [], []

    def make():
        calls.append(1)
        time.sleep(0.05)  # (long enough for every thread to ask while it runs)
        return object()

    start = threading.Barrier(4)

    def ask():
        start.wait()
        got.append(programs.once(owner, "step", make))

    threads = [threading.Thread(target=ask) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and len(got) == 4 and all(g is got[0] for g in got)


def test_shared_programs_go_with_the_last_learner_holding_them():
    """The table of shared programs holds them weakly: learners that shared programs are all
    freed, and their programs with them."""
    import gc
    import weakref

    import kalnat
    from kalnat import programs

    model = _model_of_its_own(3)
    X, y = np.zeros((8, 3)), np.zeros(8, int)
    alive, held = [], []
    for lam in (0.9, 0.95, 0.99):
        learner = kalnat.ekf(model, kalnat.families.Bernoulli(), forgetting=lam)
        kalnat.fit(learner, learner.init(model.init(None)), X, y, chunk_size=8)
        alive.append(weakref.ref(learner))
        key = learner.program_key()
        held.append(learner.__dict__["_programs"][("chunk", True)])
        del learner
    assert held[1] is held[0] and held[2] is held[0]
    assert programs._SHARED[(key, ("chunk", True))] is held[0]
    del held
    gc.collect()
    assert [ref() for ref in alive] == [None] * 3
    assert not any(k[0] == key for k in list(programs._SHARED.keys()))


LOAD = """
import sys
from kalnat import datasets
src = datasets.open_source({name!r}, cache_dir={folder!r})
chunk = next(src.chunks)
print("SKLEARN" if "sklearn" in sys.modules else "NO_SKLEARN", file=sys.stderr)
import numpy as np
np.savez({out!r}, X=chunk.X, y=chunk.y.astype(str), names=np.asarray(src.feature_names), classes=np.asarray(src.class_names or [], str))
"""


def _load(name, folder, out):
    run = subprocess.run([sys.executable, "-c", LOAD.format(name=name, folder=str(folder), out=str(out))],
                         capture_output=True, text=True, env=_env(), timeout=120)
    assert run.returncode == 0, run.stderr
    with np.load(out) as f:
        return run.stderr.strip().splitlines()[-1], {k: f[k] for k in f}


@pytest.mark.parametrize("name", ["breast_cancer", "diabetes"])
def test_a_bundled_set_is_kept_in_the_cache_and_read_back_without_its_package(tmp_path, name, monkeypatch):
    folder = tmp_path / "datasets"
    first_import, first = _load(name, folder, tmp_path / "a.npz")
    # breast_cancer's file is read without importing scikit-learn (datasets._sklearn_table);
    # diabetes, which its loader scales, through scikit-learn
    assert first_import == ("SKLEARN" if name == "diabetes" else "NO_SKLEARN") and len(os.listdir(folder)) == 1
    again_import, again = _load(name, folder, tmp_path / "b.npz")
    assert again_import == "NO_SKLEARN"  # the copy was read, not the package
    for k in first:
        np.testing.assert_array_equal(again[k], first[k])
    (kept,) = os.listdir(folder)
    whole = (folder / kept).read_bytes()
    # a damaged copy (not a zip, cut short, a flipped byte, empty) is read afresh and replaced;
    # in this process, with the package's loader counted in place of the import probe above
    info = datasets.describe(name)
    calls = []
    counted = dataclasses.replace(info, loader=lambda: calls.append(1) or info.loader())
    monkeypatch.setattr(datasets, "describe", lambda n: counted if n == name else info)
    flipped = bytearray(whole)
    flipped[len(whole) // 2] ^= 0xFF
    for damage in [b"not a npz", whole[: len(whole) // 2], bytes(flipped), b""]:
        (folder / kept).write_bytes(damage)
        for read_from_package in (1, 0):  # afresh from the package, then the new copy
            del calls[:]
            src = datasets.open_source(name, cache_dir=str(folder))
            chunk = next(src.chunks)
            assert len(calls) == read_from_package
            np.testing.assert_array_equal(chunk.X, first["X"])
            np.testing.assert_array_equal(chunk.y.astype(str), first["y"])
            assert list(src.feature_names) == list(first["names"])
            assert list(src.class_names or []) == list(first["classes"])
        assert os.listdir(folder) == [kept]  # no temporary file left behind
