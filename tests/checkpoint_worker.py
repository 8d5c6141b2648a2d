"""A stream learner that checkpoints after every chunk; run by tests/test_checkpoint.py.

``python checkpoint_worker.py FOLDER [--pause SECONDS]``: learns the stream of
:func:`stream` in chunks of ``CHUNK`` rows, writing ``FOLDER/state.npz`` (with the rows done in
its header) after each chunk. If a checkpoint is already there it resumes from it. At the end
it writes ``FOLDER/final.npz``. The test kills it (SIGKILL) mid-run and starts it again.
"""

import argparse
import os
import sys
import time

import jax

jax.config.update("jax_enable_x64", True)

import numpy as np  # noqa: E402

import kalnat  # noqa: E402
from kalnat import checkpoint  # noqa: E402

ROWS = 600
CHUNK = 40


def stream():
    rng = np.random.default_rng(11)
    X = rng.normal(size=(ROWS, 3))
    y = (rng.uniform(size=ROWS) < 1 / (1 + np.exp(-X @ [1.0, -2.0, 0.5]))).astype(float)
    return X, y


def learner():
    model = kalnat.models.linear(3)
    return model, kalnat.ekf(model, kalnat.families.Bernoulli(), prior_var=1.0, forgetting=0.995)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("folder")
    ap.add_argument("--pause", type=float, default=0.0)
    args = ap.parse_args()
    model, lrn = learner()
    X, y = stream()
    path = os.path.join(args.folder, "state.npz")
    state = lrn.init(model.init(None))
    done = 0
    if os.path.exists(path):
        done = checkpoint.read_header(path)["extra"]["rows"]
        state = checkpoint.load(path, state)
        print(f"resumed at {done}", flush=True)
    while done < ROWS:
        stop = min(done + CHUNK, ROWS)
        state = kalnat.fit(lrn, state, X[done:stop], y[done:stop], return_predictions=False).state
        done = stop
        checkpoint.save(path, state, extra={"rows": done})
        print(f"checkpoint {done}", flush=True)
        time.sleep(args.pause)
    checkpoint.save(os.path.join(args.folder, "final.npz"), state, extra={"rows": done})
    return 0


if __name__ == "__main__":
    sys.exit(main())
