"""One model across devices (kalnat.sharded): on 8 simulated CPU devices the filter with P
row-sharded equals the one-device filter (float64, 1e-12), P stays sharded, and the compiled
step moves no d × d array between devices (its HLO's collectives are d × m or m × m); the
structured forms split by parameter and blocks and groups part by part, and the chunk programs
their fits ran (every step of a stream) move no more than the bounds their tests name."""

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


def test_forms_of_parts_shard_each_part_that_splits(report):
    """Blocks, groups (a low-rank rest with a full last layer) and Kronecker factors on 8
    devices: equal to one device (1e-12, P itself); every block or group leaf whose first axis
    divides by 8 is split by rows, the rest (a 1-parameter block, the 9 × 9 last layer, the
    Kronecker factors) kept whole; in the chunk program the fit ran (read back without compiling
    another), and in ``sharded.step_fn``'s given the blocks' covariance, no split leaf moves
    whole between devices, and nothing larger than d × m or a whole part (padded to the device
    count) moves."""
    by = {(c["form"], c["batch"]): c for c in report["parts"]}
    assert sorted(by) == [("blocks", 1), ("kron", 1), ("last-layer", 2)]
    assert [c["programs"] for c in report["parts"]] == [0, 0, 0]
    assert "step_collectives" in by[("blocks", 1)]
    rows, whole = ["rows", None], []
    expected = {"blocks": [rows, rows, whole, rows], "last-layer": [["rows"], rows, whole],
                "kron": [whole] * 4}
    for (form, m), case in by.items():
        for what in ("theta", "cov", "pred", "ll"):
            assert case[what] <= 1e-12, (form, m, what, case[what])
        assert case["specs"] == expected[form], (form, case["specs"])
        split = [tuple(sh) for sh, spec in zip(case["shapes"], case["specs"]) if spec]
        kept = [math.prod([-(-sh[0] // 8) * 8] + sh[1:]) for sh, spec in zip(case["shapes"], case["specs"]) if not spec]
        bound = max([case["d"] * m] + kept)
        for op, shapes in case["collectives"] + case.get("step_collectives", []):
            for shape in shapes:
                assert tuple(v for v in shape if v != 1) not in split, (form, m, op, shape)
                assert math.prod(shape) <= bound, (form, m, op, shape, bound)
    assert by[("kron", 1)]["collectives"] == []


def test_structured_forms_shard_by_parameter(report):
    """Diagonal (p (d,)) and LowRank (υ (d,), W (d, k)): every leaf split by parameter over the
    8 devices, equal to one device (1e-12), and nothing larger than d × m moves in the chunk
    program the fit ran (read back without compiling another), nor in ``sharded.step_fn``'s given
    the low-rank covariance's type (W stays split)."""
    d, k = 16, 3
    assert [(c["form"], c["batch"]) for c in report["structured"]] == [
        ("diagonal", 1), ("diagonal", 2), ("lowrank", 1), ("lowrank", 2)]
    assert [c["programs"] for c in report["structured"]] == [0, 0, 0, 0]
    assert "step_collectives" in report["structured"][3]
    for case in report["structured"]:
        for what in ("theta", "cov", "pred", "ll"):
            assert case[what] <= 1e-12, (case["form"], case["batch"], what, case[what])
        shapes = {"diagonal": [[d // 8]], "lowrank": [[d // 8], [d // 8, k]]}[case["form"]]
        assert case["shard_shapes"] == shapes and all(spec[0] == "rows" for spec in case["specs"])
        m = case["batch"]
        ops = case["collectives"]
        assert any(op == "all-reduce" for op, _ in ops)
        # the low-rank step's sums over parameters are k × k, k × m and m × m: W is never gathered
        for op, shapes in ops + case.get("step_collectives", []):
            for shape in shapes:
                assert math.prod(shape) <= d * m, (case["form"], op, shape)


def test_forms_it_cannot_shard_are_errors():
    """A learner whose state is not one of the forms kalnat.sharded splits is a ValueError
    before anything runs; so is a form of parts given by its type (its shapes decide)."""
    import jax
    import numpy as np

    import kalnat
    from kalnat import sharded
    from kalnat.representations import BlockCovariance

    model = kalnat.models.linear(3)
    mesh = sharded.mesh(jax.devices()[:1])
    nig = kalnat.nig_filter(model, kalnat.families.Gaussian(1.0))
    with pytest.raises(ValueError, match="kalnat.sharded runs kalnat.ekf .* got nig"):
        sharded.fit(nig, nig.init(model.init(None)), np.zeros((2, 3)), np.zeros(2), mesh)
    with pytest.raises(ValueError, match="a BlockCovariance is split by its shapes"):
        sharded.state_sharding(mesh, BlockCovariance)
    # a full covariance alone must split evenly (placing P (9, 9) on 8 devices is an error);
    # as a group's part it is held whole
    from jax.sharding import PartitionSpec as Spec

    from kalnat.representations import GroupCovariance
    from kalnat.representations.full import Covariance, PriorCovariance

    P = Covariance(np.eye(9))
    assert sharded._cov_specs(P, 8) == Covariance(Spec("rows", None))
    assert sharded._cov_specs(GroupCovariance((P,)), 8) == GroupCovariance((Covariance(Spec()),))
    with pytest.raises(ValueError, match="a predicted state's blocks"):
        sharded._cov_specs(BlockCovariance((PriorCovariance(np.eye(2), 1.0, None),)), 8)
