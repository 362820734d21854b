"""What a dataset format provides, and the helpers that every format's decoding shares.

A format is one object (a ``DataFormat`` subclass) registered by name in
``orchestrator.data.formats``. The pipeline (``orchestrator/data/pipeline.py``) never branches on
the format: it lists the source, asks each registered format how well the listing matches
(``detect``), and then calls the chosen format's ``inspect``, ``units``, ``decode`` and
``iter_samples``.

Work units are the format's natural read granularity: one image file, one tar shard, one
Parquet row group. They are rows of a small Arrow table with a stable string id in the ``unit``
column and their sample count in ``samples``; the pipeline orders units (seeded) and groups them
into Ray Data blocks, and a task decodes units. Sample ``j`` of a unit (in storage order) has
the canonical id ``_first + j``, which every decoded row carries in ``index``: the training
reader (``orchestrator/data/reader.py``) places samples by it, exactly, and can ask a task for
only some samples of a unit (``_want``) without decoding the others.
"""

from __future__ import annotations

import posixpath
import threading
import zlib
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Iterator, Mapping

import numpy as np

from orchestrator import storage
from orchestrator.data import decode as D
from orchestrator.data.captions import CaptionSpec, text_array
from orchestrator.data.counter import report
from orchestrator.data.info import DatasetInfo
from orchestrator.data.labels import LabelSpec

if TYPE_CHECKING:
    import pyarrow as pa

    from orchestrator.config import DataConfig

# (relative path, size in bytes) per listed file, as ``storage.list_files`` returns them.
Listing = list[tuple[str, int]]
# What ``iter_samples`` yields: (sample name, bytes or read-failure kind, raw label, raw caption).
# The raw caption is None when the sample has none or ``data.captions`` is off (captions.py).
Sample = tuple[str, "bytes | str", Any, Any]


# Marker files that Spark/Hadoop/pyarrow writers leave next to data files.
_MARKER_FILES = frozenset({"_SUCCESS", "_metadata", "_common_metadata"})


def is_hidden(rel: str) -> bool:
    """Dot files/directories, ``_temporary`` and writer marker files: never data."""
    parts = rel.split("/")
    return any(p.startswith(".") or p == "_temporary" for p in parts) or parts[-1] in _MARKER_FILES


def ext(rel: str) -> str:
    """Lower-case extension with the dot (``"a/B.PNG"`` -> ``".png"``)."""
    return posixpath.splitext(rel)[1].lower()


# ---------------------------------------------------------------------------------------------
# The interface


@dataclass(frozen=True)
class DecodeContext:
    """Everything a decode task needs; pickled once per task, so it holds no open resources.

    ``fs`` is a filesystem or a ``storage.FsHandle`` (S3: rebuilt in the worker with the retry
    settings intact); ``options`` carries what the format computed on the driver with
    ``decode_options`` (e.g. Parquet column names).
    """

    fs: Any
    root: str
    resolution: int
    channels: int
    center_crop: bool
    labels: LabelSpec
    counter_name: str | None
    # > 0: retry transient read errors here, counted (object stores); 0: no retries (local disk).
    read_attempts: int = 0
    # Decoded rows per yielded output chunk (bounds the memory of one map task's output).
    chunk: int = 256
    # Concurrent object reads per task (object-store GETs are latency-bound).
    parallel_reads: int = 1
    seed: int = 0
    options: Mapping[str, Any] = field(default_factory=dict)
    # data.captions: read a caption per sample and emit it as "text" (orchestrator/data/captions.py).
    captions: CaptionSpec = CaptionSpec(False)

    def filesystem(self) -> Any:
        return storage.resolve_fs(self.fs)

    def retry(self, counts: dict[str, int]) -> tuple[int, dict[str, int]] | None:
        """The ``retry`` argument of ``read_one`` for this context."""
        return (self.read_attempts, counts) if self.read_attempts else None


