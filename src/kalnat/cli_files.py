"""The files and folders the commands write: checked before any work, written whole or not at all.

A path the command cannot write is a usage error naming its option, before a row is read (not
a traceback after the stream was learned); an output file appears under its name only once it
is complete, so a run stopped by a bad row leaves neither a truncated file nor a file of the same
name that was there before it overwritten (a device or a pipe, such as ``/dev/null``, is written
in place).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import sys

import click


def check_folder(path: str, option: str) -> None:
    """A usage error for ``option`` unless the folder ``path`` exists or can be made: its
    nearest existing ancestor a folder this process can write in."""
    if not path:
        raise click.BadParameter("an empty path", param_hint=option)
    if os.path.isdir(path):
        if not os.access(path, os.W_OK):
            raise click.BadParameter(f"cannot write in the folder {path} (permission denied)", param_hint=option)
        return
    if os.path.exists(path):
        raise click.BadParameter(f"{path} is a file, not a folder", param_hint=option)
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise click.BadParameter(f"cannot make the folder {path}: {parent} is a file", param_hint=option)
    if not os.access(parent, os.W_OK):
        raise click.BadParameter(f"cannot make the folder {path} in {parent} (permission denied)", param_hint=option)


# What `kalnat learn` writes in its report folder (and `kalnat predict` reads from it), besides
# its figures (*.png)
REPORT_FILES = ("metrics.json", "model.npz", "keyed_model.npz", "per_key.csv")


def check_output(path, option: str, data=None, report=None) -> None:
    """A usage error for ``option`` where the output file ``path`` is the input file ``data``
    (which it would replace: the data would be lost), or a file of the report folder ``report``
    (one would overwrite the other, or the model the command reads)."""
    if path is None or path == "-":
        return
    if data is not None and data != "-" and os.path.isfile(data) and os.path.exists(path) \
            and os.path.samefile(path, data):
        raise click.BadParameter(f"{path} is the data file: the data would be replaced", param_hint=option)
    if report is not None:
        real, folder = os.path.realpath(path), os.path.realpath(report)
        if os.path.dirname(real) == os.path.join(folder, "shards") or os.path.dirname(real) == folder and (
                os.path.basename(real) in REPORT_FILES or real.endswith(".png")):   # (shards/: a Dask run's model)
            raise click.BadParameter(f"{path} is the report folder's {os.path.relpath(real, folder)}", param_hint=option)


def _listed(files: dict) -> set:
    """The names a report's metrics.json lists as its files (``"files"``: the model, the
    per-key scores, the figures), those that name a file or folder in the report folder only."""
    names = set(files.get("plots") or []) | {files.get(k) for k in ("model", "per_key")}
    return {n for n in names if isinstance(n, str) and n.rstrip("/") not in ("", ".", "..")
            and os.path.basename(n.rstrip("/")) == n.rstrip("/")}


def remove_stale(folder: str, files: dict) -> None:
    """Removes from the report folder what the report there before listed as its files and this
    one (``files``, its metrics.json's) does not write: a bank's figure, a keyed model and its
    per-key scores left beside a single filter's report would pass for this run's."""
    try:
        with open(os.path.join(folder, "metrics.json")) as f:
            before = json.load(f).get("files") or {}
        stale = _listed(before) - _listed(files)
    except (OSError, ValueError, AttributeError, TypeError):  # no report there, or not one of ours
        return
    for name in stale:
        path = os.path.join(folder, name.rstrip("/"))
        with contextlib.suppress(OSError):
            if name.endswith("/") and os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path)
            elif os.path.isfile(path) or os.path.islink(path):
                os.remove(path)


def write_json(path: str, obj) -> None:
    """``obj`` as strict JSON (what any parser reads): a float that is not finite (a diverged
    run's score) as ``null``, where Python's json would write NaN or Infinity."""
    def strict(x):
        if isinstance(x, float) and not math.isfinite(x):
            return None
        if isinstance(x, dict):
            return {k: strict(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [strict(v) for v in x]
        return x

    with open(path, "w") as f:
        json.dump(strict(obj), f, indent=2, allow_nan=False)


@contextlib.contextmanager
def folder_for(path, folder: str, option: str):
    """A block that writes the file ``path`` inside the report ``folder``, not yet made (``kalnat
    learn --out R --predictions R/p.csv``): the folder is made first, and on an exception every
    folder made for it (``--out a/b/R``: a, b and R where none was there) is removed again,
    innermost first, while empty. Any other ``path`` (None, ``-``, elsewhere): nothing done."""
    if path in (None, "-") or os.path.isdir(folder) or \
            os.path.dirname(os.path.realpath(path)) != os.path.realpath(folder):
        yield
        return
    outermost = os.path.abspath(folder)
    while not os.path.exists(os.path.dirname(outermost)):
        outermost = os.path.dirname(outermost)
    make_folder(folder, option)
    try:
        yield
    except BaseException:
        made = os.path.abspath(folder)
        while True:
            with contextlib.suppress(OSError):
                os.rmdir(made)
            if made == outermost:
                break
            made = os.path.dirname(made)
        raise


def make_folder(path: str, option: str) -> None:
    """``os.makedirs(path)``, its failure a usage error for ``option``."""
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as err:
        raise click.BadParameter(f"cannot make the folder {path} ({err.strerror})", param_hint=option) from None


@contextlib.contextmanager
def output_file(path, option: str):
    """The CSV file ``path`` open for writing (``None`` for no path, ``"-"`` for standard output),
    written under a temporary name in its folder and renamed to ``path`` when the block ends
    without an exception; on an exception the temporary file is removed. A path that cannot be
    written is a usage error for ``option``, raised on entering."""
    if path is None or path == "-":
        yield None if path is None else sys.stdout
        return
    if os.path.isdir(path):
        raise click.BadParameter(f"{path} is a folder", param_hint=option)
    real = os.path.realpath(path)   # through a link: the file it names is replaced, not the link
    folder = os.path.dirname(real)
    regular = not os.path.exists(real) or os.path.isfile(real)
    if not regular or not os.access(folder, os.W_OK):
        # a device, a pipe (/dev/null, /dev/stdout, a process substitution), or a file in a
        # folder this process cannot write in: written in place, as given
        try:
            file = open(path, "w", newline="")
        except OSError as err:
            raise click.BadParameter(f"cannot write {path} ({err.strerror})", param_hint=option) from None
        with file:
            yield file
        return
    tmp = os.path.join(folder, f".{os.path.basename(real)}.{os.getpid()}.part")
    try:
        file = open(tmp, "w", newline="")
        if os.path.exists(real):
            shutil.copymode(real, tmp)   # the replaced file's permissions, not the umask's
    except OSError as err:
        raise click.BadParameter(f"cannot write {path} ({err.strerror})", param_hint=option) from None
    try:
        with file:
            yield file
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
    os.replace(tmp, real)
