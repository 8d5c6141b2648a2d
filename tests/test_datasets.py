"""Bundled data sets, chunked CSV reading, located errors, target inference and coding."""

import gzip
import io
import os
import re
import warnings

import numpy as np
import pytest

from kalnat import datasets as ds


def _write(tmp_path, text, name="d.csv"):
    p = tmp_path / name
    p.write_text(text)
    return str(p)


def _all(source):
    chunks = list(source.chunks)
    X = np.concatenate([c.X for c in chunks]) if chunks else np.zeros((0, 0))
    y = np.concatenate([c.y for c in chunks]) if chunks else np.zeros(0)
    lines = np.concatenate([c.lines for c in chunks]) if chunks else np.zeros(0)
    skipped = [s for c in chunks for s in c.skipped]
    return X, y, lines, skipped, chunks


def test_bundled_sklearn_sets_are_listed_and_load():
    names = {d.name for d in ds.available()}
    assert {"breast_cancer", "digits", "diabetes", "iris", "wine"} <= names
    X, y, feats, target = ds.load("iris")
    assert X.shape == (150, 4) and y.shape == (150,) and len(feats) == 4
    info = ds.describe("digits")
    assert (info.n_rows, info.n_features, info.task, info.n_classes) == (1797, 64, "categorical", 10)


@pytest.mark.parametrize("info", ds._RIVER, ids=lambda info: info.name)
def test_bundled_river_sets_load_as_described(info):
    """Each of river's sets loads with the rows, features and task its listing gives: labels 0
    and 1, or class indices with their names, or real targets; every value finite."""
    pytest.importorskip("river")
    X, y, feats, target = ds.load(info.name)
    assert X.shape == (info.n_rows, info.n_features) and y.shape == (info.n_rows,)
    assert len(feats) == info.n_features
    assert X.dtype == np.float64 and np.all(np.isfinite(X)) and np.all(np.isfinite(np.asarray(y, np.float64)))
    names = ds.class_names(info.name)
    if info.task == "bernoulli":
        assert set(np.unique(y)) == {0, 1}
    elif info.task == "categorical":
        assert np.array_equal(np.unique(y), np.arange(info.n_classes)) and len(names) == info.n_classes
        assert names == sorted(names)
    else:
        assert names is None and len(np.unique(y)) > 10


