"""Checkpoints: every learner's state saved and restored bit for bit, exact resume of a stream
(also after the process is killed), clear errors for a wrong file, atomic writes."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kalnat
from kalnat import checkpoint, recurrent
from kalnat import families as F

HERE = os.path.dirname(os.path.abspath(__file__))
P_IN = 3
N = 60
CUT = 23  # not a multiple of any chunk: the resumed stream restarts mid-chunk


def _data(family, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(N, P_IN))
    z = X @ np.array([1.0, -2.0, 0.5])
    if family.name == "bernoulli":
        return X, (rng.uniform(size=N) < 1 / (1 + np.exp(-z))).astype(float)
    return X, z + 0.3 * rng.normal(size=N)


MODEL = kalnat.models.linear(P_IN)
BER, GAU = F.Bernoulli(), F.Gaussian(0.3)

# Built once at import: each jitted chunk function then compiles once for the whole file.
LEARNERS = {
    "ekf": (kalnat.ekf(MODEL, BER, forgetting=0.99), BER),
    "sqrt_ekf": (kalnat.sqrt_ekf(MODEL, BER, process_noise=1e-4), BER),
    "information": (kalnat.information_filter(MODEL, BER), BER),
    "natural_gradient": (kalnat.natural_gradient(MODEL, BER), BER),
    "iterated": (kalnat.iterated_ekf(MODEL, BER, iterations=2), BER),
    "nig": (kalnat.nig_filter(MODEL, GAU, forgetting=0.99), GAU),
    "bank": (kalnat.ekf_bank(MODEL, BER, prior_vars=(0.1, 1.0), forgettings=(1.0, 0.99)), BER),
}

CELL = recurrent.elman(P_IN, 3)
RECURRENT = {
    "rtrl": recurrent.rtrl(CELL, GAU, forgetting=0.99),
    "joint_ekf": recurrent.joint_ekf(CELL, GAU, forgetting=0.99),
}


def leaves(state):
    return [np.asarray(a) for a in jax.tree_util.tree_leaves(state)]


def assert_identical(a, b):
    """Same pytree, same dtypes, the same bits."""
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    for x, y in zip(leaves(a), leaves(b)):
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(x, y)


def copy(state):
    return jax.tree_util.tree_map(lambda a: jnp.array(a, copy=True), state)


@pytest.mark.parametrize("name", list(LEARNERS))
def test_resume_from_checkpoint_is_bit_identical(name, tmp_path):
    learner, family = LEARNERS[name]
    X, y = _data(family)
    params = MODEL.init(None)
    whole = kalnat.fit(learner, learner.init(params), X, y, chunk_size=16)

    first = kalnat.fit(learner, learner.init(params), X[:CUT], y[:CUT], chunk_size=16)
    path = checkpoint.save(tmp_path / "mid.npz", first.state, extra={"rows": CUT})
    restored = checkpoint.load(path, learner.init(params))
    assert_identical(restored, first.state)  # every leaf, the step counters included
    assert int(restored.count) == CUT
    assert checkpoint.read_header(path)["extra"] == {"rows": CUT}
    second = kalnat.fit(learner, restored, X[CUT:], y[CUT:], chunk_size=16)

    assert_identical(second.state, whole.state)
    np.testing.assert_array_equal(np.concatenate([first.predictions.mean, second.predictions.mean]),
                                  whole.predictions.mean)


@pytest.mark.parametrize("name", list(RECURRENT))
def test_recurrent_resume_is_bit_identical(name, tmp_path):
    learner = RECURRENT[name]
    params = CELL.init(jax.random.PRNGKey(0))
    X, y = _data(GAU, seed=1)
    whole = recurrent.fit_sequence(learner, learner.init(params), X, y, chunk_size=16)
    first = recurrent.fit_sequence(learner, learner.init(params), X[:CUT], y[:CUT], chunk_size=16)
    checkpoint.save(tmp_path / "mid.npz", first.state)
    restored = checkpoint.load(tmp_path / "mid.npz", learner.init(params))
    assert_identical(restored, first.state)  # θ, covariance, hidden state (and G), count
    second = recurrent.fit_sequence(learner, restored, X[CUT:], y[CUT:], chunk_size=16)
    assert_identical(second.state, whole.state)


class KeyedState(NamedTuple):
    params: dict
    key: jax.Array
    raw_key: jax.Array
    count: jax.Array


def test_random_keys_and_counters_round_trip(tmp_path):
    """A state holding a typed key and a raw uint32 key: both restored, both draw the same."""
    state = KeyedState({"w": jnp.arange(3.0)}, jax.random.key(7), jax.random.PRNGKey(8),
                       jnp.asarray(41, jnp.int32))
    checkpoint.save(tmp_path / "k.npz", state)
    like = KeyedState({"w": jnp.zeros(3)}, jax.random.key(0), jax.random.PRNGKey(0), jnp.zeros((), jnp.int32))
    back = checkpoint.load(tmp_path / "k.npz", like)
    assert jax.dtypes.issubdtype(back.key.dtype, jax.dtypes.prng_key)
    np.testing.assert_array_equal(jax.random.normal(back.key, (4,)), jax.random.normal(state.key, (4,)))
    np.testing.assert_array_equal(jax.random.normal(back.raw_key, (4,)), jax.random.normal(state.raw_key, (4,)))
    assert back.count.dtype == jnp.int32 and int(back.count) == 41
    np.testing.assert_array_equal(back.params["w"], state.params["w"])


# ---- wrong files ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def ekf_file(tmp_path_factory):
    learner, _ = LEARNERS["ekf"]
    path = tmp_path_factory.mktemp("ck") / "ekf.npz"
    checkpoint.save(path, learner.init(MODEL.init(None)))
    return path


def test_checkpoint_of_another_learner_is_refused(ekf_file):
    sq, _ = LEARNERS["sqrt_ekf"]
    with pytest.raises(ValueError, match=r"holds a State\[Covariance\], expected a State\[CholeskyFactor\]"):
        checkpoint.load(ekf_file, sq.init(MODEL.init(None)))
    bank, _ = LEARNERS["bank"]
    with pytest.raises(ValueError, match="different learner"):
        checkpoint.load(ekf_file, bank.init(MODEL.init(None)))


def test_checkpoint_of_another_shape_or_dtype_is_refused(ekf_file):
    bigger = kalnat.models.linear(P_IN + 1)
    learner = kalnat.ekf(bigger, BER)
    with pytest.raises(ValueError, match=r"shapes or dtypes differ.*\[1, 3\].*\[1, 4\]"):
        checkpoint.load(ekf_file, learner.init(bigger.init(None)))
    no_bias = kalnat.models.linear(P_IN, bias=False)
    with pytest.raises(ValueError, match="structure differs"):
        checkpoint.load(ekf_file, kalnat.ekf(no_bias, BER).init(no_bias.init(None)))
    f32 = jax.tree_util.tree_map(lambda a: a.astype(jnp.float32), MODEL.init(None))
    with pytest.raises(ValueError, match="float64.*float32"):
        checkpoint.load(ekf_file, LEARNERS["ekf"][0].init(f32))


def test_files_that_are_not_checkpoints_are_refused(tmp_path, ekf_file):
    like = LEARNERS["ekf"][0].init(MODEL.init(None))
    (tmp_path / "text.npz").write_text("hello")
    np.savez(tmp_path / "plain.npz", a=np.zeros(3))
    data = ekf_file.read_bytes()
    (tmp_path / "cut.npz").write_bytes(data[: len(data) // 2])  # a write that never finished
    header = json.dumps({"format": "another program's"}).encode()
    np.savez(tmp_path / "other.npz", __header__=np.frombuffer(header, np.uint8), a=np.zeros(3))
    for name in ("text.npz", "plain.npz", "cut.npz", "missing.npz", "other.npz"):
        with pytest.raises(ValueError, match="not a kalnat checkpoint"):
            checkpoint.load(tmp_path / name, like)


def test_a_checkpoint_whose_arrays_do_not_match_its_header_is_damaged(tmp_path, ekf_file):
    """A leaf the header lists but the file lacks, or one of another shape than its header
    says: the file is named damaged, with the leaf, not taken for another learner's."""
    like = LEARNERS["ekf"][0].init(MODEL.init(None))
    with np.load(ekf_file) as z:
        arrays = {k: z[k] for k in z.files}
    np.savez(tmp_path / "lost.npz", **{k: v for k, v in arrays.items() if k != "leaf_1"})
    np.savez(tmp_path / "reshaped.npz", **dict(arrays, leaf_1=arrays["leaf_1"].ravel()))   # w (1, 3)
    with pytest.raises(ValueError, match=r"lost\.npz: damaged checkpoint \(.*leaf_1"):
        checkpoint.load(tmp_path / "lost.npz", like)
    with pytest.raises(ValueError, match=r"reshaped\.npz: damaged checkpoint \(leaf 1 is \(3,\) float64, its "
                                         r"header says \[1, 3\] float64\)"):
        checkpoint.load(tmp_path / "reshaped.npz", like)


