"""``raydiff data``: upload, encode, ls, verify, stats, make-demo, serve-s3 (argparse and thin
command functions; the work is in ``orchestrator/data/upload.py``, ``orchestrator/data/encode.py``,
``orchestrator/data/check.py`` and ``orchestrator/storage/local_server.py``).

S3 settings come from the flags of ``orchestrator/storage/flags.py`` and the standard AWS
environment; there are deliberately no credential flags.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from orchestrator import storage
from orchestrator.config import DataConfig
from orchestrator.data.formats import FORMATS
from orchestrator.data.info import DataError
from orchestrator.storage.flags import add_s3_args, s3_config_from_args


def _data_cfg(args: argparse.Namespace, source: str, **kw: Any):
    for name in ("format", "labels_file", "image_column", "label_column", "captions", "caption_column", "missing_caption"):
        v = getattr(args, name, None)
        if v is not None:
            kw.setdefault(name, v)
    return DataConfig(source=source, **kw).with_storage(s3_config_from_args(args))


def _add_dataset_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--format", choices=["auto", *FORMATS], default="auto")
    p.add_argument("--labels-file", help="CSV/JSON path->label for flat image folders")
    p.add_argument("--image-column", default="image", help="parquet: column with encoded image bytes")
    p.add_argument("--label-column", default="label", help="parquet: label column")


def _add_caption_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--captions", action="store_true", default=None,
                   help="read captions too (data.captions): report coverage and length")
    p.add_argument("--caption-column", help="column / metadata field / WebDataset extension or .json field of the "
                   "caption (data.caption_column, default text)")
    p.add_argument("--missing-caption", choices=["bad", "unconditional"],
                   help="a sample without a caption: bad (default) or kept with the empty prompt")


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


# ---------------------------------------------------------------------------------------------
# Commands


def cmd_upload(args: argparse.Namespace) -> int:
    from orchestrator.data.upload import upload

    upload(args.src, args.dest, shard_size=args.shard_size, labels_file=args.labels_file, s3cfg=s3_config_from_args(args),
           seed=args.seed, progress=not args.no_progress)
    return 0


def cmd_encode(args: argparse.Namespace, out=None) -> int:
    from orchestrator.data.encode import encode

    opts = {k: getattr(args, k) for k in ("format", "labels_file", "image_column", "label_column", "caption_column",
                                          "missing_caption")}
    encode(args.src, args.dest, vae=args.vae, text_encoder=args.text_encoder, text_max_length=args.text_max_length,
           resolution=args.resolution, batch_size=args.batch_size,
           scaling_factor=args.scaling_factor, concurrency=args.concurrency, dtype=args.dtype, shard_rows=args.shard_rows,
           data_options=opts, s3cfg=s3_config_from_args(args), progress=not args.no_progress, out=out)
    return 0


def cmd_ls(args: argparse.Namespace, out=None) -> int:
    out = out or sys.stdout
    files = storage.list_files(args.uri, s3_config_from_args(args))
    if not files:
        print(f"{storage.redact_uri(args.uri)}: no files", file=out)
        return 1
    for rel, size in files[: args.limit] if args.limit else files:
        print(f"{size:>12,d}  {rel}", file=out)
    if args.limit and len(files) > args.limit:
        print(f"... {len(files) - args.limit} more", file=out)
    print(f"{len(files)} files, {sum(s for _, s in files):,d} bytes", file=out)
    return 0


def cmd_verify(args: argparse.Namespace, out=None) -> int:
    from orchestrator.data.check import verify

    good, _counts, _bad = verify(_data_cfg(args, args.uri), resolution=args.resolution, out=out)
    return 0 if good > 0 else 1


def cmd_stats(args: argparse.Namespace, out=None) -> int:
    from orchestrator.data.check import stats

    stats(_data_cfg(args, args.uri), out=out)
    return 0


def cmd_make_demo(args: argparse.Namespace, out=None) -> int:
    out = out or sys.stdout
    if args.captions:
        from orchestrator.data.demo_text import HELD_OUT, write_captioned_demo

        write_captioned_demo(args.dir, images_per_combo=args.images_per_class, resolution=args.resolution, seed=args.seed)
        held = ", ".join(f"{c} {s}" for c, s in HELD_OUT)
        print(f"wrote the captioned demo dataset and its text encoder to {args.dir} (held out of training: {held}): "
              f"train with data.source={args.dir} data.captions=true model.text_encoder={args.dir}", file=out)
        return 0
    from orchestrator.data.demo import write_demo_dataset

    write_demo_dataset(args.dir, images_per_class=args.images_per_class, resolution=args.resolution, seed=args.seed)
    print(f"wrote the demo dataset to {args.dir}: train with data.source={args.dir}", file=out)
    return 0


def cmd_serve_s3(args: argparse.Namespace) -> int:
    from orchestrator.storage.local_server import serve_s3

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
    add_s3_args(p)
    p.set_defaults(func=cmd_upload)

    p = sub.add_parser("encode", help="encode a dataset's images to VAE latents (data.format=latents) and/or its "
                       "captions to text embeddings, once")
    p.add_argument("src", metavar="SRC", help="any dataset raydiff reads (local or s3://)")
    p.add_argument("dest", metavar="DEST", help="s3://bucket/prefix or a local directory")
    p.add_argument("--vae", help="local diffusers AutoencoderKL directory (config.json + weights)")
    p.add_argument("--text-encoder", metavar="DIR", help="frozen text encoder (transformers model + tokenizer, as "
                   "model.text_encoder): the captions' embeddings are stored beside the latents or images")
    p.add_argument("--text-max-length", type=int, help="tokens per caption (default: the tokenizer's limit)")
    p.add_argument("--resolution", type=int, default=256, help="image side before encoding (centre crop)")
    p.add_argument("--batch-size", type=int, default=32, help="images per VAE forward pass")
    p.add_argument("--scaling-factor", type=float, help="default: the VAE config's scaling_factor")
    p.add_argument("--concurrency", type=int, help="VAE actors (default: one per GPU, or 1 on CPU)")
    p.add_argument("--dtype", choices=["float16", "float32"], default="float16", help="stored latent and text embedding dtype")
    p.add_argument("--shard-rows", type=int, default=4096, help="latents per Parquet shard")
    p.add_argument("--no-progress", action="store_true")
    _add_dataset_args(p)
    p.add_argument("--caption-column", help="with --text-encoder: the source's caption column / metadata field / "
                   "WebDataset extension or .json field (data.caption_column, default text)")
    p.add_argument("--missing-caption", choices=["bad", "unconditional"],
                   help="with --text-encoder: a sample without a caption is skipped (bad, default) or kept with the "
                   "empty prompt's embedding")
    add_s3_args(p)
    p.set_defaults(func=cmd_encode)

    p = sub.add_parser("ls", help="list files under a local path or s3:// prefix")
    p.add_argument("uri", metavar="URI")
    p.add_argument("--limit", type=int, default=100, help="files to print (0 = all)")
    add_s3_args(p)
    p.set_defaults(func=cmd_ls)

    p = sub.add_parser("verify", help="decode every sample; report unreadable ones per kind")
    p.add_argument("uri", metavar="URI")
    p.add_argument("--resolution", type=int, default=32)
    _add_dataset_args(p)
    _add_caption_args(p)
    add_s3_args(p)
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("stats", help="sample count, class histogram, image sizes, caption coverage")
    p.add_argument("uri", metavar="URI")
    _add_dataset_args(p)
    _add_caption_args(p)
    add_s3_args(p)
    p.set_defaults(func=cmd_stats)

    p = sub.add_parser("make-demo", help="write the built-in coloured-shapes dataset to DIR")
    p.add_argument("dir", metavar="DIR")
    p.add_argument("--images-per-class", type=int, default=300, help="images per class (with --captions: per "
                   "colour-shape combination written)")
    p.add_argument("--resolution", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--captions", action="store_true",
                   help="the text-to-image demo: shapes of independent colours with captions (metadata.jsonl), some "
                   "colour-shape combinations held out, and a small frozen text encoder in DIR/text_encoder + DIR/tokenizer")
    p.set_defaults(func=cmd_make_demo)

    p = sub.add_parser("serve-s3", help="run a local S3 (moto) on 127.0.0.1 for demos, until Ctrl-C")
    p.add_argument("--port", type=int, default=9000)
    p.add_argument("--dir", help="restore objects from / save them to this directory (best effort)")
    p.add_argument("--bucket", action="append", help="create this bucket at start (repeatable)")
    p.set_defaults(func=cmd_serve_s3)
    return data


def main(argv: list[str] | None = None) -> int:
    """``python -m orchestrator.cli.data data ...`` (the same commands as ``raydiff data``)."""
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
