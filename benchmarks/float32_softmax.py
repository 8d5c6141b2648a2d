"""A confident softmax in float32 against float64: the numbers of docs/reliability.md (the
floor on R, ``r_floor``) and docs/structured.md (the Kronecker form's damping).

scikit-learn's digits (10 classes, 64 features standardised over the whole set, a linear
softmax with 9 free logits: d = 585), one filter at prior variance 1, no forgetting, every row
predicted before it is learned. Printed per case: the mean one-step predictive
log-likelihood in float32 and in float64, their ratio, and how many rows each predicted with a
probability below e⁻⁵⁰.

- ``floor``: the exact EKF on the first ``--rows`` rows with ``Categorical(10, r_floor=f)``
  for each ``f`` of ``--floors`` (``default``: the family's own, 8 units of rounding of each
  dtype).
- ``kron``: the Kronecker form (``r_floor=0``) over all 1 797 rows, ``b`` rows a step for each ``b``
  of ``--batch-sizes``.

- ``--wide-prior``: one member of ``kron_step.py --bank``'s banks, prior variance 10 on
  digits' inputs / 16, all 1 797 rows: the exact EKF and the Kronecker form with the layer's
  rows and with ``H`` as a matrix, with ``r_floor=0`` and the default floor.

    python benchmarks/float32_softmax.py [--rows 640] [--floors 0 default 1e-8 1e-6] [--batch-sizes 1 4 8] [--wide-prior]
"""

from __future__ import annotations

import argparse

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import kalnat  # noqa: E402
from kalnat import datasets  # noqa: E402
from kalnat.representations import kronecker  # noqa: E402


def run(X, y, dtype, family, kron=False, batch=1, prior_var=1.0, flat=False):
    model = kalnat.models.linear(64, 9, dtype=dtype)
    params = model.init(None)
    opts = dict(representation=kronecker(params)) if kron else {}
    if flat:  # the same model as a plain function: the step gets H as a matrix, not layer rows
        model = kalnat.models.Model(model.init, model.apply, model.input_shape, model.n_outputs)
    learner = kalnat.ekf(model, family, prior_var=prior_var, **opts)
    ll = np.asarray(kalnat.fit(learner, learner.init(params), np.asarray(X, dtype), y,
                               batch_size=batch).log_likelihood, np.float64)
    return ll.mean(), int(np.sum(ll < -50))


def line(label, X, y, **kw):
    m32, bad32 = run(X, y, jnp.float32, **kw)
    m64, bad64 = run(X, y, jnp.float64, **kw)
    print(f"{label:<28}{m32:>12.4f}{m64:>12.4f}{m32 / m64:>10.2f}{bad32:>12d}{bad64:>8d}", flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=640)
    ap.add_argument("--floors", type=lambda f: None if f == "default" else float(f), nargs="+",
                    default=[0.0, None, 1e-8, 1e-6])
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 8])
    ap.add_argument("--wide-prior", action="store_true",
                    help="also the members of prior variance 10 of kron_step.py --bank's banks")
    args = ap.parse_args()
    X, y, _, _ = datasets.load("digits")
    X = (X - X.mean(0)) / (X.std(0) + 1e-9)
    print(f"{'':<28}{'mean log-likelihood':>24}{'':>10}{'rows < e⁻⁵⁰':>20}")
    print(f"{'case':<28}{'float32':>12}{'float64':>12}{'ratio':>10}{'float32':>12}{'float64':>8}")
    for f in args.floors:
        line(f"full, r_floor {'default' if f is None else f'{f:g}'}", X[:args.rows], y[:args.rows],
             family=kalnat.families.Categorical(10, r_floor=f))
    for b in args.batch_sizes:
        line(f"kron, {b} row(s) a step", X, y, family=kalnat.families.Categorical(10, r_floor=0), kron=True, batch=b)
    if args.wide_prior:
        raw, _, _, _ = datasets.load("digits")
        X = raw / 16.0
        for f in (0.0, None):
            name = "default" if f is None else f"{f:g}"
            fam = kalnat.families.Categorical(10, r_floor=f)
            line(f"v=10 full, r_floor {name}", X, y, family=fam, prior_var=10.0)
            line(f"v=10 kron rows, {name}", X, y, family=fam, prior_var=10.0, kron=True)
            line(f"v=10 kron flat H, {name}", X, y, family=fam, prior_var=10.0, kron=True, flat=True)


if __name__ == "__main__":
    main()
