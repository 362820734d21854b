"""imagefolder: ``root/<class>/*.{png,jpg,jpeg,webp,bmp}`` (sorted class directory names are the
labels), or flat files (unlabeled), or flat files + ``data.labels_file`` (CSV ``path,label`` or
JSON ``{path: label}`` / ``[{"path":..., "label":...}]``; labels are ints or class names).
With ``data.captions``: captions from ``metadata.jsonl``/``metadata.csv`` or a ``.txt`` beside
each image (``orchestrator/data/captions.py``).

A work unit is one image file; many of them go into one decode task.
"""

from __future__ import annotations

import dataclasses
import math
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np
import pyarrow as pa

from orchestrator import storage
from orchestrator.data.captions import as_text, folder_captions
from orchestrator.data.counter import report
from orchestrator.data.formats.base import DataFormat, DecodeContext, Listing, Sample, count, decode_samples, ext, read_one
from orchestrator.data.info import DataError, DatasetInfo
from orchestrator.data.labels import NO_LABEL, classes_from_values, read_labels_file

if TYPE_CHECKING:
    import pyarrow as pa

    from orchestrator.config import DataConfig

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def _read_caption(got: "bytes | str") -> bytes | None:
    """A .txt caption's bytes; a read failure (its kind, a ``str``) is a missing caption."""
    return None if isinstance(got, str) else got


