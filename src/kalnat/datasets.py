"""Real data sets bundled inside installed packages, and chunked CSV streaming.

Nothing here downloads: the data sets are the ones scikit-learn ships in its wheel (and
river's bundled ones when river is installed). A CSV file, or standard input, is read in
chunks of rows so a file larger than memory can be learned; every problem (a row with the
wrong number of fields, a non-numeric or empty value, a missing column) is reported as a
:class:`DataError` naming the file, the line and the column, or skipped and counted when
``skip_bad_rows`` is set.

A stream is an iterator of :class:`Chunk` s; :func:`open_source` gives one for a CSV path,
``-`` (standard input) or a bundled data set's name.
"""

from __future__ import annotations

import csv
import importlib.util
import io
import os
import stat
import sys
import tempfile
import warnings
from dataclasses import dataclass, field
from typing import Callable, Iterator, NamedTuple, Optional, Sequence

import numpy as np

__all__ = [
    "DataError", "DatasetInfo", "Chunk", "Source", "TargetCoder", "available", "describe",
    "is_dataset", "load", "open_source", "infer_task", "DEFAULT_DATASET",
]

DEFAULT_DATASET = "breast_cancer"
_TARGET_NAMES = ("target", "label", "class", "y")


class DataError(ValueError):
    """A problem in the input data, located by file, line (1-based) and column."""

    def __init__(self, source: str, message: str, line: Optional[int] = None,
                 column: Optional[str] = None):
        self.source, self.line, self.column, self.reason = source, line, column, message
        where = source
        if line is not None:
            where += f", line {line}"
        if column is not None:
            where += f", column {column!r}"
        super().__init__(f"{where}: {message}")


# ---- bundled data sets ------------------------------------------------------------------

@dataclass(frozen=True)
class DatasetInfo:
    """One bundled data set: where it comes from, its size and its task (a family name)."""

    name: str
    package: str
    n_rows: int
    n_features: int
    task: str
    n_classes: Optional[int]
    order: str
    loader: Callable = field(repr=False, compare=False)

    @property
    def task_text(self) -> str:
        if self.task == "bernoulli":
            return "binary"
        if self.task == "categorical":
            return f"{self.n_classes} classes"
        return {"gaussian": "regression", "poisson": "counts"}[self.task]


def _sklearn(loader_name):
    def load_fn():
        if loader_name in _TABLES:
            read = _sklearn_table(*_TABLES[loader_name])
            if read is not None:
                return read
        import sklearn.datasets as skd

        bunch = getattr(skd, loader_name)()
        names = [str(n) for n in getattr(bunch, "feature_names", [])] or [
            f"x{i}" for i in range(bunch.data.shape[1])]
        labels = getattr(bunch, "target_names", None)  # class k's name (regression sets: none)
        classes = [str(c) for c in labels] if labels is not None else None
        return np.asarray(bunch.data, np.float64), np.asarray(bunch.target), names, "target", classes
    return load_fn


def _sklearn_table(file, names, classes):
    """A scikit-learn set whose file in ``sklearn/datasets/data`` holds its rows as they are
    (each row's features, then its class index), read without importing scikit-learn, whose
    import (~0.9 s, SciPy's submodules with it) is most of a first ``kalnat learn``'s wait past
    JAX's. ``names`` and ``classes`` are what the package's loader gives; ``classes=None``: the
    file's header names them. ``None`` where the file is not there or not of that form (its
    header's counts, its columns, its class indices): the caller then reads the set through
    scikit-learn's loader, which tests/test_datasets.py checks this agrees with exactly."""
    try:
        with warnings.catch_warnings():   # a damaged file's warnings (an empty one, a NaN label): refused below
            warnings.simplefilter("ignore")
            spec = importlib.util.find_spec("sklearn")   # finds the package without running it
            if spec is None or not spec.submodule_search_locations:
                return None
            path = os.path.join(list(spec.submodule_search_locations)[0], "datasets", "data", file)
            if file.endswith(".gz"):  # no header
                table, header = np.loadtxt(path, delimiter=",", dtype=np.float64, ndmin=2), None
            else:
                with open(path, newline="", encoding="utf-8") as f:
                    rows = list(csv.reader(f))
                header, table = rows[0], np.asarray(rows[1:], dtype=np.float64)
                classes = header[2:]
                if (int(header[0]), int(header[1])) != (table.shape[0], len(names)):
                    return None
            if table.ndim != 2 or table.shape[1] != len(names) + 1 or not np.all(np.isfinite(table[:, -1])):
                return None
            y = table[:, -1].astype(int)   # the loaders' dtype (NumPy's default integer)
    except Exception:  # noqa: BLE001  (any file not of that form, or not there: the loader reads the set)
        return None
    if np.any(y != table[:, -1]) or np.any(y < 0) or np.any(y >= len(classes)):
        return None
    return np.ascontiguousarray(table[:, :-1]), y, list(names), "target", [str(c) for c in classes]


