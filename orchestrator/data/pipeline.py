"""Training data: list a dataset cheaply, then stream decoded images through Ray Data.

Three layouts, on local disk or ``s3://bucket/prefix``:

* imagefolder: ``root/<class>/*.{png,jpg,jpeg,webp,bmp}`` (sorted class directory names are the
  labels), or flat files (unlabeled), or flat files + ``data.labels_file`` (CSV ``path,label`` or
  JSON ``{path: label}`` / ``[{"path":..., "label":...}]``; labels are ints or class names).
* webdataset: ``*.tar`` shards, members grouped by key (path up to the first dot of the base
  name): an image (``.jpg/.jpeg/.png/.webp/.bmp``) plus an optional ``.cls`` (class index) or
  ``.json`` (``{"label": int | class name}``). A ``manifest.json`` (written by
  ``raydiff data upload``) gives counts and class names without opening any shard.
* parquet: ``*.parquet`` files with an image-bytes column (``data.image_column``; binary, or a
  struct with a ``bytes`` field as Hugging Face writes it) and an optional label column.

Decoding runs in ``map_batches`` over raw bytes; bad samples are dropped and counted per kind
(see ``decode.py``), so one broken file never stops a run.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import posixpath
import tarfile
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np

from orchestrator import storage
from orchestrator.data import decode as D

if TYPE_CHECKING:
    import ray.data

    from orchestrator.config import DataConfig

log = logging.getLogger(__name__)

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
MANIFEST_NAME = "manifest.json"
# Raw label stored for a sample that has none (dropped when training conditionally).
NO_LABEL = -1
COUNTER_NAMESPACE = "raydiff"


class DataError(ValueError):
    """The dataset cannot be used; raised before training with the URI and the likely fix."""


@dataclass(frozen=True)
class DatasetInfo:
    source: str
    format: str
    num_samples: int
    class_names: tuple[str, ...] | None
    # What build_train_dataset needs so that it does not list the store again. Paths are
    # relative to the source root: imagefolder = image files, webdataset = shards,
    # parquet = parquet files. ``labels`` are raw class indices per file (imagefolder only).
    files: tuple[str, ...] = field(default=(), repr=False, compare=False)
    labels: tuple[int, ...] | None = field(default=None, repr=False, compare=False)

    @property
    def num_classes(self) -> int | None:
        return None if self.class_names is None else len(self.class_names)


# ---------------------------------------------------------------------------------------------
# Listing


# Marker files that Spark/Hadoop/pyarrow writers leave next to data files.
_MARKER_FILES = frozenset({"_SUCCESS", "_metadata", "_common_metadata"})


def _is_hidden(rel: str) -> bool:
    parts = rel.split("/")
    return any(p.startswith(".") or p == "_temporary" for p in parts) or parts[-1] in _MARKER_FILES


def _ext(rel: str) -> str:
    return posixpath.splitext(rel)[1].lower()


def _fail(cfg: "DataConfig", e: Exception) -> DataError:
    return DataError(f"data.source={storage.redact_uri(cfg.source)!r}: {e}")


def _list(cfg: "DataConfig") -> list[tuple[str, int]]:
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
    files = [(rel, size) for rel, size in files if not _is_hidden(rel)]
    if not files:
        raise DataError(
            f"{storage.redact_uri(cfg.source)} holds no data files (only hidden ones). "
            "Fix: point data.source at the dataset directory or prefix"
        )
    return files


def _detect_format(cfg: "DataConfig", files: list[tuple[str, int]]) -> str:
    names = {rel for rel, _ in files}
    if cfg.format != "auto":
        return cfg.format
    if MANIFEST_NAME in names:
        return "webdataset"
    exts = [_ext(rel) for rel in names]
    counts = {fmt: sum(e in exts_ for e in exts) for fmt, exts_ in (("webdataset", (".tar",)), ("parquet", (".parquet",)), ("imagefolder", IMAGE_EXTS))}
    best = max(counts, key=lambda k: counts[k])
    if counts[best] == 0:
        sample = ", ".join(sorted(names)[:5])
        raise DataError(
            f"{storage.redact_uri(cfg.source)}: found no images ({'/'.join(IMAGE_EXTS)}), .tar shards or "
            f".parquet files (saw e.g. {sample}). Fix: point data.source at the dataset root"
        )
    return best


def _read_labels_file(cfg: "DataConfig") -> dict[str, Any]:
    assert cfg.labels_file is not None
    uri = cfg.labels_file
    if "://" not in uri and not uri.startswith("/"):
        uri = storage.join(cfg.source, uri)
    try:
        raw = storage.read_bytes(uri, cfg.s3).decode("utf-8-sig")
    except FileNotFoundError:
        raise DataError(f"data.labels_file={cfg.labels_file!r} not found at {storage.redact_uri(uri)}. Fix: give a path relative to data.source or a full URI") from None
    except storage.StorageError as e:
        raise DataError(f"data.labels_file: {e}") from None
    out: dict[str, Any] = {}
    if uri.lower().endswith(".json"):
        try:
            obj = json.loads(raw)
        except json.JSONDecodeError as e:
            raise DataError(f"data.labels_file={cfg.labels_file!r} is not valid JSON ({e}). Fix: write {{\"path\": label}} or [{{\"path\":..., \"label\":...}}]") from None
        if isinstance(obj, dict):
            out = dict(obj)
        elif isinstance(obj, list) and all(isinstance(r, dict) and "path" in r and "label" in r for r in obj):
            out = {r["path"]: r["label"] for r in obj}
        else:
            raise DataError(f"data.labels_file={cfg.labels_file!r}: expected {{path: label}} or a list of {{\"path\", \"label\"}} objects")
    else:
        rows = [r for r in csv.reader(io.StringIO(raw)) if r and any(c.strip() for c in r)]
        if rows and [c.strip().lower() for c in rows[0][:2]] == ["path", "label"]:
            rows = rows[1:]
        for i, r in enumerate(rows):
            if len(r) < 2:
                raise DataError(f"data.labels_file={cfg.labels_file!r} line {i + 1}: expected 'path,label', got {r!r}")
            out[r[0].strip()] = r[1].strip()
    return {k.removeprefix("./"): v for k, v in out.items()}


def _classes_from_values(values: list[Any], what: str) -> tuple[tuple[str, ...], dict[Any, int]]:
    """Class names and a value->index map from raw label values (ints, digit strings or names)."""
    def as_int(v: Any) -> int | None:
        if isinstance(v, bool):
            return None
        if isinstance(v, (int, np.integer)):
            return int(v)
        if isinstance(v, str) and v.strip().lstrip("-").isdigit():
            return int(v)
        return None

    ints = [as_int(v) for v in values]
    if all(i is not None for i in ints):
        hi = max((i for i in ints if i is not None), default=-1)
        return tuple(str(i) for i in range(hi + 1)), {v: i for v, i in zip(values, ints)}
    if any(i is not None for i in ints):
        raise DataError(f"{what} mixes integer labels and class names. Fix: use one kind throughout")
    names = tuple(sorted({str(v) for v in values}))
    index = {n: i for i, n in enumerate(names)}
    return names, {v: index[str(v)] for v in values}


def _inspect_imagefolder(cfg: "DataConfig", files: list[tuple[str, int]]) -> DatasetInfo:
    images = sorted(rel for rel, _ in files if _ext(rel) in IMAGE_EXTS)
    if not images:
        raise DataError(f"{storage.redact_uri(cfg.source)} holds no images with extensions {', '.join(IMAGE_EXTS)}")
    if cfg.labels_file:
        mapping = _read_labels_file(cfg)
        present = [mapping[p] for p in images if p in mapping]
        if not present:
            raise DataError(
                f"data.labels_file={cfg.labels_file!r} names none of the {len(images)} images (e.g. {images[0]!r}). "
                "Fix: use paths relative to data.source"
            )
        names, index = _classes_from_values(present, f"data.labels_file={cfg.labels_file!r}")
        labels = tuple(index[mapping[p]] if p in mapping else NO_LABEL for p in images)
        return DatasetInfo(cfg.source, "imagefolder", len(images), names, tuple(images), labels)
    class_dirs = sorted({p.split("/", 1)[0] for p in images if "/" in p})
    if not class_dirs:
        return DatasetInfo(cfg.source, "imagefolder", len(images), None, tuple(images), None)
    index = {c: i for i, c in enumerate(class_dirs)}
    # Images next to the class directories have no class: kept for unconditional training,
    # dropped (counted as missing_label) for conditional training.
    labels = tuple(index[p.split("/", 1)[0]] if "/" in p else NO_LABEL for p in images)
    return DatasetInfo(cfg.source, "imagefolder", len(images), tuple(class_dirs), tuple(images), labels)


def _split_key(name: str) -> tuple[str, str]:
    """WebDataset convention: key = path up to the first dot of the base name."""
    d, base = posixpath.split(name)
    stem, dot, ext = base.partition(".")
    return posixpath.join(d, stem), ext.lower()


def iter_tar_samples(data: bytes) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {ext: bytes}) per sample of a tar shard, in file order; consecutive members that
    share a key form one sample."""
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:*") as tf:
        cur_key, cur = None, {}
        for m in tf:
            if not m.isfile():
                continue
            key, ext = _split_key(m.name)
            if _is_hidden(m.name):
                continue
            if key != cur_key and cur:
                yield cur_key, cur
                cur = {}
            cur_key = key
            f = tf.extractfile(m)
            cur[ext] = f.read() if f is not None else b""
        if cur:
            yield cur_key, cur


