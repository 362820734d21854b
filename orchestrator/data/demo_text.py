"""The built-in shapes with captions, for the text-to-image demo (issue 20).

Colour and shape vary independently here (in the class demo, demo.py, each class fixes both), so
a caption names a colour, a shape and sometimes a size or a side: "a red circle", "a small blue
triangle on the left". Some colour-shape combinations (``HELD_OUT``) are left out of the written
data entirely: a model that draws "a blue circle" without ever having seen one composes the
words it learnt from other images, which no class-label model can do. Every colour and every
shape still appears in training, each with three of the four others.

``write_captioned_demo(root)`` writes ``root/images/*.png`` with ``root/metadata.jsonl``
(``file_name``, ``text``, and the ground truth ``colour``/``shape``; Hugging Face's imagefolder
layout, read with ``data.captions=true``) and a small frozen text encoder: a randomly
initialised (seeded) transformers ``CLIPTextModel`` under ``root/text_encoder/`` and a
word-level tokenizer built from the captions' vocabulary under ``root/tokenizer/``, saved with
``save_pretrained`` like any local encoder, so that ``model.text_encoder=root`` loads it. A
random frozen encoder still maps each word to its own direction (a random embedding, mixed by
random attention); the denoiser's cross-attention learns what the directions mean.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from orchestrator.data.demo import _SUPERSAMPLE, _draw_shape, marker_matches

# Colours far apart in hue (the class demo's values), so that a measured mean colour is unambiguous.
TEXT_COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (230, 40, 40),
    "green": (40, 200, 60),
    "blue": (50, 90, 240),
    "yellow": (240, 220, 40),
}
# Shape name -> demo.py's shape kind (circle, square, triangle, cross).
TEXT_SHAPES: dict[str, int] = {"circle": 0, "square": 1, "triangle": 2, "cross": 3}
# Left out of the written data entirely: one per colour and one per shape (a Latin-square
# diagonal), so every word is still seen with three partners.
HELD_OUT: tuple[tuple[str, str], ...] = (("red", "triangle"), ("green", "cross"), ("blue", "circle"), ("yellow", "square"))
ALL_COMBOS: tuple[tuple[str, str], ...] = tuple((c, s) for c in TEXT_COLOURS for s in TEXT_SHAPES)
SEEN: tuple[tuple[str, str], ...] = tuple(cs for cs in ALL_COMBOS if cs not in HELD_OUT)
# Size and side words: only for clearly small/large shapes and clearly off-centre ones (radius as
# a fraction of the image side, horizontal offset of the centre).
SMALL_BELOW, LARGE_ABOVE, SIDE_BEYOND = 0.19, 0.27, 0.08
TEXT_MAX_LENGTH = 16
SPECIAL_TOKENS = ("<pad>", "<unk>", "<bos>", "<eos>")
ENCODER_HIDDEN = 64


def prompt(colour: str, shape: str) -> str:
    """The plain prompt of a combination ("a red circle"), as the demo's score asks for it."""
    return f"a {colour} {shape}"


def caption_words(colour: str, shape: str, radius: float, dx: float) -> str:
    size = "small " if radius < SMALL_BELOW else "large " if radius > LARGE_ABOVE else ""
    side = " on the left" if dx < -SIDE_BEYOND else " on the right" if dx > SIDE_BEYOND else ""
    return f"a {size}{colour} {shape}{side}"


def vocabulary() -> list[str]:
    """Every word a caption can hold, in a fixed order (the tokenizer's ids after the specials)."""
    words = ["a", "small", "large", "on", "the", "left", "right", *TEXT_COLOURS, *TEXT_SHAPES]
    return list(dict.fromkeys(words))


