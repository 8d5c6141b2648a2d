import os

# The suite compiles a few hundred small XLA programs and runs most of them for a few hundred
# steps: compilation dominates its time. LLVM's optimisation passes change how fast the code
# runs, not what it computes (no fast-math); skipping them took CI here from 8m08 to ~6m15.
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()

# The command's persistent compilation cache stays off in the tests that run it in-process
# (tests/test_startup.py turns it on in a folder of its own).
os.environ.setdefault("KALNAT_NO_CACHE", "1")

import jax  # noqa: E402

# Exactness checks run in float64 (docs/method.md: equivalences hold to rounding).
jax.config.update("jax_enable_x64", True)
