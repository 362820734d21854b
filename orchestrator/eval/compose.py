"""Objective check of the text demo: does the model compose words it never saw together?

The captioned built-in data (orchestrator/data/demo_text.py) leaves four colour-shape
combinations out of training entirely. For each of the 16 combinations the run's EMA model
draws ``run.eval_per_class`` samples from the plain prompt ("a blue circle"), and each sample is
judged twice, independently:

* colour, measured from pixels: the mean colour of the pixels clearly brighter than the dark
  background (any channel above ``FOREGROUND_MIN``; the demo's backgrounds stay below 60 plus
  noise, its shape colours have a channel of at least ~200), assigned to the nearest of the four
  colours; a sample with almost no such pixels has no colour;
* shape, by the colour-blind shape judge (shape_judge.py) trained on the real images with their
  shape as the label, so colour cannot help it.

The scores are the fractions right (colour, shape, both) over held-out prompts, beside the same
over seen prompts. Both judges are first checked on real images (their accuracy is reported): a
score means little if its judge fails on real data.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from orchestrator.config import TrainConfig
from orchestrator.data.demo_text import ALL_COMBOS, HELD_OUT, TEXT_COLOURS, TEXT_SHAPES, prompt
from orchestrator.eval.shape_judge import ShapeJudge

log = logging.getLogger("raydiff")

# A pixel belongs to the shape when one of its channels (0..255) exceeds this.
FOREGROUND_MIN = 110
# Fewer foreground pixels than this fraction of the image: no shape, so no colour.
MIN_FOREGROUND_FRACTION = 0.02
# The goals of issue 20 for held-out prompts.
HELD_OUT_COLOUR_GOAL, HELD_OUT_SHAPE_GOAL = 0.8, 0.6
_PALETTE = torch.tensor(list(TEXT_COLOURS.values()), dtype=torch.float32)


def captioned_demo_root(source: str) -> Path | None:
    """The captioned demo's directory when ``source`` is one (its ``demo.json`` says so)."""
    if "://" in source:
        return None
    marker = Path(source) / "demo.json"
    try:
        return Path(source) if json.loads(marker.read_text()).get("kind") == "captions" else None
    except (OSError, ValueError, AttributeError):
        return None


