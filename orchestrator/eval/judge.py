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

import numpy as np
import torch

from model.conditioning import ClassLabels
from orchestrator.config import DataConfig, TrainConfig
from orchestrator.data.info import DatasetInfo
from orchestrator.eval.classifier import train_classifier
from orchestrator.eval.shape_judge import SHAPE_THRESHOLD, ShapeJudge
from orchestrator.storage import RunDir
from orchestrator.train.checkpoint.layout import CheckpointRef
from orchestrator.train.checkpoint.manager import Checkpointer
from orchestrator.sampling import generate, grid_png

log = logging.getLogger("raydiff")
# The judge needs a few thousand real images, not a pass over a large dataset.
MAX_CLASSIFIER_IMAGES = 20_000


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


def real_images(data: DataConfig, info: DatasetInfo) -> tuple[torch.Tensor, torch.Tensor]:
    """Up to ``MAX_CLASSIFIER_IMAGES`` decoded training images and their labels, for the judges:
    decoded in this process for a small local set (no Ray Data job, pipeline.decodes_here)."""
    from orchestrator.data.pipeline import build_train_dataset, decode_here, decodes_here

    if decodes_here(data, info):
        blocks = list(decode_here(data, info))
        images = np.concatenate([b["image"] for b in blocks])[:MAX_CLASSIFIER_IMAGES]
        labels = np.concatenate([b["label"] for b in blocks])[:MAX_CLASSIFIER_IMAGES]
        return torch.from_numpy(np.ascontiguousarray(images, np.float32)), torch.from_numpy(labels.astype(np.int64))
    imgs, labs = [], []
    for batch in build_train_dataset(data, info).drop_columns(["index"]).limit(MAX_CLASSIFIER_IMAGES).iter_torch_batches(
        batch_size=512, dtypes={"image": torch.float32, "label": torch.int64}
    ):
        imgs.append(batch["image"])
        labs.append(batch["label"])
    return torch.cat(imgs), torch.cat(labs)


def evaluate_run(cfg: TrainConfig, info: DatasetInfo, num_classes: int, class_names, rundir: RunDir,
                 ref: CheckpointRef) -> dict:
    """Scores checkpoint ``ref`` against the training set ``info`` (its real images train the
    judges). Writes ``eval.json`` and ``samples/eval.png``."""
    images, labels = real_images(cfg.data, info)
    clf, val_acc = train_classifier(images, labels, num_classes, seed=cfg.seed)
    shape = ShapeJudge.train(images, labels, num_classes, seed=cfg.seed)

    model, _ = Checkpointer(rundir).ema_model(ref)
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
