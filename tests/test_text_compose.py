"""The text demo's score (orchestrator/eval/compose.py): colour measured from pixels is right on
the real captioned images and refuses images without a shape; the summary lines say whether the
held-out goals are met."""

from __future__ import annotations

import torch

from orchestrator.data.demo_text import HELD_OUT, TEXT_COLOURS, write_captioned_demo
from orchestrator.eval.compose import captioned_demo_root, composition_lines, load_demo_images, measure_colour


def test_colour_measured_from_pixels(tmp_path):
    root = write_captioned_demo(tmp_path / "demo", images_per_combo=4, resolution=32)
    assert captioned_demo_root(str(root)) == root and captioned_demo_root(str(tmp_path)) is None
    images, colours, shapes = load_demo_images(root)
    assert len(images) == 4 * 12 and set(colours.tolist()) == set(range(len(TEXT_COLOURS)))
    assert (measure_colour(images) == colours).all()
    # The same shapes with their colour channels permuted (red <-> blue) measure as the swapped colour.
    red, blue = list(TEXT_COLOURS).index("red"), list(TEXT_COLOURS).index("blue")
    swapped = images[colours == red][:, [2, 1, 0]]
    assert (measure_colour(swapped) == blue).all()
    # A dark background alone (or mid-grey noise below the foreground level) has no colour.
    flat = torch.full((2, 3, 32, 32), -0.8)
    assert measure_colour(flat).tolist() == [-1, -1]


def test_composition_lines():
    e = {"held_out": {"colour": 0.85, "shape": 0.7, "both": 0.6}, "seen": {"colour": 0.9, "shape": 0.8, "both": 0.75},
         "held_out_prompts": [f"a {c} {s}" for c, s in HELD_OUT], "samples_per_prompt": 10,
         "colour_judge_accuracy": 1.0, "shape_judge_val_accuracy": 0.95,
         "goals": {"held_out_colour": 0.8, "held_out_shape": 0.6}}
    held, seen = composition_lines(e)
    assert "colour 85.0%, shape 70.0%, both 60.0%" in held and ": met)" in held
    assert "seen prompts: colour 90.0%" in seen
    e["held_out"]["shape"] = 0.5
    assert "NOT met" in composition_lines(e)[0]
