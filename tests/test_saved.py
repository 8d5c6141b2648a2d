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
    assert not any(p.suffix == ".tmp" for p in tmp_path.rglob("*"))


def test_an_undescribed_learner_is_plain_jit(tmp_path):
    model, _, _ = _problem()
    learner = kalnat.ekf(model, kalnat.families.Bernoulli(), prior_var=1.0)
    assert not isinstance(saved.jit(learner, "x", lambda a: a), saved._Saved)
