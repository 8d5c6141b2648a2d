"""Keyed learners: one learner definition, one independent state per key (user, sensor, store).

:class:`Keyed` holds the states of every key seen so far stacked on a leading *slot* axis of
a fixed capacity, with a key → slot dict on the host. A call's rows (or each ``chunk_size``
of them) are learned by a few jitted, state-donating programs: the rows are grouped by key into
*rounds* (round ``r`` holds each key's ``r``-th row, so a key's rows stay in order), the states
of their keys are gathered by slot index, advanced round after round by one ``vmap`` of the
learner's ``step`` (a mask leaves the keys with fewer rows as they are), and scattered back
in place. Compiled shapes are the capacity and the (keys, rounds) sizes of a segment, all
powers of two, so new keys cost no compilation: the capacity doubles when it runs out.

Every key's filter is the learner's own: its states and progressive predictions are those of
``learner.update`` (or :func:`kalnat.fit` with ``batch_size=1``) run on that key's rows alone
(tests/test_keyed.py checks bit-identity in float64). With ``batch_size=B`` a key's rows are
learned B at a time, as :func:`kalnat.fit` with ``batch_size=B`` on its rows alone.

    >>> keyed = Keyed(kalnat.ekf(model, family), model.init(None))   # doctest: +SKIP
    >>> result = keyed.learn(keys, X, y)      # predictions made before learning each row
    >>> keyed.save("keyed.npz"); keyed = Keyed.load("keyed.npz", learner, params)
"""

from __future__ import annotations

import collections
import math
from typing import Any, Hashable, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from kalnat import blas, checkpoint, keyed_rounds, programs
from kalnat.learners.base import check_range, device_hyper
from kalnat.programs import once
from kalnat.validation import plain, positive_int

__all__ = ["Keyed", "KeyedResult"]

# Device calls whose outputs may wait to be read back: the host builds the next calls while the
# device runs these, and a long learn() holds the (padded) outputs of this many calls at most,
# not of all its calls (a chunk's calls are generated one at a time).
PENDING_CALLS = 8

# A chunk's rows are learned in segments of rounds whose number of active keys lies in
# (W/2, W] for a power of two W: padding costs at most 2× in keys and 2× in rounds. A call takes
# the states of at most LANE_BYTES worth of keys (two at least), so that its rounds run in cache.
LANE_BYTES = 2**23

# NumPy integer keys are found in a large sorted array and a small one that the keys added since
# join first (copying the large one each call that adds keys costs O(all keys)); the small one
# joins the large one once it holds more than RECENT_KEYS · max(1, √(large) / 256) keys.
RECENT_KEYS = 4096


class KeyedResult(NamedTuple):
    """The outcome of :meth:`Keyed.learn`, in the order of the rows given.

    Attributes:
      predictions: one per row (the learner's ``Predictive``), made from the key's state
        before learning the row.
      log_likelihood: ``(n,)`` each row's one-step predictive log-likelihood.
      slots: ``(n,)`` the slot of each row's key.
    """

    predictions: Any
    log_likelihood: np.ndarray
    slots: np.ndarray


def _where(mask, new, old):
    return jax.tree_util.tree_map(
        lambda a, b: jnp.where(mask.reshape(mask.shape + (1,) * (a.ndim - 1)), a, b), new, old)


def _segment_fn(learner):
    """``(hyper, stack, slots (W,), xs (R, W, …), ys (R, W, …), ms (R, W)) -> (stack,
    (preds, log_liks) (R, W, …))``, jitted with the stack donated (cached per learner)."""
    def fn(hyper, stack, slots, xs, ys, ms):
        states = jax.tree_util.tree_map(lambda a: jnp.take(a, slots, axis=0, mode="clip"), stack)
        one = jax.vmap(lambda s, x, y: learner.step(hyper, s, x[None], y[None]))

        def body(states, inp):
            x, y, m = inp
            new, pred, ll = one(states, x, y)
            return _where(m, new, states), jax.tree_util.tree_map(lambda a: a[:, 0], (pred, ll))

        states, out = jax.lax.scan(body, states, (xs, ys, ms))
        # Padding slots point past the capacity: their (unchanged) states are dropped.
        stack = jax.tree_util.tree_map(lambda a, s: a.at[slots].set(s, mode="drop"), stack, states)
        return stack, out

    return programs.jit(learner, "segment", fn, donate_argnums=1)