def test_other_format_version_is_refused(tmp_path, monkeypatch):
    state = LEARNERS["ekf"][0].init(MODEL.init(None))
    monkeypatch.setattr(checkpoint, "FORMAT_VERSION", 99)
    checkpoint.save(tmp_path / "v99.npz", state)
    monkeypatch.setattr(checkpoint, "FORMAT_VERSION", 1)
    with pytest.raises(ValueError, match="format version 99"):
        checkpoint.load(tmp_path / "v99.npz", state)


# ---- files written by kalnat 0.1 ------------------------------------------------------

V1 = os.path.join(HERE, "data", "checkpoints_v1")
# Written by kalnat 0.1 (tests/data/checkpoints_v1): each learner of LEARNERS (0.1 had no
# iterated one in checkpoints) after fit on the 20 rows of _v1_data with the same settings; 0.2 changed the predictive, not the update, so the same fit
# here must reach the same θ and covariance.
V1_LEARNERS = {k: v for k, v in LEARNERS.items() if k != "iterated"}


def _v1_data(family):
    rng = np.random.default_rng(0)
    X = rng.normal(size=(20, 3))
    z = X @ np.array([1.0, -2.0, 0.5])
    yb = (rng.uniform(size=20) < 1 / (1 + np.exp(-z))).astype(float)
    return X, (yb if family.name == "bernoulli" else z + 0.3 * rng.normal(size=20))


