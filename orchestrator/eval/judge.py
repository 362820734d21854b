"""Objective check of a class-conditional run: are generated samples recognisably their class?

A small CNN is trained on the *real* training images (held-out accuracy reported, so the judge
itself is shown to work), then classifies samples generated from the EMA weights conditioned
on each class. The score is the fraction recognised as the class they were conditioned on;
chance is 1/num_classes. Colour alone separates most built-in classes, so beside it the shape
judge (shape_judge.py, blind to colour) reports the fraction whose *shape* is recognised.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from model.conditioning import ClassLabels
from orchestrator.train.checkpoints import CheckpointRef, load_ema_model
from orchestrator.config import TrainConfig
from orchestrator.storage import RunDir
from orchestrator.sampling import generate, grid_png

log = logging.getLogger("raydiff")
# The judge needs a few thousand real images, not a pass over a large dataset.
MAX_CLASSIFIER_IMAGES = 20_000
NOISE_AUG_MAX = 0.4


class SmallClassifier(nn.Module):
    def __init__(self, in_channels: int, num_classes: int, width: int = 32):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(4),
        )
        self.head = nn.Linear(2 * width * 16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).flatten(1))


def train_classifier(images: torch.Tensor, labels: torch.Tensor, num_classes: int, *, epochs: int = 4,
                     seed: int = 0, train_view: Callable[[torch.Tensor], torch.Tensor] | None = None,
                     val_view: Callable[[torch.Tensor], torch.Tensor] | None = None,
                     noise_max: float = NOISE_AUG_MAX) -> tuple[SmallClassifier, float]:
    """Returns the classifier and its accuracy on a held-out 10% of the real images.

    ``train_view`` / ``val_view`` transform the images the classifier sees (the shape judge's
    colour-blind view, with a random colour mix per training image); default: the images."""
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(images), generator=g)
    n_val = max(1, len(images) // 10)
    val, tr = perm[:n_val], perm[n_val:]
    train_view = train_view or (lambda x: x)
    val_view = val_view or (lambda x: x)
    torch.manual_seed(seed)
    clf = SmallClassifier(val_view(images[:1]).shape[1], num_classes)
    opt = torch.optim.Adam(clf.parameters(), lr=2e-3)
    for _ in range(epochs):
        order = tr[torch.randperm(len(tr), generator=g)]
        for i in range(0, len(order), 128):
            idx = order[i : i + 128]
            x = train_view(images[idx])
            flip = torch.rand(len(idx), generator=g) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
            # Gaussian noise of random strength: the judge must recognise the class of a sample
            # that still carries some residual noise, not reject it for its texture.
            sigma = torch.rand(len(idx), generator=g)[:, None, None, None] * noise_max
            x = x + sigma * torch.randn(x.shape, generator=g)
            loss = F.cross_entropy(clf(x), labels[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return clf, accuracy(clf, val_view(images[val]), labels[val])


@torch.no_grad()
def accuracy(clf: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    clf.eval()
    pred = torch.cat([clf(images[i : i + 256]).argmax(1) for i in range(0, len(images), 256)])
    return float((pred == labels).float().mean())


@dataclass
class EvalResult:
    step: int
    num_classes: int
    chance: float
    classifier_val_accuracy: float
    sample_accuracy: float
    per_class_accuracy: list[float]
    samples_per_class: int
    guidance_scale: float
    sampler: str
    num_steps: int
    shape_accuracy: float
    shape_per_class_accuracy: list[float]
    shape_judge_val_accuracy: float
    shape_threshold: float


def evaluate_run(cfg: TrainConfig, ds, num_classes: int, class_names, rundir: RunDir, ref: CheckpointRef) -> dict:
    """Scores checkpoint ``ref``; ``ds`` is the (decoded) training dataset. Writes ``eval.json``
    and ``samples/eval.png``."""
    imgs, labs = [], []
    for batch in ds.limit(MAX_CLASSIFIER_IMAGES).iter_torch_batches(
        batch_size=512, dtypes={"image": torch.float32, "label": torch.int64}
    ):
        imgs.append(batch["image"])
        labs.append(batch["label"])
    images, labels = torch.cat(imgs), torch.cat(labs)
    # Imported here: shape_judge builds on this module's SmallClassifier.
    from orchestrator.eval.shape_judge import SHAPE_THRESHOLD, ShapeJudge

    clf, val_acc = train_classifier(images, labels, num_classes, seed=cfg.seed)
    shape = ShapeJudge.train(images, labels, num_classes, seed=cfg.seed)

    model, _ = load_ema_model(rundir, ref)
    k = cfg.run.eval_per_class
    gen_labels = torch.arange(num_classes).repeat_interleave(k)
    samples = generate(model, cfg, ClassLabels(gen_labels, num_classes), len(gen_labels), seed=cfg.sampling.seed + 1)
    clf.eval()
    with torch.no_grad():
        pred = torch.cat([clf(samples[i : i + 256]).argmax(1) for i in range(0, len(samples), 256)])
    hit = (pred == gen_labels).float()
    shape_acc, shape_per_class = shape.score(samples, gen_labels)
    res = EvalResult(
        step=ref.step,
        num_classes=num_classes,
        chance=1.0 / num_classes,
        classifier_val_accuracy=val_acc,
        sample_accuracy=float(hit.mean()),
        per_class_accuracy=[float(hit[gen_labels == c].mean()) for c in range(num_classes)],
        samples_per_class=k,
        guidance_scale=cfg.sampling.guidance_scale,
        sampler=cfg.sampling.sampler,
        num_steps=cfg.sampling.num_steps,
        shape_accuracy=shape_acc,
        shape_per_class_accuracy=shape_per_class,
        shape_judge_val_accuracy=shape.val_accuracy,
        shape_threshold=SHAPE_THRESHOLD,
    )
    out = asdict(res)
    if class_names:
        out["class_names"] = list(class_names)
    rundir.write_text("eval.json", json.dumps(out, indent=2))
    rundir.write_bytes("samples/eval.png", grid_png(samples, k))
    return out
