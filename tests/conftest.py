import collections
import gc
import os
import subprocess
import sys

# The suite compiles about 7 500 small XLA programs (and reads 1 800 more from the cache below)
# and runs most of them for a few hundred steps: tracing, lowering and compiling dominate its
# time (KALNAT_TEST_COMPILE_TIMES=1, at the end of this file, sums them). Two XLA CPU
# options make compiling cheaper, and a third does in one process; what the first two compile
# is the same to rounding, not bit for bit (exp, log1p, tanh, sigmoid and cumsum round
# differently):
# - skipping LLVM's optimisation passes took CI here from 8m08 to ~6m15;
# - at that level, XLA's older elemental emitters in place of its MLIR fusion emitters compile
#   a fit's scan in 0.20–0.22 s against 0.51–0.54 s (benchmarks/compile_time.py; 0.73–0.86 s
#   with XLA's defaults); test_equivalence.py took 75 s on one core against 122 s;
# - at that level, one LLVM module a program, where XLA splits it into up to 32 to compile them
#   on several threads (which two busy test workers on two cores do not have): the chunk
#   program above compiles in 0.18 s against 0.19 s for an EKF, the information filter's in 0.20 s against
#   0.27 s (benchmarks/compile_time.py --part options, medians of 5), and XLA's compiler took 38–39 s
#   of test_equivalence.py against 50 s, 83 s of test_structured.py against 99 s (one process
#   each, KALNAT_TEST_COMPILE_TIMES=1). On two workers the difference was within the machine's
#   noise (test_equivalence, test_structured and test_iterated: 176 and 181 s against 184 and
#   167 s, alternately). The command
#   keeps the split: with its own options and a core to spare, its cold `kalnat learn` took
#   as long either way.
# Tests whose claim depends on the default rounding run it in a subprocess with XLA_FLAGS=""
# (test_families.py); KALNAT_TEST_DEFAULT_XLA=1 runs the whole suite with XLA's defaults.
# An option this XLA does not know would abort every process that imports JAX, so they are
# tried once, in a subprocess of the first pytest process (all together, then one by one if that
# fails); its workers and the subprocesses the tests start inherit the result.
_FAST_COMPILE = ("--xla_backend_optimization_level=0", "--xla_cpu_use_fusion_emitters=false",
                 "--xla_cpu_parallel_codegen_split_count=1")


