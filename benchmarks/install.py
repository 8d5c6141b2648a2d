"""What `.ci/run`'s install costs: pip against uv, side by side on this machine.

Each round makes two fresh virtual environments and installs this checkout with the extras CI
takes (``-e '.[test,docs,dask]'``), once with pip (its own cache as it is, bytecode compiled)
and once with uv (``--compile-bytecode``, in a new empty cache folder unless ``--warm-uv``),
alternating which goes first; it prints the seconds of each and their ratio, and whether the
two environments hold the same versions (``pip freeze``, uv itself left out). The network and
the package indexes are part of what is timed.

    python benchmarks/install.py [--repeat 1] [--warm-uv]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXTRAS = ".[test,docs,dask]"


def _venv(folder):
    subprocess.run([sys.executable, "-m", "venv", folder], check=True)
    return os.path.join(folder, "bin", "python")


def _timed(cmd, env=None):
    start = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def _freeze(python):
    out = subprocess.run([python, "-m", "pip", "freeze", "--exclude-editable"], check=True, capture_output=True,
                         text=True).stdout.splitlines()
    return sorted(line for line in out if not line.lower().startswith("uv=="))


def one_round(scratch, uv_first, warm_uv):
    pip_py, uv_py = _venv(os.path.join(scratch, "pip")), _venv(os.path.join(scratch, "uv"))
    # uv itself is installed by pip first, as .ci/run does, outside the timed install
    subprocess.run([uv_py, "-m", "pip", "install", "--quiet", "uv"], check=True)
    env = dict(os.environ)
    if not warm_uv:
        env["UV_CACHE_DIR"] = os.path.join(scratch, "uv-cache")
    runs = {"pip": lambda: _timed([pip_py, "-m", "pip", "install", "--quiet", "-e", EXTRAS]),
            "uv": lambda: _timed([uv_py, "-m", "uv", "pip", "install", "--quiet", "--compile-bytecode",
                                  "--python", uv_py, "-e", EXTRAS], env)}
    order = ["uv", "pip"] if uv_first else ["pip", "uv"]
    seconds = {name: runs[name]() for name in order}
    return seconds, _freeze(pip_py) == _freeze(uv_py)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--warm-uv", action="store_true", help="uv's own cache as it is, not a new empty one")
    args = ap.parse_args()
    for r in range(args.repeat):
        with tempfile.TemporaryDirectory(prefix="kalnat-install-") as scratch:
            seconds, same = one_round(scratch, uv_first=r % 2 == 1, warm_uv=args.warm_uv)
        print(f"round {r + 1}: pip {seconds['pip']:.1f} s, uv {seconds['uv']:.1f} s "
              f"(uv/pip {seconds['uv'] / seconds['pip']:.2f}); the same versions: {same}")


if __name__ == "__main__":
    main()
