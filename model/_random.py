"""Generator-aware random draws shared by the objectives and samplers.

A ``torch.Generator`` lives on one device; drawing with it on another device raises.
We draw on the generator's device and move the result, which makes results depend only
on the generator's seed (not on where the model lives). diffusers' ``randn_tensor``
does the same for CPU generators, so seeded samples match its pipelines.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _draw_device(generator: torch.Generator | None, device: torch.device | str) -> torch.device:
    return generator.device if generator is not None else torch.device(device)


def randn(shape, *, generator: torch.Generator | None, device, dtype=torch.float32) -> Tensor:
    out = torch.randn(tuple(shape), generator=generator, device=_draw_device(generator, device), dtype=dtype)
    return out.to(device)


def rand(shape, *, generator: torch.Generator | None, device, dtype=torch.float32) -> Tensor:
    out = torch.rand(tuple(shape), generator=generator, device=_draw_device(generator, device), dtype=dtype)
    return out.to(device)


def randint(high: int, shape, *, generator: torch.Generator | None, device) -> Tensor:
    out = torch.randint(0, high, tuple(shape), generator=generator, device=_draw_device(generator, device))
    return out.to(device)
