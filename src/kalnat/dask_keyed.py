"""Keyed learners across machines with Dask (``pip install 'kalnat[dask]'``).

Keys hash to shards (a stable hash: CRC-32 of the key's JSON text); each shard is a Dask actor
on some worker holding that shard's :class:`kalnat.keyed.Keyed`, which learns its rows in
order. The driver (:class:`DaskKeyed`) splits each batch of rows by shard, keeping their
order, and sends every shard its part; the scheduler is Dask's. A Dask dataframe is learned
partition after partition (:meth:`DaskKeyed.learn_dataframe`).

Fault tolerance: every ``checkpoint_every`` batches each shard's state is checkpointed
(:meth:`Keyed.save`'s file, sent to the driver as bytes, so no shared file system is needed,
and written to ``checkpoint_dir`` when one is given). The driver keeps each shard's batches
since its last checkpoint. When a shard's worker is lost, its actor is rebuilt on another
worker from the last checkpoint and the batches since then are replayed, then the failed
batch is retried: every row is learned exactly once by the final states, and the
predictions returned are those of the retried batch (tests/test_dask.py kills a worker
mid-stream and compares the final states with an uninterrupted one-process run). A shard
that cannot be rebuilt (``retries`` tries) raises :class:`ShardLost` once the other shards
have learned the batch; it keeps the batch in its log and learns it when its next call
rebuilds it. A shard whose own code raises learns none of the batch (:class:`ShardError`).
Each shard's rows are checked in the driver first (the checks the shard makes), so a bad row
is an error before any shard learns.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import zlib
from typing import Callable, Optional, Sequence

import jax
import numpy as np

__all__ = ["shard_of", "ShardLearner", "DaskKeyed", "ShardError", "ShardLost"]


class ShardError(RuntimeError):
    """A shard could not do its part of a call (its own code raised: the error it raised is
    the ``__cause__``); every other shard did. ``summary``: which shards and why, in a line."""

    def __init__(self, message: str, summary: str = ""):
        super().__init__(message)
        self.summary = summary or message


class ShardLost(ShardError):
    """A shard whose worker was lost and that could not be rebuilt (``DaskKeyed.retries``
    tries). The shard keeps its batches since its last checkpoint (none is lost) and learns
    them when it is next rebuilt, at the driver's next call."""


def _worker_lost(err: BaseException) -> bool:
    """Whether an actor call's error means its worker is gone rather than that the shard's code
    raised: Dask raises ``OSError`` when it cannot reach the worker (a call's timeout is a
    ``TimeoutError``, an ``OSError`` too) and ``RuntimeError("Worker holding Actor was lost")``
    once the scheduler knows."""
    return isinstance(err, OSError) or (isinstance(err, RuntimeError) and "Actor was lost" in str(err))


def shard_of(key, n_shards: int) -> int:
    """A key's shard: stable across processes and runs (Python's ``hash`` of a str is not)."""
    try:
        text = json.dumps(key)
    except TypeError:
        raise ValueError(f"key {key!r} ({type(key).__name__}) cannot be sharded: keys must be str or int") from None
    return zlib.crc32(text.encode()) % n_shards


def _key_array(keys) -> np.ndarray:
    """A batch's keys as one NumPy array: ``int64`` (Python ints within its range), ``str``, or
    else ``object`` holding Python scalars (NumPy ones as Python ones: ``np.int64(3)`` and 3 are
    one key, and JSON takes them). Dask sends an array to a shard as one buffer, where it walks a
    list element by element (16 384 Python ints took 0.4 s as an actor's argument, their array
    1.5 ms), and :class:`kalnat.keyed.Keyed` groups int and str arrays by sorting."""
    if isinstance(keys, np.ndarray) and keys.ndim == 1 and keys.dtype.kind in "iuU":
        return keys
    items = [k.item() if isinstance(k, np.generic) else k
             for k in (keys.tolist() if isinstance(keys, np.ndarray) else keys)]
    if items and all(type(k) is int for k in items) and -2**63 <= min(items) and max(items) < 2**63:
        return np.array(items, np.int64)
    # (NumPy drops a str's trailing NULs, and pads every str to the longest)
    if items and all(type(k) is str and not k.endswith("\0") and len(k) <= 64 for k in items):
        return np.array(items, str)
    out = np.empty(len(items), object)
    for i, k in enumerate(items):
        # What a shard's checkpoint can hold (Keyed.save), and one JSON text per key: True and
        # 1, or 7.0 and 7, are one key to Keyed but would go to different shards.
        if isinstance(k, bool) or not isinstance(k, (str, int)):
            raise ValueError(f"keys[{i}] = {k!r} is a {type(k).__name__}: keys on Dask must be str or int "
                             "(what a shard's checkpoint holds)")
        out[i] = k
    return out


