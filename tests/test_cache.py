"""The command's cache folder held within KALNAT_CACHE_MAX_MB (kalnat.cache): least recently used
entries go first, once a day, the bundled data sets and files that are not the cache's never; a
bad limit is refused."""

import os

import pytest

from kalnat import cache

DAY = 86400.0


def _folder(tmp_path, now):
    """Six JAX entries and three saved programs of 100 bytes, last used 1 … 9 hours before
    ``now`` in an order that mixes the two kinds (by access time for some, modification time
    for others), and a data set copy and two files of the user's, older than all of them."""
    folder = tmp_path / "jax"
    (folder / "programs").mkdir(parents=True)
    (folder / "datasets").mkdir()
    used = {}
    for age, name in enumerate(["jit_a-cache", "programs/p1.program", "jit_b-cache", "jit_c-cache",
                                "programs/p2.program", "jit_d-cache", "jit_e-cache", "programs/p3.program",
                                "jit_f-cache"], start=1):
        path = folder / name
        path.write_bytes(b"x" * 100)
        last = now - age * 3600
        # half of them read since written (atime later), the others written last (mtime later)
        os.utime(path, (last, last - 600) if age % 2 else (last - 600, last))
        used[name] = last
    # a data set copy, and files that are not the cache's (KALNAT_CACHE_DIR may name a folder
    # that holds others): older than all, never removed
    for name in ("datasets/breast_cancer.npz", "notes.txt", "programs/readme.md"):
        (folder / name).write_bytes(b"x" * 5000)
        os.utime(folder / name, (now - 30 * DAY, now - 30 * DAY))
    return folder, used


def test_the_least_recently_used_go_until_the_folder_holds_its_share_of_the_limit(tmp_path):
    now = 1.9e9
    folder, used = _folder(tmp_path, now)
    # 900 bytes against a limit of 500: removed, oldest first, until at most 0.8 × 500 = 400
    removed = cache.prune(str(folder), 500)
    oldest_first = sorted(used, key=used.get)
    assert [os.path.relpath(p, folder) for p in removed] == oldest_first[:5]
    left = sorted(os.path.relpath(os.path.join(d, f), folder) for d, _, files in os.walk(folder) for f in files)
    assert left == sorted(oldest_first[5:] + ["datasets/breast_cancer.npz", "notes.txt", "programs/readme.md"])
    assert cache.prune(str(folder), 500) == []  # 400 bytes: under the limit, nothing more


def test_the_folder_is_added_up_once_a_day_and_the_limit_read_every_time(tmp_path):
    now = 1.9e9
    folder, used = _folder(tmp_path, now)
    env = {cache.MAX_MB_ENV: str(500 / 2**20)}
    assert len(cache.maintain(str(folder), env, now=now)) == 5  # no stamp yet: pruned
    assert os.stat(folder / cache.STAMP).st_mtime == now
    (folder / "jit_new-cache").write_bytes(b"x" * 400)
    os.utime(folder / "jit_new-cache", (now + 3600, now + 3600))
    assert cache.maintain(str(folder), env, now=now + DAY - 1) == []  # within the day: not added up
    # a day later: 800 bytes, down to the new entry (400), the four older ones removed
    assert sorted(os.path.basename(p) for p in cache.maintain(str(folder), env, now=now + DAY)) == [
        "jit_a-cache", "jit_b-cache", "jit_c-cache", "p1.program"]
    for bad in ("0", "-1", "nan", "inf", "lots"):
        with pytest.raises(ValueError, match=f"KALNAT_CACHE_MAX_MB={bad!r}: the compilation cache's limit must be"):
            cache.maintain(str(folder), {cache.MAX_MB_ENV: bad}, now=now)
    assert cache.max_bytes({}) == cache.DEFAULT_MAX_MB * 2**20
    assert cache.max_bytes({cache.MAX_MB_ENV: " 2.5 "}) == int(2.5 * 2**20)


def test_a_folder_that_cannot_be_written_is_left_as_it_is(tmp_path, monkeypatch):
    now = 1.9e9
    folder, used = _folder(tmp_path, now)
    real_utime = os.utime

    def refuse(path, *args, **kw):
        if str(path).endswith(cache.STAMP):
            raise PermissionError(path)
        return real_utime(path, *args, **kw)

    monkeypatch.setattr(os, "utime", refuse)
    assert cache.maintain(str(folder), {cache.MAX_MB_ENV: str(500 / 2**20)}, now=now) == []
    assert all((folder / name).exists() for name in used)