def _xla_takes(flags):
    """``(whether a process with XLA_FLAGS=flags runs a jitted program, why not)``."""
    try:
        probe = subprocess.run([sys.executable, "-c", "import jax; jax.jit(lambda x: x + 1)(1.0)"],
                               env={**os.environ, "XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu"},
                               capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired:
        return False, "no answer in 120 s"
    return probe.returncode == 0, (probe.stderr.strip().splitlines()[-1:] or [f"exit status {probe.returncode}"])[0]


if "KALNAT_TEST_XLA_FLAGS_TRIED" not in os.environ and not os.environ.get("KALNAT_TEST_DEFAULT_XLA"):
    os.environ["KALNAT_TEST_XLA_FLAGS_TRIED"] = "1"
    _flags = os.environ.get("XLA_FLAGS", "")
    _new = [f for f in _FAST_COMPILE if f.split("=")[0] not in _flags]
    if _new and _xla_takes(" ".join([_flags] + _new).strip())[0]:
        _flags = " ".join([_flags] + _new).strip()
    else:
        for _flag in _new:
            _taken, _why = _xla_takes((_flags + " " + _flag).strip())
            if _taken:
                _flags = (_flags + " " + _flag).strip()
            else:
                print(f"tests/conftest.py: running without XLA option {_flag} ({_why})", file=sys.stderr)
    os.environ["XLA_FLAGS"] = _flags

# Python's cyclic garbage collector (CPython 3.11's thresholds): a test process holds about a
# million objects (JAX's traced, lowered and compiled programs), and each full collection went
# through them all, 31 times in tests/test_structured.py with Python's thresholds (700, 10, 10):
# 6.8 s of its ~120 s in one process, and 7.8 s with the younger generations'. With these, a
# full collection comes only where something asks for one (pytest at its end, the tests that
# check what is freed, the clearing below): one there (0.1 s), 1.1 s with the younger
# generations' (KALNAT_TEST_COMPILE_TIMES=1 prints each generation's seconds).
# Objects freed by their reference counts (most of them) are freed as before; cycles (a learner
# and the programs that close over it) wait for the next full collection.
gc.set_threshold(100_000, 50, 100)

# The BLAS and LAPACK libraries on one thread, set before they load: the tests call jitted
# factorisations outside kalnat.fit too (whose own limit is kalnat.blas), and two test workers
# on two cores gain nothing from OpenBLAS's threads but their contention with XLA's
# (tests/test_structured.py on 2 workers: 1 min 46 s against 2 min 12 s with
# OPENBLAS_NUM_THREADS=2 in the environment, one run each). tests/test_blas.py sets two to
# check the library's limit.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

# A developer's KALNAT_QUICK_COMPILE would change which programs the tests of the command see
# compiled quickly (tests/test_startup.py sets it where it tests it).
os.environ.pop("KALNAT_QUICK_COMPILE", None)

# The command's persistent compilation cache stays off in the tests that run it in-process
# (tests/test_startup.py turns it on in a folder of its own).
os.environ.setdefault("KALNAT_NO_CACHE", "1")

# One persistent compilation cache for the whole run, shared by the test workers and the
# subprocesses they start: a program that several of them compile (common shapes, the bank's
# members, the command's scans) is compiled once. A fresh folder per run (its controller makes
# it; the workers inherit the variable), deleted at the end; every program is kept, however
# quick to compile.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    import atexit
    import shutil
    import tempfile

    _cache = tempfile.mkdtemp(prefix="kalnat-tests-jax-")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import jax  # noqa: E402

# Exactness checks run in float64 (docs/method.md: equivalences hold to rounding).
jax.config.update("jax_enable_x64", True)

import jax.monitoring  # noqa: E402
import pytest  # noqa: E402

# Each compiled XLA CPU program keeps memory maps of its own while JAX caches it (here 3 for an
# operation run outside jit, 36 on average for a fit's programs and up to 217; 102 and up to 371
# with XLA's default options: python benchmarks/memory_maps.py), and Linux allows a process 65 530
# (vm.max_map_count): a test worker that had compiled some 2 000 programs failed to map the next
# one ("LLVM compilation error: Cannot allocate memory") and crashed in XLA's compiler. After a
# test, a worker past MAPS_BEFORE_CLEARING drops JAX's caches; programs used again come back from
# the persistent cache above. A clearing costs seconds (freeing the programs, and the full
# collection before it: 7 s at 32 000 maps), and in two full runs without one the most a worker
# held was 30 953 in one and at least 34 760 (its count at the end) in the other, so a run rarely
# clears at all. What is left above the bound (25 530 maps: some 69 programs of 371 maps in one
# test) also takes the maps that are not programs' (imports, threads, large arrays: ~1 300 for the
# libraries here).
MAPS_LIMIT = 65_530
MAPS_BEFORE_CLEARING = 40_000
MAPS_HEADROOM = 16_000  # a clearing that leaves many maps (live programs): the next bound is above them
_MAPS = "/proc/self/maps"
_clear_above = [MAPS_BEFORE_CLEARING]
# Reading /proc/self/maps takes 0.6–1 µs a map (the same benchmark): after every test it took
# 3.6–4.1 s of each worker's time in a full run (495 and 537 reads). So a worker counts the
# programs JAX loads (each one compiled, or read from the persistent cache, reports a backend
# compile: the same event for jit, operations run outside jit and lower().compile()), and reads
# its maps only once so many programs could have taken it past the bound, at MAPS_PER_PROGRAM each
# (more than any program above), or after READ_EVERY tests, should the count stop (a listener
# removed).
MAPS_PER_PROGRAM = 400
READ_EVERY = 50
_BACKEND_COMPILE = "/jax/core/compile/backend_compile_duration"
_programs_since, _tests_since = [0], [0]  # since the maps were last read


def _maps() -> int:
    with open(_MAPS, "rb") as f:
        return f.read().count(b"\n")


def _count_program(event, seconds, **_):
    if event == _BACKEND_COMPILE:
        _programs_since[0] += 1  # (a count lost to two threads compiling at once is one program)


jax.monitoring.register_event_duration_secs_listener(_count_program)
jax.jit(lambda x: x + 1).lower(1.0).compile()  # (in a worker, a hit in the cache the controller wrote)
_counting = _programs_since[0] > 0  # a JAX that no longer reports it: the maps are read after every test
_HAS_MAPS = os.path.exists(_MAPS)  # Linux
_maps_read, _programs_since[0] = [_maps() if _HAS_MAPS else 0], 0


def _may_pass_the_bound() -> bool:
    _tests_since[0] += 1
    return (not _counting or _tests_since[0] >= READ_EVERY
            or _maps_read[0] + MAPS_PER_PROGRAM * _programs_since[0] > _clear_above[0])


@pytest.fixture(autouse=True)
def _release_compiled_programs():
    yield
    if not (_HAS_MAPS and _may_pass_the_bound()):
        return
    _maps_read[0], _programs_since[0], _tests_since[0] = _maps(), 0, 0
    if _maps_read[0] > _clear_above[0]:
        gc.collect()  # the learners no test holds, and the programs that close over them, first
        jax.clear_caches()
        _maps_read[0] = _maps()
        _clear_above[0] = max(MAPS_BEFORE_CLEARING, min(_maps_read[0] + MAPS_HEADROOM, MAPS_LIMIT - MAPS_HEADROOM))


# The order in which the workers are handed files (--dist loadfile, --no-loadscope-reorder): the
# two whose module fixture starts processes before their first test (the 8-device run, 17–20 s;
# the multi-host pair, 6–7 s) first, then the files with the most tests (about xdist's own
# order, which counts the tests left after -k or -m). With their few tests xdist handed those
# two out last, and one worker could run the 8-device run while the other had nothing left.
_FIRST = ("test_sharded.py", "test_multihost.py")


def _file(item) -> str:
    return item.nodeid.split("::")[0]


def pytest_collection_modifyitems(items):
    tests = collections.Counter(_file(item) for item in items)
    first = {name: i for i, name in enumerate(_FIRST)}
    # sorted is stable: a file's tests keep their order
    items.sort(key=lambda item: (first.get(item.path.name, len(_FIRST)), -tests[_file(item)], _file(item)))


@pytest.fixture
def open_paths():
    """A function giving the paths this process holds open (Linux's /proc/self/fd)."""
    def paths():
        found = set()
        for fd in os.listdir("/proc/self/fd"):
            try:
                found.add(os.readlink(os.path.join("/proc/self/fd", fd)))
            except OSError:  # the listing's own descriptor, closed by now
                pass
        return found
    return paths


@pytest.fixture
def compiled_programs():
    """A context manager listing the programs JAX loads in its block, each one compiled or read
    from the persistent cache (one backend compile each, as the maps' count above):
    ``with compiled_programs() as programs: …`` then ``len(programs)``."""
    import contextlib

    @contextlib.contextmanager
    def listing():
        programs = []

        def listen(event, seconds, **_):
            if event == _BACKEND_COMPILE:
                programs.append(seconds)

        jax.monitoring.register_event_duration_secs_listener(listen)
        try:
            yield programs
        finally:
            jax.monitoring.unregister_event_duration_listener(listen)
    return listing


# KALNAT_TEST_COMPILE_TIMES=1: where the suite's seconds go in JAX (the README quotes a run).
# Each pytest process adds up JAX's own timings of tracing, lowering and compiling
# (jax.monitoring), and the seconds of Python's garbage collections, and leaves them in a folder
# the controller made; the controller prints their sums. The subprocesses the tests start (the
# 8-device run, Dask's workers) are not counted.
if os.environ.get("KALNAT_TEST_COMPILE_TIMES") == "1":
    import json
    import shutil
    import tempfile

    if "KALNAT_TEST_COMPILE_TIMES_DIR" not in os.environ:  # the controller (or a run without workers)
        os.environ["KALNAT_TEST_COMPILE_TIMES_DIR"] = tempfile.mkdtemp(prefix="kalnat-tests-times-")
    _times = collections.defaultdict(lambda: [0.0, 0])

    def _timed(event, seconds, **_):
        if event.endswith("compile_time_saved_sec"):  # an estimate, not time spent
            return
        _times[event][0] += seconds
        _times[event][1] += 1

    jax.monitoring.register_event_duration_secs_listener(_timed)

    import time

    _collecting = [0.0]

    def _collection(phase, info):  # Python's cyclic garbage collector, each generation apart
        if phase == "start":
            _collecting[0] = time.perf_counter()
        else:
            _timed(f"Python's garbage collector, generation {info['generation']}",
                   time.perf_counter() - _collecting[0])

    gc.callbacks.append(_collection)

    def pytest_sessionfinish(session):  # a worker's, before it tells the controller it is done
        with open(os.path.join(os.environ["KALNAT_TEST_COMPILE_TIMES_DIR"], f"{os.getpid()}.json"), "w") as f:
            json.dump(_times, f)

    def pytest_terminal_summary(terminalreporter):
        if os.environ.get("PYTEST_XDIST_WORKER"):
            return
        folder, sums = os.environ["KALNAT_TEST_COMPILE_TIMES_DIR"], collections.defaultdict(lambda: [0.0, 0])
        for name in os.listdir(folder):
            with open(os.path.join(folder, name)) as f:
                for event, (seconds, count) in json.load(f).items():
                    sums[event][0] += seconds
                    sums[event][1] += count
        if os.path.basename(folder).startswith("kalnat-tests-times-"):  # the one made above
            shutil.rmtree(folder, ignore_errors=True)
        terminalreporter.section("JAX's time and Python's garbage collections in the pytest processes, "
                                 "not their subprocesses (KALNAT_TEST_COMPILE_TIMES)")
        for event, (seconds, count) in sorted(sums.items(), key=lambda kv: -kv[1][0]):
            terminalreporter.write_line(f"{seconds:8.1f} s {count:7d}  {event}")


# A test worker that has finished (its results are with the controller, which waits for the
# process to end) leaves at once. That skips every exit function registered before this one, and
# Python's teardown: JAX's (clear_backends, clear_caches) freed the thousands of programs the
# worker compiled one by one, and with Python's teardown took 3–6 s after the last test, which
# the whole run waited for (the controller's teardown of its workers: 5.5 s in one full run, 1.7 s
# with this). Also skipped: logging's, multiprocessing's and weakref.finalize's, which the tests
# leave nothing to (no forked pools once JAX is imported, temporary folders in `with` blocks).
# Registered when the worker's pytest is done, so that exit functions registered later still run
# first; threads that are not daemons have been joined by then.
def pytest_unconfigure(config):
    if hasattr(config, "workerinput"):
        import atexit

        atexit.register(_leave_at_once)


def _leave_at_once():
    from kalnat.cli import _flushed  # the command's own quick exit flushes the same way

    _flushed()
    os._exit(0)