def _image_of(sample: dict[str, bytes]) -> bytes | None:
    for ext in ("jpg", "jpeg", "png", "webp", "bmp"):
        if ext in sample:
            return sample[ext]
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


def _inspect_webdataset(cfg: "DataConfig", files: list[tuple[str, int]]) -> DatasetInfo:
    manifest = _read_manifest(cfg)
    if manifest is not None:
        shards = manifest["_shards"]
        classes = manifest.get("classes")
        return DatasetInfo(
            cfg.source,
            "webdataset",
            sum(n for _, n in shards),
            tuple(classes) if classes else None,
            tuple(name for name, _ in shards),
        )
    tars = sorted(rel for rel, _ in files if _ext(rel) == ".tar")
    if not tars:
        raise DataError(f"{storage.redact_uri(cfg.source)} holds no .tar shards. Fix: check data.format / data.source")
    # No manifest: open every shard once to count samples and collect label values.
    fs, root = storage.filesystem_for(cfg.source, cfg.s3)
    n, values = 0, []
    for rel in tars:
        try:
            with fs.open_input_stream(f"{root}/{rel}") as f:
                data = f.read()
            for _key, sample in iter_tar_samples(data):
                if _image_of(sample) is None:
                    continue
                n += 1
                v = _raw_label_of(sample)
                if v is not None and v != D.INVALID_LABEL:
                    values.append(v)
        except (tarfile.TarError, OSError) as e:
            log.warning("shard %s is unreadable (%s); its samples will be counted as read errors", rel, type(e).__name__)
    classes = _classes_from_values(values, f"labels in {storage.redact_uri(cfg.source)}")[0] if values else None
    return DatasetInfo(cfg.source, "webdataset", n, classes, tuple(tars))