def _minibatch_segment_fn(learner):
    """:func:`_segment_fn` with ``B`` rows per step: ``(hyper, stack, slots (W,), xs (R, W, B,
    …), ys (R, W, B, …), ms (R, W, B), commit (R, W)) -> (stack, (preds, log_liks) (R, W, B,
    …))``. A minibatch's masked rows are left out of its update (``learner.step``'s mask, as
    :func:`kalnat.fit` pads a partial one); a minibatch not committed (a key's partial last
    one, held for its next rows) is predicted, and its state left as it was."""
    def fn(hyper, stack, slots, xs, ys, ms, commit):
        states = jax.tree_util.tree_map(lambda a: jnp.take(a, slots, axis=0, mode="clip"), stack)
        one = jax.vmap(lambda s, x, y, m: learner.step(hyper, s, x, y, m))

        def body(states, inp):
            x, y, m, c = inp
            new, pred, ll = one(states, x, y, m)
            return _where(c, new, states), (pred, ll)

        states, out = jax.lax.scan(body, states, (xs, ys, ms, commit))
        stack = jax.tree_util.tree_map(lambda a, s: a.at[slots].set(s, mode="drop"), stack, states)
        return stack, out

    return programs.jit(learner, "minibatch", fn, donate_argnums=1)


def _predict_fn(learner):
    """``(hyper, stack, fresh, slots (b,), known (b,), xs (b, …)) -> preds (b, …)``."""
    def fn(hyper, stack, fresh, slots, known, xs):
        states = jax.tree_util.tree_map(lambda a: jnp.take(a, slots, axis=0, mode="clip"), stack)
        fresh = jax.tree_util.tree_map(lambda a: jnp.broadcast_to(a, (slots.shape[0],) + a.shape), fresh)
        states = _where(known, states, fresh)
        pred = jax.vmap(lambda s, x: learner.predict_batch(hyper, s, x[None]))(states, xs)
        return jax.tree_util.tree_map(lambda a: a[:, 0], pred)

    return programs.jit(learner, "predict", fn)


def _grow_fn(learner):
    return once(learner, "grow", lambda: jax.jit(
        lambda stack, fresh, extra: jax.tree_util.tree_map(
            lambda a, f: jnp.concatenate([a, jnp.broadcast_to(f, (extra,) + f.shape)]), stack, fresh),
        static_argnums=2))


class _Outputs:
    """The rows' outputs ``(preds, log_liks)``, each ``(n, …)``, filled from device calls'
    outputs ``(rows, index, outputs)``: row ``rows[j]`` is ``outputs[index][j]`` (index: the
    row's round, lane and, with minibatches, place in its minibatch). At most
    ``PENDING_CALLS`` calls' outputs wait on the device; reading the oldest back blocks only
    on that call."""

    def __init__(self, n: int):
        self.n, self.out, self.queue = n, None, collections.deque()

    def add(self, rows, index, seg):
        self.queue.append((rows, index, seg))
        while len(self.queue) > PENDING_CALLS:
            self._read(*self.queue.popleft())

    def result(self):
        while self.queue:
            self._read(*self.queue.popleft())
        return self.out

    def _read(self, rows, index, seg):
        seg = jax.tree_util.tree_map(np.asarray, seg)
        if self.out is None:
            self.out = jax.tree_util.tree_map(lambda a: np.zeros((self.n,) + a.shape[len(index):], a.dtype), seg)
        jax.tree_util.tree_map(lambda o, a: o.__setitem__(rows, a[index]), self.out, seg)


