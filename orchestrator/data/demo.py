"""The built-in dataset: procedurally drawn coloured shapes, one class per (shape, colour) pair.

Every class has its own colour *and* its own shape, so a generated sample can be checked
objectively: a classifier trained on these real images (orchestrator/eval/judge.py) must recognise
the class that the sample was conditioned on. Position, size, rotation, colour shade and the
background vary per image so that the model has a distribution to learn, not ten templates.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

# (name, RGB) per class; hues far apart so that colour alone already separates most classes.
DEMO_CLASSES: tuple[tuple[str, tuple[int, int, int]], ...] = (
    ("red-circle", (230, 40, 40)),
    ("green-square", (40, 200, 60)),
    ("blue-triangle", (50, 90, 240)),
    ("yellow-cross", (240, 220, 40)),
    ("magenta-ring", (220, 50, 220)),
    ("cyan-diamond", (40, 220, 230)),
    ("orange-stripes", (250, 140, 20)),
    ("white-x", (240, 240, 240)),
    ("purple-bar", (140, 60, 200)),
    ("pink-dot-pair", (250, 150, 180)),
)
# Folder names carry the index so that sorted folder order (how image-folder readers assign
# labels) equals the class index.
DEMO_CLASS_NAMES: tuple[str, ...] = tuple(f"{i:02d}-{name}" for i, (name, _) in enumerate(DEMO_CLASSES))
_SUPERSAMPLE = 4  # draw at 4x and downsample: anti-aliased edges without a rasteriser dependency


def marker_matches(marker: Path, params: dict) -> bool:
    """Whether a cached dataset's marker file records exactly ``params`` (the set is reusable);
    a missing or unreadable marker means it must be written again."""
    if not marker.is_file():
        return False
    try:
        return json.loads(marker.read_text()) == params
    except json.JSONDecodeError:
        return False


def _rotated(points: list[tuple[float, float]], cx: float, cy: float, angle: float) -> list[tuple[float, float]]:
    c, s = math.cos(angle), math.sin(angle)
    return [(cx + (x - cx) * c - (y - cy) * s, cy + (x - cx) * s + (y - cy) * c) for x, y in points]


def _draw_shape(draw: ImageDraw.ImageDraw, kind: int, cx: float, cy: float, r: float, angle: float, color) -> None:
    w = max(2.0, r * 0.38)  # stroke width for line-like shapes
    if kind == 0:  # filled circle
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=color)
    elif kind == 1:  # square
        pts = [(cx - r, cy - r), (cx + r, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
        draw.polygon(_rotated(pts, cx, cy, angle * 0.25), fill=color)
    elif kind == 2:  # triangle pointing up (small rotation only, so "up" stays the class cue)
        pts = [(cx, cy - r * 1.1), (cx + r, cy + r * 0.8), (cx - r, cy + r * 0.8)]
        draw.polygon(_rotated(pts, cx, cy, angle * 0.2), fill=color)
    elif kind == 3:  # plus / cross
        draw.rectangle([cx - r, cy - w / 2, cx + r, cy + w / 2], fill=color)
        draw.rectangle([cx - w / 2, cy - r, cx + w / 2, cy + r], fill=color)
    elif kind == 4:  # ring
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], outline=color, width=int(w))
    elif kind == 5:  # diamond
        pts = [(cx, cy - r * 1.15), (cx + r * 0.8, cy), (cx, cy + r * 1.15), (cx - r * 0.8, cy)]
        draw.polygon(pts, fill=color)
    elif kind == 6:  # three horizontal stripes
        for k in (-1, 0, 1):
            y = cy + k * r * 0.7
            draw.rectangle([cx - r, y - w / 2.5, cx + r, y + w / 2.5], fill=color)
    elif kind == 7:  # X
        d = r * 0.9
        draw.line([(cx - d, cy - d), (cx + d, cy + d)], fill=color, width=int(w))
        draw.line([(cx - d, cy + d), (cx + d, cy - d)], fill=color, width=int(w))
    elif kind == 8:  # one thick vertical bar
        draw.rectangle([cx - w * 0.8, cy - r * 1.1, cx + w * 0.8, cy + r * 1.1], fill=color)
    elif kind == 9:  # two dots side by side
        q = r * 0.45
        for dx in (-r * 0.55, r * 0.55):
            draw.ellipse([cx + dx - q, cy - q, cx + dx + q, cy + q], fill=color)
    else:  # pragma: no cover - class indices come from DEMO_CLASSES
        raise ValueError(f"unknown demo shape {kind}")


def render_demo_image(label: int, rng: np.random.Generator, resolution: int = 32) -> Image.Image:
    """One RGB image of class ``label`` drawn with randomness from ``rng``."""
    if not 0 <= label < len(DEMO_CLASSES):
        raise ValueError(f"label {label} out of range 0..{len(DEMO_CLASSES) - 1}")
    size = resolution * _SUPERSAMPLE
    bg = tuple(int(v) for v in rng.integers(10, 60, size=3))
    img = Image.new("RGB", (size, size), bg)
    draw = ImageDraw.Draw(img)
    r = size * rng.uniform(0.22, 0.32)
    cx = size / 2 + rng.uniform(-0.12, 0.12) * size
    cy = size / 2 + rng.uniform(-0.12, 0.12) * size
    angle = rng.uniform(-math.pi, math.pi)
    base = np.array(DEMO_CLASSES[label][1], dtype=np.float64)
    color = tuple(int(v) for v in np.clip(base * rng.uniform(0.85, 1.1) + rng.normal(0, 8, 3), 0, 255))
    _draw_shape(draw, label, cx, cy, r, angle, color)
    img = img.resize((resolution, resolution), Image.Resampling.BOX)
    # Mild sensor-like noise so that the data are not piecewise constant.
    arr = np.asarray(img, dtype=np.float64) + rng.normal(0, 4, (resolution, resolution, 3))
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")


def write_demo_dataset(root: str | Path, images_per_class: int = 300, resolution: int = 32, seed: int = 0) -> Path:
    """Write ``root/<class_name>/<i>.png`` for the 10 demo classes and a ``demo.json`` marker.

    Idempotent: an existing complete dataset with the same parameters is left as it is.
    """
    root = Path(root)
    marker = root / "demo.json"
    params = {"images_per_class": images_per_class, "resolution": resolution, "seed": seed,
              "classes": list(DEMO_CLASS_NAMES)}
    if marker_matches(marker, params):
        return root
    for label, name in enumerate(DEMO_CLASS_NAMES):
        d = root / name
        d.mkdir(parents=True, exist_ok=True)
        # One generator per class: the images of a class do not depend on images_per_class of others.
        rng = np.random.default_rng([seed, label])
        for i in range(images_per_class):
            render_demo_image(label, rng, resolution).save(d / f"{i:05d}.png", optimize=False)
    # Marker last, so an interrupted write is redone instead of trusted.
    marker.write_text(json.dumps(params))
    return root