def _inspect_parquet(cfg: "DataConfig", files: list[tuple[str, int]]) -> DatasetInfo:
    import pyarrow.parquet as pq

    pfiles = sorted(rel for rel, _ in files if _ext(rel) == ".parquet")
    if not pfiles:
        raise DataError(f"{storage.redact_uri(cfg.source)} holds no .parquet files. Fix: check data.format / data.source")
    fs, root = storage.filesystem_for(cfg.source, cfg.s3)
    n, values, hf_names = 0, [], None
    label_col = cfg.label_column
    for i, rel in enumerate(pfiles):
        try:
            pf = pq.ParquetFile(fs.open_input_file(f"{root}/{rel}"))
        except Exception as e:  # noqa: BLE001
            raise DataError(f"{storage.redact_uri(cfg.source)}/{rel} is not a readable Parquet file ({type(e).__name__}). Fix: remove or rewrite it") from None
        cols = pf.schema_arrow.names
        if cfg.image_column not in cols:
            raise DataError(
                f"{storage.redact_uri(cfg.source)}/{rel} has no column {cfg.image_column!r} (columns: {', '.join(cols)}). "
                "Fix: set data.image_column to the column holding encoded image bytes"
            )
        n += pf.metadata.num_rows
        if i == 0 and label_col and label_col not in cols:
            log.info("parquet dataset has no %r column: unlabeled", label_col)
            label_col = None
        if label_col:
            if hf_names is None:
                hf_names = _hf_class_names(pf.schema_arrow.metadata, label_col)
            col = pf.read(columns=[label_col]).column(0)
            values.extend(v for v in col.to_pylist() if v is not None)
    if not label_col or not values:
        classes = None
    elif hf_names:
        classes = tuple(hf_names)
    else:
        classes = _classes_from_values(sorted(set(values), key=str), f"column {label_col!r}")[0]
    return DatasetInfo(cfg.source, "parquet", n, classes, tuple(pfiles))


