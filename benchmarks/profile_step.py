"""Where a structured learner's step spends its time: each operation of the compiled program.

Runs :func:`kalnat.fit` on benchmarks/networks.py's teacher stream (MLP 100 → 300 → 300 → 1,
d = 120 901, float32) under JAX's profiler and prints, for the operations that take longest,
their milliseconds per step (summed over the traced rows, divided by their number) with the
names XLA gave them. Those names are defined in the optimised HLO that
``XLA_FLAGS="--xla_dump_to=DIR --xla_dump_hlo_as_text"`` writes (the ``*after_optimizations.txt``
file that holds them). The first line gives the whole program's time per step.

    python benchmarks/profile_step.py [--structure lowrank:10] [--max-variance 10] [--rows 128] [--top 15]
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import sys
import tempfile

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import kalnat  # noqa: E402
from networks import structures, teacher  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--structure", default="lowrank:10",
                    choices=["diag", "lowrank:10", "last-layer:10", "kron"])
    ap.add_argument("--max-variance", type=float, default=None)
    ap.add_argument("--rows", type=int, default=128,
                    help="rows traced, after as many that compile and warm the same program")
    ap.add_argument("--top", type=int, default=15)
    args = ap.parse_args()

    warm = args.rows   # the same chunk shape as the traced run's: nothing compiles inside the trace
    model, X, Y = teacher(warm + args.rows, jnp.float32)
    params = model.init(jax.random.PRNGKey(5))
    rep = structures(params, exact=False)[args.structure]
    options = {} if args.max_variance is None else {"max_variance": args.max_variance}
    learner = kalnat.ekf(model, kalnat.families.Gaussian(0.01), prior_var=0.1, representation=rep, **options)
    state = learner.init(params)
    state = kalnat.fit(learner, state, X[:warm], Y[:warm], chunk_size=args.rows).state   # compiles
    jax.block_until_ready(state)
    with tempfile.TemporaryDirectory() as folder:
        with jax.profiler.trace(folder, create_perfetto_trace=True):
            jax.block_until_ready(kalnat.fit(learner, state, X[warm:], Y[warm:], chunk_size=args.rows).state)
        with gzip.open(glob.glob(os.path.join(folder, "**", "*.json.gz"), recursive=True)[0]) as f:
            trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    total, calls = collections.defaultdict(float), collections.Counter()
    for e in events:
        if e.get("ph") == "X" and not e["name"].startswith("$"):   # "$…": Python frames
            total[e["name"]] += e.get("dur", 0.0)
            calls[e["name"]] += 1
    whole = total.pop("ThunkExecutor::Execute (wait for completion)", None)
    if whole is None:
        sys.exit("no 'ThunkExecutor::Execute (wait for completion)' span in the trace: this JAX "
                 "names the program's execution otherwise; see the spans below\n"
                 + "\n".join(sorted(total, key=total.get, reverse=True)[:args.top]))
    for name in [n for n in total if n.startswith(("ThunkExecutor", "SlinkyThreadPool"))]:
        del total[name]   # the executor's own spans, which hold the operations below
    print(f"{args.structure}, variance bound {args.max_variance}: {whole / args.rows / 1e3:.3f} ms a step "
          f"over {args.rows} rows; its longest operations (a conditional's line holds what of its "
          f"branch is not listed apart):")
    for name in sorted(total, key=total.get, reverse=True)[:args.top]:
        print(f"{total[name] / args.rows / 1e3:8.3f} ms  {calls[name]:6d} calls  {name[:90]}")


if __name__ == "__main__":
    main()
