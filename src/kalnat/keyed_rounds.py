"""How :class:`kalnat.keyed.Keyed` lays a chunk's rows out for its device calls (host side,
NumPy only).

The rows are grouped by key (slot), each key's rows kept in the stream's order
(:func:`group_rows`); round ``r`` holds each key's ``r``-th row (its ``r``-th minibatch, with
``batch_size = B``), and the keys are ordered by their number of rows, so that a round's
active keys are a prefix. :func:`grid` reads the rows of a block of rounds and keys off that
grouping, padded to powers of two (compiled shapes stay few) and masked.
:func:`keys_per_call` and :func:`rounds_per_call` bound a call's size, and :func:`filled` fills
its depth. :func:`groups` (and its :func:`stable_argsort`) also serve ``Keyed``'s lookup of
NumPy integer keys.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

# At most this many (round, lane) steps per call: a call's rows, copied into its grid, stay
# within this many rows however many rows a chunk gives one key (a chunk can be a whole call).
CALL_STEPS = 2**16


def pow2(n: int) -> int:
    """The least power of two at least ``n`` (1 for ``n ≤ 1``)."""
    return 1 << max(0, int(n) - 1).bit_length()


def rounds_per_call(width: int, batch: int = 1) -> int:
    """The most rounds of ``width`` lanes of ``batch`` rows a call takes: a power of two, so a
    call's padded grid stays within ``CALL_STEPS`` rows (``width`` from :func:`keys_per_call`)."""
    return 1 << (max(1, CALL_STEPS // (width * batch)).bit_length() - 1)


def filled(r0: int, r1: int, n_rounds: int) -> int:
    """The end of a call of rounds ``r0 … r1 − 1`` extended to every round its grid holds: the
    grid's depth is ``pow2(r1 − r0)`` rounds, whose steps the call takes whether they hold rows or
    are masked, so the next rounds' rows (of the same keys or fewer: the keys with more rows come
    first) fill them for nothing, and the calls they would have needed are not made: the same
    steps or fewer, and usually fewer compiled shapes (not always: the rounds left after a
    filled call can need a shallower call, of a shape not compiled yet). ``r1 − r0`` within
    :func:`rounds_per_call`, a power of two, keeps the depth within it."""
    return min(n_rounds, r0 + pow2(r1 - r0))


def keys_per_call(lanes: int, batch: int = 1) -> int:
    """The most keys a call takes: ``lanes`` (``kalnat.keyed.LANE_BYTES`` of states), and no more than
    ``CALL_STEPS`` rows in one round (small states: 10⁵ keys of a few parameters)."""
    return max(2, min(lanes, 1 << (max(1, CALL_STEPS // batch).bit_length() - 1)))


def stable_argsort(a: np.ndarray) -> np.ndarray:
    """``np.argsort(a, kind="stable")`` of integers ``a (n,)``, as a least-significant-digit
    radix sort on 16-bit digits: NumPy sorts 16-bit integers stably by counting, in O(n),
    while its stable sort of 64-bit ones is a merge sort (1.6 × 10⁵ rows of 10⁴ keys: 10 ms
    against 0.7 ms for one pass). As many passes as the span ``max − min`` needs: one up to
    65 536 slots, two up to 2³²; NumPy's own sort beyond."""
    if a.size == 0:
        return np.zeros(0, np.intp)
    u = (a.astype(np.int64, copy=False).view(np.uint64) ^ np.uint64(1 << 63) if a.dtype.kind == "i"
         else a.astype(np.uint64, copy=False))  # signed order as unsigned order
    u = u - u.min()
    bits = int(u.max()).bit_length()
    if bits > 32:  # hashed 64-bit ids: four passes measured slower than NumPy's merge sort
        return np.argsort(a, kind="stable")
    order = None
    for shift in range(0, max(1, bits), 16):
        digit = ((u if order is None else u[order]) >> np.uint64(shift)).astype(np.uint16)  # mod 2¹⁶
        step = np.argsort(digit, kind="stable")
        order = step if order is None else order[step]
    return order


def groups(a: np.ndarray):
    """``(order, head)`` of integers ``a (n,)``: ``order`` its stable argsort, ``head (n,)``
    whether ``a[order[i]]`` starts a new value (so ``order[head]`` holds each value's first
    row, in increasing order of value)."""
    order = stable_argsort(a)
    s = a[order]
    head = np.empty(a.size, bool)
    head[:1] = True
    np.not_equal(s[1:], s[:-1], out=head[1:])
    return order, head


class Rounds(NamedTuple):
    """A chunk's rows grouped by key (:func:`group_rows`). ``K`` keys, ordered by their number of
    rows, descending (ties by slot), so that round ``r``'s active keys are a prefix.

    Attributes:
      order: ``(n,)`` the rows grouped by slot, each key's rows in the stream's order.
      start: ``(K,)`` where each key's rows begin in ``order``.
      counts: ``(K,)`` each key's number of rows (descending).
      kslots: ``(K,)`` each key's slot.
      pos: ``(n,)`` each row's key's place in that order.
      rank: ``(n,)`` each row's round: its index among its key's rows.
    """

    order: np.ndarray
    start: np.ndarray
    counts: np.ndarray
    kslots: np.ndarray
    pos: np.ndarray
    rank: np.ndarray


def grid(g: Rounds, r0: int, r1: int, k0: int, k1: int, width: int, batch: int = 1):
    """``(grid, mask)``, each ``(depth, width, batch)``: the rows of rounds ``r0 … r1 − 1``
    (``batch`` rows a round) of the keys at positions ``k0 … k1 − 1``, read off each key's
    place in ``g.order`` (O(the call), not a pass over the chunk per call). ``depth`` is
    ``r1 − r0`` rounded up to a power of two; a padded place reads a real row (the block's
    first key's first) and is masked."""
    depth = pow2(r1 - r0)
    rank = np.arange(r0, r0 + depth)[:, None, None] * batch + np.arange(batch)  # a key's row index
    mask = np.zeros((depth, width, batch), bool)
    mask[:, :k1 - k0] = (rank < r1 * batch) & (rank < g.counts[k0:k1, None])
    at = np.zeros((depth, width, batch), np.int64)
    at[:, :k1 - k0] = g.start[k0:k1, None] + rank
    return g.order[np.where(mask, at, g.start[k0])], mask


def group_rows(slots: np.ndarray) -> Rounds:
    """Groups a chunk's rows by key (slot), keeping each key's rows in order (:class:`Rounds`)."""
    order, head = groups(slots)
    n = slots.size
    starts = np.flatnonzero(head)
    counts = np.diff(np.append(starts, n))
    by_count = np.argsort(-counts, kind="stable")
    pos_of = np.empty_like(by_count)
    pos_of[by_count] = np.arange(by_count.size)
    group = np.cumsum(head) - 1  # the group of the row order[i]
    pos, rank = np.empty(n, np.int64), np.empty(n, np.int64)
    pos[order] = pos_of[group]
    rank[order] = np.arange(n) - starts[group]
    return Rounds(order, starts[by_count], counts[by_count], slots[order[starts]][by_count], pos, rank)