def _hf_class_names(meta: dict[bytes, bytes] | None, column: str) -> list[str] | None:
    """Class names of a Hugging Face ``ClassLabel`` column, stored in the schema metadata."""
    try:
        info = json.loads((meta or {})[b"huggingface"])
        feat = info["info"]["features"][column]
        return list(feat["names"]) if feat.get("_type") == "ClassLabel" else None
    except (KeyError, ValueError, TypeError):
        return None


def inspect_dataset(cfg: "DataConfig") -> DatasetInfo:
    """List the dataset (no image is decoded) and resolve ``format: auto``.

    Raises ``DataError`` naming the source and the fix for: missing path or bucket, empty
    prefix, wrong endpoint, rejected credentials, access denied, or no usable files.
    """
    files = _list(cfg)
    fmt = _detect_format(cfg, files)
    if fmt == "imagefolder":
        return _inspect_imagefolder(cfg, files)
    if fmt == "webdataset":
        return _inspect_webdataset(cfg, files)
    return _inspect_parquet(cfg, files)


# ---------------------------------------------------------------------------------------------
# Bad-sample counter (a named actor that the driver and the trainer can read)


_COUNTERS: dict[str, Any] = {}


def _counter_cls():
    import ray

    @ray.remote(num_cpus=0, max_restarts=-1)
    class BadSampleCounter:
        def __init__(self) -> None:
            self.counts: dict[str, int] = {}

        def add(self, counts: dict[str, int]) -> None:
            for k, v in counts.items():
                self.counts[k] = self.counts.get(k, 0) + int(v)

        def get(self) -> dict[str, int]:
            return dict(self.counts)

    return BadSampleCounter


def _counter(name: str, create: bool):
    import ray

    if name in _COUNTERS:
        return _COUNTERS[name]
    try:
        h = ray.get_actor(name, namespace=COUNTER_NAMESPACE)
    except ValueError:
        if not create:
            return None
        # A fixed namespace: the driver, Tune trials and Train workers may run in different
        # namespaces but must find the same counter.
        h = _counter_cls().options(name=name, namespace=COUNTER_NAMESPACE, get_if_exists=True).remote()
    _COUNTERS[name] = h
    return h


def bad_sample_counts(counter_name: str) -> dict[str, int]:
    """Counts per kind recorded by pipelines built with ``counter_name`` ({} if none).

    Kinds starting with ``converted_from_`` are kept samples whose pixel mode was converted, and
    ``retried_read`` counts object-store reads retried after a transient error (throttling, 5xx,
    timeouts); all other kinds are dropped samples (``dropped(counts)`` sums them).
    """
    import ray

    h = _counter(counter_name, create=False)
    if h is None:
        return {}
    try:
        return ray.get(h.get.remote())
    except ray.exceptions.RayActorError:
        _COUNTERS.pop(counter_name, None)
        return {}


