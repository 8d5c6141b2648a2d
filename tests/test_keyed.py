"""Keyed learners: every key's state and predictions bit-identical (float64) to its filter run
alone, with keys appearing mid-stream, interleaved rows and capacity growth; exact resume from
a checkpoint; clear errors for keys that cannot be saved."""

import re

import jax
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import kalnat
from kalnat import families as F
from kalnat.keyed import Keyed
from kalnat.keyed_rounds import group_rows, stable_argsort

P_IN = 3
MODEL = kalnat.models.linear(P_IN)
BER, GAU = F.Bernoulli(), F.Gaussian(0.3)

# Built once: each jitted program compiles once for the file. The keyed code path is the same
# for every learner (only its step differs): a covariance filter, the normal–inverse-gamma
# filter (another state and family) and a bank stand for all.
LEARNERS = {
    "ekf": (kalnat.ekf(MODEL, BER, forgetting=0.99), BER),
    "nig": (kalnat.nig_filter(MODEL, GAU, forgetting=0.99), GAU),
    "bank": (kalnat.ekf_bank(MODEL, BER, prior_vars=(0.1, 1.0), forgettings=(1.0, 0.99)), BER),
}


def stream(family, n=90, seed=0):
    """Rows of five keys of very different frequencies; keys "d", "e" and 7 first appear late."""
    rng = np.random.default_rng(seed)
    keys = np.array(rng.choice(["a", "b", "c"], size=n, p=[0.6, 0.3, 0.1]), object)
    keys[n // 2::7] = "d"
    keys[2 * n // 3::5] = "e"
    keys[n - 3] = 7
    X = rng.normal(size=(n, P_IN))
    z = X @ np.array([1.0, -2.0, 0.5])
    Y = (rng.uniform(size=n) < 1 / (1 + np.exp(-z))).astype(float) if family is BER else z + 0.3 * rng.normal(size=n)
    return list(keys), X, Y


def leaves(state):
    return [np.asarray(a) for a in jax.tree_util.tree_leaves(state)]


def alone(learner, keys, X, Y, key):
    """``key``'s rows learned alone with ``learner.update``: (final state, prediction means)."""
    state = learner.init(MODEL.init(None))
    means = []
    for i in (i for i, k in enumerate(keys) if k == key):
        state, pred = learner.update(state, X[i], Y[i])
        means.append(np.asarray(pred.mean))
    return state, np.stack(means)


def one_pending_call(monkeypatch, factory: str) -> dict:
    """``PENDING_CALLS = 1`` and ``CALL_STEPS = 8``; every call of the jitted function that
    ``kalnat.keyed.<factory>`` makes checks that at most one earlier call's outputs still wait
    to be read back: within a chunk too, its calls being made one at a time. Returns the
    counts (``on``: checking; ``grid``: the largest call's rows, padding included)."""
    monkeypatch.setattr(kalnat.keyed, "PENDING_CALLS", 1)
    # a key's rows of one chunk split over several calls (a state gathered and written back
    # between them); the tests check that no call's grid is larger
    monkeypatch.setattr(kalnat.keyed_rounds, "CALL_STEPS", 8)
    count = {"made": 0, "read": 0, "on": True, "grid": 0}
    make, read = getattr(kalnat.keyed, factory), kalnat.keyed._Outputs._read

    def counted_factory(learner):
        fn = make(learner)

        def call(*args):
            if count["on"]:
                assert count["made"] - count["read"] <= 1, count
                count["made"] += 1
            count["grid"] = max(count["grid"], args[5].size)  # the mask (rounds, lanes[, rows])
            return fn(*args)
        return call

    def counted_read(self, *args):
        count["read"] += 1
        return read(self, *args)
    monkeypatch.setattr(kalnat.keyed, factory, counted_factory)
    monkeypatch.setattr(kalnat.keyed._Outputs, "_read", counted_read)
    return count


@pytest.mark.parametrize("name", sorted(LEARNERS))
def test_each_key_equals_its_filter_alone(name, monkeypatch):
    learner, family = LEARNERS[name]
    keys, X, Y = stream(family)
    keyed = Keyed(learner, MODEL.init(None), capacity=2)
    if name == "ekf":  # a segment's keys split over calls of two keys each (large states do this)
        keyed._lanes = 2
        # and each call's outputs read back as soon as the next call's are queued
        count = one_pending_call(monkeypatch, "_segment_fn")
    # ekf: two calls (keys appear in the second), small chunks: segments of many shapes; the
    # others (a step of their own under the same code) one call of one chunk: fewer compilations
    cut, chunks = (40, (16, 32)) if name == "ekf" else (0, (90, 90))
    r1 = keyed.learn(keys[:cut], X[:cut], Y[:cut], chunk_size=chunks[0])
    r2 = keyed.learn(keys[cut:], X[cut:], Y[cut:], chunk_size=chunks[1])
    assert len(keyed) == 6 and keyed.capacity == 8  # grown 2 -> 8
    if name == "ekf":  # key "a" has 7 and 19 rows in a chunk: its rounds split over calls
        assert count["grid"] == 8  # 4 rounds of two lanes at most
    means = r2.predictions.mean if cut == 0 else np.concatenate([r1.predictions.mean, r2.predictions.mean])
    lls = r2.log_likelihood if cut == 0 else np.concatenate([r1.log_likelihood, r2.log_likelihood])
    rows = np.arange(len(keys))
    for key in sorted(set(keys), key=str):
        state, ref_means = alone(learner, keys, X, Y, key)
        for a, b in zip(leaves(state), leaves(keyed.state(key))):
            assert np.array_equal(a, b), (name, key)
        assert np.array_equal(means[[k == key for k in keys]], ref_means), (name, key)
    if name == "ekf":  # and the log-likelihoods are fit's, key by key
        for key in ("a", "e"):
            sel = rows[[k == key for k in keys]]
            res = kalnat.fit(learner, learner.init(MODEL.init(None)), X[sel], Y[sel])
            assert np.array_equal(lls[sel], res.log_likelihood)
            assert np.array_equal(means[sel], res.predictions.mean)


def test_predict_and_unknown_keys():
    learner, family = LEARNERS["ekf"]
    keys, X, Y = stream(family)
    keyed = Keyed(learner, MODEL.init(None))
    keyed.learn(keys, X, Y)
    pred = keyed.predict(["a", "zz", 7], X[:3])
    ref_a = learner.predict(keyed.state("a"), X[0])
    fresh = learner.predict(learner.init(MODEL.init(None)), X[1])
    assert np.array_equal(pred.mean[0], ref_a.mean) and np.array_equal(pred.obs_cov[0], ref_a.obs_cov)
    assert np.array_equal(pred.mean[1], fresh.mean)
    assert "zz" not in keyed and 7 in keyed and np.int64(7) in keyed
    assert keyed.known(["a", "zz", 7, np.int64(7), 7.0, 8]).tolist() == [True, False, True, True, True, False]
    assert keyed.known(np.array([8, 7])).tolist() == [False, True]
    assert keyed.known(np.array(["zz", "a"])).tolist() == [False, True]
    with pytest.raises(KeyError, match="zz"):
        keyed.state("zz")


def test_numpy_keys_and_rounds():
    # integer keys as a NumPy array (the fast path) are the same keys as Python ints
    learner, family = LEARNERS["ekf"]
    _, X, Y = stream(family, n=30)
    ints = np.random.default_rng(1).integers(0, 4, size=30)
    a = Keyed(learner, MODEL.init(None))
    b = Keyed(learner, MODEL.init(None))
    ra = a.learn(ints, X, Y)
    rb = b.learn([int(k) for k in ints], X, Y)
    assert a.keys == b.keys and np.array_equal(ra.predictions.mean, rb.predictions.mean)
    # rounds: each row's rank among its key's rows, keys ordered by their number of rows
    _, _, counts, kslots, pos, rank = group_rows(np.array([5, 3, 5, 5, 3, 9]))
    assert kslots.tolist() == [5, 3, 9] and counts.tolist() == [3, 2, 1]
    assert rank.tolist() == [0, 0, 1, 2, 1, 0] and pos.tolist() == [0, 1, 0, 0, 1, 2]


INT_DTYPES = st.sampled_from([np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32, np.uint64])


@settings(max_examples=60, deadline=None, derandomize=True)
@given(st.data())
def test_radix_argsort_is_numpys_stable_argsort(data):
    """The grouping's radix sort (16-bit digits, as many passes as the span needs) equals
    NumPy's stable argsort: any integer dtype, negative values, the dtype's extremes, spans
    across digit boundaries, many ties."""
    dtype = np.dtype(data.draw(INT_DTYPES))
    info = np.iinfo(dtype)
    lo = data.draw(st.one_of(st.sampled_from([-2**63, -70_000, -3, 0]), st.integers(-2**63, 2**64 - 1)))
    lo = min(max(lo, int(info.min)), int(info.max))  # within the dtype: negatives, zero, extremes
    span = data.draw(st.sampled_from([0, 1, 2**16 - 1, 2**16, 2**16 + 1, 2**31, 2**40, 2**64]))
    hi = min(int(info.max), lo + span)
    # each value on its own (no fill value), the range's ends and a few values around 0 among them
    values = st.one_of(st.integers(lo, hi), st.sampled_from([lo, hi] + [v for v in (-1, 0, 1) if lo <= v <= hi]))
    a = np.array(data.draw(st.lists(values, max_size=300)), dtype)
    assert np.array_equal(stable_argsort(a), np.argsort(a, kind="stable"))


def test_rounds_by_a_plain_loop():
    """group_rows against its definition, row by row: keys ordered by rows (descending, ties by
    slot), each row's rank among its key's rows, each key's rows in stream order."""
    rng = np.random.default_rng(2)
    for slots in (rng.integers(0, 9, 200), rng.integers(0, 70_000, 300), np.array([4])):
        g = group_rows(slots)
        counts = {s: int(np.sum(slots == s)) for s in set(slots.tolist())}
        keys = sorted(counts, key=lambda s: (-counts[s], s))
        assert g.kslots.tolist() == keys and g.counts.tolist() == [counts[s] for s in keys]
        for j, s in enumerate(keys):
            rows = np.flatnonzero(slots == s)
            assert g.order[g.start[j]:g.start[j] + counts[s]].tolist() == rows.tolist()
            assert g.rank[rows].tolist() == list(range(rows.size)) and set(g.pos[rows].tolist()) == {j}


def test_integer_key_arrays_are_the_keys_given_one_by_one(monkeypatch):
    """NumPy integer keys (found by binary search in the sorted integer keys) are the dict's
    keys: the same slots as the same keys given in a list, across calls adding keys; a key
    that equals an integer without being one (3.0, True, an int subclass with an equality of
    its own) keeps its slot; integers past int64 (uint64) work."""
    monkeypatch.setattr(kalnat.keyed, "RECENT_KEYS", 2)  # keys split over both sorted parts

    class Tag(int):  # equal to nothing but itself
        __eq__, __hash__ = object.__eq__, object.__hash__

    learner, family = LEARNERS["ekf"]
    _, X, Y = stream(family, n=30)
    a = Keyed(learner, MODEL.init(None))
    b = Keyed(learner, MODEL.init(None))
    tag = Tag(11)
    a.learn([3.0, True, "u", tag], X[:4], Y[:4])  # from a list: the dict's keys 3.0, True, "u", tag
    b.learn([3.0, True, "u", tag], X[:4], Y[:4])
    calls = [np.array([5, 3, 1, -2**63, 5, 2**62, 11]), np.array([7, 5, 3, 1], np.int8),
             np.array([2**64 - 1, 2**63, 7, 11], np.uint64), np.array([-2**63, 2**64 - 1, 9], object)]
    for keys in calls:
        n = len(keys)
        ra = a.learn(keys, X[:n], Y[:n])
        rb = b.learn([k for k in keys.tolist()], X[:n], Y[:n])
        assert a.keys == b.keys and a.slot == b.slot
        assert np.array_equal(ra.slots, rb.slots) and np.array_equal(ra.predictions.mean, rb.predictions.mean)
    assert a.slot[3] == 0 and a.slot[1] == 1 and a.slot[tag] == 3  # 3 is 3.0's key, 1 is True's
    assert a.keys[4:] == [5, -2**63, 2**62, 11, 7, 2**64 - 1, 2**63, 9]  # in order of first appearance
    # the integer keys within int64 are found without the dict, in both sorted parts
    assert a._index[0].size and a._recent[0].size
    ints = np.array([1, 5, -2**63, 2**62, 11, 7, 9])
    monkeypatch.setattr(a, "slot", {})
    assert a._index_slots(ints).tolist() == [b.slot[k] for k in ints.tolist()]


def test_a_call_takes_at_most_call_steps_rows(monkeypatch):
    """Small states (many keys fit LANE_BYTES): a call still takes at most CALL_STEPS (round,
    key) steps, and each key's filter is still its own."""
    monkeypatch.setattr(kalnat.keyed_rounds, "CALL_STEPS", 4)
    learner, family = LEARNERS["ekf"]
    sizes, make = [], kalnat.keyed._segment_fn

    def recording(learner):
        fn = make(learner)
        return lambda *args: sizes.append(args[5].size) or fn(*args)
    monkeypatch.setattr(kalnat.keyed, "_segment_fn", recording)
    keys = [k for _ in range(3) for k in range(12)]  # 12 keys, 3 rows each: rounds of 12 keys
    _, X, Y = stream(family, n=len(keys))
    keyed = Keyed(learner, MODEL.init(None))
    assert keyed._lanes > 12
    res = keyed.learn(keys, X, Y)
    assert max(sizes) == 4
    for key in (0, 11):
        state, means = alone(learner, keys, X, Y, key)
        assert all(np.array_equal(p, q) for p, q in zip(leaves(state), leaves(keyed.state(key))))
        assert np.array_equal(res.predictions.mean[[k == key for k in keys]], means)


@pytest.mark.parametrize("batch", [1, 2])
def test_a_call_fills_the_rounds_of_its_grid_with_the_next_rounds_rows(batch, monkeypatch):
    """A call's grid is a power of two of rounds deep: rounds past its own segment (the rounds
    over which its number of keys stays within a power of two) would be steps of masked rows,
    so the next rounds' rows (of its keys with more rows) take them. Ten keys of 9 9 8 8 7 6 5
    4 3 2 rounds: three calls of (rounds, lanes) (4, 16), (4, 8) and (1, 2), each of whose
    rounds holds a row, where segments alone made four, the first with a round of none. Each
    key's filter is still its own. 2 000 rows of 50 keys drawn uniformly (as `kalnat learn
    --key` in benchmarks/startup.py) take one call, where segments alone made seven calls of
    seven shapes."""
    learner, family = LEARNERS["ekf"]
    name = "_segment_fn" if batch == 1 else "_minibatch_segment_fn"
    grids, make = [], getattr(kalnat.keyed, name)

    def recording(learner):
        fn = make(learner)
        return lambda *args: grids.append(args[5].reshape(args[5].shape[:2] + (-1,)).any(axis=2)) or fn(*args)
    monkeypatch.setattr(kalnat.keyed, name, recording)
    rounds = [9, 9, 8, 8, 7, 6, 5, 4, 3, 2]
    keys = [k for r in range(max(rounds)) for k in range(10) if r < rounds[k] for _ in range(batch)]
    _, X, Y = stream(family, n=len(keys))
    keyed = Keyed(learner, MODEL.init(None), batch_size=batch)
    res = keyed.learn(keys, X, Y)
    assert [g.shape for g in grids] == [(4, 16), (4, 8), (1, 2)]
    assert all(g.any(axis=1).all() for g in grids)  # no round of masked rows alone
    for key in range(10):
        sel = np.array([k == key for k in keys])
        ref = kalnat.fit(learner, learner.init(MODEL.init(None)), X[sel], Y[sel], batch_size=batch)
        assert all(np.array_equal(p, q) for p, q in zip(leaves(ref.state), leaves(keyed.state(key))))
        assert np.array_equal(res.predictions.mean[sel], ref.predictions.mean)
    if batch == 1:  # as benchmarks/startup.py's keyed file
        grids.clear()
        keys = np.random.default_rng(0).integers(0, 50, 2000).tolist()
        Keyed(learner, MODEL.init(None)).learn(keys, np.zeros((2000, P_IN)), np.zeros(2000),
                                              return_predictions=False)
        assert [g.shape for g in grids] == [(64, 64)]


def test_checkpoint_resume_equals_uninterrupted(tmp_path):
    learner, family = LEARNERS["ekf"]
    keys, X, Y = stream(family, seed=3)
    cut = 37
    whole = Keyed(learner, MODEL.init(None), capacity=2)
    ref = whole.learn(keys, X, Y)
    first = Keyed(learner, MODEL.init(None), capacity=2)
    first.learn(keys[:cut], X[:cut], Y[:cut])
    first.save(tmp_path / "k.npz")
    resumed = Keyed.load(tmp_path / "k.npz", learner, MODEL.init(None))
    assert resumed.keys == first.keys and resumed.capacity == first.capacity
    rest = resumed.learn(keys[cut:], X[cut:], Y[cut:])
    assert np.array_equal(rest.predictions.mean, ref.predictions.mean[cut:])
    for key in set(keys):
        for a, b in zip(leaves(whole.state(key)), leaves(resumed.state(key))):
            assert np.array_equal(a, b)


def test_errors(tmp_path):
    learner, family = LEARNERS["ekf"]
    _, X, Y = stream(family, n=4)
    keyed = Keyed(learner, MODEL.init(None))
    for keys in (["a", "b", "c"], np.array(["a", "b", "c"]), np.arange(3)):   # key by key, or grouped
        with pytest.raises(ValueError, match="keys has 3 entries but X has 4 rows"):
            keyed.learn(keys, X, Y)
    with pytest.raises(ValueError, match=r"Y must have a leading row axis, got shape \(\)"):
        keyed.learn(["a"], X[:1], Y[0])
    with pytest.raises(ValueError, match="X has 4 rows but Y has 3"):
        keyed.learn(["a"] * 4, X, Y[:3])
    with pytest.raises(ValueError, match=r"keys\[1\].*not hashable"):
        keyed.learn(["a", ["b"], "c", "d"], X, Y)
    with pytest.raises(ValueError, match="NaN"):
        keyed.learn(["a"] * 4, np.where(X > 1, np.nan, X), Y)
    # a missing key (a float column's NaN, as pandas gives it): each NaN row became a key of its
    # own, unequal to every other and never found again
    for keys in ([1.0, np.nan, 2.0, np.nan], np.array([1.0, np.nan, 2.0, np.nan]), ["a", float("nan"), "b", "c"]):
        with pytest.raises(ValueError, match=re.escape("keys[1] = nan: a missing value is not a key")):
            keyed.learn(keys, X, Y)
    assert len(keyed) == 0  # bad input: nothing learned, no key added
    assert not keyed.known([float("nan")])[0]   # (asked, not learned: a NaN is simply no key of it)
    with pytest.raises(KeyError, match=re.escape("no state for key 'zz': it has not appeared")):
        keyed.state(np.str_("zz"))   # (not np.str_('zz'))
    keyed.learn([("a", 1), "b", "b", 2], X, Y)
    with pytest.raises(ValueError, match=r"key \('a', 1\).*tuple.*str and int"):
        keyed.save(tmp_path / "k.npz")
    assert not (tmp_path / "k.npz").exists()
    kalnat.checkpoint.save(tmp_path / "plain.npz", learner.init(MODEL.init(None)))
    with pytest.raises(ValueError, match="not a keyed learner's checkpoint"):
        Keyed.load(tmp_path / "plain.npz", learner, MODEL.init(None))
    kalnat.checkpoint.save(tmp_path / "twice.npz", {"w": np.zeros(1)}, extra={"keyed": {"keys": ["a", "a"],
                                                                                        "capacity": 4}})
    with pytest.raises(ValueError, match=r"twice\.npz: damaged key set \(2 keys, 1 distinct, capacity 4\)"):
        Keyed.load(tmp_path / "twice.npz", learner, MODEL.init(None))


def test_a_plain_functions_one_row_is_a_row():
    """A plain function ``apply(p, x) = x @ w`` reads a one-row batch ``(1, 3)`` as one
    observation too: Keyed, whose X always has a row axis, learns it as that row (as
    learner.update does), and still asks for the row axis where X has none."""
    learner = kalnat.ekf(lambda p, x: x @ p["w"], GAU)
    params = {"w": np.zeros(P_IN)}
    _, X, Y = stream(GAU, n=2)
    keyed = Keyed(learner, params)
    res = keyed.learn(["a"], X[:1], Y[:1])
    state, pred = learner.update(learner.init(params), X[0], Y[0])
    assert np.array_equal(res.predictions.mean[0], pred.mean)
    assert all(np.array_equal(a, b) for a, b in zip(leaves(keyed.state("a")), leaves(state)))
    with pytest.raises(ValueError, match="X must have a leading row axis"):
        keyed.learn(["a"], X[0], Y[:1])


@pytest.mark.parametrize("name", sorted(LEARNERS))
def test_minibatches_per_key_equal_fit_on_each_keys_rows(name, tmp_path, monkeypatch):
    """batch_size = 3: each key's consecutive rows three at a time, across calls and chunks
    (a key's partial minibatch held until its next rows complete it, or flush()), equals
    kalnat.fit(batch_size=3) on the key's rows alone: states and predictions bit for bit."""
    B = 3
    learner, family = LEARNERS[name]
    keys, X, Y = stream(family)
    keyed = Keyed(learner, MODEL.init(None), capacity=2, batch_size=B)
    # ekf: several calls and small chunks (minibatches completed across them), a segment's keys
    # split over calls of two keys each, and a save with rows held, resumed from the file; the
    # others: one call
    cuts, chunk = ((0, 17, 41, 90), 13) if name == "ekf" else ((0, 90), 90)
    if name == "ekf":
        keyed._lanes = 2
        count = one_pending_call(monkeypatch, "_minibatch_segment_fn")
    results = []
    for a, b in zip(cuts[:-1], cuts[1:]):
        results.append(keyed.learn(keys[a:b], X[a:b], Y[a:b], chunk_size=chunk))
        if name == "ekf" and a == 17:
            assert keyed.pending  # rows held: the file keeps them
            keyed.save(tmp_path / "k.npz")
            held = {s: (x.copy(), y.copy()) for s, (x, y) in keyed.pending.items()}
            keyed = Keyed.load(tmp_path / "k.npz", learner, MODEL.init(None))
            keyed._lanes = 2
            assert keyed.batch_size == B and sorted(keyed.pending) == sorted(held)
            assert all(np.array_equal(keyed.pending[s][0], held[s][0]) for s in held)
    if name == "ekf":
        assert count["made"] > 4  # several calls per learn
        assert count["grid"] == 6  # 8 rows at most: one round of two lanes of 3 rows
        count["on"] = False  # flush's calls keep no outputs
    keyed.flush()
    assert not keyed.pending
    means = np.concatenate([r.predictions.mean for r in results])
    lls = np.concatenate([r.log_likelihood for r in results])
    for key in sorted(set(keys), key=str):
        sel = np.array([k == key for k in keys])
        # one scan shape for every key (fixed_chunk): one compilation
        res = kalnat.fit(learner, learner.init(MODEL.init(None)), X[sel], Y[sel], batch_size=B,
                         chunk_size=16, fixed_chunk=True)
        for a, b in zip(leaves(res.state), leaves(keyed.state(key))):
            assert np.array_equal(a, b), (name, key)
        assert np.array_equal(means[sel], res.predictions.mean), (name, key)
        # the normal–inverse-gamma log-likelihood (its log-gamma terms) rounds differently in
        # its last bit under vmap: 2e-16 apart, as with one row per update
        np.testing.assert_allclose(lls[sel], res.log_likelihood, rtol=0, atol=1e-15 if name == "nig" else 0)


# ---- kalnat learn --key ------------------------------------------------------------------------

def _keyed_csv(path, keys, X, y):
    with open(path, "w") as f:
        f.write("a,user,b,c,y\n")
        for k, row, t in zip(keys, X, y):
            f.write(f"{row[0]:.6g},{k},{row[1]:.6g},{row[2]:.6g},{int(t)}\n")
    return str(path)


def _cli(args):
    from click.testing import CliRunner

    from kalnat.cli import cli
    return CliRunner().invoke(cli, args, catch_exceptions=False)


SINGLE = ["--prior-var", "1", "--forget", "1", "--quiet"]  # one EKF per key: quick to compile


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    """Three reports learned once for the file: six keys (r), one key (k1) and the same rows
    without the key column (plain); new rows to predict (new.csv, with a key never learned)."""
    tmp = tmp_path_factory.mktemp("keyed_cli")
    keys, X, Y = stream(BER, n=80, seed=5)
    path = _keyed_csv(tmp / "d.csv", [str(k) for k in keys], X, Y)
    res = _cli(["learn", path, "--key", "user", "--out", str(tmp / "r"), *SINGLE])
    assert res.exit_code == 0, res.output
    # One key is one stream: the same learner and scaling as the command without --key.
    one = _keyed_csv(tmp / "one.csv", ["u"] * 80, X, Y)
    res = _cli(["learn", one, "--key", "user", "--out", str(tmp / "k1"), *SINGLE])
    assert res.exit_code == 0, res.output
    with open(tmp / "plain.csv", "w") as f:  # the same rows without the key column
        f.write("a,b,c,y\n" + "".join(f"{r[0]:.6g},{r[1]:.6g},{r[2]:.6g},{int(t)}\n" for r, t in zip(X, Y)))
    res = _cli(["learn", str(tmp / "plain.csv"), "--out", str(tmp / "plain"), "--scaling", "running", *SINGLE])
    assert res.exit_code == 0, res.output
    new_keys = ["a", "zz", "d", "b", "zz", "7", "c", "e"]
    new_X = np.vectorize(lambda v: float(f"{v:.6g}"))(np.random.default_rng(9).normal(size=(8, P_IN)))  # as written
    _keyed_csv(tmp / "new.csv", new_keys, new_X, np.zeros(len(new_keys)))
    _keyed_csv(tmp / "new_one.csv", ["u"] * len(new_keys), new_X, np.zeros(len(new_keys)))
    return tmp, new_keys, new_X


def test_cli_one_model_per_key(reports):
    import json

    tmp = reports[0]
    m = json.loads((tmp / "r" / "metrics.json").read_text())
    assert m["n_features"] == 3 and m["keyed"]["n_keys"] == 6 and m["rows_seen"] == 80
    assert m["keyed"]["rows_per_second"] > 0
    lines = (tmp / "r" / "per_key.csv").read_text().splitlines()
    assert lines[0] == "key,rows_scored,log_loss,accuracy" and len(lines) == 7
    per = [line.split(",") for line in lines[1:]]
    assert sum(int(r[1]) for r in per) == 80
    pooled = sum(int(r[1]) * float(r[2]) for r in per) / 80
    assert abs(pooled - m["final"]["log_loss"]) < 1e-5  # per_key.csv keeps 6 digits
    a = json.loads((tmp / "k1" / "metrics.json").read_text())
    b = json.loads((tmp / "plain" / "metrics.json").read_text())
    assert a["keyed"]["n_keys"] == 1 and a["n_features"] == b["n_features"] == 3
    assert a["final"] == b["final"]


def test_predict_with_a_keyed_model(reports):
    """`kalnat predict` on a keyed report: each row by its key's learned state (exactly what
    the learner's own predict gives from that state; a key never learned: from the prior), and
    with one key exactly the one-stream model's predictions."""
    from kalnat.cli_keyed import LoadedKeyedModel
    from kalnat.cli_predict import LoadedModel

    tmp, new_keys, new_X = reports
    model = LoadedKeyedModel.load(str(tmp / "r" / "keyed_model.npz"))
    assert model.key_name == "user" and len(model.keyed) == 6
    table, seen = model.predict_keyed(np.array(new_keys), new_X)
    assert seen.tolist() == [k != "zz" for k in new_keys]
    learner, Z = model.learner, model._scale(new_X)
    prior = learner.init(model.keyed.params)
    ref = [learner.predict(model.keyed.state(k) if k != "zz" else prior, z) for k, z in zip(new_keys, Z)]
    ref = model.table(jax.tree_util.tree_map(lambda *a: np.stack([np.asarray(v) for v in a]), *ref))
    assert table.shape == (8, 5) and np.array_equal(table, ref)
    assert not np.array_equal(table[0], table[3])  # keys a and b: states of their own
    assert np.all(table[:, 3:5] <= np.sqrt(table[:, 1:3] * (1 - table[:, 1:3])))
    # a probability's deviation is capped at √(p (1 − p)), where the linearised one is far above
    vague = learner.predict(prior, Z[:2])
    capped = model.table(vague._replace(mean_cov=np.asarray(vague.mean_cov) * 1e6))
    np.testing.assert_allclose(capped[:, 3:5], np.sqrt(capped[:, 1:3] * (1 - capped[:, 1:3])), rtol=1e-12)
    # the command: the key after the line, key_seen last, the unseen rows counted
    res = _cli(["predict", "--model-dir", str(tmp / "r"), str(tmp / "new.csv")])
    assert res.exit_code == 0, res.output
    out = res.stdout.splitlines()
    assert out[0] == "line,key,predicted,prob_0,prob_1,prob_std_0,prob_std_1,key_seen"
    assert [r.split(",")[1] for r in out[1:]] == new_keys and [r.split(",")[-1] for r in out[1:]] == \
        ["0" if k == "zz" else "1" for k in new_keys]
    assert [r.split(",")[3:-1] for r in out[1:]] == [[f"{v:.6g}" for v in row[1:]] for row in table]
    assert "2 rows of 1 keys not seen in learning" in res.stderr
    # one key: the one-stream model's predictions (float64 and the command's text)
    one = LoadedKeyedModel.load(str(tmp / "k1" / "keyed_model.npz"))
    plain = LoadedModel.load(str(tmp / "plain" / "model.npz"))
    t1, seen1 = one.predict_keyed(np.array(["u"] * 8), new_X)
    np.testing.assert_allclose(t1, plain.predict(new_X), rtol=1e-13, atol=0)
    a = _cli(["predict", "--model-dir", str(tmp / "k1"), str(tmp / "new_one.csv")]).stdout.splitlines()
    b = _cli(["predict", "--model-dir", str(tmp / "plain"), str(tmp / "new_one.csv")]).stdout.splitlines()
    assert [",".join(r.split(",")[:1] + r.split(",")[2:-1]) for r in a] == b
    # a new CSV without the key column: a located error
    res = _cli(["predict", "--model-dir", str(tmp / "r"), str(tmp / "plain.csv")])
    assert res.exit_code != 0 and "no key column 'user'" in res.output
    # an empty key, which learning refuses, is predicted as a key never seen: from the prior
    blank = _keyed_csv(tmp / "blank.csv", ["a", ""], new_X[:2], np.zeros(2))
    res = _cli(["predict", "--model-dir", str(tmp / "r"), blank])
    assert res.exit_code == 0 and [r.split(",")[-1] for r in res.stdout.splitlines()[1:]] == ["1", "0"], res.output


def test_cli_key_with_batch_size(reports):
    """--key with --batch-size 3: each key's rows three at a time across the CSV's chunks (7
    rows: minibatches straddle them; 80 rows: the last one partial, learned at the end); with
    one key, the one-stream command's minibatches (one chunk): the same scores and state."""
    import json

    from kalnat.cli_keyed import LoadedKeyedModel
    from kalnat.cli_predict import LoadedModel

    tmp = reports[0]
    B = ["--batch-size", "3"]
    res = _cli(["learn", str(tmp / "one.csv"), "--key", "user", "--out", str(tmp / "kb"), "--chunk-rows", "7",
                *B, *SINGLE])
    assert res.exit_code == 0, res.output
    res = _cli(["learn", str(tmp / "plain.csv"), "--out", str(tmp / "pb"), "--scaling", "running", *B, *SINGLE])
    assert res.exit_code == 0, res.output
    a = json.loads((tmp / "kb" / "metrics.json").read_text())
    b = json.loads((tmp / "pb" / "metrics.json").read_text())
    assert a["settings"]["batch_size"] == 3 and a["rows_seen"] == 80
    for k in ("log_loss", "accuracy"):
        assert abs(a["final"][k] - b["final"][k]) <= 1e-12 * abs(b["final"][k]), k
    one = LoadedKeyedModel.load(str(tmp / "kb" / "keyed_model.npz")).keyed.state("u")
    plain = LoadedModel.load(str(tmp / "pb" / "model.npz")).state
    for x, y in zip(leaves(one), leaves(plain)):
        np.testing.assert_allclose(x, y, rtol=1e-12, atol=1e-15)
    # and not the one-row filter's
    k1 = LoadedKeyedModel.load(str(tmp / "k1" / "keyed_model.npz")).keyed.state("u")
    assert not np.allclose(leaves(k1)[0], leaves(one)[0])


def test_cli_key_errors(tmp_path):
    keys, X, Y = stream(BER, n=10)
    path = _keyed_csv(tmp_path / "d.csv", [str(k) for k in keys], X, Y)
    for args, message in ((["--key", "nope"], "no key column 'nope'"),
                          (["--key", "user", "--scaling", "follow"], "--scaling running"),
                          (["--key", "y"], "also the target")):
        res = _cli(["learn", path, "--out", str(tmp_path / "r"), *SINGLE, *args])
        assert res.exit_code != 0 and message in res.output, (args, res.output)
    # a measurement as the key (a key a row): learned, and a warning says each key saw one row
    measured = _keyed_csv(tmp_path / "measured.csv", [f"{v:.4f}" for v in 20 + X[:, 0]], X, Y)
    res = _cli(["learn", measured, "--out", str(tmp_path / "r"), *SINGLE, "--key", "user"])
    assert res.exit_code == 0 and "Warning: --key user: 10 keys in 10 rows (1.00 rows a key)" in res.output, res.output
    few = _keyed_csv(tmp_path / "few.csv", ["u", "v"] * 5, X, Y)
    res = _cli(["learn", few, "--out", str(tmp_path / "r"), *SINGLE, "--key", "user"])
    assert res.exit_code == 0 and "Warning" not in res.output, res.output
    # an empty key is a missing value, located (it was learned as a key named "")
    blank = _keyed_csv(tmp_path / "blank.csv", [str(k) if i != 3 else "" for i, k in enumerate(keys)], X, Y)
    res = _cli(["learn", blank, "--out", str(tmp_path / "r"), *SINGLE, "--key", "user"])
    assert res.exit_code != 0 and "line 5, column 'user': empty key" in res.output, res.output
