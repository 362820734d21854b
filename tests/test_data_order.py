"""The epoch order computed on demand (orchestrator/data/position.py, order version 2): a
permutation of every sample per epoch (exhaustive on small listings, sampled on a 2-billion-sample
one), seeded by (data.seed, epoch), shuffled only within its windows, and split into the same
global batches at any world size; and the version saved with the position."""

from __future__ import annotations

import numpy as np
import pytest

from orchestrator.data.position import (LEGACY_ORDER, ORDER_VERSION, SampleOrder, _keys, permute, rank_positions,
                                        steps_left)
from orchestrator.train.state import TrainState


def _stream(order: SampleOrder, epoch: int, ids: np.ndarray) -> np.ndarray:
    """Where each id is in the epoch's unit stream (units in permuted order, no window shuffle),
    from the layout: the inverse of the unit permutation, not the code under test's forward map."""
    units, ends = order._layout(epoch)
    slot = np.empty_like(units)
    slot[units] = np.arange(len(units))
    u = order.unit_of(ids)
    return ends[slot[u]] - order.counts[u] + (ids - order.firsts[u])


@pytest.mark.parametrize("n", [*range(1, 70), 127, 128, 129, 1000, 4097])
def test_permute_is_a_bijection_of_any_domain(n):
    for purpose in (0, 1):
        y = permute(np.arange(n), n, _keys(5, 3, purpose))
        assert sorted(y.tolist()) == list(range(n))
    # One call, three tweaks (window indices): a bijection per tweak, different ones.
    tweak = np.repeat(np.arange(3, dtype=np.uint64), n)
    y = permute(np.tile(np.arange(n), 3), n, _keys(5, 3, 1), tweak).reshape(3, n)
    assert all(sorted(row.tolist()) == list(range(n)) for row in y)
    if n >= 8:
        assert not np.array_equal(y[0], y[1]) and not np.array_equal(y[1], y[2])


COUNTS = [np.array([3, 1, 4, 2, 5]), np.array([7]), np.array([0, 5, 0, 0, 9, 1, 0]), np.arange(1, 40) % 7]


@pytest.mark.parametrize("counts", COUNTS, ids=lambda c: f"{len(c)}units")
@pytest.mark.parametrize("window", [0, 1, 2, 3, 4, 7, 64, 1000])
def test_every_sample_once_per_epoch_exhaustive(counts, window):
    total = int(counts.sum())
    for seed in (0, 7):
        o = SampleOrder(counts, seed=seed, window=window)
        for epoch in range(4):
            e = o.epoch(epoch)
            assert sorted(e.tolist()) == list(range(total))
            # Any positions, any shape, agree with the whole order.
            pos = np.random.default_rng(epoch).integers(0, total, (3, 5))
            assert np.array_equal(o.ids(epoch, pos), e[pos])
            # The window shuffle moves a sample only within its window of the unit stream.
            stream = _stream(o, epoch, e)
            assert np.array_equal(stream // max(window, 1), np.arange(total) // max(window, 1))
            if window <= 1:
                assert np.array_equal(stream, np.arange(total))  # each unit whole, in storage order


def test_order_differs_between_epochs_and_seeds_and_is_reproducible():
    counts = np.full(50, 20)
    a = SampleOrder(counts, seed=1, window=16)
    assert np.array_equal(a.epoch(0), SampleOrder(counts, seed=1, window=16).epoch(0))
    orders = [a.epoch(0), a.epoch(1), SampleOrder(counts, seed=2, window=16).epoch(0)]
    for i in range(3):
        for j in range(i + 1, 3):
            # Equal positions by chance: about 1 in 1000 per position; far from all of them.
            assert (orders[i] == orders[j]).mean() < 0.05
    # Units are permuted too (not only windows): the first unit in the stream varies by epoch.
    assert len({int(a._layout(e)[0][0]) for e in range(8)}) > 1


def test_two_billion_samples_sampled():
    """200,000 units of 10,000 samples: sampled positions map to distinct ids in range, in their
    window of the stream; whole windows (one in the middle, the partial last) are permutations."""
    counts = np.full(200_000, 10_000, np.int64)
    counts[::7] = 9_999  # uneven units; a partial last window
    o = SampleOrder(counts, seed=3, window=512)
    total = o.total
    assert total % 512
    rng = np.random.default_rng(0)
    pos = np.unique(rng.integers(0, total, 500_000))
    ids = o.ids(5, pos)
    assert ids.min() >= 0 and ids.max() < total and len(np.unique(ids)) == len(pos)
    assert np.array_equal(_stream(o, 5, ids) // 512, pos // 512)
    for start in (512 * 1_000_003, total - total % 512):
        win = np.arange(start, min(start + 512, total))
        assert np.array_equal(np.sort(_stream(o, 5, o.ids(5, win))), win)


@pytest.mark.parametrize("start", [0, 24, 40])
def test_global_batches_resplit_exactly_at_any_world_size(start):
    o = SampleOrder(np.array([5, 9, 3, 12, 8, 11]), seed=4, window=6)
    batch, epoch = 8, 2
    e = o.epoch(epoch)
    n = steps_left(o.total, start, batch)
    for world in (1, 2, 4, 8):
        per_rank = [o.ids(epoch, rank_positions(o.total, start, batch, world, r)) for r in range(world)]
        steps = np.concatenate(per_rank, axis=1)  # [steps, batch]: rank slices side by side
        assert steps.shape == (n, batch)
        assert np.array_equal(steps.ravel(), e[start : start + n * batch])
        # Asked a step at a time (what a rank computes at a resume), the same samples.
        for i in (0, n - 1):
            one = [o.ids(epoch, rank_positions(o.total, start, batch, world, r, i, 1)) for r in range(world)]
            assert np.array_equal(np.concatenate(one, axis=1)[0], steps[i])


def test_saved_position_keeps_its_order_version():
    o = SampleOrder(np.array([4, 6, 5, 9]), seed=2, window=5)
    legacy = o.epoch(1, LEGACY_ORDER)
    assert sorted(legacy.tolist()) == list(range(24)) and not np.array_equal(legacy, o.epoch(1))
    # Mid-epoch checkpoints from before versions continue in version 1; new epochs use the current one.
    assert TrainState(epoch=1, batch_in_epoch=2, samples_in_epoch=16).order_version(8) == LEGACY_ORDER
    assert TrainState(epoch=1, batch_in_epoch=2).order_version(8) == LEGACY_ORDER
    assert TrainState(epoch=1).order_version(8) == ORDER_VERSION
    assert TrainState(epoch=1, samples_in_epoch=16, data_order=ORDER_VERSION).order_version(8) == ORDER_VERSION
    with pytest.raises(ValueError, match="Fix: resume with the raydiff version that wrote it"):
        TrainState(samples_in_epoch=16, data_order=99).order_version(8)
    with pytest.raises(ValueError, match="unknown data order version 99"):
        o.ids(0, np.arange(3), 99)
