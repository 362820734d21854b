"""``raydiff data``: upload, ls, verify, stats, make-demo, serve-s3.

S3 settings come from ``--endpoint-url/--region/--profile`` and the standard AWS environment
(``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``). There are deliberately no credential flags:
secrets on a command line end up in shell history and ``ps`` output.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import sys
import tarfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from orchestrator import storage
from orchestrator.data import decode as D
from orchestrator.data.pipeline import (
    MANIFEST_NAME,
    NO_LABEL,
    DataError,
    DatasetInfo,
    inspect_dataset,
    iter_samples,
    label_problem,
)

MANIFEST_VERSION = 1


def _s3cfg(args: argparse.Namespace):
    from orchestrator.config import S3Config

    kw: dict[str, Any] = {}
    if getattr(args, "endpoint_url", None):
        kw["endpoint_url"] = args.endpoint_url
    if getattr(args, "region", None):
        kw["region"] = args.region
    if getattr(args, "profile", None):
        kw["profile"] = args.profile
    return S3Config(**kw)


def _data_cfg(args: argparse.Namespace, source: str, **kw: Any):
    from orchestrator.config import DataConfig

    for name in ("format", "labels_file", "image_column", "label_column"):
        v = getattr(args, name, None)
        if v is not None:
            kw.setdefault(name, v)
    return DataConfig(source=source, s3=_s3cfg(args), **kw)


def _add_s3_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("S3 (credentials: AWS_* environment variables or --profile)")
    g.add_argument("--endpoint-url", help="S3-compatible endpoint, e.g. http://127.0.0.1:9000")
    g.add_argument("--region")
    g.add_argument("--profile", help="AWS profile name from ~/.aws/config")


def _add_dataset_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--format", choices=["auto", "imagefolder", "webdataset", "parquet"], default="auto")
    p.add_argument("--labels-file", help="CSV/JSON path->label for flat image folders")
    p.add_argument("--image-column", default="image", help="parquet: column with encoded image bytes")
    p.add_argument("--label-column", default="label", help="parquet: label column")


# ---------------------------------------------------------------------------------------------
# upload


def parse_shard_size(text: str) -> tuple[str, int]:
    """``"64MB"``/``"512KB"``/``"1GB"`` -> ("bytes", n); ``"1000"`` -> ("samples", 1000)."""
    t = text.strip().upper().replace(" ", "")
    units = {"KB": 1 << 10, "MB": 1 << 20, "GB": 1 << 30, "B": 1}
    for u, mult in units.items():
        if t.endswith(u) and t[: -len(u)].replace(".", "", 1).isdigit():
            n = int(float(t[: -len(u)]) * mult)
            if n <= 0:
                break
            return "bytes", n
    if t.isdigit() and int(t) > 0:
        return "samples", int(t)
    raise argparse.ArgumentTypeError(f"--shard-size {text!r}: use a size like 64MB / 512KB or a sample count like 1000")


def build_shard(samples: list[tuple[str, str, bytes, int | None]]) -> bytes:
    """A WebDataset tar of ``(key, image ext, bytes, label or None)``; byte-identical for the same
    input (fixed mtime/owner), so that re-uploads can be recognised by checksum."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tf:
        for key, ext, data, label in samples:
            members = [(f"{key}.{ext}", data)]
            if label is not None:
                members.append((f"{key}.cls", str(label).encode()))
            for name, payload in members:
                ti = tarfile.TarInfo(name)
                ti.size, ti.mtime, ti.mode, ti.uid, ti.gid, ti.uname, ti.gname = len(payload), 0, 0o644, 0, 0, "", ""
                tf.addfile(ti, io.BytesIO(payload))
    return buf.getvalue()


def _plan_shards(info: DatasetInfo, sizes: dict[str, int], kind: str, limit: int, seed: int) -> list[list[int]]:
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
            raise storage._explain_client_error(e, uri, s3cfg, "write to") from None
    else:
        storage.write_bytes(uri, data)