class DataFormat(ABC):
    """One dataset layout. Subclasses set ``name`` (the ``data.format`` value) and
    ``description`` (what its files look like, for "found nothing" messages)."""

    name: ClassVar[str]
    description: ClassVar[str]
    # Breaks ties between equal ``detect`` scores (higher wins); equal ranks: registration order.
    tie_rank: ClassVar[int] = 0

    def detect(self, files: Listing) -> float:
        """How strongly the listing looks like this format: 0 = not at all, otherwise usually
        the number of files that belong to it (``format: auto`` picks the highest)."""
        return 0

    @abstractmethod
    def inspect(self, cfg: "DataConfig", files: Listing) -> DatasetInfo:
        """Sample count and class names from the listing (and cheap metadata), decoding no
        image; raises ``DataError`` with the fix when the source cannot be used."""

    @abstractmethod
    def units(self, cfg: "DataConfig", info: DatasetInfo, fs: Any, root: str) -> "pa.Table":
        """One row per work unit with a unique string ``unit`` column, an int64 ``samples`` column
        (the samples ``decode`` enumerates in the unit, known without reading it) plus whatever
        ``decode`` needs, in a stable order (the pipeline shuffles it with ``data.seed``)."""

    def units_per_block(self, cfg: "DataConfig", num_units: int) -> int:
        """Units per Ray Data block (= per decode task). One, unless units are tiny."""
        return 1

    def decode_options(self, cfg: "DataConfig", info: DatasetInfo) -> dict[str, Any]:
        """Picklable per-dataset settings for ``decode`` (``DecodeContext.options``)."""
        return {}

    @abstractmethod
    def decode(self, batch: dict[str, np.ndarray], ctx: DecodeContext) -> Iterator[dict[str, np.ndarray]]:
        """Read and decode a block of units (runs in ``map_batches``): yield chunks of
        ``{"image": float32 [N, C, H, W] in [-1, 1], "label": int64 [N], "index": int64 [N]}``
        (``index``: canonical sample ids from ``sample_ids``, which also says which samples of a
        unit are wanted), plus ``"text"`` (object array of ``str``) when ``ctx.captions.use``,
        dropping bad samples and reporting their kinds (``decode_chunks`` does all of it).
        Yield at least one chunk."""

    @abstractmethod
    def iter_samples(self, cfg: "DataConfig", info: DatasetInfo, fs: Any, root: str, *, threads: int) -> Iterator[Sample]:
        """``(name, bytes or read-failure kind, raw label, raw caption)`` for every sample, in
        listing order (for ``raydiff data verify``/``stats`` and the benchmark's plain loop); the
        caption is read when ``data.captions`` is on, else None."""

    def head(self, info: DatasetInfo, n: int) -> DatasetInfo:
        """``info`` restricted to about its first ``n`` samples where that is cheap (one file
        per sample); other formats return ``info`` unchanged."""
        return info


# ---------------------------------------------------------------------------------------------
# Helpers shared by the formats' decode and iterate code


_COUNT_LOCK = threading.Lock()


def read_one(fs: Any, path: str, retry: tuple[int, dict[str, int]] | None = None) -> bytes | str:
    """The object's bytes, or the kind of failure. With ``retry=(max_attempts, counts)``
    transient errors are retried here (the filesystem's own retries are off) and counted in
    ``counts[RETRIED_READ]``, so that a flaky store shows up in the run's statistics."""

    def read() -> bytes:
        with fs.open_input_stream(path) as f:
            return f.read()

    try:
        if retry is None:
            return read()
        attempts, counts = retry

        def count(_e: BaseException) -> None:
            with _COUNT_LOCK:  # reads run in a thread pool
                counts[D.RETRIED_READ] = counts.get(D.RETRIED_READ, 0) + 1

        return storage.retry_call(read, max_attempts=attempts, on_retry=count)
    except FileNotFoundError:
        return D.MISSING_FILE
    except OSError:
        return D.READ_ERROR


def count(counts: dict[str, int], kind: str) -> None:
    counts[kind] = counts.get(kind, 0) + 1