# What scikit-learn's loaders name these sets' features (tests/test_datasets.py compares them).
_CANCER_BASE = ("radius", "texture", "perimeter", "area", "smoothness", "compactness", "concavity",
                "concave points", "symmetry", "fractal dimension")
_CANCER = ([f"mean {n}" for n in _CANCER_BASE] + [f"{n} error" for n in _CANCER_BASE]
           + [f"worst {n}" for n in _CANCER_BASE])
_IRIS = ["sepal length (cm)", "sepal width (cm)", "petal length (cm)", "petal width (cm)"]
_WINE = ["alcohol", "malic_acid", "ash", "alcalinity_of_ash", "magnesium", "total_phenols", "flavanoids",
         "nonflavanoid_phenols", "proanthocyanins", "color_intensity", "hue", "od280/od315_of_diluted_wines",
         "proline"]
_DIGITS = [f"pixel_{r}_{c}" for r in range(8) for c in range(8)]
# loader → (its file, its features' names, its classes' names where the file has no header)
_TABLES = {"load_breast_cancer": ("breast_cancer.csv", _CANCER, None), "load_iris": ("iris.csv", _IRIS, None),
           "load_wine": ("wine_data.csv", _WINE, None), "load_digits": ("digits.csv.gz", _DIGITS, range(10))}


def _river(cls_name, label_map=None):
    def load_fn():
        from river import datasets as rd

        rows = list(getattr(rd, cls_name)())
        names = list(rows[0][0].keys())
        X = np.array([[float(x[k]) for k in names] for x, _ in rows], np.float64)
        ys = [y for _, y in rows]
        classes = None
        if label_map == "bool":
            y = np.array([int(bool(v)) for v in ys])
        elif label_map == "sorted":
            classes = sorted({str(v) for v in ys})
            y = np.array([classes.index(str(v)) for v in ys])
        else:
            y = np.array(ys, np.float64)
        return X, y, names, "target", classes
    return load_fn


_SKLEARN = [
    DatasetInfo("breast_cancer", "scikit-learn", 569, 30, "bernoulli", 2, "partly clustered",
                _sklearn("load_breast_cancer")),
    DatasetInfo("digits", "scikit-learn", 1797, 64, "categorical", 10, "cycles 0..9 early",
                _sklearn("load_digits")),
    DatasetInfo("diabetes", "scikit-learn", 442, 10, "gaussian", None, "none",
                _sklearn("load_diabetes")),
    DatasetInfo("iris", "scikit-learn", 150, 4, "categorical", 3, "sorted by class",
                _sklearn("load_iris")),
    DatasetInfo("wine", "scikit-learn", 178, 13, "categorical", 3, "sorted by class",
                _sklearn("load_wine")),
]

# river's sets that ship inside its wheel (its RemoteDatasets download, so are not listed).
_RIVER = [
    DatasetInfo("phishing", "river", 1250, 9, "bernoulli", 2, "none", _river("Phishing", "bool")),
    DatasetInfo("image_segments", "river", 2310, 18, "categorical", 7, "none",
                _river("ImageSegments", "sorted")),
    DatasetInfo("trump_approval", "river", 1001, 6, "gaussian", None, "time-ordered, drifting",
                _river("TrumpApproval")),
    DatasetInfo("chick_weights", "river", 578, 3, "gaussian", None, "time then chick",
                _river("ChickWeights")),
]


def river_installed() -> bool:
    """Whether river (the optional extra ``kalnat[river]``) can be imported."""
    return importlib.util.find_spec("river") is not None


def available() -> list[DatasetInfo]:
    """The bundled data sets usable in this environment (river's only when installed)."""
    return list(_SKLEARN) + (list(_RIVER) if river_installed() else [])


def is_dataset(name: str) -> bool:
    return any(d.name == name for d in available())


