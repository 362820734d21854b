"""In-process training and scoring for ``raydiff bench quality`` (no Ray, no DeepSpeed).

The loop is the one ``raydiff train`` runs, minus distribution: the registry network, the
:class:`DiffusionObjective`, AdamW with linear warm-up then cosine decay to ``min_lr_ratio``
(orchestrator/train/engine.py), gradient clipping 1.0, random horizontal flips, EMA with warm-up.
Every arm with the same seed sees the same batches, timesteps and noise (one generator drives
data order and the objective's draws), so arms differ only by what is being compared.

Scores of EMA samples: KID and FID with features of a CNN trained on the real images
(orchestrator/eval/features.py), the class judge (same CNN) and the shape judge
(orchestrator/eval/shape_judge.py), plus the validation loss of orchestrator/train/validation.py
on held-out images drawn with another seed.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from model.conditioning import ClassLabels
from model.ema import EMA
from model.guidance import CFGDenoiser
from model.objectives import DiffusionObjective
from model.registry import build_model
from model.samplers import initial_noise, sample, timesteps_for
from model.schedules import make_schedule
from orchestrator.bench.quality_arms import Arm, SamplerSpec, Setting
from orchestrator.builders import lr_lambda
from orchestrator.data.demo import DEMO_CLASSES, render_demo_image
from orchestrator.eval.features import CNNFeatures
from orchestrator.eval.fid import fid_from_features, kernel_inception_distance
from orchestrator.eval.shape_judge import ShapeJudge
from orchestrator.sampling import sampler_options
from orchestrator.train.validation import Validator

NUM_CLASSES = len(DEMO_CLASSES)


def demo_images(images_per_class: int, resolution: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The built-in data set in memory (seed 0 = the images ``raydiff train`` writes)."""
    imgs, labels = [], []
    for label in range(NUM_CLASSES):
        rng = np.random.default_rng([seed, label])
        for _ in range(images_per_class):
            imgs.append(np.asarray(render_demo_image(label, rng, resolution)))
            labels.append(label)
    x = torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    return x.contiguous(), torch.tensor(labels, dtype=torch.long)


@dataclass
class Scorer:
    """Judges trained once on the real training images, shared by every arm."""

    features: CNNFeatures
    shape: ShapeJudge
    ref_features: np.ndarray
    val_images: np.ndarray
    val_labels: np.ndarray

    @classmethod
    def build(cls, images: torch.Tensor, labels: torch.Tensor, val: tuple[torch.Tensor, torch.Tensor]) -> "Scorer":
        feats = CNNFeatures.train(images, labels, NUM_CLASSES, seed=0)
        shape = ShapeJudge.train(images, labels, NUM_CLASSES, seed=0)
        return cls(feats, shape, feats(images), val[0].numpy(), val[1].numpy())

    def score_samples(self, samples: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
        f = self.features(samples)
        kid = kernel_inception_distance(f, self.ref_features, subsets=20, subset_size=min(500, len(f)), seed=0)
        with torch.no_grad():
            pred = self.features.clf(samples).argmax(1)
        shape_acc, _ = self.shape.score(samples, labels)
        return {"kid": kid.mean, "fid": fid_from_features(f, self.ref_features),
                "class_acc": float((pred == labels).float().mean()), "shape_acc": shape_acc}

    def val_loss(self, model: torch.nn.Module, objective: DiffusionObjective) -> float:
        v = Validator(self.val_images, ClassLabels(torch.from_numpy(self.val_labels), NUM_CLASSES), objective,
                      timesteps=8, seed=0, batch_size=128)
        with torch.no_grad():
            return float(v.run(model)["val_loss"])


def draw_samples(model: torch.nn.Module, arm: Arm, spec: SamplerSpec, per_class: int, *, seed: int,
                 bf16: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``per_class`` samples of every class; ``bf16``: the network runs under bf16 autocast (the
    sampler's arithmetic stays fp32)."""
    labels = torch.arange(NUM_CLASSES).repeat_interleave(per_class)
    schedule = make_schedule(arm.schedule, 1000)
    g = torch.Generator().manual_seed(seed)
    x = initial_noise((len(labels), 3, model.image_size, model.image_size), generator=g)
    guided = CFGDenoiser(model, ClassLabels(labels, NUM_CLASSES), spec.guidance_scale)
    model.eval()
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = sample(guided, x, schedule, timesteps_for(spec.spacing, spec.num_steps, 1000),
                         prediction=arm.prediction, options=sampler_options(spec), generator=g)
        out = out.float()
    finally:
        model.train()
    return out.clamp(-1, 1), labels


@dataclass
class Trained:
    arm: Arm
    seed: int
    model: torch.nn.Module  # EMA weights loaded
    curve: list[dict] = field(default_factory=list)
    seconds: float = 0.0


def train_arm(arm: Arm, s: Setting, data: tuple[torch.Tensor, torch.Tensor], scorer: Scorer | None, seed: int,
              log: Callable[[str], None] = lambda _: None) -> Trained:
    """Train one arm for ``s.steps``; every ``s.eval_every`` steps (and at the end) score EMA
    samples drawn with ``s.curve_sampler`` (skipped when ``scorer`` is None)."""
    images, labels = data
    bf16 = s.use_bf16()
    torch.manual_seed(seed)
    model = build_model(s.model, in_channels=images.shape[1], image_size=s.resolution, num_classes=NUM_CLASSES)
    objective = DiffusionObjective(make_schedule(arm.schedule, 1000), arm.prediction, arm.weighting,
                                   cond_dropout=arm.label_dropout)
    opt = torch.optim.AdamW(model.parameters(), lr=s.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(s.optim()))  # raydiff train's schedule
    ema = EMA(model, decay=s.ema_decay, warmup=True)
    g = torch.Generator().manual_seed(seed)
    out = Trained(arm, seed, model)
    start = time.perf_counter()
    model.train()
    for step in range(1, s.steps + 1):
        idx = torch.randint(len(images), (s.batch,), generator=g)
        x0 = images[idx]
        flip = torch.rand(s.batch, generator=g) < 0.5
        x0 = torch.where(flip[:, None, None, None], x0.flip(-1), x0)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = objective.training_losses(model, x0, ClassLabels(labels[idx], NUM_CLASSES), generator=g).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        ema.update(model)
        if scorer is not None and (step % s.eval_every == 0 or step == s.steps):
            train_s = time.perf_counter() - start
            with ema.swap_into(model):
                row = {"step": step, "val_loss": scorer.val_loss(model, objective)}
                samples, lab = draw_samples(model, arm, s.curve_sampler, s.eval_per_class, seed=1000 + seed, bf16=bf16)
                row.update(scorer.score_samples(samples, lab))
            out.curve.append(row)
            log(f"  {arm.name} seed {seed} step {step}: " + ", ".join(f"{k} {v:.4g}" for k, v in row.items() if k != "step"))
            start = time.perf_counter() - train_s  # training time excludes scoring
    out.seconds = time.perf_counter() - start
    ema.copy_to(model)
    model.eval()
    return out