def render_captioned_image(colour: str, shape: str, rng: np.random.Generator, resolution: int = 32) -> tuple[Image.Image, str]:
    """One RGB image of ``shape`` in ``colour`` and its caption."""
    size = resolution * _SUPERSAMPLE
    bg = tuple(int(v) for v in rng.integers(10, 60, size=3))
    img = Image.new("RGB", (size, size), bg)
    draw = ImageDraw.Draw(img)
    rf = rng.uniform(0.16, 0.30)
    dx, dy = rng.uniform(-0.14, 0.14), rng.uniform(-0.1, 0.1)
    angle = rng.uniform(-math.pi, math.pi)
    base = np.array(TEXT_COLOURS[colour], dtype=np.float64)
    col = tuple(int(v) for v in np.clip(base * rng.uniform(0.85, 1.1) + rng.normal(0, 8, 3), 0, 255))
    _draw_shape(draw, TEXT_SHAPES[shape], size / 2 + dx * size, size / 2 + dy * size, rf * size, angle, col)
    img = img.resize((resolution, resolution), Image.Resampling.BOX)
    arr = np.asarray(img, dtype=np.float64) + rng.normal(0, 4, (resolution, resolution, 3))
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB"), caption_words(colour, shape, rf, dx)


def write_text_encoder(root: str | Path, *, seed: int = 0, hidden_size: int = ENCODER_HIDDEN,
                       max_length: int = TEXT_MAX_LENGTH) -> Path:
    """A tiny random (seeded) CLIP text model in ``root/text_encoder`` and a word-level tokenizer
    of the captions' vocabulary in ``root/tokenizer`` (``<bos> words <eos>``, padded with ``<pad>``)."""
    import torch
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import CLIPTextConfig, CLIPTextModel, PreTrainedTokenizerFast
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # "Writing model shards" for a 100 kB model

    root = Path(root)
    vocab = {w: i for i, w in enumerate([*SPECIAL_TOKENS, *vocabulary()])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A <eos>", special_tokens=[("<bos>", vocab["<bos>"]), ("<eos>", vocab["<eos>"])])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<bos>",
                                   eos_token="<eos>", model_max_length=max_length)
    # eos id 3, not 2: CLIP's pooling treats eos_token_id == 2 as the legacy "highest id" rule.
    cfg = CLIPTextConfig(vocab_size=len(vocab), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                         num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=max_length,
                         pad_token_id=vocab["<pad>"], bos_token_id=vocab["<bos>"], eos_token_id=vocab["<eos>"])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPTextModel(cfg).eval()
    model.save_pretrained(root / "text_encoder")
    fast.save_pretrained(root / "tokenizer")
    return root


def write_captioned_demo(root: str | Path, images_per_combo: int = 250, resolution: int = 32, seed: int = 0) -> Path:
    """Write the captioned demo (module docstring) and a ``demo.json`` marker; idempotent like
    ``write_demo_dataset``: an existing complete dataset with the same parameters is kept."""
    root = Path(root)
    marker = root / "demo.json"
    params = {"kind": "captions", "images_per_combo": images_per_combo, "resolution": resolution, "seed": seed,
              "colours": list(TEXT_COLOURS), "shapes": list(TEXT_SHAPES), "held_out": [list(cs) for cs in HELD_OUT],
              "encoder": {"hidden_size": ENCODER_HIDDEN, "max_length": TEXT_MAX_LENGTH, "vocabulary": vocabulary()}}
    if marker_matches(marker, params):
        return root
    (root / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for colour, shape in SEEN:
        k = ALL_COMBOS.index((colour, shape))
        rng = np.random.default_rng([seed, 1000 + k])  # per combination, as demo.py does per class
        for i in range(images_per_combo):
            img, text = render_captioned_image(colour, shape, rng, resolution)
            name = f"images/{colour}-{shape}-{i:05d}.png"
            img.save(root / name, optimize=False)
            rows.append(json.dumps({"file_name": name, "text": text, "colour": colour, "shape": shape}))
    (root / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    write_text_encoder(root, seed=seed)
    marker.write_text(json.dumps(params))  # last: an interrupted write is redone, not trusted
    return root
