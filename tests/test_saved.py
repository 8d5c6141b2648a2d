"""Chunk programs kept across processes (kalnat.saved): a learner given a recipe learns exactly
what it learns without one, reads its program back instead of tracing the learner again, and
treats an unreadable file or folder as no file at all."""

import os

import jax
import numpy as np
import pytest

import kalnat
from kalnat import saved

ROWS = 70


def _problem():
    rng = np.random.default_rng(3)
    X = rng.normal(size=(ROWS, 3))
    y = (X @ np.array([1.0, -0.5, 0.3]) + 0.5 * rng.normal(size=ROWS) > 0).astype(int)
    model = kalnat.models.linear(3)
    return model, X, y


def _learn(folder=None, recipe="bank on 3 features", chunk_size=16):
    model, X, y = _problem()
    learner = kalnat.auto(model, kalnat.families.Bernoulli())  # a bank: every leaf kind of a state
    if folder is not None:
        saved.describe(learner, recipe, str(folder))
    return kalnat.fit(learner, learner.init(model.init(None)), X, y, chunk_size=chunk_size)


def _same(a, b):
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture(scope="module")
def plain():
    return _learn()


def _files(folder):
    return sorted(f for f in os.listdir(folder) if f.endswith(".program"))


def test_a_described_learner_learns_the_same_and_reads_its_program_back_without_tracing(tmp_path, plain,
                                                                                       monkeypatch):
    first = _learn(tmp_path)
    _same(first, plain)
    files = _files(tmp_path)
    assert len(files) == 1
    # a new learner (as in the next process) with the same recipe: the program comes from the
    # file, and neither the learner nor the scan is traced
    monkeypatch.setattr(saved._Saved, "_export", lambda *a: pytest.fail("exported again"))
    monkeypatch.setattr(kalnat.bank.Bank, "scan_chunk", lambda *a, **k: pytest.fail("traced"))
    _same(_learn(tmp_path), plain)
    assert _files(tmp_path) == files


def test_another_recipe_or_chunk_shape_is_another_program(tmp_path, plain):
    _learn(tmp_path)
    _learn(tmp_path, recipe="another learner")
    assert len(_files(tmp_path)) == 2
    _same(_learn(tmp_path, chunk_size=32), plain)  # read back by shape, it would fail here
    assert len(_files(tmp_path)) == 3


def test_an_unreadable_file_is_exported_again(tmp_path, plain):
    _learn(tmp_path)
    (name,) = _files(tmp_path)
    (tmp_path / name).write_bytes(b"not a program")
    _same(_learn(tmp_path), plain)
    assert _files(tmp_path) == [name] and (tmp_path / name).read_bytes() != b"not a program"


def test_a_folder_that_cannot_be_made_leaves_the_program_unsaved(tmp_path, plain):
    blocked = tmp_path / "a file"
    blocked.write_text("")
    _same(_learn(blocked / "programs"), plain)


def test_a_write_that_fails_leaves_nothing_half_written(tmp_path, plain, monkeypatch):
    def full_disk(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(saved.os, "replace", full_disk)
    _same(_learn(tmp_path), plain)
    assert os.listdir(tmp_path) == []  # neither the program nor its temporary file


def test_a_program_jax_export_refuses_is_traced_as_before(tmp_path, plain, monkeypatch):
    def refuse(*args, **kwargs):
        raise ValueError("cannot export a host callback")

    monkeypatch.setattr(saved.export, "export", refuse)
    _same(_learn(tmp_path), plain)
    assert _files(tmp_path) == []


def test_a_saved_call_is_one_compiled_program_for_host_and_device_arguments(tmp_path, compiled_programs):
    """The state comes from init, then from the previous call, the rows from NumPy: once the
    first chunk has compiled, nothing more is compiled."""
    model, X, y = _problem()
    learner = kalnat.auto(model, kalnat.families.Bernoulli())
    saved.describe(learner, "one program", str(tmp_path))
    with compiled_programs() as compiles:
        res = kalnat.fit(learner, learner.init(model.init(None)), X[:16], y[:16], chunk_size=16)
        first = len(compiles)
        assert first >= 1
        res = kalnat.fit(learner, res.state, X[16:], y[16:], chunk_size=16)
        kalnat.fit(learner, learner.init(model.init(None)), X, y, chunk_size=16)
    assert len(compiles) == first


def test_the_command_saves_only_a_learner_its_settings_name_exactly(tmp_path):
    """A setting that is not JSON (an array given from Python) would be named by its repr,
    which rounds: two different banks would share one program. Such a learner is not saved."""
    from kalnat import cli, cli_runner

    ctx = cli.learn.make_context("learn", ["data.csv"])
    kw = dict(ctx.params)
    kw.pop("data")
    cfg = cli._config(kw)
    named = cli_runner.OnlineRunner(cfg, "bernoulli", ["0", "1"], 3, programs=str(tmp_path))
    assert named.learner in saved._RECIPES
    bank = dict(prior_vars=[1.0], forgettings=np.array([0.9999999999, 0.99, 1.0]), forgetting_mass=0.01)
    unnamed = cli_runner.OnlineRunner(dict(cfg, bank=bank), "bernoulli", ["0", "1"], 3, programs=str(tmp_path))
    assert unnamed.learner not in saved._RECIPES


def test_a_moved_cache_folder_keeps_its_programs():
    """Where JAX's cache lives is no part of a program's key: a folder moved (KALNAT_CACHE_DIR
    changed with it) still serves its saved programs."""
    before = saved._environment()
    old = jax.config.jax_compilation_cache_dir
    jax.config.update("jax_compilation_cache_dir", "/a/folder/moved/elsewhere")
    try:
        moved = saved._environment()
    finally:
        jax.config.update("jax_compilation_cache_dir", old)
    assert moved == before


def test_a_saved_program_is_readable_by_everyone_who_shares_the_folder(tmp_path):
    _learn(tmp_path)
    (name,) = _files(tmp_path)
    assert (tmp_path / name).stat().st_mode & 0o777 == 0o644


def test_the_command_s_initial_parameters_are_the_model_s_own_bit_for_bit():
    from kalnat import cli_setup

    family = kalnat.families.Bernoulli()
    cfg = dict(model_spec="mlp:16,8", method="ekf", prior_var=1.0, forgetting=None, covariance="diag", seed=5)
    model, _, state = cli_setup.build_learner(cfg, family, 7)
    _same(state.params, model.init(jax.random.PRNGKey(5)))


def test_an_undescribed_learner_is_plain_jit(tmp_path):
    model, _, _ = _problem()
    learner = kalnat.ekf(model, kalnat.families.Bernoulli(), prior_var=1.0)
    assert not isinstance(saved.jit(learner, "x", lambda a: a), saved._Saved)
