"""The memory maps a compiled program keeps, and what reading their count costs, on this machine.

Linux allows a process 65 530 memory maps; each program XLA compiles for the CPU keeps some while
JAX caches it (docs/reliability.md, tests/conftest.py). For XLA's default options and the test
suite's (benchmarks/compile_time.py's), each in a fresh process, this prints the maps a program
added as it was loaded: the mean over 200 operations run outside jit (one shape each), and the
mean and the most over the programs of 24 ``kalnat.fit`` calls (EKF and information filter,
categorical and Gaussian, MLPs of two hidden layers of 4, 8 or 16, minibatches of 4 and of 1).
Then the cost of one read of ``/proc/self/maps`` with about 3 000 and 30 000 maps (``mmap``
regions added to reach it). About a minute.

    python benchmarks/memory_maps.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))
from compile_time import OPTIONS  # noqa: E402

SETTINGS = {"XLA's defaults": OPTIONS["XLA defaults"], "the test suite's": OPTIONS["… + one LLVM module"]}

PER_PROGRAM = """
import json
import jax, jax.monitoring, jax.numpy as jnp, numpy as np
jax.config.update("jax_enable_x64", True)
import kalnat
from kalnat import families as F

def maps():
    with open("/proc/self/maps", "rb") as f:
        return f.read().count(b"\\n")

added, last = [], [maps()]
def loaded(event, seconds, **_):
    if event == "/jax/core/compile/backend_compile_duration":
        now = maps()
        added.append(now - last[0])
        last[0] = now
jax.monitoring.register_event_duration_secs_listener(loaded)
keep = [jnp.sin(jnp.ones(n + 1)) for n in range(200)]
ops = list(added)
added.clear()
for make in (kalnat.ekf, kalnat.information_filter):
    for fam in (F.Categorical(3), F.Gaussian()):
        for width in (4, 8, 16):
            model = kalnat.models.mlp(3, (width, width), fam.n_outputs)
            learner = make(model, fam, prior_var=0.5)
            y = np.zeros(50, np.int64) if fam.n_outputs > 1 else np.zeros(50)
            state = learner.init(model.init(jax.random.PRNGKey(0)))
            for batch in (4, 1):
                state = kalnat.fit(learner, state, np.zeros((50, 3)), y, batch_size=batch).state
            keep.append((learner, state))
print(json.dumps({"ops": ops, "fit": list(added)}))
"""


def read_cost(target: int, rounds: int = 20) -> tuple:
    """(maps, seconds per read of /proc/self/maps) with about ``target`` maps in this process."""
    import mmap

    def count():
        with open("/proc/self/maps", "rb") as f:
            return f.read().count(b"\n")

    regions = [mmap.mmap(-1, 2 * mmap.PAGESIZE) for _ in range(max(0, target - count()))]
    t = time.perf_counter()
    for _ in range(rounds):
        n = count()
    seconds = (time.perf_counter() - t) / rounds
    del regions
    return n, seconds


def main() -> None:
    print("maps a program added as it was loaded")
    print(f"{'options':18s} {'an operation (mean)':>20s} {'a fit program (mean)':>21s} {'(most)':>7s}")
    for label, flags in SETTINGS.items():
        env = dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu")
        env.pop("JAX_COMPILATION_CACHE_DIR", None)
        out = subprocess.run([sys.executable, "-c", PER_PROGRAM], env=env, capture_output=True, text=True,
                             check=True)
        added = json.loads(out.stdout.strip().splitlines()[-1])
        ops, fit = added["ops"], added["fit"]
        print(f"{label:18s} {sum(ops) / len(ops):20.1f} {sum(fit) / len(fit):21.1f} {max(fit):7d}"
              f"   ({len(fit)} fit programs)")
    print("one read of /proc/self/maps")
    for target in (3_000, 30_000):
        n, seconds = read_cost(target)
        print(f"  {n:6d} maps  {seconds * 1e3:6.2f} ms  {seconds / n * 1e6:5.2f} µs a map")


if __name__ == "__main__":
    main()
