"""Training batches in the exact order of ``orchestrator/data/position.py``, for one rank.

The driver builds one ``TrainReader`` (``make_train_reader``) and hands it to every training
worker through the object store. Each rank then reads, per epoch, exactly the samples that its
slices of the global batches name, from a given epoch position on:

* **streamed** (the dataset is larger than ``data.cache_max_bytes``, or in object storage and
  not cached): the rank starts its own Ray Data read of the units that hold its samples, in the
  order it needs them, asking each decode task for only the rank's samples of a unit
  (``_want``), so nothing before the resume position is read, and nothing another rank trains
  on is decoded. Decoding stays parallel (one map task per block of units, across the cluster);
  ``preserve_order`` keeps the blocks in need order, and a small buffer (about one shuffle
  window) reorders the rows within a window.
* **cached** (the decoded set fits ``data.cache_max_bytes``): every training sample is decoded
  once into the object store (by the driver's background actor while the workers start,
  data/background.py) (``ObjectRef`` per block); each rank maps canonical ids to
  rows of those blocks (zero-copy on the same node) and gathers its micro-batches directly.

Samples that fail to decode (counted in the bad-sample counter) are holes: their micro-batch
trains on fewer samples, and the position still advances by whole source samples, so the
accounting never shifts. A micro-batch whose samples are all bad is replaced by the rank's
previous micro-batch (all ranks must step together); the position is unaffected.

With WebDataset shards and micro-batches smaller than a shard, every rank reads every shard of
an epoch it needs samples from (W object reads per shard, each rank decoding only its own
samples): the price of sample granularity on any world size.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np
import pyarrow as pa

from orchestrator.data.captions import text_array
from orchestrator.data.formats import get_format
from orchestrator.data.info import DataError, DatasetInfo
from orchestrator.data.pipeline import build_train_dataset, decode_dataset, training_units
from orchestrator.data.position import ORDER_VERSION, SampleOrder, rank_positions, steps_left

if TYPE_CHECKING:
    import pyarrow as pa

    from orchestrator.config import DataConfig

# Samples of one rank whose ids are computed (and, streamed, read as one Ray Data read) at once.
CHUNK_SAMPLES = 1 << 18


# Per-sample fields that travel with the images when the data has them (text-to-image, issue 20):
# the caption (data.captions), or its embedding and mask precomputed by `raydiff data encode
# --text-encoder` (orchestrator/data/encode.py).
TEXT_FIELDS = ("text", "text_embedding", "text_mask")


@dataclass
class StepBatch:
    """One rank's micro-batch: the decoded samples, and the canonical ids of every position of
    its slice (holes included)."""

    image: np.ndarray  # float32 [n, C, H, W]
    label: np.ndarray  # int64 [n]
    ids: np.ndarray  # int64 [micro]
    decoded: int  # n, 0 when the previous micro-batch stands in for an all-bad one
    text: np.ndarray | None = None  # object [n] of str ("" = the empty prompt), with data.captions
    text_embedding: np.ndarray | None = None  # float [n, L, D], precomputed
    text_mask: np.ndarray | None = None  # [n, L], precomputed

    def text_fields(self) -> dict[str, np.ndarray]:
        """The text fields this batch carries, by name (empty for class-labelled data)."""
        return {k: getattr(self, k) for k in TEXT_FIELDS if getattr(self, k) is not None}


@dataclass
class TrainReader:
    cfg: "DataConfig"
    fmt_name: str
    ctx: Any  # DecodeContext
    units: "pa.Table"  # training units, canonical order, with ``_first``
    order: SampleOrder
    # ObjectRefs of decoded blocks (dicts of numpy arrays), or one ObjectRef of that list while a
    # background decode (data/background.py) is still producing it.
    cached: list[Any] | Any | None = None
    _cache_index: Any = field(default=None, repr=False, compare=False)
    _last: StepBatch | None = field(default=None, repr=False, compare=False)

    @property
    def total(self) -> int:
        """Source samples per epoch (training units only)."""
        return self.order.total

    def steps_per_epoch(self, global_batch: int) -> int:
        return self.total // global_batch

    def sample_names(self, ids: np.ndarray) -> list[str]:
        """Readable ids: the file for one-sample units, ``unit#j`` (j-th sample in storage
        order) for shards and row groups."""
        units = self.order.unit_of(ids)
        names = self.units.column("unit").to_pylist()
        firsts = self.order.firsts
        return [names[u] if self.order.counts[u] == 1 else f"{names[u]}#{int(i - firsts[u])}"
                for u, i in zip(units.tolist(), ids.tolist())]

    def batches(self, epoch: int, start: int, *, global_batch: int, world: int, rank: int,
                prefetch: int = 2, order_version: int = ORDER_VERSION) -> Iterator[StepBatch]:
        """This rank's micro-batches of ``epoch`` from epoch position ``start`` (global source
        samples already consumed) to the end of the epoch, in the order ``order_version``
        (``TrainState.data_order``). The rank's ids are computed a chunk of steps at a time
        (about ``CHUNK_SAMPLES``; on a streamed dataset each chunk is one Ray Data read), so
        memory does not grow with the epoch."""
        n = steps_left(self.total, start, global_batch)
        per_chunk = max(1, CHUNK_SAMPLES // max(1, global_batch // world))
        for first in range(0, n, per_chunk):
            ids = self.rank_ids(epoch, start, global_batch=global_batch, world=world, rank=rank, first_step=first,
                                steps=per_chunk, order_version=order_version)
            rows = self._cached_rows(ids) if self.cached is not None else self._streamed_rows(ids, prefetch)
            for step_ids, found in zip(ids, rows):
                yield self._assemble(step_ids, found)

    def rank_ids(self, epoch: int, start: int, *, global_batch: int, world: int, rank: int, first_step: int,
                 steps: int, order_version: int = ORDER_VERSION) -> np.ndarray:
        """Canonical ids of this rank's micro-batches for ``steps`` steps from step ``first_step``
        after epoch position ``start``: int64 ``[steps, global_batch // world]`` (fewer steps at
        the epoch's end). Cost proportional to what is asked (``raydiff bench scale`` times it)."""
        pos = rank_positions(self.total, start, global_batch, world, rank, first_step, steps)
        return self.order.ids(epoch, pos, order_version)

    # -- assembling ----------------------------------------------------------------------------
    def _assemble(self, step_ids: np.ndarray, found: list[tuple[np.ndarray, int]]) -> StepBatch:
        if not found:
            if self._last is None:
                raise DataError(
                    f"every sample of this worker's first micro-batch ({len(step_ids)} samples) failed to decode. "
                    "Fix: check `raydiff data verify` on data.source, or raise optim.batch_size")
            return StepBatch(self._last.image, self._last.label, step_ids, 0, **self._last.text_fields())
        image = np.stack([r[0] for r in found]).astype(np.float32, copy=False)
        label = np.asarray([r[1] for r in found], np.int64)
        extra: dict[str, np.ndarray] = {}
        for k, v in found[0][2].items():
            vals = [r[2][k] for r in found]
            extra[k] = text_array(vals) if k == "text" else np.stack(vals)
        self._last = StepBatch(image, label, step_ids, len(found), **extra)
        return self._last

    # -- cached --------------------------------------------------------------------------------
    def _cached_rows(self, ids: np.ndarray) -> Iterator[list[tuple[np.ndarray, int, dict[str, Any]]]]:
        import ray

        if self._cache_index is None:
            refs = self.cached if isinstance(self.cached, list) else ray.get(self.cached)
            blocks = ray.get(refs)  # zero-copy views of the object store on this node
            where = np.full((self.total, 2), -1, np.int64)
            for b, blk in enumerate(blocks):
                idx = np.asarray(blk["index"], np.int64)
                _check_placed(idx, self.fmt_name)
                where[idx, 0] = b
                where[idx, 1] = np.arange(len(idx))
            self._cache_index = (blocks, where)
        blocks, where = self._cache_index
        for step_ids in ids:
            found = []
            for b, r in where[step_ids].tolist():
                if b >= 0:
                    blk = blocks[b]
                    found.append((blk["image"][r], int(blk["label"][r]), {k: blk[k][r] for k in TEXT_FIELDS if k in blk}))
            yield found

    # -- streamed ------------------------------------------------------------------------------
    def _streamed_rows(self, ids: np.ndarray, prefetch: int) -> Iterator[list[tuple[np.ndarray, int, dict[str, Any]]]]:
        flat = ids.ravel()
        unit = self.order.unit_of(flat)
        # Units in the order this rank first needs them; need[u] = that rank in the order.
        uniq, first_use = np.unique(unit, return_index=True)
        needed = uniq[np.argsort(first_use, kind="stable")]
        need = np.full(len(self.order.counts), -1, np.int64)
        need[needed] = np.arange(len(needed))
        step_last = need[unit].reshape(ids.shape).max(axis=1)  # the last unit each step waits for
        # Wanted samples per needed unit (indices within the unit), grouped in need order.
        js = flat - self.order.firsts[unit]
        by = np.lexsort((js, need[unit]))
        offsets = np.concatenate([[0], np.cumsum(np.bincount(need[unit], minlength=len(needed)))]).astype(np.int32)
        want = pa.ListArray.from_arrays(pa.array(offsets), pa.array(js[by], pa.int64()))
        table = self.units.take(needed).append_column("_want", want)
        fmt = get_format(self.fmt_name)
        per_block = max(1, fmt.units_per_block(self.cfg, len(needed)))
        blocks = [table.slice(i, per_block) for i in range(0, len(needed), per_block)]
        ds = decode_dataset(fmt, self.ctx, blocks)
        ds.context.execution_options.preserve_order = True  # blocks arrive in need order
        buffer: dict[int, tuple[np.ndarray, int, dict[str, Any]]] = {}
        complete_below = 0  # units with need rank below this have arrived in full
        step = 0
        for chunk in ds.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=prefetch):
            idx = np.asarray(chunk["index"], np.int64)
            if not len(idx):
                continue
            _check_placed(idx, self.fmt_name)
            extra = [k for k in TEXT_FIELDS if k in chunk]
            for i, sid in enumerate(idx.tolist()):
                buffer[sid] = (chunk["image"][i], int(chunk["label"][i]), {k: chunk[k][i] for k in extra})
            complete_below = int(need[self.order.unit_of(idx[-1:])][0])
            while step < len(ids) and step_last[step] < complete_below:
                yield [buffer.pop(sid) for sid in ids[step].tolist() if sid in buffer]
                step += 1
        while step < len(ids):  # the stream is over: whatever is missing was bad
            yield [buffer.pop(sid) for sid in ids[step].tolist() if sid in buffer]
            step += 1


def _check_placed(idx: np.ndarray, fmt_name: str) -> None:
    if len(idx) and int(idx.min()) < 0:
        raise DataError(f"data format {fmt_name!r} does not say which sample each decoded row is (no 'index' "
                        "column): training needs it for its exact order. Fix: emit 'index' from decode "
                        "(orchestrator.data.formats.base.sample_ids)")


def make_train_reader(cfg: "DataConfig", info: DatasetInfo, *, counter_name: str | None = None,
                      cache: bool = False) -> TrainReader:
    """The reader every rank uses; with ``cache`` every training sample is decoded here once
    into the object store (read by the ranks in their exact order every epoch)."""
    fmt, ctx, units = training_units(cfg, info, counter_name=counter_name)
    order = SampleOrder(units.column("samples").to_numpy().astype(np.int64), cfg.seed, cfg.local_shuffle_buffer)
    if order.total == 0:
        raise DataError(f"data.source={cfg.source!r}: the training units hold no samples. Fix: check "
                        "`raydiff data ls` / `raydiff data verify` on data.source")
    cached = None
    if cache:
        cached = build_train_dataset(cfg, info, counter_name=counter_name).to_numpy_refs()
    return TrainReader(cfg, fmt.name, ctx, units, order, cached)
