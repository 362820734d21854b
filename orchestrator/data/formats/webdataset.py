"""webdataset: ``*.tar`` shards, members grouped by key (path up to the first dot of the base
name): an image (``.jpg/.jpeg/.png/.webp/.bmp``) plus an optional ``.cls`` (class index) or
``.json`` (``{"label": int | class name}``). A ``manifest.json`` (written by
``raydiff data upload``) gives counts and class names without opening any shard. With
``data.captions``: the ``.<caption_column>`` or ``.txt`` member, else the ``.json`` field
(``orchestrator/data/captions.py``).

A work unit is one shard. ``build_shard`` writes the shards that ``raydiff data upload``
produces (``orchestrator/data/upload.py``).
"""

from __future__ import annotations

import io
import json
import logging
import posixpath
import tarfile
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np
import pyarrow as pa

from orchestrator import storage
from orchestrator.data import decode as D
from orchestrator.data.formats.base import (DataFormat, DecodeContext, Listing, Sample, decode_chunks, ext, is_hidden, read_one,
                                            sample_ids, stable_hash)
from orchestrator.data.info import DataError, DatasetInfo
from orchestrator.data.labels import classes_from_values

if TYPE_CHECKING:
    import pyarrow as pa

    from orchestrator.config import DataConfig

log = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
MANIFEST_VERSION = 1
_IMAGE_MEMBER_EXTS = ("jpg", "jpeg", "png", "webp", "bmp")


def _split_key(name: str) -> tuple[str, str]:
    """WebDataset convention: key = path up to the first dot of the base name."""
    d, base = posixpath.split(name)
    stem, _dot, suffix = base.partition(".")
    return posixpath.join(d, stem), suffix.lower()


def iter_tar_samples(data: bytes) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {ext: bytes}) per sample of a tar shard, in file order; consecutive members that
    share a key form one sample."""
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:*") as tf:
        cur_key, cur = None, {}
        for m in tf:
            if not m.isfile():
                continue
            key, suffix = _split_key(m.name)
            if is_hidden(m.name):
                continue
            if key != cur_key and cur:
                yield cur_key, cur
                cur = {}
            cur_key = key
            f = tf.extractfile(m)
            cur[suffix] = f.read() if f is not None else b""
        if cur:
            yield cur_key, cur


def _image_of(sample: dict[str, bytes]) -> bytes | None:
    for suffix in _IMAGE_MEMBER_EXTS:
        if suffix in sample:
            return sample[suffix]
    return None


def _raw_label_of(sample: dict[str, bytes]) -> Any:
    """The label value in a WebDataset sample: int from .cls, int or name from .json, else None.
    Returns ``D.INVALID_LABEL`` for unparseable label members."""
    if "cls" in sample:
        txt = sample["cls"].decode("utf-8", "replace").strip()
        return int(txt) if txt.lstrip("-").isdigit() else D.INVALID_LABEL
    if "json" in sample:
        try:
            obj = json.loads(sample["json"])
        except ValueError:
            return D.INVALID_LABEL
        if isinstance(obj, dict):
            for k in ("label", "cls", "class"):
                if k in obj:
                    return obj[k]
            return None
        return obj if isinstance(obj, (int, str)) else D.INVALID_LABEL
    return None


def raw_caption_of(sample: dict[str, bytes], column: str) -> Any:
    """The caption of a WebDataset sample: the ``.<column>`` member, else ``.txt`` (LAION's
    img2dataset shards), else the ``column`` field of the ``.json`` member; None if none."""
    for suffix in (column.lower(), "txt"):
        if suffix in sample and suffix not in _IMAGE_MEMBER_EXTS and suffix != "json":
            return sample[suffix]
    if "json" in sample:
        try:
            obj = json.loads(sample["json"])
        except ValueError:
            return None
        if isinstance(obj, dict):
            return obj.get(column)
    return None


def build_shard(samples: list[tuple[str, str, bytes, int | None]] | list[tuple[str, str, bytes, int | None, str | None]]) -> bytes:
    """A WebDataset tar of ``(key, image ext, bytes, label or None[, caption or None])``;
    byte-identical for the same input (fixed mtime/owner), so that re-uploads can be recognised
    by checksum. A caption is written as the ``.txt`` member."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tf:
        for key, suffix, data, label, *rest in samples:
            members = [(f"{key}.{suffix}", data)]
            if label is not None:
                members.append((f"{key}.cls", str(label).encode()))
            if rest and rest[0] is not None:
                members.append((f"{key}.txt", rest[0].encode()))
            for name, payload in members:
                ti = tarfile.TarInfo(name)
                ti.size, ti.mtime, ti.mode, ti.uid, ti.gid, ti.uname, ti.gname = len(payload), 0, 0o644, 0, 0, "", ""
                tf.addfile(ti, io.BytesIO(payload))
    return buf.getvalue()


def _read_manifest(cfg: "DataConfig") -> dict[str, Any] | None:
    uri = storage.join(cfg.source, MANIFEST_NAME)
    try:
        raw = storage.read_bytes(uri, cfg.s3)
    except FileNotFoundError:
        return None
    except storage.StorageError as e:
        raise DataError(str(e)) from None
    try:
        m = json.loads(raw)
        shards = [(s["name"], int(s["num_samples"])) for s in m["shards"]]
    except (ValueError, KeyError, TypeError) as e:
        raise DataError(f"{storage.redact_uri(uri)} is not a raydiff manifest ({type(e).__name__}: {e}). Fix: re-run `raydiff data upload` or delete it") from None
    m["_shards"] = shards
    return m


