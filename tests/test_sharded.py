"""One model across devices (kalnat.sharded): on 8 simulated CPU devices the filter with P
row-sharded equals the one-device filter (float64, 1e-12), P stays sharded, and the compiled
step moves no d × d array between devices (its HLO's collectives are d × m or m × m)."""

import json
import math
import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(scope="module")
def report():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([os.path.join(HERE, "..", "src")] + env.get("PYTHONPATH", "").split(os.pathsep))
    out = subprocess.run([sys.executable, os.path.join(HERE, "sharded_worker.py")], env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_equals_one_device(report):
    assert report["devices"] == 8
    assert len(report["cases"]) == 8
    for case in report["cases"]:
        for what in ("theta", "P", "pred", "ll"):
            assert case[what] <= 1e-12, (case["family"], case["batch"], case["n"], what, case[what])


def test_p_stays_row_sharded(report):
    for case in report["cases"]:
        assert case["row_sharded"]
        assert case["shards"] == case["n"] and case["shard_shape"] == [16 // case["n"], 16]


def test_no_d_by_d_array_moves(report):
    d = 16
    for case in report["cases"]:
        ops = case["collectives"]
        assert any(op == "all-reduce" for op, _ in ops)  # S = H P⁻ Hᵀ + R is summed over devices
        assert any(op == "all-gather" and [d, case["batch"]] in shapes for op, shapes in ops)  # W (d × m)
        for op, shapes in ops:
            for shape in shapes:
                # at most d × m numbers (m = the minibatch's outputs); P's block is d²/n
                assert math.prod(shape) <= d * case["batch"], (op, shape, case["n"])


def test_structured_forms_shard_by_parameter(report):
    """Diagonal (p (d,)) and LowRank (υ (d,), W (d, k)): every leaf split by parameter over the
    8 devices, equal to one device (1e-12), and nothing larger than d × m moves (W stays split)."""
    d, k = 16, 3
    assert [(c["form"], c["batch"]) for c in report["structured"]] == [
        ("diagonal", 1), ("diagonal", 2), ("lowrank", 1), ("lowrank", 2)]
    for case in report["structured"]:
        for what in ("theta", "cov", "pred", "ll"):
            assert case[what] <= 1e-12, (case["form"], case["batch"], what, case[what])
        shapes = {"diagonal": [[d // 8]], "lowrank": [[d // 8], [d // 8, k]]}[case["form"]]
        assert case["shard_shapes"] == shapes and all(spec[0] == "rows" for spec in case["specs"])
        m = case["batch"]
        ops = case["collectives"]
        assert any(op == "all-reduce" for op, _ in ops)
        # the low-rank step's sums over parameters are k × k, k × m and m × m: W is never gathered
        for op, shapes in ops:
            for shape in shapes:
                assert math.prod(shape) <= d * m, (case["form"], op, shape)