@pytest.mark.parametrize("name", list(V1_LEARNERS))
def test_checkpoints_of_kalnat_0_1_load_into_the_same_state(name):
    learner, family = V1_LEARNERS[name]
    assert checkpoint.read_header(os.path.join(V1, f"{name}.npz"))["version"] == 1
    old = checkpoint.load(os.path.join(V1, f"{name}.npz"), learner.init(MODEL.init(None)))
    # (chunks of 16 rows, as the resume test's: the programs it compiled)
    now = kalnat.fit(learner, learner.init(MODEL.init(None)), *_v1_data(family), chunk_size=16).state
    assert int(old.count) == int(now.count) == 20
    assert len(leaves(old)) == len(leaves(now))
    for a, b in zip(leaves(old), leaves(now)):  # θ, covariance (each member's), counters, a and b
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14)
    if name == "bank":
        np.testing.assert_allclose(old.log_weights, now.log_weights, rtol=1e-12)
    # and it learns on from there
    kalnat.fit(learner, old, *_v1_data(family), chunk_size=16)


def test_recurrent_checkpoint_of_kalnat_0_1_loads_into_the_same_state():
    learner = recurrent.rtrl(CELL, GAU, forgetting=0.99)
    params = CELL.init(jax.random.PRNGKey(0))
    old = checkpoint.load(os.path.join(V1, "rtrl.npz"), learner.init(params))
    X, _ = _v1_data(BER)
    now = recurrent.fit_sequence(learner, learner.init(params), X, _v1_data(GAU)[1]).state
    assert len(leaves(old)) == len(leaves(now))
    for a, b in zip(leaves(old), leaves(now)):  # θ, P, hidden state, G, count
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14)