def load_demo_images(root: Path, limit: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The demo's real images ``[N, 3, H, W]`` in [-1, 1] with their colour and shape indices
    (orders of ``TEXT_COLOURS`` / ``TEXT_SHAPES``), from ``metadata.jsonl``."""
    rows = [json.loads(line) for line in (root / "metadata.jsonl").read_text().splitlines() if line.strip()]
    if limit is not None:
        # Every combination, not the first ones only: rows are written combination by combination.
        rows = rows[:: max(1, len(rows) // limit)][:limit]
    images = np.stack([np.asarray(Image.open(root / r["file_name"]).convert("RGB")) for r in rows])
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
    colours, shapes = list(TEXT_COLOURS), list(TEXT_SHAPES)
    return (x, torch.tensor([colours.index(r["colour"]) for r in rows]),
            torch.tensor([shapes.index(r["shape"]) for r in rows]))


def measure_colour(images: torch.Tensor) -> torch.Tensor:
    """Colour index per image ``[N, 3, H, W]`` in [-1, 1] (nearest of ``TEXT_COLOURS`` to the mean
    foreground colour), -1 where the image shows no foreground."""
    px = ((images.float().clamp(-1, 1) + 1) * 127.5).permute(0, 2, 3, 1).reshape(len(images), -1, 3)
    fg = px.max(dim=2).values > FOREGROUND_MIN
    n = fg.sum(dim=1)
    mean = (px * fg[..., None]).sum(dim=1) / n.clamp(min=1)[:, None]
    nearest = torch.cdist(mean, _PALETTE).argmin(dim=1)
    return torch.where(n >= MIN_FOREGROUND_FRACTION * px.shape[1], nearest, torch.full_like(nearest, -1))


def score_samples(samples: torch.Tensor, colour: torch.Tensor, shape: torch.Tensor, shape_judge: ShapeJudge
                  ) -> dict[str, torch.Tensor]:
    """Per-sample hits: ``colour``, ``shape`` and ``both`` (bool tensors)."""
    c = measure_colour(samples) == colour
    s = shape_judge.predict(samples) == shape
    return {"colour": c, "shape": s, "both": c & s}


def _fractions(hits: dict[str, torch.Tensor], mask: torch.Tensor) -> dict[str, float]:
    return {k: float(v[mask].float().mean()) if mask.any() else float("nan") for k, v in hits.items()}


def evaluate_text_run(cfg: TrainConfig, root: Path, rundir: Any, ref: Any) -> dict[str, Any]:
    """Scores checkpoint ``ref`` of a run on the captioned demo at ``root``; writes ``eval.json``
    and ``samples/eval.png`` (one row per combination, held-out ones first)."""
    from orchestrator.sampling import generate, grid_png
    from orchestrator.text import TextConditioner
    from orchestrator.train.checkpoint.manager import Checkpointer

    images, colours, shapes = load_demo_images(root, limit=6000)
    judge = ShapeJudge.train(images, shapes, len(TEXT_SHAPES), seed=cfg.seed)
    colour_judge_acc = float((measure_colour(images) == colours).float().mean())

    model, _ = Checkpointer(rundir).ema_model(ref)
    k = cfg.run.eval_per_class
    combos = list(HELD_OUT) + [cs for cs in ALL_COMBOS if cs not in HELD_OUT]
    text = TextConditioner(cfg.model)
    cond = text.prompts([prompt(c, s) for c, s in combos for _ in range(k)], cfg.sampling.negative_prompt)
    samples = generate(model, cfg, cond, cond.batch_size, seed=cfg.sampling.seed + 1)
    cidx = torch.tensor([list(TEXT_COLOURS).index(c) for c, _ in combos]).repeat_interleave(k)
    sidx = torch.tensor([list(TEXT_SHAPES).index(s) for _, s in combos]).repeat_interleave(k)
    held = torch.arange(len(combos)).repeat_interleave(k) < len(HELD_OUT)
    hits = score_samples(samples, cidx, sidx, judge)
    per_prompt = {prompt(c, s): {m: float(v[i * k : (i + 1) * k].float().mean()) for m, v in hits.items()}
                  for i, (c, s) in enumerate(combos)}
    out = {
        "step": ref.step,
        "kind": "text_composition",
        "held_out": _fractions(hits, held),
        "seen": _fractions(hits, ~held),
        "held_out_prompts": [prompt(c, s) for c, s in HELD_OUT],
        "per_prompt": per_prompt,
        "samples_per_prompt": k,
        "colour_judge_accuracy": colour_judge_acc,
        "shape_judge_val_accuracy": judge.val_accuracy,
        "goals": {"held_out_colour": HELD_OUT_COLOUR_GOAL, "held_out_shape": HELD_OUT_SHAPE_GOAL},
        "guidance_scale": cfg.sampling.guidance_scale,
        "sampler": cfg.sampling.sampler,
        "num_steps": cfg.sampling.num_steps,
    }
    rundir.write_text("eval.json", json.dumps(out, indent=2))
    rundir.write_bytes("samples/eval.png", grid_png(samples, k))
    return out


def composition_lines(e: dict[str, Any]) -> list[str]:
    """The summary lines of a text-composition eval (train/status.py)."""
    h, s = e["held_out"], e["seen"]
    ok = h["colour"] >= e["goals"]["held_out_colour"] and h["shape"] >= e["goals"]["held_out_shape"]
    return [
        f"text composition, held-out prompts ({', '.join(e['held_out_prompts'])}): colour {h['colour']:.1%}, "
        f"shape {h['shape']:.1%}, both {h['both']:.1%} (goal colour {e['goals']['held_out_colour']:.0%}, shape "
        f"{e['goals']['held_out_shape']:.0%}: {'met' if ok else 'NOT met'})",
        f"text composition, seen prompts: colour {s['colour']:.1%}, shape {s['shape']:.1%}, both {s['both']:.1%} "
        f"({e['samples_per_prompt']} samples per prompt; judges on real images: colour {e['colour_judge_accuracy']:.1%}, "
        f"shape {e['shape_judge_val_accuracy']:.1%})",
    ]
