"""The command's cache folder held within a size: the programs used least recently go first.

JAX's persistent compilation cache and the command's saved programs (:mod:`kalnat.saved`, the
subfolder ``programs``) only grow: each new shape, setting, kalnat or JAX version adds entries
and nothing removes them. JAX can bound its own entries (``jax_compilation_cache_max_size``),
but only with the ``filelock`` package and a lock and a second file per entry, and not the
saved programs beside them. So once a day (the time of a stamp file in the folder) the command
adds up both (those files alone, known by their names) and, when they hold more than
``KALNAT_CACHE_MAX_MB`` megabytes (default :data:`DEFAULT_MAX_MB`), removes the least
recently used until they hold :data:`KEEP` of it.

An entry's last use is its access time or, when later, its modification time: kalnat.saved
marks a program when it reads one, and reading a file moves its access time at least once a
day on Linux's default mounts (``relatime``); where access times are not kept (``noatime``,
often on Windows) JAX's entries go by the time they were written, oldest first.
A removed entry costs a later run its compilation, never a result (JAX reads a vanished entry
as a miss). The bundled data sets (``datasets``) are left alone: a few small files.
"""

from __future__ import annotations

import math
import os
import time

__all__ = ["MAX_MB_ENV", "DEFAULT_MAX_MB", "max_bytes", "maintain", "prune"]

MAX_MB_ENV = "KALNAT_CACHE_MAX_MB"
DEFAULT_MAX_MB = 1024     # some 100 000 entries (a used folder here: 1 472 entries, 9 kB on average)
KEEP = 0.8                # pruned to this share of the limit: not again at the next new program
EVERY_S = 24 * 3600       # added up at most once a day (that folder: 4–11 ms)
STAMP = ".pruned"
# what may be removed, by folder and name: JAX's entries (and the access-time files its own
# bound writes) and the saved programs; nothing else, so a folder given by KALNAT_CACHE_DIR that
# holds other files (the home folder, a data folder) keeps them
_PRUNED = (("", ("-cache", "-atime")), ("programs", (".program",)))


def max_bytes(environ=None) -> int:
    """The limit in bytes: ``KALNAT_CACHE_MAX_MB`` (a positive number of megabytes, 2²⁰ bytes
    each), else :data:`DEFAULT_MAX_MB`. Any other value is a ``ValueError`` naming it."""
    environ = os.environ if environ is None else environ
    text = environ.get(MAX_MB_ENV, "").strip()
    if not text:
        return DEFAULT_MAX_MB * 2**20
    try:
        mb = float(text)
    except ValueError:
        mb = math.nan
    if not (math.isfinite(mb) and mb > 0):
        raise ValueError(f"{MAX_MB_ENV}={text!r}: the compilation cache's limit must be a positive number of "
                         f"megabytes (KALNAT_NO_CACHE=1 turns the cache off)")
    return max(1, int(mb * 2**20))


def _entries(folder):
    """``(last use, bytes, path)`` of every file the pruning may remove (:data:`_PRUNED`)."""
    out = []
    for sub, endings in _PRUNED:
        try:
            listing = os.scandir(os.path.join(folder, sub))
        except OSError:
            continue
        with listing:
            for entry in listing:
                if not entry.name.endswith(endings):
                    continue
                try:
                    if not entry.is_file(follow_symlinks=False):
                        continue
                    st = entry.stat(follow_symlinks=False)
                except OSError:  # removed meanwhile
                    continue
                out.append((max(st.st_atime, st.st_mtime), st.st_size, entry.path))
    return out


def prune(folder: str, limit: int, keep: float = KEEP) -> list:
    """Where the entries of ``folder`` (JAX's and the saved programs) hold more than
    ``limit`` bytes, removes the least recently used until they hold at most ``keep · limit``.
    Returns the paths removed; a file that cannot be removed is left."""
    entries = _entries(folder)
    total = sum(size for _, size, _ in entries)
    removed = []
    if total <= limit:
        return removed
    for _, size, path in sorted(entries):
        if total <= keep * limit:
            break
        try:
            os.remove(path)
            removed.append(path)
        except FileNotFoundError:  # another process pruning at once removed it: gone all the same
            pass
        except OSError:  # not ours to remove: left, and still counted
            continue
        total -= size
    return removed


def maintain(folder: str, environ=None, now=None, every: float = EVERY_S) -> list:
    """:func:`prune` of ``folder`` to :func:`max_bytes`, unless done in the last ``every``
    seconds (the stamp file's time); the limit is read, and a bad one refused, every time.
    A folder that cannot be written is left as it is. Returns the paths removed."""
    limit = max_bytes(environ)
    now = time.time() if now is None else now
    stamp = os.path.join(folder, STAMP)
    try:
        if now - os.stat(stamp).st_mtime < every:
            return []
    except OSError:  # no stamp yet
        pass
    try:
        os.makedirs(folder, exist_ok=True)
        with open(stamp, "a"):
            pass
        os.utime(stamp, (now, now))
    except OSError:  # read-only: not added up at every run
        return []
    return prune(folder, limit)
