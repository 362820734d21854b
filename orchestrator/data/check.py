"""``raydiff data verify`` and ``raydiff data stats``: read every sample of any registered format
in order (``pipeline.iter_samples``) on the calling process, no Ray."""

from __future__ import annotations

import io
import sys
from collections import Counter
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from orchestrator import storage
from orchestrator.data import decode as D
from orchestrator.data.captions import CaptionSpec, coverage, coverage_line
from orchestrator.data.labels import label_problem
from orchestrator.data.pipeline import inspect_dataset, iter_samples

if TYPE_CHECKING:
    from orchestrator.config import DataConfig


def verify(cfg: "DataConfig", *, resolution: int = 32, out=None, max_listed: int = 20) -> tuple[int, dict[str, int], list[tuple[str, str]]]:
    """Decode every sample. Returns (readable count, counts per kind, first bad (name, kind)).
    With ``data.captions`` a sample without a caption is bad or kept as training would treat it
    (``data.missing_caption``), and caption coverage is printed."""
    out = out or sys.stdout
    info = inspect_dataset(cfg)
    good, counts, bad = 0, Counter(), []
    spec = CaptionSpec.for_config(cfg)
    captions: list = []
    for name, data, raw, caption in iter_samples(cfg, info):
        kind = data if isinstance(data, str) else None
        if kind is None and info.class_names is not None:
            kind = label_problem(raw, info)[1]
        if spec.use:
            captions.append(caption)
            if kind is None:
                _text, caption_kind, keep = spec.check(caption)
                if not keep:
                    kind = caption_kind
                elif caption_kind:
                    counts[caption_kind] += 1
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
    if spec.use:
        print(coverage_line(coverage(captions)), file=out)
    for name, kind in bad:
        print(f"  bad: {name} ({kind})", file=out)
    return good, dict(counts), bad


def stats(cfg: "DataConfig", *, out=None) -> dict[str, Any]:
    """Count, class histogram, image size distribution (headers only, no full decode) and, with
    ``data.captions``, caption coverage and length in words."""
    out = out or sys.stdout
    info = inspect_dataset(cfg)
    classes: Counter[str] = Counter()
    sizes: Counter[tuple[int, int]] = Counter()
    widths, heights, unreadable = [], [], 0
    captions: list = []
    for _name, data, raw, caption in iter_samples(cfg, info):
        captions.append(caption)
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
        "captions": coverage(captions) if cfg.captions else None,
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
    if result["captions"] is not None:
        print(coverage_line(result["captions"]), file=out)
    return result