def _report(counts: dict[str, int], counter_name: str | None) -> None:
    if not counts:
        return
    if counter_name is None:
        log.warning("dropped/converted samples in one batch: %s", counts)
        return
    import ray

    # Waited for: bad samples are rare, and the counts must be complete when an epoch ends.
    ray.get(_counter(counter_name, create=True).add.remote(counts))


# ---------------------------------------------------------------------------------------------
# Decoding inside map_batches


@dataclass(frozen=True)
class _Params:
    resolution: int
    channels: int
    center_crop: bool
    use_labels: bool
    num_classes: int
    class_index: dict[str, int] | None
    counter_name: str | None
    # > 0: retry transient read errors here, counted (object stores); 0: no retries (local disk).
    read_attempts: int = 0


def _check_label(raw: Any, p: _Params) -> tuple[int, str | None]:
    """(class index, None) or (0, bad kind). Labels are ignored for unconditional training."""
    if not p.use_labels:
        return 0, None
    if raw is None or (isinstance(raw, (int, np.integer)) and raw == NO_LABEL):
        return 0, D.MISSING_LABEL
    if raw == D.INVALID_LABEL:
        return 0, D.INVALID_LABEL
    if isinstance(raw, str) and not raw.lstrip("-").isdigit():
        if p.class_index is None or raw not in p.class_index:
            return 0, D.UNKNOWN_LABEL
        return p.class_index[raw], None
    idx = int(raw)
    if not 0 <= idx < p.num_classes:
        return 0, D.LABEL_OUT_OF_RANGE
    return idx, None


def _decode_samples(blobs: list[bytes | None], raw_labels: list[Any], p: _Params, counts: dict[str, int]) -> dict[str, np.ndarray]:
    c = p.channels
    out = np.empty((len(blobs), p.resolution, p.resolution, c), dtype=np.uint8)
    labels = np.empty(len(blobs), dtype=np.int64)
    n = 0
    for data, raw in zip(blobs, raw_labels):
        if isinstance(data, str):  # a read failure recorded as its kind
            counts[data] = counts.get(data, 0) + 1
            continue
        label, bad = _check_label(raw, p)
        if bad is None:
            arr, kind = D.decode_image(data, p.resolution, c, p.center_crop)
            if arr is None:
                bad = kind
            else:
                out[n] = arr
                labels[n] = label
                n += 1
                if kind is not None:
                    counts[kind] = counts.get(kind, 0) + 1
                continue
        counts[bad] = counts.get(bad, 0) + 1
    return {"image": D.to_model_range(out[:n]), "label": labels[:n]}


_COUNT_LOCK = threading.Lock()


def _read_one(fs: Any, path: str, retry: tuple[int, dict[str, int]] | None = None) -> bytes | str:
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


def _decode_paths_batch(batch: dict[str, np.ndarray], fs: Any, root: str, parallel_reads: int, p: _Params) -> dict[str, np.ndarray]:
    fs = storage.resolve_fs(fs)
    paths = [f"{root}/{rel}" for rel in batch["path"]]
    raw = batch["label"].tolist()
    counts: dict[str, int] = {}
    if p.use_labels:
        # Skip reading files that would be dropped for their label anyway.
        keep = [i for i, l in enumerate(raw) if _check_label(l, p)[1] is None]
        for i, l in enumerate(raw):
            kind = _check_label(l, p)[1]
            if kind:
                counts[kind] = counts.get(kind, 0) + 1
        paths = [paths[i] for i in keep]
        raw = [raw[i] for i in keep]
    retry = (p.read_attempts, counts) if p.read_attempts else None
    if parallel_reads > 1:
        # Object-store GETs are latency-bound: overlap them.
        with ThreadPoolExecutor(parallel_reads) as ex:
            blobs = list(ex.map(lambda q: _read_one(fs, q, retry), paths))
    else:
        blobs = [_read_one(fs, q, retry) for q in paths]
    out = _decode_samples(blobs, raw, p, counts)
    _report(counts, p.counter_name)
    return out


