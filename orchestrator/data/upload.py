"""``raydiff data upload``: pack a local image folder into WebDataset tar shards plus a
``manifest.json`` under a local directory or ``s3://bucket/prefix``.

Shards are planned deterministically (seeded shuffle, then cut by size or sample count) and
written byte-identically (``formats.webdataset.build_shard``), so an interrupted upload resumes
by skipping shards whose sha256 already matches at the destination.
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from orchestrator import storage
from orchestrator.data.formats.webdataset import MANIFEST_NAME, MANIFEST_VERSION, build_shard
from orchestrator.data.info import DataError, DatasetInfo
from orchestrator.data.labels import NO_LABEL
from orchestrator.data.pipeline import inspect_dataset


def plan_shards(info: DatasetInfo, sizes: dict[str, int], kind: str, limit: int, seed: int) -> list[list[int]]:
    """Indices into ``info.files`` per shard; ``kind`` is "bytes" or "samples" (``limit`` per shard)."""
    # Shuffled once (seeded) so that every shard mixes classes; deterministic so that a resumed
    # upload produces the same shards.
    order = np.random.default_rng(seed).permutation(len(info.files))
    shards: list[list[int]] = [[]]
    used = 0
    for i in order.tolist():
        size = sizes.get(info.files[i], 0)
        full = len(shards[-1]) >= limit if kind == "samples" else (used + size > limit and shards[-1])
        if full:
            shards.append([])
            used = 0
        shards[-1].append(i)
        used += size
    return [s for s in shards if s]


def _existing_sha256(uri: str, s3cfg) -> str | None:
    loc = storage.parse_uri(uri)
    if loc.is_s3:
        client = storage.s3_client(s3cfg)
        try:
            return client.head_object(Bucket=loc.bucket, Key=loc.key).get("Metadata", {}).get("sha256")
        except client.exceptions.ClientError:
            return None
    p = Path(loc.key)
    return hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else None


def _put_shard(uri: str, data: bytes, sha: str, s3cfg) -> None:
    loc = storage.parse_uri(uri)
    if loc.is_s3:
        try:
            storage.s3_client(s3cfg).put_object(Bucket=loc.bucket, Key=loc.key, Body=data, Metadata={"sha256": sha})
        except Exception as e:  # noqa: BLE001
            raise storage.explain_client_error(e, uri, s3cfg, "write to") from None
    else:
        storage.write_bytes(uri, data)


def upload(src: str, dest: str, *, shard_size: tuple[str, int] = ("bytes", 64 << 20), labels_file: str | None = None,
           s3cfg=None, seed: int = 0, progress: bool = True, out=None) -> dict[str, Any]:
    """Pack a local image folder into WebDataset shards under ``dest`` (S3 or local) with a
    ``manifest.json``. Shards already at ``dest`` with the same sha256 are skipped (resume)."""
    from orchestrator.config import DataConfig

    out = out or sys.stdout
    if storage.parse_uri(src).is_s3:
        raise DataError(f"upload SRC must be a local folder, got {storage.redact_uri(src)}. Fix: download it first or train from it directly")
    info = inspect_dataset(DataConfig(source=src, format="imagefolder", labels_file=labels_file))
    storage.check_writable(dest, s3cfg)
    root = Path(storage.parse_uri(src).key)
    sizes = {rel: (root / rel).stat().st_size for rel in info.files}
    plan = plan_shards(info, sizes, shard_size[0], shard_size[1], seed)
    shards_meta, uploaded, skipped = [], 0, 0
    class_counts: Counter[str] = Counter()
    # disable=None: no bar when stderr is not a terminal (a log file gets no redraws).
    bar = tqdm(total=len(plan), unit="shard", desc="upload", disable=None if progress else True, file=sys.stderr)
    for n, idxs in enumerate(plan):
        samples = []
        for i in idxs:
            rel = info.files[i]
            ext = Path(rel).suffix.lower().lstrip(".")
            ext = "jpg" if ext == "jpeg" else ext
            label = None
            if info.labels is not None and info.labels[i] != NO_LABEL:
                label = int(info.labels[i])
                class_counts[info.class_names[label] if info.class_names and 0 <= label < len(info.class_names) else str(label)] += 1
            samples.append((f"{i:08d}", ext, (root / rel).read_bytes(), label))
        data = build_shard(samples)
        sha = hashlib.sha256(data).hexdigest()
        name = f"shard-{n:06d}.tar"
        uri = storage.join(dest, name)
        if _existing_sha256(uri, s3cfg) == sha:
            skipped += 1
        else:
            _put_shard(uri, data, sha, s3cfg)
            uploaded += 1
        shards_meta.append({"name": name, "num_samples": len(samples), "bytes": len(data), "sha256": sha})
        bar.update(1)
    bar.close()
    manifest = {
        "format": "webdataset",
        "version": MANIFEST_VERSION,
        "num_samples": sum(s["num_samples"] for s in shards_meta),
        "classes": list(info.class_names) if info.class_names else None,
        "class_counts": dict(sorted(class_counts.items())),
        "shards": shards_meta,
        "created_by": "raydiff data upload",
    }
    storage.write_bytes(storage.join(dest, MANIFEST_NAME), json.dumps(manifest, indent=1).encode(), s3cfg)
    print(
        f"{storage.redact_uri(dest)}: {len(plan)} shards ({uploaded} uploaded, {skipped} already present), "
        f"{manifest['num_samples']} samples, {len(info.class_names or ())} classes",
        file=out,
    )
    return manifest