def describe(name: str) -> DatasetInfo:
    for d in available():
        if d.name == name:
            return d
    known = ", ".join(d.name for d in available())
    hint = "" if river_installed() else " (river's sets appear when river is installed)"
    raise DataError(name, f"no such file or bundled data set; bundled sets: {known}{hint}")


def load(name: str):
    """``(X (n, p) float64, y (n,), feature_names, target_name)`` of a bundled data set
    (for a classification set, ``y`` holds class indices; :func:`class_names` their names)."""
    return describe(name).loader()[:4]


def class_names(name: str) -> Optional[list]:
    """The names of a bundled classification set's classes, in the order of its class indices
    (breast_cancer: ``["malignant", "benign"]``); None for a regression set or unnamed labels."""
    return describe(name).loader()[4]


# ---- streams ----------------------------------------------------------------------------

class Chunk(NamedTuple):
    """A block of consecutive good rows.

    Attributes:
      X: ``(n, p)`` float64 features.
      y: ``(n,)`` raw targets (strings from a CSV, numbers from a bundled set).
      lines: ``(n,)`` line numbers (1-based, in the file; row numbers for a bundled set).
      skipped: ``[(line, column, reason), …]`` rows dropped by ``skip_bad_rows``.
      keys: ``(n,)`` the key column's values as text (``open_source(key=…)``), else ``None``.
    """

    X: np.ndarray
    y: np.ndarray
    lines: np.ndarray
    skipped: list
    keys: Optional[np.ndarray] = None


@dataclass
class Source:
    """An opened stream: names of its columns and an iterator of :class:`Chunk` s."""

    name: str
    feature_names: list
    target_name: Optional[str]
    chunks: Iterator[Chunk]
    task_hint: Optional[str] = None
    n_classes_hint: Optional[int] = None
    n_rows: Optional[int] = None
    class_names: Optional[list] = None  # a bundled set's classes, in the order of its indices
    key_name: Optional[str] = None
    # at most this many data rows, where cheaply known (a bundled set's rows, a small file's
    # lines past its header): the command compiles a short job quickly (kalnat.cli_runner)
    rows_at_most: Optional[int] = None
    # closes the file the chunks are read from (a CSV path's; not standard input)
    close_file: Optional[Callable[[], None]] = field(default=None, repr=False, compare=False)

    def close(self):
        """Closes the file the stream reads (a chunk read after it is an error, not the end).
        Reading to the end closes it too; a run that stops before then closes it here (``with
        open_source(…) as source``), not whenever the garbage collector gets to it."""
        if self.close_file is not None:
            self.close_file()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def open_source(data: str, *, target: Optional[str] = None, chunk_rows: int = 10_000,
                skip_bad_rows: bool = False, require_target: bool = True,
                feature_names: Optional[Sequence[str]] = None, delimiter: str = ",",
                shuffle_seed: Optional[int] = None, stdin=None, key: Optional[str] = None,
                cache_dir: Optional[str] = None) -> Source:
    """Opens a CSV path, ``-`` (standard input) or a bundled data set's name as a stream.

    Args:
      target: the target column; default a column named target/label/class/y, else the last.
      chunk_rows: rows per chunk.
      skip_bad_rows: drop (and count) malformed rows instead of raising :class:`DataError`.
      require_target: False for prediction, where the target column may be absent.
      feature_names: the expected feature columns (prediction); by default every column but
        the target.
      shuffle_seed: shuffle the rows of a bundled set with this seed (CSV streams keep order).
      key: a column whose values (as text) name the stream each row belongs to (one model per
        key); not a feature. CSV only.
      cache_dir: a folder where a bundled set is kept, once read, in a form that loads in
        milliseconds (``None``: read from its package every time).
    """
    if key is not None and data != "-" and not os.path.exists(data) and is_dataset(data):
        raise DataError(data, f"--key applies to CSV files; the bundled data set {data!r} has no key column")
    if data != "-" and not os.path.exists(data) and is_dataset(data):
        return _dataset_source(data, target, chunk_rows, feature_names, shuffle_seed, cache_dir)
    if data != "-" and not os.path.exists(data):
        describe(data)  # raises with the list of bundled sets
    if shuffle_seed is not None:
        raise DataError(data, "--shuffle applies to bundled data sets only; a CSV stream is read in order")
    return _csv_source(data, target, chunk_rows, skip_bad_rows, require_target, feature_names,
                       delimiter, stdin, key)