def decode_samples(blobs: list[Any], raw_labels: list[Any], ctx: DecodeContext, counts: dict[str, int],
                   ids: list[int] | np.ndarray | None = None, raw_captions: list[Any] | None = None,
                   extras: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """Decode one chunk. A blob that is a ``str`` is a read failure recorded as its kind; bad
    labels, missing captions (``ctx.captions``) and undecodable images are dropped and counted
    in ``counts``. ``ids`` are the samples' canonical ids (``sample_ids``), kept for the decoded
    rows in ``index``; the kept captions come out as ``text``, and the kept rows of each
    ``extras`` array (one row per blob, e.g. precomputed text embeddings) under its name."""
    c = ctx.channels
    out = np.empty((len(blobs), ctx.resolution, ctx.resolution, c), dtype=np.uint8)
    labels = np.empty(len(blobs), dtype=np.int64)
    kept = np.empty(len(blobs), dtype=np.int64)
    ids = np.full(len(blobs), -1, np.int64) if ids is None else np.asarray(ids, np.int64)
    use_captions = ctx.captions.use
    raw_captions = [None] * len(blobs) if raw_captions is None else raw_captions
    texts: list[str] = []
    pos: list[int] = []
    n = 0
    for i, (data, raw) in enumerate(zip(blobs, raw_labels)):
        if isinstance(data, str):  # a read failure recorded as its kind
            count(counts, data)
            continue
        label, bad = ctx.labels.check(raw)
        text, caption_kind = "", None
        if bad is None and use_captions:
            text, caption_kind, keep = ctx.captions.check(raw_captions[i])
            if not keep:
                bad = caption_kind
        if bad is None:
            arr, kind = D.decode_image(data, ctx.resolution, c, ctx.center_crop)
            if arr is None:
                bad = kind
            else:
                out[n] = arr
                labels[n] = label
                kept[n] = ids[i]
                n += 1
                texts.append(text)
                pos.append(i)
                for k in (kind, caption_kind):
                    if k is not None:
                        count(counts, k)
                continue
        count(counts, bad)
    res = {"image": D.to_model_range(out[:n]), "label": labels[:n], "index": kept[:n]}
    if use_captions:
        res["text"] = text_array(texts)
    for k, v in (extras or {}).items():
        res[k] = v[np.asarray(pos, np.int64)]
    return res


def decode_chunks(blobs: list[Any], raw: list[Any], counts: dict[str, int], ctx: DecodeContext,
                  ids: list[int] | None = None, raw_captions: list[Any] | None = None,
                  extras: dict[str, np.ndarray] | None = None) -> Iterator[dict[str, np.ndarray]]:
    """Decode in chunks and yield each: a shard or row group can hold thousands of images, and
    one decoded block for all of them would be hundreds of MB. Counts are reported per chunk."""
    ids = [-1] * len(blobs) if ids is None else ids
    caps = [None] * len(blobs) if raw_captions is None else raw_captions
    for i in range(0, max(len(blobs), 1), ctx.chunk):  # one (possibly empty) output even for no samples
        out = decode_samples(blobs[i : i + ctx.chunk], raw[i : i + ctx.chunk], ctx, counts, ids[i : i + ctx.chunk],
                             caps[i : i + ctx.chunk], {k: v[i : i + ctx.chunk] for k, v in (extras or {}).items()})
        report(counts, ctx.counter_name)
        counts.clear()
        yield out


def sample_ids(batch: dict[str, np.ndarray], row: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """``(sample indices within unit, canonical ids)`` to decode for unit ``row`` of a block that
    holds ``n`` samples in storage order. The pipeline adds ``_first`` (the canonical id of the
    unit's first sample, ``orchestrator/data/position.py``) and may add ``_want`` (the sample
    indices one training rank needs); without them every sample is wanted, with id -1."""
    want = batch.get("_want")
    js = np.arange(n, dtype=np.int64) if want is None or want[row] is None else np.asarray(want[row], np.int64)
    js = js[js < n]  # a unit holding fewer samples than listed: the missing ones are holes
    first = batch.get("_first")
    return js, (js + int(first[row])) if first is not None else np.full(len(js), -1, np.int64)


def stable_hash(s: str) -> int:
    return zlib.crc32(s.encode())
