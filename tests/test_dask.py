"""Keyed learners on Dask (kalnat.dask_keyed): a LocalCluster of 2 worker processes equals the
one-process run (1e-12, float64), and a worker killed mid-stream is rebuilt from its shard's
last checkpoint with its rows since then replayed: the same predictions and final states.

Each scenario runs in a process of its own (tests/dask_scenarios.py), so that the cluster's
threads and processes never share the test runner's process."""

import importlib.util
import os
import subprocess
import sys

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
        ([7, "7", True, (1, 2)], "O", [7, "7", True, (1, 2)]),        # mixed: Python scalars kept
        ([2**64, 1], "O", [2**64, 1]),                                  # past int64
        (["a\0", "a"], "O", ["a\0", "a"]),                            # NumPy's str would drop the NUL
    ]
    for keys, kind, expected in cases:
        arr = _key_array(keys)
        assert arr.dtype.kind == kind and arr.tolist() == expected and all(
            type(a) is type(b) for a, b in zip(arr.tolist(), expected)), (keys, arr)
        assert _shards(arr, 5).tolist() == [shard_of(k, 5) for k in expected]
    assert _key_array(["u", "v" * 65]).dtype.kind == "O"  # a long key: not every key padded to it
    with pytest.raises(ValueError, match=r"keys\[1\] = \[2\] is not hashable"):
        _key_array([1, [2]])


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
    column stays int (a missing one cannot be sharded, as a datetime cannot), a categorical
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
        with pytest.raises(ValueError, match="cannot be sharded"):
            _shards(keys_of(bad), 3)


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