# Bumped when a loader above changes what it returns: older cached copies are then not read.
_CACHE_FORMAT = 1


def _load_cached(info: DatasetInfo, folder: Optional[str]):
    """``info.loader()``, kept as a ``.npz`` in ``folder`` after the first call (``None``: not
    kept). Parsing a set's text costs milliseconds, and importing scikit-learn, for a set
    :func:`_sklearn_table` does not read (diabetes, which its loader scales) or river, ~1 s, as
    long as the rest of a warm ``kalnat learn`` on it. The file's name holds the package's version, so an upgrade
    reads the set afresh; a copy that cannot be read is replaced."""
    if folder is None:
        return info.loader()
    from importlib.metadata import PackageNotFoundError, version

    try:
        stamp = version(info.package)
    except PackageNotFoundError:
        return info.loader()
    path = os.path.join(folder, f"{info.name}-{info.package}-{stamp}-{_CACHE_FORMAT}.npz")
    if os.path.exists(path):
        try:
            with np.load(path, allow_pickle=False) as f:
                classes = [str(c) for c in f["classes"]] if "classes" in f else None
                return f["X"], f["y"], [str(n) for n in f["names"]], str(f["target_name"]), classes
        except Exception:  # noqa: BLE001  (any copy that does not read back whole: truncated, a bad CRC, …)
            pass  # read from the package again, and the copy replaced below
    X, y, names, target_name, classes = info.loader()
    parts = dict(X=X, y=y, names=np.asarray(names, str), target_name=np.asarray(target_name, str))
    if classes is not None:
        parts["classes"] = np.asarray(classes, str)
    tmp = None
    try:
        os.makedirs(folder, exist_ok=True)
        # written whole under a name of its own, then renamed: a reader never sees half a file
        fd, tmp = tempfile.mkstemp(dir=folder, suffix=".npz")
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **parts)
        os.replace(tmp, path)
        tmp = None
    except OSError:
        pass  # a read-only or full disk: the set is loaded again next time
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.remove(tmp)
    return X, y, names, target_name, classes


def _dataset_source(name, target, chunk_rows, feature_names, shuffle_seed, cache_dir=None):
    info = describe(name)
    X, y, names, target_name, classes = _load_cached(info, cache_dir)
    if classes is not None:  # the stream speaks in class names, as a CSV of labels would
        y = np.asarray(classes, dtype=object)[np.asarray(y, np.int64)]
    if target not in (None, target_name):
        raise DataError(name, f"this data set's target column is {target_name!r}, not {target!r}")
    if feature_names is not None and list(feature_names) != names:
        raise DataError(name, "its columns differ from the model's features")
    order = np.arange(len(y))
    if shuffle_seed is not None:
        order = np.random.default_rng(shuffle_seed).permutation(len(y))
    X, y = X[order], y[order]

    def chunks():
        for s in range(0, len(y), chunk_rows):
            e = min(s + chunk_rows, len(y))
            yield Chunk(X[s:e], y[s:e], order[s:e] + 1, [])

    return Source(name, names, target_name, chunks(), info.task, info.n_classes, len(y), classes,
                  rows_at_most=len(y))


SMALL_FILE_BYTES = 16 * 2**20  # lines counted in at most ~10 ms


def _lines_after(stream, line) -> Optional[int]:
    """How many lines follow line ``line`` (the header) of the open ``stream``, if it is a
    regular file of at most :data:`SMALL_FILE_BYTES`; else ``None``. A bound on its data rows
    (a quoted field's line breaks and blank lines count too). Read from the file's descriptor at
    its start, where the platform allows (``os.pread``): the stream's own position is left as it
    is (a path such as /dev/stdin, opened again, shares the position on some systems). Lines
    end as the csv module ends them: ``\\n``, ``\\r\\n`` or ``\\r``."""
    try:
        fd = stream.fileno()
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_size > SMALL_FILE_BYTES:
            return None  # a pipe or a terminal (read, its rows would be lost), or a large file
        if hasattr(os, "pread"):
            data = os.pread(fd, info.st_size, 0)
        else:  # Windows: the file's name opened again (no /dev/stdin there)
            with open(stream.name, "rb") as f:
                data = f.read()
    except (OSError, AttributeError, ValueError):  # (io.UnsupportedOperation is both)
        return None  # no descriptor (an in-memory stream) or unreadable: unknown
    ends = data.count(b"\n") + data.count(b"\r") - data.count(b"\r\n")
    return ends + (not data.endswith((b"\n", b"\r"))) - line