def _decode_paths_chunks(batch: dict[str, np.ndarray], chunk: int, **kw: Any) -> Iterator[dict[str, np.ndarray]]:
    n = len(batch["path"])
    for i in range(0, n, chunk):
        yield _decode_paths_batch({k: v[i : i + chunk] for k, v in batch.items()}, **kw)


def _chunked(blobs: list[Any], raw: list[Any], counts: dict[str, int], chunk: int, p: _Params) -> Iterator[dict[str, np.ndarray]]:
    """Decode in chunks and yield each: a shard or row group can hold thousands of images, and
    one decoded block for all of them would be hundreds of MB."""
    for i in range(0, max(len(blobs), 1), chunk):  # one (possibly empty) output even for no samples
        out = _decode_samples(blobs[i : i + chunk], raw[i : i + chunk], p, counts)
        _report(counts, p.counter_name)
        counts.clear()
        yield out


def _decode_shards_batch(batch: dict[str, np.ndarray], fs: Any, root: str, seed: int, chunk: int, p: _Params) -> Iterator[dict[str, np.ndarray]]:
    fs = storage.resolve_fs(fs)
    blobs: list[Any] = []
    raw: list[Any] = []
    counts: dict[str, int] = {}
    for rel in batch["path"]:
        data = _read_one(fs, f"{root}/{rel}", (p.read_attempts, counts) if p.read_attempts else None)
        if isinstance(data, str):
            counts[data] = counts.get(data, 0) + 1
            continue
        try:
            samples = [s for _k, s in iter_tar_samples(data)]
        except tarfile.TarError:
            counts[D.CORRUPT] = counts.get(D.CORRUPT, 0) + 1
            continue
        # Shuffle within the shard too (deterministically), shards are often written in class order.
        order = np.random.default_rng([seed, _stable_hash(rel)]).permutation(len(samples))
        for i in order:
            s = samples[i]
            img = _image_of(s)
            if img is None:
                continue  # a key without an image (stray metadata file), not a sample
            blobs.append(img)
            raw.append(_raw_label_of(s))
    yield from _chunked(blobs, raw, counts, chunk, p)


def _cell_bytes(v: Any) -> bytes | None:
    if v is None:
        return None
    if isinstance(v, dict):  # Hugging Face Image feature: {"bytes": ..., "path": ...}
        return v.get("bytes")
    return bytes(v)


def _decode_row_group_batch(batch: dict[str, np.ndarray], fs: Any, root: str, image_col: str, label_col: str | None, chunk: int, p: _Params) -> Iterator[dict[str, np.ndarray]]:
    import pyarrow.parquet as pq

    fs = storage.resolve_fs(fs)
    counts: dict[str, int] = {}
    blobs: list[Any] = []
    raw: list[Any] = []
    for rel, rg in zip(batch["path"], batch["row_group"]):
        def read(rel: str = rel, rg: int = int(rg)) -> Any:
            pf = pq.ParquetFile(fs.open_input_file(f"{root}/{rel}"))
            return pf.read_row_group(rg, columns=[image_col] + ([label_col] if label_col else []))

        def count(_e: BaseException) -> None:
            counts[D.RETRIED_READ] = counts.get(D.RETRIED_READ, 0) + 1

        try:
            t = storage.retry_call(read, max_attempts=max(p.read_attempts, 1), on_retry=count)
        except Exception:  # noqa: BLE001 - a broken row group drops its rows, not the run
            counts[D.READ_ERROR] = counts.get(D.READ_ERROR, 0) + 1
            continue
        blobs += [_cell_bytes(v) for v in t.column(image_col).to_pylist()]
        raw += t.column(label_col).to_pylist() if label_col else [None] * t.num_rows
    yield from _chunked(blobs, raw, counts, chunk, p)


def _stable_hash(s: str) -> int:
    import zlib

    return zlib.crc32(s.encode())


