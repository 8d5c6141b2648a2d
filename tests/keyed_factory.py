"""The learner of tests/test_dask.py, importable by the Dask workers (module-level)."""

import kalnat

P_IN = 3


def make():
    model = kalnat.models.linear(P_IN)
    return kalnat.ekf(model, kalnat.families.Bernoulli(), forgetting=0.99), model.init(None)
