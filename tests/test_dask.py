"""Keyed learners on Dask (kalnat.dask_keyed): a LocalCluster of 2 worker processes equals the
one-process run (1e-12, float64), and a worker killed mid-stream is rebuilt from its shard's
last checkpoint with its rows since then replayed: the same predictions and final states.

Each scenario runs in a process of its own (tests/dask_scenarios.py), so that the cluster's
threads and processes never share the test runner's process."""

import importlib.util
import os
import re
import subprocess
import sys
import time

import pytest

if importlib.util.find_spec("distributed") is None:
    pytest.skip("dask.distributed is not installed (the dask extra)", allow_module_level=True)

HERE = os.path.dirname(os.path.abspath(__file__))


def _scenario(name, tmp_path):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([os.path.join(HERE, "..", "src"), HERE, env.get("PYTHONPATH", "")])
    out = subprocess.run([sys.executable, os.path.join(HERE, "dask_scenarios.py"), name, str(tmp_path)],
                         env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0 and out.stdout.strip().endswith("OK"), (out.stdout[-2000:], out.stderr[-4000:])


def test_shards_are_stable():
    from kalnat.dask_keyed import shard_of

    assert shard_of("user-1", 7) == shard_of("user-1", 7) and shard_of(12, 3) in range(3)
    with pytest.raises(ValueError, match="cannot be sharded"):
        shard_of(object(), 2)


def test_keys_go_to_the_shards_as_arrays_of_the_same_keys():
    """The driver sends each shard its keys as one NumPy array (Dask walks a list element by
    element): int64 or str where every key is one, else Python scalars in an object array;
    every row's shard is shard_of of its key, computed once per distinct int or str key."""
    import numpy as np

    from kalnat.dask_keyed import _key_array, _shards, shard_of

    cases = [
        (np.array([5, -3, 5, 2**62]), "i", [5, -3, 5, 2**62]),
        (np.array([2**64 - 1, 1], np.uint64), "u", [2**64 - 1, 1]),
        ([np.int64(7), 7, 3], "i", [7, 7, 3]),                        # NumPy scalars as Python ones
        (["a", "b", "a"], "U", ["a", "b", "a"]),
        (np.array(["x", "y"], object), "U", ["x", "y"]),                 # a pandas column of str
        ([7, "7"], "O", [7, "7"]),                                      # mixed: Python scalars kept
        ([2**64, 1], "O", [2**64, 1]),                                  # past int64
        (["a\0", "a"], "O", ["a\0", "a"]),                            # NumPy's str would drop the NUL
    ]
    for keys, kind, expected in cases:
        arr = _key_array(keys)
        assert arr.dtype.kind == kind and arr.tolist() == expected and all(
            type(a) is type(b) for a, b in zip(arr.tolist(), expected)), (keys, arr)
        assert _shards(arr, 5).tolist() == [shard_of(k, 5) for k in expected]
    assert _key_array(["u", "v" * 65]).dtype.kind == "O"  # a long key: not every key padded to it
    # only what a shard's checkpoint holds, and one JSON text per key (True and 1 are one key)
    for bad in ([1, [2]], [1, True], ["a", (1, 2)], [7, 7.0], ["a", None]):
        with pytest.raises(ValueError, match=r"keys\[1\] = .* keys on Dask must be str or int"):
            _key_array(bad)


def test_an_empty_batch_is_not_a_batch():
    """No rows: nothing sent to the shards and no batch counted (the replay log's numbering)."""
    import numpy as np

    from kalnat.dask_keyed import DaskKeyed

    dk = object.__new__(DaskKeyed)  # no cluster: an empty batch never reaches one
    dk.n_shards, dk.batch = 2, 4
    pred, ll = dk.learn([], np.zeros((0, 3)), np.zeros(0))
    assert pred is None and ll.shape == (0,) and dk.batch == 4


def test_a_dataframes_key_column_keeps_its_keys():
    """learn_dataframe's keys (_partition_rows) are the column's Python values: a nullable int
    column stays int (a missing value is not a key, nor is a datetime), a categorical
    column of ints stays int."""
    import numpy as np
    import pandas as pd

    from kalnat.dask_keyed import _key_array, _partition_rows, _shards

    def keys_of(column):
        frame = pd.DataFrame({"k": column, "a": [0.5, 1.5, 2.5], "y": [0.0, 1.0, 0.0]})
        return _key_array(_partition_rows(frame, "k", "y", ["a"], 0)[0])

    assert keys_of(pd.array([1, 2, 1], dtype="Int64")).tolist() == [1, 2, 1]
    assert keys_of(pd.Categorical([3, 4, 3])).dtype == np.int64
    for bad in (pd.array([1, None, 1], dtype="Int64"), pd.to_datetime(["2020-01-01"] * 3)):
        with pytest.raises(ValueError, match="keys on Dask must be str or int"):
            keys_of(bad)


def test_a_dataframes_missing_value_is_named_by_its_row_label_and_value_as_pandas_shows_them():
    """A partition's missing or infinite value is named by its row's index label and the value
    itself as Python writes them ('row 11', 'nan'), not as NumPy's scalars (np.int64(11),
    np.float64(nan)): a partition of a filtered frame has an int64 index, not a range."""
    import numpy as np
    import pandas as pd

    from kalnat.dask_keyed import _partition_rows

    frame = pd.DataFrame({"k": ["a", "b", "c"], "a": [0.5, np.nan, 2.5], "y": [0.0, 1.0, -np.inf]}, index=[10, 11, 12])
    with pytest.raises(ValueError, match=re.escape("partition 0, row 11, column 'a': missing or non-finite value nan")):
        _partition_rows(frame, "k", "y", ["a"], 0)
    with pytest.raises(ValueError, match=re.escape("partition 2, row 'r12', column 'y': missing or non-finite value -inf")):
        _partition_rows(frame.assign(a=1.0).set_axis(["r10", "r11", "r12"]), "k", "y", ["a"], 2)


class _Done:
    """A finished Dask future: ``result`` returns the value or raises the error."""

    def __init__(self, fn, *args):
        try:
            self.value, self.error = fn(*args), None
        except Exception as err:  # noqa: BLE001 (raised by result, as Dask's futures do)
            self.value, self.error = None, err

    def result(self, timeout=None):
        if self.error is not None:
            raise self.error
        return self.value

    def done(self):
        return True

    @property
    def status(self):  # the future that made an actor errs once the actor's worker is gone
        actor = self.value
        return "error" if isinstance(actor, _Actor) and actor.gone() else "finished"


class _Slow(_Done):
    """A call that answers after ``seconds``."""

    def __init__(self, seconds, fn, *args):
        super().__init__(fn, *args)
        self.ready = time.monotonic() + seconds

    def result(self, timeout=None):
        if not self.done():
            time.sleep(max(0.0, min(self.ready - time.monotonic(), 1e9 if timeout is None else timeout)))
        if not self.done():
            raise TimeoutError
        return super().result()

    def done(self):
        return time.monotonic() >= self.ready


class _Hung:
    """A call sent to a worker that died before the client knew: Dask retries the connection
    until its connect timeout (30 s). Waiting on it for more than a moment at a time, or for
    more than 5 s in all, fails the test."""

    def __init__(self):
        self.waited = 0.0

    def result(self, timeout=None):
        if timeout is None or timeout > 1 or self.waited > 5:
            pytest.fail(f"waited on a lost worker's call for {self.waited:.1f} s, now with a timeout of {timeout} s")
        time.sleep(timeout)
        self.waited += timeout
        raise TimeoutError

    def done(self):
        return False


class _Actor:
    """An actor's handle in this process: each method call runs at once (or after ``slow``
    seconds); a killed actor's calls raise OSError, as Dask's do when the worker is gone. A
    ``hung`` one's calls never answer (sent before the client knew the worker was gone, which
    it learns at ``dies_at``: the future that made the actor errs then)."""

    def __init__(self, obj, failing=()):
        self.obj, self.dead, self.hung, self.failing = obj, False, False, failing
        self.slow, self.dies_at = 0.0, None

    def gone(self):
        return self.dead or (self.dies_at is not None and time.monotonic() >= self.dies_at)

    def __getattr__(self, name):
        def call(*args):
            if self.hung:
                return _Hung()
            if self.dead or name in self.failing:
                raise OSError("Unable to contact Actor's worker")
            return _Slow(self.slow, getattr(self.obj, name), *args) if self.slow else _Done(
                getattr(self.obj, name), *args)
        return call


def _fails_learning(shard, error, after_batch=None):
    """The shard's own code raises ``error`` when it learns (after its batch ``after_batch``
    only, if given), as a worker out of memory would."""
    learn = shard.keyed.learn

    def failing(*args, **kwargs):
        if after_batch is None or shard.batch == after_batch:
            raise error
        return learn(*args, **kwargs)
    shard.keyed.learn = failing


class _Cluster:
    """The part of ``dask.distributed.Client`` that DaskKeyed uses, in this process; while
    ``full`` or once ``room`` actors are made, no new actor can be made (a cluster with no room
    left); its actors' methods named in ``failing`` fail as a lost worker's do."""

    def __init__(self, room=None, failing=()):
        self.full, self.made, self.room, self.failing = False, [], room, failing
        self.on_make = []  # hooks, each called with the next actor made (None: none)

    def scheduler_info(self):
        return {"workers": {"w0": {}, "w1": {}}}

    def submit(self, cls, *args, actor, pure, workers, allow_other_workers):
        def make():
            if self.full or len(self.made) == self.room:
                raise OSError("no worker can take the actor")
            self.made.append(_Actor(cls(*args), self.failing))
            hook = self.on_make.pop(0) if self.on_make else None
            if hook is not None:
                hook(self.made[-1])
            return self.made[-1]
        return _Done(make)

    def close(self):
        pass


def test_a_shard_lost_for_good_keeps_its_rows_and_the_others_learn_theirs():
    """A shard that cannot be rebuilt is an error (ShardLost) only once every other shard has
    learned the batch, and each logs it: a later rebuild of any shard replays it, and the lost
    shard learns it when it is rebuilt. A bad row is an error before any shard learns. A shard
    whose own code raises learns none of the batch (ShardError), is not rebuilt on the spot
    and does not log it. The final states equal one process learning, in order, the rows that
    were learned (bit for bit)."""
    import jax
    import numpy as np

    sys.path.insert(0, HERE)
    try:
        import keyed_factory
        from dask_scenarios import batches
    finally:
        sys.path.remove(HERE)
    from kalnat.dask_keyed import DaskKeyed, ShardError, ShardLost, shard_of
    from kalnat.keyed import Keyed

    stream = list(batches(n_batches=8))
    alone = Keyed(*keyed_factory.make(), batch_size=2)
    cluster = _Cluster()
    dk = DaskKeyed(cluster, keyed_factory.make, n_shards=3, checkpoint_every=3, retries=2, batch_size=2)
    shard = {k: shard_of(k, 3) for keys, _, _ in stream for k in keys}
    assert set(shard.values()) == {0, 1, 2}
    for b, (keys, X, y) in enumerate(stream):
        if b == 3:  # shard 1 lost for good: the others learn the batch and log it
            dk.actors[1].dead = cluster.full = True
            with pytest.raises(ShardLost, match=r"shard 1 lost and not rebuilt in 2 tries \(shard 1: OSError"):
                dk.learn(keys, X, y)
            # (and the future that made its last actor is let go: Dask frees the actor)
            assert dk.actors[1] is None and dk._made[1] is None and [len(log) for log in dk.log] == [1, 1, 1]
            alone.learn(keys, X, y)
            dk.actors[2].dead, cluster.full = True, False  # shard 2 lost too: it replays batch 3
            continue
        if b == 5:  # a bad row: nothing learned, no batch counted
            bad = X.copy()
            bad[7, 1] = np.nan
            before = (dk.batch, [len(log) for log in dk.log], [a.obj.batch for a in dk.actors])
            with pytest.raises(ValueError, match="x contains NaN"):
                dk.learn(keys, bad, y)
            assert (dk.batch, [len(log) for log in dk.log], [a.obj.batch for a in dk.actors]) == before
        if b == 6:  # shard 0's own code raises: the others learn the batch; shard 0 none of it
            _fails_learning(dk.actors[0].obj, MemoryError("out of memory"))
            logs = [len(log) for log in dk.log]
            with pytest.raises(ShardError, match=r"shard 0 raised \(shard 0: MemoryError: out of memory\); every "
                                                 r"other shard learned batch 6\. A shard that raised .* Do not pass "
                                                 r"the batch again\.") as err:
                dk.learn(keys, X, y)
            assert not isinstance(err.value, ShardLost) and dk.actors[0] is None and dk._made[0] is None
            assert dk.recoveries == 4
            assert [len(log) for log in dk.log] == [logs[0], logs[1] + 1, logs[2] + 1]
            kept = np.flatnonzero([shard[k] != 0 for k in keys])
            alone.learn([keys[i] for i in kept], X[kept], y[kept])
            continue
        pred, ll = dk.learn(keys, X, y)
        ref = alone.learn(keys, X, y)
        assert np.array_equal(pred.mean, ref.predictions.mean) and np.array_equal(ll, ref.log_likelihood), b
    assert dk.recoveries == 2 + 1 + 1 + 1  # shard 1: two failed tries, then once; shards 2 and 0 once
    # a checkpoint with shard 0 lost for good: the others are checkpointed, shard 0 keeps its log
    dk.actors[0].dead = cluster.full = True
    saved = list(dk.saved)
    with pytest.raises(ShardLost, match=r"shard 0 .*every other shard was checkpointed"):
        dk.checkpoint()
    assert dk.saved[0] == saved[0] and dk.saved[1][0] == dk.saved[2][0] == dk.batch and dk.log[0]
    cluster.full = False
    dk.flush()
    alone.flush()
    states = dk.leaves()
    assert sorted(states) == sorted(alone.keys)
    for key in alone.keys:
        assert all(np.array_equal(b, np.asarray(a)) for a, b in zip(jax.tree_util.tree_leaves(alone.state(key)),
                                                                    states[key])), key


def test_a_call_to_a_worker_lost_unbeknown_ends_when_the_scheduler_knows():
    """A call sent to a worker that died before the client knew would wait, in Dask, for the
    connect timeout (30 s): the driver stops waiting once the future that made the shard's actor
    errs (the scheduler's word that its worker left, here 0.3 s into the wait), rebuilds the
    shard and learns the batch. A live worker's call that takes longer than the driver's look
    at the scheduler (0.1 s) is waited for; one that takes longer than ``timeout`` is a lost
    worker's, and the error says how long was waited."""
    import numpy as np

    sys.path.insert(0, HERE)
    try:
        import keyed_factory
        from dask_scenarios import batches
    finally:
        sys.path.remove(HERE)
    from kalnat.dask_keyed import DaskKeyed, ShardLost
    from kalnat.keyed import Keyed

    alone = Keyed(*keyed_factory.make())
    cluster = _Cluster()
    dk = DaskKeyed(cluster, keyed_factory.make, n_shards=2, timeout=3600)
    for b, (keys, X, y) in enumerate(batches(n_batches=4)):
        if b == 1:  # slow answers from a live worker
            dk.actors[1].slow = 0.35
        if b == 2:
            dk.actors[0].hung, dk.actors[0].dies_at = True, time.monotonic() + 0.3
        pred, ll = dk.learn(keys, X, y)
        ref = alone.learn(keys, X, y)
        assert np.array_equal(pred.mean, ref.predictions.mean) and np.array_equal(ll, ref.log_likelihood), b
        assert dk.recoveries == (b >= 2), b
    dk.timeout = 0.2  # a call that takes longer than this is taken for a lost worker's
    cluster.on_make = [lambda actor: setattr(actor, "slow", 0.35)] * dk.retries  # so are its rebuilds
    with pytest.raises(ShardLost, match=r"shard 1 lost .*TimeoutError: no answer from the shard's worker in 0.2 s"):
        dk.n_keys()


def test_a_shards_own_errors_are_told_from_a_lost_worker():
    """In one batch a shard raises and another is lost for good: a ShardError (not ShardLost)
    naming both. The lost shard's pending batch then fails when its rebuild replays it (its
    own code): dropped from its log and reported, and the shard learns on. A shard lost at the
    periodic checkpoint is a warning (its batch is learned). The final states equal one
    process learning exactly the rows reported learned (bit for bit)."""
    import jax
    import numpy as np

    sys.path.insert(0, HERE)
    try:
        import keyed_factory
        from dask_scenarios import batches
    finally:
        sys.path.remove(HERE)
    from kalnat.dask_keyed import DaskKeyed, ShardError, shard_of
    from kalnat.keyed import Keyed

    stream = list(batches(n_batches=7, seed=1))
    alone = Keyed(*keyed_factory.make())
    cluster = _Cluster()
    dk = DaskKeyed(cluster, keyed_factory.make, n_shards=3, checkpoint_every=3, retries=2)

    def learned_by(keys, X, y, shards):
        r = [i for i, k in enumerate(keys) if shard_of(k, 3) in shards]
        alone.learn([keys[i] for i in r], X[r], y[r])

    for b, (keys, X, y) in enumerate(stream):
        if b == 2:
            _fails_learning(dk.actors[0].obj, MemoryError("out of memory"))
            dk.actors[1].dead = cluster.full = True
            with pytest.raises(ShardError, match=r"shard 1 lost .*; shard 0 raised \(shard 0: MemoryError") as err:
                dk.learn(keys, X, y)
            assert type(err.value) is ShardError and (err.value.lost, err.value.raised) == ({1}, {0})
            learned_by(keys, X, y, {2})  # shard 1 keeps batch 2 pending; shard 0 learned none of it
            cluster.full = False
            # the next actors: shard 0's rebuild, then two of shard 1's, whose code fails on batch 2
            # (once is the worker's failure: the next worker is tried; on two, the batch's)
            smaller = lambda actor: _fails_learning(actor.obj, MemoryError("smaller worker"), after_batch=1)  # noqa: E731
            cluster.on_make = [None, smaller, smaller]
            continue
        if b == 3:  # shard 1's rebuild cannot learn its pending batch 2: dropped, reported
            with pytest.raises(ShardError, match=r"shard 1 could not learn its batch 2 again when rebuilt "
                                                 r"\(MemoryError: smaller worker\): those rows are dropped, not "
                                                 r"learned; every shard learned batch 3") as err:
                dk.learn(keys, X, y)
            assert err.value.dropped == [(1, 2)] and [e[0] for e in dk.log[1]] == [0, 1, 3]
            learned_by(keys, X, y, {0, 1, 2})
            continue
        if b == 4:  # shard 2 lost; its first new worker fails every batch, the next learns them
            dk.actors[2].dead = True
            cluster.on_make = [lambda actor: _fails_learning(actor.obj, MemoryError("no room"))]
            dk.learn(keys, X, y)
            logged = [e[0] for e in dk.log[2]]
            dk.n_keys()  # rebuilds shard 2 (if the batch had none of its rows): nothing dropped
            assert [e[0] for e in dk.log[2]] == logged and len(logged) >= 3 and not cluster.on_make
            learned_by(keys, X, y, {0, 1, 2})
            continue
        if b == 5:  # shard 2 lost between its batch and the checkpoint after it: a warning
            dk.actors[2].failing, cluster.full = {"snapshot"}, True
            with pytest.warns(RuntimeWarning, match=r"shard 2 lost .* the checkpoint after batch 5 is not made"):
                dk.learn(keys, X, y)
            assert dk.actors[2] is None and dk.saved[2][0] == -1 and dk.saved[0][0] == 5
            learned_by(keys, X, y, {0, 1, 2})
            cluster.full = False
            continue
        dk.learn(keys, X, y)
        learned_by(keys, X, y, {0, 1, 2})
    states = dk.leaves()
    assert sorted(states) == sorted(alone.keys)
    for key in alone.keys:
        assert all(np.array_equal(b, np.asarray(a)) for a, b in zip(jax.tree_util.tree_leaves(alone.state(key)),
                                                                    states[key])), key


def test_the_command_stops_with_a_message_when_a_shard_is_lost_for_good(tmp_path, monkeypatch):
    """kalnat learn --key K --workers 2 on a cluster that has no room for new workers: workers
    lost at their first batch, or at the final checkpoint of a run into an earlier run's
    report, are a message naming the shards and a non-zero exit, no traceback; the earlier
    run's shards are left whole (not mixed with the new run's)."""
    from click.testing import CliRunner

    from kalnat import cli

    path = tmp_path / "d.csv"
    path.write_text("user,a,y\n" + "".join(f"u{i % 3},{i / 10:.1f},{i % 2}\n" for i in range(12)))
    out = tmp_path / "r"

    def run(cluster):
        monkeypatch.setattr(cli, "_dask_client", lambda workers, scheduler: (cluster, None))
        return CliRunner().invoke(cli.cli, ["learn", str(path), "--key", "user", "--workers", "2", "--quiet",
                                            "--prior-var", "1", "--forget", "1", "--out", str(out)])

    res = run(_Cluster(room=2, failing={"learn"}))
    assert res.exit_code == 1 and res.exception is not None and isinstance(res.exception, SystemExit), res.output
    assert "Error: DaskKeyed: shards 0, 1 lost and not rebuilt in 3 tries" in res.output, res.output
    assert res.output.strip().endswith("The run stops; its report is not written.") and "Traceback" not in res.output
    assert not out.exists() or not os.listdir(out)
    assert run(_Cluster()).exit_code == 0
    before = {f: (out / "shards" / f).read_bytes() for f in os.listdir(out / "shards")}
    assert sorted(before) == ["model.json", "shard_0.npz", "shard_1.npz"]
    path.write_text("user,a,y\n" + "".join(f"u{i % 3},{i / 7:.1f},{i % 2}\n" for i in range(12)))
    cluster = _Cluster(room=2)  # shard 0 is checkpointed, shard 1 lost at its checkpoint
    cluster.on_make = [None, lambda actor: setattr(actor, "failing", {"snapshot"})]
    res = run(cluster)
    assert res.exit_code == 1 and "shard 1 lost and not rebuilt" in res.output and "Traceback" not in res.output
    assert {f: (out / "shards" / f).read_bytes() for f in os.listdir(out / "shards")} == before
    assert [f for f in os.listdir(out) if f.startswith(".shards")] == []


def test_cluster_equals_one_process_and_survives_a_lost_worker(tmp_path):
    _scenario("cluster", tmp_path)


def test_command_on_workers(tmp_path):
    """kalnat learn --key K --workers 2: the same scores as in one process."""
    _scenario("command", tmp_path)


@pytest.mark.skipif(importlib.util.find_spec("pandas") is None or importlib.util.find_spec("pyarrow") is None,
                    reason="dask.dataframe needs pandas and pyarrow (dask[dataframe])")
def test_dataframe_partitions_on_workers(tmp_path):
    """DaskKeyed.learn_dataframe: a Dask dataframe's partitions in order, equal to one process."""
    _scenario("dataframe", tmp_path)
