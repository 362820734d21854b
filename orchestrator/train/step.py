"""One training step exactly as ``raydiff train`` runs it, usable inside and outside Ray.

The network predicts; the objective (model/objectives.py) noises, weights and computes the loss;
DeepSpeed owns precision, loss scaling, ZeRO partitioning and the optimizer; the EMA follows the
weights. ``raydiff bench step`` times this same object against a plain PyTorch loop.

Nothing here reads a GPU value on the host: random draws come from a seeded generator on the
device, range checks in model/ run on CPU tensors only (model/_checks.py), and the loss stays a
device tensor until the metrics window is flushed.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from model import _random
from model.conditioning import Conditioning, class_conditioning
from model.ema import EMA
from model.objectives import LossOutput
from orchestrator.builders import build_denoiser, build_objective
from orchestrator.config import TrainConfig
from orchestrator.plan import Plan
from orchestrator.train.engine import build_engine, clips_outside_engine

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class TrainStep:
    """Model, DeepSpeed engine, EMA and objective built from the config; ``step(batch, n)``
    trains on one micro-batch. torch.distributed must be initialised (Ray Train does it; the
    benchmark initialises a one-process group)."""

    def __init__(self, cfg: TrainConfig, plan: Plan, num_classes: int | None, *, device: torch.device, rank: int = 0):
        self.cfg, self.plan, self.num_classes = cfg, plan, num_classes
        self.device, self.rank = device, rank
        # The dtype of the network's weights and inputs: half precision in DeepSpeed's fp16/bf16
        # engines, fp32 under autocast (which casts per operation).
        self.dtype = torch.float32 if plan.autocast else DTYPES[plan.precision]
        if device.type == "cuda":
            # Fixed input shapes every step: let cuDNN pick the fastest convolution algorithms.
            torch.backends.cudnn.benchmark = True
        torch.manual_seed(cfg.seed)  # identical initial weights on every rank
        self.engine = build_engine(cfg.optim, cfg.precision, plan, build_denoiser(cfg.model, cfg.data, num_classes))
        if cfg.precision.compile:
            self.engine.compile()
        self.own_clip = clips_outside_engine(plan) and cfg.optim.grad_clip > 0
        self.params = [p for p in self.engine.module.parameters() if p.requires_grad]
        # Pre-clipping gradient norm of the last step, a device tensor (read once per log interval).
        self.grad_norm: torch.Tensor | None = None
        with self.gathered():
            self.ema = EMA(self.engine.module, decay=cfg.optim.ema_decay, warmup=cfg.optim.ema_warmup)
        self.objective = build_objective(cfg.diffusion)
        # Text models: the frozen encoder (orchestrator/text.py), outside the engine: not trained,
        # not checkpointed; in half precision when training is. Precomputed embeddings
        # (plan.text_embeddings) need it only for the empty prompt and the grid prompts.
        self.text = None
        if plan.text_embeddings is not None:
            from orchestrator.text import TextConditioner

            self.text = TextConditioner(cfg.model, device=device, dtype=DTYPES[plan.precision],
                                        prompts=[*cfg.sampling.prompts, cfg.sampling.negative_prompt],
                                        keep_encoder=plan.text_embeddings == "in-worker")

    def gathered(self):
        """Full parameters on every rank under ZeRO-3 (partitioned otherwise); no-op below 3."""
        if self.plan.zero_stage == 3:
            import deepspeed  # where it is used: the driver imports this module and never needs DeepSpeed

            return deepspeed.zero.GatheredParameters(list(self.engine.module.parameters()), modifier_rank=None)
        return contextlib.nullcontext()

    def generator(self, step: int) -> torch.Generator:
        """Seeded by (seed, rank, step): the random draws of a step are the same after a resume,
        without saving generator state."""
        g = torch.Generator(device=self.device)
        g.manual_seed(((self.cfg.seed * 1_000_003 + self.rank) * 1_000_003 + step) % (2**63))
        return g

    def _forward(self, x: torch.Tensor, t: torch.Tensor, cond: Conditioning | None) -> torch.Tensor:
        # DeepSpeed's bf16/fp16 engines keep module weights in half precision; inputs must match.
        return self.engine(x.to(self.dtype), t, cond)

    def _flip(self, images: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        if not self.cfg.data.random_flip:
            return images
        mask = _random.rand((images.shape[0],), generator=g, device=images.device) < 0.5
        return torch.where(mask[:, None, None, None], images.flip(-1), images)

    def conditioning(self, batch: dict[str, Any]) -> Conditioning | None:
        """The batch's class labels, or for a text model its captions ("text") encoded now or
        its precomputed "text_embedding"/"text_mask"."""
        if self.text is not None:
            return self.text.batch(batch)
        return class_conditioning(batch.get("label"), self.num_classes)

    def step(self, batch: dict[str, Any], step: int) -> LossOutput:
        """Train on one micro-batch ({"image": [B,C,H,W] in [-1,1], "label": [B]}, plus "text" or
        "text_embedding"/"text_mask" for a text model) as step ``step``."""
        g = self.generator(step)
        x0 = self._flip(batch["image"], g)
        cond = self.conditioning(batch)
        out = self.objective.training_losses(self._forward, x0, cond, generator=g)
        self.engine.backward(out.loss)
        if self.own_clip:
            scaler = getattr(self.engine, "torch_autocast_z0_gradscaler", None)
            if scaler is not None:
                # Clip the true gradients; the scaler then skips the step on inf/NaN as usual.
                scaler.unscale_(self.engine.optimizer)
            self.grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.cfg.optim.grad_clip, foreach=True)
        self.engine.step()
        with self.gathered():
            self.ema.update(self.engine.module)
        return out