def _shards(keys: np.ndarray, n_shards: int) -> np.ndarray:
    """``(n,)`` each row's shard: :func:`shard_of` once per distinct key of an int or str
    array, else once per row."""
    if keys.dtype.kind in "iuU":
        uniq, inv = np.unique(keys, return_inverse=True)
        return np.fromiter((shard_of(k, n_shards) for k in uniq.tolist()), np.int64, uniq.size)[inv.ravel()]
    return np.fromiter((shard_of(k, n_shards) for k in keys.tolist()), np.int64, keys.size)


def _partition_rows(part, key, target, features, i):
    """``(keys, X, Y)`` of one pandas partition; a non-numeric or missing value is a
    ``ValueError`` naming the partition, row and column (nothing of it is learned)."""
    # as Python objects, which _key_array then types: to_numpy() would make a nullable int column
    # with a missing value floats (key 1 as 1.0, on another shard) and datetimes ints
    keys = part[key].tolist()
    cols = {}
    for c in list(features) + [target]:
        try:
            v = part[c].to_numpy(dtype=np.float64, na_value=np.nan)
        except (TypeError, ValueError):
            raise ValueError(f"learn_dataframe: partition {i}, column {c!r}: not numeric "
                             f"(dtype {part[c].dtype})") from None
        bad = np.flatnonzero(~np.isfinite(v))
        if bad.size:
            raise ValueError(f"learn_dataframe: partition {i}, row {part.index[bad[0]]!r}, column {c!r}: "
                             f"missing or non-finite value {v[bad[0]]!r}")
        cols[c] = v
    X = np.stack([cols[c] for c in features], axis=1) if len(keys) else np.zeros((0, len(features)))
    return keys, X, cols[target]


class ShardLearner:
    """One shard's keyed learner, run as a Dask actor.

    ``factory() -> (learner, params)`` builds the learner inside the worker (it is pickled by
    reference or by cloudpickle); ``x64``: float64, set before any array is made.
    """

    def __init__(self, factory: Callable, x64: bool = True, batch_size: int = 1):
        import jax

        if x64:
            jax.config.update("jax_enable_x64", True)
        from kalnat.keyed import Keyed

        self.learner, self.params = factory()
        self.keyed = Keyed(self.learner, self.params, batch_size=batch_size)
        self.batch = -1  # the last batch learned

    def learn(self, batch: int, keys, X, Y):
        """Learns one batch's rows of this shard; returns ``(predictions, log_likelihoods)``
        as NumPy arrays."""
        if batch <= self.batch:
            raise ValueError(f"shard asked to learn batch {batch} again (it has learned up to {self.batch})")
        # DaskKeyed sends a NumPy array (_key_array): Keyed groups int and str arrays by sorting
        res = self.keyed.learn(keys if isinstance(keys, np.ndarray) else list(keys), X, Y)
        self.batch = batch
        return res.predictions, res.log_likelihood

    def flush(self, batch: int):
        """:meth:`Keyed.flush` (the held rows of partial minibatches learned), as batch ``batch``."""
        if batch <= self.batch:
            raise ValueError(f"shard asked to flush as batch {batch} (it has learned up to {self.batch})")
        self.keyed.flush()
        self.batch = batch

    def snapshot(self) -> tuple[int, bytes]:
        """``(last batch, checkpoint file's bytes)``."""
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "shard.npz")
            self.keyed.save(path, extra={"batch": self.batch})
            with open(path, "rb") as f:
                return self.batch, f.read()

    def restore(self, data: bytes):
        from kalnat import checkpoint
        from kalnat.keyed import Keyed

        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "shard.npz")
            with open(path, "wb") as f:
                f.write(data)
            self.keyed = Keyed.load(path, self.learner, self.params)
            self.batch = int(checkpoint.read_header(path)["extra"]["batch"])
        return self.batch

    def leaves(self) -> dict:
        """Every key's state as a list of NumPy arrays (for checks)."""
        import jax

        return {k: [np.asarray(a) for a in jax.tree_util.tree_leaves(self.keyed.state(k))] for k in self.keyed.keys}

    def n_keys(self) -> int:
        return len(self.keyed)


