"""Starting a run from another run's checkpoint, with this run's hyperparameters.

Population-based training exploits a better trial by continuing from its checkpoint with
perturbed hyperparameters. ``read_checkpoint`` (files.py) restores everything, including state that
encodes the *other* run's hyperparameters: DeepSpeed loads the optimizer's param groups (lr,
betas, eps, weight decay) and the LR scheduler's base learning rates, and ``ema.pt`` holds the
EMA decay. Left alone, a perturbed learning rate or EMA decay would silently not apply; this
module re-applies the run's own config on top of the loaded state. Weights, optimizer moments,
EMA weights, the step and the data position are kept.
"""

from __future__ import annotations

from typing import Any

from model.ema import EMA
from orchestrator.config import TrainConfig
from orchestrator.builders import lr_lambda


def apply_hyperparameters(engine: Any, ema: EMA, cfg: TrainConfig) -> None:
    """Set the optimizer, LR schedule and EMA settings of ``cfg`` on loaded state."""
    o = cfg.optim
    ema.decay, ema.warmup = float(o.ema_decay), bool(o.ema_warmup)
    sched = engine.lr_scheduler
    factor = lr_lambda(cfg.optim)(sched.last_epoch)  # LambdaLR: lr = base_lr * lambda(steps taken)
    groups = [sched.optimizer.param_groups]
    wrapped = getattr(engine.optimizer, "param_groups", None)
    if wrapped is not None and wrapped is not groups[0]:
        groups.append(wrapped)  # a DeepSpeed wrapper with its own group dicts
    sched.base_lrs = [o.lr] * len(groups[0])
    for param_groups in groups:
        for i, g in enumerate(param_groups):
            g["initial_lr"] = o.lr
            g["lr"] = o.lr * factor
            g["betas"] = (o.beta1, o.beta2)
            g["eps"] = o.eps
            # build_engine puts decayed parameters in group 0 and norms/biases (no decay) in group 1.
            g["weight_decay"] = o.weight_decay if i == 0 else 0.0
