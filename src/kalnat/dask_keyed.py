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
batch is retried (a lost worker's call is given up as soon as the scheduler reports the loss,
not at Dask's connect timeout): every row is learned exactly once by the final states, and the
predictions returned are those of the retried batch (tests/test_dask.py kills a worker
mid-stream and compares the final states with an uninterrupted one-process run). A shard
that cannot be rebuilt (``retries`` tries) raises :class:`ShardLost` once the other shards
have learned the batch; it keeps the batch in its log and learns it when its next call
rebuilds it. A shard whose own code raises (its errors come back as ``_Raised``, told apart
from a lost worker's) learns none of the batch (:class:`ShardError`). Each shard's rows are
checked in the driver first (the checks the shard makes), so a bad row is an error before
any shard learns.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
import warnings
import zlib
from typing import Callable, Optional, Sequence

import jax
import numpy as np

from kalnat import checkpoint
from kalnat.dask_shard import ShardLearner, _Raised
from kalnat.keyed import saveable_key
from kalnat.validation import plain

__all__ = ["shard_of", "ShardLearner", "DaskKeyed", "ShardError", "ShardLost"]

# Seconds between looks at whether a shard's worker is lost while its call is awaited: a call
# sent to a worker that has died before the client knew it retries the connection until Dask's
# connect timeout (``distributed.comm.timeouts.connect``, 30 s by default), whereas the scheduler
# tells the client at once (the future that made the actor errs).
_POLL = 0.1


class ShardError(RuntimeError):
    """A call that not every shard could do its part of; the others did theirs. Attributes:
    ``lost`` (shards whose workers are lost and could not be rebuilt: they keep their
    batches and learn them when rebuilt), ``raised`` (shards whose own code raised: they
    learned none of the call's rows), ``dropped`` (``(shard, batch)`` of logged batches a
    rebuilt shard's code could not learn again: not learned) and ``summary`` (one line)."""

    def __init__(self, message: str, summary: str = "", lost=(), raised=(), dropped=()):
        super().__init__(message)
        self.summary = summary or message
        self.lost, self.raised, self.dropped = set(lost), set(raised), list(dropped)


class ShardLost(ShardError):
    """A :class:`ShardError` where every failing shard is lost (``raised`` and ``dropped``
    empty): nothing of the call is lost; the lost shards keep their batches since their last
    checkpoint and learn them when they are next rebuilt, at their next call."""


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
    items = [plain(k) for k in (keys.tolist() if isinstance(keys, np.ndarray) else keys)]
    if items and all(type(k) is int for k in items) and -2**63 <= min(items) and max(items) < 2**63:
        return np.array(items, np.int64)
    # (NumPy drops a str's trailing NULs, and pads every str to the longest)
    if items and all(type(k) is str and not k.endswith("\0") and len(k) <= 64 for k in items):
        return np.array(items, str)
    out = np.empty(len(items), object)
    for i, k in enumerate(items):
        # What a shard's checkpoint can hold (Keyed.save), and one JSON text per key: True and
        # 1, or 7.0 and 7, are one key to Keyed but would go to different shards.
        if not saveable_key(k):
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
            raise ValueError(f"learn_dataframe: partition {i}, row {plain(part.index[bad[0]])!r}, column {c!r}: "
                             f"missing or non-finite value {plain(v[bad[0]])!r}")
        cols[c] = v
    X = np.stack([cols[c] for c in features], axis=1) if len(keys) else np.zeros((0, len(features)))
    return keys, X, cols[target]


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
        self.timeout = float(timeout)
        for name, value, ok in (("checkpoint_every", checkpoint_every, self.checkpoint_every >= 1),
                                ("retries", retries, self.retries >= 1), ("timeout", timeout, self.timeout > 0)):
            if not ok:
                raise ValueError(f"DaskKeyed: {name} must be positive, got {value}")
        self.recoveries = 0  # shards rebuilt (attempts, the failed ones too)
        made = [self._new_actor(i) for i in range(self.n_shards)]
        self.actors = [actor for actor, _ in made]
        self._made = [future for _, future in made]  # the futures that made them (_result)
        self.saved = [(-1, None)] * self.n_shards      # (batch, bytes) of each shard's last checkpoint
        self.log = [[] for _ in range(self.n_shards)]  # each shard's batches since then
        self.batch = -1
        self._check = None  # _checker's
        self._dropped = []  # (shard, batch, error) of logged batches a rebuild could not learn again
        self._replay_failures = {}  # (shard, batch): replays of a logged batch that raised
        self._dtype = self._ask(0, "dtype")  # the shards' (the driver checks rows in it)

    def _new_actor(self, i):
        """``(actor, the future that made it)`` of a new :class:`ShardLearner` for shard ``i``."""
        workers = sorted(self.client.scheduler_info()["workers"])
        if not workers:  # (an OSError: a lost worker's, so the rebuild is tried again)
            raise OSError("the cluster has no workers")
        # each rebuild on the next worker: a worker whose call timed out may still be running it
        future = self.client.submit(ShardLearner, self.factory, self.x64, self.batch_size, actor=True, pure=False,
                                    workers=[workers[(i + self.recoveries) % len(workers)]], allow_other_workers=True)
        return future.result(timeout=self.timeout), future

    def _result(self, call, made):
        """``call.result()`` of an actor's method, waited for at most ``timeout`` seconds; an
        ``OSError`` as soon as ``made`` (the future that made the actor) is no longer finished:
        Dask errs an actor's task when its worker leaves, while a call sent to the worker
        before the client knew would only fail at the connect timeout (30 s)."""
        deadline = time.monotonic() + self.timeout
        while True:
            left = deadline - time.monotonic()
            try:
                return call.result(timeout=max(0.0, min(_POLL, left)))
            except (TimeoutError, asyncio.TimeoutError):
                if call.done():  # the call's own error, not the wait's
                    raise
                if left <= _POLL:
                    raise TimeoutError(f"no answer from the shard's worker in {self.timeout:g} s") from None
            if made.status != "finished":
                raise OSError(f"the worker holding the actor is lost (the actor's task: {made.status})")

    def _checker(self):
        """A keyed learner in the driver, built by ``factory`` once in the shards' dtype (asked
        of shard 0 when the shards are made): each shard's rows pass its checks
        (``Keyed.learn``'s, as the shard makes them) before any shard sees the batch, so that a
        bad row is an error with nothing learned, not a batch learned by some shards only. (The
        driver thereby starts JAX.)"""
        if self._check is None:
            from kalnat.keyed import Keyed

            with jax.enable_x64(self._dtype == "float64"):
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
        checker = self._checker()
        with jax.enable_x64(checker._dtype == np.float64):
            for r in rows.values():  # each shard's rows, as the shard will check them
                checker._check(X[r], Y[r])
        self.batch += 1
        # the rows as given (each shard casts them to its dtype, as Keyed.learn does)
        out = self._run({i: (self.batch, keys[r], X[r], Y[r]) for i, r in rows.items()}, "learned")
        if (self.batch + 1) % self.checkpoint_every == 0:
            try:
                self.checkpoint()
            except ShardLost as err:  # the batch is learned; a lost shard keeps its log for its next call
                warnings.warn(f"{err.summary}: the checkpoint after batch {self.batch} is not made for "
                              f"{'them' if len(err.lost) > 1 else 'it'}; rebuilt at its next call", RuntimeWarning)
            except ShardError as err:  # (raised: the shards' snapshots, not the batch: not named so)
                raise ShardError(f"DaskKeyed: batch {self.batch} is learned (do not pass it again), but the "
                                 f"checkpoint after it failed: {err}", err.summary, err.lost, (),
                                 err.dropped) from err
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
        rebuilt); not when the shard's own code raised (it learned none of it: its state is
        rebuilt from its checkpoint and log at its next call). Raises a :class:`ShardError`
        once every shard has had its entry, if one could not run it."""
        sent = {i: self._make(i, lambda actor, e=entry: _send(actor, e)) for i, entry in entries.items()}
        out, failed = {}, {}
        for i, call in sent.items():
            status, value = self._call(i, call, lambda actor, e=entries[i]: _send(actor, e))
            if status == "ok":
                out[i] = value
            else:
                failed[i] = (status, value)
            if status == "raised":  # its state is in doubt: rebuilt at its next call, without this entry
                self._forget(i)
            else:
                self.log[i].append(entries[i])
        self._raise(failed, _done(failed, len(entries), f"{what} batch {self.batch}"), batch=len(entries))
        return out

    def _make(self, i, ask):
        """``ask(actor)`` on shard ``i``'s actor: a future, the error raised making it, or
        ``None`` for a shard left lost."""
        try:
            return ask(self.actors[i]) if self.actors[i] is not None else None
        except Exception as err:  # Dask knows the actor's worker is gone
            return err

    def _call(self, i, call, again) -> tuple[str, object]:
        """The result of shard ``i``'s ``call`` (:meth:`_make`'s), as ``("ok", result)``;
        ``("raised", error)`` where the shard's own code raised; else its worker is lost: the
        shard is rebuilt on a new actor (:meth:`_rebuild`) and ``again(actor)`` made there,
        up to ``retries`` times, then ``("lost", error)`` with the shard left lost (``None``)."""
        for attempt in range(self.retries + 1):
            try:
                if isinstance(call, Exception):
                    raise call
                if call is None:
                    raise OSError("the shard was lost before")
                return "ok", self._result(call, self._made[i])
            except _Raised as err:
                return "raised", err
            except Exception as err:  # a lost worker (or a timeout)
                lost = err
            if attempt == self.retries:
                break
            try:
                self._rebuild(i)
                call = again(self.actors[i])
            except Exception as err:
                call = err
        self._forget(i)
        return "lost", lost

    def _forget(self, i):
        """Shard ``i`` without an actor until it is rebuilt; the handles to the old one are let go
        (Dask frees an actor when no future holds its key)."""
        self.actors[i] = self._made[i] = None

    def _rebuild(self, i):
        """Shard ``i`` on a new actor, from its last checkpoint with its logged batches replayed
        (one try; ``self.actors[i]`` is ``None`` until it succeeds). Where the new shard's own
        code raises, the try fails as a lost worker's would (the next goes to the next worker:
        a worker without the memory for the model fails every batch), except for a logged batch
        that has now failed on two workers: dropped from the log, the shard rebuilt without it
        (:meth:`_raise` reports it)."""
        self._forget(i)
        while True:
            self.recoveries += 1
            actor, made = self._new_actor(i)
            entry = None
            try:
                if self.saved[i][1] is not None:
                    self._result(actor.restore(self.saved[i][1]), made)
                for entry in self.log[i]:
                    self._result(_send(actor, entry), made)
            except _Raised as err:
                key = (i, None if entry is None else entry[0])  # (a shard's batch numbers are its own)
                self._replay_failures[key] = self._replay_failures.get(key, 0) + 1
                if entry is None or self._replay_failures[key] < 2:
                    raise RuntimeError(f"rebuilding shard {i}: {err}") from err
                self.log[i] = [e for e in self.log[i] if e is not entry]
                self._dropped.append((i, entry[0], err))
                continue
            self.actors[i], self._made[i] = actor, made
            return

    def _raise(self, failed: dict, done: str = "", batch: int = 0, write: Optional[OSError] = None):
        """Raises a :class:`ShardError` (:class:`ShardLost` where every failure is a lost shard)
        for ``failed``: ``{shard: (status, error)}`` (:meth:`_call`'s), the logged batches
        dropped since the last call, and ``write`` (an error writing ``checkpoint_dir``); does
        nothing without any. ``done``: what the other shards did (:func:`_done`); ``batch``:
        the number of shards a batch went to (:meth:`_run`), else 0."""
        dropped, self._dropped = self._dropped, []
        if not failed and not dropped and write is None:
            return
        lost = {i: e for i, (status, e) in failed.items() if status == "lost"}
        raised = {i: e for i, (status, e) in failed.items() if status == "raised"}

        def shards(d):
            return f"shard{'s' * (len(d) > 1)} {', '.join(map(str, d))}"
        parts = []
        if lost:
            i, err = next(iter(lost.items()))
            parts.append(f"{shards(lost)} lost and not rebuilt in {self.retries} tries "
                         f"(shard {i}: {type(err).__name__}: {err})")
        if raised:
            i, err = next(iter(raised.items()))
            parts.append(f"{shards(raised)} raised (shard {i}: {err})")
        for i, batch, err in dropped:
            parts.append(f"shard {i} could not learn its batch {batch} again when rebuilt ({err}): those rows "
                         "are dropped, not learned")
        if write is not None:
            parts.append(f"writing the checkpoints to {self.checkpoint_dir}: {write}")
        summary = "DaskKeyed: " + "; ".join(parts)
        message = summary + (f"; {done}" if done else "") + "."
        if lost:
            message += (" A lost shard keeps its batches since its last checkpoint and learns them when it "
                        "is rebuilt, at its next call.")
        if raised and batch:
            message += (" A shard that raised has not learned this batch's rows: it is rebuilt from its "
                        "checkpoint and its other batches at its next call.")
        if batch and len(raised) < batch:
            message += " Do not pass the batch again."
        cause = next(iter(lost.values()), next(iter(raised.values()), dropped[0][2] if dropped else write))
        kind = ShardLost if lost and not raised and not dropped and write is None else ShardError
        raise kind(message, summary, lost, raised, [(i, b) for i, b, _ in dropped]) from cause

    def _query(self, i, method: str):
        """Shard ``i``'s ``method()`` (no batch: nothing to log), rebuilding a lost shard, as
        :meth:`_call`'s ``(status, value)``."""
        def ask(actor):
            return getattr(actor, method)()
        return self._call(i, self._make(i, ask), ask)

    def _ask(self, i, method: str):
        """:meth:`_query`'s result, or its :class:`ShardError`."""
        status, value = self._query(i, method)
        self._raise({} if status == "ok" else {i: (status, value)})
        return value

    def checkpoint(self):
        """Checkpoints every shard now (and clears their replay logs). A shard that cannot be
        checkpointed keeps its log; the :class:`ShardError` is raised after the others are
        checkpointed (an error writing ``checkpoint_dir`` likewise)."""
        failed, write = {}, None
        for i in range(self.n_shards):
            status, value = self._query(i, "snapshot")
            if status != "ok":
                failed[i] = (status, value)
                continue
            batch, data = value
            self.saved[i] = (batch, data)
            self.log[i] = [entry for entry in self.log[i] if entry[0] > batch]
            if self.checkpoint_dir:
                try:
                    checkpoint.write_atomically(os.path.join(self.checkpoint_dir, f"shard_{i}.npz"),
                                                lambda f, data=data: f.write(data))
                except OSError as err:  # the driver holds the checkpoint: the others are still made
                    write = write or err
        self._raise(failed, _done(failed, self.n_shards, "was checkpointed"), write=write)

    def leaves(self) -> dict:
        """Every key's state (as NumPy leaves), gathered from the shards."""
        out = {}
        for i in range(self.n_shards):
            out.update(self._ask(i, "leaves"))
        return out

    def n_keys(self) -> int:
        return sum(self._ask(i, "n_keys") for i in range(self.n_shards))


def _done(failed: dict, n: int, what: str) -> str:
    """What the shards of a call that did not fail did: ``what`` (a verb phrase)."""
    if len(failed) == n:
        return ""
    return f"every {'other ' if failed else ''}shard {what}"


def _send(actor, entry):
    """A log entry ``(batch, keys, X, Y)`` sent to a shard's actor (``keys`` ``None``: a flush)."""
    batch, keys, X, Y = entry
    return actor.flush(batch) if keys is None else actor.learn(batch, keys, X, Y)