def upload(src: str, dest: str, *, shard_size: tuple[str, int] = ("bytes", 64 << 20), labels_file: str | None = None,
           s3cfg=None, seed: int = 0, progress: bool = True, out=None) -> dict[str, Any]:
    """Pack a local image folder into WebDataset shards under ``dest`` (S3 or local) with a
    ``manifest.json``. Shards already at ``dest`` with the same sha256 are skipped (resume)."""
    from tqdm import tqdm

    out = out or sys.stdout

    from orchestrator.config import DataConfig

    if storage.parse_uri(src).is_s3:
        raise DataError(f"upload SRC must be a local folder, got {storage.redact_uri(src)}. Fix: download it first or train from it directly")
    info = inspect_dataset(DataConfig(source=src, format="imagefolder", labels_file=labels_file))
    storage.check_writable(dest, s3cfg)
    root = Path(storage.parse_uri(src).key)
    sizes = {rel: (root / rel).stat().st_size for rel in info.files}
    plan = _plan_shards(info, sizes, shard_size[0], shard_size[1], seed)
    shards_meta, uploaded, skipped = [], 0, 0
    class_counts: Counter[str] = Counter()
    bar = tqdm(total=len(plan), unit="shard", desc="upload", disable=not progress, file=sys.stderr)
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


def cmd_upload(args: argparse.Namespace) -> int:
    upload(args.src, args.dest, shard_size=args.shard_size, labels_file=args.labels_file, s3cfg=_s3cfg(args), seed=args.seed, progress=not args.no_progress)
    return 0


# ---------------------------------------------------------------------------------------------
# ls / verify / stats


def cmd_ls(args: argparse.Namespace, out=None) -> int:
    out = out or sys.stdout
    files = storage.list_files(args.uri, _s3cfg(args))
    if not files:
        print(f"{storage.redact_uri(args.uri)}: no files", file=out)
        return 1
    for rel, size in files[: args.limit] if args.limit else files:
        print(f"{size:>12,d}  {rel}", file=out)
    if args.limit and len(files) > args.limit:
        print(f"... {len(files) - args.limit} more", file=out)
    print(f"{len(files)} files, {sum(s for _, s in files):,d} bytes", file=out)
    return 0


def verify(cfg, *, resolution: int = 32, out=None, max_listed: int = 20) -> tuple[int, dict[str, int], list[tuple[str, str]]]:
    """Decode every sample. Returns (readable count, counts per kind, first bad (name, kind))."""
    out = out or sys.stdout
    info = inspect_dataset(cfg)
    good, counts, bad = 0, Counter(), []
    for name, data, raw in iter_samples(cfg, info):
        kind = data if isinstance(data, str) else None
        if kind is None and info.class_names is not None:
            kind = label_problem(raw, info)[1]
        if kind is None:
            arr, kind2 = D.decode_image(data, resolution, cfg.channels, True)
            if arr is not None:
                good += 1
                if kind2:
                    counts[kind2] += 1
                continue
            kind = kind2
        counts[kind] += 1
        if len(bad) < max_listed:
            bad.append((name, kind))
    print(f"{storage.redact_uri(cfg.source)} ({info.format}): {good} of {info.num_samples} samples readable", file=out)
    for k, v in sorted(counts.items()):
        print(f"  {k}: {v}", file=out)
    for name, kind in bad:
        print(f"  bad: {name} ({kind})", file=out)
    return good, dict(counts), bad


def cmd_verify(args: argparse.Namespace, out=None) -> int:
    good, _counts, _bad = verify(_data_cfg(args, args.uri), resolution=args.resolution, out=out)
    return 0 if good > 0 else 1