class ImageFolder(DataFormat):
    name = "imagefolder"
    description = f"images ({'/'.join(IMAGE_EXTS)})"

    def detect(self, files: Listing) -> float:
        return sum(ext(rel) in IMAGE_EXTS for rel, _ in files)

    def inspect(self, cfg: "DataConfig", files: Listing) -> DatasetInfo:
        info = self._inspect(cfg, files)
        if not cfg.captions:
            return info

        def read(rel: str) -> bytes:
            try:
                return storage.read_bytes(storage.join(cfg.source, rel), cfg.s3)
            except storage.StorageError as e:
                raise DataError(str(e)) from None

        captions, txt = folder_captions(cfg, list(info.files), {rel for rel, _ in files}, read)
        return dataclasses.replace(info, captions=captions, caption_files=txt)

    def _inspect(self, cfg: "DataConfig", files: Listing) -> DatasetInfo:
        images = sorted(rel for rel, _ in files if ext(rel) in IMAGE_EXTS)
        if not images:
            raise DataError(f"{storage.redact_uri(cfg.source)} holds no images with extensions {', '.join(IMAGE_EXTS)}")
        if cfg.labels_file:
            mapping = read_labels_file(cfg)
            present = [mapping[p] for p in images if p in mapping]
            if not present:
                raise DataError(
                    f"data.labels_file={cfg.labels_file!r} names none of the {len(images)} images (e.g. {images[0]!r}). "
                    "Fix: use paths relative to data.source"
                )
            names, index = classes_from_values(present, f"data.labels_file={cfg.labels_file!r}")
            labels = tuple(index[mapping[p]] if p in mapping else NO_LABEL for p in images)
            return DatasetInfo(cfg.source, self.name, len(images), names, tuple(images), labels)
        class_dirs = sorted({p.split("/", 1)[0] for p in images if "/" in p})
        if not class_dirs:
            return DatasetInfo(cfg.source, self.name, len(images), None, tuple(images), None)
        index = {c: i for i, c in enumerate(class_dirs)}
        # Images next to the class directories have no class: kept for unconditional training,
        # dropped (counted as missing_label) for conditional training.
        labels = tuple(index[p.split("/", 1)[0]] if "/" in p else NO_LABEL for p in images)
        return DatasetInfo(cfg.source, self.name, len(images), tuple(class_dirs), tuple(images), labels)

    def units(self, cfg: "DataConfig", info: DatasetInfo, fs: Any, root: str) -> "pa.Table":
        n = len(info.files)
        labels = np.asarray(info.labels, dtype=np.int64) if info.labels is not None else np.zeros(n, np.int64)
        cols = {"unit": pa.array(info.files, pa.string()), "label": pa.array(labels), "samples": pa.array(np.ones(n, np.int64))}
        if cfg.captions:
            caps = info.captions if info.captions is not None else (None,) * n
            txt = info.caption_files if info.caption_files is not None else (None,) * n
            cols["caption"] = pa.array([as_text(c) for c in caps], pa.string())
            cols["caption_file"] = pa.array(list(txt), pa.string())
        return pa.table(cols)

    def units_per_block(self, cfg: "DataConfig", num_units: int) -> int:
        import ray

        # Few, large map tasks: Ray Data's per-task overhead (scheduling, ramp-up, the last
        # task's tail) dominates on few cores. Measured on 2 cores with 2,000 JPEGs: 125-row
        # blocks 1.9k img/s, 250 2.2k, 1,000 2.9k. So one block per CPU, capped at ~64 MiB of
        # decoded output per block; each task yields its output in chunks so that training can
        # start on the first chunk (streaming) instead of waiting for the whole block.
        cpus = int(ray.cluster_resources().get("CPU", 4)) if ray.is_initialized() else 4
        row_bytes = 4 * cfg.channels * cfg.resolution * cfg.resolution
        cap = max(cfg.decode_batch_size, (64 << 20) // row_bytes)
        return max(cfg.decode_batch_size, min(cap, math.ceil(num_units / max(cpus, 1))))

    def decode(self, batch: dict[str, np.ndarray], ctx: DecodeContext) -> Iterator[dict[str, np.ndarray]]:
        n = len(batch["unit"])
        for i in range(0, n, ctx.chunk):
            yield self._decode_files({k: v[i : i + ctx.chunk] for k, v in batch.items()}, ctx)

    def _decode_files(self, batch: dict[str, np.ndarray], ctx: DecodeContext) -> dict[str, np.ndarray]:
        fs = ctx.filesystem()
        # One sample per file: its canonical id is the unit's (-1 outside training).
        ids = batch["_first"].tolist() if "_first" in batch else [-1] * len(batch["unit"])
        paths = [f"{ctx.root}/{rel}" for rel in batch["unit"]]
        raw = batch["label"].tolist()
        use_captions = ctx.captions.use and "caption" in batch
        caps = batch["caption"].tolist() if use_captions else [None] * len(paths)
        txt = batch["caption_file"].tolist() if use_captions else [None] * len(paths)
        counts: dict[str, int] = {}
        if ctx.labels.use_labels:
            # Skip reading files that would be dropped for their label anyway.
            keep = [i for i, l in enumerate(raw) if ctx.labels.check(l)[1] is None]
            for l in raw:
                kind = ctx.labels.check(l)[1]
                if kind:
                    count(counts, kind)
            paths, raw, ids = [paths[i] for i in keep], [raw[i] for i in keep], [ids[i] for i in keep]
            caps, txt = [caps[i] for i in keep], [txt[i] for i in keep]
        retry = ctx.retry(counts)
        # The .txt captions are read with the images (one more small object per sample).
        reads = paths + [f"{ctx.root}/{t}" for t in txt if t is not None]
        if ctx.parallel_reads > 1:
            # Object-store GETs are latency-bound: overlap them.
            with ThreadPoolExecutor(ctx.parallel_reads) as ex:
                got = list(ex.map(lambda q: read_one(fs, q, retry), reads))
        else:
            got = [read_one(fs, q, retry) for q in reads]
        blobs, txt_blobs = got[: len(paths)], iter(got[len(paths) :])
        if use_captions:
            # A .txt that cannot be read is a missing caption (its kind: data.missing_caption).
            caps = [c if t is None else _read_caption(next(txt_blobs)) for c, t in zip(caps, txt)]
        out = decode_samples(blobs, raw, ctx, counts, ids, caps if use_captions else None)
        report(counts, ctx.counter_name)
        return out

    def iter_samples(self, cfg: "DataConfig", info: DatasetInfo, fs: Any, root: str, *, threads: int) -> Iterator[Sample]:
        n = len(info.files)
        labels = info.labels if info.labels is not None else (NO_LABEL,) * n
        caps = info.captions if cfg.captions and info.captions is not None else (None,) * n
        txt = info.caption_files if cfg.captions and info.caption_files is not None else (None,) * n
        step = 64

        def caption(c: Any, t: str | None) -> Any:
            if t is None:
                return c
            return _read_caption(read_one(fs, f"{root}/{t}"))

        with ThreadPoolExecutor(threads if storage.parse_uri(cfg.source).is_s3 else 1) as ex:
            for i in range(0, n, step):
                chunk = info.files[i : i + step]
                blobs = list(ex.map(lambda rel: read_one(fs, f"{root}/{rel}"), chunk))
                texts = list(ex.map(caption, caps[i : i + step], txt[i : i + step]))
                yield from zip(chunk, blobs, labels[i : i + step], texts)

    def head(self, info: DatasetInfo, n: int) -> DatasetInfo:
        if info.num_samples <= n:
            return info
        return dataclasses.replace(info, num_samples=n, files=info.files[:n], labels=info.labels[:n] if info.labels else None,
                                   captions=info.captions[:n] if info.captions else None,
                                   caption_files=info.caption_files[:n] if info.caption_files else None)
