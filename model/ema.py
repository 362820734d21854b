"""Exponential moving average of model weights (Polyak averaging).

EMA weights are what DDPM (Ho et al. 2020, App. B: decay 0.9999) and DiT (Peebles & Xie
2023, Sec. 5: decay 0.9999) evaluate; sample quality from raw weights is markedly worse.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

import torch
from torch import Tensor, nn


class EMA:
    """fp32 shadow copy of ``module``'s trainable parameters, plus a copy of its float buffers.

    Frozen parameters (``requires_grad`` False: a LoRA run's pretrained weights) never change,
    so they are not shadowed: a LoRA run's EMA holds the adapters only, and loading it into a
    model built the same way (model/pretrained.py) leaves the frozen weights as loaded.

    Decay for the update with 0-based index ``n`` (n = number of updates done before):
      * ``warmup=True``: d_n = clamp(1 - (1 + n / inv_gamma)^(-warmup_power), min_decay, decay).
        This is the warmup of diffusers' ``EMAModel(use_ema_warmup=True)`` (from
        @crowsonkb's notes; power 2/3 suits ~1M-step runs, 3/4 shorter ones). d_0 = 0, so
        the first update copies the weights: early EMA is not anchored to the random init.
      * ``warmup=False``: d_n = decay for every update.
    Update: shadow <- d_n shadow + (1 - d_n) param, computed in fp32 so that bf16/fp16
    training (where 1 - d ~ 1e-4 is below half-precision resolution) still averages.
    Float buffers (e.g. running statistics) are copied, not averaged.
    """

    def __init__(
        self,
        module: nn.Module,
        decay: float = 0.9999,
        warmup: bool = True,
        warmup_power: float = 2 / 3,
        inv_gamma: float = 1.0,
        min_decay: float = 0.0,
    ) -> None:
        if not (0.0 <= decay <= 1.0):
            raise ValueError(f"decay must be in [0, 1], got {decay}")
        if not (0.0 <= min_decay <= decay):
            raise ValueError(f"min_decay must be in [0, decay], got {min_decay}")
        if not warmup_power > 0 or not inv_gamma > 0:
            raise ValueError(f"warmup_power and inv_gamma must be > 0, got {warmup_power}, {inv_gamma}")
        self.decay = float(decay)
        self.warmup = bool(warmup)
        self.warmup_power = float(warmup_power)
        self.inv_gamma = float(inv_gamma)
        self.min_decay = float(min_decay)
        self.num_updates = 0
        self.last_decay: float | None = None
        self.shadow_params: dict[str, Tensor] = {
            name: p.detach().to(torch.float32).clone() for name, p in module.named_parameters() if p.requires_grad
        }
        self.shadow_buffers: dict[str, Tensor] = {
            name: b.detach().to(torch.float32).clone()
            for name, b in module.named_buffers()
            if b.is_floating_point()
        }

    def get_decay(self, step: int) -> float:
        """Decay used by the update with 0-based index ``step``."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        if not self.warmup:
            return self.decay
        d = 1.0 - (1.0 + step / self.inv_gamma) ** (-self.warmup_power)
        return min(max(d, self.min_decay), self.decay)

    def _named(self, module: nn.Module) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        params = {n: p for n, p in module.named_parameters() if p.requires_grad}
        buffers = {n: b for n, b in module.named_buffers() if b.is_floating_point()}
        if params.keys() != self.shadow_params.keys() or buffers.keys() != self.shadow_buffers.keys():
            missing = sorted(set(self.shadow_params) ^ set(params))[:5]
            raise ValueError(f"module does not match the EMA's parameter names (differences: {missing}...)")
        return params, buffers

    @torch.no_grad()
    def update(self, module: nn.Module, step: int | None = None) -> float:
        """Fold the current weights of ``module`` in; returns the decay used.
        ``step`` (0-based optimizer step) overrides the internal counter, e.g. after resume."""
        n = self.num_updates if step is None else int(step)
        d = self.get_decay(n)
        params, buffers = self._named(module)
        shadows, currents = [], []
        for name, p in params.items():
            s = self.shadow_params[name]
            if s.device != p.device:
                s = self.shadow_params[name] = s.to(p.device)
            shadows.append(s)
            currents.append(p.detach().to(torch.float32))
        if shadows:
            # One fused multi-tensor kernel instead of one launch per parameter.
            torch._foreach_lerp_(shadows, currents, 1.0 - d)
        for name, b in buffers.items():
            self.shadow_buffers[name] = b.detach().to(torch.float32).clone()
        self.num_updates = n + 1
        self.last_decay = d
        return d

    @torch.no_grad()
    def copy_to(self, module: nn.Module) -> None:
        """Overwrite ``module``'s weights with the EMA weights (cast to their dtype)."""
        params, buffers = self._named(module)
        for name, p in params.items():
            p.copy_(self.shadow_params[name].to(device=p.device, dtype=p.dtype))
        for name, b in buffers.items():
            b.copy_(self.shadow_buffers[name].to(device=b.device, dtype=b.dtype))

    @contextmanager
    def swap_into(self, module: nn.Module) -> Iterator[nn.Module]:
        """Temporarily load EMA weights into ``module`` (e.g. for sampling/eval); the
        original weights are restored on exit, also when the body raises."""
        params, buffers = self._named(module)
        with torch.no_grad():
            backup = {n: t.detach().clone() for n, t in {**params, **buffers}.items()}
        self.copy_to(module)
        try:
            yield module
        finally:
            with torch.no_grad():
                for name, t in {**params, **buffers}.items():
                    t.copy_(backup[name])

    def to(self, device: torch.device | str) -> "EMA":
        self.shadow_params = {n: t.to(device) for n, t in self.shadow_params.items()}
        self.shadow_buffers = {n: t.to(device) for n, t in self.shadow_buffers.items()}
        return self

    def state_dict(self) -> dict[str, Any]:
        return {
            "decay": self.decay,
            "warmup": self.warmup,
            "warmup_power": self.warmup_power,
            "inv_gamma": self.inv_gamma,
            "min_decay": self.min_decay,
            "num_updates": self.num_updates,
            "shadow_params": {n: t.clone() for n, t in self.shadow_params.items()},
            "shadow_buffers": {n: t.clone() for n, t in self.shadow_buffers.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        required = {"decay", "warmup", "warmup_power", "inv_gamma", "min_decay", "num_updates", "shadow_params", "shadow_buffers"}
        missing = required - set(state)
        if missing:
            raise ValueError(f"EMA state_dict is missing keys {sorted(missing)}")
        if set(state["shadow_params"]) != set(self.shadow_params) or set(state["shadow_buffers"]) != set(self.shadow_buffers):
            raise ValueError("EMA state_dict parameter names do not match this EMA's module")
        for name, t in state["shadow_params"].items():
            if t.shape != self.shadow_params[name].shape:
                raise ValueError(f"shape mismatch for {name}: {tuple(t.shape)} vs {tuple(self.shadow_params[name].shape)}")
        device = next(iter(self.shadow_params.values())).device if self.shadow_params else torch.device("cpu")
        self.decay = float(state["decay"])
        self.warmup = bool(state["warmup"])
        self.warmup_power = float(state["warmup_power"])
        self.inv_gamma = float(state["inv_gamma"])
        self.min_decay = float(state["min_decay"])
        self.num_updates = int(state["num_updates"])
        self.shadow_params = {n: t.to(device=device, dtype=torch.float32).clone() for n, t in state["shadow_params"].items()}
        self.shadow_buffers = {n: t.to(device=device, dtype=torch.float32).clone() for n, t in state["shadow_buffers"].items()}
