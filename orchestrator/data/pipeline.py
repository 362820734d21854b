"""Training data: list a dataset cheaply, then stream decoded images through Ray Data.

The layouts (image folders, WebDataset shards, Parquet; on local disk or ``s3://bucket/prefix``)
are plugins registered in ``orchestrator.data.formats``; this module holds what they share and
contains no per-format branch:

* ``inspect_dataset``: list the source once, pick the format (``data.format`` or, for ``auto``,
  the registered format whose ``detect`` scores highest) and let it count samples and classes.
* ``training_units`` / ``decode_dataset``: the format's work units (files, shards, row groups)
  minus the held-out ones, grouped into Ray Data blocks and decoded in ``map_batches`` by the
  format; ``orchestrator/data/reader.py`` reads them for training in the exact order of
  ``orchestrator/data/position.py``. ``build_train_dataset``: all of them, shuffled with
  ``data.seed``, for passes in no particular order.
  Bad samples are dropped and counted per kind (``decode.py``, ``counter.py``), so one broken
  file never stops a run.
* ``load_validation_images``: the units ``split_units`` holds out (``data.val_images``),
  decoded in order for the validation loss.
* ``iter_samples``: every sample's raw bytes in order, for ``raydiff data verify``/``stats`` and
  the benchmark.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Iterator

import numpy as np
import pyarrow as pa

from orchestrator import storage
from orchestrator.data.captions import CaptionSpec
from orchestrator.data.formats import FORMATS, DataFormat, DecodeContext, get_format
from orchestrator.data.formats.base import Listing, Sample, is_hidden
from orchestrator.data.info import DataError, DatasetInfo
from orchestrator.data.labels import LabelSpec

if TYPE_CHECKING:
    import pyarrow as pa
    import ray.data

    from orchestrator.config import DataConfig


def _fail(cfg: "DataConfig", e: Exception) -> DataError:
    return DataError(f"data.source={storage.redact_uri(cfg.source)!r}: {e}")


def list_source(cfg: "DataConfig") -> Listing:
    """``(relative path, size)`` of every data file under ``data.source`` (hidden files and
    writer markers left out); ``DataError`` with the fix when there is nothing to list."""
    if cfg.source == "builtin":
        raise DataError(
            "data.source=builtin has no files yet: write the demo set with "
            "orchestrator.data.demo.write_demo_dataset(DIR) (or `raydiff data make-demo DIR`) and "
            "set data.source=DIR"
        )
    try:
        storage.check_readable(cfg.source, cfg.s3)
        files = storage.list_files(cfg.source, cfg.s3)
    except storage.StorageError as e:
        raise DataError(str(e)) from None
    loc = storage.parse_uri(cfg.source)
    single = (not loc.is_s3 and os.path.isfile(loc.key)) or (
        loc.is_s3 and len(files) == 1 and files[0][0] == loc.key.rsplit("/", 1)[-1] and "/" not in files[0][0]
        and not storage.exists(storage.join(cfg.source, files[0][0]), cfg.s3)
    )
    if single:
        parent = cfg.source.rstrip("/").rsplit("/", 1)[0]
        raise DataError(
            f"data.source={storage.redact_uri(cfg.source)!r} is a single file; a dataset is a directory or "
            f"prefix. Fix: set data.source={storage.redact_uri(parent)!r} (the folder that holds it)"
        )
    files = [(rel, size) for rel, size in files if not is_hidden(rel)]
    if not files:
        raise DataError(
            f"{storage.redact_uri(cfg.source)} holds no data files (only hidden ones). "
            "Fix: point data.source at the dataset directory or prefix"
        )
    return files


def detect_format(cfg: "DataConfig", files: Listing) -> DataFormat:
    """``data.format`` if set, else the registered format whose ``detect`` scores highest (ties:
    higher ``tie_rank``, then registration order)."""
    if cfg.format != "auto":
        return get_format(cfg.format)
    formats = list(FORMATS.values())
    scores = [f.detect(files) for f in formats]
    best = max(range(len(formats)), key=lambda i: (scores[i], formats[i].tie_rank))
    if scores[best] <= 0:
        sample = ", ".join(sorted(rel for rel, _ in files)[:5])
        kinds = [f.description for f in formats]
        wanted = kinds[0] if len(kinds) == 1 else ", ".join(kinds[:-1]) + " or " + kinds[-1]
        raise DataError(
            f"{storage.redact_uri(cfg.source)}: found no {wanted} (saw e.g. {sample}). "
            "Fix: point data.source at the dataset root"
        )
    return formats[best]


def inspect_dataset(cfg: "DataConfig") -> DatasetInfo:
    """List the dataset (no image is decoded) and resolve ``format: auto``.

    Raises ``DataError`` naming the source and the fix for: missing path or bucket, empty
    prefix, wrong endpoint, rejected credentials, access denied, or no usable files.
    """
    files = list_source(cfg)
    return detect_format(cfg, files).inspect(cfg, files)


def _decode_block(batch: dict[str, np.ndarray], fmt: DataFormat, ctx: DecodeContext) -> Iterator[dict[str, np.ndarray]]:
    for chunk in fmt.decode(batch, ctx):
        if "index" not in chunk:  # a format that does not place its samples: -1 (the reader refuses it)
            chunk = {**chunk, "index": np.full(len(chunk["label"]), -1, np.int64)}
        yield chunk


def _decode_setup(cfg: "DataConfig", info: DatasetInfo, counter_name: str | None) -> tuple[DataFormat, DecodeContext, "pa.Table"]:
    """The format, the decode context and the unit table (stable order) of a dataset."""
    if info.source != cfg.source:
        raise DataError(f"DatasetInfo is for {storage.redact_uri(info.source)!r} but data.source={storage.redact_uri(cfg.source)!r}: call inspect_dataset(cfg) again")
    fmt = get_format(info.format)
    is_s3 = storage.parse_uri(cfg.source).is_s3
    try:
        fs, root = storage.filesystem_for(cfg.source, cfg.s3)
        # Ray workers get a handle that rebuilds the filesystem (pyarrow's own pickling drops the
        # retry strategy) with pyarrow's retries off: the tasks retry reads themselves and count
        # them.
        task_fs = storage.s3_filesystem_handle(cfg.s3, max_attempts=1) if is_s3 else fs
    except storage.StorageError as e:
        raise _fail(cfg, e) from None
    if not info.files:
        raise DataError(f"{storage.redact_uri(cfg.source)}: DatasetInfo lists no files; call inspect_dataset(cfg) first")
    ctx = DecodeContext(
        fs=task_fs,
        root=root,
        resolution=cfg.resolution,
        channels=cfg.channels,
        center_crop=cfg.center_crop,
        labels=LabelSpec.for_info(info, use_labels=bool(cfg.conditional and info.class_names)),
        counter_name=counter_name,
        read_attempts=cfg.s3.max_attempts if is_s3 else 0,
        chunk=4 * cfg.decode_batch_size,
        parallel_reads=16 if is_s3 else 1,
        seed=cfg.seed,
        options=fmt.decode_options(cfg, info),
        captions=CaptionSpec.for_config(cfg),
    )
    return fmt, ctx, fmt.units(cfg, info, fs, root)


def split_units(cfg: "DataConfig", info: DatasetInfo, num_units: int) -> tuple[np.ndarray, np.ndarray]:
    """``(training unit indices in shuffled order, held-out unit indices)``, both from one
    permutation seeded with ``data.seed``. Whole units are held out (the cheap split for shards
    and row groups): as many as ``data.val_images`` needs at the dataset's mean images per
    unit; at least one unit always stays for training."""
    order = np.random.default_rng(cfg.seed).permutation(num_units)
    if not cfg.val_images:
        return order, order[:0]
    per_unit = info.num_samples / max(num_units, 1)
    k = int(np.ceil(cfg.val_images / max(per_unit, 1e-9)))
    if k >= num_units:
        raise DataError(
            f"data.val_images={cfg.val_images} would hold out all {info.num_samples} images of "
            f"{storage.redact_uri(cfg.source)} ({num_units} work units). Fix: lower data.val_images "
            f"(e.g. {max(1, info.num_samples // 10)})"
        )
    return order[k:], order[:k]


def training_units(cfg: "DataConfig", info: DatasetInfo, *, counter_name: str | None = None
                   ) -> tuple[DataFormat, DecodeContext, "pa.Table"]:
    """The format, decode context and training units (held-out units left out) in their
    canonical (listing) order, with ``_first``: the canonical id of each unit's first sample
    (``orchestrator/data/position.py``)."""
    fmt, ctx, units = _decode_setup(cfg, info, counter_name)
    order, _ = split_units(cfg, info, units.num_rows)
    table = units.take(np.sort(order))
    if "samples" not in table.column_names:  # a plugin format without counts: one sample per unit
        table = table.append_column("samples", pa.array(np.ones(table.num_rows, np.int64)))
    counts = table.column("samples").to_numpy()
    firsts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
    return fmt, ctx, table.append_column("_first", pa.array(firsts, pa.int64()))


def decode_dataset(fmt: DataFormat, ctx: DecodeContext, blocks: list["pa.Table"]) -> "ray.data.Dataset":
    """Ray Data decode of unit blocks: one map task per block, in ``map_batches``."""
    import ray.data

    # from_blocks, not from_arrow: both keep the blocks as they are, but from_arrow reads each
    # block's size and schema in a Ray task, and the first such task in a Ray session (or on a
    # node) waits for a worker process to import Ray Data and pyarrow, one that the decode's own
    # actors never use: 2.6-2.9 s against 0.2-0.3 s on this project's 2-core machine (issue 18).
    # These blocks are in this process: their metadata is read here.
    return ray.data.from_blocks(blocks).map_batches(
        _decode_block,
        batch_size=None,  # one block = the units the format planned for one task
        batch_format="numpy",
        fn_kwargs={"fmt": fmt, "ctx": ctx},
        zero_copy_batch=True,
    )


def build_train_dataset(cfg: "DataConfig", info: DatasetInfo, *, counter_name: str | None = None) -> "ray.data.Dataset":
    """A Ray Dataset of ``{"image": float32 [C, H, W] in [-1, 1], "label": int64, "index": int64}``
    rows (and ``"text"``, the caption, with ``data.captions``; ``index``: the sample's canonical
    id, ``orchestrator/data/position.py``), for passes
    over the data in no particular order (evaluation, encoding, benchmarks, the decoded cache).
    Training reads through ``orchestrator.data.reader.TrainReader``, in its exact order.

    Work units (files, shards, row groups) are shuffled deterministically with ``cfg.seed``; no
    random flip is applied (the trainer flips per batch, so decoded images can be cached across
    epochs). Units held out for validation (``data.val_images``) are left out. Dropped and
    converted samples are counted in the named actor ``counter_name`` (read them with
    ``bad_sample_counts``).
    """
    return decode_dataset(*_train_blocks(cfg, info, counter_name))


def _train_blocks(cfg: "DataConfig", info: DatasetInfo, counter_name: str | None
                  ) -> tuple[DataFormat, DecodeContext, list["pa.Table"]]:
    """The training units shuffled with ``data.seed`` and grouped into decode blocks."""
    fmt, ctx, table = training_units(cfg, info, counter_name=counter_name)
    order = np.random.default_rng(cfg.seed).permutation(table.num_rows)
    per_block = max(1, fmt.units_per_block(cfg, len(order)))
    # Each block is built with take() from its own shuffled rows, so no block references the
    # whole unit table.
    return fmt, ctx, [table.take(order[i : i + per_block]) for i in range(0, len(order), per_block)]


# A local training set at most this large decoded (float32) is decoded in the calling process
# (``decode_here``) rather than by a Ray Data job: the built-in set (3000 images, 37 MB) decodes
# in 0.7 s of one core, while the Ray Data job cost about 7 CPU-seconds of process starts
# (its stats and autoscaling actors, a new worker per map task) on the 2 cores the training
# workers were starting on (issue 18). Object storage keeps Ray Data's parallel reads.
DECODE_HERE_MAX_BYTES = 128 << 20


def decodes_here(cfg: "DataConfig", info: DatasetInfo) -> bool:
    """Whether ``decode_here`` suits this dataset (local and small; see DECODE_HERE_MAX_BYTES)."""
    decoded = info.num_samples * cfg.channels * cfg.resolution**2 * 4
    return not storage.parse_uri(cfg.source).is_s3 and decoded <= DECODE_HERE_MAX_BYTES


def decode_here(cfg: "DataConfig", info: DatasetInfo, *, counter_name: str | None = None
                ) -> Iterator[dict[str, np.ndarray]]:
    """The blocks ``build_train_dataset`` decodes, decoded in this process (same blocks, same
    decode, same bad-sample counts; for small local sets, ``decodes_here``)."""
    fmt, ctx, blocks = _train_blocks(cfg, info, counter_name)
    for block in blocks:
        batch = {name: block.column(name).to_numpy(zero_copy_only=False) for name in block.column_names}
        yield from _decode_block(batch, fmt, ctx)


def load_validation_images(cfg: "DataConfig", info: DatasetInfo) -> dict[str, np.ndarray]:
    """The held-out images, decoded here (a few hundred at most: no Ray Data job), in a fixed
    order: ``{"image": float32 [N, C, H, W] in [-1, 1], "label": int64 [N]}`` (and the text
    fields of text-to-image data) with N <= ``data.val_images``. Bad samples among them are skipped (not counted)."""
    if not cfg.val_images:
        raise DataError("data.val_images=0: nothing is held out. Fix: set data.val_images (e.g. 64)")
    fmt, ctx, units = _decode_setup(cfg, info, None)
    _, held = split_units(cfg, info, units.num_rows)
    table = units.take(np.sort(held))  # sorted: the same order whatever the permutation's order
    batch = {name: table.column(name).to_numpy(zero_copy_only=False) for name in table.column_names}
    chunks = list(fmt.decode(batch, ctx))
    images = np.concatenate([c["image"] for c in chunks])[: cfg.val_images]
    labels = np.concatenate([c["label"] for c in chunks])[: cfg.val_images]
    if len(images) == 0:
        raise DataError(f"{storage.redact_uri(cfg.source)}: the {len(held)} held-out work units hold no "
                        "decodable image. Fix: check `raydiff data verify`, or raise data.val_images")
    out = {"image": np.ascontiguousarray(images, dtype=np.float32), "label": labels.astype(np.int64)}
    for k in ("text", "text_embedding", "text_mask"):  # text-to-image data: the held-out captions too
        if k in chunks[0]:
            out[k] = np.concatenate([c[k] for c in chunks])[: cfg.val_images]
    return out


def iter_samples(cfg: "DataConfig", info: DatasetInfo, *, threads: int = 8) -> Iterator[Sample]:
    """``(name, bytes or read-failure kind, raw label, raw caption)`` for every listed sample, in
    listing order.

    The raw label is a class index, ``NO_LABEL``, a class name or ``None`` depending on the
    format; ``label_problem`` turns it into a bad-sample kind. The raw caption (``data.captions``)
    is text, bytes or ``None`` (``orchestrator/data/captions.py``).
    """
    fs, root = storage.filesystem_for(cfg.source, cfg.s3)
    for sample in get_format(info.format).iter_samples(cfg, info, fs, root, threads=threads):
        # A plugin format written before captions yields (name, data, label): no caption.
        yield sample if len(sample) == 4 else (*sample, None)


def head(info: DatasetInfo, n: int) -> DatasetInfo:
    """``info`` cut to about its first ``n`` samples where the format can do that cheaply."""
    return get_format(info.format).head(info, n)
