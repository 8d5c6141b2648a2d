"""Regenerates the site's figures under docs/img/ from the command's own reports.

    python docs/figures.py            # kalnat learn and kalnat compare on breast_cancer (about 2 minutes here)

The sunspots figure comes from ``python examples/sunspots_rtrl.py --out docs/img``.
"""

import os
import pathlib
import shutil
import subprocess
import sys
import tempfile

IMG = pathlib.Path(__file__).resolve().parent / "img"
SRC = IMG.parents[1] / "src"  # this checkout's kalnat, whatever is installed


def kalnat(*args, cwd):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(SRC), os.environ.get("PYTHONPATH")])))
    subprocess.run([sys.executable, "-c", "from kalnat.cli import main; main()", *args], cwd=cwd, env=env, check=True)


def main():
    IMG.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        kalnat("learn", "breast_cancer", "--out", "learn", "--quiet", cwd=tmp)
        for name in ("learning_curve_log_loss.png", "learning_curve_accuracy.png", "bank_weights.png",
                     "confusion.png"):
            shutil.copy(pathlib.Path(tmp, "learn", name), IMG / f"breast_cancer_{name}")
        kalnat("compare", "breast_cancer", "--out", "compare", cwd=tmp)
        shutil.copy(pathlib.Path(tmp, "compare", "compare.png"), IMG / "breast_cancer_compare.png")


if __name__ == "__main__":
    main()
