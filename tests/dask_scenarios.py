"""The Dask scenarios of tests/test_dask.py, run in a process of their own: a LocalCluster's
scheduler threads and the worker processes stay out of the test runner's process (which
compiles XLA programs for the rest of the suite). Usage: dask_scenarios.py NAME TMPDIR."""

import os
import sys

import jax
import numpy as np

jax.config.update("jax_enable_x64", True)

import distributed  # noqa: E402


from kalnat.dask_keyed import DaskKeyed  # noqa: E402
from kalnat.keyed import Keyed  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import keyed_factory  # noqa: E402


def batches(n_batches=6, rows=24, seed=0):
    rng = np.random.default_rng(seed)
    for b in range(n_batches):
        keys = rng.choice(["a", "b", "c", "d", "e", "f"], size=rows).tolist()
        if b >= 2:
            keys[::5] = [f"late{b}"] * len(keys[::5])  # keys appearing mid-stream
        X = rng.normal(size=(rows, keyed_factory.P_IN))
        yield keys, X, (rng.uniform(size=rows) < 1 / (1 + np.exp(-X[:, 0]))).astype(float)


def cluster_scenario(tmp_path, monkeypatch):
    # The workers are fresh processes: they import keyed_factory and this kalnat from PYTHONPATH.
    src = os.path.join(HERE, "..", "src")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([src, HERE, os.environ.get("PYTHONPATH", "")]))
    # two rows per update: minibatches straddle the batches, partial ones held in the shards'
    # checkpoints, replayed after the lost worker, and learned at the end (flush)
    learner, params = keyed_factory.make()
    alone = Keyed(learner, params, batch_size=2)
    stream = list(batches())
    expected = [alone.learn(k, X, y) for k, X, y in stream]
    alone.flush()
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                                  silence_logs=50) as cluster, distributed.Client(cluster) as client:
        dk = DaskKeyed(client, keyed_factory.make, checkpoint_every=3, checkpoint_dir=str(tmp_path), batch_size=2)
        assert dk.n_shards == 2
        for b, ((keys, X, y), ref) in enumerate(zip(stream, expected)):
            if b == 4:  # after the checkpoint of batches 0–2 and one batch more: that one is replayed
                victim = sorted(client.scheduler_info()["workers"])[0]
                try:
                    client.run(os._exit, 1, workers=[victim])
                except Exception:
                    pass  # the worker died answering
            pred, ll = dk.learn(keys, X, y)
            assert np.allclose(pred.mean, ref.predictions.mean, rtol=1e-12, atol=0), b
            assert np.allclose(ll, ref.log_likelihood, rtol=1e-12, atol=0), b
        assert dk.recoveries >= 1
        dk.flush()
        states = dk.leaves()
        assert dk.n_keys() == len(alone) == len(states)
    for key in alone.keys:
        for a, b in zip(jax.tree_util.tree_leaves(alone.state(key)), states[key]):
            np.testing.assert_allclose(b, np.asarray(a), rtol=1e-12, atol=1e-300)
    assert sorted(os.listdir(tmp_path)) == ["shard_0.npz", "shard_1.npz"]


