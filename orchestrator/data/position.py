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
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class SampleOrder:
    """``counts[u]``: source samples of training unit ``u`` (units in their canonical, listing
    order); canonical sample id ``firsts[u] + j`` is sample ``j`` of unit ``u``."""

    counts: np.ndarray
    seed: int
    window: int

    @property
    def firsts(self) -> np.ndarray:
        return np.concatenate([[0], np.cumsum(self.counts, dtype=np.int64)[:-1]]).astype(np.int64)

    @property
    def total(self) -> int:
        return int(np.sum(self.counts, dtype=np.int64))

    def epoch(self, epoch: int) -> np.ndarray:
        """Canonical sample id at each position of ``epoch`` (int64, length ``total``)."""
        counts = np.asarray(self.counts, np.int64)
        rng = np.random.default_rng([self.seed, epoch, 0])
        units = rng.permutation(len(counts))
        sizes = counts[units]
        # Concatenated ranges firsts[u] .. firsts[u] + counts[u] - 1, in permuted unit order.
        starts = np.repeat(self.firsts[units], sizes)
        offsets = np.arange(int(sizes.sum())) - np.repeat(np.cumsum(sizes) - sizes, sizes)
        ids = starts + offsets
        if self.window > 1 and len(ids) > 1:
            keys = np.random.default_rng([self.seed, epoch, 1]).random(len(ids))
            ids = ids[np.lexsort((keys, np.arange(len(ids)) // self.window))]
        return ids

    def unit_of(self, ids: np.ndarray) -> np.ndarray:
        """Training-unit index of each canonical sample id."""
        return np.searchsorted(np.cumsum(self.counts, dtype=np.int64), ids, side="right")


def rank_positions(total: int, start: int, global_batch: int, world: int, rank: int) -> np.ndarray:
    """Positions rank ``rank`` of ``world`` trains on from epoch position ``start`` to the end of
    the epoch: int64 array ``[steps left, global_batch // world]``. ``start`` is normally a
    multiple of ``global_batch``; after a change of ``optim.batch_size`` it need not be, and the
    rest of the epoch is cut into batches from ``start`` on."""
    if global_batch % world:
        raise ValueError(f"global batch {global_batch} is not divisible by {world} workers")
    micro = global_batch // world
    steps = np.arange(max(0, total - start) // global_batch, dtype=np.int64)
    return start + steps[:, None] * global_batch + rank * micro + np.arange(micro, dtype=np.int64)[None, :]