def build_train_dataset(cfg: "DataConfig", info: DatasetInfo, *, counter_name: str | None = None) -> "ray.data.Dataset":
    """A Ray Dataset of ``{"image": float32 [C, H, W] in [-1, 1], "label": int64}`` rows.

    Files (or shards) are shuffled deterministically with ``cfg.seed``; no random flip is
    applied (the trainer flips per batch, so decoded images can be cached across epochs).
    Dropped and converted samples are counted in the named actor ``counter_name`` (read them
    with ``bad_sample_counts``).
    """
    import pyarrow as pa
    import ray
    import ray.data

    if info.source != cfg.source:
        raise DataError(f"DatasetInfo is for {storage.redact_uri(info.source)!r} but data.source={storage.redact_uri(cfg.source)!r}: call inspect_dataset(cfg) again")
    if counter_name is not None:
        _counter(counter_name, create=True)  # owned by the caller (driver), not by a data task
    is_s3 = storage.parse_uri(cfg.source).is_s3
    try:
        fs, root = storage.filesystem_for(cfg.source, cfg.s3)
        # Ray workers get a handle that rebuilds the filesystem (pyarrow's own pickling drops the
        # retry strategy) with pyarrow's retries off: the tasks retry reads themselves and count
        # them.
        task_fs = storage.s3_filesystem_handle(cfg.s3, max_attempts=1) if is_s3 else fs
    except storage.StorageError as e:
        raise _fail(cfg, e) from None
    use_labels = bool(cfg.conditional and info.class_names)
    p = _Params(
        resolution=cfg.resolution,
        channels=cfg.channels,
        center_crop=cfg.center_crop,
        use_labels=use_labels,
        num_classes=info.num_classes or 0,
        class_index={n: i for i, n in enumerate(info.class_names)} if info.class_names else None,
        counter_name=counter_name,
        read_attempts=cfg.s3.max_attempts if is_s3 else 0,
    )
    rng = np.random.default_rng(cfg.seed)
    if not info.files:
        raise DataError(f"{storage.redact_uri(cfg.source)}: DatasetInfo lists no files; call inspect_dataset(cfg) first")

    if info.format == "imagefolder":
        n = len(info.files)
        order = rng.permutation(n)
        paths = np.asarray(info.files, dtype=object)[order]
        labels = (np.asarray(info.labels, dtype=np.int64) if info.labels is not None else np.zeros(n, np.int64))[order]
        # Few, large map tasks: Ray Data's per-task overhead (scheduling, ramp-up, the last
        # task's tail) dominates on few cores. Measured on 2 cores with 2,000 JPEGs: 125-row
        # blocks 1.9k img/s, 250 2.2k, 1,000 2.9k. So one block per CPU, capped at ~64 MiB of
        # decoded output per block; each task yields its output in chunks so that training can
        # start on the first chunk (streaming) instead of waiting for the whole block.
        cpus = int(ray.cluster_resources().get("CPU", 4)) if ray.is_initialized() else 4
        row_bytes = 4 * cfg.channels * cfg.resolution * cfg.resolution
        cap = max(cfg.decode_batch_size, (64 << 20) // row_bytes)
        per_block = max(cfg.decode_batch_size, min(cap, math.ceil(n / max(cpus, 1))))
        tables = [
            pa.table({"path": pa.array(paths[i : i + per_block].tolist(), pa.string()), "label": pa.array(labels[i : i + per_block])})
            for i in range(0, n, per_block)
        ]
        ds = ray.data.from_arrow(tables)
        return ds.map_batches(
            _decode_paths_chunks,
            batch_size=None,
            batch_format="numpy",
            fn_kwargs={"chunk": 4 * cfg.decode_batch_size, "fs": task_fs, "root": root, "parallel_reads": 16 if is_s3 else 1, "p": p},
            zero_copy_batch=True,
        )
    if info.format == "webdataset":
        shards = [info.files[i] for i in rng.permutation(len(info.files))]
        ds = ray.data.from_arrow([pa.table({"path": pa.array([s], pa.string())}) for s in shards])
        return ds.map_batches(
            _decode_shards_batch,
            batch_size=1,
            batch_format="numpy",
            fn_kwargs={"fs": task_fs, "root": root, "seed": cfg.seed, "chunk": 4 * cfg.decode_batch_size, "p": p},
        )
    if info.format == "parquet":
        import pyarrow.parquet as pq

        label_col = cfg.label_column if (cfg.label_column and info.class_names is not None) else None
        # One task per row group, read by our own code (not ray.data.read_parquet): bounded task
        # size, the same filesystem object as everywhere else, and a seeded shuffle of row groups.
        units = []
        for rel in info.files:
            try:
                meta = pq.ParquetFile(fs.open_input_file(f"{root}/{rel}")).metadata
            except Exception as e:  # noqa: BLE001
                raise DataError(f"{storage.redact_uri(cfg.source)}/{rel} is not a readable Parquet file ({type(e).__name__}). Fix: remove or rewrite it") from None
            units += [(rel, rg) for rg in range(meta.num_row_groups)]
        units = [units[i] for i in rng.permutation(len(units))]
        ds = ray.data.from_arrow([pa.table({"path": [u[0]], "row_group": [u[1]]}) for u in units])
        return ds.map_batches(
            _decode_row_group_batch,
            batch_size=1,
            batch_format="numpy",
            fn_kwargs={"fs": task_fs, "root": root, "image_col": cfg.image_column, "label_col": label_col, "chunk": 4 * cfg.decode_batch_size, "p": p},
        )
    raise DataError(f"unknown dataset format {info.format!r}")


# ---------------------------------------------------------------------------------------------
# Sequential access for the CLI (verify, stats, bench): every sample's raw bytes, in order


def iter_samples(cfg: "DataConfig", info: DatasetInfo, *, threads: int = 8) -> Iterator[tuple[str, bytes | str, Any]]:
    """``(name, bytes or read-failure kind, raw label)`` for every listed sample, in listing order.

    The raw label is a class index, ``NO_LABEL``, a class name or ``None`` depending on the
    format; ``label_problem`` turns it into a bad-sample kind.
    """
    fs, root = storage.filesystem_for(cfg.source, cfg.s3)
    if info.format == "imagefolder":
        labels = info.labels if info.labels is not None else (NO_LABEL,) * len(info.files)
        step = 64
        with ThreadPoolExecutor(threads if storage.parse_uri(cfg.source).is_s3 else 1) as ex:
            for i in range(0, len(info.files), step):
                chunk = info.files[i : i + step]
                blobs = list(ex.map(lambda rel: _read_one(fs, f"{root}/{rel}"), chunk))
                yield from zip(chunk, blobs, labels[i : i + step])
    elif info.format == "webdataset":
        for shard in info.files:
            data = _read_one(fs, f"{root}/{shard}")
            if isinstance(data, str):
                yield shard, data, None
                continue
            try:
                for key, s in iter_tar_samples(data):
                    img = _image_of(s)
                    if img is not None:
                        yield f"{shard}:{key}", img, _raw_label_of(s)
            except tarfile.TarError:
                yield shard, D.CORRUPT, None
    elif info.format == "parquet":
        import pyarrow.parquet as pq

        label_col = cfg.label_column if (cfg.label_column and info.class_names is not None) else None
        cols = [cfg.image_column] + ([label_col] if label_col else [])
        for rel in info.files:
            pf = pq.ParquetFile(fs.open_input_file(f"{root}/{rel}"))
            row = 0
            for batch in pf.iter_batches(batch_size=256, columns=cols):
                d = batch.to_pydict()
                labs = d[label_col] if label_col else [None] * batch.num_rows
                for v, lab in zip(d[cfg.image_column], labs):
                    b = _cell_bytes(v)
                    yield f"{rel}:{row}", b if b is not None else D.EMPTY, lab
                    row += 1
    else:
        raise DataError(f"unknown dataset format {info.format!r}")


def label_problem(raw: Any, info: DatasetInfo) -> tuple[int, str | None]:
    """(class index, None) or (0, bad kind) for a raw label of a labeled dataset."""
    p = _Params(0, 3, True, info.class_names is not None, info.num_classes or 0,
                {n: i for i, n in enumerate(info.class_names)} if info.class_names else None, None)
    return _check_label(raw, p)
