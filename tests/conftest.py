import os

# The suite compiles a few hundred small XLA programs and runs most of them for a few hundred
# steps: compilation dominates its time. LLVM's optimisation passes change how fast the code
# runs, not what it computes (no fast-math); skipping them took CI here from 8m08 to ~6m15.
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()

# The command's persistent compilation cache stays off in the tests that run it in-process
# (tests/test_startup.py turns it on in a folder of its own).
os.environ.setdefault("KALNAT_NO_CACHE", "1")

# One persistent compilation cache for the whole run, shared by the xdist workers (the
# controller makes the folder before it starts them; they inherit the variable): tests build
# the same learners over the same shapes again and again, each time a new closure, and a
# program compiled once is then read back instead of compiled (test_equivalence alone: 3m35
# of CPU without, 2m49 with, 0m51 when every program is already there). A fresh folder per
# run, removed at the end: what the suite measures never depends on an earlier run. The size
# bound turns on JAX's file lock, so a worker never reads an entry another is still writing.
_CACHE_VAR = "KALNAT_TEST_JAX_CACHE"
_own_cache = _CACHE_VAR not in os.environ
if _own_cache:
    import tempfile

    os.environ[_CACHE_VAR] = tempfile.mkdtemp(prefix="kalnat-test-jax-")

import jax  # noqa: E402

jax.config.update("jax_compilation_cache_dir", os.environ[_CACHE_VAR])
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
jax.config.update("jax_compilation_cache_max_size", 2**31)


def pytest_unconfigure(config):
    if _own_cache and not hasattr(config, "workerinput"):  # the process that made it
        import shutil

        shutil.rmtree(os.environ[_CACHE_VAR], ignore_errors=True)

# Exactness checks run in float64 (docs/method.md: equivalences hold to rounding).
jax.config.update("jax_enable_x64", True)
