"""What the command's report figures cost to draw, and what the one layout saves.

``kalnat.plots`` lays a figure out with ``tight_layout`` and writes it with ``savefig``.
``tight_layout`` leaves the figure a placeholder layout engine, and ``savefig`` draws a figure
that has one an extra time (rendering nothing) before drawing it for the file; dropping the
engine once the layout is done (``kalnat.plots._save``) skips that draw. This script draws a
report's four figures (two learning curves, a bank's weights, a confusion matrix) and the
comparison figure both ways, alternating, in one process, and checks that the files are the
same bytes.

    python benchmarks/figures.py [--repeat 10]
"""

import argparse
import hashlib
import os
import tempfile
import time

import numpy as np

from kalnat import plots


def draw_all(folder, tag):
    rng = np.random.default_rng(0)
    rows = list(range(1, 570))
    curve = {"row": rows, "log_loss": list(rng.random(569)), "accuracy": list(rng.random(569)),
             "window_log_loss": list(rng.random(569))}
    title = "kalnat learn breast_cancer: a title long enough to be wrapped over two lines"
    paths = plots.learning_curves(curve, "accuracy", os.path.join(folder, tag + "_curve"), title)
    paths.append(plots.bank_weights(rows, rng.random((569, 8)), [f"member {i}" for i in range(8)],
                                    os.path.join(folder, tag + "_weights.png"), title))
    paths.append(plots.confusion(rng.integers(0, 60, (3, 3)), ["a", "b", "c"],
                                 os.path.join(folder, tag + "_confusion.png"), title))
    paths.append(plots.comparison({"kalnat auto": (rows, rng.random(569)), "sgd": (rows, rng.random(569))},
                                  {"offline": 0.3}, os.path.join(folder, tag + "_compare.png"), title))
    return [hashlib.sha256(open(p, "rb").read()).hexdigest() for p in paths]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=10)
    args = parser.parse_args()
    save = plots._save

    def with_placeholder(fig, path):  # the layout as before: tight_layout, then savefig
        fig.tight_layout()
        fig.savefig(path, dpi=plots.DPI)
        plots.plt.close(fig)
        return path

    ways = {"one layout (kalnat.plots)": save, "tight_layout, then savefig": with_placeholder}
    times = {name: [] for name in ways}
    digests = {}
    with tempfile.TemporaryDirectory() as folder:
        for name, way in ways.items():  # once each before timing: matplotlib's caches warm
            plots._save = way
            digests[name] = draw_all(folder, "warm")
        for _ in range(args.repeat):
            for name, way in ways.items():
                plots._save = way
                t = time.perf_counter()
                draw_all(folder, "timed")
                times[name].append((time.perf_counter() - t) / 5)
    plots._save = save
    base = np.median(times["tight_layout, then savefig"])
    for name, ts in times.items():
        print(f"{name:28s} {1e3 * np.median(ts):6.1f} ms a figure (median of {args.repeat}), "
              f"{np.median(ts) / base:.2f} × tight_layout, then savefig")
    same = digests["one layout (kalnat.plots)"] == digests["tight_layout, then savefig"]
    print("the same files, byte for byte:", "yes" if same else "NO")
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