def command_scenario(tmp_path, monkeypatch):
    """kalnat learn --key K --workers 2: the same scores as in one process."""
    import json

    from click.testing import CliRunner

    from kalnat.cli import cli

    src = os.path.join(HERE, "..", "src")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([src, os.environ.get("PYTHONPATH", "")]))
    rng = np.random.default_rng(2)
    path = tmp_path / "d.csv"
    with open(path, "w") as f:
        f.write("user,a,b,y\n")
        for _ in range(60):
            x = rng.normal(size=2)
            f.write(f"u{rng.integers(0, 5)},{x[0]:.5f},{x[1]:.5f},{int(x[0] + 0.3 * rng.normal() > 0)}\n")
    common = ["learn", str(path), "--key", "user", "--prior-var", "1", "--forget", "1", "--quiet"]
    res = CliRunner().invoke(cli, common + ["--out", str(tmp_path / "one")], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    res = CliRunner().invoke(cli, common + ["--out", str(tmp_path / "two"), "--workers", "2"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    one = json.loads((tmp_path / "one" / "metrics.json").read_text())
    two = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert two["keyed"]["dask_shards"] == 2 and two["keyed"]["n_keys"] == one["keyed"]["n_keys"] == 5
    assert abs(two["final"]["log_loss"] - one["final"]["log_loss"]) <= 1e-12 * one["final"]["log_loss"]
    assert sorted(os.listdir(tmp_path / "two" / "shards")) == ["model.json", "shard_0.npz", "shard_1.npz"]
    # kalnat predict reads the shards: each row by its key's state, as from the one-process model
    new = tmp_path / "new.csv"
    with open(new, "w") as f:
        f.write("user,a,b\n" + "".join(f"u{i % 7},{0.3 * i - 1:.2f},{1 - 0.2 * i:.2f}\n" for i in range(14)))
    outs = [CliRunner().invoke(cli, ["predict", "--model-dir", str(tmp_path / r), str(new)], catch_exceptions=False)
            for r in ("one", "two")]
    assert all(o.exit_code == 0 for o in outs), [o.output for o in outs]
    assert outs[0].stdout == outs[1].stdout and outs[0].stdout.count(",0\n") == 4  # u5 and u6: not learned
    from kalnat.cli_keyed import LoadedKeyedModel

    one = LoadedKeyedModel.load(str(tmp_path / "one" / "keyed_model.npz"))
    two = LoadedKeyedModel.load(str(tmp_path / "two" / "shards"))
    assert len(two.shards) == 2 and sum(len(k) for k in two.shards) == 5
    keys = np.array([f"u{i % 7}" for i in range(14)])
    X = np.random.default_rng(3).normal(size=(14, 2))
    (t1, s1), (t2, s2) = one.predict_keyed(keys, X), two.predict_keyed(keys, X)
    assert np.array_equal(s1, s2) and s1.sum() == 10
    np.testing.assert_allclose(t2, t1, rtol=1e-12, atol=0)


def dataframe_scenario(tmp_path, monkeypatch):
    """A Dask dataframe of 3 partitions learned on 2 workers (DaskKeyed.learn_dataframe): each
    key's rows in the dataframe's order, equal to one process learning the rows in order; what
    the driver refuses (columns, values, rows, settings) named, before any shard learns it."""
    import dask.dataframe as dd
    import pandas as pd

    src = os.path.join(HERE, "..", "src")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([src, HERE, os.environ.get("PYTHONPATH", "")]))
    rows = [(k, X, y) for keys, Xb, yb in batches(n_batches=3) for k, X, y in zip(keys, Xb, yb)]
    keys = [r[0] for r in rows]
    X = np.stack([r[1] for r in rows])
    y = np.array([r[2] for r in rows])
    # the key column between the features, the target first: columns are found by name
    df = pd.DataFrame({"y": y, "a": X[:, 0], "user": keys, "b": X[:, 1], "c": X[:, 2]})
    ddf = dd.from_pandas(df, npartitions=3, sort=False)
    assert ddf.npartitions == 3
    learner, params = keyed_factory.make()
    alone = Keyed(learner, params)
    ref = alone.learn(keys, X, y)
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                                  silence_logs=50) as cluster, distributed.Client(cluster) as client:
        dk = DaskKeyed(client, keyed_factory.make)
        pred, ll = dk.learn_dataframe(ddf, key="user", target="y", features=["a", "b", "c"])
        assert dk.batch == 2  # one batch per partition
        np.testing.assert_allclose(pred.mean, ref.predictions.mean, rtol=1e-12, atol=0)
        np.testing.assert_allclose(ll, ref.log_likelihood, rtol=1e-12, atol=0)
        states = dk.leaves()
        try:
            dk.learn_dataframe(ddf, key="nope", target="y")
            raise AssertionError("no error for a missing key column")
        except ValueError as err:
            assert "no key column 'nope'" in str(err)
        bad = dd.from_pandas(df.assign(b=np.where(np.arange(len(df)) == 40, np.nan, df["b"])), npartitions=3,
                             sort=False)
        try:
            dk.learn_dataframe(bad, key="user", target="y", features=["a", "b", "c"])
            raise AssertionError("no error for a missing value")
        except ValueError as err:
            assert "row 40, column 'b'" in str(err), err
        # what else the driver refuses, each before a shard learns anything
        batch, held = dk.batch, sorted(dk.leaves())
        text = dd.from_pandas(df.assign(c=df["c"].astype(str) + "cm"), npartitions=3, sort=False)
        for call, said in (
                (lambda: dk.learn_dataframe(ddf, key="user", target="user"),
                 "the key column 'user' is also the target"),
                (lambda: dk.learn_dataframe(ddf, key="user", target="y", features=["a", "z"]),
                 "feature columns missing: ['z']"),
                (lambda: dk.learn_dataframe(ddf, key="user", target="y", features=[]),
                 "no feature columns besides the key and the target"),
                (lambda: dk.learn_dataframe(text, key="user", target="y"), "partition 0, column 'c': not numeric"),
                (lambda: dk.learn_dataframe(dd.from_pandas(df.iloc[:0], npartitions=1), key="user", target="y"),
                 "learn_dataframe: the dataframe has no rows"),
                (lambda: dk.learn(["u"], X[:2], y[:2]),
                 "keys, X and Y must have the same number of rows (1, (2,), (2,))"),
                (lambda: DaskKeyed(client, keyed_factory.make, retries=0),
                 "DaskKeyed: retries must be positive, got 0")):
            try:
                call()
                raise AssertionError(f"no error: {said}")
            except ValueError as err:
                assert said in str(err), err
        assert dk.batch == batch and sorted(dk.leaves()) == held
    assert sorted(states) == sorted(alone.keys)
    for key in alone.keys:
        for a, b in zip(jax.tree_util.tree_leaves(alone.state(key)), states[key]):
            np.testing.assert_allclose(b, np.asarray(a), rtol=1e-12, atol=1e-300)


class _Env:
    """monkeypatch.setenv for a plain script."""

    def setenv(self, key, value):
        os.environ[key] = value


if __name__ == "__main__":
    import pathlib

    name, tmp = sys.argv[1], pathlib.Path(sys.argv[2])
    {"cluster": cluster_scenario, "command": command_scenario, "dataframe": dataframe_scenario}[name](tmp, _Env())
    print("OK")