class DaskKeyed:
    """A keyed learner over ``n_shards`` Dask actors (default: one per worker of ``client``).

    Args:
      client: a ``dask.distributed.Client``.
      factory: ``() -> (learner, params)``, run in each worker (a module-level function or a
        ``functools.partial`` of one).
      n_shards: number of shards (default: the client's number of workers).
      checkpoint_every: batches between checkpoints of every shard.
      checkpoint_dir: where the shards' checkpoints are also written (``shard_<i>.npz``).
      retries: how many times a shard is rebuilt for one batch before giving up.
      timeout: seconds a shard may take for one batch before it is taken for lost.
      batch_size: rows per update of each key (:class:`kalnat.keyed.Keyed`'s); :meth:`flush`
        learns the partial minibatches held at the end of a stream.
    """

    def __init__(self, client, factory: Callable, *, n_shards: Optional[int] = None, checkpoint_every: int = 4,
                 checkpoint_dir: Optional[str] = None, retries: int = 3, x64: bool = True,
                 timeout: float = 600.0, batch_size: int = 1):
        self.client, self.factory, self.x64 = client, factory, x64
        self.batch_size = int(batch_size)
        self.n_shards = int(n_shards or len(client.scheduler_info()["workers"]))
        if self.n_shards < 1:
            raise ValueError("DaskKeyed: the cluster has no workers")
        self.checkpoint_every = int(checkpoint_every)
        self.checkpoint_dir = checkpoint_dir
        self.retries = int(retries)
        if self.retries < 1:
            raise ValueError(f"DaskKeyed: retries must be at least 1, got {retries}")
        self.timeout = float(timeout)
        self.actors = [self._new_actor(i) for i in range(self.n_shards)]
        self.saved = [(-1, None)] * self.n_shards      # (batch, bytes) of each shard's last checkpoint
        self.log = [[] for _ in range(self.n_shards)]  # each shard's batches since then
        self.batch = -1
        self.recoveries = 0
        self._check = None  # _checker's

    def _new_actor(self, i):
        workers = sorted(self.client.scheduler_info()["workers"])
        if not workers:  # (an OSError: a lost worker's, so the rebuild is tried again)
            raise OSError("the cluster has no workers")
        future = self.client.submit(ShardLearner, self.factory, self.x64, self.batch_size, actor=True, pure=False,
                                    workers=[workers[i % len(workers)]], allow_other_workers=True)
        return future.result(timeout=self.timeout)

    def _x64(self):
        # as ShardLearner: float64 when asked, else the process's own setting
        return jax.enable_x64(True) if self.x64 else contextlib.nullcontext()

    def _checker(self):
        """A keyed learner in the driver, built by ``factory`` once: each shard's rows pass its
        checks (``Keyed.learn``'s, as the shard makes them) before any shard sees the batch,
        so that a bad row is an error with nothing learned, not a batch learned by some shards
        only. (The driver thereby starts JAX, on its default device.)"""
        if self._check is None:
            from kalnat.keyed import Keyed

            with self._x64():
                self._check = Keyed(*self.factory(), capacity=1)
        return self._check

    def learn(self, keys, X, Y):
        """Learns one batch of rows (each key's rows in order); returns ``(predictions,
        log_likelihoods (n,))`` in the rows' order, as :meth:`Keyed.learn` gives them.

        Bad input (keys, features or targets) is a ``ValueError`` before any shard learns,
        and the batch is not counted. A shard whose worker is lost is rebuilt and learns the
        batch there; one that cannot be rebuilt (``retries`` tries) is a :class:`ShardLost`
        error, raised once every other shard has learned the batch: the lost shard keeps its
        rows and learns them when it is next rebuilt (at its next call), so the batch must not
        be passed again. A shard whose own code raises learns nothing of the batch (a
        :class:`ShardError`, the others having learned theirs)."""
        keys = _key_array(keys)
        X, Y = np.asarray(X), np.asarray(Y)
        n = len(keys)
        if X.ndim == 0 or Y.ndim == 0 or X.shape[0] != n or Y.shape[0] != n:
            raise ValueError(f"keys, X and Y must have the same number of rows ({n}, {X.shape[:1]}, {Y.shape[:1]})")
        if n == 0:  # nothing to learn: not a batch
            return None, np.zeros(0)
        shard = _shards(keys, self.n_shards)
        rows = {i: r for i in range(self.n_shards) if (r := np.flatnonzero(shard == i)).size}
        with self._x64():
            for r in rows.values():  # each shard's rows, as the shard will check them
                self._checker()._check(X[r], Y[r])
        self.batch += 1
        # the rows as given (each shard casts them to its dtype, as Keyed.learn does)
        out = self._run({i: (self.batch, keys[r], X[r], Y[r]) for i, r in rows.items()}, "learned")
        if (self.batch + 1) % self.checkpoint_every == 0:
            try:
                self.checkpoint()
            except ShardLost:  # the batch is learned; the lost shard keeps its log for its next call
                pass
            except Exception as err:
                raise ShardError(f"DaskKeyed: batch {self.batch} is learned (do not pass it again), but its "
                                 f"checkpoint failed: {type(err).__name__}: {err}") from err
        first = next(iter(out.values()))
        pred, ll = jax.tree_util.tree_map(lambda a: np.zeros((n,) + a.shape[1:], a.dtype), first)
        for i, part in out.items():
            jax.tree_util.tree_map(lambda o, a: o.__setitem__(rows[i], a), (pred, ll), part)
        return pred, ll

    def learn_dataframe(self, df, key: str, target: str, features: Optional[Sequence[str]] = None,
                        return_predictions: bool = True):
        """Learns a Dask (or pandas) dataframe's rows: its partitions in order, each one batch
        of :meth:`learn`, so every key's rows keep the dataframe's order. A partition is
        computed on the cluster while the shards learn the one before, and passes through the
        driver on its way to them.

        Args:
          df: a ``dask.dataframe.DataFrame`` (or a ``pandas.DataFrame``: one partition).
          key: the column naming each row's stream (any str or int values).
          target: the target column.
          features: the feature columns, in the model's order (default: every other column,
            in the dataframe's order).
          return_predictions: keep the predictions.

        Returns ``(predictions, log_likelihoods (n,))`` in the dataframe's row order, as
        :meth:`learn` gives them for one batch (``None`` without ``return_predictions``).
        """
        columns = list(df.columns)
        for name, what in ((key, "key"), (target, "target")):
            if name not in columns:
                raise ValueError(f"learn_dataframe: no {what} column {name!r} (columns: {', '.join(map(str, columns))})")
        if key == target:
            raise ValueError(f"learn_dataframe: the key column {key!r} is also the target")
        features = [c for c in columns if c not in (key, target)] if features is None else list(features)
        missing = [c for c in features if c not in columns]
        if missing or not features:
            raise ValueError(f"learn_dataframe: feature columns missing: {missing}" if missing else
                             "learn_dataframe: no feature columns besides the key and the target")
        npart = getattr(df, "npartitions", None)
        parts = [df] if npart is None else [df.get_partition(i) for i in range(npart)]
        future = None if npart is None else self.client.compute(parts[0])
        out = []
        for i in range(len(parts)):
            part = parts[i] if future is None else future.result()
            if future is not None and i + 1 < len(parts):  # the next partition, while this one learns
                future = self.client.compute(parts[i + 1])
            keys, X, Y = _partition_rows(part, key, target, features, i)
            if len(keys):
                res = self.learn(keys, X, Y)
                if return_predictions:
                    out.append(res)
        if not return_predictions:
            return None
        if not out:
            raise ValueError("learn_dataframe: the dataframe has no rows")
        return jax.tree_util.tree_map(lambda *a: np.concatenate(a), *out)

    def flush(self):
        """Every shard's held rows (``batch_size > 1``) learned, as one more batch (logged and
        replayed like the others; a shard lost for good is :meth:`learn`'s :class:`ShardLost`)."""
        self.batch += 1
        self._run({i: (self.batch, None, None, None) for i in range(self.n_shards)}, "flushed")

    def _run(self, entries: dict, what: str) -> dict:
        """Sends each shard ``i`` its entry ``(batch, keys, X, Y)`` (``keys`` ``None``: a
        flush), then collects the results (:meth:`_call`). An entry joins its shard's log when
        the shard ran it, or when the shard was lost and not rebuilt (it runs it when next
        rebuilt); not when the shard's own code raised (it learned nothing of it). Raises
        once every shard has had its entry: :class:`ShardLost` if a shard is lost,
        :class:`ShardError` if one raised."""
        sent = {}
        for i, entry in entries.items():
            try:
                sent[i] = _send(self.actors[i], entry) if self.actors[i] is not None else None
            except Exception as err:  # Dask knows the actor's worker is gone
                sent[i] = err
        out, failed = {}, {}
        for i, call in sent.items():
            status, value = self._call(i, call, lambda actor, e=entries[i]: _send(actor, e))
            if status == "ok":
                out[i] = value
            else:
                failed[i] = (status, value)
            if status == "raised":  # its state is in doubt: rebuilt at its next call, without this entry
                self.actors[i] = None
            else:
                self.log[i].append(entries[i])
        if failed:
            self._raise(failed, f"{what} batch {self.batch}" if len(failed) < len(entries) else "", entries=True)
        return out

    def _call(self, i, call, again) -> tuple[str, object]:
        """The result of shard ``i``'s ``call`` (an actor future, the error raised making it,
        or ``None`` for a shard lost before), as ``("ok", result)``; ``("raised", error)``
        where the shard's own code raised; else its worker is lost: the shard is rebuilt on a
        new actor (its checkpoint, its log replayed) and ``again(actor)`` made there, up to
        ``retries`` times, then ``("lost", error)`` with the shard left lost (``None``)."""
        for attempt in range(self.retries + 1):
            try:
                if isinstance(call, Exception):
                    raise call
                if call is None:
                    raise OSError("the shard was lost before")
                return "ok", call.result(timeout=self.timeout)
            except Exception as err:
                if not _worker_lost(err):
                    return "raised", err
                lost = err
            if attempt == self.retries:
                break
            try:
                self._rebuild(i)
                call = again(self.actors[i])
            except Exception as err:  # the rebuild failed: a lost worker's error, tried again
                call = err if _worker_lost(err) else OSError(f"rebuilding the shard: {type(err).__name__}: {err}")
        self.actors[i] = None
        return "lost", lost

    def _raise(self, failed: dict, done: str = "", entries: bool = False):
        """Raises :class:`ShardLost` or :class:`ShardError` for ``failed``: ``{shard: (status,
        error)}`` (:meth:`_call`'s); ``done``: what every other shard did; ``entries``: the
        call was a batch (:meth:`_run`)."""
        lost = {i: e for i, (status, e) in failed.items() if status == "lost"}
        raised = {i: e for i, (status, e) in failed.items() if status == "raised"}
        parts = []
        if lost:
            i, err = next(iter(lost.items()))
            parts.append(f"shard{'s' * (len(lost) > 1)} {', '.join(map(str, lost))} lost and not rebuilt in "
                         f"{self.retries} tries (shard {i}: {type(err).__name__}: {err})")
        if raised:
            i, err = next(iter(raised.items()))
            parts.append(f"shard{'s' * (len(raised) > 1)} {', '.join(map(str, raised))} raised (shard {i}: "
                         f"{type(err).__name__}: {err})")
        summary = "DaskKeyed: " + "; ".join(parts)
        message = summary + (f"; every other shard {done}" if done else "") + "."
        if lost:
            message += (" A lost shard keeps its batches since its last checkpoint and learns them when it "
                        "is rebuilt, at its next call" + (": do not pass the batch again." if entries else "."))
        if raised and entries:
            message += (" A shard that raised has not learned this batch's rows: it is rebuilt from its "
                        "checkpoint and its other batches at its next call.")
        cause = next(iter((lost or raised).values()))
        raise (ShardLost if lost else ShardError)(message, summary) from cause

    def _replay(self, actor, i):
        for entry in self.log[i]:
            _send(actor, entry).result(timeout=self.timeout)

    def _rebuild(self, i):
        """Shard ``i`` on a new actor, from its last checkpoint with its logged batches
        replayed (one try; ``self.actors[i]`` is ``None`` until it succeeds)."""
        self.actors[i] = None
        self.recoveries += 1
        actor = self._new_actor(i)
        if self.saved[i][1] is not None:
            actor.restore(self.saved[i][1]).result(timeout=self.timeout)
        self._replay(actor, i)
        self.actors[i] = actor

    def _ask(self, i, method: str):
        """Shard ``i``'s ``method()`` (no batch: nothing to log), rebuilding a lost shard."""
        def ask(actor):
            return getattr(actor, method)()

        try:
            call = ask(self.actors[i]) if self.actors[i] is not None else None
        except Exception as err:
            call = err
        status, value = self._call(i, call, ask)
        if status != "ok":
            self._raise({i: (status, value)})
        return value

    def checkpoint(self):
        """Checkpoints every shard now (and clears their replay logs). A shard that cannot be
        checkpointed keeps its log; :class:`ShardLost` or :class:`ShardError` is raised after
        the others are checkpointed (an error writing ``checkpoint_dir`` likewise)."""
        failed, write = {}, None
        for i in range(self.n_shards):
            try:
                batch, data = self._ask(i, "snapshot")
            except ShardError as err:
                failed[i] = ("lost" if isinstance(err, ShardLost) else "raised", err.__cause__)
                continue
            self.saved[i] = (batch, data)
            self.log[i] = [entry for entry in self.log[i] if entry[0] > batch]
            if self.checkpoint_dir:
                try:
                    _write(os.path.join(self.checkpoint_dir, f"shard_{i}.npz"), data)
                except OSError as err:  # the driver holds the checkpoint: the others are still made
                    write = write or err
        if failed:
            self._raise(failed, "was checkpointed" if len(failed) < self.n_shards else "")
        if write is not None:
            raise write

    def leaves(self) -> dict:
        """Every key's state (as NumPy leaves), gathered from the shards."""
        out = {}
        for i in range(self.n_shards):
            out.update(self._ask(i, "leaves"))
        return out

    def n_keys(self) -> int:
        return sum(self._ask(i, "n_keys") for i in range(self.n_shards))


def _write(path, data: bytes):
    """``data`` to ``path``, atomically (a temporary file, synced, then renamed)."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _send(actor, entry):
    """A log entry ``(batch, keys, X, Y)`` sent to a shard's actor (``keys`` ``None``: a flush)."""
    batch, keys, X, Y = entry
    return actor.flush(batch) if keys is None else actor.learn(batch, keys, X, Y)
