"""Image decoding with per-sample error handling, shared by the training pipeline and the CLI.

A bad sample never raises: ``decode_image`` returns the reason (a *kind*) instead, and the
caller drops the sample and counts the kind. Unusual pixel modes are converted (and counted as
``converted_from_<MODE>``), not dropped. Images with an EXIF orientation (phone photos) are
turned upright before cropping, as every image viewer shows them.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

# Images whose shorter side is below this carry no usable content for training at >= 8 px.
MIN_IMAGE_SIDE = 4

# Kinds of dropped samples (``bad_sample_counts`` keys). Keys starting with CONVERTED_PREFIX are
# kept samples whose pixel mode was converted.
EMPTY = "empty_file"
NOT_IMAGE = "not_an_image"
TRUNCATED = "truncated"
CORRUPT = "corrupt"
TOO_SMALL = "too_small"
BOMB = "decompression_bomb"
READ_ERROR = "read_error"
MISSING_FILE = "missing_file"
MISSING_LABEL = "missing_label"
LABEL_OUT_OF_RANGE = "label_out_of_range"
UNKNOWN_LABEL = "unknown_label"
INVALID_LABEL = "invalid_label"
CONVERTED_PREFIX = "converted_from_"
# Not a dropped sample either: a read that failed transiently and was retried.
RETRIED_READ = "retried_read"
# Captions (orchestrator/data/captions.py): a sample without one, dropped (data.missing_caption=bad)
# or kept and trained with the empty prompt (=unconditional, not a dropped sample).
MISSING_CAPTION = "missing_caption"
UNCAPTIONED_KEPT = "uncaptioned_kept"
_KEPT_KINDS = frozenset({RETRIED_READ, UNCAPTIONED_KEPT})


def dropped(counts: dict[str, int]) -> int:
    """Number of dropped samples in a ``bad_sample_counts`` dict."""
    return sum(v for k, v in counts.items() if not k.startswith(CONVERTED_PREFIX) and k not in _KEPT_KINDS)

# Never decode partially: a truncated file is a bad sample, not a grey-padded one.
ImageFile.LOAD_TRUNCATED_IMAGES = False

_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


def _max_pixels() -> int:
    # PIL's own limit (89.5 MP by default); None there means "no limit", which we do not allow.
    return Image.MAX_IMAGE_PIXELS or 89_478_485


def _to_8bit_gray(img: Image.Image) -> Image.Image:
    """16/32-bit integer and float grey images -> 8-bit L, scaling instead of clipping
    (PIL's convert("L") clips 16-bit values at 255, which turns most images white)."""
    arr = np.asarray(img)
    if img.mode.startswith("I;16") or (img.mode == "I" and arr.max(initial=0) > 255):
        arr = (np.clip(arr.astype(np.int64), 0, 65535) >> 8).astype(np.uint8)
    else:
        arr = np.clip(arr, 0, 255).astype(np.uint8)
    return Image.fromarray(arr, "L")


_EXIF_ORIENTATION = 0x0112


def _upright(img: Image.Image) -> Image.Image:
    """Apply the EXIF orientation tag. Only images that carry EXIF are parsed (a dict lookup
    for the rest), and a broken EXIF block leaves the pixels as stored rather than dropping
    an otherwise good image."""
    if "exif" not in img.info:
        return img
    try:
        if img.getexif().get(_EXIF_ORIENTATION, 1) == 1:
            return img
        return ImageOps.exif_transpose(img)
    except Exception:  # noqa: BLE001 - metadata problem, not a pixel problem
        return img


def _convert(img: Image.Image, target: str) -> Image.Image:
    mode = img.mode
    if mode == target:
        return img
    if mode in _ALPHA_MODES or (mode == "P" and "transparency" in img.info):
        # Transparent pixels become white rather than whatever colour the file stored under them.
        rgba = img.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        bg.alpha_composite(rgba)
        return bg.convert(target)
    if mode.startswith("I") or mode == "F":
        gray = _to_8bit_gray(img)
        return gray if target == "L" else gray.convert(target)
    if mode == "1":
        return img.convert("L").convert(target)
    return img.convert(target)


def decode_image(data: bytes | None, resolution: int, channels: int, center_crop: bool) -> tuple[np.ndarray | None, str | None]:
    """Decode, convert and resize one image.

    Returns ``(array uint8 [H, W, C], converted_kind_or_None)`` on success and
    ``(None, bad_kind)`` for a sample to drop.
    """
    if not data:
        return None, EMPTY
    target = "RGB" if channels == 3 else "L"
    try:
        with warnings.catch_warnings():
            # Above MAX_IMAGE_PIXELS PIL only warns (errors at 2x): treat both as a bomb, before
            # any pixel is decoded.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        return None, BOMB
    except UnidentifiedImageError:
        return None, NOT_IMAGE
    except Exception as e:  # noqa: BLE001 - any decoder failure is a bad sample
        return None, TRUNCATED if "truncat" in str(e).lower() else CORRUPT
    try:
        w, h = img.size
        if w * h > _max_pixels():
            return None, BOMB
        if min(w, h) < MIN_IMAGE_SIDE:
            return None, TOO_SMALL
        src_mode = img.mode
        if img.format == "JPEG" and src_mode in ("RGB", "L", "YCbCr"):
            # Let libjpeg decode at 1/2, 1/4 or 1/8 scale when the target is that much smaller:
            # the largest speed-up available for big JPEGs.
            img.draft(target, (resolution, resolution))
        img.load()
        img = _convert(_upright(img), target)
        w, h = img.size
        if center_crop:
            s = min(w, h)
            left, top = (w - s) / 2, (h - s) / 2
            box = (left, top, left + s, top + s)
        else:
            box = (0, 0, w, h)
        if (w, h) != (resolution, resolution) or box != (0, 0, w, h):
            img = img.resize((resolution, resolution), Image.Resampling.BICUBIC, box=box, reducing_gap=3.0)
        arr = np.asarray(img, dtype=np.uint8)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        return None, BOMB
    except MemoryError:
        return None, BOMB
    except Exception as e:  # noqa: BLE001
        msg = str(e).lower()
        # PIL says "image file is truncated" for files that end early; anything else (CRC or
        # stream errors, bad markers) is corruption inside the file.
        return None, TRUNCATED if "truncat" in msg else CORRUPT
    if arr.ndim == 2:
        arr = arr[:, :, None]
    converted = None if src_mode == target else CONVERTED_PREFIX + src_mode.replace(";", "_")
    return arr, converted


def to_model_range(batch_hwc: np.ndarray) -> np.ndarray:
    """uint8 [B, H, W, C] -> float32 [B, C, H, W] in [-1, 1] (one vectorised pass)."""
    out = batch_hwc.transpose(0, 3, 1, 2).astype(np.float32)
    out *= 2.0 / 255.0
    out -= 1.0
    return out