def stats(cfg, *, out=None) -> dict[str, Any]:
    """Count, class histogram and image size distribution (headers only, no full decode)."""
    from PIL import Image

    out = out or sys.stdout
    info = inspect_dataset(cfg)
    classes: Counter[str] = Counter()
    sizes: Counter[tuple[int, int]] = Counter()
    widths, heights, unreadable = [], [], 0
    for _name, data, raw in iter_samples(cfg, info):
        if info.class_names is not None:
            idx, problem = label_problem(raw, info)
            classes[problem or info.class_names[idx]] += 1
        if isinstance(data, str) or not data:
            unreadable += 1
            continue
        try:
            with Image.open(io.BytesIO(data)) as im:
                w, h = im.size
        except Exception:  # noqa: BLE001 - counted, `verify` says why
            unreadable += 1
            continue
        sizes[(w, h)] += 1
        widths.append(w)
        heights.append(h)
    result = {
        "source": storage.redact_uri(cfg.source),
        "format": info.format,
        "num_samples": info.num_samples,
        "unreadable_headers": unreadable,
        "classes": dict(sorted(classes.items())) if info.class_names is not None else None,
        "sizes": {f"{w}x{h}": n for (w, h), n in sizes.most_common(10)},
    }
    if widths:
        for axis, vals in (("width", widths), ("height", heights)):
            a = np.asarray(vals)
            result[axis] = {"min": int(a.min()), "p50": float(np.median(a)), "max": int(a.max())}
    print(f"{result['source']} ({info.format}): {info.num_samples} samples, {unreadable} with unreadable headers", file=out)
    if result["classes"] is not None:
        print(f"classes ({len(info.class_names)}):", file=out)
        for k, v in result["classes"].items():
            print(f"  {k}: {v}", file=out)
    else:
        print("unlabeled", file=out)
    if widths:
        print(f"width  min/median/max: {result['width']['min']}/{result['width']['p50']:g}/{result['width']['max']}", file=out)
        print(f"height min/median/max: {result['height']['min']}/{result['height']['p50']:g}/{result['height']['max']}", file=out)
        print("most common sizes: " + ", ".join(f"{k} ({v})" for k, v in result["sizes"].items()), file=out)
    return result


def cmd_stats(args: argparse.Namespace, out=None) -> int:
    stats(_data_cfg(args, args.uri), out=out)
    return 0


# ---------------------------------------------------------------------------------------------
# make-demo / serve-s3


def cmd_make_demo(args: argparse.Namespace, out=None) -> int:
    from orchestrator.data.demo import write_demo_dataset

    out = out or sys.stdout

    write_demo_dataset(args.dir, images_per_class=args.images_per_class, resolution=args.resolution, seed=args.seed)
    print(f"wrote the demo dataset to {args.dir}: train with data.source={args.dir}", file=out)
    return 0


def _restore(client, root: Path) -> int:
    n = 0
    for bucket_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        client.create_bucket(Bucket=bucket_dir.name)
        for f in sorted(bucket_dir.rglob("*")):
            if f.is_file():
                client.put_object(Bucket=bucket_dir.name, Key=f.relative_to(bucket_dir).as_posix(), Body=f.read_bytes())
                n += 1
    return n


def _snapshot(client, root: Path) -> int:
    n = 0
    for b in client.list_buckets().get("Buckets", []):
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=b["Name"]):
            for obj in page.get("Contents", []):
                target = root / b["Name"] / obj["Key"]
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(client.get_object(Bucket=b["Name"], Key=obj["Key"])["Body"].read())
                n += 1
    return n