def test_checkpoint_of_kalnat_0_1_for_another_learner_names_the_version():
    sq, _ = V1_LEARNERS["sqrt_ekf"]
    with pytest.raises(ValueError, match=r"kalnat 0\.1 \(checkpoint format 1\) and holds a EKFState"):
        checkpoint.load(os.path.join(V1, "ekf.npz"), sq.init(MODEL.init(None)))
    bigger = kalnat.models.linear(P_IN + 1)
    with pytest.raises(ValueError, match="shapes or dtypes differ"):
        checkpoint.load(os.path.join(V1, "ekf.npz"), kalnat.ekf(bigger, BER).init(bigger.init(None)))


# ---- atomic writes -------------------------------------------------------------------


def test_failed_write_leaves_previous_checkpoint_and_no_partial_file(tmp_path, monkeypatch):
    learner, _ = LEARNERS["ekf"]
    old = learner.init(MODEL.init(None))
    path = tmp_path / "state.npz"
    checkpoint.save(path, old, extra={"rows": 1})
    before = path.read_bytes()
    new = kalnat.fit(learner, learner.init(MODEL.init(None)), *_data(BER)).state

    real_savez = np.savez

    def savez_then_fail(f, **arrays):  # the disk fills up half-way through the file
        real_savez(f, **arrays)
        f.truncate(100)
        raise OSError("No space left on device")

    monkeypatch.setattr(np, "savez", savez_then_fail)
    with pytest.raises(OSError, match="No space"):
        checkpoint.save(path, new, extra={"rows": 2})
    monkeypatch.setattr(np, "savez", real_savez)
    assert sorted(os.listdir(tmp_path)) == ["state.npz"]  # no temporary file left behind
    assert path.read_bytes() == before
    assert_identical(checkpoint.load(path, old), old)

    with pytest.raises(ValueError, match="JSON"):
        checkpoint.save(path, new, extra={"rows": object()})
    assert sorted(os.listdir(tmp_path)) == ["state.npz"] and path.read_bytes() == before
    # a folder as the path: named (os.replace's error named the temporary file), nothing written
    (tmp_path / "dir").mkdir()
    with pytest.raises(IsADirectoryError, match=re.escape(f"{tmp_path / 'dir'} is a folder: give the file")):
        checkpoint.save(tmp_path / "dir", new)
    assert sorted(os.listdir(tmp_path)) == ["dir", "state.npz"] and not os.listdir(tmp_path / "dir")


# ---- a killed stream -----------------------------------------------------------------


def _rows_saved(path):
    try:
        return checkpoint.read_header(path)["extra"]["rows"]
    except ValueError:
        return 0