class Keyed:
    """One ``learner`` per key, every key starting from ``learner.init(params, hyper)``.

    Args:
      learner: any kalnat learner (core learners, a bank from :func:`kalnat.auto` or
        :func:`kalnat.ekf_bank`): anything with ``init`` and a pure ``step``.
      params: the model's initial parameters, every key's start.
      hyper: the hyperparameters, shared by every key (default the learner's own).
      capacity: initial number of slots (rounded up to a power of two); doubles as needed.
      batch_size: rows per update of each key: a key's consecutive rows are learned
        ``batch_size`` at a time (one linearisation point, :func:`kalnat.fit`'s minibatch),
        across calls of :meth:`learn`; a key's rows that do not fill a minibatch yet are
        predicted (from the state the whole minibatch will be learned from) and held until
        its next rows complete it, or until :meth:`flush` learns them as a partial minibatch.
        After :meth:`flush`, every key's state is ``kalnat.fit(learner, …, batch_size=B)`` on
        its rows alone.
    """

    def __init__(self, learner, params, *, hyper=None, capacity: int = 16, batch_size: int = 1):
        capacity = positive_int(capacity, "capacity")
        self.batch_size = positive_int(batch_size, "batch_size")
        # batch_size > 1: each key's rows of a partial minibatch, predicted and not yet learned
        # (slot -> (xs (r, …), ys (r, …)), r < batch_size); learned once the key's next rows
        # complete the minibatch, or by flush()
        self.pending: dict = {}
        self.learner = learner
        self.params = params
        self.fresh = learner.init(params, hyper)  # every new key's state
        self._dtype = learner._dtype(self.fresh)
        self._hyper = device_hyper(learner, hyper, self._dtype)
        if hyper is not None:
            learner.check_given_hyper(hyper, self.fresh)
        self._set_keys([])
        self.capacity = keyed_rounds.pow2(capacity)
        per_key = sum(a.size * a.dtype.itemsize for a in jax.tree_util.tree_leaves(self.fresh))
        self._lanes = max(2, 1 << max(1, LANE_BYTES // max(per_key, 1)).bit_length() - 1)
        self.stack = _grow_fn(learner)(
            jax.tree_util.tree_map(lambda a: a[None][:0], self.fresh), self.fresh, self.capacity)

    def _set_keys(self, keys: list):
        self.keys = keys  # slot -> key
        self.slot = {k: i for i, k in enumerate(keys)}
        # the integer keys, sorted, and their slots, in a large and a small part: NumPy integer
        # keys are found by binary search (_index_slots); self.keys[:_indexed] are in them
        self._index, self._recent, self._indexed = _no_index(), _no_index(), 0

    def __len__(self) -> int:
        return len(self.keys)

    def __contains__(self, key) -> bool:
        return plain(key) in self.slot

    def known(self, keys: Sequence[Hashable]) -> np.ndarray:
        """``(n,)`` booleans: whether each of ``keys`` has a state (``key in self`` for each, by
        the lookup :meth:`learn` uses: one pass for a NumPy array of ints or strings)."""
        return self._slots(keys, len(keys), add=False)[1]

    # ---- keys -> slots ------------------------------------------------------------------

    def _slots(self, keys, n: int, add: bool) -> tuple[np.ndarray, np.ndarray]:
        """``(slots (n,), known (n,))`` of the rows' keys; with ``add``, new keys get slots
        in order of first appearance (and the capacity grows)."""
        # A NumPy array of ints or strings is grouped by np.unique; anything else key by key
        # (np.asarray of a list would turn [7, "a"] into the strings "7" and "a").
        arr = keys if isinstance(keys, np.ndarray) and keys.ndim == 1 and keys.dtype.kind in "iuSU" else None
        if arr is not None:
            if arr.shape[0] != n:
                raise ValueError(f"keys has {arr.shape[0]} entries but X has {n} rows")
            if arr.dtype.kind in "iu":  # np.unique's merge sort, by radix (keyed_rounds.stable_argsort)
                order, head = keyed_rounds.groups(arr)
                first = order[head]  # each key's first row: the sort is stable
                ukeys = arr[first]
                inv = np.empty(n, np.int64)
                inv[order] = np.cumsum(head) - 1
                uslots = self._index_slots(ukeys)
            else:
                uniq, first, inv = np.unique(arr, return_index=True, return_inverse=True)
                ukeys = uniq.tolist()
        else:
            keys = list(keys)
            if len(keys) != n:
                raise ValueError(f"keys has {len(keys)} entries but X has {n} rows")
            index, ukeys, first, inv = {}, [], [], np.empty(n, np.int64)
            for i, k in enumerate(keys):
                k = plain(k)
                if add and isinstance(k, float) and math.isnan(k):  # unequal to itself: each a key of its own, never found again
                    raise ValueError(f"keys[{i}] = {k!r}: a missing value is not a key (drop those rows "
                                     "or give them a key)")
                try:
                    j = index.setdefault(k, len(ukeys))
                except TypeError:
                    raise ValueError(f"keys[{i}] = {k!r} is not hashable: keys must be hashable "
                                     "(str, int, tuple, …)") from None
                if j == len(ukeys):
                    ukeys.append(k)
                    first.append(i)
                inv[i] = j
            first = np.asarray(first, np.int64)
        if not isinstance(ukeys, np.ndarray):
            uslots = np.fromiter((self.slot.get(k, -1) for k in ukeys), np.int64, len(ukeys))
        if add:
            new = np.flatnonzero(uslots < 0)
            new = new[np.argsort(first[new], kind="stable")]
            start = len(self.keys)
            for j, k in enumerate(_take(ukeys, new)):
                self.slot[k] = start + j
                self.keys.append(k)
            uslots[new] = start + np.arange(new.size)
            self._reserve(len(self.keys))
        slots = uslots[inv]
        return np.maximum(slots, 0), slots >= 0

    def _index_slots(self, uvals: np.ndarray) -> np.ndarray:
        """``(u,)`` the slots of distinct integers ``uvals`` (−1: none yet), by binary search in
        the sorted integer keys: a dict lookup per key costs ~0.5 µs in Python, 50 ms a call
        at 10⁵ keys. A value not found there is looked up in the dict (which also holds keys
        that equal an integer without being one, such as 3.0)."""
        if self._indexed < len(self.keys):  # keys added since
            # exactly int or bool: a subclass may define its own equality (the dict's business)
            add = [(k, i) for i, k in enumerate(self.keys[self._indexed:], self._indexed)
                   if type(k) in (int, bool) and -2**63 <= k < 2**63]
            if add:
                # a call adding a few keys to 10⁶ copies ~12 000 of them, not 10⁶ (RECENT_KEYS)
                self._recent = _merged(self._recent, np.array(add, np.int64).T)
                if self._recent[0].size > RECENT_KEYS * max(1, math.isqrt(self._index[0].size) // 256):
                    self._index, self._recent = _merged(self._index, self._recent), _no_index()
            self._indexed = len(self.keys)
        out = np.full(uvals.size, -1, np.int64)
        fits = np.flatnonzero(uvals <= np.iinfo(np.int64).max) if uvals.dtype.kind == "u" else np.arange(uvals.size)
        v = uvals[fits].astype(np.int64)
        for keys, slots in (self._index, self._recent):
            if keys.size:
                at = np.minimum(np.searchsorted(keys, v), keys.size - 1)
                hit = keys[at] == v
                out[fits[hit]] = slots[at[hit]]
        miss = np.flatnonzero(out < 0)
        if miss.size:
            out[miss] = np.fromiter((self.slot.get(k, -1) for k in uvals[miss].tolist()), np.int64, miss.size)
        return out

    def _reserve(self, n: int):
        if n > self.capacity:
            capacity = keyed_rounds.pow2(n)
            self.stack = _grow_fn(self.learner)(self.stack, self.fresh, capacity - self.capacity)
            self.capacity = capacity

    # ---- learning and prediction --------------------------------------------------------

    def _check(self, X, Y=None):
        xs, single = self.learner.check_x(self.fresh, X)
        if single and not self._rows_of_single(X):
            raise ValueError(f"X must have a leading row axis, got shape {np.shape(X)}")
        if single:  # a plain function's batch of one row, which it also reads as one observation
            xs = np.asarray(X)
        if Y is None:
            return xs, None
        ys = self.learner.family.check(Y)
        check_range(ys, self._dtype, "y")
        if ys.ndim == len(self.learner.family.event_shape):
            raise ValueError(f"Y must have a leading row axis, got shape {ys.shape}")
        if ys.shape[0] != xs.shape[0]:
            raise ValueError(f"X has {xs.shape[0]} rows but Y has {ys.shape[0]}")
        return xs.astype(self._dtype, copy=False), ys

    def _rows_of_single(self, X) -> bool:
        """Whether ``X``'s first axis indexes observations the model takes (``X`` holds rows, as
        Keyed's ``X`` always does, though the model may read it as one observation too)."""
        x = np.asarray(X)
        if x.ndim == 0 or x.shape[0] == 0:
            return False
        try:
            return self.learner.check_x(self.fresh, x[0])[1]
        except ValueError:
            return False

    def learn(self, keys: Sequence[Hashable], X, Y, *, chunk_size: Optional[int] = None,
              return_predictions: bool = True) -> Optional[KeyedResult]:
        """Learns rows ``X (n, …)``, ``Y (n, …)`` in order, row ``i`` by the state of
        ``keys[i]`` (new keys start from the prior). Each key's rows are learned one at a
        time, in the order given, exactly as ``learner.update`` would (``batch_size`` at a
        time: see :class:`Keyed`). Returns a :class:`KeyedResult` (``None`` without
        ``return_predictions``). Input is validated before anything is learned.

        ``chunk_size`` rows (default: all ``n``) are grouped by key into rounds at a time. A
        key's state is gathered and written back once per device call that holds its rows; a
        call holds a run of rounds over which the number of keys with rows stays within a
        power of two (and at most ``keyed_rounds.CALL_STEPS`` steps), filled up to its
        power-of-two depth with the next rounds' rows (``keyed_rounds.filled``), so a chunk
        holding more rows of each key costs less per row (docs/keyed.md). ``chunk_size``
        bounds the memory of that grouping (~50 bytes a row); the keys' lookup and the outputs
        cover all ``n`` rows."""
        xs, ys = self._check(X, Y)
        n = xs.shape[0]
        if chunk_size is None:
            chunk_size = max(n, 1)
        chunk_size = positive_int(chunk_size, "chunk_size")
        slots, _ = self._slots(keys, n, add=True)
        outputs = _Outputs(n)
        learn_chunk = self._learn_chunk if self.batch_size == 1 else self._learn_minibatches
        with blas.one_thread():
            for start in range(0, n, chunk_size):
                stop = min(start + chunk_size, n)
                for rows, index, seg in learn_chunk(slots[start:stop], xs[start:stop], ys[start:stop],
                                                    return_predictions):
                    outputs.add(rows + start, index, seg)
            jax.block_until_ready(self.stack)  # the last call's factorisations within the limit too
        if not return_predictions:
            return None
        out = outputs.result()
        if out is None:
            return KeyedResult(None, np.zeros(0, self._dtype), slots)
        return KeyedResult(*out, slots)

    def _learn_chunk(self, slots, xs, ys, keep):
        """A generator of the chunk's calls' ``(rows, index, outputs)`` (:class:`_Outputs`;
        none unless ``keep``): a call is made when it is asked for, so that the calls waiting
        to be read back stay within ``PENDING_CALLS``."""
        g = keyed_rounds.group_rows(slots)
        fn = _segment_fn(self.learner)
        lanes = keyed_rounds.keys_per_call(self._lanes)
        r0 = 0
        n_rounds = int(g.counts[0])
        while r0 < n_rounds:
            active = int(np.count_nonzero(g.counts > r0))  # keys with a row in round r0
            width = keyed_rounds.pow2(active)
            # the rounds whose active keys still number more than width/2
            r1 = int(g.counts[width // 2]) if width // 2 < g.counts.size else n_rounds
            r1 = max(r1, r0 + 1)
            # At least two lanes: a vmap over one lane compiles to a program that rounds some
            # steps differently from learner.update (seen in float64); two or more match it.
            # At most `lanes` keys per call: a call's states then stay within LANE_BYTES (a
            # larger gathered block makes every round stream it from memory: 5× slower).
            width = min(max(2, width), lanes)
            r1 = keyed_rounds.filled(r0, min(r1, r0 + keyed_rounds.rounds_per_call(width)), n_rounds)
            for k0 in range(0, active, lanes):
                k1 = min(active, k0 + lanes)
                # the last block of many keys: as wide as its own keys need
                yield from self._learn_block(fn, g, r0, r1, k0, k1, min(width, max(2, keyed_rounds.pow2(k1 - k0))),
                                             xs, ys, keep)
            r0 = r1

    def _learn_block(self, fn, g: keyed_rounds.Rounds, r0, r1, k0, k1, width, xs, ys, keep):
        """Rounds ``r0 … r1 − 1`` of the keys at positions ``k0 … k1 − 1`` of the chunk, one
        call. Returns ``[(rows, index, outputs)]`` (:class:`_Outputs`; empty unless ``keep``)."""
        r1 = min(r1, int(g.counts[k0]))  # the block's first key has the most rows
        grid, mb = (a[..., 0] for a in keyed_rounds.grid(g, r0, r1, k0, k1, width))
        seg_slots = np.full(width, self.capacity, np.int64)  # padding: past the end
        seg_slots[:k1 - k0] = g.kslots[k0:k1]
        self.stack, seg = fn(self._hyper, self.stack, seg_slots, xs[grid], ys[grid], mb)
        # Not read back here: the host builds the next call's blocks while the device runs this one.
        if not keep:
            return []
        index = np.nonzero(mb)
        return [(grid[index], index, seg)]

    def flush(self):
        """Learns every key's held rows (``batch_size > 1``: a minibatch its rows have not
        completed) as a partial minibatch, as :func:`kalnat.fit` learns a stream's last one.
        Their predictions were returned by :meth:`learn`; a key's next row starts a new
        minibatch."""
        if self.pending:  # a generator: nothing is learned until it is run through
            with blas.one_thread():
                for _ in self._learn_minibatches(np.zeros(0, np.int64), None, None, False, final=True):
                    pass
                jax.block_until_ready(self.stack)

    def _learn_minibatches(self, slots, xs, ys, keep, final=False):
        """``batch_size > 1``: the chunk's rows after each key's held ones, grouped per key into
        minibatches of ``B`` consecutive rows; round ``r`` holds each key's ``r``-th minibatch.
        Complete minibatches are learned; a key's partial last one is predicted and held
        (learned too when ``final``). A generator of each call's ``(rows, index, outputs)``
        (none unless ``keep``), as :meth:`_learn_chunk`: a call is made when it is asked for."""
        B, n = self.batch_size, slots.size
        held = sorted(self.pending) if final else [s for s in np.unique(slots).tolist() if s in self.pending]
        if xs is None:  # flush: the rows' shapes from the held ones
            x0, y0 = self.pending[held[0]]
            xs, ys = x0[:0], y0[:0]
        ext_slots = np.concatenate([np.repeat(np.asarray(held, np.int64),
                                              [len(self.pending[s][0]) for s in held]), slots])
        ext_x = np.concatenate([self.pending[s][0] for s in held] + [xs])
        ext_y = np.concatenate([self.pending[s][1] for s in held] + [ys])
        first_new = ext_slots.size - n  # the held rows come first: each key's rows stay in order
        g = keyed_rounds.group_rows(ext_slots)
        counts, kslots, pos, rank = g.counts, g.kslots, g.pos, g.rank  # counts: each key's rows, descending
        mbi = rank // B  # each row's minibatch among its key's
        n_mb = -(-counts // B)  # each key's minibatches (its last one possibly partial)
        learned = n_mb if final else counts // B  # the ones learned now
        for s in held:
            del self.pending[s]
        if not final:  # a key's partial last minibatch: its rows held
            # found for all keys at once and grouped by key (each key's in order): a search
            # of the chunk per key costs O(keys × rows)
            rows = np.flatnonzero((counts % B != 0)[pos] & (mbi == n_mb[pos] - 1))
            rows = rows[np.argsort(pos[rows], kind="stable")]
            ks, starts = np.unique(pos[rows], return_index=True)
            hx, hy = ext_x[rows], ext_y[rows]                    # copies: fancy indexing
            bounds = starts.tolist() + [rows.size]
            for i, slot in enumerate(kslots[ks].tolist()):
                self.pending[slot] = (hx[bounds[i]:bounds[i + 1]], hy[bounds[i]:bounds[i + 1]])
        fn = _minibatch_segment_fn(self.learner)
        r0, n_rounds = 0, int(n_mb[0]) if n_mb.size else 0
        while r0 < n_rounds:
            active = int(np.count_nonzero(n_mb > r0))
            width = keyed_rounds.pow2(active)
            r1 = int(n_mb[width // 2]) if width // 2 < n_mb.size else n_rounds
            r1 = max(r1, r0 + 1)
            width = max(2, width)  # two lanes at least (see _learn_chunk)
            lanes = keyed_rounds.keys_per_call(self._lanes, B)  # as for B = 1
            r1 = keyed_rounds.filled(  # as _learn_chunk
                r0, min(r1, r0 + keyed_rounds.rounds_per_call(min(width, lanes), B)), n_rounds)
            for k0 in range(0, active, lanes):
                k1 = min(active, k0 + lanes)
                rr1 = min(r1, int(n_mb[k0]))
                w = min(width, lanes, max(2, keyed_rounds.pow2(k1 - k0)))  # as _learn_chunk
                grid, mb = keyed_rounds.grid(g, r0, rr1, k0, k1, w, B)
                depth = mb.shape[0]
                seg_slots = np.full(w, self.capacity, np.int64)  # padding: past the end
                seg_slots[:k1 - k0] = kslots[k0:k1]
                xb, yb = ext_x[grid], ext_y[grid]
                commit = np.zeros((depth, w), bool)
                commit[:, :k1 - k0] = (r0 + np.arange(depth))[:, None] < learned[k0:k1][None, :]
                commit &= mb.any(axis=2)  # a round past the block's (depth is a power of two): no step
                self.stack, seg = fn(self._hyper, self.stack, seg_slots, xb, yb, mb, commit)
                if keep:
                    index = np.nonzero(mb)
                    rows = grid[index]
                    new = rows >= first_new  # held rows were predicted when they arrived
                    yield rows[new] - first_new, tuple(i[new] for i in index), seg
            r0 = r1

    def predict(self, keys: Sequence[Hashable], X, *, chunk_size: int = 4096):
        """The one-step predictive of row ``i`` from ``keys[i]``'s current state (a key not
        seen yet: from the prior). Nothing is learned."""
        xs, _ = self._check(X)
        n = xs.shape[0]
        slots, known = self._slots(keys, n, add=False)
        fn = _predict_fn(self.learner)
        outs = []
        with blas.one_thread():
            for start in range(0, n, chunk_size):
                stop = min(start + chunk_size, n)
                b = keyed_rounds.pow2(stop - start)
                pad = lambda a: np.concatenate([a, np.repeat(a[:1], b - a.shape[0], axis=0)])  # noqa: E731
                out = fn(self._hyper, self.stack, self.fresh, pad(slots[start:stop]), pad(known[start:stop]),
                         pad(xs[start:stop].astype(self._dtype, copy=False)))
                outs.append(jax.tree_util.tree_map(lambda a: np.asarray(a)[:stop - start], out))
        return jax.tree_util.tree_map(lambda *a: np.concatenate(a), *outs)

    def state(self, key):
        """``key``'s current state (a copy; ``KeyError`` for a key not seen): its rows learned
        so far (not those held in a partial minibatch, ``batch_size > 1``)."""
        k = plain(key)
        if k not in self.slot:
            raise KeyError(f"no state for key {k!r}: it has not appeared in the rows learned")
        i = self.slot[k]
        return jax.tree_util.tree_map(lambda a: jnp.array(a[i], copy=True), self.stack)

    # ---- checkpoints --------------------------------------------------------------------

    def save(self, path, extra: Optional[dict] = None) -> str:
        """Writes every key's state and the key set to ``path`` (:mod:`kalnat.checkpoint`'s
        format, atomically), with JSON-able ``extra`` metadata. Keys must be ``str`` or ``int``
        to be saved (JSON)."""
        for i, k in enumerate(self.keys):
            if not saveable_key(k):
                raise ValueError(f"Keyed.save: key {k!r} (slot {i}) is a {type(k).__name__}; only str and "
                                 "int keys can be saved: map the keys to strings or integers first")
        meta = {"keys": self.keys, "capacity": self.capacity}
        tree = self.stack
        if self.batch_size > 1:
            meta["batch_size"] = self.batch_size
        if self.pending:  # the held rows too: a resumed run completes their minibatches
            held = sorted(self.pending)
            x0, y0 = self.pending[held[0]]

            def pad(a):  # to batch_size - 1 rows, the most a key holds
                return np.concatenate([a, np.zeros((self.batch_size - 1 - len(a),) + a.shape[1:], a.dtype)])
            tree = (self.stack, np.stack([pad(self.pending[h][0]) for h in held]),
                    np.stack([pad(self.pending[h][1]) for h in held]))
            meta["held"] = {"slots": held, "rows": [len(self.pending[h][0]) for h in held],
                            "x": [list(x0.shape[1:]), str(x0.dtype)], "y": [list(y0.shape[1:]), str(y0.dtype)]}
        return checkpoint.save(path, tree, extra=dict(extra or {}, keyed=meta))

    @classmethod
    def load(cls, path, learner, params, *, hyper=None) -> "Keyed":
        """A :class:`Keyed` restored from :meth:`save`'s file, for the same ``learner``,
        ``params`` (the template of shapes and every new key's start) and ``hyper``; its
        ``batch_size`` and held rows are the file's."""
        header = checkpoint.read_header(path)
        meta = header.get("extra", {}).get("keyed")
        if not isinstance(meta, dict) or not isinstance(meta.get("keys"), list):
            raise ValueError(f"{path}: not a keyed learner's checkpoint (no key set in its header)")
        keys, capacity = meta["keys"], int(meta["capacity"])
        batch_size = int(meta.get("batch_size", 1))
        keyed = cls(learner, params, hyper=hyper, capacity=capacity, batch_size=batch_size)
        if len(set(keys)) != len(keys) or len(keys) > capacity:
            raise ValueError(f"{path}: damaged key set ({len(keys)} keys, {len(set(keys))} distinct, "
                             f"capacity {capacity})")
        held = meta.get("held")
        if held:
            (xs, xd), (ys, yd), k = held["x"], held["y"], len(held["slots"])
            like = (keyed.stack, np.zeros((k, batch_size - 1, *xs), xd), np.zeros((k, batch_size - 1, *ys), yd))
            keyed.stack, hx, hy = checkpoint.load(path, like)
            for i, (slot, r) in enumerate(zip(held["slots"], held["rows"])):
                keyed.pending[int(slot)] = (np.array(hx[i, :r]), np.array(hy[i, :r]))
        else:
            keyed.stack = checkpoint.load(path, keyed.stack)
        keyed._set_keys(list(keys))
        return keyed


def saveable_key(key) -> bool:
    """Whether a checkpoint can hold ``key`` (JSON, one text per key): a str or an int, not a
    bool (``True`` and ``1`` are one key to a dict but not to JSON)."""
    return isinstance(key, (str, int)) and not isinstance(key, bool)


def _no_index():
    return np.zeros(0, np.int64), np.zeros(0, np.int64)


def _merged(a, b):
    """Two ``(sorted keys, slots)`` pairs as one (the keys distinct)."""
    o = np.argsort(b[0], kind="stable")
    at = np.searchsorted(a[0], b[0][o])
    return np.insert(a[0], at, b[0][o]), np.insert(a[1], at, b[1][o])


def _take(keys, index: np.ndarray) -> list:
    """``keys[index]`` as Python objects (``keys``: a list, or a NumPy array of integers)."""
    if isinstance(keys, np.ndarray):
        return keys[index].tolist()
    return [keys[i] for i in index.tolist()]