def serve_s3(port: int, directory: str | None, buckets: list[str], *, stop: threading.Event | None = None, out=None) -> None:
    """A local S3 (moto) on 127.0.0.1 for demos, until Ctrl-C (or ``stop`` is set).

    moto keeps objects in memory. With ``directory`` the store is restored from it at start
    (``DIR/<bucket>/<key>`` files) and written back on a clean exit: best-effort persistence,
    lost if the process is killed hard. Not for production data.
    """
    import boto3
    from moto.server import ThreadedMotoServer

    out = out or sys.stdout
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    # moto accepts any key; these fixed dummy values are not secrets.
    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="testing", aws_secret_access_key="testing")
    root = Path(directory) if directory else None
    try:
        restored = _restore(client, root) if root and root.is_dir() else 0
        for b in buckets:
            try:
                client.create_bucket(Bucket=b)
            except client.exceptions.BucketAlreadyOwnedByYou:
                pass
        bucket = buckets[0] if buckets else "BUCKET"
        print(
            f"local S3 (moto) at {endpoint}" + (f", {restored} objects restored from {root}" if root else "") + "\n"
            "use it with:\n"
            "  export AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing AWS_DEFAULT_REGION=us-east-1\n"
            f"  raydiff data upload DIR s3://{bucket}/dataset --endpoint-url {endpoint}\n"
            f"  raydiff train data.source=s3://{bucket}/dataset data.s3.endpoint_url={endpoint} "
            f"run.storage=s3://{bucket}/runs\n"
            "Ctrl-C stops it" + (f" and saves the objects to {root}" if root else " (objects are kept in memory only)"),
            file=out,
            flush=True,
        )
        while not (stop.wait(0.2) if stop else time.sleep(0.5)):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        if root:
            root.mkdir(parents=True, exist_ok=True)
            n = _snapshot(client, root)
            print(f"saved {n} objects to {root}", file=out, flush=True)
        server.stop()


def cmd_serve_s3(args: argparse.Namespace) -> int:
    serve_s3(args.port, args.dir, args.bucket or [])
    return 0


# ---------------------------------------------------------------------------------------------


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``data`` with its sub-commands to an argparse sub-parser set."""
    data = subparsers.add_parser("data", help="prepare, upload and check datasets")
    sub = data.add_subparsers(dest="data_command", required=True, metavar="DATA_COMMAND")

    p = sub.add_parser("upload", help="pack a local image folder into WebDataset tar shards (S3 or local)")
    p.add_argument("src", metavar="SRC", help="local image folder (class sub-directories or flat)")
    p.add_argument("dest", metavar="DEST", help="s3://bucket/prefix or a local directory")
    p.add_argument("--shard-size", type=parse_shard_size, default=("bytes", 64 << 20), help="e.g. 64MB (default) or 1000 (samples)")
    p.add_argument("--labels-file", help="CSV/JSON path->label for flat folders")
    p.add_argument("--seed", type=int, default=0, help="sample order across shards")
    p.add_argument("--no-progress", action="store_true")
    _add_s3_args(p)
    p.set_defaults(func=cmd_upload)

    p = sub.add_parser("ls", help="list files under a local path or s3:// prefix")
    p.add_argument("uri", metavar="URI")
    p.add_argument("--limit", type=int, default=100, help="files to print (0 = all)")
    _add_s3_args(p)
    p.set_defaults(func=cmd_ls)

    p = sub.add_parser("verify", help="decode every sample; report unreadable ones per kind")
    p.add_argument("uri", metavar="URI")
    p.add_argument("--resolution", type=int, default=32)
    _add_dataset_args(p)
    _add_s3_args(p)
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("stats", help="sample count, class histogram, image sizes")
    p.add_argument("uri", metavar="URI")
    _add_dataset_args(p)
    _add_s3_args(p)
    p.set_defaults(func=cmd_stats)

    p = sub.add_parser("make-demo", help="write the built-in coloured-shapes dataset to DIR")
    p.add_argument("dir", metavar="DIR")
    p.add_argument("--images-per-class", type=int, default=300)
    p.add_argument("--resolution", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_make_demo)

    p = sub.add_parser("serve-s3", help="run a local S3 (moto) on 127.0.0.1 for demos, until Ctrl-C")
    p.add_argument("--port", type=int, default=9000)
    p.add_argument("--dir", help="restore objects from / save them to this directory (best effort)")
    p.add_argument("--bucket", action="append", help="create this bucket at start (repeatable)")
    p.set_defaults(func=cmd_serve_s3)
    return data


def main(argv: list[str] | None = None) -> int:
    """``python -m orchestrator.data.cli data ...`` (the same commands as ``raydiff data``)."""
    parser = argparse.ArgumentParser(prog="raydiff")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (DataError, storage.StorageError) as e:
        print(f"raydiff: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