@pytest.mark.parametrize("loader", sorted(ds._TABLES))
def test_a_set_read_from_its_file_is_exactly_what_scikit_learns_loader_gives(loader, tmp_path, monkeypatch):
    import importlib.util
    import shutil
    import types

    import sklearn.datasets as skd

    bunch = getattr(skd, loader)()
    X, y, names, target, classes = ds._sklearn_table(*ds._TABLES[loader])
    assert X.dtype == np.float64 and X.tobytes() == np.ascontiguousarray(bunch.data).tobytes()
    assert y.dtype == bunch.target.dtype and np.array_equal(y, bunch.target)
    assert names == [str(n) for n in bunch.feature_names] and target == "target"
    assert classes == [str(c) for c in bunch.target_names]
    # a file not of the expected form (a damaged or changed copy, or none) is not read:
    # the loader takes the set from scikit-learn instead
    file = ds._TABLES[loader][0]
    data = tmp_path / "sklearn" / "datasets" / "data"
    data.mkdir(parents=True)
    original = os.path.join(os.path.dirname(skd.__file__), "data", file)
    fake = types.SimpleNamespace(submodule_search_locations=[str(tmp_path / "sklearn")])
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: fake if name == "sklearn" else None)
    if file.endswith(".gz"):
        with gzip.open(original, "rt") as f:
            text = f.read()
    else:
        with open(original, encoding="utf-8") as f:
            text = f.read()
    last = text.rstrip("\n").rsplit(",", 1)[0]
    damaged = [None, "", last + "," + str(len(classes)) + "\n", last + ",0.5\n", last + ",nan\n", last + ",1e300\n",
               text + "1,2\n", text.replace(",", ";", 40)]
    if file.endswith(".gz"):  # cut short: gzip's own error
        damaged.append(gzip.compress(text.encode())[:1000])
    if not file.endswith(".gz"):  # its header: the counts of rows and features
        damaged += [text.replace(text.split(",", 1)[0], str(len(y) + 1), 1),
                    text[: text.rindex("\n", 0, len(text) // 2) + 1]]
    for bad in damaged:
        if bad is None:
            (data / file).unlink(missing_ok=True)
        elif isinstance(bad, bytes):
            (data / file).write_bytes(bad)
        elif file.endswith(".gz"):
            with gzip.open(data / file, "wt") as f:
                f.write(bad)
        else:
            (data / file).write_text(bad, encoding="utf-8")
        with warnings.catch_warnings():
            warnings.simplefilter("error")   # nothing of a damaged file's reaches the user
            assert ds._sklearn_table(*ds._TABLES[loader]) is None, repr(bad)[:80]
        again = ds._sklearn(loader)()   # from scikit-learn
        assert np.array_equal(again[0], bunch.data) and again[2] == names and again[4] == classes
    shutil.copy(original, data / file)
    assert ds._sklearn_table(*ds._TABLES[loader])[0].tobytes() == X.tobytes()


def test_unknown_name_lists_the_bundled_sets():
    with pytest.raises(ds.DataError, match="breast_cancer"):
        ds.open_source("no_such_thing")


def test_bundled_source_chunks_and_shuffle():
    src = ds.open_source("wine", chunk_rows=50)
    X, y, lines, _, chunks = _all(src)
    assert [len(c.y) for c in chunks] == [50, 50, 50, 28]
    assert src.task_hint == "categorical" and src.n_classes_hint == 3
    np.testing.assert_array_equal(lines, np.arange(1, 179))
    Xs, ys, *_ = _all(ds.open_source("wine", shuffle_seed=3))
    assert not np.array_equal(ys, y) and sorted(ys.tolist()) == sorted(y.tolist())


def test_csv_chunks_match_one_read_and_keep_line_numbers(tmp_path):
    rows = "\n".join(f"{i},{2 * i},{i % 2}" for i in range(23))
    path = _write(tmp_path, "a,b,target\n" + rows + "\n\n")
    X1, y1, l1, _, _ = _all(ds.open_source(path, chunk_rows=5))
    X2, y2, l2, _, c2 = _all(ds.open_source(path, chunk_rows=1000))
    assert len(c2) == 1
    np.testing.assert_array_equal(X1, X2)
    np.testing.assert_array_equal(l1, np.arange(2, 25))
    assert X1.shape == (23, 2) and list(y1[:3]) == ["0", "1", "0"]


def test_default_target_is_named_column_else_last(tmp_path):
    src = ds.open_source(_write(tmp_path, "label,x1,x2\n1,2,3\n"))
    assert src.target_name == "label" and src.feature_names == ["x1", "x2"]
    src = ds.open_source(_write(tmp_path, "u,v,w\n1,2,3\n", "e.csv"))
    assert src.target_name == "w"


def test_missing_target_column_names_file_and_columns(tmp_path):
    path = _write(tmp_path, "a,b,c\n1,2,3\n")
    with pytest.raises(ds.DataError) as err:
        ds.open_source(path, target="price")
    assert "d.csv" in str(err.value) and "line 1" in str(err.value) and "price" in str(err.value)
    assert "a, b, c" in str(err.value)


def test_malformed_row_is_located(tmp_path):
    path = _write(tmp_path, "a,b,y\n1,2,0\n3,4,1\n5,6\n7,8,1\n")
    with pytest.raises(ds.DataError, match=r"d\.csv, line 4: expected 3 fields"):
        _all(ds.open_source(path))


def test_non_numeric_and_empty_values_are_located(tmp_path):
    path = _write(tmp_path, "a,b,y\n1,2,0\n3,abc,1\n")
    with pytest.raises(ds.DataError) as err:
        _all(ds.open_source(path))
    assert err.value.line == 3 and err.value.column == "b" and "'abc'" in str(err.value)
    path = _write(tmp_path, "a,b,y\n1,2,0\n,4,1\n", "e.csv")
    with pytest.raises(ds.DataError, match=r"line 3, column 'a': empty value"):
        _all(ds.open_source(path))


def test_first_error_in_file_order_is_reported(tmp_path):
    # a bad cell on line 2 comes before a short row on line 4 in the same chunk
    path = _write(tmp_path, "a,b,y\nx,2,0\n3,4,1\n5,6\n")
    with pytest.raises(ds.DataError) as err:
        _all(ds.open_source(path))
    assert err.value.line == 2


def test_skip_bad_rows_counts_and_keeps_good_rows(tmp_path):
    path = _write(tmp_path, "a,b,y\n1,2,0\n3,abc,1\n5,6\n7,8,1\n9,inf,0\n")
    X, y, lines, skipped, _ = _all(ds.open_source(path, skip_bad_rows=True, chunk_rows=2))
    np.testing.assert_array_equal(lines, [2, 5])
    np.testing.assert_array_equal(X, [[1, 2], [7, 8]])
    assert sorted(s[0] for s in skipped) == [3, 4, 6]


def test_what_the_reader_refuses_is_named_with_its_file_and_line(tmp_path):
    """A key or a shuffle where they do not apply, a folder, repeated or too few columns, no
    feature besides the target and the key, a bundled set's other target or columns, and a row
    the CSV module cannot read (skipped with skip_bad_rows)."""
    cases = [
        (lambda: ds.open_source("iris", key="user"),
         "iris: --key applies to CSV files; the bundled data set 'iris' has no key column"),
        (lambda: ds.open_source(_write(tmp_path, "a,y\n1,0\n"), shuffle_seed=0),
         "d.csv: --shuffle applies to bundled data sets only; a CSV stream is read in order"),
        (lambda: ds.open_source(str(tmp_path)), f"{tmp_path}: cannot open (Is a directory)"),
        (lambda: ds.open_source(_write(tmp_path, "a,a,y\n1,2,0\n", "dup.csv")),
         "dup.csv, line 1: duplicate column names ['a']"),
        (lambda: ds.open_source(_write(tmp_path, "a\n1\n", "one.csv")),
         "one.csv, line 1: need at least two columns (features and a target)"),
        (lambda: ds.open_source(_write(tmp_path, "k,y\nu,0\n", "key.csv"), key="k"),
         "key.csv, line 1: no feature columns besides the target"),
        (lambda: ds.open_source("iris", target="species"),
         "iris: this data set's target column is 'target', not 'species'"),
        (lambda: ds.open_source("iris", feature_names=["a"]), "iris: its columns differ from the model's features"),
    ]
    for make, said in cases:
        with pytest.raises(ds.DataError, match=re.escape(said)):
            _all(make())
    big = tmp_path / "big.csv"  # a field beyond the csv module's limit (131 072 characters)
    big.write_text('a,y\n1,0\n"' + "x" * 140_000 + '",1\n2,1\n')
    with pytest.raises(ds.DataError, match=r"big\.csv, line 3: unreadable CSV \(field larger than field limit"):
        _all(ds.open_source(str(big)))
    X, _, lines, skipped, _ = _all(ds.open_source(str(big), skip_bad_rows=True))
    assert lines.tolist() == [2, 4] and [s[0] for s in skipped] == [3]


def test_standard_input(tmp_path):
    src = ds.open_source("-", stdin=io.StringIO("x,y\n1.5,0\n2.5,1\n"))
    X, y, lines, _, _ = _all(src)
    assert src.name == "<stdin>"
    np.testing.assert_array_equal(X, [[1.5], [2.5]])
    np.testing.assert_array_equal(lines, [2, 3])


def test_empty_file(tmp_path):
    with pytest.raises(ds.DataError, match="empty file"):
        ds.open_source(_write(tmp_path, ""))


@pytest.mark.parametrize("y, family, classes", [
    ([0, 1, 1, 0], "bernoulli", ["0", "1"]),
    (["0.0", "1.0"], "bernoulli", ["0", "1"]),
    ([0, 2, 1, 2], "categorical", ["0", "1", "2"]),
    ([0.5, 1.2], "gaussian", None),
    (list(range(0, 60)), "poisson", None),
    (list(range(25, 90)), "gaussian", None),
    (["yes", "no", "yes"], "bernoulli", ["no", "yes"]),
    (["a", "c", "b"], "categorical", ["a", "b", "c"]),
])
def test_infer_task(y, family, classes):
    assert ds.infer_task(np.array(y, dtype=object)) == (family, classes)


def test_target_coder_rejects_unseen_label_with_location():
    coder = ds.TargetCoder("categorical", ["a", "b"])
    vals, good = coder.encode("f.csv", np.array(["b", "a"], object), np.array([2, 3]), "y", False, [])
    np.testing.assert_array_equal(vals, [1, 0])
    with pytest.raises(ds.DataError, match=r"f\.csv, line 7, column 'y': label 'c'"):
        coder.encode("f.csv", np.array(["a", "c"], object), np.array([6, 7]), "y", False, [])
    skipped = []
    _, good = coder.encode("f.csv", np.array(["a", "c"], object), np.array([6, 7]), "y", True, skipped)
    assert good.tolist() == [True, False] and skipped[0][0] == 7


def test_target_coder_counts_and_reals():
    skipped = []
    vals, good = ds.TargetCoder("poisson").encode("f", np.array(["3", "-1", "2.5", "x"], object),
                                                  np.arange(4), "n", True, skipped)
    assert good.tolist() == [True, False, False, False] and vals[0] == 3
    with pytest.raises(ds.DataError, match="non-numeric target 'x'"):
        ds.TargetCoder("gaussian").encode("f", np.array(["1", "x"], object), np.array([2, 3]), "t", False, [])


def test_non_utf8_file_is_a_clear_error(tmp_path):
    p = tmp_path / "bin.csv"
    p.write_bytes(b"a,b,y\n1,2,0\n\xff\xfe,2,1\n")
    with pytest.raises(ds.DataError, match=r"bin\.csv: not UTF-8 text"):
        _all(ds.open_source(str(p), skip_bad_rows=True))


def test_a_byte_order_mark_is_not_part_of_the_first_column_name(tmp_path):
    """A file saved as Excel's "CSV UTF-8" begins with a byte-order mark: the first column is
    still 'y' (the default target, found by its name), from a file, a binary stream and a text
    stream alike, and a model learned from one file reads the other by its columns' names."""
    text = '"y",a,b\n1,2.5,3\n0,4,5\n'  # (a quoted name: the mark is not read as the field's start)
    p = tmp_path / "bom.csv"
    p.write_bytes(b"\xef\xbb\xbf" + text.encode())
    sources = [ds.open_source(str(p)), ds.open_source("-", stdin=io.BytesIO(p.read_bytes())),
               ds.open_source("-", stdin=io.StringIO("\ufeff" + text))]
    for src in sources:
        X, y, *_ = _all(src)
        assert (src.target_name, src.feature_names) == ("y", ["a", "b"])
        np.testing.assert_array_equal(X, [[2.5, 3], [4, 5]])
        assert list(y) == ["1", "0"]
    src = ds.open_source(str(p), require_target=False, feature_names=["a", "b"])
    np.testing.assert_array_equal(_all(src)[0], [[2.5, 3], [4, 5]])


def test_a_delimiter_at_the_end_of_each_line_is_named_as_the_likely_cause(tmp_path):
    path = _write(tmp_path, "a,b,y,\n1,2,0,\n3,4,1,\n")
    with pytest.raises(ds.DataError, match=re.escape("d.csv, line 2, column '': empty value (a column the header gives "
                                                     "no name: a delimiter at the end of each line?)")):
        _all(ds.open_source(path, target="y"))


def test_prediction_needs_the_trained_features(tmp_path):
    path = _write(tmp_path, "b,extra\n1,2\n")
    with pytest.raises(ds.DataError, match="missing feature column.*: a$"):
        ds.open_source(path, require_target=False, feature_names=["a", "b"])
    src = ds.open_source(_write(tmp_path, "x,b,a\n9,1,2\n", "ok.csv"), require_target=False,
                         feature_names=["a", "b"])
    X, *_ = _all(src)
    np.testing.assert_array_equal(X, [[2, 1]])       # columns found by name, in the model's order


def test_bundled_sets_name_their_classes():
    assert ds.class_names("breast_cancer") == ["malignant", "benign"]   # target 0 is malignant
    assert ds.class_names("iris") == ["setosa", "versicolor", "virginica"]
    assert ds.class_names("diabetes") is None
    _, y, *_ = ds.load("iris")
    src = ds.open_source("iris")
    _, names, *_ = _all(src)
    assert src.class_names == ["setosa", "versicolor", "virginica"]
    np.testing.assert_array_equal(names, np.array(src.class_names, dtype=object)[y])


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="reads /proc/self/fd (Linux)")
def test_a_stream_closes_its_file_when_its_header_is_refused_or_it_is_closed(tmp_path, open_paths):
    """A CSV's file is closed with an error in its header (the error, and its traceback that
    holds the reader's frames, still alive), and by ``Source.close`` (``with``) before its
    first chunk is read and part way through it, not only once read to its end; a chunk read
    after the close is an error, not the end of the stream."""
    bad, good = tmp_path / "dupes.csv", tmp_path / "d.csv"
    bad.write_text("a,a,y\n1,2,0\n")
    good.write_text("a,b,y\n" + "".join(f"{i},{i + 1},{i % 2}\n" for i in range(6)))
    with pytest.raises(ds.DataError, match="duplicate column names") as err:
        ds.open_source(str(bad))
    assert str(bad) not in open_paths(), err  # (err, and its traceback, alive)
    for chunks_read in (0, 1):
        with ds.open_source(str(good), chunk_rows=2) as source:
            for _ in range(chunks_read):
                next(source.chunks)
            assert str(good) in open_paths()
        assert str(good) not in open_paths(), chunks_read
    with pytest.raises(ValueError, match="closed file"):
        next(source.chunks)