def _without_mark(lines):
    """The text lines of ``lines`` less a byte-order mark at its start (Excel's "CSV UTF-8"
    writes one), which would otherwise be part of the first column's name: the column 'y' read
    as '\ufeffy', not the target, and not a feature a model learned from the same data unmarked."""
    first = next(lines, "")
    yield first[1:] if first.startswith("\ufeff") else first
    yield from lines


def _csv_source(path, target, chunk_rows, skip_bad_rows, require_target, feature_names,
                delimiter, stdin, key=None):
    label = "<stdin>" if path == "-" else path
    if path == "-":
        stream = stdin if stdin is not None else sys.stdin
        if isinstance(stream, (io.BufferedIOBase, io.RawIOBase)):  # a binary stream
            stream = io.TextIOWrapper(stream, encoding="utf-8", newline="")
        close = False
    else:
        try:
            stream = open(path, newline="", encoding="utf-8")
        except OSError as err:
            raise DataError(label, f"cannot open ({err.strerror})") from None
        close = True
    try:
        return _csv_stream(stream, close, label, target=target, chunk_rows=chunk_rows,
                           skip_bad_rows=skip_bad_rows, require_target=require_target,
                           feature_names=feature_names, delimiter=delimiter, key=key)
    except BaseException:  # any error before the stream is handed over (a refused header): closed
        if close:
            stream.close()
        raise


def _csv_stream(stream, close, label, *, target, chunk_rows, skip_bad_rows, require_target, feature_names,
                delimiter, key):
    reader = csv.reader(_without_mark(stream), delimiter=delimiter)
    try:
        header = next(r for r in reader if r)
    except StopIteration:
        raise DataError(label, "empty file: expected a header row", line=1) from None
    except UnicodeDecodeError:
        raise DataError(label, f"not UTF-8 text (at or after line {reader.line_num + 1})") from None
    except csv.Error as err:
        raise DataError(label, f"unreadable CSV ({err})", line=reader.line_num) from None
    header = [h.strip() for h in header]
    header_line = reader.line_num
    dupes = sorted({h for h in header if header.count(h) > 1})
    if dupes:
        raise DataError(label, f"duplicate column names {dupes}", line=header_line)
    t_idx = _target_index(label, header, target, require_target, feature_names, header_line)
    k_idx = None
    if key is not None:
        if key not in header:
            raise DataError(label, f"no key column {key!r} in the header (columns: {', '.join(header)})",
                            line=header_line)
        k_idx = header.index(key)
        if k_idx == t_idx:
            raise DataError(label, f"the key column {key!r} is also the target; pass --target", line=header_line)
    if feature_names is None:
        names = [h for i, h in enumerate(header) if i not in (t_idx, k_idx)]
    else:
        missing = [f for f in feature_names if f not in header]
        if missing:
            shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
            raise DataError(label, f"missing feature column(s) the model was trained on: {shown}",
                            line=header_line)
        names = list(feature_names)
    f_idx = [header.index(n) for n in names]
    if not f_idx:
        raise DataError(label, "no feature columns besides the target", line=header_line)
    width = len(header)

    def chunks():
        try:
            rows, lines, skipped = [], [], []
            while True:
                try:
                    row = next(reader)
                except StopIteration:
                    break
                except UnicodeDecodeError:  # the text stream cannot resume: always fatal
                    raise DataError(label, f"not UTF-8 text (at or after line {reader.line_num + 1})") from None
                except csv.Error as err:
                    _bad(label, reader.line_num, None, f"unreadable CSV ({err})", skip_bad_rows, skipped)
                    continue
                if not row or (len(row) == 1 and not row[0].strip()):
                    continue  # blank line
                if len(row) != width:
                    if not skip_bad_rows and rows:  # report an earlier bad cell first
                        _parse(label, header, rows, lines, f_idx, t_idx, False, [])
                    _bad(label, reader.line_num, None,
                         f"expected {width} fields (as in the header), got {len(row)}",
                         skip_bad_rows, skipped)
                    continue
                rows.append(row)
                lines.append(reader.line_num)
                if len(rows) >= chunk_rows:
                    yield _parse(label, header, rows, lines, f_idx, t_idx, skip_bad_rows, skipped, k_idx)
                    rows, lines, skipped = [], [], []
            if rows or skipped:
                yield _parse(label, header, rows, lines, f_idx, t_idx, skip_bad_rows, skipped, k_idx)
        finally:
            if close:
                stream.close()

    tname = header[t_idx] if t_idx is not None else None
    return Source(label, names, tname, chunks(), key_name=key,
                  rows_at_most=_lines_after(stream, header_line), close_file=stream.close if close else None)


