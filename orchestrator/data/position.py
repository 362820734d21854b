"""The exact data position: which source sample each rank trains on at each step of an epoch.

Everything here is a pure function of the dataset's listing (samples per training unit), the
seed, the epoch, the global batch size and the world size, so that a resumed run, on any number
of workers, can recompute it without reading any data:

* The epoch's **sample order**: the training units (files, shards, row groups) in a permutation
  seeded with ``(data.seed, epoch)``, each unit's samples in their stored order, then shuffled
  within consecutive windows of ``data.local_shuffle_buffer`` positions (a deterministic
  stand-in for a shuffle buffer: a shard written in class order still gives mixed batches).
* **Global batches**: step ``i`` of the epoch trains on positions ``[i*B, (i+1)*B)`` of that
  order (``B = optim.batch_size``); rank ``r`` of ``W`` takes the slice
  ``[i*B + r*B/W, i*B + (r+1)*B/W)``. An epoch has ``total // B`` steps; the remainder (fewer
  than B samples, different ones every epoch) is left out.
* The **position** saved with a checkpoint is one number, the samples of the epoch consumed
  by all ranks together (``TrainState.samples_in_epoch``, a multiple of B): the consumed samples
  are exactly the first ``samples_in_epoch`` positions, whatever the world size was, so a resume
  with another world size re-splits the rest of the epoch exactly.

Positions count *source* samples (what the listing or manifest says a unit holds), not decoded
ones: a sample that fails to decode leaves a hole in its micro-batch instead of shifting every
later batch (see ``orchestrator/data/reader.py``). The granularity is therefore one sample, for
every format.

**Computed on demand** (order version 2): the order is never materialised. A keyed bijection
(a balanced Feistel network, Luby & Rackoff 1988, made to fit any domain size by cycle-walking,
Black & Rogaway 2002 "Ciphers with arbitrary finite domains") permutes the unit indices, once
per epoch (memory and time proportional to the number of units: the permuted units' cumulative
sample counts); a position's sample is then found by binary search of those counts
(``np.searchsorted``), and the window shuffle is the same kind of bijection over the positions
of one window, keyed by the window's index. Rank r's samples for step i therefore cost time
proportional to the micro-batch (times log units), whatever the dataset's size: a 2-billion-sample
epoch costs what a 2-million one does (``raydiff bench scale``, docs/scale.md). Version 1, the
materialised order (a unit permutation and a lexsort of random keys per window over the whole
epoch), is kept so that a checkpoint written mid-epoch before version 2 finishes its epoch in the
order it started (``TrainState.data_order``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

# The version of the epoch order that new epochs use; saved with the position (TrainState).
ORDER_VERSION = 2
LEGACY_ORDER = 1  # materialised per epoch (before on-demand orders): checkpoints without a version
ORDER_VERSIONS = (LEGACY_ORDER, ORDER_VERSION)

_ROUNDS = 6  # Feistel rounds: 4 make a pseudo-random permutation (Luby-Rackoff); 2 more for margin
_UNITS, _WINDOWS = 0, 1  # key purposes
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser (Steele, Lea & Flood 2014): a bijective, well-avalanching mix of
    uint64 values; the Feistel round function. Unsigned array arithmetic wraps modulo 2^64."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _feistel(x: np.ndarray, half: int, keys: np.ndarray, tweak: np.ndarray | int) -> np.ndarray:
    """A bijection of [0, 4**half), one per (``keys``, ``tweak``): ``keys`` [rounds]; ``tweak``
    0 or one uint64 per element (a tweakable block cipher: the window's index)."""
    h, mask = np.uint64(half), np.uint64((1 << half) - 1)
    left, right = x >> h, x & mask
    for k in keys:
        left, right = right, left ^ (_mix(right ^ (tweak ^ k)) & mask)
    return (left << h) | right


def permute(x: np.ndarray, n: int, keys: np.ndarray, tweak: np.ndarray | None = None) -> np.ndarray:
    """The keyed bijection of [0, n) applied to ``x`` (int64 values in [0, n)); with ``tweak``
    (one uint64 per element) a different bijection per tweak value. Cycle-walking: the Feistel
    network permutes [0, 4**half) with 4**half < 4n, and is applied again to values that land
    outside [0, n) until they are inside (they do: x's cycle contains x); on average fewer than 4
    applications."""
    x = np.asarray(x, np.int64)
    if n <= 1 or not x.size:
        return x.copy()
    half = max(1, ((n - 1).bit_length() + 1) // 2)
    keys = np.asarray(keys, np.uint64)
    t = np.uint64(0) if tweak is None else np.asarray(tweak, np.uint64)
    y = _feistel(x.astype(np.uint64), half, keys, t)
    out = np.flatnonzero(y >= np.uint64(n))
    while len(out):
        y[out] = _feistel(y[out], half, keys, t if tweak is None else t[out])
        out = out[y[out] >= np.uint64(n)]
    return y.astype(np.int64)


def _keys(seed: int, epoch: int, purpose: int) -> np.ndarray:
    return np.random.SeedSequence([seed, epoch, purpose]).generate_state(_ROUNDS, np.uint64)


@dataclass(frozen=True)
class SampleOrder:
    """``counts[u]``: source samples of training unit ``u`` (units in their canonical, listing
    order); canonical sample id ``firsts[u] + j`` is sample ``j`` of unit ``u``. Keeps the
    per-epoch unit layout of the last epochs asked for (O(units) each)."""

    counts: np.ndarray
    seed: int
    window: int
    firsts: np.ndarray = field(init=False, repr=False, compare=False)
    _epochs: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        counts = np.asarray(self.counts, np.int64)
        object.__setattr__(self, "counts", counts)
        object.__setattr__(self, "_ends", np.cumsum(counts, dtype=np.int64))
        object.__setattr__(self, "firsts", self._ends - counts)

    @property
    def total(self) -> int:
        return int(self._ends[-1]) if len(self._ends) else 0

    def unit_of(self, ids: np.ndarray) -> np.ndarray:
        """Training-unit index of each canonical sample id."""
        return np.searchsorted(self._ends, ids, side="right")

    def epoch(self, epoch: int, version: int = ORDER_VERSION) -> np.ndarray:
        """Canonical sample id at every position of ``epoch`` (int64, length ``total``): the
        whole order, for tests and small sets; training asks ``ids`` for its positions only."""
        return self.ids(epoch, np.arange(self.total, dtype=np.int64), version)

    def ids(self, epoch: int, positions: np.ndarray, version: int = ORDER_VERSION) -> np.ndarray:
        """Canonical sample id at each of ``positions`` of ``epoch`` (any shape, values in
        [0, total)); cost proportional to ``positions.size`` once the epoch's unit layout is
        known (O(units), kept for the last epochs asked for)."""
        pos = np.asarray(positions, np.int64)
        if pos.size and (int(pos.min()) < 0 or int(pos.max()) >= self.total):
            raise IndexError(f"positions outside the epoch's {self.total} samples")
        if version == LEGACY_ORDER:
            return self._materialised(epoch)[pos]
        if version != ORDER_VERSION:
            raise ValueError(f"unknown data order version {version}; this raydiff knows {ORDER_VERSIONS}")
        flat = pos.ravel()
        stream = self._unshuffle(epoch, flat)
        units, ends = self._layout(epoch)
        slot = np.searchsorted(ends, stream, side="right")
        unit = units[slot]
        return (self.firsts[unit] + stream - (ends[slot] - self.counts[unit])).reshape(pos.shape)

    # -- version 2 -----------------------------------------------------------------------------
    def _layout(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """The epoch's units in order (``units[k]``: unit at slot k) and the stream position
        where each slot ends (cumulative counts in that order)."""
        key = (ORDER_VERSION, epoch)
        if key not in self._epochs:
            n = len(self.counts)
            units = permute(np.arange(n, dtype=np.int64), n, _keys(self.seed, epoch, _UNITS))
            if len(self._epochs) >= 2:  # this epoch and the last: a rollback across epochs stays cheap
                self._epochs.pop(next(iter(self._epochs)))
            self._epochs[key] = (units, np.cumsum(self.counts[units], dtype=np.int64))
        return self._epochs[key]

    def _unshuffle(self, epoch: int, pos: np.ndarray) -> np.ndarray:
        """The position in the unit stream (units concatenated, epoch order) that lands at each
        position after the window shuffle: a bijection within each window, keyed by its index."""
        w, total = self.window, self.total
        if w <= 1 or total <= 1:
            return pos
        win, off = np.divmod(pos, w)
        keys = _keys(self.seed, epoch, _WINDOWS)
        out = np.empty_like(pos)
        last = total // w  # the index of the partial window at the end (when total % w)
        for part, n in ((win < last, w), (win == last, total - last * w)):
            if not part.any():
                continue
            tweak = _mix(win[part].astype(np.uint64) * _GOLDEN)
            out[part] = win[part] * w + permute(off[part], n, keys, tweak)
        return out

    # -- version 1 -----------------------------------------------------------------------------
    def _materialised(self, epoch: int) -> np.ndarray:
        key = (LEGACY_ORDER, epoch)
        if key not in self._epochs:
            if len(self._epochs) >= 2:
                self._epochs.pop(next(iter(self._epochs)))
            self._epochs[key] = _legacy_epoch(self.counts, self.firsts, self.seed, self.window, epoch)
        return self._epochs[key]


def _legacy_epoch(counts: np.ndarray, firsts: np.ndarray, seed: int, window: int, epoch: int) -> np.ndarray:
    """Order version 1, the whole epoch at once: O(samples) time and memory (about 0.5 s and 50 MB
    per million samples); only for checkpoints that were written mid-epoch with it."""
    rng = np.random.default_rng([seed, epoch, 0])
    units = rng.permutation(len(counts))
    sizes = counts[units]
    # Concatenated ranges firsts[u] .. firsts[u] + counts[u] - 1, in permuted unit order.
    starts = np.repeat(firsts[units], sizes)
    offsets = np.arange(int(sizes.sum())) - np.repeat(np.cumsum(sizes) - sizes, sizes)
    ids = starts + offsets
    if window > 1 and len(ids) > 1:
        keys = np.random.default_rng([seed, epoch, 1]).random(len(ids))
        ids = ids[np.lexsort((keys, np.arange(len(ids)) // window))]
    return ids


def steps_left(total: int, start: int, global_batch: int) -> int:
    """Whole global batches from epoch position ``start`` to the end of the epoch."""
    return max(0, total - start) // global_batch


def rank_positions(total: int, start: int, global_batch: int, world: int, rank: int,
                   first_step: int = 0, max_steps: int | None = None) -> np.ndarray:
    """Positions rank ``rank`` of ``world`` trains on from epoch position ``start`` to the end of
    the epoch: int64 array ``[steps, global_batch // world]``; with ``first_step``/``max_steps``
    only those steps after ``start`` (memory proportional to what is asked). ``start`` is normally
    a multiple of ``global_batch``; after a change of ``optim.batch_size`` it need not be, and the
    rest of the epoch is cut into batches from ``start`` on."""
    if global_batch % world:
        raise ValueError(f"global batch {global_batch} is not divisible by {world} workers")
    micro = global_batch // world
    n = steps_left(total, start, global_batch)
    stop = n if max_steps is None else min(n, first_step + max_steps)
    steps = np.arange(min(first_step, stop), stop, dtype=np.int64)
    return start + steps[:, None] * global_batch + rank * micro + np.arange(micro, dtype=np.int64)[None, :]