class WebDataset(DataFormat):
    name = "webdataset"
    description = ".tar shards"
    # Equal counts of .tar files and other data files: the shards win (they hold many samples).
    tie_rank = 2

    def detect(self, files: Listing) -> float:
        if any(rel == MANIFEST_NAME for rel, _ in files):
            return float("inf")  # written by `raydiff data upload`: unambiguous
        return sum(ext(rel) == ".tar" for rel, _ in files)

    def inspect(self, cfg: "DataConfig", files: Listing) -> DatasetInfo:
        manifest = _read_manifest(cfg)
        if manifest is not None:
            shards = manifest["_shards"]
            classes = manifest.get("classes")
            return DatasetInfo(
                cfg.source,
                self.name,
                sum(n for _, n in shards),
                tuple(classes) if classes else None,
                tuple(name for name, _ in shards),
                unit_samples=tuple(n for _, n in shards),
            )
        tars = sorted(rel for rel, _ in files if ext(rel) == ".tar")
        if not tars:
            raise DataError(f"{storage.redact_uri(cfg.source)} holds no .tar shards. Fix: check data.format / data.source")
        # No manifest: open every shard once to count samples and collect label values.
        fs, root = storage.filesystem_for(cfg.source, cfg.s3)
        n, values, per_shard = 0, [], []
        for rel in tars:
            per_shard.append(0)
            try:
                with fs.open_input_stream(f"{root}/{rel}") as f:
                    data = f.read()
                for _key, sample in iter_tar_samples(data):
                    if _image_of(sample) is None:
                        continue
                    n += 1
                    per_shard[-1] += 1
                    v = _raw_label_of(sample)
                    if v is not None and v != D.INVALID_LABEL:
                        values.append(v)
            except (tarfile.TarError, OSError) as e:
                log.warning("shard %s is unreadable (%s); its samples will be counted as read errors", rel, type(e).__name__)
        classes = classes_from_values(values, f"labels in {storage.redact_uri(cfg.source)}")[0] if values else None
        return DatasetInfo(cfg.source, self.name, n, classes, tuple(tars), unit_samples=tuple(per_shard))

    def units(self, cfg: "DataConfig", info: DatasetInfo, fs: Any, root: str) -> "pa.Table":
        counts = info.unit_samples if info.unit_samples is not None else (0,) * len(info.files)
        return pa.table({"unit": pa.array(info.files, pa.string()), "samples": pa.array(counts, pa.int64())})

    def decode(self, batch: dict[str, np.ndarray], ctx: DecodeContext) -> Iterator[dict[str, np.ndarray]]:
        fs = ctx.filesystem()
        blobs: list[Any] = []
        raw: list[Any] = []
        caps: list[Any] = []
        ids: list[int] = []
        counts: dict[str, int] = {}
        column = ctx.captions.column
        for row, rel in enumerate(batch["unit"]):
            n = int(batch["samples"][row]) if "samples" in batch else 0
            js, row_ids = sample_ids(batch, row, n) if "_first" in batch else (None, None)
            data = read_one(fs, f"{ctx.root}/{rel}", ctx.retry(counts))
            if isinstance(data, str):
                counts[data] = counts.get(data, 0) + (len(js) if js is not None else 1)
                continue
            try:
                # Sample j = the j-th key with an image, in file order (what the counts count).
                samples = [s for _k, s in iter_tar_samples(data) if _image_of(s) is not None]
            except tarfile.TarError:
                counts[D.CORRUPT] = counts.get(D.CORRUPT, 0) + (len(js) if js is not None else 1)
                continue
            if js is None:
                # Shuffle within the shard too (deterministically), shards are often written in
                # class order. (The training reader orders samples itself, by id.)
                js = np.random.default_rng([ctx.seed, stable_hash(rel)]).permutation(len(samples))
                row_ids = np.full(len(js), -1, np.int64)
            elif len(js) and int(js.max()) >= len(samples):
                # Fewer samples than the manifest says: the missing ones are holes, counted as corrupt.
                counts[D.CORRUPT] = counts.get(D.CORRUPT, 0) + int((js >= len(samples)).sum())
            for j, sid in zip(js.tolist(), row_ids.tolist()):
                if j >= len(samples):
                    continue
                blobs.append(_image_of(samples[j]))
                raw.append(_raw_label_of(samples[j]))
                caps.append(raw_caption_of(samples[j], column) if ctx.captions.use else None)
                ids.append(sid)
        yield from decode_chunks(blobs, raw, counts, ctx, ids, caps)

    def iter_samples(self, cfg: "DataConfig", info: DatasetInfo, fs: Any, root: str, *, threads: int) -> Iterator[Sample]:
        for shard in info.files:
            data = read_one(fs, f"{root}/{shard}")
            if isinstance(data, str):
                yield shard, data, None, None
                continue
            try:
                for key, s in iter_tar_samples(data):
                    img = _image_of(s)
                    if img is not None:
                        yield f"{shard}:{key}", img, _raw_label_of(s), raw_caption_of(s, cfg.caption_column) if cfg.captions else None
            except tarfile.TarError:
                yield shard, D.CORRUPT, None, None
