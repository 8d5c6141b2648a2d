"""One model across hosts: two processes joined by ``jax.distributed`` (JAX's CPU collectives
over gloo, on this machine) into one mesh of 4 devices, 2 per process, run
``kalnat.sharded.fit`` unchanged. Each process holds only its own rows of the covariance, and
what it holds equals the one-device filter (float64, 1e-12): the full covariance, the diagonal
and the low-rank precision (the full one with one and two rows per step)."""

import json
import os
import socket
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
PROCESSES = 2


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def reports():
    env = dict(os.environ)  # the worker adds its own device count to the suite's XLA flags
    env["PYTHONPATH"] = os.pathsep.join([os.path.join(HERE, "..", "src")] + env.get("PYTHONPATH", "").split(os.pathsep))
    port = str(_free_port())
    procs = [subprocess.Popen([sys.executable, os.path.join(HERE, "multihost_worker.py"), str(i), str(PROCESSES), port],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(PROCESSES)]
    outs = []
    try:
        for p in procs:
            stdout, stderr = p.communicate(timeout=600)
            assert p.returncode == 0, stderr[-3000:]
            outs.append(json.loads(stdout.strip().splitlines()[-1]))
    finally:  # one process failed or hung: the other would wait for it forever
        for q in procs:
            if q.poll() is None:
                q.kill()
    return outs


def test_processes_form_one_mesh(reports):
    assert sorted(r["process"] for r in reports) == list(range(PROCESSES))
    for r in reports:
        assert (r["processes"], r["devices"], r["local"]) == (PROCESSES, 2 * PROCESSES, 2)


def test_each_process_holds_its_rows_and_they_equal_one_device(reports):
    d = 16
    for r in reports:
        assert [(c["form"], c["batch"]) for c in r["cases"]] == [
            ("full", 1), ("full", 2), ("diagonal", 1), ("lowrank", 1)]
        for case in r["cases"]:
            for what in ("theta", "cov", "pred", "ll"):
                assert case[what] <= 1e-12, (r["process"], case["form"], case["batch"], what, case[what])
            # a quarter of the rows per device, half of them in this process
            assert set(case["cov_rows_per_shard"]) == {d // (2 * PROCESSES)}
            assert len(case["cov_rows_here"]) == 2
    held = [set(c["cov_rows_here"]) for c in (r["cases"][0] for r in reports)]
    assert held[0].isdisjoint(held[1]) and len(held[0] | held[1]) == 2 * PROCESSES