def test_stream_killed_mid_run_resumes_to_the_uninterrupted_state(tmp_path):
    """SIGKILL a process that checkpoints after each chunk, start it again: it resumes from
    its last checkpoint and ends in the state of one uninterrupted run, bit for bit."""
    sys.path.insert(0, HERE)
    try:
        import checkpoint_worker as worker
    finally:
        sys.path.remove(HERE)
    script = os.path.join(HERE, "checkpoint_worker.py")
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.Popen([sys.executable, script, str(tmp_path), "--pause", "0.05"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    state_file = tmp_path / "state.npz"
    deadline = time.monotonic() + 60
    try:
        while _rows_saved(state_file) < 3 * worker.CHUNK:
            assert proc.poll() is None, proc.stdout.read().decode()
            assert time.monotonic() < deadline, "the worker wrote no checkpoint"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    killed_at = _rows_saved(state_file)
    assert 0 < killed_at < worker.ROWS and not (tmp_path / "final.npz").exists()

    out = subprocess.run([sys.executable, script, str(tmp_path)], env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("resumed at ")
    assert int(out.stdout.split()[2]) >= killed_at

    model, learner = worker.learner()
    X, y = worker.stream()
    like = learner.init(model.init(None))
    uninterrupted = kalnat.fit(learner, learner.init(model.init(None)), X, y).state
    final = checkpoint.load(tmp_path / "final.npz", like)
    assert int(final.count) == worker.ROWS
    assert_identical(final, uninterrupted)


def test_the_folder_is_synced_after_the_rename(tmp_path, monkeypatch):
    """A rename is durable only once the folder's entry is on disk: save fsyncs the file, then
    the folder (issue: the file was fsync'ed, its directory not)."""
    import stat

    synced = []
    real = os.fsync

    def record(fd):
        synced.append(stat.S_ISDIR(os.fstat(fd).st_mode))
        return real(fd)

    monkeypatch.setattr(os, "fsync", record)
    checkpoint.save(tmp_path / "s.npz", LEARNERS["ekf"][0].init(MODEL.init(None)))
    assert synced == [False, True]  # the file, then its folder


def test_a_diagonal_checkpoint_of_unpadded_variances_loads_padded(tmp_path):
    """Before the diagonal form padded its variances to numerics.LANES entries, a checkpoint held
    d of them: it loads into the padded state (zeros after them), a lone learner's and a bank's."""
    model = kalnat.models.linear(4)
    learner = kalnat.ekf(model, F.Gaussian(0.5), representation=kalnat.representations.Diagonal())
    bank = kalnat.bank.bank(learner, [dict(prior_var=0.5), dict(prior_var=2.0)])
    rng = np.random.default_rng(0)
    X, y = rng.normal(size=(20, 4)), rng.normal(size=20)
    for who in (learner, bank):
        state = kalnat.fit(who, who.init(model.init(None)), X, y).state
        cov = state.cov if who is learner else state.members.cov
        old = cov._replace(p=cov.p[..., :cov.d])  # as the earlier version wrote it
        saved = state._replace(cov=old) if who is learner else state._replace(members=state.members._replace(cov=old))
        path = checkpoint.save(tmp_path / "old.npz", saved)
        loaded = checkpoint.load(path, who.init(model.init(None)))
        for a, b in zip(jax.tree_util.tree_leaves(loaded), jax.tree_util.tree_leaves(state)):
            np.testing.assert_array_equal(a, b)


def test_a_diagonal_checkpoint_of_another_group_layout_is_refused(tmp_path):
    """Groups of 5 and 7 diagonal parameters and groups of 7 and 5 hold arrays of the same
    shapes (each padded to 8): the file's variances in this learner's padding tell them apart."""
    from kalnat.representations import Diagonal, Groups

    model = kalnat.models.linear(11)
    rng = np.random.default_rng(0)
    a, b = (kalnat.ekf(model, F.Gaussian(0.5), representation=Groups(sizes, (Diagonal(), Diagonal())))
            for sizes in ((5, 7), (7, 5)))
    path = checkpoint.save(tmp_path / "groups.npz", kalnat.fit(a, a.init(model.init(None)), rng.normal(size=(30, 11)),
                                                               rng.normal(size=30)).state)
    checkpoint.load(path, a.init(model.init(None)))
    with pytest.raises(ValueError, match="diagonal covariance of another size"):
        checkpoint.load(path, b.init(model.init(None)))


class _Odd(NamedTuple):
    a: jax.Array
    b: jax.Array


def test_a_load_compiles_no_program(tmp_path, compiled_programs):
    """checkpoint.load puts each leaf on the device as it is (jax.device_put): no copy program
    compiled for each new shape and dtype, as jnp.asarray compiles one (jax 0.10: 7 programs
    for the default bank's 8 leaves, in a `kalnat predict` that has compiled nothing else)."""
    state = _Odd(jnp.arange(17 * 3, dtype=jnp.float64).reshape(17, 3), jnp.ones(19, jnp.int32))  # shapes of its own
    path = checkpoint.save(tmp_path / "odd.npz", state)
    with compiled_programs() as compiled:
        restored = checkpoint.load(path, state)
    assert compiled == []
    assert_identical(restored, state)
