"""Helpers shared by the data tests: tiny image datasets (a few dozen images at most: 2 shared
cores), crafted bad files, S3 upload. Imported by the other ``test_data_*`` modules; its own
tests check that the crafted files are what they claim to be."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image


def rand_image(seed: int, size: int = 16, mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    if mode == "RGB":
        return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8), "RGB")
    if mode == "L":
        return Image.fromarray(rng.integers(0, 256, (size, size), dtype=np.uint8), "L")
    raise ValueError(mode)


def png_bytes(img: Image.Image) -> bytes:
    b = io.BytesIO()
    img.save(b, format="PNG")
    return b.getvalue()


def jpeg_bytes(img: Image.Image, quality: int = 90) -> bytes:
    b = io.BytesIO()
    img.save(b, format="JPEG", quality=quality)
    return b.getvalue()


def expected_tensor(img: Image.Image) -> np.ndarray:
    """What the pipeline must produce for an RGB image already at the target resolution."""
    a = np.asarray(img.convert("RGB"), dtype=np.float32).transpose(2, 0, 1)
    return a * (2.0 / 255.0) - 1.0


def write_imagefolder(root: Path, classes: dict[str, int], size: int = 16, seed0: int = 0) -> dict[str, tuple[str, Image.Image]]:
    """root/<class>/<i>.png; returns {relative path: (class, image)}."""
    out = {}
    s = seed0
    for cls, n in classes.items():
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            img = rand_image(s, size)
            s += 1
            rel = f"{cls}/{i}.png"
            (root / rel).write_bytes(png_bytes(img))
            out[rel] = (cls, img)
    return out


def huge_png_header(width: int = 40_000, height: int = 40_000) -> bytes:
    """A PNG that declares width x height pixels but holds almost no data: the decompression
    bomb check must reject it from the header, without allocating the image."""
    raw = png_bytes(Image.new("L", (8, 8)))
    # Replace IHDR (right after the 8-byte signature) with one declaring the huge size.
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    chunk = struct.pack(">I", len(ihdr)) + b"IHDR" + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr) & 0xFFFFFFFF)
    return raw[:8] + chunk + raw[8 + 25 :]


def upload_dir(client, bucket: str, prefix: str, root: Path) -> None:
    for p in sorted(root.rglob("*")):
        if p.is_file():
            client.put_object(Bucket=bucket, Key=f"{prefix}/{p.relative_to(root).as_posix()}", Body=p.read_bytes())


def collect(ds) -> tuple[np.ndarray, np.ndarray]:
    rows = ds.take_all()
    if not rows:
        return np.zeros((0,)), np.zeros((0,), np.int64)
    return np.stack([r["image"] for r in rows]), np.array([r["label"] for r in rows])


def test_huge_png_header_declares_size_without_data():
    import warnings

    Image.MAX_IMAGE_PIXELS, saved = None, Image.MAX_IMAGE_PIXELS
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            img = Image.open(io.BytesIO(huge_png_header(40_000, 30_000)))
        assert img.size == (40_000, 30_000)
    finally:
        Image.MAX_IMAGE_PIXELS = saved