def _separator_hint(header) -> str:
    """A hint when the header looks split on another separator than the one given."""
    for name, sep in (("tab", "\t"), ("semicolon", ";"), ("space", " "), ("pipe", "|")):
        if len(header) == 1 and sep in header[0]:
            return f"; the header has one column containing {name}s: pass --delimiter {name}"
    return ""


def _target_index(label, header, target, require_target, feature_names, line):
    if target is not None:
        if target in header:
            return header.index(target)
        if require_target:
            raise DataError(label, f"no target column {target!r} in the header "
                                   f"(columns: {', '.join(header)}){_separator_hint(header)}", line=line)
        return None
    if not require_target:
        # Prediction: any column the model does not use as a feature is ignored.
        return None
    for i, h in enumerate(header):
        if h.lower() in _TARGET_NAMES:
            return i
    if len(header) < 2:
        raise DataError(label, "need at least two columns (features and a target)" + _separator_hint(header),
                        line=line)
    return len(header) - 1


def _bad(label, line, column, reason, skip, skipped):
    if not skip:
        raise DataError(label, reason + " (use --skip-bad-rows to skip such rows)", line=line,
                        column=column)
    skipped.append((int(line), column, reason))


# Values are standardised with running means and variances: a square must stay finite in
# float64 (and sums of many of them), so magnitudes beyond this are refused, located.
MAX_MAGNITUDE = 1e150


def _too_large(v) -> str:
    return (f"value {str(v).strip()!r} is too large (beyond ±{MAX_MAGNITUDE:g}, where standardising it "
            "overflows); rescale the column")


def _parse(label, header, rows, lines, f_idx, t_idx, skip, skipped, k_idx=None) -> Chunk:
    """Numeric features of a block of rows; a bad cell is located by line and column."""
    cells = np.array([[r[i] for i in f_idx] for r in rows], dtype=object).reshape(len(rows), len(f_idx))
    lines = np.asarray(lines, np.int64)
    try:
        X = cells.astype(np.float64)
        good = np.isfinite(X).all(axis=1)
    except ValueError:  # some cell is not a number: find which, row by row
        X = np.empty(cells.shape)
        good = np.ones(len(rows), bool)
        for k, row in enumerate(cells):
            for j, v in enumerate(row):
                try:
                    X[k, j] = float(v)
                except ValueError:
                    good[k] = False
                    what = "empty value" if not str(v).strip() else f"non-numeric value {str(v)!r}"
                    if not header[f_idx[j]] and not str(v).strip():  # a column with no name and no value
                        what += " (a column the header gives no name: a delimiter at the end of each line?)"
                    _bad(label, lines[k], header[f_idx[j]], what, skip, skipped)
                    break
        good &= np.isfinite(np.where(good[:, None], X, 0.0)).all(axis=1)
    huge = good & (np.abs(np.where(good[:, None], X, 0.0)) > MAX_MAGNITUDE).any(axis=1)
    for k in np.flatnonzero(huge):
        j = int(np.flatnonzero(np.abs(X[k]) > MAX_MAGNITUDE)[0])
        _bad(label, lines[k], header[f_idx[j]], _too_large(cells[k, j]), skip, skipped)
    good &= ~huge
    for k in np.flatnonzero(~good):
        if not any(s[0] == lines[k] for s in skipped):
            j = int(np.flatnonzero(~np.isfinite(X[k]))[0])
            _bad(label, lines[k], header[f_idx[j]], f"non-finite value {cells[k, j]!r}", skip, skipped)
    y = np.array([r[t_idx].strip() for r in rows], dtype=object) if t_idx is not None else \
        np.full(len(rows), None, dtype=object)
    keys = None
    if k_idx is not None:
        # learning, an empty key is a missing value, as an empty feature is, not a key named "";
        # predicting, it is a key never seen, predicted from the prior (key_seen = 0)
        keys = np.array([r[k_idx].strip() for r in rows], dtype=str)
        for k in np.flatnonzero(good & (keys == "") & (t_idx is not None)):
            _bad(label, lines[k], header[k_idx], "empty key", skip, skipped)
            good[k] = False
        keys = keys[good]
    return Chunk(X[good], y[good], lines[good], sorted(skipped, key=lambda s: s[0]), keys)


