"""What compiling costs, side by side on this machine.

  options     seconds to lower and to compile one ``kalnat.fit`` chunk program (an EKF and an
              information filter on an MLP 3 → 4 → 3, categorical, minibatches of 8) under
              XLA's default CPU options, LLVM's optimisation passes skipped
              (``--xla_backend_optimization_level=0``), and those skipped with XLA's older
              elemental emitters (``--xla_cpu_use_fusion_emitters=false``), and those with
              one LLVM module a program (``--xla_cpu_parallel_codegen_split_count=1``, not split
              to be compiled on several threads): the test suite's options
              (``tests/conftest.py``). Each setting runs in a fresh process (XLA reads
              its options once), ``--repeat`` rounds alternating.
  sharing     seconds of a learner's first ``fit`` (100 rows, linear model, Bernoulli) when an
              equal learner with other hyperparameters is alive: with the programs it shares
              (``kalnat.programs.once``), on the same model object or on one built again by
              ``kalnat.models.linear``, and with programs of its own (``program_key`` turned
              off); the same for the default bank (``kalnat.ekf_bank``) built again, and for
              natural-gradient RTRL (``kalnat.recurrent.rtrl``, an Elman cell of 4 states, the
              100 rows as one sequence) on the same cell; ``--repeat`` rounds alternating, in
              one process.

    python benchmarks/compile_time.py [--repeat 3] [--part options|sharing|both]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

OPTIONS = {
    "XLA defaults": "",
    "level 0": "--xla_backend_optimization_level=0",
    "level 0 + older emitters": "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false",
    "… + one LLVM module": "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false "
                           "--xla_cpu_parallel_codegen_split_count=1",
}

ONE_PROGRAM = """
import json, time
import jax
jax.config.update("jax_enable_x64", True)
import numpy as np, kalnat
from kalnat import families as F
from kalnat.learners.base import device_hyper
from kalnat.stream import chunk_fn
fam = F.Categorical(3)
model = kalnat.models.mlp(3, (4,), fam.n_outputs)
out = {}
for name, make in (("ekf", kalnat.ekf), ("information", kalnat.information_filter)):
    learner = make(model, fam, prior_var=0.5, forgetting=0.99)
    state = learner.init(model.init(jax.random.PRNGKey(0)))
    X, Y, M = np.zeros((200, 8, 3)), np.zeros((200, 8), np.int64), np.ones((200, 8), bool)
    t0 = time.perf_counter()
    lowered = chunk_fn(learner, True).lower(device_hyper(learner, None, np.float64), state, X, Y, M)
    t1 = time.perf_counter()
    lowered.compile()
    out[name] = (t1 - t0, time.perf_counter() - t1)
print(json.dumps(out))
"""


def options(repeat: int) -> None:
    times = {k: {"ekf": [], "information": []} for k in OPTIONS}
    for _ in range(repeat):
        for label, flags in OPTIONS.items():
            env = dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu")
            env.pop("JAX_COMPILATION_CACHE_DIR", None)
            run = subprocess.run([sys.executable, "-c", ONE_PROGRAM], env=env, capture_output=True, text=True,
                                 check=True)
            for name, (_, compiled) in json.loads(run.stdout.strip().splitlines()[-1]).items():
                times[label][name].append(compiled)
    base = {n: statistics.median(times["XLA defaults"][n]) for n in ("ekf", "information")}
    print(f"compile one fit chunk program, median of {repeat} (seconds; ÷ XLA defaults)")
    print(f"{'options':28s} {'ekf':>6s} {'ratio':>6s} {'information':>12s} {'ratio':>6s}")
    for label in OPTIONS:
        e, i = (statistics.median(times[label][n]) for n in ("ekf", "information"))
        print(f"{label:28s} {e:6.2f} {e / base['ekf']:6.2f} {i:12.2f} {i / base['information']:6.2f}")


def sharing(repeat: int) -> None:
    import time

    import jax
    import numpy as np

    import kalnat
    from kalnat.bank import Bank
    from kalnat.learners.base import Learner
    from kalnat.recurrent.base import RecurrentLearner

    model = kalnat.models.linear(3)
    params = model.init(None)
    rng = np.random.default_rng(0)
    X = rng.normal(size=(100, 3))
    y = (X[:, 0] > 0).astype(float)
    keep = kalnat.ekf(model, kalnat.families.Bernoulli(), forgetting=0.9)
    kalnat.fit(keep, keep.init(params), X, y)  # the live learner whose programs are shared
    keep_bank = kalnat.ekf_bank(model, kalnat.families.Bernoulli())
    kalnat.fit(keep_bank, keep_bank.init(params), X, y)  # and the live bank
    cell = kalnat.recurrent.elman(n_inputs=3, n_state=4)
    cell_params = cell.init(jax.random.PRNGKey(0))
    keep_rtrl = kalnat.recurrent.rtrl(cell, kalnat.families.Bernoulli(), forgetting=0.9)
    kalnat.recurrent.fit_sequence(keep_rtrl, keep_rtrl.init(cell_params), X, y)  # and the live RTRL learner
    own_key, own_bank_key, own_recurrent_key = Learner.program_key, Bank.program_key, RecurrentLearner.program_key
    fam = kalnat.families.Bernoulli()
    builds = {  # (what is built again, whether it may share)
        "a learner, same model object": (lambda r: kalnat.ekf(model, fam, forgetting=0.95 - 0.01 * r), True),
        "a learner, model built again": (lambda r: kalnat.ekf(kalnat.models.linear(3), fam,
                                                              forgetting=0.95 - 0.01 * r), True),
        "a learner, programs of its own": (lambda r: kalnat.ekf(model, fam, forgetting=0.95 - 0.01 * r), False),
        "the default bank, model built again": (lambda r: kalnat.ekf_bank(kalnat.models.linear(3), fam,
                                                                         prior_vars=(0.02, 0.2, 2.0, 20.0 + r)), True),
        "the default bank, programs of its own": (lambda r: kalnat.ekf_bank(model, fam), False),
        "an RTRL learner, same cell": (lambda r: kalnat.recurrent.rtrl(cell, fam, prior_var=2.0 + r), True),
        "an RTRL learner, programs of its own": (lambda r: kalnat.recurrent.rtrl(cell, fam, prior_var=2.0 + r), False),
    }
    times = {name: [] for name in builds}
    for r in range(repeat):
        for name, (build, share) in builds.items():
            Learner.program_key = own_key if share else (lambda self: None)
            Bank.program_key = own_bank_key if share else (lambda self: None)
            RecurrentLearner.program_key = own_recurrent_key if share else (lambda self: None)
            learner = build(r)
            t = time.perf_counter()
            if isinstance(learner, RecurrentLearner):  # the 100 rows as one sequence of 100 steps
                jax.block_until_ready(kalnat.recurrent.fit_sequence(learner, learner.init(cell_params), X, y).state)
            else:
                jax.block_until_ready(kalnat.fit(learner, learner.init(params), X, y).state)
            times[name].append(time.perf_counter() - t)
    Learner.program_key, Bank.program_key, RecurrentLearner.program_key = own_key, own_bank_key, own_recurrent_key
    print(f"a first fit of 100 rows beside an equal live learner or bank, median of {repeat} (ms)")
    for name, ts in times.items():
        print(f"  {name:40s} {statistics.median(ts) * 1e3:8.1f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--part", choices=["options", "sharing", "both"], default="both")
    args = ap.parse_args()
    if args.part in ("options", "both"):
        options(args.repeat)
    if args.part in ("sharing", "both"):
        sharing(args.repeat)


if __name__ == "__main__":
    main()