# ---- targets -----------------------------------------------------------------------------

def _canonical(v) -> str:
    """A label as text: ``1``, ``1.0`` and ``"1"`` are the same class."""
    s = str(v).strip()
    try:
        f = float(s)
    except ValueError:
        return s
    return str(int(f)) if np.isfinite(f) and f == int(f) else s


def infer_task(y, max_classes: int = 20):
    """``(family name, classes or None)`` guessed from a sample of raw targets.

    Numbers that are not all integers → gaussian; {0, 1} → bernoulli; a few non-negative
    integers → categorical over 0..max; more distinct non-negative integers including a
    zero → poisson; other integers → gaussian; text labels → bernoulli (two of them) or categorical.
    Empty cells are left out of the guess (they are reported, or skipped, as bad rows).
    """
    vals = [str(v).strip() for v in y]
    nums = []
    for v in (v for v in vals if v):  # an empty cell says nothing about the task (it is a bad row)
        try:
            nums.append(float(v))
        except ValueError:
            nums = None
            break
    if nums is None:
        classes = sorted({v for v in vals if v})
        return ("bernoulli" if len(classes) <= 2 else "categorical"), classes
    a = np.asarray(nums)
    a = a[np.isfinite(a)]
    if a.size == 0 or np.any(a != np.round(a)):
        return "gaussian", None
    distinct = np.unique(a)
    if set(distinct.tolist()) <= {0.0, 1.0}:
        return "bernoulli", ["0", "1"]
    if a.min() >= 0 and len(distinct) <= max_classes and a.max() < max_classes:
        return "categorical", [str(i) for i in range(int(a.max()) + 1)]
    if a.min() == 0:  # counts usually include zeros; large integers without any are amounts
        return "poisson", None
    return "gaussian", None


class TargetCoder:
    """Turns raw targets into what a family learns: class indices, counts or reals.

    ``classes`` (class labels as text) is fixed when the coder is made, from ``--classes``
    or the first chunk, so a label first seen later is an error (or a skipped row), never a
    silent change of the model's output size.
    """

    def __init__(self, family: str, classes: Optional[Sequence[str]] = None):
        self.family = family
        self.classes = [_canonical(c) for c in classes] if classes is not None else None
        if family in ("bernoulli", "categorical") and not self.classes:
            raise ValueError(f"{family}: the class labels are needed")
        if family == "bernoulli" and len(self.classes) != 2:
            raise ValueError(f"bernoulli needs exactly two classes, got {self.classes}")
        self._index = {c: i for i, c in enumerate(self.classes or [])}

    def encode(self, label, y, lines, column, skip, skipped):
        """``(values, good mask)``; a bad value raises :class:`DataError` unless skipped."""
        n = len(y)
        good = np.ones(n, bool)
        if self.classes is not None:
            out = np.zeros(n, np.int64)
            for k, v in enumerate(y):
                c = _canonical(v)
                if c in self._index:
                    out[k] = self._index[c]
                    continue
                good[k] = False
                reason = ("empty target" if not c else
                          f"label {c!r} is not one of the classes {self.classes} "
                          "(fixed from --classes or the first rows; pass --classes to list them all)")
                _bad(label, lines[k], column, reason, skip, skipped)
            return out, good
        if np.asarray(y).dtype.kind in "biuf":
            out = np.asarray(y, np.float64)
        else:
            out = np.empty(n)
            for k, v in enumerate(y):
                try:
                    out[k] = float(v)
                except (TypeError, ValueError):
                    out[k] = np.nan
        for k in np.flatnonzero(~np.isfinite(out) | ((out < 0) | (out != np.round(out)))
                                if self.family == "poisson" else ~np.isfinite(out)):
            good[k] = False
            v = str(y[k]).strip()
            reason = ("empty target" if not v else
                      f"count {v!r} is not a non-negative integer" if self.family == "poisson"
                      else f"non-numeric target {v!r}")
            _bad(label, lines[k], column, reason, skip, skipped)
        for k in np.flatnonzero(good & (np.abs(np.where(good, out, 0.0)) > MAX_MAGNITUDE)):
            good[k] = False
            _bad(label, lines[k], column, _too_large(y[k]), skip, skipped)
        return out, good
